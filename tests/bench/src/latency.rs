//! New-connection latency of every row (the four variants over IPv4, netboot
//! and the floor over IPv6 and IPv4-mapped), measured in the same run and
//! interleaved: one long-lived client per row, batches taken in turn and
//! the order rotated every round, so drifts of the machine (other jobs on the
//! two shared cores) hit every row alike.
//!
//! netboot's translation counter is shared by connect4 and connect6 (and
//! per-CPU, summed): it is read before and after every batch, so each
//! row's translations are counted on their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;

use crate::client::Client;
use crate::stats::{summarize, Summary};
use crate::variant::Row;

/// How many connections, in what batches.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Measured connections per variant.
    pub connections: u32,
    /// Connections per batch (one variant's turn).
    pub batch: u32,
    /// Unmeasured connections per variant first (ARP, caches, conntrack).
    pub warmup: u32,
}

/// One row's client and target.
pub struct Lane {
    /// Which row.
    pub row: Row,
    /// Its client process.
    pub client: Client,
    /// Where it connects.
    pub target: SocketAddr,
}

/// Outcome per row.
#[derive(Clone, Debug)]
pub struct LaneResult {
    /// Translations netboot counted during this row's batches (probe and
    /// warm-up included).
    pub translated: u64,
    /// connect() times in microseconds.
    pub micros: Summary,
    /// The same times batch by batch (index = round of the interleaving),
    /// for compare.rs's round-block bootstrap.
    pub rounds: Vec<Vec<f64>>,
    /// Successful connections measured.
    pub ok: u64,
    /// Failed connections.
    pub failed: u64,
    /// errno of the last failure.
    pub errno: i32,
    /// Why the variant was not measured, if it was not.
    pub error: Option<String>,
}

/// Runs the plan; `counter` reads netboot's translation counter (between
/// batches, never while a client connects). A row whose first connection
/// fails is reported with the error and left out of the rounds (the others
/// are still measured).
/// `between` runs after every batch, before the counter is read (the
/// listeners' drain with `--drain-listeners`).
pub fn measure(
    lanes: &mut [Lane],
    plan: Plan,
    counter: &dyn Fn() -> u64,
    between: &dyn Fn(),
) -> Result<BTreeMap<Row, LaneResult>> {
    let mut samples: BTreeMap<Row, Vec<f64>> = BTreeMap::new();
    let mut out: BTreeMap<Row, LaneResult> = BTreeMap::new();
    let mut active: Vec<usize> = Vec::new();
    let mut last = counter();
    let mut counted = |out: &mut BTreeMap<Row, LaneResult>, row: Row| {
        between();
        let now = counter();
        if let Some(res) = out.get_mut(&row) {
            res.translated += now.saturating_sub(last);
        }
        last = now;
    };
    for (i, lane) in lanes.iter_mut().enumerate() {
        let probe = lane.client.batch(lane.target, 1)?;
        if probe.ns.is_empty() {
            let e = std::io::Error::from_raw_os_error(probe.errno);
            out.insert(
                lane.row,
                LaneResult {
                    translated: 0,
                    micros: Summary::default(),
                    rounds: Vec::new(),
                    ok: 0,
                    failed: probe.failed,
                    errno: probe.errno,
                    error: Some(format!("first connection to {} failed: {e}", lane.target)),
                },
            );
            counted(&mut out, lane.row);
            continue;
        }
        lane.client.batch(lane.target, plan.warmup)?;
        active.push(i);
        samples.insert(lane.row, Vec::with_capacity(plan.connections as usize));
        out.insert(
            lane.row,
            LaneResult {
                translated: 0,
                micros: Summary::default(),
                rounds: Vec::with_capacity(plan.connections.div_ceil(plan.batch.max(1)) as usize),
                ok: 0,
                failed: 0,
                errno: 0,
                error: None,
            },
        );
        counted(&mut out, lane.row);
    }
    let batch = plan.batch.max(1);
    let rounds = plan.connections.div_ceil(batch);
    for r in 0..rounds {
        let count = batch.min(plan.connections - r * batch);
        for k in 0..active.len() {
            let i = active[(k + r as usize) % active.len()];
            let lane = &mut lanes[i];
            let b = lane.client.batch(lane.target, count)?;
            counted(&mut out, lane.row);
            let micros: Vec<f64> = b.ns.iter().map(|ns| *ns as f64 / 1000.0).collect();
            if let Some(s) = samples.get_mut(&lane.row) {
                s.extend_from_slice(&micros);
            }
            if let Some(res) = out.get_mut(&lane.row) {
                res.rounds.push(micros);
                res.ok += b.ns.len() as u64;
                res.failed += b.failed;
                if b.failed > 0 {
                    res.errno = b.errno;
                }
            }
        }
    }
    for (v, s) in samples {
        if let Some(res) = out.get_mut(&v) {
            res.micros = summarize(&s);
        }
    }
    Ok(out)
}
