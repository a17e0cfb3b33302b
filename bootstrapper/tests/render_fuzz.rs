//! Seeded property and fuzz tests for issue 17 (a spec value injected
//! Kubernetes objects through a Unicode line break).
//!
//! - `every_string_field_is_refused_or_arrives_byte_for_byte`: random strings
//!   (every Unicode line break, YAML indicators, quotes, `{{`, NUL, very long
//!   strings, and valid-looking values) go into each string field of a full
//!   spec. Either `check` refuses the spec with an error positioned at that
//!   field, or the rendered objects have the same key sets as with a benign
//!   value and the value arrives byte for byte wherever it is rendered.
//! - `mutated_shipped_specs_never_panic`: random mutations of clusters/*.yaml;
//!   checking never panics, and a spec that checks also renders.
//!
//! `NETBOOT_FUZZ_CASES` sets the number of cases of each (default 2000, the
//! first ~1500 of them every piece appended to every field, and 3000: a few
//! seconds); `NETBOOT_FUZZ_SEED` the seed (default 17). The full
//! run: `NETBOOT_FUZZ_CASES=1000000 cargo test --release -p netboot --test render_fuzz`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use netboot::manifest::Manifest;
use netboot::render::{render, RenderOptions};
use netboot::spec::{self, ApiServer, ClusterNetwork};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn cases(default: u64) -> u64 {
    std::env::var("NETBOOT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("NETBOOT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(17)
}

/// A full spec; `{field}` placeholders take YAML double-quoted values.
const TEMPLATE: &str = "\
apiVersion: {apiVersion}
kind: {kind}
metadata:
  name: {metadata.name}
spec:
  namespace: {spec.namespace}
  cluster:
    context: {spec.cluster.context}
    serviceCIDR: 10.96.0.0/12
    podCIDR: 10.244.0.0/16
    dnsDomain: {spec.cluster.dnsDomain}
  apiServer:
    host: {spec.apiServer.host}
    port: 6443
  datapath:
    image: {spec.datapath.image}
    version: {spec.datapath.version}
  kubeProxy:
    namespace: {spec.kubeProxy.namespace}
    daemonSet: {spec.kubeProxy.daemonSet}
    configMap: {spec.kubeProxy.configMap}
  validation:
    skip: [{spec.validation.skip[0]}]
  reconcile:
    repo: {spec.reconcile.repo}
    ref: {spec.reconcile.ref}
    path: {spec.reconcile.path}
    interval: {spec.reconcile.interval}
    image: {spec.reconcile.image}
    secretName: {spec.reconcile.secretName}
";

/// Every string field: its path, a benign value, and where a value arrives
/// (in the checked spec and in the rendered objects) given the spec and objects.
struct Field {
    path: &'static str,
    benign: &'static str,
    arrives: fn(&ClusterNetwork, &[Manifest]) -> Vec<String>,
}

fn obj<'a>(ms: &'a [Manifest], kind: &str) -> &'a Value {
    &ms.iter().find(|m| m.id().kind == kind).unwrap().object
}

/// The agent's Role in kube-proxy's namespace (the reconciler has Roles too).
/// The agent's Role in kube-proxy's namespace (not its Events Role in `default`).
fn agent_role(ms: &[Manifest]) -> &Value {
    &ms.iter()
        .find(|m| {
            let id = m.id();
            id.kind == "Role"
                && id.name.starts_with("netboot-datapath-")
                && !id.name.starts_with("netboot-datapath-events-")
        })
        .unwrap()
        .object
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_string()
}

/// The agent's config.yaml, parsed as the agent parses it (serde_yaml).
fn agent_config(ms: &[Manifest]) -> Value {
    let text = s(&obj(ms, "ConfigMap")["data"]["config.yaml"]);
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("config.yaml: {e}\n{text}"))
}

