//! Playing kubelet for podnet pods: turn the first container into a
//! [`Launch`], run it in the pod's netns and cgroup, restart it per the pod's
//! restartPolicy, and report a final exit in the pod's status.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::status::{self, Terminated};
use crate::process::{self, Launch};

/// Binaries that come from the workspace build (`--bin-dir`), not from PATH.
pub const WORKSPACE_BINARIES: &[&str] = &["netboot-probe", "netboot-datapath"];

/// The pod's restartPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Restart whatever the exit code (Deployment pods).
    Always,
    /// Restart on a non-zero exit.
    OnFailure,
    /// Never restart: report the exit in the pod status.
    Never,
}

impl Restart {
    /// From `spec.restartPolicy` (default Always).
    pub fn of(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => Restart::Never,
            Some("OnFailure") => Restart::OnFailure,
            _ => Restart::Always,
        }
    }

    fn restarts_after(self, exit_code: i32) -> bool {
        match self {
            Restart::Always => true,
            Restart::OnFailure => exit_code != 0,
            Restart::Never => false,
        }
    }
}

/// `namespace/name` of a pod plus its uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod's container could not be turned into a command.
#[derive(Debug, thiserror::Error)]
#[error("Pod/{pod}: {reason}")]
pub struct SpecError {
    /// `namespace/name`.
    pub pod: String,
    /// What is wrong.
    pub reason: String,
}

/// Everything needed to run a pod's container.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    /// The pod.
    pub pod: PodRef,
    /// Container name.
    pub container: String,
    /// Container image (reported back in the status).
    pub image: String,
    /// What to start.
    pub launch: Launch,
    /// Restart policy.
    pub restart: Restart,
    /// `$TERMINATION_LOG`, owned by podnet.
    pub termination_log: PathBuf,
    /// `terminationMessagePolicy: FallbackToLogsOnError`.
    pub fallback_to_logs: bool,
    /// SIGTERM → SIGKILL grace.
    pub grace: Duration,
}

/// The downward-API value for a `fieldRef.fieldPath`.
fn field(pod: &Pod, path: &str) -> Option<String> {
    let md = &pod.metadata;
    match path {
        "metadata.name" => md.name.clone(),
        "metadata.namespace" => md.namespace.clone(),
        "metadata.uid" => md.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" => pod.status.as_ref()?.pod_ip.clone(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone(),
        p => {
            let rest = p.strip_prefix("metadata.labels['")?.strip_suffix("']")?;
            md.labels.as_ref()?.get(rest).cloned()
        }
    }
}

/// Builds the run of the pod's first container. `netns`/`cgroup` say where;
/// `pod_dir` gets the log and termination log.
pub fn container_run(
    pod: &Pod,
    bin_dir: &Path,
    netns: Option<String>,
    cgroup: PathBuf,
    pod_dir: &Path,
) -> Result<ContainerRun, SpecError> {
    let pref = PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    let err = |reason: String| SpecError {
        pod: pref.to_string(),
        reason,
    };
    let spec = pod.spec.as_ref().ok_or_else(|| err("no spec".into()))?;
    let c = spec
        .containers
        .first()
        .ok_or_else(|| err("no containers".into()))?;
    if spec.containers.len() > 1 {
        warn!(pod = %pref, "only the first container ({}) runs under podnet", c.name);
    }
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(err(format!(
            "container {} has no command: podnet runs commands, not images",
            c.name
        )));
    }
    let program = argv.remove(0);
    let base = Path::new(&program)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let program = if WORKSPACE_BINARIES.contains(&base.as_str()) {
        bin_dir.join(&base)
    } else {
        PathBuf::from(program)
    };

    let termination_log = pod_dir.join(format!("{}.termination-log", c.name));
    let mut env = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(from)) => from
                .field_ref
                .as_ref()
                .and_then(|f| field(pod, &f.field_path)),
            (None, None) => Some(String::new()),
        };
        match value {
            Some(v) => env.push((e.name.clone(), v)),
            None => {
                warn!(pod = %pref, env = %e.name, "env source not supported by podnet; left unset")
            }
        }
    }
    let path = format!("{}:{}", bin_dir.display(), process::DEFAULT_PATH);
    env.push(("PATH".into(), path));
    env.push((
        "TERMINATION_LOG".into(),
        termination_log.display().to_string(),
    ));
    let grace = spec
        .termination_grace_period_seconds
        .unwrap_or(30)
        .clamp(0, 30);
    Ok(ContainerRun {
        pod: pref,
        container: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        launch: Launch {
            program,
            args: argv,
            env,
            netns,
            cgroup: Some(cgroup),
            log: Some(pod_dir.join(format!("{}.log", c.name))),
            supervised: true,
            caps: None,
        },
        restart: Restart::of(pod),
        termination_log,
        fallback_to_logs: c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"),
        grace: Duration::from_secs(u64::try_from(grace).unwrap_or(30)),
    })
}

/// PIDs podnet started, recorded as files in `<dir>/<pid>` so a podnet that
/// crashed can stop exactly its own processes at the next start.
#[derive(Debug, Clone)]
pub struct PidBook {
    dir: PathBuf,
    live: Arc<Mutex<BTreeSet<u32>>>,
}

