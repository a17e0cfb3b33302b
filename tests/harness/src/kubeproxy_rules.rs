//! kube-proxy's iptables ruleset, generated from Services and EndpointSlices.
//!
//! A pure function ([`render`]) that returns `iptables-restore` input in the
//! shape kube-proxy's iptables mode writes (pkg/proxy/iptables/proxier.go):
//! `KUBE-SERVICES` jumped to from nat PREROUTING/OUTPUT, one `KUBE-SVC-<hash>`
//! per service port that spreads over `KUBE-SEP-<hash>` chains with
//! `-m statistic --mode random --probability`, each SEP marking hairpin traffic
//! for masquerade and DNATing, `KUBE-POSTROUTING`, `KUBE-NODEPORTS` with
//! `KUBE-EXT-<hash>`, the filter table's `KUBE-FORWARD`, `KUBE-SERVICES`
//! (REJECT for services without endpoints), `KUBE-EXTERNAL-SERVICES`,
//! `KUBE-PROXY-FIREWALL` and the `KUBE-PROXY-CANARY` chains.
//!
//! Chain names use kube-proxy's hash: base32(sha256(servicePortName + protocol))
//! truncated to 16 characters (plus `+ "ip:port"` for endpoint chains), so the
//! names match what a real kube-proxy would write for the same objects.
//!
//! The output restores whole tables (built-in chains declared, jumps
//! included): podnet applies it without `--noflush` in a node's network
//! namespace, which only ever holds these rules.
//!
//! Large cluster mode (more than [`LARGE_CLUSTER_ENDPOINTS`] endpoints: no
//! comments on the per-endpoint rules), the localhost-NodePort guard
//! (`KUBE-FIREWALL`) and the nfacct-counted INVALID drop are kube-proxy
//! v1.36's. The output equals the real kube-proxy's for the bench's workload
//! at 1k and 10k Services (tests/bench/tests/generators_match_kube_proxy.rs).
//!
//! Not emulated: LoadBalancer ingress IPs and externalIPs, traffic policy
//! `Local` (treated as `Cluster`), terminating-endpoint fallback, IPv6.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

/// Settings that a kube-proxy takes from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOptions {
    /// `clusterCIDR`: traffic to a ClusterIP from outside it is masqueraded
    /// (`! -s CIDR ... -j KUBE-MARK-MASQ`). `None` = kube-proxy without it.
    pub cluster_cidr: Option<String>,
    /// `iptables.masqueradeBit`: the fwmark bit for KUBE-MARK-MASQ (kube-proxy default 14).
    pub masquerade_bit: u8,
    /// `iptables.localhostNodePorts` (default true) with `nodePortAddresses`
    /// unset: kube-proxy sets `route_localnet` and guards it with the filter
    /// `KUBE-FIREWALL` chain ("block incoming localnet connections") jumped
    /// to first from INPUT and OUTPUT.
    pub localhost_nodeports: bool,
    /// Count dropped INVALID packets in the nfacct object
    /// [`INVALID_DROPPED_NFACCT`] (`-m nfacct` in KUBE-FORWARD's DROP rule), as
    /// kube-proxy ≥ 1.29 does where the kernel has nfacct; with
    /// `localhost_nodeports` also write kube-proxy's localhost NodePort rules
    /// (`-d 127.0.0.0/8 … -m nfacct --nfacct-name`
    /// [`LOCALHOST_NODEPORTS_NFACCT`] in KUBE-NODEPORTS, before each
    /// NodePort's own rule), which kube-proxy writes only when that counter
    /// exists. The objects must exist in the namespace before the rules are
    /// restored ([`ensure_nfacct_counters`]), so it is off by default.
    pub nfacct: bool,
}

impl Default for RuleOptions {
    fn default() -> Self {
        Self {
            cluster_cidr: Some("10.244.0.0/16".to_string()),
            masquerade_bit: 14,
            localhost_nodeports: true,
            nfacct: false,
        }
    }
}

/// kube-proxy's `largeClusterEndpointsThreshold`: above this many endpoints
/// in total it leaves the comments out of the KUBE-SVC → KUBE-SEP jumps and
/// the KUBE-SEP rules.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The nfacct object kube-proxy counts dropped INVALID packets in.
pub const INVALID_DROPPED_NFACCT: &str = "ct_state_invalid_dropped_pkts";

/// The nfacct object kube-proxy counts accepted localhost NodePort packets in.
pub const LOCALHOST_NODEPORTS_NFACCT: &str = "localhost_nps_accepted_pkts";

