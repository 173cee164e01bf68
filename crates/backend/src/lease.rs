//! The volume's writer lease: one writer at a time, fenced by epochs.
//!
//! The lease lives in the store as create-only objects `<prefix>/lease/<epoch>` (20 decimal
//! digits, so listings sort by epoch). Taking the lease is creating the object of the next
//! epoch with [`object_store::PutMode::Create`]: of two daemons racing for epoch `E + 1`
//! exactly one wins. The holder renews its lease by rewriting its own object (only it writes
//! that key) every quarter of the time to live.
//!
//! Time is told by the store's clock, never by comparing two hosts' clocks: a lease is
//! expired when the store stamped its object (last modified) more than `ttl` before the
//! store stamps a fresh object of the contender (`<prefix>/clock/<holder>`). The holder
//! counts on its own monotonic clock instead: it writes to the store only while less than
//! `ttl / 2` has passed since the start of its last successful renewal, which started before
//! the store stamped it. So a holder that is paused, partitioned or cannot reach the store
//! stops writing at least `ttl / 2` before any contender can find its lease expired; the
//! margin covers clocks that run at different rates. A holder whose lease lapsed takes it
//! again by creating the next epoch (if no one else did), never by rewriting the old one.
//!
//! Every object id allocated under epoch `E` is at least `E << 40` ([`first_object_id`]),
//! and the store keys are derived from the ids: writers of different epochs never write the
//! same key, so a stale writer's late upload cannot replace what a newer writer made.
//! Uploads are also create-only where the store supports it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Backend, Error, Result, store_error};

/// Object ids of epoch `E` start at `E << EPOCH_SHIFT`.
pub const EPOCH_SHIFT: u32 = 40;

/// The first object id a writer holding epoch `epoch` allocates.
pub fn first_object_id(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// A point on the clock that goes on counting while the machine is suspended
/// (`CLOCK_BOOTTIME`): a holder woken from a suspend longer than its lease must not believe it
/// still holds it (`CLOCK_MONOTONIC`, behind `Instant`, stops during a suspend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Instant(Duration);

impl Instant {
    fn now() -> Self {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Self(Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        ))
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Self;
    fn add(self, d: Duration) -> Self {
        Self(self.0 + d)
    }
}

/// Epochs at or above this are refused as garbled: their object ids would not fit.
pub const MAX_EPOCH: u64 = 1 << 22;

/// The smallest time to live a lease may have.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Who holds (or wants) the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// The holder's metadata database (or data directory), absolute.
    pub data_dir: String,
    /// The holder's kernel boot id (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: String,
    /// The holder's database file as (device, inode).
    #[serde(default)]
    pub db_file: Option<(u64, u64)>,
}

impl Holder {
    /// This process, serving the volume whose metadata is at `data_dir`.
    pub fn this_process(data_dir: &std::path::Path) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_owned())
            .unwrap_or_default();
        let db_file = std::fs::metadata(data_dir).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        Self {
            host,
            pid: std::process::id(),
            data_dir: data_dir.display().to_string(),
            boot_id,
            db_file,
        }
    }

    /// Whether `other` held the lease from this very database file under this very running
    /// kernel: the caller holds that database's lock, so `other` is a process that died.
    /// Host names and paths prove nothing (two machines or containers may share them).
    pub fn same_slot(&self, other: &Holder) -> bool {
        !self.boot_id.is_empty()
            && self.boot_id == other.boot_id
            && self.db_file.is_some()
            && self.db_file == other.db_file
    }

    /// A name for the clock object: host and pid, as path-safe characters.
    fn token(&self) -> String {
        let host: String = self
            .host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{host}-{}", self.pid)
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} (metadata {})",
            self.pid, self.host, self.data_dir
        )
    }
}

/// The content of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The epoch (also the object's name).
    pub epoch: u64,
    /// Who holds it.
    pub holder: Holder,
    /// When it was taken, by the holder's clock (RFC 3339; for people).
    pub since: String,
    /// The holder's time to live, in milliseconds.
    pub ttl_ms: u64,
    /// Set by a holder that shut down cleanly: the next writer may take the lease at once.
    #[serde(default)]
    pub released: bool,
}

