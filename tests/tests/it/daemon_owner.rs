//! Who owns a volume's store, end to end with the daemon binary: a real S3 server (moto's)
//! and real file systems. A second daemon, a wiped data directory, or a copy of a data
//! directory is refused at start with what was found and what to do; `--force-takeover` and
//! an expired lease hand the volume over, and the old writer is fenced (its flush fails
//! naming the lease, its dirty blocks stay); an encrypted volume's objects hold no
//! plaintext and need their key; a `file://` store whose file system is gone is never
//! recreated, at start or while running.
//!
//! Timings are only bounded from above, generously for a loaded machine.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockcache_tests::daemon::{Daemon, Launch};
use blockcache_tests::moto::{Moto, available_or_skip};
use blockcache_tests::tmpfs::Tmpfs;
use blockcache_tests::{data, list_dir, text};

const BS: usize = 64 * 1024;
const BUCKET: &str = "bkt";
const STORE: &str = "s3://bkt/vol";
/// How long a test waits for something that takes a lease's time to live or so.
const DEADLINE: Duration = Duration::from_secs(120);
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Starts moto with bucket [`BUCKET`]; `None` (the test skips) if moto is not installed.
async fn moto(test: &str, dir: &Path) -> Option<Moto> {
    if !available_or_skip(test) {
        return None;
    }
    let moto = Moto::start(dir);
    moto.create_bucket(BUCKET).await;
    Some(moto)
}

/// Starts a daemon that must refuse to start; returns its log.
fn refused(launch: Launch) -> String {
    match launch.try_start() {
        Ok(d) => panic!("the daemon started:\n{}", d.log_text()),
        Err(log) => log,
    }
}

/// Copies directory `from` to `to` (which must not exist), as `cp -a` does.
fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// This machine's host name, as the lease records it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_owned()
}

/// POST /v1/flush, which must fail: (status, message).
async fn failed_flush(d: &Daemon) -> (u16, String) {
    let r = d.http.post(d.url("/v1/flush")).send().await.expect("POST");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert!(
        !(200..300).contains(&status),
        "the flush succeeded: {status} {body}\n{}",
        d.log_text()
    );
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    (status, message)
}

/// PUT `body` to `name`, which must be acknowledged.
async fn put(d: &Daemon, name: &str, body: &[u8]) {
    let r = d.put(name, body.to_vec()).await;
    assert_eq!(r.status().as_u16(), 201, "PUT {name}\n{}", d.log_text());
}

