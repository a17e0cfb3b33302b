//! `loadBalancerSourceRanges` for the per-packet path: `nb_lb4_src_range`
//! and `nb_lb6_src_range`, LPM tries keyed by (service id of an LB IP
//! frontend, source CIDR of the frontend's family).
//!
//! A frontend flagged `SVC_F_SRC_RANGE` admits a new flow from outside only
//! when its source address matches one of its entries (kube-proxy's
//! `KUBE-FW-*` / firewall-check rules, which drop the rest). Entries are
//! written after the pass that programmed the frontend (its id is known
//! then): between the two, new flows to that LB IP are dropped — it fails
//! closed, never open. [`SourceRanges::sync`] writes only what changed and
//! deletes the entries of frontends that are gone; a restarted agent
//! rewrites them all once and deletes what an earlier run left.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};

use crate::layout::{addr6_be, addr6_from_be, names, SrcRange6Key, SrcRangeKey};
use crate::maps::MapsError;
use crate::pins::Pins;

/// One trie entry: service id, network address, mask length.
type Entry = (u32, IpAddr, u8);

/// The tries (`nb_lb4_src_range`, `nb_lb6_src_range`), as written by this agent.
pub struct SourceRanges {
    map4: LpmTrie<MapData, SrcRangeKey, u32>,
    map6: LpmTrie<MapData, SrcRange6Key, u32>,
    written: BTreeSet<Entry>,
    /// Entries of an earlier run are checked once.
    cleaned: bool,
}

fn kerr(map: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    crate::maps::kernel::kerr(map, op)
}

fn key4(id: u32, addr: Ipv4Addr, len: u8) -> Key<SrcRangeKey> {
    Key::new(
        32 + u32::from(len),
        SrcRangeKey {
            rev_nat_index: id,
            addr: u32::from(addr).to_be(),
        },
    )
}

fn key6(id: u32, addr: std::net::Ipv6Addr, len: u8) -> Key<SrcRange6Key> {
    Key::new(
        32 + u32::from(len),
        SrcRange6Key {
            rev_nat_index: id,
            addr: addr6_be(addr),
        },
    )
}

/// The entries `wanted` ([`crate::reconcile::Reconciler::source_ranges`])
/// makes, masks clamped to the family's width.
pub fn entries(wanted: &[(u32, Vec<(IpAddr, u8)>)]) -> BTreeSet<Entry> {
    wanted
        .iter()
        .flat_map(|(id, ranges)| {
            ranges.iter().map(move |(a, l)| {
                let max = if a.is_ipv6() { 128 } else { 32 };
                (*id, *a, (*l).min(max))
            })
        })
        .collect()
}

fn open_trie<K: aya::Pod>(
    pins: &Pins,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, u32>, MapsError> {
    let data = MapData::from_pin(pins.map(name)).map_err(kerr(name, "open"))?;
    LpmTrie::try_from(Map::LpmTrie(data)).map_err(kerr(name, "open"))
}

impl SourceRanges {
    /// Opens the pinned tries.
    pub fn open(pins: &Pins) -> Result<Self, MapsError> {
        Ok(Self {
            map4: open_trie(pins, names::SRC_RANGE)?,
            map6: open_trie(pins, names::SRC_RANGE6)?,
            written: BTreeSet::new(),
            cleaned: false,
        })
    }

    /// Entries written.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    /// No entry written.
    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    fn remove(&mut self, (id, addr, len): Entry) -> Result<(), MapsError> {
        match addr {
            IpAddr::V4(a) => self
                .map4
                .remove(&key4(id, a, len))
                .map_err(kerr(names::SRC_RANGE, "delete")),
            IpAddr::V6(a) => self
                .map6
                .remove(&key6(id, a, len))
                .map_err(kerr(names::SRC_RANGE6, "delete")),
        }
    }

    fn insert(&mut self, (id, addr, len): Entry) -> Result<(), MapsError> {
        match addr {
            IpAddr::V4(a) => self
                .map4
                .insert(&key4(id, a, len), 1u32, 0)
                .map_err(kerr(names::SRC_RANGE, "update")),
            IpAddr::V6(a) => self
                .map6
                .insert(&key6(id, a, len), 1u32, 0)
                .map_err(kerr(names::SRC_RANGE6, "update")),
        }
    }

    /// What an earlier run left in the tries.
    fn found(&self) -> Vec<Entry> {
        let len = |k: u32, max: u8| {
            u8::try_from(k.saturating_sub(32))
                .unwrap_or(u8::MAX)
                .min(max)
        };
        let mut out: Vec<Entry> = self
            .map4
            .keys()
            .flatten()
            .map(|k| {
                let d = k.data();
                (
                    d.rev_nat_index,
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(d.addr))),
                    len(k.prefix_len(), 32),
                )
            })
            .collect();
        out.extend(self.map6.keys().flatten().map(|k| {
            let d = k.data();
            (
                d.rev_nat_index,
                IpAddr::V6(addr6_from_be(d.addr)),
                len(k.prefix_len(), 128),
            )
        }));
        out
    }

    /// Makes the tries hold exactly the entries of `wanted`; returns the
    /// number of entries written or deleted.
    pub fn sync(&mut self, wanted: &[(u32, Vec<(IpAddr, u8)>)]) -> Result<usize, MapsError> {
        let want = entries(wanted);
        let mut writes = 0;
        if !self.cleaned {
            for e in self.found() {
                if want.contains(&e) {
                    self.written.insert(e);
                } else {
                    self.remove(e)?;
                    writes += 1;
                }
            }
            self.cleaned = true;
        }
        let gone: Vec<Entry> = self.written.difference(&want).copied().collect();
        for e in gone {
            self.remove(e)?;
            self.written.remove(&e);
            writes += 1;
        }
        let new: Vec<Entry> = want.difference(&self.written).copied().collect();
        for e in new {
            self.insert(e)?;
            self.written.insert(e);
            writes += 1;
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_flatten_per_service_and_clamp_the_mask() {
        let e = entries(&[
            (
                7,
                vec![
                    ("10.0.0.0".parse().unwrap(), 8),
                    ("1.2.3.4".parse().unwrap(), 40),
                    ("2001:db8::".parse().unwrap(), 200),
                ],
            ),
            (9, vec![]),
        ]);
        assert_eq!(
            e.into_iter().collect::<Vec<_>>(),
            vec![
                (7, "1.2.3.4".parse().unwrap(), 32),
                (7, "10.0.0.0".parse().unwrap(), 8),
                (7, "2001:db8::".parse().unwrap(), 128)
            ]
        );
    }

    #[test]
    fn an_ipv6_key_matches_the_id_whole_then_the_mask() {
        let k = key6(3, "2001:db8::".parse().unwrap(), 32);
        assert_eq!(k.prefix_len(), 64);
        assert_eq!(k.data().rev_nat_index, 3);
        assert_eq!(k.data().addr, addr6_be("2001:db8::".parse().unwrap()));
    }

    #[test]
    fn a_key_matches_the_id_whole_then_the_mask() {
        let k = key4(3, "192.168.0.0".parse().unwrap(), 16);
        assert_eq!(k.prefix_len(), 48);
        assert_eq!(k.data().rev_nat_index, 3);
        assert_eq!(
            k.data().addr,
            u32::from(Ipv4Addr::new(192, 168, 0, 0)).to_be()
        );
    }
}
