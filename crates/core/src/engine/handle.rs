//! [`BlockHandle`]: exclusive access to one block, and every change of a block's file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{Counters, Inner};
use crate::budget::Credit;
use crate::cache_dir::Marker;
use crate::keylock::KeyGuard;
use crate::{BlockKey, Error, Result};

/// Exclusive access to one block. Holds the block's lock until dropped.
///
/// Obtained from [`crate::BlockCache::block`] (read and write) or
/// [`crate::BlockCache::block_for_read`] (read only). A write handle took one block's worth
/// of the dirty budget when it was opened, so writing never waits for uploads while the
/// block is locked; what it did not use goes back when it is dropped.
#[derive(Debug)]
pub struct BlockHandle {
    pub(super) inner: Arc<Inner>,
    pub(super) key: BlockKey,
    _guard: KeyGuard,
    /// The dirty budget a write handle holds; `None` for a read handle.
    credit: Option<Credit>,
    /// The cache file, once opened.
    pub(super) file: Option<File>,
}

/// What a handle needs before an operation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Intent {
    Read,
    /// A write of `[start, end)`.
    Write {
        start: u64,
        end: u64,
    },
    Truncate(u64),
}

impl BlockHandle {
    pub(super) fn new(
        inner: Arc<Inner>,
        key: BlockKey,
        guard: KeyGuard,
        credit: Option<Credit>,
    ) -> Self {
        Self {
            inner,
            key,
            _guard: guard,
            credit,
            file: None,
        }
    }

    /// The block this handle owns.
    pub fn key(&self) -> BlockKey {
        self.key
    }

    /// The block's length in bytes (0 for a hole). Downloads nothing.
    pub async fn size(&mut self) -> Result<u64> {
        if let Some(size) = self.cached_size() {
            return Ok(size);
        }
        Ok(self
            .inner
            .db
            .mapping(self.key.inode, self.key.blockno)
            .await?
            .map_or(0, |o| o.length))
    }

