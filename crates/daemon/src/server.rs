//! The HTTP API: a file namespace over the block cache. Handlers translate HTTP to
//! [`blockcache::Namespace`] calls and nothing more.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use blockcache::{Durability, Error, FileMeta, FileReader, Namespace};
use futures::{StreamExt, TryStreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::settings::Secret;

/// Blocks read ahead of the one being sent, per GET.
const READ_AHEAD: usize = 4;
/// Longest page of a listing.
const MAX_LIST_LIMIT: u32 = 10_000;

/// What every handler shares.
pub struct AppState {
    /// The files.
    pub ns: Namespace,
    /// Durability of writes that do not ask for one.
    pub durability: Durability,
    /// Required bearer token, if any.
    pub token: Option<Secret>,
    /// Set once shutdown starts: new requests get 503.
    pub draining: AtomicBool,
    /// Renders the Prometheus text format.
    pub metrics: PrometheusHandle,
    /// Samples the process's metrics (CPU, memory, file descriptors) at each scrape.
    pub process: metrics_process::Collector,
    /// Block buffers of requests, shared by all of them: a writer holds one for its whole
    /// request, a read piece from its read until it is sent. Bounds the daemon's buffer
    /// memory whatever the number of clients.
    pub buffers: Arc<tokio::sync::Semaphore>,
    /// The number of block buffers of `buffers`.
    pub buffer_count: usize,
    /// Longest wait for a buffer before a request is answered 503.
    pub buffer_timeout: Duration,
}

/// Block buffers for all requests together: `memory` worth, and at least one.
pub fn buffer_permits(memory: u64, block_size: u64) -> usize {
    (memory / block_size.max(1)).max(1) as usize
}

/// Seconds a client told 503 for want of buffers is asked to wait (`Retry-After`).
const BUSY_RETRY_AFTER: u64 = 2;

/// Why a request got no block buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBuffer {
    /// The daemon is shutting down.
    ShuttingDown,
    /// None came free within `--buffer-timeout`.
    Busy,
}

/// A block buffer of `state.buffers` (for the file API and the S3 endpoint alike), waited
/// for at most `state.buffer_timeout`.
pub async fn take_buffer(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, NoBuffer> {
    take_buffers(state, 1).await
}

/// `n` block buffers of `state.buffers` at once (a copy inside the daemon holds one to read
/// and one to write: taken together, so that copies waiting for their second one cannot
/// hold every first one), waited for at most `state.buffer_timeout`.
pub async fn take_buffers(
    state: &AppState,
    n: u32,
) -> Result<tokio::sync::OwnedSemaphorePermit, NoBuffer> {
    let wait = state.buffers.clone().acquire_many_owned(n);
    match tokio::time::timeout(state.buffer_timeout, wait).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(NoBuffer::ShuttingDown),
        Err(_) => Err(NoBuffer::Busy),
    }
}

/// More block buffers for writer `w` (up to [`blockcache::FileWriter::overlap_blocks`] in
/// all), if no other request holds a buffer and more than three quarters of them would
/// stay free: `w` then hashes and writes completed blocks in tasks of their own while it
/// takes the next ones ([`blockcache::FileWriter::overlap_writes`]), so that a lone writer
/// uses two cores. Where other requests are under way the cores have work already (with 8
/// writers at 1 MiB blocks, overlapping ones wrote 5 % slower), and a busy daemon's
/// writers keep one block each, so new requests are hardly kept waiting. Nobody waits for
/// these buffers, and `w` holds them until its batches are written
/// ([`blockcache::FileWriter::hold_while_writing`]): those of a request dropped half-way
/// still count while its last batches land.
pub fn overlap_if_free(state: &AppState, w: &mut blockcache::FileWriter) {
    let Ok(more) = u32::try_from(w.overlap_blocks().saturating_sub(1)) else {
        return;
    };
    if state.buffers.available_permits() + 1 < state.buffer_count
        || state
            .buffers
            .available_permits()
            .saturating_sub(more as usize)
            * 4
            <= state.buffer_count * 3
    {
        return;
    }
    let Ok(more) = state.buffers.clone().try_acquire_many_owned(more) else {
        return;
    };
    w.overlap_writes();
    // Given back once the batches are written, even if the request is dropped first.
    w.hold_while_writing(more);
}

