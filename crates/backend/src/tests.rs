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
        deadline: Duration::from_secs(30),
        probe_interval: Duration::ZERO,
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
            deadline: Duration::from_secs(3600),
            probe_interval: Duration::ZERO,
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
    // Another file is never linked over the object: the caller's create-only upload then
    // compares the bytes, and other bytes are a collision that leaves the object whole.
    let other = dir.path().join("other");
    std::fs::write(&other, b"second").expect("write");
    assert_eq!(backend.link_object(300, &other), None);
    assert!(matches!(
        backend.put(300, Bytes::from_static(b"second")).await,
        Err(Error::Collision { .. })
    ));
    assert_eq!(
        backend
            .put(300, Bytes::from_static(b"linked bytes"))
            .await
            .expect("the same bytes"),
        12
    );
    assert_eq!(
        backend.get(300).await.expect("get"),
        Bytes::from_static(b"linked bytes")
    );
    assert_eq!(backend.list_ids().await.expect("list"), vec![300]);
    assert_eq!(std::fs::metadata(&block).expect("block").nlink(), 2);
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
async fn only_local_stores_with_plain_objects_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let block = dir.path().join("block");
    std::fs::write(&block, b"abc").expect("write");
    let memory = Backend::from_url("memory://").expect("memory");
    assert!(!memory.can_link());
    assert_eq!(memory.link_object(1, &block), None);
    let encoded = Backend::from_url(&format!("file://{}", dir.path().join("store").display()))
        .expect("open")
        .with_format(crate::StoreFormat {
            codec: crate::format::ObjectCodec::new(
                [7; 16],
                crate::format::Compression::default(),
                None,
            ),
            plain: false,
            plain_below: 0,
            max_block: 1 << 20,
        });
    assert!(!encoded.can_link());
    assert_eq!(encoded.link_object(1, &block), None);
    assert!(!dir.path().join("store/data/01/1").exists());
}

#[tokio::test]
async fn a_store_without_links_copies_plain_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let block = dir.path().join("block");
    std::fs::write(&block, b"abc").expect("write");
    let url = format!("file://{}", dir.path().join("store").display());
    let linking = Backend::from_url(&url).expect("open");
    let copying = Backend::from_url(&url).expect("open").without_links();
    assert!(!copying.can_link());
    assert_eq!(copying.link_object(1, &block), None);
    assert!(
        !copying
            .link_out(1, &dir.path().join("out"))
            .expect("link_out")
    );
    assert!(linking.can_link(), "other backends on the store still link");
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

/// A backend over a faulty in-memory store with `policy`.
fn faulty_with(policy: RetryPolicy) -> (Backend, crate::faulty::Faults) {
    let (store, faults) = FaultyStore::new(Arc::new(InMemory::new()));
    (
        Backend::new(store, Path::from("vol")).with_retry(policy),
        faults,
    )
}

#[tokio::test(start_paused = true)]
async fn a_store_that_never_answers_fails_at_the_deadline() {
    let (backend, faults) = faulty_with(RetryPolicy {
        deadline: Duration::from_secs(2),
        ..fast_retry(100)
    });
    faults.hold(Op::Put);
    let started = tokio::time::Instant::now();
    let err = backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect_err("no answer");
    assert!(matches!(err, Error::TimedOut { attempts: 1, .. }), "{err}");
    assert!(err.is_transient());
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(!backend.is_up());
    assert!(
        backend
            .down_cause()
            .is_some_and(|c| c.contains("did not succeed within 2.0s")),
        "{:?}",
        backend.down_cause()
    );
    // Retries of a failing store stop at the deadline too, with the last failure as cause.
    faults.release(Op::Put);
    faults.latency(Op::Put, Duration::from_millis(700));
    faults.fail_first(Op::Put, u64::MAX);
    let started = tokio::time::Instant::now();
    let err = backend
        .put(2, Bytes::from_static(b"x"))
        .await
        .expect_err("keeps failing");
    assert!(started.elapsed() <= Duration::from_secs(2), "{err}");
    assert!(
        crate::chain(&err).contains("injected Put failure"),
        "{}",
        crate::chain(&err)
    );
}

