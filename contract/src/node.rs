//! What an agent writes on its Node and the bootstrapper's gates read
//! (docs/contracts.md, "Node annotations"). Annotation values are strings on
//! the wire; on both sides they are the types below.

/// `"true"` in replace mode once the agent is ready (and, with
/// `cleanupKubeProxyRules`, only while the cleanup can run on this node);
/// `"false"` otherwise. See [`kpr_value`] and [`parse_kpr`].
pub const KUBE_PROXY_REPLACEMENT: &str = "netboot.io/kube-proxy-replacement";
/// The agent's version (`netboot-datapath --version`).
pub const DATAPATH_VERSION: &str = "netboot.io/datapath-version";
/// kube-proxy's own rules in the agent's rules netns: [`KubeProxyRules`].
pub const KUBE_PROXY_RULES: &str = "netboot.io/kube-proxy-rules";
/// Why the rules are `unknown`, or which kube-proxy chains are kept because
/// other rules use them; absent when there is nothing to say.
pub const KUBE_PROXY_RULES_REASON: &str = "netboot.io/kube-proxy-rules-reason";
/// Which of kube-proxy's modes left state on the node, as the agent finds
/// it in the rules netns: [`format_modes`] of [`KubeProxyMode`]s, `none`, or
/// `unknown` when the check cannot run.
pub const KUBE_PROXY_MODE: &str = "netboot.io/kube-proxy-mode";

/// The value of [`KUBE_PROXY_REPLACEMENT`].
pub fn kpr_value(replacement: bool) -> &'static str {
    if replacement {
        "true"
    } else {
        "false"
    }
}

/// [`KUBE_PROXY_REPLACEMENT`] read back; `None` for anything but `true`/`false`.
pub fn parse_kpr(value: &str) -> Option<bool> {
    match value {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// The value of [`KUBE_PROXY_RULES`]. Only [`KubeProxyRules::Absent`] opens
/// the bootstrapper's rules-cleared gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KubeProxyRules {
    /// kube-proxy's own chains, jump rules or nft tables exist.
    Present,
    /// None of them exists (other components' `KUBE-*` chains do not count).
    Absent,
    /// The check cannot run ([`KUBE_PROXY_RULES_REASON`] says why).
    Unknown,
}

impl KubeProxyRules {
    /// Every value, in documentation order.
    pub const ALL: [Self; 3] = [Self::Present, Self::Absent, Self::Unknown];

    /// The annotation value: `present`, `absent` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Present => "present",
            Self::Absent => "absent",
            Self::Unknown => "unknown",
        }
    }

    /// An annotation value read back; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

impl std::fmt::Display for KubeProxyRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kube-proxy mode (KubeProxyConfiguration `mode`), as configured or as
/// found on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KubeProxyMode {
    /// `iptables` (also what an empty `mode` means on Linux).
    Iptables,
    /// `nftables`.
    Nftables,
    /// `ipvs`.
    Ipvs,
}

impl KubeProxyMode {
    /// Every mode, in documentation order.
    pub const ALL: [Self; 3] = [Self::Iptables, Self::Nftables, Self::Ipvs];

    /// The KubeProxyConfiguration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }

    /// A KubeProxyConfiguration `mode` value: empty is kube-proxy's Linux
    /// default, iptables; anything else unknown is `None`.
    pub fn from_config(value: &str) -> Option<Self> {
        match value.trim() {
            "" => Some(Self::Iptables),
            v => Self::ALL.into_iter().find(|m| m.as_str() == v),
        }
    }
}

impl std::fmt::Display for KubeProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The [`KUBE_PROXY_MODE`] value for the modes found on a node: `none`, or
/// the modes joined with `+` (two after kube-proxy switched modes and left
/// the old one's state).
pub fn format_modes(modes: &std::collections::BTreeSet<KubeProxyMode>) -> String {
    if modes.is_empty() {
        return "none".into();
    }
    modes
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// [`format_modes`] read back; `None` for `unknown` or anything unexpected.
pub fn parse_modes(value: &str) -> Option<std::collections::BTreeSet<KubeProxyMode>> {
    if value == "none" {
        return Some(Default::default());
    }
    value
        .split('+')
        .map(|v| KubeProxyMode::ALL.into_iter().find(|m| m.as_str() == v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back() {
        for r in KubeProxyRules::ALL {
            assert_eq!(KubeProxyRules::parse(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(KubeProxyRules::parse("Absent"), None);
        assert_eq!(KubeProxyRules::parse(""), None);
        for b in [true, false] {
            assert_eq!(parse_kpr(kpr_value(b)), Some(b));
        }
        assert_eq!(parse_kpr("True"), None);
    }

    #[test]
    fn modes_read_back() {
        use std::collections::BTreeSet;
        let all: BTreeSet<KubeProxyMode> = KubeProxyMode::ALL.into_iter().collect();
        for set in [
            BTreeSet::new(),
            BTreeSet::from([KubeProxyMode::Ipvs]),
            BTreeSet::from([KubeProxyMode::Iptables, KubeProxyMode::Ipvs]),
            all,
        ] {
            assert_eq!(parse_modes(&format_modes(&set)), Some(set));
        }
        assert_eq!(format_modes(&BTreeSet::new()), "none");
        assert_eq!(
            format_modes(&BTreeSet::from([
                KubeProxyMode::Ipvs,
                KubeProxyMode::Iptables
            ])),
            "iptables+ipvs"
        );
        assert_eq!(parse_modes("unknown"), None);
        assert_eq!(parse_modes("ipvs+"), None);
        assert_eq!(
            KubeProxyMode::from_config(""),
            Some(KubeProxyMode::Iptables)
        );
        assert_eq!(
            KubeProxyMode::from_config("ipvs"),
            Some(KubeProxyMode::Ipvs)
        );
        assert_eq!(KubeProxyMode::from_config("kernelspace"), None);
    }

    #[test]
    fn annotations_are_in_netboots_prefix() {
        for a in [
            KUBE_PROXY_REPLACEMENT,
            DATAPATH_VERSION,
            KUBE_PROXY_RULES,
            KUBE_PROXY_RULES_REASON,
            KUBE_PROXY_MODE,
        ] {
            assert!(a.starts_with("netboot.io/"), "{a}");
        }
    }
}
