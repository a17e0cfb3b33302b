//! New-connection latency of every row (the four variants over IPv4, netboot
//! and the floor over IPv6 and IPv4-mapped), measured in the same run and
//! interleaved: one long-lived client per row, batches taken in turn, so
//! drifts of the machine (other jobs on the two shared cores) hit every row
//! alike. The order of the turns is shuffled every round ([`Order`]): a
//! batch's first connections pay for what the batch before it left in the
//! caches, so no row may always follow the same one.
//!
//! netboot's translation counter is shared by connect4 and connect6 (and
//! per-CPU, summed): it is read before and after every batch, so each
//! row's translations are counted on their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;
use serde::Serialize;

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
    /// The order of the rows' turns within a round.
    pub order: Order,
}

/// The order of the rows' turns within a round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// A new random order every round, from a fixed seed (a run can be
    /// repeated): a row's batch follows each other row's about equally
    /// often (and its own, across a round's boundary, one time in n²).
    #[default]
    Shuffled,
    /// Rotated by one every round, as every run before 2026-12-07 night:
    /// of n rows, a row's batch follows the same row's in n − 1 rounds of
    /// n (netboot's the floor's, `--variant-object`'s netboot's), and never
    /// its own, so whatever one row's batch leaves in the caches nearly
    /// always falls on the same next row.
    Rotated,
}

/// The shuffle's seed (any fixed value: runs repeat their order).
const SEED: u64 = 18;

/// The turns of every round of one run, in an [`Order`].
pub struct Turns {
    order: Order,
    rng: fastrand::Rng,
}

impl Turns {
    /// The first round's turns come first.
    pub fn new(order: Order) -> Self {
        Self {
            order,
            rng: fastrand::Rng::with_seed(SEED),
        }
    }

    /// Positions into `lanes` lanes, in the order they take their turns in
    /// round `round` (rounds asked for in order, from 0).
    pub fn of_round(&mut self, round: usize, lanes: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..lanes).collect();
        match self.order {
            Order::Shuffled => self.rng.shuffle(&mut v),
            Order::Rotated => v.rotate_left(round % lanes.max(1)),
        }
        v
    }
}

/// Where in its batches a row's slow connections lie: the first
/// connections of a batch pay for the row switch (the client woken, the
/// caches holding the previous row's work), and a p99 of 1% of
/// 250-connection batches is only 2.5 connections a batch.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Positions {
    /// The head: the first `head` connections of every batch.
    pub head: usize,
    /// The p99 over all connections, µs.
    pub p99: f64,
    /// The p99 without the heads, µs.
    pub p99_without_head: f64,
    /// Of the connections slower than the p99, the share in a head, %.
    pub slow_in_head_pct: f64,
    /// The heads' share of all connections, % (the share above if the
    /// position did not matter).
    pub head_pct: f64,
    /// The median of every batch's first connection, µs.
    pub first_p50: f64,
}

