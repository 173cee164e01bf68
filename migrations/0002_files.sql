-- blockcache metadata, version 2: a namespace of named files over the blocks.
--
-- A file's content lives in the blocks of one inode. Replacing a file writes a fresh inode
-- ('staging') and swaps it in with one transaction, so a reader sees the old or the new
-- content, never a mix. Inodes whose blocks still have to be removed (a replaced or deleted
-- file, or a replacement that never finished) stay listed here until their blocks are gone,
-- so the intent survives a crash. A volume used through the namespace owns its inode space.

CREATE TABLE inodes (
    inode INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 'staging': being written by a replacement; 'live': named by a file;
    -- 'retired': no longer named, blocks still to be removed.
    state TEXT NOT NULL CHECK (state IN ('staging', 'live', 'retired'))
);

CREATE TABLE files (
    name     TEXT PRIMARY KEY NOT NULL,
    inode    INTEGER NOT NULL UNIQUE REFERENCES inodes (inode),
    size     INTEGER NOT NULL CHECK (size >= 0),
    -- Last modification, nanoseconds since the Unix epoch.
    mtime_ns INTEGER NOT NULL,
    -- Bumped on every change of the content; part of the ETag.
    version  INTEGER NOT NULL CHECK (version >= 1)
) WITHOUT ROWID;
