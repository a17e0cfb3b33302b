//! Test support: the shared local cluster, unique test namespaces, and helpers
//! for podnet pods. Everything here panics with the reason when the
//! environment cannot run the test (never skips silently).

// Test support: failing loudly with the reason is this module's contract.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::Client;
use serde_json::json;

use crate::names::{self, Layout};
use crate::process::Launch;

/// Root of the netboot repository (from this crate's manifest dir).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$NETBOOT_STATE_DIR` or /tmp/netboot-local.
pub fn state_dir() -> PathBuf {
    std::env::var_os("NETBOOT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/netboot-local"))
}

/// Panics unless running as root (netns, cgroups and BPF need it).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (network namespaces, cgroups): run the tests as root (euid is {euid})"
    );
}

/// Path of a workspace binary (`netboot-probe`, `netboot-datapath`, `podnet`),
/// built with cargo first if it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    if !path.exists() {
        let package = match name {
            "netboot-probe" | "netboot" => "netboot",
            "netboot-datapath" => "netboot-datapath",
            _ => "netboot-harness",
        };
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", package, "--bin", name])
            .current_dir(repo_root())
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cargo build -p {package} --bin {name} failed: {status:?}"
        );
    }
    path
}

/// The shared local cluster: started once per machine by whichever test gets
/// there first (under a file lock), reused by every test binary after.
#[derive(Clone)]
pub struct SharedCluster {
    /// A client for this test's runtime.
    pub client: Client,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The state dir.
    pub state: PathBuf,
}

static STARTED: OnceLock<()> = OnceLock::new();

async fn client_ok(kubeconfig: &Path) -> Option<Client> {
    let client = crate::podnet::client_from(kubeconfig).await.ok()?;
    let ok = tokio::time::timeout(Duration::from_secs(5), client.apiserver_version())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    ok.then_some(client)
}

fn lock_file(path: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open lock {}: {e}", path.display()));
    // SAFETY: flock on an fd we own; blocks until the other test binary is done.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert!(
        rc == 0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    f
}

impl SharedCluster {
    /// The running cluster, started with `tests/cluster/up` if needed.
    /// Panics with the reason if it cannot come up.
    pub async fn get() -> SharedCluster {
        require_root("the local cluster");
        let state = state_dir();
        let kubeconfig = state.join("kubeconfig");
        if STARTED.get().is_none() {
            let state2 = state.clone();
            let kc2 = kubeconfig.clone();
            // Blocking start on a plain thread (the lock may wait for another binary).
            let handle = tokio::task::spawn_blocking(move || {
                let lock_path = PathBuf::from(format!("{}.lock", state2.display()));
                let _lock = lock_file(&lock_path);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
                let healthy = kc2.exists() && rt.block_on(client_ok(&kc2)).is_some();
                if !healthy {
                    let up = repo_root().join("tests/cluster/up");
                    assert!(
                        up.exists(),
                        "{} does not exist: cannot start the local cluster",
                        up.display()
                    );
                    eprintln!(
                        "netboot-harness: starting the local cluster with {}",
                        up.display()
                    );
                    let out = Command::new(&up)
                        .current_dir(repo_root())
                        .env("NETBOOT_STATE_DIR", &state2)
                        .output()
                        .unwrap_or_else(|e| panic!("run {}: {e}", up.display()));
                    if !out.status.success() {
                        let tail = |b: &[u8]| {
                            let s = String::from_utf8_lossy(b);
                            let lines: Vec<&str> = s.lines().collect();
                            lines[lines.len().saturating_sub(40)..].join("\n")
                        };
                        panic!(
                            "tests/cluster/up failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
                            out.status,
                            tail(&out.stdout),
                            tail(&out.stderr)
                        );
                    }
                }
            });
            if let Err(e) = handle.await {
                std::panic::resume_unwind(e.into_panic());
            }
            let _ = STARTED.set(());
        }
        let client = client_ok(&kubeconfig).await.unwrap_or_else(|| {
            panic!(
                "the local cluster is not answering (kubeconfig {}); see {}/logs",
                kubeconfig.display(),
                state.display()
            )
        });
        SharedCluster {
            client,
            kubeconfig,
            state,
        }
    }
}

/// A namespace unique to one test (`t-<test>-<random>`), deleted on drop.
pub struct TestNamespace {
    /// The namespace name.
    pub name: String,
    kubeconfig: PathBuf,
    keep: bool,
}

