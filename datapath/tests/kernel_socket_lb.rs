//! Privileged: loads the real socket-LB programs into the kernel, attaches
//! them to a cgroup this test creates, and drives the reconciler with
//! in-process desired state. Clients run in that cgroup inside a client netns;
//! backends answer from a server netns (both created and removed here).
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_socket_lb`
//! (panics, never skips, without root / BPF).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{BackendState, DesiredTable, Frontend};
use netboot_datapath::layout::{names, L4Addr, PROTO_TCP, PROTO_UDP, REV_TCP_SLOTS};
use netboot_datapath::loader::{self, LinkAction};
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::reconcile::Reconciler;
use support::*;

/// Child-process entry point for clients (does nothing in a normal run).
#[test]
fn helper() {
    support::helper_main();
}

const BE_PORT: u16 = 8080;

fn small_sizes() -> MapSizes {
    MapSizes {
        services: 1024,
        backends: 1024,
        affinity: 1024,
        reverse_nat: 1024,
    }
}

// Field order is drop order: servers, maps, pins (detach), cgroup, namespaces.
struct Env {
    _servers: Option<Servers>,
    recon: Reconciler<KernelMaps>,
    pins: TestPins,
    cg: TestCgroup,
    topo: Topology,
}

impl Env {
    fn new(tag: &str, backends: u8, replace: bool) -> Self {
        require_privileges();
        let topo = Topology::new(tag, backends);
        let cg = TestCgroup::new(tag);
        let pins = TestPins::new(tag);
        loader::install(&pins.pins, &cg.path, &small_sizes(), replace).expect("install");
        let recon =
            Reconciler::recover(KernelMaps::open(&pins.pins).expect("open maps")).expect("recover");
        let names: Vec<String> = (1..=backends).map(|i| format!("be{i}")).collect();
        let list: Vec<(&str, Ipv4Addr, u16)> = (1..=backends)
            .map(|i| (names[usize::from(i) - 1].as_str(), backend_ip(i), BE_PORT))
            .collect();
        let servers = Servers::start(&topo.server, &list);
        Self {
            _servers: Some(servers),
            recon,
            pins,
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

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn frontend(
    ip: Ipv4Addr,
    port: u16,
    proto: u8,
    backends: &[(u8, BackendState)],
    affinity: Option<u32>,
) -> Frontend {
    Frontend {
        addr: L4Addr {
            ip: ip.into(),
            port,
            proto,
        },
        name: format!("test/{ip}:{port}"),
        affinity_timeout: affinity,
        backends: backends
            .iter()
            .map(|(i, s)| {
                (
                    L4Addr {
                        ip: backend_ip(*i).into(),
                        port: BE_PORT,
                        proto,
                    },
                    *s,
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
        *m.entry(if a.ok {
            a.name.clone()
        } else {
            format!("errno{}", a.errno)
        })
        .or_default() += 1;
    }
    m
}

use BackendState::{Active, Terminating};

#[test]
fn tcp_and_udp_reach_a_backend_and_the_app_sees_the_vip() {
    let mut env = Env::new("basic", 1, true);
    env.recon
        .reconcile(&table(vec![
            frontend(vip(10), 80, PROTO_TCP, &[(1, Active)], None),
            frontend(vip(10), 53, PROTO_UDP, &[(1, Active)], None),
        ]))
        .expect("reconcile");

    let tcp = env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(10), 80),
        count: 3,
    });
    for a in &tcp {
        assert!(a.ok, "tcp attempt failed: {a:?}");
        assert_eq!(a.name, "be1");
        assert_eq!(a.peer, "10.96.0.10:80", "getpeername must return the VIP");
    }
    let udp = env.client(ClientOp::Udp {
        addr: SocketAddrV4::new(vip(10), 53),
        count: 3,
    });
    for a in &udp {
        assert!(a.ok, "udp attempt failed: {a:?}");
        assert_eq!(a.name, "be1");
        assert_eq!(
            a.peer, "10.96.0.10:53",
            "UDP replies must come from the VIP (recvmsg4)"
        );
    }
    assert!(env.counter("connect_translated") >= 3);
    assert!(env.counter("sendmsg_translated") >= 3);
    assert!(env.counter("recvmsg_translated") >= 3);
    assert!(env.counter("getpeername_translated") >= 3);
}

/// The pinned `nb_rev_tcp` map and the slot of `cookie` in it.
fn rev_tcp(pins: &netboot_datapath::pins::Pins, cookie: u64) -> (std::os::fd::OwnedFd, [u8; 4]) {
    let fd = netboot_datapath::sys::obj_get(&pins.map(names::REV_TCP)).expect("open nb_rev_tcp");
    let idx = (cookie as u32) & (REV_TCP_SLOTS - 1);
    (fd, idx.to_ne_bytes())
}

/// One `nb_rev_tcp` slot's bytes (`struct nb_rev_tcp`, 48 bytes).
fn rev_tcp_slot(pins: &netboot_datapath::pins::Pins, cookie: u64) -> [u8; 48] {
    use std::os::fd::AsFd;
    let (fd, key) = rev_tcp(pins, cookie);
    let mut v = [0u8; 48];
    assert!(netboot_datapath::sys::map_lookup(fd.as_fd(), &key, &mut v).expect("lookup"));
    v
}

fn set_rev_tcp_slot(pins: &netboot_datapath::pins::Pins, cookie: u64, v: &[u8; 48]) {
    use std::os::fd::AsFd;
    let (fd, key) = rev_tcp(pins, cookie);
    netboot_datapath::sys::map_update(fd.as_fd(), &key, v, 0).expect("update");
}

/// Why: a TCP socket's reverse entry is in its cookie's `nb_rev_tcp` slot
/// (the connect path's cheap write), never in the LRU map; getpeername still
/// reads an entry an older layout's program left in the LRU map (sockets
/// connected before an upgrade), and a slot another socket took since gives
/// the backend's address, never the other socket's Service.
#[test]
fn tcp_reverse_entries_live_in_their_slot_and_older_ones_are_still_read() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsFd;
    let mut env = Env::new("revtcp", 1, true);
    env.recon
        .reconcile(&table(vec![
            frontend(vip(11), 80, PROTO_TCP, &[(1, Active)], None),
            frontend(vip(12), 80, PROTO_TCP, &[(1, Active)], None),
        ]))
        .expect("reconcile");
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let mut g = spawn_client(
        &env.cg.path,
        &env.topo.client,
        &ClientOp::TcpPeerAfter {
            addr: SocketAddrV4::new(vip(11), 80).into(),
            count: 3,
            go: go.clone(),
        },
    );
    // Another socket, to another Service on the same backend.
    let mut g2 = spawn_client(
        &env.cg.path,
        &env.topo.client,
        &ClientOp::TcpPeerAfter {
            addr: SocketAddrV4::new(vip(12), 80).into(),
            count: 1,
            go: go.clone(),
        },
    );
    let ready = |g: &mut ChildGuard| {
        let stdout = g.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let cookies: Vec<u64> = loop {
            let l = lines.next().expect("client exited early").expect("read");
            if let Some((_, c)) = l.split_once("NBT-READY ") {
                break c
                    .trim()
                    .split(',')
                    .map(|c| c.parse().expect("cookie"))
                    .collect();
            }
        };
        (lines, cookies)
    };
    let (mut lines, cookies) = ready(&mut g);
    let (_lines2, other_cookie) = ready(&mut g2);
    assert_eq!(cookies.len(), 3);

    // Each socket's entry is in its slot: the Service asked for, the backend.
    let be = backend_ip(1).octets();
    let mut tag = [0u8; 2];
    for c in &cookies {
        let v = rev_tcp_slot(&env.pins.pins, *c);
        assert_eq!(
            u64::from_ne_bytes(v[0..8].try_into().unwrap()),
            *c,
            "slot holds the socket"
        );
        assert_eq!(v[8..12], be, "backend address");
        assert_eq!(v[24..28], vip(11).octets(), "VIP");
        assert_eq!(v[40..42], BE_PORT.to_be_bytes(), "backend port");
        assert_eq!(v[42..44], 80u16.to_be_bytes(), "service port");
        assert_eq!(v[46], 4, "family");
        tag.copy_from_slice(&v[44..46]);
    }
    let lru = netboot_datapath::sys::obj_get(&env.pins.pins.map(names::REV_SK)).expect("lru");
    let mut k = [0u8; 16];
    assert!(
        !netboot_datapath::sys::map_next_key(lru.as_fd(), None, &mut k).expect("keys"),
        "TCP sockets write no LRU reverse entry"
    );

    // Socket 1: its entry only in the LRU map, as an older program wrote it.
    set_rev_tcp_slot(&env.pins.pins, cookies[1], &[0u8; 48]);
    let mut key = Vec::new();
    key.extend_from_slice(&cookies[1].to_ne_bytes());
    key.extend_from_slice(&be);
    key.extend_from_slice(&BE_PORT.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    let mut val = Vec::new();
    val.extend_from_slice(&vip(11).octets());
    val.extend_from_slice(&80u16.to_be_bytes());
    val.extend_from_slice(&tag);
    netboot_datapath::sys::map_update(lru.as_fd(), &key, &val, 0).expect("lru entry");
    // Socket 2: its slot taken by a socket whose cookie falls on it, sent
    // to another (live) Service on the same backend: that socket's entry,
    // with a cookie that lands on socket 2's slot.
    let mut other = rev_tcp_slot(&env.pins.pins, other_cookie[0]);
    assert_eq!(other[24..28], vip(12).octets());
    other[0..8].copy_from_slice(&(cookies[2] + u64::from(REV_TCP_SLOTS)).to_ne_bytes());
    set_rev_tcp_slot(&env.pins.pins, cookies[2], &other);

    std::fs::write(&go, b"").expect("go");
    let res: Vec<Attempt> = loop {
        let l = lines.next().expect("client exited early").expect("read");
        if let Some((_, r)) = l.split_once("NBT-RESULT ") {
            break serde_json::from_str(r).expect("result json");
        }
    };
    let peers: Vec<&str> = res.iter().map(|a| a.peer.as_str()).collect();
    assert_eq!(
        peers,
        [
            "10.96.0.11:80",
            "10.96.0.11:80",
            &format!("{}:{BE_PORT}", backend_ip(1))
        ],
        "slot, LRU fallback, slot taken by another socket"
    );
}

/// TCP draws (connect4's `nb_draw`: the socket cookie and the CPU's count
/// of translated connects, mixed; no helper call) are uniform over the
/// slots and independent of the previous connect's: 1,800 connects over 3
/// backends, each backend and each (previous, next) pair within 4.5
/// standard deviations of its share. Sockets' cookies come in runs, so an
/// unmixed draw would cycle (a round robin passes the first check, not
/// the second).
#[test]
fn tcp_draws_are_uniform_and_independent_of_the_last() {
    let mut env = Env::new("draw", 3, true);
    let be = [(1, Active), (2, Active), (3, Active)];
    env.recon
        .reconcile(&table(vec![frontend(vip(21), 80, PROTO_TCP, &be, None)]))
        .expect("reconcile");
    let n = 1800usize;
    let got = env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(21), 80),
        count: n as u32,
    });
    let names: Vec<&str> = got
        .iter()
        .filter(|a| a.ok)
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(
        names.len(),
        n,
        "every connect reached a backend: {:?}",
        tally(&got)
    );
    let t = tally(&got);
    eprintln!("tcp draws: {t:?}");
    // Binomial(1800, 1/3): mean 600, sd 20.
    for b in ["be1", "be2", "be3"] {
        let c = t.get(b).copied().unwrap_or(0);
        assert!((510..=690).contains(&c), "{b}: {c} of {n}: {t:?}");
    }
    // (previous, next): 1,799 pairs, 9 kinds, mean ~200, sd ~13.3.
    let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for w in names.windows(2) {
        *pairs.entry((w[0], w[1])).or_default() += 1;
    }
    eprintln!("tcp draw pairs: {pairs:?}");
    assert_eq!(
        pairs.len(),
        9,
        "every (previous, next) pair occurs: {pairs:?}"
    );
    for (p, c) in &pairs {
        assert!(
            (140..=260).contains(c),
            "pair {p:?}: {c} of {}: {pairs:?}",
            n - 1
        );
    }
}

#[test]
fn load_spreads_over_backends() {
    let mut env = Env::new("spread", 3, true);
    let be = [(1, Active), (2, Active), (3, Active)];
    env.recon
        .reconcile(&table(vec![
            frontend(vip(20), 80, PROTO_TCP, &be, None),
            frontend(vip(20), 80, PROTO_UDP, &be, None),
        ]))
        .expect("reconcile");
    let t = tally(&env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(20), 80),
        count: 90,
    }));
    eprintln!("tcp spread: {t:?}");
    for b in ["be1", "be2", "be3"] {
        assert!(
            t.get(b).copied().unwrap_or(0) >= 10,
            "{b} got too few of 90: {t:?}"
        );
    }
    let u = tally(&env.client(ClientOp::UdpNewSocket {
        addr: SocketAddrV4::new(vip(20), 80),
        count: 30,
    }));
    eprintln!("udp spread: {u:?}");
    assert!(
        u.keys().filter(|k| k.starts_with("be")).count() >= 2,
        "udp did not spread: {u:?}"
    );
}

#[test]
fn client_ip_affinity_sticks_then_expires() {
    let mut env = Env::new("affinity", 3, true);
    let be = [(1, Active), (2, Active), (3, Active)];
    env.recon
        .reconcile(&table(vec![frontend(vip(30), 80, PROTO_TCP, &be, Some(2))]))
        .expect("reconcile");
    let addr = SocketAddrV4::new(vip(30), 80);
    let t = tally(&env.client(ClientOp::Tcp { addr, count: 30 }));
    assert_eq!(t.len(), 1, "affinity must pin one backend: {t:?}");
    assert!(env.counter("affinity_hit") >= 29);
    assert_eq!(env.counter("affinity_new"), 1);

    std::thread::sleep(Duration::from_millis(2600));
    let t2 = tally(&env.client(ClientOp::Tcp { addr, count: 1 }));
    assert_eq!(t2.values().sum::<usize>(), 1);
    assert_eq!(
        env.counter("affinity_expired"),
        1,
        "entry older than the timeout must expire"
    );
    assert_eq!(env.counter("affinity_new"), 2);
}

#[test]
fn removed_endpoint_gets_no_new_connections() {
    let mut env = Env::new("removal", 2, true);
    let addr = SocketAddrV4::new(vip(40), 80);
    env.recon
        .reconcile(&table(vec![frontend(
            vip(40),
            80,
            PROTO_TCP,
            &[(1, Active), (2, Active)],
            None,
        )]))
        .expect("reconcile");
    let t = tally(&env.client(ClientOp::Tcp { addr, count: 40 }));
    assert!(t.contains_key("be2"), "{t:?}");

    env.recon
        .reconcile(&table(vec![frontend(
            vip(40),
            80,
            PROTO_TCP,
            &[(1, Active)],
            None,
        )]))
        .expect("reconcile");
    let t = tally(&env.client(ClientOp::Tcp { addr, count: 40 }));
    assert_eq!(t, BTreeMap::from([("be1".to_string(), 40)]));
}

#[test]
fn terminating_endpoint_keeps_only_existing_affinity() {
    let mut env = Env::new("terminating", 2, true);
    let aff = SocketAddrV4::new(vip(41), 80);
    let plain = SocketAddrV4::new(vip(41), 81);
    env.recon
        .reconcile(&table(vec![
            frontend(vip(41), 80, PROTO_TCP, &[(1, Active)], Some(600)),
            frontend(vip(41), 81, PROTO_TCP, &[(1, Active)], None),
        ]))
        .expect("reconcile");
    assert_eq!(
        tally(&env.client(ClientOp::Tcp {
            addr: aff,
            count: 3
        })),
        BTreeMap::from([("be1".into(), 3)])
    );

    // be1 starts terminating, be2 arrives.
    let be = [(1, Terminating), (2, Active)];
    env.recon
        .reconcile(&table(vec![
            frontend(vip(41), 80, PROTO_TCP, &be, Some(600)),
            frontend(vip(41), 81, PROTO_TCP, &be, None),
        ]))
        .expect("reconcile");
    // Existing affinity (same client netns) still reaches be1 ...
    assert_eq!(
        tally(&env.client(ClientOp::Tcp {
            addr: aff,
            count: 5
        })),
        BTreeMap::from([("be1".into(), 5)])
    );
    // ... but new selections only go to ready be2.
    assert_eq!(
        tally(&env.client(ClientOp::Tcp {
            addr: plain,
            count: 20
        })),
        BTreeMap::from([("be2".into(), 20)])
    );

    // Once be1 is gone for good, affinity moves on.
    env.recon
        .reconcile(&table(vec![frontend(
            vip(41),
            80,
            PROTO_TCP,
            &[(2, Active)],
            Some(600),
        )]))
        .expect("reconcile");
    assert_eq!(
        tally(&env.client(ClientOp::Tcp {
            addr: aff,
            count: 3
        })),
        BTreeMap::from([("be2".into(), 3)])
    );
    assert!(env.counter("affinity_stale") >= 1);
}

#[test]
fn service_without_endpoints_refuses_fast() {
    let mut env = Env::new("noep", 1, true);
    env.recon
        .reconcile(&table(vec![
            frontend(vip(50), 80, PROTO_TCP, &[], None),
            frontend(vip(50), 53, PROTO_UDP, &[], None),
        ]))
        .expect("reconcile");
    let tcp = env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(50), 80),
        count: 5,
    });
    for a in &tcp {
        assert!(!a.ok);
        assert_eq!(a.errno, libc::ECONNREFUSED, "{a:?}");
        assert!(a.micros < 100_000, "refusal must be fast: {a:?}");
    }
    let udp = env.client(ClientOp::Udp {
        addr: SocketAddrV4::new(vip(50), 53),
        count: 2,
    });
    for a in &udp {
        assert_eq!(a.errno, libc::ECONNREFUSED, "{a:?}");
    }
    assert!(env.counter("no_backend") >= 7);

    // A deleted Service is no service any more: not translated (no route in
    // the test netns, so it fails at once with ENETUNREACH instead of hanging).
    env.recon
        .reconcile(&DesiredTable::default())
        .expect("reconcile");
    let gone = env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(50), 80),
        count: 1,
    });
    assert_eq!(gone[0].errno, libc::ENETUNREACH, "{gone:?}");
    assert!(env.counter("not_service") >= 1);
}

#[test]
fn coexist_mode_observes_and_never_translates() {
    let mut env = Env::new("coexist", 1, false);
    env.recon
        .reconcile(&table(vec![frontend(
            vip(60),
            80,
            PROTO_TCP,
            &[(1, Active)],
            None,
        )]))
        .expect("reconcile");
    let a = env.client(ClientOp::Tcp {
        addr: SocketAddrV4::new(vip(60), 80),
        count: 2,
    });
    for x in &a {
        assert_eq!(
            x.errno,
            libc::ENETUNREACH,
            "coexist must not translate: {x:?}"
        );
    }
    assert_eq!(env.counter("connect_translated"), 0);
    assert!(env.counter("observed") >= 2);
}

#[test]
fn reinstall_updates_links_in_place_without_failures() {
    // Why: an agent restart or upgrade must swap programs atomically (BPF_LINK_UPDATE),
    // keep the pinned maps, and not fail a single connection meanwhile.
    let mut env = Env::new("reinstall", 2, true);
    let addr = SocketAddrV4::new(vip(70), 80);
    let fe = vec![frontend(
        vip(70),
        80,
        PROTO_TCP,
        &[(1, Active), (2, Active)],
        None,
    )];
    env.recon.reconcile(&table(fe.clone())).expect("reconcile");
    let before = loader::attach_state(&env.pins.pins);
    assert_eq!(before.links.len(), 8);

    let loop_client = spawn_client(
        &env.cg.path,
        &env.topo.client,
        &ClientOp::TcpLoop {
            addr,
            duration_ms: 2500,
            interval_ms: 2,
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let r =
            loader::install(&env.pins.pins, &env.cg.path, &small_sizes(), true).expect("reinstall");
        assert!(r.maps_reused);
        assert!(
            r.links.iter().all(|(_, a)| *a == LinkAction::Updated),
            "{:?}",
            r.links
        );
        let mut again =
            Reconciler::recover(KernelMaps::open(&env.pins.pins).expect("open")).expect("recover");
        assert_eq!(
            again
                .reconcile(&table(fe.clone()))
                .expect("reconcile")
                .writes(),
            0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let res = client_results(loop_client);
    let failed: Vec<_> = res.iter().filter(|a| !a.ok).collect();
    eprintln!(
        "reinstall: {} connections, {} failed",
        res.len(),
        failed.len()
    );
    assert!(res.len() > 50, "too few attempts: {}", res.len());
    assert!(failed.is_empty(), "{failed:?}");
    let after = loader::attach_state(&env.pins.pins);
    for (b, a) in before.links.iter().zip(&after.links) {
        assert_eq!(b.1, a.1, "link id must be kept");
        assert_ne!(b.2, a.2, "program must be replaced");
    }
}

#[test]
fn program_10k_services_through_the_reconciler() {
    require_privileges();
    let cg = TestCgroup::new("scale");
    let pins = TestPins::new("scale");
    loader::install(&pins.pins, &cg.path, &MapSizes::default(), true).expect("install");
    let mut recon =
        Reconciler::recover(KernelMaps::open(&pins.pins).expect("open")).expect("recover");
    let mut t = DesiredTable::default();
    for i in 0..10_000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i);
        let mut backends = BTreeMap::new();
        for j in 0..2u32 {
            let b = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + 2 * i + j);
            backends.insert(
                L4Addr {
                    ip: b.into(),
                    port: 8080,
                    proto: PROTO_TCP,
                },
                Active,
            );
        }
        t.insert(Frontend {
            addr: L4Addr {
                ip: ip.into(),
                port: 80,
                proto: PROTO_TCP,
            },
            name: format!("s{i}"),
            affinity_timeout: None,
            backends,
            external: None,
        });
    }
    let start = Instant::now();
    let st = recon.reconcile(&t).expect("reconcile");
    let first = start.elapsed();
    let start = Instant::now();
    let st2 = recon.reconcile(&t).expect("reconcile");
    let second = start.elapsed();
    let start = Instant::now();
    let mut re = Reconciler::recover(KernelMaps::open(&pins.pins).expect("open")).expect("recover");
    let recover = start.elapsed();
    let st3 = re.reconcile(&t).expect("reconcile");
    println!(
        "NUMBERS program 10000 services x 2 backends: {} map writes in {:?}; unchanged pass {:?} ({} writes); read back after restart {:?} ({} writes)",
        st.writes(), first, second, st2.writes(), recover, st3.writes()
    );
    assert_eq!(st2.writes(), 0);
    assert_eq!(st3.writes(), 0);
    assert_eq!(re.programmed().services, 10_000);
    let ids: BTreeSet<u32> = (0..10)
        .map(|i| {
            re.service_id(&t.frontends.keys().nth(i).copied().expect("fe"))
                .expect("id")
        })
        .collect();
    assert_eq!(ids.len(), 10);
}

/// An agent of an older layout left `nb_ct4` (16-byte values) and a smaller
/// `nb_counters` pinned: they hold only soft state, so the new agent rebuilds
/// them empty (reported) instead of refusing to start, while a map that
/// holds programmed state with a changed layout still stops it.
#[test]
fn soft_state_maps_of_an_older_layout_are_rebuilt_and_reported() {
    require_privileges();
    let cg = TestCgroup::new("upgr");
    let pins = TestPins::new("upgr");
    pins.pins.prepare().expect("pin dirs");
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool (tests/install-deps installs it)");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    };
    let ct = pins.pins.map("nb_ct4");
    let ctr = pins.pins.map("nb_counters");
    bpftool(&[
        "map",
        "create",
        ct.to_str().unwrap(),
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "16",
        "entries",
        "1024",
        "name",
        "nb_ct4",
    ]);
    bpftool(&[
        "map",
        "create",
        ctr.to_str().unwrap(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "30",
        "name",
        "nb_counters",
    ]);
    let report = loader::install(&pins.pins, &cg.path, &small_sizes(), true).expect("install");
    assert_eq!(report.maps_reset, ["nb_counters", "nb_ct4"], "{report:?}");
    let info = aya::maps::MapInfo::from_pin(&ct).expect("new nb_ct4");
    assert_eq!(info.value_size(), 24);
    let info = aya::maps::MapInfo::from_pin(&ctr).expect("new nb_counters");
    assert_eq!(info.max_entries(), netboot_datapath::layout::COUNTER_MAX);
    // Again: nothing to rebuild.
    let report = loader::install(&pins.pins, &cg.path, &small_sizes(), true).expect("install");
    assert!(report.maps_reset.is_empty(), "{report:?}");

    // Programmed state (the frontends) of another layout: refused, named.
    let pins2 = TestPins::new("upgr2");
    pins2.pins.prepare().expect("pin dirs");
    let svc = pins2.pins.map("nb_lb4_svc");
    bpftool(&[
        "map",
        "create",
        svc.to_str().unwrap(),
        "type",
        "hash",
        "key",
        "8",
        "value",
        "16",
        "entries",
        "1024",
        "name",
        "nb_lb4_svc",
    ]);
    let e = loader::install(&pins2.pins, &cg.path, &small_sizes(), true).unwrap_err();
    assert!(e.to_string().contains("nb_lb4_svc"), "{e}");
}
