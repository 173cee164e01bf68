//! Making dirty blocks durable in the cache directory, and hashing them meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Inner, per_core};
use crate::cache_dir::{self, Marker};
use crate::{BlockKey, Error, Result};

/// Above this many dirty files, `sync` uses one `syncfs` instead of an fsync per file (each
/// fsync commits the file system's journal).
const SYNCFS_THRESHOLD: usize = 8;

/// Stops the hashing ahead when the sync is done, or dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Inner {
    /// Makes dirty blocks (all, or those of one inode) durable in the cache directory.
    ///
    /// While the disk writes, the blocks are hashed ahead of their commit
    /// ([`Inner::prehash`]): the CPU is idle then, and the commit that usually follows a sync
    /// need not read and hash them again. The hashing stops when the sync is done.
    pub(crate) async fn sync_dirty(self: &Arc<Self>, inode: Option<u64>) -> Result<()> {
        let keys = self.lock_state().dirty_keys(inode);
        self.sync_keys(keys).await
    }

    /// [`Inner::sync_dirty`] of the blocks of `inodes`, together.
    pub(crate) async fn sync_inodes(self: &Arc<Self>, inodes: &[u64]) -> Result<()> {
        let keys = {
            let st = self.lock_state();
            inodes
                .iter()
                .flat_map(|&i| st.dirty_keys(Some(i)))
                .collect()
        };
        self.sync_keys(keys).await
    }

    /// [`Inner::sync_dirty`] of blocks `blocks` of `inode` only.
    pub(crate) async fn sync_blocks(self: &Arc<Self>, inode: u64, blocks: &[u64]) -> Result<()> {
        let wanted: std::collections::HashSet<u64> = blocks.iter().copied().collect();
        let mut keys = self.lock_state().dirty_keys(Some(inode));
        keys.retain(|k| wanted.contains(&k.blockno));
        self.sync_keys(keys).await
    }

    async fn sync_keys(self: &Arc<Self>, keys: Vec<BlockKey>) -> Result<()> {
        let paths: Vec<PathBuf> = keys
            .iter()
            .map(|k| self.dir.file(*k, Marker::Dirty))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = StopOnDrop(stop.clone());
        let synced = async move {
            let synced = self.sync_files(paths).await;
            drop(stopper);
            synced
        };
        let (synced, ()) = tokio::join!(synced, self.prehash(keys, stop));
        synced
    }

    /// fsyncs the cache files `paths` and the directory, or the whole file system (one
    /// `syncfs`) for more than [`SYNCFS_THRESHOLD`] of them.
    async fn sync_files(&self, paths: Vec<PathBuf>) -> Result<()> {
        let dir = self.dir.clone();
        if paths.len() > SYNCFS_THRESHOLD {
            // Many small files: one syncfs of the cache's file system costs less than an
            // fsync each (it also writes other dirty data of that file system).
            return self
                .sync_filesystem_ahead()
                .await
                .expect("sync task panicked");
        }
        // One blocking task per file (at most SYNCFS_THRESHOLD), and the directory at the same
        // time: the disk gets every write at once, as from one syncfs, instead of one file's
        // after another. Both must finish before the sync counts.
        let mut tasks: Vec<_> = paths
            .into_iter()
            .map(|p| {
                tokio::task::spawn_blocking(move || {
                    cache_dir::sync_file(&p).map_err(Error::io("sync cache file", p.clone()))
                })
            })
            .collect();
        let d = dir.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            d.sync_dir()
                .map_err(Error::io("sync cache directory", d.path()))
        }));
        let mut result = Ok(());
        for t in tasks {
            let synced = t.await.expect("sync task panicked");
            if result.is_ok() {
                result = synced;
            }
        }
        result
    }

    /// One `syncfs` of the cache's file system on the blocking pool, started now: for
    /// [`Inner::sync_files`] of many files, and the write-behind of writers of small blocks,
    /// for which one sync per block would cost a journal commit each.
    pub(crate) fn sync_filesystem_ahead(&self) -> tokio::task::JoinHandle<Result<()>> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            dir.sync_filesystem()
                .map_err(Error::io("sync the file system of", dir.path()))
        })
    }

    /// Hashes dirty blocks among `keys` ahead of their commit, on the blocking pool (one task
    /// per core), until `stop` is set. A block that is locked, in flight or already hashed at
    /// its generation is skipped; each one hashed is locked meanwhile, so its generation and
    /// bytes cannot change under the hash.
    async fn prehash(self: &Arc<Self>, keys: Vec<BlockKey>, stop: Arc<AtomicBool>) {
        if keys.is_empty() {
            return;
        }
        let tasks: Vec<_> = per_core(keys)
            .into_iter()
            .map(|chunk| {
                let (inner, stop) = (Arc::clone(self), stop.clone());
                let busy = self.busy();
                tokio::task::spawn_blocking(move || {
                    let _busy = busy;
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
            // A hashing task that failed only means the commit hashes those blocks itself.
            let _ = t.await;
        }
    }

    /// Hashes one dirty block ahead of its commit (see [`Inner::prehash`]). Blocking.
    fn prehash_one(&self, key: BlockKey) {
        let Some(_guard) = self.locks.try_lock(key) else {
            return;
        };
        let Some((cached, generation)) = self.lock_state().prehash_target(key) else {
            return;
        };
        // A failure here only means the commit hashes the block itself.
        let Ok(hash) = cache_dir::hash_file(&self.dir.file(key, cached.marker), cached.size) else {
            return;
        };
        self.lock_state()
            .set_prehash(key, cached.id, generation, hash);
    }
}
