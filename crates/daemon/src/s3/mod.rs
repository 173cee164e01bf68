//! The S3 endpoint: the S3 REST API over the same files as the file API, through the `s3s`
//! crate (request parsing, SigV4 in headers and presigned URLs, aws-chunked bodies and their
//! trailers, XML answers and errors). Bucket `b` and key `k` are the file `b/k`; bucket `b`
//! exists while the file `.s3-buckets/b` does (so buckets ship to the store and restore
//! with the files). An object's ETag (the MD5 of its bytes), content type and user metadata
//! are the file's attributes; a file written through the file API, or patched, has none,
//! and its ETag is the file API's.
//!
//! Handlers translate to [`blockcache::Namespace`] calls, as the file API's do: a PUT
//! streams its body into a [`blockcache::FileWriter`] (one block in memory), checks the
//! digests the client sent, and names the file only if they match, so a failed or cut-off
//! PUT leaves the old object as it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use blockcache::{Durability, Error, FileMeta, FileReader};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use serde::{Deserialize, Serialize};

use crate::server::{AppState, NoBuffer};

mod multipart;

/// Aborts the multipart uploads older than `expiry` now and then (at once, then every
/// eighth of `expiry`, at least every hour), until the daemon drains or the task is
/// aborted.
pub fn spawn_expiry(
    state: Arc<AppState>,
    expiry: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let gateway = Gateway::new(state);
    let every = (expiry / 8).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if gateway
                .state
                .draining
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return;
            }
            if let Err(e) = gateway.expire_uploads(expiry).await {
                tracing::warn!(code = %e.code().as_str(), error = e.message().unwrap_or_default(), "expiring multipart uploads failed; the next round retries");
            }
        }
    })
}

/// The prefix of the files that say which buckets exist.
pub const BUCKETS: &str = ".s3-buckets/";

/// The header a request may send to choose its durability (none, local, store).
pub const DURABILITY_HEADER: &str = "x-blockcache-durability";

/// Most keys a listing page holds (S3's limit).
const MAX_KEYS: i32 = 1000;

/// Rows read from the database per step of a listing.
const LIST_STEP: u32 = 1000;

/// Blocks a GetObject reads ahead of the one being sent (the file API's GET reads as many).
const READ_AHEAD: usize = 4;

/// Chunks of a request body waiting for its digest thread.
const DIGEST_QUEUE: usize = 2;

/// Most keys one DeleteObjects request names (S3's limit).
const MAX_DELETE: usize = 1000;

/// The S3 attributes kept with a file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ObjectAttrs {
    /// The ETag without quotes: the MD5 of the bytes in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    meta: BTreeMap<String, String>,
    /// For an object of a multipart upload: the number of its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parts: Option<u32>,
    /// And their size, when all but the last have one size (the last no larger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part_size: Option<u64>,
}

impl ObjectAttrs {
    fn of(meta: &FileMeta) -> Self {
        meta.attrs
            .as_deref()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default()
    }

    /// The ETag: the stored MD5, or the file API's tag for a file that has none.
    fn etag(&self, meta: &FileMeta) -> ETag {
        match &self.etag {
            Some(e) => ETag::Strong(e.clone()),
            None => ETag::Strong(meta.etag().trim_matches('"').to_owned()),
        }
    }

    fn metadata(&self) -> Option<Metadata> {
        (!self.meta.is_empty()).then(|| {
            self.meta
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }
}

/// The S3 API over the daemon's files.
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    /// A gateway over the files of `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn bucket_exists(&self, bucket: &str) -> S3Result<FileMeta> {
        if !valid_bucket(bucket) {
            return Err(s3_error!(NoSuchBucket, "no bucket named {bucket:?}"));
        }
        match self.state.ns.stat(&format!("{BUCKETS}{bucket}")).await {
            Ok(m) => Ok(m),
            Err(Error::NotFound { .. }) => {
                Err(s3_error!(NoSuchBucket, "no bucket named {bucket:?}"))
            }
            Err(e) => Err(internal(e)),
        }
    }

    async fn stat_object(&self, bucket: &str, key: &str) -> S3Result<FileMeta> {
        let name = object_name(bucket, key)?;
        match self.state.ns.stat(&name).await {
            Ok(m) => Ok(m),
            Err(Error::NotFound { .. }) => {
                self.bucket_exists(bucket).await?;
                Err(s3_error!(
                    NoSuchKey,
                    "no object {key:?} in bucket {bucket:?}"
                ))
            }
            Err(e) => Err(object_error(e, bucket, key)),
        }
    }

    async fn open_object(&self, bucket: &str, key: &str) -> S3Result<FileReader> {
        let name = object_name(bucket, key)?;
        match self.state.ns.open_read(&name).await {
            Ok(r) => Ok(r),
            Err(Error::NotFound { .. }) => {
                self.bucket_exists(bucket).await?;
                Err(s3_error!(
                    NoSuchKey,
                    "no object {key:?} in bucket {bucket:?}"
                ))
            }
            Err(e) => Err(object_error(e, bucket, key)),
        }
    }

    /// The source of a CopyObject or UploadPartCopy, opened (so the version read is the one
    /// checked), if its `x-amz-copy-source-if-match` / `-if-none-match` conditions hold.
    async fn open_copy_source(
        &self,
        source: &CopySource,
        if_match: Option<&ETagCondition>,
        if_none_match: Option<&ETagCondition>,
    ) -> S3Result<FileReader> {
        let CopySource::Bucket { bucket, key, .. } = source else {
            return Err(s3_error!(
                NotImplemented,
                "copies from access points or outposts are not supported"
            ));
        };
        let reader = self.open_object(bucket, key).await?;
        let meta = reader.meta();
        let etag = ObjectAttrs::of(meta).etag(meta);
        if if_match.is_some_and(|c| !etag_matches(c, &etag)) {
            return Err(s3_error!(
                PreconditionFailed,
                "x-amz-copy-source-if-match: the ETag differs"
            ));
        }
        if if_none_match.is_some_and(|c| etag_matches(c, &etag)) {
            return Err(s3_error!(
                PreconditionFailed,
                "x-amz-copy-source-if-none-match: the ETag matches"
            ));
        }
        Ok(reader)
    }

