//! Patches and truncations are all or nothing: a change that fails, is given up or is cut
//! short leaves exactly the old content, and one that returns leaves exactly the new. In the
//! library against a model (with store failures, abandoned writers and dropped calls), and
//! through the daemon (a store that breaks, a request body cut off).

use std::time::Duration;

use blockcache::{Durability, Namespace};
use blockcache_backend::faulty::Op;
use blockcache_tests::daemon::Daemon;
use blockcache_tests::{Env, data, within};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::StatusCode;

const MAX: u64 = 1 << 30;

async fn get(ns: &Namespace, name: &str) -> Vec<u8> {
    let r = ns.open_read(name).await.expect("open");
    r.read(0, r.meta().size as usize)
        .await
        .expect("read")
        .to_vec()
}

/// What a patch of `old` at `offset` with `bytes` makes.
fn patched(old: &[u8], offset: usize, bytes: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    if new.len() < offset + bytes.len() {
        new.resize(offset + bytes.len(), 0);
    }
    new[offset..offset + bytes.len()].copy_from_slice(bytes);
    new
}

/// What a truncation of `old` to `size` makes.
fn truncated(old: &[u8], size: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    new.resize(size, 0);
    new
}

/// How one change ends.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// It returns Ok.
    Finish,
    /// The store refuses every upload and the change asks for `store` durability: it fails.
    StoreFails,
    /// The writer is dropped half-way (a patch), or the call is dropped at a random point.
    Dropped,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_and_truncations_are_all_or_nothing_against_a_model() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(env.seed);
    let ns = Namespace::open(env.open().await, MAX)
        .await
        .expect("namespace");
    // Block size 1 KiB: offsets and sizes cross blocks, gaps and partial blocks.
    let names = ["a", "b/c", "d"];
    let mut model: Vec<Vec<u8>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let content = data(i as u64, rng.random_range(0..6000));
        let mut w = ns.create(name).await.expect("create");
        w.write(&content).await.expect("write");
        w.finish(Durability::Local).await.expect("finish");
        model.push(content);
    }
    let mut refused = 0;
    for step in 0..150u64 {
        let f = rng.random_range(0..names.len());
        let name = names[f];
        let old = model[f].clone();
        let old_etag = ns.stat(name).await.expect("stat").etag();
        let ending = match rng.random_range(0..10) {
            0 | 1 => Ending::StoreFails,
            2 | 3 => Ending::Dropped,
            _ => Ending::Finish,
        };
        let durability = match ending {
            Ending::StoreFails => Durability::Store,
            _ => [Durability::None, Durability::Local, Durability::Store][rng.random_range(0..3)],
        };
        if let Ending::StoreFails = ending {
            env.faults.permanent(Op::Put, true);
            env.faults.fail_fraction(Op::Put, 1.0);
        }
        let is_patch = rng.random_bool(0.6);
        let (new, outcome) = if is_patch {
            let offset = rng.random_range(0..old.len() + 3000);
            let bytes = data(1000 + step, rng.random_range(0..5000));
            let new = patched(&old, offset, &bytes);
            let mut w = ns.patch(name, offset as u64).await.expect("patch");
            let chunk = rng.random_range(1..2000);
            // A writer given up is dropped after part of its bytes, or its finish is
            // dropped at a random point of its work.
            let drop_writer = matches!(ending, Ending::Dropped) && rng.random_bool(0.5);
            let cut = if drop_writer {
                rng.random_range(0..=bytes.len())
            } else {
                bytes.len()
            };
            for piece in bytes[..cut].chunks(chunk) {
                w.write(piece).await.expect("write");
            }
            let outcome = match ending {
                Ending::Dropped if drop_writer => {
                    drop(w);
                    None
                }
                Ending::Dropped => {
                    let polls = rng.random_range(0..40);
                    drop_after_polls(w.finish(durability), polls).await
                }
                _ => Some(w.finish(durability).await.map(|_| ())),
            };
            (new, outcome)
        } else {
            let size = rng.random_range(0..old.len() + 3000);
            let new = truncated(&old, size);
            let call = ns.truncate(name, size as u64, durability);
            let outcome = match ending {
                Ending::Dropped => drop_after_polls(call, rng.random_range(0..40)).await,
                _ => Some(call.await.map(|_| ())),
            };
            (new, outcome)
        };
        env.faults.reset();
        ns.wait_for_cleanups().await;
        let what = format!(
            "step {step}: {} of {name} ({} bytes), {ending:?}, {durability}",
            if is_patch { "patch" } else { "truncate" },
            old.len()
        );
        let got = get(&ns, name).await;
        let etag = ns.stat(name).await.expect("stat").etag();
        match (ending, outcome) {
            (Ending::Finish, Some(Ok(()))) => assert!(got == new, "{what}: not the new content"),
            (Ending::Finish, other) => panic!("{what}: {other:?}"),
            // A change that needs nothing new in the store (a cut on a block's edge, a
            // staged block whose content is already stored) succeeds anyway.
            (Ending::StoreFails, Some(Ok(()))) => {
                assert!(got == new, "{what}: not the new content");
            }
            (Ending::StoreFails, Some(Err(e))) => {
                refused += 1;
                assert!(got == old, "{what}: failed ({e}) but changed the file");
                assert_eq!(etag, old_etag, "{what}: failed but a new version");
            }
            (Ending::StoreFails, None) => unreachable!("not dropped"),
            (Ending::Dropped, Some(Ok(()))) => assert!(got == new, "{what}: not the new content"),
            (Ending::Dropped, Some(Err(e))) => panic!("{what}: {e}"),
            (Ending::Dropped, None) => {
                // Given up: exactly the old content, or (a finish dropped after its commit
                // point, which then runs to its end) exactly the new.
                assert!(
                    got == old || got == new,
                    "{what}: given up, and neither the old nor the new content: {}",
                    differences(&got, &old, &new)
                );
                if got == old && old != new {
                    assert_eq!(etag, old_etag, "{what}: given up but a new version");
                }
            }
        }
        model[f] = got;
    }
    assert!(refused > 5, "only {refused} changes met a failing store");
    ns.flush().await.expect("flush");
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
    // Everything survives a new open, from the cache and from the store alone.
    let ns = Namespace::open(env.open().await, MAX)
        .await
        .expect("namespace");
    for (name, want) in names.iter().zip(&model) {
        assert!(get(&ns, name).await == *want, "{name} after reopening");
    }
    ns.cache().clear().await.expect("drop the cache");
    for (name, want) in names.iter().zip(&model) {
        assert!(get(&ns, name).await == *want, "{name} from the store");
    }
    ns.cache().check_invariants().await.expect("invariants");
    ns.shutdown().await.expect("shutdown");
}

