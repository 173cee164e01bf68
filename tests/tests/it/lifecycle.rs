//! Lifecycle and controls: background commit, shutdown, usage, limits, flush of one inode,
//! truncation and whole-block writes without downloads.

use std::sync::Arc;
use std::time::Duration;

use blockcache::Limits;
use blockcache_backend::faulty::Op;
use blockcache_tests::crash::{Holder, LoopFs};
use blockcache_tests::{Env, WAIT, data, list_dir, within};

/// The child process that holds a volume open until it is killed.
const HOLD_CACHE: &str = env!("CARGO_BIN_EXE_hold-cache");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_commit_uploads_a_block_that_keeps_being_read() {
    let env = Env::new();
    let mut config = env.config();
    config.upload_delay = Some(Duration::from_millis(200));
    let cache = env.open_with(config).await;
    cache.write(1, 0, 0, &data(1, 500)).await.expect("write A");
    // Block A keeps being read and block B keeps being written: S3QL's commit task stopped at
    // B (more recent in LRU order) and never uploaded A.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while env.faults.calls(Op::Put) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A was never uploaded"
        );
        tick.tick().await;
        cache.read(1, 0, 0, 500).await.expect("read A");
        cache
            .write(1, 1, 0, &data(100 + i, 500))
            .await
            .expect("write B");
        i += 1;
    }
    // Only A was due: B was always written less than the delay ago.
    assert_eq!(env.faults.calls(Op::Put), 1);
    cache.shutdown().await.expect("shutdown flushes B");
    assert_eq!(env.store_ids().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_everything_to_the_store() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..10 {
        cache.write(2, b, 0, &data(b, 1024)).await.expect("write");
    }
    cache.remove(2, 9..10).await.expect("remove");
    cache.shutdown().await.expect("shutdown");
    std::fs::remove_dir_all(env.cache_dir()).expect("drop cache");
    let cache = env.open().await;
    for b in 0..9 {
        assert_eq!(
            cache.read(2, b, 0, 1024).await.expect("read"),
            data(b, 1024)
        );
    }
    assert!(cache.read(2, 9, 0, 1024).await.expect("read").is_empty());
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_dirty_age_uploads_and_removals() {
    let env = Env::new();
    let cache = Arc::new(env.open().await);
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.entries, usage.oldest_dirty_age), (0, None));
    cache.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (
            usage.entries,
            usage.bytes,
            usage.dirty_entries,
            usage.dirty_bytes
        ),
        (1, 1000, 1, 1000)
    );
    assert!(usage.oldest_dirty_age.is_some());
    env.faults.hold(Op::Put);
    let c = cache.clone();
    let flushing = tokio::spawn(async move { c.flush().await });
    env.wait_held(Op::Put, 1).await;
    assert_eq!(cache.usage().await.expect("usage").uploads_in_flight, 1);
    env.faults.release(Op::Put);
    within("the flush once the upload is released", WAIT, flushing)
        .await
        .expect("join")
        .expect("flush");
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (
            usage.dirty_entries,
            usage.uploads_in_flight,
            usage.stored_bytes
        ),
        (0, 0, 1000)
    );
    assert_eq!(usage.oldest_dirty_age, None);
    env.faults.hold(Op::Delete);
    cache.remove(1, 0..1).await.expect("remove");
    env.wait_held(Op::Delete, 1).await;
    assert_eq!(cache.usage().await.expect("usage").pending_removals, 1);
    env.faults.release(Op::Delete);
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (usage.pending_removals, usage.stored_bytes, usage.deletes),
        (0, 0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_at_runtime() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..10 {
        cache.write(1, b, 0, &data(b, 1024)).await.expect("write");
    }
    cache
        .set_limits(Limits {
            max_bytes: 4 * 1024,
            max_entries: 100,
            max_dirty_bytes: 4 * 1024,
        })
        .await
        .expect("shrink");
    let usage = cache.usage().await.expect("usage");
    assert!(usage.bytes <= 4 * 1024 && usage.entries <= 4, "{usage:?}");
    assert_eq!(usage.limits.max_bytes, 4 * 1024);
    for b in 0..10 {
        assert_eq!(
            cache.read(1, b, 0, 1024).await.expect("read"),
            data(b, 1024)
        );
        assert!(cache.usage().await.expect("usage").bytes <= 4 * 1024);
    }
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_of_one_inode_leaves_the_others_dirty() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 100)).await.expect("write");
    cache.write(2, 0, 0, &data(2, 100)).await.expect("write");
    cache.flush_inode(1).await.expect("flush inode 1");
    assert_eq!(env.faults.calls(Op::Put), 1);
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 1);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_and_whole_block_writes() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    cache.write(1, 1, 0, &data(2, 1000)).await.expect("write");
    cache.write(1, 2, 0, &data(3, 1000)).await.expect("write");
    cache.clear().await.expect("clear");
    // A write covering the whole old content and a truncation to 0 download nothing.
    cache
        .write(1, 0, 0, &data(4, 1000))
        .await
        .expect("overwrite");
    cache
        .block(1, 1)
        .await
        .expect("handle")
        .truncate(0)
        .await
        .expect("truncate");
    assert_eq!(env.faults.calls(Op::Get), 0);
    // A partial write needs the old content.
    cache.write(1, 2, 10, b"xyz").await.expect("partial write");
    assert_eq!(env.faults.calls(Op::Get), 1);
    let mut expected = data(3, 1000);
    expected[10..13].copy_from_slice(b"xyz");
    assert_eq!(cache.read(1, 2, 0, 1024).await.expect("read"), expected);
    // Growing by truncation reads back zeros; a gap left by a write too.
    let mut h = cache.block(1, 3).await.expect("handle");
    h.write(0, b"abc").await.expect("write");
    h.truncate(10).await.expect("grow");
    assert_eq!(
        &h.read(0, 100).await.expect("read")[..],
        b"abc\0\0\0\0\0\0\0"
    );
    h.truncate(2).await.expect("shrink");
    h.write(5, b"z").await.expect("write past the end");
    assert_eq!(&h.read(0, 100).await.expect("read")[..], b"ab\0\0\0z");
    assert_eq!(h.size().await.expect("size"), 6);
    drop(h);
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1024).await.expect("read"),
        data(4, 1000)
    );
    assert!(cache.read(1, 1, 0, 1024).await.expect("read").is_empty());
    assert_eq!(
        cache
            .block_for_read(1, 1)
            .await
            .expect("handle")
            .size()
            .await
            .expect("size"),
        0
    );
    assert_eq!(
        &cache.read(1, 3, 0, 1024).await.expect("read")[..],
        b"ab\0\0\0z"
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_leaves_dirty_blocks_under_their_dirty_names() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, b"clean soon").await.expect("write");
    cache.flush().await.expect("flush");
    cache.write(1, 1, 0, b"dirty").await.expect("write");
    cache
        .write(1, 0, 0, b"dirty again")
        .await
        .expect("rewrite of a clean block");
    cache.sync().await.expect("sync");
    assert_eq!(list_dir(&env.cache_dir()), vec!["1-0.dirty", "1-1.dirty"]);
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    assert_eq!(list_dir(&env.cache_dir()), vec!["1-0", "1-1"]);
}

