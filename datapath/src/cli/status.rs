//! `netboot-datapath status`.

use std::process::ExitCode;

use netboot_datapath::pins::Pins;
use netboot_datapath::status::now_unix;
use netboot_datapath::{diag, http};

use super::args::{Output, StatusArgs};
use super::CliError;

/// Prints the status from the agent (`--agent`) or from the pins.
/// Exit 0 when the datapath is ready (in either mode), 1 otherwise.
pub async fn run(a: StatusArgs) -> Result<ExitCode, CliError> {
    let st = match &a.agent {
        Some(addr) => http::fetch_status(addr).await?,
        None => {
            let mut st = diag::status_from_pins(&Pins::new(&a.bpffs))?;
            // Without the agent: the datapath works when every hook is attached.
            st.ready = st.links.len() == netboot_datapath::loader::ATTACH_POINTS.len();
            st
        }
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Output::Text => print!("{}", st.render(a.verbose, now_unix())),
    }
    Ok(if st.kube_proxy_replacement && st.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
