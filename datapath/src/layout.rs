//! Rust mirrors of the map layouts defined in `bpf/lb.h` (the single source).
//!
//! Every struct is `#[repr(C)]` with the same explicit padding as the header;
//! the `const` blocks below fail the build if a size or offset drifts.
//! Addresses and ports are kept in network byte order, as in the kernel.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// Map names in the BPF object (also the pin file names, see `pins.rs`).
pub mod names {
    /// `(vip, port, proto, slot)` → frontend / backend slot.
    pub const SERVICES: &str = "nb_lb4_svc";
    /// backend id → backend.
    pub const BACKENDS: &str = "nb_lb4_be";
    /// rev-nat id → (vip, port).
    pub const REVNAT: &str = "nb_lb4_revnat";
    /// (socket cookie, backend) → (vip, port), LRU.
    pub const REV_SK: &str = "nb_lb4_rev_sk";
    /// (client netns cookie, rev-nat id) → (last used, backend id), LRU.
    pub const AFFINITY: &str = "nb_lb4_aff";
    /// (backend id, rev-nat id) → state: membership for affinity.
    pub const AFF_MATCH: &str = "nb_lb4_affmatch";
    /// Per-CPU outcome counters.
    pub const COUNTERS: &str = "nb_counters";
    /// Single-entry datapath configuration.
    pub const CONFIG: &str = "nb_config";
    /// `(vip6, port, proto, slot)` → frontend / backend slot.
    pub const SERVICES6: &str = "nb_lb6_svc";
    /// backend id → IPv6 backend (ids shared with `nb_lb4_be`).
    pub const BACKENDS6: &str = "nb_lb6_be";
    /// rev-nat id → (vip6, port).
    pub const REVNAT6: &str = "nb_lb6_revnat";
    /// (socket cookie, IPv6 backend) → (vip6, port), LRU.
    pub const REV_SK6: &str = "nb_lb6_rev_sk";
    /// Removed backends whose connected UDP sockets are destroyed
    /// (`sock_term.bpf.c`; not pinned: the agent's own).
    pub const SOCK_TERM: &str = "nb_sock_term";
    /// Connection tracking of the per-packet (tc) path, LRU.
    pub const CT4: &str = "nb_ct4";
    /// ifindex → SNAT address of an external interface (tc path).
    pub const NP_DEV: &str = "nb_np_dev";
    /// rev-nat id of an external frontend → its Maglev table (tc path).
    pub const MAGLEV: &str = "nb_lb4_maglev";
    /// (rev-nat id of an LB IP frontend, source CIDR) → allowed (LPM trie,
    /// `loadBalancerSourceRanges`, tc path).
    pub const SRC_RANGE: &str = "nb_lb4_src_range";
    /// Single-entry lifetimes of `nb_ct4`'s and `nb_ct6`'s entries (tc path).
    pub const CT_TIMEOUT: &str = "nb_ct_timeout";
    /// Connection tracking of the per-packet path, IPv6, LRU.
    pub const CT6: &str = "nb_ct6";
    /// ifindex → IPv6 SNAT address of an external interface (tc path).
    pub const NP_DEV6: &str = "nb_np_dev6";
    /// As [`SRC_RANGE`] for IPv6 LB IPs.
    pub const SRC_RANGE6: &str = "nb_lb6_src_range";
    /// Ring buffer of service flow events (`struct nb_flow_event`).
    pub const FLOW_RING: &str = "nb_flow_ring";
    /// Single-entry flow event switch and budget (`struct nb_flow_cfg`).
    pub const FLOW_CFG: &str = "nb_flow_cfg";
    /// Per-CPU token bucket of flow events.
    pub const FLOW_RL: &str = "nb_flow_rl";
    /// Per-CPU flow event counters (`enum nb_flow_stat`).
    pub const FLOW_STATS: &str = "nb_flow_stats";
    /// service id → per-CPU per-Service counters (`struct nb_svc_stats`).
    pub const SVC_STATS: &str = "nb_svc_stats";
    /// socket cookie's slot → a TCP socket's reverse entry, both families
    /// (`struct nb_rev_tcp`, array of [`super::REV_TCP_SLOTS`]).
    pub const REV_TCP: &str = "nb_rev_tcp";
    /// All maps the agent pins, in load order.
    pub const ALL: [&str; 26] = [
        SERVICES, BACKENDS, REVNAT, REV_SK, AFFINITY, AFF_MATCH, COUNTERS, CONFIG, SERVICES6,
        BACKENDS6, REVNAT6, REV_SK6, CT4, NP_DEV, MAGLEV, SRC_RANGE, CT_TIMEOUT, CT6, NP_DEV6,
        SRC_RANGE6, FLOW_RING, FLOW_CFG, FLOW_RL, FLOW_STATS, SVC_STATS, REV_TCP,
    ];
}

