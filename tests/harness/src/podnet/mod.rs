//! podnet: makes the pods that matter real on the local cluster.
//!
//! Watches Nodes, Pods, Services and EndpointSlices and, in one reconcile loop:
//! - builds the fabric and `nb-cp` netns with the userspace API proxy
//!   (172.18.0.2:6443 inside the pod world → 127.0.0.1:6443), and the
//!   external client's `nb-ext` (172.18.0.3, not a node: traffic from
//!   outside the cluster to node ports, external and LoadBalancer IPs);
//! - for `netboot.io/podnet: "true"` pods with a podIP: a netns, a cgroup and
//!   the container's command, supervised like a kubelet would;
//! - for coredns pods (`k8s-app: kube-dns`, also podnet-labelled): the real
//!   CoreDNS in the pod's netns ([`coredns`]) when podnet is given its binary;
//!   otherwise cluster DNS served from podnet itself ([`crate::dns`]);
//! - for agent pods (`app.kubernetes.io/name: netboot-datapath`): the real agent;
//! - for kube-proxy pods (`k8s-app: kube-proxy`): the real kube-proxy in the
//!   node netns ([`kube_proxy`]) when podnet is given its binary (tests/cluster/up
//!   does); otherwise kube-proxy's iptables rules from the emulation
//!   ([`crate::kubeproxy_rules`], applied with `iptables-nft-restore`).
//!
//! Node netns are created lazily, for nodes that host a realized pod or an agent.
//! On shutdown (and at start, for leftovers of a crash) everything is removed.

pub mod agent;
pub mod coredns;
pub mod egress;
pub mod kube_proxy;
pub mod kubelet;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::dns::{self, SharedZone};
use crate::kubeproxy_rules::{self, RuleOptions};
use crate::names::{self, labels, Layout};
use crate::netns::{self, NetError, Plumber};
use crate::{cgroup, process};
use kubelet::{PidBook, Runner};

/// podnet's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kubeconfig podnet and the agents use.
    pub kubeconfig: PathBuf,
    /// Cluster state dir; podnet keeps its files in `<state>/podnet`.
    pub state_dir: PathBuf,
    /// Directory with the workspace-built `netboot-probe` and `netboot-datapath`.
    pub bin_dir: PathBuf,
    /// Names and roots (the contract's by default).
    pub layout: Layout,
    /// The iptables-restore that writes kube-proxy's rules (nft backend).
    pub iptables_restore: String,
    /// kube-proxy's clusterCIDR.
    pub cluster_cidr: String,
    /// Where the API proxy forwards to.
    pub api_upstream: String,
    /// Only handle pods of this namespace (tests run a second podnet with
    /// their own [`Layout`]); `None` = every namespace.
    pub namespace: Option<String>,
    /// The real kube-proxy binary; `None` = the rule emulation.
    pub kube_proxy: Option<PathBuf>,
    /// The real CoreDNS binary; `None` = podnet's own DNS responder.
    pub coredns: Option<PathBuf>,
    /// The API server's egress proxy ([`egress`]): its Unix socket and the
    /// kubelet port (kwok's, on loopback). `None`: none (a second podnet).
    pub egress: Option<(PathBuf, u16)>,
}

impl Options {
    /// Options with the contract's defaults.
    pub fn new(kubeconfig: PathBuf, state_dir: PathBuf, bin_dir: PathBuf) -> Self {
        Self {
            kubeconfig,
            state_dir,
            bin_dir,
            layout: Layout::default(),
            iptables_restore: "iptables-nft-restore".into(),
            cluster_cidr: names::POD_CIDR.into(),
            api_upstream: format!("127.0.0.1:{}", names::API_PORT),
            namespace: None,
            kube_proxy: None,
            coredns: None,
            egress: None,
        }
    }

    fn dir(&self) -> PathBuf {
        self.state_dir.join("podnet")
    }
}

/// podnet's errors; messages name the object or path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Network namespace plumbing.
    #[error(transparent)]
    Net(#[from] NetError),
    /// cgroup handling.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// Kubernetes client setup.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Local files.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another podnet holds the lock.
    #[error("another podnet is running (lock {0} is held)")]
    Locked(PathBuf),
}

/// Builds a client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client, Error> {
    let boxed = |e: Box<dyn std::error::Error + Send + Sync>| Error::Kubeconfig {
        path: path.to_path_buf(),
        source: e,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| boxed(Box::new(e)))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| boxed(Box::new(e)))?;
    Client::try_from(cfg).map_err(|e| boxed(Box::new(e)))
}

