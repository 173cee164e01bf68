//! A volume owns its store: the volume record, the refusals at open, adoption of a store
//! from before records, the object format (compression, encryption) and the writer lease.
//! Each test runs the library over a real SQLite file and a real local-directory store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockcache::{BlockCache, Config, Error, Secret};
use blockcache_backend::Backend;
use blockcache_backend::faulty::Op;
use blockcache_backend::format::{Compression, Key};
use blockcache_db::Db;
use blockcache_tests::{Env, data, text, within};
use object_store::local::LocalFileSystem;

/// Another volume's database and cache directory under `env`'s directory, named `name`.
fn other_dirs(env: &Env, name: &str) -> (PathBuf, Config) {
    let dir = env.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut config = env.config();
    config.cache_dir = dir.join("cache");
    (dir.join("meta.db"), config)
}

async fn open_at(db: &Path, config: Config, backend: Backend) -> blockcache::Result<BlockCache> {
    let db = Db::open(db.to_str().expect("utf-8")).await?;
    BlockCache::open(config, db, backend).await
}

/// The store's directory, unwrapped: a second process's view of the same store.
fn raw_backend(env: &Env) -> Backend {
    let local = LocalFileSystem::new_with_prefix(env.store_dir()).expect("store");
    Backend::new(Arc::new(local), object_store::path::Path::default())
}

