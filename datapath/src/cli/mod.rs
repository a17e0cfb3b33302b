//! The command-line front end: each subcommand in its own file, returning an
//! exit status.

pub mod agent;
pub mod args;
pub mod cleanup;
pub mod lists;
pub mod monitor;
pub mod status;

use std::process::ExitCode;

use args::{BpfCmd, Cli, Cmd, CtCmd, LbCmd, ServiceCmd};

/// Errors of the CLI commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] netboot_datapath::config::ConfigError),
    /// Agent.
    #[error(transparent)]
    Agent(#[from] netboot_datapath::agent::AgentError),
    /// Map access.
    #[error(transparent)]
    Maps(#[from] netboot_datapath::maps::MapsError),
    /// Agent HTTP.
    #[error(transparent)]
    Http(#[from] netboot_datapath::http::HttpError),
    /// Handover.
    #[error(transparent)]
    Handover(#[from] netboot_datapath::handover::HandoverError),
    /// Pins.
    #[error(transparent)]
    Pins(#[from] netboot_datapath::pins::PinError),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
    /// JSON output.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.cmd {
        Cmd::Agent(a) => agent::run(a).await,
        Cmd::Status(a) => status::run(a).await,
        Cmd::Service {
            cmd: ServiceCmd::List(a),
        } => lists::service_list(a),
        Cmd::Bpf {
            cmd: BpfCmd::Lb {
                cmd: LbCmd::List(a),
            },
        } => lists::lb_list(a),
        Cmd::Bpf {
            cmd: BpfCmd::Ct {
                cmd: CtCmd::List(a),
            },
        } => lists::ct_list(a),
        Cmd::Monitor(a) => monitor::run(a).await,
        Cmd::CleanupKubeProxy(a) => cleanup::run(a),
        Cmd::Uninstall(a) => {
            netboot_datapath::pins::Pins::new(&a.bpffs).remove_all()?;
            println!(
                "removed pins under {} (socket LB detached)",
                a.bpffs.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
