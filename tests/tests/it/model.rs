//! A proptest model test: random sequences of write, read, truncate, remove, commit, sync
//! (which hashes dirty blocks ahead of their commit), flush,
//! clear, evict, reopen (clean or after a crash) and store failures, checked against a map
//! of the expected block contents.
//!
//! Every call must succeed unless store faults are on and its error is an injected fault;
//! every call finishes within [`STEP`]; the cache stays within its limits after each step;
//! a flush that returns `Ok` leaves nothing dirty; at the end one flush stores everything
//! and every block ever touched (removed ones too) reads back as the model says.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use blockcache::{BlockCache, Config};
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, SEED_VAR, data, is_injected, test_seed, within};
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestRunner};

const BLOCK: u64 = 256;

#[derive(Debug, Clone)]
enum Action {
    Write {
        inode: u64,
        blockno: u64,
        offset: u64,
        len: usize,
        seed: u64,
    },
    Read {
        inode: u64,
        blockno: u64,
    },
    Truncate {
        inode: u64,
        blockno: u64,
        size: u64,
    },
    Remove {
        inode: u64,
        start: u64,
        end: u64,
    },
    Commit,
    Sync,
    Flush,
    Clear,
    Evict {
        max_entries: u64,
    },
    Reopen {
        crash: bool,
    },
    StoreFails(bool),
}

fn action() -> impl Strategy<Value = Action> {
    let key = (0..3u64, 0..5u64);
    prop_oneof![
        6 => (key.clone(), 0..BLOCK, 1..=BLOCK as usize, any::<u64>()).prop_map(|((inode, blockno), offset, len, seed)| {
            let len = len.min((BLOCK - offset) as usize).max(1);
            Action::Write { inode, blockno, offset, len, seed }
        }),
        // Whole blocks of a few contents, so that blocks share objects.
        2 => (key.clone(), 0..3u64).prop_map(|((inode, blockno), seed)| Action::Write { inode, blockno, offset: 0, len: BLOCK as usize, seed }),
        4 => key.clone().prop_map(|(inode, blockno)| Action::Read { inode, blockno }),
        1 => (key, 0..=BLOCK).prop_map(|((inode, blockno), size)| Action::Truncate { inode, blockno, size }),
        1 => (0..3u64, 0..5u64, 0..6u64).prop_map(|(inode, start, len)| Action::Remove { inode, start, end: start + len }),
        1 => Just(Action::Commit),
        1 => Just(Action::Sync),
        1 => Just(Action::Flush),
        1 => Just(Action::Clear),
        1 => (1..8u64).prop_map(|max_entries| Action::Evict { max_entries }),
        1 => any::<bool>().prop_map(|crash| Action::Reopen { crash }),
        1 => any::<bool>().prop_map(Action::StoreFails),
    ]
}

type Model = HashMap<(u64, u64), Vec<u8>>;

/// How long one call of the engine may take before the case fails (a deadlock must not
/// pass; the slowest calls back off while uploads keep failing).
const STEP: Duration = Duration::from_secs(30);

/// One case: the engine, the model, and whether store faults are on.
struct Case<'a> {
    env: &'a Env,
    config: Config,
    /// Whether the last `StoreFails` turned faults on: only then may a call fail, and only
    /// with an injected fault.
    faults_on: bool,
}

