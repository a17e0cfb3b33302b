//! kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go, v1.36) for the
//! bench workload, as the `nft -f` transactions kube-proxy sends (knftables
//! writes one `add`/`flush` command per line).
//!
//! Structure (checked against the real kube-proxy v1.36.3 by
//! tests/generators_match_kube_proxy.rs): table `ip kube-proxy`; base chains
//! `filter-*` / `nat-*`; `services` marks traffic to a ClusterIP from outside
//! the pod CIDR for masquerade (one rule on the `cluster-ips` set), then looks
//! up `ip daddr . meta l4proto . th dport vmap @service-ips` →
//! `service-<hash>-ns/name/tcp/port`, one rule: `dnat ip addr . port to
//! numgen random mod n map { i : ip . port }` (no per-endpoint chains any
//! more; hairpin traffic is masqueraded through the `hairpin-connections`
//! set, which only holds endpoints on this node: none in the bench). Chain
//! names use kube-proxy's `hashAndTruncate`: the first 8 characters of
//! base32(sha256(name)), a dash, the name.
//!
//! - [`full_sync`]: the first sync after start (setupNFTables, which on the
//!   first sync also deletes and re-creates the base chains, then every
//!   chain, rule and element, Service by Service).
//! - [`endpoint_change`]: a partial sync after one EndpointSlice changed: the
//!   Service's chain re-added, flushed and written again. Map elements of
//!   unchanged Services are not touched.
//!
//! - [`nodeport_sync_chunks`] (north–south section): every Service also a
//!   NodePort (policy Cluster) on the node's addresses: the `nodeport-ips`
//!   elements, per Service an `external-<hash>-…` chain (mark for
//!   masquerade, commented "masquerade", then goto the Service chain) and
//!   its `service-nodeports` element `tcp . <nodePort> : goto external-…`,
//!   and a `hairpin-connections` element for each endpoint on this node.
//!   Checked against the real kube-proxy v1.36.3 for the north–south
//!   bench's Services (tests/generators_match_kube_proxy.rs,
//!   `generators_match_the_real_kube_proxy_for_node_ports`).
//!
//! Not emulated: externalIPs, LoadBalancer IPs and firewall
//! chains, session affinity sets, traffic policy Local, local endpoints'
//! hairpin elements in [`full_sync`] (the east–west workload has none).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use netboot_harness::kubeproxy_rules::hash16;

use crate::workload::{
    self, Workload, BACKEND_PORT, NAMESPACE, POD_CIDR, SERVICE_CIDR, SERVICE_PORT,
};

const T: &str = "ip kube-proxy";
const MASQ_MARK: &str = "0x00004000";

/// kube-proxy's `hashAndTruncate` (names here are far below the 240-byte limit).
fn hash_and_truncate(name: &str) -> String {
    let h = hash16(name);
    format!("{}-{name}", &h[..8])
}

/// `service-<hash>-bench/svc-NNNNNN/tcp/http`.
pub fn service_chain(i: u32) -> String {
    format!(
        "service-{}",
        hash_and_truncate(&format!(
            "{NAMESPACE}/{}/tcp/http",
            workload::service_name(i)
        ))
    )
}

