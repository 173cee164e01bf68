//! A child process for crash tests. It opens a volume in the directory given as its first
//! argument and writes forever: block `i` of inode 1 gets `data(i, 1024)` and block `i % 7`
//! of inode 2 is overwritten with the same bytes; after each `sync()` it prints
//! `synced <i>`. Background commits run every few milliseconds, so uploads are in flight
//! whenever the parent kills it with SIGKILL.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::Duration;

use blockcache::{BlockCache, Config};
use blockcache_backend::Backend;
use blockcache_db::Db;
use blockcache_tests::data;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: crash-writer DIR")?);
    let mut config = Config::new(dir.join("cache"));
    config.compression = blockcache_backend::format::Compression::None;
    config.block_size = 1024;
    config.max_bytes = 100 * 1024;
    config.max_dirty_bytes = 50 * 1024;
    config.upload_tasks = 2;
    config.upload_delay = Some(Duration::from_millis(5));
    let db = Db::open(dir.join("meta.db").to_str().ok_or("utf-8 path")?).await?;
    let backend = Backend::from_url(&format!("file://{}", dir.join("store").display()))?;
    let cache = BlockCache::open(config, db, backend).await?;
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let block = data(i, 1024);
        cache.write(1, i, 0, &block).await?;
        cache.write(2, i % 7, 0, &block).await?;
        cache.sync().await?;
        writeln!(out, "synced {i}")?;
        out.flush()?;
    }
    Ok(())
}
