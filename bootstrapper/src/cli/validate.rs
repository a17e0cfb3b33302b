//! `netboot validate SPEC`: the checks against the cluster as it is.

use std::process::ExitCode;

use netboot::{converge, endpoint, validate};

use super::args::{ApplyArgs, OutputFormat};
use super::{emit, settings};

pub async fn run(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let ep = endpoint::detect(&conn.client, &s.spec, &conn.server()).await?;
    let opts = converge::validate_options(&conn, &s, &s.spec, &ep);
    let report = validate::validate(&conn.client, &s.spec, &opts).await;
    emit(output, &report, || validate::format_table(&report))?;
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
