//! The metadata in the store (library): what a flush ships restores every file; files still
//! being written ship as they were before; objects the store's metadata names are not
//! deleted; the interval ships without a flush; a bad generation falls back to the one
//! before; a restore refuses a used database and a held lease.

use std::path::Path;
use std::time::Duration;

use blockcache::restore::{RestoreOptions, RestoreReport, restore};
use blockcache::{BlockCache, Config, Durability, Error, Namespace};
use blockcache_db::Db;
use blockcache_tests::{Env, WAIT, data, files_under, within};

const MAX: u64 = 1 << 30;

async fn ns(cache: BlockCache) -> Namespace {
    Namespace::open(cache, MAX).await.expect("namespace")
}

async fn put(ns: &Namespace, name: &str, content: &[u8], durability: Durability) {
    let mut w = ns.create(name).await.expect("create");
    w.write(content).await.expect("write");
    w.finish(durability).await.expect("finish");
}

async fn get(ns: &Namespace, name: &str) -> Vec<u8> {
    let r = ns.open_read(name).await.expect("open");
    r.read(0, r.meta().size as usize)
        .await
        .expect("read")
        .to_vec()
}

async fn names(ns: &Namespace) -> Vec<String> {
    ns.list("", None, 10_000)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.name)
        .collect()
}

