//! The disaster drill: the store alone restores a volume. The real daemon over HTTP writes
//! files of many sizes, replaces, patches, truncates and deletes some, flushes, and dies
//! (SIGKILL); its whole data directory is deleted; `blockcache restore` builds a new one
//! from the store; a daemon started on it serves every flushed file exactly, and nothing
//! deleted comes back. Also: SIGKILL while a writer flushes (nothing answered is lost or
//! broken), the wrong key, a restore while a daemon holds the lease (and `--force-takeover`,
//! which fences it), a corrupted newest generation (the one before it is restored, and the
//! report says so), and `--list`. Each on a `file://` store outside the data directory and
//! on moto's S3 server (skipped, saying why, when moto is not installed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockcache_tests::daemon::{Daemon, Launch, run_cli_env};
use blockcache_tests::moto::{Moto, available_or_skip};
use blockcache_tests::{data, files_under, test_seed, text};

const BS: usize = 64 * 1024;
const BUCKET: &str = "bkt";
/// Small blocks keep the drill fast; background uploads as by default.
const ARGS: &[&str] = &["--block-size", "64KiB"];
/// How long a test waits for something that should happen well within a lease's time to
/// live, on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The store a drill runs on.
enum Store {
    /// `file://` in a directory of its own, outside every data directory.
    File(PathBuf),
    /// `s3://bkt/vol` on moto's server.
    S3(Moto),
}

impl Store {
    fn file(root: &Path) -> Self {
        Self::File(root.join("store"))
    }

    /// Moto with bucket [`BUCKET`]; `None` (the test skips, saying why) without moto.
    async fn s3(test: &str, root: &Path) -> Option<Self> {
        if !available_or_skip(test) {
            return None;
        }
        let moto = Moto::start(root);
        moto.create_bucket(BUCKET).await;
        Some(Self::S3(moto))
    }

    fn url(&self) -> String {
        match self {
            Self::File(dir) => format!("file://{}", dir.display()),
            Self::S3(_) => format!("s3://{BUCKET}/vol"),
        }
    }

    /// A daemon on this store with data in `data_dir`.
    fn launch(&self, data_dir: &Path) -> Launch {
        match self {
            Self::File(_) => Launch::new(data_dir).args(&["--store", &self.url()]),
            Self::S3(moto) => moto.launch(data_dir, &self.url()),
        }
        .args(ARGS)
    }

    /// `blockcache restore --store URL [--data-dir DIR] EXTRA...`: (status, stdout, stderr).
    fn restore(&self, data_dir: Option<&Path>, extra: &[&str]) -> (ExitStatus, String, String) {
        let url = self.url();
        let dir = data_dir.map(|d| d.display().to_string());
        let mut args = vec!["restore", "--store", url.as_str()];
        if let Some(dir) = &dir {
            args.extend(["--data-dir", dir.as_str()]);
        }
        args.extend(extra);
        let env: Vec<(&str, String)> = match self {
            Self::File(_) => Vec::new(),
            Self::S3(moto) => moto.env(),
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, out, err) = run_cli_env(&args, &env, None);
        (status, String::from_utf8_lossy(&out).into_owned(), err)
    }

    /// A restore that must succeed; its `--json` report.
    fn restore_ok(&self, data_dir: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = extra.to_vec();
        args.push("--json");
        let (status, out, err) = self.restore(Some(data_dir), &args);
        assert!(status.success(), "restore failed ({status}):\n{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("the report is JSON ({e}): {out}"))
    }

    /// A restore that must fail: its standard error.
    fn restore_refused(&self, data_dir: &Path, extra: &[&str]) -> String {
        let (status, out, err) = self.restore(Some(data_dir), extra);
        assert!(!status.success(), "the restore succeeded:\n{out}\n{err}");
        err
    }

    /// The metadata objects in the store: name under `meta/`, and bytes.
    async fn meta_objects(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        match self {
            Self::File(dir) => {
                let meta = dir.join("meta");
                for path in files_under(&meta) {
                    let name = path.strip_prefix(&meta).expect("under meta");
                    let bytes = std::fs::read(&path).expect("read a metadata object");
                    out.insert(name.display().to_string(), bytes);
                }
            }
            Self::S3(moto) => {
                for key in moto.keys(BUCKET, "vol/meta/").await {
                    let bytes = moto.object(BUCKET, &key).await;
                    let name = key.strip_prefix("vol/meta/").expect("under meta");
                    out.insert(name.to_owned(), bytes);
                }
            }
        }
        out
    }

    /// Replaces metadata object `name` (under `meta/`) with `bytes`.
    async fn overwrite_meta(&self, name: &str, bytes: &[u8]) {
        match self {
            Self::File(dir) => {
                let path = dir.join("meta").join(name);
                assert!(path.exists(), "no {}", path.display());
                std::fs::write(&path, bytes).expect("overwrite a metadata object");
            }
            Self::S3(moto) => {
                use object_store::ObjectStoreExt;
                let key = format!("vol/meta/{name}");
                assert!(moto.keys(BUCKET, &key).await.contains(&key), "no {key}");
                moto.store(BUCKET)
                    .put(&object_store::path::Path::from(key), bytes.to_vec().into())
                    .await
                    .expect("overwrite a metadata object");
            }
        }
    }
}

/// This machine's host name, as the lease records it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_owned()
}

