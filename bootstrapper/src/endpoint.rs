//! Which API server address the agents get. The spec's `apiServer` wins;
//! otherwise the kubeconfig's server, unless it is a local port-forward (as
//! on kind) — then the `default/kubernetes` EndpointSlice — then kubeadm's
//! `controlPlaneEndpoint`. An address inside the Service CIDR is refused: it
//! is a ClusterIP, unreachable once kube-proxy is gone. A detected host
//! goes into the agents' configuration, so it must be an IP address or a
//! DNS-1123 subdomain like a spec's (an EndpointSlice or kubeadm-config says
//! whatever whoever wrote it said).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::apply::describe;
use crate::spec::grammar::{self, GrammarError};
use crate::spec::{ApiServer, ClusterNetwork};

/// The chosen endpoint and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detected {
    pub endpoint: ApiServer,
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("API server endpoint {host}:{port} (from {source_name}) is inside the Service CIDR {cidr}: it is a ClusterIP, reachable only through kube-proxy or the datapath itself, so agents could not start once kube-proxy is gone; set spec.apiServer to the API server's real address")]
    InServiceCidr {
        host: String,
        port: u16,
        source_name: String,
        cidr: String,
    },
    #[error("API server endpoint from {source_name}: {source}; set spec.apiServer to the API server's real address")]
    InvalidHost {
        source_name: String,
        #[source]
        source: GrammarError,
    },
    #[error("could not detect the API server endpoint ({tried}); set spec.apiServer in the spec")]
    NotFound { tried: String },
}

/// Picks the endpoint; `server` is the kubeconfig's server URL.
pub async fn detect(
    client: &Client,
    spec: &ClusterNetwork,
    server: &str,
) -> Result<Detected, EndpointError> {
    let check = |endpoint: ApiServer, source: &str| accept(spec, endpoint, source);
    if let Some(a) = &spec.api_server {
        return check(a.clone(), "spec.apiServer");
    }
    let mut tried = Vec::new();
    match parse_server(server) {
        Some(ep) if !is_loopback(&ep.host) => return check(ep, "kubeconfig server"),
        Some(ep) => tried.push(format!(
            "kubeconfig server {}:{} is loopback (a port-forward)",
            ep.host, ep.port
        )),
        None => tried.push(format!("kubeconfig server `{server}` has no host")),
    }
    match from_endpoint_slice(client).await {
        Ok(Some(ep)) => return check(ep, "default/kubernetes EndpointSlice"),
        Ok(None) => tried.push("default/kubernetes EndpointSlice has no usable address".into()),
        Err(e) => tried.push(format!("default/kubernetes EndpointSlice: {e}")),
    }
    match from_kubeadm(client).await {
        Ok(Some(ep)) => return check(ep, "kubeadm-config controlPlaneEndpoint"),
        Ok(None) => tried.push("kube-system/kubeadm-config has no controlPlaneEndpoint".into()),
        Err(e) => tried.push(format!("kube-system/kubeadm-config: {e}")),
    }
    Err(EndpointError::NotFound {
        tried: tried.join("; "),
    })
}

