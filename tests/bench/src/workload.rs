//! The Services and EndpointSlices of one benchmark size, and the one
//! endpoint change that is programmed again and again.
//!
//! - Service `bench/svc-NNNNNN` (i = 0..N, zero-padded so the name order is
//!   the declaration order: the last-declared Service is also last in
//!   kube-proxy's KUBE-SERVICES chain), ClusterIP 10.96.0.0 + 1 + i, port
//!   `http` 80/TCP → 8080.
//! - Its endpoints are distinct per Service (10.128.0.0 + 1 + i·B + j, inside
//!   the pod CIDR 10.128.0.0/9), as in a real cluster, so the maps and rules
//!   hold N·B endpoints. Only the LAST-declared Service (the one every client
//!   connects to) has the real listeners 10.244.1.1..=B:8080 as endpoints.
//! - The endpoint change: Service N/2 swaps its last endpoint for
//!   10.200.0.1 (and back), the smallest change a rollout makes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Namespace of every bench Service.
pub const NAMESPACE: &str = "bench";
/// Service port.
pub const SERVICE_PORT: u16 = 80;
/// Endpoint (listener) port.
pub const BACKEND_PORT: u16 = 8080;
/// Pod CIDR (kube-proxy's clusterCIDR; the client and endpoints are inside it).
pub const POD_CIDR: &str = "10.128.0.0/9";
/// Service CIDR (ClusterIPs).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The endpoint the change swaps in.
pub const ALT_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Most Services one run can describe (ClusterIPs stay inside 10.96.0.0/12).
pub const MAX_SERVICES: u32 = 1_000_000;
/// Most endpoints (distinct endpoint IPs stay inside 10.128.0.0/10).
pub const MAX_ENDPOINTS: u64 = 4_000_000;

/// ClusterIP of Service `i`.
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i)
}

/// A real listener: 10.244.1.j (j = 1..=B), on the backend namespace's `lo`.
pub fn real_backend(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 1, 0)) + j)
}

/// Name of Service `i`.
pub fn service_name(i: u32) -> String {
    format!("svc-{i:06}")
}

/// One benchmark size.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Number of Services (one TCP port each).
    pub n: u32,
    /// Endpoints per Service.
    pub b: u32,
}

impl Workload {
    /// Validates the size.
    pub fn new(n: u32, b: u32) -> Result<Self> {
        if n == 0 || n > MAX_SERVICES {
            bail!("--services: {n} must be 1..={MAX_SERVICES}");
        }
        if b == 0 || b > 250 {
            bail!("--backends: {b} must be 1..=250");
        }
        if u64::from(n) * u64::from(b) > MAX_ENDPOINTS {
            bail!("{n} services x {b} backends: more than {MAX_ENDPOINTS} endpoints");
        }
        Ok(Self { n, b })
    }

    /// Index of the last-declared Service (the one clients connect to).
    pub fn last(&self) -> u32 {
        self.n - 1
    }

    /// Index of the Service whose endpoint changes.
    pub fn changed(&self) -> u32 {
        self.n / 2
    }

    /// VIP:port clients connect to.
    pub fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(vip(self.last()), SERVICE_PORT)
    }

    /// Total endpoints.
    pub fn endpoints(&self) -> u64 {
        u64::from(self.n) * u64::from(self.b)
    }

    /// Endpoint IPs of Service `i`, with or without the change applied.
    pub fn endpoint_ips(&self, i: u32, changed: bool) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = (0..self.b)
            .map(|j| {
                if i == self.last() {
                    real_backend(j + 1)
                } else {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + 1 + i * self.b + j)
                }
            })
            .collect();
        if changed && i == self.changed() {
            if let Some(last) = ips.last_mut() {
                *last = ALT_ENDPOINT;
            }
        }
        ips
    }

    /// The Service objects.
    pub fn services(&self) -> Vec<Service> {
        (0..self.n).map(service).collect()
    }

    /// The EndpointSlices (one per Service), with or without the change.
    pub fn slices(&self, changed: bool) -> Vec<EndpointSlice> {
        (0..self.n)
            .map(|i| slice(i, &self.endpoint_ips(i, changed)))
            .collect()
    }

    /// Services `first..N` and their EndpointSlices (without the change).
    pub fn objects_from(&self, first: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
        (
            (first..self.n).map(service).collect(),
            (first..self.n)
                .map(|i| slice(i, &self.endpoint_ips(i, false)))
                .collect(),
        )
    }

    /// The EndpointSlice of the Service that changes, with or without the
    /// change (the object a watch event carries).
    pub fn changed_slice(&self, changed: bool) -> EndpointSlice {
        let i = self.changed();
        slice(i, &self.endpoint_ips(i, changed))
    }

    /// Services and slices as the multi-document YAML `--static-services`
    /// reads (each document is the object's JSON, which is YAML).
    pub fn static_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for i in 0..self.n {
            let _ = writeln!(out, "---\n{}", serde_json::to_string(&service(i))?);
            let _ = writeln!(
                out,
                "---\n{}",
                serde_json::to_string(&slice(i, &self.endpoint_ips(i, false)))?
            );
        }
        Ok(out)
    }
}

