//! One reconcile pass of the agent, from what the watchers marked dirty to
//! the reconciler (after Cilium's per-Service reconcile):
//! - full: at start, after a (re)list or a static load, after a resync from
//!   the maps or a failed pass: every Service's frontends are rebuilt and the
//!   reconciler diffs them all;
//! - partial: only the dirty Services' frontends are rebuilt, and the
//!   reconciler writes only the frontend addresses they had or have now;
//! - idle: nothing changed, nothing is done.
//!
//! The trigger times of the changes a pass takes are kept until a pass
//! succeeds (a failed one is retried as a full pass) and then reported with
//! the moment its map writes completed ([`PassReport::programmed`]).

use std::collections::BTreeMap;
use std::time::SystemTime;

use netboot_contract::features::Feature;
use serde::Serialize;

use crate::desired::{ServiceKey, ServiceTable};
use crate::latency::Triggered;
use crate::maps::LbMaps;
use crate::reconcile::{ReconcileError, Reconciler, SyncStats};
use crate::watch::Watched;

/// What a pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PassKind {
    /// Every Service.
    Full,
    /// Only these many dirty Services.
    Partial(usize),
    /// Nothing changed.
    Idle,
}

/// Outcome of one pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// Full, partial or idle.
    pub kind: PassKind,
    /// Writes.
    pub stats: SyncStats,
    /// Frontends desired after the pass.
    pub desired_frontends: usize,
    /// The changes this pass programmed that have a trigger time after the
    /// passes began (older ones, e.g. of the initial list, are not measured,
    /// as in kube-proxy), and when their map writes completed.
    #[serde(skip)]
    pub programmed: Programmed,
}

/// Changes whose map writes completed, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    /// The changes.
    pub changes: Vec<Triggered>,
    /// When the pass's last map write returned.
    pub at: SystemTime,
}

/// The desired frontends per Service, kept between passes, and the Services
/// this agent cannot fully serve (kept the same way: all of them on a full
/// pass, the dirty ones on a partial one).
#[derive(Debug)]
pub struct Passes {
    table: ServiceTable,
    unserved: BTreeMap<ServiceKey, Vec<Feature>>,
    /// Changes before this are not measured (kube-proxy's trackerStartTime).
    since: SystemTime,
    /// Taken, not yet programmed (a failed pass keeps them).
    pending: Vec<Triggered>,
    /// The clock (tests give a fake one).
    clock: fn() -> SystemTime,
}

impl Default for Passes {
    fn default() -> Self {
        Passes::with_clock(SystemTime::now)
    }
}

impl Passes {
    /// Passes measuring changes with `clock` from its current time on.
    pub fn with_clock(clock: fn() -> SystemTime) -> Self {
        Passes {
            table: ServiceTable::default(),
            unserved: BTreeMap::new(),
            since: clock(),
            pending: Vec::new(),
            clock,
        }
    }

    fn programmed(&mut self) -> Programmed {
        Programmed {
            changes: std::mem::take(&mut self.pending),
            at: (self.clock)(),
        }
    }

    /// The desired frontends per Service as of the last pass.
    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// The Services needing something this agent does not serve, with what.
    pub fn unserved(&self) -> &BTreeMap<ServiceKey, Vec<Feature>> {
        &self.unserved
    }

