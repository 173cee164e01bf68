//! Objects of a `file://` store that are hard links to cache files (made by uploads, and by
//! misses): the store's copy never changes when its block does (in place, by truncation,
//! after a restart, under concurrent writers, syncs and flushes), damaged or missing objects
//! are not linked into the cache, and a store on another file system gets copies.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use blockcache::{BlockCache, Config};
use blockcache_backend::Backend;
use blockcache_backend::faulty::Op;
use blockcache_db::Db;
use blockcache_tests::{Env, WAIT, data, within};

/// Block 0 of `inode`, whole (1 KiB blocks).
async fn block_of(cache: &BlockCache, inode: u64) -> bytes::Bytes {
    cache.read(inode, 0, 0, 1024).await.expect("read")
}

/// The link count of the file at `path`.
fn links(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("object").nlink()
}

/// The store's only object (panics unless there is exactly one).
async fn only_object(env: &Env) -> u64 {
    let ids = env.store_ids().await;
    assert_eq!(ids.len(), 1, "objects in the store: {ids:?}");
    ids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_object_keeps_its_bytes_when_its_blocks_change() {
    let env = Env::linked();
    let cache = env.open().await;
    let original = data(1, 1024);
    // Three blocks of equal content: one object, a hard link of one of their cache files.
    for inode in 1..=3 {
        cache.write(inode, 0, 0, &original).await.expect("write");
    }
    cache.flush().await.expect("flush");
    let id = only_object(&env).await;
    let object = env.object_path(id);
    assert_eq!(
        links(&object),
        2,
        "the object is the cache file of one block"
    );

    // Change two of the blocks in place: whichever holds the link gets a copy first.
    cache.write(1, 0, 10, b"changed").await.expect("write");
    cache
        .write(2, 0, 1000, b"also changed")
        .await
        .expect("write");
    assert_eq!(std::fs::read(&object).expect("object"), original);
    assert_eq!(
        links(&object),
        1,
        "no cache file shares the object any more"
    );
    cache.flush().await.expect("flush");
    assert_eq!(std::fs::read(&object).expect("object"), original);

    cache.clear().await.expect("clear");
    let mut want1 = original.clone();
    want1[10..17].copy_from_slice(b"changed");
    let mut want2 = original.clone();
    want2[1000..1012].copy_from_slice(b"also changed");
    assert_eq!(&block_of(&cache, 1).await[..], &want1[..]);
    assert_eq!(&block_of(&cache, 2).await[..], &want2[..]);
    assert_eq!(
        &block_of(&cache, 3).await[..],
        &original[..],
        "the block still pointing to the object reads its old bytes"
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_a_linked_block_leaves_its_object_whole() {
    let env = Env::linked();
    let cache = env.open().await;
    let original = data(2, 1024);
    cache.write(1, 0, 0, &original).await.expect("write");
    cache.write(2, 0, 0, &original).await.expect("write");
    cache.flush().await.expect("flush");
    let object = env.object_path(only_object(&env).await);
    for inode in 1..=2 {
        let mut block = cache.block(inode, 0).await.expect("handle");
        block.truncate(10).await.expect("truncate");
    }
    assert_eq!(std::fs::read(&object).expect("object"), original);
    cache.flush().await.expect("flush");
    assert!(
        cache
            .wait_for_removals(std::time::Duration::from_secs(30))
            .await
    );
    assert!(!object.exists(), "the released object was deleted");
    cache.clear().await.expect("clear");
    for inode in 1..=2 {
        assert_eq!(&block_of(&cache, inode).await[..], &original[..10]);
    }
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_survive_a_restart_and_are_still_copied_before_a_change() {
    let env = Env::linked();
    let original = data(3, 1024);
    let cache = env.open().await;
    cache.write(1, 0, 0, &original).await.expect("write");
    cache.write(2, 0, 0, &original).await.expect("write");
    cache.flush().await.expect("flush");
    cache.shutdown().await.expect("shutdown");
    let object = env.object_path(only_object(&env).await);
    assert_eq!(links(&object), 2);

    // A new engine knows nothing of earlier links: the link count tells it.
    let cache = env.open().await;
    cache.write(1, 0, 0, &[0xAB; 1024]).await.expect("write");
    cache.write(2, 0, 0, &[0xCD; 512]).await.expect("write");
    assert_eq!(std::fs::read(&object).expect("object"), original);
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    assert_eq!(&block_of(&cache, 1).await[..], &[0xAB; 1024][..]);
    let mut want2 = original.clone();
    want2[..512].fill(0xCD);
    assert_eq!(&block_of(&cache, 2).await[..], &want2[..]);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

/// The content of writer `t`'s block in `round`: one of the anchors' contents, or, in the
/// rounds that commit between a block's two writes, a new one (so that the commit makes an
/// object of the writer's own file).
fn seed_of(t: u64, round: u64) -> u64 {
    if round.is_multiple_of(3) {
        100 + t * 1000 + round
    } else {
        (round * 7 + t) % 5
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_commits_never_change_a_stored_object() {
    let env = Env::linked();
    let mut config = env.config();
    config.max_bytes = 1 << 20;
    config.max_dirty_bytes = 1 << 20;
    let cache = Arc::new(env.open_with(config).await);
    // Anchors: blocks never changed, holding the contents the writers start from, so that
    // a writer's block often shares its object with an anchor (inode 9).
    for seed in 0..5u64 {
        cache
            .write(9, seed, 0, &data(seed, 1024))
            .await
            .expect("write");
    }
    cache.commit().await.expect("commit");
    // Four writers, each on its own blocks, with contents drawn from a few seeds so that
    // blocks share objects; commits (some between a block's two writes) and flushes run
    // meanwhile.
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut model = std::collections::HashMap::new();
            for round in 0..60u64 {
                let blockno = round % 6;
                let seed = seed_of(t, round);
                let bytes = data(seed, 1024);
                cache.write(t + 1, blockno, 0, &bytes).await.expect("write");
                if round.is_multiple_of(3) {
                    // The block's object may now be a link to its file; an anchor block
                    // (inode 10 + t) of the same content shares that object.
                    cache.commit().await.expect("commit");
                    cache.write(10 + t, round, 0, &bytes).await.expect("write");
                }
                let offset = (round * 37 % 1000) as usize;
                cache
                    .write(t + 1, blockno, offset as u64, &[round as u8; 16])
                    .await
                    .expect("write");
                let mut want = bytes;
                want[offset..offset + 16].fill(round as u8);
                model.insert(blockno, want);
                if round % 5 == t {
                    cache.commit().await.expect("commit");
                }
            }
            model
        }));
    }
    let flusher = {
        let cache = cache.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                cache.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
        })
    };
    // Syncs hash dirty blocks ahead of their commit while the writers change them.
    let syncer = {
        let cache = cache.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                cache.sync().await.expect("sync");
                tokio::task::yield_now().await;
            }
        })
    };
    let mut models = Vec::new();
    for t in tasks {
        models.push(within("a writer", WAIT * 4, t).await.expect("writer"));
    }
    within("the flusher", WAIT * 4, flusher)
        .await
        .expect("flusher");
    within("the syncer", WAIT * 4, syncer)
        .await
        .expect("syncer");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    // Every read is a download, verified against the hash the object was recorded with.
    for seed in 0..5u64 {
        let got = cache.read(9, seed, 0, 1024).await.expect("read back");
        assert_eq!(&got[..], &data(seed, 1024)[..], "anchor {seed}");
    }
    for t in 0..4u64 {
        for round in (0..60u64).step_by(3) {
            let got = cache.read(10 + t, round, 0, 1024).await.expect("read back");
            let seed = seed_of(t, round);
            assert_eq!(
                &got[..],
                &data(seed, 1024)[..],
                "anchor {round} of writer {t}"
            );
        }
    }
    for (t, model) in models.iter().enumerate() {
        for (blockno, want) in model {
            let got = cache
                .read(t as u64 + 1, *blockno, 0, 1024)
                .await
                .expect("read back");
            assert_eq!(&got[..], &want[..], "block {blockno} of writer {t}");
        }
    }
    assert!(
        cache
            .wait_for_removals(std::time::Duration::from_secs(30))
            .await
    );
    cache.check_invariants().await.expect("invariants");
    let usage = cache.usage().await.expect("usage");
    assert_eq!(
        env.backend().stored_bytes().await.expect("list"),
        usage.stored_bytes
    );
    Arc::into_inner(cache)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_another_file_system_gets_copies() {
    // /dev/shm is a tmpfs: a hard link from the cache's disk into it fails with EXDEV.
    let store = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    let dir = tempfile::tempdir().expect("tempdir");
    assert_ne!(
        std::fs::metadata(store.path()).expect("store").dev(),
        std::fs::metadata(dir.path()).expect("dir").dev(),
        "the test needs /dev/shm on a file system of its own"
    );
    let open = || async {
        let mut config = Config::new(dir.path().join("cache"));
        config.block_size = 1024;
        config.upload_delay = None;
        let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
            .await
            .expect("db");
        let backend =
            Backend::from_url(&format!("file://{}", store.path().display())).expect("store");
        BlockCache::open(config, db, backend).await.expect("open")
    };
    let cache: BlockCache = open().await;
    let original = data(4, 1024);
    cache.write(1, 0, 0, &original).await.expect("write");
    cache.write(2, 0, 0, &data(5, 1024)).await.expect("write");
    cache.flush().await.expect("flush");
    let ids = Backend::from_url(&format!("file://{}", store.path().display()))
        .expect("store")
        .list_ids()
        .await
        .expect("list");
    assert_eq!(ids.len(), 2);
    for id in ids {
        let path = store
            .path()
            .join("data")
            .join(format!("{:02x}", id & 0xff))
            .join(id.to_string());
        assert_eq!(std::fs::metadata(&path).expect("object").nlink(), 1);
    }
    cache.write(1, 0, 0, b"new").await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let mut want = original;
    want[..3].copy_from_slice(b"new");
    assert_eq!(&block_of(&cache, 1).await[..], &want[..]);
    assert_eq!(&block_of(&cache, 2).await[..], &data(5, 1024)[..]);
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_link_the_object_into_the_cache_and_changes_still_copy() {
    let env = Env::linked();
    let cache = env.open().await;
    let original = data(6, 1024);
    cache.write(1, 0, 0, &original).await.expect("write");
    cache.write(2, 0, 0, &original).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let object = env.object_path(only_object(&env).await);
    assert_eq!(links(&object), 1);
    // Both misses are served by links to the one object (the second through the first
    // one's cache file): no copies.
    assert_eq!(&block_of(&cache, 1).await[..], &original[..]);
    assert_eq!(&block_of(&cache, 2).await[..], &original[..]);
    assert_eq!(links(&object), 3);
    let usage = cache.usage().await.expect("usage");
    assert_eq!((usage.downloads, usage.download_dedup_hits), (1, 1));
    // A change of one of them leaves the object and the other block alone.
    cache.write(1, 0, 0, b"changed").await.expect("write");
    assert_eq!(std::fs::read(&object).expect("object"), original);
    assert_eq!(&block_of(&cache, 2).await[..], &original[..]);
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let mut want = original.clone();
    want[..7].copy_from_slice(b"changed");
    assert_eq!(&block_of(&cache, 1).await[..], &want[..]);
    assert_eq!(&block_of(&cache, 2).await[..], &original[..]);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_object_is_not_linked_into_the_cache() {
    let env = Env::linked();
    let cache = env.open().await;
    cache.write(1, 0, 0, &data(7, 1024)).await.expect("write");
    cache.write(2, 0, 0, &data(8, 1024)).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let ids = env.store_ids().await;
    assert_eq!(ids.len(), 2);
    // Damage one object (same length, other bytes) and delete the other.
    let damaged = ids
        .iter()
        .copied()
        .find(|&id| std::fs::read(env.object_path(id)).expect("object") == data(7, 1024))
        .expect("the object of block 1");
    let missing = ids
        .iter()
        .copied()
        .find(|&id| id != damaged)
        .expect("the other");
    std::fs::write(env.object_path(damaged), data(70, 1024)).expect("damage");
    std::fs::remove_file(env.object_path(missing)).expect("delete");
    let err = cache.read(1, 0, 0, 1024).await.expect_err("damaged");
    assert!(
        matches!(err, blockcache::Error::Corrupted { obj_id, .. } if obj_id == damaged),
        "{err}"
    );
    let err = cache.read(2, 0, 0, 1024).await.expect_err("missing");
    assert!(
        matches!(err, blockcache::Error::Download { obj_id, .. } if obj_id == missing),
        "{err}"
    );
    assert!(
        blockcache_tests::list_dir(&env.cache_dir()).is_empty(),
        "nothing was left in the cache: {:?}",
        blockcache_tests::list_dir(&env.cache_dir())
    );
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_cannot_be_linked_into_fails_the_upload_and_keeps_the_block_dirty() {
    let env = Env::linked();
    let cache = env.open().await;
    // The first object would live in data/<its shard>/: a plain file there makes both the
    // link and the fallback upload of the bytes fail.
    let shard = env
        .store_dir()
        .join(format!("data/{:02x}", Env::nth_object(1) & 0xff));
    std::fs::create_dir_all(env.store_dir().join("data")).expect("data dir");
    std::fs::write(&shard, b"in the way").expect("blocker");
    let original = data(9, 1024);
    cache.write(1, 0, 0, &original).await.expect("write");
    let err = cache
        .flush()
        .await
        .expect_err("the store cannot hold object 1");
    assert!(matches!(err, blockcache::Error::Upload { .. }), "{err}");
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.dirty_entries, 1, "the block stays dirty");
    // Once the store can hold it again, the next flush uploads it.
    std::fs::remove_file(&shard).expect("unblock");
    cache.flush().await.expect("flush");
    assert_eq!(cache.usage().await.expect("usage").dirty_entries, 0);
    cache.clear().await.expect("clear");
    assert_eq!(&block_of(&cache, 1).await[..], &original[..]);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_that_cannot_be_linked_into_the_cache_fails_and_frees_its_room() {
    let env = Env::linked();
    let cache = env.open().await;
    let original = data(10, 1024);
    cache.write(1, 0, 0, &original).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    // A directory where the clean cache file would go: the link cannot replace it.
    let blocker = env.cache_dir().join("1-0");
    std::fs::create_dir(&blocker).expect("blocker");
    let err = cache
        .read(1, 0, 0, 1024)
        .await
        .expect_err("no room for the link");
    // The link fails, the fetch that follows cannot write the file either: an I/O error of
    // the cache naming the file.
    assert!(
        matches!(&err, blockcache::Error::Io { path, .. } if *path == blocker),
        "{err}"
    );
    // The room reserved for the block is free again, and nothing was cached.
    cache.check_invariants().await.expect("invariants");
    assert_eq!(cache.usage().await.expect("usage").entries, 0);
    std::fs::remove_dir(&blocker).expect("unblock");
    assert_eq!(&block_of(&cache, 1).await[..], &original[..]);
    cache.shutdown().await.expect("shutdown");
}

/// Writes `blocks` blocks of `bs` bytes (inodes 1.., the last two alike), fails the store's
/// next durability barrier, and checks that no block counts as stored until a later flush,
/// which stores them all, and that removing them leaves nothing in the store.
async fn barrier_failure_round(bs: u64, blocks: u64) {
    let env = Env::linked();
    let mut config = env.config();
    config.block_size = bs;
    config.max_bytes = 4 * blocks * bs;
    config.max_dirty_bytes = 4 * blocks * bs;
    let cache = env.open_with(config).await;
    let content = |i: u64| data(20 + i.min(blocks - 2), bs as usize);
    for i in 0..blocks {
        cache.write(i + 1, 0, 0, &content(i)).await.expect("write");
    }
    env.faults.fail_first(Op::Barrier, 1);
    let err = cache.flush().await.expect_err("the barrier fails");
    assert!(matches!(err, blockcache::Error::Upload { .. }), "{err}");
    assert!(
        format!("{err:#}").contains("durable") || format!("{err:?}").contains("NotDurable"),
        "{err:?}"
    );
    assert_eq!(env.faults.injected(Op::Barrier), 1);
    let usage = cache.usage().await.expect("usage");
    assert!(usage.dirty_entries > 0, "blocks stay dirty: {usage:?}");
    cache.check_invariants().await.expect("invariants");

    cache.flush().await.expect("a later flush");
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.dirty_entries, 0);
    assert_eq!(
        usage.stored_bytes,
        (blocks - 1) * bs,
        "one object per content"
    );
    cache.clear().await.expect("clear");
    for i in 0..blocks {
        let got = cache.read(i + 1, 0, 0, bs as usize).await.expect("read");
        assert_eq!(&got[..], &content(i)[..], "block of inode {}", i + 1);
    }
    cache.check_invariants().await.expect("invariants");
    for i in 0..blocks {
        cache.remove(i + 1, 0..u64::MAX).await.expect("remove");
    }
    assert!(
        cache
            .wait_for_removals(std::time::Duration::from_secs(20))
            .await
    );
    assert_eq!(
        env.store_ids().await,
        Vec::<u64>::new(),
        "nothing left behind"
    );
    cache.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_barrier_keeps_small_blocks_dirty_until_a_later_flush() {
    // Small objects: the confirmer's barrier is one syncfs of the store.
    barrier_failure_round(1024, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_barrier_keeps_large_blocks_dirty_until_a_later_flush() {
    // Objects of 256 KiB or more: each upload task fsyncs its object, then the confirmer
    // fsyncs their directories; the first of these barriers fails.
    barrier_failure_round(256 << 10, 4).await;
}

/// A miss from a linked store whose directory is gone (replaced by a plain file) is the
/// store's failure (`Error::Download`), not an I/O error of the cache, and changes nothing:
/// once the store is back, the block reads as written.
#[tokio::test]
async fn a_miss_from_a_broken_linked_store_is_a_download_error() {
    let env = Env::linked();
    let cache = env.open().await;
    let bytes = data(11, 1024);
    cache.write(1, 0, 0, &bytes).await.expect("write");
    cache.flush().await.expect("flush");
    cache.clear().await.expect("clear");
    let store = env.store_dir();
    let moved = store.with_extension("away");
    std::fs::rename(&store, &moved).expect("move the store away");
    std::fs::write(&store, b"not a directory").expect("a file in its place");
    let err = cache
        .read(1, 0, 0, 1024)
        .await
        .expect_err("the store is broken");
    assert!(
        matches!(err, blockcache::Error::Download { .. }),
        "not a store failure: {err:?}"
    );
    std::fs::remove_file(&store).expect("remove the file");
    std::fs::rename(&moved, &store).expect("put the store back");
    assert_eq!(&block_of(&cache, 1).await[..], &bytes[..]);
    cache.check_invariants().await.expect("invariants");
    cache.shutdown().await.expect("shutdown");
}
