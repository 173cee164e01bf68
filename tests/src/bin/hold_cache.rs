//! A child process for crash tests that holds a volume open until it is killed. Arguments:
//! the cache directory, the SQLite file, the store's directory, a number of blocks `n` and
//! `sync` or `flush`. It opens the volume with the harness's settings (1 KiB blocks, no
//! background commit, so nothing is uploaded unless flushed), writes `data(b, 512)` into
//! block `b` of inode 4 for every `b < n`, syncs or flushes, prints `synced <n>` or
//! `flushed <n>`, and waits for SIGKILL.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;

use blockcache::{BlockCache, Config};
use blockcache_backend::Backend;
use blockcache_db::Db;
use blockcache_tests::data;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: hold-cache CACHE_DIR DB_FILE STORE_DIR BLOCKS sync|flush";
    let mut args = std::env::args().skip(1);
    let mut arg = || args.next().ok_or(usage);
    let (cache_dir, db, store) = (PathBuf::from(arg()?), arg()?, PathBuf::from(arg()?));
    let blocks: u64 = arg()?.parse()?;
    let then = arg()?;
    let mut config = Config::new(cache_dir);
    config.compression = blockcache_backend::format::Compression::None;
    config.block_size = 1024;
    config.max_bytes = 1 << 20;
    config.max_dirty_bytes = 1 << 20;
    config.upload_delay = None;
    let db = Db::open(&db).await?;
    let backend = Backend::from_url(&format!("file://{}", store.display()))?;
    let cache = BlockCache::open(config, db, backend).await?;
    for b in 0..blocks {
        cache.write(4, b, 0, &data(b, 512)).await?;
    }
    let done = match then.as_str() {
        "sync" => cache.sync().await.map(|()| "synced"),
        "flush" => cache.flush().await.map(|()| "flushed"),
        _ => return Err(usage.into()),
    }?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{done} {blocks}")?;
    out.flush()?;
    drop(out);
    std::future::pending::<()>().await;
    Ok(())
}