/// Restores `env`'s store into a new database in `dir`.
async fn restore_into(env: &Env, dir: &Path, force: bool) -> blockcache::Result<RestoreReport> {
    std::fs::create_dir_all(dir).expect("restore dir");
    let db = Db::open(dir.join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("new db");
    let options = RestoreOptions {
        force_takeover: force,
        ..RestoreOptions::default()
    };
    let report = restore(&db, env.backend(), &options, &|_| {}).await;
    db.close().await;
    report
}

/// Opens the volume restored in `dir` (over `env`'s store) with `env`'s settings.
async fn open_restored(env: &Env, dir: &Path, config: Config) -> Namespace {
    let db = Db::open(dir.join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("restored db");
    let config = Config {
        cache_dir: dir.join("cache"),
        ..config
    };
    ns(BlockCache::open(config, db, env.backend())
        .await
        .expect("open restored"))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_volume_restores_from_the_store_alone() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    let mut expected = std::collections::BTreeMap::new();
    for (i, len) in [0usize, 1, 1023, 1024, 1025, 5000, 20_000]
        .into_iter()
        .enumerate()
    {
        let name = format!("dir/f{i}");
        let content = data(i as u64, len);
        put(&ns1, &name, &content, Durability::Local).await;
        expected.insert(name, content);
    }
    // Replaced, patched, truncated, deleted.
    let replaced = data(100, 3000);
    put(&ns1, "dir/f5", &replaced, Durability::Local).await;
    expected.insert("dir/f5".to_owned(), replaced);
    let mut w = ns1.patch("dir/f6", 1500).await.expect("patch");
    w.write(&[7u8; 2500]).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    expected.get_mut("dir/f6").expect("f6")[1500..4000].fill(7);
    ns1.truncate("dir/f4", 10, Durability::Local)
        .await
        .expect("truncate");
    expected.get_mut("dir/f4").expect("f4").truncate(10);
    ns1.delete("dir/f3").await.expect("delete");
    expected.remove("dir/f3");
    ns1.flush().await.expect("flush");
    ns1.shutdown().await.expect("shutdown");

    // The machine is gone: only the store is left.
    std::fs::remove_file(env.db_path()).expect("rm db");
    std::fs::remove_dir_all(env.cache_dir()).expect("rm cache");
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert!(
        report.skipped.is_empty() && report.stopped.is_none(),
        "{report:?}"
    );
    assert!(report.missing_objects.is_empty(), "{report:?}");
    assert_eq!(report.counts.files, expected.len() as u64, "{report:?}");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(
        names(&ns2).await,
        expected.keys().cloned().collect::<Vec<_>>()
    );
    for (name, content) in &expected {
        assert_eq!(&get(&ns2, name).await, content, "{name}");
    }
    ns2.cache().check_invariants().await.expect("invariants");
    // The restored volume goes on: a change and a flush, read back after a restart.
    put(&ns2, "after", b"restored and on", Durability::Local).await;
    ns2.flush().await.expect("flush");
    ns2.shutdown().await.expect("shutdown");
    let ns3 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(get(&ns3, "after").await, b"restored and on");
    ns3.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_still_being_written_ship_as_they_were_and_keep_their_objects() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    let v1 = data(1, 4000);
    put(&ns1, "a", &v1, Durability::Local).await;
    put(&ns1, "gone", &data(3, 2000), Durability::Local).await;
    ns1.flush().await.expect("flush");
    let v1_objects = env.store_ids().await;
    // Replaced and created without a flush: the new blocks are dirty (no background
    // uploads in this configuration). A round of shipping must keep the files' state of
    // the last flush in the store, and no object of it may be deleted meanwhile.
    put(&ns1, "a", &data(2, 6000), Durability::Local).await;
    put(&ns1, "b", &data(4, 3000), Durability::Local).await;
    ns1.delete("gone").await.expect("delete");
    ns1.wait_for_cleanups().await;
    ns1.cache().ship_metadata().await.expect("ship");
    let status = ns1.cache().metadata_status().await.expect("status");
    // The released objects of the old "a" are held back, not deleted (the deleted file's
    // are free: its deletion shipped).
    within("the old objects to be held back", WAIT, async {
        while ns1
            .cache()
            .metadata_status()
            .await
            .expect("status")
            .held_deletions
            == 0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let left = env.store_ids().await;
    let held = v1_objects.iter().filter(|id| left.contains(id)).count();
    assert!(
        held >= 4,
        "the old file's 4 objects stay: {left:?} of {v1_objects:?}"
    );
    // The machine dies here.
    drop(ns1);
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, true).await.expect("restore");
    assert!(report.missing_objects.is_empty(), "{report:?}");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns2).await, vec!["a".to_owned()]);
    assert_eq!(get(&ns2, "a").await, v1);
    assert!(status.deferred > 0, "{status:?}");
    ns2.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_replaced_files_go_once_the_metadata_ships() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "a", &data(1, 4096), Durability::Local).await;
    ns1.flush().await.expect("flush");
    let first = env.store_ids().await;
    put(&ns1, "a", &data(2, 4096), Durability::Local).await;
    ns1.flush().await.expect("flush");
    let second = env.store_ids().await;
    assert!(
        first.iter().all(|id| !second.contains(id)),
        "{first:?} still among {second:?}"
    );
    let status = ns1.cache().metadata_status().await.expect("status");
    assert_eq!(
        (status.held_deletions, status.pending_changes),
        (0, 0),
        "{status:?}"
    );
    assert_eq!(
        ns1.cache().usage().await.expect("usage").pending_removals,
        0
    );
    ns1.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_flush_the_metadata_ships_within_its_interval() {
    let env = Env::new();
    let config = Config {
        metadata_interval: Some(Duration::from_secs(1)),
        upload_delay: Some(Duration::from_millis(50)),
        ..env.config()
    };
    let ns1 = ns(env.open_with(config.clone()).await).await;
    let content = data(9, 5000);
    put(&ns1, "unflushed", &content, Durability::Local).await;
    within("the metadata to ship on its own", WAIT, async {
        loop {
            let s = ns1.cache().metadata_status().await.expect("status");
            if s.pending_changes == 0 && s.generation.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(ns1);
    let dir = env.dir.path().join("restored");
    restore_into(&env, &dir, true).await.expect("restore");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(get(&ns2, "unflushed").await, content);
    ns2.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_latest_generation_falls_back_to_the_one_before() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "old", b"generation one", Durability::Local).await;
    ns1.flush().await.expect("flush");
    ns1.shutdown().await.expect("shutdown");
    // A restored volume starts a new generation at its first round.
    let dir = env.dir.path().join("second");
    restore_into(&env, &dir, false).await.expect("restore");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    put(&ns2, "new", b"generation two", Durability::Local).await;
    ns2.flush().await.expect("flush");
    assert_eq!(
        ns2.cache()
            .metadata_status()
            .await
            .expect("status")
            .generation,
        Some(2)
    );
    ns2.shutdown().await.expect("shutdown");
    let manifest = env.store_dir().join("meta/0000000002/manifest");
    let mut bytes = std::fs::read(&manifest).expect("manifest");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&manifest, bytes).expect("corrupt");

    let dir3 = env.dir.path().join("third");
    let report = restore_into(&env, &dir3, false).await.expect("restore");
    assert_eq!(report.generation, 1, "{report:?}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(report.skipped[0].contains("generation 2"), "{report:?}");
    let ns3 = open_restored(&env, &dir3, env.config()).await;
    assert_eq!(names(&ns3).await, vec!["old".to_owned()]);
    assert_eq!(get(&ns3, "old").await, b"generation one");
    ns3.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_refuses_a_used_database_and_a_held_lease() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "x", b"x", Durability::Local).await;
    ns1.flush().await.expect("flush");
    // The lease is held by the running volume.
    let dir = env.dir.path().join("restored");
    match restore_into(&env, &dir, false).await {
        Err(Error::VolumeRefused(m)) => assert!(m.contains("--force-takeover"), "{m}"),
        other => panic!("restore under a live lease: {other:?}"),
    }
    ns1.shutdown().await.expect("shutdown");
    // A database that holds a volume is never restored into.
    let db = Db::open(env.db_path().to_str().expect("utf-8"))
        .await
        .expect("db");
    match restore(&db, env.backend(), &RestoreOptions::default(), &|_| {}).await {
        Err(Error::VolumeRefused(m)) => assert!(m.contains("not empty"), "{m}"),
        other => panic!("restore into a used database: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_metadata_names_an_object_that_does_not_decode() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "a", b"one", Durability::Local).await;
    ns1.flush().await.expect("flush");
    put(&ns1, "b", b"two", Durability::Local).await;
    ns1.flush().await.expect("flush");
    assert_eq!(
        ns1.cache().check_metadata().await.expect("check"),
        Vec::<String>::new()
    );
    let delta = env
        .store_dir()
        .join("meta/0000000001/delta-00000000000000000002");
    let mut bytes = std::fs::read(&delta).expect("delta");
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&delta, bytes).expect("truncate");
    let problems = ns1.cache().check_metadata().await.expect("check");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("0000000001/delta-00000000000000000002"),
        "{problems:?}"
    );
    ns1.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_generations_go_after_their_keeping_time_but_the_two_newest_stay() {
    let env = Env::new();
    let keep_none = Config {
        metadata_keep: Duration::ZERO,
        ..env.config()
    };
    let ns1 = ns(env.open_with(keep_none.clone()).await).await;
    put(&ns1, "a", b"one", Durability::Local).await;
    ns1.flush().await.expect("flush");
    ns1.shutdown().await.expect("shutdown");
    // Leftovers of a snapshot that stopped before its manifest.
    let stray = env.store_dir().join("meta/0000000000");
    std::fs::create_dir_all(&stray).expect("stray dir");
    std::fs::write(stray.join("part-000000"), b"half a snapshot").expect("stray part");
    // Each restored volume writes a new generation at its first round.
    let mut last = None;
    for (i, dir) in ["second", "third"].into_iter().enumerate() {
        let dir = env.dir.path().join(dir);
        restore_into(&env, &dir, false).await.expect("restore");
        let ns = open_restored(&env, &dir, keep_none.clone()).await;
        put(&ns, &format!("f{i}"), b"more", Durability::Local).await;
        ns.flush().await.expect("flush");
        last = ns
            .cache()
            .metadata_status()
            .await
            .expect("status")
            .generation;
        ns.shutdown().await.expect("shutdown");
    }
    assert_eq!(last, Some(3));
    // Generations that still have objects (a file store leaves empty directories behind).
    let meta = env.store_dir().join("meta");
    let generations: Vec<String> = files_under(&meta)
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(&meta).expect("under meta");
            rel.iter()
                .next()
                .expect("generation")
                .to_string_lossy()
                .into_owned()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(generations, vec!["0000000002", "0000000003"]);
    let dir = env.dir.path().join("fourth");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert_eq!(report.generation, 3, "{report:?}");
    assert_eq!(report.counts.files, 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_unreadable_metadata_and_repair_writes_a_new_generation() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "a", b"one", Durability::Local).await;
    ns1.flush().await.expect("flush");
    put(&ns1, "b", b"two", Durability::Local).await;
    ns1.flush().await.expect("flush");
    let delta = env
        .store_dir()
        .join("meta/0000000001/delta-00000000000000000002");
    std::fs::write(&delta, b"not a metadata object").expect("garble");
    let report = ns1
        .cache()
        .check(blockcache::CheckOptions::default())
        .await
        .expect("check");
    assert!(!report.consistent, "{report}");
    assert_eq!(report.metadata.len(), 1, "{report}");
    assert!(
        report.to_string().contains("delta-00000000000000000002"),
        "{report}"
    );
    let repaired = ns1
        .cache()
        .check(blockcache::CheckOptions {
            repair: true,
            ..Default::default()
        })
        .await
        .expect("repair");
    assert!(repaired.consistent, "{repaired}");
    // The broken generation is told, but no longer makes the volume inconsistent.
    let again = ns1
        .cache()
        .check(blockcache::CheckOptions::default())
        .await
        .expect("check");
    assert!(again.consistent, "{again}");
    assert_eq!(again.metadata.len(), 1, "{again}");
    ns1.shutdown().await.expect("shutdown");
    // The new generation restores both files.
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert_eq!(report.generation, 2, "{report:?}");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns2).await, vec!["a".to_owned(), "b".to_owned()]);
    ns2.shutdown().await.expect("shutdown");
}

/// The volume's raw SQLite file, for tests that set up the state a crash leaves.
async fn raw_db(env: &Env) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db_path().display()))
        .await
        .expect("raw db")
}

