//! The kube-proxy handover, step by step, each behind a gate:
//!
//! agents rolled out → every node reports KubeProxyReplacement=true → back up
//! the kube-proxy DaemonSet and ConfigMap (whole objects, minus server-set
//! fields) → delete both → confirm they and their pods are gone and every
//! node's KUBE-* rules are cleared. Validation and rollback follow (see
//! converge.rs). If a gate fails, kube-proxy stays and the error names the
//! gate and the nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::Client;
use serde::Serialize;
use serde_json::Value;

use crate::apply::{describe, FIELD_MANAGER};
use crate::inventory::StepRecord;
use crate::manifest::{CLUSTER_LABEL, MANAGED_BY};
use crate::spec::KubeProxy;
use crate::wait::{self, NodeProblem, WaitError};

pub const BACKUP_NAME: &str = "netboot-kube-proxy-backup";
const KUBE_PROXY_POD_SELECTOR: &str = "k8s-app=kube-proxy";

/// The handover's steps, in order; `netboot plan` lists them.
pub const STEPS: &[(&str, &str)] = &[
    (
        "agents-rolled-out",
        "the agent DaemonSet's rollout is complete on every node",
    ),
    (
        "nodes-report-replacement",
        "every node's agent reports KubeProxyReplacement=true",
    ),
    (
        "backup-kube-proxy",
        "the kube-proxy DaemonSet and ConfigMap are backed up",
    ),
    (
        "delete-kube-proxy",
        "the kube-proxy DaemonSet and ConfigMap are deleted",
    ),
    ("kube-proxy-gone", "they and their pods are gone"),
    (
        "rules-cleared",
        "every node reports its KUBE-* rules cleared",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("gate `{step}` failed: {message}{}", nodes_list(.nodes))]
    Gate {
        step: String,
        message: String,
        nodes: Vec<NodeProblem>,
    },
    #[error("{object}: {message}")]
    Api { object: String, message: String },
}

fn nodes_list(nodes: &[NodeProblem]) -> String {
    nodes
        .iter()
        .map(|n| format!("\n  {}: {}", n.node, n.reason))
        .collect()
}

impl HandoverError {
    fn gate(step: &str, e: WaitError) -> Self {
        match e {
            WaitError::Timeout {
                reason,
                nodes,
                seconds,
                ..
            } => HandoverError::Gate {
                step: step.into(),
                message: format!("not met after {seconds}s: {reason}"),
                nodes,
            },
            WaitError::Api { what, message } => HandoverError::Gate {
                step: step.into(),
                message: format!("{what}: {message}"),
                nodes: vec![],
            },
        }
    }
}

/// What of kube-proxy is in the cluster.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyState {
    pub daemon_set: bool,
    pub config_map: bool,
    pub pods: usize,
}

impl KubeProxyState {
    pub fn present(&self) -> bool {
        self.daemon_set || self.config_map
    }
    pub fn gone(&self) -> bool {
        !self.present() && self.pods == 0
    }
}

pub async fn kube_proxy_state(
    client: &Client,
    kp: &KubeProxy,
) -> Result<KubeProxyState, HandoverError> {
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), &kp.namespace);
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &kp.namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &kp.namespace);
    let err = |object: String| {
        move |e: kube::Error| HandoverError::Api {
            object,
            message: describe(&e),
        }
    };
    Ok(KubeProxyState {
        daemon_set: ds
            .get_opt(&kp.daemon_set)
            .await
            .map_err(err(format!("DaemonSet/{}/{}", kp.namespace, kp.daemon_set)))?
            .is_some(),
        config_map: cm
            .get_opt(&kp.config_map)
            .await
            .map_err(err(format!("ConfigMap/{}/{}", kp.namespace, kp.config_map)))?
            .is_some(),
        pods: pods
            .list(&ListParams::default().labels(KUBE_PROXY_POD_SELECTOR))
            .await
            .map_err(err(format!("pods in {}", kp.namespace)))?
            .items
            .len(),
    })
}

/// The object as it can be created again: without uid, resourceVersion,
/// timestamps, managedFields, generation and status.
pub fn strip_server_fields(mut v: Value) -> Value {
    if let Some(map) = v.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
                "selfLink",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                meta.remove(f);
            }
        }
    }
    v
}

/// The stored copy of kube-proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub daemon_set: Option<Value>,
    pub config_map: Option<Value>,
    pub taken: String,
}

