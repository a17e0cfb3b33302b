//! Network programming latency against the REAL kube-proxy (issue 15,
//! point 7): `netboot-bench programming`.
//!
//! One private control plane (the harness's [`ControlPlane`]: etcd +
//! kube-apiserver from tests/cluster/build's cache), 1,000 Node objects and
//! N Services of 10 endpoints each (EndpointSlices written directly, spread
//! over the Nodes). Three proxies watch it at the same time, each in its own
//! network namespace made here (only `lo` and a veth pair with both ends
//! inside, no route
//! out; the API server is reached through the harness's [`Relay`]):
//!
//! - the real kube-proxy, iptables mode (`--hostname-override` node-0000);
//! - the real kube-proxy, nftables mode (node-0001);
//! - the real `netboot-datapath agent` (node-0002), its socket LB attached
//!   to a cgroup of this run, its pins under this run's bpffs directory.
//!
//! Once each has programmed all N Services, the EndpointSlices are churned
//! at each rate (absolute schedule), every change carrying
//! `endpoints.kubernetes.io/last-change-trigger-time`. Per rate: each
//! proxy's own programming-latency histogram (delta of two scrapes), an
//! outside check (a probe connecting to a VIP every ms until a new real
//! backend answers), and the CPU time of each proxy's process.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use kube::api::{Api, Patch, PatchParams};
use netboot_harness::controlplane::{
    self, create_all, kube_proxy_command, proxy_config, spawn_logged, ControlPlane, ProxyMode,
    ProxySettings, Relay,
};

use crate::cleanup::{Cgroup, ChildGuard, Netns, PinRoot, TmpDir};
use crate::histogram::{self, Histogram};
use crate::probe::{unix_ns, Backends, Probe};
use crate::programming_report::{ProxyRow, RateRows, Report, SizeResult};
use crate::workload::{self, Workload, NAMESPACE, POD_CIDR, SERVICE_CIDR, SERVICE_PORT};

/// Node objects in the API.
pub const NODES: u32 = 1_000;
/// Endpoints per Service.
pub const ENDPOINTS: u32 = 10;
/// The Service the outside check moves between real backends (it has one
/// endpoint; it is never churned).
pub const PROBE_SERVICE: u32 = 0;
/// The annotation the EndpointSlice controller sets and kube-proxy reads.
pub const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// kube-proxy's metric.
pub const KUBE_PROXY_METRIC: &str = "kubeproxy_network_programming_duration_seconds";
/// netboot's metric (series `trigger="endpointslice"`).
pub const NETBOOT_METRIC: &str = "netboot_datapath_network_programming_duration_seconds";
/// Concurrent API writes.
const IN_FLIGHT: usize = 48;
/// Port of every proxy's metrics inside its namespace.
const METRICS_PORT: u16 = 10249;
/// Wait after each rate's churn before the second scrape.
const SETTLE: Duration = Duration::from_secs(5);
/// Longest wait, after SETTLE, for the proxies to catch up.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// Longest an outside-check probe waits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a proxy may take to program all Services.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Numbers of Services, ascending (the API grows from one to the next).
    pub sizes: Vec<u32>,
    /// Changes per second.
    pub rates: Vec<u32>,
    /// Churn per rate.
    pub window: Duration,
    /// Outside-check samples per rate and proxy.
    pub samples: u32,
    /// Quick mode (reported).
    pub quick: bool,
    /// The netboot-datapath binary.
    pub agent_bin: PathBuf,
    /// The iptables backend of kube-proxy's iptables mode.
    pub iptables: crate::kube_proxy::IptablesBackend,
}

impl Options {
    /// Quick: 1k Services, 20 s per rate; full: 1k and 10k, 60 s per rate.
    pub fn new(quick: bool, samples: u32, agent_bin: PathBuf) -> Self {
        Self {
            sizes: if quick {
                vec![1_000]
            } else {
                vec![1_000, 10_000]
            },
            rates: vec![1, 10, 100],
            window: Duration::from_secs(if quick { 20 } else { 60 }),
            samples,
            quick,
            agent_bin,
            iptables: crate::kube_proxy::IptablesBackend::Nft,
        }
    }
}

/// The three proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// kube-proxy, iptables mode.
    Iptables,
    /// kube-proxy, nftables mode.
    Nftables,
    /// netboot-datapath agent.
    Netboot,
}

