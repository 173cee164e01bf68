//! The commit pipeline: lock dirty blocks, read and hash them, and record each batch in one
//! transaction that decides dedup; new objects go on to `upload`.

use std::path::PathBuf;
use std::sync::Arc;

use blockcache_db::{CommitRequest, ObjectState, Outcome};
use sha2::{Digest, Sha256};

use super::state::{DoneTx, Pending, StartCommit, Started};
use super::upload::{ObjUpload, UploadFrom, Waiter};
use super::{Counters, Inner, detached, per_core};
use crate::cache_dir::{self, Marker};
use crate::error::UploadFailure;
use crate::keylock::KeyGuard;
use crate::{BlockKey, Error, Result};

/// Most blocks, and most bytes, read into memory by one commit batch (two batches are in
/// memory at a time: one being hashed, one being recorded and handed to the uploaders).
const BATCH_BLOCKS: usize = 1024;
const BATCH_BYTES: u64 = 4 << 20;
/// Most bytes of one commit batch when the store links objects to cache files: the bytes are
/// hashed through a small buffer and not kept, so a batch costs no memory of its size, and
/// fewer, larger batches share the database transactions and syncs among more blocks.
const LINKED_BATCH_BYTES: u64 = 64 << 20;

/// Whether commit waits for busy block locks or skips those blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Wait,
    Skip,
}

/// A locked dirty block, marked in flight, about to be read for a commit.
struct Locked {
    key: BlockKey,
    started: Started,
    guard: KeyGuard,
}

/// The identity of one commit of one block: which generation of which entry, and the
/// completion its waiters watch.
#[derive(Debug)]
pub(super) struct Attempt {
    pub(super) key: BlockKey,
    pub(super) entry_id: u64,
    pub(super) generation: u64,
    pub(super) done: DoneTx,
}

/// A block read and hashed for a commit, still locked.
struct Snapshot {
    attempt: Attempt,
    guard: KeyGuard,
    /// The cache file the data was read from (still locked, so unchanged).
    path: PathBuf,
    len: u64,
    /// The bytes, kept only when they may be uploaded as bytes (not linked).
    data: Option<Vec<u8>>,
    hash: [u8; 32],
}

impl Inner {
    /// Commits `keys`: snapshot and hash each dirty block, decide dedup in one transaction per
    /// batch, and hand new objects to the upload tasks. Returns, for every block that is now
    /// being uploaded (by this call or an earlier one), its generation and completion.
    ///
    /// Runs as a task of the engine: a caller that gives up does not stop it half-way (blocks
    /// marked in flight and never settled, objects registered and never uploaded).
    pub(crate) async fn commit_keys(
        self: &Arc<Self>,
        keys: Vec<BlockKey>,
        mode: LockMode,
    ) -> Result<Vec<Pending>> {
        let inner = Arc::clone(self);
        detached(self, async move { inner.run_commit(keys, mode).await }).await
    }

