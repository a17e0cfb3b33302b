//! Service flow records, as the agent serves them on `GET /v1/flows` (one
//! JSON object per line) and both binaries read them: `netboot-datapath
//! monitor` on the node, `netboot flows` through the API server.
//!
//! - [`Flow`]: the record, field for field the JSON the agent emits
//!   (optional fields are left out when unknown).
//! - [`Verdict`]: what happened, with the names used in JSON and filters.
//! - [`hook`]: where it was decided.
//! - [`FlowFilter`]: the query string (`service`, `pod`, `verdict`, `proto`),
//!   parsed by the agent and encoded by both clients.
//! - [`render`]: the one-line text form both clients print.
//!
//! The agent decodes the kernel's ring-buffer records into [`Flow`]s
//! (datapath/src/flows.rs); nothing kernel-specific lives here.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The names of the hooks a flow is decided at ([`Flow::hook`]).
pub mod hook {
    /// `connect()` of a TCP or connected UDP socket (socket LB).
    pub const CONNECT: &str = "connect";
    /// `sendmsg()` of an unconnected UDP socket (socket LB).
    pub const SENDMSG: &str = "sendmsg";
    /// A new external flow on the per-packet (tc) path: NodePort, LB and
    /// external IPs from outside the node.
    pub const PACKET: &str = "packet";
    /// A connected UDP socket destroyed by the agent because its backend
    /// was removed.
    pub const TERMINATE: &str = "terminate";
    /// Every hook name.
    pub const ALL: [&str; 4] = [CONNECT, SENDMSG, PACKET, TERMINATE];
}

/// The verdict of one decision, as flows and filters name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Translated to a backend chosen now.
    Translated,
    /// Translated to the backend of a ClientIP affinity entry.
    AffinityHit,
    /// No usable backend: the syscall failed with ECONNREFUSED.
    Refused,
    /// The reverse entry could not be recorded: the syscall failed with ENOMEM.
    Error,
    /// Coexist (observe) mode: looked up, not translated.
    Observed,
    /// An LB IP with source ranges: left to the per-packet path.
    SourceRange,
    /// Per-packet path: dropped, the client is outside the LB IP's
    /// `loadBalancerSourceRanges`.
    Denied,
    /// A connected UDP socket destroyed because its backend was removed; the
    /// backend fields name the removed backend (there is no new one).
    Terminated,
    /// The destination is no Service: left alone (only for a watcher that
    /// asks for this verdict; service id 0).
    NotAService,
    /// Neither TCP nor UDP: not looked up (only for a watcher that asks for
    /// this verdict; service id 0).
    Unsupported,
}

impl Verdict {
    /// Every verdict: the kernel's order, then the newer ones.
    pub const ALL: [Verdict; 10] = [
        Verdict::Translated,
        Verdict::AffinityHit,
        Verdict::Refused,
        Verdict::Error,
        Verdict::Observed,
        Verdict::SourceRange,
        Verdict::Denied,
        Verdict::Terminated,
        Verdict::NotAService,
        Verdict::Unsupported,
    ];