#[tokio::test(start_paused = true)]
async fn a_down_store_fails_fast_until_a_retry_is_due() {
    let (backend, faults) = faulty_with(RetryPolicy {
        probe_interval: Duration::from_secs(10),
        ..fast_retry(2)
    });
    assert!(backend.is_up() && backend.is_available());
    faults.fail_first(Op::Put, u64::MAX);
    backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect_err("down");
    assert_eq!(faults.calls(Op::Put), 2);
    assert!(!backend.is_up() && !backend.is_available());
    // Not tried: the error says since when and why.
    let err = backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect_err("fails fast");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("injected Put failure"), "{err}");
    assert_eq!(faults.calls(Op::Put), 2);
    // Reads fail fast as well.
    assert!(matches!(
        backend.get(1).await,
        Err(Error::Unavailable { .. })
    ));
    // Once the retry is due, operations try the store again.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(backend.is_available());
    faults.reset();
    backend
        .put(1, Bytes::from_static(b"x"))
        .await
        .expect("the store is back");
    assert!(backend.is_up() && backend.down_cause().is_none());
    // A refusal is an answer: the store is up again after it.
    faults.fail_first(Op::Put, 2);
    backend
        .put(2, Bytes::from_static(b"x"))
        .await
        .expect_err("down again");
    assert!(!backend.is_up());
    backend.retry_now();
    assert!(backend.is_available());
    assert!(matches!(backend.get(5).await, Err(Error::NotFound { .. })));
    assert!(backend.is_up());
}

#[tokio::test]
async fn the_probe_takes_not_found_as_an_answer() {
    let (backend, faults) = faulty_with(fast_retry(2));
    backend.probe().await.expect("no marker, but an answer");
    faults.every_key(true);
    faults.fail_first(Op::Get, 2);
    backend.probe().await.expect_err("no answer");
    assert!(!backend.is_up());
    backend.probe().await.expect("an answer again");
    assert!(backend.is_up());
    // Local stores need no start-up check.
    backend.check().await.expect("nothing to check");
}

#[test]
fn http_failures_are_transient_unless_the_request_could_not_be_made() {
    use object_store::client::{HttpError, HttpErrorKind};
    let with_kind = |kind| Error::Store {
        op: "upload",
        key: "k".into(),
        source: object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(kind, std::io::Error::other("cause"))),
        },
    };
    for kind in [
        HttpErrorKind::Connect,
        HttpErrorKind::Request,
        HttpErrorKind::Timeout,
        HttpErrorKind::Interrupted,
    ] {
        assert!(with_kind(kind).is_transient(), "{kind:?}");
    }
    for kind in [HttpErrorKind::Decode, HttpErrorKind::Unknown] {
        assert!(!with_kind(kind).is_transient(), "{kind:?}");
    }
    assert!(crate::check::is_connect_failure(&with_kind(
        HttpErrorKind::Connect
    )));
    assert!(!crate::check::is_connect_failure(&with_kind(
        HttpErrorKind::Timeout
    )));
    // Errors without a transport failure (server errors, throttling) are retried.
    let generic = Error::Store {
        op: "upload",
        key: "k".into(),
        source: object_store::Error::Generic {
            store: "S3",
            source: "503 Slow Down".into(),
        },
    };
    assert!(generic.is_transient());
}

#[test]
fn messages_about_a_store_never_show_credentials_of_its_url() {
    let url = url::Url::parse("s3://keyid:supersecret@bucket/prefix").expect("url");
    let shown = crate::check::without_credentials(&url);
    assert_eq!(shown, "s3://bucket/prefix");
}

