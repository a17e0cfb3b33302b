//! The whole job: plan → lock → apply → prune → rollout → handover →
//! validate → (rollback) → inventory and events. `netboot plan` stops after
//! the first step; `netboot apply` runs them all.
//!
//! The plan is made with dry-run requests only, and when it finds nothing to
//! do the run ends there: an unchanged cluster sees no write at all (not even
//! the lock).

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use serde::Serialize;

use crate::apply::{self, ApplyOptions, ChangeSet};
use crate::cluster::Connection;
use crate::endpoint::{self, Detected};
use crate::handover::{self, HandoverOptions, KubeProxyState};
use crate::inventory::{self, Inventory, StepRecord};
use crate::lock;
use crate::manifest::Manifest;
use crate::prune;
use crate::render::{self, RenderOptions};
use crate::spec::ClusterNetwork;
use crate::validate::{self, ValidateOptions, ValidationReport};
use crate::wait;

/// Everything a run needs besides the connection.
#[derive(Debug, Clone)]
pub struct Settings {
    pub spec: ClusterNetwork,
    /// The spec's file name, for messages.
    pub spec_file: String,
    /// Where the spec came from: a git commit, or `file:sha256:…` of its bytes.
    pub revision: String,
    pub render: RenderOptions,
    /// Delete and recreate objects whose immutable fields changed.
    pub force: bool,
    /// How long to wait for another netboot's lock.
    pub lock_wait: Duration,
    /// Image of the probe pods; default the netboot image at the datapath version.
    pub probe_image: Option<String>,
    /// Try the handover again even though it was rolled back at this revision.
    pub retry: bool,
    /// Skip validation after changes (never skipped after a handover).
    pub skip_validation: bool,
}

/// What the handover will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoverPlan {
    /// Nothing: kube-proxy is where the spec wants it.
    None,
    /// Replace mode with kube-proxy present: the gated handover.
    Replace,
    /// Coexist mode with kube-proxy gone and a backup present: restore it.
    Restore,
    /// The handover failed validation and was rolled back at this revision;
    /// agents stay in coexist mode until a new revision or `--retry`.
    HeldAfterRollback,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub cluster: String,
    pub revision: String,
    pub endpoint: Detected,
    pub changes: ChangeSet,
    pub handover: HandoverPlan,
    pub handover_steps: Vec<String>,
    pub kube_proxy: KubeProxyState,
    /// Nothing to write.
    pub noop: bool,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub plan: Plan,
    pub applied: ChangeSet,
    pub handover: Vec<StepRecord>,
    pub validation: Option<ValidationReport>,
    pub rolled_back: bool,
    /// 0 ok, 1 validation failed (and rolled back when configured).
    pub exit_code: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("prune: {0}")]
    Prune(String),
    #[error("handover stopped, kube-proxy stays: {0}")]
    Gate(handover::HandoverError),
    #[error(transparent)]
    Handover(handover::HandoverError),
    #[error(transparent)]
    Wait(#[from] wait::WaitError),
}

/// The spec as this run should apply it: after a rollback at the same
/// revision, coexist mode until a new revision (or `--retry`).
fn effective_spec(s: &Settings, inv: Option<&Inventory>) -> (ClusterNetwork, bool) {
    let held = !s.retry
        && inv.is_some_and(|i| i.mode == "rolled-back" && i.revision == s.revision)
        && s.spec.kube_proxy.remove;
    let mut spec = s.spec.clone();
    if held {
        spec.datapath.kube_proxy_replacement = false;
        spec.kube_proxy.remove = false;
    }
    (spec, held)
}

/// Renders with the detected endpoint.
fn manifests(
    spec: &ClusterNetwork,
    s: &Settings,
    ep: &Detected,
) -> Result<Vec<Manifest>, ConvergeError> {
    let mut spec = spec.clone();
    spec.api_server = Some(ep.endpoint.clone());
    Ok(render::render(&spec, &s.spec_file, &s.render)?)
}

