//! Privileged: north–south Service addresses through the real agent
//! (static Services and a static Node): NodePorts on the node's addresses and
//! 127.0.0.1, `spec.externalIPs` and VIP-mode load balancer IPs, reached by
//! local sockets through the socket LB.
//!
//! Namespaces `nbns-*` only (no default route, no veth end in the root
//! namespace); the node's addresses exist only inside them.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_northsouth`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

/// The node is the client namespace (10.244.0.100); backend 1 is on this
/// node, backend 2 on another. externalTrafficPolicy: Local, yet local
/// sockets use every endpoint (kube-proxy's short circuit).
const STATIC: &str = "
kind: Node
metadata: {name: test-node}
status:
  addresses:
  - {type: Hostname, address: test-node}
  - {type: InternalIP, address: 10.244.0.100}
  - {type: ExternalIP, address: 192.0.2.10}
---
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.80
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.1, ipMode: VIP}
    - {ip: 203.0.113.2, ipMode: Proxy}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.1], nodeName: test-node}
- {addresses: [10.244.1.2], nodeName: other-node}
";

fn start_agent(
    dir: &std::path::Path,
    cg: &std::path::Path,
    pins: &std::path::Path,
    listen: &str,
) -> ChildGuard {
    let child = Command::new(BIN)
        .args(["agent", "--node-name", "test-node"])
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--cgroup")
        .arg(cg)
        .arg("--bpffs")
        .arg(pins)
        .args(["--listen", listen])
        .arg("--static-services")
        .arg(dir.join("static.yaml"))
        .arg("--kube-proxy-present")
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("agent.log")).expect("log"),
        ))
        .spawn()
        .expect("spawn agent");
    ChildGuard(Some(child))
}

fn v4(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

#[test]
fn local_sockets_reach_node_ports_external_ips_and_load_balancer_ips() {
    require_privileges();
    let topo = Topology::new("nbns-sock", 2);
    let _servers = Servers::start(
        &topo.server,
        &[("be1", backend_ip(1), 8080), ("be2", backend_ip(2), 8080)],
    );
    let cg = TestCgroup::new("nbns-sock");
    let pins = TestPins::new("nbns-sock");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nmapSizes: {services: 4096, backends: 4096, affinity: 4096, reverseNat: 4096}\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), STATIC).expect("static");
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_agent(dir.path(), &cg.path, pins.pins.root(), &listen);
    wait_ready(&listen, Duration::from_secs(20));

    let (_, js) = http_get(&listen, "/v1/status").expect("status");
    let st: serde_json::Value = serde_json::from_str(&js).expect("status json");
    // Per port: ClusterIP, 2 node addresses, 127.0.0.1, 1 external IP, 1 LB IP.
    assert_eq!(st["services"], 12, "{js}");

    // TCP to every address of the Service: both endpoints are used (local
    // sockets are in-cluster traffic), getpeername shows the address asked.
    for addr in [
        v4([10, 244, 0, 100], 30080), // InternalIP:nodePort
        v4([192, 0, 2, 10], 30080),   // ExternalIP:nodePort
        v4([127, 0, 0, 1], 30080),    // localhost NodePort
        v4([198, 51, 100, 7], 80),    // externalIPs
        v4([203, 0, 113, 1], 80),     // LB ingress, ipMode VIP
        v4([10, 96, 0, 80], 80),      // ClusterIP
    ] {
        let res = client(&cg.path, &topo.client, ClientOp::Tcp { addr, count: 40 });
        assert!(res.iter().all(|a| a.ok), "{addr}: {res:?}");
        assert!(
            res.iter().all(|a| a.peer == addr.to_string()),
            "{addr}: getpeername must be the address asked: {res:?}"
        );
        let be2 = res.iter().filter(|a| a.name == "be2").count();
        assert!(
            be2 > 0 && be2 < res.len(),
            "{addr}: both endpoints: {res:?}"
        );
    }

    // UDP to the NodePort: the reply comes from the address asked.
    let addr = v4([10, 244, 0, 100], 30053);
    let res = client(&cg.path, &topo.client, ClientOp::Udp { addr, count: 3 });
    assert!(
        res.iter().all(|a| a.ok && a.peer == addr.to_string()),
        "{res:?}"
    );

    // A Proxy-mode LB IP is left to the load balancer: not translated (no route here).
    let res = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: v4([203, 0, 113, 2], 80),
            count: 1,
        },
    );
    assert!(!res[0].ok && res[0].errno == libc::ENETUNREACH, "{res:?}");
    // The Service port on the node address is no NodePort: untouched (nothing listens).
    let res = client(
        &cg.path,
        &topo.client,
        ClientOp::TcpAny {
            addr: SocketAddr::V4(v4([10, 244, 0, 100], 80)),
            count: 1,
        },
    );
    assert!(!res[0].ok && res[0].errno == libc::ECONNREFUSED, "{res:?}");
}

// ---- Per-packet path (tc / TCX) for traffic from outside the node --------

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{self, Rules};
use netboot_datapath::loader::{self, NodePortDevice};
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::reconcile::Reconciler;

