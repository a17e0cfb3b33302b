//! Reconciler unit tests against the in-memory and faulty map backends, with
//! golden map dumps (insta snapshots under `snapshots/`).

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::*;
use crate::desired::{build, External, Frontend};
use crate::layout::{Lb4Key, Lb4ReverseNat, PROTO_TCP};
use crate::maps::faulty::FaultyMaps;
use crate::maps::memory::MemoryMaps;
use crate::maps::MapsDump;

/// Services and slices of a multi-document YAML fixture.
pub(crate) fn fixture(text: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => svcs.push(serde_yaml::from_value(v).unwrap()),
            Some("EndpointSlice") => slices.push(serde_yaml::from_value(v).unwrap()),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (svcs, slices)
}

fn cluster() -> DesiredTable {
    let (s, e) = fixture(include_str!("../../testdata/cluster.yaml"));
    build(&s, &e, 10800)
}

fn tcp(ip: [u8; 4], port: u16) -> L4Addr {
    L4Addr {
        ip: IpAddr::V4(Ipv4Addr::from(ip)),
        port,
        proto: PROTO_TCP,
    }
}

#[test]
fn golden_cluster_fixture() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    let st = r.reconcile(&cluster()).unwrap();
    insta::assert_snapshot!("cluster", r.maps().state.render());
    assert!(st.updates > 0);
    assert_eq!(st.deletes, 0);
}

#[test]
fn unchanged_desired_writes_nothing() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&cluster()).unwrap();
    let before = r.maps().writes;
    assert_eq!(r.reconcile(&cluster()).unwrap(), SyncStats::default());
    assert_eq!(r.maps().writes, before);
}

#[test]
fn restart_recovers_ids_and_writes_nothing() {
    // Why: a restarted agent must reuse ids from the pinned maps, never flush.
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&cluster()).unwrap();
    let maps = r.maps().clone();
    let dump = maps.state.clone();

    let mut r2 = Reconciler::recover(maps).unwrap();
    assert_eq!(r2.reconcile(&cluster()).unwrap(), SyncStats::default());
    assert_eq!(r2.maps().state, dump);

    // A new service gets a fresh id, no collision with recovered ones.
    let mut d = cluster();
    let fe = tcp([10, 96, 20, 1], 80);
    let mut backends = BTreeMap::new();
    backends.insert(tcp([10, 244, 9, 9], 80), BackendState::Active);
    d.insert(Frontend {
        addr: fe,
        name: "default/new:".into(),
        affinity_timeout: None,
        backends,
        external: None,
    });
    r2.reconcile(&d).unwrap();
    let id = r2.service_id(&fe).unwrap();
    let ids: BTreeSet<u32> = r2.maps().state.revnat.keys().copied().collect();
    assert_eq!(ids.len(), d.frontends.len());
    assert!(!dump.revnat.contains_key(&id), "id {id} reused");
}

#[test]
fn removed_endpoint_shrinks_slots() {
    let (s, mut e) = fixture(include_str!("../../testdata/cluster.yaml"));
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&build(&s, &e, 10800)).unwrap();
    // Drop the second kube-dns endpoint.
    e[0].endpoints.as_mut().unwrap().truncate(1);
    let st = r.reconcile(&build(&s, &e, 10800)).unwrap();
    insta::assert_snapshot!("cluster_one_dns_endpoint", r.maps().state.render());
    assert!(st.deletes > 0);
}

#[test]
fn deleted_services_leave_empty_maps() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&cluster()).unwrap();
    r.reconcile(&DesiredTable::default()).unwrap();
    assert_eq!(r.maps().state, MapsDump::default());
    assert_eq!(r.programmed(), Programmed::default());
}

#[test]
fn faulty_maps_retry_and_converge() {
    let mut want = Reconciler::recover(MemoryMaps::new()).unwrap();
    want.reconcile(&cluster()).unwrap();

    let mut r = Reconciler::recover(FaultyMaps::new(3)).unwrap();
    let mut failures = 0;
    for _ in 0..200 {
        match r.reconcile(&cluster()) {
            Ok(_) => break,
            Err(_) => failures += 1,
        }
    }
    assert!(failures > 0, "the faulty backend never failed");
    assert_eq!(r.maps().inner.state, want.maps().state);
    // And the way back down converges too.
    for _ in 0..200 {
        if r.reconcile(&DesiredTable::default()).is_ok() {
            break;
        }
    }
    assert_eq!(r.maps().inner.state, MapsDump::default());
}

#[test]
fn orphans_from_a_crash_are_cleaned() {
    // Why: a crash between writes can leave a slot or revnat entry without its frontend.
    let mut m = MemoryMaps::new();
    let fe = tcp([10, 96, 99, 9], 80);
    m.state.services.insert(
        Lb4Key::new(fe, 1),
        Lb4Service {
            backend_id: 7,
            rev_nat_index: 9,
            ..Default::default()
        },
    );
    m.state.revnat.insert(9, Lb4ReverseNat::default());
    let mut r = Reconciler::recover(m).unwrap();
    r.reconcile(&cluster()).unwrap();
    let mut clean = Reconciler::recover(MemoryMaps::new()).unwrap();
    clean.reconcile(&cluster()).unwrap();
    assert_eq!(r.maps().state.services, clean.maps().state.services);
    assert!(!r.maps().state.revnat.contains_key(&9) || clean.maps().state.revnat.contains_key(&9));
}

#[test]
fn terminating_backend_keeps_membership_but_no_slot() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&cluster()).unwrap();
    let web = tcp([10, 96, 10, 1], 80);
    let id = r.service_id(&web).unwrap();
    let s = &r.maps().state;
    let front = s.services[&Lb4Key::new(web, 0)];
    assert_eq!(front.count, 2);
    assert_eq!(front.affinity_timeout, 60);
    let members = s.aff_match.keys().filter(|k| k.rev_nat_id == id).count();
    assert_eq!(members, 3);
}

/// The maps with ids replaced by what they name (frontend and backend
/// addresses), so two reconcilers that allocated ids in a different order
/// compare equal when they program the same thing.
pub(crate) fn normalized(d: &MapsDump) -> Vec<String> {
    let fe_of: BTreeMap<u32, L4Addr> = d
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(k, v)| (v.rev_nat_index, k.frontend()))
        .collect();
    let fe = |id: u32| {
        fe_of
            .get(&id)
            .map_or_else(|| format!("?svc{id}"), ToString::to_string)
    };
    let be = |id: u32| {
        d.backends
            .get(&id)
            .map_or_else(|| format!("?be{id}"), |b| b.l4().to_string())
    };
    let mut out: Vec<String> = Vec::new();
    for (k, v) in &d.services {
        if k.backend_slot == 0 {
            out.push(format!(
                "fe {} count={} aff={} flags={} rn={}",
                k.frontend(),
                v.count,
                v.affinity_timeout,
                v.flags,
                fe(v.rev_nat_index)
            ));
        } else {
            out.push(format!(
                "slot {} #{} -> {} rn={}",
                k.frontend(),
                k.backend_slot,
                be(v.backend_id),
                fe(v.rev_nat_index)
            ));
        }
    }
    for b in d.backends.values() {
        out.push(format!("be {} state={}", b.l4(), b.state));
    }
    for (id, v) in &d.revnat {
        out.push(format!("revnat {} {v:?}", fe(*id)));
    }
    for (k, v) in &d.aff_match {
        out.push(format!("aff {} {} {v}", fe(k.rev_nat_id), be(k.backend_id)));
    }
    out.sort();
    out
}

