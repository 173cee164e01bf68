//! blockcache: an async block cache in front of object storage.
//!
//! Blocks, addressed by `(inode, blockno)`, are cached as files in a local directory,
//! deduplicated by SHA-256, uploaded in the background to an object store
//! ([`blockcache_backend`]), read back on a miss and evicted least-recently-used when the
//! cache is full. Metadata lives in SQLite ([`blockcache_db`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use blockcache::{BlockCache, Config};
//! let db = blockcache_db::Db::open("/tmp/bc/meta.db").await?;
//! let backend = blockcache_backend::Backend::from_url("file:///tmp/bc/store")?;
//! let cache = BlockCache::open(Config::new("/tmp/bc/cache"), db, backend).await?;
//! cache.write(1, 0, 0, b"hello").await?;
//! cache.flush().await?; // now in the object store
//! assert_eq!(&cache.read(1, 0, 0, 5).await?[..], b"hello");
//! cache.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! See `ARCHITECTURE.md` for the flows, the invariants and the lock order.

mod budget;
mod engine;
mod error;
mod files;
mod keylock;
mod namespace;
mod recovery;
mod state;
mod tasks;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use blockcache_backend::Backend;
use blockcache_db::Db;
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine::BlockHandle;
pub use error::{Error, Result, UploadFailure};
pub use namespace::{
    Durability, FileMeta, FileReader, FileStatus, FileWriter, MAX_NAME_LEN, Namespace,
    validate_name,
};
pub use recovery::Recovery;

use crate::budget::Budget;
use crate::engine::{Counters, Inner, LockMode};
use crate::files::CacheDir;
use crate::keylock::KeyedLocks;
use crate::state::State;

/// Above this many dirty files, `sync` uses one `syncfs` instead of an fsync per file (each
/// fsync commits the file system's journal; at 1 MiB blocks, alternating runs of the bench
/// measured write+sync 1.08-1.12x copy+fsync with 8 against 0.93-0.98x with 64).
const SYNCFS_THRESHOLD: usize = 8;

/// The address of a block: an inode and a block number within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey {
    /// Inode (file) number.
    pub inode: u64,
    /// Block number within the inode.
    pub blockno: u64,
}

impl BlockKey {
    /// A key.
    pub fn new(inode: u64, blockno: u64) -> Self {
        Self { inode, blockno }
    }
}

/// Settings of a cache.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the cache files.
    pub cache_dir: PathBuf,
    /// Largest block, in bytes; fixed when the volume is created.
    pub block_size: u64,
    /// Most bytes cached (apparent sizes).
    pub max_bytes: u64,
    /// Most blocks cached.
    pub max_entries: u64,
    /// Most dirty bytes; writers wait above it.
    pub max_dirty_bytes: u64,
    /// Concurrent uploads.
    pub upload_tasks: usize,
    /// Blocks are committed in the background once unmodified for this long; `None` leaves
    /// uploads to `commit`, `flush`, eviction and dirty-budget pressure.
    pub commit_delay: Option<Duration>,
    /// How long shutdown waits for background tasks after flushing.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Defaults: 1 MiB blocks, 1 GiB cache, 65,536 entries, 256 MiB dirty, 8 upload tasks,
    /// a 10 s commit delay.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            block_size: 1 << 20,
            max_bytes: 1 << 30,
            max_entries: 65_536,
            max_dirty_bytes: 256 << 20,
            upload_tasks: 8,
            commit_delay: Some(Duration::from_secs(10)),
            shutdown_grace: Duration::from_secs(30),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.block_size == 0 || self.block_size > 1 << 30 {
            return bad(format!(
                "block_size {} must be between 1 byte and 1 GiB",
                self.block_size
            ));
        }
        self.limits().validate(self.block_size)?;
        if self.upload_tasks == 0 || self.upload_tasks > 1024 {
            return bad(format!(
                "upload_tasks {} must be between 1 and 1024",
                self.upload_tasks
            ));
        }
        Ok(())
    }

    /// The limits part of these settings.
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
            max_dirty_bytes: self.max_dirty_bytes,
        }
    }
}

/// Limits that can change while the cache runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes cached.
    pub max_bytes: u64,
    /// Most blocks cached.
    pub max_entries: u64,
    /// Most dirty bytes.
    pub max_dirty_bytes: u64,
}

