//! In-memory state of the cached blocks: entries, LRU order, dirty order, reservations of
//! room, and their accounting.
//!
//! Everything here sits behind one std mutex of the engine and every method is synchronous:
//! callers decide under the lock and do I/O after releasing it. The fields are private; each
//! method keeps the accounting (`bytes`, `dirty_bytes`, the dirty set, the LRU index and the
//! reservations) exact, which [`State::check`] recounts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache_dir::{Marker, Stamp};
use crate::{BlockKey, Error};

/// Completion of the commit of one generation of a block: `None` while pending.
pub(crate) type Done = watch::Receiver<Option<Result<(), Error>>>;

/// The sending side of a [`Done`].
pub(crate) type DoneTx = watch::Sender<Option<Result<(), Error>>>;

pub(crate) use views::{
    Cached, EvictionPlan, FlushStatus, InodeBlocks, Origin, Pending, Removed, StartCommit, Started,
    Target, Totals,
};

/// One cached block.
#[derive(Debug)]
struct Entry {
    /// Unique per incarnation: a block removed and cached again gets a new id, so late
    /// completions of the old incarnation are ignored.
    id: u64,
    /// Apparent size of the cache file (the block's length).
    size: u64,
    /// Bumped by every modification.
    generation: u64,
    /// The generation known to be in the store; the entry is clean when it equals `generation`.
    clean_gen: u64,
    /// The name the file has.
    marker: Marker,
    /// The generation being committed or uploaded, with its completion.
    inflight: Option<(u64, Done)>,
    /// Time of the last modification.
    last_write: Instant,
    /// When the entry last went from clean to dirty.
    dirty_since: Option<Instant>,
    /// Position in the LRU order.
    tick: u64,
    /// Bytes of the dirty budget this entry holds (its size while dirty, 0 while clean).
    dirty_acc: u64,
    /// False for clean files found at start-up until their content has been checked.
    verified: bool,
    /// While clean: the stamp of the file when its content was last known to be the
    /// object's (downloaded, checked, or made clean by its upload). A clean entry is served
    /// only while its file still has this stamp; `None` means check it first.
    stamp: Option<Stamp>,
    /// The SHA-256 of the file's content at a generation, computed ahead of the commit;
    /// valid only while `generation` is still that one.
    prehash: Option<(u64, [u8; 32])>,
}

impl Entry {
    fn is_dirty(&self) -> bool {
        self.generation != self.clean_gen
    }
}

/// All cached entries and their accounting.
#[derive(Debug)]
pub(crate) struct State {
    entries: BTreeMap<BlockKey, Entry>,
    /// LRU order: tick → key; the first item is the least recently used.
    lru: BTreeMap<u64, BlockKey>,
    /// Dirty entries by the time they became dirty.
    dirty: BTreeSet<(Instant, BlockKey)>,
    next_tick: u64,
    next_id: u64,
    /// Sum of the sizes of all entries.
    bytes: u64,
    /// Bytes and entry slots promised to operations about to grow the cache.
    reserved_bytes: u64,
    reserved_slots: u64,
    /// Sum of `dirty_acc`.
    dirty_bytes: u64,
    max_bytes: u64,
    max_entries: u64,
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

    pub(crate) fn set_limits(&mut self, max_bytes: u64, max_entries: u64) {
        self.max_bytes = max_bytes;
        self.max_entries = max_entries;
    }

    /// Reserves `bytes` and `slots` if they fit within the limits. An empty cache always
    /// admits one request, so a single block larger than the limit cannot wait forever.
    pub(crate) fn try_reserve(&mut self, bytes: u64, slots: u64) -> bool {
        let used_bytes = self.bytes + self.reserved_bytes;
        let used_slots = self.entries.len() as u64 + self.reserved_slots;
        let fits = (used_bytes + bytes <= self.max_bytes && used_slots + slots <= self.max_entries)
            || (used_bytes == 0 && used_slots == 0);
        if fits {
            self.reserved_bytes += bytes;
            self.reserved_slots += slots;
        }
        fits
    }

