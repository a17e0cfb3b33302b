//! `netboot flows SPEC`: every agent's flows through the API server, one
//! line per flow on stdout (`-o json`: the agent's line with `"node"`);
//! notes, warnings and progress on stderr.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::Context;
use netboot::flows::{self, wire, Event, FlowFilter, FlowsError, FollowOptions};

use super::args::{FlowsArgs, OutputFormat};
use super::settings;

/// The filters the flags ask for, checked before connecting.
pub fn query(args: &FlowsArgs) -> anyhow::Result<FlowFilter> {
    Ok(FlowFilter::from_flags(
        args.service.as_deref(),
        args.pod.as_deref(),
        args.verdict.as_deref(),
        args.proto.as_deref(),
    )?)
}

/// One flow as printed: text (the contract's rendering, after the node) or
/// the agent's JSON with `"node"`. Err: a flow the text rendering cannot read.
pub fn format_flow(
    json: bool,
    node: &str,
    line: &str,
    flow: &serde_json::Map<String, serde_json::Value>,
    client_pod: Option<&str>,
) -> Result<String, String> {
    if json {
        Ok(wire::annotate_with(line, flow, node, client_pod))
    } else {
        wire::flow_from_map(flow).map(|f| wire::render(&f, Some(node), client_pod))
    }
}

/// The line on stderr for everything but flows.
pub fn note(e: &Event<'_>) -> Option<String> {
    Some(match e {
        Event::Skipped { node, reason } => format!("netboot flows: {node}: skipped: {reason}"),
        Event::Connecting { nodes } => format!(
            "netboot flows: connecting to {} through the API server…",
            agents(nodes)
        ),
        Event::Up { nodes } => format!("following flows from {}", agents(nodes)),
        Event::Lost { node, count } => {
            format!("netboot flows: {node}: {count} flows lost (this client read too slowly)")
        }
        Event::Unreadable { node, line, reason } => {
            format!("netboot flows: {node}: unreadable line ({reason}): {line}")
        }
        Event::Retrying { node, reason } => format!("netboot flows: {node}: {reason}; retrying"),
        Event::Reconnected { node } => format!("netboot flows: {node}: reconnected"),
        Event::Joined { node } => format!("following flows from {node} (joined)"),
        Event::Flow { .. } => return None,
    })
}

/// `3 agents (node-0, node-1, node-2)`.
fn agents(nodes: &[String]) -> String {
    format!(
        "{} agent{} ({})",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        nodes.join(", ")
    )
}

