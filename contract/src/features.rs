//! What a datapath agent serves and what a Service needs, in one vocabulary.
//!
//! The agent publishes the features it serves on its Node
//! ([`FEATURES_ANNOTATION`], e.g. `clusterip,ipv4,tcp,udp,…`) and counts the
//! Services needing more; `netboot apply` compares every Service's
//! [`needs`] with what every agent publishes before it touches kube-proxy.
//! Both sides call [`needs`] on a [`ServiceShape`] (borrowed from a
//! `Service`), so they cannot disagree on what a Service needs.
//!
//! Which Services a proxy serves at all follows kube-proxy: not those
//! labelled [`SERVICE_PROXY_NAME_LABEL`] (any value: another proxy owns
//! them) or [`HEADLESS_LABEL`] (kube-proxy's label selector
//! `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`),
//! not ExternalName Services and not headless ones (`clusterIP: None`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Node annotation: the features the agent on that Node serves, comma-separated
/// names of [`Feature`] in their order.
pub const FEATURES_ANNOTATION: &str = "netboot.io/datapath-features";

/// Service label: another service proxy implements this Service (kube-proxy
/// skips it whatever the value).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Service label: set on headless Services' EndpointSlices and Services by
/// some controllers; kube-proxy skips it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Service annotations asking for topology aware routing (EndpointSlice hints).
pub const TOPOLOGY_ANNOTATIONS: [&str; 2] = [
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
];

/// One thing a Service can need from its proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// A ClusterIP (every proxied Service has one).
    ClusterIp,
    /// `type: NodePort`, or `LoadBalancer` with node ports allocated.
    NodePort,
    /// `type: LoadBalancer` (its status' ingress IPs).
    LoadBalancer,
    /// `spec.externalIPs`.
    ExternalIps,
    /// An IPv4 cluster IP.
    Ipv4,
    /// An IPv6 cluster IP.
    Ipv6,
    /// A TCP port.
    Tcp,
    /// A UDP port.
    Udp,
    /// An SCTP port.
    Sctp,
    /// `internalTrafficPolicy: Local`.
    InternalTrafficLocal,
    /// `externalTrafficPolicy: Local`.
    ExternalTrafficLocal,
    /// `sessionAffinity: ClientIP`.
    SessionAffinity,
    /// `trafficDistribution` or a topology annotation: EndpointSlice hints.
    TopologyHints,
    /// `type: LoadBalancer` with `spec.loadBalancerSourceRanges`: traffic to
    /// its LB IPs only from those sources (kube-proxy's firewall chains).
    LoadBalancerSourceRanges,
}

impl Feature {
    /// Every feature, in annotation order.
    pub const ALL: [Feature; 14] = [
        Feature::ClusterIp,
        Feature::NodePort,
        Feature::LoadBalancer,
        Feature::ExternalIps,
        Feature::Ipv4,
        Feature::Ipv6,
        Feature::Tcp,
        Feature::Udp,
        Feature::Sctp,
        Feature::InternalTrafficLocal,
        Feature::ExternalTrafficLocal,
        Feature::SessionAffinity,
        Feature::TopologyHints,
        Feature::LoadBalancerSourceRanges,
    ];

    /// Its name in the annotation and in `spec.kubeProxy.allowUnserved`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ClusterIp => "clusterip",
            Feature::NodePort => "nodeport",
            Feature::LoadBalancer => "loadbalancer",
            Feature::ExternalIps => "externalips",
            Feature::Ipv4 => "ipv4",
            Feature::Ipv6 => "ipv6",
            Feature::Tcp => "tcp",
            Feature::Udp => "udp",
            Feature::Sctp => "sctp",
            Feature::InternalTrafficLocal => "internal-traffic-local",
            Feature::ExternalTrafficLocal => "external-traffic-local",
            Feature::SessionAffinity => "session-affinity",
            Feature::TopologyHints => "topology-hints",
            Feature::LoadBalancerSourceRanges => "lb-source-ranges",
        }
    }

    /// Every name, in annotation order (for "allowed: …" messages).
    pub fn names() -> Vec<&'static str> {
        Feature::ALL.iter().map(|f| f.name()).collect()
    }

    /// The feature named `s` (exactly as [`Feature::name`] writes it).
    pub fn parse(s: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == s)
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The annotation value for `features`: names in [`Feature::ALL`] order, comma-separated.
pub fn format(features: &BTreeSet<Feature>) -> String {
    features
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses an annotation value. Names this build does not know (a newer agent)
/// are skipped: nothing this build checks can need them.
pub fn parse(value: &str) -> BTreeSet<Feature> {
    value
        .split(',')
        .filter_map(|s| Feature::parse(s.trim()))
        .collect()
}

/// What [`features::needs`] looks at, borrowed from a Service.
pub fn shape(svc: &k8s_openapi::api::core::v1::Service) -> ServiceShape<'_> {
    let spec = svc.spec.as_ref();
    let mut cluster_ips: Vec<&str> = spec
        .and_then(|s| s.cluster_ips.as_ref())
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.and_then(|s| s.cluster_ip.as_deref()));
    }
    ServiceShape {
        labels: svc.metadata.labels.as_ref(),
        annotations: svc.metadata.annotations.as_ref(),
        type_: spec.and_then(|s| s.type_.as_deref()),
        cluster_ips,
        protocols: spec
            .and_then(|s| s.ports.as_ref())
            .map(|ps| ps.iter().map(|p| p.protocol.as_deref()).collect())
            .unwrap_or_default(),
        external_ips: spec
            .and_then(|s| s.external_ips.as_ref())
            .is_some_and(|v| !v.is_empty()),
        load_balancer_source_ranges: spec
            .and_then(|s| s.load_balancer_source_ranges.as_ref())
            .is_some_and(|v| !v.is_empty()),
        allocate_load_balancer_node_ports: spec.and_then(|s| s.allocate_load_balancer_node_ports),
        internal_traffic_policy: spec.and_then(|s| s.internal_traffic_policy.as_deref()),
        external_traffic_policy: spec.and_then(|s| s.external_traffic_policy.as_deref()),
        session_affinity: spec.and_then(|s| s.session_affinity.as_deref()),
        traffic_distribution: spec.and_then(|s| s.traffic_distribution.as_deref()),
    }
}