/// Stores kube-proxy's DaemonSet and ConfigMap, whole, in a ConfigMap in
/// netboot's namespace. Refuses to overwrite a backup with nothing.
pub async fn backup(
    client: &Client,
    namespace: &str,
    kp: &KubeProxy,
    cluster: &str,
) -> Result<Backup, HandoverError> {
    let get = |kind: &'static str, name: String| async move {
        let (ar, _) = crate::resources::api_resource(kind).ok_or_else(|| HandoverError::Api {
            object: kind.into(),
            message: "unknown kind".into(),
        })?;
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &kp.namespace, &ar);
        let obj = api.get_opt(&name).await.map_err(|e| HandoverError::Api {
            object: format!("{kind}/{}/{name}", kp.namespace),
            message: describe(&e),
        })?;
        obj.map(|o| serde_json::to_value(o).map(strip_server_fields))
            .transpose()
            .map_err(|e| HandoverError::Api {
                object: format!("{kind}/{}/{name}", kp.namespace),
                message: e.to_string(),
            })
    };
    let daemon_set = get("DaemonSet", kp.daemon_set.clone()).await?;
    let config_map = get("ConfigMap", kp.config_map.clone()).await?;
    if daemon_set.is_none() && config_map.is_none() {
        return Err(HandoverError::Api {
            object: format!("DaemonSet/{}/{}", kp.namespace, kp.daemon_set),
            message: "nothing to back up: kube-proxy is not installed".into(),
        });
    }
    let b = Backup {
        daemon_set,
        config_map,
        taken: jiff::Timestamp::now().to_string(),
    };
    let mut data = BTreeMap::new();
    let json = |v: &Option<Value>| serde_json::to_string_pretty(v).unwrap_or_default();
    data.insert("daemonset.json".to_string(), json(&b.daemon_set));
    data.insert("configmap.json".to_string(), json(&b.config_map));
    data.insert("taken".to_string(), b.taken.clone());
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(BACKUP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (CLUSTER_LABEL.to_string(), cluster.to_string()),
            ])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            BACKUP_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(|e| HandoverError::Api {
            object: format!("ConfigMap/{namespace}/{BACKUP_NAME}"),
            message: describe(&e),
        })?;
    Ok(b)
}

pub async fn load_backup(
    client: &Client,
    namespace: &str,
) -> Result<Option<Backup>, HandoverError> {
    let object = format!("ConfigMap/{namespace}/{BACKUP_NAME}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(BACKUP_NAME)
        .await
        .map_err(|e| HandoverError::Api {
            object: object.clone(),
            message: describe(&e),
        })?;
    let Some(cm) = cm else { return Ok(None) };
    let data = cm.data.unwrap_or_default();
    let parse = |k: &str| -> Result<Option<Value>, HandoverError> {
        match data.get(k) {
            None => Ok(None),
            Some(s) => serde_json::from_str(s).map_err(|e| HandoverError::Api {
                object: object.clone(),
                message: format!("{k}: {e}"),
            }),
        }
    };
    Ok(Some(Backup {
        daemon_set: parse("daemonset.json")?,
        config_map: parse("configmap.json")?,
        taken: data.get("taken").cloned().unwrap_or_default(),
    }))
}

/// Creates kube-proxy's objects from the backup (ConfigMap first); objects
/// that exist already are left as they are.
pub async fn restore(client: &Client, b: &Backup) -> Result<Vec<String>, HandoverError> {
    let mut restored = Vec::new();
    for (kind, obj) in [("ConfigMap", &b.config_map), ("DaemonSet", &b.daemon_set)] {
        let Some(obj) = obj else { continue };
        let (ar, _) = crate::resources::api_resource(kind).ok_or_else(|| HandoverError::Api {
            object: kind.into(),
            message: "unknown kind".into(),
        })?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("kube-system");
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let object = format!("{kind}/{ns}/{name}");
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let dynamic: DynamicObject =
            serde_json::from_value(obj.clone()).map_err(|e| HandoverError::Api {
                object: object.clone(),
                message: e.to_string(),
            })?;
        match api.create(&PostParams::default(), &dynamic).await {
            Ok(_) => restored.push(object),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(HandoverError::Api {
                    object,
                    message: describe(&e),
                })
            }
        }
    }
    Ok(restored)
}

