//! Running the real `netboot-datapath agent` for agent DaemonSet pods: in the
//! node's netns (a hostNetwork pod: its per-packet path attaches to the
//! node's interface and its healthCheckNodePorts listen on the node's
//! addresses; it reaches the API at 127.0.0.1:6443 there, podnet's proxy on
//! the node's loopback), in the node's cgroup, with the node's bpffs pin dir;
//! readiness from its /readyz polled every second (inside the netns) and
//! written to the pod's status.
//!
//! The agent runs as root with only the capabilities its container's
//! `securityContext` grants ([`crate::caps`]); one this machine's bounding
//! set lacks (CAP_SYS_RESOURCE on ours) is left out with a warning at every
//! start. Read-only root and the seccomp profile are not applied.
//!
//! `kubectl port-forward` to an agent pod (what `netboot flows` does) works
//! as on a real node, where the CRI dials the port on the pod's loopback:
//! podnet relays a root-loopback port to the agent's loopback listener in
//! the node netns, and writes a kwok `PortForward` object (owned by the pod)
//! that sends every port of the pod there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::kubelet::{run_once, until_stopped, PidBook, PodRef, RunEnd, Runner};
use super::status::{self, AgentState};
use crate::caps::{self, Grant};
use crate::names::Layout;
use crate::process::Launch;

/// Annotation on an agent pod that replaces the agent binary (tests use it to
/// run a stand-in, or a deliberately broken agent).
pub const BINARY_ANNOTATION: &str = "netboot.io/podnet-binary";

/// Why an agent could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The pod does not mount a ConfigMap with `config.yaml`.
    #[error("Pod/{pod}: {reason}")]
    Spec {
        /// `namespace/name`.
        pod: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading the ConfigMap failed.
    #[error("Pod/{pod}: ConfigMap/{configmap}: {source}")]
    ConfigMap {
        /// `namespace/name` of the pod.
        pod: String,
        /// `namespace/name` of the ConfigMap.
        configmap: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A local file operation failed.
    #[error("Pod/{pod}: {what}: {source}")]
    Io {
        /// `namespace/name` of the pod.
        pod: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Settings shared by every agent podnet runs.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// Directory with the workspace's `netboot-datapath`.
    pub bin_dir: PathBuf,
    /// podnet's kubeconfig (the agent replaces the server address anyway).
    pub kubeconfig: PathBuf,
    /// Where agent configs and logs go (`<state>/podnet/agents`).
    pub dir: PathBuf,
    /// Names and roots.
    pub layout: Layout,
}

/// One agent to run.
#[derive(Debug, Clone)]
pub struct AgentPod {
    /// The pod.
    pub pod: PodRef,
    /// Its node.
    pub node: String,
    /// The node's IP (pod IP and host IP of a hostNetwork pod).
    pub node_ip: String,
    /// Container name and image (for the status).
    pub container: String,
    /// Container image.
    pub image: String,
    /// Literal env of the container.
    pub env: Vec<(String, String)>,
    /// Binary override from [`BINARY_ANNOTATION`].
    pub binary: Option<PathBuf>,
    /// `namespace/name` of the ConfigMap mounted by the pod.
    pub configmap: (String, String),
    /// SIGTERM → SIGKILL grace.
    pub grace: Duration,
    /// When podnet first saw the pod (status.startTime).
    pub start_time: String,
    /// The capabilities the container's securityContext grants, as far as
    /// this machine's bounding set allows, and what it lacks.
    pub caps: Grant,
}

impl AgentPod {
    /// Reads what podnet needs from an agent pod bound to `node`.
    pub fn from_pod(pod: &Pod, node: &str, node_ip: &str) -> Result<Self, AgentError> {
        let pref = PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        };
        let spec_err = |reason: &str| AgentError::Spec {
            pod: pref.to_string(),
            reason: reason.to_string(),
        };
        let spec = pod.spec.as_ref().ok_or_else(|| spec_err("no spec"))?;
        let c = spec
            .containers
            .first()
            .ok_or_else(|| spec_err("no containers"))?;
        let cm = spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
            .ok_or_else(|| spec_err("mounts no ConfigMap (the agent's config.yaml)"))?;
        let granted = caps::granted(c.security_context.as_ref()).map_err(|unknown| {
            spec_err(&format!(
                "container {}: unknown capabilities {}",
                c.name,
                unknown.join(", ")
            ))
        })?;
        let bounding = caps::bounding_set().map_err(|source| AgentError::Io {
            pod: pref.to_string(),
            what: "read the bounding set".into(),
            source,
        })?;
        let env = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect();
        let binary = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BINARY_ANNOTATION))
            .map(PathBuf::from);
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(status::now);
        Ok(Self {
            configmap: (pref.namespace.clone(), cm),
            pod: pref,
            node: node.to_string(),
            node_ip: node_ip.to_string(),
            container: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            env,
            binary,
            grace: Duration::from_secs(
                u64::try_from(
                    spec.termination_grace_period_seconds
                        .unwrap_or(30)
                        .clamp(1, 30),
                )
                .unwrap_or(30),
            ),
            start_time,
            caps: caps::grant(granted, bounding),
        })
    }
}

