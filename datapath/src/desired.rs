//! Desired-state tables: what the maps should hold, derived from Services and
//! EndpointSlices (pure functions, no I/O).
//!
//! Rules (kube-proxy's, for ClusterIP):
//! - ExternalName and headless (`clusterIP: None`) Services are ignored, and so
//!   are SCTP ports (socket LB here is TCP/UDP).
//! - Every cluster IP of `spec.clusterIPs` (IPv4 and IPv6: dual-stack) is a
//!   frontend; an IPv4 one takes its backends from the `addressType: IPv4`
//!   slices, an IPv6 one from the `IPv6` slices.
//! - One frontend per (cluster IP, port, protocol); its backends come from the
//!   EndpointSlices labelled `kubernetes.io/service-name`, matching the
//!   Service port by name (named/multi-port Services) and protocol.
//! - An endpoint with `ready` (nil = true) is active: it takes new connections.
//!   One that is `terminating` and still `serving` is kept as terminating: it
//!   stays reachable only through existing ClientIP affinity. Others are dropped.
//! - `sessionAffinity: ClientIP` → affinity with the Service's timeout, or the
//!   configured default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::layout::{L4Addr, BE_ACTIVE, BE_TERMINATING, PROTO_TCP, PROTO_UDP};

/// State of a backend of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum BackendState {
    /// Ready: new connections.
    Active,
    /// Terminating but serving: existing affinity only.
    Terminating,
}

impl BackendState {
    /// The `NB_BE_*` value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Active => BE_ACTIVE,
            Self::Terminating => BE_TERMINATING,
        }
    }
}

/// One service frontend (cluster IP, port, protocol).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frontend {
    /// VIP:port/proto.
    pub addr: L4Addr,
    /// `namespace/name:port-name` (port name may be empty).
    pub name: String,
    /// ClientIP affinity timeout in seconds, if the Service asks for affinity.
    pub affinity_timeout: Option<u32>,
    /// Backends and their state.
    pub backends: BTreeMap<L4Addr, BackendState>,
}

/// All frontends the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredTable {
    /// By frontend address.
    pub frontends: BTreeMap<L4Addr, Frontend>,
}

impl DesiredTable {
    /// Adds (or replaces) a frontend.
    pub fn insert(&mut self, fe: Frontend) {
        self.frontends.insert(fe.addr, fe);
    }

    /// Number of distinct backends.
    pub fn backend_count(&self) -> usize {
        let mut all: Vec<&L4Addr> = self
            .frontends
            .values()
            .flat_map(|f| f.backends.keys())
            .collect();
        all.sort();
        all.dedup();
        all.len()
    }
}

