//! Server-side apply after fluxcd's ssa manager: for each object in kind-rank
//! order a dry-run apply first, a real apply only where the result differs
//! from the live object. An unchanged cluster sees no write at all.

use std::fmt;

use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde::Serialize;
use serde_json::Value;

use crate::diff;
use crate::manifest::{Manifest, ObjectId};
use crate::resources::dynamic_api;

pub const FIELD_MANAGER: &str = "netboot";

/// Options for [`apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Only compute the ChangeSet: dry-run requests, no writes.
    pub dry_run: bool,
    /// Delete and recreate objects whose immutable fields changed. Default false:
    /// such a change is an error naming the object.
    pub force: bool,
}

/// What happened (or would happen) to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Recreated,
    Unchanged,
    Pruned,
    Skipped,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Created,
        Action::Configured,
        Action::Recreated,
        Action::Unchanged,
        Action::Pruned,
        Action::Skipped,
    ];
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Recreated => "recreated",
            Action::Unchanged => "unchanged",
            Action::Pruned => "pruned",
            Action::Skipped => "skipped",
        };
        f.write_str(s)
    }
}

/// One entry of a [`ChangeSet`].
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    #[serde(flatten)]
    pub id: ObjectId,
    pub action: Action,
    /// Unified diff live → desired (empty for unchanged).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub diff: String,
    /// Why it was skipped, or other detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The hash of what was applied (for the inventory).
    #[serde(skip)]
    pub hash: String,
}

/// Everything an apply did, in order. Partial results survive an error.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChangeSet {
    pub entries: Vec<Change>,
}

impl ChangeSet {
    /// Entries that changed (or would change) the cluster.
    pub fn changed(&self) -> usize {
        self.entries
            .iter()
            .filter(|c| !matches!(c.action, Action::Unchanged | Action::Skipped))
            .count()
    }

    pub fn count(&self, action: Action) -> usize {
        self.entries.iter().filter(|c| c.action == action).count()
    }

