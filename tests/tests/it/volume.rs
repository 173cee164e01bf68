//! One volume, one user: the volume lock over the database, the cache directory's volume
//! identity, and the split of inodes between the block API and the file namespace.

use blockcache::{BlockCache, Durability, Error, Namespace};
use blockcache_db::Db;
use std::time::Duration;

use blockcache_tests::{Env, data, within};

const MAX: u64 = 1 << 30;

async fn open_in(env: &Env, cache_dir: std::path::PathBuf) -> blockcache::Result<BlockCache> {
    let mut config = env.config();
    config.cache_dir = cache_dir;
    let db = Db::open(env.db_path().to_str().expect("utf-8")).await?;
    BlockCache::open(config, db, env.backend()).await
}

/// A second engine on the same database with a cache directory of its own would take the
/// first one's dirty blocks for holes and its staging inodes for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_on_one_database_is_refused_whatever_its_cache_directory() {
    let env = Env::new();
    let first = env.open().await;
    first.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    let err = open_in(&env, env.dir.path().join("other-cache"))
        .await
        .expect_err("a second engine on the same database");
    let message = err.to_string();
    assert!(
        message.contains("meta.db.lock") && message.contains("pid "),
        "the refusal names the lock and its holder: {message}"
    );
    first.shutdown().await.expect("shutdown");
    // Once the first is gone, the volume opens (here with the other directory).
    let second = open_in(&env, env.dir.path().join("other-cache"))
        .await
        .expect("open after the first shut down");
    assert_eq!(
        &second.read(1, 0, 0, 1000).await.expect("read")[..],
        &data(1, 1000)[..]
    );
    second.shutdown().await.expect("shutdown");
}

/// A cache directory of another volume: its dirty blocks are that volume's only copy, so it
/// is refused; once it holds only clean blocks it is emptied, never trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_of_another_volume_is_refused_or_emptied() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    cache.sync().await.expect("sync");
    drop(cache);
    // Another volume (a wiped database) on the same cache directory: refused, the dirty
    // block is left alone.
    let other = Env::new();
    let mut config = other.config();
    config.cache_dir = env.cache_dir();
    let refused = || async {
        let db = Db::open(other.db_path().to_str().expect("utf-8")).await?;
        BlockCache::open(config.clone(), db, other.backend()).await
    };
    // The first engine was dropped without shutdown: wait until its tasks let go of the
    // cache directory.
    let err = within(
        "the cache directory to be released",
        Duration::from_secs(20),
        async {
            loop {
                match refused().await {
                    Err(Error::InUse { .. }) => tokio::time::sleep(Duration::from_millis(2)).await,
                    other => break other.expect_err("refused"),
                }
            }
        },
    )
    .await;
    assert!(
        matches!(err, Error::ForeignCache { dirty: 1, .. }),
        "a cache directory with another volume's dirty block is refused: {err}"
    );
    assert!(env.cache_dir().join("1-0.dirty").exists());
    // The first volume uploads it and shuts down: only clean blocks are left.
    let cache = env.open().await;
    cache.flush().await.expect("flush");
    assert_eq!(
        &cache.read(1, 0, 0, 1000).await.expect("read")[..],
        &data(1, 1000)[..]
    );
    cache.shutdown().await.expect("shutdown");
    // The other volume writes a different block 1/0 and reads its own bytes, not the first
    // volume's clean file.
    let db = Db::open(other.db_path().to_str().expect("utf-8"))
        .await
        .expect("db");
    let cache = BlockCache::open(config, db, other.backend())
        .await
        .expect("a cache directory holding only another volume's clean blocks is emptied");
    assert_eq!(cache.read(1, 0, 0, 1000).await.expect("read").len(), 0);
    cache.write(1, 0, 10, b"mine").await.expect("write");
    let mut expected = vec![0; 10];
    expected.extend_from_slice(b"mine");
    assert_eq!(
        &cache.read(1, 0, 0, 1000).await.expect("read")[..],
        &expected[..]
    );
    cache.shutdown().await.expect("shutdown");
}

/// The block API and the namespace never share an inode, whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_blocks_and_named_files_never_share_an_inode() {
    let env = Env::new();
    let cache = env.open().await;
    let raw = data(1, 1000);
    cache
        .write(1, 0, 0, &raw)
        .await
        .expect("raw write before any namespace");
    let files = Namespace::open(cache, MAX).await.expect("namespace");
    let mut w = files.create("x").await.expect("create");
    let named = data(2, 3000);
    w.write(&named).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    let inode = files.stat("x").await.expect("stat").inode;
    assert!(
        inode > 1,
        "the file took inode {inode}, which raw access already used"
    );
    // Raw access to the file's inode is refused, naming it; the raw inode keeps working.
    let cache = files.cache();
    let err = cache
        .write(inode, 0, 0, b"overwrite")
        .await
        .expect_err("raw write to a namespace inode");
    assert!(
        matches!(err, Error::NamespaceInode { inode: i, .. } if i == inode)
            && err.to_string().contains(&format!("inode {inode}")),
        "{err}"
    );
    assert!(matches!(
        cache.read(inode, 0, 0, 10).await,
        Err(Error::NamespaceInode { .. })
    ));
    assert!(matches!(
        cache.remove(inode, 0..u64::MAX).await,
        Err(Error::NamespaceInode { .. })
    ));
    assert!(matches!(
        cache.write(inode + 1000, 0, 0, b"x").await,
        Err(Error::NamespaceInode { .. })
    ));
    assert_eq!(&cache.read(1, 0, 0, 1000).await.expect("raw")[..], &raw[..]);
    let r = files.open_read("x").await.expect("open");
    assert_eq!(&r.read(0, 3000).await.expect("read")[..], &named[..]);
    drop(r);
    files.shutdown().await.expect("shutdown");
    // The split is recorded: after a restart without a namespace, raw access to the file's
    // inode is still refused.
    let cache = env.open().await;
    assert!(matches!(
        cache.read(inode, 0, 0, 10).await,
        Err(Error::NamespaceInode { .. })
    ));
    assert_eq!(&cache.read(1, 0, 0, 1000).await.expect("raw")[..], &raw[..]);
    cache.shutdown().await.expect("shutdown");
}

