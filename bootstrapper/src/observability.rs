//! What `spec.observability` renders: the Grafana dashboard (a ConfigMap the
//! Grafana sidecar picks up by its `grafana_dashboard: "1"` label) and the
//! alert rules (a Prometheus Operator `PrometheusRule`), both from the files
//! under observability/ at the repository root, which also ship as they are
//! for clusters that install them by hand.
//!
//! The tests here are the dashboard's and the rules' lint: valid JSON, a
//! schema version, unique panel ids, and every metric any query names is one
//! the agent or the reconciler exports (`netboot_contract::metrics`).
//! `promtool check rules` and `promtool test rules` run in tests/e2e/lint.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The Grafana dashboard (JSON model).
pub const DASHBOARD_JSON: &str = include_str!("../../observability/netboot-dashboard.json");
/// The alert rules, as Prometheus's `rule_files` read them.
pub const ALERT_RULES_YAML: &str = include_str!("../../observability/netboot-alerts.rules.yaml");
/// The same rules as a PrometheusRule, for `kubectl apply` by hand.
pub const PROMETHEUS_RULE_YAML: &str =
    include_str!("../../observability/netboot-prometheusrule.yaml");

/// The PrometheusRule kind's API group and version.
pub const PROMETHEUS_RULE_GROUP: &str = "monitoring.coreos.com";
/// The version netboot renders.
pub const PROMETHEUS_RULE_VERSION: &str = "v1";
/// Its plural resource name (discovery, RBAC).
pub const PROMETHEUS_RULE_PLURAL: &str = "prometheusrules";

/// The dashboard's ConfigMap and the PrometheusRule are named so.
pub const OBJECT_NAME: &str = "netboot";
/// The key of the dashboard in its ConfigMap.
pub const DASHBOARD_KEY: &str = "netboot.json";

#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    #[error("observability/netboot-alerts.rules.yaml: {0}")]
    Rules(#[source] serde_yaml::Error),
    #[error("observability/netboot-alerts.rules.yaml: {0}")]
    RulesJson(#[source] serde_json::Error),
}

/// A rules file: `groups:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<RuleGroup>,
}

/// One rule group, with the fields both Prometheus and the PrometheusRule
/// CRD know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleGroup {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_offset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_response_strategy: Option<String>,
    pub rules: Vec<Rule>,
}

/// An alerting or recording rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    pub expr: String,
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_firing_for: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The schema a rendered PrometheusRule is checked against (there is no
/// k8s-openapi type for a CRD): a field it does not know is an error, as for
/// every other kind netboot renders.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRule {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: PrometheusRuleSpec,
}

/// `spec` of a PrometheusRule.
#[derive(Debug, Clone, Deserialize)]
pub struct PrometheusRuleSpec {
    pub groups: Vec<RuleGroup>,
}

