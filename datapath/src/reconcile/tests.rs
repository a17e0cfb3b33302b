//! Reconciler unit tests against the in-memory and faulty map backends, with
//! golden map dumps (insta snapshots under `snapshots/`).

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::*;
use crate::desired::{build, Frontend};
use crate::layout::{Lb4Key, PROTO_TCP};
use crate::maps::faulty::FaultyMaps;
use crate::maps::memory::MemoryMaps;

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
        ip: Ipv4Addr::from(ip),
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
    });
    r2.reconcile(&d).unwrap();
    let id = r2.service_id(&fe).unwrap();
    let ids: BTreeSet<u16> = r2.maps().state.revnat.keys().copied().collect();
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
