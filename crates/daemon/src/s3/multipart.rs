//! Multipart uploads. An upload is the file `.s3-uploads/ID` (empty; its attributes say
//! which bucket and key it is for, with the content type and user metadata the object will
//! get; its modification time is when it was initiated), and its parts are the files
//! `.s3-parts/ID/NNNNN` (each with its MD5 as ETag). Being files, they survive restarts and
//! ship to the store with the rest. Completing streams the parts, in order, into a new
//! version of the object and names it in one transaction (the parts' blocks are already in
//! the store or the cache, so dedup stores nothing twice), then removes the upload; aborting
//! removes its files, and with them every block only they held.

use std::time::{Duration, SystemTime};

use blockcache::{Durability, Error, FileMeta};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};
use serde::{Deserialize, Serialize};

use super::{
    Checksums, Gateway, LIST_STEP, ObjectAttrs, durability_of, internal, object_name, stream_of,
    timestamp,
};

/// The prefix of the files of incomplete uploads.
pub const UPLOADS: &str = ".s3-uploads/";

/// The prefix of the files of their parts.
pub const PARTS: &str = ".s3-parts/";

/// The highest part number (S3's limit).
const MAX_PART: i32 = 10_000;

/// Most parts or uploads a listing page holds (S3's limit).
const MAX_PAGE: i32 = 1000;

/// What an upload is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadRecord {
    bucket: String,
    key: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    meta: std::collections::BTreeMap<String, String>,
}

fn record_name(id: &str) -> String {
    format!("{UPLOADS}{id}")
}

fn part_prefix(id: &str) -> String {
    format!("{PARTS}{id}/")
}

fn part_name(id: &str, n: i32) -> String {
    format!("{PARTS}{id}/{n:05}")
}

/// A new upload id: 128 random bits in hex.
fn new_upload_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn valid_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn no_such_upload(id: &str) -> s3s::S3Error {
    s3_error!(
        NoSuchUpload,
        "no upload {id:?}: it was never begun, or it was completed, aborted or expired"
    )
}

fn check_part_number(n: i32) -> S3Result<()> {
    if (1..=MAX_PART).contains(&n) {
        Ok(())
    } else {
        Err(s3_error!(
            InvalidArgument,
            "part number {n}: part numbers go from 1 to {MAX_PART}"
        ))
    }
}

/// The ETag of a multipart object: the MD5 of the parts' MD5s, then `-` and their number.
fn multipart_etag(part_etags: &[String]) -> S3Result<String> {
    let mut md5 = Md5::new();
    for e in part_etags {
        let raw = hex::decode(e).map_err(|_| {
            internal(Error::InvalidAttrs(format!(
                "a part's ETag {e:?} is not an MD5"
            )))
        })?;
        md5.update(&raw);
    }
    Ok(format!(
        "{}-{}",
        hex::encode(md5.finalize()),
        part_etags.len()
    ))
}

/// An incomplete upload, as its record file says.
struct Upload {
    id: String,
    initiated: SystemTime,
    /// `None` for a record whose attributes cannot be read (written by hand).
    record: Option<UploadRecord>,
}

