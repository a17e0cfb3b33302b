//! The real maps, opened from their bpffs pins.

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};

use std::os::fd::{AsFd, AsRawFd, RawFd};

use super::{batch, LbMaps, MapWrite, MapsDump, MapsError, Stopped};
use crate::layout::{
    names, Lb4AffinityKey, Lb4AffinityMatch, Lb4AffinityVal, Lb4Backend, Lb4Key, Lb4RevSkKey,
    Lb4RevSkVal, Lb4ReverseNat, Lb4Service, Lb6Backend, Lb6Key, Lb6RevSkKey, Lb6RevSkVal,
    Lb6ReverseNat, NbConfig, SvcStats, COUNTER_MAX, COUNTER_NAMES,
};
use crate::pins::Pins;

/// The maps written in batches.
const BATCHED: [&str; 7] = [
    names::SERVICES,
    names::SERVICES6,
    names::BACKENDS,
    names::BACKENDS6,
    names::REVNAT,
    names::REVNAT6,
    names::AFF_MATCH,
];

/// Handles on every pinned map.
pub struct KernelMaps {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    revnat: HashMap<MapData, u32, Lb4ReverseNat>,
    aff_match: HashMap<MapData, Lb4AffinityMatch, u32>,
    affinity: HashMap<MapData, Lb4AffinityKey, Lb4AffinityVal>,
    rev_sk: HashMap<MapData, Lb4RevSkKey, Lb4RevSkVal>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, NbConfig>,
    services6: HashMap<MapData, Lb6Key, Lb4Service>,
    backends6: HashMap<MapData, u32, Lb6Backend>,
    revnat6: HashMap<MapData, u32, Lb6ReverseNat>,
    rev_sk6: HashMap<MapData, Lb6RevSkKey, Lb6RevSkVal>,
    /// `nb_svc_stats`; None when the pins predate it (an older agent's,
    /// read by this build's CLI).
    svc_stats: Option<PerCpuHashMap<MapData, u32, SvcStats>>,
    /// The same maps again for the batch syscalls (aya's typed maps do not
    /// hand out their fd), by name.
    raw: Vec<(&'static str, MapData)>,
    /// The kernel took batch writes so far (cleared on the first
    /// EINVAL/ENOTSUP: single writes from then on).
    batches: bool,
    /// Every batched map was empty when opened (a cold start).
    cold: bool,
    /// By batched map: (name, max_entries, updates written since opened).
    room: Vec<(&'static str, u32, u64)>,
}

fn open(pins: &Pins, name: &'static str) -> Result<Map, MapsError> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| MapsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    Map::from_map_data(data).map_err(|e| MapsError::Open {
        path,
        source: Box::new(e),
    })
}

fn typed<T>(pins: &Pins, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = open(pins, name)?;
    T::try_from(map).map_err(|e| MapsError::Open {
        path: pins.map(name),
        source: Box::new(e),
    })
}

/// A failed map operation `op` on `map`, as a [`MapsError::Kernel`].
pub(crate) fn kerr(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Kernel {
        map,
        op,
        source: Box::new(e),
    }
}

/// Deleting a key that is not there is not an error.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

/// Sum over CPUs of each outcome counter, in `COUNTER_NAMES` order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters(pub Vec<(&'static str, u64)>);

impl Counters {
    /// Value of the counter called `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps").finish_non_exhaustive()
    }
}

