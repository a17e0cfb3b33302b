//! Service flow events, like Hubble's flows: the socket-LB programs write one
//! record per decision on a Service address to the `nb_flow_ring` ring
//! buffer (lb.h, "Service flow events"); the agent reads it only while
//! someone watches (`GET /v1/flows`, `netboot-datapath monitor`), names what
//! it can (Service, backend pod) and fans the flows out to the watchers.
//!
//! Off by default: the kernel switch (`nb_flow_cfg.enabled`) is set by the
//! first subscriber and cleared by the last, so an unwatched node pays one
//! array lookup per connect. Decisions on destinations that are no Service
//! (`not-a-service`, `unsupported`) are emitted only while a watcher asks
//! for that verdict ([`FlowHub::subscribe_for`], the switch's `FLOW_CFG_ALL`
//! bit). While on, each CPU emits at most
//! `rate` events per second (token bucket in the kernel); what does not fit
//! (budget, or the ring buffer full because the reader is behind) is counted
//! in `nb_flow_stats`, exported as `netboot_datapath_flow_events_dropped_total`.
//!
//! The record served, its verdicts, the filter query and the text rendering
//! are the contract's ([`netboot_contract::flows`], re-exported here), which
//! `netboot flows` reads too; what is here is kernel-specific: decoding the
//! ring buffer's records ([`from_event`]), naming them ([`FlowNames`]) and
//! the fan-out ([`FlowHub`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::layout::{
    addr6_from_be, addr_from_be, names, port_from_be, proto_name, FlowCfg, FlowEvent,
    COUNTER_NAMES, FLOW_AFFINITY_HIT, FLOW_CFG_ALL, FLOW_CFG_ON, FLOW_DENIED, FLOW_ERROR,
    FLOW_HOOK_CONNECT, FLOW_HOOK_PACKET, FLOW_NOT_SERVICE, FLOW_OBSERVED, FLOW_REFUSED,
    FLOW_SRC_RANGE, FLOW_STAT_NAMES, FLOW_TRANSLATED, FLOW_UNSUPPORTED,
};
pub use netboot_contract::flows::{hook, render, FilterError, Flow, FlowFilter, Verdict};

use crate::maps::kernel::kerr;
use crate::maps::MapsError;
use crate::pins::Pins;
use crate::podcgroup::ClientPods;

/// Options of the flow event stream. `Default` is what the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowOptions {
    /// Events per second per CPU the kernel may emit (0: the kernel default,
    /// [`crate::layout::FLOW_RATE_DEFAULT`]).
    pub rate_per_cpu: u32,
    /// Flows buffered per slow watcher before it loses some (reported as a
    /// `{"lost":N}` line).
    pub channel: usize,
    /// Watchers served at once (`/v1/flows` answers 429 beyond): each holds
    /// one of the health listener's connection slots.
    pub max_watchers: usize,
    /// A stream with no flow for this long gets an empty line, which is how
    /// a watcher that went away is noticed.
    pub heartbeat: Duration,
}

impl Default for FlowOptions {
    fn default() -> Self {
        Self {
            rate_per_cpu: 0,
            channel: 4096,
            max_watchers: 4,
            heartbeat: Duration::from_secs(2),
        }
    }
}

/// The contract's verdict for a kernel `NB_FLOW_*` value (None: one this
/// agent does not know).
pub fn verdict_from_kernel(v: u8) -> Option<Verdict> {
    Some(match v {
        FLOW_TRANSLATED => Verdict::Translated,
        FLOW_AFFINITY_HIT => Verdict::AffinityHit,
        FLOW_REFUSED => Verdict::Refused,
        FLOW_ERROR => Verdict::Error,
        FLOW_OBSERVED => Verdict::Observed,
        FLOW_SRC_RANGE => Verdict::SourceRange,
        FLOW_DENIED => Verdict::Denied,
        FLOW_NOT_SERVICE => Verdict::NotAService,
        FLOW_UNSUPPORTED => Verdict::Unsupported,
        _ => return None,
    })
}

/// The contract's hook name for a kernel `NB_FLOW_HOOK_*` value.
pub fn hook_from_kernel(h: u8) -> &'static str {
    match h {
        FLOW_HOOK_CONNECT => hook::CONNECT,
        FLOW_HOOK_PACKET => hook::PACKET,
        _ => hook::SENDMSG,
    }
}