fn frontend(addr: L4Addr, name: &str, backends: &[(L4Addr, BackendState)]) -> Frontend {
    Frontend {
        addr,
        name: name.into(),
        affinity_timeout: None,
        backends: backends.iter().copied().collect(),
        external: None,
    }
}

/// Entries of the dump that belong to frontend `fe` (by its service id).
fn entries_of(d: &MapsDump, fe: L4Addr, id: u32) -> MapsDump {
    MapsDump {
        services: d
            .services
            .iter()
            .filter(|(k, _)| k.frontend() == fe)
            .map(|(k, v)| (*k, *v))
            .collect(),
        backends: BTreeMap::new(),
        revnat: d
            .revnat
            .iter()
            .filter(|(i, _)| **i == id)
            .map(|(i, v)| (*i, *v))
            .collect(),
        aff_match: d
            .aff_match
            .iter()
            .filter(|(k, _)| k.rev_nat_id == id)
            .map(|(k, v)| (*k, *v))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn partial_pass_is_exact_and_leaves_other_frontends_untouched() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    assert!(r.needs_full());
    let full = cluster();
    r.reconcile(&full).unwrap();
    assert!(!r.needs_full());
    let before = r.maps().state.clone();
    let web = tcp([10, 96, 10, 1], 80);
    let web_id = r.service_id(&web).unwrap();
    let others: Vec<(L4Addr, u32)> = full
        .frontends
        .keys()
        .filter(|a| **a != web)
        .map(|a| (*a, r.service_id(a).unwrap()))
        .collect();

    // web: one backend swapped for a new one; a new frontend; another removed.
    let mut new_web = full.frontends[&web].clone();
    let first = *new_web.backends.keys().next().unwrap();
    new_web.backends.remove(&first);
    let fresh = tcp([10, 244, 9, 9], 8080);
    new_web.backends.insert(fresh, BackendState::Active);
    let added = frontend(
        tcp([10, 96, 77, 7], 80),
        "default/new:",
        &[(fresh, BackendState::Active)],
    );
    let (removed, removed_id) = others[0];
    let changes: FrontendChanges = [
        (web, Some(Arc::new(new_web.clone()))),
        (added.addr, Some(Arc::new(added.clone()))),
        (removed, None),
    ]
    .into_iter()
    .collect();
    let writes_before = r.maps().writes;
    let st = r.apply(&changes).unwrap();
    assert_eq!(st.writes(), r.maps().writes - writes_before);

    // Equal to a full pass towards the same table.
    let mut want_table = full.clone();
    want_table.insert(new_web);
    want_table.insert(added);
    want_table.frontends.remove(&removed);
    let mut want = Reconciler::recover(MemoryMaps::new()).unwrap();
    want.reconcile(&want_table).unwrap();
    assert_eq!(normalized(&r.maps().state), normalized(&want.maps().state));
    // And a full pass after it finds nothing to do.
    assert_eq!(r.reconcile(&want_table).unwrap(), SyncStats::default());

    // Frontends that did not change kept their ids and every entry.
    let after = &r.maps().state;
    for (a, id) in &others[1..] {
        assert_eq!(r.service_id(a), Some(*id));
        assert_eq!(
            entries_of(after, *a, *id),
            entries_of(&before, *a, *id),
            "{a}"
        );
    }
    assert_eq!(r.service_id(&web), Some(web_id));
    assert!(entries_of(after, removed, removed_id).services.is_empty());
    // The swapped-out backend is gone; every other one kept its id.
    let gone_ids: Vec<u32> = before
        .backends
        .iter()
        .filter(|(id, _)| !after.backends.contains_key(id))
        .map(|(id, _)| *id)
        .collect();
    for id in &gone_ids {
        let b = before.backends[id].l4();
        assert!(!want_table
            .frontends
            .values()
            .any(|f| f.backends.contains_key(&b)));
    }
    // (A freed id may serve a new backend: deletes run first to make room.)
    for (id, b) in &after.backends {
        if let Some((old_id, _)) = before.backends.iter().find(|(_, o)| o.l4() == b.l4()) {
            assert_eq!(old_id, id, "{}", b.l4());
        }
    }
}

#[test]
fn partial_pass_keeps_a_backend_another_frontend_still_uses() {
    // Why: backends are shared between frontends; dropping one user must not delete it.
    let shared = tcp([10, 244, 1, 1], 8080);
    let a = frontend(
        tcp([10, 96, 0, 1], 80),
        "d/a:",
        &[(shared, BackendState::Active)],
    );
    let b = frontend(
        tcp([10, 96, 0, 2], 80),
        "d/b:",
        &[(shared, BackendState::Terminating)],
    );
    let mut t = DesiredTable::default();
    t.insert(a.clone());
    t.insert(b.clone());
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&t).unwrap();
    let state_of = |r: &Reconciler<MemoryMaps>| -> Vec<u8> {
        r.maps().state.backends.values().map(|b| b.state).collect()
    };
    assert_eq!(state_of(&r), vec![BackendState::Active.as_u8()]);

    // a goes: the backend stays, now terminating (only b wants it).
    r.apply(&[(a.addr, None)].into_iter().collect()).unwrap();
    assert_eq!(state_of(&r), vec![BackendState::Terminating.as_u8()]);
    // a comes back: active again.
    r.apply(&[(a.addr, Some(Arc::new(a.clone())))].into_iter().collect())
        .unwrap();
    assert_eq!(state_of(&r), vec![BackendState::Active.as_u8()]);
    // both go: the backend goes.
    r.apply(&[(a.addr, None), (b.addr, None)].into_iter().collect())
        .unwrap();
    assert_eq!(r.maps().state, MapsDump::default());
}

