//! Object store access for blockcache.
//!
//! This crate owns everything that touches the object store: turning a URL into a store,
//! naming objects, retrying whole operations with backoff, bulk deletion, and the
//! fault-injecting wrapper used by tests ([`faulty::FaultyStore`]).
//!
//! Objects are immutable and their keys are never reused: object `id` lives at
//! `<prefix>/data/<id mod 256 in hex>/<id>` and is written once, create-only where the
//! store supports it ([`object_store::PutMode::Create`]); an upload that finds its key taken
//! succeeds only if the object there holds the same block. Object ids carry the epoch of
//! the writer lease ([`lease`]), so two writers of one volume never use the same key.
//!
//! # The store's layout
//! - `<prefix>/volume`: the volume record ([`volume`]), written once.
//! - `<prefix>/lease/<epoch>`: the writer lease ([`lease`]).
//! - `<prefix>/clock/<holder>`: scratch objects that tell the store's clock.
//! - `<prefix>/data/..`: the objects, each one block: plain, or framed ([`format`](mod@format): a
//!   header, compression, authenticated encryption). [`Backend::put`] and
//!   [`Backend::get`] are the only places where stored bytes are produced or consumed.

mod check;
pub mod faulty;
pub mod format;
mod health;
pub mod lease;
pub mod meta;
mod retry;
pub mod volume;

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use tokio_util::sync::CancellationToken;

pub use check::Unusable;
pub use retry::RetryPolicy;

/// Errors of the object store layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL could not be understood or the store could not be set up.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given (credentials are never part of our URLs).
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The store cannot be used as it is configured (found when it is opened or by
    /// [`Backend::check`]); the message says what to change.
    #[error(transparent)]
    Unusable(Box<Unusable>),
    /// The object does not exist in the store.
    #[error("object {key} not found in the store")]
    NotFound {
        /// The object key.
        key: String,
    },
    /// A request to the store failed.
    #[error("{op} of object {key} failed")]
    Store {
        /// The operation: "upload", "download", "lookup", "delete" or "list".
        op: &'static str,
        /// The object key (or prefix for listings).
        key: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// An operation and its retries did not succeed within the deadline
    /// ([`RetryPolicy::deadline`]).
    #[error("{what} did not succeed within {after:.1?} ({attempts} attempts)")]
    TimedOut {
        /// The operation, as a noun phrase ("upload of object data/01/1").
        what: String,
        /// How long it ran.
        after: std::time::Duration,
        /// Attempts made, the abandoned one included.
        attempts: u32,
        /// The failure of the attempt before the abandoned one, if any.
        #[source]
        source: Option<Box<Error>>,
    },
    /// The store is down (an earlier operation ran out of retries) and this operation was
    /// not tried: operations fail at once until the next retry is due
    /// ([`RetryPolicy::probe_interval`]).
    #[error(
        "the object store has been unreachable for {down_for:.0?} (not tried again yet): {cause}"
    )]
    Unavailable {
        /// How long the store has been down.
        down_for: std::time::Duration,
        /// The failure that made it count as down, with its causes.
        cause: String,
    },
    /// Objects written to a local-directory store could not be made durable (fsync or
    /// syncfs).
    #[error("making the objects in the store directory durable failed")]
    NotDurable {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The operation was abandoned because the engine is shutting down.
    #[error("cancelled by shutdown")]
    Cancelled,
    /// A stored object could not be decoded: not an object of this volume, altered,
    /// truncated, or a wrong key.
    #[error("object {key} in the store cannot be read: {source}")]
    Format {
        /// The object key.
        key: String,
        /// What is wrong with it.
        #[source]
        source: format::FormatError,
    },
    /// This process may not write to the store: its lease lapsed or a newer writer took it.
    #[error("not writing to the store (lease epoch {epoch}): {reason}")]
    Fenced {
        /// The epoch this process holds (or held).
        epoch: u64,
        /// Why, and what happens next.
        reason: String,
        /// A newer writer holds the lease: writes never resume in this process.
        permanent: bool,
    },
    /// Another process holds the volume's lease.
    #[error("{0}")]
    LeaseHeld(Box<lease::HeldBy>),
    /// This database is an out-of-date copy: another copy of the volume's metadata took the
    /// lease after it (the message says what to do).
    #[error("{0}")]
    StaleCopy(String),
    /// Other processes kept taking the lease's next epoch first.
    #[error(
        "the volume's lease changed hands repeatedly while this process tried to take it; try again"
    )]
    LeaseContended,
    /// A record of the volume (its identity, its lease) could not be read.
    #[error("{key} in the store is not a valid blockcache record: {reason}")]
    BadRecord {
        /// The object key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A create-only upload found its key taken by other content: another writer used this
    /// volume's object key.
    #[error(
        "object {key} already exists in the store with other content: another writer used this key; nothing was overwritten"
    )]
    Collision {
        /// The object key.
        key: String,
    },
    /// The directory of a `file://` store is gone or was replaced since it was opened (an
    /// unmounted file system, a renamed directory): nothing is written under its path.
    #[error(
        "the store directory {path} {what}; is its file system mounted? Nothing was written there"
    )]
    StoreDirChanged {
        /// The store directory.
        path: std::path::PathBuf,
        /// What was found.
        what: String,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store { source, .. } => transient_store_error(source),
            Self::TimedOut { .. } | Self::Unavailable { .. } | Self::NotDurable { .. } => true,
            Self::Fenced { permanent, .. } => !permanent,
            Self::InvalidUrl { .. } | Self::Unusable(_) | Self::NotFound { .. } => false,
            Self::LeaseHeld(_) | Self::LeaseContended | Self::BadRecord { .. } => false,
            Self::StaleCopy(_) => false,
            Self::Collision { .. } | Self::StoreDirChanged { .. } | Self::Format { .. } => false,
            Self::Cancelled => false,
        }
    }

    /// Whether the operation stopped because of shutdown.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled)
    }

    /// Whether the store refuses every request, not one object: an upload finds no bucket,
    /// or access is denied.
    fn refuses_everything(&self) -> bool {
        use object_store::Error as E;
        matches!(
            self,
            Self::Store {
                op: "upload",
                source: E::NotFound { .. },
                ..
            } | Self::Store {
                source: E::PermissionDenied { .. } | E::Unauthenticated { .. },
                ..
            }
        )
    }

    /// Whether the store answered (refused, or had no such object): it is reachable.
    fn is_answer(&self) -> bool {
        use object_store::Error as E;
        match self {
            Self::NotFound { .. } => true,
            Self::Store { source, .. } => matches!(
                source,
                E::NotFound { .. }
                    | E::AlreadyExists { .. }
                    | E::Precondition { .. }
                    | E::NotModified { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
            ),
            _ => false,
        }
    }
}

