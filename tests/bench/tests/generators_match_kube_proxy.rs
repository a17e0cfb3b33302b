//! Are the bench's rule generators kube-proxy? (issue 15, point 4)
//!
//! The bench measures kube-proxy's iptables and nftables modes with rules from
//! its own generators (`iptables_rules::full`, which is netboot-harness's
//! `kubeproxy_rules::render`, and `nft_rules::full_sync`), because the sizes
//! it goes to (100k Services) are more than a test API server holds. This test
//! proves the generators' output equal to the REAL kube-proxy's for the same
//! Services:
//!
//! 1. a private etcd + kube-apiserver on free 127.0.0.1 ports (binaries from
//!    tests/cluster/build's cache, `--service-cluster-ip-range` = the bench's
//!    10.96.0.0/12; the API server's own `default/kubernetes` Service is
//!    deleted so that `bench/svc-000000` can have 10.96.0.1 as in the bench);
//! 2. the bench's workload (N Services, N EndpointSlices with B = 2 ready
//!    endpoints) created through the API, concurrently, timed;
//! 3. the real kube-proxy (same cache, v1.36.3) run inside a network
//!    namespace the test makes (only `lo`, no route anywhere), in iptables and
//!    then nftables mode with kubeadm's KubeProxyConfiguration (clusterCIDR =
//!    the bench's pod CIDR, `conntrack.maxPerCore: 0` as podnet does). It
//!    reaches the API server through a relay this test runs: a listener on
//!    127.0.0.1 INSIDE the namespace, each connection forwarded to the API
//!    server's 127.0.0.1 port in the root namespace by the test process (no
//!    veth, no route, no firewall change in the root namespace);
//! 4. once kube-proxy has synced (all N Services in KUBE-SERVICES / the
//!    `service-ips` map, and two dumps in a row equal), its rules are dumped
//!    (`iptables-nft-save`, `nft list table ip kube-proxy`); the generator's
//!    output is loaded into a second namespace (`iptables-nft-restore`,
//!    `nft -f`) and dumped the same way, so both sides are printed by the same
//!    tools;
//! 5. both dumps are normalized (counters dropped; kube-proxy's hashed chain
//!    names replaced by names derived from what they belong to; rule order
//!    kept in every chain except the ones kube-proxy fills from a Go map:
//!    KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES,
//!    KUBE-PROXY-FIREWALL; set and map elements sorted) and must be equal; a
//!    unified diff is printed otherwise. The raw chain names (hashes
//!    included) must be equal too;
//! 6. the bench's incremental updates (iptables `partial` under `--noflush`,
//!    nftables `endpoint_change`) applied on top of the generated rules must
//!    give the generator's full ruleset with the change, and back.
//!
//! Two tests, one at a time, one control plane each:
//! `generators_match_the_real_kube_proxy` for the east–west sections'
//! ClusterIP Services (B = 2, steps 1–6), and
//! `generators_match_the_real_kube_proxy_for_node_ports` for
//! `netboot-bench northsouth`'s Services exactly as it generates them
//! (`northsouth::objects`: type NodePort, externalTrafficPolicy Cluster,
//! nodePort 20000 + i — the API server runs with
//! `--service-node-port-range=20000-32767`, the harness's
//! `NODE_PORT_RANGE` — one endpoint each, Service N−2's on this node).
//! There kube-proxy runs as the bench's node (`hostnameOverride` and Node
//! `nbb-node`, InternalIP 192.168.50.1) in a namespace with the bench node
//! namespace's addresses on interfaces (eth0 192.168.50.1/24, pod0
//! 10.200.1.254/24: veth pairs with both ends inside), since its nftables
//! `nodeport-ips` set comes from the interfaces' addresses; the generated
//! side is `northsouth::iptables_ruleset` / `northsouth::nft_transactions`,
//! loaded as the bench loads it; step 6 does not apply (the north–south
//! bench loads its rules once), and kube-proxy's rules must hold all N
//! nodePorts and (nftables) the node address in `nodeport-ips`.
//!
//! Sizes: N = 1,000 always; N = 10,000 too with `NETBOOT_FULL=1` (the test
//! prints loudly when it is not run). Root is required (namespaces,
//! iptables/nft inside them); without the binaries the test panics saying so.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use netboot_bench::workload::{self, Workload, NAMESPACE, POD_CIDR, SERVICE_CIDR};
use netboot_bench::{iptables_rules, nft_rules, northsouth};
use netboot_harness::controlplane::{
    self, create_all, first_sync_elapsed, kube_proxy_command, kubeconfig, proxy_config,
    spawn_logged, sweep_leftovers, ControlPlane, ProxyMode as Mode, ProxySettings, Relay,
};
use netboot_harness::kubeproxy_rules;
use netboot_harness::netns::{in_netns, Scoped};

/// Concurrent creates.
const IN_FLIGHT: usize = 48;

