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
    /// Show what apply would do — objects and handover steps — without writing anything.
    Plan(ApplyArgs),
    /// Apply the spec: manifests, agent rollout, gated kube-proxy handover, validation, rollback on failure.
    Apply(ApplyArgs),
    /// Run the validation checks against the cluster as it is.
    Validate(ApplyArgs),
    /// Agents per node, KubeProxyReplacement per node, kube-proxy, the last apply.
    Status(ApplyArgs),
    /// Go back to kube-proxy: restore it from the backup and switch the agents to coexist mode.
    Rollback(ApplyArgs),
}

/// Where the cluster is, as kubectl takes it.
#[derive(Debug, Args, Clone)]
pub struct ClusterArgs {
    /// Path to the kubeconfig file (default $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: spec.cluster.context, then the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Use the pod's service account (the in-cluster CronJob).
    #[arg(long, global = true)]
    pub in_cluster: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The cluster's spec, e.g. clusters/prod.yaml.
    pub spec: PathBuf,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub templates: TemplateArgs,
    /// Delete and recreate objects whose immutable fields changed.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for another netboot holding the cluster's lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub lock_timeout: u64,
    /// Image for the validation probe pods (default ghcr.io/netboot/netboot:<datapath.version>).
    #[arg(long, value_name = "IMAGE")]
    pub probe_image: Option<String>,
    /// Try the handover again although it was rolled back at this revision.
    #[arg(long)]
    pub retry: bool,
    /// Do not validate after changes (a handover is always validated).
    #[arg(long)]
    pub skip_validation: bool,
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
