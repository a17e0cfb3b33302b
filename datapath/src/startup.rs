//! The agent's start, step by step: when (milliseconds since the agent
//! began) each step finished. An operator sees where a slow start went in
//! `/v1/status` (`startup`) and `netboot-datapath status`, and the agent
//! logs the whole line once ready; the cold-start benchmark reads it too.
//!
//! The steps run partly at once (both lists and the Node read are
//! concurrent), so the numbers are points on one time line, not durations
//! that add up.

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// When the agent began: [`begin`], or the first use.
static BEGUN: OnceLock<Instant> = OnceLock::new();

/// Marks the agent's beginning (call first thing; later calls are no-ops).
pub fn begin() {
    BEGUN.get_or_init(Instant::now);
}

/// Milliseconds since [`begin`].
pub fn now_ms() -> u64 {
    BEGUN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Milliseconds since the agent began at which each step finished (`None`:
/// not yet, or not part of this start).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Startup {
    /// Programs loaded, maps opened or upgraded, links attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_installed_ms: Option<u64>,
    /// The first complete list of Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_listed_ms: Option<u64>,
    /// Services in it.
    #[serde(default)]
    pub services_listed: usize,
    /// The first complete list of EndpointSlices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_slices_listed_ms: Option<u64>,
    /// EndpointSlices in it.
    #[serde(default)]
    pub endpoint_slices_listed: usize,
    /// This agent's Node read (its zone and addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_read_ms: Option<u64>,
    /// The per-packet path (NodePorts, externalIPs, LB IPs from outside)
    /// attached to the node's devices (or found to attach nowhere, or
    /// failed: retried after each pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_packet_ms: Option<u64>,
    /// The first full pass began (everything above it needs is in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_pass_ms: Option<u64>,
    /// The first full pass reached the maps: the initial sync is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_ms: Option<u64>,
}

impl Startup {
    /// `synced at 1204 ms: datapath 95, Services 812 (10000), EndpointSlices 1003 (10000), Node 60, per-packet path 130, first pass 1010`;
    /// empty before anything was recorded.
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        let mut step = |name: &str, at: Option<u64>, n: Option<usize>| {
            if let Some(at) = at {
                let mut p = format!("{name} {}", at);
                if let Some(n) = n {
                    let _ = write!(p, " ({n})");
                }
                parts.push(p);
            }
        };
        step("datapath", self.datapath_installed_ms, None);
        step(
            "Services",
            self.services_listed_ms,
            Some(self.services_listed),
        );
        step(
            "EndpointSlices",
            self.endpoint_slices_listed_ms,
            Some(self.endpoint_slices_listed),
        );
        step("Node", self.node_read_ms, None);
        step("per-packet path", self.per_packet_ms, None);
        step("first pass", self.first_pass_ms, None);
        if parts.is_empty() && self.synced_ms.is_none() {
            return String::new();
        }
        let head = match self.synced_ms {
            Some(ms) => format!("synced at {} ms", ms),
            None => "not synced yet".to_string(),
        };
        if parts.is_empty() {
            head
        } else {
            format!("{head}: {}", parts.join(", "))
        }
    }
}

/// The steps as they are recorded, shared by the tasks that do them; each
/// step keeps its first time (a relist later is not the start).
#[derive(Debug, Default)]
pub struct Timeline {
    steps: Mutex<Startup>,
}

impl Timeline {
    /// Records a step now, unless it was recorded before.
    pub fn mark(&self, f: impl FnOnce(&mut Startup) -> &mut Option<u64>) {
        let at = now_ms();
        if let Ok(mut s) = self.steps.lock() {
            let slot = f(&mut s);
            if slot.is_none() {
                *slot = Some(at);
            }
        }
    }

    /// Records a completed first list of `kind` with `objects` in it.
    pub fn listed(&self, kind: &str, objects: usize) {
        let at = now_ms();
        if let Ok(mut guard) = self.steps.lock() {
            let s = &mut *guard;
            let (slot, count) = match kind {
                "Service" => (&mut s.services_listed_ms, &mut s.services_listed),
                "EndpointSlice" => (
                    &mut s.endpoint_slices_listed_ms,
                    &mut s.endpoint_slices_listed,
                ),
                _ => return,
            };
            if slot.is_none() {
                *slot = Some(at);
                *count = objects;
            }
        }
    }

    /// The steps so far.
    pub fn get(&self) -> Startup {
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_keeps_its_first_time_and_the_line_names_what_happened() {
        let t = Timeline::default();
        assert_eq!(t.get().line(), "");
        t.listed("Service", 3);
        t.listed("Service", 5); // a relist is not the start
        t.listed("Node", 1); // not a step
        t.mark(|s| &mut s.first_pass_ms);
        let s = t.get();
        assert_eq!(s.services_listed, 3);
        assert!(s.services_listed_ms.is_some() && s.endpoint_slices_listed_ms.is_none());
        assert!(s.first_pass_ms >= s.services_listed_ms);
        let fixed = Startup {
            datapath_installed_ms: Some(95),
            services_listed_ms: Some(812),
            services_listed: 10_000,
            endpoint_slices_listed_ms: Some(1003),
            endpoint_slices_listed: 10_000,
            node_read_ms: Some(60),
            per_packet_ms: Some(130),
            first_pass_ms: Some(1010),
            synced_ms: Some(1204),
        };
        assert_eq!(
            fixed.line(),
            "synced at 1204 ms: datapath 95, Services 812 (10000), EndpointSlices 1003 (10000), Node 60, per-packet path 130, first pass 1010"
        );
        let partial = Startup {
            datapath_installed_ms: Some(7),
            ..Default::default()
        };
        assert_eq!(partial.line(), "not synced yet: datapath 7");
    }
}
