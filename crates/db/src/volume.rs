//! The volume as a whole: the lock that makes one process its only user, its identity, and
//! the health of the writer connection.
//!
//! The lock is an exclusive `flock` on `<database file>.lock`, taken by [`Db::open`] before
//! anything is read and held as long as the [`Db`] lives; the operating system drops it when
//! the process dies. It covers the metadata and, through the engine that owns the `Db`, the
//! cache directory too, whatever directories are configured: two engines on one database
//! would each take the other's dirty blocks for its own. The lock file holds a line naming
//! the holder (pid, host, since when) for the message a refused opener prints.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sqlx::Connection;

use crate::{Db, Error, Result, ctx};

/// The lock file of the database at `db_file`.
pub(crate) fn lock_path(db_file: &Path) -> PathBuf {
    let mut name = db_file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the volume lock of the database at `db_file`, or says who holds it.
pub(crate) fn lock(db_file: &Path) -> Result<File> {
    let path = lock_path(db_file);
    let io = |source| Error::LockFile {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The holder's line is a courtesy: an unreadable one still refuses.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::VolumeLocked {
                lock: path.clone(),
                holder: if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "an unknown host".to_owned());
    let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let line = format!("pid {} on {host} since {since}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(line.as_bytes()))
        .map_err(io)?;
    Ok(file)
}

/// The identity of a volume, kept in its `volume` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeId {
    /// 32 hexadecimal digits, random, chosen when the volume first needed one.
    pub id: String,
    /// Whether this call chose it (the volume had none: it is new, or older than identities).
    pub created: bool,
}

impl Db {
    /// The volume's identity, chosen (and recorded) on first use. The cache directory keeps
    /// a copy, so that a cache directory is never used with another volume's metadata.
    pub async fn volume_id(&self) -> Result<VolumeId> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT value FROM volume WHERE key = 'id'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(ctx("read the volume id"))?;
        if let Some(id) = stored {
            return Ok(VolumeId { id, created: false });
        }
        let id: String = sqlx::query_scalar(
            "INSERT INTO volume (key, value) VALUES ('id', lower(hex(randomblob(16)))) RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(ctx("record the volume id"))?;
        tx.commit().await.map_err(ctx("commit the volume id"))?;
        Ok(VolumeId { id, created: true })
    }

    /// Whether the writer can write: repairs the writer connection if an earlier failure
    /// left it inside a transaction, then makes one synchronized write.
    pub async fn probe_write(&self) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE sync_point SET n = n + 1 WHERE id = 0")
            .execute(&mut *w)
            .await
            .map_err(ctx("write to the database"))?;
        self.synced();
        Ok(())
    }

    /// Replaces the writer connection if it is left inside a transaction. sqlx counts the
    /// transactions it opened; when SQLite rolls one back on its own (`SQLITE_FULL` at
    /// `COMMIT`), sqlx's `ROLLBACK` fails and its count stays up, so its next `begin` opens a
    /// savepoint and a rollback to it leaves a transaction open for good (every later
    /// `PRAGMA synchronous` then fails). A fresh connection starts clean; the old one rolls
    /// back whatever it held when it closes.
    pub(crate) async fn repair_writer(&self, w: &mut sqlx::SqliteConnection) -> Result<()> {
        if !w.is_in_transaction() {
            return Ok(());
        }
        // A dropped transaction queues its rollback; one round trip lets it run first.
        let _ = w.ping().await;
        if !w.is_in_transaction() {
            return Ok(());
        }
        tracing::warn!(
            "the database writer connection was left inside a transaction by an earlier failure; opening a new one"
        );
        let fresh = sqlx::SqliteConnection::connect_with(&self.writer_options)
            .await
            .map_err(ctx("reopen the database writer connection"))?;
        let old = std::mem::replace(w, fresh);
        if let Err(error) = old.close().await {
            tracing::warn!(%error, "closing the old database writer connection failed");
        }
        Ok(())
    }
}

/// Where the namespace's inodes start, and how a volume from before it was recorded is read.
impl Db {
    /// The first inode the file namespace may allocate, once a namespace was opened on the
    /// volume: the namespace owns every inode from there on, and raw block access keeps
    /// below it. `None`: no namespace ever ran, every inode is the raw users'. A volume whose
    /// namespace ran before this was recorded allocated from 1.
    pub async fn namespace_floor(&self) -> Result<Option<u64>> {
        let (recorded, used): (Option<String>, bool) = sqlx::query_as(
            "SELECT (SELECT value FROM volume WHERE key = 'namespace_floor'), \
                    EXISTS (SELECT 1 FROM inodes) \
                    OR EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'inodes')",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("read where the namespace's inodes start"))?;
        match recorded {
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Error::Invalid(format!("namespace floor {v:?}"))),
            None => Ok(used.then_some(1)),
        }
    }

    /// Makes the namespace's inodes start above every inode in use: records the floor, at
    /// least `at_least` and above every inode with a mapping, and moves the inode allocator
    /// there, in one transaction. Returns the floor (the recorded one if there is one).
    pub async fn claim_namespace_inodes(&self, at_least: u64) -> Result<u64> {
        if let Some(floor) = self.namespace_floor().await? {
            return Ok(floor);
        }
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let mapped: i64 = sqlx::query_scalar("SELECT coalesce(max(inode), 0) FROM blocks")
            .fetch_one(&mut *tx)
            .await
            .map_err(ctx("find the largest inode in use"))?;
        let floor = at_least.max(crate::to_u64(mapped, "inode")? + 1).max(1);
        let floor_i64 = crate::to_i64(floor)?;
        sqlx::query("INSERT INTO volume (key, value) VALUES ('namespace_floor', ?)")
            .bind(floor.to_string())
            .execute(&mut *tx)
            .await
            .map_err(ctx("record where the namespace's inodes start"))?;
        move_allocator(&mut tx, "inodes", floor_i64).await?;
        tx.commit()
            .await
            .map_err(ctx("commit where the namespace's inodes start"))?;
        Ok(floor)
    }
}

