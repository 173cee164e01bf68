//! Making room: reservations of cache room, and eviction of clean least-recently-used
//! entries (dirty ones are committed and uploaded first, never dropped).

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use super::commit::LockMode;
use super::state::State;
use super::upload::wait_done;
use crate::{Error, Result};

/// Cache room (bytes and entry slots) promised to one operation about to grow the cache.
/// It becomes an entry's size with [`Reservation::settle`], in the critical section that
/// changes the entry; dropped unsettled (an error, a cancelled call) it is given back.
#[derive(Debug)]
#[must_use]
pub(crate) struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
    slots: u64,
}

impl Reservation {
    /// Hands the room over to the entry being changed under the same lock `st`.
    pub(crate) fn settle(mut self, st: &mut State) {
        st.unreserve(self.bytes, self.slots);
        self.bytes = 0;
        self.slots = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes != 0 || self.slots != 0 {
            self.inner.lock_state().unreserve(self.bytes, self.slots);
            self.inner.progress.notify_waiters();
        }
    }
}

/// Whether `result` failed because a file system is full.
pub(crate) fn is_full<T>(result: &std::io::Result<T>) -> bool {
    matches!(result, Err(e) if e.kind() == std::io::ErrorKind::StorageFull)
}

impl Inner {
    /// The cache's file system is full (`ENOSPC`) though the cache is within its limits
    /// (the disk is shared, or smaller than the limits): evicts clean, idle blocks, oldest
    /// first, until `bytes` (at least one block) are freed, so the caller can try once more.
    /// Returns whether anything was evicted. Dirty blocks are never dropped; a clean file
    /// that is also a store object (a hard link) frees nothing.
    pub(crate) fn free_space(self: &Arc<Self>, bytes: u64) -> bool {
        let bytes = bytes.max(self.config.block_size);
        let taken = self
            .lock_state()
            .take_clean(bytes, |key| self.locks.try_lock(key));
        if taken.is_empty() {
            return false;
        }
        tracing::warn!(
            blocks = taken.len(),
            path = %self.dir.path().display(),
            "the cache's file system is full; evicting clean blocks to make room"
        );
        for (key, marker, guard) in taken {
            if let Err(error) = self.dir.remove(key, marker) {
                tracing::warn!(%error, inode = key.inode, blockno = key.blockno, "failed to delete an evicted cache file");
            }
            drop(guard);
        }
        self.progress.notify_waiters();
        true
    }

    /// Reserves `bytes` and `slots` if they fit now.
    fn try_room(self: &Arc<Self>, bytes: u64, slots: u64) -> Option<Reservation> {
        let fits = self.lock_state().try_reserve(bytes, slots);
        fits.then(|| self.reservation(bytes, slots))
    }

    /// The guard of `bytes` and `slots` just reserved.
    fn reservation(self: &Arc<Self>, bytes: u64, slots: u64) -> Reservation {
        Reservation {
            inner: Arc::clone(self),
            bytes,
            slots,
        }
    }

    /// Waits until `bytes` and `slots` fit within the limits and reserves them, evicting
    /// clean least-recently-used entries and uploading dirty ones as needed. Reads of cached
    /// blocks never come here.
    pub(crate) async fn make_room(self: &Arc<Self>, bytes: u64, slots: u64) -> Result<Reservation> {
        let mut failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            if let Some(room) = self.try_room(bytes, slots) {
                return Ok(room);
            }
            // No room without evicting. The unmark task briefly locks clean blocks; let it
            // finish so that eviction does not skip them and pick (and upload) other blocks
            // instead. (Only here: a writer with room does not wait for it.)
            self.wait_unmarked().await;
            let progress = self.progress.notified();
            let released = self.locks.released().notified();
            tokio::pin!(progress, released);
            progress.as_mut().enable();
            released.as_mut().enable();
            let plan = {
                let mut st = self.lock_state();
                if st.try_reserve(bytes, slots) {
                    return Ok(self.reservation(bytes, slots));
                }
                st.plan_eviction(bytes, slots, |key| self.locks.try_lock(key))
            };
            if !plan.evicted.is_empty() {
                for (key, marker, guard) in plan.evicted {
                    if let Err(error) = self.dir.remove(key, marker) {
                        tracing::warn!(%error, inode = key.inode, blockno = key.blockno, "failed to delete an evicted cache file");
                    }
                    drop(guard);
                }
                continue;
            }
            let mut waits = plan.wait;
            if !plan.commit.is_empty() {
                waits.extend(self.commit_keys(plan.commit, LockMode::Skip).await?);
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
                futures::future::join_all(waits.into_iter().map(|p| wait_done(p.done))).await;
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
}
