//! `netboot check SPEC...`: every problem in every file, exit 1 if any.
//!
//! Everything echoed from a file or the command line (names, values, keys,
//! file names) is escaped and kept on one line (`spec::grammar::one_line`), so
//! a crafted spec cannot make a terminal show `ok` while the command exits 1.

use std::io::Write;
use std::process::ExitCode;

use netboot::spec;
use netboot::spec::grammar::one_line;
use serde_json::json;

use super::args::{CheckArgs, OutputFormat};

pub fn run(args: &CheckArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let outcomes: Vec<(String, Result<String, Vec<spec::SpecError>>)> = args
        .specs
        .iter()
        .map(|path| {
            (
                // A file name is echoed too: escaped like the values in messages.
                one_line(&path.display().to_string()),
                spec::load(path).map(|s| s.name).map_err(|e| {
                    e.errors()
                        .into_iter()
                        .map(|mut e| {
                            e.file = one_line(&e.file);
                            e.message = one_line(&e.message);
                            e
                        })
                        .collect()
                }),
            )
        })
        .collect();
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count();
    let results: Vec<_> = outcomes
        .iter()
        .map(|(file, r)| match r {
            Ok(name) => json!({"file": file, "name": name, "ok": true, "errors": []}),
            Err(errors) => json!({"file": file, "ok": false, "errors": errors}),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    match output.unwrap_or(OutputFormat::Text) {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({"files": results}))?
        )?,
        OutputFormat::Yaml => write!(
            out,
            "{}",
            serde_yaml::to_string(&json!({"files": results}))?
        )?,
        OutputFormat::Text => {
            for (file, r) in &outcomes {
                match r {
                    Ok(name) => writeln!(out, "{file}: ok ({name})")?,
                    Err(errors) => {
                        for e in errors {
                            writeln!(out, "{e}")?;
                        }
                    }
                }
            }
            if failed > 0 {
                writeln!(out, "{failed} of {} files have errors", args.specs.len())?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
