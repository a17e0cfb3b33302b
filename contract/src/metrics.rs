//! The Prometheus metric families each binary exports, named once.
//!
//! The agent (`netboot-datapath`, `/metrics` on `metricsPort` and
//! `healthPort`) and the reconciler (`netboot reconcile --metrics-addr`) each
//! test that their exposition has exactly these families; the shipped
//! Grafana dashboard and alert rules (observability/) are tested to query
//! only series these families produce ([`series`]). A metric renamed in code
//! without this list, or a panel or alert over a name no binary exports,
//! fails a test instead of showing an empty panel or an alert that never fires.

/// A metric family's type, as in `# TYPE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `counter` (series name ends in `_total`).
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram` (`_bucket`, `_sum`, `_count` series).
    Histogram,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric family: the name in `# TYPE` and its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    /// The family's name as `# TYPE` has it.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
}

const fn family(name: &'static str, kind: Kind) -> Family {
    Family { name, kind }
}

/// The agent's families (`datapath/src/status.rs`, `datapath/src/latency.rs`).
pub const DATAPATH: &[Family] = &[
    family("netboot_datapath_ready", Kind::Gauge),
    family("netboot_datapath_kube_proxy_replacement", Kind::Gauge),
    family("netboot_datapath_services", Kind::Gauge),
    family("netboot_datapath_backends", Kind::Gauge),
    family("netboot_datapath_desired_services", Kind::Gauge),
    family("netboot_datapath_syncs_total", Kind::Counter),
    family("netboot_datapath_sync_errors_total", Kind::Counter),
    family("netboot_datapath_map_writes_total", Kind::Counter),
    family("netboot_datapath_watch_errors_total", Kind::Counter),
    family("netboot_datapath_last_sync_timestamp_seconds", Kind::Gauge),
    family("netboot_datapath_last_sync_duration_seconds", Kind::Gauge),
    family("netboot_datapath_kube_proxy_rules_present", Kind::Gauge),
    family("netboot_kube_proxy_installed", Kind::Gauge),
    family("netboot_datapath_kube_proxy_cleanup_held_back", Kind::Gauge),
    family("netboot_datapath_kube_proxy_cleanup_blocked", Kind::Gauge),
    family("netboot_datapath_map_full", Kind::Gauge),
    family("netboot_datapath_unprogrammed", Kind::Gauge),
    family("netboot_datapath_map_size_change_refused", Kind::Gauge),
    family("netboot_datapath_map_entries", Kind::Gauge),
    family("netboot_datapath_map_capacity", Kind::Gauge),
    family("netboot_datapath_lb_ingress_left", Kind::Gauge),
    family("netboot_datapath_unserved_services", Kind::Gauge),
    family("netboot_datapath_conntrack_entries", Kind::Gauge),
    family("netboot_datapath_conntrack_capacity", Kind::Gauge),
    family("netboot_datapath_pod_interfaces", Kind::Gauge),
    family(
        "netboot_datapath_conntrack_lapsed_deleted_total",
        Kind::Counter,
    ),
    family("netboot_datapath_bpf_outcomes_total", Kind::Counter),
    family("netboot_datapath_flow_events_total", Kind::Counter),
    family("netboot_datapath_flow_events_dropped_total", Kind::Counter),
    family("netboot_datapath_flow_watchers", Kind::Gauge),
    // Per-Service counters: series only with config.yaml `serviceMetrics`.
    family("netboot_datapath_service_connections_total", Kind::Counter),
    family("netboot_datapath_service_refused_total", Kind::Counter),
    family(
        "netboot_datapath_service_affinity_hits_total",
        Kind::Counter,
    ),
    family("netboot_datapath_service_tc_flows_total", Kind::Counter),
    family("netboot_datapath_service_tc_dropped_total", Kind::Counter),
    family(
        "netboot_datapath_network_programming_duration_seconds",
        Kind::Histogram,
    ),
    family("netboot_datapath_sync_duration_seconds", Kind::Histogram),
];

/// The reconciler's families (`bootstrapper/src/reconcile/metrics.rs`;
/// OpenMetrics names counters without `_total` in `# TYPE`).
pub const RECONCILER: &[Family] = &[
    family("netboot_reconcile_duration_seconds", Kind::Histogram),
    family("netboot_reconcile_results", Kind::Counter),
    family("netboot_drift_corrections", Kind::Counter),
    family("netboot_drifted_objects", Kind::Gauge),
    family("netboot_last_success_timestamp_seconds", Kind::Gauge),
    family("netboot_source", Kind::Gauge),
    family("netboot_source_fetch_failures", Kind::Counter),
];

/// Every series name a family produces, as PromQL queries them: a counter's
/// `_total` name, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own.
pub fn series(f: &Family) -> Vec<String> {
    match f.kind {
        Kind::Gauge => vec![f.name.to_string()],
        Kind::Counter if f.name.ends_with("_total") => vec![f.name.to_string()],
        Kind::Counter => vec![format!("{}_total", f.name)],
        Kind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{}{s}", f.name))
            .collect(),
    }
}

/// Every series name the agent and the reconciler export.
pub fn all_series() -> Vec<String> {
    let mut out: Vec<String> = DATAPATH.iter().chain(RECONCILER).flat_map(series).collect();
    out.sort();
    out
}

/// The `# TYPE` lines of a text exposition, as (family, type word), sorted;
/// what each side's test compares with its list.
pub fn exposed_families(exposition: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// A family list as [`exposed_families`] returns it.
pub fn families(list: &[Family]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|f| (f.name.to_string(), f.kind.as_str().to_string()))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_follow_the_exposition_conventions() {
        let h = family("x_seconds", Kind::Histogram);
        assert_eq!(
            series(&h),
            ["x_seconds_bucket", "x_seconds_sum", "x_seconds_count"]
        );
        assert_eq!(series(&family("a", Kind::Counter)), ["a_total"]);
        assert_eq!(series(&family("a_total", Kind::Counter)), ["a_total"]);
        assert_eq!(series(&family("g", Kind::Gauge)), ["g"]);
    }

    #[test]
    fn no_family_is_listed_twice() {
        let mut names = all_series();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn type_lines_are_read_from_an_exposition() {
        let text = "# HELP a x\n# TYPE a gauge\na 1\n# TYPE b_total counter\nb_total 2\n";
        assert_eq!(
            exposed_families(text),
            [
                ("a".to_string(), "gauge".to_string()),
                ("b_total".to_string(), "counter".to_string())
            ]
        );
    }
}