    /// `n` block buffers of the daemon's request memory, as the file API takes them.
    async fn buffers(&self, n: u32) -> S3Result<tokio::sync::OwnedSemaphorePermit> {
        crate::server::take_buffers(&self.state, n)
            .await
            .map_err(|e| match e {
                NoBuffer::ShuttingDown => {
                    s3_error!(ServiceUnavailable, "the daemon is shutting down")
                }
                NoBuffer::Busy => s3_error!(
                    SlowDown,
                    "no request buffer came free within --buffer-timeout; retry later"
                ),
            })
    }

    /// What a PutObject must pass before its body is read: the bucket, the key, the size
    /// announced, and the conditions on the current object.
    async fn put_checks(&self, input: &PutObjectInput) -> S3Result<()> {
        self.bucket_exists(&input.bucket).await?;
        let name = object_name(&input.bucket, &input.key)?;
        let max = self.state.ns.max_file_size();
        if let Some(len) = input.content_length
            && u64::try_from(len).unwrap_or(0) > max
        {
            return Err(s3_error!(
                EntityTooLarge,
                "{len} bytes: the largest object is --max-file-size ({max} bytes)"
            ));
        }
        if input.if_none_match.is_none() && input.if_match.is_none() {
            return Ok(());
        }
        let current = match self.state.ns.stat(&name).await {
            Ok(m) => Some(m),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(object_error(e, &input.bucket, &input.key)),
        };
        let hit = |c: &ETagCondition| {
            current
                .as_ref()
                .is_some_and(|m| etag_matches(c, &ObjectAttrs::of(m).etag(m)))
        };
        if input.if_none_match.as_ref().is_some_and(hit) {
            return Err(s3_error!(
                PreconditionFailed,
                "If-None-Match: the object exists"
            ));
        }
        if input.if_match.as_ref().is_some_and(|c| !hit(c)) {
            return Err(s3_error!(PreconditionFailed, "If-Match: the ETag differs"));
        }
        Ok(())
    }

    /// Streams `body` into a new version of `name`, checking the digests the client sent;
    /// names it only if they match. Returns the file and its ETag (the one `attrs` has,
    /// else the MD5 of its bytes). With `copy`, the body is files of the daemon read by
    /// [`stream_of`] unmetered: two buffers are taken at once, one for the reads, and a
    /// failed read is the daemon's (`ServiceUnavailable`, or `InvalidPart` for a part that
    /// changed), not a client's incomplete body.
    #[allow(clippy::too_many_arguments)]
    async fn write_object(
        &self,
        name: &str,
        body: StreamingBlob,
        durability: Durability,
        expected_md5: Option<&str>,
        checksums: Checksums,
        trailers: Option<s3s::TrailingHeaders>,
        attrs: ObjectAttrs,
        create_only: bool,
        copy: bool,
    ) -> S3Result<(FileMeta, String)> {
        let max = self.state.ns.max_file_size();
        let _buffer = self.buffers(if copy { 2 } else { 1 }).await?;
        let mut w = self
            .state
            .ns
            .create(name)
            .await
            .map_err(|e| object_error(e, "", name))?;
        if durability != Durability::None {
            w.write_behind();
        }
        crate::server::overlap_if_free(&self.state, &mut w);
        if create_only {
            // The name is checked again when the file is named, in the same transaction.
            w.create_only().map_err(internal)?;
        }
        // The MD5 is the ETag unless the attributes bring one (a multipart object's), and
        // what a Content-MD5 is checked against.
        let md5 = (attrs.etag.is_none() || expected_md5.is_some()).then(Md5::new);
        // The digests are computed by a task of their own, in parallel with the request's
        // (the MD5 alone costs about as much as the rest of a PUT): the chunks are shared,
        // not copied, and at most `DIGEST_QUEUE` wait for it. A task of the runtime, not of
        // its blocking pool: a blocking thread per request could take every thread of the
        // pool, which the engine's file I/O needs for the request to go on.
        let (digest_tx, mut digest_rx) = tokio::sync::mpsc::channel::<Bytes>(DIGEST_QUEUE);
        let mut hasher = checksums.hasher();
        let digests = tokio::spawn(async move {
            let mut md5 = md5;
            while let Some(chunk) = digest_rx.recv().await {
                if let Some(m) = md5.as_mut() {
                    m.update(&chunk);
                }
                hasher.update(&chunk);
            }
            (md5, hasher)
        });
        let mut body = body;
        let poured: S3Result<()> = async {
            let mut written = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    if !copy {
                        return s3_error!(IncompleteBody, "reading the request body failed: {e}");
                    }
                    let source = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
                    if source == Some(std::io::ErrorKind::InvalidData) {
                        s3_error!(InvalidPart, "{e}")
                    } else {
                        s3_error!(ServiceUnavailable, "reading the source failed: {e}; retry")
                    }
                })?;
                written += chunk.len() as u64;
                if written > max {
                    return Err(s3_error!(
                        EntityTooLarge,
                        "the object is larger than --max-file-size ({max} bytes)"
                    ));
                }
                // The digest thread only ends when the sender goes.
                let _ = digest_tx.send(chunk.clone()).await;
                w.write(&chunk)
                    .await
                    .map_err(|e| object_error(e, "", name))?;
            }
            Ok(())
        }
        .await;
        drop(digest_tx);
        if let Err(e) = poured {
            w.abandon().await;
            return Err(e);
        }
        let Ok((md5, hasher)) = digests.await else {
            w.abandon().await;
            return Err(s3_error!(ServiceUnavailable, "the daemon is shutting down"));
        };
        let md5 = md5.map(Md5::finalize);
        let checked = check_digests(md5.as_deref(), expected_md5, checksums, hasher, trailers);
        if let Err(e) = checked {
            w.abandon().await;
            return Err(e);
        }
        // A multipart object comes with its ETag; any other's is the MD5 of its bytes.
        let etag = match (&attrs.etag, md5) {
            (Some(e), _) => e.clone(),
            (None, Some(m)) => hex::encode(m),
            (None, None) => unreachable!("the MD5 is computed when no ETag is given"),
        };
        let attrs = ObjectAttrs {
            etag: Some(etag.clone()),
            ..attrs
        };
        let text = serde_json::to_string(&attrs).expect("attributes serialize");
        if let Err(e) = w.set_attrs(Some(text)) {
            w.abandon().await;
            return Err(s3_error!(
                MetadataTooLarge,
                "the object's metadata is too large: {e}"
            ));
        }
        let meta = w
            .finish(durability)
            .await
            .map_err(|e| object_error(e, "", name))?;
        Ok((meta, etag))
    }
}