    /// Gives back part of a reservation (it became an entry's size, or was not used).
    pub(crate) fn unreserve(&mut self, bytes: u64, slots: u64) {
        debug_assert!(bytes <= self.reserved_bytes && slots <= self.reserved_slots);
        self.reserved_bytes -= bytes;
        self.reserved_slots -= slots;
    }

    /// Inserts a new entry as most recently used and returns its id.
    pub(crate) fn insert(&mut self, key: BlockKey, size: u64, origin: Origin) -> u64 {
        let dirty = matches!(origin, Origin::Created | Origin::FoundDirty);
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
            marker: if dirty { Marker::Dirty } else { Marker::Clean },
            inflight: None,
            last_write: now,
            dirty_since: dirty.then_some(now),
            tick,
            dirty_acc: if dirty { size } else { 0 },
            verified: origin != Origin::FoundClean,
            stamp: None,
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

    /// The entry of `key`, if cached.
    pub(crate) fn get(&self, key: BlockKey) -> Option<Cached> {
        self.entries.get(&key).map(|e| Cached {
            id: e.id,
            size: e.size,
            verified: e.verified,
            marker: e.marker,
            dirty: e.is_dirty(),
            stamp: e.stamp,
        })
    }

    /// [`State::get`], moving the entry to the most recently used end.
    pub(crate) fn touch(&mut self, key: BlockKey) -> Option<Cached> {
        let tick = self.next_tick;
        let e = self.entries.get_mut(&key)?;
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, key);
        self.next_tick += 1;
        self.get(key)
    }

