//! Is kube-proxy still installed? The agent watches kube-proxy's DaemonSet
//! (`kubeProxy` in config.yaml) and removes kube-proxy's rules only once that
//! DaemonSet is gone: netboot apply deletes kube-proxy after every node
//! reports replacement, and a rollback re-creates it before switching the
//! agents to coexist. An agent that cleaned while kube-proxy is installed
//! would fight a running kube-proxy or wipe a freshly restored one.
//!
//! [`decide`] and [`recheck_interval`] are the pure decision; the watcher
//! feeds [`KubeProxyWatch`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::KubeProxyRef;
use crate::watch::Watched;

/// Re-check period right after kube-proxy's DaemonSet disappeared (its pods
/// may still be terminating and re-writing rules for a few seconds).
pub const FAST_RECHECK: Duration = Duration::from_secs(2);
/// How long after the disappearance [`FAST_RECHECK`] applies.
pub const FAST_WINDOW: Duration = Duration::from_secs(30);

/// Whether kube-proxy's DaemonSet exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeProxyState {
    /// Not known yet (no complete list; or status read from the pins).
    #[default]
    Unknown,
    /// The DaemonSet exists (also while it is being deleted with finalizers).
    Installed,
    /// The DaemonSet does not exist.
    Absent,
}

impl KubeProxyState {
    /// `installed`, `absent` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Installed => "installed",
            Self::Absent => "absent",
        }
    }
}

impl std::fmt::Display for KubeProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent does about kube-proxy's rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cleanup {
    /// Not known (status read from the pins, without an agent).
    #[default]
    Unknown,
    /// Coexist mode or `cleanupKubeProxyRules: false`: rules are never touched.
    Disabled,
    /// Replace mode, but kube-proxy is installed (or not known to be absent).
    HeldBack,
    /// kube-proxy is absent, but the maps are not programmed yet.
    WaitingForReady,
    /// kube-proxy's rules are removed on every check.
    Active,
}

impl Cleanup {
    /// Status word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Disabled => "disabled",
            Self::HeldBack => "held-back",
            Self::WaitingForReady => "waiting-for-ready",
            Self::Active => "active",
        }
    }

    /// The agent removes rules now.
    pub fn cleans(self) -> bool {
        self == Self::Active
    }
}

impl std::fmt::Display for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether kube-proxy's rules may be removed now.
///
/// `replace`: kubeProxyReplacement; `cleanup`: cleanupKubeProxyRules;
/// `ready`: the maps hold a complete initial list.
pub fn decide(replace: bool, cleanup: bool, ready: bool, kube_proxy: KubeProxyState) -> Cleanup {
    if !replace || !cleanup {
        Cleanup::Disabled
    } else if kube_proxy != KubeProxyState::Absent {
        Cleanup::HeldBack
    } else if !ready {
        Cleanup::WaitingForReady
    } else {
        Cleanup::Active
    }
}

/// How long the node loop sleeps before the next check: [`FAST_RECHECK`]
/// while cleaning during the first [`FAST_WINDOW`] after kube-proxy became
/// absent (`absent_for`), `normal` otherwise.
pub fn recheck_interval(
    decision: Cleanup,
    absent_for: Option<Duration>,
    normal: Duration,
) -> Duration {
    match absent_for {
        Some(d) if decision.cleans() && d < FAST_WINDOW => normal.min(FAST_RECHECK),
        _ => normal,
    }
}

/// The current [`KubeProxyState`], shared between its watcher, the node loop
/// and the status endpoint.
#[derive(Debug)]
pub struct KubeProxyWatch {
    /// The watched DaemonSet.
    pub daemon_set: KubeProxyRef,
    state: Mutex<(KubeProxyState, Instant)>,
    /// Woken on every state change.
    pub changed: Notify,
}

impl KubeProxyWatch {
    /// Starts in `initial`.
    pub fn new(daemon_set: KubeProxyRef, initial: KubeProxyState) -> Self {
        Self {
            daemon_set,
            state: Mutex::new((initial, Instant::now())),
            changed: Notify::new(),
        }
    }