/// The checksums a client asked for (`x-amz-checksum-*` values, or an algorithm whose value
/// comes in a trailer).
#[derive(Debug, Default, Clone)]
struct Checksums {
    crc32: Option<String>,
    crc32c: Option<String>,
    sha1: Option<String>,
    sha256: Option<String>,
    crc64nvme: Option<String>,
    algorithm: Option<String>,
}

impl Checksums {
    fn hasher(&self) -> s3s::checksum::ChecksumHasher {
        let mut h = s3s::checksum::ChecksumHasher::default();
        let alg = self.algorithm.as_deref().map(str::to_ascii_uppercase);
        let wants =
            |value: &Option<String>, name: &str| value.is_some() || alg.as_deref() == Some(name);
        if wants(&self.crc32, "CRC32") {
            h.crc32 = Some(Default::default());
        }
        if wants(&self.crc32c, "CRC32C") {
            h.crc32c = Some(Default::default());
        }
        if wants(&self.sha1, "SHA1") {
            h.sha1 = Some(Default::default());
        }
        if wants(&self.sha256, "SHA256") {
            h.sha256 = Some(Default::default());
        }
        if wants(&self.crc64nvme, "CRC64NVME") {
            h.crc64nvme = Some(Default::default());
        }
        h
    }
}

/// Checks `Content-MD5` and the `x-amz-checksum-*` values (from headers, or from the
/// trailers of an aws-chunked body) against what the body hashed to.
fn check_digests(
    md5: Option<&[u8]>,
    expected_md5: Option<&str>,
    mut sent: Checksums,
    hasher: s3s::checksum::ChecksumHasher,
    trailers: Option<s3s::TrailingHeaders>,
) -> S3Result<()> {
    if let Some(expected) = expected_md5 {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(expected.trim())
            .map_err(|_| s3_error!(InvalidDigest, "Content-MD5 is not base64"))?;
        if Some(decoded.as_slice()) != md5 {
            return Err(s3_error!(
                BadDigest,
                "the Content-MD5 you sent does not match the bytes received"
            ));
        }
    }
    if let Some(t) = trailers.and_then(|t| t.take()) {
        let get = |name: &str| t.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        sent.crc32 = sent.crc32.or_else(|| get("x-amz-checksum-crc32"));
        sent.crc32c = sent.crc32c.or_else(|| get("x-amz-checksum-crc32c"));
        sent.sha1 = sent.sha1.or_else(|| get("x-amz-checksum-sha1"));
        sent.sha256 = sent.sha256.or_else(|| get("x-amz-checksum-sha256"));
        sent.crc64nvme = sent.crc64nvme.or_else(|| get("x-amz-checksum-crc64nvme"));
    }
    let got = hasher.finalize();
    let pairs = [
        ("CRC32", &sent.crc32, &got.checksum_crc32),
        ("CRC32C", &sent.crc32c, &got.checksum_crc32c),
        ("SHA1", &sent.sha1, &got.checksum_sha1),
        ("SHA256", &sent.sha256, &got.checksum_sha256),
        ("CRC64NVME", &sent.crc64nvme, &got.checksum_crc64nvme),
    ];
    for (name, sent, got) in pairs {
        if let Some(sent) = sent
            && Some(sent) != got.as_ref()
        {
            return Err(s3_error!(
                BadDigest,
                "the {name} checksum you sent ({sent}) does not match the bytes received ({})",
                got.as_deref().unwrap_or("none")
            ));
        }
    }
    Ok(())
}

/// Whether `name` follows S3's bucket naming rules (3 to 63 lowercase letters, digits,
/// dots and hyphens, starting and ending with a letter or digit).
fn valid_bucket(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
}

/// The file of object `key` in `bucket`.
fn object_name(bucket: &str, key: &str) -> S3Result<String> {
    if !valid_bucket(bucket) {
        return Err(s3_error!(NoSuchBucket, "no bucket named {bucket:?}"));
    }
    let name = format!("{bucket}/{key}");
    blockcache::validate_name(&name).map_err(|e| {
        s3_error!(
            InvalidArgument,
            "the key {key:?} cannot be stored: {e} (keys with empty, '.' or '..' segments, a trailing '/', or control characters are not supported)"
        )
    })?;
    Ok(name)
}

fn internal(e: Error) -> S3Error {
    let message = crate::error::chain(&e);
    tracing::error!(error = %message, "S3 request failed");
    S3Error::with_message(S3ErrorCode::InternalError, message)
}

