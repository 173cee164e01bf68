//! The engine: shared state, block handles, the commit and upload pipeline, eviction,
//! flush and removal.
//!
//! # Locks and their order
//! 1. Block locks ([`KeyedLocks`]), async, one per `(inode, blockno)`. A task that needs
//!    several takes them in ascending key order, or with `try_lock` only. Nobody waits for
//!    the dirty budget or for an upload while holding a block lock, with one exception that
//!    cannot deadlock: a cache miss may wait for eviction, and eviction only `try_lock`s.
//! 2. `commit_lock`, async: held around each metadata transaction of the commit pipeline
//!    together with the in-flight upload registry update, so that the state of an object
//!    seen in the database and the registry agree.
//! 3. The database writer (inside `blockcache_db`).
//! 4. `state` and `uploads`, std mutexes, innermost, never held across an `.await`. They
//!    are never held at the same time.
//!
//! # Crash consistency
//! A block's file is renamed to its dirty name before its first modification and renamed
//! back only once its upload is recorded in the database (see [`crate::files`]). Objects are
//! registered (`uploading`) with their mapping before the upload and confirmed after it; a
//! store object is deleted only after its row is gone and a pending deletion is durable.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockcache_backend::Backend;
use blockcache_db::{CommitRequest, Db, ObjectState, Outcome, SyncTicket};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::error::UploadFailure;
use crate::files::{self, CacheDir};
use crate::keylock::{KeyGuard, KeyedLocks};
use crate::state::{Done, State};
use crate::{BlockKey, Config, Error, Result};

/// Most blocks, and most bytes, read into memory by one commit batch (two batches are in
/// memory at a time: one being hashed, one being recorded and handed to the uploaders).
const BATCH_BLOCKS: usize = 512;
const BATCH_BYTES: u64 = 4 << 20;
/// Most bytes of one commit batch when the store links objects to cache files: the bytes are
/// hashed through a small buffer and not kept, so a batch costs no memory of its size, and
/// fewer, larger batches share the database transactions and syncs among more blocks.
const LINKED_BATCH_BYTES: u64 = 16 << 20;

/// A block waiting for the upload of an object.
#[derive(Debug)]
pub(crate) struct Waiter {
    key: BlockKey,
    entry_id: u64,
    generation: u64,
    done: watch::Sender<Option<Result<()>>>,
    /// The (unsynced) commit that pointed the block at its object.
    ticket: SyncTicket,
}

/// An object whose upload is under way, and the blocks that wait for it.
#[derive(Debug)]
pub(crate) struct ObjUpload {
    done: watch::Sender<Option<Result<()>>>,
    waiters: Vec<Waiter>,
}

/// One upload handed to the upload tasks.
#[derive(Debug)]
pub(crate) struct UploadJob {
    pub(crate) obj_id: u64,
    pub(crate) source: UploadSource,
    pub(crate) reply: oneshot::Sender<Result<u64, blockcache_backend::Error>>,
}

/// A new object's block, still locked, on its way to becoming an upload source.
struct UploadFrom {
    path: PathBuf,
    len: u64,
    data: Option<Vec<u8>>,
}

/// What an upload task stores.
#[derive(Debug)]
pub(crate) enum UploadSource {
    /// The block's bytes, uploaded with [`Backend::put`].
    Bytes(Bytes),
    /// The cache file could not be read for an upload of its bytes.
    Unreadable {
        /// The object's size.
        len: u64,
        /// What failed, with the file.
        reason: String,
    },
    /// Already in a local-directory store as a hard link to the cache file
    /// ([`Backend::link_object`]) of `len` bytes; the upload task only makes it durable.
    Linked {
        /// The object's size.
        len: u64,
    },
}

impl UploadSource {
    /// The object's size in bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Linked { len } | Self::Unreadable { len, .. } => *len,
        }
    }
}

/// The outcome of one upload, on its way to the confirmer.
#[derive(Debug)]
pub(crate) struct UploadOutcome {
    obj_id: u64,
    key: BlockKey,
    len: u64,
    result: Result<u64, blockcache_backend::Error>,
}

/// Counters since start-up, for statistics and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) uploads: AtomicU64,
    pub(crate) upload_bytes: AtomicU64,
    pub(crate) upload_errors: AtomicU64,
    pub(crate) downloads: AtomicU64,
    pub(crate) download_bytes: AtomicU64,
    pub(crate) download_errors: AtomicU64,
    pub(crate) dedup_hits: AtomicU64,
    pub(crate) deletes: AtomicU64,
    pub(crate) delete_errors: AtomicU64,
}

/// Shared state of one open cache.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) dir: CacheDir,
    pub(crate) db: Db,
    pub(crate) backend: Backend,
    pub(crate) locks: Arc<KeyedLocks>,
    pub(crate) state: Mutex<State>,
    pub(crate) dirty_budget: Budget,
    /// Wakes the commit task: writers wait for the dirty budget.
    pub(crate) pressure: Notify,
    /// Wakes eviction: an upload finished or an entry went away.
    pub(crate) progress: Notify,
    pub(crate) commit_lock: tokio::sync::Mutex<()>,
    pub(crate) uploads: Mutex<HashMap<u64, ObjUpload>>,
    pub(crate) upload_tx: mpsc::Sender<UploadJob>,
    /// Upload outcomes waiting to be recorded by the confirmer.
    pub(crate) confirm_tx: mpsc::Sender<UploadOutcome>,
    pub(crate) removal_tx: mpsc::Sender<u64>,
    /// Clean entries whose files still carry the dirty marker, for the unmark task. At most
    /// one item per confirmed commit, drained in batches; leaving a marker is harmless.
    pub(crate) unmark_queue: Mutex<Vec<(BlockKey, u64)>>,
    pub(crate) unmark_wake: Notify,
    /// Items queued for the unmark task and not yet done, and the wakeup when it drops.
    pub(crate) unmark_pending: AtomicU64,
    pub(crate) unmark_done: Notify,
    pub(crate) uploads_in_flight: AtomicU64,
    pub(crate) pending_removals: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// The exclusive lock of the cache directory, held as long as anything of this engine
    /// runs.
    pub(crate) _dir_lock: File,
}

/// Whether commit waits for busy block locks or skips those blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Wait,
    Skip,
}

/// What the commit of one block handed back: the generation and its completion.
pub(crate) type Pending = (BlockKey, u64, Done);

/// A locked dirty block about to be read for a commit: key, entry id, generation, size,
/// whether its file carries the dirty marker, its completion, and its lock.
type Locked = (
    BlockKey,
    u64,
    u64,
    u64,
    bool,
    Option<[u8; 32]>,
    watch::Sender<Option<Result<()>>>,
    KeyGuard,
);

