//! The `netboot` binary as an operator runs it: exit codes, messages, formats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
