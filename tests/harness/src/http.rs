//! A blocking HTTP/1.0 GET, for polling an agent's /readyz, /metrics and
//! /v1/status from tests, the bench and podnet.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET path HTTP/1.0` to `addr`: (status, body), or None if it could not
/// connect within `connect`, or no complete answer came within `read`.
pub fn get(
    addr: SocketAddr,
    path: &str,
    connect: Duration,
    read: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, connect).ok()?;
    s.set_read_timeout(Some(read)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_body_of_a_loopback_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // The request may arrive in pieces: read up to its blank line.
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(
                    n > 0,
                    "request ended early: {:?}",
                    String::from_utf8_lossy(&req)
                );
                req.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /readyz HTTP/1.0\r\n"));
            c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nno\n")
                .unwrap();
        });
        let got = get(
            addr,
            "/readyz",
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        assert_eq!(got, Some((503, "no\n".to_string())));
        t.join().unwrap();
    }
}