async fn meta_position(pool: &sqlx::SqlitePool) -> (String, String) {
    sqlx::query_as(
        "SELECT (SELECT value FROM volume WHERE key = 'meta_generation'), \
                (SELECT value FROM volume WHERE key = 'meta_seq')",
    )
    .fetch_one(pool)
    .await
    .expect("position")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A snapshot's manifest reached the store and the process stopped before recording it (a
/// crash, or a flush whose caller gave up): the store's newest complete generation is that
/// snapshot. Later changes must reach a generation that a restore reads, and no object it
/// names may be deleted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_written_but_not_recorded_is_not_left_behind() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "old", &data(1, 3000), Durability::Local).await;
    ns1.flush().await.expect("flush");
    ns1.shutdown().await.expect("shutdown");
    let pool = raw_db(&env).await;
    let position = meta_position(&pool).await;
    pool.close().await;
    assert_eq!(position.0, "1", "{position:?}");

    // Generation 2 written from this database's shipped state (the store lacking
    // generation 1's manifest makes the next round write one)...
    let gen1 = env.store_dir().join("meta/0000000001");
    let saved = env.dir.path().join("saved-gen1");
    copy_dir(&gen1, &saved);
    std::fs::remove_file(gen1.join("manifest")).expect("rm manifest");
    let ns2 = ns(env.open().await).await;
    ns2.cache().ship_metadata().await.expect("ship");
    assert_eq!(
        ns2.cache()
            .metadata_status()
            .await
            .expect("status")
            .generation,
        Some(2)
    );
    ns2.shutdown().await.expect("shutdown");
    // ... with generation 1 still in the store and this database's position not moved to
    // generation 2: the state a stop right after generation 2's manifest leaves.
    let _ = std::fs::remove_dir_all(&gen1);
    copy_dir(&saved, &gen1);
    let pool = raw_db(&env).await;
    for (key, value) in [("meta_generation", &position.0), ("meta_seq", &position.1)] {
        sqlx::query("UPDATE volume SET value = ? WHERE key = ?")
            .bind(value)
            .bind(key)
            .execute(&pool)
            .await
            .expect("position back");
    }
    pool.close().await;

    let ns3 = ns(env.open().await).await;
    let new = data(2, 2000);
    put(&ns3, "new", &new, Durability::Local).await;
    ns3.delete("old").await.expect("delete");
    ns3.flush().await.expect("flush");
    ns3.shutdown().await.expect("shutdown");

    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert!(report.missing_objects.is_empty(), "{report:?}");
    let ns4 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns4).await, vec!["new".to_owned()], "{report:?}");
    assert_eq!(get(&ns4, "new").await, new);
    ns4.shutdown().await.expect("shutdown");
}

