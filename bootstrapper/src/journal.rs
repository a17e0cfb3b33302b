//! The handover journal: how far a kube-proxy handover got, written to the
//! cluster **before** each destructive step and read at the start of every
//! run, so no interruption (a killed netboot, an API server that went away, a
//! CronJob pod evicted) can leave a half-done handover that a later run takes
//! for done.
//!
//! It lives beside the backup it protects, as the `journal.json` key of the
//! backup ConfigMap (`<namespace>/netboot-kube-proxy-backup`): one object
//! holds both kube-proxy's copy and the progress made with it.
//!
//! ```text
//!            backup written      journal first         both deletes      gates passed
//!  (none) ───────────────► BackedUp ─────► Deleting ─────────► Deleted ─────────► Validating ──► Complete
//!                             │                 │                  │                   │
//!                             │ spec no longer  └───────┬──────────┴───────────────────┘ validation failed,
//!                             ▼ wants removal           ▼                                 or spec switched
//!                         Abandoned                RollingBack ─────────────────────────────► RolledBack
//!                                           (restore, wait until kube-proxy serves, agents to coexist)
//! ```
//!
//! The pure part — which step a run takes given what it finds — is
//! [`decide`]; converge.rs gathers the facts and runs the step.

use serde::{Deserialize, Serialize};

use crate::handover::KubeProxyState;

/// Where a handover is. Persisted as kebab-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// kube-proxy's objects are backed up; nothing is deleted yet.
    BackedUp,
    /// Written before the first delete: kube-proxy may be partly gone.
    Deleting,
    /// Both deletes returned; waiting for kube-proxy's pods to go and every
    /// node to report its rules cleared.
    Deleted,
    /// The gates passed; validation has not passed yet.
    Validating,
    /// Validated: the handover is done.
    Complete,
    /// Stopped before anything was deleted (the spec stopped asking, or a
    /// gate failed): kube-proxy is intact.
    Abandoned,
    /// kube-proxy is being restored from the backup.
    RollingBack,
    /// kube-proxy restored and serving; agents in coexist mode.
    RolledBack,
}

impl Phase {
    /// A run that finds this phase must finish what it started.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Phase::BackedUp
                | Phase::Deleting
                | Phase::Deleted
                | Phase::Validating
                | Phase::RollingBack
        )
    }

    /// kube-proxy may already be (partly) deleted.
    pub fn past_delete(self) -> bool {
        matches!(
            self,
            Phase::Deleting | Phase::Deleted | Phase::Validating | Phase::RollingBack
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::BackedUp => "backed-up",
            Phase::Deleting => "deleting",
            Phase::Deleted => "deleted",
            Phase::Validating => "validating",
            Phase::Complete => "complete",
            Phase::Abandoned => "abandoned",
            Phase::RollingBack => "rolling-back",
            Phase::RolledBack => "rolled-back",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the backup holds an object, or recorded that there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Captured {
    Object,
    Absent,
}

impl Captured {
    pub fn as_str(self) -> &'static str {
        match self {
            Captured::Object => "backed up",
            Captured::Absent => "absent (recorded)",
        }
    }
}

/// kube-proxy's objects, as the handover found them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyRef {
    pub namespace: String,
    pub daemon_set: String,
    pub config_map: String,
}

/// The journal record (`journal.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub phase: Phase,
    /// The source revision that started this handover.
    pub revision: String,
    /// When the handover started and when the phase last changed (RFC 3339).
    pub started: String,
    pub updated: String,
    /// Which kube-proxy objects the backup holds.
    pub kube_proxy: KubeProxyRef,
    pub daemon_set: Captured,
    pub config_map: Captured,
    /// Who wrote the phase (the lock holder's identity).
    #[serde(default)]
    pub by: String,
}