/// Machine-wide lock per netns prefix: netns names are global, so one podnet
/// per layout (`/run/netboot-podnet-<prefix>lock`).
pub fn lock_path(layout: &Layout) -> PathBuf {
    PathBuf::from(format!("/run/netboot-podnet-{}lock", layout.netns_prefix))
}

struct Lock {
    _file: std::fs::File,
}

fn lock(layout: &Layout) -> Result<Lock, Error> {
    use std::os::fd::AsRawFd;
    let path = lock_path(layout);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            what: format!("open {}", path.display()),
            source,
        })?;
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::Locked(path));
    }
    Ok(Lock { _file: f })
}

/// A pod podnet made real.
struct RealPod {
    pod: String,
    node: String,
    netns: String,
    cgroup: PathBuf,
    runner: Option<Runner>,
    dns: Vec<JoinHandle<()>>,
}

/// An agent podnet runs; `stopping` once its pod went away.
struct AgentEntry {
    pod: String,
    runner: Runner,
    stopping: bool,
}

/// How long podnet waits before it retries a pod it could not realize.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// kube-proxy's rules as last written into a node netns.
struct Applied {
    /// The kube-proxy pod that "wrote" them.
    pod_uid: String,
    rules: String,
    at: std::time::Instant,
}

/// kube-proxy's `iptables.syncPeriod`: a running kube-proxy rewrites its
/// rules this often, so rules removed under it come back.
pub const KUBE_PROXY_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// A node netns podnet made, with the routes programmed in it.
struct RealNode {
    ip: Ipv4Addr,
    pod_cidr: Option<String>,
    /// Routes to the other nodes' pod CIDRs (both families).
    routes: BTreeMap<String, IpAddr>,
    /// Dual-stack: the node's IPv6 InternalIP and IPv6 podCIDR.
    ip6: Option<Ipv6Addr>,
    pod_cidr6: Option<String>,
    /// The API proxy on the node netns' 127.0.0.1:6443.
    _api_loopback: AbortOnDrop,
}

/// A task aborted when its owner goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Stores {
    nodes: Store<Node>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// Bumped on every Service/EndpointSlice event.
    svc_gen: Arc<AtomicU64>,
}

struct Controller {
    opts: Options,
    client: Client,
    plumber: Plumber,
    pids: PidBook,
    stores: Stores,
    cp_routes: BTreeMap<String, IpAddr>,
    nodes: BTreeMap<String, RealNode>,
    pods: HashMap<String, RealPod>,
    agents: HashMap<String, AgentEntry>,
    /// Real kube-proxies, by pod uid.
    proxies: HashMap<String, AgentEntry>,
    teardowns: Vec<JoinHandle<()>>,
    /// Pods that could not be realized, and when: retried after [`RETRY_AFTER`].
    failed: HashMap<String, std::time::Instant>,
    zone: SharedZone,
    svc_gen_seen: u64,
    rules: String,
    rules_applied: HashMap<String, Applied>,
    proxy: Option<JoinHandle<()>>,
}

fn has_label(pod: &Pod, (k, v): (&str, &str)) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(k))
        .map(String::as_str)
        == Some(v)
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// A node's InternalIP of one family (`A`: `Ipv4Addr` or `Ipv6Addr`; a
/// dual-stack node has one of each).
fn internal_ip<A: std::str::FromStr>(node: &Node) -> Option<A> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// A node's IPv6 podCIDR (`spec.podCIDRs`), if it has one.
fn pod_cidr6(node: &Node) -> Option<String> {
    node.spec
        .as_ref()?
        .pod_cidrs
        .as_ref()?
        .iter()
        .find(|c| c.contains(':'))
        .cloned()
}

/// Where cgroup2 is mounted on these machines.
pub const CGROUP2_MOUNT: &str = "/sys/fs/cgroup/unified";