/// Why the lease was refused at start.
#[derive(Debug, Clone)]
pub struct HeldBy {
    /// The lease record found.
    pub record: LeaseRecord,
    /// How long ago the store stamped its last renewal.
    pub renewed_ago: Duration,
    /// How long until it expires, unless renewed.
    pub expires_in: Duration,
}

impl std::fmt::Display for HeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the volume's lease (epoch {}) is held by {} since {}, renewed {:.0?} ago; it expires in {:.0?} unless renewed. \
             Stop that daemon first; if its machine is gone, wait for the lease to expire or start with --force-takeover",
            self.record.epoch,
            self.record.holder,
            self.record.since,
            self.renewed_ago,
            self.expires_in
        )
    }
}

/// The lease this process holds, shared by every clone of its [`Backend`].
#[derive(Debug, Clone)]
pub struct Lease(Arc<State>);

#[derive(Debug)]
struct State {
    /// The epoch now held (it grows when a lapsed lease is taken again).
    epoch: AtomicU64,
    /// The epoch the volume was opened under: object ids come from its range.
    first_epoch: u64,
    ttl: Duration,
    holder: Holder,
    since: String,
    /// Writes are allowed before this instant.
    valid_until: Mutex<Instant>,
    /// Set when a newer epoch exists: this process never writes again.
    superseded: AtomicBool,
    /// Who superseded us, for messages.
    superseded_by: Mutex<Option<String>>,
    /// Renewals run one at a time (the background task, and a flush after a lapse).
    renewing: tokio::sync::Mutex<()>,
}

