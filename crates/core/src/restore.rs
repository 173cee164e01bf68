//! Rebuilding a volume's database from its store alone (`blockcache restore`).
//!
//! The store's volume record gives the volume's identity and format (the key is checked
//! against it); the writer lease is taken, so that no live writer races the restore; then
//! the newest complete metadata generation (or the one asked for) is applied to the empty
//! database: its snapshot parts, then its deltas in order. A generation whose manifest or a
//! part cannot be read is skipped for the one before it (unless it was asked for by
//! number), and the report says why; a delta that cannot be read ends the chain there,
//! also said. Finally every object the restored metadata names is looked up in the store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use blockcache_backend::Backend;
use blockcache_backend::lease::{Holder, LeaseRequest, first_object_id};
use blockcache_backend::meta::{ListedMeta, MetaObject};
use blockcache_db::{Db, MetaRows, RestoreVolume, RestoredCounts};
use serde::Serialize;

use crate::metadata::{DeltaDoc, ManifestDoc, PartDoc, check_doc};
use crate::volume::{check_record, store_format};
use crate::{Config, Error, Result, Secret};

/// What to restore, and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The volume's encryption secret, if it is encrypted.
    pub encryption: Option<Secret>,
    /// The generation to restore; the newest complete one if `None`.
    pub generation: Option<u64>,
    /// Take the writer lease even if its holder's has not expired (its machine is dead).
    pub force_takeover: bool,
    /// Time to live of the lease taken meanwhile.
    pub lease_ttl: Duration,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            encryption: None,
            generation: None,
            force_takeover: false,
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// One metadata generation in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerationInfo {
    /// Its number.
    pub generation: u64,
    /// Whether its manifest is there (only complete generations are restored).
    pub complete: bool,
    /// Snapshot parts found.
    pub parts: u64,
    /// Deltas found.
    pub deltas: u64,
    /// Bytes of its objects in the store.
    pub bytes: u64,
    /// When its last object was written (RFC 3339, by the store's clock).
    pub last_written: String,
}

/// Where a restore is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreProgress {
    /// Metadata objects read of the generation being restored.
    pub done: u64,
    /// Metadata objects it has.
    pub total: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The volume restored.
    pub volume: String,
    /// The generation restored.
    pub generation: u64,
    /// Deltas of it applied.
    pub deltas: u64,
    /// Newer generations that could not be used, and why.
    pub skipped: Vec<String>,
    /// Why the chain of deltas ended before the last one in the store, if it did.
    pub stopped: Option<String>,
    /// What the restored database holds.
    pub counts: RestoredCounts,
    /// Objects the restored metadata names that the store does not hold.
    pub missing_objects: Vec<u64>,
    /// Files whose blocks name missing objects (at most 100 named).
    pub broken_files: Vec<String>,
    /// The lease epoch taken.
    pub epoch: u64,
}

fn store_error(action: &'static str) -> impl FnOnce(blockcache_backend::Error) -> Error {
    move |e| match e {
        blockcache_backend::Error::LeaseHeld(_) | blockcache_backend::Error::StaleCopy(_) => {
            Error::VolumeRefused(format!(
                "{e}; a restore needs the volume's lease: stop the daemon that holds it, or, if its machine is dead, use --force-takeover"
            ))
        }
        e => Error::Store {
            action,
            source: Arc::new(e),
        },
    }
}

/// The generations in a store's listing, oldest first.
pub fn generations(listing: &[ListedMeta]) -> Vec<GenerationInfo> {
    let mut out: BTreeMap<u64, GenerationInfo> = BTreeMap::new();
    for m in listing {
        let g = out
            .entry(m.object.generation())
            .or_insert_with(|| GenerationInfo {
                generation: m.object.generation(),
                complete: false,
                parts: 0,
                deltas: 0,
                bytes: 0,
                last_written: String::new(),
            });
        match m.object {
            MetaObject::Manifest { .. } => g.complete = true,
            MetaObject::Part { .. } => g.parts += 1,
            MetaObject::Delta { .. } => g.deltas += 1,
        }
        g.bytes += m.size;
        let written = m.modified.to_rfc3339();
        if written > g.last_written {
            g.last_written = written;
        }
    }
    out.into_values().collect()
}