/// `NB_SVC_F_AFFINITY`.
pub const SVC_F_AFFINITY: u8 = 0x01;
/// `NB_SVC_F_EXTERNAL`: the tc path serves this frontend.
pub const SVC_F_EXTERNAL: u8 = 0x02;
/// `NB_SVC_F_EXT_LOCAL`: externalTrafficPolicy Local on the tc path.
pub const SVC_F_EXT_LOCAL: u8 = 0x04;
/// `NB_SVC_F_SRC_RANGE`: an LB IP with `loadBalancerSourceRanges` (tc path
/// admits sources in `nb_lb4_src_range` only; socket LB leaves it alone).
pub const SVC_F_SRC_RANGE: u8 = 0x08;
/// `NB_DEFAULT_SRC_RANGE`: entries of `nb_lb4_src_range`.
pub const SRC_RANGE_ENTRIES: u32 = 16384;
/// `NB_CT_F_REPLY`.
pub const CT_F_REPLY: u8 = 0x01;
/// `NB_CT_F_SNAT`.
pub const CT_F_SNAT: u8 = 0x02;
/// `NB_BE_ACTIVE`.
pub const BE_ACTIVE: u8 = 0;
/// `NB_BE_TERMINATING`.
pub const BE_TERMINATING: u8 = 1;
/// `NB_MODE_OBSERVE`.
pub const MODE_OBSERVE: u32 = 0;
/// `NB_MODE_REPLACE`.
pub const MODE_REPLACE: u32 = 1;
/// `NB_LAYOUT_VERSION`.
pub const LAYOUT_VERSION: u32 = 4;
/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// `struct nb_lb4_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4Key {
    /// Service VIP, network order.
    pub address: u32,
    /// Service port, network order.
    pub dport: u16,
    /// 0 = frontend, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_lb4_service`. A slot (> 0) of an IPv4 frontend carries its
/// backend's address and port in the fields only slot 0 uses (C unions
/// `backend_addr`, `backend_port`): [`Lb4Service::slot`],
/// [`Lb4Service::slot_backend`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Service {
    /// Slot > 0: backend id.
    pub backend_id: u32,
    /// Slot 0: affinity timeout in seconds. Slot > 0 of an IPv4 frontend:
    /// the backend's address, network order (C `backend_addr`).
    pub affinity_timeout: u32,
    /// Service id.
    pub rev_nat_index: u32,
    /// Slot 0: number of backend slots. Slot > 0 of an IPv4 frontend: the
    /// backend's port, network order (C `backend_port`).
    pub count: u16,
    /// Slot 0 of an external frontend: slots `1..=local_count` hold the
    /// backends on this node.
    pub local_count: u16,
    /// Slot 0: `SVC_F_*`.
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 3],
}

impl Lb4Service {
    /// What a slot carries of backend `be`: an IPv4 backend's address and
    /// port in map form, so the socket LB needs no lookup in nb_lb4_be;
    /// zeros for an IPv6 one (nb_lb6_be has it).
    pub fn slot_copy(be: L4Addr) -> (u32, u16) {
        match be.ip {
            IpAddr::V4(ip) => (addr_be(ip), port_be(be.port)),
            IpAddr::V6(_) => (0, 0),
        }
    }

    /// Slot > 0 of service `id`: backend `bid`, carrying `copy`
    /// ([`Lb4Service::slot_copy`]).
    pub fn slot(id: u32, bid: u32, (addr, port): (u32, u16)) -> Self {
        Self {
            backend_id: bid,
            affinity_timeout: addr,
            rev_nat_index: id,
            count: port,
            ..Default::default()
        }
    }

    /// The IPv4 backend a slot (> 0) carries, (address, port) in host form;
    /// None when it carries none.
    pub fn slot_backend(&self) -> Option<(Ipv4Addr, u16)> {
        (self.affinity_timeout != 0).then(|| {
            (
                addr_from_be(self.affinity_timeout),
                port_from_be(self.count),
            )
        })
    }
}

/// `struct nb_lb4_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Backend {
    /// Backend address, network order.
    pub address: u32,
    /// Backend port, network order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_*`.
    pub state: u8,
}

/// `struct nb_lb4_reverse_nat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4ReverseNat {
    /// Service VIP, network order.
    pub address: u32,
    /// Service port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// `struct nb_lb4_rev_sk_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4RevSkKey {
    /// Socket cookie.
    pub cookie: u64,
    /// Backend address, network order.
    pub address: u32,
    /// Backend port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// `struct nb_lb4_rev_sk_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4RevSkVal {
    /// Service VIP, network order.
    pub address: u32,
    /// Service port, network order.
    pub port: u16,
    /// Low 16 bits of the service id (`lb.h`).
    pub rev_nat_tag: u16,
}

/// `struct nb_lb4_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4AffinityKey {
    /// Client netns cookie.
    pub client_cookie: u64,
    /// Service id.
    pub rev_nat_id: u32,
    /// Zero.
    pub pad: u32,
}

/// `struct nb_lb4_affinity_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4AffinityVal {
    /// `bpf_ktime_get_ns()` of the last use.
    pub last_used: u64,
    /// Chosen backend.
    pub backend_id: u32,
    /// Zero.
    pub pad: u32,
}

/// `struct nb_lb4_affinity_match`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4AffinityMatch {
    /// Backend id.
    pub backend_id: u32,
    /// Service id.
    pub rev_nat_id: u32,
}

