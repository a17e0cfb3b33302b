//! `netboot-bench`: see the crate README (tests/bench/README.md).

use std::process::ExitCode;

use clap::Parser;
use netboot_bench::args::{
    Cli, Cmd, ColdstartApiArgs, ColdstartArgs, FlowsArgs, NorthsouthArgs, ProgrammingArgs,
};
use netboot_bench::{cleanup, client, probe, programming, programming_report};
use netboot_bench::{report, run, settings::Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let exit = |what: &str, r: anyhow::Result<()>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netboot-bench {what}: {e:#}");
            ExitCode::FAILURE
        }
    };
    match &cli.cmd {
        Some(Cmd::Client) => return exit("client", client::child_main()),
        Some(Cmd::Probe(a)) => {
            return exit(
                "probe",
                probe::child_main(
                    a.target,
                    a.want,
                    std::time::Duration::from_millis(a.timeout_ms),
                ),
            )
        }
        Some(Cmd::Programming(a)) => {
            let r = programming_section(a);
            if r.is_err() {
                cleanup::cleanup_all();
            }
            return exit("programming", r);
        }
        Some(Cmd::Flows(a)) => {
            let r = flows_section(a);
            if r.is_err() {
                cleanup::cleanup_all();
            }
            return exit("flows", r);
        }
        Some(Cmd::ColdstartApi(a)) => {
            let r = coldstart_api_section(a);
            if r.is_err() {
                cleanup::cleanup_all();
            }
            return exit("coldstart-api", r);
        }
        Some(Cmd::Coldstart(a)) => {
            let r = coldstart_section(a);
            if r.is_err() {
                cleanup::cleanup_all();
            }
            return exit("coldstart", r);
        }
        Some(Cmd::Northsouth(a)) => {
            let r = northsouth_section(a);
            if r.is_err() {
                cleanup::cleanup_all();
            }
            return exit("northsouth", r);
        }
        None => {}
    }
    match bench(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netboot-bench: {e:#}");
            cleanup::cleanup_all();
            ExitCode::FAILURE
        }
    }
}

fn bench(cli: &Cli) -> anyhow::Result<()> {
    let settings = Settings::from_cli(cli)?;
    run::preflight()?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let rep = run::run(&settings)?;
    let written = run::write(&rep, &settings.out)?;
    println!("{}", report::markdown(&rep));
    run::print_goals(&rep);
    println!("\nwrote {}", written.markdown.display());
    println!("wrote {}", written.json.display());
    if let Some(svg) = &written.svg {
        println!("wrote {}", svg.display());
    }
    println!("took {:.0} s", rep.duration_s);
    Ok(())
}

fn programming_section(a: &ProgrammingArgs) -> anyhow::Result<()> {
    run::preflight()?;
    let agent = netboot_bench::agent_run::locate_binary(a.agent_bin.as_deref())?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let mut o = programming::Options::new(a.quick, a.samples, agent);
    o.iptables = a.iptables;
    let rep = programming::run(&o, &mut |r| {
        programming_report::write(r, &a.out).map(|_| ())
    })?;
    let written = programming_report::write(&rep, &a.out)?;
    println!("{}", programming_report::markdown(&rep));
    println!("wrote {}", written.markdown.display());
    println!("wrote {}", written.json.display());
    if let Some(e) = &rep.error {
        anyhow::bail!("stopped early: {e}");
    }
    Ok(())
}

fn flows_section(a: &FlowsArgs) -> anyhow::Result<()> {
    use netboot_bench::flows_cost;
    run::preflight()?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let o = flows_cost::Options {
        services: a.services,
        endpoints: 2,
        connections: a.connections,
        batch: 500,
        flood_s: a.flood_seconds,
        cold_kib: a.cold_kib.clone(),
        cold_connections: a.cold_connections,
    };
    let rep = flows_cost::run(&o)?;
    let (md, js) = flows_cost::write(&rep, &a.out)?;
    println!("{}", flows_cost::markdown(&rep));
    println!("wrote {}", md.display());
    println!("wrote {}", js.display());
    Ok(())
}

fn coldstart_api_section(a: &ColdstartApiArgs) -> anyhow::Result<()> {
    use netboot_bench::coldstart_api;
    run::preflight()?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let mut agents = Vec::new();
    for spec in &a.agents {
        let Some((label, path)) = spec.split_once('=') else {
            anyhow::bail!("--agent {spec}: expected LABEL=PATH");
        };
        let path = std::path::PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "--agent {spec}: {} is not a file",
            path.display()
        );
        agents.push((label.to_string(), path));
    }
    if agents.is_empty() {
        agents.push((
            "this".to_string(),
            netboot_bench::agent_run::locate_binary(None)?,
        ));
    }
    let o = coldstart_api::Options {
        fill: a.fill,
        sizes: a.services.clone(),
        agents,
        repeats: a.repeats.max(1),
    };
    let rep = coldstart_api::run(&o)?;
    let (md, js) = coldstart_api::write(&rep, &a.out)?;
    println!("{}", coldstart_api::markdown(&rep));
    println!("wrote {}", md.display());
    println!("wrote {}", js.display());
    Ok(())
}

fn coldstart_section(a: &ColdstartArgs) -> anyhow::Result<()> {
    use netboot_bench::coldstart;
    run::preflight()?;
    let agent = netboot_bench::agent_run::locate_binary(a.agent_bin.as_deref())?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let mut agents = vec![("current".to_string(), agent)];
    if let Some(b) = &a.base_bin {
        agents.push(("base".to_string(), b.clone()));
    }
    let o = coldstart::Options {
        sizes: a
            .sizes
            .iter()
            .map(|s| coldstart::parse_size(s))
            .collect::<anyhow::Result<_>>()?,
        repeats: a.repeats.max(1),
        agents,
        timeout: std::time::Duration::from_secs(a.timeout_s),
    };
    let rows = coldstart::run(&o)?;
    println!("{}", coldstart::markdown(&rows));
    Ok(())
}

fn northsouth_section(a: &NorthsouthArgs) -> anyhow::Result<()> {
    use netboot_bench::{northsouth, northsouth_report};
    run::preflight()?;
    let agent = netboot_bench::agent_run::locate_binary(a.agent_bin.as_deref())?;
    cleanup::install_signal_handler()?;
    cleanup::sweep_stale();
    let out = match (&a.out, a.quick) {
        (Some(o), _) => o.clone(),
        (None, false) => std::path::PathBuf::from(netboot_bench::args::DEFAULT_OUT),
        (None, true) => {
            std::env::temp_dir().join(format!("netboot-northsouth-quick-{}", std::process::id()))
        }
    };
    let services = match (a.services.is_empty(), a.quick) {
        (false, _) => a.services.clone(),
        (true, true) => vec![1000],
        (true, false) => vec![1000, 10000],
    };
    let o = northsouth::Options {
        quick: a.quick,
        services,
        connections: a.connections.unwrap_or(if a.quick { 300 } else { 5000 }),
        agent,
    };
    let rep = northsouth::run(&o, &mut |r| northsouth_report::write(r, &out).map(|_| ()))?;
    let written = northsouth_report::write(&rep, &out)?;
    println!("{}", northsouth_report::markdown(&rep));
    println!("wrote {}", written.markdown.display());
    println!("wrote {}", written.json.display());
    if let Some(e) = &rep.error {
        anyhow::bail!("stopped early: {e}");
    }
    Ok(())
}
