//! kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go) for the bench
//! workload, as the `nft -f` transactions kube-proxy sends (knftables writes
//! one `add`/`flush` command per line).
//!
//! Structure: table `ip kube-proxy`; base chains `filter-*` / `nat-*`;
//! `services` looks up `ip daddr . meta l4proto . th dport vmap @service-ips`
//! → `service-<hash>-ns/name/tcp/port` (masquerade mark for traffic from
//! outside the pod CIDR, then `numgen random mod n vmap { i : goto
//! endpoint-… }`) → `endpoint-<hash>-…__ip/port` (hairpin mark, `dnat to`).
//! Chain names use kube-proxy's `hashAndTruncate`: the first 8 characters of
//! base32(sha256(name)), a dash, the name.
//!
//! - [`full_sync`]: the first sync after start (setupNFTables + every chain,
//!   rule and element).
//! - [`endpoint_change`]: a partial sync after one EndpointSlice changed: the
//!   Service's chain and its endpoint chains are re-added and flushed and
//!   written again, the endpoint chain no longer used is flushed (kube-proxy
//!   deletes it in a later transaction: [`stale_chain_delete`]). Map elements
//!   of unchanged Services are not touched.
//!
//! Not emulated: NodePorts, externalIPs, LoadBalancer IPs and firewall
//! chains, session affinity sets, traffic policy Local (the bench has none).

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

/// `endpoint-<hash>-bench/svc-NNNNNN/tcp/http__IP/PORT`.
pub fn endpoint_chain(i: u32, ip: Ipv4Addr) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!(
            "{NAMESPACE}/{}/tcp/http__{ip}/{BACKEND_PORT}",
            workload::service_name(i)
        ))
    )
}

/// setupNFTables: table, base chains, jump chains, maps and sets, flushed.
fn setup(out: &mut String) {
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let base = [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ];
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
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
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
    let _ = writeln!(out, "add chain {T} mark-for-masquerade");
    let _ = writeln!(out, "flush chain {T} mark-for-masquerade");
    let _ = writeln!(
        out,
        "add rule {T} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark and {MASQ_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark set mark xor {MASQ_MARK}"
    );
    let _ = writeln!(out, "add rule {T} masquerading masquerade fully-random");
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
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );
    for (kind, name) in [
        ("set", "cluster-ips"),
        ("map", "service-ips"),
        ("map", "firewall-ips"),
        ("map", "no-endpoint-services"),
        ("map", "no-endpoint-nodeports"),
        ("map", "service-nodeports"),
    ] {
        let _ = writeln!(out, "flush {kind} {T} {name}");
    }
}

/// The chains and rules of Service `i` with endpoints `ips` (ensureChain =
/// add + flush, then the rules), as kube-proxy writes them for a changed or
/// new Service.
fn service_rules(out: &mut String, i: u32, ips: &[Ipv4Addr]) {
    let svc = service_chain(i);
    let eps: Vec<String> = ips.iter().map(|ip| endpoint_chain(i, *ip)).collect();
    for ep in &eps {
        let _ = writeln!(out, "add chain {T} {ep}");
        let _ = writeln!(out, "flush chain {T} {ep}");
    }
    let _ = writeln!(out, "add chain {T} {svc}");
    let _ = writeln!(out, "flush chain {T} {svc}");
    let vip = workload::vip(i);
    let _ = writeln!(
        out,
        "add rule {T} {svc} ip daddr {vip} tcp dport {SERVICE_PORT} ip saddr != {POD_CIDR} jump mark-for-masquerade"
    );
    let arms: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(k, ep)| format!("{k} : goto {ep}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        arms.join(" , ")
    );
    for (ep, ip) in eps.iter().zip(ips) {
        let _ = writeln!(
            out,
            "add rule {T} {ep} ip saddr {ip} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {T} {ep} meta l4proto tcp dnat to {ip}:{BACKEND_PORT}"
        );
    }
}

