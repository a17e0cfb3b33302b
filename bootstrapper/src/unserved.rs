//! The "nothing unserved" gate: before kube-proxy is touched, every Service
//! in the cluster must need only what every agent serves.
//!
//! Each agent publishes the features it serves on its Node
//! (`netboot.io/datapath-features`, [`netboot_contract::features`]); what a
//! Service needs comes from the same contract function the agent uses
//! ([`features::needs`]). A Service needing a feature some agent lacks — a
//! protocol (SCTP), a type (NodePort, LoadBalancer, externalIPs), a traffic
//! policy, an IP family — would stop working once kube-proxy is gone, so the
//! handover stops, naming each Service and what it needs, unless
//! `spec.kubeProxy.allowUnserved` accepts that gap by name.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, ObjectReference, Service};
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use netboot_contract::features::{self, Feature, FEATURES_ANNOTATION};
use serde::Serialize;

use crate::apply::describe;

/// A Service needing features the agents do not serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unserved {
    /// `namespace/name`.
    pub service: String,
    /// What it needs and not every agent serves, by feature name.
    pub needs: Vec<String>,
}

impl std::fmt::Display for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service/{}: needs {}",
            self.service,
            self.needs.join(", ")
        )
    }
}

/// What the gate found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnservedReport {
    /// What every agent serves (the intersection over the Nodes).
    pub served: Vec<String>,
    /// Nodes whose agent publishes no features (it serves nothing we can count on).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes_without_features: Vec<String>,
    /// Services needing something not served and not allowed: the gate stays shut.
    pub refused: Vec<Unserved>,
    /// Services whose gaps `spec.kubeProxy.allowUnserved` accepts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<Unserved>,
}

impl UnservedReport {
    /// The gate opens.
    pub fn ok(&self) -> bool {
        self.refused.is_empty()
    }

    /// One line per refused Service, for the gate's error.
    pub fn refusal(&self) -> String {
        let mut s = format!(
            "{} Service(s) need what the agents do not serve (they serve {}); kube-proxy stays. \
             Accept a gap by name in spec.kubeProxy.allowUnserved:",
            self.refused.len(),
            if self.served.is_empty() {
                "nothing".to_string()
            } else {
                self.served.join(",")
            }
        );
        for u in &self.refused {
            s.push_str(&format!("\n  {u}"));
        }
        for n in &self.nodes_without_features {
            s.push_str(&format!(
                "\n  Node/{n}: publishes no {FEATURES_ANNOTATION} (an older agent?)"
            ));
        }
        s
    }
}

pub use netboot_contract::features::shape;

/// Every Service needing something outside `served`, with what (sorted by
/// namespace/name). Services no proxy serves (ExternalName, headless, another
/// proxy's) need nothing.
pub fn unserved(services: &[Service], served: &BTreeSet<Feature>) -> Vec<(String, Vec<Feature>)> {
    let mut out: BTreeMap<String, Vec<Feature>> = BTreeMap::new();
    for svc in services {
        let Some(needs) = features::needs(&shape(svc)) else {
            continue;
        };
        let missing = features::missing(&needs, served);
        if !missing.is_empty() {
            let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            out.insert(format!("{ns}/{name}"), missing);
        }
    }
    out.into_iter().collect()
}

/// What every agent serves: the intersection of the Nodes' annotations, and
/// the Nodes without one (they count as serving nothing).
pub fn served_by(nodes: &[Node]) -> (BTreeSet<Feature>, Vec<String>) {
    let mut served: Option<BTreeSet<Feature>> = None;
    let mut without = Vec::new();
    for n in nodes {
        let value = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FEATURES_ANNOTATION));
        let f = match value {
            Some(v) => features::parse(v),
            None => {
                without.push(n.metadata.name.clone().unwrap_or_default());
                BTreeSet::new()
            }
        };
        served = Some(match served {
            None => f,
            Some(s) => s.intersection(&f).copied().collect(),
        });
    }
    (served.unwrap_or_default(), without)
}

