//! Lists of Services and EndpointSlices in the API server's protobuf
//! encoding (`application/vnd.kubernetes.protobuf`), decoded into the
//! compact forms the stores keep: a Service through prost's message of the
//! fields read ([`ListedService`]), an EndpointSlice by hand straight from
//! the bytes ([`slice`]). Neither builds the k8s-openapi object the JSON
//! path and the watch build and then throw away; the tests decode the same
//! bodies through that generic path and compare.
//!
//! Why: at 10,000 Services × 10 endpoints a cold start is mostly the two
//! lists, and the lists are mostly JSON — the API server encoding it and
//! the agent decoding it. The same EndpointSlice list is 7.7 MiB in
//! protobuf against 18 MiB in JSON, and the API server serves it in half
//! the time (`netboot-bench coldstart-api`, tests/bench/README.md).
//!
//! Only the fields the datapath reads are declared, with the numbers of
//! k8s.io/api's `generated.proto` (core/v1, discovery/v1) and
//! apimachinery's (meta/v1, runtime); protobuf skips every other field
//! without building it — `managedFields[].fieldsV1`, selectors, conditions
//! — which is what [`crate::lean`] does for JSON.
//!
//! Go's non-pointer fields are always encoded, empty or not, where JSON
//! omits them (`omitempty`): an empty string or a zero number of such a
//! field becomes None here, so both encodings give the same objects
//! (`api_lists` lists a varied set both ways from a real API server and
//! compares what the stores keep).

use std::collections::BTreeMap;

use bytes::{Buf, Bytes};
#[cfg(test)]
use k8s_openapi::api::core::v1 as core;
#[cfg(test)]
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
#[cfg(test)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use prost::Message;

use crate::desired::Name;
use crate::service::{Ingress, Svc, SvcExternal, SvcPort, Word, READ_LABELS};
use crate::version::Version;
use netboot_contract::features::TOPOLOGY_ANNOTATIONS;

/// The media type asked for.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// What starts every protobuf body of the API server.
const MAGIC: &[u8; 4] = b"k8s\0";

pub mod slice;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// It does not start with the magic number.
    #[error("not a Kubernetes protobuf body (no k8s\\0 prefix)")]
    NoMagic,
    /// The envelope or the object is not valid protobuf.
    #[error("invalid protobuf: {0}")]
    Invalid(#[from] prost::DecodeError),
    /// A field is not what its number says it is ([`slice`]).
    #[error("invalid protobuf: {0}")]
    Malformed(&'static str),
    /// The envelope holds another kind.
    #[error("expected a {expected}, the body is a {got}")]
    Kind {
        /// What was asked for.
        expected: &'static str,
        /// What came.
        got: String,
    },
}

/// `runtime.TypeMeta` (not meta/v1's: the numbers differ).
#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

/// `runtime.Unknown`: the envelope of every protobuf body.
#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "bytes", optional, tag = "2")]
    raw: Option<Bytes>,
}

/// `metav1.ListMeta`.
#[derive(Clone, PartialEq, Message)]
pub struct ListMeta {
    /// `resourceVersion`.
    #[prost(string, optional, tag = "2")]
    pub resource_version: Option<String>,
    /// `continue`.
    #[prost(string, optional, tag = "3")]
    pub continue_: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PbTime {
    #[prost(int64, optional, tag = "1")]
    seconds: Option<i64>,
    #[prost(int32, optional, tag = "2")]
    nanos: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct PbManagedFields {
    #[prost(message, optional, tag = "4")]
    time: Option<PbTime>,
}

#[derive(Clone, PartialEq, Message)]
struct PbMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "5")]
    uid: Option<String>,
    #[prost(string, optional, tag = "6")]
    resource_version: Option<String>,
    #[prost(int64, optional, tag = "7")]
    generation: Option<i64>,
    #[prost(message, optional, tag = "8")]
    creation_timestamp: Option<PbTime>,
    #[prost(message, optional, tag = "9")]
    deletion_timestamp: Option<PbTime>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "17")]
    managed_fields: Vec<PbManagedFields>,
}