/// Picks a free loopback port inside `netns` for the agent's --listen.
fn free_port(netns: &str) -> Result<u16, crate::netns::NetError> {
    crate::netns::in_netns(netns, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?.port())
    })
}

/// Writes the ConfigMap's `config.yaml` to the agent's dir; returns its path.
async fn materialize_config(
    client: &Client,
    env: &AgentEnv,
    a: &AgentPod,
) -> Result<PathBuf, AgentError> {
    let (ns, name) = &a.configmap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api
        .get(name)
        .await
        .map_err(|source| AgentError::ConfigMap {
            pod: a.pod.to_string(),
            configmap: format!("{ns}/{name}"),
            source,
        })?;
    let data = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .cloned()
        .ok_or_else(|| AgentError::Spec {
            pod: a.pod.to_string(),
            reason: format!("ConfigMap/{ns}/{name} has no key config.yaml"),
        })?;
    let dir = env.dir.join(&a.node);
    let path = dir.join("config.yaml");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, data))
        .map_err(|source| AgentError::Io {
            pod: a.pod.to_string(),
            what: format!("write {}", path.display()),
            source,
        })?;
    Ok(path)
}

fn launch(env: &AgentEnv, a: &AgentPod, config: &Path, port: u16) -> Launch {
    let program = a
        .binary
        .clone()
        .unwrap_or_else(|| env.bin_dir.join("netboot-datapath"));
    let l = &env.layout;
    let args = vec![
        "agent".to_string(),
        "--config".into(),
        config.display().to_string(),
        "--node-name".into(),
        a.node.clone(),
        "--cgroup".into(),
        l.node_cgroup(&a.node).display().to_string(),
        "--bpffs".into(),
        l.node_bpffs(&a.node).display().to_string(),
        "--kubeconfig".into(),
        env.kubeconfig.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        // Not the DaemonSet's NETBOOT_METRICS_LISTEN (0.0.0.0:9891): tests
        // read the metrics through the agent's own --listen.
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    let mut vars = a.env.clone();
    vars.push(("NETBOOT_NODE_NAME".into(), a.node.clone()));
    Launch {
        program,
        args,
        env: vars,
        netns: Some(l.node_netns(&a.node)),
        cgroup: Some(l.node_cgroup(&a.node)),
        log: Some(env.dir.join(&a.node).join(format!("{}.log", a.pod.name))),
        supervised: true,
        caps: Some(a.caps.keep),
    }
}

/// GET /readyz on the agent listening on `port` inside `netns`; true on
/// HTTP 200.
pub async fn readyz(netns: &str, port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let limit = Duration::from_millis(800);
    let netns = netns.to_string();
    let probe = tokio::task::spawn_blocking(move || {
        crate::netns::in_netns(&netns, move || {
            Ok(crate::http::get(addr, "/readyz", limit, limit))
        })
        .ok()
        .flatten()
    });
    matches!(
        tokio::time::timeout(limit, probe).await,
        Ok(Ok(Some((200, _))))
    )
}

/// Patches the pod status; false if that failed (the caller retries).
async fn patch(client: &Client, a: &AgentPod, s: &AgentState) -> bool {
    let api: Api<Pod> = Api::namespaced(client.clone(), &a.pod.namespace);
    let body = status::agent(&a.container, &a.image, &a.start_time, s);
    match api
        .patch_status(
            &a.pod.name,
            &PatchParams::default(),
            &Patch::Strategic(&body),
        )
        .await
    {
        Ok(_) => {
            info!(pod = %a.pod, node = %a.node, ready = s.ready, restarts = s.restarts, "agent status patched");
            true
        }
        Err(kube::Error::Api(e)) if e.code == 404 => true,
        Err(e) => {
            warn!(pod = %a.pod, error = %e, "Pod/{}: agent status patch failed", a.pod);
            false
        }
    }
}

/// Whether the pod's Ready condition in the API says `ready` (true when it
/// cannot be read: nothing to correct then).
async fn status_says(client: &Client, a: &AgentPod, ready: bool) -> bool {
    let api: Api<Pod> = Api::namespaced(client.clone(), &a.pod.namespace);
    let Ok(Some(pod)) = api.get_opt(&a.pod.name).await else {
        return true;
    };
    let want = if ready { "True" } else { "False" };
    pod.status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == want)
}

