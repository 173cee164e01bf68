//! In-memory state of the cached blocks: entries, LRU order, dirty order and accounting.
//!
//! Everything here sits behind one std mutex in [`crate::engine::Inner`], and every method is
//! synchronous: callers decide what to do under the lock and do I/O after releasing it.

use std::collections::{BTreeMap, BTreeSet};
use tokio::time::Instant;

use tokio::sync::watch;

use crate::{BlockKey, Error};

/// Completion of the upload of one generation of a block: `None` while pending.
pub(crate) type Done = watch::Receiver<Option<Result<(), Error>>>;

/// One cached block.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Unique per incarnation: a block removed and cached again gets a new id, so late
    /// completions of the old incarnation are ignored.
    pub(crate) id: u64,
    /// Apparent size of the cache file (the block's length).
    pub(crate) size: u64,
    /// Bumped by every modification.
    pub(crate) generation: u64,
    /// The generation known to be in the store; the entry is clean when it equals `generation`.
    pub(crate) clean_gen: u64,
    /// Whether the file carries the dirty marker (`.dirty` name).
    pub(crate) marker: bool,
    /// The generation being committed or uploaded, with its completion.
    pub(crate) inflight: Option<(u64, Done)>,
    /// Time of the last modification.
    pub(crate) last_write: Instant,
    /// When the entry last went from clean to dirty.
    pub(crate) dirty_since: Option<Instant>,
    /// Position in the LRU order.
    pub(crate) tick: u64,
    /// Bytes of the dirty budget this entry holds (its size while dirty, 0 while clean).
    pub(crate) dirty_acc: u64,
    /// False for clean files found at start-up until their content has been checked.
    pub(crate) verified: bool,
    /// The SHA-256 of the file's content at a generation, computed ahead of the commit while
    /// `sync` waited for the disk; valid only while `generation` is still that one.
    pub(crate) prehash: Option<(u64, [u8; 32])>,
}

impl Entry {
    pub(crate) fn is_dirty(&self) -> bool {
        self.generation != self.clean_gen
    }
}

/// All cached entries and their accounting.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) entries: BTreeMap<BlockKey, Entry>,
    /// LRU order: tick → key; the first item is the least recently used.
    pub(crate) lru: BTreeMap<u64, BlockKey>,
    /// Dirty entries by the time they became dirty.
    pub(crate) dirty: BTreeSet<(Instant, BlockKey)>,
    next_tick: u64,
    next_id: u64,
    /// Sum of the sizes of all entries.
    pub(crate) bytes: u64,
    /// Bytes and entry slots promised to operations about to grow the cache.
    pub(crate) reserved_bytes: u64,
    pub(crate) reserved_slots: u64,
    /// Sum of `dirty_acc`.
    pub(crate) dirty_bytes: u64,
    pub(crate) max_bytes: u64,
    pub(crate) max_entries: u64,
}

impl State {
    pub(crate) fn new(max_bytes: u64, max_entries: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            lru: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_tick: 0,
            next_id: 0,
            bytes: 0,
            reserved_bytes: 0,
            reserved_slots: 0,
            dirty_bytes: 0,
            max_bytes,
            max_entries,
        }
    }

    /// Whether `bytes` more bytes and `slots` more entries fit within the limits. An empty
    /// cache always admits one request, so a single block larger than the limit cannot wait
    /// forever.
    pub(crate) fn fits(&self, bytes: u64, slots: u64) -> bool {
        let used_bytes = self.bytes + self.reserved_bytes;
        let used_slots = self.entries.len() as u64 + self.reserved_slots;
        (used_bytes + bytes <= self.max_bytes && used_slots + slots <= self.max_entries)
            || (used_bytes == 0 && used_slots == 0)
    }

    /// Inserts a new entry as most recently used and returns its id.
    pub(crate) fn insert(&mut self, key: BlockKey, size: u64, dirty: bool, verified: bool) -> u64 {
        let now = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        let tick = self.next_tick;
        self.next_tick += 1;
        let entry = Entry {
            id,
            size,
            generation: u64::from(dirty),
            clean_gen: 0,
            marker: dirty,
            inflight: None,
            last_write: now,
            dirty_since: dirty.then_some(now),
            tick,
            dirty_acc: if dirty { size } else { 0 },
            verified,
            prehash: None,
        };
        self.bytes += size;
        self.dirty_bytes += entry.dirty_acc;
        if dirty {
            self.dirty.insert((now, key));
        }
        self.lru.insert(tick, key);
        let old = self.entries.insert(key, entry);
        debug_assert!(old.is_none(), "entry {key:?} inserted twice");
        id
    }

    /// Moves `key` to the most recently used end.
    pub(crate) fn touch(&mut self, key: BlockKey) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(&key) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, key);
            self.next_tick += 1;
        }
    }

    /// Removes `key`; returns the entry. The caller returns `dirty_acc` to the budget.
    pub(crate) fn remove(&mut self, key: BlockKey) -> Option<Entry> {
        let e = self.entries.remove(&key)?;
        self.lru.remove(&e.tick);
        if let Some(since) = e.dirty_since {
            self.dirty.remove(&(since, key));
        }
        self.bytes -= e.size;
        self.dirty_bytes -= e.dirty_acc;
        Some(e)
    }

    /// Records a modification of `key` that leaves it `new_size` bytes long. Returns the
    /// change of its dirty accounting (to be taken from the writer's credit).
    pub(crate) fn modify(&mut self, key: BlockKey, new_size: u64) -> i64 {
        let now = Instant::now();
        let e = self
            .entries
            .get_mut(&key)
            .expect("modified entry is cached");
        if e.dirty_since.is_none() {
            e.dirty_since = Some(now);
            self.dirty.insert((now, key));
        }
        e.generation += 1;
        e.last_write = now;
        self.bytes = self.bytes - e.size + new_size;
        e.size = new_size;
        let delta = new_size as i64 - e.dirty_acc as i64;
        self.dirty_bytes = self.dirty_bytes - e.dirty_acc + new_size;
        e.dirty_acc = new_size;
        delta
    }

    /// Records that generation `generation` of entry `id` is in the store. Returns the bytes to give
    /// back to the dirty budget if the entry became clean, and whether it did.
    pub(crate) fn confirm(&mut self, key: BlockKey, id: u64, generation: u64) -> Option<u64> {
        let e = self.entries.get_mut(&key).filter(|e| e.id == id)?;
        if e.inflight.as_ref().is_some_and(|(g, _)| *g == generation) {
            e.inflight = None;
        }
        if generation > e.clean_gen {
            e.clean_gen = generation;
        }
        if e.is_dirty() {
            return None;
        }
        let freed = std::mem::take(&mut e.dirty_acc);
        if let Some(since) = e.dirty_since.take() {
            self.dirty.remove(&(since, key));
        }
        self.dirty_bytes -= freed;
        Some(freed)
    }

    /// Records that the upload of generation `generation` of entry `id` failed.
    pub(crate) fn fail(&mut self, key: BlockKey, id: u64, generation: u64) {
        if let Some(e) = self.entries.get_mut(&key).filter(|e| e.id == id)
            && e.inflight.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            e.inflight = None;
        }
    }

    pub(crate) fn dirty_entries(&self) -> u64 {
        self.dirty.len() as u64
    }
}
