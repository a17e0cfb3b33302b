//! Pod status patches podnet writes while it plays kubelet.

use serde_json::{json, Value};

/// Now, RFC 3339 to the second (what the API server stores).
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// `state.terminated.message`: the termination log (≤ 4096 bytes).
    pub message: String,
    /// When the process started.
    pub started_at: String,
    /// When it ended.
    pub finished_at: String,
}

/// Strategic-merge status patch for a pod whose only container exited for good:
/// phase Succeeded (exit 0) or Failed, not ready, `state.terminated` filled.
pub fn terminal(container: &str, image: &str, restarts: i32, t: &Terminated) -> Value {
    let ok = t.exit_code == 0;
    let now = now();
    let not_ready = |type_: &str| json!({"type": type_, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now});
    json!({
        "status": {
            "phase": if ok { "Succeeded" } else { "Failed" },
            "conditions": [not_ready("Ready"), not_ready("ContainersReady")],
            "containerStatuses": [{
                "name": container,
                "image": image,
                "imageID": "",
                "ready": false,
                "started": false,
                "restartCount": restarts,
                "state": {"terminated": {
                    "exitCode": t.exit_code,
                    "reason": if ok { "Completed" } else { "Error" },
                    "message": t.message,
                    "startedAt": t.started_at,
                    "finishedAt": t.finished_at,
                }},
            }],
        }
    })
}

/// What the agent runner knows about its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    /// Node IP: the hostNetwork pod's podIP and hostIP.
    pub node_ip: String,
    /// Whether the process runs now.
    pub running: bool,
    /// Whether /readyz answered 200 at the last poll.
    pub ready: bool,
    /// Restarts so far.
    pub restarts: i32,
    /// When the current process started (or the pod was first seen).
    pub started_at: String,
    /// The last exit, if any.
    pub last_exit: Option<Terminated>,
}

/// Strategic-merge status patch for an agent pod (hostNetwork DaemonSet pod).
pub fn agent(container: &str, image: &str, pod_start: &str, s: &AgentState) -> Value {
    let flag = if s.ready { "True" } else { "False" };
    let now = now();
    let cond = |type_: &str, status: &str| json!({"type": type_, "status": status, "lastTransitionTime": now});
    let state = if s.running {
        json!({"running": {"startedAt": s.started_at}})
    } else {
        json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting the agent"}})
    };
    let mut cs = json!({
        "name": container,
        "image": image,
        "imageID": "",
        "ready": s.ready,
        "started": s.running,
        "restartCount": s.restarts,
        "state": state,
    });
    if let (Some(t), Some(obj)) = (&s.last_exit, cs.as_object_mut()) {
        obj.insert(
            "lastState".into(),
            json!({"terminated": {
                "exitCode": t.exit_code,
                "reason": if t.exit_code == 0 { "Completed" } else { "Error" },
                "message": t.message,
                "startedAt": t.started_at,
                "finishedAt": t.finished_at,
            }}),
        );
    }
    json!({
        "status": {
            "phase": "Running",
            "hostIP": s.node_ip,
            "hostIPs": [{"ip": s.node_ip}],
            "podIP": s.node_ip,
            "podIPs": [{"ip": s.node_ip}],
            "startTime": pod_start,
            "conditions": [
                cond("PodScheduled", "True"),
                cond("Initialized", "True"),
                cond("ContainersReady", flag),
                cond("Ready", flag),
            ],
            "containerStatuses": [cs],
        }
    })
}

/// Reads at most 4096 bytes of a termination log (kubelet's limit), cut at a
/// character boundary. Missing file = empty message.
pub fn read_termination_log(path: &std::path::Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let mut end = bytes.len().min(4096);
    while end > 0 && std::str::from_utf8(&bytes[..end]).is_err() {
        end -= 1;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The last `max` bytes of a log file (for `FallbackToLogsOnError`).
pub fn tail_log(path: &std::path::Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_patch_sets_phase_and_message() {
        let t = Terminated {
            exit_code: 3,
            message: "boom".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
        };
        let p = terminal("probe", "netboot-probe:dev", 0, &t);
        assert_eq!(p["status"]["phase"], "Failed");
        assert_eq!(
            p["status"]["containerStatuses"][0]["state"]["terminated"]["message"],
            "boom"
        );
        assert_eq!(
            p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            3
        );
    }

    #[test]
    fn termination_log_is_capped_at_4096_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        std::fs::write(&f, "é".repeat(3000)).unwrap();
        let s = read_termination_log(&f);
        assert!(s.len() <= 4096 && s.len() >= 4094, "{}", s.len());
        assert_eq!(read_termination_log(&dir.path().join("missing")), "");
    }
}
