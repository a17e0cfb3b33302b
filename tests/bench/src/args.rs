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
    /// Skip the real agent binary's cold start and RSS (at 1M Services its
    /// static file is ~1 GB: writing and parsing it takes minutes). The
    /// latency and programming rows do not need it: they drive the agent's
    /// reconciler in this process.
    #[arg(long)]
    pub no_agent: bool,
    /// Only the IPv4 latency rows: no IPv6 and IPv4-mapped rows, no IPv6
    /// frontends in netboot's maps.
    #[arg(long)]
    pub no_ipv6: bool,
    /// Only netboot and the floor: kube-proxy's iptables and nftables rows
    /// are neither loaded nor measured (their loads take most of a run at
    /// 100k Services, and at 2 ms a connection their latency rows limit how
    /// many connections a run can afford). For runs that decide netboot
    /// against the floor with many connections (issue 18's P1).
    #[arg(long)]
    pub no_kube_proxy: bool,
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
    /// Another build of `datapath/bpf/sock_lb.bpf.c` (same maps and
    /// programs), loaded into maps and a cgroup of its own beside netboot's
    /// and measured in a latency row interleaved with netboot's: a change to
    /// the programs against this build, side by side in one run.
    #[arg(long, value_name = "FILE")]
    pub variant_object: Option<std::path::PathBuf>,
    /// The order of the latency rows' turns in each round: `shuffled` (a
    /// new random order every round, fixed seed) or `rotated` (by one a
    /// round, as runs before 2026-12-07 night: netboot's batch then nearly
    /// always follows the floor's).
    #[arg(long, value_enum, default_value_t = crate::latency::Order::Shuffled)]
    pub order: crate::latency::Order,
    /// The CPU every latency client is pinned to: `auto` (the default: the
    /// highest CPU this process may run on), a CPU number, or `off`.
    /// Unpinned, the scheduler keeps each client mostly on one CPU, and on
    /// two shared cores not always the same one for every row (one run
    /// here: the floor's client 97% on CPU 1, the variant's 92% on CPU 0),
    /// which biased p99 comparisons by up to 4.5 µs.
    #[arg(long, value_name = "auto|off|CPU", default_value = "auto")]
    pub client_cpu: ClientCpu,
}

/// `--client-cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCpu {
    /// The highest CPU in this process's affinity set.
    Auto,
    /// Clients left to the scheduler.
    Off,
    /// This CPU.
    Cpu(usize),
}

impl std::str::FromStr for ClientCpu {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            n => n
                .parse()
                .map(Self::Cpu)
                .map_err(|_| format!("{n:?}: expected `auto`, `off` or a CPU number (0, 1, ...)")),
        }
    }
}

/// Subcommands (without one: the socket-LB benchmark).
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Network programming latency against the REAL kube-proxy (iptables
    /// and nftables) and the real netboot agent, side by side on a private
    /// API server under EndpointSlice churn (issue 15, point 7).
    Programming(ProgrammingArgs),
    /// North–south (issue 14): an external client to a NodePort, one
    /// connection per request, netboot's tc path against kube-proxy's
    /// iptables and nftables rules and the floor; the tc program's ns/packet.
    Northsouth(NorthsouthArgs),
    /// Agent cold start from a real watch list (issue 18): 1,000 Nodes and
    /// N Services x 10 endpoints in a private API server; spawn until ready
    /// with every Service programmed, and VmRSS; agents side by side.
    #[command(name = "coldstart-api")]
    ColdstartApi(ColdstartApiArgs),
    /// What flow events cost (issue 19): connect latency with the kernel
    /// switch off against on (interleaved), and a flood's events/s and drops.
    Flows(FlowsArgs),
    /// Only the agent's cold start and RSS (issue 18): the real
    /// `netboot-datapath agent --static-services` at each size, optionally
    /// side by side with a base build.
    Coldstart(ColdstartArgs),
    /// The client process (spawned by the bench inside a cgroup and namespace).
    #[command(name = "__client", hide = true)]
    Client,
    /// The outside check's probe (spawned inside a proxy's namespace).
    #[command(name = "__probe", hide = true)]
    Probe(ProbeArgs),
}

