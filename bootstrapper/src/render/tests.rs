use super::*;
use crate::spec;

fn shipped(name: &str) -> ClusterNetwork {
    let path = format!("{}/../clusters/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    spec::load(Path::new(&path)).unwrap()
}

fn opts_for(name: &str) -> RenderOptions {
    let api_server = (name == "kind").then(|| ApiServer {
        host: "172.18.0.2".into(),
        port: 6443,
    });
    RenderOptions {
        templates: None,
        api_server,
    }
}

#[test]
fn snapshots_of_every_shipped_cluster() {
    for name in ["prod", "staging", "local", "kind"] {
        let manifests = render(&shipped(name), name, &opts_for(name)).unwrap();
        insta::assert_snapshot!(format!("render_{name}"), to_yaml(&manifests).unwrap());
    }
}

#[test]
fn render_is_byte_identical_every_run() {
    let spec = shipped("prod");
    let a = to_yaml(&render(&spec, "prod", &RenderOptions::default()).unwrap()).unwrap();
    for _ in 0..5 {
        assert_eq!(
            a,
            to_yaml(&render(&spec, "prod", &RenderOptions::default()).unwrap()).unwrap()
        );
    }
}

#[test]
fn objects_carry_labels_and_hash() {
    for m in render(&shipped("prod"), "prod", &RenderOptions::default()).unwrap() {
        let labels = &m.object["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "netboot",
            "{}",
            m.id()
        );
        assert_eq!(labels["netboot.io/cluster"], "prod", "{}", m.id());
        assert_eq!(
            crate::manifest::canonical_hash(&m.object),
            m.hash(),
            "{}",
            m.id()
        );
    }
}

#[test]
fn objects_come_in_kind_rank_order() {
    let ids: Vec<_> = render(&shipped("prod"), "prod", &RenderOptions::default())
        .unwrap()
        .iter()
        .map(|m| m.id().clone())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(ids[0].kind, "Namespace");
    assert_eq!(ids.last().unwrap().kind, "PrometheusRule");
}

fn with_observability(dashboards: bool, alerts: bool) -> ClusterNetwork {
    let mut spec = shipped("local");
    spec.observability = crate::spec::Observability { dashboards, alerts };
    spec
}

fn rendered(spec: &ClusterNetwork, kind: &str) -> Vec<Manifest> {
    render(spec, "local", &opts_for("local"))
        .unwrap()
        .into_iter()
        .filter(|m| m.id().kind == kind && m.id().name == "netboot")
        .collect()
}

#[test]
fn observability_renders_nothing_unless_asked() {
    let spec = with_observability(false, false);
    assert!(rendered(&spec, "ConfigMap").is_empty());
    assert!(rendered(&spec, "PrometheusRule").is_empty());
    let spec = with_observability(true, false);
    assert_eq!(rendered(&spec, "ConfigMap").len(), 1);
    assert!(rendered(&spec, "PrometheusRule").is_empty());
    let spec = with_observability(false, true);
    assert!(rendered(&spec, "ConfigMap").is_empty());
    assert_eq!(rendered(&spec, "PrometheusRule").len(), 1);
}

#[test]
fn the_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar() {
    let spec = with_observability(true, true);
    let cm = &rendered(&spec, "ConfigMap")[0];
    assert_eq!(cm.id().namespace.as_deref(), Some(spec.namespace.as_str()));
    assert_eq!(cm.object["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = cm.object["data"]["netboot.json"].as_str().unwrap();
    assert_eq!(text, crate::observability::DASHBOARD_JSON);
    let _: serde_json::Value = serde_json::from_str(text).unwrap();
}

#[test]
fn the_prometheus_rule_carries_the_shipped_rule_groups() {
    let spec = with_observability(true, true);
    let pr = &rendered(&spec, "PrometheusRule")[0];
    assert_eq!(pr.object["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pr.id().namespace.as_deref(), Some(spec.namespace.as_str()));
    let groups: Vec<crate::observability::RuleGroup> =
        serde_json::from_value(pr.object["spec"]["groups"].clone()).unwrap();
    assert_eq!(groups, crate::observability::rule_file().unwrap().groups);
}

/// The `json` helper writes any structure on one line with every string
/// quoted: it reads back equal, and no string in it adds a key or a document.
#[test]
fn json_helper_writes_structures_that_read_back_whole() {
    for s in NASTY {
        let v = json!({"groups": [{"name": s, "rules": [{s.to_string(): [s, 1, true, null]}]}]});
        let line = flow_json(&v);
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let doc = format!("a: {line}\nb: 1\n");
        let back: serde_json::Value = serde_yaml::from_str(&doc).unwrap();
        assert_eq!(back["a"], v, "{s:?}");
        assert_eq!(back.as_object().unwrap().len(), 2, "{s:?}");
    }
}

#[test]
fn a_prometheus_rule_with_a_field_the_crd_does_not_know_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("extra.yaml.hbs"),
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x, namespace: netboot-system}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up == 0, fro: 5m}]}]\n",
    )
    .unwrap();
    let opts = RenderOptions {
        templates: Some(dir.path().to_path_buf()),
        ..opts_for("local")
    };
    let err = render(&shipped("local"), "local", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("extra.yaml.hbs") && err.contains("fro"),
        "{err}"
    );
}

