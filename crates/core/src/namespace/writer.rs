//! [`FileWriter`]: a file written sequentially, block by block, into a staging inode: a
//! replacement swaps it in at the end, a patch merges it into the file's inode. Besides
//! [`FileWriter::write`] it is a [`tokio::io::AsyncWrite`] (a block in memory at a time, or
//! with [`FileWriter::overlap_writes`] a few batches of blocks), so `tokio::io::copy` can fill
//! it; [`FileWriter::finish`] still decides its fate.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::BytesMut;
use sha2::{Digest, Sha256};

use super::shared::Shared;
use super::{Durability, FileMeta, now_ns};
use crate::engine::Access;
use crate::keylock::KeyGuard;
use crate::{BlockKey, Error, Result};

/// What a writer does when it finishes.
#[derive(Debug)]
pub(super) enum Mode {
    /// A new version of the file, named at the end.
    Replace,
    /// A patch of the file whose inode is `target`, merged into it at the end.
    Patch {
        name_lock: KeyGuard<String>,
        target: u64,
        old_size: u64,
        /// The block that [`FileWriter::prefill`] staged whole, if any.
        prefilled: Option<u64>,
    },
    /// Finished or given up: the staging inode is someone else's business.
    Done,
}

/// Writes a file sequentially, block by block: memory stays at one block (with
/// [`FileWriter::overlap_writes`], [`FileWriter::overlap_blocks`]) whatever the size.
pub struct FileWriter {
    shared: Arc<Shared>,
    name: String,
    inode: u64,
    mode: Mode,
    /// Where the writer started.
    start: u64,
    /// File offset of the first byte of `buf`.
    pos: u64,
    buf: BytesMut,
    /// The SHA-256 of the block being filled at the end of `buf` so far, if its bytes
    /// start at the block's start.
    hasher: Option<Sha256>,
    /// With [`FileWriter::overlap_writes`], the hashes of the completed blocks that `buf`
    /// holds before the one being filled, one per block, oldest first.
    hashes: Vec<Option<[u8; 32]>>,
    /// How many completed blocks the next task is handed: 1 for the first, twice as many
    /// for each next one, up to [`overlap_batch`].
    batch: u64,
    /// Whether completed blocks start their way to the disk at once ([`FileWriter::write_behind`]).
    write_behind: bool,
    /// Those syncs still running, oldest first.
    ahead: std::collections::VecDeque<tokio::task::JoinHandle<Result<()>>>,
    /// Attributes the file gets when a replacement names it ([`FileWriter::set_attrs`]).
    attrs: Option<String>,
    /// Whether the finish names the file only if the name is free ([`FileWriter::create_only`]).
    only_if_free: bool,
    /// The pieces being written, oldest first: the one [`tokio::io::AsyncWrite`] started, or
    /// the batches of [`FileWriter::overlap_writes`]. Behind a mutex only so that the writer
    /// stays `Sync`; locked only inside a poll.
    pending: Mutex<std::collections::VecDeque<PendingPut>>,
    /// Set by a failed write: the writer then refuses everything but being given up.
    failed: bool,
    /// Whether completed blocks are written by a task of their own while the next ones fill
    /// ([`FileWriter::overlap_writes`]).
    overlap: bool,
    /// Bytes of small blocks completed since the last write-behind `syncfs`.
    behind_bytes: u64,
    /// Set while [`FileWriter::write`] runs: a write cancelled half-way may have dropped
    /// bytes that earlier writes were told were taken, so the writer is then failed.
    interrupted: bool,
    /// What [`FileWriter::hold_while_writing`] keeps until the blocks handed to tasks of
    /// their own are written, past the writer's drop if need be.
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("name", &self.name)
            .field("inode", &self.inode)
            .field("mode", &self.mode)
            .field("pos", &self.pos)
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// A piece being written for [`tokio::io::AsyncWrite`], or by a task of its own: gives back
/// its buffer and the syncs started ahead.
type PendingPut = Pin<Box<dyn Future<Output = Result<(BytesMut, Vec<Ahead>)>> + Send>>;

/// A sync of a completed block started in the background ([`FileWriter::write_behind`]).
type Ahead = tokio::task::JoinHandle<Result<()>>;

/// Writes `piece` (within one block) at `offset` of block `key`; `hash` is its SHA-256 if
/// it starts at the block's start. Then starts its way to the disk as `sync` says.
async fn put_piece(
    inner: Arc<crate::engine::Inner>,
    key: BlockKey,
    offset: u64,
    piece: &[u8],
    hash: Option<[u8; 32]>,
    sync: SyncAhead,
) -> Result<Option<Ahead>> {
    let mut handle = inner.handle(key, Access::Write).await?;
    handle.write_with_hash(offset, piece, hash).await?;
    // The block's lock is not held while waiting for the disk.
    Ok(match sync {
        SyncAhead::No => None,
        SyncAhead::Block => handle.sync_ahead(),
        SyncAhead::FileSystem => {
            drop(handle);
            Some(inner.sync_filesystem_ahead())
        }
    })
}

/// Writes `data`, which starts at file offset `pos` of `inode`, block by block: piece `i`
/// (from `pos` or a block's start to the next block's start or the end) gets `hashes[i]`
/// and `syncs[i]`; with `hash`, each piece that starts at its block's start is hashed here
/// instead. Returns the syncs started ahead.
async fn put_pieces(
    inner: Arc<crate::engine::Inner>,
    inode: u64,
    mut pos: u64,
    mut data: &[u8],
    hashes: &[Option<[u8; 32]>],
    syncs: &[SyncAhead],
    hash: bool,
) -> Result<Vec<Ahead>> {
    let bs = inner.config().block_size;
    let mut ahead = Vec::new();
    for (&given, &sync) in hashes.iter().zip(syncs) {
        let n = ((bs - pos % bs) as usize).min(data.len());
        let key = BlockKey::new(inode, pos / bs);
        let hash = match given {
            None if hash && pos.is_multiple_of(bs) => Some(Sha256::digest(&data[..n]).into()),
            given => given,
        };
        let task = put_piece(inner.clone(), key, pos % bs, &data[..n], hash, sync).await?;
        ahead.extend(task);
        pos += n as u64;
        data = &data[n..];
    }
    debug_assert!(data.is_empty(), "a piece without its hash");
    Ok(ahead)
}

/// Completed blocks that a writer with [`FileWriter::overlap_writes`] gathers for one task
/// to write, at most this many bytes of them and [`OVERLAP_BLOCKS`]: a task and its wakeups
/// per small block cost more than the overlap gains (at 64 KiB blocks, a plain client's
/// PUTs were faster without overlap than with a task per block).
const OVERLAP_BYTES: u64 = 1 << 20;

/// See [`OVERLAP_BYTES`].
const OVERLAP_BLOCKS: u64 = 16;

/// Batches that a writer with [`FileWriter::overlap_writes`] has written at once, by tasks
/// of their own that also hash them: with hashing (about 0.6 ms per MiB) off the task that
/// receives, two of them keep up with it.
const OVERLAP_DEPTH: usize = 2;

/// How many completed blocks of `block_size` bytes a writer with
/// [`FileWriter::overlap_writes`] hands to one task (at least one).
fn overlap_batch(block_size: u64) -> u64 {
    (OVERLAP_BYTES / block_size).clamp(1, OVERLAP_BLOCKS)
}

/// How a completed block starts its way to the disk ([`FileWriter::write_behind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncAhead {
    No,
    /// An fdatasync of the block's file.
    Block,
    /// A `syncfs` of the cache's file system, for the blocks written since the last one.
    FileSystem,
}