/// Creates both nfacct objects kube-proxy (iptables mode) creates at start
/// ([`INVALID_DROPPED_NFACCT`], [`LOCALHOST_NODEPORTS_NFACCT`]) in the
/// calling thread's network namespace (see [`ensure_nfacct_counter`]).
pub fn ensure_nfacct_counters() -> std::io::Result<()> {
    ensure_nfacct_counter(INVALID_DROPPED_NFACCT)?;
    ensure_nfacct_counter(LOCALHOST_NODEPORTS_NFACCT)
}

/// One endpoint (`ip:port`) of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    ip: String,
    port: i32,
}

impl Endpoint {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// A Service port as kube-proxy sees it.
#[derive(Debug, Clone)]
struct ServicePort {
    /// `ns/name:port` (or `ns/name` for an unnamed port): kube-proxy's ServicePortName.
    name: String,
    /// lower-case protocol: tcp, udp, sctp.
    protocol: String,
    cluster_ip: String,
    port: i32,
    node_port: Option<i32>,
    affinity_seconds: Option<i32>,
    endpoints: Vec<Endpoint>,
}

/// Creates the nfacct (extended accounting) object `name` in the calling
/// thread's network namespace, as kube-proxy does at start; an existing one
/// is fine. Run it on a thread that entered the namespace
/// ([`crate::netns::in_netns`]).
pub fn ensure_nfacct_counter(name: &str) -> std::io::Result<()> {
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_ACCT: u16 = 7;
    const NFNL_MSG_ACCT_NEW: u16 = 0;
    const NFACCT_NAME: u16 = 1;
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    let attr_len = 4 + attr.len();
    let padded = attr_len.div_ceil(4) * 4;
    let total = 16 + 4 + padded;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW).to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // nfgenmsg, NFNETLINK_V0
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
    msg.extend_from_slice(&attr);
    msg.resize(total, 0);

    // SAFETY: plain socket syscalls on a descriptor this function owns;
    // the buffers outlive the calls and their lengths are passed.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let result = (|| {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            let sent = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut buf = [0u8; 512];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // nlmsghdr (16) then nlmsgerr's error (i32): 0 = ack.
            if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != libc::NLMSG_ERROR as u16 {
                return Err(std::io::Error::other("nfacct: no netlink ack"));
            }
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if err == 0 || err == -libc::EEXIST {
                Ok(())
            } else {
                Err(std::io::Error::from_raw_os_error(-err))
            }
        })();
        libc::close(fd);
        result
    }
}

/// kube-proxy's `portProtoHash`: base32(sha256(s)), first 16 characters.
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut out = base32(&digest);
    out.truncate(16);
    out
}

/// `KUBE-SVC-<hash>` for a ServicePortName (`ns/name:port`) and lower-case protocol.
pub fn service_chain(service_port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&format!("{service_port_name}{protocol}"))
    )
}

/// `KUBE-EXT-<hash>`: the external (NodePort) entry chain of a service port.
pub fn external_chain(service_port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-EXT-{}",
        hash16(&format!("{service_port_name}{protocol}"))
    )
}

/// `KUBE-SEP-<hash>` for a service port's endpoint `ip:port`.
pub fn endpoint_chain(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{service_port_name}{protocol}{endpoint}"))
    )
}

/// RFC 4648 base32 with the standard alphabet and padding (Go's base32.StdEncoding).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = buf.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                let idx = ((bits >> (35 - i * 5)) & 0x1f) as usize;
                out.push(char::from(ALPHABET[idx]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

fn is_ipv4(ip: &str) -> bool {
    ip.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Collects the service ports kube-proxy would program, sorted by name and protocol.
fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    // (namespace, service) -> slices
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(ns) = slice.metadata.namespace.clone() else {
            continue;
        };
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        by_service.entry((ns, svc.clone())).or_default().push(slice);
    }

    let mut out = Vec::new();
    for svc in services {
        let (Some(ns), Some(name)) = (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Some(cluster_ip) = spec.cluster_ip.as_deref() else {
            continue;
        };
        if cluster_ip.is_empty() || cluster_ip == "None" || !is_ipv4(cluster_ip) {
            continue;
        }
        let affinity_seconds = if spec.session_affinity.as_deref() == Some("ClientIP") {
            Some(
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(10800),
            )
        } else {
            None
        };
        let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let svc_slices = by_service
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let port_name = port.name.clone().unwrap_or_default();
            let protocol = port.protocol.as_deref().unwrap_or("TCP").to_string();
            let spn = if port_name.is_empty() {
                format!("{ns}/{name}")
            } else {
                format!("{ns}/{name}:{port_name}")
            };
            let mut endpoints = BTreeSet::new();
            for slice in &svc_slices {
                let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                }) else {
                    continue;
                };
                let Some(target) = slice_port.port else {
                    continue;
                };
                for ep in slice.endpoints.iter().flatten() {
                    // Ready unless the condition says otherwise (nil means ready).
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    if let Some(ip) = ep.addresses.first() {
                        endpoints.insert(Endpoint {
                            ip: ip.clone(),
                            port: target,
                        });
                    }
                }
            }
            out.push(ServicePort {
                name: spn,
                protocol: protocol.to_lowercase(),
                cluster_ip: cluster_ip.to_string(),
                port: port.port,
                node_port: if node_ports { port.node_port } else { None },
                affinity_seconds,
                endpoints: endpoints.into_iter().collect(),
            });
        }
    }
    out.sort_by(|a, b| (&a.name, &a.protocol).cmp(&(&b.name, &b.protocol)));
    out
}