/// Where `got` differs from `old` and from `new`, for a failure message.
fn differences(got: &[u8], old: &[u8], new: &[u8]) -> String {
    let first = |a: &[u8]| a.iter().zip(got).position(|(x, y)| x != y);
    format!(
        "{} bytes; old has {} (first difference at {:?}), new has {} (first difference at {:?})",
        got.len(),
        old.len(),
        first(old),
        new.len(),
        first(new)
    )
}

/// Polls `fut` `polls` times (yielding in between), then drops it unless it finished.
async fn drop_after_polls<T>(
    fut: impl Future<Output = blockcache::Result<T>>,
    polls: u32,
) -> Option<blockcache::Result<()>> {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..polls {
        if let std::task::Poll::Ready(r) = futures::poll!(fut.as_mut()) {
            return Some(r.map(|_| ()));
        }
        tokio::task::yield_now().await;
    }
    None
}

const BS: usize = 64 * 1024;
/// No background uploads: only what a request asks for reaches the store.
const ARGS: &[&str] = &["--block-size", "64KiB", "--upload-delay", "off"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_or_truncate_that_answers_an_error_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), ARGS);
    let before = data(21, 3 * BS + 500);
    assert!(d.put("t", before.clone()).await.status().is_success());
    d.post("/v1/flush").await;
    let etag = d
        .http
        .head(d.url("/v1/files/t"))
        .send()
        .await
        .expect("HEAD")
        .headers()["etag"]
        .clone();
    // The store breaks: every upload fails, for any user, root included.
    let store = dir.path().join("store");
    let away = dir.path().join("store.away");
    std::fs::rename(&store, &away).expect("move the store away");
    std::fs::write(&store, b"not a directory").expect("file in the store's place");

    let r = d
        .http
        .post(d.url("/v1/files/t?truncate=1000&durability=store"))
        .send()
        .await
        .expect("POST truncate");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "truncate");
    let r = d
        .http
        .patch(d.url(&format!("/v1/files/t?offset={}&durability=store", BS - 7)))
        .body(vec![b'x'; 2 * BS])
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "patch");

    unchanged(&d, &before, &etag, "after the failures").await;
    // The store comes back: nothing of the failed changes reaches it or shows later.
    std::fs::remove_file(&store).expect("remove the file");
    std::fs::rename(&away, &store).expect("bring the store back");
    d.post("/v1/flush").await;
    d.post("/v1/cache/drop").await;
    unchanged(&d, &before, &etag, "after a flush and a cache drop").await;
    d.stop();
    let d = Daemon::start(dir.path(), ARGS);
    unchanged(&d, &before, &etag, "after a restart").await;
    d.stop();
}

