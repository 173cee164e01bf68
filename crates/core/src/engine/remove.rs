//! Removing blocks, and deleting released objects from the store.
//!
//! Each object queued for deletion takes a ticket, in queueing order; the removal task
//! deletes them in batches, oldest first, and a flush waits until the tickets taken before
//! it are done (or a batch holding them fails: the flush reports that).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use tokio::sync::{Notify, watch};

use super::upload::wait_done;
use super::{Counters, Inner, detached};
use crate::{BlockKey, Error, Result};

/// One object queued for deletion, with its ticket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Removal {
    ticket: u64,
    pub(crate) id: u64,
}

/// The store deletions queued and not yet done.
#[derive(Debug)]
pub(crate) struct Removals {
    tickets: watch::Sender<Tickets>,
    /// Wakes the removal task from its backoff (a flush wants its deletions now).
    retry: Notify,
}

#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    pending: BTreeSet<u64>,
    /// Deletions held back until the metadata that released them is shipped.
    held: BTreeSet<u64>,
    held_list: Vec<Removal>,
    /// Failed batches so far, and the last failure.
    failures: u64,
    last_error: Option<Error>,
}

/// Where a flush starts: the tickets taken before it, and the failures seen so far.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemovalMark {
    end: u64,
    failures: u64,
}

impl Default for Removals {
    fn default() -> Self {
        Self {
            tickets: watch::Sender::new(Tickets::default()),
            retry: Notify::new(),
        }
    }
}

impl Removals {
    /// Deletions queued and not yet done, held ones included.
    pub(crate) fn pending(&self) -> u64 {
        let t = self.tickets.borrow();
        (t.pending.len() + t.held.len()) as u64
    }

    /// Deletions held back now.
    pub(crate) fn held(&self) -> u64 {
        self.tickets.borrow().held.len() as u64
    }

    /// Holds deletions back until a round of shipping (see [`Inner::delete_objects`]): no
    /// flush waits for them meanwhile.
    pub(crate) fn hold(&self, batch: &[Removal]) {
        self.tickets.send_modify(|t| {
            for r in batch {
                if t.pending.remove(&r.ticket) && t.held.insert(r.ticket) {
                    t.held_list.push(*r);
                }
            }
        });
    }

    /// Whether deletions are held back.
    pub(crate) fn has_held(&self) -> bool {
        !self.tickets.borrow().held_list.is_empty()
    }

    /// Takes the held deletions to try again: they are pending again (flushes wait for
    /// them) and the caller deletes them or holds them back again.
    pub(crate) fn requeue(&self) -> Vec<Removal> {
        let mut out = Vec::new();
        self.tickets.send_modify(|t| {
            out = std::mem::take(&mut t.held_list);
            for r in &out {
                t.held.remove(&r.ticket);
                t.pending.insert(r.ticket);
            }
        });
        out
    }

    fn take(&self, id: u64) -> Removal {
        let mut ticket = 0;
        self.tickets.send_modify(|t| {
            ticket = t.next;
            t.next += 1;
            t.pending.insert(ticket);
        });
        Removal { ticket, id }
    }

    /// Forgets tickets: their deletions are done, or left to the next start.
    fn done(&self, batch: &[Removal]) {
        self.tickets.send_modify(|t| {
            for r in batch {
                t.pending.remove(&r.ticket);
                t.held.remove(&r.ticket);
            }
        });
    }

    fn failed(&self, error: &Error) {
        self.tickets.send_modify(|t| {
            t.failures += 1;
            t.last_error = Some(error.clone());
        });
    }

    /// The mark of a flush starting now.
    pub(crate) fn mark(&self) -> RemovalMark {
        let t = self.tickets.borrow();
        RemovalMark {
            end: t.next,
            failures: t.failures,
        }
    }

    /// Wakes the removal task if it waits to retry a failed batch.
    pub(crate) fn retry_now(&self) {
        self.retry.notify_one();
    }

    /// Notified when the removal task should retry at once.
    pub(crate) fn retry_requested(&self) -> &Notify {
        &self.retry
    }

    /// Waits until the deletions queued before `mark` are done; fails with the store's
    /// error if a batch fails while some of them are pending. Cancel-safe.
    pub(crate) async fn wait(&self, mark: RemovalMark) -> Result<()> {
        let mut rx = self.tickets.subscribe();
        let before = |t: &Tickets| t.pending.first().is_some_and(|&f| f < mark.end);
        // The sender lives in `self`, so the wait cannot fail.
        let t = rx
            .wait_for(|t| !before(t) || t.failures > mark.failures)
            .await
            .expect("the sender outlives its receivers");
        match &t.last_error {
            Some(error) if before(&t) => Err(error.clone()),
            _ => Ok(()),
        }
    }
}

