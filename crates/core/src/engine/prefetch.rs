//! Readahead's engine side: [`Inner::prefetch`] downloads a block into the cache in the
//! background, so that a sequential reader finds it there. The readers decide what to fetch
//! (`namespace/reader.rs`); this bounds how many downloads that may start.

use std::sync::Arc;

use super::handle::Intent;
use super::{Access, Inner};
use crate::BlockKey;

/// Prefetches in flight at most, over all readers: enough to fill a link of several hundred
/// MiB/s at a 100 ms round trip with 1 MiB blocks.
pub(crate) const PREFETCH_SLOTS: usize = 128;

impl Inner {
    /// Whether block `key` is cached and checked (a read of it waits for nothing).
    pub(crate) fn is_cached(&self, key: BlockKey) -> bool {
        self.lock_state().get(key).is_some_and(|c| c.verified)
    }

    /// Starts loading block `key` into the cache in the background, unless it is cached or
    /// a prefetch is loading it already. False when [`PREFETCH_SLOTS`] are all taken (nothing
    /// was started): the caller may ask again later. A failed prefetch is only logged: the
    /// read that needs the block meets the failure itself.
    pub(crate) fn prefetch(self: &Arc<Self>, key: BlockKey) -> bool {
        if self.is_cached(key) || self.prefetching().contains(&key) {
            return true;
        }
        let Ok(slot) = Arc::clone(&self.prefetch_slots).try_acquire_owned() else {
            return false;
        };
        if !self.prefetching().insert(key) {
            // Another caller started it meanwhile.
            return true;
        }
        let loading = Loading {
            inner: Arc::clone(self),
            key,
        };
        super::Counters::add(&self.counters.prefetches, 1);
        let inner = Arc::clone(self);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let _slot = slot;
            let _loading = loading;
            let load = async {
                let mut handle = inner.handle(key, Access::Read).await?;
                handle.ensure(Intent::Read).await
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => {}
                loaded = load => {
                    if let Err(e) = loaded {
                        tracing::debug!(inode = key.inode, blockno = key.blockno, error = %e, "prefetch failed");
                    }
                }
            }
        });
        true
    }

    fn prefetching(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<BlockKey>> {
        self.prefetching.lock().expect("prefetching poisoned")
    }
}

/// A block in [`Inner::prefetching`] while its prefetch runs, however it ends.
struct Loading {
    inner: Arc<Inner>,
    key: BlockKey,
}

impl Drop for Loading {
    fn drop(&mut self) {
        self.inner.prefetching().remove(&self.key);
    }
}
