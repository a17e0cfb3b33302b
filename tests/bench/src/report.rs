//! The results of a run (JSON) and their markdown rendering.

use std::fmt::Write as _;

use serde::Serialize;

use crate::goals::Goal;
use crate::kube_proxy::IptablesBackend;
use crate::machine::Machine;
use crate::stats::Summary;
use crate::variant::{Row, Variant};

/// Metric names.
pub mod m {
    /// connect() until established, µs.
    pub const CONNECT: &str = "connect_latency";
    /// Full sync of all Services from empty, ms.
    pub const FULL_SYNC: &str = "full_sync";
    /// One endpoint change, ms.
    pub const CHANGE: &str = "endpoint_change";
    /// netboot: the map syscalls inside one endpoint change, ms.
    pub const CHANGE_MAP_WRITES: &str = "endpoint_change_map_writes";
    /// iptables: kube-proxy ≥ 1.28's partial restore for one endpoint change, ms.
    pub const CHANGE_PARTIAL: &str = "endpoint_change_partial_restore";
    /// nftables: `nft --json list chains ip` (run by kube-proxy every sync), ms.
    pub const LIST_CHAINS: &str = "list_chains";
    /// netboot: building the desired table from Services and EndpointSlices, ms.
    pub const DESIRED_BUILD: &str = "desired_table_build";
    /// Agent spawn → /readyz 200, ms.
    pub const AGENT_READY: &str = "agent_cold_start";
    /// The agent's own first reconcile pass, ms.
    pub const AGENT_RECONCILE: &str = "agent_reconcile_pass";
    /// Parsing the agent's static file (the same loader, in the bench), ms.
    pub const AGENT_PARSE: &str = "agent_static_file_parse";
    /// Agent VmRSS once ready, MiB.
    pub const AGENT_RSS: &str = "agent_rss";
    /// Agent VmHWM (peak RSS), MiB.
    pub const AGENT_HWM: &str = "agent_rss_peak";
}

/// Variant name of the agent rows.
pub const AGENT: &str = "netboot-agent";

/// One measured quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// Services (N).
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints_per_service: u32,
    /// floor, netboot, iptables, nftables or netboot-agent; latency rows
    /// over another family: floor-ipv6, netboot-ipv6, floor-ipv4-mapped,
    /// netboot-ipv4-mapped.
    pub variant: String,
    /// See [`m`].
    pub metric: String,
    /// µs, ms, MiB.
    pub unit: String,
    /// The sample (None: could not be measured, see `note`).
    pub stats: Option<Summary>,
    /// What else a reader must know (failures, caps, counts).
    pub note: String,
}

/// How the run was configured.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    /// N values.
    pub services: Vec<u32>,
    /// Endpoints per Service.
    pub endpoints_per_service: u32,
    /// Measured connections per variant and N.
    pub connections: u32,
    /// Quick mode.
    pub quick: bool,
    /// The IPv6 and IPv4-mapped latency rows were measured.
    pub ipv6: bool,
    /// Listeners accepted between batches only (default; off with `--listeners-accept`).
    pub drain_listeners: bool,
    /// `--realtime-clients`: the latency clients ran under SCHED_FIFO.
    #[serde(default)]
    pub realtime_clients: bool,
    /// `--variant-object`: the file of the other build of the programs,
    /// measured in a row of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_object: Option<String>,
    /// `--order`: the order of the latency rows' turns in a round.
    pub order: crate::latency::Order,
    /// `--client-cpu`: the CPU every latency client was pinned to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu: Option<usize>,
    /// iptables backend of the iptables variant.
    pub iptables_backend: IptablesBackend,
    /// Programming-only scenario for the goals (services, endpoints per service).
    pub goal_scenario: Option<(u32, u32)>,
}

