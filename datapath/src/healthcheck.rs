//! kube-proxy's `healthCheckNodePort` server (pkg/proxy/healthcheck,
//! `service_health.go`): for each Service with `externalTrafficPolicy:
//! Local` and a `spec.healthCheckNodePort`, the agent listens on that port
//! (0.0.0.0, IPv4) and answers any path with
//!
//! ```text
//! {"service":{"namespace":…,"name":…},"localEndpoints":N,"serviceProxyHealthy":true}
//! ```
//!
//! (kube-proxy's bytes: tab-indented), `200` when N > 0 and the agent is
//! healthy, `503` otherwise, with `X-Load-Balancing-Endpoint-Weight: N`.
//! N is the number of distinct ready endpoint addresses of the Service on
//! this node, as the per-packet path uses them (`External::local`). A cloud
//! load balancer thus sends traffic only to nodes with local endpoints.
//! Each port is bounded like the agent's other listeners ([`LIMITS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::desired::{ServiceKey, ServiceTable};
use crate::http::{self, Handler, Limits};

/// What one health check port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// The Service.
    pub namespace: String,
    /// The Service.
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// Limits of each health check listener: 16 connections at once, the
/// agent's timeouts and header limits.
pub const LIMITS: Limits = Limits {
    max_connections: 16,
    header_read_timeout: std::time::Duration::from_secs(5),
    request_timeout: std::time::Duration::from_secs(10),
    max_header_bytes: 8192,
    max_headers: 32,
};

/// The health check ports wanted: `services` are (healthCheckNodePort,
/// Service) of the externalTrafficPolicy Local Services
/// ([`crate::watch::Watched::health_check_services`]); the local endpoint
/// count comes from the desired table. Two Services claiming one port: the
/// greater key wins (as frontends do).
pub fn wanted(services: &[(u16, ServiceKey)], table: &ServiceTable) -> BTreeMap<u16, HealthCheck> {
    let mut out = BTreeMap::new();
    for (port, key) in services {
        let local: BTreeSet<IpAddr> = table
            .service(key)
            .iter()
            .filter_map(|fe| fe.external.as_ref())
            .filter(|e| e.local_only)
            .flat_map(|e| e.local.iter().map(|b| b.ip))
            .collect();
        let hc = HealthCheck {
            namespace: key.0.to_string(),
            name: key.1.to_string(),
            local_endpoints: local.len(),
        };
        match out.get(port) {
            Some(HealthCheck {
                namespace, name, ..
            }) if (namespace, name) > (&hc.namespace, &hc.name) => {}
            _ => {
                out.insert(*port, hc);
            }
        }
    }
    out
}

/// The answer (kube-proxy's body, status and headers).
pub fn respond(method: &hyper::Method, hc: &HealthCheck, healthy: bool) -> Response<Full<Bytes>> {
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return http::reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        q(&hc.namespace),
        q(&hc.name),
        hc.local_endpoints,
        healthy
    );
    let code = if hc.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = http::reply(code, "application/json", body);
    let h = r.headers_mut();
    h.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "x-load-balancing-endpoint-weight",
        hyper::header::HeaderValue::from(hc.local_endpoints),
    );
    r
}

struct Server {
    hc: Arc<Mutex<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The running health check listeners, one per port.
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Where to listen (`0.0.0.0`; tests may use another address).
    pub bind: IpAddr,
}

