//! The equivalents of S3QL's tests/t2_block_cache.py, with exact upload and delete counts.

use std::time::Duration;

use blockcache::Limits;
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, WAIT, data, within};

const INODE: u64 = 42;

async fn settle(cache: &blockcache::BlockCache) {
    cache.flush().await.expect("flush");
    assert!(
        cache.wait_for_removals(Duration::from_secs(20)).await,
        "removals drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_round_trip_and_redownload() {
    let env = Env::new();
    let cache = env.open().await;
    let block = data(1, 1024);
    cache.write(INODE, 1, 0, &block).await.expect("write");
    assert_eq!(cache.read(INODE, 1, 0, 1024).await.expect("read"), block);
    cache.clear().await.expect("clear");
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    assert_eq!(cache.read(INODE, 1, 0, 1024).await.expect("read"), block);
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.downloads, usage.uploads), (1, 1));
    assert_eq!(env.faults.calls(Op::Get), 1);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_uploads_only_the_dirty_lru_entries() {
    let env = Env::new();
    let cache = env.open().await;
    // 11 and 10 are written and flushed, so they are clean.
    for b in [11, 10] {
        cache
            .write(INODE, b, 0, &data(b, 100))
            .await
            .expect("write");
    }
    cache.flush().await.expect("flush");
    assert_eq!(env.faults.calls(Op::Put), 2);
    // LRU order becomes 7, 11, 10, 8, then 16 more dirty blocks.
    cache
        .write(INODE, 7, 0, &data(7, 100))
        .await
        .expect("write");
    cache.read(INODE, 11, 0, 10).await.expect("touch");
    cache.read(INODE, 10, 0, 10).await.expect("touch");
    cache
        .write(INODE, 8, 0, &data(8, 100))
        .await
        .expect("write");
    for b in 20..36 {
        cache
            .write(INODE, b, 0, &data(b, 100))
            .await
            .expect("write");
    }
    assert_eq!(cache.usage().await.expect("usage").entries, 20);
    let limits = Limits {
        max_entries: 16,
        ..cache.config().limits()
    };
    cache.set_limits(limits).await.expect("evict");
    // Exactly the two dirty LRU entries were uploaded.
    assert_eq!(env.faults.calls(Op::Put), 4);
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.entries, 16);
    assert_eq!(usage.dirty_entries, 16);
    let cached = blockcache_tests::list_dir(&env.cache_dir());
    for gone in [7, 8, 10, 11] {
        assert!(
            !cached
                .iter()
                .any(|n| n.starts_with(&format!("{INODE}-{gone}"))),
            "{gone} evicted: {cached:?}"
        );
    }
    // Evicted blocks read back from the store.
    assert_eq!(
        cache.read(INODE, 7, 0, 100).await.expect("read"),
        data(7, 100)
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_dedup_cases_with_exact_counts() {
    let env = Env::new();
    let cache = env.open().await;
    let (d1, d2, d3) = (data(1, 512), data(2, 512), data(3, 512));
    let counts = || (env.faults.calls(Op::Put), env.faults.calls(Op::Delete));

    // 1. New content: one upload.
    cache.write(INODE, 1, 0, &d1).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (1, 0));
    // 2. Same content in another block: linked, no upload.
    cache.write(INODE, 2, 0, &d1).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (1, 0));
    // 3. Overwrite while the old object is still referenced: one upload, no delete.
    cache.write(INODE, 1, 0, &d2).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (2, 0));
    // 4. Overwrite dropping the last reference: one upload, one delete.
    cache.write(INODE, 2, 0, &d3).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (3, 1));
    // 5. Re-link to an existing object while the old one loses its last reference.
    cache.write(INODE, 1, 0, &d3).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (3, 2));
    // 6. Link to an object that stays referenced: nothing.
    cache.write(INODE, 3, 0, &d3).await.expect("write");
    settle(&cache).await;
    assert_eq!(counts(), (3, 2));
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.logical_bytes, 3 * 512);
    assert_eq!(usage.unique_bytes, 512);
    assert_eq!(usage.dedup_savings, 2 * 512);
    assert_eq!(env.store_ids().await.len(), 1);
    cache.clear().await.expect("clear");
    for b in 1..=3 {
        assert_eq!(cache.read(INODE, b, 0, 512).await.expect("read"), d3);
    }
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_of_a_still_referenced_object_deletes_nothing() {
    let env = Env::new();
    let cache = env.open().await;
    let d = data(9, 700);
    cache.write(INODE, 1, 0, &d).await.expect("write");
    cache.write(INODE, 2, 0, &d).await.expect("write");
    cache.clear().await.expect("clear");
    assert_eq!(env.faults.calls(Op::Put), 1);
    cache.remove(INODE, 1..2).await.expect("remove");
    settle(&cache).await;
    assert_eq!(env.faults.calls(Op::Delete), 0);
    assert_eq!(cache.read(INODE, 2, 0, 700).await.expect("read"), d);
    assert!(cache.read(INODE, 1, 0, 700).await.expect("read").is_empty());
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_of_a_block_only_in_the_cache() {
    let env = Env::new();
    let cache = env.open().await;
    cache
        .write(INODE, 1, 0, &data(1, 100))
        .await
        .expect("write");
    cache.remove(INODE, 0..10).await.expect("remove");
    assert!(cache.read(INODE, 1, 0, 100).await.expect("read").is_empty());
    settle(&cache).await;
    assert_eq!(
        (env.faults.calls(Op::Put), env.faults.calls(Op::Delete)),
        (0, 0)
    );
    assert!(blockcache_tests::list_dir(&env.cache_dir()).is_empty());
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_during_upload_neither_waits_nor_resurrects() {
    let env = Env::new();
    let cache = env.open().await;
    env.faults.hold(Op::Put);
    cache
        .write(INODE, 1, 0, &data(1, 100))
        .await
        .expect("write");
    cache.commit().await.expect("commit");
    env.wait_held(Op::Put, 1).await;
    // The upload is stuck at the store; removing the block does not wait for it.
    tokio::time::timeout(Duration::from_secs(10), cache.remove(INODE, 0..u64::MAX))
        .await
        .expect("remove does not wait for the upload")
        .expect("remove");
    assert!(cache.read(INODE, 1, 0, 100).await.expect("read").is_empty());
    env.faults.release(Op::Put);
    settle(&cache).await;
    // The object was uploaded, then deleted once its upload ended.
    assert_eq!(
        (env.faults.calls(Op::Put), env.faults.calls(Op::Delete)),
        (1, 1)
    );
    assert!(env.store_ids().await.is_empty());
    assert!(cache.read(INODE, 1, 0, 100).await.expect("read").is_empty());
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_evictions_behind_a_locked_entry_end_empty() {
    let env = Env::new();
    let cache = std::sync::Arc::new(env.open().await);
    cache
        .write(INODE, 1, 0, &data(1, 100))
        .await
        .expect("write");
    cache.flush().await.expect("flush");
    let handle = cache.block_for_read(INODE, 1).await.expect("lock");
    {
        let limits = Limits {
            max_entries: 0,
            ..cache.config().limits()
        };
        let c = cache.clone();
        let set = tokio::spawn(async move { c.set_limits(limits).await });
        let (a, b) = (cache.clone(), cache.clone());
        let e1 = tokio::spawn(async move { a.evict().await });
        let e2 = tokio::spawn(async move { b.evict().await });
        tokio::task::yield_now().await;
        assert_eq!(
            cache.usage().await.expect("usage").entries,
            1,
            "the locked entry stays"
        );
        drop(handle);
        for t in [set, e1, e2] {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("evictions finish")
                .expect("join")
                .expect("evict");
        }
    }
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    cache.check_invariants().await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_evictions_do_not_over_evict() {
    let env = Env::new();
    let cache = std::sync::Arc::new(env.open().await);
    for b in 0..5 {
        cache
            .write(INODE, b, 0, &data(b, 100))
            .await
            .expect("write");
    }
    cache.flush().await.expect("flush");
    let handle = cache
        .block_for_read(INODE, 0)
        .await
        .expect("lock the LRU entry");
    {
        let mut st = cache.config().limits();
        st.max_entries = 4;
        // Change the limit without evicting, then race two evictions.
        let (a, b) = (cache.clone(), cache.clone());
        let set = tokio::spawn({
            let c = cache.clone();
            async move { c.set_limits(st).await }
        });
        let e1 = tokio::spawn(async move { a.evict().await });
        let e2 = tokio::spawn(async move { b.evict().await });
        for t in [set, e1, e2] {
            within("an eviction behind a released entry", WAIT, t)
                .await
                .expect("join")
                .expect("evict");
        }
    }
    drop(handle);
    assert_eq!(cache.usage().await.expect("usage").entries, 4);
    cache.check_invariants().await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_of_a_block_in_cache_and_store() {
    let env = Env::new();
    let cache = env.open().await;
    cache
        .write(INODE, 1, 0, &data(1, 100))
        .await
        .expect("write");
    cache.flush().await.expect("flush");
    assert_eq!(env.faults.calls(Op::Put), 1);
    cache.remove(INODE, 1..2).await.expect("remove");
    settle(&cache).await;
    assert_eq!(env.faults.calls(Op::Delete), 1);
    assert!(cache.read(INODE, 1, 0, 100).await.expect("read").is_empty());
    assert!(env.store_ids().await.is_empty());
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_of_a_block_only_in_the_store() {
    let env = Env::new();
    let cache = env.open().await;
    cache
        .write(INODE, 1, 0, &data(1, 100))
        .await
        .expect("write");
    cache.clear().await.expect("clear");
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    cache.remove(INODE, 0..u64::MAX).await.expect("remove");
    settle(&cache).await;
    assert_eq!(
        (env.faults.calls(Op::Put), env.faults.calls(Op::Delete)),
        (1, 1)
    );
    assert!(cache.read(INODE, 1, 0, 100).await.expect("read").is_empty());
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}