/// A TCP server in `ns` answering `<name> <client address it sees>`.
struct PeerServer {
    stop: Arc<AtomicBool>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    fn start(ns: &Netns, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name, path) = (stop.clone(), name.to_string(), ns.path());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let f = std::fs::File::open(path).expect("netns");
            // SAFETY: valid fd; CLONE_NEWNET only affects this thread.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            // Dual-stack: IPv4 clients show as themselves (canonical form).
            let l = std::net::TcpListener::bind("[::]:8080").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        // "*": answer with the address the client reached.
                        let me = match (name.as_str(), s.local_addr()) {
                            ("*", Ok(a)) => a.ip().to_canonical().to_string(),
                            _ => name.clone(),
                        };
                        let _ =
                            s.write_all(format!("{me} {}\n", peer.ip().to_canonical()).as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(300)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("server");
        Self { stop, t: Some(t) }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// An "external client", two "nodes" and a pod on each, on a bridge that
/// lives in a namespace of its own: nothing in the root namespace, no
/// default route anywhere.
///   client 192.168.50.100 ── br ── node-a eth0 192.168.50.1 ── pod-a 10.200.1.10
///                              └── node-b eth0 192.168.50.2 ── pod-b 10.200.2.10
struct Cluster {
    client: Netns,
    node_a: Netns,
    _node_b: Netns,
    pod_a: Netns,
    pod_b: Netns,
    _br: Netns,
}

impl Cluster {
    /// Namespaces `nbns-<tag>-*` (tests running at once use different tags).
    fn new(tag: &str) -> Self {
        let ns = |n: &str| Netns::new(&format!("nbns-{tag}-{n}"));
        let br = ns("br");
        let client = ns("cl");
        let node_a = ns("a");
        let node_b = ns("b");
        let pod_a = ns("pa");
        let pod_b = ns("pb");
        br.ip(&["link", "add", "br0", "type", "bridge"]);
        br.ip(&["link", "set", "br0", "up"]);
        for (ns, port, addr) in [
            (&client, "p-cl", "192.168.50.100/24"),
            (&node_a, "p-a", "192.168.50.1/24"),
            (&node_b, "p-b", "192.168.50.2/24"),
        ] {
            br.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            br.ip(&["link", "set", port, "master", "br0", "up"]);
            ns.ip(&["addr", "add", addr, "dev", "eth0"]);
            let addr6 = format!(
                "fd00:50::{}/64",
                addr.split(['.', '/']).nth(3).unwrap_or("0")
            );
            ns.ip(&["addr", "add", &addr6, "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        for (node, pod, net, other_net, other_node) in [
            (&node_a, &pod_a, 1, 2, "192.168.50.2"),
            (&node_b, &pod_b, 2, 1, "192.168.50.1"),
        ] {
            node.ip(&[
                "link", "add", "pod0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            node.ip(&[
                "addr",
                "add",
                &format!("10.200.{net}.254/24"),
                "dev",
                "pod0",
            ]);
            node.ip(&["link", "set", "pod0", "up"]);
            pod.ip(&["addr", "add", &format!("10.200.{net}.10/24"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            let gw = format!("10.200.{net}.254");
            pod.ip(&["route", "add", "192.168.50.0/24", "via", &gw]);
            pod.ip(&["route", "add", "10.200.0.0/16", "via", &gw]);
            // IPv6: pod fd00:200:<net>::10, node side ::fe.
            node.ip(&[
                "addr",
                "add",
                &format!("fd00:200:{net}::fe/64"),
                "dev",
                "pod0",
                "nodad",
            ]);
            pod.ip(&[
                "addr",
                "add",
                &format!("fd00:200:{net}::10/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            let gw6 = format!("fd00:200:{net}::fe");
            pod.ip(&["-6", "route", "add", "fd00:50::/64", "via", &gw6]);
            pod.ip(&["-6", "route", "add", "fd00:200::/32", "via", &gw6]);
            let other6 = format!("fd00:50::{}", if net == 1 { 2 } else { 1 });
            node.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:200:{other_net}::/64"),
                "via",
                &other6,
            ]);
            let out = node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
            assert!(out.status.success(), "{out:?}");
            node.ip(&[
                "route",
                "add",
                &format!("10.200.{other_net}.0/24"),
                "via",
                other_node,
            ]);
            let out = node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            assert!(out.status.success(), "{out:?}");
        }
        // The client reaches the externalIPs through node-a.
        client.ip(&["route", "add", "198.51.100.7/32", "via", "192.168.50.1"]);
        client.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:7::7/128",
            "via",
            "fd00:50::1",
        ]);
        Self {
            client,
            node_a,
            _node_b: node_b,
            pod_a,
            pod_b,
            _br: br,
        }
    }
}

/// Small maps for the per-packet tests.
const NP_SIZES: MapSizes = MapSizes {
    services: 1024,
    backends: 1024,
    affinity: 1024,
    reverse_nat: 1024,
};

/// The Services and EndpointSlices of a multi-document YAML.
fn parse_objects(
    text: &str,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let (mut svcs, mut slices) = (Vec::new(), Vec::new());
    for doc in text.split("\n---\n") {
        if doc.contains("kind: Service\n") {
            svcs.push(serde_yaml::from_str(doc).unwrap());
        } else {
            slices.push(serde_yaml::from_str(doc).unwrap());
        }
    }
    (svcs, slices)
}

/// Attaches the per-packet path to node-a's eth0 (SNAT 192.168.50.1), from
/// a thread inside node-a's namespace; returns the links made.
fn attach_node_a(c: &Cluster, pins: &TestPins) -> Vec<String> {
    let (pins2, path) = (pins.pins.clone(), c.node_a.path());
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        // SAFETY: valid fd; CLONE_NEWNET only affects this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        loader::install_nodeport(
            &pins2,
            &NP_SIZES,
            &[NodePortDevice {
                ifname: "eth0".into(),
                snat: Some("192.168.50.1".parse().unwrap()),
                snat6: None,
            }],
        )
    })
    .join()
    .expect("thread")
    .expect("install_nodeport")
    .into_iter()
    .map(|l| format!("{l:?}"))
    .collect()
}

const NP_SERVICES: &str = "
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  externalIPs: [198.51.100.7]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
kind: Service
metadata: {name: loc, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.81
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
kind: Service
metadata: {name: far, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.82
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30082}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
- {addresses: [10.200.2.10], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: loc-1, namespace: default, labels: {kubernetes.io/service-name: loc}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
- {addresses: [10.200.2.10], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: far-1, namespace: default, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.2.10], nodeName: node-b}
";

/// (backend name, source address it saw) of each attempt; panics on a failure.
fn seen(res: &[Attempt]) -> Vec<(String, String)> {
    res.iter()
        .map(|a| {
            assert!(a.ok, "{res:?}");
            let (n, src) = a.name.split_once(' ').expect("name and source");
            (n.to_string(), src.to_string())
        })
        .collect()
}

#[test]
fn external_clients_reach_node_ports_with_snat_for_remote_backends_and_their_own_address_under_local_policy(
) {
    require_privileges();
    let c = Cluster::new("np");
    let _pa = PeerServer::start(&c.pod_a, "pod-a");
    let _pb = PeerServer::start(&c.pod_b, "pod-b");
    // node-a's datapath: maps from the desired model, tc on its eth0.
    let agent_cg = TestCgroup::new("nbns-np-agent");
    let client_cg = TestCgroup::new("nbns-np-client");
    let pins = TestPins::new("nbns-np");
    loader::install(&pins.pins, &agent_cg.path, &NP_SIZES, true).expect("install");
    let (svcs, slices) = parse_objects(NP_SERVICES);
    let node_ips = ["192.168.50.1".parse().unwrap()];
    let rules = Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let table = desired::build(&svcs, &slices, rules);
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("maps")).expect("recover");
    recon.reconcile(&table).expect("reconcile");
    let links = attach_node_a(&c, &pins);
    assert_eq!(links.len(), 2, "{links:?}");
    // Flow events on: every new external flow is one `packet` event.
    let mut ring = FlowRing::on(&pins.pins);
    let mut drain = || ring.drain();

    let tcp = |addr: SocketAddrV4, count: u32| {
        client(&client_cg.path, &c.client, ClientOp::Tcp { addr, count })
    };

    // externalTrafficPolicy: Cluster. The local backend sees the client; the
    // remote one sees node-a (SNAT), and its reply finds its way back.
    let res = tcp(v4([192, 168, 50, 1], 30080), 40);
    let s = seen(&res);
    assert!(
        res.iter().all(|a| a.peer == "192.168.50.1:30080"),
        "{res:?}"
    );
    let a: Vec<_> = s.iter().filter(|(n, _)| n == "pod-a").collect();
    let b: Vec<_> = s.iter().filter(|(n, _)| n == "pod-b").collect();
    assert!(!a.is_empty() && !b.is_empty(), "both backends: {s:?}");
    assert!(a.iter().all(|(_, src)| src == "192.168.50.100"), "{s:?}");
    assert!(b.iter().all(|(_, src)| src == "192.168.50.1"), "{s:?}");
    let evs = drain();
    let client_ip: IpAddr = "192.168.50.100".parse().unwrap();
    let xl: Vec<_> = evs
        .iter()
        .filter(|f| f.hook == "packet" && f.frontend_port == 30080)
        .collect();
    assert_eq!(xl.len(), res.len(), "one event per new flow: {evs:?}");
    assert!(
        xl.iter().all(
            |f| f.verdict == netboot_datapath::flows::Verdict::Translated
                && f.client_ip == Some(client_ip)
                && f.client_port.is_some_and(|p| p > 0)
                && f.frontend_ip == "192.168.50.1".parse::<IpAddr>().unwrap()
                && f.backend_port == Some(8080)
                && f.reason.starts_with("nodeport_")
        ),
        "{xl:?}"
    );
    println!(
        "NUMBERS nodeport cluster policy: {} connections, {} local (client IP kept), {} remote (SNAT), worst {} us",
        res.len(),
        a.len(),
        b.len(),
        res.iter().map(|a| a.micros).max().unwrap_or(0)
    );
    // The externalIP, same Service.
    let s = seen(&tcp(v4([198, 51, 100, 7], 80), 20));
    assert!(
        s.iter()
            .all(|(n, src)| (n == "pod-a" && src == "192.168.50.100")
                || (n == "pod-b" && src == "192.168.50.1")),
        "{s:?}"
    );

    // externalTrafficPolicy: Local: only the local backend, client IP kept.
    let s = seen(&tcp(v4([192, 168, 50, 1], 30081), 20));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "192.168.50.100"),
        "{s:?}"
    );

    // Local policy and no endpoint on node-a: dropped (the client times out).
    let _ = drain();
    let res = tcp(v4([192, 168, 50, 1], 30082), 1);
    assert!(!res[0].ok, "{res:?}");
    let evs = drain();
    assert!(
        !evs.is_empty()
            && evs.iter().all(|f| f.hook == "packet"
                && f.frontend_port == 30082
                && f.verdict == netboot_datapath::flows::Verdict::Refused
                && f.client_ip == Some(client_ip)
                && f.backend_ip.is_none()
                && f.reason == "nodeport_no_local_backend"),
        "each dropped SYN is a refused event: {evs:?}"
    );

    let ctr = recon.maps().counters().expect("counters");
    let get = |n: &str| {
        ctr.0
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    assert!(
        get("nodeport_snat") > 0 && get("nodeport_local") > 0,
        "{ctr:?}"
    );
    assert!(get("nodeport_no_local_backend") > 0, "{ctr:?}");
    assert!(get("nodeport_ct_hit") > 0, "{ctr:?}");
}

// ---- The agent attaches the per-packet path itself ----------------------

/// node-a's view: its Node (InternalIP on eth0), a Cluster-policy NodePort
/// Service and two LoadBalancer Services with externalTrafficPolicy Local
/// and a healthCheckNodePort: `loc` has an endpoint on node-a, `far` none.
const AGENT_STATIC: &str = "
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: InternalIP, address: 192.168.50.1}
---
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
kind: Service
metadata: {name: loc, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.81
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
kind: Service
metadata: {name: far, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.82
  externalTrafficPolicy: Local
  healthCheckNodePort: 32002
  ports: [{port: 80, targetPort: 8080, nodePort: 30082}]
---
kind: Service
metadata: {name: shut, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.83
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 80, targetPort: 8080, nodePort: 30083}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.20}]
---
kind: Service
metadata: {name: open, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.84
  loadBalancerSourceRanges: [192.168.50.100/32]
  ports: [{port: 80, targetPort: 8080, nodePort: 30084}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.21}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
- {addresses: [10.200.2.10], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: loc-1, namespace: default, labels: {kubernetes.io/service-name: loc}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
- {addresses: [10.200.2.10], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: far-1, namespace: default, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.2.10], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: shut-1, namespace: default, labels: {kubernetes.io/service-name: shut}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
---
kind: EndpointSlice
metadata: {name: open-1, namespace: default, labels: {kubernetes.io/service-name: open}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
";

/// GET `path` from `addr` from inside `ns`.
fn get_in(ns: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_string(), path.to_string());
    on_thread_in(ns, move || http_get(&addr, &path))
}

fn wait_ready_in(ns: &Netns, dir: &std::path::Path) {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Some((200, _)) = get_in(ns, "127.0.0.1:9890", "/readyz") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "agent not ready: {}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );
}

#[test]
fn the_agent_attaches_the_per_packet_path_to_the_node_address_interface_and_answers_health_check_node_ports(
) {
    require_privileges();
    let c = Cluster::new("ag");
    let _pa = PeerServer::start(&c.pod_a, "pod-a");
    let _pb = PeerServer::start(&c.pod_b, "pod-b");
    let agent_cg = TestCgroup::new("nbns-ag-agent");
    let client_cg = TestCgroup::new("nbns-ag-client");
    let pins = TestPins::new("nbns-ag");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nmapSizes: {services: 1024, backends: 1024, affinity: 1024, reverseNat: 1024}\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), AGENT_STATIC).expect("static");
    let mut agent = start_agent_in(
        BIN,
        &c.node_a,
        "node-a",
        dir.path(),
        &agent_cg.path,
        pins.pins.root(),
    );
    wait_ready_in(&c.node_a, dir.path());

    let (_, js) = get_in(&c.node_a, "127.0.0.1:9890", "/v1/status").expect("status");
    let st: serde_json::Value = serde_json::from_str(&js).expect("json");
    assert_eq!(st["nodeportDevices"], "eth0 (SNAT 192.168.50.1)", "{js}");
    assert_eq!(st["healthCheckPorts"], 2, "{js}");
    let features: Vec<&str> = st["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    for f in [
        "nodeport",
        "loadbalancer",
        "externalips",
        "external-traffic-local",
        "lb-source-ranges",
    ] {
        assert!(features.contains(&f), "{f} published: {js}");
    }
    assert_eq!(st["unserved"], 0, "{js}");
    assert_eq!(loader::nodeport_attached(&pins.pins), ["eth0"]);

    let tcp = |addr: SocketAddrV4, count: u32| {
        client(&client_cg.path, &c.client, ClientOp::Tcp { addr, count })
    };
    let cluster_policy = |what: &str| {
        let s = seen(&tcp(v4([192, 168, 50, 1], 30080), 30));
        assert!(
            s.iter().any(|(n, _)| n == "pod-a") && s.iter().any(|(n, _)| n == "pod-b"),
            "{what}: both backends: {s:?}"
        );
        assert!(
            s.iter()
                .all(|(n, src)| (n == "pod-a" && src == "192.168.50.100")
                    || (n == "pod-b" && src == "192.168.50.1")),
            "{what}: {s:?}"
        );
    };
    // NodePort from outside, through the programs the agent attached.
    cluster_policy("agent running");
    let s = seen(&tcp(v4([192, 168, 50, 1], 30081), 10));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "192.168.50.100"),
        "{s:?}"
    );

    // loadBalancerSourceRanges, written by the agent: the client
    // (192.168.50.100) is outside `shut`'s ranges and inside `open`'s.
    for lb in ["203.0.113.20/32", "203.0.113.21/32"] {
        c.client.ip(&["route", "add", lb, "via", "192.168.50.1"]);
    }
    let res = tcp(v4([203, 0, 113, 20], 80), 1);
    assert!(!res[0].ok, "outside the ranges: dropped: {res:?}");
    let s = seen(&tcp(v4([203, 0, 113, 21], 80), 5));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "192.168.50.100"),
        "inside the ranges: {s:?}"
    );

    // healthCheckNodePort, asked from the external client like a cloud LB.
    let (code, body) = get_in(&c.client, "192.168.50.1:32001", "/healthz").expect("hc loc");
    let v: serde_json::Value = serde_json::from_str(&body).expect("hc json");
    assert_eq!(code, 200, "{body}");
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "loc");
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["serviceProxyHealthy"], true);
    let (code, body) = get_in(&c.client, "192.168.50.1:32002", "/").expect("hc far");
    let v: serde_json::Value = serde_json::from_str(&body).expect("hc json");
    assert_eq!(
        (code, v["localEndpoints"].as_u64()),
        (503, Some(0)),
        "{body}"
    );

    // The links are pinned: no agent, still served; a new agent updates them.
    drop(agent);
    cluster_policy("no agent running");
    agent = start_agent_in(
        BIN,
        &c.node_a,
        "node-a",
        dir.path(),
        &agent_cg.path,
        pins.pins.root(),
    );
    wait_ready_in(&c.node_a, dir.path());
    cluster_policy("restarted agent");
    drop(agent);

    // uninstall detaches everything: nothing answers the NodePort any more.
    let out = Command::new(BIN)
        .args(["uninstall", "--bpffs"])
        .arg(pins.pins.root())
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "{out:?}");
    assert!(loader::nodeport_attached(&pins.pins).is_empty());
    // The stopped agent's process may hold its link a moment longer: bounded wait.
    let mut res = tcp(v4([192, 168, 50, 1], 30080), 1);
    for _ in 0..30 {
        if !res[0].ok {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        res = tcp(v4([192, 168, 50, 1], 30080), 1);
    }
    assert!(!res[0].ok, "{res:?}");
}

