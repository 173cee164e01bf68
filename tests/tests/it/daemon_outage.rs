//! The daemon against a real S3 server (moto's): files round-trip through a bucket, a flush
//! after deletions leaves their objects gone from it, a read from a store that hangs is a 502
//! naming the object, a store that dies mid-run gives fast answers that name the cause (502
//! for a flush or a `durability=store` PUT, 503 with `Retry-After` for writers beyond the
//! dirty budget), one log line for the outage and one for its end, and `store_up` follows
//! it; SIGTERM while the store is down exits at the store timeout and leaves the dirty
//! blocks to the next start, which uploads them; a misconfigured store (or one that refuses
//! the credentials) stops the daemon at start with what to change.
//!
//! Timings are only bounded from above, generously for a loaded machine.

use std::time::{Duration, Instant};

use blockcache_tests::daemon::{Daemon, Launch};
use blockcache_tests::data;
use blockcache_tests::moto::{Moto, available_or_skip as moto_or_skip};
use reqwest::StatusCode;

const BS: usize = 64 * 1024;
const BUCKET: &str = "bkt";

/// The longest a flush or a writer may take to fail with `--store-timeout 2s`: the
/// deadline plus a lot of slack, far below the minutes it took before.
const FAST: Duration = Duration::from_secs(20);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A daemon on `moto`'s bucket under prefix `vol`, with `args`.
fn launch(dir: &std::path::Path, moto: &Moto, args: &[&str]) -> Launch {
    moto.launch(dir, &format!("s3://{BUCKET}/vol")).args(args)
}

/// `blockcache_store_up` in the daemon's metrics.
async fn store_up_gauge(d: &Daemon) -> String {
    let text = d.metrics().await;
    text.lines()
        .find(|l| l.starts_with("blockcache_store_up "))
        .unwrap_or_default()
        .to_owned()
}

