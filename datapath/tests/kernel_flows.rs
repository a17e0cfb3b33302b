//! Privileged: service flow events from the real socket-LB programs (issue
//! 19). Loads the programs, attaches them to a cgroup this test creates,
//! connects from a client netns in that cgroup, and reads the pinned
//! `nb_flow_ring` ring buffer and `nb_flow_stats` directly.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_flows`
//! (panics, never skips, without root / BPF).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use aya::maps::{Map, MapData, RingBuf};
use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{BackendState, DesiredTable, Frontend};
use netboot_datapath::flows::{self, Verdict};
use netboot_datapath::layout::{names, FlowEvent, L4Addr, PROTO_TCP};
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::pins::Pins;
use netboot_datapath::reconcile::Reconciler;
use support::*;

/// Child-process entry point for clients (does nothing in a normal run).
#[test]
fn helper() {
    support::helper_main();
}

const BE_PORT: u16 = 8080;

// Field order is drop order: servers, maps, pins (detach), cgroup, namespaces.
struct Env {
    _servers: Servers,
    recon: Reconciler<KernelMaps>,
    pins: TestPins,
    cg: TestCgroup,
    topo: Topology,
}

impl Env {
    fn new(tag: &str) -> Self {
        require_privileges();
        let topo = Topology::new(tag, 1);
        let cg = TestCgroup::new(tag);
        let pins = TestPins::new(tag);
        let sizes = MapSizes {
            services: 1024,
            backends: 1024,
            affinity: 1024,
            reverse_nat: 1024,
        };
        loader::install(&pins.pins, &cg.path, &sizes, true).expect("install");
        let recon =
            Reconciler::recover(KernelMaps::open(&pins.pins).expect("open maps")).expect("recover");
        let servers = Servers::start(&topo.server, &[("be1", backend_ip(1), BE_PORT)]);
        let mut env = Self {
            _servers: servers,
            recon,
            pins,
            cg,
            topo,
        };
        let mut t = DesiredTable::default();
        t.insert(frontend(vip(10), true));
        t.insert(frontend(vip(11), false));
        env.recon.reconcile(&t).expect("reconcile");
        env
    }

    fn connect(&self, ip: Ipv4Addr, count: u32) -> Vec<Attempt> {
        client(
            &self.cg.path,
            &self.topo.client,
            ClientOp::Tcp {
                addr: SocketAddrV4::new(ip, 80),
                count,
            },
        )
    }
}

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn frontend(ip: Ipv4Addr, with_backend: bool) -> Frontend {
    Frontend {
        addr: L4Addr {
            ip: ip.into(),
            port: 80,
            proto: PROTO_TCP,
        },
        name: format!("test/{ip}:80"),
        affinity_timeout: None,
        backends: if with_backend {
            [(
                L4Addr {
                    ip: backend_ip(1).into(),
                    port: BE_PORT,
                    proto: PROTO_TCP,
                },
                BackendState::Active,
            )]
            .into_iter()
            .collect()
        } else {
            Default::default()
        },
        external: None,
    }
}

fn ring(pins: &Pins) -> RingBuf<MapData> {
    let data = MapData::from_pin(pins.map(names::FLOW_RING)).expect("open ring");
    RingBuf::try_from(Map::from_map_data(data).expect("map")).expect("ringbuf")
}

/// Every record in the ring now.
fn drain(r: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(rec) = r.next() {
        out.push(FlowEvent::from_bytes(&rec).expect("record size"));
    }
    out
}

#[test]
fn a_connect_to_a_cluster_ip_is_one_translated_event() {
    let env = Env::new("flw-xl");
    let mut r = ring(&env.pins.pins);
    flows::set_enabled(&env.pins.pins, true, 0).expect("enable");
    let got = env.connect(vip(10), 1);
    assert!(got[0].ok, "connect failed: {got:?}");
    let evs = drain(&mut r);
    assert_eq!(evs.len(), 1, "one connect, one event: {evs:?}");
    let f = flows::from_event(&evs[0], 0).expect("decodes");
    assert_eq!(f.verdict, Verdict::Translated);
    assert_eq!(f.hook, "connect");
    assert_eq!(f.proto, "tcp");
    assert_eq!(f.frontend_ip, IpAddr::V4(vip(10)));
    assert_eq!(f.frontend_port, 80);
    assert_eq!(
        Some(f.service_id),
        env.recon.service_id(&frontend(vip(10), true).addr)
    );
    assert_eq!(f.backend_ip, Some(IpAddr::V4(backend_ip(1))));
    assert_eq!(f.backend_port, Some(BE_PORT));
    assert!(f.backend_id.is_some_and(|b| b > 0));
    let cg = netboot_datapath::sys::cgroup_id(&env.cg.path).expect("cgroup id");
    assert_eq!(f.client_cgroup_id, cg, "the client's cgroup");
    assert_ne!(f.client_netns_cookie, 0);
    let st = flows::stats(&env.pins.pins).expect("stats");
    assert_eq!((st.emitted, st.rate_limited, st.ring_full), (1, 0, 0));
}