/// Memberships (nb_lb4_affmatch) exist only for frontends with ClientIP
/// affinity, the one thing that reads them: a Service that turns affinity
/// on gains one per backend, terminating ones included; one that turns it
/// off loses them, in a partial pass as in a full one and after a restart.
#[test]
fn memberships_follow_client_ip_affinity_on_and_off() {
    let bes = [
        (tcp([10, 244, 3, 1], 8080), BackendState::Active),
        (tcp([10, 244, 3, 2], 8080), BackendState::Terminating),
    ];
    let plain = frontend(tcp([10, 96, 3, 1], 80), "d/a:", &bes);
    let mut sticky = plain.clone();
    sticky.affinity_timeout = Some(10800);
    let other = frontend(tcp([10, 96, 3, 2], 80), "d/b:", &bes[..1]);
    let members = |r: &Reconciler<MemoryMaps>| -> Vec<(u32, u32)> {
        r.maps()
            .state
            .aff_match
            .iter()
            .map(|(k, v)| (k.backend_id, *v))
            .collect()
    };
    let term = u32::from(BackendState::Terminating.as_u8());
    let act = u32::from(BackendState::Active.as_u8());

    // Full pass: none without affinity.
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&table(&[plain.clone(), other.clone()]))
        .unwrap();
    assert_eq!(members(&r), vec![]);
    // Partial: affinity on, both backends become members.
    r.apply(
        &[(sticky.addr, Some(Arc::new(sticky.clone())))]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let ids: Vec<u32> = r.maps().state.backends.keys().copied().collect();
    assert_eq!(ids.len(), 2);
    let mut want: Vec<(u32, u32)> = vec![(ids[0], act), (ids[1], term)];
    want.sort_unstable();
    assert_eq!(members(&r), want);
    // A restart reads them back and keeps them.
    let mut r = Reconciler::recover(r.maps().clone()).unwrap();
    let st = r
        .reconcile(&table(&[sticky.clone(), other.clone()]))
        .unwrap();
    assert_eq!(st, SyncStats::default());
    assert_eq!(members(&r), want);
    // Partial: affinity off, they go; the backends stay.
    r.apply(
        &[(plain.addr, Some(Arc::new(plain.clone())))]
            .into_iter()
            .collect(),
    )
    .unwrap();
    assert_eq!(members(&r), vec![]);
    assert_eq!(r.maps().state.backends.len(), 2);
    // Full pass: on again, then off again.
    r.reconcile(&table(&[sticky.clone(), other.clone()]))
        .unwrap();
    assert_eq!(members(&r), want);
    r.reconcile(&table(&[plain, other])).unwrap();
    assert_eq!(members(&r), vec![]);
}

#[test]
fn failed_partial_pass_asks_for_a_full_one() {
    let mut r = Reconciler::recover(FaultyMaps::new(0)).unwrap();
    r.reconcile(&cluster()).unwrap();
    assert!(!r.needs_full());
    r.maps_mut().fail_every = 1;
    let fe = frontend(
        tcp([10, 96, 50, 5], 80),
        "d/x:",
        &[(tcp([10, 244, 5, 5], 80), BackendState::Active)],
    );
    assert!(r
        .apply(&[(fe.addr, Some(Arc::new(fe)))].into_iter().collect())
        .is_err());
    assert!(r.needs_full());
    r.maps_mut().fail_every = 0;
    let fe = frontend(tcp([10, 96, 50, 6], 80), "d/y:", &[]);
    let refused = r.apply(&[(fe.addr, Some(Arc::new(fe)))].into_iter().collect());
    assert!(matches!(refused, Err(ReconcileError::NeedsFullPass)));
    r.reconcile(&cluster()).unwrap();
    assert!(!r.needs_full());
    r.resync().unwrap();
    assert!(r.needs_full());
}

#[test]
fn ids_freed_are_reused_and_fresh_ones_continue_upwards() {
    // Why: an endpoint swap frees one backend id and takes another; going back to the
    // lowest free id made the next allocation scan every id in use (1.7 ms at 100k backends).
    let mut a = IdAlloc::new(5);
    let first: Vec<u32> = (0..3).map(|_| a.alloc().unwrap()).collect();
    assert_eq!(first, vec![1, 2, 3]);
    a.free(2);
    assert_eq!(a.alloc(), Some(2));
    assert_eq!(a.alloc(), Some(4));
    a.free(4);
    a.free(1);
    assert_eq!(a.alloc(), Some(1));
    assert_eq!(a.alloc(), Some(4));
    assert_eq!(a.alloc(), Some(5));
    assert_eq!(a.alloc(), None);

    // Ids left free at recovery are found too.
    let mut b = IdAlloc::new(4);
    b.mark(2);
    b.mark(4);
    assert_eq!(b.alloc(), Some(1));
    assert_eq!(b.alloc(), Some(3));
    assert_eq!(b.alloc(), None);
}

#[test]
fn id_set_holds_ids_as_bits_and_far_ones_beside_them() {
    let mut s = IdSet::default();
    let ids = [
        1,
        63,
        64,
        65,
        4095,
        IdSet::DENSE - 1,
        IdSet::DENSE,
        u32::MAX - 1,
    ];
    for id in ids {
        assert!(!s.contains(id), "{id} before");
        s.insert(id);
        assert!(s.contains(id), "{id} after");
    }
    assert!(!s.contains(2) && !s.contains(66) && !s.contains(IdSet::DENSE + 1));
    // A far id costs no bits.
    assert_eq!(s.words.len(), (IdSet::DENSE / 64) as usize);
    let mut t = IdSet::default();
    t.insert(u32::MAX - 1);
    assert!(t.words.is_empty());
    for id in ids {
        assert!(s.remove(id), "{id} removed");
        assert!(!s.contains(id), "{id} gone");
        assert!(!s.remove(id), "{id} twice");
    }
    assert!(!s.remove(7) && !s.remove(1 << 30));

    // Recovery marks a far id; allocation still goes from 1 and skips it.
    let mut a = IdAlloc::new(u32::MAX - 1);
    a.mark(u32::MAX - 1);
    a.mark(2);
    assert_eq!(a.alloc(), Some(1));
    assert_eq!(a.alloc(), Some(3));
    a.free(u32::MAX - 1);
    assert_eq!(a.alloc(), Some(u32::MAX - 1), "freed ids first");
}

fn table(fes: &[Frontend]) -> DesiredTable {
    let mut d = DesiredTable::default();
    for fe in fes {
        d.insert(fe.clone());
    }
    d
}

fn one_backend(vip: u8, be: u8) -> Frontend {
    frontend(
        tcp([10, 96, 60, vip], 80),
        &format!("d/s{vip}:"),
        &[(tcp([10, 244, 6, be], 8080), BackendState::Active)],
    )
}

