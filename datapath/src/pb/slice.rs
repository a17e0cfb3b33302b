//! A protobuf EndpointSlice list decoded straight into the compact
//! [`Slice`] the stores keep.
//!
//! The generic path builds each slice three times: prost's message (a
//! `String` per address, node, target reference field), the k8s-openapi
//! `EndpointSlice`, then the [`Slice`], dropping the first two. At 10,000
//! Services × 10 endpoints that is ~1.5 million allocations and frees for
//! the one list the first pass waits on last. Here each field is read from
//! the body once: an address is parsed from its bytes, and only what the
//! [`Slice`] keeps (names, node, pod) is allocated.
//!
//! The result is the generic path's, field for field, Go's non-pointer
//! zero values included (an empty target reference namespace is unset);
//! the tests decode the same bodies both ways and compare, and `api_lists`
//! compares what a real API server's protobuf and JSON lists leave.

use std::net::IpAddr;

use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};

use super::{unwrap_envelope, DecodeError, ListMeta};
use crate::desired::{proto_of, Name, SERVICE_NAME_LABEL};
use crate::latency::TRIGGER_ANNOTATION;
use crate::slice::{
    name_pods, node_name, Hints, PodName, Slice, SliceEndpoint, SliceFamily, SlicePort,
};
use crate::version::Version;

/// One slice of a list: the [`Slice`] and its trigger annotation's value
/// ([`crate::latency`]).
#[derive(Debug)]
pub struct ListedSlice {
    /// What the store keeps.
    pub slice: Slice,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, unparsed.
    pub trigger: Option<String>,
}

/// The fields of one message, in order.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn next(&mut self) -> Result<Option<(u32, WireType)>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        Ok(Some(decode_key(&mut self.buf)?))
    }

    /// A length-delimited field's bytes (a string or a message).
    fn bytes(&mut self, wire: WireType) -> Result<&'a [u8], DecodeError> {
        if wire != WireType::LengthDelimited {
            return Err(DecodeError::Malformed(
                "a string or message field is not length-delimited",
            ));
        }
        let len = usize::try_from(decode_varint(&mut self.buf)?)
            .map_err(|_| DecodeError::Malformed("a length does not fit in memory"))?;
        if len > self.buf.len() {
            return Err(DecodeError::Malformed(
                "a field runs past the end of its message",
            ));
        }
        let (field, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(field)
    }

    fn str(&mut self, wire: WireType) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(wire)?)
            .map_err(|_| DecodeError::Malformed("a string is not UTF-8"))
    }

    fn varint(&mut self, wire: WireType) -> Result<u64, DecodeError> {
        if wire != WireType::Varint {
            return Err(DecodeError::Malformed(
                "a number or flag field is not a varint",
            ));
        }
        Ok(decode_varint(&mut self.buf)?)
    }

    fn message(&mut self, wire: WireType) -> Result<Fields<'a>, DecodeError> {
        Ok(Fields::new(self.bytes(wire)?))
    }

    fn skip(&mut self, tag: u32, wire: WireType) -> Result<(), DecodeError> {
        Ok(skip_field(
            wire,
            tag,
            &mut self.buf,
            DecodeContext::default(),
        )?)
    }

    /// Calls `field` with each field's number and wire type, in order; a
    /// field it does not read (false) is skipped.
    fn read(
        mut self,
        mut field: impl FnMut(&mut Self, u32, WireType) -> Result<bool, DecodeError>,
    ) -> Result<(), DecodeError> {
        while let Some((tag, wire)) = self.next()? {
            if !field(&mut self, tag, wire)? {
                self.skip(tag, wire)?;
            }
        }
        Ok(())
    }
}