impl KernelMaps {
    /// Opens every map pinned under `pins`.
    pub fn open(pins: &Pins) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed(pins, names::SERVICES)?,
            backends: typed(pins, names::BACKENDS)?,
            revnat: typed(pins, names::REVNAT)?,
            aff_match: typed(pins, names::AFF_MATCH)?,
            affinity: typed(pins, names::AFFINITY)?,
            rev_sk: typed(pins, names::REV_SK)?,
            counters: typed(pins, names::COUNTERS)?,
            config: typed(pins, names::CONFIG)?,
            services6: typed(pins, names::SERVICES6)?,
            backends6: typed(pins, names::BACKENDS6)?,
            revnat6: typed(pins, names::REVNAT6)?,
            rev_sk6: typed(pins, names::REV_SK6)?,
            svc_stats: if pins.map(names::SVC_STATS).exists() {
                Some(typed(pins, names::SVC_STATS)?)
            } else {
                None
            },
            raw: BATCHED
                .iter()
                .map(|name| {
                    let path = pins.map(name);
                    MapData::from_pin(&path)
                        .map(|d| (*name, d))
                        .map_err(|e| MapsError::Open {
                            path,
                            source: Box::new(e),
                        })
                })
                .collect::<Result<_, _>>()?,
            batches: true,
            cold: false,
            room: Vec::new(),
        }
        .with_room())
    }

    /// Notes whether the batched maps are empty and how large they are
    /// (see [`TWO_THREADS_FROM`]).
    fn with_room(mut self) -> Self {
        self.cold = self.services.keys().next().is_none()
            && self.services6.keys().next().is_none()
            && self.backends.keys().next().is_none()
            && self.backends6.keys().next().is_none()
            && self.revnat.keys().next().is_none()
            && self.revnat6.keys().next().is_none()
            && self.aff_match.keys().next().is_none();
        self.room = self
            .raw
            .iter()
            .map(|(n, d)| (*n, d.info().map(|i| i.max_entries()).unwrap_or(0), 0))
            .collect();
        self
    }

    /// Whether the updates of `map` counted so far (the current run's
    /// included: [`Self::count_updates`] runs before the write) surely fit:
    /// on a cold start they bound the entries from above.
    fn surely_fits(&self, map: &str) -> bool {
        self.cold
            && self
                .room
                .iter()
                .find(|(name, ..)| *name == map)
                .is_some_and(|(_, max, written)| *written <= u64::from(*max))
    }

    /// Counts `n` updates of `map` (whether written or not: an upper bound).
    fn count_updates(&mut self, map: &str, n: usize) {
        if let Some(r) = self.room.iter_mut().find(|(name, ..)| *name == map) {
            r.2 += n as u64;
        }
    }

    /// Per-Service counters, summed over CPUs, by service id (empty when
    /// the pins have no `nb_svc_stats`).
    pub fn svc_stats(&self) -> Result<std::collections::BTreeMap<u32, SvcStats>, MapsError> {
        let mut out = std::collections::BTreeMap::new();
        let Some(m) = &self.svc_stats else {
            return Ok(out);
        };
        for e in m.iter() {
            match e {
                Ok((id, per_cpu)) => {
                    out.insert(id, SvcStats::sum(per_cpu.iter()));
                }
                // Deleted while iterating: skip it.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(kerr(names::SVC_STATS, "iter")(e)),
            }
        }
        Ok(out)
    }

    /// Batch writes off: every write is its own syscall (tests compare).
    pub fn without_batches(mut self) -> Self {
        self.batches = false;
        self
    }

    fn raw_fd(&self, name: &str) -> Option<RawFd> {
        self.raw
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.fd().as_fd().as_raw_fd())
    }

    /// A run of writes of one kind (`run[0].kind()`) through [`batch::run`].
    fn write_run(&mut self, run: &[MapWrite]) -> Result<(), Stopped> {
        let map = match run.first() {
            Some(w) => w.kind().0,
            None => return Ok(()),
        };
        if !run[0].kind().1 {
            self.count_updates(map, run.len());
        }
        let fd = match self.raw_fd(map) {
            Some(fd) if run.len() > 1 && self.batches => fd,
            _ => return self.singles(run),
        };
        macro_rules! keys_values {
            ($($upd:ident / $del:ident),* $(,)?) => {
                match run[0] {
                    $(
                        MapWrite::$upd(..) => {
                            let (k, v): (Vec<_>, Vec<_>) = run
                                .iter()
                                .filter_map(|w| match w {
                                    MapWrite::$upd(k, v) => Some((*k, *v)),
                                    _ => None,
                                })
                                .unzip();
                            self.batched(run, fd, &k, Some(&v))
                        }
                        MapWrite::$del(..) => {
                            let k: Vec<_> = run
                                .iter()
                                .filter_map(|w| match w {
                                    MapWrite::$del(k) => Some(*k),
                                    _ => None,
                                })
                                .collect();
                            self.batched::<_, u8>(run, fd, &k, None)
                        }
                    )*
                }
            };
        }
        keys_values!(
            Service / DelService,
            Service6 / DelService6,
            Backend / DelBackend,
            Backend6 / DelBackend6,
            Revnat / DelRevnat,
            Revnat6 / DelRevnat6,
            AffMatch / DelAffMatch,
        )
    }

    fn batched<K: Sync, V: Sync>(
        &mut self,
        run: &[MapWrite],
        fd: RawFd,
        keys: &[K],
        values: Option<&[V]>,
    ) -> Result<(), Stopped> {
        if keys.len() != run.len() {
            return self.singles(run);
        }
        let (map, delete) = run[0].kind();
        if let (Some(v), Some(mid)) = (values, halves(run)) {
            // Only where no write can fail for room: then a half can stop
            // only on an unsupported batch (nothing written) or a fault, and
            // the run is written again, one thread, below (updates written
            // twice are written once; a frontend a half left incomplete has
            // no slot 0 yet, so the datapath never saw it). A full map stays
            // on one thread, so the frontends before the full point are the
            // ones programmed, as with single writes.
            if self.batches && self.surely_fits(map) && two_threads(fd, keys, v, mid) {
                return Ok(());
            }
        }
        let mut batches = self.batches;
        let mut failed: Option<MapsError> = None;
        let r = batch::run(
            run.len(),
            delete,
            &mut batches,
            |r| batch::syscall(fd, keys, values, r),
            |i| match self.write(&run[i]) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let errno = match &e {
                        MapsError::Kernel { source, .. } => match source.as_ref() {
                            MapError::SyscallError(s) => s.io_error.raw_os_error(),
                            _ => None,
                        },
                        _ => None,
                    };
                    failed = Some(e);
                    Err(errno.unwrap_or(libc::EIO))
                }
            },
        );
        self.batches = batches;
        r.map_err(|(applied, errno)| Stopped {
            applied,
            source: failed.take().unwrap_or_else(|| MapsError::Kernel {
                map,
                op: if delete {
                    "delete batch"
                } else {
                    "update batch"
                },
                source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                    call: if delete {
                        "bpf_map_delete_batch"
                    } else {
                        "bpf_map_update_batch"
                    },
                    io_error: std::io::Error::from_raw_os_error(errno),
                })),
            }),
        })
    }

    fn singles(&mut self, run: &[MapWrite]) -> Result<(), Stopped> {
        for (applied, w) in run.iter().enumerate() {
            self.write(w)
                .map_err(|source| Stopped { applied, source })?;
        }
        Ok(())
    }

    /// The per-outcome counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, MapsError> {
        let mut out = Vec::with_capacity(COUNTER_NAMES.len());
        for (i, name) in (0..COUNTER_MAX).zip(COUNTER_NAMES) {
            let v = self
                .counters
                .get(&i, 0)
                .map_err(kerr(names::COUNTERS, "get"))?;
            out.push((name, v.iter().sum()));
        }
        Ok(Counters(out))
    }

    /// The datapath configuration entry.
    pub fn config(&self) -> Result<NbConfig, MapsError> {
        self.config.get(&0, 0).map_err(kerr(names::CONFIG, "get"))
    }

    /// Writes the datapath configuration entry (mode switch is one write).
    pub fn set_config(&mut self, cfg: NbConfig) -> Result<(), MapsError> {
        self.config
            .set(0, cfg, 0)
            .map_err(kerr(names::CONFIG, "set"))
    }

    /// Affinity entries (LRU, written by the datapath).
    pub fn affinity(&self) -> Result<Vec<(Lb4AffinityKey, Lb4AffinityVal)>, MapsError> {
        self.affinity
            .iter()
            .collect::<Result<_, _>>()
            .map_err(kerr(names::AFFINITY, "iter"))
    }

    /// Number of reverse socket entries (LRU, written by the datapath).
    pub fn rev_sk_len(&self) -> Result<usize, MapsError> {
        let mut n = 0;
        for k in self.rev_sk.keys() {
            k.map_err(kerr(names::REV_SK, "keys"))?;
            n += 1;
        }
        for k in self.rev_sk6.keys() {
            k.map_err(kerr(names::REV_SK6, "keys"))?;
            n += 1;
        }
        Ok(n)
    }
}

