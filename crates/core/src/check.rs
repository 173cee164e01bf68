//! `check`: the database, the store and the cache compared, with what does not fit named by
//! file and byte range where it can be, and (`repair`) fixed where that loses no data.
//!
//! Each comparison first finds candidates from a listing and a read of the metadata, then
//! looks at each candidate again (a lookup in the store, the row again, the block's lock),
//! so that a volume in use (a running daemon) is not reported for work in flight: an upload
//! recorded after the listing, a deletion done after it, a cache file being renamed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use blockcache_db::{BlockRef, ObjectState};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{BlockCache, BlockKey, Error, Result};

/// Default of [`CheckOptions::grace`]: an object nothing references must be this old (by the
/// store's clock) to count as leaked.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Default of [`CheckOptions::verify_rate`]: 32 MiB/s of downloads.
pub const DEFAULT_VERIFY_RATE: u64 = 32 << 20;

/// Downloads in flight at once with `verify_data`.
const VERIFY_DOWNLOADS: usize = 4;

/// Lookups in the store in flight at once.
const LOOKUPS: usize = 16;

/// What [`BlockCache::check`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Fix what can be fixed without losing data.
    pub repair: bool,
    /// Download every object and check its SHA-256.
    pub verify_data: bool,
    /// An object nothing references counts as leaked only once it is this old, by the
    /// store's own time stamp: younger ones may be uploads whose rows are not visible yet.
    pub grace: Duration,
    /// Most bytes per second downloaded by `verify_data`.
    pub verify_rate: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            repair: false,
            verify_data: false,
            grace: DEFAULT_GRACE,
            verify_rate: DEFAULT_VERIFY_RATE,
        }
    }
}

/// Bytes of a file (or, for blocks no file names, of an inode) that a broken object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenRange {
    /// The file's name, if the inode is a file's.
    pub file: Option<String>,
    /// The inode.
    pub inode: u64,
    /// The block.
    pub blockno: u64,
    /// First byte (in the file, or in the inode).
    pub start: u64,
    /// Byte after the last one.
    pub end: u64,
}

/// An object that blocks map to and whose upload was confirmed, but the store lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingInStore {
    /// The object.
    pub id: u64,
    /// Its key in the store.
    pub key: String,
    /// What it broke.
    pub ranges: Vec<BrokenRange>,
    /// Whether `repair` uploaded it again from a cached copy.
    pub fixed: bool,
}

/// An object in the store that no row names and no pending deletion will delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakedObject {
    /// The object id (from its key).
    pub id: u64,
    /// Its key.
    pub key: String,
    /// Its size in the store.
    pub size: u64,
    /// Its age by the store's time stamp, in seconds.
    pub age_seconds: u64,
    /// Whether `repair` deleted it.
    pub fixed: bool,
}

/// An object whose refcount is not the number of blocks mapping to it, or a row no block
/// maps to (`mappings` 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefcountProblem {
    /// The object.
    pub id: u64,
    /// The refcount recorded.
    pub refcount: u64,
    /// The blocks mapping to it.
    pub mappings: u64,
    /// Whether `repair` set it (an object with no mapping is released and deleted).
    pub fixed: bool,
}

/// An object the store holds, but not as it was uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedObject {
    /// The object.
    pub id: u64,
    /// Its key.
    pub key: String,
    /// What is wrong (another size, another SHA-256, not decodable).
    pub reason: String,
    /// What it breaks.
    pub ranges: Vec<BrokenRange>,
    /// Whether `repair` replaced it with a cached copy.
    pub fixed: bool,
}

/// A cache file (or an entry of the engine) that does not fit the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheProblem {
    /// The file.
    pub path: String,
    /// The block's inode.
    pub inode: u64,
    /// The block.
    pub blockno: u64,
    /// What is wrong.
    pub problem: String,
    /// Whether `repair` fixed it.
    pub fixed: bool,
}

