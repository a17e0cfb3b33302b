//! The agent's `config.yaml` (docs/contracts.md): the one schema both sides
//! use. The bootstrapper renders it (templates/agent-configmap.yaml.hbs) and
//! parses what it rendered with [`Config::parse`] before applying it; the
//! agent parses it with the same function at start. The defaults live here
//! too: [`MapSizes::DEFAULT`] (which `datapath/bpf/lb.h`'s `NB_DEFAULT_*` are
//! checked against at compile time) and [`DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for the schema.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// 1-based line (0 if unknown).
        line: usize,
        /// 1-based column (0 if unknown).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Field path.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Where the API server is: never a ClusterIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiServer {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// BPF map sizes (max entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct MapSizes {
    /// Frontend + slot entries of `nb_lb4_svc`.
    pub services: u32,
    /// Entries of `nb_lb4_be` (also `nb_lb4_affmatch`, `nb_lb4_rev_sk`).
    pub backends: u32,
    /// Entries of the affinity LRU.
    pub affinity: u32,
    /// Entries of `nb_lb4_revnat`: at most this many frontends (over both families).
    pub reverse_nat: u32,
}

impl MapSizes {
    /// The sizes when `mapSizes` (or one of its keys) is left out; also
    /// `NB_DEFAULT_*` in `datapath/bpf/lb.h` (`NB_DEFAULT_REV_SK` is
    /// `backends`).
    pub const DEFAULT: Self = Self {
        services: 65536,
        backends: 262144,
        affinity: 65536,
        reverse_nat: 65536,
    };

    /// The smallest size the agent accepts for any map.
    pub const MIN: u32 = 16;
}

impl Default for MapSizes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// kube-proxy's DaemonSet: while it exists (or before the agent knows), the
/// agent does not remove kube-proxy's rules (see `kube_proxy.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KubeProxyRef {
    /// Namespace of the DaemonSet.
    pub namespace: String,
    /// Name of the DaemonSet.
    pub daemon_set: String,
}

impl Default for KubeProxyRef {
    fn default() -> Self {
        Self {
            namespace: "kube-system".into(),
            daemon_set: "kube-proxy".into(),
        }
    }
}

impl std::fmt::Display for KubeProxyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.daemon_set)
    }
}

/// How the per-packet path (traffic from outside the node) picks a backend
/// for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// A random slot per new flow.
    #[default]
    Random,
    /// Maglev consistent hashing of the flow's source (address, port,
    /// protocol, destination port): every node picks the same backend for
    /// the same flow, and removing one of N backends moves about 1/N of
    /// the flows.
    Maglev,
}

impl Algorithm {
    /// Its name in config.yaml and the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
}

/// Maglev lookup table size when left out (Cilium's default): a prime.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16381;
/// The largest table the BPF layout holds (`NB_MAGLEV_MAX` in lb.h).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 16381;
/// The smallest table accepted.
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 251;
/// The seed of the backends' Maglev permutations: one constant, so every
/// node builds the same table from the same backends.
pub const MAGLEV_SEED: u64 = 0x6e62_6d61_676c_6576; // "nbmaglev"

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// `loadBalancing`: the per-packet path's backend selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LoadBalancing {
    /// `random` (default) or `maglev`.
    pub algorithm: Algorithm,
    /// Entries of each Maglev lookup table: a prime in
    /// [`MIN_MAGLEV_TABLE_SIZE`]..=[`MAX_MAGLEV_TABLE_SIZE`], at least 100×
    /// the largest backend count for good balance.
    pub maglev_table_size: u32,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Random,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// `conntrack`: lifetimes (seconds) of the per-packet path's tracked flows
