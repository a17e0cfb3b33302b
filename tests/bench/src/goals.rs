//! The goals, checked against a run's numbers. Nothing fails on a
//! slow machine: each goal is reported met, missed or not measured, with the
//! numbers behind the verdict.

use serde::Serialize;

use crate::report::{m, num, Report, AGENT};
use crate::stats::Summary;
use crate::variant::{Family, Row, Variant};

/// Verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GoalStatus {
    /// The numbers meet it.
    Met,
    /// They do not.
    Missed,
    /// The run did not measure what it needs.
    NotMeasured,
    /// Measured, but the run's 95% interval straddles the goal's line: this
    /// run cannot tell met from missed.
    Undecided,
}

impl GoalStatus {
    /// The word reports use.
    pub fn word(self) -> &'static str {
        match self {
            GoalStatus::Met => "MET",
            GoalStatus::Missed => "MISSED",
            GoalStatus::NotMeasured => "NOT MEASURED",
            GoalStatus::Undecided => "UNDECIDED",
        }
    }
}

/// One goal.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// Short id.
    pub id: &'static str,
    /// The goal, as the issue words it.
    pub text: String,
    /// Verdict.
    pub status: GoalStatus,
    /// The numbers.
    pub detail: String,
}

fn goal(id: &'static str, text: &str, status: GoalStatus, detail: String) -> Goal {
    Goal {
        id,
        text: text.into(),
        status,
        detail,
    }
}

fn met(ok: bool) -> GoalStatus {
    if ok {
        GoalStatus::Met
    } else {
        GoalStatus::Missed
    }
}

/// Percent above the floor.
fn pct(x: f64, floor: f64) -> f64 {
    (x / floor - 1.0) * 100.0
}

/// Sizes and ids of the latency goal "within 5% of the floor".
const P1_SIZES: [(u32, &str); 2] = [(100_000, "latency-100k"), (1_000_000, "latency-1m")];

/// The allowance over the floor: 5%.
const FLOOR_TOLERANCE_PCT: f64 = 5.0;

/// netboot's connect latency at `n` Services within 5% of the floor's, p50
/// and p99. With the run's round-block intervals (compare.rs) the intervals
/// decide: met when both upper ends are within 5%, missed when a lower end
/// is over, undecided otherwise (the shared machine's scheduling moves a
/// p99 by more than 5% between runs; a point estimate would then say met or
/// missed by chance). Without them, the point estimates.
fn within_floor(r: &Report, n: u32, b: u32, id: &'static str) -> Goal {
    let text = format!(
        "netboot at {} services within 5% of the floor (p50 and p99)",
        if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        }
    );
    let nb = Variant::Netboot.name();
    match (
        r.get(n, b, nb, m::CONNECT),
        r.stats(n, b, Variant::Floor.name(), m::CONNECT),
    ) {
        (Some(x), Some(f)) => match x.stats.filter(|s| s.n > 0) {
            Some(s) => {
                let (d50, d99) = (pct(s.p50, f.p50), pct(s.p99, f.p99));
                let intervals: Vec<&crate::compare::FloorComparison> = [50.0, 99.0]
                    .iter()
                    .filter_map(|q| {
                        r.floor_comparisons
                            .iter()
                            .find(|c| c.services == n && c.percentile == *q)
                    })
                    .collect();
                if intervals.len() == 2 {
                    return floor_verdict(id, &text, &intervals, s.n);
                }
                goal(
                    id,
                    &text,
                    met(d50 <= FLOOR_TOLERANCE_PCT && d99 <= FLOOR_TOLERANCE_PCT),
                    format!(
                        "netboot p50 {} µs / p99 {} µs vs floor {} / {} µs ({:+.1}% / {:+.1}%; {} connections)",
                        num(s.p50),
                        num(s.p99),
                        num(f.p50),
                        num(f.p99),
                        d50,
                        d99,
                        s.n
                    ),
                )
            }
            None => goal(
                id,
                &text,
                GoalStatus::Missed,
                format!("netboot not measured at {n}: {}", x.note),
            ),
        },
        _ => goal(
            id,
            &text,
            GoalStatus::NotMeasured,
            format!("the run did not measure latency at {n} services"),
        ),
    }
}

