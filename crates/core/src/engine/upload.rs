//! Uploads: the registry of objects being uploaded and the blocks waiting for them, the
//! hand-off of new objects to the upload workers (or their link into a local store), and the
//! confirmation of outcomes in batches.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockcache_backend::Backend;
use blockcache_db::SyncTicket;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::commit::Attempt;
use super::state::{Done, DoneTx};
use super::{Counters, Inner, per_core};
use crate::cache_dir;
use crate::error::UploadFailure;
use crate::keylock::KeyGuard;
use crate::{BlockKey, Error, Result};

/// Objects at least this large in a local-directory store are synced one by one by the
/// upload task that wrote them; smaller ones share one `syncfs` per confirmation batch.
const SYNC_EACH_OBJECT_MIN: u64 = 256 << 10;

/// Most objects, synced one by one, whose confirmation batch fsyncs their directories rather
/// than the whole file system.
const SYNC_DIRS_MAX: usize = 16;

/// Whether the upload task syncs an object of `len` bytes itself.
pub(crate) fn syncs_each_object(backend: &Backend, len: u64) -> bool {
    backend.is_local() && len >= SYNC_EACH_OBJECT_MIN
}

/// The `outcome` label of a store call's latency.
pub(crate) fn outcome_label<T, E>(result: &Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "error" }
}

/// A block waiting for the upload of an object.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) attempt: Attempt,
    /// The (unsynced) commit that pointed the block at its object.
    pub(super) ticket: SyncTicket,
}

/// An object whose upload is under way, and the blocks that wait for it.
#[derive(Debug)]
pub(crate) struct ObjUpload {
    done: DoneTx,
    pub(super) waiters: Vec<Waiter>,
}

impl ObjUpload {
    pub(super) fn new(first: Waiter) -> Self {
        Self {
            done: watch::channel(None).0,
            waiters: vec![first],
        }
    }
}

/// A new object's block, still locked, on its way to becoming an upload source.
pub(super) struct UploadFrom {
    pub(super) obj_id: u64,
    pub(super) key: BlockKey,
    pub(super) path: PathBuf,
    pub(super) len: u64,
    /// The bytes, if the commit kept them.
    pub(super) data: Option<Vec<u8>>,
    pub(super) guard: KeyGuard,
}

/// One upload handed to the upload tasks.
#[derive(Debug)]
pub(crate) struct UploadJob {
    pub(crate) obj_id: u64,
    pub(crate) source: UploadSource,
    pub(crate) reply: oneshot::Sender<Result<u64, UploadFailure>>,
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
        /// The cache file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
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
    result: Result<u64, UploadFailure>,
}

/// Waits for a completion.
pub(super) async fn wait_done(mut done: Done) -> Result<()> {
    match done.wait_for(Option::is_some).await {
        Ok(v) => v.clone().expect("checked by wait_for"),
        Err(_) => Err(Error::ShuttingDown),
    }
}

impl Inner {
    /// The completion of an upload of object `obj_id` under way, if any.
    pub(crate) fn upload_of(&self, obj_id: u64) -> Option<Done> {
        self.uploads
            .lock()
            .expect("uploads mutex poisoned")
            .get(&obj_id)
            .map(|u| u.done.subscribe())
    }

    /// Turns new objects into upload sources. In a local-directory store on the cache's file
    /// system, each object becomes a hard link to its block's cache file, made while the
    /// block is still locked (so the file holds exactly the hashed bytes): no copy, and the
    /// bytes are written to the disk once. A later change of the block first replaces its
    /// cache file with a copy (`BlockHandle::apply`). Blocks that cannot be linked are
    /// uploaded from their bytes. The block locks are released here.
    pub(super) async fn link_objects(
        &self,
        jobs: Vec<UploadFrom>,
    ) -> Vec<(u64, BlockKey, UploadSource)> {
        if !self.backend.can_link() && jobs.iter().all(|j| j.data.is_some()) {
            return jobs
                .into_iter()
                .map(|j| {
                    let data = j.data.unwrap_or_default();
                    (j.obj_id, j.key, UploadSource::Bytes(Bytes::from(data)))
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
    pub(super) async fn start_upload(
        self: &Arc<Self>,
        obj_id: u64,
        key: BlockKey,
        source: UploadSource,
    ) {
        self.uploads_in_flight.fetch_add(1, Ordering::SeqCst);
        let len = source.len();
        if matches!(source, UploadSource::Linked { .. }) && !syncs_each_object(&self.backend, len) {
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
            let cancelled = || UploadFailure::Store(blockcache_backend::Error::Cancelled);
            let result = if sent {
                rx.await.unwrap_or_else(|_| Err(cancelled()))
            } else {
                Err(cancelled())
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
        if ok.len() <= SYNC_DIRS_MAX && ok.iter().all(|o| syncs_each_object(&self.backend, o.len)) {
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
            let e = Arc::new(e);
            tracing::warn!(error = %blockcache_backend::chain(&*e), "store not durable; the blocks stay dirty and are uploaded again");
            for o in &mut outcomes {
                if o.result.is_ok() {
                    o.result = Err(UploadFailure::NotDurable(Arc::clone(&e)));
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
                (Err(e), _) => Some(e),
            };
            let result = match failure {
                None => {
                    Counters::add(&self.counters.uploads, 1);
                    Counters::add(&self.counters.upload_bytes, len);
                    Ok(())
                }
                Some(failure) => {
                    Counters::add(&self.counters.upload_errors, 1);
                    let error = Error::Upload {
                        obj_id,
                        inode: key.inode,
                        blockno: key.blockno,
                        source: Arc::new(failure),
                    };
                    if !error.is_cancelled() {
                        self.log_store_failure(
                            &error,
                            "upload failed; the data stays dirty in the cache",
                        );
                    }
                    Err(error)
                }
            };
            if let Some(upload) = upload {
                for w in upload.waiters {
                    // The confirmation's commit was synchronized, after the block's own.
                    debug_assert!(result.is_err() || self.db.is_durable(w.ticket));
                    self.finish_block(&w.attempt, result.clone());
                }
                upload.done.send_replace(Some(result));
            }
        }
        self.progress.notify_waiters();
    }
}

/// Links a chunk of new objects into the store (see `Inner::link_objects`), releasing each
/// block's lock once its object is settled. Blocking.
fn link_chunk(backend: &Backend, jobs: Vec<UploadFrom>) -> Vec<(u64, BlockKey, UploadSource)> {
    jobs.into_iter()
        .map(|job| {
            let UploadFrom {
                obj_id,
                key,
                path,
                len,
                data,
                guard,
            } = job;
            let started = std::time::Instant::now();
            let source = match backend.link_object(obj_id, &path) {
                Some(linked) if linked == len => {
                    // The link is the whole upload of an object that no upload task syncs.
                    if !syncs_each_object(backend, len) {
                        metrics::histogram!("blockcache_upload_duration_seconds", "outcome" => "ok")
                            .record(started.elapsed().as_secs_f64());
                    }
                    UploadSource::Linked { len }
                }
                // Not linked: upload the bytes, read now if they were not kept
                // (the block is still locked, so they are the hashed ones).
                _ => match data.map_or_else(|| cache_dir::read_whole(&path, len), Ok) {
                    Ok(data) => UploadSource::Bytes(Bytes::from(data)),
                    Err(source) => UploadSource::Unreadable { len, path, source },
                },
            };
            drop(guard);
            (obj_id, key, source)
        })
        .collect()
}