    /// The size of the cached entry, once it is checked.
    pub(super) fn cached_size(&self) -> Option<u64> {
        self.inner
            .lock_state()
            .get(self.key)
            .filter(|c| c.verified)
            .map(|c| c.size)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let block_size = self.inner.config.block_size;
        if offset.checked_add(len).is_none_or(|end| end > block_size) {
            return Err(Error::OutOfRange {
                inode: self.key.inode,
                blockno: self.key.blockno,
                offset,
                len,
                block_size,
            });
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`; returns fewer at the end of the block, and
    /// nothing for a hole. A miss downloads the block first.
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes> {
        self.check_range(offset, len as u64)?;
        if !self.ensure(Intent::Read).await? {
            return Ok(Bytes::new());
        }
        let size = self.cached_size().expect("ensured");
        let end = (offset + len as u64).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let path = self.path();
        let file = self.file()?;
        read_uninit(file, offset, (end - offset) as usize)
            .map(Bytes::from)
            .map_err(Error::io("read cache file", path))
    }

    /// Writes `data` at `offset`, growing the block if needed (a gap reads as zeros).
    /// A write that covers the block's whole old content does not download it first.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_with_hash(offset, data, None).await
    }

    /// [`BlockHandle::write`], where the caller may have computed `hash`, the SHA-256 of
    /// `data`, as it gathered the bytes. If the write starts at the block's start and the
    /// block is then exactly `data` (it was not longer), the hash is kept for the commit,
    /// which then need not read the block back to hash it.
    pub(crate) async fn write_with_hash(
        &mut self,
        offset: u64,
        data: &[u8],
        hash: Option<[u8; 32]>,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        self.ensure(Intent::Write { start: offset, end }).await?;
        let size = self.cached_size().expect("ensured");
        let new_size = size.max(end);
        let hash = hash.filter(|_| offset == 0 && new_size == end);
        self.modify(new_size, hash, |file| file.write_all_at(data, offset))
            .await
    }

    /// Starts making the block's data durable in the background (fdatasync on the blocking
    /// pool), so that a sync soon after finds little left to write. The task's result must
    /// be looked at: a failed fdatasync may be reported to no later sync.
    pub(crate) fn sync_ahead(&self) -> Option<tokio::task::JoinHandle<Result<()>>> {
        let file = self.file.as_ref()?.try_clone().ok()?;
        let path = self.path();
        Some(tokio::task::spawn_blocking(move || {
            file.sync_data().map_err(Error::io("sync cache file", path))
        }))
    }

    /// Sets the block's length to `size`, cutting or zero-extending it.
    pub async fn truncate(&mut self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(0, size)?;
        self.ensure(Intent::Truncate(size)).await?;
        if self.cached_size() == Some(size) {
            return Ok(());
        }
        self.modify(size, None, |file| file.set_len(size)).await
    }

    /// Makes this block's data durable in the cache directory (fsync of file and directory).
    pub async fn sync(&mut self) -> Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        let file = file
            .try_clone()
            .map_err(Error::io("sync cache file", self.path()))?;
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            dir.sync_dir()
        })
        .await
        .expect("sync task panicked")
        .map_err(Error::io("sync cache directory", self.inner.dir.path()))
    }

    fn check_writable(&self) -> Result<()> {
        if self.credit.is_none() {
            return Err(Error::ReadOnly {
                inode: self.key.inode,
                blockno: self.key.blockno,
            });
        }
        Ok(())
    }

    /// The path of the block's file under the name it has now.
    fn path(&self) -> std::path::PathBuf {
        let marker = self
            .inner
            .lock_state()
            .get(self.key)
            .map_or(Marker::Dirty, |c| c.marker);
        self.inner.dir.file(self.key, marker)
    }

    /// The cache file, opened on first use.
    pub(super) fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            let marker = self
                .inner
                .lock_state()
                .get(self.key)
                .map(|c| c.marker)
                .expect("ensured");
            let file = self.inner.dir.open(self.key, marker).map_err(Error::io(
                "open cache file",
                self.inner.dir.file(self.key, marker),
            ))?;
            self.file = Some(file);
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Applies a modification that leaves the block `new_size` bytes long: reserve cache
    /// room for growth, mark dirty (renaming the file first), then run `op` on the file.
    /// `hash`, if given, is the SHA-256 of the block's whole content after `op`; it is kept
    /// with the new generation, in the same critical section that makes that generation.
    async fn modify(
        &mut self,
        new_size: u64,
        hash: Option<[u8; 32]>,
        op: impl Fn(&File) -> std::io::Result<()>,
    ) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let old_size = self.cached_size().expect("ensured");
        let growth = new_size.saturating_sub(old_size);
        let room = if growth > 0 {
            Some(inner.make_room(growth, 0).await?)
        } else {
            None
        };
        let mut applied = self.apply(&op);
        if applied.as_ref().is_err_and(Error::is_storage_full)
            && inner.free_space(growth.max(new_size))
        {
            // The file system was full: clean blocks were evicted; once more (`op` writes
            // the same bytes at the same place, or sets the same length).
            applied = self.apply(&op);
        }
        // The reservation turns into the entry's size in the same critical section as the
        // size change, so no other task can take the room in between.
        let mut st = inner.lock_state();
        if let Some(room) = room {
            room.settle(&mut st);
        }
        applied?;
        let delta = st.modify(key, new_size, hash);
        drop(st);
        let credit = self.credit.as_mut().expect("writable");
        if delta >= 0 {
            // A handle's credit is one block size, and no block grows past that.
            credit.spend(delta as u64);
        } else {
            credit.refund(delta.unsigned_abs());
        }
        Ok(())
    }

    /// Renames the file to its dirty name if needed, then runs `op` on it.
    ///
    /// Every change of a block goes through here (invariant 11): a file shared with the
    /// store is first replaced by a copy of its own.
    fn apply(&mut self, op: impl FnOnce(&File) -> std::io::Result<()>) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        // Mark the file dirty before the bytes change, so a crash never leaves modified
        // data under a clean name. A hash computed ahead is void from here on, even if the
        // change fails half-way and the generation stays.
        let marker = inner.lock_state().begin_change(key).expect("ensured");
        if marker == Marker::Clean {
            inner.dir.set_marker(key, Marker::Dirty).map_err(Error::io(
                "mark cache file dirty",
                inner.dir.file(key, Marker::Clean),
            ))?;
            inner.lock_state().set_marker(key, Marker::Dirty);
        }
        let path = inner.dir.file(key, Marker::Dirty);
        let file = self.file()?;
        if let Some(copy) = inner.dir.unshare(key, file).map_err(Error::io(
            "copy the cache file shared with the store",
            path.clone(),
        ))? {
            self.file = Some(copy);
        }
        let file = self.file()?;
        op(file).map_err(Error::io("write cache file", path))
    }

    /// Counts a hit.
    pub(super) fn hit(&self) {
        Counters::add(&self.inner.counters.hits, 1);
    }
}

/// Reads exactly `len` bytes at `offset` of `file` into a new buffer that is not zeroed
/// first: a hot read's bytes are copied once, from the page cache into the buffer.
fn read_uninit(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(n) => n,
            // A signal before any byte was read (network file systems): read again.
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The capacity may exceed `len`: bytes read past it are not the caller's.
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::read_uninit;

    #[test]
    fn read_uninit_reads_the_range_and_names_a_short_file() -> std::io::Result<()> {
        let mut file = tempfile::tempfile()?;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data)?;
        assert_eq!(read_uninit(&file, 0, data.len())?, data);
        assert_eq!(read_uninit(&file, 12_345, 100_000)?, &data[12_345..112_345]);
        assert_eq!(read_uninit(&file, 7, 0)?, b"");
        let short = read_uninit(&file, 299_000, 2_000).expect_err("a read past the end");
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
        Ok(())
    }
}
