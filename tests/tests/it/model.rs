//! A proptest model test: random sequences of write, read, truncate, remove, commit, sync
//! (which hashes dirty blocks ahead of their commit), flush,
//! clear, evict, reopen (clean or after a crash) and store failures, checked against a map
//! of the expected block contents.

use std::collections::HashMap;
use std::time::Duration;

use blockcache::BlockCache;
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, data};
use proptest::prelude::*;

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

async fn run(actions: Vec<Action>, linked: bool) {
    // Linked: objects are hard links to cache files, and store failures cannot be injected.
    let env = if linked { Env::linked() } else { Env::new() };
    let mut config = env.config();
    config.block_size = BLOCK;
    config.max_bytes = 8 * BLOCK;
    config.max_entries = 8;
    config.max_dirty_bytes = 8 * BLOCK;
    let mut cache: BlockCache = env.open_with(config.clone()).await;
    let mut model = Model::new();
    for action in actions {
        match action {
            Action::Write {
                inode,
                blockno,
                offset,
                len,
                seed,
            } => {
                let bytes = data(seed, len);
                // Under store failures a miss may not download; the write then changes nothing.
                if cache.write(inode, blockno, offset, &bytes).await.is_ok() {
                    let block = model.entry((inode, blockno)).or_default();
                    let end = offset as usize + len;
                    if block.len() < end {
                        block.resize(end, 0);
                    }
                    block[offset as usize..end].copy_from_slice(&bytes);
                }
            }
            Action::Read { inode, blockno } => {
                if let Ok(got) = cache.read(inode, blockno, 0, BLOCK as usize).await {
                    let want = model.get(&(inode, blockno)).cloned().unwrap_or_default();
                    assert_eq!(got, want, "block ({inode}, {blockno})");
                }
            }
            Action::Truncate {
                inode,
                blockno,
                size,
            } => {
                let mut h = cache.block(inode, blockno).await.expect("handle");
                if h.truncate(size).await.is_ok() {
                    model
                        .entry((inode, blockno))
                        .or_default()
                        .resize(size as usize, 0);
                }
            }
            Action::Remove { inode, start, end } => {
                cache.remove(inode, start..end).await.expect("remove");
                model.retain(|&(i, b), _| i != inode || !(start..end).contains(&b));
            }
            Action::Commit => {
                let _ = cache.commit().await;
            }
            Action::Sync => {
                cache.sync().await.expect("sync");
            }
            Action::Flush => {
                let _ = cache.flush().await;
            }
            Action::Clear => {
                let _ = cache.clear().await;
            }
            Action::Evict { max_entries } => {
                let mut limits = config.limits();
                limits.max_entries = max_entries;
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), cache.set_limits(limits)).await;
                limits.max_entries = config.max_entries;
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), cache.set_limits(limits)).await;
            }
            Action::Reopen { crash } => {
                if crash {
                    drop(cache);
                } else {
                    let _ = cache.shutdown().await;
                }
                cache = env.open_with(config.clone()).await;
            }
            Action::StoreFails(on) => {
                let fraction = if on { 0.5 } else { 0.0 };
                env.faults.fail_fraction(Op::Put, fraction);
                env.faults.fail_fraction(Op::Get, fraction);
                env.faults.fail_fraction(Op::Delete, fraction);
            }
        }
    }
    env.faults.reset();
    // An upload that began while the store was failing may still fail after the reset (its
    // retries ran out); the block stays dirty and the next flush uploads it.
    let mut flushed = cache.flush().await;
    for _ in 0..2 {
        if flushed.is_ok() {
            break;
        }
        flushed = cache.flush().await;
    }
    flushed.expect("final flush");
    cache.clear().await.expect("clear");
    for ((inode, blockno), want) in &model {
        let got = cache
            .read(*inode, *blockno, 0, BLOCK as usize)
            .await
            .expect("read back");
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
    cache.shutdown().await.expect("shutdown");
}

/// Runs one case on a runtime of its own.
fn run_case(actions: Vec<Action>, linked: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(actions, linked));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("BLOCKCACHE_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cache_matches_the_model(actions in proptest::collection::vec(action(), 1..40)) {
        run_case(actions, false);
    }

    #[test]
    fn cache_matches_the_model_with_linked_objects(actions in proptest::collection::vec(action(), 1..40)) {
        run_case(actions, true);
    }
}