/// CLOCK_MONOTONIC now, ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Wall-clock ns minus monotonic ns now: add to a kernel stamp.
fn wall_offset() -> i128 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - i128::from(monotonic_ns())
}

/// Decodes a kernel record into a flow, names not filled in (None: an
/// unknown verdict). `wall_offset`: wall-clock minus monotonic ns.
pub fn from_event(ev: &FlowEvent, wall_offset: i128) -> Option<Flow> {
    let verdict = verdict_from_kernel(ev.verdict)?;
    let ip = |a: [u32; 4]| -> IpAddr {
        if ev.family == 6 {
            IpAddr::V6(addr6_from_be(a))
        } else {
            IpAddr::V4(addr_from_be(a[0]))
        }
    };
    let chosen = ev.backend_id != 0;
    Some(Flow {
        time_unix_ns: u64::try_from(i128::from(ev.ts_ns) + wall_offset).unwrap_or(0),
        hook: hook_from_kernel(ev.hook).into(),
        proto: proto_name(ev.proto).to_ascii_lowercase(),
        family: ev.family,
        verdict,
        reason: COUNTER_NAMES
            .get(ev.outcome as usize)
            .map_or_else(|| ev.outcome.to_string(), |n| (*n).to_string()),
        client_netns_cookie: ev.netns_cookie,
        client_cgroup_id: ev.cgroup_id,
        client_pod_uid: None,
        client_ip: (ev.hook == FLOW_HOOK_PACKET).then(|| ip(ev.client)),
        client_port: (ev.hook == FLOW_HOOK_PACKET).then(|| port_from_be(ev.client_port)),
        service_id: ev.svc_id,
        service: None,
        port_name: None,
        frontend_ip: ip(ev.vip),
        frontend_port: port_from_be(ev.vport),
        backend_id: chosen.then_some(ev.backend_id),
        backend_ip: chosen.then(|| ip(ev.backend)),
        backend_port: chosen.then(|| port_from_be(ev.backend_port)),
        backend_pod: None,
    })
}

/// The flow of a connected UDP socket destroyed because its backend was
/// removed (`sock_term`): verdict `terminated`, hook `terminate`, reason
/// `backend_removed`; the frontend is the one the socket asked for (its
/// reverse entry), `service_id` the one programmed there now (0: none),
/// `now_unix_ns` when the agent destroyed it.
pub fn terminated_flow(
    d: &crate::sock_term::Destroyed,
    service_id: Option<u32>,
    now_unix_ns: u64,
) -> Flow {
    Flow {
        time_unix_ns: now_unix_ns,
        hook: hook::TERMINATE.into(),
        proto: "udp".into(),
        family: if d.frontend.is_ipv4() { 4 } else { 6 },
        verdict: Verdict::Terminated,
        reason: "backend_removed".into(),
        client_netns_cookie: d.netns_cookie,
        client_cgroup_id: d.cgroup_id,
        client_pod_uid: None,
        client_ip: None,
        client_port: None,
        service_id: service_id.unwrap_or(0),
        service: None,
        port_name: None,
        frontend_ip: d.frontend.ip(),
        frontend_port: d.frontend.port(),
        backend_id: None,
        backend_ip: Some(d.peer.ip()),
        backend_port: Some(d.peer.port()),
        backend_pod: None,
    }
}

/// Wall-clock now, ns since the Unix epoch.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Names for flows: frontend address → Service (and port name), backend
/// address → pod, built from the Services and EndpointSlices the agent
/// watches (it does not watch pods: the client pod is named by the
/// `netboot flows` side from its UID).
#[derive(Clone, Debug, Default)]
pub struct FlowNames {
    frontends: HashMap<(IpAddr, u16, String), (String, Option<String>)>,
    /// NodePorts: on any of the node's addresses.
    node_ports: HashMap<(u16, String), (String, Option<String>)>,
    pods: HashMap<IpAddr, String>,
}

