//! A fault-injecting [`ObjectStore`] wrapper for tests.
//!
//! [`FaultyStore`] forwards every call to an inner store and consults a shared [`Faults`]
//! control first. Per operation it can fail the first N calls, fail a fraction of calls, add
//! latency, hold calls at a gate until released, and (for reads) corrupt the returned bytes.
//! It also counts calls per operation, which tests use to assert exact upload and delete
//! counts. The daemon can enable it through a test-only setting. Random failures come from a
//! generator that [`Faults::seed`] makes reproducible.
//!
//! Faults and counts concern the data objects (keys with a `data` component) and the
//! barriers only: the volume record, the lease and the clock objects pass through untouched
//! unless [`Faults::every_key`] is set. [`Faults::refuse_conditional_puts`] makes the store
//! answer create-only PUTs as not implemented, as some S3-compatible servers do.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;

/// A kind of store operation that faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Object uploads (`put`).
    Put,
    /// Object downloads (`get`, `head`).
    Get,
    /// Object deletions.
    Delete,
    /// Listings.
    List,
    /// Making a local-directory store durable (`Backend::make_durable`, `sync_object`,
    /// `sync_object_dirs`): consulted by a [`crate::Backend`] given these faults with
    /// [`crate::Backend::with_faults`], since those barriers are not object store calls.
    Barrier,
}

impl Op {
    const ALL: [Op; 5] = [Op::Put, Op::Get, Op::Delete, Op::List, Op::Barrier];

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default, Clone)]
struct OpFaults {
    fail_first: u64,
    fail_fraction: f64,
    permanent: bool,
    latency: Duration,
    corrupt: bool,
}

/// The shared control of a [`FaultyStore`]. Cheap to clone; every clone controls the same store.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

struct FaultsInner {
    config: Mutex<HashMap<Op, OpFaults>>,
    calls: [AtomicU64; 5],
    injected: [AtomicU64; 5],
    gates: [watch::Sender<bool>; 5],
    waiting: [watch::Sender<u64>; 5],
    /// Draws the failures of `fail_fraction`.
    rng: Mutex<StdRng>,
    /// Faults and counts apply to every key, not only data objects.
    every_key: std::sync::atomic::AtomicBool,
    /// Create-only PUTs fail as not implemented.
    no_conditional_puts: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("config", &self.inner.config.lock().expect("not poisoned"))
            .finish()
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            inner: Arc::new(FaultsInner {
                config: Mutex::new(HashMap::new()),
                calls: Default::default(),
                injected: Default::default(),
                gates: std::array::from_fn(|_| watch::channel(false).0),
                waiting: std::array::from_fn(|_| watch::channel(0).0),
                rng: Mutex::new(StdRng::from_rng(&mut rand::rng())),
                every_key: Default::default(),
                no_conditional_puts: Default::default(),
            }),
        }
    }
}

impl Faults {
    /// Makes faults and counts apply to every key (the volume record, the lease), not only
    /// to data objects.
    pub fn every_key(&self, on: bool) {
        self.inner.every_key.store(on, Ordering::SeqCst);
    }

    /// Makes the store answer create-only PUTs ([`object_store::PutMode::Create`]) with
    /// "not implemented".
    pub fn refuse_conditional_puts(&self, on: bool) {
        self.inner.no_conditional_puts.store(on, Ordering::SeqCst);
    }

    fn update(&self, op: Op, f: impl FnOnce(&mut OpFaults)) {
        let mut config = self.inner.config.lock().expect("faults mutex poisoned");
        f(config.entry(op).or_default());
    }

    /// Makes the next `n` calls of `op` fail.
    pub fn fail_first(&self, op: Op, n: u64) {
        self.update(op, |c| c.fail_first = n);
    }

    /// Makes each call of `op` fail with probability `fraction` (0.0 to 1.0).
    pub fn fail_fraction(&self, op: Op, fraction: f64) {
        self.update(op, |c| c.fail_fraction = fraction.clamp(0.0, 1.0));
    }

    /// Restarts the generator behind [`Faults::fail_fraction`] from `seed`, so that a run can
    /// be replayed: the same sequence of calls then meets the same failures (concurrent calls
    /// may still reach the store in another order).
    pub fn seed(&self, seed: u64) {
        *self.inner.rng.lock().expect("faults rng mutex poisoned") = StdRng::seed_from_u64(seed);
    }

    /// Makes injected failures of `op` permanent (permission denied) instead of transient.
    pub fn permanent(&self, op: Op, permanent: bool) {
        self.update(op, |c| c.permanent = permanent);
    }

    /// Adds `latency` before every call of `op`.
    pub fn latency(&self, op: Op, latency: Duration) {
        self.update(op, |c| c.latency = latency);
    }

    /// Flips a byte in every object that is read back while `on`.
    pub fn corrupt_reads(&self, on: bool) {
        self.update(Op::Get, |c| c.corrupt = on);
    }

    /// Holds every call of `op` at a gate until [`Faults::release`] is called.
    pub fn hold(&self, op: Op) {
        self.inner.gates[op.index()].send_replace(true);
    }

    /// Opens the gate of `op`.
    pub fn release(&self, op: Op) {
        self.inner.gates[op.index()].send_replace(false);
    }

