-- blockcache metadata, version 3: a row whose only use is to be written.
--
-- Block commits are made without a sync of their own (the engine acts on them only once a
-- later fully synchronized commit has made them durable). When no such commit comes, a
-- fully synchronized update of this row syncs the write-ahead log, and with it every commit
-- before it.
CREATE TABLE sync_point (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    n  INTEGER NOT NULL
);
INSERT INTO sync_point VALUES (0, 0);
