//! Service flow events, like Hubble's flows: the socket-LB programs write one
//! record per decision on a Service address to the `nb_flow_ring` ring
//! buffer (lb.h, "Service flow events"); the agent reads it only while
//! someone watches (`GET /v1/flows`, `netboot-datapath monitor`), names what
//! it can (Service, backend pod) and fans the flows out to the watchers.
//!
//! Off by default: the kernel switch (`nb_flow_cfg.enabled`) is set by the
//! first subscriber and cleared by the last, so an unwatched node pays one
//! array lookup per Service connect. While on, each CPU emits at most
//! `rate` events per second (token bucket in the kernel); what does not fit
//! (budget, or the ring buffer full because the reader is behind) is counted
//! in `nb_flow_stats`, exported as `netboot_datapath_flow_events_dropped_total`.

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
    COUNTER_NAMES, FLOW_AFFINITY_HIT, FLOW_ERROR, FLOW_HOOK_CONNECT, FLOW_HOOK_PACKET,
    FLOW_OBSERVED, FLOW_REFUSED, FLOW_SRC_RANGE, FLOW_STAT_NAMES, FLOW_TRANSLATED,
};
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

/// The verdict of one decision, as flows and filters name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Translated to a backend chosen now.
    Translated,
    /// Translated to the backend of a ClientIP affinity entry.
    AffinityHit,
    /// No usable backend: the syscall failed with ECONNREFUSED.
    Refused,
    /// The reverse entry could not be recorded: the syscall failed with ENOMEM.
    Error,
    /// Coexist (observe) mode: looked up, not translated.
    Observed,
    /// An LB IP with source ranges: left to the per-packet path.
    SourceRange,
}

impl Verdict {
    /// Every verdict, in the kernel's order.
    pub const ALL: [Verdict; 6] = [
        Verdict::Translated,
        Verdict::AffinityHit,
        Verdict::Refused,
        Verdict::Error,
        Verdict::Observed,
        Verdict::SourceRange,
    ];

    /// From `NB_FLOW_*`.
    pub fn from_kernel(v: u8) -> Option<Self> {
        Some(match v {
            FLOW_TRANSLATED => Self::Translated,
            FLOW_AFFINITY_HIT => Self::AffinityHit,
            FLOW_REFUSED => Self::Refused,
            FLOW_ERROR => Self::Error,
            FLOW_OBSERVED => Self::Observed,
            FLOW_SRC_RANGE => Self::SourceRange,
            _ => return None,
        })
    }

