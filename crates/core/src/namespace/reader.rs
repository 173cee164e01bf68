//! [`FileReader`]: reads of one version of a file, which it keeps alive. Besides reads at an
//! offset it is a [`tokio::io::AsyncRead`] and [`tokio::io::AsyncSeek`] (a block read at a
//! time), so `tokio::io::copy` and friends work on it.

use std::future::Future;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};

use super::FileMeta;
use super::shared::{PinGuard, Shared};
use crate::Result;

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
        }
    }

    /// The file as opened.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file, as opened).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.shared
            .read(self.meta.inode, self.meta.size, offset, len)
            .await
    }

    /// The volume's block size: reads of whole aligned blocks are served without copies.
    pub fn block_size(&self) -> u64 {
        self.shared.block_size()
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
            let pending = this.pending.get_mut().expect("pending read poisoned");
            let read = pending.get_or_insert_with(|| {
                // Up to the end of the block `pos` is in: one block of memory at a time.
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
