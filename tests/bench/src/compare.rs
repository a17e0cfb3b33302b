//! How sure a run is of a difference between latency rows: a round-block
//! bootstrap over the interleaved batches.
//!
//! The rows of the latency phase are measured in rounds (every row one batch
//! per round, order rotated), so a burst of other work on the shared cores
//! lands on the batches of one round. Resampling whole rounds (with
//! replacement, every row's batch of a round together) keeps that pairing
//! and that correlation, which resampling single connections would break and
//! so understate the spread. The statistic compared is the issue-13 one:
//! netboot's added latency (over the floor of the same family) for another
//! family minus IPv4's, at a percentile.

use serde::Serialize;

/// One row's connect() times in µs, batch by batch (index = round).
pub type Rounds = [Vec<f64>];

/// The four rows of one comparison.
pub struct Quad<'a> {
    /// netboot IPv4.
    pub nb4: &'a Rounds,
    /// floor IPv4.
    pub fl4: &'a Rounds,
    /// netboot over the other family.
    pub nbx: &'a Rounds,
    /// floor over the other family.
    pub flx: &'a Rounds,
}

/// A point estimate with its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Interval {
    /// From all rounds.
    pub point: f64,
    /// 2.5th percentile of the bootstrap distribution.
    pub lo: f64,
    /// 97.5th percentile.
    pub hi: f64,
    /// Resamples drawn.
    pub resamples: u32,
}

/// The issue-13 comparison of one family at one size and percentile.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyComparison {
    /// Services (N).
    pub services: u32,
    /// `ipv6` or `ipv4-mapped`.
    pub family: String,
    /// 50 or 99.
    pub percentile: f64,
    /// netboot's added latency over IPv4 (µs, all rounds).
    pub added_ipv4: f64,
    /// netboot's added latency over the other family (µs, all rounds).
    pub added_other: f64,
    /// `added_other − added_ipv4`, with its interval.
    pub difference: Interval,
    /// Rounds the rows had in common.
    pub rounds: usize,
}

/// `q`-th percentile (nearest rank, as stats.rs) of `v`, reordering it.
fn percentile_in_place(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * v.len() as f64).ceil() as usize;
    let k = rank.clamp(1, v.len()) - 1;
    let (_, x, _) = v.select_nth_unstable_by(k, f64::total_cmp);
    *x
}

/// Percentile of the batches `pick` selects (with repetition).
fn percentile_of(rows: &Rounds, pick: &[usize], q: f64, buf: &mut Vec<f64>) -> f64 {
    buf.clear();
    for &i in pick {
        buf.extend_from_slice(&rows[i]);
    }
    percentile_in_place(buf, q)
}

/// xorshift64*: deterministic, so a report can be recomputed exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// The 95% interval of `stat` over `resamples` draws of `rounds` whole
/// rounds with replacement (`stat` gets the rounds drawn); NaN ends without
/// draws.
fn bootstrap(
    rounds: usize,
    resamples: u32,
    seed: u64,
    mut stat: impl FnMut(&[usize]) -> f64,
) -> (f64, f64) {
    let mut rng = Rng(seed);
    let mut pick = vec![0usize; rounds];
    let mut draws: Vec<f64> = Vec::with_capacity(resamples as usize);
    for _ in 0..resamples {
        for p in pick.iter_mut() {
            *p = rng.below(rounds);
        }
        draws.push(stat(&pick));
    }
    if draws.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (
            percentile_in_place(&mut draws, 2.5),
            percentile_in_place(&mut draws, 97.5),
        )
    }
}

/// `(added_x, added_4)` at `q` over the rounds `pick`.
fn added(quad: &Quad<'_>, pick: &[usize], q: f64, buf: &mut Vec<f64>) -> (f64, f64) {
    let nb4 = percentile_of(quad.nb4, pick, q, buf);
    let fl4 = percentile_of(quad.fl4, pick, q, buf);
    let nbx = percentile_of(quad.nbx, pick, q, buf);
    let flx = percentile_of(quad.flx, pick, q, buf);
    (nbx - flx, nb4 - fl4)
}