impl Limits {
    fn validate(&self, block_size: u64) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.max_bytes < block_size {
            return bad(format!(
                "max_bytes {} must be at least the block size {block_size}",
                self.max_bytes
            ));
        }
        if self.max_dirty_bytes < block_size {
            return bad(format!(
                "max_dirty_bytes {} must be at least the block size {block_size}",
                self.max_dirty_bytes
            ));
        }
        Ok(())
    }
}

/// A snapshot of the cache's usage and counters. Computing it is O(1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Cached blocks.
    pub entries: u64,
    /// Cached bytes.
    pub bytes: u64,
    /// Dirty blocks.
    pub dirty_entries: u64,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Uploads handed to the upload tasks and not yet recorded.
    pub uploads_in_flight: u64,
    /// Store objects waiting to be deleted.
    pub pending_removals: u64,
    /// How long the oldest dirty block has been dirty.
    pub oldest_dirty_age: Option<Duration>,
    /// Bytes confirmed in the store.
    pub stored_bytes: u64,
    /// Sum of the lengths of distinct objects.
    pub unique_bytes: u64,
    /// Sum of the lengths of all mapped blocks.
    pub logical_bytes: u64,
    /// Bytes saved by deduplication (`logical_bytes - unique_bytes`).
    pub dedup_savings: u64,
    /// Current limits.
    pub limits: Option<Limits>,
    /// Reads and writes served from a cached block.
    pub hits: u64,
    /// Accesses that downloaded a block.
    pub misses: u64,
    /// Uploads recorded.
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Uploads that failed after retries.
    pub upload_errors: u64,
    /// Downloads.
    pub downloads: u64,
    /// Bytes downloaded.
    pub download_bytes: u64,
    /// Downloads that failed or returned corrupted data.
    pub download_errors: u64,
    /// Commits that deduplicated against an existing object.
    pub dedup_hits: u64,
    /// Store objects deleted.
    pub deletes: u64,
    /// Bulk deletions that failed (and were retried).
    pub delete_errors: u64,
}

