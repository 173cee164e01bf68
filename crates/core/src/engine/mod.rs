//! The engine: the shared state of one open cache and everything that changes it.
//!
//! [`Inner`] is the engine's state; its fields are private to this module and its children,
//! and the rest of the crate (the [`crate::BlockCache`] facade, the background loops in
//! [`crate::tasks`], the [`crate::Namespace`]) goes through the `pub(crate)` methods below.
//! The children each hold one part of the work:
//!
//! - `state`: entries, LRU and dirty order, reservations and their accounting (one std mutex);
//! - `handle`: [`BlockHandle`], exclusive access to one block (read, write, truncate, sync);
//! - `miss`: loading a block on first access (check, create, download, link from the store);
//! - `evict`: making room, with [`Reservation`]s that give room back when dropped;
//! - `commit`: hashing dirty blocks and recording them in batches (dedup);
//! - `upload`: the upload registry, hand-off to the upload workers, confirmation batches;
//! - `settle`: marking commits done, clean names back (the unmark queue);
//! - `sync`: fsync of dirty blocks, hashing them meanwhile;
//! - `flush`: commit and wait until the store holds everything;
//! - `remove`: removing blocks and deleting released objects from the store;
//! - `ship`: shipping the metadata to the store;
//! - `recovery`: opening after a crash;
//! - `check`: what `check` needs of the engine (cache files against entries, cached copies).
//!
//! The lock order and the invariants are written once, in ARCHITECTURE.md (*Locks*,
//! *Invariants*).

mod check;
mod commit;
mod evict;
mod flush;
mod handle;
mod miss;
mod owner;
mod prefetch;
mod recovery;
mod remove;
mod settle;
mod ship;
mod state;
mod sync;
mod upload;

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockcache_backend::Backend;
use blockcache_db::Db;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::cache_dir::CacheDir;
use crate::keylock::KeyedLocks;
use crate::{BlockKey, Config, Error, Limits, Result, Usage};

pub(crate) use commit::LockMode;
pub(crate) use evict::is_full;
pub use handle::BlockHandle;
pub use recovery::Recovery;
pub(crate) use remove::Removal;
pub use ship::MetadataStatus;
pub(crate) use state::InodeBlocks;
pub(crate) use upload::{UploadJob, UploadOutcome, UploadSource, outcome_label, syncs_each_object};

use settle::Unmarks;
use state::State;
use upload::ObjUpload;

/// Counters since start-up, for statistics and metrics.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    uploads: AtomicU64,
    upload_bytes: AtomicU64,
    upload_errors: AtomicU64,
    downloads: AtomicU64,
    download_bytes: AtomicU64,
    download_dedup_hits: AtomicU64,
    prefetches: AtomicU64,
    download_errors: AtomicU64,
    /// Clean cache files that no longer matched their object and were discarded.
    corrupt_cache_files: AtomicU64,
    dedup_hits: AtomicU64,
    deletes: AtomicU64,
    delete_errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Most objects remembered in `Inner::copies`; the map starts afresh beyond.
const COPIES_MAX: usize = 65_536;

impl Inner {
    /// The block whose miss last brought object `obj_id` into the cache, if remembered.
    pub(crate) fn copy_of(&self, obj_id: u64) -> Option<BlockKey> {
        self.copies
            .lock()
            .expect("copies poisoned")
            .get(&obj_id)
            .copied()
    }

    /// Remembers that block `key` holds a copy of object `obj_id`.
    pub(crate) fn note_copy(&self, obj_id: u64, key: BlockKey) {
        let mut copies = self.copies.lock().expect("copies poisoned");
        if copies.len() >= COPIES_MAX && !copies.contains_key(&obj_id) {
            copies.clear();
        }
        copies.insert(obj_id, key);
    }
}

/// What a block handle is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads only; never waits for the dirty budget.
    Read,
    /// Reads and writes; takes one block's worth of the dirty budget first.
    Write,
}

