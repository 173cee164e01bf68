//! The daemon's settings: where they come from (a TOML file, then `BLOCKCACHE_*` variables,
//! then flags) and that each one does what it says, seen from outside the real binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockcache_tests::daemon::{Daemon, Launch, run_cli, run_cli_env};
use blockcache_tests::data;
use blockcache_tests::files_under;

const BS: usize = 64 * 1024;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
async fn max_entries(d: &Daemon) -> Option<u64> {
    d.json("/v1/stats").await["cache"]["max_entries"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_the_file_then_the_environment_then_flags() {
    let dir = tmp();
    let conf = dir.path().join("settings.toml");
    std::fs::write(&conf, "block-size = \"64KiB\"\nmax-entries = 100\n").expect("write");
    let conf = conf.to_str().expect("utf-8").to_owned();

    // The file alone.
    let d = Launch::new(dir.path()).args(&["--config", &conf]).start();
    assert_eq!(max_entries(&d).await, Some(100));
    d.stop();
    // The environment over the file (the file named by the environment too).
    let d = Launch::new(dir.path())
        .env("BLOCKCACHE_CONFIG", &conf)
        .env("BLOCKCACHE_MAX_ENTRIES", "200")
        .start();
    assert_eq!(max_entries(&d).await, Some(200));
    d.stop();
    // A flag over both.
    let d = Launch::new(dir.path())
        .args(&["--config", &conf, "--max-entries", "300"])
        .env("BLOCKCACHE_MAX_ENTRIES", "200")
        .start();
    assert_eq!(max_entries(&d).await, Some(300));
    // A client finds the daemon through the same file (the daemon's other keys are no
    // concern of the client's), and its environment and flags override the file there too.
    let client_conf = dir.path().join("client.toml");
    std::fs::write(
        &client_conf,
        format!("listen = \"{}\"\nmax-entries = 5\n", d.addr()),
    )
    .expect("write");
    let client_conf = client_conf.to_str().expect("utf-8");
    let (status, out, err) = run_cli(&["stats", "--config", client_conf, "--json"], None);
    assert!(status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out).contains("max_entries"));
    let (status, _, err) = run_cli_env(
        &["stats", "--config", client_conf],
        &[("BLOCKCACHE_LISTEN", "127.0.0.1:1")],
        None,
    );
    assert!(!status.success() && err.contains("127.0.0.1:1"), "{err}");
    let (status, _, err) = run_cli_env(
        &["stats", "--config", client_conf, "--listen", d.addr()],
        &[("BLOCKCACHE_LISTEN", "127.0.0.1:1")],
        None,
    );
    assert!(status.success(), "{err}");
    d.stop();
    // No source at all: the library's default.
    let d = Launch::new(dir.path())
        .args(&["--block-size", "64KiB"])
        .start();
    assert_eq!(
        max_entries(&d).await,
        Some(blockcache::Config::new("unused").max_entries)
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_dir_holds_the_cache_files() {
    let dir = tmp();
    let elsewhere = tmp();
    let cache = elsewhere.path().join("the-cache");
    let d = Launch::new(dir.path())
        .args(&[
            "--block-size",
            "64KiB",
            "--cache-dir",
            cache.to_str().expect("utf-8"),
        ])
        .start();
    let content = data(1, 3 * BS);
    assert!(d.put("f", content.clone()).await.status().is_success());
    let stored = files_under(&cache);
    assert!(
        stored
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .any(|m| m.len() == BS as u64),
        "no block file in {}: {stored:?}",
        cache.display()
    );
    assert!(
        !dir.path().join("cache").exists(),
        "the default cache directory was used"
    );
    assert_eq!(d.get("f").await.1, content);
    d.stop();
}

/// Polls the daemon's stats until `stop` is set; returns the largest value of `pick` seen.
fn sample(
    d: &Arc<Daemon>,
    stop: &Arc<AtomicBool>,
    pick: fn(&serde_json::Value) -> u64,
) -> tokio::task::JoinHandle<u64> {
    let (d, stop) = (d.clone(), stop.clone());
    tokio::spawn(async move {
        let most = AtomicU64::new(0);
        while !stop.load(Ordering::SeqCst) {
            most.fetch_max(pick(&d.json("/v1/stats").await), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        most.into_inner()
    })
}

/// Writes `files` (without waiting for any durability) from 4 concurrent writers, then reads
/// them all back, while a sampler watches the stats; returns the largest value of `pick`
/// seen during the writes and the reads.
async fn write_and_read_watching(
    d: Daemon,
    files: Vec<Vec<u8>>,
    pick: fn(&serde_json::Value) -> u64,
) -> (u64, Daemon) {
    let d = Arc::new(d);
    let files = Arc::new(files);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(&d, &stop, pick);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (d, files) = (d.clone(), files.clone());
        writers.push(tokio::spawn(async move {
            for (i, f) in files.iter().enumerate().filter(|(i, _)| i % 4 == w) {
                let r = d
                    .http
                    .put(d.url(&format!("/v1/files/f{i}?durability=none")))
                    .body(f.clone())
                    .send()
                    .await
                    .expect("PUT");
                assert!(r.status().is_success(), "PUT f{i}: {}", r.status());
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let after_writes = pick(&d.json("/v1/stats").await);
    for (i, f) in files.iter().enumerate() {
        assert_eq!(&d.get(&format!("f{i}")).await.1, f, "f{i}");
    }
    stop.store(true, Ordering::SeqCst);
    let most = sampler.await.expect("sampler").max(after_writes);
    let d = Arc::try_unwrap(d).ok().expect("sole owner");
    (most, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_entries_bounds_the_cache() {
    let dir = tmp();
    let d = Launch::new(dir.path())
        .args(&[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--max-entries",
            "4",
        ])
        .start();
    // Small files: one entry each, far below any byte limit.
    let files: Vec<Vec<u8>> = (0..24).map(|i| data(i, 1000 + i as usize)).collect();
    let (most, d) = write_and_read_watching(d, files, |s| {
        s["cache"]["entries"].as_u64().expect("entries")
    })
    .await;
    assert!(
        most <= 4,
        "the cache held {most} entries, above --max-entries 4"
    );
    let s = d.json("/v1/stats").await;
    assert_eq!(s["cache"]["max_entries"], 4, "{s}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_cache_size_bounds_the_cache() {
    let dir = tmp();
    let d = Launch::new(dir.path())
        .args(&[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--max-cache-size",
            "256KiB",
        ])
        .start();
    // Whole blocks: 4 of them fill the cache, far below the entry limit.
    let files: Vec<Vec<u8>> = (0..8).map(|i| data(100 + i, 2 * BS)).collect();
    let (most, d) =
        write_and_read_watching(d, files, |s| s["cache"]["bytes"].as_u64().expect("bytes")).await;
    assert!(
        most <= 4 * BS as u64,
        "the cache held {most} bytes, above --max-cache-size 256KiB"
    );
    let s = d.json("/v1/stats").await;
    assert_eq!(s["cache"]["max_bytes"], 4 * BS as u64, "{s}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_dirty_bounds_dirty_bytes() {
    let dir = tmp();
    let d = Launch::new(dir.path())
        .args(&[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--max-dirty",
            "256KiB",
        ])
        .start();
    // Nothing uploads on its own (no upload delay, no durability asked for): only the dirty
    // budget makes writers wait for uploads.
    let files: Vec<Vec<u8>> = (0..8).map(|i| data(200 + i, 4 * BS + 7)).collect();
    let (most, d) = write_and_read_watching(d, files, |s| {
        s["dirty"]["bytes"].as_u64().expect("dirty bytes")
    })
    .await;
    assert!(
        most <= 4 * BS as u64,
        "{most} dirty bytes, above --max-dirty 256KiB"
    );
    let s = d.json("/v1/stats").await;
    assert_eq!(s["dirty"]["max_bytes"], 4 * BS as u64, "{s}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_json_object_per_line() {
    let dir = tmp();
    let d = Launch::new(dir.path())
        .args(&["--block-size", "64KiB", "--log-format", "json"])
        .start();
    assert!(d.put("f", b"x".to_vec()).await.status().is_success());
    let log = d.stop();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    // At least the lines of the start and of the shutdown.
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_needs_a_token_or_insecure() {
    let dir = tmp();
    let everywhere = || Launch::new(dir.path()).listen("0.0.0.0:0");
    let err = everywhere()
        .args(&["--block-size", "64KiB"])
        .try_start()
        .err()
        .expect("refused without a token");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0")
            && err.contains("--auth-token")
            && err.contains("--insecure"),
        "{err}"
    );
    let d = everywhere()
        .args(&["--block-size", "64KiB", "--insecure"])
        .start();
    assert_eq!(d.json("/v1/stats").await["cache"]["entries"], 0);
    d.stop();
    // A switch in the settings file, and the variable over it.
    let conf = dir.path().join("insecure.toml");
    std::fs::write(&conf, "insecure = true\n").expect("write");
    let conf = conf.to_str().expect("utf-8");
    let d = everywhere()
        .args(&["--block-size", "64KiB", "--config", conf])
        .start();
    d.stop();
    let refused = everywhere()
        .args(&["--block-size", "64KiB", "--config", conf])
        .env("BLOCKCACHE_INSECURE", "false")
        .try_start();
    assert!(refused.is_err(), "BLOCKCACHE_INSECURE=false did not win");
    let d = everywhere()
        .args(&["--block-size", "64KiB", "--auth-token", "a-token"])
        .start();
    let r = d
        .http
        .get(d.url("/v1/stats"))
        .bearer_auth("a-token")
        .send()
        .await
        .expect("GET");
    assert!(r.status().is_success());
    d.stop();
}

/// `--help` of `blockcache serve`: each flag (without dashes) with its default, if it shows
/// one.
fn flags_in_help() -> Vec<(String, Option<String>)> {
    let (status, out, err) = run_cli(&["serve", "--help"], None);
    assert!(status.success(), "{err}");
    let help = String::from_utf8(out).expect("utf-8 help");
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let line = line.trim_start();
        let flag = line
            .strip_prefix("--")
            .or_else(|| line.strip_prefix("-h, --"));
        match flag {
            Some(flag) => {
                let name = flag.split([' ', '=']).next().expect("a name");
                flags.push((name.to_owned(), String::new()));
            }
            None => {
                if let Some((_, text)) = flags.last_mut() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    flags
        .into_iter()
        .filter(|(name, _)| name != "help")
        .map(|(name, text)| {
            let default = text
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(d, _)| d.to_owned());
            (name, default)
        })
        .collect()
}

#[test]
fn the_readme_table_shows_every_flag_of_help_with_its_default() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README");
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
    let flags = flags_in_help();
    assert!(flags.len() > 10, "{flags:?}");
    for (flag, default) in &flags {
        // The settings file is described in the text above the table.
        if flag == "config" {
            assert!(readme.contains("`--config FILE`"));
            continue;
        }
        let row = rows
            .iter()
            .find(|r| r.contains(&format!("`--{flag} ")) || r.contains(&format!("`--{flag}`")))
            .unwrap_or_else(|| panic!("README's table lacks --{flag}"));
        let cell = row.split(" | ").nth(1).expect("a default column");
        match default {
            Some(d) => assert!(
                cell.contains(&format!("`{d}`")),
                "--{flag}: help says {d}, README {cell}"
            ),
            None => assert!(
                cell == "none" || cell == "off",
                "--{flag}: no default in help, README {cell}"
            ),
        }
    }
    // And no row for a flag that is gone.
    for row in rows {
        assert!(
            flags.iter().any(
                |(f, _)| row.contains(&format!("`--{f} ")) || row.contains(&format!("`--{f}`"))
            ),
            "README's table has a flag that --help lacks: {row}"
        );
    }
}

/// Runs `blockcache serve` with `args` (and a data directory), expecting a refusal before it
/// listens; returns what it printed.
fn refused(args: &[&str]) -> String {
    let dir = tmp();
    let data_dir = dir.path().to_str().expect("utf-8").to_owned();
    let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_dir];
    all.extend_from_slice(args);
    let (status, out, err) = run_cli(&all, None);
    assert!(
        !status.success() && out.is_empty(),
        "{args:?} was accepted: {err}"
    );
    err
}

/// Like [`refused`], with `text` as the settings file.
fn refused_in_file(text: &str) -> String {
    let dir = tmp();
    let conf = dir.path().join("settings.toml");
    std::fs::write(&conf, text).expect("write");
    refused(&["--config", conf.to_str().expect("utf-8")])
}

#[test]
fn settings_are_refused_with_their_key_and_allowed_range() {
    // Each value, by flag or in the file: the key and what is allowed.
    for (args, says) in [
        (
            &["--max-entries", "0"][..],
            &["--max-entries", "allowed from 1"][..],
        ),
        (
            &["--upload-tasks", "0"],
            &["--upload-tasks", "allowed from 1 to 1024"],
        ),
        (&["--block-size", "2GiB"], &["--block-size", "to 1GiB"]),
        (
            &["--max-file-size", "8EiB"],
            &["--max-file-size", "to 4EiB"],
        ),
        (&["--max-file-size", "0"], &["--max-file-size", "from 1"]),
        (
            &["--header-timeout", "0s"],
            &["--header-timeout", "from 1ms to 24h"],
        ),
        (&["--body-timeout", "forever"], &["--body-timeout", "500ms"]),
        (
            &["--max-connections", "0"],
            &["--max-connections", "allowed from 1"],
        ),
        (&["--auth-token", " "], &["--auth-token", "visible ASCII"]),
        (&["--auth-token", ""], &["--auth-token", "visible ASCII"]),
        (
            &["--block-size", "64KiB", "--max-dirty", "4KiB"],
            &["max-dirty", "at least block-size"],
        ),
    ] {
        let err = refused(args);
        for s in says {
            assert!(err.contains(s), "{args:?}: no {s:?} in {err}");
        }
    }
    for (text, says) in [
        ("max-entries = 0\n", &["max-entries", "allowed from 1"][..]),
        ("auth-token = \"\"\n", &["auth-token", "visible ASCII"]),
        (
            "auth-token = \" \"\nlisten = \"0.0.0.0:0\"\n",
            &["auth-token", "visible ASCII"],
        ),
        ("block-size = -1\n", &["block-size", "cannot be negative"]),
        ("block-size = 1.5\n", &["block-size", "float"]),
        ("max-entries = \"many\"\n", &["max-entries", "whole number"]),
    ] {
        let err = refused_in_file(text);
        for s in says {
            assert!(err.contains(s), "{text:?}: no {s:?} in {err}");
        }
        assert!(!err.contains("untagged"), "{text:?}: {err}");
    }
    // A database that cannot be opened is named, even with an `@` in its path (its
    // directory is a file, so it cannot be made).
    let dir = tmp();
    std::fs::write(dir.path().join("a-file@here"), b"x").expect("write");
    let db = dir.path().join("a-file@here/meta.db");
    let db = db.to_str().expect("utf-8");
    let err = refused(&["--block-size", "64KiB", "--database", db]);
    assert!(err.contains(db), "{err}");
}
