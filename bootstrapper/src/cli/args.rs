//! The command line. clap structs live here and nowhere else.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Follow Service flows from every node's agent through the API server, like `hubble observe --follow`.
    Flows(FlowsArgs),
    /// Keep clusters at the state committed in git: fetch, plan, apply what drifted, every interval.
    Reconcile(ReconcileArgs),
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

/// Where the desired state comes from when it is in git.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// Take the spec and templates/ from this git repository (https://, ssh://, git@host:path, git://, file:// or a path); SPEC is then a path inside it. No credentials in the URL: use --token-file.
    #[arg(long, value_name = "URL")]
    pub repo: Option<String>,
    /// Branch, tag or commit SHA (full or short) of --repo.
    #[arg(long = "ref", value_name = "REF", default_value = "main")]
    pub git_ref: String,
    /// known_hosts for SSH host key verification (default $NETBOOT_GIT_CREDENTIALS/known_hosts). Required for SSH.
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Private key for SSH (default $NETBOOT_GIT_CREDENTIALS/ssh-privatekey, then identity).
    #[arg(long, value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// File with a token for HTTPS (default $NETBOOT_GIT_TOKEN, then $NETBOOT_GIT_CREDENTIALS/token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Allow a plain http:// --repo (unencrypted and unauthenticated: only on a network you trust).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Stop a fetch that receives more than this (512MiB, 64KiB, 1GiB or bytes).
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub fetch_max_bytes: u64,
    /// Stop a fetch whose pack has more objects than this.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub fetch_max_objects: usize,
    /// Stop a fetch still running after this long (30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub fetch_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The cluster's spec, e.g. clusters/prod.yaml (with --repo: its path in the repository).
    pub spec: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
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
    #[arg(long, value_name = "IMAGE", value_parser = parse_image)]
    pub probe_image: Option<String>,
    /// Try the handover again although it was rolled back at this revision.
    #[arg(long)]
    pub retry: bool,
    /// Do not validate after changes (a handover is always validated).
    #[arg(long)]
    pub skip_validation: bool,
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// The cluster's spec, e.g. clusters/prod.yaml (with --repo: its path in the repository); gives the agents' namespace and health port.
    pub spec: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Only the agent on this node (repeatable; default every node).
    #[arg(long = "node", value_name = "NAME")]
    pub nodes: Vec<String>,
    /// Only flows to this Service.
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// Only flows to this backend pod.
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// Only this verdict: translated, affinity-hit, refused, error, observed, source-range, denied or terminated.
    #[arg(long, value_name = "VERDICT")]
    pub verdict: Option<String>,
    /// Only tcp or udp.
    #[arg(long, value_name = "PROTO")]
    pub proto: Option<String>,
    /// Exit after N flows in total (default: follow until interrupted).
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_count)]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Spec paths in the repository, e.g. clusters/prod.yaml.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub specs: Vec<String>,
    /// Every clusters/*.yaml in the repository (a fleet; each spec's cluster.context picks its kubeconfig context).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Time between passes (30s, 5m, 1h), jittered by ±10%; a failing cluster backs off from it exponentially.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub interval: Duration,
    /// One pass, then exit (0 converged, 1 a validation failed and was rolled back, 2 any error).
    #[arg(long)]
    pub once: bool,
    /// Serve Prometheus metrics (/metrics) on this address; `off` for none.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9891")]
    pub metrics_addr: String,
    /// Delete and recreate objects whose immutable fields changed.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for another netboot holding a cluster's lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub lock_timeout: u64,
    /// Image for the validation probe pods (default ghcr.io/netboot/netboot:<datapath.version>).
    #[arg(long, value_name = "IMAGE", value_parser = parse_image)]
    pub probe_image: Option<String>,
    /// Do not validate after changes (a handover is always validated).
    #[arg(long)]
    pub skip_validation: bool,
}

/// An image reference (`[registry/]path[:tag][@sha256:…]`), as a spec's.
fn parse_image(s: &str) -> Result<String, String> {
    netboot::spec::grammar::image_reference(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// A count of at least 1.
fn parse_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// `30s`, `5m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("`{s}`: unit must be s, m or h")),
    };
    if secs == 0 {
        return Err(format!("`{s}`: must be at least 1s"));
    }
    Ok(Duration::from_secs(secs))
}

/// `512MiB`, `64KiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB`, all
/// powers of 1024), or plain bytes; at least 1.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512MiB, 64KiB, 1GiB)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}`: unit must be KiB, MiB or GiB")),
    };
    match n.checked_mul(1 << shift) {
        Some(0) => Err(format!("`{s}`: must be at least 1 byte")),
        Some(v) => Ok(v),
        None => Err(format!("`{s}` is too large")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("5TiB").unwrap_err().contains("unit"));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("0s").unwrap_err().contains("at least 1s"));
    }
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
