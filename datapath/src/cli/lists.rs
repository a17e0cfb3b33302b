//! `service list` and `bpf lb list`: read the pinned maps directly.

use std::process::ExitCode;

use netboot_datapath::diag;
use netboot_datapath::maps::kernel::KernelMaps;
use netboot_datapath::maps::LbMaps;
use netboot_datapath::pins::Pins;

use super::args::{Output, PinArgs};
use super::CliError;

/// `service list`.
pub fn service_list(a: PinArgs) -> Result<ExitCode, CliError> {
    let dump = KernelMaps::open(&Pins::new(&a.bpffs))?.dump()?;
    let rows = diag::service_rows(&dump);
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => print!("{}", diag::render_service_list(&rows)),
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
