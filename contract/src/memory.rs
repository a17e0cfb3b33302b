//! The agent's memory, sized from `mapSizes` (docs/contracts.md, "Agent
//! memory"). `netboot render` puts [`AgentMemory::request_mib`] and
//! [`AgentMemory::limit_mib`] on the DaemonSet; the datapath's tests check the
//! per-entry constants against the map layouts of `datapath/bpf/lb.h`.
//!
//! Why the maps count: BPF map memory is charged to the memory cgroup of the
//! process that created the map (the first agent pod), also for entries
//! added later, so a limit that does not fit full maps gets the agent
//! OOM-killed exactly when the cluster is largest.
//!
//! Kernel side (per map, measured on 6.18 with `bpftool map show` memlock,
//! then rounded up to the kmalloc size class an entry really takes):
//! - every hash map has `16 × roundup_pow_of_two(max_entries)` bytes of buckets;
//! - `nb_lb4_svc`, `nb_lb4_be` and `nb_lb4_revnat` are preallocated in full
//!   (since 2026-12-06: a cold start's inserts cost half as much, see
//!   `datapath/bpf/sock_lb.bpf.c`): a 48-byte `htab_elem` + key + value
//!   (8-byte rounded) per entry, 88 bytes for `nb_lb4_svc`
//!   ([`SERVICE_ENTRY`]) and 64 for the other two ([`ID_ENTRY`]), measured
//!   with memlock (and one spare element per possible CPU, left out);
//! - the `BPF_F_NO_PREALLOC` hash map `nb_lb4_affmatch` allocates one
//!   element per entry in use: `htab_elem` + key + value + an 8-byte
//!   free-list node, which kmalloc serves from its 96-byte class:
//!   [`HASH_ENTRY`];
//! - the LRU maps are preallocated in full: 72 bytes per `nb_lb4_rev_sk`
//!   entry and 80 per `nb_lb4_aff` entry (measured: 88 and 96 with the
//!   buckets).
//! - `nb_rev_tcp` (TCP sockets' reverse entries, an array of a fixed
//!   262,144 slots of 48 bytes, not sized by `mapSizes`): [`REV_TCP`];
//! - `nb_svc_stats` (per-Service counters, per-CPU hash, `BPF_F_NO_PREALLOC`,
//!   sized by `reverseNat`): buckets, and per Service id with traffic one
//!   element ([`HASH_ENTRY`]) plus its 40-byte value on every possible CPU
//!   ([`SVC_STATS_VALUE`] × [`SVC_STATS_CPUS`]). The CPU count is the node's,
//!   unknown when rendering: the formula assumes [`SVC_STATS_CPUS`]; a full
//!   map on a node with more CPUs takes more (40 B per CPU per Service id).
//!
//! - the IPv6 twins, sized by the same `mapSizes` fields (since 2026-12-06;
//!   before, ~36 MiB at default sizes went uncounted): `nb_lb6_svc`,
//!   `nb_lb6_be` and `nb_lb6_revnat` are `BPF_F_NO_PREALLOC` (an IPv4-only
//!   cluster pays only their buckets): per entry in use `htab_elem` + key +
//!   value + the free-list node, 104 bytes for `nb_lb6_svc` in the 128-byte
//!   class ([`SERVICE6_ENTRY`]), 88 for the other two ([`HASH_ENTRY`]);
//!   `nb_lb6_rev_sk` is an LRU, preallocated: [`REV_SK6_ENTRY`];
//! - the maps `mapSizes` does not size (north–south conntrack `nb_ct4` /
//!   `nb_ct6`, preallocated LRUs of 65,536 entries; the flow ring; the
//!   source-range tries, Maglev and device maps' buckets; counters and
//!   configuration; socket termination's own `nb_sock_term`):
//!   [`FIXED_EMPTY`], measured; full, the source-range tries add
//!   [`SRC_RANGES_FULL`] and, with `loadBalancing.algorithm: maglev`, the
//!   Maglev tables, min([`MAGLEV_TABLES`], `reverseNat`) ×
//!   [`MAGLEV_TABLE`] (a table's 32 KiB value is served by the page
//!   allocator as 64 KiB).
//!
//! Userspace side (measured with `--static-services`, RSS of a debug build
//! above an agent with one Service: 2000 Services × 10 endpoints +21 MiB,
//! 10000 × 1 +64 MiB, 4000 × 10 +43 MiB; solved: 6.2 KB per Service frontend
//! and 465 bytes per endpoint), doubled because objects from the API carry
//! more than the static YAML (managedFields, labels, annotations):
//! [`USER_PER_FRONTEND`], [`USER_PER_BACKEND`]. Frontends are bounded by
//! `reverseNat` (service ids are u32: the maps fill first).
//!
//! Base: [`BASE`], twice the startup peak measured (33 MiB high-water mark).
//!
//! `limit = BASE + kernel(full maps) + userspace(full maps)`;
//! `request = BASE + kernel(what is allocated with empty maps: buckets,
//! preallocated maps)`.