/// An engine error of a request on an object, in S3's terms.
fn object_error(e: Error, bucket: &str, key: &str) -> S3Error {
    match &e {
        Error::NotFound { .. } => s3_error!(NoSuchKey, "no object {key:?} in bucket {bucket:?}"),
        Error::Exists { .. } => s3_error!(
            PreconditionFailed,
            "If-None-Match: another request created the object first"
        ),
        Error::InvalidName { .. } => {
            S3Error::with_message(S3ErrorCode::InvalidArgument, crate::error::chain(&e))
        }
        Error::FileTooLarge { .. } => {
            S3Error::with_message(S3ErrorCode::EntityTooLarge, crate::error::chain(&e))
        }
        Error::DirtyBudgetFull { .. } => {
            S3Error::with_message(S3ErrorCode::SlowDown, crate::error::chain(&e))
        }
        Error::ShuttingDown => s3_error!(ServiceUnavailable, "the daemon is shutting down"),
        Error::Upload { .. } | Error::Download { .. } | Error::Store { .. } => {
            let message = crate::error::chain(&e);
            tracing::warn!(error = %message, "S3 request failed on the store");
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, message)
        }
        _ => internal(e),
    }
}

/// The durability a request asks for with [`DURABILITY_HEADER`], or the daemon's.
fn durability_of(headers: &axum::http::HeaderMap, default: Durability) -> S3Result<Durability> {
    match headers.get(DURABILITY_HEADER) {
        None => Ok(default),
        Some(v) => v.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "{DURABILITY_HEADER} must be none, local or store"
            )
        }),
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from(t)
}

/// Whole seconds: HTTP dates carry no more.
fn seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ts_seconds(t: &Timestamp) -> u64 {
    let t: time::OffsetDateTime = t.clone().into();
    u64::try_from(t.unix_timestamp()).unwrap_or(0)
}

/// Whether condition `c` (of `If-Match` and its kind) holds for `etag`.
fn etag_matches(c: &ETagCondition, etag: &ETag) -> bool {
    match c {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == etag.value(),
    }
}

/// The bytes a `Range` header asks of an object of `size` bytes, with the `Content-Range`
/// to answer (none without a range).
fn byte_range(
    range: Option<&Range>,
    size: u64,
) -> S3Result<(std::ops::Range<u64>, Option<String>)> {
    let Some(r) = range else {
        return Ok((0..size, None));
    };
    let range = r.check(size).map_err(|_| {
        s3_error!(
            InvalidRange,
            "the range lies outside the object of {size} bytes"
        )
    })?;
    let content_range = format!(
        "bytes {}-{}/{size}",
        range.start,
        range.end.saturating_sub(1)
    );
    Ok((range, Some(content_range)))
}

/// What a GET or HEAD asks besides the object: conditions, and a range or a part.
struct Asked<'a> {
    if_match: Option<&'a ETagCondition>,
    if_unmodified_since: Option<&'a Timestamp>,
    if_none_match: Option<&'a ETagCondition>,
    if_modified_since: Option<&'a Timestamp>,
    range: Option<&'a Range>,
    part: Option<i32>,
}

/// The answer's head of a GET or HEAD of the object `meta` (the same for both), with the
/// bytes a GET sends; `Err` when a condition fails or the range or part does not exist.
fn object_head(
    meta: &FileMeta,
    asked: Asked<'_>,
) -> S3Result<(HeadObjectOutput, std::ops::Range<u64>)> {
    let attrs = ObjectAttrs::of(meta);
    let etag = attrs.etag(meta);
    preconditions(
        &etag,
        meta.mtime,
        asked.if_match,
        asked.if_unmodified_since,
        asked.if_none_match,
        asked.if_modified_since,
    )?;
    let (range, content_range, parts_count) =
        requested_bytes(&attrs, meta.size, asked.range, asked.part)?;
    let head = HeadObjectOutput {
        parts_count,
        content_length: Some(i64::try_from(range.end - range.start).unwrap_or(i64::MAX)),
        content_range,
        accept_ranges: Some("bytes".to_owned()),
        e_tag: Some(etag),
        last_modified: Some(timestamp(meta.mtime)),
        content_type: attrs.content_type.clone(),
        metadata: attrs.metadata(),
        ..Default::default()
    };
    Ok((head, range))
}

/// The bytes a GET or HEAD asks of an object of `size` bytes (a `Range`, or a part by its
/// number), with the `Content-Range` and, for a part, the object's number of parts.
fn requested_bytes(
    attrs: &ObjectAttrs,
    size: u64,
    range: Option<&Range>,
    part: Option<i32>,
) -> S3Result<(std::ops::Range<u64>, Option<String>, Option<i32>)> {
    let Some(n) = part else {
        let (r, content_range) = byte_range(range, size)?;
        return Ok((r, content_range, None));
    };
    if range.is_some() {
        return Err(s3_error!(
            InvalidRequest,
            "a request asks for a Range or a partNumber, not both"
        ));
    }
    let bad_part =
        |why: String| S3Error::with_message(S3ErrorCode::Custom("InvalidPartNumber".into()), why);
    let count = attrs.parts.unwrap_or(1);
    if n < 1 || n as u32 > count {
        return Err(bad_part(format!(
            "part {n}: the object has {count} part(s)"
        )));
    }
    let r = match (attrs.parts, attrs.part_size) {
        (None, _) => 0..size,
        (Some(_), Some(ps)) => {
            let start = (n as u64 - 1) * ps;
            start.min(size)..(start + ps).min(size)
        }
        (Some(_), None) => {
            return Err(bad_part(
                "the object's parts have different sizes, whose bounds are not kept: read it by Range"
                    .to_owned(),
            ));
        }
    };
    let content_range = attrs
        .parts
        .map(|_| format!("bytes {}-{}/{size}", r.start, r.end.saturating_sub(1)));
    Ok((r, content_range, attrs.parts.map(|c| c as i32)))
}

