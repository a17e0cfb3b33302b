//! The agent's `/v1/flows` as the bootstrapper reads it. The record, its
//! verdicts, the query and the text rendering are the contract's
//! ([`netboot_contract::flows`], shared with the agent and `netboot-datapath
//! monitor`); what is here is the stream's lines: heartbeats, losses and
//! flows, kept as the agent's JSON so that `-o json` passes every field
//! through (with `"node"` first), even one this build does not know.

use serde::Deserialize;

pub use netboot_contract::flows::{render, Flow, FlowFilter, Verdict};

/// One line of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// An empty line: the agent checking that the watcher is still there.
    Heartbeat,
    /// `{"lost":N}`: this watcher read too slowly and N flows were dropped.
    Lost(u64),
    /// A flow: the JSON object as the agent sent it.
    Flow(serde_json::Map<String, serde_json::Value>),
    /// Anything else (not a JSON object), with why.
    Unreadable(String),
}

/// Classifies one line (without its newline).
pub fn classify(line: &str) -> Line {
    let line = line.trim();
    if line.is_empty() {
        return Line::Heartbeat;
    }
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(m)) => match (m.len(), m.get("lost").and_then(|n| n.as_u64()))
        {
            (1, Some(n)) => Line::Lost(n),
            _ => Line::Flow(m),
        },
        Ok(_) => Line::Unreadable("not a JSON object".into()),
        Err(e) => Line::Unreadable(e.to_string()),
    }
}

/// The agent's JSON line with `"node"` first and the agent's fields after
/// it, byte for byte. `flow` is the line's object ([`classify`]); should the
/// agent ever send a `"node"` itself, it is replaced (and the fields sorted).
pub fn annotate(
    line: &str,
    flow: &serde_json::Map<String, serde_json::Value>,
    node: &str,
) -> String {
    annotate_with(line, flow, node, None)
}

/// As [`annotate`], with `"client_pod"` (namespace/name) after `"node"`
/// when `netboot flows` named the client.
pub fn annotate_with(
    line: &str,
    flow: &serde_json::Map<String, serde_json::Value>,
    node: &str,
    client_pod: Option<&str>,
) -> String {
    let mut node_json = serde_json::Value::from(node).to_string();
    if let Some(c) = client_pod.filter(|_| !flow.contains_key("client_pod")) {
        node_json = format!("{node_json},\"client_pod\":{}", serde_json::Value::from(c));
    }
    let rest = line.trim().strip_prefix('{').map(str::trim_start);
    match rest {
        Some(rest) if !flow.contains_key("node") => {
            if rest.starts_with('}') {
                format!("{{\"node\":{node_json}}}")
            } else {
                format!("{{\"node\":{node_json},{rest}")
            }
        }
        _ => {
            let mut m = flow.clone();
            m.remove("node");
            let fields = serde_json::Value::Object(m).to_string();
            match fields.strip_prefix('{') {
                Some("}") | None => format!("{{\"node\":{node_json}}}"),
                Some(rest) => format!("{{\"node\":{node_json},{rest}"),
            }
        }
    }
}

