//! The agent's `/v1/flows` as the bootstrapper reads it: the query it takes,
//! the lines it sends, and the one-line text rendering `netboot-datapath
//! monitor` prints. The agent defines them (datapath/src/flows.rs: `Flow`,
//! `FlowFilter::query`, `render`); the crates share only this JSON, so the
//! few fields read here are mirrored, and unknown ones pass through.

use std::net::IpAddr;

use serde::Deserialize;

/// The verdicts the agent names (datapath `Verdict::name`), in its order.
pub const VERDICTS: [&str; 6] = [
    "translated",
    "affinity-hit",
    "refused",
    "error",
    "observed",
    "source-range",
];

/// What to ask every agent for (`/v1/flows?service=…&pod=…&verdict=…&proto=…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowQuery {
    /// `namespace/name` of the Service.
    pub service: Option<String>,
    /// `namespace/name` of the backend pod.
    pub pod: Option<String>,
    /// One of [`VERDICTS`].
    pub verdict: Option<String>,
    /// `tcp` or `udp`.
    pub proto: Option<String>,
}

/// A filter the agent would refuse (400), named by its flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} {value}: {expected}")]
pub struct QueryError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What was given.
    pub value: String,
    /// What is accepted.
    pub expected: String,
}

impl FlowQuery {
    /// Checks the filters as the agent will (so a typo fails before
    /// connecting): `namespace/name`, a known verdict, `tcp` or `udp`.
    pub fn validate(&self) -> Result<(), QueryError> {
        let bad = |flag, value: &str, expected: String| QueryError {
            flag,
            value: value.into(),
            expected,
        };
        for (flag, v) in [("service", &self.service), ("pod", &self.pod)] {
            if let Some(v) = v.as_deref() {
                let ok = v.split_once('/').is_some_and(|(ns, name)| {
                    !ns.is_empty() && !name.is_empty() && !name.contains('/')
                });
                if !ok {
                    return Err(bad(flag, v, "namespace/name".into()));
                }
            }
        }
        if let Some(v) = self.verdict.as_deref().filter(|v| !VERDICTS.contains(v)) {
            return Err(bad("verdict", v, format!("one of {}", VERDICTS.join(", "))));
        }
        if let Some(p) = self.proto.as_deref().filter(|p| *p != "tcp" && *p != "udp") {
            return Err(bad("proto", p, "tcp or udp".into()));
        }
        Ok(())
    }

    /// The query string. Every byte but letters, digits, `-._~/` is
    /// `%XX`-encoded (the agent's `FlowFilter::parse` decodes them; a `+`
    /// would be a space to it, a space or newline would break the request line).
    pub fn query(&self) -> String {
        let enc = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        [
            ("service", &self.service),
            ("pod", &self.pod),
            ("verdict", &self.verdict),
            ("proto", &self.proto),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| format!("{k}={}", enc(v))))
        .collect::<Vec<_>>()
        .join("&")
    }

    /// The request path.
    pub fn path(&self) -> String {
        match self.query() {
            q if q.is_empty() => "/v1/flows".into(),
            q => format!("/v1/flows?{q}"),
        }
    }
}

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

/// The fields [`render`] reads (datapath `Flow`; the rest are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct Flow {
    /// Wall-clock ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The verdict's name.
    pub verdict: String,
    /// The client's network namespace cookie.
    pub client_netns_cookie: u64,
    /// The client pod's UID, when the agent found it from the cgroup.
    #[serde(default)]
    pub client_pod_uid: Option<String>,
    /// Per-packet path: the client's address and port.
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
    /// Its port.
    #[serde(default)]
    pub client_port: Option<u16>,
    /// Service id (rev-nat id).
    pub service_id: u32,
    /// `namespace/name` of the Service, when the agent knew it.
    #[serde(default)]
    pub service: Option<String>,
    /// The Service port's name, when known and named.
    #[serde(default)]
    pub port_name: Option<String>,
    /// The address the client asked for.
    pub frontend_ip: IpAddr,
    /// Its port.
    pub frontend_port: u16,
    /// The backend chosen.
    #[serde(default)]
    pub backend_id: Option<u32>,
    /// Its address.
    #[serde(default)]
    pub backend_ip: Option<IpAddr>,
    /// Its port.
    #[serde(default)]
    pub backend_port: Option<u16>,
    /// `namespace/name` of the backend's pod.
    #[serde(default)]
    pub backend_pod: Option<String>,
}

impl Flow {
    /// From a flow line's object.
    pub fn from_map(m: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        Flow::deserialize(serde_json::Value::Object(m.clone())).map_err(|e| e.to_string())
    }
}

fn addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(a) => format!("[{a}]:{port}"),
        IpAddr::V4(a) => format!("{a}:{port}"),
    }
}

/// The datapath's `render`, prefixed with the node:
/// `NODE  TIME  netns:COOKIE  →  ns/svc:port (VIP:port/proto)  →  pod ip:port  VERDICT`.
pub fn render(node: &str, flow: &Flow) -> String {
    render_with(node, flow, None)
}