/// Accepts an endpoint from `source` if its host is in the grammar (an IP
/// address or a DNS-1123 subdomain, compared lowercase) and not a ClusterIP.
pub(crate) fn accept(
    spec: &ClusterNetwork,
    mut endpoint: ApiServer,
    source: &str,
) -> Result<Detected, EndpointError> {
    let lower = endpoint.host.to_ascii_lowercase();
    let ip = match grammar::host(&lower) {
        Ok(ip) => ip,
        // The message quotes the host as it was found.
        Err(lowered) => {
            return Err(EndpointError::InvalidHost {
                source_name: source.into(),
                source: grammar::host(&endpoint.host).err().unwrap_or(lowered),
            })
        }
    };
    endpoint.host = lower;
    if let Some(ip) = ip {
        if spec.cluster.service_cidr.contains(&ip) {
            return Err(EndpointError::InServiceCidr {
                host: endpoint.host,
                port: endpoint.port,
                source_name: source.into(),
                cidr: spec.cluster.service_cidr.to_string(),
            });
        }
    }
    Ok(Detected {
        endpoint,
        source: source.into(),
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `https://host:port/...` → host and port (443 when absent).
pub fn parse_server(server: &str) -> Option<ApiServer> {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let hostport = rest.split('/').next()?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (hostport, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| ApiServer {
        host: host.into(),
        port,
    })
}

async fn from_endpoint_slice(client: &Client) -> Result<Option<ApiServer>, String> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slices = api
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await
        .map_err(|e| describe(&e))?;
    for s in slices.items {
        let port = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().is_none_or(|n| n == "https"))
            .and_then(|p| p.port);
        for ep in s.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            if let (Some(addr), Some(port)) = (ep.addresses.first(), port) {
                if !is_loopback(addr) {
                    return Ok(Some(ApiServer {
                        host: addr.clone(),
                        port: u16::try_from(port).map_err(|e| e.to_string())?,
                    }));
                }
            }
        }
    }
    Ok(None)
}

async fn from_kubeadm(client: &Client) -> Result<Option<ApiServer>, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let Some(cm) = api
        .get_opt("kubeadm-config")
        .await
        .map_err(|e| describe(&e))?
    else {
        return Ok(None);
    };
    let Some(cfg) = cm.data.unwrap_or_default().remove("ClusterConfiguration") else {
        return Ok(None);
    };
    let v: serde_yaml::Value =
        serde_yaml::from_str(&cfg).map_err(|e| format!("ClusterConfiguration: {e}"))?;
    let Some(ep) = v.get("controlPlaneEndpoint").and_then(|e| e.as_str()) else {
        return Ok(None);
    };
    Ok(parse_server(ep).filter(|e| !is_loopback(&e.host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: a detected host went into config.yaml unchecked.
    #[test]
    fn detected_hosts_are_checked_by_their_grammar() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../clusters/kind.yaml");
        let spec = crate::spec::load(std::path::Path::new(path)).unwrap();
        let ep = |host: &str| ApiServer {
            host: host.into(),
            port: 6443,
        };
        let ok = accept(&spec, ep("API.Example.com"), "kubeconfig server").unwrap();
        assert_eq!(ok.endpoint.host, "api.example.com");
        assert!(accept(&spec, ep("fd00::2"), "default/kubernetes EndpointSlice").is_ok());
        let err = accept(
            &spec,
            ep("172.18.0.2\u{2028}  hostPID: true"),
            "default/kubernetes EndpointSlice",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("API server endpoint from default/kubernetes EndpointSlice: `172.18.0.2\\u{2028}  hostPID: true` contains ':'"),
            "{err}"
        );
        for bad in ["a b", "\"x\"", "x\ny", "a.b#c", "{{x}}", ""] {
            assert!(
                matches!(
                    accept(&spec, ep(bad), "kubeadm-config controlPlaneEndpoint"),
                    Err(EndpointError::InvalidHost { .. })
                ),
                "{bad:?}"
            );
        }
        let cluster_ip = spec
            .cluster
            .service_cidr
            .hosts()
            .next()
            .unwrap()
            .to_string();
        assert!(matches!(
            accept(&spec, ep(&cluster_ip), "kubeconfig server"),
            Err(EndpointError::InServiceCidr { .. })
        ));
    }

    #[test]
    fn parses_servers() {
        assert_eq!(
            parse_server("https://127.0.0.1:6443"),
            Some(ApiServer {
                host: "127.0.0.1".into(),
                port: 6443
            })
        );
        assert_eq!(
            parse_server("https://api.example.com"),
            Some(ApiServer {
                host: "api.example.com".into(),
                port: 443
            })
        );
        assert_eq!(
            parse_server("172.18.0.2:6443"),
            Some(ApiServer {
                host: "172.18.0.2".into(),
                port: 6443
            })
        );
        assert_eq!(
            parse_server("https://[::1]:6443/"),
            Some(ApiServer {
                host: "::1".into(),
                port: 6443
            })
        );
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && !is_loopback("172.18.0.2"));
    }
}