/// A delta reached the store and the process stopped before recording it: until a round
/// adopts it, the objects it names must not be deleted from the store, though the local
/// shipped state does not name them (a deletion queued at open, or soon after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_a_delta_not_yet_adopted_stay_in_the_store() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    put(&ns1, "keep", &data(1, 1000), Durability::Local).await;
    ns1.flush().await.expect("flush");
    let before = env.store_ids().await;
    // Uploaded (not shipped), then shipped as delta 2.
    put(&ns1, "a", &data(2, 1000), Durability::Store).await;
    let objects: Vec<u64> = env
        .store_ids()
        .await
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    ns1.cache().ship_metadata().await.expect("ship");
    ns1.shutdown().await.expect("shutdown");

    // Undo the local record of delta 2, as a stop between its upload and the transaction
    // that records it leaves the database.
    let pool = raw_db(&env).await;
    assert_eq!(meta_position(&pool).await, ("1".to_owned(), "2".to_owned()));
    let inode: i64 = sqlx::query_scalar("SELECT inode FROM files WHERE name = 'a'")
        .fetch_one(&pool)
        .await
        .expect("inode");
    for (statement, bind) in [
        ("DELETE FROM shipped_files WHERE name = 'a'", None),
        ("DELETE FROM shipped_blocks WHERE inode = ?", Some(inode)),
        ("UPDATE volume SET value = '1' WHERE key = 'meta_seq'", None),
        (
            "INSERT INTO meta_changes (kind, a, b, name, seq, last) \
             SELECT 1, 0, 0, 'a', n, n FROM meta_clock",
            None,
        ),
        (
            "INSERT INTO meta_changes (kind, a, b, name, seq, last) \
             SELECT 3, ?, 0, '', n, n FROM meta_clock",
            Some(inode),
        ),
    ] {
        let mut q = sqlx::query(statement);
        if let Some(b) = bind {
            q = q.bind(b);
        }
        q.execute(&pool).await.expect(statement);
    }
    pool.close().await;

    let ns2 = ns(env.open().await).await;
    ns2.delete("a").await.expect("delete");
    assert!(
        ns2.cache().wait_for_removals(WAIT).await,
        "the deleted file's object left the store"
    );
    assert!(!env.store_ids().await.contains(&objects[0]));
    // The machine dies once the object is gone: the store's metadata must not name it.
    drop(ns2);
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, true).await.expect("restore");
    assert!(report.missing_objects.is_empty(), "{report:?}");
    let ns3 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns3).await, vec!["keep".to_owned()]);
    ns3.shutdown().await.expect("shutdown");
}