/// (north–south: NodePort, externalIPs, LB IPs from outside the node). A
/// flow's entries lapse this long after its last packet; a lapsed entry is
/// treated as absent and the agent deletes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Conntrack {
    /// Established TCP (kube-proxy's `conntrack.tcpEstablishedTimeout`
    /// default: 24 h).
    pub tcp_established_timeout_seconds: u32,
    /// TCP before the handshake completes (a bare SYN seen only): 60 s.
    pub tcp_syn_timeout_seconds: u32,
    /// TCP after a FIN or RST in either direction: 10 s. A bare SYN on a
    /// closing flow starts a new one at once (the client reused its port).
    pub tcp_close_timeout_seconds: u32,
    /// UDP, since the last packet in either direction: 60 s.
    pub udp_timeout_seconds: u32,
}

impl Conntrack {
    /// The lifetimes when `conntrack` (or one of its keys) is left out; also
    /// `NB_CT_*_DEFAULT` in `datapath/bpf/lb.h`.
    pub const DEFAULT: Self = Self {
        tcp_established_timeout_seconds: 86400,
        tcp_syn_timeout_seconds: 60,
        tcp_close_timeout_seconds: 10,
        udp_timeout_seconds: 60,
    };

    /// The largest lifetime accepted (7 days), for every key.
    pub const MAX_SECONDS: u32 = 7 * 86400;
}

impl Default for Conntrack {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// `socketLB`: where the socket-level load balancer acts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SocketLb {
    /// Cilium's `socketLB.hostNamespaceOnly`: translate at connect()/sendmsg()
    /// only for sockets of the host's network namespace. Pods' sockets keep
    /// the Service address they asked for (a sidecar's iptables REDIRECT
    /// reads it back with `SO_ORIGINAL_DST`); their packets are translated by
    /// a tc program on the host side of their interface instead. Default false.
    pub host_namespace_only: bool,
    /// The pod interfaces (host side) that get the tc program while
    /// `hostNamespaceOnly` is on: interface names or globs (`*` any run of
    /// characters, `?` one), matched against every interface of the agent's
    /// network namespace. Default [`SocketLb::DEFAULT_POD_INTERFACES`].
    pub pod_interfaces: Vec<String>,
}

impl SocketLb {
    /// The pod interface patterns when left out: Cilium (`lxc*`), Calico
    /// (`cali*`), the bridge/ptp plugins behind flannel, kindnet and weave
    /// (`veth*`), AWS VPC CNI (`eni*`), GKE (`gke*`), Azure CNI (`azv*`), and
    /// the local cluster's podnet (`p` + 12 characters of the pod uid,
    /// `p????????-???`, tests/harness/src/names.rs).
    pub const DEFAULT_POD_INTERFACES: [&'static str; 7] = [
        "lxc*",
        "cali*",
        "veth*",
        "eni*",
        "gke*",
        "azv*",
        "p????????-???",
    ];

    /// Whether interface `name` is a pod interface.
    pub fn is_pod_interface(&self, name: &str) -> bool {
        self.pod_interfaces.iter().any(|p| glob_match(p, name))
    }
}