#[test]
fn full_backend_map_swaps_backends_in_one_pass() {
    // Why: insert-before-delete wedged a full map: a rolling update (new pod in,
    // old pod out) failed on the insert at every retry, forever.
    let limits = crate::maps::memory::MapLimits {
        backends: Some(2),
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    let fe = |bes: &[u8]| {
        let list: Vec<(L4Addr, BackendState)> = bes
            .iter()
            .map(|b| (tcp([10, 244, 6, *b], 8080), BackendState::Active))
            .collect();
        frontend(tcp([10, 96, 60, 1], 80), "d/web:", &list)
    };
    r.reconcile(&table(&[fe(&[1, 2])])).unwrap();
    assert!(r.pressure().is_empty());
    // Both backends replaced while the map is full: one pass, nothing left out.
    r.reconcile(&table(&[fe(&[3, 4])])).unwrap();
    assert!(r.pressure().is_empty(), "{:?}", r.pressure());
    assert!(!r.needs_full());
    let mut want = Reconciler::recover(MemoryMaps::new()).unwrap();
    want.reconcile(&table(&[fe(&[3, 4])])).unwrap();
    assert_eq!(normalized(&r.maps().state), normalized(&want.maps().state));
    // Rolling one at a time (keep 3, swap 4 for 5) works too.
    r.reconcile(&table(&[fe(&[3, 5])])).unwrap();
    assert!(r.pressure().is_empty(), "{:?}", r.pressure());
    assert_eq!(r.maps().state.backends.len(), 2);
}

#[test]
fn full_service_map_programs_what_fits_reports_the_rest_and_recovers() {
    // Why: one frontend that did not fit stopped the pass, so nothing after it was programmed.
    let limits = crate::maps::memory::MapLimits {
        services: Some(5), // slot 0 + one slot per frontend: two fit, the third does not
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    let fes: Vec<Frontend> = (1..=3).map(|i| one_backend(i, i)).collect();
    let st = r.reconcile(&table(&fes)).unwrap();
    assert!(st.updates > 0);
    let p = r.pressure().clone();
    assert_eq!(p.frontends.len(), 1, "{p:?}");
    assert_eq!(
        p.frontends.values().next(),
        Some(&Unfit::MapFull(crate::layout::names::SERVICES))
    );
    assert_eq!(r.programmed().services, 2);
    assert!(r.needs_full(), "a pass with pressure asks for a full retry");
    assert_eq!(
        p.summary(),
        vec![format!(
            "map nb_lb4_svc full: 1 frontends not programmed (first {})",
            p.frontends.keys().next().unwrap()
        )]
    );
    // The retry is refused the same way, but keeps everything else programmed.
    r.reconcile(&table(&fes)).unwrap();
    assert_eq!(r.pressure().frontends.len(), 1);
    assert_eq!(r.programmed().services, 2);
    // One Service goes away: its room is freed before the insert, all fit.
    let fewer = vec![fes[0].clone(), fes[2].clone()];
    r.reconcile(&table(&fewer)).unwrap();
    assert!(r.pressure().is_empty(), "{:?}", r.pressure());
    assert!(!r.needs_full());
    let mut want = Reconciler::recover(MemoryMaps::new()).unwrap();
    want.reconcile(&table(&fewer)).unwrap();
    assert_eq!(normalized(&r.maps().state), normalized(&want.maps().state));
}

#[test]
fn unfit_new_frontend_gives_its_service_id_back() {
    // Why: a frontend nothing was written for must not hold an id (65535 in all).
    let limits = crate::maps::memory::MapLimits {
        revnat: Some(2),
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    let fes: Vec<Frontend> = (1..=3).map(|i| one_backend(i, 1)).collect();
    r.reconcile(&table(&fes)).unwrap();
    let unfit: Vec<L4Addr> = r.pressure().frontends.keys().copied().collect();
    assert_eq!(unfit.len(), 1);
    assert_eq!(r.service_id(&unfit[0]), None);
    assert_eq!(r.svc_ids.used.len(), 2);
    // The shared backend is programmed once and stays.
    assert_eq!(r.maps().state.backends.len(), 1);
}

#[test]
fn exhausted_service_ids_skip_the_frontend_not_the_pass() {
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.svc_ids = IdAlloc::new(2);
    let fes: Vec<Frontend> = (1..=3).map(|i| one_backend(i, i)).collect();
    r.reconcile(&table(&fes)).unwrap();
    assert_eq!(
        r.pressure().frontends.values().collect::<Vec<_>>(),
        vec![&Unfit::ServiceIdsExhausted]
    );
    assert_eq!(r.programmed().services, 2);
    // Its backend was written (phase A) but nothing names it: a later pass that
    // drops the Service removes it.
    r.reconcile(&table(&fes[..2])).unwrap();
    assert!(r.pressure().is_empty());
    assert_eq!(r.maps().state.backends.len(), 2);
}

#[test]
fn partial_pass_under_pressure_succeeds_and_asks_for_a_full_one() {
    let limits = crate::maps::memory::MapLimits {
        backends: Some(1),
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    r.reconcile(&table(&[one_backend(1, 1)])).unwrap();
    assert!(!r.needs_full());
    let fe = one_backend(2, 2);
    r.apply(
        &[(fe.addr, Some(Arc::new(fe.clone())))]
            .into_iter()
            .collect(),
    )
    .unwrap();
    assert_eq!(r.pressure().backends.len(), 1);
    assert!(r.needs_full());
    // The frontend is programmed without its backend: it refuses connections
    // (count 0) instead of being absent.
    let slot0 = r
        .maps()
        .state
        .services
        .get(&Lb4Key::new(fe.addr, 0))
        .copied();
    assert_eq!(slot0.map(|v| v.count), Some(0));
    // Dropping the first Service makes room; the full retry programs the backend.
    r.reconcile(&table(&[fe])).unwrap();
    assert!(r.pressure().is_empty());
    assert_eq!(r.maps().state.backends.len(), 1);
}

#[test]
fn dual_stack_service_programs_v4_and_v6_frontends_from_their_own_slices() {
    // Why (issue 13): IPv6 ClusterIPs and addressType IPv6 slices were ignored.
    let (s, e) = fixture(
        "kind: Service
metadata: {name: web, namespace: d}
spec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00:96::5'], ipFamilies: [IPv4, IPv6], ports: [{port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: web-4, namespace: d, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-6, namespace: d, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244::1']}, {addresses: ['fd00:244::2'], conditions: {ready: false}}]
",
    );
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&build(&s, &e, 10800)).unwrap();
    assert_eq!(
        r.maps().state.render(),
        "svc 10.96.0.5:80/TCP slot=0 count=1 revnat=1 flags=0x0 affinity_timeout=0
svc 10.96.0.5:80/TCP slot=1 backend=1 revnat=1 at=10.244.0.1:8080
svc [fd00:96::5]:80/TCP slot=0 count=1 revnat=2 flags=0x0 affinity_timeout=0
svc [fd00:96::5]:80/TCP slot=1 backend=2 revnat=2
backend 1 10.244.0.1:8080/TCP active
backend 2 [fd00:244::1]:8080/TCP active
revnat 1 10.96.0.5:80
revnat 2 [fd00:96::5]:80
"
    );
    // A restart reads both families back and writes nothing.
    let mut again = Reconciler::recover(r.maps().clone()).unwrap();
    assert_eq!(again.reconcile(&build(&s, &e, 10800)).unwrap().writes(), 0);
    // The v6 backend goes: it is reported for socket termination.
    let gone: Vec<_> = e
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .cloned()
        .collect();
    again.take_removed_backends();
    again.reconcile(&build(&s, &gone, 10800)).unwrap();
    let removed = again.take_removed_backends();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].to_string(), "[fd00:244::1]:8080/TCP");
    assert!(again
        .maps()
        .state
        .services6
        .keys()
        .all(|k| k.backend_slot == 0));
}