#[test]
fn a_service_without_endpoints_is_refused() {
    let env = Env::new("flw-nb");
    let mut r = ring(&env.pins.pins);
    flows::set_enabled(&env.pins.pins, true, 0).expect("enable");
    let got = env.connect(vip(11), 1);
    assert!(!got[0].ok && got[0].errno == 111, "ECONNREFUSED: {got:?}");
    let evs = drain(&mut r);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let f = flows::from_event(&evs[0], 0).expect("decodes");
    assert_eq!(f.verdict, Verdict::Refused);
    assert_eq!(f.reason, "no_backend");
    assert_eq!(f.frontend_ip, IpAddr::V4(vip(11)));
    assert_eq!((f.backend_id, f.backend_ip), (None, None));
}

#[test]
fn events_off_emit_nothing() {
    let env = Env::new("flw-off");
    let mut r = ring(&env.pins.pins);
    // Off is the default after install: connects emit nothing.
    let got = env.connect(vip(10), 5);
    assert!(got.iter().all(|a| a.ok), "{got:?}");
    flows::set_enabled(&env.pins.pins, true, 0).expect("enable");
    flows::set_enabled(&env.pins.pins, false, 0).expect("disable");
    let got = env.connect(vip(10), 5);
    assert!(got.iter().all(|a| a.ok), "{got:?}");
    assert!(drain(&mut r).is_empty());
    let st = flows::stats(&env.pins.pins).expect("stats");
    assert_eq!((st.emitted, st.rate_limited, st.ring_full), (0, 0, 0));
    // And on again at runtime, without a reload.
    flows::set_enabled(&env.pins.pins, true, 0).expect("enable");
    env.connect(vip(10), 2);
    assert_eq!(drain(&mut r).len(), 2);
}

#[test]
fn the_rate_limit_drops_beyond_the_budget_and_counts_it() {
    let env = Env::new("flw-rl");
    let mut r = ring(&env.pins.pins);
    const RATE: u32 = 5;
    const CONNECTS: u32 = 60;
    flows::set_enabled(&env.pins.pins, true, RATE).expect("enable");
    let t = std::time::Instant::now();
    let got = env.connect(vip(10), CONNECTS);
    let secs = t.elapsed().as_secs_f64();
    assert!(got.iter().all(|a| a.ok), "{got:?}");
    let evs = drain(&mut r).len() as u64;
    let st = flows::stats(&env.pins.pins).expect("stats");
    let cpus = aya::util::nr_cpus().expect("cpus") as f64;
    // Each CPU: a full bucket (RATE) plus what refills while connecting.
    let bound = (cpus * (f64::from(RATE) * (1.0 + secs))).ceil() as u64 + 1;
    eprintln!(
        "rate limit: {CONNECTS} connects in {secs:.3}s on {cpus} CPUs: emitted {}, rate_limited {}, ring_full {}, bound {bound}",
        st.emitted, st.rate_limited, st.ring_full
    );
    assert_eq!(evs, st.emitted, "what was counted emitted is in the ring");
    assert_eq!(
        st.emitted + st.rate_limited + st.ring_full,
        u64::from(CONNECTS),
        "every decision is either emitted or counted dropped"
    );
    assert!(st.emitted >= u64::from(RATE), "a full bucket first");
    assert!(st.emitted <= bound, "budget exceeded: {st:?}");
    assert!(st.rate_limited > 0);
}

/// The agent's own flows (a destroyed socket's `terminated` flow) reach the
/// watchers through the same hub as the kernel's, after them in time order
/// of reading, and are dropped, not queued, while nobody watches.
#[test]
fn flows_the_agent_publishes_reach_watchers_beside_the_kernels() {
    let env = Env::new("flw-pub");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let destroyed = netboot_datapath::sock_term::Destroyed {
        peer: std::net::SocketAddr::new(backend_ip(1).into(), BE_PORT),
        frontend: std::net::SocketAddr::new(vip(10).into(), 80),
        family: 2,
        result: 0,
        cookie: 7,
        cgroup_id: 8,
        netns_cookie: 9,
    };
    let id = env
        .recon
        .service_id(&frontend(vip(10), true).addr)
        .expect("programmed");
    let terminated = || flows::terminated_flow(&destroyed, Some(id), flows::now_unix_ns());
    let hub = flows::FlowHub::new(
        env.pins.pins.clone(),
        flows::FlowOptions::default(),
        std::sync::Arc::new(|| std::sync::Arc::new(flows::FlowNames::default())),
    );
    // Unwatched: dropped at once.
    hub.publish([terminated()]);
    rt.block_on(async {
        let mut sub = hub.subscribe().expect("subscribe");
        let got = env.connect(vip(10), 1);
        assert!(got[0].ok, "{got:?}");
        hub.publish([terminated()]);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let f = tokio::time::timeout(std::time::Duration::from_secs(2), sub.rx.recv())
                .await
                .expect("a flow within 2 s (the reader drains every 50 ms)")
                .expect("recv");
            seen.push(f);
        }
        let verdicts: Vec<_> = seen.iter().map(|f| f.verdict).collect();
        assert_eq!(
            verdicts,
            vec![Verdict::Translated, Verdict::Terminated],
            "the connect, then the published flow, and not the unwatched one: {seen:?}"
        );
        let t = &seen[1];
        assert_eq!(
            (
                t.hook.as_str(),
                t.reason.as_str(),
                t.service_id,
                t.frontend_port
            ),
            ("terminate", "backend_removed", id, 80)
        );
        assert_eq!(t.backend_ip, Some(IpAddr::V4(backend_ip(1))));
        assert_eq!((t.client_cgroup_id, t.client_netns_cookie), (8, 9));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), sub.rx.recv())
                .await
                .is_err(),
            "nothing more"
        );
    });
}

