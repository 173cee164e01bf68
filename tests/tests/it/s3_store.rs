//! The library and the daemon against a real S3 server (moto's, on loopback): round trips,
//! dedup, flush, cold reads, restart, the volume's refusals and lease, encryption, and
//! SIGKILL during uploads. Each test skips, saying why, where moto is not installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockcache::{BlockCache, Config, Error, Secret};
use blockcache_backend::faulty::{Faults, FaultyStore, Op};
use blockcache_backend::format::{Compression, Key};
use blockcache_backend::{Backend, RetryPolicy};
use blockcache_db::Db;
use blockcache_tests::daemon::Launch;
use blockcache_tests::moto::{self, Moto};
use blockcache_tests::{data, test_seed, within};

const BUCKET: &str = "lib";

fn moto_or_skip(test: &str) -> Option<(tempfile::TempDir, Moto)> {
    if let Some(reason) = moto::unavailable() {
        eprintln!("{test}: skipped: {reason}");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    Some((dir, moto))
}

/// One data directory (database and cache) of a volume in the bucket.
struct Volume {
    dir: PathBuf,
    store: Arc<dyn object_store::ObjectStore>,
    faults: Faults,
}

impl Volume {
    fn new(root: &Path, name: &str, moto: &Moto) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let (store, faults) = FaultyStore::new(moto.store(BUCKET));
        faults.seed(test_seed());
        Self { dir, store, faults }
    }

    fn config(&self) -> Config {
        let mut c = Config::new(self.dir.join("cache"));
        c.block_size = 4096;
        c.upload_delay = None;
        c.shutdown_grace = Duration::from_secs(10);
        c
    }

    fn backend(&self) -> Backend {
        Backend::new(self.store.clone(), object_store::path::Path::from("vol")).with_retry(
            RetryPolicy {
                max_attempts: 5,
                initial_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(100),
                warn_after: 3,
                deadline: Duration::from_secs(60),
                probe_interval: Duration::ZERO,
            },
        )
    }

    async fn open_with(&self, config: Config) -> blockcache::Result<BlockCache> {
        let db = Db::open(self.dir.join("meta.db").to_str().expect("utf-8")).await?;
        BlockCache::open(config, db, self.backend()).await
    }

    async fn open(&self) -> BlockCache {
        self.open_with(self.config()).await.expect("open")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_round_trip_through_s3_with_dedup_cold_reads_and_restarts() {
    let Some((dir, moto)) = moto_or_skip("blocks_round_trip_through_s3") else {
        return;
    };
    moto.create_bucket(BUCKET).await;
    let v = Volume::new(dir.path(), "a", &moto);
    let cache = v.open().await;
    // 12 blocks, 4 distinct contents.
    for b in 0..12u64 {
        cache
            .write(1, b, 0, &data(b % 4, 4096))
            .await
            .expect("write");
    }
    cache.flush().await.expect("flush");
    assert_eq!(
        v.faults.calls(Op::Put),
        4,
        "one upload per distinct content"
    );
    cache.clear().await.expect("clear");
    for b in 0..12u64 {
        assert_eq!(
            cache.read(1, b, 0, 4096).await.expect("read"),
            data(b % 4, 4096)
        );
    }
    // One download per object: the other blocks share the cached copy.
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        (
            usage.downloads,
            usage.download_dedup_hits,
            usage.dedup_savings
        ),
        (4, 8, 8 * 4096)
    );
    assert_eq!(v.faults.calls(Op::Get), 4, "one GET per object");
    cache.shutdown().await.expect("shutdown");
    // After a restart (the next epoch), old objects read back and new ones get new keys.
    let cache = v.open().await;
    cache.write(2, 0, 0, &data(9, 4096)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(
        cache.read(1, 5, 0, 4096).await.expect("read"),
        data(1, 4096)
    );
    assert_eq!(
        cache.read(2, 0, 0, 4096).await.expect("read"),
        data(9, 4096)
    );
    cache.shutdown().await.expect("shutdown");
    let keys = moto.keys(BUCKET, "vol/").await;
    assert!(keys.iter().any(|k| k == "vol/volume"), "{keys:?}");
    let ids: Vec<u64> = keys
        .iter()
        .filter(|k| k.starts_with("vol/data/"))
        .filter_map(|k| k.rsplit('/').next()?.parse().ok())
        .collect();
    let epochs: std::collections::BTreeSet<u64> = ids.iter().map(|id| id >> 40).collect();
    assert_eq!((ids.len(), epochs.len()), (5, 2), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_volume_and_a_second_writer_are_refused_on_s3() {
    let Some((dir, moto)) = moto_or_skip("a_second_volume_and_a_second_writer") else {
        return;
    };
    moto.create_bucket(BUCKET).await;
    let a = Volume::new(dir.path(), "a", &moto);
    let first = a.open().await;
    first.write(1, 0, 0, &data(1, 4096)).await.expect("write");
    first.flush().await.expect("flush");
    let b = Volume::new(dir.path(), "b", &moto);
    match b.open_with(b.config()).await {
        Err(Error::VolumeRefused(m)) => {
            assert!(m.contains("the store holds volume"), "{m}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second volume opened on the bucket"),
    }
    // A copy of the first one's database: the same volume, another writer.
    let c = Volume::new(dir.path(), "c", &moto);
    std::fs::copy(a.dir.join("meta.db"), c.dir.join("meta.db")).expect("copy");
    for suffix in ["-wal", "-shm"] {
        let from = a.dir.join(format!("meta.db{suffix}"));
        if from.exists() {
            std::fs::copy(from, c.dir.join(format!("meta.db{suffix}"))).expect("copy");
        }
    }
    match c.open_with(c.config()).await {
        Err(Error::VolumeRefused(m)) => assert!(m.contains("is held by pid"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second writer opened"),
    }
    first.clear().await.expect("clear");
    assert_eq!(
        first.read(1, 0, 0, 4096).await.expect("read"),
        data(1, 4096)
    );
    first.shutdown().await.expect("shutdown");
    // Released at shutdown: the copy takes it at once.
    c.open().await.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volume_on_s3_holds_no_plaintext() {
    let Some((dir, moto)) = moto_or_skip("an_encrypted_volume_on_s3") else {
        return;
    };
    moto.create_bucket(BUCKET).await;
    let v = Volume::new(dir.path(), "a", &moto);
    let key = Arc::new(Key::generate());
    let mut config = v.config();
    config.compression = Compression::default();
    config.encryption = Some(Secret::Key(Arc::clone(&key)));
    let cache = v.open_with(config.clone()).await.expect("open");
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    cache.write(1, 0, 0, &text).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(cache.read(1, 0, 0, 4096).await.expect("read"), text);
    cache.shutdown().await.expect("shutdown");
    for k in moto.keys(BUCKET, "vol/data/").await {
        let stored = moto.object(BUCKET, &k).await;
        assert!(stored.starts_with(b"BCOB"), "{k}");
        assert!(
            !stored.windows(16).any(|w| text.windows(16).any(|t| t == w)),
            "{k}"
        );
    }
    let mut wrong = config.clone();
    wrong.encryption = Some(Secret::Key(Arc::new(Key::generate())));
    match v.open_with(wrong).await {
        Err(Error::VolumeRefused(m)) => assert!(m.contains("not the key of volume"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a wrong key opened the volume"),
    }
}

/// The daemon on a bucket is SIGKILLed while it uploads; after a restart, every write it
/// acknowledged reads back, from the bucket once the cache is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_uploads_to_s3_loses_no_acknowledged_write() {
    let Some((dir, moto)) = moto_or_skip("sigkill_during_uploads_to_s3") else {
        return;
    };
    moto.create_bucket(BUCKET).await;
    let launch = || {
        let mut l = Launch::new(&dir.path().join("data"))
            .unset_env("AWS_")
            .args(&[
                "--store",
                &format!("s3://{BUCKET}/daemon"),
                "--block-size",
                "64KiB",
                "--upload-delay",
                "off",
            ]);
        for (k, v) in moto.env() {
            l = l.env(k, &v);
        }
        l
    };
    let mut written = Vec::new();
    for round in 0..3u64 {
        let d = launch().start();
        for i in 0..6u64 {
            let name = format!("r{round}-f{i}");
            let body = data(round * 100 + i, 200_000 + (i as usize) * 7000);
            let r = d.put(&name, body.clone()).await;
            assert!(r.status().is_success(), "PUT {name}: {}", r.status());
            written.push((name, body));
        }
        // Uploads are under way (no upload delay): kill it in the middle of them.
        let flush = {
            let http = d.http.clone();
            let url = d.url("/v1/flush");
            tokio::spawn(async move { http.post(url).send().await })
        };
        // Killed once a few uploads (more each round) are done and others under way.
        let target = 1 + 3 * round;
        within("uploads under way", Duration::from_secs(60), async {
            while d.json("/v1/stats").await["counters"]["uploads"].as_u64() < Some(target)
                && !flush.is_finished()
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        d.kill9();
        let _ = flush.await;
    }
    let d = launch().start();
    d.post("/v1/flush").await;
    d.post("/v1/cache/drop").await;
    for (name, body) in &written {
        assert_eq!(&d.get(name).await, &(200, body.clone()), "{name}");
    }
    d.stop();
}
