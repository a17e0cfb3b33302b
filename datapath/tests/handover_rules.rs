//! Privileged: kube-proxy's leftovers are removed from a rules netns and
//! nothing else is touched — for the legacy and nft iptables backends (each in
//! its own test namespace: backends must not be mixed) and kube-proxy's
//! nftables table. Needs root, iptables (legacy + nft) and nft; never touches
//! the root namespace.
//!
//! Also the agent's side: with kube-proxy installed (`--kube-proxy-present`)
//! it leaves the rules in its rules netns and reports them `present`; without
//! it removes them.
//!
//! Run: `sudo cargo test -p netboot-datapath --test handover_rules`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netboot_datapath::handover::{self, RulesNetns};
use support::*;

#[test]
fn helper() {
    support::helper_main();
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

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

/// A real agent (static Services, replace mode, cleanup on, 1 s node
/// interval) whose rules netns is `ns`.
fn start_agent(
    dir: &std::path::Path,
    ns: &Netns,
    cg: &TestCgroup,
    pins: &TestPins,
    listen: &str,
    kube_proxy_present: bool,
) -> ChildGuard {
    std::fs::write(
        dir.join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\ncleanupKubeProxyRules: true\n",
    )
    .expect("config");
    std::fs::write(dir.join("static.yaml"), "# no Services\n").expect("static");
    let mut c = Command::new(BIN);
    c.args(["agent", "--node-name", "test-node", "--listen", listen])
        .args(["--node-interval", "1"])
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--static-services")
        .arg(dir.join("static.yaml"))
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--bpffs")
        .arg(pins.pins.root())
        .arg("--rules-netns")
        .arg(ns.path())
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .env_remove("NETBOOT_KUBE_PROXY_PRESENT")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("agent.log")).expect("log"),
        ));
    if kube_proxy_present {
        c.arg("--kube-proxy-present");
    }
    ChildGuard(Some(c.spawn().expect("spawn agent")))
}

fn status(listen: &str) -> serde_json::Value {
    let (code, body) = http_get(listen, "/v1/status").expect("/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status json")
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// A netns holding kube-proxy's rules (nft backend) and its nft table, plus
/// foreign rules; returns it with its `iptables-nft-save` lines.
fn kube_proxy_netns(tag: &str) -> (Netns, Vec<String>) {
    let ns = Netns::new(&format!("nbt-dp-hoa-{tag}"));
    in_ns(&ns, "iptables-nft-restore", &[], Some(RULES));
    in_ns(&ns, "nft", &["add", "table", "ip", "kube-proxy"], None);
    let before = rules_only(&in_ns(&ns, "iptables-nft-save", &[], None));
    (ns, before)
}

#[test]
fn agent_leaves_rules_while_kube_proxy_is_present() {
    require_privileges();
    let (ns, before) = kube_proxy_netns("present");
    let cg = TestCgroup::new("hoa-present");
    let pins = TestPins::new("hoa-present");
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &ns, &cg, &pins, &listen, true);
    wait_ready(&listen, Duration::from_secs(30));
    let t = Instant::now();
    while status(&listen)["kubeProxyRules"] != "present" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rules never reported present: {}\n{}",
            status(&listen),
            log(dir.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Several node intervals (1 s) pass: nothing is removed.
    std::thread::sleep(Duration::from_millis(3500));
    let after = rules_only(&in_ns(&ns, "iptables-nft-save", &[], None));
    assert_eq!(after, before, "rules changed while kube-proxy is present");
    let tables = in_ns(&ns, "nft", &["list", "tables"], None);
    assert!(tables.contains("table ip kube-proxy"), "{tables}");
    let st = status(&listen);
    assert_eq!(st["kubeProxy"], "installed", "{st}");
    assert_eq!(st["kubeProxyCleanup"], "held-back", "{st}");
    assert_eq!(st["kubeProxyRules"], "present", "{st}");
    assert_eq!(st["kubeProxyRulesRemoved"], 0, "{st}");
    let (_, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert!(
        metrics.contains("\nnetboot_kube_proxy_installed 1\n")
            && metrics.contains("\nnetboot_datapath_kube_proxy_rules_present 1\n")
            && metrics.contains("\nnetboot_datapath_kube_proxy_cleanup_held_back 1\n"),
        "{metrics}"
    );
    let out = Command::new(BIN)
        .args(["status", "--verbose", "--agent", &listen])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("KubeProxy:              installed, rules cleanup held back")
            && text.contains("KubeProxy rules:        present"),
        "{text}"
    );
}

#[test]
fn agent_removes_rules_when_kube_proxy_is_absent() {
    require_privileges();
    let (ns, before) = kube_proxy_netns("absent");
    let cg = TestCgroup::new("hoa-absent");
    let pins = TestPins::new("hoa-absent");
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &ns, &cg, &pins, &listen, false);
    wait_ready(&listen, Duration::from_secs(30));
    let rules = RulesNetns::new(Some(&ns.path()));
    let t = Instant::now();
    while handover::detect(&rules).expect("detect").present() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "kube-proxy rules not removed: {}\n{}",
            status(&listen),
            log(dir.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = rules_only(&in_ns(&ns, "iptables-nft-save", &[], None));
    let expected: Vec<String> = before
        .iter()
        .filter(|l| !l.contains("KUBE-"))
        .cloned()
        .collect();
    assert_eq!(after, expected, "only kube-proxy's lines may go");
    let t = Instant::now();
    while status(&listen)["kubeProxyRules"] != "absent" {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", status(&listen));
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status(&listen);
    assert_eq!(st["kubeProxy"], "absent", "{st}");
    assert_eq!(st["kubeProxyCleanup"], "active", "{st}");
    assert!(st["kubeProxyRulesRemoved"].as_u64() > Some(0), "{st}");
    let (_, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert!(
        metrics.contains("\nnetboot_kube_proxy_installed 0\n")
            && metrics.contains("\nnetboot_datapath_kube_proxy_cleanup_held_back 0\n"),
        "{metrics}"
    );
}