/// [`Positions`] of one row's batches (each in connection order).
pub fn positions(rounds: &[Vec<f64>], head: usize) -> Positions {
    let all: Vec<f64> = rounds.iter().flatten().copied().collect();
    if all.is_empty() {
        return Positions::default();
    }
    let p99 = summarize(&all).p99;
    let rest: Vec<f64> = rounds
        .iter()
        .flat_map(|b| b.iter().skip(head))
        .copied()
        .collect();
    let firsts: Vec<f64> = rounds.iter().filter_map(|b| b.first()).copied().collect();
    let heads = rounds.iter().map(|b| b.len().min(head)).sum::<usize>();
    let slow = all.iter().filter(|x| **x > p99).count();
    let slow_in_head = rounds
        .iter()
        .flat_map(|b| b.iter().take(head))
        .filter(|x| **x > p99)
        .count();
    let pct = |a: usize, b: usize| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    Positions {
        head,
        p99,
        p99_without_head: summarize(&rest).p99,
        slow_in_head_pct: pct(slow_in_head, slow),
        head_pct: pct(heads, all.len()),
        first_p50: summarize(&firsts).p50,
    }
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
    let mut turns = Turns::new(plan.order);
    for r in 0..rounds {
        let count = batch.min(plan.connections - r * batch);
        for k in turns.of_round(r as usize, active.len()) {
            let i = active[k];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// How often each lane's turn follows each lane's (across round
    /// boundaries too), over `rounds` rounds of `lanes` lanes.
    fn predecessors(order: Order, lanes: usize, rounds: usize) -> Vec<Vec<usize>> {
        let mut turns = Turns::new(order);
        let seq: Vec<usize> = (0..rounds).flat_map(|r| turns.of_round(r, lanes)).collect();
        let mut m = vec![vec![0; lanes]; lanes];
        for w in seq.windows(2) {
            m[w[1]][w[0]] += 1;
        }
        m
    }

    #[test]
    fn every_round_is_a_permutation() {
        for order in [Order::Shuffled, Order::Rotated] {
            let mut turns = Turns::new(order);
            for r in 0..50 {
                let mut t = turns.of_round(r, 4);
                t.sort_unstable();
                assert_eq!(t, vec![0, 1, 2, 3], "{order:?} round {r}");
            }
        }
        assert!(Turns::new(Order::Rotated).of_round(0, 0).is_empty());
    }

    #[test]
    fn shuffled_turns_give_every_row_every_predecessor() {
        let (lanes, rounds) = (3, 9_000);
        // Rotated: netboot (lane 1) follows the floor (lane 0) in two
        // rounds of three, never itself: what the shuffle is for.
        let rot = predecessors(Order::Rotated, lanes, rounds);
        assert!(rot[1][0] > rounds * 6 / 10, "{rot:?}");
        assert_eq!(rot[1][1], 0, "{rot:?}");
        // Shuffled: each lane follows each of the other two about equally
        // often (itself only across a round's boundary, about 1 in 9).
        let shuf = predecessors(Order::Shuffled, lanes, rounds);
        for (lane, row) in shuf.iter().enumerate() {
            let others: Vec<usize> = (0..lanes).filter(|p| *p != lane).map(|p| row[p]).collect();
            let (lo, hi) = (others.iter().min(), others.iter().max());
            assert!(
                matches!((lo, hi), (Some(&lo), Some(&hi)) if hi - lo < rounds / 30),
                "lane {lane}: {shuf:?}"
            );
            assert!(
                row[lane] > rounds / 20,
                "lane {lane} never after itself: {shuf:?}"
            );
        }
    }

    #[test]
    fn positions_find_slow_heads() {
        // Two slow heads a batch (10 µs, 9 µs): the p99 is the 9 µs ones,
        // and every connection slower than it is a head.
        let rounds: Vec<Vec<f64>> = (0..100)
            .map(|_| {
                let mut b = vec![1.0; 100];
                b[0] = 10.0;
                b[1] = 9.0;
                b
            })
            .collect();
        let p = positions(&rounds, 2);
        assert_eq!((p.p99, p.p99_without_head), (9.0, 1.0));
        assert_eq!(p.slow_in_head_pct, 100.0);
        assert_eq!(p.first_p50, 10.0);
        assert!((p.head_pct - 2.0).abs() < 1e-9, "{p:?}");
        // The same slow ones in the middle of the batches: none in a head.
        let middle: Vec<Vec<f64>> = rounds
            .iter()
            .map(|b| {
                let mut b = b.clone();
                b.swap(0, 40);
                b.swap(1, 41);
                b
            })
            .collect();
        let p = positions(&middle, 2);
        assert_eq!((p.p99, p.p99_without_head), (9.0, 10.0));
        assert_eq!(p.slow_in_head_pct, 0.0);
        assert_eq!(positions(&[], 3).p99, 0.0);
    }
}