/// Stops every process podnet recorded in `pids` that is still in one of its
/// cgroups, then removes every netns, /etc/netns dir and cgroup of the layout.
pub async fn cleanup(layout: &Layout, pids: &PidBook) {
    // The cgroup2 line of /proc/PID/cgroup is "0::<path below the cgroup2 mount>".
    let rel = layout
        .cgroup_root
        .strip_prefix(CGROUP2_MOUNT)
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_else(|_| layout.cgroup_root.display().to_string());
    let mut victims = Vec::new();
    for pid in pids.recorded() {
        let ours = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|c| {
                c.lines()
                    .filter_map(|l| l.strip_prefix("0::"))
                    .any(|p| p == rel || p.starts_with(&format!("{rel}/")))
            })
            .unwrap_or(false);
        if ours {
            process::signal_group(pid, libc::SIGTERM);
            victims.push(pid);
        } else {
            pids.remove(pid);
        }
    }
    for _ in 0..50 {
        if victims
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for pid in victims {
        if Path::new(&format!("/proc/{pid}")).exists() {
            warn!(pid, "still running after SIGTERM: SIGKILL");
            process::signal_group(pid, libc::SIGKILL);
        }
        pids.remove(pid);
    }
    let plumber = Plumber::new(layout.clone());
    for e in plumber.remove_all().await {
        warn!(error = %e, "cleanup");
    }
    if let Err(e) = cgroup::remove_tree(&layout.cgroup_root).await {
        warn!(error = %e, "cleanup");
    }
}

impl Controller {
    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.opts.dir().join("pods").join(format!(
            "{}_{}_{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or(""),
            pod.metadata.uid.as_deref().unwrap_or("")
        ))
    }

    async fn ensure_world(&mut self) -> Result<(), Error> {
        if self.proxy.as_ref().is_some_and(|p| !p.is_finished()) {
            return Ok(());
        }
        self.plumber.ensure_fabric().await?;
        self.plumber.ensure_cp().await?;
        self.plumber.ensure_ext_client().await?;
        let cp = self.opts.layout.cp_netns();
        let bind = format!("{}:{}", names::CP_IP, names::API_PORT);
        self.proxy = Some(api_proxy(&cp, bind, self.opts.api_upstream.clone())?);
        Ok(())
    }
}

