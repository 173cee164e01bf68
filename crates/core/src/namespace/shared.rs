//! What the namespace's files share: the engine, the name locks, the readers' pins on
//! inodes, the background removals of retired inodes, and the spare inodes and buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockcache_db::Db;
use bytes::{Bytes, BytesMut};
use tokio_util::task::TaskTracker;

use super::Durability;
use crate::engine::{Access, Inner};
use crate::keylock::KeyedLocks;
use crate::{BlockKey, Result};

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
    /// Staging inodes allocated ahead and not yet taken by a writer, the next one last.
    pub(super) spare_inodes: Mutex<Vec<u64>>,
    /// Block buffers of finished writers, at most [`SPARE_BUFFER_BYTES`] worth: a new writer
    /// reuses pages already mapped instead of faulting in fresh ones each block.
    spare_buffers: Mutex<Vec<BytesMut>>,
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
            spare_inodes: Mutex::new(Vec::new()),
            spare_buffers: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn block_size(&self) -> u64 {
        self.inner.config().block_size
    }

    /// An empty buffer that holds one block: a spare one, or a new one.
    pub(super) fn take_buffer(&self) -> BytesMut {
        let spare = self
            .spare_buffers
            .lock()
            .expect("spare buffers poisoned")
            .pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(self.block_size() as usize))
    }

    /// Keeps `buf` for the next writer, unless enough are kept already.
    pub(super) fn recycle_buffer(&self, mut buf: BytesMut) {
        let bs = self.block_size() as usize;
        if buf.capacity() < bs {
            return;
        }
        buf.clear();
        let mut spare = self.spare_buffers.lock().expect("spare buffers poisoned");
        if ((spare.len() + 1) * bs) as u64 <= SPARE_BUFFER_BYTES.max(bs as u64) {
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
        self.inner.remove_range(inode, 0..u64::MAX).await?;
        self.db.forget_inode(inode).await?;
        Ok(())
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
        let shared = self.clone();
        if self
            .spawn_cleanup(async move { shared.clean_logged(inode).await })
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

    /// Cuts the blocks of `inode` at `size`: the block holding `size` is truncated and the
    /// blocks after it removed, so that growing the file shows zeros past the old end.
    pub(super) async fn trim_tail(&self, inode: u64, size: u64) -> Result<()> {
        let bs = self.block_size();
        let (last, in_block) = (size / bs, size % bs);
        let first_gone = if in_block == 0 {
            last
        } else {
            let mut h = self
                .inner
                .handle(BlockKey::new(inode, last), Access::Write)
                .await?;
            if h.size().await? > in_block {
                h.truncate(in_block).await?;
            }
            last + 1
        };
        self.inner.remove_range(inode, first_gone..u64::MAX).await
    }

    pub(super) async fn make_durable(&self, inode: u64, durability: Durability) -> Result<()> {
        match durability {
            Durability::None => Ok(()),
            Durability::Local => self.inner.sync_dirty(Some(inode)).await,
            Durability::Store => self.inner.flush(Some(inode)).await,
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
