//! In-memory map backend for unit tests.

use std::collections::BTreeMap;

use super::{LbMaps, MapsDump, MapsError};
use crate::layout::{
    names, Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service, Lb6Backend, Lb6Key,
    Lb6ReverseNat,
};

/// Capacities, like a kernel map's `max_entries` (None: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapLimits {
    /// `nb_lb4_svc`.
    pub services: Option<usize>,
    /// `nb_lb4_be`.
    pub backends: Option<usize>,
    /// `nb_lb4_revnat`.
    pub revnat: Option<usize>,
    /// `nb_lb4_affmatch`.
    pub aff_match: Option<usize>,
    /// `nb_lb6_svc`.
    pub services6: Option<usize>,
    /// `nb_lb6_be`.
    pub backends6: Option<usize>,
    /// `nb_lb6_revnat`.
    pub revnat6: Option<usize>,
}

/// Maps held in `BTreeMap`s; counts writes so tests can assert "no writes".
#[derive(Clone, Debug, Default)]
pub struct MemoryMaps {
    /// Current contents.
    pub state: MapsDump,
    /// Number of update/delete calls so far.
    pub writes: u64,
    /// Capacities: inserting a new key into a map at its limit fails with
    /// [`MapsError::Full`] (replacing an existing key never does), as in the kernel.
    pub limits: MapLimits,
    /// `nb_svc_stats` (summed over CPUs); tests put counts here as traffic
    /// would. Its deletes are not counted in `writes` (no programming).
    pub svc_stats: BTreeMap<u32, crate::layout::SvcStats>,
    /// Calls of `delete_svc_stats` so far.
    pub svc_stats_deletes: u64,
}

impl MemoryMaps {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty maps with capacities.
    pub fn with_limits(limits: MapLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }
}

/// Fails like a full kernel hash map: only a new key needs room.
fn room<K: Ord, V>(
    m: &BTreeMap<K, V>,
    key: &K,
    limit: Option<usize>,
    map: &'static str,
) -> Result<(), MapsError> {
    match limit {
        Some(max) if m.len() >= max && !m.contains_key(key) => Err(MapsError::Full {
            map,
            max_entries: max,
        }),
        _ => Ok(()),
    }
}

impl LbMaps for MemoryMaps {
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.services,
            &key,
            self.limits.services,
            names::SERVICES,
        )?;
        self.state.services.insert(key, val);
        Ok(())
    }
    fn delete_service(&mut self, key: Lb4Key) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.services.remove(&key);
        Ok(())
    }
    fn update_backend(&mut self, id: u32, val: Lb4Backend) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.backends,
            &id,
            self.limits.backends,
            names::BACKENDS,
        )?;
        self.state.backends.insert(id, val);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.backends.remove(&id);
        Ok(())
    }
    fn update_revnat(&mut self, id: u32, val: Lb4ReverseNat) -> Result<(), MapsError> {
        self.writes += 1;
        room(&self.state.revnat, &id, self.limits.revnat, names::REVNAT)?;
        self.state.revnat.insert(id, val);
        Ok(())
    }
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.revnat.remove(&id);
        Ok(())
    }
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.aff_match,
            &key,
            self.limits.aff_match,
            names::AFF_MATCH,
        )?;
        self.state.aff_match.insert(key, state);
        Ok(())
    }
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.aff_match.remove(&key);
        Ok(())
    }
    fn update_service6(&mut self, key: Lb6Key, val: Lb4Service) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.services6,
            &key,
            self.limits.services6,
            names::SERVICES6,
        )?;
        self.state.services6.insert(key, val);
        Ok(())
    }
    fn delete_service6(&mut self, key: Lb6Key) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.services6.remove(&key);
        Ok(())
    }
    fn update_backend6(&mut self, id: u32, val: Lb6Backend) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.backends6,
            &id,
            self.limits.backends6,
            names::BACKENDS6,
        )?;
        self.state.backends6.insert(id, val);
        Ok(())
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.backends6.remove(&id);
        Ok(())
    }
    fn update_revnat6(&mut self, id: u32, val: Lb6ReverseNat) -> Result<(), MapsError> {
        self.writes += 1;
        room(
            &self.state.revnat6,
            &id,
            self.limits.revnat6,
            names::REVNAT6,
        )?;
        self.state.revnat6.insert(id, val);
        Ok(())
    }
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.revnat6.remove(&id);
        Ok(())
    }
    fn delete_svc_stats(&mut self, id: u32) -> Result<(), MapsError> {
        self.svc_stats.remove(&id);
        self.svc_stats_deletes += 1;
        Ok(())
    }
    fn svc_stats_ids(&self) -> Option<Vec<u32>> {
        Some(self.svc_stats.keys().copied().collect())
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        Ok(self.state.clone())
    }
}
