//! Services and EndpointSlices decoded leanly: what the agent reads of
//! them, straight from the API server's JSON, without building what it
//! would throw away.
//!
//! A list of 10,000 Services or EndpointSlices from a real API server
//! carries each object's `managedFields` (one entry per field manager, each
//! with a `fieldsV1` tree) and annotations such as kubectl's
//! `last-applied-configuration` (the whole object again, as a string).
//! The k8s-openapi types decode all of it, `fieldsV1` into a
//! `serde_json::Value`, only for the agent to drop it when it keeps the
//! compact [`crate::service::Svc`] / [`crate::slice::Slice`]. These
//! wrappers skip it while parsing: of `managedFields` only each entry's
//! time is kept (a Service's last write, [`crate::latency::service_trigger`]),
//! of annotations only those the datapath reads; everything else the
//! datapath reads is decoded with the k8s-openapi types themselves.
//!
//! They are k8s-openapi resources of their own (same group, version, kind
//! and URL), so kube's `Api` watches them as usual. Lists come in protobuf
//! ([`crate::pb`], [`crate::listwatch`]) and are decoded with this only
//! when an API server answers them in JSON.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta, Time};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::latency::TRIGGER_ANNOTATION;
use netboot_contract::features::TOPOLOGY_ANNOTATIONS;

/// Whether the datapath reads annotation `key` (of a Service or a slice).
fn read_annotation(key: &str) -> bool {
    key == TRIGGER_ANNOTATION || TOPOLOGY_ANNOTATIONS.contains(&key)
}

/// A `managedFields` entry: its time only.
#[derive(Deserialize)]
struct ManagedTime {
    #[serde(default)]
    time: Option<Time>,
}

/// The metadata the datapath reads.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    generation: Option<i64>,
    #[serde(default)]
    creation_timestamp: Option<Time>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "read_annotations")]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    managed_fields: Option<Vec<ManagedTime>>,
}

impl From<Meta> for ObjectMeta {
    fn from(m: Meta) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            generation: m.generation,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            labels: m.labels,
            annotations: m.annotations,
            managed_fields: m.managed_fields.map(|v| {
                v.into_iter()
                    .filter(|e| e.time.is_some())
                    .map(|e| ManagedFieldsEntry {
                        time: e.time,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }
    }
}

/// The annotations the datapath reads; the others are skipped unparsed.
fn read_annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kept;
    impl<'de> Visitor<'de> for Kept {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of annotations, or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            // The values of the annotations not read are skipped unparsed.
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if read_annotation(&k) {
                    kept.insert(k.into_owned(), m.next_value::<String>()?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Kept)
}

/// A Service as the agent watches it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeanService(pub Service);

/// An EndpointSlice as the agent watches it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeanSlice(pub EndpointSlice);

impl<'de> Deserialize<'de> for LeanService {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: Meta,
            #[serde(default)]
            spec: Option<ServiceSpec>,
            #[serde(default)]
            status: Option<ServiceStatus>,
        }
        let r = Raw::deserialize(d)?;
        Ok(LeanService(Service {
            metadata: r.metadata.into(),
            spec: r.spec,
            status: r.status,
        }))
    }
}

impl<'de> Deserialize<'de> for LeanSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Raw {
            #[serde(default)]
            metadata: Meta,
            address_type: String,
            #[serde(default)]
            endpoints: Option<Vec<Endpoint>>,
            #[serde(default)]
            ports: Option<Vec<EndpointPort>>,
        }
        let r = Raw::deserialize(d)?;
        Ok(LeanSlice(EndpointSlice {
            metadata: r.metadata.into(),
            address_type: r.address_type,
            endpoints: r.endpoints,
            ports: r.ports,
        }))
    }
}