/// The receiving ends of the engine's queues, for the background loops.
#[derive(Debug)]
pub(crate) struct Queues {
    pub(crate) uploads: mpsc::Receiver<UploadJob>,
    pub(crate) confirmations: mpsc::Receiver<UploadOutcome>,
    pub(crate) removals: mpsc::Receiver<Removal>,
}

/// Shared state of one open cache.
#[derive(Debug)]
pub(crate) struct Inner {
    config: Config,
    dir: CacheDir,
    db: Arc<Db>,
    backend: Backend,
    locks: Arc<KeyedLocks>,
    /// One miss per object at a time (taken under a block lock, never the other way round):
    /// the misses of other blocks of the same object wait, then share the first one's file.
    object_locks: Arc<KeyedLocks<u64>>,
    /// The block whose miss last brought each object into the cache (at most
    /// [`COPIES_MAX`]; a stale entry only costs a look): where a miss of another block of
    /// the same object finds a copy to share (`miss.rs`).
    copies: Mutex<HashMap<u64, BlockKey>>,
    /// Prefetches that may run at once (`prefetch.rs`).
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Blocks a prefetch is loading: asked for again meanwhile, they take no second slot.
    prefetching: Mutex<std::collections::HashSet<BlockKey>>,
    state: Mutex<State>,
    budget: Arc<Budget>,
    /// Wakes the commit task: writers wait for the dirty budget.
    pressure: Notify,
    /// Wakes eviction and waiters for removals: an upload finished or an entry went away.
    progress: Notify,
    /// Held around each metadata transaction of the commit pipeline together with the upload
    /// registry, and around confirmations and removals (see ARCHITECTURE.md, *Locks*).
    commit_lock: tokio::sync::Mutex<()>,
    /// Objects whose upload is under way, and the blocks waiting for them.
    uploads: Mutex<HashMap<u64, ObjUpload>>,
    upload_tx: mpsc::Sender<UploadJob>,
    /// How many uploads run at once (`pace.rs`), shared with the upload workers.
    pace: Arc<crate::pace::UploadPace>,
    /// Upload outcomes waiting to be recorded by the confirmer.
    confirm_tx: mpsc::Sender<UploadOutcome>,
    removal_tx: mpsc::Sender<Removal>,
    unmarks: Unmarks,
    /// How many pieces of [`Busy`] work run.
    busy: watch::Sender<usize>,
    uploads_in_flight: AtomicU64,
    /// Store deletions queued and not yet done, by ticket.
    removals: remove::Removals,
    /// Shipping the metadata to the store.
    shipping: ship::Shipping,
    counters: Counters,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The first inode the file namespace owns (`owner.rs`); raw block access stays below.
    namespace_floor: AtomicU64,
    /// The exclusive lock of the cache directory, held as long as anything of this engine
    /// runs.
    _dir_lock: File,
}

/// Most upload outcomes waiting for the confirmer, and most object ids waiting for the
/// removal task.
const QUEUE_DEPTH: usize = 4 * 1024;

