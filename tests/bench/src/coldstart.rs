//! `netboot-bench coldstart` (issue 18): only the agent's cold start and
//! RSS ([`crate::agent_run`]), at the sizes given, for one agent binary or
//! two side by side (a base build and the current one, starts alternated so
//! both see the same machine load).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent_run::{self, AgentResult};
use crate::cleanup::{self, Netns};
use crate::workload::Workload;

/// What `coldstart` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// (Services, endpoints per Service), in order.
    pub sizes: Vec<(u32, u32)>,
    /// Agent starts per binary and size.
    pub repeats: u32,
    /// The binaries, each with its label: the current one first.
    pub agents: Vec<(String, PathBuf)>,
    /// How long one start may take to get ready.
    pub timeout: Duration,
}

/// Parses `10000x10`.
pub fn parse_size(s: &str) -> Result<(u32, u32)> {
    let (n, b) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("{s}: expected SERVICESxENDPOINTS, e.g. 10000x10"))?;
    let n: u32 = n.trim().parse().with_context(|| format!("{s}: services"))?;
    let b: u32 = b
        .trim()
        .parse()
        .with_context(|| format!("{s}: endpoints"))?;
    Workload::new(n, b)?;
    Ok((n, b))
}

/// The starts of one binary at one size.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Services.
    pub n: u32,
    /// Endpoints per Service.
    pub b: u32,
    /// The binary's label.
    pub agent: String,
    /// Every start.
    pub runs: Vec<AgentResult>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

impl Row {
    fn med(&self, f: impl Fn(&AgentResult) -> Option<f64>) -> Option<f64> {
        median(self.runs.iter().filter_map(f).collect())
    }
    /// Median spawn → ready, ms.
    pub fn ready_ms(&self) -> Option<f64> {
        self.med(|r| r.ready_ms)
    }
    /// Median VmRSS once ready, MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        self.med(|r| r.ready_ms.map(|_| r.rss_mib))
    }
}

/// Runs every size: per repeat, each binary once, in turn.
pub fn run(o: &Options) -> Result<Vec<Row>> {
    if o.agents.is_empty() {
        bail!("no agent binary");
    }
    let tag = cleanup::run_tag();
    let mut rows = Vec::new();
    for &(n, b) in &o.sizes {
        let w = Workload::new(n, b)?;
        let rules_ns = Netns::new(&format!("{tag}-cs{n}x{b}"))?;
        let mut these: Vec<Row> = o
            .agents
            .iter()
            .map(|(label, _)| Row {
                n,
                b,
                agent: label.clone(),
                runs: Vec::new(),
            })
            .collect();
        for rep in 0..o.repeats {
            for (i, (label, bin)) in o.agents.iter().enumerate() {
                cleanup::check_stop()?;
                let r = agent_run::run(bin, &w, &tag, &rules_ns, o.timeout)?;
                eprintln!(
                    "{n}x{b} {label} #{}: ready {} ms, first pass {} ms, VmRSS {:.1} MiB (peak {:.1}){}",
                    rep + 1,
                    r.ready_ms.map_or("—".into(), |v| format!("{v:.0}")),
                    r.reconcile_ms.map_or("—".into(), |v| format!("{v:.0}")),
                    r.rss_mib,
                    r.hwm_mib,
                    r.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
                these[i].runs.push(r);
            }
        }
        rows.extend(these);
        drop(rules_ns);
    }
    Ok(rows)
}

/// The rows as a markdown table (medians over the starts).
pub fn markdown(rows: &[Row]) -> String {
    let f = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.0}"));
    let f1 = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1}"));
    let mut s = String::from(
        "| Services × endpoints | Agent | Starts | Cold start (ms) | File parse, in the bench (ms) | First reconcile pass (ms) | VmRSS (MiB) | Peak (MiB) | Goal (< 1000 ms, < 64 MiB) |\n|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let ready = r.ready_ms();
        let rss = r.rss_mib();
        let goal = match (ready, rss) {
            (Some(t), Some(m)) if t < 1000.0 && m < 64.0 => "met",
            (Some(_), Some(_)) => "missed",
            _ => "not ready",
        };
        let _ = writeln!(
            s,
            "| {} × {} | {} | {} | {} | {} | {} | {} | {} | {goal} |",
            r.n,
            r.b,
            r.agent,
            r.runs.len(),
            f(ready),
            f(r.med(|x| Some(x.parse_ms))),
            f(r.med(|x| x.reconcile_ms)),
            f1(rss),
            f1(r.med(|x| x.ready_ms.map(|_| x.hwm_mib))),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_are_bounded() {
        assert_eq!(parse_size("10000x10").unwrap(), (10_000, 10));
        assert_eq!(parse_size("100000X10").unwrap(), (100_000, 10));
        assert!(parse_size("10000").is_err());
        assert!(parse_size("0x10").is_err());
    }

    #[test]
    fn the_table_shows_medians_and_the_goal() {
        let run = |ready: f64, rss: f64| AgentResult {
            ready_ms: Some(ready),
            rss_mib: rss,
            hwm_mib: rss,
            ..Default::default()
        };
        let rows = vec![
            Row {
                n: 10_000,
                b: 10,
                agent: "current".into(),
                runs: vec![run(700.0, 50.0), run(650.0, 51.0), run(900.0, 52.0)],
            },
            Row {
                n: 10_000,
                b: 10,
                agent: "base".into(),
                runs: vec![run(1500.0, 120.0)],
            },
        ];
        let md = markdown(&rows);
        assert!(md.contains("| 10000 × 10 | current | 3 | 700 |"), "{md}");
        assert!(md.contains("| 51.0 | 51.0 | met |"), "{md}");
        assert!(
            md.contains("| base | 1 | 1500 |") && md.contains("missed"),
            "{md}"
        );
    }
}