/// A block buffer ([`take_buffer`]): past `--buffer-timeout`, a 503 with `Retry-After`.
async fn buffer(state: &AppState) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
    match take_buffer(state).await {
        Ok(permit) => Ok(permit),
        Err(NoBuffer::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down",
        )),
        Err(NoBuffer::Busy) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "no request buffer came free within {} (--buffer-timeout): other requests hold all of --buffer-memory; retry later",
                    humantime::format_duration(state.buffer_timeout)
                ),
            );
            e.retry_after = Some(BUSY_RETRY_AFTER);
            Err(e)
        }
    }
}

type Shared = Arc<AppState>;

/// An error response: `{"error": code, "message": text}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        r
    }
}

/// Whether an I/O error somewhere in the causes of `e` says that a disk is full (or a
/// quota exhausted).
fn disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(cause) = next {
        // The engine keeps its I/O errors in an `Arc`, which is an error of its own.
        let io = cause.downcast_ref::<std::io::Error>().or_else(|| {
            cause
                .downcast_ref::<Arc<std::io::Error>>()
                .map(|a| a.as_ref())
        });
        if let Some(io) = io
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        next = cause.source();
    }
    false
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            // A full cache or store disk, whatever the operation that found it.
            // (`is_storage_full` also knows the database's SQLITE_FULL.)
            _ if disk_full(&e) || e.is_storage_full() => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            Error::InvalidName { .. } => (StatusCode::BAD_REQUEST, "bad_name"),
            Error::InvalidAttrs(_) => (StatusCode::BAD_REQUEST, "bad_attributes"),
            Error::Exists { .. } => (StatusCode::PRECONDITION_FAILED, "exists"),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::FileTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            Error::DirtyBudgetFull { waited, .. } => {
                // Expected while the store is down: the client retries; nothing to log.
                let mut answer = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    crate::error::chain(&e),
                );
                answer.retry_after = Some(waited.as_secs().max(1));
                return answer;
            }
            Error::InvalidKey { .. } | Error::OutOfRange { .. } => {
                (StatusCode::BAD_REQUEST, "out_of_range")
            }
            // The store failed: an upload, a download, or work of no single block (shipping
            // the metadata, a deletion, a durability barrier).
            Error::Upload { .. } | Error::Download { .. } | Error::Store { .. } => {
                (StatusCode::BAD_GATEWAY, "store_error")
            }
            Error::Corrupted { .. } | Error::Lost { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "data_error")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        // The message is the error and its causes, which never hold secrets.
        let message = crate::error::chain(&e);
        if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        }
        Self::new(status, code, message)
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The router, with auth, draining, metrics and JSON errors for unknown routes and methods.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/files", get(list_files))
        .route("/v1/files/", get(list_files))
        .route("/v1/files/{*name}", any(file_route))
        .route("/v1/flush", post(flush))
        .route("/v1/check", post(check))
        .route("/v1/cache/drop", post(drop_cache))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(record))
        .layer(middleware::from_fn(
            crate::connections::close_after_empty_expect,
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Counts requests by route, method and status, and times them.
async fn record(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let code = response.status().as_u16();
    let class = format!("{}xx", code / 100);
    metrics::counter!("blockcache_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => code.to_string()).increment(1);
    metrics::histogram!("blockcache_http_request_duration_seconds", "route" => route, "method" => method, "status" => class)
        .record(started.elapsed().as_secs_f64());
    response
}

/// 503 while draining; 401 without the right token (but for `/healthz`).
async fn guard(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this route needs an Authorization: Bearer token (the daemon's --auth-token; clients take it from --auth-token or BLOCKCACHE_AUTH_TOKEN)",
                )
                .into_response();
            }
            Some(g) if !constant_time_eq(g.as_bytes(), token.expose().as_bytes()) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "wrong_token",
                    "the bearer token is not the daemon's --auth-token",
                )
                .into_response();
            }
            Some(_) => {}
        }
    }
    if state.draining.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down",
        )
        .into_response();
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Query parameters, checked against the allowed names.
struct Params(HashMap<String, String>);

