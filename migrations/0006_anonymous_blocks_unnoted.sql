-- blockcache metadata, version 6: block changes of anonymous inodes are not noted.
--
-- Only the blocks of a file's inode or of a merge's staging inode are part of the shipped
-- state. A block change of any other inode (the raw block API's, a file being written, a
-- retired inode) shipped nothing: the round read it, found the inode anonymous and
-- forgot it. Now it is not noted at all. Nothing is missed: an inode that becomes a file's
-- or a staging inode has all its blocks noted then (kind 3, by the triggers on files and
-- merges), and the shipped blocks of an inode that stops being named are dropped when
-- that change ships. Writers are serialized, so a trigger sees the names as committed.
DROP TRIGGER blocks_noted_insert;
DROP TRIGGER blocks_noted_update;
DROP TRIGGER blocks_noted_delete;

CREATE TRIGGER blocks_noted_insert AFTER INSERT ON blocks
WHEN EXISTS (SELECT 1 FROM files WHERE inode = NEW.inode)
  OR EXISTS (SELECT 1 FROM merges WHERE staging = NEW.inode)
BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_update AFTER UPDATE ON blocks
WHEN EXISTS (SELECT 1 FROM files WHERE inode = NEW.inode)
  OR EXISTS (SELECT 1 FROM merges WHERE staging = NEW.inode)
BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, NEW.inode, NEW.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;

CREATE TRIGGER blocks_noted_delete AFTER DELETE ON blocks
WHEN EXISTS (SELECT 1 FROM files WHERE inode = OLD.inode)
  OR EXISTS (SELECT 1 FROM merges WHERE staging = OLD.inode)
BEGIN
    UPDATE meta_clock SET n = n + 1 WHERE id = 0;
    INSERT INTO meta_changes (kind, a, b, seq, last)
        SELECT 2, OLD.inode, OLD.blockno, n, n FROM meta_clock WHERE id = 0 AND true
        ON CONFLICT DO UPDATE SET last = excluded.last;
END;
