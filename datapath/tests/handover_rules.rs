//! Privileged: kube-proxy's leftovers are removed from a rules netns and
//! nothing else is touched — for the legacy and nft iptables backends (each in
//! its own test namespace: backends must not be mixed) and kube-proxy's
//! nftables table. Needs root, iptables (legacy + nft) and nft; never touches
//! the root namespace.
//!
//! Run: `sudo cargo test -p netboot-datapath --test handover_rules`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use netboot_datapath::handover::{self, RulesNetns};
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

/// What kube-proxy (iptables mode) leaves, plus foreign rules that must survive.
const RULES: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:FOREIGN-NAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE
-A FOREIGN-NAT -p tcp --dport 2222 -j RETURN
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SVC-TCOU7JCQXEZGVUNU -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p udp -m udp -j DNAT --to-destination 10.244.1.2:53
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 2222 -j ACCEPT
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -p tcp --dport 2223 -j ACCEPT
COMMIT
";

fn in_ns(ns: &Netns, prog: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, prog]).args(args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut ch = c.spawn().unwrap_or_else(|e| panic!("{prog}: {e}"));
    if let (Some(s), Some(mut w)) = (stdin, ch.stdin.take()) {
        w.write_all(s.as_bytes()).expect("stdin");
    }
    let out = ch.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rules_only(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with(':') || l.starts_with('*'))
        .map(|l| {
            // Drop counters "[0:0]" from chain declarations.
            l.split(" [").next().unwrap_or(l).to_string()
        })
        .collect()
}

fn check_backend(tag: &str, save: &str, restore: &str, with_nft_table: bool) {
    require_privileges();
    let ns = Netns::new(&format!("nbt-dp-ho-{tag}"));
    in_ns(&ns, restore, &[], Some(RULES));
    if with_nft_table {
        in_ns(&ns, "nft", &["add", "table", "ip", "kube-proxy"], None);
        in_ns(
            &ns,
            "nft",
            &["add", "chain", "ip", "kube-proxy", "services"],
            None,
        );
        in_ns(&ns, "nft", &["add", "table", "ip6", "kube-proxy"], None);
        in_ns(&ns, "nft", &["add", "table", "inet", "foreign"], None);
        in_ns(
            &ns,
            "nft",
            &[
                "add",
                "chain",
                "inet",
                "foreign",
                "input",
                "{ type filter hook input priority 10; }",
            ],
            None,
        );
    }
    let before = rules_only(&in_ns(&ns, save, &[], None));
    let rules = RulesNetns::new(Some(&ns.path()));

    let found = handover::detect(&rules).expect("detect");
    assert!(found.present());
    let removed = handover::cleanup(&rules).expect("cleanup");
    assert_eq!(removed.tables.len(), 3, "{removed:?}");

    let after = rules_only(&in_ns(&ns, save, &[], None));
    assert!(
        after.iter().all(|l| !l.contains("KUBE-")),
        "KUBE-* left: {after:#?}"
    );
    // Exactly kube-proxy's lines are gone; every other line is still there.
    let expected: Vec<String> = before
        .iter()
        .filter(|l| !l.contains("KUBE-"))
        .cloned()
        .collect();
    assert_eq!(after, expected);
    for keep in [
        "-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE",
        "-A FOREIGN-NAT -p tcp -m tcp --dport 2222 -j RETURN",
        "-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT",
    ] {
        assert!(
            after.iter().any(|l| l == keep),
            "foreign rule lost: {keep}\n{after:#?}"
        );
    }
    let tables = in_ns(&ns, "nft", &["list", "tables"], None);
    assert!(!tables.contains("kube-proxy"), "{tables}");
    if with_nft_table {
        assert!(
            tables.contains("table inet foreign"),
            "foreign nft table lost: {tables}"
        );
    }
    assert!(!handover::detect(&rules).expect("detect").present());

    // The CLI sees nothing left either.
    let out = Command::new(env!("CARGO_BIN_EXE_netboot-datapath"))
        .args([
            "cleanup-kube-proxy",
            "--dry-run",
            "-o",
            "json",
            "--rules-netns",
        ])
        .arg(ns.path())
        .output()
        .expect("cli");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tables"].as_array().map(Vec::len), Some(0));
}

#[test]
fn cleanup_removes_exactly_kube_proxy_rules_legacy() {
    check_backend(
        "legacy",
        "iptables-legacy-save",
        "iptables-legacy-restore",
        false,
    );
}

#[test]
fn cleanup_removes_exactly_kube_proxy_rules_nft_and_nft_table() {
    check_backend("nft", "iptables-nft-save", "iptables-nft-restore", true);
}