impl Default for SocketLb {
    fn default() -> Self {
        Self {
            host_namespace_only: false,
            pod_interfaces: Self::DEFAULT_POD_INTERFACES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Whether `name` matches the glob `pattern`: `*` any run of characters
/// (also none), `?` exactly one, anything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with one backtrack point (the last `*`).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `sessionAffinityTimeoutSeconds` when left out: kube-proxy's default for
/// ClientIP affinity (3 hours).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;

fn default_timeout() -> u32 {
    DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS
}

fn default_true() -> bool {
    true
}

/// `config.yaml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// API server address the agent dials (replaces the kubeconfig's server).
    pub api_server: ApiServer,
    /// true = replace kube-proxy (translate), false = coexist (observe only).
    #[serde(default = "default_true")]
    pub kube_proxy_replacement: bool,
    /// ClientIP affinity timeout when the Service sets none.
    #[serde(default = "default_timeout")]
    pub session_affinity_timeout_seconds: u32,
    /// Map sizes.
    #[serde(default)]
    pub map_sizes: MapSizes,
    /// Replace mode: remove kube-proxy's KUBE-* rules on this node.
    #[serde(default = "default_true")]
    pub cleanup_kube_proxy_rules: bool,
    /// kube-proxy's DaemonSet, watched to hold the cleanup back while it exists.
    #[serde(default)]
    pub kube_proxy: KubeProxyRef,
    /// Interfaces the per-packet path (NodePorts, externalIPs, LB IPs from
    /// outside the node) attaches to. None: every interface carrying one of
    /// the Node's InternalIP/ExternalIP addresses. The agent's
    /// `--nodeport-devices` flag overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port_devices: Option<Vec<String>>,
    /// Backend selection of the per-packet path.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Lifetimes of the per-packet path's tracked flows.
    #[serde(default)]
    pub conntrack: Conntrack,
    /// Where the socket LB acts (`hostNamespaceOnly`) and which interfaces
    /// are pods' (`podInterfaces`).
    #[serde(default, rename = "socketLB")]
    pub socket_lb: SocketLb,
    /// Export the per-Service counters (`nb_svc_stats`) on /metrics as
    /// `netboot_datapath_service_*_total{namespace,service,...}`: one series
    /// per Service frontend and counter, so off by default (cardinality).
    /// The datapath counts either way (`service list --stats`).
    #[serde(default)]
    pub service_metrics: bool,
}

impl Config {
    /// Parses YAML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        let invalid = |field, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message: message.to_string(),
        };
        if cfg.api_server.host.is_empty() {
            return Err(invalid("apiServer.host", "must not be empty"));
        }
        if cfg.api_server.port == 0 {
            return Err(invalid("apiServer.port", "must not be 0"));
        }
        if cfg.kube_proxy.namespace.is_empty() {
            return Err(invalid("kubeProxy.namespace", "must not be empty"));
        }
        if cfg.kube_proxy.daemon_set.is_empty() {
            return Err(invalid("kubeProxy.daemonSet", "must not be empty"));
        }
        if cfg
            .node_port_devices
            .iter()
            .flatten()
            .any(|d| d.is_empty() || d.len() > 15 || d.contains(['/', ' ', ',']))
        {
            return Err(invalid(
                "nodePortDevices",
                "interface names are 1-15 characters without '/', ',' or spaces",
            ));
        }
        if let Some(p) = cfg
            .socket_lb
            .pod_interfaces
            .iter()
            .find(|p| p.is_empty() || p.len() > 15 || p.contains(['/', ' ', ',']))
        {
            return Err(invalid(
                "socketLB.podInterfaces",
                &format!(
                    "{p:?}: interface names and globs are 1-15 characters without '/', ',' or spaces"
                ),
            ));
        }
        if cfg.socket_lb.host_namespace_only && cfg.socket_lb.pod_interfaces.is_empty() {
            return Err(invalid(
                "socketLB.podInterfaces",
                "must name at least one interface or glob while hostNamespaceOnly is true (pods would reach no Service)",
            ));
        }
        let t = cfg.load_balancing.maglev_table_size;
        if !(MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&t) || !is_prime(t) {
            return Err(invalid(
                "loadBalancing.maglevTableSize",
                &format!(
                    "{t} must be a prime between {MIN_MAGLEV_TABLE_SIZE} and {MAX_MAGLEV_TABLE_SIZE}"
                ),
            ));
        }
        let ct = cfg.conntrack;
        for (field, v) in [
            (
                "conntrack.tcpEstablishedTimeoutSeconds",
                ct.tcp_established_timeout_seconds,
            ),
            ("conntrack.tcpSynTimeoutSeconds", ct.tcp_syn_timeout_seconds),
            (
                "conntrack.tcpCloseTimeoutSeconds",
                ct.tcp_close_timeout_seconds,
            ),
            ("conntrack.udpTimeoutSeconds", ct.udp_timeout_seconds),
        ] {
            if !(1..=Conntrack::MAX_SECONDS).contains(&v) {
                return Err(invalid(
                    field,
                    &format!(
                        "{v} must be between 1 and {} (7 days)",
                        Conntrack::MAX_SECONDS
                    ),
                ));
            }
        }
        let m = cfg.map_sizes;
        let min = MapSizes::MIN;
        if m.services < min || m.backends < min || m.affinity < min || m.reverse_nat < min {
            return Err(invalid("mapSizes", "every size must be at least 16"));
        }
        Ok(cfg)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `https://{host}:{port}`: the only address the agent dials.
    pub fn api_url(&self) -> String {
        let h = &self.api_server.host;
        if h.contains(':') && !h.starts_with('[') {
            format!("https://[{h}]:{}", self.api_server.port)
        } else {
            format!("https://{h}:{}", self.api_server.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_example_parses() {
        let text = r#"
apiServer: {host: "127.0.0.1", port: 6443}   # never a ClusterIP
kubeProxyReplacement: true                   # true = replace, false = coexist
sessionAffinityTimeoutSeconds: 10800         # default for ClientIP affinity when the Service has none
mapSizes: {services: 65536, backends: 262144, affinity: 65536, reverseNat: 65536}
cleanupKubeProxyRules: true                  # replace mode: remove KUBE-* rules on this node
"#;
        let c = Config::parse(text, Path::new("config.yaml")).unwrap();
        assert_eq!(c.api_url(), "https://127.0.0.1:6443");
        assert!(c.kube_proxy_replacement);
        assert_eq!(c.map_sizes, MapSizes::default());
        assert_eq!(c.kube_proxy, KubeProxyRef::default());
        assert_eq!(c.kube_proxy.to_string(), "kube-system/kube-proxy");
    }

    #[test]
    fn kube_proxy_daemon_set_is_configurable_and_defaulted() {
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nkubeProxy: {namespace: kp, daemonSet: proxy}\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.kube_proxy.to_string(), "kp/proxy");
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nkubeProxy: {daemonSet: proxy}\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.kube_proxy.to_string(), "kube-system/proxy");
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nkubeProxy: {}\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.kube_proxy, KubeProxyRef::default());
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nkubeProxy: {namespace: kube-system, name: x}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.yaml:2:") && e.contains("name"), "{e}");
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nkubeProxy: {daemonSet: ''}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "c.yaml: kubeProxy.daemonSet: must not be empty");
    }

