//! Helpers shared by the test binaries that drive `netboot` against the local
//! real cluster: running the binary, waiting, and resetting the cluster to
//! its baseline (kube-proxy as kubeadm installs it, no netboot).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use netboot_harness::cluster::{repo_root, SharedCluster};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests of one binary that change cluster-wide state run one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` on the shared cluster from the baseline, one test at a time,
/// and puts the baseline back afterwards, pass or fail, so other test
/// binaries find kube-proxy as kubeadm left it.
pub fn scenario<F, Fut>(body: F)
where
    F: FnOnce(SharedCluster) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _g = serial();
    let _cross = cluster_lock();
    let rt = rt();
    let c = rt.block_on(SharedCluster::get());
    rt.block_on(reset(&c));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(body(c.clone()))
    }));
    rt.block_on(reset(&c));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Scenarios of every test binary (and every checkout sharing the cluster's
/// state dir) take turns: an flock on `<state dir>.scenario.lock`, held
/// until the returned file is dropped.
pub fn cluster_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from(format!(
        "{}.scenario.lock",
        netboot_harness::cluster::state_dir().display()
    ));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    f
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}):\n{}\n--- stderr\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// `netboot ARGS` from the repository root with a clean environment: no
/// KUBECONFIG, no git credentials or template overrides, the git cache in
/// `cache`; `env` added.
pub fn netboot_env(args: &[&str], cache: &std::path::Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netboot"));
    cmd.args(args)
        .current_dir(repo_root())
        .env_remove("KUBECONFIG")
        .env_remove("NETBOOT_GIT_TOKEN")
        .env_remove("NETBOOT_GIT_CREDENTIALS")
        .env_remove("NETBOOT_TEMPLATES")
        .env("NETBOOT_CACHE", cache);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    eprintln!(
        "$ netboot {}\n  exit {}\n{}\n{}",
        args.join(" "),
        run.code,
        indent(&run.stdout),
        indent(&run.stderr)
    );
    run
}

pub fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Back to the baseline: no netboot objects, no BPF on the nodes, no netboot
/// Node annotations, kube-proxy installed as kubeadm makes it.
pub async fn reset(c: &SharedCluster) {
    let client = &c.client;
    let ns: Api<Namespace> = Api::all(client.clone());
    if ns.get_opt("netboot-system").await.unwrap().is_some() {
        let _ = ns
            .delete("netboot-system", &DeleteParams::foreground())
            .await;
        wait_until(
            "netboot-system to be deleted",
            Duration::from_secs(90),
            || async { ns.get_opt("netboot-system").await.unwrap().is_none() },
        )
        .await;
    }
    // A killed netboot leaves its lock held until the lease expires.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    let _ = leases
        .delete("netboot-lock", &DeleteParams::default())
        .await;
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=netboot");
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "Role",
        "RoleBinding",
    ] {
        let (ar, namespaced) = netboot::resources::api_resource(kind).unwrap();
        // Namespaced: kube-proxy's namespace and `default` (the agent's Events Role).
        let apis: Vec<Api<kube::api::DynamicObject>> = if namespaced {
            ["kube-system", "default"]
                .iter()
                .map(|ns| Api::namespaced_with(client.clone(), ns, &ar))
                .collect()
        } else {
            vec![Api::all_with(client.clone(), &ar)]
        };
        for api in apis {
            let _ = api.delete_collection(&DeleteParams::default(), &lp).await;
        }
    }
    // Agents are gone with their namespace; their programs stay attached (by design). Detach them.
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await.unwrap().items {
        let name = n.metadata.name.clone().unwrap();
        let pins = PathBuf::from(format!("/sys/fs/bpf/netboot-local/{name}"));
        if pins.exists() {
            let bin = netboot_harness::cluster::workspace_bin("netboot-datapath");
            let st = Command::new(bin)
                .args(["uninstall", "--bpffs"])
                .arg(&pins)
                .status()
                .unwrap();
            assert!(
                st.success(),
                "netboot-datapath uninstall --bpffs {}",
                pins.display()
            );
        }
        let patch = json!({"metadata": {"annotations": {
            "netboot.io/kube-proxy-replacement": null, "netboot.io/datapath-version": null, "netboot.io/kube-proxy-rules": null,
            "netboot.io/kube-proxy-mode": null}}});
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    recreate_kube_proxy(c);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let nodes_n = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    wait_until(
        "kube-proxy pods on every node",
        Duration::from_secs(60),
        || async {
            pods.list(&ListParams::default().labels("k8s-app=kube-proxy"))
                .await
                .unwrap()
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count()
                == nodes_n
        },
    )
    .await;
}

