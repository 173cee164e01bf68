//! The daemon and its object store: what an answer promises about the store (a PUT with
//! `durability=store`, a cache drop), checked by killing the daemon and deleting its cache
//! directory; and 502 when the store fails.

use blockcache_tests::daemon::Daemon;
use blockcache_tests::data;
use reqwest::StatusCode;

const BS: usize = 64 * 1024;
/// No background uploads: only what a request asks for reaches the store.
const ARGS: &[&str] = &["--block-size", "64KiB", "--upload-delay", "off"];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// SIGKILL, then the cache directory is deleted: what survives is what the store holds.
fn kill_and_lose_the_cache(d: Daemon, data_dir: &std::path::Path) {
    d.kill9();
    let cache = data_dir.join("cache");
    std::fs::remove_dir_all(&cache).expect("delete the cache directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_store_durability_is_in_the_store_when_answered() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(11, 5 * BS + 99);
    let r = d
        .http
        .put(d.url("/v1/files/kept?durability=store"))
        .body(content.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::CREATED);
    kill_and_lose_the_cache(d, dir.path());
    let d = Daemon::start(dir.path(), ARGS);
    let (status, body) = d.get("kept").await;
    assert_eq!(status, 200, "{}", d.log_text());
    assert!(body == content, "other bytes came back");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_drop_uploads_dirty_data_first() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(12, 4 * BS + 5);
    let r = d
        .http
        .put(d.url("/v1/files/dirty?durability=none"))
        .body(content.clone())
        .send()
        .await
        .expect("PUT");
    assert!(r.status().is_success());
    assert_eq!(d.json("/v1/stats").await["dirty"]["entries"], 5);
    let s = d.post("/v1/cache/drop").await;
    assert_eq!(
        (s["cache"]["entries"].as_u64(), s["dirty"]["bytes"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    kill_and_lose_the_cache(d, dir.path());
    let d = Daemon::start(dir.path(), ARGS);
    let (status, body) = d.get("dirty").await;
    assert_eq!(status, 200, "{}", d.log_text());
    assert!(body == content, "other bytes came back");
    d.stop();
}

/// Asserts that `r` is a 502 with the store error code.
async fn assert_store_error(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{what}");
    let v: serde_json::Value = r.json().await.expect("json error body");
    assert_eq!(v["error"], "store_error", "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("upload")),
        "{what}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_answer_502_and_lose_nothing() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let before = data(13, 2 * BS);
    assert!(d.put("before", before.clone()).await.status().is_success());
    d.post("/v1/flush").await;
    // The store breaks: its directory is moved away and a plain file takes its place, so
    // that every upload fails (for any user, root included) until it comes back.
    let store = dir.path().join("store");
    let away = dir.path().join("store.away");
    std::fs::rename(&store, &away).expect("move the store away");
    std::fs::write(&store, b"not a directory").expect("file in the store's place");

    let during = data(14, 3 * BS + 1);
    let r = d
        .http
        .put(d.url("/v1/files/during?durability=store"))
        .body(during.clone())
        .send()
        .await
        .expect("PUT");
    assert_store_error(r, "PUT ?durability=store").await;
    let other = data(15, BS + 3);
    let r = d
        .http
        .put(d.url("/v1/files/other?durability=local"))
        .body(other.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "a local write needs no store"
    );
    let r = d.http.post(d.url("/v1/flush")).send().await.expect("POST");
    assert_store_error(r, "POST /v1/flush").await;
    let r = d
        .http
        .post(d.url("/v1/cache/drop"))
        .send()
        .await
        .expect("POST");
    assert_store_error(r, "POST /v1/cache/drop").await;

    // The store comes back: everything acknowledged reaches it, and survives the cache.
    std::fs::remove_file(&store).expect("remove the file");
    std::fs::rename(&away, &store).expect("bring the store back");
    d.post("/v1/flush").await;
    assert_eq!(d.get("before").await.1, before);
    assert_eq!(d.get("other").await.1, other);
    kill_and_lose_the_cache(d, dir.path());
    let d = Daemon::start(dir.path(), ARGS);
    assert_eq!(d.get("before").await.1, before);
    assert_eq!(d.get("other").await.1, other);
    // The PUT that failed left no file behind.
    assert_eq!(d.get("during").await.0, 404);
    d.stop();
}