/// `struct nb_lb6_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6Key {
    /// Service VIP, network order (4 words as in `user_ip6`).
    pub address: [u32; 4],
    /// Service port, network order.
    pub dport: u16,
    /// 0 = frontend, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_lb6_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6Backend {
    /// Backend address, network order.
    pub address: [u32; 4],
    /// Backend port, network order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_*`.
    pub state: u8,
}

/// `struct nb_lb6_reverse_nat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6ReverseNat {
    /// Service VIP, network order.
    pub address: [u32; 4],
    /// Service port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// `struct nb_lb6_rev_sk_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6RevSkKey {
    /// Socket cookie.
    pub cookie: u64,
    /// Backend address, network order.
    pub address: [u32; 4],
    /// Backend port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
    /// Zero.
    pub pad2: u32,
}

/// `struct nb_lb6_rev_sk_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6RevSkVal {
    /// Service VIP, network order.
    pub address: [u32; 4],
    /// Service port, network order.
    pub port: u16,
    /// Low 16 bits of the service id (`lb.h`).
    pub rev_nat_tag: u16,
}

/// `NB_REV_TCP_SLOTS`: slots of `nb_rev_tcp`.
pub const REV_TCP_SLOTS: u32 = 262_144;

/// `struct nb_rev_tcp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevTcp {
    /// The socket's cookie; 0: an empty slot.
    pub cookie: u64,
    /// Backend address, network order (IPv4: `[0]`).
    pub backend: [u32; 4],
    /// Service VIP, network order (IPv4: `[0]`).
    pub vip: [u32; 4],
    /// Backend port, network order.
    pub backend_port: u16,
    /// Service port, network order.
    pub vport: u16,
    /// Low 16 bits of the service id.
    pub rev_nat_tag: u16,
    /// 4 or 6.
    pub family: u8,
    /// Always zero.
    pub pad: u8,
}

/// `struct nb_sock_term_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockTermKey {
    /// Removed backend, network order; IPv4 as `::ffff:a.b.c.d`.
    pub address: [u32; 4],
    /// Its port, network order.
    pub port: u16,
    /// `IPPROTO_UDP`.
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// `struct nb_sock_term_rec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTermRec {
    /// The socket's peer, network order, v4-mapped for IPv4.
    pub address: [u32; 4],
    /// Peer port, network order.
    pub port: u16,
    /// The socket's family (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// `bpf_sock_destroy()` result: 0 or -errno.
    pub result: i32,
    /// The socket's cookie.
    pub cookie: u64,
    /// The socket's cgroup v2 id.
    pub cgroup_id: u64,
    /// The frontend it asked for (its reverse entry), network order,
    /// v4-mapped for IPv4.
    pub vip: [u32; 4],
    /// Its port, network order.
    pub vport: u16,
    /// Zero.
    pub pad: u16,
    /// Zero.
    pub pad2: u32,
}

/// `NB_KFUNC_SOCK_DESTROY_MARKER`.
pub const KFUNC_SOCK_DESTROY_MARKER: i32 = 0x7e_57d0;

/// `struct nb_ct4_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    /// Source address on the wire, network order.
    pub saddr: u32,
    /// Destination address, network order.
    pub daddr: u32,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_ct4_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Val {
    /// New source address, network order.
    pub saddr: u32,
    /// New destination address, network order.
    pub daddr: u32,
    /// New source port, network order.
    pub sport: u16,
    /// New destination port, network order.
    pub dport: u16,
    /// Service id of the flow.
    pub rev_nat_index: u32,
    /// `CLOCK_MONOTONIC` second after which the entry is lapsed.
    pub expires: u32,
    /// `CT_F_*`.
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_ct6_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct6Key {
    /// Source address on the wire, network order words.
    pub saddr: [u32; 4],
    /// Destination address.
    pub daddr: [u32; 4],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_ct6_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Val {
    /// New source address.
    pub saddr: [u32; 4],
    /// New destination address.
    pub daddr: [u32; 4],
    /// New source port, network order.
    pub sport: u16,
    /// New destination port, network order.
    pub dport: u16,
    /// Service id of the flow.
    pub rev_nat_index: u32,
    /// `CLOCK_MONOTONIC` second after which the entry is lapsed.
    pub expires: u32,
    /// `CT_F_*`.
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct nb_np_dev6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NpDev6 {
    /// The node's IPv6 address remote backends see, network order words.
    pub snat_addr: [u32; 4],
}

/// `struct nb_src_range6_key` without its prefixlen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange6Key {
    /// The LB IP frontend's service id (host order).
    pub rev_nat_index: u32,
    /// The CIDR's address, network order words (host bits zero).
    pub addr: [u32; 4],
}

/// `NB_CT_F_CLOSING`: a FIN or RST was seen.
pub const CT_F_CLOSING: u8 = 0x04;
/// `NB_CT_F_POD`: a pod's flow to a Service (pod interface tc path).
pub const CT_F_POD: u8 = 0x08;

/// `struct nb_ct_timeouts`: `nb_ct4` lifetimes in seconds (0 = the default).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// TCP until a packet that is not a bare SYN.
    pub tcp_syn: u32,
    /// TCP established.
    pub tcp_est: u32,
    /// TCP after a FIN or RST.
    pub tcp_close: u32,
    /// UDP.
    pub udp: u32,
}

/// `struct nb_np_dev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NpDev {
    /// The node's IPv4 address remote backends see, network order.
    pub snat_addr: u32,
    /// Zero.
    pub pad: u32,
}