    /// The name used in JSON and filters.
    pub fn name(self) -> &'static str {
        match self {
            Self::Translated => "translated",
            Self::AffinityHit => "affinity-hit",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Observed => "observed",
            Self::SourceRange => "source-range",
            Self::Denied => "denied",
            Self::Terminated => "terminated",
            Self::NotAService => "not-a-service",
            Self::Unsupported => "unsupported",
        }
    }

    /// Whether the agent emits this verdict only to a watcher that asks for
    /// it: decisions about destinations that are no Service, which would
    /// otherwise flood every stream (and share its kernel budget).
    pub fn on_request_only(self) -> bool {
        matches!(self, Self::NotAService | Self::Unsupported)
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == s)
    }

    /// `translated, affinity-hit, …`: every name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Verdict::name).join(", ")
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One flow: a load-balancing decision on a Service address, as served by
/// `/v1/flows` (one JSON object per line). Names the agent could not
/// resolve are absent; the raw ids are always there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Wall-clock time of the decision, ns since the Unix epoch (converted
    /// from the kernel's CLOCK_MONOTONIC stamp).
    pub time_unix_ns: u64,
    /// `connect` (TCP, connected UDP), `sendmsg` (unconnected UDP),
    /// `packet` (a new external flow on the per-packet path: NodePort, LB
    /// and external IPs from outside the node), or `terminate` (a connected
    /// UDP socket destroyed because its backend was removed); see [`hook`].
    pub hook: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// 4 or 6 (IPv4-mapped destinations on IPv6 sockets count as 4).
    pub family: u8,
    /// What happened.
    pub verdict: Verdict,
    /// The kernel's outcome counter name (the precise reason).
    pub reason: String,
    /// The client's network namespace cookie (a pod is its netns).
    pub client_netns_cookie: u64,
    /// The client's cgroup v2 id.
    pub client_cgroup_id: u64,
    /// UID of the client's pod, from its cgroup's path (the agent's
    /// `podcgroup`); absent for host processes and unknown cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_pod_uid: Option<String>,
    /// Per-packet path: the client's address (an external client, or a
    /// node SNATed in front of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// Per-packet path: the client's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    /// Service id (rev-nat id, `service list`'s ID).
    pub service_id: u32,
    /// `namespace/name` of the Service, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The Service port's name, when known and named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// The address the client asked for (ClusterIP, externalIP, LB IP).
    pub frontend_ip: IpAddr,
    /// Its port.
    pub frontend_port: u16,
    /// The backend chosen (translated, affinity-hit), or removed (terminated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<u32>,
    /// Its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ip: Option<IpAddr>,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
    /// `namespace/name` of the backend's pod (EndpointSlice `targetRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_pod: Option<String>,
}

/// A filter parameter the agent refuses (it answers 400 with this text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A key other than `service`, `pod`, `verdict`, `proto`.
    #[error("unknown parameter {0:?} (service, pod, verdict, proto)")]
    Unknown(String),
    /// A known key with a value out of range.
    #[error("{param} {value:?}: {expected}")]
    Invalid {
        /// The parameter (also the clients' flag, without dashes).
        param: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: String,
    },
}

/// A filter flag a client refuses before connecting: `--verdict dropped: one
/// of translated, …`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} {value}: {expected}")]
pub struct FlagError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What was given.
    pub value: String,
    /// What is accepted.
    pub expected: String,
}

/// What a watcher wants to see
/// (`/v1/flows?service=ns/name&pod=ns/name&verdict=refused&proto=tcp`).
/// Unset filters pass everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// `namespace/name` of the Service.
    pub service: Option<String>,
    /// `namespace/name` of the backend pod.
    pub pod: Option<String>,
    /// The verdict.
    pub verdict: Option<Verdict>,
    /// `tcp` or `udp`.
    pub proto: Option<String>,
}

/// `%XX` and `+` decoding of one query component.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but letters, digits and `-._~/` as `%XX` (a `+` would be a
/// space to [`percent_decode`]; a space or newline would break the request
/// line).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `namespace/name`: two non-empty parts.
fn is_namespaced_name(v: &str) -> bool {
    v.split_once('/')
        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
}

/// Checks one parameter's value; Err: what is accepted.
fn check(param: &str, value: &str) -> Result<(), String> {
    match param {
        "service" | "pod" if !is_namespaced_name(value) => Err("namespace/name".into()),
        "verdict" if Verdict::parse(value).is_none() => Err(format!("one of {}", Verdict::names())),
        "proto" if value != "tcp" && value != "udp" => Err("tcp or udp".into()),
        _ => Ok(()),
    }
}