/// A block read and hashed for a commit, still locked.
struct Snapshot {
    key: BlockKey,
    entry_id: u64,
    generation: u64,
    guard: KeyGuard,
    done: watch::Sender<Option<Result<()>>>,
    /// The cache file the data was read from (still locked, so unchanged).
    path: PathBuf,
    len: u64,
    /// The bytes, kept only when they may be uploaded as bytes (not linked).
    data: Option<Vec<u8>>,
    hash: [u8; 32],
}

impl Inner {
    pub(crate) fn check_key(key: BlockKey) -> Result<()> {
        if key.inode > i64::MAX as u64 || key.blockno > i64::MAX as u64 {
            return Err(Error::InvalidKey {
                inode: key.inode,
                blockno: key.blockno,
            });
        }
        Ok(())
    }

    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state mutex poisoned")
    }

    /// Waits until `bytes` and `slots` fit within the limits and reserves them, evicting
    /// clean least-recently-used entries and uploading dirty ones as needed. Reads of cached
    /// blocks never come here.
    pub(crate) async fn make_room(self: &Arc<Self>, bytes: u64, slots: u64) -> Result<()> {
        let mut failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            // The unmark task briefly locks clean blocks; let it finish so that eviction does
            // not skip them and pick (and upload) other blocks instead.
            self.wait_unmarked().await;
            let progress = self.progress.notified();
            let released = self.locks.released().notified();
            tokio::pin!(progress, released);
            progress.as_mut().enable();
            released.as_mut().enable();
            let (evicted, to_commit, waits) = {
                let mut st = self.lock_state();
                if st.fits(bytes, slots) {
                    st.reserved_bytes += bytes;
                    st.reserved_slots += slots;
                    return Ok(());
                }
                self.plan_eviction(&mut st, bytes, slots)
            };
            let any_evicted = !evicted.is_empty();
            for (key, marker, guard) in evicted {
                if let Err(error) = self.dir.remove(key, marker) {
                    tracing::warn!(%error, inode = key.inode, blockno = key.blockno, "failed to delete an evicted cache file");
                }
                drop(guard);
            }
            if any_evicted {
                continue;
            }
            let mut waits = waits;
            if !to_commit.is_empty() {
                waits.extend(self.commit_keys(to_commit, LockMode::Skip).await?);
            }
            if waits.is_empty() {
                // Everything evictable is locked by someone: wait until something changes.
                tokio::select! {
                    () = &mut progress => {}
                    () = &mut released => {}
                    () = self.cancel.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let results =
                futures::future::join_all(waits.into_iter().map(|(_, _, d)| wait_done(d))).await;
            if results.iter().all(Result::is_err) {
                // Uploads keep failing: back off instead of spinning; writers keep waiting.
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(50 << failures.min(6));
                tokio::select! {
                    () = self.cancel.cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
            } else {
                failures = 0;
            }
        }
    }

    /// Walks the LRU order from the oldest entry and decides, under the state lock, what to
    /// evict now (clean, unlocked) and what to upload first (dirty). The budget of entries
    /// and bytes to free is spent on both, as in S3QL, so a pass uploads no more than needed.
    #[allow(clippy::type_complexity)]
    fn plan_eviction(
        &self,
        st: &mut State,
        bytes: u64,
        slots: u64,
    ) -> (Vec<(BlockKey, bool, KeyGuard)>, Vec<BlockKey>, Vec<Pending>) {
        let used_bytes = st.bytes + st.reserved_bytes + bytes;
        let used_slots = st.entries.len() as u64 + st.reserved_slots + slots;
        let mut need_bytes = used_bytes.saturating_sub(st.max_bytes) as i64;
        let mut need_slots = used_slots.saturating_sub(st.max_entries) as i64;
        let mut evict = Vec::new();
        let mut commit = Vec::new();
        let mut waits = Vec::new();
        let order: Vec<BlockKey> = st.lru.values().copied().collect();
        for key in order {
            if need_bytes <= 0 && need_slots <= 0 {
                break;
            }
            let e = &st.entries[&key];
            let size = e.size as i64;
            if let Some((generation, done)) = &e.inflight {
                waits.push((key, *generation, done.clone()));
            } else if e.is_dirty() {
                commit.push(key);
            } else {
                let Some(guard) = self.locks.try_lock(key) else {
                    continue;
                };
                let e = st.remove(key).expect("entry present");
                evict.push((key, e.marker, guard));
            }
            need_bytes -= size;
            need_slots -= 1;
        }
        (evict, commit, waits)
    }

    /// Commits `keys`: snapshot and hash each dirty block, decide dedup in one transaction per
    /// batch, and hand new objects to the upload tasks. Returns, for every block that is now
    /// being uploaded (by this call or an earlier one), its generation and completion.
    pub(crate) async fn commit_keys(
        self: &Arc<Self>,
        mut keys: Vec<BlockKey>,
        mode: LockMode,
    ) -> Result<Vec<Pending>> {
        keys.sort_unstable();
        keys.dedup();
        let mut pending = Vec::new();
        let mut rest = &keys[..];
        // Two stages: while one batch is recorded in the database and handed to the
        // uploaders, the next one is locked, read and hashed. Recording never waits for the
        // next batch's locks: a writer holding one of them may be waiting for this batch's
        // uploads (eviction).
        let mut prepared: Option<Vec<Snapshot>> = None;
        loop {
            let gather = async {
                let locked = self.lock_batch(&mut rest, mode, &mut pending).await;
                if locked.is_empty() {
                    None
                } else {
                    Some(self.read_batch(locked).await)
                }
            };
            let next = match prepared.take() {
                None => gather.await,
                Some(current) => {
                    let (recorded, next) = tokio::join!(self.record_batch(current), gather);
                    if let Err(error) = recorded {
                        if let Some(next) = next {
                            self.fail_batch(next, &error);
                        }
                        return Err(error);
                    }
                    next
                }
            };
            match next {
                Some(next) => prepared = Some(next),
                None => return Ok(pending),
            }
        }
    }

    /// Locks the next batch of dirty blocks from `rest` and marks them in flight; blocks
    /// already in flight go to `pending`. Empty only once `rest` is exhausted.
    async fn lock_batch(
        &self,
        rest: &mut &[BlockKey],
        mode: LockMode,
        pending: &mut Vec<Pending>,
    ) -> Vec<Locked> {
        let mut snapshots = Vec::new();
        let mut batch_bytes = 0;
        let max_bytes = if self.backend.can_link() {
            LINKED_BATCH_BYTES
        } else {
            BATCH_BYTES
        };
        while let Some((&key, tail)) = rest.split_first() {
            if snapshots.len() >= BATCH_BLOCKS || batch_bytes >= max_bytes {
                break;
            }
            *rest = tail;
            let guard = match mode {
                LockMode::Wait => self.locks.lock(key).await,
                LockMode::Skip => match self.locks.try_lock(key) {
                    Some(g) => g,
                    None => continue,
                },
            };
            let started = {
                let mut st = self.lock_state();
                match st.entries.get_mut(&key) {
                    None => None,
                    Some(e) => {
                        if let Some((generation, done)) = &e.inflight {
                            pending.push((key, *generation, done.clone()));
                            None
                        } else if !e.is_dirty() {
                            None
                        } else {
                            let (tx, rx) = watch::channel(None);
                            e.inflight = Some((e.generation, rx.clone()));
                            pending.push((key, e.generation, rx));
                            let prehash = e
                                .prehash
                                .filter(|(g, _)| *g == e.generation)
                                .map(|(_, h)| h);
                            Some((e.id, e.generation, e.size, e.marker, prehash, tx))
                        }
                    }
                }
            };
            let Some((entry_id, generation, size, marker, prehash, done)) = started else {
                continue;
            };
            batch_bytes += size;
            snapshots.push((
                key, entry_id, generation, size, marker, prehash, done, guard,
            ));
        }
        snapshots
    }

    /// Settles blocks that were read for a commit that did not happen.
    fn fail_batch(&self, snaps: Vec<Snapshot>, error: &Error) {
        for s in snaps {
            self.finish_block(s.key, s.entry_id, s.generation, &s.done, Err(error.clone()));
        }
    }

    /// Reads and hashes one batch of locked dirty blocks. Blocks that cannot be read are
    /// settled with the error and left out.
    #[tracing::instrument(level = "debug", skip_all, fields(blocks = snapshots.len()))]
    async fn read_batch(&self, snapshots: Vec<Locked>) -> Vec<Snapshot> {
        // Read and hash the blocks on the blocking pool: a few tasks per batch (one per core),
        // not one per block, so small blocks do not pay a hand-off each.
        let chunks = per_core(snapshots);
        // A store that links objects to cache files needs only the hash, not the bytes.
        let keep_data = !self.backend.can_link();
        let reads = chunks.into_iter().map(|chunk| {
            let dir = self.dir.clone();
            async move {
                let (keep, io): (Vec<_>, Vec<_>) = chunk
                    .into_iter()
                    .map(
                        |(key, entry_id, generation, size, marker, prehash, done, guard)| {
                            (
                                (key, entry_id, generation, done, guard),
                                (dir.file(key, marker), size, prehash),
                            )
                        },
                    )
                    .unzip();
                let read = tokio::task::spawn_blocking(move || {
                    io.into_iter()
                        .map(|(path, size, prehash)| {
                            if keep_data {
                                let data = files::read_whole(&path, size)?;
                                let hash = prehash.unwrap_or_else(|| Sha256::digest(&data).into());
                                Ok::<_, std::io::Error>((path, size, Some(data), hash))
                            } else {
                                let hash = match prehash {
                                    Some(hash) => hash,
                                    None => files::hash_file(&path, size)?,
                                };
                                Ok((path, size, None, hash))
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .expect("hashing task panicked");
                keep.into_iter().zip(read).collect::<Vec<_>>()
            }
        });
        let mut snaps = Vec::new();
        for ((key, entry_id, generation, done, guard), read) in
            futures::future::join_all(reads).await.into_iter().flatten()
        {
            match read {
                Ok((path, len, data, hash)) => snaps.push(Snapshot {
                    key,
                    entry_id,
                    generation,
                    guard,
                    done,
                    path,
                    len,
                    data,
                    hash,
                }),
                Err(source) => {
                    let error = Error::Io {
                        action: "read cache file",
                        path: self.dir.file(key, true),
                        source: Arc::new(source),
                    };
                    tracing::error!(%error, inode = key.inode, blockno = key.blockno, "failed to commit a block");
                    self.finish_block(key, entry_id, generation, &done, Err(error));
                }
            }
        }
        snaps
    }

    /// Records one read batch in the database (one transaction) and hands its new objects to
    /// the upload tasks.
    ///
    /// The transaction is not synced on its own (an fsync per batch on the path of every
    /// upload): a block waiting for an upload is settled after the confirmation, whose
    /// synchronized commit makes this one durable too; a block that is clean at once (its
    /// content is already in the store) is settled only after [`Db::sync_through`]; released
    /// objects are deleted by the removal task only after it synced the database.
    #[tracing::instrument(level = "debug", skip_all, fields(blocks = snaps.len()))]
    async fn record_batch(self: &Arc<Self>, snaps: Vec<Snapshot>) -> Result<()> {
        if snaps.is_empty() {
            return Ok(());
        }
        let requests: Vec<CommitRequest> = snaps
            .iter()
            .map(|s| CommitRequest {
                inode: s.key.inode,
                blockno: s.key.blockno,
                hash: s.hash,
                length: s.len,
            })
            .collect();
        let mut clean = Vec::new();
        let mut failed = Vec::new();
        let mut jobs = Vec::new();
        let mut released = Vec::new();
        let ticket = {
            let _commit = self.commit_lock.lock().await;
            let (results, ticket) = match self.db.commit_blocks_unsynced(&requests).await {
                Ok(r) => r,
                Err(e) => {
                    let error = Error::from(e);
                    for s in &snaps {
                        self.finish_block(
                            s.key,
                            s.entry_id,
                            s.generation,
                            &s.done,
                            Err(error.clone()),
                        );
                    }
                    return Err(error);
                }
            };
            let mut uploads = self.uploads.lock().expect("uploads mutex poisoned");
            for (snap, committed) in snaps.into_iter().zip(results) {
                released.extend(committed.released);
                let Snapshot {
                    key,
                    entry_id,
                    generation,
                    guard,
                    done,
                    path,
                    len,
                    data,
                    ..
                } = snap;
                let waiter = Waiter {
                    key,
                    entry_id,
                    generation,
                    done,
                    ticket,
                };
                let (obj_id, state, created) = match committed.outcome {
                    Outcome::Created { obj_id } => (obj_id, ObjectState::Uploading, true),
                    Outcome::Linked { obj_id, state } | Outcome::Unchanged { obj_id, state } => {
                        self.counters.dedup_hits.fetch_add(1, Ordering::Relaxed);
                        (obj_id, state, false)
                    }
                };
                match state {
                    ObjectState::Uploaded => clean.push(waiter),
                    ObjectState::Failed => failed.push((
                        waiter,
                        Error::Upload {
                            obj_id,
                            inode: key.inode,
                            blockno: key.blockno,
                            source: Arc::new(UploadFailure::Stopped),
                        },
                    )),
                    ObjectState::Uploading => match uploads.get_mut(&obj_id) {
                        // Dedup against an object still being uploaded: the block stays dirty
                        // until that upload succeeds.
                        Some(upload) if !created => upload.waiters.push(waiter),
                        _ => {
                            // A new object, or one registered before a crash whose upload
                            // nobody runs now: upload it from this block's content.
                            uploads.insert(
                                obj_id,
                                ObjUpload {
                                    done: watch::channel(None).0,
                                    waiters: vec![waiter],
                                },
                            );
                            // Still locked: the file may become the store's object.
                            jobs.push((obj_id, key, UploadFrom { path, len, data }, guard));
                            continue;
                        }
                    },
                }
                drop(guard);
            }
            ticket
        };
        for (w, error) in failed {
            self.finish_block(w.key, w.entry_id, w.generation, &w.done, Err(error));
        }
        if !clean.is_empty() {
            // Clean at once, but not before the commit is durable: after a power loss the
            // block's file, renamed clean, would otherwise not match its (older) mapping.
            let inner = Arc::clone(self);
            self.tracker.spawn(async move {
                let synced = inner.db.sync_through(ticket).await.map_err(Error::from);
                for w in clean {
                    debug_assert!(synced.is_err() || inner.db.is_durable(w.ticket));
                    inner.finish_block(w.key, w.entry_id, w.generation, &w.done, synced.clone());
                }
            });
        }
        for (obj_id, key, source) in self.link_objects(jobs).await {
            self.start_upload(obj_id, key, source).await;
        }
        self.queue_removals(released).await;
        Ok(())
    }

    /// Turns new objects into upload sources. In a local-directory store on the cache's file
    /// system, each object becomes a hard link to its block's cache file, made while the
    /// block is still locked (so the file holds exactly the hashed bytes): no copy, and the
    /// bytes are written to the disk once. A later change of the block first replaces its
    /// cache file with a copy ([`BlockHandle::apply`]). Blocks that cannot be linked are
    /// uploaded from their bytes. The block locks are released here.
    async fn link_objects(
        &self,
        jobs: Vec<(u64, BlockKey, UploadFrom, KeyGuard)>,
    ) -> Vec<(u64, BlockKey, UploadSource)> {
        if jobs.iter().all(|(_, _, from, _)| from.data.is_some()) && !self.backend.can_link() {
            return jobs
                .into_iter()
                .map(|(id, key, from, _)| {
                    let data = from.data.unwrap_or_default();
                    (id, key, UploadSource::Bytes(Bytes::from(data)))
                })
                .collect();
        }
        // One blocking task per core: each link is a directory operation of the store.
        let tasks: Vec<_> = per_core(jobs)
            .into_iter()
            .map(|chunk| {
                let backend = self.backend.clone();
                tokio::task::spawn_blocking(move || link_chunk(&backend, chunk))
            })
            .collect();
        let mut linked = Vec::new();
        for t in tasks {
            linked.extend(t.await.expect("linking task panicked"));
        }
        linked
    }

    /// Hands one object to the upload tasks (waiting while they are busy) and spawns the task
    /// that passes its outcome to the confirmer.
    ///
    /// A small linked object needs no upload task: the confirmer's barrier (one `syncfs` for
    /// its batch) makes it durable, so its outcome goes to the confirmer at once.
    async fn start_upload(self: &Arc<Self>, obj_id: u64, key: BlockKey, source: UploadSource) {
        self.uploads_in_flight.fetch_add(1, Ordering::SeqCst);
        let len = source.len();
        if matches!(source, UploadSource::Linked { .. })
            && !crate::tasks::syncs_each_object(&self.backend, len)
        {
            self.confirm(UploadOutcome {
                obj_id,
                key,
                len,
                result: Ok(len),
            })
            .await;
            return;
        }
        let (reply, rx) = oneshot::channel();
        let sent = self
            .upload_tx
            .send(UploadJob {
                obj_id,
                source,
                reply,
            })
            .await
            .is_ok();
        let inner = Arc::clone(self);
        self.tracker.spawn(async move {
            let result = if sent {
                rx.await
                    .unwrap_or(Err(blockcache_backend::Error::Cancelled))
            } else {
                Err(blockcache_backend::Error::Cancelled)
            };
            let outcome = UploadOutcome {
                obj_id,
                key,
                len,
                result,
            };
            inner.confirm(outcome).await;
        });
    }

    /// Passes an upload's outcome to the confirmer, which records outcomes in batches; once
    /// it has stopped (shutdown), the outcome is recorded here.
    async fn confirm(self: &Arc<Self>, outcome: UploadOutcome) {
        if let Err(mpsc::error::SendError(outcome)) = self.confirm_tx.send(outcome).await {
            self.finish_uploads(vec![outcome]).await;
        }
    }

    /// Makes the objects of the successful `outcomes` durable before they are recorded: a
    /// few large objects (each already synced by its upload task) need only their
    /// directories synced; otherwise one `syncfs` covers the batch. Nothing for cloud stores.
    async fn store_barrier(
        &self,
        outcomes: &[UploadOutcome],
    ) -> Result<(), blockcache_backend::Error> {
        let ok: Vec<&UploadOutcome> = outcomes.iter().filter(|o| o.result.is_ok()).collect();
        if ok.is_empty() || !self.backend.is_local() {
            return Ok(());
        }
        if ok.len() <= crate::tasks::SYNC_DIRS_MAX
            && ok
                .iter()
                .all(|o| crate::tasks::syncs_each_object(&self.backend, o.len))
        {
            let ids: Vec<u64> = ok.iter().map(|o| o.obj_id).collect();
            self.backend.sync_object_dirs(&ids).await
        } else {
            self.backend.make_durable().await
        }
    }

    /// Records the outcomes of uploads in the database in one transaction, then settles
    /// every block waiting for those objects.
    #[tracing::instrument(level = "debug", skip_all, fields(uploads = outcomes.len()))]
    pub(crate) async fn finish_uploads(self: &Arc<Self>, mut outcomes: Vec<UploadOutcome>) {
        // A local-directory store must reach the disk before its objects count as uploaded:
        // one barrier for the whole batch.
        if let Err(e) = self.store_barrier(&outcomes).await {
            tracing::warn!(error = %e, "store not durable; the blocks stay dirty and are uploaded again");
            for o in &mut outcomes {
                if o.result.is_ok() {
                    o.result = Err(blockcache_backend::Error::NotDurable {
                        reason: e.to_string(),
                    });
                }
            }
        }
        let records: Vec<(u64, Option<u64>)> = outcomes
            .iter()
            .map(|o| (o.obj_id, o.result.as_ref().ok().copied()))
            .collect();
        let (recorded, uploads) = {
            let _commit = self.commit_lock.lock().await;
            let recorded = self.db.record_uploads(&records).await;
            let mut registry = self.uploads.lock().expect("uploads mutex poisoned");
            let uploads: Vec<Option<ObjUpload>> = outcomes
                .iter()
                .map(|o| registry.remove(&o.obj_id))
                .collect();
            (recorded, uploads)
        };
        let recorded = recorded.map_err(Arc::new);
        for (i, (outcome, upload)) in outcomes.into_iter().zip(uploads).enumerate() {
            self.uploads_in_flight.fetch_sub(1, Ordering::SeqCst);
            let UploadOutcome {
                obj_id,
                key,
                len,
                result,
            } = outcome;
            let failure = match (result, &recorded) {
                (Ok(_), Ok(r)) if r[i] => None,
                // Released, or marked failed by someone else: the blocks stay dirty and their
                // next commit finds or creates an object that is sound.
                (Ok(_), Ok(_)) => Some(UploadFailure::NotRecorded),
                (Ok(_), Err(e)) => Some(UploadFailure::Db(Arc::clone(e))),
                (Err(e), _) => Some(UploadFailure::Store(e)),
            };
            let result = match failure {
                None => {
                    self.counters.uploads.fetch_add(1, Ordering::Relaxed);
                    self.counters.upload_bytes.fetch_add(len, Ordering::Relaxed);
                    Ok(())
                }
                Some(failure) => {
                    self.counters.upload_errors.fetch_add(1, Ordering::Relaxed);
                    let cancelled = matches!(&failure, UploadFailure::Store(e) if e.is_cancelled());
                    let error = Error::Upload {
                        obj_id,
                        inode: key.inode,
                        blockno: key.blockno,
                        source: Arc::new(failure),
                    };
                    if !cancelled {
                        tracing::warn!(%error, "upload failed; the data stays dirty in the cache");
                    }
                    Err(error)
                }
            };
            if let Some(upload) = upload {
                for w in upload.waiters {
                    // The confirmation's commit was synchronized, after the block's own.
                    debug_assert!(result.is_err() || self.db.is_durable(w.ticket));
                    self.finish_block(w.key, w.entry_id, w.generation, &w.done, result.clone());
                }
                upload.done.send_replace(Some(result));
            }
        }
        self.progress.notify_waiters();
    }

    /// Settles the commit of generation `generation` of a block: clean on success, still dirty on
    /// failure. Late results for a removed or re-created entry change nothing.
    fn finish_block(
        &self,
        key: BlockKey,
        entry_id: u64,
        generation: u64,
        done: &watch::Sender<Option<Result<()>>>,
        result: Result<()>,
    ) {
        let became_clean = {
            let mut st = self.lock_state();
            match &result {
                Ok(()) => st.confirm(key, entry_id, generation),
                Err(_) => {
                    st.fail(key, entry_id, generation);
                    None
                }
            }
        };
        if let Some(freed) = became_clean {
            self.dirty_budget.release(freed);
            // The rename back to the clean name is a file-system call: the unmark task does
            // it in batches on the blocking pool, off this path. Queued (and counted) before
            // `done` fires, so whoever acts on `done` can wait for it.
            self.unmark_queue
                .lock()
                .expect("unmark queue poisoned")
                .push((key, entry_id));
            self.unmark_pending.fetch_add(1, Ordering::SeqCst);
            self.unmark_wake.notify_one();
        }
        done.send_replace(Some(result));
        self.progress.notify_waiters();
    }

    /// Waits until the unmark task has done everything queued (or the engine stops).
    pub(crate) async fn wait_unmarked(&self) {
        loop {
            let done = self.unmark_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.unmark_pending.load(Ordering::SeqCst) == 0 || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = done => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Hashes dirty blocks among `keys` ahead of their commit, on the blocking pool (one task
    /// per core), until `stop` is set; `sync` runs it while the disk writes. A block that is
    /// locked, in flight or already hashed at its generation is skipped; each one hashed is
    /// locked meanwhile, so its generation and bytes cannot change under the hash.
    pub(crate) async fn prehash(self: &Arc<Self>, keys: Vec<BlockKey>, stop: Arc<AtomicBool>) {
        if keys.is_empty() {
            return;
        }
        let tasks: Vec<_> = per_core(keys)
            .into_iter()
            .map(|chunk| {
                let (inner, stop) = (Arc::clone(self), stop.clone());
                tokio::task::spawn_blocking(move || {
                    for key in chunk {
                        if stop.load(Ordering::Relaxed) || inner.cancel.is_cancelled() {
                            return;
                        }
                        inner.prehash_one(key);
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Hashes one dirty block ahead of its commit (see [`Inner::prehash`]). Blocking.
    fn prehash_one(&self, key: BlockKey) {
        let Some(_guard) = self.locks.try_lock(key) else {
            return;
        };
        let found = {
            let st = self.lock_state();
            st.entries
                .get(&key)
                .filter(|e| e.is_dirty() && e.inflight.is_none())
                .filter(|e| e.prehash.is_none_or(|(g, _)| g != e.generation))
                .map(|e| (e.id, e.generation, e.size, e.marker))
        };
        let Some((id, generation, size, marker)) = found else {
            return;
        };
        // A failure here only means the commit hashes the block itself.
        let Ok(hash) = files::hash_file(&self.dir.file(key, marker), size) else {
            return;
        };
        let mut st = self.lock_state();
        if let Some(e) = st.entries.get_mut(&key)
            && e.id == id
            && e.generation == generation
        {
            e.prehash = Some((generation, hash));
        }
    }

    /// Renames the file of a clean entry back to its clean name, if its block is not in use.
    /// Leaving the marker is harmless: recovery would re-hash the block and find it clean.
    pub(crate) fn unmark(&self, key: BlockKey, entry_id: u64) {
        let Some(_guard) = self.locks.try_lock(key) else {
            return;
        };
        let marked = {
            let st = self.lock_state();
            st.entries
                .get(&key)
                .is_some_and(|e| e.id == entry_id && e.marker && !e.is_dirty())
        };
        if !marked {
            return;
        }
        match self.dir.set_marker(key, false) {
            Ok(()) => {
                let mut st = self.lock_state();
                if let Some(e) = st.entries.get_mut(&key) {
                    e.marker = false;
                }
            }
            Err(error) => {
                tracing::warn!(%error, inode = key.inode, blockno = key.blockno, "failed to drop a dirty marker")
            }
        }
    }

    /// Queues store deletions of released objects (their pending deletions are durable).
    pub(crate) async fn queue_removals(&self, ids: Vec<u64>) {
        for id in ids {
            self.pending_removals.fetch_add(1, Ordering::SeqCst);
            if self.removal_tx.send(id).await.is_err() {
                // The removal task is gone (shutdown); the pending deletion stays in the
                // database and the next start finishes it.
                tracing::debug!(
                    obj_id = id,
                    "removal queue closed; deletion left for the next start"
                );
            }
        }
    }

    /// The completion of an upload of object `obj_id` under way, if any.
    pub(crate) fn upload_of(&self, obj_id: u64) -> Option<watch::Receiver<Option<Result<()>>>> {
        self.uploads
            .lock()
            .expect("uploads mutex poisoned")
            .get(&obj_id)
            .map(|u| u.done.subscribe())
    }

    /// Commit + wait: returns once every block dirty at the call is in the store.
    pub(crate) async fn flush(self: &Arc<Self>, only: Option<u64>) -> Result<()> {
        // Block -> (entry id, generation) at the call.
        let targets: HashMap<BlockKey, (u64, u64)> = {
            let st = self.lock_state();
            st.dirty
                .iter()
                .filter(|(_, k)| only.is_none_or(|i| k.inode == i))
                .map(|(_, k)| (*k, (st.entries[k].id, st.entries[k].generation)))
                .collect()
        };
        loop {
            let mut to_commit = Vec::new();
            let mut waits = Vec::new();
            {
                let st = self.lock_state();
                for (&key, &(id, generation)) in &targets {
                    let Some(e) = st.entries.get(&key).filter(|e| e.id == id) else {
                        continue; // removed: nothing to flush
                    };
                    if e.clean_gen >= generation {
                        continue;
                    }
                    match &e.inflight {
                        // A commit this flush did not start: if it fails, the block is still
                        // dirty and the next round commits it again (its failure is not ours).
                        Some((g, done)) => waits.push((key, *g >= generation, true, done.clone())),
                        None => to_commit.push(key),
                    }
                }
            }
            if to_commit.is_empty() && waits.is_empty() {
                // Leave the blocks as a flush found them before the unmark task existed:
                // under their clean names, and not locked by it when the caller goes on
                // (eviction skips locked entries).
                self.wait_unmarked().await;
                return Ok(());
            }
            for (key, gen_ok, done) in self
                .commit_keys(to_commit, LockMode::Wait)
                .await?
                .into_iter()
                .map(|(k, g, d)| {
                    let wanted = targets.get(&k).map_or(0, |t| t.1);
                    (k, g >= wanted, d)
                })
            {
                waits.push((key, gen_ok, false, done));
            }
            for (key, covers, inherited, done) in waits {
                let result = wait_done(done).await;
                let Err(error) = result else { continue };
                if !covers || inherited {
                    continue;
                }
                // Blocks removed meanwhile need no flush; an upload whose object was released
                // by a newer commit leaves the block dirty, and the next round commits it.
                let id = targets.get(&key).map(|t| t.0);
                let removed = self
                    .lock_state()
                    .entries
                    .get(&key)
                    .is_none_or(|e| Some(e.id) != id);
                let released = matches!(&error, Error::Upload { source, .. } if matches!(**source, UploadFailure::NotRecorded));
                if !removed && !released {
                    return Err(error);
                }
            }
        }
    }
}

/// Links a chunk of new objects into the store (see `Inner::link_objects`), releasing each
/// block's lock once its object is settled. Blocking.
fn link_chunk(
    backend: &Backend,
    jobs: Vec<(u64, BlockKey, UploadFrom, KeyGuard)>,
) -> Vec<(u64, BlockKey, UploadSource)> {
    jobs.into_iter()
        .map(|(id, key, from, guard)| {
            let UploadFrom { path, len, data } = from;
            let started = std::time::Instant::now();
            let source = match backend.link_object(id, &path) {
                Some(linked) if linked == len => {
                    // The link is the whole upload of an object that no upload task syncs.
                    if !crate::tasks::syncs_each_object(backend, len) {
                        metrics::histogram!("blockcache_upload_duration_seconds", "outcome" => "ok")
                            .record(started.elapsed().as_secs_f64());
                    }
                    UploadSource::Linked { len }
                }
                // Not linked: upload the bytes, read now if they were not kept
                // (the block is still locked, so they are the hashed ones).
                _ => match data.map_or_else(|| files::read_whole(&path, len), Ok) {
                    Ok(data) => UploadSource::Bytes(Bytes::from(data)),
                    Err(e) => UploadSource::Unreadable {
                        len,
                        reason: format!("{}: {e}", path.display()),
                    },
                },
            };
            drop(guard);
            (id, key, source)
        })
        .collect::<Vec<_>>()
}

/// A download written into the cache (see `BlockHandle::fetch_download`): the open file,
/// or what does not match the metadata; `Err` if the file could not be written.
type Downloaded = std::io::Result<std::result::Result<File, String>>;

/// The `Error::Corrupted` reason of bytes whose SHA-256 is not the recorded one.
fn mismatch(actual: &[u8; 32], expected: &[u8; 32]) -> String {
    format!(
        "SHA-256 {} instead of {}",
        hex::encode(actual),
        hex::encode(expected)
    )
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

/// Waits for a completion.
pub(crate) async fn wait_done(mut done: Done) -> Result<()> {
    match done.wait_for(Option::is_some).await {
        Ok(v) => v.clone().expect("checked by wait_for"),
        Err(_) => Err(Error::ShuttingDown),
    }
}

/// Exclusive access to one block. Holds the block's lock until dropped.
///
/// Obtained from [`crate::BlockCache::block`] (read and write) or
/// [`crate::BlockCache::block_for_read`] (read only). A write handle reserved one block's worth
/// of the dirty budget when it was opened, so writing never waits for uploads while the
/// block is locked.
#[derive(Debug)]
pub struct BlockHandle {
    pub(crate) inner: Arc<Inner>,
    pub(crate) key: BlockKey,
    pub(crate) _guard: KeyGuard,
    pub(crate) credit: Option<u64>,
    pub(crate) file: Option<File>,
}

/// What a handle needs before an operation.
#[derive(Debug, Clone, Copy)]
enum Intent {
    Read,
    /// A write of `[start, end)`.
    Write(u64, u64),
    Truncate(u64),
}

impl BlockHandle {
    /// The block this handle owns.
    pub fn key(&self) -> BlockKey {
        self.key
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The block's length in bytes (0 for a hole). Downloads nothing.
    pub async fn size(&mut self) -> Result<u64> {
        if let Some(size) = self.cached_size() {
            return Ok(size);
        }
        Ok(self
            .inner
            .db
            .mapping(self.key.inode, self.key.blockno)
            .await?
            .map_or(0, |o| o.length))
    }

    fn cached_size(&self) -> Option<u64> {
        let st = self.inner.lock_state();
        st.entries
            .get(&self.key)
            .filter(|e| e.verified)
            .map(|e| e.size)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let block_size = self.inner.config.block_size;
        if offset.checked_add(len).is_none_or(|end| end > block_size) {
            return Err(Error::OutOfRange {
                inode: self.key.inode,
                blockno: self.key.blockno,
                offset,
                len,
                block_size,
            });
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`; returns fewer at the end of the block, and
    /// nothing for a hole. A miss downloads the block first.
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes> {
        self.check_range(offset, len as u64)?;
        if !self.ensure(Intent::Read).await? {
            return Ok(Bytes::new());
        }
        let size = self.cached_size().expect("ensured");
        let end = (offset + len as u64).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let file = self.file()?;
        let mut buf = vec![0; (end - offset) as usize];
        file.read_exact_at(&mut buf, offset).map_err(Error::io(
            "read cache file",
            self.inner.dir.file(self.key, true),
        ))?;
        Ok(Bytes::from(buf))
    }

    /// Writes `data` at `offset`, growing the block if needed (a gap reads as zeros).
    /// A write that covers the block's whole old content does not download it first.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_with_hash(offset, data, None).await
    }

    /// [`BlockHandle::write`], where the caller may have computed `hash`, the SHA-256 of
    /// `data`, as it gathered the bytes. If the write starts at the block's start and the
    /// block is then exactly `data` (it was not longer), the hash is kept for the commit,
    /// which then need not read the block back to hash it.
    pub(crate) async fn write_with_hash(
        &mut self,
        offset: u64,
        data: &[u8],
        hash: Option<[u8; 32]>,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        self.ensure(Intent::Write(offset, end)).await?;
        let size = self.cached_size().expect("ensured");
        let new_size = size.max(end);
        let hash = hash.filter(|_| offset == 0 && new_size == end);
        self.modify(new_size, hash, |file| file.write_all_at(data, offset))
            .await
    }

    /// Starts making the block's data durable in the background (fdatasync on the blocking
    /// pool), so that a sync soon after finds little left to write. The task's result must
    /// be looked at: a failed fdatasync may be reported to no later sync.
    pub(crate) fn sync_ahead(&self) -> Option<tokio::task::JoinHandle<Result<()>>> {
        let file = self.file.as_ref()?.try_clone().ok()?;
        let path = self.inner.dir.file(self.key, true);
        Some(tokio::task::spawn_blocking(move || {
            file.sync_data().map_err(Error::io("sync cache file", path))
        }))
    }

    /// Sets the block's length to `size`, cutting or zero-extending it.
    pub async fn truncate(&mut self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(0, size)?;
        self.ensure(Intent::Truncate(size)).await?;
        if self.cached_size() == Some(size) {
            return Ok(());
        }
        self.modify(size, None, |file| file.set_len(size)).await
    }

    /// Makes this block's data durable in the cache directory (fsync of file and directory).
    pub async fn sync(&mut self) -> Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        let file = file.try_clone().map_err(Error::io(
            "sync cache file",
            self.inner.dir.file(self.key, true),
        ))?;
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            dir.sync_dir()
        })
        .await
        .expect("sync task panicked")
        .map_err(Error::io("sync cache directory", self.inner.dir.path()))
    }

    fn check_writable(&self) -> Result<()> {
        if self.credit.is_none() {
            return Err(Error::ReadOnly {
                inode: self.key.inode,
                blockno: self.key.blockno,
            });
        }
        Ok(())
    }

    fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            let marker = {
                let st = self.inner.lock_state();
                st.entries
                    .get(&self.key)
                    .map(|e| e.marker)
                    .expect("ensured")
            };
            let file = self.inner.dir.open(self.key, marker).map_err(Error::io(
                "open cache file",
                self.inner.dir.file(self.key, marker),
            ))?;
            self.file = Some(file);
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Applies a modification that leaves the block `new_size` bytes long: grow the cache
    /// reservation if needed, mark dirty (renaming the file first), then run `op` on the file.
    /// `hash`, if given, is the SHA-256 of the block's whole content after `op`; it is kept
    /// with the new generation, in the same critical section that makes that generation.
    async fn modify(
        &mut self,
        new_size: u64,
        hash: Option<[u8; 32]>,
        op: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<()> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        let old_size = self.cached_size().expect("ensured");
        let growth = new_size.saturating_sub(old_size);
        if growth > 0 {
            inner.make_room(growth, 0).await?;
        }
        // The reservation turns into the entry's size in the same critical section as the
        // size change, so no other task can take the room in between.
        let applied = self.apply(op);
        let mut st = inner.lock_state();
        st.reserved_bytes -= growth;
        applied?;
        let delta = st.modify(key, new_size);
        if let Some(hash) = hash {
            let e = st.entries.get_mut(&key).expect("modified entry is cached");
            e.prehash = Some((e.generation, hash));
        }
        drop(st);
        let credit = self.credit.as_mut().expect("writable");
        if delta >= 0 {
            // A handle's credit is one block size, and no block grows past that.
            *credit = credit.saturating_sub(delta as u64);
        } else {
            *credit += delta.unsigned_abs();
        }
        Ok(())
    }

    /// Renames the file to its dirty name if needed, then runs `op` on it.
    fn apply(&mut self, op: impl FnOnce(&File) -> std::io::Result<()>) -> Result<()> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        // Mark the file dirty before the bytes change, so a crash never leaves modified
        // data under a clean name. A hash computed ahead is void from here on, even if the
        // change fails half-way and the generation stays.
        let needs_marker = {
            let mut st = inner.lock_state();
            let e = st.entries.get_mut(&key).expect("ensured");
            e.prehash = None;
            !e.marker
        };
        if needs_marker {
            inner.dir.set_marker(key, true).map_err(Error::io(
                "mark cache file dirty",
                inner.dir.file(key, false),
            ))?;
            if let Some(e) = inner.lock_state().entries.get_mut(&key) {
                e.marker = true;
            }
        }
        // A cache file that is also a store object (a hard link) is never changed in place.
        let file = self.file()?;
        if let Some(copy) = inner.dir.unshare(key, file).map_err(Error::io(
            "copy the cache file shared with the store",
            inner.dir.file(key, true),
        ))? {
            self.file = Some(copy);
        }
        let file = self.file()?;
        op(file).map_err(Error::io("write cache file", inner.dir.file(key, true)))
    }

    /// Makes sure the block is cached if it has content; returns false for a hole on read.
    async fn ensure(&mut self, intent: Intent) -> Result<bool> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        let (cached, verified) = {
            let mut st = inner.lock_state();
            let found = st.entries.get(&key).map(|e| e.verified);
            if found.is_some() {
                st.touch(key);
            }
            (found.is_some(), found.unwrap_or(false))
        };
        if cached && verified {
            inner.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        if cached && !self.verify().await? {
            self.file = None;
        } else if cached {
            inner.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        if let Intent::Write(0, end) = intent
            && end >= inner.config.block_size
        {
            // The write replaces any content the block may have in the store (no object is
            // longer than a block): there is nothing to look up or fetch.
            self.create_empty().await?;
            return Ok(true);
        }
        let mapping = inner.db.mapping(key.inode, key.blockno).await?;
        let Some(object) = mapping else {
            if let Intent::Read = intent {
                return Ok(false);
            }
            self.create_empty().await?;
            return Ok(true);
        };
        let replaces_all = match intent {
            Intent::Read => false,
            Intent::Write(start, end) => start == 0 && end >= object.length,
            Intent::Truncate(size) => size == 0,
        };
        if replaces_all {
            self.create_empty().await?;
            return Ok(true);
        }
        inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        self.download(object).await?;
        Ok(true)
    }

    async fn create_empty(&mut self) -> Result<()> {
        let inner = Arc::clone(self.inner());
        inner.make_room(0, 1).await?;
        let created = inner.dir.create_dirty(self.key);
        // The reserved slot becomes the entry in one critical section.
        let mut st = inner.lock_state();
        st.reserved_slots -= 1;
        let file = created.map_err(Error::io(
            "create cache file",
            inner.dir.file(self.key, true),
        ))?;
        // An empty new block is dirty (it must become a mapping) but holds no bytes yet.
        st.insert(self.key, 0, true, true);
        drop(st);
        self.file = Some(file);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(inode = self.key.inode, blockno = self.key.blockno, obj_id = object.id))]
    async fn download(&mut self, object: blockcache_db::Object) -> Result<()> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        let Some(hash) = object.hash else {
            return Err(Error::Lost {
                obj_id: object.id,
                inode: key.inode,
                blockno: key.blockno,
            });
        };
        if let Some(done) = inner.upload_of(object.id) {
            // The object is still being uploaded for another block: wait for it.
            wait_done(done).await.map_err(|_| Error::Lost {
                obj_id: object.id,
                inode: key.inode,
                blockno: key.blockno,
            })?;
        }
        let linked = if inner.backend.can_link() {
            self.link_download(&object, hash).await?
        } else {
            None
        };
        let (installed, action) = match linked {
            Some(installed) => (installed, "link the object into the cache"),
            // Not linkable: fetch the bytes.
            None => (
                self.fetch_download(&object, hash).await?,
                "store downloaded block",
            ),
        };
        {
            // The reservation becomes the entry in one critical section.
            let mut st = inner.lock_state();
            st.reserved_bytes -= object.length;
            st.reserved_slots -= 1;
            if let Ok(Ok(_)) = installed {
                st.insert(key, object.length, false, true);
            }
        }
        let file = match installed {
            Ok(Ok(file)) => file,
            Ok(Err(reason)) => {
                inner
                    .counters
                    .download_errors
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Error::Corrupted {
                    obj_id: object.id,
                    inode: key.inode,
                    blockno: key.blockno,
                    reason,
                });
            }
            Err(source) => {
                inner
                    .counters
                    .download_errors
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Error::io(action, inner.dir.file(key, false))(source));
            }
        };
        inner.counters.downloads.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .download_bytes
            .fetch_add(object.length, Ordering::Relaxed);
        self.file = Some(file);
        Ok(())
    }

    /// Fetches the object and writes it under the block's clean name, with room reserved for
    /// it. `Ok(Ok(file))`: installed, and the file stays open for the handle; `Ok(Err(reason))`:
    /// the bytes do not match the metadata; `Err`: the file could not be written.
    async fn fetch_download(
        &mut self,
        object: &blockcache_db::Object,
        hash: [u8; 32],
    ) -> Result<Downloaded> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        let started = std::time::Instant::now();
        let fetched = inner.backend.get(object.id).await;
        metrics::histogram!(
            "blockcache_download_duration_seconds",
            "outcome" => crate::tasks::outcome(&fetched)
        )
        .record(started.elapsed().as_secs_f64());
        let data = fetched.map_err(|e| {
            inner
                .counters
                .download_errors
                .fetch_add(1, Ordering::Relaxed);
            Error::Download {
                obj_id: object.id,
                inode: key.inode,
                blockno: key.blockno,
                source: Arc::new(e),
            }
        })?;
        inner.make_room(object.length, 1).await?;
        let (dir, len) = (inner.dir.clone(), object.length);
        let installed = tokio::task::spawn_blocking(move || {
            if data.len() as u64 != len {
                return Ok(Err(format!("{} bytes instead of {len}", data.len())));
            }
            let actual: [u8; 32] = Sha256::digest(&data).into();
            if actual != hash {
                return Ok(Err(mismatch(&actual, &hash)));
            }
            dir.install_clean(key, &data).map(Ok)
        })
        .await
        .expect("download task panicked");
        Ok(installed)
    }

    /// A miss served from a local-directory store on the cache's file system, with room
    /// reserved for it: the clean cache file becomes a hard link to the object's file (no
    /// copy, no new inode), then its length and SHA-256 are checked like any download, and
    /// the link is removed again if they do not match. A change of the block later gets a
    /// file of its own first (invariant 11). `None` (and no reservation) if the store could
    /// not link it, or has no such object: the fetch says what is wrong.
    async fn link_download(
        &mut self,
        object: &blockcache_db::Object,
        hash: [u8; 32],
    ) -> Result<Option<Downloaded>> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        inner.make_room(object.length, 1).await?;
        let (dir, backend, id, len) = (
            inner.dir.clone(),
            inner.backend.clone(),
            object.id,
            object.length,
        );
        let started = std::time::Instant::now();
        let linked = tokio::task::spawn_blocking(move || {
            let path = dir.file(key, false);
            match backend.link_out(id, &path) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => return Some(Err(e)),
            }
            let checked = (|| -> Downloaded {
                let file = dir.open(key, false)?;
                let actual = file.metadata()?.len();
                if actual != len {
                    return Ok(Err(format!("{actual} bytes instead of {len}")));
                }
                let digest = files::hash_open(&file, len)?;
                if digest != hash {
                    return Ok(Err(mismatch(&digest, &hash)));
                }
                Ok(Ok(file))
            })();
            if !matches!(checked, Ok(Ok(_))) {
                let _ = std::fs::remove_file(&path);
            }
            Some(checked)
        })
        .await
        .expect("download task panicked");
        metrics::histogram!(
            "blockcache_download_duration_seconds",
            "outcome" => if matches!(linked, Some(Ok(Ok(_)))) { "ok" } else { "error" }
        )
        .record(started.elapsed().as_secs_f64());
        if linked.is_none() {
            let mut st = inner.lock_state();
            st.reserved_bytes -= len;
            st.reserved_slots -= 1;
        }
        Ok(linked)
    }

    /// Checks a clean file found at start-up against its mapping (length and SHA-256).
    /// A stale or damaged file is deleted and the block treated as a miss. Returns whether the
    /// file was kept.
    #[tracing::instrument(level = "debug", skip_all, fields(inode = self.key.inode, blockno = self.key.blockno))]
    async fn verify(&mut self) -> Result<bool> {
        let inner = Arc::clone(self.inner());
        let key = self.key;
        let size = inner.lock_state().entries[&key].size;
        let mapping = inner.db.mapping(key.inode, key.blockno).await?;
        let path = inner.dir.file(key, false);
        let ok = match mapping {
            Some(o) if o.length == size && o.hash.is_some() => {
                let expected = o.hash.expect("checked");
                let p = path.clone();
                tokio::task::spawn_blocking(move || {
                    files::hash_file(&p, size).map(|digest| digest == expected)
                })
                .await
                .expect("verify task panicked")
                .unwrap_or(false)
            }
            _ => false,
        };
        if ok {
            if let Some(e) = inner.lock_state().entries.get_mut(&key) {
                e.verified = true;
            }
            return Ok(true);
        }
        tracing::warn!(inode = key.inode, blockno = key.blockno, path = %path.display(), "cached block does not match its metadata; discarding it");
        inner.lock_state().remove(key);
        inner
            .dir
            .remove(key, false)
            .map_err(Error::io("delete stale cache file", path))?;
        Ok(false)
    }
}

impl Drop for BlockHandle {
    fn drop(&mut self) {
        if let Some(credit) = self.credit.take() {
            self.inner.dirty_budget.release(credit);
        }
    }
}
