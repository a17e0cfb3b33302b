//! `netboot-datapath cleanup-kube-proxy`.

use std::process::ExitCode;

use netboot_datapath::handover::{self, IpvsOwnership, RulesNetns};

use super::args::{CleanupArgs, Output};
use super::CliError;

/// Lists or removes kube-proxy's rules in the rules netns.
pub fn run(a: CleanupArgs) -> Result<ExitCode, CliError> {
    let ns = RulesNetns::new(a.rules_netns.as_deref());
    // No Service watch here: IPVS virtual servers are kube-proxy's by
    // kube-ipvs0, the NodePort range and the addresses given.
    let own = IpvsOwnership {
        service_ips: a.service_ip.iter().copied().collect(),
        ..Default::default()
    };
    let rep = if a.dry_run {
        handover::detect(&ns, &own)?
    } else {
        handover::cleanup(&ns, &own)?
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
        Output::Text => {
            let verb = if a.dry_run { "would remove" } else { "removed" };
            for t in &rep.tables {
                println!(
                    "{} {}: {verb} {} kube-proxy chains, {} jumps",
                    t.backend,
                    t.table,
                    t.chains.len(),
                    t.jumps.len()
                );
            }
            for n in &rep.nft_tables {
                println!("nft: {verb} table {n}");
            }
            for v in &rep.ipvs {
                println!("ipvs: {verb} virtual server {v}");
            }
            for l in &rep.links {
                println!("link: {verb} {l}");
            }
            for n in &rep.ipsets {
                println!("ipset: {verb} {n}");
            }
            for v in &rep.ipvs_others {
                println!("ipvs: left (not kube-proxy's): {v}");
            }
            for l in &rep.links_others {
                println!("link: left: {l}");
            }
            if rep.route_localnet_reset {
                println!(
                    "{}=0 (kube-proxy had set it for localhost NodePorts)",
                    handover::ROUTE_LOCALNET
                );
            }
            for r in rep.retained() {
                println!("kept (other rules use it): {r}");
            }
            if !rep.present() {
                println!("no kube-proxy rules found");
            }
            println!(
                "kube-proxy mode(s) found: {}",
                netboot_contract::node::format_modes(&rep.modes)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
