//! Every name, path and address the local cluster's pod world uses
//! (docs/contracts.md, "Local cluster"). Built here and nowhere else.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bridge device inside the fabric netns.
pub const FABRIC_BRIDGE: &str = "br0";
/// Address of the API server inside the pod world (in the cp netns).
pub const CP_IP: &str = "172.18.0.2";
/// Address of the external client on the fabric (in the ext netns): a
/// machine on the nodes' network that is not a node (in no Node object).
pub const EXT_IP: &str = "172.18.0.3";
/// Where the external client routes [`EXT_ROUTES`]: node-0's InternalIP, as
/// an upstream router would send a load balancer's or external IP's traffic
/// to one node.
pub const EXT_GATEWAY: &str = "172.18.1.1";
/// Ranges the external client routes via [`EXT_GATEWAY`], for the external
/// IPs and LoadBalancer ingress IPs tests assign (RFC 5737 TEST-NET-2 and
/// TEST-NET-3). Its only other route is the connected node network; no
/// default route.
pub const EXT_ROUTES: [&str; 2] = ["198.51.100.0/24", "203.0.113.0/24"];
/// Port of the API server, in the pod world and on loopback.
pub const API_PORT: u16 = 6443;
/// The node network (node-i = 172.18.1.(i+1); 172.18.0.x: cp, external client).
pub const NODE_CIDR: &str = "172.18.0.0/16";
/// Prefix length of node addresses on the fabric.
pub const NODE_PREFIX: u8 = 16;
/// Cluster-wide pod network.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Service network.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// ClusterIP of kube-dns.
pub const DNS_IP: &str = "10.96.0.10";
/// Link-local address of the node side of every pod veth (the pods' gateway).
pub const POD_GATEWAY: &str = "169.254.1.1";
/// Dual-stack (`NETBOOT_IP_FAMILY=dual`): the IPv6 node network (node i =
/// fd00:172:18::<a>:<b> for 172.18.a.b, see [`node_ip6`]).
pub const NODE_CIDR6: &str = "fd00:172:18::/64";
/// Dual-stack: the cluster-wide IPv6 pod network.
pub const POD_CIDR6: &str = "fd00:10:244::/56";
/// Dual-stack: the IPv6 Service network.
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// Dual-stack: the IPv6 link-local address of the node side of every pod veth.
pub const POD_GATEWAY6: &str = "fe80::1";

/// A node's IPv6 address in a dual-stack local cluster, from its IPv4 one
/// (tests/cluster/lib.sh `node_ip6`): 172.18.a.b → fd00:172:18::a:b.
pub fn node_ip6(ip: std::net::Ipv4Addr) -> std::net::Ipv6Addr {
    let [_, _, a, b] = ip.octets();
    std::net::Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, u16::from(a), u16::from(b))
}
/// Root of podnet's cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/netboot-local";
/// Root of the agents' bpffs pins.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/netboot-local";
/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every netns podnet creates.
pub const NETNS_PREFIX: &str = "nb-";

/// Pod labels (contracts.md, "Labels").
pub mod labels {
    /// `netboot.io/podnet: "true"`: podnet gives the pod a netns and runs its command.
    pub const PODNET: (&str, &str) = ("netboot.io/podnet", "true");
    /// `app.kubernetes.io/name: netboot-datapath`: podnet runs the real agent.
    pub const AGENT: (&str, &str) = ("app.kubernetes.io/name", "netboot-datapath");
    /// `k8s-app: kube-proxy`: podnet runs the real kube-proxy in the node netns.
    pub const KUBE_PROXY: (&str, &str) = ("k8s-app", "kube-proxy");
    /// `k8s-app: kube-dns`: podnet runs the real CoreDNS in that pod's netns.
    pub const KUBE_DNS: (&str, &str) = ("k8s-app", "kube-dns");
}

/// Where podnet puts its namespaces, cgroups and pins. [`Layout::default`] is
/// the contract's; tests that exercise the plumbing beside a running podnet
/// use their own prefix and cgroup root so nothing collides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Prefix of every netns name (`nb-`).
    pub netns_prefix: String,
    /// Root of the cgroup tree ([`CGROUP_ROOT`]).
    pub cgroup_root: PathBuf,
    /// Root of the agents' bpffs pins ([`BPFFS_ROOT`]).
    pub bpffs_root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            netns_prefix: NETNS_PREFIX.to_string(),
            cgroup_root: PathBuf::from(CGROUP_ROOT),
            bpffs_root: PathBuf::from(BPFFS_ROOT),
        }
    }
}

impl Layout {
    /// The fabric netns (`nb-fabric`).
    pub fn fabric_netns(&self) -> String {
        format!("{}fabric", self.netns_prefix)
    }

    /// The control-plane netns (`nb-cp`).
    pub fn cp_netns(&self) -> String {
        format!("{}cp", self.netns_prefix)
    }

