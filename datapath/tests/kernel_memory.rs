//! Privileged: the agent's memory formula (`netboot_contract::memory`, the
//! DaemonSet's request and limit) against what the kernel charges for every
//! map the agent creates. In a test binary of its own: it counts the BPF map
//! fds socket termination's load opens in this process, which another test
//! running beside it would disturb.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_memory`
//! Network: none (no packet is sent).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use netboot_datapath::config::MapSizes;
use netboot_datapath::loader;
use support::*;

/// `map_flags` and `memlock` of a pinned map, from its fd's fdinfo.
fn flags_and_memlock(pins: &TestPins, name: &str) -> (u32, u64) {
    use std::os::fd::{AsFd, AsRawFd};
    let map = aya::maps::MapData::from_pin(pins.pins.map(name)).expect("open pin");
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{name}: no {key} in fdinfo:\n{info}"))
            .to_string()
    };
    let flags = u32::from_str_radix(field("map_flags:").trim_start_matches("0x"), 16).unwrap();
    (flags, field("memlock:").parse().unwrap())
}

/// Every open BPF map fd of this process: fd → fdinfo text.
fn map_fdinfos() -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fdinfo")
        .expect("fdinfo dir")
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if info.contains("map_type:") {
            out.insert(e.file_name().to_string_lossy().into_owned(), info);
        }
    }
    out
}

fn fdinfo_field(info: &str, key: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in fdinfo:\n{info}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[test]
fn the_memory_formula_counts_what_the_kernel_charges_for_every_map() {
    // Why: the DaemonSet's memory request is the formula's kernel memory of
    // empty maps (netboot_contract::memory), and BPF map memory is charged
    // to the agent's cgroup: a map the formula leaves out is memory the
    // scheduler was not told of. Every map the agent creates counts here,
    // not a chosen list: the pinned ones after install (names::ALL) and
    // socket termination's, which the agent loads at start.
    require_privileges();
    use netboot_datapath::layout::names;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let sizes = MapSizes::default();
    let cg = TestCgroup::new("memlock");
    let pins = TestPins::new("memlock");
    loader::install(&pins.pins, &cg.path, &sizes, true).expect("install");
    for name in [names::SERVICES, names::BACKENDS, names::REVNAT] {
        let (flags, _) = flags_and_memlock(&pins, name);
        assert_eq!(flags & BPF_F_NO_PREALLOC, 0, "{name} is preallocated");
    }
    for name in [
        names::AFF_MATCH,
        names::SVC_STATS,
        names::SERVICES6,
        names::BACKENDS6,
        names::REVNAT6,
    ] {
        let (flags, _) = flags_and_memlock(&pins, name);
        assert_eq!(flags & BPF_F_NO_PREALLOC, 1, "{name} allocates per entry");
    }
    let mut charged = 0u64;
    let mut lines = Vec::new();
    let mut pinned_ids = std::collections::BTreeSet::new();
    for name in names::ALL {
        if !pins.pins.map(name).exists() {
            assert_eq!(name, names::SOCK_TERM, "{name} is not pinned after install");
            continue;
        }
        let (_, memlock) = flags_and_memlock(&pins, name);
        let info = aya::maps::MapData::from_pin(pins.pins.map(name))
            .and_then(|m| m.info())
            .expect("info");
        pinned_ids.insert(u64::from(info.id()));
        lines.push(format!(
            "{name} {memlock} B ({:?}, {} entries, key {} B, value {} B)",
            info.map_type(),
            info.max_entries(),
            info.key_size(),
            info.value_size()
        ));
        charged += memlock;
    }
    // Socket termination's own maps: the fds its load opens, but for the
    // pinned maps it shares (the reverse entries).
    let before = map_fdinfos();
    let term = netboot_datapath::sock_term::SockTerm::load(&pins.pins).expect("socket termination");
    let term_maps: u64 = map_fdinfos()
        .iter()
        .filter(|(fd, info)| {
            !before.contains_key(*fd) && !pinned_ids.contains(&fdinfo_field(info, "map_id:"))
        })
        .map(|(_, info)| fdinfo_field(info, "memlock:"))
        .sum();
    drop(term);
    assert!(term_maps > 0, "socket termination's maps were not seen");
    lines.push(format!("socket termination {term_maps}"));
    charged += term_maps;
    // Possible CPUs: what per-CPU maps allocate for.
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;
    let formula = netboot_contract::memory::AgentMemory::on_cpus(sizes, false, cpus).kernel_empty;
    println!(
        "NUMBERS every map at default sizes, {cpus} possible CPUs: memlock {charged} B, formula {formula} B\n{}",
        lines.join("\n")
    );
    // The formula leaves out each map's header and the spare elements per
    // possible CPU: a few KiB.
    assert!(
        formula <= charged && charged - formula < 256 * 1024,
        "memlock {charged} B against the formula's {formula} B"
    );
    // Per-entry costs of the maps that allocate per entry: the formula's
    // constants hold an element (htab_elem 48 B + key + value, 8-byte
    // rounded, + the allocator's 8-byte node).
    use netboot_contract::memory::{HASH_ENTRY, SERVICE6_ENTRY};
    for (name, constant) in [
        (names::AFF_MATCH, HASH_ENTRY),
        (names::SERVICES6, SERVICE6_ENTRY),
        (names::BACKENDS6, HASH_ENTRY),
        (names::REVNAT6, HASH_ENTRY),
    ] {
        let map = aya::maps::MapData::from_pin(pins.pins.map(name)).expect("open pin");
        let info = map.info().expect("info");
        let round8 = |x: u32| u64::from(x).div_ceil(8) * 8;
        let elem = 48 + round8(info.key_size()) + round8(info.value_size()) + 8;
        assert!(
            elem <= constant,
            "{name}: an element takes {elem} B, the formula {constant}"
        );
    }
}
