//! The one reconciler: diffs the desired table against what is programmed in
//! the maps and writes only the difference.
//!
//! "Programmed" is a mirror of the maps, built by reading them back at start
//! ([`Reconciler::recover`]) and updated after every successful write, so a
//! failed pass leaves an exact picture and the next pass (retry) writes only
//! what is still missing. Service and backend ids come from the maps, so they
//! are stable across restarts.
//!
//! A full pass ([`Reconciler::reconcile`]) diffs every frontend. A partial
//! pass ([`Reconciler::apply`]) is given only the frontend addresses some
//! Services' change touched, and what each should now hold: it writes those
//! frontends and the backends they reference or stopped referencing. For
//! that the reconciler keeps the desired table it was last given ("target")
//! and, per backend, how many target frontends want it active or
//! terminating. A partial pass is valid only on top of a successful full
//! pass: until one (at start, after [`Reconciler::resync`] or a failed pass)
//! [`Reconciler::needs_full`] is true.
//!
//! Write order keeps the datapath consistent at every instant (after Cilium's
//! `UpsertService`): backends before the slots that name them; new slots
//! before the frontend count that exposes them; the frontend count before the
//! slots it stops exposing are deleted; a removed frontend's slot 0 first;
//! a backend is deleted only once no programmed slot or membership names it.
//!
//! Map pressure: every delete that frees room and needs no insert first —
//! frontends no longer desired, orphans, backends nothing names any more,
//! memberships a frontend no longer has — runs before the inserts. An insert
//! that finds its map full (E2BIG/ENOMEM/ENOSPC) or no free id does not stop
//! the pass: that backend or frontend is recorded in [`Pressure`] and the
//! pass goes on with the rest; if deletes later in the pass freed room, the
//! inserts are tried once more. A pass with pressure still succeeds (what
//! fits is programmed); [`Reconciler::needs_full`] stays true so the caller
//! retries with a full pass. Any other map error stops the pass as before.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use serde::Serialize;

use crate::desired::{BackendState, DesiredTable, Frontend, FrontendChanges};
use crate::layout::{
    L4Addr, Lb4AffinityMatch, Lb4Service, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_EXT_LOCAL,
    SVC_F_SRC_RANGE,
};
use crate::maps::{LbMaps, MapWrite, MapsError, Stopped};

/// Errors of reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A map write or read failed; the pass stopped there.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: MapsError,
    },
    /// No service id left (u32; the maps fill long before).
    #[error("{0}: no free service id")]
    ServiceIdsExhausted(L4Addr),
    /// No backend id left.
    #[error("{0}: no free backend id")]
    BackendIdsExhausted(L4Addr),
    /// A partial pass was asked for before a successful full pass.
    #[error("partial pass refused: the maps need a full pass first")]
    NeedsFullPass,
}

/// Why a desired entry is not in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Unfit {
    /// The named map had no room for a new entry.
    MapFull(&'static str),
    /// All 65535 service ids are in use.
    ServiceIdsExhausted,
    /// No backend id left.
    BackendIdsExhausted,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::MapFull(m) => write!(f, "map {m} full"),
            Unfit::ServiceIdsExhausted => f.write_str("no free service id"),
            Unfit::BackendIdsExhausted => f.write_str("no free backend id"),
        }
    }
}

/// What the last pass could not program for lack of room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pressure {
    /// Desired frontends not (completely) programmed, and why.
    pub frontends: BTreeMap<L4Addr, Unfit>,
    /// Desired backends not in `nb_lb4_be`, and why (frontends are
    /// programmed without them).
    pub backends: BTreeMap<L4Addr, Unfit>,
}

impl Pressure {
    /// Nothing is missing.
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }

    /// One line per reason: `map nb_lb4_be full: 3 backends not programmed (first 10.244.1.7:8080/TCP)`.
    pub fn summary(&self) -> Vec<String> {
        let mut by: BTreeMap<(Unfit, &str), (usize, L4Addr)> = BTreeMap::new();
        for (kind, m) in [("frontends", &self.frontends), ("backends", &self.backends)] {
            for (a, u) in m {
                by.entry((*u, kind)).or_insert((0, *a)).0 += 1;
            }
        }
        by.into_iter()
            .map(|((u, kind), (n, first))| {
                format!("{u}: {n} {kind} not programmed (first {first})")
            })
            .collect()
    }
}

impl ReconcileError {
    /// Why an insert did not fit, if that is what failed.
    pub fn unfit(&self) -> Option<Unfit> {
        match self {
            ReconcileError::Map { source, .. } => source.full_map().map(Unfit::MapFull),
            ReconcileError::ServiceIdsExhausted(_) => Some(Unfit::ServiceIdsExhausted),
            ReconcileError::BackendIdsExhausted(_) => Some(Unfit::BackendIdsExhausted),
            ReconcileError::NeedsFullPass => None,
        }
    }
}

/// Counts of one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyncStats {
    /// Map updates written.
    pub updates: u64,
    /// Map deletes written.
    pub deletes: u64,
}

impl SyncStats {
    /// Total writes.
    pub fn writes(&self) -> u64 {
        self.updates + self.deletes
    }
}

#[derive(Clone, Debug, Default)]
struct ProgFrontend {
    id: u32,
    /// Slot 0 as written (None: not written yet).
    value: Option<Lb4Service>,
    /// Slot i+1 → backend id.
    slots: Vec<u32>,
    /// Backend id → state, as in nb_lb4_affmatch.
    members: BTreeMap<u32, u32>,
    /// The reverse-NAT entry as written: (VIP, port).
    revnat: Option<(IpAddr, u16)>,
}

/// One planned map write, and what it records in the programmed mirror
/// once written.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// Backend `addr` is `id` with `state`; `new`: its id was allocated for
    /// this write (given back if the write is not made).
    Backend {
        addr: L4Addr,
        id: u32,
        state: u8,
        new: bool,
    },
    /// Frontend `fe` (service id `id`) loses membership `bid`.
    AffDel { fe: L4Addr, id: u32, bid: u32 },
    /// Frontend `fe`'s reverse NAT entry `id`.
    Revnat { fe: L4Addr, id: u32 },
    /// Frontend `fe`'s membership `bid` with `state`.
    AffSet {
        fe: L4Addr,
        id: u32,
        bid: u32,
        state: u32,
    },
    /// Frontend `fe`'s slot `index + 1` names backend `bid`, carrying
    /// `copy` of it ([`Lb4Service::slot_copy`]; in this form, not as an
    /// [`L4Addr`], so an effect stays as small as the slot 0 one).
    Slot {
        fe: L4Addr,
        id: u32,
        index: usize,
        bid: u32,
        copy: (u32, u16),
    },
    /// Frontend `fe`'s slot 0.
    Front { fe: L4Addr, value: Lb4Service },
    /// Frontend `fe`'s last slot `slot` goes.
    SlotDel { fe: L4Addr, slot: u16 },
}

/// Number of [`Effect::phase`]s.
const PHASES: usize = 6;