impl Proxy {
    /// All, in report order.
    pub const ALL: [Proxy; 3] = [Proxy::Netboot, Proxy::Iptables, Proxy::Nftables];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
            Self::Netboot => "netboot",
        }
    }

    /// Report order of the proxy named `name` (unknown names last).
    pub fn order(name: &str) -> usize {
        Self::ALL
            .iter()
            .position(|p| p.name() == name)
            .unwrap_or(Self::ALL.len())
    }

    fn short(self) -> &'static str {
        match self {
            Self::Iptables => "ipt",
            Self::Nftables => "nft",
            Self::Netboot => "nb",
        }
    }

    /// The Node it serves.
    fn node(self) -> u32 {
        match self {
            Self::Iptables => 0,
            Self::Nftables => 1,
            Self::Netboot => 2,
        }
    }

    fn kube_proxy_mode(self) -> Option<ProxyMode> {
        match self {
            Self::Iptables => Some(ProxyMode::Iptables),
            Self::Nftables => Some(ProxyMode::Nftables),
            Self::Netboot => None,
        }
    }
}

/// `node-NNNN`.
pub fn node_name(i: u32) -> String {
    format!("node-{i:04}")
}

/// Node `i`'s InternalIP (172.20.0.0 + 1 + i: outside every other range here).
pub fn node_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 0)) + 1 + i)
}

/// The outside check's real backends (on `lo` of every proxy namespace).
pub fn probe_backends() -> [Ipv4Addr; 4] {
    [1, 2, 3, 4].map(|k| Ipv4Addr::new(10, 250, 0, k))
}

/// The address churn change `k` puts in (10.160.0.0/11, inside the pod CIDR).
fn churn_ip(k: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 160, 0, 0)) + 1 + (k % 2_000_000) as u32)
}

/// The Node endpoint `j` of Service `i` runs on.
fn endpoint_node(i: u32, j: u32) -> String {
    node_name((i * ENDPOINTS + j) % NODES)
}

/// The Pod behind endpoint `j` of Service `i`, referenced as the
/// EndpointSlice controller references it (kind, namespace, name, uid): the
/// agent's lists carry these bytes in a real cluster, so the bench's do too.
/// Named as a Deployment's pods are, `<deployment>-<pod-template-hash>-<5
/// random characters>`, the hash shared by the Service's pods.
fn endpoint_pod(i: u32, j: u32) -> ObjectReference {
    // The alphabet of Kubernetes' random name suffixes (no vowels).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = u64::from(i) * 1_000_003 + u64::from(j) * 7_919 + 17;
    let suffix: String = (0..5)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(ALPHABET[((x >> 33) % ALPHABET.len() as u64) as usize])
        })
        .collect();
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: Some(NAMESPACE.into()),
        name: Some(format!(
            "{}-{:010x}-{suffix}",
            workload::service_name(i),
            u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
        )),
        uid: Some(format!(
            "6f1d{i:04x}-{j:04x}-4c1e-9b7a-{:012x}",
            u64::from(i) * 31 + u64::from(j)
        )),
        ..Default::default()
    }
}

fn endpoints(i: u32, ips: &[Ipv4Addr]) -> Vec<Endpoint> {
    ips.iter()
        .zip(0u32..)
        .map(|(ip, j)| Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(endpoint_node(i, j)),
            target_ref: Some(endpoint_pod(i, j)),
            ..Default::default()
        })
        .collect()
}

/// Service `i`'s slice (the bench workload's, with Node names and a
/// managed-by label that keeps the EndpointSlice controller away).
fn slice(base: EndpointSlice, i: u32, ips: &[Ipv4Addr]) -> EndpointSlice {
    let mut s = base;
    if let Some(labels) = s.metadata.labels.as_mut() {
        labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            "netboot-bench".into(),
        );
    }
    s.endpoints = Some(endpoints(i, ips));
    s
}

fn slice_name(i: u32) -> String {
    format!("{}-bench", workload::service_name(i))
}

/// The merge patch of one change: all endpoints of Service `i` and the
/// trigger time (RFC 3339, ns precision, as the controller writes it).
fn change(i: u32, ips: &[Ipv4Addr], at_ns: u64) -> Result<serde_json::Value> {
    let ts = jiff::Timestamp::from_nanosecond(i128::from(at_ns))
        .context("trigger time")?
        .to_string();
    Ok(serde_json::json!({
        "metadata": {"annotations": {TRIGGER: ts}},
        "endpoints": endpoints(i, ips),
    }))
}