#[test]
fn reconciler_only_when_spec_has_reconcile() {
    let kinds = |name: &str| -> Vec<String> {
        render(&shipped(name), name, &opts_for(name))
            .unwrap()
            .iter()
            .map(|m| m.id().to_string())
            .collect()
    };
    assert!(kinds("prod")
        .iter()
        .any(|k| k == "CronJob/netboot-system/netboot-reconciler"));
    assert!(!kinds("local").iter().any(|k| k.starts_with("CronJob")));
}

/// Strings that end lines, blocks or documents in some YAML parser, or that
/// quoting could get wrong.
const NASTY: &[&str] = &[
    "",
    "plain",
    "a\nb",
    "a\r\nb",
    "a\u{85}b",
    "a\u{2028}b",
    "a\u{2029}b",
    "\u{0}\u{1}\u{7}\u{8}\u{b}\u{c}\u{1b}[2K\u{7f}\u{80}\u{9f}",
    "\u{feff}bom\u{fffe}\u{ffff}",
    "\"quoted\" and 'single' and \\backslash\\",
    ": - ? [ ] { } # & * ! | > ' \" % @ `",
    "{{cluster}}",
    "\n---\nkind: DaemonSet\n",
    "x\u{2028}---\u{2028}kind: DaemonSet",
    "\u{202e}bidi\u{2066}",
    "emoji 🦀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
];

#[test]
fn quote_reads_back_byte_for_byte_in_json_yaml_and_a_block_scalar() {
    let long = "\u{2028}x".repeat(50_000);
    for s in NASTY.iter().copied().chain([long.as_str()]) {
        let q = quote(s);
        assert!(
            !q.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']),
            "{s:?} quoted with a raw line break: {q:?}"
        );
        assert_eq!(serde_json::from_str::<String>(&q).unwrap(), s, "json {q}");
        assert_eq!(serde_yaml::from_str::<String>(&q).unwrap(), s, "yaml {q}");
        let doc = format!("data:\n  config.yaml: |\n    a:\n      b: {q}\n    c: 1\nafter: 2\n");
        let outer: serde_yaml::Value = serde_yaml::from_str(&doc).unwrap();
        assert_eq!(outer["after"].as_u64(), Some(2));
        let inner: serde_yaml::Value =
            serde_yaml::from_str(outer["data"]["config.yaml"].as_str().unwrap()).unwrap();
        assert_eq!(inner["a"]["b"].as_str(), Some(s));
        assert_eq!(inner["c"].as_u64(), Some(1));
    }
}