/// How the volume's metadata relates to its store.
impl Db {
    /// The id of the volume whose store record this database was checked against (and so
    /// belongs to), `None` if it never was: a new database, or one older than store records.
    pub async fn store_binding(&self) -> Result<Option<String>> {
        self.volume_value("store_volume").await
    }

    /// Records that the store holds the record of volume `id`, this database's volume: from
    /// now on a store without that record is refused, never recreated.
    pub async fn bind_store(&self, id: &str) -> Result<()> {
        self.set_volume_value("store_volume", id).await
    }

    /// The value of `key` in the `volume` table.
    async fn volume_value(&self, key: &'static str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM volume WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.readers)
            .await
            .map_err(ctx("read the volume's settings"))
    }

    /// Sets `key` to `value` in the `volume` table (a synchronized commit).
    async fn set_volume_value(&self, key: &'static str, value: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("INSERT OR REPLACE INTO volume (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&mut *w)
            .await
            .map_err(ctx("record the volume's settings"))?;
        self.synced();
        Ok(())
    }

    /// Whether the volume has never held anything: no object was ever registered, and no
    /// file or block exists.
    pub async fn is_fresh(&self) -> Result<bool> {
        let used: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM objects) \
                 OR EXISTS (SELECT 1 FROM pending_deletions) \
                 OR EXISTS (SELECT 1 FROM blocks) \
                 OR EXISTS (SELECT 1 FROM files) \
                 OR EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'objects' AND seq > 0)",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("find whether the volume was ever used"))?;
        Ok(!used)
    }

    /// The id the next new object would get at the earliest: above every object id ever
    /// allocated.
    pub async fn next_object_id(&self) -> Result<u64> {
        let current: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'objects'), 0), \
                        coalesce((SELECT max(id) FROM objects), 0))",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("read the object id allocator"))?;
        Ok(crate::to_u64(current, "object id")? + 1)
    }

    /// Makes new object ids at least `floor` (object ids carry the writer lease's epoch, so
    /// two writers of one volume never name the same store key). Ids already above it stay.
    pub async fn claim_object_ids(&self, floor: u64) -> Result<()> {
        let floor = crate::to_i64(floor)?;
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let current: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'objects'), 0), \
                        coalesce((SELECT max(id) FROM objects), 0))",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(ctx("read the object id allocator"))?;
        if current < floor - 1 {
            move_allocator(&mut tx, "objects", floor).await?;
        }
        tx.commit()
            .await
            .map_err(ctx("commit the object id allocator"))?;
        self.synced();
        Ok(())
    }
}

/// Makes the AUTOINCREMENT allocator of `table` hand out `next` next (it allocates above the
/// largest of `sqlite_sequence` and the table's ids).
pub(crate) async fn move_allocator(
    tx: &mut sqlx::SqliteConnection,
    table: &'static str,
    next: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM sqlite_sequence WHERE name = ?")
        .bind(table)
        .execute(&mut *tx)
        .await
        .map_err(ctx("move an id allocator"))?;
    sqlx::query("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)")
        .bind(table)
        .bind(next - 1)
        .execute(&mut *tx)
        .await
        .map_err(ctx("move an id allocator"))?;
    Ok(())
}

/// What the database remembers of the writer lease and of its objects in the store.
impl Db {
    /// The lease epoch this database last held, `None` if it never held one.
    pub async fn lease_epoch(&self) -> Result<Option<u64>> {
        let v = self.volume_value("lease_epoch").await?;
        v.map(|v| {
            v.parse()
                .map_err(|_| Error::Invalid(format!("lease epoch {v:?}")))
        })
        .transpose()
    }

    /// Records that this database now holds the lease at `epoch`.
    pub async fn record_lease_epoch(&self, epoch: u64) -> Result<()> {
        self.set_volume_value("lease_epoch", &epoch.to_string())
            .await
    }

    /// How many objects the metadata says are in the store.
    pub async fn uploaded_objects(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM objects WHERE state = 'uploaded'")
            .fetch_one(&self.readers)
            .await
            .map_err(ctx("count the uploaded objects"))?;
        crate::to_u64(n, "object count")
    }
}
