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
use netboot_datapath::flows::{self, Flow, Verdict};
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
    let f = Flow::from_event(&evs[0], 0).expect("decodes");
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
    let f = Flow::from_event(&evs[0], 0).expect("decodes");
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