/// [`within_floor`]'s verdict from the p50 and p99 intervals.
fn floor_verdict(
    id: &'static str,
    text: &str,
    cs: &[&crate::compare::FloorComparison],
    connections: usize,
) -> Goal {
    use crate::compare::Against;
    let sides: Vec<Against> = cs
        .iter()
        .map(|c| c.over_pct.against(FLOOR_TOLERANCE_PCT))
        .collect();
    let status = if sides.contains(&Against::Over) {
        GoalStatus::Missed
    } else if sides.iter().all(|a| *a == Against::Within) {
        GoalStatus::Met
    } else {
        GoalStatus::Undecided
    };
    let cells: Vec<String> = cs
        .iter()
        .zip(&sides)
        .map(|(c, a)| {
            format!(
                "p{} netboot {} µs vs floor {} µs: {}, 95% interval {} over {} rounds ({})",
                c.percentile,
                num(c.netboot),
                num(c.floor),
                c.over_pct.point_pct(),
                c.over_pct.range_pct(),
                c.rounds,
                match a {
                    Against::Within => "within 5% at 95%",
                    Against::Over => "over 5% at 95%",
                    Against::Straddles => "the interval straddles 5%",
                }
            )
        })
        .collect();
    goal(
        id,
        text,
        status,
        format!(
            "{}; {connections} connections. The intervals decide (a bootstrap over whole rounds of the interleaving): met when both are within 5%, missed when one is over, undecided when one straddles",
            cells.join("; ")
        ),
    )
}

/// One endpoint change at 1M Services under 1 ms p99 (netboot; the agent's
/// watch path, as at every size).
fn change_at_1m(r: &Report, b: u32) -> Goal {
    let n = 1_000_000;
    let text = "one endpoint change at 1M services programmed in under 1 ms p99";
    let nb = Variant::Netboot.name();
    match r.stats(n, b, nb, m::CHANGE) {
        Some(c) => {
            let maps = r
                .stats(n, b, nb, m::CHANGE_MAP_WRITES)
                .map(|x| {
                    format!(
                        "; in map syscalls p50 {} / p99 {} ms",
                        num(x.p50),
                        num(x.p99)
                    )
                })
                .unwrap_or_default();
            goal(
                "endpoint-change-1m",
                text,
                met(c.p99 < 1.0),
                format!(
                    "netboot p99 {} ms (p50 {} ms, {} changes at {n} services x {b}){maps}",
                    num(c.p99),
                    num(c.p50),
                    c.n
                ),
            )
        }
        None => goal(
            "endpoint-change-1m",
            text,
            GoalStatus::NotMeasured,
            format!("the run did not measure an endpoint change at {n} services x {b}"),
        ),
    }
}

