//! `netboot-datapath agent`.

use std::process::ExitCode;
use std::time::Duration;

use netboot_datapath::agent::{self, AgentOptions};
use netboot_datapath::config::Config;
use netboot_datapath::pins::Pins;

use super::args::AgentArgs;
use super::CliError;

/// Resolves flags + config.yaml once, then runs until a signal.
pub async fn run(a: AgentArgs) -> Result<ExitCode, CliError> {
    let config = Config::load(&a.config)?;
    let cgroup = match a.cgroup {
        Some(c) => c,
        None => agent::default_cgroup()?,
    };
    let opts = AgentOptions {
        config,
        node_name: a.node_name,
        cgroup,
        pins: Pins::new(a.bpffs),
        rules_netns: a.rules_netns,
        kubeconfig: a.kubeconfig,
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        static_services: a.static_services,
        node_interval: Duration::from_secs(a.node_interval.max(1)),
        kube_proxy_present: a.kube_proxy_present,
        nodeport_devices: a.nodeport_devices,
    };
    agent::run(opts).await?;
    Ok(ExitCode::SUCCESS)
}
