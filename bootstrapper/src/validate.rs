//! Validation: a table of checks after cilium-cli's connectivity test.
//!
//! Cluster-side checks (kube-proxy present/absent, agents, API endpoint) run
//! here; the pod checks run inside a probe client pod against netboot's probe
//! workload (a Deployment of `netboot-probe serve` behind a ClusterIP
//! Service and a ClientIP-affinity Service), so they cross the real datapath.
//! Results collect into a [`ValidationReport`] that a separate function
//! formats as a table; `-o json` prints the struct.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Serialize;
use serde_json::json;

use crate::apply::{describe, FIELD_MANAGER};
use crate::cluster;
use crate::handover;
use crate::probe::{self, Check};
use crate::spec::{ApiServer, ClusterNetwork};
use crate::wait;

pub const PROBE: &str = "netboot-probe";
pub const PROBE_STICKY: &str = "netboot-probe-sticky";
/// The `internalTrafficPolicy: Local` Service over the probe pods.
pub const PROBE_LOCAL: &str = "netboot-probe-local";
/// The one-pod Deployment and its Service (`udp-backend-replaced`).
pub const PROBE_SINGLE: &str = "netboot-probe-single";
/// The NodePort Service over the probe pods (`node-port`).
pub const PROBE_NODE_PORT: &str = "netboot-probe-node-port";
/// The `externalTrafficPolicy: Local` LoadBalancer Service over the probe
/// pods (`external-traffic-local`): only a LoadBalancer Service gets a
/// `healthCheckNodePort`.
pub const PROBE_EXT_LOCAL: &str = "netboot-probe-ext-local";
/// The `loadBalancerClass` of [`PROBE_EXT_LOCAL`]: one no controller
/// implements, so validating never provisions a cloud load balancer (the
/// default controllers ignore Services with a class; the API server still
/// allocates the node ports).
pub const NO_LOAD_BALANCER_CLASS: &str = "netboot.io/validation-no-load-balancer";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

/// One check of the table: what it needs, what it shows, when it is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSpec {
    pub name: &'static str,
    /// What it runs against.
    pub needs: &'static [&'static str],
    /// What passing shows.
    pub shows: &'static str,
    /// When it says `skipped` (besides `spec.validation.skip`).
    pub skipped_when: &'static str,
}

const PROBES: &[&str] = &["probe workload"];

/// The checks, in the order they run (`spec::CHECKS` names them for
/// `spec.validation.skip`; a test keeps the two equal).
pub const TABLE: &[CheckSpec] = &[
    CheckSpec {
        name: "kube-proxy",
        needs: &[],
        shows: "kube-proxy is absent (replace) or present (coexist)",
        skipped_when: "",
    },
    CheckSpec {
        name: "agents",
        needs: &[],
        shows: "every node's agent is ready and reports the configured mode",
        skipped_when: "",
    },
    CheckSpec {
        name: "api-endpoint",
        needs: &[],
        shows: "the API server answers at the endpoint agents use",
        skipped_when: "",
    },
    CheckSpec {
        name: "pod-to-pod",
        needs: PROBES,
        shows: "a client pod reaches every probe pod by pod IP (TCP)",
        skipped_when: "",
    },
    CheckSpec {
        name: "pod-to-service",
        needs: PROBES,
        shows: "a client pod reaches the probe Service's ClusterIP over TCP and UDP",
        skipped_when: "",
    },
    CheckSpec {
        name: "session-affinity",
        needs: PROBES,
        shows: "ClientIP affinity: every connection to the sticky Service lands on one pod",
        skipped_when: "",
    },
    CheckSpec {
        name: "internal-traffic-local",
        needs: &["probe workload", "two schedulable nodes"],
        shows: "internalTrafficPolicy: Local — from a node with probe endpoints every TCP connection and UDP datagram lands on that node's endpoints; from a node with none, none is answered (refused or dropped, as kube-proxy drops)",
        skipped_when: "fewer than two schedulable nodes",
    },
    CheckSpec {
        name: "node-port",
        needs: &["probe workload", "nodes with an InternalIP"],
        shows: "a NodePort Service answers over TCP and UDP at every schedulable node's InternalIP, from a client pod (its own node's address and the others' across the node network) and from a node's host network (not in the reconciler's runs)",
        skipped_when: "no schedulable node has an InternalIP of the probe Service's family",
    },
    CheckSpec {
        name: "external-traffic-local",
        needs: &["probe workload", "two schedulable nodes"],
        shows: "externalTrafficPolicy: Local — each node's healthCheckNodePort answers as kube-proxy does (200 with the node's number of local endpoints, 503 on a node with none) and a connection to a node port reaches a probe pod with the client's own source address",
        skipped_when: "fewer than two schedulable nodes",
    },
    CheckSpec {
        name: "udp-backend-replaced",
        needs: &["probe workload (one-pod Deployment)"],
        shows: "a connected UDP socket survives its only backend's replacement: the socket fails (ECONNABORTED), is connected again and answered by the new pod within 5 s of its readiness (and 30 s of the old one's last answer)",
        skipped_when: "",
    },
    CheckSpec {
        name: "ipv4-mapped",
        needs: PROBES,
        shows: "an AF_INET6 socket reaches the probe Service at ::ffff:<IPv4 ClusterIP> over TCP and UDP",
        skipped_when: "the probe Service has no IPv4 ClusterIP; the client pod has no IPv6 sockets",
    },
    CheckSpec {
        name: "ipv6",
        needs: &["probe workload", "dual-stack Services and pods"],
        shows: "the probe Service (ipFamilyPolicy: PreferDualStack) answers at its IPv6 ClusterIP over TCP and UDP",
        skipped_when: "the API server has no IPv6 service range (no IPv6 ClusterIP); the probe pods have no IPv6 address",
    },
    CheckSpec {
        name: "pod-to-api",
        needs: PROBES,
        shows: "a client pod reaches kubernetes.default's ClusterIP",
        skipped_when: "",
    },
    CheckSpec {
        name: "dns",
        needs: &["probe workload", "cluster DNS"],
        shows: "a client pod resolves the probe Service's name to its ClusterIP",
        skipped_when: "",
    },
];

/// The checks run by probe pods, in table order.
const POD_CHECKS: &[&str] = &[
    "pod-to-pod",
    "pod-to-service",
    "session-affinity",
    "internal-traffic-local",
    "node-port",
    "external-traffic-local",
    "udp-backend-replaced",
    "ipv4-mapped",
    "ipv6",
    "pod-to-api",
    "dns",
];

/// What decides whether a check applies to this cluster. Fields that are
/// learnt only once the probe Service exists are `None` before that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `spec.validation.skip`.
    pub skip: Vec<String>,
    /// Nodes a probe pod can be scheduled on (not cordoned, no
    /// NoSchedule/NoExecute taint).
    pub schedulable_nodes: usize,
    /// The probe Service's ClusterIPs by family.
    pub cluster_ipv4: Option<bool>,
    pub cluster_ipv6: Option<bool>,
    /// Every probe pod has an IPv6 address.
    pub pods_ipv6: Option<bool>,
}

/// Why `check` does not apply, or `None` when it runs.
pub fn skip_reason(check: &str, f: &Facts) -> Option<String> {
    if f.skip.iter().any(|s| s == check) {
        return Some("skipped by spec.validation.skip".into());
    }
    match check {
        "internal-traffic-local" | "external-traffic-local" if f.schedulable_nodes < 2 => Some(format!(
            "the cluster has {} schedulable node(s): no node without a probe endpoint to test from",
            f.schedulable_nodes
        )),
        "ipv4-mapped" if f.cluster_ipv4 == Some(false) => {
            Some("the probe Service has no IPv4 ClusterIP (an IPv6-only cluster)".into())
        }
        "ipv6" if f.cluster_ipv6 == Some(false) => Some(
            "the API server gave the PreferDualStack probe Service no IPv6 ClusterIP: it has no IPv6 service range (--service-cluster-ip-range)".into(),
        ),
        "ipv6" if f.pods_ipv6 == Some(false) => Some(
            "the probe pods have no IPv6 address: the pod network is single-stack".into(),
        ),
        _ => None,
    }
}

