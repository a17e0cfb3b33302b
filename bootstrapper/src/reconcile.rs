//! `netboot reconcile`: keeps one cluster or a fleet at the committed state.
//!
//! Each pass fetches the git source once, then reconciles every cluster that
//! is due — concurrently, each on its own, so one cluster's failure (a spec
//! that does not check at the new commit, an unreachable API server, a
//! failed handover) never blocks the others. A cluster that failed waits
//! exponentially longer (interval × 2ⁿ⁻¹ up to `backoff_max`) unless a new
//! commit arrives. Drift — objects changed by hand since netboot applied them,
//! kube-proxy back after a handover — is corrected by the apply and reported
//! (log line, `DriftCorrected` Event, metric); with `spec.reconcile.suspend`
//! the pass only plans and reports.
//!
//! Shutdown (SIGTERM/SIGINT, through [`Shutdown`]): a running apply finishes
//! (an apply stopped halfway could leave kube-proxy gone and unvalidated);
//! what has not started, and plans, which write nothing, are abandoned.

pub mod drift;
pub mod metrics;

use netboot_contract::errors::chain;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use crate::apply::Action;
use crate::cluster::{self, Target};
use crate::converge::{self, Events, HandoverPlan, Settings};
use crate::inventory;
use crate::render::RenderOptions;
use crate::source::{self, Snapshot, SourceOptions};
use drift::Drift;
use metrics::{Metrics, ResultLabels};

/// Which specs to reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These paths in the repository.
    Specs(Vec<String>),
    /// Every `clusters/*.yaml` at the fetched commit.
    All,
}

/// Options for [`Reconciler`].
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// The git source (URL, ref, cache, credentials).
    pub source: SourceOptions,
    pub targets: Targets,
    /// Time between passes. Default 5 minutes.
    pub interval: Duration,
    /// Each wait is the interval ± this fraction, at random. Default 0.1.
    pub jitter: f64,
    /// The longest a failing cluster waits. Default 1 hour (never less than the interval).
    pub backoff_max: Duration,
    /// The kubeconfig (and in-cluster) for every cluster; `context`, when set,
    /// overrides every spec's `cluster.context`.
    pub cluster: Target,
    /// As `netboot apply --force`.
    pub force: bool,
    /// As `netboot apply --lock-timeout`.
    pub lock_wait: Duration,
    /// As `netboot apply --probe-image`.
    pub probe_image: Option<String>,
    /// As `netboot apply --skip-validation`.
    pub skip_validation: bool,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            source: SourceOptions::default(),
            targets: Targets::All,
            interval: Duration::from_secs(300),
            jitter: 0.1,
            backoff_max: Duration::from_secs(3600),
            cluster: Target::default(),
            force: false,
            lock_wait: Duration::from_secs(120),
            probe_image: None,
            skip_validation: false,
        }
    }
}

/// Becomes `true` when the process should stop.
pub type Shutdown = watch::Receiver<bool>;

fn stopping(s: &Shutdown) -> bool {
    *s.borrow()
}

async fn stopped(mut s: Shutdown) {
    if s.wait_for(|v| *v).await.is_err() {
        // The sender is gone: nobody can ask us to stop any more.
        std::future::pending::<()>().await;
    }
}

/// How one cluster's reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Nothing differed; nothing was written.
    Unchanged,
    /// Changes (a new commit, drift) were applied and validated.
    Applied,
    /// An error, or validation failed without a rollback; the cluster is as the error left it.
    Failed,
    /// Validation failed after the handover and kube-proxy was restored.
    RolledBack,
    /// `spec.reconcile.suspend`: planned and reported, nothing written.
    Suspended,
    /// Not attempted: backing off after failures, or shutting down.
    Skipped,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Unchanged => "unchanged",
            Verdict::Applied => "applied",
            Verdict::Failed => "failed",
            Verdict::RolledBack => "rolled-back",
            Verdict::Suspended => "suspended",
            Verdict::Skipped => "skipped",
        }
    }

    fn ok(self) -> bool {
        matches!(
            self,
            Verdict::Unchanged | Verdict::Applied | Verdict::Suspended
        )
    }
}

/// One cluster in one pass.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterResult {
    /// The spec's path in the repository.
    pub spec: String,
    /// `metadata.name`, or the spec's file stem when it did not load.
    pub cluster: String,
    pub result: Verdict,
    /// The ChangeSet's summary (planned, when suspended).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub changes: String,
    /// Drift found: corrected, or only reported when suspended.
    pub drift: Vec<Drift>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_seconds: f64,
    /// When the next attempt is due, after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_seconds: Option<u64>,
}

/// One pass over the fleet.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassReport {
    /// `git:<sha>` fetched, unless the fetch failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
    pub clusters: Vec<ClusterResult>,
}

