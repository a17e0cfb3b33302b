//! Access to the load-balancing maps behind one small trait, with three
//! backends: the real pinned kernel maps ([`kernel::KernelMaps`]), an in-memory
//! table for unit tests ([`memory::MemoryMaps`]) and one that fails on purpose
//! ([`faulty::FaultyMaps`]), after Cilium's `LBMaps` / `FaultyLBMaps`.

pub mod faulty;
pub mod kernel;
pub mod memory;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use std::net::IpAddr;

use crate::layout::{
    addr6_be, addr6_from_be, addr_be, addr_from_be, port_be, port_from_be, proto_name, L4Addr,
    Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service, Lb6Backend, Lb6Key,
    Lb6ReverseNat, BE_TERMINATING,
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
    pub revnat: BTreeMap<u32, Lb4ReverseNat>,
    /// `nb_lb4_affmatch` (both families: ids are shared).
    pub aff_match: BTreeMap<Lb4AffinityMatch, u32>,
    /// `nb_lb6_svc`.
    pub services6: BTreeMap<Lb6Key, Lb4Service>,
    /// `nb_lb6_be`.
    pub backends6: BTreeMap<u32, Lb6Backend>,
    /// `nb_lb6_revnat`.
    pub revnat6: BTreeMap<u32, Lb6ReverseNat>,
}

