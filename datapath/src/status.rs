//! The agent's status (served as `/v1/status`, printed by `netboot-datapath
//! status`) and its text rendering in cilium-dbg's style.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::kube_proxy::{Cleanup, KubeProxyState};

/// Datapath version reported in the Node annotation and status.
pub const DATAPATH_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One outcome counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Name (see `layout::COUNTER_NAMES`).
    pub name: String,
    /// Sum over CPUs.
    pub value: u64,
}

/// One attached program link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Attach point (connect4, …).
    pub point: String,
    /// Kernel link id.
    pub link_id: u32,
    /// Program id currently in the link.
    pub prog_id: u32,
    /// Cgroup id the link is attached to.
    pub cgroup_id: u64,
}

/// A configured map size that differs from the pinned map's (the change is
/// refused: the pinned map keeps its size and contents).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapSizeChange {
    /// Map name.
    pub map: String,
    /// `max_entries` of the pinned map (in use).
    pub pinned: u32,
    /// `max_entries` config.yaml's `mapSizes` asks for.
    pub configured: u32,
}

impl std::fmt::Display for MapSizeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: pinned with {} entries, mapSizes asks {}",
            self.map, self.pinned, self.configured
        )
    }
}

/// One BPF map's entries against its capacity (map pressure).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUsage {
    /// Map name (`nb_lb4_svc`, ...).
    pub map: String,
    /// Entries the reconciler has written.
    pub entries: u64,
    /// The map's `max_entries` in use.
    pub capacity: u64,
}

/// A Service the agent cannot fully serve, and what it lacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnservedService {
    /// `namespace/name`.
    pub service: String,
    /// Feature names (`netboot_contract::features`) it needs and the agent lacks.
    pub needs: Vec<String>,
}

/// At most this many unserved Services are listed in status (all are counted).
pub const UNSERVED_LISTED: usize = 50;

/// A condition in Kubernetes' style: `MapFull`, `MapSizeChangeRefused`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" or "False".
    pub status: String,
    /// Why, when True.
    #[serde(default)]
    pub message: String,
}

/// `socketTermination` while the agent loads it (beside its lists).
pub const SOCKET_TERMINATION_PENDING: &str = "pending (loading)";

