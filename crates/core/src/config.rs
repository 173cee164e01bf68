//! Settings of a cache: those fixed at open and the limits that can change while it runs.

use std::path::PathBuf;
use std::time::Duration;

use blockcache_backend::format::Compression;

use crate::{Error, Result, Secret};

/// Settings of a cache. Each field is a setting of the daemon under the same name, with
/// the unit in the field's name where the flag has none: `max_bytes` is `--max-cache-size`,
/// `max_dirty_bytes` is `--max-dirty`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the cache files.
    pub cache_dir: PathBuf,
    /// Largest block, in bytes; fixed when the volume is created.
    pub block_size: u64,
    /// Most bytes cached (apparent sizes).
    pub max_bytes: u64,
    /// Most blocks cached.
    pub max_entries: u64,
    /// Most dirty bytes; writers wait above it.
    pub max_dirty_bytes: u64,
    /// Most uploads at once: how many run adapts between 8 and this (at most 64 MiB of
    /// blocks) to the store's latency.
    pub upload_tasks: usize,
    /// Blocks are committed and uploaded in the background once unmodified for this long;
    /// `None` leaves uploads to `commit`, `flush`, eviction and dirty-budget pressure.
    pub upload_delay: Option<Duration>,
    /// How long shutdown waits for background tasks after flushing.
    pub shutdown_grace: Duration,
    /// How long a writer waits for the dirty budget while no dirty data leaves (nothing is
    /// uploaded or removed, as when the store is down) before it fails with
    /// [`Error::DirtyBudgetFull`]; `None` waits for ever. The daemon sets it to its store
    /// timeout.
    pub dirty_wait: Option<Duration>,
    /// How new objects are compressed (`--compression`, `--compression-level`); ignored
    /// for a volume created with [`Compression::None`] and no encryption, whose objects are
    /// plain.
    pub compression: Compression,
    /// The volume's encryption secret (`--encryption-key-file`,
    /// `--encryption-passphrase-file`); a volume is encrypted or not from its creation on.
    pub encryption: Option<Secret>,
    /// Time to live of the writer lease (`--lease-ttl`): a lease not renewed for this long
    /// may be taken over; its holder stops writing after half of it.
    pub lease_ttl: Duration,
    /// Take the writer lease even if its holder's has not expired (`--force-takeover`):
    /// only when that holder's machine is known to be dead.
    pub force_takeover: bool,
    /// The metadata is shipped to the store at least this often while it changes
    /// (`--metadata-interval`), and at every flush; `None`: at flushes only.
    pub metadata_interval: Option<Duration>,
    /// Metadata generations in the store are kept this long after a newer one is complete
    /// (`--metadata-keep`); the two newest are always kept.
    pub metadata_keep: Duration,
}

impl Config {
    /// Defaults: 1 MiB blocks, 1 GiB cache, 65,536 entries, 256 MiB dirty, 8 upload tasks,
    /// a 10 s commit delay, writers waiting for the dirty budget up to 30 s without progress,
    /// zstd compression, no encryption, a 30 s lease, metadata shipped every 60 s and kept a
    /// week.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            block_size: 1 << 20,
            max_bytes: 1 << 30,
            max_entries: 65_536,
            max_dirty_bytes: 256 << 20,
            upload_tasks: 64,
            upload_delay: Some(Duration::from_secs(10)),
            shutdown_grace: Duration::from_secs(30),
            dirty_wait: Some(Duration::from_secs(30)),
            compression: Compression::default(),
            encryption: None,
            lease_ttl: Duration::from_secs(30),
            force_takeover: false,
            metadata_interval: Some(Duration::from_secs(60)),
            metadata_keep: Duration::from_secs(7 * 24 * 3600),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.block_size == 0 || self.block_size > 1 << 30 {
            return bad(format!(
                "block_size {} must be between 1 byte and 1 GiB",
                self.block_size
            ));
        }
        self.limits().validate(self.block_size)?;
        if self.upload_tasks == 0 || self.upload_tasks > 1024 {
            return bad(format!(
                "upload_tasks {} must be between 1 and 1024",
                self.upload_tasks
            ));
        }
        if self
            .metadata_interval
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return bad(format!(
                "metadata_interval {:?} must be at least 1 s",
                self.metadata_interval.unwrap_or_default()
            ));
        }
        if self.lease_ttl < blockcache_backend::lease::MIN_TTL {
            return bad(format!(
                "lease_ttl {:?} must be at least {:?}",
                self.lease_ttl,
                blockcache_backend::lease::MIN_TTL
            ));
        }
        Ok(())
    }

    /// The limits part of these settings.
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
            max_dirty_bytes: self.max_dirty_bytes,
        }
    }
}

/// Limits that can change while the cache runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes cached.
    pub max_bytes: u64,
    /// Most blocks cached.
    pub max_entries: u64,
    /// Most dirty bytes.
    pub max_dirty_bytes: u64,
}

impl Limits {
    pub(crate) fn validate(&self, block_size: u64) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.max_bytes < block_size {
            return bad(format!(
                "max_bytes {} must be at least the block size {block_size}",
                self.max_bytes
            ));
        }
        if self.max_dirty_bytes < block_size {
            return bad(format!(
                "max_dirty_bytes {} must be at least the block size {block_size}",
                self.max_dirty_bytes
            ));
        }
        Ok(())
    }
}
