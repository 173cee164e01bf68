//! Background tasks: upload workers, the batching removal task and the commit task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use blockcache_backend::Backend;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engine::{Inner, LockMode, UploadJob, UploadOutcome, UploadSource, wait_done};

/// Most objects deleted in one bulk request.
const REMOVAL_BATCH: usize = 1000;

/// Most upload outcomes recorded in one transaction.
const CONFIRM_BATCH: usize = 1024;

/// One upload worker: takes jobs from the shared bounded queue and replies through each
/// job's oneshot. Shared by `upload_tasks` workers (the replacement of S3QL's Distributor).
pub(crate) async fn upload_worker(
    jobs: Arc<Mutex<mpsc::Receiver<UploadJob>>>,
    backend: Backend,
    cancel: CancellationToken,
) {
    loop {
        let job = {
            let mut jobs = jobs.lock().await;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                job = jobs.recv() => job,
            }
        };
        let Some(job) = job else { return };
        let started = std::time::Instant::now();
        let len = job.source.len();
        let mut result = match job.source {
            UploadSource::Bytes(data) => backend.put(job.obj_id, data).await,
            UploadSource::Linked { len } => Ok(len),
            UploadSource::Unreadable { reason, .. } => {
                Err(blockcache_backend::Error::Source { reason })
            }
        };
        if result.is_ok() && syncs_each_object(&backend, len) {
            // A large object in a local directory: fsync it here, in parallel with the other
            // uploads, so that the confirmer's barrier is a few directory fsyncs.
            if let Err(e) = backend.sync_object(job.obj_id).await {
                result = Err(e);
            }
        }
        metrics::histogram!("blockcache_upload_duration_seconds", "outcome" => outcome(&result))
            .record(started.elapsed().as_secs_f64());
        // The receiver is gone only if its recording task was cancelled; nothing to do then.
        let _ = job.reply.send(result);
    }
}

/// Objects at least this large in a local-directory store are synced one by one by the
/// upload task that wrote them; smaller ones share one `syncfs` per confirmation batch.
pub(crate) const SYNC_EACH_OBJECT_MIN: u64 = 256 << 10;

/// Most objects, synced one by one, whose confirmation batch fsyncs their directories rather
/// than the whole file system.
pub(crate) const SYNC_DIRS_MAX: usize = 16;

/// Whether the upload task syncs an object of `len` bytes itself.
pub(crate) fn syncs_each_object(backend: &Backend, len: u64) -> bool {
    backend.is_local() && len >= SYNC_EACH_OBJECT_MIN
}

