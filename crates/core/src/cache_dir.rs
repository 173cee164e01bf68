//! The cache directory: one file per cached block.
//!
//! Names: `<inode>-<blockno>` holds a clean block (identical to its object in the store),
//! `<inode>-<blockno>.dirty` holds a block that may differ from the store. Files ending in
//! `.tmp` are leftovers and are deleted at start-up. The `.dirty` name is the durable dirty
//! marker: a block is renamed to it *before* its first modification, and back only after its
//! upload is recorded in the database. A crash can therefore leave a clean block marked dirty
//! (recovery re-hashes it and finds nothing to do) but never a dirty block marked clean.
//!
//! Every function here does blocking file-system calls; callers run them on the blocking
//! pool, or inline where the call is a single small `pread`/`pwrite` on the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::BlockKey;

/// The file naming the volume a cache directory belongs to.
const VOLUME_FILE: &str = ".volume";

/// The name a block's file has: clean (`<inode>-<blockno>`, identical to its object) or
/// with the dirty marker (`<inode>-<blockno>.dirty`, may differ from the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marker {
    Clean,
    Dirty,
}

/// What identifies a cache file's content without reading it: its inode, length and
/// modification time. Any write through the file system changes the time (and a replaced
/// file the inode), so a clean file whose stamp moved since it was checked is checked again
/// before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// A file found by [`CacheDir::scan`].
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) key: BlockKey,
    pub(crate) marker: Marker,
    pub(crate) size: u64,
    pub(crate) modified: SystemTime,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub(crate) struct CacheDir {
    path: PathBuf,
}

impl CacheDir {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the file of `key` under the name `marker`.
    pub(crate) fn file(&self, key: BlockKey, marker: Marker) -> PathBuf {
        let suffix = match marker {
            Marker::Dirty => ".dirty",
            Marker::Clean => "",
        };
        self.path
            .join(format!("{}-{}{suffix}", key.inode, key.blockno))
    }