/// What [`BlockCache::check`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether nothing found is left unfixed ([`CheckReport::is_consistent`]).
    pub consistent: bool,
    /// Whether repairs were asked for.
    pub repair: bool,
    /// Whether every object was downloaded and its SHA-256 checked.
    pub verify_data: bool,
    /// Object rows in the database.
    pub objects: u64,
    /// Objects the store listed.
    pub store_objects: u64,
    /// Block files in the cache directory.
    pub cache_files: u64,
    /// Objects downloaded and checked (`verify_data`).
    pub verified_objects: u64,
    /// Bytes of them (plaintext).
    pub verified_bytes: u64,
    /// Objects referenced but missing from the store.
    pub missing: Vec<MissingInStore>,
    /// Objects in the store nothing references, older than the grace period.
    pub leaked: Vec<LeakedObject>,
    /// Objects in the store nothing references yet, younger than the grace period (not a
    /// problem: they may be uploads in flight).
    pub unreferenced_young: u64,
    /// Refcounts that differ from the mappings.
    pub refcounts: Vec<RefcountProblem>,
    /// Objects the store holds with another size, or (`verify_data`) other content.
    pub damaged: Vec<DamagedObject>,
    /// Cache files and entries that do not fit.
    pub cache: Vec<CacheProblem>,
    /// Metadata objects in the store that cannot be used (every complete generation is
    /// read), with why. A repair writes a new generation from the shipped state.
    pub metadata: Vec<MetadataProblem>,
    /// Repairs that were tried and failed, with why.
    pub repair_errors: Vec<String>,
}

/// A metadata object in the store that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataProblem {
    /// What is wrong, naming the object.
    pub problem: String,
    /// The generation it belongs to.
    pub generation: u64,
    /// Whether a newer complete generation is readable (a restore uses that one): written
    /// by a repair, or there already.
    pub fixed: bool,
}

impl CheckReport {
    /// Whether the volume is consistent: nothing was found, or everything found was fixed.
    pub fn is_consistent(&self) -> bool {
        self.missing.iter().all(|m| m.fixed)
            && self.leaked.iter().all(|l| l.fixed)
            && self.refcounts.iter().all(|r| r.fixed)
            && self.damaged.iter().all(|d| d.fixed)
            && self.cache.iter().all(|c| c.fixed)
            && self.metadata.iter().all(|m| m.fixed)
            && self.repair_errors.is_empty()
    }

    /// How many problems were found (fixed or not).
    pub fn problems(&self) -> usize {
        self.missing.len()
            + self.leaked.len()
            + self.refcounts.len()
            + self.damaged.len()
            + self.cache.len()
            + self.metadata.len()
    }

    /// How many problems were found and are not fixed.
    pub fn unfixed(&self) -> usize {
        self.missing.iter().filter(|m| !m.fixed).count()
            + self.leaked.iter().filter(|l| !l.fixed).count()
            + self.refcounts.iter().filter(|r| !r.fixed).count()
            + self.damaged.iter().filter(|d| !d.fixed).count()
            + self.cache.iter().filter(|c| !c.fixed).count()
            + self.metadata.iter().filter(|m| !m.fixed).count()
    }
}

fn fixed_word(fixed: bool, repair: bool) -> &'static str {
    match (fixed, repair) {
        (true, _) => " [fixed]",
        (false, true) => " [NOT FIXED]",
        (false, false) => "",
    }
}