/// Everything status and metrics report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Node served.
    pub node: String,
    /// true: translating ClusterIPs (replace mode); false: coexist (observe only).
    pub kube_proxy_replacement: bool,
    /// Datapath version.
    pub datapath_version: String,
    /// Cgroup the socket LB is attached to.
    pub cgroup: String,
    /// Pin root.
    pub bpffs: String,
    /// The only API address the agent dials (empty when reading pins directly).
    pub api_endpoint: String,
    /// Attached links.
    pub links: Vec<LinkStatus>,
    /// What /readyz reports: the initial sync is complete AND every desired
    /// frontend and backend is programmed (no map pressure).
    pub ready: bool,
    /// The initial sync is complete (a complete list reached the maps).
    #[serde(default)]
    pub synced: bool,
    /// Desired frontends the last pass could not program (map full / no id).
    #[serde(default)]
    pub unprogrammed_frontends: usize,
    /// Desired backends the last pass could not program.
    #[serde(default)]
    pub unprogrammed_backends: usize,
    /// Why, one line per reason (empty: everything fits).
    #[serde(default)]
    pub map_pressure: Vec<String>,
    /// `mapSizes` changes refused for pinned maps (they keep their size).
    #[serde(default)]
    pub map_size_changes: Vec<MapSizeChange>,
    /// Entries against capacity of each map the reconciler writes, as of
    /// the last pass (/metrics: `netboot_datapath_map_entries`, `_capacity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map_usage: Vec<MapUsage>,
    /// Connected-UDP socket termination (iter/udp + bpf_sock_destroy):
    /// `available`, or `unavailable: <reason>`; empty when not checked.
    #[serde(default)]
    pub socket_termination: String,
    /// Connected UDP sockets destroyed since start (their backend was removed).
    #[serde(default)]
    pub sockets_destroyed: u64,
    /// The per-packet path's interfaces (`devices::Choice::summary`:
    /// `eth0 (SNAT 192.168.50.1)`, or `none: <why>`); empty when not chosen yet.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nodeport_devices: String,
    /// The per-packet path's backend selection: `random`, or
    /// `maglev (<M> entries), <n> tables`; empty when not known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub load_balancing: String,
    /// The per-packet path's flow table at the last sweep (`None` before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<crate::conntrack::Sweep>,
    /// Lapsed flow entries the sweeps deleted since start.
    #[serde(default)]
    pub conntrack_deleted: u64,
    /// Service flow events (`/v1/flows`): kernel counters and watchers
    /// (`None`: the flow maps are unavailable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_events: Option<crate::flows::FlowStats>,
    /// `healthCheckNodePort`s served (externalTrafficPolicy Local Services).
    #[serde(default)]
    pub health_check_ports: usize,
    /// `socketLB.hostNamespaceOnly` in force: the socket LB serves the host's
    /// network namespace only; pods are served at their interfaces.
    #[serde(default)]
    pub socket_lb_host_namespace_only: bool,
    /// Pod interfaces carrying the tc path (`nb_pod_ingress`/`nb_pod_egress`).
    #[serde(default)]
    pub pod_interfaces: usize,
    /// `MapFull` and `MapSizeChangeRefused`, derived from the fields above.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Frontends programmed in the maps.
    pub services: usize,
    /// Backends programmed in the maps.
    pub backends: usize,
    /// Frontends in the desired table.
    pub desired_services: usize,
    /// Successful reconcile passes.
    pub syncs: u64,
    /// Failed reconcile passes (retried).
    pub sync_errors: u64,
    /// Map writes done by the reconciler since start.
    pub map_writes: u64,
    /// Unix seconds of the last successful sync (0 = never).
    pub last_sync_unix: u64,
    /// Duration of the last successful pass in milliseconds.
    pub last_sync_millis: u64,
    /// Network programming latency per trigger (/metrics only).
    #[serde(skip)]
    pub network_programming: crate::latency::Programming,
    /// Durations of the full and partial passes (/metrics only).
    #[serde(skip)]
    pub sync_duration: crate::latency::Histogram<crate::latency::SyncBuckets>,
    /// Last reconcile or watch error.
    pub last_error: String,
    /// Watch stream errors (each retried with backoff).
    pub watch_errors: u64,
    /// kube-proxy rules in the rules netns: "present", "absent" or "unknown".
    pub kube_proxy_rules: String,
    /// KUBE-* chains and nft tables removed by the handover.
    pub kube_proxy_rules_removed: usize,
    /// Why the rules are "unknown" (the cleanup cannot run: a missing
    /// capability or program, iptables output it cannot trust) or why
    /// kube-proxy chains are kept; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kube_proxy_rules_reason: String,
    /// kube-proxy's mode(s) whose state the rules pass found: `ipvs`,
    /// `iptables+ipvs`, `none`, or `unknown`; empty before the first pass.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kube_proxy_mode: String,
    /// The cleanup cannot run on this node, so the agent does not report
    /// KubeProxyReplacement=true (the handover never starts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kube_proxy_cleanup_blocked: bool,
    /// Whether kube-proxy's DaemonSet exists: "installed", "absent" or "unknown".
    #[serde(default)]
    pub kube_proxy: KubeProxyState,
    /// The watched DaemonSet, `namespace/name` (empty when read from the pins).
    #[serde(default)]
    pub kube_proxy_daemon_set: String,
    /// What the agent does about kube-proxy's rules: "active", "held-back"
    /// (kube-proxy installed or not known absent), "waiting-for-ready",
    /// "disabled" (coexist or cleanupKubeProxyRules false) or "unknown".
    #[serde(default)]
    pub kube_proxy_cleanup: Cleanup,
    /// The features this agent serves (as published in the Node annotation
    /// `netboot.io/datapath-features`).
    #[serde(default)]
    pub features: Vec<String>,
    /// The Node's `topology.kubernetes.io/zone` (zone hints), empty if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Services needing something this agent does not serve (counted in full).
    #[serde(default)]
    pub unserved: usize,
    /// The first [`UNSERVED_LISTED`] of them, by namespace/name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unserved_services: Vec<UnservedService>,
    /// LoadBalancer ingress entries no proxy captures (hostname-only,
    /// `ipMode: Proxy`): left to their load balancer, as by kube-proxy.
    #[serde(default)]
    pub lb_ingress_left: usize,
    /// The first [`UNSERVED_LISTED`] of them, `ns/name: entry (why)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lb_ingress_left_listed: Vec<String>,
    /// Map reuse at start: true when the agent restarted on existing pins.
    pub maps_reused: bool,
    /// What the start did to maps of another layout or `mapSizes`
    /// (`upgrade::UpgradeReport::describe`); empty when nothing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub layout_upgrade: String,
    /// When each step of this agent's start finished ([`crate::startup`]).
    #[serde(default)]
    pub startup: crate::startup::Startup,
    /// Per-outcome BPF counters.
    pub counters: Vec<Counter>,
    /// Per-Service counters, one row per programmed frontend with traffic;
    /// filled only with config.yaml `serviceMetrics` (/metrics only).
    #[serde(skip)]
    pub service_stats: Vec<ServiceStatsRow>,
}

/// One frontend's per-Service counters (`nb_svc_stats`, CPUs summed) with
/// its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStatsRow {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Service port name (may be empty).
    pub port: String,
    /// Frontend `address:port/PROTO`.
    pub frontend: String,
    /// The counters.
    pub stats: crate::layout::SvcStats,
}

impl ServiceStatsRow {
    /// Labels from a frontend's name (`namespace/name:port-name`) and address.
    pub fn new(name: &str, frontend: String, stats: crate::layout::SvcStats) -> Self {
        let (namespace, rest) = name.split_once('/').unwrap_or(("", name));
        let (service, port) = rest.split_once(':').unwrap_or((rest, ""));
        Self {
            namespace: namespace.to_string(),
            service: service.to_string(),
            port: port.to_string(),
            frontend,
            stats,
        }
    }
}

