//! The in-cluster inventory: which objects netboot applied (with hashes), from
//! which source revision, and the handover's progress. It drives pruning —
//! netboot deletes only what its inventory lists and the object's labels
//! confirm — and `netboot status`. Stored as a ConfigMap in netboot's
//! namespace, written only when its content changes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::Client;
use serde::{Deserialize, Serialize};

use crate::apply::{describe, ChangeSet, FIELD_MANAGER};
use crate::manifest::{ObjectId, CLUSTER_LABEL, MANAGED_BY};

pub const NAME: &str = "netboot-inventory";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub id: ObjectId,
    pub hash: String,
}

/// One step of the kube-proxy handover, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    /// `done`, `failed`, `skipped`, `warning` (done, with something to act on).
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cluster: String,
    /// The source revision of the last change (git commit, or `file:sha256:…`).
    pub revision: String,
    pub objects: Vec<Entry>,
    /// `replace` or `coexist`: the mode the cluster was last brought to.
    #[serde(default)]
    pub mode: String,
    /// The last handover's steps.
    #[serde(default)]
    pub handover: Vec<StepRecord>,
    /// `spec.kubeProxy.allowUnserved` as last applied: gaps accepted by name.
    #[serde(
        default,
        rename = "allowUnserved",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allow_unserved: Vec<String>,
    /// The Services whose gaps it accepted at the last "nothing unserved" gate.
    #[serde(
        default,
        rename = "unservedAllowed",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub unserved_allowed: Vec<String>,
    /// When the content last changed (RFC 3339).
    #[serde(default)]
    pub updated: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("ConfigMap/{namespace}/{NAME}: {message}")]
    Api { namespace: String, message: String },
    #[error("ConfigMap/{namespace}/{NAME}: key {key} is not valid JSON: {source}")]
    Corrupt {
        namespace: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Inventory {
    pub fn ids(&self) -> Vec<ObjectId> {
        self.objects.iter().map(|e| e.id.clone()).collect()
    }

    /// Records what an apply left in the cluster: applied entries with their
    /// hashes, minus what was pruned.
    pub fn record(&mut self, changes: &ChangeSet) {
        use crate::apply::Action;
        self.objects = changes
            .entries
            .iter()
            .filter(|c| !matches!(c.action, Action::Pruned | Action::Skipped))
            .map(|c| Entry {
                id: c.id.clone(),
                hash: c.hash.clone(),
            })
            .collect();
    }
}

fn api(client: &Client, namespace: &str) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), namespace)
}

/// Reads the inventory; `None` when netboot never applied to this cluster.
pub async fn load(client: &Client, namespace: &str) -> Result<Option<Inventory>, InventoryError> {
    let cm = api(client, namespace)
        .get_opt(NAME)
        .await
        .map_err(|e| InventoryError::Api {
            namespace: namespace.into(),
            message: describe(&e),
        })?;
    let Some(cm) = cm else { return Ok(None) };
    let data = cm.data.unwrap_or_default();
    let get = |k: &str| data.get(k).cloned().unwrap_or_default();
    let json = |k: &str| -> Result<Option<serde_json::Value>, InventoryError> {
        match data.get(k) {
            None => Ok(None),
            Some(s) => {
                serde_json::from_str(s)
                    .map(Some)
                    .map_err(|source| InventoryError::Corrupt {
                        namespace: namespace.into(),
                        key: k.into(),
                        source,
                    })
            }
        }
    };
    let decode = |k: &str| -> Result<serde_json::Value, InventoryError> {
        Ok(json(k)?.unwrap_or(serde_json::Value::Array(vec![])))
    };
    let objects =
        serde_json::from_value(decode("objects")?).map_err(|source| InventoryError::Corrupt {
            namespace: namespace.into(),
            key: "objects".into(),
            source,
        })?;
    let handover =
        serde_json::from_value(decode("handover")?).map_err(|source| InventoryError::Corrupt {
            namespace: namespace.into(),
            key: "handover".into(),
            source,
        })?;
    let strings = |k: &str| -> Result<Vec<String>, InventoryError> {
        serde_json::from_value(decode(k)?).map_err(|source| InventoryError::Corrupt {
            namespace: namespace.into(),
            key: k.into(),
            source,
        })
    };
    Ok(Some(Inventory {
        cluster: get("cluster"),
        revision: get("revision"),
        objects,
        mode: get("mode"),
        handover,
        allow_unserved: strings("allowUnserved")?,
        unserved_allowed: strings("unservedAllowed")?,
        updated: get("updated"),
    }))
}

/// Writes the inventory if it differs from `previous` (ignoring `updated`).
/// Returns whether it wrote.
pub async fn save(
    client: &Client,
    namespace: &str,
    inv: &Inventory,
    previous: Option<&Inventory>,
) -> Result<bool, InventoryError> {
    if let Some(prev) = previous {
        let mut a = prev.clone();
        a.updated.clear();
        let mut b = inv.clone();
        b.updated.clear();
        if a == b {
            return Ok(false);
        }
    }
    let to_json = |v: &dyn erased::Json| v.json();
    let mut data = BTreeMap::new();
    data.insert("cluster".to_string(), inv.cluster.clone());
    data.insert("revision".to_string(), inv.revision.clone());
    data.insert("mode".to_string(), inv.mode.clone());
    data.insert("objects".to_string(), to_json(&inv.objects));
    data.insert("handover".to_string(), to_json(&inv.handover));
    for (k, v) in [
        ("allowUnserved", &inv.allow_unserved),
        ("unservedAllowed", &inv.unserved_allowed),
    ] {
        if !v.is_empty() {
            data.insert(k.to_string(), to_json(v));
        }
    }
    data.insert("updated".to_string(), jiff::Timestamp::now().to_string());
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (CLUSTER_LABEL.to_string(), inv.cluster.clone()),
            ])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    api(client, namespace)
        .patch(
            NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(|e| InventoryError::Api {
            namespace: namespace.into(),
            message: describe(&e),
        })?;
    Ok(true)
}

mod erased {
    /// Pretty JSON of anything serializable, for ConfigMap values people read.
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string_pretty(self)
                .unwrap_or_else(|e| format!("\"unserializable: {e}\""))
        }
    }
}