    /// Waits until at least `n` calls of `op` are waiting at its gate.
    pub async fn wait_held(&self, op: Op, n: u64) {
        let mut rx = self.inner.waiting[op.index()].subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|&w| w >= n).await;
    }

    /// Calls of `op` waiting at its gate now (a cancelled call no longer counts).
    pub fn held(&self, op: Op) -> u64 {
        *self.inner.waiting[op.index()].borrow()
    }

    /// Removes every fault and opens every gate; counters are kept.
    pub fn reset(&self) {
        self.inner
            .config
            .lock()
            .expect("faults mutex poisoned")
            .clear();
        for op in Op::ALL {
            self.release(op);
        }
    }

    /// Calls of `op` so far (including failed ones).
    pub fn calls(&self, op: Op) -> u64 {
        self.inner.calls[op.index()].load(Ordering::SeqCst)
    }

    /// Failures injected into `op` so far.
    pub fn injected(&self, op: Op) -> u64 {
        self.inner.injected[op.index()].load(Ordering::SeqCst)
    }

    /// Runs the faults of one durability barrier of a local-directory store.
    pub(crate) async fn barrier(&self, what: &str) -> object_store::Result<()> {
        self.before(Op::Barrier, what).await.map(|_| ())
    }

    /// Runs the faults of one call: counts it, waits at the gate, sleeps, maybe fails.
    /// Returns whether the result of a read must be corrupted.
    async fn before(&self, op: Op, key: &str) -> object_store::Result<bool> {
        let data = key.split('/').any(|part| part == "data");
        if op != Op::Barrier && !data && !self.inner.every_key.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let i = op.index();
        self.inner.calls[i].fetch_add(1, Ordering::SeqCst);
        let mut gate = self.inner.gates[i].subscribe();
        if *gate.borrow_and_update() {
            /// Counts a call at the gate until it passes or is dropped (cancelled).
            struct Waiting<'a>(&'a watch::Sender<u64>);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.send_modify(|w| *w -= 1);
                }
            }
            self.inner.waiting[i].send_modify(|w| *w += 1);
            let _waiting = Waiting(&self.inner.waiting[i]);
            let _ = gate.wait_for(|held| !held).await;
        }
        let (latency, fail, permanent, corrupt) = {
            let mut config = self.inner.config.lock().expect("faults mutex poisoned");
            let c = config.entry(op).or_default();
            let fail = if c.fail_first > 0 {
                c.fail_first -= 1;
                true
            } else {
                c.fail_fraction > 0.0
                    && self
                        .inner
                        .rng
                        .lock()
                        .expect("faults rng mutex poisoned")
                        .random_bool(c.fail_fraction)
            };
            (c.latency, fail, c.permanent, c.corrupt)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if fail {
            self.inner.injected[i].fetch_add(1, Ordering::SeqCst);
            let message = format!("injected {op:?} failure for {key}");
            return Err(if permanent {
                object_store::Error::PermissionDenied {
                    path: key.to_owned(),
                    source: message.into(),
                }
            } else {
                object_store::Error::Generic {
                    store: "FaultyStore",
                    source: message.into(),
                }
            });
        }
        Ok(corrupt)
    }
}

/// An [`ObjectStore`] that injects the faults configured in its [`Faults`].
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
}

impl FaultyStore {
    /// Wraps `inner`; returns the store and its control.
    pub fn new(inner: Arc<dyn ObjectStore>) -> (Arc<Self>, Faults) {
        let faults = Faults::default();
        (
            Arc::new(Self {
                inner,
                faults: faults.clone(),
            }),
            faults,
        )
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.faults.before(Op::Put, location.as_ref()).await?;
        if matches!(opts.mode, object_store::PutMode::Create)
            && self.faults.inner.no_conditional_puts.load(Ordering::SeqCst)
        {
            return Err(object_store::Error::NotImplemented {
                operation: "`put_opts` with mode `PutMode::Create`".into(),
                implementer: self.to_string(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.faults.before(Op::Put, location.as_ref()).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let corrupt = self.faults.before(Op::Get, location.as_ref()).await?;
        let result = self.inner.get_opts(location, options).await?;
        if !corrupt {
            return Ok(result);
        }
        let GetResult {
            meta,
            range,
            attributes,
            extensions,
            ..
        } = result;
        let bytes = self.inner.get(location).await?.bytes().await?;
        let mut data = bytes[range.start as usize..range.end as usize].to_vec();
        if let Some(first) = data.first_mut() {
            *first ^= 0xff;
        } else {
            data.push(0);
        }
        Ok(GetResult {
            payload: GetResultPayload::Stream(
                futures::stream::once(async move { Ok(Bytes::from(data)) }).boxed(),
            ),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.faults.before(Op::Get, location.as_ref()).await?;
        self.inner.get_ranges(location, ranges).await
    }

    /// Runs the faults of each deletion on its own, so that a bulk delete can fail for some
    /// objects and not others; up to 10 deletions run at once, in order.
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let faults = self.faults.clone();
        let inner = Arc::clone(&self.inner);
        locations
            .map(move |location| {
                let faults = faults.clone();
                let inner = Arc::clone(&inner);
                async move {
                    let location = location?;
                    faults.before(Op::Delete, location.as_ref()).await?;
                    inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .buffered(10)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let faults = self.faults.clone();
        let inner = Arc::clone(&self.inner);
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            faults
                .before(Op::List, prefix.as_ref().map_or("", |p| p.as_ref()))
                .await?;
            Ok::<_, object_store::Error>(inner.list(prefix.as_ref()))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.faults
            .before(Op::List, prefix.map_or("", |p| p.as_ref()))
            .await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.faults.before(Op::Put, to.as_ref()).await?;
        self.inner.copy_opts(from, to, options).await
    }
}
