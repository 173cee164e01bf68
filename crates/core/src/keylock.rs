//! Per-block async locks with owned guards (the replacement of S3QL's MultiLock).
//!
//! A lock exists in the map only while someone holds or waits for it: the guard removes the
//! entry on drop when nobody else has a reference. Guards are owned (`'static`), so they can
//! move into another task. Releasing a guard wakes everyone waiting for cache progress
//! (eviction retries when a locked entry becomes free).

use std::hash::Hash;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use crate::BlockKey;

/// The set of per-key locks (blocks by default; the namespace locks file names).
#[derive(Debug)]
pub(crate) struct KeyedLocks<K: Eq + Hash + Clone = BlockKey> {
    map: DashMap<K, Arc<Mutex<()>>>,
    released: Notify,
}

impl<K: Eq + Hash + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self {
            map: DashMap::new(),
            released: Notify::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    /// Waits for the lock of `key`.
    pub(crate) async fn lock(self: &Arc<Self>, key: K) -> KeyGuard<K> {
        let mutex = self.map.entry(key.clone()).or_default().clone();
        let guard = mutex.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            key,
            locks: Arc::clone(self),
        }
    }

    /// Takes the lock of `key` if nobody holds it.
    pub(crate) fn try_lock(self: &Arc<Self>, key: K) -> Option<KeyGuard<K>> {
        let mutex = self.map.entry(key.clone()).or_default().clone();
        let guard = mutex.try_lock_owned().ok()?;
        Some(KeyGuard {
            guard: Some(guard),
            key,
            locks: Arc::clone(self),
        })
    }

    /// The keys held or waited for now.
    pub(crate) fn keys(&self) -> Vec<K> {
        self.map.iter().map(|e| e.key().clone()).collect()
    }

    /// How many keys are held or waited for.
    pub(crate) fn held(&self) -> usize {
        self.map.len()
    }

    /// Notified whenever any guard is released.
    pub(crate) fn released(&self) -> &Notify {
        &self.released
    }
}

/// Exclusive ownership of one key.
#[derive(Debug)]
pub(crate) struct KeyGuard<K: Eq + Hash + Clone = BlockKey> {
    guard: Option<OwnedMutexGuard<()>>,
    key: K,
    locks: Arc<KeyedLocks<K>>,
}

impl<K: Eq + Hash + Clone> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map holds the mutex now if the count is 1: nobody holds or waits for it.
        self.locks
            .map
            .remove_if(&self.key, |_, mutex| Arc::strong_count(mutex) == 1);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exclusive_and_cleaned_up() {
        let locks: Arc<KeyedLocks> = Arc::new(KeyedLocks::default());
        let key = BlockKey::new(1, 2);
        let g = locks.lock(key).await;
        assert!(locks.try_lock(key).is_none());
        assert!(locks.try_lock(BlockKey::new(1, 3)).is_some());
        drop(g);
        assert!(locks.map.is_empty());
        let g = locks.try_lock(key).expect("free again");
        // The guard can move into another task and be released there.
        tokio::spawn(async move { drop(g) }).await.expect("join");
        assert!(locks.map.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_served_in_turn() {
        let locks: Arc<KeyedLocks> = Arc::new(KeyedLocks::default());
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (locks, counter) = (locks.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(BlockKey::new(0, 0)).await;
                let before = counter.load(std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(before + 1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
        assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 32);
        assert!(locks.map.is_empty());
    }
}