/// `NB_MAGLEV_MAX`: entries of the largest Maglev table.
pub const MAGLEV_MAX: usize = 16381;

/// `struct nb_maglev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Maglev {
    /// Entries used (a prime ≤ [`MAGLEV_MAX`]); 0 = none.
    pub size: u32,
    /// Backend slot numbers (1-based).
    pub slot: [u16; MAGLEV_MAX],
    /// Zero.
    pub pad: u16,
}

/// `struct nb_src_range_key` without its prefixlen (aya's LPM trie key
/// carries that): the frontend's rev-nat id and the source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// The LB IP frontend's service id (host order).
    pub rev_nat_index: u32,
    /// The CIDR's address, network order (host bits zero).
    pub addr: u32,
}

/// `NB_CFG_F_HOST_NS_ONLY`: socket LB serves only the host netns
/// (`socketLB.hostNamespaceOnly`); pods go through their interface's tc path.
pub const CFG_F_HOST_NS_ONLY: u32 = 0x01;

/// `struct nb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NbConfig {
    /// `MODE_*`.
    pub mode: u32,
    /// `LAYOUT_VERSION` the maps were written with.
    pub version: u32,
    /// Netns cookie of the agent's (the host's) network namespace.
    pub host_netns: u64,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}

// SAFETY: all of these are repr(C) plain data made of integers with explicit
// padding fields, so every bit pattern is valid and there is no implicit padding.
unsafe impl aya::Pod for Lb4Key {}
unsafe impl aya::Pod for SrcRangeKey {}
unsafe impl aya::Pod for Lb4Service {}
unsafe impl aya::Pod for Lb4Backend {}
unsafe impl aya::Pod for Lb4ReverseNat {}
unsafe impl aya::Pod for Lb4RevSkKey {}
unsafe impl aya::Pod for Lb4RevSkVal {}
unsafe impl aya::Pod for Lb4AffinityKey {}
unsafe impl aya::Pod for Lb4AffinityVal {}
unsafe impl aya::Pod for Lb4AffinityMatch {}
unsafe impl aya::Pod for NbConfig {}
unsafe impl aya::Pod for Lb6Key {}
unsafe impl aya::Pod for Lb6Backend {}
unsafe impl aya::Pod for Lb6ReverseNat {}
unsafe impl aya::Pod for Lb6RevSkKey {}
unsafe impl aya::Pod for Lb6RevSkVal {}
unsafe impl aya::Pod for RevTcp {}
unsafe impl aya::Pod for SockTermKey {}
unsafe impl aya::Pod for Ct4Key {}
unsafe impl aya::Pod for Ct4Val {}
unsafe impl aya::Pod for CtTimeouts {}
unsafe impl aya::Pod for Ct6Key {}
unsafe impl aya::Pod for Ct6Val {}
unsafe impl aya::Pod for NpDev6 {}
unsafe impl aya::Pod for SrcRange6Key {}
unsafe impl aya::Pod for NpDev {}
unsafe impl aya::Pod for Maglev {}