/// `programming` flags.
#[derive(Debug, clap::Args)]
pub struct ProgrammingArgs {
    /// 1k Services, 20 s per rate (full: 1k and 10k Services, 60 s per rate).
    #[arg(long)]
    pub quick: bool,
    /// Results folder (programming.json, programming.md).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// Outside-check samples per rate.
    #[arg(long, default_value_t = 5)]
    pub samples: u32,
    /// The iptables backend kube-proxy's iptables mode runs with: `iptables`
    /// and its save/restore resolve to iptables-nft or iptables-legacy (as
    /// kube-proxy's image wrapper picks one per host).
    #[arg(long, value_enum, default_value_t = IptablesBackend::Nft)]
    pub iptables: IptablesBackend,
    /// The netboot-datapath binary [default: built next to this one].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

/// `coldstart-api` flags.
#[derive(Debug, clap::Args)]
pub struct ColdstartApiArgs {
    /// Numbers of Services, comma-separated, ascending.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub services: Vec<u32>,
    /// `LABEL=PATH` of a netboot-datapath binary to measure, repeatable
    /// [default: `this=` the one built next to this bench].
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// Starts per agent and size.
    #[arg(long, default_value_t = 5)]
    pub repeats: u32,
    /// How the objects get into the API: `api` creates them through the
    /// API server; `etcd` writes them into its etcd as it stores them (for
    /// 100k and more: the API server's create path is quadratic in Services).
    #[arg(long, value_enum, default_value_t = crate::coldstart_api::Fill::Api)]
    pub fill: crate::coldstart_api::Fill,
    /// Results folder (coldstart-api.md, coldstart-api.json).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
}

/// `flows` flags.
#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    /// Services programmed.
    #[arg(long, default_value_t = 10_000)]
    pub services: u32,
    /// Measured connections per column.
    #[arg(long, default_value_t = 20_000)]
    pub connections: u32,
    /// Seconds of the flood.
    #[arg(long, default_value_t = 5)]
    pub flood_seconds: u64,
    /// Also measure connect4's run time with the CPU caches made cold before
    /// each connect: the client writes over a buffer of each of these sizes
    /// (KiB, comma-separated; 0 = warm, as a reference), rotated round by
    /// round. E.g. `0,4096,65536`: warm, L1/L2 and TLBs evicted, all levels
    /// evicted (this machine's L3 is 32 MiB). What the program costs after
    /// an interruption, where a p99 lives.
    #[arg(long, value_delimiter = ',')]
    pub cold_kib: Vec<u32>,
    /// Connections per size of --cold-kib.
    #[arg(long, default_value_t = 2_000)]
    pub cold_connections: u32,
    /// Results folder (flows.md, flows.json).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
}

/// `northsouth` flags.
#[derive(Debug, clap::Args)]
pub struct NorthsouthArgs {
    /// 1k Services, 300 connections per row; results to a temporary
    /// directory unless --out is given.
    #[arg(long)]
    pub quick: bool,
    /// Results folder (northsouth.json, northsouth.md) [default: results/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Numbers of Services, comma-separated [default: 1000,10000; 1000 with --quick].
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<u32>,
    /// Measured connections per row [default: 5000; 300 with --quick].
    #[arg(long)]
    pub connections: Option<u32>,
    /// The netboot-datapath binary [default: built next to this one].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

/// `coldstart` flags.
#[derive(Debug, clap::Args)]
pub struct ColdstartArgs {
    /// Sizes as SERVICESxENDPOINTS, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000x10")]
    pub sizes: Vec<String>,
    /// Starts per binary and size (the table shows medians).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// The netboot-datapath binary [default: built next to this one].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// A second binary (e.g. built from main) started in turn with the
    /// first, labelled "base".
    #[arg(long)]
    pub base_bin: Option<PathBuf>,
    /// Seconds one start may take to get ready.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// `__probe` flags.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// VIP:port to connect to.
    #[arg(long)]
    pub target: std::net::SocketAddr,
    /// The backend address to wait for.
    #[arg(long)]
    pub want: std::net::IpAddr,
    /// Give up after this long.
    #[arg(long)]
    pub timeout_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cpu_parses_auto_off_and_numbers() {
        assert_eq!("auto".parse(), Ok(ClientCpu::Auto));
        assert_eq!("off".parse(), Ok(ClientCpu::Off));
        assert_eq!("1".parse(), Ok(ClientCpu::Cpu(1)));
        let e = "one".parse::<ClientCpu>().unwrap_err();
        assert!(e.contains("`auto`, `off` or a CPU number"), "{e}");
        assert!("-1".parse::<ClientCpu>().is_err());
    }

    #[test]
    fn clients_are_pinned_unless_told_otherwise() {
        let cli = Cli::try_parse_from(["netboot-bench"]).expect("parse");
        assert_eq!(cli.client_cpu, ClientCpu::Auto);
        let cli = Cli::try_parse_from(["netboot-bench", "--client-cpu", "off"]).expect("parse");
        assert_eq!(cli.client_cpu, ClientCpu::Off);
    }
}