    /// The state and how long it has held.
    pub fn get(&self) -> (KubeProxyState, Duration) {
        self.state
            .lock()
            .map(|s| (s.0, s.1.elapsed()))
            .unwrap_or((KubeProxyState::Unknown, Duration::ZERO))
    }

    /// How long kube-proxy has been absent (None: not absent).
    pub fn absent_for(&self) -> Option<Duration> {
        match self.get() {
            (KubeProxyState::Absent, d) => Some(d),
            _ => None,
        }
    }

    /// Records `state`; on a change, notes the time, logs and wakes waiters.
    pub fn set(&self, state: KubeProxyState) {
        let changed = match self.state.lock() {
            Ok(mut s) if s.0 != state => {
                let old = s.0;
                *s = (state, Instant::now());
                Some(old)
            }
            _ => None,
        };
        if let Some(old) = changed {
            tracing::info!(daemon_set = %self.daemon_set, from = %old, to = %state, "kube-proxy state changed");
            self.changed.notify_one();
        }
    }
}

/// Applies DaemonSet watch events (field-selected to one name) to `kp`:
/// present after a complete list or an apply → installed; a complete list
/// without it or a delete → absent. Errors keep the last state (the watcher
/// resumes from its resource version, or relists) and are counted in `errors`.
pub async fn consume<E, S>(stream: S, kp: &KubeProxyWatch, errors: &Watched)
where
    E: std::fmt::Display,
    S: futures::Stream<Item = Result<Event<DaemonSet>, E>>,
{
    futures::pin_mut!(stream);
    let name = kp.daemon_set.daemon_set.clone();
    let mut listing: Option<bool> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => listing = Some(false),
            Ok(Event::InitApply(o)) => {
                if o.name_any() == name {
                    listing = Some(true);
                }
            }
            Ok(Event::InitDone) => {
                let found = listing.take().unwrap_or(false);
                kp.set(if found {
                    KubeProxyState::Installed
                } else {
                    KubeProxyState::Absent
                });
            }
            Ok(Event::Apply(o)) => {
                if o.name_any() == name {
                    kp.set(KubeProxyState::Installed);
                }
            }
            Ok(Event::Delete(o)) => {
                if o.name_any() == name {
                    kp.set(KubeProxyState::Absent);
                }
            }
            Err(e) => {
                errors
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, daemon_set = %kp.daemon_set, "watch error on kube-proxy's DaemonSet, retrying with backoff");
                if let Ok(mut l) = errors.last_error.lock() {
                    *l = format!("watch DaemonSet {}: {e}", kp.daemon_set);
                }
            }
        }
    }
}

