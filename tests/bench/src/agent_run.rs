//! Agent cold start and RSS: the real `netboot-datapath agent` binary with
//! `--static-services` (the N Services and EndpointSlices as a file instead
//! of an API server), its own cgroup and pin root (both the bench's), HTTP on
//! 127.0.0.1 only, kube-proxy rule cleanup off and rule detection pointed at
//! a bench namespace (the agent never looks at the root namespace's rules).
//!
//! Cold start = spawn → `/readyz` 200 (programs loaded and attached, the
//! file parsed, the first reconcile pass written). RSS = VmRSS from
//! /proc/PID/status once ready (and VmHWM, the peak).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cleanup::{Cgroup, ChildGuard, Netns, PinRoot};
use netboot_datapath::config::MapSizes;

use crate::netboot_lb::map_sizes;
use crate::workload::Workload;

/// What one agent start showed.
#[derive(Clone, Debug, Default)]
pub struct AgentResult {
    /// Spawn → /readyz 200, ms (None: not ready).
    pub ready_ms: Option<f64>,
    /// The agent's own duration of its first reconcile pass (from its
    /// "maps reconciled" log line), ms.
    pub reconcile_ms: Option<f64>,
    /// Frontends and backends the agent reports programmed.
    pub services: u64,
    /// Backends programmed.
    pub backends: u64,
    /// VmRSS once ready (or at the end of the wait), MiB.
    pub rss_mib: f64,
    /// VmHWM (peak RSS), MiB.
    pub hwm_mib: f64,
    /// Parsing the static file (the agent's own loader, timed in the bench
    /// process): the part of the cold start that a watch list replaces, ms.
    pub parse_ms: f64,
    /// Why it did not get ready.
    pub error: Option<String>,
}

/// Finds (and builds, when run through cargo) the `netboot-datapath` binary
/// next to this one, in the same profile.
pub fn locate_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let dir = exe.parent().context("bench binary has no directory")?;
    let bin = dir.join("netboot-datapath");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("Cargo.toml").exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace).args([
            "build",
            "-q",
            "-p",
            "netboot-datapath",
            "--bin",
            "netboot-datapath",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        eprintln!("building the agent binary: {cmd:?}");
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) if bin.exists() => {
                eprintln!(
                    "cargo build of netboot-datapath failed ({s}); using the existing {}",
                    bin.display()
                )
            }
            Ok(s) => bail!("cargo build of netboot-datapath failed ({s})"),
            Err(e) if bin.exists() => {
                eprintln!(
                    "cargo not runnable ({e}); using the existing {}",
                    bin.display()
                )
            }
            Err(e) => bail!("cargo not runnable ({e}) and no {}", bin.display()),
        }
    }
    if !bin.exists() {
        bail!("{} not found (pass --agent-bin)", bin.display());
    }
    Ok(bin)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// HTTP/1.0 GET on 127.0.0.1; (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    netboot_harness::http::get(
        addr,
        path,
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
}

/// (VmRSS, VmHWM) of a process, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// The agent's config.yaml: API server 127.0.0.1:`api_port`, replace mode,
/// the map sizes, kube-proxy rule cleanup off.
pub fn agent_config(api_port: u16, sizes: &MapSizes) -> String {
    format!(
        "apiServer: {{host: 127.0.0.1, port: {api_port}}}\nkubeProxyReplacement: true\nsessionAffinityTimeoutSeconds: 10800\nmapSizes: {{services: {}, backends: {}, affinity: {}, reverseNat: {}}}\ncleanupKubeProxyRules: false\n",
        sizes.services, sizes.backends, sizes.affinity, sizes.reverse_nat
    )
}

/// What an agent the bench starts gets.
pub struct AgentCommand<'a> {
    /// The netboot-datapath binary.
    pub bin: &'a Path,
    /// `--node-name`.
    pub node: &'a str,
    /// `--config` ([`agent_config`]).
    pub config: &'a Path,
    /// `--cgroup`: where its socket LB attaches (one of the bench's).
    pub cgroup: &'a Path,
    /// `--bpffs`: its pin root (one of the bench's).
    pub pins: &'a Path,
    /// `--listen`: /healthz, /readyz, /metrics, /v1/status.
    pub listen: std::net::SocketAddr,
    /// `--rules-netns`: a bench namespace (never the root one's rules).
    pub rules_netns: &'a Path,
}

