//! Agent cold start from a real watch list (issue 18, P3):
//! `netboot-bench coldstart-api`.
//!
//! The private control plane of the programming section (etcd +
//! kube-apiserver, 1,000 Node objects), N Services of 10 endpoints each
//! created through the API. Then the real `netboot-datapath agent` is
//! started again and again in its own namespace (API through the harness's
//! relay, its socket LB on a cgroup of this run, fresh pins each time): the
//! time from spawn until `/readyz` answers 200 with all N Services
//! programmed — the agent lists Services and EndpointSlices, writes the
//! maps and attaches — and its VmRSS then (and VmHWM, the peak).
//!
//! Several agent binaries (`--agent-bin`, repeatable: e.g. the last
//! release and this build) are measured side by side, alternating, on the
//! same API state: the machine is shared and noisy, so only a comparison
//! in one run means something.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cleanup::TmpDir;
use crate::programming::{self, ENDPOINTS, NODES};
use netboot_datapath::lean::{LeanService, LeanSlice};
use netboot_datapath::listwatch::{self, Encoding, Listable};
use netboot_datapath::startup::Startup;
use netboot_harness::controlplane::ControlPlane;

/// How long a start is polled every 5 ms (every 25 ms after).
const POLL_FINE_FOR: Duration = Duration::from_secs(2);

/// Longest a start may take.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How the objects get into the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Created through the API server, as a controller would.
    #[default]
    Api,
    /// Written into its etcd as the API server stores them
    /// ([`programming::grow_in_etcd`]): the API server's create path is
    /// O(Services) per Service (its ClusterIP allocator counts every
    /// IPAddress after each allocation), so 100k Services take hours to
    /// create on two cores. The agent's lists still come from the API
    /// server's watch cache.
    Etcd,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How the objects get into the API.
    pub fill: Fill,
    /// Numbers of Services, ascending (the API grows from one to the next).
    pub sizes: Vec<u32>,
    /// (label, binary) of each agent measured.
    pub agents: Vec<(String, PathBuf)>,
    /// Starts per agent and size.
    pub repeats: u32,
}

/// One start.
#[derive(Clone, Debug, Serialize)]
pub struct Start {
    /// Milliseconds from spawn to ready with every Service programmed.
    pub ready_ms: f64,
    /// The agent's CPU time until then (utime+stime, and its waited-for
    /// children's), ms: what the start cost, far less at the mercy of the
    /// machine's other tenants than the wall-clock time.
    #[serde(default)]
    pub cpu_ms: f64,
    /// VmRSS at that moment, MiB.
    pub rss_mib: f64,
    /// VmHWM at that moment, MiB.
    pub hwm_mib: f64,
    /// Of the VmRSS: anonymous memory (heap, stacks), MiB.
    #[serde(default)]
    pub anon_mib: f64,
    /// Of the VmRSS: file pages (the binary's and libraries' code and data
    /// as far as they were touched), MiB.
    #[serde(default)]
    pub file_mib: f64,
    /// The agent's own account of its start (`/v1/status` `startup`;
    /// None from an agent that predates it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
}

/// One agent at one size.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Services.
    pub services: u32,
    /// The agent's label.
    pub agent: String,
    /// Every start, in order.
    pub starts: Vec<Start>,
    /// Why a start failed, if one did.
    pub error: Option<String>,
}

/// The section's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// How the objects got into the API.
    pub fill: Fill,
    /// Rows, by size then agent.
    pub rows: Vec<Row>,
    /// Seconds the API took to hold each size's objects.
    pub api_fill_s: Vec<(u32, f64)>,
    /// The lists alone, by encoding and page size.
    pub lists: Vec<ListCost>,
    /// Wall time, s.
    pub duration_s: f64,
}

/// One way of listing, timed alone (in this process, one list at a time).
#[derive(Clone, Debug, Serialize)]
pub struct ListCost {
    /// Services in the API.
    pub services: u32,
    /// "protobuf" or "json".
    pub encoding: &'static str,
    /// Objects per page.
    pub page: u32,
    /// Milliseconds to list every Service, each time.
    pub services_ms: Vec<f64>,
    /// Milliseconds to list every EndpointSlice, each time.
    pub slices_ms: Vec<f64>,
}

