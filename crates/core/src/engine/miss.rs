//! A block's first access: check a clean file found at start-up, create an empty block, or
//! download (or link) its object from the store.

use std::fs::File;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Counters;
use super::handle::{BlockHandle, Intent};
use super::state::Origin;
use super::upload::wait_done;
use crate::cache_dir::{self, Marker, Stamp};
use crate::{BlockKey, Error, Result};

/// A download, checked against the metadata and written into the cache.
enum Fetched {
    /// Installed under the clean name, with the file's stamp; the file stays open for the
    /// handle.
    Installed(File, Stamp),
    /// The bytes do not match the metadata: what differs.
    Mismatch(String),
}

/// The `Error::Corrupted` reason of bytes whose SHA-256 is not the recorded one.
fn mismatch(actual: &[u8; 32], expected: &[u8; 32]) -> String {
    format!(
        "SHA-256 {} instead of {}",
        hex::encode(actual),
        hex::encode(expected)
    )
}

/// Blocks of an object looked up in the database for a cached copy, after the one that
/// last brought it in.
const SHARE_CANDIDATES: u32 = 16;

/// Checks the clean file of `key`, just linked from elsewhere, against the object's length
/// and SHA-256.
fn check_linked(
    dir: &cache_dir::CacheDir,
    key: BlockKey,
    len: u64,
    hash: [u8; 32],
) -> std::io::Result<Fetched> {
    let file = dir.open(key, Marker::Clean)?;
    let meta = file.metadata()?;
    let actual = meta.len();
    if actual != len {
        return Ok(Fetched::Mismatch(format!(
            "{actual} bytes instead of {len}"
        )));
    }
    let digest = cache_dir::hash_open(&file, len)?;
    if digest != hash {
        return Ok(Fetched::Mismatch(mismatch(&digest, &hash)));
    }
    Ok(Fetched::Installed(file, Stamp::of(&meta)))
}

/// Hard-links `source` as `dest`; a file in the way is unlinked first (never truncated).
fn link_replacing(source: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    std::fs::hard_link(source, dest).or_else(|e| {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        std::fs::remove_file(dest)?;
        std::fs::hard_link(source, dest)
    })
}

