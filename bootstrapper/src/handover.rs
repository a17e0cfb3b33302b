//! The kube-proxy handover, step by step, each behind a gate:
//!
//! agents rolled out → every node reports KubeProxyReplacement=true → every
//! Service needs only what every agent serves ([`crate::unserved`]) → back up
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
use crate::journal::{Captured, Journal, KubeProxyRef, Phase};
use crate::kube_proxy_mode::{self, ConfiguredMode};
use crate::lock::{Lock, LockError};
use crate::manifest::{CLUSTER_LABEL, MANAGED_BY};
use crate::spec::KubeProxy;
use crate::unserved::{self, UnservedReport};
use crate::wait::{self, NodeProblem, WaitError};

pub const BACKUP_NAME: &str = "netboot-kube-proxy-backup";
/// The backup ConfigMap's key holding the handover journal.
pub const JOURNAL_KEY: &str = "journal.json";
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
        "nothing-unserved",
        "every Service needs only what every agent serves (or what spec.kubeProxy.allowUnserved accepts)",
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
    #[error("the lock was lost; stopped before the next destructive step")]
    Lock(#[source] Box<LockError>),
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
    /// The mode its ConfigMap configures (`config.conf`'s `mode`); `None`
    /// when the ConfigMap is absent or its mode unreadable (then
    /// `configuredModeError` says why).
    pub configured_mode: Option<ConfiguredMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configured_mode_error: Option<String>,
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
    let daemon_set = ds
        .get_opt(&kp.daemon_set)
        .await
        .map_err(err(format!("DaemonSet/{}/{}", kp.namespace, kp.daemon_set)))?
        .is_some();
    let cm_object = format!("ConfigMap/{}/{}", kp.namespace, kp.config_map);
    let config_map = cm
        .get_opt(&kp.config_map)
        .await
        .map_err(err(cm_object.clone()))?;
    // An unreadable mode is shown, never a reason to stop.
    let (configured_mode, configured_mode_error) = match &config_map {
        None => (None, None),
        Some(c) => match kube_proxy_mode::from_data(&cm_object, c.data.as_ref()) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    Ok(KubeProxyState {
        configured_mode,
        configured_mode_error,
        daemon_set,
        config_map: config_map.is_some(),
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

/// The stored copy of kube-proxy, with the journal of the handover that took it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub daemon_set: Option<Value>,
    pub config_map: Option<Value>,
    pub taken: String,
    /// `None` for a backup written before the journal existed.
    pub journal: Option<Journal>,
}

impl Backup {
    fn journal_or_err(&self, namespace: &str) -> Result<&Journal, HandoverError> {
        self.journal.as_ref().ok_or_else(|| HandoverError::Api {
            object: format!("ConfigMap/{namespace}/{BACKUP_NAME}"),
            message: "the backup has no journal.json".into(),
        })
    }
}

fn kp_ref(kp: &KubeProxy) -> KubeProxyRef {
    KubeProxyRef {
        namespace: kp.namespace.clone(),
        daemon_set: kp.daemon_set.clone(),
        config_map: kp.config_map.clone(),
    }
}

fn captured(v: &Option<Value>) -> Captured {
    if v.is_some() {
        Captured::Object
    } else {
        Captured::Absent
    }
}

/// Backs kube-proxy's DaemonSet and ConfigMap up, whole, into a ConfigMap in
/// netboot's namespace, with the journal at [`Phase::BackedUp`].
///
/// Write-once per handover: a backup whose journal says a handover is in
/// progress is returned as it is, never taken again (kube-proxy may be half
/// deleted by then). Otherwise the new copy replaces the old one object by
/// object, and an object the cluster no longer has keeps its old copy: a
/// backup is never overwritten by an emptier one.
pub async fn backup(
    client: &Client,
    namespace: &str,
    kp: &KubeProxy,
    cluster: &str,
    revision: &str,
    by: &str,
) -> Result<Backup, HandoverError> {
    let old = load_backup(client, namespace).await?;
    if let Some(old) = &old {
        if old.journal.as_ref().is_some_and(|j| j.phase.in_progress()) {
            return Ok(old.clone());
        }
    }
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
    let mut daemon_set = get("DaemonSet", kp.daemon_set.clone()).await?;
    let mut config_map = get("ConfigMap", kp.config_map.clone()).await?;
    if daemon_set.is_none() && config_map.is_none() {
        return Err(HandoverError::Api {
            object: format!("DaemonSet/{}/{}", kp.namespace, kp.daemon_set),
            message: "nothing to back up: kube-proxy is not installed".into(),
        });
    }
    // Never emptier: keep an old copy of an object the cluster lacks now,
    // when it is the same object.
    if let Some(old) = old.filter(|o| {
        o.journal
            .as_ref()
            .is_none_or(|j| j.kube_proxy == kp_ref(kp))
    }) {
        daemon_set = daemon_set.or(old.daemon_set);
        config_map = config_map.or(old.config_map);
    }
    let now = jiff::Timestamp::now().to_string();
    let journal = Journal {
        phase: Phase::BackedUp,
        revision: revision.into(),
        started: now.clone(),
        updated: now.clone(),
        kube_proxy: kp_ref(kp),
        daemon_set: captured(&daemon_set),
        config_map: captured(&config_map),
        by: by.into(),
    };
    let b = Backup {
        daemon_set,
        config_map,
        taken: now,
        journal: Some(journal),
    };
    let mut data = BTreeMap::new();
    let json = |v: &Option<Value>| serde_json::to_string_pretty(v).unwrap_or_default();
    data.insert("daemonset.json".to_string(), json(&b.daemon_set));
    data.insert("configmap.json".to_string(), json(&b.config_map));
    data.insert("taken".to_string(), b.taken.clone());
    data.insert(
        JOURNAL_KEY.to_string(),
        serde_json::to_string_pretty(&b.journal).unwrap_or_default(),
    );
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

/// Records a new phase in the journal (a merge patch of `journal.json` only:
/// the backed-up objects beside it are never rewritten).
pub async fn set_phase(
    client: &Client,
    namespace: &str,
    journal: &mut Journal,
    phase: Phase,
) -> Result<(), HandoverError> {
    let mut next = journal.clone();
    next.phase = phase;
    next.updated = jiff::Timestamp::now().to_string();
    let text = serde_json::to_string_pretty(&next).map_err(|e| HandoverError::Api {
        object: format!("ConfigMap/{namespace}/{BACKUP_NAME}"),
        message: e.to_string(),
    })?;
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            BACKUP_NAME,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "data": { JOURNAL_KEY: text } })),
        )
        .await
        .map_err(|e| HandoverError::Api {
            object: format!("ConfigMap/{namespace}/{BACKUP_NAME}"),
            message: format!("recording phase {phase}: {}", describe(&e)),
        })?;
    *journal = next;
    Ok(())
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
    let journal = match data.get(JOURNAL_KEY) {
        None => None,
        Some(s) => serde_json::from_str(s).map_err(|e| HandoverError::Api {
            object: object.clone(),
            message: format!("{JOURNAL_KEY}: {e}"),
        })?,
    };
    Ok(Some(Backup {
        daemon_set: parse("daemonset.json")?,
        config_map: parse("configmap.json")?,
        taken: data.get("taken").cloned().unwrap_or_default(),
        journal,
    }))
}

