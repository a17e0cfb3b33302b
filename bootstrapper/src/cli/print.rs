//! Human output for plans, ChangeSets and outcomes. The library returns
//! structs; only this file decides how they look.

use std::fmt::Write;

use netboot::apply::{Action, ChangeSet};
use netboot::converge::{HandoverPlan, Outcome, Plan};
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