impl Gateway {
    /// Every incomplete upload of the volume, in order of id.
    async fn uploads(&self) -> S3Result<Vec<Upload>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .state
                .ns
                .list(UPLOADS, after.as_deref(), LIST_STEP)
                .await
                .map_err(internal)?;
            let done = page.len() < LIST_STEP as usize;
            after = page.last().map(|f| f.name.clone());
            all.extend(page.into_iter().map(|f| {
                Upload {
                    id: f.name[UPLOADS.len()..].to_owned(),
                    initiated: f.mtime,
                    record: f
                        .attrs
                        .as_deref()
                        .and_then(|a| serde_json::from_str(a).ok()),
                }
            }));
            if done {
                return Ok(all);
            }
        }
    }

    /// The upload `id` of `bucket`/`key`: `NoSuchUpload` unless it exists for them.
    async fn upload_of(&self, bucket: &str, key: &str, id: &str) -> S3Result<UploadRecord> {
        self.bucket_exists(bucket).await?;
        if !valid_upload_id(id) {
            return Err(no_such_upload(id));
        }
        let meta = match self.state.ns.stat(&record_name(id)).await {
            Ok(m) => m,
            Err(Error::NotFound { .. }) => return Err(no_such_upload(id)),
            Err(e) => return Err(internal(e)),
        };
        let record: UploadRecord = meta
            .attrs
            .as_deref()
            .and_then(|a| serde_json::from_str(a).ok())
            .ok_or_else(|| no_such_upload(id))?;
        if record.bucket != bucket || record.key != key {
            return Err(no_such_upload(id));
        }
        Ok(record)
    }

    /// Removes the files of upload `id`: its record first (so no part is accepted after),
    /// then its parts.
    async fn remove_upload(&self, id: &str) -> S3Result<()> {
        match self.state.ns.delete(&record_name(id)).await {
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(internal(e)),
        }
        self.remove_parts(id).await
    }

    async fn remove_parts(&self, id: &str) -> S3Result<()> {
        let prefix = part_prefix(id);
        loop {
            let page = self
                .state
                .ns
                .list(&prefix, None, LIST_STEP)
                .await
                .map_err(internal)?;
            if page.is_empty() {
                return Ok(());
            }
            for f in page {
                match self.state.ns.delete(&f.name).await {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(internal(e)),
                }
            }
        }
    }

    /// After a part was named: if its upload went meanwhile (aborted or completed), the
    /// part goes too and the client is told.
    async fn keep_part_if_upload(&self, id: &str, part: &str) -> S3Result<()> {
        match self.state.ns.stat(&record_name(id)).await {
            Ok(_) => Ok(()),
            Err(Error::NotFound { .. }) => {
                match self.state.ns.delete(part).await {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(internal(e)),
                }
                Err(no_such_upload(id))
            }
            Err(e) => Err(internal(e)),
        }
    }

    pub(super) async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        object_name(&input.bucket, &input.key)?;
        let record = UploadRecord {
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            content_type: input.content_type,
            meta: input.metadata.unwrap_or_default().into_iter().collect(),
        };
        let id = new_upload_id();
        let mut w = self
            .state
            .ns
            .create(&record_name(&id))
            .await
            .map_err(internal)?;
        w.create_only().map_err(internal)?;
        let text = serde_json::to_string(&record).expect("records serialize");
        if let Err(e) = w.set_attrs(Some(text)) {
            w.abandon().await;
            return Err(s3_error!(
                MetadataTooLarge,
                "the object's metadata is too large: {e}"
            ));
        }
        w.finish(Durability::Local).await.map_err(internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            checksum_algorithm: input.checksum_algorithm,
            ..Default::default()
        }))
    }

    pub(super) async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let trailers = req.trailing_headers;
        let mut input = req.input;
        let Some(mut body) = input.body.take() else {
            return Err(s3_error!(IncompleteBody, "the request has no body"));
        };
        let checked = async {
            let durability = durability_of(&req.headers, self.state.durability)?;
            check_part_number(input.part_number)?;
            self.upload_of(&input.bucket, &input.key, &input.upload_id)
                .await?;
            let max = self.state.ns.max_file_size();
            if let Some(len) = input.content_length
                && u64::try_from(len).unwrap_or(0) > max
            {
                return Err(s3_error!(
                    EntityTooLarge,
                    "{len} bytes: the largest part is --max-file-size ({max} bytes)"
                ));
            }
            Ok(durability)
        }
        .await;
        let durability = match checked {
            Ok(d) => d,
            Err(e) => {
                crate::server::drain(&mut body).await;
                return Err(e);
            }
        };
        let part = part_name(&input.upload_id, input.part_number);
        let checksums = Checksums {
            crc32: input.checksum_crc32.clone(),
            crc32c: input.checksum_crc32c.clone(),
            sha1: input.checksum_sha1.clone(),
            sha256: input.checksum_sha256.clone(),
            crc64nvme: input.checksum_crc64nvme.clone(),
            algorithm: input.checksum_algorithm.map(|a| a.as_str().to_owned()),
        };
        let (_, md5) = self
            .write_object(
                &part,
                body,
                durability,
                input.content_md5.as_deref(),
                checksums,
                trailers,
                ObjectAttrs::default(),
                false,
                false,
            )
            .await?;
        self.keep_part_if_upload(&input.upload_id, &part).await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(md5)),
            checksum_crc32: input.checksum_crc32,
            checksum_crc32c: input.checksum_crc32c,
            checksum_sha1: input.checksum_sha1,
            checksum_sha256: input.checksum_sha256,
            checksum_crc64nvme: input.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    pub(super) async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let durability = durability_of(&req.headers, self.state.durability)?;
        let input = req.input;
        check_part_number(input.part_number)?;
        self.upload_of(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let reader = self
            .open_copy_source(
                &input.copy_source,
                input.copy_source_if_match.as_ref(),
                input.copy_source_if_none_match.as_ref(),
            )
            .await?;
        let meta = reader.meta().clone();
        let range = match &input.copy_source_range {
            None => 0..meta.size,
            Some(r) => copy_range(r, meta.size)?,
        };
        let part = part_name(&input.upload_id, input.part_number);
        let stream = stream_of(reader, range, self.state.clone(), false);
        let (written, md5) = self
            .write_object(
                &part,
                StreamingBlob::wrap(stream),
                durability,
                None,
                Checksums::default(),
                None,
                ObjectAttrs::default(),
                false,
                true,
            )
            .await?;
        self.keep_part_if_upload(&input.upload_id, &part).await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(ETag::Strong(md5)),
                last_modified: Some(timestamp(written.mtime)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    pub(super) async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let durability = durability_of(&req.headers, self.state.durability)?;
        let input = req.input;
        let record = self
            .upload_of(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let id = &input.upload_id;
        let asked = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if asked.is_empty() {
            return Err(s3_error!(
                MalformedXML,
                "a completion names at least one part"
            ));
        }
        // Every part named must exist with the ETag the client has for it.
        let mut parts: Vec<FileMeta> = Vec::with_capacity(asked.len());
        let mut etags = Vec::with_capacity(asked.len());
        let mut previous = 0;
        for p in &asked {
            let Some(n) = p.part_number else {
                return Err(s3_error!(MalformedXML, "a part has no PartNumber"));
            };
            if n <= previous {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "parts must be listed in ascending order of their numbers ({n} after {previous})"
                ));
            }
            previous = n;
            check_part_number(n)?;
            let meta = match self.state.ns.stat(&part_name(id, n)).await {
                Ok(m) => m,
                Err(Error::NotFound { .. }) => {
                    return Err(s3_error!(InvalidPart, "part {n} was not uploaded"));
                }
                Err(e) => return Err(internal(e)),
            };
            let etag = ObjectAttrs::of(&meta).etag(&meta);
            if let Some(asked) = &p.e_tag
                && asked.value() != etag.value()
            {
                return Err(s3_error!(
                    InvalidPart,
                    "part {n} has the ETag {:?}, not {:?}",
                    etag.value(),
                    asked.value()
                ));
            }
            etags.push(etag.value().to_owned());
            parts.push(meta);
        }
        let total: u64 = parts.iter().map(|m| m.size).sum();
        let max = self.state.ns.max_file_size();
        if total > max {
            return Err(s3_error!(
                EntityTooLarge,
                "the parts hold {total} bytes: the largest object is --max-file-size ({max} bytes)"
            ));
        }
        if let Some(size) = input.mpu_object_size
            && u64::try_from(size).ok() != Some(total)
        {
            return Err(s3_error!(
                InvalidRequest,
                "x-amz-mp-object-size says {size} bytes; the parts hold {total}"
            ));
        }
        let etag = multipart_etag(&etags)?;
        // GetObject with partNumber needs where the parts are: kept when all but the last
        // have one size (the way clients cut), which two numbers say.
        let first = parts[0].size;
        let uniform = parts[..parts.len() - 1].iter().all(|m| m.size == first)
            && parts[parts.len() - 1].size <= first;
        let attrs = ObjectAttrs {
            etag: Some(etag.clone()),
            content_type: record.content_type,
            meta: record.meta,
            parts: Some(parts.len() as u32),
            part_size: uniform.then_some(first),
        };
        let name = object_name(&input.bucket, &input.key)?;
        let sources = futures::stream::iter(parts);
        let state = self.state.clone();
        let body = sync_wrapper::SyncStream::new(
            sources
                .then(move |checked| {
                    let state = state.clone();
                    async move {
                        let reader =
                            state
                                .ns
                                .open_read(&checked.name)
                                .await
                                .map_err(|e| match e {
                                    Error::NotFound { .. } => std::io::Error::new(
                                        std::io::ErrorKind::InvalidData,
                                        format!(
                                            "a part ({}) went while the upload was completed",
                                            checked.name
                                        ),
                                    ),
                                    e => std::io::Error::other(crate::error::chain(&e)),
                                })?;
                        // The version whose ETag was checked, or none: a part sent again
                        // meanwhile would make the object differ from its ETag.
                        if reader.meta().inode != checked.inode
                            || reader.meta().size != checked.size
                        {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "a part ({}) was sent again while the upload was completed",
                                    checked.name
                                ),
                            ));
                        }
                        let size = checked.size;
                        Ok::<_, std::io::Error>(stream_of(reader, 0..size, state, false))
                    }
                })
                .try_flatten(),
        );
        // The answer's head goes at once and the work runs while its body is sent: S3's
        // way (whitespace every 100 ms until the result's XML, or an error's in a 200), so
        // that a large completion does not run into the client's read timeout. A client
        // that goes away drops the work: the object is then the old one or the new one.
        let gateway = Gateway::new(self.state.clone());
        let create_only = matches!(input.if_none_match, Some(ETagCondition::Any));
        let id = id.clone();
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let started = std::time::Instant::now();
        let work = async move {
            let result = gateway
                .finish_completion(
                    name,
                    body,
                    durability,
                    attrs,
                    create_only,
                    &id,
                    (bucket, key),
                    etag,
                )
                .await;
            super::observe("CompleteMultipartUpload", started, result.as_ref().err());
            result
        };
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            future: Some(Box::pin(work)),
            ..Default::default()
        }))
    }

    /// The work of a completion, after its answer's head: the object written and named,
    /// then the upload's files removed.
    #[allow(clippy::too_many_arguments)]
    async fn finish_completion(
        &self,
        name: String,
        body: impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static,
        durability: Durability,
        attrs: ObjectAttrs,
        create_only: bool,
        id: &str,
        (bucket, key): (String, String),
        etag: String,
    ) -> S3Result<CompleteMultipartUploadOutput> {
        let gateway = self;
        {
            let written = gateway
                .write_object(
                    &name,
                    StreamingBlob::wrap(body),
                    durability,
                    None,
                    Checksums::default(),
                    None,
                    attrs,
                    create_only,
                    true,
                )
                .await;
            if let Err(e) = written {
                // A part gone because the upload was aborted meanwhile is `NoSuchUpload`;
                // anything else is told as it is (clients abort an upload they are told
                // is gone, so only an upload that is gone is).
                let gone = matches!(
                    gateway.state.ns.stat(&record_name(id)).await,
                    Err(Error::NotFound { .. })
                );
                return Err(if gone { no_such_upload(id) } else { e });
            }
            // The object is named; the upload is done. Its files go now (a failure leaves
            // them to the expiry, which finds no record for the parts).
            if let Err(e) = gateway.remove_upload(id).await {
                tracing::warn!(upload = %id, code = %e.code().as_str(), error = e.message().unwrap_or_default(), "removing a completed upload's parts failed; the expiry removes them");
            }
            Ok(CompleteMultipartUploadOutput {
                location: Some(format!("/{bucket}/{key}")),
                bucket: Some(bucket),
                key: Some(key),
                e_tag: Some(ETag::Strong(etag)),
                ..Default::default()
            })
        }
    }

    pub(super) async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.upload_of(&input.bucket, &input.key, &input.upload_id)
            .await?;
        self.remove_upload(&input.upload_id).await?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    pub(super) async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.upload_of(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let max = match input.max_parts {
            None => MAX_PAGE,
            Some(n) if n < 0 => {
                return Err(s3_error!(InvalidArgument, "max-parts must not be negative"));
            }
            Some(n) => n.min(MAX_PAGE),
        };
        let marker = input.part_number_marker.unwrap_or(0).clamp(0, MAX_PART);
        let after = (marker > 0).then(|| part_name(&input.upload_id, marker));
        let files = self
            .state
            .ns
            .list(
                &part_prefix(&input.upload_id),
                after.as_deref(),
                max as u32 + 1,
            )
            .await
            .map_err(internal)?;
        let truncated = files.len() > max as usize;
        let parts: Vec<Part> = files
            .iter()
            .take(max as usize)
            .filter_map(|f| {
                let n: i32 = f.name.rsplit('/').next()?.parse().ok()?;
                Some(Part {
                    part_number: Some(n),
                    e_tag: Some(ObjectAttrs::of(f).etag(f)),
                    size: Some(i64::try_from(f.size).unwrap_or(i64::MAX)),
                    last_modified: Some(timestamp(f.mtime)),
                    ..Default::default()
                })
            })
            .collect();
        let next = parts.last().and_then(|p| p.part_number);
        let truncated = truncated && next.is_some();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max),
            part_number_marker: Some(marker),
            next_part_number_marker: truncated.then_some(next).flatten(),
            is_truncated: Some(truncated),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    pub(super) async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let max = match input.max_uploads {
            None => MAX_PAGE,
            Some(n) if n < 0 => {
                return Err(s3_error!(
                    InvalidArgument,
                    "max-uploads must not be negative"
                ));
            }
            Some(n) => n.min(MAX_PAGE),
        } as usize;
        // The bucket's uploads under the prefix, in order of key, then of upload id.
        let mut all: Vec<(String, String, SystemTime)> = self
            .uploads()
            .await?
            .into_iter()
            .filter_map(|u| {
                let r = u.record?;
                (r.bucket == input.bucket && r.key.starts_with(&prefix)).then_some((
                    r.key,
                    u.id,
                    u.initiated,
                ))
            })
            .collect();
        all.sort();
        let key_marker = input.key_marker.clone().filter(|k| !k.is_empty());
        let id_marker = input.upload_id_marker.clone().filter(|k| !k.is_empty());
        let mut uploads = Vec::new();
        let mut prefixes: Vec<CommonPrefix> = Vec::new();
        let mut truncated = false;
        let mut next: Option<(String, Option<String>)> = None;
        for (key, id, initiated) in all {
            // A marker that is a common prefix (the last entry of a page that ended on one):
            // every key under it was rolled up in it already.
            if let (Some(km), Some(d)) = (&key_marker, &delimiter)
                && km.ends_with(d.as_str())
                && km.len() > prefix.len()
                && key.starts_with(km.as_str())
            {
                continue;
            }
            if let Some(km) = &key_marker {
                let past = match &id_marker {
                    Some(im) => key.as_str() > km.as_str() || (&key == km && &id > im),
                    None => key.as_str() > km.as_str(),
                };
                if !past {
                    continue;
                }
            }
            if let Some(d) = &delimiter
                && let Some(pos) = key[prefix.len()..].find(d.as_str())
            {
                let cp = key[..prefix.len() + pos + d.len()].to_owned();
                if prefixes.last().and_then(|p| p.prefix.as_deref()) == Some(cp.as_str()) {
                    continue;
                }
                if uploads.len() + prefixes.len() >= max {
                    truncated = true;
                    break;
                }
                next = Some((cp.clone(), None));
                prefixes.push(CommonPrefix { prefix: Some(cp) });
                continue;
            }
            if uploads.len() + prefixes.len() >= max {
                truncated = true;
                break;
            }
            next = Some((key.clone(), Some(id.clone())));
            uploads.push(MultipartUpload {
                key: Some(key),
                upload_id: Some(id),
                initiated: Some(timestamp(initiated)),
                ..Default::default()
            });
        }
        let (next_key, next_id) = match (truncated, next) {
            (true, Some((k, i))) => (Some(k), i),
            _ => (None, None),
        };
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(prefix),
            delimiter,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            uploads: Some(uploads),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    /// Aborts every upload into `bucket` (when the bucket is deleted: a bucket made again
    /// with the name starts with none).
    pub(super) async fn abort_uploads_of(&self, bucket: &str) -> S3Result<()> {
        for u in self.uploads().await? {
            if u.record.is_some_and(|r| r.bucket == bucket) {
                self.remove_upload(&u.id).await?;
            }
        }
        Ok(())
    }

    /// Aborts the uploads initiated more than `expiry` ago, and removes parts whose upload
    /// is gone (left by a crash between a completion or abort and the removal of its parts).
    /// Returns the number of uploads aborted.
    pub async fn expire_uploads(&self, expiry: Duration) -> S3Result<usize> {
        let now = SystemTime::now();
        let old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= expiry);
        let expired: Vec<String> = self
            .uploads()
            .await?
            .into_iter()
            .filter(|u| old(u.initiated))
            .map(|u| u.id)
            .collect();
        for id in &expired {
            self.remove_upload(id).await?;
            tracing::info!(upload = %id, "aborted a multipart upload older than --multipart-expiry");
        }
        // Parts without a record, one upload id at a time.
        let mut after: Option<String> = None;
        loop {
            let page = self
                .state
                .ns
                .list(PARTS, after.as_deref(), 1)
                .await
                .map_err(internal)?;
            let Some(f) = page.into_iter().next() else {
                break;
            };
            let id = f.name[PARTS.len()..]
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            // Past every part of this id.
            after = Some(format!("{PARTS}{id}/\u{10FFFF}"));
            let orphan = match self.state.ns.stat(&record_name(&id)).await {
                Ok(_) => false,
                Err(Error::NotFound { .. }) => true,
                Err(e) => return Err(internal(e)),
            };
            if orphan {
                tracing::info!(upload = %id, "removing the parts of an upload that is gone");
                self.remove_parts(&id).await?;
            }
        }
        Ok(expired.len())
    }
}