/// Forwards TCP connections to `bind` inside `netns` to `upstream` (the API
/// server on the root netns' loopback).
fn api_proxy(netns: &str, bind: String, upstream: String) -> Result<JoinHandle<()>, Error> {
    let addr = bind.clone();
    let std_listener = netns::in_netns(netns, move || {
        let l = std::net::TcpListener::bind(&addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| Error::Io {
        what: format!("netns {netns}: API proxy listener"),
        source,
    })?;
    info!(%netns, "API proxy {bind} -> {upstream}");
    Ok(tokio::spawn(async move {
        loop {
            let (mut down, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "API proxy accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(&upstream).await {
                    Ok(mut up) => {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(e) => warn!(%peer, error = %e, "API proxy: connect {upstream}"),
                }
            });
        }
    }))
}

impl Controller {
    /// Creates the node netns and cgroup if needed.
    async fn ensure_node(&mut self, node: &str) -> Result<bool, Error> {
        if self.nodes.contains_key(node) {
            return Ok(true);
        }
        let Some(obj) = self.stores.nodes.get(&reflector::ObjectRef::new(node)) else {
            debug!(node, "Node not (yet) known");
            return Ok(false);
        };
        let Some(ip) = internal_ip(&obj) else {
            debug!(node, "Node has no InternalIP yet");
            return Ok(false);
        };
        let pod_cidr = obj.spec.as_ref().and_then(|s| s.pod_cidr.clone());
        let ip6 = internal_ip::<Ipv6Addr>(&obj);
        self.plumber.ensure_node(node, ip).await?;
        if let Some(ip6) = ip6 {
            self.plumber.add_node_ip6(node, ip6).await?;
        }
        // The node's own loopback serves the API as on a kubeadm
        // control-plane node (where the agent's `apiServer: 127.0.0.1:6443`
        // points): agents run in the node's netns, as hostNetwork pods do.
        let api_loopback = api_proxy(
            &self.opts.layout.node_netns(node),
            format!("127.0.0.1:{}", names::API_PORT),
            self.opts.api_upstream.clone(),
        )?;
        cgroup::ensure(&self.opts.layout.node_cgroup(node))?;
        info!(
            "netns {} created for node {node} ({ip}, podCIDR {})",
            self.opts.layout.node_netns(node),
            pod_cidr.as_deref().unwrap_or("none")
        );
        self.nodes.insert(
            node.to_string(),
            RealNode {
                ip,
                pod_cidr,
                routes: BTreeMap::new(),
                ip6,
                pod_cidr6: pod_cidr6(&obj),
                _api_loopback: AbortOnDrop(api_loopback),
            },
        );
        Ok(true)
    }

    /// Every node netns (and cp) routes each other realized node's podCIDR via its IP.
    async fn sync_routes(&mut self) {
        // podCIDRs can be assigned after the node netns exists.
        for (name, n) in self.nodes.iter_mut() {
            if n.pod_cidr.is_none() {
                n.pod_cidr = self
                    .stores
                    .nodes
                    .get(&reflector::ObjectRef::new(name))
                    .and_then(|o| o.spec.as_ref().and_then(|s| s.pod_cidr.clone()));
            }
            if n.ip6.is_some() && n.pod_cidr6.is_none() {
                n.pod_cidr6 = self
                    .stores
                    .nodes
                    .get(&reflector::ObjectRef::new(name))
                    .and_then(|o| pod_cidr6(&o));
            }
        }
        // Each node's pod CIDRs (one per family) via its address of that family.
        let all: Vec<(String, String, IpAddr)> = self
            .nodes
            .iter()
            .flat_map(|(k, n)| {
                let v4 = n.pod_cidr.clone().map(|c| (k.clone(), c, IpAddr::V4(n.ip)));
                let v6 =
                    (n.pod_cidr6.clone().zip(n.ip6)).map(|(c, ip)| (k.clone(), c, IpAddr::V6(ip)));
                v4.into_iter().chain(v6)
            })
            .collect();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let want: BTreeMap<String, IpAddr> = all
                .iter()
                .filter(|(k, _, _)| *k != name)
                .map(|(_, c, ip)| (c.clone(), *ip))
                .collect();
            let Some(n) = self.nodes.get_mut(&name) else {
                continue;
            };
            if n.routes == want {
                continue;
            }
            let ns = self.opts.layout.node_netns(&name);
            match self.plumber.sync_routes(&ns, &n.routes, &want).await {
                Ok(()) => {
                    info!(netns = %ns, "routes to {} other nodes' pod CIDRs", want.len());
                    n.routes = want;
                }
                Err(e) => warn!(error = %e, "routes"),
            }
        }
        // The control-plane netns: IPv4 only (the API proxy).
        let want: BTreeMap<String, IpAddr> = all
            .iter()
            .filter(|(_, _, ip)| ip.is_ipv4())
            .map(|(_, c, ip)| (c.clone(), *ip))
            .collect();
        if self.cp_routes != want {
            let ns = self.opts.layout.cp_netns();
            match self.plumber.sync_routes(&ns, &self.cp_routes, &want).await {
                Ok(()) => self.cp_routes = want,
                Err(e) => warn!(error = %e, "routes"),
            }
        }
    }

    async fn realize_pod(
        &mut self,
        pod: &Pod,
        node: &str,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> Result<(), Error> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = pod_key(pod);
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let netns = if host_network {
            self.opts.layout.node_netns(node)
        } else {
            let ns = self.plumber.add_pod(node, &uid, ip).await?;
            if let Some(ip6) = ip6 {
                self.plumber.add_pod_ip6(node, &uid, ip6).await?;
            }
            netns::write_resolv_conf(&ns, pod.metadata.namespace.as_deref().unwrap_or("default"))?;
            ns
        };
        let cg = self.opts.layout.pod_cgroup(node, &uid);
        cgroup::ensure(&cg)?;
        info!("netns {netns} created for {key} ({ip}) on {node}");
        let mut real = RealPod {
            pod: key.clone(),
            node: node.to_string(),
            netns: netns.clone(),
            cgroup: cg.clone(),
            runner: None,
            dns: Vec::new(),
        };
        if let (true, Some(binary)) = (has_label(pod, labels::KUBE_DNS), self.opts.coredns.clone())
        {
            let dir = self.pod_dir(pod);
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                what: format!("create {}", dir.display()),
                source,
            })?;
            match coredns::CorednsPod::from_pod(pod, &netns, &cg, &dir) {
                Ok(c) => {
                    let env = coredns::CorednsEnv {
                        binary,
                        ca: self.opts.state_dir.join("pki/ca.crt"),
                    };
                    info!("coredns for {key} starting in netns {netns} ({ip}:53)");
                    real.runner = Some(coredns::spawn(
                        c,
                        env,
                        self.client.clone(),
                        self.pids.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "no coredns started"),
            }
        } else if has_label(pod, labels::KUBE_DNS) {
            let zone = self.zone.clone();
            let sockets = netns::in_netns(&netns, || {
                let udp = std::net::UdpSocket::bind("0.0.0.0:53")?;
                udp.set_nonblocking(true)?;
                let tcp = std::net::TcpListener::bind("0.0.0.0:53")?;
                tcp.set_nonblocking(true)?;
                Ok((udp, tcp))
            });
            match sockets {
                Ok((udp, tcp)) => {
                    let io = |source| Error::Io {
                        what: format!("Pod/{key}: DNS sockets"),
                        source,
                    };
                    let udp = tokio::net::UdpSocket::from_std(udp).map_err(io)?;
                    let tcp = tokio::net::TcpListener::from_std(tcp).map_err(io)?;
                    real.dns
                        .push(tokio::spawn(dns::serve_udp(udp, zone.clone())));
                    real.dns.push(tokio::spawn(dns::serve_tcp(tcp, zone)));
                    info!("DNS for cluster.local served in netns {netns} for {key} ({ip}:53)");
                }
                Err(e) => warn!(error = %e, "Pod/{key}: DNS not served"),
            }
        } else {
            let dir = self.pod_dir(pod);
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                what: format!("create {}", dir.display()),
                source,
            })?;
            match kubelet::container_run(pod, &self.opts.bin_dir, Some(netns), cg, &dir) {
                Ok(run) => {
                    real.runner = Some(kubelet::spawn(run, self.client.clone(), self.pids.clone()));
                }
                Err(e) => warn!(error = %e, "no process started"),
            }
        }
        self.pods.insert(uid, real);
        Ok(())
    }

    /// Stops the pod's process and removes its netns and cgroup, in a task so
    /// a slow SIGTERM does not hold up the reconcile loop.
    fn teardown_pod(&mut self, uid: &str) {
        let Some(real) = self.pods.remove(uid) else {
            return;
        };
        let plumber = self.plumber.clone();
        let node_netns = self.opts.layout.node_netns(&real.node);
        let uid = uid.to_string();
        self.teardowns.retain(|t| !t.is_finished());
        self.teardowns.push(tokio::spawn(async move {
            if let Some(r) = real.runner {
                r.stop().await;
            }
            for t in real.dns {
                t.abort();
            }
            if real.netns != node_netns {
                if let Err(e) = plumber.remove_pod(&uid).await {
                    warn!(error = %e, "teardown");
                }
            }
            // Whatever still runs in the pod's cgroup was started for the pod.
            cgroup::kill(&real.cgroup);
            if let Err(e) = cgroup::remove_tree(&real.cgroup).await {
                warn!(error = %e, "teardown");
            }
            info!(
                "netns {} removed for {} on {}",
                real.netns, real.pod, real.node
            );
        }));
    }

    async fn sync_pods(&mut self, pods: &[Arc<Pod>]) {
        let mut want: HashMap<String, (Arc<Pod>, String, Ipv4Addr)> = HashMap::new();
        for pod in pods {
            // kubeadm's CoreDNS pods carry no podnet label: they are realized by theirs.
            let ours = has_label(pod, labels::PODNET) || has_label(pod, labels::KUBE_DNS);
            if !ours || deleting(pod) {
                continue;
            }
            // Ended pods are not run again (e.g. after a podnet restart).
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let (Some(uid), Some(node)) = (pod.metadata.uid.clone(), node_of(pod)) else {
                continue;
            };
            let Some(ip) = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            want.insert(uid, (pod.clone(), node.to_string(), ip));
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !want.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.teardown_pod(&uid);
        }
        for (uid, (pod, node, ip)) in want {
            if self.pods.contains_key(&uid)
                || self
                    .failed
                    .get(&uid)
                    .is_some_and(|t| t.elapsed() < RETRY_AFTER)
            {
                continue;
            }
            match self.ensure_node(&node).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "node {node}");
                    continue;
                }
            }
            // Dual-stack: the pod's IPv6 address (kwok gives one per podCIDR).
            let ip6 = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ips.as_ref())
                .and_then(|ips| ips.iter().find_map(|p| p.ip.parse::<Ipv6Addr>().ok()));
            if let Err(e) = self.realize_pod(&pod, &node, ip, ip6).await {
                warn!(error = %e, "Pod/{}: not realized", pod_key(&pod));
                // Undo what was made, and do not retry in a tight loop.
                let _ = self.plumber.remove_pod(&uid).await;
                self.failed.insert(uid, std::time::Instant::now());
            }
        }
        self.failed
            .retain(|uid, _| pods.iter().any(|p| p.metadata.uid.as_deref() == Some(uid)));
    }

    async fn sync_agents(&mut self, pods: &[Arc<Pod>]) {
        let mut want: HashMap<String, Arc<Pod>> = HashMap::new();
        let mut deleting_pods = Vec::new();
        for pod in pods {
            if !has_label(pod, labels::AGENT) || node_of(pod).is_none() {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if deleting(pod) {
                deleting_pods.push(pod.clone());
            } else {
                want.insert(uid, pod.clone());
            }
        }
        let gone: Vec<String> = self
            .agents
            .keys()
            .filter(|u| !want.contains_key(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(a) = self.agents.get_mut(&uid) {
                if !a.stopping {
                    info!("agent for {} stopping (pod deleted)", a.pod);
                    a.runner.signal_stop();
                    a.stopping = true;
                }
            }
        }
        self.agents
            .retain(|_, a| !(a.stopping && a.runner.finished()));
        // Pods being deleted whose agent has stopped: finish the deletion like a kubelet.
        for pod in deleting_pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if self.agents.contains_key(&uid) {
                continue;
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let mut dp = DeleteParams::default().grace_period(0);
            dp.preconditions = Some(kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            });
            match api.delete(&name, &dp).await {
                Ok(_) => debug!("Pod/{ns}/{name}: deleted after its agent stopped"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => warn!(error = %e, "Pod/{ns}/{name}: delete"),
            }
        }
        let env = agent::AgentEnv {
            bin_dir: self.opts.bin_dir.clone(),
            kubeconfig: self.opts.kubeconfig.clone(),
            dir: self.opts.dir().join("agents"),
            layout: self.opts.layout.clone(),
        };
        for (uid, pod) in want {
            if self.agents.contains_key(&uid)
                || self
                    .failed
                    .get(&uid)
                    .is_some_and(|t| t.elapsed() < RETRY_AFTER)
            {
                continue;
            }
            let Some(node) = node_of(&pod).map(str::to_string) else {
                continue;
            };
            match self.ensure_node(&node).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "node {node}");
                    continue;
                }
            }
            let node_ip = self
                .nodes
                .get(&node)
                .map(|n| n.ip.to_string())
                .unwrap_or_default();
            match agent::AgentPod::from_pod(&pod, &node, &node_ip) {
                Ok(a) => {
                    info!(
                        "agent for {} starting on {node} (cgroup {})",
                        pod_key(&pod),
                        self.opts.layout.node_cgroup(&node).display()
                    );
                    let r = agent::spawn(a, env.clone(), self.client.clone(), self.pids.clone());
                    self.agents.insert(
                        uid,
                        AgentEntry {
                            pod: pod_key(&pod),
                            runner: r,
                            stopping: false,
                        },
                    );
                }
                Err(e) => {
                    warn!(error = %e, "agent not started");
                    self.failed.insert(uid, std::time::Instant::now());
                }
            }
        }
    }

    async fn sync_services(&mut self, pods: &[Arc<Pod>]) {
        let gen = self.stores.svc_gen.load(Ordering::SeqCst);
        if gen != self.svc_gen_seen {
            self.svc_gen_seen = gen;
            let services: Vec<Service> = self
                .stores
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect();
            let slices: Vec<EndpointSlice> = self
                .stores
                .slices
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect();
            self.zone.set(dns::zone(&services, &slices));
            self.rules = kubeproxy_rules::render(
                &services,
                &slices,
                &RuleOptions {
                    cluster_cidr: Some(self.opts.cluster_cidr.clone()),
                    ..RuleOptions::default()
                },
            );
        }
        if self.opts.kube_proxy.is_some() {
            self.sync_kube_proxies(pods).await;
            return;
        }
        // Nodes with a live kube-proxy pod whose netns exists get the rules,
        // rewritten like kube-proxy does: on change, when a new kube-proxy pod
        // starts, and every sync period. A deleted kube-proxy leaves them.
        let kp_nodes: BTreeMap<String, String> = pods
            .iter()
            .filter(|p| has_label(p, labels::KUBE_PROXY) && !deleting(p))
            .filter_map(|p| {
                let node = node_of(p)?.to_string();
                Some((node, p.metadata.uid.clone()?))
            })
            .filter(|(n, _)| self.nodes.contains_key(n))
            .collect();
        for (node, pod_uid) in kp_nodes {
            if let Some(a) = self.rules_applied.get(&node) {
                if a.rules == self.rules
                    && a.pod_uid == pod_uid
                    && a.at.elapsed() < KUBE_PROXY_SYNC_PERIOD
                {
                    continue;
                }
            }
            let ns = self.opts.layout.node_netns(&node);
            let r = netns::run_in(&ns, &self.opts.iptables_restore, &[], Some(&self.rules)).await;
            match r {
                Ok(()) => {
                    let changed = self
                        .rules_applied
                        .get(&node)
                        .is_none_or(|a| a.rules != self.rules);
                    if changed {
                        info!(netns = %ns, "kube-proxy rules written for node {node} ({} lines)", self.rules.lines().count());
                    } else {
                        debug!(netns = %ns, "kube-proxy rules resynced for node {node}");
                    }
                    self.rules_applied.insert(
                        node,
                        Applied {
                            pod_uid,
                            rules: self.rules.clone(),
                            at: std::time::Instant::now(),
                        },
                    );
                }
                Err(e) => warn!(error = %e, "kube-proxy rules for node {node}"),
            }
        }
    }

    /// The real kube-proxy for each live kube-proxy pod on a node podnet
    /// realized (whose netns exists), stopped when its pod goes away.
    async fn sync_kube_proxies(&mut self, pods: &[Arc<Pod>]) {
        let Some(binary) = self.opts.kube_proxy.clone() else {
            return;
        };
        let want: HashMap<String, Arc<Pod>> = pods
            .iter()
            .filter(|p| has_label(p, labels::KUBE_PROXY) && !deleting(p))
            .filter(|p| node_of(p).is_some_and(|n| self.nodes.contains_key(n)))
            .filter_map(|p| Some((p.metadata.uid.clone()?, p.clone())))
            .collect();
        for (uid, e) in self.proxies.iter_mut() {
            if !want.contains_key(uid) && !e.stopping {
                info!("kube-proxy for {} stopping (pod deleted)", e.pod);
                e.runner.signal_stop();
                e.stopping = true;
            }
        }
        self.proxies
            .retain(|_, e| !(e.stopping && e.runner.finished()));
        let env = kube_proxy::ProxyEnv {
            binary,
            ca: self.opts.state_dir.join("pki/ca.crt"),
            dir: self.opts.dir().join("kube-proxy"),
            layout: self.opts.layout.clone(),
        };
        for (uid, pod) in want {
            if self.proxies.contains_key(&uid)
                || self
                    .failed
                    .get(&uid)
                    .is_some_and(|t| t.elapsed() < RETRY_AFTER)
            {
                continue;
            }
            let Some(node) = node_of(&pod).map(str::to_string) else {
                continue;
            };
            match kube_proxy::ProxyPod::from_pod(&pod, &node) {
                Ok(p) => {
                    info!(
                        "kube-proxy for {} starting in netns {}",
                        pod_key(&pod),
                        self.opts.layout.node_netns(&node)
                    );
                    let r =
                        kube_proxy::spawn(p, env.clone(), self.client.clone(), self.pids.clone());
                    self.proxies.insert(
                        uid,
                        AgentEntry {
                            pod: pod_key(&pod),
                            runner: r,
                            stopping: false,
                        },
                    );
                }
                Err(e) => {
                    warn!(error = %e, "kube-proxy not started");
                    self.failed.insert(uid, std::time::Instant::now());
                }
            }
        }
    }

    async fn reconcile(&mut self) {
        if let Err(e) = self.ensure_world().await {
            warn!(error = %e, "fabric / API proxy");
            return;
        }
        let mut pods = self.stores.pods.state();
        let prefix = self.opts.layout.netns_prefix.as_str();
        pods.retain(|p| names::podnet_owner(p.metadata.annotations.as_ref()) == prefix);
        if let Some(ns) = &self.opts.namespace {
            pods.retain(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()));
        }
        self.sync_pods(&pods).await;
        self.sync_agents(&pods).await;
        self.sync_routes().await;
        self.sync_services(&pods).await;
    }

    async fn shutdown(mut self) {
        info!(
            "shutting down: stopping {} pods and {} agents",
            self.pods.len(),
            self.agents.len()
        );
        let mut stops = Vec::new();
        for (_, a) in self.agents.drain().chain(self.proxies.drain()) {
            a.runner.signal_stop();
            stops.push(a.runner);
        }
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in &uids {
            if let Some(r) = self.pods.get_mut(uid).and_then(|p| p.runner.take()) {
                r.signal_stop();
                stops.push(r);
            }
        }
        futures::future::join_all(stops.into_iter().map(Runner::stop)).await;
        for uid in uids {
            self.teardown_pod(&uid);
        }
        futures::future::join_all(self.teardowns.drain(..)).await;
        if let Some(p) = self.proxy.take() {
            p.abort();
        }
        cleanup(&self.opts.layout, &self.pids).await;
        info!("shutdown complete: netns, veths and cgroups removed");
    }
}

