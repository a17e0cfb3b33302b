//! `netboot-bench`: see the crate README (tests/bench/README.md).

use std::process::ExitCode;

use clap::Parser;
use netboot_bench::args::{Cli, Cmd};
use netboot_bench::{cleanup, client, report, run, settings::Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Client) = cli.cmd {
        return match client::child_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netboot-bench client: {e:#}");
                ExitCode::FAILURE
            }
        };
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
