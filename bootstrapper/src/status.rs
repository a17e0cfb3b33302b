//! `netboot status`: what an operator wants to see before and after — agents
//! per node, KubeProxyReplacement per node, kube-proxy present or gone (and
//! its backup), the last apply and its revision, the last handover's steps.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::apply::describe;
use crate::handover::{self, KubeProxyState};
use crate::inventory::{self, Inventory};
use crate::kube_proxy_mode;
use crate::spec::ClusterNetwork;
use crate::wait;
use netboot_contract::agent::{DAEMONSET as AGENT_DAEMONSET, SELECTOR as AGENT_SELECTOR};
use netboot_contract::features::{self, FEATURES_ANNOTATION};
use netboot_contract::node::{
    parse_kpr, DATAPATH_VERSION, KUBE_PROXY_MODE, KUBE_PROXY_REPLACEMENT, KUBE_PROXY_RULES,
    KUBE_PROXY_RULES_REASON,
};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    pub agent_pod: Option<String>,
    pub agent_ready: bool,
    pub kube_proxy_replacement: Option<String>,
    pub kube_proxy_rules: Option<String>,
    /// Why the rules are `unknown`, or which kube-proxy chains are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_proxy_rules_reason: Option<String>,
    pub datapath_version: Option<String>,
    /// kube-proxy's mode(s) whose state the agent finds on the node
    /// (`netboot.io/kube-proxy-mode`: `iptables`, `iptables+ipvs`, `none`,
    /// `unknown`, …).
    pub kube_proxy_mode: Option<String>,
    /// What the agent publishes it serves (`netboot.io/datapath-features`).
    pub datapath_features: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub cluster: String,
    pub server: String,
    pub agents: Option<String>,
    pub agent_image: Option<String>,
    pub kube_proxy: KubeProxyState,
    pub backup_taken: Option<String>,
    /// The last handover's journal (its phase says whether one is in progress).
    pub handover_journal: Option<crate::journal::Journal>,
    pub inventory: Option<Inventory>,
    pub nodes: Vec<NodeStatus>,
    /// Services needing what not every agent serves (refused: not accepted
    /// by `spec.kubeProxy.allowUnserved`).
    pub unserved: crate::unserved::UnservedReport,
}

impl ClusterStatus {
    pub fn replacement_nodes(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.kube_proxy_replacement.as_deref().and_then(parse_kpr) == Some(true))
            .count()
    }
}

pub async fn gather(
    client: &Client,
    spec: &ClusterNetwork,
    server: &str,
) -> Result<ClusterStatus, String> {
    let ns = &spec.namespace;
    let ds = Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get_opt(AGENT_DAEMONSET)
        .await
        .map_err(|e| describe(&e))?;
    let agents = ds.as_ref().map(|d| match wait::rollout_pending(d) {
        None => {
            let n = d
                .status
                .as_ref()
                .map(|s| s.number_available.unwrap_or(0))
                .unwrap_or(0);
            format!("{n}/{n} ready")
        }
        Some(reason) => reason,
    });
    let agent_image = ds
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(|e| describe(&e))?;
    let mut by_node: BTreeMap<String, &Pod> = BTreeMap::new();
    for p in &pods.items {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            by_node.insert(n, p);
        }
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| describe(&e))?;
    let nodes = nodes
        .items
        .into_iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let ann = n.metadata.annotations.unwrap_or_default();
            let pod = by_node.get(&name);
            NodeStatus {
                agent_pod: pod.and_then(|p| p.metadata.name.clone()),
                agent_ready: pod.is_some_and(|p| wait::pod_not_ready(p).is_none()),
                kube_proxy_replacement: ann.get(KUBE_PROXY_REPLACEMENT).cloned(),
                kube_proxy_rules: ann.get(KUBE_PROXY_RULES).cloned(),
                kube_proxy_rules_reason: ann.get(KUBE_PROXY_RULES_REASON).cloned(),
                datapath_version: ann.get(DATAPATH_VERSION).cloned(),
                kube_proxy_mode: ann.get(KUBE_PROXY_MODE).cloned(),
                datapath_features: ann.get(FEATURES_ANNOTATION).cloned(),
                node: name,
            }
        })
        .collect();
    let kube_proxy = handover::kube_proxy_state(client, &spec.kube_proxy)
        .await
        .map_err(|e| e.to_string())?;
    let backup = handover::load_backup(client, ns)
        .await
        .map_err(|e| e.to_string())?;
    let backup_taken = backup.as_ref().map(|b| b.taken.clone());
    let handover_journal = backup.and_then(|b| b.journal);
    let inventory = inventory::load(client, ns)
        .await
        .map_err(|e| e.to_string())?;
    let unserved = crate::unserved::check(client, &spec.kube_proxy.allow_unserved)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ClusterStatus {
        unserved,
        cluster: spec.name.clone(),
        server: server.into(),
        agents,
        agent_image,
        kube_proxy,
        backup_taken,
        handover_journal,
        inventory,
        nodes,
    })
}

