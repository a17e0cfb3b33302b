//! kube-proxy's mode, two ways: as its ConfigMap configures it (the
//! KubeProxyConfiguration in the `config.conf` key, `mode`), and as each
//! node's agent finds it (`netboot.io/kube-proxy-mode`: the modes whose state
//! is on the node). `netboot status` and `netboot plan` show both; the plan
//! says when the agents will clear IPVS state after the handover.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netboot_contract::node::{parse_modes, KubeProxyMode, KUBE_PROXY_MODE};
use serde::{Serialize, Serializer};

/// The key of kube-proxy's ConfigMap holding its KubeProxyConfiguration
/// (kubeadm's; the DaemonSet runs `kube-proxy --config=…/config.conf`).
pub const CONFIG_KEY: &str = "config.conf";

/// A KubeProxyConfiguration `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// iptables, nftables or ipvs.
    Linux(KubeProxyMode),
    /// Windows' `kernelspace` (no state on Linux nodes for the agents to clear).
    Kernelspace,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linux(m) => m.as_str(),
            Self::Kernelspace => "kernelspace",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ProxyMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The mode kube-proxy's ConfigMap configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredMode {
    pub mode: ProxyMode,
    /// `mode` is empty or absent: kube-proxy's Linux default, iptables.
    pub default: bool,
}

/// Why the ConfigMap's mode cannot be read. Each names the ConfigMap and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("{object}: no `{CONFIG_KEY}` key (where kubeadm keeps the KubeProxyConfiguration)")]
    NoKey { object: String },
    #[error("{object}: {CONFIG_KEY}: not YAML: {message}")]
    Yaml { object: String, message: String },
    #[error("{object}: {CONFIG_KEY}: not a KubeProxyConfiguration mapping")]
    NotMapping { object: String },
    #[error("{object}: {CONFIG_KEY}: mode: expected a string, found {found}")]
    NotString { object: String, found: String },
    #[error(
        "{object}: {CONFIG_KEY}: mode: `{value}` is not one of iptables, nftables, ipvs, kernelspace"
    )]
    Unknown { object: String, value: String },
}

/// The `mode` of a KubeProxyConfiguration (`config`, the text of the
/// `config.conf` key of ConfigMap `object`).
pub fn parse_config(object: &str, config: &str) -> Result<ConfiguredMode, ModeError> {
    let v: serde_yaml::Value = serde_yaml::from_str(config).map_err(|e| ModeError::Yaml {
        object: object.into(),
        message: e.to_string(),
    })?;
    let map = match &v {
        serde_yaml::Value::Mapping(m) => m,
        // An empty key: no settings, every one kube-proxy's default.
        serde_yaml::Value::Null => {
            return Ok(ConfiguredMode {
                mode: ProxyMode::Linux(KubeProxyMode::Iptables),
                default: true,
            })
        }
        _ => {
            return Err(ModeError::NotMapping {
                object: object.into(),
            })
        }
    };
    let value = match map.get("mode") {
        None | Some(serde_yaml::Value::Null) => "",
        Some(serde_yaml::Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(ModeError::NotString {
                object: object.into(),
                found: serde_yaml::to_string(other)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "a non-string".into()),
            })
        }
    };
    let mode = match value {
        "kernelspace" => Some(ProxyMode::Kernelspace),
        v => KubeProxyMode::from_config(v).map(ProxyMode::Linux),
    };
    mode.map(|mode| ConfiguredMode {
        mode,
        default: value.trim().is_empty(),
    })
    .ok_or_else(|| ModeError::Unknown {
        object: object.into(),
        value: value.into(),
    })
}

/// [`parse_config`] of ConfigMap `object`'s data.
pub fn from_data(
    object: &str,
    data: Option<&BTreeMap<String, String>>,
) -> Result<ConfiguredMode, ModeError> {
    let config = data
        .and_then(|d| d.get(CONFIG_KEY))
        .ok_or_else(|| ModeError::NoKey {
            object: object.into(),
        })?;
    parse_config(object, config)
}

/// What a node's agent reports (`netboot.io/kube-proxy-mode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMode {
    pub node: String,
    /// The annotation as written (`iptables`, `iptables+ipvs`, `none`,
    /// `unknown`, …); `None` when the agent has not written it.
    pub mode: Option<String>,
}

impl NodeMode {
    /// From a Node's metadata.
    pub fn of(meta: &ObjectMeta) -> Self {
        NodeMode {
            node: meta.name.clone().unwrap_or_default(),
            mode: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(KUBE_PROXY_MODE))
                .cloned(),
        }
    }

    fn has_ipvs(&self) -> bool {
        self.mode
            .as_deref()
            .and_then(parse_modes)
            .is_some_and(|m| m.contains(&KubeProxyMode::Ipvs))
    }
}

