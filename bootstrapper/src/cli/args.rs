//! The command line. clap structs live here and nowhere else.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "netboot", version, about = "Bootstraps a Kubernetes cluster's service network the GitOps way", long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Output format; each command has its own default (render: yaml, others: text).
    #[arg(short = 'o', long = "output", global = true, value_enum)]
    pub output: Option<OutputFormat>,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short = 'q', long = "quiet", global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the manifests netboot would apply for a cluster (offline; no cluster needed).
    Render(RenderArgs),
    /// Check spec files and report every problem as file:line:column: field: message.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The cluster's spec, e.g. clusters/prod.yaml.
    pub spec: PathBuf,
    #[command(flatten)]
    pub templates: TemplateArgs,
    /// API server endpoint (HOST:PORT) to render when the spec leaves spec.apiServer empty.
    #[arg(long, value_name = "HOST:PORT")]
    pub api_server: Option<String>,
}

#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// Directory of *.yaml.hbs files that replace the embedded templates of the same name.
    #[arg(long = "templates", value_name = "DIR", env = "NETBOOT_TEMPLATES")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Spec files to check.
    #[arg(required = true)]
    pub specs: Vec<PathBuf>,
}