impl Effect {
    /// Dependency order of a batched pass: backends before the slots and
    /// memberships naming them; memberships leaving first (room); reverse
    /// NAT and memberships before the slot 0 that exposes them; then the
    /// service map frontend by frontend, each one's slots before its slot 0
    /// (one phase, so one batch: when the map fills up, the frontends
    /// before the full point are whole, as with single writes, instead of
    /// every frontend's slots and no slot 0); the slots a smaller count no
    /// longer exposes last. One frontend's writes, in this order, are the
    /// order a single-write pass uses.
    fn phase(&self) -> usize {
        match self {
            Effect::Backend { .. } => 0,
            Effect::AffDel { .. } => 1,
            Effect::Revnat { .. } => 2,
            Effect::AffSet { .. } => 3,
            Effect::Slot { .. } | Effect::Front { .. } => 4,
            Effect::SlotDel { .. } => 5,
        }
    }

    /// The map write.
    fn write(&self) -> MapWrite {
        let aff = |id: u32, bid: u32| Lb4AffinityMatch {
            backend_id: bid,
            rev_nat_id: id,
        };
        match *self {
            Effect::Backend {
                addr, id, state, ..
            } => MapWrite::backend(id, addr, state),
            Effect::AffDel { id, bid, .. } => MapWrite::DelAffMatch(aff(id, bid)),
            Effect::Revnat { fe, id } => MapWrite::revnat(id, fe),
            Effect::AffSet { id, bid, state, .. } => MapWrite::AffMatch(aff(id, bid), state),
            Effect::Slot {
                fe,
                id,
                index,
                bid,
                copy,
            } => MapWrite::service(
                fe,
                u16::try_from(index + 1).unwrap_or(u16::MAX),
                Lb4Service::slot(id, bid, copy),
            ),
            Effect::Front { fe, value } => MapWrite::service(fe, 0, value),
            Effect::SlotDel { fe, slot } => MapWrite::del_service(fe, slot),
        }
    }

    /// A delete (counted as one).
    fn is_delete(&self) -> bool {
        matches!(self, Effect::AffDel { .. } | Effect::SlotDel { .. })
    }

    /// (is a backend, address) of the backend or frontend this is part of.
    fn owner(&self) -> (bool, L4Addr) {
        match *self {
            Effect::Backend { addr, .. } => (true, addr),
            Effect::AffDel { fe, .. }
            | Effect::Revnat { fe, .. }
            | Effect::AffSet { fe, .. }
            | Effect::Slot { fe, .. }
            | Effect::Front { fe, .. }
            | Effect::SlotDel { fe, .. } => (false, fe),
        }
    }
}

/// Planned writes by [`Effect::phase`], each phase in the order planned.
#[derive(Debug, Default)]
struct Plans([Vec<Effect>; PHASES]);

impl Plans {
    fn push(&mut self, e: Effect) {
        self.0[e.phase()].push(e);
    }
    /// Every plan in write order (a single frontend's: its own order).
    fn ordered(&self) -> impl Iterator<Item = &Effect> {
        self.0.iter().flatten()
    }
    /// Planned writes, all phases.
    fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }
}

/// How many writes a full pass plans before it makes them
/// ([`Reconciler::pass`]; ~3 MiB of plans). A frontend's plans are never
/// split, and each phase of a chunk is still one batch per map
/// ([`Reconciler::flush`]); only frontends in different chunks no longer
/// share a phase. The one effect of that: memberships one
/// frontend gives up in a later chunk no longer make room for another's in
/// an earlier one, so a full nb_lb4_affmatch may need the pass's second
/// round, which runs when a round deleted anything.
const PLAN_CHUNK: usize = 65_536;

/// Entries found at recovery that belong to nothing consistent.
#[derive(Clone, Debug, Default)]
struct Orphans {
    /// (frontend, slot) in nb_lb4_svc / nb_lb6_svc.
    services: BTreeSet<(L4Addr, u16)>,
    /// Rev-nat id → in nb_lb6_revnat (true) or nb_lb4_revnat.
    revnat: BTreeMap<u32, bool>,
    /// nb_lb4_affmatch keys.
    aff_match: BTreeMap<Lb4AffinityMatch, u32>,
}

/// Ids 1..=max. Freed ids are reused first; otherwise the search goes on
/// upwards from the last id handed out, so a change that frees one id and
/// takes another costs O(log n), not a scan over every id in use.
#[derive(Debug, Default)]
struct IdAlloc {
    used: IdSet,
    /// Freed since, reused first (lowest first).
    freed: BTreeSet<u32>,
    max: u32,
    /// Where the upward search resumes.
    hint: u32,
}

impl IdAlloc {
    fn new(max: u32) -> Self {
        Self {
            used: IdSet::default(),
            freed: BTreeSet::new(),
            max,
            hint: 1,
        }
    }
    fn mark(&mut self, id: u32) {
        self.used.insert(id);
        self.freed.remove(&id);
    }
    fn free(&mut self, id: u32) {
        if self.used.remove(id) && id >= 1 && id <= self.max {
            self.freed.insert(id);
        }
    }
    fn take(&mut self, id: u32) -> u32 {
        self.used.insert(id);
        id
    }
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.freed.pop_first() {
            return Some(self.take(id));
        }
        // Upwards from the hint, then (ids left free at recovery) from 1.
        let start = self.hint.max(1);
        for range in [start..=self.max, 1..=start.saturating_sub(1)] {
            for id in range {
                if !self.used.contains(id) {
                    self.hint = id.saturating_add(1);
                    return Some(self.take(id));
                }
            }
        }
        None
    }
}

/// What effect `e` changes in its frontend's mirror entry `p`.
fn record_frontend(p: &mut ProgFrontend, e: &Effect) {
    match *e {
        Effect::Backend { .. } => {}
        Effect::AffDel { bid, .. } => {
            p.members.remove(&bid);
        }
        Effect::Revnat { fe, .. } => p.revnat = Some((fe.ip, fe.port)),
        Effect::AffSet { bid, state, .. } => {
            p.members.insert(bid, state);
        }
        Effect::Slot { index, bid, .. } => {
            if p.slots.len() <= index {
                p.slots.resize(index + 1, 0);
            }
            p.slots[index] = bid;
        }
        Effect::Front { value, .. } => p.value = Some(value),
        Effect::SlotDel { slot, .. } => {
            if p.slots.len() == usize::from(slot) {
                p.slots.pop();
            }
        }
    }
}

/// The ids in use: a bit each below [`IdSet::DENSE`] (the words grown as
/// ids are taken, 128 KiB for a million), a B-tree above it. Ids are handed
/// out from 1 upwards, so the bits hold them; maps read back may name any
/// id, and one far up must not cost its bits. A million-id B-tree took a
/// cache-missing search per allocation on a first pass.
#[derive(Debug, Default)]
struct IdSet {
    words: Vec<u64>,
    high: BTreeSet<u32>,
}

impl IdSet {
    /// Ids below this are bits (at most 8 MiB of them).
    const DENSE: u32 = 1 << 26;

    fn contains(&self, id: u32) -> bool {
        if id < Self::DENSE {
            self.words
                .get((id / 64) as usize)
                .is_some_and(|w| w & (1 << (id % 64)) != 0)
        } else {
            self.high.contains(&id)
        }
    }

