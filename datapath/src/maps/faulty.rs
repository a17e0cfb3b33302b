//! A map backend that fails writes on purpose, to prove the reconciler
//! retries and converges.

use super::{memory::MemoryMaps, LbMaps, MapsDump, MapsError};
use crate::layout::{
    Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service, Lb6Backend, Lb6Key,
    Lb6ReverseNat,
};

/// Wraps [`MemoryMaps`]; every `fail_every`-th write fails (before applying).
#[derive(Clone, Debug)]
pub struct FaultyMaps {
    /// The maps behind the faults.
    pub inner: MemoryMaps,
    /// Fail write number n when `n % fail_every == 0`; 0 disables faults.
    pub fail_every: u64,
    /// Writes attempted so far.
    pub attempts: u64,
    /// Writes failed so far.
    pub failures: u64,
}

impl FaultyMaps {
    /// Fails every `fail_every`-th write.
    pub fn new(fail_every: u64) -> Self {
        Self {
            inner: MemoryMaps::new(),
            fail_every,
            attempts: 0,
            failures: 0,
        }
    }

    fn gate(&mut self, op: &'static str) -> Result<(), MapsError> {
        self.attempts += 1;
        if self.fail_every != 0 && self.attempts.is_multiple_of(self.fail_every) {
            self.failures += 1;
            return Err(MapsError::Injected {
                op,
                n: self.attempts,
            });
        }
        Ok(())
    }
}

impl LbMaps for FaultyMaps {
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError> {
        self.gate("update_service")?;
        self.inner.update_service(key, val)
    }
    fn delete_service(&mut self, key: Lb4Key) -> Result<(), MapsError> {
        self.gate("delete_service")?;
        self.inner.delete_service(key)
    }
    fn update_backend(&mut self, id: u32, val: Lb4Backend) -> Result<(), MapsError> {
        self.gate("update_backend")?;
        self.inner.update_backend(id, val)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.gate("delete_backend")?;
        self.inner.delete_backend(id)
    }
    fn update_revnat(&mut self, id: u32, val: Lb4ReverseNat) -> Result<(), MapsError> {
        self.gate("update_revnat")?;
        self.inner.update_revnat(id, val)
    }
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError> {
        self.gate("delete_revnat")?;
        self.inner.delete_revnat(id)
    }
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError> {
        self.gate("update_aff_match")?;
        self.inner.update_aff_match(key, state)
    }
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError> {
        self.gate("delete_aff_match")?;
        self.inner.delete_aff_match(key)
    }
    fn update_service6(&mut self, key: Lb6Key, val: Lb4Service) -> Result<(), MapsError> {
        self.gate("update_service6")?;
        self.inner.update_service6(key, val)
    }
    fn delete_service6(&mut self, key: Lb6Key) -> Result<(), MapsError> {
        self.gate("delete_service6")?;
        self.inner.delete_service6(key)
    }
    fn update_backend6(&mut self, id: u32, val: Lb6Backend) -> Result<(), MapsError> {
        self.gate("update_backend6")?;
        self.inner.update_backend6(id, val)
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError> {
        self.gate("delete_backend6")?;
        self.inner.delete_backend6(id)
    }
    fn update_revnat6(&mut self, id: u32, val: Lb6ReverseNat) -> Result<(), MapsError> {
        self.gate("update_revnat6")?;
        self.inner.update_revnat6(id, val)
    }
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError> {
        self.gate("delete_revnat6")?;
        self.inner.delete_revnat6(id)
    }
    fn delete_svc_stats(&mut self, id: u32) -> Result<(), MapsError> {
        // Not a programming write: never faulted, so the injected faults
        // land where they did (the reconciler only logs its failure).
        self.inner.delete_svc_stats(id)
    }
    fn svc_stats_ids(&self) -> Option<Vec<u32>> {
        self.inner.svc_stats_ids()
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        self.inner.dump()
    }
}
