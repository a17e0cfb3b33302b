//! The `ClusterNetwork` spec: one file per cluster under `clusters/`.
//!
//! [`load`] reads a file, [`parse`] checks its text and reports every problem at
//! once as `file:line:column: field.path: message`. Defaults live in the
//! `Default` impls below and are documented field by field; README.md's spec
//! reference repeats them.

pub mod check;
pub mod grammar;
pub mod yaml;

use std::path::Path;

use ipnet::IpNet;
use serde::Serialize;

pub use check::SpecError;
use check::{Checker, Section};
use grammar::GrammarError;
use yaml::{Node, Pos};

pub const API_VERSION: &str = "netboot.io/v1alpha1";
pub const KIND: &str = "ClusterNetwork";
/// Larger spec files are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The names of the validation checks, in the order they run.
pub const CHECKS: &[&str] = &[
    "kube-proxy",
    "agents",
    "api-endpoint",
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

/// A checked cluster spec with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetwork {
    /// `metadata.name`: the cluster's name; labels every object (`netboot.io/cluster`). Required.
    pub name: String,
    /// `spec.namespace`: where netboot's own objects live. Default `netboot-system`.
    pub namespace: String,
    pub cluster: Cluster,
    /// `spec.apiServer`: the endpoint agents use. Default: detected at apply time.
    pub api_server: Option<ApiServer>,
    pub datapath: Datapath,
    pub kube_proxy: KubeProxy,
    pub validation: Validation,
    pub reconcile: Option<Reconcile>,
    pub observability: Observability,
}

/// `spec.observability`: what netboot renders for monitoring. Both off by
/// default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Observability {
    /// `dashboards`: the Grafana dashboard as a ConfigMap labelled
    /// `grafana_dashboard: "1"` (the Grafana sidecar's convention).
    pub dashboards: bool,
    /// `alerts`: the alert rules as a Prometheus Operator PrometheusRule
    /// (skipped, with the reason, on a cluster without its CRD).
    pub alerts: bool,
}

/// `spec.cluster`: how to reach the cluster and its address ranges.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// `context`: kubeconfig context. Default: the kubeconfig's current context.
    pub context: Option<String>,
    /// `inCluster`: use the pod's service account (the CronJob). Default false.
    pub in_cluster: bool,
    /// `serviceCIDR`: the API server's `--service-cluster-ip-range`. Required.
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: IpNet,
    /// `podCIDR`: the cluster's pod range. Required.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: IpNet,
    /// `dnsDomain`: cluster DNS domain. Default `cluster.local`.
    pub dns_domain: String,
}

/// `spec.apiServer`: an address agents reach without any ClusterIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiServer {
    /// A DNS name or IP address, not a URL.
    pub host: String,
    /// Default 6443.
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Netboot,
}

/// `spec.datapath`: the agent netboot installs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Datapath {
    /// `provider`: `netboot` (`cilium` is reserved). Default `netboot`.
    pub provider: Provider,
    /// `image`: repository of the agent image. Default `ghcr.io/netboot/netboot-datapath`.
    pub image: String,
    /// `version`: image tag. Default: this netboot's version.
    pub version: String,
    /// `kubeProxyReplacement`: true replaces kube-proxy, false runs beside it. Default true.
    pub kube_proxy_replacement: bool,
    /// `sessionAffinityTimeoutSeconds`: ClientIP affinity timeout when a Service sets none. Default 10800.
    pub session_affinity_timeout_seconds: u32,
    pub map_sizes: MapSizes,
    /// `healthPort`: the agent's /healthz, /readyz, /metrics, /v1/status port,
    /// on 127.0.0.1 only (host network; the probes use it). Default 9890.
    pub health_port: u16,
    /// `metricsPort`: the agent's /metrics-only port on every address of the
    /// node, for Prometheus. Default 9891; must differ from `healthPort`.
    pub metrics_port: u16,
    /// `loadBalancing`: `{algorithm: random|maglev, maglevTableSize: <prime>}`,
    /// the per-packet path's backend selection (the agent's `loadBalancing`).
    pub load_balancing: LoadBalancing,
    /// `conntrack`: lifetimes of the per-packet path's tracked flows
    /// (`tcpEstablishedTimeoutSeconds`, `tcpSynTimeoutSeconds`,
    /// `tcpCloseTimeoutSeconds`, `udpTimeoutSeconds`; the agent's `conntrack`).
    pub conntrack: Conntrack,
    /// `socketLB`: `{hostNamespaceOnly: bool, podInterfaces: [glob…]}`, the
    /// agent's `socketLB` (socket LB in the host netns only; pods through a
    /// tc program on their interfaces, for sidecars needing SO_ORIGINAL_DST).
    #[serde(rename = "socketLB")]
    pub socket_lb: SocketLb,
    /// `serviceMetrics`: export per-Service counters on /metrics (one series
    /// per Service frontend and counter). Default false (the agent's `serviceMetrics`).
    pub service_metrics: bool,
}

