//! Attaching the volume to its store at open: the store's volume record against the local
//! database, the object format and the encryption key, then the writer lease.
//!
//! | the store has                  | the database is            | then                         |
//! |--------------------------------|----------------------------|------------------------------|
//! | this volume's record           | this volume                | checked (block size, format, key) |
//! | another volume's record        | anything                   | refused                      |
//! | no record, no objects          | new, or from before records| record created                |
//! | no record, objects             | from before records        | adopted: record written, the objects there stay plain |
//! | no record, objects             | new                        | refused (not ours)           |
//! | no record                      | bound to its record        | refused (the record vanished: unmounted? deleted?) |

use std::sync::Arc;

use blockcache_backend::format::{Compression, Kdf, Key, ObjectCodec};
use blockcache_backend::lease::{Holder, LeaseRequest, first_object_id};
use blockcache_backend::volume::{EncryptionRecord, ObjectFormat, RECORD_VERSION, VolumeRecord};
use blockcache_backend::{Backend, StoreFormat};
use blockcache_db::Db;
use blockcache_db::VolumeId;

use crate::{Config, Error, Result};

/// The encryption secret of a volume, as the user gives it.
#[derive(Clone)]
pub enum Secret {
    /// A key of 32 random bytes (`--encryption-key-file`).
    Key(Arc<Key>),
    /// A passphrase, turned into the key with the volume's key derivation parameters
    /// (`--encryption-passphrase-file`).
    Passphrase(Arc<zeroize::Zeroizing<Vec<u8>>>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Key(_) => "Secret::Key(..)",
            Self::Passphrase(_) => "Secret::Passphrase(..)",
        })
    }
}

impl Secret {
    fn source_name(&self) -> &'static str {
        match self {
            Self::Key(_) => "key-file",
            Self::Passphrase(_) => "passphrase",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            Self::Key(_) => "--encryption-key-file",
            Self::Passphrase(_) => "--encryption-passphrase-file",
        }
    }
}

fn refused(reason: String) -> Error {
    Error::VolumeRefused(reason)
}

fn store_error(action: &'static str) -> impl FnOnce(blockcache_backend::Error) -> Error {
    move |e| match e {
        blockcache_backend::Error::LeaseHeld(_) | blockcache_backend::Error::StaleCopy(_) => {
            Error::VolumeRefused(e.to_string())
        }
        e => Error::Store {
            action,
            source: Arc::new(e),
        },
    }
}

fn volume_bytes(id: &str) -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(id, &mut out).map_err(|_| {
        Error::VolumeRefused(format!("volume id {id:?} is not 32 hexadecimal digits"))
    })?;
    Ok(out)
}