/// Whether a failed request may succeed if tried again: not when the store answered with a
/// refusal (a typed status: not found, denied, ...), nor when the request could not even be
/// made (object_store's HTTP error kinds `Decode` and `Unknown`, such as a URL scheme the
/// client refuses); connection failures, timeouts, interrupted requests and other errors
/// (server errors, throttling) may.
fn transient_store_error(source: &object_store::Error) -> bool {
    use object_store::Error as E;
    use object_store::client::HttpErrorKind as K;
    match source {
        E::NotFound { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => false,
        other => match http_error_kind(other) {
            Some(K::Connect | K::Request | K::Timeout | K::Interrupted) | None => true,
            Some(_) => false,
        },
    }
}

/// The kind of the HTTP failure under `error`, if a request failed without an answer.
fn http_error_kind(
    error: &(dyn std::error::Error + 'static),
) -> Option<object_store::client::HttpErrorKind> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            return Some(http.kind());
        }
        next = e.source();
    }
    None
}

/// `error` and its causes, `: `-separated; a cause whose text its parent already shows is
/// not repeated. For logs and messages.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut told = error.to_string();
    let mut parent = told.clone();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !parent.contains(&text) {
            told.push_str(": ");
            told.push_str(&text);
        }
        parent = text;
        next = cause.source();
    }
    told
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the objects of a volume are written and read: plain (the block itself) or framed
/// (a header, compression, encryption; see [`format`](mod@format)).
#[derive(Debug, Clone)]
pub struct StoreFormat {
    /// Encodes and decodes framed objects.
    pub codec: format::ObjectCodec,
    /// Whether new objects are plain (no header): the volume's format is
    /// [`volume::ObjectFormat::Plain`].
    pub plain: bool,
    /// Objects with an id below this are plain whatever the volume's format (adopted from
    /// before the volume had a record).
    pub plain_below: u64,
    /// The largest plaintext an object may hold (the block size): a header that claims
    /// more is refused before anything is allocated.
    pub max_block: u64,
}

impl StoreFormat {
    /// Plain objects only, as a store without a volume record holds them.
    pub fn plain() -> Self {
        Self {
            codec: format::ObjectCodec::new([0; 16], format::Compression::None, None),
            plain: true,
            plain_below: 0,
            max_block: 1 << 30,
        }
    }

    /// Whether object `id` is stored plain.
    pub fn is_plain(&self, id: u64) -> bool {
        self.plain || id < self.plain_below
    }
}

/// An object found by [`Backend::list_objects`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObject {
    /// The object id.
    pub id: u64,
    /// Its size in the store.
    pub size: u64,
    /// When the store last wrote it, by the store's clock.
    pub last_modified: std::time::SystemTime,
}

/// Access to one object store under one key prefix.
#[derive(Debug, Clone)]
pub struct Backend {
    store: Arc<dyn ObjectStore>,
    /// The directory of a `file://` store: its writes reach the disk only through
    /// [`Backend::make_durable`].
    local_root: Option<std::path::PathBuf>,
    /// Set once a hard link into the local store failed for a reason that will not change
    /// (another file system, links not supported): later objects are copied.
    links_refused: Arc<std::sync::atomic::AtomicBool>,
    prefix: Path,
    format: Arc<StoreFormat>,
    retry: RetryPolicy,
    cancel: CancellationToken,
    /// Whether the store answers, shared by every clone.
    health: health::Health,
    /// What the start-up check needs to know of a cloud store.
    setup: Arc<check::Setup>,
    /// Faults injected into the durability barriers of a local-directory store (tests).
    faults: Option<faulty::Faults>,
    /// The writer lease: every write to the store checks it first.
    lease: Option<lease::Lease>,
    /// Set once the store refused a conditional (create-only) PUT as not implemented: later
    /// creates check for the key first (logged once).
    no_conditional_put: Arc<std::sync::atomic::AtomicBool>,
    /// The identity (device, inode) of a `file://` store's directory when it was opened;
    /// writes check it is still the same directory.
    root_identity: Option<(u64, u64)>,
    /// Whether opening created the `file://` store's directory (it did not exist).
    root_created: bool,
}

