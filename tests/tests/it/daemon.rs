//! The daemon: the real `blockcache` binary on a free port, spoken to over real HTTP, stopped
//! with SIGTERM and killed with SIGKILL.

use std::sync::Arc;
use std::time::Duration;

use blockcache_tests::daemon::{Daemon, run_cli};
use blockcache_tests::data;
use reqwest::StatusCode;

/// Small blocks keep the tests quick and still span many blocks.
const BS: usize = 64 * 1024;
const ARGS: &[&str] = &["--block-size", "64KiB", "--upload-delay", "off"];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_ranges_etags_and_head() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    for (name, len) in [
        ("empty", 0),
        ("one", BS),
        ("many/blocks", 5 * BS + 17),
        ("odd", 12345),
    ] {
        let content = data(len as u64, len);
        let r = d.put(name, content.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
        let (status, body) = d.get(name).await;
        assert_eq!(status, 200);
        assert_eq!(body, content, "{name}");
    }
    // A replacement answers 200 and changes the ETag.
    let first = d
        .http
        .head(d.url("/v1/files/odd"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["content-length"], "12345");
    let etag = first.headers()["etag"].to_str().expect("etag").to_owned();
    assert!(first.headers().contains_key("last-modified"));
    let r = d
        .http
        .get(d.url("/v1/files/odd"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(d.put("odd", data(7, 12345)).await.status(), StatusCode::OK);
    let r = d
        .http
        .get(d.url("/v1/files/odd"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["etag"].to_str().expect("etag"), etag);

    // Ranges at block edges.
    let content = data((5 * BS + 17) as u64, 5 * BS + 17);
    let size = content.len();
    for (spec, lo, hi) in [
        (format!("bytes={}-{}", BS - 1, BS), BS - 1, BS + 1),
        (format!("bytes={}-", 5 * BS), 5 * BS, size),
        ("bytes=-20".to_owned(), size - 20, size),
        (format!("bytes=0-{}", 10 * BS), 0, size),
        (format!("bytes={}-{}", 2 * BS, 3 * BS - 1), 2 * BS, 3 * BS),
    ] {
        let r = d
            .http
            .get(d.url("/v1/files/many/blocks"))
            .header("Range", &spec)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{spec}");
        assert_eq!(
            r.headers()["content-range"]
                .to_str()
                .expect("content-range"),
            format!("bytes {lo}-{}/{size}", hi - 1)
        );
        assert_eq!(
            &r.bytes().await.expect("body")[..],
            &content[lo..hi],
            "{spec}"
        );
    }
    for spec in [format!("bytes={size}-"), "bytes=-0".to_owned()] {
        let r = d
            .http
            .get(d.url("/v1/files/many/blocks"))
            .header("Range", &spec)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{spec}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes */{size}").as_str()
        );
    }
    for spec in ["bytes=5-2", "items=0-1", "bytes=0-1,4-5", "bytes=x-"] {
        let r = d
            .http
            .get(d.url("/v1/files/many/blocks"))
            .header("Range", spec)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{spec}");
    }
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_truncate_delete_list_and_status() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    d.put("f", b"hello".to_vec()).await;
    let r = d
        .http
        .patch(d.url("/v1/files/f?offset=3"))
        .body("LO world")
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status(), StatusCode::OK);
    let r = d
        .http
        .patch(d.url(&format!("/v1/files/f?offset={}", BS + 10)))
        .body("!")
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status(), StatusCode::OK);
    let (_, body) = d.get("f").await;
    let mut want = b"helLO world".to_vec();
    want.resize(BS + 10, 0);
    want.push(b'!');
    assert_eq!(body, want);
    let r = d
        .http
        .post(d.url("/v1/files/f?truncate=4"))
        .send()
        .await
        .expect("truncate");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(d.get("f").await.1, b"helL");
    // The status route, and a file whose last segment is "status" through an encoded '/'.
    let s = d.json("/v1/files/f/status").await;
    assert_eq!(s["file"]["size"], 4);
    assert_eq!(s["in_store"], false);
    d.post("/v1/flush?name=f").await;
    let s = d.json("/v1/files/f/status").await;
    assert_eq!(
        (s["in_store"].as_bool(), s["dirty"].as_u64()),
        (Some(true), Some(0))
    );
    d.put("dir%2Fstatus", b"named status".to_vec()).await;
    assert_eq!(d.get("dir%2Fstatus").await.1, b"named status");
    assert_eq!(
        d.json("/v1/files/dir/status/status").await["file"]["name"],
        "dir/status"
    );
    // Listing in pages.
    for i in 0..7 {
        d.put(&format!("list/{i}"), vec![i; 10]).await;
    }
    let page = d.json("/v1/files?prefix=list/&limit=4").await;
    assert_eq!(page["files"].as_array().expect("files").len(), 4);
    let next = page["next"].as_str().expect("next").to_owned();
    let page = d
        .json(&format!("/v1/files?prefix=list/&limit=4&after={next}"))
        .await;
    let names: Vec<&str> = page["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["list/4", "list/5", "list/6"]);
    assert!(page["next"].is_null());
    // Delete.
    let r = d
        .http
        .delete(d.url("/v1/files/f"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(d.get("f").await.0, 404);
    let r = d
        .http
        .delete(d.url("/v1/files/f"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_error_and_change_nothing() {
    let dir = tmp();
    let d = Daemon::start(
        dir.path(),
        &["--block-size", "64KiB", "--max-file-size", "200KiB"],
    );
    let kept = data(1, 100_000);
    d.put("kept", kept.clone()).await;
    let long = "a".repeat(1025);
    type Case = (
        reqwest::Method,
        String,
        Option<Vec<u8>>,
        StatusCode,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            reqwest::Method::PUT,
            "/v1/files/a//b".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/a%2F..%2Fb".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/a%00b".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/a%0Ab".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/%FF".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/files/{long}"),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/kept/".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_name",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/kept?durability=forever".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/kept?colour=red".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/kept".into(),
            Some(vec![0; 300 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            reqwest::Method::PATCH,
            "/v1/files/kept".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::PATCH,
            "/v1/files/kept?offset=-1".into(),
            Some(vec![1]),
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::PATCH,
            "/v1/files/kept?offset=204800".into(),
            Some(vec![1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            reqwest::Method::PATCH,
            "/v1/files/missing?offset=0".into(),
            Some(vec![1]),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::POST,
            "/v1/files/kept".into(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::POST,
            "/v1/files/kept?truncate=abc".into(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::POST,
            "/v1/files/kept?truncate=999999999".into(),
            None,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            reqwest::Method::GET,
            "/v1/files?limit=0".into(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::GET,
            "/v1/files?limit=x".into(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_parameter",
        ),
        (
            reqwest::Method::GET,
            "/v1/files/missing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::POST,
            "/v1/flush?name=missing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::GET,
            "/v1/nothing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::DELETE,
            "/v1/stats".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            reqwest::Method::PUT,
            "/v1/files/kept/status".into(),
            Some(vec![1]),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let mut r = d.http.request(method.clone(), d.url(&path));
        if let Some(b) = body {
            r = r.body(b);
        }
        let r = r.send().await.expect("request");
        assert_eq!(r.status(), status, "{method} {path}");
        let v: serde_json::Value = r.json().await.expect("json error body");
        assert_eq!(v["error"], code, "{method} {path}: {v}");
        assert!(!v["message"].as_str().expect("message").is_empty());
    }
    // A body without a length that grows past the maximum: 413 and the old version stays.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|_| Ok(vec![7u8; 64 * 1024])).collect();
    let r = d
        .http
        .put(d.url("/v1/files/kept"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(d.get("kept").await.1, kept);
    let files = d.json("/v1/files").await;
    assert_eq!(files["files"].as_array().expect("files").len(), 1);
    d.post("/v1/flush").await;
    let stats = d.json("/v1/stats").await;
    assert_eq!(
        stats["store"]["logical_bytes"], 100_000,
        "no garbage left: {stats}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_readers_see_whole_versions() {
    let dir = tmp();
    let d = Arc::new(Daemon::start(dir.path(), ARGS));
    let versions: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..4)
            .map(|i| data(100 + i, 3 * BS + 1000 * i as usize))
            .collect(),
    );
    d.put("shared", versions[0].clone()).await;
    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let (d, versions) = (d.clone(), versions.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..6 {
                let v = versions[((w + round) % 4) as usize].clone();
                assert!(d.put("shared", v).await.status().is_success());
                // Each writer also has its own file.
                let own = data(w * 100 + round, 2 * BS + 5);
                assert!(
                    d.put(&format!("own/{w}"), own.clone())
                        .await
                        .status()
                        .is_success()
                );
                assert_eq!(d.get(&format!("own/{w}")).await.1, own);
            }
        }));
    }
    for _ in 0..3 {
        let (d, versions) = (d.clone(), versions.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let (status, body) = d.get("shared").await;
                assert_eq!(status, 200);
                assert!(
                    versions.contains(&body),
                    "a read saw a mix of versions ({} bytes)",
                    body.len()
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let d = Arc::try_unwrap(d).ok().expect("sole owner");
    let files = d.json("/v1/files").await;
    let total: u64 = files["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["size"].as_u64().expect("size"))
        .sum();
    // Every replaced version is removed: a version's removal starts once its last reader
    // has read its last piece, and a flush waits for the removals started before it, so the
    // metadata then holds exactly the live files.
    d.post("/v1/flush").await;
    let stats = d.json("/v1/stats").await;
    assert_eq!(
        stats["store"]["logical_bytes"].as_u64(),
        Some(total),
        "{stats}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_shows_in_stats_and_metrics() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(5, 4 * BS);
    d.put("a", content.clone()).await;
    d.put("b", content.clone()).await;
    d.post("/v1/flush").await;
    let s = d.json("/v1/stats").await;
    assert_eq!(s["store"]["logical_bytes"], 8 * BS as u64);
    assert_eq!(s["store"]["unique_bytes"], 4 * BS as u64);
    // Random bytes do not compress: each object is the block behind its header.
    assert_eq!(
        s["store"]["stored_bytes"],
        4 * (BS + blockcache_backend::format::HEADER_LEN) as u64
    );
    assert_eq!(s["store"]["dedup_ratio"], 2.0);
    assert_eq!(s["counters"]["uploads"], 4);
    let m = d.metrics().await;
    for needle in [
        "blockcache_uploads_total 4",
        "blockcache_store_unique_bytes 262144",
        "blockcache_upload_duration_seconds_bucket",
        "blockcache_oldest_dirty_age_seconds",
        "blockcache_http_requests_total{route=\"/v1/stats\",method=\"GET\",status=\"200\"} 1",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    // Dropping the cache forces downloads on the next read.
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("b").await.1, content);
    assert_eq!(d.json("/v1/stats").await["counters"]["downloads"], 4);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_everything_to_the_store() {
    let dir = tmp();
    let mut files = Vec::new();
    {
        let d = Daemon::start(dir.path(), ARGS);
        for i in 0..6u64 {
            let content = data(i, BS * (i as usize) + 333);
            let r = d
                .http
                .put(d.url(&format!("/v1/files/f{i}?durability=none")))
                .body(content.clone())
                .send()
                .await
                .expect("PUT");
            assert!(r.status().is_success());
            files.push(content);
        }
        assert!(d.json("/v1/stats").await["dirty"]["entries"].as_u64() > Some(0));
        let log = d.stop();
        assert!(log.contains("shut down: flushed"), "{log}");
    }
    // A fresh cache directory: everything must come from the store.
    let fresh = tmp();
    let db = dir.path().join("meta.db");
    let store = format!("file://{}", dir.path().join("store").display());
    let d = Daemon::start(
        fresh.path(),
        &[
            "--block-size",
            "64KiB",
            "--database",
            db.to_str().expect("utf-8"),
            "--store",
            &store,
        ],
    );
    for (i, content) in files.iter().enumerate() {
        assert_eq!(&d.get(&format!("f{i}")).await.1, content, "f{i}");
    }
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_uploads_then_restart_keeps_every_acknowledged_file() {
    let dir = tmp();
    let mut acked = Vec::new();
    {
        // Uploads under way at all times: a dirty budget of four blocks (writers wait for
        // uploads), two upload tasks, and background uploads as soon as possible.
        let d = Daemon::start(
            dir.path(),
            &[
                "--block-size",
                "64KiB",
                "--max-dirty",
                "256KiB",
                "--upload-delay",
                "1ms",
                "--upload-tasks",
                "2",
            ],
        );
        let s = d.json("/v1/stats").await;
        assert_eq!(s["dirty"]["max_bytes"], 4 * BS as u64, "{s}");
        for i in 0..20u64 {
            let content = data(1000 + i, BS * 3 + i as usize * 100);
            let r = d.put(&format!("k/{i}"), content.clone()).await;
            assert!(r.status().is_success());
            acked.push(content);
        }
        // A replacement that is under way when the process dies: its first block has
        // reached the cache, the rest never comes.
        let entries = d.cache_entries().await;
        let (feed, body) = fed_body();
        let pending = tokio::spawn(d.http.put(d.url("/v1/files/k/0")).body(body).send());
        feed.send(vec![9u8; BS]).await.expect("feed");
        d.wait_for_entries(entries).await;
        d.kill9();
        drop(feed);
        assert!(pending.await.expect("join").is_err_or_failed());
    }
    let d = Daemon::start(dir.path(), ARGS);
    for (i, content) in acked.iter().enumerate() {
        let (status, body) = d.get(&format!("k/{i}")).await;
        assert_eq!(status, 200);
        assert_eq!(&body, content, "k/{i}");
    }
    // The unfinished replacement left nothing: the metadata holds exactly the live files.
    d.post("/v1/flush").await;
    let total: usize = acked.iter().map(Vec::len).sum();
    let s = d.json("/v1/stats").await;
    assert_eq!(
        s["store"]["logical_bytes"].as_u64(),
        Some(total as u64),
        "{s}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_on_and_off() {
    let dir = tmp();
    let token = "s3cret-token-value";
    let d = Daemon::start(
        dir.path(),
        &["--block-size", "64KiB", "--auth-token", token],
    );
    let r = d.http.get(d.url("/v1/stats")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["error"],
        "unauthorized"
    );
    let r = d
        .http
        .get(d.url("/v1/stats"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A wrong token is told apart from a missing one.
    let v = r.json::<serde_json::Value>().await.expect("json");
    assert_eq!(v["error"], "wrong_token", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("not the daemon's")),
        "{v}"
    );
    let r = d
        .http
        .put(d.url("/v1/files/x"))
        .body("x")
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = d
        .http
        .get(d.url("/v1/stats"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let r = d.http.get(d.url("/healthz")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    // The CLI takes the token from the environment-free flag.
    let (status, _, err) = run_cli(&["stats", "--listen", d.addr()], None);
    assert!(!status.success());
    assert!(err.contains("401"), "{err}");
    let (status, out, err) = run_cli(
        &["stats", "--listen", d.addr(), "--auth-token", token],
        None,
    );
    assert!(status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out).contains("dirty"));
    let log = d.stop();
    assert!(!log.contains(token), "the token leaked into the log");
    // Without a token every route is open.
    let d = Daemon::start(dir.path(), &["--block-size", "64KiB"]);
    assert_eq!(
        d.http
            .get(d.url("/v1/stats"))
            .send()
            .await
            .expect("GET")
            .status(),
        StatusCode::OK
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_with_the_key_named() {
    let dir = tmp();
    let conf = dir.path().join("bad.toml");
    std::fs::write(&conf, "block-size = \"1MiB\"\ncolour = \"blue\"\n").expect("write");
    let err = Daemon::try_start(dir.path(), &["--config", conf.to_str().expect("utf-8")])
        .err()
        .expect("refused");
    assert!(
        err.contains("colour") && err.contains("block-size"),
        "{err}"
    );
    std::fs::write(&conf, "max-cache-size = \"lots\"\n").expect("write");
    let err = Daemon::try_start(dir.path(), &["--config", conf.to_str().expect("utf-8")])
        .err()
        .expect("refused");
    assert!(
        err.contains("max-cache-size") && err.contains("lots"),
        "{err}"
    );
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--block-size",
            "big",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(!status.success());
    assert!(err.contains("--block-size") && err.contains("big"), "{err}");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(!status.success());
    assert!(
        err.contains("auth token") && err.contains("--insecure"),
        "{err}"
    );
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--durability",
            "maybe",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(!status.success());
    assert!(err.contains("none, local, store"), "{err}");
    // A volume keeps its block size.
    let d = Daemon::start(dir.path(), &["--block-size", "64KiB"]);
    d.put("x", b"kept".to_vec()).await;
    d.stop();
    let err = Daemon::try_start(dir.path(), &["--block-size", "128KiB"])
        .err()
        .expect("refused");
    assert!(err.contains("block size"), "{err}");
    // The settings file sets what flags do not.
    std::fs::write(&conf, "block-size = \"64KiB\"\nmax-file-size = 10\n").expect("write");
    let d = Daemon::start(dir.path(), &["--config", conf.to_str().expect("utf-8")]);
    assert_eq!(d.get("x").await.1, b"kept");
    assert_eq!(
        d.put("y", vec![0; 11]).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_against_a_live_daemon() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let addr = d.addr().to_owned();
    let content = data(77, 3 * BS + 5);
    // Standard input: by default, or as "-".
    let (status, _, err) = run_cli(&["put", "--listen", &addr, "cli/one", "-"], Some(b"first"));
    assert!(status.success(), "{err}");
    let (status, _, err) = run_cli(&["put", "--listen", &addr, "cli/one"], Some(&content));
    assert!(status.success(), "{err}");
    let (status, _, err) = run_cli(&["put", "--listen", &addr, "cli/x", "/no/such/file"], None);
    assert!(!status.success());
    assert!(err.contains("/no/such/file"), "{err}");
    let local = dir.path().join("local.bin");
    std::fs::write(&local, &content[..1000]).expect("write");
    let (status, _, err) = run_cli(
        &[
            "put",
            "--listen",
            &addr,
            "cli/two",
            local.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(status.success(), "{err}");
    let (status, out, err) = run_cli(&["get", "--listen", &addr, "cli/one"], None);
    assert!(status.success(), "{err}");
    assert_eq!(out, content);
    let (status, out, _) = run_cli(&["ls", "--listen", &addr, "--bytes", "cli/"], None);
    assert!(status.success());
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("cli/one")
            && out.contains("cli/two")
            && out.contains(&(3 * BS + 5).to_string()),
        "{out}"
    );
    let (status, out, _) = run_cli(&["flush", "--listen", &addr], None);
    assert!(status.success() && String::from_utf8_lossy(&out).contains("flushed"));
    let (status, _, _) = run_cli(&["drop-cache", "--listen", &addr], None);
    assert!(status.success());
    let (status, out, _) = run_cli(&["stats", "--listen", &addr, "--json"], None);
    assert!(status.success());
    let stats: serde_json::Value = serde_json::from_slice(&out).expect("stats json");
    assert_eq!(stats["cache"]["entries"], 0);
    let (status, _, _) = run_cli(&["rm", "--listen", &addr, "cli/two"], None);
    assert!(status.success());
    let (status, _, err) = run_cli(&["get", "--listen", &addr, "cli/two"], None);
    assert!(!status.success());
    assert!(err.contains("404") && err.contains("cli/two"), "{err}");
    d.stop();
    let (status, _, err) = run_cli(&["stats", "--listen", &addr], None);
    assert!(!status.success());
    assert!(err.contains("cannot reach the daemon"), "{err}");
}

/// A request body the test feeds chunk by chunk.
fn fed_body() -> (tokio::sync::mpsc::Sender<Vec<u8>>, reqwest::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
    });
    (tx, reqwest::Body::wrap_stream(stream))
}

/// A response that is an error or not a success.
trait Failed {
    fn is_err_or_failed(&self) -> bool;
}

impl Failed for reqwest::Result<reqwest::Response> {
    fn is_err_or_failed(&self) -> bool {
        self.as_ref().map_or(true, |r| !r.status().is_success())
    }
}

/// Sends `request` on `conn` and reads what comes back until the daemon closes the
/// connection or 10 s pass: (the answer, empty if none; whether the connection closed).
async fn exchange(conn: &mut tokio::net::TcpStream, request: &str) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A write to a connection the daemon already closed may fail: then nothing came back.
    if conn.write_all(request.as_bytes()).await.is_err() {
        return (String::new(), true);
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer));
    let closed = read.await.is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_request_succeeds_while_draining() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), ARGS);
    // A kept-alive connection, idle after its first request.
    let mut idle = tokio::net::TcpStream::connect(d.addr())
        .await
        .expect("connect");
    let stats = "GET /v1/stats HTTP/1.1\r\nHost: blockcache\r\n\r\n";
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        idle.write_all(stats.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = idle.read(&mut buf).await.expect("read");
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    // A slow request keeps the daemon draining.
    let (feed, body) = fed_body();
    let upload = tokio::spawn(d.http.put(d.url("/v1/files/slow")).body(body).send());
    feed.send(vec![1u8; BS]).await.expect("feed");
    d.wait_for_entries(0).await;
    d.signal(15);
    d.wait_for_log("signal received").await;

    // The idle connection: closed, or (a request that slips in before the connections are
    // told to close) a 503; never served.
    let (answer, closed) = exchange(&mut idle, stats).await;
    assert!(
        answer.is_empty()
            || (answer.starts_with("HTTP/1.1 503") && answer.contains("shutting_down")),
        "a request on a kept-alive connection while draining got: {answer:?}"
    );
    assert!(
        closed,
        "the kept-alive connection stays open while draining"
    );
    // A new connection: refused, closed, or a 503.
    if let Ok(mut fresh) = tokio::net::TcpStream::connect(d.addr()).await {
        let (answer, closed) = exchange(&mut fresh, stats).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
            "a request on a new connection while draining got: {answer:?}"
        );
        assert!(closed, "a new connection stays open while draining");
    }
    // The request in flight completes, on a connection that closes after it.
    feed.send(vec![2u8; BS]).await.expect("feed");
    drop(feed);
    let r = upload.await.expect("join").expect("the upload in flight");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["connection"], "close");
    let status = d.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}: {}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_and_a_second_signal_exits_at_once() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), ARGS);
    let (feed, body) = fed_body();
    let upload = tokio::spawn(d.http.put(d.url("/v1/files/slow")).body(body).send());
    feed.send(vec![0u8; BS]).await.expect("feed");
    d.wait_for_entries(0).await;
    d.signal(15);
    d.wait_for_log("signal received").await;
    // The request in flight goes on after the signal and completes.
    for i in 1..8u8 {
        feed.send(vec![i; BS]).await.expect("feed");
    }
    drop(feed);
    let r = upload
        .await
        .expect("join")
        .expect("the upload in flight finishes");
    assert_eq!(r.status(), StatusCode::CREATED);
    let status = d.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let log = d.log_text();
    assert!(log.contains("shut down: flushed"), "{log}");

    // Second signal: out at once, dirty data kept for the next start.
    let mut d = Daemon::start(dir.path(), ARGS);
    let r = d
        .http
        .put(d.url("/v1/files/dirty?durability=local"))
        .body(data(3, 3 * BS))
        .send()
        .await
        .expect("PUT");
    assert!(r.status().is_success());
    let entries = d.cache_entries().await;
    let (feed, body) = fed_body();
    let upload = tokio::spawn(d.http.put(d.url("/v1/files/never")).body(body).send());
    feed.send(vec![1u8; BS]).await.expect("feed");
    d.wait_for_entries(entries).await;
    d.signal(15);
    d.wait_for_log("signal received").await;
    d.signal(2);
    let status = d.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{}", d.log_text());
    // The upload in flight was cut off.
    drop(feed);
    assert!(upload.await.expect("join").is_err_or_failed());
    let d = Daemon::start(dir.path(), ARGS);
    assert_eq!(d.get("dirty").await.1, data(3, 3 * BS));
    assert_eq!(d.get("slow").await.1.len(), 8 * BS);
    assert_eq!(d.get("never").await.0, 404);
    d.post("/v1/flush").await;
    let s = d.json("/v1/stats").await;
    assert_eq!(
        s["store"]["logical_bytes"].as_u64(),
        Some(11 * BS as u64),
        "{s}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_never_reach_the_log() {
    let dir = tmp();
    let args = [
        "--block-size",
        "64KiB",
        "--store",
        "s3://keyid:supersecret@bucket/prefix",
    ];
    let log = match Daemon::try_start(dir.path(), &args) {
        Ok(d) => {
            let log = d.log_text();
            d.kill9();
            log
        }
        Err(log) => log,
    };
    assert!(!log.is_empty());
    assert!(
        !log.contains("supersecret") && !log.contains("keyid"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_a_tiny_buffer_pool_without_deadlock() {
    let dir = tmp();
    // One block of buffer memory for every request together.
    let d = Arc::new(Daemon::start(
        dir.path(),
        &["--block-size", "64KiB", "--buffer-memory", "64KiB"],
    ));
    let files: Vec<Vec<u8>> = (0..4).map(|i| data(300 + i, 6 * BS + 123)).collect();
    for (i, f) in files.iter().enumerate() {
        d.put(&format!("pool/{i}"), f.clone()).await;
    }
    let files = Arc::new(files);
    let mut tasks = Vec::new();
    for t in 0..10usize {
        let (d, files) = (d.clone(), files.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let i = (t + round) % 4;
                if t % 3 == 0 {
                    assert!(
                        d.put(&format!("pool/w{t}"), files[i].clone())
                            .await
                            .status()
                            .is_success()
                    );
                } else {
                    let (status, body) = d.get(&format!("pool/{i}")).await;
                    assert_eq!(status, 200);
                    assert_eq!(body, files[i]);
                }
            }
        }));
    }
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no deadlock");
    for r in results {
        r.expect("task");
    }
    let d = Arc::try_unwrap(d).ok().expect("sole owner");
    d.stop();
}

/// Every metric family of `/metrics` has `# HELP` and `# TYPE`, and its name follows the
/// Prometheus conventions: snake case under `blockcache_` or `process_`, counters ending in
/// `_total` and nothing else, units (`_bytes`, `_seconds`) at the end of the name; the build
/// and the process are there, and request durations carry method and status class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_and_named_by_the_conventions() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--block-size", "64KiB"]);
    assert_eq!(
        d.put("m", vec![1u8; 1000]).await.status(),
        StatusCode::CREATED
    );
    let _ = d.get("m").await;
    let text = d.metrics().await;
    let mut help = std::collections::BTreeSet::new();
    let mut types = std::collections::BTreeMap::new();
    let mut samples = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["#", "HELP", name, rest @ ..] if !rest.is_empty() => {
                help.insert(name.to_string());
            }
            ["#", "TYPE", name, kind] => {
                types.insert(name.to_string(), kind.to_string());
            }
            _ => {
                let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
                samples.insert(name);
            }
        }
    }
    for sample in &samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                sample
                    .strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(sample);
        assert!(help.contains(family), "{family} has no HELP:\n{text}");
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("{family} has no TYPE"));
        assert!(
            family.starts_with("blockcache_") || family.starts_with("process_"),
            "{family}: not under blockcache_"
        );
        assert!(
            family
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{family}: not snake case"
        );
        assert_eq!(
            kind == "counter",
            family.ends_with("_total"),
            "{family} is a {kind}: counters, and only they, end in _total"
        );
        let base = family.strip_suffix("_total").unwrap_or(family);
        for unit in ["bytes", "seconds"] {
            if base.split('_').any(|w| w == unit) {
                assert!(
                    base.ends_with(&format!("_{unit}")),
                    "{family}: the unit goes last"
                );
            }
        }
    }
    for needle in [
        "blockcache_build_info{version=",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
        "blockcache_http_request_duration_seconds_count{route=\"/v1/files/{*name}\",method=\"GET\",status=\"2xx\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // README documents every family.
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README");
    for family in types.keys().filter(|f| f.starts_with("blockcache_")) {
        assert!(
            readme.contains(&format!("`{family}")),
            "README does not document {family}"
        );
    }
    let s = d.json("/v1/stats").await;
    assert!(s["store"]["dedup_savings_bytes"].is_u64(), "{s}");
    d.stop();
}