/// Settings for [`replace_kube_proxy`].
#[derive(Debug, Clone)]
pub struct HandoverOptions {
    pub namespace: String,
    pub cluster: String,
    pub rollout_timeout: Duration,
    /// For the gates after deletion (pods gone, rules cleared).
    pub gate_timeout: Duration,
    pub dry_run: bool,
}

/// Runs the gated handover; every step is appended to `records` as it ends.
pub async fn replace_kube_proxy(
    client: &Client,
    kp: &KubeProxy,
    opts: &HandoverOptions,
    records: &mut Vec<StepRecord>,
) -> Result<(), HandoverError> {
    let mut done = |name: &str, message: String| {
        eprintln!(
            "  ✓ {name}{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        );
        records.push(StepRecord {
            name: name.into(),
            result: "done".into(),
            message,
        });
    };
    wait::agents_rolled_out(client, &opts.namespace, opts.rollout_timeout)
        .await
        .map_err(|e| HandoverError::gate("agents-rolled-out", e))?;
    done("agents-rolled-out", String::new());
    wait::until(
        "nodes to report KubeProxyReplacement=true",
        opts.rollout_timeout,
        || async {
            let p = wait::nodes_not_reporting(client, true, false).await?;
            Ok((
                if p.is_empty() {
                    String::new()
                } else {
                    "not every node reports".into()
                },
                p,
            ))
        },
    )
    .await
    .map_err(|e| HandoverError::gate("nodes-report-replacement", e))?;
    let n = wait::node_names(client)
        .await
        .map_err(|e| HandoverError::gate("nodes-report-replacement", e))?
        .len();
    done("nodes-report-replacement", format!("{n} of {n} nodes"));
    let b = backup(client, &opts.namespace, kp, &opts.cluster).await?;
    done(
        "backup-kube-proxy",
        format!(
            "ConfigMap/{}/{BACKUP_NAME} (taken {})",
            opts.namespace, b.taken
        ),
    );
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), &kp.namespace);
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &kp.namespace);
    let gone_ok = |r: Result<_, kube::Error>, object: String| match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(HandoverError::Api {
            object,
            message: describe(&e),
        }),
    };
    gone_ok(
        ds.delete(&kp.daemon_set, &DeleteParams::foreground())
            .await
            .map(|_| ()),
        format!("DaemonSet/{}/{}", kp.namespace, kp.daemon_set),
    )?;
    gone_ok(
        cm.delete(&kp.config_map, &DeleteParams::default())
            .await
            .map(|_| ()),
        format!("ConfigMap/{}/{}", kp.namespace, kp.config_map),
    )?;
    done(
        "delete-kube-proxy",
        format!(
            "DaemonSet/{0}/{1} and ConfigMap/{0}/{2}",
            kp.namespace, kp.daemon_set, kp.config_map
        ),
    );
    wait::until("kube-proxy to be gone", opts.gate_timeout, || async {
        let s = kube_proxy_state(client, kp)
            .await
            .map_err(|e| WaitError::Api {
                what: "kube-proxy".into(),
                message: e.to_string(),
            })?;
        Ok((
            if s.gone() {
                String::new()
            } else {
                format!("{} kube-proxy pods remain", s.pods)
            },
            vec![],
        ))
    })
    .await
    .map_err(|e| HandoverError::gate("kube-proxy-gone", e))?;
    done("kube-proxy-gone", String::new());
    wait::until(
        "nodes to report KUBE-* rules cleared",
        opts.gate_timeout,
        || async {
            let p = wait::nodes_not_reporting(client, true, true).await?;
            Ok((
                if p.is_empty() {
                    String::new()
                } else {
                    "rules remain".into()
                },
                p,
            ))
        },
    )
    .await
    .map_err(|e| HandoverError::gate("rules-cleared", e))?;
    done("rules-cleared", format!("{n} of {n} nodes"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strips_only_server_fields() {
        let v = json!({"metadata": {"name": "kube-proxy", "uid": "u", "resourceVersion": "5", "labels": {"k8s-app": "kube-proxy"}, "managedFields": []}, "spec": {"a": 1}, "status": {"x": 1}});
        assert_eq!(
            strip_server_fields(v),
            json!({"metadata": {"name": "kube-proxy", "labels": {"k8s-app": "kube-proxy"}}, "spec": {"a": 1}})
        );
    }
}