#[test]
fn an_agent_without_an_interface_carrying_a_node_address_says_so_and_does_not_publish_nodeport() {
    require_privileges();
    let c = Cluster::new("nd");
    let agent_cg = TestCgroup::new("nbns-nd-agent");
    let pins = TestPins::new("nbns-nd");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "apiServer: {host: 127.0.0.1, port: 6443}\nmapSizes: {services: 1024, backends: 1024, affinity: 1024, reverseNat: 1024}\n",
    )
    .expect("config");
    // The Node says 192.0.2.99, which no interface of node-a carries.
    std::fs::write(
        dir.path().join("static.yaml"),
        AGENT_STATIC.replace("192.168.50.1}", "192.0.2.99}"),
    )
    .expect("static");
    let _agent = start_agent_in(
        BIN,
        &c.node_a,
        "node-a",
        dir.path(),
        &agent_cg.path,
        pins.pins.root(),
    );
    wait_ready_in(&c.node_a, dir.path());
    let (_, js) = get_in(&c.node_a, "127.0.0.1:9890", "/v1/status").expect("status");
    let st: serde_json::Value = serde_json::from_str(&js).expect("json");
    assert_eq!(
        st["nodeportDevices"], "none: no interface carries the Node's address 192.0.2.99",
        "{js}"
    );
    assert!(
        !st["features"]
            .as_array()
            .expect("features")
            .iter()
            .any(|f| f == "nodeport"),
        "{js}"
    );
    // web, loc, far, shut and open all need nodeport.
    assert_eq!(st["unserved"], 5, "{js}");
    assert!(loader::nodeport_attached(&pins.pins).is_empty());
}

