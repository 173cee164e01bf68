//! The volume's metadata in the store: `<prefix>/meta/<generation>/...`.
//!
//! A generation is a snapshot (`part-<n>` objects, then `manifest`, written last: a
//! generation without its manifest is incomplete and never read) followed by deltas
//! (`delta-<seq>`, each naming the one before it). Every metadata object is framed in the
//! volume's object format (always compressed, encrypted when the volume is), bound to its
//! name through the header's object id, and written create-only.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::format::Compression;
use crate::{Backend, Error, Result, store_error};

/// The largest metadata object decoded (a header claiming more is refused).
pub const MAX_META_OBJECT: u64 = 1 << 30;

/// One metadata object of the store. Ordered as a restore reads them: by generation, then
/// the snapshot's parts, the manifest, and the deltas by sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaObject {
    /// Part `part` (from 0) of the snapshot of `generation`.
    Part {
        /// The generation.
        generation: u64,
        /// The part's number.
        part: u32,
    },
    /// The manifest of `generation`: written after every part, it makes it complete.
    Manifest {
        /// The generation.
        generation: u64,
    },
    /// The delta of `generation` that ships the changes up to change clock `seq`.
    Delta {
        /// The generation.
        generation: u64,
        /// The change clock it ships up to.
        seq: u64,
    },
}

impl Ord for MetaObject {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.sort_key().cmp(&other.sort_key())
    }
}

impl PartialOrd for MetaObject {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl MetaObject {
    fn sort_key(&self) -> (u64, u8, u64) {
        match *self {
            Self::Part { generation, part } => (generation, 0, u64::from(part)),
            Self::Manifest { generation } => (generation, 1, 0),
            Self::Delta { generation, seq } => (generation, 2, seq),
        }
    }

    /// The generation it belongs to.
    pub fn generation(&self) -> u64 {
        match *self {
            Self::Part { generation, .. }
            | Self::Manifest { generation }
            | Self::Delta { generation, .. } => generation,
        }
    }

    /// Its name under `<prefix>/meta/`.
    pub fn name(&self) -> String {
        match *self {
            Self::Part { generation, part } => format!("{generation:010}/part-{part:06}"),
            Self::Manifest { generation } => format!("{generation:010}/manifest"),
            Self::Delta { generation, seq } => format!("{generation:010}/delta-{seq:020}"),
        }
    }

    /// The object named `name` (under `<prefix>/meta/`), if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        let (generation, rest) = name.split_once('/')?;
        if generation.len() != 10 || !generation.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let generation = generation.parse().ok()?;
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        if rest == "manifest" {
            Some(Self::Manifest { generation })
        } else if let Some(p) = rest.strip_prefix("part-").filter(|p| digits(p, 6)) {
            Some(Self::Part {
                generation,
                part: p.parse().ok()?,
            })
        } else if let Some(s) = rest.strip_prefix("delta-").filter(|s| digits(s, 20)) {
            Some(Self::Delta {
                generation,
                seq: s.parse().ok()?,
            })
        } else {
            None
        }
    }

    /// The object id its header carries: a hash of its name with the top bit set (data
    /// object ids never have it), so an object copied under another name is refused.
    pub fn header_id(&self) -> u64 {
        // FNV-1a, 64 bits: stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.name().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h | 1 << 63
    }
}

/// A metadata object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMeta {
    /// The object.
    pub object: MetaObject,
    /// Its size in the store.
    pub size: u64,
    /// When the store last wrote it.
    pub modified: chrono::DateTime<chrono::Utc>,
}

impl Backend {
    fn meta_prefix(&self) -> Path {
        self.prefix.clone().join("meta")
    }

    fn meta_key(&self, object: &MetaObject) -> Path {
        let mut key = self.meta_prefix();
        for part in object.name().split('/') {
            key = key.join(part);
        }
        key
    }

    /// The codec of metadata objects: the volume's, always compressed.
    fn meta_codec(&self) -> crate::format::ObjectCodec {
        let codec = &self.format.codec;
        let compression = match codec.compression() {
            Compression::None => Compression::Zstd { level: 3 },
            c => c,
        };
        codec.with_compression(compression)
    }

