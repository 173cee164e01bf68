//! The daemon's S3 endpoint, driven by real clients: boto3 at its default settings (which
//! sends aws-chunked bodies with checksum trailers) against the real daemon binary.

use std::path::Path;
use std::process::{Command, Stdio};

use blockcache_tests::daemon::Daemon;

const ACCESS_KEY: &str = "blockcache-test";
const SECRET_KEY: &str = "a-secret-for-the-tests";

/// Whether boto3 is here; prints why test `test` skips if not (`.ci/run` installs it with
/// moto).
fn boto3_or_skip(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{test}: skipped: boto3 is not installed (python3 -m pip install boto3)");
    }
    ok
}

fn start(dir: &Path) -> Daemon {
    Daemon::start(
        dir,
        &[
            "--s3-listen",
            "127.0.0.1:0",
            "--s3-access-key",
            ACCESS_KEY,
            "--s3-secret-key",
            SECRET_KEY,
        ],
    )
}

/// Checks `done` until it holds (`Some`) or `limit` passed (`None`), every 50 ms.
fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> Option<()> {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(())
}

/// The client script `name` under `tests/clients`.
fn client_script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

/// Runs the client script `name` (under `tests/clients`) against `d`; panics with its
/// output unless it succeeds.
fn run_client(d: &Daemon, name: &str) {
    run_client_env(d, name, &[]);
}

/// [`run_client`] with more environment variables.
fn run_client_env(d: &Daemon, name: &str, env: &[(&str, &Path)]) {
    let script = client_script(name);
    let out = Command::new("python3")
        .arg(&script)
        .envs(env.iter().copied())
        .env("ENDPOINT", d.s3.as_deref().expect("the S3 endpoint is on"))
        .env("FILES_URL", &d.base)
        .env("ACCESS_KEY", ACCESS_KEY)
        .env("SECRET_KEY", SECRET_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{name}: {}", text.trim());
    assert!(
        out.status.success() && text.contains("ok"),
        "{name} failed:\n{text}\ndaemon log:\n{}",
        std::fs::read_to_string(&d.log).unwrap_or_default()
    );
}

/// Whether `program --version` runs; prints why test `test` skips if not (`.ci/run`
/// installs them).
fn tool_or_skip(test: &str, program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{test}: skipped: {program} is not installed");
    }
    ok
}

#[test]
fn the_aws_cli_copies_in_parallel_parts_and_syncs_both_ways() {
    let test = "the_aws_cli_copies_in_parallel_parts_and_syncs_both_ways";
    if !tool_or_skip(test, "aws") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = start(dir.path());
    run_client(&d, "s3_awscli.py");
}

#[test]
fn rclone_copies_checks_and_syncs_a_tree() {
    let test = "rclone_copies_checks_and_syncs_a_tree";
    if !tool_or_skip(test, "rclone") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = start(dir.path());
    run_client(&d, "s3_rclone.py");
}

#[test]
fn boto3_at_its_defaults_gets_the_answers_s3_gives() {
    if !boto3_or_skip("boto3_at_its_defaults_gets_the_answers_s3_gives") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = start(dir.path());
    run_client(&d, "s3_boto3.py");
}

#[test]
fn an_s3_endpoint_on_another_address_without_keys_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = Daemon::try_start(dir.path(), &["--s3-listen", "0.0.0.0:0"])
        .err()
        .expect("refused");
    assert!(
        err.contains("refusing to serve S3 on 0.0.0.0:0") && err.contains("--s3-access-key"),
        "{err}"
    );
    // With keys it is served.
    let d = Daemon::start(
        dir.path(),
        &[
            "--s3-listen",
            "0.0.0.0:0",
            "--s3-access-key",
            ACCESS_KEY,
            "--s3-secret-key",
            SECRET_KEY,
        ],
    );
    assert!(d.s3.is_some());
}

