//! blockcache: an async block cache in front of object storage.
//!
//! Blocks, addressed by `(inode, blockno)`, are cached as files in a local directory,
//! deduplicated by SHA-256, uploaded in the background to an object store
//! ([`blockcache_backend`]), read back on a miss and evicted least-recently-used when the
//! cache is full. Metadata lives in SQLite ([`blockcache_db`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use blockcache::{BlockCache, Config};
//! let db = blockcache_db::Db::open("/tmp/bc/meta.db").await?;
//! let backend = blockcache_backend::Backend::from_url("file:///tmp/bc/store")?;
//! let cache = BlockCache::open(Config::new("/tmp/bc/cache"), db, backend).await?;
//! cache.write(1, 0, 0, b"hello").await?;
//! cache.flush().await?; // now in the object store
//! assert_eq!(&cache.read(1, 0, 0, 5).await?[..], b"hello");
//! cache.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Modules: [`BlockCache`] (`cache`) is the facade over the engine (`engine`, private), whose
//! background loops live in `tasks`; `namespace` is the file layer on top. See
//! `ARCHITECTURE.md` for the flows, the invariants and the lock order.

mod budget;
mod cache;
mod cache_dir;
mod check;
mod config;
mod engine;
mod error;
mod key;
mod keylock;
mod metadata;
mod namespace;
mod pace;
pub mod restore;
mod tasks;
mod usage;
mod volume;

pub use cache::BlockCache;
pub use check::{
    BrokenRange, CacheProblem, CheckOptions, CheckReport, DEFAULT_GRACE, DEFAULT_VERIFY_RATE,
    DamagedObject, LeakedObject, MissingInStore, RefcountProblem,
};
pub use config::{Config, Limits};
pub use engine::{BlockHandle, MetadataStatus, Recovery};
pub use error::{Error, Result, UploadFailure};
pub use key::BlockKey;
pub use namespace::{
    Durability, FileMeta, FileReader, FileStatus, FileWriter, MAX_ATTRS_LEN, MAX_NAME_LEN,
    MissingObject, Namespace, StoreCheck, validate_name,
};
pub use usage::Usage;
pub use volume::Secret;

/// The README's Rust snippets, compiled as doc tests so that they keep up with the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeSnippets;
