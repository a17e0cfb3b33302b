//! `loadBalancerSourceRanges` for the per-packet path: `nb_lb4_src_range`,
//! an LPM trie keyed by (service id of an LB IP frontend, source CIDR).
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
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};

use crate::layout::{names, SrcRangeKey};
use crate::maps::MapsError;
use crate::pins::Pins;

/// One trie entry: service id, network address, mask length.
type Entry = (u16, Ipv4Addr, u8);

/// The trie, as written by this agent.
pub struct SourceRanges {
    map: LpmTrie<MapData, SrcRangeKey, u32>,
    written: BTreeSet<Entry>,
    /// Entries of an earlier run are checked once.
    cleaned: bool,
}

fn kerr(op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    crate::maps::kernel::kerr(names::SRC_RANGE, op)
}

fn key((id, addr, len): Entry) -> Key<SrcRangeKey> {
    Key::new(
        32 + u32::from(len),
        SrcRangeKey {
            rev_nat_index: u32::from(id),
            addr: u32::from(addr).to_be(),
        },
    )
}

/// The entries `wanted` ([`crate::reconcile::Reconciler::source_ranges`]) makes.
pub fn entries(wanted: &[(u16, Vec<(Ipv4Addr, u8)>)]) -> BTreeSet<Entry> {
    wanted
        .iter()
        .flat_map(|(id, ranges)| ranges.iter().map(move |(a, l)| (*id, *a, (*l).min(32))))
        .collect()
}

impl SourceRanges {
    /// Opens the pinned trie.
    pub fn open(pins: &Pins) -> Result<Self, MapsError> {
        Self::open_path(&pins.map(names::SRC_RANGE))
    }

    fn open_path(path: &Path) -> Result<Self, MapsError> {
        let data = MapData::from_pin(path).map_err(kerr("open"))?;
        let map = LpmTrie::try_from(Map::LpmTrie(data)).map_err(kerr("open"))?;
        Ok(Self {
            map,
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

    /// Makes the trie hold exactly the entries of `wanted`; returns the
    /// number of entries written or deleted.
    pub fn sync(&mut self, wanted: &[(u16, Vec<(Ipv4Addr, u8)>)]) -> Result<usize, MapsError> {
        let want = entries(wanted);
        let mut writes = 0;
        if !self.cleaned {
            let found: Vec<Key<SrcRangeKey>> = self.map.keys().flatten().collect();
            for k in found {
                let d = k.data();
                let e = u16::try_from(d.rev_nat_index).ok().map(|id| {
                    (
                        id,
                        Ipv4Addr::from(u32::from_be(d.addr)),
                        u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(u8::MAX),
                    )
                });
                match e {
                    Some(e) if want.contains(&e) => {
                        self.written.insert(e);
                    }
                    _ => {
                        self.map.remove(&k).map_err(kerr("delete"))?;
                        writes += 1;
                    }
                }
            }
            self.cleaned = true;
        }
        let gone: Vec<Entry> = self.written.difference(&want).copied().collect();
        for e in gone {
            self.map.remove(&key(e)).map_err(kerr("delete"))?;
            self.written.remove(&e);
            writes += 1;
        }
        let new: Vec<Entry> = want.difference(&self.written).copied().collect();
        for e in new {
            self.map.insert(&key(e), 1u32, 0).map_err(kerr("update"))?;
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
                ],
            ),
            (9, vec![]),
        ]);
        assert_eq!(
            e.into_iter().collect::<Vec<_>>(),
            vec![
                (7, "1.2.3.4".parse().unwrap(), 32),
                (7, "10.0.0.0".parse().unwrap(), 8)
            ]
        );
    }

    #[test]
    fn a_key_matches_the_id_whole_then_the_mask() {
        let k = key((3, "192.168.0.0".parse().unwrap(), 16));
        assert_eq!(k.prefix_len(), 48);
        assert_eq!(k.data().rev_nat_index, 3);
        assert_eq!(
            k.data().addr,
            u32::from(Ipv4Addr::new(192, 168, 0, 0)).to_be()
        );
    }
}
