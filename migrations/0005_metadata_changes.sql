-- blockcache metadata, version 5: the metadata shipped to the store.
--
-- The store holds the volume's metadata as generations: a snapshot, then deltas. A delta
-- carries the current rows of the keys changed since the one before. Triggers note each
-- changed key in `meta_changes`, in the transaction that changes it, so nothing is missed
-- whatever the writer. A key is noted once until it is shipped: `seq` is the clock at its
-- first unshipped change, `last` at its latest. The clock counts changes.
--
-- kind 1: a file (name); 2: a block (a = inode, b = blockno); 3: every block of inode a
-- (it became a file's, or a merge's staging inode: its blocks, written while it was
-- anonymous, ship with it); 4: a merge (a = staging inode, b = the file's inode).
--
-- The `shipped_*` tables are what the store holds (its latest generation, applied): the
-- files, merges and block mappings of the shipped state and the objects they name. A
-- snapshot is read from them, and an object they name is not deleted from the store.
CREATE TABLE meta_clock (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    n  INTEGER NOT NULL
);
INSERT INTO meta_clock VALUES (0, 0);

CREATE TABLE meta_changes (
    kind INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 4),
    a    INTEGER NOT NULL DEFAULT 0,
    b    INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL DEFAULT '',
    seq  INTEGER NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (kind, a, b, name)
) WITHOUT ROWID;
CREATE INDEX meta_changes_by_seq ON meta_changes (seq);

CREATE TABLE shipped_files (
    name     TEXT PRIMARY KEY NOT NULL,
    inode    INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    version  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX shipped_files_by_inode ON shipped_files (inode);

CREATE TABLE shipped_merges (
    staging INTEGER PRIMARY KEY NOT NULL,
    target  INTEGER NOT NULL,
    cut     INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE shipped_blocks (
    inode   INTEGER NOT NULL,
    blockno INTEGER NOT NULL,
    obj_id  INTEGER NOT NULL,
    PRIMARY KEY (inode, blockno)
) WITHOUT ROWID;
CREATE INDEX shipped_blocks_by_object ON shipped_blocks (obj_id);

CREATE TABLE shipped_objects (
    id          INTEGER PRIMARY KEY NOT NULL,
    hash        BLOB,
    length      INTEGER NOT NULL,
    stored_size INTEGER
);

-- A volume from before shipping: everything it holds is to be shipped.
INSERT INTO meta_changes (kind, a, b, name, seq, last) SELECT 1, 0, 0, name, 1, 1 FROM files;
INSERT OR IGNORE INTO meta_changes (kind, a, b, name, seq, last)
    SELECT 3, inode, 0, '', 1, 1 FROM files;
INSERT OR IGNORE INTO meta_changes (kind, a, b, name, seq, last)
    SELECT 4, staging, target, '', 1, 1 FROM merges;
INSERT OR IGNORE INTO meta_changes (kind, a, b, name, seq, last)
    SELECT 3, staging, 0, '', 1, 1 FROM merges;
UPDATE meta_clock SET n = 1 WHERE EXISTS (SELECT 1 FROM meta_changes);

CREATE TRIGGER files_noted_insert AFTER INSERT ON files BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, name, seq, last)
        SELECT 1, NEW.name, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
    INSERT INTO meta_changes (kind, a, seq, last)
        SELECT 3, NEW.inode, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER files_noted_update AFTER UPDATE ON files BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, name, seq, last)
        SELECT 1, NEW.name, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
    INSERT INTO meta_changes (kind, name, seq, last)
        SELECT 1, OLD.name, n, n FROM meta_clock WHERE id = 0 AND OLD.name != NEW.name
        ON CONFLICT DO UPDATE SET last = excluded.last;
    INSERT INTO meta_changes (kind, a, seq, last)
        SELECT 3, NEW.inode, n, n FROM meta_clock WHERE id = 0 AND OLD.inode != NEW.inode
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER files_noted_delete AFTER DELETE ON files BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, name, seq, last)
        SELECT 1, OLD.name, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_insert AFTER INSERT ON blocks BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_update AFTER UPDATE ON blocks BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_delete AFTER DELETE ON blocks BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, OLD.inode, OLD.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER merges_noted_insert AFTER INSERT ON merges BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 4, NEW.staging, NEW.target, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
    INSERT INTO meta_changes (kind, a, seq, last)
        SELECT 3, NEW.staging, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER merges_noted_delete AFTER DELETE ON merges BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 4, OLD.staging, OLD.target, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;