/// Blocks of at least this size get a write-behind sync each; smaller ones one `syncfs`
/// per this many bytes of them (an fdatasync per small block costs a journal commit each).
const WRITE_BEHIND_BYTES: u64 = 1 << 20;

/// Longest attributes of a file ([`FileWriter::set_attrs`]).
pub const MAX_ATTRS_LEN: usize = 16 * 1024;

/// Syncs of completed blocks that one writer keeps running ([`FileWriter::write_behind`]).
const WRITE_BEHIND_DEPTH: usize = 4;

impl FileWriter {
    pub(super) fn new(
        shared: Arc<Shared>,
        name: String,
        inode: u64,
        mode: Mode,
        start: u64,
    ) -> Self {
        Self {
            shared,
            name,
            inode,
            mode,
            start,
            pos: start,
            buf: BytesMut::new(),
            hasher: None,
            hashes: Vec::new(),
            batch: 1,
            write_behind: false,
            ahead: std::collections::VecDeque::new(),
            attrs: None,
            only_if_free: false,
            pending: Mutex::new(std::collections::VecDeque::new()),
            failed: false,
            overlap: false,
            behind_bytes: 0,
            interrupted: false,
            held: None,
        }
    }

    /// `Err` once a write failed ([`Error::WriterFailed`]).
    fn check_failed(&self) -> Result<()> {
        if self.failed || self.interrupted {
            return Err(Error::WriterFailed {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Makes [`FileWriter::finish`] name the file only if no file has the name then: the
    /// check and the naming are one transaction, so of writers racing for a free name one
    /// wins and the others get [`Error::Exists`] (and leave nothing behind). Only for a
    /// replacement ([`crate::Namespace::create`]).
    pub fn create_only(&mut self) -> Result<()> {
        if !matches!(self.mode, Mode::Replace) {
            return Err(Error::InvalidAttrs(
                "only a new file can be created only if its name is free".to_owned(),
            ));
        }
        self.only_if_free = true;
        Ok(())
    }

    /// Sets the attributes that the file gets with its content when [`FileWriter::finish`]
    /// names it (opaque text, at most [`MAX_ATTRS_LEN`] bytes). Only for a replacement
    /// ([`crate::Namespace::create`]): a patch clears the attributes, which described the
    /// content before it.
    pub fn set_attrs(&mut self, attrs: Option<String>) -> Result<()> {
        if let Some(a) = &attrs
            && a.len() > MAX_ATTRS_LEN
        {
            return Err(Error::InvalidAttrs(format!(
                "attributes of {} bytes: at most {MAX_ATTRS_LEN}",
                a.len()
            )));
        }
        if !matches!(self.mode, Mode::Replace) {
            return Err(Error::InvalidAttrs(
                "only a replacement sets attributes; a patch clears them".to_owned(),
            ));
        }
        self.attrs = attrs;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.pos + self.buf.len() as u64 - self.start
    }

    /// Appends `data`. Whole blocks go to the cache as soon as they are complete. After an
    /// error, or after a call that was cancelled before it returned (it may have dropped
    /// bytes that earlier calls took), the writer can only be given up: later calls fail
    /// with [`Error::WriterFailed`].
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.check_failed()?;
        // Until this write returns: one cancelled half-way leaves the writer failed.
        self.interrupted = true;
        let written = self.write_inner(data).await;
        self.interrupted = false;
        if written.is_err() {
            self.failed = true;
        }
        written
    }

    async fn write_inner(&mut self, mut data: &[u8]) -> Result<()> {
        if !self.overlap {
            self.settle_pending().await?;
        }
        let end = self.pos + (self.buf.len() + data.len()) as u64;
        if end > self.shared.max_file_size {
            return Err(Error::FileTooLarge {
                name: self.name.clone(),
                size: end,
                max: self.shared.max_file_size,
            });
        }
        let bs = self.shared.block_size();
        while !data.is_empty() {
            // `buf` holds the bytes from `pos` on, all within one block.
            let filled = self.pos + self.buf.len() as u64;
            let room = (bs - filled % bs) as usize;
            let n = room.min(data.len());
            if self.buf.is_empty() && n == room && !self.overlap {
                // A piece that ends at the block's end: write it without buffering.
                let hash = filled
                    .is_multiple_of(bs)
                    .then(|| Sha256::digest(&data[..n]).into());
                self.put(&data[..n], &[hash]).await?;
            } else if self.gather(&data[..n]) && self.batch_full() {
                if self.overlap {
                    // At most `OVERLAP_DEPTH` batches are written at once: the oldest is
                    // done (its buffer comes back for the next one) before this one starts
                    // beside the filling.
                    self.settle_to(OVERLAP_DEPTH - 1).await?;
                    let piece = std::mem::take(&mut self.buf);
                    let hashes = std::mem::take(&mut self.hashes);
                    self.start_put(piece, hashes);
                } else {
                    let mut piece = std::mem::take(&mut self.buf);
                    let hashes = std::mem::take(&mut self.hashes);
                    self.put(&piece, &hashes).await?;
                    piece.clear();
                    self.buf = piece;
                }
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// Buffers `bytes`, which end at or before the end of the block being filled, hashing
    /// them as they come (while they are in the CPU's cache) unless an overlapping writer's
    /// tasks hash them, on the other core. Returns whether they complete the block, whose
    /// hash then joins `hashes`.
    fn gather(&mut self, bytes: &[u8]) -> bool {
        let bs = self.shared.block_size();
        let filled = self.pos + self.buf.len() as u64;
        if self.buf.capacity() == 0 {
            self.buf = self.take_buffer();
        }
        if self.buf.is_empty() || filled.is_multiple_of(bs) {
            self.hasher = (filled.is_multiple_of(bs) && !self.overlap).then(Sha256::new);
        }
        self.buf.extend_from_slice(bytes);
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        let completed = (filled + bytes.len() as u64).is_multiple_of(bs);
        if completed {
            self.hashes
                .push(self.hasher.take().map(|h| h.finalize().into()));
        }
        completed
    }

    /// Whether the completed blocks in `buf` are to be written now: at once without
    /// [`FileWriter::overlap_writes`], else once they make a batch.
    fn batch_full(&self) -> bool {
        !self.overlap || self.hashes.len() as u64 >= self.batch
    }

    /// Writes `piece` (from `pos`), block by block: `hashes` has one item per block it
    /// touches, the SHA-256 of its bytes there if they start at the block's start.
    async fn put(&mut self, piece: &[u8], hashes: &[Option<[u8; 32]>]) -> Result<()> {
        self.settle_pending().await?;
        let syncs = self.syncs_ahead(piece.len() as u64, hashes.len());
        let tasks = put_pieces(
            self.shared.inner.clone(),
            self.inode,
            self.pos,
            piece,
            hashes,
            &syncs,
            self.overlap,
        )
        .await?;
        self.pos += piece.len() as u64;
        for task in tasks {
            if self.ahead.len() >= WRITE_BEHIND_DEPTH {
                self.wait_ahead(1).await?;
            }
            self.ahead.push_back(task);
        }
        Ok(())
    }

    /// How each of the `pieces` blocks of the `len` bytes from `pos` starts its way to the
    /// disk ([`FileWriter::sync_ahead`]).
    fn syncs_ahead(&mut self, len: u64, pieces: usize) -> Vec<SyncAhead> {
        let bs = self.shared.block_size();
        let end = self.pos + len;
        let mut at = self.pos;
        (0..pieces)
            .map(|_| {
                let next = (at / bs + 1) * bs;
                at = next.min(end);
                self.sync_ahead(at.is_multiple_of(bs))
            })
            .collect()
    }

    /// A block buffer: with [`FileWriter::overlap_writes`], room for a batch of blocks.
    fn take_buffer(&self) -> BytesMut {
        let bs = self.shared.block_size();
        let blocks = if self.overlap { overlap_batch(bs) } else { 1 };
        self.shared.take_buffer((blocks * bs) as usize)
    }

    /// Starts writing `piece` (from `pos`; one item of `hashes` per block it touches, as in
    /// [`FileWriter::put`]): for [`tokio::io::AsyncWrite`], driven by the writer's next
    /// polls; with [`FileWriter::overlap_writes`], by a task of its own. `pos` moves past it
    /// at once; a failure fails the writer when it is settled.
    fn start_put(&mut self, piece: BytesMut, hashes: Vec<Option<[u8; 32]>>) {
        let len = piece.len() as u64;
        let syncs = self.syncs_ahead(len, hashes.len());
        self.batch = (self.batch * 2).min(overlap_batch(self.shared.block_size()));
        let (inner, inode, pos, hash) = (
            self.shared.inner.clone(),
            self.inode,
            self.pos,
            self.overlap,
        );
        let write = async move {
            let tasks = put_pieces(inner, inode, pos, &piece, &hashes, &syncs, hash).await?;
            Ok((piece, tasks))
        };
        let put: PendingPut = if self.overlap {
            let task = tokio::spawn(write);
            Box::pin(async move {
                match task.await {
                    Ok(done) => done,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => Err(Error::ShuttingDown),
                }
            })
        } else {
            Box::pin(write)
        };
        self.pos += len;
        self.pending
            .get_mut()
            .expect("pending put poisoned")
            .push_back(put);
    }

    /// How the block being put starts its way to the disk, if it completes a block
    /// (`ends_block`) of a writer that writes behind.
    fn sync_ahead(&mut self, ends_block: bool) -> SyncAhead {
        if !self.write_behind || !ends_block {
            return SyncAhead::No;
        }
        let bs = self.shared.block_size();
        if bs >= WRITE_BEHIND_BYTES {
            return SyncAhead::Block;
        }
        self.behind_bytes += bs;
        if self.behind_bytes < WRITE_BEHIND_BYTES {
            return SyncAhead::No;
        }
        self.behind_bytes = 0;
        SyncAhead::FileSystem
    }

    /// Lets completed blocks be written by a task of their own while the writer takes the
    /// next blocks' bytes, so that receiving and hashing and writing use two cores. Blocks
    /// under 1 MiB are handed over in batches, one task per batch: the first block alone,
    /// then twice as many each time, up to 1 MiB and 16 blocks; the tasks hash the blocks
    /// too, and two run at once. The writer then holds three batches of memory instead of
    /// one block ([`FileWriter::overlap_blocks`]). A dropped writer's batches being written
    /// are written out before its staging inode is cleaned.
    pub fn overlap_writes(&mut self) {
        self.overlap = true;
    }

    /// Keeps `guard` (a claim on memory, say) until the writer is dropped or finished and
    /// every block it handed to a task of its own is written: a writer dropped while a batch
    /// is being written lets go of `guard` only once that batch, whose bytes it holds, is
    /// done.
    pub fn hold_while_writing(&mut self, guard: impl Send + Sync + 'static) {
        self.held = Some(Box::new(guard));
    }

    /// The most blocks of memory that a writer holds with [`FileWriter::overlap_writes`]:
    /// the batches being written and the next one filling (a writer without it holds one).
    pub fn overlap_blocks(&self) -> u64 {
        (OVERLAP_DEPTH as u64 + 1) * overlap_batch(self.shared.block_size())
    }

    /// Drives the pieces being written until at most `keep` are left, and the oldest
    /// background sync while more than [`WRITE_BEHIND_DEPTH`] run.
    fn poll_pending(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<Result<()>> {
        let polled = self.poll_pending_inner(cx, keep);
        if let Poll::Ready(Err(_)) = &polled {
            self.failed = true;
        }
        polled
    }

    fn poll_pending_inner(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<Result<()>> {
        if self.failed {
            return Poll::Ready(self.check_failed());
        }
        let pending = self.pending.get_mut().expect("pending put poisoned");
        while pending.len() > keep {
            let put = pending.front_mut().expect("counted");
            let done = std::task::ready!(put.as_mut().poll(cx));
            pending.pop_front();
            let (mut piece, tasks) = done?;
            self.ahead.extend(tasks);
            piece.clear();
            if self.buf.capacity() == 0 {
                self.buf = piece;
            } else {
                self.shared.recycle_buffer(piece);
            }
        }
        while self.ahead.len() > WRITE_BEHIND_DEPTH {
            let front = self.ahead.front_mut().expect("counted");
            // A task that never ran (the runtime is shutting down) synced nothing.
            let synced =
                std::task::ready!(Pin::new(front).poll(cx)).unwrap_or(Err(Error::ShuttingDown));
            self.ahead.pop_front();
            synced?;
        }
        Poll::Ready(Ok(()))
    }

    /// Waits for the pieces being written (for [`tokio::io::AsyncWrite`], or by tasks of
    /// their own).
    async fn settle_pending(&mut self) -> Result<()> {
        self.settle_to(0).await
    }

    /// Waits until at most `keep` pieces are being written.
    async fn settle_to(&mut self, keep: usize) -> Result<()> {
        std::future::poll_fn(|cx| self.poll_pending(cx, keep)).await
    }

    /// Makes each completed block start its way to the disk at once (an fdatasync in the
    /// background, at most `WRITE_BEHIND_DEPTH` (4) at a time), for a writer that will
    /// [`finish`](FileWriter::finish) with `local` or `store` durability: the sync there then
    /// finds the data written instead of writing it all while the caller waits. A failed
    /// background sync fails the next write or the finish.
    pub fn write_behind(&mut self) {
        self.write_behind = true;
    }

    /// Waits for the `n` oldest background syncs; the first error is returned.
    async fn wait_ahead(&mut self, n: usize) -> Result<()> {
        let mut result = Ok(());
        for _ in 0..n.min(self.ahead.len()) {
            let task = self.ahead.pop_front().expect("counted");
            // A task that never ran (the runtime is shutting down) synced nothing.
            let synced = task.await.unwrap_or(Err(Error::ShuttingDown));
            if result.is_ok() {
                result = synced;
            }
        }
        result
    }

    /// For a patch, before its first byte: stages the file's bytes that the patch's first
    /// block keeps, if the patch starts inside a block with old content. (A gap between the
    /// old end and the patch reads as zeros because the merge cuts the file at its old end.)
    pub(super) async fn prefill(&mut self) -> Result<()> {
        let Mode::Patch {
            target, old_size, ..
        } = &self.mode
        else {
            return Ok(());
        };
        let (target, old_size) = (*target, *old_size);
        let bs = self.shared.block_size();
        let first = self.start / bs;
        let first_start = first * bs;
        if !self.start.is_multiple_of(bs) && first_start < old_size {
            self.shared
                .copy_range(
                    target,
                    self.inode,
                    first,
                    0..(old_size - first_start).min(bs),
                )
                .await?;
            if let Mode::Patch { prefilled, .. } = &mut self.mode {
                *prefilled = Some(first);
            }
        }
        Ok(())
    }

    /// For a patch that ends inside a block with old content: stages the file's bytes after
    /// the patch's end in that block.
    async fn fill_tail(&mut self) -> Result<()> {
        let Mode::Patch {
            target,
            old_size,
            prefilled,
            ..
        } = &self.mode
        else {
            return Ok(());
        };
        let bs = self.shared.block_size();
        let last = self.pos / bs;
        let in_block = self.pos % bs;
        if in_block == 0 || self.pos >= *old_size || *prefilled == Some(last) {
            return Ok(());
        }
        let end = (*old_size - last * bs).min(bs);
        let (target, inode) = (*target, self.inode);
        self.shared
            .copy_range(target, inode, last, in_block..end)
            .await
    }

    /// Gives the writer up: the file keeps its old content, and the staging inode and its
    /// blocks are removed before this returns, so nothing of it is left for a flush to
    /// upload (dropping the writer removes them in the background; so does this if it is
    /// cancelled).
    pub async fn abandon(mut self) {
        if !matches!(self.mode, Mode::Done) {
            // A block still being written must not land after the cleaning, whether or not
            // the writer failed. Polled in place: if this is cancelled, `Drop` waits for it.
            std::future::poll_fn(|cx| {
                let pending = self.pending.get_mut().expect("pending put poisoned");
                while let Some(put) = pending.front_mut() {
                    let _ = std::task::ready!(put.as_mut().poll(cx));
                    pending.pop_front();
                }
                Poll::Ready(())
            })
            .await;
            self.shared.clean_logged(self.inode).await;
            self.mode = Mode::Done;
        }
    }

    /// Writes what is buffered, makes the data as durable as asked, then makes it visible:
    /// a replacement swaps the new content in, a patch is committed and merged into the
    /// file. An error leaves the file as it was.
    pub async fn finish(mut self, durability: Durability) -> Result<FileMeta> {
        // Dropped on an error: the staging inode is cleaned, the file keeps its content.
        self.check_failed()?;
        self.settle_pending().await?;
        if !self.buf.is_empty() {
            let mut piece = std::mem::take(&mut self.buf);
            let mut hashes = std::mem::take(&mut self.hashes);
            let filled = self.pos + piece.len() as u64;
            if !filled.is_multiple_of(self.shared.block_size()) {
                // The last block, cut short by the end.
                hashes.push(self.hasher.take().map(|h| h.finalize().into()));
            }
            self.put(&piece, &hashes).await?;
            piece.clear();
            self.buf = piece;
        }
        self.fill_tail().await?;
        self.wait_ahead(self.ahead.len()).await?;
        match &self.mode {
            Mode::Patch { target, .. } => {
                self.shared
                    .make_change_durable(self.inode, *target, durability)
                    .await?;
            }
            _ => self.shared.make_durable(self.inode, durability).await?,
        }
        let end = self.pos;
        // From here the writer's fate is decided by one task that runs to its end even if
        // the caller gives up: a name swapped in but then cleaned as abandoned would lose
        // the file.
        let mode = std::mem::replace(&mut self.mode, Mode::Done);
        self.start = self.pos;
        let (shared, name, inode) = (self.shared.clone(), self.name.clone(), self.inode);
        let attrs = self.attrs.take();
        let only_if_free = self.only_if_free;
        match mode {
            Mode::Replace => {
                let named = self.shared.spawn_cleanup(async move {
                    let named = {
                        let _guard = shared.names.lock(name.clone()).await;
                        shared
                            .db
                            .replace_file(
                                &name,
                                inode,
                                end,
                                now_ns(),
                                attrs.as_deref(),
                                only_if_free,
                            )
                            .await
                    };
                    match named {
                        Ok((row, old)) => {
                            if let Some(old) = old {
                                shared.retire(old).await;
                            }
                            Ok(FileMeta::from_row(row))
                        }
                        Err(e) => {
                            shared.clean_later(inode);
                            Err(Error::from(e))
                        }
                    }
                });
                let Some(named) = named else {
                    return Err(Error::ShuttingDown);
                };
                crate::engine::joined(named).await
            }
            Mode::Patch {
                name_lock,
                target,
                old_size,
                ..
            } => {
                shared
                    .commit_change(
                        name_lock,
                        name,
                        target,
                        inode,
                        end.max(old_size),
                        old_size,
                        durability,
                    )
                    .await
            }
            Mode::Done => Err(Error::ShuttingDown),
        }
    }
}

impl tokio::io::AsyncWrite for FileWriter {
    /// Takes bytes up to the end of the current block; a completed block is written before
    /// more are taken (one block of memory), or with [`FileWriter::overlap_writes`] its
    /// batch by a task of its own, as [`FileWriter::write`] does.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check_failed().map_err(std::io::Error::other)?;
        let keep = if this.overlap { OVERLAP_DEPTH - 1 } else { 0 };
        std::task::ready!(this.poll_pending(cx, keep)).map_err(std::io::Error::other)?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let filled = this.pos + this.buf.len() as u64;
        if filled + data.len() as u64 > this.shared.max_file_size {
            let err = Error::FileTooLarge {
                name: this.name.clone(),
                size: filled + data.len() as u64,
                max: this.shared.max_file_size,
            };
            this.failed = true;
            return Poll::Ready(Err(std::io::Error::other(err)));
        }
        let bs = this.shared.block_size();
        let n = ((bs - filled % bs) as usize).min(data.len());
        if this.gather(&data[..n]) && this.batch_full() {
            let piece = std::mem::take(&mut this.buf);
            let hashes = std::mem::take(&mut this.hashes);
            this.start_put(piece, hashes);
        }
        Poll::Ready(Ok(n))
    }

    /// Waits for the blocks being written. A partial block (and, with
    /// [`FileWriter::overlap_writes`], the completed blocks of a batch not yet full) stays
    /// buffered until it is complete or [`FileWriter::finish`] writes it: nothing is visible
    /// before the finish anyway, and `tokio::io::copy` flushes whenever its source stalls,
    /// which would otherwise cut blocks into pieces that lose their hash.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.poll_pending(cx, 0).map_err(std::io::Error::other)
    }

    /// As [`poll_flush`](tokio::io::AsyncWrite::poll_flush): naming the file is
    /// [`FileWriter::finish`]'s, with the durability asked.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.shared.recycle_buffer(std::mem::take(&mut self.buf));
        if !matches!(std::mem::replace(&mut self.mode, Mode::Done), Mode::Done) {
            // Given up before the end: the file never saw any of it. A block still being
            // written by a task of its own is waited for first, so that it does not land
            // after the cleaning.
            let pending = self
                .pending
                .get_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            if pending.is_empty() {
                self.shared.clean_later(self.inode);
            } else {
                // What the writer was asked to hold goes with the blocks being written.
                let held = self.held.take();
                self.shared.clean_after(self.inode, async move {
                    let _held = held;
                    futures::future::join_all(pending).await
                });
            }
        }
    }
}