const _: () = {
    assert!(size_of::<Lb4Key>() == 12);
    assert!(offset_of!(Lb4Key, address) == 0);
    assert!(offset_of!(Lb4Key, dport) == 4);
    assert!(offset_of!(Lb4Key, backend_slot) == 6);
    assert!(offset_of!(Lb4Key, proto) == 8);
    assert!(offset_of!(Lb4Key, pad) == 9);

    assert!(size_of::<Lb4Service>() == 20);
    assert!(offset_of!(Lb4Service, backend_id) == 0);
    assert!(offset_of!(Lb4Service, affinity_timeout) == 4);
    assert!(offset_of!(Lb4Service, rev_nat_index) == 8);
    assert!(offset_of!(Lb4Service, count) == 12);
    assert!(offset_of!(Lb4Service, local_count) == 14);
    assert!(offset_of!(Lb4Service, flags) == 16);

    assert!(size_of::<Ct4Key>() == 16);
    assert!(offset_of!(Ct4Key, daddr) == 4);
    assert!(offset_of!(Ct4Key, sport) == 8);
    assert!(offset_of!(Ct4Key, dport) == 10);
    assert!(offset_of!(Ct4Key, proto) == 12);
    assert!(size_of::<Ct4Val>() == 24);
    assert!(offset_of!(Ct4Val, sport) == 8);
    assert!(offset_of!(Ct4Val, rev_nat_index) == 12);
    assert!(offset_of!(Ct4Val, expires) == 16);
    assert!(offset_of!(Ct4Val, flags) == 20);
    assert!(size_of::<CtTimeouts>() == 16);
    assert!(size_of::<Ct6Key>() == 40);
    assert!(offset_of!(Ct6Key, sport) == 32);
    assert!(offset_of!(Ct6Key, proto) == 36);
    assert!(size_of::<Ct6Val>() == 48);
    assert!(offset_of!(Ct6Val, rev_nat_index) == 36);
    assert!(offset_of!(Ct6Val, expires) == 40);
    assert!(offset_of!(Ct6Val, flags) == 44);
    assert!(size_of::<NpDev6>() == 16);
    assert!(size_of::<SrcRange6Key>() == 20);
    assert!(size_of::<NpDev>() == 8);
    assert!(size_of::<Maglev>() == 32768);
    assert!(offset_of!(Maglev, slot) == 4);

    assert!(size_of::<Lb4Backend>() == 8);
    assert!(offset_of!(Lb4Backend, port) == 4);
    assert!(offset_of!(Lb4Backend, proto) == 6);
    assert!(offset_of!(Lb4Backend, state) == 7);

    assert!(size_of::<Lb4ReverseNat>() == 8);
    assert!(offset_of!(Lb4ReverseNat, port) == 4);

    assert!(size_of::<Lb4RevSkKey>() == 16);
    assert!(offset_of!(Lb4RevSkKey, address) == 8);
    assert!(offset_of!(Lb4RevSkKey, port) == 12);
    assert!(size_of::<Lb4RevSkVal>() == 8);
    assert!(offset_of!(Lb4RevSkVal, rev_nat_tag) == 6);

    assert!(size_of::<Lb4AffinityKey>() == 16);
    assert!(offset_of!(Lb4AffinityKey, rev_nat_id) == 8);
    assert!(size_of::<Lb4AffinityVal>() == 16);
    assert!(offset_of!(Lb4AffinityVal, backend_id) == 8);

    assert!(size_of::<Lb4AffinityMatch>() == 8);
    assert!(offset_of!(Lb4AffinityMatch, rev_nat_id) == 4);

    assert!(size_of::<NbConfig>() == 24);
    assert!(offset_of!(NbConfig, host_netns) == 8);
    assert!(offset_of!(NbConfig, flags) == 16);

    assert!(size_of::<Lb6Key>() == 24);
    assert!(offset_of!(Lb6Key, dport) == 16);
    assert!(offset_of!(Lb6Key, backend_slot) == 18);
    assert!(offset_of!(Lb6Key, proto) == 20);
    assert!(offset_of!(Lb6Key, pad) == 21);

    assert!(size_of::<Lb6Backend>() == 20);
    assert!(offset_of!(Lb6Backend, port) == 16);
    assert!(offset_of!(Lb6Backend, proto) == 18);
    assert!(offset_of!(Lb6Backend, state) == 19);

    assert!(size_of::<Lb6ReverseNat>() == 20);
    assert!(offset_of!(Lb6ReverseNat, port) == 16);

    assert!(size_of::<Lb6RevSkKey>() == 32);
    assert!(offset_of!(Lb6RevSkKey, address) == 8);
    assert!(offset_of!(Lb6RevSkKey, port) == 24);
    assert!(offset_of!(Lb6RevSkKey, pad2) == 28);
    assert!(size_of::<Lb6RevSkVal>() == 20);
    assert!(size_of::<RevTcp>() == 48);
    assert!(offset_of!(RevTcp, backend) == 8);
    assert!(offset_of!(RevTcp, vip) == 24);
    assert!(offset_of!(RevTcp, backend_port) == 40);
    assert!(offset_of!(RevTcp, rev_nat_tag) == 44);
    assert!(offset_of!(RevTcp, family) == 46);
    assert!(offset_of!(Lb6RevSkVal, port) == 16);
    assert!(offset_of!(Lb6RevSkVal, rev_nat_tag) == 18);

    assert!(size_of::<SockTermKey>() == 20);
    assert!(offset_of!(SockTermKey, port) == 16);
    assert!(offset_of!(SockTermKey, proto) == 18);
    assert!(size_of::<SockTermRec>() == 64);
    assert!(offset_of!(SockTermRec, vip) == 40);
    assert!(offset_of!(SockTermRec, vport) == 56);
    assert!(offset_of!(SockTermRec, cookie) == 24);
    assert!(offset_of!(SockTermRec, cgroup_id) == 32);
    assert!(offset_of!(SockTermRec, port) == 16);
    assert!(offset_of!(SockTermRec, family) == 18);
    assert!(offset_of!(SockTermRec, result) == 20);
};