impl Backend {
    /// Opens the store named by `url`.
    ///
    /// Supported: `file:///absolute/dir` (created if missing), `memory://`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`. Cloud credentials
    /// come from the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::open(url, RetryPolicy::default().deadline)
    }

    /// [`Backend::from_url`] with `timeout` as the deadline of each operation, its retries
    /// included ([`RetryPolicy::deadline`]): the HTTP clients of cloud stores make one
    /// request per attempt (object_store's own retries are off, so that this backend's
    /// policy is the only retry layer), each within `timeout`, and connect within 5 s at
    /// most. A setting that cannot work is refused here ([`Error::Unusable`]): an
    /// `http://` S3 endpoint without `AWS_ALLOW_HTTP=true`, or no S3 credentials while the
    /// instance metadata service is disabled.
    pub fn open(url: &str, timeout: std::time::Duration) -> Result<Self> {
        let (store, prefix, local_root, setup) = open_store(url, timeout)?;
        let mut backend = Self::new(store, prefix);
        if let Some(root) = &local_root {
            backend.root_created = setup.root_created;
            backend.root_identity = Some(
                dir_identity(root)
                    .map_err(|e| invalid(url, format!("cannot open {}: {e}", root.display())))?,
            );
        }
        backend.local_root = local_root;
        backend.setup = Arc::new(setup);
        backend.retry.deadline = timeout;
        backend.retry.probe_interval = backend.retry.probe_interval.min(timeout);
        Ok(backend)
    }

    /// Whether the store answered the last operation that reached it (it counts as down
    /// once an operation ran out of retries on transient errors, until one succeeds).
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// While the store is down: the failure that made it count as down, with its causes.
    pub fn down_cause(&self) -> Option<String> {
        self.health.cause()
    }

    /// [`Backend::down_cause`], or while the store still counts as up, why an attempt of an
    /// operation that is still retrying failed since the store last answered.
    pub fn failing_cause(&self) -> Option<String> {
        self.health.failing_cause()
    }

    /// Whether an operation would try the store now: it is up, or it is down and a retry
    /// is due. Background work waits while this is false.
    pub fn is_available(&self) -> bool {
        self.health.is_available()
    }

    /// Lets the next operations try a store that is down at once, instead of failing until
    /// the next retry is due (for work a user asked for).
    pub fn retry_now(&self) {
        self.health.retry_now();
    }

    /// The delay between retries of a store that is down ([`RetryPolicy::probe_interval`]).
    pub fn probe_interval(&self) -> std::time::Duration {
        self.retry.probe_interval
    }

    /// The deadline of one operation ([`RetryPolicy::deadline`]).
    pub fn timeout(&self) -> std::time::Duration {
        self.retry.deadline
    }

    /// The key of the marker object that [`Backend::check`] writes and [`Backend::probe`]
    /// reads: outside the objects' prefix, so listings of objects never see it.
    fn marker(&self) -> Path {
        self.prefix.clone().join("blockcache-probe")
    }

    /// Asks the store whether it answers (a HEAD of the marker object; "not found" is an
    /// answer), with retries within the deadline; updates [`Backend::is_up`].
    pub async fn probe(&self) -> Result<()> {
        let key = self.marker();
        let what = format!("probe of {key}");
        let result = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let key = &key;
                async move {
                    self.store
                        .head(key)
                        .await
                        .map(drop)
                        .map_err(|source| store_error("probe", key, source))
                }
            })
            .await;
        match result {
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// The start-up check: a cloud store's credentials (asked for first when they come from
    /// the instance metadata), then a write of the marker object under the prefix, within
    /// the deadline. A failure is told as what to change ([`Unusable`]): no credentials,
    /// no bucket, access denied, an `https://` endpoint that speaks plain HTTP, or no
    /// answer. Local stores need no check (opening created their directory).
    pub async fn check(&self) -> Result<()> {
        let setup = &self.setup;
        if !setup.cloud {
            return Ok(());
        }
        let url = || setup.url.clone();
        if let Some(credentials) = &setup.instance_credentials {
            let got = tokio::time::timeout(self.retry.deadline, credentials.get_credential()).await;
            let source = match got {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(Some(e)),
                Err(_) => Some(None),
            };
            if let Some(source) = source {
                return Err(Unusable::NoCredentials {
                    url: url(),
                    tried: "the environment, and the instance metadata service, which gave none",
                    source,
                }
                .into());
            }
        }
        let key = self.marker();
        let put = || async {
            self.store
                .put(&key, PutPayload::from_static(b"blockcache"))
                .await
                .map(drop)
                .map_err(|source| store_error("write", &key, source))
        };
        // One attempt first: a TLS handshake with a plain-HTTP server fails at once and
        // for good, which retries would only hide.
        let first = put().await;
        let result = match first {
            Ok(()) => Ok(()),
            Err(e) if e.is_transient() => {
                if let Some(endpoint) = &setup.endpoint
                    && check::is_connect_failure(&e)
                    && let Some(authority) = check::answers_plain_http(endpoint).await
                {
                    return Err(Unusable::TlsMismatch {
                        url: url(),
                        endpoint: endpoint.clone(),
                        authority,
                        source: Box::new(e),
                    }
                    .into());
                }
                let what = format!("write of {key}");
                self.retry.run(&what, &self.cancel, &self.health, put).await
            }
            Err(e) => Err(e),
        };
        let Err(e) = result else {
            self.health.answered();
            return Ok(());
        };
        use object_store::Error as E;
        let denied = matches!(
            &e,
            Error::Store {
                source: E::PermissionDenied { .. } | E::Unauthenticated { .. },
                ..
            }
        );
        let unusable = if matches!(e, Error::NotFound { .. }) {
            // A write cannot miss its object: only the bucket can be missing.
            Unusable::NoBucket {
                url: url(),
                bucket: setup.bucket.clone().unwrap_or_default(),
                endpoint: setup.endpoint.clone(),
                source: Box::new(e),
            }
        } else if denied {
            Unusable::AccessDenied {
                url: url(),
                source: Box::new(e),
            }
        } else if e.is_transient() {
            Unusable::Unreachable {
                url: url(),
                timeout: self.retry.deadline,
                source: Box::new(e),
            }
        } else {
            return Err(e);
        };
        Err(unusable.into())
    }

    /// Makes every object written so far durable. A local-directory store writes through the
    /// page cache (object_store does not fsync), so this is one `syncfs` of its file system,
    /// called once per batch of uploads before they are recorded as done; cloud stores are
    /// durable when a PUT returns, so this does nothing for them.
    pub async fn make_durable(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        self.barrier_faults("syncfs of the store").await?;
        blocking_durable(move || {
            let dir = std::fs::File::open(&root)?;
            rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
        })
        .await
    }

    /// Whether objects of this store are files on a local file system (a `file://` URL) and
    /// must be synced before they count as stored.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// The local file of object `id`, for a `file://` store.
    fn local_path(&self, id: u64) -> Option<std::path::PathBuf> {
        let root = self.local_root.as_ref()?;
        Some(
            self.key(id)
                .parts()
                .fold(root.clone(), |p, part| p.join(part.as_ref())),
        )
    }

    /// Whether [`Backend::link_object`] may store objects without copying them: a `file://`
    /// store, blocks stored as they are, and no link refused so far.
    pub fn can_link(&self) -> bool {
        self.local_root.is_some()
            && self.format.plain
            && !self
                .links_refused
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores object `id` as a hard link to `file`, whose whole content is the block: no
    /// bytes are copied. The link appears at once under the object's name (its content is
    /// complete before it has a name in the store); an object already there is never replaced
    /// (then `None`: the caller's create-only upload compares the bytes). Only for a
    /// `file://` store on the file system of `file`, with the
    /// identity codec ([`Backend::can_link`]); returns the stored size, or `None` when the
    /// object could not be linked (the caller then uploads the bytes with [`Backend::put`]).
    ///
    /// The caller must never change `file` in place afterwards (the store's object is the
    /// same inode): it replaces the file with a copy before modifying it while its link count
    /// is above one. The object is durable only after [`Backend::sync_object`] and
    /// [`Backend::sync_object_dirs`] (or [`Backend::make_durable`]). Blocking: call it on the
    /// blocking pool.
    pub fn link_object(&self, id: u64, file: &std::path::Path) -> Option<u64> {
        if !self.can_link() || self.may_write().is_err() {
            return None;
        }
        let path = self.local_path(id)?;
        match link_into_place(file, &path) {
            Ok(size) => Some(size),
            Err(e) => {
                let permanent = self.refuse_links_after(&e);
                tracing::debug!(obj_id = id, error = %e, permanent, "linking an object into the store failed; copying it instead");
                None
            }
        }
    }

    /// Whether `e`, from a hard link between the store and another directory, says that links
    /// will never work there (another file system, links not permitted or not supported); if
    /// so, this store stops trying ([`Backend::can_link`]).
    fn refuse_links_after(&self, e: &std::io::Error) -> bool {
        let permanent = matches!(
            e.raw_os_error(),
            Some(libc_codes::EXDEV | libc_codes::EPERM | libc_codes::EMLINK)
        ) || e.kind() == std::io::ErrorKind::Unsupported;
        if permanent {
            self.links_refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        permanent
    }

    /// Makes `dest` a hard link to the file of object `id` (the reverse of
    /// [`Backend::link_object`]): a read of the object without copying it, for a `file://`
    /// store on the file system of `dest` with the identity codec. A file already at `dest`
    /// is unlinked first, never truncated. The caller must never change `dest` in place
    /// while its link count is above one. `Ok(false)`: this store cannot link (the caller
    /// uses [`Backend::get`]). Blocking: call it on the blocking pool.
    pub fn link_out(&self, id: u64, dest: &std::path::Path) -> std::io::Result<bool> {
        if !self.can_link() {
            return Ok(false);
        }
        let Some(path) = self.local_path(id) else {
            return Ok(false);
        };
        let linked = std::fs::hard_link(&path, dest).or_else(|e| {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            std::fs::remove_file(dest)?;
            std::fs::hard_link(&path, dest)
        });
        match linked {
            Ok(()) => Ok(true),
            Err(e) if self.refuse_links_after(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the content of object `id` durable (fsync of its file) in a local-directory
    /// store; the directory entries follow with [`Backend::sync_object_dirs`]. Does nothing for
    /// other stores.
    pub async fn sync_object(&self, id: u64) -> Result<()> {
        let Some(path) = self.local_path(id) else {
            return Ok(());
        };
        self.barrier_faults(&format!("fsync of object {id}"))
            .await?;
        blocking_durable(move || std::fs::File::open(&path)?.sync_all()).await
    }

    /// Makes the directory entries of objects `ids` durable in a local-directory store: one
    /// fsync of every directory between them and the store root (each only once). With
    /// [`Backend::sync_object`] of each object, this is a cheaper barrier than
    /// [`Backend::make_durable`] for a few large objects, and leaves the rest of the file
    /// system alone.
    pub async fn sync_object_dirs(&self, ids: &[u64]) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        self.barrier_faults("fsync of the store's directories")
            .await?;
        let mut dirs = std::collections::BTreeSet::new();
        for &id in ids {
            let mut dir = self
                .local_path(id)
                .and_then(|p| p.parent().map(std::path::Path::to_owned));
            while let Some(d) = dir {
                if !d.starts_with(&root) || !dirs.insert(d.clone()) {
                    break;
                }
                dir = d.parent().map(std::path::Path::to_owned);
            }
        }
        blocking_durable(move || {
            // Deepest first, so that a directory's entry is synced after its content.
            for dir in dirs.iter().rev() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
    }

    /// Wraps an already built store; objects live under `prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        Self {
            store,
            local_root: None,
            links_refused: Arc::default(),
            prefix,
            format: Arc::new(StoreFormat::plain()),
            retry: RetryPolicy::default(),
            cancel: CancellationToken::new(),
            health: health::Health::default(),
            setup: Arc::default(),
            faults: None,
            lease: None,
            no_conditional_put: Arc::default(),
            root_identity: None,
            root_created: false,
        }
    }

    /// Consults `faults` ([`faulty::Op::Barrier`]) before each durability barrier of a
    /// local-directory store, for tests: those barriers are file system calls, which a
    /// [`faulty::FaultyStore`] around the object store cannot reach.
    pub fn with_faults(mut self, faults: faulty::Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Runs the injected faults of one barrier, if any.
    async fn barrier_faults(&self, what: &str) -> Result<()> {
        match &self.faults {
            Some(f) => f.barrier(what).await.map_err(|e| Error::NotDurable {
                source: std::io::Error::other(e),
            }),
            None => Ok(()),
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how objects are written and read (compression, encryption).
    pub fn with_format(mut self, format: StoreFormat) -> Self {
        self.format = Arc::new(format);
        self
    }

    /// Never stores or reads objects as hard links ([`Backend::link_object`],
    /// [`Backend::link_out`]): plain objects are copied as for a store on another file system.
    /// For benchmarks that compare a copying store with a linking one on the same disk.
    pub fn without_links(mut self) -> Self {
        self.links_refused = Arc::new(std::sync::atomic::AtomicBool::new(true));
        self
    }

    /// Uses `cancel` to abandon retries at shutdown.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Makes every later write check `lease` first ([`Error::Fenced`] when it lapsed).
    pub fn with_lease(mut self, lease: lease::Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Takes a lapsed lease again at once, if this backend has one (see
    /// [`lease::Lease::renew_if_lapsed`]).
    pub async fn renew_lease_if_lapsed(&self) {
        if let Some(lease) = &self.lease {
            lease.renew_if_lapsed(self).await;
        }
    }

    /// The writer lease, if one was taken.
    pub fn lease(&self) -> Option<&lease::Lease> {
        self.lease.as_ref()
    }

    /// Whether opening created the directory of this `file://` store (it did not exist).
    pub fn created_store_dir(&self) -> bool {
        self.root_created
    }

    /// Removes the directory of a `file://` store that opening created, if it is still
    /// empty: a store whose directory vanished is never recreated for a volume that had one.
    pub fn forget_created_store_dir(&self) {
        if let (true, Some(root)) = (self.root_created, &self.local_root) {
            let _ = std::fs::remove_dir(root);
        }
    }

    /// `Ok` if this process may write to the store now: its lease (if any) is valid, and a
    /// `file://` store's directory is the one that was opened.
    fn may_write(&self) -> Result<()> {
        if let Some(lease) = &self.lease {
            lease.check()?;
        }
        self.same_store_dir()
    }

    /// [`Backend::may_write`] for async callers: the look at the store's directory runs on
    /// the blocking pool, so a file system that hangs (a hard-mounted network share) holds a
    /// blocking thread, not an async worker, and the operation's deadline still applies.
    async fn may_write_async(&self) -> Result<()> {
        if let Some(lease) = &self.lease {
            lease.check()?;
        }
        self.same_store_dir_async().await
    }

    /// [`Backend::same_store_dir`] on the blocking pool.
    pub(crate) async fn same_store_dir_async(&self) -> Result<()> {
        if self.local_root.is_none() {
            return Ok(());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.same_store_dir())
            .await
            .expect("store directory check panicked")
    }

    /// `Ok` unless this is a `file://` store whose directory is gone or is not the one
    /// opened: nothing, not even the lease, is written under its path then.
    pub(crate) fn same_store_dir(&self) -> Result<()> {
        if let (Some(root), Some(expected)) = (&self.local_root, self.root_identity) {
            match dir_identity(root) {
                Ok(found) if found == expected => {}
                Ok(_) => {
                    return Err(Error::StoreDirChanged {
                        path: root.clone(),
                        what: "is another directory than the one opened (replaced, or a file system mounted or unmounted over it)".to_owned(),
                    });
                }
                Err(e) => {
                    return Err(Error::StoreDirChanged {
                        path: root.clone(),
                        what: format!("cannot be found ({e})"),
                    });
                }
            }
        }
        Ok(())
    }

    /// A create-only PUT of `key`: `object_store::Error::AlreadyExists` (inside
    /// [`Error::Store`]) if the key exists. A store that does not implement conditional PUT
    /// gets a lookup before the PUT instead, which does not guard against a writer racing
    /// for the same key (the lease and the epochs in the keys do); that is logged once.
    pub(crate) async fn put_create(&self, key: &Path, payload: PutPayload) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.no_conditional_put.load(Ordering::Relaxed) {
            let opts = object_store::PutOptions::from(object_store::PutMode::Create);
            match self.store.put_opts(key, payload.clone(), opts).await {
                Ok(_) => return Ok(()),
                Err(e) if refuses_conditional_put(&e) => {
                    if !self.no_conditional_put.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %chain(&e),
                            "the object store does not support create-only (conditional) PUTs; checking that each key is free before writing it instead, which the lease makes safe against other writers of this volume but not against foreign writers racing for the same key"
                        );
                    }
                }
                Err(source) => return Err(store_error("upload", key, source)),
            }
        }
        match self.store.head(key).await {
            Ok(_) => Err(Error::Store {
                op: "upload",
                key: key.to_string(),
                source: object_store::Error::AlreadyExists {
                    path: key.to_string(),
                    source: "the key exists (checked before writing)".into(),
                },
            }),
            Err(object_store::Error::NotFound { .. }) => self
                .store
                .put(key, payload)
                .await
                .map(drop)
                .map_err(|source| store_error("upload", key, source)),
            Err(source) => Err(store_error("lookup", key, source)),
        }
    }

    /// The key of object `id`: `<prefix>/data/<id mod 256, two hex digits>/<id>`. The shard
    /// level spreads objects over 256 directories of a local store (a directory serializes
    /// the creations and renames in it) and over 256 key prefixes of a cloud store.
    pub fn key(&self, id: u64) -> Path {
        self.data_prefix()
            .join(format!("{:02x}", id & 0xff))
            .join(id.to_string())
    }

    fn data_prefix(&self) -> Path {
        self.prefix.clone().join("data")
    }

    /// Stores object `id`, retrying transient failures. Returns the stored size in bytes.
    pub async fn put(&self, id: u64, block: Bytes) -> Result<u64> {
        self.may_write_async().await?;
        let key = self.key(id);
        let stored = self.encode(id, &key, block.clone()).await?;
        let size = stored.len() as u64;
        let payload = PutPayload::from_bytes(stored);
        let what = format!("upload of object {key}");
        let put = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let payload = payload.clone();
                let key = &key;
                async move {
                    self.may_write_async().await?;
                    self.put_create(key, payload).await
                }
            })
            .await;
        match put {
            Ok(()) => Ok(size),
            // The key is taken: by this very object (an attempt whose answer was lost, or an
            // upload again after a crash), or by other content, which is never overwritten.
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => match self.get(id).await {
                Ok(found) if found == block => Ok(size),
                Ok(_) | Err(Error::Format { .. }) => Err(Error::Collision {
                    key: key.to_string(),
                }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The stored form of block `block` as object `id`: itself when plain, otherwise framed
    /// (compressed and encrypted on the blocking pool, off the async workers).
    async fn encode(&self, id: u64, key: &Path, block: Bytes) -> Result<Bytes> {
        if self.format.is_plain(id) {
            return Ok(block);
        }
        let format = Arc::clone(&self.format);
        let encoded = tokio::task::spawn_blocking(move || format.codec.encode(id, &block))
            .await
            .expect("encode task panicked");
        encoded.map(Bytes::from).map_err(|source| Error::Format {
            key: key.to_string(),
            source,
        })
    }

    /// The block stored as object `id` (see [`Backend::encode`]).
    async fn decode(&self, id: u64, key: &Path, stored: Bytes) -> Result<Bytes> {
        if self.format.is_plain(id) {
            return Ok(stored);
        }
        let format = Arc::clone(&self.format);
        let decoded = tokio::task::spawn_blocking(move || {
            format.codec.decode_bytes(id, stored, format.max_block)
        })
        .await
        .expect("decode task panicked");
        decoded.map_err(|source| Error::Format {
            key: key.to_string(),
            source,
        })
    }

    /// Fetches object `id` and decodes it, retrying transient failures.
    ///
    /// The body is drained inside the retry, so a connection that drops mid-body is retried
    /// as a whole.
    pub async fn get(&self, id: u64) -> Result<Bytes> {
        let key = self.key(id);
        let what = format!("download of object {key}");
        let stored = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let key = &key;
                async move {
                    let result = self
                        .store
                        .get(key)
                        .await
                        .map_err(|source| store_error("download", key, source))?;
                    result
                        .bytes()
                        .await
                        .map_err(|source| store_error("download", key, source))
                }
            })
            .await?;
        self.decode(id, &key, stored).await
    }

    /// The size in the store of object `id`, `None` if the store does not hold it (a HEAD
    /// request, retrying transient failures).
    pub async fn head(&self, id: u64) -> Result<Option<u64>> {
        let key = self.key(id);
        let what = format!("lookup of object {key}");
        let found = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let key = &key;
                async move {
                    match self.store.head(key).await {
                        Ok(meta) => Ok(Some(meta.size)),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(source) => Err(store_error("lookup", key, source)),
                    }
                }
            })
            .await?;
        Ok(found)
    }

    /// Deletes many objects with the store's bulk delete. Objects that are already gone
    /// count as deleted. Retries the whole remaining batch on transient failures.
    pub async fn delete_many(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.may_write_async().await?;
        let what = format!("bulk delete of {} objects", ids.len());
        // The keys still to delete; each attempt retries only the ones that failed.
        let remaining_cell =
            std::sync::Mutex::new(ids.iter().map(|&id| self.key(id)).collect::<Vec<_>>());
        self.retry
            .run(&what, &self.cancel, &self.health, || {
                let batch: Vec<Path> = remaining_cell.lock().expect("not poisoned").clone();
                let cell = &remaining_cell;
                async move {
                    self.may_write_async().await?;
                    let input = futures::stream::iter(batch.clone().into_iter().map(Ok)).boxed();
                    let results: Vec<_> = self.store.delete_stream(input).collect().await;
                    let mut failed = Vec::new();
                    let mut first_error = None;
                    for (path, result) in batch.into_iter().zip(results) {
                        match result {
                            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(source) => {
                                if first_error.is_none() {
                                    first_error = Some(store_error("delete", &path, source));
                                }
                                failed.push(path);
                            }
                        }
                    }
                    *cell.lock().expect("not poisoned") = failed;
                    match first_error {
                        None => Ok(()),
                        Some(e) => Err(e),
                    }
                }
            })
            .await
    }

    /// Lists the ids of every object in the store, in no particular order.
    pub async fn list_ids(&self) -> Result<Vec<u64>> {
        Ok(self
            .list_objects()
            .await?
            .into_iter()
            .map(|o| o.id)
            .collect())
    }

    /// Lists every object in the store with its size and when the store last wrote it (its
    /// own clock), in no particular order: for `check`, which tells leaks from objects
    /// written a moment ago by their age.
    pub async fn list_objects(&self) -> Result<Vec<StoredObject>> {
        let prefix = self.data_prefix();
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|source| store_error("list", &prefix, source))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = m.location.filename()?.parse().ok()?;
                Some(StoredObject {
                    id,
                    size: m.size,
                    last_modified: std::time::SystemTime::from(m.last_modified),
                })
            })
            .collect())
    }

    /// Total bytes of every object in the store (a listing; for tests and tools).
    pub async fn stored_bytes(&self) -> Result<u64> {
        let prefix = self.data_prefix();
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|source| store_error("list", &prefix, source))?;
        Ok(metas.iter().map(|m| m.size).sum())
    }
}

