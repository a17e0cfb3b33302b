//! Privileged: the real agent under pressure. Its HTTP endpoint flooded and
//! slow-lorised (bounded loops, 127.0.0.1 only) while Service traffic goes
//! through its socket LB; and tiny real maps that cannot hold every Service.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_agent_limits`
//! Network: clients and servers only in `nbag-*` namespaces created here
//! (veth between them, no route out); attacks only against 127.0.0.1.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

fn start_agent(
    dir: &Path,
    cg: &Path,
    pins: &Path,
    rules_ns: &Netns,
    extra: &[&str],
) -> (ChildGuard, u32) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("log");
    let child = Command::new(BIN)
        .args(["agent", "--node-name", "test-node"])
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--cgroup")
        .arg(cg)
        .arg("--bpffs")
        .arg(pins)
        .arg("--static-services")
        .arg(dir.join("static.yaml"))
        .arg("--rules-netns")
        .arg(rules_ns.path())
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .env_remove("NETBOOT_METRICS_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn agent");
    let pid = child.id();
    (ChildGuard(Some(child)), pid)
}

/// Half a request, then one header byte per second until `stop` or the server closes.
/// Returns how long the server kept the connection.
fn slowloris(addr: &str, stop: &AtomicBool) -> Option<Duration> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .ok()?;
    let mut b = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(b"a").is_err() {
            return Some(t.elapsed());
        }
        match s.read(&mut b) {
            Ok(_) => return Some(t.elapsed()), // EOF or an error response
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t.elapsed()),
        }
    }
    None
}

/// One oversized request: 64 KiB of headers, then a 16 MiB body, as far as the server takes it.
fn oversized(addr: &str) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
    else {
        return;
    };
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut req = String::from("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\n");
    for i in 0..1024 {
        req.push_str(&format!("X-Pad-{i}: {}\r\n", "p".repeat(56)));
    }
    req.push_str("\r\n");
    let _ = s.write_all(req.as_bytes());
    let chunk = vec![b'x'; 65536];
    for _ in 0..256 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut b = [0u8; 256];
    let _ = s.read(&mut b);
}