    fn insert(&mut self, id: u32) {
        if id < Self::DENSE {
            let i = (id / 64) as usize;
            if self.words.len() <= i {
                self.words.resize(i + 1, 0);
            }
            self.words[i] |= 1 << (id % 64);
        } else {
            self.high.insert(id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
            + self.high.len()
    }

    /// True if `id` was in the set.
    fn remove(&mut self, id: u32) -> bool {
        if id < Self::DENSE {
            match self.words.get_mut((id / 64) as usize) {
                Some(w) if *w & (1 << (id % 64)) != 0 => {
                    *w &= !(1 << (id % 64));
                    true
                }
                _ => false,
            }
        } else {
            self.high.remove(&id)
        }
    }
}

/// A full pass that inserted more than this many entries compacts the
/// mirror ([`Reconciler::compact`]).
const COMPACT_AFTER: u64 = 4096;

/// Whether `new` entries go into a mirror map of `len` as one merged map
/// (built whole, with full nodes; a merge rebuilds the whole map) rather
/// than one insert each.
fn merge_whole(new: usize, len: usize) -> bool {
    new >= 1024 && new * 8 >= len
}

/// The maps [`Reconciler::map_entries`] counts, in its order.
pub const MAP_USAGE_MAPS: [&str; 7] = [
    crate::layout::names::SERVICES,
    crate::layout::names::SERVICES6,
    crate::layout::names::BACKENDS,
    crate::layout::names::BACKENDS6,
    crate::layout::names::REVNAT,
    crate::layout::names::REVNAT6,
    crate::layout::names::AFF_MATCH,
];

/// Programmed state, summarised for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Programmed {
    /// Frontends in the maps.
    pub services: usize,
    /// Backends in the maps.
    pub backends: usize,
}

/// How many target frontends want one backend, per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BackendRefs {
    active: u32,
    terminating: u32,
}

impl BackendRefs {
    fn add(&mut self, s: BackendState) {
        match s {
            BackendState::Active => self.active += 1,
            BackendState::Terminating => self.terminating += 1,
        }
    }
    fn remove(&mut self, s: BackendState) {
        match s {
            BackendState::Active => self.active = self.active.saturating_sub(1),
            BackendState::Terminating => self.terminating = self.terminating.saturating_sub(1),
        }
    }
    /// The backend's state in the map: Active wins if two frontends disagree.
    fn state(&self) -> Option<BackendState> {
        if self.active > 0 {
            Some(BackendState::Active)
        } else if self.terminating > 0 {
            Some(BackendState::Terminating)
        } else {
            None
        }
    }
}

/// The `SVC_F_*` flags of a frontend.
fn frontend_flags(fe: &Frontend) -> u8 {
    let mut f = 0;
    if fe.affinity_timeout.is_some() {
        f |= SVC_F_AFFINITY;
    }
    if let Some(e) = &fe.external {
        f |= SVC_F_EXTERNAL;
        if e.local_only {
            f |= SVC_F_EXT_LOCAL;
        }
        if !e.source_ranges.is_empty() {
            f |= SVC_F_SRC_RANGE;
        }
    }
    f
}

/// The reconciler, owning the maps.
pub struct Reconciler<M: LbMaps> {
    maps: M,
    /// The desired frontends last given (full, then partial changes),
    /// shared with the caller's table ([`crate::desired::ServiceTable`]).
    target: BTreeMap<L4Addr, Arc<Frontend>>,
    /// Per backend, the target frontends that want it.
    refs: BTreeMap<L4Addr, BackendRefs>,
    /// No successful full pass since start, resync or a failed pass.
    needs_full: bool,
    /// An external frontend (what the Maglev tables and source ranges are
    /// built from) may have changed since [`Reconciler::take_external_dirty`].
    external_dirty: bool,
    frontends: BTreeMap<L4Addr, ProgFrontend>,
    /// Backend address → (id, `BE_*` state) as written. Ids are one space
    /// over nb_lb4_be and nb_lb6_be. A B-tree, not a hash table: a pass
    /// reaches the backends in address order, so its searches walk nodes
    /// still in cache (a hash table was faster at 100,000 backends and
    /// slower at 1,000,000, and 29 MiB larger there).
    backends: BTreeMap<L4Addr, (u32, u8)>,
    svc_ids: IdAlloc,
    be_ids: IdAlloc,
    /// Entries found at recovery that belong to nothing consistent.
    orphans: Orphans,
    /// What the last pass could not program.
    pressure: Pressure,
    /// Backends deleted from the maps since the last
    /// [`Reconciler::take_removed_backends`] (socket termination).
    removed: Vec<L4Addr>,
    /// Service ids no frontend holds that `nb_svc_stats` had counters for
    /// when the maps were read back: reset when handed out. None: not
    /// known, every new id is reset.
    stale_stats: Option<BTreeSet<u32>>,
    /// [`PLAN_CHUNK`]; smaller in tests.
    plan_chunk: usize,
    /// During a full pass's backend writes: the backends written, merged
    /// into [`Self::backends`] in one go when they are done.
    deferred_backends: Option<Vec<(L4Addr, (u32, u8))>>,
    /// Entries inserted one by one into (frontends, backends) since each
    /// was last built whole ([`Self::compact`]).
    single_inserts: (u64, u64),
}

impl<M: LbMaps> Reconciler<M> {
    /// Reads the maps back and builds the programmed mirror (restart path;
    /// on empty maps this is a fresh start).
    pub fn recover(maps: M) -> Result<Self, ReconcileError> {
        let mut r = Self {
            maps,
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            svc_ids: IdAlloc::new(u32::MAX - 1),
            be_ids: IdAlloc::new(u32::MAX - 1),
            orphans: Orphans::default(),
            target: BTreeMap::new(),
            refs: BTreeMap::new(),
            needs_full: true,
            external_dirty: true,
            pressure: Pressure::default(),
            removed: Vec::new(),
            stale_stats: None,
            deferred_backends: None,
            single_inserts: (0, 0),
            plan_chunk: PLAN_CHUNK,
        };
        r.resync()?;
        Ok(r)
    }