/// Computes what apply would do, with dry-run requests only.
pub async fn plan(
    conn: &Connection,
    s: &Settings,
) -> Result<(Plan, Vec<Manifest>, ClusterNetwork, Option<Inventory>), ConvergeError> {
    let client = &conn.client;
    let ep = endpoint::detect(client, &s.spec, &conn.server()).await?;
    let inv = inventory::load(client, &s.spec.namespace).await?;
    let (spec, held) = effective_spec(s, inv.as_ref());
    let desired = manifests(&spec, s, &ep)?;
    let mut changes = apply::apply(
        client,
        &desired,
        &ApplyOptions {
            dry_run: true,
            force: s.force,
        },
    )
    .await?;
    let stale = stale_objects(inv.as_ref(), &desired);
    prune::prune(client, &spec.name, &stale, true, &mut changes)
        .await
        .map_err(ConvergeError::Prune)?;
    let kp = handover::kube_proxy_state(client, &spec.kube_proxy)
        .await
        .map_err(ConvergeError::Handover)?;
    let handover = if held {
        HandoverPlan::HeldAfterRollback
    } else if spec.kube_proxy.remove && kp.present() {
        HandoverPlan::Replace
    } else if !spec.kube_proxy.remove
        && !kp.present()
        && handover::load_backup(client, &spec.namespace)
            .await
            .map_err(ConvergeError::Handover)?
            .is_some()
    {
        HandoverPlan::Restore
    } else {
        HandoverPlan::None
    };
    let handover_steps = match handover {
        HandoverPlan::Replace => handover::STEPS.iter().map(|(n, d)| format!("{n}: {d}")).chain(["validation: checks run; on failure kube-proxy is restored from the backup".to_string()]).collect(),
        HandoverPlan::Restore => vec!["restore-kube-proxy: recreate the kube-proxy DaemonSet and ConfigMap from the backup".into()],
        HandoverPlan::HeldAfterRollback => vec![format!("held: the handover was rolled back at revision {}; agents stay in coexist mode (commit a fix or pass --retry)", s.revision)],
        HandoverPlan::None => vec![],
    };
    let revision_changed = inv
        .as_ref()
        .is_none_or(|i| i.revision != s.revision || i.mode != mode_word(&spec, held));
    let noop = changes.changed() == 0
        && matches!(
            handover,
            HandoverPlan::None | HandoverPlan::HeldAfterRollback
        )
        && !revision_changed;
    let plan = Plan {
        cluster: spec.name.clone(),
        revision: s.revision.clone(),
        endpoint: ep,
        changes,
        handover,
        handover_steps,
        kube_proxy: kp,
        noop,
    };
    Ok((plan, desired, spec, inv))
}

fn mode_word(spec: &ClusterNetwork, held: bool) -> &'static str {
    match (held, spec.datapath.kube_proxy_replacement) {
        (true, _) => "rolled-back",
        (false, true) => "replace",
        (false, false) => "coexist",
    }
}

fn stale_objects(inv: Option<&Inventory>, desired: &[Manifest]) -> Vec<crate::manifest::ObjectId> {
    inv.map(|i| {
        i.ids()
            .into_iter()
            .filter(|id| !desired.iter().any(|m| m.id() == id))
            .collect()
    })
    .unwrap_or_default()
}

/// Runs the whole job.
pub async fn apply(conn: &Connection, s: &Settings) -> Result<Outcome, ConvergeError> {
    let (first, desired, spec, _) = plan(conn, s).await?;
    if first.noop {
        return Ok(noop(first));
    }
    let client = &conn.client;
    // The namespace first: the lock lives in it.
    if let Some(ns) = desired.iter().find(|m| m.id().kind == "Namespace") {
        apply::apply(client, std::slice::from_ref(ns), &ApplyOptions::default()).await?;
    }
    let lock = lock::acquire(client, &spec.namespace, s.lock_wait).await?;
    // Plan again under the lock: another netboot may have changed the cluster while we waited.
    let result = match plan(conn, s).await {
        Ok((again, _, _, _)) if again.noop => Ok(noop(again)),
        Ok((again, desired, spec, inv)) => apply_locked(conn, s, &spec, again, &desired, inv).await,
        Err(e) => Err(e),
    };
    if let Err(e) = lock.release().await {
        tracing::warn!("releasing the lock: {e}");
    }
    result
}

fn noop(plan: Plan) -> Outcome {
    Outcome {
        plan,
        applied: ChangeSet::default(),
        handover: vec![],
        validation: None,
        rolled_back: false,
        exit_code: 0,
    }
}