/// Evaluates every goal. `scenario` is the (services, endpoints per service)
/// of the goals' programming scenario (10k × 10 = 100k endpoints).
pub fn evaluate(r: &Report, scenario: (u32, u32)) -> Vec<Goal> {
    let b = r.config.endpoints_per_service;
    let nb = Variant::Netboot.name();
    let fl = Variant::Floor.name();
    let ipt = Variant::Iptables.name();
    let mut out = Vec::new();

    // 1a. netboot at 100k and at 1M within 5% of the floor (issues 6, 18).
    for (n, id) in P1_SIZES {
        out.push(within_floor(r, n, b, id));
    }

    // 1b. added p99 at 10k at least 10x lower than iptables'.
    let text =
        "netboot's added p99 latency at 10k services at least 10x lower than iptables mode's";
    match (
        r.stats(10_000, b, nb, m::CONNECT),
        r.stats(10_000, b, ipt, m::CONNECT),
        r.stats(10_000, b, fl, m::CONNECT),
    ) {
        (Some(n), Some(i), Some(f)) => {
            let (an, ai) = (n.p99 - f.p99, i.p99 - f.p99);
            let ok = ai > 0.0 && an * 10.0 <= ai;
            let ratio = if an > 0.0 {
                format!("{:.1}x lower", ai / an)
            } else {
                "netboot adds nothing measurable".into()
            };
            out.push(goal(
                "added-p99-10k",
                text,
                met(ok),
                format!(
                    "added p99 over the floor ({} µs): netboot {} µs, iptables {} µs ({ratio})",
                    num(f.p99),
                    num(an),
                    num(ai)
                ),
            ));
        }
        _ => out.push(goal(
            "added-p99-10k",
            text,
            GoalStatus::NotMeasured,
            "the run did not measure latency at 10,000 services".into(),
        )),
    }

    // 2. one endpoint change at 10k / 100k endpoints.
    let text = "one endpoint change at 10k services / 100k endpoints programmed in under 5 ms p99, at least 100x faster than iptables mode's restore";
    let (sn, sb) = scenario;
    let at = if r.stats(sn, sb, nb, m::CHANGE).is_some() {
        Some((sn, sb, String::new()))
    } else if r.stats(10_000, b, nb, m::CHANGE).is_some() {
        Some((
            10_000,
            b,
            format!(" (measured at 10k × {b} endpoints, not 100k: the goal scenario did not run)"),
        ))
    } else {
        None
    };
    match at {
        Some((n, per, caveat)) => {
            let c = r.stats(n, per, nb, m::CHANGE);
            let i = r.stats(n, per, ipt, m::CHANGE);
            match (c, i) {
                (Some(c), Some(i)) => {
                    let ratio = i.p50 / c.p99;
                    out.push(goal(
                        "endpoint-change-10k",
                        text,
                        met(c.p99 < 5.0 && ratio >= 100.0),
                        format!(
                            "netboot p99 {} ms (p50 {} ms, {} changes); iptables full restore p50 {} ms: {:.0}x (iptables p50 over netboot p99){caveat}",
                            num(c.p99),
                            num(c.p50),
                            c.n,
                            num(i.p50),
                            ratio
                        ),
                    ));
                }
                (Some(c), None) => out.push(goal(
                    "endpoint-change-10k",
                    text,
                    met(c.p99 < 5.0),
                    format!(
                        "netboot p99 {} ms; the iptables restore was not measured{caveat}",
                        num(c.p99)
                    ),
                )),
                _ => out.push(goal(
                    "endpoint-change-10k",
                    text,
                    GoalStatus::NotMeasured,
                    "no endpoint-change numbers".into(),
                )),
            }
        }
        None => out.push(goal(
            "endpoint-change-10k",
            text,
            GoalStatus::NotMeasured,
            "the run did not include 10,000 services".into(),
        )),
    }

    // 2b. one endpoint change at 1M Services (issue 18).
    out.push(change_at_1m(r, b));

    // 3. cold start and RSS at 10k / 100k endpoints.
    let text = "cold start with 10k services / 100k endpoints fully programmed in under 1 s, agent RSS under 64 MiB";
    let at = if r.get(sn, sb, AGENT, m::AGENT_RSS).is_some() {
        Some((sn, sb, String::new()))
    } else if r.get(10_000, b, AGENT, m::AGENT_RSS).is_some() {
        Some((
            10_000,
            b,
            format!(" (measured at 10k × {b} endpoints, not 100k: the goal scenario did not run)"),
        ))
    } else {
        None
    };
    match at {
        Some((n, per, caveat)) => {
            let ready = r.stats(n, per, AGENT, m::AGENT_READY);
            let rss = r.stats(n, per, AGENT, m::AGENT_RSS);
            let hwm = r.stats(n, per, AGENT, m::AGENT_HWM);
            let recon = r.stats(n, per, AGENT, m::AGENT_RECONCILE);
            let parse = r.stats(n, per, AGENT, m::AGENT_PARSE);
            let inproc = r.stats(n, per, nb, m::FULL_SYNC);
            match (ready, rss) {
                (Some(rd), Some(rs)) => out.push(goal(
                    "cold-start-10k",
                    text,
                    met(rd.p50 < 1000.0 && rs.p50 < 64.0),
                    format!(
                        "agent ready {} ms after spawn (of which static-file parse {} ms, first reconcile pass {} ms; the reconciler alone into empty maps p50 {} ms), VmRSS {} MiB (peak {} MiB){caveat}",
                        num(rd.p50),
                        parse.map(|s| num(s.p50)).unwrap_or_else(|| "—".into()),
                        recon.map(|s| num(s.p50)).unwrap_or_else(|| "—".into()),
                        inproc.map(|s| num(s.p50)).unwrap_or_else(|| "—".into()),
                        num(rs.p50),
                        hwm.map(|s| num(s.p50)).unwrap_or_else(|| "—".into()),
                    ),
                )),
                (None, Some(rs)) => out.push(goal(
                    "cold-start-10k",
                    text,
                    GoalStatus::Missed,
                    format!(
                        "the agent did not get ready: {}; VmRSS {} MiB{caveat}",
                        r.get(n, per, AGENT, m::AGENT_RSS)
                            .map(|x| x.note.clone())
                            .unwrap_or_default(),
                        num(rs.p50)
                    ),
                )),
                _ => out.push(goal(
                    "cold-start-10k",
                    text,
                    GoalStatus::NotMeasured,
                    "the agent was not measured".into(),
                )),
            }
        }
        None => out.push(goal(
            "cold-start-10k",
            text,
            GoalStatus::NotMeasured,
            "the run did not start the agent with 10,000 services".into(),
        )),
    }
    out.push(ipv6_goal(r, b));
    out
}

