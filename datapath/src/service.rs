//! A Service as the agent keeps it: only the fields the desired rules
//! ([`crate::desired`]), the health checks, flow names and status read. A
//! k8s-openapi `Service` is over a kilobyte inline (most of `ObjectMeta` and
//! `ServiceSpec` is never read here); at 10k Services that was the largest
//! part of the agent's heap after the endpoints.

use std::collections::BTreeMap;
use std::ops::Deref;

use k8s_openapi::api::core::v1::Service;
use netboot_contract::features::{ServiceShape, TOPOLOGY_ANNOTATIONS};

use crate::desired::{Name, ServiceKey};
use crate::version::Version;

/// The labels of a Service the datapath reads (kube-proxy skips Services
/// carrying either); every other label is dropped.
pub const READ_LABELS: [&str; 2] = [
    netboot_contract::features::SERVICE_PROXY_NAME_LABEL,
    netboot_contract::features::HEADLESS_LABEL,
];

/// The values the API server gives the enum-like fields a [`Svc`] keeps
/// ([`Word`]).
const WORDS: [&str; 14] = [
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalName",
    "None",
    "ClientIP",
    "Cluster",
    "Local",
    "PreferClose",
    "PreferSameZone",
    "PreferSameNode",
    "TCP",
    "UDP",
    "SCTP",
];

/// The value of an enum-like field (`spec.type`, the affinity, the traffic
/// policies and distribution, a port's protocol). The API server fills
/// most of them in on every Service, so each was a heap string per
/// Service (~17 MB at 100k Services): a known value is now an index into
/// [`WORDS`], anything else kept as it came. 16 bytes either way, and
/// `Option<Word>::as_deref()` gives the `&str` as before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Word {
    /// `WORDS[i]`.
    Known(u8),
    /// Not one of [`WORDS`].
    Other(Box<String>),
}

impl Deref for Word {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Word::Known(i) => WORDS.get(usize::from(*i)).copied().unwrap_or_default(),
            Word::Other(s) => s,
        }
    }
}

impl Word {
    /// `s` as a [`Word::Known`]; None when it is not one of [`WORDS`].
    fn known(s: &str) -> Option<Word> {
        WORDS
            .iter()
            .position(|w| *w == s)
            .map(|i| Word::Known(i as u8))
    }
}

impl From<&str> for Word {
    fn from(s: &str) -> Self {
        Word::known(s).unwrap_or_else(|| Word::Other(Box::new(s.to_string())))
    }
}

impl From<String> for Word {
    fn from(s: String) -> Self {
        Word::known(&s).unwrap_or_else(|| Word::Other(Box::new(s)))
    }
}

/// One port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcPort {
    /// `name`.
    pub name: Option<String>,
    /// `protocol` (None = TCP).
    pub protocol: Option<Word>,
    /// `port`.
    pub port: i32,
    /// `nodePort`.
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    /// `ip`.
    pub ip: Option<String>,
    /// `hostname`.
    pub hostname: Option<String>,
    /// `ipMode`.
    pub ip_mode: Option<String>,
}

/// What only north–south Services have (boxed: most Services have none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcExternal {
    /// `spec.externalIPs`.
    pub external_ips: Vec<String>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Vec<String>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Vec<Ingress>,
}

/// A Service, compact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Svc {
    /// `metadata.namespace` ("" when unset).
    pub namespace: Name,
    /// `metadata.name`.
    pub name: Option<Name>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<Version>,
    /// The [`READ_LABELS`] it has.
    pub labels: Option<BTreeMap<String, String>>,
    /// The topology annotations it has.
    pub annotations: Option<BTreeMap<String, String>>,
    /// `spec.type`.
    pub type_: Option<Word>,
    /// `spec.clusterIPs`, or `spec.clusterIP` when that list is empty.
    pub cluster_ips: Vec<String>,
    /// `spec.ports`.
    pub ports: Vec<SvcPort>,
    /// `spec.sessionAffinity`.
    pub session_affinity: Option<Word>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: Option<Word>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: Option<Word>,
    /// `spec.trafficDistribution`.
    pub traffic_distribution: Option<Word>,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
    /// `spec.allocateLoadBalancerNodePorts`.
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// externalIPs, source ranges, LB ingress (None: none of them).
    pub external: Option<Box<SvcExternal>>,
}