/// What [`needs`] looks at in a Service, borrowed from it (the caller fills
/// it from its own API types: `spec.*` and `metadata.labels` / `annotations`).
#[derive(Clone, Debug, Default)]
pub struct ServiceShape<'a> {
    /// `metadata.labels`.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// `metadata.annotations`.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// `spec.type` (None = ClusterIP).
    pub type_: Option<&'a str>,
    /// `spec.clusterIPs`, or `spec.clusterIP` when that list is empty.
    pub cluster_ips: Vec<&'a str>,
    /// Each port's `protocol` (None = TCP).
    pub protocols: Vec<Option<&'a str>>,
    /// `spec.externalIPs` is not empty.
    pub external_ips: bool,
    /// `spec.loadBalancerSourceRanges` is not empty.
    pub load_balancer_source_ranges: bool,
    /// `spec.allocateLoadBalancerNodePorts` (None = true).
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: Option<&'a str>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: Option<&'a str>,
    /// `spec.sessionAffinity`.
    pub session_affinity: Option<&'a str>,
    /// `spec.trafficDistribution`.
    pub traffic_distribution: Option<&'a str>,
}

/// Why no proxy serves a Service (kube-proxy skips it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// Labelled [`SERVICE_PROXY_NAME_LABEL`]: another proxy's.
    ServiceProxyName,
    /// Labelled [`HEADLESS_LABEL`].
    HeadlessLabel,
    /// `type: ExternalName` (DNS only).
    ExternalName,
    /// `clusterIP: None` or no cluster IP allocated.
    Headless,
}

impl ServiceShape<'_> {
    /// Why kube-proxy (and so the agent) does not serve this Service, if it does not.
    pub fn skipped(&self) -> Option<Skipped> {
        let labelled = |k: &str| self.labels.is_some_and(|l| l.contains_key(k));
        if labelled(SERVICE_PROXY_NAME_LABEL) {
            Some(Skipped::ServiceProxyName)
        } else if labelled(HEADLESS_LABEL) {
            Some(Skipped::HeadlessLabel)
        } else if self.type_ == Some("ExternalName") {
            Some(Skipped::ExternalName)
        } else if self
            .cluster_ips
            .iter()
            .all(|ip| ip.is_empty() || *ip == "None")
        {
            Some(Skipped::Headless)
        } else {
            None
        }
    }
}

