//! Privileged: the node rules cleanup on a real kernel, each case in its own
//! `nbcl-*` network namespace (removed on drop, pass or fail; no routes, no
//! links to the root namespace).
//!
//! A namespace gets what a node holds (tests/fixtures/*.rules, IPv4 and
//! IPv6): kubelet's chains (KUBE-FIREWALL, canaries, hint), kube-router's /
//! k3s's network policy chains (KUBE-ROUTER-*, KUBE-NWPLCY-*, KUBE-POD-FW-*),
//! flannel's, and kube-proxy v1.36's iptables rules with its jump comments,
//! plus kube-proxy's nft tables and a foreign nft table. After the cleanup
//! its `iptables-save` must equal, line for line, that of a namespace that
//! only ever had the other components; a second cleanup changes nothing.
//! Both iptables backends (one per namespace: backends must not be mixed).
//!
//! Also: route_localnet, capabilities first (missing programs, no
//! CAP_NET_ADMIN, an "incompatible" table), and the real agent (with
//! kube-proxy present it leaves the rules and reports them; without, it
//! removes exactly kube-proxy's; unable to clean, it blocks and touches
//! nothing).
//!
//! IPVS mode (`nbt-ipvs-*` namespaces): kube-proxy's ipsets (IPv4 and the
//! IPv6 `KUBE-6-*` names) and its IPVS-mode iptables rules next to other
//! components' sets and rules; only kube-proxy's go, rules before sets. This
//! kernel may lack IPVS and dummy links: the virtual servers and
//! `kube-ipvs0` are then covered by the unit tests of src/handover/ipvs.rs
//! only, and the test says so on stderr.
//!
//! Needs root, iptables 1.8.9 (legacy + nft), nft, ipset, nsenter, setpriv. Run:
//! `sudo cargo test -p netboot-datapath --test handover_rules`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netboot_datapath::handover::{self, HandoverError, IpvsOwnership, RulesNetns, SaveError};
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

const KUBELET_V4: &str = include_str!("fixtures/kubelet-v4.rules");
const KUBELET_V6: &str = include_str!("fixtures/kubelet-v6.rules");
const KUBE_ROUTER_V4: &str = include_str!("fixtures/kube-router-v4.rules");
const KUBE_ROUTER_V6: &str = include_str!("fixtures/kube-router-v6.rules");
const KUBE_PROXY_V4: &str = include_str!("fixtures/kube-proxy-v4.rules");
const KUBE_PROXY_V6: &str = include_str!("fixtures/kube-proxy-v6.rules");
const KUBE_PROXY_V6_LEAVES: &str = include_str!("fixtures/kube-proxy-v6-leaves.rules");

const KUBE_PROXY_IPVS_V4: &str = include_str!("fixtures/kube-proxy-ipvs-v4.rules");
const KUBE_PROXY_IPVS_SETS: &str = include_str!("fixtures/kube-proxy-ipvs.ipset");
const OTHERS_IPVS_SETS: &str = include_str!("fixtures/others-ipvs.ipset");
const OTHERS_IPVS_V4: &str = include_str!("fixtures/others-ipvs-v4.rules");

/// An iptables backend: `legacy` or `nft`.
#[derive(Clone, Copy)]
struct Backend(&'static str);

impl Backend {
    fn restore(self, ns: &Netns, family: &str, rules: &str) {
        in_ns(
            ns,
            &format!("{family}-{}-restore", self.0),
            &["-w", "--noflush"],
            Some(rules),
        );
    }

    /// `iptables-save` and `ip6tables-save` of this backend, normalised:
    /// no comment lines, no chain counters.
    fn save(self, ns: &Netns) -> Vec<String> {
        ["iptables", "ip6tables"]
            .iter()
            .flat_map(|fam| {
                let text = in_ns(ns, &format!("{fam}-{}-save", self.0), &[], None);
                normalised(&text)
            })
            .collect()
    }
}

fn normalised(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            Some(_) => l.split(" [").next().unwrap_or(l).to_string(),
            None => l.to_string(),
        })
        .collect()
}