/// Evaluates the conditional headers of a GET or HEAD (RFC 9110 order): `Err` with
/// `PreconditionFailed` or `NotModified` when the object is not to be sent.
fn preconditions(
    etag: &ETag,
    modified: SystemTime,
    if_match: Option<&ETagCondition>,
    if_unmodified_since: Option<&Timestamp>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
) -> S3Result<()> {
    let matches = |c: &ETagCondition| etag_matches(c, etag);
    if let Some(c) = if_match {
        if !matches(c) {
            return Err(s3_error!(PreconditionFailed, "If-Match: the ETag differs"));
        }
    } else if let Some(t) = if_unmodified_since
        && seconds(modified) > ts_seconds(t)
    {
        return Err(s3_error!(
            PreconditionFailed,
            "If-Unmodified-Since: the object changed since"
        ));
    }
    if let Some(c) = if_none_match {
        if matches(c) {
            return Err(S3Error::new(S3ErrorCode::NotModified));
        }
    } else if let Some(t) = if_modified_since
        && seconds(modified) <= ts_seconds(t)
    {
        return Err(S3Error::new(S3ErrorCode::NotModified));
    }
    Ok(())
}

/// The bytes `range` of the file `reader` reads, one block at a time. `metered` (a GET):
/// up to [`READ_AHEAD`] blocks are read ahead, each holding a buffer of the request memory
/// from its read until it is handed on, taken in piece order (as the file API's GET does).
/// Otherwise (a copy, see [`Gateway::write_object`]) one block at a time, under the buffer
/// the caller holds for the reads.
fn stream_of(
    reader: FileReader,
    range: std::ops::Range<u64>,
    state: Arc<AppState>,
    metered: bool,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
    let block = reader.block_size().max(1);
    let reader = Arc::new(reader);
    let end = range.end;
    // Block-aligned pieces, generated as they are needed.
    let pieces = std::iter::successors(Some(range.start), move |&p| Some(p + (block - p % block)))
        .take_while(move |&p| p < end)
        .map(move |p| (p, (block - p % block).min(end - p) as usize));
    let stream = futures::stream::iter(pieces)
        .then(move |(pos, len)| {
            let state = state.clone();
            async move {
                let permit =
                    if metered {
                        Some(crate::server::take_buffer(&state).await.map_err(|e| {
                            std::io::Error::other(format!("no request buffer: {e:?}"))
                        })?)
                    } else {
                        None
                    };
                Ok::<_, std::io::Error>((pos, len, permit))
            }
        })
        .map_ok(move |(pos, len, permit)| {
            let reader = reader.clone();
            async move {
                let bytes = reader
                    .read(pos, len)
                    .await
                    .map_err(|e| std::io::Error::other(crate::error::chain(&e)))?;
                if bytes.len() != len {
                    return Err(std::io::Error::other("the file changed size while read"));
                }
                Ok((bytes, permit))
            }
        })
        .try_buffered(if metered { READ_AHEAD } else { 1 })
        .map_ok(|(bytes, _permit)| bytes);
    // The engine's futures are not `Sync`; the stream is only ever polled by one task.
    sync_wrapper::SyncStream::new(stream)
}

fn object_entry(meta: &FileMeta, key: String) -> Object {
    Object {
        key: Some(key),
        size: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
        e_tag: Some(ObjectAttrs::of(meta).etag(meta)),
        last_modified: Some(timestamp(meta.mtime)),
        storage_class: Some(ObjectStorageClass::from_static(
            ObjectStorageClass::STANDARD,
        )),
        ..Default::default()
    }
}

/// One page of a listing of `bucket`: objects and common prefixes after `after` (a full
/// file name), at most `max` entries. Returns them, whether more follow, and the file name
/// to continue after.
async fn list_page(
    state: &AppState,
    bucket: &str,
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<String>,
    max: usize,
) -> S3Result<(Vec<Object>, Vec<CommonPrefix>, bool, Option<String>)> {
    let base = format!("{bucket}/");
    let full = format!("{base}{prefix}");
    let mut objects = Vec::new();
    let mut prefixes: Vec<CommonPrefix> = Vec::new();
    let mut cursor = after;
    let mut last: Option<String> = None;
    loop {
        let page = state
            .ns
            .list(&full, cursor.as_deref(), LIST_STEP)
            .await
            .map_err(internal)?;
        let exhausted = page.len() < LIST_STEP as usize;
        let mut jumped = false;
        for f in page {
            let key = &f.name[base.len()..];
            if objects.len() + prefixes.len() >= max {
                // One more entry exists: the page is truncated.
                return Ok((objects, prefixes, true, last));
            }
            if let Some(d) = delimiter
                && let Some(pos) = key[prefix.len()..].find(d)
            {
                let cp = &key[..prefix.len() + pos + d.len()];
                prefixes.push(CommonPrefix {
                    prefix: Some(cp.to_owned()),
                });
                // Every name under the common prefix sorts before this one.
                let skip = format!("{base}{cp}\u{10FFFF}");
                last = Some(skip.clone());
                cursor = Some(skip);
                jumped = true;
                break;
            }
            objects.push(object_entry(&f, key.to_owned()));
            last = Some(f.name.clone());
            cursor = Some(f.name.clone());
        }
        if !jumped && exhausted {
            return Ok((objects, prefixes, false, last));
        }
    }
}

fn encode_token(name: &str) -> String {
    hex::encode(name.as_bytes())
}

fn decode_token(token: &str) -> S3Result<String> {
    hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "the continuation token is not one this endpoint gave"
            )
        })
}

fn max_keys(asked: Option<i32>) -> S3Result<usize> {
    match asked {
        None => Ok(MAX_KEYS as usize),
        Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys must not be negative")),
        Some(n) => Ok(n.min(MAX_KEYS) as usize),
    }
}

