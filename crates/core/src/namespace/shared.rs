//! What the namespace's files share: the engine, the name locks, the readers' pins on
//! inodes, the background removals of retired inodes, and the spare inodes and buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockcache_db::Db;
use bytes::{Bytes, BytesMut};
use tokio_util::task::TaskTracker;

use super::{Durability, FileMeta, now_ns};
use crate::engine::{Access, Inner};
use crate::keylock::{KeyGuard, KeyedLocks};
use crate::{BlockKey, Error, Result};

#[derive(Debug, Default)]
struct Pin {
    readers: usize,
    doomed: bool,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) inner: Arc<Inner>,
    /// The metadata store, for the namespace's own tables.
    pub(super) db: Arc<Db>,
    pub(super) names: Arc<KeyedLocks<String>>,
    /// Readers per inode, and whether the inode was retired while read.
    pins: Mutex<HashMap<u64, Pin>>,
    /// Removals of retired inodes started from `Drop`.
    pub(super) cleanups: TaskTracker,
    /// The same tasks by the order they started in, for [`Namespace::wait_for_cleanups`].
    pub(super) cleanup_tickets: tokio::sync::watch::Sender<Tickets>,
    pub(super) max_file_size: u64,
    /// The readahead window (blocks) a sequential reader last grew to: a new reader starts
    /// from half of it, so each file does not learn the store's latency again (`reader.rs`).
    pub(super) readahead_hint: std::sync::atomic::AtomicU64,
    /// Readers with a readahead window now: they share the cache room readahead may take.
    pub(super) readers_ahead: std::sync::atomic::AtomicU64,
    /// The file a reader that read another to its end expects to be read next: the name
    /// after that one in its directory (`reader.rs`).
    pub(super) read_next: Mutex<Option<String>>,
    /// Staging inodes allocated ahead and not yet taken by a writer, the next one last.
    pub(super) spare_inodes: Mutex<Vec<u64>>,
    /// Block buffers of finished writers, at most [`SPARE_BUFFER_BYTES`] worth: a new writer
    /// reuses pages already mapped instead of faulting in fresh ones each block.
    spare_buffers: Mutex<Vec<BytesMut>>,
    /// Retired staging inodes of merged changes whose blocks are gone, forgotten
    /// [`FORGET_BATCH`] at a time (one transaction); the next open forgets those left.
    forgettable: Mutex<Vec<u64>>,
    /// Inodes of files with a committed change whose merge failed and is being retried, with
    /// the cause: their reads fail until it is done.
    unapplied: Mutex<HashMap<u64, Arc<Error>>>,
}

/// Background tasks of the namespace by start order: the next ticket, and those running.
#[derive(Debug, Default)]
pub(super) struct Tickets {
    pub(super) next: u64,
    pub(super) running: std::collections::BTreeSet<u64>,
}

/// Gives its ticket back when the task holding it ends, however it ends.
struct Ticket {
    tickets: tokio::sync::watch::Sender<Tickets>,
    number: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.tickets.send_modify(|t| {
            t.running.remove(&self.number);
        });
    }
}

/// Retired inodes forgotten by one transaction (see [`Shared::forgettable`]).
const FORGET_BATCH: usize = 64;

/// The most memory that [`Shared::spare_buffers`] keeps.
const SPARE_BUFFER_BYTES: u64 = 16 << 20;

/// Staging inodes allocated by one transaction: concurrent and successive replacements share
/// the sync that makes an allocation durable.
const INODES_AHEAD: u64 = 16;

