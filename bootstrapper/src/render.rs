//! Rendering: spec → handlebars templates → checked Kubernetes objects.
//!
//! Templates are embedded in the binary (templates/ at the repository root) and
//! can be overridden file by file with a directory. Handlebars runs in strict
//! mode, so a missing variable is an error naming the template and line. Every
//! value reaches the YAML through a quoting helper (`q`, `qs`), `concat` or
//! the escape function, which all write [`quote`]: a double-quoted string on
//! one line in which every YAML line break (including U+0085, U+2028 and
//! U+2029) and every control character is a `\uXXXX` escape, so no value can
//! end a line, a block scalar or a document. Each rendered document is parsed
//! back strictly (a duplicate key or a field unknown to the kind's schema is
//! an error), checked as a Kubernetes object, labelled and hashed before it
//! leaves.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
    ScopedJson,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, ManifestError};
use crate::spec::grammar::{self, GrammarError};
use crate::spec::{ApiServer, ClusterNetwork};

/// The embedded templates, in rendering order.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "namespace.yaml.hbs",
        include_str!("../../templates/namespace.yaml.hbs"),
    ),
    (
        "agent-rbac.yaml.hbs",
        include_str!("../../templates/agent-rbac.yaml.hbs"),
    ),
    (
        "agent-configmap.yaml.hbs",
        include_str!("../../templates/agent-configmap.yaml.hbs"),
    ),
    (
        "agent-daemonset.yaml.hbs",
        include_str!("../../templates/agent-daemonset.yaml.hbs"),
    ),
    (
        "reconciler.yaml.hbs",
        include_str!("../../templates/reconciler.yaml.hbs"),
    ),
    (
        "observability.yaml.hbs",
        include_str!("../../templates/observability.yaml.hbs"),
    ),
];

pub const TEMPLATE_SUFFIX: &str = ".yaml.hbs";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{dir}: cannot read template directory: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read template: {source}")]
    ReadTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{template}: {message}")]
    Template { template: String, message: String },
    #[error(
        "{spec}: spec.apiServer is empty; netboot detects it at apply time — pass --api-server HOST:PORT to render offline"
    )]
    NoApiServer { spec: String },
    #[error("{spec}: API server host: {source}")]
    ApiServerHost {
        spec: String,
        #[source]
        source: GrammarError,
    },
    #[error("{template}: document {index}: {source}")]
    Manifest {
        template: String,
        index: usize,
        #[source]
        source: ManifestError,
    },
    #[error("{template}: {object}: the agent would refuse this config: {source}")]
    AgentConfig {
        template: String,
        object: String,
        #[source]
        source: netboot_contract::config::ConfigError,
    },
    #[error("{spec}: spec.observability: {source}")]
    Observability {
        spec: String,
        #[source]
        source: crate::observability::ObservabilityError,
    },
    #[error("{first} and {second} both render {object}")]
    Duplicate {
        object: String,
        first: String,
        second: String,
    },
}

/// Options for [`render`]. `Default` renders the embedded templates.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// A directory whose `*.yaml.hbs` files replace embedded templates of the
    /// same name and add new ones.
    pub templates: Option<PathBuf>,
    /// The API endpoint to render when the spec leaves it empty (detected at apply time).
    pub api_server: Option<ApiServer>,
}

/// How long the reconciler's lock wait (`--lock-timeout`'s default).
pub const RECONCILE_LOCK_WAIT_SECONDS: u64 = 120;

/// The reconciler Job's deadline: the worst case of one pass with margin —
/// the lock wait, the agents' rollout, the handover's three node gates,
/// validation, and a rollback (kube-proxy serving again, agents rolled out
/// to coexist), plus ten minutes. A Job killed by its deadline mid-handover
/// is resumed by the next one (the journal), but should not happen by design.
pub fn reconcile_deadline_seconds(spec: &ClusterNetwork) -> u64 {
    let rollout = u64::from(spec.validation.rollout_timeout_seconds);
    let validation = u64::from(spec.validation.timeout_seconds);
    RECONCILE_LOCK_WAIT_SECONDS + 6 * rollout + validation + 600
}

/// The reconciler pod's termination grace: long enough to finish the longest
/// single handover step (a gate or validation) after SIGTERM, plus a minute.
pub fn reconcile_grace_seconds(spec: &ClusterNetwork) -> u64 {
    let rollout = u64::from(spec.validation.rollout_timeout_seconds);
    let validation = u64::from(spec.validation.timeout_seconds);
    rollout.max(validation) + 60
}