/// What serving this Service takes; None when no proxy serves it
/// ([`ServiceShape::skipped`]).
pub fn needs(s: &ServiceShape) -> Option<BTreeSet<Feature>> {
    if s.skipped().is_some() {
        return None;
    }
    let mut n = BTreeSet::from([Feature::ClusterIp]);
    for ip in &s.cluster_ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => n.insert(Feature::Ipv4),
            Ok(IpAddr::V6(_)) => n.insert(Feature::Ipv6),
            Err(_) => false,
        };
    }
    for p in &s.protocols {
        n.insert(match p.unwrap_or("TCP") {
            "UDP" => Feature::Udp,
            "SCTP" => Feature::Sctp,
            _ => Feature::Tcp,
        });
    }
    match s.type_ {
        Some("NodePort") => {
            n.insert(Feature::NodePort);
        }
        Some("LoadBalancer") => {
            n.insert(Feature::LoadBalancer);
            if s.load_balancer_source_ranges {
                n.insert(Feature::LoadBalancerSourceRanges);
            }
            if s.allocate_load_balancer_node_ports != Some(false) {
                n.insert(Feature::NodePort);
            }
        }
        _ => {}
    }
    if s.external_ips {
        n.insert(Feature::ExternalIps);
    }
    if s.internal_traffic_policy == Some("Local") {
        n.insert(Feature::InternalTrafficLocal);
    }
    if s.external_traffic_policy == Some("Local") {
        n.insert(Feature::ExternalTrafficLocal);
    }
    if s.session_affinity == Some("ClientIP") {
        n.insert(Feature::SessionAffinity);
    }
    let annotated = s
        .annotations
        .is_some_and(|a| TOPOLOGY_ANNOTATIONS.iter().any(|k| a.contains_key(*k)));
    if s.traffic_distribution.is_some_and(|t| !t.is_empty()) || annotated {
        n.insert(Feature::TopologyHints);
    }
    Some(n)
}

/// What of `needs` is not in `served` (empty: served).
pub fn missing(needs: &BTreeSet<Feature>, served: &BTreeSet<Feature>) -> Vec<Feature> {
    needs.difference(served).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<'a>(ips: &[&'a str]) -> ServiceShape<'a> {
        ServiceShape {
            cluster_ips: ips.to_vec(),
            protocols: vec![None],
            ..Default::default()
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_skipped() {
        for f in Feature::ALL {
            assert_eq!(Feature::parse(f.name()), Some(f));
        }
        let all: BTreeSet<Feature> = Feature::ALL.into_iter().collect();
        assert_eq!(parse(&format(&all)), all);
        assert_eq!(
            parse("tcp, udp,warp-drive"),
            BTreeSet::from([Feature::Tcp, Feature::Udp])
        );
        assert_eq!(
            format(&BTreeSet::from([Feature::Udp, Feature::ClusterIp])),
            "clusterip,udp"
        );
    }

    #[test]
    fn kube_proxy_skips_labelled_external_name_and_headless_services() {
        let proxy_name = BTreeMap::from([(SERVICE_PROXY_NAME_LABEL.to_string(), String::new())]);
        let headless = BTreeMap::from([(HEADLESS_LABEL.to_string(), "x".to_string())]);
        let mut s = shape(&["10.96.0.5"]);
        assert!(needs(&s).is_some());
        s.labels = Some(&proxy_name);
        assert_eq!(s.skipped(), Some(Skipped::ServiceProxyName));
        s.labels = Some(&headless);
        assert_eq!(s.skipped(), Some(Skipped::HeadlessLabel));
        assert_eq!(shape(&["None"]).skipped(), Some(Skipped::Headless));
        assert_eq!(shape(&[]).skipped(), Some(Skipped::Headless));
        let mut e = shape(&["10.96.0.5"]);
        e.type_ = Some("ExternalName");
        assert_eq!(e.skipped(), Some(Skipped::ExternalName));
        assert_eq!(needs(&e), None);
    }

    #[test]
    fn needs_follow_type_family_protocol_and_policies() {
        let mut s = shape(&["10.96.0.5", "fd00::5"]);
        s.protocols = vec![None, Some("UDP"), Some("SCTP")];
        s.type_ = Some("LoadBalancer");
        s.external_traffic_policy = Some("Local");
        s.internal_traffic_policy = Some("Local");
        s.session_affinity = Some("ClientIP");
        s.traffic_distribution = Some("PreferClose");
        s.external_ips = true;
        s.load_balancer_source_ranges = true;
        let all: BTreeSet<Feature> = Feature::ALL.into_iter().collect();
        assert_eq!(needs(&s), Some(all));
        // Source ranges matter only to a LoadBalancer (kube-proxy ignores them otherwise).
        let mut np = shape(&["10.96.0.5"]);
        np.type_ = Some("NodePort");
        np.load_balancer_source_ranges = true;
        assert!(!needs(&np)
            .unwrap()
            .contains(&Feature::LoadBalancerSourceRanges));
        s.allocate_load_balancer_node_ports = Some(false);
        assert!(!needs(&s).unwrap().contains(&Feature::NodePort));
        let plain = needs(&shape(&["10.96.0.5"])).unwrap();
        assert_eq!(
            plain,
            BTreeSet::from([Feature::ClusterIp, Feature::Ipv4, Feature::Tcp])
        );
        let served = BTreeSet::from([Feature::ClusterIp, Feature::Ipv4, Feature::Tcp]);
        assert!(missing(&plain, &served).is_empty());
        let mut np = shape(&["10.96.0.5"]);
        np.type_ = Some("NodePort");
        assert_eq!(
            missing(&needs(&np).unwrap(), &served),
            vec![Feature::NodePort]
        );
    }
}
