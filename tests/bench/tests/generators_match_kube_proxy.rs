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
//! Sizes: N = 1,000 always; N = 10,000 too with `NETBOOT_FULL=1` (the test
//! prints loudly when it is not run). Root is required (namespaces,
//! iptables/nft inside them); without the binaries the test panics saying so.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeAddress, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use netboot_bench::workload::{self, Workload, NAMESPACE, POD_CIDR, SERVICE_CIDR};
use netboot_bench::{iptables_rules, nft_rules};
use netboot_harness::kubeproxy_rules;
use netboot_harness::netns::{in_netns, Scoped};

/// Endpoints per Service (the bench default).
const B: u32 = 2;
/// kube-proxy's `--hostname-override` and the Node object.
const NODE: &str = "nbkq-node";
/// The Node's InternalIP (the bench's iptables client namespace address).
const NODE_IP: &str = "10.244.0.12";
/// Concurrent creates.
const IN_FLIGHT: usize = 48;

// ---------------------------------------------------------------------------
// Processes, namespaces, relay

fn cached(kind: &str, name: &str) -> PathBuf {
    let cache = std::env::var("NETBOOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/netboot")
        });
    let dir = cache.join(kind);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "generators_match_kube_proxy needs {name} from the tests/cluster/build cache: \
                 {}: {e} (run tests/cluster/build first; NETBOOT_CACHE overrides ~/.cache/netboot)",
                dir.display()
            )
        })
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "generators_match_kube_proxy needs {name} from the tests/cluster/build cache: not \
             found under {}/*/bin (run tests/cluster/build first; NETBOOT_CACHE overrides \
             ~/.cache/netboot)",
            dir.display()
        )
    })
}

/// A child killed (by its pid) and reaped on drop, pass or fail.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> ChildGuard {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).expect("log file");
    // SAFETY: prctl is async-signal-safe. The child dies with the test
    // process even if that is killed and cannot run its guards.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    ChildGuard(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
}

fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if [6443, 2379, 2380].contains(&port) || (10248..=10260).contains(&port) {
            continue;
        }
        held.push(l);
    }
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
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

fn sh(script: &str, dir: &Path) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, API server serving cert (127.0.0.1), admin client cert, SA keys.
fn pki(dir: &Path) {
    sh(
        r#"
k() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
k ca.key
openssl req -x509 -new -key ca.key -subj /CN=nbkq-ca -days 2 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign -out ca.crt 2>/dev/null
sign() { k "$1.key"; openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 -out "$1.crt" -extfile <(printf '%s\n' "$3") 2>/dev/null; }
sign apiserver /CN=kube-apiserver "basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:kubernetes"
sign admin "/O=system:masters/CN=nbkq-admin" "basicConstraints=critical,CA:FALSE
extendedKeyUsage=clientAuth"
k sa.key; openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
"#,
        dir,
    );
}

fn kubeconfig(dir: &Path, name: &str, server: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server}', certificate-authority: {d}/ca.crt}}}}]\nusers: [{{name: u, user: {{client-certificate: {d}/admin.crt, client-key: {d}/admin.key}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            d = dir.display()
        ),
    )
    .expect("kubeconfig");
    p
}

/// Forwards connections to 127.0.0.1:PORT inside a test namespace to
/// `upstream` (127.0.0.1 in the root namespace): the listener was bound by a
/// thread that entered the namespace; the upstream connections are made by
/// threads that never left the root namespace. Stopped (and every relayed
/// connection shut down) on drop.
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(netns: &str, upstream: SocketAddr) -> Self {
        let listener = in_netns(netns, || {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .expect("relay listener inside the namespace");
        let port = listener.local_addr().expect("relay addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let pair = [
                            down.try_clone().expect("clone"),
                            up.try_clone().expect("clone"),
                        ];
                        c.lock().expect("lock").extend(pair);
                        pipe(
                            down.try_clone().expect("clone"),
                            up.try_clone().expect("clone"),
                        );
                        pipe(up, down);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            port,
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().expect("lock").iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Deletes the namespaces `nbkq-<pid>-…` of a run that was killed (its pid
/// no longer runs): processes die with the test (PR_SET_PDEATHSIG), the
/// namespaces do not.
fn sweep_leftovers() {
    for name in netboot_harness::netns::list("nbkq-") {
        let Some(pid) = name
            .strip_prefix("nbkq-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            println!("removed the leftover namespace {name}");
        }
    }
}

/// `ip netns exec NS PROGRAM ARGS…`, stdout as text; panics on failure.
fn in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<&Path>) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    if let Some(p) = stdin {
        c.stdin(std::fs::File::open(p).expect("stdin file"));
    }
    let out = c.output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "netns {ns}: {program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

// ---------------------------------------------------------------------------
// The two modes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// The rules as the namespace holds them, printed by the mode's tool.
    fn dump(self, ns: &str) -> String {
        match self {
            // Without the "# Generated … on <date>" lines.
            Self::Iptables => in_ns(ns, "iptables-nft-save", &[], None)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect(),
            Self::Nftables => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "list",
                    "table",
                    "ip",
                    "kube-proxy",
                ]);
                let out = c.output().expect("nft");
                // No table yet: kube-proxy has not synced.
                String::from_utf8(out.stdout).expect("utf-8")
            }
        }
    }

    /// How many Services the dump sends somewhere.
    fn services_in(self, dump: &str) -> usize {
        match self {
            Self::Iptables => dump
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains("-j KUBE-SVC-"))
                .count(),
            Self::Nftables => dump.matches(": goto service-").count(),
        }
    }

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

