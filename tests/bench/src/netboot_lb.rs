//! Variant (b): netboot's real BPF programs attached to a cgroup the bench
//! created, their maps pinned under the bench's pin root and programmed by
//! the agent's real reconciler (in this process, from the desired table the
//! agent would build from the same Services and EndpointSlices).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use netboot_datapath::config::MapSizes;
use netboot_datapath::desired::DesiredTable;
use netboot_datapath::layout::{
    Lb4AffinityMatch, Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service, Lb6Backend, Lb6Key,
    Lb6ReverseNat,
};
use netboot_datapath::loader;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::maps::{LbMaps, MapWrite, MapsDump, MapsError, Stopped};
use netboot_datapath::pass::{PassKind, Passes};
use netboot_datapath::reconcile::{ReconcileError, Reconciler, SyncStats};
use netboot_datapath::watch::Watched;

use crate::cleanup::{Cgroup, PinRoot};

/// Map sizes that fit `frontends` × `per` slots and `endpoints` backends
/// (never below the agent's defaults). Service ids (`rev_nat_index`) are
/// u32, so these sizes are netboot's only limit on the number of Services;
/// the lb6 maps get the same sizes, so the dual-stack table of the same
/// Services fits too.
pub fn map_sizes(frontends: usize, per: u32, endpoints: u64) -> MapSizes {
    let d = MapSizes::default();
    let slots = frontends as u64 * (u64::from(per) + 1) + 1024;
    MapSizes {
        services: d.services.max(u32::try_from(slots).unwrap_or(u32::MAX)),
        backends: d
            .backends
            .max(u32::try_from(endpoints + 1024).unwrap_or(u32::MAX)),
        affinity: d.affinity,
        reverse_nat: d
            .reverse_nat
            .max(u32::try_from(frontends + 1024).unwrap_or(u32::MAX)),
    }
}

/// The kernel maps, with the time spent in map syscalls added up, so a pass
/// can be split into "deciding what to write" and "writing it".
pub struct TimedMaps {
    inner: KernelMaps,
    spent: Duration,
}

impl TimedMaps {
    fn timed<T>(&mut self, f: impl FnOnce(&mut KernelMaps) -> T) -> T {
        let t = Instant::now();
        let r = f(&mut self.inner);
        self.spent += t.elapsed();
        r
    }
}

impl LbMaps for TimedMaps {
    fn delete_svc_stats(&mut self, id: u32) -> Result<(), MapsError> {
        self.timed(|m| m.delete_svc_stats(id))
    }
    fn svc_stats_ids(&self) -> Option<Vec<u32>> {
        self.inner.svc_stats_ids()
    }
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError> {
        self.timed(|m| m.update_service(key, val))
    }
    fn delete_service(&mut self, key: Lb4Key) -> Result<(), MapsError> {
        self.timed(|m| m.delete_service(key))
    }
    fn update_backend(&mut self, id: u32, val: Lb4Backend) -> Result<(), MapsError> {
        self.timed(|m| m.update_backend(id, val))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.timed(|m| m.delete_backend(id))
    }
    fn update_revnat(&mut self, id: u32, val: Lb4ReverseNat) -> Result<(), MapsError> {
        self.timed(|m| m.update_revnat(id, val))
    }
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError> {
        self.timed(|m| m.delete_revnat(id))
    }
    fn update_service6(&mut self, key: Lb6Key, val: Lb4Service) -> Result<(), MapsError> {
        self.timed(|m| m.update_service6(key, val))
    }
    fn delete_service6(&mut self, key: Lb6Key) -> Result<(), MapsError> {
        self.timed(|m| m.delete_service6(key))
    }
    fn update_backend6(&mut self, id: u32, val: Lb6Backend) -> Result<(), MapsError> {
        self.timed(|m| m.update_backend6(id, val))
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError> {
        self.timed(|m| m.delete_backend6(id))
    }
    fn update_revnat6(&mut self, id: u32, val: Lb6ReverseNat) -> Result<(), MapsError> {
        self.timed(|m| m.update_revnat6(id, val))
    }
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError> {
        self.timed(|m| m.delete_revnat6(id))
    }
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError> {
        self.timed(|m| m.update_aff_match(key, state))
    }
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError> {
        self.timed(|m| m.delete_aff_match(key))
    }
    fn write_all(&mut self, ws: &[MapWrite]) -> Result<(), Stopped> {
        // The kernel's batches, timed as one (a full pass's writes go here).
        self.timed(|m| m.write_all(ws))
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        self.inner.dump()
    }
}

/// The installed socket LB and its reconciler.
pub struct NetbootLb {
    // Drop order: maps closed, pins removed (detaches), then the cgroup.
    recon: Reconciler<TimedMaps>,
    _pins: PinRoot,
    /// Clients of this variant join this cgroup.
    pub cgroup: Cgroup,
    /// Times the maps were emptied ([`NetbootLb::clear`]): a map's history
    /// (its elements freed and taken again) is part of what a connect
    /// costs, so `--variant-object`'s maps are given the same.
    pub clears: u32,
}

/// The agent's watch path over a [`NetbootLb`]: the stores its watchers
/// feed and its passes (full, or per dirty Service).
pub struct AgentPath {
    watched: Watched,
    passes: Passes,
}

/// The default ClientIP affinity timeout the bench's passes use.
const AFFINITY_TIMEOUT: u32 = 10800;

/// Outcome of one reconcile pass.
pub struct Pass {
    /// Wall time of the pass.
    pub took: Duration,
    /// Of which in map update/delete syscalls.
    pub in_maps: Duration,
    /// Writes, or the error that stopped the pass.
    pub result: std::result::Result<SyncStats, ReconcileError>,
}

impl NetbootLb {
    /// Loads the programs, pins the maps under `nbb-<pid>/<tag>` and attaches
    /// them (replace mode) to a new cgroup `nbb-<pid>/<tag>`.
    pub fn install(run_tag: &str, tag: &str, sizes: &MapSizes) -> Result<Self> {
        Self::install_object(run_tag, tag, sizes, None)
    }

