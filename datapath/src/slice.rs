//! An EndpointSlice as the agent keeps it: only what the desired rules
//! ([`crate::desired`]) and the flow names ([`crate::flows`]) read, with the
//! addresses parsed once. A k8s-openapi `Endpoint` is ~340 bytes inline
//! (most of it `targetRef`, `deprecatedTopology`, `hostname`, `zone`) plus
//! its address strings; [`SliceEndpoint`] is a fraction of that, which at
//! 100k endpoints is most of the agent's memory.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::desired::{proto_of, Name, ServiceKey, SERVICE_NAME_LABEL};
use crate::version::Version;

/// The address family of a slice (`addressType`); FQDN slices are kept
/// (they still name their Service) but hold no backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceFamily {
    /// `IPv4`.
    V4,
    /// `IPv6`.
    V6,
    /// `FQDN` or anything else.
    Other,
}

/// One port of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// `name` ("" when unset).
    pub name: String,
    /// `protocol` as a `PROTO_*` number (None: neither TCP nor UDP).
    pub proto: Option<u8>,
    /// `port` (None: unset or out of range).
    pub port: Option<u16>,
}

/// Topology hints of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forZones[].name`.
    pub zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub nodes: Vec<String>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address, parsed (None: it does not parse).
    pub ip: Option<IpAddr>,
    /// `conditions.ready` (nil = true).
    pub ready: bool,
    /// `conditions.serving` (nil = ready).
    pub serving: bool,
    /// `conditions.terminating` (nil = false).
    pub terminating: bool,
    /// `nodeName`, shared with every other endpoint on that node
    /// ([`node_name`]).
    pub node: Option<NodeName>,
    /// `hints` (None: no hints at all).
    pub hints: Option<Box<Hints>>,
    /// `targetRef` of kind Pod (flow events); [`Slice::pod`] spells it.
    pub pod: PodName,
}

/// A node name as endpoints hold it: one shared copy per name
/// ([`node_name`]), behind a thin pointer (8 bytes in each endpoint where an
/// `Arc<str>` takes 16).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeName(Arc<String>);

impl Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Hashes and compares as the name itself (derived on the `String`), so
/// the set of names is searched by `&str`.
impl Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The node names endpoints are on, each held once: a cluster has far
/// fewer nodes than endpoints (100,000 endpoints on 1,000 nodes at 10k
/// Services x 10), and one allocation per endpoint cost ~3 MiB there.
static NODE_NAMES: Mutex<NodeNames> = Mutex::new(NodeNames {
    names: None,
    kept: 0,
});

struct NodeNames {
    names: Option<HashSet<NodeName>>,
    /// How many were left after the last sweep.
    kept: usize,
}

/// `name` as the one shared copy of it.
pub fn node_name(name: &str) -> NodeName {
    let Ok(mut n) = NODE_NAMES.lock() else {
        // A panic while holding the lock: no sharing from then on.
        return NodeName(Arc::new(name.to_string()));
    };
    let n = &mut *n;
    let names = n.names.get_or_insert_with(HashSet::new);
    if let Some(a) = names.get(name) {
        return a.clone();
    }
    // Nodes come and go (autoscaling): drop the names no endpoint holds
    // any more each time the set has doubled since the last sweep.
    if names.len() >= 2 * n.kept + 1024 {
        names.retain(|a| Arc::strong_count(&a.0) > 1);
        n.kept = names.len();
    }
    let a = NodeName(Arc::new(name.to_string()));
    names.insert(a.clone());
    a
}

/// Bytes of a pod name after the slice's [`Slice::pod_prefix`] held inline.
const SUFFIX_BYTES: usize = 14;

/// An endpoint's pod, without a heap allocation for the usual case: a pod
/// in the slice's namespace whose name is the slice's `pod_prefix` (its
/// first pod's name up to the last `-`: a ReplicaSet's `web-7f9c4d8b6-`, a
/// StatefulSet's `db-`) followed by at most 14 bytes. With one
/// `namespace/name` per endpoint the API's `targetRef`s cost the agent ~47
/// MiB at 100k Services x 10 endpoints (results/bench/coldstart-api.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodName {
    /// No `targetRef` of kind Pod.
    #[default]
    None,
    /// In the slice's namespace, named `pod_prefix` + these bytes.
    Suffix {
        /// Bytes used.
        len: u8,
        /// The suffix, UTF-8 (the prefix ends at an ASCII `-` or is empty).
        bytes: [u8; SUFFIX_BYTES],
    },
    /// Any other: `namespace/name` (a thin box: the enum is 16 bytes, not
    /// 24).
    Full(Box<String>),
}

