//! The agent: load and attach the datapath, watch the API, reconcile the
//! maps, hand the node over from kube-proxy, annotate the Node, and serve
//! status. Everything the binary's `agent` subcommand does, as a library call.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::config::Config;
use crate::desired;
use crate::devices;
use crate::handover::{self, RulesNetns};
use crate::healthcheck::{self, HealthServers};
use crate::http::{self, StatusSource};
use crate::kube_proxy::{self, KubeProxyState, KubeProxyWatch};
use crate::loader;
use crate::maps::kernel::KernelMaps;
use crate::maps::MapsError;
use crate::pass::{PassKind, PassReport, Passes};
use crate::pins::Pins;
use crate::reconcile::{ReconcileError, Reconciler};
use crate::sock_term::{self, SockTerm};
use crate::status::{
    now_unix, Counter, LinkStatus, Status, UnservedService, DATAPATH_VERSION, UNSERVED_LISTED,
};
use crate::watch::{self, WatchError, Watched};

/// Node annotation: the features this agent serves (`clusterip,ipv4,tcp,…`),
/// read by `netboot apply`'s "nothing unserved" gate.
pub use netboot_contract::features::FEATURES_ANNOTATION as ANN_FEATURES;
use netboot_contract::node::KubeProxyMode;
pub use netboot_contract::node::KubeProxyRules;
/// Node annotation: datapath version.
pub use netboot_contract::node::DATAPATH_VERSION as ANN_VERSION;
/// Node annotation: kube-proxy's mode(s) found on the node.
pub use netboot_contract::node::KUBE_PROXY_MODE as ANN_MODE;
/// Node annotation: replace mode and ready (the contract's).
pub use netboot_contract::node::KUBE_PROXY_REPLACEMENT as ANN_KPR;
/// Node annotation: kube-proxy rules [`KubeProxyRules`] in the rules netns.
pub use netboot_contract::node::KUBE_PROXY_RULES as ANN_RULES;
/// Node annotation: why the rules are `unknown` (or why kube-proxy chains
/// are kept); removed when there is nothing to say.
pub use netboot_contract::node::KUBE_PROXY_RULES_REASON as ANN_RULES_REASON;
use std::collections::{BTreeMap, BTreeSet};

/// What one rules pass found: kube-proxy's rules present or not (and why
/// some are kept), or the error that stopped the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesCheck {
    /// The check ran.
    Checked {
        /// Anything of kube-proxy's left.
        present: bool,
        /// kube-proxy chains kept because other rules use them.
        retained: Vec<String>,
        /// kube-proxy's modes whose state is on the node.
        modes: BTreeSet<KubeProxyMode>,
    },
    /// It could not run.
    Failed {
        /// [`handover::HandoverError::is_capability`]: it cannot run on this node at all.
        capability: bool,
        /// The error, with its causes.
        error: String,
    },
}

/// What the agent reports on its Node after a rules pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    /// `netboot.io/kube-proxy-replacement`.
    pub kpr: bool,
    /// `netboot.io/kube-proxy-rules`.
    pub rules: KubeProxyRules,
    /// `netboot.io/kube-proxy-rules-reason` (None = removed).
    pub reason: Option<String>,
    /// `netboot.io/kube-proxy-mode`: what the rules pass found (None: unknown).
    pub modes: Option<BTreeSet<KubeProxyMode>>,
    /// The cleanup this node needs cannot run: KubeProxyReplacement is held
    /// at false so the handover never starts (kube-proxy is never touched).
    pub blocked: bool,
}

/// The Node report: KubeProxyReplacement=true only in replace mode once
/// ready, and — when this agent is to clean kube-proxy's rules — only while
/// the cleanup can run here (capabilities, programs, trustworthy output), so
/// the bootstrapper's first gate stays shut before kube-proxy is touched.
pub fn node_report(replace: bool, ready: bool, cleanup: bool, check: &RulesCheck) -> NodeReport {
    match check {
        RulesCheck::Checked {
            present,
            retained,
            modes,
        } => NodeReport {
            kpr: replace && ready,
            rules: if *present {
                KubeProxyRules::Present
            } else {
                KubeProxyRules::Absent
            },
            reason: (!retained.is_empty()).then(|| {
                format!(
                    "kube-proxy chains kept, other rules use them: {}",
                    retained.join("; ")
                )
            }),
            modes: Some(modes.clone()),
            blocked: false,
        },
        RulesCheck::Failed { capability, error } => {
            let blocked = replace && cleanup && *capability;
            NodeReport {
                kpr: replace && ready && !blocked,
                rules: KubeProxyRules::Unknown,
                reason: Some(error.clone()),
                modes: None,
                blocked,
            }
        }
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Loading or attaching the programs.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// Opening the maps.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Reading the maps back.
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// The API client.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// The status endpoint.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// The static source.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// No cgroup2 mount found.
    #[error("no cgroup2 mount found in /proc/self/mountinfo; pass --cgroup")]
    NoCgroup2,
}

/// Resolved agent settings (flags + config.yaml).
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// config.yaml.
    pub config: Config,
    /// The Node served.
    pub node_name: String,
    /// Cgroup the socket LB attaches to.
    pub cgroup: PathBuf,
    /// Pin layout.
    pub pins: Pins,
    /// Namespace whose kube-proxy rules are handled (None: own).
    pub rules_netns: Option<PathBuf>,
    /// Credentials (None: in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Health listener (`/healthz`, `/readyz`, `/metrics`, `/v1/status`); loopback by default.
    pub listen: String,
    /// Metrics listener (`/metrics` only), for Prometheus; None: none.
    pub metrics_listen: Option<String>,
    /// Serve these objects instead of watching the API (tests, API-less nodes).
    pub static_services: Option<PathBuf>,
    /// How often node handover/annotation is re-checked.
    pub node_interval: Duration,
    /// With `static_services` (no API to watch): treat kube-proxy as
    /// installed, so its rules are never removed. Ignored when watching.
    pub kube_proxy_present: bool,
    /// `--nodeport-devices`: the per-packet path's interfaces, overriding
    /// config.yaml's `nodePortDevices` (None: the config's, else the
    /// interfaces carrying the Node's addresses).
    pub nodeport_devices: Option<Vec<String>>,
}

