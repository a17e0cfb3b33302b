//! Connectivity checks run from inside a pod by `netboot-probe check`.
//!
//! `netboot validate` builds a [`Plan`] (targets it read from the API),
//! starts a client pod that runs it, and reads the [`Report`] back from the
//! pod's termination message. Plain blocking sockets: the checks are a handful
//! of connections with short timeouts.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What to check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub checks: Vec<Check>,
    /// Per connection attempt.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    2000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Check {
    /// Connect to every target; each must answer with a name from `names`.
    /// With `same`, all answers must be one name (session affinity).
    Tcp {
        name: String,
        targets: Vec<SocketAddr>,
        attempts: u32,
        names: Vec<String>,
        #[serde(default)]
        same: bool,
    },
    /// As `Tcp`, over UDP datagrams.
    Udp {
        name: String,
        targets: Vec<SocketAddr>,
        attempts: u32,
        names: Vec<String>,
    },
    /// A TCP handshake completes (the API server through its ClusterIP).
    Connect {
        name: String,
        targets: Vec<SocketAddr>,
    },
    /// The pod's resolver resolves `host` to `expect`.
    Dns {
        name: String,
        host: String,
        expect: String,
    },
}

impl Check {
    pub fn name(&self) -> &str {
        match self {
            Check::Tcp { name, .. }
            | Check::Udp { name, .. }
            | Check::Connect { name, .. }
            | Check::Dns { name, .. } => name,
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.outcomes.iter().all(|o| o.ok)
    }
}

/// Runs every check; never stops early, so the report shows them all.
pub fn run(plan: &Plan) -> Report {
    let timeout = Duration::from_millis(plan.timeout_ms.max(1));
    let outcomes = plan
        .checks
        .iter()
        .map(|check| {
            let start = Instant::now();
            let (ok, detail) = match run_check(check, timeout) {
                Ok(detail) => (true, detail),
                Err(detail) => (false, detail),
            };
            Outcome {
                name: check.name().to_string(),
                ok,
                detail,
                millis: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            }
        })
        .collect();
    Report { outcomes }
}

fn run_check(check: &Check, timeout: Duration) -> Result<String, String> {
    match check {
        Check::Tcp {
            targets,
            attempts,
            names,
            same,
            ..
        } => {
            let seen = exchange(targets, *attempts, names, |t| tcp_name(*t, timeout))?;
            if *same && seen.len() != 1 {
                return Err(format!(
                    "answers came from {} backends ({}); expected one (affinity)",
                    seen.len(),
                    join(&seen)
                ));
            }
            Ok(format!(
                "{} connections to {} answered by {}",
                attempts * u32::try_from(targets.len()).unwrap_or(u32::MAX),
                join_addrs(targets),
                join(&seen)
            ))
        }
        Check::Udp {
            targets,
            attempts,
            names,
            ..
        } => {
            let seen = exchange(targets, *attempts, names, |t| udp_name(*t, timeout))?;
            Ok(format!(
                "{} datagrams to {} answered by {}",
                attempts * u32::try_from(targets.len()).unwrap_or(u32::MAX),
                join_addrs(targets),
                join(&seen)
            ))
        }
        Check::Connect { targets, .. } => {
            for t in targets {
                TcpStream::connect_timeout(t, timeout).map_err(|e| format!("connect {t}: {e}"))?;
            }
            Ok(format!("connected to {}", join_addrs(targets)))
        }
        Check::Dns { host, expect, .. } => {
            let addrs: Vec<String> = (host.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| format!("resolve {host}: {e}"))?
                .map(|a| a.ip().to_string())
                .collect();
            if addrs.iter().any(|a| a == expect) {
                Ok(format!("{host} → {}", addrs.join(", ")))
            } else {
                Err(format!(
                    "{host} resolved to [{}], expected {expect}",
                    addrs.join(", ")
                ))
            }
        }
    }
}

fn exchange(
    targets: &[SocketAddr],
    attempts: u32,
    names: &[String],
    ask: impl Fn(&SocketAddr) -> Result<String, String>,
) -> Result<BTreeSet<String>, String> {
    let mut seen = BTreeSet::new();
    for t in targets {
        for i in 0..attempts.max(1) {
            let name = ask(t).map_err(|e| format!("attempt {} to {t}: {e}", i + 1))?;
            if !names.is_empty() && !names.contains(&name) {
                return Err(format!(
                    "{t} answered `{name}`, which is not one of the probe pods ({})",
                    names.join(", ")
                ));
            }
            seen.insert(name);
        }
    }
    Ok(seen)
}

fn tcp_name(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let name = line.trim().to_string();
    if name.is_empty() {
        return Err("connection closed without an answer".into());
    }
    Ok(name)
}

fn udp_name(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| format!("connect: {e}"))?;
    socket
        .send(b"netboot-probe")
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn join_addrs(t: &[SocketAddr]) -> String {
    t.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn server(name: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = writeln!(s, "{name}");
            }
        });
        addr
    }

    #[test]
    fn tcp_check_passes_and_fails_on_names() {
        let a = server("probe-a");
        let ok = Plan {
            checks: vec![Check::Tcp {
                name: "t".into(),
                targets: vec![a],
                attempts: 3,
                names: vec!["probe-a".into()],
                same: true,
            }],
            timeout_ms: 1000,
        };
        let r = run(&ok);
        assert!(r.ok(), "{r:?}");
        let bad = Plan {
            checks: vec![Check::Tcp {
                name: "t".into(),
                targets: vec![a],
                attempts: 1,
                names: vec!["other".into()],
                same: false,
            }],
            timeout_ms: 1000,
        };
        let r = run(&bad);
        assert!(!r.ok());
        assert!(
            r.outcomes[0].detail.contains("not one of the probe pods"),
            "{r:?}"
        );
    }

    #[test]
    fn refused_connection_fails_with_reason() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = run(&Plan {
            checks: vec![Check::Connect {
                name: "c".into(),
                targets: vec![addr],
            }],
            timeout_ms: 500,
        });
        assert!(!r.ok());
        assert!(r.outcomes[0].detail.contains("connect"), "{r:?}");
    }

    #[test]
    fn dns_check_uses_the_resolver() {
        let r = run(&Plan {
            checks: vec![Check::Dns {
                name: "d".into(),
                host: "localhost".into(),
                expect: "127.0.0.1".into(),
            }],
            timeout_ms: 500,
        });
        assert!(r.ok(), "{r:?}");
    }

    #[test]
    fn plan_round_trips_as_json() {
        let p = Plan {
            checks: vec![Check::Dns {
                name: "d".into(),
                host: "x".into(),
                expect: "1.2.3.4".into(),
            }],
            timeout_ms: 5,
        };
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains("\"kind\":\"dns\""), "{s}");
        assert_eq!(serde_json::from_str::<Plan>(&s).unwrap(), p);
    }
}
