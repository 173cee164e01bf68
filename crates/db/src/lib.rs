//! Metadata of blockcache in SQLite: objects, block mappings, refcounts, pending deletions.
//!
//! All writes go through one connection behind an async mutex, so write transactions are
//! serialized: a dedup decision (look up a hash, then link or insert) is one transaction and
//! two concurrent commits of equal content can never create two objects. Reads use a small
//! pool of separate connections and never wait behind writers (WAL mode).
//!
//! Every multi-statement change is one transaction. The writer runs with
//! `synchronous=FULL`, so a committed transaction is durable before the caller acts on it,
//! with one exception: [`Db::commit_blocks_unsynced`] commits without a sync of its own and
//! returns a [`SyncTicket`]. In WAL mode every fully synchronized commit first syncs the
//! whole log, so the durable state is always a prefix of the commit order: an unsynced
//! commit becomes durable with the next synchronized one ([`Db::is_durable`]), or when
//! [`Db::sync_through`] forces one. A process crash loses no commit; a power loss can lose
//! unsynced commits, only together with every commit after them. Callers act on an unsynced
//! commit (settle a block as clean, delete a released object from the store) only once it is
//! durable.
//!
//! Inode and block numbers are `u64` in the API and must be at most `i64::MAX`; the engine
//! rejects larger ones before they reach this crate.
//!
//! # Crash consistency
//! Write order is: register the object (`uploading`) and its mapping, upload, then mark it
//! `uploaded`. Delete order is: delete the mapping and (at refcount 0) the object row while
//! recording a pending deletion, then delete the store object, then drop the pending deletion.
//! A crash can therefore leave an `uploading` object (recovery re-checks it) or a pending
//! deletion (recovery finishes it), never a mapping to an object that was deleted.

use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Mutex, MutexGuard};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A query failed.
    #[error("database error while trying to {context}: {source}")]
    Sqlx {
        /// What we were doing, as a verb phrase.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
    /// The database file could not be opened.
    #[error("cannot {context} {}: {source}", path.display())]
    Open {
        /// What we were doing.
        context: &'static str,
        /// The database file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
    /// The directory of the database file could not be created.
    #[error("cannot create the database's directory {}: {source}", path.display())]
    Directory {
        /// The directory.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The schema could not be brought up to date.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The volume was created with another block size.
    #[error(
        "the volume was created with block size {stored}, not {requested}; the block size cannot change"
    )]
    BlockSizeMismatch {
        /// The block size recorded in the database.
        stored: u64,
        /// The block size asked for.
        requested: u64,
    },
    /// One batch named the same block twice.
    #[error("block {blockno} of inode {inode} appears twice in one commit")]
    DuplicateBlock {
        /// Inode of the block.
        inode: u64,
        /// Block number.
        blockno: u64,
    },
    /// The database holds a value that cannot be right.
    #[error("database holds invalid data: {0}")]
    Invalid(String),
    /// Another process uses the volume (it holds the lock next to the database).
    #[error(
        "the volume is in use: {} is locked by {holder}; one process at a time may use a volume's database and cache",
        lock.display()
    )]
    VolumeLocked {
        /// The lock file.
        lock: std::path::PathBuf,
        /// Who holds it, as its holder wrote it (pid, host, since when).
        holder: String,
    },
    /// A file was to be created only if its name was free, and it was not.
    #[error("a file named {0:?} exists")]
    NameTaken(String),
    /// The volume's lock file could not be opened or written.
    #[error("could not use the volume's lock file {}: {source}", path.display())]
    LockFile {
        /// The lock file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying may succeed (the database was busy or locked).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlx { source, .. } => match source {
                sqlx::Error::Database(e) => {
                    let code = e.code();
                    // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with extended codes.
                    matches!(code.as_deref().and_then(|c| c.parse::<i32>().ok()), Some(c) if c & 0xff == 5 || c & 0xff == 6)
                }
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
                _ => false,
            },
            _ => false,
        }
    }
}