impl Inner {
    /// For a flush, after a round of shipping: tries the held deletions again at once (as
    /// a task of the engine, so a flush that gives up leaves none half-taken), holding back
    /// those still named. Fails with the store's error if the deletion fails.
    pub(crate) async fn retry_held_removals(self: &Arc<Self>) -> Result<()> {
        if !self.removals.has_held() {
            return Ok(());
        }
        let inner = Arc::clone(self);
        detached(self, async move {
            let again = inner.removals.requeue();
            match inner.delete_objects(&again).await {
                Ok(kept) => {
                    inner.removals.hold(&kept);
                    Ok(())
                }
                Err(e) => {
                    inner.removals.hold(&again);
                    Err(e)
                }
            }
        })
        .await
    }

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
            let released = {
                let _commit = self.commit_lock.lock().await;
                // Mappings change only under `commit_lock`: those read now are those to
                // remove. Blocks only in the cache (dirty, never committed) need no
                // transaction, and so no sync.
                let lo = guards.iter().map(|(k, _)| k.blockno).min().unwrap_or(0);
                let hi = guards.iter().map(|(k, _)| k.blockno).max().unwrap_or(0);
                let mapped: std::collections::HashSet<u64> = self
                    .db
                    .mapped_blocks(inode, lo..hi.saturating_add(1))
                    .await?
                    .into_iter()
                    .collect();
                let pairs: Vec<(u64, u64)> = guards
                    .iter()
                    .filter(|(k, _)| mapped.contains(&k.blockno))
                    .map(|(k, _)| (k.inode, k.blockno))
                    .collect();
                if pairs.is_empty() {
                    Vec::new()
                } else {
                    self.db.remove_blocks(&pairs).await?
                }
            };
            drop(guards);
            self.queue_removals(released).await;
            self.progress.notify_waiters();
        }
        Ok(())
    }

    /// Queues store deletions of released objects (their pending deletions are durable).
    pub(crate) async fn queue_removals(&self, ids: Vec<u64>) {
        let removals = self.take_removal_tickets(ids);
        self.send_removals(removals).await;
    }

    /// Takes the tickets of deletions about to be queued: a flush that starts after this
    /// waits for them.
    pub(crate) fn take_removal_tickets(&self, ids: Vec<u64>) -> Vec<Removal> {
        ids.into_iter().map(|id| self.removals.take(id)).collect()
    }

    /// Hands deletions to the removal task.
    pub(crate) async fn send_removals(&self, removals: Vec<Removal>) {
        for removal in removals {
            let id = removal.id;
            if self.removal_tx.send(removal).await.is_err() {
                // The removal task is gone (shutdown); the pending deletion stays in the
                // database and the next start finishes it.
                self.removals.done(&[removal]);
                tracing::debug!(
                    obj_id = id,
                    "removal queue closed; deletion left for the next start"
                );
            }
        }
    }

    /// For the removal task: deletes a batch of released objects from the store, then
    /// forgets their pending deletions. On error nothing is forgotten and the batch is tried
    /// again later. Objects that the metadata in the store still names (their release is not
    /// shipped yet: the file that held them is still being written or uploaded) are not
    /// deleted but returned, their tickets still pending: the caller holds them back
    /// ([`Removals::hold`]) or tries again after a round of shipping.
    pub(crate) async fn delete_objects(&self, removals: &[Removal]) -> Result<Vec<Removal>> {
        let mut ids: Vec<u64> = removals.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        // An object released while its upload runs must not be deleted before the upload
        // ends, or the upload would recreate it.
        for &id in &ids {
            if let Some(done) = self.upload_of(id) {
                let _ = wait_done(done).await;
            }
        }
        // No round of shipping runs meanwhile: one could ship a mapping to an object read
        // before its release and deleted here.
        let (_shipping, checked) = self.hold_shipping().await;
        // Before a round read the store's metadata, any object may be named by a delta that
        // the database does not record: hold every deletion back until one has.
        let named = if checked {
            self.db.shipped_among(&ids).await?
        } else {
            ids.iter().copied().collect()
        };
        let (held, removals): (Vec<Removal>, Vec<Removal>) =
            removals.iter().partition(|r| named.contains(&r.id));
        ids.retain(|id| !named.contains(id));
        let batch = &ids[..];
        if batch.is_empty() {
            self.removals.done(&removals);
            return Ok(held);
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
                self.removals.done(&removals);
                self.progress.notify_waiters();
            }
            Err(error) => {
                Counters::add(&self.counters.delete_errors, 1);
                self.removals.failed(error);
            }
        }
        deleted.map(|()| held)
    }
}