impl FlowNames {
    /// Builds the index.
    pub fn build<'a>(
        services: impl IntoIterator<Item = &'a crate::service::Svc>,
        slices: impl IntoIterator<Item = &'a crate::slice::Slice>,
    ) -> Self {
        let mut n = Self::default();
        for svc in services {
            let Some(name) = &svc.name else {
                continue;
            };
            let ns = &svc.namespace;
            let ips = svc
                .cluster_ips
                .iter()
                .chain(svc.external_ips())
                .chain(svc.ingress().iter().filter_map(|i| i.ip.as_ref()));
            for p in &svc.ports {
                let Some(port) = p.node_port.and_then(|n| u16::try_from(n).ok()) else {
                    continue;
                };
                let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
                n.node_ports.insert(
                    (port, proto),
                    (
                        format!("{ns}/{name}"),
                        p.name.clone().filter(|s| !s.is_empty()),
                    ),
                );
            }
            for ip in ips.filter_map(|i| i.parse::<IpAddr>().ok()) {
                for p in &svc.ports {
                    let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
                    let Ok(port) = u16::try_from(p.port) else {
                        continue;
                    };
                    n.frontends.insert(
                        (ip, port, proto),
                        (
                            format!("{ns}/{name}"),
                            p.name.clone().filter(|s| !s.is_empty()),
                        ),
                    );
                }
            }
        }
        for s in slices {
            for ep in &s.endpoints {
                if let (Some(ip), Some(pod)) = (ep.ip, s.pod(ep)) {
                    n.pods.insert(ip, pod);
                }
            }
        }
        n
    }

    /// Fills the names of `flow` it knows. False: a name the flow should
    /// have is missing (its Service, or the pod of its backend), which an
    /// index built before the flow may simply not have had yet.
    pub fn resolve(&self, flow: &mut Flow) -> bool {
        let key = (flow.frontend_ip, flow.frontend_port, flow.proto.clone());
        let named = self.frontends.get(&key).or_else(|| {
            self.node_ports
                .get(&(flow.frontend_port, flow.proto.clone()))
        });
        if let Some((svc, port)) = named {
            flow.service = Some(svc.clone());
            flow.port_name = port.clone();
        }
        if let Some(ip) = flow.backend_ip {
            flow.backend_pod = self.pods.get(&ip).cloned();
        }
        let service_missing = flow.service_id != 0 && flow.service.is_none();
        let pod_missing = flow.backend_ip.is_some() && flow.backend_pod.is_none();
        !(service_missing || pod_missing)
    }
}

/// The reader's copy of the name index, and when it was taken.
///
/// Asked for again once a second, and sooner for a flow that misses a name
/// and happened after the copy was taken: the datapath programs a backend
/// only after the agent's stores hold it, so such a flow may be about an
/// object the copy predates (a Service and its first ready pod, created a
/// moment before a client connects). How often that may happen is bounded
/// by what a copy costs: at most a tenth of the reader's time goes to
/// rebuilding (a large cluster whose flows miss names for good, e.g. API
/// server endpoints without a pod, does not rebuild on every flow).
struct NameCache {
    /// Where copies come from.
    source: Arc<NamesSource>,
    names: Arc<FlowNames>,
    /// Wall clock (ns) just before the copy was asked for: every object the
    /// stores held then is in it.
    taken_unix_ns: u64,
    taken: Instant,
    /// What asking took.
    cost: Duration,
}

/// How often the reader takes a fresh copy of the names regardless.
const NAMES_REFRESH: Duration = Duration::from_secs(1);

impl NameCache {
    fn take(source: Arc<NamesSource>) -> Self {
        let (taken_unix_ns, taken) = (now_unix_ns(), Instant::now());
        let names = source();
        Self {
            source,
            names,
            taken_unix_ns,
            taken,
            cost: taken.elapsed(),
        }
    }

    /// Takes a fresh copy if this one is older than [`NAMES_REFRESH`].
    fn refresh_if_old(&mut self) {
        if self.taken.elapsed() > NAMES_REFRESH {
            *self = Self::take(self.source.clone());
        }
    }