#[test]
fn s3_settings_that_cannot_work_are_refused_before_any_request() {
    use object_store::aws::AmazonS3Builder;
    let url = "s3://bucket/prefix";
    let keys = |b: AmazonS3Builder| {
        b.with_access_key_id("id")
            .with_secret_access_key("secret")
            .with_bucket_name("bucket")
    };
    let http = keys(AmazonS3Builder::new()).with_endpoint("http://127.0.0.1:9");
    let err = crate::check::check_s3_settings(url, &http, false).expect_err("plain http");
    assert!(
        matches!(err, crate::Unusable::HttpNotAllowed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("AWS_ALLOW_HTTP=true"), "{err}");
    let allowed = http.with_allow_http(true);
    assert!(crate::check::check_s3_settings(url, &allowed, false).is_ok());
    // No credentials: the instance metadata is the last resort, unless disabled.
    let none = AmazonS3Builder::new().with_bucket_name("bucket");
    assert_eq!(
        crate::check::check_s3_settings(url, &none, false)
            .expect("metadata")
            .1,
        crate::check::S3Credentials::InstanceMetadata
    );
    let err = crate::check::check_s3_settings(url, &none, true).expect_err("no credentials");
    assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    let unsigned = none.with_skip_signature(true);
    assert_eq!(
        crate::check::check_s3_settings(url, &unsigned, true)
            .expect("unsigned")
            .1,
        crate::check::S3Credentials::Configured
    );
}

/// Review: a renewal in flight when the lease is released at shutdown overwrites the
/// released record, so the next writer is refused for the time to live.
#[tokio::test]
async fn a_release_racing_a_renewal_leaves_the_lease_released() {
    use crate::lease::{Holder, LeaseRequest};
    let (backend, faults) = faulty();
    faults.every_key(true);
    let holder = |dir: &str| Holder {
        host: "h".to_owned(),
        pid: 1,
        data_dir: dir.to_owned(),
        boot_id: "boot".to_owned(),
        db_file: Some((1, u64::from(dir.as_bytes()[1]))),
    };
    let lease = backend
        .acquire_lease(LeaseRequest {
            holder: holder("/a"),
            ttl: Duration::from_secs(30),
            force: false,
            last_epoch: None,
        })
        .await
        .expect("acquire");
    // A renewal (as `keep` runs it) lists the lease first: hold it there.
    faults.hold(Op::List);
    let (l, b) = (lease.clone(), backend.clone());
    let renewal = tokio::spawn(async move { l.renew(&b).await });
    faults.wait_held(Op::List, 1).await;
    // Shutdown releases the lease meanwhile (its PUT is not held).
    let (l, b) = (lease.clone(), backend.clone());
    let release = tokio::spawn(async move { l.release(&b).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults.release(Op::List);
    let _ = renewal.await.expect("join");
    release.await.expect("join");
    // A clean shutdown: the next writer should take the lease at once.
    let next = backend
        .acquire_lease(LeaseRequest {
            holder: holder("/b"),
            ttl: Duration::from_secs(30),
            force: false,
            last_epoch: None,
        })
        .await;
    assert!(
        next.is_ok(),
        "refused after a clean release: {}",
        next.err().map(|e| e.to_string()).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_garbled_lease_is_refused_not_trusted() {
    use crate::lease::{Holder, LeaseRequest};
    use object_store::ObjectStoreExt;
    let (backend, _faults) = faulty();
    let request = LeaseRequest {
        holder: Holder {
            host: "h".to_owned(),
            pid: 1,
            data_dir: "/a".to_owned(),
            boot_id: "boot".to_owned(),
            db_file: Some((1, 1)),
        },
        ttl: Duration::from_secs(30),
        force: true,
        last_epoch: None,
    };
    // A lease object whose epoch is too large for object ids to carry it.
    let key = Path::from("vol/lease/00000000001073741824");
    backend
        .store
        .put(
            &key,
            object_store::PutPayload::from(
                br#"{"epoch":1073741824,"holder":{"host":"x","pid":2,"data_dir":"/x"},"since":"s","ttl_ms":1}"#
                    .to_vec(),
            ),
        )
        .await
        .expect("plant");
    match backend.acquire_lease(request).await {
        Err(Error::BadRecord { key, reason }) => {
            assert!(
                key.ends_with("00000000001073741824") && reason.contains("epoch"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_operation_still_retrying_says_why_before_the_store_counts_as_down() {
    let (backend, faults) = faulty_with(fast_retry(1000));
    faults.fail_first(Op::Put, 3);
    let put = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.put(1, Bytes::from_static(b"x")).await })
    };
    // Its first attempts failed; it retries, and the store still counts as up.
    while faults.calls(Op::Put) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(backend.is_up() && backend.down_cause().is_none());
    let cause = backend.failing_cause().expect("a cause while retrying");
    assert!(cause.contains("injected Put failure"), "{cause}");
    // Once the store answers, nothing is failing any more.
    put.await.expect("task").expect("put");
    assert_eq!(backend.failing_cause(), None);
}