/// What a volume should hold: name → content.
type Files = BTreeMap<String, Vec<u8>>;

/// PUT, which must be acknowledged.
async fn put(d: &Daemon, files: &mut Files, name: &str, body: Vec<u8>) {
    let r = d.put(name, body.clone()).await;
    let status = r.status().as_u16();
    assert!(
        status == 200 || status == 201,
        "PUT {name}: {status}\n{}",
        d.log_text()
    );
    files.insert(name.to_owned(), body);
}

/// PATCH at `offset`, which must be acknowledged: the file grows, gaps read as zeros.
async fn patch(d: &Daemon, files: &mut Files, name: &str, offset: usize, body: &[u8]) {
    let r = d
        .http
        .patch(d.url(&format!("/v1/files/{name}?offset={offset}")))
        .body(body.to_vec())
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 200, "PATCH {name}\n{}", d.log_text());
    let f = files.get_mut(name).expect("a known file");
    if f.len() < offset + body.len() {
        f.resize(offset + body.len(), 0);
    }
    f[offset..offset + body.len()].copy_from_slice(body);
}

/// Truncation to `size`, which must be acknowledged.
async fn truncate(d: &Daemon, files: &mut Files, name: &str, size: usize) {
    let r = d
        .http
        .post(d.url(&format!("/v1/files/{name}?truncate={size}")))
        .send()
        .await
        .expect("truncate");
    assert_eq!(
        r.status().as_u16(),
        200,
        "truncate {name}\n{}",
        d.log_text()
    );
    files.get_mut(name).expect("a known file").resize(size, 0);
}