fn watch_into<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    notify: Arc<Notify>,
    gen: Option<Arc<AtomicU64>>,
) -> JoinHandle<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if let Some(g) = &gen {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                    notify.notify_one();
                }
                Err(e) => warn!(error = %e, "watch {}", K::kind(&())),
            }
        }
    })
}

/// Runs podnet until `shutdown` resolves, then removes everything it made.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let _lock = lock(&opts.layout)?;
    let layout = opts.layout.clone();
    let dir = opts.dir();
    let pids = PidBook::new(dir.join("pids")).map_err(|source| Error::Io {
        what: format!("create {}", dir.join("pids").display()),
        source,
    })?;
    info!("cleaning leftovers of an earlier podnet");
    cleanup(&opts.layout, &pids).await;
    let client = client_from(&opts.kubeconfig).await?;

    let notify = Arc::new(Notify::new());
    let svc_gen = Arc::new(AtomicU64::new(1));
    let (nodes, nw) = reflector::store::<Node>();
    let (pods, pw) = reflector::store::<Pod>();
    let (services, sw) = reflector::store::<Service>();
    let (slices, ew) = reflector::store::<EndpointSlice>();
    let watchers = vec![
        watch_into(Api::<Node>::all(client.clone()), nw, notify.clone(), None),
        watch_into(Api::<Pod>::all(client.clone()), pw, notify.clone(), None),
        watch_into(
            Api::<Service>::all(client.clone()),
            sw,
            notify.clone(),
            Some(svc_gen.clone()),
        ),
        watch_into(
            Api::<EndpointSlice>::all(client.clone()),
            ew,
            notify.clone(),
            Some(svc_gen.clone()),
        ),
    ];
    let egress = match &opts.egress {
        Some((socket, port)) => Some(egress::spawn(socket.clone(), *port, nodes.clone())?),
        None => None,
    };
    let mut ctl = Controller {
        plumber: Plumber::new(opts.layout.clone()),
        opts,
        client,
        pids,
        stores: Stores {
            nodes,
            pods,
            services,
            slices,
            svc_gen,
        },
        cp_routes: BTreeMap::new(),
        nodes: BTreeMap::new(),
        pods: HashMap::new(),
        agents: HashMap::new(),
        proxies: HashMap::new(),
        teardowns: Vec::new(),
        failed: HashMap::new(),
        zone: SharedZone::default(),
        svc_gen_seen: 0,
        rules: String::new(),
        rules_applied: HashMap::new(),
        proxy: None,
    };

    futures::pin_mut!(shutdown);
    let ready = async {
        let _ = ctl.stores.nodes.wait_until_ready().await;
        let _ = ctl.stores.pods.wait_until_ready().await;
        let _ = ctl.stores.services.wait_until_ready().await;
        let _ = ctl.stores.slices.wait_until_ready().await;
    };
    let mut stopped = false;
    tokio::select! {
        _ = ready => info!("watches synced"),
        _ = &mut shutdown => stopped = true,
    }
    if !stopped {
        loop {
            ctl.reconcile().await;
            tokio::select! {
                _ = notify.notified() => {
                    // Coalesce bursts of events.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Agents that are stopping are checked every second.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = &mut shutdown => break,
            }
        }
    }
    for w in watchers {
        w.abort();
    }
    if let Some(e) = egress {
        e.abort();
        if let Some((socket, _)) = &ctl.opts.egress {
            let _ = std::fs::remove_file(socket);
        }
    }
    ctl.shutdown().await;
    // Nothing of this podnet is left; its lock file goes too (still held
    // until exit, so no second podnet can slip in meanwhile).
    let _ = std::fs::remove_file(lock_path(&layout));
    Ok(())
}
