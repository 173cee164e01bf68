//! Bad inputs: each gets a clear error naming what was wrong, and nothing stored is lost.

use blockcache::{Config, Error};
use blockcache_tests::{Env, data};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_past_the_block_size() {
    let env = Env::new();
    let cache = env.open().await;
    cache
        .write(1, 0, 0, &data(1, 1024))
        .await
        .expect("a full block fits");
    for (offset, len) in [(1024, 1), (1000, 25), (u64::MAX, 1)] {
        let err = cache
            .write(1, 0, offset, &vec![0; len])
            .await
            .expect_err("past the end");
        assert!(
            matches!(
                err,
                Error::OutOfRange {
                    inode: 1,
                    blockno: 0,
                    block_size: 1024,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("offset {offset}")),
            "{err}"
        );
    }
    let err = cache
        .read(1, 0, 1025, 1)
        .await
        .expect_err("read past the end");
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    let err = cache
        .block(1, 0)
        .await
        .expect("handle")
        .truncate(1025)
        .await
        .expect_err("too long");
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    assert_eq!(
        cache.read(1, 0, 0, 1024).await.expect("read"),
        data(1, 1024),
        "unchanged"
    );
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_i64_and_writes_through_read_handles() {
    let env = Env::new();
    let cache = env.open().await;
    let err = cache
        .write(u64::MAX, 0, 0, b"x")
        .await
        .expect_err("inode too big");
    assert!(
        matches!(
            err,
            Error::InvalidKey {
                inode: u64::MAX,
                blockno: 0
            }
        ),
        "{err}"
    );
    let err = cache
        .read(0, 1 << 63, 0, 1)
        .await
        .expect_err("block too big");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let err = cache
        .remove(u64::MAX, 0..1)
        .await
        .expect_err("inode too big");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let mut h = cache.block_for_read(1, 1).await.expect("handle");
    let err = h.write(0, b"x").await.expect_err("read-only");
    assert!(err.to_string().contains("read-only"), "{err}");
    drop(h);
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_named() {
    let env = Env::new();
    type Change = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|c| c.block_size = 0), "block_size"),
        (Box::new(|c| c.max_bytes = 100), "max_bytes"),
        (Box::new(|c| c.max_dirty_bytes = 10), "max_dirty_bytes"),
        (Box::new(|c| c.upload_tasks = 0), "upload_tasks"),
    ];
    for (change, name) in cases {
        let mut config = env.config();
        change(&mut config);
        let err = env.try_open(config).await.expect_err(name);
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    let cache = env.open().await;
    let err = cache
        .set_limits(blockcache::Limits {
            max_bytes: 1,
            ..cache.config().limits()
        })
        .await
        .expect_err("limit below the block size");
    assert!(err.to_string().contains("max_bytes"), "{err}");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_cannot_change() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, b"kept").await.expect("write");
    cache.shutdown().await.expect("shutdown");
    let mut config = env.config();
    config.block_size = 2048;
    let err = env.try_open(config).await.expect_err("other block size");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains("1024") && chain.contains("2048"), "{chain}");
    let cache = env.open().await;
    assert_eq!(&cache.read(1, 0, 0, 4).await.expect("read")[..], b"kept");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_cache_directory() {
    let env = Env::new();
    let not_a_dir = env.dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").expect("write");
    let mut config = env.config();
    config.cache_dir = not_a_dir.join("cache");
    let err = env.try_open(config).await.expect_err("not a directory");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_engine_on_the_same_cache_directory_is_refused() {
    let env = Env::new();
    let cache = env.open().await;
    let err = env.try_open(env.config()).await.expect_err("in use");
    assert!(blockcache_tests::is_in_use(&err), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    cache.shutdown().await.expect("shutdown");
    env.open().await.shutdown().await.expect("free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_clean_cache_file_is_detected_and_refetched() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(1, 800)).await.expect("write");
    cache.write(1, 1, 0, &data(2, 800)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    // Bit rot in one clean file, truncation of another, while the engine was down.
    let mut bytes = std::fs::read(env.cache_dir().join("1-0")).expect("read");
    bytes[100] ^= 1;
    std::fs::write(env.cache_dir().join("1-0"), bytes).expect("corrupt");
    std::fs::write(env.cache_dir().join("1-1"), b"short").expect("truncate");
    let cache = env.open().await;
    assert_eq!(cache.read(1, 0, 0, 800).await.expect("read"), data(1, 800));
    assert_eq!(cache.read(1, 1, 0, 800).await.expect("read"), data(2, 800));
    assert_eq!(cache.usage().await.expect("usage").downloads, 2);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_cache_file_is_refused_and_kept() {
    let env = Env::new();
    let cache = env.open().await;
    cache.shutdown().await.expect("shutdown");
    std::fs::write(env.cache_dir().join("1-0.dirty"), vec![1; 4096]).expect("write");
    let err = env.try_open(env.config()).await.expect_err("oversized");
    assert!(
        err.to_string().contains("1-0.dirty") && err.to_string().contains("4096"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(env.cache_dir().join("1-0.dirty"))
            .expect("kept")
            .len(),
        4096
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_files_in_the_cache_directory_are_left_alone() {
    let env = Env::new();
    let cache = env.open().await;
    cache.shutdown().await.expect("shutdown");
    std::fs::write(env.cache_dir().join("notes.txt"), b"mine").expect("write");
    let cache = env.open().await;
    assert_eq!(cache.recovery().unknown_files.len(), 1);
    cache.shutdown().await.expect("shutdown");
    assert_eq!(
        std::fs::read(env.cache_dir().join("notes.txt")).expect("kept"),
        b"mine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_urls() {
    for url in ["ftp://host/x", "file://relative/path", "nonsense"] {
        let err = blockcache_backend::Backend::from_url(url).expect_err(url);
        assert!(err.to_string().contains("invalid store URL"), "{err}");
    }
}
