//! The values [`State`](super::State)'s methods take and return: what a caller may know of
//! the entries without reaching into them.

use tokio::time::Instant;

use super::{Done, DoneTx};
use crate::BlockKey;
use crate::cache_dir::Marker;

/// A generation of a block being committed or uploaded, and its completion.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) key: BlockKey,
    pub(crate) generation: u64,
    pub(crate) done: Done,
}

/// How an entry comes to be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A new empty block, dirty (it must become a mapping), checked.
    Created,
    /// Downloaded (or linked) from the store and checked: clean.
    Downloaded,
    /// A clean file found at start-up: checked on first use.
    FoundClean,
    /// A dirty file found at start-up.
    FoundDirty,
}

/// What a cached entry looks like to a block handle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cached {
    pub(crate) id: u64,
    pub(crate) size: u64,
    pub(crate) verified: bool,
    pub(crate) marker: Marker,
    /// Whether it differs from the store.
    pub(crate) dirty: bool,
    /// The stamp its file had when last known right (clean entries).
    pub(crate) stamp: Option<crate::cache_dir::Stamp>,
}

/// An entry taken out of the state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Removed {
    /// Dirty bytes it held, to give back to the dirty budget.
    pub(crate) dirty_bytes: u64,
    /// The name of its file.
    pub(crate) marker: Marker,
}

/// A dirty block whose commit just started.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) entry_id: u64,
    pub(crate) generation: u64,
    pub(crate) size: u64,
    pub(crate) marker: Marker,
    /// Its hash, if computed ahead at this generation.
    pub(crate) prehash: Option<[u8; 32]>,
    pub(crate) done: DoneTx,
}

/// What [`State::start_commit`] found.
#[derive(Debug)]
pub(crate) enum StartCommit {
    /// Not cached, or clean: nothing to commit.
    Nothing,
    /// A commit of this block is already under way.
    InFlight(Pending),
    /// Marked in flight now; the caller reads, hashes and records it.
    Started(Started, Pending),
}

/// The generation of an entry that a flush must see in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) entry_id: u64,
    pub(crate) generation: u64,
}

/// Where a flush target stands.
#[derive(Debug)]
pub(crate) enum FlushStatus {
    /// In the store, or removed (nothing to flush).
    Done,
    /// A commit is under way, of this generation.
    InFlight { generation: u64, done: Done },
    /// Dirty and idle: it must be committed.
    Idle,
}

/// What eviction decided under the lock.
#[derive(Debug, Default)]
pub(crate) struct EvictionPlan<G> {
    /// Clean entries taken out of the state, with their locks; their files are deleted next.
    pub(crate) evicted: Vec<(BlockKey, Marker, G)>,
    /// Dirty idle entries to commit first.
    pub(crate) commit: Vec<BlockKey>,
    /// Entries whose commit is under way.
    pub(crate) wait: Vec<Pending>,
}

/// The blocks of one inode in the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InodeBlocks {
    pub(crate) cached: u64,
    pub(crate) dirty: u64,
    pub(crate) uploading: u64,
}

/// A copy of the totals, for usage reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
    pub(crate) dirty_entries: u64,
    pub(crate) dirty_bytes: u64,
    pub(crate) oldest_dirty: Option<Instant>,
    pub(crate) max_bytes: u64,
    pub(crate) max_entries: u64,
}
