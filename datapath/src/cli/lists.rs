//! `service list`, `bpf lb list` and `bpf ct list`: read the pinned maps directly.

use std::process::ExitCode;

use netboot_datapath::diag;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::maps::LbMaps;
use netboot_datapath::pins::Pins;

use super::args::{Output, PinArgs, ServiceListArgs};
use super::CliError;

/// `service list [--stats]`.
pub fn service_list(a: ServiceListArgs) -> Result<ExitCode, CliError> {
    let maps = KernelMaps::open(&Pins::new(&a.pins.bpffs))?;
    let mut rows = diag::service_rows(&maps.dump()?);
    if a.stats {
        diag::add_stats(&mut rows, &maps.svc_stats()?);
    }
    match (a.pins.output, a.stats) {
        (Output::Json, _) => println!("{}", serde_json::to_string_pretty(&rows)?),
        (Output::Text, false) => print!("{}", diag::render_service_list(&rows)),
        (Output::Text, true) => print!("{}", diag::render_service_stats(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `bpf lb list`.
pub fn lb_list(a: PinArgs) -> Result<ExitCode, CliError> {
    let dump = KernelMaps::open(&Pins::new(&a.bpffs))?.dump()?;
    let rows = diag::lb_rows(&dump);
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => print!("{}", diag::render_lb_list(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `bpf ct list`.
pub fn ct_list(a: PinArgs) -> Result<ExitCode, CliError> {
    use netboot_datapath::conntrack;
    let rows = conntrack::list(&Pins::new(&a.bpffs), conntrack::monotonic_secs())?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            println!(
                "{:<5} {:<44} {:<44} {:<8} {:>6} {:<13} EXPIRES IN",
                "PROTO", "FROM", "TO", "DIR", "SVC", "FLAGS"
            );
            for r in &rows {
                println!(
                    "{:<5} {:<44} {:<44} {:<8} {:>6} {:<13} {}",
                    r.proto,
                    r.from,
                    r.to,
                    r.direction,
                    r.service_id,
                    if r.flags.is_empty() {
                        "-".to_string()
                    } else {
                        r.flags.join(",")
                    },
                    if r.expires_in < 0 {
                        "lapsed".to_string()
                    } else {
                        format!("{}s", r.expires_in)
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