fn nft(ns: &Netns, args: &[&str]) -> String {
    in_ns(ns, "nft", args, None)
}

fn route_localnet(ns: &Netns) -> String {
    in_ns(
        ns,
        "cat",
        &["/proc/sys/net/ipv4/conf/all/route_localnet"],
        None,
    )
    .trim()
    .to_string()
}

fn set_route_localnet(ns: &Netns, v: &str) {
    in_ns(
        ns,
        "sh",
        &[
            "-c",
            &format!("echo {v} > /proc/sys/net/ipv4/conf/all/route_localnet"),
        ],
        None,
    );
}

/// The other components of a node: kubelet, kube-router (and k3s's flannel)
/// and a foreign nft table.
fn others(ns: &Netns, b: Backend) {
    b.restore(ns, "iptables", KUBELET_V4);
    b.restore(ns, "ip6tables", KUBELET_V6);
    b.restore(ns, "iptables", KUBE_ROUTER_V4);
    b.restore(ns, "ip6tables", KUBE_ROUTER_V6);
    nft(ns, &["add", "table", "inet", "foreign"]);
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "foreign",
            "input",
            "{ type filter hook input priority 10; }",
        ],
    );
    nft(
        ns,
        &[
            "add", "rule", "inet", "foreign", "input", "tcp", "dport", "2222", "accept",
        ],
    );
}

/// kube-proxy's tables in nftables mode (a node that ran both modes over time).
fn kube_proxy_nft_tables(ns: &Netns) {
    for fam in ["ip", "ip6"] {
        nft(ns, &["add", "table", fam, "kube-proxy"]);
        nft(ns, &["add", "chain", fam, "kube-proxy", "services"]);
    }
}

/// A node: the others, then kube-proxy (iptables mode, `kube_proxy_v4` for
/// IPv4) with its nft tables, and route_localnet=1 as kube-proxy sets it.
fn node(tag: &str, b: Backend, kube_proxy_v4: &str) -> Netns {
    let ns = Netns::new(&format!("nbcl-{tag}"));
    others(&ns, b);
    b.restore(&ns, "iptables", kube_proxy_v4);
    b.restore(&ns, "ip6tables", KUBE_PROXY_V6);
    kube_proxy_nft_tables(&ns);
    set_route_localnet(&ns, "1");
    ns
}

/// What the cleanup must leave: the same node that never ran kube-proxy,
/// except kube-proxy's IPv6 copy of kubelet's KUBE-FIREWALL chain and jumps.
fn reference(tag: &str, b: Backend) -> Vec<String> {
    let ns = Netns::new(&format!("nbcl-{tag}-ref"));
    others(&ns, b);
    b.restore(&ns, "ip6tables", KUBE_PROXY_V6_LEAVES);
    b.save(&ns)
}