    /// The external client's netns (`nb-ext`): on the fabric at [`EXT_IP`],
    /// not a node.
    pub fn ext_netns(&self) -> String {
        format!("{}ext", self.netns_prefix)
    }

    /// `nb-node-<node>`.
    pub fn node_netns(&self, node: &str) -> String {
        format!("{}node-{node}", self.netns_prefix)
    }

    /// `nb-pod-<uid12>`.
    pub fn pod_netns(&self, uid: &str) -> String {
        format!("{}pod-{}", self.netns_prefix, uid12(uid))
    }

    /// `<cgroup root>/<node>`.
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup_root.join(node)
    }

    /// `<cgroup root>/<node>/<pod-uid>`.
    pub fn pod_cgroup(&self, node: &str, uid: &str) -> PathBuf {
        self.node_cgroup(node).join(uid)
    }

    /// `<bpffs root>/<node>`.
    pub fn node_bpffs(&self, node: &str) -> PathBuf {
        self.bpffs_root.join(node)
    }

    /// Whether a netns name is one this layout creates.
    pub fn owns_netns(&self, name: &str) -> bool {
        name.starts_with(&self.netns_prefix)
    }
}

/// Annotation that hands a pod to the podnet whose netns prefix it names.
/// Without it a pod belongs to the contract's podnet (`nb-`); tests that run
/// a second podnet put their prefix here so the two never share a pod.
pub const OWNER_ANNOTATION: &str = "netboot.io/podnet-owner";

/// The netns prefix of the podnet a pod belongs to.
pub fn podnet_owner(annotations: Option<&std::collections::BTreeMap<String, String>>) -> &str {
    annotations
        .and_then(|a| a.get(OWNER_ANNOTATION))
        .map(String::as_str)
        .unwrap_or(NETNS_PREFIX)
}

/// `nb-node-<node>` in the contract's layout.
pub fn node_netns(node: &str) -> String {
    Layout::default().node_netns(node)
}

/// The first 12 characters of a pod UID (the netns and veth suffix).
pub fn uid12(uid: &str) -> &str {
    uid.get(..12).unwrap_or(uid)
}

/// `nb-pod-<uid12>` in the contract's layout.
pub fn pod_netns(uid: &str) -> String {
    Layout::default().pod_netns(uid)
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// `/etc/netns/<name>`: files `ip netns exec` bind-mounts over /etc.
pub fn netns_etc(name: &str) -> PathBuf {
    Path::new("/etc/netns").join(name)
}

/// `<CGROUP_ROOT>/<node>/<pod-uid>` in the contract's layout.
pub fn pod_cgroup(node: &str, uid: &str) -> PathBuf {
    Layout::default().pod_cgroup(node, uid)
}

/// A valid interface name (≤ 15 bytes): `prefix + suffix`, or `prefix + hash`
/// when that is too long or has characters an interface name cannot.
fn ifname(prefix: &str, suffix: &str) -> String {
    let candidate = format!("{prefix}{suffix}");
    let valid = candidate.len() <= 15
        && suffix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if valid {
        return candidate;
    }
    let digest = Sha256::digest(suffix.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// Fabric-side veth of a node (inside the fabric netns).
pub fn node_fabric_veth(node: &str) -> String {
    ifname("n-", node)
}

/// Fabric-side veth of the control-plane netns.
pub const CP_FABRIC_VETH: &str = "cp0";

/// Fabric-side veth of the external client's netns.
pub const EXT_FABRIC_VETH: &str = "ext0";

/// Node-side veth of a pod (inside the node netns).
pub fn pod_node_veth(uid: &str) -> String {
    ifname("p", uid12(uid))
}

/// The interface name inside pod, node and cp namespaces.
pub const INNER_IF: &str = "eth0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let uid = "3f2a9c1b-7d4e-4a1b-9c3d-0123456789ab";
        assert_eq!(pod_netns(uid), "nb-pod-3f2a9c1b-7d4");
        assert_eq!(node_netns("node-7"), "nb-node-node-7");
        assert_eq!(
            pod_cgroup("node-7", uid),
            PathBuf::from(
                "/sys/fs/cgroup/unified/netboot-local/node-7/3f2a9c1b-7d4e-4a1b-9c3d-0123456789ab"
            )
        );
        assert_eq!(pod_node_veth(uid), "p3f2a9c1b-7d4");
        assert_eq!(node_fabric_veth("node-999"), "n-node-999");
        assert_eq!(Layout::default().ext_netns(), "nb-ext");
        assert_eq!(Layout::default().cp_netns(), "nb-cp");
        let long = node_fabric_veth("a-very-long-node-name.example.com");
        assert!(long.len() <= 15 && long.starts_with("n-"), "{long}");
    }
}
