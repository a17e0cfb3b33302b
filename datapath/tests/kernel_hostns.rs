//! Privileged: `socketLB.hostNamespaceOnly` through the real agent (static
//! Services) on a "node" namespace with three pods on veth pairs:
//!
//! ```text
//!   node nbns-hn-n (the host netns; the agent runs here, ip_forward on)
//!     vethhn1 10.201.1.254 ── pod nbns-hn-p1 eth0 10.201.1.10  (client, "sidecar")
//!     vethhn2 10.201.2.254 ── pod nbns-hn-p2 eth0 10.201.2.10  (backend b2)
//!     vethhn3 10.201.3.254 ── pod nbns-hn-p3 eth0 10.201.3.10  (backend b3)
//! ```
//!
//! Namespaces `nbns-hn-*` only: no default route anywhere, no veth end in
//! the root namespace; iptables only inside the client pod's namespace.
//! Everything is removed on drop, pass or fail.
//!
//! Run: `cargo test -p netboot-datapath --test kernel_hostns` (as root)

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netboot_datapath::layout::CFG_F_HOST_NS_ONLY;
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

/// `web`: TCP 80 and UDP 53 on two backends; `sticky`: ClientIP affinity.
const STATIC: &str = "
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.80
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 8080}
---
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.81
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.201.2.10], nodeName: node-hn}
- {addresses: [10.201.3.10], nodeName: node-hn}
---
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.201.2.10], nodeName: node-hn}
- {addresses: [10.201.3.10], nodeName: node-hn}
";

const CONFIG: &str = "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacement: true\nmapSizes: {services: 1024, backends: 1024, affinity: 1024, reverseNat: 1024}\n";

/// The sidecar's port (Istio's outbound capture port).
const SIDECAR_PORT: u16 = 15001;

struct Node {
    node: Netns,
    pods: Vec<Netns>,
}

impl Node {
    fn new() -> Self {
        Self::tagged("hn")
    }

    /// Namespaces `nbns-<tag>-n`, `nbns-<tag>-p1..3` (tests running at once
    /// use different tags).
    fn tagged(tag: &str) -> Self {
        let node = Netns::new(&format!("nbns-{tag}-n"));
        let out = node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        assert!(out.status.success(), "{out:?}");
        let mut pods = Vec::new();
        for i in 1..=3 {
            let pod = Netns::new(&format!("nbns-{tag}-p{i}"));
            let host_if = format!("vethhn{i}");
            node.ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            node.ip(&[
                "addr",
                "add",
                &format!("10.201.{i}.254/24"),
                "dev",
                &host_if,
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            pod.ip(&["addr", "add", &format!("10.201.{i}.10/24"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["link", "set", "lo", "up"]);
            let gw = format!("10.201.{i}.254");
            // What a pod's default route would do here, without one.
            pod.ip(&["route", "add", "10.201.0.0/16", "via", &gw]);
            pod.ip(&["route", "add", "10.96.0.0/16", "via", &gw]);
            pods.push(pod);
        }
        Self { node, pods }
    }
}

/// A server thread in `ns`: TCP and UDP on `0.0.0.0:port`, answering each
/// connection / datagram with `answer(socket)`.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Backend `name`: answers `<name> <client address it sees>`, TCP and UDP.
    fn backend(ns: &Netns, name: &str) -> Self {
        let mut s = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let n = name.to_string();
        s.tcp(ns, 8080, move |stream| {
            let peer = stream.peer_addr().map(|a| a.ip().to_string());
            format!("{n} {}\n", peer.unwrap_or_default())
        });
        let (n, path, stop) = (name.to_string(), ns.path(), s.stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        s.threads.push(std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            netboot_harness::netns::enter_thread(&f).expect("setns");
            let udp = std::net::UdpSocket::bind("0.0.0.0:8080").expect("bind udp");
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            tx.send(()).expect("ready");
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{n} {}", from.ip()).as_bytes(), from);
                }
            }
        }));
        rx.recv_timeout(Duration::from_secs(5)).expect("udp server");
        s
    }

