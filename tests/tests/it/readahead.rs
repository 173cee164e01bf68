//! Readahead of the file namespace's readers: a sequential reader finds the blocks after the
//! one it reads loaded (or loading) in the background, each downloaded once; random reads
//! load nothing ahead.

use blockcache::{Durability, Namespace};
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, data};

const BLOCKS: usize = 40;

/// A namespace over `env` holding the file `f` of [`BLOCKS`] distinct blocks, stored and no
/// longer cached; and its content.
async fn stored_file(env: &Env) -> (Namespace, Vec<u8>) {
    let ns = Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("namespace");
    let content = data(5, BLOCKS * 1024);
    let mut w = ns.create("f").await.expect("create");
    w.write(&content).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    ns.flush().await.expect("flush");
    ns.cache().clear().await.expect("clear");
    (ns, content)
}

/// Blocks readahead has started loading so far.
async fn prefetches(ns: &Namespace) -> u64 {
    ns.cache().usage().await.expect("usage").prefetches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_finds_the_next_blocks_loaded_and_each_is_downloaded_once() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    let mut r = ns.open_read("f").await.expect("open");
    // A read from the file's start: its block, and the first window after it, loading
    // (asked for before the read itself).
    assert_eq!(r.read(0, 1024).await.expect("read")[..], content[..1024]);
    assert!(prefetches(&ns).await >= 4, "the first window is loading");
    // The rest through AsyncRead, from the second block on.
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    r.seek(std::io::SeekFrom::Start(1024)).await.expect("seek");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.expect("read the rest");
    assert!(rest == content[1024..], "the file reads back exact");
    // Readahead kept ahead: the reader loaded hardly any block itself.
    let usage = ns.cache().usage().await.expect("usage");
    assert!(usage.prefetches >= BLOCKS as u64 - 4, "{usage:?}");
    shutdown_downloading_each_once(ns, &env, BLOCKS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_load_nothing_ahead() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    let r = ns.open_read("f").await.expect("open");
    for b in [20usize, 3, 31, 9] {
        let got = r.read(b as u64 * 1024 + 5, 100).await.expect("read");
        assert_eq!(got[..], content[b * 1024 + 5..b * 1024 + 105]);
    }
    // A prefetch would have been started by the read that asked for it.
    assert_eq!(prefetches(&ns).await, 0);
    ns.shutdown().await.expect("shutdown");
    assert_eq!(env.faults.calls(Op::Get), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_prefetches_held_by_the_store() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    // A store that answers no download: the read's block and its first window wait for it.
    env.faults.hold(Op::Get);
    let r = ns.open_read("f").await.expect("open");
    let reading = tokio::spawn(async move { r.read(0, 1024).await.map(drop) });
    env.wait_held(Op::Get, 5).await;
    reading.abort();
    assert!(reading.await.is_err_and(|e| e.is_cancelled()));
    assert!(
        env.faults.held(Op::Get) >= 4,
        "the prefetches outlive their reader"
    );
    // The prefetches still wait at the store's gate: shutdown cancels them rather than
    // waiting for its grace and leaving them running.
    ns.shutdown().await.expect("shutdown");
    assert_eq!(
        env.faults.held(Op::Get),
        0,
        "a download still waits for the store after shutdown"
    );
    env.faults.release(Op::Get);
    // Nothing of the cancelled downloads stays behind: the file reads back exactly.
    let ns = Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("reopen");
    let mut r = ns.open_read("f").await.expect("open");
    use tokio::io::AsyncReadExt;
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read back");
    assert!(back == content, "the file reads back exact");
    ns.shutdown().await.expect("shutdown");
}

/// A namespace over `env` holding files by the given names of the given numbers of blocks,
/// all distinct, stored and no longer cached.
async fn stored_files(env: &Env, files: &[(&str, usize)]) -> Namespace {
    let ns = Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("namespace");
    for (i, &(name, blocks)) in files.iter().enumerate() {
        let mut w = ns.create(name).await.expect("create");
        w.write(&data(10 + i as u64, blocks * 1024))
            .await
            .expect("write");
        w.finish(Durability::Local).await.expect("finish");
    }
    ns.flush().await.expect("flush");
    ns.cache().clear().await.expect("clear");
    ns
}

/// Reads `name` to its end through `AsyncRead`, then waits for the lookup of the file after
/// it that the read may have started; the prefetches counted by then.
async fn read_whole(ns: &Namespace, name: &str) -> u64 {
    use tokio::io::AsyncReadExt;
    let mut r = ns.open_read(name).await.expect("open");
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read");
    assert_eq!(back.len() as u64, r.meta().size, "{name} reads back whole");
    ns.wait_for_cleanups().await;
    prefetches(ns).await
}

/// Reads `name` whole (see [`read_whole`]) after `before` prefetches, and checks that the
/// file after it, `next`, started loading meanwhile: the reader of `name` prefetches at most
/// `BLOCKS - 1` of its own, so at least `BLOCKS` prefetches mean `next` was loaded ahead.
async fn read_whole_loading_next(ns: &Namespace, name: &str, next: &str, before: u64) -> u64 {
    let after = read_whole(ns, name).await;
    assert!(
        after - before >= BLOCKS as u64,
        "nothing of {next} was loaded ahead ({} prefetches while reading {name})",
        after - before
    );
    after
}

/// Shuts `ns` down and checks that the store served `blocks` downloads: each block once.
async fn shutdown_downloading_each_once(ns: Namespace, env: &Env, blocks: usize) {
    ns.shutdown().await.expect("shutdown");
    assert_eq!(
        env.faults.calls(Op::Get),
        blocks as u64,
        "every block downloaded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_going_through_a_directory_in_name_order_finds_the_next_file_loading() {
    let env = Env::new();
    let ns = stored_files(&env, &[("d/a", BLOCKS), ("d/b", BLOCKS), ("d/c", BLOCKS)]).await;
    // One file read alone loads nothing of the next: each of its blocks but the first, at
    // most, was loaded ahead of the reader.
    let after_a = read_whole(&ns, "d/a").await;
    assert!(after_a < BLOCKS as u64, "{after_a} prefetches");
    // The file after it, read whole: files are being read in name order, and the next one's
    // first window starts loading.
    read_whole_loading_next(&ns, "d/b", "d/c", after_a).await;
    // Its reader uses what was loaded ahead: no block is downloaded twice.
    read_whole(&ns, "d/c").await;
    shutdown_downloading_each_once(ns, &env, 3 * BLOCKS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_between_files_read_in_name_order_keeps_the_next_loading() {
    let env = Env::new();
    let ns = stored_files(
        &env,
        &[
            ("d/a", BLOCKS),
            ("d/b", 0),
            ("d/c", BLOCKS),
            ("d/d", BLOCKS),
        ],
    )
    .await;
    let after_a = read_whole(&ns, "d/a").await;
    // The empty file has nothing to read: the file expected after d/a is d/c, so reading
    // it starts loading d/d.
    let after_b = read_whole(&ns, "d/b").await;
    assert_eq!(after_b, after_a, "an empty file loads nothing");
    read_whole_loading_next(&ns, "d/c", "d/d", after_b).await;
    read_whole(&ns, "d/d").await;
    shutdown_downloading_each_once(ns, &env, 3 * BLOCKS).await;
}

/// Loads `name` into the cache with reads from its last block back to its first: random
/// access, which loads nothing ahead.
async fn cache_backwards(ns: &Namespace, name: &str) {
    let r = ns.open_read(name).await.expect("open");
    for b in (0..r.meta().size.div_ceil(1024)).rev() {
        r.read(b * 1024, 1024).await.expect("read");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_read_out_of_order_or_in_part_or_past_their_directory_load_nothing_of_another() {
    let env = Env::new();
    let ns = stored_files(
        &env,
        &[
            ("d/a", BLOCKS),
            ("d/b", BLOCKS),
            ("d/c", BLOCKS),
            ("d/d", BLOCKS),
            ("e", BLOCKS),
        ],
    )
    .await;
    // Each file is cached before it is read whole, so that any prefetch counted is one of
    // the file after it, which is not.
    cache_backwards(&ns, "d/a").await;
    cache_backwards(&ns, "d/b").await;
    assert_eq!(prefetches(&ns).await, 0, "random reads load nothing ahead");
    // d/a read whole: d/b is expected next.
    assert_eq!(read_whole(&ns, "d/a").await, 0);
    // d/b read from its middle to its end: one stream, but not the whole file.
    {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut r = ns.open_read("d/b").await.expect("open");
        r.seek(std::io::SeekFrom::Start(BLOCKS as u64 / 2 * 1024))
            .await
            .expect("seek");
        r.read_to_end(&mut Vec::new()).await.expect("read");
    }
    ns.wait_for_cleanups().await;
    assert_eq!(
        prefetches(&ns).await,
        0,
        "d/c loaded after d/b read in part"
    );
    // d/c read whole, but d/b was the one expected: nothing of d/d.
    cache_backwards(&ns, "d/c").await;
    assert_eq!(read_whole(&ns, "d/c").await, 0, "d/d loaded out of order");
    // d/d, which d/c's reader expected next, read whole: in order now, but d/d is its
    // directory's last file, and e is not in the directory.
    cache_backwards(&ns, "d/d").await;
    assert_eq!(read_whole(&ns, "d/d").await, 0, "e loaded after d/d");
    ns.shutdown().await.expect("shutdown");
    assert_eq!(
        env.faults.calls(Op::Get),
        4 * BLOCKS as u64,
        "only what was read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_expected_next_starts_the_one_after_loading_at_its_first_read() {
    let env = Env::new();
    // d/b is ten times d/a: the window its reader starts with (half the widest d/a's reader
    // grew to, at most twice d/a) cannot reach its end.
    let ns = stored_files(
        &env,
        &[("d/a", BLOCKS), ("d/b", 10 * BLOCKS), ("d/c", BLOCKS)],
    )
    .await;
    read_whole(&ns, "d/a").await;
    // d/b loaded without readahead, so that what its first read prefetches is of d/c.
    cache_backwards(&ns, "d/b").await;
    let before = prefetches(&ns).await;
    let r = ns.open_read("d/b").await.expect("open");
    r.read(0, 1024).await.expect("read");
    ns.wait_for_cleanups().await;
    assert!(
        prefetches(&ns).await > before,
        "the first read of the file expected next loads nothing of the one after"
    );
    drop(r);
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ahead_of_files_read_in_order_spans_the_small_files_after() {
    let env = Env::new();
    let ns = stored_files(
        &env,
        &[("d/a", BLOCKS), ("d/b", BLOCKS), ("d/c", 2), ("d/d", 2)],
    )
    .await;
    read_whole(&ns, "d/a").await;
    cache_backwards(&ns, "d/b").await;
    let before = prefetches(&ns).await;
    // The window (at least 4 blocks) covers both files of 2 blocks after d/b.
    assert_eq!(read_whole(&ns, "d/b").await - before, 4);
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_asked_for_while_its_prefetch_runs_is_not_prefetched_again() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    env.faults.hold(Op::Get);
    // A reader's first read: its block and the first window wait for the store.
    let r = ns.open_read("f").await.expect("open");
    let reading = tokio::spawn(async move { r.read(0, 1024).await });
    env.wait_held(Op::Get, 5).await;
    let before = prefetches(&ns).await;
    // A second reader asks for the same window: its first poll runs its readahead, then
    // waits for block 0 like the first.
    let r2 = ns.open_read("f").await.expect("open");
    assert!(
        futures::FutureExt::now_or_never(r2.read(0, 1024)).is_none(),
        "block 0 is being downloaded"
    );
    assert_eq!(
        prefetches(&ns).await,
        before,
        "blocks being prefetched were prefetched again"
    );
    env.faults.release(Op::Get);
    let got = reading.await.expect("join").expect("read");
    assert_eq!(got[..], content[..1024]);
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_whose_first_bytes_are_read_in_name_order_load_nothing_of_another() {
    let env = Env::new();
    // Files of two blocks: the first window of a read from the start covers each whole.
    let ns = stored_files(&env, &[("d/a", 2), ("d/b", 2), ("d/c", 2), ("d/d", 2)]).await;
    // A client that looks at the first bytes of each file, in name order.
    for name in ["d/a", "d/b", "d/c"] {
        let r = ns.open_read(name).await.expect("open");
        r.read(0, 100).await.expect("read");
    }
    ns.wait_for_cleanups().await;
    // Each reader's own window: the second block of its file, and nothing of another.
    assert_eq!(prefetches(&ns).await, 3);
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_prefetched_once_is_prefetched_again_once_evicted() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    use tokio::io::AsyncReadExt;
    let mut r = ns.open_read("f").await.expect("open");
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read");
    drop(r);
    let first = prefetches(&ns).await;
    assert!(first >= BLOCKS as u64 - 4, "{first} prefetches");
    // The prefetches have loaded their blocks (the reader read each); a task may still be
    // ending, so a few blocks may be skipped below, not all.
    ns.cache().clear().await.expect("clear");
    let mut r = ns.open_read("f").await.expect("open");
    let mut again = Vec::new();
    r.read_to_end(&mut again).await.expect("read again");
    assert!(again == content, "the file reads back exact");
    let second = prefetches(&ns).await - first;
    assert!(
        second >= BLOCKS as u64 / 2,
        "{second} prefetches the second time"
    );
    drop(r);
    ns.shutdown().await.expect("shutdown");
}
