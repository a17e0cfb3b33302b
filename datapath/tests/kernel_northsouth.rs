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

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
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