/// The relay and kwok `PortForward` that make `port-forward` to the agent
/// pod reach the agent's listener.
struct Forward {
    relay: JoinHandle<()>,
}

fn port_forward_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kwok.x-k8s.io", "v1alpha1", "PortForward"),
        "portforwards",
    )
}

/// Starts the relay (root 127.0.0.1:0 → the agent's current port on the
/// node netns' loopback) and writes the pod's `PortForward`. None (with a
/// warning) when either fails: the agent runs regardless.
async fn port_forward(
    client: &Client,
    a: &AgentPod,
    node_netns: String,
    current: Arc<AtomicU16>,
) -> Option<Forward> {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            warn!(pod = %a.pod, error = %e, "port-forward relay: bind");
            return None;
        }
    };
    let relay_port = listener.local_addr().ok()?.port();
    let pod = a.pod.to_string();
    let relay = tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let port = current.load(Ordering::Relaxed);
            let netns = node_netns.clone();
            let pod = pod.clone();
            tokio::spawn(async move {
                if port == 0 {
                    return; // no agent running yet: the client sees the stream end
                }
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let up = tokio::task::spawn_blocking(move || {
                    crate::netns::in_netns(&netns, move || {
                        let s =
                            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })
                })
                .await;
                match up {
                    Ok(Ok(s)) => match tokio::net::TcpStream::from_std(s) {
                        Ok(mut up) => {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                        Err(e) => warn!(%pod, error = %e, "port-forward relay"),
                    },
                    Ok(Err(e)) => warn!(%pod, error = %e, "port-forward relay: agent port {port}"),
                    Err(e) => warn!(%pod, error = %e, "port-forward relay"),
                }
            });
        }
    });
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &a.pod.namespace, &port_forward_resource());
    let obj = serde_json::json!({
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "PortForward",
        "metadata": {
            "name": a.pod.name,
            "namespace": a.pod.namespace,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Pod", "name": a.pod.name, "uid": a.pod.uid,
            }],
        },
        // No `ports`: every port of the pod goes to the relay, which knows
        // the agent's (podnet picks a free one per start).
        "spec": { "forwards": [{ "target": { "address": "127.0.0.1", "port": relay_port } }] },
    });
    match api
        .patch(
            &a.pod.name,
            &PatchParams::apply("netboot-podnet").force(),
            &Patch::Apply(&obj),
        )
        .await
    {
        Ok(_) => {
            info!(pod = %a.pod, relay_port, "port-forward to the agent pod relayed");
            Some(Forward { relay })
        }
        Err(e) => {
            warn!(pod = %a.pod, error = %e, "PortForward not written (is kwok's PortForward CRD installed?); port-forward to this agent pod will not work");
            relay.abort();
            None
        }
    }
}

