//! The error type of the engine.

use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the block cache.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An inode or block number larger than `i64::MAX`.
    #[error(
        "block {blockno} of inode {inode} is out of range: numbers must be at most {}",
        i64::MAX
    )]
    InvalidKey {
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
    },
    /// An access past the end of the largest possible block.
    #[error(
        "access of {len} bytes at offset {offset} of block {blockno} of inode {inode} is past the block size {block_size}"
    )]
    OutOfRange {
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The volume's block size.
        block_size: u64,
    },
    /// A write through a handle that was opened for reading.
    #[error("block {blockno} of inode {inode} was opened read-only")]
    ReadOnly {
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
    },
    /// A file name that the namespace does not accept.
    #[error("invalid file name {name:?}: {reason}")]
    InvalidName {
        /// The name as given (lossy if it was not UTF-8).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file was to be created only if its name was free ([`crate::FileWriter::create_only`]),
    /// and another took the name first.
    #[error("a file named {name:?} exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// A write of this writer failed earlier: what it holds is not what was written to it,
    /// so it can only be given up (the file keeps its old content).
    #[error(
        "an earlier write to {name:?} failed: the writer can only be given up, and the file keeps its old content"
    )]
    WriterFailed {
        /// The file's name.
        name: String,
    },
    /// File attributes that the namespace does not accept.
    #[error("invalid file attributes: {0}")]
    InvalidAttrs(String),
    /// No file has this name.
    #[error("no file named {name:?}")]
    NotFound {
        /// The name.
        name: String,
    },
    /// A write would make a file larger than the maximum file size.
    #[error("file {name:?} would grow to {size} bytes, over the maximum file size of {max} bytes")]
    FileTooLarge {
        /// The name.
        name: String,
        /// The size the write would reach.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// A cache file or the cache directory could not be used.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What we were doing, as a verb phrase.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The metadata store failed.
    #[error("metadata store failed: {0}")]
    Db(#[source] Arc<blockcache_db::Error>),
    /// Uploading an object failed (after retries); the block stays dirty.
    #[error(
        "upload of object {obj_id} for block {blockno} of inode {inode} failed; the block stays dirty"
    )]
    Upload {
        /// The object.
        obj_id: u64,
        /// Inode of a block it holds.
        inode: u64,
        /// Block number of a block it holds.
        blockno: u64,
        /// The store error.
        #[source]
        source: Arc<UploadFailure>,
    },
    /// Downloading an object failed.
    #[error("download of object {obj_id} for block {blockno} of inode {inode} failed")]
    Download {
        /// The object.
        obj_id: u64,
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
        /// The store error.
        #[source]
        source: Arc<blockcache_backend::Error>,
    },
    /// The store returned data that does not match the metadata.
    #[error(
        "object {obj_id} for block {blockno} of inode {inode} is corrupted in the store: {reason}"
    )]
    Corrupted {
        /// The object.
        obj_id: u64,
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
        /// What did not match.
        reason: String,
    },
    /// The block points to an object whose upload failed and whose data is not cached.
    #[error(
        "block {blockno} of inode {inode} points to object {obj_id}, whose upload failed, and is not cached"
    )]
    Lost {
        /// The object.
        obj_id: u64,
        /// Inode.
        inode: u64,
        /// Block number.
        blockno: u64,
    },
    /// A change of a file was committed, but copying it into the file's blocks failed; it is
    /// retried in the background (and at the next open), and reads of the file fail until
    /// it is done rather than show a mix of the old and the new.
    #[error("a committed change of inode {inode} is not applied yet (retrying)")]
    Unapplied {
        /// The file's inode.
        inode: u64,
        /// Why applying it failed.
        #[source]
        source: Arc<Error>,
    },
    /// The store failed at something that concerns no single block (a durability barrier,
    /// a deletion).
    #[error("could not {action} in the store: {source}")]
    Store {
        /// What we were doing, as a verb phrase.
        action: &'static str,
        /// The store error.
        #[source]
        source: Arc<blockcache_backend::Error>,
    },
    /// A writer waited for the dirty budget while no dirty data left the cache for
    /// [`crate::Config::dirty_wait`]: uploads are not getting through (the store is down,
    /// `store` says why). Nothing was written; the same call may succeed later.
    #[error(
        "{limit} bytes of dirty data wait for the store and none left in {waited:.1?}; try again later{}",
        store.as_ref().map_or_else(String::new, |s| format!(" (the store is unreachable: {s})"))
    )]
    DirtyBudgetFull {
        /// The dirty budget (`max_dirty_bytes`).
        limit: u64,
        /// How long the writer waited.
        waited: std::time::Duration,
        /// Why the store counts as down, if it does.
        store: Option<String>,
    },
    /// The volume cannot be opened on this store with these settings; the message says what
    /// was found and what to do.
    #[error("{0}")]
    VolumeRefused(String),
    /// Another engine has the cache directory open.
    #[error("cache directory {} is in use by another blockcache engine", path.display())]
    InUse {
        /// The cache directory.
        path: PathBuf,
    },
    /// The cache directory belongs to another volume (another database, or a database that
    /// was replaced) and holds dirty blocks of it, which this volume must not take for its own
    /// nor delete.
    #[error(
        "cache directory {} belongs to {cache_volume}, not to this database's volume {volume}, and holds {dirty} blocks not yet uploaded; use another cache directory, or empty this one if that data is not needed",
        path.display()
    )]
    ForeignCache {
        /// The cache directory.
        path: PathBuf,
        /// The volume it belongs to, as far as it says.
        cache_volume: String,
        /// The volume of the database.
        volume: String,
        /// Its dirty blocks.
        dirty: u64,
    },
    /// Raw block access to an inode that the namespace owns: the block API and the file
    /// namespace never share an inode.
    #[error(
        "inode {inode} belongs to the file namespace of this volume (its inodes start at {first}); raw block access to it is refused"
    )]
    NamespaceInode {
        /// The inode asked for.
        inode: u64,
        /// The first inode the namespace may allocate; raw access is allowed below it.
        first: u64,
    },
    /// The volume's metadata in the store cannot be used (a restore, a check); the message
    /// says which object and why.
    #[error("{0}")]
    Metadata(String),
    /// The cache is shutting down.
    #[error("the block cache is shutting down")]
    ShuttingDown,
}