/// Update runs at least this long are written by two threads at once, on
/// a cold start (every batched map empty when opened) while the updates
/// written since surely fit the map (`max_entries`).
/// The first pass at 10,000 Services × 10 endpoints is ~320,000 updates,
/// half of its time in the kernel's hash-map insert
/// (`htab_map_update_elem`, `perf`); the buckets have their own locks, so
/// two threads on one map do not wait on each other.
pub const TWO_THREADS_FROM: usize = 8192;

/// Where to split an update run in two, or None (too short). In the
/// service map the split falls after a slot 0: a frontend's slots come
/// before its slot 0 in the run ([`crate::reconcile`]), so each frontend
/// is written whole by one thread, in its order.
fn halves(run: &[MapWrite]) -> Option<usize> {
    if run.len() < TWO_THREADS_FROM {
        return None;
    }
    let frontend_end = |w: &MapWrite| match w {
        MapWrite::Service(k, _) => k.backend_slot == 0,
        MapWrite::Service6(k, _) => k.backend_slot == 0,
        _ => true,
    };
    let mid = run.len() / 2;
    (mid..run.len())
        .find(|&i| frontend_end(&run[i - 1]))
        .filter(|&i| i < run.len())
}

/// Writes `keys[..mid]` on this thread and `keys[mid..]` on another, at
/// once; true when both halves were written whole. False, nothing written,
/// when no thread can be started (a pids limit): the caller writes the run
/// on its own thread.
fn two_threads<K: Sync, V: Sync>(fd: RawFd, keys: &[K], values: &[V], mid: usize) -> bool {
    std::thread::scope(|s| {
        let Ok(second) = std::thread::Builder::new().spawn_scoped(s, || {
            batch::syscall_all(fd, keys, Some(values), mid..keys.len())
        }) else {
            return false;
        };
        let first = batch::syscall_all(fd, keys, Some(values), 0..mid);
        first && second.join().unwrap_or(false)
    })
}