impl Inner {
    /// Opens the engine over a prepared and locked cache directory: the state is empty until
    /// [`Inner::load`] fills it. The caller starts the loops over the returned queues.
    pub(crate) async fn open(
        config: Config,
        dir: CacheDir,
        dir_lock: File,
        db: Db,
        backend: Backend,
    ) -> Result<(Arc<Self>, Queues)> {
        db.check_block_size(config.block_size).await?;
        let cancel = CancellationToken::new();
        let backend = backend.with_cancel(cancel.child_token());
        let pace = Arc::new(
            crate::pace::UploadPace::new(config.upload_tasks, config.block_size)
                .with_deadline(backend.timeout()),
        );
        // The queue only keeps the workers fed: its jobs hold their bytes, so it is no deeper
        // than the pace's floor (at most 64 MiB of blocks).
        let (upload_tx, uploads) = mpsc::channel(pace.floor());
        let (removal_tx, removals) = mpsc::channel(QUEUE_DEPTH);
        let (confirm_tx, confirmations) = mpsc::channel(QUEUE_DEPTH);
        let inner = Arc::new(Self {
            dir,
            db: Arc::new(db),
            backend,
            locks: Arc::new(KeyedLocks::default()),
            object_locks: Arc::new(KeyedLocks::default()),
            copies: Mutex::default(),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(prefetch::PREFETCH_SLOTS)),
            prefetching: Mutex::default(),
            state: Mutex::new(State::new(config.max_bytes, config.max_entries)),
            budget: Arc::new(Budget::new(config.max_dirty_bytes)),
            pressure: Notify::new(),
            progress: Notify::new(),
            commit_lock: tokio::sync::Mutex::new(()),
            uploads: Mutex::new(HashMap::new()),
            upload_tx,
            pace,
            confirm_tx,
            removal_tx,
            unmarks: Unmarks::default(),
            busy: watch::Sender::new(0),
            uploads_in_flight: AtomicU64::new(0),
            removals: remove::Removals::default(),
            shipping: ship::Shipping::default(),
            counters: Counters::default(),
            cancel,
            tracker: TaskTracker::new(),
            namespace_floor: AtomicU64::new(owner::NO_NAMESPACE),
            _dir_lock: dir_lock,
            config,
        });
        let queues = Queues {
            uploads,
            confirmations,
            removals,
        };
        Ok((inner, queues))
    }

    /// Counts one piece of work that may outlive its caller, until the guard is dropped.
    fn busy(&self) -> Busy {
        self.busy.send_modify(|n| *n += 1);
        Busy(self.busy.clone())
    }

    /// Waits until no detached work runs and the unmark task has done what was queued: then
    /// nothing of a call that was dropped is still changing the state.
    pub(crate) async fn settled(&self) {
        let mut busy = self.busy.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = busy.wait_for(|n| *n == 0).await;
        self.wait_unmarked().await;
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state mutex poisoned")
    }

    /// The settings the cache was opened with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The metadata store (the namespace keeps its file tables there).
    pub(crate) fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// The cache directory.
    pub(crate) fn cache_dir(&self) -> &CacheDir {
        &self.dir
    }

    /// The upload workers' pace.
    pub(crate) fn pace(&self) -> &Arc<crate::pace::UploadPace> {
        &self.pace
    }

    /// The object store.
    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Cancelled when the engine stops: every task ends.
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the engine is stopping.
    pub(crate) fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The engine's tasks, for shutdown.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Notified when writers wait for the dirty budget.
    pub(crate) fn pressure(&self) -> &Notify {
        &self.pressure
    }

    /// Store deletions queued and not yet done.
    pub(crate) fn pending_removals(&self) -> u64 {
        self.removals.pending()
    }

    /// The store deletions queued and held back.
    pub(crate) fn removals(&self) -> &remove::Removals {
        &self.removals
    }

    /// Notified when a flush wants the removal task to retry a failed batch at once.
    pub(crate) fn removal_retry(&self) -> &Notify {
        self.removals.retry_requested()
    }

    /// Notified whenever an upload or a deletion finishes or an entry goes away.
    pub(crate) fn progress(&self) -> &Notify {
        &self.progress
    }

    /// Logs a failure of store work with its causes: at WARN, or at DEBUG when it is
    /// transient and the store counts as down (the backend logged the outage once, with its
    /// cause), so that an outage does not log a line per block.
    pub(crate) fn log_store_failure(&self, error: &Error, what: &str) {
        let error = blockcache_backend::chain(error);
        if self.backend.is_up() {
            tracing::warn!(%error, "{what}");
        } else {
            tracing::debug!(%error, "{what}");
        }
    }

    /// Dirty blocks now.
    pub(crate) fn dirty_entries(&self) -> u64 {
        self.lock_state().totals().dirty_entries
    }

    /// Dirty idle blocks for the commit task: all while writers wait for the dirty budget,
    /// else those unmodified for `delay`.
    pub(crate) fn commit_candidates(&self, delay: Option<std::time::Duration>) -> Vec<BlockKey> {
        let pressure = self.budget.under_pressure();
        self.lock_state().commit_candidates(pressure, delay)
    }

    /// Dirty blocks, all or those of one inode.
    pub(crate) fn dirty_keys(&self, inode: Option<u64>) -> Vec<BlockKey> {
        self.lock_state().dirty_keys(inode)
    }

    /// How many blocks of `inode` are cached, dirty and being uploaded.
    pub(crate) fn inode_blocks(&self, inode: u64) -> InodeBlocks {
        self.lock_state().inode_blocks(inode)
    }

    /// The blocks of `inode` that hold content: cached, or mapped to an object. Blocks
    /// written or removed meanwhile may be missed; the caller keeps the inode still.
    pub(crate) async fn blocks_of(&self, inode: u64) -> Result<Vec<u64>> {
        let mut blocks: Vec<u64> = self
            .lock_state()
            .keys_in(inode, 0..u64::MAX)
            .into_iter()
            .map(|k| k.blockno)
            .collect();
        blocks.extend(self.db.mapped_blocks(inode, 0..u64::MAX).await?);
        blocks.sort_unstable();
        blocks.dedup();
        Ok(blocks)
    }

    /// Changes the limits (the caller evicts down to them).
    pub(crate) fn set_limits(&self, limits: Limits) -> Result<()> {
        limits.validate(self.config.block_size)?;
        self.lock_state()
            .set_limits(limits.max_bytes, limits.max_entries);
        self.budget.set_limit(limits.max_dirty_bytes);
        Ok(())
    }

    /// Usage and counters (O(1) but for the database's totals).
    pub(crate) async fn usage(&self) -> Result<Usage> {
        let totals = self.db.totals().await?;
        let st = self.lock_state().totals();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(Usage {
            entries: st.entries,
            bytes: st.bytes,
            dirty_entries: st.dirty_entries,
            dirty_bytes: st.dirty_bytes,
            uploads_in_flight: self.uploads_in_flight.load(Ordering::SeqCst),
            pending_removals: self.pending_removals(),
            oldest_dirty_age: st
                .oldest_dirty
                .map(|since| tokio::time::Instant::now().duration_since(since)),
            stored_bytes: totals.stored_bytes,
            unique_bytes: totals.unique_bytes,
            logical_bytes: totals.logical_bytes,
            dedup_savings: totals.logical_bytes.saturating_sub(totals.unique_bytes),
            limits: Limits {
                max_bytes: st.max_bytes,
                max_entries: st.max_entries,
                max_dirty_bytes: self.budget.limit(),
            },
            hits: get(&c.hits),
            misses: get(&c.misses),
            uploads: get(&c.uploads),
            upload_bytes: get(&c.upload_bytes),
            upload_errors: get(&c.upload_errors),
            downloads: get(&c.downloads),
            download_bytes: get(&c.download_bytes),
            download_dedup_hits: get(&c.download_dedup_hits),
            prefetches: get(&c.prefetches),
            upload_concurrency: self.pace.limit() as u64,
            download_errors: get(&c.download_errors),
            dedup_hits: get(&c.dedup_hits),
            deletes: get(&c.deletes),
            delete_errors: get(&c.delete_errors),
            store_up: self.backend.is_up(),
        })
    }

    /// A handle on block `key`; for writing, after waiting for one block's worth of the
    /// dirty budget. Cancel-safe: a wait dropped before the lock is taken gives the credit
    /// back.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        key: BlockKey,
        access: Access,
    ) -> Result<BlockHandle> {
        let key = key.check()?;
        let credit = match access {
            Access::Read => None,
            Access::Write => {
                if self.cancel.is_cancelled() {
                    return Err(Error::ShuttingDown);
                }
                let bytes = self.config.block_size;
                let credit = self
                    .budget
                    .acquire(bytes, &self.pressure, self.config.dirty_wait)
                    .await
                    .map_err(|waited| Error::DirtyBudgetFull {
                        limit: self.budget.limit(),
                        waited,
                        // The uploads that would free the budget may still be retrying
                        // when the wait ends (their deadline is the same length, and
                        // started later): their failures say why too.
                        store: self.backend.failing_cause(),
                    })?;
                Some(credit)
            }
        };
        let guard = self.locks.lock(key).await;
        Ok(BlockHandle::new(self.clone(), key, guard, credit))
    }

    /// Drops every clean cached file (after a flush, by the caller).
    pub(crate) async fn drop_clean(&self) -> Result<()> {
        // Prefetches running finish first, and none starts meanwhile: none brings a block
        // back behind the clearing.
        let _no_prefetch = self
            .prefetch_slots
            .acquire_many(prefetch::PREFETCH_SLOTS as u32)
            .await
            .expect("the prefetch semaphore is never closed");
        let keys = self.lock_state().keys();
        for key in keys {
            let _guard = self.locks.lock(key).await;
            let removed = self.lock_state().remove_if_clean(key);
            if let Some(marker) = removed {
                self.dir
                    .remove(key, marker)
                    .map_err(Error::io("delete cache file", self.dir.file(key, marker)))?;
            }
        }
        self.progress.notify_waiters();
        Ok(())
    }

    /// Checks the in-memory accounting against a recount, that no cache room is left
    /// reserved, and (with `quiet`, as when no call is running) that no block is locked, no
    /// writer waits and the dirty budget holds exactly the dirty bytes; then the metadata
    /// invariants. For tests; O(n).
    pub(crate) async fn check_invariants(&self, quiet: bool) -> std::result::Result<(), String> {
        let dirty_bytes = {
            let st = self.lock_state();
            st.check(true)?;
            st.totals().dirty_bytes
        };
        if quiet {
            let (used, waiters) = self.budget.used_and_waiters();
            if used != dirty_bytes || waiters != 0 {
                return Err(format!(
                    "dirty budget holds {used} bytes for {dirty_bytes} dirty bytes, with {waiters} waiters"
                ));
            }
            let held = self.locks.held();
            if held != 0 {
                return Err(format!("{held} block locks still held"));
            }
        }
        self.db.check_consistency().await.map_err(|e| e.to_string())
    }
}

