//! The four ways a client reaches the last-declared Service.

use serde::Serialize;

/// One variant of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No service rules: the client connects straight to a backend IP.
    Floor,
    /// netboot's socket LB (cgroup connect4), maps programmed by its reconciler.
    Netboot,
    /// kube-proxy iptables mode (KUBE-SERVICES → KUBE-SVC → KUBE-SEP DNAT).
    Iptables,
    /// kube-proxy nftables mode (service-ips verdict map → numgen → dnat).
    Nftables,
}

impl Variant {
    /// All, in table order.
    pub const ALL: [Variant; 4] = [
        Variant::Floor,
        Variant::Netboot,
        Variant::Iptables,
        Variant::Nftables,
    ];

    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Netboot => "netboot",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// Short name (namespace suffix).
    pub fn short(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Netboot => "nb",
            Self::Iptables => "ipt",
            Self::Nftables => "nft",
        }
    }

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Floor => 0,
            Self::Netboot => 1,
            Self::Iptables => 2,
            Self::Nftables => 3,
        }
    }

    /// DNAT variants need an on-link route for the ClusterIP range (the route
    /// lookup of a locally generated packet happens before nat OUTPUT).
    pub fn needs_vip_route(self) -> bool {
        matches!(self, Self::Iptables | Self::Nftables)
    }
}