impl FlowFilter {
    /// From a client's flags, checked as the agent will check the query (so
    /// a typo fails before connecting): `namespace/name`, a known verdict,
    /// `tcp` or `udp`.
    pub fn from_flags(
        service: Option<&str>,
        pod: Option<&str>,
        verdict: Option<&str>,
        proto: Option<&str>,
    ) -> Result<Self, FlagError> {
        for (flag, v) in [
            ("service", service),
            ("pod", pod),
            ("verdict", verdict),
            ("proto", proto),
        ] {
            if let Some(v) = v {
                check(flag, v).map_err(|expected| FlagError {
                    flag,
                    value: v.into(),
                    expected,
                })?;
            }
        }
        Ok(Self {
            service: service.map(str::to_string),
            pod: pod.map(str::to_string),
            verdict: verdict.and_then(Verdict::parse),
            proto: proto.map(str::to_string),
        })
    }

    /// Parses a query string (without the `?`); an unknown key or a value
    /// out of range is an error, which says which.
    pub fn parse(query: &str) -> Result<Self, FilterError> {
        let mut f = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let param = match k {
                "service" => "service",
                "pod" => "pod",
                "verdict" => "verdict",
                "proto" => "proto",
                _ => return Err(FilterError::Unknown(k.to_string())),
            };
            check(param, &v).map_err(|expected| FilterError::Invalid {
                param,
                value: v.clone(),
                expected,
            })?;
            match param {
                "service" => f.service = Some(v),
                "pod" => f.pod = Some(v),
                "verdict" => f.verdict = Verdict::parse(&v),
                _ => f.proto = Some(v),
            }
        }
        Ok(f)
    }

    /// The query string for these filters (empty: none), which
    /// [`FlowFilter::parse`] reads back.
    pub fn query(&self) -> String {
        [
            ("service", self.service.as_deref()),
            ("pod", self.pod.as_deref()),
            ("verdict", self.verdict.map(Verdict::name)),
            ("proto", self.proto.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encode(v))))
        .collect::<Vec<_>>()
        .join("&")
    }

    /// The request path: `/v1/flows`, with the query when there is one.
    pub fn path(&self) -> String {
        match self.query() {
            q if q.is_empty() => "/v1/flows".into(),
            q => format!("/v1/flows?{q}"),
        }
    }

    /// Whether `flow` passes.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| flow.service.as_ref() == Some(s))
            && self
                .pod
                .as_ref()
                .is_none_or(|p| flow.backend_pod.as_ref() == Some(p))
            && self.verdict.is_none_or(|v| flow.verdict == v)
            && self.proto.as_ref().is_none_or(|p| flow.proto == *p)
    }
}

/// `ip:port`, `[ip6]:port`.
fn addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(a) => format!("[{a}]:{port}"),
        IpAddr::V4(a) => format!("{a}:{port}"),
    }
}