/// The comparison at percentile `q` with `resamples` bootstrap draws;
/// None when the rows share no round.
pub fn compare(
    services: u32,
    family: &str,
    quad: &Quad<'_>,
    q: f64,
    resamples: u32,
) -> Option<FamilyComparison> {
    let rounds = [quad.nb4, quad.fl4, quad.nbx, quad.flx]
        .iter()
        .map(|r| r.len())
        .min()
        .unwrap_or(0);
    if rounds == 0 {
        return None;
    }
    let all: Vec<usize> = (0..rounds).collect();
    let mut buf = Vec::new();
    let (ax, a4) = added(quad, &all, q, &mut buf);
    let seed = 0x9E37_79B9_7F4A_7C15 ^ u64::from(services) ^ (q as u64) << 40;
    let (lo, hi) = bootstrap(rounds, resamples, seed, |pick| {
        let (x, f) = added(quad, pick, q, &mut buf);
        x - f
    });
    Some(FamilyComparison {
        services,
        family: family.to_string(),
        percentile: q,
        added_ipv4: a4,
        added_other: ax,
        difference: Interval {
            point: ax - a4,
            lo,
            hi,
            resamples,
        },
        rounds,
    })
}

/// Issue 18's P1 at one size and percentile: netboot's latency over the
/// floor's (IPv4 rows), in percent, with its 95% interval.
#[derive(Clone, Debug, Serialize)]
pub struct FloorComparison {
    /// Services (N).
    pub services: u32,
    /// 50 or 99.
    pub percentile: f64,
    /// netboot's percentile, µs (all rounds).
    pub netboot: f64,
    /// The floor's, µs (all rounds).
    pub floor: f64,
    /// `100 × (netboot / floor − 1)`, with its interval.
    pub over_pct: Interval,
    /// Rounds the rows had in common.
    pub rounds: usize,
}

/// Where an interval lies against an allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Against {
    /// Its upper end is within the allowance.
    Within,
    /// Its lower end is over it.
    Over,
    /// It straddles the allowance: this run cannot tell.
    Straddles,
}

impl Interval {
    /// The point estimate of a percentage, signed: `+6.2%`.
    pub fn point_pct(&self) -> String {
        format!("{:+.1}%", self.point)
    }

    /// The interval of a percentage: `[-0.3%, +14.5%]`.
    pub fn range_pct(&self) -> String {
        format!("[{:+.1}%, {:+.1}%]", self.lo, self.hi)
    }

    /// Where the interval lies against `allowed` (a NaN end straddles).
    pub fn against(&self, allowed: f64) -> Against {
        if self.hi <= allowed {
            Against::Within
        } else if self.lo > allowed {
            Against::Over
        } else {
            Against::Straddles
        }
    }
}

