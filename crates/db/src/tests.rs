//! Unit tests of the metadata store against real SQLite files.

use crate::{CommitRequest, Db, Error, ObjectState, Outcome};

async fn open() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path().join("meta.db").to_str().expect("utf-8"))
        .await
        .expect("open");
    (dir, db)
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
    let r = db
        .commit_blocks(&[req(1, 0, 0xaa, 10), req(1, 1, 0xaa, 10)])
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
    let r = db
        .commit_blocks(&[req(1, 0, 0xaa, 10)])
        .await
        .expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Unchanged { .. }));
    // Block 0 moves to new content: old object keeps one reference.
    let r = db
        .commit_blocks(&[req(1, 0, 0xbb, 5)])
        .await
        .expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Created { .. }));
    assert_eq!(r[0].released, None);
    // Block 1 is removed: the old object is released and its deletion recorded.
    let released = db.remove_blocks(&[(1, 1), (9, 9)]).await.expect("remove");
    assert_eq!(released, vec![obj_id]);
    assert_eq!(db.pending_deletions().await.expect("pending"), vec![obj_id]);
    assert!(db.object(obj_id).await.expect("object").is_none());
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
    let r = db.commit_blocks(&[req(1, 0, 1, 3)]).await.expect("commit");
    let first = r[0].outcome.obj_id();
    db.fail_upload(first).await.expect("fail");
    let object = db.object(first).await.expect("object").expect("exists");
    assert_eq!((object.hash, object.state), (None, ObjectState::Failed));
    // Another block with the same content gets its own object.
    let r = db.commit_blocks(&[req(2, 0, 1, 3)]).await.expect("commit");
    assert!(matches!(r[0].outcome, Outcome::Created { obj_id } if obj_id != first));
    // Recommitting the first block moves it to the new object and releases the failed one.
    let r = db.commit_blocks(&[req(1, 0, 1, 3)]).await.expect("commit");
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
            db.commit_blocks(&[req(inode, 0, 7, 100)])
                .await
                .expect("commit")
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
    db.commit_blocks(&[
        req(5, 1, 1, 1),
        req(5, 3, 2, 1),
        req(5, 9, 3, 1),
        req(6, 2, 4, 1),
    ])
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