/// Issue 17: a spec value with U+2028 ended the `config.yaml: |` block, and the
/// lines after it re-declared the ConfigMap as a privileged DaemonSet. Even
/// past the spec checker (this spec is built by hand), quoting keeps every
/// value inside its string.
#[test]
fn a_line_separator_in_a_value_cannot_add_objects_or_fields() {
    let benign = render(&shipped("prod"), "prod", &RenderOptions::default()).unwrap();
    let attack = "kube-proxy\u{2028}kind: DaemonSet\u{2028}apiVersion: apps/v1\u{2028}metadata: {name: x, namespace: kube-system}\u{2028}spec: {template: {spec: {hostPID: true}}}";
    let mut spec = shipped("prod");
    spec.kube_proxy.daemon_set = attack.into();
    spec.datapath.version = format!("1.0\u{85}hostNetwork: false\n{attack}");
    let r = spec.reconcile.as_mut().unwrap();
    r.repo = format!("https://x/y.git\u{2029}- --all\n{attack}");
    r.git_ref = "\"}, {\"hostPID\": true".into();
    r.path = "{{namespace}}\u{0}".into();
    let manifests = render(&spec, "prod", &RenderOptions::default()).unwrap();
    let ids = |ms: &[Manifest]| ms.iter().map(|m| m.id().to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&manifests), ids(&benign));
    let cm = manifests
        .iter()
        .find(|m| m.id().kind == "ConfigMap" && m.id().name == "netboot-datapath-config")
        .unwrap();
    let config: serde_yaml::Value =
        serde_yaml::from_str(cm.object["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(config["kubeProxy"]["daemonSet"].as_str(), Some(attack));
    let ds = manifests
        .iter()
        .find(|m| m.id().kind == "DaemonSet")
        .unwrap();
    assert_eq!(ds.object["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(
        ds.object["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/netboot/netboot-datapath:{}", spec.datapath.version)
    );
    let cron = manifests.iter().find(|m| m.id().kind == "CronJob").unwrap();
    let args =
        &cron.object["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let r = spec.reconcile.as_ref().unwrap();
    assert_eq!(
        args[6..],
        [
            r.repo.as_str(),
            "--ref",
            r.git_ref.as_str(),
            r.path.as_str()
        ]
    );
}

/// The endpoint can come from `--api-server` or the cluster, not only from a
/// checked spec: render checks its grammar itself.
#[test]
fn an_api_host_outside_its_grammar_is_refused() {
    let mut spec = shipped("local");
    spec.api_server = Some(ApiServer {
        host: "evil\u{2028}    - x".into(),
        port: 6443,
    });
    let err = render(&spec, "clusters/local.yaml", &RenderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("clusters/local.yaml: API server host: `evil\\u{2028}    - x` is neither an IP address nor a valid DNS name"),
        "{err}"
    );
}

/// No embedded template bypasses the quoting (`{{{raw}}}` or `{{&raw}}`).
#[test]
fn embedded_templates_never_write_raw_values() {
    for (name, text) in EMBEDDED {
        for raw in ["{{{", "{{~{", "{{&", "{{~&"] {
            assert!(!text.contains(raw), "{name} uses {raw}");
        }
    }
}

#[test]
fn concat_alone_is_quoted_too() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("extra.yaml.hbs"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: {{q namespace}}\ndata:\n  a: {{concat \"x\\n\" cluster}}\n  b: {{cluster}}\n",
    )
    .unwrap();
    let mut spec = shipped("local");
    spec.name = "c\u{2028}d: e".into();
    let opts = RenderOptions {
        templates: Some(dir.path().into()),
        api_server: None,
    };
    let manifests = render(&spec, "local", &opts).unwrap();
    let extra = manifests.iter().find(|m| m.id().name == "extra").unwrap();
    assert_eq!(extra.object["data"]["a"], "x\nc\u{2028}d: e");
    assert_eq!(extra.object["data"]["b"], "c\u{2028}d: e");
    assert!(extra.object["data"].get("d").is_none());
}

#[test]
fn config_map_carries_the_explicit_endpoint() {
    let manifests = render(&shipped("prod"), "prod", &RenderOptions::default()).unwrap();
    let cm = manifests
        .iter()
        .find(|m| m.id().kind == "ConfigMap" && m.id().name == "netboot-datapath-config")
        .unwrap();
    let config: serde_yaml::Value =
        serde_yaml::from_str(cm.object["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["apiServer"]["host"].as_str(),
        Some("api.prod.example.internal")
    );
    assert_eq!(config["apiServer"]["port"].as_u64(), Some(6443));
    assert_eq!(config["kubeProxyReplacement"].as_bool(), Some(true));
}

#[test]
fn missing_api_server_is_a_clear_error() {
    let err = render(
        &shipped("kind"),
        "clusters/kind.yaml",
        &RenderOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("clusters/kind.yaml: spec.apiServer is empty"),
        "{err}"
    );
}

#[test]
fn override_with_missing_variable_names_template_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent-configmap.yaml.hbs"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: {{q namespace}}\ndata:\n  a: {{q datapath.nosuchfield}}\n",
    )
    .unwrap();
    let opts = RenderOptions {
        templates: Some(dir.path().into()),
        api_server: None,
    };
    let err = render(&shipped("local"), "local", &opts)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("agent-configmap.yaml.hbs: line 7"), "{err}");
    assert!(err.contains("datapath.nosuchfield"), "{err}");
}

#[test]
fn override_replaces_and_adds_templates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("extra.yaml.hbs"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: {{q namespace}}\ndata:\n  cluster: {{q cluster}}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("reconciler.yaml.hbs"), "# disabled\n").unwrap();
    let opts = RenderOptions {
        templates: Some(dir.path().into()),
        api_server: None,
    };
    let ids: Vec<String> = render(&shipped("prod"), "prod", &opts)
        .unwrap()
        .iter()
        .map(|m| m.id().to_string())
        .collect();
    assert!(
        ids.contains(&"ConfigMap/netboot-system/extra".to_string()),
        "{ids:?}"
    );
    assert!(!ids.iter().any(|i| i.starts_with("CronJob")), "{ids:?}");
}

#[test]
fn an_override_rendering_bad_objects_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent-daemonset.yaml.hbs"),
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\n  namespace: {{q namespace}}\nspec:\n  selector: 5\n",
    )
    .unwrap();
    let opts = RenderOptions {
        templates: Some(dir.path().into()),
        api_server: None,
    };
    let err = render(&shipped("local"), "local", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("agent-daemonset.yaml.hbs: document 1: DaemonSet/netboot-system/x:"),
        "{err}"
    );
}

