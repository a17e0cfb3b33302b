//! `netboot-bench northsouth` (issue 14): an external client to a NodePort,
//! one connection per request, for netboot's per-packet (tc) path, kube-proxy's
//! iptables and nftables rules and the floor (straight to the backend), at
//! N NodePort Services, local and remote backend; plus the tc program's
//! per-packet cost from `BPF_PROG_TEST_RUN` ([`crate::tc_cost`]).
//!
//! One site per variant (identical addresses, separate namespaces):
//!
//! ```text
//!  <tag>-<v>-cl 192.168.50.100 ─┐ bridge in <tag>-<v>-br
//!  <tag>-<v>-nd 192.168.50.1  ──┤   (eth0; the variant's datapath here)
//!  <tag>-<v>-rm 192.168.50.2  ──┘   "another node": 10.200.2.10 on lo
//!  <tag>-<v>-nd pod0 10.200.1.254 ── <tag>-<v>-pd 10.200.1.10 (local pod)
//! ```
//!
//! Every Service is a NodePort (20000 + i: the NodePort range of an API
//! server with `--service-node-port-range=20000-65535`, since 10k Services
//! do not fit the default one), policy Cluster, one endpoint. The last two
//! declared are measured: N−2 has the local pod as endpoint, N−1 the remote
//! one (netboot SNATs to the node address for it; kube-proxy masquerades
//! both). The floor's client has a route to 10.200.0.0/16 via the node and
//! connects to the pods themselves (forwarded, no translation).
//!
//! Network safety: every veth is made inside a site namespace with its peer
//! moved straight into another one; no default route; nothing in the root
//! namespace.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::cleanup::{Cgroup, ChildGuard, Netns, PinRoot, TmpDir};
use crate::client::Client;
use crate::kube_proxy::IptablesBackend;
use crate::stats::{summarize, Summary};
use crate::workload::{Workload, BACKEND_PORT};

/// The node's address (on eth0, towards the client and the other node).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// The external client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// The other node's address.
pub const OTHER_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
/// The local pod (on this node).
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
/// The remote pod (on the other node).
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 10);
/// eth0's MAC in the node namespace (the test-run frame's destination).
pub const NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// The node's name in the netboot variant's static Node.
pub const NODE_NAME: &str = "nbb-node";
/// First nodePort (Service i gets FIRST_NODE_PORT + i).
pub const FIRST_NODE_PORT: u32 = 20000;

/// The datapath of a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proxy {
    /// No Service at all: the client connects to the pod.
    Floor,
    /// The real agent, its tc programs on eth0.
    Netboot,
    /// kube-proxy's iptables rules (iptables-nft).
    Iptables,
    /// kube-proxy's nftables rules.
    Nftables,
}

impl Proxy {
    /// Table order.
    pub const ALL: [Proxy; 4] = [Self::Floor, Self::Netboot, Self::Iptables, Self::Nftables];

    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Floor => "floor (to the pod)",
            Self::Netboot => "netboot (tc)",
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::Floor => "fl",
            Self::Netboot => "nb",
            Self::Iptables => "ip",
            Self::Nftables => "nf",
        }
    }
}

/// Where the measured Service's endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A pod on the node.
    Local,
    /// A pod on the other node (netboot: SNAT).
    Remote,
}

impl Backend {
    /// Both.
    pub const ALL: [Backend; 2] = [Self::Local, Self::Remote];
}

/// nodePort of Service `i`.
pub fn node_port(i: u32) -> u16 {
    u16::try_from(FIRST_NODE_PORT + i).unwrap_or(u16::MAX)
}

/// Most Services (nodePorts stay below 65536).
pub const MAX_SERVICES: u32 = 65535 - FIRST_NODE_PORT;

/// Index of the measured Service with `b`'s endpoint.
pub fn measured(w: &Workload, b: Backend) -> u32 {
    match b {
        Backend::Local => w.n - 2,
        Backend::Remote => w.n - 1,
    }
}