/// kubeadm's kube-proxy config.conf (tests/cluster/manifests/kubeadm/
/// 20-kube-proxy.yaml) with the bench's pod CIDR, the mode, podnet's one
/// change (`conntrack.maxPerCore: 0`: the global conntrack table size is the
/// initial namespace's) and the test's kubeconfig.
fn proxy_config(mode: Mode, kubeconfig: &Path) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  kubeconfig: {kc}
clusterCIDR: {POD_CIDR}
conntrack:
  maxPerCore: 0
  min: null
  tcpBeLiberal: false
  udpStreamTimeout: 0s
  udpTimeout: 0s
healthzBindAddress: \"\"
metricsBindAddress: \"\"
mode: {mode}
nodePortAddresses: null
hostnameOverride: {NODE}
",
        kc = kubeconfig.display(),
        mode = mode.name()
    )
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
// The API server and the workload

struct ControlPlane {
    _etcd: ChildGuard,
    _api: ChildGuard,
    api_port: u16,
    client: kube::Client,
    bin_proxy: PathBuf,
    /// Services already created (the workload grows from one size to the next).
    created: u32,
}

async fn start_control_plane(dir: &Path) -> ControlPlane {
    let etcd = cached("etcd", "etcd");
    let apiserver = cached("k8s", "kube-apiserver");
    let bin_proxy = cached("k8s", "kube-proxy");
    pki(dir);
    let ports = free_ports(3);
    let (ec, ep, ap) = (ports[0], ports[1], ports[2]);
    let mut c = Command::new(&etcd);
    c.args(["--name", "nbkq", "--data-dir"])
        .arg(dir.join("etcd"))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{ec}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{ec}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{ep}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{ep}"
        ))
        .arg(format!("--initial-cluster=nbkq=http://127.0.0.1:{ep}"))
        .arg("--unsafe-no-fsync")
        .arg("--quota-backend-bytes=8589934592");
    let etcd = spawn_logged(c, &dir.join("etcd.log"));
    let mut c = Command::new(&apiserver);
    c.arg(format!("--etcd-servers=http://127.0.0.1:{ec}"))
        .args(["--bind-address=127.0.0.1", "--advertise-address=192.0.2.10"])
        .arg(format!("--secure-port={ap}"))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .args([
            "--authorization-mode=RBAC",
            "--endpoint-reconciler-type=none",
            "--max-requests-inflight=800",
            "--max-mutating-requests-inflight=400",
        ])
        .arg(format!("--client-ca-file={}/ca.crt", dir.display()))
        .arg(format!("--tls-cert-file={}/apiserver.crt", dir.display()))
        .arg(format!(
            "--tls-private-key-file={}/apiserver.key",
            dir.display()
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}/sa.pub",
            dir.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}/sa.key",
            dir.display()
        ));
    let api = spawn_logged(c, &dir.join("apiserver.log"));
    let admin = kubeconfig(dir, "admin.conf", &format!("https://127.0.0.1:{ap}"));
    let kc = kube::config::Kubeconfig::read_from(&admin).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("client config");
    let client = kube::Client::try_from(cfg).expect("client");
    let t = Instant::now();
    loop {
        let ok = client
            .request_text(
                http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("request"),
            )
            .await
            .is_ok();
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "kube-apiserver not ready after 120 s: see {}/apiserver.log",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("control plane ready in {:?}", t.elapsed());
    ControlPlane {
        _etcd: etcd,
        _api: api,
        api_port: ap,
        client,
        bin_proxy,
        created: 0,
    }
}