/// Sets each endpoint's pod from its `targetRef`, `(endpoint index,
/// namespace, name)` with an empty namespace meaning `slice_ns`, and
/// returns the slice's pod prefix (see [`PodName`]).
pub(crate) fn name_pods<'a>(
    slice_ns: &str,
    endpoints: &mut [SliceEndpoint],
    refs: impl IntoIterator<Item = (usize, &'a str, &'a str)>,
) -> Box<str> {
    let mut prefix: Option<&str> = None;
    for (i, ns, name) in refs {
        let Some(ep) = endpoints.get_mut(i) else {
            continue;
        };
        let ns = if ns.is_empty() { slice_ns } else { ns };
        if ns.is_empty() || name.is_empty() {
            continue;
        }
        let local = ns == slice_ns;
        if local && prefix.is_none() {
            prefix = Some(name.rfind('-').map_or("", |at| &name[..=at]));
        }
        let suffix = prefix
            .filter(|_| local)
            .and_then(|p| name.strip_prefix(p))
            .filter(|s| s.len() <= SUFFIX_BYTES);
        ep.pod = match suffix {
            Some(s) => {
                let mut bytes = [0u8; SUFFIX_BYTES];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                PodName::Suffix {
                    len: s.len() as u8,
                    bytes,
                }
            }
            None => PodName::Full(Box::new(format!("{ns}/{name}"))),
        };
    }
    Box::from(prefix.unwrap_or(""))
}

/// An EndpointSlice, compact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// `metadata.namespace`.
    pub namespace: Name,
    /// `metadata.name`.
    pub name: Name,
    /// Its `kubernetes.io/service-name` label.
    pub service: Option<Name>,
    /// `addressType`.
    pub family: SliceFamily,
    /// `ports`.
    pub ports: Vec<SlicePort>,
    /// `endpoints`.
    pub endpoints: Vec<SliceEndpoint>,
    /// `metadata.resourceVersion` (a relist writes only what changed).
    pub resource_version: Option<Version>,
    /// What its endpoints' [`PodName::Suffix`] names follow.
    pub pod_prefix: Box<str>,
}

impl Slice {
    /// Endpoint `ep`'s pod as `namespace/name`, None without one.
    pub fn pod(&self, ep: &SliceEndpoint) -> Option<String> {
        match &ep.pod {
            PodName::None => None,
            PodName::Suffix { len, bytes } => {
                let suffix = std::str::from_utf8(bytes.get(..usize::from(*len))?).ok()?;
                Some(format!("{}/{}{suffix}", self.namespace, self.pod_prefix))
            }
            PodName::Full(p) => Some(p.to_string()),
        }
    }

    /// The Service this slice belongs to (its label), None without one.
    pub fn service_key(&self) -> Option<ServiceKey> {
        Some((self.namespace.clone(), self.service.clone()?))
    }

    /// Whether it is labelled as belonging to Service `ns/name`.
    pub fn belongs_to(&self, ns: &str, name: &str) -> bool {
        &*self.namespace == ns && self.service.as_deref() == Some(name)
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Self {
        let m = &s.metadata;
        let namespace = m.namespace.clone().unwrap_or_default();
        let family = match s.address_type.as_str() {
            "IPv4" => SliceFamily::V4,
            "IPv6" => SliceFamily::V6,
            _ => SliceFamily::Other,
        };
        let mut ports: Vec<SlicePort> = s
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.clone().unwrap_or_default(),
                proto: proto_of(p.protocol.as_deref()),
                port: p.port.and_then(|p| u16::try_from(p).ok()),
            })
            .collect();
        let mut refs = Vec::new();
        let mut endpoints: Vec<SliceEndpoint> = s
            .endpoints
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ep)| {
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let hints = ep.hints.as_ref().map(|h| {
                    Box::new(Hints {
                        zones: h
                            .for_zones
                            .iter()
                            .flatten()
                            .map(|z| z.name.clone())
                            .collect(),
                        nodes: h
                            .for_nodes
                            .iter()
                            .flatten()
                            .map(|n| n.name.clone())
                            .collect(),
                    })
                });
                if let Some(r) = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                {
                    refs.push((
                        i,
                        r.namespace.as_deref().unwrap_or_default(),
                        r.name.as_deref().unwrap_or_default(),
                    ));
                }
                SliceEndpoint {
                    ip: ep.addresses.first().and_then(|a| a.parse().ok()),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node: ep.node_name.as_deref().map(node_name),
                    hints,
                    pod: PodName::None,
                }
            })
            .collect();
        let pod_prefix = name_pods(&namespace, &mut endpoints, refs);
        // Kept for the slice's life: without the room the growth left (a
        // flattened iterator has no exact size; 10 endpoints took 16 slots).
        ports.shrink_to_fit();
        endpoints.shrink_to_fit();
        Slice {
            service: m
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(|s| Name::from(s.as_str())),
            namespace: namespace.into(),
            name: m.name.as_deref().unwrap_or_default().into(),
            family,
            ports,
            endpoints,
            resource_version: m.resource_version.as_deref().map(Version::new),
            pod_prefix,
        }
    }
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        Slice::from(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PROTO_TCP, PROTO_UDP};

    #[test]
    fn keeps_what_the_rules_read_with_the_api_defaults_applied() {
        let s: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: w-1, namespace: d, resourceVersion: '7', labels: {kubernetes.io/service-name: w}}
