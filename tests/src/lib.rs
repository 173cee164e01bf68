//! Test harness: a temporary volume with a real SQLite file, a real local-directory object
//! store behind the fault-injecting wrapper, and a cache directory.
//!
//! Random choices (injected faults, random workloads) come from [`test_seed`]: set
//! `BLOCKCACHE_TEST_SEED` to replay a failed run with the seed it printed.

pub mod crash;
pub mod daemon;
pub mod moto;
pub mod tmpfs;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockcache::{BlockCache, Config};
use blockcache_backend::faulty::{Faults, FaultyStore, Op};
use blockcache_backend::{Backend, RetryPolicy};
use blockcache_db::Db;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;

/// A temporary volume.
pub struct Env {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The wrapped store, shared by every open of this volume.
    pub store: Arc<dyn ObjectStore>,
    /// Controls faults and counts calls.
    pub faults: Faults,
    /// The seed of this volume's injected faults, for tests that derive other random
    /// choices from it.
    pub seed: u64,
    /// Whether the engine opens the store by its `file://` URL (objects become hard links to
    /// cache files) rather than through the fault-injecting wrapper.
    linked: bool,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// A new empty volume whose random faults are seeded with [`test_seed`] (which prints
    /// the seed).
    pub fn new() -> Self {
        Self::with_seed(test_seed())
    }

    /// A new empty volume whose random faults are seeded with `seed`.
    pub fn with_seed(seed: u64) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("store")).expect("store dir");
        let local =
            LocalFileSystem::new_with_prefix(dir.path().join("store")).expect("local store");
        let (store, faults) = FaultyStore::new(Arc::new(local));
        faults.seed(seed);
        Self {
            dir,
            store,
            faults,
            seed,
            linked: false,
        }
    }

    /// A new empty volume whose engine opens the store by its `file://` URL, as the daemon
    /// does: new objects are hard links to their cache files. Of the faults, only those of
    /// the store's durability barriers (`Op::Barrier`) can be injected.
    pub fn linked() -> Self {
        Self::linked_with_seed(test_seed())
    }

    /// [`Env::linked`] with random faults seeded with `seed`.
    pub fn linked_with_seed(seed: u64) -> Self {
        Self {
            linked: true,
            ..Self::with_seed(seed)
        }
    }

    /// Whether the engine opens the store by its `file://` URL (see [`Env::linked`]).
    pub fn is_linked(&self) -> bool {
        self.linked
    }

    /// Waits (up to 30 s, else fails the test) until at least `n` calls of `op` wait at the
    /// store's gate (see [`Faults::hold`]).
    pub async fn wait_held(&self, op: Op, n: u64) {
        within(
            &format!("{n} calls of {op:?} held at the store's gate"),
            WAIT,
            self.faults.wait_held(op, n),
        )
        .await;
    }

    /// The directory of the object store.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("meta.db")
    }

    /// Settings like S3QL's t2_block_cache fixture: 1 KiB blocks, a 100 KiB cache, no
    /// background commit (so upload counts are exact), quick retries.
    pub fn config(&self) -> Config {
        let mut c = Config::new(self.cache_dir());
        c.block_size = 1024;
        c.max_bytes = 100 * 1024;
        c.max_entries = 768;
        c.max_dirty_bytes = 100 * 1024;
        c.upload_tasks = 2;
        c.upload_delay = None;
        c.shutdown_grace = Duration::from_secs(10);
        // Plain objects: the store holds exactly the blocks, so tests can count bytes and
        // link files (the framed formats have tests of their own).
        c.compression = blockcache_backend::format::Compression::None;
        c
    }

    /// A backend over this volume's store with fast retries.
    pub fn backend(&self) -> Backend {
        let backend = if self.linked {
            let url = format!("file://{}", self.store_dir().display());
            Backend::from_url(&url)
                .expect("file store")
                .with_faults(self.faults.clone())
        } else {
            Backend::new(self.store.clone(), StorePath::default())
        };
        backend.with_retry(RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(10),
            warn_after: 1,
            deadline: Duration::from_secs(30),
            // Every operation tries the store: tests of failures count the calls.
            probe_interval: Duration::ZERO,
        })
    }

    /// Opens the cache with `config`. If an engine that was dropped without shutdown still
    /// holds the volume or the cache directory, waits (up to 20 s) until its tasks have ended.
    pub async fn open_with(&self, config: Config) -> BlockCache {
        within(
            "the cache directory to be released by an earlier engine",
            Duration::from_secs(20),
            async {
                loop {
                    match self.try_open(config.clone()).await {
                        Err(e) if is_in_use(&e) => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        other => break other.expect("open cache"),
                    }
                }
            },
        )
        .await
    }

    /// Opens the cache with `config`, returning errors.
    pub async fn try_open(&self, config: Config) -> blockcache::Result<BlockCache> {
        let db = Db::open(self.db_path().to_str().expect("utf-8 path")).await?;
        BlockCache::open(config, db, self.backend()).await
    }

    /// Opens the cache with [`Env::config`].
    pub async fn open(&self) -> BlockCache {
        self.open_with(self.config()).await
    }

    /// Ids of the objects in the store, sorted.
    pub async fn store_ids(&self) -> Vec<u64> {
        let mut ids = self.backend().list_ids().await.expect("list store");
        ids.sort_unstable();
        ids
    }

    /// The id of the `n`th object (from 1) that the first open of a volume creates: ids
    /// start at the lease epoch's range (epoch 1).
    pub fn nth_object(n: u64) -> u64 {
        blockcache_backend::lease::first_object_id(1) + n - 1
    }

    /// The path of the store file of object `id`.
    pub fn object_path(&self, id: u64) -> PathBuf {
        self.store_dir()
            .join("data")
            .join(format!("{:02x}", id & 0xff))
            .join(id.to_string())
    }
}

