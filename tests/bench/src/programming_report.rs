//! The programming section's results: JSON (`programming.json`) and the
//! tables a person reads (`programming.md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::machine::Machine;
use crate::programming::{Options, ENDPOINTS, NODES};

/// One proxy at one rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyRow {
    /// Which proxy.
    pub proxy: String,
    /// Observations in its own histogram during the window.
    pub observed: f64,
    /// p50 of its own metric (histogram delta, interpolated), ms.
    pub p50_ms: Option<f64>,
    /// p99 of its own metric, ms.
    pub p99_ms: Option<f64>,
    /// Its histogram's lowest bucket bound, ms (quantiles below it are
    /// interpolated inside that bucket, i.e. bucket-limited).
    pub first_bucket_ms: Option<f64>,
    /// Outside check: API write → first answer from the new backend, ms, sorted.
    pub outside_ms: Vec<f64>,
    /// Their median, ms.
    pub outside_p50_ms: Option<f64>,
    /// Their maximum, ms.
    pub outside_max_ms: Option<f64>,
    /// Samples whose new backend never answered within 60 s.
    pub outside_timeouts: u32,
    /// CPU seconds (its process and its waited-for children) per minute of
    /// the measured window.
    pub cpu_s_per_min: f64,
}

/// One rate at one size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RateRows {
    /// Changes per second asked for.
    pub rate: u32,
    /// Successful writes per second of the window.
    pub achieved: f64,
    /// Successful churn writes.
    pub writes_ok: u64,
    /// Failed churn writes.
    pub writes_failed: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Latest start of a write behind its schedule, ms.
    pub max_late_ms: f64,
    /// Length of the measured window (churn + settle, longer when an
    /// outside-check sample outlasted the churn), s.
    pub measured_s: f64,
    /// Outside-check samples not taken: the earlier ones outlasted the churn.
    pub samples_skipped: u32,
    /// One row per proxy.
    pub proxies: Vec<ProxyRow>,
}

/// One number of Services.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SizeResult {
    /// Services.
    pub services: u32,
    /// Per proxy: seconds from spawn (or from the API growing) until all
    /// Services were programmed.
    pub synced_s: Vec<(String, f64)>,
    /// Proxies that had not programmed all Services after 15 min: left out
    /// of this size's rates (still running, catching up, during them).
    pub not_synced: Vec<String>,
    /// Per rate.
    pub rates: Vec<RateRows>,
}

/// The goal line's verdict (reported, never failed on).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Goal {
    /// The goal.
    pub goal: String,
    /// What was measured against it.
    pub verdict: String,
}

/// The whole section.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// quick or full.
    pub mode: String,
    /// Node objects.
    pub nodes: u32,
    /// Endpoints per Service.
    pub endpoints_per_service: u32,
    /// Churn per rate, s.
    pub window_s: f64,
    /// Outside-check samples per rate.
    pub samples: u32,
    /// Per size.
    pub sizes: Vec<SizeResult>,
    /// The goal line.
    pub goal: Goal,
    /// What the numbers are and are not.
    pub notes: Vec<String>,
    /// What stopped the run early (the sizes before it are complete).
    pub error: Option<String>,
    /// The machine.
    pub machine: Machine,
    /// Run time, s.
    pub duration_s: f64,
}

/// The goal, as issue 15 states it.
pub const GOAL: &str = "netboot p99 < 100 ms at 10k Services and 100 changes/s, and >= 10x below kube-proxy iptables at the same load";

impl Report {
    /// An empty report for `o`.
    pub fn new(o: &Options) -> Self {
        Self {
            mode: if o.quick { "quick" } else { "full" }.into(),
            nodes: NODES,
            endpoints_per_service: ENDPOINTS,
            window_s: o.window.as_secs_f64(),
            samples: o.samples,
            notes: vec![
                "Own metric: each proxy's programming-latency histogram (kube-proxy: kubeproxy_network_programming_duration_seconds; netboot: netboot_datapath_network_programming_duration_seconds{trigger=\"endpointslice\"}), the difference of a scrape before and after the rate (after the settle: a proxy behind the churn catches up first); 'observed' counts its observations (kube-proxy records one per Service per sync, so several changes of one slice between two syncs count once); p50/p99 interpolated linearly inside the bucket as Prometheus' histogram_quantile does.".into(),
                "kube-proxy's buckets start at 0.25 s (0.25, 0.5, 1, then 1 s steps: 2, 3, 4, …): its quantiles below 250 ms are bucket-limited (interpolated between 0 and 0.25 s), not measured. netboot's start at 1 ms.".into(),
                "Outside check: the probe Service (svc-000000, one endpoint, never churned) is moved to another real listener on lo inside each proxy's namespace; a client there (netboot: inside the agent's cgroup) connects to the VIP every ~1 ms; the time is API write → first answer from the new backend, over the samples of that rate.".into(),
                "Churn: one EndpointSlice merge patch per change (one endpoint's address replaced, endpoints.kubernetes.io/last-change-trigger-time = the write time, RFC 3339 with ns), Services in turn on an absolute schedule; 'achieved' = successful writes / (window, or longer when the last write was answered later).".into(),
                "CPU: utime+stime+cutime+cstime of the proxy's process (/proc/PID/stat; kube-proxy's iptables-restore/nft children count once waited for) over the rate's window plus the settle (5 s, then until no histogram grows between two scrapes 2 s apart, at most 60 s more), per minute. Each proxy stands for one node.".into(),
                "One proxy at a time, as on a node: each is started in a fresh namespace once the API holds the size's Services, measured at every rate, and stopped before the next, so it competes for the 2 shared cores only with etcd, the API server and the churn writer (not with the other proxies, as in the runs before 2026-12-02). Rows of one rate therefore come from consecutive windows, not the same one; the load average is reported.".into(),
            ],
            ..Default::default()
        }
        .with_backend(o.iptables)
    }