fn write_ranges(f: &mut fmt::Formatter<'_>, ranges: &[BrokenRange]) -> fmt::Result {
    for r in ranges {
        match &r.file {
            Some(name) => writeln!(
                f,
                "    file {name:?} bytes {}..{} (block {})",
                r.start, r.end, r.blockno
            )?,
            None => writeln!(
                f,
                "    inode {} block {} (bytes {}..{} of the inode; no file names it)",
                r.inode, r.blockno, r.start, r.end
            )?,
        }
    }
    Ok(())
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let repair = self.repair;
        writeln!(
            f,
            "checked {} objects in the database, {} in the store, {} cache files{}",
            self.objects,
            self.store_objects,
            self.cache_files,
            if self.verify_data {
                format!(
                    "; downloaded and verified {} objects ({} bytes)",
                    self.verified_objects, self.verified_bytes
                )
            } else {
                String::new()
            }
        )?;
        for m in &self.missing {
            writeln!(
                f,
                "missing from the store: object {} ({}){}",
                m.id,
                m.key,
                fixed_word(m.fixed, repair)
            )?;
            if repair && !m.fixed {
                writeln!(
                    f,
                    "    no copy in the cache: these bytes cannot be had again; reads of them fail"
                )?;
            }
            write_ranges(f, &m.ranges)?;
        }
        for d in &self.damaged {
            writeln!(
                f,
                "damaged in the store: object {} ({}): {}{}",
                d.id,
                d.key,
                d.reason,
                fixed_word(d.fixed, repair)
            )?;
            if repair && !d.fixed {
                writeln!(
                    f,
                    "    no copy in the cache: these bytes cannot be had again; reads of them fail"
                )?;
            }
            write_ranges(f, &d.ranges)?;
        }
        for l in &self.leaked {
            writeln!(
                f,
                "leaked (nothing references it): object {} ({}), {} bytes, {} s old{}",
                l.id,
                l.key,
                l.size,
                l.age_seconds,
                fixed_word(l.fixed, repair)
            )?;
        }
        for r in &self.refcounts {
            if r.mappings == 0 {
                writeln!(
                    f,
                    "object {} has a row (refcount {}) but no block maps to it{}",
                    r.id,
                    r.refcount,
                    fixed_word(r.fixed, repair)
                )?;
            } else {
                writeln!(
                    f,
                    "refcount of object {} is {} but {} blocks map to it{}",
                    r.id,
                    r.refcount,
                    r.mappings,
                    fixed_word(r.fixed, repair)
                )?;
            }
        }
        for c in &self.cache {
            writeln!(
                f,
                "cache: {}: {}{}",
                c.path,
                c.problem,
                fixed_word(c.fixed, repair)
            )?;
        }
        for m in &self.metadata {
            writeln!(
                f,
                "metadata in the store: {}{}",
                m.problem,
                if m.fixed {
                    " [a newer complete generation is readable: a restore uses that]"
                } else {
                    fixed_word(false, repair)
                }
            )?;
        }
        for e in &self.repair_errors {
            writeln!(f, "repair failed: {e}")?;
        }
        if self.unreferenced_young > 0 {
            writeln!(
                f,
                "{} unreferenced objects younger than the grace period were left alone (uploads may be in flight)",
                self.unreferenced_young
            )?;
        }
        let found = match self.problems() {
            1 => "1 problem".to_owned(),
            n => format!("{n} problems"),
        };
        if self.problems() == 0 && self.is_consistent() {
            write!(f, "consistent: no problems found")
        } else if self.is_consistent() {
            write!(f, "consistent: {found} found, all fixed")
        } else if repair {
            write!(
                f,
                "NOT consistent: {found} found, {} not fixed",
                self.unfixed() + self.repair_errors.len()
            )
        } else {
            write!(
                f,
                "NOT consistent: {found} found (--repair fixes what can be fixed without losing data)"
            )
        }
    }
}

/// The ranges that the blocks `refs` of an object of `length` bytes hold.
fn ranges(refs: &[&BlockRef], length: u64, block_size: u64) -> Vec<BrokenRange> {
    refs.iter()
        .map(|r| {
            let start = r.blockno.saturating_mul(block_size);
            let mut end = start.saturating_add(length);
            if let Some((_, size)) = &r.file {
                end = end.min(*size).max(start.min(*size));
            }
            BrokenRange {
                file: r.file.as_ref().map(|(n, _)| n.clone()),
                inode: r.inode,
                blockno: r.blockno,
                start: r.file.as_ref().map_or(start, |(_, s)| start.min(*s)),
                end,
            }
        })
        .collect()
}

fn store_error(action: &'static str) -> impl Fn(blockcache_backend::Error) -> Error {
    move |e| Error::Store {
        action,
        source: Arc::new(e),
    }
}

