//! The documents of the metadata shipped to the store (see `blockcache_backend::meta` for
//! their names and framing): snapshot parts, the manifest that completes a generation, and
//! deltas. Each is JSON inside a framed, compressed (and, for an encrypted volume,
//! encrypted) object bound to its name.
//!
//! A generation restores as: every part of its snapshot, then its deltas in order, each
//! numbered one after the one before it. A snapshot is the shipped state (what the store's
//! previous generation held), so a generation never holds a file whose blocks are not all
//! in the store.

use blockcache_db::MetaRows;
use serde::{Deserialize, Serialize};

/// Version of the documents' layout.
pub(crate) const DOC_VERSION: u32 = 1;

/// Rows per snapshot part (about 1 to 3 MB of JSON before compression).
pub(crate) const PART_ROWS: usize = 20_000;

/// Most changes shipped in one delta.
pub(crate) const DELTA_CHANGES: usize = 50_000;

/// A snapshot part.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PartDoc {
    pub(crate) version: u32,
    pub(crate) volume: String,
    pub(crate) generation: u64,
    pub(crate) part: u32,
    pub(crate) rows: MetaRows,
}

/// The manifest of a generation, written after its parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ManifestDoc {
    pub(crate) version: u32,
    pub(crate) volume: String,
    pub(crate) generation: u64,
    pub(crate) parts: u32,
    /// When it was written (RFC 3339).
    pub(crate) created: String,
    pub(crate) block_size: u64,
    pub(crate) namespace_floor: Option<u64>,
    pub(crate) files: u64,
    pub(crate) blocks: u64,
}

/// A delta: the rows of the keys changed since the one before it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DeltaDoc {
    pub(crate) version: u32,
    pub(crate) volume: String,
    pub(crate) generation: u64,
    /// Its number in the generation, from 1; `seq - 1` is the one before (0: the snapshot).
    pub(crate) seq: u64,
    /// The change clock it ships up to.
    pub(crate) through: u64,
    pub(crate) rows: MetaRows,
}

/// Checks a decoded document's version and volume.
pub(crate) fn check_doc(version: u32, volume: &str, expected: &str) -> Result<(), String> {
    if version > DOC_VERSION {
        return Err(format!(
            "written by a newer blockcache (document version {version}, this one reads {DOC_VERSION})"
        ));
    }
    if volume != expected {
        return Err(format!("it belongs to volume {volume}, not {expected}"));
    }
    Ok(())
}