    pub fn summary(&self) -> String {
        let parts: Vec<String> = Action::ALL
            .into_iter()
            .filter(|a| self.count(*a) > 0)
            .map(|a| format!("{} {a}", self.count(a)))
            .collect();
        if parts.is_empty() {
            "nothing to do".into()
        } else {
            parts.join(", ")
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{id}: {message}")]
    Object {
        id: String,
        message: String,
        changes: Box<ChangeSet>,
    },
}

impl ApplyError {
    /// What was done before the error.
    pub fn changes(&self) -> &ChangeSet {
        match self {
            ApplyError::Object { changes, .. } => changes,
        }
    }
}

/// Applies `manifests` in order (they come sorted by kind rank from render).
pub async fn apply(
    client: &Client,
    manifests: &[Manifest],
    opts: &ApplyOptions,
) -> Result<ChangeSet, ApplyError> {
    let mut changes = ChangeSet::default();
    for m in manifests {
        match apply_one(client, m, opts).await {
            Ok(change) => changes.entries.push(change),
            Err(message) => {
                return Err(ApplyError::Object {
                    id: m.id().to_string(),
                    message,
                    changes: Box::new(changes),
                });
            }
        }
    }
    Ok(changes)
}

async fn apply_one(client: &Client, m: &Manifest, opts: &ApplyOptions) -> Result<Change, String> {
    let id = m.id();
    let api =
        dynamic_api(client, id).ok_or_else(|| format!("kind {} is not supported", id.kind))?;
    let desired: DynamicObject =
        serde_json::from_value(m.object.clone()).map_err(|e| e.to_string())?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let change = |action, diff: String| Change {
        id: id.clone(),
        action,
        diff,
        reason: None,
        hash: m.hash().to_string(),
    };
    if crate::resources::optional(&id.kind)
        && !crate::resources::served(client, &id.kind)
            .await
            .map_err(|e| format!("discovery of {}: {}", id.kind, describe(&e)))?
    {
        return Ok(Change {
            reason: Some(not_served(&id.kind, &m.object)),
            ..change(Action::Skipped, String::new())
        });
    }
    let live = api.get_opt(&id.name).await.map_err(|e| describe(&e))?;
    let Some(live) = live else {
        let diff = diff::unified(None, &m.object, &id.to_string());
        if !opts.dry_run {
            api.patch(&id.name, &params, &Patch::Apply(&desired))
                .await
                .map_err(|e| describe(&e))?;
        }
        return Ok(change(Action::Created, diff));
    };
    let live = to_value(&live)?;
    let dry = match api
        .patch(&id.name, &params.clone().dry_run(), &Patch::Apply(&desired))
        .await
    {
        Ok(dry) => to_value(&dry)?,
        Err(e) if is_immutable(&e) => {
            if !opts.force {
                return Err(format!(
                    "{}; an immutable field changed: rerun with --force to delete and recreate it",
                    describe(&e)
                ));
            }
            let diff = diff::unified(Some(&live), &m.object, &id.to_string());
            if !opts.dry_run {
                api.delete(&id.name, &DeleteParams::foreground())
                    .await
                    .map_err(|e| describe(&e))?;
                wait_gone(&api, &id.name).await?;
                // Recreated by the same server-side apply, not a POST: an
                // apply that creates is authorized as `create` of this name,
                // so the reconciler's RBAC can name what it may create.
                api.patch(&id.name, &params, &Patch::Apply(&desired))
                    .await
                    .map_err(|e| describe(&e))?;
            }
            return Ok(change(Action::Recreated, diff));
        }
        Err(e) => return Err(describe(&e)),
    };
    if !diff::drifted(&live, &dry) {
        return Ok(change(Action::Unchanged, String::new()));
    }
    let diff = diff::unified(Some(&live), &dry, &id.to_string());
    if !opts.dry_run {
        api.patch(&id.name, &params, &Patch::Apply(&desired))
            .await
            .map_err(|e| describe(&e))?;
    }
    Ok(change(Action::Configured, diff))
}

/// Why an object of an optional kind was skipped: its CRD is not served.
pub fn not_served(kind: &str, object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    format!(
        "the cluster does not serve {kind} ({api_version}): install its CRD (the Prometheus Operator's) and the next apply or reconcile pass creates it, or set spec.observability.alerts: false"
    )
}

async fn wait_gone(api: &kube::Api<DynamicObject>, name: &str) -> Result<(), String> {
    for _ in 0..120 {
        if api.get_opt(name).await.map_err(|e| describe(&e))?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err("still present 60s after delete".into())
}

fn to_value(o: &DynamicObject) -> Result<Value, String> {
    serde_json::to_value(o).map_err(|e| e.to_string())
}

fn is_immutable(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422 && s.message.contains("immutable"))
}

/// An API error as one line: the server's message, or the transport error.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => netboot_contract::errors::chain(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A fake API server on loopback: answers discovery of
    /// monitoring.coreos.com/v1 with `discovery` (status, body) and every
    /// other request with 500; records each request line.
    async fn fake_api(discovery: (u16, &'static str)) -> (Client, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 16384];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = req.lines().next().unwrap_or_default().to_string();
                log.lock().unwrap().push(line.clone());
                let (code, body) = if line.starts_with("GET /apis/monitoring.coreos.com/v1 ") {
                    discovery
                } else {
                    (
                        500,
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"unexpected","reason":"InternalError","code":500}"#,
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        let mut config = kube::Config::new(url.parse::<http::Uri>().unwrap());
        config.default_retry = false;
        (Client::try_from(config).unwrap(), seen)
    }

    fn prometheus_rule() -> Manifest {
        Manifest::from_rendered(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: netboot, namespace: netboot-system}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up == 0, for: 5m}]}]\n",
            "observability.yaml.hbs",
            "local",
        )
        .unwrap()
    }

    const NOT_FOUND: &str = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#;

    /// Without the Prometheus Operator's CRD, a PrometheusRule is skipped
    /// with the reason and nothing is written: the rest of the apply goes on.
    #[tokio::test]
    async fn a_prometheus_rule_without_its_crd_is_skipped_without_a_write() {
        let (client, seen) = fake_api((404, NOT_FOUND)).await;
        let changes = apply(&client, &[prometheus_rule()], &ApplyOptions::default())
            .await
            .unwrap();
        assert_eq!(changes.entries.len(), 1);
        let c = &changes.entries[0];
        assert_eq!(c.action, Action::Skipped);
        let reason = c.reason.as_deref().unwrap();
        assert!(
            reason.contains("does not serve PrometheusRule (monitoring.coreos.com/v1)"),
            "{reason}"
        );
        assert!(reason.contains("install its CRD"), "{reason}");
        assert_eq!(changes.changed(), 0);
        assert_eq!(
            *seen.lock().unwrap(),
            ["GET /apis/monitoring.coreos.com/v1 HTTP/1.1"]
        );
        // A group that exists without the resource is the same.
        let (client, _) = fake_api((
            200,
            r#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"monitoring.coreos.com/v1","resources":[{"name":"servicemonitors","singularName":"servicemonitor","namespaced":true,"kind":"ServiceMonitor","verbs":["get"]}]}"#,
        ))
        .await;
        assert!(!crate::resources::served(&client, "PrometheusRule")
            .await
            .unwrap());
    }

    /// With the CRD, apply goes on to read the object (here the fake answers
    /// 500, so the apply fails naming the object); a discovery error that
    /// is not a 404 fails the apply rather than skipping.
    #[tokio::test]
    async fn a_served_prometheus_rule_is_applied_and_discovery_errors_fail() {
        let (client, seen) = fake_api((
            200,
            r#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"monitoring.coreos.com/v1","resources":[{"name":"prometheusrules","singularName":"prometheusrule","namespaced":true,"kind":"PrometheusRule","verbs":["get","patch"]}]}"#,
        ))
        .await;
        assert!(crate::resources::served(&client, "PrometheusRule")
            .await
            .unwrap());
        let err = apply(&client, &[prometheus_rule()], &ApplyOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("PrometheusRule/netboot-system/netboot: "),
            "{err}"
        );
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().any(|l| l.starts_with(
                "GET /apis/monitoring.coreos.com/v1/namespaces/netboot-system/prometheusrules/netboot"
            )),
            "{seen:?}"
        );
        let (client, _) = fake_api((
            403,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden","reason":"Forbidden","code":403}"#,
        ))
        .await;
        let err = apply(&client, &[prometheus_rule()], &ApplyOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("discovery of PrometheusRule: forbidden"),
            "{err}"
        );
    }
}