/// `NB_FLOW_RATE_DEFAULT`: events per second per CPU when the rate is 0.
pub const FLOW_RATE_DEFAULT: u32 = 10_000;
/// `NB_FLOW_RING_BYTES`.
pub const FLOW_RING_BYTES: u32 = 1 << 20;
/// `NB_FLOW_TRANSLATED`.
pub const FLOW_TRANSLATED: u8 = 1;
/// `NB_FLOW_AFFINITY_HIT`.
pub const FLOW_AFFINITY_HIT: u8 = 2;
/// `NB_FLOW_REFUSED`.
pub const FLOW_REFUSED: u8 = 3;
/// `NB_FLOW_ERROR`.
pub const FLOW_ERROR: u8 = 4;
/// `NB_FLOW_OBSERVED`.
pub const FLOW_OBSERVED: u8 = 5;
/// `NB_FLOW_SRC_RANGE`.
pub const FLOW_SRC_RANGE: u8 = 6;
/// `NB_FLOW_DENIED`: the per-packet path dropped a flow from outside the
/// Service's `loadBalancerSourceRanges`.
pub const FLOW_DENIED: u8 = 7;
/// `NB_FLOW_NOT_SERVICE`: the destination is no Service (only with
/// [`FLOW_CFG_ALL`]).
pub const FLOW_NOT_SERVICE: u8 = 9;
/// `NB_FLOW_UNSUPPORTED`: neither TCP nor UDP (only with [`FLOW_CFG_ALL`]).
pub const FLOW_UNSUPPORTED: u8 = 10;
/// `NB_FLOW_CFG_ON`: `nb_flow_cfg.enabled` bit, decisions on Services.
pub const FLOW_CFG_ON: u32 = 0x1;
/// `NB_FLOW_CFG_ALL`: `nb_flow_cfg.enabled` bit, also not-a-service and
/// unsupported decisions.
pub const FLOW_CFG_ALL: u32 = 0x2;
/// `NB_FLOW_HOOK_CONNECT`.
pub const FLOW_HOOK_CONNECT: u8 = 1;
/// `NB_FLOW_HOOK_PACKET`: the per-packet (tc) path.
pub const FLOW_HOOK_PACKET: u8 = 3;
/// `NB_FLOW_HOOK_SENDMSG`.
pub const FLOW_HOOK_SENDMSG: u8 = 2;
/// `enum nb_flow_stat`, index of `nb_flow_stats`.
pub const FLOW_STAT_NAMES: [&str; 3] = ["emitted", "rate_limited", "ring_full"];

/// `struct nb_flow_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCfg {
    /// 0: no events; 1: emit.
    pub enabled: u32,
    /// Events per second per CPU; 0 = [`FLOW_RATE_DEFAULT`].
    pub rate: u32,
}

/// `struct nb_flow_bucket`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    /// Token-nanoseconds available.
    pub tokens: u64,
    /// Last refill (CLOCK_MONOTONIC ns).
    pub last_ns: u64,
}

/// `struct nb_flow_event`: one record of `nb_flow_ring`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    /// Client's netns cookie.
    pub netns_cookie: u64,
    /// Client's cgroup v2 id.
    pub cgroup_id: u64,
    /// Frontend address, network order (IPv4 in `[0]`).
    pub vip: [u32; 4],
    /// Chosen backend address, network order (IPv4 in `[0]`), zero if none.
    pub backend: [u32; 4],
    /// Chosen backend id, 0 = none.
    pub backend_id: u32,
    /// `enum nb_counter` index.
    pub outcome: u32,
    /// Service id.
    pub svc_id: u32,
    /// Frontend port, network order.
    pub vport: u16,
    /// Backend port, network order.
    pub backend_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// `FLOW_*` verdict.
    pub verdict: u8,
    /// `FLOW_HOOK_*`.
    pub hook: u8,
    /// Zero.
    pub pad: u32,
    /// Per-packet path: the client's address, network order (IPv4 in
    /// `[0]`); zero from the socket hooks.
    pub client: [u32; 4],
    /// Per-packet path: the client's port, network order.
    pub client_port: u16,
    /// Zero.
    pub pad2: u16,
    /// Zero.
    pub pad3: u32,
}

impl FlowEvent {
    /// Decodes one ring buffer record (None: too short).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: FlowEvent is repr(C) plain integers (every bit pattern is
        // valid) and `b` holds at least size_of::<Self>() bytes; the read is
        // unaligned-safe.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

const _: () = {
    assert!(size_of::<FlowCfg>() == 8);
    assert!(size_of::<FlowBucket>() == 16);
    assert!(size_of::<FlowEvent>() == 104);
    assert!(offset_of!(FlowEvent, client) == 80);
    assert!(offset_of!(FlowEvent, client_port) == 96);
    assert!(offset_of!(FlowEvent, vip) == 24);
    assert!(offset_of!(FlowEvent, backend) == 40);
    assert!(offset_of!(FlowEvent, backend_id) == 56);
    assert!(offset_of!(FlowEvent, outcome) == 60);
    assert!(offset_of!(FlowEvent, svc_id) == 64);
    assert!(offset_of!(FlowEvent, vport) == 68);
    assert!(offset_of!(FlowEvent, backend_port) == 70);
    assert!(offset_of!(FlowEvent, proto) == 72);
    assert!(offset_of!(FlowEvent, family) == 73);
    assert!(offset_of!(FlowEvent, verdict) == 74);
    assert!(offset_of!(FlowEvent, hook) == 75);
    assert!(offset_of!(FlowEvent, pad) == 76);
};

// SAFETY: repr(C) plain integers with explicit padding.
unsafe impl aya::Pod for FlowCfg {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowBucket {}

/// `struct nb_svc_stats`: one CPU's counters of one service id (value of
/// `nb_svc_stats`); [`SvcStats::sum`] sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SvcStats {
    /// Socket LB: connect()/sendmsg() translated to a backend (affinity hits included).
    pub translated: u64,
    /// Socket LB: no usable backend, failed ECONNREFUSED.
    pub refused: u64,
    /// Socket LB and pod tc path: backend taken from a ClientIP affinity entry.
    pub affinity_hits: u64,
    /// tc paths (NodePort, pod interfaces): new flows translated.
    pub tc_new_flows: u64,
    /// tc paths: new flows dropped for want of a (local) backend.
    pub tc_dropped: u64,
}

impl SvcStats {
    /// Field-wise sum (saturating), e.g. of the per-CPU values.
    pub fn plus(self, o: SvcStats) -> SvcStats {
        SvcStats {
            translated: self.translated.saturating_add(o.translated),
            refused: self.refused.saturating_add(o.refused),
            affinity_hits: self.affinity_hits.saturating_add(o.affinity_hits),
            tc_new_flows: self.tc_new_flows.saturating_add(o.tc_new_flows),
            tc_dropped: self.tc_dropped.saturating_add(o.tc_dropped),
        }
    }