/// Where one latency row's slow connections lie in its batches.
#[derive(Clone, Debug, Serialize)]
pub struct PositionRow {
    /// Services (N).
    pub services: u32,
    /// The row's label.
    pub row: String,
    /// What was found.
    #[serde(flatten)]
    pub at: crate::latency::Positions,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where.
    pub machine: Machine,
    /// How.
    pub config: RunConfig,
    /// What.
    pub metrics: Vec<Metric>,
    /// Issue 13's IPv6 / IPv4-mapped against IPv4 comparisons, with their
    /// 95% intervals (compare.rs).
    pub comparisons: Vec<crate::compare::FamilyComparison>,
    /// Issue 18's P1: netboot over the floor (IPv4), p50 and p99, with their
    /// 95% intervals (compare.rs).
    pub floor_comparisons: Vec<crate::compare::FloorComparison>,
    /// Where each latency row's slow connections lie in its batches.
    pub positions: Vec<PositionRow>,
    /// Against the goals.
    pub goals: Vec<Goal>,
    /// Remarks (IPVS, failed phases).
    pub notes: Vec<String>,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
}

impl Report {
    /// Empty report.
    pub fn new(machine: Machine, config: RunConfig) -> Self {
        Self {
            machine,
            config,
            metrics: Vec::new(),
            comparisons: Vec::new(),
            floor_comparisons: Vec::new(),
            positions: Vec::new(),
            goals: Vec::new(),
            notes: Vec::new(),
            duration_s: 0.0,
        }
    }

    /// Adds a metric.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        services: u32,
        per: u32,
        variant: &str,
        metric: &str,
        unit: &str,
        stats: Option<Summary>,
        note: impl Into<String>,
    ) {
        self.metrics.push(Metric {
            services,
            endpoints_per_service: per,
            variant: variant.into(),
            metric: metric.into(),
            unit: unit.into(),
            stats,
            note: note.into(),
        });
    }

    /// A metric, if measured.
    pub fn get(&self, services: u32, per: u32, variant: &str, metric: &str) -> Option<&Metric> {
        self.metrics.iter().find(|x| {
            x.services == services
                && x.endpoints_per_service == per
                && x.variant == variant
                && x.metric == metric
        })
    }

    /// The sample of a metric, if it has one.
    pub fn stats(&self, services: u32, per: u32, variant: &str, metric: &str) -> Option<Summary> {
        self.get(services, per, variant, metric)
            .and_then(|x| x.stats)
            .filter(|s| s.n > 0)
    }

    /// Distinct (services, endpoints per service) in order of appearance.
    pub fn sizes(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for x in &self.metrics {
            let k = (x.services, x.endpoints_per_service);
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }
}

