use super::*;

const GOOD: &str = "\
apiVersion: netboot.io/v1alpha1
kind: ClusterNetwork
metadata:
  name: t
spec:
  cluster:
    serviceCIDR: 10.96.0.0/16
    podCIDR: 10.244.0.0/16
  apiServer:
    host: 172.18.0.2
    port: 6443
";

fn errors(text: &str) -> Vec<String> {
    match parse("t.yaml", text) {
        Ok(spec) => panic!("expected errors, got {spec:?}"),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn allow_unserved_names_features_once_each() {
    let s = parse(
        "t.yaml",
        &format!("{GOOD}  kubeProxy:\n    allowUnserved: [sctp, nodeport, sctp]\n"),
    )
    .unwrap();
    assert_eq!(s.kube_proxy.allow_unserved, vec!["sctp", "nodeport"]);
    assert!(parse("t.yaml", GOOD)
        .unwrap()
        .kube_proxy
        .allow_unserved
        .is_empty());
}

#[test]
fn good_spec_gets_defaults() {
    let s = parse("t.yaml", GOOD).unwrap();
    assert_eq!(s.name, "t");
    assert_eq!(s.namespace, "netboot-system");
    assert!(s.datapath.kube_proxy_replacement);
    assert!(s.kube_proxy.remove, "remove follows kubeProxyReplacement");
    assert!(s.kube_proxy.backup);
    assert_eq!(s.datapath.map_sizes.services, 65536);
    assert_eq!(s.datapath.map_sizes.backends, 262144);
    assert_eq!(s.validation.timeout_seconds, 300);
    assert!(s.validation.rollback_on_failure);
    assert_eq!(
        s.api_server,
        Some(ApiServer {
            host: "172.18.0.2".into(),
            port: 6443
        })
    );
}

#[test]
fn coexist_keeps_kube_proxy_by_default() {
    let text = format!("{GOOD}  datapath:\n    kubeProxyReplacement: false\n");
    let s = parse("t.yaml", &text).unwrap();
    assert!(!s.kube_proxy.remove);
}

/// Each malformed spec, the error it must produce, and the line it must point at.
#[test]
fn malformed_specs_point_at_the_right_line() {
    let table: &[(&str, String, &str)] = &[
        (
            "unknown field with suggestion",
            GOOD.replace("  apiServer:", "  apiserver:"),
            "t.yaml:9:3: spec.apiserver: unknown field; did you mean `apiServer`?",
        ),
        (
            "wrong type",
            GOOD.replace("port: 6443", "port: [1]"),
            "t.yaml:11:11: spec.apiServer.port: expected an integer, found list",
        ),
        (
            "port out of range",
            GOOD.replace("port: 6443", "port: 70000"),
            "t.yaml:11:11: spec.apiServer.port: 70000 is out of range (1..=65535)",
        ),
        ("port zero", GOOD.replace("port: 6443", "port: 0"), "t.yaml:11:11: spec.apiServer.port: 0 is out of range"),
        (
            "ClusterIP as API host",
            GOOD.replace("172.18.0.2", "10.96.0.1"),
            "t.yaml:10:11: spec.apiServer.host: 10.96.0.1 is inside the cluster's Service CIDR 10.96.0.0/16",
        ),
        (
            "URL as host",
            GOOD.replace("172.18.0.2", "https://api.example.com:6443"),
            "t.yaml:10:11: spec.apiServer.host: `https://api.example.com:6443` is a URL",
        ),
        ("empty host", GOOD.replace("172.18.0.2", "\"\""), "t.yaml:10:11: spec.apiServer.host: must not be empty"),
        (
            "host with port",
            GOOD.replace("172.18.0.2", "api.example.com:6443"),
            "t.yaml:10:11: spec.apiServer.host: `api.example.com:6443` contains ':'",
        ),
        (
            "bad CIDR",
            GOOD.replace("10.244.0.0/16", "10.244.0.0/33"),
            "t.yaml:8:14: spec.cluster.podCIDR: `10.244.0.0/33` is not a CIDR",
        ),
        (
            "CIDR with host bits",
            GOOD.replace("10.96.0.0/16", "10.96.0.1/16"),
            "t.yaml:7:18: spec.cluster.serviceCIDR: `10.96.0.1/16` has host bits set; did you mean `10.96.0.0/16`?",
        ),
        (
            "overlapping CIDRs",
            GOOD.replace("10.244.0.0/16", "10.96.128.0/17"),
            "t.yaml:8:14: spec.cluster.podCIDR: 10.96.128.0/17 overlaps serviceCIDR 10.96.0.0/16",
        ),
        (
            "missing name",
            GOOD.replace("  name: t\n", "  labels: {}\n"),
            "t.yaml:3:1: metadata.name: required field is missing",
        ),
        (
            "bad name",
            GOOD.replace("name: t", "name: Prod_1"),
            "t.yaml:4:9: metadata.name: `Prod_1` is not a valid name",
        ),
        ("empty file", String::new(), "t.yaml:1:1: file is empty; expected a ClusterNetwork"),
        ("comments only", "# nothing\n".to_string(), "t.yaml:1:1: file is empty"),
        ("not YAML", "spec: [unclosed\nfoo: {\n".to_string(), "t.yaml:"),
        ("not a mapping", "- a\n- b\n".to_string(), "t.yaml:1:1: expected a mapping, found list"),
        ("two documents", format!("{GOOD}---\n{GOOD}"), "t.yaml:13:1: file holds 2 YAML documents"),
        (
            "unknown provider",
            format!("{GOOD}  datapath:\n    provider: calico\n"),
            "t.yaml:13:15: spec.datapath.provider: `calico` is not one of: netboot, cilium",
        ),
        (
            "cilium reserved",
            format!("{GOOD}  datapath:\n    provider: cilium\n"),
            "t.yaml:13:15: spec.datapath.provider: provider `cilium` is not yet supported",
        ),
        (
            "wrong kind",
            GOOD.replace("kind: ClusterNetwork", "kind: Cluster"),
            "t.yaml:2:7: kind: `Cluster` is not supported; expected `ClusterNetwork`",
        ),
        (
            "wrong apiVersion",
            GOOD.replace("netboot.io/v1alpha1", "v1"),
            "t.yaml:1:13: apiVersion: `v1` is not supported",
        ),
        (
            "string for boolean",
            format!("{GOOD}  datapath:\n    kubeProxyReplacement: \"yes\"\n"),
            "t.yaml:13:27: spec.datapath.kubeProxyReplacement: expected a boolean (true or false), found string",
        ),
        (
            "unknown check",
            format!("{GOOD}  validation:\n    skip: [dnss]\n"),
            "t.yaml:13:12: spec.validation.skip[0]: `dnss` is not one of: kube-proxy, agents",
        ),
        (
            "unknown unserved feature",
            format!("{GOOD}  kubeProxy:\n    allowUnserved: [sctp, nodeprt]\n"),
            "t.yaml:13:27: spec.kubeProxy.allowUnserved[1]: `nodeprt` is not one of: clusterip, nodeport, loadbalancer, externalips, ipv4, ipv6, tcp, udp, sctp, internal-traffic-local, external-traffic-local, session-affinity, topology-hints, lb-source-ranges; did you mean `nodeport`?",
        ),
        (
            "remove in coexist",
            format!("{GOOD}  datapath:\n    kubeProxyReplacement: false\n  kubeProxy:\n    remove: true\n"),
            "t.yaml:15:13: spec.kubeProxy.remove: kube-proxy can only be removed",
        ),
        (
            "remove without backup",
            format!("{GOOD}  kubeProxy:\n    backup: false\n"),
            "t.yaml:13:13: spec.kubeProxy.backup: removing kube-proxy without a backup",
        ),
        (
            "bad interval",
            format!("{GOOD}  reconcile:\n    repo: https://x/y.git\n    interval: 7m\n"),
            "t.yaml:14:15: spec.reconcile.interval: `7m` is not a supported interval",
        ),
        (
            "bad repo",
            format!("{GOOD}  reconcile:\n    repo: x/y\n"),
            "t.yaml:13:11: spec.reconcile.repo: `x/y` is not a git URL",
        ),
        (
            "token in the repo URL",
            format!("{GOOD}  reconcile:\n    repo: https://ghp_s3cr3t@git.example/o/r.git\n"),
            "t.yaml:13:11: spec.reconcile.repo: credentials in the URL are refused",
        ),
        (
            "user and password in the repo URL",
            format!("{GOOD}  reconcile:\n    repo: HTTPS://deploy:s3cr3t@git.example/o/r.git\n"),
            "t.yaml:13:11: spec.reconcile.repo: credentials in the URL are refused",
        ),
        (
            "plain http repo",
            format!("{GOOD}  reconcile:\n    repo: Http://git.example/o/r.git\n"),
            "t.yaml:13:11: spec.reconcile.repo: http:// is refused",
        ),
        (
            "map size too small",
            format!("{GOOD}  datapath:\n    mapSizes:\n      services: 10\n"),
            "t.yaml:14:17: spec.datapath.mapSizes.services: 10 is out of range",
        ),
        (
            "maglev table size not a prime",
            format!("{GOOD}  datapath:\n    loadBalancing:\n      algorithm: maglev\n      maglevTableSize: 16380\n"),
            "t.yaml:15:24: spec.datapath.loadBalancing.maglevTableSize: 16380 is not a prime (e.g. 251, 1021, 4093, 16381)",
        ),
        (
            "conntrack lifetime out of range",
            format!("{GOOD}  datapath:\n    conntrack:\n      udpTimeoutSeconds: 0\n"),
            "t.yaml:14:26: spec.datapath.conntrack.udpTimeoutSeconds: 0 is out of range (1..=604800)",
        ),
        (
            "socketLB pod interface glob with a space",
            format!("{GOOD}  datapath:\n    socketLB:\n      hostNamespaceOnly: true\n      podInterfaces: [lxc*, 'my pod']\n"),
            "t.yaml:15:29: spec.datapath.socketLB.podInterfaces[1]: \"my pod\": an interface name or glob is 1-15 characters without '/', ',' or spaces",
        ),
        (
            "serviceMetrics not a boolean",
            format!("{GOOD}  datapath:\n    serviceMetrics: yes please\n"),
            "t.yaml:13:21: spec.datapath.serviceMetrics: expected a boolean (true or false)",
        ),
        (
            "socketLB hostNamespaceOnly not a boolean",
            format!("{GOOD}  datapath:\n    socketLB:\n      hostNamespaceOnly: pods\n"),
            "t.yaml:14:26: spec.datapath.socketLB.hostNamespaceOnly: expected a boolean (true or false)",
        ),
        (
            "socketLB without pod interfaces",
            format!("{GOOD}  datapath:\n    socketLB:\n      hostNamespaceOnly: true\n      podInterfaces: []\n"),
            "t.yaml:15:22: spec.datapath.socketLB.podInterfaces: must name at least one interface or glob",
        ),
        (
            "unknown load balancing algorithm",
            format!("{GOOD}  datapath:\n    loadBalancing:\n      algorithm: hash\n"),
            "t.yaml:14:18: spec.datapath.loadBalancing.algorithm: `hash` is not one of: random, maglev",
        ),
        (
            "duplicate field",
            GOOD.replace("    port: 6443", "    port: 6443\n    port: 6444"),
            "t.yaml:12:5: spec.apiServer.port: duplicate field",
        ),
        (
            "image with tag",
            format!("{GOOD}  datapath:\n    image: ghcr.io/x/agent:1.0\n"),
            "t.yaml:13:12: spec.datapath.image: `ghcr.io/x/agent:1.0` must be an image repository without tag",
        ),
        (
            "issue 17: a line separator in kubeProxy.daemonSet",
            format!("{GOOD}  kubeProxy:\n    daemonSet: \"kube-proxy\\u2028hostPID: true\"\n"),
            "t.yaml:13:16: spec.kubeProxy.daemonSet: `kube-proxy\\u{2028}hostPID: true` is not a valid DaemonSet name",
        ),
        (
            "issue 17: NEL in kubeProxy.namespace",
            format!("{GOOD}  kubeProxy:\n    namespace: \"kube-system\\N- x\"\n"),
            "t.yaml:13:16: spec.kubeProxy.namespace: `kube-system\\u{0085}- x` is not a valid namespace name",
        ),
        (
            "configMap name with a quote",
            format!("{GOOD}  kubeProxy:\n    configMap: \"kube-proxy'\"\n"),
            "t.yaml:13:16: spec.kubeProxy.configMap: `kube-proxy'` is not a valid ConfigMap name",
        ),
        (
            "duplicate daemonSet",
            format!("{GOOD}  kubeProxy:\n    daemonSet: a\n    daemonSet: b\n"),
            "t.yaml:14:5: spec.kubeProxy.daemonSet: duplicate field (first at line 13, column 5)",
        ),
        (
            "duplicate label key (a map the checker does not walk)",
            GOOD.replace("  name: t\n", "  name: t\n  labels: {a: x, a: y}\n"),
            "t.yaml:5:18: metadata.labels.a: duplicate field",
        ),
        (
            "upper-case host",
            GOOD.replace("172.18.0.2", "API.example.com"),
            "t.yaml:10:11: spec.apiServer.host: `API.example.com` is neither an IP address nor a valid DNS name",
        ),
        (
            "host with a line separator",
            GOOD.replace("172.18.0.2", "\"a.b\\u2029  - x\""),
            "t.yaml:10:11: spec.apiServer.host: `a.b\\u{2029}  - x` is neither",
        ),
        (
            "version with a newline",
            format!("{GOOD}  datapath:\n    version: \"1.0\\nx: y\"\n"),
            "t.yaml:13:14: spec.datapath.version: `1.0\\nx: y` is not a valid image tag",
        ),
        (
            "image with digest",
            format!("{GOOD}  datapath:\n    image: ghcr.io/x/agent@sha256:{}\n", "0".repeat(64)),
            "t.yaml:13:12: spec.datapath.image: `ghcr.io/x/agent@sha256:",
        ),
        (
            "reconcile image with a short digest",
            format!("{GOOD}  reconcile:\n    repo: https://x/y.git\n    image: ghcr.io/x/n:1@sha256:abc\n"),
            "t.yaml:14:12: spec.reconcile.image: `ghcr.io/x/n:1@sha256:abc` is not a valid image digest",
        ),
        (
            "secretName with a colon",
            format!("{GOOD}  reconcile:\n    repo: https://x/y.git\n    secretName: \"a: b\"\n"),
            "t.yaml:14:17: spec.reconcile.secretName: `a: b` is not a valid Secret name",
        ),
        (
            "path that is a flag",
            format!("{GOOD}  reconcile:\n    repo: https://x/y.git\n    path: --all\n"),
            "t.yaml:14:11: spec.reconcile.path: `--all` is not a valid path in the repository",
        ),
        (
            "ref with a space",
            format!("{GOOD}  reconcile:\n    repo: https://x/y.git\n    ref: \"a b\"\n"),
            "t.yaml:14:10: spec.reconcile.ref: `a b` is not a valid git ref",
        ),
        (
            "repo with a line separator",
            format!("{GOOD}  reconcile:\n    repo: \"https://x/y.git\\L\"\n"),
            "t.yaml:13:11: spec.reconcile.repo: `https://x/y.git\\u{2028}` contains a control or line-break character (U+2028)",
        ),
        (
            "dnsDomain not a domain",
            GOOD.replace("    podCIDR: 10.244.0.0/16\n", "    podCIDR: 10.244.0.0/16\n    dnsDomain: cluster_local\n"),
            "t.yaml:9:16: spec.cluster.dnsDomain: `cluster_local` is not a valid DNS domain",
        ),
    ];
    assert!(table.len() >= 15);
    let mut failures = Vec::new();
    for (what, text, want) in table {
        let got = errors(text);
        if !got.iter().any(|e| e.starts_with(want)) {
            failures.push(format!("{what}: want prefix {want:?}\n  got {got:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reports_all_errors_at_once() {
    let text = GOOD
        .replace("port: 6443", "port: 99999")
        .replace("10.244.0.0/16", "nope")
        .replace("    host: 172.18.0.2", "    hots: x");
    let got = errors(&text);
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(
        got.iter().any(|e| e.contains("did you mean `host`?")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|e| e.contains("spec.apiServer.host: required field is missing")),
        "{got:#?}"
    );
}

#[test]
fn binary_bytes_are_refused_with_position() {
    let mut bytes = b"apiVersion: x\nkind: \xff\xfe\n".to_vec();
    let err = parse_bytes("bin.yaml", &bytes).unwrap_err().to_string();
    assert!(err.starts_with("bin.yaml:2:7: file is not UTF-8"), "{err}");
    bytes = vec![0u8; 64];
    let err = parse_bytes("zero.yaml", &bytes).unwrap_err().to_string();
    assert!(err.contains("NUL bytes"), "{err}");
}

#[test]
fn never_panics_on_odd_input() {
    let inputs = [
        "{".repeat(10_000),
        "[".repeat(10_000),
        "a: &x 1\nb: *x\n".to_string(),
        "? [a]\n: b\n".to_string(),
        "spec: !!binary aGVsbG8=\n".to_string(),
        "---\n---\n---\n".to_string(),
        "apiVersion: netboot.io/v1alpha1\nkind: ClusterNetwork\nmetadata: 5\nspec: []\n"
            .to_string(),
        "\u{feff}apiVersion: 1\n".to_string(),
        format!("a: {}\n", "x".repeat(500_000)),
    ];
    for input in inputs {
        let _ = parse("odd.yaml", &input);
    }
}

#[test]
fn shipped_specs_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../clusters");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 4, "expected prod, staging, local and kind; found {n}");
}

/// The reconciler's repository: schemes in any case, scp-like URLs; a token
/// in the URL is refused without being echoed (it would be in the CronJob).
#[test]
fn reconcile_repo_urls() {
    for repo in [
        "SSH://git@git.example/o/r.git",
        "deploy@git.example:o/r.git",
        "Https://git.example/o/r.git",
        "file:///srv/r.git",
        "/srv/r.git",
    ] {
        let s = parse("t.yaml", &format!("{GOOD}  reconcile:\n    repo: {repo}\n"));
        assert!(s.is_ok(), "{repo}: {s:?}");
    }
    let e = errors(&format!(
        "{GOOD}  reconcile:\n    repo: https://x-access-token:s3cr3t@git.example/o/r.git\n"
    ));
    assert!(e.iter().all(|m| !m.contains("s3cr3t")), "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.contains("--token-file") && m.contains("`token` key")),
        "{e:?}"
    );
}

#[test]
fn metrics_port_defaults_and_must_differ_from_health_port() {
    let s = parse("t.yaml", GOOD).unwrap();
    assert_eq!(
        (s.datapath.health_port, s.datapath.metrics_port),
        (9890, 9891)
    );
    let e = errors(&format!(
        "{GOOD}  datapath:\n    healthPort: 9000\n    metricsPort: 9000\n"
    ));
    assert_eq!(
        e,
        vec!["t.yaml:14:18: spec.datapath.metricsPort: must differ from healthPort (9000)"]
    );
}

#[test]
fn observability_is_off_by_default_and_checked_with_positions() {
    let s = parse("t.yaml", GOOD).unwrap();
    assert_eq!(s.observability, Observability::default());
    assert!(!s.observability.dashboards && !s.observability.alerts);
    let s = parse(
        "t.yaml",
        &format!("{GOOD}  observability:\n    dashboards: true\n    alerts: true\n"),
    )
    .unwrap();
    assert_eq!(
        s.observability,
        Observability {
            dashboards: true,
            alerts: true
        }
    );
    let e = errors(&format!(
        "{GOOD}  observability:\n    dashboard: true\n    alerts: yes\n"
    ));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with(
            "t.yaml:13:5: spec.observability.dashboard: unknown field; did you mean `dashboards`?"
        ),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("t.yaml:14:13: spec.observability.alerts: "),
        "{e:?}"
    );
    assert!(e[1].contains("boolean"), "{e:?}");
    let e = errors(&format!("{GOOD}  observability: true\n"));
    assert!(
        e[0].starts_with("t.yaml:12:18: spec.observability: "),
        "{e:?}"
    );
}
