//! Fault injection on uploads, downloads and deletes: errors are reported, retried, and
//! nothing is lost.

use std::time::Duration;

use blockcache::Error;
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, WAIT, data, is_injected, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_upload_failures_are_retried() {
    let env = Env::new();
    let cache = env.open().await;
    env.faults.fail_first(Op::Put, 2);
    cache.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    cache.flush().await.expect("flush succeeds after retries");
    assert_eq!(env.faults.calls(Op::Put), 3);
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 0);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_upload_failure_keeps_data_dirty_and_flush_reports_it() {
    let env = Env::new();
    let cache = env.open().await;
    env.faults.fail_first(Op::Put, u64::MAX);
    let d = data(2, 1000);
    cache.write(1, 0, 0, &d).await.expect("write");
    let err = cache.flush().await.expect_err("flush fails");
    assert!(
        matches!(
            err,
            Error::Upload {
                inode: 1,
                blockno: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("stays dirty"), "{err}");
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.dirty_entries, usage.upload_errors), (1, 1));
    // The data is still readable, and eviction cannot drop it.
    assert_eq!(cache.read(1, 0, 0, 1000).await.expect("read"), d);
    // Once the store recovers, a flush uploads it.
    env.faults.reset();
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(cache.read(1, 0, 0, 1000).await.expect("read"), d);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_against_an_upload_that_then_fails() {
    let env = Env::new();
    let cache = env.open().await;
    let d = data(3, 800);
    env.faults.hold(Op::Put);
    env.faults.permanent(Op::Put, true);
    // The upload started by commit fails, and so does the one flush starts itself (a flush
    // commits again blocks whose earlier upload failed, and reports only its own failures).
    env.faults.fail_first(Op::Put, 2);
    cache.write(1, 0, 0, &d).await.expect("write");
    cache.commit().await.expect("commit");
    env.wait_held(Op::Put, 1).await;
    // Block (2, 0) has the same content and links to the object still in flight.
    cache.write(2, 0, 0, &d).await.expect("write");
    cache.commit().await.expect("commit links");
    assert_eq!(
        cache.usage().await.expect("usage").dirty_entries,
        2,
        "linked block stays dirty"
    );
    env.faults.release(Op::Put);
    let err = cache.flush().await.expect_err("the shared upload failed");
    assert!(matches!(err, Error::Upload { .. }), "{err}");
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 2);
    // Both blocks are uploaded on their own next time (one object again, by dedup).
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(cache.read(1, 0, 0, 800).await.expect("read"), d);
    assert_eq!(cache.read(2, 0, 0, 800).await.expect("read"), d);
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    assert_eq!(env.store_ids().await.len(), 1);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// Random upload failures: a flush either fails with an injected fault or stores
/// everything, and an `Ok` flush is checked at once (nothing dirty, every object in the
/// store), then with the store refusing every upload, so that no later flush can make up
/// for a flush that lied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_upload_failures_lose_nothing() {
    let env = Env::new();
    let cache = env.open().await;
    let mut want = std::collections::HashMap::new();
    for round in 0..2u64 {
        env.faults.reset();
        env.faults.fail_fraction(Op::Put, 0.3);
        // Round 0 writes 40 blocks, round 1 rewrites every other one.
        for b in (0..40).step_by(1 + round as usize) {
            let bytes = data(round * 100 + b, 1024);
            cache.write(7, b, 0, &bytes).await.expect("write");
            want.insert(b, bytes);
        }
        let mut failed = 0;
        loop {
            match within("flush", WAIT, cache.flush()).await {
                Ok(()) => break,
                Err(e) => assert!(is_injected(&e), "flush failed on its own: {e:?}"),
            }
            failed += 1;
            assert!(failed < 50, "flush never succeeded");
        }
        let usage = cache.usage().await.expect("usage");
        assert_eq!(
            (usage.dirty_entries, usage.uploads_in_flight),
            (0, 0),
            "round {round}: the flush returned Ok"
        );
        assert_eq!(usage.stored_bytes, usage.unique_bytes, "{usage:?}");
        assert_eq!(usage.logical_bytes, 40 * 1024, "{usage:?}");
    }
    // Nothing may be left to upload: with every upload failing, dropping the cached copies
    // (which flushes first) still succeeds, and the reads are downloads of what is stored.
    env.faults.reset();
    env.faults.permanent(Op::Put, true);
    env.faults.fail_first(Op::Put, u64::MAX);
    let puts = env.faults.calls(Op::Put);
    cache.clear().await.expect("clear without uploads");
    assert_eq!(
        env.faults.calls(Op::Put),
        puts,
        "nothing was left to upload"
    );
    assert!(cache.wait_for_removals(WAIT).await);
    assert_eq!(env.store_ids().await.len(), 40, "one object per block");
    for (b, bytes) in &want {
        assert_eq!(
            &cache.read(7, *b, 0, 1024).await.expect("read")[..],
            &bytes[..],
            "block {b}"
        );
    }
    assert_eq!(cache.usage().await.expect("usage").downloads, 40);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_failures_are_retried_then_reported() {
    let env = Env::new();
    let cache = env.open().await;
    let d = data(4, 600);
    cache.write(1, 0, 0, &d).await.expect("write");
    cache.clear().await.expect("clear");
    env.faults.fail_first(Op::Get, 2);
    assert_eq!(
        cache.read(1, 0, 0, 600).await.expect("read after retries"),
        d
    );
    cache.clear().await.expect("clear");
    env.faults.fail_first(Op::Get, 100);
    let err = cache
        .read(1, 0, 0, 600)
        .await
        .expect_err("persistent failure");
    assert!(
        matches!(
            err,
            Error::Download {
                inode: 1,
                blockno: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_transient());
    // Nothing was cached or lost; once the store answers, the read works.
    env.faults.reset();
    assert_eq!(cache.read(1, 0, 0, 600).await.expect("read"), d);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_download_is_an_error_naming_the_object() {
    let env = Env::new();
    let cache = env.open().await;
    let d = data(5, 600);
    cache.write(1, 3, 0, &d).await.expect("write");
    cache.clear().await.expect("clear");
    env.faults.corrupt_reads(true);
    let err = cache.read(1, 3, 0, 600).await.expect_err("corrupted");
    assert!(
        matches!(
            err,
            Error::Corrupted {
                obj_id,
                inode: 1,
                blockno: 3,
                ..
            } if obj_id == Env::nth_object(1)
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("object {}", Env::nth_object(1)))
            && err.to_string().contains("SHA-256"),
        "{err}"
    );
    assert_eq!(
        cache.usage().await.expect("usage").entries,
        0,
        "nothing corrupted was cached"
    );
    env.faults.reset();
    assert_eq!(cache.read(1, 3, 0, 600).await.expect("read"), d);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_truncated_or_missing_in_the_store() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(6, 600)).await.expect("write");
    cache.write(1, 1, 0, &data(7, 600)).await.expect("write");
    cache.clear().await.expect("clear");
    std::fs::write(env.object_path(Env::nth_object(1)), b"short").expect("truncate object 1");
    let err = cache.read(1, 0, 0, 600).await.expect_err("truncated");
    assert!(
        matches!(err, Error::Corrupted { obj_id, .. } if obj_id == Env::nth_object(1)),
        "{err}"
    );
    assert!(err.to_string().contains("5 bytes instead of 600"), "{err}");
    std::fs::remove_file(env.object_path(Env::nth_object(2))).expect("delete object 2");
    let err = cache.read(1, 1, 0, 600).await.expect_err("missing");
    assert!(
        matches!(err, Error::Download { obj_id, .. } if obj_id == Env::nth_object(2)),
        "{err}"
    );
    assert!(!err.is_transient());
    let chain = format!("{:?}", err);
    assert!(chain.contains("NotFound"), "{chain}");
    // Other blocks and the metadata are untouched.
    cache.write(1, 2, 0, b"still fine").await.expect("write");
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_failures_are_retried_until_the_store_is_clean() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..10 {
        cache.write(1, b, 0, &data(b, 100)).await.expect("write");
    }
    cache.flush().await.expect("flush");
    env.faults.fail_first(Op::Delete, 25);
    cache.remove(1, 0..10).await.expect("remove");
    assert!(
        cache.wait_for_removals(Duration::from_secs(30)).await,
        "removals finish"
    );
    assert!(env.store_ids().await.is_empty());
    let usage = cache.usage().await.expect("usage");
    assert!(usage.delete_errors >= 1);
    assert_eq!((usage.pending_removals, usage.deletes), (0, 10));
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// Eviction while every upload fails: the cache is full of dirty blocks, so writers of new
/// blocks and a shrink of the limits must wait for uploads that keep failing. Nothing dirty
/// is dropped, the cached blocks stay readable, the accounting stays exact, and once the
/// store recovers the waiters finish and a flush stores everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_while_uploads_keep_failing_drops_nothing() {
    let env = Env::new();
    let mut config = env.config();
    // Room for four blocks; the dirty budget would allow more.
    config.max_entries = 4;
    config.max_bytes = 4 * 1024;
    config.max_dirty_bytes = 16 * 1024;
    let cache = std::sync::Arc::new(env.open_with(config.clone()).await);
    env.faults.fail_first(Op::Put, u64::MAX);
    for b in 0..4 {
        cache.write(1, b, 0, &data(b, 1024)).await.expect("write");
    }
    // New blocks need room, which only an upload can make.
    let writers: Vec<_> = (4..7)
        .map(|b| {
            let c = cache.clone();
            tokio::spawn(async move { c.write(1, b, 0, &data(b, 1024)).await })
        })
        .collect();
    let shrink = {
        let c = cache.clone();
        let mut limits = config.limits();
        limits.max_entries = 2;
        tokio::spawn(async move { c.set_limits(limits).await })
    };
    within("eviction to keep trying to upload", WAIT, async {
        while env.faults.injected(Op::Put) < 12
            && !writers.iter().any(|w| w.is_finished())
            && !shrink.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for w in &writers {
        assert!(
            !w.is_finished(),
            "a writer got room while nothing could be uploaded"
        );
    }
    assert!(
        !shrink.is_finished(),
        "the limits shrank while nothing could be uploaded"
    );
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (usage.entries, usage.dirty_entries, usage.dirty_bytes),
        (4, 4, 4 * 1024),
        "{usage:?}"
    );
    for b in 0..4 {
        let got = within("a cached read", WAIT, cache.read(1, b, 0, 1024))
            .await
            .expect("read");
        assert!(got == data(b, 1024), "block {b}");
    }
    cache.check_invariants().await.expect("invariants");
    env.faults.reset();
    for (w, b) in writers.into_iter().zip(4..) {
        within(&format!("the writer of block {b}"), WAIT, w)
            .await
            .expect("join")
            .expect("write");
    }
    within("the limits to shrink", WAIT, shrink)
        .await
        .expect("join")
        .expect("set_limits");
    let usage = cache.usage().await.expect("usage");
    assert!(usage.entries <= 2, "{usage:?}");
    cache.flush().await.expect("flush");
    cache.check_invariants().await.expect("invariants");
    cache.clear().await.expect("clear");
    for b in 0..7 {
        let got = cache.read(1, b, 0, 1024).await.expect("read");
        assert!(got == data(b, 1024), "block {b} from the store");
    }
    assert_eq!(env.store_ids().await.len(), 7);
    std::sync::Arc::into_inner(cache)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_grow_their_pace_on_a_far_store_and_a_failed_one_halves_it() {
    let env = Env::new();
    let mut config = env.config();
    config.upload_tasks = 64;
    config.max_bytes = 1 << 20;
    config.max_entries = 4096;
    config.max_dirty_bytes = 1 << 20;
    let cache = env.open_with(config).await;
    let floor = cache.usage().await.expect("usage").upload_concurrency;
    assert_eq!(floor, 8);
    // Every upload waits the same round trip, with many queued: the pace climbs.
    env.faults.latency(Op::Put, Duration::from_millis(20));
    for b in 0..200 {
        cache.write(1, b, 0, &data(b, 1000)).await.expect("write");
    }
    cache.flush().await.expect("flush");
    let grown = cache.usage().await.expect("usage").upload_concurrency;
    assert!(grown > floor, "the pace stayed at {grown}");
    // The store fails an upload (after its retries): the pace halves.
    env.faults.fail_first(Op::Put, u64::MAX);
    cache
        .write(2, 0, 0, &data(10_000, 1000))
        .await
        .expect("write");
    cache.flush().await.expect_err("flush fails");
    let cut = cache.usage().await.expect("usage").upload_concurrency;
    assert_eq!(cut, (grown / 2).max(floor), "grown to {grown}");
    env.faults.reset();
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
}
