//! The outside check of the programming section: real backends that answer
//! with their own address, and a client that connects to a Service's VIP
//! every millisecond until the answer comes from the backend it waits for.
//!
//! - [`Backends`]: TCP listeners on addresses of `lo` inside a proxy's
//!   namespace (bound by a thread that entered it); each accepted
//!   connection gets the listener's IP as text, then is closed.
//! - [`Probe`]: `netboot-bench __probe` spawned inside the proxy's namespace
//!   (and, for netboot, inside the agent's cgroup, where its socket LB is
//!   attached): it prints `ready`, then `ok <unix ns>` at the first answer
//!   from the wanted backend (or `timeout …`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::cleanup::ChildGuard;

/// Wall-clock time in ns since the epoch (comparable between processes).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Listeners answering with their own address, stopped on drop.
pub struct Backends {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backends {
    /// One listener per `addrs` on `port`, bound inside `netns` (the
    /// addresses must already be on one of its interfaces).
    pub fn serve(netns: &str, addrs: &[IpAddr], port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for ip in addrs {
            let addr = SocketAddr::new(*ip, port);
            let listener = netboot_harness::netns::in_netns(netns, move || {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .with_context(|| format!("listener {addr} in {netns}"))?;
            let s = stop.clone();
            let answer = ip.to_string();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.write_all(answer.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection: the peer's answer (its address), if any.
fn ask(target: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Entry point of `netboot-bench __probe`.
pub fn child_main(target: SocketAddr, want: IpAddr, timeout: Duration) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let want = want.to_string();
    let start = Instant::now();
    let mut tries: u64 = 0;
    let mut last = String::new();
    let mut next = Instant::now();
    while start.elapsed() < timeout {
        tries += 1;
        if let Some(answer) = ask(target) {
            if answer == want {
                writeln!(out, "ok {} {tries}", unix_ns())?;
                return Ok(());
            }
            last = answer;
        }
        next += Duration::from_millis(1);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    writeln!(out, "timeout {tries} last={last:?}")?;
    Ok(())
}

/// A running probe.
pub struct Probe {
    stdout: BufReader<ChildStdout>,
    guard: ChildGuard,
}

impl Probe {
    /// Spawns a probe in `netns` (and `cgroup`, if given) that waits for
    /// `want` behind `target`; returns once it runs.
    pub fn spawn(
        cgroup: Option<&Path>,
        netns: PathBuf,
        target: SocketAddr,
        want: IpAddr,
        timeout: Duration,
    ) -> Result<Self> {
        crate::cleanup::check_stop()?;
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "__probe",
            "--target",
            &target.to_string(),
            "--want",
            &want.to_string(),
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        netboot_harness::process::Confine {
            parent_death: true,
            cgroup: cgroup.map(Path::to_path_buf),
            netns: Some(netns.clone()),
            ..Default::default()
        }
        .apply(&mut cmd)
        .with_context(|| format!("confining a probe to {}", netns.display()))?;
        let child = cmd.spawn().context("spawning a probe")?;
        let mut guard = ChildGuard::new(child);
        let c = guard.child_mut().context("probe child")?;
        let mut stdout = BufReader::new(c.stdout.take().context("probe stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("probe in {} said {:?}", netns.display(), line.trim());
        }
        Ok(Self { stdout, guard })
    }

    /// Waits for the answer: the wall-clock time (unix ns) of the first
    /// answer from the wanted backend, or None on timeout.
    pub fn wait(mut self) -> Result<Option<u64>> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        self.guard.stop(Duration::from_secs(1));
        let mut it = line.split_whitespace();
        match it.next() {
            Some("ok") => Ok(Some(
                it.next()
                    .context("probe: no time")?
                    .parse()
                    .context("probe time")?,
            )),
            Some("timeout") => Ok(None),
            _ => bail!("probe pid {} said {:?}", self.guard.pid(), line.trim()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_backend_answers_with_its_address() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            c.write_all(b"127.0.0.1").expect("write");
        });
        assert_eq!(ask(addr).as_deref(), Some("127.0.0.1"));
        t.join().expect("join");
    }
}