    /// Re-reads the maps and rebuilds the mirror, so the next pass also
    /// repairs changes made behind the reconciler's back.
    pub fn resync(&mut self) -> Result<(), ReconcileError> {
        self.needs_full = true;
        let dump = self.maps.dump().map_err(|source| ReconcileError::Map {
            what: "read back maps".into(),
            source,
        })?;
        self.frontends.clear();
        self.backends.clear();
        self.svc_ids = IdAlloc::new(u32::MAX - 1);
        self.be_ids = IdAlloc::new(u32::MAX - 1);
        self.orphans = Orphans::default();
        let r = self;
        let entries = dump.service_entries();
        let mut by_id: BTreeMap<u32, L4Addr> = BTreeMap::new();
        for (fe, slot, v) in &entries {
            if *slot == 0 {
                // Ids are one space over both families: a second frontend
                // with the same id is an orphan.
                if by_id.contains_key(&v.rev_nat_index) {
                    r.orphans.services.insert((*fe, 0));
                    continue;
                }
                r.svc_ids.mark(v.rev_nat_index);
                by_id.insert(v.rev_nat_index, *fe);
                r.frontends.insert(
                    *fe,
                    ProgFrontend {
                        id: v.rev_nat_index,
                        value: Some(*v),
                        ..Default::default()
                    },
                );
            }
        }
        for (fe, slot, v) in &entries {
            if *slot == 0 {
                continue;
            }
            match r.frontends.get_mut(fe) {
                Some(p) if p.id == v.rev_nat_index => {
                    let i = usize::from(*slot) - 1;
                    if p.slots.len() <= i {
                        p.slots.resize(i + 1, 0);
                    }
                    // An IPv4 slot without its backend's copy (written by
                    // an agent before the copy) is recorded as a hole: the
                    // next pass rewrites it. The copy is written with the
                    // id in one element, so one that is there matches it.
                    let carried = fe.is_v6() || v.slot_backend().is_some();
                    p.slots[i] = if carried { v.backend_id } else { 0 };
                }
                _ => {
                    r.orphans.services.insert((*fe, *slot));
                }
            }
        }
        // A hole in the slots (0) is repaired by the next pass: it differs from desired.
        for (id, ip, port) in dump.revnat_entries() {
            let fe = by_id.get(&id).filter(|fe| fe.is_v6() == ip.is_ipv6());
            match fe.and_then(|fe| r.frontends.get_mut(fe)) {
                Some(p) => p.revnat = Some((ip, port)),
                _ => {
                    r.orphans.revnat.insert(id, ip.is_ipv6());
                }
            }
        }
        for (k, v) in &dump.aff_match {
            match by_id
                .get(&k.rev_nat_id)
                .and_then(|fe| r.frontends.get_mut(fe))
            {
                Some(p) => {
                    p.members.insert(k.backend_id, *v);
                }
                None => {
                    r.orphans.aff_match.insert(*k, *v);
                }
            }
        }
        for (id, (addr, state)) in dump.backend_entries() {
            r.be_ids.mark(id);
            r.backends.insert(addr, (id, state));
        }
        r.stale_stats = r.maps.svc_stats_ids().map(|ids| {
            ids.into_iter()
                .filter(|id| !r.svc_ids.used.contains(*id))
                .collect()
        });
        Ok(())
    }

    /// Rebuilds the mirror's maps that took more than [`COMPACT_AFTER`]
    /// single inserts since they were last built whole: entries inserted in
    /// key order leave their nodes half empty. (Not `append`ed into a new
    /// map: that frees the old nodes between the new ones, and the holes
    /// stay in the agent's RSS; collected, the new map reuses the old one's
    /// memory.)
    fn compact(&mut self) {
        if self.single_inserts.0 > COMPACT_AFTER {
            self.frontends = std::mem::take(&mut self.frontends).into_iter().collect();
        }
        if self.single_inserts.1 > COMPACT_AFTER {
            self.backends = std::mem::take(&mut self.backends).into_iter().collect();
        }
        self.single_inserts = (0, 0);
    }

    /// Backends deleted from the maps since the last call: their connected
    /// UDP sockets are to be destroyed (`sock_term`).
    pub fn take_removed_backends(&mut self) -> Vec<L4Addr> {
        std::mem::take(&mut self.removed)
    }

    /// The maps (for tests and status).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, mutably (counters, config).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Sizes of the programmed state (frontends with their slot 0 written).
    pub fn programmed(&self) -> Programmed {
        Programmed {
            services: self
                .frontends
                .values()
                .filter(|p| p.value.is_some())
                .count(),
            backends: self.backends.len(),
        }
    }

    /// Entries the reconciler has written into each map it owns, by map
    /// name (`nb_lb4_svc`: slot 0 and the backend slots of every IPv4
    /// frontend; `nb_lb4_be`: backends; `nb_lb4_revnat`: reverse-NAT
    /// entries; `nb_lb4_affmatch`: affinity members; and the IPv6 maps),
    /// in [`MAP_USAGE_MAPS`] order: the map pressure `/metrics` reports
    /// against each map's capacity.
    pub fn map_entries(&self) -> Vec<(&'static str, usize)> {
        // Indexes into MAP_USAGE_MAPS.
        let mut n = [0usize; MAP_USAGE_MAPS.len()];
        for (fe, p) in &self.frontends {
            let v6 = usize::from(fe.is_v6());
            n[v6] += usize::from(p.value.is_some()) + p.slots.iter().filter(|id| **id != 0).count();
            n[4 + v6] += usize::from(p.revnat.is_some());
            n[6] += p.members.len();
        }
        for a in self.backends.keys() {
            n[2 + usize::from(a.is_v6())] += 1;
        }
        MAP_USAGE_MAPS.iter().copied().zip(n).collect()
    }

    /// Plans a full pass's writes `n` at a time ([`PLAN_CHUNK`]).
    #[cfg(test)]
    fn set_plan_chunk(&mut self, n: usize) {
        self.plan_chunk = n.max(1);
    }

    /// What the last pass could not program for lack of room (empty: everything fits).
    pub fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    /// Every programmed external frontend of either family the per-packet
    /// path can see (not loopback): its service id and the backends of the slots it
    /// chooses from (`1..local_count` under externalTrafficPolicy Local,
    /// else `1..count`), in slot order. What the Maglev tables are built from.
    pub fn external_slots(&self) -> Vec<(u32, Vec<L4Addr>)> {
        let mut out = Vec::new();
        let mut by_id: Option<BTreeMap<u32, L4Addr>> = None;
        for (addr, p) in &self.frontends {
            let Some(v) = p.value else { continue };
            if addr.ip.is_loopback() || v.flags & crate::layout::SVC_F_EXTERNAL == 0 {
                continue;
            }
            let n = if v.flags & crate::layout::SVC_F_EXT_LOCAL != 0 {
                v.local_count.min(v.count)
            } else {
                v.count
            };
            // Backend addresses by id, built once there is an external
            // frontend (a cluster of ClusterIPs has none: a first pass at
            // 10,000 Services × 10 spent 14 ms on it for nothing).
            let by_id = by_id.get_or_insert_with(|| {
                self.backends.iter().map(|(a, (id, _))| (*id, *a)).collect()
            });
            let backends = p
                .slots
                .iter()
                .take(usize::from(n))
                .filter_map(|id| by_id.get(id).copied())
                .collect();
            out.push((p.id, backends));
        }
        out
    }

    /// The allowed source CIDRs of each programmed LB IP frontend with
    /// `loadBalancerSourceRanges` (by service id), for
    /// [`crate::srcrange::SourceRanges::sync`].
    pub fn source_ranges(&self) -> Vec<(u32, Vec<(std::net::IpAddr, u8)>)> {
        let mut out = Vec::new();
        for (addr, p) in &self.frontends {
            let Some(v) = p.value else { continue };
            if v.flags & SVC_F_SRC_RANGE == 0 {
                continue;
            }
            let ranges = self
                .target
                .get(addr)
                .and_then(|f| f.external.as_ref())
                .map(|e| e.source_ranges.clone())
                .unwrap_or_default();
            out.push((p.id, ranges));
        }
        out
    }

    /// Service id of a programmed frontend.
    pub fn service_id(&self, fe: &L4Addr) -> Option<u32> {
        self.frontends.get(fe).map(|p| p.id)
    }

    /// Whether the next pass must be a full one ([`Reconciler::reconcile`]):
    /// true at start, after [`Reconciler::resync`], after a failed pass and
    /// after a pass that left [`Reconciler::pressure`].
    pub fn needs_full(&self) -> bool {
        self.needs_full
    }

    /// Whether an external frontend may have changed since the last call
    /// (always after a full pass); resets it. What is built from all external
    /// frontends ([`Reconciler::external_slots`], [`Reconciler::source_ranges`],
    /// each O(frontends + backends)) is rebuilt only then, not on every pass
    /// of a ClusterIP churn.
    pub fn take_external_dirty(&mut self) -> bool {
        std::mem::take(&mut self.external_dirty)
    }