impl PidBook {
    /// A book in `dir` (created).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            live: Arc::default(),
        })
    }

    /// Records a started process.
    pub fn add(&self, pid: u32, what: &str) {
        let _ = std::fs::write(self.dir.join(pid.to_string()), what);
        if let Ok(mut l) = self.live.lock() {
            l.insert(pid);
        }
    }

    /// Forgets a process that exited.
    pub fn remove(&self, pid: u32) {
        let _ = std::fs::remove_file(self.dir.join(pid.to_string()));
        if let Ok(mut l) = self.live.lock() {
            l.remove(&pid);
        }
    }

    /// PIDs recorded on disk (by this or an earlier podnet).
    pub fn recorded(&self) -> Vec<u32> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A running supervisor; dropping it does not stop it, [`Runner::stop`] does.
#[derive(Debug)]
pub struct Runner {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Runner {
    /// Wraps a supervisor task that watches `stop`.
    pub fn new(stop: watch::Sender<bool>, task: JoinHandle<()>) -> Self {
        Self { stop, task }
    }

    /// Asks the supervisor to stop its process (SIGTERM, then SIGKILL after the grace).
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops and waits for the supervisor to finish.
    pub async fn stop(self) {
        self.signal_stop();
        let _ = self.task.await;
    }

    /// Whether the supervisor has finished (a terminal pod).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Resolves once `stop` carries `true` (or its sender is gone).
pub async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Outcome of one process run.
pub enum RunEnd {
    /// The process exited by itself.
    Exited(Terminated),
    /// Podnet stopped it.
    Stopped,
}

/// Starts the process, records it, waits for it to exit or for `stop`.
pub async fn run_once(
    launch: &Launch,
    what: &str,
    pids: &PidBook,
    stop: &mut watch::Receiver<bool>,
    grace: Duration,
) -> RunEnd {
    let started_at = status::now();
    let mut child = match launch.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(%what, error = %e, "could not start {}", launch.display());
            return RunEnd::Exited(Terminated {
                exit_code: 127,
                message: format!("podnet could not start {}: {e}", launch.display()),
                started_at: started_at.clone(),
                finished_at: started_at,
            });
        }
    };
    let pid = child.id().unwrap_or(0);
    pids.add(pid, what);
    info!(%what, pid, "started {}", launch.display());
    let result = tokio::select! {
        status = child.wait() => {
            let code = match status {
                Ok(s) => s.code().unwrap_or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    128 + s.signal().unwrap_or(0)
                }),
                Err(_) => 255,
            };
            RunEnd::Exited(Terminated { exit_code: code, message: String::new(), started_at, finished_at: status::now() })
        }
        _ = until_stopped(stop) => {
            process::signal_group(pid, libc::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                warn!(%what, pid, "did not stop within {grace:?}: SIGKILL");
                process::signal_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
            }
            RunEnd::Stopped
        }
    };
    pids.remove(pid);
    result
}

/// Supervises a podnet pod's container until it ends for good or is stopped.
pub fn spawn(run: ContainerRun, client: Client, pids: PidBook) -> Runner {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let what = format!("{}/{}", run.pod, run.container);
        let mut restarts = 0i32;
        let mut backoff = Duration::from_secs(1);
        loop {
            let _ = std::fs::write(&run.termination_log, b"");
            let t0 = Instant::now();
            let end = run_once(&run.launch, &what, &pids, &mut rx, run.grace).await;
            let mut t = match end {
                RunEnd::Stopped => {
                    info!(pod = %run.pod, "stopped {}", run.container);
                    return;
                }
                RunEnd::Exited(t) => t,
            };
            info!(pod = %run.pod, exit_code = t.exit_code, "{} exited", run.container);
            if run.restart.restarts_after(t.exit_code) {
                if t0.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_secs(1);
                }
                info!(pod = %run.pod, "restarting {} in {backoff:?}", run.container);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = until_stopped(&mut rx) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                restarts += 1;
                continue;
            }
            if t.message.is_empty() {
                t.message = status::read_termination_log(&run.termination_log);
            }
            if t.message.is_empty() && t.exit_code != 0 && run.fallback_to_logs {
                if let Some(log) = &run.launch.log {
                    t.message = status::tail_log(log, 2048);
                }
            }
            report_terminal(&client, &run, restarts, &t).await;
            return;
        }
    });
    Runner::new(tx, task)
}

async fn report_terminal(client: &Client, run: &ContainerRun, restarts: i32, t: &Terminated) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &run.pod.namespace);
    let patch = status::terminal(&run.container, &run.image, restarts, t);
    for attempt in 1..=5 {
        match api
            .patch_status(
                &run.pod.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => {
                info!(pod = %run.pod, exit_code = t.exit_code, "status: phase {}", patch["status"]["phase"]);
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(e) => {
                warn!(pod = %run.pod, attempt, error = %e, "Pod/{}: status patch failed", run.pod);
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
        }
    }
}