    /// [`NetbootLb::install`] of `object` (another build of the programs,
    /// `--variant-object`), or of this build's (None).
    pub fn install_object(
        run_tag: &str,
        tag: &str,
        sizes: &MapSizes,
        object: Option<&[u8]>,
    ) -> Result<Self> {
        let cgroup = Cgroup::new(&format!("{run_tag}/{tag}"))?;
        let pins = PinRoot::new(&format!("{run_tag}/{tag}"))?;
        match object {
            None => loader::install(&pins.pins, &cgroup.path, sizes, true).map(|_| ()),
            Some(o) => loader::install_object(
                &pins.pins,
                &cgroup.path,
                sizes,
                loader::DatapathMode {
                    replace: true,
                    host_namespace_only: false,
                },
                o,
            )
            .map(|_| ()),
        }
        .context("loading and attaching netboot's socket LB")?;
        let maps = KernelMaps::open(&pins.pins).context("opening the pinned maps")?;
        let maps = TimedMaps {
            inner: maps,
            spent: Duration::ZERO,
        };
        let recon = Reconciler::recover(maps).context("reading the maps back")?;
        Ok(Self {
            recon,
            _pins: pins,
            cgroup,
            clears: 0,
        })
    }

    /// Where its maps are pinned.
    pub fn pins(&self) -> &netboot_datapath::pins::Pins {
        &self._pins.pins
    }

    /// One reconciler pass towards `desired`, timed.
    pub fn reconcile(&mut self, desired: &DesiredTable) -> Pass {
        self.recon.maps_mut().spent = Duration::ZERO;
        let t = Instant::now();
        let result = self.recon.reconcile(desired);
        Pass {
            took: t.elapsed(),
            in_maps: self.recon.maps().spent,
            result,
        }
    }

    /// Loads `services` and `slices` as the agent's watchers' complete list
    /// does and runs the agent's first (full) pass; returns the path and the
    /// writes of that pass (not timed).
    pub fn agent_path(
        &mut self,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
    ) -> Result<(AgentPath, SyncStats)> {
        let mut path = AgentPath {
            watched: Watched::default(),
            passes: Passes::default(),
        };
        path.watched.replace_all(services, slices);
        let r = path
            .passes
            .run(&path.watched, &mut self.recon, AFFINITY_TIMEOUT)
            .context("the agent's first (full) pass")?;
        if r.kind != PassKind::Full {
            bail!("the agent's first pass was {:?}, not full", r.kind);
        }
        Ok((path, r.stats))
    }

    /// One EndpointSlice watch event through the agent's path, timed: the
    /// slice applied to the stores (its Service marked dirty), then the
    /// agent's pass (that Service's frontends rebuilt, partial reconcile).
    /// Fails if the pass was not partial.
    pub fn slice_event(&mut self, path: &mut AgentPath, slice: EndpointSlice) -> Result<Pass> {
        self.recon.maps_mut().spent = Duration::ZERO;
        let t = Instant::now();
        path.watched.apply_slice(slice);
        let r = path
            .passes
            .run(&path.watched, &mut self.recon, AFFINITY_TIMEOUT);
        let took = t.elapsed();
        if let Ok(p) = &r {
            if !matches!(p.kind, PassKind::Partial(_)) {
                bail!(
                    "an EndpointSlice event gave a {:?} pass, not a partial one",
                    p.kind
                );
            }
        }
        Ok(Pass {
            took,
            in_maps: self.recon.maps().spent,
            result: r.map(|p| p.stats),
        })
    }

    /// Removes everything (not timed).
    pub fn clear(&mut self) -> Result<()> {
        self.recon
            .reconcile(&DesiredTable::default())
            .context("clearing the maps")?;
        self.clears += 1;
        Ok(())
    }

    /// Frontends in the maps.
    pub fn programmed(&self) -> usize {
        self.recon.programmed().services
    }

    /// A BPF outcome counter (e.g. `connect_translated`).
    pub fn counter(&self, name: &str) -> u64 {
        self.recon
            .maps()
            .inner
            .counters()
            .map(|c| c.get(name))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_fit_the_workload() {
        let s = map_sizes(1_000_000, 2, 2_000_000);
        assert!(s.services >= 3_000_000);
        assert!(s.backends >= 2_000_000);
        assert!(s.reverse_nat >= 1_000_000);
        assert_eq!(map_sizes(10, 2, 20), MapSizes::default());
    }
}
