//! `netboot-datapath` errors as an operator reads them: one `error: a: b: c`
//! line, each cause once, exit 1, never a panic or a Debug dump. Needs no
//! root: every case fails before the kernel is touched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn datapath(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netboot-datapath"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run netboot-datapath")
}

/// The `error: ` line; no tail of its `a: b: c` chain occurs twice.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Caused by"),
        "{stderr}"
    );
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
                "`{tail}` twice in: {line}"
            );
        }
    }
    line
}

#[test]
fn a_missing_config_file_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("config.yaml");
    let out = datapath(&[
        "agent",
        "--config",
        missing.to_str().unwrap(),
        "--node-name",
        "n",
    ]);
    let line = error_line(&out);
    assert!(line.contains(missing.to_str().unwrap()), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
}

#[test]
fn a_bad_config_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("config.yaml");
    std::fs::write(
        &bad,
        "apiServer: {host: 127.0.0.1, port: 6443}\nkubeProxyReplacment: true\n",
    )
    .unwrap();
    let out = datapath(&[
        "agent",
        "--config",
        bad.to_str().unwrap(),
        "--node-name",
        "n",
    ]);
    let line = error_line(&out);
    assert!(line.contains(bad.to_str().unwrap()), "{line}");
    assert!(line.contains("kubeProxyReplacment"), "{line}");
}

#[test]
fn diagnostics_without_pins_say_which_map() {
    let dir = tempfile::tempdir().unwrap();
    let out = datapath(&["service", "list", "--bpffs", dir.path().to_str().unwrap()]);
    let line = error_line(&out);
    assert!(line.contains(dir.path().to_str().unwrap()), "{line}");
}
