//! Shipping the metadata to the store, so that the store alone restores the volume.
//!
//! A round ships the keys noted as changed (`blockcache_db::meta`) as a delta of the current
//! generation, or first writes a snapshot of the shipped state as a new generation when none
//! is usable or the chain of deltas grew long. A changed key ships only with the rest of its
//! file, and only once that file is settled: no dirty block, no change since the delta was
//! read, every object it names confirmed in the store. Until then the store keeps the file's
//! previous state (the shipped state), whose objects are not deleted from the store
//! ([`Inner::delete_objects`] holds them back). Rounds run one at a time, and store
//! deletions wait for a round in progress, so a round never ships a mapping to an object
//! that a deletion removes meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockcache_backend::meta::{ListedMeta, MetaObject};
use blockcache_db::{ChangeKey, DeltaRead, InodeRole, MetaRows};
use bytes::Bytes;

use super::Inner;
use crate::metadata::{
    DELTA_CHANGES, DOC_VERSION, DeltaDoc, ManifestDoc, PART_ROWS, PartDoc, check_doc,
};
use crate::{Error, Result};

/// A new snapshot is written after this many deltas (a restore reads at most this many).
const SNAPSHOT_AFTER_DELTAS: u64 = 1024;

/// A new snapshot is written once the last is this old, if the deltas since hold at least a
/// sixteenth of its bytes...
const SNAPSHOT_HOURLY: Duration = Duration::from_secs(3600);

/// ... and once it is this old, if any delta was shipped since.
const SNAPSHOT_DAILY: Duration = Duration::from_secs(24 * 3600);

/// Whether a new snapshot is due: the deltas since the last one (`deltas`, of `delta_bytes`)
/// hold as many bytes as it does (so what snapshots cost stays in proportion to what
/// changed), or are many, or it is old.
fn snapshot_due(deltas: u64, delta_bytes: u64, snapshot_bytes: u64, age: Duration) -> bool {
    deltas > 0
        && (deltas >= SNAPSHOT_AFTER_DELTAS
            || delta_bytes >= snapshot_bytes.max(1 << 20)
            || (age >= SNAPSHOT_HOURLY && delta_bytes >= snapshot_bytes / 16)
            || age >= SNAPSHOT_DAILY)
}

/// Shipping's state: rounds run one at a time under `round`.
#[derive(Debug)]
pub(crate) struct Shipping {
    round: tokio::sync::Mutex<RoundState>,
    status: std::sync::Mutex<ShipStatus>,
    /// Counts rounds, done or failed.
    rounds: tokio::sync::watch::Sender<u64>,
    opened: Instant,
}

impl Default for Shipping {
    fn default() -> Self {
        Self {
            round: tokio::sync::Mutex::new(RoundState::default()),
            status: std::sync::Mutex::new(ShipStatus::default()),
            rounds: tokio::sync::watch::Sender::new(0),
            opened: Instant::now(),
        }
    }
}

#[derive(Debug, Default)]
struct RoundState {
    /// The volume's id, once read.
    volume: Option<String>,
    /// Whether the position recorded in the database was checked against the store, and
    /// every round since finished: a round that fails or is dropped midway may leave in the
    /// store a delta or a snapshot that the database does not record, so the next one reads
    /// the store again.
    checked: bool,
}

/// How shipping went, for statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataStatus {
    /// The generation the metadata ships into, once one exists.
    pub generation: Option<u64>,
    /// Deltas shipped into it.
    pub deltas: u64,
    /// Changed keys not shipped yet.
    pub pending_changes: u64,
    /// Keys held back at the last round (their files are still being written or uploaded).
    pub deferred: u64,
    /// How long changes have waited: since the last round that left none behind, while
    /// some wait.
    pub lag: Option<Duration>,
    /// Metadata objects written since start.
    pub objects_written: u64,
    /// Their bytes in the store.
    pub bytes_written: u64,
    /// Bytes written by the last round.
    pub last_round_bytes: u64,
    /// Time spent in rounds since start.
    pub ship_time: Duration,
    /// Store deletions held back because the metadata in the store still names their
    /// objects (their files' new state is not shipped yet).
    pub held_deletions: u64,
    /// The last round's failure, until a round succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct ShipStatus {
    generation: Option<u64>,
    deltas: u64,
    snapshot_at: Option<Instant>,
    /// Bytes of the current generation's snapshot, and of its deltas so far.
    snapshot_bytes: u64,
    delta_bytes: u64,
    /// When the last round ended that left nothing behind.
    caught_up: Option<Instant>,
    deferred: u64,
    objects: u64,
    bytes: u64,
    last_round_bytes: u64,
    ship_time: Duration,
    last_error: Option<String>,
}