fn cli_dry_run(ns: &Netns) -> serde_json::Value {
    let out = Command::new(BIN)
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Regression: the cleanup deleted every `KUBE-*` chain, wiping kubelet's
/// KUBE-FIREWALL (the route_localnet guard) and kube-router's policy chains.
fn cleanup_keeps_other_components_kube_chains(tag: &str, b: Backend) {
    require_privileges();
    let ns = node(tag, b, KUBE_PROXY_V4);
    let want = reference(tag, b);
    let before = b.save(&ns);
    assert_ne!(before, want);
    let rules = RulesNetns::new(Some(&ns.path()));

    let found = handover::detect(&rules, &IpvsOwnership::default()).expect("detect");
    assert!(
        found.present() && found.localhost_node_ports(),
        "{found:#?}"
    );
    assert_eq!(found.retained(), Vec::<String>::new());
    // Nothing changes on detect.
    assert_eq!(b.save(&ns), before);

    let removed = handover::cleanup(&rules, &IpvsOwnership::default()).expect("cleanup");
    assert_eq!(
        removed.tables.len(),
        6,
        "mangle, filter, nat × v4, v6: {removed:#?}"
    );
    assert!(removed.route_localnet_reset);
    let after = b.save(&ns);
    assert_eq!(after, want, "the node without kube-proxy, line for line");
    for keep in [
        "-A INPUT -j KUBE-FIREWALL",
        ":KUBE-KUBELET-CANARY -",
        ":KUBE-IPTABLES-HINT -",
        "-A KUBE-POD-FW-ZQHKHXKIVR3YQS5E -d 10.244.1.5/32 -m comment --comment \"run through nw policy allow-web\" -j KUBE-NWPLCY-C5AZDUAD3FIJEMXT",
        "-A INPUT -m comment --comment \"kube-router netpol - 4IA2OSFRMVNDXBVV\" -j KUBE-ROUTER-INPUT",
    ] {
        assert!(after.iter().any(|l| l == keep), "lost: {keep}\n{after:#?}");
    }
    assert!(after
        .iter()
        .any(|l| l.contains("block incoming localnet connections")));
    let tables = nft(&ns, &["list", "tables"]);
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table inet foreign"), "{tables}");
    assert_eq!(route_localnet(&ns), "0");

    // The agent runs this every 30 s: the second pass finds and changes nothing.
    let again = handover::cleanup(&rules, &IpvsOwnership::default()).expect("second cleanup");
    assert_eq!(again, handover::Report::default(), "{again:#?}");
    assert_eq!(b.save(&ns), want);
    assert!(nft(&ns, &["list", "tables"]).contains("table inet foreign"));
    assert!(!handover::detect(&rules, &IpvsOwnership::default())
        .expect("detect")
        .present());
    let v = cli_dry_run(&ns);
    assert_eq!(v["tables"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["nft_tables"].as_array().map(Vec::len), Some(0), "{v}");
}

#[test]
fn regression_cleanup_wiped_kubelet_and_kube_router_kube_chains_legacy() {
    cleanup_keeps_other_components_kube_chains("legacy", Backend("legacy"));
}

#[test]
fn regression_cleanup_wiped_kubelet_and_kube_router_kube_chains_nft() {
    cleanup_keeps_other_components_kube_chains("nft", Backend("nft"));
}

/// route_localnet=1 that kube-proxy did not set (its NodePorts exclude
/// 127.0.0.0/8) belongs to someone else and stays.
#[test]
fn route_localnet_stays_when_kube_proxy_did_not_serve_localhost_node_ports() {
    require_privileges();
    let b = Backend("nft");
    let no_localhost = KUBE_PROXY_V4.replace(
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS",
    );
    assert_ne!(no_localhost, KUBE_PROXY_V4);
    let ns = node("rln", b, &no_localhost);
    let rules = RulesNetns::new(Some(&ns.path()));
    let removed = handover::cleanup(&rules, &IpvsOwnership::default()).expect("cleanup");
    assert!(!removed.localhost_node_ports() && !removed.route_localnet_reset);
    assert_eq!(route_localnet(&ns), "1");
    assert_eq!(b.save(&ns), reference("rln", b));
}

/// Runs the CLI cleanup with `wrap` (e.g. setpriv) and `path` as PATH;
/// returns (success, stderr).
fn cli_cleanup(ns: &Netns, wrap: &[&str], path: Option<&Path>) -> (bool, String) {
    let mut c = match wrap.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    c.args(["cleanup-kube-proxy", "--rules-netns"])
        .arg(ns.path());
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let out = c.stdin(Stdio::null()).output().expect("cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cleanup_without_the_iptables_programs_fails_and_touches_nothing() {
    require_privileges();
    let b = Backend("nft");
    let ns = node("noipt", b, KUBE_PROXY_V4);
    let before = b.save(&ns);
    // A PATH with nsenter and nft but no iptables.
    let dir = tempfile::tempdir().expect("tempdir");
    for prog in ["nsenter", "nft"] {
        let real = which(prog);
        std::os::unix::fs::symlink(&real, dir.path().join(prog)).expect("symlink");
    }
    let (ok, stderr) = cli_cleanup(&ns, &[], Some(dir.path()));
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("iptables-legacy-save: not installed"),
        "{stderr}"
    );
    assert_eq!(b.save(&ns), before);
    assert!(nft(&ns, &["list", "tables"]).contains("table ip kube-proxy"));
    assert_eq!(route_localnet(&ns), "1");
}

#[test]
fn cleanup_without_net_admin_fails_and_touches_nothing() {
    require_privileges();
    let b = Backend("nft");
    let ns = node("nocap", b, KUBE_PROXY_V4);
    let before = b.save(&ns);
    let (ok, stderr) = cli_cleanup(
        &ns,
        &[
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
        ],
        None,
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("missing capabilities CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert_eq!(b.save(&ns), before);
    assert_eq!(route_localnet(&ns), "1");
}

/// iptables-nft that calls a table incompatible: an error, never "absent".
#[test]
fn an_incompatible_nft_table_is_an_error_never_absent() {
    require_privileges();
    let ns = Netns::new("nbcl-incompat");
    nft(&ns, &["add", "table", "ip", "filter"]);
    nft(
        &ns,
        &[
            "add",
            "chain",
            "ip",
            "filter",
            "weird",
            "{ type filter hook input priority 5; }",
        ],
    );
    let rules = RulesNetns::new(Some(&ns.path()));
    let err = handover::detect(&rules, &IpvsOwnership::default())
        .expect_err("incompatible must not read as absent");
    assert!(
        matches!(
            &err,
            HandoverError::Save {
                source: SaveError::Incompatible { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_capability());
    assert!(handover::cleanup(&rules, &IpvsOwnership::default()).is_err());
}

fn which(prog: &str) -> std::path::PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .expect("sh");
    assert!(out.status.success(), "{prog} not installed");
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A real agent (static Services, replace mode, cleanup on, 1 s node
/// interval) whose rules netns is `ns`.
fn start_agent(
    dir: &Path,
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

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

fn wait_status(listen: &str, dir: &Path, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let t = Instant::now();
    while !f(&status(listen)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: {}\n{}",
            status(listen),
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_leaves_rules_while_kube_proxy_is_present() {
    require_privileges();
    let b = Backend("nft");
    let ns = node("agent-present", b, KUBE_PROXY_V4);
    let before = b.save(&ns);
    let cg = TestCgroup::new("hoa-present");
    let pins = TestPins::new("hoa-present");
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &ns, &cg, &pins, &listen, true);
    wait_ready(&listen, Duration::from_secs(30));
    wait_status(&listen, dir.path(), "rules reported present", |s| {
        s["kubeProxyRules"] == "present"
    });
    // Several node intervals (1 s) pass: nothing is removed.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        b.save(&ns),
        before,
        "rules changed while kube-proxy is present"
    );
    assert!(nft(&ns, &["list", "tables"]).contains("table ip kube-proxy"));
    assert_eq!(route_localnet(&ns), "1");
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
fn agent_removes_exactly_kube_proxys_rules_when_it_is_absent() {
    require_privileges();
    let b = Backend("nft");
    let ns = node("agent-absent", b, KUBE_PROXY_V4);
    let want = reference("agent-absent", b);
    let cg = TestCgroup::new("hoa-absent");
    let pins = TestPins::new("hoa-absent");
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &ns, &cg, &pins, &listen, false);
    wait_ready(&listen, Duration::from_secs(30));
    wait_status(&listen, dir.path(), "rules reported absent", |s| {
        s["kubeProxyRules"] == "absent"
    });
    assert_eq!(b.save(&ns), want, "only kube-proxy's lines may go");
    assert!(!nft(&ns, &["list", "tables"]).contains("kube-proxy"));
    assert_eq!(route_localnet(&ns), "0");
    let st = status(&listen);
    assert_eq!(st["kubeProxy"], "absent", "{st}");
    assert_eq!(st["kubeProxyCleanup"], "active", "{st}");
    let removed = st["kubeProxyRulesRemoved"].as_u64().expect("removed");
    assert!(removed > 0, "{st}");
    // Further passes (1 s interval) find nothing more to remove.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        status(&listen)["kubeProxyRulesRemoved"].as_u64(),
        Some(removed)
    );
    assert_eq!(b.save(&ns), want);
    let (_, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert!(
        metrics.contains("\nnetboot_kube_proxy_installed 0\n")
            && metrics.contains("\nnetboot_datapath_kube_proxy_cleanup_held_back 0\n"),
        "{metrics}"
    );
}

/// Capabilities first: an agent that cannot trust what iptables shows
/// reports `unknown` with the reason, holds KubeProxyReplacement back and
/// touches nothing, even with kube-proxy gone.
#[test]
fn agent_that_cannot_clean_blocks_and_touches_nothing() {
    require_privileges();
    let b = Backend("nft");
    let ns = node("agent-blocked", b, KUBE_PROXY_V4);
    nft(
        &ns,
        &[
            "add",
            "chain",
            "ip",
            "filter",
            "weird",
            "{ type filter hook input priority 5; }",
        ],
    );
    let before = b.save(&ns);
    let cg = TestCgroup::new("hoa-blocked");
    let pins = TestPins::new("hoa-blocked");
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &ns, &cg, &pins, &listen, false);
    wait_ready(&listen, Duration::from_secs(30));
    wait_status(&listen, dir.path(), "cleanup reported blocked", |s| {
        s["kubeProxyCleanupBlocked"] == true
    });
    std::thread::sleep(Duration::from_millis(2500));
    let st = status(&listen);
    assert_eq!(st["kubeProxyRules"], "unknown", "{st}");
    let reason = st["kubeProxyRulesReason"].as_str().unwrap_or_default();
    assert!(reason.contains("incompatible"), "{st}");
    assert_eq!(st["kubeProxyRulesRemoved"], 0, "{st}");
    assert_eq!(b.save(&ns), before, "nothing may change");
    assert!(nft(&ns, &["list", "tables"]).contains("table ip kube-proxy"));
    assert_eq!(route_localnet(&ns), "1");
    let out = Command::new(BIN)
        .args(["status", "--agent", &listen])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("KubeProxy rules:        unknown (iptables-nft-save"),
        "{text}"
    );
}

fn ipset_restore(ns: &Netns, sets: &str) {
    let input: String = sets
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    in_ns(ns, "ipset", &["restore"], Some(&input));
}

fn ipsets(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = in_ns(ns, "ipset", &["list", "-n"], None)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// An IPVS-mode node without IPVS in the kernel: the other components'
/// sets and rules (kubelet, kube-router with a rule matching its own set),
/// then kube-proxy's sets and IPVS-mode rules.
fn ipvs_node(tag: &str, b: Backend, with_kube_proxy: bool) -> Netns {
    let ns = Netns::new(&format!("nbt-ipvs-{}-{tag}", std::process::id()));
    ipset_restore(&ns, OTHERS_IPVS_SETS);
    b.restore(&ns, "iptables", KUBELET_V4);
    b.restore(&ns, "iptables", KUBE_ROUTER_V4);
    b.restore(&ns, "iptables", OTHERS_IPVS_V4);
    if with_kube_proxy {
        ipset_restore(&ns, KUBE_PROXY_IPVS_SETS);
        b.restore(&ns, "iptables", KUBE_PROXY_IPVS_V4);
    }
    ns
}

fn say_what_is_not_covered_here() {
    if !Path::new("/proc/net/ip_vs").exists() {
        eprintln!(
            "NOTE: this kernel has no IPVS (/proc/net/ip_vs absent): IPVS virtual servers and kube-ipvs0 are NOT exercised here (unit tests of src/handover/ipvs.rs and the kind ipvs job cover them)"
        );
    }
}

fn ipvs_cleanup_removes_only_kube_proxys_sets_and_rules(tag: &str, b: Backend) {
    require_privileges();
    say_what_is_not_covered_here();
    let ns = ipvs_node(tag, b, true);
    let reference = ipvs_node(&format!("{tag}-ref"), b, false);
    let (want_rules, want_sets) = (b.save(&reference), ipsets(&reference));
    let kube_proxy_sets: Vec<String> = KUBE_PROXY_IPVS_SETS
        .lines()
        .filter_map(|l| l.strip_prefix("create "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    assert_eq!(kube_proxy_sets.len(), 22);
    // Why the order matters: a set a rule matches cannot be destroyed.
    let busy = ns.exec("ipset", &["destroy", "KUBE-CLUSTER-IP"]);
    assert!(
        !busy.status.success(),
        "KUBE-CLUSTER-IP destroyed while in use"
    );
    assert!(ipsets(&ns).contains(&"KUBE-CLUSTER-IP".to_string()));

    let rules = RulesNetns::new(Some(&ns.path()));
    let found = handover::detect(&rules, &IpvsOwnership::default()).expect("detect");
    assert!(found.present(), "{found:#?}");
    let mut found_sets = found.ipsets.clone();
    found_sets.sort();
    let mut want_found = kube_proxy_sets.clone();
    want_found.sort();
    assert_eq!(found_sets, want_found);
    assert_eq!(found.retained(), Vec::<String>::new());
    assert_eq!(
        netboot_contract::node::format_modes(&found.modes),
        "ipvs",
        "{found:#?}"
    );
    let v = cli_dry_run(&ns);
    assert_eq!(v["modes"], "ipvs", "{v}");
    assert_eq!(v["ipsets"].as_array().map(Vec::len), Some(22), "{v}");

    let removed = handover::cleanup(&rules, &IpvsOwnership::default()).expect("cleanup");
    assert_eq!(removed.ipsets.len(), 22, "{removed:#?}");
    assert_eq!(
        b.save(&ns),
        want_rules,
        "the node without kube-proxy's rules"
    );
    assert_eq!(
        ipsets(&ns),
        want_sets,
        "only the other components' sets stay"
    );
    for keep in [
        "KUBE-DST-VBH27M7NWLDOZIE4",
        "KUBE-SRC-RUCZ2MNZJ3QUPUM2",
        "KUBE-CLUSTER-IP-EXTRA",
        "cali40all-ipam-pools",
    ] {
        assert!(ipsets(&ns).contains(&keep.to_string()), "lost {keep}");
    }
    let again = handover::cleanup(&rules, &IpvsOwnership::default()).expect("second cleanup");
    assert_eq!(again, handover::Report::default(), "{again:#?}");
}

#[test]
fn ipvs_mode_cleanup_removes_only_kube_proxys_ipsets_and_rules_nft() {
    ipvs_cleanup_removes_only_kube_proxys_sets_and_rules("nft", Backend("nft"));
}

#[test]
fn ipvs_mode_cleanup_removes_only_kube_proxys_ipsets_and_rules_legacy() {
    ipvs_cleanup_removes_only_kube_proxys_sets_and_rules("legacy", Backend("legacy"));
}

/// A kube-proxy set another component's rule still matches cannot be
/// destroyed: it is kept and reported, the rest goes, and the rules
/// pass does not fail.
#[test]
fn a_kube_proxy_ipset_another_rule_matches_is_retained() {
    require_privileges();
    let b = Backend("nft");
    let ns = ipvs_node("retained", b, true);
    b.restore(
        &ns,
        "iptables",
        "*filter\n-A FORWARD -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n",
    );
    let rules = RulesNetns::new(Some(&ns.path()));
    let removed = handover::cleanup(&rules, &IpvsOwnership::default()).expect("cleanup");
    assert_eq!(removed.ipsets.len(), 21, "{removed:#?}");
    assert_eq!(removed.ipsets_retained.len(), 1, "{removed:#?}");
    let sets = ipsets(&ns);
    assert!(sets.contains(&"KUBE-CLUSTER-IP".to_string()), "{sets:?}");
    assert!(!sets.contains(&"KUBE-LOOP-BACK".to_string()), "{sets:?}");
    let after = handover::detect(&rules, &IpvsOwnership::default()).expect("detect");
    assert!(after.present(), "a retained set keeps the gate shut");
    assert!(
        after.retained()[0].starts_with("ipset KUBE-CLUSTER-IP (matched by: "),
        "{:?}",
        after.retained()
    );
}