impl HealthServers {
    /// No listeners yet; `healthy` is `serviceProxyHealthy`, read per request.
    pub fn new(healthy: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        Self {
            servers: BTreeMap::new(),
            healthy,
            bind: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }

    /// Ports listened on.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Listens on the wanted ports and stops the others; returns the ports
    /// that could not be bound, with why (tried again next time).
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, String)> {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(s) = self.servers.remove(&p) {
                s.task.abort();
                tracing::info!(port = p, "healthCheckNodePort closed");
            }
        }
        let mut failed = Vec::new();
        for (port, hc) in wanted {
            if let Some(s) = self.servers.get(port) {
                if let Ok(mut cur) = s.hc.lock() {
                    *cur = hc.clone();
                }
                continue;
            }
            let addr = std::net::SocketAddr::new(self.bind, *port).to_string();
            match http::bind(&addr).await {
                Ok((listener, _)) => {
                    let shared = Arc::new(Mutex::new(hc.clone()));
                    let (s2, healthy) = (shared.clone(), self.healthy.clone());
                    let handler: Arc<Handler> = Arc::new(move |m: &hyper::Method, _: &str| {
                        let hc = s2.lock().map(|h| h.clone()).unwrap_or_default();
                        respond(m, &hc, healthy())
                    });
                    let task = tokio::spawn(http::serve_fn(listener, handler, LIMITS));
                    tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "healthCheckNodePort listening");
                    self.servers.insert(*port, Server { hc: shared, task });
                }
                Err(e) => failed.push((*port, e.to_string())),
            }
        }
        failed
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{BackendState, External, Frontend};
    use crate::layout::{L4Addr, PROTO_TCP, PROTO_UDP};
    use http_body_util::BodyExt;

    fn a(ip: &str, port: u16, proto: u8) -> L4Addr {
        L4Addr {
            ip: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    #[test]
    fn local_endpoints_are_distinct_local_addresses_over_the_ports() {
        let key: ServiceKey = ("default".into(), "web".into());
        let fe = |addr: L4Addr, local: &[L4Addr], local_only: bool| Frontend {
            addr,
            name: "default/web:".into(),
            affinity_timeout: None,
            backends: local.iter().map(|b| (*b, BackendState::Active)).collect(),
            external: Some(External {
                local_only,
                local: local.iter().copied().collect(),
                source_ranges: Vec::new(),
            }),
        };
        let mut t = ServiceTable::default();
        // Two ports (TCP, UDP) of the same pod on this node, a second pod on TCP only.
        t.set(
            key.clone(),
            vec![
                fe(
                    a("192.168.1.10", 30080, PROTO_TCP),
                    &[
                        a("10.0.0.1", 8080, PROTO_TCP),
                        a("10.0.0.2", 8080, PROTO_TCP),
                    ],
                    true,
                ),
                fe(
                    a("192.168.1.10", 30053, PROTO_UDP),
                    &[a("10.0.0.1", 53, PROTO_UDP)],
                    true,
                ),
            ],
        );
        let w = wanted(
            &[
                (32000, key.clone()),
                (32001, ("default".into(), "gone".into())),
            ],
            &t,
        );
        assert_eq!(w[&32000].local_endpoints, 2);
        assert_eq!(
            (w[&32000].namespace.as_str(), w[&32000].name.as_str()),
            ("default", "web")
        );
        assert_eq!(w[&32001].local_endpoints, 0);
    }

    async fn body(r: Response<Full<Bytes>>) -> (u16, String, String) {
        let code = r.status().as_u16();
        let weight = r.headers()["x-load-balancing-endpoint-weight"]
            .to_str()
            .unwrap()
            .to_string();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (code, weight, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn answers_like_kube_proxy() {
        let hc = HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (code, weight, b) = body(respond(&hyper::Method::GET, &hc, true)).await;
        assert_eq!((code, weight.as_str()), (200, "2"));
        assert_eq!(
            b,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["service"]["name"], "web");
        // No local endpoint, or the agent not healthy: 503.
        let none = HealthCheck {
            local_endpoints: 0,
            ..hc.clone()
        };
        assert_eq!(body(respond(&hyper::Method::GET, &none, true)).await.0, 503);
        let (code, _, b) = body(respond(&hyper::Method::GET, &hc, false)).await;
        assert!(
            code == 503 && b.contains("\"serviceProxyHealthy\": false"),
            "{b}"
        );
    }

    #[tokio::test]
    async fn listeners_follow_the_wanted_ports() {
        let mut s = HealthServers::new(Arc::new(|| true));
        s.bind = "127.0.0.1".parse().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut w = BTreeMap::new();
        w.insert(
            port,
            HealthCheck {
                namespace: "ns".into(),
                name: "a".into(),
                local_endpoints: 1,
            },
        );
        assert!(s.sync(&w).await.is_empty());
        let addr = format!("127.0.0.1:{port}");
        let (code, b) = http::get(&addr, "/healthz").await.unwrap();
        assert!(code == 200 && b.contains("\"localEndpoints\": 1"), "{b}");
        w.get_mut(&port).unwrap().local_endpoints = 0;
        assert!(s.sync(&w).await.is_empty());
        assert_eq!(http::get(&addr, "/").await.unwrap().0, 503);
        assert!(s.sync(&BTreeMap::new()).await.is_empty());
        assert!(s.ports().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(http::get(&addr, "/").await.is_err(), "closed");
    }
}
