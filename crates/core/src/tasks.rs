//! The background loops of an open cache: upload workers, the confirmer, the removal task,
//! the commit task, the unmark task, the metadata task and the store watch. Each runs until the engine's cancellation token
//! fires; the work itself is done by the engine's methods.

use std::sync::Arc;
use std::time::Duration;

use blockcache_backend::Backend;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engine::{
    Inner, LockMode, Removal, UploadJob, UploadOutcome, UploadSource, outcome_label,
    syncs_each_object,
};
use crate::error::UploadFailure;
use crate::pace::UploadPace;

/// Most objects deleted in one bulk request.
const REMOVAL_BATCH: usize = 1000;

/// Most upload outcomes recorded in one transaction.
const CONFIRM_BATCH: usize = 1024;

/// Starts every loop of `inner` on its tracker: `upload_tasks` workers over the shared job
/// queue, the confirmer, the removal task, the unmark task, the commit task and the store
/// watch. The commit
/// task stops with `intake` (shutdown stops new background commits before it flushes).
pub(crate) fn start(inner: &Arc<Inner>, queues: crate::engine::Queues, intake: CancellationToken) {
    let tracker = inner.tracker();
    let jobs = Arc::new(Mutex::new(queues.uploads));
    let pace = inner.pace().clone();
    for _ in 0..pace.ceiling() {
        tracker.spawn(upload_worker(
            jobs.clone(),
            pace.clone(),
            inner.backend().clone(),
            inner.cancel_token().child_token(),
        ));
    }
    tracker.spawn(removal_task(inner.clone(), queues.removals));
    tracker.spawn(confirm_task(inner.clone(), queues.confirmations));
    tracker.spawn(unmark_task(inner.clone()));
    tracker.spawn(commit_task(inner.clone(), intake.clone()));
    tracker.spawn(store_watch(inner.clone()));
    tracker.spawn(metadata_task(inner.clone(), intake));
    if let Some(lease) = inner.backend().lease().cloned() {
        tracker.spawn(lease.keep(inner.backend().clone(), inner.cancel_token().clone()));
    }
}

/// Ships the metadata while it changes: a round once changes have waited for
/// `metadata_interval` (flushes ship too). Stops with `intake`: shutdown's flush ships last.
async fn metadata_task(inner: Arc<Inner>, intake: CancellationToken) {
    let Some(interval) = inner.config().metadata_interval else {
        return;
    };
    let tick = (interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        tokio::select! {
            () = intake.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if !inner.backend().is_available() {
            continue;
        }
        match inner.ship_due(interval).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                tracing::warn!(error = %blockcache_backend::chain(&error), "cannot tell whether the metadata needs shipping");
                continue;
            }
        }
        if let Err(error) = inner.ship_metadata().await {
            inner.log_store_failure(
                &error,
                "shipping the metadata to the store failed; will retry",
            );
        }
    }
}

/// While the store counts as down, asks it whether it answers again each time a retry is
/// due, so that its return is noticed (and logged, and `store_up` set) even when no other
/// work reaches the store.
async fn store_watch(inner: Arc<Inner>) {
    let cancel = inner.cancel_token().clone();
    let backend = inner.backend().clone();
    let tick = backend.probe_interval().max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if !backend.is_up() && backend.is_available() {
            // The outcome is recorded by the backend; its failure is the outage, logged.
            let _ = backend.probe().await;
        }
    }
}

/// One upload worker: waits for its turn (`pace.rs`: how many uploads run at once adapts to
/// the store's latency), takes a job from the shared bounded queue and replies through the
/// job's oneshot. The workers share the queue (the replacement of S3QL's Distributor).
async fn upload_worker(
    jobs: Arc<Mutex<mpsc::Receiver<UploadJob>>>,
    pace: Arc<UploadPace>,
    backend: Backend,
    cancel: CancellationToken,
) {
    loop {
        let turn = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            turn = pace.turn() => turn,
        };
        let (job, backlog) = {
            let mut jobs = jobs.lock().await;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                job = jobs.recv() => (job, !jobs.is_empty()),
            }
        };
        let Some(job) = job else { return };
        let started = std::time::Instant::now();
        let len = job.source.len();
        let mut result = match job.source {
            UploadSource::Bytes(data) => backend
                .put(job.obj_id, data)
                .await
                .map_err(UploadFailure::from),
            UploadSource::Linked { len } => Ok(len),
            UploadSource::Unreadable { path, source, .. } => {
                Err(UploadFailure::Unreadable { path, source })
            }
        };
        if result.is_ok() && syncs_each_object(&backend, len) {
            // A large object in a local directory: fsync it here, in parallel with the other
            // uploads, so that the confirmer's barrier is a few directory fsyncs.
            if let Err(e) = backend.sync_object(job.obj_id).await {
                result = Err(UploadFailure::Store(e));
            }
        }
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!("blockcache_upload_duration_seconds", "outcome" => outcome_label(&result))
            .record(took);
        match &result {
            Ok(_) => pace.done(turn, len, took, backlog),
            // The store's failures, not the cache's (an unreadable file) nor the database's.
            Err(UploadFailure::Store(_) | UploadFailure::NotDurable(_)) => pace.failed(turn),
            Err(_) => pace.give_back(turn),
        }
        // The receiver is gone only if its recording task was cancelled; nothing to do then.
        let _ = job.reply.send(result);
    }
}