    /// The sum of per-CPU values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a SvcStats>) -> SvcStats {
        per_cpu
            .into_iter()
            .fold(SvcStats::default(), |a, b| a.plus(*b))
    }
}

const _: () = {
    assert!(size_of::<SvcStats>() == 40);
    assert!(offset_of!(SvcStats, translated) == 0);
    assert!(offset_of!(SvcStats, refused) == 8);
    assert!(offset_of!(SvcStats, affinity_hits) == 16);
    assert!(offset_of!(SvcStats, tc_new_flows) == 24);
    assert!(offset_of!(SvcStats, tc_dropped) == 32);
};

// SAFETY: repr(C) plain u64s, no padding.
unsafe impl aya::Pod for SvcStats {}

/// Outcome counters, index of `nb_counters` (`enum nb_counter`).
pub const COUNTER_NAMES: [&str; 39] = [
    "connect_translated",
    "sendmsg_translated",
    "not_service",
    "proto_unsupported",
    "no_backend",
    "no_backend_slot",
    "backend_missing",
    "affinity_hit",
    "affinity_new",
    "affinity_expired",
    "affinity_stale",
    "rev_sk_update_fail",
    "recvmsg_translated",
    "recvmsg_no_entry",
    "getpeername_translated",
    "getpeername_no_entry",
    "rev_stale",
    "observed",
    "no_config",
    "nodeport_local",
    "nodeport_snat",
    "nodeport_ct_hit",
    "nodeport_no_backend",
    "nodeport_no_local_backend",
    "nodeport_no_snat_addr",
    "nodeport_ct_full",
    "nodeport_not_service",
    "nodeport_maglev",
    "nodeport_src_range_denied",
    "src_range_passed",
    "nodeport_ct_lapsed",
    "nodeport_ct_reopened",
    "nodeport_ct_replaced",
    "nodeport_ct_clash",
    "sock_pod_netns_skipped",
    "pod_translated",
    "pod_reply_translated",
    "pod_no_backend",
    "pod_ct_full",
];

/// `NB_CTR_MAX`.
pub const COUNTER_MAX: u32 = COUNTER_NAMES.len() as u32;

/// A VIP or backend address as kept in the maps (network order u32).
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Back from the map form.
pub fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// An IPv6 address as kept in the maps (four network-order words).
pub fn addr6_be(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Back from the map form.
pub fn addr6_from_be(v: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in v.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// Any address in the 16-byte form of `nb_sock_term` (IPv4 v4-mapped).
pub fn addr_any16_be(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => addr6_be(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => addr6_be(v6),
    }
}

/// A port as kept in the maps (network order u16).
pub fn port_be(p: u16) -> u16 {
    p.to_be()
}

/// Back from the map form.
pub fn port_from_be(p: u16) -> u16 {
    u16::from_be(p)
}

/// Protocol name for display.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "ANY",
    }
}

/// A frontend address as a value type (host order), for tables and display.
/// Ordered by family (IPv4 first), address, port, protocol ([`Ord`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct L4Addr {
    /// IPv4 or IPv6 address.
    pub ip: IpAddr,
    /// Port, host order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl std::fmt::Display for L4Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, proto_name(self.proto)),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, proto_name(self.proto)),
        }
    }
}

impl Ord for L4Addr {
    /// The order a derived `Ord` gives (`IpAddr`'s, then port, then
    /// protocol), by integer compares: the addresses' own `Ord` compares
    /// their octet arrays through `memcmp`, a call per step of every B-tree
    /// search in the reconciler's mirror (a million backends at 100k
    /// Services × 10).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        fn rank(ip: &IpAddr) -> (u8, u128) {
            match ip {
                IpAddr::V4(a) => (4, u128::from(u32::from(*a))),
                IpAddr::V6(a) => (6, u128::from(*a)),
            }
        }
        rank(&self.ip)
            .cmp(&rank(&other.ip))
            .then(self.port.cmp(&other.port))
            .then(self.proto.cmp(&other.proto))
    }
}

impl PartialOrd for L4Addr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl L4Addr {
    /// An IPv6 address (lb6 maps)?
    pub fn is_v6(&self) -> bool {
        self.ip.is_ipv6()
    }
}

impl Lb4Key {
    /// The key of a frontend or slot (`fe` IPv4; see [`Lb6Key::new`]).
    pub fn new(fe: L4Addr, slot: u16) -> Self {
        let ip = match fe.ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        Self {
            address: addr_be(ip),
            dport: port_be(fe.port),
            backend_slot: slot,
            proto: fe.proto,
            pad: [0; 3],
        }
    }