/// Bytes of one bucket of a BPF hash map.
pub const BUCKET: u64 = 16;
/// Bytes of one entry of a `BPF_F_NO_PREALLOC` hash map (kmalloc-96).
pub const HASH_ENTRY: u64 = 96;
/// Bytes of one preallocated `nb_lb4_svc` element.
pub const SERVICE_ENTRY: u64 = 88;
/// Bytes of one preallocated `nb_lb4_be` or `nb_lb4_revnat` element.
pub const ID_ENTRY: u64 = 64;
/// Bytes of one preallocated `nb_lb4_rev_sk` element (LRU).
pub const REV_SK_ENTRY: u64 = 72;
/// Bytes of one preallocated `nb_lb4_aff` element (LRU).
pub const AFFINITY_ENTRY: u64 = 80;
/// Bytes of one `nb_lb6_svc` entry in use (`BPF_F_NO_PREALLOC`: 48 + 24 +
/// 24 + 8 = 104, served from the 128-byte class).
pub const SERVICE6_ENTRY: u64 = 128;
/// Bytes of one preallocated `nb_lb6_rev_sk` element (LRU): 48 + 32 + 24.
pub const REV_SK6_ENTRY: u64 = 104;
/// Bytes of one Maglev table in `nb_lb4_maglev` (`BPF_F_NO_PREALLOC`; a
/// 32,824-byte element, an order-4 page allocation).
pub const MAGLEV_TABLE: u64 = 64 * 1024;
/// Maglev tables at most (`NB_DEFAULT_MAGLEV`: external frontends with a
/// table; the rest pick at random), and never more than frontends
/// (`reverseNat`).
pub const MAGLEV_TABLES: u64 = 4096;
/// Bytes of both source-range tries full (`NB_DEFAULT_SRC_RANGE` = 16,384
/// (frontend, CIDR) pairs per family; an LPM trie takes up to two nodes per
/// entry, each under 96 bytes).
pub const SRC_RANGES_FULL: u64 = 2 * 16_384 * 2 * 96;
/// Bytes of the maps `mapSizes` does not size, empty, as the kernel charges
/// them (memlock, measured on 6.18 by the datapath's
/// `the_memory_formula_counts_what_the_kernel_charges_for_every_map`),
/// their per-CPU values counted for [`SVC_STATS_CPUS`] CPUs.
pub const FIXED_EMPTY: u64 = FIXED_EMPTY_SHARED + FIXED_PER_CPU * SVC_STATS_CPUS;
/// [`FIXED_EMPTY`] without the per-CPU values: measured 18,311,120 B on a
/// 2-CPU node (`nb_ct6` 9.5 MiB, `nb_ct4` 6.5 MiB, `nb_flow_ring` 1 MiB,
/// `nb_sock_term` 385 KiB, `nb_lb4_maglev`'s buckets 65 KiB, the rest a few
/// KiB), less its per-CPU values, rounded down.
pub const FIXED_EMPTY_SHARED: u64 = 18_300_000;
/// The per-CPU values of the fixed maps, per CPU: `nb_counters` (39 × 8 B),
/// `nb_flow_rl` (16 B) and `nb_flow_stats` (3 × 8 B).
pub const FIXED_PER_CPU: u64 = 39 * 8 + 16 + 3 * 8;
/// Bytes of `nb_rev_tcp`: `NB_REV_TCP_SLOTS` × `struct nb_rev_tcp`,
/// preallocated (an array).
pub const REV_TCP: u64 = 262_144 * 48;
/// Bytes of one CPU's `struct nb_svc_stats` (per-CPU value of `nb_svc_stats`).
pub const SVC_STATS_VALUE: u64 = 40;
/// Possible CPUs the formula assumes for `nb_svc_stats`'s per-CPU values.
pub const SVC_STATS_CPUS: u64 = 64;
/// Agent userspace bytes per Service frontend (watch cache, tables, mirror).
pub const USER_PER_FRONTEND: u64 = 12 * 1024;
/// Agent userspace bytes per backend (endpoint).
pub const USER_PER_BACKEND: u64 = 1024;
/// Agent baseline: binary, runtime, API client, HTTP.
pub const BASE: u64 = 64 * MIB;

const MIB: u64 = 1024 * 1024;

/// `mapSizes`, as in config.yaml.
pub use crate::config::MapSizes;