/// Renders the filter, nat and mangle tables kube-proxy (iptables mode) would
/// program for these objects, as one `iptables-restore` input.
pub fn render(services: &[Service], slices: &[EndpointSlice], opts: &RuleOptions) -> String {
    let ports = service_ports(services, slices);
    let large = ports.iter().map(|p| p.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS;
    // `-m comment --comment X ` unless kube-proxy is in large cluster mode.
    let ep_comment = |text: &str| {
        if large {
            String::new()
        } else if text.contains(' ') {
            format!("-m comment --comment \"{text}\" ")
        } else {
            format!("-m comment --comment {text} ")
        }
    };
    let mark = format!("{0:#x}/{0:#x}", 1u32 << opts.masquerade_bit);
    let unmark = format!("{:#x}/0x0", 1u32 << opts.masquerade_bit);

    let mut filter_rules = String::new();
    let mut nat_chains: BTreeSet<String> = BTreeSet::new();
    let mut svc_rules = String::new();
    let mut nodeport_rules = String::new();
    let mut chain_rules = String::new();

    for sp in &ports {
        let svc_chain = service_chain(&sp.name, &sp.protocol);
        let proto = &sp.protocol;
        if sp.endpoints.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{} has no endpoints\" -m {proto} --dport {} -j REJECT --reject-with icmp-port-unreachable",
                sp.cluster_ip, sp.name, sp.port
            );
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -p {proto} -m comment --comment \"{} has no endpoints\" -m addrtype --dst-type LOCAL -m {proto} --dport {np} -j REJECT --reject-with icmp-port-unreachable",
                    sp.name
                );
            }
            continue;
        }

        nat_chains.insert(svc_chain.clone());
        let _ = writeln!(
            svc_rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j {svc_chain}",
            sp.cluster_ip, sp.name, sp.port
        );
        if let Some(cidr) = &opts.cluster_cidr {
            let _ = writeln!(
                chain_rules,
                "-A {svc_chain} ! -s {cidr} -d {}/32 -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
                sp.cluster_ip, sp.name, sp.port
            );
        }
        if let Some(np) = sp.node_port {
            let ext_chain = external_chain(&sp.name, proto);
            nat_chains.insert(ext_chain.clone());
            if opts.localhost_nodeports && opts.nfacct {
                let _ = writeln!(
                    nodeport_rules,
                    "-A KUBE-NODEPORTS -d 127.0.0.0/8 -p {proto} -m comment --comment {} -m {proto} --dport {np} -m nfacct --nfacct-name {LOCALHOST_NODEPORTS_NFACCT} -j {ext_chain}",
                    sp.name
                );
            }
            let _ = writeln!(
                nodeport_rules,
                "-A KUBE-NODEPORTS -p {proto} -m comment --comment {} -m {proto} --dport {np} -j {ext_chain}",
                sp.name
            );
            let _ = writeln!(
                chain_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
                sp.name
            );
            let _ = writeln!(chain_rules, "-A {ext_chain} -j {svc_chain}");
        }

        let seps: Vec<(String, &Endpoint)> = sp
            .endpoints
            .iter()
            .map(|ep| (endpoint_chain(&sp.name, proto, &ep.addr()), ep))
            .collect();
        if let Some(seconds) = sp.affinity_seconds {
            for (sep, ep) in &seps {
                let _ = writeln!(
                    chain_rules,
                    "-A {svc_chain} {}-m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}",
                    ep_comment(&format!("{} -> {}", sp.name, ep.addr()))
                );
            }
        }
        let n = seps.len();
        for (i, (sep, ep)) in seps.iter().enumerate() {
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    chain_rules,
                    "-A {svc_chain} {}-m statistic --mode random --probability {} -j {sep}",
                    ep_comment(&format!("{} -> {}", sp.name, ep.addr())),
                    probability(remaining)
                );
            } else {
                let _ = writeln!(
                    chain_rules,
                    "-A {svc_chain} {}-j {sep}",
                    ep_comment(&format!("{} -> {}", sp.name, ep.addr()))
                );
            }
        }
        for (sep, ep) in &seps {
            nat_chains.insert(sep.clone());
            let _ = writeln!(
                chain_rules,
                "-A {sep} -s {}/32 {}-j KUBE-MARK-MASQ",
                ep.ip,
                ep_comment(&sp.name)
            );
            let recent = if sp.affinity_seconds.is_some() {
                format!("-m recent --name {sep} --set ")
            } else {
                String::new()
            };
            let _ = writeln!(
                chain_rules,
                "-A {sep} -p {proto} {}{recent}-m {proto} -j DNAT --to-destination {}",
                ep_comment(&sp.name),
                ep.addr()
            );
        }
    }

    let mut out = String::new();
    out.push_str(
        "# Generated by netboot-harness kubeproxy_rules (kube-proxy iptables mode emulation)\n",
    );
    // mangle: only the canary kube-proxy creates.
    out.push_str("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n");

    out.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    let mut filter_chains = vec![
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-CANARY",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ];
    if opts.localhost_nodeports {
        filter_chains.push("KUBE-FIREWALL");
    }
    for chain in filter_chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if opts.localhost_nodeports {
        out.push_str("-A INPUT -j KUBE-FIREWALL\n");
    }
    out.push_str("-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n");
    out.push_str("-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n");
    out.push_str("-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n");
    out.push_str("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n");
    out.push_str(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
    );
    out.push_str(
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n");
    if opts.localhost_nodeports {
        out.push_str("-A OUTPUT -j KUBE-FIREWALL\n");
    }
    out.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n");
    out.push_str(
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    if opts.localhost_nodeports {
        out.push_str("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    }
    if opts.nfacct {
        let _ = writeln!(
            out,
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name {INVALID_DROPPED_NFACCT} -j DROP"
        );
    } else {
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    }
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark} -j ACCEPT"
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n");

    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for chain in [
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-PROXY-CANARY",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for chain in &nat_chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --set-xmark {mark}");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {mark} -j RETURN");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --set-xmark {unmark}");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str(&svc_rules);
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str(&nodeport_rules);
    out.push_str(&chain_rules);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort as K8sServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(
        ns: &str,
        name: &str,
        ip: &str,
        type_: &str,
        ports: &[(&str, &str, i32, Option<i32>)],
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                type_: Some(type_.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(pname, proto, port, np)| K8sServicePort {
                            name: (!pname.is_empty()).then(|| pname.to_string()),
                            protocol: Some(proto.to_string()),
                            port: *port,
                            node_port: *np,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(
        ns: &str,
        svc: &str,
        ports: &[(&str, &str, i32)],
        eps: &[(&str, bool)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{svc}-abcde")),
                labels: Some([("kubernetes.io/service-name".to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, ready)| SliceEndpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, proto, port)| EndpointPort {
                        name: (!name.is_empty()).then(|| name.to_string()),
                        protocol: Some(proto.to_string()),
                        port: Some(*port),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    /// Chain names real kube-proxies write for kubeadm's default Services.
    #[test]
    fn chain_names_match_real_kube_proxy() {
        assert_eq!(
            service_chain("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns", "udp"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns-tcp", "tcp"),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:metrics", "tcp"),
            "KUBE-SVC-JD5MR3NA4I4DYORP"
        );
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"fo"), "MZXQ====");
        assert_eq!(base32(b"foob"), "MZXW6YQ=");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn probabilities_use_kube_proxy_format() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
    }

    #[test]
    fn golden_ruleset() {
        let services = vec![
            svc(
                "default",
                "kubernetes",
                "10.96.0.1",
                "ClusterIP",
                &[("https", "TCP", 443, None)],
            ),
            svc(
                "kube-system",
                "kube-dns",
                "10.96.0.10",
                "ClusterIP",
                &[("dns", "UDP", 53, None), ("dns-tcp", "TCP", 53, None)],
            ),
            svc(
                "t",
                "probe",
                "10.96.5.5",
                "NodePort",
                &[("", "TCP", 80, Some(30080))],
            ),
            svc(
                "t",
                "empty",
                "10.96.5.6",
                "ClusterIP",
                &[("http", "TCP", 80, None)],
            ),
            svc(
                "t",
                "headless",
                "None",
                "ClusterIP",
                &[("http", "TCP", 80, None)],
            ),
        ];
        let mut sticky = svc(
            "t",
            "sticky",
            "10.96.5.7",
            "ClusterIP",
            &[("udp", "UDP", 81, None)],
        );
        if let Some(spec) = sticky.spec.as_mut() {
            spec.session_affinity = Some("ClientIP".into());
        }
        let mut services = services;
        services.push(sticky);
        let slices = vec![
            slice(
                "default",
                "kubernetes",
                &[("https", "TCP", 6443)],
                &[("172.18.0.2", true)],
            ),
            slice(
                "kube-system",
                "kube-dns",
                &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
                &[("10.244.1.3", true)],
            ),
            slice(
                "t",
                "probe",
                &[("", "TCP", 8080)],
                &[
                    ("10.244.2.7", true),
                    ("10.244.1.5", true),
                    ("10.244.3.9", true),
                    ("10.244.3.10", false),
                ],
            ),
            slice(
                "t",
                "sticky",
                &[("udp", "UDP", 8081)],
                &[("10.244.1.5", true)],
            ),
        ];
        insta::assert_snapshot!(render(&services, &slices, &RuleOptions::default()));
    }

    /// Above 1000 endpoints kube-proxy drops the per-endpoint comments
    /// (large cluster mode); the Service's own rules keep theirs.
    #[test]
    fn large_clusters_have_no_endpoint_comments() {
        let eps: Vec<String> = (0..1001)
            .map(|i| format!("10.244.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let ep_refs: Vec<(&str, bool)> = eps.iter().map(|e| (e.as_str(), true)).collect();
        let services = vec![svc(
            "t",
            "big",
            "10.96.5.5",
            "ClusterIP",
            &[("", "TCP", 80, None)],
        )];
        let slices = vec![slice("t", "big", &[("", "TCP", 8080)], &ep_refs)];
        let out = render(&services, &slices, &RuleOptions::default());
        assert!(!out.contains(" -> "), "endpoint comments left");
        assert!(out.contains("--comment \"t/big cluster IP\""));
        assert!(out.contains("-m statistic --mode random --probability 0.0009990010 -j KUBE-SEP-"));
        let small = render(&services, &slices[..0], &RuleOptions::default());
        assert!(small.contains("t/big has no endpoints"));
        let fewer = vec![slice("t", "big", &[("", "TCP", 8080)], &ep_refs[..1000])];
        assert!(
            render(&services, &fewer, &RuleOptions::default()).contains("t/big -> 10.244.0.1:8080")
        );
    }

    #[test]
    fn nfacct_and_localhost_nodeports_follow_the_options() {
        let on = render(
            &[],
            &[],
            &RuleOptions {
                nfacct: true,
                ..RuleOptions::default()
            },
        );
        assert!(on.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"));
        assert!(on.contains("-A INPUT -j KUBE-FIREWALL\n"));
        // Localhost NodePorts: only with both options (kube-proxy writes
        // them only where it has the nfacct counter), before the NodePort's
        // own rule.
        let services = [svc(
            "t",
            "np",
            "10.96.0.5",
            "NodePort",
            &[("http", "TCP", 80, Some(30080))],
        )];
        let slices = [slice(
            "t",
            "np",
            &[("http", "TCP", 8080)],
            &[("10.244.0.1", true)],
        )];
        let both = RuleOptions {
            nfacct: true,
            ..RuleOptions::default()
        };
        let np = render(&services, &slices, &both);
        let ext = external_chain("t/np:http", "tcp");
        let local = format!("-A KUBE-NODEPORTS -d 127.0.0.0/8 -p tcp -m comment --comment t/np:http -m tcp --dport 30080 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext}\n");
        let plain = format!("-A KUBE-NODEPORTS -p tcp -m comment --comment t/np:http -m tcp --dport 30080 -j {ext}\n");
        assert!(np.contains(&format!("{local}{plain}")), "{np}");
        for opts in [
            RuleOptions::default(),
            RuleOptions {
                localhost_nodeports: false,
                ..both
            },
        ] {
            let out = render(&services, &slices, &opts);
            assert!(
                out.contains(&plain) && !out.contains("127.0.0.0/8 -p tcp"),
                "{out}"
            );
        }
        let off = render(
            &[],
            &[],
            &RuleOptions {
                localhost_nodeports: false,
                ..RuleOptions::default()
            },
        );
        assert!(!off.contains("KUBE-FIREWALL"));
        assert!(off.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"));
    }

    #[test]
    fn no_services_still_has_the_base_chains() {
        let out = render(
            &[],
            &[],
            &RuleOptions {
                cluster_cidr: None,
                ..RuleOptions::default()
            },
        );
        assert!(out.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(out.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"));
        assert!(!out.contains("KUBE-SVC-"));
    }
}
