//! Command-line arguments (the only place clap structs live).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// netboot's eBPF kube-proxy replacement.
#[derive(Debug, Parser)]
#[command(name = "netboot-datapath", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the node agent (load, attach, watch, reconcile, hand over, serve status).
    Agent(AgentArgs),
    /// Print whether this node runs the kube-proxy replacement, and details.
    Status(StatusArgs),
    /// Service frontends and their backends.
    Service {
        /// What to do.
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Raw BPF map views.
    Bpf {
        /// Which maps.
        #[command(subcommand)]
        cmd: BpfCmd,
    },
    /// Watch Service flows (socket-LB decisions) live, like `hubble observe`.
    Monitor(MonitorArgs),
    /// Remove (or with --dry-run, list) kube-proxy's KUBE-* rules and nft tables.
    CleanupKubeProxy(CleanupArgs),
    /// Detach the socket LB and remove every pin (ends translation on this node).
    Uninstall(PinArgs),
}

/// `agent` flags (contracts.md; every flag has an env form).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent ConfigMap's config.yaml.
    #[arg(
        long,
        env = "NETBOOT_CONFIG",
        default_value = netboot_contract::agent::CONFIG_PATH
    )]
    pub config: PathBuf,
    /// The Node this agent serves.
    #[arg(long, env = "NETBOOT_NODE_NAME")]
    pub node_name: String,
    /// cgroup2 directory the socket LB attaches to [default: first cgroup2 mount].
    #[arg(long, env = "NETBOOT_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Pin root (mounted as bpffs if not yet).
    #[arg(long, env = "NETBOOT_BPFFS", default_value = "/sys/fs/bpf/netboot")]
    pub bpffs: PathBuf,
    /// Network namespace whose KUBE-* rules the agent cleans [default: own].
    #[arg(long, env = "NETBOOT_RULES_NETNS")]
    pub rules_netns: Option<PathBuf>,
    /// Credentials; the server address is always replaced by apiServer from the config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /healthz, /readyz, /metrics, /v1/status (keep it on loopback: the pod is hostNetwork).
    #[arg(long, env = "NETBOOT_LISTEN", default_value = "127.0.0.1:9890")]
    pub listen: String,
    /// Address of a second listener serving only /metrics (Prometheus) [default: none].
    #[arg(long, env = "NETBOOT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Serve the Services/EndpointSlices in this YAML file instead of watching the API.
    #[arg(long, env = "NETBOOT_STATIC_SERVICES", hide = true)]
    pub static_services: Option<PathBuf>,
    /// Seconds between kube-proxy rule checks / Node annotation refreshes.
    #[arg(long, env = "NETBOOT_NODE_INTERVAL", default_value_t = 30, hide = true)]
    pub node_interval: u64,
    /// With --static-services: treat kube-proxy as installed (its rules are never removed).
    #[arg(
        long,
        env = "NETBOOT_KUBE_PROXY_PRESENT",
        hide = true,
        requires = "static_services"
    )]
    pub kube_proxy_present: bool,
    /// Interfaces for NodePorts/externalIPs/LB IPs from outside the node, comma-separated [default: config's nodePortDevices, else those carrying the Node's InternalIP/ExternalIP].
    #[arg(long, env = "NETBOOT_NODEPORT_DEVICES", value_delimiter = ',')]
    pub nodeport_devices: Option<Vec<String>>,
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable columns.
    #[default]
    Text,
    /// JSON.
    Json,
}

/// `status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// More detail (socket LB links, modes, counters).
    #[arg(long, short)]
    pub verbose: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
    /// Ask the agent at this address (host:port) instead of reading the pins.
    #[arg(long, env = "NETBOOT_AGENT")]
    pub agent: Option<String>,
    /// Pin root to read when no agent is given.
    #[arg(long, env = "NETBOOT_BPFFS", default_value = "/sys/fs/bpf/netboot")]
    pub bpffs: PathBuf,
}

/// `monitor` flags.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// The local agent's health listener (host:port).
    #[arg(long, env = "NETBOOT_AGENT", default_value = "127.0.0.1:9890")]
    pub agent: String,
    /// Only flows to this Service (namespace/name).
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// Only flows to this backend pod (namespace/name).
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// Only flows with this verdict (translated, affinity-hit, refused, error, observed, source-range, denied, terminated).
    #[arg(long)]
    pub verdict: Option<String>,
    /// Only this protocol (tcp, udp).
    #[arg(long)]
    pub proto: Option<String>,
    /// Exit after this many flows [default: run until interrupted].
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Output format: one human line per flow, or the agent's JSON lines.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// Flags of the map-reading list commands.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Pin root.
    #[arg(long, env = "NETBOOT_BPFFS", default_value = "/sys/fs/bpf/netboot")]
    pub bpffs: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// `service …`.
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// List frontends and backends (ID, Frontend, Service Type, Backend).
    List(ServiceListArgs),
}

/// `service list`.
#[derive(Debug, Args)]
pub struct ServiceListArgs {
    /// Pins and output format.
    #[command(flatten)]
    pub pins: PinArgs,
    /// Per-Service counters instead of backends: connections translated,
    /// refused (no backend), affinity hits, per-packet path flows and drops
    /// (`nb_svc_stats`, CPUs summed; since the frontend got its id).
    #[arg(long)]
    pub stats: bool,
}

/// `bpf …`.
#[derive(Debug, Subcommand)]
pub enum BpfCmd {
    /// Load-balancing maps.
    Lb {
        /// What to do.
        #[command(subcommand)]
        cmd: LbCmd,
    },
    /// The per-packet path's flow table (north–south NAT).
    Ct {
        /// What to do.
        #[command(subcommand)]
        cmd: CtCmd,
    },
}

/// `bpf ct …`.
#[derive(Debug, Subcommand)]
pub enum CtCmd {
    /// Every nb_ct4 entry: PROTO, FROM (as on the wire), TO (rewritten),
    /// DIRECTION, SERVICE ID, FLAGS, EXPIRES IN.
    List(PinArgs),
}

/// `bpf lb …`.
#[derive(Debug, Subcommand)]
pub enum LbCmd {
    /// Every nb_lb4_svc entry: SERVICE ADDRESS, BACKEND ADDRESS (REVNAT_ID) (SLOT).
    List(PinArgs),
}

/// `cleanup-kube-proxy` flags.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Network namespace file to work in [default: own].
    #[arg(long, env = "NETBOOT_RULES_NETNS")]
    pub rules_netns: Option<PathBuf>,
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// A Service address (ClusterIP, externalIP, LB IP) whose IPVS virtual
    /// servers are kube-proxy's even when not bound on kube-ipvs0; repeatable.
    #[arg(long, value_name = "IP")]
    pub service_ip: Vec<std::net::IpAddr>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}