/// The per-Service families: (name, help, field).
#[allow(clippy::type_complexity)]
pub const SERVICE_FAMILIES: [(&str, &str, fn(&crate::layout::SvcStats) -> u64); 5] = [
    (
        "netboot_datapath_service_connections_total",
        "Socket LB connect()/sendmsg() to the Service translated to a backend (config.yaml serviceMetrics)",
        |s| s.translated,
    ),
    (
        "netboot_datapath_service_refused_total",
        "Socket LB connect()/sendmsg() to the Service refused with ECONNREFUSED: no usable backend",
        |s| s.refused,
    ),
    (
        "netboot_datapath_service_affinity_hits_total",
        "Connections to the Service sent to the backend of a ClientIP affinity entry",
        |s| s.affinity_hits,
    ),
    (
        "netboot_datapath_service_tc_flows_total",
        "New flows to the Service translated by the per-packet path (NodePort interfaces, pod interfaces)",
        |s| s.tc_new_flows,
    ),
    (
        "netboot_datapath_service_tc_dropped_total",
        "New flows to the Service the per-packet path dropped: no (local) backend",
        |s| s.tc_dropped,
    ),
];

fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC rendering of unix seconds (no external time crate).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

fn condition(type_: &str, on: bool, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if on { "True" } else { "False" }.into(),
        message: if on { message } else { String::new() },
    }
}

impl Status {
    /// Whether the last pass left desired entries out of the maps.
    pub fn map_full(&self) -> bool {
        self.unprogrammed_frontends + self.unprogrammed_backends > 0
    }

