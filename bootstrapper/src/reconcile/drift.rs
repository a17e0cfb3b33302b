//! Drift: what a plan would change although the spec did not ask for it —
//! objects edited or deleted by hand since netboot applied them, and
//! kube-proxy back after a completed handover. A change the spec asks for (a
//! new commit) is not drift: an object counts only when the hash netboot
//! would apply equals the hash its inventory recorded for it.

use serde::Serialize;

use crate::apply::Action;
use crate::converge::{HandoverPlan, Plan};
use crate::inventory::Inventory;
use crate::spec::ClusterNetwork;

/// One drifted object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// `Kind/namespace/name`.
    pub object: String,
    /// What happened to it.
    pub how: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.object, self.how)
    }
}

/// The drift in `plan`, judged against the inventory as it was before the
/// run. Nothing drifts from a cluster netboot never applied to.
pub fn detect(plan: &Plan, spec: &ClusterNetwork, previous: Option<&Inventory>) -> Vec<Drift> {
    let Some(inv) = previous else {
        return Vec::new();
    };
    let mut out: Vec<Drift> = plan
        .changes
        .entries
        .iter()
        .filter_map(|c| {
            let how = match c.action {
                Action::Configured => "changed by hand",
                Action::Created => "deleted by hand",
                Action::Recreated => "changed by hand (an immutable field)",
                _ => return None,
            };
            inv.objects
                .iter()
                .any(|e| e.id == c.id && e.hash == c.hash)
                .then(|| Drift {
                    object: c.id.to_string(),
                    how: how.into(),
                })
        })
        .collect();
    // Brought to replace mode, and the last run's steps (the handover, or a
    // validation after it) all went through: kube-proxy was gone then.
    let handed_over = inv.mode == "replace"
        && !inv.handover.is_empty()
        && inv.handover.iter().all(|s| s.result != "failed");
    if plan.handover == HandoverPlan::Replace && handed_over {
        let kp = &spec.kube_proxy;
        for (present, kind, name) in [
            (plan.kube_proxy.daemon_set, "DaemonSet", &kp.daemon_set),
            (plan.kube_proxy.config_map, "ConfigMap", &kp.config_map),
        ] {
            if present {
                out.push(Drift {
                    object: format!("{kind}/{}/{name}", kp.namespace),
                    how: "re-created by hand; the spec replaces kube-proxy".into(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::apply::{Change, ChangeSet};
    use crate::endpoint::Detected;
    use crate::handover::KubeProxyState;
    use crate::inventory::{Entry, StepRecord};
    use crate::manifest::ObjectId;

    fn id(kind: &str, name: &str) -> ObjectId {
        ObjectId {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: Some("netboot-system".into()),
            name: name.into(),
        }
    }

    fn change(kind: &str, name: &str, action: Action, hash: &str) -> Change {
        Change {
            id: id(kind, name),
            action,
            diff: String::new(),
            reason: None,
            hash: hash.into(),
        }
    }

    fn plan(entries: Vec<Change>, handover: HandoverPlan, kp: KubeProxyState) -> Plan {
        let endpoint = Detected {
            endpoint: crate::spec::ApiServer {
                host: "127.0.0.1".into(),
                port: 6443,
            },
            source: "spec".into(),
        };
        Plan {
            cluster: "local".into(),
            revision: "git:1".into(),
            endpoint,
            changes: ChangeSet { entries },
            handover,
            handover_steps: vec![],
            kube_proxy: kp,
            node_modes: vec![],
            ipvs_cleanup: false,
            journal: None,
            unserved: None,
            noop: false,
        }
    }

    fn spec() -> ClusterNetwork {
        crate::spec::parse(
            "t.yaml",
            "apiVersion: netboot.io/v1alpha1\nkind: ClusterNetwork\nmetadata:\n  name: local\nspec:\n  cluster:\n    serviceCIDR: 10.96.0.0/16\n    podCIDR: 10.244.0.0/16\n",
        )
        .unwrap()
    }

    fn inventory(mode: &str, handed_over: bool) -> Inventory {
        Inventory {
            cluster: "local".into(),
            revision: "git:1".into(),
            objects: vec![
                Entry {
                    id: id("DaemonSet", "netboot-datapath"),
                    hash: "sha256:ds".into(),
                },
                Entry {
                    id: id("ConfigMap", "netboot-datapath-config"),
                    hash: "sha256:cm".into(),
                },
            ],
            mode: mode.into(),
            allow_unserved: vec![],
            unserved_allowed: vec![],
            // A later run without a handover records only its validation.
            handover: if handed_over {
                vec![StepRecord {
                    name: "validation".into(),
                    result: "done".into(),
                    message: String::new(),
                }]
            } else {
                vec![]
            },
            updated: String::new(),
        }
    }

    #[test]
    fn hand_edits_drift_spec_changes_do_not() {
        let p = plan(
            vec![
                // Same hash as recorded: someone edited it.
                change(
                    "DaemonSet",
                    "netboot-datapath",
                    Action::Configured,
                    "sha256:ds",
                ),
                // New hash: the spec changed it.
                change(
                    "ConfigMap",
                    "netboot-datapath-config",
                    Action::Configured,
                    "sha256:new",
                ),
                change(
                    "ServiceAccount",
                    "netboot-datapath",
                    Action::Unchanged,
                    "sha256:sa",
                ),
            ],
            HandoverPlan::None,
            KubeProxyState::default(),
        );
        let d = detect(&p, &spec(), Some(&inventory("replace", true)));
        assert_eq!(
            d,
            [Drift {
                object: "DaemonSet/netboot-system/netboot-datapath".into(),
                how: "changed by hand".into()
            }]
        );
        assert!(
            detect(&p, &spec(), None).is_empty(),
            "never applied: no drift"
        );
    }

    #[test]
    fn kube_proxy_back_after_a_handover_drifts_before_one_does_not() {
        let kp = KubeProxyState {
            daemon_set: true,
            config_map: true,
            pods: 3,
            ..Default::default()
        };
        let p = plan(vec![], HandoverPlan::Replace, kp);
        let d = detect(&p, &spec(), Some(&inventory("replace", true)));
        let objects: Vec<&str> = d.iter().map(|d| d.object.as_str()).collect();
        assert_eq!(
            objects,
            [
                "DaemonSet/kube-system/kube-proxy",
                "ConfigMap/kube-system/kube-proxy"
            ]
        );
        // The first handover (or one whose gate stopped it) is not drift.
        assert!(detect(&p, &spec(), Some(&inventory("replace", false))).is_empty());
        assert!(detect(&p, &spec(), Some(&inventory("coexist", false))).is_empty());
        let mut stopped = inventory("replace", true);
        stopped.handover[0] = StepRecord {
            name: "nodes-report-replacement".into(),
            result: "failed".into(),
            message: String::new(),
        };
        assert!(
            detect(&p, &spec(), Some(&stopped)).is_empty(),
            "a retried handover is not drift"
        );
    }
}
