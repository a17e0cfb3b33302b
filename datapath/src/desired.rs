//! Desired-state tables: what the maps should hold, derived from Services and
//! EndpointSlices (pure functions, no I/O).
//!
//! Rules (kube-proxy's, for ClusterIP; pkg/proxy/topology.go
//! `CategorizeEndpoints`):
//! - Services kube-proxy skips are skipped ([`netboot_contract::features`]):
//!   labelled `service.kubernetes.io/service-proxy-name` (any value) or
//!   `service.kubernetes.io/headless`, ExternalName, headless
//!   (`clusterIP: None`). SCTP ports are not translated (socket LB here is
//!   TCP/UDP); such Services are counted as unserved ([`unserved`]).
//! - Every cluster IP of `spec.clusterIPs` (IPv4 and IPv6: dual-stack) is a
//!   frontend; an IPv4 one takes its backends from the `addressType: IPv4`
//!   slices, an IPv6 one from the `IPv6` slices.
//! - One frontend per (cluster IP, port, protocol); its backends come from the
//!   EndpointSlices labelled `kubernetes.io/service-name`, matching the
//!   Service port by name (named/multi-port Services) and protocol.
//! - Endpoint conditions (KEP-1669): `ready` (nil = true) endpoints take new
//!   connections. With none usable, the `serving` and `terminating` ones
//!   do. While ready ones exist, serving-terminating endpoints are kept as
//!   [`BackendState::Terminating`]: reachable only through existing ClientIP
//!   affinity, never picked for a new connection. Others are dropped.
//! - `internalTrafficPolicy: Local`: only endpoints whose `nodeName` is this
//!   agent's node (ready ones, else serving-terminating ones). With none, the
//!   frontend has no backend: connections are refused at once. kube-proxy
//!   DROPs that traffic instead (the client times out); neither falls back to
//!   other nodes.
//! - Topology (`trafficDistribution: PreferClose`/`PreferSameZone`, the
//!   topology-mode annotation, `PreferSameNode`): the EndpointSlice hints
//!   decide, as in kube-proxy. If every ready endpoint has node hints and one
//!   names this node, only endpoints hinted for this node; else if every
//!   ready endpoint has zone hints and one names this node's zone
//!   (`topology.kubernetes.io/zone`), only those; else all. Not applied with
//!   `internalTrafficPolicy: Local`.
//! - `sessionAffinity: ClientIP` → affinity with the Service's timeout, or the
//!   configured default.
//! - North–south addresses, per family the Service has a cluster IP of:
//!   each port's `nodePort` on every node address (`status.addresses`
//!   InternalIP/ExternalIP, [`node_addresses`]) and on 127.0.0.1 (IPv4, as
//!   kube-proxy's iptables `localhostNodePorts`); `spec.externalIPs` and
//!   `status.loadBalancer.ingress[].ip` with `ipMode` unset or `VIP` on the
//!   Service port. Each is a frontend of its own, keyed by that address. A
//!   local socket is in-cluster traffic: kube-proxy short-circuits it to the
//!   cluster endpoints whatever `externalTrafficPolicy` says, and
//!   `internalTrafficPolicy` does not apply to external addresses, so these
//!   frontends hold the cluster endpoints (topology applied).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use netboot_contract::features::{self, Feature};
use serde::Serialize;

use crate::layout::{L4Addr, BE_ACTIVE, BE_TERMINATING, PROTO_TCP, PROTO_UDP};
use crate::service::Svc;
use crate::slice::{Slice, SliceEndpoint, SliceFamily};

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
    /// A NodePort, externalIP or LB IP frontend: served to traffic from
    /// outside the node by the per-packet path too. None: a ClusterIP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
}

/// What the per-packet path needs of an external frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct External {
    /// `externalTrafficPolicy: Local`: traffic from outside goes only to
    /// [`External::local`], with the client's address; none: dropped.
    pub local_only: bool,
    /// The active backends whose endpoint is on this node (`nodeName`).
    pub local: BTreeSet<L4Addr>,
    /// An LB IP of a `LoadBalancer` Service with
    /// `spec.loadBalancerSourceRanges`: the CIDRs of the LB IP's family
    /// (address with its host bits cleared, mask length) new flows from
    /// outside must come from (kube-proxy's firewall chain), plus, as
    /// kube-proxy allows, the LB IPs themselves when a range holds one of the
    /// node's addresses. Empty: no restriction.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// `spec.loadBalancerSourceRanges` as CIDRs of both families (ones that do
/// not parse are left out; the API server validates the field, so a bad
/// entry is not expected), host bits cleared; plus, per family, the
/// Service's LB IPs of that family as /32 or /128 when a range of it holds
/// one of `node_ips` (a node's own request to a VIP bound locally comes back
/// with the VIP as its source: kube-proxy's `allowFromNode`). Each LB IP
/// frontend takes the ranges of its own family, as kube-proxy's proxier of
/// that family does: none of its family means no restriction for it.
pub fn source_ranges(svc: &Service, node_ips: &[IpAddr]) -> Vec<(IpAddr, u8)> {
    ranges_of(&Svc::from(svc), node_ips)
}

