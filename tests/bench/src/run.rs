//! The whole run: every size, the goals' scenario, then the report files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cleanup::{self, Cgroup};
use crate::goals;
use crate::report::{self, Report, RunConfig};
use crate::settings::{Settings, GOAL_SCENARIO};
use crate::size::{self, Ctx, Scope, TimedOut};
use crate::workload::Workload;
use crate::{machine, plot};

/// Checks what the bench needs before touching anything.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("netboot-bench needs root (BPF, network namespaces, cgroups); euid is {euid}");
    }
    if !Path::new(cleanup::CGROUP_ROOT)
        .join("cgroup.procs")
        .exists()
    {
        bail!("cgroup2 is not mounted at {}", cleanup::CGROUP_ROOT);
    }
    if !netboot_datapath::pins::is_bpffs(Path::new(cleanup::BPFFS_ROOT)) {
        bail!("bpffs is not mounted at {}", cleanup::BPFFS_ROOT);
    }
    for tool in ["ip", "nft"] {
        if std::process::Command::new(tool)
            .arg("-V")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("`{tool}` is required (iproute2, nftables)");
        }
    }
    Ok(())
}

/// Paths of the written results.
pub struct Written {
    /// bench.md
    pub markdown: PathBuf,
    /// bench.json
    pub json: PathBuf,
    /// latency.svg (None: nothing to plot).
    pub svg: Option<PathBuf>,
}

/// Runs every size and returns the report.
pub fn run(s: &Settings) -> Result<Report> {
    let started = Instant::now();
    let mut rep = Report::new(
        machine::probe(s.iptables),
        RunConfig {
            services: s.sizes.clone(),
            endpoints_per_service: s.backends,
            connections: s.connections,
            quick: s.quick,
            ipv6: s.ipv6,
            drain_listeners: s.drain_listeners,
            realtime_clients: s.realtime_clients,
            variant_object: s
                .variant_object
                .as_ref()
                .map(|(p, _)| p.display().to_string()),
            order: s.order,
            client_cpu: s.client_cpu,
            iptables_backend: s.iptables,
            goal_scenario: s.goal_scenario,
        },
    );
    eprintln!(
        "netboot-bench: {} ({} cores), kernel {}, load average {}",
        rep.machine.cpu_model, rep.machine.cores, rep.machine.kernel, rep.machine.loadavg_start
    );
    eprintln!("IPVS: {}", rep.machine.ipvs);
    rep.notes.push(format!("IPVS: {}.", rep.machine.ipvs));

    let agent_bin = if !s.agent {
        rep.notes.push("agent not measured: --no-agent".into());
        None
    } else {
        match crate::agent_run::locate_binary(s.agent_bin.as_deref()) {
            Ok(p) => Some(p),
            Err(e) => {
                let msg = format!("agent not measured: {e:#}");
                eprintln!("{msg}");
                rep.notes.push(msg);
                None
            }
        }
    };
    let run_tag = cleanup::run_tag();
    let plain = Cgroup::new(&format!("{run_tag}/plain"))?;
    let timed_out = TimedOut::default();
    let ctx = Ctx {
        s,
        run_tag: &run_tag,
        plain: &plain,
        agent_bin: agent_bin.as_deref(),
        timed_out: &timed_out,
    };
    for n in &s.sizes {
        let w = Workload::new(*n, s.backends)?;
        size::run(&ctx, &w, Scope::Full, &mut rep)?;
        checkpoint(&mut rep, s, started);
    }
    if let Some((n, b)) = s.goal_scenario {
        let w = Workload::new(n, b)?;
        size::run(&ctx, &w, Scope::ProgrammingOnly, &mut rep)?;
    }
    drop(plain);
    finish(&mut rep, s, started);
    if s.quick {
        rep.notes.push(
            "quick mode: N=1000 only with few connections and repeats; the goals need the full run"
                .into(),
        );
    }
    Ok(rep)
}

/// Load average, duration and goals as of now.
fn finish(rep: &mut Report, s: &Settings, started: Instant) {
    rep.machine.loadavg_end = machine::loadavg();
    rep.duration_s = started.elapsed().as_secs_f64();
    rep.goals = goals::evaluate(rep, s.goal_scenario.unwrap_or(GOAL_SCENARIO));
}

/// Writes what the run has measured so far (a run stopped later keeps the
/// sizes it finished); the final write replaces it.
fn checkpoint(rep: &mut Report, s: &Settings, started: Instant) {
    finish(rep, s, started);
    if let Err(e) = write(rep, &s.out) {
        eprintln!("writing the results so far: {e:#}");
    }
}

/// Writes bench.md, bench.json and latency.svg into `out`.
pub fn write(rep: &Report, out: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let markdown = out.join("bench.md");
    std::fs::write(&markdown, report::markdown(rep))?;
    let json = out.join("bench.json");
    std::fs::write(&json, serde_json::to_string_pretty(rep)? + "\n")?;
    let svg_path = out.join("latency.svg");
    let svg = match plot::write_svg(rep, &svg_path) {
        Ok(()) => Some(svg_path),
        Err(e) => {
            eprintln!("no plot: {e:#}");
            None
        }
    };
    Ok(Written {
        markdown,
        json,
        svg,
    })
}

/// The goals, one line each, for the terminal.
pub fn print_goals(rep: &Report) {
    println!("\nGoals (issues 6, 13 and 18):");
    for g in &rep.goals {
        println!(
            "  {:<12} {}\n               {}",
            g.status.word(),
            g.text,
            g.detail
        );
    }
}