/// What the agent keeps for traffic from outside the node: the per-packet
/// path's devices, the healthCheckNodePort listeners, the Maglev tables.
struct NorthSouth {
    np: NodePortCtl,
    hc: HealthServers,
    mg: Option<crate::maglev::Tables>,
    /// `loadBalancerSourceRanges` of the LB IP frontends (`nb_lb4_src_range`).
    sr: Option<crate::srcrange::SourceRanges>,
}

/// Attaches the per-packet path to the interfaces [`devices::choose`]
/// picks, again whenever the choice changes (the Node's addresses or the
/// interfaces), and says what the agent serves accordingly.
struct NodePortCtl {
    pins: Pins,
    sizes: crate::config::MapSizes,
    configured: Option<Vec<String>>,
    applied: Option<devices::Choice>,
    /// The install's object, for the first attach (then dropped).
    loaded: Option<loader::Loaded>,
}

impl NodePortCtl {
    fn sync(&mut self, watched: &Watched, state: &AgentState) {
        let ifaddrs = match devices::interfaces() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading the interfaces' addresses failed");
                return;
            }
        };
        let choice = devices::choose(
            &ifaddrs,
            &watched.node_addresses(),
            self.configured.as_deref(),
        );
        if self.applied.as_ref() == Some(&choice) {
            return;
        }
        let loaded = self.loaded.take();
        let res = tokio::task::block_in_place(|| {
            loader::install_nodeport_with(loaded, &self.pins, &self.sizes, &choice.devices)
        });
        let (summary, attached) = match res {
            Ok(links) => {
                if choice.devices.is_empty() {
                    tracing::warn!(reason = %choice.problems.join("; "), "per-packet path attached nowhere: NodePorts, externalIPs and LB IPs are NOT served to traffic from outside the node");
                } else {
                    tracing::info!(devices = %choice.summary(), ?links, "per-packet path attached");
                }
                self.applied = Some(choice.clone());
                (choice.summary(), !choice.devices.is_empty())
            }
            Err(e) => {
                let error = netboot_contract::errors::chain(&e);
                tracing::warn!(error = %error, devices = %choice.summary(), "attaching the per-packet path failed, retrying after the next pass");
                state.update(|s| s.last_error = error.clone());
                self.applied = None;
                (format!("none: attach failed: {error}"), false)
            }
        };
        watched.startup.mark(|s| &mut s.per_packet_ms);
        let served = desired::served_with(attached);
        watched.set_served(served.clone());
        state.update(|s| {
            s.nodeport_devices = summary;
            s.features = served.iter().map(|f| f.name().to_string()).collect();
        });
        // The Node's features annotation follows.
        state.ready_changed.notify_one();
    }
}

/// First cgroup2 mount point in `/proc/self/mountinfo`.
pub fn default_cgroup() -> Result<PathBuf, AgentError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|_| AgentError::NoCgroup2)?;
    for line in text.lines() {
        // ... mountpoint(4) ... " - " fstype source opts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp.replace("\\040", " ")));
            }
        }
    }
    Err(AgentError::NoCgroup2)
}

/// Shared between the loops and the HTTP server.
pub struct AgentState {
    status: Mutex<Status>,
    maps: Mutex<Option<KernelMaps>>,
    pins: Pins,
    /// Woken when readiness changes, and at the initial sync.
    pub ready_changed: Notify,
    /// Whether kube-proxy's DaemonSet exists (woken on change).
    pub kube_proxy: Arc<KubeProxyWatch>,
    /// Replace mode.
    replace: bool,
    /// cleanupKubeProxyRules.
    cleanup: bool,
    /// Flow events (`/v1/flows`); None until the watchers exist.
    flows: Mutex<Option<Arc<crate::flows::FlowHub>>>,
    /// config.yaml `serviceMetrics`: per-Service counters on /metrics.
    service_metrics: bool,
    /// Service id → (frontend name `ns/name:port`, frontend address), as of
    /// the last pass that wrote the maps (only with `service_metrics`).
    svc_labels: Mutex<Arc<BTreeMap<u32, (String, String)>>>,
    /// The steps of this start ([`crate::startup`]), shared with the watchers.
    startup: Arc<crate::startup::Timeline>,
}