    /// Names `flow`; if a name is missing and the flow happened after the
    /// copy was taken, takes a fresh one (within the cost bound) and tries
    /// again.
    fn resolve(&mut self, flow: &mut Flow) {
        if self.names.resolve(flow) || flow.time_unix_ns <= self.taken_unix_ns {
            return;
        }
        if self.taken.elapsed() < self.cost.saturating_mul(10) {
            return;
        }
        *self = Self::take(self.source.clone());
        self.names.resolve(flow);
    }
}

/// The kernel's flow event counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowStats {
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events not written: over a CPU's budget.
    pub rate_limited: u64,
    /// Events not written: the ring buffer was full.
    pub ring_full: u64,
    /// Watchers now.
    pub watchers: u64,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pins: &Pins,
    name: &'static str,
) -> Result<T, MapsError> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| MapsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map = Map::from_map_data(data).map_err(|e| MapsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    T::try_from(map).map_err(|e| MapsError::Open {
        path,
        source: Box::new(e),
    })
}

/// Sets the kernel switch (decisions on Services) and budget (`rate` 0:
/// the kernel default).
pub fn set_enabled(pins: &Pins, enabled: bool, rate: u32) -> Result<(), MapsError> {
    set_flags(pins, if enabled { FLOW_CFG_ON } else { 0 }, rate)
}

/// Sets the kernel switch's bits (`FLOW_CFG_ON`, `FLOW_CFG_ALL`: also
/// not-a-service and unsupported decisions) and budget.
pub fn set_flags(pins: &Pins, flags: u32, rate: u32) -> Result<(), MapsError> {
    let mut m: Array<MapData, FlowCfg> = open(pins, names::FLOW_CFG)?;
    m.set(
        0,
        FlowCfg {
            enabled: flags,
            rate,
        },
        0,
    )
    .map_err(kerr(names::FLOW_CFG, "set"))
}

/// The kernel switch's bits now.
pub fn flags(pins: &Pins) -> Result<u32, MapsError> {
    let m: Array<MapData, FlowCfg> = open(pins, names::FLOW_CFG)?;
    Ok(m.get(&0, 0).map_err(kerr(names::FLOW_CFG, "get"))?.enabled)
}

/// Reads the kernel counters (summed over CPUs; `watchers` left 0).
pub fn stats(pins: &Pins) -> Result<FlowStats, MapsError> {
    let m: PerCpuArray<MapData, u64> = open(pins, names::FLOW_STATS)?;
    let mut v = [0u64; 3];
    for (i, slot) in (0u32..).zip(v.iter_mut()).take(FLOW_STAT_NAMES.len()) {
        let per = m.get(&i, 0).map_err(kerr(names::FLOW_STATS, "get"))?;
        *slot = per.iter().sum();
    }
    Ok(FlowStats {
        emitted: v[0],
        rate_limited: v[1],
        ring_full: v[2],
        watchers: 0,
    })
}

/// A stream item: one flow, shared by the watchers.
pub type Item = Arc<Flow>;

/// Names the agent's watchers know, asked for once a second and for a flow
/// that misses a name ([`NameCache`]); a source returns the same `Arc` until
/// its objects change, so an unchanged cluster costs no rebuild
/// ([`crate::watch::Watched::flow_names`]).
pub type NamesSource = dyn Fn() -> Arc<FlowNames> + Send + Sync;

struct HubState {
    watchers: usize,
    /// Watchers that asked for decisions on destinations that are no
    /// Service (the kernel's `FLOW_CFG_ALL` is on while there are any).
    all_watchers: usize,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Flows the agent made itself ([`FlowHub::publish`]), named and sent by
    /// the reader on its next round (at most [`POLL`] later).
    published: Vec<Flow>,
}

/// Agent-made flows held for the reader at most; beyond, they are lost.
const PUBLISHED_MAX: usize = 4096;

/// Fans the ring buffer out to watchers; reads it (and keeps the kernel
/// switch on) only while there is at least one.
pub struct FlowHub {
    pins: Pins,
    opts: FlowOptions,
    names: Arc<NamesSource>,
    /// cgroup v2 root the client pods are found under (None: not named).
    cgroup_root: Option<std::path::PathBuf>,
    tx: broadcast::Sender<Item>,
    state: Mutex<HubState>,
}