impl BlockCache {
    /// Compares the database, the store and the cache directory, and with
    /// [`CheckOptions::repair`] fixes what can be fixed without losing data (see
    /// [`CheckReport`]). Works while the cache is in use. Fails only when the check itself
    /// cannot run (the store cannot be listed, the database cannot be read).
    pub async fn check(&self, opts: CheckOptions) -> Result<CheckReport> {
        let inner = self.engine();
        let backend = inner.backend();
        let db = inner.db();
        let block_size = inner.config().block_size;
        // The store first: an object written after the listing has its row by the time the
        // rows are read, so it is never taken for a leak.
        let listed = backend
            .list_objects()
            .await
            .map_err(store_error("list the objects"))?;
        let objects = db.check_objects().await?;
        let pending: HashSet<u64> = db.pending_deletions().await?.into_iter().collect();
        let rows: HashMap<u64, blockcache_db::CheckedObject> =
            objects.iter().map(|o| (o.id, *o)).collect();
        let in_store: HashMap<u64, blockcache_backend::StoredObject> =
            listed.iter().map(|o| (o.id, *o)).collect();
        let mut report = CheckReport {
            consistent: true,
            repair: opts.repair,
            verify_data: opts.verify_data,
            objects: objects.len() as u64,
            store_objects: listed.len() as u64,
            cache_files: 0,
            verified_objects: 0,
            verified_bytes: 0,
            missing: Vec::new(),
            leaked: Vec::new(),
            unreferenced_young: 0,
            refcounts: Vec::new(),
            damaged: Vec::new(),
            cache: Vec::new(),
            metadata: Vec::new(),
            repair_errors: Vec::new(),
        };

        // Referenced, confirmed, not listed: looked up again (an upload confirmed after the
        // listing is there now).
        let candidates: Vec<u64> = objects
            .iter()
            .filter(|o| o.state == ObjectState::Uploaded && !in_store.contains_key(&o.id))
            .map(|o| o.id)
            .collect();
        let missing: Vec<u64> = futures::stream::iter(candidates)
            .map(|id| async move {
                let found = backend
                    .head(id)
                    .await
                    .map_err(store_error("look up an object"))?;
                if found.is_some() {
                    return Ok(None);
                }
                let row = db.object(id).await?;
                Ok::<_, Error>(
                    row.filter(|o| o.state == ObjectState::Uploaded)
                        .map(|o| o.id),
                )
            })
            .buffered(LOOKUPS)
            .try_filter_map(|id| async move { Ok(id) })
            .try_collect()
            .await?;

        // Listed with another size than uploaded.
        let mut damaged: Vec<(u64, String)> = objects
            .iter()
            .filter_map(|o| {
                let stored = in_store.get(&o.id)?;
                let expected = o.stored_size?;
                (o.state == ObjectState::Uploaded && stored.size != expected).then(|| {
                    (
                        o.id,
                        format!(
                            "the store holds {} bytes, {expected} were uploaded",
                            stored.size
                        ),
                    )
                })
            })
            .collect();

        // Listed, no row, no pending deletion, not named by the shipped metadata: old enough,
        // and still there, is a leak. Ages
        // are told by the store's clock (a fresh object's stamp), never against this host's.
        let unreferenced: Vec<&blockcache_backend::StoredObject> = listed
            .iter()
            .filter(|o| !rows.contains_key(&o.id) && !pending.contains(&o.id))
            .collect();
        let now = if unreferenced.is_empty() {
            SystemTime::now()
        } else {
            backend
                .store_time()
                .await
                .map_err(store_error("read the store's clock"))?
        };
        let mut leak_candidates = Vec::new();
        for o in unreferenced {
            let age = now.duration_since(o.last_modified).unwrap_or_default();
            if age >= opts.grace {
                leak_candidates.push((*o, age));
            } else {
                report.unreferenced_young += 1;
            }
        }
        if !leak_candidates.is_empty() {
            let pending: HashSet<u64> = db.pending_deletions().await?.into_iter().collect();
            // An object the metadata in the store still names is not a leak: a restore
            // from that metadata needs it.
            let ids: Vec<u64> = leak_candidates.iter().map(|(o, _)| o.id).collect();
            let shipped = db.shipped_among(&ids).await?;
            for (o, age) in leak_candidates {
                if pending.contains(&o.id)
                    || shipped.contains(&o.id)
                    || db.object(o.id).await?.is_some()
                {
                    continue;
                }
                let still = backend
                    .head(o.id)
                    .await
                    .map_err(store_error("look up an object"))?;
                if still.is_none() {
                    continue;
                }
                report.leaked.push(LeakedObject {
                    id: o.id,
                    key: backend.key(o.id).to_string(),
                    size: o.size,
                    age_seconds: age.as_secs(),
                    fixed: false,
                });
            }
        }

        report.refcounts = db
            .refcount_mismatches()
            .await?
            .into_iter()
            .map(|m| RefcountProblem {
                id: m.id,
                refcount: m.refcount,
                mappings: m.mappings,
                fixed: false,
            })
            .collect();

        if opts.verify_data {
            let missing_set: HashSet<u64> = missing.iter().copied().collect();
            let already: HashSet<u64> = damaged.iter().map(|(id, _)| *id).collect();
            let todo: Vec<(u64, u64)> = objects
                .iter()
                .filter(|o| {
                    o.state == ObjectState::Uploaded
                        && !missing_set.contains(&o.id)
                        && !already.contains(&o.id)
                        && in_store.contains_key(&o.id)
                })
                .map(|o| (o.id, o.length))
                .collect();
            let (count, bytes, bad) = self.verify_objects(todo, opts.verify_rate).await?;
            report.verified_objects = count;
            report.verified_bytes = bytes;
            damaged.extend(bad);
        }

        // What the broken objects break.
        let broken: Vec<u64> = missing
            .iter()
            .copied()
            .chain(damaged.iter().map(|(id, _)| *id))
            .collect();
        let refs = db.blocks_of_objects(&broken).await?;
        let mut by_object: HashMap<u64, Vec<&BlockRef>> = HashMap::new();
        for r in &refs {
            by_object.entry(r.obj_id).or_default().push(r);
        }
        let length = |id: u64| rows.get(&id).map_or(block_size, |o| o.length);
        let blocks_of = |id: u64| by_object.get(&id).map_or(&[][..], Vec::as_slice);
        report.missing = missing
            .iter()
            .map(|&id| MissingInStore {
                id,
                key: backend.key(id).to_string(),
                ranges: ranges(blocks_of(id), length(id), block_size),
                fixed: false,
            })
            .collect();
        report.damaged = damaged
            .into_iter()
            .map(|(id, reason)| DamagedObject {
                id,
                key: backend.key(id).to_string(),
                reason,
                ranges: ranges(blocks_of(id), length(id), block_size),
                fixed: false,
            })
            .collect();

        let (cache, files) = inner.check_cache(opts.repair).await?;
        report.cache_files = files;
        report.cache = cache
            .into_iter()
            .map(|c| CacheProblem {
                path: c.path.display().to_string(),
                inode: c.key.inode,
                blockno: c.key.blockno,
                problem: c.problem,
                fixed: c.fixed,
            })
            .collect();

        if opts.repair {
            self.repair(&mut report, &by_object).await?;
        }
        let volume = db.volume_id().await?.id;
        let (problems, newest) = crate::restore::check_generations(backend, &volume).await?;
        // What a restore would use is the newest complete generation: problems of older
        // ones are told, but a readable newest generation makes them harmless.
        report.metadata = problems
            .into_iter()
            .map(|(generation, problem)| MetadataProblem {
                problem,
                generation,
                fixed: Some(generation) != newest,
            })
            .collect();
        if opts.repair && report.metadata.iter().any(|m| !m.fixed) {
            match inner.write_new_generation().await {
                Ok(_) => {
                    for m in &mut report.metadata {
                        m.fixed = true;
                    }
                }
                Err(e) => report.repair_errors.push(format!(
                    "writing a new metadata generation failed: {}",
                    blockcache_backend::chain(&e)
                )),
            }
        }
        report.consistent = report.is_consistent();
        Ok(report)
    }

