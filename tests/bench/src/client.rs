//! The compiled client: this binary re-executed (`netboot-bench __client`)
//! inside a cgroup and a client namespace (it joins both before exec), driven
//! over stdin/stdout so that batches of the four variants can be interleaved.
//!
//! Protocol, one line each way:
//! `C <ip> <port> <count>` → `R <ok> <failed> <last errno> <ns> <ns> …`
//! (the connect() time of every successful attempt), `F` → `F <errno>`
//! (switch to SCHED_FIFO priority 1, `--realtime-clients`), `Q` → exit.
//! `E <bytes>` → `E 0`: from now on, before each attempt (untimed), write
//! over a buffer of that many bytes, one store per cache line, so the
//! attempt starts with cold CPU caches and TLBs (`flows --cold-kib`).
//! `H <ip> <port> <count>` → `W <wall ns> <ok> <failed> <last errno> <ns> …`:
//! the same with one request per connection (north–south section): after
//! the timed connect(), send [`REQUEST`], read the reply to its end (the
//! server closes), then close; `wall ns` is the whole batch's time.
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

/// What a request-mode attempt sends (the server answers and closes).
pub const REQUEST: &[u8] = b"GET\n";

/// Result of one batch.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Connect times of successful attempts, nanoseconds.
    pub ns: Vec<u64>,
    /// Failed attempts.
    pub failed: u64,
    /// errno of the last failure (0 if none).
    pub errno: i32,
    /// Request mode: the batch's wall time, ns (0 in connect mode).
    pub wall_ns: u64,
}

fn attempt(addr: SocketAddr, request: bool) -> std::result::Result<u64, i32> {
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
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    r.map_err(errno)?;
    if request {
        use std::io::Read as _;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut s = std::net::TcpStream::from(s);
        s.write_all(REQUEST).map_err(errno)?;
        let mut reply = [0u8; 64];
        let mut got = 0;
        loop {
            match s.read(&mut reply[got.min(63)..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) => return Err(errno(e)),
            }
        }
        if got == 0 {
            return Err(libc::ECONNRESET);
        }
    }
    Ok(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX))
}

/// Runs `count` attempts against `addr`.
pub fn run_batch(addr: SocketAddr, count: u32) -> Batch {
    batch_of(addr, count, false, &mut [])
}

/// One store in each 64-byte line of `buf`: afterwards the caches and TLBs
/// hold it rather than what ran before.
fn evict(buf: &mut [u8]) {
    for line in buf.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(buf);
}

/// Runs `count` attempts against `addr`, each with one request when
/// `request`, each after writing over `cold` (untimed; empty: none); the
/// wall time is the whole batch's.
pub fn batch_of(addr: SocketAddr, count: u32, request: bool, cold: &mut [u8]) -> Batch {
    let t = Instant::now();
    let mut b = Batch {
        ns: Vec::with_capacity(count as usize),
        ..Default::default()
    };
    for _ in 0..count {
        if !cold.is_empty() {
            evict(cold);
        }
        match attempt(addr, request) {
            Ok(ns) => b.ns.push(ns),
            Err(e) => {
                b.failed += 1;
                b.errno = e;
            }
        }
    }
    if request {
        b.wall_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }
    b
}

