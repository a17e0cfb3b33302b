//! `netboot plan` and `netboot apply`.

use std::process::ExitCode;

use netboot::converge;

use super::args::{ApplyArgs, OutputFormat};
use super::{emit, print, settings};

pub async fn plan(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let (plan, ..) = converge::plan(&conn, &s).await?;
    emit(output, &plan, || print::plan(&plan))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn apply(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let outcome = converge::apply(&conn, &s).await?;
    emit(output, &outcome, || print::outcome(&outcome))?;
    Ok(ExitCode::from(outcome.exit_code))
}

pub async fn rollback(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let outcome = converge::rollback_now(&conn, &s).await?;
    emit(output, &outcome, || print::outcome(&outcome))?;
    Ok(ExitCode::SUCCESS)
}