/// kube-proxy runs (or ran) in IPVS mode: its ConfigMap says `ipvs`, or a
/// node's agent found IPVS state. After a handover the agents clear it.
pub fn ipvs_in_use(configured: Option<&ConfiguredMode>, nodes: &[NodeMode]) -> bool {
    configured.is_some_and(|c| c.mode == ProxyMode::Linux(KubeProxyMode::Ipvs))
        || nodes.iter().any(NodeMode::has_ipvs)
}

/// The plan's one line on IPVS state.
pub const IPVS_CLEANUP_NOTE: &str = "kube-proxy's IPVS mode: once kube-proxy is gone, each agent also clears its IPVS virtual servers, the kube-ipvs0 device and its ipsets";

/// The configured mode for people: `ipvs in its ConfigMap`, `iptables in
/// its ConfigMap (mode unset: kube-proxy's default)`, `ConfigMap absent`, or
/// `unknown (why)`.
pub fn configured_text(configured: Option<&ConfiguredMode>, error: Option<&str>) -> String {
    match (configured, error) {
        (Some(c), _) if c.default => format!(
            "{} in its ConfigMap (mode unset: kube-proxy's default)",
            c.mode
        ),
        (Some(c), _) => format!("{} in its ConfigMap", c.mode),
        (None, Some(e)) => format!("unknown ({e})"),
        (None, None) => "ConfigMap absent".into(),
    }
}

