//! Unit tests of the metadata store against real SQLite files.

use crate::{CommitRequest, Committed, Db, Error, ObjectState, Outcome};

async fn open() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("open");
    (dir, db)
}

/// Commits `requests` the way the engine does: [`Db::commit_blocks_unsynced`], whose
/// ticket the callers here need not keep (a later synchronized write, or none, as they go).
async fn commit(db: &Db, requests: &[CommitRequest]) -> Result<Vec<Committed>, Error> {
    db.commit_blocks_unsynced(requests)
        .await
        .map(|(committed, _)| committed)
}

fn req(inode: u64, blockno: u64, fill: u8, length: u64) -> CommitRequest {
    CommitRequest {
        inode,
        blockno,
        hash: [fill; 32],
        length,
    }
}

#[tokio::test]
async fn block_size_is_fixed_at_creation() {
    let (dir, db) = open().await;
    db.check_block_size(4096).await.expect("record");
    db.check_block_size(4096).await.expect("same size again");
    db.close().await;
    let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("reopen");
    let err = db.check_block_size(8192).await.expect_err("mismatch");
    assert!(matches!(
        err,
        Error::BlockSizeMismatch {
            stored: 4096,
            requested: 8192
        }
    ));
    assert!(err.to_string().contains("4096") && err.to_string().contains("8192"));
}

#[tokio::test]
async fn dedup_link_release_and_totals() {
    let (_dir, db) = open().await;
    // Two blocks with equal content: one object, refcount 2.
    let r = commit(&db, &[req(1, 0, 0xaa, 10), req(1, 1, 0xaa, 10)])
        .await
        .expect("commit");
    let Outcome::Created { obj_id } = r[0].outcome else {
        panic!("expected a new object, got {r:?}")
    };
    assert_eq!(
        r[1].outcome,
        Outcome::Linked {
            obj_id,
            state: ObjectState::Uploading
        }
    );
    assert!(db.confirm_upload(obj_id, 10).await.expect("confirm"));
    let totals = db.totals().await.expect("totals");
    assert_eq!(
        (
            totals.objects,
            totals.unique_bytes,
            totals.stored_bytes,
            totals.logical_bytes
        ),
        (1, 10, 10, 20)
    );
    // Same content again: unchanged.
    let r = commit(&db, &[req(1, 0, 0xaa, 10)]).await.expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Unchanged { .. }));
    // Block 0 moves to new content: old object keeps one reference.
    let r = commit(&db, &[req(1, 0, 0xbb, 5)]).await.expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Created { .. }));
    assert_eq!(r[0].released, None);
    // Block 1 is removed: the old object is released and its deletion recorded.
    let released = db.remove_blocks(&[(1, 1), (9, 9)]).await.expect("remove");
    assert_eq!(released, vec![obj_id]);
    assert_eq!(db.pending_deletions().await.expect("pending"), vec![obj_id]);
    assert!(db.mapping(1, 1).await.expect("mapping").is_none());
    db.finish_deletions(&[obj_id]).await.expect("finish");
    assert!(db.pending_deletions().await.expect("pending").is_empty());
    db.check_consistency().await.expect("consistent");
    let totals = db.totals().await.expect("totals");
    assert_eq!(
        (
            totals.objects,
            totals.unique_bytes,
            totals.stored_bytes,
            totals.logical_bytes
        ),
        (1, 5, 0, 5)
    );
}

#[tokio::test]
async fn failed_upload_clears_hash_so_nothing_dedups_against_it() {
    let (_dir, db) = open().await;
    let r = commit(&db, &[req(1, 0, 1, 3)]).await.expect("commit");
    let Outcome::Created { obj_id: first } = r[0].outcome else {
        panic!("expected a new object, got {r:?}")
    };
    let recorded = db.record_uploads(&[(first, None)]).await.expect("fail");
    assert_eq!(recorded, vec![false], "a failure records no success");
    let object = db.mapping(1, 0).await.expect("mapping").expect("mapped");
    assert_eq!(
        (object.id, object.hash, object.state),
        (first, None, ObjectState::Failed)
    );
    // Another block with the same content gets its own object.
    let r = commit(&db, &[req(2, 0, 1, 3)]).await.expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Created { obj_id } if obj_id != first));
    // Recommitting the first block moves it to the new object and releases the failed one.
    let r = commit(&db, &[req(1, 0, 1, 3)]).await.expect("commit");
    assert_eq!(r[0].released, Some(first));
    assert!(
        !db.confirm_upload(first, 3)
            .await
            .expect("confirm of a gone object")
    );
    let unconfirmed = db.unconfirmed_objects().await.expect("unconfirmed");
    assert_eq!(unconfirmed.len(), 1);
    assert_eq!(unconfirmed[0].1, vec![(1, 0), (2, 0)]);
    db.check_consistency().await.expect("consistent");
}