    /// The sidecar: answers `orig <SO_ORIGINAL_DST>` on TCP `port`.
    fn sidecar(ns: &Netns, port: u16) -> Self {
        let mut s = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        s.tcp(ns, port, |stream| {
            format!("orig {}\n", original_dst(stream))
        });
        s
    }

    fn tcp(
        &mut self,
        ns: &Netns,
        port: u16,
        answer: impl Fn(&std::net::TcpStream) -> String + Send + 'static,
    ) {
        self.tcp_on(ns, "0.0.0.0", port, answer)
    }

    /// A TCP server on `ip` (`::`: IPv6, and IPv4 clients as mapped).
    fn tcp_on(
        &mut self,
        ns: &Netns,
        ip: &'static str,
        port: u16,
        answer: impl Fn(&std::net::TcpStream) -> String + Send + 'static,
    ) {
        let (path, stop) = (ns.path(), self.stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        self.threads.push(std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            netboot_harness::netns::enter_thread(&f).expect("setns");
            let l = std::net::TcpListener::bind((ip, port)).expect("bind tcp");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(answer(&s).as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(300)),
                }
            }
        }));
        rx.recv_timeout(Duration::from_secs(5)).expect("tcp server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: where the connection was headed
/// before netfilter's REDIRECT.
fn original_dst(s: &std::net::TcpStream) -> String {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sin and len outlive the call; the fd is the stream's.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            &mut sin as *mut libc::sockaddr_in as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return format!("error:{}", std::io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    format!("{ip}:{}", u16::from_be(sin.sin_port))
}

/// The agent's /v1/status once `done` holds for it (20 s at most).
fn status_when(
    node: &Netns,
    dir: &std::path::Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    while t.elapsed() < Duration::from_secs(20) {
        if let Some((200, body)) = on_thread_in(node, || http_get("127.0.0.1:9890", "/v1/status")) {
            last = serde_json::from_str(&body).expect("status json");
            if done(&last) {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "agent: {what} not reached in 20 s; last status {last}\nlog:\n{}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );
}

fn counters(pins: &TestPins) -> Vec<(&'static str, u64)> {
    KernelMaps::open(&pins.pins)
        .expect("maps")
        .counters()
        .expect("counters")
        .0
}

fn delta(before: &[(&str, u64)], after: &[(&str, u64)], name: &str) -> u64 {
    let get = |c: &[(&str, u64)]| c.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v);
    get(after) - get(before)
}

/// (backend, source it saw) per attempt; panics on a failed one.
fn seen(res: &[Attempt]) -> Vec<(String, String)> {
    res.iter()
        .map(|a| {
            assert!(a.ok, "{res:?}");
            let (n, src) = a.name.split_once(' ').expect("name and source");
            (n.to_string(), src.to_string())
        })
        .collect()
}

fn iptables(ns: &Netns, args: &[&str]) {
    let out = ns.exec("iptables", args);
    assert!(
        out.status.success(),
        "iptables {args:?} in {}: {out:?}",
        ns.name
    );
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn pods_are_served_at_their_interface_so_a_sidecar_sees_the_cluster_ip_while_the_host_keeps_socket_lb(
) {
    require_privileges();
    let n = Node::new();
    let (pod, b2, b3) = (&n.pods[0], &n.pods[1], &n.pods[2]);
    let _s2 = Server::backend(b2, "b2");
    let _s3 = Server::backend(b3, "b3");
    let cg = TestCgroup::new("nbns-hn");
    let pins = TestPins::new("nbns-hn");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("{CONFIG}socketLB: {{hostNamespaceOnly: true}}\n"),
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), STATIC).expect("static");
    let mut agent = start_agent_in(
        BIN,
        &n.node,
        "node-hn",
        dir.path(),
        &cg.path,
        pins.pins.root(),
    );

    // The default podInterfaces (`veth*` among them) find the three pods.
    let st = status_when(&n.node, dir.path(), "pod interfaces attached", |s| {
        s["podInterfaces"] == 3 && s["socketLbHostNamespaceOnly"] == true
    });
    assert_eq!(
        loader::pod_interfaces_attached(&pins.pins),
        ["vethhn1", "vethhn2", "vethhn3"],
        "{st}"
    );
    let host_cookie = on_thread_in(&n.node, || {
        netboot_datapath::sys::netns_cookie().expect("cookie")
    });
    let cfg = KernelMaps::open(&pins.pins)
        .expect("maps")
        .config()
        .expect("config");
    assert_eq!(
        cfg.flags & CFG_F_HOST_NS_ONLY,
        CFG_F_HOST_NS_ONLY,
        "{cfg:?}"
    );
    assert_eq!(
        cfg.host_netns, host_cookie,
        "the agent's (node's) netns cookie"
    );
    let (_, metrics) =
        on_thread_in(&n.node, || http_get("127.0.0.1:9890", "/metrics")).expect("metrics");
    assert!(
        metrics.contains("netboot_datapath_pod_interfaces 3"),
        "{metrics}"
    );

    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 80), 80);
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 80), 53);
    let sticky = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 81), 80);

    // (a) A pod's client (its process in the agent's cgroup): the tc path.
    let before = counters(&pins);
    let res = client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: vip,
            count: 20,
        },
    );
    let s = seen(&res);
    assert!(
        res.iter().all(|a| a.peer == "10.96.0.80:80"),
        "peer = the ClusterIP: {res:?}"
    );
    assert!(
        s.iter().all(|(_, src)| src == "10.201.1.10"),
        "no SNAT: {s:?}"
    );
    assert!(
        s.iter().any(|(b, _)| b == "b2") && s.iter().any(|(b, _)| b == "b3"),
        "both backends: {s:?}"
    );
    let pod_us = median(res.iter().map(|a| a.micros).collect());
    let udp = client(
        &cg.path,
        pod,
        ClientOp::Udp {
            addr: dns,
            count: 5,
        },
    );
    assert!(
        udp.iter()
            .all(|a| a.ok && a.peer == "10.96.0.80:53" && a.name.ends_with(" 10.201.1.10")),
        "UDP replies come from the ClusterIP: {udp:?}"
    );
    let st = seen(&client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: sticky,
            count: 10,
        },
    ));
    assert!(
        st.iter().all(|(b, _)| *b == st[0].0),
        "ClientIP affinity: {st:?}"
    );
    let after = counters(&pins);
    assert!(
        delta(&before, &after, "pod_translated") >= 20 + 1 + 10,
        "{after:?}"
    );
    assert!(
        delta(&before, &after, "pod_reply_translated") > 0,
        "{after:?}"
    );
    assert!(
        delta(&before, &after, "sock_pod_netns_skipped") >= 20 + 5 + 10,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "connect_translated"), 0, "{after:?}");
    assert_eq!(delta(&before, &after, "sendmsg_translated"), 0, "{after:?}");
    assert!(delta(&before, &after, "affinity_hit") >= 9, "{after:?}");

    // The point: a sidecar's REDIRECT sees the ClusterIP as original destination.
    let _sidecar = Server::sidecar(pod, SIDECAR_PORT);
    let port = SIDECAR_PORT.to_string();
    let redirect = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ];
    iptables(pod, &redirect);
    let res = client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: vip,
            count: 3,
        },
    );
    assert!(
        res.iter().all(|a| a.ok && a.name == "orig 10.96.0.80:80"),
        "SO_ORIGINAL_DST is the ClusterIP: {res:?}"
    );
    iptables(pod, &["-t", "nat", "-F", "OUTPUT"]);

    // (b) The host's own client: still the socket LB (the backend sees the
    // node's address on its veth).
    let before = counters(&pins);
    let res = client(
        &cg.path,
        &n.node,
        ClientOp::Tcp {
            addr: vip,
            count: 10,
        },
    );
    let s = seen(&res);
    assert!(res.iter().all(|a| a.peer == "10.96.0.80:80"), "{res:?}");
    assert!(
        s.iter()
            .all(|(b, src)| (b == "b2" && src == "10.201.2.254")
                || (b == "b3" && src == "10.201.3.254")),
        "{s:?}"
    );
    let host_us = median(res.iter().map(|a| a.micros).collect());
    let after = counters(&pins);
    assert!(
        delta(&before, &after, "connect_translated") >= 10,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "pod_translated"), 0, "{after:?}");
    assert_eq!(
        delta(&before, &after, "sock_pod_netns_skipped"),
        0,
        "{after:?}"
    );

    // No agent running: the pinned programs and the flag keep serving pods.
    drop(agent);
    let s = seen(&client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: vip,
            count: 5,
        },
    ));
    assert!(s.iter().all(|(_, src)| src == "10.201.1.10"), "{s:?}");

    // (c) Turned off: the next agent detaches the pod interfaces' programs
    // and the socket LB serves pods again; the sidecar now sees the backend.
    std::fs::write(dir.path().join("config.yaml"), CONFIG).expect("config");
    agent = start_agent_in(
        BIN,
        &n.node,
        "node-hn",
        dir.path(),
        &cg.path,
        pins.pins.root(),
    );
    let st = status_when(&n.node, dir.path(), "pod interfaces detached", |s| {
        s["ready"] == true && s["podInterfaces"] == 0 && s["socketLbHostNamespaceOnly"] == false
    });
    assert!(
        loader::pod_interfaces_attached(&pins.pins).is_empty(),
        "{st}"
    );
    let cfg = KernelMaps::open(&pins.pins)
        .expect("maps")
        .config()
        .expect("config");
    assert_eq!(cfg.flags & CFG_F_HOST_NS_ONLY, 0, "{cfg:?}");
    let before = counters(&pins);
    let res = client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: vip,
            count: 5,
        },
    );
    assert!(res.iter().all(|a| a.peer == "10.96.0.80:80"), "{res:?}");
    seen(&res);
    let after = counters(&pins);
    assert!(
        delta(&before, &after, "connect_translated") >= 5,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "pod_translated"), 0, "{after:?}");
    iptables(pod, &redirect);
    let res = client(
        &cg.path,
        pod,
        ClientOp::Tcp {
            addr: vip,
            count: 3,
        },
    );
    assert!(
        res.iter()
            .all(|a| a.ok
                && (a.name == "orig 10.201.2.10:8080" || a.name == "orig 10.201.3.10:8080")),
        "with socket LB the sidecar sees a backend, not the ClusterIP: {res:?}"
    );
    drop(agent);
    println!(
        "NUMBERS hostns: pod via tc path median connect+first line {pod_us} us; host via socket LB {host_us} us"
    );
}

