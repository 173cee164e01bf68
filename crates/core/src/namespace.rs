//! A namespace of named files over the block cache: names to inodes, sizes, byte offsets to
//! blocks, and atomic replacement.
//!
//! A file's content is the blocks of one inode, cut at the file's size (bytes past the size
//! are never shown, and holes read as zeros). [`Namespace::create`] writes a fresh *staging*
//! inode and swaps it in with one metadata transaction when it finishes, so a reader sees the
//! old content or the new, never a mix; an abandoned or failed replacement leaves the old
//! version and its staging inode is removed. The old inode of a replaced or deleted file is
//! *retired*: its blocks are removed once no reader holds it (readers pin the inode they
//! opened). Retired and staging inodes are recorded in the metadata, so the removal survives a
//! crash: [`Namespace::open`] finishes it.
//!
//! Changes of one name (finishing a replacement, a patch, a truncation, a deletion) are
//! serialized by a per-name async lock; a replacement takes it only for its final swap, so a
//! long upload never blocks other changes. Lock order: a name lock, then block locks.
//!
//! A volume used through a namespace owns its inode numbers: do not mix it with direct block
//! access by inode on the same volume.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockcache_db::FileRow;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio_util::task::TaskTracker;

use crate::engine::Inner;
use crate::keylock::{KeyGuard, KeyedLocks};
use crate::{BlockCache, BlockKey, Error, Result};

/// The longest file name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// How durable a change is when the call that makes it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// In the cache; a crash may lose it.
    None,
    /// On local disk (dirty cache files synced, metadata committed); a crash keeps it.
    #[default]
    Local,
    /// In the object store.
    Store,
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "local" => Ok(Self::Local),
            "store" => Ok(Self::Store),
            other => Err(format!(
                "unknown durability {other:?}; allowed values: none, local, store"
            )),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Store => "store",
        })
    }
}