impl Params {
    fn parse(uri: &Uri, allowed: &[&str]) -> ApiResult<Self> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            if !allowed.contains(&k.as_ref()) {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!(
                        "unknown query parameter {k:?}; allowed here: {}",
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!("query parameter {k:?} given twice"),
                ));
            }
        }
        Ok(Self(map))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn u64(&self, k: &str) -> ApiResult<Option<u64>> {
        self.get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(
                        "bad_parameter",
                        format!("{k} must be a non-negative integer, not {v:?}"),
                    )
                })
            })
            .transpose()
    }

    /// A switch: absent, `0` or `false` is off; `1` or `true` is on.
    fn flag(&self, k: &str) -> ApiResult<bool> {
        match self.get(k) {
            None | Some("0" | "false") => Ok(false),
            Some("1" | "true") => Ok(true),
            Some(v) => Err(ApiError::bad_request(
                "bad_parameter",
                format!("{k} must be 1, true, 0 or false, not {v:?}"),
            )),
        }
    }

    fn durability(&self, default: Durability) -> ApiResult<Durability> {
        match self.get("durability") {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e: String| ApiError::bad_request("bad_parameter", e)),
        }
    }
}

fn meta_json(m: &FileMeta) -> serde_json::Value {
    json!({
        "name": m.name,
        "size": m.size,
        "mtime": humantime::format_rfc3339_millis(m.mtime).to_string(),
        "etag": m.etag(),
        "version": m.version,
    })
}

fn with_meta_headers(mut r: Response, m: &FileMeta) -> Response {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&m.etag()) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(m.mtime)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    r
}

/// Splits the raw path after `/v1/files/` into a percent-decoded name and whether it asks for
/// the status (`.../status`). A name whose last segment is `status` is read by encoding its
/// last `/` as `%2F`.
fn file_target(uri: &Uri) -> ApiResult<(String, bool)> {
    let raw = uri.path().strip_prefix("/v1/files/").unwrap_or_default();
    let (raw, status) = match raw.strip_suffix("/status") {
        Some(r) => (r, true),
        None => (raw, false),
    };
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("bad_name", "the file name is not UTF-8"))?
        .into_owned();
    blockcache::validate_name(&name)?;
    Ok((name, status))
}

async fn file_route(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let mut body = RequestBody::new(body, &headers);
    let result = file_request(&state, &method, &uri, &headers, &mut body).await;
    if result.is_err() {
        // The client may still be sending: read on (bounded) so that it gets the answer
        // rather than a reset connection.
        body.drain().await;
    }
    result
}

async fn file_request(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &mut RequestBody,
) -> ApiResult {
    let (name, status) = file_target(uri)?;
    if status {
        return match *method {
            Method::GET | Method::HEAD => file_status(state, &name, uri).await,
            _ => Err(method_not_allowed()),
        };
    }
    match *method {
        Method::GET | Method::HEAD => {
            get_file(state, &name, uri, headers, method == Method::HEAD).await
        }
        Method::PUT => put_file(state, &name, uri, headers, body).await,
        Method::PATCH => patch_file(state, &name, uri, headers, body).await,
        Method::POST => truncate_file(state, &name, uri).await,
        Method::DELETE => delete_file(state, &name, uri).await,
        _ => Err(method_not_allowed()),
    }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

fn content_length(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("bad_header", "Content-Length is not a number")
                })
        })
        .transpose()
}

fn too_large(name: &str, size: u64, max: u64) -> ApiError {
    Error::FileTooLarge {
        name: name.to_owned(),
        size,
        max,
    }
    .into()
}

