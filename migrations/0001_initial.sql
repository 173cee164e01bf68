-- blockcache metadata, version 1.
--
-- Ids of objects come from AUTOINCREMENT and are never reused: an object key in the store is
-- derived from the id and written once.

-- Parameters fixed when the volume is created (block size).
CREATE TABLE volume (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- One row per stored (or being stored) object. An object holds exactly one block's content.
CREATE TABLE objects (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- SHA-256 of the plaintext block; NULL once an upload failed, so nothing dedups against it.
    hash        BLOB UNIQUE CHECK (hash IS NULL OR length(hash) = 32),
    -- Number of rows in `blocks` that point here; the row is deleted when it reaches 0.
    refcount    INTEGER NOT NULL CHECK (refcount >= 0),
    -- Plaintext length of the block.
    length      INTEGER NOT NULL CHECK (length >= 0),
    -- Bytes the object takes in the store; NULL until the upload is confirmed.
    stored_size INTEGER CHECK (stored_size IS NULL OR stored_size >= 0),
    -- 'uploading': registered, not confirmed; 'uploaded': in the store; 'failed': upload failed.
    state       TEXT NOT NULL CHECK (state IN ('uploading', 'uploaded', 'failed'))
);

-- Which object holds each block. A block without a row is a hole and reads as zeros.
CREATE TABLE blocks (
    inode   INTEGER NOT NULL,
    blockno INTEGER NOT NULL,
    obj_id  INTEGER NOT NULL REFERENCES objects (id),
    PRIMARY KEY (inode, blockno)
) WITHOUT ROWID;

CREATE INDEX blocks_by_object ON blocks (obj_id);

-- Objects whose row is gone and whose store object still has to be deleted. Written in the
-- same transaction that deletes the `objects` row, so the intent to delete survives a crash.
CREATE TABLE pending_deletions (
    obj_id INTEGER PRIMARY KEY NOT NULL
);

-- Running totals kept by the triggers below, so usage is O(1).
CREATE TABLE totals (
    id            INTEGER PRIMARY KEY CHECK (id = 0),
    objects       INTEGER NOT NULL,
    unique_bytes  INTEGER NOT NULL, -- sum of objects.length
    stored_bytes  INTEGER NOT NULL, -- sum of objects.stored_size over uploaded objects
    logical_bytes INTEGER NOT NULL  -- sum over blocks of the length of their object
);
INSERT INTO totals VALUES (0, 0, 0, 0, 0);

CREATE TRIGGER objects_insert AFTER INSERT ON objects BEGIN
    UPDATE totals SET
        objects = objects + 1,
        unique_bytes = unique_bytes + NEW.length,
        stored_bytes = stored_bytes
            + (CASE WHEN NEW.state = 'uploaded' THEN NEW.stored_size ELSE 0 END)
    WHERE id = 0;
END;

CREATE TRIGGER objects_delete AFTER DELETE ON objects BEGIN
    UPDATE totals SET
        objects = objects - 1,
        unique_bytes = unique_bytes - OLD.length,
        stored_bytes = stored_bytes
            - (CASE WHEN OLD.state = 'uploaded' THEN OLD.stored_size ELSE 0 END)
    WHERE id = 0;
END;

CREATE TRIGGER objects_update AFTER UPDATE OF state, stored_size ON objects BEGIN
    UPDATE totals SET
        stored_bytes = stored_bytes
            + (CASE WHEN NEW.state = 'uploaded' THEN NEW.stored_size ELSE 0 END)
            - (CASE WHEN OLD.state = 'uploaded' THEN OLD.stored_size ELSE 0 END)
    WHERE id = 0;
END;

CREATE TRIGGER blocks_insert AFTER INSERT ON blocks BEGIN
    UPDATE totals SET
        logical_bytes = logical_bytes
            + coalesce((SELECT length FROM objects WHERE id = NEW.obj_id), 0)
    WHERE id = 0;
END;

CREATE TRIGGER blocks_delete AFTER DELETE ON blocks BEGIN
    UPDATE totals SET
        logical_bytes = logical_bytes
            - coalesce((SELECT length FROM objects WHERE id = OLD.obj_id), 0)
    WHERE id = 0;
END;

CREATE TRIGGER blocks_update AFTER UPDATE OF obj_id ON blocks BEGIN
    UPDATE totals SET
        logical_bytes = logical_bytes
            + coalesce((SELECT length FROM objects WHERE id = NEW.obj_id), 0)
            - coalesce((SELECT length FROM objects WHERE id = OLD.obj_id), 0)
    WHERE id = 0;
END;
