//! Human output for plans, ChangeSets and outcomes. The library returns
//! structs; only this file decides how they look.

use std::fmt::Write;

use netboot::apply::{Action, ChangeSet};
use netboot::converge::{HandoverPlan, Outcome, Plan};
use netboot::kube_proxy_mode;
use netboot::unserved::UnservedReport;
use netboot::validate;

pub fn changeset(c: &ChangeSet, planned: bool, show_diff: bool) -> String {
    let mut out = String::new();
    let width = c
        .entries
        .iter()
        .map(|e| e.id.to_string().len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:<width$}  {}",
        "OBJECT",
        if planned { "WOULD BE" } else { "ACTION" }
    );
    for e in &c.entries {
        let _ = writeln!(
            out,
            "{:<width$}  {}{}",
            e.id.to_string(),
            e.action,
            e.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "{}", c.summary());
    if show_diff {
        for e in c
            .entries
            .iter()
            .filter(|e| e.action == Action::Configured && !e.diff.is_empty())
        {
            out.push('\n');
            out.push_str(&e.diff);
        }
    }
    out
}

pub fn plan(p: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {} at {}; agents reach the API at {}:{} (from {})",
        p.cluster,
        p.revision,
        p.endpoint.endpoint.host,
        p.endpoint.endpoint.port,
        p.endpoint.source
    );
    out.push_str(&changeset(&p.changes, true, true));
    match p.handover {
        HandoverPlan::None => {
            let _ = writeln!(
                out,
                "kube-proxy: {}; no handover step",
                if p.kube_proxy.present() {
                    "present"
                } else {
                    "absent"
                }
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "handover ({}):",
                serde_json::to_value(p.handover)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            );
            for s in &p.handover_steps {
                let _ = writeln!(out, "  - {s}");
            }
        }
    }
    if p.kube_proxy.present() || !p.node_modes.is_empty() {
        let _ = writeln!(
            out,
            "kube-proxy mode: {}; nodes report {}",
            kube_proxy_mode::configured_text(
                p.kube_proxy.configured_mode.as_ref(),
                p.kube_proxy.configured_mode_error.as_deref()
            ),
            kube_proxy_mode::nodes_text(&p.node_modes, 5)
        );
    }
    if p.ipvs_cleanup {
        let _ = writeln!(out, "{}", kube_proxy_mode::IPVS_CLEANUP_NOTE);
    }
    if let Some(u) = &p.unserved {
        out.push_str(&unserved(u));
    }
    if p.noop {
        let _ = writeln!(out, "nothing to do: the cluster matches the spec");
    }
    out
}

/// The "nothing unserved" gate as the plan sees it.
pub fn unserved(u: &UnservedReport) -> String {
    let mut out = String::new();
    if u.ok() {
        let _ = writeln!(
            out,
            "nothing-unserved: open (agents serve {})",
            u.served.join(",")
        );
    } else {
        let _ = writeln!(
            out,
            "nothing-unserved: SHUT, the handover would stop here with kube-proxy untouched (as the agents publish now; agents not rolled out yet publish nothing):"
        );
        for line in u.refusal().lines().skip(1) {
            let _ = writeln!(out, "{line}");
        }
    }
    for a in &u.allowed {
        let _ = writeln!(out, "  accepted by allowUnserved: {a}");
    }
    out
}