    fn with_backend(mut self, b: crate::kube_proxy::IptablesBackend) -> Self {
        if b == crate::kube_proxy::IptablesBackend::Legacy {
            self.notes.push("kube-proxy iptables ran on iptables-legacy (`--iptables legacy`: its PATH resolves iptables, iptables-save and iptables-restore to the -legacy programs, as kube-proxy's image wrapper does on a legacy host). On this host's iptables-nft 1.8.9 its first sync at 10k Services x 10 endpoints (109,995 NAT chains, 319,978 NAT rules, one iptables-restore --noflush --counters) had not finished after 15 min (2026-12-02).".into());
        }
        self
    }

    fn row(&self, services: u32, rate: u32, proxy: &str) -> Option<&ProxyRow> {
        self.sizes
            .iter()
            .find(|s| s.services == services)?
            .rates
            .iter()
            .filter(|r| r.rate == rate)
            .flat_map(|r| &r.proxies)
            .find(|p| p.proxy == proxy)
    }

    /// Fills in the goal verdict.
    pub fn finish(&mut self) {
        let (size, judged) = if self
            .sizes
            .iter()
            .any(|s| s.services == 10_000 && !s.rates.is_empty())
        {
            (10_000, true)
        } else {
            (1_000, false)
        };
        let nb = self.row(size, 100, "netboot").and_then(|r| r.p99_ms);
        let ipt = self
            .row(size, 100, "kube-proxy iptables")
            .and_then(|r| r.p99_ms);
        let mut v = format!(
            "at {size} Services and 100 changes/s: netboot p99 {}, kube-proxy iptables p99 {}",
            ms(nb),
            ms(ipt)
        );
        if let (Some(nb), Some(ipt)) = (nb, ipt) {
            let ratio = ipt / nb.max(1e-9);
            let met = nb < 100.0 && ratio >= 10.0;
            let _ = write!(v, " ({ratio:.1}x)");
            if judged {
                let _ = write!(v, ": goal {}", if met { "MET" } else { "NOT MET" });
            }
        }
        if ipt.is_none()
            && self.sizes.iter().any(|s| {
                s.services == size && s.not_synced.iter().any(|p| p == "kube-proxy iptables")
            })
        {
            v.push_str(" (kube-proxy iptables had not programmed all Services after 15 min, so it has no row)");
        }
        if !judged {
            v.push_str(if self.mode == "quick" {
                " — quick mode: the goal is judged in full mode (10k Services)"
            } else {
                " — 10k Services not measured: the goal is not judged"
            });
        }
        self.goal = Goal {
            goal: GOAL.into(),
            verdict: v,
        };
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "–".into(),
    }
}

/// The table of one rate (printed as the run goes).
pub fn rate_table(services: u32, r: &RateRows) -> String {
    let mut out = String::new();
    for p in &r.proxies {
        let _ = writeln!(out, "{}", line(services, r, p));
    }
    out
}

fn line(_services: u32, r: &RateRows, p: &ProxyRow) -> String {
    let outside = match (p.outside_p50_ms, p.outside_max_ms) {
        (Some(a), Some(b)) => format!("{} / {}", ms(Some(a)), ms(Some(b))),
        _ => "–".into(),
    };
    let timeouts = if p.outside_timeouts > 0 {
        format!(" ({} timed out)", p.outside_timeouts)
    } else {
        String::new()
    };
    format!(
        "| {} | {:.1} | {} | {} | {} | {:.0} | {}{} | {:.2} |",
        r.rate,
        r.achieved,
        p.proxy,
        ms(p.p50_ms),
        ms(p.p99_ms),
        p.observed,
        outside,
        timeouts,
        p.cpu_s_per_min
    )
}