async fn write(api: &Api<EndpointSlice>, i: u32, ips: &[Ipv4Addr], at_ns: u64) -> Result<()> {
    let body = change(i, ips, at_ns)?;
    api.patch(
        &slice_name(i),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await
    .with_context(|| format!("EndpointSlice/{NAMESPACE}/{}: patch", slice_name(i)))?;
    Ok(())
}

/// Current endpoints of every churned Service.
pub(crate) type State = Arc<Mutex<HashMap<u32, Vec<Ipv4Addr>>>>;

/// What one rate's churn did.
#[derive(Clone, Debug, Default)]
struct Churned {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    /// Latest start of a write behind its schedule, ms.
    max_late_ms: f64,
    /// Start → last write answered.
    elapsed: Duration,
}

/// Rewrites one EndpointSlice per change (one endpoint's address replaced),
/// `rate` per second for `window`, on an absolute schedule.
async fn churn(
    api: Api<EndpointSlice>,
    state: State,
    n: u32,
    rate: u32,
    window: Duration,
    counter: Arc<Mutex<u64>>,
) -> Churned {
    let total = u64::from(rate) * window.as_secs();
    let start = tokio::time::Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut res = Churned::default();
    let churned = u64::from(n - 1);
    for k in 0..total {
        let at = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
        tokio::time::sleep_until(at).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let late = tokio::time::Instant::now().saturating_duration_since(at);
        res.max_late_ms = res.max_late_ms.max(late.as_secs_f64() * 1000.0);
        let g = {
            let Ok(mut c) = counter.lock() else { break };
            *c += 1;
            *c
        };
        // Services 1..n in turn (0 is the probe's), endpoint j in turn.
        let i = 1 + (g % churned) as u32;
        let j = ((g / churned) % u64::from(ENDPOINTS)) as usize;
        let ips = {
            let Ok(mut st) = state.lock() else { break };
            let Some(ips) = st.get_mut(&i) else { continue };
            if let Some(e) = ips.get_mut(j) {
                *e = churn_ip(g);
            }
            ips.clone()
        };
        let api = api.clone();
        tasks.spawn(async move {
            let r = write(&api, i, &ips, unix_ns()).await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            tally(&mut res, done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        tally(&mut res, done);
    }
    res.elapsed = start.elapsed();
    res
}

fn tally(res: &mut Churned, done: std::result::Result<Result<()>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => res.ok += 1,
        Ok(Err(e)) => {
            res.failed += 1;
            res.first_error.get_or_insert_with(|| format!("{e:#}"));
        }
        Err(e) => {
            res.failed += 1;
            res.first_error.get_or_insert_with(|| e.to_string());
        }
    }
}

/// utime+stime of `pid` and of its waited-for children (kube-proxy's
/// iptables-restore / nft), seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .context("/proc/PID/stat: no ')'")?;
    // After the comm: field 3 (state) is index 0; utime = 14, stime = 15,
    // cutime = 16, cstime = 17.
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |n: usize| -> Result<f64> {
        f.get(n - 3)
            .context("/proc/PID/stat: too few fields")?
            .parse::<f64>()
            .context("/proc/PID/stat: not a number")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((get(14)? + get(15)? + get(16)? + get(17)?) / hz.max(1.0))
}

/// One proxy, running in its namespace. Fields drop in order: the process
/// first, the namespace last.
pub(crate) struct Running {
    proxy: Proxy,
    kube_proxy: Option<controlplane::ChildGuard>,
    agent: Option<ChildGuard>,
    _pins: Option<PinRoot>,
    _relay: Relay,
    _backends: Backends,
    cgroup: Option<Cgroup>,
    pub(crate) pid: u32,
    /// Just before the process was spawned: the namespace, relay, cgroup
    /// and pins this bench sets up first are not the proxy's start.
    pub(crate) spawned: Instant,
    log: PathBuf,
    ns: Netns,
    /// iptables mode on iptables-legacy (rules dumped with its save).
    legacy: bool,
}

impl Running {
    fn metrics_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], METRICS_PORT))
    }

    pub(crate) fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = Self::metrics_addr();
        let path = path.to_string();
        netboot_harness::netns::in_netns(&self.ns.name, move || {
            Ok(netboot_harness::http::get(
                addr,
                &path,
                Duration::from_millis(500),
                Duration::from_secs(20),
            ))
        })
        .ok()
        .flatten()
    }

    /// Its own programming-latency histogram.
    fn histogram(&self) -> Result<Histogram> {
        let Some((200, page)) = self.get("/metrics") else {
            bail!("{}: /metrics did not answer 200", self.proxy.name());
        };
        Ok(match self.proxy {
            Proxy::Netboot => {
                histogram::parse(&page, NETBOOT_METRIC, &[("trigger", "endpointslice")])
            }
            _ => histogram::parse(&page, KUBE_PROXY_METRIC, &[]),
        })
    }

    pub(crate) fn exited(&mut self) -> Option<String> {
        if let Some(k) = self.kube_proxy.as_mut() {
            return k.exited().map(|s| s.to_string());
        }
        if let Some(c) = self.agent.as_mut().and_then(|a| a.child_mut()) {
            return c.try_wait().ok().flatten().map(|s| s.to_string());
        }
        None
    }

    /// Services programmed, as far as can be seen from outside.
    pub(crate) fn programmed(&self) -> Result<usize> {
        match self.proxy.kube_proxy_mode() {
            Some(ProxyMode::Iptables) if self.legacy => {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &self.ns.name, "iptables-legacy-save"])
                    .output()
                    .context("iptables-legacy-save")?;
                let dump = String::from_utf8_lossy(&out.stdout);
                Ok(ProxyMode::Iptables.services_in(&dump))
            }
            Some(mode) => Ok(mode.services_in(&mode.dump(&self.ns.name)?)),
            None => {
                // Not ready: nothing more to ask (a status while the agent
                // starts costs it CPU the start needs).
                if !matches!(self.get("/readyz"), Some((200, _))) {
                    return Ok(0);
                }
                let status = self
                    .get("/v1/status")
                    .and_then(|(c, b)| (c == 200).then_some(b))
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
                let services = status
                    .as_ref()
                    .and_then(|s| s["services"].as_u64())
                    .unwrap_or(0);
                Ok(services as usize)
            }
        }
    }

    /// Waits until all `n` Services are programmed; seconds since `since`
    /// (at most a poll interval late: dumping 100k rules takes seconds, so
    /// the pause between polls is three times the last poll). None: not
    /// within [`SYNC_TIMEOUT`].
    fn wait_synced(&mut self, n: u32, since: Instant) -> Result<Option<f64>> {
        loop {
            crate::cleanup::check_stop()?;
            if let Some(st) = self.exited() {
                bail!(
                    "{} exited ({st}): see {}",
                    self.proxy.name(),
                    self.log.display()
                );
            }
            let poll = Instant::now();
            let got = self.programmed()?;
            if got >= n as usize {
                return Ok(Some(since.elapsed().as_secs_f64()));
            }
            if since.elapsed() > SYNC_TIMEOUT {
                eprintln!(
                    "programming: {}: {got} of {n} Services programmed after {SYNC_TIMEOUT:?}; left out of this size (see {})",
                    self.proxy.name(),
                    self.log.display()
                );
                return Ok(None);
            }
            std::thread::sleep((poll.elapsed() * 3).max(Duration::from_millis(500)));
        }
    }
}

