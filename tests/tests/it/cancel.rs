//! Cancellation: every call of the block API is dropped at random points (while it waits for
//! the dirty budget, a block lock, a download, an upload or a flush), as a client that
//! disconnects mid-request drops its future. Afterwards nothing may be left held: no cache
//! room reserved, no block locked, no writer counted as waiting, the dirty budget exactly the
//! dirty bytes, the metadata consistent; a flush still stores everything, and the store alone
//! gives back what the cache held.
//!
//! The RNG is seeded from `BLOCKCACHE_TEST_SEED` if set, else at random; the seed is printed
//! so a failure can be replayed.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use blockcache::{BlockCache, Limits};
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, data};

/// xorshift64*: small, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    blockcache_tests::test_seed() | 1
}

/// How a call is cut short.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Dropped after this many polls (with a yield between them, so other tasks progress).
    Polls(u32),
    /// Dropped after this long.
    After(Duration),
}

/// Runs `fut` until it finishes or `cut` says to drop it; `None` if dropped.
async fn cut_short<F: Future>(cut: Cut, fut: F) -> Option<F::Output> {
    match cut {
        Cut::Polls(n) => {
            let mut fut = std::pin::pin!(fut);
            for _ in 0..n {
                if let Poll::Ready(v) = futures::poll!(fut.as_mut()) {
                    return Some(v);
                }
                tokio::task::yield_now().await;
            }
            None
        }
        Cut::After(d) => tokio::time::timeout(d, fut).await.ok(),
    }
}

const INODES: u64 = 3;
const BLOCKS: u64 = 6;
const BS: u64 = 1024;

/// One random call of the block API on `cache`, returning its result (errors are only
/// allowed to be "shutting down", which cannot happen here, so any error fails).
async fn one_call(cache: &BlockCache, rng: &mut Rng) -> blockcache::Result<()> {
    let (inode, blockno) = (1 + rng.below(INODES), rng.below(BLOCKS));
    match rng.below(10) {
        0..=3 => {
            let offset = rng.below(BS);
            let len = 1 + rng.below(BS - offset);
            let bytes = data(rng.next(), len as usize);
            cache.write(inode, blockno, offset, &bytes).await
        }
        4 => cache.read(inode, blockno, 0, BS as usize).await.map(drop),
        5 => {
            let mut h = cache.block(inode, blockno).await?;
            h.truncate(rng.below(BS)).await
        }
        6 => cache.flush_inode(inode).await,
        7 => cache.sync().await,
        8 => {
            let start = rng.below(BLOCKS);
            cache.remove(inode, start..start + 1 + rng.below(2)).await
        }
        _ => cache.evict().await,
    }
}

async fn run(env: Env, seed: u64, calls: usize) {
    let mut rng = Rng(seed);
    let mut config = env.config();
    // Tight limits: writers wait for the budget and misses for room.
    config.max_bytes = 6 * BS;
    config.max_entries = 6;
    config.max_dirty_bytes = BS;
    let cache = env.open_with(config).await;
    env.faults.latency(Op::Put, Duration::from_millis(2));
    env.faults.latency(Op::Get, Duration::from_millis(1));
    let mut cut_calls = 0;
    for _ in 0..calls {
        let cut = if rng.below(2) == 0 {
            Cut::Polls(rng.below(40) as u32)
        } else {
            Cut::After(Duration::from_micros(rng.below(4000)))
        };
        // Two calls at once, the second cut short: it may be waiting for a lock the first
        // one holds.
        let mut other = Rng(rng.next());
        let (done, cut_result) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(
                one_call(&cache, &mut rng),
                cut_short(cut, one_call(&cache, &mut other))
            )
        })
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: a call did not finish in 30 s"));
        done.unwrap_or_else(|e| panic!("seed {seed}: uncut call failed: {e}"));
        match cut_result {
            None => cut_calls += 1,
            Some(r) => r.unwrap_or_else(|e| panic!("seed {seed}: call failed: {e}")),
        }
        cache
            .check_invariants()
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    assert!(cut_calls > 0, "seed {seed}: no call was cut short");
    env.faults.reset();
    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the final flush hung"))
        .unwrap_or_else(|e| panic!("seed {seed}: final flush: {e}"));
    // Calls cut short may have left work that finishes on its own (a commit, hashing ahead);
    // once it has, nothing may be held.
    quiescent(&cache)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: still held after cancellations: {e}"));
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.dirty_entries, 0, "seed {seed}: dirty after a flush");
    // The store alone gives back what the cache holds.
    let before = read_all(&cache).await;
    cache.clear().await.expect("clear");
    cache
        .set_limits(Limits {
            max_bytes: 64 * BS,
            max_entries: 64,
            max_dirty_bytes: 64 * BS,
        })
        .await
        .expect("limits");
    let after = read_all(&cache).await;
    assert!(
        before == after,
        "seed {seed}: the store does not hold what the cache held"
    );
    quiescent(&cache)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_random_points_leave_nothing_held() {
    let seed = seed();
    for round in 0..3 {
        run(Env::new(), seed.wrapping_add(round), 150).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_random_points_leave_nothing_held_linked() {
    let seed = seed();
    for round in 0..3 {
        run(Env::linked(), seed.wrapping_add(round), 150).await;
    }
}

/// Polls `fut` once (it must then be waiting) and drops it.
async fn poll_once_then_drop<F: Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    assert!(
        futures::poll!(fut.as_mut()).is_pending(),
        "the call did not wait"
    );
}

/// Runs `fut` until a call of `op` waits at the store's gate, then drops it.
async fn drop_when_held<F: Future>(env: &Env, op: Op, fut: F) {
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = fut => panic!("the call finished while the store was held"),
            () = env.faults.wait_held(op, 1) => {}
        }
    })
    .await
    .expect("the call reached the store");
}