fn service(i: u32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(vip(i).to_string()),
            cluster_ips: Some(vec![vip(i).to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: i32::from(SERVICE_PORT),
                target_port: Some(IntOrString::Int(i32::from(BACKEND_PORT))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: u32, ips: &[Ipv4Addr]) -> EndpointSlice {
    let name = service_name(i);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-bench")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                name,
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            ips.iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            protocol: Some("TCP".into()),
            port: Some(i32::from(BACKEND_PORT)),
            ..Default::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_service_has_the_real_listeners_and_others_distinct_endpoints() {
        let w = Workload::new(5, 2).expect("size");
        assert_eq!(w.target(), "10.96.0.5:80".parse().expect("addr"));
        assert_eq!(
            w.endpoint_ips(4, false),
            vec![Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 2)]
        );
        assert_eq!(
            w.endpoint_ips(0, false),
            vec![Ipv4Addr::new(10, 128, 0, 1), Ipv4Addr::new(10, 128, 0, 2)]
        );
        assert_eq!(
            w.endpoint_ips(2, true),
            vec![Ipv4Addr::new(10, 128, 0, 5), ALT_ENDPOINT]
        );
        assert_eq!(w.endpoint_ips(1, true), w.endpoint_ips(1, false));
    }

    #[test]
    fn desired_table_has_one_frontend_per_service() {
        let w = Workload::new(10, 3).expect("size");
        let t = netboot_datapath::desired::build(&w.services(), &w.slices(false), 10800);
        assert_eq!(t.frontends.len(), 10);
        assert_eq!(t.backend_count(), 30);
        let changed = netboot_datapath::desired::build(&w.services(), &w.slices(true), 10800);
        let diff = t
            .frontends
            .iter()
            .filter(|(k, v)| changed.frontends.get(k) != Some(v))
            .count();
        assert_eq!(diff, 1);
    }

    #[test]
    fn static_yaml_is_read_by_the_agent_loader() {
        let w = Workload::new(3, 2).expect("size");
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, w.static_yaml().expect("yaml")).expect("write");
        let watched = netboot_datapath::watch::Watched::default();
        watched.load_static(&p).expect("load");
        assert!(watched.synced());
        assert_eq!(watched.desired(10800).frontends.len(), 3);
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(Workload::new(0, 2).is_err());
        assert!(Workload::new(10, 0).is_err());
        assert!(Workload::new(1_000_000, 5).is_err());
    }

    #[test]
    fn changed_slice_event_is_one_partial_pass() {
        use netboot_datapath::maps::memory::MemoryMaps;
        use netboot_datapath::pass::{PassKind, Passes};
        use netboot_datapath::reconcile::Reconciler;
        use netboot_datapath::watch::Watched;

        let w = Workload::new(10, 3).expect("size");
        let (services, slices) = w.objects_from(0);
        let watched = Watched::default();
        watched.replace_all(services, slices);
        let mut recon = Reconciler::recover(MemoryMaps::new()).expect("recover");
        let mut passes = Passes::default();
        let first = passes.run(&watched, &mut recon, 10800).expect("full");
        assert_eq!(first.kind, PassKind::Full);
        let full = recon.maps().state.clone();
        for changed in [true, false] {
            watched.apply_slice(w.changed_slice(changed));
            let p = passes.run(&watched, &mut recon, 10800).expect("partial");
            assert_eq!(p.kind, PassKind::Partial(1));
            assert!(p.stats.writes() > 0 && p.stats.writes() <= 6, "{p:?}");
        }
        assert_eq!(recon.maps().state.services, full.services);
        let (_, later) = w.objects_from(7);
        assert_eq!(later.len(), 3);
    }
}