    /// Writes metadata object `object` holding `payload`, create-only, retrying transient
    /// failures; only while this process may write (the lease). A key already holding the
    /// same payload (an attempt whose answer was lost) counts as written; other content is
    /// [`Error::Collision`]. Returns the stored size.
    pub async fn put_meta(&self, object: MetaObject, payload: Bytes) -> Result<u64> {
        self.may_write_async().await?;
        let key = self.meta_key(&object);
        let codec = self.meta_codec();
        let id = object.header_id();
        let plain = payload.clone();
        let stored = tokio::task::spawn_blocking(move || codec.encode(id, &plain))
            .await
            .expect("encode task panicked")
            .map_err(|source| Error::Format {
                key: key.to_string(),
                source,
            })?;
        let size = stored.len() as u64;
        let body = PutPayload::from_bytes(Bytes::from(stored));
        let what = format!("upload of metadata {key}");
        let put = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let body = body.clone();
                let key = &key;
                async move {
                    self.may_write_async().await?;
                    self.put_create(key, body).await
                }
            })
            .await;
        match put {
            Ok(()) => Ok(size),
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => match self.get_meta(object).await {
                Ok(found) if found == payload => Ok(size),
                Ok(_) | Err(Error::Format { .. }) => Err(Error::Collision {
                    key: key.to_string(),
                }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Reads and decodes metadata object `object`, retrying transient failures.
    pub async fn get_meta(&self, object: MetaObject) -> Result<Bytes> {
        let key = self.meta_key(&object);
        let what = format!("download of metadata {key}");
        let stored = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let key = &key;
                async move {
                    let got = self
                        .store
                        .get(key)
                        .await
                        .map_err(|source| store_error("download", key, source))?;
                    got.bytes()
                        .await
                        .map_err(|source| store_error("download", key, source))
                }
            })
            .await?;
        let codec = self.meta_codec();
        let id = object.header_id();
        tokio::task::spawn_blocking(move || codec.decode_bytes(id, stored, MAX_META_OBJECT))
            .await
            .expect("decode task panicked")
            .map_err(|source| Error::Format {
                key: key.to_string(),
                source,
            })
    }

    /// Every metadata object in the store, sorted by name (generation, then parts, manifest
    /// and deltas in order). Keys under `meta/` that are not metadata objects are skipped.
    pub async fn list_meta(&self) -> Result<Vec<ListedMeta>> {
        let prefix = self.meta_prefix();
        let what = format!("listing of {prefix}");
        let metas: Vec<object_store::ObjectMeta> = self
            .retry
            .run(&what, &self.cancel, &self.health, || {
                let prefix = &prefix;
                async move {
                    self.store
                        .list(Some(prefix))
                        .try_collect()
                        .await
                        .map_err(|source| store_error("list", prefix, source))
                }
            })
            .await?;
        let base = format!("{prefix}/");
        let mut out: Vec<ListedMeta> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&base)?;
                Some(ListedMeta {
                    object: MetaObject::parse(name)?,
                    size: m.size,
                    modified: m.last_modified,
                })
            })
            .collect();
        out.sort_by_key(|m| m.object);
        Ok(out)
    }

    /// Deletes metadata objects (already gone counts as deleted); only while this process
    /// may write.
    pub async fn delete_meta(&self, objects: &[MetaObject]) -> Result<()> {
        if objects.is_empty() {
            return Ok(());
        }
        self.may_write_async().await?;
        let keys: Vec<Path> = objects.iter().map(|o| self.meta_key(o)).collect();
        let what = format!("delete of {} metadata objects", keys.len());
        self.retry
            .run(&what, &self.cancel, &self.health, || {
                let keys = keys.clone();
                async move {
                    self.may_write_async().await?;
                    let input = futures::stream::iter(keys.clone().into_iter().map(Ok)).boxed();
                    let results: Vec<_> = self.store.delete_stream(input).collect().await;
                    for (key, result) in keys.iter().zip(results) {
                        match result {
                            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(source) => return Err(store_error("delete", key, source)),
                        }
                    }
                    Ok(())
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::MetaObject;

    #[test]
    fn names_parse_back_and_header_ids_differ() {
        let objects = [
            MetaObject::Part {
                generation: 1,
                part: 0,
            },
            MetaObject::Part {
                generation: 1,
                part: 1,
            },
            MetaObject::Manifest { generation: 1 },
            MetaObject::Delta {
                generation: 1,
                seq: 42,
            },
            MetaObject::Manifest { generation: 2 },
        ];
        let mut ids = std::collections::HashSet::new();
        for o in objects {
            assert_eq!(MetaObject::parse(&o.name()), Some(o));
            assert!(o.header_id() >= 1 << 63);
            assert!(ids.insert(o.header_id()), "{o:?}");
        }
        let mut sorted = objects.to_vec();
        sorted.sort();
        assert_eq!(sorted.last(), Some(&MetaObject::Manifest { generation: 2 }));
        assert_eq!(
            sorted[3],
            MetaObject::Delta {
                generation: 1,
                seq: 42
            }
        );
        for bad in [
            "1/manifest",
            "0000000001/part-1",
            "0000000001/delta-x",
            "0000000001/other",
        ] {
            assert_eq!(MetaObject::parse(bad), None, "{bad}");
        }
    }
}
