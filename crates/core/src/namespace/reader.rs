//! [`FileReader`]: reads of one version of a file, which it keeps alive. Besides reads at an
//! offset it is a [`tokio::io::AsyncRead`] and [`tokio::io::AsyncSeek`] (a block read at a
//! time), so `tokio::io::copy` and friends work on it.
//!
//! Readahead: a reader whose reads follow each other keeps the blocks after the one it reads
//! loading into the cache in the background (`Inner::prefetch`), so that a far store's
//! latency is paid once per window, not once per block. A read from the file's start, or
//! one that follows the previous read, starts a window of [`FIRST_WINDOW`] blocks; the next
//! sequential read widens it to half the window the last sequential reader grew to (so each
//! file does not learn the store's latency again), and it quadruples each time the reader
//! catches up with it (the block it reads is not cached yet), until the downloads in flight
//! cover the link's bandwidth-delay product, at most [`MAX_AHEAD_BYTES`] or an eighth of the
//! cache shared among the readers reading ahead at the time. A read elsewhere ends it:
//! random access prefetches nothing. Prefetched blocks are clean cache entries like any other, so the
//! memory they take is the cache's disk, not buffers.
//!
//! Across files: a reader that reads its file from the start to its end, in one stream,
//! looks up the next name in the file's directory (byte order; empty files, which have
//! nothing to read, are passed over) and notes it as the file expected next
//! (`Shared::read_next`). If its own file was the one
//! expected, the files are being read in name order (`cp -r`, `tar`, a client walking a
//! listing): it also starts loading a window of the files after it (the widest window
//! readers grew to, spanning as many files of the directory as it covers), so that the next
//! file's first reads do not each wait a round trip for the store. The file expected next
//! does so at its first read too, not only once read: a reader that finds its file loaded
//! ahead reads it at the cache's speed. One file read alone, files read in part (a client
//! reading the first bytes of each), or files read out of order, load nothing of another; a
//! reader that stops after a file read whole and the first read of the next leaves at most
//! one window of the files after them loaded for nothing.

use std::future::Future;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};

use super::FileMeta;
use super::shared::{PinGuard, Shared};
use crate::{BlockKey, Result};

/// The readahead window on the second sequential read, in blocks.
const FIRST_WINDOW: u64 = 4;
/// Files after a reader's own that its lookup names, for a window spanning files
/// ([`FileReader::follow`]).
const FOLLOW_FILES: u32 = 16;
/// The most one reader keeps loading ahead of itself.
const MAX_AHEAD_BYTES: u64 = 64 << 20;

/// One reader's readahead.
#[derive(Debug, Default)]
struct ReadAhead {
    /// Whether a read was seen.
    started: bool,
    /// Where the next sequential read would start.
    next: u64,
    /// Blocks kept loading ahead of the reader; 0 while it reads elsewhere.
    window: u64,
    /// The first block not asked for yet.
    asked_until: u64,
    /// All reads so far were one stream from the file's start.
    whole: bool,
    /// The files after this one were looked up at its first read ([`FileReader::follow`]).
    followed_early: bool,
    /// ... and once it was read to its end.
    followed: bool,
}

/// What made a reader look up the files after its own ([`FileReader::follow`]).
#[derive(Debug, Clone, Copy)]
enum Follow {
    /// Its first read, of the file expected next.
    Expected,
    /// It read its file from the start to the end in one stream.
    ReadWhole,
}

/// A read in flight for [`tokio::io::AsyncRead`].
type PendingRead = Pin<Box<dyn Future<Output = Result<Bytes>> + Send>>;

/// A file opened for reading; keeps the content it opened alive.
pub struct FileReader {
    shared: Arc<Shared>,
    meta: FileMeta,
    _pin: PinGuard,
    /// Where [`tokio::io::AsyncRead`] reads next.
    pos: u64,
    /// Bytes read from `pos` on and not yet handed out.
    buffered: Bytes,
    /// The read in flight, if any. Behind a mutex only so that the reader stays `Sync`; it is
    /// only ever locked inside a poll, never across an await.
    pending: Mutex<Option<PendingRead>>,
    /// Behind a mutex only so that reads can take `&self`; never held across an await nor
    /// while another lock is taken.
    ahead: Mutex<ReadAhead>,
}