/// setupNFTables on kube-proxy's first sync: table, base chains (deleted
/// and re-created), jump chains, sets and maps.
fn setup(out: &mut String) {
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let base = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", "-110"),
        ("filter-output-pre-dnat", "filter", "output", "-110"),
        ("filter-input", "filter", "input", "0"),
        ("filter-forward", "filter", "forward", "0"),
        ("filter-output", "filter", "output", "0"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ];
    for (name, ..) in base {
        let _ = writeln!(out, "add chain {T} {name}");
        let _ = writeln!(out, "delete chain {T} {name}");
    }
    for (name, ty, hook, prio) in base {
        let _ = writeln!(
            out,
            "add chain {T} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {T} {name}");
    }
    let jumps = [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        (
            "firewall-check",
            "filter-prerouting-pre-dnat",
            "ct state new ",
        ),
        ("firewall-check", "filter-output-pre-dnat", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        ("cluster-ips-check", "filter-output", "ct state new "),
    ];
    let mut created: Vec<&str> = Vec::new();
    for (dst, src, extra) in jumps {
        if !created.contains(&dst) {
            let _ = writeln!(out, "add chain {T} {dst}");
            let _ = writeln!(out, "flush chain {T} {dst}");
            created.push(dst);
        }
        let _ = writeln!(out, "add rule {T} {src} {extra}jump {dst}");
    }
    let _ = writeln!(
        out,
        "add set {T} hairpin-connections {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service ; comment \"service hairpin connections\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark and {MASQ_MARK} != 0 mark set mark xor {MASQ_MARK} masquerade fully-random"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"
    );
    let _ = writeln!(
        out,
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "flush set {T} nodeport-ips");
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {T} reject-chain");
    let _ = writeln!(out, "add rule {T} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr @cluster-ips ip saddr != {POD_CIDR} mark set mark or {MASQ_MARK} comment \"masquerade clusterIP traffic from outside cluster\""
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );
}

/// The chain of Service `i` (ensureChain = add + flush).
fn service_chain_head(out: &mut String, i: u32) {
    let svc = service_chain(i);
    let _ = writeln!(out, "add chain {T} {svc}");
    let _ = writeln!(out, "flush chain {T} {svc}");
}

/// The one rule of Service `i`'s chain: DNAT to `numgen random mod n`, the
/// endpoints in kube-proxy's order (sorted as text, like its endpoint map).
fn service_rule(out: &mut String, i: u32, ips: &[Ipv4Addr]) {
    let mut sorted: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
    sorted.sort();
    let arms: Vec<String> = sorted
        .iter()
        .enumerate()
        .map(|(k, ip)| format!("{k} : {ip} . {BACKEND_PORT}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {} meta l4proto tcp dnat ip addr . port to numgen random mod {} map {{ {} }}",
        service_chain(i),
        ips.len(),
        arms.join(" , ")
    );
}

/// Service `i` as kube-proxy's sync writes it: chain, the ClusterIP's set
/// and map elements, the rule.
fn service_rules(out: &mut String, i: u32, ips: &[Ipv4Addr]) {
    service_chain_head(out, i);
    let vip = workload::vip(i);
    let _ = writeln!(out, "add element {T} cluster-ips {{ {vip} }}");
    let _ = writeln!(
        out,
        "add element {T} service-ips {{ {vip} . tcp . {SERVICE_PORT} : goto {} }}",
        service_chain(i)
    );
    service_rule(out, i, ips);
}

/// The first (full) sync of `w` (with or without the endpoint change).
pub fn full_sync(w: &Workload, changed: bool) -> String {
    let mut out = String::with_capacity(w.n as usize * (600 + 400 * w.b as usize));
    setup(&mut out);
    for i in 0..w.n {
        service_rules(&mut out, i, &w.endpoint_ips(i, changed));
    }
    out
}

/// The same ruleset as [`full_sync`] split into transactions of `per`
/// Services (setup in the first). Not how kube-proxy writes it: the bench
/// loads the table this way (untimed) when one big transaction is slower
/// than its time limit, because a transaction's cost grows with the square
/// of its size here (see the README).
pub fn full_sync_chunks(w: &Workload, per: u32) -> Vec<String> {
    let per = per.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < w.n {
        let end = (start + per).min(w.n);
        let mut s = String::new();
        if start == 0 {
            setup(&mut s);
        }
        for i in start..end {
            service_rules(&mut s, i, &w.endpoint_ips(i, false));
        }
        out.push(s);
        start = end;
    }
    out
}

/// `external-<hash>-bench/svc-NNNNNN/tcp/http`: Service `i`'s external
/// (NodePort) chain.
pub fn external_chain(i: u32) -> String {
    format!(
        "external-{}",
        hash_and_truncate(&format!(
            "{NAMESPACE}/{}/tcp/http",
            workload::service_name(i)
        ))
    )
}

/// Every Service of a north–south ruleset a NodePort: where it listens and
/// what its endpoints are.
pub struct NodePorts<'a> {
    /// The node's addresses (kube-proxy's `nodePortAddresses`: the node IPs).
    pub node_ips: &'a [Ipv4Addr],
    /// Service `i`'s nodePort.
    pub port: &'a dyn Fn(u32) -> u16,
    /// Service `i`'s endpoints.
    pub endpoints: &'a dyn Fn(u32) -> Vec<Ipv4Addr>,
    /// Whether an endpoint is on this node (kube-proxy adds its
    /// `hairpin-connections` element: endpoint . endpoint . tcp . port).
    pub is_local: &'a dyn Fn(Ipv4Addr) -> bool,
}

/// The first sync of `w` with every Service a NodePort (policy Cluster), in
/// transactions of `per` Services (setup and the node addresses in the
/// first; see [`full_sync_chunks`] for why the bench splits it).
pub fn nodeport_sync_chunks(w: &Workload, np: &NodePorts, per: u32) -> Vec<String> {
    let per = per.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < w.n {
        let end = (start + per).min(w.n);
        let mut s = String::new();
        if start == 0 {
            setup(&mut s);
            for ip in np.node_ips {
                let _ = writeln!(s, "add element {T} nodeport-ips {{ {ip} }}");
            }
        }
        for i in start..end {
            let eps = (np.endpoints)(i);
            service_rules(&mut s, i, &eps);
            for ep in eps.iter().filter(|ep| (np.is_local)(**ep)) {
                let _ = writeln!(
                    s,
                    "add element {T} hairpin-connections {{ {ep} . {ep} . tcp . {BACKEND_PORT} }}"
                );
            }
            let ext = external_chain(i);
            let _ = writeln!(s, "add chain {T} {ext}");
            let _ = writeln!(s, "flush chain {T} {ext}");
            let _ = writeln!(
                s,
                "add element {T} service-nodeports {{ tcp . {} : goto {ext} }}",
                (np.port)(i)
            );
            let _ = writeln!(
                s,
                "add rule {T} {ext} mark set mark or {MASQ_MARK} comment \"masquerade\""
            );
            let _ = writeln!(s, "add rule {T} {ext} goto {}", service_chain(i));
        }
        out.push(s);
        start = end;
    }
    out
}

/// The partial sync after the changed Service's EndpointSlice went from
/// `changed = !to_changed` to `to_changed`: its chain re-added, flushed and
/// its one rule written again.
pub fn endpoint_change(w: &Workload, to_changed: bool) -> String {
    let i = w.changed();
    let mut out = String::new();
    service_chain_head(&mut out, i);
    service_rule(&mut out, i, &w.endpoint_ips(i, to_changed));
    out
}

/// Removes the table (not timed).
pub fn delete_table() -> String {
    format!("add table {T}\ndelete table {T}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_follow_hash_and_truncate() {
        let c = service_chain(0);
        assert!(c.starts_with("service-"), "{c}");
        assert!(c.ends_with("-bench/svc-000000/tcp/http"), "{c}");
        assert_eq!(
            c.len(),
            "service-".len() + 8 + "-bench/svc-000000/tcp/http".len()
        );
        assert_ne!(&service_chain(0)[8..16], &service_chain(1)[8..16]);
    }

    #[test]
    fn full_sync_has_the_verdict_map_and_numgen_per_service() {
        let w = Workload::new(3, 2).expect("size");
        let t = full_sync(&w, false);
        assert!(t.contains("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict"));
        assert!(t.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        assert_eq!(t.matches("numgen random mod 2 map").count(), 3);
        assert!(!t.contains("add chain ip kube-proxy endpoint-"));
        assert!(t.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.3 . tcp . 80 : goto {} }}",
            service_chain(2)
        )));
        assert!(t.contains("0 : 10.244.1.1 . 8080 , 1 : 10.244.1.2 . 8080"));
    }

    #[test]
    fn chunks_hold_the_same_commands_as_the_full_sync() {
        let w = Workload::new(7, 2).expect("size");
        let chunks = full_sync_chunks(&w, 3);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].starts_with("add table"));
        assert!(chunks[1].starts_with("add chain ip kube-proxy service-"));
        assert_eq!(chunks.concat(), full_sync(&w, false));
    }

    #[test]
    fn node_ports_go_through_an_external_chain_to_the_service_chain() {
        let w = Workload::new(5, 1).expect("size");
        let node = [Ipv4Addr::new(192, 168, 50, 1)];
        let np = NodePorts {
            node_ips: &node,
            port: &|i| 20000 + i as u16,
            endpoints: &|i| vec![Ipv4Addr::new(10, 200, 0, 1 + i as u8)],
            is_local: &|ip| ip == Ipv4Addr::new(10, 200, 0, 4),
        };
        let chunks = nodeport_sync_chunks(&w, &np, 2);
        assert_eq!(chunks.len(), 3);
        let t = chunks.concat();
        assert!(chunks[0].contains("add element ip kube-proxy nodeport-ips { 192.168.50.1 }"));
        assert!(!chunks[1].contains("nodeport-ips {"));
        let ext = external_chain(4);
        assert!(ext.starts_with("external-") && ext.ends_with("-bench/svc-000004/tcp/http"));
        assert!(t.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 20004 : goto {ext} }}"
        )));
        assert!(t.contains(&format!(
            "add rule ip kube-proxy {ext} goto {}",
            service_chain(4)
        )));
        assert_eq!(
            t.matches("mark set mark or 0x00004000 comment \"masquerade\"\n")
                .count(),
            5
        );
        // Only the local endpoint (Service 3's) is a hairpin connection.
        assert_eq!(
            t.matches("add element ip kube-proxy hairpin-connections {")
                .count(),
            1
        );
        assert!(t.contains(
            "add element ip kube-proxy hairpin-connections { 10.200.0.4 . 10.200.0.4 . tcp . 8080 }"
        ));
        assert!(t.contains("0 : 10.200.0.5 . 8080 }"));
    }

    #[test]
    fn endpoint_change_touches_one_service_only() {
        let w = Workload::new(5, 2).expect("size");
        let t = endpoint_change(&w, true);
        let svc = service_chain(2);
        assert!(t.contains(&format!("flush chain ip kube-proxy {svc}")));
        assert!(t.contains("1 : 10.200.0.1 . 8080"));
        assert!(!t.contains("add element"));
        assert_eq!(t.lines().count(), 3);
        let back = endpoint_change(&w, false);
        assert!(back.contains("1 : 10.128.0.6 . 8080"));
    }
}
