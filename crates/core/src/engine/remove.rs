//! Removing blocks, and deleting released objects from the store.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::upload::wait_done;
use super::{Counters, Inner, detached};
use crate::{BlockKey, Error, Result};

impl Inner {
    /// Removes blocks `range` of `inode`: drops cached copies (dirty ones too) and mappings,
    /// and releases their objects. Runs as a task of the engine, so a caller that gives up
    /// does not leave blocks dropped from the cache but still mapped.
    pub(crate) async fn remove_range(
        self: &Arc<Self>,
        inode: u64,
        range: Range<u64>,
    ) -> Result<()> {
        BlockKey::new(inode, 0).check()?;
        let inner = Arc::clone(self);
        detached(self, async move { inner.run_remove(inode, range).await }).await
    }

    async fn run_remove(self: &Arc<Self>, inode: u64, range: Range<u64>) -> Result<()> {
        let mut keys = self.lock_state().keys_in(inode, range.clone());
        keys.extend(
            self.db
                .mapped_blocks(inode, range)
                .await?
                .into_iter()
                .map(|b| BlockKey::new(inode, b)),
        );
        keys.sort_unstable();
        keys.dedup();
        for chunk in keys.chunks(1024) {
            // First pass: blocks nobody holds; second pass: wait for the rest, in key order.
            let mut guards = Vec::with_capacity(chunk.len());
            let mut busy = Vec::new();
            for &key in chunk {
                match self.locks.try_lock(key) {
                    Some(g) => guards.push((key, g)),
                    None => busy.push(key),
                }
            }
            for key in busy {
                guards.push((key, self.locks.lock(key).await));
            }
            let mut freed = 0;
            let mut files = Vec::new();
            {
                let mut st = self.lock_state();
                for (key, _) in &guards {
                    if let Some(removed) = st.remove(*key) {
                        freed += removed.dirty_bytes;
                        files.push((*key, removed.marker));
                    }
                }
            }
            self.budget.release(freed);
            // Unlink the files on the blocking pool, while the block locks are still held.
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || {
                for (key, marker) in files {
                    dir.remove(key, marker)
                        .map_err(Error::io("delete cache file", dir.file(key, marker)))?;
                }
                Ok::<_, Error>(())
            })
            .await
            .expect("unlink task panicked")?;
            let pairs: Vec<(u64, u64)> = guards.iter().map(|(k, _)| (k.inode, k.blockno)).collect();
            let released = {
                let _commit = self.commit_lock.lock().await;
                self.db.remove_blocks(&pairs).await?
            };
            drop(guards);
            self.queue_removals(released).await;
            self.progress.notify_waiters();
        }
        Ok(())
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

    /// For the removal task: deletes a batch of released objects from the store, then
    /// forgets their pending deletions. On error nothing is forgotten and the batch is tried
    /// again later.
    pub(crate) async fn delete_objects(&self, batch: &[u64]) -> Result<()> {
        // An object released while its upload runs must not be deleted before the upload
        // ends, or the upload would recreate it.
        for &id in batch {
            if let Some(done) = self.upload_of(id) {
                let _ = wait_done(done).await;
            }
        }
        let deleted = async {
            // The release of an object may be a block commit that is not durable yet: after a
            // power loss the block would point to the object again, so the object stays in
            // the store until its release is durable.
            self.db.sync_all().await?;
            let started = std::time::Instant::now();
            let deleted = self.backend.delete_many(batch).await;
            metrics::histogram!("blockcache_delete_duration_seconds", "outcome" => super::outcome_label(&deleted))
                .record(started.elapsed().as_secs_f64());
            deleted.map_err(|e| Error::Store {
                action: "delete released objects",
                source: Arc::new(e),
            })?;
            self.db.finish_deletions(batch).await?;
            Ok::<_, Error>(())
        }
        .await;
        match &deleted {
            Ok(()) => {
                Counters::add(&self.counters.deletes, batch.len() as u64);
                self.pending_removals
                    .fetch_sub(batch.len() as u64, Ordering::SeqCst);
                self.progress.notify_waiters();
            }
            Err(_) => Counters::add(&self.counters.delete_errors, 1),
        }
        deleted
    }
}
