//! Waiting, built from small conditions. The caller owns the timeout; a
//! timeout says what is not ready and why, node by node.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::apply::describe;

// The agent's objects and Node annotations: the contract's (docs/contracts.md).
pub use netboot_contract::agent::{DAEMONSET as AGENT_DAEMONSET, SELECTOR as AGENT_SELECTOR};
use netboot_contract::node::{kpr_value, parse_kpr};
pub use netboot_contract::node::{
    KubeProxyRules, DATAPATH_VERSION as VERSION_ANNOTATION,
    KUBE_PROXY_REPLACEMENT as KPR_ANNOTATION, KUBE_PROXY_RULES as RULES_ANNOTATION,
};

/// Why a DaemonSet's rollout is not complete, or `None` when it is.
pub fn rollout_pending(ds: &DaemonSet) -> Option<String> {
    let generation = ds.metadata.generation.unwrap_or(0);
    let Some(st) = &ds.status else {
        return Some("no status yet".into());
    };
    if st.observed_generation.unwrap_or(0) < generation {
        return Some(format!(
            "controller has not seen generation {generation} yet"
        ));
    }
    let desired = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let available = st.number_available.unwrap_or(0);
    if desired == 0 {
        return Some("no node is scheduled".into());
    }
    if updated < desired {
        return Some(format!("{updated} of {desired} agents updated"));
    }
    if available < desired {
        return Some(format!("{available} of {desired} agents available"));
    }
    None
}

/// A node that is not (yet) where a gate needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeProblem {
    pub node: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{what}: {message}")]
    Api { what: String, message: String },
    #[error("{what}: not ready after {seconds}s: {reason}{}", list(.nodes))]
    Timeout {
        what: String,
        seconds: u64,
        reason: String,
        nodes: Vec<NodeProblem>,
    },
}

fn list(nodes: &[NodeProblem]) -> String {
    nodes
        .iter()
        .map(|n| format!("\n  {}: {}", n.node, n.reason))
        .collect()
}

/// Per node: why its agent pod is not ready ("no agent pod", the pod's phase
/// and conditions). Nodes whose agent is ready are left out.
pub async fn agents_not_ready(
    client: &Client,
    namespace: &str,
) -> Result<Vec<NodeProblem>, WaitError> {
    let nodes = node_names(client).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = pods
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(|e| WaitError::Api {
            what: format!("pods in {namespace}"),
            message: describe(&e),
        })?;
    let mut by_node: BTreeMap<String, &Pod> = BTreeMap::new();
    for p in &pods.items {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            by_node.insert(n, p);
        }
    }
    Ok(nodes
        .into_iter()
        .filter_map(|node| {
            let reason = match by_node.get(&node) {
                None => Some("no agent pod on this node".to_string()),
                Some(p) => pod_not_ready(p),
            };
            reason.map(|reason| NodeProblem { node, reason })
        })
        .collect())
}

/// Why a pod is not ready, or `None`.
pub fn pod_not_ready(p: &Pod) -> Option<String> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let Some(st) = &p.status else {
        return Some(format!("pod {name}: no status"));
    };
    let ready = st.conditions.iter().flatten().find(|c| c.type_ == "Ready");
    match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => Some(format!(
            "pod {name} {}: not ready{}",
            st.phase.clone().unwrap_or_default(),
            c.message
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        )),
        None => Some(format!(
            "pod {name} {}: no Ready condition",
            st.phase.clone().unwrap_or_default()
        )),
    }
}

async fn list_nodes(client: &Client) -> Result<Vec<Node>, WaitError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| WaitError::Api {
            what: "nodes".into(),
            message: describe(&e),
        })?;
    Ok(list.items)
}

pub async fn node_names(client: &Client) -> Result<Vec<String>, WaitError> {
    Ok(list_nodes(client)
        .await?
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect())
}

/// Nodes whose agent does not report what the gate wants: the replacement
/// mode `want_kpr` (`true` = replace) and, when `want_rules_absent`,
/// kube-proxy's rules [`KubeProxyRules::Absent`].
pub async fn nodes_not_reporting(
    client: &Client,
    want_kpr: bool,
    want_rules_absent: bool,
) -> Result<Vec<NodeProblem>, WaitError> {
    let nodes = list_nodes(client).await?;
    Ok(nodes
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let ann = n.metadata.annotations.unwrap_or_default();
            let reason = kpr_problem(&ann, want_kpr).or_else(|| {
                want_rules_absent
                    .then(|| rules_problem(&ann, KubeProxyRules::Absent))
                    .flatten()
            });
            reason.map(|reason| NodeProblem { node: name, reason })
        })
        .collect())
}

/// Why a Node's annotations do not say KubeProxyReplacement=`want`.
fn kpr_problem(ann: &BTreeMap<String, String>, want: bool) -> Option<String> {
    match ann.get(KPR_ANNOTATION).map(String::as_str) {
        None => Some(format!(
            "no {KPR_ANNOTATION} annotation: the agent has not reported"
        )),
        Some(v) if parse_kpr(v) != Some(want) => Some(format!(
            "reports KubeProxyReplacement={v}, want {}",
            kpr_value(want)
        )),
        Some(_) => None,
    }
}