/// The metadata generations of the store of `backend`.
pub async fn list_generations(backend: &Backend) -> Result<Vec<GenerationInfo>> {
    let listing = backend
        .list_meta()
        .await
        .map_err(store_error("list the metadata in the store"))?;
    Ok(generations(&listing))
}

/// Rebuilds the volume in `backend`'s store into `db`, which must be new and empty.
/// `progress` is called after each metadata object read.
pub async fn restore(
    db: &Db,
    backend: Backend,
    options: &RestoreOptions,
    progress: &(dyn Fn(RestoreProgress) + Send + Sync),
) -> Result<RestoreReport> {
    let db_error = |e| Error::Db(Arc::new(e));
    if !db.is_fresh().await.map_err(db_error)? || !db.is_empty_volume().await.map_err(db_error)? {
        return Err(Error::VolumeRefused(
            "the database to restore into is not empty: a restore builds a new database; use an empty data directory".to_owned(),
        ));
    }
    let record = backend
        .read_volume()
        .await
        .map_err(store_error("read the volume record"))?
        .ok_or_else(|| {
            Error::Metadata(
                "the store holds no volume record: nothing to restore (is --store, with its prefix, the volume's store?)".to_owned(),
            )
        })?;
    // The settings the volume's record asks for; only the secret comes from the user.
    let config = Config {
        block_size: record.block_size,
        compression: if record.object_format == blockcache_backend::volume::ObjectFormat::Plain {
            blockcache_backend::format::Compression::None
        } else {
            blockcache_backend::format::Compression::default()
        },
        encryption: options.encryption.clone(),
        ..Config::new(std::env::temp_dir())
    };
    check_record(&config, &record)?;
    let format = store_format(&config, &record)?;
    let backend = backend.with_format(format);
    let holder_path = db.path().unwrap_or_else(std::env::temp_dir);
    let lease = backend
        .acquire_lease(LeaseRequest {
            holder: Holder::this_process(&holder_path),
            ttl: options.lease_ttl,
            force: options.force_takeover,
            last_epoch: None,
        })
        .await
        .map_err(store_error("take the volume's lease"))?;
    let epoch = lease.first_epoch();
    let backend = backend.with_lease(lease.clone());
    let restored = async {
        let report = restore_locked(db, &backend, &record.id, options, progress).await?;
        db.record_lease_epoch(epoch).await.map_err(db_error)?;
        db.claim_object_ids(first_object_id(epoch))
            .await
            .map_err(db_error)?;
        Ok::<_, Error>(report)
    }
    .await;
    // Released whatever happened: the first open of the restored database takes it again.
    lease.release(&backend).await;
    Ok(RestoreReport { epoch, ..restored? })
}

