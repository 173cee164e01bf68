//! What `check` (crate::check) needs of the engine: the cache directory compared with the
//! entries the engine knows and with the mappings, a block's bytes from the cache to upload
//! again, refcounts rebuilt under the commit lock, and store deletions through the durable
//! removal path, waited for.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{Inner, detached};
use crate::cache_dir::{self, Marker};
use crate::{BlockKey, Error, Result};

/// A cache file or entry that does not fit the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheFinding {
    pub(crate) key: BlockKey,
    /// The file concerned (its current name, or the one the engine expects).
    pub(crate) path: std::path::PathBuf,
    /// What is wrong, in words.
    pub(crate) problem: String,
    /// Whether `repair` fixed it.
    pub(crate) fixed: bool,
}

/// Which names of a block's file exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Names {
    clean: Option<u64>,
    dirty: Option<u64>,
}

impl Names {
    fn any(self) -> bool {
        self.clean.is_some() || self.dirty.is_some()
    }

    fn size(self, marker: Marker) -> Option<u64> {
        match marker {
            Marker::Clean => self.clean,
            Marker::Dirty => self.dirty,
        }
    }
}

impl Inner {
    /// The files of the cache directory set against the engine's entries and, for clean
    /// files, against their mappings. Candidates are looked at again under the block's lock
    /// (the engine changes files only under it), so a file in the middle of a change is not
    /// reported. With `repair`, what can be fixed without losing data is: a clean file
    /// nothing maps to or of another length than its object is deleted (the block reads
    /// as the metadata says), and a clean entry without a file is forgotten (the block is
    /// fetched again). Returns the findings and the number of block files listed.
    pub(crate) async fn check_cache(&self, repair: bool) -> Result<(Vec<CacheFinding>, u64)> {
        let dir = self.dir.clone();
        let (found, _unknown) = tokio::task::spawn_blocking(move || dir.list())
            .await
            .expect("listing task panicked")
            .map_err(Error::io("list cache directory", self.dir.path()))?;
        let files = found.len() as u64;
        let mut on_disk: BTreeMap<BlockKey, Names> = BTreeMap::new();
        for f in found {
            let names = on_disk.entry(f.key).or_default();
            match f.marker {
                Marker::Clean => names.clean = Some(f.size),
                Marker::Dirty => names.dirty = Some(f.size),
            }
        }
        let entries: HashMap<BlockKey, super::state::Cached> = {
            let st = self.lock_state();
            st.keys()
                .into_iter()
                .filter_map(|k| st.get(k).map(|c| (k, c)))
                .collect()
        };
        let clean_keys: Vec<(u64, u64)> = on_disk
            .iter()
            .filter(|(k, n)| n.clean.is_some() && !entries.get(k).is_some_and(|c| c.dirty))
            .map(|(k, _)| (k.inode, k.blockno))
            .collect();
        let lengths: HashMap<BlockKey, u64> = self
            .db
            .block_lengths(&clean_keys)
            .await?
            .into_iter()
            .map(|(i, b, _, len)| (BlockKey::new(i, b), len))
            .collect();
        let mut candidates = Vec::new();
        for (key, names) in &on_disk {
            let suspicious = match entries.get(key) {
                None => true,
                Some(c) => {
                    names.size(c.marker).is_none()
                        || (names.clean.is_some() && names.dirty.is_some())
                        || (!c.dirty
                            && names.clean.is_some()
                            && lengths.get(key) != names.clean.as_ref())
                }
            };
            if suspicious {
                candidates.push(*key);
            }
        }
        for key in entries.keys() {
            if !on_disk.contains_key(key) {
                candidates.push(*key);
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut findings = Vec::new();
        for key in candidates {
            if let Some(finding) = self.look_again(key, repair).await? {
                findings.push(finding);
            }
        }
        Ok((findings, files))
    }

    /// One suspicious block of [`Inner::check_cache`], under its lock.
    async fn look_again(&self, key: BlockKey, repair: bool) -> Result<Option<CacheFinding>> {
        let _guard = self.locks.lock(key).await;
        let dir = self.dir.clone();
        let names = tokio::task::spawn_blocking(move || Names {
            clean: std::fs::metadata(dir.file(key, Marker::Clean))
                .ok()
                .map(|m| m.len()),
            dirty: std::fs::metadata(dir.file(key, Marker::Dirty))
                .ok()
                .map(|m| m.len()),
        })
        .await
        .expect("lookup task panicked");
        let entry = self.lock_state().get(key);
        let finding = |marker, problem: &str, fixed| CacheFinding {
            key,
            path: self.dir.file(key, marker),
            problem: problem.to_owned(),
            fixed,
        };
        let Some(c) = entry else {
            if !names.any() {
                return Ok(None);
            }
            if names.dirty.is_some() {
                // Blocks not yet uploaded may exist only there: never deleted.
                return Ok(Some(finding(
                    Marker::Dirty,
                    "file with the dirty marker that the engine does not know (the next start would commit it)",
                    false,
                )));
            }
            let fixed = repair && self.delete_file(key, Marker::Clean).await?;
            return Ok(Some(finding(
                Marker::Clean,
                "clean file that the engine does not know",
                fixed,
            )));
        };
        if names.size(c.marker).is_none() {
            if c.dirty {
                return Ok(Some(finding(
                    c.marker,
                    "the file of a block not yet uploaded is gone: its last writes are lost",
                    false,
                )));
            }
            let fixed = repair && self.lock_state().remove_if_clean(key).is_some();
            return Ok(Some(finding(
                c.marker,
                "the file of a clean block is gone (it would be fetched again)",
                fixed,
            )));
        }
        if names.clean.is_some() && names.dirty.is_some() {
            let other = match c.marker {
                Marker::Clean => Marker::Dirty,
                Marker::Dirty => Marker::Clean,
            };
            if other == Marker::Dirty {
                return Ok(Some(finding(
                    other,
                    "a second file of the block, with the dirty marker, that the engine does not use",
                    false,
                )));
            }
            let fixed = repair && self.delete_file(key, other).await?;
            return Ok(Some(finding(
                other,
                "a second, clean file of the block that the engine does not use",
                fixed,
            )));
        }
        if c.dirty || c.marker != Marker::Clean {
            return Ok(None);
        }
        let mapping = self.db.mapping(key.inode, key.blockno).await?;
        let problem = match mapping {
            None => "clean file of a block that maps to no object".to_owned(),
            Some(o) if Some(o.length) != names.clean => format!(
                "clean file of {} bytes for an object of {} bytes",
                names.clean.unwrap_or(0),
                o.length
            ),
            Some(_) => return Ok(None),
        };
        let fixed = repair && self.lock_state().remove_if_clean(key).is_some() && {
            self.delete_file(key, Marker::Clean).await?;
            self.progress.notify_waiters();
            true
        };
        Ok(Some(finding(Marker::Clean, &problem, fixed)))
    }

    /// Deletes the file of `key` under the name `marker` (the block is locked by the caller).
    async fn delete_file(&self, key: BlockKey, marker: Marker) -> Result<bool> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || dir.remove(key, marker))
            .await
            .expect("unlink task panicked")
            .map_err(Error::io("delete cache file", self.dir.file(key, marker)))?;
        Ok(true)
    }

