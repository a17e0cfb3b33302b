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
//! - The IPv6 family (issue 13; only the latency phase programs it): the
//!   same Services dual-stack (`ipFamilies: [IPv4, IPv6]`, ClusterIPs
//!   10.96.0.0 + 1 + i and fd00:10:96:: + 1 + i, inside fd00:10:96::/108),
//!   each with a second EndpointSlice (`addressType: IPv6`) of B endpoints
//!   fd00:10:128:: + 1 + i·B + j; the last-declared Service's are the real
//!   listeners fd00:10:244:1::1..=B.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

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

/// IPv6 Service CIDR (the IPv6 ClusterIPs; room for [`MAX_SERVICES`]).
pub const SERVICE_CIDR6: &str = "fd00:10:96::/108";

/// ClusterIP of Service `i`.
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i)
}

/// IPv6 ClusterIP of Service `i`: fd00:10:96:: + 1 + i.
pub fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0)) + 1 + u128::from(i))
}

/// A real listener: 10.244.1.j (j = 1..=B), on the backend namespace's `lo`.
pub fn real_backend(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 1, 0)) + j)
}

/// A real IPv6 listener: fd00:10:244:1::j (j = 1..=B), on the backend
/// namespace's `lo`.
pub fn real_backend6(j: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0)) + u128::from(j))
}

/// `addr` as an IPv4-mapped IPv6 socket address (`[::ffff:a.b.c.d]:port`).
pub fn mapped(addr: SocketAddrV4) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        addr.ip().to_ipv6_mapped(),
        addr.port(),
        0,
        0,
    ))
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

    /// IPv6 VIP:port clients connect to (the last-declared Service's IPv6
    /// ClusterIP).
    pub fn target6(&self) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(vip6(self.last()), SERVICE_PORT, 0, 0))
    }

    /// IPv6 endpoint IPs of Service `i`.
    pub fn endpoint_ips6(&self, i: u32) -> Vec<Ipv6Addr> {
        let base = u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x128, 0, 0, 0, 0, 0));
        (0..self.b)
            .map(|j| {
                if i == self.last() {
                    real_backend6(j + 1)
                } else {
                    Ipv6Addr::from(base + 1 + u128::from(i) * u128::from(self.b) + u128::from(j))
                }
            })
            .collect()
    }

    /// The Services dual-stack (IPv4 and IPv6 ClusterIPs) and both slices
    /// of each (IPv4 without the change, IPv6): what netboot's maps hold
    /// during the latency phase.
    pub fn dual_stack(&self) -> (Vec<Service>, Vec<EndpointSlice>) {
        let services = (0..self.n).map(service_dual_stack).collect();
        let mut slices = self.slices(false);
        slices.extend((0..self.n).map(|i| {
            let ips: Vec<IpAddr> = self.endpoint_ips6(i).into_iter().map(IpAddr::V6).collect();
            slice_of(i, "bench6", "IPv6", &ips)
        }));
        (services, slices)
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

fn service_dual_stack(i: u32) -> Service {
    let mut s = service(i);
    if let Some(spec) = s.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        spec.ip_family_policy = Some("RequireDualStack".into());
        spec.cluster_ips = Some(vec![vip(i).to_string(), vip6(i).to_string()]);
    }
    s
}

fn slice(i: u32, ips: &[Ipv4Addr]) -> EndpointSlice {
    let ips: Vec<IpAddr> = ips.iter().copied().map(IpAddr::V4).collect();
    slice_of(i, "bench", "IPv4", &ips)
}

fn slice_of(i: u32, suffix: &str, address_type: &str, ips: &[IpAddr]) -> EndpointSlice {
    let name = service_name(i);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{suffix}")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                name,
            )])),
            ..Default::default()
        },
        address_type: address_type.into(),
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
    fn dual_stack_adds_one_ipv6_frontend_per_service() {
        let w = Workload::new(10, 3).expect("size");
        assert_eq!(w.target6(), "[fd00:10:96::a]:80".parse().expect("addr"));
        assert_eq!(
            w.endpoint_ips6(9),
            vec![
                "fd00:10:244:1::1".parse::<Ipv6Addr>().expect("ip"),
                "fd00:10:244:1::2".parse().expect("ip"),
                "fd00:10:244:1::3".parse().expect("ip"),
            ]
        );
        assert_eq!(
            w.endpoint_ips6(1)[0],
            "fd00:10:128::4".parse::<Ipv6Addr>().expect("ip")
        );
        let (services, slices) = w.dual_stack();
        let t = netboot_datapath::desired::build(&services, &slices, 10800);
        assert_eq!(t.frontends.len(), 20);
        assert_eq!(t.backend_count(), 60);
        let v4 = netboot_datapath::desired::build(&w.services(), &w.slices(false), 10800);
        for (k, fe) in &v4.frontends {
            assert_eq!(t.frontends.get(k), Some(fe), "IPv4 frontends unchanged");
        }
        let target = w.target6();
        let fe = t
            .frontends
            .values()
            .find(|f| f.addr.ip == target.ip() && f.addr.port == target.port())
            .expect("the IPv6 target is a frontend");
        let backends: Vec<IpAddr> = fe.backends.keys().map(|b| b.ip).collect();
        let want: Vec<IpAddr> = w.endpoint_ips6(9).into_iter().map(IpAddr::V6).collect();
        assert_eq!(backends, want);
        assert!(w.target6().ip().is_ipv6());
        assert_eq!(
            mapped(w.target()),
            "[::ffff:10.96.0.10]:80"
                .parse::<SocketAddr>()
                .expect("addr")
        );
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
        let watched = Watched::default();
        watched.replace_all(w.services(), w.slices(false));
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
    }
}