// ---- Maglev on the per-packet path ----------------------------------------

const MG_SERVICE: &str = "
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";

fn mg_slice(backends: &[&str]) -> String {
    let mut s = String::from(
        "kind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    for b in backends {
        let node = if b.starts_with("10.200.1.") {
            "node-a"
        } else {
            "node-b"
        };
        s.push_str(&format!("- {{addresses: [{b}], nodeName: {node}}}\n"));
    }
    s
}

#[test]
fn maglev_sends_each_flow_to_the_table_backend_and_removing_one_of_n_moves_only_its_flows() {
    require_privileges();
    let c = Cluster::new("mg");
    for (pod, net) in [(&c.pod_a, 1), (&c.pod_b, 2)] {
        for i in [11, 12] {
            pod.ip(&[
                "addr",
                "add",
                &format!("10.200.{net}.{i}/24"),
                "dev",
                "eth0",
            ]);
        }
    }
    let _pa = PeerServer::start(&c.pod_a, "*");
    let _pb = PeerServer::start(&c.pod_b, "*");
    let agent_cg = TestCgroup::new("nbns-mg-agent");
    let client_cg = TestCgroup::new("nbns-mg-client");
    let pins = TestPins::new("nbns-mg");
    let sizes = MapSizes {
        services: 1024,
        backends: 1024,
        affinity: 1024,
        reverse_nat: 1024,
    };
    loader::install(&pins.pins, &agent_cg.path, &sizes, true).expect("install");
    let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(MG_SERVICE).unwrap();
    let node_ips = ["192.168.50.1".parse().unwrap()];
    let rules = Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let all = [
        "10.200.1.10",
        "10.200.1.11",
        "10.200.1.12",
        "10.200.2.10",
        "10.200.2.11",
        "10.200.2.12",
    ];
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("maps")).expect("recover");
    const M: u32 = 16381;
    let mut tables = netboot_datapath::maglev::Tables::open(&pins.pins, M, true).expect("maglev");
    let mut program = |backends: &[&str]| {
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_yaml::from_str(&mg_slice(backends)).unwrap();
        recon
            .reconcile(&desired::build([&svc], [&slice], rules))
            .expect("reconcile");
        tables.sync(&recon.external_slots()).expect("tables");
        let fe = netboot_datapath::layout::L4Addr {
            ip: "192.168.50.1".parse().unwrap(),
            port: 30080,
            proto: netboot_datapath::layout::PROTO_TCP,
        };
        let id = recon.service_id(&fe).expect("frontend");
        let slots = recon
            .external_slots()
            .into_iter()
            .find(|(i, _)| *i == id)
            .expect("slots")
            .1;
        // What each source port should reach: entry flow_hash % M of the table.
        move |sport: u16| {
            let t = netboot_datapath::maglev::slot_table(&slots, M);
            let h = netboot_datapath::maglev::flow_hash(
                "192.168.50.100".parse().unwrap(),
                sport,
                30080,
                6,
            );
            slots[usize::from(t[(h % M) as usize]) - 1].ip.to_string()
        }
    };
    let predict = program(&all);
    let (pins2, path) = (pins.pins.clone(), c.node_a.path());
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        netboot_harness::netns::enter_thread(&f).expect("setns");
        loader::install_nodeport(
            &pins2,
            &sizes,
            &[NodePortDevice {
                ifname: "eth0".into(),
                snat: Some("192.168.50.1".parse().unwrap()),
                snat6: None,
            }],
        )
    })
    .join()
    .expect("thread")
    .expect("install_nodeport");

    let ports: Vec<u16> = (41000..41060).collect();
    let ct = pins.pins.map("nb_ct4");
    let run = |ports: &[u16]| -> Vec<String> {
        // Forget the tracked flows: every connection is a new flow.
        let data = aya::maps::MapData::from_pin(&ct).expect("ct");
        let mut m: aya::maps::HashMap<
            _,
            netboot_datapath::layout::Ct4Key,
            netboot_datapath::layout::Ct4Val,
        > = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("ct map");
        let keys: Vec<_> = m.keys().flatten().collect();
        for k in keys {
            let _ = m.remove(&k);
        }
        let res = client(
            &client_cg.path,
            &c.client,
            ClientOp::TcpFromPorts {
                addr: v4([192, 168, 50, 1], 30080),
                ports: ports.to_vec(),
            },
        );
        seen(&res).into_iter().map(|(backend, _)| backend).collect()
    };
    let first = run(&ports);
    let expected: Vec<String> = ports.iter().map(|p| predict(*p)).collect();
    assert_eq!(
        first, expected,
        "each flow reaches its table entry's backend"
    );
    let distinct: std::collections::BTreeSet<&String> = first.iter().collect();
    assert!(distinct.len() >= 4, "spread over the backends: {first:?}");
    assert_eq!(run(&ports), first, "the same flows, the same backends");

    // One of six backends goes: only its flows move (plus Maglev's few).
    let removed = "10.200.2.11";
    let rest: Vec<&str> = all.iter().copied().filter(|b| *b != removed).collect();
    let predict = program(&rest);
    let after = run(&ports);
    let expected: Vec<String> = ports.iter().map(|p| predict(*p)).collect();
    assert_eq!(after, expected);
    let on_removed = first.iter().filter(|b| *b == removed).count();
    let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
    println!(
        "NUMBERS maglev kernel: {} flows over 6 backends, {on_removed} on the removed one, {moved} changed backend after its removal",
        ports.len()
    );
    assert!(!after.iter().any(|b| b == removed));
    assert!(
        moved >= on_removed && moved <= on_removed + 3,
        "{first:?} -> {after:?}"
    );
    let ctr = recon.maps().counters().expect("counters");
    assert!(
        ctr.0
            .iter()
            .any(|(k, v)| *k == "nodeport_maglev" && *v >= 180),
        "{ctr:?}"
    );
}

