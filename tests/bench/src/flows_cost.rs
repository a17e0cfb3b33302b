//! What flow events cost (issue 19): `netboot-bench flows`.
//!
//! netboot's socket LB with N Services (the last-declared one's backends
//! are real listeners), the agent's flow reader ([`FlowHub`], the one behind
//! `/v1/flows` and `netboot-datapath monitor`) subscribed throughout. The
//! kernel switch is turned on and off batch by batch, in rotated order, so
//! both columns see the same drifts of the shared machine:
//!
//! 1. connect latency to the last-declared Service, events off against on,
//!    and the connect4 program's own run time per connect (the kernel's
//!    `BPF_ENABLE_STATS` accounting, read around each batch): the part of
//!    the cost that is the program's, free of the scheduling noise that
//!    dominates a shared machine's p99;
//! 2. a flood: one client connecting back to back for a few seconds with
//!    events on — the events per second the node's reader received, and the
//!    kernel's drop counters (per-CPU budget, ring buffer full);
//! 3. with `--cold-kib`, connect4's run time per connect (events off) when
//!    the client has written over a buffer of each size just before each
//!    connect, sizes rotated round by round: what the program costs when
//!    its maps, code and page-table entries are no longer in the caches, as
//!    after an interrupt or another task — where a connect's p99 lives,
//!    while the warm figure is its p50.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netboot_datapath::desired;
use netboot_datapath::flows::{self, FlowHub, FlowOptions, FlowStats};
use serde::Serialize;

use crate::client::Client;
use crate::netboot_lb::{map_sizes, NetbootLb};
use crate::stats::{summarize, Summary};
use crate::topology::Topology;
use crate::variant::Variant;
use crate::workload::Workload;

/// The goal: added connect p99 with events on.
pub const GOAL_ADDED_P99_US: f64 = 2.0;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// Measured connections per column.
    pub connections: u32,
    /// Connections per batch.
    pub batch: u32,
    /// Seconds of the flood.
    pub flood_s: u64,
    /// Buffer sizes (KiB) written over before each connect of phase 3;
    /// empty: no phase 3.
    pub cold_kib: Vec<u32>,
    /// Connections per size in phase 3.
    pub cold_connections: u32,
}

/// connect4's run time with the caches made cold (phase 3), one size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ColdRow {
    /// Buffer written over before each connect, KiB (0: none).
    pub kib: u32,
    /// Program runs counted.
    pub runs: u64,
    /// Mean run time per connect, ns.
    pub mean_ns: f64,
    /// Per-batch means, ns: their spread shows how steady the figure is.
    pub batch_min_ns: f64,
    /// See `batch_min_ns`.
    pub batch_max_ns: f64,
    /// Connect latency, µs (the client's clock, caches just as cold).
    pub connect: Summary,
}

/// The section's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Services.
    pub services: u32,
    /// Connect µs, events off.
    pub off: Summary,
    /// Connect µs, events on.
    pub on: Summary,
    /// connect4's mean run time per connect, events off (ns).
    pub kernel_off_ns: f64,
    /// connect4's mean run time per connect, events on (ns).
    pub kernel_on_ns: f64,
    /// Flows the reader received during the latency phase.
    pub latency_events: u64,
    /// Flood: connections made.
    pub flood_connections: u64,
    /// Flood: wall seconds.
    pub flood_s: f64,
    /// Flood: events the reader received.
    pub flood_events: u64,
    /// Flood: kernel counters over the flood.
    pub flood_kernel: FlowStats,
    /// Phase 3, one row per `--cold-kib` size (empty when not run).
    pub cold: Vec<ColdRow>,
    /// The goal's verdict.
    pub goal: String,
}

/// The connect4 program's cumulative (run time ns, runs), from the kernel's
/// statistics (on while the `BPF_ENABLE_STATS` fd is held).
struct ProgRuns {
    id: u32,
    _stats: std::os::fd::OwnedFd,
}

impl ProgRuns {
    fn connect4(pins: &netboot_datapath::pins::Pins) -> Result<Self> {
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS (run time)")?;
        let link = aya::programs::links::PinnedLink::from_pin(pins.link("connect4"))
            .context("opening the connect4 link pin")?;
        let id = aya::programs::links::FdLink::from(link)
            .info()
            .context("connect4 link info")?
            .program_id();
        Ok(Self { id, _stats: stats })
    }

    fn read(&self) -> Result<(u64, u64)> {
        let p = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == self.id)
            .with_context(|| format!("program {} is gone", self.id))?;
        Ok((p.run_time().as_nanos() as u64, p.run_count()))
    }
}

fn delta(a: FlowStats, b: FlowStats) -> FlowStats {
    FlowStats {
        emitted: b.emitted.saturating_sub(a.emitted),
        rate_limited: b.rate_limited.saturating_sub(a.rate_limited),
        ring_full: b.ring_full.saturating_sub(a.ring_full),
        watchers: b.watchers,
    }
}