#[test]
fn external_frontends_are_flagged_dirty_only_when_one_changes() {
    let mut r = Reconciler::recover(MemoryMaps::default()).unwrap();
    let mut np = one_backend(1, 1);
    np.addr = tcp([172, 18, 0, 2], 30080);
    np.external = Some(External::default());
    r.reconcile(&table(&[one_backend(2, 2), np.clone()]))
        .unwrap();
    assert!(r.take_external_dirty(), "a full pass rebuilds them");
    assert!(!r.take_external_dirty(), "taken");
    // ClusterIP churn: nothing built from the external frontends moves.
    let ci = one_backend(2, 3);
    r.apply(&[(ci.addr, Some(Arc::new(ci)))].into_iter().collect())
        .unwrap();
    assert!(!r.take_external_dirty());
    // The NodePort's backends change, then it goes away: dirty each time.
    let mut moved = np.clone();
    moved.backends = [(tcp([10, 244, 6, 9], 8080), BackendState::Active)]
        .into_iter()
        .collect();
    r.apply(&[(moved.addr, Some(Arc::new(moved)))].into_iter().collect())
        .unwrap();
    assert!(r.take_external_dirty());
    r.apply(&[(np.addr, None)].into_iter().collect()).unwrap();
    assert!(r.take_external_dirty(), "a removed external frontend");
    r.mark_external_dirty();
    assert!(r.take_external_dirty(), "a failed sync asks again");
}

/// The map pressure /metrics reports: what the reconciler counts as written
/// into each map is what the maps hold, for both families, and again after
/// a restart reads the maps back.
#[test]
fn map_entries_count_what_each_map_holds() {
    let dump_counts = |d: &MapsDump| -> Vec<(&'static str, usize)> {
        MAP_USAGE_MAPS
            .iter()
            .copied()
            .zip([
                d.services.len(),
                d.services6.len(),
                d.backends.len(),
                d.backends6.len(),
                d.revnat.len(),
                d.revnat6.len(),
                d.aff_match.len(),
            ])
            .collect()
    };
    let (s, e) = fixture(
        "kind: Service
metadata: {name: web, namespace: d}
spec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00:96::5'], ipFamilies: [IPv4, IPv6], ports: [{port: 80, targetPort: 8080}], sessionAffinity: ClientIP}
---
kind: EndpointSlice
metadata: {name: web-4, namespace: d, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: [10.244.0.2]}]
---
kind: EndpointSlice
metadata: {name: web-6, namespace: d, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244::1']}]
",
    );
    for desired in [cluster(), build(&s, &e, 10800)] {
        let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
        r.reconcile(&desired).unwrap();
        let counts = r.map_entries();
        assert_eq!(counts, dump_counts(&r.maps().state));
        assert!(counts.iter().any(|(_, n)| *n > 0), "{counts:?}");
        let again = Reconciler::recover(r.maps().clone()).unwrap();
        assert_eq!(again.map_entries(), counts);
    }
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&build(&s, &e, 10800)).unwrap();
    let counts = r.map_entries();
    assert_eq!(
        counts,
        [
            ("nb_lb4_svc", 3),
            ("nb_lb6_svc", 2),
            ("nb_lb4_be", 2),
            ("nb_lb6_be", 1),
            ("nb_lb4_revnat", 1),
            ("nb_lb6_revnat", 1),
            ("nb_lb4_affmatch", 3),
        ]
    );
}

/// A NodePort Service with 1,000 ports (the API server's limit per Service
/// is far higher than anyone uses): every port on every address becomes a
/// frontend; when the map cannot hold them all, what does not fit is
/// reported and the small Service next to it is still programmed.
#[test]
fn a_service_with_a_thousand_ports_is_programmed_or_reported_never_wedging_the_others() {
    let mut text = String::from(
        "kind: Service\nmetadata: {name: wide, namespace: d}\nspec:\n  type: NodePort\n  clusterIP: 10.96.9.9\n  ports:\n",
    );
    let mut slice = String::from(
        "---\nkind: EndpointSlice\nmetadata: {name: wide-1, namespace: d, labels: {kubernetes.io/service-name: wide}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.9.9]}]\nports:\n",
    );
    for i in 0..1000u32 {
        text.push_str(&format!(
            "  - {{name: p{i}, port: {}, targetPort: {}, nodePort: {}}}\n",
            10000 + i,
            20000 + i,
            30000 + i
        ));
        slice.push_str(&format!("  - {{name: p{i}, port: {}}}\n", 20000 + i));
    }
    text.push_str(&slice);
    text.push_str(
        "---\nkind: Service\nmetadata: {name: small, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n---\nkind: EndpointSlice\nmetadata: {name: small-1, namespace: d, labels: {kubernetes.io/service-name: small}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.0.5]}]\nports: [{port: 80}]\n",
    );
    let (svcs, slices) = fixture(&text);
    let node_ips: Vec<IpAddr> = vec!["192.168.50.1".parse().unwrap()];
    let rules = crate::desired::Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let t = build(&svcs, &slices, rules);
    // Per port: ClusterIP, the node address, 127.0.0.1; plus small's one.
    assert_eq!(t.frontends.len(), 3 * 1000 + 1);

    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&t).unwrap();
    assert!(r.pressure().is_empty());
    assert_eq!(r.programmed().services, 3001);

    // A map with room for 2,000 entries (frontend + backend slot each):
    // about 1,000 frontends fit; the rest are reported, small among the fitted
    // or the reported, never silently gone.
    let limits = crate::maps::memory::MapLimits {
        services: Some(2000),
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    r.reconcile(&t).unwrap();
    let p = r.pressure().clone();
    assert!(!p.frontends.is_empty());
    assert_eq!(
        r.programmed().services + p.frontends.len(),
        3001,
        "every frontend is programmed or reported"
    );
    assert!(
        p.summary()[0].starts_with("map nb_lb4_svc full:"),
        "{:?}",
        p.summary()
    );
}

/// Why: per-Service counters are keyed by service id and ids are reused; a
/// new Service must not inherit the counts of the one that had its id.
#[test]
fn a_reused_service_id_starts_with_no_counters() {
    use crate::layout::SvcStats;
    let be = [(tcp([10, 244, 1, 1], 8080), BackendState::Active)];
    let a = frontend(tcp([10, 96, 0, 1], 80), "ns/a:http", &be);
    let b = frontend(tcp([10, 96, 0, 2], 80), "ns/b:http", &be);
    let one = |f: &Frontend| {
        let mut t = DesiredTable::default();
        t.insert(f.clone());
        t
    };
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    r.reconcile(&one(&a)).unwrap();
    let id = r.service_id(&a.addr).unwrap();
    let traffic = SvcStats {
        translated: 9,
        ..Default::default()
    };
    r.maps_mut().svc_stats.insert(id, traffic);
    // An unchanged pass leaves them alone.
    r.reconcile(&one(&a)).unwrap();
    assert_eq!(r.maps().svc_stats.get(&id), Some(&traffic));
    // Deleted with the frontend ...
    r.reconcile(&DesiredTable::default()).unwrap();
    assert!(r.maps().svc_stats.is_empty());
    // ... and again when the id is handed out (a racing connect recreated them).
    r.maps_mut().svc_stats.insert(id, traffic);
    r.reconcile(&one(&b)).unwrap();
    assert_eq!(r.service_id(&b.addr), Some(id), "the freed id is reused");
    assert!(r.maps().svc_stats.is_empty());
}