/// The template set: embedded ones plus overrides, sorted by name with the
/// embedded order kept for embedded names.
pub fn load_templates(dir: Option<&Path>) -> Result<Vec<(String, String)>, RenderError> {
    let mut templates: Vec<(String, String)> = EMBEDDED
        .iter()
        .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
        .collect();
    let Some(dir) = dir else { return Ok(templates) };
    let entries = std::fs::read_dir(dir).map_err(|source| RenderError::ReadDir {
        dir: dir.into(),
        source,
    })?;
    let mut extra = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RenderError::ReadDir {
            dir: dir.into(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.ends_with(TEMPLATE_SUFFIX) {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path)
            .map_err(|source| RenderError::ReadTemplate { path, source })?;
        match templates.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = text,
            None => extra.push((name, text)),
        }
    }
    extra.sort();
    templates.extend(extra);
    Ok(templates)
}

/// The values templates see. Documented in README.md ("Overriding templates").
/// `observability` is [`crate::observability::template_value`]'s.
pub fn template_data(spec: &ClusterNetwork, api: &ApiServer, observability: Value) -> Value {
    let d = &spec.datapath;
    let config = json!({
        "apiServer": {"host": api.host, "port": api.port},
        "datapath": d,
        "kubeProxy": {"cleanupRules": spec.kube_proxy.cleanup_rules, "namespace": spec.kube_proxy.namespace, "daemonSet": spec.kube_proxy.daemon_set},
    });
    let config_hash = format!(
        "sha256:{}",
        hex(&Sha256::digest(config.to_string().as_bytes()))
    );
    let memory = netboot_contract::memory::AgentMemory::for_config(
        d.map_sizes,
        d.load_balancing.algorithm == netboot_contract::config::Algorithm::Maglev,
    );
    let reconcile = spec.reconcile.as_ref().map(|r| {
        json!({
            "repo": r.repo,
            "ref": r.git_ref,
            "path": r.path,
            "schedule": r.schedule,
            "suspend": r.suspend,
            "image": r.image,
            "secretName": r.secret_name.clone().unwrap_or_else(|| "netboot-git".into()),
            "activeDeadlineSeconds": reconcile_deadline_seconds(spec),
            "terminationGracePeriodSeconds": reconcile_grace_seconds(spec),
        })
    });
    json!({
        "cluster": spec.name,
        "namespace": spec.namespace,
        "apiServer": {"host": api.host, "port": api.port},
        "datapath": {
            "image": d.image,
            "version": d.version,
            "imageRef": format!("{}:{}", d.image, d.version),
            "kubeProxyReplacement": d.kube_proxy_replacement,
            "sessionAffinityTimeoutSeconds": d.session_affinity_timeout_seconds,
            "mapSizes": d.map_sizes,
            "healthPort": d.health_port,
            "metricsPort": d.metrics_port,
            "loadBalancing": d.load_balancing,
            "conntrack": d.conntrack,
            "socketLB": d.socket_lb,
            "serviceMetrics": d.service_metrics,
            // Sized from mapSizes: netboot_contract::memory (docs/contracts.md).
            "memoryRequest": format!("{}Mi", memory.request_mib()),
            "memoryLimit": format!("{}Mi", memory.limit_mib()),
        },
        "kubeProxy": {
            "remove": spec.kube_proxy.remove,
            "cleanupRules": spec.kube_proxy.cleanup_rules,
            "namespace": spec.kube_proxy.namespace,
            "daemonSet": spec.kube_proxy.daemon_set,
            "configMap": spec.kube_proxy.config_map,
        },
        "configHash": config_hash,
        "reconcile": reconcile,
        "observability": observability,
    })
}