impl AgentState {
    fn has_svc_labels(&self) -> bool {
        self.svc_labels.lock().is_ok_and(|l| !l.is_empty())
    }
    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
    fn get(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl AgentState {
    /// The per-Service counters of the programmed frontends, labelled
    /// (entries of ids no frontend has, a freed id's late counts, are left out).
    fn service_stats(&self) -> Vec<crate::status::ServiceStatsRow> {
        let labels = self
            .svc_labels
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let Ok(m) = self.maps.lock() else {
            return Vec::new();
        };
        let Some(stats) = m.as_ref().and_then(|m| m.svc_stats().ok()) else {
            return Vec::new();
        };
        stats
            .into_iter()
            .filter_map(|(id, st)| {
                let (name, fe) = labels.get(&id)?;
                Some(crate::status::ServiceStatsRow::new(name, fe.clone(), st))
            })
            .collect()
    }
}

impl StatusSource for AgentState {
    fn readiness(&self) -> (hyper::StatusCode, String) {
        match self.status.lock() {
            Ok(s) => crate::http::readyz(&s),
            Err(_) => crate::http::readyz(&Status::default()),
        }
    }

    fn status(&self) -> Status {
        let mut s = self.get();
        s.startup = self.startup.get();
        s.kube_proxy = self.kube_proxy.get().0;
        s.kube_proxy_cleanup =
            kube_proxy::decide(self.replace, self.cleanup, s.ready, s.kube_proxy);
        if let Ok(m) = self.maps.lock() {
            if let Some(c) = m.as_ref().and_then(|m| m.counters().ok()) {
                s.counters =
                    c.0.iter()
                        .map(|(n, v)| Counter {
                            name: (*n).to_string(),
                            value: *v,
                        })
                        .collect();
            }
        }
        if self.service_metrics {
            s.service_stats = self.service_stats();
        }
        if let Some(hub) = self.flows.lock().ok().and_then(|f| f.clone()) {
            s.flow_events = hub.stats().ok();
        }
        let s = s.with_conditions();
        let mut s = s;
        s.links = loader::attach_state(&self.pins)
            .links
            .into_iter()
            .map(|(point, link_id, prog_id, cgroup_id)| LinkStatus {
                point,
                link_id,
                prog_id,
                cgroup_id,
            })
            .collect();
        s
    }
}

/// Runs the agent until SIGINT/SIGTERM. The datapath (pinned maps and links)
/// stays in place when the agent exits.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let cfg = opts.config.clone();
    let replace = cfg.kube_proxy_replacement;
    let watched = Arc::new(Watched::default());
    let mut tasks = Vec::new();
    // Watching: the first pass waits for the Node's zone (zone hints).
    watched.set_node(&opts.node_name, opts.static_services.is_none());
    // The lists begin before the datapath is installed: they wait on the
    // API server, the install on the kernel's verifier, and a cold start
    // needs both (`netboot-bench coldstart-api`). The stores only fill;
    // the first pass runs once the datapath is in.
    let client = match &opts.static_services {
        Some(_) => None,
        None => {
            let c = crate::client::build(opts.kubeconfig.as_deref(), &cfg.api_url()).await?;
            tasks.extend(watch::spawn(c.clone(), watched.clone()));
            tasks.push(watch::spawn_node(
                c.clone(),
                watched.clone(),
                opts.node_name.clone(),
            ));
            Some(c)
        }
    };
    // hostNamespaceOnly is set only once the pod interfaces carry their
    // programs (pod_ifaces.rs): until then pods are socket-balanced.
    let (report, loaded) = loader::install_keeping(
        &opts.pins,
        &opts.cgroup,
        &cfg.map_sizes,
        loader::DatapathMode {
            replace,
            host_namespace_only: false,
        },
    )?;
    for c in &report.size_changes {
        tracing::error!(
            map = %c.map,
            pinned = c.pinned,
            configured = c.configured,
            "mapSizes change refused: {c}: the entries in use do not fit the new size; the pinned map keeps its size and contents"
        );
    }
    for m in &report.maps_reset {
        tracing::warn!(map = %m, "the pinned map's layout differs from this build's: rebuilt empty (tracked north-south flows start over; counters restart)");
    }
    if let Some(r) = &report.recovered {
        tracing::warn!("{r}");
    }
    let layout_upgrade = report
        .upgrade
        .as_ref()
        .map(|u| u.describe())
        .unwrap_or_default();
    if !layout_upgrade.is_empty() {
        tracing::info!(upgrade = ?report.upgrade, "{layout_upgrade}");
    }
    tracing::info!(links = ?report.links, maps_reused = report.maps_reused, replace, "datapath installed");
    watched.startup.mark(|s| &mut s.datapath_installed_ms);
    crate::conntrack::set_timeouts(&opts.pins, &cfg.conntrack)?;
    let mut recon = Reconciler::recover(KernelMaps::open(&opts.pins)?)?;
    let mut term = Term::Later(opts.pins.clone());
    let prog = recon.programmed();
    tracing::info!(
        services = prog.services,
        backends = prog.backends,
        "programmed state read back from the maps"
    );

    // Without an API (static Services) nothing tells whether kube-proxy runs:
    // absent unless the caller says otherwise. Watching: unknown until listed.
    let kube_proxy_initial = match (&opts.static_services, opts.kube_proxy_present) {
        (None, _) => KubeProxyState::Unknown,
        (Some(_), true) => KubeProxyState::Installed,
        (Some(_), false) => KubeProxyState::Absent,
    };
    let state = Arc::new(AgentState {
        status: Mutex::new(Status {
            node: opts.node_name.clone(),
            kube_proxy_replacement: replace,
            datapath_version: DATAPATH_VERSION.into(),
            cgroup: opts.cgroup.display().to_string(),
            bpffs: opts.pins.root().display().to_string(),
            api_endpoint: if opts.static_services.is_some() {
                String::new()
            } else {
                cfg.api_url()
            },
            services: prog.services,
            backends: prog.backends,
            kube_proxy_rules: KubeProxyRules::Unknown.to_string(),
            kube_proxy_daemon_set: if opts.static_services.is_some() {
                String::new() // nothing watched: --kube-proxy-present decides
            } else {
                cfg.kube_proxy.to_string()
            },
            maps_reused: report.maps_reused,
            layout_upgrade,
            map_size_changes: report.size_changes.clone(),
            features: desired::SERVED
                .iter()
                .map(|f| f.name().to_string())
                .collect(),
            socket_termination: crate::status::SOCKET_TERMINATION_PENDING.into(),
            ..Default::default()
        }),
        maps: Mutex::new(KernelMaps::open(&opts.pins).ok()),
        pins: opts.pins.clone(),
        ready_changed: Notify::new(),
        kube_proxy: Arc::new(KubeProxyWatch::new(
            cfg.kube_proxy.clone(),
            kube_proxy_initial,
        )),
        replace,
        cleanup: cfg.cleanup_kube_proxy_rules,
        flows: Mutex::new(None),
        service_metrics: cfg.service_metrics,
        svc_labels: Mutex::new(Arc::new(BTreeMap::new())),
        startup: watched.startup.clone(),
    });
    term.start(&state);
    let flows = {
        let w = watched.clone();
        crate::flows::FlowHub::with_client_pods(
            opts.pins.clone(),
            crate::flows::FlowOptions::default(),
            Arc::new(move || w.flow_names()),
            Some(opts.cgroup.clone()),
        )
    };
    // A previous agent may have died with a watcher attached.
    if let Err(e) = crate::flows::set_enabled(&opts.pins, false, 0) {
        tracing::warn!(error = %e, "flow events unavailable");
    } else if let Ok(mut f) = state.flows.lock() {
        *f = Some(flows.clone());
    }
    let flows = state.flows.lock().ok().and_then(|f| f.clone());

    let (listener, addr) = http::bind(&opts.listen).await?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics /v1/status /v1/flows");
    let mut servers = vec![tokio::spawn(http::serve_with_flows(
        listener,
        state.clone(),
        http::Routes::All,
        http::Limits::default(),
        flows,
    ))];
    if let Some(m) = opts.metrics_listen.as_deref().filter(|m| !m.is_empty()) {
        let (listener, addr) = http::bind(m).await?;
        tracing::info!(%addr, "serving /metrics");
        servers.push(tokio::spawn(http::serve(
            listener,
            state.clone(),
            http::Routes::MetricsOnly,
            http::Limits::default(),
        )));
    }

    if let Some(p) = &opts.static_services {
        watched.load_static(p)?;
    }
    if let Some(c) = &client {
        tasks.push(kube_proxy::spawn(
            c.clone(),
            state.kube_proxy.clone(),
            watched.clone(),
        ));
    }
    tasks.push(tokio::spawn(conntrack_loop(state.clone())));
    spawn_pod_ifaces(
        crate::pod_ifaces::PodIfaces::new(
            opts.pins.clone(),
            cfg.map_sizes,
            cfg.socket_lb.clone(),
            replace,
        ),
        state.clone(),
    );
    tasks.push(tokio::spawn(node_loop(
        client,
        state.clone(),
        watched.clone(),
        opts.clone(),
    )));

    let np = NodePortCtl {
        pins: opts.pins.clone(),
        sizes: cfg.map_sizes,
        loaded,
        configured: opts
            .nodeport_devices
            .clone()
            .or_else(|| cfg.node_port_devices.clone()),
        applied: None,
    };
    let lb = cfg.load_balancing;
    let mg = match crate::maglev::Tables::open(
        &opts.pins,
        lb.maglev_table_size,
        lb.algorithm == crate::config::Algorithm::Maglev,
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "Maglev tables unavailable: the per-packet path picks random backends");
            None
        }
    };
    let sr = match crate::srcrange::SourceRanges::open(&opts.pins) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "loadBalancerSourceRanges unavailable: LB IPs with source ranges drop every flow from outside");
            None
        }
    };
    let st = state.clone();
    let hc = HealthServers::new(Arc::new(move || st.get().ready));
    let mut ns = NorthSouth { np, hc, mg, sr };
    let result = tokio::select! {
        r = reconcile_loop(&mut recon, &mut term, &watched, &state, &cfg, &mut ns) => r,
        _ = shutdown_signal() => {
            tracing::info!("signal received: exiting, datapath stays pinned");
            Ok(())
        }
    };
    for t in tasks.into_iter().chain(servers) {
        t.abort();
    }
    result
}

