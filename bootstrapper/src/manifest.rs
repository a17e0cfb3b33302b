//! A rendered Kubernetes object: checked, labelled, hashed, and ordered by
//! kind rank for apply (deletes go in reverse).

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::render::hex;

pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "netboot");
pub const CLUSTER_LABEL: &str = "netboot.io/cluster";
pub const HASH_ANNOTATION: &str = "netboot.io/hash";

/// Apply order by kind (flux ssa's ranking): what others depend on comes first.
pub const KIND_RANK: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ConfigMap",
    "Secret",
    "Service",
    "DaemonSet",
    "Deployment",
    "Pod",
    "CronJob",
];

/// Which kinds are namespaced; everything netboot renders is in [`KIND_RANK`].
fn namespaced(kind: &str) -> bool {
    !matches!(
        kind,
        "Namespace"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "ValidatingAdmissionPolicy"
            | "ValidatingAdmissionPolicyBinding"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("not a Kubernetes object: {0}")]
    Shape(String),
    #[error("{id}: {message}")]
    Invalid { id: String, message: String },
}

/// Kind, namespace and name: how objects are identified and ordered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectId {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectId {
    pub fn rank(&self) -> usize {
        KIND_RANK
            .iter()
            .position(|k| *k == self.kind)
            .unwrap_or(KIND_RANK.len())
    }
}

impl Ord for ObjectId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank()
            .cmp(&other.rank())
            .then_with(|| self.kind.cmp(&other.kind))
            .then_with(|| self.namespace.cmp(&other.namespace))
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for ObjectId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// One rendered object.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub object: Value,
    /// The template it came from.
    pub template: String,
    id: ObjectId,
}

impl Manifest {
    pub fn id(&self) -> &ObjectId {
        &self.id
    }

    /// The `netboot.io/hash` annotation: sha256 over the canonical JSON of the
    /// object without that annotation.
    pub fn hash(&self) -> &str {
        self.object["metadata"]["annotations"][HASH_ANNOTATION]
            .as_str()
            .unwrap_or_default()
    }

    /// Parses one rendered document, checks it as a Kubernetes object of a
    /// known kind, adds netboot's labels and the hash annotation.
    pub fn from_rendered(
        doc: &str,
        template: &str,
        cluster: &str,
    ) -> Result<Manifest, ManifestError> {
        let mut object: Value = serde_yaml::from_str(doc)?;
        let id = identify(&object)?;
        check_typed(&id, &object)?;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ManifestError::Shape("metadata is not a mapping".into()))?;
        let labels = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        let labels = labels
            .as_object_mut()
            .ok_or_else(|| ManifestError::Invalid {
                id: id.to_string(),
                message: "metadata.labels is not a mapping".into(),
            })?;
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
        labels.insert(CLUSTER_LABEL.into(), cluster.into());
        let hash = canonical_hash(&object);
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ManifestError::Shape("metadata is not a mapping".into()))?;
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        annotations
            .as_object_mut()
            .ok_or_else(|| ManifestError::Invalid {
                id: id.to_string(),
                message: "metadata.annotations is not a mapping".into(),
            })?
            .insert(HASH_ANNOTATION.into(), Value::String(hash));
        Ok(Manifest {
            object,
            template: template.to_string(),
            id,
        })
    }
}

/// sha256 over the object serialized with sorted keys, minus the hash annotation.
pub fn canonical_hash(object: &Value) -> String {
    let mut copy = object.clone();
    if let Some(a) = copy
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(HASH_ANNOTATION);
        if a.is_empty() {
            if let Some(m) = copy.pointer_mut("/metadata").and_then(Value::as_object_mut) {
                m.remove("annotations");
            }
        }
    }
    let canonical = sorted(&copy).to_string();
    format!("sha256:{}", hex(&Sha256::digest(canonical.as_bytes())))
}

/// A copy with every object's keys in sorted order, whatever serde_json's map type.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&map[k])))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn identify(object: &Value) -> Result<ObjectId, ManifestError> {
    let field = |path: &str| {
        object
            .pointer(path)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let api_version =
        field("/apiVersion").ok_or_else(|| ManifestError::Shape("apiVersion is missing".into()))?;
    let kind = field("/kind").ok_or_else(|| ManifestError::Shape("kind is missing".into()))?;
    let name = field("/metadata/name").filter(|n| !n.is_empty());
    let name =
        name.ok_or_else(|| ManifestError::Shape(format!("{kind}: metadata.name is missing")))?;
    let namespace = field("/metadata/namespace");
    let id = ObjectId {
        api_version,
        kind,
        namespace,
        name,
    };
    if !KIND_RANK.contains(&id.kind.as_str()) {
        return Err(ManifestError::Invalid {
            id: id.to_string(),
            message: format!(
                "kind `{}` is not one netboot manages ({})",
                id.kind,
                KIND_RANK.join(", ")
            ),
        });
    }
    match (namespaced(&id.kind), &id.namespace) {
        (true, None) => Err(ManifestError::Invalid {
            id: id.to_string(),
            message: "metadata.namespace is missing".into(),
        }),
        (false, Some(_)) => Err(ManifestError::Invalid {
            id: id.to_string(),
            message: "is cluster-scoped; remove metadata.namespace".into(),
        }),
        _ => Ok(id),
    }
}