/// Nodes a probe pod can land on, sorted: not cordoned, no NoSchedule or
/// NoExecute taint (the probe pods tolerate none).
pub fn schedulable(nodes: &[Node]) -> Vec<String> {
    let mut out: Vec<String> = nodes
        .iter()
        .filter(|n| {
            let spec = n.spec.as_ref();
            !spec.and_then(|s| s.unschedulable).unwrap_or(false)
                && !spec
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|ts| ts.iter().any(|t| t.effect != "PreferNoSchedule"))
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    out.sort();
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Passed,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub result: Verdict,
    pub detail: String,
    pub millis: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ValidationReport {
    pub checks: Vec<CheckResult>,
}

impl ValidationReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.result != Verdict::Failed)
    }
    pub fn failed(&self) -> Vec<&CheckResult> {
        self.checks
            .iter()
            .filter(|c| c.result == Verdict::Failed)
            .collect()
    }
    fn push(&mut self, name: &str, result: Verdict, detail: impl Into<String>, started: Instant) {
        self.checks.push(CheckResult {
            name: name.into(),
            result,
            detail: detail.into(),
            millis: ms(started),
        });
    }
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The report as an aligned table.
pub fn format_table(r: &ValidationReport) -> String {
    let width = r
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:<width$}  {:<7}  {:>7}  DETAIL\n",
        "CHECK", "RESULT", "TIME"
    );
    for c in &r.checks {
        let result = match c.result {
            Verdict::Passed => "passed",
            Verdict::Failed => "FAILED",
            Verdict::Skipped => "skipped",
        };
        out.push_str(&format!(
            "{:<width$}  {:<7}  {:>5}ms  {}\n",
            c.name, result, c.millis, c.detail
        ));
    }
    let passed = r
        .checks
        .iter()
        .filter(|c| c.result == Verdict::Passed)
        .count();
    out.push_str(&format!(
        "{passed} passed, {} failed, {} skipped\n",
        r.failed().len(),
        r.checks.len() - passed - r.failed().len()
    ));
    out
}

/// Settings for [`validate`].
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// The endpoint agents were given.
    pub api_server: ApiServer,
    /// The client config, to reach the endpoint with the same credentials.
    pub config: kube::Config,
    /// Whether kube-proxy should be present.
    pub expect_kube_proxy: bool,
    /// The mode agents should report.
    pub expect_replacement: bool,
    /// The probe pods' image.
    pub probe_image: String,
    pub timeout: Duration,
    /// Keep the probe workload afterwards (for debugging).
    pub keep_probes: bool,
    /// Run `node-port`'s host part (a client pod on a node's host network);
    /// false: skipped with the reason (the reconciler).
    pub host_network_probes: bool,
}

/// Runs every check not skipped by the spec and returns the report.
pub async fn validate(
    client: &Client,
    spec: &ClusterNetwork,
    opts: &ValidateOptions,
) -> ValidationReport {
    let mut report = ValidationReport::default();
    let skip = |name: &str| spec.validation.skip.iter().any(|s| s == name);
    let deadline = Instant::now() + opts.timeout;

    let t = Instant::now();
    if skip("kube-proxy") {
        report.push(
            "kube-proxy",
            Verdict::Skipped,
            "skipped by spec.validation.skip",
            t,
        );
    } else {
        match handover::kube_proxy_state(client, &spec.kube_proxy).await {
            Ok(s) if s.present() == opts.expect_kube_proxy => {
                let what = if s.present() {
                    "present, as coexist mode wants"
                } else {
                    "absent (DaemonSet, ConfigMap and pods)"
                };
                report.push("kube-proxy", Verdict::Passed, what, t);
            }
            Ok(s) => report.push(
                "kube-proxy",
                Verdict::Failed,
                format!(
                    "expected {}, found {s:?}",
                    if opts.expect_kube_proxy {
                        "present"
                    } else {
                        "absent"
                    }
                ),
                t,
            ),
            Err(e) => report.push("kube-proxy", Verdict::Failed, e.to_string(), t),
        }
    }

    let t = Instant::now();
    if skip("agents") {
        report.push(
            "agents",
            Verdict::Skipped,
            "skipped by spec.validation.skip",
            t,
        );
    } else {
        let not_ready = wait::agents_not_ready(client, &spec.namespace).await;
        let not_reporting = wait::nodes_not_reporting(client, opts.expect_replacement, false).await;
        match (not_ready, not_reporting) {
            (Ok(a), Ok(b)) if a.is_empty() && b.is_empty() => {
                let n = wait::node_names(client).await.map(|n| n.len()).unwrap_or(0);
                report.push(
                    "agents",
                    Verdict::Passed,
                    format!(
                        "{n} of {n} nodes ready, KubeProxyReplacement={}",
                        opts.expect_replacement
                    ),
                    t,
                );
            }
            (Ok(a), Ok(b)) => {
                let d: Vec<String> = a
                    .iter()
                    .chain(b.iter())
                    .map(|p| format!("{}: {}", p.node, p.reason))
                    .collect();
                report.push("agents", Verdict::Failed, d.join("; "), t);
            }
            (Err(e), _) | (_, Err(e)) => report.push("agents", Verdict::Failed, e.to_string(), t),
        }
    }

    let t = Instant::now();
    if skip("api-endpoint") {
        report.push(
            "api-endpoint",
            Verdict::Skipped,
            "skipped by spec.validation.skip",
            t,
        );
    } else {
        report.push_result("api-endpoint", api_endpoint(opts).await, t);
    }

    let t = Instant::now();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| format!("nodes: {}", describe(&e)));
    let facts = Facts {
        skip: spec.validation.skip.clone(),
        schedulable_nodes: nodes.as_ref().map(|n| schedulable(n).len()).unwrap_or(0),
        ..Default::default()
    };
    let skipped: BTreeMap<&str, String> = POD_CHECKS
        .iter()
        .filter_map(|c| skip_reason(c, &facts).map(|r| (*c, r)))
        .collect();
    let wanted: Vec<&str> = POD_CHECKS
        .iter()
        .copied()
        .filter(|c| !skipped.contains_key(c))
        .collect();
    let outcomes = match (&nodes, wanted.is_empty()) {
        (_, true) => Ok(vec![]),
        (Ok(nodes), false) => pod_checks_run(client, spec, opts, &wanted, nodes, deadline).await,
        (Err(e), false) => Err(e.clone()),
    };
    for name in POD_CHECKS {
        if let Some(reason) = skipped.get(name) {
            report.push(name, Verdict::Skipped, reason.clone(), t);
            continue;
        }
        match &outcomes {
            Ok(o) => report.checks.push(merge(name, o)),
            Err(e) => report.push(name, Verdict::Failed, format!("probe workload: {e}"), t),
        }
    }
    if !wanted.is_empty() && !opts.keep_probes {
        if let Err(e) = remove_probes(client, &spec.namespace).await {
            tracing::warn!("removing the probe workload: {e}");
        }
    }
    report
}

