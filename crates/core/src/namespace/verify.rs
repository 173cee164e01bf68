//! What the store really holds of a file: each object its blocks map to, looked up in the
//! store, rather than what the metadata says was uploaded.

use std::sync::Arc;

use blockcache_db::ObjectState;
use futures::{StreamExt, TryStreamExt};

use super::Namespace;
use crate::{Error, Result};

/// Lookups in flight at once.
const LOOKUPS: usize = 16;

/// The outcome of [`Namespace::verify_store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCheck {
    /// Objects looked up: those of mapped blocks whose upload was confirmed.
    pub checked: u64,
    /// Blocks whose confirmed object the store lacks or holds with another size.
    pub missing: Vec<MissingObject>,
}

/// A block whose object is not in the store as it was uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingObject {
    /// The block number in the file.
    pub blockno: u64,
    /// The object it maps to.
    pub object: u64,
    /// The object's key in the store.
    pub key: String,
    /// The size the store has for it (`None`: it has no such object).
    pub found_size: Option<u64>,
}

impl Namespace {
    /// Looks up in the store every object that a block of `name` maps to and whose upload
    /// was confirmed (a HEAD request each, a few at a time), and reports those the store
    /// lacks or holds with another size than was uploaded. Blocks not yet uploaded are not
    /// looked up: [`Namespace::status`] counts them.
    pub async fn verify_store(&self, name: &str) -> Result<StoreCheck> {
        let meta = self.stat(name).await?;
        let objects = self.shared.db.inode_objects(meta.inode).await?;
        let backend = self.shared.inner.backend();
        let uploaded: Vec<_> = objects
            .into_iter()
            .filter(|(_, o)| o.state == ObjectState::Uploaded)
            .collect();
        let checked = uploaded.len() as u64;
        let missing: Vec<Option<MissingObject>> = futures::stream::iter(uploaded)
            .map(|(blockno, object)| async move {
                let found = backend.head(object.id).await.map_err(|e| Error::Store {
                    action: "look up the objects of a file",
                    source: Arc::new(e),
                })?;
                Ok::<_, Error>((found != object.stored_size).then(|| MissingObject {
                    blockno,
                    object: object.id,
                    key: backend.key(object.id).to_string(),
                    found_size: found,
                }))
            })
            .buffered(LOOKUPS)
            .try_collect()
            .await?;
        Ok(StoreCheck {
            checked,
            missing: missing.into_iter().flatten().collect(),
        })
    }
}