/// The bytes an `x-amz-copy-source-range` (`bytes=FIRST-LAST`) asks of a source of `size`.
fn copy_range(r: &str, size: u64) -> S3Result<std::ops::Range<u64>> {
    let bad = || {
        s3_error!(
            InvalidArgument,
            "x-amz-copy-source-range {r:?}: write bytes=FIRST-LAST"
        )
    };
    let (first, last) = r
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
        .ok_or_else(bad)?;
    let first: u64 = first.trim().parse().map_err(|_| bad())?;
    let last: u64 = last.trim().parse().map_err(|_| bad())?;
    if first > last || last >= size {
        return Err(s3_error!(
            InvalidRange,
            "x-amz-copy-source-range {r:?} lies outside the source of {size} bytes"
        ));
    }
    Ok(first..last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multipart_etag_is_the_md5_of_the_parts_md5s() {
        // Two parts "a" and "b": MD5("a") = 0cc175b9..., MD5("b") = 92eb5ffe...
        let a = hex::encode(Md5::digest(b"a"));
        let b = hex::encode(Md5::digest(b"b"));
        let mut both = Md5::digest(b"a").to_vec();
        both.extend_from_slice(&Md5::digest(b"b"));
        let want = format!("{}-2", hex::encode(Md5::digest(&both)));
        assert_eq!(multipart_etag(&[a, b]).expect("an etag"), want);
    }

    #[test]
    fn copy_source_ranges_are_checked() {
        assert_eq!(copy_range("bytes=0-9", 10).expect("in range"), 0..10);
        assert_eq!(copy_range("bytes=5-5", 10).expect("in range"), 5..6);
        assert!(copy_range("bytes=5-10", 10).is_err());
        assert!(copy_range("bytes=6-5", 10).is_err());
        assert!(copy_range("5-6", 10).is_err());
    }

    #[test]
    fn upload_ids_are_checked_before_they_name_a_file() {
        assert!(valid_upload_id(&new_upload_id()));
        assert!(!valid_upload_id("../x"));
        assert!(!valid_upload_id(&"A".repeat(32)));
    }
}