async fn apply_locked(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    plan: Plan,
    desired: &[Manifest],
    previous: Option<Inventory>,
) -> Result<Outcome, ConvergeError> {
    let client = &conn.client;
    let events = Events::new(client, &spec.namespace);
    let held = plan.handover == HandoverPlan::HeldAfterRollback;
    let mut applied = match apply::apply(
        client,
        desired,
        &ApplyOptions {
            dry_run: false,
            force: s.force,
        },
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            events.warn("ApplyFailed", &e.to_string()).await;
            return Err(e.into());
        }
    };
    let stale = stale_objects(previous.as_ref(), desired);
    prune::prune(client, &spec.name, &stale, false, &mut applied)
        .await
        .map_err(ConvergeError::Prune)?;
    let mut inv = previous.clone().unwrap_or_default();
    inv.cluster = spec.name.clone();
    inv.revision = s.revision.clone();
    inv.mode = mode_word(spec, held).into();
    inv.record(&applied);
    inventory::save(client, &spec.namespace, &inv, previous.as_ref()).await?;
    if applied.changed() > 0 {
        events
            .normal(
                "Applied",
                &format!("revision {}: {}", s.revision, applied.summary()),
            )
            .await;
    }

    let rollout = Duration::from_secs(u64::from(spec.validation.rollout_timeout_seconds));
    eprintln!("waiting for the agents to roll out …");
    if let Err(e) = wait::agents_rolled_out(client, &spec.namespace, rollout).await {
        events.warn("RolloutFailed", &e.to_string()).await;
        return Err(e.into());
    }

    let mut records = Vec::new();
    let mut handed_over = false;
    match plan.handover {
        HandoverPlan::Replace => {
            eprintln!("kube-proxy handover:");
            let opts = HandoverOptions {
                namespace: spec.namespace.clone(),
                cluster: spec.name.clone(),
                rollout_timeout: rollout,
                gate_timeout: rollout,
                dry_run: false,
            };
            let r =
                handover::replace_kube_proxy(client, &spec.kube_proxy, &opts, &mut records).await;
            if let Err(e) = r {
                let deleted = records.iter().any(|r| r.name == "delete-kube-proxy");
                let step = match &e {
                    handover::HandoverError::Gate { step, .. } => step.clone(),
                    handover::HandoverError::Api { .. } => "api".into(),
                };
                records.push(StepRecord {
                    name: step,
                    result: "failed".into(),
                    message: e.to_string(),
                });
                inv.handover = records.clone();
                inventory::save(client, &spec.namespace, &inv, None).await?;
                events.warn("HandoverStopped", &e.to_string()).await;
                if !deleted {
                    return Err(ConvergeError::Gate(e));
                }
                // kube-proxy is already gone: treat like failed validation.
                let rolled_back = spec.validation.rollback_on_failure
                    && rollback(conn, s, spec, &mut inv, &events).await.is_ok();
                return Ok(Outcome {
                    plan,
                    applied,
                    handover: records,
                    validation: None,
                    rolled_back,
                    exit_code: 1,
                });
            }
            handed_over = true;
            events
                .normal(
                    "HandoverComplete",
                    "kube-proxy removed; every node reports KubeProxyReplacement=true and its KUBE-* rules cleared",
                )
                .await;
        }
        HandoverPlan::Restore => {
            let restored = restore_kube_proxy(client, &spec.namespace).await?;
            records.push(StepRecord {
                name: "restore-kube-proxy".into(),
                result: "done".into(),
                message: restored.join(", "),
            });
            events
                .normal("KubeProxyRestored", &restored.join(", "))
                .await;
        }
        HandoverPlan::None | HandoverPlan::HeldAfterRollback => {}
    }

    let validation = if s.skip_validation && !handed_over {
        None
    } else {
        eprintln!("validating …");
        let report = validate::validate(
            client,
            spec,
            &validate_options(conn, s, spec, &plan.endpoint),
        )
        .await;
        Some(report)
    };
    let failed = validation.as_ref().is_some_and(|v| !v.ok());
    let mut rolled_back = false;
    if failed {
        let names: Vec<String> = validation
            .iter()
            .flat_map(|v| v.failed())
            .map(|c| c.name.clone())
            .collect();
        events
            .warn(
                "ValidationFailed",
                &format!("failed checks: {}", names.join(", ")),
            )
            .await;
        records.push(StepRecord {
            name: "validation".into(),
            result: "failed".into(),
            message: names.join(", "),
        });
        if handed_over && spec.validation.rollback_on_failure {
            rollback(conn, s, spec, &mut inv, &events).await?;
            rolled_back = true;
        }
    } else if validation.is_some() {
        records.push(StepRecord {
            name: "validation".into(),
            result: "done".into(),
            message: String::new(),
        });
    }
    if !records.is_empty() {
        inv.handover = records.clone();
        inventory::save(client, &spec.namespace, &inv, None).await?;
    }
    Ok(Outcome {
        plan,
        applied,
        handover: records,
        validation,
        rolled_back,
        exit_code: u8::from(failed),
    })
}

pub fn validate_options(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    ep: &Detected,
) -> ValidateOptions {
    ValidateOptions {
        api_server: ep.endpoint.clone(),
        config: conn.config.clone(),
        expect_kube_proxy: !spec.kube_proxy.remove,
        expect_replacement: spec.datapath.kube_proxy_replacement,
        probe_image: s
            .probe_image
            .clone()
            .unwrap_or_else(|| format!("ghcr.io/netboot/netboot:{}", spec.datapath.version)),
        timeout: Duration::from_secs(u64::from(spec.validation.timeout_seconds)),
        keep_probes: false,
    }
}