async fn put_status(d: &Daemon, name: &str, body: Vec<u8>) -> StatusCode {
    d.put(name, body).await.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_through_a_bucket_and_a_flush_waits_for_deletions() {
    if !moto_or_skip("files_round_trip_through_a_bucket_and_a_flush_waits_for_deletions") {
        return;
    }
    let dir = tmp();
    let moto = Moto::start(dir.path());
    moto.create_bucket(BUCKET).await;
    let d = launch(
        dir.path(),
        &moto,
        &[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--store-timeout",
            "2s",
        ],
    )
    .start();
    let kept = data(1, 3 * BS + 17);
    let gone = data(2, 6 * BS);
    let also_gone = data(3, 2 * BS + 1);
    for (name, body) in [("kept", &kept), ("gone", &gone), ("also_gone", &also_gone)] {
        assert_eq!(
            put_status(&d, name, body.clone()).await,
            StatusCode::CREATED
        );
    }
    d.post("/v1/flush").await;
    assert_eq!(moto.keys(BUCKET, "vol/data/").await.len(), 4 + 6 + 3);
    // The cache goes; every byte comes back from the bucket.
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("kept").await, (200, kept.clone()));
    assert_eq!(d.get("gone").await, (200, gone));

    // The store hangs: a read of an uncached file runs into the store timeout, and the
    // store counts as down. The files are deleted meanwhile; their deletions wait (the
    // metadata in the store, which cannot be updated, still names their objects). Then the
    // store answers again, and a flush must not answer before the deletions are done.
    moto.pause();
    // The first block is read before the status line: the answer is a 502 whose JSON body
    // names the object that could not be read, not a 200 whose body is cut off.
    let started = Instant::now();
    let r = d
        .http
        .get(d.url("/v1/files/also_gone"))
        .send()
        .await
        .expect("GET");
    let took = started.elapsed();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{}", d.log_text());
    let v: serde_json::Value = r.json().await.expect("a JSON error body");
    assert_eq!(v["error"], "store_error", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("download of object") && m.contains("block 0 ")),
        "{v}"
    );
    assert!(took < FAST, "the read took {took:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.json("/v1/stats").await["store_up"] != false {
        assert!(
            Instant::now() < deadline,
            "store still up:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for name in ["gone", "also_gone"] {
        let r = d
            .http
            .delete(d.url(&format!("/v1/files/{name}")))
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    assert_ne!(d.json("/v1/stats").await["pending_removals"], 0);
    moto.resume();
    d.post("/v1/flush").await;
    // Answered: the deleted files' objects are gone from the bucket, not merely queued.
    let left = moto.keys(BUCKET, "vol/data/").await;
    assert_eq!(
        left.len(),
        4,
        "objects of deleted files still in the bucket: {left:?}"
    );
    assert_eq!(d.json("/v1/stats").await["pending_removals"], 0);
    assert_eq!(d.get("kept").await, (200, kept));
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_dies_gives_fast_answers_and_one_log_line_each_way() {
    if !moto_or_skip("a_store_that_dies_gives_fast_answers_and_one_log_line_each_way") {
        return;
    }
    let dir = tmp();
    let mut moto = Moto::start(dir.path());
    moto.create_bucket(BUCKET).await;
    let d = launch(
        dir.path(),
        &moto,
        &[
            "--block-size",
            "64KiB",
            "--store-timeout",
            "2s",
            "--upload-delay",
            "off",
            "--max-dirty",
            "256KiB",
        ],
    )
    .start();
    let before = data(10, 2 * BS);
    assert_eq!(
        put_status(&d, "before", before.clone()).await,
        StatusCode::CREATED
    );
    d.post("/v1/flush").await;
    assert_eq!(store_up_gauge(&d).await, "blockcache_store_up 1");
    assert_eq!(d.json("/v1/stats").await["store_up"], true);

    moto.kill();
    let during = data(11, 2 * BS + 5);
    assert_eq!(
        put_status(&d, "during", during.clone()).await,
        StatusCode::CREATED,
        "a local write needs no store"
    );
    // A flush fails within about the store timeout, and says why.
    let started = Instant::now();
    let r = d.http.post(d.url("/v1/flush")).send().await.expect("POST");
    let took = started.elapsed();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = r.json().await.expect("json");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(took < FAST, "the flush took {took:?}");
    assert!(
        message.contains(&format!("127.0.0.1:{}", moto.port)) && message.contains("onnect"),
        "the message names the store and the failure: {message}"
    );
    assert_eq!(store_up_gauge(&d).await, "blockcache_store_up 0");
    assert_eq!(d.json("/v1/stats").await["store_up"], false);

    // The dirty budget (4 blocks) is full: a writer gets 503 with Retry-After, not a hang.
    let started = Instant::now();
    let r = d
        .http
        .put(d.url("/v1/files/over"))
        .body(data(12, 4 * BS))
        .send()
        .await
        .expect("PUT");
    let took = started.elapsed();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        d.log_text()
    );
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let v: serde_json::Value = r.json().await.expect("json");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("unreachable")),
        "{v}"
    );
    assert!(took < FAST, "the writer waited {took:?}");

    let log = d.log_text();
    assert_eq!(log.matches("object store unreachable").count(), 1, "{log}");
    assert!(
        log.lines().count() < 40,
        "the outage floods the log:\n{log}"
    );
    // Every warning or error about a failure carries its cause, not only what failed.
    for line in log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
    {
        // Past the level: the cause is an `error=` field or inline after the message.
        let text = line
            .split_once(" ERROR ")
            .or_else(|| line.split_once(" WARN "))
            .map_or(line, |(_, t)| t);
        if text.contains("fail") || text.contains("unreachable") {
            assert!(
                text.to_ascii_lowercase().contains("error"),
                "a failure logged without its cause: {line}"
            );
        }
        assert!(
            !line.contains("stays dirty\"") && !line.trim_end().ends_with("stays dirty"),
            "an upload failure logged without its cause: {line}"
        );
    }

    // The store comes back on the same port: one line says so, the gauge follows, and
    // everything acknowledged reaches it.
    let moto = Moto::start_on(moto.port, dir.path());
    moto.create_bucket(BUCKET).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.json("/v1/stats").await["store_up"] != true {
        assert!(
            Instant::now() < deadline,
            "store_up still false:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store_up_gauge(&d).await, "blockcache_store_up 1");
    // moto answers slowly on a loaded machine and the store timeout is short (2 s): a flush
    // may time out once or twice, but it must succeed once the store keeps answering.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = d.http.post(d.url("/v1/flush")).send().await.expect("POST");
        if r.status().is_success() {
            break;
        }
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(
            status == StatusCode::BAD_GATEWAY && Instant::now() < deadline,
            "flush after the store came back: {status} {body}\n{}",
            d.log_text()
        );
        eprintln!("flush after the store came back: {status} {body}; trying again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(d.json("/v1/stats").await["dirty"]["bytes"], 0);
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("during").await, (200, during));
    assert_eq!(d.get("over").await.0, 404, "the refused write left nothing");
    let log = d.log_text();
    assert_eq!(log.matches("object store unreachable").count(), 1, "{log}");
    assert_eq!(
        log.matches("object store reachable again").count(),
        1,
        "{log}"
    );
    d.stop();
}

/// Asserts that a JSON error answer is a store error that names the store and a failure to
/// connect to it.
async fn names_the_dead_store(r: reqwest::Response, moto_port: u16) {
    let v: serde_json::Value = r.json().await.expect("a JSON error body");
    let message = v["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(v["error"], "store_error", "{v}");
    assert!(
        message.contains(&format!("127.0.0.1:{moto_port}")) && message.contains("onnect"),
        "the message names the store and the failure: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_put_to_a_dead_store_fails_at_the_deadline_with_the_cause() {
    if !moto_or_skip("a_durable_put_to_a_dead_store_fails_at_the_deadline_with_the_cause") {
        return;
    }
    let dir = tmp();
    let mut moto = Moto::start(dir.path());
    moto.create_bucket(BUCKET).await;
    let d = launch(
        dir.path(),
        &moto,
        &[
            "--block-size",
            "64KiB",
            "--store-timeout",
            "2s",
            "--upload-delay",
            "off",
        ],
    )
    .start();
    let old = data(30, 2 * BS + 3);
    let r = d
        .http
        .put(d.url("/v1/files/f?durability=store"))
        .body(old.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::CREATED, "{}", d.log_text());

    moto.kill();
    // Twice: while the store is not yet known to be down, and once it is.
    for seed in [31, 32] {
        let started = Instant::now();
        let r = d
            .http
            .put(d.url("/v1/files/f?durability=store"))
            .body(data(seed, 3 * BS + 1))
            .send()
            .await
            .expect("PUT");
        let took = started.elapsed();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{}", d.log_text());
        names_the_dead_store(r, moto.port).await;
        assert!(took < FAST, "the durable PUT took {took:?}");
        // The failed PUT changed nothing.
        assert_eq!(d.get("f").await, (200, old.clone()));
    }
    // The store stays down: a SIGTERM would end in a failed shutdown (the failed PUTs'
    // objects wait to be deleted), which is not what this test is about.
    d.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_dirty_blocks_and_a_dead_store_exits_and_the_next_start_uploads_them() {
    if !moto_or_skip(
        "sigterm_with_dirty_blocks_and_a_dead_store_exits_and_the_next_start_uploads_them",
    ) {
        return;
    }
    let dir = tmp();
    let moto = Moto::start(dir.path());
    moto.create_bucket(BUCKET).await;
    // The shutdown deadline is the default (30 s): the exit must come from the store
    // timeout, well before it.
    let args = [
        "--block-size",
        "64KiB",
        "--store-timeout",
        "2s",
        "--upload-delay",
        "off",
    ];
    let mut d = launch(dir.path(), &moto, &args).start();
    // The store hangs (it keeps its objects, among them the volume's record, which the next
    // start needs).
    moto.pause();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), data(40 + i, 10 * BS + 1 + i as usize)))
        .collect();
    for (name, body) in &files {
        assert_eq!(
            put_status(&d, name, body.clone()).await,
            StatusCode::CREATED,
            "a local write needs no store"
        );
    }
    let dirty = d.json("/v1/stats").await["dirty"]["entries"].clone();
    assert_eq!(dirty, 5 * 11, "{}", d.log_text());

    let started = Instant::now();
    d.signal(15);
    let status = d.wait(Duration::from_secs(120));
    let took = started.elapsed();
    let log = d.log_text();
    assert!(
        !status.success(),
        "exited with {status} without flushing; log:\n{log}"
    );
    assert!(took < FAST, "the shutdown took {took:?}; log:\n{log}");
    // One line says what stays for the next start, and why (the store's cause).
    assert!(
        log.contains("shut down without flushing everything (55 dirty blocks")
            && log.contains("next start"),
        "{log}"
    );
    // The cause: the HTTP request's timeout or the operation's deadline, whichever of the
    // two (both the store timeout) ends the hung upload first.
    assert!(
        log.contains("upload of object")
            && (log.contains("timed out") || log.contains("did not succeed within 2.0s")),
        "the exit tells the store's failure: {log}"
    );

    // The store answers again; the next start uploads every dirty block on its own, and
    // every byte comes back from the bucket.
    moto.resume();
    let d = launch(dir.path(), &moto, &args).start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dirty = d.json("/v1/stats").await["dirty"]["entries"].clone();
        if dirty == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dirty} blocks still dirty:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(moto.keys(BUCKET, "vol/data/").await.len(), 5 * 11);
    d.post("/v1/cache/drop").await;
    for (name, body) in files {
        let (status, got) = d.get(&name).await;
        assert_eq!(status, 200, "{name}: {}", d.log_text());
        assert!(got == body, "{name}: other bytes came back");
    }
    d.stop();
}