/// Bytes of a refused request body read and dropped before answering, so that a client
/// still sending gets the answer instead of a reset connection.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// Longest time spent reading a refused request body before answering.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a refused request body, up to [`DRAIN_LIMIT`] bytes and
/// [`DRAIN_TIME`], so that a client still sending gets the answer rather than a reset.
pub async fn drain<S, E>(body: &mut S)
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    let drain = async {
        let mut left = DRAIN_LIMIT;
        while let Some(Ok(chunk)) = body.next().await {
            left = left.saturating_sub(chunk.len());
            if left == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// The body of a request, read chunk by chunk.
struct RequestBody {
    stream: axum::body::BodyDataStream,
    /// Whether anything was asked of it (which, for a client that waits for
    /// `100 Continue`, made hyper send it).
    touched: bool,
    /// Whether the client waits for `100 Continue` before it sends the body.
    expects_continue: bool,
}

impl RequestBody {
    fn new(body: Body, headers: &HeaderMap) -> Self {
        Self {
            stream: body.into_data_stream(),
            touched: false,
            expects_continue: headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        }
    }

    /// The next chunk: `None` at the end; a body that stalled for `--body-timeout` is a
    /// 408, one that broke off a 400.
    async fn next(&mut self) -> Option<ApiResult<bytes::Bytes>> {
        self.touched = true;
        let chunk = self.stream.next().await?;
        Some(chunk.map_err(|e| {
            let e = e.into_inner();
            if e.is::<tower_http::timeout::TimeoutError>() {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body sent nothing for --body-timeout",
                )
            } else {
                ApiError::bad_request("bad_body", format!("reading the request body failed: {e}"))
            }
        }))
    }

    /// Reads and drops what is left of the body, up to [`DRAIN_LIMIT`] bytes and
    /// [`DRAIN_TIME`]. A client that waits for `100 Continue` and was not told to send
    /// has nothing to drain.
    async fn drain(&mut self) {
        if self.expects_continue && !self.touched {
            return;
        }
        drain(&mut self.stream).await;
    }
}

/// Copies the request body into `w`, block by block as it arrives.
async fn pour(w: &mut blockcache::FileWriter, body: &mut RequestBody) -> ApiResult<()> {
    while let Some(chunk) = body.next().await {
        w.write(&chunk?).await?;
    }
    Ok(())
}

async fn put_file(
    state: &AppState,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &mut RequestBody,
) -> ApiResult {
    let params = Params::parse(uri, &["durability"])?;
    let durability = params.durability(state.durability)?;
    let max = state.ns.max_file_size();
    if let Some(len) = content_length(headers)?
        && len > max
    {
        return Err(too_large(name, len, max));
    }
    let _buffer = buffer(state).await?;
    let mut w = state.ns.create(name).await?;
    if durability != Durability::None {
        w.write_behind();
    }
    overlap_if_free(state, &mut w);
    if let Err(e) = pour(&mut w, body).await {
        // Nothing of the refused body stays behind once the client has the answer.
        w.abandon().await;
        return Err(e);
    }
    let meta = w.finish(durability).await?;
    let status = if meta.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_meta_headers(
        (status, axum::Json(meta_json(&meta))).into_response(),
        &meta,
    ))
}

async fn patch_file(
    state: &AppState,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &mut RequestBody,
) -> ApiResult {
    let params = Params::parse(uri, &["offset", "durability"])?;
    let durability = params.durability(state.durability)?;
    let offset = params
        .u64("offset")?
        .ok_or_else(|| ApiError::bad_request("bad_parameter", "PATCH needs ?offset=N"))?;
    let max = state.ns.max_file_size();
    if let Some(len) = content_length(headers)?
        && offset.saturating_add(len) > max
    {
        return Err(too_large(name, offset.saturating_add(len), max));
    }
    let _buffer = buffer(state).await?;
    let mut w = state.ns.patch(name, offset).await?;
    if durability != Durability::None {
        w.write_behind();
    }
    overlap_if_free(state, &mut w);
    pour(&mut w, body).await?;
    let meta = w.finish(durability).await?;
    Ok(with_meta_headers(
        axum::Json(meta_json(&meta)).into_response(),
        &meta,
    ))
}

async fn truncate_file(state: &AppState, name: &str, uri: &Uri) -> ApiResult {
    let params = Params::parse(uri, &["truncate", "durability"])?;
    let durability = params.durability(state.durability)?;
    let size = params.u64("truncate")?.ok_or_else(|| {
        ApiError::bad_request("bad_parameter", "POST on a file needs ?truncate=N")
    })?;
    let meta = state.ns.truncate(name, size, durability).await?;
    Ok(with_meta_headers(
        axum::Json(meta_json(&meta)).into_response(),
        &meta,
    ))
}