    /// Downloads `objects` (id, length) a few at a time, at most `rate` bytes per second,
    /// and checks each against its row. Returns how many were checked, their bytes, and
    /// those that do not match (with why).
    async fn verify_objects(
        &self,
        objects: Vec<(u64, u64)>,
        rate: u64,
    ) -> Result<(u64, u64, Vec<(u64, String)>)> {
        let inner = self.engine();
        let (backend, db) = (inner.backend(), inner.db());
        let rate = rate.max(1) as f64;
        let start = tokio::time::Instant::now();
        // Each download starts no earlier than the bytes before it allow at `rate`: paced
        // by the timer, never by spinning.
        let mut before = 0u64;
        let slots: Vec<(u64, u64, tokio::time::Instant)> = objects
            .into_iter()
            .map(|(id, len)| {
                let at = start + Duration::from_secs_f64(before as f64 / rate);
                before += len;
                (id, len, at)
            })
            .collect();
        let results: Vec<Option<(u64, u64, Option<String>)>> = futures::stream::iter(slots)
            .map(|(id, _, at)| async move {
                tokio::time::sleep_until(at).await;
                let Some(row) = db.object(id).await? else {
                    return Ok(None);
                };
                let Some(hash) = row.hash else {
                    return Ok(None);
                };
                match backend.get(id).await {
                    Ok(data) => {
                        let len = data.len() as u64;
                        let bad = if len != row.length {
                            Some(format!(
                                "it decodes to {len} bytes instead of {}",
                                row.length
                            ))
                        } else {
                            let actual: [u8; 32] = Sha256::digest(&data).into();
                            (actual != hash).then(|| {
                                format!(
                                    "its content has SHA-256 {} instead of {}",
                                    hex::encode(actual),
                                    hex::encode(hash)
                                )
                            })
                        };
                        Ok(Some((id, len, bad)))
                    }
                    // Deleted since it was listed (released meanwhile).
                    Err(blockcache_backend::Error::NotFound { .. }) => Ok(None),
                    Err(e @ blockcache_backend::Error::Format { .. }) => {
                        Ok(Some((id, 0, Some(blockcache_backend::chain(&e)))))
                    }
                    Err(e) => Err(store_error("download an object to verify it")(e)),
                }
            })
            .buffered(VERIFY_DOWNLOADS)
            .try_collect()
            .await?;
        let mut count = 0;
        let mut bytes = 0;
        let mut bad = Vec::new();
        for (id, len, problem) in results.into_iter().flatten() {
            count += 1;
            bytes += len;
            if let Some(problem) = problem {
                bad.push((id, problem));
            }
        }
        Ok((count, bytes, bad))
    }