/// One check's result from the probe outcomes named `name` or `name/…`:
/// passed when all passed, skipped when all were skipped (with why).
pub fn merge(name: &str, outcomes: &[probe::Outcome]) -> CheckResult {
    let mine: Vec<&probe::Outcome> = outcomes
        .iter()
        .filter(|o| o.name == name || o.name.starts_with(&format!("{name}/")))
        .collect();
    let millis = mine.iter().map(|o| o.millis).sum();
    // Each distinct detail once; a host-network client's are marked so.
    let join = |os: &[&probe::Outcome]| {
        let mut out: Vec<String> = Vec::new();
        for o in os {
            let d = if o.name.contains("/host/") && !o.skipped {
                format!("from the host network: {}", o.detail)
            } else {
                o.detail.clone()
            };
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out.join("; ")
    };
    let (result, detail) = if mine.is_empty() {
        (Verdict::Failed, "no probe reported it".to_string())
    } else if mine.iter().all(|o| o.skipped) {
        (Verdict::Skipped, join(&mine[..1]))
    } else if mine.iter().all(|o| o.ok) {
        (Verdict::Passed, join(&mine))
    } else {
        let failed: Vec<&probe::Outcome> = mine.iter().copied().filter(|o| !o.ok).collect();
        (Verdict::Failed, join(&failed))
    };
    CheckResult {
        name: name.into(),
        result,
        detail,
        millis,
    }
}

impl ValidationReport {
    fn push_result(&mut self, name: &str, r: Result<String, String>, t: Instant) {
        match r {
            Ok(d) => self.push(name, Verdict::Passed, d, t),
            Err(d) => self.push(name, Verdict::Failed, d, t),
        }
    }
}

async fn api_endpoint(opts: &ValidateOptions) -> Result<String, String> {
    let mut config = opts.config.clone();
    let host = match opts.api_server.host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => opts.api_server.host.clone(),
    };
    let url = format!("https://{host}:{}", opts.api_server.port);
    config.cluster_url = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let conn = cluster::client_for(config).map_err(|e| e.to_string())?;
    let v = conn
        .client
        .apiserver_version()
        .await
        .map_err(|e| format!("{url}: {}", describe(&e)))?;
    Ok(format!("{url} answers: Kubernetes {}", v.git_version))
}

/// Every probe container: an unprivileged user, no capabilities, the
/// runtime's default seccomp profile, a read-only root filesystem (the probe
/// writes only its termination log, which the kubelet mounts). The pods get
/// no ServiceAccount token: the pod→API check is a TCP handshake.
static PROBE_SECURITY: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(|| {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
});

/// What the probe workload is made of for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// Probe pods of the main Deployment.
    pub replicas: i32,
    /// A node the main Deployment keeps off (the `internal-traffic-local`
    /// check's node without a local endpoint).
    pub keep_off: Option<String>,
    /// The `internalTrafficPolicy: Local` Service.
    pub local: bool,
    /// The one-pod Deployment and its Service (`udp-backend-replaced`).
    pub single: bool,
    /// The NodePort Service (`node-port`).
    pub node_port: bool,
    /// The `externalTrafficPolicy: Local` LoadBalancer Service
    /// (`external-traffic-local`).
    pub ext_local: bool,
}

/// The probe workload: the server Deployment behind the plain
/// (PreferDualStack), sticky and `internalTrafficPolicy: Local` Services;
/// the one-pod Deployment and its Service.
pub fn probe_objects(namespace: &str, image: &str, w: &Workload) -> Vec<serde_json::Value> {
    let labels = |name: &str| json!({"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "netboot", "netboot.io/probe": "true", "netboot.io/podnet": "true"});
    let selector = |name: &str| json!({"app.kubernetes.io/name": name});
    let service = |name: &str, app: &str, extra: serde_json::Value| {
        let mut spec = json!({
            "selector": selector(app),
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT},
                {"name": "udp", "protocol": "UDP", "port": 53, "targetPort": UDP_PORT},
            ],
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels(PROBE)}, "spec": spec})
    };
    let deployment = |name: &str, replicas: i32, keep_off: Option<&str>| {
        let mut pod = json!({
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector(name)}}],
            "containers": [{
                "name": "probe", "image": image,
                "command": ["netboot-probe", "serve", "--tcp-port", TCP_PORT.to_string(), "--udp-port", UDP_PORT.to_string()],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": TCP_PORT, "protocol": "TCP"}, {"containerPort": UDP_PORT, "protocol": "UDP"}],
                "readinessProbe": {"tcpSocket": {"port": TCP_PORT}, "periodSeconds": 2},
                "securityContext": PROBE_SECURITY.clone(),
            }],
        });
        if let Some(node) = keep_off {
            pod["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": [node]}]}]}}});
        }
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector(name)},
                "template": {"metadata": {"labels": labels(name)}, "spec": pod},
            },
        })
    };
    let mut out = vec![
        deployment(PROBE, w.replicas, w.keep_off.as_deref()),
        service(PROBE, PROBE, json!({"ipFamilyPolicy": "PreferDualStack"})),
        service(
            PROBE_STICKY,
            PROBE,
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}}),
        ),
    ];
    if w.local {
        out.push(service(
            PROBE_LOCAL,
            PROBE,
            json!({"internalTrafficPolicy": "Local"}),
        ));
    }
    if w.node_port {
        out.push(service(PROBE_NODE_PORT, PROBE, json!({"type": "NodePort"})));
    }
    if w.ext_local {
        out.push(service(
            PROBE_EXT_LOCAL,
            PROBE,
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "loadBalancerClass": NO_LOAD_BALANCER_CLASS}),
        ));
    }
    if w.single {
        out.push(deployment(PROBE_SINGLE, 1, None));
        out.push(service(PROBE_SINGLE, PROBE_SINGLE, json!({})));
    }
    out
}

/// A probe server pod, ready.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbePod {
    pub name: String,
    /// Its primary IP.
    pub ip: IpAddr,
    /// Every IP (`status.podIPs`).
    pub ips: Vec<IpAddr>,
    pub node: String,
}

/// The probe Service's ClusterIPs.
async fn cluster_ips(client: &Client, ns: &str, name: &str) -> Result<Vec<IpAddr>, String> {
    let s = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| format!("Service/{ns}/{name}: {}", describe(&e)))?;
    let spec = s.spec.unwrap_or_default();
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .unwrap_or_default()
        .iter()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.dedup();
    if ips.is_empty() {
        return Err(format!("Service/{ns}/{name} has no ClusterIP"));
    }
    Ok(ips)
}

/// The client pod runs of the `internal-traffic-local` check: from up to
/// two nodes with probe pods (every answer from that node's pods) and from
/// `empty` (no answer).
pub fn local_runs(pods: &[ProbePod], local_ip: IpAddr, empty: &str) -> Vec<(String, probe::Plan)> {
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for p in pods {
        by_node.entry(&p.node).or_default().push(p.name.clone());
    }
    let name = |node: &str, proto: &str| format!("internal-traffic-local/{node}/{proto}");
    let mut runs: Vec<(String, probe::Plan)> = by_node
        .into_iter()
        .filter(|(node, _)| *node != empty)
        .take(2)
        .map(|(node, names)| {
            let checks = vec![
                Check::Tcp {
                    name: name(node, "tcp"),
                    targets: vec![SocketAddr::new(local_ip, 80)],
                    attempts: 8,
                    names: names.clone(),
                    same: false,
                },
                Check::Udp {
                    name: name(node, "udp"),
                    targets: vec![SocketAddr::new(local_ip, 53)],
                    attempts: 6,
                    names,
                },
            ];
            (
                node.to_string(),
                probe::Plan {
                    checks,
                    timeout_ms: 2000,
                },
            )
        })
        .collect();
    let none = |proto| Check::NoAnswer {
        name: name(
            empty,
            match proto {
                probe::Proto::Tcp => "tcp",
                probe::Proto::Udp => "udp",
            },
        ),
        targets: vec![SocketAddr::new(
            local_ip,
            match proto {
                probe::Proto::Tcp => 80,
                probe::Proto::Udp => 53,
            },
        )],
        proto,
        attempts: 3,
    };
    runs.push((
        empty.to_string(),
        probe::Plan {
            checks: vec![none(probe::Proto::Tcp), none(probe::Proto::Udp)],
            timeout_ms: 1000,
        },
    ));
    runs
}