/// What one round did.
#[derive(Debug, Default)]
struct Round {
    objects: u64,
    bytes: u64,
    deferred: u64,
}

/// The group of an inode: the file whose shipped state it is part of (a merge's staging
/// inode belongs to the file it merges into); `None` for an inode that is neither a file's
/// nor a merge's (being written, retired, or a raw user's), whose changes never ship.
fn group_of(read: &DeltaRead, inode: u64) -> Option<u64> {
    match read.roles.get(&inode) {
        Some(InodeRole::Live) | None => Some(inode),
        Some(InodeRole::Staging { target }) => Some(*target),
        Some(InodeRole::Other) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_noted_with_its_whole_inode_ships_once_and_one_it_lacks_as_gone() {
        let change = |key| blockcache_db::Change {
            key,
            seq: 1,
            last: 1,
        };
        let mut read = DeltaRead::default();
        // A new file's inode 7 is noted whole, and so are its blocks 0 and 1 one by one;
        // block 2 was noted and is gone again.
        for blockno in 0..3 {
            read.changes
                .push(change(ChangeKey::Block { inode: 7, blockno }));
        }
        read.changes.push(change(ChangeKey::Inode(7)));
        read.whole.insert(7, vec![(0, 100), (1, 101)]);
        // The mappings as a read that looked the blocks up on their own too would give.
        read.blocks.insert((7, 0), Some(100));
        read.blocks.insert((7, 1), Some(101));
        read.blocks.insert((7, 2), None);
        for id in [100, 101] {
            let row = (id, None, 10, Some(10));
            read.objects.insert(
                id,
                blockcache_db::ObjectInfo {
                    row,
                    uploaded: true,
                },
            );
        }
        read.roles.insert(7, InodeRole::Live);
        let p = plan(&read, &HashSet::new());
        assert_eq!(p.rows.blocks, vec![(7, 0, 100), (7, 1, 101)]);
        assert_eq!(p.rows.dead_blocks, vec![(7, 2)]);
        assert_eq!(p.rows.objects.len(), 2);
        assert_eq!(p.acked.len(), 4, "every change is shipped");
        assert_eq!(p.deferred, 0);
    }

    #[test]
    fn snapshots_cost_in_proportion_to_changes() {
        let hour = Duration::from_secs(3600);
        // Nothing shipped since: never.
        assert!(!snapshot_due(0, 0, 100, 10 * SNAPSHOT_DAILY));
        // Small deltas of a large snapshot: not before a day, unless many.
        assert!(!snapshot_due(10, 10_000, 50 << 20, 2 * hour));
        assert!(snapshot_due(10, 10_000, 50 << 20, SNAPSHOT_DAILY));
        assert!(snapshot_due(
            SNAPSHOT_AFTER_DELTAS,
            10_000,
            50 << 20,
            hour / 2
        ));
        // Deltas as large as the snapshot: at once.
        assert!(snapshot_due(3, 50 << 20, 50 << 20, Duration::ZERO));
        // A sixteenth after an hour.
        assert!(snapshot_due(3, 4 << 20, 50 << 20, 2 * hour));
        assert!(!snapshot_due(3, 2 << 20, 50 << 20, 2 * hour));
        // A small volume is not snapshotted for every delta.
        assert!(!snapshot_due(5, 500, 100, Duration::ZERO));
    }
}

/// A delta to ship: its rows, the keys it ships or drops, and the objects each group needs.
#[derive(Debug, Default)]
struct Plan {
    rows: MetaRows,
    acked: Vec<ChangeKey>,
    deferred: u64,
    /// Objects named by the shipped mappings that were not confirmed when read, by group.
    unconfirmed: HashMap<u64, Vec<u64>>,
}

fn plan(read: &DeltaRead, unsettled: &HashSet<u64>) -> Plan {
    let mut p = Plan::default();
    let mut objects: HashSet<u64> = HashSet::new();
    let mut need = |p: &mut Plan, group: u64, obj: u64| {
        if objects.insert(obj) {
            match read.objects.get(&obj) {
                Some(info) => {
                    if !info.uploaded {
                        p.unconfirmed.entry(group).or_default().push(obj);
                    }
                    p.rows.objects.push(info.row.clone());
                }
                // The read found no row for it: it cannot ship.
                None => p.unconfirmed.entry(group).or_default().push(obj),
            }
        } else if read.objects.get(&obj).is_none_or(|i| !i.uploaded) {
            p.unconfirmed.entry(group).or_default().push(obj);
        }
    };
    for change in &read.changes {
        match &change.key {
            ChangeKey::File(name) => match read.files.get(name).cloned().flatten() {
                Some(row) => {
                    let g = group_of(read, row.1).unwrap_or(row.1);
                    if unsettled.contains(&g) {
                        p.deferred += 1;
                        continue;
                    }
                    if let Some(a) = read.file_attrs.get(name) {
                        p.rows.file_attrs.push((name.clone(), a.clone()));
                    }
                    p.rows.files.push(row);
                    p.acked.push(change.key.clone());
                }
                None => {
                    p.rows.dead_files.push(name.clone());
                    p.acked.push(change.key.clone());
                }
            },
            ChangeKey::Block { inode, blockno } => match group_of(read, *inode) {
                None => p.acked.push(change.key.clone()),
                Some(g) if unsettled.contains(&g) => p.deferred += 1,
                Some(g) => {
                    match read.whole.get(inode) {
                        // Noted whole in this read too: its mapping ships with the inode's
                        // (once, not twice); one it does not have is gone.
                        Some(all) => {
                            if all.binary_search_by_key(blockno, |&(b, _)| b).is_err() {
                                p.rows.dead_blocks.push((*inode, *blockno));
                            }
                        }
                        None => match read.blocks.get(&(*inode, *blockno)).copied().flatten() {
                            Some(obj) => {
                                p.rows.blocks.push((*inode, *blockno, obj));
                                need(&mut p, g, obj);
                            }
                            None => p.rows.dead_blocks.push((*inode, *blockno)),
                        },
                    }
                    p.acked.push(change.key.clone());
                }
            },
            ChangeKey::Inode(inode) => match group_of(read, *inode) {
                None => p.acked.push(change.key.clone()),
                Some(g) if unsettled.contains(&g) => p.deferred += 1,
                Some(g) => {
                    for &(blockno, obj) in read.whole.get(inode).map_or(&[][..], Vec::as_slice) {
                        p.rows.blocks.push((*inode, blockno, obj));
                        need(&mut p, g, obj);
                    }
                    p.acked.push(change.key.clone());
                }
            },
            ChangeKey::Merge { staging, target } => {
                if unsettled.contains(target) {
                    p.deferred += 1;
                    continue;
                }
                match read.merges.get(staging).copied().flatten() {
                    Some(row) => p.rows.merges.push(row),
                    None => p.rows.dead_merges.push(*staging),
                }
                p.acked.push(change.key.clone());
            }
        }
    }
    p
}

fn store_error(action: &'static str) -> impl FnOnce(blockcache_backend::Error) -> Error {
    move |e| Error::Store {
        action,
        source: Arc::new(e),
    }
}

impl Inner {
    /// Ships the metadata changed since the last round to the store (one round; concurrent
    /// callers wait for the round in progress and then run their own). Cancel-safe: a round
    /// dropped midway leaves the store with a complete generation, and its work is redone.
    pub(crate) async fn ship_metadata(self: &Arc<Self>) -> Result<()> {
        let mut state = self.shipping.round.lock().await;
        let started = Instant::now();
        let result = self.ship_round(&mut state).await;
        {
            let mut st = self.shipping.status.lock().expect("status mutex poisoned");
            st.ship_time += started.elapsed();
            match &result {
                Ok(round) => {
                    st.objects += round.objects;
                    st.bytes += round.bytes;
                    st.last_round_bytes = round.bytes;
                    st.deferred = round.deferred;
                    st.last_error = None;
                    if round.deferred == 0 {
                        st.caught_up = Some(Instant::now());
                    }
                }
                Err(e) => st.last_error = Some(e.to_string()),
            }
        }
        drop(state);
        self.shipping.rounds.send_modify(|n| *n += 1);
        result.map(drop)
    }

    /// Writes the shipped state as a new generation now (a repair of unreadable metadata
    /// in the store); deltas then ship into it.
    pub(crate) async fn write_new_generation(self: &Arc<Self>) -> Result<u64> {
        let mut state = self.shipping.round.lock().await;
        let volume = self.round_volume(&mut state).await?;
        let mut round = Round::default();
        // Stopped midway, the store may hold the new manifest unrecorded: the next round
        // reads the store again.
        state.checked = false;
        let generation = self.write_snapshot(&volume, &mut round, None).await?;
        state.checked = true;
        let mut st = self.shipping.status.lock().expect("status mutex poisoned");
        st.objects += round.objects;
        st.bytes += round.bytes;
        Ok(generation)
    }

    /// Changed keys the last round held back (their files were still being written).
    pub(crate) fn deferred_at_last_round(&self) -> u64 {
        self.shipping
            .status
            .lock()
            .expect("status mutex poisoned")
            .deferred
    }

    /// Sees each round of shipping end.
    pub(crate) fn ship_rounds(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shipping.rounds.subscribe()
    }

    /// Holds off shipping rounds (a store deletion in progress) until dropped; with whether
    /// the database's shipped state is all the store's metadata names (a round read the
    /// store, and every round since finished). Until then the store may hold a delta that
    /// the database does not record (written just before a stop or a failure), naming
    /// objects the shipped state does not.
    pub(crate) async fn hold_shipping(&self) -> (tokio::sync::MutexGuard<'_, impl Sized>, bool) {
        let state = self.shipping.round.lock().await;
        let checked = state.checked;
        (state, checked)
    }

    /// Whether a round is due: changes are waiting and the last round that left nothing
    /// behind is at least `interval` ago, or a snapshot is due.
    pub(crate) async fn ship_due(&self, interval: Duration) -> Result<bool> {
        let since = {
            let st = self.shipping.status.lock().expect("status mutex poisoned");
            st.caught_up.unwrap_or(self.shipping.opened)
        };
        if since.elapsed() < interval {
            return Ok(false);
        }
        Ok(self.db.meta_pending().await? > 0)
    }

    /// How shipping stands.
    pub(crate) async fn metadata_status(&self) -> Result<MetadataStatus> {
        let pending = self.db.meta_pending().await?;
        let st = self.shipping.status.lock().expect("status mutex poisoned");
        Ok(MetadataStatus {
            generation: st.generation,
            deltas: st.deltas,
            pending_changes: pending,
            deferred: st.deferred,
            lag: (pending > 0).then(|| st.caught_up.unwrap_or(self.shipping.opened).elapsed()),
            objects_written: st.objects,
            bytes_written: st.bytes,
            last_round_bytes: st.last_round_bytes,
            ship_time: st.ship_time,
            held_deletions: self.removals.held(),
            last_error: st.last_error.clone(),
        })
    }

    /// At open, reads the store's metadata as a round's first step does, so that flushes
    /// find the position checked: adopts deltas written before a stop, finishes an
    /// interrupted removal of old generations, and writes the first (empty) generation of a
    /// new volume, which the store then holds from its start. Work in proportion to the
    /// metadata (a snapshot of a volume whose generation the store lacks) is left to the
    /// first round. Best effort: a failure is logged, and the first round reads the store.
    pub(crate) async fn open_shipping(self: &Arc<Self>) {
        let mut state = self.shipping.round.lock().await;
        let started = Instant::now();
        let mut round = Round::default();
        let result = async {
            let volume = self.round_volume(&mut state).await?;
            state.checked = false;
            let (position, listing) = self.read_store_position(&volume).await?;
            if position.is_none() {
                if !self.db.shipped_is_empty().await? {
                    return Ok(());
                }
                self.write_snapshot(&volume, &mut round, Some(&listing))
                    .await?;
            }
            state.checked = true;
            Ok::<_, Error>(())
        }
        .await;
        let mut st = self.shipping.status.lock().expect("status mutex poisoned");
        st.ship_time += started.elapsed();
        st.objects += round.objects;
        st.bytes += round.bytes;
        if let Err(error) = result {
            tracing::warn!(error = %blockcache_backend::chain(&error), "reading the metadata in the store at open failed; the first round of shipping will");
            st.last_error = Some(error.to_string());
        }
    }

    /// The volume's id (read once).
    async fn round_volume(&self, state: &mut RoundState) -> Result<String> {
        if let Some(v) = &state.volume {
            return Ok(v.clone());
        }
        let v = self.db.volume_id().await?.id;
        state.volume = Some(v.clone());
        Ok(v)
    }

    /// The position to ship from as the store has it ([`Inner::check_position`]), with the
    /// store's listing; sets the status from the generation found, and removes old
    /// generations whose removal a stop interrupted.
    async fn read_store_position(
        &self,
        volume: &str,
    ) -> Result<(Option<(u64, u64)>, Vec<ListedMeta>)> {
        let position = self.db.meta_position().await?;
        let listing = self
            .backend
            .list_meta()
            .await
            .map_err(store_error("list the metadata in the store"))?;
        let position = self.check_position(volume, position, &listing).await?;
        if let Some((generation, seq)) = position {
            {
                let mut st = self.shipping.status.lock().expect("status mutex poisoned");
                st.generation = Some(generation);
                st.deltas = seq;
                st.snapshot_at.get_or_insert(self.shipping.opened);
                (st.delta_bytes, st.snapshot_bytes) = (0, 0);
                for m in listing
                    .iter()
                    .filter(|m| m.object.generation() == generation)
                {
                    match m.object {
                        MetaObject::Delta { .. } => st.delta_bytes += m.size,
                        _ => st.snapshot_bytes += m.size,
                    }
                }
            }
            // A removal of old generations that a stop interrupted is finished now.
            if let Err(error) = self.prune_generations(generation).await {
                tracing::warn!(error = %blockcache_backend::chain(&error), "removing old metadata generations failed; will retry after the next snapshot");
            }
        }
        Ok((position, listing))
    }

    async fn ship_round(&self, state: &mut RoundState) -> Result<Round> {
        let volume = self.round_volume(state).await?;
        let mut round = Round::default();
        let checked = std::mem::replace(&mut state.checked, false);
        // The store's listing when this round read it: no one else writes metadata under
        // the lease, so a snapshot of this round needs no other.
        let (position, listed) = if checked {
            (self.db.meta_position().await?, None)
        } else {
            let (position, listing) = self.read_store_position(&volume).await?;
            (position, Some(listing))
        };
        let (generation, mut seq) = match position {
            Some(p) => p,
            None => (
                self.write_snapshot(&volume, &mut round, listed.as_deref())
                    .await?,
                0,
            ),
        };
        {
            let mut st = self.shipping.status.lock().expect("status mutex poisoned");
            st.generation = Some(generation);
            st.deltas = seq;
            st.snapshot_at.get_or_insert(self.shipping.opened);
        }
        seq = self
            .ship_deltas(&volume, generation, seq, &mut round)
            .await?;
        let due = {
            let st = self.shipping.status.lock().expect("status mutex poisoned");
            snapshot_due(
                seq,
                st.delta_bytes,
                st.snapshot_bytes,
                st.snapshot_at.map_or(Duration::ZERO, |t| t.elapsed()),
            )
        };
        if due {
            self.write_snapshot(&volume, &mut round, None).await?;
        }
        state.checked = true;
        Ok(round)
    }

    /// The position to ship from, as the store has it: the recorded one if the store holds
    /// that generation's manifest, with deltas past it that a stopped process wrote but did
    /// not record adopted; `None` (write a new snapshot) if the store lacks the generation,
    /// or holds a newer complete one (a snapshot whose manifest was written and not
    /// recorded: a restore reads it, so deltas into an older generation would never be
    /// restored, and the objects it names could be deleted).
    async fn check_position(
        &self,
        volume: &str,
        position: Option<(u64, u64)>,
        listing: &[ListedMeta],
    ) -> Result<Option<(u64, u64)>> {
        let Some((generation, mut seq)) = position else {
            return Ok(None);
        };
        let has = |o: MetaObject| listing.iter().any(|m| m.object == o);
        if !has(MetaObject::Manifest { generation }) {
            tracing::warn!(
                generation,
                "the store lacks the metadata generation this database ships into; writing a new snapshot"
            );
            return Ok(None);
        }
        while has(MetaObject::Delta {
            generation,
            seq: seq + 1,
        }) {
            let object = MetaObject::Delta {
                generation,
                seq: seq + 1,
            };
            let rows = self.read_delta_doc(volume, object).await?;
            self.db.adopt_shipped(&rows, generation, seq + 1).await?;
            seq += 1;
            tracing::info!(
                generation,
                delta = seq,
                "adopted a metadata delta written before a stop"
            );
        }
        let newer = listing.iter().find_map(|m| match m.object {
            MetaObject::Manifest { generation: g } if g > generation => Some(g),
            _ => None,
        });
        if let Some(newer) = newer {
            tracing::warn!(
                generation,
                newer,
                "the store holds a newer complete metadata generation than the one this database ships into (written before a stop, not recorded); writing a new snapshot"
            );
            return Ok(None);
        }
        Ok(Some((generation, seq)))
    }

    async fn read_delta_doc(&self, volume: &str, object: MetaObject) -> Result<MetaRows> {
        let bytes = self
            .backend
            .get_meta(object)
            .await
            .map_err(store_error("read a metadata delta"))?;
        let doc: DeltaDoc = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Metadata(format!(
                "metadata object {} does not decode: {e}",
                object.name()
            ))
        })?;
        check_doc(doc.version, &doc.volume, volume)
            .map_err(|e| Error::Metadata(format!("metadata object {}: {e}", object.name())))?;
        Ok(doc.rows)
    }

    /// Ships noted changes as deltas of `generation` after delta `seq`; returns the number
    /// of the last delta.
    async fn ship_deltas(
        &self,
        volume: &str,
        generation: u64,
        mut seq: u64,
        round: &mut Round,
    ) -> Result<u64> {
        let mut limit = DELTA_CHANGES;
        loop {
            let read = self.db.read_delta(limit).await?;
            if read.changes.is_empty() {
                round.deferred = 0;
                return Ok(seq);
            }
            let more = read.changes.len() >= limit;
            // After the read: blocks dirty now, or changed since, may have been dirty then.
            let mut unsettled: HashSet<u64> = HashSet::new();
            let dirty = self.lock_state().dirty_inodes();
            for inode in dirty {
                if let Some(g) = group_of(&read, inode) {
                    unsettled.insert(g);
                }
            }
            for key in self.db.changed_after(read.through).await? {
                match key {
                    ChangeKey::Block { inode, .. } | ChangeKey::Inode(inode) => {
                        if let Some(g) = group_of(&read, inode) {
                            unsettled.insert(g);
                        }
                    }
                    ChangeKey::Merge { target, .. } => {
                        unsettled.insert(target);
                    }
                    // Replaced or deleted since the read: the blocks the read did not see
                    // may be gone from the cache already (a deletion drops the dirty blocks
                    // of the inode it retires), so that none is dirty now says nothing.
                    ChangeKey::File(name) => {
                        if let Some(Some(row)) = read.files.get(&name) {
                            unsettled.insert(group_of(&read, row.1).unwrap_or(row.1));
                        }
                    }
                }
            }
            let mut p = plan(&read, &unsettled);
            if !p.unconfirmed.is_empty() {
                let wanted: Vec<u64> = p.unconfirmed.values().flatten().copied().collect();
                let confirmed = self.db.uploaded_among(&wanted).await?;
                let before = unsettled.len();
                for (group, objects) in &p.unconfirmed {
                    if objects.iter().any(|o| !confirmed.contains(o)) {
                        unsettled.insert(*group);
                    }
                }
                if unsettled.len() != before {
                    p = plan(&read, &unsettled);
                }
            }
            round.deferred = p.deferred;
            if p.acked.is_empty() {
                // A read cut short leaves out later changes of the files it holds, which
                // then count as changed since: a file with more changes than one read takes
                // would never ship, nor anything noted after it. Read them all once.
                if more {
                    limit = usize::MAX;
                    continue;
                }
                return Ok(seq);
            }
            let next = if p.rows.is_empty() { seq } else { seq + 1 };
            if next != seq {
                // The rows shipped may come from block commits not yet synced: a power loss
                // after the upload must not leave the store naming mappings the database
                // lost.
                self.db.sync_all().await?;
                let object = MetaObject::Delta {
                    generation,
                    seq: next,
                };
                let doc = DeltaDoc {
                    version: DOC_VERSION,
                    volume: volume.to_owned(),
                    generation,
                    seq: next,
                    through: read.through,
                    rows: p.rows,
                };
                let body = Bytes::from(serde_json::to_vec(&doc).expect("a delta serializes"));
                match self.backend.put_meta(object, body).await {
                    Ok(n) => {
                        round.objects += 1;
                        round.bytes += n;
                        let mut st = self.shipping.status.lock().expect("status mutex poisoned");
                        st.delta_bytes += n;
                    }
                    Err(blockcache_backend::Error::Collision { .. }) => {
                        // Written by this volume before a stop, and not recorded: adopt it and
                        // ship these changes after it.
                        let rows = self.read_delta_doc(volume, object).await?;
                        self.db.adopt_shipped(&rows, generation, next).await?;
                        seq = next;
                        continue;
                    }
                    Err(e) => return Err(store_error("write a metadata delta")(e)),
                }
                p.rows = doc.rows;
                let mut st = self.shipping.status.lock().expect("status mutex poisoned");
                st.deltas = next;
            }
            self.db
                .meta_shipped(&p.rows, &p.acked, read.through, generation, next)
                .await?;
            seq = next;
            if !more {
                return Ok(seq);
            }
        }
    }

    /// Writes the shipped state as a new generation (its parts, then its manifest), makes it
    /// the one deltas ship into, and removes generations past their keeping time. `listed`:
    /// the store's metadata as this round listed it, if it did.
    async fn write_snapshot(
        &self,
        volume: &str,
        round: &mut Round,
        listed: Option<&[ListedMeta]>,
    ) -> Result<u64> {
        let listing = match listed {
            Some(l) => l.to_vec(),
            None => self
                .backend
                .list_meta()
                .await
                .map_err(store_error("list the metadata in the store"))?,
        };
        let generation = listing
            .iter()
            .map(|m| m.object.generation())
            .max()
            .unwrap_or(0)
            + 1;
        let mut reader = self.db.snapshot_reader().await?;
        let (mut parts, mut files, mut blocks) = (0u32, 0u64, 0u64);
        let bytes_before = round.bytes;
        while let Some(rows) = reader.next_part(PART_ROWS).await? {
            files += rows.files.len() as u64;
            blocks += rows.blocks.len() as u64;
            let doc = PartDoc {
                version: DOC_VERSION,
                volume: volume.to_owned(),
                generation,
                part: parts,
                rows,
            };
            let body = Bytes::from(serde_json::to_vec(&doc).expect("a part serializes"));
            round.bytes += self
                .backend
                .put_meta(
                    MetaObject::Part {
                        generation,
                        part: parts,
                    },
                    body,
                )
                .await
                .map_err(store_error("write a metadata snapshot"))?;
            round.objects += 1;
            parts += 1;
        }
        drop(reader);
        let manifest = ManifestDoc {
            version: DOC_VERSION,
            volume: volume.to_owned(),
            generation,
            parts,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            block_size: self.config.block_size,
            namespace_floor: self.db.namespace_floor().await?,
            files,
            blocks,
        };
        let body = Bytes::from(serde_json::to_vec(&manifest).expect("a manifest serializes"));
        round.bytes += self
            .backend
            .put_meta(MetaObject::Manifest { generation }, body)
            .await
            .map_err(store_error("write a metadata manifest"))?;
        round.objects += 1;
        self.db.meta_position_set(generation, 0).await?;
        {
            let mut st = self.shipping.status.lock().expect("status mutex poisoned");
            st.generation = Some(generation);
            st.deltas = 0;
            st.snapshot_at = Some(Instant::now());
            st.snapshot_bytes = round.bytes - bytes_before;
            st.delta_bytes = 0;
        }
        tracing::info!(
            generation,
            files,
            blocks,
            parts,
            "wrote a metadata snapshot to the store"
        );
        // A store that held no other generation has nothing to remove.
        if !listing.is_empty()
            && let Err(error) = self.prune_generations(generation).await
        {
            tracing::warn!(error = %blockcache_backend::chain(&error), "removing old metadata generations failed; will retry after the next snapshot");
        }
        Ok(generation)
    }

    /// Removes generations older than the two newest complete ones whose successor is
    /// older than `metadata_keep`, and incomplete generations below `current` (a snapshot
    /// that stopped midway). A generation's manifest goes first, so that what is left of
    /// it is never taken for complete.
    async fn prune_generations(&self, current: u64) -> Result<()> {
        let listing = self
            .backend
            .list_meta()
            .await
            .map_err(store_error("list the metadata in the store"))?;
        // Times as seconds since the epoch, by the store's clock (the listing's).
        let complete: Vec<(u64, i64)> = listing
            .iter()
            .filter_map(|m| match m.object {
                MetaObject::Manifest { generation } => Some((generation, m.modified.timestamp())),
                _ => None,
            })
            .collect();
        let keep_after = std::time::SystemTime::now()
            .checked_sub(self.config.metadata_keep)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut doomed: HashSet<u64> = HashSet::new();
        let n = complete.len();
        for (i, (generation, _)) in complete.iter().enumerate() {
            if i + 2 >= n || *generation >= current {
                continue;
            }
            // Superseded when the next complete generation was written.
            let superseded = complete[i + 1].1;
            if keep_after.is_some_and(|k| superseded <= k) {
                doomed.insert(*generation);
            }
        }
        let complete_set: HashSet<u64> = complete.iter().map(|c| c.0).collect();
        for m in &listing {
            let g = m.object.generation();
            if g < current && !complete_set.contains(&g) {
                doomed.insert(g);
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        let manifests: Vec<MetaObject> = doomed
            .iter()
            .filter(|g| complete_set.contains(g))
            .map(|&generation| MetaObject::Manifest { generation })
            .collect();
        self.backend
            .delete_meta(&manifests)
            .await
            .map_err(store_error("delete old metadata"))?;
        let rest: Vec<MetaObject> = listing
            .iter()
            .map(|m| m.object)
            .filter(|o| {
                doomed.contains(&o.generation()) && !matches!(o, MetaObject::Manifest { .. })
            })
            .collect();
        self.backend
            .delete_meta(&rest)
            .await
            .map_err(store_error("delete old metadata"))?;
        tracing::info!(
            generations = ?{
                let mut d: Vec<u64> = doomed.into_iter().collect();
                d.sort_unstable();
                d
            },
            "removed old metadata generations from the store"
        );
        Ok(())
    }
}