/// `netboot-datapath agent …` with `a`, Node checks hourly, info logs, no
/// KUBECONFIG from the environment, stdin/stdout null (the caller adds the
/// source of Services and stderr). In a process group of its own, which the
/// bench stops whole ([`crate::cleanup::ChildGuard`]): an agent behind a
/// wrapper (a profiler's script) is stopped with it, not left running.
pub fn agent_command(a: &AgentCommand) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(a.bin);
    c.process_group(0);
    c.args(["agent", "--node-name", a.node])
        .arg("--config")
        .arg(a.config)
        .arg("--cgroup")
        .arg(a.cgroup)
        .arg("--bpffs")
        .arg(a.pins)
        .args(["--listen", &a.listen.to_string()])
        .arg("--rules-netns")
        .arg(a.rules_netns)
        .args(["--node-interval", "3600"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

/// Starts the agent on `w`, waits for ready (or `timeout`, or a failed
/// reconcile pass), reads its RSS and status, stops it and removes its pins.
pub fn run(
    bin: &Path,
    w: &Workload,
    run_tag: &str,
    rules_ns: &Netns,
    timeout: Duration,
) -> Result<AgentResult> {
    let dir = crate::cleanup::TmpDir::new(&format!("{run_tag}-agent"))?;
    let sizes = map_sizes(w.n as usize, w.b, w.endpoints());
    let config = agent_config(6443, &sizes);
    let cfg_path = dir.path().join("config.yaml");
    std::fs::write(&cfg_path, config)?;
    let static_path = dir.path().join("static.yaml");
    std::fs::write(&static_path, w.static_yaml()?)?;
    let parse_ms = {
        let watched = netboot_datapath::watch::Watched::default();
        let t = Instant::now();
        watched
            .load_static(&static_path)
            .context("parsing the static file")?;
        t.elapsed().as_secs_f64() * 1000.0
    };
    let tag = format!("agent-{}x{}", w.n, w.b);
    let cg = Cgroup::new(&format!("{run_tag}/{tag}"))?;
    let pins = PinRoot::new(&format!("{run_tag}/{tag}"))?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("agent.log"))?;

    crate::cleanup::check_stop()?;
    let t0 = Instant::now();
    let child = agent_command(&AgentCommand {
        bin,
        node: "netboot-bench",
        config: &cfg_path,
        cgroup: &cg.path,
        pins: pins.pins.root(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        rules_netns: &rules_ns.path(),
    })
    .arg("--static-services")
    .arg(&static_path)
    .stderr(Stdio::from(log))
    .spawn()
    .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = ChildGuard::new(child);
    let pid = guard.pid();

    let mut res = AgentResult {
        parse_ms,
        ..Default::default()
    };
    let mut last_status = Instant::now();
    while t0.elapsed() < timeout {
        crate::cleanup::check_stop()?;
        if let Some((200, _)) = http_get(port, "/readyz") {
            res.ready_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        if let Some(c) = guard.child_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                res.error = Some(format!("agent exited: {st}"));
                break;
            }
        }
        if last_status.elapsed() > Duration::from_millis(250) {
            last_status = Instant::now();
            if let Some(st) = status(port) {
                if st["syncErrors"].as_u64().unwrap_or(0) > 0 {
                    res.error = Some(st["lastError"].as_str().unwrap_or("sync error").to_string());
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if res.ready_ms.is_none() && res.error.is_none() {
        res.error = Some(format!("not ready after {timeout:?}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    (res.rss_mib, res.hwm_mib) = rss_mib(pid);
    if let Some(st) = status(port) {
        res.services = st["services"].as_u64().unwrap_or(0);
        res.backends = st["backends"].as_u64().unwrap_or(0);
    }
    guard.stop(Duration::from_secs(3));
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    if res.ready_ms.is_some() {
        res.reconcile_ms = first_pass_ms(&log);
    }
    if res.error.is_some() {
        if let Some(line) = log.lines().rev().find(|l| !l.trim().is_empty()) {
            eprintln!("agent log (last line): {line}");
        }
    }
    drop(pins);
    drop(cg);
    Ok(res)
}

/// `took=` of the first "maps reconciled" line of the agent's log, ms.
fn first_pass_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("maps reconciled"))?;
    let took = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("took="))?;
    debug_duration_ms(took.trim_matches(|c: char| c.is_ascii_control()))
}

/// Parses a `Duration` printed with `{:?}` (`12.3ms`, `950.1µs`, `1.2s`), ms.
fn debug_duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit.trim_end_matches(|c: char| !c.is_alphanumeric() && c != 'µ') {
        "ns" => 1e-6,
        "µs" | "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1000.0,
        _ => return None,
    };
    Some(v * scale)
}

fn status(port: u16) -> Option<serde_json::Value> {
    let (code, body) = http_get(port, "/v1/status")?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_is_read_from_the_log() {
        let log = "2026-01-01T00:00:00Z  INFO netboot_datapath::agent: datapath installed\n\
2026-01-01T00:00:01Z  INFO netboot_datapath::agent: maps reconciled updates=8000 deletes=0 services=1000 backends=2000 took=13.25ms\n\
2026-01-01T00:00:02Z  INFO netboot_datapath::agent: maps reconciled updates=1 deletes=0 services=1000 backends=2000 took=50µs\n";
        assert_eq!(first_pass_ms(log), Some(13.25));
        assert_eq!(debug_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(debug_duration_ms("250µs"), Some(0.25));
        assert_eq!(debug_duration_ms("x"), None);
    }
}