/// The removal task: drains its queue into batches, waits for uploads of those objects still
/// under way, deletes them in bulk, then forgets their pending deletions. Failed batches are
/// retried with backoff; their pending deletions stay in the database meanwhile.
pub(crate) async fn removal_task(inner: Arc<Inner>, mut queue: mpsc::Receiver<u64>) {
    let mut retry: Vec<u64> = Vec::new();
    let mut failures = 0u32;
    loop {
        let mut batch = std::mem::take(&mut retry);
        if batch.is_empty() {
            tokio::select! {
                biased;
                () = inner.cancel.cancelled() => return,
                id = queue.recv() => match id {
                    Some(id) => batch.push(id),
                    None => return,
                },
            }
        }
        while batch.len() < REMOVAL_BATCH {
            match queue.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        batch.sort_unstable();
        batch.dedup();
        // An object released while its upload runs must not be deleted before the upload
        // ends, or the upload would recreate it.
        for &id in &batch {
            if let Some(done) = inner.upload_of(id) {
                let _ = wait_done(done).await;
            }
        }
        // The release of an object may be a block commit that is not durable yet: after a
        // power loss the block would point to the object again, so the object stays in the
        // store until its release is durable.
        let result = match inner.db.sync_all().await {
            Err(e) => Err(format!(
                "syncing the database before the deletion failed: {e}"
            )),
            Ok(()) => {
                let started = std::time::Instant::now();
                let deleted = inner.backend.delete_many(&batch).await;
                metrics::histogram!("blockcache_delete_duration_seconds", "outcome" => outcome(&deleted))
                    .record(started.elapsed().as_secs_f64());
                match deleted {
                    Ok(()) => inner
                        .db
                        .finish_deletions(&batch)
                        .await
                        .map_err(|e| format!("recording the deletions failed: {e}")),
                    Err(e) => Err(match std::error::Error::source(&e) {
                        Some(source) => format!("{e}: {source}"),
                        None => e.to_string(),
                    }),
                }
            }
        };
        match result {
            Ok(()) => {
                failures = 0;
                inner
                    .counters
                    .deletes
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                inner
                    .pending_removals
                    .fetch_sub(batch.len() as u64, Ordering::SeqCst);
                inner.progress.notify_waiters();
            }
            Err(error) => {
                inner.counters.delete_errors.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                tracing::warn!(objects = batch.len(), %error, "failed to delete objects from the store; will retry");
                retry = batch;
                let delay = Duration::from_millis(100u64 << failures.min(8));
                tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The confirmer: records upload outcomes in batches (one transaction each), so the cost of a
/// durable commit is shared by every upload that finished meanwhile.
pub(crate) async fn confirm_task(inner: Arc<Inner>, mut queue: mpsc::Receiver<UploadOutcome>) {
    loop {
        let first = tokio::select! {
            biased;
            () = inner.cancel.cancelled() => None,
            outcome = queue.recv() => outcome,
        };
        let Some(first) = first else {
            // Stopping: record what is already queued, then refuse more (senders record
            // their outcome themselves once this receiver is gone).
            queue.close();
            let mut rest = Vec::new();
            while let Ok(o) = queue.try_recv() {
                rest.push(o);
            }
            if !rest.is_empty() {
                inner.finish_uploads(rest).await;
            }
            return;
        };
        let mut batch = vec![first];
        while batch.len() < CONFIRM_BATCH {
            match queue.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        inner.finish_uploads(batch).await;
    }
}

/// The commit task: uploads blocks that have been dirty for longer than the commit delay
/// since their last write, and everything dirty while writers wait for the dirty budget.
///
/// Unlike S3QL's CommitTask it looks at every dirty block rather than stopping at the first
/// recent one in LRU order, so a dirty block that keeps being read is still uploaded.
pub(crate) async fn commit_task(inner: Arc<Inner>, intake: CancellationToken) {
    let delay = inner.config.commit_delay;
    let tick = delay
        .map(|d| (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = intake.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
            () = inner.pressure.notified() => {}
        }
        let pressure = inner.dirty_budget.under_pressure();
        let now = Instant::now();
        let keys: Vec<_> = {
            let st = inner.lock_state();
            st.dirty
                .iter()
                .map(|(_, k)| (k, &st.entries[k]))
                .filter(|(_, e)| e.inflight.is_none())
                .filter(|(_, e)| {
                    pressure || delay.is_some_and(|d| now.duration_since(e.last_write) >= d)
                })
                .map(|(k, _)| *k)
                .collect()
        };
        if keys.is_empty() {
            continue;
        }
        match inner.commit_keys(keys, LockMode::Skip).await {
            Ok(_) => failures = 0,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "background commit failed; will retry");
                tokio::select! {
                    () = intake.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100u64 << failures.min(6))) => {}
                }
            }
        }
    }
}

/// The `outcome` label of a store call's latency.
pub(crate) fn outcome<T, E>(result: &Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "error" }
}

/// The unmark task: renames files of clean entries back to their clean names, in batches on
/// the blocking pool (see `Inner::unmark`).
pub(crate) async fn unmark_task(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        let batch = std::mem::take(&mut *inner.unmark_queue.lock().expect("unmark queue poisoned"));
        if batch.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = inner.unmark_wake.notified() => continue,
            }
        }
        let n = batch.len() as u64;
        let i = inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (key, id) in batch {
                i.unmark(key, id);
            }
        })
        .await;
        inner.unmark_pending.fetch_sub(n, Ordering::SeqCst);
        inner.unmark_done.notify_waiters();
    }
}
