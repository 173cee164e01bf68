//! [`BlockCache`], the public face of one open cache: opening, the block API, commit, flush,
//! sync, removal, limits, usage and shutdown. Each call is a thin step into the engine.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use blockcache_backend::Backend;
use blockcache_db::Db;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::cache_dir::{CacheDir, Marker};
use crate::engine::{Access, BlockHandle, Inner, LockMode, Recovery};
use crate::{BlockKey, Config, Error, Limits, Result, Usage};

/// An open block cache. Dropping it without [`BlockCache::shutdown`] stops its tasks and
/// logs an error; dirty data stays in the cache directory and the next open uploads it.
#[derive(Debug)]
pub struct BlockCache {
    inner: Arc<Inner>,
    /// Stops the commit task (shutdown stops background commits before it flushes).
    intake: CancellationToken,
    recovery: Recovery,
    shut_down: bool,
}

impl BlockCache {
    /// Opens the cache: checks the settings and the cache directory, reconciles the cache
    /// files with the metadata after a crash, and starts the background tasks.
    pub async fn open(config: Config, db: Db, backend: Backend) -> Result<Self> {
        config.validate()?;
        let dir = CacheDir::new(config.cache_dir.clone());
        let d = dir.clone();
        tokio::task::spawn_blocking(move || d.prepare())
            .await
            .expect("prepare task panicked")
            .map_err(Error::io("create files in cache directory", dir.path()))?;
        let d = dir.clone();
        let dir_lock = tokio::task::spawn_blocking(move || d.lock())
            .await
            .expect("lock task panicked")
            .map_err(Error::io("lock cache directory", dir.path()))?
            .ok_or_else(|| Error::InUse {
                path: dir.path().to_owned(),
            })?;
        let volume = claim(&dir, &db).await?;
        let backend = crate::volume::attach(&config, &db, &volume, backend).await?;
        let (inner, queues) = Inner::open(config, dir, dir_lock, db, backend).await?;
        inner.load_namespace_floor().await?;
        let found = inner.load().await?;
        let intake = inner.cancel_token().child_token();
        crate::tasks::start(&inner, queues, intake.clone());
        let recovery = inner.reconcile(found).await?;
        inner.open_shipping().await;
        Ok(Self {
            inner,
            intake,
            recovery,
            shut_down: false,
        })
    }

    pub(crate) fn engine(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// What opening found and did about an earlier crash.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The settings the cache was opened with (limits as at open).
    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// Exclusive read-write access to block `(inode, blockno)`. Waits for the dirty budget
    /// (one block's worth) before taking the block's lock.
    ///
    /// Refused ([`Error::NamespaceInode`]) for an inode that the volume's file namespace
    /// owns: once a [`crate::Namespace`] was opened on the volume, raw users keep to the
    /// inodes below its first one.
    pub async fn block(&self, inode: u64, blockno: u64) -> Result<BlockHandle> {
        let handle = self
            .inner
            .handle(BlockKey::new(inode, blockno), Access::Write)
            .await?;
        self.inner.check_raw(inode)?;
        Ok(handle)
    }

    /// Exclusive read-only access to block `(inode, blockno)`. Never waits for uploads.
    /// Refused for an inode the namespace owns, like [`BlockCache::block`].
    pub async fn block_for_read(&self, inode: u64, blockno: u64) -> Result<BlockHandle> {
        let handle = self
            .inner
            .handle(BlockKey::new(inode, blockno), Access::Read)
            .await?;
        self.inner.check_raw(inode)?;
        Ok(handle)
    }

    /// Reads up to `len` bytes at `offset` of a block (fewer at its end; none for a hole).
    pub async fn read(&self, inode: u64, blockno: u64, offset: u64, len: usize) -> Result<Bytes> {
        self.block_for_read(inode, blockno)
            .await?
            .read(offset, len)
            .await
    }

    /// Writes `data` at `offset` of a block.
    pub async fn write(&self, inode: u64, blockno: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.block(inode, blockno).await?.write(offset, data).await
    }

    /// Hashes every dirty block, links it to an existing object or registers a new one, and
    /// hands new objects to the upload tasks. Returns once every block is handed off (uploads
    /// may still run).
    pub async fn commit(&self) -> Result<()> {
        let keys = self.inner.dirty_keys(None);
        self.inner.commit_keys(keys, LockMode::Wait).await.map(drop)
    }

    /// Commits and waits: when this returns `Ok`, every byte written before the call is in
    /// the object store and the metadata says so. Returns the upload error if one persists.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush(None).await
    }