/// The namespace of one proxy: `lo` with the probe backends, a veth pair
/// (both ends inside) with the Node's IP and the Service CIDR routed to it (the
/// VIPs need an on-link route for kube-proxy's DNAT in OUTPUT); nothing
/// leads out.
fn namespace(tag: &str, p: Proxy) -> Result<(Netns, Backends)> {
    let ns = Netns::new(&format!("{tag}-pl-{}", p.short()))?;
    // A veth pair with both ends in here (this kernel has no dummy links).
    ns.ip(&[
        "link", "add", "nbpl0", "type", "veth", "peer", "name", "nbpl1",
    ])?;
    ns.ip(&["link", "set", "nbpl1", "up"])?;
    ns.ip(&["link", "set", "nbpl0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", node_ip(p.node())),
        "dev",
        "nbpl0",
    ])?;
    ns.ip(&["route", "add", SERVICE_CIDR, "dev", "nbpl0"])?;
    let mut addrs = Vec::new();
    for b in probe_backends() {
        ns.ip(&["addr", "add", &format!("{b}/32"), "dev", "lo"])?;
        addrs.push(IpAddr::V4(b));
    }
    let backends = Backends::serve(&ns.name, &addrs, workload::BACKEND_PORT)?;
    Ok((ns, backends))
}

/// A directory whose `iptables`, `iptables-save`, `iptables-restore` (and
/// the ip6tables ones) are the legacy programs: first in kube-proxy's PATH.
fn legacy_bin(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("iptables-legacy-bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for t in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            let link = bin.join(format!("{t}{suffix}"));
            if !link.exists() {
                let target = format!("/usr/sbin/{t}-legacy{suffix}");
                std::os::unix::fs::symlink(&target, &link)
                    .with_context(|| format!("{} -> {target}", link.display()))?;
            }
        }
    }
    Ok(bin)
}

fn start_kube_proxy(
    cp: &ControlPlane,
    dir: &Path,
    tag: &str,
    p: Proxy,
    iptables: crate::kube_proxy::IptablesBackend,
) -> Result<Running> {
    let legacy = p == Proxy::Iptables && iptables == crate::kube_proxy::IptablesBackend::Legacy;
    let mode = p.kube_proxy_mode().context("not a kube-proxy")?;
    let (ns, backends) = namespace(tag, p)?;
    let relay = Relay::start(&ns.name, SocketAddr::from(([127, 0, 0, 1], cp.api_port)))?;
    let kc = controlplane::kubeconfig(
        dir,
        &format!("kube-proxy-{}.conf", mode.name()),
        &format!("https://127.0.0.1:{}", relay.port),
    )?;
    let cfg = dir.join(format!("kube-proxy-{}.yaml", mode.name()));
    std::fs::write(
        &cfg,
        proxy_config(&ProxySettings {
            mode,
            kubeconfig: kc,
            cluster_cidr: POD_CIDR.into(),
            node: node_name(p.node()),
            metrics: Some(Running::metrics_addr()),
        }),
    )
    .with_context(|| format!("writing {}", cfg.display()))?;
    let log = dir.join(format!("kube-proxy-{}.log", mode.name()));
    let mut cmd = kube_proxy_command(&cp.bin_proxy, &ns.name, &cfg);
    if legacy {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        cmd.env("PATH", format!("{}:{path}", legacy_bin(dir)?.display()));
    }
    let spawned = Instant::now();
    let child = spawn_logged(cmd, &log)?;
    Ok(Running {
        proxy: p,
        pid: child.pid(),
        spawned,
        kube_proxy: Some(child),
        agent: None,
        _pins: None,
        _relay: relay,
        _backends: backends,
        cgroup: None,
        log,
        ns,
        legacy,
    })
}