/// Held by a watcher; the last one dropped turns events off.
pub struct Subscription {
    hub: Arc<FlowHub>,
    /// Counted in the hub's watchers of every decision ([`FlowHub::subscribe_for`]).
    all: bool,
    /// Flows for this watcher.
    pub rx: broadcast::Receiver<Item>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.all);
    }
}

impl FlowHub {
    /// A hub over the pinned maps under `pins`; `names` gives the index.
    pub fn new(pins: Pins, opts: FlowOptions, names: Arc<NamesSource>) -> Arc<Self> {
        Self::with_client_pods(pins, opts, names, None)
    }

    /// As [`FlowHub::new`], and names each flow's client pod (its UID) from
    /// the cgroup v2 hierarchy at `cgroup_root`.
    pub fn with_client_pods(
        pins: Pins,
        opts: FlowOptions,
        names: Arc<NamesSource>,
        cgroup_root: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(opts.channel.max(1));
        Arc::new(Self {
            pins,
            opts,
            names,
            cgroup_root,
            tx,
            state: Mutex::new(HubState {
                watchers: 0,
                all_watchers: 0,
                reader: None,
                published: Vec::new(),
            }),
        })
    }

    /// Options in use.
    pub fn options(&self) -> FlowOptions {
        self.opts
    }

    /// Watchers now.
    pub fn watchers(&self) -> usize {
        self.state.lock().map(|s| s.watchers).unwrap_or(0)
    }

    /// The kernel counters plus the watcher count.
    pub fn stats(&self) -> Result<FlowStats, MapsError> {
        let mut s = stats(&self.pins)?;
        s.watchers = self.watchers() as u64;
        Ok(s)
    }

    /// Adds a watcher of the usual flows: decisions on Services.
    /// Err: too many watchers, or the maps could not be used.
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription, String> {
        self.subscribe_for(&FlowFilter::default())
    }

    /// Adds a watcher with `filter`: the first starts the reader and turns
    /// events on; one whose verdict is emitted only on request
    /// ([`Verdict::on_request_only`]: not-a-service, unsupported) also turns
    /// those on while it watches. Err: too many watchers, or the maps could
    /// not be used.
    pub fn subscribe_for(self: &Arc<Self>, filter: &FlowFilter) -> Result<Subscription, String> {
        let all = filter.verdict.is_some_and(Verdict::on_request_only);
        let mut st = self
            .state
            .lock()
            .map_err(|_| "flow hub lock poisoned".to_string())?;
        if st.watchers >= self.opts.max_watchers {
            return Err(format!(
                "{} flow watchers already (the most served at once)",
                st.watchers
            ));
        }
        let rx = self.tx.subscribe();
        let flags =
            |all_watchers: usize| FLOW_CFG_ON | if all_watchers > 0 { FLOW_CFG_ALL } else { 0 };
        if st.watchers == 0 {
            let ring = open_ring(&self.pins).map_err(|e| e.to_string())?;
            set_flags(&self.pins, flags(usize::from(all)), self.opts.rate_per_cpu)
                .map_err(|e| e.to_string())?;
            let hub = self.clone();
            st.reader = Some(tokio::spawn(async move { hub.read(ring).await }));
            tracing::info!("flow events on (first watcher)");
        } else if all && st.all_watchers == 0 {
            set_flags(&self.pins, flags(1), self.opts.rate_per_cpu).map_err(|e| e.to_string())?;
        }
        st.watchers += 1;
        st.all_watchers += usize::from(all);
        Ok(Subscription {
            hub: self.clone(),
            all,
            rx,
        })
    }

    /// Hands flows the agent made itself (destroyed sockets) to the
    /// watchers, named like the kernel's; dropped when nobody watches.
    pub fn publish(&self, flows: impl IntoIterator<Item = Flow>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.watchers == 0 {
            return;
        }
        let room = PUBLISHED_MAX.saturating_sub(st.published.len());
        st.published.extend(flows.into_iter().take(room));
    }