/// Why an upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UploadFailure {
    /// The store refused or kept failing.
    #[error(transparent)]
    Store(#[from] blockcache_backend::Error),
    /// The upload succeeded but could not be recorded.
    #[error("recording the upload failed")]
    Db(#[source] Arc<blockcache_db::Error>),
    /// The block's content was deduplicated onto an object whose upload had failed.
    #[error("the block deduplicated onto an object whose upload failed")]
    SharedObjectFailed,
    /// The object was released or marked failed while it was being uploaded.
    #[error("the object was released or marked failed during the upload")]
    NotRecorded,
    /// The cache file could not be read for the upload.
    #[error("could not read cache file {}", path.display())]
    Unreadable {
        /// The cache file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The store took the object, but its durability barrier failed.
    #[error("the store did not make the object durable")]
    NotDurable(#[source] Arc<blockcache_backend::Error>),
}

impl Error {
    /// Whether the same call may succeed later (store or database trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) => e.is_transient(),
            Self::Upload { source, .. } => match &**source {
                UploadFailure::Store(e) => e.is_transient(),
                UploadFailure::Db(e) => e.is_transient(),
                UploadFailure::NotDurable(e) => e.is_transient(),
                UploadFailure::SharedObjectFailed
                | UploadFailure::NotRecorded
                | UploadFailure::Unreadable { .. } => false,
            },
            Self::Download { source, .. } | Self::Store { source, .. } => source.is_transient(),
            Self::Unapplied { .. } => true,
            Self::DirtyBudgetFull { .. } => true,
            _ => false,
        }
    }

    /// Whether the call failed because a file system is full (`ENOSPC`: the cache's, after
    /// clean blocks were evicted to make room, or the database's): the daemon's 507. The
    /// `std::io::Error` (kind `StorageFull`) is in the source chain.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            Self::Db(e) => e.is_storage_full(),
            Self::Upload { source, .. } => match &**source {
                UploadFailure::Db(e) => e.is_storage_full(),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether the call failed because the engine is stopping (its work was cancelled), not
    /// because of the data, the disk or the store.
    pub fn is_cancelled(&self) -> bool {
        match self {
            Self::ShuttingDown => true,
            Self::Upload { source, .. } => match &**source {
                UploadFailure::Store(e) => e.is_cancelled(),
                UploadFailure::NotDurable(e) => e.is_cancelled(),
                _ => false,
            },
            Self::Download { source, .. } | Self::Store { source, .. } => source.is_cancelled(),
            _ => false,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source: Arc::new(source),
        }
    }
}

impl From<blockcache_db::Error> for Error {
    fn from(e: blockcache_db::Error) -> Self {
        match e {
            blockcache_db::Error::NameTaken(name) => Self::Exists { name },
            e => Self::Db(Arc::new(e)),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shows an error with its causes, `: `-separated, for log lines (a cause whose text its
/// parent already tells is not told twice).
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parent = self.0.to_string();
        f.write_str(&parent)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !parent.contains(&text) {
                write!(f, ": {text}")?;
            }
            parent = text;
            next = cause.source();
        }
        Ok(())
    }
}