pub(crate) fn start_agent(
    cp: &ControlPlane,
    dir: &Path,
    tag: &str,
    bin: &Path,
    max_services: u32,
) -> Result<Running> {
    let p = Proxy::Netboot;
    let (ns, backends) = namespace(tag, p)?;
    let relay = Relay::start(&ns.name, SocketAddr::from(([127, 0, 0, 1], cp.api_port)))?;
    // Room for every endpoint the run ever has at once, twice over.
    let sizes = crate::netboot_lb::map_sizes(
        max_services as usize,
        ENDPOINTS,
        2 * u64::from(max_services) * u64::from(ENDPOINTS),
    );
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, crate::agent_run::agent_config(relay.port, &sizes))
        .with_context(|| format!("writing {}", cfg.display()))?;
    let cg = Cgroup::new(&format!("{tag}/pl-agent"))?;
    let pins = PinRoot::new(&format!("{tag}/pl-agent"))?;
    let log = dir.join("agent.log");
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = crate::agent_run::agent_command(&crate::agent_run::AgentCommand {
        bin,
        node: &node_name(p.node()),
        config: &cfg,
        cgroup: &cg.path,
        pins: pins.pins.root(),
        listen: Running::metrics_addr(),
        rules_netns: &ns.path(),
    });
    cmd.arg("--kubeconfig")
        .arg(&cp.admin)
        .stderr(std::process::Stdio::from(file));
    // In the namespace by setns (no /sys remount: the cgroup and bpffs
    // paths stay valid); SIGTERM if the bench dies.
    netboot_harness::process::Confine {
        parent_death: true,
        netns: Some(ns.path()),
        ..Default::default()
    }
    .apply(&mut cmd)
    .context("confining the agent")?;
    crate::cleanup::check_stop()?;
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let guard = ChildGuard::new(child);
    Ok(Running {
        proxy: p,
        pid: guard.pid(),
        spawned,
        kube_proxy: None,
        agent: Some(guard),
        _pins: Some(pins),
        _relay: relay,
        _backends: backends,
        cgroup: Some(cg),
        log,
        ns,
        legacy: false,
    })
}

/// The API's objects: the namespace, the Nodes, the probe Service.
pub(crate) async fn prepare(cp: &ControlPlane) -> Result<()> {
    cp.create_namespace(NAMESPACE).await?;
    let nodes: Vec<Node> = (0..NODES)
        .map(|i| controlplane::node(&node_name(i), &node_ip(i).to_string()))
        .collect();
    create_all(&Api::<Node>::all(cp.client.clone()), nodes, IN_FLIGHT).await?;
    let first = Workload::new(1, ENDPOINTS)?.services().remove(0);
    cp.displace_default_kubernetes(&first).await?;
    Ok(())
}

/// Services `from..n` (without the probe's, which [`prepare`] created) and
/// the slices of all of them; records their endpoints in `state`.
fn objects(state: &State, from: u32, n: u32) -> Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let w = Workload::new(n, ENDPOINTS)?;
    let (services, slices) = w.objects_from(from);
    let services: Vec<_> = services
        .into_iter()
        .zip(from..)
        .filter(|(_, i)| *i != PROBE_SERVICE)
        .map(|(s, _)| s)
        .collect();
    let mut out = Vec::new();
    let mut st = state
        .lock()
        .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
    for (s, i) in slices.into_iter().zip(from..) {
        let ips = if i == PROBE_SERVICE {
            vec![probe_backends()[0]]
        } else {
            w.endpoint_ips(i, false)
        };
        out.push(slice(s, i, &ips));
        if i != PROBE_SERVICE {
            st.insert(i, ips);
        }
    }
    Ok((services, out))
}

/// Creates Services `from..n` and their slices; records their endpoints.
pub(crate) async fn grow(cp: &ControlPlane, state: &State, from: u32, n: u32) -> Result<()> {
    let (services, slices) = objects(state, from, n)?;
    create_all(
        &Api::namespaced(cp.client.clone(), NAMESPACE),
        services,
        IN_FLIGHT,
    )
    .await?;
    create_all(
        &Api::namespaced(cp.client.clone(), NAMESPACE),
        slices,
        IN_FLIGHT,
    )
    .await?;
    Ok(())
}