#[tokio::test]
async fn concurrent_commits_of_equal_content_create_one_object() {
    let (_dir, db) = open().await;
    let db = std::sync::Arc::new(db);
    let mut tasks = Vec::new();
    for inode in 0..16 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            commit(&db, &[req(inode, 0, 7, 100)]).await.expect("commit")
        }));
    }
    let mut created = 0;
    for t in tasks {
        if matches!(t.await.expect("join")[0].outcome, Outcome::Created { .. }) {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    assert_eq!(db.totals().await.expect("totals").objects, 1);
    db.check_consistency().await.expect("consistent");
}

#[tokio::test]
async fn mapped_blocks_lists_a_range() {
    let (_dir, db) = open().await;
    commit(
        &db,
        &[
            req(5, 1, 1, 1),
            req(5, 3, 2, 1),
            req(5, 9, 3, 1),
            req(6, 2, 4, 1),
        ],
    )
    .await
    .expect("commit");
    assert_eq!(
        db.mapped_blocks(5, 2..u64::MAX).await.expect("list"),
        vec![3, 9]
    );
    let m = db.mapping(5, 3).await.expect("mapping").expect("mapped");
    assert_eq!(m.hash, Some([2; 32]));
    assert!(db.mapping(5, 4).await.expect("mapping").is_none());
}

#[tokio::test]
async fn numbers_past_i64_are_rejected() {
    let (_dir, db) = open().await;
    let err = db.mapping(u64::MAX, 0).await.expect_err("too big");
    assert!(err.to_string().contains("exceeds"), "{err}");
}

#[tokio::test]
async fn a_block_twice_in_one_batch_is_refused_and_changes_nothing() {
    let (_dir, db) = open().await;
    let err = commit(&db, &[req(1, 0, 1, 3), req(1, 0, 2, 3)])
        .await
        .expect_err("duplicate");
    assert!(
        matches!(
            err,
            Error::DuplicateBlock {
                inode: 1,
                blockno: 0
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert_eq!(db.totals().await.expect("totals").objects, 0);
    assert!(db.mapping(1, 0).await.expect("mapping").is_none());
}

/// The batched statements against a model of one-block-at-a-time commits (with every new
/// reference taken before old ones are dropped), over random sequences of operations.
mod model {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::open;
    use crate::{CommitRequest, Committed, Db, ObjectState, Outcome};

    #[derive(Debug, Clone)]
    enum Op {
        Commit(Vec<(u64, u64, u8)>),
        Remove(Vec<(u64, u64)>),
        Record(Vec<(usize, bool)>),
        FinishDeletions(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = (0u64..3, 0u64..4);
        prop_oneof![
            4 => prop::collection::vec((0u64..3, 0u64..4, 0u8..5), 1..8).prop_map(Op::Commit),
            1 => prop::collection::vec(key, 1..6).prop_map(Op::Remove),
            2 => prop::collection::vec((0usize..16, any::<bool>()), 1..6).prop_map(Op::Record),
            1 => (0usize..4).prop_map(Op::FinishDeletions),
        ]
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Obj {
        hash: Option<u8>,
        refcount: u64,
        length: u64,
        state: ObjectState,
    }

    #[derive(Debug, Default)]
    struct Model {
        blocks: BTreeMap<(u64, u64), u64>,
        objects: BTreeMap<u64, Obj>,
        pending: BTreeSet<u64>,
        max_id: u64,
    }

    impl Model {
        fn by_hash(&self, h: u8) -> Option<u64> {
            self.objects
                .iter()
                .find(|(_, o)| o.hash == Some(h))
                .map(|(&id, _)| id)
        }

        /// Checks `got` against the model and applies the batch.
        fn commit(&mut self, batch: &[(u64, u64, u8)], got: &[Committed]) {
            assert_eq!(got.len(), batch.len());
            let mut releases: BTreeMap<u64, usize> = BTreeMap::new();
            let mut drops: BTreeMap<u64, u64> = BTreeMap::new();
            for (i, (&(inode, blockno, h), c)) in batch.iter().zip(got).enumerate() {
                let old = self.blocks.get(&(inode, blockno)).copied();
                match self.by_hash(h) {
                    Some(id) if old == Some(id) => {
                        let state = self.objects[&id].state;
                        assert_eq!(
                            c.outcome,
                            Outcome::Unchanged { obj_id: id, state },
                            "block {i}"
                        );
                        continue;
                    }
                    Some(id) => {
                        let o = self.objects.get_mut(&id).expect("known");
                        assert_eq!(
                            c.outcome,
                            Outcome::Linked {
                                obj_id: id,
                                state: o.state
                            },
                            "block {i}"
                        );
                        o.refcount += 1;
                        self.blocks.insert((inode, blockno), id);
                    }
                    None => {
                        let Outcome::Created { obj_id } = c.outcome else {
                            panic!("block {i}: expected a new object, got {c:?}");
                        };
                        assert!(obj_id > self.max_id, "object id {obj_id} reused");
                        self.max_id = obj_id;
                        self.objects.insert(
                            obj_id,
                            Obj {
                                hash: Some(h),
                                refcount: 1,
                                length: u64::from(h) + 1,
                                state: ObjectState::Uploading,
                            },
                        );
                        self.blocks.insert((inode, blockno), obj_id);
                    }
                }
                if let Some(old) = old {
                    *drops.entry(old).or_default() += 1;
                    releases.insert(old, i);
                }
            }
            let mut expected: Vec<Option<u64>> = vec![None; batch.len()];
            for (id, n) in drops {
                let o = self.objects.get_mut(&id).expect("mapped object exists");
                o.refcount -= n;
                if o.refcount == 0 {
                    self.objects.remove(&id);
                    self.pending.insert(id);
                    expected[releases[&id]] = Some(id);
                }
            }
            let released: Vec<Option<u64>> = got.iter().map(|c| c.released).collect();
            assert_eq!(released, expected);
        }

        fn remove(&mut self, keys: &[(u64, u64)]) -> Vec<u64> {
            let mut released = Vec::new();
            for key in keys {
                if let Some(id) = self.blocks.remove(key) {
                    let o = self.objects.get_mut(&id).expect("mapped object exists");
                    o.refcount -= 1;
                    if o.refcount == 0 {
                        self.objects.remove(&id);
                        self.pending.insert(id);
                        released.push(id);
                    }
                }
            }
            released.sort_unstable();
            released
        }

        async fn check(&self, db: &Db) {
            // Every object of the model has a reference, so the mappings reach them all.
            let mut seen = BTreeSet::new();
            for (&(inode, blockno), &id) in &self.blocks {
                let o = db
                    .mapping(inode, blockno)
                    .await
                    .expect("mapping")
                    .expect("mapped");
                assert_eq!(o.id, id, "block ({inode}, {blockno})");
                let got = Obj {
                    hash: o.hash.map(|h| h[0]),
                    refcount: o.refcount,
                    length: o.length,
                    state: o.state,
                };
                assert_eq!(&got, &self.objects[&id], "object {id}");
                seen.insert(id);
            }
            assert!(seen.iter().eq(self.objects.keys()), "objects {seen:?}");
            let totals = db.totals().await.expect("totals");
            assert_eq!(totals.objects, self.objects.len() as u64);
            let pending: BTreeSet<u64> = db
                .pending_deletions()
                .await
                .expect("pending")
                .into_iter()
                .collect();
            assert_eq!(pending, self.pending);
            db.check_consistency().await.expect("consistent");
        }
    }

    async fn run(ops: Vec<Op>) {
        let (_dir, db) = open().await;
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Commit(mut batch) => {
                    let mut seen = BTreeSet::new();
                    batch.retain(|&(i, b, _)| seen.insert((i, b)));
                    let requests: Vec<CommitRequest> = batch
                        .iter()
                        .map(|&(inode, blockno, h)| CommitRequest {
                            inode,
                            blockno,
                            hash: [h; 32],
                            length: u64::from(h) + 1,
                        })
                        .collect();
                    let (got, ticket) = db
                        .commit_blocks_unsynced(&requests)
                        .await
                        .expect("unsynced commit");
                    assert!(!db.is_durable(ticket));
                    // Half of the batches are synced at once, the others by a later write.
                    if batch.len() % 2 == 0 {
                        db.sync_through(ticket).await.expect("sync");
                        assert!(db.is_durable(ticket));
                    }
                    model.commit(&batch, &got);
                }
                Op::Remove(keys) => {
                    let mut got = db.remove_blocks(&keys).await.expect("remove");
                    got.sort_unstable();
                    assert_eq!(got, model.remove(&keys));
                }
                Op::Record(picks) => {
                    let uploading: Vec<u64> = model
                        .objects
                        .iter()
                        .filter(|(_, o)| o.state == ObjectState::Uploading)
                        .map(|(&id, _)| id)
                        .collect();
                    if uploading.is_empty() {
                        continue;
                    }
                    let mut outcomes: Vec<(u64, Option<u64>)> = Vec::new();
                    for (pick, ok) in picks {
                        let id = uploading[pick % uploading.len()];
                        if outcomes.iter().any(|&(o, _)| o == id) {
                            continue;
                        }
                        outcomes.push((id, ok.then_some(100 + id)));
                    }
                    // An object released meanwhile is not recorded.
                    outcomes.push((model.max_id + 1000, Some(1)));
                    let got = db.record_uploads(&outcomes).await.expect("record");
                    let expected: Vec<bool> = outcomes
                        .iter()
                        .map(|&(id, stored)| {
                            let Some(o) = model.objects.get_mut(&id) else {
                                return false;
                            };
                            if stored.is_some() {
                                o.state = ObjectState::Uploaded;
                                true
                            } else {
                                o.state = ObjectState::Failed;
                                o.hash = None;
                                false
                            }
                        })
                        .collect();
                    assert_eq!(got, expected);
                }
                Op::FinishDeletions(n) => {
                    let ids: Vec<u64> = model.pending.iter().take(n).copied().collect();
                    db.finish_deletions(&ids).await.expect("finish");
                    for id in ids {
                        model.pending.remove(&id);
                    }
                }
            }
            model.check(&db).await;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn batched_statements_match_the_model(ops in prop::collection::vec(op(), 1..24)) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(run(ops));
        }
    }
}

/// The writer's `synchronous` level (2 is FULL) and the sync point's counter.
async fn sync_state(db: &Db) -> (i64, i64) {
    let mut w = db.writer.lock().await;
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *w)
        .await
        .expect("read synchronous");
    let n: i64 = sqlx::query_scalar("SELECT n FROM sync_point WHERE id = 0")
        .fetch_one(&mut *w)
        .await
        .expect("read the sync point");
    (level, n)
}

#[tokio::test]
async fn unsynced_commits_become_durable_with_the_next_synced_commit_or_a_sync() {
    let (_dir, db) = open().await;
    let (got, t1) = db
        .commit_blocks_unsynced(&[req(1, 0, 1, 3)])
        .await
        .expect("unsynced commit");
    assert!(matches!(got[0].outcome, Outcome::Created { .. }));
    assert!(!db.is_durable(t1), "nothing synced the commit yet");
    assert_eq!(
        sync_state(&db).await,
        (2, 0),
        "FULL is restored after the commit"
    );
    // A synchronized commit syncs the whole log, and so every commit before it.
    let Outcome::Created { obj_id: id } = got[0].outcome else {
        unreachable!("checked above")
    };
    db.record_uploads(&[(id, Some(3))]).await.expect("record");
    assert!(db.is_durable(t1));
    db.sync_through(t1).await.expect("sync");
    assert_eq!(sync_state(&db).await, (2, 0), "durable already: no write");

    let (_, t2) = db
        .commit_blocks_unsynced(&[req(1, 1, 2, 3)])
        .await
        .expect("unsynced commit");
    assert!(t2 > t1 && !db.is_durable(t2));
    db.sync_through(t2).await.expect("sync");
    assert!(db.is_durable(t2));
    assert_eq!(sync_state(&db).await, (2, 1), "one synchronized write");
    let (_, t3) = db
        .commit_blocks_unsynced(&[req(1, 2, 3, 3)])
        .await
        .expect("unsynced commit");
    db.sync_all().await.expect("sync all");
    assert!(db.is_durable(t3));
    assert_eq!(sync_state(&db).await, (2, 2));
    db.check_consistency().await.expect("consistent");
}

#[tokio::test]
async fn a_failed_unsynced_commit_changes_nothing_and_restores_full_sync() {
    let (_dir, db) = open().await;
    let err = db
        .commit_blocks_unsynced(&[req(1, 0, 1, 3), req(1, 0, 2, 3)])
        .await
        .expect_err("a block twice");
    assert!(matches!(
        err,
        Error::DuplicateBlock {
            inode: 1,
            blockno: 0
        }
    ));
    assert_eq!(sync_state(&db).await.0, 2, "FULL is restored");
    assert_eq!(db.totals().await.expect("totals").objects, 0);
    // A writer finding the connection left relaxed restores FULL before it writes.
    {
        let mut w = db.writer.lock().await;
        super::set_synchronous(&mut w, super::Synchronous::Normal)
            .await
            .expect("relax");
        db.relaxed.store(true, std::sync::atomic::Ordering::Release);
    }
    // A synchronized writer (an unsynced commit would restore FULL after itself anyway).
    db.remove_blocks(&[(1, 0)]).await.expect("remove");
    assert_eq!(sync_state(&db).await.0, 2, "restored by the next writer");
}

#[tokio::test]
async fn staging_inodes_are_allocated_in_batches_and_unused_ones_forgotten() {
    let (dir, db) = open().await;
    let first = db.create_staging_inodes(3).await.expect("allocate");
    assert_eq!(first.len(), 3);
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    let more = db.create_staging_inodes(2).await.expect("allocate");
    assert!(more[0] > first[2], "never reused: {first:?} then {more:?}");
    // Durable and listed as staging, so a crash leaves them to the next open's cleanup.
    drop(db);
    let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("reopen");
    let mut all = first.clone();
    all.extend(&more);
    assert_eq!(db.inodes_to_clean().await.expect("list"), all);
    // One of them got a block, one was named: neither is forgotten.
    commit(&db, &[req(first[0], 0, 1, 10)])
        .await
        .expect("commit");
    db.replace_file("named", first[1], 10, 1, None, false)
        .await
        .expect("name it");
    db.forget_staging_inodes(&all).await.expect("forget");
    assert_eq!(db.inodes_to_clean().await.expect("list"), vec![first[0]]);
    db.forget_staging_inodes(&[])
        .await
        .expect("nothing to forget");
    db.check_consistency().await.expect("consistent");
}

#[tokio::test]
async fn a_second_open_of_one_database_is_refused_and_names_the_holder() {
    let (dir, db) = open().await;
    let path = dir.path().join("meta.db");
    let err = Db::open(path.to_str().expect("utf-8"))
        .await
        .expect_err("second open of a locked volume");
    let message = err.to_string();
    assert!(matches!(err, Error::VolumeLocked { .. }), "{message}");
    assert!(
        message.contains("meta.db.lock")
            && message.contains(&format!("pid {}", std::process::id())),
        "the message names the lock and its holder: {message}"
    );
    db.close().await;
    drop(db);
    let db = Db::open(path.to_str().expect("utf-8"))
        .await
        .expect("open once the holder is gone");
    db.close().await;
}

#[tokio::test]
async fn the_volume_id_is_chosen_once() {
    let (dir, db) = open().await;
    let first = db.volume_id().await.expect("id");
    assert!(first.created && first.id.len() == 32, "{first:?}");
    let again = db.volume_id().await.expect("id again");
    assert_eq!(
        (again.id.as_str(), again.created),
        (first.id.as_str(), false)
    );
    db.close().await;
    drop(db);
    let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("reopen");
    assert_eq!(db.volume_id().await.expect("id").id, first.id);
    let (_other_dir, other) = open().await;
    assert_ne!(other.volume_id().await.expect("id").id, first.id);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop; `None` (with the
/// reason printed) where this process may not mount.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match mounted {
            Ok(status) if status.success() => Some(Self(dir)),
            other => {
                eprintln!("skipped: cannot mount a tmpfs here (needs root): {other:?}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// SQLITE_FULL at `COMMIT` makes SQLite roll the transaction back by itself; sqlx's own
/// `ROLLBACK` then fails and sqlx believes a transaction is still open, so that a later
/// rolled-back transaction left the connection inside one for good ("Safety level may not
/// be changed inside a transaction" on every write after). The writer is repaired instead.
#[tokio::test]
async fn a_full_disk_leaves_the_writer_usable_once_space_is_back() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    let db = Db::open(fs.0.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("open");
    let ballast = fs.0.path().join("ballast");
    // Fills the file system (the write stops at ENOSPC).
    let _ = std::fs::write(&ballast, vec![0u8; 4 << 20]);
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let mut r = req(1, i, 0, 10);
            r.hash[..8].copy_from_slice(&i.to_le_bytes());
            r
        })
        .collect();
    let err = commit(&db, &requests).await.expect_err("a full disk");
    assert!(err.to_string().contains("full"), "{err}");
    assert!(
        db.probe_write().await.is_err(),
        "the probe sees the full disk"
    );
    std::fs::remove_file(&ballast).expect("free the space");
    // A transaction rolled back on purpose (a batch naming one block twice).
    commit(&db, &[req(5, 5, 1, 10), req(5, 5, 1, 10)])
        .await
        .expect_err("duplicate block");
    commit(&db, &requests)
        .await
        .expect("commit once space is back");
    db.sync_all().await.expect("sync");
    db.create_staging_inodes(2).await.expect("allocate inodes");
    db.probe_write().await.expect("probe");
    db.check_consistency().await.expect("consistent");
    db.close().await;
}

/// `Db::open` makes the database's directory, and an error names the file or directory it
/// could not use (it said "(code: 14) unable to open database file" with no path).
#[tokio::test]
async fn open_makes_the_directory_and_errors_name_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("a/b/meta.db");
    let db = Db::open(nested.to_str().expect("utf-8"))
        .await
        .expect("open in a directory that did not exist");
    db.close().await;
    assert!(nested.exists());
    // The parent is a file: the directory cannot be made.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    let under_file = file.join("meta.db");
    let err = Db::open(under_file.to_str().expect("utf-8"))
        .await
        .expect_err("a file for a directory");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    // The database path is a directory: SQLite cannot open it.
    let is_dir = dir.path().join("a");
    let err = Db::open(is_dir.to_str().expect("utf-8"))
        .await
        .expect_err("a directory for the file");
    assert!(
        err.to_string().contains(&is_dir.display().to_string()),
        "{err}"
    );
}

/// A digest for block `b` of the test below: distinct per block.
fn digest_of(b: u64) -> [u8; 32] {
    let mut h = [7u8; 32];
    h[..8].copy_from_slice(&b.to_le_bytes());
    h
}

#[tokio::test]
async fn a_round_reads_every_mapping_and_object_of_an_inode_noted_whole_past_one_aggregate() {
    let (_dir, db) = open().await;
    let inode = db.create_staging_inodes(1).await.expect("inode")[0];
    // More mappings and objects than one JSON aggregate holds.
    let n = crate::meta::AGGREGATE_ROWS as u64 + 3;
    let blocks: Vec<u64> = (0..n).collect();
    let mut failed = None;
    for chunk in blocks.chunks(1024) {
        let requests: Vec<CommitRequest> = chunk
            .iter()
            .map(|&b| CommitRequest {
                inode,
                blockno: b,
                hash: digest_of(b),
                length: 1,
            })
            .collect();
        let r = commit(&db, &requests).await.expect("commit");
        if failed.is_none() {
            let Outcome::Created { obj_id } = r[0].outcome else {
                panic!("expected a new object, got {:?}", r[0])
            };
            failed = Some(obj_id);
        }
    }
    let failed = failed.expect("one batch");
    // The first block's upload failed: its object has no hash any more.
    db.record_uploads(&[(failed, None)]).await.expect("fail");
    db.replace_file("f", inode, n, 0, None, false)
        .await
        .expect("name");
    let read = db.read_delta(usize::MAX).await.expect("read");
    let whole = &read.whole[&inode];
    assert_eq!(whole.len() as u64, n, "every mapping read");
    assert!(
        whole.iter().enumerate().all(|(i, &(b, _))| b == i as u64),
        "mappings in block order"
    );
    assert_eq!(read.objects.len() as u64, n, "every object read");
    let info = &read.objects[&failed];
    assert_eq!((info.row.1.as_deref(), info.uploaded), (None, false));
    let (_, last) = whole[whole.len() - 1];
    let hex: String = digest_of(n - 1)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(read.objects[&last].row.1.as_deref(), Some(hex.as_str()));
}