pub async fn run(args: &FlowsArgs, output: Option<OutputFormat>) -> anyhow::Result<ExitCode> {
    let json = match output {
        None | Some(OutputFormat::Text) => false,
        Some(OutputFormat::Json) => true,
        Some(OutputFormat::Yaml) => {
            anyhow::bail!("-o yaml: flows are printed as text or json (one JSON object per line)")
        }
    };
    let query = query(args)?;
    let (spec, conn) =
        settings::spec_and_connection(&args.spec, &args.source, &args.cluster).await?;
    let opts = FollowOptions {
        namespace: spec.namespace.clone(),
        port: spec.datapath.health_port,
        nodes: args.nodes.clone(),
        query,
        ..FollowOptions::default()
    };
    let mut seen = 0u64;
    let mut clients = flows::clients::ClientPods::start(&conn.client);
    let res = flows::follow(&conn.client, &opts, |e| {
        let Event::Flow { node, line, flow } = e else {
            if let Some(n) = note(&e) {
                eprintln!("{n}");
            }
            return ControlFlow::Continue(());
        };
        let client_pod = flow
            .get("client_pod_uid")
            .and_then(|u| u.as_str())
            .and_then(|uid| clients.name(uid));
        match format_flow(json, node, line, flow, client_pod.as_deref()) {
            Ok(line) => {
                // stdout gone (`| head`): done.
                if writeln!(std::io::stdout(), "{line}").is_err() {
                    return ControlFlow::Break(());
                }
                seen += 1;
            }
            Err(reason) => eprintln!("netboot flows: {node}: unreadable flow ({reason})"),
        }
        match args.count {
            Some(n) if seen >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    })
    .await;
    match res {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ FlowsError::Unreachable(_)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e).with_context(|| format!("{}: following flows", args.spec.display())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;
    use crate::cli::args::{Cli, Command};

    fn parse(argv: &[&str]) -> Result<(FlowsArgs, Option<OutputFormat>), String> {
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Flows(a) => Ok((a, cli.global.output)),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn flags_become_the_agents_query() {
        let (a, out) = parse(&[
            "netboot",
            "flows",
            "clusters/prod.yaml",
            "--node",
            "node-1",
            "--node",
            "node-2",
            "--service",
            "shop/web",
            "--verdict",
            "refused",
            "--proto",
            "udp",
            "-n",
            "5",
            "-o",
            "json",
            "--context",
            "prod",
        ])
        .unwrap();
        assert_eq!(a.nodes, ["node-1", "node-2"]);
        assert_eq!(a.count, Some(5));
        assert_eq!(out, Some(OutputFormat::Json));
        assert_eq!(a.cluster.context.as_deref(), Some("prod"));
        assert_eq!(
            query(&a).unwrap().path(),
            "/v1/flows?service=shop/web&verdict=refused&proto=udp"
        );
    }

    #[test]
    fn bad_flags_are_usage_errors_before_connecting() {
        let err = |argv: &[&str]| {
            let mut full = vec!["netboot", "flows", "c.yaml"];
            full.extend(argv);
            match parse(&full) {
                Err(e) => e.lines().next().unwrap_or("").to_string(),
                Ok((a, _)) => query(&a).unwrap_err().to_string(),
            }
        };
        insta::assert_snapshot!([
            err(&["--verdict", "dropped"]),
            err(&["--proto", "sctp"]),
            err(&["--service", "web"]),
            err(&["--pod", "shop/web/1"]),
            err(&["-n", "0"]),
        ]
        .join("\n"));
    }

    #[test]
    fn each_flow_is_one_line_prefixed_with_its_node() {
        let line = r#"{"time_unix_ns":1764763200123000000,"hook":"sendmsg","proto":"udp","family":4,"verdict":"affinity-hit","reason":"sendmsg_affinity","client_netns_cookie":8,"client_cgroup_id":9,"service_id":4,"service":"kube-system/kube-dns","port_name":"dns","frontend_ip":"10.96.0.10","frontend_port":53,"backend_id":2,"backend_ip":"10.244.1.3","backend_port":53,"backend_pod":"kube-system/coredns-1"}"#;
        let flow: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let text = format_flow(false, "node-1", line, &flow, None).unwrap();
        let json = format_flow(true, "node-1", line, &flow, None).unwrap();
        insta::assert_snapshot!(format!("{text}\n{json}"));
        let bad_line = r#"{"verdict":"refused"}"#;
        let bad: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(bad_line).unwrap();
        assert!(format_flow(false, "n", bad_line, &bad, None).is_err());
        assert_eq!(
            format_flow(true, "n", bad_line, &bad, None).unwrap(),
            r#"{"node":"n","verdict":"refused"}"#
        );
    }

    #[test]
    fn stderr_says_what_is_followed_and_what_went_wrong() {
        let nodes = ["node-0".to_string(), "node-1".into(), "node-2".into()];
        let lines: Vec<String> = [
            Event::Skipped {
                node: "node-3",
                reason: "pod nd-x Pending, not Running",
            },
            Event::Connecting { nodes: &nodes },
            Event::Up { nodes: &nodes },
            Event::Up { nodes: &nodes[..1] },
            Event::Lost {
                node: "node-0",
                count: 12,
            },
            Event::Unreadable {
                node: "node-0",
                line: "[1]",
                reason: "not a JSON object",
            },
            Event::Retrying {
                node: "node-1",
                reason: "pod nd-b: the agent ended the stream",
            },
            Event::Reconnected { node: "node-1" },
        ]
        .iter()
        .filter_map(note)
        .collect();
        insta::assert_snapshot!(lines.join("\n"));
        assert_eq!(
            note(&Event::Joined { node: "node-3" }).as_deref(),
            Some("following flows from node-3 (joined)")
        );
    }
}