impl Forward {
    async fn remove(self, client: &Client, a: &AgentPod) {
        self.relay.abort();
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &a.pod.namespace, &port_forward_resource());
        match api.delete(&a.pod.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                warn!(pod = %a.pod, error = %e, "PortForward not deleted (the pod's deletion takes it)")
            }
        }
    }
}

/// Runs and supervises one agent until stopped.
pub fn spawn(a: AgentPod, env: AgentEnv, client: Client, pids: PidBook) -> Runner {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let current = Arc::new(AtomicU16::new(0));
        let forward =
            port_forward(&client, &a, env.layout.node_netns(&a.node), current.clone()).await;
        supervise(&a, &env, &client, &pids, rx, &current).await;
        if let Some(f) = forward {
            f.remove(&client, &a).await;
        }
    });
    Runner::new(tx, task)
}

/// Starts the agent, restarts it when it exits, until stopped.
async fn supervise(
    a: &AgentPod,
    env: &AgentEnv,
    client: &Client,
    pids: &PidBook,
    mut rx: watch::Receiver<bool>,
    current: &AtomicU16,
) {
    {
        let what = format!("{} (agent for {})", a.pod, a.node);
        let mut state = AgentState {
            node_ip: a.node_ip.clone(),
            running: false,
            ready: false,
            restarts: 0,
            started_at: status::now(),
            last_exit: None,
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            let config = match materialize_config(client, env, a).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "agent not started");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = until_stopped(&mut rx) => return,
                    }
                }
            };
            let node_netns = env.layout.node_netns(&a.node);
            let port = match free_port(&node_netns) {
                Ok(p) => p,
                Err(e) => {
                    warn!(pod = %a.pod, error = %e, "no free port for the agent");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if !a.caps.missing.is_empty() {
                warn!(
                    pod = %a.pod,
                    node = %a.node,
                    missing = %a.caps.missing.names().join(","),
                    keeps = %a.caps.keep.names().join(","),
                    "AGENT RUNS WITHOUT CAPABILITIES ITS securityContext GRANTS: not in this machine's bounding set"
                );
            }
            current.store(port, Ordering::Relaxed);
            let l = launch(env, a, &config, port);
            state.running = true;
            state.ready = false;
            state.started_at = status::now();
            let patched = patch(client, a, &state).await;

            // Run the process while a poller keeps readiness in the status.
            let (poll_stop_tx, mut poll_stop_rx) = watch::channel(false);
            let poller = {
                let client = client.clone();
                let a = a.clone();
                let mut st = state.clone();
                let mut synced = patched;
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    let mut ticks: u64 = 0;
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = until_stopped(&mut poll_stop_rx) => return,
                        }
                        ticks += 1;
                        let ready = readyz(&node_netns, port).await;
                        // Every 10 s, as a kubelet's status manager does: if
                        // the pod's Ready condition is not what was written
                        // (the node lifecycle controller marks pods not ready
                        // when their node misses heartbeats), write it again.
                        if synced
                            && ticks.is_multiple_of(10)
                            && !status_says(&client, &a, st.ready).await
                        {
                            synced = false;
                        }
                        if ready != st.ready || !synced {
                            st.ready = ready;
                            synced = patch(&client, &a, &st).await;
                        }
                    }
                })
            };
            let t0 = Instant::now();
            let end = run_once(&l, &what, pids, &mut rx, a.grace).await;
            let _ = poll_stop_tx.send(true);
            let _ = poller.await;
            match end {
                RunEnd::Stopped => {
                    info!(pod = %a.pod, node = %a.node, "agent stopped (SIGTERM); its pins stay");
                    return;
                }
                RunEnd::Exited(t) => {
                    warn!(pod = %a.pod, node = %a.node, exit_code = t.exit_code, "agent exited; restarting in {backoff:?}");
                    state.running = false;
                    state.ready = false;
                    state.restarts += 1;
                    state.last_exit = Some(t);
                    let _ = patch(client, a, &state).await;
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = until_stopped(&mut rx) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