/// An IPv6 Service for the IPv6 pod path.
const STATIC6: &str = "
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: 'fd00:96::80'
  ipFamilies: [IPv6]
  ports: [{port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ['fd00:201:2::10'], nodeName: node-hn}
- {addresses: ['fd00:201:3::10'], nodeName: node-hn}
";

/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
fn original_dst6(s: &std::net::TcpStream) -> String {
    const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
    let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: sin6 and len outlive the call; the fd is the stream's.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            &mut sin6 as *mut libc::sockaddr_in6 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return format!("error:{}", std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
    format!("[{ip}]:{}", u16::from_be(sin6.sin6_port))
}

/// The IPv6 twin: a pod's IPv6 ClusterIP traffic goes through the pod
/// interface's tc path too (nb_ct6), and a sidecar's ip6tables REDIRECT sees
/// the IPv6 ClusterIP as its original destination.
#[test]
fn ipv6_pods_are_served_at_their_interface_so_a_sidecar_sees_the_ipv6_cluster_ip() {
    require_privileges();
    let n = Node::tagged("h6");
    for (i, ns) in n.pods.iter().enumerate() {
        let i = i + 1;
        n.node.ip(&[
            "addr",
            "add",
            &format!("fd00:201:{i}::fe/64"),
            "dev",
            &format!("vethhn{i}"),
            "nodad",
        ]);
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:201:{i}::10/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let gw = format!("fd00:201:{i}::fe");
        ns.ip(&["-6", "route", "add", "fd00:201::/32", "via", &gw]);
        ns.ip(&["-6", "route", "add", "fd00:96::/64", "via", &gw]);
    }
    let out = n
        .node
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    assert!(out.status.success(), "{out:?}");
    let (pod, b2, b3) = (&n.pods[0], &n.pods[1], &n.pods[2]);
    let mut servers = Vec::new();
    for (ns, name) in [(b2, "b2"), (b3, "b3")] {
        let mut s = Server {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        s.tcp_on(ns, "::", 8080, move |stream| {
            let peer = stream
                .peer_addr()
                .map(|a| a.ip().to_canonical().to_string());
            format!("{name} {}\n", peer.unwrap_or_default())
        });
        servers.push(s);
    }
    let cg = TestCgroup::new("nbns-hn6");
    let pins = TestPins::new("nbns-hn6");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("{CONFIG}socketLB: {{hostNamespaceOnly: true}}\n"),
    )
    .expect("config");
    std::fs::write(dir.path().join("static.yaml"), STATIC6).expect("static");
    let agent = start_agent_in(
        BIN,
        &n.node,
        "node-hn",
        dir.path(),
        &cg.path,
        pins.pins.root(),
    );
    status_when(&n.node, dir.path(), "pod interfaces attached", |s| {
        s["podInterfaces"] == 3 && s["ready"] == true
    });

    let vip: std::net::SocketAddr = "[fd00:96::80]:80".parse().unwrap();
    let before = counters(&pins);
    let res = client(
        &cg.path,
        pod,
        ClientOp::TcpAny {
            addr: vip,
            count: 20,
        },
    );
    let s = seen(&res);
    assert!(
        res.iter().all(|a| a.peer == "[fd00:96::80]:80"),
        "peer = the IPv6 ClusterIP: {res:?}"
    );
    assert!(
        s.iter().all(|(_, src)| src == "fd00:201:1::10"),
        "no SNAT: {s:?}"
    );
    assert!(
        s.iter().any(|(b, _)| b == "b2") && s.iter().any(|(b, _)| b == "b3"),
        "both backends: {s:?}"
    );
    let after = counters(&pins);
    assert!(delta(&before, &after, "pod_translated") >= 20, "{after:?}");
    assert!(
        delta(&before, &after, "sock_pod_netns_skipped") >= 20,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "connect_translated"), 0, "{after:?}");

    // The sidecar (IPv6): ip6tables REDIRECT, IP6T_SO_ORIGINAL_DST.
    let mut sidecar = Server {
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::new(),
    };
    sidecar.tcp_on(pod, "::", SIDECAR_PORT, |stream| {
        format!("orig {}\n", original_dst6(stream))
    });
    let port = SIDECAR_PORT.to_string();
    let out = pod.exec(
        "ip6tables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "fd00:96::/64",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let res = client(
        &cg.path,
        pod,
        ClientOp::TcpAny {
            addr: vip,
            count: 3,
        },
    );
    assert!(
        res.iter()
            .all(|a| a.ok && a.name == "orig [fd00:96::80]:80"),
        "IP6T_SO_ORIGINAL_DST is the IPv6 ClusterIP: {res:?}"
    );
    drop(sidecar);
    drop(agent);
    drop(servers);
}