/// Checks a file name: UTF-8 of 1 to 1024 bytes, `/`-separated segments, none of them empty,
/// `.` or `..`, and no control characters (NUL included).
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("a name must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("a name must be at most 1024 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("a name must not contain control characters (NUL included)");
    }
    for segment in name.split('/') {
        match segment {
            "" => {
                return bad(
                    "a name must not have an empty segment (leading, trailing or double '/')",
                );
            }
            "." | ".." => return bad("a name must not have a '.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}

/// What the namespace knows about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// The name.
    pub name: String,
    /// The inode holding its blocks.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification.
    pub mtime: SystemTime,
    /// Bumped on every change of the content.
    pub version: u64,
}

impl FileMeta {
    fn from_row(row: FileRow) -> Self {
        let mtime = if row.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(row.mtime_ns as u64)
        } else {
            UNIX_EPOCH
        };
        Self {
            name: row.name,
            inode: row.inode,
            size: row.size,
            mtime,
            version: row.version,
        }
    }

    /// A strong entity tag (quoted) that changes whenever the content does.
    pub fn etag(&self) -> String {
        format!("\"{:x}-{:x}\"", self.inode, self.version)
    }
}

/// Where the blocks of one file are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStatus {
    /// The file.
    pub meta: FileMeta,
    /// Blocks the size spans.
    pub blocks: u64,
    /// Blocks in the cache.
    pub cached: u64,
    /// Blocks in the cache with changes not yet in the store.
    pub dirty: u64,
    /// Blocks whose upload is in flight.
    pub uploading: u64,
    /// Blocks with content in the metadata (the rest are holes).
    pub mapped: u64,
    /// Mapped blocks whose object is confirmed in the store.
    pub uploaded: u64,
    /// Whether the store holds the whole file (nothing dirty, every mapped block uploaded).
    pub in_store: bool,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Pin {
    readers: usize,
    doomed: bool,
}

#[derive(Debug)]
struct Shared {
    inner: Arc<Inner>,
    names: Arc<KeyedLocks<String>>,
    /// Readers per inode, and whether the inode was retired while read.
    pins: Mutex<HashMap<u64, Pin>>,
    /// Removals of retired inodes started from `Drop`.
    cleanups: TaskTracker,
    /// The same tasks by the order they started in, for [`Namespace::wait_for_cleanups`].
    cleanup_tickets: tokio::sync::watch::Sender<Tickets>,
    max_file_size: u64,
    /// Staging inodes allocated ahead and not yet taken by a writer, the next one last.
    spare_inodes: Mutex<Vec<u64>>,
    /// Block buffers of finished writers, at most [`SPARE_BUFFER_BYTES`] worth: a new writer
    /// reuses pages already mapped instead of faulting in fresh ones each block.
    spare_buffers: Mutex<Vec<BytesMut>>,
}

/// Background tasks of the namespace by start order: the next ticket, and those running.
#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    running: std::collections::BTreeSet<u64>,
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
    fn block_size(&self) -> u64 {
        self.inner.config.block_size
    }

    /// An empty buffer that holds one block: a spare one, or a new one.
    fn take_buffer(&self) -> BytesMut {
        let spare = self
            .spare_buffers
            .lock()
            .expect("spare buffers poisoned")
            .pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(self.block_size() as usize))
    }

    /// Keeps `buf` for the next writer, unless enough are kept already.
    fn recycle_buffer(&self, mut buf: BytesMut) {
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
    async fn take_inode(&self) -> Result<u64> {
        if let Some(inode) = self
            .spare_inodes
            .lock()
            .expect("spare inodes poisoned")
            .pop()
        {
            return Ok(inode);
        }
        let mut fresh = self.inner.db.create_staging_inodes(INODES_AHEAD).await?;
        let first = fresh.remove(0);
        self.spare_inodes
            .lock()
            .expect("spare inodes poisoned")
            .extend(fresh.into_iter().rev());
        Ok(first)
    }

    /// Removes the blocks of a retired (or abandoned staging) inode and forgets it.
    async fn clean(&self, inode: u64) -> Result<()> {
        self.inner.db.retire_inode(inode).await?;
        self.inner.remove_range(inode, 0..u64::MAX).await?;
        self.inner.db.forget_inode(inode).await?;
        Ok(())
    }

    /// Cleans `inode` now if nobody reads it, else when its last reader is done.
    async fn retire(self: &Arc<Self>, inode: u64) {
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

    async fn clean_logged(&self, inode: u64) {
        if let Err(error) = self.clean(inode).await {
            tracing::warn!(inode, %error, "removing the blocks of a retired inode failed; the next open retries");
        }
    }

    /// Runs the cleaning of `inode` in the background (from `Drop`).
    fn clean_later(self: &Arc<Self>, inode: u64) {
        let shared = self.clone();
        if !self.spawn_cleanup(async move { shared.clean_logged(inode).await }) {
            tracing::warn!(
                inode,
                "no runtime to remove a retired inode; the next open does"
            );
        }
    }

    /// Runs `task` in the background, tracked for shutdown and for
    /// [`Namespace::wait_for_cleanups`]; false if there is no runtime to run it on.
    fn spawn_cleanup(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return false;
        };
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
        self.cleanups.spawn_on(
            async move {
                let _ticket = ticket;
                task.await;
            },
            &handle,
        );
        true
    }

    fn pin(self: &Arc<Self>, inode: u64) -> PinGuard {
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

    async fn read(&self, inode: u64, size: u64, offset: u64, len: usize) -> Result<Bytes> {
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
                .handle(BlockKey::new(inode, blockno), false)
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
    async fn trim_tail(&self, inode: u64, size: u64) -> Result<()> {
        let bs = self.block_size();
        let (last, in_block) = (size / bs, size % bs);
        let first_gone = if in_block == 0 {
            last
        } else {
            let mut h = self.inner.handle(BlockKey::new(inode, last), true).await?;
            if h.size().await? > in_block {
                h.truncate(in_block).await?;
            }
            last + 1
        };
        self.inner.remove_range(inode, first_gone..u64::MAX).await
    }

    async fn make_durable(&self, inode: u64, durability: Durability) -> Result<()> {
        match durability {
            Durability::None => Ok(()),
            Durability::Local => self.inner.sync_dirty(Some(inode)).await,
            Durability::Store => self.inner.flush(Some(inode)).await,
        }
    }
}

/// Keeps an inode's blocks while a reader uses them.
#[derive(Debug)]
struct PinGuard {
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

/// Named files over a [`BlockCache`].
#[derive(Debug)]
pub struct Namespace {
    cache: BlockCache,
    shared: Arc<Shared>,
}

impl Namespace {
    /// Puts a namespace over `cache`, first removing the blocks of inodes that an earlier run
    /// retired or left staging. Files may grow to `max_file_size` bytes.
    pub async fn open(cache: BlockCache, max_file_size: u64) -> Result<Self> {
        let shared = Arc::new(Shared {
            inner: cache.inner.clone(),
            names: Arc::new(KeyedLocks::default()),
            pins: Mutex::new(HashMap::new()),
            cleanups: TaskTracker::new(),
            cleanup_tickets: tokio::sync::watch::Sender::new(Tickets::default()),
            max_file_size,
            spare_inodes: Mutex::new(Vec::new()),
            spare_buffers: Mutex::new(Vec::new()),
        });
        let leftover = shared.inner.db.inodes_to_clean().await?;
        if !leftover.is_empty() {
            tracing::info!(
                inodes = leftover.len(),
                "removing blocks of replaced, deleted or unfinished files"
            );
        }
        for inode in leftover {
            shared.clean(inode).await?;
        }
        Ok(Self { cache, shared })
    }

    /// The block cache underneath (usage, flush, limits).
    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// The largest size a file may reach.
    pub fn max_file_size(&self) -> u64 {
        self.shared.max_file_size
    }

    /// The file called `name`.
    pub async fn stat(&self, name: &str) -> Result<FileMeta> {
        validate_name(name)?;
        self.shared
            .inner
            .db
            .file(name)
            .await?
            .map(FileMeta::from_row)
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })
    }

    /// Opens `name` for reading: the reader sees the content as of this call even if the
    /// file is replaced or deleted meanwhile (but does see later patches of it).
    pub async fn open_read(&self, name: &str) -> Result<FileReader> {
        loop {
            let meta = self.stat(name).await?;
            let pin = self.shared.pin(meta.inode);
            // A replacement may have retired the inode between the lookup and the pin: look
            // again, now that the pin keeps the inode's blocks.
            let again = self.stat(name).await?;
            if again.inode == meta.inode {
                return Ok(FileReader {
                    shared: self.shared.clone(),
                    meta: again,
                    _pin: pin,
                });
            }
        }
    }

    /// Starts replacing (or creating) `name`. Nothing is visible until
    /// [`FileWriter::finish`]; dropping the writer before that leaves the old version.
    pub async fn create(&self, name: &str) -> Result<FileWriter> {
        validate_name(name)?;
        if self.shared.inner.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let inode = self.shared.take_inode().await?;
        Ok(FileWriter {
            shared: self.shared.clone(),
            name: name.to_owned(),
            inode,
            mode: Mode::Replace { finished: false },
            start: 0,
            pos: 0,
            buf: BytesMut::new(),
            hasher: None,
            write_behind: false,
            ahead: std::collections::VecDeque::new(),
        })
    }

    /// Starts writing into `name` at `offset` (the file grows as needed; a gap past its end
    /// reads as zeros). Holds the name's lock until the writer finishes or is dropped.
    pub async fn patch(&self, name: &str, offset: u64) -> Result<FileWriter> {
        validate_name(name)?;
        let guard = self.shared.names.lock(name.to_owned()).await;
        let meta = self.stat(name).await?;
        if offset > self.shared.max_file_size {
            return Err(Error::FileTooLarge {
                name: name.to_owned(),
                size: offset,
                max: self.shared.max_file_size,
            });
        }
        if offset > meta.size {
            self.shared.trim_tail(meta.inode, meta.size).await?;
        }
        Ok(FileWriter {
            shared: self.shared.clone(),
            name: name.to_owned(),
            inode: meta.inode,
            mode: Mode::Patch {
                _guard: guard,
                old_size: meta.size,
            },
            start: offset,
            pos: offset,
            buf: BytesMut::new(),
            hasher: None,
            write_behind: false,
            ahead: std::collections::VecDeque::new(),
        })
    }

    /// Sets the size of `name`: shrinking drops the bytes past `size`, growing adds zeros.
    pub async fn truncate(
        &self,
        name: &str,
        size: u64,
        durability: Durability,
    ) -> Result<FileMeta> {
        validate_name(name)?;
        let _guard = self.shared.names.lock(name.to_owned()).await;
        let meta = self.stat(name).await?;
        if size > self.shared.max_file_size {
            return Err(Error::FileTooLarge {
                name: name.to_owned(),
                size,
                max: self.shared.max_file_size,
            });
        }
        self.shared
            .trim_tail(meta.inode, meta.size.min(size))
            .await?;
        self.shared.make_durable(meta.inode, durability).await?;
        self.shared
            .inner
            .db
            .update_file(name, meta.inode, size, now_ns())
            .await?
            .map(FileMeta::from_row)
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })
    }

    /// Deletes `name`; its blocks are removed once no reader holds them.
    pub async fn delete(&self, name: &str) -> Result<FileMeta> {
        validate_name(name)?;
        let _guard = self.shared.names.lock(name.to_owned()).await;
        let row = self.shared.inner.db.delete_file(name).await?;
        let meta = row.map(FileMeta::from_row).ok_or_else(|| Error::NotFound {
            name: name.to_owned(),
        })?;
        self.shared.retire(meta.inode).await;
        Ok(meta)
    }

    /// Files whose names start with `prefix` and sort after `after` (byte order), at most
    /// `limit`.
    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<FileMeta>> {
        Ok(self
            .shared
            .inner
            .db
            .list_files(prefix, after, limit)
            .await?
            .into_iter()
            .map(FileMeta::from_row)
            .collect())
    }

    /// Where the blocks of `name` are: cache, dirty, uploading, store.
    pub async fn status(&self, name: &str) -> Result<FileStatus> {
        let meta = self.stat(name).await?;
        let inode = meta.inode;
        let (cached, dirty, uploading) = {
            let st = self.shared.inner.lock_state();
            let mut c = (0, 0, 0);
            for (_, e) in st
                .entries
                .range(BlockKey::new(inode, 0)..=BlockKey::new(inode, u64::MAX))
            {
                c.0 += 1;
                c.1 += u64::from(e.is_dirty());
                c.2 += u64::from(e.inflight.is_some());
            }
            c
        };
        let (mapped, uploaded) = self.shared.inner.db.inode_store_state(inode).await?;
        Ok(FileStatus {
            blocks: meta.size.div_ceil(self.shared.block_size()),
            in_store: dirty == 0 && uploading == 0 && mapped == uploaded,
            meta,
            cached,
            dirty,
            uploading,
            mapped,
            uploaded,
        })
    }

    /// Waits until everything written to `name` before the call is in the store.
    pub async fn flush_file(&self, name: &str) -> Result<()> {
        let meta = self.stat(name).await?;
        self.shared.inner.flush(Some(meta.inode)).await
    }

    /// Waits until the background removals started so far (of inodes retired while read,
    /// and of abandoned writers) are done; later ones are not waited for.
    pub async fn wait_for_cleanups(&self) {
        let mut tickets = self.shared.cleanup_tickets.subscribe();
        let started = tickets.borrow().next;
        // The sender lives in `shared`, so the wait cannot fail.
        let _ = tickets
            .wait_for(|t| t.running.first().is_none_or(|&first| first >= started))
            .await;
    }

    /// Waits for the background removals started so far, then until everything written
    /// before the call is in the store: the store then holds the live files, and none of
    /// the blocks being removed is uploaded.
    pub async fn flush(&self) -> Result<()> {
        self.wait_for_cleanups().await;
        self.shared.inner.flush(None).await
    }

    /// Finishes background removals, then shuts the cache down (see
    /// [`BlockCache::shutdown`]).
    pub async fn shutdown(self) -> Result<()> {
        let spare = std::mem::take(
            &mut *self
                .shared
                .spare_inodes
                .lock()
                .expect("spare inodes poisoned"),
        );
        if let Err(error) = self.shared.inner.db.forget_staging_inodes(&spare).await {
            tracing::warn!(%error, "forgetting unused inodes failed; the next open removes them");
        }
        self.shared.cleanups.close();
        let grace = self.shared.inner.config.shutdown_grace;
        if tokio::time::timeout(grace, self.shared.cleanups.wait())
            .await
            .is_err()
        {
            tracing::warn!("removals of retired files still running; the next open finishes them");
        }
        self.cache.shutdown().await
    }
}