impl PassReport {
    /// 0 every cluster converged (or was skipped), 1 a validation failed
    /// (rolled back), 2 any error.
    pub fn exit_code(&self) -> u8 {
        let failed = self.source_error.is_some()
            || self.clusters.iter().any(|c| c.result == Verdict::Failed);
        if failed {
            2
        } else if self
            .clusters
            .iter()
            .any(|c| c.result == Verdict::RolledBack)
        {
            1
        } else {
            0
        }
    }
}

#[derive(Debug, Default)]
struct ClusterState {
    failures: u32,
    next_due: Option<Instant>,
    failed_at: Option<String>,
}

/// The delay before the `failures`-th retry: interval × 2^(failures−1), at most `max`.
pub fn backoff(interval: Duration, failures: u32, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    interval.saturating_mul(factor).min(max.max(interval))
}

/// `d` ± `fraction` at random.
pub fn jittered(d: Duration, fraction: f64) -> Duration {
    let f = fraction.clamp(0.0, 0.9);
    if f == 0.0 {
        return d;
    }
    d.mul_f64(rand::rng().random_range(1.0 - f..=1.0 + f))
}

/// The loop's state: per-cluster backoff, the metrics.
pub struct Reconciler {
    opts: ReconcileOptions,
    metrics: Arc<Metrics>,
    state: HashMap<String, ClusterState>,
}

impl Reconciler {
    pub fn new(opts: ReconcileOptions, metrics: Arc<Metrics>) -> Reconciler {
        Reconciler {
            opts,
            metrics,
            state: HashMap::new(),
        }
    }

    /// Passes until `shutdown` (or one pass with `once`); `emit` sees each
    /// report. Returns the exit status: the last pass's with `once`, else 0.
    pub async fn run(
        &mut self,
        once: bool,
        shutdown: Shutdown,
        mut emit: impl FnMut(&PassReport),
    ) -> u8 {
        loop {
            let report = self.pass(&shutdown).await;
            emit(&report);
            if once {
                return report.exit_code();
            }
            if stopping(&shutdown) {
                break;
            }
            let wait = jittered(self.opts.interval, self.opts.jitter);
            tracing::info!("next pass in {:.0}s", wait.as_secs_f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(shutdown.clone()) => break,
            }
        }
        tracing::info!("shutting down");
        0
    }

    /// One pass: fetch, then every due cluster.
    pub async fn pass(&mut self, shutdown: &Shutdown) -> PassReport {
        let opts = self.opts.source.clone();
        let fetched = tokio::select! {
            r = tokio::task::spawn_blocking(move || source::fetch(&opts)) => r,
            _ = stopped(shutdown.clone()) => return PassReport::default(),
        };
        let snapshot = match fetched {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.source_failed(chain(&e)),
            Err(e) => return self.source_failed(format!("fetch task: {e}")),
        };
        let revision = snapshot.revision();
        tracing::info!("source {} {} at {revision}", snapshot.url, snapshot.git_ref);
        self.metrics
            .set_source(&snapshot.url, &snapshot.git_ref, &revision);
        let specs = match &self.opts.targets {
            Targets::Specs(s) => s.clone(),
            Targets::All => snapshot.cluster_specs(),
        };
        if specs.is_empty() {
            return PassReport {
                revision: Some(revision),
                source_error: Some(format!(
                    "{} at {}: no clusters/*.yaml to reconcile",
                    snapshot.url, snapshot.git_ref
                )),
                clusters: vec![],
            };
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut results = Vec::new();
        for path in &specs {
            let st = self.state.entry(path.clone()).or_default();
            let waiting = st.next_due.is_some_and(|t| t > now)
                && st.failed_at.as_deref() == Some(revision.as_str());
            if waiting {
                let left = st.next_due.map(|t| t - now).unwrap_or_default();
                results.push(skipped(
                    path,
                    format!(
                        "backing off after {} failures; next attempt in {}s (or at a new commit)",
                        st.failures,
                        left.as_secs()
                    ),
                    Some(left.as_secs()),
                ));
            } else {
                due.push(path.clone());
            }
        }
        let done = futures::future::join_all(
            due.iter()
                .map(|p| reconcile_one(&self.opts, &self.metrics, &snapshot, p, shutdown)),
        )
        .await;
        for mut r in done {
            self.record(&mut r, &revision);
            results.push(r);
        }
        results.sort_by(|a, b| a.spec.cmp(&b.spec));
        PassReport {
            revision: Some(revision),
            source_error: None,
            clusters: results,
        }
    }

    fn source_failed(&mut self, error: String) -> PassReport {
        tracing::error!("{error}; nothing was applied");
        self.metrics.source_failures.inc();
        PassReport {
            revision: None,
            source_error: Some(error),
            clusters: vec![],
        }
    }

    /// Backoff bookkeeping and metrics for a finished cluster.
    fn record(&mut self, r: &mut ClusterResult, revision: &str) {
        let m = &self.metrics;
        let labels = Metrics::cluster(&r.cluster);
        if r.result != Verdict::Skipped {
            m.duration
                .get_or_create(&labels)
                .observe(r.duration_seconds);
            m.results
                .get_or_create(&ResultLabels {
                    cluster: r.cluster.clone(),
                    outcome: r.result.as_str().into(),
                })
                .inc();
        }
        let st = self.state.entry(r.spec.clone()).or_default();
        if r.result.ok() {
            st.failures = 0;
            st.next_due = None;
            st.failed_at = None;
            m.drifted_objects
                .get_or_create(&labels)
                .set(i64::try_from(r.drift.len()).unwrap_or(i64::MAX));
            let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
            m.last_success.get_or_create(&labels).set(now);
        } else if r.result != Verdict::Skipped {
            st.failures += 1;
            let wait = backoff(self.opts.interval, st.failures, self.opts.backoff_max);
            st.next_due = Some(Instant::now() + wait);
            st.failed_at = Some(revision.to_string());
            r.retry_in_seconds = Some(wait.as_secs());
        }
    }
}

fn skipped(path: &str, why: String, retry: Option<u64>) -> ClusterResult {
    ClusterResult {
        spec: path.into(),
        cluster: stem(path),
        result: Verdict::Skipped,
        changes: String::new(),
        drift: vec![],
        error: Some(why),
        duration_seconds: 0.0,
        retry_in_seconds: retry,
    }
}

fn stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".yaml")
        .trim_end_matches(".yml")
        .to_string()
}

