//! How long a change takes to reach the maps: the SIG-scalability network
//! programming latency SLI (kube-proxy's
//! `kubeproxy_network_programming_duration_seconds`) and the duration of a
//! reconcile pass (kube-proxy's `kubeproxy_sync_proxy_rules_duration_seconds`),
//! as histograms in Prometheus' text exposition.
//!
//! A change's trigger time is read where the watchers see it
//! ([`slice_trigger`], [`service_trigger`]), travels with the dirty Service
//! through [`crate::watch::Dirty`] to [`crate::pass::Passes`], and is
//! observed once the pass that wrote it succeeded.

use std::fmt::Write as _;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;

/// The EndpointSlice annotation the EndpointSlice controller sets to when the
/// change it reflects was triggered (RFC 3339, the newest Pod or Service
/// change that went into the slice).
pub const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What triggered a measured change (the `trigger` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// An EndpointSlice's `last-change-trigger-time`: kube-proxy's definition.
    EndpointSlice,
    /// A Service's newest `managedFields` time: kube-proxy measures no
    /// Service changes; kept apart so the SLI stays comparable.
    Service,
}

impl Trigger {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::EndpointSlice => "endpointslice",
            Trigger::Service => "service",
        }
    }
}

/// A change to program, and when it was triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Triggered {
    /// Which kind of object changed.
    pub by: Trigger,
    /// When (the API side's clock).
    pub at: SystemTime,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    Timestamp::from_str(s).ok().map(SystemTime::from)
}

/// The slice's `last-change-trigger-time` (None without it or unparsable:
/// such a change is not measured, as in kube-proxy).
pub fn slice_trigger(s: &EndpointSlice) -> Option<Triggered> {
    slice_trigger_at(s.metadata.annotations.as_ref()?.get(TRIGGER_ANNOTATION)?)
}

/// A slice's trigger from its annotation's value (None: not a time).
pub fn slice_trigger_at(annotation: &str) -> Option<Triggered> {
    Some(Triggered {
        by: Trigger::EndpointSlice,
        at: parse_time(annotation)?,
    })
}

/// When the Service was last written: the newest `metadata.managedFields`
/// time (the API server stamps each write, to the second), else its
/// creation time; None without either.
pub fn service_trigger(s: &Service) -> Option<Triggered> {
    let newest = s
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.time.as_ref())
        .max()
        .or(s.metadata.creation_timestamp.as_ref())?;
    Some(service_trigger_at(newest.0))
}

/// A Service's trigger at its last write `newest` ([`service_trigger`]).
pub fn service_trigger_at(newest: Timestamp) -> Triggered {
    Triggered {
        by: Trigger::Service,
        at: SystemTime::from(newest),
    }
}

/// The latency of a change written at `done`: zero when the trigger time is
/// ahead of this node's clock (clock skew; kube-proxy observes the negative
/// value, which lands in the same lowest bucket).
pub fn since(t: SystemTime, done: SystemTime) -> Duration {
    done.duration_since(t).unwrap_or(Duration::ZERO)
}

/// A histogram's upper bounds (`le`), ascending.
pub trait Buckets {
    /// The bounds.
    const BOUNDS: &'static [Duration];
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn programming_bounds() -> [Duration; 88] {
    // Finer ones first (a BPF map write takes microseconds), then exactly
    // kube-proxy's: 0 (its merge() starts with a zero), 0.25 s, 0.5 s,
    // 1..59 s, 60..115 s by 5 s, 120..300 s by 30 s.
    let mut b = [Duration::ZERO; 88];
    let fine = [1, 2, 5, 10, 25, 50, 100];
    let mut i = 1; // b[0] = 0
    let mut j = 0;
    while j < fine.len() {
        b[i] = ms(fine[j]);
        i += 1;
        j += 1;
    }
    b[i] = ms(250);
    b[i + 1] = ms(500);
    i += 2;
    let mut s = 1;
    while s <= 59 {
        b[i] = Duration::from_secs(s);
        i += 1;
        s += 1;
    }
    let mut s = 60;
    while s <= 115 {
        b[i] = Duration::from_secs(s);
        i += 1;
        s += 5;
    }
    let mut s = 120;
    while s <= 300 {
        b[i] = Duration::from_secs(s);
        i += 1;
        s += 30;
    }
    b
}

const fn sync_bounds() -> [Duration; 18] {
    // 100, 250, 500 µs, then kube-proxy's: 1 ms doubling 15 times (16.384 s).
    let mut b = [Duration::ZERO; 18];
    b[0] = Duration::from_micros(100);
    b[1] = Duration::from_micros(250);
    b[2] = Duration::from_micros(500);
    let mut i = 0;
    while i < 15 {
        b[3 + i] = ms(1 << i);
        i += 1;
    }
    b
}

const PROGRAMMING: [Duration; 88] = programming_bounds();
const SYNC: [Duration; 18] = sync_bounds();

/// Buckets of the network programming latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgrammingBuckets;

impl Buckets for ProgrammingBuckets {
    const BOUNDS: &'static [Duration] = &PROGRAMMING;
}

/// Buckets of a reconcile pass's duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncBuckets;

impl Buckets for SyncBuckets {
    const BOUNDS: &'static [Duration] = &SYNC;
}

/// A Prometheus histogram over durations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram<B> {
    /// Observations per bucket (not cumulative); one more than the bounds
    /// (+Inf). Empty until the first observation.
    counts: Vec<u64>,
    /// Sum of the observations.
    sum: Duration,
    _b: PhantomData<B>,
}

