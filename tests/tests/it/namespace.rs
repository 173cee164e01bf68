//! The file namespace of the library: streaming writes, atomic replacement, patches with
//! gaps, truncation, deletion under readers, and cleanup after abandoned or crashed writes.

use blockcache::{Durability, Error, Namespace};
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, WAIT, data};

const MAX: u64 = 1 << 30;

async fn ns(env: &Env) -> Namespace {
    Namespace::open(env.open().await, MAX)
        .await
        .expect("namespace")
}

async fn put(ns: &Namespace, name: &str, content: &[u8], chunk: usize) {
    let mut w = ns.create(name).await.expect("create");
    for piece in content.chunks(chunk.max(1)) {
        w.write(piece).await.expect("write");
    }
    w.finish(Durability::Local).await.expect("finish");
}

async fn get(ns: &Namespace, name: &str) -> Vec<u8> {
    let r = ns.open_read(name).await.expect("open");
    r.read(0, r.meta().size as usize)
        .await
        .expect("read")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_of_odd_sizes_and_chunkings() {
    let env = Env::new();
    let ns = ns(&env).await;
    // Block size 1 KiB: empty, one byte, one block, block + 1, many blocks, odd chunks.
    for (i, (len, chunk)) in [
        (0, 7),
        (1, 1),
        (1024, 1024),
        (1025, 100),
        (10_000, 333),
        (4096, 5000),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("dir/file-{i}");
        let content = data(i as u64, len);
        put(&ns, &name, &content, chunk).await;
        assert_eq!(get(&ns, &name).await, content, "{name}");
        assert_eq!(ns.stat(&name).await.expect("stat").size, len as u64);
        // Reads across block edges.
        let r = ns.open_read(&name).await.expect("open");
        for (off, n) in [(1023u64, 2usize), (1000, 100), (0, 5000), (len as u64, 10)] {
            let got = r.read(off, n).await.expect("read");
            let lo = (off as usize).min(len);
            let hi = (off as usize + n).min(len);
            assert_eq!(&got[..], &content[lo..hi], "{name} at {off}+{n}");
        }
    }
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_is_atomic_for_a_reader_and_frees_the_old_blocks() {
    let env = Env::new();
    let ns = ns(&env).await;
    let old = data(1, 5000);
    put(&ns, "f", &old, 1000).await;
    ns.cache().flush().await.expect("flush");
    let reader = ns.open_read("f").await.expect("open");
    let new = data(2, 3000);
    put(&ns, "f", &new, 700).await;
    // The reader opened before the replacement still sees the old content, whole.
    assert_eq!(&reader.read(0, 5000).await.expect("read")[..], &old[..]);
    assert_eq!(get(&ns, "f").await, new);
    let v = ns.stat("f").await.expect("stat");
    assert_eq!((v.size, v.version), (3000, 2));
    drop(reader);
    ns.wait_for_cleanups().await;
    ns.cache().flush().await.expect("flush");
    // Once the reader is gone the old inode's objects are deleted: only the new ones remain.
    assert_eq!(ns.cache().usage().await.expect("usage").logical_bytes, 3000);
    assert!(
        ns.cache()
            .wait_for_removals(std::time::Duration::from_secs(10))
            .await
    );
    assert_eq!(env.store_ids().await.len(), 3);
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_replacement_keeps_the_old_version_and_leaves_nothing() {
    let env = Env::new();
    let ns = ns(&env).await;
    let old = data(1, 2000);
    put(&ns, "f", &old, 2000).await;
    let mut w = ns.create("f").await.expect("create");
    w.write(&data(9, 4000)).await.expect("write");
    drop(w);
    assert_eq!(get(&ns, "f").await, old);
    ns.wait_for_cleanups().await;
    ns.cache().flush().await.expect("flush");
    assert_eq!(ns.cache().usage().await.expect("usage").logical_bytes, 2000);
    // Given up explicitly: nothing is left once `abandon` returns, without waiting, so a
    // flush right after uploads nothing of it.
    let mut w = ns.create("f").await.expect("create");
    w.write(&data(10, 5000)).await.expect("write");
    w.abandon().await;
    let usage = ns.cache().usage().await.expect("usage");
    assert_eq!((usage.entries, usage.dirty_entries), (2, 0), "{usage:?}");
    ns.cache().flush().await.expect("flush");
    assert_eq!(ns.cache().usage().await.expect("usage").logical_bytes, 2000);
    assert_eq!(get(&ns, "f").await, old);
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_writes_store_the_same_bytes_and_a_dropped_writer_leaves_nothing() {
    let env = Env::new();
    let ns = ns(&env).await;
    // Odd chunks across 40 blocks and a part: batches of 1, 2, 4, 8 and 16 blocks written
    // by tasks of their own while the next ones fill, then 9 and a part by the finish.
    let content = data(21, 40 * 1024 + 300);
    let mut w = ns.create("f").await.expect("create");
    w.overlap_writes();
    w.write_behind();
    for piece in content.chunks(700) {
        w.write(piece).await.expect("write");
    }
    w.finish(Durability::Local).await.expect("finish");
    assert_eq!(get(&ns, "f").await, content);
    // A patch the same way.
    let mut w = ns.patch("f", 1500).await.expect("patch");
    w.overlap_writes();
    w.write(&data(22, 3000)).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    let mut want = content.clone();
    want[1500..4500].copy_from_slice(&data(22, 3000));
    assert_eq!(get(&ns, "f").await, want);
    ns.cache().flush().await.expect("flush");
    // The hashes that the batches' tasks computed are those of the bytes: read back from
    // the store, every block checks out.
    ns.cache().clear().await.expect("clear");
    assert_eq!(get(&ns, "f").await, want);
    let logical = ns.cache().usage().await.expect("usage").logical_bytes;
    // Dropped while its last batch of completed blocks is still being written: here it
    // waits for the dirty budget, full of blocks whose uploads are slow. The blocks land
    // before the staging inode is cleaned, never after (they would be left behind,
    // uploaded and counted).
    small_budget_slow_uploads(&env, &ns).await;
    let mut w = ns.create("f").await.expect("create");
    w.overlap_writes();
    w.write(&data(23, 5 * 1024)).await.expect("write");
    drop(w);
    ns.wait_for_cleanups().await;
    env.faults.latency(Op::Put, std::time::Duration::ZERO);
    ns.cache().flush().await.expect("flush");
    let usage = ns.cache().usage().await.expect("usage");
    assert_eq!(usage.logical_bytes, logical, "{usage:?}");
    assert_eq!(get(&ns, "f").await, want);
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

/// A dirty budget of 4 KiB, and uploads that take 300 ms each.
async fn small_budget_slow_uploads(env: &Env, ns: &Namespace) {
    let limits = ns.cache().usage().await.expect("usage").limits;
    ns.cache()
        .set_limits(blockcache::Limits {
            max_dirty_bytes: 4 * 1024,
            ..limits
        })
        .await
        .expect("limits");
    env.faults
        .latency(Op::Put, std::time::Duration::from_millis(300));
}

/// [`small_budget_slow_uploads`], the budget full of another file's blocks, so that the next
/// block written waits for it.
async fn budget_full_of_slow_uploads(env: &Env, ns: &Namespace) {
    small_budget_slow_uploads(env, ns).await;
    let mut g = ns.create("g").await.expect("create");
    g.write(&data(1, 4 * 1024)).await.expect("write");
    g.finish(Durability::None).await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_a_failed_overlapped_writer_waits_for_its_last_block() {
    let env = Env::new();
    let ns = Namespace::open(env.open().await, 5 * 1024 + 100)
        .await
        .expect("namespace");
    budget_full_of_slow_uploads(&env, &ns).await;
    let mut w = ns.create("f").await.expect("create");
    w.overlap_writes();
    // Block 0's write waits for the budget in a task of its own.
    w.write(&data(23, 1024)).await.expect("write");
    // Too large (a chunked PUT past --max-file-size): the writer fails; the daemon then
    // abandons it.
    let e = w.write(&[0u8; 5 * 1024]).await.expect_err("too large");
    assert!(matches!(e, Error::FileTooLarge { .. }), "{e:?}");
    w.abandon().await;
    // Without the wait, block 0's write is still waiting for the budget here, to land after
    // the cleaning in an inode nobody owns any more.
    ns.cache()
        .check_quiescent()
        .await
        .expect("nothing of the abandoned writer still running");
    env.faults.latency(Op::Put, std::time::Duration::ZERO);
    ns.cache().flush().await.expect("flush");
    let usage = ns.cache().usage().await.expect("usage");
    assert_eq!(usage.logical_bytes, 4 * 1024, "only g: {usage:?}");
    ns.wait_for_cleanups().await;
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_overlapped_writer_holds_its_guard_until_its_batch_is_written() {
    let env = Env::new();
    let ns = ns(&env).await;
    budget_full_of_slow_uploads(&env, &ns).await;
    // What the daemon gives the writer: the request buffers that its batches' bytes use.
    let held = std::sync::Arc::new(());
    let mut w = ns.create("f").await.expect("create");
    w.overlap_writes();
    w.hold_while_writing(held.clone());
    // Block 0's write waits for the budget in a task of its own, with its bytes.
    w.write(&data(23, 1024)).await.expect("write");
    drop(w);
    assert_eq!(
        std::sync::Arc::strong_count(&held),
        2,
        "the batch being written still holds its memory: so does the guard"
    );
    env.faults.latency(Op::Put, std::time::Duration::ZERO);
    ns.wait_for_cleanups().await;
    assert_eq!(
        std::sync::Arc::strong_count(&held),
        1,
        "let go once the batch is written and the inode cleaned"
    );
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_half_way_fails_the_writer() {
    let env = Env::new();
    let ns = ns(&env).await;
    budget_full_of_slow_uploads(&env, &ns).await;
    let mut w = ns.create("f").await.expect("create");
    // Overlapped, two batches are written at once: the write that completes the third
    // batch (blocks 3 to 6) waits for the first one's write (block 0), which waits for the
    // budget, as does the second's (blocks 1 and 2). (The same holds without overlap, where
    // such a wait is harder to arrange: block 0 is written before `write` returns.)
    w.overlap_writes();
    w.write(&data(2, 1024)).await.expect("write"); // block 0 waits for the budget
    w.write(&data(3, 500)).await.expect("write"); // buffered and acknowledged
    assert_eq!(w.written(), 1524);
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        w.write(&data(4, 524 + 5 * 1024)),
    )
    .await;
    assert!(cancelled.is_err(), "the write should still wait");
    env.faults.latency(Op::Put, std::time::Duration::ZERO);
    // The cancelled write may have dropped acknowledged bytes: no file may be named.
    let finished = w.finish(Durability::Local).await;
    assert!(
        matches!(finished, Err(Error::WriterFailed { .. })),
        "{finished:?}"
    );
    assert_eq!(get(&ns, "g").await, data(1, 4 * 1024));
    assert!(ns.stat("f").await.is_err(), "no file f");
    ns.wait_for_cleanups().await;
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_with_gaps_read_zeros_and_truncation_cuts() {
    let env = Env::new();
    let ns = ns(&env).await;
    put(&ns, "p", &data(1, 1500), 1500).await;
    // Shrink, then grow by a patch past the end: the cut bytes must not come back.
    ns.truncate("p", 1100, Durability::Local)
        .await
        .expect("truncate");
    let mut w = ns.patch("p", 3000).await.expect("patch");
    w.write(b"tail").await.expect("write");
    let meta = w.finish(Durability::Local).await.expect("finish");
    assert_eq!(meta.size, 3004);
    let got = get(&ns, "p").await;
    let mut want = data(1, 1100);
    want.resize(3000, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(got, want);
    // Overwrite inside, grow by truncate: zeros.
    let mut w = ns.patch("p", 10).await.expect("patch");
    w.write(b"XY").await.expect("write");
    w.finish(Durability::None).await.expect("finish");
    want[10..12].copy_from_slice(b"XY");
    ns.truncate("p", 5000, Durability::Local)
        .await
        .expect("grow");
    want.resize(5000, 0);
    assert_eq!(get(&ns, "p").await, want);
    // An abandoned patch past the end leaves the size, and its bytes never show.
    let mut w = ns.patch("p", 5000).await.expect("patch");
    w.write(&data(3, 2000)).await.expect("write");
    drop(w);
    let mut w = ns
        .patch("p", 8000)
        .await
        .expect("patch after abandoned one");
    w.write(b"!").await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    want.resize(8000, 0);
    want.push(b'!');
    assert_eq!(get(&ns, "p").await, want);
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_missing_files_and_size_limits_are_errors() {
    let env = Env::new();
    let ns = Namespace::open(env.open().await, 4096)
        .await
        .expect("namespace");
    put(&ns, "ok", b"kept", 4).await;
    let long = "a".repeat(1025);
    for name in [
        "",
        "/a",
        "a/",
        "a//b",
        "./a",
        "a/..",
        "a\0b",
        "a\nb",
        long.as_str(),
    ] {
        assert!(
            matches!(ns.create(name).await, Err(Error::InvalidName { .. })),
            "{name:?}"
        );
        assert!(matches!(
            ns.stat(name).await,
            Err(Error::InvalidName { .. })
        ));
    }
    assert!(matches!(ns.stat("nope").await, Err(Error::NotFound { .. })));
    assert!(matches!(
        ns.delete("nope").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        ns.patch("nope", 0).await,
        Err(Error::NotFound { .. })
    ));
    let mut w = ns.create("big").await.expect("create");
    w.write(&data(1, 4096)).await.expect("up to the limit");
    assert!(matches!(
        w.write(b"x").await,
        Err(Error::FileTooLarge { size: 4097, .. })
    ));
    drop(w);
    assert!(matches!(
        ns.truncate("ok", 4097, Durability::Local).await,
        Err(Error::FileTooLarge { .. })
    ));
    assert!(matches!(ns.stat("big").await, Err(Error::NotFound { .. })));
    assert_eq!(get(&ns, "ok").await, b"kept");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_under_a_reader_and_listing_pages() {
    let env = Env::new();
    let ns = ns(&env).await;
    for i in 0..25 {
        put(&ns, &format!("a/{i:02}"), &data(i, 100), 100).await;
    }
    put(&ns, "b", b"b", 1).await;
    let r = ns.open_read("a/03").await.expect("open");
    ns.delete("a/03").await.expect("delete");
    assert_eq!(&r.read(0, 100).await.expect("read")[..], &data(3, 100)[..]);
    drop(r);
    assert!(matches!(ns.stat("a/03").await, Err(Error::NotFound { .. })));
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = ns.list("a/", after.as_deref(), 10).await.expect("list");
        names.extend(page.iter().map(|m| m.name.clone()));
        if page.len() < 10 {
            break;
        }
        after = page.last().map(|m| m.name.clone());
    }
    assert_eq!(names.len(), 24);
    assert!(names.iter().all(|n| n.starts_with("a/")));
    assert!(names.windows(2).all(|w| w[0] < w[1]));
    ns.shutdown().await.expect("shutdown");
}

/// Asserts that the volume's metadata lists no staging or retired inodes.
async fn assert_nothing_to_clean(env: &Env) {
    let db = blockcache_db::Db::open(env.db_path().to_str().expect("utf-8"))
        .await
        .expect("db");
    assert_eq!(db.inodes_to_clean().await.expect("list"), Vec::<u64>::new());
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inodes_allocated_ahead_leave_nothing_behind() {
    let env = Env::new();
    // A clean shutdown forgets the inodes allocated ahead and not used.
    let files = ns(&env).await;
    for i in 0..3 {
        put(&files, &format!("f{i}"), &data(i, 3000), 700).await;
    }
    files.shutdown().await.expect("shutdown");
    assert_nothing_to_clean(&env).await;
    // After a crash they are staging inodes like an abandoned replacement: the next open
    // removes them, and the files written stay whole.
    let files = ns(&env).await;
    put(&files, "f3", &data(3, 3000), 700).await;
    drop(files);
    let files = ns(&env).await;
    for i in 0..4 {
        assert_eq!(get(&files, &format!("f{i}")).await, data(i, 3000));
    }
    files.shutdown().await.expect("shutdown");
    assert_nothing_to_clean(&env).await;
}

/// Writers hash blocks as they gather them; the hash must only ever stand for the bytes the
/// block then holds: whole blocks, a short last block, but not a short piece written at the
/// start of a longer block, whose hash would wrongly match a file of just that piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_gathered_while_writing_name_exactly_the_stored_bytes() {
    let env = Env::new();
    let ns = ns(&env).await;
    let content = data(1, 3000);
    // Gathered in small pieces, and passed in whole blocks: the same three objects.
    put(&ns, "a", &content, 333).await;
    put(&ns, "b", &content, 1024).await;
    ns.cache().flush().await.expect("flush");
    assert_eq!(
        ns.cache().usage().await.expect("usage").stored_bytes,
        3000,
        "both files share their objects"
    );
    // A short piece at the start of a longer block, and a file of just that piece.
    let piece = data(2, 100);
    let mut w = ns.patch("a", 0).await.expect("patch");
    w.write(&piece).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    put(&ns, "c", &piece, 7).await;
    // A whole block over one that is only in the store, and a piece within a block.
    ns.cache().flush().await.expect("flush");
    ns.cache().clear().await.expect("clear");
    let whole = data(3, 1024);
    let mut w = ns.patch("b", 1024).await.expect("patch");
    w.write(&whole).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    let mut w = ns.patch("b", 2500).await.expect("patch");
    w.write(b"mid").await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    ns.cache().flush().await.expect("flush");
    ns.cache().clear().await.expect("clear");

    let mut want_a = content.clone();
    want_a[..100].copy_from_slice(&piece);
    let mut want_b = content.clone();
    want_b[1024..2048].copy_from_slice(&whole);
    want_b[2500..2503].copy_from_slice(b"mid");
    assert_eq!(get(&ns, "a").await, want_a);
    assert_eq!(get(&ns, "b").await, want_b);
    assert_eq!(get(&ns, "c").await, piece);
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

/// Writers that send completed blocks to the disk as they go (as the daemon's PUT and PATCH
/// do for `local` and `store` durability) write exactly what plain writers write.
/// Writers that sync each completed block behind them store the bytes given. With
/// `Durability::Store`, `finish` returns once the store holds them: nothing is dirty right
/// after it, a shutdown with every upload refused has nothing to upload, and a fresh cache
/// directory over the same database and store reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_that_write_behind_store_the_same_bytes() {
    let env = Env::new();
    let ns = ns(&env).await;
    let content = data(30, 10_000);
    let mut w = ns.create("wb").await.expect("create");
    w.write_behind();
    for piece in content.chunks(700) {
        w.write(piece).await.expect("write");
    }
    w.finish(Durability::Local).await.expect("finish");
    assert_eq!(get(&ns, "wb").await, content);
    assert!(ns.cache().usage().await.expect("usage").dirty_entries > 0);
    let mut w = ns.patch("wb", 5000).await.expect("patch");
    w.write_behind();
    let patch = data(31, 3000);
    w.write(&patch).await.expect("write");
    w.finish(Durability::Store).await.expect("finish");
    let mut want = content.clone();
    want[5000..8000].copy_from_slice(&patch);
    assert_eq!(ns.cache().usage().await.expect("usage").dirty_entries, 0);
    let other = data(32, 4500);
    let mut w = ns.create("wb2").await.expect("create");
    w.write_behind();
    for piece in other.chunks(1000) {
        w.write(piece).await.expect("write");
    }
    w.finish(Durability::Store).await.expect("finish");
    let usage = ns.cache().usage().await.expect("usage");
    assert_eq!((usage.dirty_entries, usage.uploads_in_flight), (0, 0));
    assert_eq!(usage.stored_bytes, usage.unique_bytes, "{usage:?}");
    // 10 blocks of the first file and 5 of the second, all distinct: the objects the patch
    // replaced go once a round of shipping has read the store's metadata (the removal task
    // asks for one).
    assert!(
        ns.cache().wait_for_removals(WAIT).await,
        "the patch's replaced objects left the store"
    );
    assert_eq!(env.store_ids().await.len(), 15);
    ns.cache().check_invariants().await.expect("invariants");
    env.faults.permanent(Op::Put, true);
    env.faults.fail_first(Op::Put, u64::MAX);
    let puts = env.faults.calls(Op::Put);
    ns.shutdown()
        .await
        .expect("shutdown with nothing to upload");
    assert_eq!(
        env.faults.calls(Op::Put),
        puts,
        "nothing was left to upload"
    );
    env.faults.reset();
    let mut config = env.config();
    config.cache_dir = env.dir.path().join("fresh-cache");
    let ns = Namespace::open(env.open_with(config).await, MAX)
        .await
        .expect("namespace");
    assert_eq!(get(&ns, "wb").await, want);
    assert_eq!(get(&ns, "wb2").await, other);
    assert_eq!(ns.cache().usage().await.expect("usage").downloads, 15);
    ns.shutdown().await.expect("shutdown");
}

/// Waiting for background removals waits for those started before the call, from any
/// number of callers at once, and a flush includes that wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_removals_see_those_started_before_them() {
    let env = Env::new();
    let ns = std::sync::Arc::new(ns(&env).await);
    put(&ns, "r", &data(40, 3000), 3000).await;
    // A reader keeps the first version while a replacement retires it.
    let reader = ns.open_read("r").await.expect("open");
    put(&ns, "r", &data(41, 1000), 1000).await;
    drop(reader);
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let ns = ns.clone();
            tokio::spawn(async move { ns.wait_for_cleanups().await })
        })
        .collect();
    for w in waiters {
        tokio::time::timeout(std::time::Duration::from_secs(20), w)
            .await
            .expect("a waiter finishes")
            .expect("join");
    }
    // Only the new version's block is left in the cache.
    assert_eq!(ns.cache().usage().await.expect("usage").entries, 1);
    // Retired again under a reader, then a flush right after the reader is done.
    let reader = ns.open_read("r").await.expect("open");
    put(&ns, "r", &data(42, 2000), 2000).await;
    drop(reader);
    ns.flush().await.expect("flush");
    let usage = ns.cache().usage().await.expect("usage");
    assert_eq!((usage.logical_bytes, usage.stored_bytes), (2000, 2000));
    ns.cache().check_invariants().await.expect("invariants");
    std::sync::Arc::into_inner(ns)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writers_racing_to_create_a_free_name_only_one_wins() {
    let env = Env::new();
    let ns = ns(&env).await;
    // Both write their bytes, then both finish: the name is checked when it is taken.
    let mut a = ns.create("new").await.expect("create");
    let mut b = ns.create("new").await.expect("create");
    a.create_only().expect("create only");
    b.create_only().expect("create only");
    a.write(&data(1, 3000)).await.expect("write");
    b.write(&data(2, 3000)).await.expect("write");
    a.finish(Durability::Local).await.expect("the first wins");
    let lost = b.finish(Durability::Local).await;
    assert!(matches!(lost, Err(Error::Exists { .. })), "{lost:?}");
    assert_eq!(get(&ns, "new").await, data(1, 3000));
    // A name already taken is refused the same way, and the old file stays.
    let mut c = ns.create("new").await.expect("create");
    c.create_only().expect("create only");
    c.write(&data(3, 100)).await.expect("write");
    assert!(matches!(
        c.finish(Durability::Local).await,
        Err(Error::Exists { .. })
    ));
    assert_eq!(get(&ns, "new").await, data(1, 3000));
    // A patch cannot be made create-only.
    let mut p = ns.patch("new", 0).await.expect("patch");
    assert!(p.create_only().is_err());
    p.abandon().await;
    // Nothing of the losers is left.
    ns.wait_for_cleanups().await;
    ns.cache().flush().await.expect("flush");
    assert_eq!(ns.cache().usage().await.expect("usage").logical_bytes, 3000);
    ns.shutdown().await.expect("shutdown");
    assert_nothing_to_clean(&env).await;
}

/// `FileWriter` is an `AsyncWrite` and `FileReader` an `AsyncRead` + `AsyncSeek`:
/// `tokio::io::copy` fills a file (odd chunks, write-behind on, then `write` mixed in), and
/// reads, seeks and `read_to_end` give its bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_and_readers_work_with_tokio_io() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let env = Env::new();
    let ns = ns(&env).await;
    // Block size 1 KiB: a bit over ten blocks, sent in chunks that straddle blocks.
    let content = data(77, 10_500);
    let mut w = ns.create("io/copied").await.expect("create");
    w.write_behind();
    let (first, last) = content.split_at(10_000);
    for piece in first.chunks(333) {
        let mut piece = piece;
        tokio::io::copy(&mut piece, &mut w).await.expect("copy");
    }
    w.flush().await.expect("flush");
    w.write(last).await.expect("write after the AsyncWrite");
    w.shutdown().await.expect("shutdown");
    let meta = w.finish(Durability::Local).await.expect("finish");
    assert_eq!(meta.size, content.len() as u64);
    assert_eq!(get(&ns, "io/copied").await, content);

    let mut r = ns.open_read("io/copied").await.expect("open");
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.expect("read to end");
    assert_eq!(all, content);
    assert_eq!(
        r.seek(std::io::SeekFrom::Start(1000)).await.expect("seek"),
        1000
    );
    let mut some = vec![0u8; 100];
    r.read_exact(&mut some).await.expect("read");
    assert_eq!(some, content[1000..1100]);
    assert_eq!(
        r.seek(std::io::SeekFrom::Current(-50)).await.expect("seek"),
        1050
    );
    r.read_exact(&mut some).await.expect("read");
    assert_eq!(some, content[1050..1150]);
    assert_eq!(
        r.seek(std::io::SeekFrom::End(-10)).await.expect("seek"),
        10_490
    );
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).await.expect("read");
    assert_eq!(tail, content[10_490..]);
    assert!(r.seek(std::io::SeekFrom::Current(-20_000)).await.is_err());

    // From one file into another, all through tokio::io.
    let mut r = ns.open_read("io/copied").await.expect("open");
    let mut w = ns.create("io/again").await.expect("create");
    let copied = tokio::io::copy(&mut r, &mut w).await.expect("copy");
    assert_eq!(copied, content.len() as u64);
    w.finish(Durability::None).await.expect("finish");
    assert_eq!(get(&ns, "io/again").await, content);
    ns.shutdown().await.expect("shutdown");
}

/// A writer whose write failed refuses to finish (`WriterFailed`), through `write` and
/// through `AsyncWrite`, and the file keeps its old content: before, a caller that went on
/// after the error named a file missing what failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_write_failed_cannot_finish() {
    use tokio::io::AsyncWriteExt;
    let env = Env::new();
    let ns = Namespace::open(env.open().await, 5000)
        .await
        .expect("namespace");
    let old = data(5, 3000);
    put(&ns, "f", &old, 1000).await;
    let mut w = ns.create("f").await.expect("create");
    w.write(&data(6, 4000)).await.expect("within the limit");
    let err = w.write(&data(7, 2000)).await.expect_err("over the limit");
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
    let err = w.write(b"more").await.expect_err("after a failure");
    assert!(matches!(err, Error::WriterFailed { .. }), "{err}");
    let err = w
        .finish(Durability::Local)
        .await
        .expect_err("finish after a failure");
    assert!(matches!(err, Error::WriterFailed { .. }), "{err}");
    assert_eq!(get(&ns, "f").await, old);

    let mut w = ns.create("f").await.expect("create");
    let mut source: &[u8] = &data(8, 6000);
    assert!(tokio::io::copy(&mut source, &mut w).await.is_err());
    assert!(w.write_all(b"x").await.is_err());
    let err = w
        .finish(Durability::Local)
        .await
        .expect_err("finish after a failure");
    assert!(matches!(err, Error::WriterFailed { .. }), "{err}");
    assert_eq!(get(&ns, "f").await, old);
    ns.shutdown().await.expect("shutdown");
}

/// Overlapped writers, through `write` and through `AsyncWrite`, hand each batch's blocks
/// their own hashes: the file's blocks are also another file's blocks one place further
/// on, so a hash attached to a neighbour would share that neighbour's object, and the bytes
/// read back after a clear would be wrong. Patches starting and ending at odd offsets,
/// over old content and past it, store the bytes given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_batches_give_each_block_its_own_hash_and_offsets() {
    use tokio::io::AsyncWriteExt;
    let env = Env::new();
    let ns = ns(&env).await;
    let base = data(40, 20 * 1024 - 480);
    put(&ns, "ref", &base, 1024).await;
    // Whole blocks of it are blocks of `ref` (3 places further on).
    let shifted = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| base[(i + 3 * 1024) % base.len()])
            .collect()
    };
    for via_io in [false, true] {
        for (len, chunk) in [(17 * 1024 + 3, 333), (40 * 1024, 4096), (5000, 1024)] {
            let content = shifted(len);
            let mut w = ns.create("r").await.expect("create");
            w.overlap_writes();
            w.write_behind();
            for piece in content.chunks(chunk) {
                if via_io {
                    w.write_all(piece).await.expect("write_all");
                    w.flush().await.expect("flush");
                } else {
                    w.write(piece).await.expect("write");
                }
            }
            w.finish(Durability::Local).await.expect("finish");
            ns.cache().flush().await.expect("flush");
            ns.cache().clear().await.expect("clear");
            assert_eq!(get(&ns, "r").await, content, "{via_io} {len} {chunk}");
        }
        for start in [1u64, 1024, 1500, 19_999, 20_100, 21_000] {
            for (len, chunk) in [(500, 1), (17 * 1024 + 3, 333), (5000, 4096)] {
                put(&ns, "f", &base, 4096).await;
                let patch = shifted(len);
                let mut w = ns.patch("f", start).await.expect("patch");
                w.overlap_writes();
                w.write_behind();
                let mut sent = 0;
                for piece in patch.chunks(chunk) {
                    if via_io {
                        w.write_all(piece).await.expect("write_all");
                    } else {
                        w.write(piece).await.expect("write");
                    }
                    sent += piece.len() as u64;
                    assert_eq!(w.written(), sent);
                }
                w.finish(Durability::Local).await.expect("finish");
                let mut want = base.clone();
                let end = start as usize + len;
                if want.len() < end {
                    want.resize(end, 0);
                }
                want[start as usize..end].copy_from_slice(&patch);
                assert_eq!(get(&ns, "f").await, want, "{via_io} {start} {len} {chunk}");
            }
        }
    }
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}