/// Creates kube-proxy's objects from the backup (ConfigMap first); objects
/// that exist already are left as they are. Only the objects the spec names
/// are restored: a backup that holds anything else is refused.
pub async fn restore(
    client: &Client,
    b: &Backup,
    kp: &KubeProxy,
) -> Result<Vec<String>, HandoverError> {
    let mut restored = Vec::new();
    for (kind, obj, want) in [
        ("ConfigMap", &b.config_map, &kp.config_map),
        ("DaemonSet", &b.daemon_set, &kp.daemon_set),
    ] {
        let Some(obj) = obj else { continue };
        let (ar, _) = crate::resources::api_resource(kind).ok_or_else(|| HandoverError::Api {
            object: kind.into(),
            message: "unknown kind".into(),
        })?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let object = format!("{kind}/{ns}/{name}");
        let kind_ok = obj.pointer("/kind").and_then(Value::as_str) == Some(kind);
        if ns != kp.namespace || name != want || !kind_ok {
            return Err(HandoverError::Api {
                object: format!("ConfigMap/{}/{BACKUP_NAME}", b.journal.as_ref().map(|j| j.kube_proxy.namespace.as_str()).unwrap_or("?")),
                message: format!(
                    "the backup holds {object}, but the spec's kube-proxy is {kind}/{}/{want}: refusing to restore it",
                    kp.namespace
                ),
            });
        }
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

/// Waits until the restored kube-proxy serves: its DaemonSet rolled out and
/// every node's agent reporting kube-proxy's rules present.
pub async fn wait_kube_proxy_serving(
    client: &Client,
    kp: &KubeProxy,
    timeout: Duration,
) -> Result<(), HandoverError> {
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), &kp.namespace);
    let what = format!(
        "DaemonSet/{}/{} to serve again",
        kp.namespace, kp.daemon_set
    );
    wait::until(&what, timeout, || async {
        let d = ds
            .get_opt(&kp.daemon_set)
            .await
            .map_err(|e| WaitError::Api {
                what: what.clone(),
                message: describe(&e),
            })?;
        let Some(d) = d else {
            return Ok(("the DaemonSet does not exist".into(), vec![]));
        };
        if let Some(reason) = wait::rollout_pending(&d) {
            return Ok((reason, vec![]));
        }
        let p = wait::nodes_rules_not(client, wait::KubeProxyRules::Present).await?;
        Ok((
            if p.is_empty() {
                String::new()
            } else {
                "kube-proxy's rules are not on every node yet".into()
            },
            p,
        ))
    })
    .await
    .map_err(|e| HandoverError::gate("kube-proxy-serving", e))
}