/// Attaches the volume of `db` (whose id is `volume`) to the store of `backend`; returns
/// the backend to use, with the volume's object format and the lease set.
pub(crate) async fn attach(
    config: &Config,
    db: &Db,
    volume: &VolumeId,
    backend: Backend,
) -> Result<Backend> {
    let db_error = |e| Error::Db(Arc::new(e));
    let bound = db.store_binding().await.map_err(db_error)?;
    let found = backend
        .read_volume()
        .await
        .map_err(store_error("read the volume record"))?;
    let record = match found {
        Some(record) => {
            if record.id != volume.id {
                let fresh = db.is_fresh().await.map_err(db_error)?;
                return Err(refused(if fresh {
                    format!(
                        "the store holds volume {} (created {} by {}), and this database is new: it cannot serve that volume without its metadata. \
                         Use the data directory that volume was created with, or another store or prefix for a new volume",
                        record.id, record.created, record.created_by
                    )
                } else {
                    format!(
                        "the store holds volume {} (created {} by {}), but this database belongs to volume {}: two volumes never share a store. \
                         Point --store at this volume's own store, or use the data directory of volume {}",
                        record.id, record.created, record.created_by, volume.id, record.id
                    )
                }));
            }
            check_record(config, &record)?;
            if bound.is_none() {
                db.bind_store(&record.id).await.map_err(db_error)?;
            }
            record
        }
        None => {
            if let Some(bound) = bound {
                backend.forget_created_store_dir();
                let dir_note = if backend.created_store_dir() {
                    " The store's directory did not exist either: is its file system mounted?"
                } else {
                    ""
                };
                return Err(refused(format!(
                    "the store has no volume record, but this database's volume {bound} was created there: the store was emptied, replaced, or is not the one configured.{dir_note} \
                     Nothing was written. Check --store (and mount the store's file system); a store is never recreated for a volume that had one"
                )));
            }
            let fresh = db.is_fresh().await.map_err(db_error)?;
            let has_objects = backend
                .has_objects()
                .await
                .map_err(store_error("list the store's objects"))?;
            if !fresh && !has_objects && db.uploaded_objects().await.map_err(db_error)? > 0 {
                backend.forget_created_store_dir();
                return Err(refused(
                    "this database says objects are in the store, but the store holds none and has no volume record: \
                     --store (or its prefix) names the wrong place, or the store's file system is not mounted. Nothing was written"
                        .to_owned(),
                ));
            }
            if fresh && has_objects {
                return Err(refused(
                    "the store holds objects but no volume record: another program, or a blockcache older than volume records, wrote there, and this database is new. \
                     Use the data directory that wrote those objects (its first start adopts them), or an empty store or prefix"
                        .to_owned(),
                ));
            }
            // Adopted objects (every id allocated so far) stay plain.
            let plain_below = if fresh {
                0
            } else {
                db.next_object_id().await.map_err(db_error)?
            };
            let record = new_record(config, volume, plain_below)?;
            if let Some(other) = backend
                .create_volume(&record)
                .await
                .map_err(store_error("write the volume record"))?
            {
                return Err(refused(format!(
                    "another process created volume {} (by {}) in this store at the same moment; this database belongs to volume {}. \
                     Use another store or prefix",
                    other.id, other.created_by, volume.id
                )));
            }
            if fresh {
                tracing::info!(volume = %record.id, format = %record.object_format, "created the volume in the store");
            } else {
                tracing::info!(
                    volume = %record.id,
                    "adopted the store's objects into volume {}: the objects there stay plain, new ones are {}",
                    record.id,
                    record.object_format
                );
            }
            db.bind_store(&record.id).await.map_err(db_error)?;
            record
        }
    };
    let format = store_format(config, &record)?;
    let lease = backend
        .acquire_lease(LeaseRequest {
            // The database names the holder: its lock makes this process its only user on
            // this host, so a lease of this host and database was left by a dead process.
            holder: Holder::this_process(&db.path().unwrap_or_else(|| config.cache_dir.clone())),
            ttl: config.lease_ttl,
            force: config.force_takeover,
            last_epoch: db.lease_epoch().await.map_err(db_error)?,
        })
        .await
        .map_err(store_error("take the volume's lease"))?;
    db.record_lease_epoch(lease.first_epoch())
        .await
        .map_err(db_error)?;
    db.claim_object_ids(first_object_id(lease.first_epoch()))
        .await
        .map_err(db_error)?;
    tracing::info!(
        volume = %record.id,
        epoch = lease.epoch(),
        "took the volume's lease"
    );
    Ok(backend.with_format(format).with_lease(lease))
}

/// The record of a volume created now, or adopted with its objects below `plain_below`
/// stored plain (they were written before volumes had records).
fn new_record(config: &Config, volume: &VolumeId, plain_below: u64) -> Result<VolumeRecord> {
    let framed = config.compression != Compression::None || config.encryption.is_some();
    let encryption = match &config.encryption {
        None => None,
        Some(secret) => {
            let volume_id = volume_bytes(&volume.id)?;
            let (key, kdf) = match secret {
                Secret::Key(key) => (Arc::clone(key), None),
                Secret::Passphrase(p) => {
                    let kdf = Kdf::new_random();
                    let key = kdf.derive(p).map_err(|e| refused(e.to_string()))?;
                    (Arc::new(key), Some(kdf.to_string()))
                }
            };
            Some(EncryptionRecord {
                cipher: "xchacha20poly1305".to_owned(),
                key_source: secret.source_name().to_owned(),
                kdf,
                key_check: key.check_value(&volume_id),
            })
        }
    };
    Ok(VolumeRecord {
        record_version: RECORD_VERSION,
        id: volume.id.clone(),
        block_size: config.block_size,
        object_format: if framed {
            ObjectFormat::Framed
        } else {
            ObjectFormat::Plain
        },
        format_version: u32::from(blockcache_backend::format::FORMAT_VERSION),
        plain_below,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        created_by: {
            let h = Holder::this_process(&config.cache_dir);
            format!("pid {} on {}", h.pid, h.host)
        },
        encryption,
    })
}