/// What the handover part of a run does (serialized as its [`label`](HandoverPlan::label)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverPlan {
    /// Nothing: kube-proxy is where the spec wants it.
    None,
    /// Replace mode with kube-proxy present: the gated handover, from the start.
    Replace,
    /// A handover was interrupted in this phase: take it on to validation.
    Resume(Phase),
    /// Validation has not passed since kube-proxy was removed: run it
    /// (and roll back on failure).
    Validate,
    /// The spec wants kube-proxy and it is (partly) gone, or a rollback was
    /// interrupted: restore it from the backup and wait until it serves.
    Restore,
    /// A handover stopped before any delete and the spec no longer asks for
    /// it: record it as abandoned.
    Abandon,
    /// The handover failed validation and was rolled back at this revision;
    /// agents stay in coexist mode until a new revision or `--retry`.
    HeldAfterRollback,
}

impl Serialize for HandoverPlan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

impl HandoverPlan {
    /// `none`, `replace`, `resume-<phase>`, `validate`, `restore`, `abandon`,
    /// `held-after-rollback`.
    pub fn label(self) -> String {
        match self {
            HandoverPlan::None => "none".into(),
            HandoverPlan::Replace => "replace".into(),
            HandoverPlan::Resume(p) => format!("resume-{p}"),
            HandoverPlan::Validate => "validate".into(),
            HandoverPlan::Restore => "restore".into(),
            HandoverPlan::Abandon => "abandon".into(),
            HandoverPlan::HeldAfterRollback => "held-after-rollback".into(),
        }
    }

    /// Whether this plan writes nothing by itself.
    pub fn is_quiet(self) -> bool {
        matches!(self, HandoverPlan::None | HandoverPlan::HeldAfterRollback)
    }
}

/// What a run finds, gathered before anything is decided.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The spec (after the rollback hold) wants kube-proxy removed.
    pub wants_removal: bool,
    /// The handover was rolled back at this revision and no `--retry`.
    pub held: bool,
    pub kube_proxy: KubeProxyState,
    /// A backup of kube-proxy exists.
    pub backup: bool,
    pub journal: Option<Journal>,
}