impl LbMaps for KernelMaps {
    fn update_service(&mut self, key: Lb4Key, val: Lb4Service) -> Result<(), MapsError> {
        self.services
            .insert(key, val, 0)
            .map_err(kerr(names::SERVICES, "update"))
    }
    fn delete_service(&mut self, key: Lb4Key) -> Result<(), MapsError> {
        absent_ok(self.services.remove(&key)).map_err(kerr(names::SERVICES, "delete"))
    }
    fn update_backend(&mut self, id: u32, val: Lb4Backend) -> Result<(), MapsError> {
        self.backends
            .insert(id, val, 0)
            .map_err(kerr(names::BACKENDS, "update"))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.backends.remove(&id)).map_err(kerr(names::BACKENDS, "delete"))
    }
    fn update_revnat(&mut self, id: u32, val: Lb4ReverseNat) -> Result<(), MapsError> {
        self.revnat
            .insert(id, val, 0)
            .map_err(kerr(names::REVNAT, "update"))
    }
    fn delete_revnat(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.revnat.remove(&id)).map_err(kerr(names::REVNAT, "delete"))
    }
    fn update_aff_match(&mut self, key: Lb4AffinityMatch, state: u32) -> Result<(), MapsError> {
        self.aff_match
            .insert(key, state, 0)
            .map_err(kerr(names::AFF_MATCH, "update"))
    }
    fn delete_aff_match(&mut self, key: Lb4AffinityMatch) -> Result<(), MapsError> {
        absent_ok(self.aff_match.remove(&key)).map_err(kerr(names::AFF_MATCH, "delete"))
    }
    fn update_service6(&mut self, key: Lb6Key, val: Lb4Service) -> Result<(), MapsError> {
        self.services6
            .insert(key, val, 0)
            .map_err(kerr(names::SERVICES6, "update"))
    }
    fn delete_service6(&mut self, key: Lb6Key) -> Result<(), MapsError> {
        absent_ok(self.services6.remove(&key)).map_err(kerr(names::SERVICES6, "delete"))
    }
    fn update_backend6(&mut self, id: u32, val: Lb6Backend) -> Result<(), MapsError> {
        self.backends6
            .insert(id, val, 0)
            .map_err(kerr(names::BACKENDS6, "update"))
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.backends6.remove(&id)).map_err(kerr(names::BACKENDS6, "delete"))
    }
    fn update_revnat6(&mut self, id: u32, val: Lb6ReverseNat) -> Result<(), MapsError> {
        self.revnat6
            .insert(id, val, 0)
            .map_err(kerr(names::REVNAT6, "update"))
    }
    fn delete_revnat6(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.revnat6.remove(&id)).map_err(kerr(names::REVNAT6, "delete"))
    }
    fn delete_svc_stats(&mut self, id: u32) -> Result<(), MapsError> {
        match &mut self.svc_stats {
            Some(m) => absent_ok(m.remove(&id)).map_err(kerr(names::SVC_STATS, "delete")),
            None => Ok(()),
        }
    }
    fn svc_stats_ids(&self) -> Option<Vec<u32>> {
        let Some(m) = &self.svc_stats else {
            return Some(Vec::new());
        };
        let mut ids = Vec::new();
        for k in m.keys() {
            match k {
                Ok(id) => ids.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "listing per-Service counters: every new service id is reset");
                    return None;
                }
            }
        }
        Some(ids)
    }
    fn write_all(&mut self, ws: &[MapWrite]) -> Result<(), Stopped> {
        let mut start = 0;
        while start < ws.len() {
            let kind = ws[start].kind();
            let len = ws[start..].iter().take_while(|w| w.kind() == kind).count();
            self.write_run(&ws[start..start + len])
                .map_err(|s| Stopped {
                    applied: start + s.applied,
                    source: s.source,
                })?;
            start += len;
        }
        Ok(())
    }
    fn dump(&self) -> Result<MapsDump, MapsError> {
        Ok(MapsDump {
            services: self
                .services
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::SERVICES, "iter"))?,
            backends: self
                .backends
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::BACKENDS, "iter"))?,
            revnat: self
                .revnat
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::REVNAT, "iter"))?,
            aff_match: self
                .aff_match
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::AFF_MATCH, "iter"))?,
            services6: self
                .services6
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::SERVICES6, "iter"))?,
            backends6: self
                .backends6
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::BACKENDS6, "iter"))?,
            revnat6: self
                .revnat6
                .iter()
                .collect::<Result<_, _>>()
                .map_err(kerr(names::REVNAT6, "iter"))?,
        })
    }
}
