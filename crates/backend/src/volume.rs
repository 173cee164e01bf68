//! The volume record: what the store holds, written once when the volume is created.
//!
//! `<prefix>/volume` is a small JSON document, written with a create-only PUT so that of two
//! daemons creating a volume in one empty store only one succeeds (the other then finds a
//! volume that is not its own and refuses to start). It names the volume (the id its local
//! database also keeps), its block size, how its objects are stored, and what decryption
//! needs (never the key: a value that tells a right key from a wrong one).

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::{Backend, Error, Result, store_error};

/// The version of the record's own layout.
pub const RECORD_VERSION: u32 = 1;

/// How the objects of a volume are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectFormat {
    /// Each object is the plaintext block, nothing else (no compression, no encryption);
    /// a `file://` store may hold it as a hard link to the cache file.
    Plain,
    /// Each object starts with a header (`crate::format`) and may be compressed and
    /// encrypted.
    Framed,
}

impl std::fmt::Display for ObjectFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Framed => "framed",
        })
    }
}

/// What decrypting the volume's objects needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionRecord {
    /// The AEAD: `xchacha20poly1305`.
    pub cipher: String,
    /// Where the key comes from: `key-file` (32 bytes) or `passphrase` (through `kdf`).
    pub key_source: String,
    /// The key derivation's parameters (salt and costs) for a passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<String>,
    /// Tells a right key from a wrong one (an authentication tag over nothing, bound to the
    /// volume id); reveals nothing of the key.
    pub key_check: String,
}

/// The volume record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// [`RECORD_VERSION`] of the writer.
    pub record_version: u32,
    /// The volume id: 32 hexadecimal digits.
    pub id: String,
    /// Block size in bytes.
    pub block_size: u64,
    /// How objects are stored.
    pub object_format: ObjectFormat,
    /// The version of the framed object format that new objects use.
    pub format_version: u32,
    /// Objects with an id below this are plain (they were in the store before the volume
    /// had a record, and were adopted as they are); 0 when there are none.
    pub plain_below: u64,
    /// When the volume was created (or adopted), RFC 3339.
    pub created: String,
    /// Who created it: host and pid.
    pub created_by: String,
    /// Present when the volume is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionRecord>,
}

impl Backend {
    fn record_key(&self) -> object_store::path::Path {
        self.prefix.clone().join("volume")
    }

    /// The store's volume record, `None` if it has none.
    pub async fn read_volume(&self) -> Result<Option<VolumeRecord>> {
        let key = self.record_key();
        let got = self
            .retry
            .run(
                "read of the volume record",
                &self.cancel,
                &self.health,
                || {
                    let key = &key;
                    async move {
                        match self.store.get(key).await {
                            Ok(r) => r
                                .bytes()
                                .await
                                .map(Some)
                                .map_err(|source| store_error("download", key, source)),
                            Err(object_store::Error::NotFound { .. }) => Ok(None),
                            Err(source) => Err(store_error("download", key, source)),
                        }
                    }
                },
            )
            .await?;
        let Some(bytes) = got else {
            return Ok(None);
        };
        let record: VolumeRecord =
            serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord {
                key: key.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Some(record))
    }

    /// Writes the volume record, create-only. `Ok(None)`: written; `Ok(Some(found))`:
    /// the store already had a record (another process created a volume first).
    pub async fn create_volume(&self, record: &VolumeRecord) -> Result<Option<VolumeRecord>> {
        let key = self.record_key();
        let body = Bytes::from(serde_json::to_vec_pretty(record).expect("a record serializes"));
        let written = self
            .retry
            .run(
                "write of the volume record",
                &self.cancel,
                &self.health,
                || {
                    let key = &key;
                    let payload = PutPayload::from_bytes(body.clone());
                    async move {
                        self.same_store_dir_async().await?;
                        self.put_create(key, payload).await
                    }
                },
            )
            .await;
        match written {
            Ok(()) => Ok(None),
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => match self.read_volume().await? {
                Some(found) if &found == record => Ok(None),
                Some(found) => Ok(Some(found)),
                None => Err(Error::BadRecord {
                    key: key.to_string(),
                    reason: "it exists but cannot be read".to_owned(),
                }),
            },
            Err(e) => Err(e),
        }
    }

    /// Whether the store holds any data object (one listing request, first page).
    pub async fn has_objects(&self) -> Result<bool> {
        let prefix = self.data_prefix();
        self.retry
            .run(
                "listing of the store's objects",
                &self.cancel,
                &self.health,
                || {
                    let prefix = &prefix;
                    async move {
                        let mut list = self.store.list(Some(prefix));
                        match list.next().await {
                            None => Ok(false),
                            Some(Ok(_)) => Ok(true),
                            Some(Err(source)) => Err(store_error("list", prefix, source)),
                        }
                    }
                },
            )
            .await
    }
}
