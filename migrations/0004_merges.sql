-- blockcache metadata, version 4: patches and truncations applied through a staging inode.
--
-- A patch of a file writes the blocks it changes into a fresh 'staging' inode (the
-- untouched bytes of a partly changed block are copied from the file), then in one
-- transaction sets the file's new size and version and records here that the staging inode
-- is to be merged into the file's inode. A truncation does the same with only a cut (and,
-- when the cut block must reach the store before the commit, that block staged). That
-- transaction is the change's commit point: before it, the staging inode is an abandoned one
-- and is removed at the next open; after it, the merge (the file's bytes from byte `cut` on
-- removed, then each staged block copied over the file's block) is redone at the next open
-- until the row is gone, as long as the file still has `version` (a later change of the file
-- implies that this merge was finished). The staging inode keeps its blocks until the merged
-- blocks are as durable as the staged ones were.
CREATE TABLE merges (
    staging   INTEGER PRIMARY KEY NOT NULL REFERENCES inodes (inode),
    target    INTEGER NOT NULL,
    cut       INTEGER NOT NULL CHECK (cut >= 0),
    version   INTEGER NOT NULL CHECK (version >= 1)
);