/// An open block cache. Dropping it without [`BlockCache::shutdown`] stops its tasks and
/// logs an error; dirty data stays in the cache directory and the next open uploads it.
#[derive(Debug)]
pub struct BlockCache {
    inner: Arc<Inner>,
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
        db.check_block_size(config.block_size).await?;
        let cancel = CancellationToken::new();
        let backend = backend.with_cancel(cancel.child_token());
        let (upload_tx, upload_rx) = mpsc::channel(config.upload_tasks);
        let (removal_tx, removal_rx) = mpsc::channel(4 * 1024);
        let (confirm_tx, confirm_rx) = mpsc::channel(4 * 1024);
        let inner = Arc::new(Inner {
            dir,
            db,
            backend: backend.clone(),
            locks: Arc::new(KeyedLocks::default()),
            state: Mutex::new(State::new(config.max_bytes, config.max_entries)),
            dirty_budget: Budget::new(config.max_dirty_bytes),
            pressure: Notify::new(),
            progress: Notify::new(),
            commit_lock: tokio::sync::Mutex::new(()),
            uploads: Mutex::new(Default::default()),
            upload_tx,
            confirm_tx,
            removal_tx,
            unmark_queue: Default::default(),
            unmark_wake: Notify::new(),
            unmark_pending: Default::default(),
            unmark_done: Notify::new(),
            uploads_in_flight: Default::default(),
            pending_removals: Default::default(),
            counters: Counters::default(),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            _dir_lock: dir_lock,
            config,
        });
        let found = recovery::load(&inner).await?;
        let jobs = Arc::new(tokio::sync::Mutex::new(upload_rx));
        for _ in 0..inner.config.upload_tasks {
            inner.tracker.spawn(tasks::upload_worker(
                jobs.clone(),
                backend.clone(),
                cancel.child_token(),
            ));
        }
        inner
            .tracker
            .spawn(tasks::removal_task(inner.clone(), removal_rx));
        inner
            .tracker
            .spawn(tasks::confirm_task(inner.clone(), confirm_rx));
        inner
            .tracker
            .spawn(tasks::unmark_task(inner.clone(), cancel.child_token()));
        let intake = cancel.child_token();
        inner
            .tracker
            .spawn(tasks::commit_task(inner.clone(), intake.clone()));
        let recovery = recovery::reconcile(&inner, found).await?;
        Ok(Self {
            inner,
            intake,
            recovery,
            shut_down: false,
        })
    }

    /// What opening found and did about an earlier crash.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The settings the cache was opened with (limits as at open).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Exclusive read-write access to block `(inode, blockno)`. Waits for the dirty budget
    /// (one block's worth) before taking the block's lock.
    pub async fn block(&self, inode: u64, blockno: u64) -> Result<BlockHandle> {
        self.inner.handle(BlockKey::new(inode, blockno), true).await
    }

    /// Exclusive read-only access to block `(inode, blockno)`. Never waits for uploads.
    pub async fn block_for_read(&self, inode: u64, blockno: u64) -> Result<BlockHandle> {
        self.inner
            .handle(BlockKey::new(inode, blockno), false)
            .await
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
        let keys: Vec<BlockKey> = self
            .inner
            .lock_state()
            .dirty
            .iter()
            .map(|(_, k)| *k)
            .collect();
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
    /// by the removal task. Does not wait for uploads of these blocks.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn remove(&self, inode: u64, range: Range<u64>) -> Result<()> {
        self.inner.remove_range(inode, range).await
    }

    /// Evicts until the cache is within its limits, uploading dirty blocks first.
    pub async fn evict(&self) -> Result<()> {
        self.inner.make_room(0, 0).await
    }

    /// Changes the limits, then evicts down to them.
    pub async fn set_limits(&self, limits: Limits) -> Result<()> {
        limits.validate(self.inner.config.block_size)?;
        {
            let mut st = self.inner.lock_state();
            st.max_bytes = limits.max_bytes;
            st.max_entries = limits.max_entries;
        }
        self.inner.dirty_budget.set_limit(limits.max_dirty_bytes);
        self.evict().await
    }

    /// Uploads every dirty block, then drops every cached file.
    pub async fn clear(&self) -> Result<()> {
        self.flush().await?;
        let keys: Vec<BlockKey> = self.inner.lock_state().entries.keys().copied().collect();
        for key in keys {
            let _guard = self.inner.locks.lock(key).await;
            let removed = {
                let mut st = self.inner.lock_state();
                match st.entries.get(&key) {
                    Some(e) if !e.is_dirty() && e.inflight.is_none() => st.remove(key),
                    _ => None,
                }
            };
            if let Some(e) = removed {
                self.inner.dir.remove(key, e.marker).map_err(Error::io(
                    "delete cache file",
                    self.inner.dir.file(key, e.marker),
                ))?;
            }
        }
        self.inner.progress.notify_waiters();
        Ok(())
    }

    /// Usage and counters (O(1)).
    pub async fn usage(&self) -> Result<Usage> {
        let inner = &self.inner;
        let totals = inner.db.totals().await?;
        let (entries, bytes, dirty_entries, dirty_bytes, oldest, limits) = {
            let st = inner.lock_state();
            (
                st.entries.len() as u64,
                st.bytes,
                st.dirty_entries(),
                st.dirty_bytes,
                st.dirty
                    .first()
                    .map(|(since, _)| Instant::now().duration_since(*since)),
                (st.max_bytes, st.max_entries),
            )
        };
        let c = &inner.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Usage {
            entries,
            bytes,
            dirty_entries,
            dirty_bytes,
            uploads_in_flight: inner.uploads_in_flight.load(Ordering::SeqCst),
            pending_removals: inner.pending_removals.load(Ordering::SeqCst),
            oldest_dirty_age: oldest,
            stored_bytes: totals.stored_bytes,
            unique_bytes: totals.unique_bytes,
            logical_bytes: totals.logical_bytes,
            dedup_savings: totals.logical_bytes.saturating_sub(totals.unique_bytes),
            limits: Some(Limits {
                max_bytes: limits.0,
                max_entries: limits.1,
                max_dirty_bytes: inner.dirty_budget.limit(),
            }),
            hits: get(&c.hits),
            misses: get(&c.misses),
            uploads: get(&c.uploads),
            upload_bytes: get(&c.upload_bytes),
            upload_errors: get(&c.upload_errors),
            downloads: get(&c.downloads),
            download_bytes: get(&c.download_bytes),
            download_errors: get(&c.download_errors),
            dedup_hits: get(&c.dedup_hits),
            deletes: get(&c.deletes),
            delete_errors: get(&c.delete_errors),
        })
    }

    /// Waits until the removal task has deleted every pending object (or `timeout` passes);
    /// returns whether the queue is empty.
    pub async fn wait_for_removals(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progress = self.inner.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.inner.pending_removals.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return self.inner.pending_removals.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Flushes, finishes pending deletions, stops every task and waits for them, and closes
    /// the database. Returns the flush error if dirty data could not be uploaded; that data
    /// stays in the cache directory for the next open.
    pub async fn shutdown(mut self) -> Result<()> {
        self.intake.cancel();
        let flushed = self.flush().await;
        let grace = self.inner.config.shutdown_grace;
        if !self.wait_for_removals(grace).await {
            tracing::warn!(
                pending = self.inner.pending_removals.load(Ordering::SeqCst),
                "store deletions still pending at shutdown; the next open finishes them"
            );
        }
        self.stop_tasks().await;
        self.drop_clean_markers();
        self.inner.db.close().await;
        self.shut_down = true;
        flushed
    }

    async fn stop_tasks(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(self.inner.config.shutdown_grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.inner.tracker.len(),
                "tasks still running after the grace period"
            );
        }
    }

    /// Renames clean files that still carry the dirty marker back to their clean names, so
    /// the next open does not re-hash them.
    fn drop_clean_markers(&self) {
        let marked: Vec<BlockKey> = {
            let st = self.inner.lock_state();
            st.entries
                .iter()
                .filter(|(_, e)| e.marker && !e.is_dirty())
                .map(|(k, _)| *k)
                .collect()
        };
        for key in marked {
            let id = self.inner.lock_state().entries.get(&key).map(|e| e.id);
            if let Some(id) = id {
                self.inner.unmark(key, id);
            }
        }
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        if self.shut_down {
            return;
        }
        self.inner.cancel.cancel();
        let dirty = self.inner.lock_state().dirty_entries();
        tracing::error!(
            dirty_blocks = dirty,
            "block cache dropped without shutdown; dirty blocks stay in the cache directory and the next open uploads them"
        );
    }
}

