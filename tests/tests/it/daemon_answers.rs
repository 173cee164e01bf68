//! The daemon's answers when something fails: a GET whose first block cannot be read (its
//! object missing or corrupted in the store) is an error status with its JSON body (not a 200
//! cut short), `status?verify=1` tells what the store really holds, a full cache disk is a
//! 507, and a client still sending a large body reads the error instead of a reset
//! connection.

use std::path::{Path, PathBuf};

use blockcache_tests::daemon::Daemon;
use blockcache_tests::data;
use blockcache_tests::files_under;
use reqwest::StatusCode;

const BS: usize = 64 * 1024;
const ARGS: &[&str] = &["--block-size", "64KiB", "--upload-delay", "off"];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_a_missing_first_object_is_a_502_with_json() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(21, 3 * BS + 5);
    assert!(d.put("f", content.clone()).await.status().is_success());
    d.post("/v1/flush").await;
    let s = d.json("/v1/files/f/status?verify=1").await;
    assert_eq!(
        (
            &s["in_store"],
            &s["verified"]["checked"],
            &s["verified"]["missing"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!(4),
            &serde_json::json!(0)
        ),
        "{s}"
    );
    // The object of block 0 goes missing from the store, and the cache no longer has it.
    d.post("/v1/cache/drop").await;
    let id = blockcache_tests::Env::nth_object(1);
    let first = dir
        .path()
        .join(format!("store/data/{:02x}/{id}", id & 0xff));
    assert!(
        first.exists(),
        "{:?}",
        files_under(&dir.path().join("store"))
    );
    std::fs::remove_file(&first).expect("delete the first object");

    let s = d.json("/v1/files/f/status?verify=1").await;
    assert_eq!(s["in_store"], false, "{s}");
    assert_eq!(s["verified"]["missing"], 1, "{s}");
    assert_eq!(s["verified"]["missing_objects"][0]["block"], 0, "{s}");
    // Without verify, the metadata's word.
    assert_eq!(d.json("/v1/files/f/status").await["in_store"], true);

    for range in [None, Some("bytes=10-")] {
        let mut req = d.http.get(d.url("/v1/files/f"));
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let r = req.send().await.expect("GET");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "range {range:?}");
        let v: serde_json::Value = r.json().await.expect("a JSON error body");
        assert_eq!(v["error"], "store_error", "{v}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("not found")),
            "{v}"
        );
    }
    // The other blocks are still served.
    let r = d
        .http
        .get(d.url("/v1/files/f"))
        .header("Range", format!("bytes={BS}-"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(
        r.bytes().await.expect("body") == content[BS..],
        "other bytes"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_a_corrupted_first_object_is_an_error_with_json_naming_it() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(23, 3 * BS + 5);
    assert!(d.put("f", content.clone()).await.status().is_success());
    d.post("/v1/flush").await;
    // The cache no longer has the block, and the object of block 0 is overwritten in the
    // store with other bytes of its length.
    d.post("/v1/cache/drop").await;
    let id = blockcache_tests::Env::nth_object(1);
    let first = dir
        .path()
        .join(format!("store/data/{:02x}/{id}", id & 0xff));
    let stored = std::fs::read(&first).unwrap_or_else(|e| {
        panic!(
            "read the first object: {e}; {:?}",
            files_under(&dir.path().join("store"))
        )
    });
    // Every byte inverted: the object cannot be decoded, a failure of the store (502). One
    // bit of the block's bytes flipped: the object decodes, and the block's hash does not
    // match what was written (500, bad data).
    let garbled: Vec<u8> = stored.iter().map(|b| !b).collect();
    let mut flipped = stored.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    for (bytes, status, code) in [
        (garbled, StatusCode::BAD_GATEWAY, "store_error"),
        (flipped, StatusCode::INTERNAL_SERVER_ERROR, "data_error"),
    ] {
        std::fs::write(&first, bytes).expect("overwrite the first object");
        for range in [None, Some("bytes=10-")] {
            let mut req = d.http.get(d.url("/v1/files/f"));
            if let Some(r) = range {
                req = req.header("Range", r);
            }
            let r = req.send().await.expect("GET");
            assert_eq!(r.status(), status, "{code}, range {range:?}");
            let v: serde_json::Value = r.json().await.expect("a JSON error body");
            assert_eq!(v["error"], code, "{v}");
            assert!(
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("object {id} "))),
                "the error names the object: {v}"
            );
        }
    }
    // The other blocks are still served.
    let r = d
        .http
        .get(d.url("/v1/files/f"))
        .header("Range", format!("bytes={BS}-"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(
        r.bytes().await.expect("body") == content[BS..],
        "other bytes"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_a_large_body_reads_the_error() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    let body = data(22, 32 << 20);
    // Refused before the body is read: a bad parameter, a bad name.
    for (path, status) in [
        ("/v1/files/big?colour=blue", StatusCode::BAD_REQUEST),
        ("/v1/files/a//b", StatusCode::BAD_REQUEST),
    ] {
        let r = d
            .http
            .put(d.url(path))
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: no answer read: {e:?}"));
        assert_eq!(r.status(), status, "{path}");
        let v: serde_json::Value = r.json().await.expect("a JSON error body");
        assert!(v["error"].is_string(), "{v}");
    }
    // The daemon goes on serving.
    assert_eq!(
        d.put("small", b"x".to_vec()).await.status(),
        StatusCode::CREATED
    );
    d.stop();
}

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_is_a_507() {
    let dir = tmp();
    let cache = dir.path().join("small-cache");
    let _fs = match Tmpfs::mount(&cache, "1m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: needs a 1 MiB tmpfs for the cache directory (root): {why}");
            return;
        }
    };
    let cache_arg = cache.to_str().expect("utf-8");
    let mut args = ARGS.to_vec();
    args.extend(["--cache-dir", cache_arg]);
    let d = Daemon::start(dir.path(), &args);
    let r = d
        .http
        .put(d.url("/v1/files/big?durability=none"))
        .body(data(23, 4 << 20))
        .send()
        .await
        .expect("PUT answered");
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let v: serde_json::Value = r.json().await.expect("a JSON error body");
    assert_eq!(v["error"], "insufficient_storage", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left")),
        "{v}"
    );
    assert_eq!(d.get("big").await.0, 404);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_line_tells_dirty_bytes_from_uploaded_bytes() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), ARGS);
    // Four files of the same two blocks: eight dirty blocks, two objects to upload.
    let content = data(24, 2 * BS);
    for i in 0..4 {
        let r = d
            .http
            .put(d.url(&format!("/v1/files/same{i}?durability=none")))
            .body(content.clone())
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let log = d.stop();
    let line = log
        .lines()
        .find(|l| l.contains("shut down:"))
        .unwrap_or_else(|| panic!("no shutdown line in {log}"));
    assert!(
        line.contains(&format!("flushed 8 dirty blocks ({} bytes)", 8 * BS))
            && line.contains(&format!("2 objects ({} bytes) uploaded", 2 * BS)),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_file_the_settings_allow_works_and_beyond_is_413() {
    let dir = tmp();
    let mut args = ARGS.to_vec();
    args.extend(["--max-file-size", "4EiB"]);
    let d = Daemon::start(dir.path(), &args);
    let max: u64 = 1 << 62;
    assert!(d.put("huge", b"abc".to_vec()).await.status().is_success());
    let r = d
        .http
        .post(d.url(&format!("/v1/files/huge?truncate={max}")))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    let r = d
        .http
        .patch(d.url(&format!("/v1/files/huge?offset={}", max - 10)))
        .body(b"0123456789".to_vec())
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status(), StatusCode::OK);
    let r = d
        .http
        .get(d.url("/v1/files/huge"))
        .header("Range", "bytes=-12")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.expect("body")[..], b"\0\x000123456789");
    // Past the maximum, whatever the offset: 413, never a 500.
    for offset in [max - 5, 1 << 63, u64::MAX] {
        let r = d
            .http
            .patch(d.url(&format!("/v1/files/huge?offset={offset}")))
            .body(b"0123456789".to_vec())
            .send()
            .await
            .expect("PATCH");
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "offset {offset}");
    }
    d.post("/v1/flush").await;
    let s = d.json("/v1/files/huge/status?verify=1").await;
    assert_eq!(s["in_store"], true, "{s}");
    d.stop();
}