    fn take_published(&self) -> Vec<Flow> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.published))
            .unwrap_or_default()
    }

    fn unsubscribe(&self, all: bool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.watchers = st.watchers.saturating_sub(1);
        if all {
            st.all_watchers = st.all_watchers.saturating_sub(1);
            if st.all_watchers == 0 && st.watchers > 0 {
                if let Err(e) = set_flags(&self.pins, FLOW_CFG_ON, self.opts.rate_per_cpu) {
                    tracing::warn!(error = %e, "turning not-a-service flow events off failed");
                }
            }
        }
        if st.watchers == 0 {
            st.published.clear();
            if let Err(e) = set_enabled(&self.pins, false, self.opts.rate_per_cpu) {
                tracing::warn!(error = %e, "turning flow events off failed");
            }
            if let Some(t) = st.reader.take() {
                t.abort();
            }
            tracing::info!("flow events off (last watcher gone)");
        }
    }

    async fn read(self: Arc<Self>, ring: RingBuf<MapData>) {
        // SAFETY: the ring buffer owns its map's fd, open and unchanged for
        // as long as the RingBuf lives, which is as long as the AsyncFd.
        let registered =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "flow ring buffer: poll registration failed");
                return;
            }
        };
        let mut names = NameCache::take(self.names.clone());
        let mut clients = self.cgroup_root.as_ref().map(ClientPods::new);
        loop {
            // The kernel wakes the reader only once NB_FLOW_WAKE_BYTES are
            // unread (lb.h); otherwise the ring is drained every POLL.
            let woken = tokio::time::timeout(POLL, fd.readable_mut()).await;
            names.refresh_if_old();
            match woken {
                Ok(Ok(mut guard)) => {
                    self.drain(guard.get_inner_mut(), &mut names, clients.as_mut());
                    guard.clear_ready();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "flow ring buffer: poll failed");
                    return;
                }
                Err(_) => self.drain(fd.get_mut(), &mut names, clients.as_mut()),
            }
            for mut flow in self.take_published() {
                names.resolve(&mut flow);
                if let Some(c) = clients.as_mut() {
                    flow.client_pod_uid = c.pod_uid(flow.client_cgroup_id);
                }
                let _ = self.tx.send(Arc::new(flow));
            }
        }
    }

    /// Sends every unread event to the watchers.
    fn drain(
        &self,
        ring: &mut RingBuf<MapData>,
        names: &mut NameCache,
        mut clients: Option<&mut ClientPods>,
    ) {
        let off = wall_offset();
        while let Some(rec) = ring.next() {
            let Some(ev) = FlowEvent::from_bytes(&rec) else {
                continue;
            };
            drop(rec);
            if let Some(mut flow) = from_event(&ev, off) {
                names.resolve(&mut flow);
                if let Some(c) = clients.as_deref_mut() {
                    flow.client_pod_uid = c.pod_uid(flow.client_cgroup_id);
                }
                // No receiver: the last watcher is leaving.
                let _ = self.tx.send(Arc::new(flow));
            }
        }
    }
}

/// How often the reader drains the ring buffer when the kernel did not wake
/// it (fewer than NB_FLOW_WAKE_BYTES unread): the most a flow waits.
const POLL: Duration = Duration::from_millis(50);