/// `spec.datapath.socketLB`: the contract's type and defaults.
pub use netboot_contract::config::SocketLb;

/// `spec.datapath.conntrack`: the contract's type and defaults.
pub use netboot_contract::config::Conntrack;

/// `spec.datapath.loadBalancing`: the contract's type and defaults.
pub use netboot_contract::config::LoadBalancing;

/// `spec.datapath.mapSizes`: BPF map capacities — the agent's `mapSizes`
/// (one type and one set of defaults, [`MapSizes::DEFAULT`], in the contract).
pub use netboot_contract::config::MapSizes;

/// `spec.kubeProxy`: what happens to kube-proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxy {
    /// `remove`: delete kube-proxy once agents are verified. Default: `datapath.kubeProxyReplacement`.
    pub remove: bool,
    /// `backup`: store the DaemonSet and ConfigMap before deleting. Default true.
    pub backup: bool,
    /// `cleanupRules`: agents clear KUBE-* rules on their node. Default true.
    pub cleanup_rules: bool,
    /// `namespace`: where kube-proxy lives. Default `kube-system`.
    pub namespace: String,
    /// `daemonSet` / `configMap`: their names. Default `kube-proxy` for both.
    pub daemon_set: String,
    pub config_map: String,
    /// `allowUnserved`: features (`netboot_contract::features::Feature` names)
    /// Services may need although the agents do not serve them; the
    /// "nothing unserved" gate lets those gaps through. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_unserved: Vec<String>,
}

/// `spec.validation`: the checks after apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Validation {
    /// `skip`: names of checks not to run (see [`CHECKS`]). Default none.
    pub skip: Vec<String>,
    /// `timeoutSeconds`: for the whole validation. Default 300.
    pub timeout_seconds: u32,
    /// `rolloutTimeoutSeconds`: for the agent rollout. Default 300.
    pub rollout_timeout_seconds: u32,
    /// `rollbackOnFailure`: restore kube-proxy when validation fails. Default true.
    pub rollback_on_failure: bool,
}

/// `spec.reconcile`: where the desired state lives, for the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reconcile {
    /// `repo`: git URL (https://, ssh://, git@host:path or file://). Required.
    pub repo: String,
    /// `ref`: branch, tag or commit. Default `main`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// `path`: this spec's path inside the repo. Default `clusters/<name>.yaml`.
    pub path: String,
    /// `interval`: e.g. `5m`, `1h`. Default `5m`.
    pub interval_seconds: u64,
    /// `schedule`: the CronJob's schedule, derived from the interval.
    pub schedule: String,
    /// `suspend`: report drift but write nothing. Default false.
    pub suspend: bool,
    /// `image`: the reconciler image. Default `ghcr.io/netboot/netboot:<version>`.
    pub image: String,
    /// `secretName`: Secret with git credentials and known_hosts. Default none.
    pub secret_name: Option<String>,
}

/// Why a spec could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_errors(.0))]
    Invalid(Vec<SpecError>),
}

impl LoadError {
    /// The individual problems, for `-o json`.
    pub fn errors(&self) -> Vec<SpecError> {
        match self {
            LoadError::Invalid(errors) => errors.clone(),
            LoadError::Read { path, source } => vec![SpecError {
                file: path.clone(),
                line: 0,
                column: 0,
                field: String::new(),
                message: source.to_string(),
            }],
        }
    }
}