impl ControlPlane {
    /// The namespace, the Node, and `default/kubernetes` out of 10.96.0.1's
    /// way (the API server re-creates it every few seconds; once
    /// `bench/svc-000000` holds 10.96.0.1 it cannot).
    async fn prepare(&self) {
        let ns: Api<Namespace> = Api::all(self.client.clone());
        ns.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .create(
                &PostParams::default(),
                &Node {
                    metadata: ObjectMeta {
                        name: Some(NODE.into()),
                        ..Default::default()
                    },
                    // kube-proxy waits 30 s for the node's IPs otherwise.
                    status: Some(NodeStatus {
                        addresses: Some(vec![NodeAddress {
                            type_: "InternalIP".into(),
                            address: NODE_IP.into(),
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .expect("node");
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let default: Api<Service> = Api::namespaced(self.client.clone(), "default");
        let w = Workload::new(1, B).expect("size");
        let first = w.services().remove(0);
        let t = Instant::now();
        loop {
            let _ = default.delete("kubernetes", &DeleteParams::default()).await;
            match svcs.create(&PostParams::default(), &first).await {
                Ok(_) => break,
                Err(e) => assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "bench/svc-000000 could not get 10.96.0.1 in 60 s: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Brings the API's objects to workload `w` (Services `created..n`
    /// created; the slice of a Service whose endpoints differ in `w`, i.e.
    /// the previously last one, replaced). Returns the time taken.
    async fn apply(&mut self, w: &Workload) -> Duration {
        let t = Instant::now();
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NAMESPACE);
        let services = w.services();
        let all_slices = w.slices(false);
        // svc-000000 exists since prepare().
        let from = self.created.max(1) as usize;
        futures::stream::iter(services.into_iter().skip(from))
            .map(|s| {
                let svcs = svcs.clone();
                async move { svcs.create(&PostParams::default(), &s).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .expect("create Services");
        if self.created > 0 {
            let i = self.created - 1;
            let name = format!("{}-bench", workload::service_name(i));
            let mut s = all_slices[i as usize].clone();
            let old = slices.get(&name).await.expect("slice");
            s.metadata.resource_version = old.metadata.resource_version;
            slices
                .replace(&name, &PostParams::default(), &s)
                .await
                .expect("replace slice");
        }
        futures::stream::iter(all_slices.into_iter().skip(self.created as usize))
            .map(|s| {
                let slices = slices.clone();
                async move { slices.create(&PostParams::default(), &s).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .expect("create EndpointSlices");
        self.created = w.n;
        t.elapsed()
    }
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

/// The `elapsed` of kube-proxy's first IPv4 "SyncProxyRules complete" line.
fn first_sync_elapsed(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("\"SyncProxyRules complete\"") && l.contains("ipFamily=\"IPv4\""))?;
    let v = line.split_once("elapsed=\"")?.1;
    Some(v.split('"').next()?.to_string())
}

fn run_kube_proxy(
    cp: &ControlPlane,
    dir: &Path,
    mode: Mode,
    w: &Workload,
) -> (String, Duration, Option<String>) {
    let ns = Scoped::create(&format!("nbkq-{}-kp", std::process::id())).expect("netns");
    let relay = Relay::start(&ns.name, SocketAddr::from(([127, 0, 0, 1], cp.api_port)));
    let kc = kubeconfig(
        dir,
        &format!("kube-proxy-{}.conf", mode.name()),
        &format!("https://127.0.0.1:{}", relay.port),
    );
    let cfg = dir.join(format!("kube-proxy-{}-{}.yaml", mode.name(), w.n));
    std::fs::write(&cfg, proxy_config(mode, &kc)).expect("config");
    let log = dir.join(format!("kube-proxy-{}-{}.log", mode.name(), w.n));
    let mut c = Command::new("ip");
    if std::env::var_os("NBKQ_TRACE").is_some() {
        // Debugging aid: wrappers in front of PATH record every nft /
        // iptables-restore input kube-proxy sends (trace-*.txt in the kept dir).
        let bin = dir.join("trace-bin");
        std::fs::create_dir_all(&bin).expect("trace dir");
        for tool in ["nft", "iptables-restore", "iptables-nft-restore"] {
            let real = Command::new("sh")
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
    c.args(["netns", "exec", &ns.name])
        .arg(&cp.bin_proxy)
        .arg(format!("--config={}", cfg.display()))
        .arg("--v=2");
    let t = Instant::now();
    let mut proxy = spawn_logged(c, &log);
    let limit = Duration::from_secs(600);
    let mut last = String::new();
    let synced = loop {
        if let Some(status) = proxy.0.try_wait().expect("wait") {
            panic!(
                "kube-proxy ({}) exited with {status}: see {}",
                mode.name(),
                log.display()
            );
        }
        let dump = mode.dump(&ns.name);
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
/// does; returns the namespace, its dump and the load time.
fn load_generated(
    dir: &Path,
    mode: Mode,
    w: &Workload,
    changed: bool,
    tag: &str,
) -> (Scoped, String, Duration) {
    let ns = Scoped::create(&format!("nbkq-{}-{tag}", std::process::id())).expect("netns");
    let t;
    match mode {
        Mode::Iptables => {
            let p = dir.join(format!("generated-{}-{changed}.rules", w.n));
            std::fs::write(&p, iptables_rules::full(w, changed)).expect("write");
            in_netns(&ns.name, || {
                kubeproxy_rules::ensure_nfacct_counter(kubeproxy_rules::INVALID_DROPPED_NFACCT)
            })
            .expect("nfacct counter");
            t = Instant::now();
            in_ns(&ns.name, "iptables-nft-restore", &["-w", "5"], Some(&p));
        }
        Mode::Nftables => {
            let p = dir.join(format!("generated-{}-{changed}.nft", w.n));
            std::fs::write(&p, nft_rules::full_sync(w, changed)).expect("write");
            t = Instant::now();
            in_ns(&ns.name, "nft", &["-f", &p.display().to_string()], None);
        }
    }
    let took = t.elapsed();
    let dump = mode.dump(&ns.name);
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
    let (fresh_ns, fresh, _) = load_generated(dir, mode, w, true, "gen2");
    drop(fresh_ns);
    apply_change(dir, ns, mode, w, true);
    let (a, b) = (mode.normalize(&mode.dump(&ns.name)), mode.normalize(&fresh));
    if a != b {
        problems.push(format!(
            "the bench's endpoint change applied to the full ruleset is not the full ruleset with the change:\n{}",
            diff(&b, &a, 60)
        ));
    }
    apply_change(dir, ns, mode, w, false);
    let (a, b) = (
        mode.normalize(&mode.dump(&ns.name)),
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

fn compare(cp: &ControlPlane, dir: &Path, mode: Mode, w: &Workload) -> Outcome {
    let (real, proxy_sync, proxy_first_sync) = run_kube_proxy(cp, dir, mode, w);
    let (gen_ns, generated, generator_load) = load_generated(dir, mode, w, false, "gen");
    std::fs::write(dir.join(format!("real-{}-{}.txt", mode.name(), w.n)), &real).expect("w");
    std::fs::write(
        dir.join(format!("gen-{}-{}.txt", mode.name(), w.n)),
        &generated,
    )
    .expect("w");
    let (nr, ng) = (mode.normalize(&real), mode.normalize(&generated));
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    if nr != ng {
        problems.push(format!(
            "normalized rules differ (first differences):\n{}",
            diff(&ng, &nr, 120)
        ));
    }
    problems.extend(check_incremental(dir, &gen_ns, mode, w, &generated));
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

#[test]
fn generators_match_the_real_kube_proxy() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "generators_match_kube_proxy: must run as root (network namespaces, iptables/nft inside them); euid is {euid}"
    );
    let full = std::env::var("NETBOOT_FULL").is_ok_and(|v| v == "1");
    let sizes: Vec<u32> = if full {
        vec![1_000, 10_000]
    } else {
        vec![1_000]
    };
    if !full {
        println!(
            "\n!!! generators_match_kube_proxy: N = 10,000 NOT RUN (only N = 1,000); \
             NETBOOT_FULL=1 runs it too !!!\n"
        );
    }
    sweep_leftovers();
    let dir = tempfile::Builder::new()
        .prefix("nbkq-")
        .tempdir()
        .expect("tempdir");
    let keep = std::env::var_os("NBKQ_KEEP").is_some();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut cp = rt.block_on(start_control_plane(dir.path()));
    rt.block_on(cp.prepare());
    let mut outcomes = Vec::new();
    for n in sizes {
        let w = Workload::new(n, B).expect("size");
        let took = rt.block_on(cp.apply(&w));
        println!(
            "N = {n}: {} Services + {} EndpointSlices in the API in {took:?}",
            n, n
        );
        for mode in [Mode::Iptables, Mode::Nftables] {
            let o = compare(&cp, dir.path(), mode, &w);
            println!(
                "N = {n} {}: kube-proxy start → synced (two equal dumps 2 s apart) {:.1?}, its first sync took {}; generator's rules loaded ({}) in {:.1?}: {}",
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
                .map(|m| format!("== N = {} {}: {m}", o.n, o.mode.name()))
        })
        .collect();
    drop(cp);
    assert!(
        failures.is_empty(),
        "the generators differ from the real kube-proxy:\n{}",
        failures.join("\n\n")
    );
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
