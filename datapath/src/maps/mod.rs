//! Access to the load-balancing maps behind one small trait, with three
//! backends: the real pinned kernel maps ([`kernel::KernelMaps`]), an in-memory
//! table for unit tests ([`memory::MemoryMaps`]) and one that fails on purpose
//! ([`faulty::FaultyMaps`]), after Cilium's `LBMaps` / `FaultyLBMaps`.

pub mod batch;
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
                // An IPv4 slot's copy of its backend (`at=none`: looked up
                // in nb_lb4_be instead).
                let at = match v.slot_backend() {
                    _ if fe.is_v6() => String::new(),
                    Some((ip, port)) => format!(" at={ip}:{port}"),
                    None => " at=none".into(),
                };
                let _ = writeln!(
                    s,
                    "svc {fe} slot={slot} backend={} revnat={}{at}",
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

/// One write to a map the reconciler owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    /// `nb_lb4_svc` update.
    Service(Lb4Key, Lb4Service),
    /// `nb_lb4_svc` delete.
    DelService(Lb4Key),
    /// `nb_lb6_svc` update.
    Service6(Lb6Key, Lb4Service),
    /// `nb_lb6_svc` delete.
    DelService6(Lb6Key),
    /// `nb_lb4_be` update.
    Backend(u32, Lb4Backend),
    /// `nb_lb4_be` delete.
    DelBackend(u32),
    /// `nb_lb6_be` update.
    Backend6(u32, Lb6Backend),
    /// `nb_lb6_be` delete.
    DelBackend6(u32),
    /// `nb_lb4_revnat` update.
    Revnat(u32, Lb4ReverseNat),
    /// `nb_lb4_revnat` delete.
    DelRevnat(u32),
    /// `nb_lb6_revnat` update.
    Revnat6(u32, Lb6ReverseNat),
    /// `nb_lb6_revnat` delete.
    DelRevnat6(u32),
    /// `nb_lb4_affmatch` update.
    AffMatch(Lb4AffinityMatch, u32),
    /// `nb_lb4_affmatch` delete.
    DelAffMatch(Lb4AffinityMatch),
}