    /// Asks for the next [`Reconciler::take_external_dirty`] to say true (a
    /// sync built from the external frontends failed and must be retried).
    pub fn mark_external_dirty(&mut self) {
        self.external_dirty = true;
    }

    /// One full pass: make the maps equal to `desired`. On error the pass
    /// stops; call again (with backoff) to finish.
    pub fn reconcile(&mut self, desired: &DesiredTable) -> Result<SyncStats, ReconcileError> {
        self.reconcile_owned(desired.clone())
    }

    /// [`Reconciler::reconcile`], keeping `desired` as the target without a copy.
    pub fn reconcile_owned(&mut self, desired: DesiredTable) -> Result<SyncStats, ReconcileError> {
        self.reconcile_shared(
            desired
                .frontends
                .into_iter()
                .map(|(a, f)| (a, Arc::new(f)))
                .collect(),
        )
    }

    /// [`Reconciler::reconcile`] on frontends shared with the caller's
    /// table ([`crate::desired::ServiceTable::shared_table`]): the agent
    /// keeps one desired table, not two.
    pub fn reconcile_shared(
        &mut self,
        desired: BTreeMap<L4Addr, Arc<Frontend>>,
    ) -> Result<SyncStats, ReconcileError> {
        self.target = desired;
        // Sorted, then built in one go: a B-tree filled in key order by
        // single inserts leaves its nodes half empty and searches from the
        // root for each (a million backends at 100k Services × 10).
        let mut wants: Vec<(L4Addr, BackendState)> = self
            .target
            .values()
            .flat_map(|fe| fe.backends.iter().map(|(a, s)| (*a, *s)))
            .collect();
        wants.sort_unstable_by_key(|w| w.0);
        // In a block: the list (24 MiB at 100k Services × 10) is freed
        // before the pass, not held through it.
        self.refs = {
            let mut wants = wants.into_iter().peekable();
            std::iter::from_fn(|| {
                let (a, s) = wants.next()?;
                let mut r = BackendRefs::default();
                r.add(s);
                while let Some((_, s)) = wants.next_if(|w| w.0 == a) {
                    r.add(s);
                }
                Some((a, r))
            })
            .collect()
        };
        self.needs_full = true;
        self.external_dirty = true;
        let mut st = SyncStats::default();
        let target = std::mem::take(&mut self.target);
        let r = self.pass(&target, &mut st);
        self.target = target;
        self.needs_full = r.is_err() || !self.pressure.is_empty();
        self.compact();
        r.map(|()| st)
    }

    /// One partial pass: each address in `changes` should now hold the
    /// given frontend (None: none). Writes only those frontends and the
    /// backends they reference or stopped referencing; every other frontend
    /// is left as it is. Only valid on top of a successful full pass (see
    /// [`Reconciler::needs_full`]: refused otherwise); on error the pass
    /// stops and the next pass must be a full one.
    pub fn apply(&mut self, changes: &FrontendChanges) -> Result<SyncStats, ReconcileError> {
        if self.needs_full {
            return Err(ReconcileError::NeedsFullPass);
        }
        let external = |fe: Option<&Arc<Frontend>>| fe.is_some_and(|f| f.external.is_some());
        if changes
            .iter()
            .any(|(addr, fe)| external(fe.as_ref()) || external(self.target.get(addr)))
        {
            self.external_dirty = true;
        }
        let mut touched: BTreeSet<L4Addr> = BTreeSet::new();
        for (addr, fe) in changes {
            if let Some(old) = self.target.remove(addr) {
                for (a, s) in &old.backends {
                    if let Some(r) = self.refs.get_mut(a) {
                        r.remove(*s);
                    }
                    touched.insert(*a);
                }
            }
            if let Some(fe) = fe {
                for (a, s) in &fe.backends {
                    self.refs.entry(*a).or_default().add(*s);
                    touched.insert(*a);
                }
                self.target.insert(*addr, fe.clone());
            }
        }
        let mut st = SyncStats::default();
        let r = self.partial_pass(changes, &touched, &mut st);
        if r.is_err() || !self.pressure.is_empty() {
            self.needs_full = true;
        }
        r.map(|()| st)
    }

    fn partial_pass(
        &mut self,
        changes: &FrontendChanges,
        touched: &BTreeSet<L4Addr>,
        st: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        // Same phases as a full pass, restricted to what changed. Only the
        // changed frontends can name a backend the target no longer wants:
        // every other one matches the target (no pressure before a partial pass).
        self.pressure = Pressure::default();
        for (addr, fe) in changes {
            if fe.is_none() {
                self.delete_frontend(*addr, st)?;
            }
        }
        self.delete_orphans(st)?;
        let changed: Vec<L4Addr> = changes.keys().copied().collect();
        self.delete_unwanted_backends(touched.iter().copied(), &changed, st)?;
        for _round in 0..2 {
            let deletes = st.deletes;
            self.pressure = Pressure::default();
            for addr in touched {
                if let Some(state) = self.refs.get(addr).and_then(BackendRefs::state) {
                    let r = self.write_backend(*addr, state, st);
                    self.tolerate_backend(*addr, r)?;
                }
            }
            for (addr, fe) in changes {
                if let Some(fe) = fe {
                    let r = self.write_frontend(*addr, fe, st);
                    self.tolerate_frontend(*addr, r)?;
                }
            }
            let named: Vec<L4Addr> = self.pressure.frontends.keys().copied().collect();
            self.delete_unwanted_backends(touched.iter().copied(), &named, st)?;
            if self.pressure.is_empty() || st.deletes == deletes {
                break;
            }
        }
        for addr in touched {
            if self.refs.get(addr).and_then(BackendRefs::state).is_none()
                && !self.backends.contains_key(addr)
            {
                self.refs.remove(addr);
            }
        }
        Ok(())
    }

