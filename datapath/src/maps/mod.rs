//! Access to the load-balancing maps behind one small trait, with three
//! backends: the real pinned kernel maps ([`kernel::KernelMaps`]), an in-memory
//! table for unit tests ([`memory::MemoryMaps`]) and one that fails on purpose
//! ([`faulty::FaultyMaps`]), after Cilium's `LBMaps` / `FaultyLBMaps`.

pub mod faulty;
pub mod kernel;
pub mod memory;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::layout::{
    addr_from_be, port_from_be, proto_name, Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat,
    Lb4Service, BE_TERMINATING,
};

/// Errors of map access.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A kernel map operation failed.
    #[error("map {map}: {op}: {source}")]
    Kernel {
        /// Map name.
        map: &'static str,
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A pinned map could not be opened.
    #[error("{path}: open pinned map: {source}")]
    Open {
        /// Pin path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The map holds `max_entries` already (the in-memory backend's limit;
    /// the kernel reports E2BIG, see [`MapsError::is_full`]).
    #[error("map {map}: full ({max_entries} entries)")]
    Full {
        /// Map name.
        map: &'static str,
        /// Its capacity.
        max_entries: usize,
    },
    /// The faulty backend failed this write on purpose.
    #[error("injected fault on {op} #{n}")]
    Injected {
        /// Operation.
        op: &'static str,
        /// Sequence number of the write.
        n: u64,
    },
}

impl MapsError {
    /// The name of the map that had no room for a new entry, when that is
    /// what failed: E2BIG (hash map at `max_entries`), ENOMEM or ENOSPC
    /// from the kernel, or [`MapsError::Full`]. Any other error is not about
    /// capacity.
    pub fn full_map(&self) -> Option<&'static str> {
        match self {
            MapsError::Full { map, .. } => Some(map),
            MapsError::Kernel { map, source, .. } => match source.as_ref() {
                aya::maps::MapError::SyscallError(e)
                    if matches!(
                        e.io_error.raw_os_error(),
                        Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
                    ) =>
                {
                    Some(map)
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// Everything the reconciler writes, as read back from the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsDump {
    /// `nb_lb4_svc`.
    pub services: BTreeMap<Lb4Key, Lb4Service>,
    /// `nb_lb4_be`.
    pub backends: BTreeMap<u32, Lb4Backend>,
    /// `nb_lb4_revnat`.
    pub revnat: BTreeMap<u16, Lb4ReverseNat>,
    /// `nb_lb4_affmatch`.
    pub aff_match: BTreeMap<Lb4AffinityMatch, u32>,
}

impl MapsDump {
    /// A stable, line-per-entry text form (golden files, `bpf lb list --raw`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut svcs: Vec<(&Lb4Key, &Lb4Service)> = self.services.iter().collect();
        svcs.sort_by_key(|(k, _)| (k.frontend(), k.backend_slot));
        for (k, v) in svcs {
            let fe = k.frontend();
            if k.backend_slot == 0 {
                let _ = writeln!(
                    s,
                    "svc {fe} slot=0 count={} revnat={} flags={:#x} affinity_timeout={}",
                    v.count, v.rev_nat_index, v.flags, v.affinity_timeout
                );
            } else {
                let _ = writeln!(
                    s,
                    "svc {fe} slot={} backend={} revnat={}",
                    k.backend_slot, v.backend_id, v.rev_nat_index
                );
            }
        }
        for (id, b) in &self.backends {
            let state = if b.state == BE_TERMINATING {
                "terminating"
            } else {
                "active"
            };
            let _ = writeln!(s, "backend {id} {} {state}", b.l4());
        }
        for (id, r) in &self.revnat {
            let _ = writeln!(
                s,
                "revnat {id} {}:{}",
                addr_from_be(r.address),
                port_from_be(r.port)
            );
        }
        for (k, v) in &self.aff_match {
            let _ = writeln!(
                s,
                "affmatch backend={} revnat={} state={v}",
                k.backend_id, k.rev_nat_id
            );
        }
        s
    }

    /// Number of frontends (slot 0 entries).
    pub fn frontend_count(&self) -> usize {
        self.services.keys().filter(|k| k.backend_slot == 0).count()
    }

    /// Protocol name helper for display.
    pub fn proto(p: u8) -> &'static str {
        proto_name(p)
    }
}

/// Update / delete / dump of the maps the reconciler owns. Deleting a missing
/// key succeeds. Each call is one map operation, so a failure leaves every
/// earlier call applied.
pub trait LbMaps {
    /// Inserts or replaces a frontend or slot.
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError>;
    /// Removes a frontend or slot.
    fn delete_service(&mut self, key: Lb4Key) -> Result<(), MapsError>;
    /// Inserts or replaces a backend.
    fn update_backend(&mut self, id: u32, val: Lb4Backend) -> Result<(), MapsError>;
    /// Removes a backend.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError>;
    /// Inserts or replaces a reverse-NAT entry.
    fn update_revnat(&mut self, id: u16, val: Lb4ReverseNat) -> Result<(), MapsError>;
    /// Removes a reverse-NAT entry.
    fn delete_revnat(&mut self, id: u16) -> Result<(), MapsError>;
    /// Inserts or replaces an affinity membership entry.
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError>;
    /// Removes an affinity membership entry.
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError>;
    /// Reads everything back.
    fn dump(&self) -> Result<MapsDump, MapsError>;
}