/// [`grow`]'s objects written straight into the API server's etcd
/// ([`ControlPlane::etcd_put_all`]) as the API server would have stored
/// them: defaulted (IP family, policies, affinity), with a uid and a
/// creation time, each ClusterIP with its IPAddress object (so the API
/// server's repair loop finds nothing to do). Returns once the API server's
/// watch cache lists them all. For sizes the API server cannot be filled
/// with in the time (its create path is O(Services) per Service).
pub(crate) async fn grow_in_etcd(
    cp: &ControlPlane,
    state: &State,
    from: u32,
    n: u32,
) -> Result<()> {
    let (services, slices) = objects(state, from, n)?;
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    let uid = |kind: u32, i: u32| format!("00000000-0000-4000-8{kind:03x}-{i:012x}");
    let mut kvs = Vec::with_capacity(services.len() * 2 + slices.len());
    for (mut s, i) in services
        .into_iter()
        .zip((from..).filter(|i| *i != PROBE_SERVICE))
    {
        s.metadata.uid = Some(uid(1, i));
        s.metadata.creation_timestamp = Some(now.clone());
        let ip = workload::vip(i).to_string();
        if let Some(spec) = s.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into()]);
            spec.ip_family_policy = Some("SingleStack".into());
            spec.session_affinity = Some("None".into());
            spec.internal_traffic_policy = Some("Cluster".into());
        }
        s.status = Some(Default::default());
        let name = workload::service_name(i);
        let addr = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "IPAddress",
            "metadata": {
                "name": ip,
                "uid": uid(2, i),
                "creationTimestamp": now,
                "labels": {
                    "ipaddress.kubernetes.io/ip-family": "IPv4",
                    "ipaddress.kubernetes.io/managed-by": "ipallocator.k8s.io",
                },
            },
            "spec": {"parentRef": {
                "group": "", "resource": "services", "namespace": NAMESPACE, "name": name,
            }},
        });
        kvs.push((format!("ipaddresses/{ip}"), serde_json::to_vec(&addr)?));
        kvs.push((
            format!("services/specs/{NAMESPACE}/{name}"),
            serde_json::to_vec(&s)?,
        ));
    }
    for (mut s, i) in slices.into_iter().zip(from..) {
        s.metadata.uid = Some(uid(3, i));
        s.metadata.creation_timestamp = Some(now.clone());
        s.metadata.generation = Some(1);
        let name = s.metadata.name.clone().unwrap_or_default();
        kvs.push((
            format!("endpointslices/{NAMESPACE}/{name}"),
            serde_json::to_vec(&s)?,
        ));
    }
    cp.etcd_put_all(kvs).await?;
    let t = Instant::now();
    wait_listed::<netboot_datapath::lean::LeanService>(&cp.client, n, "Services", t).await?;
    wait_listed::<netboot_datapath::lean::LeanSlice>(&cp.client, n, "EndpointSlices", t).await
}