fn random_suffix() -> String {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom into a local buffer of the given length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != 4 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        buf = (t ^ std::process::id()).to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl TestNamespace {
    /// Creates `t-<test>-<random>` (sanitized to a DNS label).
    pub async fn new(cluster: &SharedCluster, test: &str) -> TestNamespace {
        let clean: String = test
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let clean = clean.trim_matches('-');
        let clean = &clean[..clean.len().min(40)];
        let name = format!("t-{}-{}", clean.trim_end_matches('-'), random_suffix());
        let api: Api<Namespace> = Api::all(cluster.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "netboot.io/test".to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("Namespace/{name}: create: {e}"));
        TestNamespace {
            name,
            kubeconfig: cluster.kubeconfig.clone(),
            keep: std::env::var_os("NETBOOT_KEEP_NAMESPACES").is_some(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "netboot-harness: keeping namespace {} (NETBOOT_KEEP_NAMESPACES)",
                self.name
            );
            return;
        }
        let name = self.name.clone();
        let kc = self.kubeconfig.clone();
        // A plain thread with its own runtime: safe inside or outside async code.
        let t = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = crate::podnet::client_from(&kc).await {
                    let api: Api<Namespace> = Api::all(client);
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        });
        let _ = t.join();
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `timeout`
/// with `what` and the last state `f` described.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(s) => s,
        };
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether podnet has realized the pod: its netns exists and (for pods with
/// a command) a process runs in its cgroup.
pub fn realized(pod: &Pod) -> bool {
    realized_in(&Layout::default(), pod)
}

/// [`realized`] for another layout (a test's own podnet).
pub fn realized_in(layout: &Layout, pod: &Pod) -> bool {
    let (Some(uid), Some(node)) = (
        pod.metadata.uid.as_deref(),
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
    ) else {
        return false;
    };
    if !names::netns_path(&layout.pod_netns(uid)).exists() {
        return false;
    }
    let has_command = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .is_some_and(|c| c.command.is_some());
    !has_command || !crate::cgroup::procs(&layout.pod_cgroup(node, uid)).is_empty()
}

fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.pod_ip.as_deref()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Waits until the Deployment's pods number `replicas`, are Running with IPs
/// and podnet-realized; returns them sorted by name.
pub async fn wait_deployment_realized(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Vec<Pod> {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("Deployment/{ns}/{name} pods realized"),
        timeout,
        || async {
            let d = deploys.get(name).await.map_err(|e| e.to_string())?;
            let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let selector = d
                .spec
                .as_ref()
                .and_then(|s| s.selector.match_labels.clone())
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| e.to_string())?;
            let mut live: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let state: Vec<String> = live
                .iter()
                .map(|p| {
                    format!(
                        "{} {} ip={} realized={}",
                        p.metadata.name.as_deref().unwrap_or(""),
                        phase(p),
                        pod_ip(p).unwrap_or("-"),
                        realized(p)
                    )
                })
                .collect();
            let ok = live.len() == usize::try_from(replicas).unwrap_or(0)
                && live
                    .iter()
                    .all(|p| phase(p) == "Running" && pod_ip(p).is_some() && realized(p));
            if ok {
                live.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                Ok(live)
            } else {
                Err(format!("want {replicas}: [{}]", state.join("; ")))
            }
        },
    )
    .await
}

/// Waits until the pod has ended (Succeeded or Failed); returns
/// `(exit code, state.terminated.message)`.
pub async fn wait_terminated(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> (i32, String) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("Pod/{ns}/{name} to terminate"),
        timeout,
        || async {
            let p = pods.get(name).await.map_err(|e| e.to_string())?;
            let term = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.clone());
            match (phase(&p), term) {
                ("Succeeded" | "Failed", Some(t)) => {
                    Ok((t.exit_code, t.message.unwrap_or_default()))
                }
                (ph, _) => Err(format!("phase {ph:?}")),
            }
        },
    )
    .await
}

/// A command that runs `argv` inside the pod's netns and cgroup (like
/// `kubectl exec`). `netboot-probe`/`netboot-datapath` come from the workspace build.
pub fn exec_in_pod(pod: &Pod, argv: &[&str]) -> Command {
    exec_in_pod_with(&Layout::default(), pod, argv)
}

/// [`exec_in_pod`] for another layout.
pub fn exec_in_pod_with(layout: &Layout, pod: &Pod, argv: &[&str]) -> Command {
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("");
    let (first, rest) = argv
        .split_first()
        .map(|(f, r)| (*f, r))
        .unwrap_or(("true", &[]));
    let program = if crate::podnet::kubelet::WORKSPACE_BINARIES.contains(&first) {
        workspace_bin(first)
    } else {
        PathBuf::from(first)
    };
    let launch = Launch {
        program,
        args: rest.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        netns: Some(layout.pod_netns(uid)),
        cgroup: Some(layout.pod_cgroup(node, uid)),
        log: None,
        supervised: false,
        caps: None,
    };
    launch.command().unwrap_or_else(|e| {
        panic!(
            "exec in Pod/{}: {e}",
            pod.metadata.name.as_deref().unwrap_or("")
        )
    })
}