/// Service `i`'s one endpoint: the pods for the measured two, the
/// workload's (nowhere) otherwise.
pub fn endpoint(w: &Workload, i: u32) -> Ipv4Addr {
    if i == measured(w, Backend::Local) {
        LOCAL_POD
    } else if i == measured(w, Backend::Remote) {
        REMOTE_POD
    } else {
        w.endpoint_ips(i, false)
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

/// The N Services as NodePorts and their EndpointSlices (one endpoint
/// each, on this node only for the local measured Service).
pub fn objects(w: &Workload) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = w.services();
    for (i, s) in (0u32..).zip(svcs.iter_mut()) {
        if let Some(spec) = s.spec.as_mut() {
            spec.type_ = Some("NodePort".into());
            spec.external_traffic_policy = Some("Cluster".into());
            for p in spec.ports.iter_mut().flatten() {
                p.node_port = Some(i32::from(node_port(i)));
            }
        }
    }
    let mut slices = w.slices(false);
    for (i, sl) in (0u32..).zip(slices.iter_mut()) {
        let local = i == measured(w, Backend::Local);
        for ep in sl.endpoints.iter_mut().flatten() {
            ep.addresses = vec![endpoint(w, i).to_string()];
            ep.node_name = Some(if local { NODE_NAME } else { "other-node" }.into());
        }
    }
    (svcs, slices)
}

/// The agent's `--static-services` file: the Node (InternalIP on eth0, so
/// the agent attaches its tc programs there) and the objects.
pub fn static_file(w: &Workload) -> Result<String> {
    let (svcs, slices) = objects(w);
    let mut out = format!(
        "kind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus:\n  addresses:\n  - {{type: Hostname, address: {NODE_NAME}}}\n  - {{type: InternalIP, address: {NODE_IP}}}\n"
    );
    for (s, sl) in svcs.iter().zip(&slices) {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string(s)?);
        out.push_str("\n---\n");
        out.push_str(&serde_json::to_string(sl)?);
        out.push('\n');
    }
    Ok(out)
}

/// One variant's namespaces and servers.
pub struct Site {
    /// Which datapath.
    pub proxy: Proxy,
    // Drop order: servers (threads hold the namespaces), then namespaces.
    _servers: Vec<PeerServer>,
    /// The external client.
    pub client: Netns,
    /// The node (the datapath lives here).
    pub node: Netns,
    _pod: Netns,
    _remote: Netns,
    _br: Netns,
}