    /// [`BlockCache::flush`] restricted to the blocks of one inode.
    pub async fn flush_inode(&self, inode: u64) -> Result<()> {
        self.inner.flush(Some(inode)).await
    }

    /// Makes every dirty block durable in the cache directory (fsync of each dirty file and
    /// of the directory). After a crash, the next open finds and uploads them.
    pub async fn sync(&self) -> Result<()> {
        self.inner.sync_dirty(None).await
    }

    /// [`BlockCache::sync`] restricted to the blocks of one inode.
    pub async fn sync_inode(&self, inode: u64) -> Result<()> {
        self.inner.sync_dirty(Some(inode)).await
    }

    /// Removes blocks `range` of `inode`: drops cached copies (dirty ones too) and mappings,
    /// and releases their objects; objects no longer referenced are deleted from the store
    /// by the removal task. Does not wait for uploads of these blocks. Refused for an inode
    /// the namespace owns, like [`BlockCache::block`].
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn remove(&self, inode: u64, range: Range<u64>) -> Result<()> {
        self.inner.check_raw(inode)?;
        self.inner.remove_range(inode, range).await
    }

    /// Evicts until the cache is within its limits, uploading dirty blocks first.
    pub async fn evict(&self) -> Result<()> {
        drop(self.inner.make_room(0, 0).await?);
        Ok(())
    }

    /// Changes the limits, then evicts down to them.
    pub async fn set_limits(&self, limits: Limits) -> Result<()> {
        self.inner.set_limits(limits)?;
        self.evict().await
    }

    /// Uploads every dirty block, then drops every cached file.
    pub async fn clear(&self) -> Result<()> {
        self.flush().await?;
        self.inner.drop_clean().await
    }

    /// Whether the cache can write now: one synchronized write to the database (which also
    /// repairs a writer connection an earlier failure left in a transaction) and a small file
    /// written, synced and deleted in the cache directory (after evicting clean blocks if its
    /// file system is full). For health checks.
    pub async fn check_health(&self) -> Result<()> {
        if let Some(lease) = self.inner.backend().lease()
            && lease.is_superseded()
            && let Err(e) = lease.check()
        {
            return Err(Error::Store {
                action: "write",
                source: Arc::new(e),
            });
        }
        self.inner.db().probe_write().await?;
        let probe = || {
            let dir = self.inner.cache_dir().clone();
            tokio::task::spawn_blocking(move || dir.probe_write())
        };
        let mut probed = probe().await.expect("probe task panicked");
        if crate::engine::is_full(&probed) && self.inner.free_space(0) {
            probed = probe().await.expect("probe task panicked");
        }
        probed.map_err(Error::io(
            "write in cache directory",
            self.inner.cache_dir().path(),
        ))
    }

    /// The volume's writer lease: its epoch, and why this process may not write to the
    /// store now, if it may not. `None` before the volume has a lease (never, once open).
    pub fn lease_state(&self) -> Option<(u64, Option<String>)> {
        let lease = self.inner.backend().lease()?;
        Some((lease.epoch(), lease.check().err().map(|e| e.to_string())))
    }

    /// Usage and counters (O(1)).
    pub async fn usage(&self) -> Result<Usage> {
        self.inner.usage().await
    }

    /// How shipping the metadata to the store stands: its generation, what waits, the lag.
    pub async fn metadata_status(&self) -> Result<crate::MetadataStatus> {
        self.inner.metadata_status().await
    }

    /// The metadata objects in the store that cannot be used (every complete generation is
    /// read and decoded), each with why.
    pub async fn check_metadata(&self) -> Result<Vec<String>> {
        let volume = self.inner.db().volume_id().await?.id;
        let (problems, _) =
            crate::restore::check_generations(self.inner.backend(), &volume).await?;
        Ok(problems.into_iter().map(|(_, p)| p).collect())
    }

    /// Ships the metadata changed since the last round to the store now (a flush also does,
    /// after uploading every dirty block).
    pub async fn ship_metadata(&self) -> Result<()> {
        self.inner.ship_metadata().await
    }