/// A file whose changes outnumber what one delta reads (50,000 changed keys: a large file,
/// or small blocks) written between two rounds: a flush still ships it, and the changes
/// noted after it are not stuck behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_more_changes_than_a_delta_reads_still_ships() {
    let env = Env::new();
    let config = Config {
        block_size: 64,
        max_bytes: 64 << 20,
        max_entries: 1 << 20,
        max_dirty_bytes: 32 << 20,
        metadata_interval: None,
        ..env.config()
    };
    let ns1 = ns(env.open_with(config.clone()).await).await;
    // Blocks of one content: one object, 50,100 mappings.
    let big = [0x5au8; 64].repeat(50_100);
    put(&ns1, "big", &big, Durability::Local).await;
    ns1.flush().await.expect("flush");
    put(&ns1, "small", b"after the big one", Durability::Local).await;
    ns1.flush().await.expect("flush");
    let status = ns1.cache().metadata_status().await.expect("status");
    assert_eq!(status.pending_changes, 0, "{status:?}");
    drop(ns1);
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, true).await.expect("restore");
    assert_eq!(report.counts.files, 2, "{report:?}");
    let ns2 = open_restored(&env, &dir, config).await;
    assert_eq!(get(&ns2, "small").await, b"after the big one");
    let r = ns2.open_read("big").await.expect("open");
    assert_eq!(r.meta().size, big.len() as u64);
    for at in [0, big.len() - 64] {
        assert_eq!(
            &r.read(at as u64, 64).await.expect("read")[..],
            &big[at..at + 64]
        );
    }
    ns2.shutdown().await.expect("shutdown");
}