/// The S3 operations: each is the `Gateway` method of the same name, counted in
/// `blockcache_s3_requests_total{operation, code}` and timed (to the answer's head) in
/// `blockcache_s3_request_duration_seconds{operation}`. Operations not listed get `s3s`'s
/// `NotImplemented`.
macro_rules! operations {
    ($($method:ident: $input:ident -> $output:ident = $name:literal;)*) => {
        #[async_trait::async_trait]
        impl S3 for Gateway {
            $(
                async fn $method(
                    &self,
                    req: S3Request<$input>,
                ) -> S3Result<S3Response<$output>> {
                    let started = std::time::Instant::now();
                    let result = Gateway::$method(self, req).await;
                    // A completion answered early counts when its work ends (it does so).
                    if !(result.is_ok() && $name == DEFERRED) {
                        observe($name, started, result.as_ref().err());
                    }
                    result
                }
            )*
        }
    };
}

operations! {
    list_buckets: ListBucketsInput -> ListBucketsOutput = "ListBuckets";
    create_bucket: CreateBucketInput -> CreateBucketOutput = "CreateBucket";
    head_bucket: HeadBucketInput -> HeadBucketOutput = "HeadBucket";
    get_bucket_location: GetBucketLocationInput -> GetBucketLocationOutput = "GetBucketLocation";
    delete_bucket: DeleteBucketInput -> DeleteBucketOutput = "DeleteBucket";
    put_object: PutObjectInput -> PutObjectOutput = "PutObject";
    get_object: GetObjectInput -> GetObjectOutput = "GetObject";
    head_object: HeadObjectInput -> HeadObjectOutput = "HeadObject";
    delete_object: DeleteObjectInput -> DeleteObjectOutput = "DeleteObject";
    delete_objects: DeleteObjectsInput -> DeleteObjectsOutput = "DeleteObjects";
    copy_object: CopyObjectInput -> CopyObjectOutput = "CopyObject";
    list_objects_v2: ListObjectsV2Input -> ListObjectsV2Output = "ListObjectsV2";
    list_objects: ListObjectsInput -> ListObjectsOutput = "ListObjects";
    create_multipart_upload: CreateMultipartUploadInput -> CreateMultipartUploadOutput = "CreateMultipartUpload";
    upload_part: UploadPartInput -> UploadPartOutput = "UploadPart";
    upload_part_copy: UploadPartCopyInput -> UploadPartCopyOutput = "UploadPartCopy";
    complete_multipart_upload: CompleteMultipartUploadInput -> CompleteMultipartUploadOutput = "CompleteMultipartUpload";
    abort_multipart_upload: AbortMultipartUploadInput -> AbortMultipartUploadOutput = "AbortMultipartUpload";
    list_parts: ListPartsInput -> ListPartsOutput = "ListParts";
    list_multipart_uploads: ListMultipartUploadsInput -> ListMultipartUploadsOutput = "ListMultipartUploads";
}

/// The operation whose success is counted by its own work, which ends after the answer's
/// head ([`Gateway::complete_multipart_upload`]).
const DEFERRED: &str = "CompleteMultipartUpload";