    /// One pass: takes what changed from `watched` and makes the maps match.
    /// On error call again (with backoff): the next pass is a full one.
    pub fn run<M: LbMaps>(
        &mut self,
        watched: &Watched,
        recon: &mut Reconciler<M>,
        default_affinity_timeout: u32,
    ) -> Result<PassReport, ReconcileError> {
        let dirty = watched.take_dirty();
        let since = self.since;
        self.pending.extend(
            dirty
                .triggers
                .into_values()
                .flatten()
                .filter(|t| t.at > since),
        );
        if dirty.full || recon.needs_full() {
            self.table = watched.service_table(default_affinity_timeout);
            self.unserved = watched.unserved();
            let shared = self.table.shared_table();
            let stats = recon.reconcile_shared(shared)?;
            return Ok(PassReport {
                kind: PassKind::Full,
                stats,
                desired_frontends: self.table.len(),
                programmed: self.programmed(),
            });
        }
        if dirty.services.is_empty() {
            return Ok(PassReport {
                kind: PassKind::Idle,
                stats: SyncStats::default(),
                desired_frontends: self.table.len(),
                programmed: self.programmed(),
            });
        }
        for (k, missing) in watched.unserved_of(&dirty.services) {
            match missing {
                Some(m) => self.unserved.insert(k, m),
                None => self.unserved.remove(&k),
            };
        }
        let mut touched = std::collections::BTreeSet::new();
        for (k, fes) in watched.frontends_of(&dirty.services, default_affinity_timeout) {
            touched.extend(self.table.set(k, fes));
        }
        let stats = recon.apply(&self.table.changes(&touched))?;
        Ok(PassReport {
            kind: PassKind::Partial(dirty.services.len()),
            stats,
            desired_frontends: self.table.len(),
            programmed: self.programmed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;
    use crate::maps::memory::MemoryMaps;
    use crate::reconcile::tests_normalized as normalized;

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len() as u64) as usize]
        }
    }

    const SERVICES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
    const SLICES: [&str; 6] = ["e0", "e1", "e2", "e3", "e4", "e5"];

    /// A Service on a small pool of cluster IPs (so two Services sometimes
    /// claim one address), sometimes headless or with affinity.
    fn service(r: &mut Rng, name: &str) -> Service {
        let ip = r.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "None", "fd00::1"]);
        let ports = r.pick(&[
            "[{name: http, port: 80}]",
            "[{name: http, port: 80}, {name: s, port: 9, protocol: SCTP}]",
            "[{name: dns, port: 53, protocol: UDP}]",
            "[{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]",
        ]);
        let aff = r.pick(&["", ", sessionAffinity: ClientIP"]);
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: d}}\nspec: {{clusterIP: {ip}, ports: {ports}{aff}}}"
        ))
        .unwrap()
    }

    /// A slice for a random Service (or none), with endpoints on a small
    /// pool of IPs (so backends are shared) in random states.
    fn slice(r: &mut Rng, name: &str) -> EndpointSlice {
        let owner = r.pick(&["s0", "s1", "s2", "s3", "s4", "-"]);
        let labels = if owner == "-" {
            String::new()
        } else {
            format!(", labels: {{kubernetes.io/service-name: {owner}}}")
        };
        let mut eps = Vec::new();
        for _ in 0..=r.below(3) {
            let ip = r.pick(&["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"]);
            let cond = r.pick(&[
                "{}",
                "{ready: true}",
                "{ready: false, serving: true, terminating: true}",
                "{ready: false}",
            ]);
            eps.push(format!("{{addresses: [{ip}], conditions: {cond}}}"));
        }
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: d{labels}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 53, protocol: UDP}}]\nendpoints: [{}]",
            eps.join(", ")
        ))
        .unwrap()
    }

    fn full_state(w: &Watched) -> Vec<String> {
        let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
        r.reconcile(&w.desired(10800)).unwrap();
        normalized(&r.maps().state)
    }

    #[test]
    fn random_changes_applied_incrementally_match_a_full_reconcile() {
        for seed in 1..=8u64 {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let w = Watched::default();
            let mut recon = Reconciler::recover(MemoryMaps::new()).unwrap();
            let mut passes = Passes::default();
            let svcs: Vec<Service> = SERVICES.iter().map(|n| service(&mut r, n)).collect();
            let slices: Vec<EndpointSlice> = SLICES.iter().map(|n| slice(&mut r, n)).collect();
            w.replace_all(svcs, slices);
            let p = passes.run(&w, &mut recon, 10800).unwrap();
            assert_eq!(p.kind, PassKind::Full);
            let mut partial = 0;
            for step in 0..150 {
                for _ in 0..=r.below(2) {
                    let (svc, sl) = (r.pick(&SERVICES), r.pick(&SLICES));
                    match r.below(9) {
                        0..=2 => w.apply_service(service(&mut r, svc)),
                        3 => w.delete_service(&service(&mut r, svc)),
                        4..=6 => w.apply_slice(slice(&mut r, sl)),
                        _ => w.delete_slice(&slice(&mut r, sl)),
                    }
                }
                let p = passes.run(&w, &mut recon, 10800).unwrap();
                assert!(
                    matches!(p.kind, PassKind::Partial(_) | PassKind::Idle),
                    "{p:?}"
                );
                partial += usize::from(matches!(p.kind, PassKind::Partial(_)));
                let ctx = format!("seed {seed} step {step}");
                assert_eq!(passes.table().table(), w.desired(10800), "{ctx}");
                assert_eq!(passes.unserved(), &w.unserved(), "{ctx}");
                assert_eq!(normalized(&recon.maps().state), full_state(&w), "{ctx}");
                // A full pass on top finds nothing to do.
                if step % 25 == 24 {
                    assert_eq!(
                        recon.reconcile(&w.desired(10800)).unwrap(),
                        SyncStats::default(),
                        "{ctx}"
                    );
                }
            }
            assert!(partial > 100, "seed {seed}: {partial} partial passes");
            assert_eq!(
                passes.run(&w, &mut recon, 10800).unwrap().kind,
                PassKind::Idle
            );
        }
    }

    thread_local! {
        static NOW: std::cell::Cell<SystemTime> = const { std::cell::Cell::new(SystemTime::UNIX_EPOCH) };
    }

    fn fake_now() -> SystemTime {
        NOW.with(|n| n.get())
    }

    fn set_now(secs: f64) {
        NOW.with(|n| n.set(at(secs)));
    }

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs)
    }

    /// A slice of Service `a` with one endpoint and a trigger time (seconds).
    fn timed_slice(name: &str, ip: &str, trigger: f64) -> EndpointSlice {
        let t = k8s_openapi::jiff::Timestamp::try_from(at(trigger)).unwrap();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: d, labels: {{kubernetes.io/service-name: a}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{t}'}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]"
        ))
        .unwrap()
    }

    fn svc_a() -> Service {
        serde_yaml::from_str(
            "metadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}",
        )
        .unwrap()
    }

    fn triggers(p: &PassReport) -> Vec<f64> {
        p.programmed
            .changes
            .iter()
            .map(|t| {
                t.at.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            })
            .collect()
    }

    #[test]
    fn a_change_is_measured_from_its_trigger_time_to_the_end_of_its_pass() {
        set_now(100.0);
        let w = Watched::default();
        let mut recon = Reconciler::recover(crate::maps::faulty::FaultyMaps::new(0)).unwrap();
        let mut passes = Passes::with_clock(fake_now);
        // The initial list: triggered before the agent started, not measured.
        w.replace_all(vec![svc_a()], vec![timed_slice("a-1", "10.244.0.1", 50.0)]);
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!((p.kind, triggers(&p)), (PassKind::Full, vec![]));

        // An endpoint added at 199.5, written by the pass ending at 200.
        w.apply_slice(timed_slice("a-1", "10.244.0.2", 199.5));
        set_now(200.0);
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!(p.kind, PassKind::Partial(1));
        assert_eq!((triggers(&p), p.programmed.at), (vec![199.5], at(200.0)));

        // A failed pass keeps the change; the full pass that writes it reports it.
        w.apply_slice(timed_slice("a-1", "10.244.0.3", 300.0));
        recon.maps_mut().fail_every = 1;
        assert!(passes.run(&w, &mut recon, 10800).is_err());
        recon.maps_mut().fail_every = 0;
        set_now(302.0);
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!((p.kind, triggers(&p)), (PassKind::Full, vec![300.0]));
        assert_eq!(p.programmed.at, at(302.0));

        // Two updates in one pass: both; a deleted slice drops its Service's
        // pending ones (its annotation is not this change's time).
        w.apply_slice(timed_slice("a-2", "10.244.0.4", 400.0));
        w.apply_slice(timed_slice("a-2", "10.244.0.5", 401.0));
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!(triggers(&p), vec![400.0, 401.0]);
        w.apply_slice(timed_slice("a-2", "10.244.0.6", 500.0));
        w.delete_slice(&timed_slice("a-2", "10.244.0.6", 500.0));
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!((p.kind, triggers(&p)), (PassKind::Partial(1), vec![]));
        // Nothing pending afterwards.
        let p = passes.run(&w, &mut recon, 10800).unwrap();
        assert_eq!((p.kind, triggers(&p)), (PassKind::Idle, vec![]));

        // A relist reports the objects it changed or added, not the others.
        let mut same = timed_slice("a-1", "10.244.0.3", 300.0);
        same.metadata.resource_version = Some("7".into());
        w.replace_all(vec![svc_a()], vec![same.clone()]);
        passes.run(&w, &mut recon, 10800).unwrap();
        let mut newer = timed_slice("a-1", "10.244.0.7", 600.0);
        newer.metadata.resource_version = Some("8".into());
        w.replace_all(
            vec![svc_a()],
            vec![same.clone(), timed_slice("a-3", "10.244.0.8", 601.0)],
        );
        assert_eq!(
            triggers(&passes.run(&w, &mut recon, 10800).unwrap()),
            vec![601.0]
        );
        w.replace_all(vec![svc_a()], vec![newer]);
        assert_eq!(
            triggers(&passes.run(&w, &mut recon, 10800).unwrap()),
            vec![600.0]
        );
    }

    #[test]
    fn a_failed_pass_is_followed_by_a_full_one() {
        let mut r = Rng(7);
        let w = Watched::default();
        let mut recon = Reconciler::recover(crate::maps::faulty::FaultyMaps::new(0)).unwrap();
        let mut passes = Passes::default();
        w.replace_all(
            SERVICES.iter().map(|n| service(&mut r, n)).collect(),
            SLICES.iter().map(|n| slice(&mut r, n)).collect(),
        );
        assert_eq!(
            passes.run(&w, &mut recon, 10800).unwrap().kind,
            PassKind::Full
        );
        recon.maps_mut().fail_every = 2;
        let mut failed = false;
        for _ in 0..20 {
            w.apply_slice(slice(&mut r, "e0"));
            w.apply_service(service(&mut r, "s1"));
            failed |= passes.run(&w, &mut recon, 10800).is_err();
            if failed {
                break;
            }
        }
        assert!(failed);
        recon.maps_mut().fail_every = 0;
        assert_eq!(
            passes.run(&w, &mut recon, 10800).unwrap().kind,
            PassKind::Full
        );
        assert_eq!(normalized(&recon.maps().inner.state), full_state(&w));
    }
}