/// A failed request as an [`Error`]. "Not found" is [`Error::NotFound`], but for an upload,
/// where it can only mean that the bucket is missing: that stays a (permanent) store error
/// with the store's answer.
pub(crate) fn store_error(op: &'static str, key: &Path, source: object_store::Error) -> Error {
    match source {
        object_store::Error::NotFound { .. } if op != "upload" => Error::NotFound {
            key: key.to_string(),
        },
        source => Error::Store {
            op,
            key: key.to_string(),
            source,
        },
    }
}

fn invalid(url: &str, reason: impl std::fmt::Display) -> Error {
    Error::InvalidUrl {
        url: url::Url::parse(url)
            .map_or_else(|_| url.to_owned(), |u| check::without_credentials(&u)),
        reason: reason.to_string(),
    }
}

/// What opening a URL gives: the store, the key prefix, a local store's directory, and
/// what the start-up check needs.
type Opened = (
    Arc<dyn ObjectStore>,
    Path,
    Option<std::path::PathBuf>,
    check::Setup,
);

/// object_store's retries are off: [`RetryPolicy`] is the only retry layer.
fn client_retry(timeout: std::time::Duration) -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 0,
        retry_timeout: timeout,
        backoff: object_store::BackoffConfig::default(),
    }
}

/// The request timeout (`timeout`) and the connect timeout (5 s at most) of a cloud store's
/// HTTP client, as its configuration strings.
fn client_timeouts(timeout: std::time::Duration) -> [(object_store::ClientConfigKey, String); 2] {
    use object_store::ClientConfigKey as K;
    let connect = timeout.min(std::time::Duration::from_secs(5));
    [
        (K::Timeout, format!("{}ms", timeout.as_millis().max(1))),
        (
            K::ConnectTimeout,
            format!("{}ms", connect.as_millis().max(1)),
        ),
    ]
}