/// Counts and times one S3 request.
pub(super) fn observe(
    operation: &'static str,
    started: std::time::Instant,
    error: Option<&S3Error>,
) {
    let code = error.map_or_else(|| "OK".to_owned(), |e| e.code().as_str().to_owned());
    metrics::counter!("blockcache_s3_requests_total", "operation" => operation, "code" => code)
        .increment(1);
    metrics::histogram!("blockcache_s3_request_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
}

/// The operations' bodies; [`operations!`] makes them the [`S3`] trait's.
impl Gateway {
    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let mut buckets = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .state
                .ns
                .list(BUCKETS, after.as_deref(), LIST_STEP)
                .await
                .map_err(internal)?;
            let done = page.len() < LIST_STEP as usize;
            for f in page {
                let name = f.name[BUCKETS.len()..].to_owned();
                after = Some(f.name.clone());
                if valid_bucket(&name) {
                    buckets.push(Bucket {
                        name: Some(name),
                        creation_date: Some(timestamp(f.mtime)),
                        ..Default::default()
                    });
                }
            }
            if done {
                break;
            }
        }
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                display_name: Some("blockcache".to_owned()),
                id: Some("blockcache".to_owned()),
            }),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = req.input.bucket;
        if !valid_bucket(&bucket) {
            return Err(s3_error!(
                InvalidBucketName,
                "{bucket:?}: a bucket name is 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            ));
        }
        if self.bucket_exists(&bucket).await.is_ok() {
            return Err(s3_error!(
                BucketAlreadyOwnedByYou,
                "the bucket {bucket:?} exists"
            ));
        }
        let w = self
            .state
            .ns
            .create(&format!("{BUCKETS}{bucket}"))
            .await
            .map_err(internal)?;
        w.finish(Durability::Local).await.map_err(internal)?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{bucket}")),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket_exists(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.bucket_exists(&req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = req.input.bucket;
        self.bucket_exists(&bucket).await?;
        let any = self
            .state
            .ns
            .list(&format!("{bucket}/"), None, 1)
            .await
            .map_err(internal)?;
        if !any.is_empty() {
            return Err(s3_error!(
                BucketNotEmpty,
                "the bucket {bucket:?} holds objects"
            ));
        }
        match self.state.ns.delete(&format!("{BUCKETS}{bucket}")).await {
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(internal(e)),
        }
        self.abort_uploads_of(&bucket).await?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let trailers = req.trailing_headers;
        let mut input = req.input;
        let Some(mut body) = input.body.take() else {
            return Err(s3_error!(IncompleteBody, "the request has no body"));
        };
        let checked = async {
            let durability = durability_of(&req.headers, self.state.durability)?;
            self.put_checks(&input).await?;
            Ok(durability)
        }
        .await;
        let durability = match checked {
            Ok(d) => d,
            Err(e) => {
                // The client may still be sending: read on (bounded) so that it gets the
                // answer rather than a reset connection.
                crate::server::drain(&mut body).await;
                return Err(e);
            }
        };
        let name = object_name(&input.bucket, &input.key)?;
        let checksums = Checksums {
            crc32: input.checksum_crc32,
            crc32c: input.checksum_crc32c,
            sha1: input.checksum_sha1,
            sha256: input.checksum_sha256,
            crc64nvme: input.checksum_crc64nvme,
            algorithm: input.checksum_algorithm.map(|a| a.as_str().to_owned()),
        };
        let attrs = ObjectAttrs {
            content_type: input.content_type,
            meta: input.metadata.unwrap_or_default().into_iter().collect(),
            ..Default::default()
        };
        let (meta, md5) = self
            .write_object(
                &name,
                body,
                durability,
                input.content_md5.as_deref(),
                checksums,
                trailers,
                attrs,
                matches!(input.if_none_match, Some(ETagCondition::Any)),
                false,
            )
            .await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(md5)),
            size: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let reader = self.open_object(&input.bucket, &input.key).await?;
        let (head, range) = object_head(
            reader.meta(),
            Asked {
                if_match: input.if_match.as_ref(),
                if_unmodified_since: input.if_unmodified_since.as_ref(),
                if_none_match: input.if_none_match.as_ref(),
                if_modified_since: input.if_modified_since.as_ref(),
                range: input.range.as_ref(),
                part: input.part_number,
            },
        )?;
        let stream = stream_of(reader, range, self.state.clone(), true);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            parts_count: head.parts_count,
            content_length: head.content_length,
            content_range: head.content_range,
            accept_ranges: head.accept_ranges,
            e_tag: head.e_tag,
            last_modified: head.last_modified,
            content_type: head.content_type,
            metadata: head.metadata,
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        let meta = self.stat_object(&input.bucket, &input.key).await?;
        // A part or a range answers 206 (set by `refuse_while_draining`: s3s 0.14 sets it
        // for GET only, and drops a status given here).
        let (head, _) = object_head(
            &meta,
            Asked {
                if_match: input.if_match.as_ref(),
                if_unmodified_since: input.if_unmodified_since.as_ref(),
                if_none_match: input.if_none_match.as_ref(),
                if_modified_since: input.if_modified_since.as_ref(),
                range: input.range.as_ref(),
                part: input.part_number,
            },
        )?;
        Ok(S3Response::new(head))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        let name = object_name(&input.bucket, &input.key)?;
        match self.state.ns.delete(&name).await {
            // S3 answers a deletion of a missing key as done.
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(object_error(e, &input.bucket, &input.key)),
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        if input.delete.objects.len() > MAX_DELETE {
            return Err(s3_error!(
                MalformedXML,
                "a request deletes at most {MAX_DELETE} keys"
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in input.delete.objects {
            let result = match object_name(&input.bucket, &o.key) {
                Ok(name) => match self.state.ns.delete(&name).await {
                    Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(object_error(e, &input.bucket, &o.key)),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(o.key),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => errors.push(s3s::dto::Error {
                    code: Some(e.code().as_str().to_owned()),
                    key: Some(o.key),
                    message: e.message().map(str::to_owned),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let durability = durability_of(&req.headers, self.state.durability)?;
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        let dest = object_name(&input.bucket, &input.key)?;
        let reader = self
            .open_copy_source(
                &input.copy_source,
                input.copy_source_if_match.as_ref(),
                input.copy_source_if_none_match.as_ref(),
            )
            .await?;
        let meta = reader.meta().clone();
        let src_attrs = ObjectAttrs::of(&meta);
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        if dest == meta.name && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "copying an object onto itself without changing its metadata (x-amz-metadata-directive: REPLACE) changes nothing"
            ));
        }
        let attrs = if replace {
            ObjectAttrs {
                content_type: input.content_type,
                meta: input.metadata.unwrap_or_default().into_iter().collect(),
                ..Default::default()
            }
        } else {
            // The copy is one piece: its ETag is the MD5 of its bytes.
            ObjectAttrs {
                etag: None,
                parts: None,
                part_size: None,
                ..src_attrs
            }
        };
        let size = meta.size;
        let stream = stream_of(reader, 0..size, self.state.clone(), false);
        let (written, md5) = self
            .write_object(
                &dest,
                StreamingBlob::wrap(stream),
                durability,
                None,
                Checksums::default(),
                None,
                attrs,
                false,
                true,
            )
            .await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(md5)),
                last_modified: Some(timestamp(written.mtime)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let max = max_keys(input.max_keys)?;
        let after = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => Some(decode_token(t)?),
            (None, Some(s)) if !s.is_empty() => Some(format!("{}/{s}", input.bucket)),
            _ => None,
        };
        let (objects, prefixes, truncated, last) = if max == 0 {
            (Vec::new(), Vec::new(), false, None)
        } else {
            list_page(
                &self.state,
                &input.bucket,
                &prefix,
                delimiter.as_deref(),
                after,
                max,
            )
            .await?
        };
        let count = objects.len() + prefixes.len();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter,
            max_keys: Some(max as i32),
            key_count: Some(count as i32),
            is_truncated: Some(truncated),
            continuation_token: input.continuation_token,
            next_continuation_token: truncated
                .then(|| last.as_deref().map(encode_token))
                .flatten(),
            start_after: input.start_after,
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let max = max_keys(input.max_keys)?;
        let after = input
            .marker
            .as_ref()
            .filter(|m| !m.is_empty())
            .map(|m| format!("{}/{m}", input.bucket));
        let (objects, prefixes, truncated, _) = if max == 0 {
            (Vec::new(), Vec::new(), false, None)
        } else {
            list_page(
                &self.state,
                &input.bucket,
                &prefix,
                delimiter.as_deref(),
                after,
                max,
            )
            .await?
        };
        // S3 gives NextMarker only with a delimiter; clients otherwise go on from the last key.
        let next_marker = (truncated && delimiter.is_some())
            .then(|| {
                let last_key = objects.last().and_then(|o| o.key.clone());
                let last_prefix = prefixes.last().and_then(|p| p.prefix.clone());
                last_key.max(last_prefix)
            })
            .flatten();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            marker: input.marker,
            delimiter,
            max_keys: Some(max as i32),
            is_truncated: Some(truncated),
            next_marker,
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }
}

/// The S3 endpoint's router: the gateway behind `s3s`'s service, with SigV4 against `keys`
/// and virtual-host style requests for `domains`. Without keys every request is taken as
/// anonymous (see [`anonymous`]). Refuses the daemon's draining like the file API.
pub fn router(
    state: Arc<AppState>,
    keys: &[(String, String)],
    domains: &[String],
) -> Result<axum::Router, String> {
    let mut builder = s3s::service::S3ServiceBuilder::new(Gateway::new(state.clone()));
    if !keys.is_empty() {
        let mut auth = s3s::auth::SimpleAuth::new();
        for (access, secret) in keys {
            auth.register(access.clone(), secret.clone().into());
        }
        builder.set_auth(auth);
    }
    if !domains.is_empty() {
        let host = s3s::host::MultiDomain::new(domains)
            .map_err(|e| format!("--s3-domain {domains:?}: {e}"))?;
        builder.set_host(host);
    }
    let service = builder.build();
    let service = axum::error_handling::HandleError::new(service, |e: s3s::HttpError| async move {
        tracing::error!(error = ?e, "S3 request failed");
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        )
    });
    let router = axum::Router::new().fallback_service(service);
    let router = if keys.is_empty() {
        router.layer(axum::middleware::from_fn(anonymous))
    } else {
        router
    };
    Ok(router
        .layer(axum::middleware::from_fn_with_state(
            state,
            refuse_while_draining,
        ))
        .layer(axum::middleware::from_fn(
            crate::connections::close_after_empty_expect,
        )))
}

/// Query parameters of a presigned URL (SigV4 and SigV2).
const PRESIGN_PARAMS: &[&str] = &[
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
    "x-amz-signature",
    "x-amz-security-token",
    "awsaccesskeyid",
    "signature",
    "expires",
];

/// For an endpoint without keys: a request's signature (header or presigned URL) is
/// dropped, so that clients configured with any keys work as anonymous ones (`s3s` has
/// nothing to check a signature against and would answer `NotImplemented`). An aws-chunked
/// body is refused: `s3s` decodes its framing only while checking a signature, and the
/// framing must never be stored as the object's bytes.
async fn anonymous(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut req = req;
    let headers = req.headers_mut();
    headers.remove(axum::http::header::AUTHORIZATION);
    let chunked = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|e| e.trim().eq_ignore_ascii_case("aws-chunked"))
        })
        || headers
            .get("x-amz-content-sha256")
            .is_some_and(|v| v.as_bytes().starts_with(b"STREAMING-"));
    if chunked {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidRequest</Code><Message>this endpoint has no access keys (--s3-access-key), so it cannot decode an aws-chunked body: give the endpoint keys, or send the body plain</Message></Error>";
        return (
            axum::http::StatusCode::BAD_REQUEST,
            [(axum::http::header::CONTENT_TYPE, "application/xml")],
            body,
        )
            .into_response();
    }
    if let Some(query) = req.uri().query() {
        let is_presign = |pair: &str| {
            let name = pair.split('=').next().unwrap_or_default();
            PRESIGN_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p))
        };
        if query.split('&').any(is_presign) {
            let kept: Vec<&str> = query.split('&').filter(|p| !is_presign(p)).collect();
            let path = req.uri().path();
            let pq = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = pq.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
    next.run(req).await
}