/// Text-like bytes (words from a small vocabulary chosen by `seed`), which compress about
/// 3:1 or better: for tests of compression and of plaintext in the store.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "block", "cache", "store", "object", "volume", "lease", "epoch", "flush", "upload",
        "dirty", "clean", "evict", "hash", "dedup", "write", "read",
    ];
    let noise = data(seed, len.max(2));
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[usize::from(noise[i % noise.len()] & 15)].as_bytes());
        out.push(if noise[(i + 1) % noise.len()].is_multiple_of(8) {
            b'\n'
        } else {
            b' '
        });
        i += 2;
    }
    out.truncate(len);
    out
}

/// Every regular file under `dir` (recursively), sorted; none if `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// The environment variable that fixes the seed of a test's random choices.
pub const SEED_VAR: &str = "BLOCKCACHE_TEST_SEED";

/// How long a test waits for something that should happen promptly before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Whether `error` says that another engine uses the volume (its database's lock) or the
/// cache directory (its directory lock).
pub fn is_in_use(error: &blockcache::Error) -> bool {
    match error {
        blockcache::Error::InUse { .. } => true,
        blockcache::Error::Db(e) => matches!(**e, blockcache_db::Error::VolumeLocked { .. }),
        _ => false,
    }
}

/// The seed of a test's random choices: `BLOCKCACHE_TEST_SEED` if set, else a random one.
/// Prints it to standard error, which the test runner shows when the test fails.
pub fn test_seed() -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={v:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("random choices seeded with {SEED_VAR}={seed}");
    seed
}

/// Awaits `fut`, failing the test with a message naming `what` it waited for if that takes
/// longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("waited {limit:?} for {what}"),
    }
}

/// Whether `error` was caused by a fault injected by [`FaultyStore`] or by the faults of a
/// local store's durability barriers: the injected message is somewhere in its chain.
pub fn is_injected(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.to_string().contains("injected ") {
            return true;
        }
        next = e.source();
    }
    false
}

/// Deterministic block content: `len` bytes derived from `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Lists the names of the files in `dir` (but the hidden lock file), sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