#[test]
fn endpoint_flood_and_slowloris_keep_health_traffic_and_memory_bounded() {
    // Why: the endpoint had no timeouts, caps or limits: any pod could pin it and
    // push the agent past its memory limit.
    require_privileges();
    let topo = Topology::new("nbag-fl", 2);
    let _servers = Servers::start(
        &topo.server,
        &[("be1", backend_ip(1), 8080), ("be2", backend_ip(2), 8080)],
    );
    let cg = TestCgroup::new("nbag-flood");
    let pins = TestPins::new("nbag-flood");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nmapSizes: {services: 1024, backends: 1024, affinity: 1024, reverseNat: 1024}\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), WEB).expect("static");
    let ports = free_ports(2);
    let health = format!("127.0.0.1:{}", ports[0]);
    let metrics = format!("127.0.0.1:{}", ports[1]);
    let (_agent, pid) = start_agent(
        dir.path(),
        &cg.path,
        pins.pins.root(),
        &topo.client,
        &["--listen", &health, "--metrics-listen", &metrics],
    );
    wait_ready(&health, Duration::from_secs(20));
    // The metrics listener serves /metrics and nothing else.
    assert_eq!(http_get(&metrics, "/metrics").map(|r| r.0), Some(200));
    assert_eq!(http_get(&metrics, "/v1/status").map(|r| r.0), Some(404));
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid);

    const ATTACK: Duration = Duration::from_secs(9);
    let client = spawn_client(
        &cg.path,
        &topo.client,
        &ClientOp::TcpLoop {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 80), 80),
            duration_ms: ATTACK.as_millis() as u64 + 3000,
            interval_ms: 5,
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // 4 flooders: oversized requests and plain /metrics as fast as they go,
    // alone for 3 s (header and body limits), then beside the slow-loris.
    let floods = Arc::new(AtomicU64::new(0));
    for i in 0..4 {
        let (addr, stop, floods) = (metrics.clone(), stop.clone(), floods.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if i % 2 == 0 {
                    oversized(&addr);
                } else {
                    let _ = http_get(&addr, "/metrics");
                }
                floods.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut peak_flood_only = rss_before;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        peak_flood_only = peak_flood_only.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let flood_only = floods.load(Ordering::Relaxed);
    // 400 slow-loris connections on the metrics port (any pod reaches it), 20 on
    // the loopback health port (only host-network processes reach it: fewer
    // than its cap, which a local attacker could exhaust, see datapath/README.md).
    let held_metrics: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
    let held_health: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
    for (addr, n, held) in [
        (metrics.clone(), 400, held_metrics.clone()),
        (health.clone(), 20, held_health.clone()),
    ] {
        for _ in 0..n {
            let (addr, stop, held) = (addr.clone(), stop.clone(), held.clone());
            threads.push(std::thread::spawn(move || {
                if let Some(d) = slowloris(&addr, &stop) {
                    held.lock().unwrap().push(d);
                }
            }));
        }
    }
    // Meanwhile: /readyz latency from a probe, and the agent's RSS.
    let t = Instant::now();
    let (mut probes, mut probe_fail, mut worst_probe, mut peak) =
        (0, 0, Duration::ZERO, rss_before);
    while t.elapsed() < ATTACK {
        peak = peak.max(rss_kib(pid));
        let p = Instant::now();
        let ok = matches!(http_get(&health, "/readyz"), Some((200, _)));
        worst_probe = worst_probe.max(p.elapsed());
        probes += 1;
        probe_fail += u32::from(!ok);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let res = client_results(client);
    let failed = res.iter().filter(|a| !a.ok).count();
    let mut held_m = held_metrics.lock().unwrap().clone();
    let mut held_h = held_health.lock().unwrap().clone();
    held_m.sort();
    held_h.sort();
    println!(
        "NUMBERS flood: {flood_only} oversized+plain requests alone in 3 s (peak RSS {peak_flood_only} KiB), {} in all; slow-loris closed by the agent: metrics port {} of 400 \
         (held {:?}..{:?} from connect, queued ones included), health port {} of 20 (held {:?}..{:?}); \
         /readyz {probes} probes, {probe_fail} failed, worst {worst_probe:?}; \
         agent RSS {rss_before} KiB before, peak {peak} KiB; \
         Service traffic {} connections, {failed} failed",
        floods.load(Ordering::Relaxed),
        held_m.len(),
        held_m.first().copied().unwrap_or_default(),
        held_m.last().copied().unwrap_or_default(),
        held_h.len(),
        held_h.first().copied().unwrap_or_default(),
        held_h.last().copied().unwrap_or_default(),
        res.len()
    );
    assert!(res.len() > 300, "too few connections: {}", res.len());
    assert_eq!(failed, 0, "Service traffic failed during the attack");
    assert_eq!(probe_fail, 0, "/readyz failed during the attack");
    assert!(
        worst_probe < Duration::from_secs(6),
        "worst /readyz {worst_probe:?}"
    );
    let peak = peak.max(peak_flood_only);
    assert!(flood_only > 100, "flood too slow: {flood_only}");
    assert!(
        peak <= rss_before + 24 * 1024,
        "agent RSS grew from {rss_before} KiB to {peak} KiB"
    );
    // Slow-loris connections are cut at the header read timeout (5 s): every
    // one on the health port, and the metrics port's first waves (32 at a time).
    assert_eq!(held_h.len(), 20, "{held_h:?}");
    assert!(
        held_h
            .iter()
            .all(|d| *d > Duration::from_millis(4500) && *d < Duration::from_secs(7)),
        "{held_h:?}"
    );
    assert!(
        held_m.len() >= 32,
        "only {} slow connections closed",
        held_m.len()
    );
    assert!(
        held_m[0] > Duration::from_millis(4500) && held_m[0] < Duration::from_secs(7),
        "{held_m:?}"
    );
    assert_eq!(http_get(&health, "/healthz").map(|r| r.0), Some(200));
}

/// `n` Services 10.96.1.1..=n, port 80, one endpoint each (all the same backend).
fn many_services(n: u8) -> String {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(format!(
            "kind: Service\nmetadata: {{name: s{i}, namespace: d}}\nspec:\n  clusterIP: 10.96.1.{i}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: d, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [10.244.1.1], conditions: {{ready: true}}}}\n"
        ));
    }
    out.join("---\n")
}

#[test]
fn tiny_maps_report_map_full_program_the_rest_and_resize_live_or_refuse() {
    // Why: a full map wedged the agent while /readyz said ready; a mapSizes change
    // for pinned maps was silently ignored.
    require_privileges();
    let topo = Topology::new("nbag-mf", 1);
    let _servers = Servers::start(&topo.server, &[("be1", backend_ip(1), 8080)]);
    let cg = TestCgroup::new("nbag-mapfull");
    let pins = TestPins::new("nbag-mapfull");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |services: u32| {
        std::fs::write(
            dir.path().join("config.yaml"),
            format!("apiServer: {{host: 127.0.0.1, port: 6443}}\nmapSizes: {{services: {services}, backends: 16, affinity: 16, reverseNat: 16}}\n"),
        )
        .expect("config");
    };
    config(16);
    // 10 Services need 20 nb_lb4_svc entries (slot 0 + one slot each): 8 fit.
    std::fs::write(dir.path().join("static.yaml"), many_services(10)).expect("static");
    let health = format!("127.0.0.1:{}", free_port());
    let (agent, _) = start_agent(
        dir.path(),
        &cg.path,
        pins.pins.root(),
        &topo.client,
        &["--listen", &health],
    );
    let t = Instant::now();
    let st = loop {
        let st: serde_json::Value = http_get(&health, "/v1/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        if st["synced"] == true || t.elapsed() > Duration::from_secs(20) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["synced"], true, "{st}");
    assert_eq!(st["ready"], false, "{st}");
    assert_eq!(st["services"], 8, "{st}");
    assert_eq!(st["unprogrammedFrontends"], 2, "{st}");
    assert_eq!(st["conditions"][0]["type"], "MapFull");
    assert_eq!(st["conditions"][0]["status"], "True");
    let (code, body) = http_get(&health, "/readyz").expect("readyz");
    assert_eq!(code, 503);
    assert!(
        body.contains("maps full: 2 frontends") && body.contains("nb_lb4_svc"),
        "{body}"
    );
    let (_, m) = http_get(&health, "/metrics").expect("metrics");
    assert!(m.contains("\nnetboot_datapath_map_full 1\n"), "{m}");
    assert!(
        m.contains("netboot_datapath_unprogrammed{kind=\"frontend\"} 2"),
        "{m}"
    );
    let out = Command::new(BIN)
        .args(["status", "--agent", &health])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("Map pressure:           MapFull: 2 frontends, 0 backends not programmed"),
        "{text}"
    );
    // What fits carries traffic.
    let res = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 1), 80),
            count: 5,
        },
    );
    assert!(res.iter().all(|a| a.ok && a.name == "be1"), "{res:?}");
    drop(agent);

    let synced = |health: &str| {
        let t = Instant::now();
        loop {
            let st: serde_json::Value = http_get(health, "/v1/status")
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or_default();
            if st["synced"] == true || t.elapsed() > Duration::from_secs(20) {
                break st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // A restart asking for bigger maps: applied live (upgrade.rs), every
    // Service programmed, the pressure gone.
    config(64);
    let (agent, _) = start_agent(
        dir.path(),
        &cg.path,
        pins.pins.root(),
        &topo.client,
        &["--listen", &health],
    );
    let st = synced(&health);
    assert!(
        st["layoutUpgrade"].as_str().is_some_and(
            |u| u.contains("resized nb_lb4_svc: pinned with 16 entries, mapSizes asks 64")
        ),
        "{st}"
    );
    assert!(
        st.get("mapSizeChanges")
            .is_none_or(|c| c.as_array().is_none_or(Vec::is_empty)),
        "{st}"
    );
    assert_eq!(st["services"], 10, "{st}");
    assert_eq!(st["ready"], true, "{st}");
    let info = aya::maps::MapInfo::from_pin(pins.pins.map("nb_lb4_svc")).expect("svc");
    assert_eq!(info.max_entries(), 64);
    drop(agent);

    // Back to 16, with 20 entries in use: they do not fit, so the change is
    // refused, said everywhere, and the maps are kept as they are.
    config(16);
    let (agent, _) = start_agent(
        dir.path(),
        &cg.path,
        pins.pins.root(),
        &topo.client,
        &["--listen", &health],
    );
    let st = synced(&health);
    assert_eq!(st["mapSizeChanges"][0]["map"], "nb_lb4_svc", "{st}");
    assert_eq!(st["mapSizeChanges"][0]["pinned"], 64, "{st}");
    assert_eq!(st["mapSizeChanges"][0]["configured"], 16, "{st}");
    assert_eq!(st["conditions"][1]["type"], "MapSizeChangeRefused");
    assert_eq!(st["conditions"][1]["status"], "True");
    assert_eq!(st["services"], 10, "{st}");
    let (_, m) = http_get(&health, "/metrics").expect("metrics");
    // `mapSizes.services` sizes both service maps: lb4 and lb6 each refuse.
    assert_eq!(st["mapSizeChanges"][1]["map"], "nb_lb6_svc", "{st}");
    assert!(
        m.contains("\nnetboot_datapath_map_size_change_refused 2\n"),
        "{m}"
    );
    drop(agent);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(log.contains("mapSizes change refused"), "{log}");
    assert!(log.contains("MapFull"), "{log}");
}