/// `NNNMi` / `NNNGi` in bytes.
fn quantity(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.len() - 2);
    let mul = match unit {
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unit {other} in {q}"),
    };
    n.parse::<u64>().unwrap() * mul
}

fn agent_memory(spec: &ClusterNetwork) -> (u64, u64) {
    let ms = render(spec, "prod", &RenderOptions::default()).unwrap();
    let ds = ms.iter().find(|m| m.id().kind == "DaemonSet").unwrap();
    let res = &ds.object["spec"]["template"]["spec"]["containers"][0]["resources"];
    (
        quantity(res["requests"]["memory"].as_str().unwrap()),
        quantity(res["limits"]["memory"].as_str().unwrap()),
    )
}

#[test]
fn agent_memory_limit_fits_full_maps_for_default_and_maximum_map_sizes() {
    // Why: BPF map memory is charged to the agent's cgroup; 256Mi did not fit the
    // allowed mapSizes, so a large cluster got the agent OOM-killed.
    // The formula of docs/contracts.md, written out: per map
    // 16 B × pow2(max) buckets; 88 B per preallocated lb4_svc element, 64 B per
    // preallocated lb4_be / lb4_revnat element; 96 B per entry of the
    // NO_PREALLOC affmatch map in use; 72 / 80 B per preallocated rev_sk /
    // affinity element; the
    // per-Service counters (per-CPU, 64 CPUs assumed); the fixed 12 MiB
    // nb_rev_tcp array (262,144 × 48 B); the IPv6 twins (buckets; 104 B per
    // preallocated lb6_rev_sk element; in use 128 B per lb6_svc entry, 96 B
    // per lb6_be / lb6_revnat entry); the maps mapSizes does not size (FIXED
    // B empty, measured, per-CPU values at 64 CPUs; both source-range tries
    // full: 2 × 16,384 × 2 × 96 B; with Maglev, min(4,096, reverseNat)
    // tables × 64 KiB);
    // userspace 12 KiB per frontend (≤ reverseNat) + 1 KiB per backend;
    // 64 MiB base.
    const FIXED_SHARED: u64 = 18_300_000;
    const FIXED_PER_CPU: u64 = 39 * 8 + 16 + 3 * 8;
    const FIXED: u64 = FIXED_SHARED + 64 * FIXED_PER_CPU;
    let formula = |m: spec::MapSizes, maglev: bool| -> (u64, u64) {
        let (s, b, a, r) = (
            u64::from(m.services),
            u64::from(m.backends),
            u64::from(m.affinity),
            u64::from(m.reverse_nat),
        );
        let bk = |n: u64| 16 * n.next_power_of_two();
        // nb_svc_stats: buckets; 96 B + 40 B on each of 64 assumed CPUs per id.
        let empty = bk(s)
            + 3 * bk(b)
            + 2 * bk(r)
            + bk(a)
            + 88 * s
            + 64 * (b + r)
            + 72 * b
            + 80 * a
            + 262_144 * 48
            + bk(s) + 2 * bk(b) + bk(r) + 104 * b // IPv6 twins
            + FIXED;
        let full = empty
            + 96 * b
            + (96 + 40 * 64) * r
            + 128 * s + 96 * b + 96 * r // IPv6 twins in use
            + 2 * 16_384 * 2 * 96
            + if maglev { 4096.min(r) * 65_536 } else { 0 };
        let user = 12 * 1024 * s.min(r) + 1024 * b;
        (64 * (1 << 20) + empty, 64 * (1 << 20) + full + user)
    };
    let max = 16_777_216;
    for sizes in [
        spec::MapSizes::default(),
        spec::MapSizes {
            services: max,
            backends: max,
            affinity: max,
            reverse_nat: max,
        },
        spec::MapSizes {
            services: 1024,
            backends: 1024,
            affinity: 1024,
            reverse_nat: 1024,
        },
    ] {
        for maglev in [false, true] {
            let mut spec = shipped("prod");
            spec.datapath.map_sizes = sizes;
            spec.datapath.load_balancing.algorithm = if maglev {
                netboot_contract::config::Algorithm::Maglev
            } else {
                netboot_contract::config::Algorithm::Random
            };
            let (request, limit) = agent_memory(&spec);
            let (want_request, want_limit) = formula(sizes, maglev);
            assert!(
                limit >= want_limit,
                "{sizes:?}: limit {limit} < {want_limit}"
            );
            assert!(
                request >= want_request,
                "{sizes:?}: request {request} < {want_request}"
            );
            assert!(
                limit - want_limit < 1 << 20,
                "{sizes:?}: rounded up by less than 1 MiB"
            );
            println!(
                "NUMBERS {sizes:?}, maglev {maglev}: request {} MiB, limit {} MiB",
                request >> 20,
                limit >> 20
            );
        }
    }
}

