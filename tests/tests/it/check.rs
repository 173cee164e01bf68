//! `check`: the database, the store and the cache compared, on real SQLite files and real
//! `file://` stores. The library (`BlockCache::check`) on volumes damaged by hand (an object
//! file deleted or altered, a stray object, a refcount changed, a stale cache file), then
//! the command line against the real daemon and on a stopped volume: exit codes, what the
//! summary names, and `--repair`.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use blockcache::{BlockCache, CheckOptions, CheckReport, Durability, Namespace};
use blockcache_tests::daemon::{Daemon, run_cli};
use blockcache_tests::{Env, data};

const BS: usize = 1024;

/// The options of a check that takes any unreferenced object as leaked.
fn opts() -> CheckOptions {
    CheckOptions {
        grace: Duration::ZERO,
        ..CheckOptions::default()
    }
}

fn verify() -> CheckOptions {
    CheckOptions {
        verify_data: true,
        ..opts()
    }
}

fn repair(o: CheckOptions) -> CheckOptions {
    CheckOptions { repair: true, ..o }
}

async fn check(cache: &BlockCache, o: CheckOptions) -> CheckReport {
    cache.check(o).await.expect("check runs")
}

/// A namespace over a fresh volume with file `name` of `content`, in the store.
async fn volume_with(env: &Env, name: &str, content: &[u8]) -> Namespace {
    let ns = Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("namespace");
    let mut w = ns.create(name).await.expect("create");
    w.write(content).await.expect("write");
    w.finish(Durability::Store).await.expect("finish");
    ns
}