pub fn outcome(o: &Outcome) -> String {
    let mut out = String::new();
    if o.plan.noop {
        let _ = writeln!(
            out,
            "cluster {} at {}: unchanged ({} objects), nothing written",
            o.plan.cluster,
            o.plan.revision,
            o.plan.changes.count(Action::Unchanged)
        );
        return out;
    }
    out.push_str(&changeset(&o.applied, false, false));
    if !o.handover.is_empty() {
        let _ = writeln!(out, "handover:");
        for s in &o.handover {
            let _ = writeln!(
                out,
                "  {:<26} {}{}",
                s.name,
                s.result,
                if s.message.is_empty() {
                    String::new()
                } else {
                    format!("  {}", s.message)
                }
            );
        }
    }
    if let Some(v) = &o.validation {
        out.push('\n');
        out.push_str(&validate::format_table(v));
    }
    if o.rolled_back {
        // `netboot rollback` exits 0; a rollback after a failed handover exits 1.
        let why = if o.exit_code == 0 {
            "rolled back on request"
        } else if o.validation.is_some() {
            "validation failed"
        } else {
            "the handover failed after kube-proxy's deletion began"
        };
        let _ = writeln!(
            out,
            "\n{why}: kube-proxy was restored from the backup, serves on every node, and the agents are in coexist mode"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use netboot::apply::ChangeSet;
    use netboot::endpoint::Detected;
    use netboot::handover::KubeProxyState;
    use netboot::kube_proxy_mode::{ConfiguredMode, NodeMode, ProxyMode};
    use netboot_contract::node::KubeProxyMode;

    fn plan(handover: HandoverPlan, mode: KubeProxyMode, nodes: &[(&str, &str)]) -> Plan {
        let node_modes: Vec<NodeMode> = nodes
            .iter()
            .map(|(n, m)| NodeMode {
                node: (*n).into(),
                mode: (!m.is_empty()).then(|| (*m).into()),
            })
            .collect();
        let kube_proxy = KubeProxyState {
            daemon_set: true,
            config_map: true,
            pods: nodes.len(),
            configured_mode: Some(ConfiguredMode {
                mode: ProxyMode::Linux(mode),
                default: false,
            }),
            configured_mode_error: None,
        };
        // As converge::plan decides it.
        let ipvs_cleanup = matches!(handover, HandoverPlan::Replace | HandoverPlan::Resume(_))
            && kube_proxy_mode::ipvs_in_use(kube_proxy.configured_mode.as_ref(), &node_modes);
        Plan {
            cluster: "local".into(),
            revision: "git:1".into(),
            endpoint: Detected {
                endpoint: netboot::spec::ApiServer {
                    host: "127.0.0.1".into(),
                    port: 6443,
                },
                source: "spec".into(),
            },
            changes: ChangeSet { entries: vec![] },
            handover,
            handover_steps: vec!["kube-proxy-gone: they and their pods are gone".into()],
            kube_proxy,
            node_modes,
            ipvs_cleanup,
            journal: None,
            unserved: None,
            noop: false,
        }
    }

    /// Before the handover of an IPVS cluster the plan shows the modes and
    /// says, in one line, that the agents clear IPVS state.
    #[test]
    fn plan_shows_kube_proxys_mode_and_the_ipvs_cleanup() {
        let p = plan(
            HandoverPlan::Replace,
            KubeProxyMode::Ipvs,
            &[("node-0", "ipvs"), ("node-1", "ipvs"), ("node-2", "")],
        );
        insta::assert_snapshot!(super::plan(&p));
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["ipvsCleanup"], true);
        assert_eq!(
            json["nodeModes"][0],
            serde_json::json!({"node": "node-0", "mode": "ipvs"})
        );
        assert_eq!(json["kubeProxy"]["configuredMode"]["mode"], "ipvs");
    }

    #[test]
    fn plan_says_nothing_of_ipvs_without_it_or_without_a_handover() {
        let iptables = super::plan(&plan(
            HandoverPlan::Replace,
            KubeProxyMode::Iptables,
            &[("node-0", "iptables"), ("node-1", "iptables")],
        ));
        assert!(
            iptables.contains(
                "kube-proxy mode: iptables in its ConfigMap; nodes report iptables on node-0, node-1\n"
            ),
            "{iptables}"
        );
        assert!(!iptables.contains("IPVS"), "{iptables}");
        // A node left with IPVS state although the ConfigMap says iptables.
        let leftover = super::plan(&plan(
            HandoverPlan::Replace,
            KubeProxyMode::Iptables,
            &[("node-0", "iptables+ipvs")],
        ));
        assert!(
            leftover.contains(kube_proxy_mode::IPVS_CLEANUP_NOTE),
            "{leftover}"
        );
        // Coexist: kube-proxy stays, its IPVS state too.
        let coexist = super::plan(&plan(
            HandoverPlan::None,
            KubeProxyMode::Ipvs,
            &[("node-0", "ipvs")],
        ));
        assert!(coexist.contains("kube-proxy mode: ipvs"), "{coexist}");
        assert!(!coexist.contains("clears"), "{coexist}");
    }
}