async fn delete_file(state: &AppState, name: &str, uri: &Uri) -> ApiResult {
    Params::parse(uri, &[])?;
    state.ns.delete(name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Most missing objects listed in a verified status.
const MAX_MISSING_LISTED: usize = 100;

async fn file_status(state: &AppState, name: &str, uri: &Uri) -> ApiResult {
    let params = Params::parse(uri, &["verify"])?;
    let verify = params.flag("verify")?;
    let s = state.ns.status(name).await?;
    let mut answer = json!({
        "file": meta_json(&s.meta),
        "blocks": s.blocks,
        "cached": s.cached,
        "dirty": s.dirty,
        "uploading": s.uploading,
        "mapped": s.mapped,
        "uploaded": s.uploaded,
        "in_store": s.in_store,
    });
    if verify {
        // What the store really holds: the metadata's word is not taken for it.
        let check = state.ns.verify_store(name).await?;
        answer["in_store"] = json!(s.in_store && check.missing.is_empty());
        answer["verified"] = json!({
            "checked": check.checked,
            "missing": check.missing.len(),
            "missing_objects": check.missing.iter().take(MAX_MISSING_LISTED).map(|m| json!({
                "block": m.blockno,
                "object": m.object,
                "key": m.key,
                "found_size": m.found_size,
            })).collect::<Vec<_>>(),
        });
    }
    Ok(axum::Json(answer).into_response())
}

/// A single byte range of a file of `size` bytes: `Ok(None)` for no `Range` header.
fn parse_range(headers: &HeaderMap, size: u64) -> ApiResult<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "bad_range",
            "Range must be one range: bytes=A-B, bytes=A- or bytes=-N",
        )
    };
    let v = v.to_str().map_err(|_| bad())?.trim();
    let spec = v.strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(ApiError::bad_request(
            "bad_range",
            "only a single range is supported",
        ));
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let unsatisfiable = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!("the range {v} lies outside the file of {size} bytes"),
        )
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(bad()),
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(unsatisfiable());
            }
            (size.saturating_sub(n), size)
        }
        (false, true) => (num(a)?, size),
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            if e < s {
                return Err(bad());
            }
            (s, e.saturating_add(1).min(size))
        }
    };
    if start >= size {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == "*" || t == etag)
        })
}

async fn get_file(
    state: &AppState,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
    head: bool,
) -> ApiResult {
    Params::parse(uri, &[])?;
    let reader = state.ns.open_read(name).await?;
    let meta = reader.meta().clone();
    if etag_matches(headers, &meta.etag()) {
        return Ok(with_meta_headers(
            StatusCode::NOT_MODIFIED.into_response(),
            &meta,
        ));
    }
    let range = parse_range(headers, meta.size);
    let range = match range {
        Err(e) if e.status == StatusCode::RANGE_NOT_SATISFIABLE => {
            let mut r = e.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", meta.size)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
        other => other?,
    };
    let (start, end) = range.unwrap_or((0, meta.size));
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let body = if head || start == end {
        Body::empty()
    } else {
        // The first piece is read before the status line is sent, so that a block that
        // cannot be read (a missing or corrupted object, a store that is down) is an error
        // status with its JSON body, not a 200 whose connection is cut.
        let first = piece_len(reader.block_size(), start, end);
        let permit = buffer(state).await?;
        let bytes = reader.read(start, first).await?;
        let reader = (start + (first as u64) < end).then_some(reader);
        stream_body(reader, (bytes, permit), start, end, state.buffers.clone())
    };
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes");
    if range.is_some() {
        r = r.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", end - 1, meta.size),
        );
    }
    let r = r
        .body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(with_meta_headers(r, &meta))
}

/// The length of the piece of a response that starts at `pos`: up to the end of its block,
/// at most up to `end`.
fn piece_len(block_size: u64, pos: u64, end: u64) -> usize {
    (block_size - pos % block_size).min(end - pos) as usize
}