/// The removal task: drains its queue into batches and has the engine delete them. Failed
/// batches are retried with backoff; their pending deletions stay in the database meanwhile.
/// Deletions held back because the metadata in the store still names their objects wait for
/// a round of shipping (one is asked for at once) and are tried again after it.
async fn removal_task(inner: Arc<Inner>, mut queue: mpsc::Receiver<Removal>) {
    let cancel = inner.cancel_token().clone();
    let mut retry: Vec<Removal> = Vec::new();
    // Whether `retry` holds deletions tried again after a round of shipping.
    let mut after_ship = false;
    let mut failures = 0u32;
    let mut rounds = inner.ship_rounds();
    loop {
        let shipped_just_now = std::mem::take(&mut after_ship);
        let mut batch = std::mem::take(&mut retry);
        let mut from_held = shipped_just_now;
        if batch.is_empty() {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                id = queue.recv() => match id {
                    Some(id) => batch.push(id),
                    None => return,
                },
                changed = rounds.changed(), if inner.removals().has_held() => {
                    if changed.is_err() {
                        return;
                    }
                    batch = inner.removals().requeue();
                    from_held = true;
                }
            }
        }
        while batch.len() < REMOVAL_BATCH {
            match queue.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        match inner.delete_objects(&batch).await {
            Ok(kept) => {
                failures = 0;
                if kept.is_empty() {
                } else if !from_held && inner.ship_metadata().await.is_ok() {
                    // Ship what released them, then try them once more; what is still
                    // named then waits for the next round.
                    rounds.borrow_and_update();
                    retry = kept;
                    after_ship = true;
                } else {
                    inner.removals().hold(&kept);
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                inner.log_store_failure(
                    &error,
                    &format!(
                        "failed to delete {} objects from the store; will retry",
                        batch.len()
                    ),
                );
                retry = batch;
                after_ship = shipped_just_now;
                // No longer than the store's retry interval: its deletions follow soon after
                // it is back. A flush wakes this task at once.
                let delay = Duration::from_millis(100u64 << failures.min(8)).min(
                    inner
                        .backend()
                        .probe_interval()
                        .max(Duration::from_millis(100)),
                );
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                    () = inner.removal_retry().notified() => {}
                }
            }
        }
    }
}

/// The confirmer: records upload outcomes in batches (one transaction each), so the cost of a
/// durable commit is shared by every upload that finished meanwhile.
async fn confirm_task(inner: Arc<Inner>, mut queue: mpsc::Receiver<UploadOutcome>) {
    let cancel = inner.cancel_token().clone();
    loop {
        let first = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
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

/// The commit task: uploads blocks that have been dirty for longer than the upload delay
/// since their last write, and everything dirty while writers wait for the dirty budget.
///
/// Unlike S3QL's CommitTask it looks at every dirty block rather than stopping at the first
/// recent one in LRU order, so a dirty block that keeps being read is still uploaded.
async fn commit_task(inner: Arc<Inner>, intake: CancellationToken) {
    let delay = inner.config().upload_delay;
    let tick = delay
        .map(|d| (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = intake.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
            () = inner.pressure().notified() => {}
        }
        // While the store is down, dirty blocks wait for the next retry rather than being
        // hashed and committed again only to fail at once.
        if !inner.backend().is_available() {
            continue;
        }
        let keys = inner.commit_candidates(delay);
        if keys.is_empty() {
            continue;
        }
        match inner.commit_keys(keys, LockMode::Skip).await {
            Ok(_) => failures = 0,
            Err(error) => {
                failures = failures.saturating_add(1);
                inner.log_store_failure(&error, "background commit failed; will retry");
                tokio::select! {
                    () = intake.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100u64 << failures.min(6))) => {}
                }
            }
        }
    }
}

/// The unmark task: renames files of clean entries back to their clean names, in batches on
/// the blocking pool.
async fn unmark_task(inner: Arc<Inner>) {
    while let Some(batch) = inner.next_unmarks().await {
        let i = inner.clone();
        // A batch that did not run leaves dirty names, which cost a re-hash after a restart.
        let _ = tokio::task::spawn_blocking(move || i.unmark_batch(batch)).await;
    }
}