/// Lists every `K` in pages of `limit` the agent's way; milliseconds.
async fn list_ms<K: Listable>(c: &kube::Client, enc: Encoding, limit: u32) -> Result<f64> {
    let t = Instant::now();
    let mut token = None;
    loop {
        let p = listwatch::page::<K>(c, enc, limit, token).await?;
        anyhow::ensure!(
            p.protobuf == (enc == Encoding::Protobuf),
            "the API server answered in another encoding than asked for"
        );
        token = p.continue_token;
        if token.is_none() {
            return Ok(t.elapsed().as_secs_f64() * 1e3);
        }
    }
}

/// The agent's two lists alone, through its own list code (fetch and
/// decode, no stores): JSON against protobuf, pages of 500 (kube-runtime's
/// default) and of the agent's 5,000, alternated, 3 times each.
async fn list_costs(c: &kube::Client, n: u32) -> Result<Vec<ListCost>> {
    let mut out: Vec<ListCost> = Vec::new();
    let ways = [Encoding::Json, Encoding::Protobuf];
    for enc in ways {
        for page in [500, 5000] {
            out.push(ListCost {
                services: n,
                encoding: if enc == Encoding::Json {
                    "json"
                } else {
                    "protobuf"
                },
                page,
                services_ms: Vec::new(),
                slices_ms: Vec::new(),
            });
        }
    }
    for _ in 0..3 {
        for (i, row) in out.iter_mut().enumerate() {
            let enc = ways[i / 2];
            row.services_ms
                .push(list_ms::<LeanService>(c, enc, row.page).await?);
            row.slices_ms
                .push(list_ms::<LeanSlice>(c, enc, row.page).await?);
        }
    }
    Ok(out)
}

/// (VmRSS, VmHWM, RssAnon, RssFile) of a process, MiB.
fn status_mib(pid: u32) -> (f64, f64, f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (
        get("VmRSS:"),
        get("VmHWM:"),
        get("RssAnon:"),
        get("RssFile:"),
    )
}

fn one_start(
    cp: &ControlPlane,
    dir: &Path,
    tag: &str,
    bin: &Path,
    n: u32,
    max: u32,
) -> Result<Start> {
    let mut r = programming::start_agent(cp, dir, tag, bin, max)?;
    // From spawn, as the static-file bench (`agent_run`): the bench's own
    // namespace, relay, cgroup and pins come before it.
    let t = r.spawned;
    loop {
        crate::cleanup::check_stop()?;
        if let Some(st) = r.exited() {
            anyhow::bail!(
                "the agent exited ({st}); see {}",
                dir.join("agent.log").display()
            );
        }
        if r.programmed()? >= n as usize {
            let ready_ms = t.elapsed().as_secs_f64() * 1000.0;
            let cpu_ms = programming::cpu_seconds(r.pid).map_or(f64::NAN, |s| s * 1000.0);
            let (rss_mib, hwm_mib, anon_mib, file_mib) = status_mib(r.pid);
            let startup = r
                .get("/v1/status")
                .and_then(|(c, b)| (c == 200).then_some(b))
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|mut v| serde_json::from_value::<Startup>(v["startup"].take()).ok())
                .filter(|s| s.synced_ms.is_some());
            return Ok(Start {
                ready_ms,
                cpu_ms,
                rss_mib,
                hwm_mib,
                anon_mib,
                file_mib,
                startup,
            });
        }
        if t.elapsed() > READY_TIMEOUT {
            anyhow::bail!("not ready with {n} Services after {READY_TIMEOUT:?}");
        }
        // Finely at first (a 10k start takes ~1 s), then less often: each
        // poll costs the bench CPU on the two cores the agent starts on.
        let poll = if t.elapsed() < POLL_FINE_FOR { 5 } else { 25 };
        std::thread::sleep(Duration::from_millis(poll));
    }
}