impl BlockHandle {
    /// Makes sure the block is cached if it has content; returns false for a hole on read.
    pub(super) async fn ensure(&mut self, intent: Intent) -> Result<bool> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let found = inner.lock_state().touch(key);
        match found {
            Some(c) if c.verified && (c.dirty || self.unchanged(c)?) => {
                self.hit();
                return Ok(true);
            }
            Some(_) => {
                if self.verify().await? {
                    self.hit();
                    return Ok(true);
                }
                self.file = None;
            }
            None => {}
        }
        if let Intent::Write { start: 0, end } = intent
            && end >= inner.config.block_size
        {
            // The write replaces any content the block may have in the store (no object is
            // longer than a block): there is nothing to look up or fetch.
            self.create_empty().await?;
            return Ok(true);
        }
        let mapping = inner.db.mapping(key.inode, key.blockno).await?;
        let Some(object) = mapping else {
            if let Intent::Read = intent {
                return Ok(false);
            }
            self.create_empty().await?;
            return Ok(true);
        };
        let replaces_all = match intent {
            Intent::Read => false,
            Intent::Write { start, end } => start == 0 && end >= object.length,
            Intent::Truncate(size) => size == 0,
        };
        if replaces_all {
            self.create_empty().await?;
            return Ok(true);
        }
        Counters::add(&inner.counters.misses, 1);
        self.download(object).await?;
        Ok(true)
    }

    async fn create_empty(&mut self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let room = inner.make_room(0, 1).await?;
        let mut created = inner.dir.create_dirty(self.key);
        if super::evict::is_full(&created) && inner.free_space(0) {
            // The cache's file system was full: clean blocks were evicted; once more.
            created = inner.dir.create_dirty(self.key);
        }
        // The reserved slot becomes the entry in one critical section.
        let mut st = inner.lock_state();
        room.settle(&mut st);
        let file = created.map_err(Error::io(
            "create cache file",
            inner.dir.file(self.key, Marker::Dirty),
        ))?;
        // An empty new block is dirty (it must become a mapping) but holds no bytes yet.
        st.insert(self.key, 0, Origin::Created);
        drop(st);
        self.file = Some(file);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(inode = self.key.inode, blockno = self.key.blockno, obj_id = object.id))]
    async fn download(&mut self, object: blockcache_db::Object) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let lost = || Error::Lost {
            obj_id: object.id,
            inode: key.inode,
            blockno: key.blockno,
        };
        let Some(hash) = object.hash else {
            return Err(lost());
        };
        if let Some(done) = inner.upload_of(object.id) {
            // The object is still being uploaded for another block: wait for it.
            wait_done(done).await.map_err(|_| lost())?;
        }
        // One miss per object at a time: the misses of other blocks of this object wait
        // here, then share this one's file instead of downloading the object again.
        let _object = inner.object_locks.lock(object.id).await;
        // Room for the block, given back if this fails or the caller gives up.
        let room = inner.make_room(object.length, 1).await?;
        let mut downloaded = false;
        let (fetched, action) = if let Some(shared) = self.share_cached(&object, hash).await? {
            Counters::add(&inner.counters.download_dedup_hits, 1);
            (Ok(shared), "link a cached copy of the object")
        } else if let Some(linked) = match inner.backend.can_link() {
            true => self.link_download(&object, hash).await?,
            false => None,
        } {
            downloaded = true;
            (linked, "link the object into the cache")
        } else {
            // Neither: fetch the bytes.
            downloaded = true;
            (
                self.fetch_download(&object, hash).await?,
                "store downloaded block",
            )
        };
        {
            // The reservation becomes the entry in one critical section.
            let mut st = inner.lock_state();
            room.settle(&mut st);
            if let Ok(Fetched::Installed(_, stamp)) = fetched {
                st.insert(key, object.length, Origin::Downloaded);
                st.mark_verified(key, stamp);
            }
        }
        let file = match fetched {
            Ok(Fetched::Installed(file, _)) => file,
            Ok(Fetched::Mismatch(reason)) => {
                Counters::add(&inner.counters.download_errors, 1);
                return Err(Error::Corrupted {
                    obj_id: object.id,
                    inode: key.inode,
                    blockno: key.blockno,
                    reason,
                });
            }
            Err(source) => {
                Counters::add(&inner.counters.download_errors, 1);
                return Err(Error::io(action, inner.dir.file(key, Marker::Clean))(
                    source,
                ));
            }
        };
        if downloaded {
            Counters::add(&inner.counters.downloads, 1);
            Counters::add(&inner.counters.download_bytes, object.length);
            inner.note_copy(object.id, key);
        }
        self.file = Some(file);
        Ok(())
    }

    /// A miss whose object is cached for another block (room is reserved): the clean cache
    /// file becomes a hard link to that block's file, so the object is neither downloaded
    /// again nor stored twice in the cache, then it is checked like a download (length and
    /// SHA-256). A later change of either block gives it a file of its own first (invariant
    /// 11). `None` when no cached block of the object could be shared.
    ///
    /// The candidates: none for an object of one block; the block whose miss last brought
    /// the object in ([`super::Inner::copy_of`]); failing that, up to [`SHARE_CANDIDATES`]
    /// blocks of the object from the database (a query on every miss would cost small
    /// blocks more than it saves). One that is not cached, or dirty, is passed over; so is
    /// one still under its dirty name whose lock is taken (see [`Self::link_first`]).
    async fn share_cached(
        &mut self,
        object: &blockcache_db::Object,
        hash: [u8; 32],
    ) -> Result<Option<Fetched>> {
        if object.refcount <= 1 {
            return Ok(None);
        }
        let key = self.key;
        let last = self.inner.copy_of(object.id).filter(|k| *k != key);
        if let Some(last) = last
            && let Some(shared) = self.link_first(vec![last], object.length, hash).await
        {
            return Ok(Some(shared));
        }
        let blocks = self
            .inner
            .db
            .blocks_of_object(object.id, SHARE_CANDIDATES)
            .await?;
        let candidates: Vec<BlockKey> = blocks
            .into_iter()
            .map(|(inode, blockno)| BlockKey::new(inode, blockno))
            .filter(|k| *k != key && Some(*k) != last)
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        Ok(self.link_first(candidates, object.length, hash).await)
    }

    /// Links the clean file of the first of `candidates` that is cached clean and checks out
    /// (length `len`, SHA-256 `hash`) as this block's clean file. A source under its dirty
    /// name is locked while it is linked (`try_lock`: never waits, so no lock order is at
    /// stake), or passed over.
    async fn link_first(
        &self,
        candidates: Vec<BlockKey>,
        len: u64,
        hash: [u8; 32],
    ) -> Option<Fetched> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        tokio::task::spawn_blocking(move || {
            let path = inner.dir.file(key, Marker::Clean);
            candidates.into_iter().find_map(|source| {
                let marker = {
                    let st = inner.lock_state();
                    let c = st.get(source)?;
                    (!c.dirty && c.verified && c.size == len).then_some(c.marker)?
                };
                // A file under its clean name can be linked while others hold the block: a
                // change renames it to its dirty name before touching it (so a link after
                // that finds nothing), then copies it once it has two links (so a link
                // before that is left alone). A clean block still under its dirty name
                // would be changed in place: it is linked only under the block's lock.
                let _locked = match marker {
                    Marker::Clean => None,
                    Marker::Dirty => {
                        let locked = inner.locks.try_lock(source)?;
                        let st = inner.lock_state();
                        let c = st.get(source)?;
                        if c.dirty || !c.verified || c.size != len || c.marker != marker {
                            return None;
                        }
                        Some(locked)
                    }
                };
                let from = inner.dir.file(source, marker);
                link_replacing(&from, &path).ok()?;
                match check_linked(&inner.dir, key, len, hash) {
                    Ok(fetched @ Fetched::Installed(..)) => Some(fetched),
                    _ => {
                        let _ = std::fs::remove_file(&path);
                        None
                    }
                }
            })
        })
        .await
        .expect("link task panicked")
    }

    /// Fetches the object and writes it under the block's clean name (room is reserved).
    /// `Err` inside: the file could not be written.
    async fn fetch_download(
        &mut self,
        object: &blockcache_db::Object,
        hash: [u8; 32],
    ) -> Result<std::io::Result<Fetched>> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let started = std::time::Instant::now();
        let fetched = inner.backend.get(object.id).await;
        metrics::histogram!(
            "blockcache_download_duration_seconds",
            "outcome" => super::outcome_label(&fetched)
        )
        .record(started.elapsed().as_secs_f64());
        let data = fetched.map_err(|e| {
            Counters::add(&inner.counters.download_errors, 1);
            Error::Download {
                obj_id: object.id,
                inode: key.inode,
                blockno: key.blockno,
                source: Arc::new(e),
            }
        })?;
        let len = object.length;
        let install = |data: bytes::Bytes, check: bool| {
            let dir = inner.dir.clone();
            tokio::task::spawn_blocking(move || {
                if check {
                    if data.len() as u64 != len {
                        return Ok(Fetched::Mismatch(format!(
                            "{} bytes instead of {len}",
                            data.len()
                        )));
                    }
                    let actual: [u8; 32] = Sha256::digest(&data).into();
                    if actual != hash {
                        return Ok(Fetched::Mismatch(mismatch(&actual, &hash)));
                    }
                }
                let file = dir.install_clean(key, &data)?;
                let stamp = Stamp::of(&file.metadata()?);
                Ok(Fetched::Installed(file, stamp))
            })
        };
        let mut installed = install(data.clone(), true)
            .await
            .expect("download task panicked");
        if super::evict::is_full(&installed) && inner.free_space(len) {
            // The cache's file system was full: clean blocks were evicted; once more (the
            // bytes were checked the first time).
            installed = install(data, false).await.expect("download task panicked");
        }
        Ok(installed)
    }

    /// A miss served from a local-directory store on the cache's file system (room is
    /// reserved): the clean cache file becomes a hard link to the object's file (no copy, no
    /// new inode), then its length and SHA-256 are checked like any download, and the link
    /// is removed again if they do not match. A change of the block later gets a file of its
    /// own first (invariant 11). `None` if the store could not link it for any reason: the
    /// fetch says what is wrong.
    async fn link_download(
        &mut self,
        object: &blockcache_db::Object,
        hash: [u8; 32],
    ) -> Result<Option<std::io::Result<Fetched>>> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let (dir, backend, id, len) = (
            inner.dir.clone(),
            inner.backend.clone(),
            object.id,
            object.length,
        );
        let started = std::time::Instant::now();
        let linked = tokio::task::spawn_blocking(move || {
            let path = dir.file(key, Marker::Clean);
            // Any failure to link (no such object, a store directory that is gone or
            // broken) leaves the miss to the fetch, which reports it as the store's error.
            if !backend.link_out(id, &path).unwrap_or(false) {
                return None;
            }
            let checked = check_linked(&dir, key, len, hash);
            if !matches!(checked, Ok(Fetched::Installed(..))) {
                let _ = std::fs::remove_file(&path);
            }
            Some(checked)
        })
        .await
        .expect("download task panicked");
        metrics::histogram!(
            "blockcache_download_duration_seconds",
            "outcome" => if matches!(linked, Some(Ok(Fetched::Installed(..)))) { "ok" } else { "error" }
        )
        .record(started.elapsed().as_secs_f64());
        Ok(linked)
    }

    /// Whether the file of the clean entry `c` still has the stamp it had when its content
    /// was last known right (one `fstat` of the file the read uses). False also when it has
    /// no stamp yet or cannot be opened: the caller checks its content.
    fn unchanged(&mut self, c: super::state::Cached) -> Result<bool> {
        let Some(stamp) = c.stamp else {
            return Ok(false);
        };
        let Ok(file) = self.file() else {
            return Ok(false);
        };
        Ok(file.metadata().is_ok_and(|m| Stamp::of(&m) == stamp))
    }

    /// Checks a clean file against its mapping (length and SHA-256): a file found at
    /// start-up, or one whose stamp moved since it was last checked (changed on disk while
    /// the engine runs). A stale or damaged file is deleted and the block treated as a miss,
    /// so it is fetched again. Returns whether the file was kept.
    #[tracing::instrument(level = "debug", skip_all, fields(inode = self.key.inode, blockno = self.key.blockno))]
    async fn verify(&mut self) -> Result<bool> {
        let inner = Arc::clone(&self.inner);
        let key = self.key;
        let (size, marker) = {
            let st = inner.lock_state();
            let c = st.get(key).expect("cached");
            (c.size, c.marker)
        };
        self.file = None;
        let mapping = inner.db.mapping(key.inode, key.blockno).await?;
        let path = inner.dir.file(key, marker);
        let checked = match mapping {
            Some(o) if o.length == size && o.hash.is_some() => {
                let expected = o.hash.expect("checked");
                let dir = inner.dir.clone();
                tokio::task::spawn_blocking(move || {
                    // The stamp before the bytes: a change while hashing moves the stamp
                    // again, so the next read checks once more.
                    let file = dir.open(key, marker).ok()?;
                    let meta = file.metadata().ok()?;
                    if meta.len() != size {
                        return None;
                    }
                    let digest = cache_dir::hash_open(&file, size).ok()?;
                    (digest == expected).then(|| (file, Stamp::of(&meta)))
                })
                .await
                .expect("verify task panicked")
            }
            _ => None,
        };
        if let Some((file, stamp)) = checked {
            inner.lock_state().mark_verified(key, stamp);
            self.file = Some(file);
            return Ok(true);
        }
        tracing::warn!(inode = key.inode, blockno = key.blockno, path = %path.display(), "cached block does not match its metadata; discarding it and fetching it again");
        Counters::add(&inner.counters.corrupt_cache_files, 1);
        inner.lock_state().remove(key);
        inner
            .dir
            .remove(key, marker)
            .map_err(Error::io("delete stale cache file", path))?;
        Ok(false)
    }
}