impl Error {
    /// Whether the database's file system is full (`SQLITE_FULL`, or `ENOSPC` from an I/O).
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Sqlx { source, .. } => match source {
                sqlx::Error::Database(e) => {
                    // SQLITE_FULL (13), with extended codes.
                    matches!(e.code().as_deref().and_then(|c| c.parse::<i32>().ok()), Some(c) if c & 0xff == 13)
                }
                sqlx::Error::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
                _ => false,
            },
            Self::LockFile { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn ctx(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Sqlx { context, source }
}

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Upload state of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// Registered; the upload has not been confirmed.
    Uploading,
    /// Confirmed in the store.
    Uploaded,
    /// The upload failed; the hash was cleared so nothing dedups against it.
    Failed,
}

impl ObjectState {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "uploading" => Ok(Self::Uploading),
            "uploaded" => Ok(Self::Uploaded),
            "failed" => Ok(Self::Failed),
            other => Err(Error::Invalid(format!("unknown object state {other:?}"))),
        }
    }
}

/// One row of `objects`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Object id; the store key is derived from it.
    pub id: u64,
    /// SHA-256 of the plaintext, `None` after a failed upload.
    pub hash: Option<Hash>,
    /// Blocks that point to this object.
    pub refcount: u64,
    /// Plaintext length.
    pub length: u64,
    /// Bytes in the store, once confirmed.
    pub stored_size: Option<u64>,
    /// Upload state.
    pub state: ObjectState,
}

/// What [`Db::commit_blocks_unsynced`] decided for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The block already pointed to an object with this content.
    Unchanged {
        /// The object.
        obj_id: u64,
        /// Its state.
        state: ObjectState,
    },
    /// The block now points to an existing object with the same content (refcount + 1).
    Linked {
        /// The object.
        obj_id: u64,
        /// Its state: it may still be uploading.
        state: ObjectState,
    },
    /// A new object was registered in state `uploading`; the caller must upload it.
    Created {
        /// The new object.
        obj_id: u64,
    },
}

/// One block to commit: its key and the hash and length of its current content.
#[derive(Debug, Clone, Copy)]
pub struct CommitRequest {
    /// Inode.
    pub inode: u64,
    /// Block number.
    pub blockno: u64,
    /// SHA-256 of the content.
    pub hash: Hash,
    /// Length of the content.
    pub length: u64,
}

/// The result of committing one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// What happened to the block.
    pub outcome: Outcome,
    /// An object whose refcount reached 0 because the block moved away from it; its row is
    /// gone and a pending deletion was recorded.
    pub released: Option<u64>,
}

/// Running totals over the whole volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Objects registered.
    pub objects: u64,
    /// Sum of the plaintext lengths of all objects (unique content).
    pub unique_bytes: u64,
    /// Bytes confirmed in the store.
    pub stored_bytes: u64,
    /// Sum over all mapped blocks of their length (what the volume holds, before dedup).
    pub logical_bytes: u64,
}

/// Names an unsynced commit ([`Db::commit_blocks_unsynced`]): it is durable once
/// [`Db::is_durable`] says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SyncTicket(u64);

/// The metadata store.
#[derive(Debug)]
pub struct Db {
    writer: Mutex<SqliteConnection>,
    /// How the writer connects, to replace a connection a failure left in a transaction.
    writer_options: SqliteConnectOptions,
    /// The volume's lock (see `volume.rs`), held until [`Db::close`] or drop; `None` for
    /// an in-memory database.
    lock: std::sync::Mutex<Option<std::fs::File>>,
    readers: SqlitePool,
    /// Unsynced commits made so far (the last ticket handed out).
    unsynced: AtomicU64,
    /// The last ticket known durable. Written under the writer lock.
    durable: AtomicU64,
    /// The writer connection may still be in `synchronous=NORMAL` (restoring `FULL` after an
    /// unsynced commit failed); the next writer restores it first. Under the writer lock.
    relaxed: AtomicBool,
}

/// The `synchronous` levels the writer switches between.
#[derive(Debug, Clone, Copy)]
enum Synchronous {
    /// Every commit syncs the log.
    Full,
    /// Commits do not sync; a later `Full` commit makes them durable.
    Normal,
}

/// Sets the writer's `synchronous` level (outside a transaction).
async fn set_synchronous(w: &mut SqliteConnection, level: Synchronous) -> Result<()> {
    let statement = match level {
        Synchronous::Full => "PRAGMA synchronous = FULL",
        Synchronous::Normal => "PRAGMA synchronous = NORMAL",
    };
    sqlx::query(statement)
        .execute(&mut *w)
        .await
        .map_err(ctx("set the synchronous level of the database"))?;
    Ok(())
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("value {v} exceeds i64::MAX")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Invalid(format!("negative {what}: {v}")))
}