impl Lease {
    /// The epoch now held.
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(Ordering::Acquire)
    }

    /// The epoch the volume was opened under; new object ids are at least
    /// [`first_object_id`] of it.
    pub fn first_epoch(&self) -> u64 {
        self.0.first_epoch
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.0.ttl
    }

    /// `Ok` while this process may write to the store; otherwise why not.
    pub fn check(&self) -> Result<()> {
        if self.0.superseded.load(Ordering::Acquire) {
            let by = self
                .0
                .superseded_by
                .lock()
                .expect("lease mutex poisoned")
                .clone()
                .unwrap_or_default();
            return Err(Error::Fenced {
                epoch: self.epoch(),
                reason: format!(
                    "a newer writer took the volume's lease: {by}; restart this daemon only once that one has stopped"
                ),
                permanent: true,
            });
        }
        let valid_until = *self.0.valid_until.lock().expect("lease mutex poisoned");
        if Instant::now() >= valid_until {
            return Err(Error::Fenced {
                epoch: self.epoch(),
                reason: format!(
                    "the lease could not be renewed for {:.0?} (store unreachable?); writes resume once it is",
                    self.0.ttl / 2
                ),
                permanent: false,
            });
        }
        Ok(())
    }

    /// Gives the lease up at shutdown, once everything is written: this process stops
    /// writing, and the lease object says it was released, so the next writer takes it at
    /// once. Best effort: a lease not released expires.
    pub async fn release(&self, backend: &Backend) {
        let valid = self.check().is_ok();
        *self.0.superseded_by.lock().expect("lease mutex poisoned") =
            Some("none: this process released the lease at shutdown".to_owned());
        self.0.superseded.store(true, Ordering::Release);
        if !valid {
            return;
        }
        // A renewal in flight would overwrite the released record: let it finish first.
        let _one = self.0.renewing.lock().await;
        let mut record = self.record(self.epoch());
        record.released = true;
        match backend.write_lease(&record, PutMode::Overwrite).await {
            Ok(()) => tracing::debug!(epoch = record.epoch, "released the volume's lease"),
            Err(e) => tracing::warn!(
                error = %crate::chain(&e),
                "could not release the volume's lease; the next writer can take it once it expires"
            ),
        }
    }

    /// Takes a lapsed lease again at once (for work a user asked for, such as a flush after
    /// the store came back), rather than at the next renewal. Does nothing while it is valid
    /// or after a newer writer took it.
    pub async fn renew_if_lapsed(&self, backend: &Backend) {
        if self.is_superseded() || self.check().is_ok() {
            return;
        }
        if let Err(e) = self.renew(backend).await {
            tracing::debug!(error = %crate::chain(&e), "taking the lapsed lease again failed");
        }
    }

    /// Why this process may not write now ([`Lease::check`]'s error).
    fn refusal(&self) -> Error {
        self.check().err().unwrap_or_else(|| Error::Fenced {
            epoch: self.epoch(),
            reason: "the lease is being taken again".to_owned(),
            permanent: false,
        })
    }

    /// Whether a newer writer took over: this process must not write again.
    pub fn is_superseded(&self) -> bool {
        self.0.superseded.load(Ordering::Acquire)
    }

    fn extend_from(&self, start: Instant) {
        let mut v = self.0.valid_until.lock().expect("lease mutex poisoned");
        *v = (*v).max(start + self.0.ttl / 2);
    }

    fn record(&self, epoch: u64) -> LeaseRecord {
        LeaseRecord {
            epoch,
            holder: self.0.holder.clone(),
            since: self.0.since.clone(),
            ttl_ms: u64::try_from(self.0.ttl.as_millis()).unwrap_or(u64::MAX),
            released: false,
        }
    }

    /// Renews the lease every quarter of its time to live until `cancel` fires or a newer
    /// writer takes over. Run it as a task for as long as the volume is open.
    pub async fn keep(self, backend: Backend, cancel: CancellationToken) {
        let interval = self.0.ttl / 4;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if self.is_superseded() {
                return;
            }
            if let Err(e) = self.renew(&backend).await {
                if self.is_superseded() {
                    tracing::error!("{}", crate::chain(&e));
                    return;
                }
                tracing::debug!(error = %crate::chain(&e), "renewing the volume's lease failed");
            }
        }
    }

    /// One renewal: while the lease is valid, checks that no newer epoch exists and rewrites
    /// this epoch's object; once it lapsed, takes the next epoch if no one else did.
    pub async fn renew(&self, backend: &Backend) -> Result<()> {
        let _one = self.0.renewing.lock().await;
        if self.is_superseded() {
            return Err(self.refusal());
        }
        let start = Instant::now();
        let epoch = self.epoch();
        let valid = Instant::now() < *self.0.valid_until.lock().expect("lease mutex poisoned");
        let latest = backend.latest_lease().await?;
        if let Some((newest, _)) = &latest
            && newest.epoch > epoch
        {
            self.supersede(newest);
            return Err(self.refusal());
        }
        if valid {
            backend
                .write_lease(&self.record(epoch), PutMode::Overwrite)
                .await?;
            self.extend_from(start);
            return Ok(());
        }
        // Lapsed: a contender may be taking the lease now; only a create decides.
        let next = epoch + 1;
        match backend
            .write_lease(&self.record(next), PutMode::Create)
            .await
        {
            Ok(()) => {
                self.0.epoch.store(next, Ordering::Release);
                self.extend_from(start);
                backend.forget_old_leases(next).await;
                tracing::warn!(
                    epoch = next,
                    "the volume's lease had lapsed (store unreachable for {:.0?}); took it again as epoch {next}; writes resume",
                    self.0.ttl / 2
                );
                Ok(())
            }
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => {
                let newest = backend.latest_lease().await?;
                if let Some((newest, _)) = newest {
                    // An earlier attempt of this very create that succeeded unseen.
                    let ours = newest.epoch == next
                        && newest.holder == self.0.holder
                        && newest.since == self.0.since;
                    if ours {
                        self.0.epoch.store(next, Ordering::Release);
                        self.extend_from(start);
                        return Ok(());
                    }
                    self.supersede(&newest);
                }
                Err(self.refusal())
            }
            Err(e) => Err(e),
        }
    }

    fn supersede(&self, newest: &LeaseRecord) {
        *self.0.superseded_by.lock().expect("lease mutex poisoned") = Some(format!(
            "epoch {} by {} since {}",
            newest.epoch, newest.holder, newest.since
        ));
        let was = self.0.superseded.swap(true, Ordering::AcqRel);
        if !was {
            tracing::error!(
                epoch = self.epoch(),
                newer = newest.epoch,
                "the volume's lease was taken by {} (epoch {}): this daemon no longer writes to the store; its dirty blocks stay in the cache",
                newest.holder,
                newest.epoch
            );
        }
    }
}

