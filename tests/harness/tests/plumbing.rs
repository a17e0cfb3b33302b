//! The netns plumbing on its own (root, no cluster): a private layout with two
//! nodes and two pods, the probe across nodes, then removal of everything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::time::Duration;

use netboot_harness::cluster::{require_root, workspace_bin};
use netboot_harness::names::{self, Layout};
use netboot_harness::netns::{self, Plumber};
use netboot_harness::process::Launch;
use netboot_harness::{cgroup, process};

fn test_layout(tag: &str) -> Layout {
    let id = std::process::id() % 100_000;
    Layout {
        netns_prefix: format!("nbt{tag}{id}-"),
        cgroup_root: format!("/sys/fs/cgroup/unified/netboot-test-{tag}{id}").into(),
        bpffs_root: format!("/sys/fs/bpf/netboot-test-{tag}{id}").into(),
    }
}

async fn output_in(layout: &Layout, uid: &str, argv: &[&str]) -> std::process::Output {
    let launch = Launch {
        program: argv[0].into(),
        args: argv[1..].iter().map(|s| s.to_string()).collect(),
        netns: Some(layout.pod_netns(uid)),
        ..Default::default()
    };
    tokio::task::spawn_blocking(move || launch.command().unwrap().output().unwrap())
        .await
        .unwrap()
}