#[test]
fn counters_left_behind_are_reset_when_their_id_is_handed_out_and_only_then() {
    // Why: every new frontend's id used to cost a counter delete, 100k
    // syscalls on a fresh start with no counters at all; now only ids with
    // counters when the maps were read back, or freed since, are reset.
    use crate::layout::SvcStats;
    let be = [(tcp([10, 244, 1, 1], 8080), BackendState::Active)];
    let a = frontend(tcp([10, 96, 0, 1], 80), "ns/a:http", &be);
    let b = frontend(tcp([10, 96, 0, 2], 80), "ns/b:http", &be);
    let traffic = SvcStats {
        translated: 9,
        ..Default::default()
    };
    // A predecessor left counters for ids 1 and 5; no frontend holds them.
    let mut maps = MemoryMaps::new();
    maps.svc_stats.insert(1, traffic);
    maps.svc_stats.insert(5, traffic);
    let mut r = Reconciler::recover(maps).unwrap();
    r.reconcile(&table(std::slice::from_ref(&a))).unwrap();
    assert_eq!(r.service_id(&a.addr), Some(1));
    assert_eq!(r.maps().svc_stats.get(&1), None, "id 1 handed out: reset");
    assert_eq!(r.maps().svc_stats.get(&5), Some(&traffic), "id 5 not yet");
    assert_eq!(r.maps().svc_stats_deletes, 1, "only the stale id");
    // Counters the datapath writes for a live frontend are its own: a
    // later id handed out leaves them alone.
    r.maps_mut().svc_stats.insert(1, traffic);
    r.reconcile(&table(&[a.clone(), b.clone()])).unwrap();
    assert_eq!(r.service_id(&b.addr), Some(2));
    assert_eq!(r.maps().svc_stats.get(&1), Some(&traffic));
    assert_eq!(r.maps().svc_stats_deletes, 1, "a fresh id costs no delete");
    // Read back again (a resync), the ids in use keep their counters.
    r.resync().unwrap();
    r.reconcile(&table(&[a.clone(), b.clone()])).unwrap();
    assert_eq!(r.maps().svc_stats.get(&1), Some(&traffic));
    assert_eq!(r.maps().svc_stats.get(&5), Some(&traffic));
    // Ids 3 and 4 fresh; 5 is reset when it comes.
    let more: Vec<Frontend> = (3..=5)
        .map(|i| frontend(tcp([10, 96, 0, i], 80), &format!("ns/s{i}:http"), &be))
        .collect();
    let mut all = vec![a, b];
    all.extend(more.iter().cloned());
    r.reconcile(&table(&all)).unwrap();
    assert_eq!(r.service_id(&more[2].addr), Some(5));
    assert_eq!(r.maps().svc_stats.get(&5), None);
    assert_eq!(r.maps().svc_stats.get(&1), Some(&traffic));
}

/// What the datapath could see wrong in `d`: a frontend whose count exposes
/// a slot that is missing or names a missing backend, or without its
/// reverse-NAT entry; an affinity membership naming a missing backend.
fn inconsistencies(d: &MapsDump) -> Vec<String> {
    let mut out = Vec::new();
    let backends = d.backend_entries();
    for (fe, slot, v) in d.service_entries() {
        if slot != 0 {
            continue;
        }
        for s in 1..=v.count {
            match d.service(fe, s) {
                // An IPv4 slot carries a copy of its backend (the socket
                // LB's only source for it): it must be the backend's.
                Some(e)
                    if !fe.is_v6()
                        && backends.get(&e.backend_id).map(|(b, _)| (b.ip, b.port))
                            != e.slot_backend().map(|(ip, port)| (IpAddr::V4(ip), port)) =>
                {
                    out.push(format!(
                        "{fe} slot {s}: carries {:?}, backend {} is {:?}",
                        e.slot_backend(),
                        e.backend_id,
                        backends.get(&e.backend_id)
                    ))
                }
                Some(e) if backends.contains_key(&e.backend_id) => {}
                Some(e) => out.push(format!("{fe} slot {s}: backend {} missing", e.backend_id)),
                None => out.push(format!("{fe} slot {s} missing (count {})", v.count)),
            }
        }
        let rn = if fe.is_v6() {
            d.revnat6.contains_key(&v.rev_nat_index)
        } else {
            d.revnat.contains_key(&v.rev_nat_index)
        };
        if !rn {
            out.push(format!("{fe}: revnat {} missing", v.rev_nat_index));
        }
    }
    for k in d.aff_match.keys() {
        if !backends.contains_key(&k.backend_id) {
            out.push(format!("affmatch names missing backend {}", k.backend_id));
        }
    }
    out
}

/// Memory maps that check after every single write that the datapath
/// would see a consistent state (a batch on the kernel is the same writes,
/// in the same order).
#[derive(Default)]
struct Watching {
    inner: MemoryMaps,
    seen: Vec<String>,
    /// Writes per [`LbMaps::write_all`] call.
    batches: Vec<usize>,
}

impl Watching {
    fn check<T>(&mut self, r: Result<T, MapsError>) -> Result<T, MapsError> {
        let bad = inconsistencies(&self.inner.state);
        if let Some(first) = bad.into_iter().next() {
            self.seen.push(first);
        }
        r
    }
}