impl Shared {
    pub(super) fn new(inner: Arc<Inner>, max_file_size: u64) -> Self {
        Self {
            db: Arc::clone(inner.db()),
            inner,
            names: Arc::new(KeyedLocks::default()),
            pins: Mutex::new(HashMap::new()),
            cleanups: TaskTracker::new(),
            cleanup_tickets: tokio::sync::watch::Sender::new(Tickets::default()),
            max_file_size,
            readahead_hint: std::sync::atomic::AtomicU64::new(0),
            readers_ahead: std::sync::atomic::AtomicU64::new(0),
            read_next: Mutex::new(None),
            spare_inodes: Mutex::new(Vec::new()),
            spare_buffers: Mutex::new(Vec::new()),
            unapplied: Mutex::new(HashMap::new()),
            forgettable: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn block_size(&self) -> u64 {
        self.inner.config().block_size
    }

    /// An empty buffer that holds `capacity` bytes (and less than twice that): a spare one,
    /// or a new one.
    pub(super) fn take_buffer(&self, capacity: usize) -> BytesMut {
        let fits = |b: &BytesMut| b.capacity() >= capacity && b.capacity() / 2 < capacity;
        let spare = {
            let mut spare = self.spare_buffers.lock().expect("spare buffers poisoned");
            let found = spare.iter().rposition(fits);
            found.map(|i| spare.swap_remove(i))
        };
        spare.unwrap_or_else(|| BytesMut::with_capacity(capacity))
    }

    /// Keeps `buf` for the next writer, unless enough are kept already.
    pub(super) fn recycle_buffer(&self, mut buf: BytesMut) {
        let bs = self.block_size() as usize;
        if buf.capacity() < bs {
            return;
        }
        buf.clear();
        let mut spare = self.spare_buffers.lock().expect("spare buffers poisoned");
        let kept: usize = spare.iter().map(BytesMut::capacity).sum();
        if ((kept + buf.capacity()) as u64) <= SPARE_BUFFER_BYTES.max(buf.capacity() as u64) {
            spare.push(buf);
        }
    }

    /// A durable staging inode for a new writer: one allocated ahead, or the first of a new
    /// batch of [`INODES_AHEAD`] (the rest are kept for the next writers). Unused ones are
    /// staging inodes without blocks: shutdown forgets them, and after a crash the next open
    /// removes them like any abandoned replacement.
    pub(super) async fn take_inode(&self) -> Result<u64> {
        if let Some(inode) = self
            .spare_inodes
            .lock()
            .expect("spare inodes poisoned")
            .pop()
        {
            return Ok(inode);
        }
        let mut fresh = self.db.create_staging_inodes(INODES_AHEAD).await?;
        let first = fresh.remove(0);
        self.spare_inodes
            .lock()
            .expect("spare inodes poisoned")
            .extend(fresh.into_iter().rev());
        Ok(first)
    }

    /// Removes the blocks of a retired (or abandoned staging) inode and forgets it.
    pub(super) async fn clean(&self, inode: u64) -> Result<()> {
        self.db.retire_inode(inode).await?;
        self.remove_retired(inode).await
    }

    /// Removes the blocks of a retired inode and forgets it.
    async fn remove_retired(&self, inode: u64) -> Result<()> {
        self.inner.remove_range(inode, 0..u64::MAX).await?;
        Ok(self.db.forget_inode(inode).await?)
    }

    /// Cleans `inode` now if nobody reads it, else when its last reader is done.
    pub(super) async fn retire(self: &Arc<Self>, inode: u64) {
        let now = {
            let mut pins = self.pins.lock().expect("pins poisoned");
            match pins.get_mut(&inode) {
                Some(p) => {
                    p.doomed = true;
                    false
                }
                None => true,
            }
        };
        if now {
            self.clean_logged(inode).await;
        }
    }

    pub(super) async fn clean_logged(&self, inode: u64) {
        if let Err(error) = self.clean(inode).await {
            tracing::warn!(inode, %error, "removing the blocks of a retired inode failed; the next open retries");
        }
    }

    /// Runs the cleaning of `inode` in the background (from `Drop`).
    pub(super) fn clean_later(self: &Arc<Self>, inode: u64) {
        self.clean_after(inode, std::future::ready(()));
    }

    /// [`Shared::clean_later`], once `first` (a write into the inode still under way) is
    /// done.
    pub(super) fn clean_after<F>(self: &Arc<Self>, inode: u64, first: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send,
    {
        let shared = self.clone();
        if self
            .spawn_cleanup(async move {
                // A write that panicked still leaves the inode to be cleaned.
                let _ = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(first)).await;
                shared.clean_logged(inode).await
            })
            .is_none()
        {
            tracing::warn!(
                inode,
                "no runtime to remove a retired inode; the next open does"
            );
        }
    }

    /// Runs `task` in the background, tracked for shutdown and for
    /// [`Namespace::wait_for_cleanups`]; `None` if there is no runtime to run it on.
    pub(super) fn spawn_cleanup<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<T>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let mut number = 0;
        self.cleanup_tickets.send_modify(|t| {
            number = t.next;
            t.next += 1;
            t.running.insert(number);
        });
        let ticket = Ticket {
            tickets: self.cleanup_tickets.clone(),
            number,
        };
        Some(self.cleanups.spawn_on(
            async move {
                let _ticket = ticket;
                task.await
            },
            &handle,
        ))
    }

    pub(super) fn pin(self: &Arc<Self>, inode: u64) -> PinGuard {
        self.pins
            .lock()
            .expect("pins poisoned")
            .entry(inode)
            .or_default()
            .readers += 1;
        PinGuard {
            shared: self.clone(),
            inode,
        }
    }

    pub(super) async fn read(
        &self,
        inode: u64,
        size: u64,
        offset: u64,
        len: usize,
    ) -> Result<Bytes> {
        if let Some(cause) = self
            .unapplied
            .lock()
            .expect("unapplied poisoned")
            .get(&inode)
        {
            return Err(Error::Unapplied {
                inode,
                source: cause.clone(),
            });
        }
        let end = size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Bytes::new());
        }
        let bs = self.block_size();
        let want = (end - offset) as usize;
        let mut out = BytesMut::with_capacity(want);
        let mut pos = offset;
        while pos < end {
            let blockno = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos) as usize;
            let got = self
                .inner
                .handle(BlockKey::new(inode, blockno), Access::Read)
                .await?
                .read(in_block, n)
                .await?;
            if got.len() == want {
                return Ok(got); // one whole piece: no copy
            }
            out.extend_from_slice(&got);
            out.resize(out.len() + (n - got.len()), 0); // a hole or a short block
            pos += n as u64;
        }
        Ok(out.freeze())
    }

    /// Copies the bytes `range` (offsets within the block) of block `blockno` of `from` to
    /// the same place in the same block of `to`. Bytes past the end of the source block are
    /// not copied (they read as zeros in both). One block of memory.
    pub(super) async fn copy_range(
        &self,
        from: u64,
        to: u64,
        blockno: u64,
        range: std::ops::Range<u64>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let bytes = self
            .inner
            .handle(BlockKey::new(from, blockno), Access::Read)
            .await?
            .read(range.start, (range.end - range.start) as usize)
            .await?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.inner
            .handle(BlockKey::new(to, blockno), Access::Write)
            .await?
            .write(range.start, &bytes)
            .await
    }

    /// Makes the content of `target` that of the committed change staged in `staging`: the
    /// bytes of `target` from byte `cut` on are removed (the block holding `cut` is cut
    /// there, the blocks after it go), then each block of `staging` replaces the same block
    /// of `target`. Changes nothing in `staging`, so it can be run again, as often as needed,
    /// until it succeeds. Returns the blocks of `target` it changed.
    async fn apply_merge(&self, staging: u64, target: u64, cut: u64) -> Result<Vec<u64>> {
        let bs = self.block_size();
        let mut changed = Vec::new();
        if !cut.is_multiple_of(bs) {
            let mut h = self
                .inner
                .handle(BlockKey::new(target, cut / bs), Access::Write)
                .await?;
            // The size is known without a download; a longer block is cut in place.
            if h.size().await? > cut % bs {
                h.truncate(cut % bs).await?;
                changed.push(cut / bs);
            }
        }
        self.inner
            .remove_range(target, cut.div_ceil(bs)..u64::MAX)
            .await?;
        let staged = self.inner.blocks_of(staging).await?;
        for &blockno in &staged {
            // One block lock at a time: the staged block's, then the file's.
            let bytes = self
                .inner
                .handle(BlockKey::new(staging, blockno), Access::Read)
                .await?
                .read(0, bs as usize)
                .await?;
            let mut h = self
                .inner
                .handle(BlockKey::new(target, blockno), Access::Write)
                .await?;
            if (bytes.len() as u64) < bs {
                // The old content goes whole: no download of it.
                h.truncate(0).await?;
            }
            h.write(0, &bytes).await?;
        }
        changed.extend(staged);
        changed.sort_unstable();
        changed.dedup();
        Ok(changed)
    }

    /// Makes blocks `blocks` of `inode` as durable as `durability` says (and no others).
    async fn make_blocks_durable(
        &self,
        inode: u64,
        blocks: &[u64],
        durability: Durability,
    ) -> Result<()> {
        match durability {
            Durability::None => Ok(()),
            Durability::Local => self.inner.sync_blocks(inode, blocks).await,
            Durability::Store => self.inner.flush_blocks(inode, blocks).await,
        }
    }

    /// Applies a committed change (see [`Shared::apply_merge`]), makes the merged blocks as
    /// durable as the staged ones were, then records the merge done and removes the staging
    /// inode.
    async fn merge(
        &self,
        staging: u64,
        target: u64,
        cut: u64,
        durability: Durability,
    ) -> Result<()> {
        let merged = self.apply_merge(staging, target, cut).await?;
        // The merged blocks are stored once they are committed: they take a reference on the
        // objects of the staged ones before those are released.
        self.make_blocks_durable(target, &merged, durability)
            .await?;
        self.db.finish_merge(staging).await?;
        if let Err(error) = self.inner.remove_range(staging, 0..u64::MAX).await {
            tracing::warn!(inode = staging, error = %crate::error::Chain(&error), "removing the blocks of a merged change failed; the next open retries");
            return Ok(());
        }
        self.forget_later(staging).await;
        Ok(())
    }

    /// Forgets retired inode `inode`, whose blocks are gone, with the next batch.
    async fn forget_later(&self, inode: u64) {
        let batch = {
            let mut f = self.forgettable.lock().expect("forgettable poisoned");
            f.push(inode);
            if f.len() < FORGET_BATCH {
                return;
            }
            std::mem::take(&mut *f)
        };
        self.forget_now(batch).await;
    }

    /// Forgets the retired inodes that [`Shared::forget_later`] holds (at shutdown).
    pub(super) async fn forget_held(&self) {
        let batch = std::mem::take(&mut *self.forgettable.lock().expect("forgettable poisoned"));
        if !batch.is_empty() {
            self.forget_now(batch).await;
        }
    }

    async fn forget_now(&self, batch: Vec<u64>) {
        if let Err(error) = self.db.forget_inodes(&batch).await {
            tracing::warn!(inodes = batch.len(), error = %crate::error::Chain(&error), "forgetting merged inodes failed; the next open does");
        }
    }

    /// Redoes the merges that were committed before a crash, before the namespace serves
    /// anything: each one whose file still has the version it made (a later change of the
    /// file means it was done); the staging inodes are then removed.
    pub(super) async fn finish_merges(&self) -> Result<()> {
        for m in self.db.pending_merges().await? {
            let current = self
                .db
                .file_of_inode(m.target)
                .await?
                .is_some_and(|f| f.version == m.version);
            if current {
                tracing::info!(
                    inode = m.target,
                    "finishing a change of a file that was committed before a crash"
                );
                let merged = self.apply_merge(m.staging, m.target, m.cut).await?;
                self.make_blocks_durable(m.target, &merged, Durability::Local)
                    .await?;
            }
            self.db.finish_merge(m.staging).await?;
            self.remove_retired(m.staging).await?;
        }
        Ok(())
    }

    /// Commits a patch or truncation of `name` staged in `staging`, then merges it into the
    /// file's inode `target` (see [`Shared::apply_merge`]). The commit and the merge run as
    /// one tracked task that finishes even if the caller gives up; `name_lock` is held until
    /// the merge is done. The staged blocks must already be as durable as asked. If the
    /// commit fails the file is unchanged and `staging` is removed; if only the merge fails
    /// the change stands (it is durable), the merge is retried in the background and reads of
    /// the file fail meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit_change(
        self: &Arc<Self>,
        name_lock: KeyGuard<String>,
        name: String,
        target: u64,
        staging: u64,
        size: u64,
        cut: u64,
        durability: Durability,
    ) -> Result<FileMeta> {
        let shared = self.clone();
        let task = self.spawn_cleanup(async move {
            let committed = shared
                .db
                .commit_merge(&name, target, staging, size, now_ns(), cut)
                .await;
            let row = match committed {
                Ok(Some(row)) => row,
                Ok(None) => {
                    shared.clean_logged(staging).await;
                    return Err(Error::NotFound { name });
                }
                Err(e) => {
                    shared.clean_logged(staging).await;
                    return Err(Error::from(e));
                }
            };
            if let Err(error) = shared.merge(staging, target, cut, durability).await {
                tracing::warn!(
                    %name, inode = target, error = %crate::error::Chain(&error),
                    "applying a committed change failed; retrying, and reads of the file fail until it is done"
                );
                shared.retry_merge(name_lock, staging, target, cut, durability, error);
            }
            Ok(FileMeta::from_row(row))
        });
        let Some(task) = task else {
            return Err(Error::ShuttingDown);
        };
        crate::engine::joined(task).await
    }

    /// Retries a failed merge with backoff until it succeeds or the engine stops (the next
    /// open then redoes it), holding the file's name lock; reads of the file fail meanwhile.
    fn retry_merge(
        self: &Arc<Self>,
        name_lock: KeyGuard<String>,
        staging: u64,
        target: u64,
        cut: u64,
        durability: Durability,
        error: Error,
    ) {
        self.unapplied
            .lock()
            .expect("unapplied poisoned")
            .insert(target, Arc::new(error));
        let shared = self.clone();
        let cancel = self.inner.cancel_token().clone();
        self.inner.tracker().spawn(async move {
            let _name_lock = name_lock;
            let mut delay = std::time::Duration::from_millis(100);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                match shared.merge(staging, target, cut, durability).await {
                    Ok(()) => {
                        shared
                            .unapplied
                            .lock()
                            .expect("unapplied poisoned")
                            .remove(&target);
                        tracing::info!(inode = target, "a committed change is applied now");
                        return;
                    }
                    Err(error) => {
                        shared
                            .unapplied
                            .lock()
                            .expect("unapplied poisoned")
                            .insert(target, Arc::new(error));
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// Before a change of the file whose inode is `target` is committed: makes what is staged
    /// for it in `staging`, and the rest of the file, as durable as `durability` says, so
    /// that the file is, once the change is merged, and nothing after the commit point waits
    /// for the store but the merged blocks themselves.
    pub(super) async fn make_change_durable(
        &self,
        staging: u64,
        target: u64,
        durability: Durability,
    ) -> Result<()> {
        match durability {
            Durability::None => Ok(()),
            Durability::Local => self.inner.sync_inodes(&[staging, target]).await,
            Durability::Store => self.inner.flush_inodes(&[staging, target]).await,
        }
    }

    pub(super) async fn make_durable(&self, inode: u64, durability: Durability) -> Result<()> {
        match durability {
            Durability::None => Ok(()),
            Durability::Local => self.inner.sync_dirty(Some(inode)).await,
            Durability::Store => self.inner.flush(Some(inode)).await,
        }
    }
}

/// A staging inode that is removed (in the background) if dropped before it is disarmed.
pub(super) struct Staged {
    shared: Arc<Shared>,
    inode: Option<u64>,
}

impl Staged {
    pub(super) fn new(shared: Arc<Shared>, inode: u64) -> Self {
        Self {
            shared,
            inode: Some(inode),
        }
    }

    /// Someone else decides the inode's fate now.
    pub(super) fn disarm(mut self) {
        self.inode = None;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(inode) = self.inode {
            self.shared.clean_later(inode);
        }
    }
}

/// Keeps an inode's blocks while a reader uses them.
#[derive(Debug)]
pub(super) struct PinGuard {
    shared: Arc<Shared>,
    inode: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let doomed = {
            let mut pins = self.shared.pins.lock().expect("pins poisoned");
            match pins.get_mut(&self.inode) {
                Some(p) => {
                    p.readers -= 1;
                    if p.readers == 0 {
                        pins.remove(&self.inode).is_some_and(|p| p.doomed)
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if doomed {
            self.shared.clean_later(self.inode);
        }
    }
}
