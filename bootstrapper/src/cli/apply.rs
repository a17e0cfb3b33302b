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
    let outcome = match converge::apply(&conn, &s).await {
        Ok(o) => o,
        Err(converge::ConvergeError::Apply(e)) if e.changes().changed() > 0 => {
            // What was written before the failing object, so the operator
            // knows the cluster's state (the error line follows on stderr).
            let partial = serde_json::json!({
                "partial": true,
                "applied": e.changes(),
                "error": netboot_contract::errors::chain(&e),
            });
            emit(output, &partial, || {
                format!(
                    "applied before the error:\n{}",
                    print::changeset(e.changes(), false, false)
                )
            })?;
            return Err(converge::ConvergeError::Apply(e).into());
        }
        Err(e) => return Err(e.into()),
    };
    emit(output, &outcome, || print::outcome(&outcome))?;
    Ok(ExitCode::from(outcome.exit_code))
}

pub async fn rollback(args: &ApplyArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let (s, conn, _source) = settings::resolve(args).await?;
    let outcome = converge::rollback_now(&conn, &s).await?;
    emit(output, &outcome, || print::outcome(&outcome))?;
    Ok(ExitCode::SUCCESS)
}