impl k8s_openapi::Resource for PrometheusRule {
    const API_VERSION: &'static str = "monitoring.coreos.com/v1";
    const GROUP: &'static str = PROMETHEUS_RULE_GROUP;
    const KIND: &'static str = "PrometheusRule";
    const VERSION: &'static str = PROMETHEUS_RULE_VERSION;
    const URL_PATH_SEGMENT: &'static str = PROMETHEUS_RULE_PLURAL;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

/// The shipped rule groups.
pub fn rule_file() -> Result<RuleFile, ObservabilityError> {
    serde_yaml::from_str(ALERT_RULES_YAML).map_err(ObservabilityError::Rules)
}

/// What templates see as `observability`: the spec's two switches, the
/// dashboard as one string and the rule groups as a value (written with the
/// `json` helper).
pub fn template_value(dashboards: bool, alerts: bool) -> Result<Value, ObservabilityError> {
    let groups =
        serde_json::to_value(rule_file()?.groups).map_err(ObservabilityError::RulesJson)?;
    Ok(serde_json::json!({
        "dashboards": dashboards,
        "alerts": alerts,
        "dashboardJson": DASHBOARD_JSON,
        "dashboardKey": DASHBOARD_KEY,
        "name": OBJECT_NAME,
        "ruleGroups": groups,
    }))
}

/// The metric names a PromQL expression selects, in order of appearance
/// (duplicates kept): identifiers that are not functions, aggregation
/// keywords, label lists (`by (…)`, `on (…)`), label matchers, strings,
/// ranges, durations or Grafana variables.
pub fn promql_metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
        "start",
        "end",
        // Aggregations, which may be followed by `by (…)` before their `(`.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    // Skips from an opening delimiter to its closing one, over strings.
    let skip_to = |mut i: usize, close: char| -> usize {
        while i < c.len() && c[i] != close {
            if c[i] == '"' || c[i] == '\'' || c[i] == '`' {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_to(i + 1, ch);
        } else if ch == '{' {
            i = skip_to(i + 1, '}');
        } else if ch == '[' {
            i = skip_to(i + 1, ']');
        } else if ch == '$' {
            i += 1;
            while i < c.len() && (ident_char(c[i]) || c[i] == '{' || c[i] == '}') {
                i += 1;
            }
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let lower = word.to_ascii_lowercase();
            let call = j < c.len() && c[j] == '(';
            if call && LABEL_LISTS.contains(&lower.as_str()) {
                i = skip_to(j + 1, ')');
            } else if call || KEYWORDS.contains(&lower.as_str()) {
                // A function or an aggregation.
            } else {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn dashboard() -> Value {
        serde_json::from_str(DASHBOARD_JSON).unwrap()
    }

    /// Every panel, rows' nested panels included.
    fn panels(d: &Value) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            out.push(p);
            if let Some(nested) = p["panels"].as_array() {
                out.extend(nested);
            }
        }
        out
    }

    fn exported() -> BTreeSet<String> {
        netboot_contract::metrics::all_series()
            .into_iter()
            .collect()
    }

    #[test]
    fn promql_names_are_found_and_the_rest_is_not() {
        assert_eq!(
            promql_metric_names(
                r#"histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{trigger="x",le=~"1|on"}[$__rate_interval]))) > 5"#
            ),
            ["a_bucket"]
        );
        assert_eq!(
            promql_metric_names(
                "sum by (cluster) (increase(r_total{o=~\"f\"}[2h])) > 0\nunless sum without (x) (b) > 0 and on(instance) c offset 5m"
            ),
            ["r_total", "b", "c"]
        );
        assert_eq!(promql_metric_names("time() - ts > 7200"), ["ts"]);
        assert_eq!(promql_metric_names("a / b > 0.85"), ["a", "b"]);
        assert_eq!(promql_metric_names("x == bool 1 or vector(0)"), ["x"]);
        assert_eq!(promql_metric_names("1e3 + Inf"), Vec::<String>::new());
    }

    #[test]
    fn the_dashboard_is_a_grafana_dashboard_with_unique_panel_ids() {
        let d = dashboard();
        let schema = d["schemaVersion"].as_u64().unwrap();
        assert!(schema >= 36, "schemaVersion {schema}");
        assert_eq!(d["uid"], "netboot");
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let id = p["id"].as_u64().unwrap();
            assert!(ids.insert(id), "panel id {id} twice");
            let grid = &p["gridPos"];
            for k in ["h", "w", "x", "y"] {
                assert!(grid[k].is_u64(), "panel {id}: gridPos.{k}");
            }
            assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24);
            assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
            if p["type"] != "row" {
                let targets = p["targets"].as_array().unwrap();
                assert!(!targets.is_empty(), "panel {id} has no query");
            }
        }
        assert!(ids.len() >= 20, "{} panels", ids.len());
    }