/// Every shipped spec (clusters/*.yaml).
fn every_shipped() -> Vec<(String, ClusterNetwork)> {
    let dir = format!("{}/../clusters", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter_map(|f| f.strip_suffix(".yaml").map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    names
        .into_iter()
        .map(|n| (n.clone(), shipped(&n)))
        .collect()
}

/// Issue 16 (review §1.4): config.yaml was written by a template and read by
/// the agent, and no test fed one into the other. Every shipped spec's
/// rendered config.yaml is parsed by the agent's parser (the contract's
/// `Config::parse`, which `netboot_datapath::config` re-exports) and says
/// what the spec says.
#[test]
fn every_shipped_specs_config_yaml_is_what_the_agent_parses() {
    use netboot_contract::config::KubeProxyRef;
    for (name, spec) in every_shipped() {
        let manifests = render(&spec, &name, &opts_for(&name)).unwrap();
        let cfg = agent_config(&manifests, &spec.namespace)
            .unwrap_or_else(|| panic!("{name}: no agent ConfigMap"))
            .unwrap();
        let api = spec
            .api_server
            .clone()
            .or(opts_for(&name).api_server)
            .unwrap();
        assert_eq!(cfg.api_server.host, api.host, "{name}");
        assert_eq!(cfg.api_server.port, api.port, "{name}");
        let d = &spec.datapath;
        assert_eq!(
            cfg.kube_proxy_replacement, d.kube_proxy_replacement,
            "{name}"
        );
        assert_eq!(
            cfg.session_affinity_timeout_seconds, d.session_affinity_timeout_seconds,
            "{name}"
        );
        assert_eq!(cfg.map_sizes, d.map_sizes, "{name}");
        assert_eq!(cfg.service_metrics, d.service_metrics, "{name}");
        assert_eq!(
            cfg.cleanup_kube_proxy_rules, spec.kube_proxy.cleanup_rules,
            "{name}"
        );
        assert_eq!(
            cfg.kube_proxy,
            KubeProxyRef {
                namespace: spec.kube_proxy.namespace.clone(),
                daemon_set: spec.kube_proxy.daemon_set.clone(),
            },
            "{name}"
        );
    }
}

/// `spec.datapath.serviceMetrics: true` reaches the agent's config.yaml
/// (per-Service counters on /metrics; off when left out).
#[test]
fn service_metrics_in_the_spec_turns_them_on_in_the_agents_config() {
    let mut spec = shipped("prod");
    spec.datapath.service_metrics = true;
    let manifests = render(&spec, "prod", &opts_for("prod")).unwrap();
    let cfg = agent_config(&manifests, &spec.namespace).unwrap().unwrap();
    assert!(cfg.service_metrics);
    let spec = shipped("prod");
    let manifests = render(&spec, "prod", &opts_for("prod")).unwrap();
    let cfg = agent_config(&manifests, &spec.namespace).unwrap().unwrap();
    assert!(!cfg.service_metrics);
}

/// A template override the agent could not read fails the render, naming
/// the template, not a crash-looping DaemonSet later.
#[test]
fn a_config_yaml_the_agent_would_refuse_fails_the_render() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = EMBEDDED
        .iter()
        .find(|(n, _)| *n == "agent-configmap.yaml.hbs")
        .unwrap();
    let broken = text.replace("reverseNat:", "reverseNAT:");
    assert_ne!(&broken, text);
    std::fs::write(dir.path().join("agent-configmap.yaml.hbs"), broken).unwrap();
    let opts = RenderOptions {
        templates: Some(dir.path().into()),
        api_server: None,
    };
    let e = render(&shipped("prod"), "prod", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("agent-configmap.yaml.hbs: ConfigMap/")
            && e.contains("config.yaml:")
            && e.contains("reverseNAT"),
        "{e}"
    );
}

/// The objects the bootstrapper waits for and reads (rollout, status) and
/// the agent's defaults are the contract's names.
#[test]
fn the_agents_objects_have_the_contracts_names() {
    use netboot_contract::agent;
    for (name, spec) in every_shipped() {
        let manifests = render(&spec, &name, &opts_for(&name)).unwrap();
        let find = |kind: &str, n: &str| {
            manifests
                .iter()
                .find(|m| {
                    m.id().kind == kind
                        && m.id().name == n
                        && m.id().namespace.as_deref() == Some(spec.namespace.as_str())
                })
                .unwrap_or_else(|| panic!("{name}: no {kind} {n}"))
        };
        let ds = &find("DaemonSet", agent::DAEMONSET).object["spec"];
        assert_eq!(
            ds["selector"]["matchLabels"][agent::NAME_LABEL],
            agent::NAME
        );
        let pod = &ds["template"];
        assert_eq!(pod["metadata"]["labels"][agent::NAME_LABEL], agent::NAME);
        assert_eq!(pod["spec"]["serviceAccountName"], agent::SERVICE_ACCOUNT);
        find("ServiceAccount", agent::SERVICE_ACCOUNT);
        let c = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .unwrap();
        let env = |k: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == k)
                .map(|e| e["value"].clone())
        };
        assert_eq!(env("NETBOOT_CONFIG").unwrap(), agent::CONFIG_PATH);
        let vol = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["configMap"]["name"] == agent::CONFIG_MAP)
            .unwrap_or_else(|| panic!("{name}: the config volume"));
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == vol["name"])
            .unwrap();
        assert_eq!(
            format!(
                "{}/{}",
                mount["mountPath"].as_str().unwrap(),
                agent::CONFIG_KEY
            ),
            agent::CONFIG_PATH
        );
    }
}

