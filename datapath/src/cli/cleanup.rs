//! `netboot-datapath cleanup-kube-proxy`.

use std::process::ExitCode;

use netboot_datapath::handover::{self, RulesNetns};

use super::args::{CleanupArgs, Output};
use super::CliError;

/// Lists or removes kube-proxy's rules in the rules netns.
pub fn run(a: CleanupArgs) -> Result<ExitCode, CliError> {
    let ns = RulesNetns::new(a.rules_netns.as_deref());
    let rep = if a.dry_run {
        handover::detect(&ns)?
    } else {
        handover::cleanup(&ns)?
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
        }
    }
    Ok(ExitCode::SUCCESS)
}