/// A Go non-pointer string: empty is unset.
fn text(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A `map<string, string>` entry: (key, value).
fn map_entry(f: Fields<'_>) -> Result<(&str, &str), DecodeError> {
    let (mut k, mut v) = ("", "");
    f.read(|f, tag, wire| {
        match tag {
            1 => k = f.str(wire)?,
            2 => v = f.str(wire)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((k, v))
}

/// The `(namespace, name)` of an endpoint's `targetRef` of kind Pod (an
/// empty namespace: the slice's, known once the whole slice is read).
fn target_ref<'a>(f: Fields<'a>) -> Result<Option<(&'a str, &'a str)>, DecodeError> {
    let (mut kind, mut ns, mut name) = ("", "", "");
    f.read(|f, tag, wire| {
        match tag {
            1 => kind = f.str(wire)?,
            2 => ns = f.str(wire)?,
            3 => name = f.str(wire)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((kind == "Pod" && !name.is_empty()).then_some((ns, name)))
}

fn hints(f: Fields<'_>) -> Result<Hints, DecodeError> {
    let mut h = Hints::default();
    f.read(|f, tag, wire| {
        let list = match tag {
            1 => &mut h.zones,
            2 => &mut h.nodes,
            _ => return Ok(false),
        };
        // `forZones[]` / `forNodes[]`: a message with a name.
        let mut name = String::new();
        f.message(wire)?.read(|named, t, w| {
            if t != 1 {
                return Ok(false);
            }
            name = named.str(w)?.to_owned();
            Ok(true)
        })?;
        list.push(name);
        Ok(true)
    })?;
    Ok(h)
}

/// An endpoint, and its `targetRef`'s pod (see [`target_ref`]).
#[allow(clippy::type_complexity)]
fn endpoint<'a>(f: Fields<'a>) -> Result<(SliceEndpoint, Option<(&'a str, &'a str)>), DecodeError> {
    let mut first: Option<&str> = None;
    let (mut ready, mut serving, mut terminating) = (None, None, None);
    let mut node = None;
    let mut hint = None;
    let mut pod = None;
    f.read(|f, tag, wire| {
        match tag {
            1 => {
                let a = f.str(wire)?;
                first.get_or_insert(a);
            }
            2 => f.message(wire)?.read(|c, t, w| {
                let flag = match t {
                    1 => &mut ready,
                    2 => &mut serving,
                    3 => &mut terminating,
                    _ => return Ok(false),
                };
                *flag = Some(c.varint(w)? != 0);
                Ok(true)
            })?,
            4 => pod = target_ref(f.message(wire)?)?,
            6 => node = Some(node_name(f.str(wire)?)),
            8 => hint = Some(Box::new(hints(f.message(wire)?)?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let ready = ready.unwrap_or(true);
    let ep = SliceEndpoint {
        ip: first.and_then(|a| a.parse::<IpAddr>().ok()),
        ready,
        serving: serving.unwrap_or(ready),
        terminating: terminating.unwrap_or(false),
        node,
        hints: hint,
        pod: PodName::None,
    };
    Ok((ep, pod))
}

fn port(f: Fields<'_>) -> Result<SlicePort, DecodeError> {
    let (mut name, mut proto, mut number) = (String::new(), None, None);
    f.read(|f, tag, wire| {
        match tag {
            1 => name = f.str(wire)?.to_owned(),
            2 => proto = Some(f.str(wire)?),
            // An int32: the low 32 bits of the varint.
            3 => number = Some(f.varint(wire)? as i32),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(SlicePort {
        name,
        proto: proto_of(proto),
        port: number.and_then(|p| u16::try_from(p).ok()),
    })
}

fn slice(f: Fields<'_>) -> Result<ListedSlice, DecodeError> {
    let (mut namespace, mut name, mut version) = (String::new(), String::new(), None);
    let (mut service, mut trigger) = (None, None);
    let mut family = SliceFamily::Other;
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    // Endpoints' pods: (index, namespace, name).
    let mut pods = Vec::new();
    f.read(|f, tag, wire| {
        match tag {
            1 => f.message(wire)?.read(|m, t, w| {
                match t {
                    1 => name = m.str(w)?.to_owned(),
                    3 => namespace = m.str(w)?.to_owned(),
                    6 => version = text(m.str(w)?).map(Version::new),
                    11 => {
                        let (k, v) = map_entry(m.message(w)?)?;
                        if k == SERVICE_NAME_LABEL {
                            service = Some(v.to_owned());
                        }
                    }
                    12 => {
                        let (k, v) = map_entry(m.message(w)?)?;
                        if k == TRIGGER_ANNOTATION {
                            trigger = Some(v.to_owned());
                        }
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            })?,
            2 => {
                let (ep, pod) = endpoint(f.message(wire)?)?;
                if let Some((ns, pod)) = pod {
                    pods.push((endpoints.len(), ns, pod));
                }
                endpoints.push(ep);
            }
            3 => ports.push(port(f.message(wire)?)?),
            4 => {
                family = match f.str(wire)? {
                    "IPv4" => SliceFamily::V4,
                    "IPv6" => SliceFamily::V6,
                    _ => SliceFamily::Other,
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let pod_prefix = name_pods(&namespace, &mut endpoints, pods);
    // Kept for the slice's life: without the room the growth left.
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();
    Ok(ListedSlice {
        slice: Slice {
            namespace: namespace.into(),
            name: name.into(),
            service: service.map(Name::from),
            family,
            ports,
            endpoints,
            resource_version: version,
            pod_prefix,
        },
        trigger,
    })
}

/// Decodes a whole `EndpointSliceList` response body.
pub fn decode_list(body: bytes::Bytes) -> Result<(Vec<ListedSlice>, ListMeta), DecodeError> {
    let raw = unwrap_envelope(body, "EndpointSliceList")?;
    let (mut items, mut meta) = (Vec::new(), ListMeta::default());
    Fields::new(&raw).read(|f, tag, wire| {
        match tag {
            1 => f.message(wire)?.read(|m, t, w| {
                match t {
                    2 => meta.resource_version = Some(m.str(w)?.to_owned()),
                    3 => meta.continue_ = Some(m.str(w)?.to_owned()),
                    _ => return Ok(false),
                }
                Ok(true)
            })?,
            2 => items.push(slice(f.message(wire)?)?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((items, meta))
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use prost::encoding::{encode_key, encode_varint};

    fn time(seconds: i64) -> Option<PbTime> {
        Some(PbTime {
            seconds: Some(seconds),
            nanos: Some(0),
        })
    }

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PbMeta {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        PbMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some("0b7e7a2c-2f3c-4a57-9b5e-6d7c1f2e3a4b".into()),
            resource_version: Some("4711".into()),
            generation: Some(1),
            creation_timestamp: time(1_700_000_000),
            deletion_timestamp: None,
            labels: map(labels),
            annotations: map(annotations),
            managed_fields: vec![PbManagedFields {
                time: time(1_700_000_100),
            }],
        }
    }

    fn pod_ref(kind: &str, ns: &str, name: &str) -> Option<PbObjectReference> {
        Some(PbObjectReference {
            kind: Some(kind.into()),
            namespace: Some(ns.into()),
            name: Some(name.into()),
        })
    }

    fn ep(addresses: &[&str]) -> PbEndpoint {
        PbEndpoint {
            addresses: addresses.iter().map(|a| (*a).to_string()).collect(),
            ..Default::default()
        }
    }

    /// Slices that together use every field the decoder reads, with Go's
    /// zero values where a Go encoder writes them.
    fn varied() -> Vec<PbEndpointSlice> {
        let cond = |r, s, t| {
            Some(PbConditions {
                ready: r,
                serving: s,
                terminating: t,
            })
        };
        vec![
            PbEndpointSlice {
                metadata: Some(meta(
                    "shop",
                    "web-abc",
                    &[
                        (
                            "endpointslice.kubernetes.io/managed-by",
                            "endpointslice-controller.k8s.io",
                        ),
                        (SERVICE_NAME_LABEL, "web"),
                    ],
                    &[(TRIGGER_ANNOTATION, "2026-12-06T07:00:00Z"), ("other", "x")],
                )),
                endpoints: vec![
                    PbEndpoint {
                        conditions: cond(Some(true), Some(true), Some(false)),
                        target_ref: pod_ref("Pod", "shop", "web-1"),
                        node_name: Some("node-1".into()),
                        zone: Some("z1".into()),
                        hints: Some(PbHints {
                            for_zones: vec![PbNamed {
                                name: Some("z1".into()),
                            }],
                            for_nodes: vec![
                                PbNamed {
                                    name: Some("node-1".into()),
                                },
                                PbNamed { name: None },
                            ],
                        }),
                        ..ep(&["10.244.1.5", "10.244.1.6"])
                    },
                    PbEndpoint {
                        conditions: cond(Some(false), None, None),
                        // No namespace (Go writes ""): the slice's.
                        target_ref: pod_ref("Pod", "", "web-2"),
                        hints: Some(PbHints::default()),
                        ..ep(&["10.244.1.7"])
                    },
                    PbEndpoint {
                        conditions: cond(None, Some(false), Some(true)),
                        target_ref: pod_ref("Node", "", "node-9"),
                        ..ep(&["not-an-address"])
                    },
                    PbEndpoint {
                        target_ref: pod_ref("Pod", "shop", ""),
                        ..ep(&[])
                    },
                    // Another namespace's pod, and one of another workload:
                    // spelled out in full, not after the slice's prefix.
                    PbEndpoint {
                        target_ref: pod_ref("Pod", "kube-system", "web-3"),
                        ..ep(&["10.244.1.8"])
                    },
                    PbEndpoint {
                        target_ref: pod_ref("Pod", "shop", "api-7f9c4d8b6-x2x9z"),
                        ..ep(&["10.244.1.9"])
                    },
                    PbEndpoint {
                        target_ref: pod_ref("Pod", "shop", "web-a-suffix-of-15-b"),
                        ..ep(&["10.244.1.10"])
                    },
                ],
                ports: vec![
                    PbEndpointPort {
                        name: Some("http".into()),
                        protocol: Some("TCP".into()),
                        port: Some(8080),
                    },
                    PbEndpointPort {
                        name: None,
                        protocol: Some("UDP".into()),
                        port: Some(53),
                    },
                    PbEndpointPort {
                        name: Some(String::new()),
                        protocol: Some("SCTP".into()),
                        port: Some(70_000),
                    },
                    PbEndpointPort {
                        name: Some("neg".into()),
                        protocol: None,
                        port: Some(-1),
                    },
                    PbEndpointPort::default(),
                ],
                address_type: Some("IPv4".into()),
            },
            PbEndpointSlice {
                metadata: Some(meta("shop", "web-v6", &[(SERVICE_NAME_LABEL, "")], &[])),
                endpoints: vec![PbEndpoint {
                    target_ref: pod_ref("Pod", "", "web-3"),
                    ..ep(&["fd00::1"])
                }],
                ports: Vec::new(),
                address_type: Some("IPv6".into()),
            },
            // No namespace at all: a target without one names no pod.
            PbEndpointSlice {
                metadata: Some(PbMeta {
                    name: Some("bare".into()),
                    ..Default::default()
                }),
                endpoints: vec![PbEndpoint {
                    target_ref: pod_ref("Pod", "", "p"),
                    ..ep(&["10.0.0.1"])
                }],
                ports: Vec::new(),
                address_type: Some("FQDN".into()),
            },
            PbEndpointSlice::default(),
        ]
    }

    fn enveloped(raw: Vec<u8>) -> Bytes {
        let env = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("discovery.k8s.io/v1".into()),
                kind: Some("EndpointSliceList".into()),
            }),
            raw: Some(raw.into()),
        };
        let mut b = MAGIC.to_vec();
        b.extend(env.encode_to_vec());
        b.into()
    }

    fn list(items: Vec<PbEndpointSlice>) -> Bytes {
        enveloped(
            PbEndpointSliceList {
                metadata: Some(ListMeta {
                    resource_version: Some("99".into()),
                    continue_: Some("next".into()),
                }),
                items,
            }
            .encode_to_vec(),
        )
    }

    /// What each path leaves: (slice, trigger, resourceVersion) by key.
    type Kept = Vec<(String, Slice, String)>;

    fn generic(body: Bytes) -> (Kept, ListMeta) {
        let (items, meta) = discovery::EndpointSlice::decode_list(body).unwrap();
        let kept = items
            .iter()
            .map(|s| {
                let trig = format!("{:?}", crate::latency::slice_trigger(s));
                let key = format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default()
                );
                (key, Slice::from(s), trig)
            })
            .collect();
        (kept, meta)
    }

    fn direct(body: Bytes) -> (Kept, ListMeta) {
        let (items, meta) = decode_list(body).unwrap();
        let kept = items
            .into_iter()
            .map(|l| {
                let trig = format!(
                    "{:?}",
                    l.trigger
                        .as_deref()
                        .and_then(crate::latency::slice_trigger_at)
                );
                (
                    format!("{}/{}", l.slice.namespace, l.slice.name),
                    l.slice,
                    trig,
                )
            })
            .collect();
        (kept, meta)
    }

    #[test]
    fn a_list_decodes_straight_into_what_the_generic_path_keeps() {
        let body = list(varied());
        let (want, want_meta) = generic(body.clone());
        let (got, got_meta) = direct(body);
        assert_eq!(got, want);
        assert_eq!(got_meta, want_meta);
        // Not vacuous: the cases the test means are there.
        let web = &got[0].1;
        assert_eq!(web.service.as_deref(), Some("web"));
        assert_eq!(web.resource_version, Some(Version::Number(4711)));
        assert!(got[0].2.contains("Some"), "the trigger: {}", got[0].2);
        assert_eq!(web.endpoints[0].ip, Some("10.244.1.5".parse().unwrap()));
        let pods: Vec<_> = web.endpoints.iter().map(|e| web.pod(e)).collect();
        assert_eq!(
            pods.iter().map(Option::as_deref).collect::<Vec<_>>(),
            [
                Some("shop/web-1"),
                Some("shop/web-2"),
                None,
                None,
                Some("kube-system/web-3"),
                Some("shop/api-7f9c4d8b6-x2x9z"),
                Some("shop/web-a-suffix-of-15-b"),
            ]
        );
        // The slice's own pods after its prefix, without an allocation.
        assert_eq!(&*web.pod_prefix, "web-");
        let inline: Vec<_> = web
            .endpoints
            .iter()
            .map(|e| matches!(e.pod, PodName::Suffix { .. }))
            .collect();
        assert_eq!(inline, [true, true, false, false, false, false, false]);
        assert_eq!(
            (web.endpoints[1].ready, web.endpoints[1].serving),
            (false, false)
        );
        assert_eq!(web.endpoints[2].ip, None);
        assert!(
            web.endpoints[2].ready && !web.endpoints[2].serving && web.endpoints[2].terminating
        );
        assert_eq!(
            web.endpoints[0].hints.as_deref().map(|h| h.nodes.len()),
            Some(2)
        );
        assert_eq!(web.ports.len(), 5);
        assert_eq!(got[1].1.service.as_deref(), Some(""));
        assert_eq!(
            got[1].1.pod(&got[1].1.endpoints[0]).as_deref(),
            Some("shop/web-3")
        );
        assert_eq!(got[2].1.endpoints[0].pod, PodName::None);
        assert_eq!(got[3].0, "/");
        assert_eq!(
            (
                got_meta.resource_version.as_deref(),
                got_meta.continue_.as_deref()
            ),
            (Some("99"), Some("next"))
        );
    }

    #[test]
    fn metadata_after_the_endpoints_still_names_their_pods() {
        // Protobuf fields may come in any order (a message written in two
        // parts is their merge): the endpoints first, then the metadata.
        let mut first = varied().swap_remove(0);
        let metadata = first.metadata.take();
        let mut item = first.encode_to_vec();
        item.extend(
            PbEndpointSlice {
                metadata,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let mut raw = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut raw);
        encode_varint(item.len() as u64, &mut raw);
        raw.extend(item);
        let (want, _) = generic(enveloped(raw.clone()));
        let (got, _) = direct(enveloped(raw));
        assert_eq!(got, want);
        assert_eq!(
            got[0].1.pod(&got[0].1.endpoints[1]).as_deref(),
            Some("shop/web-2")
        );
    }

    #[test]
    fn a_broken_body_is_an_error_not_a_panic() {
        let body = list(varied());
        let raw = unwrap_envelope(body.clone(), "EndpointSliceList").unwrap();
        // Cut anywhere inside: an error (or, cut between fields, fewer
        // objects), never a panic.
        for cut in (1..raw.len()).step_by(7) {
            let _ = decode_list(enveloped(raw[..cut].to_vec()));
        }
        assert!(decode_list(enveloped(raw[..raw.len() - 3].to_vec())).is_err());
        // A string field that is a varint.
        let mut bad = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut bad);
        encode_varint(2, &mut bad);
        encode_key(4, WireType::Varint, &mut bad);
        encode_varint(1, &mut bad);
        assert!(matches!(
            decode_list(enveloped(bad)),
            Err(DecodeError::Malformed(_))
        ));
        // Not UTF-8.
        let mut bad = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut bad);
        encode_varint(4, &mut bad);
        encode_key(4, WireType::LengthDelimited, &mut bad);
        encode_varint(2, &mut bad);
        bad.extend([0xff, 0xfe]);
        assert!(decode_list(enveloped(bad)).is_err());
        // Another kind.
        let mut b = MAGIC.to_vec();
        b.extend(
            Unknown {
                type_meta: Some(TypeMeta {
                    api_version: Some("v1".into()),
                    kind: Some("ServiceList".into()),
                }),
                raw: None,
            }
            .encode_to_vec(),
        );
        assert!(matches!(
            decode_list(b.into()),
            Err(DecodeError::Kind { .. })
        ));
    }
}
