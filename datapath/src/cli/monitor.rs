//! `netboot-datapath monitor`: the local agent's `/v1/flows`, one line per
//! flow (or the JSON lines as served), like `hubble observe --follow`.

use std::io::Write;
use std::process::ExitCode;

use netboot_datapath::flows::{render, Flow, FlowFilter};
use netboot_datapath::http::{self, HttpError};

use super::args::{MonitorArgs, Output};
use super::CliError;

/// The filters the flags ask for (checked here, as the agent checks the
/// query, so a typo fails before connecting).
pub fn filter(a: &MonitorArgs) -> Result<FlowFilter, CliError> {
    FlowFilter::from_flags(
        a.service.as_deref(),
        a.pod.as_deref(),
        a.verdict.as_deref(),
        a.proto.as_deref(),
    )
    .map_err(|e| CliError::Usage(e.to_string()))
}

/// Streams flows until interrupted, the agent ends the stream, or `--count`.
pub async fn run(a: MonitorArgs) -> Result<ExitCode, CliError> {
    let f = filter(&a)?;
    let path = f.path();
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    let res = http::get_lines(&a.agent, &path, |line| {
        if line.trim().is_empty() {
            return true; // heartbeat
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(n) = v.get("lost").and_then(|n| n.as_u64()) {
                eprintln!("monitor: {n} flows lost (this client read too slowly)");
                return true;
            }
        }
        let ok = match a.output {
            Output::Json => writeln!(out, "{line}").is_ok(),
            Output::Text => match serde_json::from_str::<Flow>(line) {
                Ok(flow) => writeln!(out, "{}", render(&flow, None, None)).is_ok(),
                Err(e) => {
                    eprintln!("monitor: unreadable flow ({e}): {line}");
                    true
                }
            },
        };
        let _ = out.flush();
        seen += 1;
        ok && a.count.is_none_or(|c| seen < c)
    })
    .await;
    match res {
        Err(HttpError::Connect { addr, source }) => Err(CliError::Usage(format!(
            "cannot reach the netboot-datapath agent at {addr}: {source} (is the agent running on this node? --agent host:port picks another address)"
        ))),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}
