//! Privileged: live upgrades of the pinned maps under load (issue 18), with
//! the real agents.
//!
//! A client in the test cgroup keeps long-lived TCP connections and a
//! connected UDP socket open through ClusterIPs, and opens new TCP and UDP
//! flows every few milliseconds, while the agent is replaced:
//! - by the agent of the previous layout (3, u16 service ids; built from
//!   this repository's history by `tests/previous-agent`) → this build;
//! - this build over maps marked with a newer layout (a downgrade: the maps
//!   of a layout this build does not know, copied where unchanged);
//! - this build with a bigger `mapSizes.services` (a resize).
//!
//! Not one new flow may fail and not one long-lived one may break; the
//! frontends keep their service ids.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_upgrade`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netboot_datapath::layout::LAYOUT_VERSION;
use netboot_datapath::pins::Pins;
use netboot_harness::netns;
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 80), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const ECHO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 81), 7);
const ECHO_PORT: u16 = 7007;
/// Services beside the three used, so the maps hold more than a handful.
const FILLER: u32 = 300;

/// The agent of layout 3, built by `tests/previous-agent` (or named by
/// `NETBOOT_PREVIOUS_AGENT`, as tests/run does).
fn previous_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("NETBOOT_PREVIOUS_AGENT") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/previous-agent");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "tests/previous-agent could not build the layout-3 agent: this test needs it"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn static_services() -> String {
    let mut s = String::from(WEB_AND_DNS);
    s.push_str(
        "---
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.81
  ports: [{name: echo, port: 7, targetPort: 7007}]
---
kind: EndpointSlice
metadata: {name: echo-1, namespace: default, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: echo, port: 7007, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1]}
",
    );
    for i in 0..FILLER {
        s.push_str(&format!(
            "---
kind: Service
metadata: {{name: filler-{i}, namespace: default}}
spec:
  clusterIP: 10.97.{}.{}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
kind: EndpointSlice
metadata: {{name: filler-{i}-1, namespace: default, labels: {{kubernetes.io/service-name: filler-{i}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: [10.244.1.{}], conditions: {{ready: true}}}}
",
            i / 250,
            i % 250 + 1,
            i % 2 + 1
        ));
    }
    s
}

fn config(services: u32) -> String {
    format!(
        "apiServer: {{host: 127.0.0.1, port: 6443}}\nkubeProxyReplacement: true\nmapSizes: {{services: {services}, backends: 4096, affinity: 4096, reverseNat: 4096}}\ncleanupKubeProxyRules: true\n"
    )
}

/// TCP echo servers (connections kept open) in the server namespace.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = ns.path();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            netns::enter_thread(&f).expect("setns");
            let l = TcpListener::bind((backend_ip(1), ECHO_PORT)).expect("bind echo");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let stop3 = stop2.clone();
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut b = [0u8; 256];
                            while !stop3.load(Ordering::Relaxed) {
                                match s.read(&mut b) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if s.write_all(&b[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("echo server did not start");
        Self { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// SIGTERM, as a DaemonSet rollout does, and wait.
fn stop(mut a: Agent) {
    // SAFETY: kill(2) on the pid of the child this test spawned.
    unsafe { libc::kill(a.pid as i32, libc::SIGTERM) };
    if let Some(c) = a.guard.0.as_mut() {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for `/readyz`; fails with the agent log if it does not come.
fn ready_or_log(s: &Setup, what: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Some((200, _)) = http_get(&s.listen, "/readyz") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = std::fs::read_to_string(s.dir.path().join("agent.log")).unwrap_or_default();
    panic!("{what}: the agent did not get ready within 20 s; its log:\n{log}");
}

fn status(listen: &str) -> serde_json::Value {
    http_get(listen, "/v1/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

/// Frontend → service id, from the pinned maps, as `bin`'s `service list`
/// reads them (the layout-3 binary has the same output contract).
fn service_ids_by(bin: &Path, pins: &Path) -> BTreeMap<String, u64> {
    let out = Command::new(bin)
        .args(["service", "list", "--bpffs"])
        .arg(pins)
        .args(["-o", "json"])
        .output()
        .expect("service list");
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["frontend"].as_str().unwrap_or_default().to_string(),
                r["id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// [`service_ids_by`] this build.
fn service_ids(pins: &Path) -> BTreeMap<String, u64> {
    service_ids_by(Path::new(BIN), pins)
}

/// The load of one upgrade: long-lived flows plus new TCP and UDP flows.
struct Load {
    hold: ChildGuard,
    tcp: ChildGuard,
    udp: ChildGuard,
}

fn start_load(cg: &Path, client: &Netns, ms: u64) -> Load {
    let mut hold = spawn_client(
        cg,
        client,
        &ClientOp::Hold {
            echo: ECHO,
            conns: 8,
            udp: DNS,
            duration_ms: ms,
        },
    );
    // Wait until the long-lived flows are open.
    let out = hold
        .0
        .as_mut()
        .and_then(|c| c.stdout.as_mut())
        .expect("stdout");
    // Byte by byte: what follows (the result line) stays for client_results.
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !seen.ends_with(b"NBT-READY\n") {
        out.read_exact(&mut b)
            .expect("the long-lived flows did not open");
        seen.push(b[0]);
    }
    let tcp = spawn_client(
        cg,
        client,
        &ClientOp::TcpLoop {
            addr: WEB,
            duration_ms: ms,
            interval_ms: 2,
        },
    );
    let udp = spawn_client(
        cg,
        client,
        &ClientOp::UdpLoop {
            addr: DNS,
            duration_ms: ms,
            interval_ms: 2,
        },
    );
    Load { hold, tcp, udp }
}

/// Asserts the load saw no failure; returns (new TCP, new UDP, echoes).
fn check_load(load: Load, what: &str) -> (usize, usize, usize) {
    let tcp = client_results(load.tcp);
    let udp = client_results(load.udp);
    let hold = client_results(load.hold);
    let bad_tcp: Vec<&Attempt> = tcp.iter().filter(|a| !a.ok).collect();
    let bad_udp: Vec<&Attempt> = udp.iter().filter(|a| !a.ok).collect();
    // An unconnected socket's reply must come from the VIP (recvmsg4's
    // reverse translation; a resolver drops a reply from elsewhere).
    let wrong_src: Vec<&Attempt> = udp
        .iter()
        .filter(|a| a.ok && a.peer != DNS.to_string())
        .collect();
    let bad_hold: Vec<&Attempt> = hold
        .iter()
        .filter(|a| !a.ok || (a.name != "echo" && a.peer != DNS.to_string()))
        .collect();
    println!(
        "{what}: new TCP {} ({} failed), new UDP {} ({} failed, {} from a wrong source), long-lived rounds {} ({} failed)",
        tcp.len(),
        bad_tcp.len(),
        udp.len(),
        bad_udp.len(),
        wrong_src.len(),
        hold.len(),
        bad_hold.len()
    );
    assert!(
        tcp.len() > 100 && udp.len() > 100,
        "{what}: too little load"
    );
    assert!(
        bad_tcp.is_empty(),
        "{what}: new TCP flows failed: {bad_tcp:?}"
    );
    assert!(
        bad_udp.is_empty(),
        "{what}: new UDP flows failed: {bad_udp:?}"
    );
    assert!(
        wrong_src.is_empty(),
        "{what}: UDP replies not from the VIP: {wrong_src:?}"
    );
    assert!(
        bad_hold.is_empty(),
        "{what}: long-lived flows broke: {bad_hold:?}"
    );
    (tcp.len(), udp.len(), hold.len())
}

struct Setup {
    topo: Topology,
    _servers: Servers,
    _echo: Echo,
    cg: TestCgroup,
    pins: TestPins,
    dir: tempfile::TempDir,
    listen: String,
}

fn setup(tag: &str) -> Setup {
    require_privileges();
    let topo = Topology::new(tag, 2);
    let servers = Servers::start(
        &topo.server,
        &[("be1", backend_ip(1), 8080), ("be2", backend_ip(2), 8080)],
    );
    let echo = Echo::start(&topo.server);
    let cg = TestCgroup::new(tag);
    let pins = TestPins::new(tag);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.yaml"), config(4096)).expect("config");
    std::fs::write(dir.path().join("static.yaml"), static_services()).expect("static");
    let listen = format!("127.0.0.1:{}", free_port());
    Setup {
        topo,
        _servers: servers,
        _echo: echo,
        cg,
        pins,
        dir,
        listen,
    }
}

/// Replaces the running agent under load by `next` (with the config already
/// written); returns the new agent and its status.
fn replace_under_load(
    s: &Setup,
    old: Agent,
    next: &Path,
    what: &str,
) -> (Agent, serde_json::Value) {
    let load = start_load(&s.cg.path, &s.topo.client, 3500);
    std::thread::sleep(Duration::from_millis(700));
    stop(old);
    let t = Instant::now();
    let agent = start_agent_confined(
        next,
        s.dir.path(),
        &s.cg.path,
        s.pins.pins.root(),
        &s.listen,
        &s.topo.client,
    );
    ready_or_log(s, what);
    println!(
        "{what}: the new agent was ready {} ms after its start",
        t.elapsed().as_millis()
    );
    let st = status(&s.listen);
    check_load(load, what);
    (agent, st)
}

#[test]
fn an_agent_of_layout_3_is_upgraded_under_load_without_a_failed_flow() {
    let prev = previous_agent();
    let s = setup("nbup-3");
    let old = start_agent_confined(
        &prev,
        s.dir.path(),
        &s.cg.path,
        s.pins.pins.root(),
        &s.listen,
        &s.topo.client,
    );
    wait_ready(&s.listen, Duration::from_secs(20));
    assert_eq!(
        netboot_datapath::upgrade::pinned_version(&s.pins.pins),
        Some(3)
    );
    let ids_before = service_ids_by(&prev, s.pins.pins.root());
    assert_eq!(ids_before.len(), FILLER as usize + 3, "{ids_before:?}");

    let (agent, st) = replace_under_load(&s, old, Path::new(BIN), "layout 3 -> 4");
    let up = st["layoutUpgrade"].as_str().unwrap_or_default();
    assert!(up.contains("from layout 3 to layout 4"), "{st}");
    assert_eq!(
        netboot_datapath::upgrade::pinned_version(&s.pins.pins),
        Some(LAYOUT_VERSION)
    );
    // Every frontend kept its service id (reverse entries and affinity name it).
    assert_eq!(service_ids(s.pins.pins.root()), ids_before);
    assert!(!s.pins.pins.root().join("maps-next").exists());
    assert!(!s.pins.pins.root().join("maps-old").exists());
    assert_eq!(st["services"], FILLER + 3, "{st}");
    drop(agent);
}

#[test]
fn maps_of_a_newer_layout_and_a_map_resize_are_taken_over_under_load() {
    let s = setup("nbup-n");
    let agent = start_agent_confined(
        Path::new(BIN),
        s.dir.path(),
        &s.cg.path,
        s.pins.pins.root(),
        &s.listen,
        &s.topo.client,
    );
    wait_ready(&s.listen, Duration::from_secs(20));
    let ids = service_ids(s.pins.pins.root());
    // A downgrade: the maps say a newer layout wrote them (the running agent
    // writes nb_config only at its start).
    mark_layout(&s.pins.pins, LAYOUT_VERSION + 1);
    let (agent, st) = replace_under_load(&s, agent, Path::new(BIN), "newer layout -> this one");
    let up = st["layoutUpgrade"].as_str().unwrap_or_default();
    assert!(
        up.contains(&format!("from layout {}", LAYOUT_VERSION + 1)) && up.contains("0 maps copied"),
        "every map is unchanged, so shared: {st}"
    );
    assert_eq!(service_ids(s.pins.pins.root()), ids);

    // A resize of nb_lb4_svc / nb_lb6_svc: copied; the rest shared.
    std::fs::write(s.dir.path().join("config.yaml"), config(8192)).expect("config");
    let (agent, st) =
        replace_under_load(&s, agent, Path::new(BIN), "mapSizes.services 4096 -> 8192");
    let up = st["layoutUpgrade"].as_str().unwrap_or_default();
    assert!(
        up.contains("resized nb_lb4_svc") && up.contains("2 maps copied"),
        "{st}"
    );
    let info = aya::maps::MapInfo::from_pin(s.pins.pins.map("nb_lb4_svc")).expect("svc");
    assert_eq!(info.max_entries(), 8192);
    assert_eq!(service_ids(s.pins.pins.root()), ids);
    assert!(
        st["mapSizeChanges"].as_array().is_none_or(Vec::is_empty),
        "applied, not refused: {st}"
    );
    drop(agent);
}

/// Writes `version` into the pinned `nb_config` (what a newer build would
/// have left).
fn mark_layout(pins: &Pins, version: u32) {
    let mut maps = netboot_datapath::maps::kernel::KernelMaps::open(pins).expect("maps");
    let mut cfg = maps.config().expect("config");
    cfg.version = version;
    maps.set_config(cfg).expect("set config");
}
