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

#[tokio::test]
async fn link_object_stores_a_file_without_copying_it() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let backend = Backend::from_url(&format!("file://{}", root.display())).expect("open");
    assert!(backend.can_link());
    let block = dir.path().join("block");
    std::fs::write(&block, b"linked bytes").expect("write");
    // The shard directory does not exist yet: it is created.
    assert_eq!(backend.link_object(300, &block), Some(12));
    let object = root.join("data/2c/300");
    assert_eq!(
        std::fs::metadata(&object).expect("object").ino(),
        std::fs::metadata(&block).expect("block").ino()
    );
    assert_eq!(
        backend.get(300).await.expect("get"),
        Bytes::from_static(b"linked bytes")
    );
    // Linking the same file again leaves one name in the store, not a staging name too.
    assert_eq!(backend.link_object(300, &block), Some(12));
    assert_eq!(
        std::fs::read_dir(root.join("data/2c"))
            .expect("shard")
            .count(),
        1
    );
    assert_eq!(std::fs::metadata(&block).expect("block").nlink(), 2);
    // Linking again (a retried upload) replaces the object whole; no staging names remain
    // and listings see the object once.
    let other = dir.path().join("other");
    std::fs::write(&other, b"second").expect("write");
    assert_eq!(backend.link_object(300, &other), Some(6));
    assert_eq!(
        backend.get(300).await.expect("get"),
        Bytes::from_static(b"second")
    );
    assert_eq!(
        std::fs::read_dir(root.join("data/2c"))
            .expect("shard")
            .count(),
        1
    );
    assert_eq!(backend.list_ids().await.expect("list"), vec![300]);
    assert_eq!(std::fs::metadata(&block).expect("block").nlink(), 1);
    backend.sync_object(300).await.expect("sync");
    backend.sync_object_dirs(&[300]).await.expect("sync dirs");
    // A missing source is no object, and the store may still link later.
    assert_eq!(backend.link_object(301, &dir.path().join("missing")), None);
    assert!(backend.can_link());
    assert!(matches!(
        backend.get(301).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn only_local_stores_with_the_identity_codec_link() {
    #[derive(Debug)]
    struct Reverse;
    impl crate::Codec for Reverse {
        fn encode(&self, block: Bytes) -> crate::Result<Bytes> {
            Ok(block.iter().rev().copied().collect::<Vec<u8>>().into())
        }
        fn decode(&self, _key: &str, stored: Bytes) -> crate::Result<Bytes> {
            self.encode(stored)
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let block = dir.path().join("block");
    std::fs::write(&block, b"abc").expect("write");
    let memory = Backend::from_url("memory://").expect("memory");
    assert!(!memory.can_link());
    assert_eq!(memory.link_object(1, &block), None);
    let encoded = Backend::from_url(&format!("file://{}", dir.path().join("store").display()))
        .expect("open")
        .with_codec(Arc::new(Reverse));
    assert!(!encoded.can_link());
    assert_eq!(encoded.link_object(1, &block), None);
    assert!(!dir.path().join("store/data/01/1").exists());
}

#[tokio::test]
async fn a_store_on_another_file_system_stops_linking() {
    let store = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    let dir = tempfile::tempdir().expect("tempdir");
    let block = dir.path().join("block");
    std::fs::write(&block, b"abc").expect("write");
    let backend = Backend::from_url(&format!("file://{}", store.path().display())).expect("open");
    assert!(backend.can_link());
    assert_eq!(backend.link_object(1, &block), None, "EXDEV");
    assert!(!backend.can_link(), "no further attempts");
    assert!(std::fs::read_dir(store.path().join("data/01")).is_ok_and(|mut d| d.next().is_none()));
}