async fn restore_locked(
    db: &Db,
    backend: &Backend,
    volume: &str,
    options: &RestoreOptions,
    progress: &(dyn Fn(RestoreProgress) + Send + Sync),
) -> Result<RestoreReport> {
    let db_error = |e| Error::Db(Arc::new(e));
    let listing = backend
        .list_meta()
        .await
        .map_err(store_error("list the metadata in the store"))?;
    let found: BTreeSet<MetaObject> = listing.iter().map(|m| m.object).collect();
    let mut candidates: Vec<u64> = generations(&listing)
        .into_iter()
        .filter(|g| g.complete)
        .map(|g| g.generation)
        .collect();
    candidates.reverse();
    if let Some(wanted) = options.generation {
        if !candidates.contains(&wanted) {
            return Err(Error::Metadata(format!(
                "generation {wanted} is not a complete generation in the store (complete ones: {})",
                list(&candidates)
            )));
        }
        candidates = vec![wanted];
    }
    if candidates.is_empty() {
        return Err(Error::Metadata(
            "the store holds no complete metadata generation: the volume never shipped its metadata (it ships at every flush), or it was removed".to_owned(),
        ));
    }
    let mut skipped = Vec::new();
    for generation in candidates {
        match apply_generation(db, backend, volume, generation, &found, progress).await {
            Ok((manifest, deltas, stopped)) => {
                let counts = db
                    .restore_finish(&RestoreVolume {
                        id: volume.to_owned(),
                        block_size: manifest.block_size,
                        namespace_floor: manifest.namespace_floor,
                    })
                    .await
                    .map_err(db_error)?;
                let (missing_objects, broken_files) = missing(db, backend).await?;
                for reason in &skipped {
                    tracing::warn!("{reason}");
                }
                return Ok(RestoreReport {
                    volume: volume.to_owned(),
                    generation,
                    deltas,
                    skipped,
                    stopped,
                    counts,
                    missing_objects,
                    broken_files,
                    epoch: 0,
                });
            }
            Err(e) => {
                db.restore_reset().await.map_err(db_error)?;
                if options.generation.is_some() {
                    return Err(e);
                }
                skipped.push(format!("generation {generation} could not be used: {e}"));
            }
        }
    }
    Err(Error::Metadata(format!(
        "no metadata generation in the store could be read: {}",
        skipped.join("; ")
    )))
}