/// [`source_ranges`] of a Service as the agent keeps it.
fn ranges_of(svc: &Svc, node_ips: &[IpAddr]) -> Vec<(IpAddr, u8)> {
    if svc.type_.as_deref() != Some("LoadBalancer") {
        return Vec::new();
    }
    let mut out: Vec<(IpAddr, u8)> = Vec::new();
    let (mut holds_node4, mut holds_node6) = (false, false);
    for r in svc.source_ranges() {
        let r = r.trim();
        let Ok(net) = r
            .parse::<ipnet::IpNet>()
            .or_else(|_| r.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(|n| n.trunc())
        else {
            continue;
        };
        let holds = node_ips.iter().any(|ip| net.contains(ip));
        match net {
            ipnet::IpNet::V4(_) => holds_node4 |= holds,
            ipnet::IpNet::V6(_) => holds_node6 |= holds,
        }
        out.push((net.network(), net.prefix_len()));
    }
    if out.is_empty() {
        return out;
    }
    for ip in svc
        .ingress()
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok())
    {
        match ip {
            IpAddr::V4(_) if holds_node4 => out.push((ip, 32)),
            IpAddr::V6(_) if holds_node6 => out.push((ip, 128)),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
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

/// What the rules need besides the objects: the affinity default and where
/// this agent runs. A bare timeout (`10800.into()`) is the rules of no
/// particular node: no endpoint is local, no zone, no node address (so no
/// NodePort frontend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules<'r> {
    /// ClientIP affinity timeout for Services that set none.
    pub default_affinity_timeout: u32,
    /// This agent's Node (`internalTrafficPolicy: Local`, node hints).
    pub node: &'r str,
    /// Its `topology.kubernetes.io/zone` label (zone hints).
    pub zone: Option<&'r str>,
    /// Its addresses (`status.addresses` of type InternalIP and ExternalIP,
    /// [`node_addresses`]): where NodePorts are served, with
    /// [`LOCALHOST_NODEPORT`].
    pub node_ips: &'r [IpAddr],
}

impl From<u32> for Rules<'static> {
    fn from(default_affinity_timeout: u32) -> Self {
        Rules {
            default_affinity_timeout,
            node: "",
            zone: None,
            node_ips: &[],
        }
    }
}

/// NodePorts are also served on this address when the node has an IPv4
/// address, as kube-proxy's iptables mode does (`localhostNodePorts`, on by
/// default; IPv4 only). Only `127.0.0.1`, not the rest of 127.0.0.0/8.
pub const LOCALHOST_NODEPORT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The Node address types NodePorts are served on.
pub const NODE_ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// A Node's addresses NodePorts are served on: every parseable
/// `status.addresses` entry of a type in [`NODE_ADDRESS_TYPES`], in order,
/// without duplicates.
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in addrs.into_iter().flatten() {
        if !NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
            continue;
        }
        if let Ok(ip) = a.address.parse::<IpAddr>() {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// What kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AddressKind {
    /// A `spec.clusterIPs` address.
    ClusterIp,
    /// A node address (or [`LOCALHOST_NODEPORT`]) with the port's `nodePort`.
    NodePort,
    /// A `spec.externalIPs` address.
    ExternalIp,
    /// A `status.loadBalancer.ingress[].ip` with `ipMode` unset or `VIP`.
    LoadBalancer,
}

/// The external addresses of a Service of one family (`v6`), with their
/// kind: node addresses for NodePorts (the caller pairs them with
/// `nodePort`), `spec.externalIPs`, and the load balancer's ingress IPs whose
/// `ipMode` is unset or `VIP` (with `Proxy` the load balancer delivers to the
/// node itself, so kube-proxy does not capture the IP; hostname-only entries
/// have no IP).
fn external_addresses(svc: &Svc, rules: &Rules, v6: bool) -> Vec<(AddressKind, IpAddr)> {
    let mut out = Vec::new();
    let fam = |ip: &IpAddr| ip.is_ipv6() == v6;
    for ip in rules.node_ips.iter().filter(|ip| fam(ip)) {
        out.push((AddressKind::NodePort, *ip));
    }
    if !v6 && rules.node_ips.iter().any(|ip| ip.is_ipv4()) {
        out.push((AddressKind::NodePort, LOCALHOST_NODEPORT));
    }
    for ip in svc
        .external_ips()
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .filter(|ip| fam(ip))
    {
        out.push((AddressKind::ExternalIp, ip));
    }
    for ing in svc.ingress() {
        if !matches!(ing.ip_mode.as_deref(), None | Some("VIP")) {
            continue;
        }
        if let Some(ip) = ing
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| fam(ip))
        {
            out.push((AddressKind::LoadBalancer, ip));
        }
    }
    out
}

/// The `status.loadBalancer.ingress` entries of a Service that no proxy
/// captures, each with why (kube-proxy leaves them alike): hostname-only
/// entries (no IP to capture: the load balancer sends to the NodePorts) and
/// `ipMode: Proxy` (the load balancer delivers to the node itself).
pub fn lb_ingress_left(svc: &Service) -> Vec<String> {
    lb_ingress_left_of(&Svc::from(svc))
}

/// [`lb_ingress_left`] of a Service as the agent keeps it.
pub fn lb_ingress_left_of(svc: &Svc) -> Vec<String> {
    let mut out = Vec::new();
    for ing in svc.ingress() {
        match (ing.ip.as_deref(), ing.hostname.as_deref()) {
            (Some(ip), _) if ing.ip_mode.as_deref() == Some("Proxy") => out.push(format!(
                "{ip} (ipMode Proxy: the load balancer delivers to the node)"
            )),
            (None, Some(h)) => out.push(format!(
                "{h} (hostname only: the load balancer sends to the NodePorts)"
            )),
            _ => {}
        }
    }
    out
}

/// The features this agent serves (published on its Node as
/// `netboot.io/datapath-features`). A Service needing anything else is
/// reported as unserved.
pub const SERVED: [Feature; 8] = [
    Feature::ClusterIp,
    Feature::Ipv4,
    Feature::Ipv6,
    Feature::Tcp,
    Feature::Udp,
    Feature::InternalTrafficLocal,
    Feature::SessionAffinity,
    Feature::TopologyHints,
];

/// Served once the per-packet path is attached to at least one interface
/// (the agent's `nodePortDevices`): traffic from outside the node to
/// NodePorts, externalIPs and LB IPs, with externalTrafficPolicy Local
/// (local backends only, client IP kept, `healthCheckNodePort` answered) and
/// `loadBalancerSourceRanges` (new flows to an LB IP from other sources dropped).
pub const SERVED_WITH_NODEPORT_DEVICE: [Feature; 5] = [
    Feature::NodePort,
    Feature::LoadBalancer,
    Feature::ExternalIps,
    Feature::ExternalTrafficLocal,
    Feature::LoadBalancerSourceRanges,
];

/// [`SERVED`] as a set: what an agent serves without the per-packet path.
pub fn served() -> BTreeSet<Feature> {
    SERVED.into_iter().collect()
}

/// What an agent serves: [`SERVED`], plus [`SERVED_WITH_NODEPORT_DEVICE`]
/// when the per-packet path is attached somewhere.
pub fn served_with(nodeport_devices: bool) -> BTreeSet<Feature> {
    let mut s = served();
    if nodeport_devices {
        s.extend(SERVED_WITH_NODEPORT_DEVICE);
    }
    s
}

/// What [`features::needs`] looks at, borrowed from a Service (one
/// definition for the agent and the bootstrapper's gate).
pub use netboot_contract::features::shape;

/// What of a Service this agent cannot serve: None when it serves all of it
/// (or the Service is not for a proxy at all), else the missing features.
/// Such a Service is still translated as far as it can be (its IPv4
/// TCP/UDP ClusterIP ports).
pub fn unserved(svc: &Service) -> Option<Vec<Feature>> {
    unserved_with(svc, &served())
}

/// As [`unserved`], against what the agent serves now (`served`).
pub fn unserved_with(svc: &Service, served: &BTreeSet<Feature>) -> Option<Vec<Feature>> {
    unserved_of(&Svc::from(svc), served)
}

