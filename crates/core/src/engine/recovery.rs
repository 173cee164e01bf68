//! Opening after a crash: reconcile the cache directory with the metadata.
//!
//! Work is proportional to the dirty data, not to the cache size: clean files are only
//! listed (their content is checked lazily, on first access), dirty-marked files are
//! re-committed, objects whose upload was never confirmed are checked in the store, and
//! pending deletions are queued again.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Inner;
use super::commit::LockMode;
use super::state::Origin;
use crate::cache_dir::Marker;
use crate::{BlockKey, Error, Result};

/// What opening found in the cache directory and the metadata, and what it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Clean cache files kept (checked on first access).
    pub clean_files: u64,
    /// Dirty-marked cache files, committed again in the background.
    pub dirty_files: u64,
    /// Files in the cache directory that are not ours; left alone.
    pub unknown_files: Vec<PathBuf>,
    /// Objects registered but never confirmed, with no dirty file to upload them from.
    pub unconfirmed_objects: u64,
    /// Of those, objects found complete in the store and confirmed.
    pub confirmed_in_store: u64,
    /// Blocks whose content was never synced nor uploaded: their mappings were removed and
    /// they read as holes.
    pub lost_blocks: Vec<BlockKey>,
    /// Store deletions that were pending and are queued again.
    pub pending_deletions: u64,
}

/// Cache files found at open.
#[derive(Debug)]
pub(crate) struct Loaded {
    dirty: Vec<BlockKey>,
    clean: u64,
    unknown: Vec<PathBuf>,
}

impl Inner {
    /// Lists the cache directory and loads its files into the cache state.
    pub(crate) async fn load(self: &Arc<Self>) -> Result<Loaded> {
        let inner = self;
        let dir = inner.dir.clone();
        let (found, unknown) = tokio::task::spawn_blocking(move || dir.scan())
            .await
            .expect("scan task panicked")
            .map_err(Error::io("list cache directory", inner.dir.path()))?;
        for path in &unknown {
            tracing::warn!(path = %path.display(), "unknown file in the cache directory; leaving it alone");
        }
        // One file per key; a dirty file wins over a clean one (which it superseded).
        let mut by_key = BTreeMap::new();
        for f in found {
            if f.size > inner.config.block_size {
                return Err(Error::InvalidConfig(format!(
                    "cache file {} holds {} bytes, more than the block size {}; was the cache directory made with another block size?",
                    inner.dir.file(f.key, f.marker).display(),
                    f.size,
                    inner.config.block_size
                )));
            }
            match by_key.remove(&f.key) {
                None => {
                    by_key.insert(f.key, f);
                }
                Some(other) => {
                    let (keep, drop) = if f.marker == Marker::Dirty {
                        (f, other)
                    } else {
                        (other, f)
                    };
                    inner.dir.remove(drop.key, drop.marker).map_err(Error::io(
                        "delete superseded cache file",
                        inner.dir.file(drop.key, drop.marker),
                    ))?;
                    by_key.insert(keep.key, keep);
                }
            }
        }
        let mut files: Vec<_> = by_key.into_values().collect();
        // Oldest first, so the LRU order survives a restart approximately.
        files.sort_by_key(|f| f.modified);
        let mut dirty = Vec::new();
        let mut clean = 0;
        let mut dirty_bytes = 0;
        {
            let mut st = inner.lock_state();
            for f in files {
                let is_dirty = f.marker == Marker::Dirty;
                let origin = if is_dirty {
                    Origin::FoundDirty
                } else {
                    Origin::FoundClean
                };
                st.insert(f.key, f.size, origin);
                if is_dirty {
                    dirty.push(f.key);
                    dirty_bytes += f.size;
                } else {
                    clean += 1;
                }
            }
        }
        inner.budget.force(dirty_bytes);
        Ok(Loaded {
            dirty,
            clean,
            unknown,
        })
    }

    /// Repairs the metadata after a crash and starts uploading recovered dirty blocks.
    pub(crate) async fn reconcile(self: &Arc<Self>, loaded: Loaded) -> Result<Recovery> {
        let inner = self;
        let mut report = Recovery {
            clean_files: loaded.clean,
            dirty_files: loaded.dirty.len() as u64,
            unknown_files: loaded.unknown,
            ..Recovery::default()
        };
        let pending = inner.db.pending_deletions().await?;
        report.pending_deletions = pending.len() as u64;
        if !pending.is_empty() {
            let removals = inner.take_removal_tickets(pending);
            let queuing = Arc::clone(inner);
            inner
                .tracker
                .spawn(async move { queuing.send_removals(removals).await });
        }
        let dirty: HashSet<BlockKey> = loaded.dirty.iter().copied().collect();
        let mut store_synced = false;
        for (object, blocks) in inner.db.unconfirmed_objects().await? {
            let keys: Vec<BlockKey> = blocks.iter().map(|&(i, b)| BlockKey::new(i, b)).collect();
            if keys.iter().any(|k| dirty.contains(k)) {
                // Re-committing the dirty file either finds this object again and uploads it, or
                // moves the block away from it.
                continue;
            }
            report.unconfirmed_objects += 1;
            let complete = match (object.hash, inner.backend.get(object.id).await) {
                (Some(hash), Ok(data)) => {
                    data.len() as u64 == object.length
                        && <[u8; 32]>::from(Sha256::digest(&data)) == hash
                }
                (_, Err(blockcache_backend::Error::NotFound { .. })) | (None, Ok(_)) => false,
                (_, Err(e)) => {
                    return Err(Error::Download {
                        obj_id: object.id,
                        inode: keys.first().map_or(0, |k| k.inode),
                        blockno: keys.first().map_or(0, |k| k.blockno),
                        source: Arc::new(e),
                    });
                }
            };
            let _commit = inner.commit_lock.lock().await;
            if complete && !store_synced {
                // It may still be only in the page cache of a local-directory store; one barrier
                // covers every object written before the crash.
                inner
                    .backend
                    .make_durable()
                    .await
                    .map_err(|e| Error::Store {
                        action: "make objects written before a crash durable",
                        source: Arc::new(e),
                    })?;
                store_synced = true;
            }
            if complete {
                inner.db.confirm_upload(object.id, object.length).await?;
                report.confirmed_in_store += 1;
                continue;
            }
            for k in &keys {
                tracing::error!(
                    inode = k.inode,
                    blockno = k.blockno,
                    obj_id = object.id,
                    "block lost: its content was neither synced to the cache nor uploaded before a crash; it now reads as a hole"
                );
            }
            let released = inner.db.remove_blocks(&blocks).await?;
            drop(_commit);
            inner.queue_removals(released).await;
            report.lost_blocks.extend(keys);
        }
        if !loaded.dirty.is_empty() {
            tracing::info!(
                blocks = loaded.dirty.len(),
                "uploading dirty blocks found in the cache directory"
            );
            let inner2 = Arc::clone(inner);
            let keys = loaded.dirty;
            inner.tracker.spawn(async move {
            if let Err(error) = inner2.commit_keys(keys, LockMode::Wait).await {
                tracing::warn!(%error, "committing recovered dirty blocks failed; the commit task retries");
            }
        });
        }
        Ok(report)
    }
}