fn list(v: &[u64]) -> String {
    if v.is_empty() {
        return "none".to_owned();
    }
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

fn bad(object: MetaObject, why: impl std::fmt::Display) -> Error {
    Error::Metadata(format!("metadata object {} {why}", object.name()))
}

async fn read_doc<T: serde::de::DeserializeOwned>(
    backend: &Backend,
    object: MetaObject,
) -> Result<T> {
    let bytes = backend.get_meta(object).await.map_err(|e| {
        bad(
            object,
            format!("cannot be read: {}", blockcache_backend::chain(&e)),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad(object, format!("does not decode: {e}")))
}

/// Applies generation `generation`; returns its manifest, the deltas applied and why the
/// chain stopped early, if it did.
async fn apply_generation(
    db: &Db,
    backend: &Backend,
    volume: &str,
    generation: u64,
    found: &BTreeSet<MetaObject>,
    progress: &(dyn Fn(RestoreProgress) + Send + Sync),
) -> Result<(ManifestDoc, u64, Option<String>)> {
    let db_error = |e| Error::Db(Arc::new(e));
    let manifest_object = MetaObject::Manifest { generation };
    let manifest: ManifestDoc = read_doc(backend, manifest_object).await?;
    check_doc(manifest.version, &manifest.volume, volume).map_err(|e| bad(manifest_object, e))?;
    if manifest.generation != generation {
        return Err(bad(
            manifest_object,
            format!("names generation {}", manifest.generation),
        ));
    }
    let deltas_found: Vec<u64> = found
        .iter()
        .filter_map(|o| match *o {
            MetaObject::Delta { generation: g, seq } if g == generation => Some(seq),
            _ => None,
        })
        .collect();
    let total = 1 + u64::from(manifest.parts) + deltas_found.len() as u64;
    let mut done = 1;
    progress(RestoreProgress { done, total });
    for part in 0..manifest.parts {
        let object = MetaObject::Part { generation, part };
        let doc: PartDoc = read_doc(backend, object).await?;
        check_doc(doc.version, &doc.volume, volume).map_err(|e| bad(object, e))?;
        if doc.generation != generation || doc.part != part {
            return Err(bad(
                object,
                format!("is part {} of generation {}", doc.part, doc.generation),
            ));
        }
        db.restore_apply(&doc.rows).await.map_err(db_error)?;
        done += 1;
        progress(RestoreProgress { done, total });
    }
    let mut applied = 0;
    let mut stopped = None;
    for (i, &seq) in deltas_found.iter().enumerate() {
        let expected = i as u64 + 1;
        if seq != expected {
            stopped = Some(format!(
                "delta {expected} of generation {generation} is missing from the store; deltas from {seq} on were not applied"
            ));
            break;
        }
        let object = MetaObject::Delta { generation, seq };
        let doc: Result<DeltaDoc> = read_doc(backend, object).await;
        let doc = match doc.and_then(|d| {
            check_doc(d.version, &d.volume, volume).map_err(|e| bad(object, e))?;
            if d.generation != generation || d.seq != seq {
                return Err(bad(
                    object,
                    format!("is delta {} of generation {}", d.seq, d.generation),
                ));
            }
            Ok(d)
        }) {
            Ok(d) => d,
            Err(e) => {
                stopped = Some(format!(
                    "{e}; the deltas from {seq} on were not applied (the restore holds the volume as of delta {})",
                    seq - 1
                ));
                break;
            }
        };
        apply_rows(db, &doc.rows).await?;
        applied = seq;
        done += 1;
        progress(RestoreProgress { done, total });
    }
    if let Some(s) = &stopped {
        tracing::warn!("{s}");
    }
    Ok((manifest, applied, stopped))
}

async fn apply_rows(db: &Db, rows: &MetaRows) -> Result<()> {
    db.restore_apply(rows)
        .await
        .map_err(|e| Error::Db(Arc::new(e)))
}

/// Objects the restored database names that the store lacks, and the files they break.
async fn missing(db: &Db, backend: &Backend) -> Result<(Vec<u64>, Vec<String>)> {
    let in_store: HashSet<u64> = backend
        .list_ids()
        .await
        .map_err(store_error("list the store's objects"))?
        .into_iter()
        .collect();
    let named = db.object_ids().await.map_err(|e| Error::Db(Arc::new(e)))?;
    let missing: Vec<u64> = named
        .into_iter()
        .filter(|id| !in_store.contains(id))
        .collect();
    let files = if missing.is_empty() {
        Vec::new()
    } else {
        db.files_naming(&missing, 100)
            .await
            .map_err(|e| Error::Db(Arc::new(e)))?
    };
    Ok((missing, files))
}

/// Reads every metadata object of every complete generation in the store (with `backend`'s
/// format: the volume's key) and says which cannot be used, and why, with their generation;
/// also the newest complete generation. For `check`.
pub async fn check_generations(
    backend: &Backend,
    volume: &str,
) -> Result<(Vec<(u64, String)>, Option<u64>)> {
    let listing = backend
        .list_meta()
        .await
        .map_err(store_error("list the metadata in the store"))?;
    let mut problems = Vec::new();
    let mut newest = None;
    for info in generations(&listing) {
        let generation = info.generation;
        if !info.complete {
            continue;
        }
        newest = Some(generation);
        let mut problems = Problems {
            generation,
            list: &mut problems,
        };
        let manifest_object = MetaObject::Manifest { generation };
        let manifest: ManifestDoc = match read_doc(backend, manifest_object).await {
            Ok(m) => m,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        if let Err(e) = check_doc(manifest.version, &manifest.volume, volume) {
            problems.push(bad(manifest_object, e).to_string());
            continue;
        }
        for part in 0..manifest.parts {
            let object = MetaObject::Part { generation, part };
            match read_doc::<PartDoc>(backend, object).await {
                Ok(doc) => {
                    if let Err(e) = check_doc(doc.version, &doc.volume, volume) {
                        problems.push(bad(object, e).to_string());
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let mut expected = 1;
        for m in &listing {
            let MetaObject::Delta { generation: g, seq } = m.object else {
                continue;
            };
            if g != generation {
                continue;
            }
            if seq != expected {
                problems.push(format!(
                    "delta {expected} of generation {generation} is missing from the store"
                ));
            }
            expected = seq + 1;
            match read_doc::<DeltaDoc>(backend, m.object).await {
                Ok(doc) => {
                    if let Err(e) = check_doc(doc.version, &doc.volume, volume) {
                        problems.push(bad(m.object, e).to_string());
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    Ok((problems, newest))
}

/// The problems of one generation, collected with its number.
struct Problems<'a> {
    generation: u64,
    list: &'a mut Vec<(u64, String)>,
}

impl Problems<'_> {
    fn push(&mut self, problem: String) {
        self.list.push((self.generation, problem));
    }
}
