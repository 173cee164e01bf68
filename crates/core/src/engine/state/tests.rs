//! `State`'s accounting against a model: random sequences of every operation, with the
//! totals compared to the model's and [`State::check`] recounting after each step.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, u64, u8),
    Remove(u8),
    RemoveIfClean(u8),
    Modify(u8, u64),
    StartCommit(u8),
    Confirm(u8),
    Fail(u8),
    Touch(u8),
    Reserve(u64, u64),
    Unreserve,
    Evict(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..8, 0u64..100, 0u8..4).prop_map(|(k, s, o)| Op::Insert(k, s, o)),
        (0u8..8).prop_map(Op::Remove),
        (0u8..8).prop_map(Op::RemoveIfClean),
        (0u8..8, 0u64..100).prop_map(|(k, s)| Op::Modify(k, s)),
        (0u8..8).prop_map(Op::StartCommit),
        (0u8..8).prop_map(Op::Confirm),
        (0u8..8).prop_map(Op::Fail),
        (0u8..8).prop_map(Op::Touch),
        (0u64..200, 0u64..3).prop_map(|(b, s)| Op::Reserve(b, s)),
        Just(Op::Unreserve),
        (0u64..200, 0u64..3).prop_map(|(b, s)| Op::Evict(b, s)),
    ]
}

/// The model of one entry.
#[derive(Debug, Clone)]
struct M {
    id: u64,
    size: u64,
    generation: u64,
    clean_gen: u64,
    inflight: Option<u64>,
    /// The generation of the last started commit, for confirmations and failures.
    started: Option<u64>,
}

impl M {
    fn dirty(&self) -> bool {
        self.generation != self.clean_gen
    }
}

fn key(k: u8) -> BlockKey {
    BlockKey::new(u64::from(k % 3), u64::from(k))
}

proptest! {
    #[test]
    fn accounting_matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
        let mut st = State::new(300, 6);
        let mut model: BTreeMap<BlockKey, M> = BTreeMap::new();
        let mut reservations: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(k, size, o) => {
                    let k = key(k);
                    if model.contains_key(&k) {
                        continue;
                    }
                    let origin = [Origin::Created, Origin::Downloaded, Origin::FoundClean, Origin::FoundDirty][usize::from(o)];
                    let dirty = matches!(origin, Origin::Created | Origin::FoundDirty);
                    let id = st.insert(k, size, origin);
                    model.insert(k, M { id, size, generation: u64::from(dirty), clean_gen: 0, inflight: None, started: None });
                    prop_assert_eq!(st.get(k).map(|c| c.verified), Some(origin != Origin::FoundClean));
                }
                Op::Remove(k) => {
                    let k = key(k);
                    let removed = st.remove(k);
                    let m = model.remove(&k);
                    prop_assert_eq!(removed.is_some(), m.is_some());
                    if let (Some(r), Some(m)) = (removed, m) {
                        prop_assert_eq!(r.dirty_bytes, if m.dirty() { m.size } else { 0 });
                    }
                }
                Op::RemoveIfClean(k) => {
                    let k = key(k);
                    let idle_clean = model.get(&k).is_some_and(|m| !m.dirty() && m.inflight.is_none());
                    prop_assert_eq!(st.remove_if_clean(k).is_some(), idle_clean);
                    if idle_clean {
                        model.remove(&k);
                    }
                }
                Op::Modify(k, size) => {
                    let k = key(k);
                    let Some(m) = model.get_mut(&k) else { continue };
                    let before = if m.dirty() { m.size } else { 0 };
                    // The protocol of a change: the file gets its dirty name first.
                    prop_assert!(st.begin_change(k).is_some());
                    st.set_marker(k, Marker::Dirty);
                    let delta = st.modify(k, size, None);
                    m.generation += 1;
                    m.size = size;
                    prop_assert_eq!(delta, size as i64 - before as i64);
                }
                Op::StartCommit(k) => {
                    let k = key(k);
                    let started = st.start_commit(k);
                    match model.get_mut(&k) {
                        None => prop_assert!(matches!(started, StartCommit::Nothing)),
                        Some(m) => match (started, m.inflight) {
                            (StartCommit::InFlight(p), Some(g)) => prop_assert_eq!(p.generation, g),
                            (StartCommit::Started(s, p), None) => {
                                prop_assert!(m.dirty());
                                prop_assert_eq!((s.generation, p.generation, s.entry_id), (m.generation, m.generation, m.id));
                                m.inflight = Some(m.generation);
                                m.started = Some(m.generation);
                            }
                            (StartCommit::Nothing, None) => prop_assert!(!m.dirty()),
                            (other, inflight) => prop_assert!(false, "{other:?} with in flight {inflight:?}"),
                        },
                    }
                }
                Op::Confirm(k) => {
                    let k = key(k);
                    let Some(m) = model.get_mut(&k) else { continue };
                    let Some(g) = m.started else { continue };
                    let freed = st.confirm(k, m.id, g, None);
                    if m.inflight == Some(g) {
                        m.inflight = None;
                    }
                    m.clean_gen = m.clean_gen.max(g);
                    prop_assert_eq!(freed.is_some(), !m.dirty());
                }
                Op::Fail(k) => {
                    let k = key(k);
                    let Some(m) = model.get_mut(&k) else { continue };
                    let Some(g) = m.started else { continue };
                    st.fail(k, m.id, g);
                    if m.inflight == Some(g) {
                        m.inflight = None;
                    }
                }
                Op::Touch(k) => {
                    let k = key(k);
                    prop_assert_eq!(st.touch(k).is_some(), model.contains_key(&k));
                }
                Op::Reserve(b, s) => {
                    if st.try_reserve(b, s) {
                        reservations.push((b, s));
                    }
                }
                Op::Unreserve => {
                    if let Some((b, s)) = reservations.pop() {
                        st.unreserve(b, s);
                    }
                }
                Op::Evict(b, s) => {
                    let plan = st.plan_eviction(b, s, |_| Some(()));
                    for (k, _, ()) in &plan.evicted {
                        let m = model.remove(k).expect("evicted a cached block");
                        prop_assert!(!m.dirty() && m.inflight.is_none());
                    }
                    for k in &plan.commit {
                        prop_assert!(model[k].dirty() && model[k].inflight.is_none());
                    }
                    for p in &plan.wait {
                        prop_assert_eq!(model[&p.key].inflight, Some(p.generation));
                    }
                }
            }
            prop_assert_eq!(st.check(false), Ok(()));
            let t = st.totals();
            prop_assert_eq!(t.entries, model.len() as u64);
            prop_assert_eq!(t.bytes, model.values().map(|m| m.size).sum::<u64>());
            prop_assert_eq!(t.dirty_entries, model.values().filter(|m| m.dirty()).count() as u64);
            prop_assert_eq!(t.dirty_bytes, model.values().filter(|m| m.dirty()).map(|m| m.size).sum::<u64>());
            prop_assert_eq!(st.dirty_keys(None).len() as u64, t.dirty_entries);
        }
        for (b, s) in reservations.drain(..) {
            st.unreserve(b, s);
        }
        prop_assert_eq!(st.check(true), Ok(()));
    }
}
