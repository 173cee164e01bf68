//! Read-side deduplication: a miss whose object is already cached for another block shares
//! that block's file instead of downloading the object again, and concurrent misses of one
//! object download it once.

use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, data};

const INODE: u64 = 42;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_block_is_downloaded_once_and_changes_apart() {
    let env = Env::new();
    let cache = env.open().await;
    let same = data(7, 1024);
    let keys = [(INODE, 1), (INODE, 2), (INODE + 1, 0)];
    for (inode, b) in keys {
        cache.write(inode, b, 0, &same).await.expect("write");
    }
    cache.flush().await.expect("flush");
    assert_eq!(
        env.faults.calls(Op::Put),
        1,
        "one object for the three blocks"
    );
    cache.clear().await.expect("clear");
    for (inode, b) in keys {
        assert_eq!(cache.read(inode, b, 0, 1024).await.expect("read"), same);
    }
    assert_eq!(env.faults.calls(Op::Get), 1, "one download for one object");
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.downloads, usage.download_dedup_hits), (1, 2));
    assert_eq!(usage.download_bytes, 1024);

    // The blocks share one file; a change of one leaves the others as they were.
    let changed = data(8, 100);
    cache.write(INODE, 2, 10, &changed).await.expect("write");
    let mut want = same.clone();
    want[10..110].copy_from_slice(&changed);
    assert_eq!(cache.read(INODE, 2, 0, 1024).await.expect("read"), want);
    for (inode, b) in [(INODE, 1), (INODE + 1, 0)] {
        assert_eq!(cache.read(inode, b, 0, 1024).await.expect("read"), same);
    }
    cache.check_invariants().await.expect("invariants");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(cache.read(INODE, 2, 0, 1024).await.expect("read"), want);
    assert_eq!(cache.read(INODE, 1, 0, 1024).await.expect("read"), same);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_object_download_it_once() {
    let env = Env::new();
    let cache = std::sync::Arc::new(env.open().await);
    let same = data(9, 1000);
    for b in 0..8 {
        cache.write(INODE, b, 0, &same).await.expect("write");
    }
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let reads = (0..8).map(|b| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.read(INODE, b, 0, 1000).await.expect("read") })
    });
    for got in futures::future::join_all(reads).await {
        assert_eq!(got.expect("read task"), same);
    }
    assert_eq!(
        env.faults.calls(Op::Get),
        1,
        "one download for eight misses"
    );
    cache.check_invariants().await.expect("invariants");
    std::sync::Arc::into_inner(cache)
        .expect("cache shared")
        .shutdown()
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cached_copy_is_not_shared() {
    let env = Env::new();
    let cache = env.open().await;
    let same = data(11, 1024);
    for b in [1, 2] {
        cache.write(INODE, b, 0, &same).await.expect("write");
    }
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(cache.read(INODE, 1, 0, 1024).await.expect("read"), same);
    // Block 1's cache file changes behind the engine's back.
    let file = env.cache_dir().join(format!("{INODE}-1"));
    assert!(file.is_file(), "block 1's cache file is {}", file.display());
    std::fs::write(&file, data(12, 1024)).expect("damage the cache file");
    // Block 2 is downloaded, not linked to the damaged file.
    assert_eq!(cache.read(INODE, 2, 0, 1024).await.expect("read"), same);
    assert_eq!(env.faults.calls(Op::Get), 2);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_of_many_blocks_is_shared_beyond_the_first_ones_the_database_names() {
    let env = Env::new();
    let cache = std::sync::Arc::new(env.open().await);
    let same = data(13, 1000);
    // 20 blocks of a low inode come first in the database's order; the 8 read are after.
    for b in 0..20 {
        cache.write(10, b, 0, &same).await.expect("write");
    }
    for b in 0..8 {
        cache.write(50, b, 0, &same).await.expect("write");
    }
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let reads = (0..8).map(|b| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.read(50, b, 0, 1000).await.expect("read") })
    });
    for got in futures::future::join_all(reads).await {
        assert_eq!(got.expect("read task"), same);
    }
    assert_eq!(
        env.faults.calls(Op::Get),
        1,
        "one download for eight misses"
    );
    std::sync::Arc::into_inner(cache)
        .expect("cache shared")
        .shutdown()
        .await
        .expect("shutdown");
}