/// The flow ring buffer, read directly (no agent), with events turned on.
struct FlowRing(aya::maps::RingBuf<aya::maps::MapData>);

impl FlowRing {
    fn on(pins: &netboot_datapath::pins::Pins) -> Self {
        let data =
            aya::maps::MapData::from_pin(pins.map(netboot_datapath::layout::names::FLOW_RING))
                .expect("open ring");
        let ring = aya::maps::RingBuf::try_from(aya::maps::Map::from_map_data(data).expect("map"))
            .expect("ringbuf");
        netboot_datapath::flows::set_enabled(pins, true, 0).expect("flow events on");
        Self(ring)
    }

    /// Every unread event, decoded.
    fn drain(&mut self) -> Vec<netboot_datapath::flows::Flow> {
        let mut out = Vec::new();
        while let Some(rec) = self.0.next() {
            let ev = netboot_datapath::layout::FlowEvent::from_bytes(&rec).expect("record size");
            out.push(netboot_datapath::flows::from_event(&ev, 0).expect("decodes"));
        }
        out
    }
}

// ---- loadBalancerSourceRanges --------------------------------------------

/// A LoadBalancer Service whose LB IP (203.0.113.10, VIP mode) admits only
/// the sources in `ranges`.
fn sr_services(
    ranges: &str,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let text = format!(
        "
kind: Service
metadata: {{name: guarded, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  loadBalancerSourceRanges: {ranges}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30090}}]
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.10, ipMode: VIP}}]
---
kind: EndpointSlice
metadata: {{name: guarded-1, namespace: default, labels: {{kubernetes.io/service-name: guarded}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.200.1.10], nodeName: node-a}}
"
    );
    parse_objects(&text)
}

