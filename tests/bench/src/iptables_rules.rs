//! kube-proxy's iptables mode for the bench workload: the ruleset comes from
//! netboot-harness's `kubeproxy_rules::render` (exactly what kube-proxy
//! writes); this module only adds what the bench needs around it.
//!
//! - [`full`]: the whole ruleset (a full sync, and what kube-proxy before
//!   1.28 restored on every change).
//! - [`partial`]: kube-proxy ≥ 1.28's partial sync (MinimizeIPTablesRestore)
//!   after one endpoint change: `--noflush`, the filter table's KUBE-* chains
//!   (whole), and in
//!   nat only KUBE-SERVICES (always rewritten, all N jumps) plus the changed
//!   Service's KUBE-SVC chain and its KUBE-SEP chains, with the stale
//!   KUBE-SEP chain flushed (chain line) and deleted (`-X` after the rules).
//!   kube-proxy in large clusters (> 1000 endpoints) defers that deletion to
//!   a periodic cleanup, which also runs iptables-save; the bench keeps it
//!   in every change, a small cost next to rewriting KUBE-SERVICES.
//! - [`empty`]: restores the tables with no rules (clears between cold syncs).

use std::collections::BTreeSet;

use netboot_harness::kubeproxy_rules::{self, RuleOptions};

use crate::workload::{Workload, POD_CIDR};

/// kube-proxy's options for the bench: pod CIDR, kube-proxy's defaults
/// otherwise (masquerade bit 14, localhost NodePorts, the nfacct counter).
pub fn options() -> RuleOptions {
    RuleOptions {
        cluster_cidr: Some(POD_CIDR.to_string()),
        masquerade_bit: 14,
        localhost_nodeports: true,
        // The bench creates the counter in its namespace (size.rs).
        nfacct: true,
    }
}

/// The whole ruleset for `w`, with or without the endpoint change.
pub fn full(w: &Workload, changed: bool) -> String {
    kubeproxy_rules::render(&w.services(), &w.slices(changed), &options())
}

/// Empty mangle, filter and nat tables (flushes every chain, deletes user chains).
pub fn empty() -> String {
    let mut out = String::new();
    out.push_str("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n");
    out.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    );
    out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n");
    out
}

/// Chains kube-proxy writes on every sync, partial or not.
const ALWAYS: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-PROXY-CANARY",
];

/// The chain a rule line (`-A CHAIN …`) appends to.
fn rule_chain(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split_whitespace().next()
}

/// The partial-sync input after the changed Service went from `!to_changed`
/// to `to_changed`, cut out of the full ruleset `after` (= `full(w, to_changed)`).
pub fn partial(w: &Workload, after: &str, to_changed: bool) -> String {
    let i = w.changed();
    let spn = format!(
        "{}/{}:http",
        crate::workload::NAMESPACE,
        crate::workload::service_name(i)
    );
    let svc = kubeproxy_rules::service_chain(&spn, "tcp");
    let seps = |changed: bool| -> BTreeSet<String> {
        w.endpoint_ips(i, changed)
            .iter()
            .map(|ip| {
                kubeproxy_rules::endpoint_chain(
                    &spn,
                    "tcp",
                    &format!("{ip}:{}", crate::workload::BACKEND_PORT),
                )
            })
            .collect()
    };
    let now = seps(to_changed);
    let stale: Vec<String> = seps(!to_changed).difference(&now).cloned().collect();
    let mut keep: BTreeSet<String> = ALWAYS.iter().map(|s| s.to_string()).collect();
    keep.insert(svc);
    keep.extend(now);

    let mut out = String::new();
    let mut table = "";
    for line in after.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "filter" || t == "nat" { t } else { "" };
            if !table.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
            if table == "nat" {
                // A chain line flushes the stale chain; only an empty chain can be deleted.
                for s in &stale {
                    out.push_str(&format!(":{s} - [0:0]\n"));
                }
            }
            continue;
        }
        match table {
            // kube-proxy's KUBE-* filter chains, whole; not the built-in
            // chains' jumps (kube-proxy ensures those with `iptables -C/-I`
            // outside the restore: under --noflush they would be appended
            // again on every sync).
            "filter" => {
                let builtin = line
                    .strip_prefix(':')
                    .or_else(|| line.strip_prefix("-A "))
                    .and_then(|r| r.split_whitespace().next())
                    .is_some_and(|c| ["INPUT", "FORWARD", "OUTPUT"].contains(&c));
                if !builtin {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            "nat" => {
                if line == "COMMIT" {
                    for s in &stale {
                        out.push_str(&format!("-X {s}\n"));
                    }
                    out.push_str("COMMIT\n");
                } else if let Some(decl) = line.strip_prefix(':') {
                    let name = decl.split_whitespace().next().unwrap_or("");
                    if keep.contains(name) {
                        out.push_str(line);
                        out.push('\n');
                    }
                } else if rule_chain(line).is_some_and(|c| keep.contains(c)) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ruleset_jumps_to_every_service_and_the_last_one_last() {
        let w = Workload::new(4, 2).expect("size");
        let r = full(&w, false);
        let jumps: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d 10.96."))
            .collect();
        assert_eq!(jumps.len(), 4);
        assert!(
            jumps[3].starts_with("-A KUBE-SERVICES -d 10.96.0.4/32"),
            "{}",
            jumps[3]
        );
        assert!(r.contains("--probability 0.5000000000"));
        assert!(r.contains("-j DNAT --to-destination 10.244.1.2:8080"));
        assert!(r.contains("! -s 10.128.0.0/9"));
    }

    #[test]
    fn partial_sync_rewrites_kube_services_and_the_changed_chains_only() {
        let w = Workload::new(5, 2).expect("size");
        let after = full(&w, true);
        let p = partial(&w, &after, true);
        assert!(p.starts_with("*filter\n"));
        assert!(!p.contains("-A INPUT") && !p.contains(":INPUT"), "{p}");
        assert!(p.contains("-A KUBE-FORWARD "));
        assert_eq!(p.matches("-A KUBE-SERVICES -d 10.96.").count(), 5);
        assert_eq!(p.matches("-j DNAT").count(), 2, "{p}");
        assert!(p.contains("--to-destination 10.200.0.1:8080"));
        assert_eq!(p.matches("\n-X KUBE-SEP-").count(), 1, "{p}");
        let stale = p
            .lines()
            .find_map(|l| l.strip_prefix("-X "))
            .expect("stale chain");
        assert!(p.contains(&format!("*nat\n:{stale} - [0:0]\n")), "{p}");
        assert_eq!(p.matches("COMMIT").count(), 2);
        let back = partial(&w, &full(&w, false), false);
        assert!(back.contains("--to-destination 10.128.0.6:8080"));
    }
}