impl Inner {
    /// A handle on block `key`; for writing, after waiting for one block's worth of the
    /// dirty budget.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        key: BlockKey,
        write: bool,
    ) -> Result<BlockHandle> {
        Inner::check_key(key)?;
        let credit = if write {
            if self.cancel.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            let credit = self.config.block_size;
            self.dirty_budget.acquire(credit, &self.pressure).await;
            Some(credit)
        } else {
            None
        };
        let guard = self.locks.lock(key).await;
        Ok(BlockHandle {
            inner: self.clone(),
            key,
            _guard: guard,
            credit,
            file: None,
        })
    }

    /// Makes dirty blocks (all, or those of one inode) durable in the cache directory.
    ///
    /// While the disk writes, the blocks are hashed ahead of their commit
    /// ([`Inner::prehash`]): the CPU is idle then, and the commit that usually follows a sync
    /// need not read and hash them again. The hashing stops when the sync is done.
    pub(crate) async fn sync_dirty(self: &Arc<Self>, inode: Option<u64>) -> Result<()> {
        let keys: Vec<BlockKey> = {
            let st = self.lock_state();
            match inode {
                // One inode's entries, not every dirty block of the cache.
                Some(i) => st
                    .entries
                    .range(BlockKey::new(i, 0)..=BlockKey::new(i, u64::MAX))
                    .filter(|(_, e)| e.is_dirty())
                    .map(|(k, _)| *k)
                    .collect(),
                None => st.dirty.iter().map(|(_, k)| *k).collect(),
            }
        };
        let paths: Vec<PathBuf> = keys.iter().map(|k| self.dir.file(*k, true)).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let synced = async {
            let synced = self.sync_files(paths).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            synced
        };
        let (synced, ()) = tokio::join!(synced, self.prehash(keys, stop.clone()));
        synced
    }

    /// fsyncs the cache files `paths` and the directory, or the whole file system (one
    /// `syncfs`) for more than [`SYNCFS_THRESHOLD`] of them.
    async fn sync_files(&self, paths: Vec<PathBuf>) -> Result<()> {
        let dir = self.dir.clone();
        if paths.len() > SYNCFS_THRESHOLD {
            // Many small files: one syncfs of the cache's file system costs less than an
            // fsync each (it also writes other dirty data of that file system).
            let d = dir.clone();
            return tokio::task::spawn_blocking(move || d.sync_filesystem())
                .await
                .expect("sync task panicked")
                .map_err(Error::io("sync the file system of", dir.path()));
        }
        // One blocking task per file (at most SYNCFS_THRESHOLD), and the directory at the same
        // time: the disk gets every write at once, as from one syncfs, instead of one file's
        // after another. Both must finish before the sync counts.
        let mut tasks: Vec<_> = paths
            .into_iter()
            .map(|p| {
                tokio::task::spawn_blocking(move || {
                    crate::files::sync_file(&p).map_err(Error::io("sync cache file", p.clone()))
                })
            })
            .collect();
        let d = dir.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            d.sync_dir()
                .map_err(Error::io("sync cache directory", d.path()))
        }));
        let mut result = Ok(());
        for t in tasks {
            let synced = t.await.expect("sync task panicked");
            if result.is_ok() {
                result = synced;
            }
        }
        result
    }

    /// Removes blocks `range` of `inode` (see [`BlockCache::remove`]).
    pub(crate) async fn remove_range(&self, inode: u64, range: Range<u64>) -> Result<()> {
        Inner::check_key(BlockKey::new(inode, 0))?;
        let inner = self;
        let mut keys: Vec<BlockKey> = {
            let st = inner.lock_state();
            st.entries
                .range(BlockKey::new(inode, range.start)..BlockKey::new(inode, range.end))
                .map(|(k, _)| *k)
                .collect()
        };
        keys.extend(
            inner
                .db
                .mapped_blocks(inode, range)
                .await?
                .into_iter()
                .map(|b| BlockKey::new(inode, b)),
        );
        keys.sort_unstable();
        keys.dedup();
        for chunk in keys.chunks(1024) {
            // First pass: blocks nobody holds; second pass: wait for the rest, in key order.
            let mut guards = Vec::with_capacity(chunk.len());
            let mut busy = Vec::new();
            for &key in chunk {
                match inner.locks.try_lock(key) {
                    Some(g) => guards.push((key, g)),
                    None => busy.push(key),
                }
            }
            for key in busy {
                guards.push((key, inner.locks.lock(key).await));
            }
            let mut freed = 0;
            let mut files = Vec::new();
            for (key, _) in &guards {
                let removed = inner.lock_state().remove(*key);
                if let Some(e) = removed {
                    freed += e.dirty_acc;
                    files.push((*key, e.marker));
                }
            }
            inner.dirty_budget.release(freed);
            // Unlink the files on the blocking pool, while the block locks are still held.
            let dir = inner.dir.clone();
            tokio::task::spawn_blocking(move || {
                for (key, marker) in files {
                    dir.remove(key, marker)
                        .map_err(Error::io("delete cache file", dir.file(key, marker)))?;
                }
                Ok::<_, Error>(())
            })
            .await
            .expect("unlink task panicked")?;
            let pairs: Vec<(u64, u64)> = guards.iter().map(|(k, _)| (k.inode, k.blockno)).collect();
            let released = {
                let _commit = inner.commit_lock.lock().await;
                inner.db.remove_blocks(&pairs).await?
            };
            drop(guards);
            inner.queue_removals(released).await;
            inner.progress.notify_waiters();
        }
        Ok(())
    }
}

