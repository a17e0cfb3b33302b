//! A tiny cluster DNS for coredns pods: A records for
//! `<svc>.<ns>.svc.cluster.local` (the ClusterIP, or the ready endpoint
//! addresses of a headless Service), NXDOMAIN for every other name.
//! Served on UDP and TCP port 53 from sockets bound inside the coredns pod's netns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, warn};

/// The cluster domain.
pub const DOMAIN: &str = "cluster.local";
/// TTL of every answer (coredns' kubernetes plugin default).
pub const TTL: u32 = 5;

/// Lower-case FQDN without the trailing dot → addresses.
pub type Zone = BTreeMap<String, BTreeSet<Ipv4Addr>>;

/// The zone shared between the controller (writer) and the servers (readers).
#[derive(Debug, Clone, Default)]
pub struct SharedZone(Arc<RwLock<Zone>>);

impl SharedZone {
    /// Replaces the zone.
    pub fn set(&self, zone: Zone) {
        if let Ok(mut z) = self.0.write() {
            *z = zone;
        }
    }

    /// Answers a wire-format query with a wire-format response.
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let zone = self.0.read().ok()?;
        answer(&zone, query)
    }
}

/// Builds the zone from Services and EndpointSlices.
pub fn zone(services: &[Service], slices: &[EndpointSlice]) -> Zone {
    let mut out = Zone::new();
    for svc in services {
        let (Some(ns), Some(name)) = (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let fqdn = format!("{name}.{ns}.svc.{DOMAIN}");
        let spec = svc.spec.as_ref();
        let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or("");
        let entry = out.entry(fqdn).or_default();
        if let Ok(ip) = cluster_ip.parse::<Ipv4Addr>() {
            entry.insert(ip);
        } else if cluster_ip == "None" {
            for slice in slices.iter().filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name)
            }) {
                for ep in slice.endpoints.iter().flatten() {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    entry.extend(
                        ep.addresses
                            .iter()
                            .filter_map(|a| a.parse::<Ipv4Addr>().ok()),
                    );
                }
            }
        }
    }
    out
}

/// Answers one query against the zone. `None` if the bytes are not a DNS query.
pub fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        response.queries = request.queries.clone();
        return response.to_vec().ok();
    }
    let query = request.queries[0].clone();
    let name = query.name().to_lowercase().to_ascii();
    let key = name.trim_end_matches('.').to_string();
    match zone.get(&key) {
        Some(ips) => {
            if query.query_type() == RecordType::A {
                for ip in ips {
                    response.answers.push(Record::from_rdata(
                        query.name().clone(),
                        TTL,
                        RData::A(A(*ip)),
                    ));
                }
            }
            // Other types for a known name: NOERROR with no data.
        }
        None => response.metadata.response_code = ResponseCode::NXDomain,
    }
    response.queries.push(query);
    response.to_vec().ok()
}

/// Serves the zone on an already bound UDP socket until the task is aborted.
pub async fn serve_udp(socket: UdpSocket, zone: SharedZone) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "dns: udp receive");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(reply) = zone.answer(&buf[..n]) {
            if let Err(e) = socket.send_to(&reply, peer).await {
                debug!(error = %e, %peer, "dns: udp reply");
            }
        }
    }
}

/// Serves the zone on an already bound TCP listener until the task is aborted.
pub async fn serve_tcp(listener: TcpListener, zone: SharedZone) {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "dns: tcp accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut msg).await.is_err() {
                    return;
                }
                let Some(reply) = zone.answer(&msg) else {
                    return;
                };
                let Ok(reply_len) = u16::try_from(reply.len()) else {
                    return;
                };
                if stream.write_all(&reply_len.to_be_bytes()).await.is_err()
                    || stream.write_all(&reply).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Convenience for tests: the FQDN of a Service.
pub fn service_fqdn(namespace: &str, name: &str) -> Result<Name, hickory_proto::ProtoError> {
    Name::from_ascii(format!("{name}.{namespace}.svc.{DOMAIN}."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(42, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn zone_with(name: &str, ip: Ipv4Addr) -> Zone {
        let mut z = Zone::new();
        z.entry(name.to_string()).or_default().insert(ip);
        z
    }

    #[test]
    fn answers_a_for_a_known_service() {
        let z = zone_with(
            "kubernetes.default.svc.cluster.local",
            Ipv4Addr::new(10, 96, 0, 1),
        );
        let reply = answer(
            &z,
            &query("Kubernetes.default.svc.cluster.local.", RecordType::A),
        )
        .unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, 42);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(10, 96, 0, 1))));
    }

    #[test]
    fn nxdomain_for_unknown_and_nodata_for_aaaa() {
        let z = zone_with(
            "kubernetes.default.svc.cluster.local",
            Ipv4Addr::new(10, 96, 0, 1),
        );
        let m = Message::from_vec(
            &answer(&z, &query("nope.default.svc.cluster.local.", RecordType::A)).unwrap(),
        )
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m =
            Message::from_vec(&answer(&z, &query("example.com.", RecordType::A)).unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = Message::from_vec(
            &answer(
                &z,
                &query("kubernetes.default.svc.cluster.local.", RecordType::AAAA),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }
}