/// Settings for [`replace_kube_proxy`].
#[derive(Debug, Clone)]
pub struct HandoverOptions {
    pub namespace: String,
    pub cluster: String,
    /// The revision that asks for the handover (recorded in the journal).
    pub revision: String,
    pub rollout_timeout: Duration,
    /// For the gates after deletion (pods gone, rules cleared).
    pub gate_timeout: Duration,
}

/// The "nothing unserved" gate: skipped when a handover that already began
/// deleting is resumed (stopping then would leave the cluster with neither
/// kube-proxy nor a finished handover); otherwise every Service must need
/// only what every agent serves, or what `allowUnserved` accepts.
async fn nothing_unserved(
    client: &Client,
    namespace: &str,
    kp: &KubeProxy,
) -> Result<Option<UnservedReport>, HandoverError> {
    let resuming = load_backup(client, namespace)
        .await?
        .and_then(|b| b.journal)
        .is_some_and(|j| j.phase.past_delete());
    if resuming {
        return Ok(None);
    }
    let report = unserved::check(client, &kp.allow_unserved)
        .await
        .map_err(|e| HandoverError::Gate {
            step: "nothing-unserved".into(),
            message: e.to_string(),
            nodes: vec![],
        })?;
    if !report.ok() {
        return Err(HandoverError::Gate {
            step: "nothing-unserved".into(),
            message: report.refusal(),
            nodes: vec![],
        });
    }
    Ok(Some(report))
}

/// Progress lines for the operator; the caller decides where they go.
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Runs the gated handover — from the start, or resuming an interrupted one
/// (every step is idempotent; the backup is taken once) — up to
/// [`Phase::Validating`]. Every step is appended to `records` as it ends; the
/// journal is written before each destructive step, and the lock is checked
/// before it too, so a run that lost its lock stops there. What the
/// "nothing unserved" gate found (when it ran) goes to `gate`.
pub async fn replace_kube_proxy(
    client: &Client,
    kp: &KubeProxy,
    opts: &HandoverOptions,
    lock: &Lock,
    progress: Progress<'_>,
    records: &mut Vec<StepRecord>,
    gate: &mut Option<UnservedReport>,
) -> Result<Journal, HandoverError> {
    let mut done = |name: &str, message: String| {
        progress(&format!(
            "  ✓ {name}{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        ));
        records.push(StepRecord {
            name: name.into(),
            result: "done".into(),
            message,
        });
    };
    let held = || async {
        lock.ensure_held()
            .await
            .map_err(|e| HandoverError::Lock(Box::new(e)))
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
    match nothing_unserved(client, &opts.namespace, kp).await? {
        None => done(
            "nothing-unserved",
            "skipped: resuming a handover whose deletes began".into(),
        ),
        Some(r) => {
            let message = if r.allowed.is_empty() {
                format!("agents serve {}", r.served.join(","))
            } else {
                format!(
                    "agents serve {}; accepted by allowUnserved: {}",
                    r.served.join(","),
                    r.allowed
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            };
            *gate = Some(r);
            done("nothing-unserved", message);
        }
    }
    crate::fault::point("before-backup").await;
    held().await?;
    let b = backup(
        client,
        &opts.namespace,
        kp,
        &opts.cluster,
        &opts.revision,
        lock.holder(),
    )
    .await?;
    let mut journal = b.journal_or_err(&opts.namespace)?.clone();
    done(
        "backup-kube-proxy",
        format!(
            "ConfigMap/{}/{BACKUP_NAME} (taken {}; DaemonSet {}, ConfigMap {})",
            opts.namespace,
            b.taken,
            journal.daemon_set.as_str(),
            journal.config_map.as_str(),
        ),
    );
    crate::fault::point("after-backup").await;
    held().await?;
    if !journal.phase.past_delete() {
        set_phase(client, &opts.namespace, &mut journal, Phase::Deleting).await?;
    }
    crate::fault::point("after-journal-deleting").await;
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
    crate::fault::point("between-deletes").await;
    gone_ok(
        cm.delete(&kp.config_map, &DeleteParams::default())
            .await
            .map(|_| ()),
        format!("ConfigMap/{}/{}", kp.namespace, kp.config_map),
    )?;
    if journal.phase == Phase::Deleting {
        set_phase(client, &opts.namespace, &mut journal, Phase::Deleted).await?;
    }
    done(
        "delete-kube-proxy",
        format!(
            "DaemonSet/{0}/{1} and ConfigMap/{0}/{2}",
            kp.namespace, kp.daemon_set, kp.config_map
        ),
    );
    crate::fault::point("after-deletes").await;
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
    if journal.phase == Phase::Deleted {
        set_phase(client, &opts.namespace, &mut journal, Phase::Validating).await?;
    }
    crate::fault::point("after-gates").await;
    Ok(journal)
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