/// Spawns the watcher of kube-proxy's DaemonSet (one namespace, field
/// selector `metadata.name=<daemonSet>`: needs get/list/watch daemonsets there).
pub fn spawn(
    client: Client,
    kp: Arc<KubeProxyWatch>,
    errors: Arc<Watched>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<DaemonSet> = Api::namespaced(client, &kp.daemon_set.namespace);
        let cfg = watcher::Config::default()
            .fields(&format!("metadata.name={}", kp.daemon_set.daemon_set));
        let stream = watcher::watcher(api, cfg).default_backoff();
        consume(stream, &kp, &errors).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Cleanup::{Active, Disabled, HeldBack, WaitingForReady};
    use KubeProxyState::{Absent, Installed, Unknown};

    #[test]
    fn cleanup_only_in_replace_mode_when_enabled_ready_and_kube_proxy_absent() {
        let states = [Unknown, Installed, Absent];
        for kp in states {
            for ready in [false, true] {
                for cleanup in [false, true] {
                    // Coexist never touches rules.
                    assert_eq!(decide(false, cleanup, ready, kp), Disabled);
                }
                // Replace without cleanupKubeProxyRules never touches rules.
                assert_eq!(decide(true, false, ready, kp), Disabled);
            }
        }
        // Installed or not yet known: held back, ready or not.
        for ready in [false, true] {
            assert_eq!(decide(true, true, ready, Installed), HeldBack);
            assert_eq!(decide(true, true, ready, Unknown), HeldBack);
        }
        assert_eq!(decide(true, true, false, Absent), WaitingForReady);
        assert_eq!(decide(true, true, true, Absent), Active);
        let cleaning: Vec<_> = states
            .iter()
            .flat_map(|&kp| {
                [false, true].into_iter().flat_map(move |r| {
                    [false, true]
                        .into_iter()
                        .flat_map(move |c| [false, true].into_iter().map(move |m| (m, c, r, kp)))
                })
            })
            .filter(|&(m, c, r, kp)| decide(m, c, r, kp).cleans())
            .collect();
        assert_eq!(cleaning, vec![(true, true, true, Absent)]);
    }

    #[test]
    fn fast_recheck_only_while_cleaning_right_after_kube_proxy_left() {
        let normal = Duration::from_secs(30);
        let s = Duration::from_secs;
        assert_eq!(recheck_interval(Active, Some(s(0)), normal), s(2));
        assert_eq!(recheck_interval(Active, Some(s(29)), normal), s(2));
        assert_eq!(recheck_interval(Active, Some(s(30)), normal), normal);
        assert_eq!(recheck_interval(Active, None, normal), normal);
        assert_eq!(recheck_interval(HeldBack, Some(s(1)), normal), normal);
        assert_eq!(
            recheck_interval(WaitingForReady, Some(s(1)), normal),
            normal
        );
        assert_eq!(recheck_interval(Disabled, Some(s(1)), normal), normal);
        // A shorter normal interval (tests) is never lengthened.
        assert_eq!(recheck_interval(Active, Some(s(1)), s(1)), s(1));
    }

    fn ds(name: &str) -> DaemonSet {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: kube-system}}"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn daemon_set_events_drive_the_state() {
        let kp = Arc::new(KubeProxyWatch::new(KubeProxyRef::default(), Unknown));
        let errs = Arc::new(Watched::default());
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Event<DaemonSet>, String>>();
        let task = {
            let (kp, errs) = (kp.clone(), errs.clone());
            tokio::spawn(async move { consume(rx, &kp, &errs).await })
        };
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        let send = |e| tx.unbounded_send(Ok(e)).unwrap();

        // Unknown until the first list is complete.
        send(Event::Init);
        send(Event::InitApply(ds("kube-proxy")));
        settle().await;
        assert_eq!(kp.get().0, Unknown);
        send(Event::InitDone);
        settle().await;
        assert_eq!(kp.get().0, Installed);
        assert_eq!(kp.absent_for(), None);
        let woken = || tokio::time::timeout(Duration::from_secs(2), kp.changed.notified());
        woken().await.unwrap();

        // Deleted → absent, and the node loop is woken.
        send(Event::Delete(ds("kube-proxy")));
        woken().await.unwrap();
        assert_eq!(kp.get().0, Absent);
        assert!(kp.absent_for().unwrap() < Duration::from_secs(2));

        // An error keeps the last state; another name changes nothing.
        tx.unbounded_send(Err("connection reset".into())).unwrap();
        send(Event::Apply(ds("something-else")));
        settle().await;
        assert_eq!(kp.get().0, Absent);
        assert_eq!(errs.errors.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(errs
            .last_error
            .lock()
            .unwrap()
            .contains("kube-system/kube-proxy"));

        // Re-created → installed; a relist without it → absent.
        send(Event::Apply(ds("kube-proxy")));
        settle().await;
        assert_eq!(kp.get().0, Installed);
        send(Event::Init);
        send(Event::InitDone);
        settle().await;
        assert_eq!(kp.get().0, Absent);
        drop(tx);
        task.await.unwrap();
    }
}