fn hash_from(bytes: Option<Vec<u8>>) -> Result<Option<Hash>> {
    bytes
        .map(|b| {
            Hash::try_from(b.as_slice())
                .map_err(|_| Error::Invalid(format!("hash of {} bytes", b.len())))
        })
        .transpose()
}

fn object_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Object> {
    let get = |e| Error::Sqlx {
        context: "decode an object row",
        source: e,
    };
    Ok(Object {
        id: to_u64(row.try_get("id").map_err(get)?, "object id")?,
        hash: hash_from(row.try_get("hash").map_err(get)?)?,
        refcount: to_u64(row.try_get("refcount").map_err(get)?, "refcount")?,
        length: to_u64(row.try_get("length").map_err(get)?, "length")?,
        stored_size: row
            .try_get::<Option<i64>, _>("stored_size")
            .map_err(get)?
            .map(|s| to_u64(s, "stored size"))
            .transpose()?,
        state: ObjectState::parse(row.try_get("state").map_err(get)?)?,
    })
}

/// The columns of `objects` that [`object_from_row`] reads. A macro, so that queries naming
/// them are `&'static str` (`concat!` takes literals only) and need no dynamic SQL.
macro_rules! object_columns {
    () => {
        "id, hash, refcount, length, stored_size, state"
    };
}

