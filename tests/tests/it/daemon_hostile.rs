//! The daemon against clients that stall or hoard, over real sockets: idle connections and
//! slow headers are closed, stalled bodies lose their buffers, the connection limit keeps the
//! engine's file descriptors, and a shutdown does not wait forever for a client.

use std::time::Duration;

use blockcache_tests::daemon::{Daemon, Launch};
use blockcache_tests::data;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BS: usize = 64 * 1024;
/// How long a test waits for the daemon to close a connection or answer.
const WAIT: Duration = Duration::from_secs(60);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A client that opens a connection per request: the daemon closes idle connections after
/// the short timeouts of these tests, and a pooled one could be closed as it is reused.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .expect("HTTP client")
}

async fn connect(d: &Daemon) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(d.addr()))
        .await
        .expect("connect within a minute")
        .expect("connect")
}

/// Reads `s` until the daemon closes it (end of stream or reset); returns what it sent.
/// Panics if it is still open after [`WAIT`].
async fn until_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {WAIT:?}"));
    got
}

/// Opens a PUT of `name` announcing 10 MB, sends `sent` bytes of it and stalls.
async fn stalled_put(d: &Daemon, name: &str, sent: usize) -> TcpStream {
    let mut s = connect(d).await;
    let head = format!(
        "PUT /v1/files/{name}?durability=none HTTP/1.1\r\nHost: blockcache\r\nContent-Length: 10000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("send header");
    s.write_all(&data(7, sent))
        .await
        .expect("send part of the body");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_slow_headers_are_closed() {
    let dir = tmp();
    let d = Daemon::start(
        dir.path(),
        &["--block-size", "64KiB", "--header-timeout", "1s"],
    );
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(connect(&d).await);
    }
    let mut half = Vec::new();
    for _ in 0..50 {
        let mut s = connect(&d).await;
        s.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: blockcache\r\nAccept: ")
            .await
            .expect("send half a header");
        half.push(s);
    }
    // A connection kept alive after a whole request is idle too.
    let mut kept = connect(&d).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: blockcache\r\n\r\n")
        .await
        .expect("send a request");
    let answer = until_closed(&mut kept, "a kept-alive connection").await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    for (i, s) in idle.iter_mut().enumerate() {
        until_closed(s, &format!("idle connection {i}")).await;
    }
    for (i, s) in half.iter_mut().enumerate() {
        until_closed(s, &format!("connection {i} with half a header")).await;
    }
    let r = client().get(d.url("/v1/stats")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_lose_their_buffers() {
    let dir = tmp();
    // Four request buffers; a body that sends nothing for a second fails.
    let d = Daemon::start(
        dir.path(),
        &[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--buffer-memory",
            "256KiB",
            "--body-timeout",
            "1s",
        ],
    );
    let before = data(1, 3 * BS);
    assert!(d.put("before", before.clone()).await.status().is_success());
    let entries = d.cache_entries().await;
    // Twice as many stalled PUTs as there are buffers; each sends a block and a bit.
    let mut stalled = Vec::new();
    for i in 0..8 {
        stalled.push(stalled_put(&d, &format!("stalled{i}"), BS + 1000).await);
    }
    // Four of them hold every buffer once their first blocks are in the cache.
    d.wait_for_entries(entries + 3).await;
    let c = client();
    let (get, put) = tokio::join!(
        c.get(d.url("/v1/files/before")).send(),
        c.put(d.url("/v1/files/after")).body(data(2, 2 * BS)).send(),
    );
    let get = get.expect("GET while bodies stall");
    assert_eq!(get.status(), StatusCode::OK);
    assert!(get.bytes().await.expect("body") == before, "other bytes");
    assert_eq!(
        put.expect("PUT while bodies stall").status(),
        StatusCode::CREATED
    );
    for (i, s) in stalled.iter_mut().enumerate() {
        let answer = until_closed(s, &format!("stalled PUT {i}")).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"),
            "stalled PUT {i}: {answer}"
        );
    }
    // Nothing of the stalled bodies became a file.
    for i in 0..8 {
        assert_eq!(d.get(&format!("stalled{i}")).await.0, 404);
    }
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_buffer_gets_503_with_retry_after() {
    let dir = tmp();
    let d = Daemon::start(
        dir.path(),
        &[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--buffer-memory",
            "256KiB",
            "--buffer-timeout",
            "100ms",
        ],
    );
    let mut stalled = Vec::new();
    for i in 0..4 {
        stalled.push(stalled_put(&d, &format!("stalled{i}"), BS + 1000).await);
    }
    d.wait_for_entries(3).await;
    let c = client();
    let r = c
        .put(d.url("/v1/files/waiting"))
        .body(data(3, BS))
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let v: serde_json::Value = r.json().await.expect("json error");
    assert_eq!(v["error"], "busy", "{v}");
    // The stalled clients go away: their buffers come back, and a client that retries
    // as told gets in.
    drop(stalled);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = c
            .put(d.url("/v1/files/waiting"))
            .body(data(3, BS))
            .send()
            .await
            .expect("PUT");
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            tokio::time::Instant::now() < deadline,
            "still 503 after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_client_exits_at_the_deadline_and_keeps_dirty_data() {
    let dir = tmp();
    let args = [
        "--block-size",
        "64KiB",
        "--upload-delay",
        "off",
        "--shutdown-timeout",
        "1s",
        "--body-timeout",
        "10min",
    ];
    // A store that is not there: the dirty data can only stay in the cache directory.
    let store = dir.path().join("store");
    let mut d = Daemon::start(dir.path(), &args);
    let kept = data(4, 2 * BS + 10);
    let r = d
        .http
        .put(d.url("/v1/files/kept?durability=local"))
        .body(kept.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::CREATED);
    let entries = d.cache_entries().await;
    let _stalled = stalled_put(&d, "stalled", BS + 1000).await;
    d.wait_for_entries(entries).await;
    std::fs::rename(&store, dir.path().join("store.away")).expect("move the store away");
    std::fs::write(&store, b"not a directory").expect("file in the store's place");
    d.signal(15);
    let status = d.wait(WAIT);
    let log = d.log_text();
    assert!(!status.success(), "exited with {status}; log:\n{log}");
    assert!(
        log.contains("shutdown deadline of 1s passed") && log.contains("next start"),
        "{log}"
    );
    std::fs::remove_file(&store).expect("remove the file");
    std::fs::rename(dir.path().join("store.away"), &store).expect("bring the store back");
    let d = Daemon::start(dir.path(), &args);
    let (status, body) = d.get("kept").await;
    assert_eq!(status, 200, "{}", d.log_text());
    assert!(body == kept, "other bytes came back");
    assert_eq!(d.get("stalled").await.0, 404);
    d.post("/v1/flush").await;
    let s = d.json("/v1/files/kept/status?verify=1").await;
    assert_eq!(s["in_store"], true, "{s}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_fd_limit_wait_and_uploads_go_on() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no prlimit command to start the daemon with 256 file descriptors");
        return;
    }
    let dir = tmp();
    // 256 file descriptors, hard limit included: at most 128 connections.
    let d = Launch::new(dir.path())
        .wrapped_in(&["prlimit", "--nofile=256:256"])
        .args(&[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "10ms",
            "--header-timeout",
            "1s",
        ])
        .start();
    let files: Vec<Vec<u8>> = (0..20).map(|i| data(100 + i, 3 * BS + 7)).collect();
    let c = client();
    for (i, f) in files.iter().enumerate() {
        let r = c
            .put(d.url(&format!("/v1/files/f{i}?durability=none")))
            .body(f.clone())
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // More idle connections than the daemon has file descriptors, while the files upload
    // in the background.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect(&d).await);
    }
    // A new client is served once idle connections are closed.
    let r = c.get(d.url("/v1/stats")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    for (i, s) in idle.iter_mut().enumerate() {
        until_closed(s, &format!("idle connection {i}")).await;
    }
    let r = c.post(d.url("/v1/flush")).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::OK, "{}", d.log_text());
    let s: serde_json::Value = c
        .get(d.url("/v1/stats"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(s["counters"]["upload_errors"], 0, "{s}");
    for (i, f) in files.iter().enumerate() {
        let r = c
            .get(d.url(&format!("/v1/files/f{i}")))
            .send()
            .await
            .expect("GET");
        assert!(r.bytes().await.expect("body") == *f, "f{i}");
    }
    assert!(
        !d.log_text().contains("accepting a connection failed"),
        "{}",
        d.log_text()
    );
    d.stop();
}

/// Waits until no request buffer of the daemon is free.
async fn wait_for_no_free_buffer(d: &Daemon) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = d.json("/v1/stats").await;
        if s["requests"]["buffers_free"] == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "buffers still free after {WAIT:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_loses_its_buffers() {
    let dir = tmp();
    // Three request buffers (fewer than a GET reads ahead), waited for as long as it
    // takes: only the write timeout of the stalled reader's connection gives them back.
    let d = Daemon::start(
        dir.path(),
        &[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--buffer-memory",
            "192KiB",
            "--buffer-timeout",
            "10min",
            "--body-timeout",
            "1s",
        ],
    );
    // More than the socket buffers of both ends hold: the reader's is made small.
    let big = data(5, 8 << 20);
    assert!(d.put("big", big.clone()).await.status().is_success());
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let addr = d.addr().parse().expect("an address");
    let mut stalled = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect within a minute")
        .expect("connect");
    stalled
        .write_all(b"GET /v1/files/big HTTP/1.1\r\nHost: blockcache\r\n\r\n")
        .await
        .expect("send a request");
    // It reads nothing; its response holds every buffer once the socket is full.
    wait_for_no_free_buffer(&d).await;
    let r = client()
        .get(d.url("/v1/files/big"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.expect("body") == big, "other bytes");
    // The stalled reader's connection was cut: less than the whole response reached it.
    let got = until_closed(&mut stalled, "the stalled reader").await;
    assert!(
        got.len() < big.len(),
        "the whole file reached the stalled reader"
    );
    d.stop();
}