/// Runs the section.
pub fn run(o: &Options) -> Result<Report> {
    let tag = format!("{}-flows", crate::cleanup::run_tag());
    let w = Workload::new(o.services, o.endpoints)?;
    let table = desired::build(&w.services(), &w.slices(false), 10800);
    let topo = Topology::new(&tag, o.endpoints)?;
    let sizes = map_sizes(table.frontends.len(), o.endpoints, w.endpoints());
    let mut nb = NetbootLb::install(&tag, "lb", &sizes)?;
    nb.reconcile(&table)
        .result
        .context("programming the Services")?;
    drop(table);
    let pins = nb.pins().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let hub = FlowHub::new(
        pins.clone(),
        FlowOptions::default(),
        Arc::new(|| Arc::new(flows::FlowNames::default())),
    );
    let received = Arc::new(AtomicU64::new(0));
    let sub = {
        let _g = rt.enter();
        hub.subscribe()
            .map_err(|e| anyhow::anyhow!("subscribing to flow events: {e}"))?
    };
    let counter = received.clone();
    let mut rx = sub.rx.resubscribe();
    rt.spawn(async move {
        loop {
            match rx.recv().await {
                Ok(_) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
    });
    let mut client = Client::spawn(&nb.cgroup.path, topo.client(Variant::Netboot)?)?;
    let target = std::net::SocketAddr::V4(w.target());
    let first = client.batch(target, 1)?;
    anyhow::ensure!(
        !first.ns.is_empty(),
        "first connection to {target} failed: errno {}",
        first.errno
    );
    client.batch(target, 500)?;
    topo.drain();

    // 1. Latency, off and on interleaved.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let runs = ProgRuns::connect4(&pins)?;
    // (run time ns, runs) per column.
    let (mut k_off, mut k_on) = ((0u64, 0u64), (0u64, 0u64));
    let before = received.load(Ordering::Relaxed);
    let rounds = o.connections.div_ceil(o.batch.max(1));
    for r in 0..rounds {
        crate::cleanup::check_stop()?;
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for enabled in order {
            flows::set_enabled(&pins, enabled, 0)?;
            let (t0, n0) = runs.read()?;
            let b = client.batch(target, o.batch)?;
            let (t1, n1) = runs.read()?;
            let k = if enabled { &mut k_on } else { &mut k_off };
            k.0 += t1.saturating_sub(t0);
            k.1 += n1.saturating_sub(n0);
            topo.drain();
            let us = b.ns.iter().map(|ns| *ns as f64 / 1000.0);
            if enabled {
                on.extend(us);
            } else {
                off.extend(us);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let latency_events = received.load(Ordering::Relaxed) - before;

    // 3. Cold caches (before the flood, whose events would fill the ring).
    let cold = cold_phase(o, &mut client, target, &runs, &topo)?;

    // 2. The flood.
    flows::set_enabled(&pins, true, 0)?;
    let k0 = flows::stats(&pins)?;
    let e0 = received.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut made = 0u64;
    while t.elapsed() < Duration::from_secs(o.flood_s) {
        crate::cleanup::check_stop()?;
        let b = client.batch(target, 2000)?;
        made += b.ns.len() as u64;
        topo.drain();
    }
    let flood_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let flood_events = received.load(Ordering::Relaxed) - e0;
    let flood_kernel = delta(k0, flows::stats(&pins)?);
    flows::set_enabled(&pins, false, 0)?;
    drop(sub);
    drop(client);

    let (off, on) = (summarize(&off), summarize(&on));
    let mean = |(ns, n): (u64, u64)| ns as f64 / n.max(1) as f64;
    let (kernel_off_ns, kernel_on_ns) = (mean(k_off), mean(k_on));
    let added = on.p99 - off.p99;
    let goal = format!(
        "added connect p99 with flow events on < {GOAL_ADDED_P99_US} µs at {} Services: {} ({:+.2} µs: p99 {:.2} on vs {:.2} off; p50 {:+.2} µs; the connect4 program itself {:+.0} ns per connect: {:.0} ns on vs {:.0} ns off)",
        o.services,
        if added < GOAL_ADDED_P99_US { "MET" } else { "MISSED" },
        added,
        on.p99,
        off.p99,
        on.p50 - off.p50,
        kernel_on_ns - kernel_off_ns,
        kernel_on_ns,
        kernel_off_ns
    );
    Ok(Report {
        services: o.services,
        off,
        on,
        kernel_off_ns,
        kernel_on_ns,
        latency_events,
        flood_connections: made,
        flood_s,
        flood_events,
        flood_kernel,
        cold,
        goal,
    })
}

/// Phase 3: events off; per round, every size of `o.cold_kib` in rotated
/// order, one batch each.
fn cold_phase(
    o: &Options,
    client: &mut Client,
    target: std::net::SocketAddr,
    runs: &ProgRuns,
    topo: &Topology,
) -> Result<Vec<ColdRow>> {
    if o.cold_kib.is_empty() {
        return Ok(Vec::new());
    }
    /// One size's sums over the rounds.
    #[derive(Clone, Default)]
    struct Acc {
        run_ns: u64,
        runs: u64,
        batch_means_ns: Vec<f64>,
        connect_us: Vec<f64>,
    }
    let batch = 100u32;
    let sizes = &o.cold_kib;
    let mut acc = vec![Acc::default(); sizes.len()];
    let rounds = o.cold_connections.div_ceil(batch).max(1);
    for r in 0..rounds as usize {
        crate::cleanup::check_stop()?;
        for k in 0..sizes.len() {
            let i = (k + r) % sizes.len();
            client.cold(sizes[i] as usize * 1024)?;
            let (t0, n0) = runs.read()?;
            let b = client.batch(target, batch)?;
            let (t1, n1) = runs.read()?;
            topo.drain();
            let (dt, dn) = (t1.saturating_sub(t0), n1.saturating_sub(n0));
            let a = &mut acc[i];
            a.run_ns += dt;
            a.runs += dn;
            if dn > 0 {
                a.batch_means_ns.push(dt as f64 / dn as f64);
            }
            a.connect_us
                .extend(b.ns.iter().map(|ns| *ns as f64 / 1000.0));
        }
    }
    client.cold(0)?;
    Ok(sizes
        .iter()
        .zip(acc)
        .map(|(kib, a)| ColdRow {
            kib: *kib,
            runs: a.runs,
            mean_ns: a.run_ns as f64 / a.runs.max(1) as f64,
            batch_min_ns: a
                .batch_means_ns
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min),
            batch_max_ns: a.batch_means_ns.iter().copied().fold(0.0, f64::max),
            connect: summarize(&a.connect_us),
        })
        .collect())
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Flow events: what they cost\n\nnetboot socket LB, {} Services, the agent's flow reader subscribed; the kernel switch toggled batch by batch (rotated order). Connect latency to the last-declared Service (µs):\n",
        r.services
    );
    let _ = writeln!(
        out,
        "| events | n | p50 | p90 | p99 | p99.9 |\n|---|---:|---:|---:|---:|---:|"
    );
    for (name, s) in [("off", &r.off), ("on", &r.on)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.n, s.p50, s.p90, s.p99, s.p999
        );
    }
    let _ = writeln!(
        out,
        "\nThe connect4 program's own run time per connect (kernel BPF statistics, summed around each batch): {:.0} ns off, {:.0} ns on ({:+.0} ns). It is what events add in the kernel at every percentile; the rest of a p99 difference is the machine's scheduling and the reader's CPU.\n",
        r.kernel_off_ns,
        r.kernel_on_ns,
        r.kernel_on_ns - r.kernel_off_ns
    );
    let _ = writeln!(
        out,
        "Events the reader received during the latency phase: {} (one per translated connect while on).\n",
        r.latency_events
    );
    let k = &r.flood_kernel;
    let _ = writeln!(
        out,
        "Flood: one client connecting back to back for {:.1} s, events on: {} connections ({:.0}/s); the reader received {} events ({:.0}/s); kernel: {} written, {} dropped over the per-CPU budget, {} dropped with the ring buffer full.\n",
        r.flood_s,
        r.flood_connections,
        r.flood_connections as f64 / r.flood_s.max(1e-9),
        r.flood_events,
        r.flood_events as f64 / r.flood_s.max(1e-9),
        k.emitted,
        k.rate_limited,
        k.ring_full
    );
    if !r.cold.is_empty() {
        let _ = writeln!(
            out,
            "connect4's run time with cold caches (events off): before each connect the client writes over a buffer (one store per 64-byte line; 0 KiB: none), sizes rotated round by round, batches of 100; kernel BPF statistics around each batch. Connect latency from the client's clock.\n\n| buffer written before each connect | runs | connect4 ns per connect | batch means, ns | connect p50 µs | connect p99 µs |\n|---:|---:|---:|---|---:|---:|"
        );
        for c in &r.cold {
            let _ = writeln!(
                out,
                "| {} KiB | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} |",
                c.kib,
                c.runs,
                c.mean_ns,
                c.batch_min_ns,
                c.batch_max_ns,
                c.connect.p50,
                c.connect.p99
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "**Goal**: {}", r.goal);
    out
}

/// Writes `flows.md` and `flows.json` under `out`.
pub fn write(r: &Report, out: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md = out.join("flows.md");
    let js = out.join("flows.json");
    std::fs::write(&md, markdown(r)).with_context(|| format!("writing {}", md.display()))?;
    std::fs::write(&js, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", js.display()))?;
    Ok((md, js))
}