impl Db {
    /// Opens (creating if needed) the database at `url` (`sqlite://path` or a plain path) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(ctx("parse the database URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            // Statement journals and temporary tables in memory: a batched statement would
            // otherwise create (and unlink) a temporary file each time it runs.
            .pragma("temp_store", "memory")
            .busy_timeout(Duration::from_secs(30));
        // The lock first: nothing of the volume is read or written by a second process.
        let file = options.get_filename().to_owned();
        let in_memory = file.as_os_str().is_empty() || file == std::path::Path::new(":memory:");
        if !in_memory && let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        let opening = |context: &'static str| {
            let path = file.clone();
            move |source| Error::Open {
                context,
                path,
                source,
            }
        };
        let lock = if in_memory {
            None
        } else {
            let file = file.to_owned();
            Some(
                tokio::task::spawn_blocking(move || volume::lock(&file))
                    .await
                    .expect("lock task panicked")?,
            )
        };
        let writer_options = options.clone().synchronous(SqliteSynchronous::Full);
        let mut writer = SqliteConnection::connect_with(&writer_options)
            .await
            .map_err(opening("open the database"))?;
        sqlx::migrate!("../../migrations").run(&mut writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(opening("open for reading the database"))?;
        Ok(Self {
            writer: Mutex::new(writer),
            writer_options,
            lock: std::sync::Mutex::new(lock),
            readers,
            unsynced: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            relaxed: AtomicBool::new(false),
        })
    }

    /// Takes the writer connection, in `synchronous=FULL` and outside any transaction.
    async fn write(&self) -> Result<MutexGuard<'_, SqliteConnection>> {
        let mut w = self.writer.lock().await;
        self.repair_writer(&mut w).await?;
        if self.relaxed.load(Ordering::Acquire) {
            set_synchronous(&mut w, Synchronous::Full).await?;
            self.relaxed.store(false, Ordering::Release);
        }
        Ok(w)
    }

    /// Records that a fully synchronized commit just made every earlier commit durable.
    /// Called under the writer lock, right after that commit.
    fn synced(&self) {
        self.durable
            .store(self.unsynced.load(Ordering::Acquire), Ordering::Release);
    }

    /// The database file, absolute; `None` for an in-memory database.
    pub fn path(&self) -> Option<std::path::PathBuf> {
        let file = self.writer_options.get_filename();
        if file.as_os_str().is_empty() || file == std::path::Path::new(":memory:") {
            return None;
        }
        std::path::absolute(file).ok()
    }

    /// Whether the commit of `ticket` is durable.
    pub fn is_durable(&self, ticket: SyncTicket) -> bool {
        self.durable.load(Ordering::Acquire) >= ticket.0
    }

    /// Makes the commit of `ticket`, and every commit before it, durable: at once if a
    /// synchronized commit has done so already, otherwise with one synchronized write.
    /// Concurrent callers share one sync.
    pub async fn sync_through(&self, ticket: SyncTicket) -> Result<()> {
        if self.is_durable(ticket) {
            return Ok(());
        }
        let mut w = self.write().await?;
        if self.is_durable(ticket) {
            return Ok(());
        }
        sqlx::query("UPDATE sync_point SET n = n + 1 WHERE id = 0")
            .execute(&mut *w)
            .await
            .map_err(ctx("sync the database log"))?;
        self.synced();
        Ok(())
    }

    /// Makes every commit made so far durable (see [`Db::sync_through`]).
    pub async fn sync_all(&self) -> Result<()> {
        self.sync_through(SyncTicket(self.unsynced.load(Ordering::Acquire)))
            .await
    }

    /// Checkpoints the write-ahead log, closes the reader connections and gives up the
    /// volume's lock. The writer connection closes when the `Db` is dropped; nothing may
    /// write after this.
    pub async fn close(&self) {
        let checkpointed = async {
            let mut w = self.write().await?;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&mut *w)
                .await
                .map_err(ctx("checkpoint the database"))?;
            Ok::<_, Error>(())
        };
        if let Err(error) = checkpointed.await {
            tracing::warn!(%error, "checkpointing the database failed");
        }
        self.readers.close().await;
        drop(self.lock.lock().expect("lock mutex poisoned").take());
    }

    /// Records `block_size` for a new volume, or checks that it matches the recorded one.
    pub async fn check_block_size(&self, block_size: u64) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT value FROM volume WHERE key = 'block_size'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(ctx("read the block size"))?;
        match stored {
            Some(v) => {
                let stored: u64 = v
                    .parse()
                    .map_err(|_| Error::Invalid(format!("block size {v:?}")))?;
                if stored != block_size {
                    return Err(Error::BlockSizeMismatch {
                        stored,
                        requested: block_size,
                    });
                }
            }
            None => {
                sqlx::query("INSERT INTO volume (key, value) VALUES ('block_size', ?)")
                    .bind(block_size.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(ctx("record the block size"))?;
            }
        }
        tx.commit().await.map_err(ctx("commit the block size"))
    }

    /// The object block `(inode, blockno)` points to, if any.
    pub async fn mapping(&self, inode: u64, blockno: u64) -> Result<Option<Object>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            object_columns!(),
            " FROM objects WHERE id = \
             (SELECT obj_id FROM blocks WHERE inode = ? AND blockno = ?)"
        ))
        .bind(to_i64(inode)?)
        .bind(to_i64(blockno)?)
        .fetch_optional(&self.readers)
        .await
        .map_err(ctx("look up a block mapping"))?;
        row.as_ref().map(object_from_row).transpose()
    }

    /// Up to `limit` blocks (inode, block number) mapped to object `obj_id`.
    pub async fn blocks_of_object(&self, obj_id: u64, limit: u32) -> Result<Vec<(u64, u64)>> {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT inode, blockno FROM blocks WHERE obj_id = ? LIMIT ?")
                .bind(to_i64(obj_id)?)
                .bind(i64::from(limit))
                .fetch_all(&self.readers)
                .await
                .map_err(ctx("list the blocks of an object"))?;
        rows.into_iter()
            .map(|(i, b)| Ok((to_u64(i, "inode")?, to_u64(b, "block number")?)))
            .collect()
    }

    /// Block numbers of `inode` in `range` that have a mapping.
    pub async fn mapped_blocks(&self, inode: u64, range: Range<u64>) -> Result<Vec<u64>> {
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT blockno FROM blocks WHERE inode = ? AND blockno >= ? AND blockno < ? ORDER BY blockno",
        )
        .bind(to_i64(inode)?)
        .bind(to_i64(range.start.min(i64::MAX as u64))?)
        .bind(to_i64(range.end.min(i64::MAX as u64))?)
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("list mapped blocks"))?;
        rows.into_iter()
            .map(|b| to_u64(b, "block number"))
            .collect()
    }

    /// The mapped blocks of `inode` with their objects, in block order.
    pub async fn inode_objects(&self, inode: u64) -> Result<Vec<(u64, Object)>> {
        let rows = sqlx::query(concat!(
            "SELECT b.blockno AS blockno, ",
            object_columns!(),
            " FROM blocks b JOIN objects o ON o.id = b.obj_id WHERE b.inode = ? ORDER BY b.blockno"
        ))
        .bind(to_i64(inode)?)
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("list the objects of an inode"))?;
        rows.iter()
            .map(|row| {
                let blockno: i64 = row
                    .try_get("blockno")
                    .map_err(ctx("decode a block number"))?;
                Ok((to_u64(blockno, "block number")?, object_from_row(row)?))
            })
            .collect()
    }

    /// Commits the content of many blocks in one transaction: for each block, link it to an
    /// existing object with the same hash, or register a new object (state `uploading`), and
    /// release the object it pointed to before. Every new reference of the batch is taken
    /// before old ones are dropped, so an object one block leaves and another takes up stays.
    /// The blocks must be distinct ([`Error::DuplicateBlock`] otherwise). The whole batch
    /// costs a handful of statements, whatever its size.
    ///
    /// The commit has no sync of its own: it is durable once [`Db::is_durable`] holds for the
    /// returned ticket (after the next synchronized commit, or [`Db::sync_through`]). That
    /// saves an fsync per batch on the path of every upload; the caller must not act on the
    /// outcome in a way that a power loss could not undo (settling a block as clean, deleting
    /// a released object) before then.
    pub async fn commit_blocks_unsynced(
        &self,
        requests: &[CommitRequest],
    ) -> Result<(Vec<Committed>, SyncTicket)> {
        let mut w = self.write().await?;
        // From here until `FULL` is restored, `relaxed` makes the next writer restore it
        // should this function stop half-way.
        self.relaxed.store(true, Ordering::Release);
        set_synchronous(&mut w, Synchronous::Normal).await?;
        let committed = async {
            let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
            let results = batch::commit_blocks(&mut tx, requests).await?;
            tx.commit().await.map_err(ctx("commit block contents"))?;
            Ok::<_, Error>(results)
        }
        .await;
        let ticket = SyncTicket(self.unsynced.fetch_add(1, Ordering::AcqRel) + 1);
        set_synchronous(&mut w, Synchronous::Full).await?;
        self.relaxed.store(false, Ordering::Release);
        Ok((committed?, ticket))
    }

    /// Marks object `id` as uploaded with `stored_size` bytes. Returns false if the object
    /// no longer exists (it was released while uploading).
    pub async fn confirm_upload(&self, id: u64, stored_size: u64) -> Result<bool> {
        let mut w = self.write().await?;
        let done = sqlx::query(
            "UPDATE objects SET state = 'uploaded', stored_size = ? WHERE id = ? AND state = 'uploading'",
        )
        .bind(to_i64(stored_size)?)
        .bind(to_i64(id)?)
        .execute(&mut *w)
        .await
        .map_err(ctx("confirm an upload"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the outcomes of many uploads in one transaction: `Some(stored_size)` marks the
    /// object uploaded, `None` marks it failed (clearing its hash). Returns, per outcome,
    /// whether a success was recorded (false if the object was released or already failed
    /// meanwhile, or if the upload failed).
    pub async fn record_uploads(&self, outcomes: &[(u64, Option<u64>)]) -> Result<Vec<bool>> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let recorded = batch::record_uploads(&mut tx, outcomes).await?;
        tx.commit().await.map_err(ctx("commit upload outcomes"))?;
        self.synced();
        Ok(recorded)
    }

    /// Removes the mappings of `blocks` (pairs of inode and block number) in one transaction
    /// and releases their objects. Returns the objects whose refcount reached 0 (their rows
    /// are gone and pending deletions were recorded).
    pub async fn remove_blocks(&self, blocks: &[(u64, u64)]) -> Result<Vec<u64>> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let released = batch::remove_blocks(&mut tx, blocks).await?;
        tx.commit().await.map_err(ctx("commit block removals"))?;
        self.synced();
        Ok(released)
    }

    /// Object ids whose store objects still have to be deleted.
    pub async fn pending_deletions(&self) -> Result<Vec<u64>> {
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT obj_id FROM pending_deletions ORDER BY obj_id")
                .fetch_all(&self.readers)
                .await
                .map_err(ctx("list pending deletions"))?;
        ids.into_iter().map(|i| to_u64(i, "object id")).collect()
    }

    /// Forgets pending deletions whose store objects are gone.
    pub async fn finish_deletions(&self, ids: &[u64]) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        batch::finish_deletions(&mut tx, ids).await?;
        tx.commit()
            .await
            .map_err(ctx("commit finished deletions"))?;
        self.synced();
        Ok(())
    }

    /// Objects whose upload was never confirmed, with the blocks that point to them.
    pub async fn unconfirmed_objects(&self) -> Result<Vec<(Object, Vec<(u64, u64)>)>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            object_columns!(),
            " FROM objects WHERE state != 'uploaded' ORDER BY id"
        ))
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("list unconfirmed objects"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let object = object_from_row(row)?;
            let blocks: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT inode, blockno FROM blocks WHERE obj_id = ? ORDER BY inode, blockno",
            )
            .bind(to_i64(object.id)?)
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list the blocks of an object"))?;
            let blocks = blocks
                .into_iter()
                .map(|(i, b)| Ok((to_u64(i, "inode")?, to_u64(b, "block number")?)))
                .collect::<Result<Vec<_>>>()?;
            out.push((object, blocks));
        }
        Ok(out)
    }

    /// Running totals (O(1): one row kept by triggers).
    pub async fn totals(&self) -> Result<Totals> {
        let (objects, unique_bytes, stored_bytes, logical_bytes): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT objects, unique_bytes, stored_bytes, logical_bytes FROM totals WHERE id = 0",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("read the totals"))?;
        Ok(Totals {
            objects: to_u64(objects, "object count")?,
            unique_bytes: to_u64(unique_bytes, "unique bytes")?,
            stored_bytes: to_u64(stored_bytes, "stored bytes")?,
            logical_bytes: to_u64(logical_bytes, "logical bytes")?,
        })
    }

    /// Checks the invariants of the schema that SQL cannot express: every refcount equals the
    /// number of mappings, and the totals equal a full recount. Used by tests.
    pub async fn check_consistency(&self) -> Result<()> {
        let bad: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT o.id, o.refcount, (SELECT count(*) FROM blocks b WHERE b.obj_id = o.id) AS n \
             FROM objects o WHERE o.refcount != (SELECT count(*) FROM blocks b WHERE b.obj_id = o.id)",
        )
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("check refcounts"))?;
        if let Some((id, refcount, n)) = bad.first() {
            return Err(Error::Invalid(format!(
                "object {id} has refcount {refcount} but {n} mappings"
            )));
        }
        // The totals and their recount in one statement, so one snapshot: a commit running
        // meanwhile cannot land between them.
        let row: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT t.objects, t.unique_bytes, t.stored_bytes, t.logical_bytes, \
                    (SELECT count(*) FROM objects), \
                    (SELECT coalesce(sum(length), 0) FROM objects), \
                    (SELECT coalesce(sum(stored_size), 0) FROM objects WHERE state = 'uploaded'), \
                    (SELECT coalesce(sum(o.length), 0) FROM blocks b JOIN objects o ON o.id = b.obj_id) \
             FROM totals t WHERE t.id = 0",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("recount the totals"))?;
        let totals = Totals {
            objects: to_u64(row.0, "object count")?,
            unique_bytes: to_u64(row.1, "unique bytes")?,
            stored_bytes: to_u64(row.2, "stored bytes")?,
            logical_bytes: to_u64(row.3, "logical bytes")?,
        };
        let expected = Totals {
            objects: to_u64(row.4, "count")?,
            unique_bytes: to_u64(row.5, "bytes")?,
            stored_bytes: to_u64(row.6, "bytes")?,
            logical_bytes: to_u64(row.7, "bytes")?,
        };
        if totals != expected {
            return Err(Error::Invalid(format!(
                "totals {totals:?} differ from a recount {expected:?}"
            )));
        }
        Ok(())
    }
}

mod batch;
mod check;
mod files;
mod meta;
mod volume;
pub use check::{BlockRef, CheckedObject, RefcountMismatch};
pub use files::{FileRow, MergeRow};
pub use meta::{
    Change, ChangeKey, DeltaRead, InodeRole, MetaRows, ObjectInfo, RestoreVolume, RestoredCounts,
    ShippedBlock, ShippedFile, ShippedMerge, ShippedObject, SnapshotReader,
};
pub use volume::VolumeId;

#[cfg(test)]
mod tests;
