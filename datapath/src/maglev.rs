//! Maglev consistent hashing for the per-packet path (Eisenbud et al.,
//! "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
//! §3.4), with `loadBalancing.algorithm: maglev`.
//!
//! Each external frontend gets a lookup table of `M` entries (a prime,
//! `loadBalancing.maglevTableSize`) in `nb_lb4_maglev`, keyed by its
//! service id; a new flow takes entry `flow_hash % M`. The table is built
//! here from the backends' names (`ip:port/proto`), sorted, with one seed
//! ([`MAGLEV_SEED`]) on every node, so every node maps a flow to the same
//! backend; each entry then holds that backend's slot number on this node
//! (slot order differs between nodes: local backends come first). Removing
//! one of N backends changes about 1/N of the entries.
//!
//! [`Tables`] writes only tables whose backends changed and deletes those
//! of frontends that are gone; a restarted agent rewrites them all once.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use netboot_contract::config::MAGLEV_SEED;

use crate::layout::{names, L4Addr, Maglev, MAGLEV_MAX};
use crate::maps::MapsError;
use crate::pins::Pins;

/// splitmix64's finalizer.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A seeded 64-bit hash of `data` (FNV-1a over the bytes, then [`mix`]).
/// Stable across builds and machines: the tables depend on it.
pub fn hash(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The per-packet path's flow hash (`nb_flow_hash` in sock_lb.bpf.c):
/// source address and port, destination port, protocol.
pub fn flow_hash(saddr: std::net::Ipv4Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let h = (u64::from(u32::from(saddr)) << 32) | (u64::from(sport) << 16) | u64::from(dport);
    mix(h ^ (u64::from(proto) << 56)) as u32
}

/// The lookup table over `names` (distinct, in the order given): entry →
/// index into `names`. Empty when there are no names or `m` is 0.
pub fn lookup(names: &[Vec<u8>], m: u32, seed: u64) -> Vec<u16> {
    let n = names.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = hash(seed, name) % m64;
            let skip = if m > 1 {
                hash(seed ^ 0x5bd1_e995, name) % (m64 - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry: Vec<Option<u16>> = vec![None; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (offset, skip)) in perm.iter().enumerate() {
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while entry[c].is_some() {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            entry[c] = Some(i as u16);
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    entry.into_iter().map(|e| e.unwrap_or(0)).collect()
}

/// A backend's name in the table: `ip:port/proto`, the same on every node.
fn name(b: &L4Addr) -> Vec<u8> {
    format!("{}:{}/{}", b.ip, b.port, b.proto).into_bytes()
}

/// The table of one frontend: entry → slot number (1-based position in
/// `slots`, the frontend's backends in slot order on this node).
pub fn slot_table(slots: &[L4Addr], m: u32) -> Vec<u16> {
    let mut sorted: Vec<(Vec<u8>, u16)> = slots
        .iter()
        .enumerate()
        .map(|(i, b)| (name(b), u16::try_from(i + 1).unwrap_or(u16::MAX)))
        .collect();
    sorted.sort();
    sorted.dedup_by(|a, b| a.0 == b.0);
    let names: Vec<Vec<u8>> = sorted.iter().map(|(n, _)| n.clone()).collect();
    lookup(&names, m, MAGLEV_SEED)
        .into_iter()
        .map(|i| sorted[usize::from(i)].1)
        .collect()
}

/// The Maglev tables in `nb_lb4_maglev`, as written by this agent.
pub struct Tables {
    map: HashMap<MapData, u32, Maglev>,
    size: u32,
    enabled: bool,
    /// Service id → the backends its table was built from.
    written: BTreeMap<u32, Vec<L4Addr>>,
    /// Frontends the last sync found no room for (the map is full): their
    /// new flows pick a random backend.
    unfit: usize,
    /// Entries of an earlier run are checked once.
    cleaned: bool,
}

fn kerr(op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    crate::maps::kernel::kerr(names::MAGLEV, op)
}

impl Tables {
    /// Opens the pinned map. `enabled` false (algorithm random): every
    /// table is removed at the first [`Tables::sync`] and none written.
    pub fn open(pins: &Pins, size: u32, enabled: bool) -> Result<Self, MapsError> {
        Self::open_path(&pins.map(names::MAGLEV), size, enabled)
    }

    /// Opens a map pinned at `path` (tests give a small one).
    pub fn open_path(path: &Path, size: u32, enabled: bool) -> Result<Self, MapsError> {
        let data = MapData::from_pin(path).map_err(kerr("open"))?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(kerr("open"))?;
        Ok(Self {
            map,
            size: size.min(MAGLEV_MAX as u32),
            enabled,
            written: BTreeMap::new(),
            unfit: 0,
            cleaned: false,
        })
    }

    /// Tables written.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    /// No table written.
    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    /// Frontends left without a table by the last sync because the map is
    /// full (`NB_DEFAULT_MAGLEV` tables): random selection for them.
    pub fn unfit(&self) -> usize {
        self.unfit
    }

    /// Makes the map hold one table per frontend of `wanted`
    /// ([`crate::reconcile::Reconciler::external_slots`]); returns the
    /// number of tables written or deleted.
    pub fn sync(&mut self, wanted: &[(u32, Vec<L4Addr>)]) -> Result<usize, MapsError> {
        let want: BTreeMap<u32, &Vec<L4Addr>> = wanted
            .iter()
            .filter(|(_, b)| self.enabled && !b.is_empty())
            .map(|(id, b)| (*id, b))
            .collect();
        let mut writes = 0;
        self.unfit = 0;
        if !self.cleaned {
            let stale: Vec<u32> = self
                .map
                .keys()
                .flatten()
                .filter(|k| !want.contains_key(k))
                .collect();
            for k in stale {
                self.map.remove(&k).map_err(kerr("delete"))?;
                writes += 1;
            }
            self.cleaned = true;
        }
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.map.remove(&id).map_err(kerr("delete"))?;
            self.written.remove(&id);
            writes += 1;
        }
        for (id, backends) in want {
            if self.written.get(&id) == Some(backends) {
                continue;
            }
            let mut v = Box::new(Maglev {
                size: self.size,
                slot: [0; MAGLEV_MAX],
                pad: 0,
            });
            for (i, s) in slot_table(backends, self.size).into_iter().enumerate() {
                if let Some(e) = v.slot.get_mut(i) {
                    *e = s;
                }
            }
            match self.map.insert(id, v, 0) {
                Ok(()) => {}
                // No room: this frontend goes without a table (random
                // selection), the rest are still written.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    self.written.remove(&id);
                    self.unfit += 1;
                    continue;
                }
                Err(e) => return Err(kerr("update")(e)),
            }
            self.written.insert(id, backends.clone());
            writes += 1;
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PROTO_TCP;

    fn backends(n: u8) -> Vec<L4Addr> {
        (1..=n)
            .map(|i| L4Addr {
                ip: format!("10.244.{}.{}", i / 100, i).parse().unwrap(),
                port: 8080,
                proto: PROTO_TCP,
            })
            .collect()
    }

    /// Entry → backend address, for comparing tables across slot orders.
    fn by_backend(slots: &[L4Addr], m: u32) -> Vec<L4Addr> {
        slot_table(slots, m)
            .into_iter()
            .map(|s| slots[usize::from(s) - 1])
            .collect()
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1u8, 2, 3, 10, 100] {
            let t = slot_table(&backends(n), 16381);
            assert_eq!(t.len(), 16381);
            let mut count = vec![0usize; usize::from(n)];
            for s in &t {
                count[usize::from(*s) - 1] += 1;
            }
            let ideal = 16381.0 / f64::from(n);
            let (lo, hi) = (
                *count.iter().min().unwrap() as f64,
                *count.iter().max().unwrap() as f64,
            );
            // Maglev's guarantee: entries per backend differ by at most one
            // permutation step; with M ≫ N they are within a few percent.
            assert!(lo >= ideal * 0.9 && hi <= ideal * 1.1, "n={n}: {count:?}");
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table_whatever_their_slot_order() {
        // Why: nodes order slots differently (local backends first); a flow
        // must still map to the same backend on every node.
        let b = backends(7);
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(by_backend(&b, 16381), by_backend(&rev, 16381));
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_flows() {
        // Tables of at least ~100 entries per backend, as the size is meant to be.
        for (n, m) in [
            (10u8, 16381u32),
            (5, 16381),
            (20, 16381),
            (100, 16381),
            (3, 251),
        ] {
            let all = backends(n);
            let before = by_backend(&all, m);
            let removed = all[usize::from(n) / 2];
            let rest: Vec<L4Addr> = all.iter().filter(|b| **b != removed).copied().collect();
            let after = by_backend(&rest, m);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let had_removed = before.iter().filter(|b| **b == removed).count();
            let frac = moved as f64 / f64::from(m);
            let ideal = 1.0 / f64::from(n);
            println!(
                "NUMBERS maglev n={n} m={m}: {moved} of {m} entries changed ({:.2}%, ideal {:.2}%), {had_removed} pointed at the removed backend",
                frac * 100.0,
                ideal * 100.0
            );
            // Entries of the removed backend must move; beyond them Maglev
            // moves a few more (its disruption is small, not zero).
            assert!(moved >= had_removed);
            assert!(frac <= ideal + 0.02, "n={n} m={m}: {frac} > {ideal} + 2%");
        }
    }

    #[test]
    fn hashes_are_stable() {
        // Why: every node and every build must build the same table.
        assert_eq!(hash(0, b""), mix(0xcbf2_9ce4_8422_2325));
        // Golden values: a change here changes every node's tables.
        assert_eq!(slot_table(&backends(3), 251)[..8], [2, 2, 3, 3, 3, 3, 2, 1]);
        let f = flow_hash("192.168.50.100".parse().unwrap(), 40000, 30080, 6);
        assert_eq!(f, 3009265807);
        assert_ne!(
            f,
            flow_hash("192.168.50.100".parse().unwrap(), 40001, 30080, 6)
        );
    }
}