/// Where a client pod runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// On this node (None: where the scheduler puts it).
    pub node: Option<String>,
    /// In the node's network namespace (`hostNetwork: true`): the node's own
    /// processes' view. An admission policy may refuse such a pod (the
    /// reconciler's does): its checks are then skipped with the reason.
    pub host_network: bool,
}

impl Placement {
    fn on(node: &str) -> Self {
        Placement {
            node: Some(node.to_string()),
            host_network: false,
        }
    }

    fn host_of(node: &str) -> Self {
        Placement {
            node: Some(node.to_string()),
            host_network: true,
        }
    }
}

/// The InternalIPs of one family (IPv4 or not) of each node in `eligible`
/// that has one.
pub fn node_addresses(
    nodes: &[Node],
    eligible: &[String],
    v4: bool,
) -> BTreeMap<String, Vec<IpAddr>> {
    nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            if !eligible.contains(&name) {
                return None;
            }
            let ips: Vec<IpAddr> = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .filter(|ip| ip.is_ipv4() == v4)
                .collect();
            (!ips.is_empty()).then_some((name, ips))
        })
        .collect()
}

/// The client runs of the `node-port` check: a client pod reaching the
/// NodePort Service (`tcp`, `udp` node ports) at every node's addresses (its
/// own node's through the local datapath, the others' across the node
/// network), and the same from the host network of the first node with a
/// probe pod (`node-port/host/*`: the node's own processes, through the
/// socket LB on its own addresses and the other nodes' per-packet path).
/// The reconciler's admission policy keeps probe pods off the host network
/// (least privilege), so in its runs the host part is skipped with that
/// reason; `netboot apply`/`validate` by an operator run it. None when no
/// node has an address.
pub fn node_port_runs(
    pods: &[ProbePod],
    addresses: &BTreeMap<String, Vec<IpAddr>>,
    (tcp, udp): (u16, u16),
) -> Option<Vec<(Placement, probe::Plan)>> {
    let all: Vec<IpAddr> = addresses.values().flatten().copied().collect();
    if all.is_empty() {
        return None;
    }
    let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    let plan = |from: &str| probe::Plan {
        checks: vec![
            Check::Tcp {
                name: format!("node-port/{from}/tcp"),
                targets: all.iter().map(|ip| SocketAddr::new(*ip, tcp)).collect(),
                attempts: 2,
                names: names.clone(),
                same: false,
            },
            Check::Udp {
                name: format!("node-port/{from}/udp"),
                targets: all.iter().map(|ip| SocketAddr::new(*ip, udp)).collect(),
                attempts: 2,
                names: names.clone(),
            },
        ],
        timeout_ms: 2000,
    };
    let mut runs = vec![(Placement::default(), plan("pod"))];
    if let Some(home) = pods.first().map(|p| p.node.clone()) {
        runs.push((Placement::host_of(&home), plan("host")));
    }
    Some(runs)
}

/// The client run of the `external-traffic-local` check, on the first node
/// with probe pods: every node's `healthCheckNodePort` answers 200 with its
/// number of probe pods, or 503 with 0 (`empty` and any node without one);
/// and a connection to the client's own node's IP:`tcp` node port reaches
/// a probe pod that sees the client pod's own address as the source.
/// None when no node with probe pods has an address.
pub fn ext_local_run(
    pods: &[ProbePod],
    addresses: &BTreeMap<String, Vec<IpAddr>>,
    empty: &str,
    tcp: u16,
    health: u16,
) -> Option<(Placement, probe::Plan)> {
    let mut local: BTreeMap<&str, u64> = BTreeMap::new();
    for p in pods {
        *local.entry(p.node.as_str()).or_default() += 1;
    }
    let (home, home_ip) = local
        .keys()
        .find_map(|n| Some((*n, *addresses.get(*n)?.first()?)))?;
    let mut checks: Vec<Check> = addresses
        .iter()
        .filter_map(|(node, ips)| Some((node, *ips.first()?)))
        .map(|(node, ip)| {
            let n = if node == empty {
                0
            } else {
                local.get(node.as_str()).copied().unwrap_or(0)
            };
            Check::HealthCheck {
                name: format!("external-traffic-local/{node}/health"),
                target: SocketAddr::new(ip, health),
                status: if n > 0 { 200 } else { 503 },
                local_endpoints: n,
            }
        })
        .collect();
    checks.push(Check::Source {
        name: "external-traffic-local/source".into(),
        targets: vec![SocketAddr::new(home_ip, tcp)],
        attempts: 4,
        names: pods.iter().map(|p| p.name.clone()).collect(),
    });
    Some((
        Placement::on(home),
        probe::Plan {
            checks,
            timeout_ms: 2000,
        },
    ))
}

/// The `tcp` and `udp` node ports of Service `name`.
async fn node_ports(client: &Client, ns: &str, name: &str) -> Result<(u16, u16), String> {
    Ok(service_ports(client, ns, name).await?.0)
}

/// The `tcp` node port and the `healthCheckNodePort` of Service `name`.
async fn ext_local_ports(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<((u16, u16), u16), String> {
    let (ports, health) = service_ports(client, ns, name).await?;
    let health = health.ok_or_else(|| {
        format!("Service/{ns}/{name} has no healthCheckNodePort (a LoadBalancer Service with externalTrafficPolicy: Local gets one from the API server)")
    })?;
    Ok((ports, health))
}

async fn service_ports(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<((u16, u16), Option<u16>), String> {
    let s = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| format!("Service/{ns}/{name}: {}", describe(&e)))?;
    let spec = s.spec.unwrap_or_default();
    let port = |want: &str| {
        spec.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(want))
            .and_then(|p| p.node_port)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("Service/{ns}/{name}: port `{want}` has no nodePort"))
    };
    let health = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok());
    Ok(((port("tcp")?, port("udp")?), health))
}

/// `[::ffff:a.b.c.d]:port` for an IPv4 address.
fn mapped(ip: IpAddr, port: u16) -> Option<SocketAddr> {
    match ip {
        IpAddr::V4(v4) => Some(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port)),
        IpAddr::V6(_) => None,
    }
}

fn skipped_outcome(name: &str, reason: String) -> probe::Outcome {
    probe::Outcome {
        name: name.into(),
        ok: true,
        detail: reason,
        millis: 0,
        skipped: true,
        outage_ms: None,
    }
}