/// kube-proxy drops a new flow to an LB IP from outside
/// `loadBalancerSourceRanges` (its firewall chain); so does the tc path,
/// while the same Service's NodePort stays open to everyone (the ranges
/// guard the LB IP only), and a change of the ranges applies to new flows.
#[test]
fn load_balancer_source_ranges_admit_only_their_sources_on_the_lb_ip() {
    require_privileges();
    let c = Cluster::new("sr");
    c.client
        .ip(&["route", "add", "203.0.113.10/32", "via", "192.168.50.1"]);
    let _pa = PeerServer::start(&c.pod_a, "pod-a");
    let agent_cg = TestCgroup::new("nbns-sr-agent");
    let client_cg = TestCgroup::new("nbns-sr-client");
    let pins = TestPins::new("nbns-sr");
    loader::install(&pins.pins, &agent_cg.path, &NP_SIZES, true).expect("install");
    let node_ips = ["192.168.50.1".parse().unwrap()];
    let rules = Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("maps")).expect("recover");
    let mut sr = netboot_datapath::srcrange::SourceRanges::open(&pins.pins).expect("trie");
    let mut program = |ranges: &str| {
        let (svcs, slices) = sr_services(ranges);
        recon
            .reconcile(&desired::build(&svcs, &slices, rules))
            .expect("reconcile");
        sr.sync(&recon.source_ranges()).expect("source ranges");
        recon.source_ranges()
    };
    // The client (192.168.50.100) is inside the first ranges.
    let written = program("[192.168.50.0/24, 10.0.0.0/8]");
    assert_eq!(written.len(), 1, "one guarded LB IP frontend: {written:?}");
    // The two ranges, and the LB IP itself: 192.168.50.0/24 holds the node's
    // address, so a node's own request coming back from the VIP is allowed
    // (kube-proxy's allowFromNode).
    assert_eq!(
        written[0].1,
        vec![
            (Ipv4Addr::new(10, 0, 0, 0).into(), 8),
            (Ipv4Addr::new(192, 168, 50, 0).into(), 24),
            (Ipv4Addr::new(203, 0, 113, 10).into(), 32)
        ],
        "{written:?}"
    );
    attach_node_a(&c, &pins);
    let tcp = |addr: SocketAddrV4, count: u32| {
        client(&client_cg.path, &c.client, ClientOp::Tcp { addr, count })
    };
    let s = seen(&tcp(v4([203, 0, 113, 10], 80), 10));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "192.168.50.100"),
        "inside the ranges: served, client IP kept: {s:?}"
    );

    // Ranges that leave the client out: its new flows to the LB IP are dropped.
    let written = program("[10.0.0.0/8]");
    assert_eq!(
        written[0].1,
        vec![(std::net::IpAddr::from(Ipv4Addr::new(10, 0, 0, 0)), 8)]
    );
    let mut ring = FlowRing::on(&pins.pins);
    let res = tcp(v4([203, 0, 113, 10], 80), 1);
    assert!(!res[0].ok, "outside the ranges: dropped: {res:?}");
    // Each dropped SYN (the client retries) is a `denied` flow naming it.
    let evs = ring.drain();
    let client_ip: IpAddr = "192.168.50.100".parse().unwrap();
    assert!(
        !evs.is_empty()
            && evs.iter().all(|f| f.hook == "packet"
                && f.verdict == netboot_datapath::flows::Verdict::Denied
                && f.reason == "nodeport_src_range_denied"
                && f.client_ip == Some(client_ip)
                && f.frontend_ip == "203.0.113.10".parse::<IpAddr>().unwrap()
                && f.frontend_port == 80
                && f.backend_ip.is_none()),
        "each dropped SYN is a denied event: {evs:?}"
    );
    // The NodePort of the same Service is not guarded (kube-proxy's ranges
    // apply to the LB IP only).
    let s = seen(&tcp(v4([192, 168, 50, 1], 30090), 5));
    assert!(s.iter().all(|(n, _)| n == "pod-a"), "{s:?}");

    // A local socket (in the hooked cgroup, on node-a) to the guarded LB IP:
    // socket LB cannot know its source at connect(), so it leaves the address
    // alone (here node-a has no route to it: the connect fails, untranslated).
    let res = client(
        &agent_cg.path,
        &c.node_a,
        ClientOp::Tcp {
            addr: v4([203, 0, 113, 10], 80),
            count: 1,
        },
    );
    assert!(!res[0].ok, "not translated by socket LB: {res:?}");

    let ctr = recon.maps().counters().expect("counters");
    let get = |n: &str| {
        ctr.0
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    assert!(get("nodeport_src_range_denied") > 0, "{ctr:?}");
    assert!(get("src_range_passed") > 0, "{ctr:?}");

    // Ranges removed: the LB IP is open again, and the trie is emptied.
    let (svcs, slices) = sr_services("[]");
    recon
        .reconcile(&desired::build(&svcs, &slices, rules))
        .expect("reconcile");
    assert!(recon.source_ranges().is_empty());
    sr.sync(&recon.source_ranges()).expect("source ranges");
    assert!(sr.is_empty());
    let s = seen(&tcp(v4([203, 0, 113, 10], 80), 5));
    assert!(s.iter().all(|(n, _)| n == "pod-a"), "{s:?}");
    println!(
        "NUMBERS lb source ranges: inside served 10/10, outside dropped, denied counter {}",
        get("nodeport_src_range_denied")
    );
}

// ---- Flow lifetimes of the per-packet path ----------------------------------

/// A second Local-policy NodePort with the same single backend as `loc`.
const CT_EXTRA: &str = "
---
kind: Service
metadata: {name: loc2, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.83
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30083}]
---
kind: EndpointSlice
metadata: {name: loc2-1, namespace: default, labels: {kubernetes.io/service-name: loc2}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.1.10], nodeName: node-a}
";

