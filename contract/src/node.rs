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
    fn annotations_are_in_netboots_prefix() {
        for a in [
            KUBE_PROXY_REPLACEMENT,
            DATAPATH_VERSION,
            KUBE_PROXY_RULES,
            KUBE_PROXY_RULES_REASON,
        ] {
            assert!(a.starts_with("netboot.io/"), "{a}");
        }
    }
}