fn service_elements(out: &mut String, i: u32) {
    let vip = workload::vip(i);
    let _ = writeln!(out, "add element {T} cluster-ips {{ {vip} }}");
    let _ = writeln!(
        out,
        "add element {T} service-ips {{ {vip} . tcp . {SERVICE_PORT} : goto {} }}",
        service_chain(i)
    );
}

/// The first (full) sync of `w` (with or without the endpoint change).
pub fn full_sync(w: &Workload, changed: bool) -> String {
    let mut out = String::with_capacity(w.n as usize * (600 + 400 * w.b as usize));
    setup(&mut out);
    for i in 0..w.n {
        service_rules(&mut out, i, &w.endpoint_ips(i, changed));
        service_elements(&mut out, i);
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
            service_elements(&mut s, i);
        }
        out.push(s);
        start = end;
    }
    out
}

/// The partial sync after the changed Service's EndpointSlice went from
/// `changed = !to_changed` to `to_changed`.
pub fn endpoint_change(w: &Workload, to_changed: bool) -> String {
    let i = w.changed();
    let before = w.endpoint_ips(i, !to_changed);
    let after = w.endpoint_ips(i, to_changed);
    let mut out = String::new();
    service_rules(&mut out, i, &after);
    for ip in before.iter().filter(|ip| !after.contains(ip)) {
        // Stale: flushed now, deleted by a later transaction.
        let _ = writeln!(out, "flush chain {T} {}", endpoint_chain(i, *ip));
    }
    out
}

/// kube-proxy's later transaction deleting the endpoint chain that the last
/// change left unused (not timed by the bench).
pub fn stale_chain_delete(w: &Workload, to_changed: bool) -> String {
    let i = w.changed();
    let before = w.endpoint_ips(i, !to_changed);
    let after = w.endpoint_ips(i, to_changed);
    let mut out = String::new();
    for ip in before.iter().filter(|ip| !after.contains(ip)) {
        let _ = writeln!(out, "delete chain {T} {}", endpoint_chain(i, *ip));
    }
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
        let e = endpoint_chain(0, Ipv4Addr::new(10, 128, 0, 1));
        assert!(
            e.ends_with("-bench/svc-000000/tcp/http__10.128.0.1/8080"),
            "{e}"
        );
        assert_ne!(&c[8..16], &e[9..17], "different names hash differently");
    }

    #[test]
    fn full_sync_has_the_verdict_map_and_numgen_per_service() {
        let w = Workload::new(3, 2).expect("size");
        let t = full_sync(&w, false);
        assert!(t.contains("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict"));
        assert!(t.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        assert_eq!(t.matches("numgen random mod 2 vmap").count(), 3);
        assert_eq!(t.matches("dnat to").count(), 6);
        assert!(t.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.3 . tcp . 80 : goto {} }}",
            service_chain(2)
        )));
        assert!(t.contains("dnat to 10.244.1.2:8080"));
    }

    #[test]
    fn chunks_hold_the_same_commands_as_the_full_sync() {
        let w = Workload::new(7, 2).expect("size");
        let chunks = full_sync_chunks(&w, 3);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].starts_with("add table"));
        assert!(chunks[1].starts_with("add chain ip kube-proxy endpoint-"));
        assert_eq!(chunks.concat(), full_sync(&w, false));
    }

    #[test]
    fn endpoint_change_touches_one_service_only() {
        let w = Workload::new(5, 2).expect("size");
        let t = endpoint_change(&w, true);
        let svc = service_chain(2);
        assert!(t.contains(&format!("flush chain ip kube-proxy {svc}")));
        assert!(t.contains("dnat to 10.200.0.1:8080"));
        assert!(!t.contains("add element"));
        assert!(t.contains(&format!(
            "flush chain ip kube-proxy {}",
            endpoint_chain(2, Ipv4Addr::new(10, 128, 0, 6))
        )));
        let back = endpoint_change(&w, false);
        assert!(back.contains("dnat to 10.128.0.6:8080"));
        assert!(stale_chain_delete(&w, true).starts_with("delete chain"));
    }
}
