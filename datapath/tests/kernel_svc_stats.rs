//! Privileged: the per-Service counters (`nb_svc_stats`, issue 19). Loads
//! the real programs, attaches them to a cgroup of its own, drives the
//! reconciler in process, and counts what clients in a netns of its own do;
//! then runs the real agent (static Services) to check `service list
//! --stats` and that `/metrics` has the labelled series only with
//! `serviceMetrics`. Namespaces `ss-*`, no route out.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_svc_stats`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{BackendState, DesiredTable, Frontend};
use netboot_datapath::layout::{L4Addr, SvcStats, PROTO_TCP, PROTO_UDP};
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::reconcile::Reconciler;
use support::*;

/// Child-process entry point for clients (does nothing in a normal run).
#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");
const BE_PORT: u16 = 8080;

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn l4(ip: Ipv4Addr, port: u16, proto: u8) -> L4Addr {
    L4Addr {
        ip: ip.into(),
        port,
        proto,
    }
}

fn frontend(
    ip: Ipv4Addr,
    port: u16,
    proto: u8,
    backends: &[u8],
    affinity: Option<u32>,
) -> Frontend {
    Frontend {
        addr: l4(ip, port, proto),
        name: format!("test/{ip}:{port}"),
        affinity_timeout: affinity,
        backends: backends
            .iter()
            .map(|i| (l4(backend_ip(*i), BE_PORT, proto), BackendState::Active))
            .collect(),
        external: None,
    }
}

fn table(fes: Vec<Frontend>) -> DesiredTable {
    let mut t = DesiredTable::default();
    for f in fes {
        t.insert(f);
    }
    t
}

fn stats(recon: &Reconciler<KernelMaps>) -> BTreeMap<u32, SvcStats> {
    recon.maps().svc_stats().expect("svc stats")
}

fn id(recon: &Reconciler<KernelMaps>, ip: Ipv4Addr, port: u16, proto: u8) -> u32 {
    recon.service_id(&l4(ip, port, proto)).expect("programmed")
}

#[test]
fn per_service_counters_count_connects_refusals_and_affinity_hits_and_start_at_zero_for_a_reused_id(
) {
    require_privileges();
    let topo = Topology::new("ss-stats", 3);
    let cg = TestCgroup::new("ss-stats");
    let pins = TestPins::new("ss-stats");
    let sizes = MapSizes {
        services: 1024,
        backends: 1024,
        affinity: 1024,
        reverse_nat: 1024,
    };
    loader::install(&pins.pins, &cg.path, &sizes, true).expect("install");
    let _servers = Servers::start(
        &topo.server,
        &[
            ("be1", backend_ip(1), BE_PORT),
            ("be2", backend_ip(2), BE_PORT),
            ("be3", backend_ip(3), BE_PORT),
        ],
    );
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("open maps")).expect("recover");
    let a = frontend(vip(60), 80, PROTO_TCP, &[1], None);
    let b = frontend(vip(61), 80, PROTO_TCP, &[1], None);
    let empty = frontend(vip(62), 80, PROTO_TCP, &[], None);
    let aff = frontend(vip(63), 80, PROTO_TCP, &[1, 2, 3], Some(600));
    let dns = frontend(vip(64), 53, PROTO_UDP, &[1], None);
    recon
        .reconcile(&table(vec![
            a.clone(),
            b.clone(),
            empty.clone(),
            aff.clone(),
            dns.clone(),
        ]))
        .expect("reconcile");
    let (id_a, id_b, id_empty, id_aff, id_dns) = (
        id(&recon, vip(60), 80, PROTO_TCP),
        id(&recon, vip(61), 80, PROTO_TCP),
        id(&recon, vip(62), 80, PROTO_TCP),
        id(&recon, vip(63), 80, PROTO_TCP),
        id(&recon, vip(64), 53, PROTO_UDP),
    );
    assert!(
        stats(&recon).is_empty(),
        "no traffic yet: {:?}",
        stats(&recon)
    );

    let c = |op| client(&cg.path, &topo.client, op);
    let n = 7;
    let r = c(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(60), 80),
        count: n,
    });
    assert!(r.iter().all(|a| a.ok), "{r:?}");
    let r = c(ClientOp::Udp {
        addr: SocketAddrV4::new(vip(64), 53),
        count: 3,
    });
    assert!(r.iter().all(|a| a.ok), "{r:?}");
    let r = c(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(62), 80),
        count: 4,
    });
    assert!(
        r.iter().all(|a| !a.ok && a.errno == libc::ECONNREFUSED),
        "{r:?}"
    );
    let r = c(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(63), 80),
        count: 10,
    });
    assert!(r.iter().all(|a| a.ok), "{r:?}");

    let s = stats(&recon);
    println!("NUMBERS svc stats: {s:?}");
    let get = |id: u32| s.get(&id).copied().unwrap_or_default();
    assert_eq!(
        get(id_a),
        SvcStats {
            translated: u64::from(n),
            ..Default::default()
        }
    );
    assert_eq!(get(id_b), SvcStats::default(), "no traffic to B");
    assert!(!s.contains_key(&id_b), "no entry without traffic");
    assert_eq!(
        get(id_dns),
        SvcStats {
            translated: 3,
            ..Default::default()
        },
        "each unconnected sendmsg counts"
    );
    assert_eq!(
        get(id_empty),
        SvcStats {
            refused: 4,
            ..Default::default()
        }
    );
    assert_eq!(
        get(id_aff),
        SvcStats {
            translated: 10,
            affinity_hits: 9,
            ..Default::default()
        },
        "the first connect creates the affinity entry, the 9 others hit it"
    );

    // `service list --stats -o json` from the pins.
    let out = Command::new(BIN)
        .args(["service", "list", "--stats", "-o", "json", "--bpffs"])
        .arg(pins.pins.root())
        .output()
        .expect("run cli");
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let row = |fe: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|r| r["frontend"] == fe)
            .unwrap_or_else(|| panic!("no row {fe}: {rows}"))
            .clone()
    };
    assert_eq!(row("10.96.0.60:80/TCP")["stats"]["translated"], n);
    assert_eq!(row("10.96.0.61:80/TCP")["stats"]["translated"], 0);
    assert_eq!(row("10.96.0.62:80/TCP")["stats"]["refused"], 4);
    assert_eq!(row("10.96.0.63:80/TCP")["stats"]["affinityHits"], 9);
    let text = Command::new(BIN)
        .args(["service", "list", "--stats", "--bpffs"])
        .arg(pins.pins.root())
        .output()
        .expect("run cli");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with("ID") && text.contains("Refused") && text.contains("10.96.0.62:80/TCP"),
        "{text}"
    );

    // A removed, then the new frontend G gets A's id: its counters start at 0.
    recon
        .reconcile(&table(vec![
            b.clone(),
            empty.clone(),
            aff.clone(),
            dns.clone(),
        ]))
        .expect("reconcile");
    assert!(
        !stats(&recon).contains_key(&id_a),
        "deleted with its frontend"
    );
    let g = frontend(vip(66), 80, PROTO_TCP, &[2], None);
    recon
        .reconcile(&table(vec![b, empty, aff, dns, g]))
        .expect("reconcile");
    assert_eq!(
        id(&recon, vip(66), 80, PROTO_TCP),
        id_a,
        "the freed id is reused"
    );
    assert_eq!(
        stats(&recon).get(&id_a).copied().unwrap_or_default(),
        SvcStats::default()
    );
    let r = c(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(66), 80),
        count: 2,
    });
    assert!(r.iter().all(|a| a.ok && a.name == "be2"), "{r:?}");
    assert_eq!(stats(&recon)[&id_a].translated, 2);
}