/// Runs the section.
pub fn run(o: &Options) -> Result<Report> {
    let started = Instant::now();
    let tag = crate::cleanup::run_tag();
    let dir = TmpDir::new(&format!("{tag}-cs"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    eprintln!("coldstart-api: starting etcd and kube-apiserver");
    let cp = rt
        .block_on(ControlPlane::start(
            dir.path(),
            crate::workload::SERVICE_CIDR,
        ))
        .context("private control plane")?;
    rt.block_on(programming::prepare(&cp))?;
    let state: programming::State = std::sync::Arc::default();
    let max = o.sizes.iter().copied().max().unwrap_or(1_000);
    let mut report = Report {
        fill: o.fill,
        ..Report::default()
    };
    let mut created = 0;
    for &n in &o.sizes {
        let t = Instant::now();
        match o.fill {
            Fill::Api => rt.block_on(programming::grow(&cp, &state, created, n))?,
            Fill::Etcd => rt.block_on(programming::grow_in_etcd(&cp, &state, created, n))?,
        }
        created = n;
        let fill = t.elapsed().as_secs_f64();
        eprintln!("coldstart-api: {n} Services x {ENDPOINTS} endpoints in the API in {fill:.1} s");
        report.api_fill_s.push((n, fill));
        match rt.block_on(list_costs(&cp.client, n)) {
            Ok(mut v) => report.lists.append(&mut v),
            Err(e) => eprintln!("coldstart-api: timing the lists alone failed: {e:#}"),
        }
        let mut rows: Vec<Row> = o
            .agents
            .iter()
            .map(|(label, _)| Row {
                services: n,
                agent: label.clone(),
                starts: Vec::new(),
                error: None,
            })
            .collect();
        for rep in 0..o.repeats {
            // Alternate the order, so neither binary always starts second.
            let order: Vec<usize> = if rep % 2 == 0 {
                (0..o.agents.len()).collect()
            } else {
                (0..o.agents.len()).rev().collect()
            };
            for i in order {
                let (label, bin) = &o.agents[i];
                if rows[i].error.is_some() {
                    continue;
                }
                match one_start(&cp, dir.path(), &tag, bin, n, max) {
                    Ok(s) => {
                        eprintln!(
                            "coldstart-api: {n} Services, {label}: ready in {:.0} ms, VmRSS {:.1} MiB (peak {:.1})",
                            s.ready_ms, s.rss_mib, s.hwm_mib
                        );
                        rows[i].starts.push(s);
                    }
                    Err(e) => rows[i].error = Some(format!("{e:#}")),
                }
            }
        }
        report.rows.extend(rows);
    }
    drop(cp);
    report.duration_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Agent cold start from a real watch list\n\n{NODES} Node objects, {ENDPOINTS} endpoints per Service, {}; each start: spawn until /readyz is 200 with every Service programmed (lists, map writes, attach), the agent's CPU time until then (utime+stime: on a shared machine far steadier than the wall clock), VmRSS then (and of it anonymous and file pages), VmHWM (peak). Median of the starts (min–max).\n",
        match r.fill {
            Fill::Api => "created through a private kube-apiserver",
            Fill::Etcd => "written into a private kube-apiserver's etcd as it stores them (its create path is quadratic in Services) and listed from its watch cache",
        }
    );
    let _ = writeln!(
        out,
        "| Services | agent | starts | ready ms | CPU ms | VmRSS MiB | of it anon / file | peak MiB |\n|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.rows {
        let v = |f: fn(&Start) -> f64| -> Vec<f64> { row.starts.iter().map(f).collect() };
        let cell = |xs: Vec<f64>| {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.0} ({:.0}–{:.0})", median(xs), lo, hi)
        };
        if row.starts.is_empty() {
            let _ = writeln!(
                out,
                "| {} | {} | 0 | {} | | | | |",
                row.services,
                row.agent,
                row.error.as_deref().unwrap_or("no start")
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {} |",
            row.services,
            row.agent,
            row.starts.len(),
            cell(v(|s| s.ready_ms)),
            cell(v(|s| s.cpu_ms)),
            cell(v(|s| s.rss_mib)),
            median(v(|s| s.anon_mib)),
            median(v(|s| s.file_mib)),
            cell(v(|s| s.hwm_mib)),
        );
        if let Some(e) = &row.error {
            let _ = writeln!(out, "\n{}: {e}\n", row.agent);
        }
    }
    let phases: Vec<&Row> = r
        .rows
        .iter()
        .filter(|row| !row.starts.is_empty() && row.starts.iter().all(|s| s.startup.is_some()))
        .collect();
    if !phases.is_empty() {
        let _ = writeln!(
            out,
            "\nWhere the start went, from the agent's own `/v1/status` `startup` (ms since the agent began, median of the starts; the lists and the Node read run at once, so these are points on one time line):\n\n| Services | agent | datapath installed | Services listed | EndpointSlices listed | Node read | per-packet path | first pass began | synced |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in phases {
            let m = |f: fn(&Startup) -> Option<u64>| -> String {
                let xs: Vec<f64> = row
                    .starts
                    .iter()
                    .filter_map(|s| s.startup.as_ref().and_then(f))
                    .map(|v| v as f64)
                    .collect();
                if xs.is_empty() {
                    "–".into()
                } else {
                    format!("{:.0}", median(xs))
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.services,
                row.agent,
                m(|s| s.datapath_installed_ms),
                m(|s| s.services_listed_ms),
                m(|s| s.endpoint_slices_listed_ms),
                m(|s| s.node_read_ms),
                m(|s| s.per_packet_ms),
                m(|s| s.first_pass_ms),
                m(|s| s.synced_ms),
            );
        }
    }
    if !r.lists.is_empty() {
        let _ = writeln!(
            out,
            "\nThe two lists alone, through the agent's list code in the bench process (fetch and decode; one list at a time, so the API server has a core to itself), ms, median of 3:\n\n| Services | encoding | page | Services | EndpointSlices |\n|---:|---|---:|---:|---:|"
        );
        for l in &r.lists {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} |",
                l.services,
                l.encoding,
                l.page,
                median(l.services_ms.clone()),
                median(l.slices_ms.clone())
            );
        }
    }
    for (n, s) in &r.api_fill_s {
        let how = match r.fill {
            Fill::Api => "through the API",
            Fill::Etcd => "through etcd",
        };
        let _ = writeln!(out, "\nAPI filled with {n} Services {how} in {s:.1} s.");
    }
    let _ = writeln!(out, "\nRun took {:.0} s.", r.duration_s);
    out
}

