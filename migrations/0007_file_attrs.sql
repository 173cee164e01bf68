-- blockcache metadata, version 7: attributes of a file's content.
--
-- `attrs` is an opaque text (the daemon keeps JSON there: the S3 ETag and MD5, the content
-- type, user metadata) set by the writer that names the file, replaced with the file, and
-- cleared by a change of the content in place (a patch or a truncation), which it no longer
-- describes. It ships with the file and is restored with it.
ALTER TABLE files ADD COLUMN attrs TEXT;
ALTER TABLE shipped_files ADD COLUMN attrs TEXT;