fn kept(map: Option<&BTreeMap<String, String>>, keys: &[&str]) -> Option<BTreeMap<String, String>> {
    let m: BTreeMap<String, String> = map?
        .iter()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!m.is_empty()).then_some(m)
}

impl From<&Service> for Svc {
    fn from(s: &Service) -> Self {
        let m = &s.metadata;
        let spec = s.spec.as_ref();
        let mut cluster_ips: Vec<String> =
            spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        if cluster_ips.is_empty() {
            cluster_ips.extend(spec.and_then(|s| s.cluster_ip.clone()));
        }
        let external = SvcExternal {
            external_ips: spec
                .and_then(|s| s.external_ips.clone())
                .unwrap_or_default(),
            load_balancer_source_ranges: spec
                .and_then(|s| s.load_balancer_source_ranges.clone())
                .unwrap_or_default(),
            ingress: s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .map(|i| Ingress {
                    ip: i.ip.clone(),
                    hostname: i.hostname.clone(),
                    ip_mode: i.ip_mode.clone(),
                })
                .collect(),
        };
        let mut ports: Vec<SvcPort> = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| SvcPort {
                name: p.name.clone(),
                protocol: p.protocol.as_deref().map(Word::from),
                port: p.port,
                node_port: p.node_port,
            })
            .collect();
        // Kept for the Service's life: without the room the growth left (a
        // flattened iterator has no exact size: one port kept room for
        // four, 2.4 MiB at 10,000 Services, heaptrack).
        ports.shrink_to_fit();
        let some = |v: Option<&String>| v.map(|v| Word::from(v.as_str()));
        Svc {
            namespace: m.namespace.as_deref().unwrap_or_default().into(),
            name: m.name.as_deref().map(Name::from),
            resource_version: m.resource_version.as_deref().map(Version::new),
            labels: kept(m.labels.as_ref(), &READ_LABELS),
            annotations: kept(m.annotations.as_ref(), &TOPOLOGY_ANNOTATIONS),
            type_: some(spec.and_then(|s| s.type_.as_ref())),
            cluster_ips,
            ports,
            session_affinity: some(spec.and_then(|s| s.session_affinity.as_ref())),
            affinity_timeout: spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            internal_traffic_policy: some(spec.and_then(|s| s.internal_traffic_policy.as_ref())),
            external_traffic_policy: some(spec.and_then(|s| s.external_traffic_policy.as_ref())),
            traffic_distribution: some(spec.and_then(|s| s.traffic_distribution.as_ref())),
            health_check_node_port: spec.and_then(|s| s.health_check_node_port),
            allocate_load_balancer_node_ports: spec
                .and_then(|s| s.allocate_load_balancer_node_ports),
            external: (external != SvcExternal::default()).then(|| Box::new(external)),
        }
    }
}

impl From<Service> for Svc {
    fn from(s: Service) -> Self {
        Svc::from(&s)
    }
}

impl Svc {
    /// (namespace, name); None without a name.
    pub fn key(&self) -> Option<ServiceKey> {
        Some((self.namespace.clone(), self.name.clone()?))
    }

