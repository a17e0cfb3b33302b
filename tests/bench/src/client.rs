//! The compiled client: this binary re-executed (`netboot-bench __client`)
//! inside a cgroup and a client namespace (it joins both before exec), driven
//! over stdin/stdout so that batches of the four variants can be interleaved.
//!
//! Protocol, one line each way:
//! `C <ip> <port> <count>` → `R <ok> <failed> <last errno> <ns> <ns> …`
//! (the connect() time of every successful attempt), `F` → `F <errno>`
//! (switch to SCHED_FIFO priority 1, `--realtime-clients`), `Q` → exit.
//!
//! One attempt: socket(), then the timed part — a blocking connect() that
//! returns once the handshake completed (SYN-ACK received, ACK sent) — then
//! close with SO_LINGER 0 (RST: no TIME_WAIT, so ports never run out).
//! The socket's family follows the address: AF_INET for IPv4, AF_INET6 for
//! IPv6 and for IPv4-mapped (`::ffff:a.b.c.d`, with IPV6_V6ONLY off).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cleanup::{ChildGuard, Netns};

/// Result of one batch.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Connect times of successful attempts, nanoseconds.
    pub ns: Vec<u64>,
    /// Failed attempts.
    pub failed: u64,
    /// errno of the last failure (0 if none).
    pub errno: i32,
}

fn attempt(addr: SocketAddr) -> std::result::Result<u64, i32> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    if addr.is_ipv6() {
        // IPv4-mapped destinations need a dual-stack socket.
        s.set_only_v6(false)
            .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    }
    // connect() of a blocking socket gives up after SO_SNDTIMEO.
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_linger(Some(Duration::ZERO));
    let t = Instant::now();
    let r = s.connect(&addr.into());
    let took = t.elapsed();
    drop(s);
    match r {
        Ok(()) => Ok(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

/// Runs `count` attempts against `addr`.
pub fn run_batch(addr: SocketAddr, count: u32) -> Batch {
    let mut b = Batch {
        ns: Vec::with_capacity(count as usize),
        ..Default::default()
    };
    for _ in 0..count {
        match attempt(addr) {
            Ok(ns) => b.ns.push(ns),
            Err(e) => {
                b.failed += 1;
                b.errno = e;
            }
        }
    }
    b
}

/// Entry point of `netboot-bench __client`.
pub fn child_main() -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let mut it = line.split_whitespace();
        match it.next() {
            Some("C") => {
                let ip = it.next().context("ip")?;
                let port = it.next().context("port")?;
                let count: u32 = it.next().context("count")?.parse()?;
                let addr = SocketAddr::new(ip.parse::<IpAddr>()?, port.parse()?);
                let b = run_batch(addr, count);
                let mut reply = format!("R {} {} {}", b.ns.len(), b.failed, b.errno);
                for ns in &b.ns {
                    reply.push(' ');
                    reply.push_str(&ns.to_string());
                }
                writeln!(out, "{reply}")?;
                out.flush()?;
            }
            Some("F") => {
                // SCHED_FIFO, lowest real-time priority: no ordinary task
                // preempts the client in connect() (the kernel's RT
                // throttling still leaves others 5% of each second).
                let param = libc::sched_param { sched_priority: 1 };
                // SAFETY: sets this process's own policy; `param` outlives the call.
                let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
                let errno = if rc == 0 {
                    0
                } else {
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
                };
                writeln!(out, "F {errno}")?;
                out.flush()?;
            }
            Some("Q") | None => break,
            Some(other) => bail!("unknown client command {other}"),
        }
    }
    Ok(())
}

/// A running client child, in its cgroup and namespace.
pub struct Client {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    guard: ChildGuard,
}

impl Client {
    /// Spawns the client: the child writes itself into `cgroup`, enters `ns`,
    /// then execs.
    pub fn spawn(cgroup: &Path, ns: &Netns) -> Result<Self> {
        crate::cleanup::check_stop()?;
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("__client")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        netboot_harness::process::Confine {
            cgroup: Some(cgroup.to_path_buf()),
            netns: Some(ns.path()),
            ..Default::default()
        }
        .apply(&mut cmd)
        .with_context(|| format!("confining a client to {}", ns.name))?;
        let child = cmd.spawn().context("spawning a client")?;
        let mut guard = ChildGuard::new(child);
        let c = guard.child_mut().context("client child")?;
        let stdin = c.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(c.stdout.take().context("client stdout")?);
        Ok(Self {
            stdin,
            stdout,
            guard,
        })
    }

    /// Switches the client to SCHED_FIFO priority 1 (`--realtime-clients`).
    pub fn realtime(&mut self) -> Result<()> {
        writeln!(self.stdin, "F")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim().strip_prefix("F ").map(str::parse::<i32>) {
            Some(Ok(0)) => Ok(()),
            Some(Ok(e)) => bail!(
                "sched_setscheduler(SCHED_FIFO): {}",
                std::io::Error::from_raw_os_error(e)
            ),
            _ => bail!("client pid {} replied {:?}", self.guard.pid(), line.trim()),
        }
    }

    /// One batch of `count` connections to `addr`.
    pub fn batch(&mut self, addr: SocketAddr, count: u32) -> Result<Batch> {
        crate::cleanup::check_stop()?;
        writeln!(self.stdin, "C {} {} {count}", addr.ip(), addr.port())?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        parse_reply(&line)
            .with_context(|| format!("client pid {} replied {:?}", self.guard.pid(), line.trim()))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "Q");
        let _ = self.stdin.flush();
        self.guard.stop(Duration::from_secs(2));
    }
}

fn parse_reply(line: &str) -> Result<Batch> {
    let mut it = line.split_whitespace();
    if it.next() != Some("R") {
        bail!("not a reply");
    }
    let ok: usize = it.next().context("ok")?.parse()?;
    let failed: u64 = it.next().context("failed")?.parse()?;
    let errno: i32 = it.next().context("errno")?.parse()?;
    let ns = it.map(str::parse).collect::<Result<Vec<u64>, _>>()?;
    if ns.len() != ok {
        bail!("{ok} successes announced, {} times sent", ns.len());
    }
    Ok(Batch { ns, failed, errno })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let b = parse_reply("R 3 1 111 10 20 30\n").expect("parse");
        assert_eq!(b.ns, vec![10, 20, 30]);
        assert_eq!((b.failed, b.errno), (1, 111));
        assert!(parse_reply("R 2 0 0 10\n").is_err());
        assert!(parse_reply("X").is_err());
    }

    #[test]
    fn batch_against_a_loopback_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let b = run_batch(addr, 5);
        assert_eq!(b.ns.len(), 5, "{b:?}");
        assert!(b.ns.iter().all(|ns| *ns > 0));
        let SocketAddr::V4(v4) = addr else {
            panic!("bound 127.0.0.1, got {addr}");
        };
        // The same listener through an AF_INET6 socket, IPv4-mapped.
        let b = run_batch(crate::workload::mapped(v4), 5);
        assert_eq!(b.ns.len(), 5, "{b:?}");
    }
}