/// SIGKILL while threads run multipart uploads and single PUTs and the AWS CLI syncs a tree
/// (twice, into the same volume): after each restart every object whose upload got a 200
/// reads back exact, every upload is resumable (ListParts shows each acknowledged part) or
/// was completed, one resumable upload completes, and every file the sync reported
/// uploaded reads back as the local file.
#[test]
fn after_a_sigkill_during_uploads_and_a_sync_every_acknowledged_object_is_there() {
    if !boto3_or_skip(
        "after_a_sigkill_during_uploads_and_a_sync_every_acknowledged_object_is_there",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let work = tempfile::tempdir().expect("tmp");
    let tree = work.path().join("tree");
    for i in 0..400u64 {
        let sub = tree.join(format!("d{}", i % 9));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let len = (i * 7919) % (256 << 10);
        let bytes: Vec<u8> = (0..len).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect();
        std::fs::write(sub.join(format!("f{i}")), bytes).expect("write");
    }
    let journal = work.path().join("journal");
    for round in 0..2u64 {
        let d = start(dir.path());
        let mut load = Command::new("python3")
            .arg(client_script("s3_crash_load.py"))
            .env("ENDPOINT", d.s3.as_deref().expect("the S3 endpoint is on"))
            .env("ACCESS_KEY", ACCESS_KEY)
            .env("SECRET_KEY", SECRET_KEY)
            .env("JOURNAL", &journal)
            .env("TREE", &tree)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the load");
        // The kill comes once the load has had this many steps acknowledged (more in the
        // second round), whatever the machine's speed.
        let acknowledged =
            |n: usize| std::fs::read_to_string(&journal).is_ok_and(|j| j.lines().count() >= n);
        let wanted = 40 + 60 * round as usize;
        wait_until(std::time::Duration::from_secs(120), || acknowledged(wanted))
            .unwrap_or_else(|| panic!("the load got fewer than {wanted} acknowledgements"));
        d.kill9();
        // The load stops at its clients' first error; it gets a minute.
        let pid = load.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(load.wait());
        });
        if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let d = start(dir.path());
        run_client_env(
            &d,
            "s3_crash_check.py",
            &[("JOURNAL", journal.as_path()), ("TREE", tree.as_path())],
        );
        d.stop();
    }
}