    /// Fills `conditions` from the fields they summarise.
    pub fn with_conditions(mut self) -> Self {
        self.conditions = vec![
            condition(
                "MapFull",
                self.map_full(),
                format!(
                    "{} frontends and {} backends not programmed: {}",
                    self.unprogrammed_frontends,
                    self.unprogrammed_backends,
                    self.map_pressure.join("; ")
                ),
            ),
            condition(
                "MapSizeChangeRefused",
                !self.map_size_changes.is_empty(),
                format!(
                    "{}; pinned maps keep their size (uninstall the datapath to resize)",
                    self.map_size_changes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
        ];
        self
    }

    /// `status` text output.
    pub fn render(&self, verbose: bool, now: u64) -> String {
        let mut s = String::new();
        let points: Vec<&str> = self.links.iter().map(|l| l.point.as_str()).collect();
        let attach = if points.is_empty() {
            "socket LB not attached".to_string()
        } else {
            format!(
                "Socket LB on cgroup {} ({})",
                self.cgroup,
                points.join(", ")
            )
        };
        let mode = if self.kube_proxy_replacement {
            ""
        } else {
            " (coexist: observe only)"
        };
        let _ = writeln!(
            s,
            "KubeProxyReplacement:   {}   [{attach}]{mode}",
            yes(self.kube_proxy_replacement)
        );
        let _ = writeln!(s, "Ready:                  {}", yes(self.ready));
        let _ = writeln!(
            s,
            "Datapath:               {} (pins {})",
            self.datapath_version, self.bpffs
        );
        let _ = writeln!(
            s,
            "Services:               {} frontends, {} backends programmed",
            self.services, self.backends
        );
        if self.map_full() {
            let _ = writeln!(
                s,
                "Map pressure:           MapFull: {} frontends, {} backends not programmed",
                self.unprogrammed_frontends, self.unprogrammed_backends
            );
            for l in &self.map_pressure {
                let _ = writeln!(s, "                        {l}");
            }
        }
        for c in &self.map_size_changes {
            let _ = writeln!(
                s,
                "Map size change:        refused: {c} (the pinned map keeps its size)"
            );
        }
        if self.unserved > 0 {
            let _ = writeln!(
                s,
                "Unserved:               {} Services need what this agent does not serve (translated only in part or not at all)",
                self.unserved
            );
            for u in &self.unserved_services {
                let _ = writeln!(
                    s,
                    "                        {}: {}",
                    u.service,
                    u.needs.join(", ")
                );
            }
            if self.unserved > self.unserved_services.len() {
                let _ = writeln!(
                    s,
                    "                        … and {} more",
                    self.unserved - self.unserved_services.len()
                );
            }
        }
        if self.lb_ingress_left > 0 {
            let _ = writeln!(
                s,
                "LB ingress left:        {} entries are left to their load balancer (not captured, as by kube-proxy)",
                self.lb_ingress_left
            );
            for l in &self.lb_ingress_left_listed {
                let _ = writeln!(s, "                        {l}");
            }
        }
        if self.socket_termination == "available" {
            let _ = writeln!(
                s,
                "Socket termination:     available (connected UDP), {} sockets destroyed",
                self.sockets_destroyed
            );
        } else if self.socket_termination == SOCKET_TERMINATION_PENDING {
            let _ = writeln!(
                s,
                "Socket termination:     {} (a removal before then waits for it)",
                self.socket_termination
            );
        } else if !self.socket_termination.is_empty() {
            let _ = writeln!(
                s,
                "Socket termination:     {} (connected UDP sockets of removed backends are NOT destroyed)",
                self.socket_termination
            );
        }
        if let Some(none) = self.nodeport_devices.strip_prefix("none: ") {
            let _ = writeln!(
                s,
                "NodePort devices:       none ({none}): NodePorts, externalIPs and LB IPs are NOT served to traffic from outside the node"
            );
        } else if !self.nodeport_devices.is_empty() {
            let _ = writeln!(
                s,
                "NodePort devices:       {}, {} healthCheckNodePorts",
                self.nodeport_devices, self.health_check_ports
            );
        }
        if self.socket_lb_host_namespace_only {
            let _ = writeln!(
                s,
                "Socket LB:              host network namespace only; pods through their interfaces' tc path: {} pod interfaces",
                self.pod_interfaces
            );
        }
        if !self.load_balancing.is_empty() {
            let _ = writeln!(
                s,
                "Load balancing:         {} (traffic from outside the node)",
                self.load_balancing
            );
        }
        if let Some(ct) = &self.conntrack {
            let _ = writeln!(
                s,
                "Conntrack (tc path):    {} of {} entries live ({} closing, {} SNAT), {} lapsed deleted{}",
                ct.live,
                ct.capacity,
                ct.closing,
                ct.snat,
                self.conntrack_deleted,
                if ct.near_full() {
                    "; NEAR FULL: new flows evict the least recently used"
                } else {
                    ""
                }
            );
        }
        let last = if self.last_sync_unix == 0 {
            "never".to_string()
        } else {
            format!(
                "{} ({}s ago, {} ms), {} syncs, {} errors",
                rfc3339(self.last_sync_unix),
                now.saturating_sub(self.last_sync_unix),
                self.last_sync_millis,
                self.syncs,
                self.sync_errors
            )
        };
        let _ = writeln!(s, "Last sync:              {last}");
        let api = if self.api_endpoint.is_empty() {
            "unknown (read from pins)"
        } else {
            &self.api_endpoint
        };
        let _ = writeln!(s, "API endpoint:           {api}");
        let _ = writeln!(s, "KubeProxy:              {}", self.kube_proxy_line());
        let _ = writeln!(
            s,
            "KubeProxy rules:        {}{}",
            if self.kube_proxy_rules.is_empty() {
                "unknown"
            } else {
                &self.kube_proxy_rules
            },
            if self.kube_proxy_rules_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.kube_proxy_rules_reason)
            }
        );
        if !self.kube_proxy_mode.is_empty() {
            let _ = writeln!(s, "KubeProxy mode on node: {}", self.kube_proxy_mode);
        }
        if verbose {
            let _ = writeln!(s, "KubeProxyReplacement Details:");
            let _ = writeln!(
                s,
                "  Socket LB:            {}",
                if points.is_empty() {
                    "Disabled"
                } else {
                    "Enabled"
                }
            );
            let _ = writeln!(s, "  Socket LB Protocols:  TCP, UDP (IPv4 only)");
            for l in &self.links {
                let _ = writeln!(
                    s,
                    "    {:<14} link {} prog {} cgroup-id {}",
                    l.point, l.link_id, l.prog_id, l.cgroup_id
                );
            }
            let _ = writeln!(
                s,
                "  Mode:                 {}",
                if self.kube_proxy_replacement {
                    "Replace (translate ClusterIPs)"
                } else {
                    "Coexist (kube-proxy translates; counters only)"
                }
            );
            let _ = writeln!(s, "  Backend Selection:    Random (TCP), per-socket (UDP)");
            let _ = writeln!(
                s,
                "  Session Affinity:     Enabled (ClientIP, by client netns)"
            );
            let _ = writeln!(
                s,
                "  Graceful Termination: Enabled (terminating backends keep existing affinity; serve when no backend is ready)"
            );
            let _ = writeln!(s, "  Features served:      {}", self.features.join(","));
            let _ = writeln!(s, "  Node:                 {}", self.node);
            if !self.zone.is_empty() {
                let _ = writeln!(s, "  Zone:                 {}", self.zone);
            }
            let _ = writeln!(s, "  Maps reused at start: {}", yes(self.maps_reused));
            let startup = self.startup.line();
            if !startup.is_empty() {
                let _ = writeln!(s, "  Startup:              {startup}");
            }
            if !self.layout_upgrade.is_empty() {
                let _ = writeln!(s, "  Layout upgrade:       {}", self.layout_upgrade);
            }
            let _ = writeln!(s, "  Map writes:           {}", self.map_writes);
            if !self.last_error.is_empty() {
                let _ = writeln!(s, "  Last error:           {}", self.last_error);
            }
            let _ = writeln!(s, "  BPF counters:");
            for c in &self.counters {
                let _ = writeln!(s, "    {:<24} {}", c.name, c.value);
            }
        }
        s
    }