/// A file written before a flush is restorable once the flush returns, even when it is
/// replaced while the flush runs (its new version still being written when the metadata
/// ships): the store must hold one of its versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_during_a_flush_is_restorable_after_it() {
    let env = Env::new();
    let ns1 = std::sync::Arc::new(ns(env.open().await).await);
    let v1 = data(1, 3000);
    put(&ns1, "a", &v1, Durability::Local).await;
    // The flush waits for the uploads of "a", held at the store's gate meanwhile.
    env.faults.hold(blockcache_backend::faulty::Op::Put);
    let flushing = tokio::spawn({
        let ns1 = ns1.clone();
        async move { ns1.flush().await }
    });
    env.wait_held(blockcache_backend::faulty::Op::Put, 1).await;
    let v2 = data(2, 3000);
    put(&ns1, "a", &v2, Durability::Local).await;
    env.faults.release(blockcache_backend::faulty::Op::Put);
    within("the flush", WAIT, flushing)
        .await
        .expect("join")
        .expect("flush");
    // The machine dies right after the flush.
    drop(ns1);
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, true).await.expect("restore");
    assert!(report.missing_objects.is_empty(), "{report:?}");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns2).await, vec!["a".to_owned()], "{report:?}");
    let got = get(&ns2, "a").await;
    assert!(got == v1 || got == v2, "neither version of a");
    ns2.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_volume_holds_a_complete_generation_from_its_open() {
    let env = Env::new();
    let cache = env.open().await;
    // The open wrote the volume's first generation: the store holds a complete, empty one.
    let generations = blockcache::restore::list_generations(&env.backend())
        .await
        .expect("list generations");
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert!(generations[0].complete, "{generations:?}");
    assert_eq!(generations[0].deltas, 0, "{generations:?}");
    cache.shutdown().await.expect("shutdown");
    // Opened again, the volume ships into that generation: no second one.
    let ns1 = ns(env.open().await).await;
    put(&ns1, "a", &data(1, 100), Durability::Local).await;
    ns1.cache().flush().await.expect("flush");
    let after = blockcache::restore::list_generations(&env.backend())
        .await
        .expect("list generations");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].generation, generations[0].generation, "{after:?}");
    assert_eq!(after[0].deltas, 1, "{after:?}");
    ns1.shutdown().await.expect("shutdown");
    let dir = env.dir.path().join("restored");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert_eq!(report.generation, generations[0].generation, "{report:?}");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    assert_eq!(names(&ns2).await, vec!["a".to_owned()]);
    ns2.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_the_raw_api_are_not_noted_for_shipping_but_files_are() {
    let env = Env::new();
    let cache = env.open().await;
    // Blocks of no file never ship: writing and committing them notes nothing.
    for b in 0..8 {
        cache.write(1, b, 0, &data(b, 1000)).await.expect("write");
    }
    cache.commit().await.expect("commit");
    cache.flush().await.expect("flush");
    cache.remove(1, 0..4).await.expect("remove");
    let status = cache.metadata_status().await.expect("status");
    assert_eq!(status.pending_changes, 0, "{status:?}");
    // A file's blocks are.
    let ns1 = ns(cache).await;
    put(&ns1, "a", &data(2, 3000), Durability::Local).await;
    let status = ns1.cache().metadata_status().await.expect("status");
    assert!(status.pending_changes > 0, "{status:?}");
    ns1.cache().flush().await.expect("flush");
    let status = ns1.cache().metadata_status().await.expect("status");
    assert_eq!(status.pending_changes, 0, "{status:?}");
    ns1.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_attributes_ship_and_restore_and_a_patch_clears_them() {
    let env = Env::new();
    let ns1 = ns(env.open().await).await;
    let with = |name: &'static str, attrs: &'static str| {
        let ns1 = &ns1;
        async move {
            let mut w = ns1.create(name).await.expect("create");
            w.set_attrs(Some(attrs.to_owned())).expect("attrs");
            w.write(&data(3, 3000)).await.expect("write");
            w.finish(Durability::Local).await.expect("finish")
        }
    };
    let meta = with("kept", r#"{"type":"text/plain"}"#).await;
    assert_eq!(meta.attrs.as_deref(), Some(r#"{"type":"text/plain"}"#));
    with("patched", r#"{"type":"a"}"#).await;
    with("replaced", r#"{"type":"b"}"#).await;
    put(&ns1, "replaced", b"new", Durability::Local).await;
    ns1.cache().flush().await.expect("flush");
    // A patch changes the content the attributes describe: they go.
    let mut w = ns1.patch("patched", 10).await.expect("patch");
    assert!(matches!(
        w.set_attrs(Some("x".to_owned())),
        Err(Error::InvalidAttrs(_))
    ));
    w.write(b"changed").await.expect("write");
    let meta = w.finish(Durability::Local).await.expect("finish");
    assert_eq!(meta.attrs, None);
    let mut w = ns1.create("too-long").await.expect("create");
    assert!(matches!(
        w.set_attrs(Some("x".repeat(blockcache::MAX_ATTRS_LEN + 1))),
        Err(Error::InvalidAttrs(_))
    ));
    w.abandon().await;
    ns1.cache().flush().await.expect("flush");
    ns1.shutdown().await.expect("shutdown");
    let dir = env.dir.path().join("restored");
    restore_into(&env, &dir, false).await.expect("restore");
    let ns2 = open_restored(&env, &dir, env.config()).await;
    let attrs = |name: &'static str| {
        let ns2 = &ns2;
        async move { ns2.stat(name).await.expect("stat").attrs }
    };
    assert_eq!(
        attrs("kept").await.as_deref(),
        Some(r#"{"type":"text/plain"}"#)
    );
    assert_eq!(attrs("patched").await, None);
    assert_eq!(attrs("replaced").await, None);
    // The restored volume's first round writes its state as a new generation's snapshot:
    // the attributes are in it too.
    ns2.cache().flush().await.expect("flush");
    ns2.shutdown().await.expect("shutdown");
    let newest = blockcache::restore::list_generations(&env.backend())
        .await
        .expect("generations")
        .into_iter()
        .max_by_key(|g| g.generation)
        .expect("a generation");
    assert_eq!(newest.deltas, 0, "{newest:?}");
    let dir = env.dir.path().join("restored-again");
    let report = restore_into(&env, &dir, false).await.expect("restore");
    assert_eq!(report.generation, newest.generation);
    let ns3 = open_restored(&env, &dir, env.config()).await;
    let meta = ns3.stat("kept").await.expect("stat");
    assert_eq!(meta.attrs.as_deref(), Some(r#"{"type":"text/plain"}"#));
    assert_eq!(ns3.stat("patched").await.expect("stat").attrs, None);
    ns3.shutdown().await.expect("shutdown");
}

/// Files of the shipped state whose inode has no shipped block, though they have bytes.
async fn shipped_files_without_blocks(pool: &sqlx::SqlitePool) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT f.name, f.inode, f.size FROM shipped_files f WHERE f.size > 0 \
         AND NOT EXISTS (SELECT 1 FROM shipped_blocks b WHERE b.inode = f.inode)",
    )
    .fetch_all(pool)
    .await
    .expect("query the shipped state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_racing_rewrites_of_the_same_bytes_never_ship_a_file_without_its_blocks() {
    let env = Env::new();
    let config = Config {
        upload_delay: Some(Duration::from_millis(1)),
        ..env.config()
    };
    let ns1 = std::sync::Arc::new(ns(env.open_with(config).await).await);
    let pool = raw_db(&env).await;
    let shipper = {
        let ns1 = ns1.clone();
        tokio::spawn(async move {
            for _ in 0..400 {
                let _ = ns1.cache().ship_metadata().await;
                tokio::task::yield_now().await;
            }
        })
    };
    for round in 0..200u64 {
        let name = format!("w/{}", round % 3);
        // The same bytes again and again, sometimes after a deletion.
        let content = data(round % 2, 3000 + (round % 2) as usize * 5000);
        if round % 5 == 4 {
            let _ = ns1.delete(&name).await;
        }
        put(&ns1, &name, &content, Durability::Local).await;
        let bad = shipped_files_without_blocks(&pool).await;
        assert!(
            bad.is_empty(),
            "round {round}: shipped without blocks: {bad:?}"
        );
    }
    shipper.await.expect("shipper");
    ns1.cache().flush().await.expect("flush");
    let bad = shipped_files_without_blocks(&pool).await;
    assert!(bad.is_empty(), "after the flush: {bad:?}");
}

async fn pending(ns: &Namespace) -> u64 {
    let status = ns.cache().metadata_status().await.expect("status");
    status.pending_changes
}

/// A new file's blocks, committed while its inode is noted whole (named, not yet shipped),
/// add no notes of their own: the inode's note covers them (migration 8). A block the file
/// loses is still noted on its own, and the file restores whole from what the flush ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_committed_while_their_inode_is_noted_whole_add_no_notes() {
    let env = Env::new();
    let config = Config {
        metadata_interval: None,
        ..env.config()
    };
    let ns1 = ns(env.open_with(config.clone()).await).await;
    // Ten blocks, still dirty: the file's name and its inode are noted.
    let content = data(12, 10 * 1024);
    put(&ns1, "new", &content, Durability::None).await;
    let named = pending(&ns1).await;
    assert_eq!(named, 2, "the file and its inode");
    ns1.cache().commit().await.expect("commit");
    assert_eq!(
        pending(&ns1).await,
        named,
        "a note for each block committed"
    );
    // Cut to four blocks before anything shipped: the blocks it loses are noted.
    ns1.truncate("new", 4 * 1024, Durability::Local)
        .await
        .expect("truncate");
    ns1.cache().commit().await.expect("commit");
    let pool = raw_db(&env).await;
    let cut: Vec<(i64, i64)> =
        sqlx::query_as("SELECT a, b FROM meta_changes WHERE kind = 2 ORDER BY a, b")
            .fetch_all(&pool)
            .await
            .expect("block notes");
    pool.close().await;
    let inode = cut.first().map_or(0, |&(a, _)| a);
    assert_eq!(
        cut,
        (4..10).map(|b| (inode, b)).collect::<Vec<_>>(),
        "each block cut off is noted, and no other"
    );
    ns1.cache().flush().await.expect("flush");
    assert_eq!(pending(&ns1).await, 0);
    ns1.shutdown().await.expect("shutdown");

    let dir = tempfile::tempdir().expect("tempdir");
    restore_into(&env, dir.path(), true).await.expect("restore");
    let ns2 = open_restored(&env, dir.path(), config).await;
    assert_eq!(get(&ns2, "new").await, content[..4 * 1024]);
    ns2.shutdown().await.expect("shutdown");
}