/// Waits until the API server's watch cache lists at least `n` `K`
/// (`kind` names them in the error), at most [`SYNC_TIMEOUT`] from `since`.
async fn wait_listed<K: netboot_datapath::listwatch::Listable>(
    c: &kube::Client,
    n: u32,
    kind: &str,
    since: Instant,
) -> Result<()> {
    use netboot_datapath::listwatch::{page, Encoding};
    loop {
        let (mut token, mut listed) = (None, 0);
        loop {
            let p = page::<K>(c, Encoding::Protobuf, 5_000, token).await?;
            listed += p.items.len();
            token = p.continue_token;
            if token.is_none() {
                break;
            }
        }
        if listed >= n as usize {
            return Ok(());
        }
        anyhow::ensure!(
            since.elapsed() < SYNC_TIMEOUT,
            "the API server lists {listed} {kind} of the {n} written into etcd after {SYNC_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the whole section; `save` gets the report after each size. A
/// failure inside a size ends the run with [`Report::error`] set (the sizes
/// before it are kept).
pub fn run(o: &Options, save: &mut dyn FnMut(&Report) -> Result<()>) -> Result<Report> {
    let started = Instant::now();
    let mut machine = crate::machine::probe(o.iptables);
    let tag = crate::cleanup::run_tag();
    let dir = TmpDir::new(&format!("{tag}-pl"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    eprintln!("programming: starting etcd and kube-apiserver");
    let cp = rt
        .block_on(ControlPlane::start(dir.path(), SERVICE_CIDR))
        .context("private control plane")?;
    rt.block_on(prepare(&cp))?;
    let state: State = Arc::default();
    let counter = Arc::new(Mutex::new(0u64));
    let slices: Api<EndpointSlice> = Api::namespaced(cp.client.clone(), NAMESPACE);
    let max_services = o.sizes.iter().copied().max().unwrap_or(1_000);

    let mut report = Report::new(o);
    report.machine = machine.clone();
    let mut created = 0;
    let mut probe_current = 0usize;
    for &n in &o.sizes {
        let mut size = SizeResult {
            services: n,
            ..Default::default()
        };
        let r = (|| -> Result<()> {
            let t = Instant::now();
            rt.block_on(grow(&cp, &state, created, n))?;
            created = n;
            eprintln!(
                "programming: {n} Services x {ENDPOINTS} endpoints in the API in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            // One proxy at a time, as on a node: each has the machine to
            // itself (with etcd, the API server and the churn writer), and
            // sees the same API state and the same churn as the others.
            for p in Proxy::ALL {
                let mut r = match p {
                    Proxy::Netboot => {
                        start_agent(&cp, dir.path(), &tag, &o.agent_bin, max_services)?
                    }
                    _ => start_kube_proxy(&cp, dir.path(), &tag, p, o.iptables)?,
                };
                let since = r.spawned;
                match r.wait_synced(n, since)? {
                    Some(s) => {
                        eprintln!("programming: {} has all {n} Services ({s:.1} s)", p.name());
                        size.synced_s.push((p.name().to_string(), s));
                    }
                    None => {
                        size.not_synced.push(p.name().to_string());
                        continue;
                    }
                }
                for &rate in &o.rates {
                    let rows = measure_rate(
                        &rt,
                        o,
                        &r,
                        &slices,
                        &state,
                        &counter,
                        n,
                        rate,
                        &mut probe_current,
                    )?;
                    size.rates.push(rows);
                }
                // Stopped, its namespace and rules gone, before the next.
                drop(r);
            }
            size.rates
                .sort_by_key(|r| (r.rate, r.proxies.first().map(|p| Proxy::order(&p.proxy))));
            Ok(())
        })();
        report.sizes.push(size);
        if let Err(e) = r {
            report.error = Some(format!("{n} Services: {e:#}"));
            break;
        }
        report.duration_s = started.elapsed().as_secs_f64();
        report.machine.loadavg_end = crate::machine::loadavg();
        report.finish();
        // Whatever comes next, this size's numbers are on disk.
        save(&report)?;
    }
    drop(cp);
    machine.loadavg_end = crate::machine::loadavg();
    report.machine = machine;
    report.duration_s = started.elapsed().as_secs_f64();
    report.finish();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn measure_rate(
    rt: &tokio::runtime::Runtime,
    o: &Options,
    proxy: &Running,
    slices: &Api<EndpointSlice>,
    state: &State,
    counter: &Arc<Mutex<u64>>,
    n: u32,
    rate: u32,
    probe_current: &mut usize,
) -> Result<RateRows> {
    eprintln!(
        "programming: {}: {n} Services, {rate} changes/s for {} s",
        proxy.proxy.name(),
        o.window.as_secs()
    );
    let running = [proxy];
    let before: Vec<Histogram> = running
        .iter()
        .map(|r| r.histogram())
        .collect::<Result<_>>()?;
    let cpu0: Vec<f64> = running
        .iter()
        .map(|r| cpu_seconds(r.pid))
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let handle = rt.spawn(churn(
        slices.clone(),
        state.clone(),
        n,
        rate,
        o.window,
        counter.clone(),
    ));
    // The outside check, spread over the window.
    let mut outside: Vec<Vec<f64>> = vec![Vec::new(); running.len()];
    let mut timeouts = vec![0u32; running.len()];
    let mut skipped = 0u32;
    let backends = probe_backends();
    let target = SocketAddr::from((workload::vip(PROBE_SERVICE), SERVICE_PORT));
    for k in 0..o.samples {
        let at = o
            .window
            .mul_f64((f64::from(k) + 0.5) / f64::from(o.samples.max(1)));
        if let Some(wait) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        crate::cleanup::check_stop()?;
        if t0.elapsed() >= o.window {
            // The earlier samples took the whole window: no sample after the churn.
            skipped += 1;
            continue;
        }
        let next = (*probe_current + 1) % backends.len();
        let want = IpAddr::V4(backends[next]);
        let probes: Vec<Probe> = running
            .iter()
            .map(|r| {
                Probe::spawn(
                    r.cgroup.as_ref().map(|c| c.path.as_path()),
                    r.ns.path(),
                    target,
                    want,
                    PROBE_TIMEOUT,
                )
            })
            .collect::<Result<_>>()?;
        let at_ns = unix_ns();
        rt.block_on(write(slices, PROBE_SERVICE, &[backends[next]], at_ns))?;
        *probe_current = next;
        for (idx, p) in probes.into_iter().enumerate() {
            match p.wait()? {
                Some(ok) => outside[idx].push(ok.saturating_sub(at_ns) as f64 / 1e6),
                None => timeouts[idx] += 1,
            }
        }
    }
    let churned = rt.block_on(handle).context("the churn task panicked")?;
    // Settle: at least SETTLE, then until no proxy's histogram grows
    // between two scrapes 2 s apart (a proxy behind the churn catches up),
    // at most SETTLE_MAX.
    std::thread::sleep(SETTLE);
    let settle = Instant::now();
    let mut last: Vec<f64> = Vec::new();
    loop {
        let now: Vec<f64> = running
            .iter()
            .map(|r| r.histogram().map(|h| h.total()))
            .collect::<Result<_>>()?;
        if now == last || settle.elapsed() > SETTLE_MAX {
            break;
        }
        last = now;
        crate::cleanup::check_stop()?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let elapsed_min = t0.elapsed().as_secs_f64() / 60.0;
    let mut rows = RateRows {
        rate,
        achieved: churned.ok as f64 / churned.elapsed.max(o.window).as_secs_f64(),
        writes_ok: churned.ok,
        writes_failed: churned.failed,
        first_error: churned.first_error.clone(),
        max_late_ms: churned.max_late_ms,
        measured_s: elapsed_min * 60.0,
        samples_skipped: skipped,
        proxies: Vec::new(),
    };
    for (idx, r) in running.iter().enumerate() {
        let h = r.histogram()?.since(&before[idx]);
        let cpu = cpu_seconds(r.pid)? - cpu0[idx];
        let mut samples = outside[idx].clone();
        samples.sort_by(f64::total_cmp);
        rows.proxies.push(ProxyRow {
            proxy: r.proxy.name().to_string(),
            observed: h.total(),
            p50_ms: h.quantile(0.5).map(|s| s * 1000.0),
            p99_ms: h.quantile(0.99).map(|s| s * 1000.0),
            first_bucket_ms: h.first_bound().map(|s| s * 1000.0),
            outside_ms: samples.clone(),
            outside_p50_ms: (!samples.is_empty()).then(|| crate::stats::percentile(&samples, 0.5)),
            outside_max_ms: samples.last().copied(),
            outside_timeouts: timeouts[idx],
            cpu_s_per_min: cpu / elapsed_min,
        });
    }
    eprintln!("{}", crate::programming_report::rate_table(n, &rows));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_pods_are_named_as_one_deployments() {
        let names: Vec<String> = (0..ENDPOINTS)
            .map(|j| endpoint_pod(42, j).name.unwrap_or_default())
            .collect();
        let stem = |n: &str| n.rsplit_once('-').map(|(a, _)| a.to_string());
        // One pod-template hash per Service, a distinct suffix per pod.
        assert!(
            names.iter().all(|n| stem(n) == stem(&names[0])),
            "{names:?}"
        );
        assert_ne!(
            stem(&names[0]),
            stem(&endpoint_pod(43, 0).name.unwrap_or_default())
        );
        let suffixes: std::collections::BTreeSet<_> = names
            .iter()
            .filter_map(|n| n.rsplit_once('-'))
            .map(|(_, s)| s)
            .collect();
        assert_eq!(suffixes.len(), names.len(), "{names:?}");
        assert!(
            names[0].starts_with("svc-000042-") && names[0].len() == 27,
            "{names:?}"
        );
    }

    #[test]
    fn endpoints_spread_over_the_nodes() {
        assert_eq!(endpoint_node(0, 0), "node-0000");
        assert_eq!(endpoint_node(0, 9), "node-0009");
        assert_eq!(endpoint_node(100, 0), "node-0000");
        assert_eq!(endpoint_node(99, 9), "node-0999");
        assert_eq!(node_ip(0), Ipv4Addr::new(172, 20, 0, 1));
        assert_eq!(node_ip(999), Ipv4Addr::new(172, 20, 3, 232));
    }

    #[test]
    fn a_change_carries_the_trigger_time_with_nanoseconds() {
        let v = change(
            3,
            &[Ipv4Addr::new(10, 160, 0, 1)],
            1_700_000_000_123_456_789,
        )
        .expect("change");
        assert_eq!(
            v["metadata"]["annotations"][TRIGGER],
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(v["endpoints"][0]["addresses"][0], "10.160.0.1");
        assert_eq!(v["endpoints"][0]["nodeName"], "node-0030");
    }

    #[test]
    fn churn_addresses_stay_in_the_pod_cidr_and_off_the_probe_backends() {
        assert_eq!(churn_ip(0), Ipv4Addr::new(10, 160, 0, 1));
        let last = churn_ip(1_999_999);
        assert!(last < Ipv4Addr::new(10, 192, 0, 0), "{last}");
    }

    #[test]
    fn cpu_of_this_process_is_readable() {
        let s = cpu_seconds(std::process::id()).expect("stat");
        assert!(s >= 0.0);
    }
}