impl<B: Buckets> Histogram<B> {
    /// Counts one observation.
    pub fn observe(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; B::BOUNDS.len() + 1];
        }
        let i = B::BOUNDS.partition_point(|b| *b < d);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum = self.sum.saturating_add(d);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `_bucket`, `_sum` and `_count` lines of one series (`labels`
    /// without braces, e.g. `trigger="service"`; empty for none).
    pub fn write_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in B::BOUNDS.iter().enumerate() {
            cum += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cum}",
                b.as_secs_f64()
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count()
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum.as_secs_f64());
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }
}

/// The network programming latency, one series per [`Trigger`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programming {
    /// `trigger="endpointslice"`: kube-proxy's SLI.
    pub endpoint_slice: Histogram<ProgrammingBuckets>,
    /// `trigger="service"`.
    pub service: Histogram<ProgrammingBuckets>,
}

impl Programming {
    /// Counts the changes `programmed` (written at `done`).
    pub fn observe(&mut self, programmed: &[Triggered], done: SystemTime) {
        for t in programmed {
            let h = match t.by {
                Trigger::EndpointSlice => &mut self.endpoint_slice,
                Trigger::Service => &mut self.service,
            };
            h.observe(since(t.at, done));
        }
    }
}

/// The metric name of the programming latency.
pub const PROGRAMMING_METRIC: &str = "netboot_datapath_network_programming_duration_seconds";
/// The metric name of a pass's duration.
pub const SYNC_METRIC: &str = "netboot_datapath_sync_duration_seconds";