impl BlockCache {
    /// Checks the in-memory accounting against a recount and the metadata invariants.
    /// For tests; O(n).
    #[doc(hidden)]
    pub async fn check_invariants(&self) -> std::result::Result<(), String> {
        {
            let st = self.inner.lock_state();
            let bytes: u64 = st.entries.values().map(|e| e.size).sum();
            let dirty_bytes: u64 = st.entries.values().map(|e| e.dirty_acc).sum();
            let dirty = st.entries.values().filter(|e| e.is_dirty()).count();
            if bytes != st.bytes
                || dirty_bytes != st.dirty_bytes
                || dirty != st.dirty.len()
                || st.lru.len() != st.entries.len()
            {
                return Err(format!(
                    "accounting drifted: bytes {} vs {bytes}, dirty bytes {} vs {dirty_bytes}, dirty {} vs {dirty}, lru {} vs {}",
                    st.bytes,
                    st.dirty_bytes,
                    st.dirty.len(),
                    st.lru.len(),
                    st.entries.len()
                ));
            }
            if st.reserved_bytes != 0 || st.reserved_slots != 0 {
                return Err(format!(
                    "reservations left: {} bytes, {} slots",
                    st.reserved_bytes, st.reserved_slots
                ));
            }
            for (k, e) in &st.entries {
                if e.is_dirty() && !e.marker {
                    return Err(format!("dirty block {k:?} has no dirty marker"));
                }
            }
        }
        self.inner
            .db
            .check_consistency()
            .await
            .map_err(|e| e.to_string())
    }
}