/// Streams bytes `start..end` of a file: `first`, the piece at `start` already read with its
/// permit, then one block-aligned piece at a time, reading a few blocks ahead (memory: at
/// most `READ_AHEAD` blocks per request, each holding a permit of `buffers` from its read
/// until it is handed to the connection). `reader` is `None` when `first` is all of it.
fn stream_body(
    reader: Option<FileReader>,
    first: (bytes::Bytes, tokio::sync::OwnedSemaphorePermit),
    start: u64,
    end: u64,
    buffers: Arc<tokio::sync::Semaphore>,
) -> Body {
    let head = futures::stream::once(async move { Ok(first) });
    let Some(reader) = reader else {
        return Body::from_stream(
            head.map_ok(|(bytes, _permit)| bytes)
                .map_err(|e: blockcache::Error| std::io::Error::other(e)),
        );
    };
    let bs = reader.block_size();
    let second = start + piece_len(bs, start, end) as u64;
    // The last piece takes the reader: once it is read, the file is unpinned, before the
    // client has its last bytes (a replaced version's removal then starts no later).
    let mut reader = Some(Arc::new(reader));
    // Block-aligned pieces, generated as they are needed (no list proportional to the file).
    let pieces = std::iter::successors(Some(second), move |&p| Some(p + (bs - p % bs)))
        .take_while(move |&p| p < end)
        .map(move |p| (p, piece_len(bs, p, end)));
    // Permits are taken in piece order (`then` runs one at a time), so a request's held
    // permits are always for its next pieces and its first one can be read: requests waiting
    // for permits cannot deadlock each other.
    let rest = futures::stream::iter(pieces)
        .then(move |(pos, n)| {
            let buffers = buffers.clone();
            async move { (pos, n, buffers.acquire_owned().await) }
        })
        .map(move |(pos, n, permit)| {
            let reader = if pos + n as u64 >= end {
                reader.take()
            } else {
                reader.clone()
            };
            async move {
                let reader = reader.expect("no piece after the last");
                let permit = permit.map_err(|_| blockcache::Error::ShuttingDown)?;
                let read = reader.read(pos, n).await;
                drop(reader);
                read.map(|b| (b, permit))
            }
        })
        .buffered(READ_AHEAD);
    let stream = head
        .chain(rest)
        .map_ok(|(bytes, _permit)| bytes)
        .map_err(|e| {
            tracing::error!(error = %e, "reading a file for a response failed");
            std::io::Error::other(e)
        });
    Body::from_stream(stream)
}

async fn list_files(State(state): State<Shared>, uri: Uri) -> ApiResult {
    let params = Params::parse(&uri, &["prefix", "limit", "after"])?;
    let prefix = params.get("prefix").unwrap_or("");
    if prefix.len() > blockcache::MAX_NAME_LEN || prefix.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "bad_parameter",
            "prefix must be at most 1024 bytes without control characters",
        ));
    }
    let limit = match params.u64("limit")? {
        None => 1000,
        Some(l) if (1..=u64::from(MAX_LIST_LIMIT)).contains(&l) => l as u32,
        Some(l) => {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!("limit must be between 1 and {MAX_LIST_LIMIT}, not {l}"),
            ));
        }
    };
    let files = state.ns.list(prefix, params.get("after"), limit).await?;
    let next = (files.len() == limit as usize)
        .then(|| files.last().map(|m| m.name.clone()))
        .flatten();
    Ok(axum::Json(json!({
        "files": files.iter().map(meta_json).collect::<Vec<_>>(),
        "next": next,
    }))
    .into_response())
}

async fn flush(State(state): State<Shared>, uri: Uri) -> ApiResult {
    let params = Params::parse(&uri, &["name"])?;
    let started = Instant::now();
    match params.get("name") {
        Some(name) => state.ns.flush_file(name).await?,
        None => state.ns.flush().await?,
    }
    Ok(
        axum::Json(json!({"flushed": true, "seconds": started.elapsed().as_secs_f64()}))
            .into_response(),
    )
}