/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn proto_of(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

/// A Service's key: (namespace, name).
pub type ServiceKey = (String, String);

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name`
/// label), whatever its address type; None without the label.
pub fn slice_service(s: &EndpointSlice) -> Option<ServiceKey> {
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        s.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

/// Whether slice `s` is labelled as belonging to Service `ns/name` (as
/// [`slice_service`], without building the key).
fn slice_belongs_to(s: &EndpointSlice, ns: &str, name: &str) -> bool {
    s.metadata.namespace.as_deref().unwrap_or_default() == ns
        && s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|v| v == name)
}

/// The key of a Service, None if it has no name.
pub fn service_key(svc: &Service) -> Option<ServiceKey> {
    Some((
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone()?,
    ))
}

/// Builds the desired table from every Service and EndpointSlice: the union
/// of [`service_frontends`] over the Services, in order (a later Service
/// wins a frontend address two of them claim).
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    default_affinity_timeout: u32,
) -> DesiredTable {
    // Slices by (namespace, service name).
    let mut by_svc: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(k) = slice_service(s) {
            by_svc.entry(k).or_default().push(s);
        }
    }
    let mut table = DesiredTable::default();
    for svc in services {
        let slices = service_key(svc)
            .and_then(|k| by_svc.get(&k))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for fe in service_frontends(svc, slices.iter().copied(), default_affinity_timeout) {
            table.insert(fe);
        }
    }
    table
}

/// The frontends of one Service, from the Service and its EndpointSlices
/// (slices whose `kubernetes.io/service-name` is not this Service, or that
/// are not IPv4, are skipped). The one place the rules above live.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    default_affinity_timeout: u32,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    let Some(key) = service_key(svc) else {
        return out;
    };
    let (ns, name) = &key;
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return out;
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = spec.cluster_ip.as_deref() {
            ips.push(ip);
        }
    }
    let ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    if ips.is_empty() {
        return out; // headless ("None") or unallocated
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(default_affinity_timeout)
    });
    let (slices4, slices6): (Vec<&EndpointSlice>, Vec<&EndpointSlice>) = slices
        .into_iter()
        .filter(|s| {
            (s.address_type == "IPv4" || s.address_type == "IPv6") && slice_belongs_to(s, ns, name)
        })
        .partition(|s| s.address_type == "IPv4");
    for port in spec.ports.iter().flatten() {
        let Some(proto) = proto_of(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(vport) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let backends4 = backends_for(&slices4, &port_name, proto, false);
        let backends6 = backends_for(&slices6, &port_name, proto, true);
        for ip in &ips {
            let backends = if ip.is_ipv6() { &backends6 } else { &backends4 };
            let addr = L4Addr {
                ip: *ip,
                port: vport,
                proto,
            };
            // A later port with the same (ip, port, proto) wins, as in a table.
            out.retain(|f: &Frontend| f.addr != addr);
            out.push(Frontend {
                addr,
                name: format!("{ns}/{name}:{port_name}"),
                affinity_timeout,
                backends: backends.clone(),
            });
        }
    }
    out
}

/// The desired frontends kept per Service, so that a change to some Services
/// yields only the frontend addresses it touches ([`ServiceTable::set`]) and
/// what each of them should now be ([`ServiceTable::changes`]).
///
/// Two Services claiming one address resolve as in [`build`] over Services
/// sorted by key: the greatest key wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    by_service: BTreeMap<ServiceKey, Vec<Frontend>>,
    /// Address → the Services claiming it.
    claims: BTreeMap<L4Addr, BTreeSet<ServiceKey>>,
}

/// What some frontend addresses should now hold (None: remove).
pub type FrontendChanges = BTreeMap<L4Addr, Option<Frontend>>;

impl ServiceTable {
    /// Replaces the frontends of Service `key` (empty: the Service is gone
    /// or has none); returns the addresses it had or has now.
    pub fn set(&mut self, key: ServiceKey, frontends: Vec<Frontend>) -> BTreeSet<L4Addr> {
        let mut touched = BTreeSet::new();
        if let Some(old) = self.by_service.remove(&key) {
            for fe in old {
                if let Some(c) = self.claims.get_mut(&fe.addr) {
                    c.remove(&key);
                    if c.is_empty() {
                        self.claims.remove(&fe.addr);
                    }
                }
                touched.insert(fe.addr);
            }
        }
        if !frontends.is_empty() {
            for fe in &frontends {
                self.claims.entry(fe.addr).or_default().insert(key.clone());
                touched.insert(fe.addr);
            }
            self.by_service.insert(key, frontends);
        }
        touched
    }

    /// The frontend address `addr` should hold.
    pub fn frontend(&self, addr: &L4Addr) -> Option<&Frontend> {
        let owner = self.claims.get(addr)?.last()?;
        self.by_service.get(owner)?.iter().find(|f| f.addr == *addr)
    }

    /// What each of `addrs` should now hold.
    pub fn changes<'a>(&self, addrs: impl IntoIterator<Item = &'a L4Addr>) -> FrontendChanges {
        addrs
            .into_iter()
            .map(|a| (*a, self.frontend(a).cloned()))
            .collect()
    }

    /// The frontends of one Service, as last set.
    pub fn service(&self, key: &ServiceKey) -> &[Frontend] {
        self.by_service.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Number of frontend addresses.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// No frontends.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// The whole desired table.
    pub fn table(&self) -> DesiredTable {
        DesiredTable {
            frontends: self
                .claims
                .keys()
                .filter_map(|a| self.frontend(a).map(|f| (*a, f.clone())))
                .collect(),
        }
    }
}

/// Backends of one port from slices of one family (`v6`: IPv6 addresses).
fn backends_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: u8,
    v6: bool,
) -> BTreeMap<L4Addr, BackendState> {
    let mut out: BTreeMap<L4Addr, BackendState> = BTreeMap::new();
    for s in slices {
        for p in s.ports.iter().flatten() {
            if p.name.as_deref().unwrap_or("") != port_name
                || proto_of(p.protocol.as_deref()) != Some(proto)
            {
                continue;
            }
            let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for ep in s.endpoints.iter().flatten() {
                let Some(ip) = ep
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .filter(|a| a.is_ipv6() == v6)
                else {
                    continue;
                };
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let state = if ready && !terminating {
                    BackendState::Active
                } else if terminating && serving {
                    BackendState::Terminating
                } else {
                    continue;
                };
                let addr = L4Addr { ip, port, proto };
                let e = out.entry(addr).or_insert(state);
                if state < *e {
                    *e = state; // Active wins over Terminating across slices.
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PROTO_TCP;

    pub(crate) fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }
    pub(crate) fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn headless_and_external_name_are_ignored() {
        let a =
            svc("metadata: {name: h, namespace: d}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        let b = svc("metadata: {name: e, namespace: d}\nspec: {type: ExternalName, externalName: x.example, ports: [{port: 80}]}");
        assert!(build([&a, &b], [], 10800).frontends.is_empty());
    }

    #[test]
    fn terminating_not_serving_is_dropped_and_ready_nil_is_ready() {
        let s = svc("metadata: {name: w, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80, targetPort: 8080}]}");
        let sl = slice(
            "metadata: {name: w-1, namespace: d, labels: {kubernetes.io/service-name: w}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.1]}
- {addresses: [10.244.0.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.3], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.244.0.4], conditions: {ready: false}}
",
        );
        let t = build([&s], [&sl], 10800);
        let fe = t.frontends.values().next().unwrap();
        let states: Vec<_> = fe
            .backends
            .iter()
            .map(|(a, s)| (a.ip.to_string(), *s))
            .collect();
        assert_eq!(
            states,
            vec![
                ("10.244.0.1".into(), BackendState::Active),
                ("10.244.0.2".into(), BackendState::Terminating)
            ]
        );
        assert_eq!(fe.addr.proto, PROTO_TCP);
    }

    #[test]
    fn per_service_frontends_are_the_full_build_sliced_by_service() {
        let (svcs, slices) =
            crate::reconcile::tests_fixture(include_str!("../testdata/cluster.yaml"));
        let full = build(&svcs, &slices, 10800);
        let mut union = DesiredTable::default();
        let mut table = ServiceTable::default();
        for s in &svcs {
            let fes = service_frontends(s, &slices, 10800);
            let (ns, name) = service_key(s).unwrap();
            for fe in &fes {
                assert!(fe.name.starts_with(&format!("{ns}/{name}:")));
                assert_eq!(full.frontends.get(&fe.addr), Some(fe));
            }
            for fe in fes.clone() {
                union.insert(fe);
            }
            table.set((ns, name), fes);
        }
        assert_eq!(union, full);
        assert_eq!(table.table(), full);
        assert_eq!(table.len(), full.frontends.len());
    }

    #[test]
    fn two_services_on_one_address_resolve_as_the_full_build() {
        // Why: a partial pass must pick the same owner as a full one, also after the owner goes.
        let a = svc(
            "metadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
        );
        let b = svc("metadata: {name: b, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}, {port: 81}]}");
        let full = build([&a, &b], [], 10800);
        let mut t = ServiceTable::default();
        let ka = service_key(&a).unwrap();
        let kb = service_key(&b).unwrap();
        t.set(kb.clone(), service_frontends(&b, [], 10800));
        let touched = t.set(ka.clone(), service_frontends(&a, [], 10800));
        assert_eq!(t.table(), full);
        assert_eq!(touched.len(), 1);
        let fe80 = *touched.iter().next().unwrap();
        assert_eq!(t.frontend(&fe80).unwrap().name, "d/b:");
        // b goes: a's frontend takes the address; 81 goes.
        let touched = t.set(kb, Vec::new());
        assert_eq!(touched.len(), 2);
        let ch = t.changes(&touched);
        assert_eq!(ch[&fe80].as_ref().unwrap().name, "d/a:");
        assert_eq!(ch.values().filter(|c| c.is_none()).count(), 1);
        assert_eq!(t.table(), build([&a], [], 10800));
        assert_eq!(t.service(&ka).len(), 1);
    }
}