    /// A write that did not fit is recorded; any other error stops the pass.
    fn tolerate_backend(
        &mut self,
        addr: L4Addr,
        r: Result<(), ReconcileError>,
    ) -> Result<(), ReconcileError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => match e.unfit() {
                Some(u) => {
                    self.pressure.backends.insert(addr, u);
                    Ok(())
                }
                None => Err(e),
            },
        }
    }

    /// As [`Self::tolerate_backend`]; a new frontend nothing was written for
    /// gives its id back.
    fn tolerate_frontend(
        &mut self,
        addr: L4Addr,
        r: Result<(), ReconcileError>,
    ) -> Result<(), ReconcileError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => match e.unfit() {
                Some(u) => {
                    self.pressure.frontends.insert(addr, u);
                    if let Some(p) = self.frontends.get(&addr) {
                        if p.value.is_none()
                            && p.revnat.is_none()
                            && p.slots.is_empty()
                            && p.members.is_empty()
                        {
                            let id = p.id;
                            self.frontends.remove(&addr);
                            self.svc_ids.free(id);
                        }
                    }
                    Ok(())
                }
                None => Err(e),
            },
        }
    }

    /// Deletes those of `candidates` that no target frontend wants and no
    /// slot or membership of the programmed frontends `named_by` names;
    /// returns the unwanted ones kept because one of those names them.
    fn delete_unwanted_backends(
        &mut self,
        candidates: impl Iterator<Item = L4Addr>,
        named_by: &[L4Addr],
        st: &mut SyncStats,
    ) -> Result<Vec<L4Addr>, ReconcileError> {
        let mut in_use: BTreeSet<u32> = BTreeSet::new();
        for fe in named_by {
            if let Some(p) = self.frontends.get(fe) {
                in_use.extend(p.slots.iter().copied());
                in_use.extend(p.members.keys().copied());
            }
        }
        let (mut unwanted, mut held) = (Vec::new(), Vec::new());
        for a in candidates {
            if self.refs.get(&a).and_then(BackendRefs::state).is_some() {
                continue;
            }
            match self.backends.get(&a) {
                Some((id, _)) if in_use.contains(id) => held.push(a),
                Some(_) => unwanted.push(a),
                None => {}
            }
        }
        for addr in unwanted {
            self.delete_backend(addr, st)?;
        }
        Ok(held)
    }

    /// The write that makes backend `addr` hold `state` (None: it does
    /// already); a new backend gets its id here.
    fn plan_backend(
        &mut self,
        addr: L4Addr,
        state: BackendState,
    ) -> Result<Option<Effect>, ReconcileError> {
        let val = state.as_u8();
        let (id, new) = match self.backends.get(&addr) {
            Some((_, cur)) if *cur == val => return Ok(None),
            Some((id, _)) => (*id, false),
            None => (
                self.be_ids
                    .alloc()
                    .ok_or(ReconcileError::BackendIdsExhausted(addr))?,
                true,
            ),
        };
        Ok(Some(Effect::Backend {
            addr,
            id,
            state: val,
            new,
        }))
    }

    fn write_backend(
        &mut self,
        addr: L4Addr,
        state: BackendState,
        st: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        match self.plan_backend(addr, state)? {
            Some(e) => self.execute([e].iter(), st),
            None => Ok(()),
        }
    }

    /// Writes `plans` one by one, in order, each recorded in the mirror once
    /// written; stops at the first failure.
    fn execute<'p>(
        &mut self,
        plans: impl Iterator<Item = &'p Effect>,
        st: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        let mut plans = plans.peekable();
        while let Some(e) = plans.next() {
            if let Err(source) = self.maps.write(&e.write()) {
                let err = ReconcileError::Map {
                    what: self.describe(e),
                    source,
                };
                self.unplanned(std::iter::once(e).chain(plans));
                return Err(err);
            }
            self.record(e, st);
        }
        Ok(())
    }

    /// Gives back the ids of new backends whose writes were not made.
    fn unplanned<'p>(&mut self, plans: impl IntoIterator<Item = &'p Effect>) {
        for e in plans {
            if let Effect::Backend { id, new: true, .. } = *e {
                self.be_ids.free(id);
            }
        }
    }

    /// A written plan, recorded in the mirror.
    fn record(&mut self, e: &Effect, st: &mut SyncStats) {
        self.record_run(&[e], st);
    }

    /// [`Self::record`] for consecutive effects: a frontend's run of
    /// effects (its slots, then slot 0) looks the frontend up once, not
    /// once per slot (1.1 million B-tree searches at 100k Services × 10).
    fn record_run(&mut self, es: &[&Effect], st: &mut SyncStats) {
        let mut written: Vec<(L4Addr, (u32, u8))> = Vec::new();
        let mut i = 0;
        while i < es.len() {
            let e = es[i];
            let owner = e.owner();
            let end = es[i..]
                .iter()
                .position(|x| x.owner() != owner)
                .map_or(es.len(), |n| i + n);
            for e in &es[i..end] {
                if e.is_delete() {
                    st.deletes += 1;
                } else {
                    st.updates += 1;
                }
                if let Effect::Backend {
                    addr, id, state, ..
                } = **e
                {
                    written.push((addr, (id, state)));
                }
            }
            if !owner.0 {
                if let Some(p) = self.frontends.get_mut(&owner.1) {
                    for e in &es[i..end] {
                        record_frontend(p, e);
                    }
                }
            }
            i = end;
        }
        self.record_backends(written);
    }

    /// Records written backends in the mirror. Many at once (a first
    /// pass's chunks of up to [`Self::flush`]'s 16,384 into a mirror not
    /// much larger) are merged in one go, the B-tree built from sorted runs
    /// with full nodes, instead of a search from the root per backend; a
    /// few are inserted one by one (a merge copies the whole mirror).
    fn record_backends(&mut self, written: Vec<(L4Addr, (u32, u8))>) {
        if let Some(d) = &mut self.deferred_backends {
            d.extend(written);
            return;
        }
        if merge_whole(written.len(), self.backends.len()) {
            // Equal addresses: the later write wins, as with inserts.
            let mut more: BTreeMap<L4Addr, (u32, u8)> = written.into_iter().collect();
            self.backends.append(&mut more);
        } else {
            self.single_inserts.1 += written.len() as u64;
            for (addr, v) in written {
                self.backends.insert(addr, v);
            }
        }
    }

    /// What a plan was about, for errors: `ns/name:port slot 3`.
    fn describe(&self, e: &Effect) -> String {
        let name = |fe: &L4Addr| {
            self.target
                .get(fe)
                .map(|f| f.name.clone())
                .unwrap_or_else(|| fe.to_string())
        };
        match e {
            Effect::Backend { addr, id, .. } => format!("backend {id} {addr}"),
            Effect::AffDel { fe, bid, .. } => format!("{} delete affmatch {bid}", name(fe)),
            Effect::Revnat { fe, id } => format!("{} revnat {id}", name(fe)),
            Effect::AffSet { fe, bid, .. } => format!("{} affmatch {bid}", name(fe)),
            Effect::Slot { fe, index, .. } => format!("{} slot {}", name(fe), index + 1),
            Effect::Front { fe, .. } => format!("{} frontend", name(fe)),
            Effect::SlotDel { fe, slot } => format!("{} delete slot {slot}", name(fe)),
        }
    }

    /// Writes `plans` phase by phase ([`Effect::phase`]: backends,
    /// memberships leaving, reverse NAT, memberships, each frontend's slots
    /// and slot 0, slots leaving), in chunks through [`LbMaps::write_all`] (one batch
    /// syscall per map and kind on the kernel). Within a frontend that is
    /// the order [`Self::plan_frontend`] gives, so the datapath never sees a
    /// frontend count before its slots, reverse NAT and memberships are
    /// written, and no write names a backend not yet written. A write that
    /// does not fit is recorded in [`Pressure`] and the rest of that
    /// backend's or frontend's plans is dropped (as a single-write pass
    /// skips the rest of a frontend after its failed write); any other
    /// error stops the flush, with every earlier write in the mirror.
    fn flush(&mut self, plans: Plans, st: &mut SyncStats) -> Result<(), ReconcileError> {
        const CHUNK: usize = 16_384;
        let mut failed: BTreeSet<(bool, L4Addr)> = BTreeSet::new();
        let mut phases = plans.0;
        for n in 0..PHASES {
            let group = std::mem::take(&mut phases[n]);
            let mut at = 0;
            while at < group.len() {
                let mut idx: Vec<usize> = Vec::with_capacity(CHUNK.min(group.len() - at));
                while at < group.len() && idx.len() < CHUNK {
                    if failed.is_empty() || !failed.contains(&group[at].owner()) {
                        idx.push(at);
                    }
                    at += 1;
                }
                let writes: Vec<MapWrite> = idx.iter().map(|i| group[*i].write()).collect();
                let (applied, source) = match self.maps.write_all(&writes) {
                    Ok(()) => (idx.len(), None),
                    Err(Stopped { applied, source }) => (applied, Some(source)),
                };
                let done: Vec<&Effect> = idx[..applied].iter().map(|i| &group[*i]).collect();
                self.record_run(&done, st);
                let (Some(source), Some(&bad)) = (source, idx.get(applied)) else {
                    continue;
                };
                let e = ReconcileError::Map {
                    what: self.describe(&group[bad]),
                    source,
                };
                let Some(u) = e.unfit() else {
                    self.unplanned(&group[bad..]);
                    self.unplanned(phases.iter().flatten());
                    return Err(e);
                };
                let owner = group[bad].owner();
                failed.insert(owner);
                if owner.0 {
                    self.unplanned([&group[bad]]);
                    self.pressure.backends.insert(owner.1, u);
                } else {
                    self.tolerate_frontend(owner.1, Err(e))?;
                }
                // Go on right after the failed write.
                at = bad + 1;
            }
        }
        Ok(())
    }

    fn delete_backend(&mut self, addr: L4Addr, st: &mut SyncStats) -> Result<(), ReconcileError> {
        let Some((id, _)) = self.backends.get(&addr) else {
            return Ok(());
        };
        let id = *id;
        self.maps
            .del_backend(id, addr)
            .map_err(|source| ReconcileError::Map {
                what: format!("delete backend {id} {addr}"),
                source,
            })?;
        st.deletes += 1;
        self.backends.remove(&addr);
        self.be_ids.free(id);
        self.removed.push(addr);
        Ok(())
    }

    /// The frontend's id, allocated (and the frontend entered in the
    /// mirror, nothing written yet) if it is new.
    fn frontend_id(&mut self, addr: L4Addr) -> Result<u32, ReconcileError> {
        if let Some(p) = self.frontends.get(&addr) {
            return Ok(p.id);
        }
        let id = self.new_frontend_id(addr)?;
        self.single_inserts.0 += 1;
        self.frontends.insert(
            addr,
            ProgFrontend {
                id,
                ..Default::default()
            },
        );
        Ok(id)
    }

    /// Enters every frontend of `desired` the mirror lacks, with its id, in
    /// one go when they are many (a first pass: entered one by one, in key
    /// order, they left the B-tree's nodes half empty, and rebuilding it
    /// took its size again at the agent's peak). Few are left to
    /// [`Self::frontend_id`]: merging rebuilds the whole map. Ids are handed
    /// out in the order the pass plans the frontends, as it would; once they
    /// run out, the rest are left to `frontend_id` too, which reports it.
    fn adopt_frontends(&mut self, desired: &BTreeMap<L4Addr, Arc<Frontend>>) {
        let missing: Vec<L4Addr> = desired
            .keys()
            .filter(|a| !self.frontends.contains_key(a))
            .copied()
            .collect();
        if !merge_whole(missing.len(), self.frontends.len()) {
            return;
        }
        let mut adopted = Vec::with_capacity(missing.len());
        for addr in missing {
            let Ok(id) = self.new_frontend_id(addr) else {
                break;
            };
            adopted.push((
                addr,
                ProgFrontend {
                    id,
                    ..Default::default()
                },
            ));
        }
        let mut more: BTreeMap<L4Addr, ProgFrontend> = adopted.into_iter().collect();
        self.frontends.append(&mut more);
    }

    /// A service id for new frontend `addr`, its counters reset.
    fn new_frontend_id(&mut self, addr: L4Addr) -> Result<u32, ReconcileError> {
        // A freed id is handed out first.
        let reused = !self.svc_ids.freed.is_empty();
        let id = self
            .svc_ids
            .alloc()
            .ok_or(ReconcileError::ServiceIdsExhausted(addr))?;
        // A freed id may still have the counters of the frontend that had
        // it (a connect that raced its delete), and one never handed out
        // since the maps were read back may have a predecessor's: the new
        // frontend starts at 0. Best effort (a failure leaves old counts,
        // never a wrong translation).
        let stale = match &mut self.stale_stats {
            Some(ids) => ids.remove(&id),
            None => true,
        };
        if reused || stale {
            if let Err(e) = self.maps.delete_svc_stats(id) {
                tracing::warn!(id, error = %e, "reset per-Service counters");
            }
        }
        Ok(id)
    }

    /// Allocates the frontend's id if new, then writes it.
    fn write_frontend(
        &mut self,
        addr: L4Addr,
        fe: &Frontend,
        st: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        let id = self.frontend_id(addr)?;
        let mut plans = Plans::default();
        self.plan_frontend(addr, id, fe, &mut plans);
        self.execute(plans.ordered(), st)
    }

    fn pass(
        &mut self,
        desired: &BTreeMap<L4Addr, Arc<Frontend>>,
        st: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        self.pressure = Pressure::default();
        // 1: deletes that need no insert first, so they make room.
        let gone: Vec<L4Addr> = self
            .frontends
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            self.delete_frontend(addr, st)?;
        }
        self.delete_orphans(st)?;
        let all: Vec<L4Addr> = self.frontends.keys().copied().collect();
        let stale: Vec<L4Addr> = self.backends.keys().copied().collect();
        // Unwanted backends a programmed frontend still names: once the
        // frontends are written, these are the only ones left to delete
        // (the target's wants do not change during a pass, and every
        // backend written below is wanted), not every backend again.
        let mut held = self.delete_unwanted_backends(stale.into_iter(), &all, st)?;

        // 2: inserts and updates; what does not fit is recorded and skipped.
        // Once more if the deletes of this round made room.
        for _round in 0..2 {
            let deletes = st.deletes;
            self.pressure = Pressure::default();
            // Planned, then written in batches: every backend first (the
            // frontends' plans need their ids), then the frontends' writes
            // grouped by phase ([`Self::flush`]). Both [`PLAN_CHUNK`]
            // writes at a time: a first pass planned whole held every
            // write at once (1.2 million at 100k Services × 10, 100 MiB
            // at the agent's peak).
            // The written backends enter the mirror in one go once all are
            // written (in chunks, entered one by one, half of a million
            // left the B-tree's nodes half empty), also when a write fails.
            self.deferred_backends = Some(Vec::new());
            let written = self.write_wanted_backends(st);
            if let Some(d) = self.deferred_backends.take() {
                self.record_backends(d);
            }
            written?;
            self.adopt_frontends(desired);
            let mut plans = Plans::default();
            for (addr, fe) in desired {
                match self.frontend_id(*addr) {
                    Ok(id) => self.plan_frontend(*addr, id, fe, &mut plans),
                    Err(e) => self.tolerate_frontend(*addr, Err(e))?,
                }
                if plans.len() >= self.plan_chunk {
                    self.flush(std::mem::take(&mut plans), st)?;
                }
            }
            self.flush(plans, st)?;
            // Backends the updated frontends stopped naming.
            let named: Vec<L4Addr> = self.pressure.frontends.keys().copied().collect();
            held = self.delete_unwanted_backends(held.into_iter(), &named, st)?;
            if self.pressure.is_empty() || st.deletes == deletes {
                break;
            }
        }
        Ok(())
    }

    /// Writes every backend the target wants, [`PLAN_CHUNK`] at a time.
    fn write_wanted_backends(&mut self, st: &mut SyncStats) -> Result<(), ReconcileError> {
        let mut after = Bound::Unbounded;
        loop {
            let wanted: Vec<(L4Addr, BackendState)> = self
                .refs
                .range((after, Bound::Unbounded))
                .filter_map(|(a, r)| r.state().map(|s| (*a, s)))
                .take(self.plan_chunk)
                .collect();
            let Some(&(last, _)) = wanted.last() else {
                return Ok(());
            };
            after = Bound::Excluded(last);
            let mut plans = Plans::default();
            for (addr, state) in wanted {
                match self.plan_backend(addr, state) {
                    Ok(p) => plans.0[0].extend(p),
                    Err(e) => self.tolerate_backend(addr, Err(e))?,
                }
            }
            self.flush(plans, st)?;
        }
    }

    /// The writes that make frontend `addr` (service id `id`) hold `fe`,
    /// into `out` by phase; in phase order they are the order they must
    /// reach the datapath: memberships it no longer has (they make room),
    /// its reverse NAT, memberships, the slots, slot 0 (the count that
    /// exposes the slots), then the slots it stops exposing.
    fn plan_frontend(&self, addr: L4Addr, id: u32, fe: &Frontend, out: &mut Plans) {
        let mut members: Vec<(u32, u32)> = Vec::with_capacity(fe.backends.len());
        let mut active: Vec<(u32, (u32, u16))> = Vec::with_capacity(fe.backends.len());
        // External frontends: the backends on this node take the first slots.
        let mut remote: Vec<(u32, (u32, u16))> = Vec::new();
        let is_local = |b: &L4Addr| fe.external.as_ref().is_some_and(|e| e.local.contains(b));
        // Memberships only where ClientIP affinity reads them (as Cilium
        // writes its affinity match entries only for Services with session
        // affinity): the datapath looks one up only behind SVC_F_AFFINITY.
        // A frontend that loses affinity loses its memberships below.
        let affinity = fe.affinity_timeout.is_some();
        for (b, s) in &fe.backends {
            // The backends were written first; one that did not fit is left out.
            let Some((bid, _)) = self.backends.get(b) else {
                continue;
            };
            if affinity {
                members.push((*bid, u32::from(s.as_u8())));
            }
            if *s == BackendState::Active {
                let copy = Lb4Service::slot_copy(*b);
                if is_local(b) {
                    active.push((*bid, copy));
                } else {
                    remote.push((*bid, copy));
                }
            }
        }
        members.sort_unstable();
        let local_count = u16::try_from(active.len()).unwrap_or(u16::MAX);
        active.extend(remote);
        let Some(p) = self.frontends.get(&addr) else {
            return;
        };
        for bid in p.members.keys() {
            if members.binary_search_by_key(bid, |(b, _)| *b).is_err() {
                out.push(Effect::AffDel {
                    fe: addr,
                    id,
                    bid: *bid,
                });
            }
        }
        if p.revnat != Some((addr.ip, addr.port)) {
            out.push(Effect::Revnat { fe: addr, id });
        }
        for (bid, state) in &members {
            if p.members.get(bid) != Some(state) {
                out.push(Effect::AffSet {
                    fe: addr,
                    id,
                    bid: *bid,
                    state: *state,
                });
            }
        }
        for (index, (bid, copy)) in active.iter().enumerate() {
            if p.slots.get(index) != Some(bid) {
                out.push(Effect::Slot {
                    fe: addr,
                    id,
                    index,
                    bid: *bid,
                    copy: *copy,
                });
            }
        }
        let count = u16::try_from(active.len()).unwrap_or(u16::MAX);
        let front = Lb4Service {
            backend_id: 0,
            affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            count,
            rev_nat_index: id,
            flags: frontend_flags(fe),
            pad: [0; 3],
            local_count,
        };
        if p.value != Some(front) {
            out.push(Effect::Front {
                fe: addr,
                value: front,
            });
        }
        for slot in (active.len() + 1..=p.slots.len()).rev() {
            out.push(Effect::SlotDel {
                fe: addr,
                slot: u16::try_from(slot).unwrap_or(u16::MAX),
            });
        }
    }

    fn delete_frontend(&mut self, addr: L4Addr, st: &mut SyncStats) -> Result<(), ReconcileError> {
        let Some(p) = self.frontends.get_mut(&addr) else {
            return Ok(());
        };
        let id = p.id;
        let map_err = |what: String| move |source| ReconcileError::Map { what, source };
        if p.value.is_some() {
            self.maps
                .del_service(addr, 0)
                .map_err(map_err(format!("{addr} delete frontend")))?;
            st.deletes += 1;
            p.value = None;
        }
        while !p.slots.is_empty() {
            let slot = u16::try_from(p.slots.len()).unwrap_or(u16::MAX);
            self.maps
                .del_service(addr, slot)
                .map_err(map_err(format!("{addr} delete slot {slot}")))?;
            st.deletes += 1;
            p.slots.pop();
        }
        let members: Vec<u32> = p.members.keys().copied().collect();
        for bid in members {
            let k = Lb4AffinityMatch {
                backend_id: bid,
                rev_nat_id: id,
            };
            self.maps
                .delete_aff_match(k)
                .map_err(map_err(format!("{addr} delete affmatch {bid}")))?;
            st.deletes += 1;
            p.members.remove(&bid);
        }
        if p.revnat.is_some() {
            self.maps
                .del_revnat(id, addr.is_v6())
                .map_err(map_err(format!("{addr} delete revnat {id}")))?;
            st.deletes += 1;
            p.revnat = None;
        }
        self.frontends.remove(&addr);
        self.svc_ids.free(id);
        // Its counters go with it (reset again when the id is reused, for
        // counts of connections that raced the delete).
        if let Err(e) = self.maps.delete_svc_stats(id) {
            tracing::warn!(id, error = %e, "delete per-Service counters");
        }
        Ok(())
    }

    fn delete_orphans(&mut self, st: &mut SyncStats) -> Result<(), ReconcileError> {
        let map_err = |what: String| move |source| ReconcileError::Map { what, source };
        while let Some((fe, slot)) = self.orphans.services.pop_first() {
            if let Err(e) = self.maps.del_service(fe, slot) {
                self.orphans.services.insert((fe, slot));
                return Err(map_err(format!("{fe} delete orphan slot {slot}"))(e));
            }
            st.deletes += 1;
        }
        while let Some((id, v)) = self.orphans.revnat.pop_first() {
            if let Err(e) = self.maps.del_revnat(id, v) {
                self.orphans.revnat.insert(id, v);
                return Err(map_err(format!("delete orphan revnat {id}"))(e));
            }
            st.deletes += 1;
        }
        while let Some((k, v)) = self.orphans.aff_match.pop_first() {
            if let Err(e) = self.maps.delete_aff_match(k) {
                self.orphans.aff_match.insert(k, v);
                return Err(map_err(format!(
                    "delete orphan affmatch {}/{}",
                    k.backend_id, k.rev_nat_id
                ))(e));
            }
            st.deletes += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) use tests::{fixture as tests_fixture, normalized as tests_normalized};