/// Two pods on two nodes reach each other over TCP and UDP through their node
/// netns and the fabric; nothing reaches outside (no default route).
#[tokio::test]
async fn pods_on_two_nodes_reach_each_other_and_teardown_leaves_nothing() {
    require_root("the netns plumbing test");
    let layout = test_layout("p");
    let plumber = Plumber::new(layout.clone());
    plumber.remove_all().await;
    let probe = workspace_bin("netboot-probe");

    plumber.ensure_cp().await.unwrap();
    plumber
        .ensure_node("node-a", Ipv4Addr::new(172, 18, 1, 1))
        .await
        .unwrap();
    plumber
        .ensure_node("node-b", Ipv4Addr::new(172, 18, 1, 2))
        .await
        .unwrap();
    let routes_a = [("10.244.2.0/24".to_string(), Ipv4Addr::new(172, 18, 1, 2))].into();
    let routes_b = [("10.244.1.0/24".to_string(), Ipv4Addr::new(172, 18, 1, 1))].into();
    plumber
        .sync_routes(&layout.node_netns("node-a"), &Default::default(), &routes_a)
        .await
        .unwrap();
    plumber
        .sync_routes(&layout.node_netns("node-b"), &Default::default(), &routes_b)
        .await
        .unwrap();
    let (uid_a, uid_b) = (
        "aaaaaaaa-1111-4000-8000-000000000001",
        "bbbbbbbb-2222-4000-8000-000000000002",
    );
    plumber
        .add_pod("node-a", uid_a, Ipv4Addr::new(10, 244, 1, 5))
        .await
        .unwrap();
    plumber
        .add_pod("node-b", uid_b, Ipv4Addr::new(10, 244, 2, 7))
        .await
        .unwrap();

    // The server runs in pod b's netns and cgroup, like podnet runs pods.
    let cg = layout.pod_cgroup("node-b", uid_b);
    cgroup::ensure(&cg).unwrap();
    let server = Launch {
        program: probe.clone(),
        args: vec!["serve".into(), "--name".into(), "pod-b".into()],
        netns: Some(layout.pod_netns(uid_b)),
        cgroup: Some(cg.clone()),
        supervised: true,
        ..Default::default()
    };
    let mut child = server.spawn().unwrap();
    let pid = child.id().unwrap();
    assert_eq!(
        cgroup::procs(&cg),
        vec![i32::try_from(pid).unwrap()],
        "server joined its cgroup"
    );

    let probe_s = probe.display().to_string();
    let mut got = String::new();
    for _ in 0..40 {
        let out = output_in(
            &layout,
            uid_a,
            &[
                &probe_s,
                "connect",
                "tcp",
                "10.244.2.7:8080",
                "--timeout-ms",
                "500",
            ],
        )
        .await;
        got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, "pod-b", "tcp pod-a -> pod-b across nodes");
    let out = output_in(
        &layout,
        uid_a,
        &[
            &probe_s,
            "connect",
            "udp",
            "10.244.2.7:8081",
            "--count",
            "3",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pod-b\npod-b\npod-b\n",
        "udp pod-a -> pod-b"
    );

    // No default route anywhere; the pod has exactly its three routes.
    for ns in [
        layout.pod_netns(uid_a),
        layout.node_netns("node-a"),
        layout.cp_netns(),
        layout.fabric_netns(),
    ] {
        let routes = std::process::Command::new("ip")
            .args(["-n", &ns, "route", "show", "default"])
            .output()
            .unwrap();
        assert!(
            routes.stdout.is_empty(),
            "netns {ns} has a default route: {}",
            String::from_utf8_lossy(&routes.stdout)
        );
    }
    // Nothing leaves the pod world: an address outside it is unreachable.
    let out = output_in(
        &layout,
        uid_a,
        &[
            &probe_s,
            "connect",
            "tcp",
            "192.0.2.1:80",
            "--timeout-ms",
            "300",
        ],
    )
    .await;
    assert!(!out.status.success(), "a pod reached 192.0.2.1");

    process::signal_group(pid, libc::SIGTERM);
    let _ = child.wait().await;
    let errors = plumber.remove_all().await;
    assert!(errors.is_empty(), "{errors:?}");
    cgroup::remove_tree(&layout.cgroup_root).await.unwrap();
    assert!(
        netns::list(&layout.netns_prefix).is_empty(),
        "netns left: {:?}",
        netns::list(&layout.netns_prefix)
    );
    assert!(!layout.cgroup_root.exists());
    assert!(!names::netns_etc(&layout.pod_netns(uid_a)).exists());
}

/// An agent launch keeps exactly the capabilities it is given: podnet runs
/// agents as root with only what their securityContext grants.
#[test]
fn a_launch_with_capabilities_execs_with_exactly_those() {
    require_root("the capability test");
    use netboot_harness::caps::{self, CapSet};
    let want = CapSet::from_names(&["NET_ADMIN", "BPF", "SYS_ADMIN"]).unwrap();
    let keep = caps::grant(want, caps::bounding_set().unwrap()).keep;
    let launch = Launch {
        program: "sh".into(),
        args: vec!["-c".into(), "grep ^Cap /proc/self/status".into()],
        caps: Some(keep),
        ..Default::default()
    };
    let out = launch.command().unwrap().output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    assert_eq!(field("CapEff:"), keep.0, "{text}");
    assert_eq!(field("CapPrm:"), keep.0, "{text}");
    assert_eq!(field("CapBnd:"), keep.0, "{text}");
    assert_eq!((field("CapInh:"), field("CapAmb:")), (0, 0), "{text}");
    // With a netns too, it is entered by setns(2) before the capabilities
    // go (`ip netns exec` would need CAP_SYS_ADMIN itself).
    use std::os::unix::fs::MetadataExt;
    let ns = format!("nbsl-caps-{}", std::process::id());
    let added = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(added.success());
    let ino = std::fs::metadata(names::netns_path(&ns)).unwrap().ino();
    let in_netns = Launch {
        args: vec![
            "-c".into(),
            "stat -L -c %i /proc/self/ns/net; grep ^CapEff /proc/self/status".into(),
        ],
        netns: Some(ns.clone()),
        ..launch
    };
    let out = in_netns.command().unwrap().output();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(ino.to_string().as_str()), "{text}");
    assert_eq!(
        lines
            .next()
            .and_then(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap()),
        Some(keep.0),
        "{text}"
    );
    // A netns that does not exist: an error, nothing started.
    let missing = Launch {
        netns: Some("nbsl-none".into()),
        ..in_netns
    };
    assert_eq!(
        missing.command().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::NotFound)
    );
}