    #[test]
    fn every_dashboard_query_names_only_exported_metrics() {
        let d = dashboard();
        let exported = exported();
        let mut used = BTreeSet::new();
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap();
                let names = promql_metric_names(expr);
                assert!(!names.is_empty(), "panel {}: {expr}", p["id"]);
                for n in names {
                    assert!(
                        exported.contains(&n),
                        "panel {} `{}`: {n} is exported by no binary",
                        p["id"],
                        p["title"]
                    );
                    used.insert(n);
                }
            }
        }
        // Template variables: `label_values(metric, label)`.
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q.strip_prefix("label_values(").unwrap();
            let metric = inner.split(',').next().unwrap().trim();
            assert!(
                exported.contains(metric),
                "variable {}: {metric}",
                v["name"]
            );
        }
        // What the issue asks the dashboard to show.
        for want in [
            "netboot_datapath_network_programming_duration_seconds_bucket",
            "netboot_datapath_syncs_total",
            "netboot_datapath_map_entries",
            "netboot_datapath_map_capacity",
            "netboot_datapath_bpf_outcomes_total",
            "netboot_datapath_unserved_services",
            "netboot_drifted_objects",
            "netboot_reconcile_results_total",
            "netboot_datapath_kube_proxy_replacement",
            "netboot_datapath_ready",
        ] {
            assert!(used.contains(want), "no panel shows {want}");
        }
    }

    #[test]
    fn every_alert_names_exported_metrics_and_carries_its_runbook() {
        let troubleshooting = include_str!("../../docs/troubleshooting.md");
        let exported = exported();
        let file = rule_file().unwrap();
        let mut alerts = BTreeSet::new();
        for g in &file.groups {
            for r in &g.rules {
                let name = r.alert.as_deref().unwrap();
                assert!(alerts.insert(name.to_string()), "{name} twice");
                let names = promql_metric_names(&r.expr);
                assert!(!names.is_empty(), "{name}");
                for n in names {
                    assert!(
                        exported.contains(&n),
                        "{name}: {n} is exported by no binary"
                    );
                }
                assert!(r.for_.is_some(), "{name}: no `for:`");
                let sev = r.labels.get("severity").map(String::as_str);
                assert!(
                    matches!(sev, Some("critical" | "warning" | "info")),
                    "{name}: {sev:?}"
                );
                for k in ["summary", "description", "runbook_url"] {
                    assert!(
                        r.annotations.get(k).is_some_and(|v| !v.is_empty()),
                        "{name}: {k}"
                    );
                }
                let anchor = name.to_ascii_lowercase();
                assert_eq!(
                    r.annotations["runbook_url"],
                    format!("docs/troubleshooting.md#{anchor}"),
                    "{name}"
                );
                assert!(
                    troubleshooting.contains(&format!("\n### {name}\n")),
                    "docs/troubleshooting.md has no section `### {name}`"
                );
            }
        }
        for want in [
            "NetbootAgentNotReady",
            "NetbootAgentSyncErrors",
            "NetbootBpfMapFull",
            "NetbootBpfMapNearlyFull",
            "NetbootNetworkProgrammingLatencyHigh",
            "NetbootReconcileFailing",
            "NetbootDriftDetected",
            "NetbootKubeProxyReplacementOff",
        ] {
            assert!(alerts.contains(want), "{want} missing");
        }
    }

    /// observability/netboot-prometheusrule.yaml is the rules file's groups in
    /// a PrometheusRule, byte for byte in meaning: edit one, edit both.
    #[test]
    fn the_shipped_prometheusrule_has_the_rules_files_groups() {
        let pr: PrometheusRule = serde_yaml::from_str(PROMETHEUS_RULE_YAML).unwrap();
        assert_eq!(pr.api_version, "monitoring.coreos.com/v1");
        assert_eq!(pr.kind, "PrometheusRule");
        assert_eq!(pr.metadata.name.as_deref(), Some(OBJECT_NAME));
        assert_eq!(pr.spec.groups, rule_file().unwrap().groups);
    }
}
