//! netboot-probe: the workload netboot's checks and tests run inside pods.
//!
//! - `serve`: a TCP server that greets every connection with `NAME\n` and then
//!   echoes, and a UDP server that answers every datagram with `NAME`.
//! - `connect`: a small client for the same protocol that prints the names it
//!   receives (one per line), handy from `exec_in_pod` in tests.
//!
//! Plain std threads: the probe runs in many network namespaces at once and
//! must stay small. New subcommands are new variants of [`Command`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "netboot-probe", version, about = "netboot's probe workload")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve TCP (greeting + echo) and UDP (name reply).
    Serve(ServeArgs),
    /// Connect to a probe server and print the names it answers with.
    Connect(ConnectArgs),
    /// Run a validation plan (JSON, see netboot::probe) and report as JSON on
    /// stdout and in $TERMINATION_LOG (default /dev/termination-log).
    Check(CheckArgs),
    /// Keep one connected UDP socket to a probe server, asking it every
    /// interval, until the socket is aborted (its backend went and the
    /// datapath destroyed it: exit 0) or the time is up (exit 1). An
    /// unanswered ask is retried: only ECONNABORTED ends it early.
    Hold(HoldArgs),
}

#[derive(Debug, clap::Args)]
struct HoldArgs {
    /// Server address, HOST:PORT.
    target: String,
    /// How long to wait for the abort, in seconds.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Time between asks, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The plan, as JSON.
    #[arg(long)]
    plan: String,
    /// Where the report goes for the kubelet (or podnet) to read back.
    #[arg(long, env = "TERMINATION_LOG", default_value = "/dev/termination-log")]
    termination_log: std::path::PathBuf,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The name to answer with.
    #[arg(long, env = "POD_NAME")]
    name: String,
    /// TCP port (0 disables TCP).
    #[arg(long, default_value_t = 8080)]
    tcp_port: u16,
    /// UDP port (0 disables UDP).
    #[arg(long, default_value_t = 8081)]
    udp_port: u16,
    /// Address to bind. Default: every IPv6 and IPv4 address (`::`, and
    /// `0.0.0.0` where `::` does not take IPv4 too; `0.0.0.0` alone where the
    /// pod has no IPv6), so IPv6 ClusterIPs and IPv4-mapped clients reach it.
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, clap::Args)]
struct ConnectArgs {
    /// Protocol to use.
    proto: Proto,
    /// Server address, HOST:PORT.
    target: String,
    /// Number of connections (TCP) or datagrams (UDP); each answer is printed.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Timeout for each attempt, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Connect(args) => connect(args),
        Command::Check(args) => check(args),
        Command::Hold(args) => hold(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "netboot-probe: {}",
                netboot_contract::errors::chain(err.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn check(args: CheckArgs) -> Result<()> {
    let plan: netboot::probe::Plan =
        serde_json::from_str(&args.plan).context("--plan is not a valid plan")?;
    let report = netboot::probe::run(&plan);
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    // The termination message is capped at 4096 bytes; a report that cannot be written is still on stdout.
    if let Err(e) = std::fs::write(&args.termination_log, &json) {
        eprintln!(
            "netboot-probe: writing {}: {e}",
            args.termination_log.display()
        );
    }
    if report.ok() {
        Ok(())
    } else {
        bail!(
            "{} of {} checks failed",
            report.outcomes.iter().filter(|o| !o.ok).count(),
            report.outcomes.len()
        )
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if args.tcp_port == 0 && args.udp_port == 0 {
        bail!("both --tcp-port and --udp-port are 0: nothing to serve");
    }
    let mut handles = Vec::new();
    if args.tcp_port != 0 {
        for listener in bind_all(args.bind, args.tcp_port, TcpListener::bind, "tcp")? {
            let name = args.name.clone();
            eprintln!(
                "netboot-probe: {name} serving tcp on {}",
                listener.local_addr()?
            );
            handles.push(thread::spawn(move || serve_tcp(listener, name)));
        }
    }
    if args.udp_port != 0 {
        for socket in bind_all(args.bind, args.udp_port, UdpSocket::bind, "udp")? {
            let name = args.name.clone();
            eprintln!(
                "netboot-probe: {name} serving udp on {}",
                socket.local_addr()?
            );
            handles.push(thread::spawn(move || serve_udp(socket, name)));
        }
    }
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => bail!("server thread panicked"),
        }
    }
    Ok(())
}

/// The sockets to serve `port` on: `bind` alone if given; else `[::]` (which
/// takes IPv4 too unless the node's `net.ipv6.bindv6only` says otherwise:
/// then `0.0.0.0` binds beside it) or, without IPv6, `0.0.0.0`.
fn bind_all<S>(
    bind: Option<IpAddr>,
    port: u16,
    open: impl Fn(SocketAddr) -> std::io::Result<S>,
    proto: &str,
) -> Result<Vec<S>> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    if let Some(ip) = bind {
        let addr = SocketAddr::new(ip, port);
        return Ok(vec![
            open(addr).with_context(|| format!("bind {proto} {addr}"))?
        ]);
    }
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match open(v6) {
        Ok(s6) => match open(v4) {
            Ok(s4) => Ok(vec![s6, s4]),
            // [::] already takes IPv4: dual-stack.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(vec![s6]),
            Err(e) => Err(e).with_context(|| format!("bind {proto} {v4}")),
        },
        Err(e) => {
            eprintln!("netboot-probe: bind {proto} {v6}: {e}; IPv4 only");
            Ok(vec![open(v4).with_context(|| format!("bind {proto} {v4}"))?])
        }
    }
}

fn serve_tcp(listener: TcpListener, name: String) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(err) => {
                // Transient (EMFILE, ECONNABORTED): keep serving.
                eprintln!("netboot-probe: accept: {err}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let name = name.clone();
        thread::spawn(move || {
            // A client that goes away mid-echo is not an error worth reporting.
            let _ = greet_and_echo(stream, &name, peer);
        });
    }
}

/// Greets with the name, then echoes; a read that is exactly
/// [`netboot::probe::PEER_QUERY`] is answered with the source address seen instead.
fn greet_and_echo(mut stream: TcpStream, name: &str, peer: SocketAddr) -> std::io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if &buf[..n] == netboot::probe::PEER_QUERY {
            stream.write_all(format!("peer {}\n", peer.ip().to_canonical()).as_bytes())?;
        } else {
            stream.write_all(&buf[..n])?;
        }
    }
}