/// Hands a pod to the podnet with this netns prefix (see [`names::OWNER_ANNOTATION`]).
pub fn owned_pod(mut pod: Pod, prefix: &str) -> Pod {
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(names::OWNER_ANNOTATION.to_string(), prefix.to_string());
    pod
}

/// Hands a Deployment's pods to the podnet with this netns prefix.
pub fn owned_deployment(mut d: Deployment, prefix: &str) -> Deployment {
    if let Some(spec) = d.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(names::OWNER_ANNOTATION.to_string(), prefix.to_string());
    }
    d
}

/// A second podnet (the workspace's `podnet` binary) with its own layout,
/// limited to one namespace and to pods handed to it with [`owned_pod`] /
/// [`owned_deployment`]. Stopped with SIGTERM on drop.
pub struct IsolatedPodnet {
    /// Its names and roots.
    pub layout: Layout,
    /// Its state dir (podnet files under `podnet/`, its log in `podnet.log`).
    pub state: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl IsolatedPodnet {
    /// Starts it for namespace `ns`; `tag` (a few letters) names the layout.
    pub fn start(cluster: &SharedCluster, ns: &str, tag: &str) -> IsolatedPodnet {
        let id = std::process::id() % 100_000;
        let layout = Layout {
            netns_prefix: format!("nb{tag}{id}-"),
            cgroup_root: format!("/sys/fs/cgroup/unified/netboot-test-{tag}{id}").into(),
            bpffs_root: format!("/sys/fs/bpf/netboot-test-{tag}{id}").into(),
        };
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut p = IsolatedPodnet {
            layout,
            state,
            child: None,
        };
        p.spawn(cluster, ns);
        p
    }

    /// (Re)starts the process.
    pub fn spawn(&mut self, cluster: &SharedCluster, ns: &str) {
        let bin_dir = workspace_bin("netboot-probe")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("podnet.log"))
            .unwrap_or_else(|e| panic!("podnet log: {e}"));
        let child = Command::new(workspace_bin("podnet"))
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .arg("--state")
            .arg(self.state.path())
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--netns-prefix", &self.layout.netns_prefix])
            .arg("--cgroup-root")
            .arg(&self.layout.cgroup_root)
            .arg("--bpffs-root")
            .arg(&self.layout.bpffs_root)
            .args(["--namespace", ns])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start podnet: {e}"));
        self.child = Some(child);
    }

    /// SIGKILLs the process (a crash).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the process and waits; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on the podnet this helper started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        c.wait().ok()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("podnet.log")).unwrap_or_default()
    }
}

impl Drop for IsolatedPodnet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The podnet label, for objects tests create.
pub fn podnet_labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), app.to_string()),
        (
            names::labels::PODNET.0.to_string(),
            names::labels::PODNET.1.to_string(),
        ),
    ])
}

/// A Deployment of `netboot-probe serve` pods (podnet-labelled, app=`name`).
pub fn probe_deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": podnet_labels(name)},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "probe",
                        "image": "netboot-probe:dev",
                        "command": ["netboot-probe", "serve"],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [
                            {"name": "tcp", "containerPort": 8080, "protocol": "TCP"},
                            {"name": "udp", "containerPort": 8081, "protocol": "UDP"}
                        ]
                    }]
                }
            }
        }
    }))
    .unwrap_or_else(|e| panic!("probe Deployment {name}: {e}"))
}

/// A podnet `netboot-probe serve` pod (app=`app`) pinned to `node`: a
/// backend whose node a test chooses.
pub fn probe_pod(name: &str, app: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": podnet_labels(app)},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "probe",
                "image": "netboot-probe:dev",
                "command": ["netboot-probe", "serve"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [
                    {"name": "tcp", "containerPort": 8080, "protocol": "TCP"},
                    {"name": "udp", "containerPort": 8081, "protocol": "UDP"}
                ]
            }]
        }
    }))
    .unwrap_or_else(|e| panic!("probe Pod {name}: {e}"))
}

/// A ClusterIP Service over the probe Deployment `app` (ports 80→8080/TCP, 81→8081/UDP).
pub fn probe_service(name: &str, app: &str) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": app},
            "ports": [
                {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "udp", "port": 81, "targetPort": 8081, "protocol": "UDP"}
            ]
        }
    }))
    .unwrap_or_else(|e| panic!("probe Service {name}: {e}"))
}

/// A podnet client pod (restartPolicy Never) running `sh -c SCRIPT` on `node`.
/// Whatever the script writes to `$TERMINATION_LOG` becomes the pod's
/// terminated message.
pub fn client_pod(name: &str, node: Option<&str>, script: &str) -> Pod {
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "client",
            "image": "netboot-probe:dev",
            "command": ["sh", "-c", script],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
            ]
        }]
    });
    if let (Some(n), Some(obj)) = (node, spec.as_object_mut()) {
        obj.insert("nodeName".into(), json!(n));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": podnet_labels(name)},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("client Pod {name}: {e}"))
}