    async fn run_commit(
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
                        for s in next.into_iter().flatten() {
                            self.finish_block(&s.attempt, Err(error.clone()));
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
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let max_bytes = if self.backend.can_link() {
            LINKED_BATCH_BYTES
        } else {
            BATCH_BYTES
        };
        while let Some((&key, tail)) = rest.split_first() {
            if batch.len() >= BATCH_BLOCKS || batch_bytes >= max_bytes {
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
            let started = self.lock_state().start_commit(key);
            match started {
                StartCommit::Nothing => {}
                StartCommit::InFlight(p) => pending.push(p),
                StartCommit::Started(started, p) => {
                    pending.push(p);
                    batch_bytes += started.size;
                    batch.push(Locked {
                        key,
                        started,
                        guard,
                    });
                }
            }
        }
        batch
    }

    /// Reads and hashes one batch of locked dirty blocks. Blocks that cannot be read are
    /// settled with the error and left out.
    #[tracing::instrument(level = "debug", skip_all, fields(blocks = locked.len()))]
    async fn read_batch(&self, locked: Vec<Locked>) -> Vec<Snapshot> {
        // Read and hash the blocks on the blocking pool: a few tasks per batch (one per core),
        // not one per block, so small blocks do not pay a hand-off each.
        let chunks = per_core(locked);
        // A store that links objects to cache files needs only the hash, not the bytes.
        let keep_data = !self.backend.can_link();
        let reads = chunks.into_iter().map(|chunk| {
            let dir = self.dir.clone();
            async move {
                let (keep, io): (Vec<_>, Vec<_>) = chunk
                    .into_iter()
                    .map(|l| {
                        let Locked {
                            key,
                            started,
                            guard,
                        } = l;
                        let path = dir.file(key, started.marker);
                        let io = (path, started.size, started.prehash);
                        let attempt = Attempt {
                            key,
                            entry_id: started.entry_id,
                            generation: started.generation,
                            done: started.done,
                        };
                        ((attempt, guard), io)
                    })
                    .unzip();
                let read = tokio::task::spawn_blocking(move || {
                    io.into_iter()
                        .map(|(path, size, prehash)| {
                            if keep_data {
                                let data = cache_dir::read_whole(&path, size)?;
                                let hash = prehash.unwrap_or_else(|| Sha256::digest(&data).into());
                                Ok::<_, std::io::Error>((path, size, Some(data), hash))
                            } else {
                                let hash = match prehash {
                                    Some(hash) => hash,
                                    None => cache_dir::hash_file(&path, size)?,
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
        for ((attempt, guard), read) in futures::future::join_all(reads).await.into_iter().flatten()
        {
            match read {
                Ok((path, len, data, hash)) => snaps.push(Snapshot {
                    attempt,
                    guard,
                    path,
                    len,
                    data,
                    hash,
                }),
                Err(source) => {
                    let error = Error::Io {
                        action: "read cache file",
                        path: self.dir.file(attempt.key, Marker::Dirty),
                        source: Arc::new(source),
                    };
                    tracing::error!(%error, inode = attempt.key.inode, blockno = attempt.key.blockno, "failed to commit a block");
                    self.finish_block(&attempt, Err(error));
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
    /// content is already in the store) is settled only after `Db::sync_through`; released
    /// objects are deleted by the removal task only after it synced the database.
    #[tracing::instrument(level = "debug", skip_all, fields(blocks = snaps.len()))]
    async fn record_batch(self: &Arc<Self>, snaps: Vec<Snapshot>) -> Result<()> {
        if snaps.is_empty() {
            return Ok(());
        }
        let requests: Vec<CommitRequest> = snaps
            .iter()
            .map(|s| CommitRequest {
                inode: s.attempt.key.inode,
                blockno: s.attempt.key.blockno,
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
                        self.finish_block(&s.attempt, Err(error.clone()));
                    }
                    return Err(error);
                }
            };
            let mut uploads = self.uploads.lock().expect("uploads mutex poisoned");
            for (snap, committed) in snaps.into_iter().zip(results) {
                released.extend(committed.released);
                let Snapshot {
                    attempt,
                    guard,
                    path,
                    len,
                    data,
                    ..
                } = snap;
                let key = attempt.key;
                let waiter = Waiter { attempt, ticket };
                let (obj_id, state, created) = match committed.outcome {
                    Outcome::Created { obj_id } => (obj_id, ObjectState::Uploading, true),
                    Outcome::Linked { obj_id, state } | Outcome::Unchanged { obj_id, state } => {
                        Counters::add(&self.counters.dedup_hits, 1);
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
                            source: Arc::new(UploadFailure::SharedObjectFailed),
                        },
                    )),
                    ObjectState::Uploading => match uploads.get_mut(&obj_id) {
                        // Dedup against an object still being uploaded: the block stays dirty
                        // until that upload succeeds.
                        Some(upload) if !created => upload.waiters.push(waiter),
                        _ => {
                            // A new object, or one registered before a crash whose upload
                            // nobody runs now: upload it from this block's content.
                            uploads.insert(obj_id, ObjUpload::new(waiter));
                            // Still locked: the file may become the store's object.
                            jobs.push(UploadFrom {
                                obj_id,
                                key,
                                path,
                                len,
                                data,
                                guard,
                            });
                            continue;
                        }
                    },
                }
                drop(guard);
            }
            ticket
        };
        for (w, error) in failed {
            self.finish_block(&w.attempt, Err(error));
        }
        if !clean.is_empty() {
            // Clean at once, but not before the commit is durable: after a power loss the
            // block's file, renamed clean, would otherwise not match its (older) mapping.
            let inner = Arc::clone(self);
            let busy = self.busy();
            self.tracker.spawn(async move {
                let _busy = busy;
                let synced = inner.db.sync_through(ticket).await.map_err(Error::from);
                for w in clean {
                    debug_assert!(synced.is_err() || inner.db.is_durable(w.ticket));
                    inner.finish_block(&w.attempt, synced.clone());
                }
            });
        }
        for (obj_id, key, source) in self.link_objects(jobs).await {
            self.start_upload(obj_id, key, source).await;
        }
        self.queue_removals(released).await;
        Ok(())
    }
}