/// Splits `items` into one part per core (fewer if there are fewer items), in order.
fn per_core<T>(mut items: Vec<T>) -> Vec<Vec<T>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_part = items.len().div_ceil(cores).max(1);
    let mut parts = Vec::new();
    while !items.is_empty() {
        let tail = items.split_off(per_part.min(items.len()));
        parts.push(std::mem::replace(&mut items, tail));
    }
    parts
}

/// Runs `work` as a task of the engine and waits for it: if the caller's future is dropped,
/// the work still finishes, so a cancelled call leaves the state as a finished one would.
///
/// It counts as [`Busy`] work until it ends.
async fn detached<T: Send + 'static>(
    inner: &Inner,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let busy = inner.busy();
    joined(inner.tracker.spawn(async move {
        let _busy = busy;
        work.await
    }))
    .await
}

/// The result of a task that returns a `Result`: a panic goes on unwinding in the caller, a
/// task that never ran (the runtime is shutting down) is [`Error::ShuttingDown`].
pub(crate) async fn joined<T>(task: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::ShuttingDown),
    }
}

/// Work of the engine that runs on after its caller may have gone (detached commits and
/// removals, hashing ahead, settling blocks that were clean at once): counted while it runs,
/// so that a test can wait until it is done ([`Inner::settled`]).
#[derive(Debug)]
struct Busy(watch::Sender<usize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
