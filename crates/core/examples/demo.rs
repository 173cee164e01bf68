//! The main job on embedded defaults: a SQLite file and a local directory as the object
//! store, under `./blockcache-demo` (a volume of its own: the daemon's default is
//! `./blockcache-data`, whose inodes belong to its files). Writes files' worth of blocks
//! (half of them duplicates), flushes them to the store, drops the cache, reads everything
//! back and checks it, and says what it did at each step.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Instant;

use blockcache::{BlockCache, Config};
use blockcache_backend::Backend;
use blockcache_db::Db;
use sha2::{Digest, Sha256};

const FILES: u64 = 4;
const BLOCKS_PER_FILE: u64 = 16;

/// Block content: blocks with an odd number repeat the previous block, so half are duplicates.
fn block(file: u64, blockno: u64, size: usize) -> Vec<u8> {
    let seed = file * 1000 + (blockno & !1);
    let mut out = Vec::with_capacity(size);
    let mut counter = 0u64;
    while out.len() < size {
        out.extend_from_slice(&Sha256::digest(format!("{seed}/{counter}")));
        counter += 1;
    }
    out.truncate(size);
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let data_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "blockcache-demo".into()),
    );
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let store_url = format!("file://{}", data_dir.join("store").display());
    let config = Config::new(data_dir.join("cache"));
    let block_size = config.block_size as usize;
    println!("data directory: {}", data_dir.display());
    println!("  metadata:      {}", data_dir.join("meta.db").display());
    println!("  cache:         {}", config.cache_dir.display());
    println!("  object store:  {store_url}");

    let db = Db::open(
        data_dir
            .join("meta.db")
            .to_str()
            .ok_or("data directory path is not UTF-8")?,
    )
    .await?;
    let cache = BlockCache::open(config, db, Backend::from_url(&store_url)?).await?;
    let r = cache.recovery();
    if r.dirty_files > 0 || r.pending_deletions > 0 {
        println!(
            "recovered from an earlier crash: {} dirty blocks to upload, {} deletions to finish",
            r.dirty_files, r.pending_deletions
        );
    }
    // Inodes 1000.. are this demo's; remove what an earlier run left behind.
    for file in 0..FILES {
        cache.remove(1000 + file, 0..u64::MAX).await?;
    }

    let started = Instant::now();
    let mut written = 0;
    for file in 0..FILES {
        for b in 0..BLOCKS_PER_FILE {
            cache
                .write(1000 + file, b, 0, &block(file, b, block_size))
                .await?;
            written += block_size as u64;
        }
    }
    println!(
        "wrote {FILES} files of {BLOCKS_PER_FILE} blocks ({:.1} MiB) into the cache in {:.2?}",
        mib(written),
        started.elapsed()
    );

    let started = Instant::now();
    cache.flush().await?;
    let usage = cache.usage().await?;
    println!(
        "flushed to the store in {:.2?}: {} uploads, {:.1} MiB stored for {:.1} MiB written (dedup saved {:.1} MiB)",
        started.elapsed(),
        usage.uploads,
        mib(usage.stored_bytes),
        mib(usage.logical_bytes),
        mib(usage.dedup_savings)
    );

    cache.clear().await?;
    println!(
        "dropped the cache: {} blocks cached now",
        cache.usage().await?.entries
    );

    let started = Instant::now();
    for file in 0..FILES {
        for b in 0..BLOCKS_PER_FILE {
            let got = cache.read(1000 + file, b, 0, block_size).await?;
            if got != block(file, b, block_size) {
                return Err(format!("block {b} of file {file} read back wrong").into());
            }
        }
    }
    let usage = cache.usage().await?;
    println!(
        "read everything back from the store in {:.2?} ({} downloads) and every byte matched",
        started.elapsed(),
        usage.downloads
    );
    cache.shutdown().await?;
    println!("shut down cleanly");
    Ok(())
}