/// How to take the lease.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// Who asks.
    pub holder: Holder,
    /// Time to live of the lease.
    pub ttl: Duration,
    /// Take it even if another holder's lease has not expired (its machine is known dead),
    /// or this database is older than the store's lease.
    pub force: bool,
    /// The epoch this database last held, if it ever held one: a store whose lease is at a
    /// later epoch, taken by another database, was written by another copy of this
    /// volume's metadata after this copy was made, and this copy is out of date.
    pub last_epoch: Option<u64>,
}

fn lease_dir(backend: &Backend) -> Path {
    backend.prefix.clone().join("lease")
}

fn lease_key(backend: &Backend, epoch: u64) -> Path {
    lease_dir(backend).join(format!("{epoch:020}"))
}

impl Backend {
    /// Takes the volume's lease, or says who holds it ([`Error::LeaseHeld`]). A lease whose
    /// holder is this host and data directory is taken at once: the caller holds the data
    /// directory's lock, so that holder is a process that died. A lease not renewed for its
    /// time to live, by the store's clock, is taken over with a warning.
    pub async fn acquire_lease(&self, request: LeaseRequest) -> Result<Lease> {
        let ttl = request.ttl.max(MIN_TTL);
        for _ in 0..8 {
            let start = Instant::now();
            let latest = self.latest_lease().await?;
            let next = match &latest {
                None => 1,
                Some((record, stamped)) => {
                    let mine = request.holder.same_slot(&record.holder);
                    if record.released {
                        tracing::debug!(
                            epoch = record.epoch,
                            "the volume's lease was released by {}",
                            record.holder
                        );
                    } else if !mine && !request.force {
                        let now = self.store_now(&request.holder).await?;
                        let renewed_ago = (now - *stamped).to_std().unwrap_or_default();
                        let their_ttl = Duration::from_millis(record.ttl_ms).max(ttl);
                        if renewed_ago < their_ttl {
                            return Err(Error::LeaseHeld(Box::new(HeldBy {
                                record: record.clone(),
                                renewed_ago,
                                expires_in: their_ttl - renewed_ago,
                            })));
                        }
                        tracing::warn!(
                            epoch = record.epoch,
                            "taking over the volume's lease from {}: not renewed for {renewed_ago:.0?} (time to live {their_ttl:.0?})",
                            record.holder
                        );
                    } else if !mine {
                        tracing::warn!(
                            epoch = record.epoch,
                            "taking over the volume's lease from {} at once (--force-takeover)",
                            record.holder
                        );
                    }
                    if let Some(last) = request.last_epoch
                        && record.epoch > last
                        && !mine
                        && !request.force
                    {
                        return Err(Error::StaleCopy(format!(
                            "this database last held the volume's lease at epoch {last}, but the store's lease is at epoch {}, taken by {} since {}: \
                             another copy of this volume's metadata wrote to the store after this copy was made, so this copy is out of date \
                             (its files and objects may be gone from the store). Use the data directory that wrote epoch {}; \
                             --force-takeover uses this copy anyway, and what the other copy wrote since is not seen here",
                            record.epoch, record.holder, record.since, record.epoch
                        )));
                    }
                    record
                        .epoch
                        .checked_add(1)
                        .ok_or_else(|| Error::BadRecord {
                            key: lease_key(self, record.epoch).to_string(),
                            reason: "epoch out of range".to_owned(),
                        })?
                }
            };
            let lease = Lease(Arc::new(State {
                epoch: AtomicU64::new(next),
                first_epoch: next,
                ttl,
                holder: request.holder.clone(),
                since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                valid_until: Mutex::new(start),
                superseded: AtomicBool::new(false),
                superseded_by: Mutex::new(None),
                renewing: tokio::sync::Mutex::new(()),
            }));
            match self.write_lease(&lease.record(next), PutMode::Create).await {
                Ok(()) => {
                    lease.extend_from(start);
                    self.forget_old_leases(next).await;
                    return Ok(lease);
                }
                // Another process took this epoch first: look again.
                Err(Error::Store {
                    source: object_store::Error::AlreadyExists { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::LeaseContended)
    }

    /// The newest lease object, with the store's stamp of its last write.
    pub(crate) async fn latest_lease(
        &self,
    ) -> Result<Option<(LeaseRecord, chrono_time::DateTime)>> {
        let dir = lease_dir(self);
        let metas: Vec<object_store::ObjectMeta> = self
            .retry
            .run("listing of the lease", &self.cancel, &self.health, || {
                let dir = &dir;
                async move {
                    self.store
                        .list(Some(dir))
                        .try_collect()
                        .await
                        .map_err(|source| store_error("list", dir, source))
                }
            })
            .await?;
        let Some(newest) = metas
            .into_iter()
            .filter(|m| {
                m.location
                    .filename()
                    .is_some_and(|f| f.len() == 20 && f.bytes().all(|b| b.is_ascii_digit()))
            })
            .max_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()))
        else {
            return Ok(None);
        };
        let key = newest.location.clone();
        let (bytes, stamped) = self
            .retry
            .run("read of the lease", &self.cancel, &self.health, || {
                let key = &key;
                async move {
                    let got = self
                        .store
                        .get(key)
                        .await
                        .map_err(|source| store_error("download", key, source))?;
                    let stamped = got.meta.last_modified;
                    let bytes = got
                        .bytes()
                        .await
                        .map_err(|source| store_error("download", key, source))?;
                    Ok((bytes, stamped))
                }
            })
            .await?;
        let record: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if record.epoch >= MAX_EPOCH || key.filename() != Some(&*format!("{:020}", record.epoch)) {
            return Err(Error::BadRecord {
                key: key.to_string(),
                reason: format!(
                    "epoch {} does not match its name, or is not below {MAX_EPOCH}",
                    record.epoch
                ),
            });
        }
        Ok(Some((record, stamped)))
    }

    /// Writes a lease object: create-only for a new epoch, an overwrite for a renewal.
    async fn write_lease(&self, record: &LeaseRecord, mode: PutMode) -> Result<()> {
        let key = lease_key(self, record.epoch);
        let body = Bytes::from(serde_json::to_vec_pretty(record).expect("a lease serializes"));
        let what = format!("write of the lease {key}");
        let create = matches!(mode, PutMode::Create);
        self.retry
            .run(&what, &self.cancel, &self.health, || {
                let key = &key;
                let payload = PutPayload::from_bytes(body.clone());
                async move {
                    self.same_store_dir_async().await?;
                    if create {
                        self.put_create(key, payload).await
                    } else {
                        self.store
                            .put_opts(key, payload, PutOptions::default())
                            .await
                            .map(drop)
                            .map_err(|source| store_error("upload", key, source))
                    }
                }
            })
            .await
    }

    /// The store's clock now: the stamp it gives a fresh scratch object (written and
    /// deleted again), for ages of objects that must not depend on this host's clock.
    pub async fn store_time(&self) -> Result<std::time::SystemTime> {
        let holder = match &self.lease {
            Some(lease) => lease.0.holder.clone(),
            None => Holder::this_process(std::path::Path::new("")),
        };
        self.store_now(&holder)
            .await
            .map(std::time::SystemTime::from)
    }

    /// The store's clock: the stamp it gives a fresh object.
    async fn store_now(&self, holder: &Holder) -> Result<chrono_time::DateTime> {
        let key = self.prefix.clone().join("clock").join(holder.token());
        self.retry
            .run(
                "read of the store's clock",
                &self.cancel,
                &self.health,
                || {
                    let key = &key;
                    async move {
                        self.same_store_dir_async().await?;
                        self.store
                            .put(key, PutPayload::from_static(b"clock"))
                            .await
                            .map_err(|source| store_error("upload", key, source))?;
                        let meta = self
                            .store
                            .head(key)
                            .await
                            .map_err(|source| store_error("lookup", key, source))?;
                        // The stamp is read; the object is not needed any more.
                        let _ = self.store.delete(key).await;
                        Ok(meta.last_modified)
                    }
                },
            )
            .await
    }

    /// Deletes lease objects two or more epochs older than `epoch` (best effort).
    async fn forget_old_leases(&self, epoch: u64) {
        let dir = lease_dir(self);
        let Ok(metas) = self.store.list(Some(&dir)).try_collect::<Vec<_>>().await else {
            return;
        };
        for m in metas {
            let old = m
                .location
                .filename()
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|e| e + 1 < epoch);
            if old {
                let _ = self.store.delete(&m.location).await;
            }
        }
    }
}

/// The timestamp type of object metadata.
pub(crate) mod chrono_time {
    /// A store's timestamp.
    pub type DateTime = ::chrono::DateTime<::chrono::Utc>;
}
