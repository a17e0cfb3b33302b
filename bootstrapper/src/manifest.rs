//! A rendered Kubernetes object: checked, labelled, hashed, and ordered by
//! kind rank for apply (deletes go in reverse).
//!
//! Parsing is strict: a key that occurs twice in one mapping is an error (a
//! plain YAML load keeps the last and silently drops the first), and so is
//! any field the kind's schema (the k8s-openapi type) does not know, which a
//! typed load would silently ignore and apply would drop.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::render::hex;
use crate::spec::yaml::{self, Pos};

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
    "PrometheusRule",
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
    #[error("duplicate key `{path}` at line {}, column {} (first at line {}, column {})", .pos.line, .pos.column, .first.line, .first.column)]
    DuplicateKey { path: String, pos: Pos, first: Pos },
    #[error("{id}: unknown field{} {} (not in the {kind} schema)", if fields.len() == 1 { "" } else { "s" }, fields.join(", "))]
    UnknownFields {
        id: String,
        kind: String,
        fields: Vec<String>,
    },
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
        let mut object = strict::from_yaml(doc).map_err(|e| located(doc, e))?;
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

/// A strict-load error with the duplicate key's positions when the spec's
/// position-keeping parser finds one (serde_yaml does not say where).
fn located(doc: &str, e: serde_yaml::Error) -> ManifestError {
    match yaml::parse_documents(doc).map(|d| d.duplicates) {
        Ok(dups) if !dups.is_empty() => {
            let d = &dups[0];
            ManifestError::DuplicateKey {
                path: crate::spec::grammar::one_line(&d.path),
                pos: d.pos,
                first: d.first,
            }
        }
        _ => ManifestError::Yaml(e),
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
        let mut unknown = Vec::new();
        serde_ignored::deserialize::<_, _, T>(v, |path| {
            unknown.push(format!("`{}`", field_path(&path)));
        })
        .map_err(|e| ManifestError::Invalid {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        if unknown.is_empty() {
            return Ok(());
        }
        Err(ManifestError::UnknownFields {
            id: id.to_string(),
            kind: id.kind.clone(),
            fields: unknown,
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
        "PrometheusRule" => typed::<crate::observability::PrometheusRule>(id, object),
        _ => Ok(()),
    }
}

/// `spec.containers[0].name`: the path serde_ignored reports, as a field path.
fn field_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let parent = field_path(parent);
            let key = crate::spec::grammar::one_line(key);
            if parent.is_empty() {
                key
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// YAML to JSON values, refusing what a plain load would quietly lose.
mod strict {
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    /// One YAML document as a JSON value: keys are strings, each key occurs
    /// once per mapping, numbers are finite. serde_yaml's error says where.
    pub fn from_yaml(doc: &str) -> Result<Value, serde_yaml::Error> {
        StrictValue.deserialize(serde_yaml::Deserializer::from_str(doc))
    }

    struct StrictValue;

    impl<'de> DeserializeSeed<'de> for StrictValue {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for StrictValue {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a YAML value")
        }
        fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
            Number::from_f64(v)
                .map(Value::Number)
                .ok_or_else(|| E::custom(format!("{v} is not a finite number")))
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E: Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E: Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element_seed(StrictValue)? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(A::Error::custom(format!(
                        "duplicate key `{}`",
                        netboot_contract::errors::escape(&key)
                    )));
                }
                let value = map.next_value_seed(StrictValue)?;
                out.insert(key, value);
            }
            Ok(Value::Object(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: a value that broke out of a block scalar re-declared `kind`,
    /// `metadata` and `spec`; the last won and the ConfigMap became a DaemonSet.
    #[test]
    fn duplicate_keys_are_errors() {
        for doc in [
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\nkind: Secret\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n, name: x}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\ndata: {a: '1', \"a\": '2'}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\ndata: {1: x, '1': y}\n",
        ] {
            let err = Manifest::from_rendered(doc, "t", "c").unwrap_err().to_string();
            assert!(err.starts_with("duplicate key `"), "{doc}: {err}");
            assert!(err.contains("(first at line"), "names where: {err}");
        }
    }

    #[test]
    fn a_duplicate_key_names_both_positions() {
        let err = Manifest::from_rendered(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w\n  namespace: n\nkind: DaemonSet\n",
            "t",
            "c",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "duplicate key `kind` at line 6, column 1 (first at line 2, column 1)"
        );
    }

    #[test]
    fn fields_unknown_to_the_schema_are_errors() {
        let err = Manifest::from_rendered(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n, nmae: x}\ndata: {}\nspec: {hostPID: true}\n",
            "t",
            "c",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "ConfigMap/n/w: unknown fields `metadata.nmae`, `spec` (not in the ConfigMap schema)"
        );
        let err = Manifest::from_rendered(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: w, namespace: n}\nspec:\n  selector: {}\n  template:\n    spec:\n      hostPID: true\n      containers: [{name: a, image: b, privileged: true}]\n",
            "t",
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.ends_with("unknown field `spec.template.spec.containers[0].privileged` (not in the DaemonSet schema)"),
            "{err}"
        );
    }

    #[test]
    fn non_string_keys_and_odd_numbers_are_refused() {
        for doc in [
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\ndata: {[a]: b}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, namespace: n}\nx: .nan\n",
        ] {
            assert!(Manifest::from_rendered(doc, "t", "c").is_err(), "{doc}");
        }
    }

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