/// The agent's memory request and limit, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentMemory {
    /// Kernel memory of empty maps (buckets, preallocated maps).
    pub kernel_empty: u64,
    /// Kernel memory of full maps.
    pub kernel_full: u64,
    /// Userspace memory with full maps.
    pub userspace_full: u64,
    /// `BASE + kernel_empty`.
    pub request: u64,
    /// `BASE + kernel_full + userspace_full`.
    pub limit: u64,
}

fn buckets(max: u32) -> u64 {
    BUCKET * u64::from(max).next_power_of_two()
}

impl AgentMemory {
    /// The formula of the module documentation, with random backend
    /// selection (no Maglev tables).
    pub fn for_sizes(m: MapSizes) -> Self {
        Self::for_config(m, false)
    }

    /// The formula, `maglev` when `loadBalancing.algorithm` is `maglev`.
    pub fn for_config(m: MapSizes, maglev: bool) -> Self {
        Self::on_cpus(m, maglev, SVC_STATS_CPUS)
    }

    /// The formula on a node with `cpus` possible CPUs (per-CPU values; a
    /// rendered DaemonSet assumes [`SVC_STATS_CPUS`]).
    pub fn on_cpus(m: MapSizes, maglev: bool, cpus: u64) -> Self {
        let (svc, be, aff, rn) = (
            u64::from(m.services),
            u64::from(m.backends),
            u64::from(m.affinity),
            u64::from(m.reverse_nat),
        );
        let kernel_empty = buckets(m.services) + SERVICE_ENTRY * svc
            + buckets(m.backends) + ID_ENTRY * be // nb_lb4_be
            + buckets(m.backends) // nb_lb4_affmatch
            + buckets(m.reverse_nat) + ID_ENTRY * rn
            + buckets(m.backends) + REV_SK_ENTRY * be
            + buckets(m.affinity) + AFFINITY_ENTRY * aff
            + buckets(m.reverse_nat) // nb_svc_stats
            + REV_TCP
            + buckets(m.services) // nb_lb6_svc
            + buckets(m.backends) // nb_lb6_be
            + buckets(m.reverse_nat) // nb_lb6_revnat
            + buckets(m.backends) + REV_SK6_ENTRY * be
            + FIXED_EMPTY_SHARED + FIXED_PER_CPU * cpus;
        let kernel_full = kernel_empty
            + HASH_ENTRY * be // nb_lb4_affmatch
            + (HASH_ENTRY + SVC_STATS_VALUE * cpus) * rn // nb_svc_stats
            + SERVICE6_ENTRY * svc + HASH_ENTRY * be + HASH_ENTRY * rn // IPv6 twins
            + SRC_RANGES_FULL
            + if maglev { MAGLEV_TABLE * MAGLEV_TABLES.min(rn) } else { 0 };
        let frontends = svc.min(rn);
        let userspace_full = USER_PER_FRONTEND * frontends + USER_PER_BACKEND * be;
        Self {
            kernel_empty,
            kernel_full,
            userspace_full,
            request: BASE + kernel_empty,
            limit: BASE + kernel_full + userspace_full,
        }
    }

    /// The request in MiB, rounded up.
    pub fn request_mib(&self) -> u64 {
        self.request.div_ceil(MIB)
    }

    /// The limit in MiB, rounded up.
    pub fn limit_mib(&self) -> u64 {
        self.limit.div_ceil(MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes() {
        let m = AgentMemory::for_sizes(MapSizes::DEFAULT);
        // Matches the measured memlock of every map at creation (2026-12-06,
        // `the_memory_formula_counts_what_the_kernel_charges_for_every_map`):
        // the IPv4 maps' 77 MiB (buckets, the preallocated nb_lb4_svc,
        // nb_lb4_be, nb_lb4_revnat, the LRUs, nb_rev_tcp), the IPv6 twins'
        // 6 MiB of buckets and nb_lb6_rev_sk's 30 MiB, and the fixed maps'
        // 17.5 MiB (north-south conntrack, the flow ring, ...).
        assert_eq!(m.kernel_empty.div_ceil(MIB), 130);
        assert_eq!(m.request_mib(), 194);
        // + 167 MiB for a full nb_svc_stats at 64 CPUs (65536 × (96 + 40 × 64) B),
        // the IPv6 twins in use (38 MiB) and full source-range tries (6 MiB).
        assert_eq!(m.limit_mib(), 1452);
        // Maglev tables: 4096 × 64 KiB more, only with the maglev algorithm.
        let g = AgentMemory::for_config(MapSizes::DEFAULT, true);
        assert_eq!(g.request_mib(), 194);
        assert_eq!(g.limit_mib(), 1452 + 256);
    }
}