/// The markdown page.
pub fn markdown(rep: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Network programming latency: netboot vs the real kube-proxy ({} mode)\n",
        rep.mode
    );
    let _ = writeln!(
        out,
        "{} Node objects, {} endpoints per Service, churn {} s per rate, {} outside-check samples per rate. Machine: {}, {} cores, {} GiB, kernel {}; {}; {}. Load average start {} / end {}. Run {} ({:.0} s).\n",
        rep.nodes,
        rep.endpoints_per_service,
        rep.window_s,
        rep.samples,
        rep.machine.cpu_model,
        rep.machine.cores,
        rep.machine.memory_gib,
        rep.machine.kernel,
        rep.machine.iptables,
        rep.machine.nft,
        rep.machine.loadavg_start,
        rep.machine.loadavg_end,
        rep.machine.date,
        rep.duration_s
    );
    let _ = writeln!(
        out,
        "**Goal**: {}.  \n**Measured**: {}.\n",
        rep.goal.goal, rep.goal.verdict
    );
    if let Some(e) = &rep.error {
        let _ = writeln!(out, "**The run stopped early**: {e}\n");
    }
    for s in &rep.sizes {
        let _ = writeln!(out, "## {} Services\n", s.services);
        let synced: Vec<String> = s
            .synced_s
            .iter()
            .map(|(p, t)| format!("{p} {t:.1} s"))
            .collect();
        let _ = writeln!(
            out,
            "All Services programmed after: {}.\n",
            synced.join(", ")
        );
        if !s.not_synced.is_empty() {
            let _ = writeln!(
                out,
                "Not all Services programmed after 15 min (stopped and left out of this size's rows): {}.\n",
                s.not_synced.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "| rate/s | achieved/s | proxy | p50 (own metric) | p99 (own metric) | observed | outside p50 / max | CPU s/min |"
        );
        let _ = writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|");
        for r in &s.rates {
            for p in &r.proxies {
                let _ = writeln!(out, "{}", line(s.services, r, p));
            }
        }
        out.push('\n');
        for r in &s.rates {
            if r.samples_skipped > 0 {
                let _ = writeln!(
                    out,
                    "- {} changes/s: {} of {} outside-check samples not taken (the earlier ones outlasted the churn; measured window {:.0} s)",
                    r.rate, r.samples_skipped, rep.samples, r.measured_s
                );
            }
            if r.writes_failed > 0 || r.max_late_ms > 1000.0 {
                let _ = writeln!(
                    out,
                    "- {} changes/s: {} writes failed ({}), latest write start {:.0} ms behind schedule",
                    r.rate,
                    r.writes_failed,
                    r.first_error.as_deref().unwrap_or("-"),
                    r.max_late_ms
                );
            }
        }
        out.push('\n');
    }
    let _ = writeln!(out, "## What the numbers are\n");
    for n in &rep.notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

/// Where [`write`] put the files.
pub struct Written {
    /// programming.md.
    pub markdown: PathBuf,
    /// programming.json.
    pub json: PathBuf,
}

/// Writes `programming.json` and `programming.md` into `out`.
pub fn write(rep: &Report, out: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("programming.json");
    let markdown_path = out.join("programming.md");
    std::fs::write(&json, serde_json::to_string_pretty(rep)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&markdown_path, markdown(rep))
        .with_context(|| format!("writing {}", markdown_path.display()))?;
    Ok(Written {
        markdown: markdown_path,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(size: u32, nb: f64, ipt: f64) -> Report {
        let o = Options::new(size == 1_000, 5, PathBuf::from("x"));
        let mut r = Report::new(&o);
        r.sizes.push(SizeResult {
            services: size,
            synced_s: vec![("netboot".into(), 1.0)],
            not_synced: Vec::new(),
            rates: vec![RateRows {
                rate: 100,
                achieved: 99.5,
                proxies: vec![
                    ProxyRow {
                        proxy: "netboot".into(),
                        p99_ms: Some(nb),
                        ..Default::default()
                    },
                    ProxyRow {
                        proxy: "kube-proxy iptables".into(),
                        p99_ms: Some(ipt),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        });
        r.finish();
        r
    }

    #[test]
    fn the_goal_is_judged_only_at_10k() {
        assert!(report(10_000, 20.0, 900.0)
            .goal
            .verdict
            .contains("goal MET"));
        assert!(report(10_000, 200.0, 9000.0)
            .goal
            .verdict
            .contains("NOT MET"));
        let q = report(1_000, 20.0, 900.0);
        assert!(
            q.goal.verdict.contains("judged in full mode"),
            "{}",
            q.goal.verdict
        );
        assert!(markdown(&q).contains("| 100 | 99.5 | netboot |"));
    }
}
