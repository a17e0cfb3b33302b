//! Validation: a table of checks after cilium-cli's connectivity test.
//!
//! Cluster-side checks (kube-proxy present/absent, agents, API endpoint) run
//! here; the pod checks run inside a probe client pod against netboot's probe
//! workload (a Deployment of `netboot-probe serve` behind a ClusterIP
//! Service and a ClientIP-affinity Service), so they cross the real datapath.
//! Results collect into a [`ValidationReport`] that a separate function
//! formats as a table; `-o json` prints the struct.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
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
const PROBE_LABEL: &str = "app.kubernetes.io/name=netboot-probe";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

/// The checks, in order: name, what it needs, what it shows.
pub const TABLE: &[(&str, &[&str], &str)] = &[
    (
        "kube-proxy",
        &[],
        "kube-proxy is absent (replace) or present (coexist)",
    ),
    (
        "agents",
        &[],
        "every node's agent is ready and reports the configured mode",
    ),
    (
        "api-endpoint",
        &[],
        "the API server answers at the endpoint agents use",
    ),
    (
        "pod-to-pod",
        &["probe workload"],
        "a client pod reaches every probe pod by pod IP (TCP)",
    ),
    (
        "pod-to-service",
        &["probe workload"],
        "a client pod reaches the probe Service's ClusterIP over TCP and UDP",
    ),
    (
        "session-affinity",
        &["probe workload"],
        "ClientIP affinity: every connection to the sticky Service lands on one pod",
    ),
    (
        "pod-to-api",
        &["probe workload"],
        "a client pod reaches kubernetes.default's ClusterIP",
    ),
    (
        "dns",
        &["probe workload", "cluster DNS"],
        "a client pod resolves the probe Service's name to its ClusterIP",
    ),
];

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

    let pod_checks = [
        "pod-to-pod",
        "pod-to-service",
        "session-affinity",
        "pod-to-api",
        "dns",
    ];
    let wanted: Vec<&str> = pod_checks.iter().copied().filter(|c| !skip(c)).collect();
    for c in pod_checks.iter().filter(|c| skip(c)) {
        report.push(
            c,
            Verdict::Skipped,
            "skipped by spec.validation.skip",
            Instant::now(),
        );
    }
    if !wanted.is_empty() {
        let t = Instant::now();
        match pod_checks_run(client, spec, opts, &wanted, deadline).await {
            Ok(outcomes) => {
                for name in &wanted {
                    let mine: Vec<&probe::Outcome> = outcomes
                        .iter()
                        .filter(|o| o.name == *name || o.name.starts_with(&format!("{name}/")))
                        .collect();
                    let ok = !mine.is_empty() && mine.iter().all(|o| o.ok);
                    let detail = mine
                        .iter()
                        .map(|o| o.detail.clone())
                        .collect::<Vec<_>>()
                        .join("; ");
                    let millis = mine.iter().map(|o| o.millis).sum();
                    report.checks.push(CheckResult {
                        name: (*name).into(),
                        result: if ok { Verdict::Passed } else { Verdict::Failed },
                        detail,
                        millis,
                    });
                }
            }
            Err(e) => {
                for name in &wanted {
                    report.push(name, Verdict::Failed, format!("probe workload: {e}"), t);
                }
            }
        }
        if !opts.keep_probes {
            if let Err(e) = remove_probes(client, &spec.namespace).await {
                tracing::warn!("removing the probe workload: {e}");
            }
        }
    }
    report
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

/// The probe workload: server Deployment, plain and sticky Services.
fn probe_objects(namespace: &str, image: &str, replicas: i32) -> Vec<serde_json::Value> {
    let labels = json!({"app.kubernetes.io/name": PROBE, "app.kubernetes.io/managed-by": "netboot", "netboot.io/probe": "true", "netboot.io/podnet": "true"});
    let selector = json!({"app.kubernetes.io/name": PROBE});
    let service = |name: &str, affinity: bool| {
        let mut spec = json!({
            "selector": selector,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT},
                {"name": "udp", "protocol": "UDP", "port": 53, "targetPort": UDP_PORT},
            ],
        });
        if affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 300}});
        }
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec})
    };
    vec![
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": PROBE, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 1,
                        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector}}],
                        "containers": [{
                            "name": "probe", "image": image,
                            "command": ["netboot-probe", "serve", "--tcp-port", TCP_PORT.to_string(), "--udp-port", UDP_PORT.to_string()],
                            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "ports": [{"containerPort": TCP_PORT, "protocol": "TCP"}, {"containerPort": UDP_PORT, "protocol": "UDP"}],
                            "readinessProbe": {"tcpSocket": {"port": TCP_PORT}, "periodSeconds": 2},
                            "securityContext": PROBE_SECURITY.clone(),
                        }],
                    },
                },
            },
        }),
        service(PROBE, false),
        service(PROBE_STICKY, true),
    ]
}