    /// The frontend this key belongs to.
    pub fn frontend(&self) -> L4Addr {
        L4Addr {
            ip: IpAddr::V4(addr_from_be(self.address)),
            port: port_from_be(self.dport),
            proto: self.proto,
        }
    }
}

impl Lb6Key {
    /// The key of a frontend or slot (`fe` IPv6; see [`Lb4Key::new`]).
    pub fn new(fe: L4Addr, slot: u16) -> Self {
        let ip = match fe.ip {
            IpAddr::V6(ip) => ip,
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        };
        Self {
            address: addr6_be(ip),
            dport: port_be(fe.port),
            backend_slot: slot,
            proto: fe.proto,
            pad: [0; 3],
        }
    }

    /// The frontend this key belongs to.
    pub fn frontend(&self) -> L4Addr {
        L4Addr {
            ip: IpAddr::V6(addr6_from_be(self.address)),
            port: port_from_be(self.dport),
            proto: self.proto,
        }
    }
}

impl Lb4Backend {
    /// The backend's address.
    pub fn l4(&self) -> L4Addr {
        L4Addr {
            ip: IpAddr::V4(addr_from_be(self.address)),
            port: port_from_be(self.port),
            proto: self.proto,
        }
    }
}

impl Lb6Backend {
    /// The backend's address.
    pub fn l4(&self) -> L4Addr {
        L4Addr {
            ip: IpAddr::V6(addr6_from_be(self.address)),
            port: port_from_be(self.port),
            proto: self.proto,
        }
    }
}

impl SockTermKey {
    /// The key of a removed backend.
    pub fn new(be: L4Addr) -> Self {
        Self {
            address: addr_any16_be(be.ip),
            port: port_be(be.port),
            proto: be.proto,
            pad: 0,
        }
    }
}

impl SockTermRec {
    /// The peer, IPv4 when v4-mapped.
    pub fn peer(&self) -> (IpAddr, u16) {
        let ip = addr6_from_be(self.address);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        (ip, port_from_be(self.port))
    }

    /// The frontend the socket asked for, IPv4 when v4-mapped.
    pub fn frontend(&self) -> (IpAddr, u16) {
        let ip = addr6_from_be(self.vip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        (ip, port_from_be(self.vport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l4addr_orders_as_the_derived_order_would() {
        // The tuple's order is what `#[derive(Ord)]` gave: the mirror's
        // B-trees, id allocation and golden snapshots depend on it.
        let ips: Vec<IpAddr> = [
            "0.0.0.0",
            "0.0.0.1",
            "9.255.255.255",
            "10.0.0.1",
            "10.0.1.0",
            "10.1.0.0",
            "128.0.0.0",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "fd00::1",
            "fd00::100",
            "fd00:1::",
            "ff00::",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut all = Vec::new();
        for ip in &ips {
            for port in [0u16, 1, 80, 255, 256, 65535] {
                for proto in [6u8, 17, 132] {
                    all.push(L4Addr {
                        ip: *ip,
                        port,
                        proto,
                    });
                }
            }
        }
        for a in &all {
            for b in &all {
                assert_eq!(
                    a.cmp(b),
                    (a.ip, a.port, a.proto).cmp(&(b.ip, b.port, b.proto)),
                    "{a} vs {b}"
                );
                assert_eq!(a.partial_cmp(b), Some(a.cmp(b)));
            }
        }
    }

    #[test]
    fn header_counter_names_match_enum() {
        // bpf/lb.h enumerates NB_CTR_* in this order; NB_CTR_MAX follows the last.
        let header = include_str!("../bpf/lb.h");
        let start = header.find("enum nb_counter").unwrap();
        let body = &header[start..];
        let ctrs: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("NB_CTR_"))
            .map(|l| l.split([' ', ',', '=']).next().unwrap())
            .take_while(|n| *n != "MAX")
            .collect();
        assert_eq!(ctrs.len(), COUNTER_NAMES.len(), "{ctrs:?}");
    }

    #[test]
    fn network_order_round_trip() {
        let fe = L4Addr {
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: 53,
            proto: PROTO_UDP,
        };
        let k = Lb4Key::new(fe, 0);
        assert_eq!(k.address.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(k.dport.to_ne_bytes(), [0, 53]);
        assert_eq!(k.frontend(), fe);
    }

    #[test]
    fn ipv6_network_order_round_trip() {
        let fe = L4Addr {
            ip: "fd00:96::a".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
        };
        let k = Lb6Key::new(fe, 0);
        assert_eq!(k.address[0].to_ne_bytes(), [0xfd, 0, 0, 0x96]);
        assert_eq!(k.address[3].to_ne_bytes(), [0, 0, 0, 0x0a]);
        assert_eq!(k.frontend(), fe);
        assert_eq!(fe.to_string(), "[fd00:96::a]:53/UDP");
        let v4 = L4Addr {
            ip: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 7)),
            port: 8080,
            proto: PROTO_UDP,
        };
        let t = SockTermKey::new(v4);
        assert_eq!(t.address[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(t.address[3].to_ne_bytes(), [10, 244, 0, 7]);
    }
}
