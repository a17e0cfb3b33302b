//! Arguments resolved once into what the run does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::args::{Cli, ClientCpu};
use crate::kube_proxy::IptablesBackend;

/// How often a programming measurement repeats: at least `min`, at most
/// `max`, and no more once `budget` is spent.
#[derive(Clone, Copy, Debug)]
pub struct Repeat {
    /// Fewest samples.
    pub min: usize,
    /// Most samples.
    pub max: usize,
    /// Time after which no new sample starts (once `min` are taken).
    pub budget: Duration,
}

const fn rep(min: usize, max: usize, secs: u64) -> Repeat {
    Repeat {
        min,
        max,
        budget: Duration::from_secs(secs),
    }
}

/// Repeat policies of the programming measurements.
#[derive(Clone, Copy, Debug)]
pub struct Repeats {
    /// Full syncs (every variant).
    pub full_sync: Repeat,
    /// netboot endpoint changes.
    pub netboot_change: Repeat,
    /// iptables full restores for an endpoint change.
    pub iptables_change: Repeat,
    /// iptables partial restores.
    pub iptables_partial: Repeat,
    /// nft incremental transactions.
    pub nft_change: Repeat,
    /// nft chain listings.
    pub nft_list: Repeat,
}

/// Everything the run does.
#[derive(Clone, Debug)]
pub struct Settings {
    /// N values, in order.
    pub sizes: Vec<u32>,
    /// Endpoints per Service.
    pub backends: u32,
    /// Measured connections per variant and N.
    pub connections: u32,
    /// Connections per interleaved batch.
    pub batch: u32,
    /// Unmeasured connections per variant first.
    pub warmup: u32,
    /// Quick mode.
    pub quick: bool,
    /// The IPv6 and IPv4-mapped latency rows (netboot's maps also hold the
    /// IPv6 frontends of the dual-stack Services while latency is measured).
    pub ipv6: bool,
    /// kube-proxy's iptables and nftables rows (`--no-kube-proxy` turns
    /// them off).
    pub kube_proxy: bool,
    /// Listener threads stay asleep during the latency phase; the bench
    /// accepts the connections between batches.
    pub drain_listeners: bool,
    /// `--realtime-clients`: latency clients under SCHED_FIFO.
    pub realtime_clients: bool,
    /// `--variant-object`: its path and bytes.
    pub variant_object: Option<(PathBuf, Vec<u8>)>,
    /// `--order`: the order of the latency rows' turns.
    pub order: crate::latency::Order,
    /// `--client-cpu`: the CPU every latency client is pinned to.
    pub client_cpu: Option<usize>,
    /// Results folder.
    pub out: PathBuf,
    /// iptables backend.
    pub iptables: IptablesBackend,
    /// The agent binary (None: built/found next to this one).
    pub agent_bin: Option<PathBuf>,
    /// Measure the real agent binary (`--no-agent` turns it off).
    pub agent: bool,
    /// Programming-only run for the goals (services, endpoints per service).
    pub goal_scenario: Option<(u32, u32)>,
    /// Repeat policies.
    pub repeats: Repeats,
    /// How long the agent may take to get ready.
    pub agent_timeout: Duration,
    /// Longest one iptables-restore / nft full sync may run before it is
    /// killed and reported as slower than that.
    pub sync_limit: Duration,
    /// Longest the fallback load of the nft table in pieces may take.
    pub nft_load_budget: Duration,
}

/// The goals' scenario: 10k Services, 100k endpoints.
pub const GOAL_SCENARIO: (u32, u32) = (10_000, 10);

impl Settings {
    /// Resolves the arguments.
    pub fn from_cli(cli: &Cli) -> Result<Self> {
        let quick = cli.quick;
        let sizes = if quick {
            vec![1000]
        } else {
            cli.services.clone()
        };
        if sizes.is_empty() {
            bail!("--services: give at least one size");
        }
        let connections = cli.connections.unwrap_or(if quick { 300 } else { 20_000 });
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let repeats = if quick {
            Repeats {
                full_sync: rep(2, 3, 5),
                netboot_change: rep(20, 50, 2),
                iptables_change: rep(2, 6, 3),
                iptables_partial: rep(2, 10, 3),
                nft_change: rep(6, 20, 3),
                nft_list: rep(2, 3, 2),
            }
        } else {
            Repeats {
                full_sync: rep(3, 10, 45),
                netboot_change: rep(50, 500, 15),
                iptables_change: rep(3, 20, 45),
                iptables_partial: rep(5, 50, 30),
                nft_change: rep(20, 200, 20),
                nft_list: rep(3, 10, 15),
            }
        };
        let out = if quick && cli.out == std::path::Path::new(crate::args::DEFAULT_OUT) {
            cli.out.join("quick")
        } else {
            cli.out.clone()
        };
        Ok(Self {
            sizes,
            backends: cli.backends,
            connections,
            batch: if quick { 50 } else { 250 },
            warmup: if quick { 20 } else { 200 },
            quick,
            ipv6: !cli.no_ipv6,
            kube_proxy: !cli.no_kube_proxy,
            drain_listeners: !cli.listeners_accept,
            realtime_clients: cli.realtime_clients,
            variant_object: match &cli.variant_object {
                Some(p) => Some((
                    p.clone(),
                    std::fs::read(p)
                        .with_context(|| format!("--variant-object {}", p.display()))?,
                )),
                None => None,
            },
            order: cli.order,
            client_cpu: match cli.client_cpu {
                ClientCpu::Off => None,
                ClientCpu::Cpu(n) => Some(n),
                ClientCpu::Auto => Some(crate::client::highest_allowed_cpu()?),
            },
            out,
            iptables: cli.iptables,
            agent_bin: cli.agent_bin.clone(),
            agent: !cli.no_agent,
            goal_scenario: (!quick && !cli.no_goal_scenario).then_some(GOAL_SCENARIO),
            repeats,
            agent_timeout: Duration::from_secs(if quick { 30 } else { 120 }),
            sync_limit: Duration::from_secs(if quick { 60 } else { 200 }),
            nft_load_budget: Duration::from_secs(if quick { 60 } else { 180 }),
        })
    }
}