async fn pod_checks_run(
    client: &Client,
    spec: &ClusterNetwork,
    opts: &ValidateOptions,
    wanted: &[&str],
    nodes: &[Node],
    deadline: Instant,
) -> Result<Vec<probe::Outcome>, String> {
    let ns = &spec.namespace;
    let want = |c: &str| wanted.contains(&c);
    let eligible = schedulable(nodes);
    let workload = Workload {
        replicas: i32::try_from(nodes.len().clamp(2, 3)).unwrap_or(2),
        // The last schedulable node by name, so that a re-run changes nothing.
        keep_off: (want("internal-traffic-local") || want("external-traffic-local"))
            .then(|| eligible.last().cloned())
            .flatten(),
        local: want("internal-traffic-local"),
        single: want("udp-backend-replaced"),
        node_port: want("node-port"),
        ext_local: want("external-traffic-local"),
    };
    for obj in probe_objects(ns, &opts.probe_image, &workload) {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = format!("{}/{name}", obj["kind"].as_str().unwrap_or_default());
        let patch = PatchParams::apply(FIELD_MANAGER).force();
        let r = match obj["kind"].as_str() {
            Some("Deployment") => Api::<Deployment>::namespaced(client.clone(), ns)
                .patch(&name, &patch, &Patch::Apply(&obj))
                .await
                .map(|_| ()),
            _ => Api::<Service>::namespaced(client.clone(), ns)
                .patch(&name, &patch, &Patch::Apply(&obj))
                .await
                .map(|_| ()),
        };
        r.map_err(|e| format!("{id}: {}", describe(&e)))?;
    }
    let probe_ips = cluster_ips(client, ns, PROBE).await?;
    let probe_v6 = probe_ips.iter().copied().find(IpAddr::is_ipv6);
    // Wait for the probe pods to be ready and listed in their Services' EndpointSlices.
    let mut services = vec![PROBE, PROBE_STICKY];
    if workload.local {
        services.push(PROBE_LOCAL);
    }
    if workload.node_port {
        services.push(PROBE_NODE_PORT);
    }
    if workload.ext_local {
        services.push(PROBE_EXT_LOCAL);
    }
    let (pods, single) = loop {
        let pods = ready_probe_pods(client, ns, PROBE).await?;
        let mut listed = true;
        for svc in &services {
            listed &= ready_endpoints(client, ns, svc, None).await? >= pods.len();
        }
        // The IPv6 slice too, when the pods have IPv6 addresses to be in it.
        if probe_v6.is_some() && pods.iter().all(|p| p.ips.iter().any(IpAddr::is_ipv6)) {
            listed &= ready_endpoints(client, ns, PROBE, Some("IPv6")).await? >= pods.len();
        }
        let single = if workload.single {
            let s = ready_probe_pods(client, ns, PROBE_SINGLE).await?;
            listed &= s.len() == 1 && ready_endpoints(client, ns, PROBE_SINGLE, None).await? >= 1;
            s.into_iter().next()
        } else {
            None
        };
        if pods.len() == usize::try_from(workload.replicas).unwrap_or(0) && listed {
            break (pods, single);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {} probe pods ready{} after the validation timeout",
                pods.len(),
                workload.replicas,
                if workload.single && single.is_none() {
                    format!(", {PROBE_SINGLE} not ready")
                } else {
                    String::new()
                }
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    let facts = Facts {
        skip: spec.validation.skip.clone(),
        schedulable_nodes: eligible.len(),
        cluster_ipv4: Some(probe_ips.iter().any(IpAddr::is_ipv4)),
        cluster_ipv6: Some(probe_v6.is_some()),
        pods_ipv6: Some(pods.iter().all(|p| p.ips.iter().any(IpAddr::is_ipv6))),
    };
    let probe_ip = probe_ips[0];
    let probe_v4 = probe_ips.iter().copied().find(IpAddr::is_ipv4);
    let sticky_ip = cluster_ips(client, ns, PROBE_STICKY).await?[0];
    let api_ip = cluster_ips(client, "default", "kubernetes").await?[0];

    let mut outcomes = Vec::new();
    let mut checks = Vec::new();
    for w in wanted {
        if let Some(reason) = skip_reason(w, &facts) {
            outcomes.push(skipped_outcome(w, reason));
            continue;
        }
        match *w {
            "pod-to-pod" => checks.push(Check::Tcp {
                name: "pod-to-pod".into(),
                targets: pods
                    .iter()
                    .map(|p| SocketAddr::new(p.ip, TCP_PORT))
                    .collect(),
                attempts: 1,
                names: names.clone(),
                same: false,
            }),
            "pod-to-service" => {
                checks.push(Check::Tcp {
                    name: "pod-to-service/tcp".into(),
                    targets: vec![SocketAddr::new(probe_ip, 80)],
                    attempts: 12,
                    names: names.clone(),
                    same: false,
                });
                checks.push(Check::Udp {
                    name: "pod-to-service/udp".into(),
                    targets: vec![SocketAddr::new(probe_ip, 53)],
                    attempts: 6,
                    names: names.clone(),
                });
            }
            "session-affinity" => checks.push(Check::Tcp {
                name: "session-affinity".into(),
                targets: vec![SocketAddr::new(sticky_ip, 80)],
                attempts: 10,
                names: names.clone(),
                same: true,
            }),
            "ipv4-mapped" | "ipv6" => {
                let ip = if *w == "ipv6" { probe_v6 } else { probe_v4 };
                let target = |port| match ip {
                    Some(IpAddr::V4(_)) => ip.and_then(|ip| mapped(ip, port)),
                    other => other.map(|ip| SocketAddr::new(ip, port)),
                };
                if let (Some(tcp), Some(udp)) = (target(80), target(53)) {
                    checks.push(Check::Tcp {
                        name: format!("{w}/tcp"),
                        targets: vec![tcp],
                        attempts: 6,
                        names: names.clone(),
                        same: false,
                    });
                    checks.push(Check::Udp {
                        name: format!("{w}/udp"),
                        targets: vec![udp],
                        attempts: 4,
                        names: names.clone(),
                    });
                }
            }
            "pod-to-api" => checks.push(Check::Connect {
                name: "pod-to-api".into(),
                targets: vec![SocketAddr::new(api_ip, 443)],
            }),
            "dns" => checks.push(Check::Dns {
                name: "dns".into(),
                host: format!("{PROBE}.{ns}.svc.{}", spec.cluster.dns_domain),
                expect: probe_ip.to_string(),
            }),
            _ => {}
        }
    }
    let image = &opts.probe_image;
    let mut runs: Vec<(Placement, probe::Plan)> = Vec::new();
    if !checks.is_empty() {
        runs.push((
            Placement::default(),
            probe::Plan {
                checks,
                timeout_ms: 2000,
            },
        ));
    }
    if workload.local {
        if let Some(empty) = &workload.keep_off {
            let local_ip = cluster_ips(client, ns, PROBE_LOCAL).await?[0];
            for (node, plan) in local_runs(&pods, local_ip, empty) {
                runs.push((Placement::on(&node), plan));
            }
        }
    }
    let family_v4 = probe_ip.is_ipv4();
    let addresses = node_addresses(nodes, &eligible, family_v4);
    if workload.node_port {
        let ports = node_ports(client, ns, PROBE_NODE_PORT).await?;
        match node_port_runs(&pods, &addresses, ports) {
            Some(r) => {
                for (place, plan) in r {
                    if place.host_network && !opts.host_network_probes {
                        outcomes.extend(plan.checks.iter().map(|c| {
                            skipped_outcome(
                                c.name(),
                                "from a node's host network: not run by the reconciler (its admission policy keeps probe pods off the host network); `netboot validate` runs it".into(),
                            )
                        }));
                    } else {
                        runs.push((place, plan));
                    }
                }
            }
            None => outcomes.push(skipped_outcome(
                "node-port",
                format!(
                    "no schedulable node has an IPv{} InternalIP",
                    if family_v4 { 4 } else { 6 }
                ),
            )),
        }
    }
    if let (true, Some(empty)) = (workload.ext_local, &workload.keep_off) {
        let (ports, health) = ext_local_ports(client, ns, PROBE_EXT_LOCAL).await?;
        match ext_local_run(&pods, &addresses, empty, ports.0, health) {
            Some(r) => runs.push(r),
            None => outcomes.push(skipped_outcome(
                "external-traffic-local",
                "no node with probe pods has an InternalIP of the probe Service's family".into(),
            )),
        }
    }
    let clients = futures::future::join_all(
        runs.iter()
            .map(|(place, plan)| run_until_ok(client, ns, image, plan, place, deadline)),
    );
    let replaced = async {
        match (&single, want("udp-backend-replaced")) {
            (Some(old), true) => Some(udp_backend_replaced(client, ns, image, old, deadline).await),
            _ => None,
        }
    };
    let (reports, replaced) = tokio::join!(clients, replaced);
    for r in reports {
        outcomes.extend(r?);
    }
    if let Some(r) = replaced {
        outcomes.push(r);
    }
    Ok(outcomes)
}

/// Runs `plan` in a client pod (on `node`, or where the scheduler puts it)
/// until it passes or the deadline is near: the datapath programs new
/// Services within moments.
async fn run_until_ok(
    client: &Client,
    ns: &str,
    image: &str,
    plan: &probe::Plan,
    place: &Placement,
    deadline: Instant,
) -> Result<Vec<probe::Outcome>, String> {
    let node = place.node.as_deref();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let pod = match create_client(client, ns, image, plan, place).await {
            Ok(p) => p,
            Err(StartError::Refused(why)) if place.host_network => {
                return Ok(plan
                    .checks
                    .iter()
                    .map(|c| {
                        skipped_outcome(
                            c.name(),
                            format!("a host-network client pod was refused ({why}): this identity may not run one (the reconciler's admission policy keeps probe pods off the host network); run `netboot validate` as an operator for it"),
                        )
                    })
                    .collect());
            }
            Err(e) => return Err(e.into()),
        };
        let report = client_report(client, ns, &pod, deadline).await?;
        if report.ok() || Instant::now() + Duration::from_secs(3) >= deadline {
            if !report.ok() {
                tracing::info!(attempt, ?node, "probe checks still failing at the deadline");
            }
            return Ok(report.outcomes);
        }
        tracing::info!(
            attempt,
            ?node,
            "probe checks failed; retrying: {:?}",
            report
                .outcomes
                .iter()
                .filter(|o| !o.ok)
                .map(|o| &o.detail)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// How long after the replacement pod is ready and listed the reconnected
/// socket must be answered by it.
const UDP_REPLACE_LAG: Duration = Duration::from_secs(5);
/// The longest outage (last answer of the old pod → first of the new one).
const UDP_REPLACE_BOUND: Duration = Duration::from_secs(30);

/// `udp-backend-replaced`: a client keeps one connected UDP socket to the
/// one-pod Service; its pod is deleted; the client must be answered by the
/// replacement (see [`Check::UdpReplace`]).
async fn udp_backend_replaced(
    client: &Client,
    ns: &str,
    image: &str,
    old: &ProbePod,
    deadline: Instant,
) -> probe::Outcome {
    let name = "udp-backend-replaced";
    let started = Instant::now();
    let r = async {
        let window = deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_secs(10))
            .min(Duration::from_secs(90));
        if window < Duration::from_secs(20) {
            return Err(format!(
                "{} s left before the validation timeout: too little to replace a pod",
                window.as_secs()
            ));
        }
        let svc = cluster_ips(client, ns, PROBE_SINGLE).await?[0];
        let plan = probe::Plan {
            checks: vec![Check::UdpReplace {
                name: name.into(),
                target: SocketAddr::new(svc, 53),
                old: old.name.clone(),
                window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
                bound_ms: u64::try_from(UDP_REPLACE_BOUND.as_millis()).unwrap_or(u64::MAX),
                interval_ms: 100,
            }],
            timeout_ms: 500,
        };
        let pod = start_client(client, ns, image, &plan, &Placement::default()).await?;
        // Let the client connect and hear the old pod before it goes.
        wait_running(client, ns, &pod, deadline).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let deleted = Instant::now();
        pods.delete(&old.name, &DeleteParams::default())
            .await
            .map_err(|e| format!("Pod/{ns}/{}: {}", old.name, describe(&e)))?;
        let (new, ready) = loop {
            let fresh: Vec<ProbePod> = ready_probe_pods(client, ns, PROBE_SINGLE)
                .await?
                .into_iter()
                .filter(|p| p.name != old.name)
                .collect();
            if let Some(p) = fresh.into_iter().next() {
                if ready_endpoints_of(client, ns, PROBE_SINGLE, &p.name).await? {
                    break (p.name, deleted.elapsed());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "`{}` deleted; no replacement ready before the validation timeout",
                    old.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let report = client_report(client, ns, &pod, deadline).await?;
        let mut o = report
            .outcomes
            .into_iter()
            .next()
            .ok_or_else(|| format!("Pod/{ns}/{pod} reported nothing"))?;
        o.detail = format!(
            "{}; replacement `{new}` ready and listed {} ms after the delete",
            o.detail,
            ready.as_millis()
        );
        if o.ok && !o.detail.contains(&format!("then by `{new}`")) {
            o.ok = false;
            o.detail = format!("the new answer is not from the replacement `{new}`: {}", o.detail);
        }
        if let Some(outage) = o.outage_ms {
            let limit = ready + UDP_REPLACE_LAG;
            if o.ok && Duration::from_millis(outage) > limit {
                o.ok = false;
                o.detail = format!(
                    "answered {} ms after the delete, more than {} s after the replacement was ready: {}",
                    outage,
                    UDP_REPLACE_LAG.as_secs(),
                    o.detail
                );
            }
        }
        Ok(o)
    }
    .await;
    r.unwrap_or_else(|detail| probe::Outcome {
        name: name.into(),
        ok: false,
        detail,
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        skipped: false,
        outage_ms: None,
    })
}

async fn ready_probe_pods(client: &Client, ns: &str, app: &str) -> Result<Vec<ProbePod>, String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={app}")))
        .await
        .map_err(|e| format!("probe pods: {}", describe(&e)))?;
    let mut out: Vec<ProbePod> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && wait::pod_not_ready(p).is_none())
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ip: IpAddr = st.pod_ip.as_ref()?.parse().ok()?;
            let mut ips: Vec<IpAddr> = st
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|i| i.ip.parse().ok())
                .collect();
            if ips.is_empty() {
                ips.push(ip);
            }
            Some(ProbePod {
                name: p.metadata.name.clone()?,
                ip,
                ips,
                node: p.spec.as_ref()?.node_name.clone().unwrap_or_default(),
            })
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn slices(client: &Client, ns: &str, service: &str) -> Result<Vec<EndpointSlice>, String> {
    Ok(Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map_err(|e| format!("EndpointSlices of {service}: {}", describe(&e)))?
        .items)
}

/// Ready endpoints of `service` (in slices of `family` only, if given).
async fn ready_endpoints(
    client: &Client,
    ns: &str,
    service: &str,
    family: Option<&str>,
) -> Result<usize, String> {
    Ok(slices(client, ns, service)
        .await?
        .iter()
        .filter(|s| family.is_none_or(|f| s.address_type == f))
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .count())
}

/// `pod` is a ready endpoint of `service`.
async fn ready_endpoints_of(
    client: &Client,
    ns: &str,
    service: &str,
    pod: &str,
) -> Result<bool, String> {
    Ok(slices(client, ns, service)
        .await?
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .any(|e| {
            e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false)
                && e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        }))
}

/// Why a client pod could not be created.
enum StartError {
    /// The API server refused it (403: RBAC or an admission policy).
    Refused(String),
    /// Anything else.
    Other(String),
}

impl From<StartError> for String {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Refused(s) | StartError::Other(s) => s,
        }
    }
}

/// Starts a client pod running `plan` (on `node` if given) and returns its name.
async fn start_client(
    client: &Client,
    ns: &str,
    image: &str,
    plan: &probe::Plan,
    place: &Placement,
) -> Result<String, String> {
    create_client(client, ns, image, plan, place)
        .await
        .map_err(String::from)
}

/// [`start_client`], telling a refusal apart.
async fn create_client(
    client: &Client,
    ns: &str,
    image: &str,
    plan: &probe::Plan,
    place: &Placement,
) -> Result<String, StartError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = format!(
        "netboot-probe-client-{:05x}",
        rand::random::<u32>() & 0xfffff
    );
    let plan_json = serde_json::to_string(plan).map_err(|e| StartError::Other(e.to_string()))?;
    let mut spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "client", "image": image,
            "command": ["netboot-probe", "check", "--plan", plan_json],
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": PROBE_SECURITY.clone(),
        }],
    });
    if let Some(node) = &place.node {
        spec["nodeName"] = json!(node);
    }
    if place.host_network {
        spec["hostNetwork"] = json!(true);
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "netboot-probe-client", "app.kubernetes.io/managed-by": "netboot", "netboot.io/probe": "true", "netboot.io/podnet": "true"}},
        "spec": spec,
    }))
    .map_err(|e| StartError::Other(e.to_string()))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(|e| {
            let msg = format!("Pod/{ns}/{name}: {}", describe(&e));
            match &e {
                kube::Error::Api(r) if r.code == 403 => StartError::Refused(msg),
                _ => StartError::Other(msg),
            }
        })?;
    Ok(name)
}

