//! The whole job: plan → lock → apply → prune → rollout → handover →
//! validate → (rollback) → inventory and events. `netboot plan` stops after
//! the first step; `netboot apply` runs them all.
//!
//! The plan gathers facts (endpoint, inventory, kube-proxy, the backup and its
//! handover journal) with reads and dry-run requests only, and the handover
//! step is a pure function of them ([`journal::decide`]): an interrupted
//! handover is resumed to validation or rolled back, never taken for done.
//! When the plan finds nothing to do the run ends there: an unchanged cluster
//! sees no write at all (not even the lock). Progress lines go through
//! [`Settings::progress`]; the library prints nothing itself.

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
pub use crate::journal::HandoverPlan;
use crate::journal::{self, Facts, Journal, Phase};
use crate::kube_proxy_mode::{self, NodeMode};
use crate::lock;
use crate::manifest::Manifest;
use crate::prune;
use crate::render::{self, RenderOptions};
use crate::spec::ClusterNetwork;
use crate::unserved::{self, UnservedReport};
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
    /// Validation may run a client pod on a node's host network (the
    /// `node-port` check's host part): true for an operator's `apply` and
    /// `validate`, false for the reconciler, whose admission policy keeps
    /// probe pods off the host network.
    pub host_network_probes: bool,
    /// Where progress lines go (the CLI: stderr; the reconciler: its log).
    pub progress: Progress,
}

