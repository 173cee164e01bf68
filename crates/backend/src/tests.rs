//! Unit tests of the backend: URLs, round trips, retries, bulk delete and injected faults.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;

use crate::faulty::{FaultyStore, Op};
use crate::{Backend, Error, RetryPolicy};

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        warn_after: 1,
    }
}

fn faulty() -> (Backend, crate::faulty::Faults) {
    let (store, faults) = FaultyStore::new(Arc::new(InMemory::new()));
    (
        Backend::new(store, Path::from("vol")).with_retry(fast_retry(4)),
        faults,
    )
}

#[tokio::test]
async fn file_url_round_trip_creates_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("nested/store");
    let url = format!("file://{}", root.display());
    let backend = Backend::from_url(&url).expect("open file store");
    assert!(root.is_dir());
    let size = backend
        .put(7, Bytes::from_static(b"hello"))
        .await
        .expect("put");
    assert_eq!(size, 5);
    // The object sits under its shard directory and can be made durable.
    assert!(root.join("data/07/7").is_file());
    backend.make_durable().await.expect("syncfs of the store");
    assert!(
        Backend::from_url("memory://")
            .expect("memory")
            .make_durable()
            .await
            .is_ok()
    );
    assert_eq!(
        backend.get(7).await.expect("get"),
        Bytes::from_static(b"hello")
    );
    assert_eq!(backend.list_ids().await.expect("list"), vec![7]);
    assert_eq!(backend.stored_bytes().await.expect("bytes"), 5);
    backend
        .delete_many(&[7, 8])
        .await
        .expect("delete, 8 never existed");
    assert!(backend.list_ids().await.expect("list").is_empty());
}

#[tokio::test]
async fn objects_of_a_file_store_are_synced_one_by_one_with_their_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let backend = Backend::from_url(&format!("file://{}", root.display())).expect("open");
    assert!(backend.is_local());
    for id in [1u64, 257, 2] {
        backend
            .put(id, Bytes::from(vec![1u8; 10]))
            .await
            .expect("put");
        backend
            .sync_object(id)
            .await
            .expect("fsync of the object file");
    }
    backend
        .sync_object_dirs(&[1, 257, 2])
        .await
        .expect("fsync of the shard directories and their parents");
    // An object that is not there cannot be made durable: the error says so.
    let err = backend.sync_object(3).await.expect_err("missing object");
    assert!(matches!(err, Error::NotDurable { .. }), "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("durable"), "{err}");
    // Other stores are durable once a PUT returns: nothing to do.
    let memory = Backend::from_url("memory://").expect("memory");
    assert!(!memory.is_local());
    memory.sync_object(3).await.expect("no-op");
    memory.sync_object_dirs(&[3]).await.expect("no-op");
}

#[test]
fn bad_urls_are_named() {
    for url in ["ftp://x/y", "not a url", "file://relative"] {
        let err = Backend::from_url(url).expect_err(url);
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
        assert!(
            err.to_string()
                .contains(url.split(' ').next().unwrap_or(url)),
            "{err}"
        );
    }
    assert!(Backend::from_url("memory://").is_ok());
}

#[tokio::test]
async fn missing_object_is_not_found_and_not_retried() {
    let (backend, faults) = faulty();
    let err = backend.get(1).await.expect_err("missing");
    assert!(
        matches!(err, Error::NotFound { ref key } if key == "vol/data/01/1"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(faults.calls(Op::Get), 1);
}

#[tokio::test]
async fn transient_failures_are_retried_until_success() {
    let (backend, faults) = faulty();
    faults.fail_first(Op::Put, 3);
    backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect("4th attempt succeeds");
    assert_eq!(faults.calls(Op::Put), 4);
    faults.fail_first(Op::Get, 3);
    assert_eq!(backend.get(1).await.expect("get"), Bytes::from_static(b"x"));
    assert_eq!(faults.calls(Op::Get), 4);
}

#[tokio::test]
async fn persistent_failures_give_up_after_the_policy() {
    let (backend, faults) = faulty();
    faults.fail_first(Op::Put, 100);
    let err = backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect_err("gives up");
    assert!(err.is_transient(), "{err}");
    assert_eq!(faults.calls(Op::Put), 4);
}

#[tokio::test]
async fn permanent_failures_are_not_retried() {
    let (backend, faults) = faulty();
    faults.permanent(Op::Put, true);
    faults.fail_first(Op::Put, 1);
    let err = backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect_err("permanent");
    assert!(!err.is_transient());
    assert_eq!(faults.calls(Op::Put), 1);
}

#[tokio::test]
async fn bulk_delete_retries_only_failed_keys() {
    let (backend, faults) = faulty();
    for id in 1..=5 {
        backend
            .put(id, Bytes::from_static(b"x"))
            .await
            .expect("put");
    }
    faults.fail_first(Op::Delete, 2);
    backend.delete_many(&[1, 2, 3, 4, 5]).await.expect("delete");
    assert!(backend.list_ids().await.expect("list").is_empty());
    // Five deletes, two of which failed and were tried once more.
    assert_eq!(faults.calls(Op::Delete), 7);
}

#[tokio::test]
async fn corrupted_reads_change_the_bytes() {
    let (backend, faults) = faulty();
    backend
        .put(1, Bytes::from_static(b"abc"))
        .await
        .expect("put");
    faults.corrupt_reads(true);
    assert_ne!(
        backend.get(1).await.expect("get"),
        Bytes::from_static(b"abc")
    );
    faults.reset();
    assert_eq!(
        backend.get(1).await.expect("get"),
        Bytes::from_static(b"abc")
    );
}

#[tokio::test]
async fn cancellation_stops_retries() {
    let (store, faults) = FaultyStore::new(Arc::new(InMemory::new()));
    let cancel = tokio_util::sync::CancellationToken::new();
    let backend = Backend::new(store, Path::default())
        .with_retry(RetryPolicy {
            max_attempts: 1000,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            warn_after: 1,
        })
        .with_cancel(cancel.clone());
    faults.fail_first(Op::Put, u64::MAX);
    let task = tokio::spawn(async move { backend.put(1, Bytes::from_static(b"x")).await });
    cancel.cancel();
    let err = task.await.expect("join").expect_err("cancelled");
    assert!(err.is_cancelled(), "{err}");
}

#[tokio::test]
async fn held_calls_wait_for_release() {
    let (backend, faults) = faulty();
    faults.hold(Op::Put);
    let b = backend.clone();
    let task = tokio::spawn(async move { b.put(1, Bytes::from_static(b"x")).await });
    faults.wait_held(Op::Put, 1).await;
    assert!(backend.list_ids().await.expect("list").is_empty());
    faults.release(Op::Put);
    task.await.expect("join").expect("put");
    assert_eq!(backend.list_ids().await.expect("list"), vec![1]);
}