/// Deserializes into the typed k8s-openapi struct for the kind, which catches
/// wrong types and malformed quantities, and checks the apiVersion.
fn check_typed(id: &ObjectId, object: &Value) -> Result<(), ManifestError> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, batch::v1 as batch, core::v1 as core,
        rbac::v1 as rbac,
    };
    fn typed<T: serde::de::DeserializeOwned + k8s_openapi::Resource>(
        id: &ObjectId,
        v: &Value,
    ) -> Result<(), ManifestError> {
        if id.api_version != T::API_VERSION {
            return Err(ManifestError::Invalid {
                id: id.to_string(),
                message: format!(
                    "apiVersion `{}` is wrong for {}; expected `{}`",
                    id.api_version,
                    id.kind,
                    T::API_VERSION
                ),
            });
        }
        serde_json::from_value::<T>(v.clone())
            .map(|_| ())
            .map_err(|e| ManifestError::Invalid {
                id: id.to_string(),
                message: e.to_string(),
            })
    }
    match id.kind.as_str() {
        "Namespace" => typed::<core::Namespace>(id, object),
        "ServiceAccount" => typed::<core::ServiceAccount>(id, object),
        "ClusterRole" => typed::<rbac::ClusterRole>(id, object),
        "ClusterRoleBinding" => typed::<rbac::ClusterRoleBinding>(id, object),
        "Role" => typed::<rbac::Role>(id, object),
        "RoleBinding" => typed::<rbac::RoleBinding>(id, object),
        "ValidatingAdmissionPolicy" => typed::<adm::ValidatingAdmissionPolicy>(id, object),
        "ValidatingAdmissionPolicyBinding" => {
            typed::<adm::ValidatingAdmissionPolicyBinding>(id, object)
        }
        "ConfigMap" => typed::<core::ConfigMap>(id, object),
        "Secret" => typed::<core::Secret>(id, object),
        "Service" => typed::<core::Service>(id, object),
        "DaemonSet" => typed::<apps::DaemonSet>(id, object),
        "Deployment" => typed::<apps::Deployment>(id, object),
        "Pod" => typed::<core::Pod>(id, object),
        "CronJob" => typed::<batch::CronJob>(id, object),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_kind_rank_then_namespace_then_name() {
        let id = |kind: &str, ns: Option<&str>, name: &str| ObjectId {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: ns.map(Into::into),
            name: name.into(),
        };
        let mut ids = [
            id("DaemonSet", Some("a"), "x"),
            id("ConfigMap", Some("b"), "a"),
            id("ConfigMap", Some("a"), "z"),
            id("Namespace", None, "n"),
        ];
        ids.sort();
        let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "Namespace/n",
                "ConfigMap/a/z",
                "ConfigMap/b/a",
                "DaemonSet/a/x"
            ]
        );
    }

    #[test]
    fn rejects_unknown_kinds_and_missing_namespace() {
        let err = Manifest::from_rendered(
            "apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n",
            "t",
            "c",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("kind `Widget` is not one netboot manages"),
            "{err}"
        );
        let err = Manifest::from_rendered(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w}\n",
            "t",
            "c",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "ConfigMap/w: metadata.namespace is missing"
        );
        let err = Manifest::from_rendered(
            "apiVersion: apps/v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\n",
            "t",
            "c",
        )
        .unwrap_err();
        assert!(err.to_string().contains("expected `v1`"), "{err}");
    }

    #[test]
    fn hash_ignores_key_order_and_itself() {
        let a = Manifest::from_rendered(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\ndata: {a: '1', b: '2'}\n",
            "t",
            "c",
        )
        .unwrap();
        let b = Manifest::from_rendered(
            "kind: ConfigMap\ndata: {b: '2', a: '1'}\nmetadata: {namespace: n, name: w}\napiVersion: v1\n",
            "t",
            "c",
        )
        .unwrap();
        assert_eq!(a.hash(), b.hash());
        assert!(a.hash().starts_with("sha256:"));
        assert_eq!(canonical_hash(&a.object), a.hash());
    }
}
