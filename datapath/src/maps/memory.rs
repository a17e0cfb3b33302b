//! In-memory map backend for unit tests.

use super::{LbMaps, MapsDump, MapsError};
use crate::layout::{Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service};

/// Maps held in `BTreeMap`s; counts writes so tests can assert "no writes".
#[derive(Clone, Debug, Default)]
pub struct MemoryMaps {
    /// Current contents.
    pub state: MapsDump,
    /// Number of update/delete calls so far.
    pub writes: u64,
}

impl MemoryMaps {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }
}

impl LbMaps for MemoryMaps {
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError> {
        self.writes += 1;
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
        self.state.backends.insert(id, val);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.backends.remove(&id);
        Ok(())
    }
    fn update_revnat(&mut self, id: u16, val: Lb4ReverseNat) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.revnat.insert(id, val);
        Ok(())
    }
    fn delete_revnat(&mut self, id: u16) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.revnat.remove(&id);
        Ok(())
    }
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.aff_match.insert(key, state);
        Ok(())
    }
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError> {
        self.writes += 1;
        self.state.aff_match.remove(&key);
        Ok(())
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        Ok(self.state.clone())
    }
}