/// [`unserved_with`] of a Service as the agent keeps it.
pub fn unserved_of(svc: &Svc, served: &BTreeSet<Feature>) -> Option<Vec<Feature>> {
    let needs = features::needs(&svc.shape())?;
    let missing = features::missing(&needs, served);
    (!missing.is_empty()).then_some(missing)
}

/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service or slice port's `protocol` (nil = TCP) as a `PROTO_*` number;
/// None: not TCP or UDP.
pub(crate) fn proto_of(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

/// A namespace or an object's name, shared: a Service's or slice's key, the
/// object itself, the slice index and the desired table hold one copy of it
/// (at 1M Services its copies were a tenth of the agent's memory), and a
/// namespace is held once for all its objects (`watch::Stores`).
pub type Name = Arc<str>;

/// A Service's key: (namespace, name).
pub type ServiceKey = (Name, Name);

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name`
/// label), whatever its address type; None without the label.
pub fn slice_service(s: &EndpointSlice) -> Option<ServiceKey> {
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        s.metadata.namespace.as_deref().unwrap_or_default().into(),
        svc.as_str().into(),
    ))
}

/// The key of a Service, None if it has no name.
pub fn service_key(svc: &Service) -> Option<ServiceKey> {
    Some((
        svc.metadata.namespace.as_deref().unwrap_or_default().into(),
        svc.metadata.name.as_deref()?.into(),
    ))
}

/// Builds the desired table from every Service and EndpointSlice: the union
/// of [`service_frontends`] over the Services, in order (a later Service
/// wins a frontend address two of them claim).
pub fn build<'a, 'r>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    rules: impl Into<Rules<'r>>,
) -> DesiredTable {
    let rules = rules.into();
    let slices: Vec<Slice> = slices.into_iter().map(Slice::from).collect();
    // Slices by (namespace, service name).
    let mut by_svc: BTreeMap<ServiceKey, Vec<&Slice>> = BTreeMap::new();
    for s in &slices {
        if let Some(k) = s.service_key() {
            by_svc.entry(k).or_default().push(s);
        }
    }
    let mut table = DesiredTable::default();
    for svc in services {
        let svc = Svc::from(svc);
        let slices = svc
            .key()
            .and_then(|k| by_svc.get(&k))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for fe in frontends(&svc, slices, rules) {
            table.insert(fe);
        }
    }
    table
}

/// The frontends of one Service, from the Service and its EndpointSlices
/// (slices whose `kubernetes.io/service-name` is not this Service are
/// skipped): [`frontends`] on the API objects.
pub fn service_frontends<'a, 'r>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    rules: impl Into<Rules<'r>>,
) -> Vec<Frontend> {
    let slices: Vec<Slice> = slices.into_iter().map(Slice::from).collect();
    let refs: Vec<&Slice> = slices.iter().collect();
    frontends(&Svc::from(svc), &refs, rules)
}

/// The frontends of one Service, from the Service and its slices as the
/// agent keeps them (slices whose `kubernetes.io/service-name` is not this
/// Service, or that are not IPv4 or IPv6, are skipped). The one place the
/// rules above live.
pub fn frontends<'r>(svc: &Svc, slices: &[&Slice], rules: impl Into<Rules<'r>>) -> Vec<Frontend> {
    let rules = rules.into();
    let mut out = Vec::new();
    let Some(name) = svc.name.as_deref() else {
        return out;
    };
    let ns = &*svc.namespace;
    let shape = svc.shape();
    if shape.skipped().is_some() {
        return out;
    }
    let ips: Vec<IpAddr> = shape
        .cluster_ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if ips.is_empty() {
        return out; // unallocated
    }
    let local_only = shape.internal_traffic_policy == Some("Local");
    let affinity_timeout = (svc.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        svc.affinity_timeout
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(rules.default_affinity_timeout)
    });
    // Dual-stack: an IPv4 cluster IP takes its backends from the IPv4 slices,
    // an IPv6 one from the IPv6 slices.
    let (slices4, slices6): (Vec<&Slice>, Vec<&Slice>) = slices
        .iter()
        .copied()
        .filter(|s| s.family != SliceFamily::Other && s.belongs_to(ns, name))
        .partition(|s| s.family == SliceFamily::V4);
    for port in &svc.ports {
        let Some(proto) = proto_of(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(vport) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let backends4 = categorize(
            &candidates(&slices4, &port_name, proto, false),
            local_only,
            &rules,
        );
        let backends6 = categorize(
            &candidates(&slices6, &port_name, proto, true),
            local_only,
            &rules,
        );
        let node_port = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0);
        let mut addrs: Vec<(L4Addr, bool)> = Vec::new();
        for ip in &ips {
            addrs.push((
                L4Addr {
                    ip: *ip,
                    port: vport,
                    proto,
                },
                false,
            ));
        }
        let mut lb_addrs: BTreeSet<L4Addr> = BTreeSet::new();
        // External addresses, for each family the Service has (kube-proxy
        // runs one proxier per family and filters them by family).
        for v6 in [false, true] {
            if !ips.iter().any(|ip| ip.is_ipv6() == v6) {
                continue;
            }
            for (kind, ip) in external_addresses(svc, &rules, v6) {
                let port = match kind {
                    AddressKind::NodePort => match node_port {
                        Some(p) => p,
                        None => continue,
                    },
                    _ => vport,
                };
                addrs.push((L4Addr { ip, port, proto }, true));
                if kind == AddressKind::LoadBalancer {
                    lb_addrs.insert(L4Addr { ip, port, proto });
                }
            }
        }
        // A local socket reaching an external address is in-cluster traffic:
        // kube-proxy short-circuits it to the cluster endpoints whatever
        // externalTrafficPolicy says, and internalTrafficPolicy does not
        // apply (its `UsesClusterEndpoints`).
        let external = addrs.iter().any(|(_, ext)| *ext);
        let cluster = (external && local_only).then(|| {
            (
                categorize(
                    &candidates(&slices4, &port_name, proto, false),
                    false,
                    &rules,
                ),
                categorize(
                    &candidates(&slices6, &port_name, proto, true),
                    false,
                    &rules,
                ),
            )
        });
        let (cluster4, cluster6) = match &cluster {
            Some((c4, c6)) => (c4, c6),
            None => (&backends4, &backends6),
        };
        let ext_local = shape.external_traffic_policy == Some("Local");
        let ranges = if lb_addrs.is_empty() {
            Vec::new()
        } else {
            ranges_of(svc, rules.node_ips)
        };
        let local_of = |v6: bool, cluster: &BTreeMap<L4Addr, BackendState>| {
            let local = categorize(
                &candidates(if v6 { &slices6 } else { &slices4 }, &port_name, proto, v6),
                true,
                &rules,
            );
            External {
                source_ranges: Vec::new(),
                local_only: ext_local,
                local: local
                    .keys()
                    .filter(|b| cluster.get(b) == Some(&BackendState::Active))
                    .copied()
                    .collect(),
            }
        };
        let (ext4, ext6) = if external {
            (local_of(false, cluster4), local_of(true, cluster6))
        } else {
            (External::default(), External::default())
        };
        for (addr, ext) in addrs {
            let backends = match (addr.is_v6(), ext) {
                (false, false) => &backends4,
                (true, false) => &backends6,
                (false, true) => cluster4,
                (true, true) => cluster6,
            };
            let external = ext.then(|| {
                let mut e = if addr.is_v6() { &ext6 } else { &ext4 }.clone();
                if lb_addrs.contains(&addr) {
                    e.source_ranges = ranges
                        .iter()
                        .filter(|(ip, _)| ip.is_ipv6() == addr.is_v6())
                        .copied()
                        .collect();
                }
                e
            });
            // A later port with the same (ip, port, proto) wins, as in a table.
            out.retain(|f: &Frontend| f.addr != addr);
            out.push(Frontend {
                addr,
                name: format!("{ns}/{name}:{port_name}"),
                affinity_timeout,
                backends: backends.clone(),
                external,
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
///
/// This is the agent's one desired table: the frontends are shared
/// ([`Arc`]) with the reconciler's target ([`ServiceTable::shared`],
/// [`ServiceTable::changes`]), never copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    by_service: BTreeMap<ServiceKey, Vec<Arc<Frontend>>>,
    /// Address → the Services claiming it, sorted (almost always one).
    claims: BTreeMap<L4Addr, Vec<ServiceKey>>,
}

/// What some frontend addresses should now hold (None: remove).
pub type FrontendChanges = BTreeMap<L4Addr, Option<Arc<Frontend>>>;

impl ServiceTable {
    /// Replaces the frontends of Service `key` (empty: the Service is gone
    /// or has none); returns the addresses it had or has now.
    pub fn set(&mut self, key: ServiceKey, frontends: Vec<Frontend>) -> BTreeSet<L4Addr> {
        let mut touched = BTreeSet::new();
        if let Some(old) = self.by_service.remove(&key) {
            for fe in old {
                if let Some(c) = self.claims.get_mut(&fe.addr) {
                    if let Ok(i) = c.binary_search(&key) {
                        c.remove(i);
                    }
                    if c.is_empty() {
                        self.claims.remove(&fe.addr);
                    }
                }
                touched.insert(fe.addr);
            }
        }
        if !frontends.is_empty() {
            for fe in &frontends {
                // Almost always the only claim: room for one, not the
                // four a first push reserves.
                let c = self
                    .claims
                    .entry(fe.addr)
                    .or_insert_with(|| Vec::with_capacity(1));
                if let Err(i) = c.binary_search(&key) {
                    c.insert(i, key.clone());
                }
                touched.insert(fe.addr);
            }
            // Not `into_iter().map(Arc::new).collect()`: that reuses the
            // Vec<Frontend> buffer in place, and the table would keep ~500
            // bytes per Service for a few pointers (5 MiB at 10,000
            // Services, heaptrack).
            let mut shared = Vec::with_capacity(frontends.len());
            shared.extend(frontends.into_iter().map(Arc::new));
            self.by_service.insert(key, shared);
        }
        touched
    }

    /// The table [`ServiceTable::set`] for each of `services` would give,
    /// built in one go when their keys ascend (a full pass: the store's
    /// order): no B-tree search per Service, and both maps bulk-built with
    /// full nodes. Keys out of order are set one by one.
    pub fn from_sorted(services: Vec<(ServiceKey, Vec<Frontend>)>) -> Self {
        if !services.windows(2).all(|w| w[0].0 < w[1].0) {
            let mut t = Self::default();
            for (k, fes) in services {
                t.set(k, fes);
            }
            t.compact();
            return t;
        }
        let mut by_service: Vec<(ServiceKey, Vec<Arc<Frontend>>)> =
            Vec::with_capacity(services.len());
        // (address, index of the claiming Service): the index order is the
        // key order.
        let mut claims: Vec<(L4Addr, usize)> = Vec::new();
        for (key, frontends) in services {
            if frontends.is_empty() {
                continue;
            }
            let i = by_service.len();
            claims.extend(frontends.iter().map(|f| (f.addr, i)));
            let mut shared = Vec::with_capacity(frontends.len());
            shared.extend(frontends.into_iter().map(Arc::new));
            by_service.push((key, shared));
        }
        claims.sort_unstable();
        claims.dedup();
        let grouped = group_runs(
            claims
                .into_iter()
                .map(|(addr, i)| (addr, by_service[i].0.clone())),
        );
        Self {
            by_service: by_service.into_iter().collect(),
            claims: grouped.into_iter().collect(),
        }
    }

    /// Rebuilds the maps with full nodes (after many [`ServiceTable::set`]
    /// in key order, B-tree nodes are half empty).
    pub fn compact(&mut self) {
        self.by_service = std::mem::take(&mut self.by_service).into_iter().collect();
        self.claims = std::mem::take(&mut self.claims).into_iter().collect();
    }

    /// The frontend address `addr` should hold, shared.
    pub fn shared(&self, addr: &L4Addr) -> Option<&Arc<Frontend>> {
        let owner = self.claims.get(addr)?.last()?;
        self.by_service.get(owner)?.iter().find(|f| f.addr == *addr)
    }

    /// The frontend address `addr` should hold.
    pub fn frontend(&self, addr: &L4Addr) -> Option<&Frontend> {
        self.shared(addr).map(|f| &**f)
    }

    /// What each of `addrs` should now hold.
    pub fn changes<'a>(&self, addrs: impl IntoIterator<Item = &'a L4Addr>) -> FrontendChanges {
        addrs
            .into_iter()
            .map(|a| (*a, self.shared(a).cloned()))
            .collect()
    }

    /// The frontends of one Service, as last set.
    pub fn service(&self, key: &ServiceKey) -> &[Arc<Frontend>] {
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

    /// Every frontend of every Service (an address claimed by several
    /// Services appears once per claim).
    pub fn frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.by_service.values().flatten().map(|f| &**f)
    }

    /// Every address and the frontend it should hold, shared (what a full
    /// pass of the reconciler is given; no frontend is copied).
    pub fn shared_table(&self) -> BTreeMap<L4Addr, Arc<Frontend>> {
        // Walked Service by Service, each frontend kept where its Service
        // owns the address ([`ServiceTable::shared`]'s choice), instead of
        // a string-keyed search of the owner per address.
        let mut owned: Vec<(L4Addr, Arc<Frontend>)> = Vec::with_capacity(self.claims.len());
        for (key, frontends) in &self.by_service {
            for f in frontends {
                if self.claims.get(&f.addr).and_then(|c| c.last()) == Some(key) {
                    owned.push((f.addr, f.clone()));
                }
            }
        }
        // Stable: a Service's first frontend of an address wins, as in
        // `shared`.
        owned.sort_by_key(|(a, _)| *a);
        owned.dedup_by_key(|(a, _)| *a);
        owned.into_iter().collect()
    }

    /// The whole desired table, as a copy.
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

/// One endpoint of one Service port, its conditions merged over the slices
/// listing it (an endpoint ready in any slice is ready).
///
/// Borrowed from the slices: a full pass builds one per endpoint (100,000
/// at 10,000 Services × 10), and owned node names were an allocation and a
/// copy each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Candidate<'s> {
    /// Ready (and not terminating): takes new connections.
    ready: bool,
    /// Serving and terminating.
    serving_terminating: bool,
    /// `nodeName`.
    node: Option<&'s str>,
    /// Zone hints.
    zones: BTreeSet<&'s str>,
    /// Node hints.
    nodes: BTreeSet<&'s str>,
}

impl<'s> Candidate<'s> {
    fn merge(&mut self, ep: &'s SliceEndpoint) {
        // The API never says ready while terminating; a bad object is not ready.
        self.ready |= ep.ready && !ep.terminating;
        self.serving_terminating |= ep.serving && ep.terminating;
        if self.node.is_none() {
            self.node = ep.node.as_deref();
        }
        if let Some(h) = &ep.hints {
            self.zones.extend(h.zones.iter().map(String::as_str));
            self.nodes.extend(h.nodes.iter().map(String::as_str));
        }
    }

    fn local(&self, node: &str) -> bool {
        !node.is_empty() && self.node == Some(node)
    }
}

/// Every endpoint of the Service port `port_name`/`proto`, by backend address.
fn candidates<'s>(
    slices: &[&'s Slice],
    port_name: &str,
    proto: u8,
    v6: bool,
) -> BTreeMap<L4Addr, Candidate<'s>> {
    let mut out: BTreeMap<L4Addr, Candidate<'s>> = BTreeMap::new();
    for s in slices {
        for p in &s.ports {
            if p.name != port_name || p.proto != Some(proto) {
                continue;
            }
            let Some(port) = p.port else {
                continue;
            };
            for ep in &s.endpoints {
                let Some(ip) = ep.ip.filter(|a| a.is_ipv6() == v6) else {
                    continue;
                };
                out.entry(L4Addr { ip, port, proto }).or_default().merge(ep);
            }
        }
    }
    out
}

/// Which topology filter applies, from the ready endpoints' hints (kube-proxy's
/// `topologyModeFromHints`): node hints if every ready endpoint has some and
/// one names this node, else zone hints likewise, else none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'r> {
    All,
    Node(&'r str),
    Zone(&'r str),
}

fn topology<'r>(cands: &BTreeMap<L4Addr, Candidate<'_>>, rules: &Rules<'r>) -> Topology<'r> {
    let ready: Vec<&Candidate> = cands.values().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    let node = rules.node;
    if !node.is_empty()
        && ready.iter().all(|c| !c.nodes.is_empty())
        && ready.iter().any(|c| c.nodes.contains(node))
    {
        return Topology::Node(node);
    }
    if let Some(zone) = rules.zone.filter(|z| !z.is_empty()) {
        if ready.iter().all(|c| !c.zones.is_empty()) && ready.iter().any(|c| c.zones.contains(zone))
        {
            return Topology::Zone(zone);
        }
    }
    Topology::All
}

/// The backends of one Service port (kube-proxy's `CategorizeEndpoints` for
/// internal traffic): the endpoints new connections go to are
/// [`BackendState::Active`]; serving-terminating ones otherwise eligible are
/// [`BackendState::Terminating`] (existing affinity only).
fn categorize(
    cands: &BTreeMap<L4Addr, Candidate<'_>>,
    local_only: bool,
    rules: &Rules,
) -> BTreeMap<L4Addr, BackendState> {
    let eligible: Box<dyn Fn(&Candidate<'_>) -> bool> = if local_only {
        Box::new(|c: &Candidate<'_>| c.local(rules.node))
    } else {
        match topology(cands, rules) {
            Topology::All => Box::new(|_: &Candidate<'_>| true),
            // Topology filters the ready endpoints only; the serving-terminating
            // fallback below is taken from all of them, as in kube-proxy.
            Topology::Node(n) => Box::new(move |c: &Candidate<'_>| !c.ready || c.nodes.contains(n)),
            Topology::Zone(z) => Box::new(move |c: &Candidate<'_>| !c.ready || c.zones.contains(z)),
        }
    };
    let any_ready = cands.values().any(|c| c.ready && eligible(c));
    cands
        .iter()
        .filter(|(_, c)| eligible(c))
        .filter_map(|(a, c)| {
            // With no ready endpoint, serving-terminating ones take new connections.
            let state = if c.ready || (c.serving_terminating && !any_ready) {
                BackendState::Active
            } else if c.serving_terminating {
                BackendState::Terminating
            } else {
                return None;
            };
            Some((*a, state))
        })
        .collect()
}

/// Pairs sorted by key, grouped: each run of equal keys becomes one key
/// with its values in order. A group of one gets a `Vec` of exactly one
/// (`vec!`), which most groups are (a Service's one frontend per address,
/// a Service's one slice per family).
pub(crate) fn group_runs<K: PartialEq, V>(
    sorted: impl IntoIterator<Item = (K, V)>,
) -> Vec<(K, Vec<V>)> {
    let sorted = sorted.into_iter();
    let mut grouped: Vec<(K, Vec<V>)> = Vec::with_capacity(sorted.size_hint().0);
    for (k, v) in sorted {
        match grouped.last_mut() {
            Some((last, vs)) if *last == k => vs.push(v),
            _ => grouped.push((k, vec![v])),
        }
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PROTO_TCP;

    #[test]
    fn group_runs_groups_equal_neighbours_in_order() {
        let g = group_runs([(1, 'a'), (1, 'b'), (2, 'c'), (3, 'd'), (3, 'e'), (3, 'f')]);
        assert_eq!(
            g,
            vec![
                (1, vec!['a', 'b']),
                (2, vec!['c']),
                (3, vec!['d', 'e', 'f'])
            ]
        );
        assert_eq!(g[1].1.capacity(), 1, "a group of one holds exactly one");
        assert!(group_runs(Vec::<(u8, u8)>::new()).is_empty());
    }

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

    #[test]
    fn a_table_built_in_one_go_is_the_one_set_service_by_service() {
        // Why: a full pass builds its table with `from_sorted` and hands
        // the reconciler `shared_table`; both must pick the owners `set`
        // and `shared` pick, also where Services share an address.
        let (mut svcs, slices) =
            crate::reconcile::tests_fixture(include_str!("../testdata/cluster.yaml"));
        for (name, ports) in [
            ("a", "[{port: 80}]"),
            ("b", "[{port: 80}, {port: 81}]"),
            ("c", "[{port: 81}, {port: 82}]"),
            ("d", "[]"),
        ] {
            svcs.push(svc(&format!(
                "metadata: {{name: {name}, namespace: zz}}\nspec: {{clusterIP: 10.96.77.7, ports: {ports}}}"
            )));
        }
        let mut each: Vec<(ServiceKey, Vec<Frontend>)> = svcs
            .iter()
            .map(|s| {
                (
                    service_key(s).unwrap(),
                    service_frontends(s, &slices, 10800),
                )
            })
            .collect();
        each.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_set = ServiceTable::default();
        for (k, fes) in each.clone() {
            by_set.set(k, fes);
        }
        let in_one_go = ServiceTable::from_sorted(each.clone());
        assert_eq!(in_one_go, by_set);
        let per_address: BTreeMap<L4Addr, Arc<Frontend>> = by_set
            .claims
            .keys()
            .map(|a| (*a, by_set.shared(a).unwrap().clone()))
            .collect();
        assert_eq!(in_one_go.shared_table(), per_address);
        let shared = in_one_go.shared_table();
        let owner = |port: u16| {
            shared
                .iter()
                .find(|(a, _)| a.ip.to_string() == "10.96.77.7" && a.port == port)
                .map(|(_, f)| f.name.clone())
        };
        assert_eq!(owner(80).as_deref(), Some("zz/b:"));
        assert_eq!(owner(81).as_deref(), Some("zz/c:"));
        assert_eq!(shared.len(), in_one_go.len());
        // Out of order, it is still the same table.
        each.reverse();
        assert_eq!(ServiceTable::from_sorted(each), by_set);
    }
    /// The backends of the one frontend of `svc` as (ip, state), built for node
    /// `node-a` in zone `zone-a`.
    fn picked(s: &Service, slices: &[EndpointSlice]) -> Vec<(String, BackendState)> {
        let rules = Rules {
            default_affinity_timeout: 10800,
            node: "node-a",
            zone: Some("zone-a"),
            node_ips: &[],
        };
        let fes = service_frontends(s, slices, rules);
        assert_eq!(fes.len(), 1, "{fes:?}");
        fes[0]
            .backends
            .iter()
            .map(|(a, st)| (a.ip.to_string(), *st))
            .collect()
    }

    fn web(extra: &str) -> Service {
        svc(&format!(
            "metadata: {{name: w, namespace: d}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{port: 80}}]{extra}}}"
        ))
    }

    /// A slice of `w` with one endpoint per line of `eps` (flow-style endpoint fields).
    fn eps(eps: &[&str]) -> EndpointSlice {
        let list: Vec<String> = eps.iter().map(|e| format!("- {{{e}}}")).collect();
        slice(&format!(
            "metadata: {{name: w-1, namespace: d, labels: {{kubernetes.io/service-name: w}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{}\n",
            list.join("\n")
        ))
    }

    const TERMINATING: &str = "conditions: {ready: false, serving: true, terminating: true}";

    fn active(ips: &[&str]) -> Vec<(String, BackendState)> {
        ips.iter()
            .map(|ip| (ip.to_string(), BackendState::Active))
            .collect()
    }

    #[test]
    fn services_kube_proxy_skips_are_not_translated() {
        // kube-proxy's selector: !service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless
        let sl = eps(&["addresses: [10.244.0.1]"]);
        for labels in [
            "{service.kubernetes.io/service-proxy-name: other-proxy}",
            "{service.kubernetes.io/service-proxy-name: ''}",
            "{service.kubernetes.io/headless: ''}",
        ] {
            let s = svc(&format!("metadata: {{name: w, namespace: d, labels: {labels}}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{port: 80}}]}}"));
            assert!(build([&s], [&sl], 10800).frontends.is_empty(), "{labels}");
            assert_eq!(unserved(&s), None, "not ours to serve: {labels}");
        }
        let other = svc("metadata: {name: w, namespace: d, labels: {app: web}}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}");
        assert_eq!(build([&other], [&sl], 10800).frontends.len(), 1);
    }

    #[test]
    fn no_ready_endpoint_lets_serving_terminating_ones_take_new_connections() {
        let s = web("");
        // Ready ones exist: terminating ones keep existing affinity only.
        let both = eps(&[
            "addresses: [10.244.0.1]",
            &format!("addresses: [10.244.0.2], {TERMINATING}"),
        ]);
        assert_eq!(
            picked(&s, &[both]),
            vec![
                ("10.244.0.1".into(), BackendState::Active),
                ("10.244.0.2".into(), BackendState::Terminating)
            ]
        );
        // None ready: serving-terminating ones serve; not serving ones never do.
        let none_ready = eps(&[
            "addresses: [10.244.0.1], conditions: {ready: false}",
            &format!("addresses: [10.244.0.2], {TERMINATING}"),
            "addresses: [10.244.0.3], conditions: {ready: false, serving: false, terminating: true}",
        ]);
        assert_eq!(picked(&s, &[none_ready]), active(&["10.244.0.2"]));
    }

    #[test]
    fn internal_traffic_policy_local_uses_only_this_nodes_endpoints_and_never_falls_back() {
        let s = web(", internalTrafficPolicy: Local");
        let mixed = eps(&[
            "addresses: [10.244.0.1], nodeName: node-a",
            "addresses: [10.244.0.2], nodeName: node-b",
            &format!("addresses: [10.244.0.3], nodeName: node-a, {TERMINATING}"),
        ]);
        assert_eq!(
            picked(&s, &[mixed]),
            vec![
                ("10.244.0.1".into(), BackendState::Active),
                ("10.244.0.3".into(), BackendState::Terminating)
            ]
        );
        // Only the local one terminating: it serves (remote ready ones do not).
        let local_terminating = eps(&[
            "addresses: [10.244.0.2], nodeName: node-b",
            &format!("addresses: [10.244.0.3], nodeName: node-a, {TERMINATING}"),
        ]);
        assert_eq!(picked(&s, &[local_terminating]), active(&["10.244.0.3"]));
        // Nothing local: a frontend without backends (connections refused), no fallback.
        let remote = eps(&[
            "addresses: [10.244.0.2], nodeName: node-b",
            "addresses: [10.244.0.4]",
        ]);
        assert_eq!(picked(&s, std::slice::from_ref(&remote)), vec![]);
        // Without the policy the same slice serves from everywhere.
        assert_eq!(
            picked(&web(""), &[remote]),
            active(&["10.244.0.2", "10.244.0.4"])
        );
        // An agent that does not know its node has no local endpoint.
        let t = build(
            [&s],
            [&eps(&["addresses: [10.244.0.1], nodeName: node-a"])],
            10800,
        );
        assert!(t.frontends.values().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn zone_hints_are_used_only_when_every_ready_endpoint_has_them_and_one_names_our_zone() {
        let s = web(", trafficDistribution: PreferClose");
        let hinted = |z1: &str, z2: &str| {
            eps(&[
                &format!("addresses: [10.244.0.1], hints: {{forZones: [{{name: {z1}}}]}}"),
                &format!("addresses: [10.244.0.2], hints: {{forZones: [{{name: {z2}}}]}}"),
                &format!("addresses: [10.244.0.9], {TERMINATING}"),
            ])
        };
        let with_terminating = |ips: &[&str]| {
            let mut v = active(ips);
            v.push(("10.244.0.9".into(), BackendState::Terminating));
            v
        };
        // Our zone hinted: only those (terminating ones stay for affinity, unhinted as they are).
        assert_eq!(
            picked(&s, &[hinted("zone-a", "zone-b")]),
            with_terminating(&["10.244.0.1"])
        );
        // No endpoint for our zone: all.
        assert_eq!(
            picked(&s, &[hinted("zone-b", "zone-c")]),
            with_terminating(&["10.244.0.1", "10.244.0.2"])
        );
        // One ready endpoint without hints: all.
        let partial = eps(&[
            "addresses: [10.244.0.1], hints: {forZones: [{name: zone-a}]}",
            "addresses: [10.244.0.2]",
        ]);
        assert_eq!(
            picked(&s, &[partial]),
            active(&["10.244.0.1", "10.244.0.2"])
        );
        // A node without a zone label: all.
        let t = build(
            [&s],
            [&hinted("zone-a", "zone-b")],
            Rules {
                default_affinity_timeout: 1,
                node: "node-a",
                zone: None,
                node_ips: &[],
            },
        );
        assert_eq!(t.frontends.values().next().unwrap().backends.len(), 3);
        // Node hints (PreferSameNode) win over zone hints when every ready endpoint has them.
        let nodes = eps(&[
            "addresses: [10.244.0.1], hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}",
            "addresses: [10.244.0.2], hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}",
        ]);
        assert_eq!(picked(&s, &[nodes]), active(&["10.244.0.2"]));
        // internalTrafficPolicy: Local ignores hints.
        let local = web(", internalTrafficPolicy: Local");
        let l = eps(&[
            "addresses: [10.244.0.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}",
            "addresses: [10.244.0.2], nodeName: node-b, hints: {forZones: [{name: zone-a}]}",
        ]);
        assert_eq!(picked(&local, &[l]), active(&["10.244.0.1"]));
    }

    #[test]
    fn what_the_agent_cannot_serve_is_named() {
        let names = |s: &Service| -> Option<Vec<&str>> {
            unserved(s).map(|m| m.iter().map(|f| f.name()).collect())
        };
        assert_eq!(names(&web("")), None);
        assert_eq!(
            names(&web(
                ", internalTrafficPolicy: Local, sessionAffinity: ClientIP"
            )),
            None
        );
        let sctp = svc("metadata: {name: s, namespace: d}\nspec: {clusterIP: 10.96.0.6, ports: [{port: 80}, {port: 9, protocol: SCTP}]}");
        assert_eq!(names(&sctp), Some(vec!["sctp"]));
        // The TCP port is still translated.
        assert_eq!(build([&sctp], [], 10800).frontends.len(), 1);
        let dual = svc("metadata: {name: v, namespace: d}\nspec: {type: NodePort, clusterIP: 10.96.0.7, clusterIPs: [10.96.0.7, 'fd00::7'], ports: [{port: 80}]}");
        // IPv6 is served (lb6 maps); NodePort is not yet.
        assert_eq!(names(&dual), Some(vec!["nodeport"]));
        let headless = svc("metadata: {name: h, namespace: d}\nspec: {clusterIP: None, ports: [{port: 9, protocol: SCTP}]}");
        assert_eq!(names(&headless), None);
    }

    /// The frontends of `s` for node `node-a` with `node_ips`, as
    /// "addr -> sorted backend ips".
    fn north_south(s: &Service, slices: &[EndpointSlice], node_ips: &[IpAddr]) -> Vec<String> {
        let rules = Rules {
            default_affinity_timeout: 10800,
            node: "node-a",
            zone: None,
            node_ips,
        };
        let mut v: Vec<String> = service_frontends(s, slices, rules)
            .iter()
            .map(|f| {
                let bes: Vec<String> = f.backends.keys().map(|b| b.ip.to_string()).collect();
                format!("{} -> {}", f.addr, bes.join(","))
            })
            .collect();
        v.sort();
        v
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips_are_frontends_of_their_family() {
        let s = svc("metadata: {name: w, namespace: d}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.5
  clusterIPs: [10.96.0.5, 'fd00::5']
  externalIPs: [203.0.113.7, '2001:db8::7', not-an-ip]
  ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.1}
    - {ip: 198.51.100.2, ipMode: VIP}
    - {ip: 198.51.100.3, ipMode: Proxy}
    - {hostname: lb.example}
    - {ip: '2001:db8::1'}
");
        let v4 = slice(
            "metadata: {name: w-4, namespace: d, labels: {kubernetes.io/service-name: w}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.0.1]}]
",
        );
        let v6 = slice(
            "metadata: {name: w-6, namespace: d, labels: {kubernetes.io/service-name: w}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:244::1']}]
",
        );
        let node = ips(&["192.168.1.10", "10.0.0.10", "fd00:1::10"]);
        let got = north_south(&s, &[v4, v6], &node);
        let mut want = vec![
            "10.96.0.5:80/TCP -> 10.244.0.1",
            "10.96.0.5:53/UDP -> 10.244.0.1",
            "[fd00::5]:80/TCP -> fd00:244::1",
            "[fd00::5]:53/UDP -> ",
            // NodePorts: every node address of the family, and 127.0.0.1 (IPv4).
            "192.168.1.10:30080/TCP -> 10.244.0.1",
            "10.0.0.10:30080/TCP -> 10.244.0.1",
            "127.0.0.1:30080/TCP -> 10.244.0.1",
            "[fd00:1::10]:30080/TCP -> fd00:244::1",
            "192.168.1.10:30053/UDP -> 10.244.0.1",
            "10.0.0.10:30053/UDP -> 10.244.0.1",
            "127.0.0.1:30053/UDP -> 10.244.0.1",
            "[fd00:1::10]:30053/UDP -> ",
            // externalIPs and VIP-mode load balancer IPs, with the Service port.
            "203.0.113.7:80/TCP -> 10.244.0.1",
            "203.0.113.7:53/UDP -> 10.244.0.1",
            "[2001:db8::7]:80/TCP -> fd00:244::1",
            "[2001:db8::7]:53/UDP -> ",
            "198.51.100.1:80/TCP -> 10.244.0.1",
            "198.51.100.1:53/UDP -> 10.244.0.1",
            "198.51.100.2:80/TCP -> 10.244.0.1",
            "198.51.100.2:53/UDP -> 10.244.0.1",
            "[2001:db8::1]:80/TCP -> fd00:244::1",
            "[2001:db8::1]:53/UDP -> ",
        ];
        want.sort();
        assert_eq!(got, want);
        // An IPv4-only Service on a dual-stack node: no IPv6 address at all.
        let single = svc("metadata: {name: w, namespace: d}
spec: {type: NodePort, clusterIP: 10.96.0.5, externalIPs: ['2001:db8::7'], ports: [{port: 80, nodePort: 30080}]}
");
        let got = north_south(&single, &[], &node);
        assert_eq!(
            got,
            vec![
                "10.0.0.10:30080/TCP -> ",
                "10.96.0.5:80/TCP -> ",
                "127.0.0.1:30080/TCP -> ",
                "192.168.1.10:30080/TCP -> ",
            ]
        );
        // An IPv6-only node: no localhost NodePort (kube-proxy's is IPv4 only).
        assert_eq!(
            north_south(&single, &[], &ips(&["fd00:1::10"])),
            vec!["10.96.0.5:80/TCP -> "]
        );
        // Rules of no node: no NodePort frontend.
        assert_eq!(build([&single], [], 10800).frontends.len(), 1);
    }

    #[test]
    fn local_sockets_reach_external_addresses_through_the_cluster_endpoints() {
        // kube-proxy short-circuits in-cluster traffic to external addresses
        // to the cluster endpoints: externalTrafficPolicy: Local only limits
        // traffic from outside the node, and internalTrafficPolicy does not
        // apply to external addresses.
        let s = svc("metadata: {name: w, namespace: d}
spec: {type: NodePort, clusterIP: 10.96.0.5, externalIPs: [203.0.113.7], externalTrafficPolicy: Local, internalTrafficPolicy: Local, sessionAffinity: ClientIP, ports: [{port: 80, nodePort: 30080}]}
");
        let sl = eps(&[
            "addresses: [10.244.0.1], nodeName: node-a",
            "addresses: [10.244.0.2], nodeName: node-b",
        ]);
        let got = north_south(&s, std::slice::from_ref(&sl), &ips(&["192.168.1.10"]));
        assert_eq!(
            got,
            vec![
                "10.96.0.5:80/TCP -> 10.244.0.1",
                "127.0.0.1:30080/TCP -> 10.244.0.1,10.244.0.2",
                "192.168.1.10:30080/TCP -> 10.244.0.1,10.244.0.2",
                "203.0.113.7:80/TCP -> 10.244.0.1,10.244.0.2",
            ]
        );
        // Affinity applies to every address of the Service.
        let rules = Rules {
            default_affinity_timeout: 7,
            node: "node-a",
            zone: None,
            node_ips: &ips(&["192.168.1.10"]),
        };
        assert!(service_frontends(&s, [&sl], rules)
            .iter()
            .all(|f| f.affinity_timeout == Some(7)));
    }

    #[test]
    fn source_ranges_are_networks_of_load_balancers_plus_their_ips_when_a_range_holds_the_node() {
        let svc = |type_: &str, ranges: &str| -> Service {
            serde_yaml::from_str(&format!(
                "metadata: {{name: s, namespace: d}}\nspec: {{type: {type_}, loadBalancerSourceRanges: {ranges}}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.10}}, {{ip: '2001:db8::1'}}, {{hostname: lb.example}}]}}}}"
            ))
            .unwrap()
        };
        let node: Vec<IpAddr> = vec!["192.168.50.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        // Host bits cleared; both families; malformed entries left out; no
        // node address inside: no LB IP added.
        assert_eq!(
            source_ranges(
                &svc(
                    "LoadBalancer",
                    "['10.1.2.3/8', '2001:db8::5/32', 'bogus', '198.51.100.7']"
                ),
                &node
            ),
            vec![
                ("10.0.0.0".parse().unwrap(), 8),
                ("198.51.100.7".parse().unwrap(), 32),
                ("2001:db8::".parse().unwrap(), 32)
            ]
        );
        // An IPv6 range holding the node's IPv6 address: the IPv6 LB IP too.
        assert_eq!(
            source_ranges(&svc("LoadBalancer", "['fd00::/64']"), &node),
            vec![
                ("2001:db8::1".parse().unwrap(), 128),
                ("fd00::".parse().unwrap(), 64)
            ]
        );
        // A range holding the node's address: the IPv4 LB IP too.
        assert_eq!(
            source_ranges(&svc("LoadBalancer", "['192.168.0.0/16']"), &node),
            vec![
                ("192.168.0.0".parse().unwrap(), 16),
                ("203.0.113.10".parse().unwrap(), 32)
            ]
        );
        // Not a LoadBalancer, or no ranges: no restriction.
        assert!(source_ranges(&svc("NodePort", "['10.0.0.0/8']"), &node).is_empty());
        assert!(source_ranges(&svc("LoadBalancer", "[]"), &node).is_empty());
    }

    #[test]
    fn lb_ingress_entries_left_to_the_load_balancer_are_named_with_why() {
        let s: Service = serde_yaml::from_str(
            "metadata: {name: s, namespace: d}\nspec: {type: LoadBalancer}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.1}, {ip: 203.0.113.2, ipMode: Proxy}, {hostname: lb.example}, {ip: 203.0.113.3, ipMode: VIP}]}}",
        )
        .unwrap();
        assert_eq!(
            lb_ingress_left(&s),
            [
                "203.0.113.2 (ipMode Proxy: the load balancer delivers to the node)",
                "lb.example (hostname only: the load balancer sends to the NodePorts)"
            ]
        );
    }

    #[test]
    fn node_addresses_are_the_internal_and_external_ips() {
        let n: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(
            "metadata: {name: node-a}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: InternalIP, address: 192.168.1.10}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: InternalDNS, address: node-a.internal}
  - {type: InternalIP, address: 'fd00:1::10'}
  - {type: ExternalIP, address: 192.168.1.10}
",
        )
        .unwrap();
        assert_eq!(
            node_addresses(&n),
            ips(&["192.168.1.10", "203.0.113.10", "fd00:1::10"])
        );
    }
}