/// Which of the bench's rulesets is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The east–west sections' ClusterIP Services (`iptables_rules::full`,
    /// `nft_rules::full_sync`), B = 2, and their endpoint change.
    ClusterIp,
    /// netboot-bench northsouth's NodePort Services (`northsouth::objects`:
    /// type NodePort, externalTrafficPolicy Cluster, nodePort 20000 + i,
    /// one endpoint, the local pod on this node), as it loads them
    /// (`northsouth::iptables_ruleset`, `northsouth::nft_transactions`).
    NodePort,
}

impl Kind {
    /// Namespace and file tag.
    fn tag(self) -> &'static str {
        match self {
            Self::ClusterIp => "cip",
            Self::NodePort => "np",
        }
    }

    /// Endpoints per Service (the bench's for the section).
    fn b(self) -> u32 {
        match self {
            Self::ClusterIp => 2,
            Self::NodePort => 1,
        }
    }

    /// kube-proxy's `hostnameOverride` (the Node object's name) and the
    /// Node's InternalIP: for ClusterIP an unused address (the bench's
    /// iptables client namespace address); for NodePort the bench's node.
    fn node(self) -> (&'static str, String) {
        match self {
            Self::ClusterIp => ("nbkq-node", "10.244.0.12".into()),
            Self::NodePort => (northsouth::NODE_NAME, northsouth::NODE_IP.to_string()),
        }
    }

    /// Addresses on interfaces in kube-proxy's namespace: for
    /// NodePort those of the bench's node namespace (eth0 and the local
    /// pod's gateway pod0), because kube-proxy takes its NodePort
    /// addresses from the interfaces it sees.
    fn interfaces(self) -> Vec<(&'static str, String)> {
        match self {
            Self::ClusterIp => Vec::new(),
            Self::NodePort => vec![
                ("eth0", format!("{}/24", northsouth::NODE_IP)),
                ("pod0", "10.200.1.254/24".into()),
            ],
        }
    }

    /// The Services and EndpointSlices of `w` (without the change).
    fn objects(self, w: &Workload) -> (Vec<Service>, Vec<EndpointSlice>) {
        match self {
            Self::ClusterIp => (w.services(), w.slices(false)),
            Self::NodePort => northsouth::objects(w),
        }
    }

    /// The generator's full ruleset (`changed`: with the bench's endpoint
    /// change; ClusterIP only) in the inputs the bench loads it with.
    fn generated(self, mode: Mode, w: &Workload, changed: bool) -> Vec<String> {
        match (self, mode) {
            (Self::ClusterIp, Mode::Iptables) => vec![iptables_rules::full(w, changed)],
            (Self::ClusterIp, Mode::Nftables) => vec![nft_rules::full_sync(w, changed)],
            (Self::NodePort, _) => {
                assert!(!changed, "the north-south bench has no endpoint change");
                match mode {
                    Mode::Iptables => vec![northsouth::iptables_ruleset(w)],
                    Mode::Nftables => northsouth::nft_transactions(w),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The harness's control plane and kube-proxy, failing loudly

/// `ip netns exec NS PROGRAM ARGS…`, stdout as text; panics on failure.
fn in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<&Path>) -> String {
    controlplane::in_ns(ns, program, args, stdin).unwrap_or_else(|e| panic!("{e}"))
}

/// The rules in `ns` as the mode's tool prints them; panics on failure.
fn dump(mode: Mode, ns: &str) -> String {
    mode.dump(ns).unwrap_or_else(|e| panic!("{e}"))
}

/// `elements = { a, b, … }` (joined onto one line) as sorted `element a`,
/// `element b`, … lines: nft prints set elements in no stable order.
fn element_lines(all: &str) -> Vec<String> {
    let inner = all
        .trim()
        .strip_prefix("elements = {")
        .and_then(|s| s.strip_suffix('}'))
        .expect("elements = { … }");
    let mut items: Vec<String> = inner
        .split(',')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .map(|i| format!("element {i}"))
        .collect();
    items.sort();
    items
}

/// What the comparison needs of a mode beyond the harness's.
trait Compare {
    fn normalize(self, dump: &str) -> String;
    fn chain_names(self, dump: &str) -> BTreeSet<String>;
}

impl Compare for Mode {
    fn normalize(self, dump: &str) -> String {
        match self {
            Self::Iptables => normalize_iptables(dump),
            Self::Nftables => normalize_nft(dump),
        }
    }

    fn chain_names(self, dump: &str) -> BTreeSet<String> {
        match self {
            Self::Iptables => dump
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect(),
            Self::Nftables => dump
                .lines()
                .filter_map(|l| l.trim().strip_prefix("chain "))
                .filter_map(|l| l.strip_suffix(" {"))
                .map(str::to_string)
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// Normalization

fn is_hashed_iptables(name: &str) -> Option<&str> {
    for prefix in [
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SVL-",
        "KUBE-XLB-",
    ] {
        if let Some(h) = name.strip_prefix(prefix) {
            if h.len() == 16
                && h.bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
            {
                return Some(&prefix[..prefix.len() - 1]);
            }
        }
    }
    None
}

/// The `--comment` of a rule, unquoted.
fn comment(rule: &str) -> Option<String> {
    let rest = rule.split_once("--comment ")?.1;
    if let Some(q) = rest.strip_prefix('"') {
        Some(q.split_once('"').map_or(q, |(c, _)| c).to_string())
    } else {
        rest.split_whitespace().next().map(str::to_string)
    }
}

fn arg_after<'a>(rule: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == flag {
            return words.next();
        }
    }
    None
}

/// What a rule matches, without its chain and target: the comment if it has
/// one, else its destination and port.
fn describe(rule: &str) -> String {
    if let Some(c) = comment(rule) {
        return c;
    }
    format!(
        "{}:{}",
        arg_after(rule, "-d").unwrap_or("*"),
        arg_after(rule, "--dport").unwrap_or("*")
    )
}

struct Table {
    decls: Vec<(String, String)>,
    rules: Vec<(String, String)>,
}

fn parse_iptables(dump: &str) -> BTreeMap<String, Table> {
    let mut tables = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in dump.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.to_string());
            tables.entry(t.to_string()).or_insert(Table {
                decls: Vec::new(),
                rules: Vec::new(),
            });
            continue;
        }
        let t = tables
            .get_mut(current.as_deref().expect("a table line first"))
            .expect("table");
        if let Some(d) = line.strip_prefix(':') {
            let mut w = d.split_whitespace();
            let name = w.next().expect("chain name").to_string();
            let policy = w.next().unwrap_or("-").to_string();
            t.decls.push((name, policy));
        } else if let Some(r) = line.strip_prefix("-A ") {
            let (chain, rest) = r.split_once(' ').unwrap_or((r, ""));
            t.rules.push((chain.to_string(), rest.to_string()));
        } else {
            panic!("iptables-save line not understood: {line}");
        }
    }
    tables
}