/// Issue 17: the reconciler's ClusterRole was cluster-admin in all but name.
/// In every shipped spec: no `escalate` and no wildcard anywhere; `bind`,
/// and every cluster-wide write, only on named objects (the Node patch
/// excepted: held only to grant it to the agent, and denied to the
/// reconciler by its admission policy); unnamed writes otherwise only of
/// pods (probe pods have generated names) and events in netboot's namespace,
/// and of events anywhere (the Warning on a Service the agents cannot serve
/// must be in the Service's namespace; an Event changes nothing else).
/// Events, created or patched (a series) anywhere: nothing else.
fn cluster_events(resources: &[String], verbs: &[String]) -> bool {
    resources == ["events"] && verbs.iter().all(|v| v == "create" || v == "patch")
}

#[test]
fn rbac_names_what_it_may_write_and_never_escalates() {
    for (name, spec) in every_shipped() {
        for m in render(&spec, &name, &opts_for(&name)).unwrap() {
            let id = m.id().clone();
            if id.kind != "ClusterRole" && id.kind != "Role" {
                continue;
            }
            for rule in m.object["rules"].as_array().unwrap() {
                let strs = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                        .unwrap_or_default()
                };
                let (verbs, resources, names) =
                    (strs("verbs"), strs("resources"), strs("resourceNames"));
                let ctx = format!("{name}: {id}: {rule}");
                assert!(!verbs.iter().any(|v| v == "*" || v == "escalate"), "{ctx}");
                assert!(!resources.iter().any(|r| r == "*"), "{ctx}");
                assert!(!strs("apiGroups").iter().any(|g| g == "*"), "{ctx}");
                let writes = |v: &String| {
                    matches!(
                        v.as_str(),
                        "update" | "patch" | "delete" | "deletecollection" | "bind"
                    )
                };
                if names.is_empty() && verbs.iter().any(writes) {
                    let own_ns = id.kind == "Role"
                        && id.namespace.as_deref() == Some(spec.namespace.as_str());
                    let probe_pods = own_ns && resources == ["pods"];
                    let events = own_ns && resources == ["events"];
                    let node_patch = id.kind == "ClusterRole"
                        && resources == ["nodes"]
                        && verbs.iter().filter(|v| writes(v)).all(|v| v == "patch");
                    assert!(
                        probe_pods || events || node_patch || cluster_events(&resources, &verbs),
                        "unnamed write: {ctx}"
                    );
                }
                if names.is_empty() && verbs.iter().any(|v| v == "create") {
                    assert!(
                        id.kind == "Role" || cluster_events(&resources, &verbs),
                        "cluster-wide unnamed create: {ctx}"
                    );
                }
                assert!(
                    !resources.iter().any(|r| r == "secrets"),
                    "netboot never reads Secrets: {ctx}"
                );
            }
        }
    }
}

