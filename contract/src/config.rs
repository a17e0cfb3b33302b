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
    /// Entries of `nb_lb4_revnat` (service ids are u16: at most 65535 used).
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
    fn ipv6_host_is_bracketed() {
        let c = Config::parse("apiServer: {host: 'fd00::1', port: 6443}", Path::new("c")).unwrap();
        assert_eq!(c.api_url(), "https://[fd00::1]:6443");
    }
}