const STATIC: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.90
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1], conditions: {ready: true}}
---
kind: Service
metadata: {name: gone, namespace: shop}
spec:
  clusterIP: 10.96.0.91
  ports: [{name: http, port: 80, targetPort: 8080}]
";

fn start_agent(dir: &Path, cg: &Path, pins: &Path, listen: &str, rules_ns: &Netns) -> ChildGuard {
    let child = agent_command(Path::new(BIN), "test-node", dir, cg, pins, listen)
        .arg("--rules-netns")
        .arg(rules_ns.path())
        .spawn()
        .expect("spawn agent");
    ChildGuard(Some(child))
}

const CONFIG: &str = "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nmapSizes: {services: 4096, backends: 4096, affinity: 4096, reverseNat: 4096}\ncleanupKubeProxyRules: false\n";

#[test]
fn metrics_have_labelled_per_service_series_only_with_service_metrics() {
    require_privileges();
    let topo = Topology::new("ss-metrics", 1);
    let _servers = Servers::start(&topo.server, &[("be1", backend_ip(1), BE_PORT)]);
    let cg = TestCgroup::new("ss-metrics");
    let pins = TestPins::new("ss-metrics");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("static.yaml"), STATIC).expect("static");
    let listen = format!("127.0.0.1:{}", free_port());
    let root = pins.pins.root().to_path_buf();

    std::fs::write(
        dir.path().join("config.yaml"),
        format!("{CONFIG}serviceMetrics: true\n"),
    )
    .expect("config");
    let agent = start_agent(dir.path(), &cg.path, &root, &listen, &topo.client);
    wait_ready(&listen, Duration::from_secs(20));
    let r = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new(vip(90), 80),
            count: 5,
        },
    );
    assert!(r.iter().all(|a| a.ok), "{r:?}");
    let r = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: SocketAddrV4::new(vip(91), 80),
            count: 2,
        },
    );
    assert!(r.iter().all(|a| !a.ok), "{r:?}");
    let (code, m) = http_get(&listen, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let series: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("netboot_datapath_service_"))
        .collect();
    println!(
        "NUMBERS per-Service series with serviceMetrics: {}",
        series.len()
    );
    for want in [
        "netboot_datapath_service_connections_total{namespace=\"shop\",service=\"web\",port=\"http\",frontend=\"10.96.0.90:80/TCP\"} 5",
        "netboot_datapath_service_refused_total{namespace=\"shop\",service=\"gone\",port=\"http\",frontend=\"10.96.0.91:80/TCP\"} 2",
        "netboot_datapath_service_refused_total{namespace=\"shop\",service=\"web\",port=\"http\",frontend=\"10.96.0.90:80/TCP\"} 0",
    ] {
        assert!(series.contains(&want), "missing {want}:\n{}", series.join("\n"));
    }
    drop(agent);

    // Without the flag: the families are typed, no series.
    std::fs::write(dir.path().join("config.yaml"), CONFIG).expect("config");
    let _agent = start_agent(dir.path(), &cg.path, &root, &listen, &topo.client);
    wait_ready(&listen, Duration::from_secs(20));
    let (_, m) = http_get(&listen, "/metrics").expect("metrics");
    assert!(m.contains("# TYPE netboot_datapath_service_connections_total counter"));
    assert!(
        !m.lines()
            .any(|l| l.starts_with("netboot_datapath_service_")),
        "{m}"
    );
    // The counters live on in the pins (the CLI reads them either way).
    let out = Command::new(BIN)
        .args(["service", "list", "--stats", "-o", "json", "--bpffs"])
        .arg(&root)
        .output()
        .expect("run cli");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let web = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["frontend"] == "10.96.0.90:80/TCP")
        .expect("web row");
    assert_eq!(web["stats"]["translated"], 5);
}