/// kube-proxy as kubeadm installs it (what an operator re-creating it by hand
/// does): the objects the cluster's own kubeadm printed at `tests/cluster/up`
/// (`$ADDONS/kube-proxy.yaml`: its mode and IP families).
pub fn recreate_kube_proxy(c: &SharedCluster) {
    let addons = cluster_env(c, "ADDONS").unwrap_or_else(|| {
        panic!(
            "{}: no ADDONS (a cluster started before kubeadm made the add-ons: tests/cluster/down, then up)",
            c.state.join("cluster.env").display()
        )
    });
    let path = std::path::Path::new(&addons).join("kube-proxy.yaml");
    let manifest =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut child = Command::new(kubectl(c))
        .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
        .env("KUBECONFIG", &c.kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
    }
    let st = child.wait_with_output().unwrap();
    assert!(
        st.status.success(),
        "kubectl apply kube-proxy: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A variable of the cluster's cluster.env, unquoted.
pub fn cluster_env(c: &SharedCluster, name: &str) -> Option<String> {
    let env = std::fs::read_to_string(c.state.join("cluster.env")).ok()?;
    let prefix = format!("{name}=");
    env.lines()
        .map(|l| l.trim_start_matches("export "))
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim_matches(['\'', '"']).to_string())
}

pub fn kubectl(c: &SharedCluster) -> PathBuf {
    let env = std::fs::read_to_string(c.state.join("cluster.env")).unwrap();
    let line = env
        .lines()
        .find(|l| l.starts_with("KUBECTL="))
        .expect("KUBECTL in cluster.env");
    PathBuf::from(
        line.trim_start_matches("KUBECTL=")
            .trim_matches(['\'', '"']),
    )
}

/// Write requests (not dry-run) by the admin user — netboot's identity in
/// these tests — in the audit log since `from` bytes.
/// Writes the audit log holds since byte `from` (the policy logs writes
/// only), dry runs left out.
pub fn audit_writes_since(c: &SharedCluster, from: u64) -> Vec<Value> {
    let log = std::fs::read(c.state.join("logs/audit.log")).unwrap();
    let tail = &log[usize::try_from(from).unwrap().min(log.len())..];
    String::from_utf8_lossy(tail)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| {
            !e["requestURI"]
                .as_str()
                .unwrap_or("")
                .contains("dryRun=All")
        })
        .collect()
}

/// `verb requestURI` of an audit event.
pub fn audit_line(e: &Value) -> String {
    format!(
        "{} {}",
        e["verb"].as_str().unwrap_or(""),
        e["requestURI"].as_str().unwrap_or("")
    )
}

pub fn admin_writes_since(c: &SharedCluster, from: u64) -> Vec<String> {
    audit_writes_since(c, from)
        .iter()
        .filter(|e| e["user"]["username"] == "kubernetes-admin")
        .map(audit_line)
        .collect()
}

pub fn audit_len(c: &SharedCluster) -> u64 {
    std::fs::metadata(c.state.join("logs/audit.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

pub async fn kube_proxy(client: &Client) -> (Option<DaemonSet>, Option<ConfigMap>) {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "kube-system")
        .get_opt("kube-proxy")
        .await
        .unwrap();
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .get_opt("kube-proxy")
        .await
        .unwrap();
    (ds, cm)
}

/// The local cluster's kube-apiserver, as tests/cluster/up started and
/// recorded it (pids/kube-apiserver.pid: pid, binary, start time).
pub struct ApiServerProcess {
    pid: i32,
    argv: Vec<String>,
}

impl ApiServerProcess {
    pub fn read(state: &Path) -> Self {
        let rec = std::fs::read_to_string(state.join("pids/kube-apiserver.pid")).unwrap();
        let pid: i32 = rec.lines().next().unwrap().trim().parse().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            argv[0].ends_with("kube-apiserver"),
            "pid {pid} is {argv:?}, not the recorded kube-apiserver"
        );
        ApiServerProcess { pid, argv }
    }

    pub fn kill(&self) {
        // SAFETY: signalling the process the cluster scripts started and recorded.
        assert_eq!(unsafe { libc::kill(self.pid, libc::SIGKILL) }, 0);
        let start = Instant::now();
        while Path::new(&format!("/proc/{}/cmdline", self.pid)).exists()
            && std::fs::read(format!("/proc/{}/cmdline", self.pid))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "kube-apiserver did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Same binary, same flags, same log; the pid file is rewritten so
    /// tests/cluster/down stops the new process.
    // A daemon like the other components: tests/cluster/down stops it by the recorded PID.
    #[allow(clippy::zombie_processes)]
    pub fn start_again(&self, state: &Path) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(state.join("logs/kube-apiserver.log"))
            .unwrap();
        let child = Command::new("setsid")
            .args(&self.argv)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(") ").unwrap().1;
        let start_time = after.split(' ').nth(19).unwrap();
        std::fs::write(
            state.join("pids/kube-apiserver.pid"),
            format!("{pid}\n{}\n{start_time}\n", self.argv[0]),
        )
        .unwrap();
    }
}
