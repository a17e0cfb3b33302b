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
