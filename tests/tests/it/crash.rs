//! Crash safety: an engine abandoned mid-upload, a real process killed with SIGKILL
//! mid-write, lost unsynced data, unconfirmed objects and pending deletions across restarts.

use std::process::Stdio;
use std::time::Duration;

use blockcache::BlockKey;
use blockcache_backend::faulty::Op;
use blockcache_tests::crash::{Holder, Then};
use blockcache_tests::{Env, WAIT, data, list_dir, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_mid_upload_then_reopened_uploads_everything() {
    let env = Env::new();
    let cache = env.open().await;
    env.faults.hold(Op::Put);
    for b in 0..5 {
        cache.write(3, b, 0, &data(b, 900)).await.expect("write");
    }
    // Two uploads stuck at the store and two queued fill the bounded pipeline, so this commit
    // waits for room (backpressure): run it in the background.
    let cache = std::sync::Arc::new(cache);
    let c = cache.clone();
    let committing = tokio::spawn(async move { c.commit().await });
    env.wait_held(Op::Put, 2).await;
    // Crash: no shutdown, uploads stuck in the store.
    committing.abort();
    drop(cache);
    // What is left of the abandoned engine still holds the cache directory.
    let err = env
        .try_open(env.config())
        .await
        .expect_err("directory in use");
    assert!(blockcache_tests::is_in_use(&err), "{err}");
    // Its stuck uploads end; queued ones were dropped and recorded as failed.
    env.faults.release(Op::Put);
    let cache = env.open().await;
    assert_eq!(
        cache.recovery().dirty_files + cache.recovery().clean_files,
        5
    );
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    for b in 0..5 {
        assert_eq!(cache.read(3, b, 0, 900).await.expect("read"), data(b, 900));
    }
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    assert_eq!(env.store_ids().await.len(), 5);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_and_uploads_loses_nothing_synced() {
    let env = Env::new();
    let mut synced_last = None;
    for round in 0..3u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .arg(env.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start crash-writer");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut last = None;
        let target = 40 + round * 25;
        while let Some(line) = within("a line from crash-writer", WAIT, lines.next_line())
            .await
            .expect("read child output")
        {
            let i: u64 = line
                .strip_prefix("synced ")
                .and_then(|n| n.parse().ok())
                .expect("synced line");
            last = Some(i);
            if i >= target {
                break;
            }
        }
        // SIGKILL: no destructor, no shutdown, uploads in flight.
        child.kill().await.expect("kill");
        let last = last.expect("the child synced something");
        synced_last = Some(last);
        let cache = env
            .open_with({
                let mut c = env.config();
                c.max_bytes = 1 << 20;
                c
            })
            .await;
        for i in 0..=last {
            assert_eq!(
                cache.read(1, i, 0, 1024).await.expect("read"),
                data(i, 1024),
                "round {round}, block {i}"
            );
        }
        for j in 0..7 {
            // The last synced version, or the unsynced write that followed it.
            let synced = (0..=last).rev().find(|i| i % 7 == j);
            let got = cache.read(2, j, 0, 1024).await.expect("read");
            if let Some(s) = synced {
                assert!(
                    got == data(s, 1024) || got == data(s + 7, 1024),
                    "round {round}, inode 2 block {j}"
                );
            }
        }
        cache.flush().await.expect("flush");
        cache.check_invariants().await.expect("invariants");
        cache.shutdown().await.expect("shutdown");
    }
    // Everything is in the store: a fresh cache directory reads it all back, every read a
    // verified download. (The child's objects were hard links to its cache files, which it
    // kept overwriting: none of those changes reached an object.)
    std::fs::remove_dir_all(env.cache_dir()).expect("drop cache dir");
    let mut config = env.config();
    config.max_bytes = 1 << 20;
    let cache = env.open_with(config).await;
    let synced = synced_last.expect("three rounds ran");
    for i in 0..=synced {
        assert_eq!(
            cache.read(1, i, 0, 1024).await.expect("read"),
            data(i, 1024),
            "block {i} from the store"
        );
    }
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_data_of_an_unconfirmed_object_becomes_a_hole() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 500)).await.expect("write");
    cache.flush().await.expect("flush");
    // The upload of block 1 fails; then the process dies and a power loss takes the
    // unsynced cache file with it.
    env.faults.permanent(Op::Put, true);
    env.faults.fail_first(Op::Put, u64::MAX);
    cache.write(1, 1, 0, &data(2, 500)).await.expect("write");
    cache.flush().await.expect_err("upload fails");
    drop(cache);
    env.faults.reset();
    std::fs::remove_file(env.cache_dir().join("1-1.dirty")).expect("lose the file");
    let cache = env.open().await;
    assert_eq!(cache.recovery().lost_blocks, vec![BlockKey::new(1, 1)]);
    assert!(cache.read(1, 1, 0, 500).await.expect("read").is_empty());
    assert_eq!(cache.read(1, 0, 0, 500).await.expect("read"), data(1, 500));
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

async fn set_all_uploading(env: &Env) {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db_path().display()))
        .await
        .expect("connect");
    sqlx::query("UPDATE objects SET state = 'uploading', stored_size = NULL")
        .execute(&pool)
        .await
        .expect("update");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_objects_are_checked_in_the_store() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 500)).await.expect("write");
    cache.write(1, 1, 0, &data(2, 500)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    cache.shutdown().await.expect("shutdown");
    // The confirmations were lost (a power loss before they reached the disk), and the
    // upload of object 2 never reached the store.
    set_all_uploading(&env).await;
    std::fs::remove_file(env.object_path(Env::nth_object(2))).expect("lose object 2");
    let cache = env.open().await;
    let r = cache.recovery().clone();
    assert_eq!((r.unconfirmed_objects, r.confirmed_in_store), (2, 1));
    assert_eq!(r.lost_blocks, vec![BlockKey::new(1, 1)]);
    assert_eq!(cache.read(1, 0, 0, 500).await.expect("read"), data(1, 500));
    assert!(cache.read(1, 1, 0, 500).await.expect("read").is_empty());
    assert_eq!(env.faults.calls(Op::Put), 2, "nothing uploaded again");
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deletions_survive_a_crash() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..3 {
        cache.write(1, b, 0, &data(b, 100)).await.expect("write");
    }
    cache.flush().await.expect("flush");
    // The store refuses deletions until the process dies.
    env.faults.fail_first(Op::Delete, u64::MAX);
    cache.remove(1, 0..3).await.expect("remove");
    assert_eq!(cache.usage().await.expect("usage").pending_removals, 3);
    drop(cache);
    env.faults.reset();
    let cache = env.open().await;
    assert_eq!(cache.recovery().pending_deletions, 3);
    assert!(cache.wait_for_removals(Duration::from_secs(10)).await);
    assert!(env.store_ids().await.is_empty());
    for b in 0..3 {
        assert!(cache.read(1, b, 0, 100).await.expect("read").is_empty());
    }
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_hole_creates_nothing_durable() {
    let env = Env::new();
    let cache = env.open().await;
    assert!(cache.read(9, 9, 0, 100).await.expect("read").is_empty());
    assert_eq!(
        cache
            .block_for_read(9, 9)
            .await
            .expect("handle")
            .size()
            .await
            .expect("size"),
        0
    );
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    assert!(list_dir(&env.cache_dir()).is_empty());
    drop(cache);
    let cache = env.open().await;
    assert_eq!(
        cache.recovery().dirty_files + cache.recovery().clean_files,
        0
    );
    cache.flush().await.expect("flush");
    assert_eq!(env.faults.calls(Op::Put), 0);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_shutdown_keeps_dirty_data_for_the_next_open() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(5, 0, 0, &data(5, 1000)).await.expect("write");
    cache.write(5, 1, 0, &data(6, 1000)).await.expect("write");
    cache.sync().await.expect("sync");
    drop(cache);
    assert_eq!(env.faults.calls(Op::Put), 0);
    let cache = env.open().await;
    assert_eq!(cache.recovery().dirty_files, 2);
    cache.flush().await.expect("flush");
    assert_eq!(env.store_ids().await.len(), 2);
    cache.shutdown().await.expect("shutdown");
    std::fs::remove_dir_all(env.cache_dir()).expect("drop cache dir");
    let cache = env.open().await;
    assert_eq!(
        cache.read(5, 1, 0, 1000).await.expect("read"),
        data(6, 1000)
    );
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_blocks_are_kept_across_restarts_and_marked_dirty_ones_rehashed() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..4 {
        cache.write(1, b, 0, &data(b, 300)).await.expect("write");
    }
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    assert_eq!(list_dir(&env.cache_dir()), vec!["1-0", "1-1", "1-2", "1-3"]);
    // A crash right after an upload, before the dirty marker was dropped.
    std::fs::rename(
        env.cache_dir().join("1-2"),
        env.cache_dir().join("1-2.dirty"),
    )
    .expect("mark");
    let cache = env.open().await;
    assert_eq!(
        (cache.recovery().clean_files, cache.recovery().dirty_files),
        (3, 1)
    );
    cache.flush().await.expect("flush");
    for b in 0..4 {
        assert_eq!(cache.read(1, b, 0, 300).await.expect("read"), data(b, 300));
    }
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (usage.downloads, env.faults.calls(Op::Put)),
        (0, 4),
        "served from the kept cache, nothing re-uploaded"
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// The child process that holds a volume open until it is killed.
const HOLD_CACHE: &str = env!("CARGO_BIN_EXE_hold-cache");

/// `flush` returning `Ok` means the store and the database alone hold the data: a child
/// process flushes 40 blocks and is killed with SIGKILL at once; then the whole cache
/// directory is deleted, and a fresh one over the same database and store reads every byte
/// back, each read a verified download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_flush_the_store_alone_holds_the_data() {
    let env = Env::new();
    let holder = Holder::start_then(HOLD_CACHE, &env, &env.cache_dir(), 40, Then::Flush).await;
    holder.kill().await;
    std::fs::remove_dir_all(env.cache_dir()).expect("delete the cache directory");
    let cache = env.open().await;
    let recovery = cache.recovery().clone();
    assert_eq!(
        (
            recovery.dirty_files + recovery.clean_files,
            recovery.unconfirmed_objects,
            recovery.lost_blocks.len()
        ),
        (0, 0, 0),
        "every upload was recorded before the flush returned: {recovery:?}"
    );
    for b in 0..40 {
        assert_eq!(
            cache.read(4, b, 0, 512).await.expect("read"),
            data(b, 512),
            "block {b}"
        );
    }
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.downloads, usage.stored_bytes), (40, 40 * 512));
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// One engine per cache directory, across processes: while a child process has the cache
/// open, opening it here fails (the volume is in use); once the child is killed, it opens and finds
/// the child's synced blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_open_in_another_process_is_in_use() {
    let env = Env::new();
    let holder = Holder::start(HOLD_CACHE, &env, &env.cache_dir(), 3).await;
    let err = env
        .try_open(env.config())
        .await
        .expect_err("the child holds the cache directory");
    // The volume's lock (next to the database) refuses it first, naming the child.
    assert!(blockcache_tests::is_in_use(&err), "{err:?}");
    assert!(
        err.to_string().contains("meta.db.lock") && err.to_string().contains(" pid "),
        "{err}"
    );
    holder.kill().await;
    let cache = env.open().await;
    assert_eq!(cache.recovery().dirty_files, 3);
    for b in 0..3 {
        assert_eq!(cache.read(4, b, 0, 512).await.expect("read"), data(b, 512));
    }
    cache.shutdown().await.expect("shutdown");
}