    /// Fixes what `report` found and can be fixed without losing data, marking each fixed
    /// problem: refcounts rebuilt from the mappings (one transaction; objects no block maps
    /// to are released and deleted), leaked objects deleted through the durable removal
    /// path, and missing or damaged objects uploaded again from a cached copy whose SHA-256
    /// is the object's. A repair that fails is told in `repair_errors`.
    async fn repair(
        &self,
        report: &mut CheckReport,
        blocks: &HashMap<u64, Vec<&BlockRef>>,
    ) -> Result<()> {
        let inner = self.engine();
        let (backend, db) = (inner.backend(), inner.db());
        backend.retry_now();
        if !report.refcounts.is_empty() {
            let (changed, released) = inner.rebuild_refcounts().await?;
            let changed: HashSet<u64> = changed.iter().map(|m| m.id).collect();
            let deleted = inner.delete_released(released).await;
            if let Err(e) = &deleted {
                report.repair_errors.push(format!(
                    "deleting objects released by the refcount rebuild failed (their deletions stay pending and are retried): {}",
                    blockcache_backend::chain(e)
                ));
            }
            for r in &mut report.refcounts {
                // Rebuilt (or, found at 0 mappings, released): the row is right now.
                r.fixed = changed.contains(&r.id) || db.object(r.id).await?.is_none();
            }
        }
        if !report.leaked.is_empty() {
            let ids: Vec<u64> = report.leaked.iter().map(|l| l.id).collect();
            let recorded: HashSet<u64> = db.queue_deletions(&ids).await?.into_iter().collect();
            match inner.delete_released(recorded.iter().copied().collect()).await {
                Ok(()) => {
                    for l in &mut report.leaked {
                        l.fixed = recorded.contains(&l.id);
                    }
                }
                Err(e) => report.repair_errors.push(format!(
                    "deleting leaked objects failed (their deletions stay pending and are retried): {}",
                    blockcache_backend::chain(&e)
                )),
            }
        }
        let mut uploaded = Vec::new();
        let mut fixed = HashSet::new();
        let broken: Vec<(u64, bool)> = report
            .missing
            .iter()
            .map(|m| (m.id, false))
            .chain(report.damaged.iter().map(|d| (d.id, true)))
            .collect();
        for (id, replace) in broken {
            let Some(row) = db.object(id).await? else {
                // Released meanwhile (by the refcount rebuild, or a removal): nothing
                // references it any more.
                fixed.insert(id);
                continue;
            };
            let Some(hash) = row.hash else {
                continue;
            };
            let keys: Vec<BlockKey> = blocks
                .get(&id)
                .into_iter()
                .flatten()
                .map(|r| BlockKey::new(r.inode, r.blockno))
                .collect();
            let Some(bytes) = inner.cached_copy(&keys, hash, row.length).await else {
                continue;
            };
            let put = async {
                if replace {
                    // Objects are written create-only: the damaged one goes first. A crash
                    // in between leaves it missing, with the cached copy still there for
                    // the next repair.
                    backend.delete_many(&[id]).await?;
                }
                backend.put(id, bytes).await
            };
            match put.await {
                Ok(size) => {
                    if row.stored_size != Some(size) {
                        db.set_stored_size(id, size).await?;
                    }
                    uploaded.push(id);
                }
                Err(e) => report.repair_errors.push(format!(
                    "uploading object {id} again from the cache failed: {}",
                    blockcache_backend::chain(&e)
                )),
            }
        }
        if !uploaded.is_empty() {
            match backend.make_durable().await {
                Ok(()) => fixed.extend(uploaded),
                Err(e) => report.repair_errors.push(format!(
                    "making the objects uploaded again durable failed: {}",
                    blockcache_backend::chain(&e)
                )),
            }
        }
        for m in &mut report.missing {
            m.fixed = fixed.contains(&m.id);
        }
        for d in &mut report.damaged {
            d.fixed = fixed.contains(&d.id);
        }
        Ok(())
    }
}