/// Waits until the client pod runs (or has already finished).
async fn wait_running(
    client: &Client,
    ns: &str,
    name: &str,
    deadline: Instant,
) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    loop {
        let p = pods
            .get(name)
            .await
            .map_err(|e| format!("Pod/{ns}/{name}: {}", describe(&e)))?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        if phase != "Pending" && !phase.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "Pod/{ns}/{name} did not start before the validation timeout (phase {phase})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Reads the report from the client pod's termination message, then
/// deletes the pod.
async fn client_report(
    client: &Client,
    ns: &str,
    name: &str,
    deadline: Instant,
) -> Result<probe::Report, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let result = loop {
        let p = pods
            .get(name)
            .await
            .map_err(|e| format!("Pod/{ns}/{name}: {}", describe(&e)))?;
        let terminated = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone());
        if let Some(t) = terminated {
            let msg = t.message.unwrap_or_default();
            break serde_json::from_str::<probe::Report>(&msg).map_err(|e| {
                format!(
                    "Pod/{ns}/{name} exited {} with a message that is not a report ({e}): {msg}",
                    t.exit_code
                )
            });
        }
        if Instant::now() >= deadline {
            let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
            break Err(format!(
                "Pod/{ns}/{name} did not finish before the validation timeout (phase {phase})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = pods
        .delete(name, &DeleteParams::background().grace_period(0))
        .await;
    result
}

/// Deletes the probe workload (everything labelled `netboot.io/probe`).
pub async fn remove_probes(client: &Client, ns: &str) -> Result<(), String> {
    let dp = DeleteParams::background();
    let lp = ListParams::default().labels("netboot.io/probe=true");
    let ignore404 = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map_err(|e| describe(&e)),
    };
    for d in [PROBE, PROBE_SINGLE] {
        ignore404(
            Api::<Deployment>::namespaced(client.clone(), ns)
                .delete(d, &dp)
                .await
                .map(|_| ()),
        )?;
    }
    for s in [PROBE, PROBE_STICKY, PROBE_LOCAL, PROBE_SINGLE] {
        ignore404(
            Api::<Service>::namespaced(client.clone(), ns)
                .delete(s, &dp)
                .await
                .map(|_| ()),
        )?;
    }
    ignore404(
        Api::<Pod>::namespaced(client.clone(), ns)
            .delete_collection(&dp, &lp)
            .await
            .map(|_| ()),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn outcome(name: &str, ok: bool, skipped: bool, detail: &str) -> probe::Outcome {
        probe::Outcome {
            name: name.into(),
            ok,
            detail: detail.into(),
            millis: 5,
            skipped,
            outage_ms: None,
        }
    }

    #[test]
    fn the_table_and_the_spec_name_the_same_checks_in_order() {
        let names: Vec<&str> = TABLE.iter().map(|c| c.name).collect();
        assert_eq!(names, crate::spec::CHECKS);
        let pods: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| POD_CHECKS.contains(n))
            .collect();
        assert_eq!(pods, POD_CHECKS, "pod checks in table order");
    }

    #[test]
    fn skip_reasons_say_why_a_check_cannot_apply() {
        let f = Facts {
            skip: vec!["dns".into()],
            schedulable_nodes: 1,
            ..Default::default()
        };
        assert_eq!(
            skip_reason("dns", &f).unwrap(),
            "skipped by spec.validation.skip"
        );
        assert!(skip_reason("internal-traffic-local", &f)
            .unwrap()
            .starts_with("the cluster has 1 schedulable node(s)"));
        // Unknown before the probe Service exists: not skipped yet.
        assert_eq!(skip_reason("ipv6", &f), None);
        assert_eq!(skip_reason("ipv4-mapped", &f), None);
        assert_eq!(skip_reason("udp-backend-replaced", &f), None);
        let single_stack = Facts {
            schedulable_nodes: 3,
            cluster_ipv4: Some(true),
            cluster_ipv6: Some(false),
            pods_ipv6: Some(false),
            ..Default::default()
        };
        assert_eq!(skip_reason("internal-traffic-local", &single_stack), None);
        assert_eq!(skip_reason("ipv4-mapped", &single_stack), None);
        assert!(skip_reason("ipv6", &single_stack)
            .unwrap()
            .contains("no IPv6 service range"));
        let v6_services_v4_pods = Facts {
            cluster_ipv6: Some(true),
            ..single_stack.clone()
        };
        assert!(skip_reason("ipv6", &v6_services_v4_pods)
            .unwrap()
            .contains("the probe pods have no IPv6 address"));
        let dual = Facts {
            pods_ipv6: Some(true),
            ..v6_services_v4_pods
        };
        assert_eq!(skip_reason("ipv6", &dual), None);
        let v6_only = Facts {
            cluster_ipv4: Some(false),
            ..dual
        };
        assert!(skip_reason("ipv4-mapped", &v6_only)
            .unwrap()
            .contains("no IPv4 ClusterIP"));
        // The spec's skip wins over every other reason.
        let both = Facts {
            skip: vec!["ipv6".into()],
            ..single_stack
        };
        assert_eq!(
            skip_reason("ipv6", &both).unwrap(),
            "skipped by spec.validation.skip"
        );
    }

    #[test]
    fn only_untainted_uncordoned_nodes_take_probe_pods() {
        let nodes = [
            node("metadata: {name: c}"),
            node("metadata: {name: a}\nspec: {taints: [{key: x, effect: PreferNoSchedule}]}"),
            node("metadata: {name: cp}\nspec: {taints: [{key: node-role.kubernetes.io/control-plane, effect: NoSchedule}]}"),
            node("metadata: {name: gone}\nspec: {taints: [{key: x, effect: NoExecute}]}"),
            node("metadata: {name: cordoned}\nspec: {unschedulable: true}"),
        ];
        assert_eq!(schedulable(&nodes), vec!["a", "c"]);
    }

    #[test]
    fn outcomes_merge_into_one_result_per_check() {
        let os = [
            outcome("ipv6/tcp", true, true, "no IPv6 in this pod"),
            outcome("ipv6/udp", true, true, "no IPv6 in this pod"),
            outcome(
                "internal-traffic-local/n1/tcp",
                true,
                false,
                "8 connections",
            ),
            outcome(
                "internal-traffic-local/n3/udp",
                false,
                false,
                "answered by `p`",
            ),
            outcome("dns", true, false, "ok"),
            outcome("dnsx", false, false, "not mine"),
        ];
        let r = merge("ipv6", &os);
        assert_eq!(
            (r.result, r.detail.as_str()),
            (Verdict::Skipped, "no IPv6 in this pod")
        );
        let r = merge("internal-traffic-local", &os);
        assert_eq!(
            (r.result, r.detail.as_str()),
            (Verdict::Failed, "answered by `p`")
        );
        let r = merge("dns", &os);
        assert_eq!((r.result, r.millis), (Verdict::Passed, 5));
        assert_eq!(merge("pod-to-pod", &os).result, Verdict::Failed);
    }

    fn pod(name: &str, node: &str) -> ProbePod {
        ProbePod {
            name: name.into(),
            ip: "10.244.0.1".parse().unwrap(),
            ips: vec![],
            node: node.into(),
        }
    }

    #[test]
    fn internal_traffic_local_runs_from_nodes_with_and_without_endpoints() {
        let pods = [
            pod("p1", "n1"),
            pod("p2", "n2"),
            pod("p3", "n1"),
            pod("p4", "n4"),
        ];
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        let runs = local_runs(&pods, ip, "n3");
        let nodes: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            nodes,
            ["n1", "n2", "n3"],
            "two nodes with endpoints, then the empty one"
        );
        let Check::Tcp { names, .. } = &runs[0].1.checks[0] else {
            panic!("{runs:?}")
        };
        assert_eq!(names, &["p1", "p3"], "only the node's own pods may answer");
        let Check::NoAnswer { name, targets, .. } = &runs[2].1.checks[1] else {
            panic!("{runs:?}")
        };
        assert_eq!(name, "internal-traffic-local/n3/udp");
        assert_eq!(targets, &[SocketAddr::new(ip, 53)]);
    }

    fn addresses(v: &[(&str, &str)]) -> BTreeMap<String, Vec<IpAddr>> {
        v.iter()
            .map(|(n, ip)| (n.to_string(), vec![ip.parse().unwrap()]))
            .collect()
    }

    #[test]
    fn node_addresses_are_the_internal_ips_of_one_family_of_schedulable_nodes() {
        let n =
            |name: &str, addrs: &str, taint: bool| {
                node(&format!(
                "metadata: {{name: {name}}}\nspec: {{taints: {}}}\nstatus: {{addresses: {addrs}}}",
                if taint { "[{key: k, effect: NoSchedule}]" } else { "[]" }
            ))
            };
        let nodes = [
            n("a", "[{type: InternalIP, address: 172.18.0.2}, {type: InternalIP, address: 'fd00::2'}, {type: Hostname, address: a}]", false),
            n("b", "[{type: ExternalIP, address: 203.0.113.9}]", false),
            n("c", "[{type: InternalIP, address: 172.18.0.4}]", true),
        ];
        let eligible = schedulable(&nodes);
        assert_eq!(
            node_addresses(&nodes, &eligible, true),
            addresses(&[("a", "172.18.0.2")]),
            "b has no InternalIP, c is tainted"
        );
        assert_eq!(
            node_addresses(&nodes, &eligible, false),
            addresses(&[("a", "fd00::2")])
        );
    }

    #[test]
    fn a_check_merges_its_host_part_marked_and_a_skipped_host_part_with_its_reason() {
        let o = |name: &str, detail: &str, skipped: bool| probe::Outcome {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            millis: 1,
            skipped,
            outage_ms: None,
        };
        let r = merge(
            "node-port",
            &[
                o("node-port/pod/tcp", "6 connections", false),
                o("node-port/host/tcp", "6 connections", false),
            ],
        );
        assert_eq!(r.result, Verdict::Passed);
        assert_eq!(
            r.detail,
            "6 connections; from the host network: 6 connections"
        );
        let r = merge(
            "node-port",
            &[
                o("node-port/pod/tcp", "6 connections", false),
                o("node-port/host/tcp", "not run by the reconciler", true),
                o("node-port/host/udp", "not run by the reconciler", true),
            ],
        );
        assert_eq!(r.result, Verdict::Passed);
        assert_eq!(r.detail, "6 connections; not run by the reconciler");
    }

    #[test]
    fn node_port_runs_reach_every_node_from_a_pod() {
        let pods = [pod("p1", "n1"), pod("p2", "n2")];
        let addrs = addresses(&[
            ("n1", "172.18.0.2"),
            ("n2", "172.18.0.3"),
            ("n3", "172.18.0.4"),
        ]);
        let runs = node_port_runs(&pods, &addrs, (30080, 30053)).unwrap();
        assert_eq!(
            runs.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            [Placement::default(), Placement::host_of("n1")],
            "a pod, and the host network of the first probe pod's node"
        );
        assert_eq!(runs[1].1.checks[0].name(), "node-port/host/tcp");
        let Check::Udp { name, targets, .. } = &runs[0].1.checks[1] else {
            panic!("{runs:?}")
        };
        assert_eq!(name, "node-port/pod/udp");
        assert_eq!(targets.len(), 3);
        assert!(targets.iter().all(|t| t.port() == 30053));
        assert!(node_port_runs(&pods, &BTreeMap::new(), (1, 2)).is_none());
    }

    #[test]
    fn external_traffic_local_expects_kube_proxys_health_answers() {
        let pods = [pod("p1", "n1"), pod("p2", "n2"), pod("p3", "n1")];
        let addrs = addresses(&[
            ("n1", "172.18.0.2"),
            ("n2", "172.18.0.3"),
            ("n3", "172.18.0.4"),
        ]);
        let (place, plan) = ext_local_run(&pods, &addrs, "n3", 30080, 32000).unwrap();
        assert_eq!(place, Placement::on("n1"));
        let health: Vec<(String, SocketAddr, u16, u64)> = plan
            .checks
            .iter()
            .filter_map(|c| match c {
                Check::HealthCheck {
                    name,
                    target,
                    status,
                    local_endpoints,
                } => Some((name.clone(), *target, *status, *local_endpoints)),
                _ => None,
            })
            .collect();
        assert_eq!(
            health,
            [
                (
                    "external-traffic-local/n1/health".into(),
                    "172.18.0.2:32000".parse().unwrap(),
                    200,
                    2
                ),
                (
                    "external-traffic-local/n2/health".into(),
                    "172.18.0.3:32000".parse().unwrap(),
                    200,
                    1
                ),
                (
                    "external-traffic-local/n3/health".into(),
                    "172.18.0.4:32000".parse().unwrap(),
                    503,
                    0
                ),
            ]
        );
        let Some(Check::Source { targets, names, .. }) = plan.checks.last() else {
            panic!("{plan:?}")
        };
        assert_eq!(
            targets,
            &["172.18.0.2:30080".parse::<SocketAddr>().unwrap()],
            "its own node"
        );
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn the_probe_workload_has_what_the_wanted_checks_need() {
        let plain = probe_objects(
            "ns",
            "img",
            &Workload {
                replicas: 2,
                ..Default::default()
            },
        );
        let names: Vec<&str> = plain
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [PROBE, PROBE, PROBE_STICKY]);
        assert_eq!(plain[1]["spec"]["ipFamilyPolicy"], "PreferDualStack");
        assert!(plain[0]["spec"]["template"]["spec"]["affinity"].is_null());
        let all = probe_objects(
            "ns",
            "img",
            &Workload {
                replicas: 3,
                keep_off: Some("n3".into()),
                local: true,
                single: true,
                node_port: true,
                ext_local: true,
            },
        );
        let id = |o: &serde_json::Value| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        };
        assert_eq!(
            all.iter().map(id).collect::<Vec<_>>(),
            [
                "Deployment/netboot-probe",
                "Service/netboot-probe",
                "Service/netboot-probe-sticky",
                "Service/netboot-probe-local",
                "Service/netboot-probe-node-port",
                "Service/netboot-probe-ext-local",
                "Deployment/netboot-probe-single",
                "Service/netboot-probe-single",
            ]
        );
        assert_eq!(all[4]["spec"]["type"], "NodePort");
        assert_eq!(
            (
                &all[5]["spec"]["type"],
                &all[5]["spec"]["externalTrafficPolicy"],
                &all[5]["spec"]["loadBalancerClass"],
            ),
            (
                &json!("LoadBalancer"),
                &json!("Local"),
                &json!(NO_LOAD_BALANCER_CLASS)
            ),
            "no cloud load balancer is provisioned for validation"
        );
        assert_eq!(
            all[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchFields"][0]["values"],
            json!(["n3"])
        );
        assert_eq!(all[3]["spec"]["internalTrafficPolicy"], "Local");
        assert_eq!(
            all[3]["spec"]["selector"],
            json!({"app.kubernetes.io/name": PROBE})
        );
        assert_eq!(all[6]["spec"]["replicas"], 1);
        assert_eq!(
            all[7]["spec"]["selector"],
            json!({"app.kubernetes.io/name": PROBE_SINGLE})
        );
        // Every probe object is labelled for remove_probes and the admission policy.
        assert!(all
            .iter()
            .all(|o| o["metadata"]["labels"]["netboot.io/probe"] == "true"));
    }
}
