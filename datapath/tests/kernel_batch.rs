//! Privileged: batched map writes (`BPF_MAP_UPDATE_BATCH` /
//! `BPF_MAP_DELETE_BATCH`, issue 18) against the real kernel. Two datapaths
//! installed side by side (pins and cgroups of their own, nothing attached
//! to traffic), one written in batches and one with single writes, must hold
//! the same entries after every pass, also when a map fills up mid-batch.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_batch`
//! Network: none (no packet is sent).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::{BackendState, DesiredTable, Frontend};
use netboot_datapath::layout::{L4Addr, PROTO_TCP};
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::maps::LbMaps;
use netboot_datapath::reconcile::Reconciler;
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

struct Side {
    recon: Reconciler<KernelMaps>,
    _pins: TestPins,
    _cg: TestCgroup,
}

fn side(tag: &str, sizes: &MapSizes, batches: bool) -> Side {
    let cg = TestCgroup::new(tag);
    let pins = TestPins::new(tag);
    loader::install(&pins.pins, &cg.path, sizes, true).expect("install");
    let maps = KernelMaps::open(&pins.pins).expect("open maps");
    let maps = if batches {
        maps
    } else {
        maps.without_batches()
    };
    Side {
        recon: Reconciler::recover(maps).expect("recover"),
        _pins: pins,
        _cg: cg,
    }
}

fn addr(ip: IpAddr, port: u16) -> L4Addr {
    L4Addr {
        ip,
        port,
        proto: PROTO_TCP,
    }
}

/// `n` frontends (every 10th IPv6) with `per` backends each, backends
/// shifted by `shift` (so a second table moves some of them).
fn table(n: u32, per: u32, shift: u32) -> DesiredTable {
    let mut t = DesiredTable::default();
    for i in 0..n {
        let v6 = i % 10 == 9;
        let vip = if v6 {
            IpAddr::V6(Ipv6Addr::from(
                0xfd00_0010_0096_0000_0000_0000_0000_0000u128 + u128::from(i),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i))
        };
        let backends = (0..per)
            .map(|j| {
                let k = i * per + j + shift;
                let ip = if v6 {
                    IpAddr::V6(Ipv6Addr::from(
                        0xfd00_0010_0244_0000_0000_0000_0000_0000u128 + u128::from(k),
                    ))
                } else {
                    IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + k))
                };
                (addr(ip, 8080), BackendState::Active)
            })
            .collect();
        t.insert(Frontend {
            addr: addr(vip, 80),
            name: format!("cs/s{i}:"),
            affinity_timeout: (i % 3 == 0).then_some(600),
            backends,
            external: None,
        });
    }
    t
}

#[test]
fn batched_writes_leave_the_maps_as_single_writes_do() {
    require_privileges();
    let sizes = MapSizes {
        services: 32_768,
        backends: 32_768,
        affinity: 1024,
        reverse_nat: 4096,
    };
    let mut batched = side("cs-batch-b", &sizes, true);
    let mut single = side("cs-batch-s", &sizes, false);
    for (what, t) in [
        ("first pass", table(2000, 5, 0)),
        ("backends moved, counts changed", table(2000, 3, 1)),
        ("frontends removed", table(700, 6, 2)),
        ("unchanged", table(700, 6, 2)),
    ] {
        let a = batched.recon.reconcile(&t).expect(what);
        let b = single.recon.reconcile(&t).expect(what);
        assert_eq!(a, b, "{what}: same writes counted");
        let (da, db) = (
            batched.recon.maps().dump().expect("dump"),
            single.recon.maps().dump().expect("dump"),
        );
        assert_eq!(da.render(), db.render(), "{what}: same entries");
        assert_eq!(da.frontend_count(), t.frontends.len(), "{what}");
    }
}

#[test]
fn a_map_filling_up_mid_batch_programs_what_a_single_write_pass_does() {
    require_privileges();
    // Room for 300 frontends' entries of 1 + 4 slots in nb_lb4_svc, not 500.
    let sizes = MapSizes {
        services: 1500,
        backends: 4096,
        affinity: 1024,
        reverse_nat: 4096,
    };
    let mut batched = side("cs-batch-fb", &sizes, true);
    let mut single = side("cs-batch-fs", &sizes, false);
    let t = table(500, 4, 0);
    batched.recon.reconcile(&t).expect("batched pass");
    single.recon.reconcile(&t).expect("single pass");
    assert!(!batched.recon.pressure().is_empty(), "the map must fill up");
    assert_eq!(batched.recon.pressure(), single.recon.pressure());
    let (da, db) = (
        batched.recon.maps().dump().expect("dump"),
        single.recon.maps().dump().expect("dump"),
    );
    assert_eq!(da.render(), db.render());
    // The mirror is what the maps hold.
    let again =
        Reconciler::recover(KernelMaps::open(&batched._pins.pins).expect("open")).expect("recover");
    assert_eq!(again.programmed(), batched.recon.programmed());
}

#[test]
fn a_cold_start_at_two_thread_sizes_programs_what_single_writes_do() {
    require_privileges();
    // Runs over TWO_THREADS_FROM: 1,800 IPv4 frontends of 1 + 5 slots
    // (10,800 service entries) and 9,000 IPv4 backends. The backends fit
    // and go over two threads; the service map has room for 9,000 and
    // fills up, so it stays on one thread.
    const { assert!(10_800 > netboot_datapath::maps::kernel::TWO_THREADS_FROM) };
    let sizes = MapSizes {
        services: 9_000,
        backends: 32_768,
        affinity: 1024,
        reverse_nat: 4096,
    };
    let mut batched = side("cs-batch-2b", &sizes, true);
    let mut single = side("cs-batch-2s", &sizes, false);
    let t = table(2000, 5, 0);
    batched.recon.reconcile(&t).expect("batched pass");
    single.recon.reconcile(&t).expect("single pass");
    assert!(
        !batched.recon.pressure().is_empty(),
        "the service map must fill up"
    );
    assert_eq!(batched.recon.pressure(), single.recon.pressure());
    let (da, db) = (
        batched.recon.maps().dump().expect("dump"),
        single.recon.maps().dump().expect("dump"),
    );
    assert_eq!(da.render(), db.render());
    assert_eq!(
        da.backends.len() + da.backends6.len(),
        10_000,
        "every backend written"
    );
    let again =
        Reconciler::recover(KernelMaps::open(&batched._pins.pins).expect("open")).expect("recover");
    assert_eq!(again.programmed(), batched.recon.programmed());
}