/// The nodes' reported modes for people, grouped by mode:
/// `ipvs on node-0, node-1; not reported on node-2` (at most `max` names a
/// group, then how many more).
pub fn nodes_text(nodes: &[NodeMode], max: usize) -> String {
    if nodes.is_empty() {
        return "no nodes".into();
    }
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in nodes {
        groups
            .entry(n.mode.as_deref().unwrap_or("not reported"))
            .or_default()
            .push(&n.node);
    }
    groups
        .into_iter()
        .map(|(mode, names)| {
            let shown = names
                .iter()
                .take(max)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > max {
                format!("{mode} on {shown} … {} more", names.len() - max)
            } else {
                format!("{mode} on {shown}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJ: &str = "ConfigMap/kube-system/kube-proxy";

    fn mode(config: &str) -> Result<ConfiguredMode, ModeError> {
        parse_config(OBJ, config)
    }

    const KUBEADM: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: 0.0.0.0\nclusterCIDR: 10.244.0.0/16\nipvs:\n  scheduler: \"\"\n  strictARP: false\n";

    #[test]
    fn every_mode_kube_proxy_accepts_is_read() {
        for (value, want) in [
            ("iptables", ProxyMode::Linux(KubeProxyMode::Iptables)),
            ("nftables", ProxyMode::Linux(KubeProxyMode::Nftables)),
            ("ipvs", ProxyMode::Linux(KubeProxyMode::Ipvs)),
            ("\"ipvs\"", ProxyMode::Linux(KubeProxyMode::Ipvs)),
            ("kernelspace", ProxyMode::Kernelspace),
        ] {
            assert_eq!(
                mode(&format!("{KUBEADM}mode: {value}\n")),
                Ok(ConfiguredMode {
                    mode: want,
                    default: false
                }),
                "{value}"
            );
        }
    }

    #[test]
    fn empty_or_absent_mode_is_iptables_by_default() {
        let iptables = Ok(ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Iptables),
            default: true,
        });
        // kubeadm writes `mode: ""` unless told otherwise.
        assert_eq!(mode(&format!("{KUBEADM}mode: \"\"\n")), iptables);
        assert_eq!(mode(&format!("{KUBEADM}mode:\n")), iptables);
        assert_eq!(mode(KUBEADM), iptables);
        assert_eq!(mode(""), iptables);
    }

    /// kubeadm's own config.conf: `mode: ""`, and with `ipvs` set (what
    /// `kubeadm init` with `mode: ipvs` writes; kind's `kubeProxyMode: ipvs`).
    #[test]
    fn kubeadms_config_conf_is_read() {
        let kubeadm = include_str!("testdata/kubeadm-kube-proxy.conf");
        assert_eq!(
            mode(kubeadm),
            Ok(ConfiguredMode {
                mode: ProxyMode::Linux(KubeProxyMode::Iptables),
                default: true,
            })
        );
        let ipvs = kubeadm.replace("\nmode: \"\"\n", "\nmode: ipvs\n");
        assert_ne!(ipvs, kubeadm);
        assert_eq!(
            mode(&ipvs).map(|c| c.mode),
            Ok(ProxyMode::Linux(KubeProxyMode::Ipvs))
        );
    }

    #[test]
    fn bad_config_is_an_error_naming_the_configmap_and_key() {
        let cases = [
            (": [", "ConfigMap/kube-system/kube-proxy: config.conf: not YAML: "),
            (
                "- mode: ipvs\n",
                "ConfigMap/kube-system/kube-proxy: config.conf: not a KubeProxyConfiguration mapping",
            ),
            (
                "mode: [ipvs]\n",
                "ConfigMap/kube-system/kube-proxy: config.conf: mode: expected a string, found - ipvs",
            ),
            (
                "mode: userspace\n",
                "ConfigMap/kube-system/kube-proxy: config.conf: mode: `userspace` is not one of iptables, nftables, ipvs, kernelspace",
            ),
            (
                "mode: IPVS\n",
                "ConfigMap/kube-system/kube-proxy: config.conf: mode: `IPVS` is not one of",
            ),
        ];
        for (config, want) in cases {
            let e = mode(config)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.starts_with(want), "{config:?}: {e}");
        }
        assert_eq!(
            from_data(OBJ, Some(&BTreeMap::from([("kubeconfig.conf".into(), "".into())])))
                .err()
                .map(|e| e.to_string()),
            Some("ConfigMap/kube-system/kube-proxy: no `config.conf` key (where kubeadm keeps the KubeProxyConfiguration)".into())
        );
        assert!(from_data(OBJ, None).is_err());
        assert_eq!(
            from_data(
                OBJ,
                Some(&BTreeMap::from([(CONFIG_KEY.into(), "mode: ipvs".into())]))
            )
            .map(|c| c.mode),
            Ok(ProxyMode::Linux(KubeProxyMode::Ipvs))
        );
    }

    fn node(name: &str, mode: Option<&str>) -> NodeMode {
        NodeMode {
            node: name.into(),
            mode: mode.map(String::from),
        }
    }

    #[test]
    fn ipvs_is_in_use_when_configured_or_found_on_a_node() {
        let ipvs = ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Ipvs),
            default: false,
        };
        let iptables = ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Iptables),
            default: true,
        };
        let plain = [
            node("a", Some("iptables")),
            node("b", None),
            node("c", Some("unknown")),
        ];
        assert!(ipvs_in_use(Some(&ipvs), &plain));
        assert!(!ipvs_in_use(Some(&iptables), &plain));
        assert!(!ipvs_in_use(None, &plain));
        assert!(!ipvs_in_use(None, &[]));
        // A node left with IPVS state after kube-proxy moved to iptables.
        assert!(ipvs_in_use(
            Some(&iptables),
            &[
                node("a", Some("iptables")),
                node("b", Some("iptables+ipvs"))
            ]
        ));
        assert!(ipvs_in_use(None, &[node("a", Some("ipvs"))]));
        assert!(!ipvs_in_use(
            Some(&ConfiguredMode {
                mode: ProxyMode::Kernelspace,
                default: false
            }),
            &[node("a", Some("none"))]
        ));
    }

    #[test]
    fn modes_read_for_people() {
        let ipvs = ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Ipvs),
            default: false,
        };
        let default = ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Iptables),
            default: true,
        };
        assert_eq!(configured_text(Some(&ipvs), None), "ipvs in its ConfigMap");
        assert_eq!(
            configured_text(Some(&default), None),
            "iptables in its ConfigMap (mode unset: kube-proxy's default)"
        );
        assert_eq!(configured_text(None, None), "ConfigMap absent");
        assert_eq!(configured_text(None, Some("X: bad")), "unknown (X: bad)");
        let nodes = [
            node("node-0", Some("ipvs")),
            node("node-1", None),
            node("node-2", Some("ipvs")),
            node("node-3", Some("ipvs")),
            node("node-4", Some("iptables+ipvs")),
        ];
        assert_eq!(
            nodes_text(&nodes, 2),
            "iptables+ipvs on node-4; ipvs on node-0, node-2 … 1 more; not reported on node-1"
        );
        assert_eq!(nodes_text(&[], 2), "no nodes");
    }

    #[test]
    fn configured_mode_serializes_as_its_config_spelling() {
        let v = serde_json::to_value(ConfiguredMode {
            mode: ProxyMode::Kernelspace,
            default: false,
        })
        .ok();
        assert_eq!(
            v,
            Some(serde_json::json!({"mode": "kernelspace", "default": false}))
        );
    }
}
