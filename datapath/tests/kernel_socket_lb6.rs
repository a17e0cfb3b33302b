//! Privileged (issue 13): AF_INET6 sockets through the socket LB, and
//! connected UDP sockets destroyed when their backend is removed. Each
//! semantic runs with IPv4 sockets, IPv4-mapped AF_INET6 sockets
//! (`::ffff:10.96.0.x`, what the JVM does) and IPv6 sockets (ULA VIPs
//! `fd00:96::x`, backends `fd00:244::1:x`, only inside the `nbv6-*`
//! namespaces this test creates; no route out).
//!
//! Run: `cargo test -p netboot-datapath --test kernel_socket_lb6` as root.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{BackendState, DesiredTable, Frontend};
use netboot_datapath::layout::{L4Addr, PROTO_TCP, PROTO_UDP};
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::reconcile::Reconciler;
use netboot_datapath::sock_term::SockTerm;
use support::*;

/// Child-process entry point for clients (does nothing in a normal run).
#[test]
fn helper() {
    support::helper_main();
}

const BE_PORT: u16 = 8080;

/// The three kinds of client socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    /// AF_INET to an IPv4 ClusterIP.
    V4,
    /// AF_INET6 to `::ffff:` + an IPv4 ClusterIP (v4 maps).
    Mapped,
    /// AF_INET6 to an IPv6 ClusterIP (lb6 maps).
    V6,
}

const ALL: [Fam; 3] = [Fam::V4, Fam::Mapped, Fam::V6];

impl Fam {
    /// The Service's VIP as programmed.
    fn vip(self, last: u8) -> IpAddr {
        match self {
            Fam::V4 | Fam::Mapped => IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
            Fam::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(last))),
        }
    }
    /// What the client dials (and should see as its peer).
    fn dial(self, last: u8, port: u16) -> SocketAddr {
        match (self, self.vip(last)) {
            (Fam::Mapped, IpAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port),
            (_, ip) => SocketAddr::new(ip, port),
        }
    }
    /// Backend `i`'s own address as this family's socket dials it.
    fn direct(self, i: u8) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(backend_ip(i)),
            Fam::Mapped => IpAddr::V6(backend_ip(i).to_ipv6_mapped()),
            Fam::V6 => IpAddr::V6(backend_ip6(i)),
        }
    }
    fn backend(self, i: u8) -> IpAddr {
        match self {
            Fam::V4 | Fam::Mapped => IpAddr::V4(backend_ip(i)),
            Fam::V6 => IpAddr::V6(backend_ip6(i)),
        }
    }
}

// Field order is drop order: servers, maps, pins (detach), cgroup, namespaces.
struct Env {
    _servers: Servers,
    recon: Reconciler<KernelMaps>,
    _pins: TestPins,
    cg: TestCgroup,
    topo: Topology,
}

impl Env {
    fn new(tag: &str, backends: u8) -> Self {
        require_privileges();
        let topo = Topology::new(&format!("nbv6-{tag}"), backends);
        let cg = TestCgroup::new(&format!("v6-{tag}"));
        let pins = TestPins::new(&format!("v6-{tag}"));
        let sizes = MapSizes {
            services: 1024,
            backends: 1024,
            affinity: 1024,
            reverse_nat: 1024,
        };
        loader::install(&pins.pins, &cg.path, &sizes, true).expect("install");
        let recon =
            Reconciler::recover(KernelMaps::open(&pins.pins).expect("open maps")).expect("recover");
        let names: Vec<String> = (1..=backends).map(|i| format!("be{i}")).collect();
        let mut list: Vec<(&str, IpAddr, u16)> = Vec::new();
        for i in 1..=backends {
            let n = names[usize::from(i) - 1].as_str();
            list.push((n, IpAddr::V4(backend_ip(i)), BE_PORT));
            list.push((n, IpAddr::V6(backend_ip6(i)), BE_PORT));
        }
        let servers = Servers::start_any(&topo.server, &list);
        Self {
            _servers: servers,
            recon,
            _pins: pins,
            cg,
            topo,
        }
    }

    fn client(&self, op: ClientOp) -> Vec<Attempt> {
        client(&self.cg.path, &self.topo.client, op)
    }

    fn counter(&self, name: &str) -> u64 {
        self.recon.maps().counters().expect("counters").get(name)
    }
}