/// Renders the spec into checked, labelled, hashed objects in apply order.
pub fn render(
    spec: &ClusterNetwork,
    spec_file: &str,
    opts: &RenderOptions,
) -> Result<Vec<Manifest>, RenderError> {
    let api = spec
        .api_server
        .clone()
        .or_else(|| opts.api_server.clone())
        .ok_or_else(|| RenderError::NoApiServer {
            spec: spec_file.to_string(),
        })?;
    // The endpoint may come from a flag or the cluster rather than a checked spec.
    grammar::host(&api.host).map_err(|source| RenderError::ApiServerHost {
        spec: spec_file.to_string(),
        source,
    })?;
    let templates = load_templates(opts.templates.as_deref())?;
    let hb = engine(&templates)?;
    let o = spec.observability;
    let observability =
        crate::observability::template_value(o.dashboards, o.alerts).map_err(|source| {
            RenderError::Observability {
                spec: spec_file.to_string(),
                source,
            }
        })?;
    let data = template_data(spec, &api, observability);
    let mut manifests: Vec<Manifest> = Vec::new();
    for (name, _) in &templates {
        let text = hb
            .render(name, &data)
            .map_err(|e| template_error(name, &e))?;
        for (index, doc) in split_documents(&text).into_iter().enumerate() {
            let m = Manifest::from_rendered(doc, name, &spec.name).map_err(|source| {
                RenderError::Manifest {
                    template: name.clone(),
                    index: index + 1,
                    source,
                }
            })?;
            if let Some(prev) = manifests.iter().find(|p| p.id() == m.id()) {
                return Err(RenderError::Duplicate {
                    object: m.id().to_string(),
                    first: prev.template.clone(),
                    second: name.clone(),
                });
            }
            manifests.push(m);
        }
    }
    manifests.sort_by(|a, b| a.id().cmp(b.id()));
    check_agent_config(&manifests, &spec.namespace)?;
    Ok(manifests)
}

/// The agent's `config.yaml` as rendered, read by the agent's own parser
/// (the contract's [`Config::parse`](netboot_contract::config::Config::parse)):
/// a template that writes a key the agent does not know, or a value it
/// refuses, fails here rather than in a crash-looping DaemonSet.
pub fn agent_config(
    manifests: &[Manifest],
    namespace: &str,
) -> Option<Result<netboot_contract::config::Config, RenderError>> {
    use netboot_contract::{agent, config::Config};
    let m = manifests.iter().find(|m| {
        let id = m.id();
        id.kind == "ConfigMap"
            && id.name == agent::CONFIG_MAP
            && id.namespace.as_deref() == Some(namespace)
    })?;
    let text = m.object["data"][agent::CONFIG_KEY]
        .as_str()
        .unwrap_or_default();
    Some(
        Config::parse(text, Path::new(agent::CONFIG_KEY)).map_err(|source| {
            RenderError::AgentConfig {
                template: m.template.clone(),
                object: m.id().to_string(),
                source,
            }
        }),
    )
}

fn check_agent_config(manifests: &[Manifest], namespace: &str) -> Result<(), RenderError> {
    agent_config(manifests, namespace).transpose().map(|_| ())
}

fn engine(templates: &[(String, String)]) -> Result<Handlebars<'static>, RenderError> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.set_dev_mode(false);
    // A bare `{{value}}` is quoted too: nothing reaches the YAML unquoted.
    hb.register_escape_fn(quote);
    hb.register_helper("q", Box::new(quote_helper));
    hb.register_helper("qs", Box::new(quote_string_helper));
    hb.register_helper("concat", Box::new(Concat));
    hb.register_helper("cel", Box::new(Cel));
    hb.register_helper("json", Box::new(json_helper));
    for (name, text) in templates {
        hb.register_template_string(name, text)
            .map_err(|e| RenderError::Template {
                template: name.clone(),
                message: e.to_string(),
            })?;
    }
    Ok(hb)
}

fn template_error(name: &str, e: &handlebars::RenderError) -> RenderError {
    let at = match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        _ => String::new(),
    };
    let reason = match e.reason() {
        RenderErrorReason::MissingVariable(Some(var)) => {
            format!("variable `{var}` is not defined (strict mode)")
        }
        other => other.to_string(),
    };
    RenderError::Template {
        template: e.template_name.clone().unwrap_or_else(|| name.to_string()),
        message: format!("{at}{reason}"),
    }
}

/// The helper's only parameter; a missing variable is an error even inside a
/// helper call (handlebars' strict mode passes it through as null).
fn param(h: &Helper, helper: &'static str) -> Result<Value, RenderErrorReason> {
    let p = h
        .param(0)
        .ok_or(RenderErrorReason::ParamNotFoundForIndex(helper, 0))?;
    if p.is_value_missing() {
        return Err(RenderErrorReason::MissingVariable(
            p.relative_path().cloned(),
        ));
    }
    Ok(p.value().clone())
}