    /// The name used in JSON and filters.
    pub fn name(self) -> &'static str {
        match self {
            Self::Translated => "translated",
            Self::AffinityHit => "affinity-hit",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Observed => "observed",
            Self::SourceRange => "source-range",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// One flow: a socket-LB decision on a Service address, as served by
/// `/v1/flows` (one JSON object per line). Names the agent could not
/// resolve are absent; the raw ids are always there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Wall-clock time of the decision, ns since the Unix epoch (converted
    /// from the kernel's CLOCK_MONOTONIC stamp).
    pub time_unix_ns: u64,
    /// `connect` (TCP, connected UDP), `sendmsg` (unconnected UDP), or
    /// `packet` (a new external flow on the per-packet path: NodePort, LB
    /// and external IPs from outside the node).
    pub hook: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// 4 or 6 (IPv4-mapped destinations on IPv6 sockets count as 4).
    pub family: u8,
    /// What happened.
    pub verdict: Verdict,
    /// The kernel's outcome counter name (the precise reason).
    pub reason: String,
    /// The client's network namespace cookie (a pod is its netns).
    pub client_netns_cookie: u64,
    /// The client's cgroup v2 id.
    pub client_cgroup_id: u64,
    /// UID of the client's pod, from its cgroup's path
    /// ([`crate::podcgroup`]); absent for host processes and unknown cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_pod_uid: Option<String>,
    /// Per-packet path: the client's address (an external client, or a
    /// node SNATed in front of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// Per-packet path: the client's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    /// Service id (rev-nat id, `service list`'s ID).
    pub service_id: u32,
    /// `namespace/name` of the Service, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The Service port's name, when known and named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// The address the client asked for (ClusterIP, externalIP, LB IP).
    pub frontend_ip: IpAddr,
    /// Its port.
    pub frontend_port: u16,
    /// The backend chosen (translated, affinity-hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<u32>,
    /// Its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ip: Option<IpAddr>,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
    /// `namespace/name` of the backend's pod (EndpointSlice `targetRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_pod: Option<String>,
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

impl Flow {
    /// Decodes a kernel record (None: an unknown verdict). `wall_offset`:
    /// wall-clock minus monotonic ns.
    pub fn from_event(ev: &FlowEvent, wall_offset: i128) -> Option<Self> {
        let verdict = Verdict::from_kernel(ev.verdict)?;
        let ip = |a: [u32; 4]| -> IpAddr {
            if ev.family == 6 {
                IpAddr::V6(addr6_from_be(a))
            } else {
                IpAddr::V4(addr_from_be(a[0]))
            }
        };
        let chosen = ev.backend_id != 0;
        Some(Self {
            time_unix_ns: u64::try_from(i128::from(ev.ts_ns) + wall_offset).unwrap_or(0),
            hook: match ev.hook {
                FLOW_HOOK_CONNECT => "connect",
                FLOW_HOOK_PACKET => "packet",
                _ => "sendmsg",
            }
            .into(),
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
}

/// What a watcher wants to see (`/v1/flows?service=ns/name&pod=ns/name&verdict=refused&proto=tcp`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// `namespace/name` of the Service.
    pub service: Option<String>,
    /// `namespace/name` of the backend pod.
    pub pod: Option<String>,
    /// The verdict.
    pub verdict: Option<Verdict>,
    /// `tcp` or `udp`.
    pub proto: Option<String>,
}

/// `%XX` and `+` decoding of one query component.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FlowFilter {
    /// Parses a query string; an unknown key or value is an error (the text
    /// says which).
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "service" => f.service = Some(v),
                "pod" => f.pod = Some(v),
                "verdict" => {
                    f.verdict = Some(Verdict::parse(&v).ok_or_else(|| {
                        format!(
                            "verdict {v:?}: one of {}",
                            Verdict::ALL.map(Verdict::name).join(", ")
                        )
                    })?)
                }
                "proto" => {
                    if v != "tcp" && v != "udp" {
                        return Err(format!("proto {v:?}: tcp or udp"));
                    }
                    f.proto = Some(v)
                }
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (service, pod, verdict, proto)"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The query string for these filters.
    pub fn query(&self) -> String {
        let enc = |s: &str| {
            s.replace('%', "%25")
                .replace('&', "%26")
                .replace('=', "%3D")
        };
        let mut parts = Vec::new();
        if let Some(s) = &self.service {
            parts.push(format!("service={}", enc(s)));
        }
        if let Some(s) = &self.pod {
            parts.push(format!("pod={}", enc(s)));
        }
        if let Some(v) = self.verdict {
            parts.push(format!("verdict={}", v.name()));
        }
        if let Some(p) = &self.proto {
            parts.push(format!("proto={}", enc(p)));
        }
        parts.join("&")
    }

    /// Whether `flow` passes.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| flow.service.as_ref() == Some(s))
            && self
                .pod
                .as_ref()
                .is_none_or(|p| flow.backend_pod.as_ref() == Some(p))
            && self.verdict.is_none_or(|v| flow.verdict == v)
            && self.proto.as_ref().is_none_or(|p| flow.proto == *p)
    }
}

/// Names for flows: frontend address → Service (and port name), backend
/// address → pod, built from the Services and EndpointSlices the agent
/// watches (it does not watch pods: the client is left as raw ids).
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
                if let (Some(ip), Some(pod)) = (ep.ip, &ep.pod) {
                    n.pods.insert(ip, pod.to_string());
                }
            }
        }
        n
    }

    /// Fills the names of `flow` it knows.
    pub fn resolve(&self, flow: &mut Flow) {
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

/// Sets the kernel switch and budget (`rate` 0: the kernel default).
pub fn set_enabled(pins: &Pins, enabled: bool, rate: u32) -> Result<(), MapsError> {
    let mut m: Array<MapData, FlowCfg> = open(pins, names::FLOW_CFG)?;
    m.set(
        0,
        FlowCfg {
            enabled: u32::from(enabled),
            rate,
        },
        0,
    )
    .map_err(kerr(names::FLOW_CFG, "set"))
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

/// Names the agent's watchers know, read when the index is rebuilt.
pub type NamesSource = dyn Fn() -> FlowNames + Send + Sync;

struct HubState {
    watchers: usize,
    reader: Option<tokio::task::JoinHandle<()>>,
}

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
    /// Flows for this watcher.
    pub rx: broadcast::Receiver<Item>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe();
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
                reader: None,
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

    /// Adds a watcher: the first starts the reader and turns events on.
    /// Err: too many watchers, or the maps could not be used.
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription, String> {
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
        if st.watchers == 0 {
            let ring = open_ring(&self.pins).map_err(|e| e.to_string())?;
            set_enabled(&self.pins, true, self.opts.rate_per_cpu).map_err(|e| e.to_string())?;
            let hub = self.clone();
            st.reader = Some(tokio::spawn(async move { hub.read(ring).await }));
            tracing::info!("flow events on (first watcher)");
        }
        st.watchers += 1;
        Ok(Subscription {
            hub: self.clone(),
            rx,
        })
    }

    fn unsubscribe(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.watchers = st.watchers.saturating_sub(1);
        if st.watchers == 0 {
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
        let mut names = (self.names)();
        let mut clients = self.cgroup_root.as_ref().map(ClientPods::new);
        let mut built = Instant::now();
        loop {
            // The kernel wakes the reader only once NB_FLOW_WAKE_BYTES are
            // unread (lb.h); otherwise the ring is drained every POLL.
            let woken = tokio::time::timeout(POLL, fd.readable_mut()).await;
            if built.elapsed() > Duration::from_secs(1) {
                names = (self.names)();
                built = Instant::now();
            }
            match woken {
                Ok(Ok(mut guard)) => {
                    self.drain(guard.get_inner_mut(), &names, clients.as_mut());
                    guard.clear_ready();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "flow ring buffer: poll failed");
                    return;
                }
                Err(_) => self.drain(fd.get_mut(), &names, clients.as_mut()),
            }
        }
    }

    /// Sends every unread event to the watchers.
    fn drain(
        &self,
        ring: &mut RingBuf<MapData>,
        names: &FlowNames,
        mut clients: Option<&mut ClientPods>,
    ) {
        let off = wall_offset();
        while let Some(rec) = ring.next() {
            let Some(ev) = FlowEvent::from_bytes(&rec) else {
                continue;
            };
            drop(rec);
            if let Some(mut flow) = Flow::from_event(&ev, off) {
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

/// A client-side rendering of one flow:
/// `TIME  netns:COOKIE  →  ns/svc:port (VIP:port/proto)  →  pod ip:port  VERDICT`.
pub fn render(flow: &Flow) -> String {
    let secs = flow.time_unix_ns / 1_000_000_000;
    let ms = (flow.time_unix_ns / 1_000_000) % 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let fe = match flow.frontend_ip {
        IpAddr::V6(a) => format!("[{a}]:{}", flow.frontend_port),
        IpAddr::V4(a) => format!("{a}:{}", flow.frontend_port),
    };
    let svc = match (&flow.service, &flow.port_name) {
        (Some(s), Some(p)) => format!("{s}:{p} ({fe}/{})", flow.proto),
        (Some(s), None) => format!("{s}:{} ({fe}/{})", flow.frontend_port, flow.proto),
        _ => format!("service#{} ({fe}/{})", flow.service_id, flow.proto),
    };
    let be = match (flow.backend_ip, flow.backend_port) {
        (Some(ip), Some(port)) => {
            let addr = match ip {
                IpAddr::V6(a) => format!("[{a}]:{port}"),
                IpAddr::V4(a) => format!("{a}:{port}"),
            };
            match &flow.backend_pod {
                Some(p) => format!("{p} {addr}"),
                None => format!("backend#{} {addr}", flow.backend_id.unwrap_or(0)),
            }
        }
        _ => "-".into(),
    };
    let client = match (&flow.client_pod_uid, flow.client_ip, flow.client_port) {
        (Some(uid), _, _) => format!("pod-uid:{uid}"),
        (None, Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (None, Some(IpAddr::V4(a)), Some(p)) => format!("{a}:{p}"),
        _ => format!("netns:{}", flow.client_netns_cookie),
    };
    format!(
        "{h:02}:{m:02}:{s:02}.{ms:03}  {client}  →  {svc}  →  {be}  {}",
        flow.verdict.name().to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{addr_be, port_be, PROTO_TCP};
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
        let mut f = Flow::from_event(&ev, 0).unwrap();
        names().resolve(&mut f);
        assert_eq!(f.hook, "packet");
        assert_eq!(f.client_ip, Some(IpAddr::V4(Ipv4Addr::new(172, 18, 0, 3))));
        assert_eq!(f.client_port, Some(41000));
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        let line = render(&f);
        assert!(
            line.contains("  172.18.0.3:41000  →  shop/web:http (172.18.1.1:30080/tcp)  →  shop/web-1 10.0.1.5:8080  TRANSLATED"),
            "{line}"
        );
        // Socket hooks have no client address.
        let c = Flow::from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
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
        let mut f = Flow::from_event(&event(FLOW_TRANSLATED, true), 1_000).unwrap();
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
        let line = render(&f);
        assert!(line.contains("shop/web:http (10.96.0.10:80/tcp)"), "{line}");
        assert!(
            line.contains("shop/web-1 10.0.1.5:8080  TRANSLATED"),
            "{line}"
        );
    }

    #[test]
    fn a_refused_event_has_no_backend() {
        let f = Flow::from_event(&event(FLOW_REFUSED, false), 0).unwrap();
        assert_eq!(f.verdict, Verdict::Refused);
        assert_eq!(f.reason, "no_backend");
        assert_eq!(f.backend_ip, None);
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["verdict"], "refused");
        assert!(j.get("backend_ip").is_none());
        assert!(render(&f).ends_with("→  -  REFUSED"), "{}", render(&f));
        assert_eq!(Flow::from_event(&event(0, false), 0), None);
    }

    #[test]
    fn filters_parse_match_and_round_trip() {
        let f = FlowFilter::parse("service=shop%2Fweb&verdict=refused&proto=tcp").unwrap();
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        assert_eq!(f.verdict, Some(Verdict::Refused));
        assert_eq!(FlowFilter::parse(&f.query()).unwrap(), f);
        let mut refused = Flow::from_event(&event(FLOW_REFUSED, false), 0).unwrap();
        names().resolve(&mut refused);
        let mut ok = Flow::from_event(&event(FLOW_TRANSLATED, true), 0).unwrap();
        names().resolve(&mut ok);
        assert!(f.matches(&refused));
        assert!(!f.matches(&ok));
        let pod = FlowFilter::parse("pod=shop/web-1").unwrap();
        assert!(pod.matches(&ok) && !pod.matches(&refused));
        assert!(FlowFilter::parse("verdict=nope")
            .unwrap_err()
            .contains("affinity-hit"));
        assert!(FlowFilter::parse("proto=sctp").is_err());
        assert!(FlowFilter::parse("colour=red").is_err());
        assert_eq!(FlowFilter::parse("").unwrap(), FlowFilter::default());
    }
}