/// DELETE, which must be acknowledged.
async fn delete(d: &Daemon, files: &mut Files, name: &str) {
    let r = d
        .http
        .delete(d.url(&format!("/v1/files/{name}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status().as_u16(), 204, "DELETE {name}\n{}", d.log_text());
    files.remove(name);
}

/// Every file the daemon lists (all pages): name → size.
async fn listing(d: &Daemon) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        // The test's names need no escaping in a query.
        let path = match &after {
            Some(a) => format!("/v1/files?limit=100&after={a}"),
            None => "/v1/files?limit=100".to_owned(),
        };
        let r = d.http.get(d.url(&path)).send().await.expect("list");
        assert!(r.status().is_success(), "list: {}", r.status());
        let page: serde_json::Value = r.json().await.expect("a JSON listing");
        for f in page["files"].as_array().expect("files") {
            out.insert(
                f["name"].as_str().expect("name").to_owned(),
                f["size"].as_u64().expect("size"),
            );
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return out,
        }
    }
}

/// The daemon serves exactly `files` (bytes, sizes, the listing), and each of `gone` is 404.
async fn assert_serves(d: &Daemon, files: &Files, gone: &BTreeSet<String>) {
    let want: BTreeMap<String, u64> = files
        .iter()
        .map(|(n, c)| (n.clone(), c.len() as u64))
        .collect();
    assert_eq!(listing(d).await, want, "the listing");
    for (name, content) in files {
        let (status, body) = d.get(name).await;
        assert_eq!(status, 200, "GET {name}\n{}", d.log_text());
        assert!(
            body == *content,
            "{name}: {} bytes read back, {} written, first difference at {:?}",
            body.len(),
            content.len(),
            body.iter().zip(content).position(|(a, b)| a != b)
        );
    }
    for name in gone {
        assert_eq!(d.get(name).await.0, 404, "{name} came back");
    }
}

/// The drill's files: every size around a block, several blocks and a few MiB; some
/// replaced, patched, truncated or deleted after a first flush (their earlier state was
/// shipped), others before any flush. Returns the files and the deleted names.
async fn write_drill_files(d: &Daemon) -> (Files, BTreeSet<String>) {
    let mut files = Files::new();
    let sizes = [
        0,
        1,
        BS - 1,
        BS,
        BS + 1,
        2 * BS,
        3 * BS + 7,
        5 * BS - 3,
        3 * 1024 * 1024 + 123,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        put(
            d,
            &mut files,
            &format!("sizes/{size}"),
            data(100 + i as u64, size),
        )
        .await;
    }
    // Text (compressible) and names with several segments.
    put(d, &mut files, "docs/a/b/text.txt", text(7, 2 * BS + 500)).await;
    for i in 0..10u64 {
        let name = format!("many/{i:02}");
        put(
            d,
            &mut files,
            &name,
            data(200 + i, (i as usize * 7919) % (2 * BS)),
        )
        .await;
    }
    // In the store, with its metadata; then changed: replaced, patched, truncated, deleted.
    d.post("/v1/flush").await;
    put(d, &mut files, "many/04", data(210, 3 * BS + 1)).await;
    patch(d, &mut files, "many/05", 3, &data(211, BS)).await;
    truncate(d, &mut files, "many/06", 17).await;
    let mut gone = BTreeSet::new();
    for name in ["many/03", "sizes/1", &format!("sizes/{}", 3 * BS + 7)] {
        delete(d, &mut files, name).await;
        gone.insert(name.to_owned());
    }
    // Replaced: larger, smaller, empty, from empty.
    put(d, &mut files, "replace/grow", data(300, 10)).await;
    put(d, &mut files, "replace/grow", data(301, 4 * BS + 5)).await;
    put(d, &mut files, "replace/shrink", data(302, 4 * BS + 5)).await;
    put(d, &mut files, "replace/shrink", data(303, BS / 2)).await;
    put(d, &mut files, "replace/empty", data(304, 2 * BS)).await;
    put(d, &mut files, "replace/empty", Vec::new()).await;
    put(d, &mut files, "replace/from-empty", Vec::new()).await;
    put(d, &mut files, "replace/from-empty", data(305, BS + 1)).await;
    // Patched: inside a block, across a boundary, past the end (a gap of zeros).
    put(d, &mut files, "patch/inside", data(400, 3 * BS)).await;
    patch(d, &mut files, "patch/inside", 100, &data(401, 50)).await;
    put(d, &mut files, "patch/across", data(402, 3 * BS)).await;
    patch(d, &mut files, "patch/across", BS - 10, &data(403, BS + 20)).await;
    put(d, &mut files, "patch/beyond", data(404, BS / 2)).await;
    patch(d, &mut files, "patch/beyond", 3 * BS + 11, &data(405, 99)).await;
    put(d, &mut files, "patch/empty", Vec::new()).await;
    patch(d, &mut files, "patch/empty", 0, &data(406, 7)).await;
    // Truncated: shrunk inside a block, to a block boundary, to zero, grown.
    put(d, &mut files, "truncate/mid", data(500, 4 * BS)).await;
    truncate(d, &mut files, "truncate/mid", BS + 333).await;
    put(d, &mut files, "truncate/boundary", data(501, 4 * BS)).await;
    truncate(d, &mut files, "truncate/boundary", 2 * BS).await;
    put(d, &mut files, "truncate/zero", data(502, 2 * BS)).await;
    truncate(d, &mut files, "truncate/zero", 0).await;
    put(d, &mut files, "truncate/grow", data(503, BS / 3)).await;
    truncate(d, &mut files, "truncate/grow", 2 * BS + 17).await;
    // Shrunk, then patched past the cut: the cut-off bytes must not come back.
    put(d, &mut files, "truncate/then-patch", data(504, 3 * BS)).await;
    truncate(d, &mut files, "truncate/then-patch", 100).await;
    patch(d, &mut files, "truncate/then-patch", 2 * BS, &data(505, 10)).await;
    // Deleted: a plain one, a replaced one, a patched one, one deleted and written again.
    for (i, name) in ["gone/plain", "gone/replaced", "gone/patched"]
        .into_iter()
        .enumerate()
    {
        put(d, &mut files, name, data(600 + i as u64, 2 * BS + 1)).await;
    }
    put(d, &mut files, "gone/replaced", data(610, BS)).await;
    patch(d, &mut files, "gone/patched", 5, b"x").await;
    for name in ["gone/plain", "gone/replaced", "gone/patched"] {
        delete(d, &mut files, name).await;
        gone.insert(name.to_owned());
    }
    put(d, &mut files, "again", data(620, BS + 2)).await;
    delete(d, &mut files, "again").await;
    put(d, &mut files, "again", data(621, 2 * BS + 2)).await;
    (files, gone)
}

/// The drill: write, flush, SIGKILL, lose the data directory, restore, serve, read back.
async fn drill(store: &Store, root: &Path) {
    let a = root.join("a");
    let d = store.launch(&a).start();
    let (files, gone) = write_drill_files(&d).await;
    d.post("/v1/flush").await;
    d.kill9();
    std::fs::remove_dir_all(&a).expect("delete the data directory");

    // The killed daemon's lease is still live: its machine is dead, so it is taken over.
    let b = root.join("b");
    let (status, out, err) = store.restore(Some(&b), &["--force-takeover"]);
    assert!(status.success(), "restore failed ({status}):\n{out}\n{err}");
    assert!(
        out.contains(&format!(": {} files, ", files.len())) && !out.contains("warning"),
        "the restore says what it restored, and nothing is missing:\n{out}"
    );
    assert!(
        out.contains("start it with: blockcache serve --data-dir"),
        "{out}"
    );
    let d = store.launch(&b).start();
    assert_serves(&d, &files, &gone).await;
    // The restored volume goes on: a new file and a change survive another round.
    let mut files = files;
    put(&d, &mut files, "after-restore", data(700, BS + 3)).await;
    patch(&d, &mut files, "sizes/0", 0, b"no longer empty").await;
    delete(&d, &mut files, "many/07").await;
    let mut gone = gone;
    gone.insert("many/07".to_owned());
    d.post("/v1/flush").await;
    d.kill9();
    std::fs::remove_dir_all(&b).expect("delete the data directory");
    let c = root.join("c");
    let report = store.restore_ok(&c, &["--force-takeover"]);
    assert_eq!(report["counts"]["files"], files.len() as u64, "{report}");
    assert_eq!(report["missing_objects"], serde_json::json!([]), "{report}");
    let d = store.launch(&c).start();
    assert_serves(&d, &files, &gone).await;
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_a_file_store() {
    let root = tmp();
    drill(&Store::file(root.path()), root.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_s3() {
    let root = tmp();
    let Some(store) = Store::s3("drill_on_s3", root.path()).await else {
        return;
    };
    drill(&store, root.path()).await;
}

/// What the writer of [`killed_while_shipping`] has done, as far as its answers tell.
#[derive(Default)]
struct Writes {
    /// The files as of the last flush answered.
    flushed: BTreeMap<String, Vec<u8>>,
    /// Flushes answered.
    flushes: u64,
    /// Changes sent since the last flush answered (maybe applied): name, content or
    /// deleted.
    since: Vec<(String, Option<Vec<u8>>)>,
    /// Every name written.
    names: BTreeSet<String>,
}

/// A random number from `seed`, `round` and `k`.
fn rnd(seed: u64, round: u64, k: u64) -> u64 {
    let b = data(seed ^ round.wrapping_mul(0x100_0000_01b3) ^ (k << 48), 8);
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Where the writer of [`killed_while_shipping`] is.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Flushes answered.
    flushes: u64,
    /// Whether a flush is in flight.
    in_flight: bool,
    /// The deltas of the metadata's generation before the flush in flight.
    deltas_before: u64,
}

/// A writer that PUTs, patches and deletes files and flushes, from `files`, until a request
/// fails (the daemon is killed). Records what it did in `log`, and where it is in
/// `progress`.
async fn writer(
    d: Arc<Daemon>,
    seed: u64,
    mut files: Files,
    log: Arc<Mutex<Writes>>,
    progress: tokio::sync::watch::Sender<Progress>,
) {
    for round in 0u64.. {
        for k in 0..3u64 {
            let x = rnd(seed, round, k);
            let name = format!("w/{}", x % 12);
            let existing = files.contains_key(&name);
            let op = (x >> 8) % 5;
            let patching = existing && op == 1;
            let change: Option<Vec<u8>> = if existing && op == 0 {
                None
            } else if patching {
                let mut c = files[&name].clone();
                let offset = ((x >> 16) % (c.len() as u64 + BS as u64)) as usize;
                let bytes = data(x, 1 + ((x >> 40) % (BS as u64 + 5)) as usize);
                if c.len() < offset + bytes.len() {
                    c.resize(offset + bytes.len(), 0);
                }
                c[offset..offset + bytes.len()].copy_from_slice(&bytes);
                Some(c)
            } else {
                Some(data(x, ((x >> 16) % (3 * BS as u64)) as usize))
            };
            {
                let mut w = log.lock().expect("log");
                w.since.push((name.clone(), change.clone()));
                w.names.insert(name.clone());
            }
            let url = d.url(&format!("/v1/files/{name}"));
            let sent = match &change {
                None => d.http.delete(url).send().await,
                Some(c) if patching => {
                    // The same change as a PATCH from the first byte that differs.
                    let old = &files[&name];
                    let start = c
                        .iter()
                        .zip(old)
                        .position(|(x, y)| x != y)
                        .unwrap_or(old.len());
                    d.http
                        .patch(format!("{url}?offset={start}"))
                        .body(c[start..].to_vec())
                        .send()
                        .await
                }
                Some(c) => d.http.put(url).body(c.clone()).send().await,
            };
            match sent {
                Ok(r) if r.status().is_success() => {}
                _ => return,
            }
            match change {
                None => files.remove(&name),
                Some(c) => files.insert(name, c),
            };
        }
        let stats = match d.http.get(d.url("/v1/stats")).send().await {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await,
            _ => return,
        };
        let Ok(stats) = stats else { return };
        let deltas = stats["metadata"]["deltas"].as_u64().unwrap_or(0);
        progress.send_modify(|p| {
            p.in_flight = true;
            p.deltas_before = deltas;
        });
        match d.http.post(d.url("/v1/flush")).send().await {
            Ok(r) if r.status().is_success() => {}
            _ => return,
        }
        {
            let mut w = log.lock().expect("log");
            w.flushed = files.clone();
            w.flushes += 1;
            w.since.clear();
        }
        progress.send_modify(|p| {
            p.in_flight = false;
            p.flushes += 1;
        });
    }
}

/// Runs [`writer`] on daemon `d` (data in `data_dir`) from `files` until `kill_when` holds
/// (and, if `mid_round`, until the flush in flight has shipped a delta), SIGKILLs the
/// daemon, deletes its data directory, restores into `restored`, starts a daemon there and
/// checks that every file is as of the last flush answered or newer. Returns that daemon
/// and its files.
async fn kill_and_restore(
    store: &Store,
    (d, data_dir): (Daemon, &Path),
    seed: u64,
    files: Files,
    (kill_when, mid_round): (impl Fn(&Progress) -> bool, bool),
    restored: &Path,
) -> (Daemon, Files) {
    let d = Arc::new(d);
    let log = Arc::new(Mutex::new(Writes::default()));
    log.lock().expect("log").flushed.clone_from(&files);
    log.lock().expect("log").names = files.keys().cloned().collect();
    let (tx, mut rx) = tokio::sync::watch::channel(Progress::default());
    let task = tokio::spawn(writer(Arc::clone(&d), seed, files, Arc::clone(&log), tx));
    let reached = tokio::time::timeout(DEADLINE, rx.wait_for(&kill_when))
        .await
        .map(|r| r.map(|p| *p));
    let at = match reached {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => panic!("the writer stopped:\n{}", d.log_text()),
        Err(_) => panic!("no kill point after {DEADLINE:?}: {:?}", *rx.borrow()),
    };
    if mid_round {
        // Killed once the flush's round has shipped its delta, while it goes on (to the
        // snapshot), unless the flush was answered first.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while rx.borrow().in_flight {
            let Ok(r) = d.http.get(d.url("/v1/stats")).send().await else {
                break;
            };
            let stats: serde_json::Value = r.json().await.unwrap_or_default();
            if stats["metadata"]["deltas"].as_u64() != Some(at.deltas_before) {
                eprintln!("metadata at the kill: {}", stats["metadata"]);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the flush hangs");
        }
    }
    d.signal(9);
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the writer ends once the daemon is dead")
        .expect("the writer");
    drop(Arc::into_inner(d).expect("the writer let go of the daemon"));
    let writes = std::mem::take(&mut *log.lock().expect("log"));
    eprintln!(
        "killed at {at:?}: {} flushes answered, {} changes since",
        writes.flushes,
        writes.since.len()
    );
    // The killed daemon's database, for a failure's report.
    let killed_db = tempfile::tempdir().expect("tmp");
    for f in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        let _ = std::fs::copy(data_dir.join(f), killed_db.path().join(f));
    }
    std::fs::remove_dir_all(data_dir).expect("delete the data directory");

    let report = store.restore_ok(restored, &["--force-takeover"]);
    eprintln!("restore: {report}");
    assert_eq!(report["missing_objects"], serde_json::json!([]), "{report}");
    let d = store.launch(restored).start();
    let listed = listing(&d).await;
    let mut now = Files::new();
    for name in &writes.names {
        let mut allowed: Vec<Option<&Vec<u8>>> = vec![writes.flushed.get(name)];
        allowed.extend(
            writes
                .since
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, c)| c.as_ref()),
        );
        let (status, body) = d.get(name).await;
        let got = match status {
            200 => Some(&body),
            404 => None,
            s => panic!("GET {name}: {s}\n{}", d.log_text()),
        };
        if !allowed.contains(&got) {
            // What the next look at a failure needs: every version allowed, and where the
            // restored bytes first differ from each.
            let versions: Vec<String> = allowed
                .iter()
                .map(|v| match (v, got) {
                    (None, _) => "absent".to_owned(),
                    (Some(v), Some(g)) => format!(
                        "{} bytes, first difference at {:?}",
                        v.len(),
                        v.iter().zip(g.iter()).position(|(a, b)| a != b)
                    ),
                    (Some(v), None) => format!("{} bytes", v.len()),
                })
                .collect();
            let zeros = got.map_or(0, |g| g.iter().filter(|&&b| b == 0).count());
            let blocks: Vec<String> = got
                .map(|g| {
                    g.chunks(BS)
                        .map(|c| {
                            if c.iter().all(|&b| b == 0) {
                                "zeros".to_owned()
                            } else {
                                format!("{:02x}{:02x}..", c[0], c.get(1).copied().unwrap_or(0))
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let killed = rows_of(&killed_db.path().join("meta.db"), name).await;
            let restored_rows = rows_of(&restored.join("meta.db"), name).await;
            panic!(
                "{name} restored as {} (status {status}, {zeros} zero bytes, blocks {blocks:?}); allowed: the last flush answered, then the changes sent after it: {versions:?}\nrestore: {report}\nthe killed daemon's database: {killed}\nthe restored database: {restored_rows}\nlog of the restored daemon:\n{}",
                got.map_or("absent".to_owned(), |b| format!("{} bytes", b.len())),
                d.log_text()
            );
        }
        assert_eq!(
            listed.get(name).copied(),
            got.map(|b| b.len() as u64),
            "{name} in the listing"
        );
        if let Some(b) = got {
            now.insert(name.clone(), b.clone());
        }
    }
    assert!(
        listed.keys().all(|n| writes.names.contains(n)),
        "files nobody wrote: {listed:?}"
    );
    (d, now)
}

/// SIGKILL while a writer flushes; the store then restores every file as of the last flush
/// answered or newer, never broken or missing, and nothing deleted before it. Twice: at a
/// flush chosen by the seed, then, on the restored volume, at the flush that writes the
/// next generation's snapshot (after 64 deltas).
/// What a database holds of file `name`: its row and its blocks, in the volume's tables and
/// in the shipped state, and the changes noted (for a failure's report).
async fn rows_of(db: &Path, name: &str) -> String {
    let Ok(pool) = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display())).await
    else {
        return format!("{} cannot be opened", db.display());
    };
    let mut out = String::new();
    let queries: [(&str, &str); 6] = [
        (
            "files",
            "SELECT json_group_array(json_array(name, inode, size, version)) FROM files WHERE name = ?1",
        ),
        (
            "blocks",
            "SELECT json_group_array(json_array(inode, blockno, obj_id)) FROM blocks WHERE inode IN (SELECT inode FROM files WHERE name = ?1)",
        ),
        (
            "shipped_files",
            "SELECT json_group_array(json_array(name, inode, size, version)) FROM shipped_files WHERE name = ?1",
        ),
        (
            "shipped_blocks",
            "SELECT json_group_array(json_array(inode, blockno, obj_id)) FROM shipped_blocks WHERE inode IN (SELECT inode FROM shipped_files WHERE name = ?1)",
        ),
        (
            "position",
            "SELECT json_group_array(json_array(key, value)) FROM volume WHERE key LIKE 'meta_%' AND ?1 IS NOT NULL",
        ),
        (
            "meta_changes",
            "SELECT json_group_array(json_array(kind, a, b, name, seq, last)) FROM meta_changes WHERE ?1 IS NOT NULL",
        ),
    ];
    for (what, q) in queries {
        let v: Result<String, _> = sqlx::query_scalar(q).bind(name).fetch_one(&pool).await;
        out.push_str(&format!(
            "\n  {what}: {}",
            v.unwrap_or_else(|e| e.to_string())
        ));
    }
    pool.close().await;
    out
}

async fn killed_while_shipping(store: &Store, root: &Path) {
    let seed = test_seed();
    let kill_after = 2 + seed % 40;
    let a = root.join("a");
    let d = store.launch(&a).start();
    let b = root.join("b");
    let at_flush = |p: &Progress| p.in_flight && p.flushes >= kill_after;
    let (d, files) =
        kill_and_restore(store, (d, &a), seed, Files::new(), (at_flush, false), &b).await;
    let c = root.join("c");
    let at_snapshot = |p: &Progress| p.in_flight && p.deltas_before >= 62;
    let (d, _) = kill_and_restore(store, (d, &b), seed ^ 1, files, (at_snapshot, true), &c).await;
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_shipping_on_a_file_store() {
    let root = tmp();
    killed_while_shipping(&Store::file(root.path()), root.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_shipping_on_s3() {
    let root = tmp();
    let Some(store) = Store::s3("killed_while_shipping_on_s3", root.path()).await else {
        return;
    };
    killed_while_shipping(&store, root.path()).await;
}

/// A restore with the wrong key, or none, is refused naming the key, and leaves the data
/// directory as it was; the right key restores; the metadata in the store holds no file
/// name in the clear.
async fn wrong_key(store: &Store, root: &Path) {
    let key = root.join("key");
    let other = root.join("other-key");
    std::fs::write(&key, data(1, 32)).expect("key file");
    std::fs::write(&other, data(2, 32)).expect("key file");
    let key_arg = key.display().to_string();
    let other_arg = other.display().to_string();
    let a = root.join("a");
    let d = store
        .launch(&a)
        .args(&["--encryption-key-file", &key_arg])
        .start();
    let mut files = Files::new();
    put(
        &d,
        &mut files,
        "plaintext-name-in-the-clear",
        text(3, 2 * BS + 9),
    )
    .await;
    put(&d, &mut files, "b", data(4, BS + 1)).await;
    d.post("/v1/flush").await;
    d.stop();
    for (name, bytes) in store.meta_objects().await {
        assert!(
            !bytes
                .windows(b"plaintext-name".len())
                .any(|w| w == b"plaintext-name"),
            "metadata object {name} holds a file name in the clear"
        );
    }

    let absent = root.join("absent");
    let err = store.restore_refused(&absent, &["--encryption-key-file", &other_arg]);
    assert!(
        err.contains("the encryption key given is not the key of volume"),
        "the refusal names the key: {err}"
    );
    assert!(
        !absent.exists(),
        "the refused restore left {}",
        absent.display()
    );
    let empty = root.join("empty");
    std::fs::create_dir(&empty).expect("an empty directory");
    let err = store.restore_refused(&empty, &["--encryption-key-file", &other_arg]);
    assert!(err.contains("not the key of volume"), "{err}");
    assert_eq!(
        std::fs::read_dir(&empty).map(Iterator::count).ok(),
        Some(0),
        "the refused restore left the empty data directory as it was"
    );
    let err = store.restore_refused(&absent, &[]);
    assert!(
        err.contains("is encrypted: give its key with --encryption-key-file"),
        "{err}"
    );
    assert!(!absent.exists());

    let report = store.restore_ok(&absent, &["--encryption-key-file", &key_arg]);
    assert_eq!(report["counts"]["files"], 2, "{report}");
    let d = store
        .launch(&absent)
        .args(&["--encryption-key-file", &key_arg])
        .start();
    assert_serves(&d, &files, &BTreeSet::new()).await;
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_on_a_file_store() {
    let root = tmp();
    wrong_key(&Store::file(root.path()), root.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_on_s3() {
    let root = tmp();
    let Some(store) = Store::s3("wrong_key_on_s3", root.path()).await else {
        return;
    };
    wrong_key(&store, root.path()).await;
}

/// A restore while a daemon holds the lease is refused naming it; `--force-takeover`
/// restores, and the old daemon is fenced: its next flush fails.
async fn lease_held(store: &Store, root: &Path) {
    let a = root.join("a");
    // Renewals every 2 s: the old daemon soon learns that it was superseded.
    let old = store.launch(&a).args(&["--lease-ttl", "8s"]).start();
    let mut files = Files::new();
    put(&old, &mut files, "f", data(1, 2 * BS + 3)).await;
    put(&old, &mut files, "g", data(2, 10)).await;
    old.post("/v1/flush").await;

    let b = root.join("b");
    let err = store.restore_refused(&b, &[]);
    assert!(
        err.contains(&format!("held by pid {} on {}", old.pid(), host()))
            && err.contains("--force-takeover"),
        "the refusal names the holder and what to do: {err}"
    );
    assert!(!b.exists(), "the refused restore left {}", b.display());

    let report = store.restore_ok(&b, &["--force-takeover"]);
    assert_eq!(report["counts"]["files"], 2, "{report}");
    old.wait_for_log("this daemon no longer writes to the store")
        .await;
    let late = data(3, BS + 9);
    let r = old.put("late", late.clone()).await;
    assert!(r.status().is_success(), "{}", r.status());
    let r = old
        .http
        .post(old.url("/v1/flush"))
        .send()
        .await
        .expect("POST");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert!(
        !status.is_success() && body.contains("lease"),
        "the fenced daemon's flush fails naming the lease: {status} {body}"
    );

    let new = store.launch(&b).start();
    let gone = BTreeSet::from(["late".to_owned()]);
    assert_serves(&new, &files, &gone).await;
    new.stop();
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_held_on_a_file_store() {
    let root = tmp();
    lease_held(&Store::file(root.path()), root.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_held_on_s3() {
    let root = tmp();
    let Some(store) = Store::s3("lease_held_on_s3", root.path()).await else {
        return;
    };
    lease_held(&store, root.path()).await;
}

/// `restore --list` as text: (generation, complete, parts, deltas) of each line.
fn listed_generations(store: &Store) -> Vec<(u64, bool, u64, u64)> {
    let (status, out, err) = store.restore(None, &["--list"]);
    assert!(status.success(), "restore --list: {out}\n{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines
            .next()
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>),
        Some(vec![
            "generation",
            "complete",
            "parts",
            "deltas",
            "bytes",
            "last",
            "written"
        ]),
        "{out}"
    );
    lines
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w.len(), 6, "{l}");
            (
                w[0].parse().expect("generation"),
                w[1] == "yes",
                w[2].parse().expect("parts"),
                w[3].parse().expect("deltas"),
            )
        })
        .collect()
}

/// The generations that `--list` shows, as text and as JSON (which must agree); all
/// complete.
fn generations(store: &Store) -> Vec<u64> {
    let listed = listed_generations(store);
    assert!(listed.iter().all(|g| g.1), "{listed:?}");
    let (status, out, err) = store.restore(None, &["--list", "--json"]);
    assert!(status.success(), "{out}\n{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let gens: Vec<u64> = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|g| g["generation"].as_u64().expect("generation"))
        .collect();
    assert_eq!(
        gens,
        listed.iter().map(|g| g.0).collect::<Vec<_>>(),
        "{out}"
    );
    gens
}

/// Three generations: the volume's first, and one for each restored daemon, each with
/// changes of its own. The newest's manifest is corrupted: restore falls back to the one
/// before, says so, and restores its files. `--list` shows them all.
async fn corrupted_generation(store: &Store, root: &Path) {
    let (status, out, err) = store.restore(None, &["--list"]);
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), "no metadata generation in the store");

    let a = root.join("a");
    let d = store.launch(&a).start();
    let mut first = Files::new();
    for i in 0..5u64 {
        put(
            &d,
            &mut first,
            &format!("f{i}"),
            data(i, i as usize * BS + 1),
        )
        .await;
    }
    d.post("/v1/flush").await;
    d.stop();
    let listed = listed_generations(store);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (g1, complete, parts, deltas) = listed[0];
    assert!(complete && parts + deltas >= 1, "{listed:?}");

    // A restored daemon starts a generation of its own: a new file and a replaced one.
    let b = root.join("b");
    store.restore_ok(&b, &[]);
    let d = store.launch(&b).start();
    let mut second = first.clone();
    put(&d, &mut second, "new", data(10, BS)).await;
    put(&d, &mut second, "f1", data(11, 2 * BS)).await;
    d.post("/v1/flush").await;
    d.stop();
    let gens = generations(store);
    assert_eq!(gens.len(), 2, "{gens:?}");
    let g2 = gens[1];
    assert!(g2 > g1);

    // Intact, the newest is restored; its daemon starts a third one, with one more file.
    let c = root.join("c");
    let report = store.restore_ok(&c, &[]);
    assert_eq!(report["generation"], g2, "{report}");
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    let d = store.launch(&c).start();
    assert_serves(&d, &second, &BTreeSet::new()).await;
    let mut third = second.clone();
    put(&d, &mut third, "third", data(12, BS + 5)).await;
    d.post("/v1/flush").await;
    d.stop();
    let gens = generations(store);
    assert_eq!(gens.len(), 3, "{gens:?}");
    let g3 = gens[2];

    // The newest's manifest corrupted, the one before is restored, and the report says so.
    store
        .overwrite_meta(&format!("{g3:010}/manifest"), b"garbage, not a manifest")
        .await;
    let e = root.join("e");
    let (status, out, err) = store.restore(Some(&e), &[]);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!("skipped: generation {g3} could not be used: "))
            && out.contains(&format!("from generation {g2} ")),
        "the text report says which generation was skipped and why:\n{out}"
    );
    let f = root.join("f");
    let report = store.restore_ok(&f, &[]);
    assert_eq!(report["generation"], g2, "{report}");
    let skipped = report["skipped"].as_array().expect("skipped");
    assert!(
        skipped.len() == 1
            && skipped[0].as_str().is_some_and(|s| {
                s.contains(&format!("generation {g3} ")) && s.contains("manifest")
            }),
        "{report}"
    );
    assert_eq!(report["missing_objects"], serde_json::json!([]), "{report}");
    let d = store.launch(&f).start();
    assert_serves(&d, &second, &BTreeSet::from(["third".to_owned()])).await;
    d.stop();

    // The first generation, asked for by number: its files, but "f1" as it was then is
    // gone from the store once it was replaced (only the newest generation's objects are
    // kept): the restore names it as broken, and it reads as an error, never wrong bytes.
    let g = root.join("g");
    let report = store.restore_ok(&g, &["--generation", &g1.to_string()]);
    assert_eq!(report["generation"], g1, "{report}");
    let broken: Vec<&str> = report["broken_files"]
        .as_array()
        .expect("broken files")
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(broken.iter().all(|b| *b == "f1"), "{report}");
    let d = store.launch(&g).start();
    let want: BTreeMap<String, u64> = first
        .iter()
        .map(|(n, c)| (n.clone(), c.len() as u64))
        .collect();
    assert_eq!(listing(&d).await, want);
    for (name, content) in &first {
        let (status, body) = d.get(name).await;
        if broken.contains(&name.as_str()) {
            assert_ne!(status, 200, "{name}: a broken file reads as an error");
        } else {
            assert_eq!((status, &body), (200, content), "{name}");
        }
    }
    assert_eq!(d.get("new").await.0, 404);
    eprintln!("generation {g1} restored with broken files {broken:?}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_generation_and_list_on_a_file_store() {
    let root = tmp();
    corrupted_generation(&Store::file(root.path()), root.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_generation_and_list_on_s3() {
    let root = tmp();
    let Some(store) = Store::s3("corrupted_generation_and_list_on_s3", root.path()).await else {
        return;
    };
    corrupted_generation(&store, root.path()).await;
}