fn serve_udp(socket: UdpSocket, name: String) -> Result<()> {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(err) = socket.send_to(name.as_bytes(), peer) {
                    eprintln!("netboot-probe: udp reply to {peer}: {err}");
                }
            }
            Err(err) => {
                eprintln!("netboot-probe: udp recv: {err}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn connect(args: ConnectArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let addr = resolve(&args.target)?;
    let mut failures = 0u32;
    for _ in 0..args.count.max(1) {
        let answer = match args.proto {
            Proto::Tcp => tcp_name(addr, timeout),
            Proto::Udp => udp_name(addr, timeout),
        };
        match answer {
            Ok(name) => println!("{name}"),
            Err(err) => {
                failures += 1;
                eprintln!(
                    "netboot-probe: {addr}: {}",
                    netboot_contract::errors::chain(err.as_ref())
                );
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} of {} attempts to {addr} failed",
            args.count.max(1)
        );
    }
    Ok(())
}

fn hold(args: HoldArgs) -> Result<()> {
    let addr = resolve(&args.target)?;
    let socket = udp_socket_for(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(args.interval_ms.max(10))))?;
    socket.connect(addr).context("udp connect")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(args.seconds);
    let mut answered = 0u64;
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        let r = socket.send(b"ping").and_then(|_| socket.recv(&mut buf));
        match r {
            Ok(n) => {
                if answered == 0 {
                    println!("held: {}", String::from_utf8_lossy(&buf[..n]));
                }
                answered += 1;
                std::thread::sleep(Duration::from_millis(args.interval_ms.max(10)));
            }
            Err(e) => {
                // A socket destroyed between two asks is disconnected: its
                // send fails (EDESTADDRREQ) and the abort waits in SO_ERROR.
                let pending = socket.take_error().ok().flatten();
                let abort = [Some(&e), pending.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|e| e.raw_os_error() == Some(libc::ECONNABORTED));
                if let Some(abort) = abort {
                    println!("aborted after {answered} answers: {abort}");
                    return Ok(());
                }
                // Unanswered (the backend is going) or refused: ask again.
                std::thread::sleep(Duration::from_millis(args.interval_ms.max(10)));
            }
        }
    }
    bail!(
        "{addr}: the connected socket was not aborted within {} s ({answered} answers)",
        args.seconds
    )
}

/// The first address `target` (HOST:PORT) resolves to.
fn resolve(target: &str) -> Result<SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("resolve {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))
}

/// An unconnected UDP socket of `addr`'s family, on an ephemeral port.
fn udp_socket_for(addr: SocketAddr) -> Result<UdpSocket> {
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    UdpSocket::bind(bind).context("udp bind")
}

fn tcp_name(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).context("tcp connect")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line).context("read greeting")?;
    let name = line.trim_end().to_string();
    if name.is_empty() {
        bail!("server closed without a greeting");
    }
    // Check the echo half too, so a half-working path does not pass.
    let mut writer = stream;
    writer.write_all(b"ping\n").context("write echo")?;
    let mut echo = String::new();
    reader.read_line(&mut echo).context("read echo")?;
    if echo != "ping\n" {
        bail!("echo mismatch: got {echo:?}");
    }
    Ok(name)
}

fn udp_name(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let socket = udp_socket_for(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr).context("udp connect")?;
    socket.send(b"ping").context("udp send")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).context("udp receive")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn serve_binds_every_family_by_default() {
        // Why: IPv6 ClusterIPs reach the pod's IPv6 address; IPv4 and v4-mapped clients its IPv4 one.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listeners = bind_all(None, port, TcpListener::bind, "tcp").unwrap();
        let mut targets = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
        if listeners
            .iter()
            .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv6()))
        {
            targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
            targets.push(SocketAddr::from((
                Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
                port,
            )));
        }
        for t in targets {
            TcpStream::connect_timeout(&t, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{t}: {e}"));
        }
        // An explicit --bind binds that address alone.
        let only = bind_all(
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            0,
            UdpSocket::bind,
            "udp",
        )
        .unwrap();
        assert_eq!(only.len(), 1);
    }
}