/// Runs `s3_uploads.py` with `args` against `d`; returns its output.
fn uploads_step(d: &Daemon, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(client_script("s3_uploads.py"))
        .args(args)
        .env("ENDPOINT", d.s3.as_deref().expect("the S3 endpoint is on"))
        .env("FILES_URL", &d.base)
        .env("ACCESS_KEY", ACCESS_KEY)
        .env("SECRET_KEY", SECRET_KEY)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "s3_uploads.py {args:?} failed:\n{}{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An incomplete multipart upload survives restarts, and is aborted (its files and blocks
/// removed) once it is older than --multipart-expiry, by a daemon started with a shorter one.
#[test]
fn an_incomplete_upload_survives_restarts_until_it_expires() {
    if !boto3_or_skip("an_incomplete_upload_survives_restarts_until_it_expires") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let keep = |d: &std::path::Path| {
        Daemon::start(
            d,
            &[
                "--s3-listen",
                "127.0.0.1:0",
                "--s3-access-key",
                ACCESS_KEY,
                "--s3-secret-key",
                SECRET_KEY,
                "--multipart-expiry",
                "1h",
            ],
        )
    };
    let d = keep(dir.path());
    let id = uploads_step(&d, &["begin"]);
    d.stop();
    let d = keep(dir.path());
    assert_eq!(uploads_step(&d, &["present", &id]), "ok");
    d.kill9();
    let d = keep(dir.path());
    assert_eq!(uploads_step(&d, &["present", &id]), "ok");
    // A second upload whose record goes (as a crash between a completion and its removals
    // leaves it): its parts are the expiry's to remove.
    let orphan = uploads_step(&d, &["begin-more"]);
    assert_eq!(uploads_step(&d, &["forget", &orphan]), "ok");
    d.stop();
    let d = Daemon::start(
        dir.path(),
        &[
            "--s3-listen",
            "127.0.0.1:0",
            "--s3-access-key",
            ACCESS_KEY,
            "--s3-secret-key",
            SECRET_KEY,
            "--multipart-expiry",
            "1s",
        ],
    );
    // Sweeps run at the start and every second: one finds the upload older than 1 s.
    wait_until(std::time::Duration::from_secs(30), || {
        d.log_text().contains("older than --multipart-expiry")
            && d.log_text()
                .contains("removing the parts of an upload that is gone")
    })
    .unwrap_or_else(|| panic!("no expiry; log:\n{}", d.log_text()));
    assert_eq!(uploads_step(&d, &["gone", &id]), "ok");
    assert_eq!(uploads_step(&d, &["gone", &orphan]), "ok");
    d.stop();
}

/// A daemon with the S3 endpoint on and no keys, with `args` on top.
fn start_keyless(dir: &Path, args: &[&str]) -> Daemon {
    let mut all = vec!["--s3-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Daemon::start(dir, &all)
}

/// A daemon with a keyless S3 endpoint over a moto store (bucket `bkt`), `args` on top, and
/// the S3 bucket `bucket` made: the moto server (to kill), the daemon, its S3 URL.
async fn keyless_over_moto(
    dir: &Path,
    args: &[&str],
    bucket: &str,
) -> (blockcache_tests::moto::Moto, Daemon, String) {
    let moto = blockcache_tests::moto::Moto::start(dir);
    moto.create_bucket("bkt").await;
    let mut all = vec!["--s3-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let d = moto.launch(dir, "s3://bkt/vol").args(&all).start();
    let s3 = d.s3.clone().expect("the S3 endpoint is on");
    let made = reqwest::Client::new()
        .put(format!("{s3}/{bucket}"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(made.status(), 200, "create the bucket {bucket}");
    (moto, d, s3)
}

/// The error code of an S3 XML answer.
fn code_of(xml: &str) -> &str {
    xml.split("<Code>")
        .nth(1)
        .and_then(|r| r.split("</Code>").next())
        .unwrap_or_default()
}

/// Without keys the endpoint takes every request as anonymous: a client's signature is
/// ignored (it used to get `NotImplemented`), and an aws-chunked body, whose framing `s3s`
/// decodes only while checking a signature, is refused rather than stored framing and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_signatures_are_ignored_and_aws_chunked_bodies_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = start_keyless(dir.path(), &[]);
    let s3 = d.s3.clone().expect("the S3 endpoint is on");
    let http = reqwest::Client::new();
    let r = http.put(format!("{s3}/plain")).send().await.expect("PUT");
    assert_eq!(r.status(), 200);
    let data = b"hello world".repeat(100);
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(&data);
    framed.extend_from_slice(b"\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n");
    let r = http
        .put(format!("{s3}/plain/chunked"))
        .header("content-encoding", "aws-chunked")
        .header("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
        .header("x-amz-decoded-content-length", data.len().to_string())
        .header("x-amz-trailer", "x-amz-checksum-crc32")
        .body(framed)
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 400);
    let text = r.text().await.expect("body");
    assert_eq!(code_of(&text), "InvalidRequest", "{text}");
    assert!(text.contains("aws-chunked"), "{text}");
    let r = http
        .get(format!("{s3}/plain/chunked"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404, "nothing was stored");
    if boto3_or_skip("without_keys_signatures_are_ignored_and_aws_chunked_bodies_refused") {
        run_client(&d, "s3_keyless.py");
    }
    d.stop();
}

/// An object over --max-file-size gets `EntityTooLarge`, whether its length is announced
/// (refused before the body is read) or found while streaming, and the old object stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_over_the_largest_size_gets_entity_too_large_and_the_old_one_stays() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = start_keyless(dir.path(), &["--max-file-size", "1MiB"]);
    let s3 = d.s3.clone().expect("the S3 endpoint is on");
    let http = reqwest::Client::new();
    assert_eq!(
        http.put(format!("{s3}/big"))
            .send()
            .await
            .expect("PUT")
            .status(),
        200
    );
    let old = vec![7u8; 1000];
    let r = http
        .put(format!("{s3}/big/k"))
        .body(old.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 200);
    let r = http
        .put(format!("{s3}/big/k"))
        .body(vec![1u8; (1 << 20) + 1])
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 400);
    assert_eq!(code_of(&r.text().await.expect("body")), "EntityTooLarge");
    // No length announced: found while streaming.
    let chunks = futures::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![2u8; 300_000]))),
    );
    let r = http
        .put(format!("{s3}/big/k"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("PUT");
    let status = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(
        (status.as_u16(), code_of(&text)),
        (400, "EntityTooLarge"),
        "{text}"
    );
    // A connection whose request body was refused half read is closed after the answer.
    let got = reqwest::Client::new()
        .get(format!("{s3}/big/k"))
        .send()
        .await
        .expect("GET");
    assert_eq!(got.bytes().await.expect("bytes").to_vec(), old);
    d.stop();
}

/// While the store is down and the dirty budget is full, a PUT gets 503 `SlowDown` within
/// the store timeout (it waited for the budget), not a hang and not a dropped write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waiting_for_a_full_dirty_budget_gets_slow_down() {
    use blockcache_tests::moto::available_or_skip;
    if !available_or_skip("a_writer_waiting_for_a_full_dirty_budget_gets_slow_down") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (mut moto, d, s3) = keyless_over_moto(
        dir.path(),
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
        "slow",
    )
    .await;
    let http = reqwest::Client::new();
    moto.kill();
    let started = std::time::Instant::now();
    let r = http
        .put(format!("{s3}/slow/over"))
        .body(vec![3u8; 6 * 65536])
        .send()
        .await
        .expect("PUT");
    let took = started.elapsed();
    let status = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(
        (status.as_u16(), code_of(&text)),
        (503, "SlowDown"),
        "{text}\n{}",
        d.log_text()
    );
    assert!(text.contains("unreachable"), "the answer says why: {text}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "the writer waited {took:?}"
    );
    let r = reqwest::Client::new()
        .get(format!("{s3}/slow/over"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404, "the refused object is not there");
    d.kill9();
}

/// A completion answers its head at once and sends its result (or its error, in a 200, as
/// S3 does) when the work is done, so a long one does not run into the client's read
/// timeout. Here the work waits for a dead store (store durability asked) and fails: the
/// head comes long before, the error says why, and the upload stays for a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_answers_at_once_and_its_result_when_the_work_is_done() {
    use blockcache_tests::moto::available_or_skip;
    if !available_or_skip("a_completion_answers_at_once_and_its_result_when_the_work_is_done") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (mut moto, d, s3) = keyless_over_moto(
        dir.path(),
        &["--store-timeout", "4s", "--upload-delay", "off"],
        "mpu",
    )
    .await;
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{s3}/mpu/k?uploads"))
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    let id = created
        .split("<UploadId>")
        .nth(1)
        .and_then(|r| r.split("</UploadId>").next())
        .expect("an upload id")
        .to_owned();
    let part = http
        .put(format!("{s3}/mpu/k?partNumber=1&uploadId={id}"))
        .body(vec![5u8; 100_000])
        .send()
        .await
        .expect("PUT part");
    assert_eq!(part.status(), 200);
    let etag = part.headers()["etag"].to_str().expect("etag").to_owned();
    moto.kill();
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{s3}/mpu/k?uploadId={id}"))
        .header("x-blockcache-durability", "store")
        .body(format!(
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
        ))
        .send()
        .await
        .expect("POST complete");
    let head_after = started.elapsed();
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    let done_after = started.elapsed();
    // The work fails once the dead store is given up on (a second or more); the head
    // comes at once, well before.
    let half_second = std::time::Duration::from_millis(500);
    assert!(
        head_after < half_second && done_after > head_after + half_second,
        "the head came after {head_after:?}, the result after {done_after:?}"
    );
    assert_eq!(code_of(&text), "ServiceUnavailable", "{text}");
    let r = reqwest::Client::new()
        .get(format!("{s3}/mpu/k"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404, "no object from a failed completion");
    let r = reqwest::Client::new()
        .get(format!("{s3}/mpu/k?uploadId={id}"))
        .send()
        .await
        .expect("ListParts");
    assert_eq!(r.status(), 200, "the upload stays for a retry");
    // Counted with its outcome, not with its early 200.
    let metrics = d.metrics().await;
    let completions: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("blockcache_s3_requests_total") && l.contains("CompleteMultipartUpload")
        })
        .collect();
    assert!(
        completions.len() == 1 && completions[0].contains("code=\"ServiceUnavailable\""),
        "{completions:?}"
    );
    d.kill9();
}