    /// What [`netboot_contract::features::needs`] looks at.
    pub fn shape(&self) -> ServiceShape<'_> {
        let ext = self.external.as_deref();
        ServiceShape {
            labels: self.labels.as_ref(),
            annotations: self.annotations.as_ref(),
            type_: self.type_.as_deref(),
            cluster_ips: self.cluster_ips.iter().map(String::as_str).collect(),
            protocols: self.ports.iter().map(|p| p.protocol.as_deref()).collect(),
            external_ips: ext.is_some_and(|e| !e.external_ips.is_empty()),
            load_balancer_source_ranges: ext
                .is_some_and(|e| !e.load_balancer_source_ranges.is_empty()),
            allocate_load_balancer_node_ports: self.allocate_load_balancer_node_ports,
            internal_traffic_policy: self.internal_traffic_policy.as_deref(),
            external_traffic_policy: self.external_traffic_policy.as_deref(),
            session_affinity: self.session_affinity.as_deref(),
            traffic_distribution: self.traffic_distribution.as_deref(),
        }
    }

    /// `spec.externalIPs`.
    pub fn external_ips(&self) -> &[String] {
        self.external.as_deref().map_or(&[], |e| &e.external_ips)
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn source_ranges(&self) -> &[String] {
        self.external
            .as_deref()
            .map_or(&[], |e| &e.load_balancer_source_ranges)
    }

    /// `status.loadBalancer.ingress`.
    pub fn ingress(&self) -> &[Ingress] {
        self.external.as_deref().map_or(&[], |e| &e.ingress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_rules_read_and_its_shape_is_the_api_objects() {
        let s: Service = serde_yaml::from_str(
            "metadata:
  name: lb
  namespace: d
  resourceVersion: '9'
  labels: {app: web, service.kubernetes.io/headless: ''}
  annotations: {note: x, service.kubernetes.io/topology-mode: Auto}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.8
  clusterIPs: [10.96.5.8, fd00:10:96::8]
  selector: {app: web}
  externalIPs: [198.51.100.4]
  loadBalancerSourceRanges: [10.0.0.0/8]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  ports: [{name: http, port: 80, nodePort: 30080}, {port: 53, protocol: UDP}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.10, ipMode: VIP}, {hostname: lb.example}]}}",
        )
        .unwrap();
        let c = Svc::from(&s);
        assert_eq!(c.key(), Some(("d".into(), "lb".into())));
        assert_eq!(c.labels.as_ref().map(|l| l.len()), Some(1));
        assert_eq!(c.annotations.as_ref().map(|l| l.len()), Some(1));
        assert_eq!(c.affinity_timeout, Some(60));
        assert_eq!(c.health_check_node_port, Some(31000));
        assert_eq!(c.external_ips(), ["198.51.100.4"]);
        assert_eq!(c.source_ranges(), ["10.0.0.0/8"]);
        assert_eq!(c.ingress().len(), 2);
        assert_eq!(c.ports[0].node_port, Some(30080));
        let (a, b) = (netboot_contract::features::shape(&s), c.shape());
        use netboot_contract::features::needs;
        assert_eq!((needs(&a), a.skipped()), (needs(&b), b.skipped()));
        // A plain ClusterIP Service has nothing boxed.
        let plain: Service = serde_yaml::from_str(
            "metadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        )
        .unwrap();
        let p = Svc::from(&plain);
        assert!(p.external.is_none() && p.labels.is_none());
        assert_eq!(p.cluster_ips, ["10.96.0.1"]);
    }

    #[test]
    fn a_service_is_much_smaller_than_the_api_object() {
        // Why: 10k Services as API objects were 13 MiB of the agent's heap (issue 18).
        let api = std::mem::size_of::<Service>();
        let lean = std::mem::size_of::<Svc>();
        assert!(lean * 2 <= api, "{lean} vs {api} bytes");
    }

    #[test]
    fn an_enum_like_value_is_held_without_a_string_unless_unknown() {
        for w in WORDS {
            let v = Word::from(w);
            assert!(matches!(v, Word::Known(_)), "{w}");
            assert_eq!(&*v, w);
            assert_eq!(Word::from(w.to_string()), v);
        }
        // A value a newer API server may add, and case that does not match:
        // kept as given, never taken for a known one.
        for other in ["PreferSomewhereNew", "local", ""] {
            let v = Word::from(other);
            assert_eq!(v, Word::Other(Box::new(other.to_string())));
            assert_eq!(&*v, other);
        }
        assert_eq!(std::mem::size_of::<Option<Word>>(), 16);
        // As the rules read it.
        let svc = Svc {
            type_: Some("LoadBalancer".into()),
            internal_traffic_policy: Some("Local".into()),
            ..Default::default()
        };
        assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(svc.shape().internal_traffic_policy, Some("Local"));
    }
}