    /// Creates the directory if needed and checks that files can be created in it.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.path)?;
        let probe = self.path.join(".probe.tmp");
        let file = File::create(&probe)?;
        file.sync_all()?;
        drop(file);
        std::fs::remove_file(&probe)
    }

    /// Writes, syncs and deletes a small file: whether blocks can be written now.
    pub(crate) fn probe_write(&self) -> io::Result<()> {
        let probe = self.path.join(".probe.tmp");
        let written = (|| {
            let file = create_fresh(&probe)?;
            file.write_all_at(&[0; 4096], 0)?;
            file.sync_all()
        })();
        let removed = std::fs::remove_file(&probe);
        written.and(removed)
    }

    /// Takes the exclusive lock of the directory (`.lock`), so that two engines never share
    /// it. The operating system drops the lock when the process dies. Returns `Ok(None)` if
    /// someone else holds it.
    pub(crate) fn lock(&self) -> io::Result<Option<File>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join(".lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The id of the volume the directory belongs to (`.volume`), if it says.
    pub(crate) fn volume(&self) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.path.join(VOLUME_FILE)) {
            Ok(id) => Ok(Some(id.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that the directory belongs to volume `id` (durably: a temporary file,
    /// fsynced, renamed, and the directory fsynced).
    pub(crate) fn set_volume(&self, id: &str) -> io::Result<()> {
        let staged = self.path.join(".volume.tmp");
        let file = create_fresh(&staged)?;
        file.write_all_at(format!("{id}\n").as_bytes(), 0)?;
        file.sync_all()?;
        std::fs::rename(&staged, self.path.join(VOLUME_FILE))?;
        self.sync_dir()
    }

    /// Deletes every block file (clean and dirty): the directory is about to be used for
    /// another volume.
    pub(crate) fn purge(&self) -> io::Result<()> {
        let (found, _) = self.scan()?;
        for f in found {
            self.remove(f.key, f.marker)?;
        }
        self.sync_dir()
    }

    /// Lists the cache files, deleting temporary files. Unknown names are returned apart.
    pub(crate) fn scan(&self) -> io::Result<(Vec<Found>, Vec<PathBuf>)> {
        self.list_files(true)
    }

    /// [`CacheDir::scan`] without deleting anything: temporary files (which a running engine
    /// may be writing) are skipped, and a file that goes away while listed is left out.
    pub(crate) fn list(&self) -> io::Result<(Vec<Found>, Vec<PathBuf>)> {
        self.list_files(false)
    }

    fn list_files(&self, delete_tmp: bool) -> io::Result<(Vec<Found>, Vec<PathBuf>)> {
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for item in std::fs::read_dir(&self.path)? {
            let item = item?;
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                unknown.push(item.path());
                continue;
            };
            if name == ".lock" || name == VOLUME_FILE {
                continue;
            }
            if name.ends_with(".tmp") {
                if delete_tmp {
                    std::fs::remove_file(item.path())?;
                }
                continue;
            }
            let (stem, marker) = match name.strip_suffix(".dirty") {
                Some(stem) => (stem, Marker::Dirty),
                None => (name, Marker::Clean),
            };
            let Some(key) = parse_key(stem) else {
                unknown.push(item.path());
                continue;
            };
            let meta = match item.metadata() {
                Err(e) if !delete_tmp && e.kind() == io::ErrorKind::NotFound => continue,
                meta => meta?,
            };
            if !meta.is_file() {
                unknown.push(item.path());
                continue;
            }
            found.push(Found {
                key,
                marker,
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok((found, unknown))
    }

    /// Creates an empty file for a new block, with the dirty marker.
    pub(crate) fn create_dirty(&self, key: BlockKey) -> io::Result<File> {
        create_fresh(&self.file(key, Marker::Dirty))
    }

    /// Makes the open file `file` of `key` (under its dirty name) safe to change in place.
    /// A file whose inode is also an object of a local store (a hard link made by the
    /// upload, see `Backend::link_object`) is replaced, under the same name, by a copy of
    /// its own; the copy is returned. `None`: the file is not shared and may be changed.
    ///
    /// A crash in between leaves the dirty name on either inode, both holding the same
    /// bytes, and the object in the store untouched. The copy is as durable as any dirty
    /// write: `sync` makes it so.
    pub(crate) fn unshare(&self, key: BlockKey, file: &File) -> io::Result<Option<File>> {
        use std::os::unix::fs::MetadataExt;
        if file.metadata()?.nlink() <= 1 {
            return Ok(None);
        }
        let path = self.file(key, Marker::Dirty);
        let staged = self
            .path
            .join(format!("{}-{}.unshare.tmp", key.inode, key.blockno));
        let copied = (|| {
            let mut source = File::open(&path)?;
            let mut copy = create_fresh(&staged)?;
            io::copy(&mut source, &mut copy)?;
            std::fs::rename(&staged, &path)?;
            Ok(copy)
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&staged);
        }
        copied.map(Some)
    }

    /// Opens the file of a cached block for reading and writing.
    pub(crate) fn open(&self, key: BlockKey, marker: Marker) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.file(key, marker))
    }

    /// Stores downloaded content as a clean file and returns it, open for reading and
    /// writing.
    ///
    /// Unlike S3QL there is no temporary file, rename or fsync: a crash may leave a torn file
    /// under the clean name, but clean files found at start-up are checked (length and
    /// SHA-256) before first use and fetched again if they do not match, so a torn file is
    /// never served. If the block is later modified, `sync` flushes the whole file, downloaded
    /// bytes included. On error the partial file is deleted.
    pub(crate) fn install_clean(&self, key: BlockKey, data: &[u8]) -> io::Result<File> {
        let path = self.file(key, Marker::Clean);
        let result = (|| {
            let file = create_fresh(&path)?;
            file.write_all_at(data, 0)?;
            Ok(file)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// The stamp of the file of `key`, under whichever name it has (`None` if it has none).
    pub(crate) fn stamp(&self, key: BlockKey) -> Option<Stamp> {
        [Marker::Dirty, Marker::Clean]
            .into_iter()
            .find_map(|m| std::fs::metadata(self.file(key, m)).ok())
            .map(|meta| Stamp::of(&meta))
    }

    /// Renames the file of `key` to the name `to` from the other one.
    pub(crate) fn set_marker(&self, key: BlockKey, to: Marker) -> io::Result<()> {
        let from = match to {
            Marker::Dirty => Marker::Clean,
            Marker::Clean => Marker::Dirty,
        };
        std::fs::rename(self.file(key, from), self.file(key, to))
    }

    /// Deletes the file of `key` under the name `marker`; a missing file is fine.
    pub(crate) fn remove(&self, key: BlockKey, marker: Marker) -> io::Result<()> {
        match std::fs::remove_file(self.file(key, marker)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Flushes every dirty page of the file system holding the directory (one `syncfs`),
    /// which is cheaper than thousands of `fsync` calls when many blocks are dirty.
    pub(crate) fn sync_filesystem(&self) -> io::Result<()> {
        let dir = File::open(&self.path)?;
        rustix::fs::syncfs(&dir).map_err(io::Error::from)
    }

    /// fsyncs the directory itself, making creations and renames durable.
    pub(crate) fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

/// Creates an empty file at `path`, open for reading and writing. A file already there is
/// unlinked first, never truncated: its inode may be an object of a local store.
fn create_fresh(path: &Path) -> io::Result<File> {
    let create = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    };
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()
        }
        result => result,
    }
}

/// The SHA-256 of the first `len` bytes of `path`, read in pieces through one reused buffer
/// per thread (no allocation of the whole block, which the caller does not keep).
pub(crate) fn hash_file(path: &Path, len: u64) -> io::Result<[u8; 32]> {
    hash_open(&File::open(path)?, len)
}

/// [`hash_file`] of a file already open.
pub(crate) fn hash_open(file: &File, len: u64) -> io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 256 << 10]);
    }
    BUF.with_borrow_mut(|buf| {
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        while offset < len {
            let n = usize::try_from(len - offset).map_or(buf.len(), |rest| rest.min(buf.len()));
            file.read_exact_at(&mut buf[..n], offset)?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(hasher.finalize().into())
    })
}

/// Reads `len` bytes at offset 0 of `path`.
pub(crate) fn read_whole(path: &Path, len: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut buf = vec![0; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// fsyncs the file at `path` if it exists.
pub(crate) fn sync_file(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_data(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn parse_key(stem: &str) -> Option<BlockKey> {
    let (inode, blockno) = stem.split_once('-')?;
    let key = BlockKey::new(inode.parse().ok()?, blockno.parse().ok()?);
    // Canonical decimal only, so that each key has exactly one file name.
    (format!("{}-{}", key.inode, key.blockno) == stem).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_set_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CacheDir::new(dir.path().to_owned());
        cache.prepare().expect("prepare");
        let k = BlockKey::new(42, 7);
        cache.create_dirty(k).expect("create");
        cache
            .install_clean(BlockKey::new(1, 0), b"abc")
            .expect("install");
        std::fs::write(dir.path().join("3-4.tmp"), b"x").expect("tmp");
        std::fs::write(dir.path().join("junk"), b"x").expect("junk");
        std::fs::write(dir.path().join("01-2"), b"x").expect("non-canonical");
        let (mut found, unknown) = cache.scan().expect("scan");
        found.sort_by_key(|f| f.key);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].key, found[0].marker, found[0].size),
            (BlockKey::new(1, 0), Marker::Clean, 3)
        );
        assert_eq!((found[1].key, found[1].marker), (k, Marker::Dirty));
        assert_eq!(unknown.len(), 2);
        assert!(!dir.path().join("3-4.tmp").exists());
        cache.set_marker(k, Marker::Clean).expect("unmark");
        assert!(cache.file(k, Marker::Clean).exists() && !cache.file(k, Marker::Dirty).exists());
    }
}