fn open_store(url_str: &str, timeout: std::time::Duration) -> Result<Opened> {
    use object_store::{
        aws::{AmazonS3Builder, AmazonS3ConfigKey},
        azure::{AzureConfigKey, MicrosoftAzureBuilder},
        gcp::{GoogleCloudStorageBuilder, GoogleConfigKey},
        local::LocalFileSystem,
        memory::InMemory,
    };
    let url = url::Url::parse(url_str).map_err(|e| invalid(url_str, e))?;
    let prefix = || -> Result<Path> {
        Path::parse(url.path().trim_start_matches('/')).map_err(|e| invalid(url_str, e))
    };
    let shown = check::without_credentials(&url);
    let mut setup = check::Setup {
        url: shown.clone(),
        cloud: true,
        bucket: url.host_str().map(str::to_owned),
        ..check::Setup::default()
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|()| invalid(url_str, "expected file:///absolute/path"))?;
            let root_created = !dir.exists();
            std::fs::create_dir_all(&dir)
                .map_err(|e| invalid(url_str, format!("cannot create {}: {e}", dir.display())))?;
            let store = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| invalid(url_str, e))?
                .with_automatic_cleanup(true);
            let setup = check::Setup {
                root_created,
                ..check::Setup::default()
            };
            return Ok((Arc::new(store), Path::default(), Some(dir), setup));
        }
        "memory" => {
            let setup = check::Setup::default();
            return Ok((Arc::new(InMemory::new()), Path::default(), None, setup));
        }
        "s3" | "s3a" => {
            let builder = client_timeouts(timeout).into_iter().fold(
                AmazonS3Builder::from_env()
                    .with_url(url_str)
                    .with_retry(client_retry(timeout)),
                |b, (k, v)| b.with_config(AmazonS3ConfigKey::Client(k), v),
            );
            let (endpoint, credentials) = check::check_s3_settings(
                &shown,
                &builder,
                check::env_truthy("AWS_EC2_METADATA_DISABLED"),
            )?;
            setup.endpoint = endpoint;
            let s3 = builder.build().map_err(|e| invalid(url_str, e))?;
            if credentials == check::S3Credentials::InstanceMetadata {
                setup.instance_credentials = Some(Arc::clone(s3.credentials()));
            }
            Arc::new(s3)
        }
        "gs" => Arc::new(
            client_timeouts(timeout)
                .into_iter()
                .fold(
                    GoogleCloudStorageBuilder::from_env()
                        .with_url(url_str)
                        .with_retry(client_retry(timeout)),
                    |b, (k, v)| b.with_config(GoogleConfigKey::Client(k), v),
                )
                .build()
                .map_err(|e| invalid(url_str, e))?,
        ),
        "az" | "abfs" | "abfss" | "azure" => Arc::new(
            client_timeouts(timeout)
                .into_iter()
                .fold(
                    MicrosoftAzureBuilder::from_env()
                        .with_url(url_str)
                        .with_retry(client_retry(timeout)),
                    |b, (k, v)| b.with_config(AzureConfigKey::Client(k), v),
                )
                .build()
                .map_err(|e| invalid(url_str, e))?,
        ),
        other => {
            return Err(invalid(
                url_str,
                format!("unsupported scheme {other:?}; expected file, memory, s3, gs or az"),
            ));
        }
    };
    Ok((store, prefix()?, None, setup))
}