/// The record of a flow line's object ([`classify`]); Err: why it is not
/// one (a required field missing or of the wrong type, an unknown verdict).
pub fn flow_from_map(m: &serde_json::Map<String, serde_json::Value>) -> Result<Flow, String> {
    Flow::deserialize(serde_json::Value::Object(m.clone())).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A translated flow as the agent serves it (datapath flows.rs tests).
    const TRANSLATED: &str = r#"{"time_unix_ns":5000001000,"hook":"connect","proto":"tcp","family":4,"verdict":"translated","reason":"connect_translated","client_netns_cookie":4097,"client_cgroup_id":77,"service_id":3,"service":"shop/web","port_name":"http","frontend_ip":"10.96.0.10","frontend_port":80,"backend_id":9,"backend_ip":"10.0.1.5","backend_port":8080,"backend_pod":"shop/web-1"}"#;
    /// A refused one: no backend, no names.
    const REFUSED: &str = r#"{"time_unix_ns":45296789000000,"hook":"connect","proto":"udp","family":6,"verdict":"refused","reason":"no_backend","client_netns_cookie":1,"client_cgroup_id":2,"service_id":12,"frontend_ip":"fd00::a","frontend_port":53}"#;

    fn flow(line: &str) -> serde_json::Map<String, serde_json::Value> {
        match classify(line) {
            Line::Flow(m) => m,
            other => panic!("not a flow: {other:?}"),
        }
    }

    #[test]
    fn the_query_is_the_contracts_and_skips_unset_filters() {
        assert_eq!(FlowFilter::default().path(), "/v1/flows");
        let q = FlowFilter {
            service: Some("shop/web".into()),
            pod: Some("shop/a&b=c%+ \n".into()),
            verdict: Some(Verdict::Refused),
            proto: Some("tcp".into()),
        };
        assert_eq!(
            q.path(),
            "/v1/flows?service=shop/web&pod=shop/a%26b%3Dc%25%2B%20%0A&verdict=refused&proto=tcp"
        );
        // What the agent parses back.
        assert_eq!(FlowFilter::parse(&q.query()), Ok(q));
        let only = FlowFilter {
            verdict: Some(Verdict::AffinityHit),
            ..FlowFilter::default()
        };
        assert_eq!(only.query(), "verdict=affinity-hit");
    }

    #[test]
    fn lines_are_heartbeats_losses_flows_or_unreadable() {
        assert_eq!(classify(""), Line::Heartbeat);
        assert_eq!(classify("\r"), Line::Heartbeat);
        assert_eq!(classify(r#"{"lost":17}"#), Line::Lost(17));
        assert!(matches!(classify(TRANSLATED), Line::Flow(_)));
        // A flow that happened to have a "lost" field is still a flow.
        assert!(matches!(
            classify(r#"{"lost":1,"verdict":"error"}"#),
            Line::Flow(_)
        ));
        assert!(matches!(classify("[1,2]"), Line::Unreadable(_)));
        assert!(matches!(
            classify("{\"time_unix_ns\":"),
            Line::Unreadable(_)
        ));
    }

    #[test]
    fn json_output_is_the_agents_line_with_node_first() {
        let out = annotate(TRANSLATED, &flow(TRANSLATED), "node-1");
        assert_eq!(out, TRANSLATED.replacen('{', r#"{"node":"node-1","#, 1));
        insta::assert_snapshot!(out);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["node"], "node-1");
        assert_eq!(v["backend_pod"], "shop/web-1");
        // Every field of the agent's line survives.
        let back: serde_json::Map<_, _> = serde_json::from_str(&out).unwrap();
        assert_eq!(back.len(), flow(TRANSLATED).len() + 1);
        // Odd node names stay valid JSON; the agent's own "node" is replaced.
        let odd = r#" { "b":2,"node":"x","a":1} "#;
        assert_eq!(
            annotate(odd, &flow(odd), "n\"1\\"),
            r#"{"node":"n\"1\\","a":1,"b":2}"#
        );
        assert_eq!(annotate(" { } ", &flow("{}"), "n"), r#"{"node":"n"}"#);
        assert_eq!(
            annotate(r#"{ "a":1}"#, &flow(r#"{"a":1}"#), "n"),
            r#"{"node":"n","a":1}"#
        );
    }

    #[test]
    fn text_output_is_the_datapath_rendering_prefixed_with_the_node() {
        let lines = [TRANSLATED, REFUSED]
            .map(|l| render(&flow_from_map(&flow(l)).unwrap(), Some("node-1"), None))
            .join("\n");
        insta::assert_snapshot!(lines);
        let no_pod = TRANSLATED.replace(r#","backend_pod":"shop/web-1""#, "");
        let no_port_name = no_pod.replace(r#","port_name":"http""#, "");
        let line = render(
            &flow_from_map(&flow(&no_port_name)).unwrap(),
            Some("n"),
            None,
        );
        assert!(
            line.ends_with(
                "→  shop/web:80 (10.96.0.10:80/tcp)  →  backend#9 10.0.1.5:8080  TRANSLATED"
            ),
            "{line}"
        );
        assert!(flow_from_map(&flow(r#"{"verdict":"refused"}"#)).is_err());
        // A verdict this build does not know: not a flow for the text form
        // (-o json passes it through).
        assert!(flow_from_map(&flow(&TRANSLATED.replace("translated\"", "rerouted\""))).is_err());
        // The client: its pod's name, else its UID, else its netns.
        let with_uid = TRANSLATED.replace(
            r#""client_cgroup_id":77,"#,
            r#""client_cgroup_id":77,"client_pod_uid":"3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f","#,
        );
        let f = flow_from_map(&flow(&with_uid)).unwrap();
        assert!(render(&f, Some("n"), Some("shop/client")).contains("  shop/client  →  "));
        assert!(render(&f, Some("n"), None)
            .contains("  pod-uid:3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f  →  "));
        let j = annotate_with(&with_uid, &flow(&with_uid), "n", Some("shop/client"));
        assert!(
            j.starts_with(r#"{"node":"n","client_pod":"shop/client","time_unix_ns""#),
            "{j}"
        );
    }
}