/// `s` as a double-quoted string that JSON and YAML read back byte for byte,
/// on one line whatever it holds: `"` and `\` are escaped, and so, as
/// `\uXXXX`, is every character a YAML parser treats as a line break (LF, CR,
/// NEL U+0085, U+2028, U+2029) or refuses in a stream (C0 and C1 controls,
/// DEL, U+FEFF, U+FFFE, U+FFFF). Everything else is written as it is.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if needs_unicode_escape(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Characters [`quote`] writes as `\uXXXX` (all in the Basic Multilingual
/// Plane, so one escape each).
fn needs_unicode_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
        )
}

/// A scalar as a template writes it: strings [`quote`]d, numbers and booleans
/// as JSON has them.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        other => other.to_string(),
    }
}

/// `{{q value}}`: the value as a JSON scalar (strings quoted, numbers and
/// booleans as they are). JSON is YAML, and a quoted string cannot break out.
fn quote_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let v = param(h, "q")?;
    match v {
        Value::Array(_) | Value::Object(_) => {
            Err(RenderErrorReason::InvalidParamType("a scalar for q").into())
        }
        other => Ok(out.write(&scalar(&other))?),
    }
}

/// `{{qs value}}`: the value as a quoted string, whatever its type.
fn quote_string_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let v = param(h, "qs")?;
    let s = match v {
        Value::String(s) => s,
        Value::Array(_) | Value::Object(_) => {
            return Err(RenderErrorReason::InvalidParamType("a scalar for qs").into())
        }
        other => other.to_string(),
    };
    Ok(out.write(&quote(&s))?)
}

/// `{{json value}}`: any value, arrays and objects too, as JSON on one line
/// (YAML's flow style) with every string and key written by [`quote`]: a
/// structure such as the alert rule groups reaches the YAML whole, and no
/// string in it can end a line or the document.
fn json_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let v = param(h, "json")?;
    Ok(out.write(&flow_json(&v))?)
}

/// `v` as one-line JSON whose strings are [`quote`]d.
pub fn flow_json(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(flow_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", quote(k), flow_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => scalar(other),
    }
}

/// `(concat a b …)`: the parameters joined as one string value. Used alone
/// (`{{concat a b}}`) it goes through the escape function, so it is quoted
/// like any other value.
struct Concat;

impl HelperDef for Concat {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let mut s = String::new();
        for p in h.params() {
            if p.is_value_missing() {
                return Err(RenderErrorReason::MissingVariable(p.relative_path().cloned()).into());
            }
            match p.value() {
                Value::String(v) => s.push_str(v),
                Value::Number(n) => s.push_str(&n.to_string()),
                Value::Bool(b) => s.push_str(&b.to_string()),
                _ => return Err(RenderErrorReason::InvalidParamType("scalars for concat").into()),
            }
        }
        Ok(ScopedJson::Derived(Value::String(s)))
    }
}

/// `(cel value)`: the value as a CEL string literal (`'…'`, with `\\`, `'`
/// and every character [`quote`] escapes written as CEL escapes), for
/// admission policy expressions: `{{q (concat "x == " (cel namespace))}}`.
/// A value cannot end the literal and change the expression around it.
struct Cel;

/// `s` as a single-quoted CEL string literal.
pub fn cel_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if needs_unicode_escape(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

impl HelperDef for Cel {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let s = match param(h, "cel")? {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(RenderErrorReason::InvalidParamType("a scalar for cel").into()),
        };
        Ok(ScopedJson::Derived(Value::String(cel_string(&s))))
    }
}

/// Splits rendered text at `---` lines, dropping documents that hold only
/// comments or whitespace.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Multi-document YAML of the manifests, in order; identical bytes every run.
pub fn to_yaml(manifests: &[Manifest]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&m.object)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod deadline_tests {
    use super::*;

    /// Issue 16: the CronJob's 3600 s deadline was below the sum of prod's
    /// timeouts, so a slow handover was killed halfway by its own Job.
    #[test]
    fn the_reconciler_deadline_covers_every_timeout_of_a_pass() {
        for file in ["prod", "staging", "local", "kind"] {
            let path = format!("{}/../clusters/{file}.yaml", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = crate::spec::parse(&path, &text).unwrap();
            let v = &spec.validation;
            let worst = RECONCILE_LOCK_WAIT_SECONDS
                + 6 * u64::from(v.rollout_timeout_seconds)
                + u64::from(v.timeout_seconds);
            assert!(reconcile_deadline_seconds(&spec) > worst, "{file}");
            assert!(
                reconcile_grace_seconds(&spec)
                    > u64::from(v.rollout_timeout_seconds.max(v.timeout_seconds)),
                "{file}"
            );
        }
    }
}