/// Both wrappers are the resource they wrap, to kube.
macro_rules! same_resource {
    ($lean:ty, $k8s:ty) => {
        impl k8s_openapi::Resource for $lean {
            const API_VERSION: &'static str = <$k8s as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$k8s as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$k8s as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$k8s as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$k8s as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$k8s as k8s_openapi::Resource>::Scope;
        }
        impl k8s_openapi::Metadata for $lean {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.0.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.0.metadata
            }
        }
    };
}
same_resource!(LeanService, Service);
same_resource!(LeanSlice, EndpointSlice);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Svc;
    use crate::slice::Slice;

    /// A Service as a real API server lists it: managedFields, kubectl's
    /// last-applied annotation, a topology annotation, status.
    const SERVICE: &str = r#"{
      "metadata": {
        "name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "4711",
        "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "other"},
        "annotations": {
          "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"name\":\"web\"}}\n",
          "service.kubernetes.io/topology-mode": "Auto",
          "note": "\u00e9t\u00e9"
        },
        "managedFields": [
          {"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
           "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
           "fieldsV1": {"f:spec": {"f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}}}}}},
          {"manager": "controller", "operation": "Update", "apiVersion": "v1",
           "time": "2026-12-01T10:05:00Z", "fieldsType": "FieldsV1", "subresource": "status",
           "fieldsV1": {"f:status": {"f:loadBalancer": {"f:ingress": {}}}}}
        ]
      },
      "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
               "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000},
      "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}
    }"#;

    const SLICE: &str = r#"{
      "metadata": {
        "name": "web-abc", "namespace": "shop", "resourceVersion": "4712",
        "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:05:01Z", "other": "x"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u-1", "controller": true}],
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1",
                           "time": "2026-12-01T10:05:01Z", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:ports": {}}}]
      },
      "addressType": "IPv4",
      "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "nodeName": "node-1", "zone": "a", "hints": {"forZones": [{"name": "a"}]},
         "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "p-1"}},
        {"addresses": ["10.244.2.6"], "conditions": {"ready": false, "serving": true, "terminating": true},
         "nodeName": "node-2"}
      ],
      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }"#;

    #[test]
    fn a_lean_service_keeps_what_the_datapath_reads() {
        let full: Service = serde_json::from_str(SERVICE).expect("full");
        let lean: LeanService = serde_json::from_str(SERVICE).expect("lean");
        // What the stores keep is the same.
        assert_eq!(
            format!("{:?}", Svc::from(lean.0.clone())),
            format!("{:?}", Svc::from(full.clone()))
        );
        // The trigger time is the newest write, as from the full object.
        let (a, b) = (
            crate::latency::service_trigger(&lean.0).map(|t| t.at),
            crate::latency::service_trigger(&full).map(|t| t.at),
        );
        assert!(a.is_some());
        assert_eq!(a, b);
        // What was skipped.
        let m = &lean.0.metadata;
        let kept: Vec<&str> = m
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(kept, ["service.kubernetes.io/topology-mode"]);
        assert!(m
            .managed_fields
            .iter()
            .flatten()
            .all(|e| e.fields_v1.is_none() && e.manager.is_none()));
        assert_eq!(m.labels, full.metadata.labels);
        assert_eq!(lean.0.spec, full.spec);
        assert_eq!(lean.0.status, full.status);
    }

    #[test]
    fn a_lean_slice_keeps_what_the_datapath_reads() {
        let full: EndpointSlice = serde_json::from_str(SLICE).expect("full");
        let lean: LeanSlice = serde_json::from_str(SLICE).expect("lean");
        assert_eq!(
            format!("{:?}", Slice::from(lean.0.clone())),
            format!("{:?}", Slice::from(full.clone()))
        );
        assert_eq!(
            crate::latency::slice_trigger(&lean.0).map(|t| t.at),
            crate::latency::slice_trigger(&full).map(|t| t.at)
        );
        assert!(crate::latency::slice_trigger(&lean.0).is_some());
        assert_eq!(lean.0.endpoints, full.endpoints);
        assert_eq!(lean.0.ports, full.ports);
        assert_eq!(lean.0.address_type, "IPv4");
    }

    #[test]
    fn lists_and_watch_events_decode_the_same_way_kube_reads_them() {
        // A list's items carry no apiVersion/kind; a watch event's object does.
        let list = format!(
            r#"{{"apiVersion": "v1", "kind": "ServiceList", "metadata": {{"resourceVersion": "9"}}, "items": [{SERVICE}]}}"#
        );
        let l: kube::core::ObjectList<LeanService> = serde_json::from_str(&list).expect("list");
        assert_eq!(l.items.len(), 1);
        assert_eq!(l.items[0].0.metadata.name.as_deref(), Some("web"));
        let ev = format!(
            r#"{{"type": "ADDED", "object": {{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", {}}}"#,
            &SLICE.trim_start()[1..]
        );
        let e: kube::core::WatchEvent<LeanSlice> = serde_json::from_str(&ev).expect("event");
        let kube::core::WatchEvent::Added(s) = e else {
            panic!("not an ADDED event: {e:?}");
        };
        assert_eq!(s.0.metadata.name.as_deref(), Some("web-abc"));
        // null annotations and no metadata fields at all are fine.
        let bare: LeanSlice =
            serde_json::from_str(r#"{"metadata": {"annotations": null}, "addressType": "IPv6"}"#)
                .expect("bare");
        assert_eq!(bare.0.metadata.annotations, None);
        // A wrong type is an error naming what was expected, not a panic.
        let err = serde_json::from_str::<LeanService>(r#"{"metadata": {"annotations": 7}}"#)
            .expect_err("annotations must be a map");
        assert!(err.to_string().contains("a map of annotations"), "{err}");
    }

    #[test]
    fn the_wrappers_are_the_resources_they_wrap_to_kube() {
        use kube::Resource;
        assert_eq!(LeanService::plural(&()), Service::plural(&()));
        assert_eq!(LeanService::api_version(&()), "v1");
        assert_eq!(LeanSlice::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(LeanSlice::kind(&()), "EndpointSlice");
        assert_eq!(
            LeanSlice::url_path(&(), Some("shop")),
            EndpointSlice::url_path(&(), Some("shop"))
        );
    }
}
