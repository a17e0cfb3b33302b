//! kind-configs/*.yaml against kind's documented config schema
//! (`kind.x-k8s.io/v1alpha4` `Cluster`, sigs.k8s.io/kind
//! pkg/apis/config/v1alpha4/types.go, decoded strictly as kind does: an
//! unknown field is an error) and kind's own validation
//! (pkg/internal/apis/config/validate.go: cluster name, roles, at least one
//! control plane, subnets of the IP family, kube-proxy modes, ports, mount
//! propagation), plus what netboot needs from them: the subnets and the
//! context of clusters/kind.yaml, kube-proxy in iptables mode for the
//! migration cluster and none for the fresh one.
//!
//! Offline: no kind, no Docker. `tests/e2e/lint` runs this file alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ---- kind.x-k8s.io/v1alpha4, field for field (yaml names as kind spells them)

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // fields exist to be accepted; not all are read
struct Cluster {
    kind: Option<String>,
    api_version: Option<String>,
    name: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(default)]
    networking: Networking,
    #[serde(default)]
    feature_gates: BTreeMap<String, bool>,
    #[serde(default)]
    runtime_config: BTreeMap<String, String>,
    #[serde(default)]
    kubeadm_config_patches: Vec<String>,
    #[serde(default, rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Vec<PatchJson6902>,
    #[serde(default)]
    containerd_config_patches: Vec<String>,
    #[serde(default, rename = "containerdConfigPatchesJSON6902")]
    containerd_config_patches_json6902: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Node {
    role: Option<String>,
    image: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    extra_mounts: Vec<Mount>,
    #[serde(default)]
    extra_port_mappings: Vec<PortMapping>,
    #[serde(default)]
    kubeadm_config_patches: Vec<String>,
    #[serde(default, rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Vec<PatchJson6902>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Networking {
    ip_family: Option<String>,
    api_server_port: Option<i32>,
    api_server_address: Option<String>,
    pod_subnet: Option<String>,
    service_subnet: Option<String>,
    #[serde(default, rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    kube_proxy_mode: Option<String>,
    dns_search: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PatchJson6902 {
    group: String,
    version: String,
    kind: String,
    patch: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Mount {
    container_path: Option<String>,
    host_path: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    selinux_relabel: bool,
    propagation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PortMapping {
    container_port: Option<i32>,
    host_port: Option<i32>,
    listen_address: Option<String>,
    protocol: Option<String>,
}

/// Decodes and validates like `kind create cluster --config`: every problem,
/// one line each (empty = kind accepts it).
fn check(text: &str) -> Result<Cluster, Vec<String>> {
    let c: Cluster = serde_yaml::from_str(text).map_err(|e| vec![format!("decode: {e}")])?;
    let mut errs = Vec::new();
    if c.api_version.as_deref() != Some("kind.x-k8s.io/v1alpha4") {
        errs.push(format!(
            "apiVersion {:?}: want kind.x-k8s.io/v1alpha4",
            c.api_version
        ));
    }
    if c.kind.as_deref() != Some("Cluster") {
        errs.push(format!("kind {:?}: want Cluster", c.kind));
    }
    if let Some(name) = &c.name {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '.' || ch == '-');
        if !ok {
            errs.push(format!("name {name:?}: must match ^[a-z0-9.-]+$"));
        }
    }
    let n = &c.networking;
    let family = n.ip_family.as_deref().unwrap_or("ipv4");
    if !["ipv4", "ipv6", "dual"].contains(&family) {
        errs.push(format!(
            "networking.ipFamily {family:?}: one of ipv4, ipv6, dual"
        ));
    }
    if let Some(p) = n.api_server_port {
        if !(-1..=65535).contains(&p) {
            errs.push(format!("networking.apiServerPort {p}: -1..65535"));
        }
    }
    if let Some(a) = &n.api_server_address {
        if a.parse::<std::net::IpAddr>().is_err() {
            errs.push(format!(
                "networking.apiServerAddress {a:?}: not an IP address"
            ));
        }
    }
    for (field, value) in [
        ("podSubnet", &n.pod_subnet),
        ("serviceSubnet", &n.service_subnet),
    ] {
        let Some(v) = value else { continue };
        let nets: Vec<Result<ipnet::IpNet, _>> =
            v.split(',').map(str::parse::<ipnet::IpNet>).collect();
        if nets.iter().any(Result::is_err) {
            errs.push(format!("networking.{field} {v:?}: not a CIDR"));
            continue;
        }
        let nets: Vec<ipnet::IpNet> = nets.into_iter().map(Result::unwrap).collect();
        let v4 = nets
            .iter()
            .filter(|n| matches!(n, ipnet::IpNet::V4(_)))
            .count();
        let ok = match family {
            "ipv4" => nets.len() == 1 && v4 == 1,
            "ipv6" => nets.len() == 1 && v4 == 0,
            _ => nets.len() == 1 || (nets.len() == 2 && v4 == 1),
        };
        if !ok {
            errs.push(format!(
                "networking.{field} {v:?}: does not fit ipFamily {family}"
            ));
        }
    }
    let mode = n.kube_proxy_mode.as_deref().unwrap_or("iptables");
    if !["iptables", "ipvs", "nftables", "none"].contains(&mode) {
        errs.push(format!(
            "networking.kubeProxyMode {mode:?}: one of iptables, ipvs, nftables, none"
        ));
    }
    let nodes_default = [Node {
        role: None,
        image: None,
        labels: BTreeMap::new(),
        extra_mounts: vec![],
        extra_port_mappings: vec![],
        kubeadm_config_patches: vec![],
        kubeadm_config_patches_json6902: vec![],
    }];
    let nodes: &[Node] = if c.nodes.is_empty() {
        &nodes_default
    } else {
        &c.nodes
    };
    let mut control_planes = 0;
    for (i, node) in nodes.iter().enumerate() {
        let role = node.role.as_deref().unwrap_or("control-plane");
        match role {
            "control-plane" => control_planes += 1,
            "worker" => {}
            other => errs.push(format!(
                "nodes[{i}].role {other:?}: control-plane or worker"
            )),
        }
        if node.image.as_deref() == Some("") {
            errs.push(format!("nodes[{i}].image: empty"));
        }
        for (j, m) in node.extra_mounts.iter().enumerate() {
            if let Some(p) = &m.propagation {
                if !["None", "HostToContainer", "Bidirectional"].contains(&p.as_str()) {
                    errs.push(format!("nodes[{i}].extraMounts[{j}].propagation {p:?}: None, HostToContainer or Bidirectional"));
                }
            }
        }
        for (j, pm) in node.extra_port_mappings.iter().enumerate() {
            for (f, port) in [
                ("hostPort", pm.host_port),
                ("containerPort", pm.container_port),
            ] {
                if let Some(port) = port {
                    if !(-1..=65535).contains(&port) {
                        errs.push(format!(
                            "nodes[{i}].extraPortMappings[{j}].{f} {port}: -1..65535"
                        ));
                    }
                }
            }
            if let Some(proto) = &pm.protocol {
                if !["TCP", "UDP", "SCTP"].contains(&proto.to_uppercase().as_str()) {
                    errs.push(format!(
                        "nodes[{i}].extraPortMappings[{j}].protocol {proto:?}: TCP, UDP or SCTP"
                    ));
                }
            }
        }
        for (j, p) in node.kubeadm_config_patches.iter().enumerate() {
            errs.extend(
                patch_problem(p).map(|e| format!("nodes[{i}].kubeadmConfigPatches[{j}]: {e}")),
            );
        }
    }
    if control_planes == 0 {
        errs.push("nodes: at least one control-plane node".into());
    }
    for (j, p) in c.kubeadm_config_patches.iter().enumerate() {
        errs.extend(patch_problem(p).map(|e| format!("kubeadmConfigPatches[{j}]: {e}")));
    }
    if errs.is_empty() {
        Ok(c)
    } else {
        Err(errs)
    }
}

/// A kubeadm merge patch must be a YAML mapping naming its target `kind`.
fn patch_problem(p: &str) -> Option<String> {
    match serde_yaml::from_str::<serde_yaml::Value>(p) {
        Err(e) => Some(format!("not YAML: {e}")),
        Ok(v) if v.get("kind").and_then(serde_yaml::Value::as_str).is_none() => {
            Some("a merge patch needs `kind` naming its target".into())
        }
        Ok(_) => None,
    }
}

fn shipped() -> Vec<(PathBuf, String)> {
    let dir = repo().join("kind-configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect()
}

fn load(name: &str) -> Cluster {
    let p = repo().join("kind-configs").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    check(&text).unwrap_or_else(|e| panic!("{}:\n  {}", p.display(), e.join("\n  ")))
}

fn kind_spec() -> serde_yaml::Value {
    let p = repo().join("clusters/kind.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn every_kind_config_follows_kinds_v1alpha4_schema() {
    let files = shipped();
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["fresh.yaml", "migration.yaml"] {
        assert!(
            names.iter().any(|n| n == want),
            "kind-configs/{want} is missing (have {names:?})"
        );
    }
    let mut bad = Vec::new();
    for (p, text) in &files {
        if let Err(errs) = check(text) {
            bad.push(format!("{}:\n  {}", p.display(), errs.join("\n  ")));
        }
    }
    assert!(bad.is_empty(), "kind would refuse:\n{}", bad.join("\n"));
}

#[test]
fn migration_cluster_runs_kube_proxy_in_iptables_mode_on_one_control_plane_and_two_workers() {
    let c = load("migration.yaml");
    assert_eq!(c.networking.kube_proxy_mode.as_deref(), Some("iptables"));
    let roles: Vec<&str> = c
        .nodes
        .iter()
        .map(|n| n.role.as_deref().unwrap_or("control-plane"))
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    assert!(
        !c.networking.disable_default_cni,
        "pods need kind's CNI (kindnet)"
    );
}

#[test]
fn fresh_cluster_has_no_kube_proxy() {
    let c = load("fresh.yaml");
    assert_eq!(c.networking.kube_proxy_mode.as_deref(), Some("none"));
    assert!(c
        .nodes
        .iter()
        .any(|n| n.role.as_deref() == Some("control-plane")));
    assert!(
        !c.networking.disable_default_cni,
        "pods need kind's CNI (kindnet)"
    );
}

#[test]
fn kind_configs_agree_with_clusters_kind_yaml() {
    let spec = kind_spec();
    let cluster = &spec["spec"]["cluster"];
    let context = cluster["context"].as_str().unwrap();
    for name in ["migration.yaml", "fresh.yaml"] {
        let c = load(name);
        let kind_name = c.name.clone().unwrap_or_else(|| "kind".into());
        assert_eq!(
            format!("kind-{kind_name}"),
            context,
            "{name}: kind names the context kind-<name>"
        );
        assert_eq!(
            c.networking.pod_subnet.as_deref(),
            cluster["podCIDR"].as_str(),
            "{name}: podSubnet"
        );
        assert_eq!(
            c.networking.service_subnet.as_deref(),
            cluster["serviceCIDR"].as_str(),
            "{name}: serviceSubnet"
        );
        assert_eq!(
            c.networking.ip_family.as_deref().unwrap_or("ipv4"),
            "ipv4",
            "{name}: netboot's datapath is IPv4"
        );
        // One pinned node image everywhere, by digest: the same Kubernetes on every node and run.
        let images: Vec<&str> = c
            .nodes
            .iter()
            .map(|n| n.image.as_deref().unwrap_or(""))
            .collect();
        assert!(
            images
                .iter()
                .all(|i| i.starts_with("kindest/node:v") && i.contains("@sha256:")),
            "{name}: {images:?}"
        );
        assert!(
            images.windows(2).all(|w| w[0] == w[1]),
            "{name}: nodes differ: {images:?}"
        );
        // Never share the host's bpffs between nodes (kind-configs/prepare-nodes says why).
        for n in &c.nodes {
            assert!(
                n.extra_mounts
                    .iter()
                    .all(|m| m.container_path.as_deref() != Some("/sys/fs/bpf")),
                "{name}: /sys/fs/bpf must be each node's own bpffs, not an extraMount"
            );
        }
    }
    assert_eq!(
        load("migration.yaml").nodes[0].image,
        load("fresh.yaml").nodes[0].image
    );
}

#[test]
fn the_check_refuses_what_kind_refuses() {
    let good = std::fs::read_to_string(repo().join("kind-configs/migration.yaml")).unwrap();
    assert!(check(&good).is_ok());
    let cases: [(&str, String, &str); 8] = [
        (
            "unknown field",
            good.replace("kubeProxyMode:", "kubeProxyModes:"),
            "unknown field `kubeProxyModes`",
        ),
        (
            "unknown node field",
            good.replacen(
                "  - role: worker\n",
                "  - role: worker\n    cgroupns: private\n",
                1,
            ),
            "unknown field `cgroupns`",
        ),
        (
            "proxy mode",
            good.replace(
                "kubeProxyMode: \"iptables\"",
                "kubeProxyMode: \"userspace\"",
            ),
            "kubeProxyMode",
        ),
        (
            "no control plane",
            good.replace("role: control-plane", "role: worker"),
            "at least one control-plane",
        ),
        (
            "role",
            good.replacen("role: worker", "role: master", 1),
            "role \"master\"",
        ),
        (
            "subnet",
            good.replace("10.244.0.0/16", "10.244.0.0/33"),
            "podSubnet",
        ),
        (
            "family",
            good.replace("10.96.0.0/16", "fd00::/108"),
            "serviceSubnet",
        ),
        (
            "apiVersion",
            good.replace("kind.x-k8s.io/v1alpha4", "kind.x-k8s.io/v1alpha3"),
            "apiVersion",
        ),
    ];
    for (what, text, want) in cases {
        let errs = check(&text)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{what}: {errs:?} does not mention {want:?}"
        );
    }
    let mount = good.replacen(
        "  - role: worker\n",
        "  - role: worker\n    extraMounts:\n      - hostPath: /tmp/x\n        containerPath: /x\n        propagation: Shared\n",
        1,
    );
    let errs = check(&mount).err().unwrap();
    assert!(errs.iter().any(|e| e.contains("propagation")), "{errs:?}");
}