/// [`BlockCache::check_quiescent`], which first waits for the work dropped calls left
/// running; a wait that does not end is a failure too.
async fn quiescent(cache: &BlockCache) -> Result<(), String> {
    tokio::time::timeout(blockcache_tests::WAIT, cache.check_quiescent())
        .await
        .map_err(|_| "the work of dropped calls did not end".to_owned())?
}

/// Every block the random calls may touch, whole.
async fn read_all(cache: &BlockCache) -> Vec<bytes::Bytes> {
    let mut all = Vec::new();
    for inode in 1..=INODES {
        for blockno in 0..BLOCKS {
            all.push(
                cache
                    .read(inode, blockno, 0, BS as usize)
                    .await
                    .expect("read"),
            );
        }
    }
    all
}

/// A writer waiting for the block lock holds one block of the dirty budget; dropped there,
/// it gives it back.
#[tokio::test]
async fn a_write_dropped_while_waiting_for_the_block_lock_gives_its_budget_back() {
    let env = Env::new();
    let cache = env.open().await;
    let holder = cache.block(1, 0).await.expect("block");
    poll_once_then_drop(cache.block(1, 0)).await;
    drop(holder);
    quiescent(&cache).await.expect("nothing held");
    cache.shutdown().await.expect("shutdown");
}

/// A writer waiting for the dirty budget is counted as a waiter (which makes the commit task
/// upload at once); dropped there, it no longer counts.
#[tokio::test]
async fn a_write_dropped_while_waiting_for_the_budget_is_no_longer_a_waiter() {
    let env = Env::new();
    let mut config = env.config();
    config.max_dirty_bytes = BS;
    let cache = env.open_with(config).await;
    env.faults.hold(Op::Put);
    cache
        .write(1, 0, 0, &data(1, BS as usize))
        .await
        .expect("write");
    poll_once_then_drop(cache.block(1, 1)).await;
    env.faults.release(Op::Put);
    cache.flush().await.expect("flush");
    quiescent(&cache).await.expect("nothing held");
    cache.shutdown().await.expect("shutdown");
}

/// A miss dropped while its download runs gives its cache room back, and the block reads
/// correctly afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_dropped_during_its_download_gives_its_room_back() {
    let env = Env::new();
    let cache = env.open().await;
    let bytes = data(7, BS as usize);
    cache.write(1, 0, 0, &bytes).await.expect("write");
    cache.clear().await.expect("clear");
    env.faults.hold(Op::Get);
    drop_when_held(&env, Op::Get, cache.read(1, 0, 0, BS as usize)).await;
    env.faults.release(Op::Get);
    quiescent(&cache).await.expect("nothing held");
    assert_eq!(
        &cache.read(1, 0, 0, BS as usize).await.expect("read")[..],
        &bytes[..]
    );
    cache.shutdown().await.expect("shutdown");
}

/// A flush dropped while it waits for its uploads: the uploads finish on their own and the
/// next flush stores everything. (A flush dropped while its commit is still being recorded
/// is covered by the random tests above, which hang if that commit stops half-way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_dropped_during_its_uploads_leaves_nothing_in_flight() {
    let env = Env::new();
    let cache = env.open().await;
    for b in 0..4 {
        cache
            .write(1, b, 0, &data(b, BS as usize))
            .await
            .expect("write");
    }
    env.faults.hold(Op::Put);
    drop_when_held(&env, Op::Put, cache.flush()).await;
    env.faults.release(Op::Put);
    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("flush hung")
        .expect("flush");
    quiescent(&cache).await.expect("nothing held");
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 0);
    cache.shutdown().await.expect("shutdown");
}

/// A replacement whose `finish` is dropped at any point leaves the file with its old content
/// or its new one, whole: never a name pointing at removed blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_dropped_while_finishing_leaves_old_or_new_content() {
    let env = Env::new();
    let files = blockcache::Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("namespace");
    let mut content = data(1, 3 * BS as usize + 100);
    let mut w = files.create("f").await.expect("create");
    w.write(&content).await.expect("write");
    w.finish(blockcache::Durability::None)
        .await
        .expect("finish");
    let mut finished = 0;
    for polls in 0..80u32 {
        let new = data(u64::from(polls) + 2, 2 * BS as usize + 7 * polls as usize);
        let mut w = files.create("f").await.expect("create");
        w.write(&new).await.expect("write");
        let cut = Cut::After(Duration::from_micros(150 * u64::from(polls)));
        let done = cut_short(cut, w.finish(blockcache::Durability::Local)).await;
        if let Some(r) = done {
            r.expect("finish");
            finished += 1;
        }
        files.wait_for_cleanups().await;
        let reader = files.open_read("f").await.expect("open");
        let got = reader
            .read(0, reader.meta().size as usize)
            .await
            .expect("read");
        if got[..] == new[..] {
            content = new;
        } else {
            assert!(
                got[..] == content[..],
                "cut after {cut:?} the file is neither its old nor its new content"
            );
        }
    }
    assert!(
        finished > 0 && finished < 80,
        "every finish ran to its end, or none did: {finished}"
    );
    files.shutdown().await.expect("shutdown");
}