/// netboot's `q`-th percentile over the floor's, in percent, with a 95%
/// interval from `resamples` draws of whole rounds (both rows' batches of a
/// round together, as in [`compare`]); None when the rows share no round.
pub fn over_floor(
    services: u32,
    netboot: &Rounds,
    floor: &Rounds,
    q: f64,
    resamples: u32,
) -> Option<FloorComparison> {
    let rounds = netboot.len().min(floor.len());
    if rounds == 0 {
        return None;
    }
    let mut buf = Vec::new();
    let over = |pick: &[usize], buf: &mut Vec<f64>| {
        let nb = percentile_of(netboot, pick, q, buf);
        let fl = percentile_of(floor, pick, q, buf);
        (nb, fl, (nb / fl - 1.0) * 100.0)
    };
    let all: Vec<usize> = (0..rounds).collect();
    let (nb, fl, point) = over(&all, &mut buf);
    let seed = 0x2545_F491_4F6C_DD1D ^ u64::from(services) ^ (q as u64) << 40;
    let (lo, hi) = bootstrap(rounds, resamples, seed, |pick| over(pick, &mut buf).2);
    Some(FloorComparison {
        services,
        percentile: q,
        netboot: nb,
        floor: fl,
        over_pct: Interval {
            point,
            lo,
            hi,
            resamples,
        },
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(rounds: usize, per: usize, base: f64, jitter: f64, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng(seed);
        (0..rounds)
            .map(|_| {
                (0..per)
                    .map(|_| base + jitter * rng.below(1000) as f64 / 1000.0)
                    .collect()
            })
            .collect()
    }

    /// The comparison at `q` of IPv4 rows `nb4` and another family's
    /// `nbx`, both over the same floor `fl`.
    fn against_floor(fl: &Rounds, nb4: &Rounds, nbx: &Rounds, q: f64) -> FamilyComparison {
        let quad = Quad {
            nb4,
            fl4: fl,
            nbx,
            flx: fl,
        };
        compare(1000, "ipv6", &quad, q, 300).expect("rounds")
    }

    #[test]
    fn a_real_difference_is_outside_the_interval_of_zero() {
        let fl = rows(40, 100, 10.0, 2.0, 1);
        let nb4 = rows(40, 100, 11.0, 2.0, 2);
        let nbx = rows(40, 100, 14.0, 2.0, 3);
        let c = against_floor(&fl, &nb4, &nbx, 50.0);
        assert!((c.difference.point - 3.0).abs() < 0.3, "{c:?}");
        assert!(c.difference.lo > 2.0 && c.difference.hi < 4.0, "{c:?}");
        assert_eq!(c.rounds, 40);
    }

    #[test]
    fn no_difference_gives_an_interval_around_zero() {
        let fl = rows(40, 100, 10.0, 2.0, 4);
        let nb4 = rows(40, 100, 11.0, 2.0, 5);
        let nbx = rows(40, 100, 11.0, 2.0, 6);
        let c = against_floor(&fl, &nb4, &nbx, 99.0);
        assert!(c.difference.lo <= 0.0 && c.difference.hi >= 0.0, "{c:?}");
    }

    #[test]
    fn one_slow_round_widens_the_interval() {
        let fl = rows(40, 100, 10.0, 2.0, 7);
        let nb4 = rows(40, 100, 11.0, 2.0, 8);
        let mut nbx = rows(40, 100, 11.0, 2.0, 9);
        let calm = against_floor(&fl, &nb4, &nbx, 99.0);
        // A burst of other work during one batch of one row.
        for x in nbx[7].iter_mut().take(60) {
            *x += 50.0;
        }
        let burst = against_floor(&fl, &nb4, &nbx, 99.0);
        assert!(
            burst.difference.hi - burst.difference.lo > calm.difference.hi - calm.difference.lo,
            "{calm:?} {burst:?}"
        );
        assert!(burst.difference.lo <= 1.0, "{burst:?}");
    }

    #[test]
    fn over_the_floor_is_a_percentage_with_an_interval_that_can_decide() {
        // 2% over the floor, tight: within a 5% allowance at 95%.
        let fl = rows(40, 200, 10.0, 1.0, 11);
        let nb = rows(40, 200, 10.2, 1.0, 12);
        let c = over_floor(100_000, &nb, &fl, 50.0, 400).expect("rounds");
        assert!((c.over_pct.point - 2.0).abs() < 1.0, "{c:?}");
        assert_eq!(c.over_pct.against(5.0), Against::Within, "{c:?}");
        assert_eq!(c.rounds, 40);
        // 20% over: over the allowance at 95%.
        let nb = rows(40, 200, 12.0, 1.0, 13);
        let c = over_floor(100_000, &nb, &fl, 99.0, 400).expect("rounds");
        assert!(c.over_pct.lo > 5.0, "{c:?}");
        assert_eq!(c.over_pct.against(5.0), Against::Over, "{c:?}");
    }

    #[test]
    fn slow_rounds_leave_the_floor_comparison_undecided() {
        // 3% over, but a few rounds of each row hit by bursts of other
        // work: the p99 is set by the bursts, and the interval straddles.
        let fl = rows(30, 100, 10.0, 1.0, 14);
        let mut nb = rows(30, 100, 10.3, 1.0, 15);
        let mut fl = fl;
        for r in [2usize, 9, 17] {
            for x in nb[r].iter_mut().take(15) {
                *x += 40.0;
            }
        }
        for r in [5usize, 21] {
            for x in fl[r].iter_mut().take(15) {
                *x += 30.0;
            }
        }
        let c = over_floor(100_000, &nb, &fl, 99.0, 400).expect("rounds");
        assert_eq!(c.over_pct.against(5.0), Against::Straddles, "{c:?}");
        assert!(c.over_pct.hi - c.over_pct.lo > 10.0, "{c:?}");
    }

    #[test]
    fn no_rounds_no_comparison() {
        let empty: Vec<Vec<f64>> = Vec::new();
        let some = rows(3, 10, 1.0, 1.0, 10);
        let q = Quad {
            nb4: &some,
            fl4: &some,
            nbx: &empty,
            flx: &some,
        };
        assert!(compare(1000, "ipv6", &q, 50.0, 10).is_none());
        assert!(over_floor(1000, &some, &empty, 50.0, 10).is_none());
    }
}