/// One cluster: load its spec at the commit, connect with its context, then
/// plan (suspended) or apply, and judge the drift.
async fn reconcile_one(
    opts: &ReconcileOptions,
    metrics: &Metrics,
    snapshot: &Snapshot,
    path: &str,
    shutdown: &Shutdown,
) -> ClusterResult {
    let started = Instant::now();
    let mut r = ClusterResult {
        spec: path.into(),
        cluster: stem(path),
        result: Verdict::Failed,
        changes: String::new(),
        drift: vec![],
        error: None,
        duration_seconds: 0.0,
        retry_in_seconds: None,
    };
    let fail = |mut r: ClusterResult, e: String| {
        tracing::error!("{}: {e}", r.cluster);
        r.error = Some(e);
        r.duration_seconds = started.elapsed().as_secs_f64();
        r
    };
    if stopping(shutdown) {
        return skipped(path, "shutting down".into(), None);
    }
    let spec = match snapshot.load_spec(path) {
        Ok(s) => s,
        Err(e) => return fail(r, chain(&e)),
    };
    r.cluster = spec.name.clone();
    let target = Target {
        kubeconfig: opts.cluster.kubeconfig.clone(),
        context: opts
            .cluster
            .context
            .clone()
            .or_else(|| spec.cluster.context.clone()),
        in_cluster: opts.cluster.in_cluster || spec.cluster.in_cluster,
    };
    let conn = match cluster::connect(&target).await {
        Ok(c) => c,
        Err(e) => {
            return fail(
                r,
                format!("{path}: connecting to cluster {}: {}", spec.name, chain(&e)),
            )
        }
    };
    let suspend = spec.reconcile.as_ref().is_some_and(|rc| rc.suspend);
    let settings = Settings {
        spec: spec.clone(),
        spec_file: path.into(),
        revision: snapshot.revision(),
        render: RenderOptions {
            templates: snapshot.templates(),
            api_server: None,
        },
        force: opts.force,
        lock_wait: opts.lock_wait,
        probe_image: opts.probe_image.clone(),
        retry: false,
        skip_validation: opts.skip_validation,
        host_network_probes: false,
        progress: {
            let cluster = spec.name.clone();
            converge::Progress(std::sync::Arc::new(move |line: &str| {
                tracing::info!("{cluster}: {}", line.trim())
            }))
        },
    };
    let previous = match inventory::load(&conn.client, &spec.namespace).await {
        Ok(i) => i,
        Err(e) => return fail(r, chain(&e)),
    };
    if stopping(shutdown) {
        return skipped(path, "shutting down".into(), None);
    }
    if suspend {
        // Plans write nothing: abandoned at once on shutdown.
        let planned = tokio::select! {
            p = converge::plan(&conn, &settings) => p,
            _ = stopped(shutdown.clone()) => return skipped(path, "shutting down".into(), None),
        };
        let (plan, ..) = match planned {
            Ok(p) => p,
            Err(e) => return fail(r, chain(&e)),
        };
        r.drift = drift::detect(&plan, &spec, previous.as_ref());
        r.changes = plan.changes.summary();
        r.result = Verdict::Suspended;
        if !r.drift.is_empty() {
            let objects = list(&r.drift);
            tracing::warn!(
                "{}: drift (suspended, nothing written): {objects}",
                spec.name
            );
            Events::new(&conn.client, &spec.namespace)
                .warn(
                    "DriftDetected",
                    &format!(
                        "suspended, nothing written; revision {}: {objects}",
                        settings.revision
                    ),
                )
                .await;
        } else if !plan.noop {
            tracing::info!(
                "{}: suspended; would apply at {}: {}",
                spec.name,
                settings.revision,
                r.changes
            );
        }
        r.duration_seconds = started.elapsed().as_secs_f64();
        return r;
    }
    let outcome = match converge::apply(&conn, &settings).await {
        Ok(o) => o,
        Err(e) => return fail(r, chain(&e)),
    };
    r.changes = if outcome.plan.noop {
        format!(
            "{} unchanged",
            outcome.plan.changes.count(Action::Unchanged)
        )
    } else {
        outcome.applied.summary()
    };
    match outcome.plan.handover {
        HandoverPlan::Replace if outcome.exit_code == 0 => {
            r.changes.push_str("; kube-proxy replaced")
        }
        HandoverPlan::Restore => r.changes.push_str("; kube-proxy restored"),
        _ => {}
    }
    r.result = if outcome.plan.noop {
        Verdict::Unchanged
    } else if outcome.rolled_back {
        Verdict::RolledBack
    } else if outcome.exit_code != 0 {
        Verdict::Failed
    } else {
        Verdict::Applied
    };
    if !outcome.plan.noop {
        r.drift = drift::detect(&outcome.plan, &spec, previous.as_ref());
    }
    if !r.drift.is_empty() {
        let objects = list(&r.drift);
        tracing::warn!(
            "{}: drift corrected at {}: {objects}",
            spec.name,
            settings.revision
        );
        metrics
            .drift_corrections
            .get_or_create(&Metrics::cluster(&spec.name))
            .inc_by(r.drift.len() as u64);
        Events::new(&conn.client, &spec.namespace)
            .normal(
                "DriftCorrected",
                &format!("revision {}: {objects}", settings.revision),
            )
            .await;
    }
    match r.result {
        Verdict::RolledBack => {
            r.error = Some(
                "validation failed after the handover; kube-proxy was restored from the backup"
                    .into(),
            );
            tracing::error!("{}: {}", spec.name, r.error.as_deref().unwrap_or_default());
        }
        Verdict::Failed => {
            r.error = Some("validation failed".into());
            tracing::error!("{}: validation failed", spec.name);
        }
        Verdict::Applied => tracing::info!(
            "{}: applied {}: {}",
            spec.name,
            settings.revision,
            r.changes
        ),
        _ => tracing::info!("{}: unchanged at {}", spec.name, settings.revision),
    }
    r.duration_seconds = started.elapsed().as_secs_f64();
    r
}