/// Issue 17: every container netboot renders runs under the runtime's
/// default seccomp profile on a read-only root filesystem and drops every
/// capability it does not name.
#[test]
fn every_rendered_container_is_confined() {
    for (name, spec) in every_shipped() {
        for m in render(&spec, &name, &opts_for(&name)).unwrap() {
            let pod = match m.id().kind.as_str() {
                "DaemonSet" => &m.object["spec"]["template"]["spec"],
                "CronJob" => &m.object["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => continue,
            };
            let containers = ["initContainers", "containers"]
                .iter()
                .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default());
            // No host PID or IPC namespace: the agent reaches pods' network
            // namespaces through the read-only /var/run/netns mount instead.
            for k in ["hostPID", "hostIPC"] {
                assert!(
                    pod[k].is_null() || pod[k] == false,
                    "{name}: {}: {k}",
                    m.id()
                );
            }
            let host_paths: Vec<(String, String)> = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| {
                    Some((
                        v["name"].as_str()?.to_string(),
                        v["hostPath"]["path"].as_str()?.to_string(),
                    ))
                })
                .collect();
            for c in containers {
                let sc = &c["securityContext"];
                let ctx = format!("{name}: {}: {}", m.id(), c["name"]);
                assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{ctx}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{ctx}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{ctx}"
                );
                // Host paths are read-only but for the two the agent writes:
                // its bpffs pins and the xtables lock.
                for vm in c["volumeMounts"].as_array().into_iter().flatten() {
                    let Some((_, path)) = host_paths.iter().find(|(n, _)| vm["name"] == n.as_str())
                    else {
                        continue;
                    };
                    if !["/sys/fs/bpf", "/run/xtables.lock"].contains(&path.as_str()) {
                        assert_eq!(vm["readOnly"], true, "{ctx}: hostPath {path}");
                    }
                }
                if c["name"] == "agent" {
                    // Socket termination reaches pod network namespaces, and
                    // those of pods started later (HostToContainer).
                    let netns = c["volumeMounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|vm| vm["mountPath"] == "/run/netns")
                        .unwrap_or_else(|| panic!("{ctx}: no /run/netns mount"));
                    assert_eq!(netns["readOnly"], true, "{ctx}");
                    assert_eq!(netns["mountPropagation"], "HostToContainer", "{ctx}");
                    assert!(
                        host_paths
                            .iter()
                            .any(|(n, p)| netns["name"] == n.as_str() && p == "/var/run/netns"),
                        "{ctx}: /run/netns must be the host's /var/run/netns"
                    );
                }
            }
        }
    }
}

