//! What a client outside the cluster sees: connections made from the
//! external client's netns ([`crate::names::Layout::ext_netns`], on the node
//! fabric, in no Node object) to node ports, external and LoadBalancer IPs.
//!
//! The socket is created on a thread that entered the netns
//! ([`crate::netns::in_netns`]), so every packet leaves from there; nothing
//! is sent from the root namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns;

/// What a probe server (`netboot-probe serve`) said over one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its name (the greeting): which backend answered.
    pub name: String,
    /// The source address it saw for the connection (its answer to
    /// `netboot::probe::PEER_QUERY`).
    pub source: IpAddr,
}

/// Why a connection gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAnswer {
    /// The SYN went unanswered until the timeout: dropped on the way.
    TimedOut,
    /// A RST (or ICMP port unreachable): refused.
    Refused,
    /// Anything else, with the error (no route, a reset mid-exchange, …).
    Other(String),
}

/// `netboot-probe peer?\n`: the probe server answers `peer IP\n` (the
/// bytes of `netboot::probe::PEER_QUERY`; the harness does not depend on the
/// bootstrapper, the test that uses both checks they agree).
pub const PEER_QUERY: &[u8] = b"netboot-probe peer?\n";

/// Connects from netns `from` to `target`, reads the probe server's
/// greeting and asks which source address it sees.
pub fn peer_seen(from: &str, target: SocketAddr, timeout: Duration) -> Result<Seen, NoAnswer> {
    let outcome = netns::in_netns(from, move || {
        let stream = match TcpStream::connect_timeout(&target, timeout) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(exchange(stream, timeout)))
    });
    match outcome {
        Err(e) => Err(NoAnswer::Other(e.to_string())),
        Ok(Err(e)) => Err(match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => NoAnswer::TimedOut,
            std::io::ErrorKind::ConnectionRefused => NoAnswer::Refused,
            _ => NoAnswer::Other(format!("connect {target}: {e}")),
        }),
        Ok(Ok(Err(e))) => Err(NoAnswer::Other(format!("{target}: {e}"))),
        Ok(Ok(Ok(seen))) => Ok(seen),
    }
}

fn exchange(mut stream: TcpStream, timeout: Duration) -> Result<Seen, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read greeting: {e}"))?;
    let name = line.trim().to_string();
    if name.is_empty() {
        return Err("closed without a greeting".into());
    }
    stream
        .write_all(PEER_QUERY)
        .map_err(|e| format!("write: {e}"))?;
    line.clear();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read peer answer: {e}"))?;
    let source = line
        .trim()
        .strip_prefix("peer ")
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .ok_or_else(|| format!("`{name}` answered {line:?} to the peer query"))?
        .to_canonical();
    Ok(Seen { name, source })
}

/// `GET /` from netns `from` to `target` (a healthCheckNodePort): (status,
/// body), or None without a complete answer within `timeout`.
pub fn http_get(from: &str, target: SocketAddr, timeout: Duration) -> Option<(u16, String)> {
    netns::in_netns(from, move || {
        Ok(crate::http::get(target, "/", timeout, timeout))
    })
    .ok()
    .flatten()
}
