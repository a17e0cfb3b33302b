//! `netboot status SPEC`.

use std::process::ExitCode;

use netboot::status;

use super::args::{ApplyArgs, OutputFormat};
use super::{emit, settings};

pub async fn run(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let st = status::gather(&conn.client, &s.spec, &conn.server())
        .await
        .map_err(anyhow::Error::msg)?;
    emit(output, &st, || status::format(&st))?;
    Ok(ExitCode::SUCCESS)
}