    #[test]
    fn conntrack_lifetimes_default_per_key_and_are_bounded() {
        let c = Config::parse("apiServer: {host: a, port: 1}\n", Path::new("c")).unwrap();
        assert_eq!(c.conntrack, Conntrack::DEFAULT);
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nconntrack: {udpTimeoutSeconds: 5}\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.conntrack.udp_timeout_seconds, 5);
        assert_eq!(c.conntrack.tcp_established_timeout_seconds, 86400);
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nconntrack: {tcpCloseTimeoutSeconds: 0}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "c.yaml: conntrack.tcpCloseTimeoutSeconds: 0 must be between 1 and 604800 (7 days)"
        );
    }

    #[test]
    fn unknown_field_is_reported_with_position() {
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nbogus: 1\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.yaml:2:"), "{e}");
    }

    #[test]
    fn unknown_api_server_field_is_refused() {
        let e = Config::parse(
            "apiServer: {host: a, port: 1, scheme: http}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.yaml:1:") && e.contains("scheme"), "{e}");
    }

    #[test]
    fn left_out_fields_take_the_contract_defaults() {
        let c = Config::parse("apiServer: {host: a, port: 1}\n", Path::new("c")).unwrap();
        assert_eq!(c.map_sizes, MapSizes::DEFAULT);
        assert_eq!(
            c.session_affinity_timeout_seconds,
            DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS
        );
        assert!(c.kube_proxy_replacement && c.cleanup_kube_proxy_rules);
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nmapSizes: {backends: 64}\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(
            c.map_sizes,
            MapSizes {
                backends: 64,
                ..MapSizes::DEFAULT
            }
        );
    }

    #[test]
    fn load_balancing_and_nodeport_devices_parse_and_are_checked() {
        let c = Config::parse("apiServer: {host: a, port: 1}\n", Path::new("c")).unwrap();
        assert_eq!(c.load_balancing, LoadBalancing::default());
        assert_eq!(c.load_balancing.maglev_table_size, 16381);
        assert_eq!(c.node_port_devices, None);
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nloadBalancing: {algorithm: maglev, maglevTableSize: 251}\nnodePortDevices: [eth0, bond0.100]\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.load_balancing.algorithm, Algorithm::Maglev);
        assert_eq!(c.load_balancing.maglev_table_size, 251);
        assert_eq!(c.node_port_devices.unwrap(), ["eth0", "bond0.100"]);
        for (bad, field) in [
            (
                "loadBalancing: {maglevTableSize: 16380}",
                "loadBalancing.maglevTableSize",
            ),
            (
                "loadBalancing: {maglevTableSize: 65521}",
                "loadBalancing.maglevTableSize",
            ),
            ("nodePortDevices: ['']", "nodePortDevices"),
        ] {
            let e = Config::parse(
                &format!("apiServer: {{host: a, port: 1}}\n{bad}\n"),
                Path::new("c.yaml"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.starts_with(&format!("c.yaml: {field}: ")), "{e}");
        }
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nloadBalancing: {algorithm: hash}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.yaml:2:"), "{e}");
        assert!(is_prime(16381) && is_prime(251) && !is_prime(16383) && !is_prime(1));
    }

    #[test]
    fn socket_lb_defaults_parse_and_are_checked() {
        let c = Config::parse("apiServer: {host: a, port: 1}\n", Path::new("c")).unwrap();
        assert_eq!(c.socket_lb, SocketLb::default());
        assert!(!c.socket_lb.host_namespace_only);
        for (name, pod) in [
            ("lxc1a2b3c", true),
            ("lxc_health", true),
            ("cali12345abcdef", true),
            ("vethd3adb33f", true),
            ("p3f2a9c1b-7d4", true),
            ("eth0", false),
            ("lo", false),
            ("p-cl", false),
            ("n-node-0", false),
            ("cilium_host", false),
        ] {
            assert_eq!(c.socket_lb.is_pod_interface(name), pod, "{name}");
        }
        let c = Config::parse(
            "apiServer: {host: a, port: 1}\nsocketLB: {hostNamespaceOnly: true, podInterfaces: [hn-*, tap?]}\n",
            Path::new("c"),
        )
        .unwrap();
        assert!(c.socket_lb.host_namespace_only);
        assert!(c.socket_lb.is_pod_interface("hn-p1") && c.socket_lb.is_pod_interface("tap0"));
        assert!(!c.socket_lb.is_pod_interface("tap10") && !c.socket_lb.is_pod_interface("veth0"));
        for (bad, want) in [
            (
                "socketLB: {hostNamespaceOnly: true, podInterfaces: []}",
                "c.yaml: socketLB.podInterfaces: must name at least one",
            ),
            (
                "socketLB: {podInterfaces: ['a b']}",
                "c.yaml: socketLB.podInterfaces: \"a b\": interface names",
            ),
        ] {
            let e = Config::parse(
                &format!("apiServer: {{host: a, port: 1}}\n{bad}\n"),
                Path::new("c.yaml"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let e = Config::parse(
            "apiServer: {host: a, port: 1}\nsocketLB: {hostNamespace: true}\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("c.yaml:2:") && e.contains("hostNamespace"),
            "{e}"
        );
    }

    #[test]
    fn globs_match_like_a_shell() {
        for (p, n, m) in [
            ("*", "", true),
            ("a*", "a", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbc", false),
            ("*b*c", "abxbc", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("abc", "abc", true),
            ("abc", "abcd", false),
        ] {
            assert_eq!(glob_match(p, n), m, "{p} {n}");
        }
    }

    #[test]
    fn ipv6_host_is_bracketed() {
        let c = Config::parse("apiServer: {host: 'fd00::1', port: 6443}", Path::new("c")).unwrap();
        assert_eq!(c.api_url(), "https://[fd00::1]:6443");
    }
}