/// `POST /v1/check[?repair=1][&verify_data=1][&grace=DURATION][&verify_rate=BYTES]`: the
/// report, 200 whether or not the volume is consistent (`consistent` says).
async fn check(State(state): State<Shared>, uri: Uri) -> ApiResult {
    let params = Params::parse(&uri, &["repair", "verify_data", "grace", "verify_rate"])?;
    let mut opts = blockcache::CheckOptions {
        repair: params.flag("repair")?,
        verify_data: params.flag("verify_data")?,
        ..blockcache::CheckOptions::default()
    };
    if let Some(g) = params.get("grace") {
        opts.grace = parse_grace(g).map_err(|e| ApiError::bad_request("bad_parameter", e))?;
    }
    match params.u64("verify_rate")? {
        Some(0) => {
            return Err(ApiError::bad_request(
                "bad_parameter",
                "verify_rate must be at least 1 byte per second",
            ));
        }
        Some(rate) => opts.verify_rate = rate,
        None => {}
    }
    let report = state.ns.cache().check(opts).await?;
    if !report.is_consistent() {
        tracing::warn!(
            problems = report.problems(),
            unfixed = report.unfixed(),
            "check found the volume inconsistent"
        );
    }
    Ok(axum::Json(report).into_response())
}

/// A grace period: a duration ("1h", "30s") or a number of seconds ("0").
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid grace period {s:?} ({e}); write a duration such as 1h, 10min, 0")
    })
}

async fn drop_cache(State(state): State<Shared>, uri: Uri) -> ApiResult {
    Params::parse(&uri, &[])?;
    state.ns.cache().clear().await?;
    stats(State(state), uri).await
}

fn secs(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64())
}

/// 200 `ok` while the daemon can write (its database and its cache directory), else 503
/// with what fails: a full or read-only disk, a database it cannot write.
async fn healthz(State(state): State<Shared>) -> Response {
    match state.ns.cache().check_health().await {
        Ok(()) => "ok\n".into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            crate::error::chain(&e),
        )
        .into_response(),
    }
}

async fn stats(State(state): State<Shared>, uri: Uri) -> ApiResult {
    Params::parse(&uri, &[])?;
    let u = state.ns.cache().usage().await?;
    let limits = u.limits;
    // Ratios to four decimals: more digits are noise.
    let round = |r: f64| (r * 10_000.0).round() / 10_000.0;
    let ratio = if u.unique_bytes == 0 {
        1.0
    } else {
        round(u.logical_bytes as f64 / u.unique_bytes as f64)
    };
    let compression_ratio = if u.stored_bytes == 0 {
        1.0
    } else {
        round(u.unique_bytes as f64 / u.stored_bytes as f64)
    };
    let (epoch, fenced) = state.ns.cache().lease_state().unwrap_or((0, None));
    let m = state.ns.cache().metadata_status().await?;
    Ok(axum::Json(json!({
        "lease": {"epoch": epoch, "writing": fenced.is_none(), "not_writing_because": fenced},
        "metadata": {
            "generation": m.generation, "deltas": m.deltas,
            "pending_changes": m.pending_changes, "deferred_changes": m.deferred,
            "lag_seconds": secs(m.lag), "objects_written": m.objects_written,
            "bytes_written": m.bytes_written, "last_round_bytes": m.last_round_bytes,
            "ship_seconds": m.ship_time.as_secs_f64(), "last_error": m.last_error,
        },
        "cache": {"bytes": u.bytes, "entries": u.entries, "max_bytes": limits.max_bytes, "max_entries": limits.max_entries},
        "dirty": {"bytes": u.dirty_bytes, "entries": u.dirty_entries, "max_bytes": limits.max_dirty_bytes, "oldest_age_seconds": secs(u.oldest_dirty_age)},
        "uploads_in_flight": u.uploads_in_flight,
        "upload_concurrency": u.upload_concurrency,
        "pending_removals": u.pending_removals,
        "requests": {"buffers": state.buffer_count, "buffers_free": state.buffers.available_permits()},
        "store_up": u.store_up,
        "store": {"logical_bytes": u.logical_bytes, "unique_bytes": u.unique_bytes, "stored_bytes": u.stored_bytes, "dedup_savings_bytes": u.dedup_savings, "dedup_ratio": ratio, "compression_ratio": compression_ratio},
        "counters": {
            "hits": u.hits, "misses": u.misses,
            "uploads": u.uploads, "upload_bytes": u.upload_bytes, "upload_errors": u.upload_errors,
            "downloads": u.downloads, "download_bytes": u.download_bytes, "download_errors": u.download_errors, "download_dedup_hits": u.download_dedup_hits, "prefetches": u.prefetches,
            "dedup_hits": u.dedup_hits, "deletes": u.deletes, "delete_errors": u.delete_errors,
        },
    }))
    .into_response())
}

