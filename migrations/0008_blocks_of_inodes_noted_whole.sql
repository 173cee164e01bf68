-- blockcache metadata, version 8: a block written while its inode is noted whole is not
-- noted on its own.
--
-- An inode noted whole (kind 3: a file's new inode, a merge's staging inode) ships every
-- mapping it has when a round reads it, so a mapping inserted or changed meanwhile ships
-- with it. Such a change now moves the inode's note (`last`) instead of noting the block:
-- a round that read the inode before the change sees it as changed since, as it saw the
-- block's note, and ships the inode again. A new file's blocks, committed after the file
-- was named, no longer add a note each (a 64 MiB file of 64 KiB blocks: 1,024 notes read,
-- shipped twice and deleted). A deletion is still noted on its own: the inode's mappings
-- name what it has, not what it lost.
DROP TRIGGER blocks_noted_insert;
DROP TRIGGER blocks_noted_update;

CREATE TRIGGER blocks_noted_insert AFTER INSERT ON blocks
WHEN EXISTS (SELECT 1 FROM files WHERE inode = NEW.inode)
  OR EXISTS (SELECT 1 FROM merges WHERE staging = NEW.inode)
BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    UPDATE meta_changes SET last = (SELECT n FROM meta_clock WHERE id = 0)
        WHERE kind = 3 AND a = NEW.inode AND b = 0 AND name = '';
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0
            AND NOT EXISTS (SELECT 1 FROM meta_changes
                            WHERE kind = 3 AND a = NEW.inode AND b = 0 AND name = '')
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_update AFTER UPDATE ON blocks
WHEN EXISTS (SELECT 1 FROM files WHERE inode = NEW.inode)
  OR EXISTS (SELECT 1 FROM merges WHERE staging = NEW.inode)
BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    UPDATE meta_changes SET last = (SELECT n FROM meta_clock WHERE id = 0)
        WHERE kind = 3 AND a = NEW.inode AND b = 0 AND name = '';
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0
            AND NOT EXISTS (SELECT 1 FROM meta_changes
                            WHERE kind = 3 AND a = NEW.inode AND b = 0 AND name = '')
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;