/// Asserts that file `t` still has content `before` and ETag `etag`.
async fn unchanged(d: &Daemon, before: &[u8], etag: &reqwest::header::HeaderValue, when: &str) {
    let r = d.http.get(d.url("/v1/files/t")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK, "{when}");
    assert_eq!(&r.headers()["etag"], etag, "{when}: a new version");
    assert!(
        r.bytes().await.expect("body") == before,
        "{when}: the file changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_whose_body_is_cut_off_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), ARGS);
    let before = data(22, 40 * BS);
    assert!(d.put("cut", before.clone()).await.status().is_success());
    // Content-Length 2 MiB, 1.6 MB sent, then a half-close.
    let mut s = tokio::net::TcpStream::connect(d.addr())
        .await
        .expect("connect");
    let head = format!(
        "PATCH /v1/files/cut?offset=1000 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    s.write_all(head.as_bytes()).await.expect("send head");
    s.write_all(&vec![b'z'; 1_600_000])
        .await
        .expect("send part of the body");
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    within(
        "the answer to a cut-off body",
        Duration::from_secs(60),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "a cut-off body must be refused: {answer}"
    );
    let (status, body) = d.get("cut").await;
    assert_eq!(status, 200);
    assert!(body == before, "the cut-off PATCH changed the file");
    d.post("/v1/flush").await;
    d.stop();
    let d = Daemon::start(dir.path(), ARGS);
    assert!(d.get("cut").await.1 == before, "changed after a restart");
    d.stop();
}

/// One file of the crash loop, changed by one client at a time.
#[derive(Debug, Clone, Default)]
struct Tracked {
    /// The content acknowledged last (`None`: no such file).
    acked: Option<Vec<u8>>,
    /// What the change in flight when the daemon died makes, if one was.
    in_flight: Option<Option<Vec<u8>>>,
}

/// Changes files `files` (each owned by this client) at random until a request fails to get
/// an answer (the daemon died); returns the files' states.
async fn change_until_killed(
    http: reqwest::Client,
    base: String,
    mut files: Vec<(String, Tracked)>,
    seed: u64,
) -> Vec<(String, Tracked)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut step = 0u64;
    loop {
        step += 1;
        let f = rng.random_range(0..files.len());
        let (name, t) = &mut files[f];
        let url = format!("{base}/v1/files/{name}");
        let durability = ["local", "store"][rng.random_range(0..2)];
        let old = t.acked.clone();
        let (request, new) = match (&old, rng.random_range(0..10)) {
            (None, _) | (Some(_), 0..=2) => {
                let content = data(seed ^ (step << 20), rng.random_range(0..5 * BS));
                let r = http
                    .put(format!("{url}?durability={durability}"))
                    .body(content.clone());
                (r, Some(content))
            }
            (Some(old), 3..=6) => {
                let offset = rng.random_range(0..old.len() + BS);
                let bytes = data(seed ^ (step << 20), rng.random_range(1..3 * BS));
                let new = patched(old, offset, &bytes);
                let r = http
                    .patch(format!("{url}?offset={offset}&durability={durability}"))
                    .body(bytes);
                (r, Some(new))
            }
            (Some(old), 7..=8) => {
                let size = rng.random_range(0..old.len() + 2 * BS);
                let r = http.post(format!("{url}?truncate={size}&durability={durability}"));
                (r, Some(truncated(old, size)))
            }
            (Some(_), _) => (http.delete(&url), None),
        };
        t.in_flight = Some(new.clone());
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                // The answer may be cut off too; the status line is what acknowledges.
                t.acked = new;
                t.in_flight = None;
            }
            // Refused (a 5xx while the daemon dies, say): the file must be unchanged.
            Ok(_) => t.in_flight = None,
            Err(_) => return files,
        }
    }
}

