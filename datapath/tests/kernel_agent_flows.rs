//! Privileged: the real agent (static Services) serves flow events:
//! `netboot-datapath monitor -o json` shows a connect to a ClusterIP within
//! 1 s, named with its Service and backend pod; events are on only while a
//! watcher is attached; `monitor` says clearly when no agent answers.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_agent_flows`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

const STATIC: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.80
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1], conditions: {ready: true}, targetRef: {kind: Pod, namespace: shop, name: web-7f9c}}
";

fn metric(listen: &str, name: &str) -> Option<u64> {
    let (_, body) = http_get(listen, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_metric(listen: &str, name: &str, want: u64, within: Duration) {
    let t = Instant::now();
    while t.elapsed() < within {
        if metric(listen, name) == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{name} not {want} within {within:?}: {:?}",
        metric(listen, name)
    );
}

#[test]
fn monitor_shows_a_connect_within_a_second_with_its_service() {
    require_privileges();
    let topo = Topology::new("aflw", 1);
    let _servers = Servers::start(&topo.server, &[("be1", backend_ip(1), 8080)]);
    let cg = TestCgroup::new("aflw");
    let pins = TestPins::new("aflw");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nmapSizes: {services: 1024, backends: 1024, affinity: 1024, reverseNat: 1024}\ncleanupKubeProxyRules: false\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), STATIC).expect("static");
    let listen = format!("127.0.0.1:{}", free_port());
    let agent = Command::new(BIN)
        .args(["agent", "--node-name", "test-node"])
        .arg("--config")
        .arg(dir.path().join("config.yaml"))
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--bpffs")
        .arg(pins.pins.root())
        .args(["--listen", &listen])
        .arg("--static-services")
        .arg(dir.path().join("static.yaml"))
        .arg("--rules-netns")
        .arg(topo.client.path())
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).expect("log"),
        ))
        .spawn()
        .expect("spawn agent");
    let _agent = ChildGuard(Some(agent));
    wait_ready(&listen, Duration::from_secs(20));
    assert_eq!(metric(&listen, "netboot_datapath_flow_watchers"), Some(0));

    // Unwatched: a connect emits nothing.
    let a = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new("10.96.0.80".parse().unwrap(), 80),
            count: 1,
        },
    );
    assert!(a[0].ok, "{a:?}");
    assert_eq!(
        metric(&listen, "netboot_datapath_flow_events_total"),
        Some(0)
    );

    let mon = Command::new(BIN)
        .args(["monitor", "--agent", &listen, "-o", "json", "-n", "1"])
        .args(["--service", "shop/web", "--verdict", "translated"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monitor");
    let mut mon = ChildGuard(Some(mon));
    let stdout = mon.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), l));
        }
    });
    wait_metric(
        &listen,
        "netboot_datapath_flow_watchers",
        1,
        Duration::from_secs(5),
    );

    let before = Instant::now();
    let a = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new("10.96.0.80".parse().unwrap(), 80),
            count: 1,
        },
    );
    let connected = Instant::now();
    assert!(a[0].ok, "{a:?}");
    let (at, line) = rx
        .recv_timeout(Duration::from_secs(3))
        .expect("monitor printed no flow within 3 s");
    let lag = at.saturating_duration_since(connected);
    eprintln!(
        "flow shown {:?} after the connect returned ({:?} after it started): {line}",
        lag,
        at - before
    );
    assert!(lag < Duration::from_secs(1), "flow shown after {lag:?}");
    let f: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(f["verdict"], "translated");
    assert_eq!(f["service"], "shop/web");
    assert_eq!(f["port_name"], "http");
    assert_eq!(f["frontend_ip"], "10.96.0.80");
    assert_eq!(f["frontend_port"], 80);
    assert_eq!(f["backend_ip"], "10.244.1.1");
    assert_eq!(f["backend_port"], 8080);
    assert_eq!(f["backend_pod"], "shop/web-7f9c");
    assert_eq!(f["proto"], "tcp");
    let out = mon
        .0
        .take()
        .unwrap()
        .wait_with_output()
        .expect("monitor exit");
    assert!(out.status.success(), "{out:?}");

    // The watcher left: events go off again (noticed at the next heartbeat).
    wait_metric(
        &listen,
        "netboot_datapath_flow_watchers",
        0,
        Duration::from_secs(10),
    );
    let emitted = metric(&listen, "netboot_datapath_flow_events_total").unwrap();
    assert_eq!(emitted, 1, "exactly the one watched connect");
    client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new("10.96.0.80".parse().unwrap(), 80),
            count: 2,
        },
    );
    assert_eq!(
        metric(&listen, "netboot_datapath_flow_events_total"),
        Some(1),
        "off again once unwatched"
    );

    // Bad filters answer 400; no agent: a clear error.
    let (code, body) = http_get(&listen, "/v1/flows?verdict=maybe").expect("get");
    assert_eq!(code, 400, "{body}");
    let out = Command::new(BIN)
        .args(["monitor", "--agent", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("monitor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the netboot-datapath agent"),
        "{err}"
    );
}