/// Short number: 3 significant digits, no exponent.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn signed(x: f64) -> String {
    if x.is_finite() && x >= 0.0 {
        format!("+{}", num(x))
    } else {
        num(x)
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The markdown tables (latency, programming, agent, goals).
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let mm = &r.machine;
    let _ = writeln!(o, "# netboot-bench results\n");
    let _ = writeln!(
        o,
        "Machine: {} ({} cores, {} GiB), kernel {}, {} ({} backend), {}. Run {} ({:.0} s{}); load average {} at start, {} at end (the 2 cores are shared with other jobs).\n",
        mm.cpu_model,
        mm.cores,
        mm.memory_gib,
        mm.kernel,
        mm.iptables,
        match r.config.iptables_backend {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        },
        mm.nft,
        mm.date,
        r.duration_s,
        if r.config.quick { ", quick mode" } else { "" },
        mm.loadavg_start,
        mm.loadavg_end
    );
    let _ = writeln!(o, "IPVS: {}.\n", mm.ipvs);

    let sizes = r.sizes();
    let _ = writeln!(
        o,
        "## New-connection latency\n\nconnect() until established, µs; {} connections per row and size, all rows interleaved in batches, {}; clients connect to the last-declared Service (floor: straight to a backend IP).{}{}{}{}{}\n",
        thousands(u64::from(r.config.connections)),
        match r.config.order {
            crate::latency::Order::Shuffled => "the rows' turns in a new random order every round (`--order shuffled`)",
            crate::latency::Order::Rotated => "the rows' turns rotated by one every round (`--order rotated`: a row nearly always follows the same row)",
        },
        if r.config.ipv6 {
            " The IPv6 rows use an AF_INET6 socket and IPv6 addresses (netboot: the Service's IPv6 ClusterIP, its maps holding the IPv6 frontends of all N dual-stack Services); the IPv4-mapped rows an AF_INET6 socket to `::ffff:<IPv4>` (netboot: the IPv4 ClusterIP, served by connect6 from the IPv4 maps). Each row's − floor columns are against the floor of its own family."
        } else {
            ""
        },
        if r.config.realtime_clients {
            " Clients under SCHED_FIFO priority 1 (`--realtime-clients`): no ordinary task preempts a client inside connect()."
        } else {
            ""
        },
        match r.config.client_cpu {
            Some(cpu) => format!(" Clients all pinned to CPU {cpu} (`--client-cpu`)."),
            None => " Clients not pinned (`--client-cpu off`: each row's client where the scheduler puts it).".to_string(),
        },
        {
            let mut s = String::new();
            if let Some(f) = &r.config.variant_object {
                s.push_str(&format!(" `netboot-variant` (`--variant-object {f}`): that build of the programs, loaded into maps and a cgroup of its own holding the same Services, in netboot's namespace."));
            }
            s
        },
        if r.config.drain_listeners {
            " Listeners drained (the default; `--listeners-accept` turns it off): no listener thread accepts while a client is in connect(); each batch's connections are accepted after it."
        } else {
            " Listeners accept as connections come (`--listeners-accept`, issue 6's method): p50 can settle in one of two modes ~5 µs apart (tests/bench/README.md, \"Listener wake-ups\")."
        }
    );
    let _ = writeln!(
        o,
        "| Services | Variant | p50 | p99 | p50 − floor | p99 − floor | Notes |\n|---:|---|---:|---:|---:|---:|---|"
    );
    for (n, b) in &sizes {
        for row in Row::ALL
            .into_iter()
            .chain([Row::v4(Variant::NetbootVariant)])
        {
            let Some(x) = r.get(*n, *b, row.name(), m::CONNECT) else {
                continue;
            };
            let floor = r.stats(*n, *b, row.floor().name(), m::CONNECT);
            let is_floor = row.variant == Variant::Floor;
            let (p50, p99, d50, d99) = match (x.stats, floor) {
                (Some(s), Some(f)) if s.n > 0 => (
                    num(s.p50),
                    num(s.p99),
                    if is_floor {
                        "—".into()
                    } else {
                        signed(s.p50 - f.p50)
                    },
                    if is_floor {
                        "—".into()
                    } else {
                        signed(s.p99 - f.p99)
                    },
                ),
                (Some(s), None) if s.n > 0 => (num(s.p50), num(s.p99), "—".into(), "—".into()),
                _ => ("—".into(), "—".into(), "—".into(), "—".into()),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {p50} | {p99} | {d50} | {d99} | {} |",
                thousands(u64::from(*n)),
                row.label(),
                x.note
            );
        }
    }
    let (variants, families): (Vec<_>, Vec<_>) = r
        .comparisons
        .iter()
        .partition(|c| c.family == crate::size::VARIANT_OBJECT);
    // The cells after the size (and family) columns, alike in both tables.
    let cells = |c: &crate::compare::FamilyComparison| {
        format!(
            "p{} | {} | {} | {} | [{}, {}] | {}",
            c.percentile,
            num(c.added_other),
            num(c.added_ipv4),
            num(c.difference.point),
            num(c.difference.lo),
            num(c.difference.hi),
            c.rounds
        )
    };
    if !variants.is_empty() {
        let _ = writeln!(
            o,
            "\nWhat `--variant-object` changes: the variant build's added latency over the floor minus netboot's (negative: the variant is faster), with a 95% interval from a bootstrap over whole rounds of the interleaving.\n\n| Services | Percentile | added (other) | added (netboot) | difference | 95% interval | rounds |\n|---:|---:|---:|---:|---:|---|---:|"
        );
        for c in &variants {
            let _ = writeln!(o, "| {} | {} |", thousands(u64::from(c.services)), cells(c));
        }
    }
    if !families.is_empty() {
        let _ = writeln!(
            o,
            "\nIPv6 and IPv4-mapped against IPv4 (issue 13): netboot's added latency over the floor of the same family, minus IPv4's, with a 95% interval from a bootstrap over whole rounds of the interleaving (a burst of other work hits one round's batches together, so rounds are resampled, not single connections).\n\n| Services | Family | Percentile | added (other) | added (IPv4) | difference | 95% interval | rounds |\n|---:|---|---:|---:|---:|---:|---|---:|"
        );
        for c in &families {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                thousands(u64::from(c.services)),
                c.family,
                cells(c)
            );
        }
    }

    if !r.floor_comparisons.is_empty() {
        let _ = writeln!(
            o,
            "\nnetboot over the floor (IPv4; issue 18's P1: within 5%), with a 95% interval from the same bootstrap over whole rounds.\n\n| Services | Percentile | netboot (µs) | floor (µs) | over the floor | 95% interval | rounds |\n|---:|---:|---:|---:|---:|---|---:|"
        );
        for c in &r.floor_comparisons {
            let _ = writeln!(
                o,
                "| {} | p{} | {} | {} | {} | {} | {} |",
                thousands(u64::from(c.services)),
                c.percentile,
                num(c.netboot),
                num(c.floor),
                c.over_pct.point_pct(),
                c.over_pct.range_pct(),
                c.rounds
            );
        }
    }

    if !r.positions.is_empty() {
        let _ = writeln!(
            o,
            "\nWhere the slow connections are: a batch's first connections pay for the switch from the row before (its client woken, the caches holding that row's work), and a p99 is decided by one connection in a hundred (2.5 a batch in the full runs' batches of 250). Head = the first {} connections of every batch.\n\n| Services | Row | p99 (µs) | p99 without the heads | over the p99: share in a head | heads' share of all | first connection's p50 (µs) |\n|---:|---|---:|---:|---:|---:|---:|",
            r.positions[0].at.head
        );
        for p in &r.positions {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.1}% | {:.1}% | {} |",
                thousands(u64::from(p.services)),
                p.row,
                num(p.at.p99),
                num(p.at.p99_without_head),
                p.at.slow_in_head_pct,
                p.at.head_pct,
                num(p.at.first_p50)
            );
        }
    }

    let _ = writeln!(
        o,
        "\n## Programming cost\n\nms, p50 / p99 (samples). Full sync: all N Services from empty (netboot: the reconciler into the pinned maps; iptables: iptables-restore of the whole ruleset; nftables: `nft -f` of kube-proxy's whole transaction). Endpoint change: one endpoint of one Service swapped (netboot: the agent's path for one EndpointSlice event: its Service marked dirty, that Service's frontends rebuilt, the reconciler's partial pass writing the difference; iptables: a full iptables-restore as kube-proxy's full sync does, and kube-proxy ≥ 1.28's partial restore; nftables: kube-proxy's incremental transaction). Process start of iptables-restore / nft is included, as kube-proxy forks them too.\n"
    );
    let _ = writeln!(
        o,
        "| Services × endpoints | Variant | Full sync | Endpoint change | Notes |\n|---:|---|---:|---:|---|"
    );
    let cell = |s: Option<Summary>| match s {
        Some(s) if s.n > 0 => format!("{} / {} ({})", num(s.p50), num(s.p99), s.n),
        _ => "—".into(),
    };
    for (n, b) in &sizes {
        for v in [Variant::Netboot, Variant::Iptables, Variant::Nftables] {
            let full = r.get(*n, *b, v.name(), m::FULL_SYNC);
            let change = r.get(*n, *b, v.name(), m::CHANGE);
            if full.is_none() && change.is_none() {
                continue;
            }
            let mut notes: Vec<String> = Vec::new();
            for x in [full, change].into_iter().flatten() {
                if !x.note.is_empty() {
                    notes.push(x.note.clone());
                }
            }
            if v == Variant::Netboot {
                if let Some(x) = r.get(*n, *b, v.name(), m::CHANGE_MAP_WRITES) {
                    notes.push(format!(
                        "endpoint change spent in map syscalls: {}",
                        cell(x.stats)
                    ));
                }
            }
            let extra = match v {
                Variant::Netboot => r.get(*n, *b, v.name(), m::DESIRED_BUILD),
                Variant::Iptables => r.get(*n, *b, v.name(), m::CHANGE_PARTIAL),
                Variant::Nftables => r.get(*n, *b, v.name(), m::LIST_CHAINS),
                Variant::Floor | Variant::NetbootVariant => None,
            };
            if let Some(x) = extra {
                let label = match v {
                    Variant::Netboot => {
                        "desired-table build of a full pass (start, relist, resync)"
                    }
                    Variant::Iptables => "partial restore (kube-proxy ≥ 1.28)",
                    _ => "`nft list chains` kube-proxy runs every sync",
                };
                notes.push(format!("{label}: {}", cell(x.stats)));
            }
            let _ = writeln!(
                o,
                "| {} × {} | {} | {} | {} | {} |",
                thousands(u64::from(*n)),
                b,
                v.name(),
                cell(full.and_then(|x| x.stats)),
                cell(change.and_then(|x| x.stats)),
                notes.join("; ")
            );
        }
    }

    let _ = writeln!(
        o,
        "\n## Agent\n\nThe real `netboot-datapath agent --static-services FILE` binary (Services and EndpointSlices from a file instead of the API server; its own cgroup and pins): cold start = spawn → `/readyz` 200 (programs loaded and attached, file parsed, first reconcile pass written); file parse = the agent's static-file loader on the same file, timed in the bench process (a watch list replaces this part on a real node); first reconcile pass = the `took` of the agent's first \"maps reconciled\" log line; RSS = VmRSS once ready (peak = VmHWM).\n"
    );
    let _ = writeln!(
        o,
        "| Services × endpoints | Cold start (ms) | Of which: file parse (ms) | Of which: first reconcile pass (ms) | VmRSS (MiB) | Peak (MiB) | Notes |\n|---:|---:|---:|---:|---:|---:|---|"
    );
    for (n, b) in &sizes {
        let Some(rss) = r.get(*n, *b, AGENT, m::AGENT_RSS) else {
            continue;
        };
        let one = |metric: &str| {
            r.stats(*n, *b, AGENT, metric)
                .map(|s| num(s.p50))
                .unwrap_or_else(|| "—".into())
        };
        let _ = writeln!(
            o,
            "| {} × {} | {} | {} | {} | {} | {} | {} |",
            thousands(u64::from(*n)),
            b,
            one(m::AGENT_READY),
            one(m::AGENT_PARSE),
            one(m::AGENT_RECONCILE),
            one(m::AGENT_RSS),
            one(m::AGENT_HWM),
            rss.note
        );
    }

    let _ = writeln!(o, "\n## Goals (issues 6, 13 and 18)\n");
    for g in &r.goals {
        let _ = writeln!(o, "- **{}** — {}: {}", g.status.word(), g.text, g.detail);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1234.6), "1235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(signed(3.0), "+3.00");
        assert_eq!(signed(-3.0), "-3.00");
        assert_eq!(thousands(100000), "100,000");
        assert_eq!(thousands(999), "999");
    }

    /// Why: a `--variant-object` run is read for its own table (the
    /// variant against this build); it must not be mixed into issue 13's
    /// family table, whose rows mean something else.
    #[test]
    fn a_variant_comparison_gets_a_table_of_its_own() {
        use crate::compare::{FamilyComparison, Interval};
        let mut r = Report::new(
            Machine::default(),
            RunConfig {
                services: vec![100_000],
                endpoints_per_service: 2,
                connections: 10,
                quick: false,
                ipv6: false,
                drain_listeners: true,
                realtime_clients: true,
                variant_object: Some("t0.o".into()),
                order: crate::latency::Order::Shuffled,
                client_cpu: Some(1),
                iptables_backend: IptablesBackend::Nft,
                goal_scenario: None,
            },
        );
        r.comparisons.push(FamilyComparison {
            services: 100_000,
            family: crate::size::VARIANT_OBJECT.into(),
            percentile: 99.0,
            added_ipv4: 1.5,
            added_other: 0.5,
            difference: Interval {
                point: -1.0,
                lo: -1.4,
                hi: -0.6,
                resamples: 1000,
            },
            rounds: 16000,
        });
        for (row, xs) in [("floor", [20.0, 40.0]), ("netboot-variant", [20.2, 40.5])] {
            r.add(
                100_000,
                2,
                row,
                m::CONNECT,
                "µs",
                Some(crate::stats::summarize(&xs)),
                "",
            );
        }
        let md = markdown(&r);
        assert!(md.contains("| 100,000 | netboot-variant |"), "{md}");
        let at = md
            .find("What `--variant-object` changes")
            .expect("the variant's table");
        assert!(
            md[at..].contains("| 100,000 | p99 | 0.500 | 1.50 | -1.00 | [-1.40, -0.600] | 16000 |"),
            "{md}"
        );
        assert!(md.contains("`--variant-object t0.o`"), "{md}");
        assert!(!md.contains("IPv6 and IPv4-mapped against IPv4"), "{md}");
    }
}