fn render_errors(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and checks one spec file.
pub fn load(path: &Path) -> Result<ClusterNetwork, LoadError> {
    let name = path.display().to_string();
    let read_err = |source| LoadError::Read {
        path: name.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(
            &name,
            Pos { line: 1, column: 1 },
            format!(
                "file is {} bytes; a spec may be at most {MAX_FILE_BYTES}",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    parse_bytes(&name, &bytes)
}

/// Checks a spec given as raw bytes (they need not be UTF-8).
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<ClusterNetwork, LoadError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(file, text),
        Err(e) => {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            Err(invalid(
                file,
                Pos { line, column },
                "file is not UTF-8 text (is it a binary file?)",
            ))
        }
    }
}

fn invalid(file: &str, pos: Pos, message: impl Into<String>) -> LoadError {
    let mut c = Checker::new(file);
    c.error(pos, "", message);
    LoadError::Invalid(c.into_errors())
}

/// Checks a spec's text; `file` names it in messages.
pub fn parse(file: &str, text: &str) -> Result<ClusterNetwork, LoadError> {
    if text.contains('\0') {
        return Err(invalid(
            file,
            Pos { line: 1, column: 1 },
            "file contains NUL bytes (is it a binary file?)",
        ));
    }
    let parsed = yaml::parse_documents(text)
        .map_err(|e| invalid(file, e.pos, format!("not valid YAML: {}", e.message)))?;
    let docs = parsed.docs;
    let root = match docs.as_slice() {
        [] => {
            return Err(invalid(
                file,
                Pos { line: 1, column: 1 },
                "file is empty; expected a ClusterNetwork",
            ))
        }
        [one] => one,
        [_, second, ..] => {
            return Err(invalid(
                file,
                second.pos,
                format!(
                    "file holds {} YAML documents; put one ClusterNetwork per file",
                    docs.len()
                ),
            ))
        }
    };
    let mut c = Checker::new(file);
    for d in parsed.duplicates.iter().filter(|d| d.document == 0) {
        c.error(
            d.pos,
            &d.path,
            format!(
                "duplicate field (first at line {}, column {}); a key may occur once",
                d.first.line, d.first.column
            ),
        );
    }
    let spec = decode(&mut c, root);
    match spec {
        Some(spec) if !c.has_errors() => Ok(spec),
        _ => Err(LoadError::Invalid(c.into_errors())),
    }
}

fn decode(c: &mut Checker, root: &Node) -> Option<ClusterNetwork> {
    let top = c.section(root, "", &["apiVersion", "kind", "metadata", "spec"])?;
    if let Some(n) = c.require(&top, "apiVersion") {
        if let Some(v) = c.string(n, "apiVersion") {
            if v != API_VERSION {
                c.error(
                    n.pos,
                    "apiVersion",
                    format!("`{v}` is not supported; expected `{API_VERSION}`"),
                );
            }
        }
    }
    if let Some(n) = c.require(&top, "kind") {
        if let Some(v) = c.string(n, "kind") {
            if v != KIND {
                c.error(
                    n.pos,
                    "kind",
                    format!("`{v}` is not supported; expected `{KIND}`"),
                );
            }
        }
    }
    let name = c.require(&top, "metadata").and_then(|n| {
        let meta = c.section(n, "metadata", &["name", "labels", "annotations"])?;
        let node = c.require(&meta, "name")?;
        grammar_field(c, node, "metadata.name", |v| grammar::dns_label(v, "name"))
    });
    let spec = c.require(&top, "spec").and_then(|n| {
        c.section(
            n,
            "spec",
            &[
                "namespace",
                "cluster",
                "apiServer",
                "datapath",
                "kubeProxy",
                "validation",
                "reconcile",
                "observability",
            ],
        )
    })?;

    let namespace = opt(c, &spec, "namespace", |c, n, p| {
        grammar_field(c, n, p, |v| grammar::dns_label(v, "namespace name"))
    })
    .unwrap_or_else(|| "netboot-system".to_string());
    let cluster = c
        .require(&spec, "cluster")
        .and_then(|n| decode_cluster(c, n, "spec.cluster"));
    let api_server = spec
        .get("apiServer")
        .and_then(|n| decode_api_server(c, n, "spec.apiServer", cluster.as_ref()));
    let datapath = match spec.get("datapath") {
        Some(n) => decode_datapath(c, n, "spec.datapath"),
        None => Some(Datapath::defaults()),
    };
    let replace = datapath.as_ref().is_none_or(|d| d.kube_proxy_replacement);
    let kube_proxy = match spec.get("kubeProxy") {
        Some(n) => decode_kube_proxy(c, n, "spec.kubeProxy", replace),
        None => Some(KubeProxy::defaults(replace)),
    };
    let validation = match spec.get("validation") {
        Some(n) => decode_validation(c, n, "spec.validation"),
        None => Some(Validation::default()),
    };
    let reconcile = match (spec.get("reconcile"), name.as_deref()) {
        (Some(n), Some(name)) => decode_reconcile(c, n, "spec.reconcile", name),
        _ => None,
    };
    let observability = match spec.get("observability") {
        Some(n) => decode_observability(c, n, "spec.observability"),
        None => Some(Observability::default()),
    };
    Some(ClusterNetwork {
        name: name?,
        namespace,
        cluster: cluster?,
        api_server,
        datapath: datapath?,
        kube_proxy: kube_proxy?,
        validation: validation?,
        reconcile,
        observability: observability?,
    })
}

fn decode_observability(c: &mut Checker, n: &Node, path: &str) -> Option<Observability> {
    let s = c.section(n, path, &["dashboards", "alerts"])?;
    let mut o = Observability::default();
    if let Some(b) = opt(c, &s, "dashboards", Checker::boolean) {
        o.dashboards = b;
    }
    if let Some(b) = opt(c, &s, "alerts", Checker::boolean) {
        o.alerts = b;
    }
    Some(o)
}

/// A string field checked by its grammar; a violation is reported at the value.
fn grammar_field(
    c: &mut Checker,
    n: &Node,
    path: &str,
    check: impl FnOnce(&str) -> Result<(), GrammarError>,
) -> Option<String> {
    let v = c.string(n, path)?;
    match check(&v) {
        Ok(()) => Some(v),
        Err(e) => {
            c.error(n.pos, path, e.to_string());
            None
        }
    }
}

/// Decodes an optional field with `f` when present.
fn opt<T>(
    c: &mut Checker,
    s: &Section<'_>,
    key: &str,
    f: impl FnOnce(&mut Checker, &Node, &str) -> Option<T>,
) -> Option<T> {
    let node = s.get(key)?;
    f(c, node, &s.child(key))
}

fn decode_cluster(c: &mut Checker, n: &Node, path: &str) -> Option<Cluster> {
    let s = c.section(
        n,
        path,
        &[
            "context",
            "inCluster",
            "serviceCIDR",
            "podCIDR",
            "dnsDomain",
        ],
    )?;
    let context = opt(c, &s, "context", |c, n, p| {
        let v = c.nonempty(n, p)?;
        grammar_field(c, n, p, grammar::no_controls).map(|_| v)
    });
    let in_cluster = opt(c, &s, "inCluster", Checker::boolean).unwrap_or(false);
    if in_cluster && context.is_some() {
        c.error(
            s.pos,
            &s.child("context"),
            "set either `context` or `inCluster: true`, not both",
        );
    }
    let service_cidr = c
        .require(&s, "serviceCIDR")
        .and_then(|n| cidr(c, n, &s.child("serviceCIDR")));
    let pod_cidr = c
        .require(&s, "podCIDR")
        .and_then(|n| cidr(c, n, &s.child("podCIDR")));
    if let (Some(svc), Some(pod), Some(node)) = (service_cidr, pod_cidr, s.get("podCIDR")) {
        if svc.contains(&pod.network()) || pod.contains(&svc.network()) {
            c.error(
                node.pos,
                &s.child("podCIDR"),
                format!("{pod} overlaps serviceCIDR {svc}"),
            );
        }
    }
    let dns_domain = opt(c, &s, "dnsDomain", |c, n, p| {
        grammar_field(c, n, p, |v| grammar::dns_subdomain(v, "DNS domain"))
    })
    .unwrap_or_else(|| "cluster.local".into());
    Some(Cluster {
        context,
        in_cluster,
        service_cidr: service_cidr?,
        pod_cidr: pod_cidr?,
        dns_domain,
    })
}

fn cidr(c: &mut Checker, n: &Node, path: &str) -> Option<IpNet> {
    let text = c.nonempty(n, path)?;
    match text.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Some(net),
        Ok(net) => {
            c.error(
                n.pos,
                path,
                format!(
                    "`{text}` has host bits set; did you mean `{}`?",
                    net.trunc()
                ),
            );
            None
        }
        Err(_) => {
            c.error(
                n.pos,
                path,
                format!("`{text}` is not a CIDR (expected e.g. 10.96.0.0/12)"),
            );
            None
        }
    }
}

fn decode_api_server(
    c: &mut Checker,
    n: &Node,
    path: &str,
    cluster: Option<&Cluster>,
) -> Option<ApiServer> {
    let s = c.section(n, path, &["host", "port"])?;
    let port = match s.get("port") {
        Some(p) => c
            .integer(p, &s.child("port"), 1, 65535)
            .and_then(|v| u16::try_from(v).ok()),
        None => Some(6443),
    };
    let host_path = s.child("host");
    let host = c.require(&s, "host").and_then(|n| {
        let host = c.string(n, &host_path)?;
        check_host(c, n, &host_path, &host, cluster)?;
        Some(host)
    });
    Some(ApiServer {
        host: host?,
        port: port?,
    })
}

/// Refuses what is not an IP address or a DNS-1123 subdomain (URLs, ports,
/// quotes, line breaks), and the kube-proxy trap: an address inside the
/// Service CIDR.
pub(crate) fn check_host(
    c: &mut Checker,
    n: &Node,
    path: &str,
    host: &str,
    cluster: Option<&Cluster>,
) -> Option<()> {
    let ip = match grammar::host(host) {
        Ok(ip) => ip,
        Err(e) => {
            c.error(n.pos, path, e.to_string());
            return None;
        }
    };
    if let (Some(ip), Some(cluster)) = (ip, cluster) {
        if cluster.service_cidr.contains(&ip) {
            c.error(
                n.pos,
                path,
                format!(
                    "{ip} is inside the cluster's Service CIDR {}: it is a ClusterIP (the `kubernetes` Service), \
                 reachable only through kube-proxy or the datapath itself — once kube-proxy is removed the \
                 agent could not reach the API server and could not start. Use the API server's real address \
                 (a node IP, a load balancer or a stable DNS name)",
                    cluster.service_cidr
                ),
            );
            return None;
        }
    }
    Some(())
}

impl Datapath {
    fn defaults() -> Self {
        Datapath {
            provider: Provider::Netboot,
            image: "ghcr.io/netboot/netboot-datapath".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kube_proxy_replacement: true,
            session_affinity_timeout_seconds:
                netboot_contract::config::DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS,
            map_sizes: MapSizes::DEFAULT,
            health_port: 9890,
            metrics_port: 9891,
            load_balancing: LoadBalancing::default(),
            conntrack: Conntrack::DEFAULT,
            socket_lb: SocketLb::default(),
            service_metrics: false,
        }
    }
}

fn decode_datapath(c: &mut Checker, n: &Node, path: &str) -> Option<Datapath> {
    let s = c.section(
        n,
        path,
        &[
            "provider",
            "image",
            "version",
            "kubeProxyReplacement",
            "sessionAffinityTimeoutSeconds",
            "mapSizes",
            "healthPort",
            "metricsPort",
            "loadBalancing",
            "conntrack",
            "socketLB",
            "serviceMetrics",
        ],
    )?;
    let mut d = Datapath::defaults();
    let mut ok = true;
    if let Some(p) = s.get("provider") {
        let p_path = s.child("provider");
        match c.one_of(p, &p_path, &["netboot", "cilium"]).as_deref() {
            Some("netboot") => {}
            Some(_) => {
                c.error(
                    p.pos,
                    &p_path,
                    "provider `cilium` is not yet supported; use `netboot`",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(n) = s.get("image") {
        match grammar_field(c, n, &s.child("image"), grammar::image_repository) {
            Some(v) => d.image = v,
            None => ok = false,
        }
    }
    if let Some(n) = s.get("version") {
        match grammar_field(c, n, &s.child("version"), grammar::image_tag) {
            Some(v) => d.version = v,
            None => ok = false,
        }
    }
    if let Some(v) = opt(c, &s, "kubeProxyReplacement", Checker::boolean) {
        d.kube_proxy_replacement = v;
    }
    if let Some(v) = opt(c, &s, "serviceMetrics", Checker::boolean) {
        d.service_metrics = v;
    }
    if let Some(v) = opt(c, &s, "sessionAffinityTimeoutSeconds", |c, n, p| {
        c.integer(n, p, 1, 86400)
    }) {
        d.session_affinity_timeout_seconds = u32::try_from(v).ok()?;
    }
    if let Some(v) = opt(c, &s, "healthPort", |c, n, p| c.integer(n, p, 1, 65535)) {
        d.health_port = u16::try_from(v).ok()?;
    }
    if let Some(v) = opt(c, &s, "metricsPort", |c, n, p| c.integer(n, p, 1, 65535)) {
        d.metrics_port = u16::try_from(v).ok()?;
    }
    if d.metrics_port == d.health_port {
        if let Some(n) = s.get("metricsPort").or_else(|| s.get("healthPort")) {
            c.error(
                n.pos,
                &s.child("metricsPort"),
                format!("must differ from healthPort ({})", d.health_port),
            );
            ok = false;
        }
    }
    if let Some(ct) = s.get("conntrack") {
        let keys = [
            "tcpEstablishedTimeoutSeconds",
            "tcpSynTimeoutSeconds",
            "tcpCloseTimeoutSeconds",
            "udpTimeoutSeconds",
        ];
        let cs = c.section(ct, &s.child("conntrack"), &keys)?;
        for key in keys {
            let Some(v) = opt(c, &cs, key, |c, n, p| {
                c.integer(n, p, 1, Conntrack::MAX_SECONDS.into())
            }) else {
                continue;
            };
            let v = u32::try_from(v).ok()?;
            match key {
                "tcpEstablishedTimeoutSeconds" => d.conntrack.tcp_established_timeout_seconds = v,
                "tcpSynTimeoutSeconds" => d.conntrack.tcp_syn_timeout_seconds = v,
                "tcpCloseTimeoutSeconds" => d.conntrack.tcp_close_timeout_seconds = v,
                _ => d.conntrack.udp_timeout_seconds = v,
            }
        }
    }
    if let Some(sl) = s.get("socketLB") {
        let ss = c.section(
            sl,
            &s.child("socketLB"),
            &["hostNamespaceOnly", "podInterfaces"],
        )?;
        if let Some(v) = opt(c, &ss, "hostNamespaceOnly", Checker::boolean) {
            d.socket_lb.host_namespace_only = v;
        }
        if let Some(list) = ss.get("podInterfaces") {
            let p = ss.child("podInterfaces");
            match c.list(list, &p) {
                Some(items) => {
                    let mut globs = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let ip = format!("{p}[{i}]");
                        match c.string(item, &ip) {
                            Some(g)
                                if !g.is_empty()
                                    && g.len() <= 15
                                    && !g.contains(['/', ' ', ',']) =>
                            {
                                globs.push(g)
                            }
                            Some(g) => {
                                c.error(
                                    item.pos,
                                    &ip,
                                    format!("{g:?}: an interface name or glob is 1-15 characters without '/', ',' or spaces"),
                                );
                                ok = false;
                            }
                            None => ok = false,
                        }
                    }
                    if globs.is_empty() && items.is_empty() && d.socket_lb.host_namespace_only {
                        c.error(
                            list.pos,
                            &p,
                            "must name at least one interface or glob while hostNamespaceOnly is true (pods would reach no Service)",
                        );
                        ok = false;
                    }
                    d.socket_lb.pod_interfaces = globs;
                }
                None => ok = false,
            }
        }
    }
    if let Some(lb) = s.get("loadBalancing") {
        let ls = c.section(
            lb,
            &s.child("loadBalancing"),
            &["algorithm", "maglevTableSize"],
        )?;
        if let Some(a) = ls.get("algorithm") {
            match c
                .one_of(a, &ls.child("algorithm"), &["random", "maglev"])
                .as_deref()
            {
                Some("maglev") => {
                    d.load_balancing.algorithm = netboot_contract::config::Algorithm::Maglev
                }
                Some(_) => d.load_balancing.algorithm = netboot_contract::config::Algorithm::Random,
                None => ok = false,
            }
        }
        if let Some(n) = ls.get("maglevTableSize") {
            use netboot_contract::config::{
                is_prime, MAX_MAGLEV_TABLE_SIZE, MIN_MAGLEV_TABLE_SIZE,
            };
            let p = ls.child("maglevTableSize");
            match c
                .integer(
                    n,
                    &p,
                    MIN_MAGLEV_TABLE_SIZE.into(),
                    MAX_MAGLEV_TABLE_SIZE.into(),
                )
                .and_then(|v| u32::try_from(v).ok())
            {
                Some(v) if is_prime(v) => d.load_balancing.maglev_table_size = v,
                Some(v) => {
                    c.error(
                        n.pos,
                        &p,
                        format!("{v} is not a prime (e.g. 251, 1021, 4093, 16381)"),
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
    }
    if let Some(m) = s.get("mapSizes") {
        let ms = c.section(
            m,
            &s.child("mapSizes"),
            &["services", "backends", "affinity", "reverseNat"],
        )?;
        let size = |c: &mut Checker, key: &str, default: u32| -> Option<u32> {
            match ms.get(key) {
                Some(n) => c
                    .integer(n, &ms.child(key), 1024, 16_777_216)
                    .and_then(|v| u32::try_from(v).ok()),
                None => Some(default),
            }
        };
        let def = MapSizes::DEFAULT;
        d.map_sizes = MapSizes {
            services: size(c, "services", def.services)?,
            backends: size(c, "backends", def.backends)?,
            affinity: size(c, "affinity", def.affinity)?,
            reverse_nat: size(c, "reverseNat", def.reverse_nat)?,
        };
    }
    ok.then_some(d)
}

impl KubeProxy {
    fn defaults(replace: bool) -> Self {
        KubeProxy {
            remove: replace,
            backup: true,
            cleanup_rules: true,
            namespace: "kube-system".into(),
            daemon_set: "kube-proxy".into(),
            config_map: "kube-proxy".into(),
            allow_unserved: Vec::new(),
        }
    }
}

fn decode_kube_proxy(c: &mut Checker, n: &Node, path: &str, replace: bool) -> Option<KubeProxy> {
    let s = c.section(
        n,
        path,
        &[
            "remove",
            "backup",
            "cleanupRules",
            "namespace",
            "daemonSet",
            "configMap",
            "allowUnserved",
        ],
    )?;
    let mut k = KubeProxy::defaults(replace);
    if let Some(list) = s.get("allowUnserved") {
        let p = s.child("allowUnserved");
        let names = netboot_contract::features::Feature::names();
        for (i, item) in c.list(list, &p)?.iter().enumerate() {
            if let Some(name) = c.one_of(item, &format!("{p}[{i}]"), &names) {
                if !k.allow_unserved.contains(&name) {
                    k.allow_unserved.push(name);
                }
            }
        }
    }
    if let Some(v) = opt(c, &s, "remove", Checker::boolean) {
        if v && !replace {
            if let Some(node) = s.get("remove") {
                c.error(
                    node.pos,
                    &s.child("remove"),
                    "kube-proxy can only be removed when \
                    `spec.datapath.kubeProxyReplacement` is true; in coexist mode it keeps serving Services",
                );
            }
            return None;
        }
        k.remove = v;
    }
    if let Some(v) = opt(c, &s, "backup", Checker::boolean) {
        if !v && k.remove {
            if let Some(node) = s.get("backup") {
                c.error(
                    node.pos,
                    &s.child("backup"),
                    "removing kube-proxy without a backup would make rollback \
                    impossible; keep `backup: true`",
                );
            }
            return None;
        }
        k.backup = v;
    }
    if let Some(v) = opt(c, &s, "cleanupRules", Checker::boolean) {
        k.cleanup_rules = v;
    }
    let mut ok = true;
    for (key, slot, check) in [
        (
            "namespace",
            &mut k.namespace,
            (|v| grammar::dns_label(v, "namespace name")) as fn(&str) -> Result<(), GrammarError>,
        ),
        ("daemonSet", &mut k.daemon_set, |v| {
            grammar::dns_subdomain(v, "DaemonSet name")
        }),
        ("configMap", &mut k.config_map, |v| {
            grammar::dns_subdomain(v, "ConfigMap name")
        }),
    ] {
        if let Some(n) = s.get(key) {
            match grammar_field(c, n, &s.child(key), check) {
                Some(v) => *slot = v,
                None => ok = false,
            }
        }
    }
    ok.then_some(k)
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            skip: Vec::new(),
            timeout_seconds: 300,
            rollout_timeout_seconds: 300,
            rollback_on_failure: true,
        }
    }
}

fn decode_validation(c: &mut Checker, n: &Node, path: &str) -> Option<Validation> {
    let s = c.section(
        n,
        path,
        &[
            "skip",
            "timeoutSeconds",
            "rolloutTimeoutSeconds",
            "rollbackOnFailure",
        ],
    )?;
    let mut v = Validation::default();
    if let Some(list) = s.get("skip") {
        let p = s.child("skip");
        for (i, item) in c.list(list, &p)?.iter().enumerate() {
            if let Some(name) = c.one_of(item, &format!("{p}[{i}]"), CHECKS) {
                v.skip.push(name);
            }
        }
    }
    if let Some(t) = opt(c, &s, "timeoutSeconds", |c, n, p| c.integer(n, p, 1, 3600)) {
        v.timeout_seconds = u32::try_from(t).ok()?;
    }
    if let Some(t) = opt(c, &s, "rolloutTimeoutSeconds", |c, n, p| {
        c.integer(n, p, 1, 3600)
    }) {
        v.rollout_timeout_seconds = u32::try_from(t).ok()?;
    }
    if let Some(b) = opt(c, &s, "rollbackOnFailure", Checker::boolean) {
        v.rollback_on_failure = b;
    }
    Some(v)
}

fn decode_reconcile(c: &mut Checker, n: &Node, path: &str, name: &str) -> Option<Reconcile> {
    let s = c.section(
        n,
        path,
        &[
            "repo",
            "ref",
            "path",
            "interval",
            "suspend",
            "image",
            "secretName",
        ],
    )?;
    let repo_node = c.require(&s, "repo");
    let repo = repo_node.and_then(|n| {
        let url = c.nonempty(n, &s.child("repo"))?;
        grammar_field(c, n, &s.child("repo"), grammar::no_controls)?;
        if let Some(problem) = reconcile_repo_problem(&url) {
            c.error(n.pos, &s.child("repo"), problem);
            return None;
        }
        Some(url)
    });
    let git_ref = opt(c, &s, "ref", |c, n, p| {
        grammar_field(c, n, p, grammar::git_ref)
    })
    .unwrap_or_else(|| "main".into());
    let spec_path = opt(c, &s, "path", |c, n, p| {
        grammar_field(c, n, p, grammar::repo_path)
    })
    .unwrap_or_else(|| format!("clusters/{name}.yaml"));
    let (interval_seconds, schedule) = match s.get("interval") {
        Some(n) => interval(c, n, &s.child("interval"))?,
        None => (300, "*/5 * * * *".to_string()),
    };
    let suspend = opt(c, &s, "suspend", Checker::boolean).unwrap_or(false);
    let image = opt(c, &s, "image", |c, n, p| {
        grammar_field(c, n, p, |v| grammar::image_reference(v).map(|_| ()))
    })
    .unwrap_or_else(|| format!("ghcr.io/netboot/netboot:{}", env!("CARGO_PKG_VERSION")));
    let secret_name = opt(c, &s, "secretName", |c, n, p| {
        grammar_field(c, n, p, |v| grammar::dns_subdomain(v, "Secret name"))
    });
    Some(Reconcile {
        repo: repo?,
        git_ref,
        path: spec_path,
        interval_seconds,
        schedule,
        suspend,
        image,
        secret_name,
    })
}

/// Why the reconciler could not fetch from `url` (schemes in any case): a
/// scheme other than https://, ssh:// (or `[user@]host:path`) and file://, or an
/// absolute path; credentials in the URL (they would be in the CronJob's
/// arguments); plain http:// (the in-cluster reconciler never allows it).
fn reconcile_repo_problem(url: &str) -> Option<String> {
    use crate::source::url::{self, Scheme, UrlError};
    let expected = "(expected https://, ssh://, git@host:path, file:// or an absolute path)";
    match url::check(url, false) {
        Ok(u) => match u.scheme {
            Scheme::Https | Scheme::Ssh | Scheme::File => None,
            Scheme::Local if url.starts_with('/') => None,
            _ => Some(format!("`{url}` is not a git URL {expected}")),
        },
        Err(UrlError::Unsupported | UrlError::Invalid(_)) => {
            Some(format!("`{url}` is not a git URL {expected}"))
        }
        Err(UrlError::InsecureHttp) => Some(
            "http:// is refused: the token and the spec would cross the network unencrypted and unauthenticated; use https:// or ssh://"
                .into(),
        ),
        Err(e @ UrlError::Credentials) => Some(e.to_string()),
    }
}

/// `5m`, `1h`, `30m`: whole minutes dividing an hour or whole hours dividing a
/// day, so the CronJob's schedule matches the interval exactly.
fn interval(c: &mut Checker, n: &Node, path: &str) -> Option<(u64, String)> {
    let text = c.nonempty(n, path)?;
    let (num, unit) = text.split_at(
        text.find(|ch: char| !ch.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = num.parse().unwrap_or(0);
    let result = match unit {
        "m" if value > 0 && 60 % value == 0 => Some((value * 60, format!("*/{value} * * * *"))),
        "h" if value > 0 && 24 % value == 0 => Some((value * 3600, format!("0 */{value} * * *"))),
        _ => None,
    };
    if result.is_none() {
        c.error(
            n.pos,
            path,
            format!(
                "`{text}` is not a supported interval: use minutes that divide an hour (1m, 5m, 10m, 15m, 30m) \
             or hours that divide a day (1h, 2h, 6h, 12h, 24h)"
            ),
        );
    }
    result
}

#[cfg(test)]
mod tests;
