//! The `netboot` binary as an operator runs it: exit codes, messages, formats.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn netboot(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_netboot"))
        .args(args)
        .current_dir(repo())
        .env_remove("NETBOOT_TEMPLATES")
        .env_remove("NETBOOT_LOG")
        .output()
        .expect("run netboot");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_points_at_the_broken_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let good = std::fs::read_to_string(repo().join("clusters/local.yaml")).unwrap();
    std::fs::write(
        &bad,
        good.replace("port: 6443", "port: 65536")
            .replace("serviceCIDR", "serviceCidr"),
    )
    .unwrap();
    let out = netboot(&["check", bad.to_str().unwrap(), "clusters/prod.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let b = bad.display();
    assert!(
        stdout.contains(&format!(
            "{b}:9:5: spec.cluster.serviceCidr: unknown field; did you mean `serviceCIDR`?"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{b}:8:3: spec.cluster.serviceCIDR: required field is missing"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{b}:13:11: spec.apiServer.port: 65536 is out of range"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("clusters/prod.yaml: ok (prod)"), "{stdout}");
    assert!(stdout.contains("1 of 2 files have errors"), "{stdout}");
}

#[test]
fn check_json_lists_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, b"\x00\x01\x02binary").unwrap();
    let out = netboot(&["check", "-o", "json", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["files"][0]["ok"], false);
    assert_eq!(v["files"][0]["errors"][0]["line"], 1);
    assert!(v["files"][0]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("binary"));
}

#[test]
fn check_missing_file_is_an_error_not_a_panic() {
    let out = netboot(&["check", "clusters/nope.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("clusters/nope.yaml"),
        "{}",
        text(&out.stdout)
    );
    assert!(!text(&out.stderr).contains("panicked"));
}

/// Characters that can make a terminal show something else than was printed.
const TERMINAL_TRICKS: &[char] = &[
    '\r', '\u{1b}', '\u{7}', '\u{8}', '\u{85}', '\u{9b}', '\u{2028}', '\u{2029}', '\u{202e}',
    '\u{2066}',
];

/// Issue 17: values echoed by `check` went to the terminal raw; a carriage
/// return and ANSI codes could overwrite the error with a fake "ok".
#[test]
fn check_escapes_what_it_echoes_so_a_crafted_spec_cannot_print_ok() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("crafted.yaml");
    let good = std::fs::read_to_string(repo().join("clusters/local.yaml")).unwrap();
    let fake_ok = "\\r\\e[2K\\e[32mclusters/local.yaml: ok (local)\\e[0m\\n";
    let text_spec = good
        .replace("name: local", &format!("name: \"x{fake_ok}\""))
        .replace(
            "spec:\n",
            &format!("spec:\n  \"ok\\u202e\\L{fake_ok}\": 1\n  kubeProxy:\n    daemonSet: \"kube-proxy\\u2028{fake_ok}\"\n"),
        );
    std::fs::write(&bad, &text_spec).unwrap();
    let out = netboot(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains(TERMINAL_TRICKS), "{stdout:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "three errors and the summary, each on its own line: {stdout}"
    );
    let b = bad.display();
    for (line, want) in lines.iter().zip([
        format!("{b}:6:9: metadata.name: `x\\u{{000d}}\\u{{001b}}[2K"),
        format!("{b}:8:3: spec.ok\\u{{202e}}\\u{{2028}}\\u{{000d}}"),
        format!("{b}:10:16: spec.kubeProxy.daemonSet: `kube-proxy\\u{{2028}}\\u{{000d}}"),
        "1 of 1 files have errors".to_string(),
    ]) {
        assert!(line.starts_with(&want), "want {want:?}\n got {line:?}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("clusters/")),
        "{stdout}"
    );

    let out = netboot(&["check", "-o", "json", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let raw = text(&out.stdout);
    assert!(!raw.contains(TERMINAL_TRICKS), "{raw:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["files"][0]["ok"], false);
    for e in v["files"][0]["errors"].as_array().unwrap() {
        for key in ["file", "field", "message"] {
            let s = e[key].as_str().unwrap();
            assert!(
                !s.contains(TERMINAL_TRICKS) && !s.contains('\n'),
                "{key}: {s:?}"
            );
        }
    }
}

/// Issue 17's reproduction: a line separator in kubeProxy.daemonSet made
/// `check` say ok and `render` emit a privileged DaemonSet in kube-system.
#[test]
fn a_line_separator_in_a_name_is_refused_by_check_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("inject.yaml");
    let good = std::fs::read_to_string(repo().join("clusters/local.yaml")).unwrap();
    let payload = "kube-proxy\\L---\\Lkind: DaemonSet\\LapiVersion: apps/v1\\Lmetadata: {name: evil, namespace: kube-system}\\Lspec: {template: {spec: {hostPID: true}}}";
    std::fs::write(
        &bad,
        good.replace(
            "spec:\n",
            &format!("spec:\n  kubeProxy:\n    daemonSet: \"{payload}\"\n"),
        ),
    )
    .unwrap();
    let out = netboot(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("spec.kubeProxy.daemonSet: `kube-proxy\\u{2028}---"),
        "{}",
        text(&out.stdout)
    );
    let out = netboot(&["render", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        !text(&out.stderr).contains("hostPID: true\n"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn endpoint_and_image_flags_are_checked_by_their_grammar() {
    let out = netboot(&[
        "render",
        "--api-server",
        "172.18.0.2\u{2028}  hostPID: true:6443",
        "clusters/kind.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is neither an IP address nor a valid DNS name")
            || stderr.contains("contains ':'"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{2028}') && out.stdout.is_empty(),
        "{stderr}"
    );
    let ok = netboot(&[
        "render",
        "--api-server",
        "[fd00::2]:6443",
        "clusters/kind.yaml",
    ]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    // Refused by the argument parser, before any cluster is contacted.
    let out = netboot(&[
        "plan",
        "--kubeconfig",
        "/nonexistent",
        "--probe-image",
        "ghcr.io/x/probe:1\nhostPID: true",
        "clusters/local.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is not a valid image tag"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn render_is_deterministic_and_parses_back() {
    let a = netboot(&["render", "clusters/prod.yaml"]);
    let b = netboot(&["render", "clusters/prod.yaml"]);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&a.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert!(docs.len() >= 9, "{} documents", docs.len());
    let json = netboot(&["render", "-o", "json", "clusters/prod.yaml"]);
    let list: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), docs.len());
}

#[test]
fn render_of_a_spec_without_endpoint_needs_one() {
    let out = netboot(&["render", "clusters/kind.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("pass --api-server HOST:PORT"),
        "{}",
        text(&out.stderr)
    );
    let out = netboot(&["render", "--api-server", "10.96.0.1", "clusters/kind.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let ok = netboot(&[
        "render",
        "--api-server",
        "172.18.0.2:6443",
        "clusters/kind.yaml",
    ]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
}

#[test]
fn version_is_printed() {
    let out = netboot(&["--version"]);
    assert!(
        text(&out.stdout).starts_with("netboot "),
        "{}",
        text(&out.stdout)
    );
}

/// `netboot ARGS` as on a machine that never had a kubeconfig: HOME is an
/// empty directory and KUBECONFIG is unset unless `env` sets it.
fn netboot_newcomer(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netboot"));
    cmd.args(args)
        .current_dir(repo())
        .env_remove("KUBECONFIG")
        .env_remove("NETBOOT_TEMPLATES")
        .env_remove("NETBOOT_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .env("NETBOOT_CACHE", home.join("cache"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run netboot")
}

/// The `error: …` line, checked to name every cause once: no tail of its
/// `a: b: c` chain occurs twice (issue 12 printed "No such file or directory
/// (os error 2)" three times).
fn error_line(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or_else(|| panic!("no `error: ` line in:\n{stderr}"))
        .to_string();
    let parts: Vec<&str> = line.split(": ").collect();
    for k in 0..parts.len() {
        let tail = parts[k..].join(": ");
        if tail.len() >= 8 {
            assert_eq!(
                line.matches(tail.as_str()).count(),
                1,
                "cause `{tail}` printed more than once in: {line}"
            );
        }
    }
    line
}

#[test]
fn no_kubeconfig_anywhere_says_where_it_looked_and_what_to_pass() {
    let home = tempfile::tempdir().unwrap();
    let out = netboot_newcomer(&["plan", "clusters/local.yaml"], home.path(), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let line = error_line(&out);
    let default = home.path().join(".kube/config");
    for want in [
        "clusters/local.yaml",
        "no kubeconfig found",
        "--kubeconfig",
        "$KUBECONFIG",
        &format!("{} (does not exist)", default.display()),
        "--in-cluster",
        "set KUBECONFIG=FILE",
    ] {
        assert!(line.contains(want), "missing `{want}` in: {line}");
    }
}

#[test]
fn connection_errors_print_each_cause_once() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("nope/kubeconfig");
    let garbage = home.path().join("garbage");
    std::fs::write(&garbage, "apiVersion: v1\nkind: Config\nclusters: 7\n").unwrap();
    // A server nothing listens on (loopback only): the client's error chain is deep.
    let refused = home.path().join("refused");
    std::fs::write(
        &refused,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    let missing_s = missing.display().to_string();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["plan", "clusters/local.yaml"],
            vec![("KUBECONFIG", missing_s.as_str())],
            "$KUBECONFIG",
        ),
        (
            vec![
                "plan",
                "--kubeconfig",
                missing_s.as_str(),
                "clusters/local.yaml",
            ],
            vec![],
            "--kubeconfig",
        ),
        (
            vec![
                "status",
                "--kubeconfig",
                garbage.to_str().unwrap(),
                "clusters/local.yaml",
            ],
            vec![],
            "parse",
        ),
        (
            vec![
                "status",
                "--kubeconfig",
                refused.to_str().unwrap(),
                "clusters/local.yaml",
            ],
            vec![],
            "127.0.0.1:1",
        ),
    ];
    for (args, env, want) in cases {
        let out = netboot_newcomer(&args, home.path(), &env);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let line = error_line(&out);
        assert!(line.contains(want), "{args:?}: missing `{want}` in: {line}");
    }
}
