//! What the `blockcache` binary says when it is used wrongly: each message names the
//! problem and what to do, from the real binary (exit code and text).

use blockcache_tests::daemon::{Daemon, Launch, run_cli};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// `serve` on a port in use says so before it opens or makes anything: no data directory
/// is created and no "dropped without shutdown" line is logged.
#[test]
fn serve_on_a_port_in_use_says_so_before_opening_anything() {
    let dir = tmp();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--listen",
            &addr,
            "--data-dir",
            data_arg,
            "--s3-listen",
            "off",
        ],
        None,
    );
    assert!(!status.success());
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!err.contains("dropped without shutdown"), "{err}");
    assert!(
        !data.exists(),
        "the data directory was made before the listener failed"
    );
}

/// A client pointed at a port where nothing listens says that no daemon answers there and
/// what to check, not a bare network error.
#[test]
fn a_client_at_a_port_without_a_daemon_asks_whether_it_runs() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let (status, _, err) = run_cli(&["stats", "--listen", &addr], None);
    assert!(!status.success());
    assert!(
        err.contains("connection refused") && err.contains("is the daemon running"),
        "{err}"
    );
}

/// `put` checks what it can before it sends anything: a FILE that is a directory, a name the
/// daemon would refuse, a durability that does not exist; each answer names the problem
/// (these used to be "cannot reach the daemon" in some runs, when the daemon refused the
/// request while the body was still being sent).
#[test]
fn put_refuses_local_mistakes_with_what_is_wrong() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let file = dir.path().join("f.bin");
    std::fs::write(&file, vec![1u8; 3 << 20]).expect("write");
    let file = file.to_str().expect("utf-8");
    let sub = dir.path().to_str().expect("utf-8");
    for _ in 0..5 {
        let (status, _, err) = run_cli(&["put", "--listen", d.addr(), "x/y.txt", sub], None);
        assert!(!status.success());
        assert!(
            err.contains("is a directory") && !err.contains("cannot reach"),
            "{err}"
        );
        let (status, _, err) = run_cli(&["put", "--listen", d.addr(), "a//b", file], None);
        assert!(!status.success());
        assert!(
            err.contains("invalid file name") && !err.contains("cannot reach"),
            "{err}"
        );
        let (status, _, err) = run_cli(
            &[
                "put",
                "--listen",
                d.addr(),
                "ok",
                file,
                "--durability",
                "remote",
            ],
            None,
        );
        assert!(!status.success());
        assert!(
            err.contains("durability") && err.contains("remote") && !err.contains("cannot reach"),
            "{err}"
        );
    }
    d.stop();
}

/// `put NAME` without FILE on a terminal refuses instead of waiting silently for standard
/// input (run under `script`, which gives it a terminal).
#[test]
fn put_without_a_file_on_a_terminal_says_what_it_would_read() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "put_without_a_file_on_a_terminal_says_what_it_would_read: skipped: no script(1)"
        );
        return;
    }
    let bin = blockcache_tests::daemon::binary();
    let out = std::process::Command::new("timeout")
        .args(["20", "script", "-qec"])
        .arg(format!(
            "{} put --listen 127.0.0.1:9 some-name",
            bin.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("standard input is a terminal") && text.contains("give FILE"),
        "{text}"
    );
}

/// Logs written to a file carry no colour codes, and the start-up lines are fields, not a
/// Rust debug dump.
#[test]
fn logs_to_a_file_are_plain_text_with_fields() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let log = d.stop();
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in the log file:\n{log}"
    );
    assert!(log.contains("cache open clean_files=0"), "{log}");
    assert!(!log.contains("Recovery {"), "{log}");
}

/// A log filter that is not a level (`inf` for `info`) is refused: the filter would take it
/// for a target and silence everything else.
#[test]
fn a_log_level_that_is_not_one_is_refused() {
    let dir = tmp();
    let data = dir.path().to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "inf",
        ],
        None,
    );
    assert!(!status.success());
    assert!(err.contains("\"inf\" is not a level"), "{err}");
}

