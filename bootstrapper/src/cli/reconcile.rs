//! `netboot reconcile`: the long-running loop (or one pass with `--once`),
//! its metrics endpoint and its signals.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use netboot::reconcile::metrics::{self, Metrics};
use netboot::reconcile::{PassReport, Reconciler};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::args::{OutputFormat, ReconcileArgs};
use super::settings;

pub async fn run(args: &ReconcileArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let opts = settings::reconcile(args)?;
    let metrics = Arc::new(Metrics::default());
    let server = if args.metrics_addr == "off" {
        None
    } else {
        let listener = TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| format!("--metrics-addr {}: cannot listen", args.metrics_addr))?;
        tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
        Some(tokio::spawn(metrics::serve(listener, metrics.clone())))
    };
    let (tx, rx) = watch::channel(false);
    tokio::spawn(signals(tx));
    let mut reconciler = Reconciler::new(opts, metrics);
    let code = reconciler
        .run(args.once, rx, |report| {
            if let Err(e) = emit(output, report) {
                tracing::warn!("writing the report: {e}");
            }
        })
        .await;
    if let Some(s) = server {
        s.abort();
    }
    Ok(ExitCode::from(code))
}

/// The first SIGTERM/SIGINT asks the loop to stop after the step it is in;
/// a second one exits at once (a held Lease then expires on its own).
async fn signals(tx: watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        seen += 1;
        if seen == 1 {
            tracing::info!(
                "signal received: finishing the running step, then exiting (again to exit now)"
            );
            let _ = tx.send(true);
        } else {
            eprintln!("second signal: exiting now");
            std::process::exit(2);
        }
    }
}

/// A pass report: a table, or one JSON/YAML document per pass.
fn emit(output: Option<OutputFormat>, r: &PassReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output.unwrap_or(OutputFormat::Text) {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(r)?)?,
        OutputFormat::Yaml => write!(out, "---\n{}", serde_yaml::to_string(r)?)?,
        OutputFormat::Text => write!(out, "{}", format(r))?,
    }
    out.flush()?;
    Ok(())
}

fn format(r: &PassReport) -> String {
    let mut out = String::new();
    if let Some(e) = &r.source_error {
        let _ = writeln!(out, "source: {e}");
    }
    if r.clusters.is_empty() {
        return out;
    }
    let rev = r.revision.as_deref().unwrap_or("-");
    let _ = writeln!(out, "pass at {rev}");
    let w = r
        .clusters
        .iter()
        .map(|c| c.cluster.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let _ = writeln!(
        out,
        "{:<w$}  {:<11}  {:>8}  DETAIL",
        "CLUSTER", "RESULT", "SECONDS"
    );
    for c in &r.clusters {
        let mut detail = c.changes.clone();
        if !c.drift.is_empty() {
            let objects: Vec<String> = c.drift.iter().map(ToString::to_string).collect();
            let _ = write!(detail, "; drift: {}", objects.join(", "));
        }
        if let Some(e) = &c.error {
            if !detail.is_empty() {
                detail.push_str("; ");
            }
            detail.push_str(e.lines().next().unwrap_or_default());
        }
        let _ = writeln!(
            out,
            "{:<w$}  {:<11}  {:>8.1}  {detail}",
            c.cluster,
            c.result.as_str(),
            c.duration_seconds
        );
    }
    out
}