fn frontend(
    fam: Fam,
    last: u8,
    port: u16,
    proto: u8,
    backends: &[u8],
    affinity: Option<u32>,
) -> Frontend {
    let ip = fam.vip(last);
    Frontend {
        addr: L4Addr { ip, port, proto },
        name: format!("test/{ip}:{port}"),
        affinity_timeout: affinity,
        backends: backends
            .iter()
            .map(|i| {
                (
                    L4Addr {
                        ip: fam.backend(*i),
                        port: BE_PORT,
                        proto,
                    },
                    BackendState::Active,
                )
            })
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

fn tally(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in attempts {
        let k = if a.ok {
            a.name.clone()
        } else {
            format!("errno{}", a.errno)
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

#[test]
fn tcp_and_udp_translate_and_the_app_sees_the_vip_for_every_socket_family() {
    let mut env = Env::new("basic", 1);
    let mut fes = Vec::new();
    for (n, fam) in ALL.iter().enumerate() {
        let last = 10 + n as u8;
        fes.push(frontend(*fam, last, 80, PROTO_TCP, &[1], None));
        fes.push(frontend(*fam, last, 53, PROTO_UDP, &[1], None));
    }
    env.recon.reconcile(&table(fes)).expect("reconcile");
    for (n, fam) in ALL.iter().enumerate() {
        let last = 10 + n as u8;
        let tcp = env.client(ClientOp::TcpAny {
            addr: fam.dial(last, 80),
            count: 3,
        });
        for a in &tcp {
            assert!(a.ok, "{fam:?} tcp failed: {a:?}");
            assert_eq!(a.name, "be1");
            assert_eq!(
                a.peer,
                fam.dial(last, 80).to_string(),
                "{fam:?}: getpeername must return the VIP"
            );
        }
        let udp = env.client(ClientOp::UdpAny {
            addr: fam.dial(last, 53),
            count: 3,
        });
        for a in &udp {
            assert!(a.ok, "{fam:?} udp failed: {a:?}");
            assert_eq!(a.name, "be1");
            assert_eq!(
                a.peer,
                fam.dial(last, 53).to_string(),
                "{fam:?}: UDP replies must come from the VIP (recvmsg)"
            );
        }
    }
    assert!(env.counter("connect_translated") >= 9);
    assert!(env.counter("recvmsg_translated") >= 9);
    assert!(env.counter("getpeername_translated") >= 9);
}

#[test]
fn client_ip_affinity_sticks_for_every_socket_family() {
    let mut env = Env::new("aff", 3);
    let mut fes = Vec::new();
    for (n, fam) in ALL.iter().enumerate() {
        fes.push(frontend(
            *fam,
            40 + n as u8,
            80,
            PROTO_TCP,
            &[1, 2, 3],
            Some(600),
        ));
        fes.push(frontend(
            *fam,
            40 + n as u8,
            53,
            PROTO_UDP,
            &[1, 2, 3],
            Some(600),
        ));
    }
    env.recon.reconcile(&table(fes)).expect("reconcile");
    for (n, fam) in ALL.iter().enumerate() {
        let last = 40 + n as u8;
        let t = tally(&env.client(ClientOp::TcpAny {
            addr: fam.dial(last, 80),
            count: 20,
        }));
        assert_eq!(
            t.len(),
            1,
            "{fam:?}: TCP affinity must pick one backend: {t:?}"
        );
        assert_eq!(t.values().sum::<usize>(), 20);
        // New UDP sockets (one per client process run) stick too.
        let mut seen = BTreeMap::new();
        for _ in 0..5 {
            for (k, v) in tally(&env.client(ClientOp::UdpAny {
                addr: fam.dial(last, 53),
                count: 1,
            })) {
                *seen.entry(k).or_insert(0) += v;
            }
        }
        assert_eq!(seen.len(), 1, "{fam:?}: UDP affinity: {seen:?}");
    }
    assert!(env.counter("affinity_hit") >= 3 * 19);
}

/// One socket family's run of the termination test; returns the latency
/// from the map change to the application seeing the error, in µs.
fn terminate_one(env: &mut Env, term: &mut SockTerm, fam: Fam, last: u8) -> (u64, u64, u64) {
    let fe = |bes: &[u8]| table(vec![frontend(fam, last, 53, PROTO_UDP, bes, None)]);
    env.recon.reconcile(&fe(&[1, 2])).expect("reconcile");
    env.recon.take_removed_backends();
    let mut g = spawn_client(
        &env.cg.path,
        &env.topo.client,
        &ClientOp::UdpTerm {
            addr: fam.dial(last, 53),
            // Both backends' own addresses: sockets connected there directly
            // are not the Service's, and stay.
            direct: [1, 2]
                .iter()
                .map(|i| SocketAddr::new(fam.direct(*i), BE_PORT))
                .collect(),
        },
    );
    let stdout = g.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let used = loop {
        let l = lines.next().expect("client exited early").expect("read");
        // libtest's "test helper ... " precedes it on the same line.
        if let Some((_, name)) = l.split_once("NBT-READY ") {
            break name.trim().to_string();
        }
    };
    let i: u8 = used.trim_start_matches("be").parse().expect("backend name");
    let keep = if i == 1 { 2 } else { 1 };

    // The map change: the backend goes; then the agent's step, timed.
    let t0 = monotonic_ns();
    env.recon.reconcile(&fe(&[keep])).expect("reconcile");
    let t1 = monotonic_ns();
    let removed = env.recon.take_removed_backends();
    assert_eq!(removed.len(), 1, "{removed:?}");
    let report = term
        .destroy(&removed, &[env.topo.client.path()])
        .expect("destroy");
    let t2 = monotonic_ns();
    assert_eq!(report.destroyed.len(), 1, "{fam:?}: {report:?}");
    assert_eq!(report.destroyed[0].result, 0);
    let d = &report.destroyed[0];
    assert_eq!(d.peer, SocketAddr::new(fam.backend(i), BE_PORT));
    let af = if fam == Fam::V4 { 2 } else { 10 };
    assert_eq!(d.family, af, "{fam:?}: the socket's family");

    // What the flow event of the destroyed socket says: who owned it (the
    // client's cgroup and netns) and which frontend it asked for (its
    // reverse entry, read by the iterator), named by the agent's reconciler.
    use std::os::unix::fs::MetadataExt as _;
    let cgroup_id = std::fs::metadata(&env.cg.path).expect("cgroup").ino();
    assert_eq!(
        d.cgroup_id, cgroup_id,
        "{fam:?}: the client's cgroup: {d:?}"
    );
    assert!(d.cookie != 0 && d.netns_cookie != 0, "{d:?}");
    // An IPv4-mapped destination is the IPv4 frontend (the v4 maps).
    let vip = fam.vip(last);
    assert_eq!(d.frontend, SocketAddr::new(vip, 53), "{fam:?}");
    let id = env.recon.service_id(&L4Addr {
        ip: vip,
        port: 53,
        proto: PROTO_UDP,
    });
    let flow = netboot_datapath::flows::terminated_flow(d, id, 1);
    assert_eq!(
        flow.verdict,
        netboot_datapath::flows::Verdict::Terminated,
        "{flow:?}"
    );
    assert!(
        id.is_some()
            && flow.hook == "terminate"
            && flow.frontend_ip == vip
            && flow.service_id == id.unwrap_or(0)
            && flow.backend_ip == Some(fam.backend(i))
            && flow.client_cgroup_id == cgroup_id
            && flow.family == if fam == Fam::V6 { 6 } else { 4 },
        "{fam:?}: {flow:?}"
    );

    let line = lines
        .find_map(|l| {
            l.ok()
                .and_then(|l| l.split_once("NBT-RESULT ").map(|(_, r)| r.to_string()))
        })
        .expect("client result");
    let _ = g.0.take().map(|mut c| c.wait());
    let res: Vec<Attempt> = serde_json::from_str(&line).expect("json");
    let [first, err, again, re, before, direct @ ..] = &res[..] else {
        panic!("{res:?}")
    };
    assert!(
        direct.len() == 2 && direct.iter().all(|a| a.ok),
        "{fam:?}: sockets connected to a backend's own address are left alone: {direct:?}"
    );
    assert!(first.ok && before.ok, "{fam:?}: {res:?}");
    assert_eq!(
        err.errno,
        libc::ECONNABORTED,
        "{fam:?}: the connected socket must fail with ECONNABORTED: {err:?}"
    );
    assert!(
        again.ok,
        "{fam:?}: the unconnected socket must be left alone: {again:?}"
    );
    assert!(re.ok, "{fam:?}: reconnect failed: {re:?}");
    assert_eq!(
        re.name,
        format!("be{keep}"),
        "{fam:?}: reconnect must reach the live backend"
    );
    let lat = err.mono_ns.saturating_sub(t0) / 1000;
    ((t1 - t0) / 1000, (t2 - t1) / 1000, lat)
}

#[test]
fn connected_udp_to_a_removed_backend_is_destroyed_and_unconnected_is_left_alone() {
    // Why: a connected UDP socket keeps its translated backend forever; without
    // termination it talks to a dead pod until the application gives up.
    let mut env = Env::new("term", 2);
    let mut term = SockTerm::load(&env._pins.pins)
        .expect("socket termination must be available on this kernel");
    for (n, fam) in ALL.iter().enumerate() {
        let (reconcile_us, iter_us, app_us) =
            terminate_one(&mut env, &mut term, *fam, 60 + n as u8);
        println!(
            "NUMBERS sock_term {fam:?}: map change (reconcile) {reconcile_us} us, iterator run {iter_us} us, map change -> app sees ECONNABORTED {app_us} us"
        );
    }
}

#[test]
fn removed_tcp_backends_destroy_nothing() {
    let env = Env::new("term-tcp", 1);
    let mut term = SockTerm::load(&env._pins.pins).expect("socket termination available");
    let r = term
        .destroy(
            &[L4Addr {
                ip: IpAddr::V4(backend_ip(1)),
                port: BE_PORT,
                proto: PROTO_TCP,
            }],
            &[],
        )
        .expect("destroy");
    assert_eq!(r.backends, 0);
    assert!(r.destroyed.is_empty());
}