/// The gate's decision, a pure function of what was listed.
pub fn decide(services: &[Service], nodes: &[Node], allow: &[String]) -> UnservedReport {
    let (served, without) = served_by(nodes);
    let allow: BTreeSet<Feature> = allow.iter().filter_map(|a| Feature::parse(a)).collect();
    let names = |fs: &[Feature]| fs.iter().map(|f| f.name().to_string()).collect();
    let mut report = UnservedReport {
        served: served.iter().map(|f| f.name().to_string()).collect(),
        nodes_without_features: without,
        ..Default::default()
    };
    for (service, missing) in unserved(services, &served) {
        let refused: Vec<Feature> = missing
            .iter()
            .copied()
            .filter(|f| !allow.contains(f))
            .collect();
        let u = Unserved {
            service,
            needs: names(&missing),
        };
        if refused.is_empty() {
            report.allowed.push(u);
        } else {
            report.refused.push(Unserved {
                needs: names(&refused),
                ..u
            });
        }
    }
    report
}

/// Errors listing what the gate needs.
#[derive(Debug, thiserror::Error)]
pub enum UnservedError {
    #[error("{what}: {message}")]
    Api { what: String, message: String },
}

/// Lists every Service and Node and decides.
pub async fn check(client: &Client, allow: &[String]) -> Result<UnservedReport, UnservedError> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| UnservedError::Api {
            what: "Services in all namespaces".into(),
            message: describe(&e),
        })?
        .items;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| UnservedError::Api {
            what: "nodes".into(),
            message: describe(&e),
        })?
        .items;
    Ok(decide(&services, &nodes, allow))
}

/// The reason of the Warning Event on a Service the agents cannot serve.
pub const WARNING_REASON: &str = "UnservedByDatapath";

/// A Warning Event to record on a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    pub service: ObjectReference,
    pub note: String,
}

/// The Warning Events to record once kube-proxy is gone: one per Service
/// the report names (refused or allowed: either way that part of it no
/// longer works), unless an Event with [`WARNING_REASON`] and the same note
/// is already on that Service (by UID) — so each gap is recorded once, again
/// only after the API server expired the Event (`--event-ttl`, 1 h by
/// default) or when the gap changes.
pub fn warnings(
    report: &UnservedReport,
    services: &[Service],
    existing: &[CoreEvent],
) -> Vec<Warning> {
    let allowed = report.allowed.iter().map(|u| (u, true));
    let refused = report.refused.iter().map(|u| (u, false));
    let mut out = Vec::new();
    for (u, accepted) in refused.chain(allowed) {
        let Some(svc) = services.iter().find(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default()
            ) == u.service
        }) else {
            continue;
        };
        let note = format!(
            "needs {}, which the netboot datapath agents do not serve (they serve {}); kube-proxy is gone, so that part of this Service does not work{}",
            u.needs.join(", "),
            if report.served.is_empty() {
                "nothing".to_string()
            } else {
                report.served.join(",")
            },
            if accepted {
                " (accepted by spec.kubeProxy.allowUnserved)"
            } else {
                ""
            }
        );
        let uid = svc.metadata.uid.clone();
        let seen = existing.iter().any(|e| {
            e.reason.as_deref() == Some(WARNING_REASON)
                && e.involved_object.uid == uid
                && e.message.as_deref() == Some(note.as_str())
        });
        if !seen {
            out.push(Warning {
                service: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    name: svc.metadata.name.clone(),
                    namespace: svc.metadata.namespace.clone(),
                    uid,
                    ..Default::default()
                },
                note,
            });
        }
    }
    out
}