#[derive(Clone, PartialEq, Message)]
struct PbServicePort {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    protocol: Option<String>,
    #[prost(int32, optional, tag = "3")]
    port: Option<i32>,
    #[prost(int32, optional, tag = "5")]
    node_port: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct PbClientIp {
    #[prost(int32, optional, tag = "1")]
    timeout_seconds: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct PbAffinityConfig {
    #[prost(message, optional, tag = "1")]
    client_ip: Option<PbClientIp>,
}

#[derive(Clone, PartialEq, Message)]
struct PbServiceSpec {
    #[prost(message, repeated, tag = "1")]
    ports: Vec<PbServicePort>,
    #[prost(string, optional, tag = "3")]
    cluster_ip: Option<String>,
    #[prost(string, repeated, tag = "18")]
    cluster_ips: Vec<String>,
    #[prost(string, optional, tag = "4")]
    type_: Option<String>,
    #[prost(string, repeated, tag = "5")]
    external_ips: Vec<String>,
    #[prost(string, optional, tag = "7")]
    session_affinity: Option<String>,
    #[prost(string, repeated, tag = "9")]
    load_balancer_source_ranges: Vec<String>,
    #[prost(string, optional, tag = "11")]
    external_traffic_policy: Option<String>,
    #[prost(int32, optional, tag = "12")]
    health_check_node_port: Option<i32>,
    #[prost(message, optional, tag = "14")]
    session_affinity_config: Option<PbAffinityConfig>,
    #[prost(bool, optional, tag = "20")]
    allocate_load_balancer_node_ports: Option<bool>,
    #[prost(string, optional, tag = "22")]
    internal_traffic_policy: Option<String>,
    #[prost(string, optional, tag = "23")]
    traffic_distribution: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PbIngress {
    #[prost(string, optional, tag = "1")]
    ip: Option<String>,
    #[prost(string, optional, tag = "2")]
    hostname: Option<String>,
    #[prost(string, optional, tag = "3")]
    ip_mode: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PbLoadBalancerStatus {
    #[prost(message, repeated, tag = "1")]
    ingress: Vec<PbIngress>,
}

#[derive(Clone, PartialEq, Message)]
struct PbServiceStatus {
    #[prost(message, optional, tag = "1")]
    load_balancer: Option<PbLoadBalancerStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct PbService {
    #[prost(message, optional, tag = "1")]
    metadata: Option<PbMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<PbServiceSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<PbServiceStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct PbServiceList {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ListMeta>,
    #[prost(message, repeated, tag = "2")]
    items: Vec<PbService>,
}

// The EndpointSlice messages: [`slice`] decodes them by hand, straight
// into the compact form; these, and the generic path through k8s-openapi's
// type, are the reference it is tested against.

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbConditions {
    #[prost(bool, optional, tag = "1")]
    ready: Option<bool>,
    #[prost(bool, optional, tag = "2")]
    serving: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    terminating: Option<bool>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbObjectReference {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "2")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbNamed {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbHints {
    #[prost(message, repeated, tag = "1")]
    for_zones: Vec<PbNamed>,
    #[prost(message, repeated, tag = "2")]
    for_nodes: Vec<PbNamed>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbEndpoint {
    #[prost(string, repeated, tag = "1")]
    addresses: Vec<String>,
    #[prost(message, optional, tag = "2")]
    conditions: Option<PbConditions>,
    #[prost(message, optional, tag = "4")]
    target_ref: Option<PbObjectReference>,
    #[prost(string, optional, tag = "6")]
    node_name: Option<String>,
    #[prost(string, optional, tag = "7")]
    zone: Option<String>,
    #[prost(message, optional, tag = "8")]
    hints: Option<PbHints>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbEndpointPort {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    protocol: Option<String>,
    #[prost(int32, optional, tag = "3")]
    port: Option<i32>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbEndpointSlice {
    #[prost(message, optional, tag = "1")]
    metadata: Option<PbMeta>,
    #[prost(message, repeated, tag = "2")]
    endpoints: Vec<PbEndpoint>,
    #[prost(message, repeated, tag = "3")]
    ports: Vec<PbEndpointPort>,
    #[prost(string, optional, tag = "4")]
    address_type: Option<String>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct PbEndpointSliceList {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ListMeta>,
    #[prost(message, repeated, tag = "2")]
    items: Vec<PbEndpointSlice>,
}

/// A Go non-pointer string: empty is unset (JSON's `omitempty`).
fn text(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// [`text`] as a [`Word`].
fn word(s: Option<String>) -> Option<Word> {
    text(s).map(Word::from)
}

/// A Go non-pointer number: zero is unset (JSON's `omitempty`).
fn number(n: Option<i32>) -> Option<i32> {
    n.filter(|n| *n != 0)
}

/// A list: None when empty (JSON omits it).
#[cfg(test)]
fn list<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// A `metav1.Time`; the zero time (Go's non-pointer default) is unset.
fn time(t: Option<PbTime>) -> Option<Time> {
    let t = t?;
    let (s, n) = (t.seconds.unwrap_or(0), t.nanos.unwrap_or(0));
    if s == 0 && n == 0 {
        return None;
    }
    k8s_openapi::jiff::Timestamp::new(s, n).ok().map(Time)
}

#[cfg(test)]
fn meta(m: Option<PbMeta>) -> ObjectMeta {
    let m = m.unwrap_or_default();
    ObjectMeta {
        name: text(m.name),
        namespace: text(m.namespace),
        uid: text(m.uid),
        resource_version: text(m.resource_version),
        generation: m.generation.filter(|g| *g != 0),
        creation_timestamp: time(m.creation_timestamp),
        deletion_timestamp: time(m.deletion_timestamp),
        labels: (!m.labels.is_empty()).then_some(m.labels),
        annotations: (!m.annotations.is_empty()).then_some(m.annotations),
        managed_fields: list(
            m.managed_fields
                .into_iter()
                .filter_map(|e| time(e.time))
                .map(|t| ManagedFieldsEntry {
                    time: Some(t),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}

/// The generic path, kept as the reference [`ListedService`] is tested
/// against.
#[cfg(test)]
impl From<PbService> for core::Service {
    fn from(s: PbService) -> Self {
        let spec = s.spec.map(|p| core::ServiceSpec {
            ports: list(
                p.ports
                    .into_iter()
                    .map(|p| core::ServicePort {
                        name: text(p.name),
                        protocol: text(p.protocol),
                        port: p.port.unwrap_or(0),
                        node_port: number(p.node_port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            cluster_ip: text(p.cluster_ip),
            cluster_ips: list(p.cluster_ips),
            type_: text(p.type_),
            external_ips: list(p.external_ips),
            session_affinity: text(p.session_affinity),
            load_balancer_source_ranges: list(p.load_balancer_source_ranges),
            external_traffic_policy: text(p.external_traffic_policy),
            health_check_node_port: number(p.health_check_node_port),
            session_affinity_config: p.session_affinity_config.map(|c| {
                core::SessionAffinityConfig {
                    client_ip: c.client_ip.map(|c| core::ClientIPConfig {
                        timeout_seconds: c.timeout_seconds,
                    }),
                }
            }),
            allocate_load_balancer_node_ports: p.allocate_load_balancer_node_ports,
            internal_traffic_policy: p.internal_traffic_policy,
            traffic_distribution: p.traffic_distribution,
            ..Default::default()
        });
        let status = s.status.map(|st| core::ServiceStatus {
            load_balancer: st.load_balancer.map(|lb| core::LoadBalancerStatus {
                ingress: list(
                    lb.ingress
                        .into_iter()
                        .map(|i| core::LoadBalancerIngress {
                            ip: text(i.ip),
                            hostname: text(i.hostname),
                            ip_mode: i.ip_mode,
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
        core::Service {
            metadata: meta(s.metadata),
            spec,
            status,
        }
    }
}

/// A Service of a list, as the stores keep it.
#[derive(Debug)]
pub struct ListedService {
    /// What the store keeps.
    pub svc: Svc,
    /// Its last write ([`crate::latency::service_trigger`]).
    pub trigger: Option<crate::latency::Triggered>,
}

/// Only the entries of `map` whose key is one of `keys`; None if none.
fn kept(mut map: BTreeMap<String, String>, keys: &[&str]) -> Option<BTreeMap<String, String>> {
    map.retain(|k, _| keys.contains(&k.as_str()));
    (!map.is_empty()).then_some(map)
}

/// Straight to the compact Service, moving the decoded strings: what
/// `Svc::from(&core::Service::from(s))` gives (the tests compare), without
/// building the k8s-openapi Service and cloning out of it.
impl From<PbService> for ListedService {
    fn from(s: PbService) -> Self {
        let m = s.metadata.unwrap_or_default();
        let newest = m
            .managed_fields
            .into_iter()
            .filter_map(|e| time(e.time))
            .max()
            .or_else(|| time(m.creation_timestamp));
        let p = s.spec.unwrap_or_default();
        let mut cluster_ips = p.cluster_ips;
        if cluster_ips.is_empty() {
            cluster_ips.extend(text(p.cluster_ip));
        }
        let mut ports: Vec<SvcPort> = p
            .ports
            .into_iter()
            .map(|p| SvcPort {
                name: text(p.name),
                protocol: word(p.protocol),
                port: p.port.unwrap_or(0),
                node_port: number(p.node_port),
            })
            .collect();
        ports.shrink_to_fit();
        let external = SvcExternal {
            external_ips: p.external_ips,
            load_balancer_source_ranges: p.load_balancer_source_ranges,
            ingress: s
                .status
                .and_then(|st| st.load_balancer)
                .map(|lb| lb.ingress)
                .unwrap_or_default()
                .into_iter()
                .map(|i| Ingress {
                    ip: text(i.ip),
                    hostname: text(i.hostname),
                    ip_mode: i.ip_mode,
                })
                .collect(),
        };
        let svc = Svc {
            namespace: text(m.namespace).unwrap_or_default().into(),
            name: text(m.name).map(Name::from),
            resource_version: text(m.resource_version).as_deref().map(Version::new),
            labels: kept(m.labels, &READ_LABELS),
            annotations: kept(m.annotations, &TOPOLOGY_ANNOTATIONS),
            type_: word(p.type_),
            cluster_ips,
            ports,
            session_affinity: word(p.session_affinity),
            affinity_timeout: p
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            internal_traffic_policy: p.internal_traffic_policy.map(Word::from),
            external_traffic_policy: word(p.external_traffic_policy),
            traffic_distribution: p.traffic_distribution.map(Word::from),
            health_check_node_port: number(p.health_check_node_port),
            allocate_load_balancer_node_ports: p.allocate_load_balancer_node_ports,
            external: (external != SvcExternal::default()).then(|| Box::new(external)),
        };
        ListedService {
            svc,
            trigger: newest.map(|t| crate::latency::service_trigger_at(t.0)),
        }
    }
}

/// Decodes a whole `ServiceList` response body into what the stores keep.
pub fn decode_services(body: Bytes) -> Result<(Vec<ListedService>, ListMeta), DecodeError> {
    let l = PbServiceList::decode(unwrap_envelope(body, "ServiceList")?)?;
    let items = l.items.into_iter().map(ListedService::from).collect();
    Ok((items, l.metadata.unwrap_or_default()))
}

/// The generic path, kept as the reference [`slice`] is tested against.
#[cfg(test)]
impl From<PbEndpointSlice> for discovery::EndpointSlice {
    fn from(s: PbEndpointSlice) -> Self {
        let named = |v: Vec<PbNamed>| -> Option<Vec<String>> {
            list(v.into_iter().map(|n| n.name.unwrap_or_default()).collect())
        };
        discovery::EndpointSlice {
            metadata: meta(s.metadata),
            address_type: s.address_type.unwrap_or_default(),
            endpoints: list(
                s.endpoints
                    .into_iter()
                    .map(|e| discovery::Endpoint {
                        addresses: e.addresses,
                        conditions: e.conditions.map(|c| discovery::EndpointConditions {
                            ready: c.ready,
                            serving: c.serving,
                            terminating: c.terminating,
                        }),
                        target_ref: e.target_ref.map(|r| core::ObjectReference {
                            kind: text(r.kind),
                            namespace: text(r.namespace),
                            name: text(r.name),
                            ..Default::default()
                        }),
                        node_name: e.node_name,
                        zone: e.zone,
                        hints: e.hints.map(|h| discovery::EndpointHints {
                            for_zones: named(h.for_zones).map(|v| {
                                v.into_iter()
                                    .map(|name| discovery::ForZone { name })
                                    .collect()
                            }),
                            for_nodes: named(h.for_nodes).map(|v| {
                                v.into_iter()
                                    .map(|name| discovery::ForNode { name })
                                    .collect()
                            }),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: list(
                s.ports
                    .into_iter()
                    .map(|p| discovery::EndpointPort {
                        name: p.name,
                        protocol: p.protocol,
                        port: p.port,
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }
}

/// The object inside a protobuf body's envelope, checked to be `kind`.
fn unwrap_envelope(mut body: Bytes, kind: &'static str) -> Result<Bytes, DecodeError> {
    if body.len() < MAGIC.len() || &body[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::NoMagic);
    }
    body.advance(MAGIC.len());
    let env = Unknown::decode(body)?;
    let got = env.type_meta.and_then(|t| t.kind).unwrap_or_default();
    if got != kind {
        return Err(DecodeError::Kind {
            expected: kind,
            got,
        });
    }
    Ok(env.raw.unwrap_or_default())
}

/// A protobuf page of a list: its objects and its list metadata (the
/// generic path through k8s-openapi's types, the tests' reference).
#[cfg(test)]
pub trait FromProtobufList: Sized {
    /// The list's kind (`ServiceList`).
    const LIST_KIND: &'static str;
    /// Decodes a whole response body.
    fn decode_list(body: Bytes) -> Result<(Vec<Self>, ListMeta), DecodeError>;
}

#[cfg(test)]
impl FromProtobufList for core::Service {
    const LIST_KIND: &'static str = "ServiceList";
    fn decode_list(body: Bytes) -> Result<(Vec<Self>, ListMeta), DecodeError> {
        let l = PbServiceList::decode(unwrap_envelope(body, Self::LIST_KIND)?)?;
        let items = l.items.into_iter().map(Self::from).collect();
        Ok((items, l.metadata.unwrap_or_default()))
    }
}

#[cfg(test)]
impl FromProtobufList for discovery::EndpointSlice {
    const LIST_KIND: &'static str = "EndpointSliceList";
    fn decode_list(body: Bytes) -> Result<(Vec<Self>, ListMeta), DecodeError> {
        let l = PbEndpointSliceList::decode(unwrap_envelope(body, Self::LIST_KIND)?)?;
        let items = l.items.into_iter().map(Self::from).collect();
        Ok((items, l.metadata.unwrap_or_default()))
    }
}

/// A protobuf `metav1.Status` (an error answer): its message and code.
#[derive(Clone, PartialEq, Message)]
struct PbStatus {
    #[prost(string, optional, tag = "3")]
    message: Option<String>,
    #[prost(string, optional, tag = "4")]
    reason: Option<String>,
    #[prost(int32, optional, tag = "6")]
    code: Option<i32>,
}

/// An error body (protobuf or JSON `Status`, else its text) as a Status.
pub fn error_status(http_code: u16, body: Bytes) -> kube::core::Status {
    let mut st = kube::core::Status {
        code: http_code,
        ..Default::default()
    };
    if let Ok(raw) = unwrap_envelope(body.clone(), "Status") {
        if let Ok(s) = PbStatus::decode(raw) {
            st.message = s.message.unwrap_or_default();
            st.reason = s.reason.unwrap_or_default();
            return st;
        }
    }
    if let Ok(s) = serde_json::from_slice::<kube::core::Status>(&body) {
        return kube::core::Status {
            code: http_code,
            ..s
        };
    }
    st.message = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enveloped(kind: &str, raw: Vec<u8>) -> Bytes {
        let env = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw.into()),
        };
        let mut b = MAGIC.to_vec();
        b.extend(env.encode_to_vec());
        b.into()
    }

    fn pb_time(seconds: i64) -> Option<PbTime> {
        Some(PbTime {
            seconds: Some(seconds),
            nanos: Some(0),
        })
    }

    /// Services that together use every field the compact form keeps,
    /// with Go's zero values where a Go encoder writes them.
    fn varied_services() -> Vec<PbService> {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        vec![
            PbService {
                metadata: Some(PbMeta {
                    name: Some("lb".into()),
                    namespace: Some("shop".into()),
                    resource_version: Some("12".into()),
                    creation_timestamp: pb_time(1_700_000_000),
                    labels: map(&[
                        ("app", "x"),
                        ("service.kubernetes.io/service-proxy-name", "other"),
                    ]),
                    annotations: map(&[
                        ("service.kubernetes.io/topology-mode", "Auto"),
                        ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
                    ]),
                    // The newest write wins; a zero time is no time.
                    managed_fields: vec![
                        PbManagedFields {
                            time: pb_time(1_700_000_300),
                        },
                        PbManagedFields {
                            time: pb_time(1_700_000_200),
                        },
                        PbManagedFields { time: pb_time(0) },
                    ],
                    ..Default::default()
                }),
                spec: Some(PbServiceSpec {
                    ports: vec![
                        PbServicePort {
                            name: Some("https".into()),
                            protocol: Some("TCP".into()),
                            port: Some(443),
                            node_port: Some(30443),
                        },
                        PbServicePort {
                            name: Some(String::new()),
                            protocol: Some("UDP".into()),
                            port: Some(53),
                            node_port: Some(0),
                        },
                    ],
                    cluster_ip: Some("10.96.0.20".into()),
                    cluster_ips: strings(&["10.96.0.20", "fd00:10:96::20"]),
                    type_: Some("LoadBalancer".into()),
                    external_ips: strings(&["192.0.2.50"]),
                    session_affinity: Some("ClientIP".into()),
                    load_balancer_source_ranges: strings(&["198.51.100.0/24"]),
                    external_traffic_policy: Some("Local".into()),
                    health_check_node_port: Some(32000),
                    session_affinity_config: Some(PbAffinityConfig {
                        client_ip: Some(PbClientIp {
                            timeout_seconds: Some(300),
                        }),
                    }),
                    allocate_load_balancer_node_ports: Some(false),
                    internal_traffic_policy: Some("Local".into()),
                    traffic_distribution: Some("PreferClose".into()),
                }),
                status: Some(PbServiceStatus {
                    load_balancer: Some(PbLoadBalancerStatus {
                        ingress: vec![
                            PbIngress {
                                ip: Some("192.0.2.80".into()),
                                hostname: Some(String::new()),
                                ip_mode: Some("Proxy".into()),
                            },
                            PbIngress {
                                ip: Some(String::new()),
                                hostname: Some("lb.example".into()),
                                ip_mode: None,
                            },
                        ],
                    }),
                }),
            },
            // Only `clusterIP` (an old object), Go's zero values everywhere.
            PbService {
                metadata: Some(PbMeta {
                    name: Some("old".into()),
                    namespace: Some("shop".into()),
                    resource_version: Some(String::new()),
                    creation_timestamp: pb_time(1_700_000_000),
                    labels: map(&[("service.kubernetes.io/headless", "")]),
                    ..Default::default()
                }),
                spec: Some(PbServiceSpec {
                    ports: vec![PbServicePort {
                        port: Some(80),
                        ..Default::default()
                    }],
                    cluster_ip: Some("10.96.0.21".into()),
                    type_: Some(String::new()),
                    session_affinity: Some(String::new()),
                    external_traffic_policy: Some(String::new()),
                    health_check_node_port: Some(0),
                    ..Default::default()
                }),
                status: Some(PbServiceStatus::default()),
            },
            // No spec, no status, no times.
            PbService {
                metadata: Some(PbMeta {
                    name: Some("bare".into()),
                    ..Default::default()
                }),
                spec: None,
                status: None,
            },
            PbService::default(),
        ]
    }

    #[test]
    fn a_service_decodes_straight_into_what_the_generic_path_keeps() {
        for pb in varied_services() {
            let generic = core::Service::from(pb.clone());
            let want = (
                Svc::from(&generic),
                crate::latency::service_trigger(&generic),
            );
            let got = ListedService::from(pb);
            assert_eq!((got.svc, got.trigger), want);
        }
        // Not vacuous: the cases the test means are there.
        let l: Vec<ListedService> = varied_services()
            .into_iter()
            .map(ListedService::from)
            .collect();
        let lb = &l[0].svc;
        assert_eq!(lb.cluster_ips.len(), 2);
        assert_eq!(lb.ports[1].node_port, None);
        assert_eq!(lb.ports[1].name, None);
        assert_eq!(lb.labels.as_ref().map(BTreeMap::len), Some(1));
        assert_eq!(lb.annotations.as_ref().map(BTreeMap::len), Some(1));
        let ext = lb.external.as_deref().unwrap();
        assert_eq!(ext.ingress[1].ip, None);
        assert_eq!(ext.ingress[1].hostname.as_deref(), Some("lb.example"));
        assert_eq!(
            l[0].trigger.map(|t| t.at),
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_300))
        );
        assert_eq!(l[1].svc.cluster_ips, vec!["10.96.0.21".to_string()]);
        assert_eq!(l[1].svc.resource_version, None);
        assert!(l[1].svc.external.is_none());
        assert_eq!(l[2].trigger, None);
        // A whole list body.
        let body = enveloped(
            "ServiceList",
            PbServiceList {
                metadata: Some(ListMeta {
                    resource_version: Some("7".into()),
                    continue_: None,
                }),
                items: varied_services(),
            }
            .encode_to_vec(),
        );
        let (items, meta) = decode_services(body).unwrap();
        assert_eq!(
            (items.len(), meta.resource_version.as_deref()),
            (4, Some("7"))
        );
    }

    #[test]
    fn go_zero_values_are_unset_as_in_json() {
        let svc = PbService {
            metadata: Some(PbMeta {
                name: Some("w".into()),
                namespace: Some("d".into()),
                resource_version: Some("7".into()),
                creation_timestamp: Some(PbTime {
                    seconds: Some(0),
                    nanos: Some(0),
                }),
                managed_fields: vec![PbManagedFields {
                    time: Some(PbTime {
                        seconds: Some(1_700_000_000),
                        nanos: Some(0),
                    }),
                }],
                ..Default::default()
            }),
            spec: Some(PbServiceSpec {
                ports: vec![PbServicePort {
                    name: Some(String::new()),
                    protocol: Some("UDP".into()),
                    port: Some(53),
                    node_port: Some(0),
                }],
                cluster_ip: Some("10.96.0.10".into()),
                external_traffic_policy: Some(String::new()),
                health_check_node_port: Some(0),
                ..Default::default()
            }),
            status: Some(PbServiceStatus::default()),
        };
        let body = enveloped(
            "ServiceList",
            PbServiceList {
                metadata: Some(ListMeta {
                    resource_version: Some("99".into()),
                    continue_: Some(String::new()),
                }),
                items: vec![svc],
            }
            .encode_to_vec(),
        );
        let (items, lm) = core::Service::decode_list(body).unwrap();
        assert_eq!(lm.resource_version.as_deref(), Some("99"));
        let s = &items[0];
        assert_eq!(s.metadata.name.as_deref(), Some("w"));
        assert_eq!(s.metadata.creation_timestamp, None);
        assert_eq!(s.metadata.managed_fields.as_ref().map(Vec::len), Some(1));
        let spec = s.spec.as_ref().unwrap();
        let p = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(
            (
                p.name.as_deref(),
                p.protocol.as_deref(),
                p.port,
                p.node_port
            ),
            (None, Some("UDP"), 53, None)
        );
        assert_eq!(spec.external_traffic_policy, None);
        assert_eq!(spec.health_check_node_port, None);
        assert_eq!(spec.cluster_ips, None);
    }

    #[test]
    fn a_body_of_another_kind_or_without_the_prefix_is_refused() {
        let body = enveloped("ServiceList", PbServiceList::default().encode_to_vec());
        assert!(matches!(
            discovery::EndpointSlice::decode_list(body),
            Err(DecodeError::Kind { .. })
        ));
        assert!(matches!(
            core::Service::decode_list(Bytes::from_static(b"{\"kind\":\"ServiceList\"}")),
            Err(DecodeError::NoMagic)
        ));
    }

    #[test]
    fn an_error_status_keeps_its_message_in_either_encoding() {
        let pb = enveloped(
            "Status",
            PbStatus {
                message: Some("too old".into()),
                reason: Some("Expired".into()),
                code: Some(410),
            }
            .encode_to_vec(),
        );
        let s = error_status(410, pb);
        assert_eq!(
            (s.code, s.message.as_str(), s.reason.as_str()),
            (410, "too old", "Expired")
        );
        let js = Bytes::from_static(
            br#"{"kind":"Status","message":"nope","reason":"Forbidden","code":403}"#,
        );
        let s = error_status(403, js);
        assert_eq!((s.code, s.message.as_str()), (403, "nope"));
        let s = error_status(502, Bytes::from_static(b"bad gateway"));
        assert_eq!((s.code, s.message.as_str()), (502, "bad gateway"));
    }
}