/// Waits until `cache` stops writing to the store because its lease could not be renewed.
async fn until_lease_lapsed(cache: &BlockCache) {
    let lapsed = || {
        cache
            .lease_state()
            .and_then(|(_, why)| why)
            .is_some_and(|why| why.contains("could not be renewed"))
    };
    within("the lease to lapse", Duration::from_secs(30), async {
        while !lapsed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn refusal(result: blockcache::Result<BlockCache>) -> String {
    match result {
        Ok(_) => panic!("the volume opened"),
        Err(Error::VolumeRefused(message)) => message,
        Err(e) => panic!("not a refusal: {e}"),
    }
}

/// Every file under `dir`, with its content.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    blockcache_tests::files_under(dir)
        .into_iter()
        .map(|p| {
            let content = std::fs::read(&p).expect("read");
            (p, content)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_volume_on_one_store_is_refused_and_overwrites_nothing() {
    let env = Env::new();
    let first = env.open().await;
    first.write(1, 0, 0, &data(1, 1000)).await.expect("write");
    first.flush().await.expect("flush");
    let (db, config) = other_dirs(&env, "second");
    let message = refusal(open_at(&db, config, env.backend()).await);
    assert!(
        message.contains("the store holds volume") && message.contains("this database is new"),
        "{message}"
    );
    // With objects of its own, a second volume is still refused, naming both volumes.
    let (db, mut config) = other_dirs(&env, "third");
    let other_store = env.dir.path().join("third-store");
    let second = open_at(
        &db,
        config.clone(),
        Backend::from_url(&format!("file://{}", other_store.display())).expect("store"),
    )
    .await
    .expect("its own store");
    second.write(1, 0, 0, &data(2, 1000)).await.expect("write");
    second.shutdown().await.expect("shutdown");
    config.lease_ttl = Duration::from_secs(2);
    let message = refusal(open_at(&db, config, env.backend()).await);
    assert!(
        message.contains("but this database belongs to volume") && message.contains("--store"),
        "{message}"
    );
    first.clear().await.expect("clear");
    assert_eq!(
        first.read(1, 0, 0, 1000).await.expect("read"),
        data(1, 1000)
    );
    first.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_database_is_refused_rather_than_numbering_objects_again() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(3, 1000)).await.expect("write");
    cache.shutdown().await.expect("shutdown");
    let before = files_under(&env.store_dir().join("data"));
    for f in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        let _ = std::fs::remove_file(env.dir.path().join(f));
    }
    std::fs::remove_dir_all(env.cache_dir()).expect("wipe the cache");
    let message = refusal(env.try_open(env.config()).await);
    assert!(message.contains("this database is new"), "{message}");
    assert_eq!(
        files_under(&env.store_dir().join("data")),
        before,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_without_a_record_are_not_taken_by_a_new_database() {
    let env = Env::new();
    let shard = env.store_dir().join("data/01");
    std::fs::create_dir_all(&shard).expect("shard");
    std::fs::write(shard.join("1"), b"someone else's").expect("object");
    let message = refusal(env.try_open(env.config()).await);
    assert!(
        message.contains("holds objects but no volume record"),
        "{message}"
    );
    assert!(
        !env.store_dir().join("volume").exists(),
        "no record written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_directory_vanished_is_refused_and_never_recreated() {
    let env = Env::linked();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(4, 1000)).await.expect("write");
    cache.shutdown().await.expect("shutdown");
    // The store's file system is not mounted (its directory is elsewhere).
    let away = env.dir.path().join("store-away");
    std::fs::rename(env.store_dir(), &away).expect("move the store away");
    let message = refusal(env.try_open(env.config()).await);
    assert!(
        message.contains("no volume record") && message.contains("mounted"),
        "{message}"
    );
    assert!(
        !env.store_dir().exists(),
        "the store directory is not recreated"
    );
    std::fs::rename(&away, env.store_dir()).expect("back");
    let cache = env.open().await;
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1000).await.expect("read"),
        data(4, 1000)
    );
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_directory_replaced_while_open_is_never_written() {
    let env = Env::linked();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(5, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    let away = env.dir.path().join("store-away");
    std::fs::rename(env.store_dir(), &away).expect("move the store away");
    cache.write(1, 1, 0, &data(6, 1000)).await.expect("write");
    let err = cache
        .flush()
        .await
        .expect_err("the store directory is gone");
    assert!(
        blockcache_backend::chain(&err).contains("store directory"),
        "{err}"
    );
    assert!(!env.store_dir().exists(), "nothing written under the path");
    // Another directory at the path (a file system mounted over it) is not the store either.
    std::fs::create_dir(env.store_dir()).expect("an empty directory");
    let err = cache.flush().await.expect_err("another directory");
    assert!(
        blockcache_backend::chain(&err).contains("another directory"),
        "{err}"
    );
    assert!(
        files_under(&env.store_dir()).is_empty(),
        "nothing written there"
    );
    std::fs::remove_dir(env.store_dir()).expect("remove");
    std::fs::rename(&away, env.store_dir()).expect("back");
    cache.flush().await.expect("the store is back");
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 1, 0, 1000).await.expect("read"),
        data(6, 1000)
    );
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_from_before_records_is_adopted_and_its_plain_objects_stay_readable() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(7, 1000)).await.expect("write");
    cache.shutdown().await.expect("shutdown");
    let old_objects = files_under(&env.store_dir().join("data"));
    assert_eq!(old_objects.len(), 1);
    // As the previous release left it: no record, no lease, no binding in the database.
    std::fs::remove_file(env.store_dir().join("volume")).expect("record");
    std::fs::remove_dir_all(env.store_dir().join("lease")).expect("lease");
    {
        let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db_path().display()))
            .await
            .expect("db");
        sqlx::query("DELETE FROM volume WHERE key = 'store_volume'")
            .execute(&db)
            .await
            .expect("unbind");
        db.close().await;
    }
    let mut config = env.config();
    config.compression = Compression::default();
    let cache = env.open_with(config).await;
    let record = std::fs::read_to_string(env.store_dir().join("volume")).expect("record");
    assert!(record.contains("\"object_format\": \"framed\""), "{record}");
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1000).await.expect("read"),
        data(7, 1000)
    );
    cache.write(1, 1, 0, &text(8, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    for (path, content) in files_under(&env.store_dir().join("data")) {
        let old = old_objects.iter().any(|(p, _)| p == &path);
        assert_eq!(content.starts_with(b"BCOB"), !old, "{}", path.display());
    }
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 1, 0, 1000).await.expect("read"),
        text(8, 1000)
    );
    cache.shutdown().await.expect("shutdown");
    // Only that case adopts: the same store without its record now is refused.
    std::fs::remove_file(env.store_dir().join("volume")).expect("record");
    let message = refusal(env.try_open(env.config()).await);
    assert!(message.contains("no volume record"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_do_not_fit_the_volume_are_refused() {
    let env = Env::new();
    env.open().await.shutdown().await.expect("shutdown");
    let mut config = env.config();
    config.block_size = 2048;
    let message = refusal(env.try_open(config).await);
    assert!(message.contains("--block-size 1024"), "{message}");
    let mut config = env.config();
    config.compression = Compression::Lz4;
    let message = refusal(env.try_open(config).await);
    assert!(message.contains("--compression none"), "{message}");
    let mut config = env.config();
    config.encryption = Some(Secret::Key(Arc::new(Key::generate())));
    let message = refusal(env.try_open(config).await);
    assert!(message.contains("is not encrypted"), "{message}");
    // A record from a newer release.
    let path = env.store_dir().join("volume");
    let record = std::fs::read_to_string(&path).expect("record");
    std::fs::write(
        &path,
        record.replace("\"format_version\": 1", "\"format_version\": 9"),
    )
    .expect("rewrite");
    let message = refusal(env.try_open(env.config()).await);
    assert!(message.contains("newer blockcache"), "{message}");
}

fn encrypted(env: &Env, key: &Arc<Key>) -> Config {
    let mut config = env.config();
    config.compression = Compression::default();
    config.encryption = Some(Secret::Key(Arc::clone(key)));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volume_stores_no_plaintext_and_refuses_a_wrong_or_missing_key() {
    let env = Env::new();
    let key = Arc::new(Key::generate());
    let cache = env.open_with(encrypted(&env, &key)).await;
    let blocks: Vec<Vec<u8>> = (0..8).map(|b| text(20 + b, 1024)).collect();
    for (b, content) in blocks.iter().enumerate() {
        cache.write(1, b as u64, 0, content).await.expect("write");
    }
    cache.flush().await.expect("flush");
    let usage = cache.usage().await.expect("usage");
    assert!(
        usage.stored_bytes * 10 < usage.logical_bytes * 6,
        "compressed: {usage:?}"
    );
    cache.clear().await.expect("clear");
    for (b, content) in blocks.iter().enumerate() {
        assert_eq!(
            &cache.read(1, b as u64, 0, 1024).await.expect("read"),
            content
        );
    }
    cache.shutdown().await.expect("shutdown");
    for (path, stored) in files_under(&env.store_dir().join("data")) {
        for content in &blocks {
            assert!(
                !stored
                    .windows(32)
                    .any(|w| content.windows(32).any(|c| c == w)),
                "plaintext in {}",
                path.display()
            );
        }
    }
    let message = refusal(env.try_open(env.config()).await);
    assert!(message.contains("--encryption-key-file"), "{message}");
    let message = refusal(
        env.try_open(encrypted(&env, &Arc::new(Key::generate())))
            .await,
    );
    assert!(message.contains("not the key of volume"), "{message}");
    let mut config = env.config();
    config.encryption = Some(Secret::Passphrase(Arc::new(
        b"a passphrase".to_vec().into(),
    )));
    let message = refusal(env.try_open(config).await);
    assert!(message.contains("key file"), "{message}");
    env.open_with(encrypted(&env, &key))
        .await
        .shutdown()
        .await
        .expect("the right key opens it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_or_truncated_object_is_an_error_naming_it_never_wrong_data() {
    for key in [None, Some(Arc::new(Key::generate()))] {
        let env = Env::new();
        let mut config = env.config();
        config.compression = Compression::default();
        config.encryption = key.map(Secret::Key);
        let cache = env.open_with(config.clone()).await;
        cache.write(1, 0, 0, &text(30, 1000)).await.expect("write");
        cache.write(1, 1, 0, &text(31, 1000)).await.expect("write");
        cache.flush().await.expect("flush");
        cache.clear().await.expect("clear");
        let (a, b) = (Env::nth_object(1), Env::nth_object(2));
        std::fs::copy(env.object_path(a), env.object_path(b)).expect("swap");
        let err = cache
            .read(1, 1, 0, 1000)
            .await
            .expect_err("a swapped object");
        let told = blockcache_backend::chain(&err);
        assert!(told.contains(&b.to_string()), "{told}");
        assert!(
            told.contains("claims id") || told.contains("authentication"),
            "{told}"
        );
        let stored = std::fs::read(env.object_path(a)).expect("object");
        std::fs::write(env.object_path(a), &stored[..stored.len() - 7]).expect("truncate");
        let err = cache
            .read(1, 0, 0, 1000)
            .await
            .expect_err("a truncated object");
        let told = blockcache_backend::chain(&err);
        assert!(told.contains(&a.to_string()), "{told}");
        cache.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_conditional_puts_is_checked_before_each_write() {
    let env = Env::new();
    env.faults.refuse_conditional_puts(true);
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(40, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1000).await.expect("read"),
        data(40, 1000)
    );
    cache.shutdown().await.expect("shutdown");
    // The record was still written once, and another volume is still refused.
    let (db, config) = other_dirs(&env, "second");
    let message = refusal(open_at(&db, config, env.backend()).await);
    assert!(message.contains("the store holds volume"), "{message}");
}

/// Copies the database of `env` (closed) to a second data directory: another process with
/// the same volume.
fn copy_database(env: &Env, name: &str, lease_ttl: Duration) -> (PathBuf, Config) {
    let (db, mut config) = other_dirs(env, name);
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", env.db_path().display()));
        if from.exists() {
            std::fs::copy(&from, format!("{}{suffix}", db.display())).expect("copy");
        }
    }
    config.lease_ttl = lease_ttl;
    (db, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_naming_the_holder_until_it_forces_a_takeover() {
    let env = Env::new();
    let first = env.open().await;
    first.write(1, 0, 0, &data(50, 1000)).await.expect("write");
    first.flush().await.expect("flush");
    let (db, config) = copy_database(&env, "copy", Duration::from_secs(30));
    let message = refusal(open_at(&db, config.clone(), raw_backend(&env)).await);
    assert!(
        message.contains("is held by pid") && message.contains("--force-takeover"),
        "{message}"
    );
    let mut forced = config.clone();
    forced.force_takeover = true;
    let second = open_at(&db, forced, raw_backend(&env))
        .await
        .expect("forced");
    // The first writer finds out at its next renewal and stops writing.
    first
        .write(1, 1, 0, &data(51, 1000))
        .await
        .expect("a local write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    let err = loop {
        match first.flush().await {
            Err(e) => break e,
            Ok(()) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the first writer kept writing"
                );
                round += 1;
                first
                    .write(1, 1, 0, &data(100 + round, 1000))
                    .await
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let told = blockcache_backend::chain(&err);
    assert!(told.contains("lease"), "{told}");
    assert_eq!(
        first.usage().await.expect("usage").dirty_entries,
        1,
        "kept dirty"
    );
    second.write(1, 2, 0, &data(53, 1000)).await.expect("write");
    second.flush().await.expect("the new writer writes");
    second.clear().await.expect("clear");
    assert_eq!(
        second.read(1, 0, 0, 1000).await.expect("read"),
        data(50, 1000)
    );
    assert_eq!(
        second.read(1, 2, 0, 1000).await.expect("read"),
        data(53, 1000)
    );
    second.shutdown().await.expect("shutdown");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_renew_stops_before_another_takes_over() {
    let env = Env::new();
    let ttl = Duration::from_secs(2);
    let mut config = env.config();
    config.lease_ttl = ttl;
    let first = env.open_with(config).await;
    first.write(1, 0, 0, &data(60, 1000)).await.expect("write");
    first.flush().await.expect("flush");
    // The first writer's store stops answering listings: it cannot renew its lease.
    env.faults.every_key(true);
    env.faults.fail_fraction(Op::List, 1.0);
    until_lease_lapsed(&first).await;
    first
        .write(1, 1, 0, &data(61, 1000))
        .await
        .expect("a local write");
    let err = first.flush().await.expect_err("no valid lease");
    let told = blockcache_backend::chain(&err);
    assert!(told.contains("lease could not be renewed"), "{told}");
    // A second process sees the lease expire by the store's clock and takes it.
    let (db, config) = copy_database(&env, "copy", ttl);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        match open_at(&db, config.clone(), raw_backend(&env)).await {
            Ok(c) => break c,
            Err(Error::VolumeRefused(m)) if m.contains("is held by") => {
                assert!(tokio::time::Instant::now() < deadline, "{m}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    second.write(1, 2, 0, &data(62, 1000)).await.expect("write");
    second.flush().await.expect("flush");
    // The first writer's store answers again: it finds the newer writer and never writes.
    env.faults.fail_fraction(Op::List, 0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let err = first.flush().await.expect_err("never writes again");
        let told = blockcache_backend::chain(&err);
        if told.contains("newer writer") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{told}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        first.usage().await.expect("usage").dirty_entries,
        1,
        "kept dirty"
    );
    second.clear().await.expect("clear");
    assert_eq!(
        second.read(1, 0, 0, 1000).await.expect("read"),
        data(60, 1000)
    );
    assert_eq!(
        second.read(1, 2, 0, 1000).await.expect("read"),
        data(62, 1000)
    );
    second.shutdown().await.expect("shutdown");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_at_once_and_a_dead_holders_lease_by_its_own_database() {
    let env = Env::new();
    // A holder that died (dropped without shutdown) is taken over at once by the next open
    // of its own database: its lock proves the holder is gone.
    let cache = env.open().await;
    drop(cache);
    env.open().await.shutdown().await.expect("shutdown");
    // A clean shutdown releases the lease: another (up-to-date) copy of the volume's
    // database opens at once.
    let (db, config) = copy_database(&env, "copy", Duration::from_secs(30));
    open_at(&db, config, raw_backend(&env))
        .await
        .expect("released")
        .shutdown()
        .await
        .expect("shutdown");
}

/// A copy of a volume's database that another copy wrote past (it took the lease after the
/// copy was made) is out of date: its files may point to objects deleted since. It is
/// refused even when the lease was released, unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_date_copy_of_the_database_is_refused_even_after_a_release() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(95, 1000)).await.expect("write");
    cache.shutdown().await.expect("shutdown");
    let (db, config) = copy_database(&env, "old-copy", Duration::from_secs(30));
    // The original goes on: it changes the block (the old object is deleted) and stops.
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(96, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    cache
        .shutdown()
        .await
        .expect("shutdown, releasing the lease");
    let message = refusal(open_at(&db, config.clone(), raw_backend(&env)).await);
    assert!(
        message.contains("this copy is out of date") && message.contains("--force-takeover"),
        "{message}"
    );
    let mut forced = config;
    forced.force_takeover = true;
    open_at(&db, forced, raw_backend(&env))
        .await
        .expect("forced")
        .shutdown()
        .await
        .expect("shutdown");
}

/// A database from before volume records whose objects are in the store, started on a
/// store that holds none (wrong prefix, file system not mounted), is refused: adopting that
/// store would bind the volume to the wrong place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_database_is_not_adopted_by_an_empty_store() {
    let env = Env::linked();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(97, 1000)).await.expect("write");
    cache.shutdown().await.expect("shutdown");
    {
        let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db_path().display()))
            .await
            .expect("db");
        sqlx::query("DELETE FROM volume WHERE key IN ('store_volume', 'lease_epoch')")
            .execute(&db)
            .await
            .expect("as before records");
        db.close().await;
    }
    let away = env.dir.path().join("store-away");
    std::fs::rename(env.store_dir(), &away).expect("unmount the store");
    std::fs::remove_file(away.join("volume")).expect("no record yet");
    let message = refusal(env.try_open(env.config()).await);
    assert!(message.contains("the store holds none"), "{message}");
    assert!(!env.store_dir().exists(), "no store directory created");
    std::fs::rename(&away, env.store_dir()).expect("mount it again");
    let cache = env.open().await;
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1000).await.expect("read"),
        data(97, 1000)
    );
    cache.shutdown().await.expect("shutdown");
}

/// Whether a lease expired is decided by the store's stamps alone: the holder's own clock
/// (its record's `since`, written by a host whose clock may be off by hours) plays no part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_is_told_by_the_store_clock_not_the_holders() {
    let env = Env::new();
    let first = env.open().await;
    first.write(1, 0, 0, &data(70, 1000)).await.expect("write");
    first.flush().await.expect("flush");
    drop(first);
    let lease = files_under(&env.store_dir().join("lease"))
        .into_iter()
        .map(|(p, _)| p)
        .max()
        .expect("a lease object");
    let record = std::fs::read_to_string(&lease).expect("lease");
    // A holder whose clock is a day behind: its record says it took the lease long ago, but
    // the store stamped it just now. It is held.
    let (db, config) = copy_database(&env, "copy", Duration::from_secs(30));
    let skewed = record.replace(
        &record[record.find("\"since\": \"").expect("since") + 10..][..20],
        "2000-01-01T00:00:00Z",
    );
    std::fs::write(&lease, &skewed).expect("rewrite");
    let message = refusal(open_at(&db, config.clone(), raw_backend(&env)).await);
    assert!(message.contains("since 2000-01-01"), "{message}");
    // The same record, stamped by the store an hour ago: expired, whatever it says.
    let file = std::fs::File::options()
        .write(true)
        .open(&lease)
        .expect("open");
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expect("stamp");
    drop(file);
    let second = open_at(&db, config, raw_backend(&env))
        .await
        .expect("an expired lease is taken over");
    second.clear().await.expect("clear");
    assert_eq!(
        second.read(1, 0, 0, 1000).await.expect("read"),
        data(70, 1000)
    );
    second.shutdown().await.expect("shutdown");
}

/// A lease that lapsed while the store did not answer is taken again (the next epoch) as
/// soon as it answers, if no one else took it: a flush then goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_is_taken_again_once_the_store_answers() {
    let env = Env::new();
    let ttl = Duration::from_secs(2);
    let mut config = env.config();
    config.lease_ttl = ttl;
    let cache = env.open_with(config).await;
    cache.write(1, 0, 0, &data(80, 1000)).await.expect("write");
    env.faults.every_key(true);
    env.faults.fail_fraction(Op::List, 1.0);
    until_lease_lapsed(&cache).await;
    let err = cache.flush().await.expect_err("lapsed");
    assert!(
        blockcache_backend::chain(&err).contains("lease could not be renewed"),
        "{err}"
    );
    env.faults.fail_fraction(Op::List, 0.0);
    cache.flush().await.expect("taken again by the flush");
    assert_eq!(cache.lease_state(), Some((2, None)));
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 0, 0, 1000).await.expect("read"),
        data(80, 1000)
    );
    cache.shutdown().await.expect("shutdown");
}

/// Nothing at all is written under a store directory's path once it is gone: not the
/// lease's renewals, nor its release at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_directory_that_went_away_gets_no_lease_writes_either() {
    let env = Env::linked();
    let mut config = env.config();
    config.lease_ttl = Duration::from_secs(2);
    let cache = env.open_with(config).await;
    cache.write(1, 0, 0, &data(90, 1000)).await.expect("write");
    cache.flush().await.expect("flush");
    let away = env.dir.path().join("store-away");
    std::fs::rename(env.store_dir(), &away).expect("move the store away");
    // Renewals come and go (every half second) until the lease lapses, and shutdown
    // releases it.
    until_lease_lapsed(&cache).await;
    cache.shutdown().await.expect("nothing was dirty");
    assert!(
        !env.store_dir().exists(),
        "the store directory was recreated"
    );
}