/// `sync`, then the process dies: a child process writes 100 blocks (more than the number
/// above which `sync` is one `syncfs`), syncs, and is killed with SIGKILL. The next open
/// finds every block dirty and uploads it.
///
/// This catches a `sync` that returns before the blocks are in their cache files, dirty
/// state kept anywhere but there, and an open that does not find or upload them. It cannot
/// catch a missing fsync: SIGKILL leaves the kernel's page cache, so unsynced writes survive
/// it; `sync_then_power_loss_keeps_the_blocks` does that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_of_many_dirty_blocks_then_crash_keeps_them() {
    let env = Env::new();
    let holder = Holder::start(HOLD_CACHE, &env, &env.cache_dir(), 100).await;
    holder.kill().await;
    assert!(
        env.store_ids().await.is_empty(),
        "the child uploaded nothing"
    );
    let cache = env.open().await;
    assert_eq!(cache.recovery().dirty_files, 100);
    assert!(cache.recovery().lost_blocks.is_empty());
    for b in 0..100 {
        assert_eq!(cache.read(4, b, 0, 512).await.expect("read"), data(b, 512));
    }
    cache.flush().await.expect("flush");
    assert_eq!(env.faults.calls(Op::Put), 100);
    assert_eq!(env.store_ids().await.len(), 100);
    cache.shutdown().await.expect("shutdown");
}

/// `sync`, then a power loss. The cache directory is on an ext4 file system in an image
/// file, mounted through a loop device; a child process writes blocks, syncs and is killed,
/// and the image is copied as the device holds it then: without what the kernel still held
/// in its page cache, as after a power loss. Opening over the copy must find every synced
/// block. With 100 blocks (one `syncfs`) and with 5 (an fsync of each file and of the
/// directory).
///
/// It needs root and loop devices. Where they are missing it says so and passes, unless
/// `BLOCKCACHE_TEST_POWER_LOSS=1` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_then_power_loss_keeps_the_blocks() {
    for blocks in [100, 5] {
        let env = Env::new();
        let image = env.dir.path().join("cache.img");
        let fs = match LoopFs::create(&image, &env.dir.path().join("cache-fs")) {
            Ok(fs) => fs,
            Err(why) if std::env::var_os("BLOCKCACHE_TEST_POWER_LOSS").is_none() => {
                eprintln!("skipped: no file system to cut the power of: {why}");
                return;
            }
            Err(why) => panic!("BLOCKCACHE_TEST_POWER_LOSS is set, but: {why}"),
        };
        let holder = Holder::start(HOLD_CACHE, &env, &fs.path().join("cache"), blocks).await;
        holder.kill().await;
        let copy = env.dir.path().join("after-power-loss.img");
        fs.power_loss_copy(&copy);
        drop(fs);
        let fs =
            LoopFs::mount(&copy, &env.dir.path().join("after-power-loss")).expect("mount the copy");
        let mut config = env.config();
        config.cache_dir = fs.path().join("cache");
        let cache = env.open_with(config).await;
        let recovery = cache.recovery().clone();
        assert_eq!(
            (recovery.dirty_files, recovery.lost_blocks.len()),
            (blocks, 0),
            "{blocks} blocks: {recovery:?}"
        );
        for b in 0..blocks {
            assert_eq!(
                cache.read(4, b, 0, 512).await.expect("read"),
                data(b, 512),
                "block {b} of {blocks}"
            );
        }
        cache.flush().await.expect("flush");
        assert_eq!(env.store_ids().await.len(), blocks as usize);
        cache.shutdown().await.expect("shutdown");
    }
}

