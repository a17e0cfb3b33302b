pub mod apply;
pub mod args;
pub mod check;
pub mod flows;
pub mod print;
pub mod reconcile;
pub mod render;
pub mod settings;
pub mod status;
pub mod validate;

use std::io::Write;

use args::OutputFormat;

/// Prints `value` as JSON or YAML, or the text `human` makes.
pub fn emit<T: serde::Serialize>(
    output: Option<OutputFormat>,
    value: &T,
    human: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output.unwrap_or(OutputFormat::Text) {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
        OutputFormat::Yaml => write!(out, "{}", serde_yaml::to_string(value)?)?,
        OutputFormat::Text => write!(out, "{}", human())?,
    }
    Ok(())
}