impl MapWrite {
    /// Slot `slot` of frontend `fe`, in the map of its family.
    pub fn service(fe: L4Addr, slot: u16, val: Lb4Service) -> Self {
        if fe.is_v6() {
            MapWrite::Service6(Lb6Key::new(fe, slot), val)
        } else {
            MapWrite::Service(Lb4Key::new(fe, slot), val)
        }
    }
    /// Removes slot `slot` of frontend `fe`.
    pub fn del_service(fe: L4Addr, slot: u16) -> Self {
        if fe.is_v6() {
            MapWrite::DelService6(Lb6Key::new(fe, slot))
        } else {
            MapWrite::DelService(Lb4Key::new(fe, slot))
        }
    }
    /// Backend `id` at `addr`, in the map of its family.
    pub fn backend(id: u32, addr: L4Addr, state: u8) -> Self {
        match addr.ip {
            IpAddr::V4(ip) => MapWrite::Backend(
                id,
                Lb4Backend {
                    address: addr_be(ip),
                    port: port_be(addr.port),
                    proto: addr.proto,
                    state,
                },
            ),
            IpAddr::V6(ip) => MapWrite::Backend6(
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
    /// Removes backend `id` (at `addr`).
    pub fn del_backend(id: u32, addr: L4Addr) -> Self {
        if addr.is_v6() {
            MapWrite::DelBackend6(id)
        } else {
            MapWrite::DelBackend(id)
        }
    }
    /// Reverse-NAT entry `id` → `fe`'s VIP and port.
    pub fn revnat(id: u32, fe: L4Addr) -> Self {
        match fe.ip {
            IpAddr::V4(ip) => MapWrite::Revnat(
                id,
                Lb4ReverseNat {
                    address: addr_be(ip),
                    port: port_be(fe.port),
                    pad: 0,
                },
            ),
            IpAddr::V6(ip) => MapWrite::Revnat6(
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
    pub fn del_revnat(id: u32, v6: bool) -> Self {
        if v6 {
            MapWrite::DelRevnat6(id)
        } else {
            MapWrite::DelRevnat(id)
        }
    }

    /// The map written and whether it is a delete: consecutive writes of one
    /// kind can go to the kernel as one batch.
    pub fn kind(&self) -> (&'static str, bool) {
        use crate::layout::names;
        match self {
            MapWrite::Service(..) => (names::SERVICES, false),
            MapWrite::DelService(..) => (names::SERVICES, true),
            MapWrite::Service6(..) => (names::SERVICES6, false),
            MapWrite::DelService6(..) => (names::SERVICES6, true),
            MapWrite::Backend(..) => (names::BACKENDS, false),
            MapWrite::DelBackend(..) => (names::BACKENDS, true),
            MapWrite::Backend6(..) => (names::BACKENDS6, false),
            MapWrite::DelBackend6(..) => (names::BACKENDS6, true),
            MapWrite::Revnat(..) => (names::REVNAT, false),
            MapWrite::DelRevnat(..) => (names::REVNAT, true),
            MapWrite::Revnat6(..) => (names::REVNAT6, false),
            MapWrite::DelRevnat6(..) => (names::REVNAT6, true),
            MapWrite::AffMatch(..) => (names::AFF_MATCH, false),
            MapWrite::DelAffMatch(..) => (names::AFF_MATCH, true),
        }
    }
}

/// [`LbMaps::write_all`] stopped: the first `applied` writes are in the
/// maps, write number `applied` failed with `source`, and none after it was
/// tried.
#[derive(Debug)]
pub struct Stopped {
    /// Writes applied before the failure.
    pub applied: usize,
    /// Why write number `applied` failed.
    pub source: MapsError,
}

/// Update / delete / dump of the maps the reconciler owns. Deleting a missing
/// key succeeds. Each call is one map operation, so a failure leaves every
/// earlier call applied; [`LbMaps::write_all`] keeps that promise per write.
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
    /// The service ids `nb_svc_stats` has counters for, read at recovery:
    /// a new frontend's id is reset only if it is among them or was freed
    /// since (a fresh start's 100k frontends otherwise cost 100k deletes of
    /// absent keys). None (the default, or the read failed): unknown, every
    /// new id is reset.
    fn svc_stats_ids(&self) -> Option<Vec<u32>> {
        None
    }

    /// One write.
    fn write(&mut self, w: &MapWrite) -> Result<(), MapsError> {
        match *w {
            MapWrite::Service(k, v) => self.update_service(k, v),
            MapWrite::DelService(k) => self.delete_service(k),
            MapWrite::Service6(k, v) => self.update_service6(k, v),
            MapWrite::DelService6(k) => self.delete_service6(k),
            MapWrite::Backend(k, v) => self.update_backend(k, v),
            MapWrite::DelBackend(k) => self.delete_backend(k),
            MapWrite::Backend6(k, v) => self.update_backend6(k, v),
            MapWrite::DelBackend6(k) => self.delete_backend6(k),
            MapWrite::Revnat(k, v) => self.update_revnat(k, v),
            MapWrite::DelRevnat(k) => self.delete_revnat(k),
            MapWrite::Revnat6(k, v) => self.update_revnat6(k, v),
            MapWrite::DelRevnat6(k) => self.delete_revnat6(k),
            MapWrite::AffMatch(k, v) => self.update_aff_match(k, v),
            MapWrite::DelAffMatch(k) => self.delete_aff_match(k),
        }
    }

    /// The writes `ws` in order, as if each were its own call: on failure
    /// every earlier one is applied and no later one was tried. The kernel
    /// backend sends consecutive writes of one kind as one batch
    /// (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`); the default writes
    /// them one by one.
    fn write_all(&mut self, ws: &[MapWrite]) -> Result<(), Stopped> {
        for (applied, w) in ws.iter().enumerate() {
            self.write(w)
                .map_err(|source| Stopped { applied, source })?;
        }
        Ok(())
    }

    /// Writes slot `slot` of frontend `fe` into the map of its family.
    fn put_service(&mut self, fe: L4Addr, slot: u16, val: Lb4Service) -> Result<(), MapsError> {
        self.write(&MapWrite::service(fe, slot, val))
    }
    /// Removes slot `slot` of frontend `fe` from the map of its family.
    fn del_service(&mut self, fe: L4Addr, slot: u16) -> Result<(), MapsError> {
        self.write(&MapWrite::del_service(fe, slot))
    }
    /// Writes backend `id` at `addr` into the map of its family.
    fn put_backend(&mut self, id: u32, addr: L4Addr, state: u8) -> Result<(), MapsError> {
        self.write(&MapWrite::backend(id, addr, state))
    }
    /// Removes backend `id` (at `addr`) from the map of its family.
    fn del_backend(&mut self, id: u32, addr: L4Addr) -> Result<(), MapsError> {
        self.write(&MapWrite::del_backend(id, addr))
    }
    /// Writes reverse-NAT entry `id` → `fe`'s VIP and port.
    fn put_revnat(&mut self, id: u32, fe: L4Addr) -> Result<(), MapsError> {
        self.write(&MapWrite::revnat(id, fe))
    }
    /// Removes reverse-NAT entry `id` of an IPv6 (`v6`) or IPv4 frontend.
    fn del_revnat(&mut self, id: u32, v6: bool) -> Result<(), MapsError> {
        self.write(&MapWrite::del_revnat(id, v6))
    }
}