/// A tiny probe server in `netns` on 0.0.0.0:`port`: greets with `name`,
/// answers the peer query with the source it sees (as `netboot-probe serve`),
/// for `conns` connections.
fn peer_server(
    netns: &str,
    port: u16,
    name: &'static str,
    conns: usize,
) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Write};
    let listener = netns::in_netns(netns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port))
    })
    .unwrap();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut s, peer) = listener.accept().unwrap();
            writeln!(s, "{name}").unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.as_bytes(), netboot_harness::external::PEER_QUERY);
            writeln!(s, "peer {}", peer.ip()).unwrap();
        }
    })
}

/// The external client: on the fabric at its own address, reaching a node
/// directly and the external/LoadBalancer ranges through node-0's address,
/// nothing else (no default route); made idempotently and removed with the
/// rest of the layout.
#[tokio::test]
async fn the_external_client_reaches_nodes_and_its_ranges_only() {
    use netboot_harness::external::{self, NoAnswer, Seen};
    require_root("the external client plumbing test");
    let layout = test_layout("x");
    let plumber = Plumber::new(layout.clone());
    plumber.remove_all().await;
    let gateway: Ipv4Addr = names::EXT_GATEWAY.parse().unwrap();
    plumber.ensure_node("node-0", gateway).await.unwrap();
    plumber.ensure_ext_client().await.unwrap();
    plumber.ensure_ext_client().await.unwrap(); // idempotent
    let ext = layout.ext_netns();
    let node = layout.node_netns("node-0");

    let routes = std::process::Command::new("ip")
        .args(["-n", &ext, "-4", "route", "show"])
        .output()
        .unwrap();
    let routes: Vec<String> = String::from_utf8_lossy(&routes.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        routes,
        [
            format!(
                "172.18.0.0/16 dev eth0 proto kernel scope link src {}",
                names::EXT_IP
            ),
            format!("198.51.100.0/24 via {} dev eth0", names::EXT_GATEWAY),
            format!("203.0.113.0/24 via {} dev eth0", names::EXT_GATEWAY),
        ],
        "the external client's routes"
    );

    // An address of the routed ranges lives on node-0 (as a LoadBalancer IP
    // a datapath would answer for); the node answers on both.
    let lb = "198.51.100.7";
    std::process::Command::new("ip")
        .args(["-n", &node, "addr", "add", &format!("{lb}/32"), "dev", "lo"])
        .status()
        .map(|s| assert!(s.success()))
        .unwrap();
    let server = peer_server(&node, 8080, "node-0", 2);
    let timeout = Duration::from_secs(2);
    let client: std::net::IpAddr = names::EXT_IP.parse().unwrap();
    for target in [format!("{gateway}:8080"), format!("{lb}:8080")] {
        let ext = ext.clone();
        let target = target.parse().unwrap();
        let seen = tokio::task::spawn_blocking(move || external::peer_seen(&ext, target, timeout))
            .await
            .unwrap();
        assert_eq!(
            seen,
            Ok(Seen {
                name: "node-0".into(),
                source: client
            }),
            "{target}"
        );
    }
    server.join().unwrap();
    // Nothing else is routed: no default route, an outside address fails at once.
    let ext2 = ext.clone();
    let outside = tokio::task::spawn_blocking(move || {
        external::peer_seen(&ext2, "192.0.2.1:80".parse().unwrap(), timeout)
    })
    .await
    .unwrap();
    assert!(
        matches!(&outside, Err(NoAnswer::Other(e)) if e.contains("unreachable")),
        "{outside:?}"
    );

    let errors = plumber.remove_all().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        netns::list(&layout.netns_prefix).is_empty(),
        "netns left: {:?}",
        netns::list(&layout.netns_prefix)
    );
}
