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
    assert_eq!(ids.last().unwrap().kind, "CronJob");
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

/// A value with a newline and YAML of its own stays one quoted string.
#[test]
fn values_cannot_inject_yaml() {
    let mut spec = shipped("local");
    spec.datapath.version = "1.0\nhostNetwork: false".into();
    spec.api_server = Some(ApiServer {
        host: "evil\n    hostNetwork: false".into(),
        port: 6443,
    });
    let manifests = render(&spec, "local", &RenderOptions::default()).unwrap();
    let ds = manifests
        .iter()
        .find(|m| m.id().kind == "DaemonSet")
        .unwrap();
    assert_eq!(ds.object["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(
        ds.object["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/netboot/netboot-datapath:1.0\nhostNetwork: false"
    );
    let cm = manifests
        .iter()
        .find(|m| m.id().kind == "ConfigMap")
        .unwrap();
    let config: serde_yaml::Value =
        serde_yaml::from_str(cm.object["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["apiServer"]["host"].as_str(),
        Some("evil\n    hostNetwork: false")
    );
    assert!(config.get("hostNetwork").is_none());
}

#[test]
fn config_map_carries_the_explicit_endpoint() {
    let manifests = render(&shipped("prod"), "prod", &RenderOptions::default()).unwrap();
    let cm = manifests
        .iter()
        .find(|m| m.id().kind == "ConfigMap")
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
    // 16 B × pow2(max) buckets; 96 B per entry of the four NO_PREALLOC maps in
    // use; 72 / 80 B per preallocated rev_sk / affinity element; userspace
    // 12 KiB per frontend (≤ 65535, ≤ reverseNat) + 1 KiB per backend; 64 MiB base.
    let formula = |m: spec::MapSizes| -> (u64, u64) {
        let (s, b, a, r) = (
            u64::from(m.services),
            u64::from(m.backends),
            u64::from(m.affinity),
            u64::from(m.reverse_nat),
        );
        let bk = |n: u64| 16 * n.next_power_of_two();
        let empty = bk(s) + 3 * bk(b) + bk(r) + bk(a) + 72 * b + 80 * a;
        let full = empty + 96 * (s + 2 * b + r.min(65535));
        let user = 12 * 1024 * s.min(r).min(65535) + 1024 * b;
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
        let mut spec = shipped("prod");
        spec.datapath.map_sizes = sizes;
        let (request, limit) = agent_memory(&spec);
        let (want_request, want_limit) = formula(sizes);
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
            "NUMBERS {sizes:?}: request {} MiB, limit {} MiB",
            request >> 20,
            limit >> 20
        );
    }
}