/// After a handover: lists Services, Nodes and the Events already recorded,
/// records a Warning Event on each unserved Service that has none for its
/// gap yet (see [`warnings`]) and returns the report. Events are best
/// effort: one that cannot be written is logged.
pub async fn record_warnings(
    client: &Client,
    allow: &[String],
) -> Result<(UnservedReport, usize), UnservedError> {
    let api = |what: &str, e: kube::Error| UnservedError::Api {
        what: what.into(),
        message: describe(&e),
    };
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api("Services in all namespaces", e))?
        .items;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api("nodes", e))?
        .items;
    let report = decide(&services, &nodes, allow);
    if report.refused.is_empty() && report.allowed.is_empty() {
        return Ok((report, 0));
    }
    let existing = Api::<CoreEvent>::all(client.clone())
        .list(&ListParams::default().fields(&format!("reason={WARNING_REASON}")))
        .await
        .map_err(|e| api("Events in all namespaces", e))?
        .items;
    let todo = warnings(&report, &services, &existing);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "netboot".into(),
            instance: Some(crate::lock::identity()),
        },
    );
    let mut recorded = 0;
    for w in &todo {
        let ev = Event {
            type_: EventType::Warning,
            reason: WARNING_REASON.into(),
            note: Some(w.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match recorder.publish(&ev, &w.service).await {
            Ok(()) => recorded += 1,
            Err(e) => tracing::warn!(
                "event {WARNING_REASON} on Service/{}/{}: {}",
                w.service.namespace.as_deref().unwrap_or_default(),
                w.service.name.as_deref().unwrap_or_default(),
                describe(&e)
            ),
        }
    }
    Ok((report, recorded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn node(name: &str, features: Option<&str>) -> Node {
        let ann = features
            .map(|f| format!(", annotations: {{{FEATURES_ANNOTATION}: '{f}'}}"))
            .unwrap_or_default();
        serde_yaml::from_str(&format!("metadata: {{name: {name}{ann}}}")).unwrap()
    }

    const AGENT: &str =
        "clusterip,ipv4,tcp,udp,internal-traffic-local,session-affinity,topology-hints";

    fn cluster() -> Vec<Service> {
        [
            "metadata: {name: web, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}], sessionAffinity: ClientIP}",
            "metadata: {name: sctp, namespace: d}\nspec: {clusterIP: 10.96.0.6, ports: [{port: 80}, {port: 9, protocol: SCTP}]}",
            "metadata: {name: np, namespace: d}\nspec: {type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 80}], externalTrafficPolicy: Local}",
            "metadata: {name: lb, namespace: e}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.8, clusterIPs: [10.96.0.8, 'fd00::8'], ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}",
            "metadata: {name: ext, namespace: e}\nspec: {clusterIP: 10.96.0.9, externalIPs: [192.0.2.9], ports: [{port: 80}]}",
            // Nobody's to serve: ExternalName, headless, another proxy's, kube-proxy's headless label.
            "metadata: {name: en, namespace: d}\nspec: {type: ExternalName, externalName: x.example, ports: [{port: 9, protocol: SCTP}]}",
            "metadata: {name: hl, namespace: d}\nspec: {clusterIP: None, ports: [{port: 9, protocol: SCTP}]}",
            "metadata: {name: other, namespace: d, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80}]}",
            "metadata: {name: hlabel, namespace: d, labels: {service.kubernetes.io/headless: ''}}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 9, protocol: SCTP}]}",
        ]
        .iter()
        .map(|y| svc(y))
        .collect()
    }

    fn lines(us: &[Unserved]) -> Vec<String> {
        us.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_service_needing_what_the_agents_lack_is_named() {
        let r = decide(
            &cluster(),
            &[node("a", Some(AGENT)), node("b", Some(AGENT))],
            &[],
        );
        assert!(!r.ok());
        assert_eq!(
            lines(&r.refused),
            vec![
                "Service/d/np: needs nodeport, external-traffic-local",
                "Service/d/sctp: needs sctp",
                "Service/e/ext: needs externalips",
                "Service/e/lb: needs nodeport, loadbalancer, ipv6",
            ]
        );
        assert!(r.allowed.is_empty());
        let msg = r.refusal();
        assert!(msg.starts_with("4 Service(s) need what the agents do not serve (they serve clusterip,ipv4,tcp,udp,"), "{msg}");
        assert!(msg.contains("\n  Service/d/sctp: needs sctp"), "{msg}");
    }

    #[test]
    fn allowed_gaps_let_the_gate_open_and_are_kept_for_the_record() {
        let allow: Vec<String> = [
            "sctp",
            "nodeport",
            "loadbalancer",
            "externalips",
            "ipv6",
            "external-traffic-local",
        ]
        .map(String::from)
        .to_vec();
        let r = decide(&cluster(), &[node("a", Some(AGENT))], &allow);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.allowed.len(), 4);
        // Allowing part of a Service's gaps names only the rest.
        let r = decide(&cluster(), &[node("a", Some(AGENT))], &["nodeport".into()]);
        assert!(lines(&r.refused).contains(&"Service/e/lb: needs loadbalancer, ipv6".into()));
        assert!(lines(&r.allowed).is_empty());
    }

    #[test]
    fn what_every_agent_serves_is_the_intersection_and_a_silent_agent_serves_nothing() {
        let only_web = vec![cluster().remove(0)];
        let r = decide(
            &only_web,
            &[
                node("a", Some(AGENT)),
                node("b", Some("clusterip,ipv4,tcp")),
            ],
            &[],
        );
        assert_eq!(
            lines(&r.refused),
            vec!["Service/d/web: needs session-affinity"]
        );
        assert_eq!(r.served, vec!["clusterip", "ipv4", "tcp"]);
        let r = decide(&only_web, &[node("a", Some(AGENT)), node("old", None)], &[]);
        assert_eq!(r.nodes_without_features, vec!["old"]);
        assert!(!r.ok());
        assert!(r
            .refusal()
            .contains("Node/old: publishes no netboot.io/datapath-features"));
        // A newer agent's unknown feature names are ignored; all served: open.
        let r = decide(&only_web, &[node("a", Some(&format!("{AGENT},warp")))], &[]);
        assert!(r.ok() && r.refused.is_empty());
    }

    #[test]
    fn the_agent_publishes_what_the_gate_reads() {
        // The two sides share the vocabulary: the contract formats, the gate parses.
        let all: BTreeSet<Feature> = Feature::ALL.into_iter().collect();
        let n = node("a", Some(&features::format(&all)));
        assert_eq!(served_by(&[n]).0, all);
    }
}

#[cfg(test)]
mod warning_tests {
    use super::*;

    fn svc(ns: &str, name: &str, uid: &str, spec: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: {ns}, uid: {uid}}}\nspec: {spec}"
        ))
        .unwrap()
    }

    fn node() -> Node {
        serde_yaml::from_str(&format!(
            "metadata: {{name: n, annotations: {{{FEATURES_ANNOTATION}: 'clusterip,ipv4,tcp,udp'}}}}"
        ))
        .unwrap()
    }

    fn event(uid: &str, message: &str) -> CoreEvent {
        serde_yaml::from_str(&format!(
            "metadata: {{name: e, namespace: d}}\nreason: {WARNING_REASON}\ninvolvedObject: {{kind: Service, uid: {uid}}}\nmessage: '{message}'"
        ))
        .unwrap()
    }

    #[test]
    fn each_unserved_service_is_warned_once_per_gap() {
        let services = vec![
            svc(
                "d",
                "web",
                "u1",
                "{clusterIP: 10.96.0.5, ports: [{port: 80}]}",
            ),
            svc(
                "d",
                "np",
                "u2",
                "{type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 80}]}",
            ),
            svc(
                "e",
                "sctp",
                "u3",
                "{clusterIP: 10.96.0.8, ports: [{port: 9, protocol: SCTP}]}",
            ),
        ];
        let report = decide(&services, &[node()], &["sctp".into()]);
        let first = warnings(&report, &services, &[]);
        let named: Vec<(String, &str)> = first
            .iter()
            .map(|w| {
                (
                    format!(
                        "{}/{}",
                        w.service.namespace.as_deref().unwrap(),
                        w.service.name.as_deref().unwrap()
                    ),
                    w.service.uid.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            named,
            [("d/np".to_string(), "u2"), ("e/sctp".to_string(), "u3")]
        );
        assert!(first[0].note.starts_with("needs nodeport, which the netboot datapath agents do not serve (they serve clusterip,ipv4,tcp,udp)"), "{first:?}");
        assert!(
            first[1]
                .note
                .ends_with("(accepted by spec.kubeProxy.allowUnserved)"),
            "{first:?}"
        );
        // Recorded already: nothing again. A re-created Service (new UID) or a changed gap: again.
        let existing: Vec<CoreEvent> = first
            .iter()
            .map(|w| event(w.service.uid.as_deref().unwrap(), &w.note))
            .collect();
        assert!(warnings(&report, &services, &existing).is_empty());
        let recreated = vec![
            services[0].clone(),
            svc(
                "d",
                "np",
                "u9",
                "{type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 80}]}",
            ),
            services[2].clone(),
        ];
        let again = warnings(
            &decide(&recreated, &[node()], &["sctp".into()]),
            &recreated,
            &existing,
        );
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].service.uid.as_deref(), Some("u9"));
    }
}