/// Starts a daemon that must refuse to start; returns its log and how long it took.
fn refused(launch: Launch) -> (String, Duration) {
    let started = Instant::now();
    match launch.try_start() {
        Ok(d) => panic!("the daemon started:\n{}", d.log_text()),
        Err(log) => (log, started.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_store_stops_the_start_with_what_to_change() {
    if !moto_or_skip("a_misconfigured_store_stops_the_start_with_what_to_change") {
        return;
    }
    let dir = tmp();
    let moto = Moto::start(dir.path());
    let home = dir.path().join("empty-home");
    std::fs::create_dir_all(&home).expect("home");

    // No such bucket.
    let (log, _) = refused(launch(&dir.path().join("a"), &moto, &[]));
    assert!(
        log.contains("bucket \"bkt\"") && log.contains("does not exist"),
        "{log}"
    );

    // No credentials anywhere, and no instance metadata to ask.
    let (log, took) = refused(
        Launch::new(&dir.path().join("b"))
            .unset_env("AWS_")
            .args(&["--store", "s3://bkt/vol"])
            .env("HOME", &home.display().to_string())
            .env("AWS_ENDPOINT", &moto.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    assert!(
        log.contains("no credentials found")
            && log.contains("AWS_ACCESS_KEY_ID")
            && log.contains("AWS_SECRET_ACCESS_KEY"),
        "{log}"
    );
    assert!(took < FAST, "{took:?}");

    // A plain-HTTP endpoint without AWS_ALLOW_HTTP.
    let (log, _) =
        refused(launch(&dir.path().join("c"), &moto, &[]).env("AWS_ALLOW_HTTP", "false"));
    assert!(log.contains("AWS_ALLOW_HTTP=true"), "{log}");

    // https:// to the plain-HTTP port: told at once, not retried for the store timeout.
    let https = format!("https://127.0.0.1:{}", moto.port);
    let (log, took) =
        refused(launch(&dir.path().join("d"), &moto, &[]).env("AWS_ENDPOINT", &https));
    assert!(
        log.contains("answers plain HTTP")
            && log.contains(&format!("http://127.0.0.1:{}", moto.port)),
        "{log}"
    );
    assert!(took < FAST, "{took:?}");

    // With the bucket there, the same settings start.
    moto.create_bucket(BUCKET).await;
    let d = launch(&dir.path().join("e"), &moto, &[]).start();
    d.stop();

    // The store refuses the credentials (403): told as denied access, with what to check,
    // at once (a refusal is not retried).
    moto.deny_every_request().await;
    let (log, took) = refused(launch(&dir.path().join("f"), &moto, &[]));
    assert!(
        log.contains(&format!("access to s3://{BUCKET}/vol denied"))
            && log.contains("AWS_ACCESS_KEY_ID")
            && log.contains("403"),
        "{log}"
    );
    assert!(took < FAST, "{took:?}");
}
