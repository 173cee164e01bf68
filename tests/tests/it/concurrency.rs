//! Concurrency: many tasks on overlapping blocks on a multi-thread runtime (with uploaded
//! and with linked objects), backpressure,
//! shared downloads, and reads that never wait behind other blocks' uploads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockcache::BlockKey;
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, WAIT, data, is_injected, within};
use rand::{RngExt, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_many_tasks_on_overlapping_blocks() {
    stress(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_many_tasks_on_overlapping_blocks_with_linked_objects() {
    stress(true).await;
}

/// Twelve tasks writing, reading, truncating, syncing and flushing eight blocks of two
/// inodes in a tight cache, checked against a model. Store faults are injected at random:
/// through the wrapper into uploads and downloads, or, `linked` (a `file://` store whose
/// objects are hard links to cache files, which the wrapper does not see), into the store's
/// durability barriers. A call may fail only with an injected fault.
async fn stress(linked: bool) {
    let env = if linked { Env::linked() } else { Env::new() };
    let mut config = env.config();
    // A tight cache, so eviction, re-download and dirty-budget waits happen all the time.
    config.max_entries = 6;
    config.max_bytes = 6 * 1024;
    config.max_dirty_bytes = 3 * 1024;
    config.upload_delay = Some(Duration::from_millis(2));
    let cache = Arc::new(env.open_with(config).await);
    if linked {
        env.faults.fail_fraction(Op::Barrier, 0.05);
    } else {
        // Often enough that calls fail after their retries now and then.
        env.faults.fail_fraction(Op::Put, 0.3);
        env.faults.fail_fraction(Op::Get, 0.3);
    }
    // Fails the test on an error that is not an injected fault.
    fn allow<T>(what: String, result: blockcache::Result<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) if is_injected(&e) => None,
            Err(e) => panic!("{what} failed without an injected fault: {e:?}"),
        }
    }
    // The expected content of every block, updated while the block's handle is held, so its
    // order matches the order the cache applied the writes in.
    let model: Arc<Mutex<HashMap<BlockKey, Vec<u8>>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let (cache, model) = (cache.clone(), model.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(env.seed ^ t);
        tasks.push(tokio::spawn(async move {
            for step in 0..120u64 {
                let key = BlockKey::new(rng.random_range(0..2), rng.random_range(0..8));
                let what = |op: &str| format!("{op} of {key:?} by task {t} at step {step}");
                match rng.random_range(0..10) {
                    0..=4 => {
                        let offset = rng.random_range(0..1024u64);
                        let len = rng.random_range(1..=(1024 - offset) as usize);
                        let bytes = data(t * 1000 + step, len);
                        let mut h = cache.block(key.inode, key.blockno).await.expect("handle");
                        // A miss may fail to download under injected faults; nothing changed.
                        if allow(what("write"), h.write(offset, &bytes).await).is_some() {
                            let mut m = model.lock().expect("model");
                            let block = m.entry(key).or_default();
                            let end = offset as usize + len;
                            if block.len() < end {
                                block.resize(end, 0);
                            }
                            block[offset as usize..end].copy_from_slice(&bytes);
                        }
                    }
                    5..=7 => {
                        let mut h = cache
                            .block_for_read(key.inode, key.blockno)
                            .await
                            .expect("handle");
                        if let Some(got) = allow(what("read"), h.read(0, 1024).await) {
                            let m = model.lock().expect("model");
                            let want = m.get(&key).cloned().unwrap_or_default();
                            assert_eq!(got, want, "task {t} step {step} {key:?}");
                        }
                    }
                    8 => {
                        let size = rng.random_range(0..=1024u64);
                        let mut h = cache.block(key.inode, key.blockno).await.expect("handle");
                        if allow(what("truncate"), h.truncate(size).await).is_some() {
                            model
                                .lock()
                                .expect("model")
                                .entry(key)
                                .or_default()
                                .resize(size as usize, 0);
                        }
                    }
                    // Failures here are injected upload errors; the data stays dirty.
                    _ if step % 2 == 0 => drop(allow(what("flush"), cache.flush().await)),
                    _ => cache.sync().await.expect("sync"),
                }
            }
        }));
    }
    for (t, task) in tasks.into_iter().enumerate() {
        within(&format!("stress task {t} to finish"), WAIT * 4, task)
            .await
            .expect("task");
    }
    env.faults.reset();
    within("final flush", WAIT, cache.flush())
        .await
        .expect("final flush");
    cache.clear().await.expect("clear");
    let model = model.lock().expect("model").clone();
    for inode in 0..2 {
        for blockno in 0..8 {
            let key = BlockKey::new(inode, blockno);
            let got = cache
                .read(key.inode, key.blockno, 0, 1024)
                .await
                .expect("read back");
            let want = model.get(&key).cloned().unwrap_or_default();
            assert_eq!(got, want, "{key:?} after re-download");
        }
    }
    cache.check_invariants().await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_wait_for_the_dirty_budget_and_nothing_is_dropped() {
    let env = Env::new();
    let mut config = env.config();
    config.max_dirty_bytes = 2048;
    let cache = Arc::new(env.open_with(config).await);
    env.faults.hold(Op::Put);
    cache.write(1, 0, 0, &data(0, 1024)).await.expect("write");
    cache.write(1, 1, 0, &data(1, 1024)).await.expect("write");
    let c = cache.clone();
    let third = tokio::spawn(async move { c.write(1, 2, 0, &data(2, 1024)).await });
    // The waiting writer makes the commit task upload the dirty blocks, which are stuck.
    env.wait_held(Op::Put, 2).await;
    assert!(
        !third.is_finished(),
        "the third writer waits for the dirty budget"
    );
    let usage = cache.usage().await.expect("usage");
    assert!(usage.dirty_bytes <= 2048, "{usage:?}");
    env.faults.release(Op::Put);
    tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the writer proceeds once uploads finish")
        .expect("join")
        .expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    for b in 0..3 {
        assert_eq!(
            cache.read(1, b, 0, 1024).await.expect("read"),
            data(b, 1024)
        );
    }
    cache.check_invariants().await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_never_wait_behind_uploads_or_eviction() {
    let env = Env::new();
    let mut config = env.config();
    config.max_entries = 3;
    let cache = Arc::new(env.open_with(config).await);
    env.faults.hold(Op::Put);
    cache.write(1, 0, 0, &data(0, 1000)).await.expect("write");
    cache.write(1, 1, 0, &data(1, 1000)).await.expect("write");
    cache.write(1, 2, 0, &data(2, 1000)).await.expect("write");
    // A fourth block needs room, and every cached block is dirty: eviction uploads the least
    // recently used one, and that upload is stuck.
    let c = cache.clone();
    let writer = tokio::spawn(async move { c.write(1, 3, 0, &data(3, 1000)).await });
    env.wait_held(Op::Put, 1).await;
    for b in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(5), cache.read(1, b, 0, 1000))
            .await
            .expect("a cached read does not wait")
            .expect("read");
        assert_eq!(got, data(b, 1000));
    }
    assert!(!writer.is_finished());
    env.faults.release(Op::Put);
    within("the writer once uploads go on", WAIT, writer)
        .await
        .expect("join")
        .expect("write");
    cache.check_invariants().await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_download() {
    let env = Env::new();
    let cache = Arc::new(env.open().await);
    cache.write(1, 0, 0, &data(7, 1024)).await.expect("write");
    cache.clear().await.expect("clear");
    env.faults.latency(Op::Get, Duration::from_millis(50));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let c = cache.clone();
        readers.push(tokio::spawn(async move { c.read(1, 0, 0, 1024).await }));
    }
    for r in readers {
        let got = within("a reader of the shared download", WAIT, r).await;
        assert_eq!(got.expect("join").expect("read"), data(7, 1024));
    }
    assert_eq!(env.faults.calls(Op::Get), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_of_equal_content_upload_once() {
    let env = Env::new();
    let cache = Arc::new(env.open().await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = cache.clone();
        tasks.push(tokio::spawn(async move {
            c.write(i, 0, 0, &data(99, 1024)).await.expect("write");
            c.flush().await.expect("flush");
        }));
    }
    for t in tasks {
        within("a writer and flusher", WAIT, t).await.expect("join");
    }
    assert_eq!(env.faults.calls(Op::Put), 1);
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.unique_bytes, usage.logical_bytes), (1024, 16 * 1024));
    cache.check_invariants().await.expect("invariants");
}

/// A block rewritten while its upload is in flight: the rewrite does not wait for the
/// upload, the upload's completion does not mark the newer content clean, and a flush
/// uploads the newer content: the cache and the store hold it, the older object is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_during_an_upload_is_uploaded_after_it() {
    let env = Env::new();
    let cache = env.open().await;
    let old = data(1, 1000);
    env.faults.hold(Op::Put);
    cache.write(1, 0, 0, &old).await.expect("write");
    cache.commit().await.expect("commit");
    env.wait_held(Op::Put, 1).await;
    // The upload of `old` is stuck at the store: rewrite the block whole, then in part.
    let mut new = data(2, 1000);
    within(
        "a rewrite during the upload",
        WAIT,
        cache.write(1, 0, 0, &new),
    )
    .await
    .expect("rewrite");
    within(
        "a write during the upload",
        WAIT,
        cache.write(1, 0, 990, b"the end"),
    )
    .await
    .expect("write");
    new[990..997].copy_from_slice(b"the end");
    env.faults.release(Op::Put);
    within("the first upload to be recorded", WAIT, async {
        loop {
            let usage = cache.usage().await.expect("usage");
            if usage.uploads == 1 && usage.uploads_in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        cache.usage().await.expect("usage").dirty_entries,
        1,
        "the rewrite stays dirty after the older upload"
    );
    assert!(cache.read(1, 0, 0, 1024).await.expect("read") == new);
    cache.flush().await.expect("flush");
    assert_eq!(
        env.faults.calls(Op::Put),
        2,
        "the newer content was uploaded"
    );
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.dirty_entries, usage.uploads_in_flight), (0, 0));
    assert_eq!(cache.read(1, 0, 0, 1024).await.expect("read"), new);
    cache.clear().await.expect("clear");
    assert_eq!(
        cache
            .read(1, 0, 0, 1024)
            .await
            .expect("read from the store"),
        new
    );
    assert!(cache.wait_for_removals(WAIT).await);
    let ids = env.store_ids().await;
    assert_eq!(ids.len(), 1, "the older object was deleted");
    assert!(std::fs::read(env.object_path(ids[0])).expect("object file") == new);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}
