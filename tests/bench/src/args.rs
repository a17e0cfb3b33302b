//! Command-line arguments (the only place clap structs live).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::kube_proxy::IptablesBackend;

/// Default results folder.
pub const DEFAULT_OUT: &str = "results/bench";

/// netboot's socket LB against kube-proxy's iptables and nftables modes,
/// side by side, inside network namespaces the bench creates (no route out
/// of the machine). Needs root (BPF, namespaces, cgroups).
#[derive(Debug, Parser)]
#[command(
    name = "netboot-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Internal.
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// Numbers of Services (N), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub services: Vec<u32>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 2)]
    pub backends: u32,
    /// Measured connections per variant and N [default: 20000; 300 with --quick].
    #[arg(long)]
    pub connections: Option<u32>,
    /// N=1000 only, few connections and repeats (well under a minute); the
    /// results go to OUT/quick unless --out is given.
    #[arg(long)]
    pub quick: bool,
    /// Results folder (table, JSON, plot).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// iptables backend of the iptables variant.
    #[arg(long, value_enum, default_value_t)]
    pub iptables: IptablesBackend,
    /// The netboot-datapath binary [default: built next to this one].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Skip the goals' programming scenario (10k Services x 10 endpoints).
    #[arg(long)]
    pub no_goal_scenario: bool,
    /// Only the IPv4 latency rows: no IPv6 and IPv4-mapped rows, no IPv6
    /// frontends in netboot's maps.
    #[arg(long)]
    pub no_ipv6: bool,
    /// The listener threads accept as connections come during the latency
    /// phase, as in issue 6's runs. By default they do not (no thread is
    /// woken while a client is in connect(); the bench accepts each batch's
    /// connections after it), which removes the two ~5 µs-apart p50 modes
    /// the wake-ups cause on two shared cores (README, "Listener wake-ups").
    #[arg(long)]
    pub listeners_accept: bool,
    /// Run the latency clients as SCHED_FIFO (priority 1): no ordinary task
    /// on the shared cores preempts a client inside connect(), which is
    /// most of a p99's noise here. Every row gets it alike.
    #[arg(long)]
    pub realtime_clients: bool,
}

/// Hidden subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The client process (spawned by the bench inside a cgroup and namespace).
    #[command(name = "__client", hide = true)]
    Client,
}