addressType: IPv4
ports: [{name: http, port: 8080}, {port: 53, protocol: UDP}, {port: 9, protocol: SCTP}]
endpoints:
- {addresses: [10.244.0.1], nodeName: n1, targetRef: {kind: Pod, name: w-abc}}
- {addresses: [10.244.0.2], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: z1}]}}
- {addresses: [not-an-ip], conditions: {ready: false}}
",
        )
        .unwrap();
        let c = Slice::from(&s);
        assert_eq!(c.service_key(), Some(("d".into(), "w".into())));
        assert!(c.belongs_to("d", "w") && !c.belongs_to("e", "w"));
        assert_eq!(c.family, SliceFamily::V4);
        assert_eq!(c.resource_version, Some(Version::Number(7)));
        let ports: Vec<_> = c
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.proto, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", Some(PROTO_TCP), Some(8080)),
                ("", Some(PROTO_UDP), Some(53)),
                ("", None, Some(9))
            ]
        );
        let e = &c.endpoints;
        assert_eq!(e[0].ip, Some("10.244.0.1".parse().unwrap()));
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert_eq!(e[0].node.as_deref(), Some("n1"));
        assert_eq!(c.pod(&e[0]).as_deref(), Some("d/w-abc"));
        assert_eq!(c.pod(&e[1]), None);
        assert!(!e[1].ready && e[1].serving && e[1].terminating);
        assert_eq!(e[1].hints.as_ref().unwrap().zones, ["z1"]);
        assert_eq!((e[2].ip, e[2].ready, e[2].serving), (None, false, false));
    }

    #[test]
    fn an_endpoint_is_56_bytes() {
        // 1,000,000 of them at 100k Services x 10: each 8 bytes are 8 MB.
        assert_eq!(std::mem::size_of::<PodName>(), 16);
        assert_eq!(std::mem::size_of::<Option<NodeName>>(), 8);
        assert_eq!(std::mem::size_of::<SliceEndpoint>(), 56);
    }

    #[test]
    fn a_node_name_is_held_once_and_dropped_when_unused() {
        let a = node_name("nn-shared");
        let b = node_name("nn-shared");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(&*a, "nn-shared");
        // Enough names no endpoint holds to trigger sweeps.
        for i in 0..5000 {
            let _ = node_name(&format!("nn-gone-{i}"));
        }
        let n = NODE_NAMES.lock().unwrap();
        let names = n.names.as_ref().unwrap();
        assert!(names.contains("nn-shared"), "a held name stays");
        assert!(names.len() < 4000, "swept: {}", names.len());
    }

    #[test]
    fn pods_after_the_slices_prefix_are_held_inline() {
        let ep = || SliceEndpoint {
            ip: None,
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            hints: None,
            pod: PodName::None,
        };
        let named = |refs: &[(&'static str, &'static str)]| {
            let mut s = Slice {
                namespace: "db".into(),
                name: "x".into(),
                service: None,
                family: SliceFamily::V4,
                ports: Vec::new(),
                endpoints: refs.iter().map(|_| ep()).collect(),
                resource_version: None,
                pod_prefix: Box::from(""),
            };
            let refs = refs.iter().enumerate().map(|(i, (ns, n))| (i, *ns, *n));
            s.pod_prefix = name_pods("db", &mut s.endpoints, refs);
            let inline: Vec<bool> = s
                .endpoints
                .iter()
                .map(|e| matches!(e.pod, PodName::Suffix { .. }))
                .collect();
            let pods: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| s.pod(e).unwrap_or_default())
                .collect();
            (s.pod_prefix.to_string(), inline, pods)
        };
        // A StatefulSet's; the first pod in another namespace sets no prefix.
        assert_eq!(
            named(&[("other", "db-9"), ("", "db-0"), ("db", "db-10")]),
            (
                "db-".into(),
                vec![false, true, true],
                vec!["other/db-9".into(), "db/db-0".into(), "db/db-10".into()]
            )
        );
        // A name without a dash: no prefix, the name itself inline when short.
        assert_eq!(
            named(&[("", "solo"), ("", "a-name-of-fifteen")]),
            (
                String::new(),
                vec![true, false],
                vec!["db/solo".into(), "db/a-name-of-fifteen".into()]
            )
        );
        // Multi-byte UTF-8 after the prefix is kept whole.
        assert_eq!(named(&[("", "w-é")]).2, vec!["db/w-é".to_string()]);
    }

    #[test]
    fn an_endpoint_is_much_smaller_than_the_api_object() {
        // Why: 100k endpoints as API objects were most of the agent's RSS (issue 18).
        let api = std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>();
        let lean = std::mem::size_of::<SliceEndpoint>();
        assert!(lean * 4 <= api, "{lean} vs {api} bytes");
    }
}