/// A file opened for reading; keeps the content it opened alive.
#[derive(Debug)]
pub struct FileReader {
    shared: Arc<Shared>,
    meta: FileMeta,
    _pin: PinGuard,
}

impl FileReader {
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

#[derive(Debug)]
enum Mode {
    Replace {
        finished: bool,
    },
    Patch {
        _guard: KeyGuard<String>,
        old_size: u64,
    },
}

/// Writes a file sequentially, block by block: memory stays at one block whatever the size.
#[derive(Debug)]
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
    /// The SHA-256 of `buf` so far, if `buf` starts at a block's start.
    hasher: Option<Sha256>,
    /// Whether completed blocks start their way to the disk at once ([`FileWriter::write_behind`]).
    write_behind: bool,
    /// Those syncs still running, oldest first.
    ahead: std::collections::VecDeque<tokio::task::JoinHandle<Result<()>>>,
}

/// Syncs of completed blocks that one writer keeps running ([`FileWriter::write_behind`]).
const WRITE_BEHIND_DEPTH: usize = 4;

impl FileWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.pos + self.buf.len() as u64 - self.start
    }

    /// Appends `data`. Whole blocks go to the cache as soon as they are complete.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
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
            if self.buf.is_empty() && n == room {
                // A piece that ends at the block's end: write it without buffering.
                let hash = filled
                    .is_multiple_of(bs)
                    .then(|| Sha256::digest(&data[..n]).into());
                self.put(&data[..n], hash).await?;
            } else {
                if self.buf.capacity() == 0 {
                    self.buf = self.shared.take_buffer();
                }
                if self.buf.is_empty() {
                    // Bytes gathered from a block's start are hashed as they come, while
                    // they are in the CPU's cache.
                    self.hasher = filled.is_multiple_of(bs).then(Sha256::new);
                }
                self.buf.extend_from_slice(&data[..n]);
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&data[..n]);
                }
                if n == room {
                    let piece = std::mem::take(&mut self.buf);
                    let hash = self.hasher.take().map(|h| h.finalize().into());
                    self.put(&piece, hash).await?;
                    self.buf = piece;
                    self.buf.clear();
                }
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes `piece` (within one block) at `pos`; `hash` is its SHA-256 if it starts at the
    /// block's start.
    async fn put(&mut self, piece: &[u8], hash: Option<[u8; 32]>) -> Result<()> {
        let bs = self.shared.block_size();
        let key = BlockKey::new(self.inode, self.pos / bs);
        let mut handle = self.shared.inner.handle(key, true).await?;
        handle.write_with_hash(self.pos % bs, piece, hash).await?;
        self.pos += piece.len() as u64;
        if self.write_behind && self.pos.is_multiple_of(bs) {
            let task = handle.sync_ahead();
            // The block's lock is not held while waiting for the disk.
            drop(handle);
            if self.ahead.len() >= WRITE_BEHIND_DEPTH {
                self.wait_ahead(1).await?;
            }
            self.ahead.extend(task);
        }
        Ok(())
    }

    /// Makes each completed block start its way to the disk at once (an fdatasync in the
    /// background, at most [`WRITE_BEHIND_DEPTH`] at a time), for a writer that will
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

    /// Gives the writer up. A replacement's staging inode and its blocks are removed before
    /// this returns, so nothing of it is left for a flush to upload (dropping the writer
    /// removes them in the background; so does this if it is cancelled). A patch is dropped
    /// as is: the bytes it wrote stay, as after any partial write.
    pub async fn abandon(mut self) {
        if let Mode::Replace { finished: false } = self.mode {
            self.shared.clean_logged(self.inode).await;
            self.mode = Mode::Replace { finished: true };
        }
    }

    /// Writes what is buffered, makes the data as durable as asked, then makes it visible:
    /// a replacement swaps the new content in, a patch updates the size.
    pub async fn finish(mut self, durability: Durability) -> Result<FileMeta> {
        if !self.buf.is_empty() {
            let mut piece = std::mem::take(&mut self.buf);
            let hash = self.hasher.take().map(|h| h.finalize().into());
            self.put(&piece, hash).await?;
            piece.clear();
            self.buf = piece;
        }
        self.wait_ahead(self.ahead.len()).await?;
        self.shared.make_durable(self.inode, durability).await?;
        let end = self.pos;
        match &mut self.mode {
            Mode::Replace { finished } => {
                let _guard = self.shared.names.lock(self.name.clone()).await;
                let (row, old) = self
                    .shared
                    .inner
                    .db
                    .replace_file(&self.name, self.inode, end, now_ns())
                    .await?;
                *finished = true;
                if let Some(old) = old {
                    self.shared.retire(old).await;
                }
                Ok(FileMeta::from_row(row))
            }
            Mode::Patch { old_size, .. } => {
                let size = end.max(*old_size);
                // Mark the writer done first: the size below makes the bytes visible.
                *old_size = size;
                self.start = self.pos;
                self.shared
                    .inner
                    .db
                    .update_file(&self.name, self.inode, size, now_ns())
                    .await?
                    .map(FileMeta::from_row)
                    .ok_or_else(|| Error::NotFound {
                        name: self.name.clone(),
                    })
            }
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.shared.recycle_buffer(std::mem::take(&mut self.buf));
        match std::mem::replace(&mut self.mode, Mode::Replace { finished: true }) {
            Mode::Replace { finished: false } => self.shared.clean_later(self.inode),
            Mode::Replace { finished: true } => {}
            Mode::Patch { _guard, old_size } if self.pos > self.start => {
                // An abandoned patch may have changed bytes within the old size: bump the
                // version (under the name's lock) so that clients see a new ETag. Bytes past
                // the old size stay invisible and are cut before the file grows over them.
                let (shared, name, inode) = (self.shared.clone(), self.name.clone(), self.inode);
                self.shared.spawn_cleanup(async move {
                    let _guard = _guard;
                    if let Err(error) = shared
                        .inner
                        .db
                        .update_file(&name, inode, old_size, now_ns())
                        .await
                    {
                        tracing::warn!(%name, %error, "recording an abandoned patch failed");
                    }
                });
            }
            Mode::Patch { .. } => {}
        }
    }
}