/// Finding 3 of the hardening issue: a daemon killed with SIGKILL at random moments while
/// clients PUT, PATCH, truncate and DELETE leaves each file exactly as last acknowledged, or,
/// for a change in flight, exactly as that change makes it. `BLOCKCACHE_CRASH_ROUNDS` sets
/// the number of rounds (default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_leaves_each_file_old_or_new() {
    let seed = blockcache_tests::test_seed();
    let rounds: u64 = std::env::var("BLOCKCACHE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    // Background uploads soon, so kills also land in the middle of uploads and merges.
    let args = ["--block-size", "64KiB", "--upload-delay", "200ms"];
    let clients = 4;
    let mut files: Vec<(String, Tracked)> = (0..clients * 3)
        .map(|i| (format!("dir/f{i}"), Tracked::default()))
        .collect();
    for round in 0..rounds {
        let d = Daemon::start(dir.path(), &args);
        let mut tasks = Vec::new();
        for (c, mine) in files.chunks(3).enumerate() {
            tasks.push(tokio::spawn(change_until_killed(
                d.http.clone(),
                d.base.clone(),
                mine.to_vec(),
                seed ^ (round << 32) ^ c as u64,
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        d.kill9();
        files.clear();
        for t in tasks {
            files.extend(
                within("a client to see the daemon die", Duration::from_secs(60), t)
                    .await
                    .expect("client task"),
            );
        }
        let in_flight = files.iter().filter(|(_, t)| t.in_flight.is_some()).count();
        let d = Daemon::start(dir.path(), &args);
        let mut changes = 0;
        let mut took_new = 0;
        for (name, t) in &mut files {
            let (status, body) = d.get(name).await;
            let got = match status {
                200 => Some(body),
                404 => None,
                other => panic!("round {round}: GET {name}: {other}\n{}", d.log_text()),
            };
            let old_ok = got == t.acked;
            let new_ok = t.in_flight.as_ref().is_some_and(|new| got == *new);
            assert!(
                old_ok || new_ok,
                "round {round} (seed {seed}): {name} is neither as last acknowledged ({} bytes) nor as the change in flight made it ({:?} bytes): {:?} bytes",
                t.acked.as_ref().map_or(0, Vec::len),
                t.in_flight.as_ref().map(|n| n.as_ref().map_or(0, Vec::len)),
                got.as_ref().map(Vec::len),
            );
            changes += u64::from(t.acked.is_some());
            took_new += usize::from(new_ok && !old_ok);
            t.acked = got;
            t.in_flight = None;
        }
        assert!(changes > 0, "round {round}: no file was written");
        eprintln!(
            "round {round}: {in_flight} changes in flight at the kill, {took_new} of them found done"
        );
        let check = d.json("/v1/stats").await;
        assert!(check.is_object());
        d.kill9();
    }
}