/// The one-line text form of a flow, as `netboot-datapath monitor` prints
/// it (`node` None) and `netboot flows` (`node` first):
///
/// `[NODE  ]TIME  CLIENT  →  ns/svc:port (VIP:port/proto)  →  BACKEND  VERDICT`
///
/// - CLIENT: `client_pod` (namespace/name, when the caller named it), else
///   `pod-uid:UID`, else the per-packet path's `ip:port`, else
///   `netns:COOKIE`.
/// - BACKEND: `ns/pod ip:port` (`backend#ID ip:port` when the pod is
///   unknown), `-` when there is none; a terminated flow's backend is the
///   removed one, marked `(removed)`.
pub fn render(flow: &Flow, node: Option<&str>, client_pod: Option<&str>) -> String {
    let secs = flow.time_unix_ns / 1_000_000_000;
    let ms = (flow.time_unix_ns / 1_000_000) % 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let fe = addr(flow.frontend_ip, flow.frontend_port);
    let svc = match (&flow.service, &flow.port_name) {
        (Some(s), Some(p)) => format!("{s}:{p} ({fe}/{})", flow.proto),
        (Some(s), None) => format!("{s}:{} ({fe}/{})", flow.frontend_port, flow.proto),
        // No Service at all (not-a-service, unsupported): the destination.
        _ if flow.service_id == 0 => format!("{fe}/{}", flow.proto),
        _ => format!("service#{} ({fe}/{})", flow.service_id, flow.proto),
    };
    let be = match (flow.backend_ip, flow.backend_port) {
        (Some(ip), Some(port)) => {
            let be = match &flow.backend_pod {
                Some(p) => format!("{p} {}", addr(ip, port)),
                None => format!(
                    "backend#{} {}",
                    flow.backend_id.unwrap_or(0),
                    addr(ip, port)
                ),
            };
            if flow.verdict == Verdict::Terminated {
                format!("{be} (removed)")
            } else {
                be
            }
        }
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
    let node = node.map(|n| format!("{n}  ")).unwrap_or_default();
    format!(
        "{node}{h:02}:{m:02}:{s:02}.{ms:03}  {client}  →  {svc}  →  {be}  {}",
        flow.verdict.name().to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    /// A translated flow, byte for byte as the agent serves it.
    const TRANSLATED: &str = r#"{"time_unix_ns":5000001000,"hook":"connect","proto":"tcp","family":4,"verdict":"translated","reason":"connect_translated","client_netns_cookie":4097,"client_cgroup_id":77,"service_id":3,"service":"shop/web","port_name":"http","frontend_ip":"10.96.0.10","frontend_port":80,"backend_id":9,"backend_ip":"10.0.1.5","backend_port":8080,"backend_pod":"shop/web-1"}"#;
    /// A refused one over IPv6: no backend, no names.
    const REFUSED: &str = r#"{"time_unix_ns":45296789000000,"hook":"connect","proto":"udp","family":6,"verdict":"refused","reason":"no_backend","client_netns_cookie":1,"client_cgroup_id":2,"service_id":12,"frontend_ip":"fd00::a","frontend_port":53}"#;
    /// A per-packet flow from an external client, with the client's pod UID
    /// absent and its address present.
    const PACKET: &str = r#"{"time_unix_ns":5000000000,"hook":"packet","proto":"tcp","family":4,"verdict":"translated","reason":"np_translated","client_netns_cookie":0,"client_cgroup_id":0,"client_ip":"172.18.0.3","client_port":41000,"service_id":3,"service":"shop/web","port_name":"http","frontend_ip":"172.18.1.1","frontend_port":30080,"backend_id":9,"backend_ip":"10.0.1.5","backend_port":8080,"backend_pod":"shop/web-1"}"#;
    /// A socket-hook flow whose client pod the agent found.
    const WITH_UID: &str = r#"{"time_unix_ns":5000001000,"hook":"sendmsg","proto":"udp","family":4,"verdict":"affinity-hit","reason":"sendmsg_affinity","client_netns_cookie":8,"client_cgroup_id":9,"client_pod_uid":"3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f","service_id":4,"frontend_ip":"10.96.0.10","frontend_port":53,"backend_id":2,"backend_ip":"10.244.1.3","backend_port":53}"#;

    fn flow(line: &str) -> Flow {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn agent_lines_round_trip_byte_for_byte() {
        for line in [TRANSLATED, REFUSED, PACKET, WITH_UID] {
            let f = flow(line);
            assert_eq!(serde_json::to_string(&f).unwrap(), line);
        }
        // Unknown fields (a newer agent) are ignored; a missing required one
        // is an error.
        let extra = TRANSLATED.replacen('{', r#"{"node":"n","#, 1);
        assert_eq!(flow(&extra), flow(TRANSLATED));
        assert!(serde_json::from_str::<Flow>(r#"{"verdict":"refused"}"#).is_err());
    }

    #[test]
    fn the_new_verdicts_and_hook_serialize_by_name() {
        let mut f = flow(TRANSLATED);
        f.hook = hook::TERMINATE.into();
        f.verdict = Verdict::Terminated;
        let j = serde_json::to_string(&f).unwrap();
        assert!(
            j.contains(r#""hook":"terminate","proto":"tcp","family":4,"verdict":"terminated""#),
            "{j}"
        );
        assert_eq!(flow(&j), f);
        for v in Verdict::ALL {
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.name())
            );
            assert_eq!(Verdict::parse(v.name()), Some(v));
        }
        assert_eq!(
            Verdict::names(),
            "translated, affinity-hit, refused, error, observed, source-range, denied, terminated, not-a-service, unsupported"
        );
        assert_eq!(Verdict::parse("dropped"), None);
        assert_eq!(hook::ALL, ["connect", "sendmsg", "packet", "terminate"]);
    }

    #[test]
    fn filters_parse_encode_and_round_trip() {
        let f = FlowFilter::parse("service=shop%2Fweb&verdict=refused&proto=tcp").unwrap();
        assert_eq!(f.service.as_deref(), Some("shop/web"));
        assert_eq!(f.verdict, Some(Verdict::Refused));
        assert_eq!(f.query(), "service=shop/web&verdict=refused&proto=tcp");
        assert_eq!(FlowFilter::parse(&f.query()).unwrap(), f);
        assert_eq!(FlowFilter::default().path(), "/v1/flows");
        let odd = FlowFilter {
            service: Some("shop/web".into()),
            pod: Some("shop/a&b=c%+ \n".into()),
            verdict: Some(Verdict::Denied),
            proto: Some("tcp".into()),
        };
        assert_eq!(
            odd.path(),
            "/v1/flows?service=shop/web&pod=shop/a%26b%3Dc%25%2B%20%0A&verdict=denied&proto=tcp"
        );
        assert_eq!(FlowFilter::parse(&odd.query()).unwrap(), odd);
        assert_eq!(FlowFilter::parse("").unwrap(), FlowFilter::default());
        let err = |q: &str| FlowFilter::parse(q).unwrap_err().to_string();
        assert_eq!(
            err("verdict=nope"),
            r#"verdict "nope": one of translated, affinity-hit, refused, error, observed, source-range, denied, terminated, not-a-service, unsupported"#
        );
        assert_eq!(err("proto=sctp"), r#"proto "sctp": tcp or udp"#);
        assert_eq!(err("service=web"), r#"service "web": namespace/name"#);
        assert_eq!(err("pod=a/b/c"), r#"pod "a/b/c": namespace/name"#);
        assert_eq!(
            err("colour=red"),
            r#"unknown parameter "colour" (service, pod, verdict, proto)"#
        );
    }

    #[test]
    fn flags_are_checked_as_the_agent_checks_the_query() {
        let ok = FlowFilter::from_flags(Some("shop/web"), None, Some("terminated"), Some("udp"));
        assert_eq!(
            ok.unwrap(),
            FlowFilter {
                service: Some("shop/web".into()),
                pod: None,
                verdict: Some(Verdict::Terminated),
                proto: Some("udp".into()),
            }
        );
        let err = |s, p, v, pr| FlowFilter::from_flags(s, p, v, pr).unwrap_err().to_string();
        assert_eq!(
            err(Some("web"), None, None, None),
            "--service web: namespace/name"
        );
        assert_eq!(
            err(None, Some("/b"), None, None),
            "--pod /b: namespace/name"
        );
        assert_eq!(
            err(None, None, Some("dropped"), None),
            "--verdict dropped: one of translated, affinity-hit, refused, error, observed, source-range, denied, terminated, not-a-service, unsupported"
        );
        assert_eq!(
            err(None, None, None, Some("sctp")),
            "--proto sctp: tcp or udp"
        );
    }

    #[test]
    fn filters_match_on_names_verdict_and_proto() {
        let ok = flow(TRANSLATED);
        let refused = flow(REFUSED);
        let f = FlowFilter::parse("verdict=refused&proto=udp").unwrap();
        assert!(f.matches(&refused) && !f.matches(&ok));
        let pod = FlowFilter::parse("pod=shop/web-1").unwrap();
        assert!(pod.matches(&ok) && !pod.matches(&refused));
        let svc = FlowFilter::parse("service=shop/web").unwrap();
        assert!(svc.matches(&ok) && !svc.matches(&refused));
        assert!(FlowFilter::default().matches(&refused));
    }

    #[test]
    fn one_rendering_with_or_without_the_node_and_client_pod() {
        let lines = [TRANSLATED, REFUSED, PACKET, WITH_UID]
            .map(|l| render(&flow(l), None, None))
            .join("\n");
        assert_eq!(
            lines,
            "00:00:05.000  netns:4097  →  shop/web:http (10.96.0.10:80/tcp)  →  shop/web-1 10.0.1.5:8080  TRANSLATED\n\
             12:34:56.789  netns:1  →  service#12 ([fd00::a]:53/udp)  →  -  REFUSED\n\
             00:00:05.000  172.18.0.3:41000  →  shop/web:http (172.18.1.1:30080/tcp)  →  shop/web-1 10.0.1.5:8080  TRANSLATED\n\
             00:00:05.000  pod-uid:3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f  →  service#4 (10.96.0.10:53/udp)  →  backend#2 10.244.1.3:53  AFFINITY-HIT"
        );
        let f = flow(WITH_UID);
        assert!(render(&f, Some("node-1"), Some("shop/client"))
            .starts_with("node-1  00:00:05.000  shop/client  →  "));
        // The client pod's name wins over an address, too.
        assert!(render(&flow(PACKET), None, Some("shop/client")).contains("  shop/client  →  "));
    }

    #[test]
    fn a_decision_on_no_service_renders_its_destination() {
        let mut f = flow(TRANSLATED);
        f.verdict = Verdict::NotAService;
        (f.service, f.port_name, f.service_id) = (None, None, 0);
        (f.backend_id, f.backend_ip, f.backend_port, f.backend_pod) = (None, None, None, None);
        assert_eq!(
            render(&f, None, None),
            "00:00:05.000  netns:4097  →  10.96.0.10:80/tcp  →  -  NOT-A-SERVICE"
        );
        assert!(Verdict::NotAService.on_request_only() && Verdict::Unsupported.on_request_only());
        assert!(!Verdict::Refused.on_request_only());
    }

    #[test]
    fn denied_and_terminated_flows_render() {
        let mut denied = flow(PACKET);
        denied.verdict = Verdict::Denied;
        denied.reason = "np_src_range_denied".into();
        (denied.backend_id, denied.backend_ip, denied.backend_port) = (None, None, None);
        denied.backend_pod = None;
        assert_eq!(
            render(&denied, Some("node-0"), None),
            "node-0  00:00:05.000  172.18.0.3:41000  →  shop/web:http (172.18.1.1:30080/tcp)  →  -  DENIED"
        );
        let mut gone = flow(TRANSLATED);
        gone.hook = hook::TERMINATE.into();
        gone.proto = "udp".into();
        gone.verdict = Verdict::Terminated;
        assert_eq!(
            render(&gone, None, None),
            "00:00:05.000  netns:4097  →  shop/web:http (10.96.0.10:80/udp)  →  shop/web-1 10.0.1.5:8080 (removed)  TERMINATED"
        );
        gone.backend_pod = None;
        assert!(
            render(&gone, None, None).ends_with("→  backend#9 10.0.1.5:8080 (removed)  TERMINATED")
        );
        gone.backend_ip = None;
        assert!(render(&gone, None, None).ends_with("→  -  TERMINATED"));
        assert_eq!(
            denied.client_ip,
            Some(IpAddr::V4(Ipv4Addr::new(172, 18, 0, 3)))
        );
    }
}