/// The handover step for these facts. Pure: every state, including every
/// interrupted one, is unit-tested below.
pub fn decide(f: &Facts) -> HandoverPlan {
    let phase = f.journal.as_ref().map(|j| j.phase);
    match phase {
        // A rollback that did not finish is finished first, whatever the spec says now.
        Some(Phase::RollingBack) => HandoverPlan::Restore,
        Some(p) if p.in_progress() => {
            if f.wants_removal && !f.held {
                match p {
                    Phase::Validating => HandoverPlan::Validate,
                    p => HandoverPlan::Resume(p),
                }
            } else if p.past_delete() || !f.kube_proxy.present() {
                // The spec switched back (or the run was held) after deletes began.
                HandoverPlan::Restore
            } else {
                HandoverPlan::Abandon
            }
        }
        _ if f.held => HandoverPlan::HeldAfterRollback,
        _ if f.wants_removal && f.kube_proxy.present() => HandoverPlan::Replace,
        _ if !f.wants_removal && !f.kube_proxy.present() && f.backup => HandoverPlan::Restore,
        _ => HandoverPlan::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(phase: Phase) -> Journal {
        Journal {
            phase,
            revision: "git:abc".into(),
            started: "t0".into(),
            updated: "t1".into(),
            kube_proxy: KubeProxyRef {
                namespace: "kube-system".into(),
                daemon_set: "kube-proxy".into(),
                config_map: "kube-proxy".into(),
            },
            daemon_set: Captured::Object,
            config_map: Captured::Object,
            by: String::new(),
        }
    }

    fn kp(ds: bool, cm: bool, pods: usize) -> KubeProxyState {
        KubeProxyState {
            daemon_set: ds,
            config_map: cm,
            pods,
            ..Default::default()
        }
    }

    fn facts(wants_removal: bool, kube_proxy: KubeProxyState, phase: Option<Phase>) -> Facts {
        Facts {
            wants_removal,
            held: false,
            kube_proxy,
            backup: phase.is_some(),
            journal: phase.map(journal),
        }
    }

    #[test]
    fn fresh_clusters() {
        #[allow(unused_imports)]
        use HandoverPlan::{Abandon, Replace, Restore, Resume, Validate};
        assert_eq!(decide(&facts(true, kp(true, true, 3), None)), Replace);
        assert_eq!(
            decide(&facts(true, kp(false, false, 0), None)),
            HandoverPlan::None
        );
        assert_eq!(
            decide(&facts(false, kp(true, true, 3), None)),
            HandoverPlan::None
        );
        // Coexist with kube-proxy gone and no backup: nothing to restore from.
        assert_eq!(
            decide(&facts(false, kp(false, false, 0), None)),
            HandoverPlan::None
        );
        let mut f = facts(false, kp(false, false, 0), None);
        f.backup = true;
        assert_eq!(decide(&f), Restore);
    }

    /// Every interrupted phase is taken on, never taken for done (issue 16:
    /// a run killed after the deletes used to be a no-op next time).
    #[test]
    fn interrupted_handovers_resume_to_validation() {
        #[allow(unused_imports)]
        use HandoverPlan::{Abandon, Replace, Restore, Resume, Validate};
        for (phase, state, want) in [
            (Phase::BackedUp, kp(true, true, 3), Resume(Phase::BackedUp)),
            // Killed between the two deletes: the DaemonSet is gone, the ConfigMap is not.
            (Phase::Deleting, kp(false, true, 0), Resume(Phase::Deleting)),
            (Phase::Deleting, kp(true, true, 3), Resume(Phase::Deleting)),
            (Phase::Deleted, kp(false, false, 1), Resume(Phase::Deleted)),
            (Phase::Validating, kp(false, false, 0), Validate),
        ] {
            assert_eq!(decide(&facts(true, state, Some(phase))), want, "{phase}");
        }
    }

    #[test]
    fn an_interrupted_rollback_is_finished_whatever_the_spec_says() {
        for wants in [true, false] {
            for state in [kp(false, false, 0), kp(false, true, 0), kp(true, true, 3)] {
                assert_eq!(
                    decide(&facts(wants, state, Some(Phase::RollingBack))),
                    HandoverPlan::Restore
                );
            }
        }
    }

    #[test]
    fn switching_to_coexist_mid_handover_restores_or_abandons() {
        #[allow(unused_imports)]
        use HandoverPlan::{Abandon, Replace, Restore, Resume, Validate};
        assert_eq!(
            decide(&facts(false, kp(true, true, 3), Some(Phase::BackedUp))),
            Abandon
        );
        for phase in [Phase::Deleting, Phase::Deleted, Phase::Validating] {
            assert_eq!(
                decide(&facts(false, kp(false, true, 0), Some(phase))),
                Restore,
                "{phase}"
            );
        }
        // Backed up, then kube-proxy deleted by hand: bring it back.
        assert_eq!(
            decide(&facts(false, kp(false, false, 0), Some(Phase::BackedUp))),
            Restore
        );
    }

    #[test]
    fn finished_handovers_are_quiet() {
        #[allow(unused_imports)]
        use HandoverPlan::{Abandon, Replace, Restore, Resume, Validate};
        for phase in [Phase::Complete, Phase::Abandoned, Phase::RolledBack] {
            assert_eq!(
                decide(&facts(true, kp(false, false, 0), Some(phase))),
                HandoverPlan::None,
                "{phase}"
            );
        }
        // Replace mode again after a rollback that a new revision lifted.
        assert_eq!(
            decide(&facts(true, kp(true, true, 3), Some(Phase::RolledBack))),
            Replace
        );
        // Complete, then someone re-created kube-proxy: hand over again.
        assert_eq!(
            decide(&facts(true, kp(true, true, 3), Some(Phase::Complete))),
            Replace
        );
    }

    #[test]
    fn held_after_rollback_until_a_new_revision() {
        let mut f = facts(true, kp(true, true, 3), Some(Phase::RolledBack));
        f.held = true;
        assert_eq!(decide(&f), HandoverPlan::HeldAfterRollback);
        // Held, but a rollback in progress still finishes first.
        f.journal = Some(journal(Phase::RollingBack));
        assert_eq!(decide(&f), HandoverPlan::Restore);
    }

    #[test]
    fn phases_round_trip_as_kebab_case() {
        let j = journal(Phase::RollingBack);
        let s = serde_json::to_string(&j).unwrap_or_default();
        assert!(s.contains("\"phase\":\"rolling-back\""), "{s}");
        let back: Journal = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
        assert_eq!(back, j);
    }
}
