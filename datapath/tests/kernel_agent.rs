//! Privileged: runs the real `netboot-datapath agent` binary (static
//! Services instead of an API server), kills it with SIGKILL and restarts it
//! repeatedly while a client in the test cgroup opens connections
//! continuously: not one connection may fail. Also checks the CLI and HTTP
//! endpoints against the live pins.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_agent`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::net::SocketAddrV4;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

const STATIC: &str = WEB_AND_DNS;

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().expect("run cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn agent_kill9_and_restart_drop_no_connection() {
    require_privileges();
    let topo = Topology::new("agent", 2);
    let _servers = Servers::start(
        &topo.server,
        &[("be1", backend_ip(1), 8080), ("be2", backend_ip(2), 8080)],
    );
    let cg = TestCgroup::new("agent");
    let pins = TestPins::new("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nsessionAffinityTimeoutSeconds: 10800\nmapSizes: {services: 4096, backends: 4096, affinity: 4096, reverseNat: 4096}\ncleanupKubeProxyRules: true\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), STATIC).expect("static");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pin_root = pins.pins.root().to_path_buf();

    let mut agent = start_agent_confined(
        std::path::Path::new(BIN),
        dir.path(),
        &cg.path,
        &pin_root,
        &listen,
        &topo.client,
    );
    let first_ready = wait_ready(&listen, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(agent.pid);

    // Status, metrics and the map-reading CLI against the live datapath.
    let (ok, js) = cli(&["status", "--agent", &listen, "-o", "json"]);
    assert!(ok, "status exit: {js}");
    let st: serde_json::Value = serde_json::from_str(&js).expect("status json");
    assert_eq!(st["kubeProxyReplacement"], true);
    assert_eq!(st["ready"], true);
    assert_eq!(st["services"], 2);
    assert_eq!(st["backends"], 3);
    // connect, sendmsg, recvmsg, getpeername for AF_INET and AF_INET6.
    assert_eq!(st["links"].as_array().map(Vec::len), Some(8));
    let link_ids: Vec<u64> = st["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| l["link_id"].as_u64().unwrap_or(0))
        .collect();
    let (_, text) = cli(&["status", "--agent", &listen, "--verbose"]);
    assert!(
        text.starts_with("KubeProxyReplacement:   True   [Socket LB on cgroup"),
        "{text}"
    );
    let (ok, text) = cli(&["status", "--bpffs", pin_root.to_str().expect("utf8")]);
    assert!(ok && text.contains("2 frontends, 3 backends"), "{text}");
    assert!(
        text.contains(&format!("Socket LB on cgroup {}", cg.path.display())),
        "{text}"
    );
    let (ok, text) = cli(&[
        "service",
        "list",
        "--bpffs",
        pin_root.to_str().expect("utf8"),
    ]);
    assert!(
        ok && text.contains("10.96.0.80:80/TCP") && text.contains("10.244.1.2:8080/TCP (active)"),
        "{text}"
    );
    let (ok, text) = cli(&[
        "bpf",
        "lb",
        "list",
        "--bpffs",
        pin_root.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    assert!(ok, "{text}");
    let rows: serde_json::Value = serde_json::from_str(&text).expect("lb json");
    assert_eq!(rows.as_array().map(Vec::len), Some(5));
    let (code, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("netboot_datapath_services 2"), "{metrics}");
    assert!(metrics.contains("netboot_datapath_bpf_outcomes_total{outcome=\"connect_translated\"}"));
    assert_eq!(http_get(&listen, "/healthz").map(|r| r.0), Some(200));

    // Continuous client while the agent is SIGKILLed and restarted.
    let addr = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 80), 80);
    let client = spawn_client(
        &cg.path,
        &topo.client,
        &ClientOp::TcpLoop {
            addr,
            duration_ms: 7000,
            interval_ms: 3,
        },
    );
    let mut restarts = 0;
    let mut ready_after_restart = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(5500) {
        std::thread::sleep(Duration::from_millis(400));
        // SAFETY: plain kill(2) on the pid of the child we spawned.
        unsafe { libc::kill(agent.pid as i32, libc::SIGKILL) };
        let _ = agent.guard.0.as_mut().map(|c| c.wait());
        std::thread::sleep(Duration::from_millis(300)); // no agent at all for a while
        agent = start_agent_confined(
            std::path::Path::new(BIN),
            dir.path(),
            &cg.path,
            &pin_root,
            &listen,
            &topo.client,
        );
        ready_after_restart.push(wait_ready(&listen, Duration::from_secs(20)));
        restarts += 1;
    }
    let res = client_results(client);
    let failed: Vec<_> = res.iter().filter(|a| !a.ok).collect();
    let spread = res.iter().filter(|a| a.name == "be2").count();
    println!(
        "NUMBERS agent restart: {restarts} SIGKILL+restart cycles, {} connections tried, {} failed; first ready {:?}, ready after restart {:?}; agent RSS {} KiB",
        res.len(),
        failed.len(),
        first_ready,
        ready_after_restart,
        rss
    );
    assert!(res.len() > 200, "too few attempts: {}", res.len());
    assert!(
        failed.is_empty(),
        "failed attempts: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(spread > 0 && spread < res.len());

    // Restarted agents re-used the pins: same links (program swapped in place), no rewrite.
    let (_, js) = cli(&["status", "--agent", &listen, "-o", "json"]);
    let st: serde_json::Value = serde_json::from_str(&js).expect("status json");
    let ids: Vec<u64> = st["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| l["link_id"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        ids, link_ids,
        "links must be updated in place, not recreated"
    );
    assert_eq!(st["mapsReused"], true);
    assert_eq!(
        st["mapWrites"], 0,
        "a restart must not rewrite unchanged maps"
    );

    // UDP through the restarted agent's datapath, reply from the VIP.
    let udp = client_results(spawn_client(
        &cg.path,
        &topo.client,
        &ClientOp::Udp {
            addr: SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 10), 53),
            count: 2,
        },
    ));
    assert!(
        udp.iter().all(|a| a.ok && a.peer == "10.96.0.10:53"),
        "{udp:?}"
    );
    drop(agent);
}

#[test]
fn agent_dials_api_server_from_config_never_the_kubeconfig_server() {
    // Why: an agent that dials the kubernetes ClusterIP hangs once kube-proxy is gone.
    require_privileges();
    let ns = Netns::new("nbt-dp-api");
    let cg = TestCgroup::new("api");
    let pins = TestPins::new("api");
    let dir = tempfile::tempdir().expect("tempdir");
    let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake api");
    let api_port = api.local_addr().expect("addr").port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("apiServer: {{host: 127.0.0.1, port: {api_port}}}\nkubeProxyReplacement: true\n"),
    )
    .expect("config");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://10.96.0.1:443', insecure-skip-tls-verify: true}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .expect("kubeconfig");
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BIN)
        .args(["agent", "--node-name", "n", "--listen", &listen])
        .arg("--config")
        .arg(dir.path().join("config.yaml"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--bpffs")
        .arg(pins.pins.root())
        .arg("--rules-netns")
        .arg(ns.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let _agent = ChildGuard(Some(child));

    api.set_nonblocking(true).expect("nonblocking");
    let t = Instant::now();
    let mut dialed = false;
    while t.elapsed() < Duration::from_secs(15) {
        if let Ok((mut s, _)) = api.accept() {
            use std::io::Read;
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut hello = [0u8; 5];
            // A TLS ClientHello starts with record type 0x16.
            if s.read_exact(&mut hello).is_ok() && hello[0] == 0x16 {
                dialed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dialed, "the agent never dialed apiServer from config.yaml");
    // No complete list from the API: never ready. The lists are begun
    // beside the datapath install and the HTTP endpoints come up after it,
    // so the dial can come first (by ~1 s on a loaded two-core machine).
    let t = Instant::now();
    while http_get(&listen, "/healthz").is_none() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http_get(&listen, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(&listen, "/healthz").map(|r| r.0), Some(200));
}