impl MapsDump {
    /// A stable, line-per-entry text form (golden files, `bpf lb list --raw`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (fe, slot, v) in self.service_entries() {
            if slot == 0 {
                let _ = writeln!(
                    s,
                    "svc {fe} slot=0 count={} revnat={} flags={:#x} affinity_timeout={}",
                    v.count, v.rev_nat_index, v.flags, v.affinity_timeout
                );
            } else {
                let _ = writeln!(
                    s,
                    "svc {fe} slot={slot} backend={} revnat={}",
                    v.backend_id, v.rev_nat_index
                );
            }
        }
        for (id, (b, state)) in self.backend_entries() {
            let state = if state == BE_TERMINATING {
                "terminating"
            } else {
                "active"
            };
            let _ = writeln!(s, "backend {id} {b} {state}");
        }
        for (id, ip, port) in self.revnat_entries() {
            match ip {
                IpAddr::V4(ip) => {
                    let _ = writeln!(s, "revnat {id} {ip}:{port}");
                }
                IpAddr::V6(ip) => {
                    let _ = writeln!(s, "revnat {id} [{ip}]:{port}");
                }
            }
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

    /// Number of frontends (slot 0 entries), both families.
    pub fn frontend_count(&self) -> usize {
        self.services.keys().filter(|k| k.backend_slot == 0).count()
            + self
                .services6
                .keys()
                .filter(|k| k.backend_slot == 0)
                .count()
    }

    /// Number of backends, both families.
    pub fn backend_count(&self) -> usize {
        self.backends.len() + self.backends6.len()
    }

    /// Every `nb_lb4_svc` and `nb_lb6_svc` entry as (frontend, slot, value),
    /// sorted by frontend (IPv4 first) and slot.
    pub fn service_entries(&self) -> Vec<(L4Addr, u16, Lb4Service)> {
        let mut out: Vec<(L4Addr, u16, Lb4Service)> = self
            .services
            .iter()
            .map(|(k, v)| (k.frontend(), k.backend_slot, *v))
            .chain(
                self.services6
                    .iter()
                    .map(|(k, v)| (k.frontend(), k.backend_slot, *v)),
            )
            .collect();
        out.sort_by_key(|(fe, slot, _)| (*fe, *slot));
        out
    }

    /// The service entry of frontend `fe`, slot `slot`, either family.
    pub fn service(&self, fe: L4Addr, slot: u16) -> Option<&Lb4Service> {
        if fe.is_v6() {
            self.services6.get(&Lb6Key::new(fe, slot))
        } else {
            self.services.get(&Lb4Key::new(fe, slot))
        }
    }

    /// Every backend as id → (address, `BE_*` state), both families.
    pub fn backend_entries(&self) -> BTreeMap<u32, (L4Addr, u8)> {
        self.backends
            .iter()
            .map(|(id, b)| (*id, (b.l4(), b.state)))
            .chain(
                self.backends6
                    .iter()
                    .map(|(id, b)| (*id, (b.l4(), b.state))),
            )
            .collect()
    }

    /// The address of backend `id`, either family.
    pub fn backend_addr(&self, id: u32) -> Option<L4Addr> {
        self.backends
            .get(&id)
            .map(Lb4Backend::l4)
            .or_else(|| self.backends6.get(&id).map(Lb6Backend::l4))
    }

    /// Every reverse-NAT entry as (id, VIP, port), IPv4 first.
    pub fn revnat_entries(&self) -> Vec<(u32, IpAddr, u16)> {
        self.revnat
            .iter()
            .map(|(id, r)| {
                (
                    *id,
                    IpAddr::V4(addr_from_be(r.address)),
                    port_from_be(r.port),
                )
            })
            .chain(self.revnat6.iter().map(|(id, r)| {
                (
                    *id,
                    IpAddr::V6(addr6_from_be(r.address)),
                    port_from_be(r.port),
                )
            }))
            .collect()
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
    fn update_revnat(&mut self, id: u32, val: Lb4ReverseNat) -> Result<(), MapsError>;
    /// Removes a reverse-NAT entry.
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError>;
    /// Inserts or replaces an affinity membership entry.
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError>;
    /// Removes an affinity membership entry.
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError>;
    /// Inserts or replaces an IPv6 frontend or slot.
    fn update_service6(&mut self, key: Lb6Key, val: Lb4Service) -> Result<(), MapsError>;
    /// Removes an IPv6 frontend or slot.
    fn delete_service6(&mut self, key: Lb6Key) -> Result<(), MapsError>;
    /// Inserts or replaces an IPv6 backend.
    fn update_backend6(&mut self, id: u32, val: Lb6Backend) -> Result<(), MapsError>;
    /// Removes an IPv6 backend.
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError>;
    /// Inserts or replaces an IPv6 reverse-NAT entry.
    fn update_revnat6(&mut self, id: u32, val: Lb6ReverseNat) -> Result<(), MapsError>;
    /// Removes an IPv6 reverse-NAT entry.
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError>;
    /// Reads everything back.
    fn dump(&self) -> Result<MapsDump, MapsError>;
    /// Deletes service id `id`'s per-Service counters (`nb_svc_stats`), so
    /// that a frontend given a freed id starts at 0. Absent: Ok. The
    /// default is for backends without the map (e.g. timing wrappers).
    fn delete_svc_stats(&mut self, id: u32) -> Result<(), MapsError> {
        let _ = id;
        Ok(())
    }

    /// Writes slot `slot` of frontend `fe` into the map of its family.
    fn put_service(&mut self, fe: L4Addr, slot: u16, val: Lb4Service) -> Result<(), MapsError> {
        if fe.is_v6() {
            self.update_service6(Lb6Key::new(fe, slot), val)
        } else {
            self.update_service(Lb4Key::new(fe, slot), val)
        }
    }
    /// Removes slot `slot` of frontend `fe` from the map of its family.
    fn del_service(&mut self, fe: L4Addr, slot: u16) -> Result<(), MapsError> {
        if fe.is_v6() {
            self.delete_service6(Lb6Key::new(fe, slot))
        } else {
            self.delete_service(Lb4Key::new(fe, slot))
        }
    }
    /// Writes backend `id` at `addr` into the map of its family.
    fn put_backend(&mut self, id: u32, addr: L4Addr, state: u8) -> Result<(), MapsError> {
        match addr.ip {
            IpAddr::V4(ip) => self.update_backend(
                id,
                Lb4Backend {
                    address: addr_be(ip),
                    port: port_be(addr.port),
                    proto: addr.proto,
                    state,
                },
            ),
            IpAddr::V6(ip) => self.update_backend6(
                id,
                Lb6Backend {
                    address: addr6_be(ip),
                    port: port_be(addr.port),
                    proto: addr.proto,
                    state,
                },
            ),
        }
    }
    /// Removes backend `id` (at `addr`) from the map of its family.
    fn del_backend(&mut self, id: u32, addr: L4Addr) -> Result<(), MapsError> {
        if addr.is_v6() {
            self.delete_backend6(id)
        } else {
            self.delete_backend(id)
        }
    }
    /// Writes reverse-NAT entry `id` → `fe`'s VIP and port.
    fn put_revnat(&mut self, id: u32, fe: L4Addr) -> Result<(), MapsError> {
        match fe.ip {
            IpAddr::V4(ip) => self.update_revnat(
                id,
                Lb4ReverseNat {
                    address: addr_be(ip),
                    port: port_be(fe.port),
                    pad: 0,
                },
            ),
            IpAddr::V6(ip) => self.update_revnat6(
                id,
                Lb6ReverseNat {
                    address: addr6_be(ip),
                    port: port_be(fe.port),
                    pad: 0,
                },
            ),
        }
    }
    /// Removes reverse-NAT entry `id` of an IPv6 (`v6`) or IPv4 frontend.
    fn del_revnat(&mut self, id: u32, v6: bool) -> Result<(), MapsError> {
        if v6 {
            self.delete_revnat6(id)
        } else {
            self.delete_revnat(id)
        }
    }
}