/// As [`render`], naming the client `client_pod` (namespace/name) when
/// known, else by its pod UID, else by its netns cookie.
pub fn render_with(node: &str, flow: &Flow, client_pod: Option<&str>) -> String {
    let secs = flow.time_unix_ns / 1_000_000_000;
    let ms = (flow.time_unix_ns / 1_000_000) % 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let fe = addr(flow.frontend_ip, flow.frontend_port);
    let svc = match (&flow.service, &flow.port_name) {
        (Some(s), Some(p)) => format!("{s}:{p} ({fe}/{})", flow.proto),
        (Some(s), None) => format!("{s}:{} ({fe}/{})", flow.frontend_port, flow.proto),
        _ => format!("service#{} ({fe}/{})", flow.service_id, flow.proto),
    };
    let be = match (flow.backend_ip, flow.backend_port) {
        (Some(ip), Some(port)) => match &flow.backend_pod {
            Some(p) => format!("{p} {}", addr(ip, port)),
            None => format!(
                "backend#{} {}",
                flow.backend_id.unwrap_or(0),
                addr(ip, port)
            ),
        },
        _ => "-".into(),
    };
    let client = match (
        client_pod,
        &flow.client_pod_uid,
        flow.client_ip,
        flow.client_port,
    ) {
        (Some(p), ..) => p.to_string(),
        (None, Some(uid), ..) => format!("pod-uid:{uid}"),
        (None, None, Some(ip), Some(port)) => addr(ip, port),
        _ => format!("netns:{}", flow.client_netns_cookie),
    };
    format!(
        "{node}  {h:02}:{m:02}:{s:02}.{ms:03}  {client}  →  {svc}  →  {be}  {}",
        flow.verdict.to_ascii_uppercase()
    )
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
    fn query_encodes_like_the_agent_and_skips_unset_filters() {
        assert_eq!(FlowQuery::default().path(), "/v1/flows");
        let q = FlowQuery {
            service: Some("shop/web".into()),
            pod: Some("shop/a&b=c%+ \n".into()),
            verdict: Some("refused".into()),
            proto: Some("tcp".into()),
        };
        assert_eq!(
            q.path(),
            "/v1/flows?service=shop/web&pod=shop/a%26b%3Dc%25%2B%20%0A&verdict=refused&proto=tcp"
        );
        let only = FlowQuery {
            verdict: Some("affinity-hit".into()),
            ..FlowQuery::default()
        };
        assert_eq!(only.query(), "verdict=affinity-hit");
    }

    #[test]
    fn filters_the_agent_would_refuse_fail_before_connecting() {
        let q = |f: fn(&mut FlowQuery)| {
            let mut q = FlowQuery::default();
            f(&mut q);
            q.validate().map_err(|e| e.to_string())
        };
        assert_eq!(q(|_| {}), Ok(()));
        assert_eq!(q(|q| q.service = Some("shop/web".into())), Ok(()));
        assert_eq!(
            q(|q| q.service = Some("web".into())),
            Err("--service web: namespace/name".into())
        );
        assert_eq!(
            q(|q| q.pod = Some("a/b/c".into())),
            Err("--pod a/b/c: namespace/name".into())
        );
        assert_eq!(
            q(|q| q.pod = Some("/b".into())),
            Err("--pod /b: namespace/name".into())
        );
        assert_eq!(
            q(|q| q.verdict = Some("dropped".into())),
            Err("--verdict dropped: one of translated, affinity-hit, refused, error, observed, source-range".into())
        );
        assert_eq!(
            q(|q| q.proto = Some("sctp".into())),
            Err("--proto sctp: tcp or udp".into())
        );
        for v in VERDICTS {
            let q = FlowQuery {
                verdict: Some(v.into()),
                ..FlowQuery::default()
            };
            assert_eq!(q.validate(), Ok(()), "{v}");
        }
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
            .map(|l| render("node-1", &Flow::from_map(&flow(l)).unwrap()))
            .join("\n");
        insta::assert_snapshot!(lines);
        let no_pod = TRANSLATED.replace(r#","backend_pod":"shop/web-1""#, "");
        let no_port_name = no_pod.replace(r#","port_name":"http""#, "");
        let line = render("n", &Flow::from_map(&flow(&no_port_name)).unwrap());
        assert!(
            line.ends_with(
                "→  shop/web:80 (10.96.0.10:80/tcp)  →  backend#9 10.0.1.5:8080  TRANSLATED"
            ),
            "{line}"
        );
        assert!(Flow::from_map(&flow(r#"{"verdict":"refused"}"#)).is_err());
        // The client: its pod's name, else its UID, else its netns.
        let with_uid = TRANSLATED.replace(
            r#""client_cgroup_id":77,"#,
            r#""client_cgroup_id":77,"client_pod_uid":"3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f","#,
        );
        let f = Flow::from_map(&flow(&with_uid)).unwrap();
        assert!(render_with("n", &f, Some("shop/client")).contains("  shop/client  →  "));
        assert!(render("n", &f).contains("  pod-uid:3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f  →  "));
        let j = annotate_with(&with_uid, &flow(&with_uid), "n", Some("shop/client"));
        assert!(
            j.starts_with(r#"{"node":"n","client_pod":"shop/client","time_unix_ns""#),
            "{j}"
        );
    }
}