#[cfg(test)]
mod tests;

/// Makes `path` a hard link to `file` and returns the size of the file. The common case, no
/// object at `path` yet, is one directory operation; an object left there by an earlier
/// attempt is replaced whole, through a staging name that object_store's listing skips (`#`
/// and digits) and a rename.
fn link_into_place(file: &std::path::Path, path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::ErrorKind;
    // Creates the shard directory on the first object in it (if `file` is what is missing,
    // the second attempt says so). An object already at `path` is never replaced: the link
    // fails with `AlreadyExists` and the caller uploads with a create-only PUT, which
    // accepts the object only if it holds these very bytes.
    // The one object already there that needs no comparison: this very file (a block
    // committed again after a crash).
    use std::os::unix::fs::MetadataExt;
    let linked = std::fs::hard_link(file, path).or_else(|e| {
        if e.kind() != ErrorKind::NotFound {
            return Err(e);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::hard_link(file, path)
    });
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let (there, ours) = (std::fs::metadata(path)?, std::fs::metadata(file)?);
            if (there.dev(), there.ino()) != (ours.dev(), ours.ino()) {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    Ok(std::fs::metadata(path)?.len())
}

/// The (device, inode) of a directory.
fn dir_identity(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok((meta.dev(), meta.ino()))
}

/// Whether a store answered a create-only PUT with "not implemented" (the client, or a
/// server that answers 501).
fn refuses_conditional_put(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotImplemented { .. })
        || chain(e).contains("501 Not Implemented")
}

/// The error numbers after which hard links into the store are not tried again.
mod libc_codes {
    pub(crate) const EPERM: i32 = rustix::io::Errno::PERM.raw_os_error();
    pub(crate) const EXDEV: i32 = rustix::io::Errno::XDEV.raw_os_error();
    pub(crate) const EMLINK: i32 = rustix::io::Errno::MLINK.raw_os_error();
}

/// Runs a blocking sync on the blocking pool; its failure is [`Error::NotDurable`].
async fn blocking_durable(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> Result<()> {
    let not_durable = |source: std::io::Error| Error::NotDurable { source };
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| not_durable(std::io::Error::other(e)))?
        .map_err(not_durable)
}