    /// `installed (DaemonSet kube-system/kube-proxy), rules cleanup held back`.
    fn kube_proxy_line(&self) -> String {
        let mut line = self.kube_proxy.to_string();
        if !self.kube_proxy_daemon_set.is_empty() {
            let _ = write!(line, " (DaemonSet {})", self.kube_proxy_daemon_set);
        }
        let cleanup = match self.kube_proxy_cleanup {
            Cleanup::Unknown => return line,
            Cleanup::Disabled => "rules cleanup disabled",
            Cleanup::HeldBack => "rules cleanup held back until kube-proxy is removed",
            Cleanup::WaitingForReady => "rules cleanup waits for the initial sync",
            Cleanup::Active => "rules cleanup active",
        };
        let _ = write!(line, ", {cleanup}");
        line
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            "netboot_datapath_ready",
            "1 once the maps hold a complete initial list",
            "gauge",
            u8::from(self.ready).to_string(),
        );
        gauge(
            "netboot_datapath_kube_proxy_replacement",
            "1 in replace mode, 0 in coexist mode",
            "gauge",
            u8::from(self.kube_proxy_replacement).to_string(),
        );
        gauge(
            "netboot_datapath_services",
            "Service frontends programmed in the BPF maps",
            "gauge",
            self.services.to_string(),
        );
        gauge(
            "netboot_datapath_backends",
            "Backends programmed in the BPF maps",
            "gauge",
            self.backends.to_string(),
        );
        gauge(
            "netboot_datapath_desired_services",
            "Service frontends in the desired table",
            "gauge",
            self.desired_services.to_string(),
        );
        gauge(
            "netboot_datapath_syncs_total",
            "Successful reconcile passes",
            "counter",
            self.syncs.to_string(),
        );
        gauge(
            "netboot_datapath_sync_errors_total",
            "Failed reconcile passes (retried with backoff)",
            "counter",
            self.sync_errors.to_string(),
        );
        gauge(
            "netboot_datapath_map_writes_total",
            "BPF map updates and deletes written by the reconciler",
            "counter",
            self.map_writes.to_string(),
        );
        gauge(
            "netboot_datapath_watch_errors_total",
            "Watch stream errors (retried with backoff)",
            "counter",
            self.watch_errors.to_string(),
        );
        gauge(
            "netboot_datapath_last_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            "gauge",
            self.last_sync_unix.to_string(),
        );
        gauge(
            "netboot_datapath_last_sync_duration_seconds",
            "Duration of the last successful sync",
            "gauge",
            format!("{:.3}", self.last_sync_millis as f64 / 1000.0),
        );
        gauge(
            "netboot_datapath_kube_proxy_rules_present",
            "1 if KUBE-* rules or kube-proxy's nft table exist in the rules netns",
            "gauge",
            u8::from(self.kube_proxy_rules == "present").to_string(),
        );
        gauge(
            "netboot_kube_proxy_installed",
            "1 while kube-proxy's DaemonSet exists or is not yet known to be absent (rules cleanup held back), 0 once it is absent",
            "gauge",
            u8::from(self.kube_proxy != KubeProxyState::Absent).to_string(),
        );
        gauge(
            "netboot_datapath_kube_proxy_cleanup_held_back",
            "1 in replace mode while kube-proxy's rules are left alone because kube-proxy is installed",
            "gauge",
            u8::from(self.kube_proxy_cleanup == Cleanup::HeldBack).to_string(),
        );
        gauge(
            "netboot_datapath_kube_proxy_cleanup_blocked",
            "1 while the kube-proxy rules cleanup this node needs cannot run, so KubeProxyReplacement is reported false",
            "gauge",
            u8::from(self.kube_proxy_cleanup_blocked).to_string(),
        );
        gauge(
            "netboot_datapath_map_full",
            "1 while the last pass left desired frontends or backends out of a full map (or without an id)",
            "gauge",
            u8::from(self.map_full()).to_string(),
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_unprogrammed Desired entries the last pass could not program (map full or no id)\n# TYPE netboot_datapath_unprogrammed gauge\nnetboot_datapath_unprogrammed{{kind=\"frontend\"}} {}\nnetboot_datapath_unprogrammed{{kind=\"backend\"}} {}",
            self.unprogrammed_frontends, self.unprogrammed_backends
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_map_size_change_refused Maps whose pinned size differs from mapSizes (change refused)\n# TYPE netboot_datapath_map_size_change_refused gauge\nnetboot_datapath_map_size_change_refused {}",
            self.map_size_changes.len()
        );
        for (name, help, value) in [
            (
                "netboot_datapath_map_entries",
                "Entries the reconciler has written into each BPF map",
                (|u: &MapUsage| u.entries) as fn(&MapUsage) -> u64,
            ),
            (
                "netboot_datapath_map_capacity",
                "max_entries of each BPF map the reconciler writes (mapSizes, or the pinned size when a change was refused)",
                |u: &MapUsage| u.capacity,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for u in &self.map_usage {
                let _ = writeln!(s, "{name}{{map=\"{}\"}} {}", u.map, value(u));
            }
        }
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_lb_ingress_left LoadBalancer ingress entries no proxy captures (hostname-only or ipMode Proxy)\n# TYPE netboot_datapath_lb_ingress_left gauge\nnetboot_datapath_lb_ingress_left {}",
            self.lb_ingress_left
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_unserved_services Services needing a feature this agent does not serve (SCTP, IPv6, NodePort, ...)\n# TYPE netboot_datapath_unserved_services gauge\nnetboot_datapath_unserved_services {}",
            self.unserved
        );
        // Until the first sweep the families are declared without a sample.
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_conntrack_entries Live entries of the per-packet path's flow tables (two per flow)\n# TYPE netboot_datapath_conntrack_entries gauge"
        );
        if let Some(ct) = &self.conntrack {
            let _ = writeln!(s, "netboot_datapath_conntrack_entries {}", ct.live);
        }
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_conntrack_capacity Entries the per-packet path's flow tables hold\n# TYPE netboot_datapath_conntrack_capacity gauge"
        );
        if let Some(ct) = &self.conntrack {
            let _ = writeln!(s, "netboot_datapath_conntrack_capacity {}", ct.capacity);
        }
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_pod_interfaces Pod interfaces carrying the tc path (socketLB.hostNamespaceOnly)\n# TYPE netboot_datapath_pod_interfaces gauge\nnetboot_datapath_pod_interfaces {}",
            self.pod_interfaces
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_conntrack_lapsed_deleted_total Lapsed flow entries the agent's sweeps deleted\n# TYPE netboot_datapath_conntrack_lapsed_deleted_total counter\nnetboot_datapath_conntrack_lapsed_deleted_total {}",
            self.conntrack_deleted
        );
        let fe = self.flow_events.unwrap_or_default();
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_flow_events_total Service flow events the socket LB wrote to the ring buffer (only while watched)\n# TYPE netboot_datapath_flow_events_total counter\nnetboot_datapath_flow_events_total {}",
            fe.emitted
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_flow_events_dropped_total Service flow events not written, by reason (rate_limited: over the per-CPU budget; ring_full: reader behind)\n# TYPE netboot_datapath_flow_events_dropped_total counter\nnetboot_datapath_flow_events_dropped_total{{reason=\"rate_limited\"}} {}\nnetboot_datapath_flow_events_dropped_total{{reason=\"ring_full\"}} {}",
            fe.rate_limited, fe.ring_full
        );
        let _ = writeln!(
            s,
            "# HELP netboot_datapath_flow_watchers Clients streaming /v1/flows now (events are on while above 0)\n# TYPE netboot_datapath_flow_watchers gauge\nnetboot_datapath_flow_watchers {}",
            fe.watchers
        );
        let _ = writeln!(s, "# HELP netboot_datapath_bpf_outcomes_total Socket LB decisions by outcome (per-CPU counters summed)");
        let _ = writeln!(s, "# TYPE netboot_datapath_bpf_outcomes_total counter");
        for c in &self.counters {
            let _ = writeln!(
                s,
                "netboot_datapath_bpf_outcomes_total{{outcome=\"{}\"}} {}",
                c.name, c.value
            );
        }
        // Per-Service families: always typed (the contract lists them), series
        // only with serviceMetrics (one per frontend and counter).
        for (name, help, field) in SERVICE_FAMILIES {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for r in &self.service_stats {
                let _ = writeln!(
                    s,
                    "{name}{{namespace=\"{}\",service=\"{}\",port=\"{}\",frontend=\"{}\"}} {}",
                    label_value(&r.namespace),
                    label_value(&r.service),
                    label_value(&r.port),
                    label_value(&r.frontend),
                    field(&r.stats)
                );
            }
        }
        crate::latency::write_metrics(&mut s, &self.network_programming, &self.sync_duration);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            node: "node-0".into(),
            kube_proxy_replacement: true,
            datapath_version: "0.1.0".into(),
            cgroup: "/sys/fs/cgroup".into(),
            bpffs: "/sys/fs/bpf/netboot".into(),
            api_endpoint: "https://127.0.0.1:6443".into(),
            links: vec![LinkStatus {
                point: "connect4".into(),
                link_id: 7,
                prog_id: 42,
                cgroup_id: 1,
            }],
            ready: true,
            services: 3,
            backends: 4,
            desired_services: 3,
            syncs: 2,
            last_sync_unix: 1_800_000_000,
            last_sync_millis: 12,
            kube_proxy_rules: "absent".into(),
            kube_proxy: KubeProxyState::Absent,
            kube_proxy_daemon_set: "kube-system/kube-proxy".into(),
            kube_proxy_cleanup: Cleanup::Active,
            features: vec![
                "clusterip".into(),
                "ipv4".into(),
                "tcp".into(),
                "udp".into(),
            ],
            counters: vec![Counter {
                name: "connect_translated".into(),
                value: 5,
            }],
            conntrack: Some(crate::conntrack::Sweep {
                live: 24,
                closing: 2,
                snat: 10,
                deleted: 3,
                capacity: 65536,
            }),
            conntrack_deleted: 7,
            lb_ingress_left: 1,
            lb_ingress_left_listed: vec![
                "d/web: lb.example (hostname only: the load balancer sends to the NodePorts)"
                    .into(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn status_text() {
        insta::assert_snapshot!(sample().render(true, 1_800_000_003));
    }

    /// The exposition has exactly the families the contract lists (which the
    /// shipped dashboard and alert rules are checked against).
    #[test]
    fn metrics_have_the_contracts_families() {
        use netboot_contract::metrics;
        let mut st = sample();
        st.map_usage = vec![MapUsage {
            map: "nb_lb4_svc".into(),
            entries: 10,
            capacity: 65536,
        }];
        for s in [Status::default(), st] {
            assert_eq!(
                metrics::exposed_families(&s.metrics()),
                metrics::families(metrics::DATAPATH)
            );
        }
    }

    #[test]
    fn map_usage_is_exposed_per_map() {
        let mut st = sample();
        st.kube_proxy_cleanup_blocked = true;
        st.map_usage = vec![
            MapUsage {
                map: "nb_lb4_svc".into(),
                entries: 10,
                capacity: 65536,
            },
            MapUsage {
                map: "nb_lb4_be".into(),
                entries: 7,
                capacity: 1024,
            },
        ];
        let m = st.metrics();
        for want in [
            "\nnetboot_datapath_map_entries{map=\"nb_lb4_svc\"} 10\n",
            "\nnetboot_datapath_map_entries{map=\"nb_lb4_be\"} 7\n",
            "\nnetboot_datapath_map_capacity{map=\"nb_lb4_svc\"} 65536\n",
            "\nnetboot_datapath_map_capacity{map=\"nb_lb4_be\"} 1024\n",
            "\nnetboot_datapath_kube_proxy_cleanup_blocked 1\n",
        ] {
            assert!(m.contains(want), "missing {want:?}:\n{m}");
        }
    }

    #[test]
    fn service_stats_are_labelled_series_only_when_filled() {
        let mut st = sample();
        let plain = st.metrics();
        assert!(plain.contains("# TYPE netboot_datapath_service_connections_total counter\n"));
        assert!(!plain.contains("netboot_datapath_service_connections_total{"));
        st.service_stats = vec![ServiceStatsRow::new(
            "default/web:http",
            "10.96.0.10:80/TCP".into(),
            crate::layout::SvcStats {
                translated: 5,
                refused: 2,
                affinity_hits: 3,
                tc_new_flows: 7,
                tc_dropped: 1,
            },
        )];
        let m = st.metrics();
        let labels =
            "{namespace=\"default\",service=\"web\",port=\"http\",frontend=\"10.96.0.10:80/TCP\"}";
        for (family, v) in [
            ("netboot_datapath_service_connections_total", 5),
            ("netboot_datapath_service_refused_total", 2),
            ("netboot_datapath_service_affinity_hits_total", 3),
            ("netboot_datapath_service_tc_flows_total", 7),
            ("netboot_datapath_service_tc_dropped_total", 1),
        ] {
            let want = format!("\n{family}{labels} {v}\n");
            assert!(m.contains(&want), "missing {want:?}:\n{m}");
        }
        assert_eq!(
            netboot_contract::metrics::exposed_families(&m),
            netboot_contract::metrics::exposed_families(&plain)
        );
    }

    #[test]
    fn service_stats_row_labels_come_from_the_frontend_name() {
        let r = ServiceStatsRow::new("ns/svc:", "x".into(), Default::default());
        assert_eq!(
            (r.namespace.as_str(), r.service.as_str(), r.port.as_str()),
            ("ns", "svc", "")
        );
        let r = ServiceStatsRow::new("odd", "x".into(), Default::default());
        assert_eq!((r.namespace.as_str(), r.service.as_str()), ("", "odd"));
    }

    #[test]
    fn metrics_text() {
        insta::assert_snapshot!(sample().metrics());
    }

    #[test]
    fn kube_proxy_line_and_metric() {
        let mut st = sample();
        st.kube_proxy = KubeProxyState::Installed;
        st.kube_proxy_cleanup = Cleanup::HeldBack;
        let text = st.render(false, 1_800_000_003);
        assert!(
            text.contains("KubeProxy:              installed (DaemonSet kube-system/kube-proxy), rules cleanup held back until kube-proxy is removed\n"),
            "{text}"
        );
        let m = st.metrics();
        assert!(m.contains("\nnetboot_kube_proxy_installed 1\n"), "{m}");
        assert!(
            m.contains("\nnetboot_datapath_kube_proxy_cleanup_held_back 1\n"),
            "{m}"
        );
        st.kube_proxy = KubeProxyState::Unknown;
        assert!(st.metrics().contains("\nnetboot_kube_proxy_installed 1\n"));
        // An older agent's /v1/status without the fields still decodes.
        let mut v = serde_json::to_value(sample()).unwrap();
        for k in ["kubeProxy", "kubeProxyDaemonSet", "kubeProxyCleanup"] {
            v.as_object_mut().unwrap().remove(k);
        }
        let old: Status = serde_json::from_value(v).unwrap();
        assert_eq!(old.kube_proxy, KubeProxyState::Unknown);
        assert_eq!(
            old.render(false, 0)
                .lines()
                .find(|l| l.starts_with("KubeProxy:")),
            Some("KubeProxy:              unknown")
        );
        let js = serde_json::to_value(sample()).unwrap();
        assert_eq!(js["kubeProxy"], "absent");
        assert_eq!(js["kubeProxyCleanup"], "active");
    }

    #[test]
    fn socket_termination_pending_is_not_said_to_be_unavailable() {
        // Why: it loads on a thread of its own, and a removal waits for it.
        let st = Status {
            socket_termination: SOCKET_TERMINATION_PENDING.into(),
            ..Default::default()
        };
        let text = st.render(false, 0);
        assert!(
            text.contains(
                "Socket termination:     pending (loading) (a removal before then waits for it)"
            ),
            "{text}"
        );
        assert!(!text.contains("NOT destroyed"), "{text}");
    }

    #[test]
    fn socket_termination_unavailable_is_said_plainly() {
        // Why: a kernel without bpf_sock_destroy must not fail silently.
        let mut st = Status {
            socket_termination:
                "unavailable: kernel has no bpf_sock_destroy kfunc (needs Linux >= 6.5)".into(),
            ..Default::default()
        };
        let text = st.render(false, 0);
        assert!(text.contains("Socket termination:     unavailable: kernel has no bpf_sock_destroy kfunc (needs Linux >= 6.5) (connected UDP sockets of removed backends are NOT destroyed)"), "{text}");
        st.socket_termination = "available".into();
        st.sockets_destroyed = 3;
        let text = st.render(false, 0);
        assert!(
            text.contains("Socket termination:     available (connected UDP), 3 sockets destroyed"),
            "{text}"
        );
    }

    #[test]
    fn nodeport_devices_or_their_absence_are_said_plainly() {
        // Why: an agent that serves no traffic from outside must say so.
        let mut st = Status {
            nodeport_devices: "none: no interface carries the Node's address 192.0.2.99".into(),
            ..Default::default()
        };
        let text = st.render(false, 0);
        assert!(text.contains("NodePort devices:       none (no interface carries the Node's address 192.0.2.99): NodePorts, externalIPs and LB IPs are NOT served to traffic from outside the node"), "{text}");
        st.nodeport_devices = "eth0 (SNAT 192.168.50.1)".into();
        st.health_check_ports = 2;
        let text = st.render(false, 0);
        assert!(
            text.contains(
                "NodePort devices:       eth0 (SNAT 192.168.50.1), 2 healthCheckNodePorts"
            ),
            "{text}"
        );
    }

    #[test]
    fn map_pressure_and_refused_sizes_are_shown_everywhere() {
        let mut st = sample();
        st.synced = true;
        st.ready = false;
        st.unprogrammed_frontends = 2;
        st.map_pressure =
            vec!["map nb_lb4_svc full: 2 frontends not programmed (first 10.96.0.9:80/TCP)".into()];
        st.map_size_changes = vec![MapSizeChange {
            map: "nb_lb4_svc".into(),
            pinned: 4096,
            configured: 8192,
        }];
        let st = st.with_conditions();
        let text = st.render(false, 1_800_000_003);
        assert!(text.contains("Map pressure:           MapFull: 2 frontends, 0 backends not programmed\n                        map nb_lb4_svc full: 2 frontends"), "{text}");
        assert!(text.contains("Map size change:        refused: nb_lb4_svc: pinned with 4096 entries, mapSizes asks 8192"), "{text}");
        let m = st.metrics();
        assert!(m.contains("\nnetboot_datapath_map_full 1\n"), "{m}");
        assert!(
            m.contains("\nnetboot_datapath_unprogrammed{kind=\"frontend\"} 2\n"),
            "{m}"
        );
        assert!(
            m.contains("\nnetboot_datapath_map_size_change_refused 1\n"),
            "{m}"
        );
        let js = serde_json::to_value(&st).unwrap();
        assert_eq!(js["conditions"][0]["type"], "MapFull");
        assert_eq!(js["conditions"][0]["status"], "True");
        assert_eq!(js["conditions"][1]["type"], "MapSizeChangeRefused");
        assert_eq!(js["conditions"][1]["status"], "True");
        let (code, body) = crate::http::readyz(&st);
        assert_eq!(code, 503);
        assert!(
            body.starts_with("maps full: 2 frontends and 0 backends not programmed"),
            "{body}"
        );
        let (code, body) = crate::http::readyz(&Status::default());
        assert_eq!(
            (code.as_u16(), body.as_str()),
            (503, "initial sync not complete\n")
        );
    }

    #[test]
    fn unserved_services_are_counted_listed_and_exported() {
        let mut st = sample();
        st.unserved = 3;
        st.unserved_services = vec![
            UnservedService {
                service: "d/sctp".into(),
                needs: vec!["sctp".into()],
            },
            UnservedService {
                service: "d/web".into(),
                needs: vec!["nodeport".into(), "ipv6".into()],
            },
        ];
        let text = st.render(false, 1_800_000_003);
        assert!(
            text.contains("Unserved:               3 Services need what this agent does not serve"),
            "{text}"
        );
        assert!(
            text.contains("\n                        d/web: nodeport, ipv6\n"),
            "{text}"
        );
        assert!(text.contains("… and 1 more"), "{text}");
        assert!(st
            .metrics()
            .contains("\nnetboot_datapath_unserved_services 3\n"));
        assert!(!sample().render(false, 0).contains("Unserved"));
        let js = serde_json::to_value(&st).unwrap();
        assert_eq!(js["unservedServices"][1]["needs"][0], "nodeport");
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