/// Decisions on destinations that are no Service are emitted only while a
/// watcher asks for them (`verdict=not-a-service`): the kernel's
/// `FLOW_CFG_ALL` bit, set by the hub for that watcher and cleared when it
/// leaves, while Service flows go on for the others.
#[test]
fn not_a_service_flows_only_for_a_watcher_that_asks() {
    use netboot_datapath::layout::{FLOW_CFG_ALL, FLOW_CFG_ON};
    let env = Env::new("flw-nsv");
    let mut r = ring(&env.pins.pins);
    let direct = SocketAddrV4::new(backend_ip(1), BE_PORT);
    let connect_direct = || {
        client(
            &env.cg.path,
            &env.topo.client,
            ClientOp::Tcp {
                addr: direct,
                count: 1,
            },
        )
    };
    // Service flows only: a connect to the pod's own address emits nothing.
    flows::set_enabled(&env.pins.pins, true, 0).expect("enable");
    assert!(connect_direct()[0].ok);
    assert!(drain(&mut r).is_empty(), "no Service: no event by default");
    // Asked for: one not-a-service event naming the destination.
    flows::set_flags(&env.pins.pins, FLOW_CFG_ON | FLOW_CFG_ALL, 0).expect("all");
    assert!(connect_direct()[0].ok);
    let evs = drain(&mut r);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let f = flows::from_event(&evs[0], 0).expect("decodes");
    assert_eq!(f.verdict, Verdict::NotAService, "{f:?}");
    assert_eq!((f.service_id, f.reason.as_str()), (0, "not_service"));
    assert_eq!(f.frontend_ip, IpAddr::V4(backend_ip(1)));
    assert_eq!(f.frontend_port, BE_PORT);
    assert_eq!((f.backend_ip, f.backend_id), (None, None));
    // A protocol the socket LB does not balance (an ICMP echo socket's
    // connect, even to a ClusterIP): `unsupported`, not looked up.
    let ping = client(
        &env.cg.path,
        &env.topo.client,
        ClientOp::PingConnect {
            addr: SocketAddrV4::new(vip(10), 0),
        },
    );
    // The hook runs first; the connect itself then fails ENETUNREACH (a
    // ClusterIP has no route: only the socket LB's translation reaches it).
    assert_eq!(ping[0].errno, libc::ENETUNREACH, "{ping:?}");
    let evs = drain(&mut r);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let f = flows::from_event(&evs[0], 0).expect("decodes");
    assert_eq!(f.verdict, Verdict::Unsupported, "{f:?}");
    assert_eq!(
        (f.service_id, f.reason.as_str(), f.frontend_ip),
        (0, "proto_unsupported", IpAddr::V4(vip(10)))
    );
    flows::set_enabled(&env.pins.pins, false, 0).expect("disable");

    // The hub sets the bit for the watcher that asks, and only while it watches.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _g = rt.enter();
    let hub = flows::FlowHub::new(
        env.pins.pins.clone(),
        flows::FlowOptions::default(),
        std::sync::Arc::new(|| std::sync::Arc::new(flows::FlowNames::default())),
    );
    let flags = || flows::flags(&env.pins.pins).expect("flags");
    let plain = hub.subscribe().expect("subscribe");
    assert_eq!(flags(), FLOW_CFG_ON);
    let asking = hub
        .subscribe_for(&flows::FlowFilter {
            verdict: Some(Verdict::NotAService),
            ..Default::default()
        })
        .expect("subscribe");
    assert_eq!(flags(), FLOW_CFG_ON | FLOW_CFG_ALL);
    drop(asking);
    assert_eq!(flags(), FLOW_CFG_ON, "the asking watcher left");
    drop(plain);
    assert_eq!(flags(), 0, "nobody watches");
}