    /// The bytes of an object from the cache: the file of one of `keys` (blocks that map to
    /// it), read under the block's lock, whose length and SHA-256 are the object's.
    pub(crate) async fn cached_copy(
        &self,
        keys: &[BlockKey],
        hash: [u8; 32],
        length: u64,
    ) -> Option<Bytes> {
        for &key in keys {
            let _guard = self.locks.lock(key).await;
            let Some(c) = self.lock_state().get(key) else {
                continue;
            };
            if c.size != length {
                continue;
            }
            let path = self.dir.file(key, c.marker);
            let read = tokio::task::spawn_blocking(move || cache_dir::read_whole(&path, length))
                .await
                .expect("read task panicked");
            if let Ok(bytes) = read
                && <[u8; 32]>::from(Sha256::digest(&bytes)) == hash
            {
                return Some(Bytes::from(bytes));
            }
        }
        None
    }

    /// Sets every refcount to the count of its mappings (one transaction, under the commit
    /// lock, so no commit is half-way); returns what changed and the objects released.
    pub(crate) async fn rebuild_refcounts(
        &self,
    ) -> Result<(Vec<blockcache_db::RefcountMismatch>, Vec<u64>)> {
        let _commit = self.commit_lock.lock().await;
        Ok(self.db.rebuild_refcounts().await?)
    }

    /// Deletes store objects whose pending deletions are recorded, through the removal
    /// task, and waits until they are done (or a batch holding them fails). The hand-off
    /// runs as a task of the engine: a caller that gives up never leaves tickets taken and
    /// not queued (a flush would wait for them forever); the wait is a plain receiver.
    pub(crate) async fn delete_released(self: &Arc<Self>, ids: Vec<u64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let inner = Arc::clone(self);
        let mark = detached(self, async move {
            let removals = inner.take_removal_tickets(ids);
            let mark = inner.removals.mark();
            inner.send_removals(removals).await;
            inner.removals.retry_now();
            Ok(mark)
        })
        .await?;
        self.removals.wait(mark).await
    }
}
