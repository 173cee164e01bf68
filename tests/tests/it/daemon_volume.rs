//! The daemon and its volume: one daemon per volume whatever its directories, a cache
//! directory of another volume, cache files changed behind its back, and full disks (the
//! cache's or the database's) that it recovers from without a restart.

use std::time::Duration;

use blockcache_tests::daemon::Daemon;
use blockcache_tests::tmpfs::Tmpfs;
use blockcache_tests::{data, within};

const MIB: usize = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A tmpfs of `size`, or `None` with the reason printed.
fn tmpfs(size: &str) -> Option<Tmpfs> {
    Tmpfs::mount(size)
        .inspect_err(|why| eprintln!("skipped: {why}"))
        .ok()
}

/// The block files of a cache directory.
fn block_files(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache)
        .expect("list cache")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_one_database_is_refused_whatever_its_cache_directory() {
    let dir = tmp();
    let first = Daemon::start(dir.path(), &[]);
    let other_cache = dir.path().join("other-cache");
    let log = Daemon::try_start(
        dir.path(),
        &["--cache-dir", other_cache.to_str().expect("utf-8")],
    )
    .err()
    .expect("a second daemon on the same database");
    assert!(
        log.contains("meta.db.lock") && log.contains(&format!("pid {}", first.pid())),
        "the refusal names the lock and the first daemon: {log}"
    );
    // The first daemon is unharmed.
    assert_eq!(first.put("f", data(1, 3000)).await.status().as_u16(), 201);
    assert_eq!(first.get("f").await, (200, data(1, 3000)));
    first.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_of_another_database_is_refused() {
    let a = tmp();
    let d = Daemon::start(a.path(), &["--upload-delay", "off"]);
    assert_eq!(d.put("f", data(2, 3 * MIB)).await.status().as_u16(), 201);
    // Killed with its blocks dirty in the cache directory (acknowledged, not uploaded).
    d.kill9();
    let b = tmp();
    let cache = a.path().join("cache");
    let log = Daemon::try_start(b.path(), &["--cache-dir", cache.to_str().expect("utf-8")])
        .err()
        .expect("another database with this cache directory");
    assert!(
        log.contains("belongs to") && log.contains("not yet uploaded"),
        "{log}"
    );
    // The owner still finds its file whole.
    let d = Daemon::start(a.path(), &["--upload-delay", "off"]);
    assert_eq!(d.get("f").await, (200, data(2, 3 * MIB)));
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_cache_file_changed_on_disk_is_not_served() {
    let dir = tmp();
    // A store in memory: its objects are not hard links to the cache files (which a local
    // store on the same disk would be, so that changing one would change the other).
    let d = Daemon::start(
        dir.path(),
        &["--store", "memory://", "--block-size", "64KiB"],
    );
    let content = data(3, 300_000);
    assert_eq!(d.put("f", content.clone()).await.status().as_u16(), 201);
    d.post("/v1/flush").await;
    assert_eq!(d.get("f").await, (200, content.clone()));
    let cache = dir.path().join("cache");
    let files = block_files(&cache);
    assert_eq!(files.len(), 5, "{files:?}");
    // Each file may still get its clean name meanwhile (changed under either), so its
    // length comes from its block number, not from a `stat` of the name listed.
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).expect("name");
        let blockno: usize = name
            .trim_end_matches(".dirty")
            .rsplit('-')
            .next()
            .and_then(|b| b.parse().ok())
            .expect("a block file name");
        let len = (300_000 - blockno * 65_536).min(65_536);
        crate::volume::alter_on_disk(f, &vec![0x5a; len]);
    }
    let (status, body) = d.get("f").await;
    assert_eq!(status, 200);
    assert!(body == content, "altered cache files were served");
    assert!(d.log_text().contains("does not match its metadata"));
    d.stop();
}

/// Waits until `GET /healthz` answers `status`.
async fn wait_health(d: &Daemon, status: u16) -> String {
    within("/healthz to answer", Duration::from_secs(20), async {
        loop {
            let r = d.http.get(d.url("/healthz")).send().await.expect("GET");
            let got = r.status().as_u16();
            let text = r.text().await.expect("body");
            if got == status {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// ENOSPC in the middle of a PUT, with the database on the same full disk: the PUT fails
/// with the full disk as its cause, health says so, and once there is room again later PUTs
/// and flushes succeed without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_put_and_later_puts_succeed_once_space_is_back() {
    let Some(fs) = tmpfs("16m") else {
        return;
    };
    let store = tmp();
    let store_url = format!("file://{}", store.path().display());
    let d = Daemon::start(fs.path(), &["--store", &store_url, "--upload-delay", "off"]);
    assert_eq!(
        d.put("small", data(4, 100_000)).await.status().as_u16(),
        201
    );
    fs.fill("ballast");
    let r = d.put("big", data(5, 6 * MIB)).await;
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    assert_eq!(status, 507, "{text}");
    assert!(
        text.contains("No space left"),
        "the full disk is the cause: {text}"
    );
    let health = wait_health(&d, 503).await;
    assert!(health.contains("unhealthy"), "{health}");
    std::fs::remove_file(fs.path().join("ballast")).expect("free the space");
    wait_health(&d, 200).await;
    for i in 0..3 {
        let content = data(10 + i, 2 * MIB + 5);
        let name = format!("after-{i}");
        assert_eq!(d.put(&name, content.clone()).await.status().as_u16(), 201);
        d.post("/v1/flush").await;
        assert_eq!(d.get(&name).await, (200, content));
    }
    assert_eq!(d.get("small").await, (200, data(4, 100_000)));
    d.stop();
}

/// The cache's disk is full (of clean blocks and another file): reads of stored files evict
/// clean blocks to make room instead of failing mid-body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_full_cache_disk_evict_clean_blocks() {
    let Some(fs) = tmpfs("8m") else {
        return;
    };
    let dir = tmp();
    let cache = fs.path().join("cache");
    let d = Daemon::start(
        dir.path(),
        &[
            "--cache-dir",
            cache.to_str().expect("utf-8"),
            "--upload-delay",
            "off",
        ],
    );
    let a = data(6, 5 * MIB);
    let b = data(7, 2 * MIB + 7);
    assert_eq!(d.put("a", a.clone()).await.status().as_u16(), 201);
    assert_eq!(d.put("b", b.clone()).await.status().as_u16(), 201);
    d.post("/v1/flush").await;
    d.post("/v1/cache/drop").await;
    // `a` is cached (clean), then the rest of the disk is taken by someone else.
    assert_eq!(d.get("a").await, (200, a.clone()));
    fs.fill("ballast");
    assert_eq!(d.get("b").await, (200, b), "{}", d.log_text());
    assert!(d.log_text().contains("evicting clean blocks"));
    assert_eq!(d.get("a").await, (200, a));
    d.stop();
}