/// New requests get 503 `ServiceUnavailable` once shutdown starts.
async fn refuse_while_draining(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code><Message>the daemon is shutting down</Message></Error>";
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::CONTENT_TYPE, "application/xml")],
            body,
        )
            .into_response();
    }
    // An HTTP/1.1 request without Content-Length or Transfer-Encoding has no body; say so
    // to `s3s`, which otherwise cannot tell its length through the body timeout's wrapper.
    let mut req = req;
    let headers = req.headers();
    if !headers.contains_key(axum::http::header::CONTENT_LENGTH)
        && !headers.contains_key(axum::http::header::TRANSFER_ENCODING)
    {
        *req.body_mut() = axum::body::Body::empty();
    }
    let head = req.method() == axum::http::Method::HEAD;
    let mut response = next.run(req).await;
    // A HEAD of a range or a part answers 206, as the GET would.
    if head
        && response.status() == axum::http::StatusCode::OK
        && response
            .headers()
            .contains_key(axum::http::header::CONTENT_RANGE)
    {
        *response.status_mut() = axum::http::StatusCode::PARTIAL_CONTENT;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in ["abc", "my-bucket.1", "a1b", &"a".repeat(63)] {
            assert!(valid_bucket(ok), "{ok}");
        }
        for bad in [
            "ab",
            "Abc",
            "-abc",
            "abc-",
            "a..b",
            "a_b",
            &"a".repeat(64),
            ".s3",
        ] {
            assert!(!valid_bucket(bad), "{bad}");
        }
    }

    #[test]
    fn continuation_tokens_round_trip_any_name() {
        for name in ["b/k", "b/\u{10FFFF}", "b/ä/ü"] {
            assert_eq!(decode_token(&encode_token(name)).expect("decode"), name);
        }
        assert!(decode_token("zz").is_err());
    }
}