/// The volume id in the bucket's volume record under `prefix`.
async fn volume_id(moto: &Moto, prefix: &str) -> String {
    let record: serde_json::Value =
        serde_json::from_slice(&moto.object(BUCKET, &format!("{prefix}/volume")).await)
            .expect("the volume record is JSON");
    record["id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_another_or_a_wiped_data_directory_is_refused_the_bucket() {
    let root = tmp();
    let Some(moto) = moto(
        "a_daemon_with_another_or_a_wiped_data_directory_is_refused_the_bucket",
        root.path(),
    )
    .await
    else {
        return;
    };
    let args = ["--block-size", "64KiB", "--upload-delay", "off"];
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let first = moto.launch(&a, STORE).args(&args).start();
    let content = data(1, 3 * BS + 17);
    put(&first, "f", &content).await;
    first.post("/v1/flush").await;
    let id = volume_id(&moto, "vol").await;
    let objects = moto.keys(BUCKET, "vol/data/").await;

    // Another data directory on the same bucket, the first daemon running.
    let log = refused(moto.launch(&b, STORE).args(&args));
    assert!(
        log.contains(&format!("the store holds volume {id}"))
            && log.contains("this database is new")
            && log.contains("Use the data directory that volume was created with"),
        "the refusal names the volume found and what to do: {log}"
    );
    // Nothing of the first daemon's was touched: its objects are all there and read back.
    assert_eq!(moto.keys(BUCKET, "vol/data/").await, objects);
    first.post("/v1/cache/drop").await;
    assert_eq!(first.get("f").await, (200, content.clone()));
    first.stop();

    // The first daemon's data directory is wiped: its volume is not served from nothing.
    std::fs::remove_dir_all(&a).expect("wipe the data directory");
    let log = refused(moto.launch(&a, STORE).args(&args));
    assert!(
        log.contains(&format!("the store holds volume {id}"))
            && log.contains("this database is new"),
        "{log}"
    );
    assert_eq!(moto.keys(BUCKET, "vol/data/").await, objects);
    assert_eq!(volume_id(&moto, "vol").await, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_data_directory_is_refused_until_forced_and_the_old_writer_is_fenced() {
    let root = tmp();
    let Some(moto) = moto(
        "a_copied_data_directory_is_refused_until_forced_and_the_old_writer_is_fenced",
        root.path(),
    )
    .await
    else {
        return;
    };
    // Renewals every 2 s: the old writer soon learns it was superseded, and a store slow to
    // answer on a loaded machine does not let a lease lapse (writes stop after 4 s without).
    let args = [
        "--block-size",
        "64KiB",
        "--upload-delay",
        "off",
        "--lease-ttl",
        "8s",
    ];
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let d = moto.launch(&a, STORE).args(&args).start();
    let content = data(2, 2 * BS + 3);
    put(&d, "f", &content).await;
    d.post("/v1/flush").await;
    // Killed: its lease stays, unreleased. The copy is of a stopped daemon's files.
    d.kill9();
    copy_dir(&a, &b);
    // Its own restart (this host, this database) takes the lease at once.
    let old = moto.launch(&a, STORE).args(&args).start();

    let log = refused(moto.launch(&b, STORE).args(&args));
    assert!(
        log.contains(&format!("held by pid {} on {}", old.pid(), host()))
            && log.contains(" since ")
            && log.contains("--force-takeover"),
        "the refusal names the holder: {log}"
    );

    let new = moto
        .launch(&b, STORE)
        .args(&args)
        .args(&["--force-takeover"])
        .start();
    // The old writer learns of the new epoch at its next renewal (a quarter of the time
    // to live); from then on it never writes to the store.
    old.wait_for_log("this daemon no longer writes to the store")
        .await;
    let objects = moto.keys(BUCKET, "vol/data/").await;
    let late = data(3, BS + 9);
    put(&old, "late", &late).await;
    let (status, message) = failed_flush(&old).await;
    assert!(
        message.contains("lease"),
        "the old writer's flush ({status}) names the lease: {message}"
    );
    assert_eq!(
        moto.keys(BUCKET, "vol/data/").await,
        objects,
        "the fenced writer uploaded"
    );
    // Its acknowledged write is kept, dirty, in its own cache.
    assert_eq!(old.get("late").await, (200, late));
    assert!(old.json("/v1/stats").await["dirty"]["bytes"].as_u64() > Some(0));

    // The new writer's files are whole, the copied one and its own.
    let own = data(4, 3 * BS);
    put(&new, "own", &own).await;
    new.post("/v1/flush").await;
    new.post("/v1/cache/drop").await;
    assert_eq!(new.get("f").await, (200, content));
    assert_eq!(new.get("own").await, (200, own));
    new.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_writers_lease_expires_and_it_keeps_its_dirty_blocks() {
    let root = tmp();
    let Some(moto) = moto(
        "a_paused_writers_lease_expires_and_it_keeps_its_dirty_blocks",
        root.path(),
    )
    .await
    else {
        return;
    };
    let ttl = Duration::from_secs(8);
    let common = ["--block-size", "64KiB", "--lease-ttl", "8s"];
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let d = moto
        .launch(&a, STORE)
        .args(&common)
        .args(&["--upload-delay", "off"])
        .start();
    let content = data(5, 2 * BS + 1);
    put(&d, "f", &content).await;
    d.post("/v1/flush").await;
    d.kill9();
    // Restarted with uploads held back: what it acknowledges now stays dirty.
    let old = moto
        .launch(&a, STORE)
        .args(&common)
        .args(&["--upload-delay", "1h"])
        .start();
    let dirty = data(6, 2 * BS + 7);
    put(&old, "dirty", &dirty).await;
    let before = old.json("/v1/stats").await["dirty"].clone();
    assert!(before["bytes"].as_u64() > Some(0), "{before}");

    old.signal(SIGSTOP);
    let paused = Instant::now();
    // A copy of the paused writer's data directory, as up to date as it is (an older copy
    // is refused as out of date: see `owner::an_out_of_date_copy_...`).
    copy_dir(&a, &b);
    let new_launch = || {
        moto.launch(&b, STORE)
            .args(&common)
            .args(&["--upload-delay", "off"])
    };
    // At first the lease is live: refused, naming the holder. (On a machine so slow that
    // the start took longer than the time to live, the lease may already have expired.)
    let mut new = match new_launch().try_start() {
        Err(log) => {
            assert!(
                log.contains(&format!("held by pid {}", old.pid())) && log.contains("expires in"),
                "{log}"
            );
            None
        }
        Ok(d) => {
            assert!(
                paused.elapsed() >= ttl,
                "a second writer started while the lease was live:\n{}",
                d.log_text()
            );
            Some(d)
        }
    };
    // Once the lease expires (by the store's clock), it is taken over without force.
    while new.is_none() {
        match new_launch().try_start() {
            Ok(d) => new = Some(d),
            Err(log) => {
                assert!(log.contains("held by"), "{log}");
                assert!(
                    paused.elapsed() < DEADLINE,
                    "the lease was not taken over after {DEADLINE:?}: {log}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let new = new.expect("started");
    assert!(
        new.log_text().contains("taking over the volume's lease"),
        "{}",
        new.log_text()
    );
    let own = data(7, BS + 5);
    put(&new, "own", &own).await;
    new.post("/v1/flush").await;
    let objects = moto.keys(BUCKET, "vol/data/").await;

    // The old writer wakes: it writes nothing more, says why, and keeps its dirty blocks.
    old.signal(SIGCONT);
    let (status, message) = failed_flush(&old).await;
    assert!(
        message.contains("lease"),
        "the old writer's flush ({status}) names the lease: {message}"
    );
    assert_eq!(moto.keys(BUCKET, "vol/data/").await, objects);
    let after = old.json("/v1/stats").await["dirty"].clone();
    assert_eq!(
        (&after["bytes"], &after["entries"]),
        (&before["bytes"], &before["entries"]),
        "dirty blocks before the pause: {before}, after: {after}"
    );
    assert_eq!(old.get("dirty").await, (200, dirty));

    new.post("/v1/cache/drop").await;
    assert_eq!(new.get("f").await, (200, content));
    assert_eq!(new.get("own").await, (200, own));
    new.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volume_holds_no_plaintext_and_needs_its_key() {
    let root = tmp();
    let Some(moto) = moto(
        "an_encrypted_volume_holds_no_plaintext_and_needs_its_key",
        root.path(),
    )
    .await
    else {
        return;
    };
    let key = root.path().join("key");
    std::fs::write(&key, rand::random::<[u8; 32]>()).expect("key file");
    let key_arg = key.to_str().expect("utf-8");
    let dir = root.path().join("enc");
    // Uncompressed, so that only the encryption stands between the plaintext and the
    // bucket (compressed text holds few plain runs anyway).
    let args = [
        "--block-size",
        "64KiB",
        "--upload-delay",
        "off",
        "--compression",
        "none",
        "--encryption-key-file",
        key_arg,
    ];
    let d = moto.launch(&dir, STORE).args(&args).start();
    let plain = text(8, 4 * BS + 100);
    put(&d, "t", &plain).await;
    d.post("/v1/flush").await;
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("t").await, (200, plain.clone()));
    d.stop();

    // No object of the bucket (data, record, lease) holds 64 bytes of the plaintext.
    let runs: HashSet<&[u8]> = plain.windows(64).collect();
    let keys = moto.keys(BUCKET, "vol/").await;
    assert!(
        keys.iter().filter(|k| k.contains("/data/")).count() >= 5,
        "{keys:?}"
    );
    for k in &keys {
        let object = moto.object(BUCKET, k).await;
        assert!(
            !object.windows(64).any(|w| runs.contains(w)),
            "object {k} holds plaintext"
        );
    }

    // Without the key, or with another one: refused, saying what to give.
    let no_key: Vec<&str> = args[..args.len() - 2].to_vec();
    let log = refused(moto.launch(&dir, STORE).args(&no_key));
    assert!(
        log.contains("is encrypted") && log.contains("--encryption-key-file"),
        "{log}"
    );
    let other = root.path().join("other-key");
    std::fs::write(&other, rand::random::<[u8; 32]>()).expect("key file");
    let mut other_args = no_key.clone();
    other_args.extend(["--encryption-key-file", other.to_str().expect("utf-8")]);
    let log = refused(moto.launch(&dir, STORE).args(&other_args));
    assert!(log.contains("is not the key of volume"), "{log}");
    // With its key it serves the file again.
    let d = moto.launch(&dir, STORE).args(&args).start();
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("t").await, (200, plain));
    d.stop();

    // The same text in a compressed (zstd, the default) and encrypted volume: the store
    // holds well under its logical size.
    let d = moto
        .launch(&root.path().join("zstd"), "s3://bkt/zstd")
        .args(&[
            "--block-size",
            "64KiB",
            "--upload-delay",
            "off",
            "--encryption-key-file",
            key_arg,
        ])
        .start();
    let plain = text(9, 8 * BS);
    put(&d, "t", &plain).await;
    d.post("/v1/flush").await;
    let store = d.json("/v1/stats").await["store"].clone();
    let logical = store["logical_bytes"].as_u64().expect("logical bytes");
    let stored = store["stored_bytes"].as_u64().expect("stored bytes");
    assert_eq!(logical, plain.len() as u64, "{store}");
    eprintln!("compressed and encrypted: {stored} of {logical} logical bytes stored");
    assert!(
        stored < logical / 2,
        "compressible text stored whole: {store}"
    );
    let in_bucket: usize = {
        let mut total = 0;
        for k in moto.keys(BUCKET, "zstd/data/").await {
            total += moto.object(BUCKET, &k).await.len();
        }
        total
    };
    assert!(
        (in_bucket as u64) < logical / 2,
        "{in_bucket} bytes in the bucket"
    );
    d.post("/v1/cache/drop").await;
    assert_eq!(d.get("t").await, (200, plain));
    d.stop();
}

/// A tmpfs of `size`, or `None` with the reason printed.
fn tmpfs(size: &str) -> Option<Tmpfs> {
    Tmpfs::mount(size)
        .inspect_err(|why| eprintln!("skipped: {why}"))
        .ok()
}

fn umount(path: &Path, lazy: bool) {
    let mut cmd = Command::new("umount");
    if lazy {
        cmd.arg("-l");
    }
    let status = cmd.arg(path).status().expect("run umount");
    assert!(status.success(), "umount {}", path.display());
}

/// The number of files under `dir`, recursively.
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.expect("entry").path())
        .map(|p| if p.is_dir() { count_files(&p) } else { 1 })
        .sum()
}

fn file_store(path: &Path) -> String {
    format!("file://{}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_whose_file_system_is_gone_is_never_recreated() {
    let Some(fs) = tmpfs("16m") else {
        return;
    };
    let root = tmp();
    let store: PathBuf = fs.path().join("store");
    let args = ["--block-size", "64KiB", "--upload-delay", "off"];
    let d = Daemon::start(
        root.path(),
        &[&["--store", &file_store(&store)][..], &args].concat(),
    );
    let content = data(10, 2 * BS + 11);
    put(&d, "f", &content).await;
    d.post("/v1/flush").await;
    d.stop();

    // The store's file system is not mounted at the next start.
    umount(fs.path(), false);
    let log = refused(
        Launch::new(root.path())
            .args(&["--store", &file_store(&store)])
            .args(&args),
    );
    assert!(
        log.contains("the store has no volume record")
            && log.contains("is its file system mounted?"),
        "{log}"
    );
    assert!(
        !store.exists() && list_dir(fs.path()).is_empty(),
        "the refused start left {:?} under the mount point",
        list_dir(fs.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_unmounted_or_moved_while_running_gets_no_writes() {
    let Some(fs) = tmpfs("16m") else {
        return;
    };
    let args = ["--block-size", "64KiB", "--upload-delay", "off"];
    // Unmounted (lazily: the daemon may have files open there).
    let root = tmp();
    let store = fs.path().join("store");
    let d = Daemon::start(
        root.path(),
        &[&["--store", &file_store(&store)][..], &args].concat(),
    );
    put(&d, "f", &data(11, BS + 1)).await;
    d.post("/v1/flush").await;
    umount(fs.path(), true);
    put(&d, "g", &data(12, BS + 2)).await;
    let (status, message) = failed_flush(&d).await;
    assert!(
        message.contains(&store.display().to_string()),
        "the flush ({status}) names the store directory: {message}"
    );
    assert!(
        !store.exists() && list_dir(fs.path()).is_empty(),
        "written under the mount point: {:?}",
        list_dir(fs.path())
    );
    drop(d);

    // Renamed away.
    let root = tmp();
    let store = root.path().join("store");
    let moved = root.path().join("moved");
    let data_dir = root.path().join("data");
    let d = Daemon::start(
        &data_dir,
        &[&["--store", &file_store(&store)][..], &args].concat(),
    );
    put(&d, "f", &data(13, BS + 3)).await;
    d.post("/v1/flush").await;
    std::fs::rename(&store, &moved).expect("rename the store");
    let objects = count_files(&moved);
    put(&d, "g", &data(14, BS + 4)).await;
    let (status, message) = failed_flush(&d).await;
    assert!(
        message.contains(&store.display().to_string()),
        "the flush ({status}) names the store directory: {message}"
    );
    assert!(!store.exists(), "the store directory was recreated");
    assert_eq!(count_files(&moved), objects, "written to the moved store");
}
