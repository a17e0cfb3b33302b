//! netboot-datapath: the binary is thin; the library does the work.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    netboot_datapath::startup::begin();
    // Before the runtime's threads exist.
    netboot_datapath::sys::tune_malloc();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::args::Cli::parse();
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // Each cause once, outermost first (netboot prints errors the same way).
            eprintln!("error: {}", netboot_contract::errors::chain(&e));
            ExitCode::FAILURE
        }
    }
}