/// Why a Node's annotations do not say kube-proxy's rules are `want`.
fn rules_problem(ann: &BTreeMap<String, String>, want: KubeProxyRules) -> Option<String> {
    match ann.get(RULES_ANNOTATION).map(String::as_str) {
        Some(v) if KubeProxyRules::parse(v) == Some(want) => None,
        v => Some(format!(
            "kube-proxy rules {} on the node, want {want}",
            v.unwrap_or("unreported")
        )),
    }
}

/// Nodes whose agent does not report kube-proxy's rules as `want`.
pub async fn nodes_rules_not(
    client: &Client,
    want: KubeProxyRules,
) -> Result<Vec<NodeProblem>, WaitError> {
    Ok(list_nodes(client)
        .await?
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let ann = n.metadata.annotations.unwrap_or_default();
            rules_problem(&ann, want).map(|reason| NodeProblem { node: name, reason })
        })
        .collect())
}

/// Polls `check` until it returns no problems or `timeout` passes, showing
/// progress (a spinner on a terminal, a log line every 10 s otherwise).
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(String, Vec<NodeProblem>), WaitError>>,
{
    let start = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mut last_log = Instant::now();
    let result = loop {
        let (reason, nodes) = check().await?;
        if reason.is_empty() && nodes.is_empty() {
            break Ok(());
        }
        let line = format!(
            "waiting for {what}: {reason}{}",
            if nodes.is_empty() {
                String::new()
            } else {
                format!(" ({} nodes pending)", nodes.len())
            }
        );
        match &bar {
            Some(b) => b.set_message(format!("{line} [{}s]", start.elapsed().as_secs())),
            None if last_log.elapsed() >= Duration::from_secs(10) => {
                // The CLI shows netboot::wait at info level (main.rs): progress on
                // long waits, as JSON under --log-format json.
                tracing::info!("… {line} [{}s]", start.elapsed().as_secs());
                last_log = Instant::now();
            }
            None => {}
        }
        if start.elapsed() >= timeout {
            break Err(WaitError::Timeout {
                what: what.into(),
                seconds: timeout.as_secs(),
                reason,
                nodes,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// Waits for the agent DaemonSet's rollout; on timeout names each node whose
/// agent is not ready and why.
pub async fn agents_rolled_out(
    client: &Client,
    namespace: &str,
    timeout: Duration,
) -> Result<(), WaitError> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let what = format!("DaemonSet/{namespace}/{AGENT_DAEMONSET} rollout");
    until(&what, timeout, || async {
        let ds = api
            .get_opt(AGENT_DAEMONSET)
            .await
            .map_err(|e| WaitError::Api {
                what: what.clone(),
                message: describe(&e),
            })?;
        let Some(ds) = ds else {
            return Ok(("the DaemonSet does not exist".into(), vec![]));
        };
        match rollout_pending(&ds) {
            None => Ok((String::new(), vec![])),
            Some(reason) => Ok((reason, agents_not_ready(client, namespace).await?)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;

    fn ds(generation: i64, observed: i64, desired: i32, updated: i32, available: i32) -> DaemonSet {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            updated_number_scheduled: Some(updated),
            number_available: Some(available),
            ..Default::default()
        });
        d
    }

    #[test]
    fn rollout_conditions() {
        assert_eq!(rollout_pending(&ds(2, 2, 3, 3, 3)), None);
        assert!(rollout_pending(&ds(2, 1, 3, 3, 3))
            .unwrap()
            .contains("generation 2"));
        assert_eq!(
            rollout_pending(&ds(1, 1, 3, 2, 2)).unwrap(),
            "2 of 3 agents updated"
        );
        assert_eq!(
            rollout_pending(&ds(1, 1, 3, 3, 1)).unwrap(),
            "1 of 3 agents available"
        );
        assert!(rollout_pending(&DaemonSet::default()).is_some());
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    /// The gates read the annotations through the contract's types: only the
    /// exact values the agent writes open them.
    #[test]
    fn gates_open_only_on_the_contract_values() {
        let kpr = |v| ann(&[(KPR_ANNOTATION, v)]);
        assert_eq!(kpr_problem(&kpr("true"), true), None);
        assert_eq!(kpr_problem(&kpr("false"), false), None);
        assert!(kpr_problem(&kpr("True"), true).is_some());
        assert!(kpr_problem(&kpr("true"), false).is_some());
        assert!(kpr_problem(&ann(&[]), true)
            .unwrap()
            .contains("has not reported"));
        let rules = |v| ann(&[(RULES_ANNOTATION, v)]);
        assert_eq!(
            rules_problem(&rules("absent"), KubeProxyRules::Absent),
            None
        );
        assert_eq!(
            rules_problem(&rules("unknown"), KubeProxyRules::Absent).unwrap(),
            "kube-proxy rules unknown on the node, want absent"
        );
        assert!(rules_problem(&rules("Absent"), KubeProxyRules::Absent).is_some());
        assert!(rules_problem(&ann(&[]), KubeProxyRules::Present)
            .unwrap()
            .contains("unreported"));
    }
}