/// compare.rs's name of a family.
fn fam_key(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
        Family::Ipv4Mapped => "ipv4-mapped",
    }
}

/// Sizes of the IPv6 goal.
const IPV6_SIZES: [u32; 2] = [1_000, 10_000];
/// The tolerance: 5%.
const IPV6_TOLERANCE: f64 = 0.05;

/// Issue 13: netboot's added latency (over the floor of the same family)
/// over IPv6 and IPv4-mapped against IPv4's, at 1k and 10k Services, p50
/// and p99. Met when, for every size measured, family and percentile, the
/// added latency exceeds IPv4's by at most 5% of netboot's IPv4 latency
/// (`added_x − added_v4 ≤ 0.05 · netboot_v4`): the added latencies
/// themselves are about a microsecond, and 5% of that (50 ns) is far below
/// what two shared cores resolve. Their plain ratio is in the detail too.
fn ipv6_goal(r: &Report, b: u32) -> Goal {
    let text = "IPv6 and IPv4-mapped added latency within 5% of IPv4's (netboot, over the floor of the same family, 1k and 10k services, p50 and p99)";
    let get = |n: u32, row: Row| r.stats(n, b, row.name(), m::CONNECT);
    let nb = |f: Family| Row {
        variant: Variant::Netboot,
        family: f,
    };
    let mut parts: Vec<String> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut ok = true;
    let mut measured = 0;
    for n in IPV6_SIZES {
        let (Some(n4), Some(f4)) = (
            get(n, Row::v4(Variant::Netboot)),
            get(n, Row::v4(Variant::Floor)),
        ) else {
            continue;
        };
        for fam in [Family::Ipv6, Family::Ipv4Mapped] {
            let row = nb(fam);
            let (Some(nx), Some(fx)) = (get(n, row), get(n, row.floor())) else {
                let why = r
                    .get(n, b, row.name(), m::CONNECT)
                    .map(|x| x.note.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "not measured".into());
                missing.push(format!("{} at {n}: {why}", row.label()));
                continue;
            };
            measured += 1;
            let mut cells: Vec<String> = Vec::new();
            for (p, pick) in [
                ("p50", (|s: Summary| s.p50) as fn(Summary) -> f64),
                ("p99", |s: Summary| s.p99),
            ] {
                let (a4, ax) = (pick(n4) - pick(f4), pick(nx) - pick(fx));
                let allowed = IPV6_TOLERANCE * pick(n4);
                let within = ax - a4 <= allowed;
                ok &= within;
                let q = if p == "p50" { 50.0 } else { 99.0 };
                let interval = r
                    .comparisons
                    .iter()
                    .find(|c| c.services == n && c.family == fam_key(fam) && c.percentile == q)
                    .map(|c| {
                        let d = c.difference;
                        let verdict = if d.hi <= allowed {
                            "within at 95%"
                        } else if d.lo > allowed {
                            "over at 95%"
                        } else {
                            "the interval straddles the allowance"
                        };
                        format!(
                            "; difference 95% interval [{}, {}] µs over {} rounds: {verdict}",
                            num(d.lo),
                            num(d.hi),
                            c.rounds
                        )
                    })
                    .unwrap_or_default();
                cells.push(
                    format!(
                        "{p} +{} vs +{} µs ({}{}; allowed +{} µs{interval})",
                        num(ax),
                        num(a4),
                        if a4 > 0.0 {
                            format!("{:.2}x", ax / a4)
                        } else {
                            "IPv4 adds nothing measurable".into()
                        },
                        if within { "" } else { ", over" },
                        num(allowed),
                    )
                    .replace("+-", "-"),
                );
            }
            parts.push(format!("{} at {n}: {}", row.label(), cells.join(", ")));
        }
    }
    let mut detail = parts.join("; ");
    if !missing.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&missing.join("; "));
    }
    if measured == 0 {
        return goal(
            "ipv6-added-latency",
            text,
            GoalStatus::NotMeasured,
            if detail.is_empty() {
                "the run measured no IPv6 or IPv4-mapped rows at 1,000 or 10,000 services".into()
            } else {
                detail
            },
        );
    }
    detail.push_str(". Criterion: the added latency (over the floor of the same family) exceeds IPv4's by at most 5% of netboot's IPv4 latency (the point estimate from all rounds decides; the 95% interval, a bootstrap over whole rounds, says how sure this run is)");
    goal(
        "ipv6-added-latency",
        text,
        met(ok && missing.is_empty()),
        detail,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_proxy::IptablesBackend;
    use crate::machine::Machine;
    use crate::report::RunConfig;
    use crate::stats::summarize;

    fn report() -> Report {
        Report::new(
            Machine::default(),
            RunConfig {
                services: vec![10_000, 100_000],
                endpoints_per_service: 2,
                connections: 10,
                quick: false,
                ipv6: true,
                drain_listeners: false,
                realtime_clients: false,
                variant_object: None,
                order: crate::latency::Order::Shuffled,
                client_cpu: None,
                iptables_backend: IptablesBackend::Nft,
                goal_scenario: Some((10_000, 10)),
            },
        )
    }

    fn add(r: &mut Report, n: u32, b: u32, v: &str, metric: &str, xs: &[f64], note: &str) {
        r.add(n, b, v, metric, "x", Some(summarize(xs)), note);
    }

    #[test]
    fn verdicts_follow_the_numbers() {
        let mut r = report();
        add(&mut r, 10_000, 2, "floor", m::CONNECT, &[50.0, 60.0], "");
        add(&mut r, 10_000, 2, "netboot", m::CONNECT, &[51.0, 61.0], "");
        add(
            &mut r,
            10_000,
            2,
            "iptables",
            m::CONNECT,
            &[150.0, 200.0],
            "",
        );
        add(&mut r, 100_000, 2, "floor", m::CONNECT, &[50.0, 60.0], "");
        add(&mut r, 100_000, 2, "netboot", m::CONNECT, &[51.0, 64.0], "");
        add(&mut r, 1_000_000, 2, "floor", m::CONNECT, &[50.0, 60.0], "");
        add(
            &mut r,
            1_000_000,
            2,
            "netboot",
            m::CONNECT,
            &[51.0, 61.0],
            "",
        );
        add(&mut r, 1_000_000, 2, "netboot", m::CHANGE, &[0.1, 0.9], "");
        add(&mut r, 10_000, 10, "netboot", m::CHANGE, &[0.1, 0.2], "");
        add(
            &mut r,
            10_000,
            10,
            "iptables",
            m::CHANGE,
            &[900.0, 1000.0],
            "",
        );
        add(&mut r, 10_000, 10, AGENT, m::AGENT_READY, &[1500.0], "");
        add(&mut r, 10_000, 10, AGENT, m::AGENT_RSS, &[40.0], "");
        let g = evaluate(&r, (10_000, 10));
        let by = |id: &str| g.iter().find(|x| x.id == id).map(|x| x.status);
        // p99 +6.7% over the floor at 100k; +1.7% / +1.7% at 1M.
        assert_eq!(by("latency-100k"), Some(GoalStatus::Missed), "{g:?}");
        assert_eq!(by("latency-1m"), Some(GoalStatus::Met), "{g:?}");
        assert_eq!(by("endpoint-change-1m"), Some(GoalStatus::Met), "{g:?}");
        assert_eq!(by("added-p99-10k"), Some(GoalStatus::Met));
        assert_eq!(by("endpoint-change-10k"), Some(GoalStatus::Met));
        assert_eq!(by("cold-start-10k"), Some(GoalStatus::Missed));
        assert_eq!(by("ipv6-added-latency"), Some(GoalStatus::NotMeasured));
    }

    #[test]
    fn ipv6_goal_compares_added_latencies() {
        // The IPv4-mapped pair, adding +1 µs as IPv4 does.
        let add_mapped = |r: &mut Report| {
            add(
                r,
                1_000,
                2,
                "floor-ipv4-mapped",
                m::CONNECT,
                &[20.0, 60.0],
                "",
            );
            add(
                r,
                1_000,
                2,
                "netboot-ipv4-mapped",
                m::CONNECT,
                &[21.0, 61.0],
                "",
            );
        };
        let mut r = report();
        for (v, xs) in [
            ("floor", [20.0, 60.0]),
            ("netboot", [21.0, 61.0]),
            ("floor-ipv6", [22.0, 62.0]),
            ("netboot-ipv6", [23.5, 63.0]),
            ("floor-ipv4-mapped", [21.0, 61.0]),
            ("netboot-ipv4-mapped", [22.0, 62.0]),
        ] {
            add(&mut r, 10_000, 2, v, m::CONNECT, &xs, "");
        }
        let g = ipv6_goal(&r, 2);
        // IPv6 adds +1.5 (p50) against IPv4's +1.0: 0.5 ≤ 5% of 21.
        assert_eq!(g.status, GoalStatus::Met, "{g:?}");
        assert!(g.detail.contains("netboot IPv6 at 10000"), "{}", g.detail);
        add(&mut r, 1_000, 2, "floor", m::CONNECT, &[20.0, 60.0], "");
        add(&mut r, 1_000, 2, "netboot", m::CONNECT, &[21.0, 61.0], "");
        add(
            &mut r,
            1_000,
            2,
            "floor-ipv6",
            m::CONNECT,
            &[20.0, 60.0],
            "",
        );
        add(
            &mut r,
            1_000,
            2,
            "netboot-ipv6",
            m::CONNECT,
            &[24.0, 61.0],
            "",
        );
        add_mapped(&mut r);
        // IPv6 at 1k adds +4 against +1: 3 > 5% of 21.
        let g = ipv6_goal(&r, 2);
        assert_eq!(g.status, GoalStatus::Missed, "{g:?}");
        assert!(g.detail.contains(", over"), "{}", g.detail);
        // A row that could not be measured is a miss, with its reason.
        let mut r = report();
        add(&mut r, 1_000, 2, "floor", m::CONNECT, &[20.0, 60.0], "");
        add(&mut r, 1_000, 2, "netboot", m::CONNECT, &[21.0, 61.0], "");
        r.add(
            1_000,
            2,
            "netboot-ipv6",
            m::CONNECT,
            "µs",
            None,
            "not measured: no ids",
        );
        add_mapped(&mut r);
        let g = ipv6_goal(&r, 2);
        assert_eq!(g.status, GoalStatus::Missed, "{g:?}");
        assert!(g.detail.contains("no ids"), "{}", g.detail);
    }

    #[test]
    fn floor_intervals_decide_met_missed_or_undecided() {
        use crate::compare::over_floor;
        // Rows in rounds: `per` connections per batch around `base` µs.
        let rows = |base: f64, bursts: &[usize]| -> Vec<Vec<f64>> {
            (0..30)
                .map(|r| {
                    (0..100)
                        .map(|i| {
                            let x = base + (i * 37 % 100) as f64 / 100.0;
                            if bursts.contains(&r) && i < 15 {
                                x + 40.0
                            } else {
                                x
                            }
                        })
                        .collect()
                })
                .collect()
        };
        let run = |nb: Vec<Vec<f64>>, fl: Vec<Vec<f64>>| {
            let mut r = report();
            // Point estimates that alone would say met.
            add(&mut r, 100_000, 2, "floor", m::CONNECT, &[50.0, 60.0], "");
            add(&mut r, 100_000, 2, "netboot", m::CONNECT, &[51.0, 61.0], "");
            for q in [50.0, 99.0] {
                r.floor_comparisons
                    .extend(over_floor(100_000, &nb, &fl, q, 400));
            }
            within_floor(&r, 100_000, 2, "latency-100k")
        };
        let g = run(rows(10.2, &[]), rows(10.0, &[]));
        assert_eq!(g.status, GoalStatus::Met, "{g:?}");
        assert!(g.detail.contains("within 5% at 95%"), "{}", g.detail);
        // 20% over the floor at p50: missed, whatever the p99 says.
        let g = run(rows(12.0, &[]), rows(10.0, &[]));
        assert_eq!(g.status, GoalStatus::Missed, "{g:?}");
        assert!(g.detail.contains("over 5% at 95%"), "{}", g.detail);
        // Bursts in a few rounds of each row set both p99s: undecided.
        let g = run(rows(10.1, &[2, 9, 17]), rows(10.0, &[5, 21]));
        assert_eq!(g.status, GoalStatus::Undecided, "{g:?}");
        assert!(g.detail.contains("straddles"), "{}", g.detail);
        assert_eq!(GoalStatus::Undecided.word(), "UNDECIDED");
    }

    #[test]
    fn missing_sizes_are_not_measured() {
        let g = evaluate(&report(), (10_000, 10));
        assert!(
            g.iter().all(|x| x.status == GoalStatus::NotMeasured),
            "{g:?}"
        );
        assert_eq!(g.len(), 7);
    }
}