impl std::fmt::Debug for FileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReader")
            .field("meta", &self.meta)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl FileReader {
    pub(super) fn new(shared: Arc<Shared>, meta: FileMeta, pin: PinGuard) -> Self {
        Self {
            shared,
            meta,
            _pin: pin,
            pos: 0,
            buffered: Bytes::new(),
            pending: Mutex::new(None),
            ahead: Mutex::new(ReadAhead::default()),
        }
    }

    /// The file as opened.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file, as opened).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.read_ahead(offset, len as u64);
        self.shared
            .read(self.meta.inode, self.meta.size, offset, len)
            .await
    }

    /// Notes a read of `len` bytes at `offset` and, for a sequential reader, asks for the
    /// blocks of its window that were not asked for yet (see the module's doc).
    fn read_ahead(&self, offset: u64, len: u64) {
        let size = self.meta.size;
        let end = offset.saturating_add(len).min(size);
        if end <= offset {
            return;
        }
        let inner = &self.shared.inner;
        let bs = self.shared.block_size().max(1);
        let inode = self.meta.inode;
        let ahead = &self.shared.readers_ahead;
        let (sequential, window, asked_until) = {
            let mut ra = self.ahead.lock().expect("readahead poisoned");
            // Reads a block apart count as one stream: concurrent reads of one reader may
            // arrive slightly out of order.
            let sequential = offset.abs_diff(ra.next) <= bs && (ra.started || offset == 0);
            ra.whole = sequential && (ra.whole || !ra.started);
            ra.started = true;
            ra.next = end;
            let window = ra.window;
            if !sequential && window > 0 {
                ahead.fetch_sub(1, Ordering::Relaxed);
                ra.window = 0;
                ra.asked_until = 0;
            } else if sequential && window == 0 {
                ahead.fetch_add(1, Ordering::Relaxed);
                ra.window = FIRST_WINDOW;
            }
            (sequential, window, ra.asked_until)
        };
        if !sequential {
            return;
        }
        let room = inner.config().max_bytes / 8 / ahead.load(Ordering::Relaxed).max(1);
        let max_window = (MAX_AHEAD_BYTES.min(room) / bs).max(1);
        let hint = &self.shared.readahead_hint;
        let window = if window == 0 {
            FIRST_WINDOW.max(hint.load(Ordering::Relaxed) / 2)
        } else if !inner.is_cached(BlockKey::new(inode, offset / bs)) {
            // The reader caught up with the window: more downloads must be in flight.
            let grown = (window * 4).max(hint.load(Ordering::Relaxed) / 2);
            hint.store(grown.min(max_window), Ordering::Relaxed);
            grown
        } else {
            window.max(hint.load(Ordering::Relaxed) / 2)
        }
        .min(max_window);
        let current = (end - 1) / bs;
        let last = (size - 1) / bs;
        let to = current.saturating_add(window).min(last);
        let mut next = asked_until.max(current + 1);
        while next <= to && inner.prefetch(BlockKey::new(inode, next)) {
            next += 1;
        }
        // The file expected next, read from its start: the files after it start loading at
        // once, not only once it is read (a reader that finds its file loaded ahead gets
        // there in no time, then waits for the next).
        let expected = offset == 0
            && self
                .shared
                .read_next
                .lock()
                .expect("read_next poisoned")
                .as_deref()
                == Some(self.meta.name.as_str());
        let follow = {
            let mut ra = self.ahead.lock().expect("readahead poisoned");
            // Unless a read elsewhere ended the stream meanwhile (it is then not counted).
            if ra.window > 0 {
                ra.window = window;
                ra.asked_until = ra.asked_until.max(next);
            }
            if ra.whole && end == size && !ra.followed {
                ra.followed = true;
                Some(Follow::ReadWhole)
            } else if expected && !ra.followed_early {
                ra.followed_early = true;
                Some(Follow::Expected)
            } else {
                None
            }
        };
        if let Some(how) = follow {
            // As much of the files after as the widest window readers grew to.
            self.follow(
                how,
                window.max(hint.load(Ordering::Relaxed)).min(max_window),
            );
        }
    }

    /// Looks up the files after this one in its directory and starts loading `window` blocks
    /// of them if this file was the one expected next; once this file was read whole, notes
    /// the next one as expected (see the module's doc). In the background: the lookup is a
    /// query.
    fn follow(&self, how: Follow, window: u64) {
        let shared = Arc::clone(&self.shared);
        let name = self.meta.name.clone();
        // Without a runtime there is nothing to load ahead with either.
        let _ = self.shared.spawn_cleanup(async move {
            let dir = name.rfind('/').map_or("", |i| &name[..=i]);
            let after = match shared.db.list_files(dir, Some(&name), FOLLOW_FILES).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::debug!(%error, name, "looking up the files after it failed");
                    return;
                }
            };
            let expected = {
                let mut read_next = shared.read_next.lock().expect("read_next poisoned");
                let expected = read_next.as_deref() == Some(name.as_str());
                if let Follow::ReadWhole = how {
                    // An empty file is never read, so it cannot be the one read next: the
                    // chain would break at it.
                    *read_next = after.iter().find(|n| n.size > 0).map(|n| n.name.clone());
                }
                expected
            };
            if !expected {
                return;
            }
            // The window spans files: a reader that finds the next file loaded reads it at
            // the cache's speed, and the one after must be loading by then too. Blocks of a
            // file replaced or deleted meanwhile are loaded for nothing, or not at all: a
            // removal takes each block's lock, as a prefetch does.
            let bs = shared.block_size().max(1);
            let mut left = window;
            for next in after.iter().filter(|n| n.size > 0) {
                for blockno in 0..next.size.div_ceil(bs).min(left) {
                    if !shared.inner.prefetch(BlockKey::new(next.inode, blockno)) {
                        return;
                    }
                    left -= 1;
                }
                if left == 0 {
                    return;
                }
            }
        });
    }

    /// The volume's block size: reads of whole aligned blocks are served without copies.
    pub fn block_size(&self) -> u64 {
        self.shared.block_size()
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        let ra = self.ahead.get_mut().expect("readahead poisoned");
        if ra.window > 0 {
            self.shared.readers_ahead.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for FileReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buffered.is_empty() {
                let n = buf.remaining().min(this.buffered.len());
                buf.put_slice(&this.buffered[..n]);
                this.buffered.advance(n);
                this.pos += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.pos >= this.meta.size || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this
                .pending
                .get_mut()
                .expect("pending read poisoned")
                .is_none()
            {
                // Up to the end of the block `pos` is in: one block of memory at a time.
                let bs = this.shared.block_size().max(1);
                let len = (bs - this.pos % bs).min(this.meta.size - this.pos);
                this.read_ahead(this.pos, len);
            }
            let pending = this.pending.get_mut().expect("pending read poisoned");
            let read = pending.get_or_insert_with(|| {
                let bs = this.shared.block_size().max(1);
                let len = (bs - this.pos % bs).min(this.meta.size - this.pos) as usize;
                let (shared, inode, size, pos) = (
                    this.shared.clone(),
                    this.meta.inode,
                    this.meta.size,
                    this.pos,
                );
                Box::pin(async move { shared.read(inode, size, pos, len).await })
            });
            let got = std::task::ready!(read.as_mut().poll(cx));
            *pending = None;
            match got {
                Ok(bytes) if bytes.is_empty() => return Poll::Ready(Ok(())),
                Ok(bytes) => this.buffered = bytes,
                Err(e) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
    }
}

impl tokio::io::AsyncSeek for FileReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let this = self.get_mut();
        let target = match position {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => this.meta.size.checked_add_signed(d),
            SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        };
        let Some(target) = target else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a seek before the start of the file",
            ));
        };
        this.pos = target;
        this.buffered = Bytes::new();
        // A read in flight was for the old position.
        *this.pending.get_mut().expect("pending read poisoned") = None;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