impl Site {
    /// Creates the namespaces, addresses, routes and the two servers.
    pub fn new(tag: &str, proxy: Proxy) -> Result<Self> {
        let ns = |r: &str| Netns::new(&format!("{tag}-{}-{r}", proxy.short()));
        let br = ns("br")?;
        let client = ns("cl")?;
        let node = ns("nd")?;
        let pod = ns("pd")?;
        let remote = ns("rm")?;
        br.ip(&["link", "add", "br0", "type", "bridge"])?;
        br.ip(&["link", "set", "br0", "up"])?;
        for (n, port, addr) in [
            (&client, "p-cl", CLIENT_IP),
            (&node, "p-nd", NODE_IP),
            (&remote, "p-rm", OTHER_NODE_IP),
        ] {
            br.veth_to(port, n, "eth0")?;
            br.ip(&["link", "set", port, "master", "br0", "up"])?;
            n.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            n.ip(&["link", "set", "eth0", "up"])?;
        }
        let mac = NODE_MAC.map(|b| format!("{b:02x}")).join(":");
        node.ip(&["link", "set", "eth0", "address", &mac])?;
        node.veth_to("pod0", &pod, "eth0")?;
        node.ip(&["addr", "add", "10.200.1.254/24", "dev", "pod0"])?;
        node.ip(&["link", "set", "pod0", "up"])?;
        pod.ip(&["addr", "add", &format!("{LOCAL_POD}/24"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "192.168.50.0/24", "via", "10.200.1.254"])?;
        remote.ip(&["addr", "add", &format!("{REMOTE_POD}/32"), "dev", "lo"])?;
        node.ip(&[
            "route",
            "add",
            "10.200.2.0/24",
            "via",
            &OTHER_NODE_IP.to_string(),
        ])?;
        if proxy == Proxy::Floor {
            client.ip(&["route", "add", "10.200.0.0/16", "via", &NODE_IP.to_string()])?;
        }
        let sysctl = |args: &[&str]| -> Result<()> {
            let mut c = crate::sys::command_in(&node, "sysctl")?;
            c.args(args);
            crate::sys::run_checked(&mut c)
        };
        // Forwarding; no ICMP redirects (the floor's remote path and the
        // SNATed flows leave through the interface they came in on).
        sysctl(&["-qw", "net.ipv4.ip_forward=1"])?;
        sysctl(&["-qw", "net.ipv4.conf.all.send_redirects=0"])?;
        sysctl(&["-qw", "net.ipv4.conf.eth0.send_redirects=0"])?;
        let servers = vec![
            PeerServer::start(&pod, SocketAddrV4::new(LOCAL_POD, BACKEND_PORT))?,
            PeerServer::start(&remote, SocketAddrV4::new(REMOTE_POD, BACKEND_PORT))?,
        ];
        Ok(Self {
            proxy,
            _servers: servers,
            client,
            node,
            _pod: pod,
            _remote: remote,
            _br: br,
        })
    }

    /// Where the client connects for `b`'s row.
    pub fn target(&self, w: &Workload, b: Backend) -> SocketAddr {
        match (self.proxy, b) {
            (Proxy::Floor, Backend::Local) => SocketAddr::from((LOCAL_POD, BACKEND_PORT)),
            (Proxy::Floor, Backend::Remote) => SocketAddr::from((REMOTE_POD, BACKEND_PORT)),
            _ => SocketAddr::from((NODE_IP, node_port(measured(w, b)))),
        }
    }
}

/// A server that reads one request and answers `ok`, then closes.
struct PeerServer {
    stop: Arc<AtomicBool>,
    t: Option<JoinHandle<()>>,
}

impl PeerServer {
    fn start(ns: &Netns, addr: SocketAddrV4) -> Result<Self> {
        let fd = crate::sys::open_netns(ns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let t = std::thread::Builder::new()
            .name(format!("nbb-ns-{addr}"))
            .spawn(move || {
                let l = netboot_harness::netns::enter_thread(&fd)
                    .map_err(|e| format!("setns: {e}"))
                    .and_then(|()| {
                        let l = std::net::TcpListener::bind(addr)
                            .map_err(|e| format!("bind {addr}: {e}"))?;
                        l.set_nonblocking(true).map_err(|e| e.to_string())?;
                        Ok(l)
                    });
                match l {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        serve(&l, &stop2);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .context("spawning a server thread")?;
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, t: Some(t) }),
            Ok(Err(e)) => bail!("server in {}: {e}", ns.name),
            Err(_) => bail!("server in {} did not start", ns.name),
        }
    }
}

fn serve(l: &std::net::TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = [0u8; 16];
                if matches!(s.read(&mut req), Ok(k) if k > 0) {
                    let _ = s.write_all(b"ok\n");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                crate::topology::wait_readable(l, 50)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// The real agent running in a site's node namespace.
pub struct Agent {
    guard: ChildGuard,
    /// Its pin root (links `np-in-eth0`, `np-out-eth0`).
    pub pins: PinRoot,
    _cg: Cgroup,
    _dir: TmpDir,
}

/// Runs `f` on a thread inside `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let fd = crate::sys::open_netns(ns)?;
    std::thread::spawn(move || {
        netboot_harness::netns::enter_thread(&fd).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
}

impl Agent {
    /// Starts `bin` in `site`'s node namespace on `w`'s static file and
    /// waits until it is ready and reports its tc path on eth0.
    pub fn start(bin: &Path, run_tag: &str, site: &Site, w: &Workload) -> Result<Self> {
        let dir = TmpDir::new(&format!("{run_tag}-ns-agent-{}", w.n))?;
        let sizes = crate::netboot_lb::map_sizes(3 * w.n as usize, 1, w.endpoints() + 16);
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, crate::agent_run::agent_config(6443, &sizes))?;
        let stat = dir.path().join("static.yaml");
        std::fs::write(&stat, static_file(w)?)?;
        let cg = Cgroup::new(&format!("{run_tag}/ns-agent-{}", w.n))?;
        let pins = PinRoot::new(&format!("{run_tag}/ns-agent-{}", w.n))?;
        let log = dir.path().join("agent.log");
        let node_path: PathBuf = site.node.path();
        let mut cmd = crate::agent_run::agent_command(&crate::agent_run::AgentCommand {
            bin,
            node: NODE_NAME,
            config: &cfg,
            cgroup: &cg.path,
            pins: pins.pins.root(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9890)),
            rules_netns: &node_path,
        });
        cmd.arg("--static-services")
            .arg(&stat)
            .env_remove("NETBOOT_NODEPORT_DEVICES")
            .stderr(std::fs::File::create(&log)?);
        netboot_harness::process::Confine {
            parent_death: true,
            netns: Some(node_path),
            ..Default::default()
        }
        .apply(&mut cmd)
        .context("confining the agent")?;
        let mut guard = ChildGuard::new(cmd.spawn().context("starting the agent")?);
        let t0 = Instant::now();
        let status = loop {
            crate::cleanup::check_stop()?;
            let st = in_ns(&site.node, || {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9890));
                let get = |p: &str| {
                    netboot_harness::http::get(
                        addr,
                        p,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                    )
                };
                Ok(match get("/readyz") {
                    Some((200, _)) => get("/v1/status").map(|(_, b)| b),
                    _ => None,
                })
            })?;
            if let Some(st) = st {
                break st;
            }
            if let Some(Ok(Some(s))) = guard.child_mut().map(|c| c.try_wait()) {
                bail!(
                    "agent exited ({s}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "agent not ready after 120 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let v: serde_json::Value = serde_json::from_str(&status).context("agent status")?;
        let devs = v["nodeportDevices"].as_str().unwrap_or("");
        if !devs.contains("eth0") {
            bail!("agent ready but no tc path on eth0: {status}");
        }
        eprintln!(
            "agent ready in {:.1} s: {} frontends, {devs}",
            t0.elapsed().as_secs_f64(),
            v["services"]
        );
        Ok(Self {
            guard,
            pins,
            _cg: cg,
            _dir: dir,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.guard.stop(Duration::from_secs(3));
    }
}

/// kube-proxy's iptables rules for `w` (every Service a NodePort) on this
/// node: the harness's renderer on [`objects`].
pub fn iptables_ruleset(w: &Workload) -> String {
    let (svcs, slices) = objects(w);
    netboot_harness::kubeproxy_rules::render(&svcs, &slices, &crate::iptables_rules::options())
}

/// Services per nftables transaction when the bench loads the ruleset.
pub const NFT_PER_TRANSACTION: u32 = 1000;

/// kube-proxy's nftables rules for `w` (every Service a NodePort) on this
/// node (node address [`NODE_IP`], the local pod [`LOCAL_POD`]), in the
/// transactions the bench loads.
pub fn nft_transactions(w: &Workload) -> Vec<String> {
    let node = [NODE_IP];
    let np = crate::nft_rules::NodePorts {
        node_ips: &node,
        port: &node_port,
        endpoints: &|i| vec![endpoint(w, i)],
        is_local: &|ip| ip == LOCAL_POD,
    };
    crate::nft_rules::nodeport_sync_chunks(w, &np, NFT_PER_TRANSACTION)
}

/// Loads kube-proxy's rules for `w` (every Service a NodePort) into
/// `site`'s node namespace ([`iptables_ruleset`], [`nft_transactions`]);
/// returns how long the load took.
pub fn load_rules(site: &Site, w: &Workload, run_tag: &str) -> Result<Duration> {
    let files = crate::kube_proxy::RuleFiles::new(&format!("{run_tag}-ns-rules-{}", w.n))?;
    let t = Instant::now();
    match site.proxy {
        Proxy::Iptables => {
            netboot_harness::netns::in_netns(&site.node.name, || {
                netboot_harness::kubeproxy_rules::ensure_nfacct_counters()
            })
            .context("kube-proxy's nfacct counters")?;
            let p = files.write("iptables.rules", &iptables_ruleset(w))?;
            crate::kube_proxy::iptables_restore(&site.node, IptablesBackend::Nft, &p, false)?;
        }
        Proxy::Nftables => {
            for (k, chunk) in nft_transactions(w).iter().enumerate() {
                let p = files.write(&format!("nft-{k}.nft"), chunk)?;
                crate::kube_proxy::nft_apply(&site.node, &p)?;
            }
        }
        _ => bail!("{} has no kube-proxy rules", site.proxy.name()),
    }
    Ok(t.elapsed())
}

/// How many connections, in what batches.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    /// Measured connections per row.
    pub connections: u32,
    /// Connections per batch (one row's turn in a round).
    pub batch: u32,
    /// Unmeasured connections per row first.
    pub warmup: u32,
}

/// One row's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// Services.
    pub services: u32,
    /// Datapath.
    pub proxy: Proxy,
    /// Endpoint placement.
    pub backend: Backend,
    /// Where the client connected.
    pub target: String,
    /// connect() times, µs.
    pub connect_us: Summary,
    /// Requests per second over the measured batches (connect, request,
    /// reply, close; one client, one at a time).
    pub requests_per_s: f64,
    /// Successful measured requests.
    pub ok: u64,
    /// Failed ones.
    pub failed: u64,
    /// Why the row was not measured.
    pub error: Option<String>,
}

struct Lane {
    proxy: Proxy,
    backend: Backend,
    target: SocketAddr,
    client: Client,
    micros: Vec<f64>,
    wall_ns: u64,
    ok: u64,
    failed: u64,
    error: Option<String>,
}

/// Runs the rows in rounds (one batch each, so the machine's drifts hit
/// every row alike; the order shuffled every round, so no row always
/// follows the same one: latency.rs's [`Order`](crate::latency::Order)).
pub fn measure(
    w: &Workload,
    sites: &[Site],
    clients_cg: &Path,
    plan: Plan,
) -> Result<Vec<RowResult>> {
    let mut lanes = Vec::new();
    for site in sites {
        for b in Backend::ALL {
            let target = site.target(w, b);
            let mut client = Client::spawn(clients_cg, &site.client)?;
            let probe = client.requests(target, 1)?;
            let error = (probe.ns.is_empty()).then(|| {
                format!(
                    "first request to {target} failed: {}",
                    std::io::Error::from_raw_os_error(probe.errno)
                )
            });
            if error.is_none() {
                client.requests(target, plan.warmup)?;
            }
            lanes.push(Lane {
                proxy: site.proxy,
                backend: b,
                target,
                client,
                micros: Vec::with_capacity(plan.connections as usize),
                wall_ns: 0,
                ok: 0,
                failed: 0,
                error,
            });
        }
    }
    let active: Vec<usize> = (0..lanes.len())
        .filter(|&i| lanes[i].error.is_none())
        .collect();
    let batch = plan.batch.max(1);
    let rounds = plan.connections.div_ceil(batch);
    let mut turns = crate::latency::Turns::new(crate::latency::Order::Shuffled);
    for r in 0..rounds {
        let count = batch.min(plan.connections - r * batch);
        for k in turns.of_round(r as usize, active.len()) {
            let lane = &mut lanes[active[k]];
            let b = lane.client.requests(lane.target, count)?;
            lane.micros
                .extend(b.ns.iter().map(|ns| *ns as f64 / 1000.0));
            lane.wall_ns += b.wall_ns;
            lane.ok += b.ns.len() as u64;
            lane.failed += b.failed;
        }
    }
    Ok(lanes
        .into_iter()
        .map(|l| RowResult {
            services: w.n,
            proxy: l.proxy,
            backend: l.backend,
            target: l.target.to_string(),
            connect_us: summarize(&l.micros),
            requests_per_s: if l.wall_ns > 0 {
                l.ok as f64 / (l.wall_ns as f64 / 1e9)
            } else {
                0.0
            },
            ok: l.ok,
            failed: l.failed,
            error: l.error,
        })
        .collect())
}

/// What the section measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: crate::machine::Machine,
    /// Quick mode.
    pub quick: bool,
    /// Services sizes.
    pub services: Vec<u32>,
    /// Connections per row.
    pub connections: u32,
    /// Every row.
    pub rows: Vec<RowResult>,
    /// Rule load times per size and variant, s.
    pub load_s: BTreeMap<String, f64>,
    /// tc program per-packet cost.
    pub tc_cost: Vec<crate::tc_cost::Cost>,
    /// The goal at the largest size.
    pub goal: Option<Goal>,
    /// Wall time, s.
    pub duration_s: f64,
    /// Why the run stopped early.
    pub error: Option<String>,
}

/// Issue 14's north–south goal at one size: netboot's added p99 (over the
/// floor, same backend) at most nftables' and at least 10× below iptables',
/// for both the local and the remote backend.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// Services.
    pub services: u32,
    /// (backend, netboot, nftables, iptables) added p99, µs.
    pub added_p99_us: Vec<(Backend, f64, f64, f64)>,
    /// Whether every backend meets it.
    pub met: bool,
}

/// The goal from the rows of size `n` (None: a row is missing).
pub fn goal(rows: &[RowResult], n: u32) -> Option<Goal> {
    let p99 = |p: Proxy, b: Backend| {
        rows.iter()
            .find(|r| r.services == n && r.proxy == p && r.backend == b && r.error.is_none())
            .map(|r| r.connect_us.p99)
    };
    let mut added = Vec::new();
    let mut met = true;
    for b in Backend::ALL {
        let floor = p99(Proxy::Floor, b)?;
        let nb = p99(Proxy::Netboot, b)? - floor;
        let nft = p99(Proxy::Nftables, b)? - floor;
        let ipt = p99(Proxy::Iptables, b)? - floor;
        met &= nb <= nft && nb.max(0.0) * 10.0 <= ipt;
        added.push((b, nb, nft, ipt));
    }
    Some(Goal {
        services: n,
        added_p99_us: added,
        met,
    })
}

/// Options of one run.
pub struct Options {
    /// Quick mode.
    pub quick: bool,
    /// Sizes.
    pub services: Vec<u32>,
    /// Connections per row.
    pub connections: u32,
    /// The agent binary.
    pub agent: PathBuf,
}

/// Runs every size; `progress` gets the report after each.
pub fn run(o: &Options, progress: &mut dyn FnMut(&Report) -> Result<()>) -> Result<Report> {
    let t0 = Instant::now();
    let run_tag = crate::cleanup::run_tag();
    let mut rep = Report {
        machine: crate::machine::probe(IptablesBackend::Nft),
        quick: o.quick,
        services: o.services.clone(),
        connections: o.connections,
        ..Default::default()
    };
    let clients = Cgroup::new(&format!("{run_tag}/ns-clients"))?;
    let plan = Plan {
        connections: o.connections,
        batch: if o.quick { 50 } else { 200 },
        warmup: if o.quick { 20 } else { 200 },
    };
    for &n in &o.services {
        if !(3..=MAX_SERVICES).contains(&n) {
            bail!("--services: {n} must be 3..={MAX_SERVICES}");
        }
        let w = Workload::new(n, 1)?;
        let r = size(&w, &run_tag, o, &clients.path, plan, &mut rep);
        if let Err(e) = r {
            rep.error = Some(format!("N={n}: {e:#}"));
            break;
        }
        progress(&rep)?;
    }
    rep.goal = o.services.iter().max().and_then(|&n| goal(&rep.rows, n));
    rep.machine.loadavg_end = crate::machine::loadavg();
    rep.duration_s = t0.elapsed().as_secs_f64();
    Ok(rep)
}

fn size(
    w: &Workload,
    run_tag: &str,
    o: &Options,
    clients: &Path,
    plan: Plan,
    rep: &mut Report,
) -> Result<()> {
    let tag = format!("{run_tag}-ns{}", w.n);
    eprintln!("north-south N={}: namespaces", w.n);
    let mut sites = Vec::new();
    for p in Proxy::ALL {
        sites.push(Site::new(&tag, p)?);
    }
    let mut agent = None;
    for site in &sites {
        match site.proxy {
            Proxy::Netboot => {
                let t = Instant::now();
                agent = Some(Agent::start(&o.agent, run_tag, site, w)?);
                rep.load_s
                    .insert(format!("{} netboot", w.n), t.elapsed().as_secs_f64());
            }
            Proxy::Iptables | Proxy::Nftables => {
                eprintln!("north-south N={}: loading {}", w.n, site.proxy.name());
                let took = load_rules(site, w, run_tag)?;
                rep.load_s
                    .insert(format!("{} {}", w.n, site.proxy.name()), took.as_secs_f64());
            }
            Proxy::Floor => {}
        }
    }
    eprintln!("north-south N={}: measuring", w.n);
    let rows = measure(w, &sites, clients, plan)?;
    rep.rows.extend(rows);
    if let (Some(a), Some(site)) = (
        agent.as_ref(),
        sites.iter().find(|s| s.proxy == Proxy::Netboot),
    ) {
        let repeat = if o.quick { 20_000 } else { 200_000 };
        let flows = if o.quick { 500 } else { 2000 };
        match crate::tc_cost::measure(&site.node, &a.pins.pins, w, repeat, flows) {
            Ok(c) => rep.tc_cost.extend(c),
            Err(e) => rep.error = Some(format!("N={} tc cost: {e:#}", w.n)),
        }
    }
    drop(agent);
    drop(sites);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_is_a_node_port_and_only_the_local_one_is_on_this_node() {
        let w = Workload::new(5, 1).expect("size");
        let (svcs, slices) = objects(&w);
        let spec = svcs[4].spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        let np = spec.ports.as_ref().expect("ports")[0].node_port;
        assert_eq!(np, Some(20004));
        let ep = |i: usize| slices[i].endpoints.as_ref().expect("endpoints")[0].clone();
        assert_eq!(ep(3).addresses, vec!["10.200.1.10".to_string()]);
        assert_eq!(ep(3).node_name.as_deref(), Some(NODE_NAME));
        assert_eq!(ep(4).addresses, vec!["10.200.2.10".to_string()]);
        assert_eq!(ep(4).node_name.as_deref(), Some("other-node"));
        assert_eq!(ep(0).addresses, vec!["10.128.0.1".to_string()]);
        let f = static_file(&w).expect("static");
        assert!(f.starts_with("kind: Node\n"), "{f}");
        assert_eq!(f.matches("\n---\n").count(), 10);
    }

    fn row(p: Proxy, b: Backend, p99: f64) -> RowResult {
        RowResult {
            services: 10,
            proxy: p,
            backend: b,
            target: String::new(),
            connect_us: Summary {
                p99,
                ..Default::default()
            },
            requests_per_s: 0.0,
            ok: 1,
            failed: 0,
            error: None,
        }
    }

    #[test]
    fn the_goal_needs_both_backends_below_nftables_and_ten_times_below_iptables() {
        let mut rows = Vec::new();
        for b in Backend::ALL {
            rows.push(row(Proxy::Floor, b, 50.0));
            rows.push(row(Proxy::Netboot, b, 52.0));
            rows.push(row(Proxy::Nftables, b, 55.0));
            rows.push(row(Proxy::Iptables, b, 100.0));
        }
        assert!(goal(&rows, 10).expect("goal").met);
        rows[5].connect_us.p99 = 60.0; // remote netboot above nftables
        assert!(!goal(&rows, 10).expect("goal").met);
        assert!(goal(&rows, 11).is_none());
    }
}