/// Writes `coldstart-api.md` and `.json` under `out`.
pub fn write(r: &Report, out: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md = out.join("coldstart-api.md");
    let js = out.join("coldstart-api.json");
    std::fs::write(&md, markdown(r)).with_context(|| format!("writing {}", md.display()))?;
    std::fs::write(&js, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", js.display()))?;
    Ok((md, js))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_agent_and_size_with_median_and_range() {
        let s = |ms: f64| Start {
            ready_ms: ms,
            cpu_ms: ms * 1.5,
            rss_mib: 40.0,
            hwm_mib: 50.0,
            anon_mib: 30.0,
            file_mib: 10.0,
            startup: Some(Startup {
                datapath_installed_ms: Some(ms as u64 / 10),
                services_listed_ms: Some(ms as u64 / 2),
                synced_ms: Some(ms as u64 - 5),
                ..Default::default()
            }),
        };
        let r = Report {
            fill: Fill::Etcd,
            rows: vec![
                Row {
                    services: 10_000,
                    agent: "new".into(),
                    starts: vec![s(900.0), s(700.0), s(800.0)],
                    error: None,
                },
                Row {
                    services: 10_000,
                    agent: "old".into(),
                    starts: vec![],
                    error: Some("not ready".into()),
                },
            ],
            api_fill_s: vec![(10_000, 61.0)],
            lists: vec![ListCost {
                services: 10_000,
                encoding: "protobuf",
                page: 5000,
                services_ms: vec![90.0, 120.0, 100.0],
                slices_ms: vec![200.0, 180.0, 400.0],
            }],
            duration_s: 100.0,
        };
        let md = markdown(&r);
        assert!(
            md.contains(
                "| 10000 | new | 3 | 800 (700–900) | 1200 (1050–1350) | 40 (40–40) | 30.0 / 10.0 | 50 (50–50) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 10000 | old | 0 | not ready | | | | |"),
            "{md}"
        );
        // The agent's own account: medians, – for a step none reported.
        assert!(
            md.contains("| 10000 | new | 80 | 400 | – | – | – | – | 795 |"),
            "{md}"
        );
        assert_eq!(md.matches("| 10000 | old |").count(), 1, "{md}");
        // How the objects got in.
        assert!(
            md.contains("written into a private kube-apiserver's etcd"),
            "{md}"
        );
        assert!(
            md.contains("API filled with 10000 Services through etcd in 61.0 s."),
            "{md}"
        );
        // The lists alone: medians.
        assert!(
            md.contains("| 10000 | protobuf | 5000 | 100 | 200 |"),
            "{md}"
        );
    }
}