/// A client that reuses its source port for a new connection must be served
/// even when the backend tuple is the one a finished flow used (the stale
/// reply entry is taken over), a bare SYN on a closing flow chooses anew, and
/// entries lapse after their lifetime, when the agent's sweep deletes them.
/// Before lifetimes, the reused port's SYN was dropped as a tuple clash for
/// as long as the old entry sat in the LRU table.
#[test]
fn a_reused_client_port_is_served_and_finished_flows_lapse_after_their_lifetime() {
    use netboot_datapath::conntrack;
    require_privileges();
    let c = Cluster::new("ct");
    let _pa = PeerServer::start(&c.pod_a, "pod-a");
    let _pb = PeerServer::start(&c.pod_b, "pod-b");
    let agent_cg = TestCgroup::new("nbns-ct-agent");
    let client_cg = TestCgroup::new("nbns-ct-client");
    let pins = TestPins::new("nbns-ct");
    loader::install(&pins.pins, &agent_cg.path, &NP_SIZES, true).expect("install");
    let close = 2;
    conntrack::set_timeouts(
        &pins.pins,
        &netboot_contract::config::Conntrack {
            tcp_close_timeout_seconds: close,
            ..netboot_contract::config::Conntrack::DEFAULT
        },
    )
    .expect("timeouts");
    let (svcs, slices) = parse_objects(&format!("{NP_SERVICES}{CT_EXTRA}"));
    let node_ips = ["192.168.50.1".parse().unwrap()];
    let rules = Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("maps")).expect("recover");
    recon
        .reconcile(&desired::build(&svcs, &slices, rules))
        .expect("reconcile");
    attach_node_a(&c, &pins);
    let from = |addr: SocketAddrV4, port: u16| {
        client(
            &client_cg.path,
            &c.client,
            ClientOp::TcpFromPorts {
                addr,
                ports: vec![port],
            },
        )
    };
    let counter = |n: &str| {
        recon
            .maps()
            .counters()
            .expect("counters")
            .0
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };

    // Port 41001 to loc (pod-a), then at once to loc2 (pod-a again): the
    // backend tuple 10.200.1.10:8080 <-> 192.168.50.100:41001 is reused.
    let port = 41001;
    let s = seen(&from(v4([192, 168, 50, 1], 30081), port));
    assert_eq!(s, [("pod-a".to_string(), "192.168.50.100".to_string())]);
    let rows = conntrack::list(&pins.pins, conntrack::monotonic_secs()).expect("ct list");
    assert_eq!(rows.len(), 2, "forward and reply: {rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.flags == ["closing"] && (0..=i64::from(close)).contains(&r.expires_in)),
        "a finished flow is closing and lapses within tcpCloseTimeoutSeconds: {rows:?}"
    );
    let s = seen(&from(v4([192, 168, 50, 1], 30083), port));
    assert_eq!(s, [("pod-a".to_string(), "192.168.50.100".to_string())]);
    assert!(
        counter("nodeport_ct_replaced") >= 1,
        "the stale reply entry was taken over"
    );
    // The same port to loc again: its forward entry is closing, the bare SYN
    // starts a new flow.
    let s = seen(&from(v4([192, 168, 50, 1], 30081), port));
    assert_eq!(s, [("pod-a".to_string(), "192.168.50.100".to_string())]);
    assert!(counter("nodeport_ct_reopened") >= 1);
    assert_eq!(counter("nodeport_ct_clash"), 0);

    // Many reused ports across both policies (the flake this fixes: a random
    // ephemeral port of a Cluster-policy flow to pod-a, reused for loc).
    let ports: Vec<u16> = (42001..42021).collect();
    for p in &ports {
        let s = seen(&from(v4([192, 168, 50, 1], 30080), *p));
        assert_eq!(s.len(), 1);
        let s = seen(&from(v4([192, 168, 50, 1], 30081), *p));
        assert_eq!(s[0].0, "pod-a", "port {p}: {s:?}");
    }

    // Lapsing: after tcpCloseTimeoutSeconds every entry is lapsed; the sweep
    // deletes them all and leaves nothing live.
    std::thread::sleep(Duration::from_secs(u64::from(close) + 2));
    let now = conntrack::monotonic_secs();
    let before = conntrack::list(&pins.pins, now).expect("ct list");
    assert!(
        !before.is_empty() && before.iter().all(|r| r.expires_in < 0),
        "{before:?}"
    );
    let sw = conntrack::sweep(&pins.pins, now).expect("sweep");
    assert_eq!(sw.deleted as usize, before.len(), "{sw:?}");
    assert_eq!(sw.live, 0, "{sw:?}");
    assert_eq!(sw.capacity, 2 * 65536, "nb_ct4 + nb_ct6: {sw:?}");
    assert!(conntrack::list(&pins.pins, now)
        .expect("ct list")
        .is_empty());
    // A lapsed entry still in the table is treated as absent: port 41001 again.
    let s = seen(&from(v4([192, 168, 50, 1], 30083), port));
    assert_eq!(s[0].0, "pod-a");
    println!(
        "NUMBERS conntrack: {} entries swept after {}s; counters replaced {} reopened {} lapsed {} clash {}",
        sw.deleted,
        close + 2,
        counter("nodeport_ct_replaced"),
        counter("nodeport_ct_reopened"),
        counter("nodeport_ct_lapsed"),
        counter("nodeport_ct_clash")
    );
}

// ---- IPv6 on the per-packet path -------------------------------------------