/// Chains whose rule order kube-proxy takes from a Go map (any order is
/// kube-proxy's): their rules are sorted, the "must be the last rule" rule
/// kept last.
const UNORDERED: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-PROXY-FIREWALL",
];

fn normalize_iptables(dump: &str) -> String {
    let tables = parse_iptables(dump);
    // Hashed chain → canonical name. First the chains jumped to from
    // unhashed chains (KUBE-SVC from KUBE-SERVICES, …), named after the
    // jumping rule; then the rest (KUBE-SEP from KUBE-SVC) after their
    // parent and their DNAT destination.
    let mut canon: BTreeMap<String, String> = BTreeMap::new();
    let target = |rule: &str| arg_after(rule, "-j").map(str::to_string);
    for t in tables.values() {
        let mut named: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (chain, rule) in &t.rules {
            if is_hashed_iptables(chain).is_some() {
                continue;
            }
            if let Some(tg) = target(rule) {
                if let Some(kind) = is_hashed_iptables(&tg) {
                    named
                        .entry(tg.clone())
                        .or_default()
                        .insert(format!("{kind}<{}>", describe(rule)));
                }
            }
        }
        for (k, v) in named {
            canon.insert(k, v.into_iter().next().expect("one name"));
        }
    }
    for t in tables.values() {
        let mut named: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (chain, rule) in &t.rules {
            let Some(parent) = canon.get(chain) else {
                continue;
            };
            if let Some(tg) = target(rule) {
                if let Some(kind) = is_hashed_iptables(&tg) {
                    if canon.contains_key(&tg) {
                        continue;
                    }
                    let dest = t
                        .rules
                        .iter()
                        .filter(|(c, _)| c == &tg)
                        .find_map(|(_, r)| arg_after(r, "--to-destination"))
                        .unwrap_or("?");
                    named
                        .entry(tg.clone())
                        .or_default()
                        .insert(format!("{kind}<{dest} of {parent}>"));
                }
            }
        }
        for (k, v) in named {
            canon.insert(k, v.into_iter().next().expect("one name"));
        }
    }
    let mut unreferenced = 0;
    for t in tables.values() {
        for (name, _) in &t.decls {
            if let Some(kind) = is_hashed_iptables(name) {
                canon.entry(name.clone()).or_insert_with(|| {
                    unreferenced += 1;
                    format!("{kind}<unreferenced {unreferenced}>")
                });
            }
        }
    }
    let rename = |text: &str| -> String {
        text.split(' ')
            .map(|w| canon.get(w).map_or(w, String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    };

    let mut out = String::new();
    for (name, t) in &tables {
        out.push_str(&format!("*{name}\n"));
        let mut decls: Vec<String> = t
            .decls
            .iter()
            .map(|(c, p)| format!(":{} {p}", rename(c)))
            .collect();
        decls.sort();
        for d in decls {
            out.push_str(&d);
            out.push('\n');
        }
        let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (c, r) in &t.rules {
            chains.entry(rename(c)).or_default().push(rename(r));
        }
        for (c, mut rules) in chains {
            if UNORDERED.contains(&c.as_str()) {
                let last = rules
                    .last()
                    .filter(|r| r.contains("this must be the last rule"))
                    .cloned();
                if last.is_some() {
                    rules.pop();
                }
                rules.sort();
                rules.extend(last);
            }
            for r in rules {
                out.push_str(&format!("-A {c} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// kube-proxy's nftables chain names `service-<8 base32>-…`,
/// `endpoint-<8>-…`, …: the hash replaced by `<h>` (the rest of the name is
/// the Service port / endpoint it belongs to).
fn unhash_nft(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for prefix in [
            "service-",
            "endpoint-",
            "external-",
            "firewall-",
            "affinity-",
        ] {
            if let Some(after) = rest.strip_prefix(prefix) {
                let b = after.as_bytes();
                let boundary = out
                    .chars()
                    .last()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
                if boundary
                    && b.len() > 9
                    && b[..8]
                        .iter()
                        .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(c))
                    && b[8] == b'-'
                {
                    out.push_str(prefix);
                    out.push_str("<h>");
                    rest = &after[8..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().expect("char");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// `nft list table`, one block (set, map, chain) per section sorted by kind
/// and name, properties and rules in order, elements sorted one per line.
fn normalize_nft(dump: &str) -> String {
    let text = unhash_nft(dump);
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut header = Vec::new();
    let mut current: Option<String> = None;
    let mut elements: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(acc) = elements.as_mut() {
            acc.push(' ');
            acc.push_str(line);
            if line.ends_with('}') {
                let all = elements.take().expect("elements");
                let b = blocks
                    .get_mut(current.as_deref().expect("block"))
                    .expect("block");
                b.extend(element_lines(&all));
            }
            continue;
        }
        match current.as_deref() {
            None => {
                if line.starts_with("table ") {
                    header.push(line.to_string());
                } else if let Some(h) = line.strip_suffix(" {") {
                    current = Some(h.to_string());
                    blocks.entry(h.to_string()).or_default();
                } else if line == "}" {
                    // end of table
                } else {
                    header.push(line.to_string());
                }
            }
            Some(block) => {
                if line == "}" {
                    current = None;
                } else if line.starts_with("elements = {") {
                    elements = Some(line.to_string());
                    if line.ends_with('}') {
                        // single line: handled by the accumulator on the next
                        // iteration otherwise; finish it now.
                        let all = elements.take().expect("elements");
                        blocks
                            .get_mut(block)
                            .expect("block")
                            .extend(element_lines(&all));
                    }
                } else {
                    let b = block.to_string();
                    blocks.get_mut(&b).expect("block").push(line.to_string());
                }
            }
        }
    }
    let mut out = String::new();
    for h in header {
        out.push_str(&h);
        out.push('\n');
    }
    for (name, lines) in blocks {
        out.push_str(&format!("{name} {{\n"));
        for l in lines {
            out.push_str(&format!("\t{l}\n"));
        }
        out.push_str("}\n");
    }
    out
}

fn diff(generated: &str, real: &str, max_lines: usize) -> String {
    let d = similar::TextDiff::from_lines(generated, real);
    let text = d
        .unified_diff()
        .context_radius(2)
        .header("generator", "kube-proxy")
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines
        .iter()
        .take(max_lines)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > max_lines {
        out.push_str(&format!(
            "\n… ({} more diff lines)",
            lines.len() - max_lines
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// The workload in the API

/// The namespace, the Node, and `bench/svc-000000` in `default/kubernetes`'
/// place (10.96.0.1, as in the bench).
async fn prepare(cp: &ControlPlane, kind: Kind, w: &Workload) {
    cp.create_namespace(NAMESPACE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (node, ip) = kind.node();
    Api::<Node>::all(cp.client.clone())
        .create(&PostParams::default(), &controlplane::node(node, &ip))
        .await
        .expect("node");
    let first = kind.objects(w).0.remove(0);
    cp.displace_default_kubernetes(&first)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Brings the API's objects to workload `w` (Services `created..n`
/// created; the slices of the Services whose endpoints differ in `w`, i.e.
/// the previously last two, replaced). Returns the time taken.
async fn apply(cp: &ControlPlane, kind: Kind, created: &mut u32, w: &Workload) -> Duration {
    let t = Instant::now();
    let svcs: Api<Service> = Api::namespaced(cp.client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(cp.client.clone(), NAMESPACE);
    let (services, all_slices) = kind.objects(w);
    // svc-000000 exists since prepare().
    let from = (*created).max(1) as usize;
    create_all(&svcs, services.into_iter().skip(from).collect(), IN_FLIGHT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in created.saturating_sub(2)..*created {
        let name = format!("{}-bench", workload::service_name(i));
        let mut s = all_slices[i as usize].clone();
        let old = slices.get(&name).await.expect("slice");
        s.metadata.resource_version = old.metadata.resource_version;
        slices
            .replace(&name, &PostParams::default(), &s)
            .await
            .expect("replace slice");
    }
    create_all(
        &slices,
        all_slices.into_iter().skip(*created as usize).collect(),
        IN_FLIGHT,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    *created = w.n;
    t.elapsed()
}

// ---------------------------------------------------------------------------
// One comparison

struct Outcome {
    mode: Mode,
    n: u32,
    proxy_sync: Duration,
    /// kube-proxy's own report of its first IPv4 sync ("SyncProxyRules
    /// complete" elapsed), if its log has it.
    proxy_first_sync: Option<String>,
    generator_load: Duration,
    mismatch: Option<String>,
    notes: Vec<String>,
}

fn run_kube_proxy(
    cp: &ControlPlane,
    dir: &Path,
    kind: Kind,
    mode: Mode,
    w: &Workload,
) -> (String, Duration, Option<String>) {
    let ns =
        Scoped::create(&format!("nbkq-{}-{}kp", std::process::id(), kind.tag())).expect("netns");
    for (dev, addr) in kind.interfaces() {
        // Inside the test's own namespace only.
        // A veth pair with both ends in the namespace (no dummy module here).
        let peer = format!("{dev}p");
        in_ns(
            &ns.name,
            "ip",
            &["link", "add", dev, "type", "veth", "peer", "name", &peer],
            None,
        );
        in_ns(&ns.name, "ip", &["link", "set", &peer, "up"], None);
        in_ns(&ns.name, "ip", &["addr", "add", &addr, "dev", dev], None);
        in_ns(&ns.name, "ip", &["link", "set", dev, "up"], None);
    }
    let relay = Relay::start(&ns.name, SocketAddr::from(([127, 0, 0, 1], cp.api_port)))
        .unwrap_or_else(|e| panic!("{e}"));
    let kc = kubeconfig(
        dir,
        &format!("kube-proxy-{}-{}.conf", kind.tag(), mode.name()),
        &format!("https://127.0.0.1:{}", relay.port),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg = dir.join(format!(
        "kube-proxy-{}-{}-{}.yaml",
        kind.tag(),
        mode.name(),
        w.n
    ));
    let settings = ProxySettings {
        mode,
        kubeconfig: kc,
        cluster_cidr: POD_CIDR.into(),
        node: kind.node().0.into(),
        metrics: None,
    };
    std::fs::write(&cfg, proxy_config(&settings)).expect("config");
    let log = dir.join(format!(
        "kube-proxy-{}-{}-{}.log",
        kind.tag(),
        mode.name(),
        w.n
    ));
    let mut c = kube_proxy_command(&cp.bin_proxy, &ns.name, &cfg);
    if std::env::var_os("NBKQ_TRACE").is_some() {
        // Debugging aid: wrappers in front of PATH record every nft /
        // iptables-restore input kube-proxy sends (trace-*.txt in the kept dir).
        let bin = dir.join("trace-bin");
        std::fs::create_dir_all(&bin).expect("trace dir");
        for tool in ["nft", "iptables-restore", "iptables-nft-restore"] {
            let real = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .expect("which");
            let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
            let script = format!(
                "#!/bin/bash\nf={d}/trace-{tool}-$(date +%s%N).txt\necho \"# $*\" > $f\nif [[ \" $* \" == *\" -f -\"* || {tool} == *restore ]]; then tee -a $f | {real} \"$@\"; exit ${{PIPESTATUS[1]}}; else exec {real} \"$@\"; fi\n",
                d = dir.display()
            );
            let p = bin.join(tool);
            std::fs::write(&p, script).expect("wrapper");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        c.env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    }
    let t = Instant::now();
    let mut proxy = spawn_logged(c, &log).unwrap_or_else(|e| panic!("{e}"));
    let limit = Duration::from_secs(600);
    let mut last = String::new();
    let synced = loop {
        if let Some(status) = proxy.exited() {
            panic!(
                "kube-proxy ({}) exited with {status}: see {}",
                mode.name(),
                log.display()
            );
        }
        let dump = dump(mode, &ns.name);
        if mode.services_in(&dump) == w.n as usize {
            if dump == last {
                break dump;
            }
            last = dump;
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        assert!(
            t.elapsed() < limit,
            "kube-proxy ({}) not synced after {limit:?}: {} of {} Services; see {}",
            mode.name(),
            mode.services_in(&dump),
            w.n,
            log.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Synced when the first of the two equal dumps was taken (≈ 2 s + one dump earlier).
    let took = t.elapsed();
    drop(proxy);
    drop(relay);
    drop(ns);
    (synced, took, first_sync_elapsed(&log))
}

/// Loads the generator's full ruleset (`changed`: with the bench's
/// endpoint change) into a fresh namespace `nbkq-<pid>-<tag>` as the bench
/// does (one input after the other); returns the namespace, its dump and
/// the load time.
fn load_generated(
    dir: &Path,
    kind: Kind,
    mode: Mode,
    w: &Workload,
    changed: bool,
    tag: &str,
) -> (Scoped, String, Duration) {
    let ns =
        Scoped::create(&format!("nbkq-{}-{}{tag}", std::process::id(), kind.tag())).expect("netns");
    let inputs = kind.generated(mode, w, changed);
    let mut files = Vec::new();
    for (k, text) in inputs.iter().enumerate() {
        let ext = match mode {
            Mode::Iptables => "rules",
            Mode::Nftables => "nft",
        };
        let p = dir.join(format!(
            "generated-{}-{}-{changed}-{k}.{ext}",
            kind.tag(),
            w.n
        ));
        std::fs::write(&p, text).expect("write");
        files.push(p);
    }
    if mode == Mode::Iptables {
        in_netns(&ns.name, kubeproxy_rules::ensure_nfacct_counters).expect("nfacct counters");
    }
    let t = Instant::now();
    for p in &files {
        match mode {
            Mode::Iptables => {
                in_ns(&ns.name, "iptables-nft-restore", &["-w", "5"], Some(p));
            }
            Mode::Nftables => {
                in_ns(&ns.name, "nft", &["-f", &p.display().to_string()], None);
            }
        }
    }
    let took = t.elapsed();
    let dump = dump(mode, &ns.name);
    (ns, dump, took)
}

/// The bench's incremental update (iptables: kube-proxy's partial restore;
/// nftables: its endpoint-change transaction) applied to `ns`.
fn apply_change(dir: &Path, ns: &Scoped, mode: Mode, w: &Workload, to_changed: bool) {
    match mode {
        Mode::Iptables => {
            let after = iptables_rules::full(w, to_changed);
            let p = dir.join(format!("partial-{}-{to_changed}.rules", w.n));
            std::fs::write(&p, iptables_rules::partial(w, &after, to_changed)).expect("write");
            in_ns(
                &ns.name,
                "iptables-nft-restore",
                &["-w", "5", "--noflush"],
                Some(&p),
            );
        }
        Mode::Nftables => {
            let p = dir.join(format!("change-{}-{to_changed}.nft", w.n));
            std::fs::write(&p, nft_rules::endpoint_change(w, to_changed)).expect("write");
            in_ns(&ns.name, "nft", &["-f", &p.display().to_string()], None);
        }
    }
}

/// The bench's endpoint change and back, applied on top of the generated
/// ruleset, must give the generator's full ruleset with the change and then
/// the original one again.
fn check_incremental(
    dir: &Path,
    ns: &Scoped,
    mode: Mode,
    w: &Workload,
    original: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (fresh_ns, fresh, _) = load_generated(dir, Kind::ClusterIp, mode, w, true, "gen2");
    drop(fresh_ns);
    apply_change(dir, ns, mode, w, true);
    let (a, b) = (
        mode.normalize(&dump(mode, &ns.name)),
        mode.normalize(&fresh),
    );
    if a != b {
        problems.push(format!(
            "the bench's endpoint change applied to the full ruleset is not the full ruleset with the change:\n{}",
            diff(&b, &a, 60)
        ));
    }
    apply_change(dir, ns, mode, w, false);
    let (a, b) = (
        mode.normalize(&dump(mode, &ns.name)),
        mode.normalize(original),
    );
    if a != b {
        problems.push(format!(
            "the bench's endpoint change back does not restore the full ruleset:\n{}",
            diff(&b, &a, 60)
        ));
    }
    problems
}

fn compare(cp: &ControlPlane, dir: &Path, kind: Kind, mode: Mode, w: &Workload) -> Outcome {
    let (real, proxy_sync, proxy_first_sync) = run_kube_proxy(cp, dir, kind, mode, w);
    let (gen_ns, generated, generator_load) = load_generated(dir, kind, mode, w, false, "gen");
    let t = kind.tag();
    std::fs::write(
        dir.join(format!("real-{t}-{}-{}.txt", mode.name(), w.n)),
        &real,
    )
    .expect("w");
    std::fs::write(
        dir.join(format!("gen-{t}-{}-{}.txt", mode.name(), w.n)),
        &generated,
    )
    .expect("w");
    let (nr, ng) = (mode.normalize(&real), mode.normalize(&generated));
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    if kind == Kind::NodePort {
        // Not equal by both lacking them: kube-proxy's rules hold all N
        // nodePorts, and (nftables) the node's address as a NodePort address.
        // (Distinct nodePorts: kube-proxy's iptables rules have two per
        // nodePort, the node's and localhost's.)
        let node_ports = |dump: &str| match mode {
            Mode::Iptables => dump
                .lines()
                .filter(|l| l.starts_with("-A KUBE-NODEPORTS "))
                .filter_map(|l| arg_after(l, "--dport"))
                .collect::<BTreeSet<_>>()
                .len(),
            Mode::Nftables => dump.matches(": goto external-").count(),
        };
        let (in_real, in_gen) = (node_ports(&real), node_ports(&generated));
        notes.push(format!(
            "nodePorts in the rules: kube-proxy {in_real}, generator {in_gen} (of {})",
            w.n
        ));
        if in_real != w.n as usize {
            problems.push(format!(
                "kube-proxy's rules hold {in_real} nodePorts, not {}",
                w.n
            ));
        }
        if mode == Mode::Nftables {
            let ip = northsouth::NODE_IP.to_string();
            let has_node_ip = |dump: &str| {
                normalize_nft(dump)
                    .split("set nodeport-ips {")
                    .nth(1)
                    .and_then(|b| b.split('}').next())
                    .is_some_and(|b| b.lines().any(|l| l.trim() == format!("element {ip}")))
            };
            if !has_node_ip(&real) {
                problems.push(format!("kube-proxy's nodeport-ips set lacks {ip}"));
            }
        }
    }
    if nr != ng {
        problems.push(format!(
            "normalized rules differ (first differences):\n{}",
            diff(&ng, &nr, 120)
        ));
    }
    if kind == Kind::ClusterIp {
        // The north-south bench loads its ruleset once: no update to check.
        problems.extend(check_incremental(dir, &gen_ns, mode, w, &generated));
    }
    drop(gen_ns);
    let (cr, cg) = (mode.chain_names(&real), mode.chain_names(&generated));
    if cr != cg {
        let only_real: Vec<_> = cr.difference(&cg).take(5).collect();
        let only_gen: Vec<_> = cg.difference(&cr).take(5).collect();
        problems.push(format!(
            "raw chain names differ ({} only in kube-proxy, {} only in the generator); e.g. kube-proxy {only_real:?}, generator {only_gen:?}",
            cr.difference(&cg).count(),
            cg.difference(&cr).count()
        ));
    }
    if mode == Mode::Iptables {
        // Where kube-proxy puts the last-declared Service (the bench's
        // target) in nat KUBE-SERVICES, which it walks rule by rule.
        let target = format!(
            "{}/{}:http cluster IP",
            NAMESPACE,
            workload::service_name(w.last())
        );
        let pos = |dump: &str| {
            dump.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES -d "))
                .position(|l| l.contains(&target))
        };
        notes.push(format!(
            "position of {target:?} in nat KUBE-SERVICES: kube-proxy {:?}, generator {:?} (of {})",
            pos(&real),
            pos(&generated),
            w.n
        ));
    }
    Outcome {
        mode,
        n: w.n,
        proxy_sync,
        proxy_first_sync,
        generator_load,
        mismatch: (!problems.is_empty()).then(|| problems.join("\n")),
        notes,
    }
}

/// The two tests share the machine's 2 cores and the namespace prefix: one
/// at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts a control plane, creates `kind`'s workload at each size and
/// compares both modes; panics with every difference.
fn generators_match(kind: Kind) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let what = format!("generators_match_kube_proxy ({kind:?})");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what}: must run as root (network namespaces, iptables/nft inside them); euid is {euid}"
    );
    let full = std::env::var("NETBOOT_FULL").is_ok_and(|v| v == "1");
    let sizes: Vec<u32> = if full {
        vec![1_000, 10_000]
    } else {
        vec![1_000]
    };
    if !full {
        println!(
            "\n!!! {what}: N = 10,000 NOT RUN (only N = 1,000); NETBOOT_FULL=1 runs it too !!!\n"
        );
    }
    for name in sweep_leftovers("nbkq-") {
        println!("removed the leftover namespace {name}");
    }
    let dir = tempfile::Builder::new()
        .prefix("nbkq-")
        .tempdir()
        .expect("tempdir");
    let keep = std::env::var_os("NBKQ_KEEP").is_some();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cp = rt
        .block_on(ControlPlane::start(dir.path(), SERVICE_CIDR))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let first = Workload::new(sizes[0], kind.b()).expect("size");
    rt.block_on(prepare(&cp, kind, &first));
    let mut created = 0;
    let mut outcomes = Vec::new();
    for n in sizes {
        let w = Workload::new(n, kind.b()).expect("size");
        let took = rt.block_on(apply(&cp, kind, &mut created, &w));
        println!(
            "{kind:?} N = {n}: {} Services + {} EndpointSlices in the API in {took:?}",
            n, n
        );
        for mode in [Mode::Iptables, Mode::Nftables] {
            let o = compare(&cp, dir.path(), kind, mode, &w);
            println!(
                "{kind:?} N = {n} {}: kube-proxy start → synced (two equal dumps 2 s apart) {:.1?}, its first sync took {}; generator's rules loaded ({}) in {:.1?}: {}",
                mode.name(),
                o.proxy_sync,
                o.proxy_first_sync.as_deref().unwrap_or("? (not in its log)"),
                match mode {
                    Mode::Iptables => "iptables-nft-restore",
                    Mode::Nftables => "nft -f",
                },
                o.generator_load,
                if o.mismatch.is_some() { "DIFFERENT" } else { "equal" }
            );
            for note in &o.notes {
                println!("  {note}");
            }
            outcomes.push(o);
        }
    }
    if keep {
        let p = dir.keep();
        println!("NBKQ_KEEP: files kept in {}", p.display());
    }
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.mismatch
                .as_ref()
                .map(|m| format!("== {kind:?} N = {} {}: {m}", o.n, o.mode.name()))
        })
        .collect();
    drop(cp);
    assert!(
        failures.is_empty(),
        "the generators differ from the real kube-proxy:\n{}",
        failures.join("\n\n")
    );
}

/// The east–west sections' ClusterIP Services.
#[test]
fn generators_match_the_real_kube_proxy() {
    generators_match(Kind::ClusterIp);
}

/// netboot-bench northsouth's NodePort Services (API server
/// `--service-node-port-range` = the harness's `NODE_PORT_RANGE`, kube-proxy
/// on the bench's node name with the bench node's addresses on interfaces).
#[test]
fn generators_match_the_real_kube_proxy_for_node_ports() {
    generators_match(Kind::NodePort);
}

// ---------------------------------------------------------------------------
// The normalizers themselves

#[test]
fn iptables_normalization_names_hashed_chains_after_what_they_serve() {
    let a = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [3:4]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n\
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"b/s:http cluster IP\" -j KUBE-SVC-AAAAAAAAAAAAAAAA\n\
-A KUBE-SERVICES -d 10.96.0.2/32 -j X\n\
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB\n\
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -j DNAT --to-destination 10.1.1.1:80\nCOMMIT\n";
    let b = a
        .replace("AAAAAAAAAAAAAAAA", "CCCCCCCCCCCCCCCC")
        .replace("BBBBBBBBBBBBBBBB", "DDDDDDDDDDDDDDDD")
        .replace(
            "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"b/s:http cluster IP\" -j KUBE-SVC-CCCCCCCCCCCCCCCC\n-A KUBE-SERVICES -d 10.96.0.2/32 -j X\n",
            "-A KUBE-SERVICES -d 10.96.0.2/32 -j X\n-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"b/s:http cluster IP\" -j KUBE-SVC-CCCCCCCCCCCCCCCC\n",
        );
    let (na, nb) = (normalize_iptables(a), normalize_iptables(&b));
    assert_eq!(na, nb);
    assert!(
        na.contains("-A KUBE-SEP<10.1.1.1:80 of KUBE-SVC<b/s:http cluster IP>> -p tcp -j DNAT"),
        "{na}"
    );
    // Order inside a KUBE-SVC chain is kept (it is semantic).
    let c = "*nat\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j A\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j B\nCOMMIT\n";
    let d = "*nat\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j B\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j A\nCOMMIT\n";
    assert_ne!(normalize_iptables(c), normalize_iptables(d));
}

#[test]
fn nft_normalization_sorts_elements_and_strips_hashes_only() {
    let a = "table ip kube-proxy {\n\tmap service-ips {\n\t\ttype ipv4_addr\n\t\telements = { 10.96.0.2 . tcp . 80 : goto service-ABCDEFGH-b/s/tcp/http,\n\t\t\t     10.96.0.1 . tcp . 80 : goto service-ZZZZZZZZ-b/t/tcp/http }\n\t}\n\tchain service-ABCDEFGH-b/s/tcp/http {\n\t\tnumgen random mod 2 vmap { 0 : goto endpoint-AAAAAAAA-x, 1 : goto endpoint-BBBBBBBB-y }\n\t}\n\tchain service-ips-check {\n\t\tjump service-ips\n\t}\n}\n";
    let n = normalize_nft(a);
    assert!(
        n.contains(
            "\telement 10.96.0.1 . tcp . 80 : goto service-<h>-b/t/tcp/http\n\telement 10.96.0.2"
        ),
        "{n}"
    );
    assert!(n.contains("chain service-ips-check {"), "{n}");
    assert!(
        n.contains("goto endpoint-<h>-x, 1 : goto endpoint-<h>-y"),
        "{n}"
    );
    assert_eq!(unhash_nft("xservice-ABCDEFGH-a"), "xservice-ABCDEFGH-a");
}