/// The store's object whose file holds exactly `bytes` (plain objects: the block itself).
fn object_holding(env: &Env, bytes: &[u8]) -> u64 {
    let found: Vec<u64> = blockcache_tests::files_under(&env.store_dir().join("data"))
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b == bytes))
        .map(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .expect("object file name")
        })
        .collect();
    assert_eq!(found.len(), 1, "objects holding those bytes: {found:?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_volume_is_consistent_with_dirty_blocks_and_young_objects() {
    let env = Env::new();
    let ns = volume_with(&env, "a/b.bin", &data(1, 3 * BS + 100)).await;
    // A block written and not uploaded: a cache file without a mapping, which is no problem.
    let mut w = ns.create("dirty").await.expect("create");
    w.write(&data(2, 2 * BS)).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    // An object nothing references yet, written a moment ago: an upload in flight as far as
    // anyone can tell, within the default grace period.
    let stray = Env::nth_object(1000);
    let path = env.object_path(stray);
    std::fs::create_dir_all(path.parent().expect("shard")).expect("shard dir");
    std::fs::write(&path, data(3, BS)).expect("stray object");

    let r = check(
        ns.cache(),
        CheckOptions {
            verify_data: true,
            ..CheckOptions::default()
        },
    )
    .await;
    assert!(r.is_consistent() && r.consistent, "{r}");
    assert_eq!(r.problems(), 0, "{r}");
    assert_eq!(r.unreferenced_young, 1, "{r}");
    assert_eq!((r.objects, r.store_objects), (4, 5), "{r}");
    assert_eq!(r.verified_objects, 4, "{r}");
    assert!(r.cache_files >= 6, "{r}");
    assert!(
        r.to_string().contains("consistent: no problems found"),
        "{r}"
    );
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_object_is_named_by_file_and_range_and_reuploaded_from_the_cache() {
    let env = Env::new();
    let content = data(4, 3 * BS + 100);
    let ns = volume_with(&env, "docs/f.bin", &content).await;
    let id = object_holding(&env, &content[BS..2 * BS]);
    std::fs::remove_file(env.object_path(id)).expect("delete the object");

    let r = check(ns.cache(), opts()).await;
    assert!(!r.is_consistent(), "{r}");
    assert_eq!(r.missing.len(), 1, "{r}");
    let m = &r.missing[0];
    assert_eq!(m.id, id);
    assert_eq!(m.ranges.len(), 1, "{r}");
    let range = &m.ranges[0];
    assert_eq!(
        (range.file.as_deref(), range.start, range.end),
        (Some("docs/f.bin"), BS as u64, 2 * BS as u64),
        "{r}"
    );
    let text = r.to_string();
    assert!(
        text.contains(r#"file "docs/f.bin" bytes 1024..2048"#) && text.contains("NOT consistent"),
        "{text}"
    );

    // The cache still holds the block: the repair uploads it again.
    let r = check(ns.cache(), repair(opts())).await;
    assert!(r.is_consistent() && r.missing[0].fixed, "{r}");
    assert_eq!(
        std::fs::read(env.object_path(id)).expect("object"),
        &content[BS..2 * BS]
    );
    let r = check(ns.cache(), verify()).await;
    assert!(r.is_consistent() && r.problems() == 0, "{r}");
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_object_without_a_cached_copy_fails_reads_and_is_not_fixed() {
    let env = Env::new();
    let content = data(5, 2 * BS + 7);
    let ns = volume_with(&env, "lost.bin", &content).await;
    let id = object_holding(&env, &content[2 * BS..]);
    ns.cache().clear().await.expect("empty the cache");
    std::fs::remove_file(env.object_path(id)).expect("delete the object");

    let reader = ns.open_read("lost.bin").await.expect("open");
    let error = reader
        .read(2 * BS as u64, 7)
        .await
        .expect_err("a read of a missing object fails");
    let told = blockcache_backend::chain(&error);
    assert!(
        told.contains(&format!("object {id}")) && told.contains("not found"),
        "{told}"
    );
    assert_eq!(
        &reader.read(0, BS).await.expect("the other blocks read")[..],
        &content[..BS]
    );
    drop(reader);

    let r = check(ns.cache(), repair(opts())).await;
    assert!(!r.is_consistent() && r.unfixed() == 1, "{r}");
    let range = &r.missing[0].ranges[0];
    assert_eq!(
        (range.file.as_deref(), range.start, range.end),
        (Some("lost.bin"), 2 * BS as u64, 2 * BS as u64 + 7),
        "{r}"
    );
    let text = r.to_string();
    assert!(
        text.contains("[NOT FIXED]") && text.contains("no copy in the cache"),
        "{text}"
    );
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_object_past_the_grace_period_is_a_leak_and_repair_deletes_it() {
    let env = Env::new();
    let ns = volume_with(&env, "kept", &data(6, BS)).await;
    let stray = Env::nth_object(500);
    let path = env.object_path(stray);
    std::fs::create_dir_all(path.parent().expect("shard")).expect("shard dir");
    std::fs::write(&path, b"nobody's").expect("stray object");

    let young = check(
        ns.cache(),
        CheckOptions {
            grace: Duration::from_secs(3600),
            ..CheckOptions::default()
        },
    )
    .await;
    assert!(
        young.is_consistent() && young.unreferenced_young == 1,
        "{young}"
    );

    let r = check(ns.cache(), opts()).await;
    assert!(!r.is_consistent(), "{r}");
    assert_eq!(
        r.leaked.iter().map(|l| (l.id, l.size)).collect::<Vec<_>>(),
        [(stray, 8)],
        "{r}"
    );
    let r = check(ns.cache(), repair(opts())).await;
    assert!(r.is_consistent() && r.leaked[0].fixed, "{r}");
    assert!(!path.exists(), "the leaked object is deleted");
    let r = check(ns.cache(), opts()).await;
    assert!(r.is_consistent() && r.problems() == 0, "{r}");
    assert_eq!(ns.cache().usage().await.expect("usage").pending_removals, 0);
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_bytes_are_found_only_when_verifying_and_replaced_from_the_cache() {
    let env = Env::new();
    let content = data(7, 2 * BS);
    let ns = volume_with(&env, "x/y", &content).await;
    let id = object_holding(&env, &content[..BS]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(env.object_path(id))
        .expect("object file");
    file.write_all_at(&[!content[10]], 10)
        .expect("alter a byte");
    drop(file);

    let r = check(ns.cache(), opts()).await;
    assert!(r.is_consistent() && r.problems() == 0, "same size: {r}");
    let r = check(ns.cache(), verify()).await;
    assert!(!r.is_consistent(), "{r}");
    assert_eq!(r.damaged.len(), 1, "{r}");
    let d = &r.damaged[0];
    assert!(d.id == id && d.reason.contains("SHA-256"), "{r}");
    assert_eq!(
        (
            d.ranges[0].file.as_deref(),
            d.ranges[0].start,
            d.ranges[0].end
        ),
        (Some("x/y"), 0, BS as u64),
        "{r}"
    );
    let r = check(ns.cache(), repair(verify())).await;
    assert!(r.is_consistent() && r.damaged[0].fixed, "{r}");
    assert_eq!(
        std::fs::read(env.object_path(id)).expect("object"),
        &content[..BS]
    );
    let r = check(ns.cache(), verify()).await;
    assert!(r.is_consistent() && r.problems() == 0, "{r}");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_keeps_to_its_rate() {
    let env = Env::new();
    let ns = volume_with(&env, "paced", &data(13, 3 * BS)).await;
    // Three objects of 1 KiB at 2 KiB/s: the third download starts a second after the first.
    let started = std::time::Instant::now();
    let r = check(
        ns.cache(),
        CheckOptions {
            verify_rate: 2 * BS as u64,
            ..verify()
        },
    )
    .await;
    let took = started.elapsed();
    assert!(r.is_consistent() && r.verified_objects == 3, "{r}");
    assert!(took >= Duration::from_secs(1), "3 KiB verified in {took:?}");
    ns.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_refcounts_are_rebuilt_in_one_transaction() {
    let env = Env::new();
    let cache = env.open().await;
    let same = data(8, BS);
    cache.write(1, 0, 0, &same).await.expect("write");
    cache.write(2, 0, 0, &same).await.expect("write");
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    let id = env.store_ids().await[0];
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}", env.db_path().display());
        let mut c = sqlx::SqliteConnection::connect(&url).await.expect("db");
        sqlx::query("UPDATE objects SET refcount = 5 WHERE id = ?")
            .bind(id as i64)
            .execute(&mut c)
            .await
            .expect("break a refcount");
        // A row no block maps to.
        sqlx::query(
            "INSERT INTO objects (id, hash, refcount, length, stored_size, state) \
             VALUES (?, zeroblob(32), 1, 3, 3, 'uploaded')",
        )
        .bind(id as i64 + 77)
        .execute(&mut c)
        .await
        .expect("an unreferenced row");
        // And one whose refcount even says so, which no row may be.
        sqlx::query(
            "INSERT INTO objects (id, hash, refcount, length, stored_size, state) \
             VALUES (?, NULL, 0, 3, NULL, 'failed')",
        )
        .bind(id as i64 + 78)
        .execute(&mut c)
        .await
        .expect("a row at refcount 0");
        c.close().await.expect("close");
    }
    let cache = env.open().await;
    let r = check(&cache, opts()).await;
    let found: Vec<_> = r
        .refcounts
        .iter()
        .map(|p| (p.id, p.refcount, p.mappings))
        .collect();
    assert_eq!(found, [(id, 5, 2), (id + 77, 1, 0), (id + 78, 0, 0)], "{r}");
    assert!(r.to_string().contains("but no block maps to it"), "{r}");
    assert!(!r.is_consistent(), "{r}");
    assert!(cache.check_invariants().await.is_err());
    let r = check(&cache, repair(opts())).await;
    assert!(r.is_consistent(), "{r}");
    cache
        .check_invariants()
        .await
        .expect("refcounts and totals right");
    let r = check(&cache, opts()).await;
    assert!(r.is_consistent() && r.problems() == 0, "{r}");
    assert_eq!(&cache.read(2, 0, 0, BS).await.expect("read")[..], &same[..]);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_cache_file_of_an_unmapped_block_is_reported_and_dropped() {
    let env = Env::new();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(9, BS)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    // A clean name for a block that maps to nothing.
    let stale = env.cache_dir().join("7-3");
    std::fs::write(&stale, data(10, 100)).expect("stale file");

    let cache = env.open().await;
    let r = check(&cache, opts()).await;
    assert_eq!(r.cache.len(), 1, "{r}");
    assert!(
        (r.cache[0].inode, r.cache[0].blockno) == (7, 3)
            && r.cache[0].problem.contains("maps to no object"),
        "{r}"
    );
    assert!(!r.is_consistent(), "{r}");
    let r = check(&cache, repair(opts())).await;
    assert!(r.is_consistent() && r.cache[0].fixed, "{r}");
    assert!(!stale.exists());
    cache.check_invariants().await.expect("invariants");
    let r = check(&cache, opts()).await;
    assert!(r.is_consistent() && r.problems() == 0, "{r}");
    cache.shutdown().await.expect("shutdown");
}

// The command line, through the daemon and on the stopped volume.

const ARGS: &[&str] = &["--block-size", "64KiB", "--upload-delay", "off"];
const DBS: usize = 64 * 1024;

/// `blockcache check ARGS` against the volume in `dir` (through the daemon at `listen` if
/// one answers): (exit code, standard output, standard error).
fn cli(listen: &str, dir: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let dir = dir.to_str().expect("utf-8 path");
    let mut args = vec!["check", "--listen", listen, "--data-dir", dir];
    args.extend_from_slice(ARGS);
    args.extend_from_slice(extra);
    let (status, out, err) = run_cli(&args, None);
    (
        status.code().expect("exit code"),
        String::from_utf8(out).expect("utf-8 output"),
        err,
    )
}

/// The object files of the store in `dir`.
fn object_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    blockcache_tests::files_under(&dir.join("store").join("data"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_through_the_daemon_finds_corruption_with_verify_data_and_leaks_and_repairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), ARGS);
    let content = data(11, 3 * DBS + 5);
    assert!(
        d.put("docs/report.bin", content.clone())
            .await
            .status()
            .is_success()
    );
    d.post("/v1/flush").await;
    let (code, out, err) = cli(d.addr(), dir.path(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consistent: no problems found"), "{out}");
    assert!(!err.contains("no volume"), "went through the daemon: {err}");
    let v = d.post("/v1/check?verify_data=1").await;
    assert_eq!(
        (v["consistent"].as_bool(), v["verified_objects"].as_u64()),
        (Some(true), Some(4)),
        "{v}"
    );
    for bad in [
        "/v1/check?repair=yes",
        "/v1/check?grace=soon",
        "/v1/check?deep=1",
    ] {
        let r = d.http.post(d.url(bad)).send().await.expect("POST");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }

    // An object's bytes altered in place (same size): zstd-framed, so it no longer decodes.
    let objects = object_files(dir.path());
    assert_eq!(objects.len(), 4);
    let victim = &objects[1];
    let bytes = std::fs::read(victim).expect("object");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .expect("object");
    file.write_all_at(&[!bytes[bytes.len() - 3]], bytes.len() as u64 - 3)
        .expect("alter a byte");
    drop(file);
    // A stray object.
    let stray_id: u64 = 99_999_999_999;
    let stray = dir
        .path()
        .join("store/data")
        .join(format!("{:02x}", stray_id & 0xff))
        .join(stray_id.to_string());
    std::fs::create_dir_all(stray.parent().expect("shard")).expect("shard dir");
    std::fs::write(&stray, b"stray").expect("stray object");

    let (code, out, err) = cli(d.addr(), dir.path(), &[]);
    assert_eq!(
        code, 0,
        "the default grace keeps a new stray object: {out}{err}"
    );
    let (code, out, err) = cli(d.addr(), dir.path(), &["--grace", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("leaked") && out.contains("99999999999"),
        "{out}"
    );
    assert!(!out.contains("damaged"), "{out}");
    let (code, out, err) = cli(
        d.addr(),
        dir.path(),
        &["--grace", "0", "--verify-data", "--json"],
    );
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["consistent"], false, "{v}");
    let damaged = v["damaged"].as_array().expect("damaged");
    assert_eq!(damaged.len(), 1, "{v}");
    assert_eq!(damaged[0]["ranges"][0]["file"], "docs/report.bin", "{v}");
    assert_eq!(v["leaked"].as_array().map(Vec::len), Some(1), "{v}");

    // The daemon's cache still holds every block: everything can be fixed.
    let (code, out, err) = cli(
        d.addr(),
        dir.path(),
        &["--grace", "0", "--verify-data", "--repair"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[fixed]") && out.contains("all fixed"),
        "{out}"
    );
    assert!(!stray.exists());
    let (code, out, err) = cli(d.addr(), dir.path(), &["--grace", "0", "--verify-data"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consistent: no problems found"), "{out}");
    d.post("/v1/cache/drop").await;
    let (status, body) = d.get("docs/report.bin").await;
    assert!(status == 200 && body == content, "{status}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_names_the_file_of_a_missing_object_and_works_on_a_stopped_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Plain objects, so that the test can tell which block an object holds.
    let args = ["--compression", "none"];
    let d = Daemon::start(dir.path(), &[ARGS, &args[..]].concat());
    let content = data(12, 2 * DBS + 10);
    assert!(
        d.put("a/lost.bin", content.clone())
            .await
            .status()
            .is_success()
    );
    d.post("/v1/flush").await;
    let victim = object_files(dir.path())
        .into_iter()
        .find(|p| std::fs::read(p).is_ok_and(|b| b == content[DBS..2 * DBS]))
        .expect("the object of block 1");
    let id = victim
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    d.post("/v1/cache/drop").await;
    std::fs::remove_file(&victim).expect("delete an object");

    // A read from that block on: the first piece is read before the answer, so the error is
    // the answer (a read that reaches it later is cut off, as any streamed error).
    let r = d
        .http
        .get(d.url("/v1/files/a/lost.bin"))
        .header("Range", format!("bytes={DBS}-"))
        .send()
        .await
        .expect("GET");
    let status = r.status().as_u16();
    let answer = r.text().await.expect("body");
    assert!(
        status == 502 && answer.contains(&format!("object {id}")) && answer.contains("not found"),
        "{status} {answer}"
    );
    let (code, out, err) = cli(d.addr(), dir.path(), &["--compression", "none"]);
    assert_eq!(code, 1, "{out}{err}");
    let range = format!(r#"file "a/lost.bin" bytes {DBS}..{}"#, 2 * DBS);
    assert!(out.contains(&id) && out.contains(&range), "{out}");
    let (code, out, err) = cli(d.addr(), dir.path(), &["--compression", "none", "--repair"]);
    assert_eq!(code, 1, "nothing holds those bytes any more: {out}{err}");
    assert!(out.contains("[NOT FIXED]") && out.contains(&range), "{out}");
    let addr = d.addr().to_owned();
    d.stop();

    // No daemon: the volume is opened directly, with the same settings.
    let (code, out, err) = cli(&addr, dir.path(), &["--compression", "none", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["missing"][0]["ranges"][0]["file"], "a/lost.bin", "{v}");
    assert_eq!(v["missing"][0]["id"].to_string(), id, "{v}");
    // The same bytes written again map to the missing object (dedup by content): the
    // cache then holds its copy, and the repair uploads it.
    let d = Daemon::start(dir.path(), &[ARGS, &args[..]].concat());
    assert!(
        d.put("b/again.bin", content.clone())
            .await
            .status()
            .is_success()
    );
    d.post("/v1/flush").await;
    let (code, out, err) = cli(d.addr(), dir.path(), &["--compression", "none", "--repair"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[fixed]") && out.contains("all fixed"),
        "{out}"
    );
    let addr = d.addr().to_owned();
    d.stop();
    let (code, out, err) = cli(&addr, dir.path(), &["--compression", "none"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consistent: no problems found"), "{out}");
    // A volume that is not there is an error, and nothing is created.
    let empty = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = cli(&addr, &empty.path().join("none"), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("no volume"), "{err}");
    assert!(!empty.path().join("none").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_repair_work_on_s3() {
    use object_store::{ObjectStore, ObjectStoreExt, path::Path as Key};
    if let Some(reason) = blockcache_tests::moto::unavailable() {
        eprintln!("check_and_repair_on_s3: skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = blockcache_tests::moto::Moto::start(dir.path());
    moto.create_bucket("check").await;
    let store: std::sync::Arc<dyn ObjectStore> = moto.store("check");
    let backend = blockcache_backend::Backend::new(store.clone(), Key::from("vol"));
    let mut config = blockcache::Config::new(dir.path().join("cache"));
    config.block_size = 4096;
    config.upload_delay = None;
    let db = blockcache_db::Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("db");
    let cache = BlockCache::open(config, db, backend.clone())
        .await
        .expect("open");
    let content = data(14, 3 * 4096);
    for b in 0..3 {
        let block = &content[b * 4096..(b + 1) * 4096];
        cache.write(5, b as u64, 0, block).await.expect("write");
    }
    cache.flush().await.expect("flush");
    let r = check(&cache, opts()).await;
    assert!(
        r.is_consistent() && r.problems() == 0 && r.store_objects == 3,
        "{r}"
    );

    let mut ids = backend.list_ids().await.expect("list");
    ids.sort_unstable();
    let stray = ids[2] + 1000;
    store
        .put(
            &backend.key(stray),
            bytes::Bytes::from_static(b"stray").into(),
        )
        .await
        .expect("stray object");
    store
        .delete(&backend.key(ids[0]))
        .await
        .expect("delete an object");
    let young = check(&cache, CheckOptions::default()).await;
    assert!(
        young.unreferenced_young == 1 && young.leaked.is_empty(),
        "{young}"
    );
    let r = check(&cache, opts()).await;
    assert_eq!(
        (
            r.missing.iter().map(|m| m.id).collect::<Vec<_>>(),
            r.leaked.iter().map(|l| l.id).collect::<Vec<_>>()
        ),
        (vec![ids[0]], vec![stray]),
        "{r}"
    );
    let r = check(&cache, repair(verify())).await;
    assert!(r.is_consistent() && r.problems() == 2, "{r}");
    let r = check(&cache, verify()).await;
    assert!(
        r.is_consistent() && r.problems() == 0 && r.verified_objects == 3,
        "{r}"
    );
    assert!(backend.head(stray).await.expect("head").is_none());
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_shipped_metadata_names_is_no_leak() {
    let env = Env::new();
    let mut config = env.config();
    // No background round of shipping: the store's metadata stays as the flush left it.
    config.metadata_interval = None;
    let ns = Namespace::open(env.open_with(config.clone()).await, 1 << 30)
        .await
        .expect("namespace");
    let content = data(15, 2 * BS);
    let mut w = ns.create("shipped").await.expect("create");
    w.write(&content).await.expect("write");
    w.finish(Durability::Store).await.expect("finish");
    ns.flush().await.expect("flush ships the metadata");
    ns.shutdown().await.expect("shutdown");
    // The local metadata forgets an object (as a restore of another generation would);
    // the store's metadata still names it.
    let id = object_holding(&env, &content[BS..]);
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}", env.db_path().display());
        let mut c = sqlx::SqliteConnection::connect(&url).await.expect("db");
        for q in [
            "DELETE FROM blocks WHERE obj_id = ?",
            "DELETE FROM objects WHERE id = ?",
        ] {
            sqlx::query(q)
                .bind(id as i64)
                .execute(&mut c)
                .await
                .expect("forget the object");
        }
        c.close().await.expect("close");
    }
    let cache = env.open_with(config).await;
    let r = check(&cache, repair(opts())).await;
    assert!(r.leaked.is_empty() && r.is_consistent(), "{r}");
    assert!(
        env.object_path(id).exists(),
        "the object the store's metadata names stays"
    );
    cache.shutdown().await.expect("shutdown");
}