/// A sink for progress lines; `Default` logs them at info level.
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl Default for Progress {
    fn default() -> Self {
        Progress(std::sync::Arc::new(|line: &str| tracing::info!("{line}")))
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

impl Progress {
    pub fn say(&self, line: &str) {
        (self.0)(line)
    }
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
    /// kube-proxy's mode each node's agent reports
    /// (`netboot.io/kube-proxy-mode`); listed while kube-proxy is present or
    /// a handover step is planned, else empty.
    pub node_modes: Vec<NodeMode>,
    /// The handover removes kube-proxy, which runs (or ran) in IPVS mode:
    /// the agents then also clear its IPVS virtual servers, kube-ipvs0 and
    /// ipsets.
    pub ipvs_cleanup: bool,
    /// The last handover's journal, as found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<Journal>,
    /// The "nothing unserved" gate as it would decide now (only when the
    /// handover would run it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unserved: Option<UnservedReport>,
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
    #[error("Nodes: listing them for kube-proxy's mode per node: {0}")]
    Nodes(String),
    #[error("handover stopped before anything was deleted, kube-proxy stays")]
    Gate(#[source] handover::HandoverError),
    #[error(transparent)]
    Handover(handover::HandoverError),
    #[error(transparent)]
    Wait(#[from] wait::WaitError),
    #[error("handover stopped after kube-proxy's deletion began, and the rollback failed too ({rollback}); the journal in ConfigMap/{namespace}/{backup} says where it stopped: the next run resumes it or restores kube-proxy")]
    RollbackFailed {
        namespace: String,
        backup: &'static str,
        rollback: String,
        #[source]
        cause: Box<handover::HandoverError>,
    },
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
    let backup = handover::load_backup(client, &spec.namespace)
        .await
        .map_err(ConvergeError::Handover)?;
    let journal = backup.as_ref().and_then(|b| b.journal.clone());
    let handover = journal::decide(&Facts {
        wants_removal: spec.kube_proxy.remove,
        held,
        kube_proxy: kp.clone(),
        backup: backup.is_some(),
        journal: journal.clone(),
    });
    let resume_note = |p: Phase| {
        format!("resume: the handover of revision {} stopped at `{p}`; it is taken on from there (the backup is kept as taken)", journal.as_ref().map(|j| j.revision.as_str()).unwrap_or("?"))
    };
    let replace_steps = || {
        handover::STEPS
            .iter()
            .map(|(n, d)| format!("{n}: {d}"))
            .chain([
                "validation: checks run; on failure kube-proxy is restored from the backup"
                    .to_string(),
            ])
    };
    let handover_steps = match handover {
        HandoverPlan::Replace => replace_steps().collect(),
        HandoverPlan::Resume(p) => std::iter::once(resume_note(p)).chain(replace_steps()).collect(),
        HandoverPlan::Validate => vec![
            resume_note(Phase::Validating),
            "validation: checks run; on failure kube-proxy is restored from the backup".into(),
        ],
        HandoverPlan::Restore => vec!["restore-kube-proxy: recreate the kube-proxy DaemonSet and ConfigMap from the backup, wait until they serve on every node, then switch the agents to coexist".into()],
        HandoverPlan::Abandon => vec!["abandon: the handover stopped before anything was deleted and the spec no longer asks for it; kube-proxy is intact".into()],
        HandoverPlan::HeldAfterRollback => vec![format!("held: the handover was rolled back at revision {}; agents stay in coexist mode (commit a fix or pass --retry)", s.revision)],
        HandoverPlan::None => vec![],
    };
    let node_modes = if kp.present() || handover != HandoverPlan::None {
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .list_metadata(&kube::api::ListParams::default())
            .await
            .map_err(|e| ConvergeError::Nodes(apply::describe(&e)))?
            .items
            .iter()
            .map(|n| NodeMode::of(&n.metadata))
            .collect()
    } else {
        vec![]
    };
    let ipvs_cleanup = matches!(handover, HandoverPlan::Replace | HandoverPlan::Resume(_))
        && kube_proxy_mode::ipvs_in_use(kp.configured_mode.as_ref(), &node_modes);
    let gate_ahead = match handover {
        HandoverPlan::Replace => true,
        HandoverPlan::Resume(p) => !p.past_delete(),
        _ => false,
    };
    let unserved = if gate_ahead {
        Some(
            unserved::check(client, &spec.kube_proxy.allow_unserved)
                .await
                .map_err(|e| {
                    ConvergeError::Handover(handover::HandoverError::Gate {
                        step: "nothing-unserved".into(),
                        message: e.to_string(),
                        nodes: vec![],
                    })
                })?,
        )
    } else {
        None
    };
    let revision_changed = inv
        .as_ref()
        .is_none_or(|i| i.revision != s.revision || i.mode != mode_word(&spec, held));
    let noop = changes.changed() == 0 && handover.is_quiet() && !revision_changed;
    let plan = Plan {
        cluster: spec.name.clone(),
        revision: s.revision.clone(),
        endpoint: ep,
        changes,
        handover,
        handover_steps,
        kube_proxy: kp,
        node_modes,
        ipvs_cleanup,
        journal,
        unserved,
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

/// Runs the whole job; then, with kube-proxy gone, warns on every Service
/// the agents cannot serve (a Warning Event on it, once per gap).
pub async fn apply(conn: &Connection, s: &Settings) -> Result<Outcome, ConvergeError> {
    let outcome = apply_run(conn, s).await?;
    if s.spec.datapath.kube_proxy_replacement && !outcome.rolled_back {
        warn_unserved(conn, s).await;
    }
    Ok(outcome)
}

/// After a handover a new Service may need what the agents do not serve
/// (the gate checked only the Services there were): each gets a Warning
/// Event ([`unserved::record_warnings`]) and a progress line. Only reads
/// when there is nothing new to say; never fails the run.
async fn warn_unserved(conn: &Connection, s: &Settings) {
    let client = &conn.client;
    match handover::kube_proxy_state(client, &s.spec.kube_proxy).await {
        Ok(kp) if !kp.present() => {}
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("unserved Services: {e}");
            return;
        }
    }
    match unserved::record_warnings(client, &s.spec.kube_proxy.allow_unserved).await {
        Ok((report, recorded)) => {
            for u in report.refused.iter().chain(&report.allowed) {
                s.progress
                    .say(&format!("warning: {u}, which the agents do not serve"));
            }
            if recorded > 0 {
                tracing::info!("recorded {recorded} {} Event(s)", unserved::WARNING_REASON);
            }
        }
        Err(e) => tracing::warn!("unserved Services: {e}"),
    }
}

async fn apply_run(conn: &Connection, s: &Settings) -> Result<Outcome, ConvergeError> {
    let (first, ..) = plan(conn, s).await?;
    if first.noop {
        return Ok(noop(first));
    }
    let client = &conn.client;
    let lock = lock::acquire(client, s.lock_wait).await?;
    // Plan again under the lock: another netboot may have changed the cluster while we waited.
    let result = match plan(conn, s).await {
        Ok((again, _, _, _)) if again.noop => Ok(noop(again)),
        Ok((again, desired, spec, inv)) => {
            apply_locked(conn, s, &spec, again, &desired, inv, &lock).await
        }
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

#[allow(clippy::too_many_arguments)]
async fn apply_locked(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    plan: Plan,
    desired: &[Manifest],
    previous: Option<Inventory>,
    lock: &lock::Lock,
) -> Result<Outcome, ConvergeError> {
    let client = &conn.client;
    let events = Events::new(client, &spec.namespace);
    let held = plan.handover == HandoverPlan::HeldAfterRollback;
    let rollout = Duration::from_secs(u64::from(spec.validation.rollout_timeout_seconds));
    let mut records = Vec::new();
    let mut inv = previous.clone().unwrap_or_default();
    inv.cluster = spec.name.clone();

    // kube-proxy comes back BEFORE the agents leave replace mode: restore it,
    // wait until it serves on every node, then apply (which switches the agents).
    if plan.handover == HandoverPlan::Restore {
        let restored = restore_and_wait(conn, s, spec, plan.journal.clone(), lock).await?;
        records.push(StepRecord {
            name: "restore-kube-proxy".into(),
            result: "done".into(),
            message: format!("{}; serving on every node", list_or_none(&restored)),
        });
        events
            .normal("KubeProxyRestored", &list_or_none(&restored))
            .await;
    }

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
    inv.revision = s.revision.clone();
    inv.mode = mode_word(spec, held).into();
    inv.allow_unserved = spec.kube_proxy.allow_unserved.clone();
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

    s.progress.say("waiting for the agents to roll out …");
    if let Err(e) = wait::agents_rolled_out(client, &spec.namespace, rollout).await {
        events.warn("RolloutFailed", &e.to_string()).await;
        return Err(e.into());
    }

    // The journal of the handover this run takes on to validation, if any.
    let mut handing_over: Option<Journal> = None;
    match plan.handover {
        HandoverPlan::Replace | HandoverPlan::Resume(_) => {
            s.progress.say("kube-proxy handover:");
            let opts = HandoverOptions {
                namespace: spec.namespace.clone(),
                cluster: spec.name.clone(),
                revision: s.revision.clone(),
                rollout_timeout: rollout,
                gate_timeout: rollout,
            };
            let say = |line: &str| s.progress.say(line);
            let mut gate = None;
            let r = handover::replace_kube_proxy(
                client,
                &spec.kube_proxy,
                &opts,
                lock,
                &say,
                &mut records,
                &mut gate,
            )
            .await;
            if let Some(g) = gate {
                inv.unserved_allowed = g.allowed.iter().map(ToString::to_string).collect();
            }
            match r {
                Ok(j) => {
                    handing_over = Some(j);
                    events
                        .normal(
                            "HandoverComplete",
                            "kube-proxy removed; every node reports KubeProxyReplacement=true and its KUBE-* rules cleared",
                        )
                        .await;
                }
                Err(e) => {
                    return handover_failed(
                        conn, s, spec, plan, applied, records, inv, lock, &events, e,
                    )
                    .await;
                }
            }
        }
        HandoverPlan::Validate => {
            handing_over = plan.journal.clone();
        }
        HandoverPlan::Abandon => {
            if let Some(mut j) = plan.journal.clone() {
                handover::set_phase(client, &spec.namespace, &mut j, Phase::Abandoned)
                    .await
                    .map_err(ConvergeError::Handover)?;
                records.push(StepRecord {
                    name: "abandon".into(),
                    result: "done".into(),
                    message: "the handover stopped before any delete; kube-proxy is intact".into(),
                });
            }
        }
        HandoverPlan::Restore | HandoverPlan::None | HandoverPlan::HeldAfterRollback => {}
    }

    let validation = if s.skip_validation && handing_over.is_none() {
        None
    } else {
        crate::fault::point("before-validation").await;
        s.progress.say("validating …");
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
        if let Some(j) = handing_over.take() {
            if spec.validation.rollback_on_failure {
                rollback(conn, s, spec, &mut inv, &events, Some(j), lock).await?;
                rolled_back = true;
            }
        }
    } else if validation.is_some() {
        records.push(StepRecord {
            name: "validation".into(),
            result: "done".into(),
            message: String::new(),
        });
        if let Some(mut j) = handing_over.take() {
            handover::set_phase(client, &spec.namespace, &mut j, Phase::Complete)
                .await
                .map_err(ConvergeError::Handover)?;
            if let Some(w) = crate::kubeadm::check(client).await {
                s.progress.say(&format!("warning: {w}"));
                events.warn("KubeadmReinstallsKubeProxy", &w).await;
                records.push(StepRecord {
                    name: "kubeadm-upgrade".into(),
                    result: "warning".into(),
                    message: w,
                });
            }
        }
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

fn list_or_none(objects: &[String]) -> String {
    if objects.is_empty() {
        "kube-proxy's objects were already there".into()
    } else {
        format!("restored {}", objects.join(", "))
    }
}

/// A handover that stopped. Before any delete, kube-proxy stays and the
/// journal says `abandoned`; after deletes began, the cluster is treated like
/// failed validation: rolled back when configured, and a failed rollback is
/// reported with both causes, never swallowed.
#[allow(clippy::too_many_arguments)]
async fn handover_failed(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    plan: Plan,
    applied: ChangeSet,
    mut records: Vec<StepRecord>,
    mut inv: Inventory,
    lock: &lock::Lock,
    events: &Events,
    e: handover::HandoverError,
) -> Result<Outcome, ConvergeError> {
    let client = &conn.client;
    let step = match &e {
        handover::HandoverError::Gate { step, .. } => step.clone(),
        handover::HandoverError::Lock(_) => "lock".into(),
        handover::HandoverError::Api { .. } => "api".into(),
    };
    records.push(StepRecord {
        name: step,
        result: "failed".into(),
        message: netboot_contract::errors::chain(&e),
    });
    events
        .warn("HandoverStopped", &netboot_contract::errors::chain(&e))
        .await;
    // Where did it stop? The journal says; if it cannot be read, assume the worst.
    let journal = handover::load_backup(client, &spec.namespace)
        .await
        .ok()
        .flatten()
        .and_then(|b| b.journal);
    let past_delete = match &journal {
        Some(j) => j.phase.past_delete(),
        None => records.iter().any(|r| r.name == "delete-kube-proxy"),
    };
    inv.handover = records.clone();
    if let Err(save) = inventory::save(client, &spec.namespace, &inv, None).await {
        tracing::warn!(
            "recording the stopped handover: {}",
            netboot_contract::errors::chain(&save)
        );
    }
    if !past_delete {
        if let Some(mut j) = journal.filter(|j| j.phase == Phase::BackedUp) {
            if let Err(w) =
                handover::set_phase(client, &spec.namespace, &mut j, Phase::Abandoned).await
            {
                tracing::warn!(
                    "recording the abandoned handover: {}",
                    netboot_contract::errors::chain(&w)
                );
            }
        }
        return Err(ConvergeError::Gate(e));
    }
    if matches!(e, handover::HandoverError::Lock(_)) || !spec.validation.rollback_on_failure {
        // Another netboot holds the cluster now (or rollback is off): the journal
        // tells the next run where this one stopped.
        return Err(ConvergeError::Handover(e));
    }
    match rollback(conn, s, spec, &mut inv, events, journal, lock).await {
        Ok(()) => Ok(Outcome {
            plan,
            applied,
            handover: inv.handover.clone(),
            validation: None,
            rolled_back: true,
            exit_code: 1,
        }),
        Err(r) => Err(ConvergeError::RollbackFailed {
            namespace: spec.namespace.clone(),
            backup: handover::BACKUP_NAME,
            rollback: netboot_contract::errors::chain(&r),
            cause: Box::new(e),
        }),
    }
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
        host_network_probes: s.host_network_probes,
    }
}

/// Brings kube-proxy back from the backup and waits until it serves on every
/// node; the journal goes to `rolling-back` first, so an interruption here is
/// finished by the next run.
async fn restore_and_wait(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    journal: Option<Journal>,
    lock: &lock::Lock,
) -> Result<Vec<String>, ConvergeError> {
    let client = &conn.client;
    let ns = &spec.namespace;
    let backup = handover::load_backup(client, ns)
        .await
        .map_err(ConvergeError::Handover)?
        .ok_or_else(|| {
            ConvergeError::Handover(handover::HandoverError::Api {
                object: format!("ConfigMap/{ns}/{}", handover::BACKUP_NAME),
                message: "no backup of kube-proxy to restore".into(),
            })
        })?;
    let mut journal = journal.or(backup.journal.clone());
    lock.ensure_held()
        .await
        .map_err(|e| ConvergeError::Handover(handover::HandoverError::Lock(Box::new(e))))?;
    if let Some(j) = journal.as_mut().filter(|j| j.phase != Phase::RollingBack) {
        handover::set_phase(client, ns, j, Phase::RollingBack)
            .await
            .map_err(ConvergeError::Handover)?;
    }
    crate::fault::point("after-journal-rolling-back").await;
    s.progress.say("restoring kube-proxy from the backup …");
    let restored = handover::restore(client, &backup, &spec.kube_proxy)
        .await
        .map_err(ConvergeError::Handover)?;
    crate::fault::point("after-restore").await;
    s.progress
        .say("waiting for the restored kube-proxy to serve on every node …");
    let rollout = Duration::from_secs(u64::from(spec.validation.rollout_timeout_seconds));
    handover::wait_kube_proxy_serving(client, &spec.kube_proxy, rollout)
        .await
        .map_err(ConvergeError::Handover)?;
    if let Some(j) = journal.as_mut() {
        handover::set_phase(client, ns, j, Phase::RolledBack)
            .await
            .map_err(ConvergeError::Handover)?;
    }
    Ok(restored)
}

/// Back to coexist: kube-proxy restored from the backup and serving on every
/// node first, then the agents switched to coexist mode and rolled out.
/// Recorded as `rolled-back` at this revision so the next run does not loop.
async fn rollback(
    conn: &Connection,
    s: &Settings,
    spec: &ClusterNetwork,
    inv: &mut Inventory,
    events: &Events,
    journal: Option<Journal>,
    lock: &lock::Lock,
) -> Result<(), ConvergeError> {
    let client = &conn.client;
    s.progress
        .say("rolling back: restoring kube-proxy, then switching agents to coexist …");
    let restored = restore_and_wait(conn, s, spec, journal, lock).await?;
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
        message: format!("{}; agents in coexist mode", list_or_none(&restored)),
    });
    inventory::save(client, &spec.namespace, inv, None).await?;
    events
        .warn(
            "RolledBack",
            &format!(
                "{}; agents switched to coexist mode",
                list_or_none(&restored)
            ),
        )
        .await;
    Ok(())
}

/// `netboot rollback`: replace → coexist now, whatever the spec says.
pub async fn rollback_now(conn: &Connection, s: &Settings) -> Result<Outcome, ConvergeError> {
    let (mut plan, desired, spec, _) = plan(conn, s).await?;
    let client = &conn.client;
    if let Some(ns) = desired.iter().find(|m| m.id().kind == "Namespace") {
        apply::apply(client, std::slice::from_ref(ns), &ApplyOptions::default()).await?;
    }
    let lock = lock::acquire(client, s.lock_wait).await?;
    let events = Events::new(client, &spec.namespace);
    let mut inv = inventory::load(client, &spec.namespace)
        .await?
        .unwrap_or_default();
    inv.cluster = spec.name.clone();
    inv.revision = s.revision.clone();
    let r = rollback(
        conn,
        s,
        &spec,
        &mut inv,
        &events,
        plan.journal.clone(),
        &lock,
    )
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!("releasing the lock: {e}");
    }
    r?;
    // What this command did, not what an apply would have done.
    plan.noop = false;
    plan.handover = HandoverPlan::Restore;
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