    /// Waits until the removal task has deleted every pending object (or `timeout` passes);
    /// returns whether the queue is empty.
    pub async fn wait_for_removals(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progress = self.inner.progress().notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.inner.pending_removals() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return self.inner.pending_removals() == 0;
            }
        }
    }

    /// Flushes, finishes pending deletions, stops every task and waits for them, and closes
    /// the database. Returns the flush error if dirty data could not be uploaded; that data
    /// stays in the cache directory for the next open.
    pub async fn shutdown(mut self) -> Result<()> {
        self.intake.cancel();
        let flushed = self.flush().await;
        let grace = self.inner.config().shutdown_grace;
        // With the store down, deletions cannot finish: they stay pending in the database
        // for the next start rather than hold the shutdown for the grace period.
        let store_up = self.inner.backend().is_up();
        if !(store_up && self.wait_for_removals(grace).await) && self.inner.pending_removals() > 0 {
            tracing::warn!(
                pending = self.inner.pending_removals(),
                "store deletions still pending at shutdown; the next open finishes them"
            );
        }
        if let Some(lease) = self.inner.backend().lease()
            && flushed.is_ok()
            && self.inner.pending_removals() == 0
        {
            lease.release(self.inner.backend()).await;
        }
        self.stop_tasks().await;
        // Clean files that still carry the dirty marker get their clean names back, so the
        // next open does not re-hash them.
        self.inner.unmark_all();
        self.inner.db().close().await;
        self.shut_down = true;
        flushed
    }

    async fn stop_tasks(&self) {
        self.inner.cancel_token().cancel();
        let tracker = self.inner.tracker();
        tracker.close();
        if tokio::time::timeout(self.inner.config().shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.len(),
                "tasks still running after the grace period"
            );
        }
    }

    /// Checks the in-memory accounting against a recount and the metadata invariants.
    /// For tests; O(n).
    #[doc(hidden)]
    pub async fn check_invariants(&self) -> std::result::Result<(), String> {
        self.inner.check_invariants(false).await
    }

    /// Waits until the work that dropped calls left running is done, then checks
    /// [`BlockCache::check_invariants`] and also that nothing is held: no block locked, no
    /// writer waiting, and the dirty budget holding exactly the dirty bytes. Only true while
    /// no call runs; for tests of cancellation.
    #[doc(hidden)]
    pub async fn check_quiescent(&self) -> std::result::Result<(), String> {
        self.inner.settled().await;
        self.inner.check_invariants(true).await
    }
}

/// Makes sure the cache directory belongs to the database's volume before any file in it is
/// trusted: it names its volume (`.volume`). A directory of another volume (another
/// database, or one that was wiped) is emptied if it holds only clean blocks (copies of that
/// volume's store objects, useless here) and refused if it holds dirty ones (the only copy
/// of that volume's data). A directory that names no volume is taken over when the volume is
/// older than volume ids (the database had no id and has objects) or the directory is empty.
async fn claim(dir: &CacheDir, db: &Db) -> Result<blockcache_db::VolumeId> {
    let volume = db.volume_id().await.map_err(|e| Error::Db(Arc::new(e)))?;
    let legacy = volume.created
        && db
            .totals()
            .await
            .map_err(|e| Error::Db(Arc::new(e)))?
            .objects
            > 0;
    let d = dir.clone();
    let id = volume.id.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let io = |action| Error::io(action, d.path());
        let owner = d.volume().map_err(io("read the volume of cache directory"))?;
        if owner.as_deref() == Some(id.as_str()) {
            return Ok(());
        }
        let (found, _) = d.scan().map_err(io("list cache directory"))?;
        let adopt = found.is_empty() || (owner.is_none() && legacy);
        if !adopt {
            let dirty = found.iter().filter(|f| f.marker == Marker::Dirty).count() as u64;
            let cache_volume = owner.map_or_else(
                || "no volume it names".to_owned(),
                |o| format!("volume {o}"),
            );
            if dirty > 0 {
                return Err(Error::ForeignCache {
                    path: d.path().to_owned(),
                    cache_volume,
                    volume: id,
                    dirty,
                });
            }
            tracing::warn!(
                path = %d.path().display(),
                files = found.len(),
                "cache directory belongs to {cache_volume}, not to this volume {id}; deleting its clean blocks"
            );
            d.purge().map_err(io("empty cache directory"))?;
        }
        d.set_volume(&id)
            .map_err(io("record the volume of cache directory"))
    })
    .await
    .expect("claim task panicked")?;
    Ok(volume)
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        if self.shut_down {
            return;
        }
        self.inner.cancel_token().cancel();
        let dirty = self.inner.dirty_entries();
        tracing::error!(
            dirty_blocks = dirty,
            "block cache dropped without shutdown; dirty blocks stay in the cache directory and the next open uploads them"
        );
    }
}