impl Case<'_> {
    /// `result` of `what`, or `None` if it failed with a fault injected while faults were
    /// on; any other error fails the test.
    fn allow<T>(&self, what: &str, result: blockcache::Result<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) if self.faults_on && is_injected(&e) => None,
            Err(e) => panic!(
                "{what} failed without an injected fault (faults on: {}): {e:?}",
                self.faults_on
            ),
        }
    }

    /// Opens the engine, waiting for an abandoned one to let go of the directory. Recovery
    /// reads the store, so under faults an open may fail with an injected fault: then it is
    /// tried again.
    async fn open(&self) -> BlockCache {
        within("the cache to open", STEP, async {
            loop {
                match self.env.try_open(self.config.clone()).await {
                    Ok(cache) => break cache,
                    Err(e) if blockcache_tests::is_in_use(&e) => {}
                    result => {
                        self.allow("open", result);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
    }

    /// Turns random store failures on or off. Through the wrapper: uploads, downloads and
    /// deletions. Linked (the store opened by its URL): the wrapper is not in the path, so
    /// only the store's durability barriers can fail, which fails uploads.
    fn store_fails(&mut self, on: bool) {
        let fraction = if on { 0.5 } else { 0.0 };
        if self.env.is_linked() {
            self.env.faults.fail_fraction(Op::Barrier, fraction);
        } else {
            self.env.faults.fail_fraction(Op::Put, fraction);
            self.env.faults.fail_fraction(Op::Get, fraction);
            self.env.faults.fail_fraction(Op::Delete, fraction);
        }
        self.faults_on = on;
    }
}

/// Asserts that the cache is within `limits` of entries and bytes. Nothing is in flight
/// between the steps of the model, and every block fits the limits alone.
async fn assert_within(cache: &BlockCache, max_entries: u64, max_bytes: u64, after: &str) {
    let usage = cache.usage().await.expect("usage");
    assert!(
        usage.entries <= max_entries && usage.bytes <= max_bytes,
        "after {after}: {} entries and {} bytes cached, limits {max_entries} and {max_bytes}",
        usage.entries,
        usage.bytes
    );
}

async fn run(actions: Vec<Action>, env: Env) {
    let mut config = env.config();
    config.block_size = BLOCK;
    config.max_bytes = 8 * BLOCK;
    config.max_entries = 8;
    config.max_dirty_bytes = 8 * BLOCK;
    let mut case = Case {
        env: &env,
        config: config.clone(),
        faults_on: false,
    };
    let mut cache: BlockCache = case.open().await;
    let mut model = Model::new();
    // Every block ever written or truncated, removed ones included: at the end each must
    // read as the model says (a removed block as a hole).
    let mut touched = BTreeSet::new();
    for action in actions {
        let what = format!("{action:?}");
        match action {
            Action::Write {
                inode,
                blockno,
                offset,
                len,
                seed,
            } => {
                touched.insert((inode, blockno));
                let bytes = data(seed, len);
                // Under store failures a miss may not download; the write then changes nothing.
                let written =
                    within(&what, STEP, cache.write(inode, blockno, offset, &bytes)).await;
                if case.allow(&what, written).is_some() {
                    let block = model.entry((inode, blockno)).or_default();
                    let end = offset as usize + len;
                    if block.len() < end {
                        block.resize(end, 0);
                    }
                    block[offset as usize..end].copy_from_slice(&bytes);
                }
            }
            Action::Read { inode, blockno } => {
                let read = within(&what, STEP, cache.read(inode, blockno, 0, BLOCK as usize)).await;
                if let Some(got) = case.allow(&what, read) {
                    let want = model.get(&(inode, blockno)).cloned().unwrap_or_default();
                    assert_eq!(got, want, "block ({inode}, {blockno})");
                }
            }
            Action::Truncate {
                inode,
                blockno,
                size,
            } => {
                touched.insert((inode, blockno));
                let truncated = within(&what, STEP, async {
                    let mut h = cache.block(inode, blockno).await?;
                    h.truncate(size).await
                })
                .await;
                if case.allow(&what, truncated).is_some() {
                    model
                        .entry((inode, blockno))
                        .or_default()
                        .resize(size as usize, 0);
                }
            }
            Action::Remove { inode, start, end } => {
                within(&what, STEP, cache.remove(inode, start..end))
                    .await
                    .expect("remove");
                model.retain(|&(i, b), _| i != inode || !(start..end).contains(&b));
            }
            Action::Commit => {
                let committed = within(&what, STEP, cache.commit()).await;
                case.allow(&what, committed);
            }
            Action::Sync => {
                within(&what, STEP, cache.sync()).await.expect("sync");
            }
            Action::Flush => {
                let flushed = within(&what, STEP, cache.flush()).await;
                if case.allow(&what, flushed).is_some() {
                    let usage = cache.usage().await.expect("usage");
                    assert_eq!(
                        usage.dirty_entries, 0,
                        "dirty blocks after a flush: {usage:?}"
                    );
                }
            }
            Action::Clear => {
                let cleared = within(&what, STEP, cache.clear()).await;
                case.allow(&what, cleared);
            }
            Action::Evict { max_entries } => {
                let mut limits = config.limits();
                limits.max_entries = max_entries;
                let shrunk = within(&what, STEP, cache.set_limits(limits)).await;
                if case.allow(&what, shrunk).is_some() {
                    assert_within(&cache, max_entries, limits.max_bytes, &what).await;
                }
                limits.max_entries = config.max_entries;
                let restored = within(&what, STEP, cache.set_limits(limits)).await;
                case.allow(&what, restored);
            }
            Action::Reopen { crash } => {
                if crash {
                    drop(cache);
                } else {
                    // A shutdown under faults reports the failed flush; the dirty data stays
                    // in the cache directory for the next open.
                    let stopped = within(&what, STEP, cache.shutdown()).await;
                    case.allow(&what, stopped);
                }
                cache = case.open().await;
            }
            Action::StoreFails(on) => case.store_fails(on),
        }
        assert_within(&cache, config.max_entries, config.max_bytes, &what).await;
    }
    case.store_fails(false);
    env.faults.reset();
    // An upload that began while the store was failing may still fail after the reset; a
    // flush does not report the failures of uploads it did not start, and commits those
    // blocks again: one flush stores everything.
    within("final flush", STEP, cache.flush())
        .await
        .expect("final flush");
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 0);
    within("clear", STEP, cache.clear()).await.expect("clear");
    for &(inode, blockno) in &touched {
        let got = within(
            "read back",
            STEP,
            cache.read(inode, blockno, 0, BLOCK as usize),
        )
        .await
        .expect("read back");
        let want = model.get(&(inode, blockno)).cloned().unwrap_or_default();
        assert_eq!(
            &got[..],
            &want[..],
            "block ({inode}, {blockno}) from the store"
        );
    }
    assert!(cache.wait_for_removals(Duration::from_secs(30)).await);
    cache.check_invariants().await.expect("invariants");
    // The store holds exactly the referenced objects: nothing leaked, nothing missing.
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.stored_bytes, usage.unique_bytes);
    let stored: u64 = env.backend().stored_bytes().await.expect("list store");
    assert_eq!(
        stored, usage.stored_bytes,
        "store listing agrees with the metadata"
    );
    within("shutdown", STEP, cache.shutdown())
        .await
        .expect("shutdown");
}

/// Runs one case on a runtime of its own. The faults of the case are seeded from the test's
/// seed and the actions, so a shrunk case meets the same faults each time it runs.
fn run_case(seed: u64, actions: Vec<Action>, linked: bool) {
    let mut hasher = std::hash::DefaultHasher::new();
    format!("{actions:?}").hash(&mut hasher);
    let seed = seed ^ hasher.finish();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        // Linked: objects are hard links to cache files (see `Case::store_fails`).
        let env = if linked {
            Env::linked_with_seed(seed)
        } else {
            Env::with_seed(seed)
        };
        run(actions, env).await;
    });
}

/// The proptest settings: `BLOCKCACHE_MODEL_CASES` cases (24 by default), generated from
/// the test's seed (printed; `BLOCKCACHE_TEST_SEED` replays it).
fn config(seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("BLOCKCACHE_MODEL_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

fn check(linked: bool) {
    let seed = test_seed();
    let mut runner = TestRunner::new(config(seed));
    let result = runner.run(&proptest::collection::vec(action(), 1..40), |actions| {
        run_case(seed, actions, linked);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e} (replay with {SEED_VAR}={seed})");
    }
}

#[test]
fn cache_matches_the_model() {
    check(false);
}

/// The same through a `file://` store whose objects are hard links to cache files; the
/// injected faults are those of the store's durability barriers.
#[test]
fn cache_matches_the_model_with_linked_objects() {
    check(true);
}
