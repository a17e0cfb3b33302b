//! An EndpointSlice as the agent keeps it: only what the desired rules
//! ([`crate::desired`]) and the flow names ([`crate::flows`]) read, with the
//! addresses parsed once. A k8s-openapi `Endpoint` is ~340 bytes inline
//! (most of it `targetRef`, `deprecatedTopology`, `hostname`, `zone`) plus
//! its address strings; [`SliceEndpoint`] is a fraction of that, which at
//! 100k endpoints is most of the agent's memory.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::desired::{proto_of, ServiceKey, SERVICE_NAME_LABEL};

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
    /// `nodeName`.
    pub node: Option<Box<str>>,
    /// `hints` (None: no hints at all).
    pub hints: Option<Box<Hints>>,
    /// `targetRef` of kind Pod as `namespace/name` (flow events).
    pub pod: Option<Box<str>>,
}

/// An EndpointSlice, compact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    /// `addressType`.
    pub family: SliceFamily,
    /// `ports`.
    pub ports: Vec<SlicePort>,
    /// `endpoints`.
    pub endpoints: Vec<SliceEndpoint>,
    /// `metadata.resourceVersion` (a relist writes only what changed).
    pub resource_version: Option<String>,
}

impl Slice {
    /// The Service this slice belongs to (its label), None without one.
    pub fn service_key(&self) -> Option<ServiceKey> {
        Some((self.namespace.clone(), self.service.clone()?))
    }

    /// Whether it is labelled as belonging to Service `ns/name`.
    pub fn belongs_to(&self, ns: &str, name: &str) -> bool {
        self.namespace == ns && self.service.as_deref() == Some(name)
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
        let mut endpoints: Vec<SliceEndpoint> = s
            .endpoints
            .iter()
            .flatten()
            .map(|ep| {
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
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.as_ref().or(m.namespace.as_ref())?;
                        Some(format!("{ns}/{}", r.name.as_ref()?).into_boxed_str())
                    });
                SliceEndpoint {
                    ip: ep.addresses.first().and_then(|a| a.parse().ok()),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node: ep.node_name.as_deref().map(Box::from),
                    hints,
                    pod,
                }
            })
            .collect();
        // Kept for the slice's life: without the room the growth left (a
        // flattened iterator has no exact size; 10 endpoints took 16 slots).
        ports.shrink_to_fit();
        endpoints.shrink_to_fit();
        Slice {
            service: m
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned(),
            namespace,
            name: m.name.clone().unwrap_or_default(),
            family,
            ports,
            endpoints,
            resource_version: m.resource_version.clone(),
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
        assert_eq!(c.resource_version.as_deref(), Some("7"));
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
        assert_eq!(e[0].pod.as_deref(), Some("d/w-abc"));
        assert!(!e[1].ready && e[1].serving && e[1].terminating);
        assert_eq!(e[1].hints.as_ref().unwrap().zones, ["z1"]);
        assert_eq!((e[2].ip, e[2].ready, e[2].serving), (None, false, false));
    }

    #[test]
    fn an_endpoint_is_much_smaller_than_the_api_object() {
        // Why: 100k endpoints as API objects were most of the agent's RSS (issue 18).
        let api = std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>();
        let lean = std::mem::size_of::<SliceEndpoint>();
        assert!(lean * 4 <= api, "{lean} vs {api} bytes");
    }
}