/// Refuses settings that do not fit the volume as its record describes it.
pub(crate) fn check_record(config: &Config, record: &VolumeRecord) -> Result<()> {
    if record.record_version > RECORD_VERSION
        || record.format_version > u32::from(blockcache_backend::format::FORMAT_VERSION)
    {
        return Err(refused(format!(
            "the store's volume record (record version {}, object format version {}) was written by a newer blockcache than this one (record version {RECORD_VERSION}, format version {}): upgrade blockcache",
            record.record_version,
            record.format_version,
            blockcache_backend::format::FORMAT_VERSION
        )));
    }
    if record.block_size != config.block_size {
        return Err(refused(format!(
            "volume {} has a block size of {} bytes, but --block-size is {}: the block size is fixed when a volume is created; use --block-size {}",
            record.id, record.block_size, config.block_size, record.block_size
        )));
    }
    match (&record.encryption, &config.encryption) {
        (Some(e), None) => {
            let flag = if e.key_source == "passphrase" {
                "--encryption-passphrase-file"
            } else {
                "--encryption-key-file"
            };
            return Err(refused(format!(
                "volume {} is encrypted: give its key with {flag}",
                record.id
            )));
        }
        (None, Some(secret)) => {
            return Err(refused(format!(
                "volume {} is not encrypted, but {} was given: encryption is chosen when a volume is created; drop the option, or create a new volume in another store or prefix",
                record.id,
                secret.flag()
            )));
        }
        _ => {}
    }
    if record.object_format == ObjectFormat::Plain && config.compression != Compression::None {
        return Err(refused(format!(
            "volume {} stores its objects plain (it was created with --compression none), so its objects cannot be compressed: start it with --compression none",
            record.id
        )));
    }
    Ok(())
}

/// How the volume's objects are written and read, with the key checked against the record.
pub(crate) fn store_format(config: &Config, record: &VolumeRecord) -> Result<StoreFormat> {
    let volume = volume_bytes(&record.id)?;
    let key = match (&record.encryption, &config.encryption) {
        (Some(e), Some(secret)) => {
            let key = match secret {
                Secret::Key(key) => {
                    if e.key_source != "key-file" {
                        return Err(refused(format!(
                            "volume {} was encrypted with a passphrase: give it with --encryption-passphrase-file, not a key file",
                            record.id
                        )));
                    }
                    Arc::clone(key)
                }
                Secret::Passphrase(p) => {
                    let Some(kdf) = &e.kdf else {
                        return Err(refused(format!(
                            "volume {} was encrypted with a key file: give it with --encryption-key-file, not a passphrase",
                            record.id
                        )));
                    };
                    let kdf: Kdf =
                        kdf.parse()
                            .map_err(|e: blockcache_backend::format::FormatError| {
                                refused(format!("the volume record's key derivation: {e}"))
                            })?;
                    Arc::new(kdf.derive(p).map_err(|e| refused(e.to_string()))?)
                }
            };
            key.verify(&volume, &e.key_check).map_err(|e| {
                refused(format!(
                    "{e}: the encryption key given is not the key of volume {}",
                    record.id
                ))
            })?;
            Some(key)
        }
        _ => None,
    };
    Ok(StoreFormat {
        codec: ObjectCodec::new(volume, config.compression, key),
        plain: record.object_format == ObjectFormat::Plain,
        plain_below: record.plain_below,
        max_block: record.block_size,
    })
}