/// The Services the agents cannot serve, and what that means now: with
/// kube-proxy present it serves them; without, that part of them is broken
/// (each has a Warning Event `UnservedByDatapath`).
fn unserved_line(s: &ClusterStatus) -> Option<String> {
    let u = &s.unserved;
    let all: Vec<String> = u
        .refused
        .iter()
        .map(ToString::to_string)
        .chain(u.allowed.iter().map(|a| format!("{a} (allowed)")))
        .collect();
    if all.is_empty() {
        return None;
    }
    let shown: Vec<&str> = all.iter().take(5).map(String::as_str).collect();
    Some(format!(
        "{} Service(s) need what the agents do not serve, {}: {}{}",
        all.len(),
        if s.kube_proxy.present() {
            "kube-proxy still serves them"
        } else {
            "NOT SERVED since kube-proxy is gone (Warning Events UnservedByDatapath)"
        },
        shown.join("; "),
        if all.len() > shown.len() {
            format!("; … {} more (-o json)", all.len() - shown.len())
        } else {
            String::new()
        }
    ))
}

/// Like `cilium status`: a summary block, then a row per node.
pub fn format(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
    line(
        &mut out,
        "Cluster:",
        format!("{} ({})", s.cluster, s.server),
    );
    let total = s.nodes.len();
    let kpr = s.replacement_nodes();
    let word = if total > 0 && kpr == total {
        "True"
    } else {
        "False"
    };
    line(
        &mut out,
        "KubeProxyReplacement:",
        format!("{word}   [{kpr}/{total} nodes report True]"),
    );
    line(
        &mut out,
        "Agents:",
        match (&s.agents, &s.agent_image) {
            (Some(a), Some(img)) => format!("{a}   [DaemonSet {AGENT_DAEMONSET}, {img}]"),
            (Some(a), None) => a.clone(),
            _ => "not installed".into(),
        },
    );
    let kp = if s.kube_proxy.present() {
        format!(
            "present (DaemonSet {}, ConfigMap {}, {} pods)",
            yes(s.kube_proxy.daemon_set),
            yes(s.kube_proxy.config_map),
            s.kube_proxy.pods
        )
    } else {
        format!("absent ({} pods left)", s.kube_proxy.pods)
    };
    line(&mut out, "KubeProxy:", kp);
    line(
        &mut out,
        "KubeProxy mode:",
        format!(
            "{}   [as found on each node: KUBE-PROXY MODE]",
            kube_proxy_mode::configured_text(
                s.kube_proxy.configured_mode.as_ref(),
                s.kube_proxy.configured_mode_error.as_deref(),
            )
        ),
    );
    line(
        &mut out,
        "KubeProxy backup:",
        s.backup_taken
            .clone()
            .map(|t| format!("taken {t}"))
            .unwrap_or_else(|| "none".into()),
    );
    if let Some(j) = &s.handover_journal {
        line(
            &mut out,
            "Handover journal:",
            format!(
                "{}{} (revision {}, since {}, by {})",
                j.phase,
                if j.phase.in_progress() {
                    " — IN PROGRESS: the next apply or reconcile pass takes it on"
                } else {
                    ""
                },
                j.revision,
                j.updated,
                if j.by.is_empty() { "?" } else { &j.by }
            ),
        );
    }
    line(&mut out, "Datapath features:", served_line(s));
    if let Some(u) = unserved_line(s) {
        line(&mut out, "Unserved:", u);
    }
    match &s.inventory {
        Some(i) => {
            line(
                &mut out,
                "Last change:",
                format!(
                    "{} at revision {} (mode {}, {} objects)",
                    i.updated,
                    i.revision,
                    i.mode,
                    i.objects.len()
                ),
            );
            if !i.allow_unserved.is_empty() {
                line(
                    &mut out,
                    "Allowed unserved:",
                    format!(
                        "{} (spec.kubeProxy.allowUnserved){}",
                        i.allow_unserved.join(","),
                        if i.unserved_allowed.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; accepted at the last handover: {}",
                                i.unserved_allowed.join("; ")
                            )
                        }
                    ),
                );
            }
            if !i.handover.is_empty() {
                line(
                    &mut out,
                    "Last handover:",
                    i.handover
                        .iter()
                        .map(|h| format!("{} {}", h.name, h.result))
                        .collect::<Vec<_>>()
                        .join(" → "),
                );
            }
        }
        None => line(&mut out, "Last change:", "never applied".into()),
    }
    out.push('\n');
    let w = s
        .nodes
        .iter()
        .map(|n| n.node.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let m = s
        .nodes
        .iter()
        .filter_map(|n| n.kube_proxy_mode.as_ref().map(String::len))
        .max()
        .unwrap_or(0)
        .max("KUBE-PROXY MODE".len());
    out.push_str(&format!(
        "{:<w$}  {:<8}  {:<6}  {:<8}  {:<m$}  {:<8}  AGENT POD\n",
        "NODE", "AGENT", "KPR", "RULES", "KUBE-PROXY MODE", "VERSION"
    ));
    for n in &s.nodes {
        out.push_str(&format!(
            "{:<w$}  {:<8}  {:<6}  {:<8}  {:<m$}  {:<8}  {}\n",
            n.node,
            if n.agent_pod.is_none() {
                "missing"
            } else if n.agent_ready {
                "ready"
            } else {
                "NOT READY"
            },
            n.kube_proxy_replacement.as_deref().unwrap_or("-"),
            n.kube_proxy_rules.as_deref().unwrap_or("-"),
            n.kube_proxy_mode.as_deref().unwrap_or("-"),
            n.datapath_version.as_deref().unwrap_or("-"),
            n.agent_pod.as_deref().unwrap_or("-"),
        ));
    }
    out
}