/// Changes the block file `path` to `content` (same length) through the file system, as
/// another program would, making sure its modification time moves even on a coarse clock.
/// The engine may rename the file between its dirty and clean names meanwhile (the unmark
/// task runs after a flush returns): it is opened under either name and changed through
/// the open file, which a rename does not affect.
pub(crate) fn alter_on_disk(path: &std::path::Path, content: &[u8]) {
    use std::os::unix::fs::FileExt;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a block file name");
    let stem = name.strip_suffix(".dirty").unwrap_or(name);
    let names = [
        path.with_file_name(stem),
        path.with_file_name(format!("{stem}.dirty")),
    ];
    // A rename is atomic: one name or the other is there at any time, so a few rounds
    // find it even while it moves.
    let file = (0..1000)
        .find_map(|_| {
            names
                .iter()
                .find_map(|n| match std::fs::OpenOptions::new().write(true).open(n) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => panic!("open {}: {e}", n.display()),
                })
        })
        .unwrap_or_else(|| panic!("no file {} under either name", path.display()));
    let before = file.metadata().expect("stat").modified().expect("mtime");
    file.write_all_at(content, 0).expect("alter the cache file");
    file.set_len(content.len() as u64).expect("set the length");
    if file.metadata().expect("stat").modified().expect("mtime") == before {
        // Within one tick of the clock: a later time, as the next tick would give.
        file.set_modified(before + Duration::from_secs(1))
            .expect("set mtime");
    }
}

/// A clean cache file changed on disk while the engine runs is never served: its stamp
/// moved, so it is checked against its object and fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_cache_file_changed_on_disk_is_fetched_again() {
    let env = Env::new();
    let cache = env.open().await;
    let content = data(7, 1000);
    cache.write(3, 0, 0, &content).await.expect("write");
    cache.write(3, 1, 0, &data(8, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    // Hot: both blocks read from their cache files.
    assert_eq!(
        &cache.read(3, 0, 0, 1000).await.expect("read")[..],
        &content[..]
    );
    let downloads = cache.usage().await.expect("usage").downloads;
    // The file's name stays put from here: its dirty marker, if any, is dropped by now.
    cache.check_quiescent().await.expect("quiescent");
    let file = ["3-0", "3-0.dirty"]
        .into_iter()
        .map(|n| env.cache_dir().join(n))
        .find(|p| p.exists())
        .expect("the block's cache file");
    alter_on_disk(&file, &vec![0x55; 1000]);
    assert_eq!(
        &cache.read(3, 0, 0, 1000).await.expect("read")[..],
        &content[..],
        "the altered cache file was served"
    );
    assert_eq!(
        cache.usage().await.expect("usage").downloads,
        downloads + 1,
        "the block was fetched again"
    );
    // A downloaded block too.
    cache.clear().await.expect("drop the cache");
    assert_eq!(
        &cache.read(3, 1, 0, 1000).await.expect("read")[..],
        &data(8, 1000)[..]
    );
    alter_on_disk(&env.cache_dir().join("3-1"), &vec![0xaa; 1000]);
    assert_eq!(
        &cache.read(3, 1, 0, 1000).await.expect("read")[..],
        &data(8, 1000)[..]
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// Writes on a full cache disk evict clean blocks and go through; the error stays only when
/// nothing clean can go, and then says the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_full_cache_disk_evict_clean_blocks() {
    let fs = match blockcache_tests::tmpfs::Tmpfs::mount("2m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let env = Env::new();
    let mut config = env.config();
    config.cache_dir = fs.path().join("cache");
    config.block_size = 64 << 10;
    config.max_bytes = 1 << 30;
    config.max_dirty_bytes = 1 << 30;
    let cache = env.open_with(config).await;
    let block = |seed| data(seed, 64 << 10);
    for b in 0..16 {
        cache.write(1, b, 0, &block(b)).await.expect("write");
    }
    cache
        .flush()
        .await
        .expect("flush: the blocks are clean now");
    fs.fill("ballast");
    for b in 0..4 {
        cache
            .write(2, b, 0, &block(100 + b))
            .await
            .expect("a write on a full disk with clean blocks to evict");
    }
    for b in 0..4 {
        assert_eq!(
            &cache.read(2, b, 0, 64 << 10).await.expect("read")[..],
            &block(100 + b)[..]
        );
    }
    // Evicted blocks are fetched again (room for them comes from other clean blocks).
    assert_eq!(
        &cache.read(1, 0, 0, 64 << 10).await.expect("read")[..],
        &block(0)[..]
    );
    // Nothing clean left to evict: the disk is full, and the error says so.
    cache.clear().await.expect("drop the cache");
    let err = loop {
        // Dirty blocks only, until the disk is full.
        let b = rand_free_block(&cache).await;
        if let Err(e) = cache.write(3, b, 0, &block(200 + b)).await {
            break e;
        }
    };
    assert!(err.is_storage_full(), "{err}");
    std::fs::remove_file(fs.path().join("ballast")).expect("free the space");
    cache.flush().await.expect("flush once there is room");
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// The next block number of inode 3 not written yet.
async fn rand_free_block(cache: &blockcache::BlockCache) -> u64 {
    let mut b = 0;
    while !cache.read(3, b, 0, 1).await.expect("read").is_empty() {
        b += 1;
    }
    b
}