/// How often the agent sweeps the per-packet path's flow table.
const CT_SWEEP: Duration = Duration::from_secs(30);

/// Deletes lapsed flow entries every [`CT_SWEEP`] and reports the table's
/// fill; warns once when it passes [`crate::conntrack::NEAR_FULL`].
async fn conntrack_loop(state: Arc<AgentState>) {
    let mut warned = false;
    loop {
        let pins = state.pins.clone();
        let r = tokio::task::spawn_blocking(move || {
            crate::conntrack::sweep(&pins, crate::conntrack::monotonic_secs())
        })
        .await;
        match r {
            Ok(Ok(sw)) => {
                if sw.near_full() && !warned {
                    tracing::warn!(
                        live = sw.live,
                        capacity = sw.capacity,
                        "conntrack table near full: new north-south flows evict the least recently used ones"
                    );
                }
                warned = sw.near_full();
                state.update(|s| {
                    s.conntrack_deleted += sw.deleted;
                    s.conntrack = Some(sw);
                });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "conntrack sweep failed"),
            Err(e) => tracing::warn!(error = %e, "conntrack sweep task failed"),
        }
        tokio::time::sleep(CT_SWEEP).await;
    }
}

/// Runs the pod interfaces' controller on a thread of its own (it blocks on
/// netlink): once at start (which detaches everything when the option is
/// off), then, with `socketLB.hostNamespaceOnly`, on every link event and
/// every [`crate::pod_ifaces::RESCAN`]. Ends with the process.
fn spawn_pod_ifaces(mut ctl: crate::pod_ifaces::PodIfaces, state: Arc<AgentState>) {
    let run = move || {
        let events = if ctl.enabled() {
            match crate::sys::LinkEvents::open() {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "netlink link events unavailable: new pod interfaces are found by the periodic scan only");
                    None
                }
            }
        } else {
            None
        };
        let mut last_failed = Vec::new();
        loop {
            match ctl.sync() {
                Ok(r) => {
                    if r.changed {
                        tracing::info!(
                            pod_interfaces = r.attached,
                            host_namespace_only = r.host_namespace_only,
                            "pod interfaces' tc path synced"
                        );
                    }
                    if r.failed != last_failed && !r.failed.is_empty() {
                        tracing::warn!(failed = ?r.failed, "pod interfaces without the tc path (retried at the next scan)");
                    }
                    last_failed = r.failed;
                    state.update(|s| {
                        s.pod_interfaces = r.attached;
                        s.socket_lb_host_namespace_only = r.host_namespace_only;
                    });
                }
                Err(e) => {
                    let error = netboot_contract::errors::chain(&e);
                    tracing::warn!(error = %error, "pod interfaces' tc path: sync failed, retrying");
                    state.update(|s| s.last_error = error.clone());
                }
            }
            if !ctl.enabled() {
                return;
            }
            match &events {
                // A burst of link events (a pod's veth pair) settles first.
                Some(ev) => {
                    if ev.wait(crate::pod_ifaces::RESCAN) {
                        std::thread::sleep(Duration::from_millis(20));
                        ev.wait(Duration::ZERO);
                    }
                }
                None => std::thread::sleep(crate::pod_ifaces::RESCAN),
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("pod-ifaces".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "could not start the pod interfaces' thread: socketLB.hostNamespaceOnly not applied");
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Socket termination ([`SockTerm`]), loaded on a thread of its own while
/// the lists arrive and the per-packet path is attached: the load parses
/// the kernel's BTF twice (aya's loader does on creation, the kfunc lookup
/// needs it) and verifies an iterator, ~70 ms that the agent's main thread
/// no longer spends before its first pass. A pass that removes UDP backends
/// before the load is done waits for it, so no removal goes without
/// termination.
enum Term {
    /// Not started: the pins to load with.
    Later(Pins),
    /// Loading.
    Loading(std::thread::JoinHandle<Option<SockTerm>>),
    /// Loaded, or unavailable (status says why).
    Done(Option<SockTerm>),
}

impl Term {
    fn load(pins: &Pins, state: &AgentState) -> Option<SockTerm> {
        let (t, status) = match SockTerm::load(pins) {
            Ok(t) => (Some(t), "available".to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "socket termination unavailable: connected UDP sockets of removed backends are not destroyed");
                (None, e.to_string())
            }
        };
        state.update(|s| s.socket_termination = status);
        t
    }

    /// Starts the load on its own thread (here, if no thread can start).
    fn start(&mut self, state: &Arc<AgentState>) {
        let Term::Later(pins) = self else {
            return;
        };
        let pins = pins.clone();
        let (p, st) = (pins.clone(), state.clone());
        *self = match std::thread::Builder::new()
            .name("nb-sock-term".into())
            .spawn(move || {
                let t = Term::load(&p, &st);
                // The kernel BTF it parsed (~10 MiB, freed) would stay in
                // the heap's free lists, counted in the agent's RSS.
                crate::sys::release_free_memory();
                t
            }) {
            Ok(h) => Term::Loading(h),
            Err(_) => Term::Done(Term::load(&pins, state)),
        };
    }

    /// The loaded socket termination, after waiting for (or doing) the load.
    fn get(&mut self, state: &AgentState) -> Option<&mut SockTerm> {
        let t = match std::mem::replace(self, Term::Done(None)) {
            Term::Later(pins) => Term::load(&pins, state),
            Term::Loading(h) => h.join().unwrap_or_else(|_| {
                state.update(|s| s.socket_termination = "the load panicked".into());
                None
            }),
            Term::Done(t) => t,
        };
        *self = Term::Done(t);
        match self {
            Term::Done(t) => t.as_mut(),
            _ => None,
        }
    }
}

/// Destroys the connected UDP sockets of the backends the last pass removed
/// (every network namespace on the node), and counts them in status.
fn terminate_removed(recon: &mut Reconciler<KernelMaps>, term: &mut Term, state: &AgentState) {
    let removed = recon.take_removed_backends();
    if !removed.iter().any(|b| b.proto == crate::layout::PROTO_UDP) {
        return;
    }
    let Some(term) = tokio::task::block_in_place(|| term.get(state)) else {
        return;
    };
    match tokio::task::block_in_place(|| term.destroy(&removed, &sock_term::all_netns())) {
        Ok(r) => {
            let n = r.destroyed.len() as u64;
            tracing::info!(
                backends = r.backends,
                netns = r.netns,
                destroyed = n,
                failed_netns = r.failed_netns.len(),
                took = ?r.elapsed,
                "connected UDP sockets of removed backends destroyed"
            );
            for f in &r.failed_netns {
                tracing::debug!(netns = %f, "socket termination skipped a namespace");
            }
            state.update(|s| s.sockets_destroyed += n);
            if let Some(hub) = state.flows.lock().ok().and_then(|f| f.clone()) {
                if hub.watchers() > 0 {
                    let now = crate::flows::now_unix_ns();
                    hub.publish(r.destroyed.iter().filter(|d| d.result == 0).map(|d| {
                        let id = recon.service_id(&crate::layout::L4Addr {
                            ip: d.frontend.ip(),
                            port: d.frontend.port(),
                            proto: crate::layout::PROTO_UDP,
                        });
                        crate::flows::terminated_flow(d, id, now)
                    }));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "socket termination failed"),
    }
}

/// Each counted map's entries against the capacity it has in use.
fn map_usage(
    entries: &[(&'static str, usize)],
    sizes: &crate::config::MapSizes,
    changes: &[crate::status::MapSizeChange],
) -> Vec<crate::status::MapUsage> {
    entries
        .iter()
        .filter_map(|(map, n)| {
            Some(crate::status::MapUsage {
                map: (*map).to_string(),
                entries: *n as u64,
                capacity: u64::from(loader::capacity(map, sizes, changes)?),
            })
        })
        .collect()
}

async fn reconcile_loop(
    recon: &mut Reconciler<KernelMaps>,
    term: &mut Term,
    watched: &Watched,
    state: &AgentState,
    cfg: &Config,
    ns: &mut NorthSouth,
) -> Result<(), AgentError> {
    let NorthSouth { np, hc, mg, sr } = ns;
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(10);
    const RESYNC: Duration = Duration::from_secs(300);
    // Passes start at least this far apart: a change after a quiet spell is
    // programmed at once, and a burst's events gather while a pass runs or
    // waits (kube-proxy's minSyncPeriod, default 1 s, at map-write scale).
    const MIN_INTERVAL: Duration = Duration::from_millis(10);
    // A healthCheckNodePort that could not listen (kube-proxy still holds
    // it during a handover) is tried again this often, changes or not.
    const HC_RETRY: Duration = Duration::from_secs(1);
    let mut backoff = MIN_BACKOFF;
    let mut pass_started: Instant;
    let mut last_resync = Instant::now();
    let mut passes = Passes::default();
    let mut last_pressure: Vec<String> = Vec::new();
    let mut last_unserved = 0;
    let mut last_hc_failed: Vec<(u16, String)> = Vec::new();
    let mut retry_soon: bool;
    // The per-packet path was tried once while the lists arrived.
    let mut attached_early = false;
    loop {
        if !watched.synced() {
            // The per-packet path needs only the Node's addresses: attached
            // (its programs verified) while the lists are still arriving,
            // not after them. Once: a change or a failure is taken up by
            // the passes, as before.
            if !attached_early && watched.node_settled() {
                np.sync(watched, state);
                attached_early = true;
            }
            watched.changed.notified().await;
            continue;
        }
        if last_resync.elapsed() > RESYNC {
            // Re-read the maps so drift made behind our back gets repaired.
            if let Err(e) = tokio::task::block_in_place(|| recon.resync()) {
                tracing::warn!(error = %e, "resync from maps failed");
            }
            last_resync = Instant::now();
        }
        // Devices first: what is served decides the pass's unserved Services.
        np.sync(watched, state);
        watched.startup.mark(|s| &mut s.first_pass_ms);
        let t = Instant::now();
        pass_started = t;
        let pass = tokio::task::block_in_place(|| {
            passes.run(watched, recon, cfg.session_affinity_timeout_seconds)
        });
        let pass_took = t.elapsed();
        if !matches!(
            pass,
            Ok(PassReport {
                kind: PassKind::Idle,
                ..
            })
        ) {
            state.update(|s| {
                s.sync_duration.observe(pass_took);
                if let Ok(p) = &pass {
                    s.network_programming
                        .observe(&p.programmed.changes, p.programmed.at);
                }
            });
        }
        match pass {
            Ok(pass) => {
                terminate_removed(recon, term, state);
                let external = recon.take_external_dirty();
                if let Some(t) = mg.as_mut().filter(|_| external) {
                    let slots = recon.external_slots();
                    match tokio::task::block_in_place(|| t.sync(&slots)) {
                        Ok(n) if n > 0 => {
                            tracing::info!(written = n, tables = t.len(), "Maglev tables written")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "writing Maglev tables failed, retrying after the next pass");
                            state.update(|s| s.last_error = e.to_string());
                            recon.mark_external_dirty();
                        }
                    }
                    let desc = if cfg.load_balancing.algorithm == crate::config::Algorithm::Maglev {
                        let mut d = format!(
                            "maglev ({} entries), {} tables",
                            cfg.load_balancing.maglev_table_size,
                            t.len()
                        );
                        if t.unfit() > 0 {
                            tracing::warn!(
                                frontends = t.unfit(),
                                "Maglev table map full: these external frontends pick random backends"
                            );
                            d.push_str(&format!(
                                "; {} frontends without a table (map full: random selection)",
                                t.unfit()
                            ));
                        }
                        d
                    } else {
                        "random".to_string()
                    };
                    state.update(|s| s.load_balancing = desc);
                }
                if let Some(t) = sr.as_mut().filter(|_| external) {
                    let ranges = recon.source_ranges();
                    match tokio::task::block_in_place(|| t.sync(&ranges)) {
                        Ok(n) if n > 0 => tracing::info!(
                            written = n,
                            entries = t.len(),
                            "loadBalancerSourceRanges written"
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "writing loadBalancerSourceRanges failed (those LB IPs drop new flows from outside), retrying after the next pass");
                            state.update(|s| s.last_error = e.to_string());
                            recon.mark_external_dirty();
                        }
                    }
                }
                // In coexist mode kube-proxy answers them (on the same ports).
                let wanted = if cfg.kube_proxy_replacement {
                    healthcheck::wanted(&watched.health_check_services(), passes.table())
                } else {
                    Default::default()
                };
                let hc_failed = hc.sync(&wanted).await;
                if hc_failed != last_hc_failed {
                    for (port, error) in &hc_failed {
                        tracing::warn!(port, error = %error, "healthCheckNodePort cannot listen (kube-proxy still running on this node?), retrying every second");
                    }
                }
                retry_soon = !hc_failed.is_empty();
                last_hc_failed = hc_failed;
                state.update(|s| s.health_check_ports = hc.ports().len());
                let st = pass.stats;
                if pass.kind == PassKind::Full && st.writes() > 0 {
                    crate::sys::release_free_memory();
                }
                let prog = recon.programmed();
                let took = t.elapsed();
                if st.writes() > 0 {
                    let (kind, dirty) = match pass.kind {
                        PassKind::Full => ("full", 0),
                        PassKind::Partial(n) => ("partial", n),
                        PassKind::Idle => ("idle", 0),
                    };
                    tracing::info!(
                        updates = st.updates,
                        deletes = st.deletes,
                        services = prog.services,
                        backends = prog.backends,
                        pass = kind,
                        dirty_services = dirty,
                        ?took,
                        "maps reconciled"
                    );
                }
                let pressure = recon.pressure();
                let (unfit_fe, unfit_be) = (pressure.frontends.len(), pressure.backends.len());
                let summary = pressure.summary();
                if summary != last_pressure {
                    if summary.is_empty() {
                        tracing::info!("map pressure gone: every desired entry is programmed");
                    } else {
                        tracing::warn!(
                            frontends = unfit_fe,
                            backends = unfit_be,
                            reasons = %summary.join("; "),
                            "MapFull: desired entries not programmed; the rest is, retrying"
                        );
                    }
                    last_pressure = summary.clone();
                }
                let unserved = passes.unserved();
                if unserved.len() != last_unserved {
                    if !unserved.is_empty() {
                        tracing::warn!(
                            services = unserved.len(),
                            first = %unserved
                                .iter()
                                .take(5)
                                .map(|((ns, n), m)| format!("{ns}/{n}: {}", names(m)))
                                .collect::<Vec<_>>()
                                .join("; "),
                            "Services need features this agent does not serve"
                        );
                    }
                    last_unserved = unserved.len();
                }
                let unserved_services: Vec<UnservedService> = unserved
                    .iter()
                    .take(UNSERVED_LISTED)
                    .map(|((ns, n), m)| UnservedService {
                        service: format!("{ns}/{n}"),
                        needs: m.iter().map(|f| f.name().to_string()).collect(),
                    })
                    .collect();
                if cfg.service_metrics && (st.writes() > 0 || !state.has_svc_labels()) {
                    let labels: BTreeMap<u32, (String, String)> = passes
                        .table()
                        .frontends()
                        .filter_map(|fe| {
                            let id = recon.service_id(&fe.addr)?;
                            Some((id, (fe.name.clone(), fe.addr.to_string())))
                        })
                        .collect();
                    if let Ok(mut l) = state.svc_labels.lock() {
                        *l = Arc::new(labels);
                    }
                }
                let zone = watched.zone().unwrap_or_default();
                let lb_left = watched.lb_ingress_left();
                let map_entries = recon.map_entries();
                let mut ready_changed = false;
                // Logged before the status says so: whatever waits for the
                // sync (the first rules check) comes after this line.
                let became_ready = !state.get().synced;
                if became_ready {
                    watched.startup.mark(|s| &mut s.synced_ms);
                    tracing::info!(startup = %watched.startup.get().line(), "initial sync complete");
                }
                state.update(|s| {
                    s.unserved = unserved.len();
                    s.unserved_services = unserved_services;
                    s.lb_ingress_left = lb_left.len();
                    s.lb_ingress_left_listed = lb_left.into_iter().take(UNSERVED_LISTED).collect();
                    s.zone = zone;
                    let ready = unfit_fe + unfit_be == 0;
                    ready_changed = s.ready != ready;
                    s.synced = true;
                    s.ready = ready;
                    s.unprogrammed_frontends = unfit_fe;
                    s.unprogrammed_backends = unfit_be;
                    s.map_pressure = summary;
                    s.map_usage = map_usage(&map_entries, &cfg.map_sizes, &s.map_size_changes);
                    s.services = prog.services;
                    s.backends = prog.backends;
                    s.desired_services = pass.desired_frontends;
                    s.syncs += 1;
                    s.map_writes += st.writes();
                    s.last_sync_unix = now_unix();
                    s.last_sync_millis = took.as_millis() as u64;
                    s.watch_errors = watched.errors.load(Ordering::Relaxed);
                });
                if ready_changed || became_ready {
                    state.ready_changed.notify_one();
                }
                if unfit_fe + unfit_be > 0 {
                    // Retry (a full pass) with backoff, or at once on a change.
                    tokio::select! {
                        _ = watched.changed.notified() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "reconcile failed, retrying");
                state.update(|s| {
                    s.sync_errors += 1;
                    s.last_error = e.to_string();
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        tokio::select! {
            _ = watched.changed.notified() => {
                let wait = MIN_INTERVAL.saturating_sub(pass_started.elapsed());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            _ = tokio::time::sleep(if retry_soon { HC_RETRY } else { RESYNC }) => {}
        }
        if let Ok(l) = watched.last_error.lock() {
            if !l.is_empty() {
                let l = l.clone();
                state.update(|s| s.last_error = l);
            }
        }
    }
}

fn names(features: &[netboot_contract::features::Feature]) -> String {
    features
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Longest the first kube-proxy rules check waits for the initial sync.
const FIRST_RULES_CHECK_WAIT: Duration = Duration::from_secs(30);

/// Handover and Node annotations, re-checked periodically (and at once when
/// readiness or kube-proxy's presence changes). kube-proxy's rules are removed
/// only in replace mode with cleanup enabled, once the maps are programmed and
/// kube-proxy's DaemonSet is known to be gone (see [`kube_proxy::decide`]).
async fn node_loop(
    client: Option<Client>,
    state: Arc<AgentState>,
    watched: Arc<Watched>,
    opts: AgentOptions,
) {
    let replace = opts.config.kube_proxy_replacement;
    let mut applied: Option<(NodeReport, String)> = None;
    let mut last_decision = None;
    let events = client
        .as_ref()
        .map(|c| crate::events::NodeEvents::new(c, &opts.node_name));
    // The map pressure last posted as an Event.
    let mut posted_pressure: Vec<String> = Vec::new();
    // The first rules check waits for the initial sync (at most
    // FIRST_RULES_CHECK_WAIT): it runs iptables-save and ip6tables-save
    // (legacy and nft) and nft, processes that on a small node take the CPU
    // from the lists and the first pass, and before the sync the report can
    // only say "not ready".
    let deadline = tokio::time::Instant::now() + FIRST_RULES_CHECK_WAIT;
    while !state.get().synced {
        tokio::select! {
            _ = state.ready_changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    loop {
        let ready = state.get().ready;
        let kp = state.kube_proxy.get().0;
        let decision = kube_proxy::decide(replace, state.cleanup, ready, kp);
        if last_decision != Some(decision) {
            tracing::info!(
                kube_proxy = %kp,
                daemon_set = %opts.config.kube_proxy,
                cleanup = %decision,
                "kube-proxy rules cleanup"
            );
            last_decision = Some(decision);
        }
        let clean = decision.cleans();
        let ns = RulesNetns::new(opts.rules_netns.as_deref());
        // IPVS virtual servers of these addresses are kube-proxy's.
        let own = handover::IpvsOwnership {
            service_ips: watched.service_addresses(),
            node_ports: watched.node_ports(),
            ..Default::default()
        };
        let rules = tokio::task::spawn_blocking(
            move || -> Result<(handover::Report, handover::Report), handover::HandoverError> {
                let removed = if clean {
                    handover::cleanup(&ns, &own)?
                } else {
                    handover::Report::default()
                };
                Ok((removed, handover::detect(&ns, &own)?))
            },
        )
        .await;
        let check = match rules {
            Ok(Ok((removed, found))) => {
                let n = removed.items();
                if n > 0 || removed.route_localnet_reset {
                    tracing::info!(
                        removed = n,
                        route_localnet_reset = removed.route_localnet_reset,
                        ipvs = removed.ipvs.len(),
                        ipsets = removed.ipsets.len(),
                        links = removed.links.len(),
                        "removed kube-proxy's state (its chains, jumps, nft tables, IPVS virtual servers, kube-ipvs0, ipsets)"
                    );
                }
                state.update(|s| s.kube_proxy_rules_removed += n);
                if !found.ipvs_others.is_empty() || !found.links_others.is_empty() {
                    tracing::debug!(ipvs = ?found.ipvs_others, links = ?found.links_others, "IPVS state that is not kube-proxy's, left alone");
                }
                RulesCheck::Checked {
                    present: found.present(),
                    retained: found.retained(),
                    modes: found.modes.clone(),
                }
            }
            Ok(Err(e)) => {
                let error = netboot_contract::errors::chain(&e);
                tracing::warn!(error = %error, capability = e.is_capability(), "kube-proxy rules check failed");
                state.update(|s| s.last_error = error.clone());
                RulesCheck::Failed {
                    capability: e.is_capability(),
                    error,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "kube-proxy rules task failed");
                RulesCheck::Failed {
                    capability: false,
                    error: format!("kube-proxy rules task: {e}"),
                }
            }
        };
        let report = node_report(replace, state.get().ready, state.cleanup, &check);
        state.update(|s| {
            s.kube_proxy_rules = report.rules.to_string();
            s.kube_proxy_rules_reason = report.reason.clone().unwrap_or_default();
            s.kube_proxy_mode = mode_value(&report);
            s.kube_proxy_cleanup_blocked = report.blocked;
        });
        let features = state.get().features.join(",");
        if let Some(c) = &client {
            let now = (report.clone(), features.clone());
            if applied.as_ref() != Some(&now) {
                match annotate(c, &opts.node_name, &report, &features).await {
                    Ok(()) => {
                        tracing::info!(node = %opts.node_name, kpr = report.kpr, rules = %report.rules, reason = ?report.reason, features = %features, "node annotated");
                        applied = Some(now);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, node = %opts.node_name, "annotating node failed, will retry");
                        state.update(|s| {
                            s.last_error = format!("annotate Node/{}: {e}", opts.node_name)
                        });
                    }
                }
            }
        }
        if let Some(ev) = &events {
            let st = state.get();
            if let Some((type_, reason, note)) = crate::events::map_pressure_event(
                &posted_pressure,
                &st.map_pressure,
                (st.unprogrammed_frontends, st.unprogrammed_backends),
            ) {
                match ev.publish(type_, reason, &note).await {
                    Ok(()) => posted_pressure = st.map_pressure.clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, reason, "posting the Node event failed, will retry")
                    }
                }
            }
        }
        // Decided again after the pass: the wait depends on the state now.
        let decision = kube_proxy::decide(
            replace,
            state.cleanup,
            state.get().ready,
            state.kube_proxy.get().0,
        );
        let wait = kube_proxy::recheck_interval(
            decision,
            state.kube_proxy.absent_for(),
            opts.node_interval,
        );
        tokio::select! {
            _ = state.ready_changed.notified() => {}
            _ = state.kube_proxy.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The [`ANN_MODE`] value: the modes found, or `unknown`.
pub fn mode_value(report: &NodeReport) -> String {
    report
        .modes
        .as_ref()
        .map(netboot_contract::node::format_modes)
        .unwrap_or_else(|| "unknown".into())
}

/// Writes the contract annotations on the Node; `features` is what the
/// agent serves now (`netboot_contract::features::format`).
pub async fn annotate(
    client: &Client,
    node: &str,
    report: &NodeReport,
    features: &str,
) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    // A merge patch with null removes the reason once there is none.
    let patch = serde_json::json!({
        "metadata": {"annotations": {
            ANN_KPR: netboot_contract::node::kpr_value(report.kpr),
            ANN_VERSION: DATAPATH_VERSION,
            ANN_FEATURES: features,
            ANN_RULES: report.rules.as_str(),
            ANN_RULES_REASON: report.reason,
            ANN_MODE: mode_value(report),
        }}
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_on(pins: &Pins) -> Arc<AgentState> {
        Arc::new(AgentState {
            status: Mutex::new(Status {
                socket_termination: crate::status::SOCKET_TERMINATION_PENDING.into(),
                ..Default::default()
            }),
            maps: Mutex::new(None),
            pins: pins.clone(),
            ready_changed: Notify::new(),
            kube_proxy: Arc::new(KubeProxyWatch::new(
                crate::config::KubeProxyRef::default(),
                KubeProxyState::Unknown,
            )),
            replace: true,
            cleanup: false,
            flows: Mutex::new(None),
            service_metrics: false,
            svc_labels: Mutex::new(Arc::new(BTreeMap::new())),
            startup: Arc::new(crate::startup::Timeline::default()),
        })
    }

    #[test]
    fn socket_termination_loads_once_started_and_a_removal_waits_for_the_load() {
        // Why: the load is off the cold start's path (on a thread of its
        // own); a removal must never find it still loading and skip the
        // sockets. Pins without the socket LB's maps make the load fail
        // with its reason, deterministically and without privileges.
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path());
        let state = state_on(&pins);
        let mut term = Term::Later(pins.clone());
        term.start(&state);
        assert!(
            matches!(term, Term::Loading(_)),
            "started on its own thread"
        );
        term.start(&state);
        assert!(
            matches!(term, Term::Loading(_) | Term::Done(_)),
            "started once"
        );
        // What a removal does: wait for the load, then use what it gave.
        assert!(term.get(&state).is_none());
        assert!(matches!(term, Term::Done(None)));
        let said = state.get().socket_termination;
        assert!(said.contains("is not pinned"), "{said}");
        // Never started (a removal before the start): loaded there.
        let state = state_on(&pins);
        let mut term = Term::Later(pins);
        assert!(term.get(&state).is_none());
        assert_ne!(
            state.get().socket_termination,
            crate::status::SOCKET_TERMINATION_PENDING
        );
    }

    fn checked(present: bool) -> RulesCheck {
        RulesCheck::Checked {
            present,
            retained: vec![],
            modes: if present {
                BTreeSet::from([KubeProxyMode::Ipvs])
            } else {
                BTreeSet::new()
            },
        }
    }

    fn failed(capability: bool) -> RulesCheck {
        RulesCheck::Failed {
            capability,
            error: "iptables-legacy-save: not installed".into(),
        }
    }

    #[test]
    fn a_node_that_cannot_clean_never_reports_replacement() {
        // Replace mode, ready, cleanup on, capability missing: the first
        // handover gate (KubeProxyReplacement=true) stays shut.
        let r = node_report(true, true, true, &failed(true));
        assert_eq!(
            r,
            NodeReport {
                kpr: false,
                rules: KubeProxyRules::Unknown,
                reason: Some("iptables-legacy-save: not installed".into()),
                modes: None,
                blocked: true,
            }
        );
        assert_eq!(mode_value(&r), "unknown");
        // A passing failure (e.g. the xtables lock) reports unknown, keeps KPR.
        let r = node_report(true, true, true, &failed(false));
        assert!(r.kpr && !r.blocked && r.rules == KubeProxyRules::Unknown);
        // Cleanup disabled or coexist: the agent cleans nothing, KPR unaffected.
        assert!(node_report(true, true, false, &failed(true)).kpr);
        assert!(!node_report(false, true, true, &failed(true)).blocked);
    }

    #[test]
    fn checked_rules_report_present_or_absent() {
        for (replace, ready) in [(true, true), (true, false), (false, true)] {
            let r = node_report(replace, ready, true, &checked(true));
            assert_eq!(
                (r.kpr, r.rules, r.reason, r.blocked),
                (replace && ready, KubeProxyRules::Present, None, false)
            );
            let absent = node_report(replace, ready, true, &checked(false));
            assert_eq!(absent.rules, KubeProxyRules::Absent);
            assert_eq!(mode_value(&absent), "none");
            assert_eq!(
                mode_value(&node_report(replace, ready, true, &checked(true))),
                "ipvs"
            );
        }
        let kept = RulesCheck::Checked {
            present: true,
            retained: vec![
                "iptables-nft-save nat: KUBE-MARK-MASQ (referenced by: -A X -j KUBE-MARK-MASQ)"
                    .into(),
            ],
            modes: BTreeSet::from([KubeProxyMode::Iptables]),
        };
        let r = node_report(true, true, true, &kept);
        assert_eq!(r.rules, KubeProxyRules::Present);
        assert!(r.reason.is_some_and(|m| m.contains("KUBE-MARK-MASQ")));
    }
}
