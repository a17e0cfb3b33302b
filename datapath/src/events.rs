//! Events the agent posts about its Node (`kubectl describe node`, `kubectl
//! events --for node/<name>`), the way kubelet reports node conditions:
//! events.k8s.io/v1 Events in the `default` namespace, regarding the Node.
//!
//! Only map pressure is posted: a `MapFull` Warning when desired entries do
//! not fit (and again when what does not fit changes), a `MapPressureResolved`
//! Normal event once everything is programmed. The condition and metric carry
//! the current state; the Event is what an operator watching events sees.
//! The agent's RBAC allows creating and patching Events in `default` only, and
//! an admission policy allows only Events regarding the agent's own Node.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

/// Reporting controller of the agent's Events.
pub const CONTROLLER: &str = "netboot-datapath";
/// Warning: desired entries do not fit the pinned maps.
pub const MAP_FULL: &str = "MapFull";
/// Normal: every desired entry is programmed again.
pub const MAP_PRESSURE_RESOLVED: &str = "MapPressureResolved";

/// What to post when the map pressure summary changes from `before` to
/// `now` (each a list of `map …: N frontends` lines; empty: none).
pub fn map_pressure_event(
    before: &[String],
    now: &[String],
    unfit: (usize, usize),
) -> Option<(EventType, &'static str, String)> {
    if before == now {
        return None;
    }
    if now.is_empty() {
        return Some((
            EventType::Normal,
            MAP_PRESSURE_RESOLVED,
            "every desired Service entry is programmed".into(),
        ));
    }
    Some((
        EventType::Warning,
        MAP_FULL,
        format!(
            "{} frontends, {} backends not programmed (the rest is; raise spec.datapath.mapSizes and reinstall the datapath): {}",
            unfit.0,
            unfit.1,
            now.join("; ")
        ),
    ))
}

/// Posts Events regarding one Node.
pub struct NodeEvents {
    recorder: Recorder,
    node: ObjectReference,
}

impl NodeEvents {
    pub fn new(client: &Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(format!("{CONTROLLER}-{node}")),
        };
        NodeEvents {
            recorder: Recorder::new(client.clone(), reporter),
            node: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                ..Default::default()
            },
        }
    }

    /// Publishes; a failure is returned for the caller to log (an Event is
    /// never worth stopping for).
    pub async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let ev = Event {
            type_,
            reason: reason.into(),
            // events.k8s.io limits note to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.recorder.publish(&ev, &self.node).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pressure_events_follow_changes_only() {
        assert!(map_pressure_event(&[], &[], (0, 0)).is_none());
        let full = lines(&["map nb_lb4_svc full: 2 frontends"]);
        let (t, reason, note) = map_pressure_event(&[], &full, (2, 0)).unwrap();
        assert!(matches!(t, EventType::Warning));
        assert_eq!(reason, MAP_FULL);
        assert!(
            note.starts_with("2 frontends, 0 backends not programmed")
                && note.ends_with("map nb_lb4_svc full: 2 frontends"),
            "{note}"
        );
        assert!(map_pressure_event(&full, &full, (2, 0)).is_none());
        let more = lines(&["map nb_lb4_svc full: 3 frontends"]);
        assert_eq!(
            map_pressure_event(&full, &more, (3, 0)).unwrap().1,
            MAP_FULL
        );
        let (t, reason, _) = map_pressure_event(&more, &[], (0, 0)).unwrap();
        assert!(matches!(t, EventType::Normal));
        assert_eq!(reason, MAP_PRESSURE_RESOLVED);
    }
}