/// A `file://` store: large objects are synced one by one by their upload tasks (then their
/// directories), small ones together by one `syncfs`; both reach the store where a fresh
/// cache finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_makes_large_and_small_objects_durable() {
    let env = Env::new();
    let open = |cache_dir: std::path::PathBuf| {
        let env = &env;
        async move {
            let mut config = env.config();
            config.cache_dir = cache_dir;
            config.block_size = 512 << 10;
            config.max_bytes = 64 << 20;
            config.max_dirty_bytes = 64 << 20;
            let db = blockcache_db::Db::open(env.db_path().to_str().expect("utf-8"))
                .await
                .expect("db");
            let url = format!("file://{}", env.store_dir().display());
            let backend = blockcache_backend::Backend::from_url(&url).expect("file store");
            blockcache::BlockCache::open(config, db, backend)
                .await
                .expect("open")
        }
    };
    let cache = open(env.cache_dir()).await;
    let large: Vec<Vec<u8>> = (0..3).map(|i| data(100 + i, 512 << 10)).collect();
    let small: Vec<Vec<u8>> = (0..40).map(|i| data(200 + i, 1000)).collect();
    for (b, content) in large.iter().enumerate() {
        cache.write(1, b as u64, 0, content).await.expect("write");
    }
    cache.flush().await.expect("flush of large objects");
    for (b, content) in small.iter().enumerate() {
        cache.write(2, b as u64, 0, content).await.expect("write");
    }
    cache.flush().await.expect("flush of small objects");
    assert_eq!(env.store_ids().await.len(), 43);
    cache.shutdown().await.expect("shutdown");
    let cache = open(env.dir.path().join("fresh-cache")).await;
    for (b, content) in large.iter().enumerate() {
        assert_eq!(
            &cache.read(1, b as u64, 0, 512 << 10).await.expect("read"),
            content
        );
    }
    for (b, content) in small.iter().enumerate() {
        assert_eq!(
            &cache.read(2, b as u64, 0, 1000).await.expect("read"),
            content
        );
    }
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_computed_during_sync_never_outlive_a_change() {
    // `sync` hashes dirty blocks ahead of their commit; blocks changed afterwards must be
    // committed with the hash of their new content. Both with bytes uploaded and with
    // objects linked to cache files.
    for linked in [false, true] {
        let env = if linked { Env::linked() } else { Env::new() };
        let cache = env.open().await;
        let mut model = std::collections::HashMap::new();
        for b in 0..20u64 {
            let bytes = data(b + 1, 1024);
            cache.write(1, b, 0, &bytes).await.expect("write");
            model.insert(b, bytes);
        }
        cache.sync().await.expect("sync");
        // In place, truncated, rewritten whole, and rewritten to equal another block.
        cache
            .write(1, 0, 100, b"after the sync")
            .await
            .expect("write");
        model.get_mut(&0).expect("block 0")[100..114].copy_from_slice(b"after the sync");
        let mut h = cache.block(1, 1).await.expect("handle");
        h.truncate(10).await.expect("truncate");
        drop(h);
        model.get_mut(&1).expect("block 1").truncate(10);
        let other = data(99, 1024);
        cache.write(1, 2, 0, &other).await.expect("write");
        model.insert(2, other);
        let same = model[&5].clone();
        cache.write(1, 3, 0, &same).await.expect("write");
        model.insert(3, same);
        // A second sync hashes only what changed; then everything goes to the store.
        cache.sync().await.expect("sync");
        cache.write(1, 4, 0, b"x").await.expect("write");
        model.get_mut(&4).expect("block 4")[0] = b'x';
        cache.flush().await.expect("flush");
        cache.clear().await.expect("clear");
        for (b, want) in &model {
            let got = cache.read(1, *b, 0, 1024).await.expect("read back");
            assert_eq!(&got[..], &want[..], "block {b} (linked: {linked})");
        }
        assert!(cache.wait_for_removals(Duration::from_secs(30)).await);
        let usage = cache.usage().await.expect("usage");
        assert_eq!(
            usage.stored_bytes,
            (18 * 1024 + 10) as u64,
            "18 distinct full blocks and one of 10 bytes (linked: {linked})"
        );
        cache.check_invariants().await.expect("invariants");
        cache.shutdown().await.expect("shutdown");
    }
}