    /// Records that the file of the clean entry `key`, with `stamp`, matches its mapping.
    pub(crate) fn mark_verified(&mut self, key: BlockKey, stamp: Stamp) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.verified = true;
            if !e.is_dirty() {
                e.stamp = Some(stamp);
            }
        }
    }

    /// Records the name the file of `key` has now.
    pub(crate) fn set_marker(&mut self, key: BlockKey, marker: Marker) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.marker = marker;
        }
    }

    /// Before a change of `key`: voids a hash computed ahead (even a change that fails
    /// half-way must not leave it), and returns the file's current name.
    pub(crate) fn begin_change(&mut self, key: BlockKey) -> Option<Marker> {
        let e = self.entries.get_mut(&key)?;
        e.prehash = None;
        Some(e.marker)
    }

    /// Removes `key`; the caller gives `dirty_bytes` back to the budget.
    pub(crate) fn remove(&mut self, key: BlockKey) -> Option<Removed> {
        let e = self.entries.remove(&key)?;
        self.lru.remove(&e.tick);
        if let Some(since) = e.dirty_since {
            self.dirty.remove(&(since, key));
        }
        self.bytes -= e.size;
        self.dirty_bytes -= e.dirty_acc;
        Some(Removed {
            dirty_bytes: e.dirty_acc,
            marker: e.marker,
        })
    }

    /// Removes `key` if it is clean and no commit of it runs; returns its file's name.
    pub(crate) fn remove_if_clean(&mut self, key: BlockKey) -> Option<Marker> {
        let e = self.entries.get(&key)?;
        if e.is_dirty() || e.inflight.is_some() {
            return None;
        }
        self.remove(key).map(|r| r.marker)
    }

    /// Records a modification of `key` that leaves it `new_size` bytes long; `hash`, if
    /// given, is the SHA-256 of its whole new content and is kept with the new generation.
    /// Returns the change of its dirty accounting (taken from the writer's credit).
    pub(crate) fn modify(&mut self, key: BlockKey, new_size: u64, hash: Option<[u8; 32]>) -> i64 {
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
        e.stamp = None;
        e.last_write = now;
        e.prehash = hash.map(|h| (e.generation, h));
        self.bytes = self.bytes - e.size + new_size;
        e.size = new_size;
        let delta = new_size as i64 - e.dirty_acc as i64;
        self.dirty_bytes = self.dirty_bytes - e.dirty_acc + new_size;
        e.dirty_acc = new_size;
        delta
    }

    /// Marks the current generation of `key` in flight, if it is dirty and idle.
    pub(crate) fn start_commit(&mut self, key: BlockKey) -> StartCommit {
        let Some(e) = self.entries.get_mut(&key) else {
            return StartCommit::Nothing;
        };
        if let Some((generation, done)) = &e.inflight {
            return StartCommit::InFlight(Pending {
                key,
                generation: *generation,
                done: done.clone(),
            });
        }
        if !e.is_dirty() {
            return StartCommit::Nothing;
        }
        let (tx, rx) = watch::channel(None);
        e.inflight = Some((e.generation, rx.clone()));
        let started = Started {
            entry_id: e.id,
            generation: e.generation,
            size: e.size,
            marker: e.marker,
            prehash: e
                .prehash
                .filter(|(g, _)| *g == e.generation)
                .map(|(_, h)| h),
            done: tx,
        };
        let pending = Pending {
            key,
            generation: e.generation,
            done: rx,
        };
        StartCommit::Started(started, pending)
    }

    /// Records that generation `generation` of entry `id` is in the store. Returns the bytes
    /// to give back to the dirty budget if the entry became clean.
    /// `stamp` is the file's, taken before this call: it is kept if the entry became clean.
    pub(crate) fn confirm(
        &mut self,
        key: BlockKey,
        id: u64,
        generation: u64,
        stamp: Option<Stamp>,
    ) -> Option<u64> {
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
        e.stamp = stamp;
        let freed = std::mem::take(&mut e.dirty_acc);
        if let Some(since) = e.dirty_since.take() {
            self.dirty.remove(&(since, key));
        }
        self.dirty_bytes -= freed;
        Some(freed)
    }

    /// Records that the commit of generation `generation` of entry `id` failed.
    pub(crate) fn fail(&mut self, key: BlockKey, id: u64, generation: u64) {
        if let Some(e) = self.entries.get_mut(&key).filter(|e| e.id == id)
            && e.inflight.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            e.inflight = None;
        }
    }

    /// A dirty idle block to hash ahead of its commit, unless hashed at its generation.
    pub(crate) fn prehash_target(&self, key: BlockKey) -> Option<(Cached, u64)> {
        let e = self.entries.get(&key)?;
        if !e.is_dirty() || e.inflight.is_some() {
            return None;
        }
        if e.prehash.is_some_and(|(g, _)| g == e.generation) {
            return None;
        }
        Some((self.get(key)?, e.generation))
    }

    /// Keeps `hash` for generation `generation` of entry `id`, if still current.
    pub(crate) fn set_prehash(&mut self, key: BlockKey, id: u64, generation: u64, hash: [u8; 32]) {
        if let Some(e) = self.entries.get_mut(&key)
            && e.id == id
            && e.generation == generation
        {
            e.prehash = Some((generation, hash));
        }
    }

    /// Whether entry `id` of `key` is clean and its file still has the dirty name.
    pub(crate) fn is_marked_clean(&self, key: BlockKey, id: u64) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| e.id == id && e.marker == Marker::Dirty && !e.is_dirty())
    }

    /// Clean entries whose files still have the dirty name.
    pub(crate) fn marked_clean(&self) -> Vec<(BlockKey, u64)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.marker == Marker::Dirty && !e.is_dirty())
            .map(|(k, e)| (*k, e.id))
            .collect()
    }

    /// Dirty blocks, all or those of one inode, oldest first for all.
    pub(crate) fn dirty_keys(&self, inode: Option<u64>) -> Vec<BlockKey> {
        match inode {
            // One inode's entries, not every dirty block of the cache.
            Some(i) => self
                .entries
                .range(BlockKey::new(i, 0)..=BlockKey::new(i, u64::MAX))
                .filter(|(_, e)| e.is_dirty())
                .map(|(k, _)| *k)
                .collect(),
            None => self.dirty.iter().map(|(_, k)| *k).collect(),
        }
    }

    /// The inodes with a dirty block.
    pub(crate) fn dirty_inodes(&self) -> std::collections::HashSet<u64> {
        self.dirty.iter().map(|(_, k)| k.inode).collect()
    }

    /// The generations a flush of all blocks, or of one inode's, must see in the store.
    pub(crate) fn flush_targets(&self, inode: Option<u64>) -> HashMap<BlockKey, Target> {
        self.dirty_keys(inode)
            .into_iter()
            .map(|k| {
                let e = &self.entries[&k];
                let target = Target {
                    entry_id: e.id,
                    generation: e.generation,
                };
                (k, target)
            })
            .collect()
    }

    /// Where flush target `target` of `key` stands.
    pub(crate) fn flush_status(&self, key: BlockKey, target: Target) -> FlushStatus {
        let Some(e) = self.entries.get(&key).filter(|e| e.id == target.entry_id) else {
            return FlushStatus::Done; // removed: nothing to flush
        };
        if e.clean_gen >= target.generation {
            return FlushStatus::Done;
        }
        match &e.inflight {
            Some((generation, done)) => FlushStatus::InFlight {
                generation: *generation,
                done: done.clone(),
            },
            None => FlushStatus::Idle,
        }
    }

    /// Whether entry `id` of `key` is gone (removed, or removed and cached again).
    pub(crate) fn is_gone(&self, key: BlockKey, id: u64) -> bool {
        self.entries.get(&key).is_none_or(|e| e.id != id)
    }

    /// Dirty idle blocks to commit in the background: all under `pressure`, else those
    /// unmodified for `delay`.
    pub(crate) fn commit_candidates(
        &self,
        pressure: bool,
        delay: Option<Duration>,
    ) -> Vec<BlockKey> {
        let now = Instant::now();
        self.dirty
            .iter()
            .map(|(_, k)| (k, &self.entries[k]))
            .filter(|(_, e)| e.inflight.is_none())
            .filter(|(_, e)| {
                pressure || delay.is_some_and(|d| now.duration_since(e.last_write) >= d)
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Cached blocks of `inode` in `range`.
    pub(crate) fn keys_in(&self, inode: u64, range: Range<u64>) -> Vec<BlockKey> {
        if range.start >= range.end {
            return Vec::new();
        }
        self.entries
            .range(BlockKey::new(inode, range.start)..BlockKey::new(inode, range.end))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Every cached block.
    pub(crate) fn keys(&self) -> Vec<BlockKey> {
        self.entries.keys().copied().collect()
    }

    /// Takes clean, idle entries whose lock `try_lock` gets out of the state, oldest first,
    /// until their sizes add up to `bytes` (at least one entry), whatever the limits: the
    /// cache's file system is full. Their files are deleted next.
    pub(crate) fn take_clean<G>(
        &mut self,
        bytes: u64,
        mut try_lock: impl FnMut(BlockKey) -> Option<G>,
    ) -> Vec<(BlockKey, Marker, G)> {
        let mut taken = Vec::new();
        let mut freed = 0u64;
        let order: Vec<BlockKey> = self.lru.values().copied().collect();
        for key in order {
            if freed >= bytes && !taken.is_empty() {
                break;
            }
            let e = &self.entries[&key];
            if e.is_dirty() || e.inflight.is_some() {
                continue;
            }
            let Some(guard) = try_lock(key) else {
                continue;
            };
            freed += e.size;
            let removed = self.remove(key).expect("entry present");
            taken.push((key, removed.marker, guard));
        }
        taken
    }

    /// Walks the LRU order from the oldest entry and decides what to evict now (clean
    /// entries whose lock `try_lock` gets) and what to commit or wait for first. The budget
    /// of entries and bytes to free is spent on all of them, as in S3QL, so a pass uploads no
    /// more than needed.
    pub(crate) fn plan_eviction<G>(
        &mut self,
        bytes: u64,
        slots: u64,
        mut try_lock: impl FnMut(BlockKey) -> Option<G>,
    ) -> EvictionPlan<G> {
        let used_bytes = self.bytes + self.reserved_bytes + bytes;
        let used_slots = self.entries.len() as u64 + self.reserved_slots + slots;
        let mut need_bytes = used_bytes.saturating_sub(self.max_bytes) as i64;
        let mut need_slots = used_slots.saturating_sub(self.max_entries) as i64;
        let mut plan = EvictionPlan {
            evicted: Vec::new(),
            commit: Vec::new(),
            wait: Vec::new(),
        };
        let order: Vec<BlockKey> = self.lru.values().copied().collect();
        for key in order {
            if need_bytes <= 0 && need_slots <= 0 {
                break;
            }
            let e = &self.entries[&key];
            let size = e.size as i64;
            if let Some((generation, done)) = &e.inflight {
                plan.wait.push(Pending {
                    key,
                    generation: *generation,
                    done: done.clone(),
                });
            } else if e.is_dirty() {
                plan.commit.push(key);
            } else {
                let Some(guard) = try_lock(key) else {
                    continue;
                };
                let removed = self.remove(key).expect("entry present");
                plan.evicted.push((key, removed.marker, guard));
            }
            need_bytes -= size;
            need_slots -= 1;
        }
        plan
    }

    /// How many blocks of `inode` are cached, dirty and being uploaded.
    pub(crate) fn inode_blocks(&self, inode: u64) -> InodeBlocks {
        let mut c = InodeBlocks::default();
        for (_, e) in self
            .entries
            .range(BlockKey::new(inode, 0)..=BlockKey::new(inode, u64::MAX))
        {
            c.cached += 1;
            c.dirty += u64::from(e.is_dirty());
            c.uploading += u64::from(e.inflight.is_some());
        }
        c
    }

    /// The totals and limits.
    pub(crate) fn totals(&self) -> Totals {
        Totals {
            entries: self.entries.len() as u64,
            bytes: self.bytes,
            dirty_entries: self.dirty.len() as u64,
            dirty_bytes: self.dirty_bytes,
            oldest_dirty: self.dirty.first().map(|(since, _)| *since),
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
        }
    }

    /// Recounts the accounting; with `quiet`, also requires that no room is reserved. O(n).
    pub(crate) fn check(&self, quiet: bool) -> Result<(), String> {
        let bytes: u64 = self.entries.values().map(|e| e.size).sum();
        let dirty_bytes: u64 = self.entries.values().map(|e| e.dirty_acc).sum();
        let dirty = self.entries.values().filter(|e| e.is_dirty()).count();
        if bytes != self.bytes
            || dirty_bytes != self.dirty_bytes
            || dirty != self.dirty.len()
            || self.lru.len() != self.entries.len()
        {
            return Err(format!(
                "accounting drifted: bytes {} vs {bytes}, dirty bytes {} vs {dirty_bytes}, dirty {} vs {dirty}, lru {} vs {}",
                self.bytes,
                self.dirty_bytes,
                self.dirty.len(),
                self.lru.len(),
                self.entries.len()
            ));
        }
        for (k, e) in &self.entries {
            if e.is_dirty() != e.dirty_since.is_some()
                || e.dirty_since
                    .is_some_and(|s| !self.dirty.contains(&(s, *k)))
            {
                return Err(format!("dirty order of block {k:?} does not match"));
            }
            if e.is_dirty() && e.marker != Marker::Dirty {
                return Err(format!("dirty block {k:?} has no dirty marker"));
            }
            if e.is_dirty() && e.dirty_acc != e.size || !e.is_dirty() && e.dirty_acc != 0 {
                return Err(format!(
                    "block {k:?} holds {} dirty bytes at size {}",
                    e.dirty_acc, e.size
                ));
            }
            if self.lru.get(&e.tick) != Some(k) {
                return Err(format!("LRU index of block {k:?} does not match"));
            }
        }
        if quiet && (self.reserved_bytes != 0 || self.reserved_slots != 0) {
            return Err(format!(
                "reservations left: {} bytes, {} slots",
                self.reserved_bytes, self.reserved_slots
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
mod views;
