//! Settling commits: a block becomes clean (or stays dirty) when its commit is done, and
//! the files of clean blocks get their clean names back, in batches (the unmark queue).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use super::Inner;
use super::commit::Attempt;
use crate::cache_dir::Marker;
use crate::{BlockKey, Result};

/// Clean entries whose files still carry the dirty marker, for the unmark task. At most one
/// item per confirmed commit, drained in batches; leaving a marker is harmless (recovery
/// would re-hash the block and find it clean).
#[derive(Debug, Default)]
pub(super) struct Unmarks {
    queue: Mutex<Vec<(BlockKey, u64)>>,
    wake: Notify,
    /// Items queued and not yet done, and the wakeup when that drops.
    pending: AtomicU64,
    done: Notify,
}

impl Inner {
    /// Settles a commit: clean on success, still dirty on failure. Late results for a
    /// removed or re-created entry change nothing.
    pub(super) fn finish_block(&self, attempt: &Attempt, result: Result<()>) {
        let Attempt {
            key,
            entry_id,
            generation,
            ref done,
        } = *attempt;
        // The file's stamp as it is made clean: from here, a change of it through the file
        // system makes the next read check the block again (one `stat`, before the state's
        // lock: a change between the two leaves a stamp that does not match, so a check).
        let stamp = result.as_ref().ok().and_then(|()| self.dir.stamp(key));
        let became_clean = {
            let mut st = self.lock_state();
            match &result {
                Ok(()) => st.confirm(key, entry_id, generation, stamp),
                Err(_) => {
                    st.fail(key, entry_id, generation);
                    None
                }
            }
        };
        if let Some(freed) = became_clean {
            self.budget.release(freed);
            // The rename back to the clean name is a file-system call: the unmark task does
            // it in batches on the blocking pool, off this path. Queued (and counted) before
            // `done` fires, so whoever acts on `done` can wait for it.
            self.unmarks
                .queue
                .lock()
                .expect("unmark queue poisoned")
                .push((key, entry_id));
            self.unmarks.pending.fetch_add(1, Ordering::SeqCst);
            self.unmarks.wake.notify_one();
        }
        done.send_replace(Some(result));
        self.progress.notify_waiters();
    }

    /// Waits until the unmark task has done everything queued (or the engine stops).
    pub(crate) async fn wait_unmarked(&self) {
        loop {
            let done = self.unmarks.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.unmarks.pending.load(Ordering::SeqCst) == 0 || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = done => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// For the unmark task: waits for queued items (or cancellation) and takes them all.
    pub(crate) async fn next_unmarks(&self) -> Option<Vec<(BlockKey, u64)>> {
        loop {
            let batch =
                std::mem::take(&mut *self.unmarks.queue.lock().expect("unmark queue poisoned"));
            if !batch.is_empty() {
                return Some(batch);
            }
            tokio::select! {
                () = self.cancel.cancelled() => return None,
                () = self.unmarks.wake.notified() => {}
            }
        }
    }

    /// For the unmark task: renames the files of a batch (blocking), then counts it done.
    pub(crate) fn unmark_batch(&self, batch: Vec<(BlockKey, u64)>) {
        let n = batch.len() as u64;
        for (key, id) in batch {
            self.unmark(key, id);
        }
        self.unmarks.pending.fetch_sub(n, Ordering::SeqCst);
        self.unmarks.done.notify_waiters();
    }

    /// Renames the files of every clean entry that still carries the dirty marker (at
    /// shutdown, so the next open does not re-hash them).
    pub(crate) fn unmark_all(&self) {
        let marked = self.lock_state().marked_clean();
        for (key, id) in marked {
            self.unmark(key, id);
        }
    }

    /// Renames the file of a clean entry back to its clean name, if its block is not in use.
    fn unmark(&self, key: BlockKey, entry_id: u64) {
        let Some(_guard) = self.locks.try_lock(key) else {
            return;
        };
        if !self.lock_state().is_marked_clean(key, entry_id) {
            return;
        }
        match self.dir.set_marker(key, Marker::Clean) {
            Ok(()) => self.lock_state().set_marker(key, Marker::Clean),
            Err(error) => {
                tracing::warn!(%error, inode = key.inode, blockno = key.blockno, "failed to drop a dirty marker")
            }
        }
    }
}