/// The exposition of both histograms.
pub fn write_metrics(out: &mut String, programming: &Programming, sync: &Histogram<SyncBuckets>) {
    let _ = writeln!(
        out,
        "# HELP {PROGRAMMING_METRIC} From a change's trigger time (EndpointSlice last-change-trigger-time, or the Service's last write) to the end of the map writes that programmed it (kube-proxy: network_programming_duration_seconds)\n# TYPE {PROGRAMMING_METRIC} histogram"
    );
    for (t, h) in [
        (Trigger::EndpointSlice, &programming.endpoint_slice),
        (Trigger::Service, &programming.service),
    ] {
        h.write_series(
            out,
            PROGRAMMING_METRIC,
            &format!("trigger=\"{}\"", t.label()),
        );
    }
    let _ = writeln!(
        out,
        "# HELP {SYNC_METRIC} Duration of a full or partial reconcile pass, failed ones included (kube-proxy: sync_proxy_rules_duration_seconds)\n# TYPE {SYNC_METRIC} histogram"
    );
    sync.write_series(out, SYNC_METRIC, "");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms)
    }

    #[test]
    fn programming_buckets_are_kube_proxys_plus_finer_ones() {
        let secs: Vec<f64> = PROGRAMMING.iter().map(|d| d.as_secs_f64()).collect();
        // kube-proxy's merge(): 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
        let mut kube_proxy = vec![0.0, 0.25, 0.5];
        kube_proxy.extend((1..=59).map(f64::from));
        kube_proxy.extend((60..=115).step_by(5).map(f64::from));
        kube_proxy.extend((120..=300).step_by(30).map(f64::from));
        assert_eq!(kube_proxy.len(), 2 + 1 + 59 + 12 + 7);
        let fine = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1];
        let rest: Vec<f64> = secs.iter().copied().filter(|s| !fine.contains(s)).collect();
        assert_eq!(rest, kube_proxy);
        assert!(secs.windows(2).all(|w| w[0] < w[1]), "ascending: {secs:?}");
        // kube-proxy's sync buckets: 1 ms doubling 15 times.
        let sync: Vec<f64> = SYNC[3..].iter().map(|d| d.as_secs_f64()).collect();
        assert_eq!(sync.len(), 15);
        assert_eq!((sync[0], sync[14]), (0.001, 16.384));
        assert!(SYNC.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn trigger_times_come_from_the_slice_annotation_and_the_services_last_write() {
        let slice: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: a-1, namespace: d, annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-12-01T10:00:00.250Z'}}\naddressType: IPv4\nendpoints: []",
        )
        .unwrap();
        let t = slice_trigger(&slice).unwrap();
        assert_eq!(t.by, Trigger::EndpointSlice);
        assert_eq!(
            t.at,
            SystemTime::from(Timestamp::from_str("2026-12-01T10:00:00.25Z").unwrap())
        );
        // No annotation, or a broken one: not measured.
        let bare: EndpointSlice =
            serde_yaml::from_str("metadata: {name: a-2}\naddressType: IPv4\nendpoints: []")
                .unwrap();
        assert_eq!(slice_trigger(&bare), None);
        let broken: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: a-3, annotations: {endpoints.kubernetes.io/last-change-trigger-time: yesterday}}\naddressType: IPv4\nendpoints: []",
        )
        .unwrap();
        assert_eq!(slice_trigger(&broken), None);

        // A Service: its newest managedFields time, else its creation time.
        let svc: Service = serde_yaml::from_str(
            "metadata:\n  name: a\n  creationTimestamp: '2026-12-01T09:00:00Z'\n  managedFields:\n  - {manager: kubectl, operation: Update, time: '2026-12-01T10:00:05Z'}\n  - {manager: kubectl, operation: Update, time: '2026-12-01T10:00:01Z'}\n",
        )
        .unwrap();
        let t = service_trigger(&svc).unwrap();
        assert_eq!(
            (t.by, t.at),
            (
                Trigger::Service,
                SystemTime::from(Timestamp::from_str("2026-12-01T10:00:05Z").unwrap())
            )
        );
        let created: Service =
            serde_yaml::from_str("metadata: {name: a, creationTimestamp: '2026-12-01T09:00:00Z'}")
                .unwrap();
        assert_eq!(
            service_trigger(&created).map(|t| t.at),
            Some(SystemTime::from(
                Timestamp::from_str("2026-12-01T09:00:00Z").unwrap()
            ))
        );
        let none: Service = serde_yaml::from_str("metadata: {name: a}").unwrap();
        assert_eq!(service_trigger(&none), None);
    }

    #[test]
    fn each_change_is_observed_from_its_trigger_to_the_write() {
        let mut p = Programming::default();
        let slice = |ms| Triggered {
            by: Trigger::EndpointSlice,
            at: at(100, ms),
        };
        // Written at 100.400: 400 ms, 20 ms; the Service's 1.4 s; a trigger
        // ahead of our clock counts as 0.
        p.observe(
            &[
                slice(0),
                slice(380),
                Triggered {
                    by: Trigger::Service,
                    at: at(99, 0),
                },
                slice(900),
            ],
            at(100, 400),
        );
        assert_eq!((p.endpoint_slice.count(), p.service.count()), (3, 1));
        let mut out = String::new();
        write_metrics(&mut out, &p, &Histogram::default());
        let line = |s: &str| {
            assert!(out.lines().any(|l| l == s), "missing {s:?} in\n{out}");
        };
        let m = PROGRAMMING_METRIC;
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"0\"}} 1"
        ));
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"0.01\"}} 1"
        ));
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"0.025\"}} 2"
        ));
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"0.25\"}} 2"
        ));
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"0.5\"}} 3"
        ));
        line(&format!(
            "{m}_bucket{{trigger=\"endpointslice\",le=\"+Inf\"}} 3"
        ));
        line(&format!("{m}_sum{{trigger=\"endpointslice\"}} 0.42"));
        line(&format!("{m}_count{{trigger=\"endpointslice\"}} 3"));
        line(&format!("{m}_bucket{{trigger=\"service\",le=\"1\"}} 0"));
        line(&format!("{m}_bucket{{trigger=\"service\",le=\"2\"}} 1"));
        line(&format!("{m}_bucket{{trigger=\"service\",le=\"300\"}} 1"));
        line(&format!("{SYNC_METRIC}_bucket{{le=\"0.0001\"}} 0"));
        line(&format!("{SYNC_METRIC}_bucket{{le=\"16.384\"}} 0"));
        line(&format!("{SYNC_METRIC}_count 0"));
    }

    #[test]
    fn a_bound_is_inclusive_and_beyond_the_last_is_inf() {
        let mut h: Histogram<SyncBuckets> = Histogram::default();
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.write_series(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 0\nx_bucket{le=\"0.001\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"16.384\"} 1\nx_bucket{le=\"+Inf\"} 2\n"));
        assert!(out.contains("x_sum 60.001\nx_count 2\n"));
    }
}