fn open_ring(pins: &Pins) -> Result<RingBuf<MapData>, MapsError> {
    open(pins, names::FLOW_RING)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{addr_be, port_be, FLOW_HOOK_SENDMSG, PROTO_TCP};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use std::net::Ipv4Addr;

    fn event(verdict: u8, backend: bool) -> FlowEvent {
        FlowEvent {
            ts_ns: 5_000_000_000,
            netns_cookie: 4097,
            cgroup_id: 77,
            vip: [addr_be(Ipv4Addr::new(10, 96, 0, 10)), 0, 0, 0],
            backend: if backend {
                [addr_be(Ipv4Addr::new(10, 0, 1, 5)), 0, 0, 0]
            } else {
                [0; 4]
            },
            backend_id: u32::from(backend) * 9,
            outcome: if backend { 0 } else { 4 },
            vport: port_be(80),
            backend_port: if backend { port_be(8080) } else { 0 },
            svc_id: 3,
            proto: PROTO_TCP,
            family: 4,
            verdict,
            hook: FLOW_HOOK_CONNECT,
            pad: 0,
            client: [0; 4],
            client_port: 0,
            pad2: 0,
            pad3: 0,
        }
    }

    #[test]
    fn a_per_packet_event_names_its_client_by_address() {
        let mut ev = event(FLOW_TRANSLATED, true);
        ev.hook = FLOW_HOOK_PACKET;
        ev.netns_cookie = 0;
        ev.cgroup_id = 0;
        ev.vip = [addr_be(Ipv4Addr::new(172, 18, 1, 1)), 0, 0, 0];
        ev.vport = port_be(30080);
        ev.client = [addr_be(Ipv4Addr::new(172, 18, 0, 3)), 0, 0, 0];
        ev.client_port = port_be(41000);
        let mut f = from_event(&ev, 0).unwrap();
        names().resolve(&mut f);
        assert_eq!(f.hook, "packet");
        assert_eq!(f.client_ip, Some(IpAddr::V4(Ipv4Addr::new(172, 18, 0, 3))));
        assert_eq!(f.client_port, Some(41000));
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        let line = render(&f, None, None);
        assert!(
            line.contains("  172.18.0.3:41000  →  shop/web:http (172.18.1.1:30080/tcp)  →  shop/web-1 10.0.1.5:8080  TRANSLATED"),
            "{line}"
        );
        // Socket hooks have no client address.
        let c = from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
        assert_eq!((c.client_ip, c.client_port), (None, None));
    }

    fn names() -> FlowNames {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-abc"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.1.5"], "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}}]
        }))
        .unwrap();
        FlowNames::build(
            [&crate::service::Svc::from(&svc)],
            [&crate::slice::Slice::from(&slice)],
        )
    }

    #[test]
    fn a_translated_event_decodes_and_resolves() {
        let mut f = from_event(&event(FLOW_TRANSLATED, true), 1_000).unwrap();
        names().resolve(&mut f);
        assert_eq!(f.time_unix_ns, 5_000_001_000);
        assert_eq!(f.verdict, Verdict::Translated);
        assert_eq!(f.reason, "connect_translated");
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        assert_eq!(f.port_name.as_deref(), Some("http"));
        assert_eq!(f.frontend_ip, IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(f.backend_ip, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5))));
        assert_eq!(f.backend_port, Some(8080));
        // A NodePort, on a node's address, is named too.
        let mut np = f.clone();
        np.service = None;
        np.port_name = None;
        np.frontend_ip = IpAddr::V4(Ipv4Addr::new(172, 18, 1, 1));
        np.frontend_port = 30080;
        names().resolve(&mut np);
        assert_eq!(np.service.as_deref(), Some("shop/web"));
        assert_eq!(np.port_name.as_deref(), Some("http"));
        np.frontend_port = 30081;
        np.service = None;
        names().resolve(&mut np);
        assert_eq!(np.service, None);
        assert_eq!(f.backend_pod.as_deref(), Some("shop/web-1"));
        // The line `/v1/flows` serves, byte for byte (the contract's type).
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"time_unix_ns":5000001000,"hook":"connect","proto":"tcp","family":4,"verdict":"translated","reason":"connect_translated","client_netns_cookie":4097,"client_cgroup_id":77,"service_id":3,"service":"shop/web","port_name":"http","frontend_ip":"10.96.0.10","frontend_port":80,"backend_id":9,"backend_ip":"10.0.1.5","backend_port":8080,"backend_pod":"shop/web-1"}"#
        );
        let line = render(&f, None, None);
        assert!(line.contains("shop/web:http (10.96.0.10:80/tcp)"), "{line}");
        assert!(
            line.contains("shop/web-1 10.0.1.5:8080  TRANSLATED"),
            "{line}"
        );
    }

    #[test]
    fn a_flow_missing_a_name_the_copy_predates_takes_a_fresh_copy_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // The first copy knows the Service but not its pod yet (the slice's
        // endpoint came later); every later one knows both.
        let asked = Arc::new(AtomicUsize::new(0));
        let source: Arc<NamesSource> = {
            let asked = asked.clone();
            Arc::new(move || {
                if asked.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut n = names();
                    n.pods.clear();
                    Arc::new(n)
                } else {
                    Arc::new(names())
                }
            })
        };
        let mut cache = NameCache::take(source);
        assert_eq!(asked.load(Ordering::SeqCst), 1);

        // Happened before the copy: what it misses the copy cannot lack.
        let mut old = from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
        old.time_unix_ns = cache.taken_unix_ns - 1;
        cache.resolve(&mut old);
        assert_eq!(old.service.as_deref(), Some("shop/web"));
        assert_eq!(old.backend_pod, None);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "no copy for an old flow");

        // Too soon after a costly copy: the bound holds.
        cache.cost = Duration::from_secs(3600);
        let mut new = from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
        new.time_unix_ns = now_unix_ns() + 1;
        cache.resolve(&mut new.clone());
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "no copy within the cost bound"
        );

        // After the copy, missing its pod: a fresh copy names it.
        cache.cost = Duration::ZERO;
        cache.resolve(&mut new);
        assert_eq!(new.backend_pod.as_deref(), Some("shop/web-1"));
        assert_eq!(asked.load(Ordering::SeqCst), 2);

        // Fully named: no copy asked for.
        let mut again = new.clone();
        again.time_unix_ns = now_unix_ns() + 1;
        cache.resolve(&mut again);
        assert_eq!(asked.load(Ordering::SeqCst), 2);

        // A refused flow (no backend) of a known Service misses nothing.
        let mut refused = from_event(&event(FLOW_REFUSED, false), 0).unwrap();
        assert!(names().resolve(&mut refused));
    }

    #[test]
    fn a_refused_event_has_no_backend() {
        let f = from_event(&event(FLOW_REFUSED, false), 0).unwrap();
        assert_eq!(f.verdict, Verdict::Refused);
        assert_eq!(f.reason, "no_backend");
        assert_eq!(f.backend_ip, None);
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["verdict"], "refused");
        assert!(j.get("backend_ip").is_none());
        assert!(
            render(&f, None, None).ends_with("→  -  REFUSED"),
            "{}",
            render(&f, None, None)
        );
        assert_eq!(from_event(&event(0, false), 0), None);
    }

    #[test]
    fn every_kernel_verdict_and_hook_has_its_contract_name() {
        let kernel = [
            (FLOW_TRANSLATED, "translated"),
            (FLOW_AFFINITY_HIT, "affinity-hit"),
            (FLOW_REFUSED, "refused"),
            (FLOW_ERROR, "error"),
            (FLOW_OBSERVED, "observed"),
            (FLOW_SRC_RANGE, "source-range"),
            (FLOW_DENIED, "denied"),
            (FLOW_NOT_SERVICE, "not-a-service"),
            (FLOW_UNSUPPORTED, "unsupported"),
        ];
        for (k, name) in kernel {
            assert_eq!(verdict_from_kernel(k).map(Verdict::name), Some(name));
        }
        assert_eq!(verdict_from_kernel(0), None);
        assert_eq!(verdict_from_kernel(200), None);
        assert_eq!(hook_from_kernel(FLOW_HOOK_CONNECT), hook::CONNECT);
        assert_eq!(hook_from_kernel(FLOW_HOOK_SENDMSG), hook::SENDMSG);
        assert_eq!(hook_from_kernel(FLOW_HOOK_PACKET), hook::PACKET);
    }

    #[test]
    fn filters_parse_match_and_round_trip() {
        let f = FlowFilter::parse("service=shop%2Fweb&verdict=refused&proto=tcp").unwrap();
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        assert_eq!(f.verdict, Some(Verdict::Refused));
        assert_eq!(FlowFilter::parse(&f.query()).unwrap(), f);
        let mut refused = from_event(&event(FLOW_REFUSED, false), 0).unwrap();
        names().resolve(&mut refused);
        let mut ok = from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
        names().resolve(&mut ok);
        assert!(f.matches(&refused));
        assert!(!f.matches(&ok));
        let pod = FlowFilter::parse("pod=shop/web-1").unwrap();
        assert!(pod.matches(&ok) && !pod.matches(&refused));
        assert!(FlowFilter::parse("verdict=nope")
            .unwrap_err()
            .to_string()
            .contains("affinity-hit"));
        assert!(FlowFilter::parse("proto=sctp").is_err());
        assert!(FlowFilter::parse("colour=red").is_err());
        assert_eq!(FlowFilter::parse("").unwrap(), FlowFilter::default());
    }
}