async fn restore_kube_proxy(
    client: &Client,
    namespace: &str,
) -> Result<Vec<String>, ConvergeError> {
    let backup = handover::load_backup(client, namespace)
        .await
        .map_err(ConvergeError::Handover)?
        .ok_or_else(|| {
            ConvergeError::Handover(handover::HandoverError::Api {
                object: format!("ConfigMap/{namespace}/{}", handover::BACKUP_NAME),
                message: "no backup of kube-proxy to restore".into(),
            })
        })?;
    handover::restore(client, &backup)
        .await
        .map_err(ConvergeError::Handover)
}

/// Back to coexist: kube-proxy restored from the backup first (so Services
/// keep working), then the agents switched to coexist mode and rolled out.
/// Recorded as `rolled-back` at this revision so the next run does not loop.
async fn rollback(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    inv: &mut Inventory,
    events: &Events,
) -> Result<(), ConvergeError> {
    let client = &conn.client;
    eprintln!("rolling back: restoring kube-proxy and switching agents to coexist …");
    let restored = restore_kube_proxy(client, &spec.namespace).await?;
    let mut coexist = spec.clone();
    coexist.datapath.kube_proxy_replacement = false;
    coexist.kube_proxy.remove = false;
    let ep = endpoint::detect(client, &coexist, &conn.server()).await?;
    let desired = manifests(&coexist, s, &ep)?;
    let applied = apply::apply(
        client,
        &desired,
        &ApplyOptions {
            dry_run: false,
            force: s.force,
        },
    )
    .await?;
    wait::agents_rolled_out(
        client,
        &spec.namespace,
        Duration::from_secs(u64::from(spec.validation.rollout_timeout_seconds)),
    )
    .await?;
    inv.mode = "rolled-back".into();
    inv.record(&applied);
    inv.handover.push(StepRecord {
        name: "rollback".into(),
        result: "done".into(),
        message: format!("restored {}; agents in coexist mode", restored.join(", ")),
    });
    inventory::save(client, &spec.namespace, inv, None).await?;
    events
        .warn(
            "RolledBack",
            &format!(
                "restored {}; agents switched to coexist mode",
                restored.join(", ")
            ),
        )
        .await;
    Ok(())
}

/// `netboot rollback`: replace → coexist now, whatever the spec says.
pub async fn rollback_now(conn: &Connection, s: &Settings) -> Result<Outcome, ConvergeError> {
    let (plan, desired, spec, _) = plan(conn, s).await?;
    let client = &conn.client;
    if let Some(ns) = desired.iter().find(|m| m.id().kind == "Namespace") {
        apply::apply(client, std::slice::from_ref(ns), &ApplyOptions::default()).await?;
    }
    let lock = lock::acquire(client, &spec.namespace, s.lock_wait).await?;
    let events = Events::new(client, &spec.namespace);
    let mut inv = inventory::load(client, &spec.namespace)
        .await?
        .unwrap_or_default();
    inv.cluster = spec.name.clone();
    inv.revision = s.revision.clone();
    let r = rollback(conn, s, &spec, &mut inv, &events).await;
    if let Err(e) = lock.release().await {
        tracing::warn!("releasing the lock: {e}");
    }
    r?;
    Ok(Outcome {
        plan,
        applied: ChangeSet::default(),
        handover: inv.handover,
        validation: None,
        rolled_back: true,
        exit_code: 0,
    })
}

/// Events on the inventory ConfigMap (best effort: an event that cannot be
/// written is logged, never fails the run).
pub(crate) struct Events {
    recorder: Recorder,
    reference: ObjectReference,
}

impl Events {
    pub(crate) fn new(client: &Client, namespace: &str) -> Self {
        let reporter = Reporter {
            controller: "netboot".into(),
            instance: Some(lock::identity()),
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(inventory::NAME.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        };
        Events {
            recorder: Recorder::new(client.clone(), reporter),
            reference,
        }
    }

    async fn publish(&self, type_: EventType, reason: &str, note: &str) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &self.reference).await {
            tracing::warn!("event {reason}: {}", apply::describe(&e));
        }
    }

    pub(crate) async fn normal(&self, reason: &str, note: &str) {
        self.publish(EventType::Normal, reason, note).await;
    }

    pub(crate) async fn warn(&self, reason: &str, note: &str) {
        self.publish(EventType::Warning, reason, note).await;
    }
}