/// Entry point of `netboot-bench __client`.
pub fn child_main() -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut cold: Vec<u8> = Vec::new();
    for line in stdin.lock().lines() {
        let line = line?;
        let mut it = line.split_whitespace();
        match it.next() {
            Some(cmd @ ("C" | "H")) => {
                let ip = it.next().context("ip")?;
                let port = it.next().context("port")?;
                let count: u32 = it.next().context("count")?.parse()?;
                let addr = SocketAddr::new(ip.parse::<IpAddr>()?, port.parse()?);
                let b = batch_of(addr, count, cmd == "H", &mut cold);
                let mut reply = if cmd == "H" {
                    format!("W {} ", b.wall_ns)
                } else {
                    String::new()
                };
                reply.push_str(&format!("R {} {} {}", b.ns.len(), b.failed, b.errno));
                for ns in &b.ns {
                    reply.push(' ');
                    reply.push_str(&ns.to_string());
                }
                writeln!(out, "{reply}")?;
                out.flush()?;
            }
            Some("E") => {
                let bytes: usize = it.next().context("bytes")?.parse()?;
                cold = vec![0u8; bytes];
                writeln!(out, "E 0")?;
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

    /// Pins the client to one CPU (`--client-cpu`): on two shared cores the
    /// scheduler keeps each client mostly on one CPU, not necessarily the
    /// same one for every row, and the two CPUs' other work differs.
    pub fn pin(&self, cpu: usize) -> Result<()> {
        let pid = self.guard.pid();
        let target = libc::pid_t::try_from(pid).context("client pid")?;
        if cpu >= cpu_set_size() {
            bail!(
                "--client-cpu {cpu}: beyond the kernel's CPU set ({} CPUs)",
                libc::CPU_SETSIZE
            );
        }
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it
        // (the CPU was checked against its size above), and
        // sched_setaffinity only reads the set.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(target, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            bail!(
                "pinning client pid {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// From now on, write over a buffer of `bytes` before each attempt
    /// (0: stop).
    pub fn cold(&mut self, bytes: usize) -> Result<()> {
        writeln!(self.stdin, "E {bytes}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "E 0" {
            bail!("client pid {} replied {:?}", self.guard.pid(), line.trim());
        }
        Ok(())
    }

    /// One batch of `count` connections to `addr`.
    pub fn batch(&mut self, addr: SocketAddr, count: u32) -> Result<Batch> {
        self.send("C", addr, count)
    }

    /// One batch of `count` connections to `addr`, one request each.
    pub fn requests(&mut self, addr: SocketAddr, count: u32) -> Result<Batch> {
        self.send("H", addr, count)
    }

    fn send(&mut self, cmd: &str, addr: SocketAddr, count: u32) -> Result<Batch> {
        crate::cleanup::check_stop()?;
        writeln!(self.stdin, "{cmd} {} {} {count}", addr.ip(), addr.port())?;
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
    let mut it = line.split_whitespace().peekable();
    let mut wall_ns = 0;
    if it.peek() == Some(&"W") {
        it.next();
        wall_ns = it.next().context("wall time")?.parse()?;
    }
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
    Ok(Batch {
        ns,
        failed,
        errno,
        wall_ns,
    })
}

/// CPUs a `cpu_set_t` holds (CPU_SETSIZE, 1024).
fn cpu_set_size() -> usize {
    usize::try_from(libc::CPU_SETSIZE).unwrap_or(0)
}

/// `--client-cpu auto`: the highest CPU this process may run on (on the
/// 2-core machines here, CPU 1, where the P1 runs since 2026-12-07 night
/// pinned their clients).
pub fn highest_allowed_cpu() -> Result<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its
    // size into it, and CPU_ISSET reads inside it (i < CPU_SETSIZE).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!(
                "--client-cpu auto: sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
        }
        set
    };
    // SAFETY: as above.
    (0..cpu_set_size())
        .rev()
        .find(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .context("--client-cpu auto: this process may run on no CPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_client_cpu_is_the_last_in_cpus_allowed_list() {
        // /proc/self/status says the same set another way: "0-1", "0,3-5".
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim();
        let last = list.rsplit([',', '-']).next().expect("entry");
        assert_eq!(
            highest_allowed_cpu().expect("affinity"),
            last.parse::<usize>().expect("number"),
            "{list}"
        );
    }

    #[test]
    fn replies_round_trip() {
        let b = parse_reply("R 3 1 111 10 20 30\n").expect("parse");
        assert_eq!(b.ns, vec![10, 20, 30]);
        assert_eq!((b.failed, b.errno), (1, 111));
        assert!(parse_reply("R 2 0 0 10\n").is_err());
        assert!(parse_reply("X").is_err());
        let b = parse_reply("W 5000 R 1 0 0 10\n").expect("parse");
        assert_eq!((b.wall_ns, b.ns.clone()), (5000, vec![10]));
    }

    #[test]
    fn request_mode_reads_the_reply_to_its_end() {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let (mut s, _) = l.accept().expect("accept");
                let mut req = [0u8; 4];
                s.read_exact(&mut req).expect("request");
                assert_eq!(&req, REQUEST);
                s.write_all(b"ok\n").expect("reply");
            }
        });
        let b = batch_of(addr, 3, true, &mut []);
        server.join().expect("server");
        assert_eq!((b.ns.len(), b.failed), (3, 0), "{b:?}");
        assert!(b.wall_ns >= b.ns.iter().sum::<u64>(), "{b:?}");
    }

    #[test]
    fn batch_against_a_loopback_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let b = run_batch(addr, 5);
        assert_eq!(b.ns.len(), 5, "{b:?}");
        assert!(b.ns.iter().all(|ns| *ns > 0));
        // With a cold buffer: one store per line before each attempt.
        let mut cold = vec![0u8; 200];
        let b = batch_of(addr, 3, false, &mut cold);
        assert_eq!(b.ns.len(), 3, "{b:?}");
        assert_eq!((cold[0], cold[64], cold[128], cold[192]), (3, 3, 3, 3));
        assert_eq!((cold[1], cold[63], cold[199]), (0, 0, 0));
        let SocketAddr::V4(v4) = addr else {
            panic!("bound 127.0.0.1, got {addr}");
        };
        // The same listener through an AF_INET6 socket, IPv4-mapped.
        let b = run_batch(crate::workload::mapped(v4), 5);
        assert_eq!(b.ns.len(), 5, "{b:?}");
    }
}