/// What every agent serves (the intersection of the Nodes' annotations).
fn served_line(s: &ClusterStatus) -> String {
    let mut all: Option<std::collections::BTreeSet<features::Feature>> = None;
    let mut silent = 0;
    for n in &s.nodes {
        let f = match &n.datapath_features {
            Some(v) => features::parse(v),
            None => {
                silent += 1;
                Default::default()
            }
        };
        all = Some(match all {
            None => f,
            Some(a) => a.intersection(&f).copied().collect(),
        });
    }
    let served = all.map(|a| features::format(&a)).unwrap_or_default();
    match (served.is_empty(), silent) {
        (true, 0) => "none published".into(),
        (_, 0) => format!("{served} (on every node)"),
        (_, n) => format!(
            "{} ({n} nodes publish none)",
            if served.is_empty() { "none" } else { &served }
        ),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unserved::{Unserved, UnservedReport};

    fn status(kube_proxy: bool, unserved: UnservedReport) -> ClusterStatus {
        ClusterStatus {
            cluster: "c".into(),
            server: "https://api:6443".into(),
            agents: None,
            agent_image: None,
            kube_proxy: KubeProxyState {
                daemon_set: kube_proxy,
                config_map: kube_proxy,
                pods: 0,
                ..Default::default()
            },
            backup_taken: None,
            handover_journal: None,
            inventory: None,
            nodes: vec![],
            unserved,
        }
    }

    fn node(name: &str, mode: Option<&str>) -> NodeStatus {
        NodeStatus {
            node: name.into(),
            agent_pod: Some(format!("netboot-datapath-{name}")),
            agent_ready: true,
            kube_proxy_replacement: Some("true".into()),
            kube_proxy_rules: Some("present".into()),
            kube_proxy_rules_reason: None,
            datapath_version: Some("0.1.0".into()),
            kube_proxy_mode: mode.map(String::from),
            datapath_features: None,
        }
    }

    /// The IPVS cluster before its handover: the configured mode on the
    /// summary, what each agent finds in the nodes table.
    #[test]
    fn status_shows_kube_proxys_mode_configured_and_per_node() {
        use crate::kube_proxy_mode::{ConfiguredMode, ProxyMode};
        use netboot_contract::node::KubeProxyMode;
        let mut s = status(true, UnservedReport::default());
        s.kube_proxy.configured_mode = Some(ConfiguredMode {
            mode: ProxyMode::Linux(KubeProxyMode::Ipvs),
            default: false,
        });
        s.nodes = vec![
            node("node-0", Some("ipvs")),
            node("node-1", Some("iptables+ipvs")),
            node("node-2", Some("unknown")),
            node("node-3", None),
        ];
        insta::assert_snapshot!(format(&s));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["nodes"][1]["kubeProxyMode"], "iptables+ipvs");
        assert_eq!(json["nodes"][3]["kubeProxyMode"], serde_json::Value::Null);
        assert_eq!(
            json["kubeProxy"]["configuredMode"],
            serde_json::json!({"mode": "ipvs", "default": false})
        );
        assert!(json["kubeProxy"].get("configuredModeError").is_none());
        // The fields that were there before stay.
        for f in ["daemonSet", "configMap", "pods"] {
            assert!(json["kubeProxy"].get(f).is_some(), "{f}: {json:#}");
        }

        s.kube_proxy.configured_mode = None;
        s.kube_proxy.configured_mode_error =
            Some("ConfigMap/kube-system/kube-proxy: config.conf: not YAML: x".into());
        assert!(format(&s).contains(
            "KubeProxy mode:       unknown (ConfigMap/kube-system/kube-proxy: config.conf: not YAML: x)"
        ));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["kubeProxy"]["configuredMode"], serde_json::Value::Null);
        assert!(json["kubeProxy"]["configuredModeError"]
            .as_str()
            .unwrap()
            .starts_with("ConfigMap/kube-system/kube-proxy: config.conf"));

        let gone = format(&status(false, UnservedReport::default()));
        assert!(
            gone.contains("KubeProxy mode:       ConfigMap absent   ["),
            "{gone}"
        );
    }

    #[test]
    fn status_names_the_services_the_agents_cannot_serve() {
        let u = |s: &str, n: &str| Unserved {
            service: s.into(),
            needs: vec![n.into()],
        };
        let report = UnservedReport {
            refused: vec![u("d/np", "nodeport")],
            allowed: vec![u("e/sctp", "sctp")],
            ..Default::default()
        };
        let gone = format(&status(false, report.clone()));
        assert!(
            gone.contains("Unserved:             2 Service(s) need what the agents do not serve, NOT SERVED since kube-proxy is gone (Warning Events UnservedByDatapath): Service/d/np: needs nodeport; Service/e/sctp: needs sctp (allowed)\n"),
            "{gone}"
        );
        assert!(format(&status(true, report)).contains("kube-proxy still serves them"));
        assert!(!format(&status(false, UnservedReport::default())).contains("Unserved:"));
    }
}