impl LbMaps for Watching {
    fn update_service(&mut self, k: Lb4Key, v: Lb4Service) -> Result<(), MapsError> {
        let r = self.inner.update_service(k, v);
        self.check(r)
    }
    fn delete_service(&mut self, k: Lb4Key) -> Result<(), MapsError> {
        let r = self.inner.delete_service(k);
        self.check(r)
    }
    fn update_backend(&mut self, id: u32, v: crate::layout::Lb4Backend) -> Result<(), MapsError> {
        let r = self.inner.update_backend(id, v);
        self.check(r)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        let r = self.inner.delete_backend(id);
        self.check(r)
    }
    fn update_revnat(&mut self, id: u32, v: Lb4ReverseNat) -> Result<(), MapsError> {
        let r = self.inner.update_revnat(id, v);
        self.check(r)
    }
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError> {
        let r = self.inner.delete_revnat(id);
        self.check(r)
    }
    fn update_aff_match(&mut self, k: Lb4AffinityMatch, s: u32) -> Result<(), MapsError> {
        let r = self.inner.update_aff_match(k, s);
        self.check(r)
    }
    fn delete_aff_match(&mut self, k: Lb4AffinityMatch) -> Result<(), MapsError> {
        let r = self.inner.delete_aff_match(k);
        self.check(r)
    }
    fn update_service6(
        &mut self,
        k: crate::layout::Lb6Key,
        v: Lb4Service,
    ) -> Result<(), MapsError> {
        let r = self.inner.update_service6(k, v);
        self.check(r)
    }
    fn delete_service6(&mut self, k: crate::layout::Lb6Key) -> Result<(), MapsError> {
        let r = self.inner.delete_service6(k);
        self.check(r)
    }
    fn update_backend6(&mut self, id: u32, v: crate::layout::Lb6Backend) -> Result<(), MapsError> {
        let r = self.inner.update_backend6(id, v);
        self.check(r)
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError> {
        let r = self.inner.delete_backend6(id);
        self.check(r)
    }
    fn update_revnat6(
        &mut self,
        id: u32,
        v: crate::layout::Lb6ReverseNat,
    ) -> Result<(), MapsError> {
        let r = self.inner.update_revnat6(id, v);
        self.check(r)
    }
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError> {
        let r = self.inner.delete_revnat6(id);
        self.check(r)
    }
    fn write_all(&mut self, ws: &[crate::maps::MapWrite]) -> Result<(), crate::maps::Stopped> {
        self.batches.push(ws.len());
        for (applied, w) in ws.iter().enumerate() {
            self.write(w)
                .map_err(|source| crate::maps::Stopped { applied, source })?;
        }
        Ok(())
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        self.inner.dump()
    }
}

/// Frontends `vip` 1..=n, each with `per` backends of its own, plus one
/// backend shared by all; the even ones with ClientIP affinity (so they
/// have memberships too).
fn many(n: u8, per: u8) -> DesiredTable {
    let shared = tcp([10, 244, 200, 1], 8080);
    table(
        &(1..=n)
            .map(|i| {
                let mut bes: Vec<(L4Addr, BackendState)> = (1..=per)
                    .map(|j| (tcp([10, 244, i, j], 8080), BackendState::Active))
                    .collect();
                bes.push((shared, BackendState::Active));
                let mut fe = frontend(tcp([10, 96, 7, i], 80), &format!("d/s{i}:"), &bes);
                if i % 2 == 0 {
                    fe.affinity_timeout = Some(10800);
                }
                fe
            })
            .collect::<Vec<_>>(),
    )
}

#[test]
fn a_batched_full_pass_never_shows_the_datapath_a_frontend_before_its_parts() {
    // Why: a full pass writes by map in batches (issue 18); slot 0 must
    // still come after its slots, reverse NAT and backends, and a removed
    // backend go only after no slot names it.
    let mut r = Reconciler::recover(Watching::default()).unwrap();
    let st = r.reconcile(&many(20, 4)).unwrap();
    // Backends; per frontend reverse NAT, 5 slots, slot 0; memberships
    // only for the 10 with affinity.
    assert_eq!(st.updates, 81 + 20 * (1 + 5 + 1) + 10 * 5);
    assert!(r.maps().seen.is_empty(), "{:?}", r.maps().seen);
    // Few map calls: one batch per phase, not one per write.
    assert!(r.maps().batches.len() <= 6, "{:?}", r.maps().batches);
    // Shrink, grow and move backends across frontends.
    let mut next = many(20, 2);
    for fe in next.frontends.values_mut().take(5) {
        fe.backends
            .insert(tcp([10, 244, 99, 9], 8080), BackendState::Active);
    }
    r.reconcile(&next).unwrap();
    assert!(r.maps().seen.is_empty(), "{:?}", r.maps().seen);
    r.reconcile(&many(3, 6)).unwrap();
    assert!(r.maps().seen.is_empty(), "{:?}", r.maps().seen);
    assert!(inconsistencies(&r.maps().inner.state).is_empty());
    assert_eq!(r.reconcile(&many(3, 6)).unwrap(), SyncStats::default());
}

#[test]
fn a_full_pass_planned_in_chunks_writes_what_one_plan_writes_never_a_partial_frontend() {
    // Why: a first pass plans and writes a chunk of writes at a time, so
    // 100k Services do not hold every write at once (issue 18); a frontend
    // is never split across chunks, and the result is the one-chunk pass's.
    let whole = {
        let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
        r.reconcile(&many(20, 4)).unwrap();
        r.maps().state.clone()
    };
    for chunk in [1, 5, 13] {
        let mut r = Reconciler::recover(Watching::default()).unwrap();
        r.set_plan_chunk(chunk);
        let st = r.reconcile(&many(20, 4)).unwrap();
        assert_eq!(st.updates, 81 + 20 * (1 + 5 + 1) + 10 * 5, "chunk {chunk}");
        assert!(
            r.maps().seen.is_empty(),
            "chunk {chunk}: {:?}",
            r.maps().seen
        );
        // Chunks, not one batch per phase: and no batch larger than a
        // chunk plus the one frontend that crossed its end (7 writes, or
        // 12 with memberships).
        let batches = &r.maps().batches;
        assert!(batches.len() > 6, "chunk {chunk}: {batches:?}");
        assert!(
            batches.iter().all(|n| *n <= chunk + 12),
            "chunk {chunk}: {batches:?}"
        );
        assert_eq!(normalized(&r.maps().inner.state), normalized(&whole));
        // And the next passes from that state, shrinking and growing.
        r.reconcile(&many(7, 6)).unwrap();
        assert!(
            r.maps().seen.is_empty(),
            "chunk {chunk}: {:?}",
            r.maps().seen
        );
        assert_eq!(r.reconcile(&many(7, 6)).unwrap(), SyncStats::default());
    }
}

#[test]
fn a_full_map_in_the_middle_of_a_batch_programs_what_fits_and_recovers() {
    // Why: a batch stops at the element that does not fit; the rest of the
    // batch and of that frontend must be handled as single writes would.
    let limits = crate::maps::memory::MapLimits {
        services: Some(30),
        ..Default::default()
    };
    let mut r = Reconciler::recover(MemoryMaps::with_limits(limits)).unwrap();
    let st = r.reconcile(&many(10, 4)).unwrap();
    assert!(st.updates > 0);
    assert!(!r.pressure().is_empty());
    assert!(r.needs_full());
    let state = &r.maps().state;
    assert!(
        inconsistencies(state).is_empty(),
        "{:?}",
        inconsistencies(state)
    );
    // What is programmed is whole frontends (6 entries each), the rest is
    // reported, and the mirror matches the maps exactly.
    let programmed = state.frontend_count();
    assert_eq!(programmed + r.pressure().frontends.len(), 10);
    assert!(programmed >= 4, "{programmed}");
    let again = Reconciler::recover(r.maps().clone()).unwrap();
    assert_eq!(again.programmed(), r.programmed());
    // Room again: the next full pass finishes the job.
    r.maps_mut().limits = Default::default();
    r.reconcile(&many(10, 4)).unwrap();
    assert!(r.pressure().is_empty() && !r.needs_full());
    assert_eq!(r.maps().state.frontend_count(), 10);
    assert_eq!(
        normalized(&r.maps().state),
        normalized(&{
            let mut fresh = Reconciler::recover(MemoryMaps::new()).unwrap();
            fresh.reconcile(&many(10, 4)).unwrap();
            fresh.maps().state.clone()
        })
    );
}

/// Full passes of `want` until one succeeds (at most `max_tries` failed):
/// after each failed one the mirror is what a fresh read of the maps gives,
/// and the maps are consistent. The failed passes.
fn converge_through_failures(
    r: &mut Reconciler<FaultyMaps>,
    want: &DesiredTable,
    max_tries: usize,
) -> usize {
    let mut tries = 0;
    while r.reconcile(want).is_err() {
        let fresh = Reconciler::recover(r.maps().clone()).unwrap();
        assert_eq!(
            fresh.programmed(),
            r.programmed(),
            "after {tries} failed passes"
        );
        assert!(inconsistencies(&r.maps().inner.state).is_empty());
        tries += 1;
        assert!(tries < max_tries, "no convergence in {max_tries} passes");
    }
    tries
}

#[test]
fn a_failed_batch_leaves_the_mirror_exact_and_ids_not_leaked() {
    // Why: "a failure leaves every earlier write applied" must hold per
    // write inside a batch, and ids of unwritten backends come back.
    for fail_every in [3, 7, 50, 101] {
        let mut r = Reconciler::recover(FaultyMaps::new(fail_every)).unwrap();
        converge_through_failures(&mut r, &many(12, 3), 500);
        assert_eq!(r.maps().inner.state.frontend_count(), 12);
        // Backend ids are dense: none was lost to a failed write.
        let ids: Vec<u32> = r.maps().inner.state.backends.keys().copied().collect();
        assert_eq!(
            ids,
            (1..=ids.len() as u32).collect::<Vec<_>>(),
            "fail_every {fail_every}"
        );
    }
}

/// `frontends` frontends of ten backends each, backend `k` for k in
/// `first..`, every `terminating`-th one terminating (0: none).
fn wide(frontends: u16, first: u16, terminating: u16) -> DesiredTable {
    let fes: Vec<Frontend> = (0..frontends)
        .map(|i| {
            let backends: Vec<(L4Addr, BackendState)> = (0..10)
                .map(|j| {
                    let k = first + i * 10 + j;
                    let state = if terminating > 0 && k.is_multiple_of(terminating) {
                        BackendState::Terminating
                    } else {
                        BackendState::Active
                    };
                    (tcp([10, 244, (k >> 8) as u8, k as u8], 8080), state)
                })
                .collect();
            frontend(
                tcp([10, 96, (i >> 8) as u8, i as u8], 80),
                &format!("d/w{i}:"),
                &backends,
            )
        })
        .collect();
    table(&fes)
}

#[test]
fn backends_recorded_in_bulk_are_what_single_inserts_record() {
    // Why: a pass records a large chunk of written backends by merging it
    // into the mirror; the mirror must still be exactly what the maps hold
    // (read back by a restart), also when the chunk overwrites backends
    // that were there.
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    for desired in [wide(300, 0, 0), wide(300, 1000, 3), wide(40, 0, 0)] {
        r.reconcile(&desired).unwrap();
        let recovered = Reconciler::recover(r.maps().clone()).unwrap();
        assert_eq!(recovered.backends, r.backends);
        assert_eq!(r.backends.len(), desired.backend_count());
        assert!(inconsistencies(&r.maps().state).is_empty());
        assert_eq!(r.reconcile(&desired).unwrap(), SyncStats::default());
    }
    let terminating = r
        .backends
        .values()
        .filter(|(_, s)| *s == crate::layout::BE_TERMINATING)
        .count();
    assert_eq!(terminating, 0);
}

#[test]
fn ipv4_slots_carry_their_backend_and_older_slots_are_rewritten() {
    // Why: connect() takes an IPv4 slot's backend from the slot itself
    // (lb.h, struct nb_lb4_service), so every IPv4 slot must carry its
    // backend's address and port; slots an older agent wrote without the
    // copy must be rewritten by the first pass after a restart.
    let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
    let desired = wide(50, 0, 0);
    r.reconcile(&desired).unwrap();
    let slots = |d: &MapsDump| d.services.keys().filter(|k| k.backend_slot > 0).count();
    let mut maps = r.maps().clone();
    let n = slots(&maps.state);
    assert_eq!(n, 500);
    assert!(inconsistencies(&maps.state).is_empty());
    for (k, v) in &maps.state.services {
        if k.backend_slot > 0 {
            let (ip, port) = v.slot_backend().expect("an IPv4 slot carries its backend");
            let b = maps.state.backends[&v.backend_id];
            assert_eq!(
                (ip, port),
                (b.l4().ip.to_string().parse().unwrap(), b.l4().port)
            );
        }
    }
    // An older agent's slots: the copy's fields zero.
    for (k, v) in maps.state.services.iter_mut() {
        if k.backend_slot > 0 {
            v.affinity_timeout = 0;
            v.count = 0;
        }
    }
    assert!(!inconsistencies(&maps.state).is_empty());
    let mut r = Reconciler::recover(maps).unwrap();
    let st = r.reconcile(&desired).unwrap();
    assert_eq!(
        st,
        SyncStats {
            updates: n as u64,
            deletes: 0
        }
    );
    assert!(inconsistencies(&r.maps().state).is_empty());
    assert_eq!(r.reconcile(&desired).unwrap(), SyncStats::default());
}

#[test]
fn a_slot_effect_is_no_larger_than_a_slot_0_one() {
    // Why: a full pass at 10k x 10 plans ~220,000 effects at once; the slot's
    // backend copy must not grow every one of them (an L4Addr in it did:
    // VmHWM +5 MiB at 10k).
    assert!(
        std::mem::size_of::<Effect>() <= 48,
        "{}",
        std::mem::size_of::<Effect>()
    );
}

#[test]
fn a_failed_pass_entering_frontends_and_backends_in_bulk_leaves_the_mirror_exact() {
    // Why: a full pass enters 1,024 or more new frontends, and the backends
    // it writes, into the mirror in one go; a write failing part way must
    // still leave the mirror what the maps hold, with no id lost.
    for fail_every in [997, 4001, 9973] {
        let mut r = Reconciler::recover(FaultyMaps::new(fail_every)).unwrap();
        r.set_plan_chunk(2000);
        let want = wide(1200, 0, 7);
        let tries = converge_through_failures(&mut r, &want, 100);
        assert!(tries > 0, "fail_every {fail_every}: no write failed");
        assert_eq!(r.maps().inner.state.frontend_count(), 1200);
        assert_eq!(r.programmed().backends, 12_000);
        let ids: Vec<u32> = r.maps().inner.state.backends.keys().copied().collect();
        assert_eq!(
            ids,
            (1..=12_000).collect::<Vec<_>>(),
            "fail_every {fail_every}"
        );
        // And what the next pass finds is what it left.
        let fresh = Reconciler::recover(r.maps().clone()).unwrap();
        assert_eq!(fresh.programmed(), r.programmed());
        assert_eq!(r.reconcile(&want).unwrap().writes(), 0);
    }
}
