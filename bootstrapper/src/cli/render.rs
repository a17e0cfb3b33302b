//! `netboot render SPEC`: the manifests netboot would apply, deterministic bytes.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use netboot::render::{self, RenderOptions};
use netboot::spec::{self, ApiServer};
use serde_json::json;

use super::args::{OutputFormat, RenderArgs};

pub fn run(args: &RenderArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let file = args.spec.display().to_string();
    let cluster = spec::load(&args.spec)?;
    let api_server = args.api_server.as_deref().map(parse_endpoint).transpose()?;
    let opts = RenderOptions {
        templates: args.templates.dir.clone(),
        api_server,
    };
    let manifests = render::render(&cluster, &file, &opts)?;
    let mut out = std::io::stdout().lock();
    match output.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Yaml | OutputFormat::Text => {
            out.write_all(render::to_yaml(&manifests)?.as_bytes())?
        }
        OutputFormat::Json => {
            let items: Vec<_> = manifests.iter().map(|m| m.object.clone()).collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
            writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `HOST:PORT` from the command line.
pub fn parse_endpoint(s: &str) -> anyhow::Result<ApiServer> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("--api-server {s}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--api-server {s}: `{port}` is not a port"))?;
    anyhow::ensure!(
        !host.is_empty() && !host.contains("://"),
        "--api-server {s}: expected HOST:PORT, not a URL"
    );
    // An IPv6 address may come bracketed: [fd00::1]:6443.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    netboot::spec::grammar::host(host).with_context(|| format!("--api-server {s}"))?;
    Ok(ApiServer {
        host: host.to_string(),
        port,
    })
}
