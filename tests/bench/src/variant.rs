//! The four ways a client reaches the last-declared Service, and the rows
//! of the latency table (a variant over IPv4, IPv6 or IPv4-mapped).

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
    /// `--variant-object`: another build of netboot's programs, in maps and
    /// a cgroup of its own holding the same Services; netboot's namespace.
    NetbootVariant,
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
            Self::NetbootVariant => "netboot-variant",
        }
    }

    /// Short name (namespace suffix).
    pub fn short(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Netboot => "nb",
            Self::Iptables => "ipt",
            Self::Nftables => "nft",
            Self::NetbootVariant => "nb",
        }
    }

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Floor => 0,
            Self::Netboot => 1,
            Self::Iptables => 2,
            Self::Nftables => 3,
            Self::NetbootVariant => 4,
        }
    }

    /// The variant whose namespace and target this one uses (its cgroup and
    /// maps are its own).
    pub fn base(self) -> Variant {
        match self {
            Self::NetbootVariant => Self::Netboot,
            v => v,
        }
    }

    /// DNAT variants need an on-link route for the ClusterIP range (the route
    /// lookup of a locally generated packet happens before nat OUTPUT).
    pub fn needs_vip_route(self) -> bool {
        matches!(self, Self::Iptables | Self::Nftables)
    }

    /// Variants whose namespace also gets IPv6 (issue 13: the IPv6 and
    /// IPv4-mapped rows are measured for netboot and the floor only).
    pub fn has_ipv6(self) -> bool {
        matches!(self, Self::Floor | Self::Netboot)
    }
}

/// How a latency row's client addresses its target (issue 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// AF_INET socket, IPv4 addresses (the rows of issue 6).
    Ipv4,
    /// AF_INET6 socket, IPv6 addresses (netboot: connect6 and the lb6 maps).
    Ipv6,
    /// AF_INET6 socket (not V6ONLY), `::ffff:<IPv4>` addresses (netboot:
    /// connect6 with connect4's semantics against the lb4 maps).
    Ipv4Mapped,
}

/// One row of the latency table: a variant reached over one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Row {
    /// The variant (its namespace and cgroup).
    pub variant: Variant,
    /// How the client addresses its target.
    pub family: Family,
}

const fn row(variant: Variant, family: Family) -> Row {
    Row { variant, family }
}

impl Row {
    /// Every row, in table order: the four IPv4 variants, then the IPv6 and
    /// the IPv4-mapped pairs (floor first: the others are relative to it).
    pub const ALL: [Row; 8] = [
        row(Variant::Floor, Family::Ipv4),
        row(Variant::Netboot, Family::Ipv4),
        row(Variant::Iptables, Family::Ipv4),
        row(Variant::Nftables, Family::Ipv4),
        row(Variant::Floor, Family::Ipv6),
        row(Variant::Netboot, Family::Ipv6),
        row(Variant::Floor, Family::Ipv4Mapped),
        row(Variant::Netboot, Family::Ipv4Mapped),
    ];

    /// An IPv4 row of `v` (the issue-6 rows).
    pub const fn v4(v: Variant) -> Row {
        row(v, Family::Ipv4)
    }

    /// The `variant` of its metrics in the JSON (the IPv4 rows keep their
    /// issue-6 names).
    pub fn name(self) -> &'static str {
        match (self.variant, self.family) {
            (v, Family::Ipv4) => v.name(),
            (Variant::Floor, Family::Ipv6) => "floor-ipv6",
            (Variant::Netboot, Family::Ipv6) => "netboot-ipv6",
            (Variant::Iptables, Family::Ipv6) => "iptables-ipv6",
            (Variant::Nftables, Family::Ipv6) => "nftables-ipv6",
            (Variant::Floor, Family::Ipv4Mapped) => "floor-ipv4-mapped",
            (Variant::Netboot, Family::Ipv4Mapped) => "netboot-ipv4-mapped",
            (Variant::Iptables, Family::Ipv4Mapped) => "iptables-ipv4-mapped",
            (Variant::Nftables, Family::Ipv4Mapped) => "nftables-ipv4-mapped",
            (Variant::NetbootVariant, Family::Ipv6) => "netboot-variant-ipv6",
            (Variant::NetbootVariant, Family::Ipv4Mapped) => "netboot-variant-ipv4-mapped",
        }
    }

    /// The row's label in the table ("netboot IPv6").
    pub fn label(self) -> String {
        match self.family {
            Family::Ipv4 => self.variant.name().into(),
            Family::Ipv6 => format!("{} IPv6", self.variant.name()),
            Family::Ipv4Mapped => format!("{} IPv4-mapped", self.variant.name()),
        }
    }

    /// The floor this row's added latency is measured against (same family).
    pub const fn floor(self) -> Row {
        row(Variant::Floor, self.family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_distinct_names_and_v4_keeps_the_old_ones() {
        let names: std::collections::BTreeSet<&str> = Row::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Row::ALL.len());
        for v in Variant::ALL {
            assert_eq!(Row::v4(v).name(), v.name());
            assert!(Row::ALL.contains(&Row::v4(v)));
        }
        let r = row(Variant::Netboot, Family::Ipv4Mapped);
        assert_eq!(r.label(), "netboot IPv4-mapped");
        assert_eq!(r.floor().name(), "floor-ipv4-mapped");
    }
}