fn list(d: &[Drift]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_up_to_the_cap() {
        let i = Duration::from_secs(300);
        let max = Duration::from_secs(3600);
        let waits: Vec<u64> = (1..=6).map(|n| backoff(i, n, max).as_secs()).collect();
        assert_eq!(waits, [300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(backoff(i, 1000, max), max, "no overflow");
        // A cap below the interval never makes retries faster than passes.
        assert_eq!(backoff(i, 3, Duration::from_secs(60)), i);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let d = Duration::from_secs(100);
        for _ in 0..200 {
            let j = jittered(d, 0.1).as_secs_f64();
            assert!((90.0..=110.0).contains(&j), "{j}");
        }
        assert_eq!(jittered(d, 0.0), d);
    }

    #[test]
    fn exit_codes_follow_the_worst_cluster() {
        let r = |result| ClusterResult {
            spec: "clusters/a.yaml".into(),
            cluster: "a".into(),
            result,
            changes: String::new(),
            drift: vec![],
            error: None,
            duration_seconds: 0.0,
            retry_in_seconds: None,
        };
        let pass = |rs: Vec<ClusterResult>| PassReport {
            revision: Some("git:1".into()),
            source_error: None,
            clusters: rs,
        };
        assert_eq!(
            pass(vec![r(Verdict::Applied), r(Verdict::Suspended)]).exit_code(),
            0
        );
        assert_eq!(
            pass(vec![r(Verdict::Applied), r(Verdict::RolledBack)]).exit_code(),
            1
        );
        assert_eq!(
            pass(vec![r(Verdict::RolledBack), r(Verdict::Failed)]).exit_code(),
            2
        );
        let mut p = pass(vec![]);
        p.source_error = Some("unreachable".into());
        assert_eq!(p.exit_code(), 2);
        assert_eq!(stem("clusters/prod.yaml"), "prod");
    }
}
