//! The API server's egress into the cluster. The local cluster's
//! kube-apiserver runs with an `EgressSelectorConfiguration` whose `cluster`
//! egress is HTTP CONNECT over this Unix socket (tests/cluster/up), so every
//! connection it makes to a kubelet, a pod or a Service comes here instead
//! of to a routed address.
//!
//! Only a kubelet's is served: `CONNECT <node>:<kubelet port>`, where the
//! node is a Node's name or one of its addresses, is joined to kwok's
//! kubelet API on 127.0.0.1 (kwok serves port-forward, exec and logs for
//! every fake node). Nothing else is dialled: pod and Service `/proxy`
//! requests are answered 403, so the API server cannot be made to send a
//! packet anywhere but loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Error;

/// Longest CONNECT request head read before giving up.
const MAX_HEAD: usize = 8 * 1024;

/// Where a CONNECT may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// To kwok's kubelet API at this loopback address.
    Kubelet(String),
    /// Refused, with why (sent back to the API server and logged).
    Refused(String),
}

/// Decides a `CONNECT host:port` target: a kubelet's (a known node, the
/// kubelet port) goes to kwok on loopback; anything else is refused.
pub fn decide(target: &str, kubelet_port: u16, is_node: impl Fn(&str) -> bool) -> Verdict {
    let Some((host, port)) = target.rsplit_once(':') else {
        return Verdict::Refused(format!("{target}: not host:port"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(port) = port.parse::<u16>() else {
        return Verdict::Refused(format!("{target}: bad port"));
    };
    if port != kubelet_port {
        return Verdict::Refused(format!(
            "{target}: only kubelets (port {kubelet_port}) are reachable from the local API server; pod and Service proxying is not served"
        ));
    }
    if !is_node(host) {
        return Verdict::Refused(format!("{target}: {host} is no Node's name or address"));
    }
    Verdict::Kubelet(format!("127.0.0.1:{kubelet_port}"))
}

/// The target of a CONNECT request head (`CONNECT host:port HTTP/1.1`).
pub fn connect_target(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some(v)) if v.starts_with("HTTP/1.") => Some(target),
        _ => None,
    }
}

fn node_matches(nodes: &Store<Node>, host: &str) -> bool {
    nodes.state().iter().any(|n| {
        n.metadata.name.as_deref() == Some(host)
            || n.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .is_some_and(|a| a.iter().any(|a| a.address == host))
    })
}

/// Listens on `socket` (replacing a stale one) and serves CONNECTs.
pub fn spawn(
    socket: PathBuf,
    kubelet_port: u16,
    nodes: Store<Node>,
) -> Result<JoinHandle<()>, Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    if socket.exists() {
        std::fs::remove_file(&socket).map_err(io(format!("remove stale {}", socket.display())))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let listener = UnixListener::bind(&socket).map_err(io(format!("bind {}", socket.display())))?;
    restrict(&socket).map_err(io(format!("chmod {}", socket.display())))?;
    info!(socket = %socket.display(), kubelet_port, "API server egress proxy: kubelets -> kwok on loopback, everything else refused");
    Ok(tokio::spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    warn!(error = %e, "egress proxy accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let nodes = nodes.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(conn, kubelet_port, &nodes).await {
                    debug!(error = %e, "egress proxy connection");
                }
            });
        }
    }))
}

/// Only root (the API server runs as root here) may connect.
fn restrict(socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
}

async fn serve(
    mut conn: UnixStream,
    kubelet_port: u16,
    nodes: &Store<Node>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            conn.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                .await?;
            return Ok(());
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    // Bytes after the head would be the client's first tunnel bytes; an
    // HTTP CONNECT client waits for our 200 first, so there are none.
    let text = String::from_utf8_lossy(&head);
    let Some(target) = connect_target(&text) else {
        warn!(request = %text.lines().next().unwrap_or(""), "egress proxy: not a CONNECT; refused");
        conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await?;
        return Ok(());
    };
    match decide(target, kubelet_port, |h| node_matches(nodes, h)) {
        Verdict::Refused(why) => {
            warn!(%target, "egress proxy: refused: {why}");
            let body = format!("{why}\n");
            conn.write_all(
                format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            Ok(())
        }
        Verdict::Kubelet(addr) => {
            let mut up = match tokio::net::TcpStream::connect(&addr).await {
                Ok(up) => up,
                Err(e) => {
                    warn!(%target, %addr, error = %e, "egress proxy: kwok's kubelet API unreachable");
                    conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await?;
                    return Ok(());
                }
            };
            debug!(%target, %addr, "egress proxy: kubelet connection");
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_nodes_kubelet_port_is_served_and_only_on_loopback() {
        let is_node = |h: &str| h == "node-0" || h == "172.18.1.1";
        assert_eq!(
            decide("node-0:10247", 10247, is_node),
            Verdict::Kubelet("127.0.0.1:10247".into())
        );
        assert_eq!(
            decide("172.18.1.1:10247", 10247, is_node),
            Verdict::Kubelet("127.0.0.1:10247".into())
        );
        // A pod's or Service's /proxy, another port of a node, an unknown host.
        for t in [
            "10.244.1.5:8080",
            "172.18.1.1:22",
            "example.com:10247",
            "node-0",
            "node-0:x",
        ] {
            assert!(
                matches!(decide(t, 10247, is_node), Verdict::Refused(_)),
                "{t} must be refused"
            );
        }
    }

    #[test]
    fn reads_the_connect_target() {
        assert_eq!(
            connect_target("CONNECT node-1:10247 HTTP/1.1\r\nHost: node-1:10247\r\n\r\n"),
            Some("node-1:10247")
        );
        assert_eq!(connect_target("GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(connect_target(""), None);
    }
}