/// `--store` takes a plain directory path as `file://` (it said "relative URL without a
/// base"), `--listen` takes a host name, and a data directory that is a file says so.
#[test]
fn paths_host_names_and_a_file_for_a_directory_are_understood_or_explained() {
    let dir = tmp();
    let store = dir.path().join("plain-store");
    let d = Launch::new(&dir.path().join("data"))
        .listen("localhost:0")
        .args(&["--store", store.to_str().expect("utf-8")])
        .start();
    d.stop();
    assert!(
        store.join("volume").exists(),
        "the volume record is in the plain path"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--data-dir",
            file.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert!(!status.success());
    assert!(err.contains("it is a file, not a directory"), "{err}");
}

/// The clients users of rclone, mc and the AWS CLI expect: `put -r` and `get -r` of a tree
/// with one progress bar, `ls` with human sizes and `--json`, `stat`, `stats` as a summary or
/// JSON, and shell completions.
#[test]
fn trees_listings_stat_stats_and_completions() {
    let dir = tmp();
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let tree = dir.path().join("tree");
    for i in 0..25usize {
        let sub = tree.join(format!("d{}", i % 4)).join(format!("e{}", i % 3));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join(format!("f{i}.bin")), vec![i as u8; i * 1000]).expect("write");
    }
    let tree_arg = tree.to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &["put", "--listen", d.addr(), "-r", "backup/t", tree_arg],
        None,
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("stored 25 files"), "{err}");

    let (status, out, err) = run_cli(&["ls", "--listen", d.addr(), "--json", "backup/"], None);
    assert!(status.success(), "{err}");
    let listed: serde_json::Value = serde_json::from_slice(&out).expect("ls --json is JSON");
    let names: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names.len(), 25, "{names:?}");
    assert!(names.contains(&"backup/t/d1/e1/f1.bin"), "{names:?}");
    let (status, out, _) = run_cli(&["ls", "--listen", d.addr(), "backup/t/d0/e0/"], None);
    assert!(status.success());
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("KiB") && text.contains("backup/t/d0/e0/f12.bin"),
        "{text}"
    );
    let (_, out, _) = run_cli(
        &["ls", "--listen", d.addr(), "--json", "nothing-here/"],
        None,
    );
    let empty: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(empty, serde_json::json!([]));

    let back = dir.path().join("back");
    let back_arg = back.to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &["get", "--listen", d.addr(), "-r", "backup/t", back_arg],
        None,
    );
    assert!(status.success(), "{err}");
    for i in 0..25usize {
        let rel = format!("d{}/e{}/f{i}.bin", i % 4, i % 3);
        assert_eq!(
            std::fs::read(back.join(&rel)).expect("read back"),
            std::fs::read(tree.join(&rel)).expect("read"),
            "{rel}"
        );
    }

    let (status, out, err) = run_cli(
        &["stat", "--listen", d.addr(), "backup/t/d1/e1/f13.bin"],
        None,
    );
    assert!(status.success(), "{err}");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("13000 bytes") && text.contains("etag"),
        "{text}"
    );
    let (status, out, _) = run_cli(
        &[
            "stat",
            "--listen",
            d.addr(),
            "--json",
            "backup/t/d1/e1/f13.bin",
        ],
        None,
    );
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(v["file"]["size"], 13000);
    let (status, _, err) = run_cli(&["stat", "--listen", d.addr(), "no/such"], None);
    assert!(!status.success() && err.contains("404"), "{err}");

    let (status, out, _) = run_cli(&["stats", "--listen", d.addr()], None);
    assert!(status.success());
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("cache ") && text.contains("dirty ") && text.contains("store "),
        "{text}"
    );
    let (status, out, _) = run_cli(&["stats", "--listen", d.addr(), "--json"], None);
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    assert!(v["cache"]["bytes"].is_u64(), "{v}");

    for shell in ["bash", "zsh", "fish"] {
        let (status, out, err) = run_cli(&["completions", shell], None);
        assert!(status.success(), "{shell}: {err}");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("blockcache") && text.contains("serve"),
            "{shell}: {text}"
        );
    }
    d.stop();
}

/// A data directory that cannot be written (a read-only file system) and a cache smaller
/// than a block are refused with the path or the flag named, and the cause.
#[test]
fn an_unwritable_data_directory_and_a_tiny_cache_are_named() {
    let dir = tmp();
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--data-dir",
            data_arg,
            "--listen",
            "127.0.0.1:0",
            "--max-cache-size",
            "100KiB",
        ],
        None,
    );
    assert!(!status.success());
    assert!(
        err.contains("max-cache-size") && err.contains("block-size"),
        "{err}"
    );
    let fs = match blockcache_tests::tmpfs::Tmpfs::mount("8m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "an_unwritable_data_directory_and_a_tiny_cache_are_named: read-only part skipped: {why}"
            );
            return;
        }
    };
    let vol = fs.path().join("vol");
    std::fs::create_dir(&vol).expect("mkdir");
    let remount = |mode: &str| {
        std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(fs.path())
            .status()
            .expect("run mount")
            .success()
    };
    assert!(remount("ro"), "remount read-only");
    let vol_arg = vol.to_str().expect("utf-8");
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--data-dir",
            vol_arg,
            "--listen",
            "127.0.0.1:0",
            "--s3-listen",
            "off",
        ],
        None,
    );
    assert!(remount("rw"), "remount read-write");
    assert!(!status.success());
    assert!(
        err.contains(vol_arg) && err.contains("Read-only file system"),
        "{err}"
    );
}

/// A daemon whose standard output nobody reads (its reader gone before the start-up lines)
/// serves on: printing them used to panic on the broken pipe.
#[test]
fn a_daemon_whose_stdout_is_gone_serves_on() {
    let dir = tmp();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(blockcache_tests::daemon::binary())
        .args([
            "serve",
            "--listen",
            &addr,
            "--s3-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("BLOCKCACHE_LOG_LEVEL", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reading end goes at once: the daemon's lines meet a broken pipe.
    drop(child.stdout.take());
    // Its log says when the start is over: the "serving S3" line comes after both lines.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.contains("serving S3") || line.contains("panicked");
            let _ = tx.send(line);
            if done {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let started = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) if line.contains("serving S3") => break true,
            Ok(line) => log.push(line),
            Err(_) => break false,
        }
    };
    let healthy = std::net::TcpStream::connect(&addr).ok().and_then(|mut s| {
        use std::io::{Read, Write};
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
    }) == Some(true);
    let alive = child.try_wait().expect("poll").is_none();
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    assert!(
        started && healthy && alive,
        "started {started}, healthy {healthy}, alive {alive}; log:\n{}",
        log.join("\n")
    );
}

/// The file API closes a connection after answering an empty body sent with
/// `Expect: 100-continue`, as the S3 endpoint does: botocore-based clients otherwise wait
/// out the idle timeout on their next request on it.
#[test]
fn an_empty_body_sent_with_expect_closes_its_connection() {
    use std::io::{Read, Write};
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let mut s = std::net::TcpStream::connect(d.addr()).expect("connect");
    s.write_all(
        b"PUT /v1/files/empty HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    )
    .expect("send");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    // The connection closes after the answer: reading to the end returns.
    s.read_to_string(&mut answer).expect("read to the close");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    d.stop();
}
