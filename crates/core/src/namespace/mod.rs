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

mod reader;
mod shared;
mod verify;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockcache_db::FileRow;

use crate::{BlockCache, Error, Result};

pub use reader::FileReader;
pub use verify::{MissingObject, StoreCheck};
pub use writer::{FileWriter, MAX_ATTRS_LEN};

use shared::Shared;
use writer::Mode;

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
    /// Attributes of the content, as the writer that named the file set them
    /// ([`FileWriter::set_attrs`]); a patch or a truncation clears them.
    pub attrs: Option<String>,
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
            attrs: row.attrs,
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

pub(super) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
    ///
    /// The first namespace on a volume takes its inodes above every inode in use by raw
    /// block access; from then on those are refused raw access (see [`BlockCache::block`]).
    pub async fn open(cache: BlockCache, max_file_size: u64) -> Result<Self> {
        cache.engine().claim_namespace_inodes().await?;
        let shared = Arc::new(Shared::new(cache.engine().clone(), max_file_size));
        shared.finish_merges().await?;
        let leftover = shared.db.inodes_to_clean().await?;
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
                return Ok(FileReader::new(self.shared.clone(), again, pin));
            }
        }
    }

    /// Starts replacing (or creating) `name`. Nothing is visible until
    /// [`FileWriter::finish`]; dropping the writer before that leaves the old version.
    pub async fn create(&self, name: &str) -> Result<FileWriter> {
        validate_name(name)?;
        if self.shared.inner.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let inode = self.shared.take_inode().await?;
        Ok(FileWriter::new(
            self.shared.clone(),
            name.to_owned(),
            inode,
            Mode::Replace,
            0,
        ))
    }

    /// Starts writing into `name` at `offset` (the file grows as needed; a gap past its end
    /// reads as zeros). Nothing changes until [`FileWriter::finish`] commits the patch as a
    /// whole: the blocks it touches are written into a staging inode (a partly written block
    /// first gets the file's bytes around the patch) and merged into the file after one
    /// metadata transaction, so an error, a dropped writer or a crash leaves the old content
    /// or the new, never a mix. Holds the name's lock until the writer finishes or is dropped.
    pub async fn patch(&self, name: &str, offset: u64) -> Result<FileWriter> {
        validate_name(name)?;
        if self.shared.inner.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let guard = self.shared.names.lock(name.to_owned()).await;
        let meta = self.stat(name).await?;
        if offset > self.shared.max_file_size {
            return Err(Error::FileTooLarge {
                name: name.to_owned(),
                size: offset,
                max: self.shared.max_file_size,
            });
        }
        let staging = self.shared.take_inode().await?;
        // From here, dropping the writer removes the staging inode.
        let mut writer = FileWriter::new(
            self.shared.clone(),
            name.to_owned(),
            staging,
            Mode::Patch {
                name_lock: guard,
                target: meta.inode,
                old_size: meta.size,
                prefilled: None,
            },
            offset,
        );
        writer.prefill().await?;
        Ok(writer)
    }

    /// Sets the size of `name`: shrinking drops the bytes past `size`, growing adds zeros.
    /// All or nothing, like a patch: the change is committed in one metadata transaction
    /// before the file's blocks change, and redone after a crash.
    pub async fn truncate(
        &self,
        name: &str,
        size: u64,
        durability: Durability,
    ) -> Result<FileMeta> {
        validate_name(name)?;
        if self.shared.inner.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let guard = self.shared.names.lock(name.to_owned()).await;
        let meta = self.stat(name).await?;
        if size > self.shared.max_file_size {
            return Err(Error::FileTooLarge {
                name: name.to_owned(),
                size,
                max: self.shared.max_file_size,
            });
        }
        let staging = self.shared.take_inode().await?;
        let staged = shared::Staged::new(self.shared.clone(), staging);
        // The file keeps its bytes up to `keep`: the merge cuts the block holding `keep`
        // there and drops the blocks after it (so growing shows zeros past the old end).
        // Only if that cut block must be in the store when this returns is it staged, cut,
        // and uploaded before the commit point.
        let bs = self.shared.block_size();
        let keep = meta.size.min(size);
        if durability == Durability::Store && keep < meta.size && !keep.is_multiple_of(bs) {
            self.shared
                .copy_range(meta.inode, staging, keep / bs, 0..keep % bs)
                .await?;
        }
        self.shared
            .make_change_durable(staging, meta.inode, durability)
            .await?;
        staged.disarm();
        self.shared
            .commit_change(
                guard,
                name.to_owned(),
                meta.inode,
                staging,
                size,
                keep,
                durability,
            )
            .await
    }

    /// Deletes `name`; its blocks are removed once no reader holds them.
    pub async fn delete(&self, name: &str) -> Result<FileMeta> {
        validate_name(name)?;
        let _guard = self.shared.names.lock(name.to_owned()).await;
        let row = self.shared.db.delete_file(name).await?;
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
        let blocks = self.shared.inner.inode_blocks(inode);
        let (cached, dirty, uploading) = (blocks.cached, blocks.dirty, blocks.uploading);
        let (mapped, uploaded) = self.shared.db.inode_store_state(inode).await?;
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

    /// Waits until the background tasks started so far (removals of inodes retired while
    /// read and of abandoned writers, and readers' lookups of the file read next) are done;
    /// later ones are not waited for.
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
        if let Err(error) = self.shared.db.forget_staging_inodes(&spare).await {
            tracing::warn!(%error, "forgetting unused inodes failed; the next open removes them");
        }
        self.shared.cleanups.close();
        let grace = self.shared.inner.config().shutdown_grace;
        if tokio::time::timeout(grace, self.shared.cleanups.wait())
            .await
            .is_err()
        {
            tracing::warn!("removals of retired files still running; the next open finishes them");
        }
        self.shared.forget_held().await;
        self.cache.shutdown().await
    }
}