fn cron_container(ms: &[Manifest]) -> &Value {
    &obj(ms, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
}

fn env(container: &Value, name: &str) -> String {
    let e = container["env"].as_array().unwrap();
    s(&e.iter().find(|e| e["name"] == name).unwrap()["value"])
}

const FIELDS: &[Field] = &[
    Field {
        path: "apiVersion",
        benign: "netboot.io/v1alpha1",
        arrives: |_, _| vec![],
    },
    Field {
        path: "kind",
        benign: "ClusterNetwork",
        arrives: |_, _| vec![],
    },
    Field {
        path: "metadata.name",
        benign: "prod",
        arrives: |spec, ms| {
            let mut v = vec![spec.name.clone()];
            v.extend(
                ms.iter()
                    .map(|m| s(&m.object["metadata"]["labels"]["netboot.io/cluster"])),
            );
            v
        },
    },
    Field {
        path: "spec.namespace",
        benign: "netboot-system",
        arrives: |spec, ms| {
            vec![
                spec.namespace.clone(),
                s(&obj(ms, "Namespace")["metadata"]["name"]),
                s(&obj(ms, "DaemonSet")["metadata"]["namespace"]),
            ]
        },
    },
    Field {
        path: "spec.cluster.context",
        benign: "prod-admin",
        arrives: |spec, _| vec![spec.cluster.context.clone().unwrap()],
    },
    Field {
        path: "spec.cluster.dnsDomain",
        benign: "cluster.local",
        arrives: |spec, _| vec![spec.cluster.dns_domain.clone()],
    },
    Field {
        path: "spec.apiServer.host",
        benign: "api.prod.example.internal",
        arrives: |spec, ms| {
            vec![
                spec.api_server.clone().unwrap().host,
                s(&agent_config(ms)["apiServer"]["host"]),
                env(cron_container(ms), "KUBERNETES_SERVICE_HOST"),
            ]
        },
    },
    Field {
        path: "spec.datapath.image",
        benign: "ghcr.io/netboot/netboot-datapath",
        arrives: |spec, ms| {
            let image =
                s(&obj(ms, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]);
            let suffix = format!(":{}", spec.datapath.version);
            vec![
                spec.datapath.image.clone(),
                image.strip_suffix(&suffix).unwrap().to_string(),
            ]
        },
    },
    Field {
        path: "spec.datapath.version",
        benign: "0.1.0",
        arrives: |spec, ms| {
            let image =
                s(&obj(ms, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]);
            let prefix = format!("{}:", spec.datapath.image);
            vec![
                spec.datapath.version.clone(),
                image.strip_prefix(&prefix).unwrap().to_string(),
            ]
        },
    },
    Field {
        path: "spec.kubeProxy.namespace",
        benign: "kube-system",
        arrives: |spec, ms| {
            vec![
                spec.kube_proxy.namespace.clone(),
                s(&agent_config(ms)["kubeProxy"]["namespace"]),
                s(&agent_role(ms)["metadata"]["namespace"]),
            ]
        },
    },
    Field {
        path: "spec.kubeProxy.daemonSet",
        benign: "kube-proxy",
        arrives: |spec, ms| {
            vec![
                spec.kube_proxy.daemon_set.clone(),
                s(&agent_config(ms)["kubeProxy"]["daemonSet"]),
            ]
        },
    },
    Field {
        path: "spec.kubeProxy.configMap",
        benign: "kube-proxy",
        arrives: |spec, _| vec![spec.kube_proxy.config_map.clone()],
    },
    Field {
        path: "spec.validation.skip[0]",
        benign: "dns",
        arrives: |spec, _| spec.validation.skip.clone(),
    },
    Field {
        path: "spec.reconcile.repo",
        benign: "https://git.example.internal/platform/clusters.git",
        arrives: |spec, ms| {
            vec![
                spec.reconcile.clone().unwrap().repo,
                s(&cron_container(ms)["args"][6]),
            ]
        },
    },
    Field {
        path: "spec.reconcile.ref",
        benign: "main",
        arrives: |spec, ms| {
            vec![
                spec.reconcile.clone().unwrap().git_ref,
                s(&cron_container(ms)["args"][8]),
            ]
        },
    },
    Field {
        path: "spec.reconcile.path",
        benign: "clusters/prod.yaml",
        arrives: |spec, ms| {
            vec![
                spec.reconcile.clone().unwrap().path,
                s(&cron_container(ms)["args"][9]),
            ]
        },
    },
    Field {
        path: "spec.reconcile.interval",
        benign: "5m",
        arrives: |_, _| vec![],
    },
    Field {
        path: "spec.reconcile.image",
        benign: "ghcr.io/netboot/netboot:0.1.0",
        arrives: |spec, ms| {
            vec![
                spec.reconcile.clone().unwrap().image,
                s(&cron_container(ms)["image"]),
            ]
        },
    },
    Field {
        path: "spec.reconcile.secretName",
        benign: "netboot-git",
        arrives: |spec, ms| {
            let volumes = obj(ms, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                ["volumes"]
                .as_array()
                .unwrap();
            let git = volumes.iter().find(|v| v["name"] == "git").unwrap();
            vec![
                spec.reconcile.clone().unwrap().secret_name.unwrap(),
                s(&git["secret"]["secretName"]),
            ]
        },
    },
];

/// `v` as a YAML double-quoted scalar that yaml-rust2 reads back exactly:
/// everything outside printable ASCII escaped (an encoder independent of the
/// one under test, render::quote).
fn yaml_quoted(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

fn spec_text(values: &[(&str, String)]) -> String {
    let mut text = TEMPLATE.to_string();
    for f in FIELDS {
        let v = values
            .iter()
            .find(|(p, _)| *p == f.path)
            .map_or(f.benign.to_string(), |(_, v)| v.clone());
        text = text.replace(&format!("{{{}}}", f.path), &yaml_quoted(&v));
    }
    text
}

/// Pieces random strings are made of.
const PIECES: &[&str] = &[
    "\n",
    "\r",
    "\r\n",
    "\u{85}",
    "\u{2028}",
    "\u{2029}",
    "\t",
    "\0",
    "\u{7f}",
    "\u{9b}",
    "\u{feff}",
    "\u{202e}",
    "\u{1b}[2K",
    ":",
    "-",
    "?",
    "[",
    "]",
    "{",
    "}",
    "#",
    "&",
    "*",
    "!",
    "|",
    ">",
    "'",
    "\"",
    "%",
    "@",
    "`",
    ",",
    "\\",
    "{{",
    "}}",
    "{{cluster}}",
    "---",
    "...",
    ": ",
    "- ",
    " #",
    " ",
    "~",
    "null",
    "true",
    "1e3",
    "<<",
    "a",
    "z",
    "0",
    "9",
    ".",
    "/",
    "_",
    "__",
    "kube-proxy",
    "netboot-system",
    "ghcr.io",
    "localhost:5000",
    "/x",
    ":1.0",
    "@sha256:",
    "main",
    "clusters/",
    ".yaml",
    "https://",
    "git@h:",
    "10.96.0.1",
    "172.18.0.2",
    "::1",
    "[fd00::1]",
    "A",
    "é",
    "🦀",
    "\u{10ffff}",
];

fn random_string(rng: &mut StdRng, benign: &str) -> String {
    let mut out = String::new();
    match rng.random_range(0..10) {
        // A benign value with something put in.
        0..=3 => {
            out.push_str(benign);
            let at = rng.random_range(0..=benign.len());
            let at = (0..=at)
                .rev()
                .find(|i| benign.is_char_boundary(*i))
                .unwrap_or(0);
            out.insert_str(at, PIECES[rng.random_range(0..PIECES.len())]);
        }
        // A very long string.
        4 => {
            let piece = PIECES[rng.random_range(0..PIECES.len())];
            out = format!("{benign}{}", piece.repeat(rng.random_range(100..20_000)));
        }
        // Valid-looking pieces only: often accepted, so the encoding is exercised.
        5..=6 => {
            for _ in 0..rng.random_range(1..6) {
                let p = PIECES[rng.random_range(40..PIECES.len())];
                out.push_str(p);
            }
        }
        // Anything: pieces and random characters.
        _ => {
            for _ in 0..rng.random_range(0..12) {
                if rng.random_bool(0.7) {
                    out.push_str(PIECES[rng.random_range(0..PIECES.len())]);
                } else {
                    let c = loop {
                        if let Some(c) = char::from_u32(rng.random_range(0..0x11_0000)) {
                            break c;
                        }
                    };
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Each object's template, kind and the set of its key paths (values left
/// out), plus the agent config's key paths; sorted, so names may reorder objects.
fn shape(ms: &[Manifest]) -> Vec<(String, String, BTreeSet<String>)> {
    fn keys(v: &Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = format!("{at}/{k}");
                    out.insert(p.clone());
                    keys(v, &p, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    keys(v, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut shapes: Vec<_> = ms
        .iter()
        .map(|m| {
            let mut k = BTreeSet::new();
            keys(&m.object, "", &mut k);
            (m.template.clone(), m.id().kind.clone(), k)
        })
        .collect();
    let mut k = BTreeSet::new();
    keys(&agent_config(ms), "", &mut k);
    shapes.push(("config.yaml".into(), "agent config".into(), k));
    shapes.sort();
    shapes
}

fn render_spec(spec: &ClusterNetwork) -> Result<Vec<Manifest>, netboot::render::RenderError> {
    render(spec, "fuzz.yaml", &RenderOptions::default())
}

#[test]
fn every_string_field_is_refused_or_arrives_byte_for_byte() {
    let (n, seed) = (cases(2000), seed());
    let benign_spec = spec::parse("fuzz.yaml", &spec_text(&[])).unwrap();
    let benign = shape(&render_spec(&benign_spec).unwrap());
    for f in FIELDS {
        assert_eq!(
            (f.arrives)(&benign_spec, &render_spec(&benign_spec).unwrap())
                .iter()
                .filter(|v| *v != f.benign)
                .count(),
            0,
            "{}: the benign value must arrive where the table says",
            f.path
        );
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut refused, mut accepted) = (0u64, 0u64);
    let start = Instant::now();
    // First every piece appended to every field's benign value, then random values.
    let fixed = FIELDS.len() * PIECES.len();
    let n = n.max(fixed as u64 + 1);
    for i in 0..n {
        let (f, value) = match usize::try_from(i).ok().filter(|i| *i < fixed) {
            Some(i) => {
                let f = &FIELDS[i % FIELDS.len()];
                (f, format!("{}{}", f.benign, PIECES[i / FIELDS.len()]))
            }
            None => {
                let f = &FIELDS[rng.random_range(0..FIELDS.len())];
                (f, random_string(&mut rng, f.benign))
            }
        };
        let text = spec_text(&[(f.path, value.clone())]);
        let what = format!(
            "case {i} (NETBOOT_FUZZ_SEED={seed}): {} = {value:?}",
            f.path
        );
        match spec::parse("fuzz.yaml", &text) {
            Err(e) => {
                let errors = e.errors();
                assert!(
                    errors
                        .iter()
                        .any(|e| e.field == f.path && e.line > 0 && e.column > 0),
                    "{what}: refused without an error positioned at the field: {errors:#?}"
                );
                for e in &errors {
                    let line = e.to_string();
                    assert!(
                        line.starts_with(&format!("fuzz.yaml:{}:{}: ", e.line, e.column)),
                        "{what}: {line}"
                    );
                    assert!(
                        !line.contains(['\n', '\r', '\u{1b}', '\u{85}', '\u{2028}']),
                        "{what}: {line:?}"
                    );
                }
                refused += 1;
            }
            Ok(spec) => {
                let ms = render_spec(&spec)
                    .unwrap_or_else(|e| panic!("{what}: checked but does not render: {e}"));
                assert_eq!(shape(&ms), benign, "{what}: the objects' keys changed");
                for got in (f.arrives)(&spec, &ms) {
                    assert_eq!(got, value, "{what}: arrived changed");
                }
                accepted += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "render_fuzz: {n} field cases (seed {seed}): {refused} refused, {accepted} accepted and rendered, \
         {secs:.1} s, {:.0} cases/s",
        n as f64 / secs
    );
    assert!(refused > 0 && accepted > 0, "both outcomes must occur");
}

/// A random mutation of `text`: bytes deleted, pieces inserted, lines
/// duplicated, swapped or re-indented, or a cut.
fn mutate(rng: &mut StdRng, text: &[u8]) -> Vec<u8> {
    let mut b = text.to_vec();
    for _ in 0..rng.random_range(1..5) {
        let at = rng.random_range(0..=b.len());
        match rng.random_range(0..8) {
            0 => {
                let end = (at + rng.random_range(1..20)).min(b.len());
                b.drain(at..end);
            }
            1 | 2 => {
                let p = PIECES[rng.random_range(0..PIECES.len())].as_bytes();
                b.splice(at..at, p.iter().copied());
            }
            3 => {
                if at < b.len() {
                    b[at] = rng.random();
                }
            }
            4 => b.truncate(at),
            _ => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let i = rng.random_range(0..lines.len());
                let j = rng.random_range(0..lines.len());
                let indented;
                match rng.random_range(0..3) {
                    0 => lines.insert(j, lines[i]),
                    1 => lines.swap(i, j),
                    _ => {
                        indented = format!(
                            "{}{}",
                            " ".repeat(rng.random_range(0..5)),
                            lines[i].trim_start()
                        );
                        lines[i] = &indented;
                    }
                }
                b = lines.join("\n").into_bytes();
            }
        }
    }
    b
}

#[test]
fn mutated_shipped_specs_never_panic() {
    let (n, seed) = (cases(3000), seed());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../clusters");
    let mut shipped: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    shipped.sort();
    assert!(shipped.len() >= 4);
    let opts = RenderOptions {
        templates: None,
        api_server: Some(ApiServer {
            host: "172.18.0.2".into(),
            port: 6443,
        }),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ok, mut refused) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let base = &shipped[rng.random_range(0..shipped.len())];
        let input = mutate(&mut rng, base);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            spec::parse_bytes("fuzz.yaml", &input).map(|spec| render(&spec, "fuzz.yaml", &opts))
        }));
        let show = || {
            format!(
                "case {i} (NETBOOT_FUZZ_SEED={seed}) input:\n{}",
                String::from_utf8_lossy(&input)
            )
        };
        match outcome {
            Err(_) => panic!("panicked on {}", show()),
            Ok(Ok(Err(e))) => panic!("checked but does not render: {e}\n{}", show()),
            Ok(Ok(Ok(_))) => ok += 1,
            Ok(Err(e)) => {
                for e in e.errors() {
                    assert!(e.line > 0 && e.column > 0, "unpositioned {e} on {}", show());
                }
                refused += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "render_fuzz: {n} mutated specs (seed {seed}): {refused} refused, {ok} checked and rendered, \
         {secs:.1} s, {:.0} cases/s",
        n as f64 / secs
    );
    assert!(refused > 0 && ok > 0, "both outcomes must occur");
}