async fn prometheus(State(state): State<Shared>, uri: Uri) -> ApiResult {
    Params::parse(&uri, &[])?;
    let u = state.ns.cache().usage().await?;
    let m = state.ns.cache().metadata_status().await?;
    let limits = u.limits;
    let gauges = [
        (
            "blockcache_metadata_generation",
            m.generation.unwrap_or(0) as f64,
        ),
        (
            "blockcache_metadata_pending_changes",
            m.pending_changes as f64,
        ),
        ("blockcache_metadata_lag_seconds", secs(m.lag)),
        ("blockcache_cache_bytes", u.bytes as f64),
        ("blockcache_cache_entries", u.entries as f64),
        ("blockcache_cache_max_bytes", limits.max_bytes as f64),
        ("blockcache_cache_max_entries", limits.max_entries as f64),
        ("blockcache_dirty_bytes", u.dirty_bytes as f64),
        ("blockcache_dirty_entries", u.dirty_entries as f64),
        ("blockcache_dirty_max_bytes", limits.max_dirty_bytes as f64),
        (
            "blockcache_oldest_dirty_age_seconds",
            secs(u.oldest_dirty_age),
        ),
        ("blockcache_uploads_in_flight", u.uploads_in_flight as f64),
        ("blockcache_upload_concurrency", u.upload_concurrency as f64),
        ("blockcache_pending_removals", u.pending_removals as f64),
        ("blockcache_http_buffers", state.buffer_count as f64),
        (
            "blockcache_http_buffers_free",
            state.buffers.available_permits() as f64,
        ),
        ("blockcache_store_logical_bytes", u.logical_bytes as f64),
        ("blockcache_store_unique_bytes", u.unique_bytes as f64),
        ("blockcache_store_stored_bytes", u.stored_bytes as f64),
        ("blockcache_store_up", if u.store_up { 1.0 } else { 0.0 }),
        (
            "blockcache_lease_epoch",
            state
                .ns
                .cache()
                .lease_state()
                .map_or(0.0, |(e, _)| e as f64),
        ),
        (
            "blockcache_lease_writing",
            match state.ns.cache().lease_state() {
                Some((_, None)) => 1.0,
                _ => 0.0,
            },
        ),
    ];
    for (name, v) in gauges {
        metrics::gauge!(name).set(v);
    }
    let counters = [
        ("blockcache_cache_hits_total", u.hits),
        ("blockcache_cache_misses_total", u.misses),
        ("blockcache_uploads_total", u.uploads),
        ("blockcache_upload_bytes_total", u.upload_bytes),
        ("blockcache_upload_errors_total", u.upload_errors),
        ("blockcache_downloads_total", u.downloads),
        ("blockcache_download_bytes_total", u.download_bytes),
        ("blockcache_download_errors_total", u.download_errors),
        ("blockcache_dedup_hits_total", u.dedup_hits),
        (
            "blockcache_download_dedup_hits_total",
            u.download_dedup_hits,
        ),
        ("blockcache_prefetches_total", u.prefetches),
        ("blockcache_deletes_total", u.deletes),
        ("blockcache_delete_errors_total", u.delete_errors),
        (
            "blockcache_metadata_objects_written_total",
            m.objects_written,
        ),
        ("blockcache_metadata_written_bytes_total", m.bytes_written),
    ];
    for (name, v) in counters {
        metrics::counter!(name).absolute(v);
    }
    state.process.collect();
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response())
}