const NP_SERVICES6: &str = "
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80, 'fd00:96::80']
  ipFamilies: [IPv4, IPv6]
  externalIPs: ['2001:db8:7::7']
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
kind: Service
metadata: {name: loc, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.81
  clusterIPs: [10.96.0.81, 'fd00:96::81']
  ipFamilies: [IPv4, IPv6]
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
kind: Service
metadata: {name: far, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.82
  clusterIPs: [10.96.0.82, 'fd00:96::82']
  ipFamilies: [IPv4, IPv6]
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30082}]
---
kind: EndpointSlice
metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:1::10'], nodeName: node-a}
- {addresses: ['fd00:200:2::10'], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: loc-6, namespace: default, labels: {kubernetes.io/service-name: loc}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:1::10'], nodeName: node-a}
- {addresses: ['fd00:200:2::10'], nodeName: node-b}
---
kind: EndpointSlice
metadata: {name: far-6, namespace: default, labels: {kubernetes.io/service-name: far}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:2::10'], nodeName: node-b}
---
kind: Service
metadata: {name: open6, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 'fd00:96::90'
  ipFamilies: [IPv6]
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: ['fd00:50::100/128']
  ports: [{port: 80, targetPort: 8080, nodePort: 30090}]
status: {loadBalancer: {ingress: [{ip: '2001:db8:20::1'}]}}
---
kind: Service
metadata: {name: shut6, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 'fd00:96::91'
  ipFamilies: [IPv6]
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: ['2001:db8:ffff::/48', '10.0.0.0/8']
  ports: [{port: 80, targetPort: 8080, nodePort: 30091}]
status: {loadBalancer: {ingress: [{ip: '2001:db8:20::2'}]}}
---
kind: Service
metadata: {name: v4only, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 'fd00:96::92'
  ipFamilies: [IPv6]
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: ['10.0.0.0/8']
  ports: [{port: 80, targetPort: 8080, nodePort: 30092}]
status: {loadBalancer: {ingress: [{ip: '2001:db8:20::3'}]}}
---
kind: EndpointSlice
metadata: {name: open6-1, namespace: default, labels: {kubernetes.io/service-name: open6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:1::10'], nodeName: node-a}
---
kind: EndpointSlice
metadata: {name: shut6-1, namespace: default, labels: {kubernetes.io/service-name: shut6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:1::10'], nodeName: node-a}
---
kind: EndpointSlice
metadata: {name: v4only-1, namespace: default, labels: {kubernetes.io/service-name: v4only}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:200:1::10'], nodeName: node-a}
";

/// The IPv6 twin of the IPv4 per-packet test: a dual-stack NodePort from an
/// external IPv6 client, local backend DNATed (client address kept), remote
/// one DNATed + SNATed to node-a's IPv6 address; externalTrafficPolicy
/// Local; the IPv6 externalIP; and a reused client port.
#[test]
fn ipv6_external_clients_reach_node_ports_with_snat_for_remote_backends_and_their_own_address_under_local_policy(
) {
    require_privileges();
    let c = Cluster::new("n6");
    let _pa = PeerServer::start(&c.pod_a, "pod-a");
    let _pb = PeerServer::start(&c.pod_b, "pod-b");
    let agent_cg = TestCgroup::new("nbns-n6-agent");
    let client_cg = TestCgroup::new("nbns-n6-client");
    let pins = TestPins::new("nbns-n6");
    loader::install(&pins.pins, &agent_cg.path, &NP_SIZES, true).expect("install");
    let (svcs, slices) = parse_objects(NP_SERVICES6);
    let node_ips = [
        "192.168.50.1".parse().unwrap(),
        "fd00:50::1".parse().unwrap(),
    ];
    let rules = Rules {
        default_affinity_timeout: 10800,
        node: "node-a",
        zone: None,
        node_ips: &node_ips,
    };
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("maps")).expect("recover");
    recon
        .reconcile(&desired::build(&svcs, &slices, rules))
        .expect("reconcile");
    let mut sr = netboot_datapath::srcrange::SourceRanges::open(&pins.pins).expect("tries");
    let guarded = recon.source_ranges();
    sr.sync(&guarded).expect("source ranges");
    // open6 and shut6 are guarded with their IPv6 ranges; v4only's IPv6 LB
    // IP has no range of its family: unrestricted, as kube-proxy's IPv6
    // proxier leaves it.
    assert_eq!(guarded.len(), 2, "{guarded:?}");
    c.client.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:20::/64",
        "via",
        "fd00:50::1",
    ]);
    let (pins2, path) = (pins.pins.clone(), c.node_a.path());
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        // SAFETY: valid fd; CLONE_NEWNET only affects this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        loader::install_nodeport(
            &pins2,
            &NP_SIZES,
            &[NodePortDevice {
                ifname: "eth0".into(),
                snat: Some("192.168.50.1".parse().unwrap()),
                snat6: Some("fd00:50::1".parse().unwrap()),
            }],
        )
    })
    .join()
    .expect("thread")
    .expect("install_nodeport");

    let tcp6 = |addr: &str, count: u32| {
        client(
            &client_cg.path,
            &c.client,
            ClientOp::TcpAny {
                addr: addr.parse().unwrap(),
                count,
            },
        )
    };
    // Cluster policy: both backends; the local one sees the client, the
    // remote one node-a's IPv6 address.
    let res = tcp6("[fd00:50::1]:30080", 40);
    let s = seen(&res);
    let a: Vec<_> = s.iter().filter(|(n, _)| n == "pod-a").collect();
    let b: Vec<_> = s.iter().filter(|(n, _)| n == "pod-b").collect();
    assert!(!a.is_empty() && !b.is_empty(), "both backends: {s:?}");
    assert!(a.iter().all(|(_, src)| src == "fd00:50::100"), "{s:?}");
    assert!(b.iter().all(|(_, src)| src == "fd00:50::1"), "{s:?}");
    assert!(
        res.iter().all(|a| a.peer == "[fd00:50::1]:30080"),
        "replies come from the frontend: {res:?}"
    );
    // The IPv6 externalIP of the same Service.
    let s = seen(&tcp6("[2001:db8:7::7]:80", 20));
    assert!(
        s.iter()
            .all(|(n, src)| (n == "pod-a" && src == "fd00:50::100")
                || (n == "pod-b" && src == "fd00:50::1")),
        "{s:?}"
    );
    // Local policy: only pod-a, the client's own address.
    let s = seen(&tcp6("[fd00:50::1]:30081", 20));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "fd00:50::100"),
        "{s:?}"
    );
    // Local policy without a local endpoint: dropped.
    let res = tcp6("[fd00:50::1]:30082", 1);
    assert!(!res[0].ok, "{res:?}");

    // loadBalancerSourceRanges on IPv6 LB IPs.
    let s = seen(&tcp6("[2001:db8:20::1]:80", 5));
    assert!(
        s.iter()
            .all(|(n, src)| n == "pod-a" && src == "fd00:50::100"),
        "inside its IPv6 range: {s:?}"
    );
    let mut ring = FlowRing::on(&pins.pins);
    let res = tcp6("[2001:db8:20::2]:80", 1);
    assert!(!res[0].ok, "outside its IPv6 ranges: dropped: {res:?}");
    let evs: Vec<_> = ring
        .drain()
        .into_iter()
        .filter(|f| f.frontend_port == 80)
        .collect();
    assert!(
        !evs.is_empty()
            && evs
                .iter()
                .all(|f| f.verdict == netboot_datapath::flows::Verdict::Denied
                    && f.family == 6
                    && f.client_ip == "fd00:50::100".parse().ok()
                    && f.frontend_ip == "2001:db8:20::2".parse::<IpAddr>().unwrap()),
        "each dropped IPv6 SYN is a denied event: {evs:?}"
    );
    let s = seen(&tcp6("[2001:db8:20::3]:80", 3));
    assert!(
        s.iter().all(|(n, _)| n == "pod-a"),
        "no IPv6 range: open: {s:?}"
    );

    let rows = netboot_datapath::conntrack::list(
        &pins.pins,
        netboot_datapath::conntrack::monotonic_secs(),
    )
    .expect("ct list");
    assert!(
        rows.iter().any(|r| r.from.starts_with("[fd00:50::100]:")
            && r.to.contains("[fd00:200:2::10]:8080")
            && r.flags.contains(&"snat")),
        "an IPv6 SNAT flow is listed: {rows:?}"
    );
    let ctr = recon.maps().counters().expect("counters");
    let get = |n: &str| {
        ctr.0
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    assert!(
        get("nodeport_snat") > 0 && get("nodeport_local") > 0,
        "{ctr:?}"
    );
    assert!(get("nodeport_no_local_backend") > 0, "{ctr:?}");
    assert!(get("nodeport_src_range_denied") > 0, "{ctr:?}");
    println!(
        "NUMBERS ipv6 nodeport: {} local (client IP kept), {} remote (SNAT fd00:50::1)",
        a.len(),
        b.len()
    );
}

/// A full Maglev table map leaves the frontends that do not fit without a
/// table (random selection for them, counted and reported) and still writes
/// every other one; room made later is used.
#[test]
fn a_full_maglev_map_leaves_only_the_frontends_that_do_not_fit_without_a_table() {
    require_privileges();
    let pins = TestPins::new("nbns-mgfull");
    pins.pins.prepare().expect("pin dirs");
    let path = pins.pins.map("nb_lb4_maglev");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "32768",
            "entries",
            "2",
            "name",
            "nb_lb4_maglev",
            "flags",
            "1",
        ])
        .output()
        .expect("bpftool (tests/install-deps installs it)");
    assert!(out.status.success(), "{out:?}");
    let mut t = netboot_datapath::maglev::Tables::open_path(&path, 251, true).expect("open");
    let be = |i: u8| netboot_datapath::layout::L4Addr {
        ip: std::net::IpAddr::from([10, 0, 0, i]),
        port: 8080,
        proto: netboot_datapath::layout::PROTO_TCP,
    };
    let wanted = vec![(1u32, vec![be(1)]), (2, vec![be(2)]), (3, vec![be(3)])];
    let writes = t.sync(&wanted).expect("a full map is no error");
    assert_eq!((writes, t.len(), t.unfit()), (2, 2, 1));
    // One frontend gone: the third gets its table.
    let writes = t.sync(&wanted[1..]).expect("sync");
    assert_eq!((t.len(), t.unfit()), (2, 0), "writes {writes}");
}
