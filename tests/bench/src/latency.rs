//! New-connection latency of the four variants, measured in the same run and
//! interleaved: one long-lived client per variant, batches taken in turn and
//! the order rotated every round, so drifts of the machine (other jobs on the
//! two shared cores) hit every variant alike.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use anyhow::Result;

use crate::client::Client;
use crate::stats::{summarize, Summary};
use crate::variant::Variant;

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

/// One variant's client and target.
pub struct Lane {
    /// Which variant.
    pub variant: Variant,
    /// Its client process.
    pub client: Client,
    /// Where it connects.
    pub target: SocketAddrV4,
}

/// Outcome per variant.
#[derive(Clone, Debug)]
pub struct LaneResult {
    /// connect() times in microseconds.
    pub micros: Summary,
    /// Successful connections measured.
    pub ok: u64,
    /// Failed connections.
    pub failed: u64,
    /// errno of the last failure.
    pub errno: i32,
    /// Why the variant was not measured, if it was not.
    pub error: Option<String>,
}

/// Runs the plan. A variant whose first connection fails is reported with the
/// error and left out of the rounds (the others are still measured).
pub fn measure(lanes: &mut [Lane], plan: Plan) -> Result<BTreeMap<Variant, LaneResult>> {
    let mut samples: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut out: BTreeMap<Variant, LaneResult> = BTreeMap::new();
    let mut active: Vec<usize> = Vec::new();
    for (i, lane) in lanes.iter_mut().enumerate() {
        let probe = lane.client.batch(lane.target, 1)?;
        if probe.ns.is_empty() {
            let e = std::io::Error::from_raw_os_error(probe.errno);
            out.insert(
                lane.variant,
                LaneResult {
                    micros: Summary::default(),
                    ok: 0,
                    failed: probe.failed,
                    errno: probe.errno,
                    error: Some(format!("first connection to {} failed: {e}", lane.target)),
                },
            );
            continue;
        }
        lane.client.batch(lane.target, plan.warmup)?;
        active.push(i);
        samples.insert(lane.variant, Vec::with_capacity(plan.connections as usize));
        out.insert(
            lane.variant,
            LaneResult {
                micros: Summary::default(),
                ok: 0,
                failed: 0,
                errno: 0,
                error: None,
            },
        );
    }
    let batch = plan.batch.max(1);
    let rounds = plan.connections.div_ceil(batch);
    for r in 0..rounds {
        let count = batch.min(plan.connections - r * batch);
        for k in 0..active.len() {
            let i = active[(k + r as usize) % active.len()];
            let lane = &mut lanes[i];
            let b = lane.client.batch(lane.target, count)?;
            if let Some(s) = samples.get_mut(&lane.variant) {
                s.extend(b.ns.iter().map(|ns| *ns as f64 / 1000.0));
            }
            if let Some(res) = out.get_mut(&lane.variant) {
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
