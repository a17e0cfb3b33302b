//! Running programs: inside a bench namespace (setns before exec, no
//! `ip netns exec` remount in the timed path), timed, registered for cleanup.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cleanup::{ChildGuard, Netns};

/// Runs a command to completion; fails with its stderr on a non-zero exit.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespace file, opened (keeps the namespace reachable while held).
pub fn open_netns(ns: &Netns) -> Result<File> {
    File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))
}

/// A command that runs inside `ns` (the child calls setns(2) before exec).
/// Every iptables / nft invocation of the bench is built here, so none can
/// reach the root namespace's firewall.
pub fn command_in(ns: &Netns, program: &str) -> Result<Command> {
    if !ns.name.starts_with(crate::cleanup::PREFIX) {
        bail!(
            "refusing to run {program} outside a bench namespace ({})",
            ns.name
        );
    }
    let mut cmd = Command::new(program);
    netboot_harness::process::Confine {
        netns: Some(ns.path()),
        ..Default::default()
    }
    .apply(&mut cmd)
    .with_context(|| format!("entering {} for {program}", ns.name))?;
    Ok(cmd)
}

/// How a timed command ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Timed {
    /// Exited successfully after this long.
    Done(Duration),
    /// Still running at the limit: killed (its transaction never committed).
    Killed(Duration),
}

/// Runs `cmd` with `stdin_file` as its input and returns how long it took
/// from spawn to exit (process start included: kube-proxy forks
/// iptables-restore / nft for every sync too).
pub fn run_timed(cmd: Command, stdin_file: Option<&Path>) -> Result<Duration> {
    match run_timed_limit(cmd, stdin_file, Duration::MAX)? {
        Timed::Done(d) | Timed::Killed(d) => Ok(d),
    }
}

/// [`run_timed`], killing the child (ours, by its handle) once `limit` has
/// passed. The exit is polled: every 0.2 ms for the first 50 ms, every 1 ms
/// up to 1 s, then every 10 ms, so the timing error stays below 2%.
pub fn run_timed_limit(
    mut cmd: Command,
    stdin_file: Option<&Path>,
    limit: Duration,
) -> Result<Timed> {
    let stdin = match stdin_file {
        Some(p) => Stdio::from(File::open(p).with_context(|| format!("opening {}", p.display()))?),
        None => Stdio::null(),
    };
    // stderr goes to a file: a pipe nobody reads could fill and stall the child.
    let err_file = tempfile::tempfile().context("stderr file")?;
    cmd.stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_file.try_clone()?));
    let what = format!("{cmd:?}");
    crate::cleanup::check_stop()?;
    let t = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let mut guard = ChildGuard::new(child);
    let status = loop {
        let c = guard.child_mut().context("child")?;
        if let Some(st) = c.try_wait()? {
            break Some(st);
        }
        let e = t.elapsed();
        if e >= limit {
            break None;
        }
        std::thread::sleep(if e < Duration::from_millis(50) {
            Duration::from_micros(200)
        } else if e < Duration::from_secs(1) {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        });
    };
    let took = t.elapsed();
    let Some(status) = status else {
        guard.stop(Duration::ZERO);
        return Ok(Timed::Killed(took));
    };
    guard.stop(Duration::ZERO);
    if !status.success() {
        use std::io::{Read, Seek};
        let mut err = String::new();
        let mut f = err_file;
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.take(4096).read_to_string(&mut err);
        bail!("{what} failed ({status}): {}", err.trim());
    }
    Ok(Timed::Done(took))
}

/// Output of a (short) command, for versions and listings.
pub fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