async fn pod_checks_run(
    client: &Client,
    spec: &ClusterNetwork,
    opts: &ValidateOptions,
    wanted: &[&str],
    deadline: Instant,
) -> Result<Vec<probe::Outcome>, String> {
    let ns = &spec.namespace;
    let nodes = wait::node_names(client)
        .await
        .map_err(|e| e.to_string())?
        .len();
    let replicas = i32::try_from(nodes.clamp(2, 3)).unwrap_or(2);
    for obj in probe_objects(ns, &opts.probe_image, replicas) {
        let id = format!(
            "{}/{}",
            obj["kind"].as_str().unwrap_or_default(),
            obj["metadata"]["name"].as_str().unwrap_or_default()
        );
        let patch = PatchParams::apply(FIELD_MANAGER).force();
        let r = match obj["kind"].as_str() {
            Some("Deployment") => Api::<Deployment>::namespaced(client.clone(), ns)
                .patch(PROBE, &patch, &Patch::Apply(&obj))
                .await
                .map(|_| ()),
            _ => {
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                Api::<Service>::namespaced(client.clone(), ns)
                    .patch(&name, &patch, &Patch::Apply(&obj))
                    .await
                    .map(|_| ())
            }
        };
        r.map_err(|e| format!("{id}: {}", describe(&e)))?;
    }
    // Wait for the probe pods to be ready and listed in both Services' EndpointSlices.
    let (pods, names) = loop {
        let pods = ready_probe_pods(client, ns).await?;
        let in_slices = ready_endpoints(client, ns, PROBE).await? >= pods.len()
            && ready_endpoints(client, ns, PROBE_STICKY).await? >= pods.len();
        if pods.len() == usize::try_from(replicas).unwrap_or(0) && in_slices {
            let names: Vec<String> = pods.iter().map(|(n, _)| n.clone()).collect();
            break (pods, names);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {replicas} probe pods ready after the validation timeout",
                pods.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let svc_ip = |name: &'static str| async move {
        let s = Api::<Service>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .map_err(|e| format!("Service/{ns}/{name}: {}", describe(&e)))?;
        s.spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .ok_or_else(|| format!("Service/{ns}/{name} has no ClusterIP"))
    };
    let probe_ip = svc_ip(PROBE).await?;
    let sticky_ip = svc_ip(PROBE_STICKY).await?;
    let api_svc = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .map_err(|e| format!("Service/default/kubernetes: {}", describe(&e)))?;
    let api_ip: IpAddr = api_svc
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .ok_or("Service/default/kubernetes has no ClusterIP")?;

    let mut checks = Vec::new();
    for w in wanted {
        match *w {
            "pod-to-pod" => checks.push(Check::Tcp {
                name: "pod-to-pod".into(),
                targets: pods
                    .iter()
                    .map(|(_, ip)| SocketAddr::new(*ip, TCP_PORT))
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
    let plan = probe::Plan {
        checks,
        timeout_ms: 2000,
    };
    // The datapath programs new Services within moments; retry a failing run until the deadline.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let report = run_client(client, ns, &opts.probe_image, &plan, deadline).await?;
        if report.ok() || Instant::now() + Duration::from_secs(3) >= deadline {
            if !report.ok() {
                tracing::info!(attempt, "probe checks still failing at the deadline");
            }
            return Ok(report.outcomes);
        }
        tracing::info!(
            attempt,
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

async fn ready_probe_pods(client: &Client, ns: &str) -> Result<Vec<(String, IpAddr)>, String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(PROBE_LABEL))
        .await
        .map_err(|e| format!("probe pods: {}", describe(&e)))?;
    let mut out: Vec<(String, IpAddr)> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && wait::pod_not_ready(p).is_none())
        .filter_map(|p| {
            Some((
                p.metadata.name.clone()?,
                p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?,
            ))
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn ready_endpoints(client: &Client, ns: &str, service: &str) -> Result<usize, String> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map_err(|e| format!("EndpointSlices of {service}: {}", describe(&e)))?;
    Ok(slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .count())
}

/// Runs the plan in a fresh client pod and reads the report from its
/// termination message.
async fn run_client(
    client: &Client,
    ns: &str,
    image: &str,
    plan: &probe::Plan,
    deadline: Instant,
) -> Result<probe::Report, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = format!(
        "netboot-probe-client-{:05x}",
        rand::random::<u32>() & 0xfffff
    );
    let plan_json = serde_json::to_string(plan).map_err(|e| e.to_string())?;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "netboot-probe-client", "app.kubernetes.io/managed-by": "netboot", "netboot.io/probe": "true", "netboot.io/podnet": "true"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "client", "image": image,
                "command": ["netboot-probe", "check", "--plan", plan_json],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": PROBE_SECURITY.clone(),
            }],
        },
    }))
    .map_err(|e| e.to_string())?;
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(|e| format!("Pod/{ns}/{name}: {}", describe(&e)))?;
    let result = loop {
        let p = pods
            .get(&name)
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
        .delete(&name, &DeleteParams::background().grace_period(0))
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
    ignore404(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .delete(PROBE, &dp)
            .await
            .map(|_| ()),
    )?;
    for s in [PROBE, PROBE_STICKY] {
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
