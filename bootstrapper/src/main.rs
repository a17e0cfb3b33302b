//! `netboot`: a thin CLI over the netboot library. Each subcommand lives in
//! cli/<name>.rs and returns the process's exit status:
//! 0 ok, 1 validation failed (rolled back when configured), `check` found
//! errors or `flows` reached no agent, 2 any other error.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::args::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let output = cli.global.output;
    let result = match &cli.command {
        Command::Render(args) => cli::render::run(args, output),
        Command::Check(args) => cli::check::run(args, output),
        cmd => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async {
                match cmd {
                    Command::Plan(a) => cli::apply::plan(a, output).await,
                    Command::Apply(a) => cli::apply::apply(a, output).await,
                    Command::Rollback(a) => cli::apply::rollback(a, output).await,
                    Command::Reconcile(a) => cli::reconcile::run(a, output).await,
                    Command::Validate(a) => cli::validate::run(a, output).await,
                    Command::Status(a) => cli::status::run(a, output).await,
                    Command::Flows(a) => cli::flows::run(a, output).await,
                    Command::Render(_) | Command::Check(_) => Ok(ExitCode::SUCCESS),
                }
            }),
            Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", netboot_contract::errors::chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

fn init_logging(cli: &Cli) {
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        // The reconciler runs unattended: its log is its report.
        (false, 0) if matches!(cli.command, Command::Reconcile(_)) => "info",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETBOOT_LOG")
        // kube's client logs each failed request at ERROR; netboot reports the
        // same failure once, with its object, so that log is for -vv only.
        .unwrap_or_else(|_| {
            let kube = if cli.global.verbose >= 2 {
                ""
            } else {
                ",kube_client::client::builder=off"
            };
            // Progress on long waits and on waiting for the lock is info from
            // the library (it prints nothing itself); shown unless -q.
            let progress = if cli.global.quiet {
                ""
            } else {
                ",netboot::wait=info,netboot::lock=info"
            };
            tracing_subscriber::EnvFilter::new(format!("{level}{kube}{progress}"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.global.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
