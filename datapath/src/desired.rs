//! Desired-state tables: what the maps should hold, derived from Services and
//! EndpointSlices (pure functions, no I/O).
//!
//! Rules (kube-proxy's, for ClusterIP):
//! - ExternalName and headless (`clusterIP: None`) Services are ignored, and so
//!   are IPv6 cluster IPs and SCTP ports (socket LB here is IPv4 TCP/UDP).
//! - One frontend per (cluster IP, port, protocol); its backends come from the
//!   EndpointSlices labelled `kubernetes.io/service-name`, matching the
//!   Service port by name (named/multi-port Services) and protocol.
//! - An endpoint with `ready` (nil = true) is active: it takes new connections.
//!   One that is `terminating` and still `serving` is kept as terminating: it
//!   stays reachable only through existing ClientIP affinity. Others are dropped.
//! - `sessionAffinity: ClientIP` → affinity with the Service's timeout, or the
//!   configured default.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

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

/// Builds the desired table from every Service and EndpointSlice.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    default_affinity_timeout: u32,
) -> DesiredTable {
    // Slices by (namespace, service name).
    let mut by_svc: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        by_svc.entry((ns, svc.clone())).or_default().push(s);
    }

    let mut table = DesiredTable::default();
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let Some(name) = svc.metadata.name.clone() else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
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
        let ips: Vec<Ipv4Addr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        if ips.is_empty() {
            continue; // headless ("None"), unallocated or IPv6-only
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
        let slices = by_svc
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for port in spec.ports.iter().flatten() {
            let Some(proto) = proto_of(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(vport) = u16::try_from(port.port) else {
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let backends = backends_for(slices, &port_name, proto);
            for ip in &ips {
                let addr = L4Addr {
                    ip: *ip,
                    port: vport,
                    proto,
                };
                table.insert(Frontend {
                    addr,
                    name: format!("{ns}/{name}:{port_name}"),
                    affinity_timeout,
                    backends: backends.clone(),
                });
            }
        }
    }
    table
}

fn backends_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: u8,
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
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
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
}
