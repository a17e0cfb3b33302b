//! podnet: makes the local cluster's podnet, agent, kube-proxy and coredns
//! pods real (see netboot_harness::podnet). Stops and cleans up on SIGTERM/SIGINT.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use netboot_harness::podnet::{self, Options};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "podnet",
    about = "Real network namespaces, cgroups and processes for the local cluster's pods"
)]
struct Args {
    /// Kubeconfig for the local cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Cluster state dir; podnet keeps its files in <state>/podnet.
    #[arg(long, env = "NETBOOT_STATE_DIR", default_value = "/tmp/netboot-local")]
    state: PathBuf,
    /// Directory with the workspace-built netboot-probe and netboot-datapath.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The real kube-proxy binary, run for kube-proxy pods in their node's
    /// netns; without it, podnet writes emulated kube-proxy rules instead.
    #[arg(long)]
    kube_proxy: Option<std::path::PathBuf>,
    /// The real CoreDNS binary, run for coredns pods in their netns; without
    /// it, podnet answers cluster DNS itself.
    #[arg(long)]
    coredns: Option<std::path::PathBuf>,
    /// iptables-restore used for kube-proxy's rules (nft backend by default).
    #[arg(long, default_value = "iptables-nft-restore")]
    iptables_restore: String,
    /// Prefix of every netns podnet makes (tests run a second podnet with their own).
    #[arg(long, default_value = netboot_harness::names::NETNS_PREFIX)]
    netns_prefix: String,
    /// Root of podnet's cgroups.
    #[arg(long, default_value = netboot_harness::names::CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// Root of the agents' bpffs pin dirs.
    #[arg(long, default_value = netboot_harness::names::BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Only handle pods in this namespace (default: all).
    #[arg(long)]
    namespace: Option<String>,
    /// Serve the API server's egress (HTTP CONNECT) on this Unix socket:
    /// kubelet connections go to kwok on loopback, the rest is refused.
    #[arg(long, requires = "kubelet_port")]
    egress_socket: Option<PathBuf>,
    /// The kubelet port the nodes advertise (kwok's server, on 127.0.0.1).
    #[arg(long)]
    kubelet_port: Option<u16>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut opts = Options::new(args.kubeconfig, args.state, args.bin_dir);
    opts.iptables_restore = args.iptables_restore;
    opts.layout = netboot_harness::names::Layout {
        netns_prefix: args.netns_prefix,
        cgroup_root: args.cgroup_root,
        bpffs_root: args.bpffs_root,
    };
    opts.namespace = args.namespace;
    opts.kube_proxy = args.kube_proxy;
    opts.coredns = args.coredns;
    opts.egress = args.egress_socket.zip(args.kubelet_port);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    };
    podnet::run(opts, shutdown).await?;
    Ok(())
}