/// A value in an admission policy expression stays one CEL string literal.
#[test]
fn cel_literals_cannot_end_early() {
    assert_eq!(cel_string("kube-proxy"), "'kube-proxy'");
    assert_eq!(cel_string("a' || true || 'b"), r"'a\' || true || \'b'");
    assert_eq!(cel_string("\\'"), r"'\\\''");
    assert_eq!(cel_string("x\u{2028}y\n"), r"'x\u2028y\u000a'");
}

/// The reconciler's Role names every probe object validation can create:
/// a probe Service it may not patch fails validation as the reconciler, and
/// the handover rolls back.
#[test]
fn the_reconciler_role_names_every_probe_object() {
    use crate::validate::{probe_objects, Workload};
    let manifests = render(&shipped("prod"), "prod", &opts_for("prod")).unwrap();
    let mut allowed: Vec<(String, String)> = Vec::new();
    for m in manifests.iter().filter(|m| m.object["kind"] == "Role") {
        for rule in m.object["rules"].as_array().into_iter().flatten() {
            for res in rule["resources"].as_array().into_iter().flatten() {
                for name in rule["resourceNames"].as_array().into_iter().flatten() {
                    allowed.push((
                        res.as_str().unwrap().to_string(),
                        name.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    let all = Workload {
        replicas: 3,
        keep_off: Some("n3".into()),
        local: true,
        single: true,
        node_port: true,
        ext_local: true,
    };
    for o in probe_objects("netboot-system", "img", &all) {
        let res = match o["kind"].as_str().unwrap() {
            "Deployment" => "deployments",
            "Service" => "services",
            k => panic!("unexpected probe kind {k}"),
        };
        let name = o["metadata"]["name"].as_str().unwrap();
        assert!(
            allowed.contains(&(res.to_string(), name.to_string())),
            "the reconciler's Role does not name {res}/{name}"
        );
    }
}
