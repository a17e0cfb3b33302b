//! kube-proxy's IPVS mode outside iptables: its IPVS virtual servers and its
//! dummy interface `kube-ipvs0`, decided from captured text by pure
//! functions ([`parse_ipvsadm_save`], [`parse_ip_addr`], [`parse_ip_link`],
//! [`plan_ipvs`]).
//!
//! Ownership (kube-proxy v1.36, pkg/proxy/ipvs/proxier.go): kube-proxy
//! creates one virtual server per Service address and port (ClusterIP,
//! externalIPs, LoadBalancer ingress IPs), binding each such address to
//! `kube-ipvs0`, and one per node address and NodePort (not bound there).
//! A virtual server is kube-proxy's when its address is
//!
//! - an address of a Service the agent knows ([`IpvsOwnership::service_ips`]),
//! - or an address bound on `kube-ipvs0` (kube-proxy binds exactly its
//!   Service addresses there; this also covers a Service deleted after
//!   kube-proxy stopped, and the CLI, which watches no Services),
//! - or an address of the node (any other interface) with a port that is a
//!   `nodePort` of a Service the agent knows ([`IpvsOwnership::node_ports`],
//!   whatever the API server's `--service-node-port-range`, changed or not)
//!   or lies in the default NodePort range ([`IpvsOwnership::node_port_range`];
//!   the CLI, which watches no Services).
//!
//! Every other virtual server (a firewall-mark one, a load balancer another
//! component runs on the node) is left alone and reported as kept.
//! `kube-ipvs0` is deleted when it is a dummy link; a link of that name of
//! another kind is left and reported.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use serde::Serialize;

/// The dummy interface kube-proxy's IPVS mode binds Service addresses to.
pub const DUMMY_DEVICE: &str = "kube-ipvs0";

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// Text from `ipvsadm -S -n`, `ip -o addr` or `ip -o -d link` that cannot be
/// read. Never read as "absent".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: unparseable: {text}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
}

/// An IPVS virtual server's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    /// `-t`.
    #[serde(rename = "TCP")]
    Tcp,
    /// `-u`.
    #[serde(rename = "UDP")]
    Udp,
    /// `--sctp-service`.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The `ipvsadm` option naming a service of this protocol.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Tcp => "-t",
            Self::Udp => "-u",
            Self::Sctp => "--sctp-service",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// An IPVS virtual server as `ipvsadm -S -n` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VirtualServer {
    /// An address, port and protocol.
    Addr {
        /// Protocol.
        proto: Protocol,
        /// Address and port.
        addr: SocketAddr,
    },
    /// A firewall-mark service (`-f MARK`): kube-proxy never creates one.
    Fwmark(u32),
}

impl VirtualServer {
    /// The `ipvsadm` arguments naming it (`-t 10.96.0.1:443`).
    pub fn args(&self) -> Vec<String> {
        match self {
            Self::Addr { proto, addr } => vec![proto.flag().into(), addr.to_string()],
            Self::Fwmark(m) => vec!["-f".into(), m.to_string()],
        }
    }
}

impl std::fmt::Display for VirtualServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr { proto, addr } => write!(f, "{} {addr}", proto.name()),
            Self::Fwmark(m) => write!(f, "FWM {m}"),
        }
    }
}

/// The virtual servers in `ipvsadm -S -n` output (its `-A` lines; the
/// real servers, `-a`, go with them).
pub fn parse_ipvsadm_save(text: &str) -> Result<Vec<VirtualServer>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let bad = || ParseError {
            line: i + 1,
            text: line.to_string(),
        };
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"-A") => {}
            Some(&"-a") => continue,
            _ => return Err(bad()),
        }
        let (flag, value) = match (words.get(1), words.get(2)) {
            (Some(f), Some(v)) => (*f, *v),
            _ => return Err(bad()),
        };
        let proto = match flag {
            "-t" | "--tcp-service" => Protocol::Tcp,
            "-u" | "--udp-service" => Protocol::Udp,
            "--sctp-service" => Protocol::Sctp,
            "-f" | "--fwmark-service" => {
                out.push(VirtualServer::Fwmark(value.parse().map_err(|_| bad())?));
                continue;
            }
            _ => return Err(bad()),
        };
        let addr: SocketAddr = value.parse().map_err(|_| bad())?;
        out.push(VirtualServer::Addr { proto, addr });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// An address in `ip -o addr` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name.
    pub dev: String,
    /// Address (without its prefix length).
    pub ip: IpAddr,
}

fn dev_name(word: &str) -> &str {
    let w = word.trim_end_matches(':');
    w.split('@').next().unwrap_or(w)
}

/// The addresses in `ip -o addr` output (`2: eth0    inet 172.18.0.2/16 …`).
pub fn parse_ip_addr(text: &str) -> Result<Vec<IfAddr>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || ParseError {
            line: i + 1,
            text: line.to_string(),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(family), Some(cidr)) = (words.get(1), words.get(2), words.get(3))
        else {
            return Err(bad());
        };
        if !matches!(*family, "inet" | "inet6") {
            return Err(bad());
        }
        let ip = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(bad)?;
        out.push(IfAddr {
            dev: dev_name(dev).to_string(),
            ip,
        });
    }
    Ok(out)
}

/// A link in `ip -o -d link` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its kind is `dummy`.
    pub dummy: bool,
}

/// The links in `ip -o -d link` output (`7: kube-ipvs0: <BROADCAST,NOARP> …
/// dummy addrgenmode …`).
pub fn parse_ip_link(text: &str) -> Result<Vec<Link>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let index_ok = words
            .first()
            .and_then(|w| w.strip_suffix(':'))
            .is_some_and(|n| n.parse::<u32>().is_ok());
        let Some(name) = words.get(1).filter(|w| index_ok && w.ends_with(':')) else {
            return Err(ParseError {
                line: i + 1,
                text: line.to_string(),
            });
        };
        out.push(Link {
            name: dev_name(name).to_string(),
            dummy: words.contains(&"dummy"),
        });
    }
    Ok(out)
}

/// What makes a virtual server kube-proxy's besides `kube-ipvs0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsOwnership {
    /// Every address of every Service (ClusterIPs, externalIPs, LoadBalancer
    /// ingress IPs) the agent knows; empty without a watch.
    pub service_ips: BTreeSet<IpAddr>,
    /// NodePorts are allocated from here (the API server's default).
    pub node_port_range: RangeInclusive<u16>,
    /// Every `nodePort` (and `healthCheckNodePort`) of every Service the
    /// agent knows: a range changed on the API server leaves Services with
    /// ports outside the default one, and kube-proxy serves those too.
    pub node_ports: BTreeSet<u16>,
}

impl Default for IpvsOwnership {
    fn default() -> Self {
        Self {
            service_ips: BTreeSet::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            node_ports: BTreeSet::new(),
        }
    }
}

/// kube-proxy's IPVS state outside iptables, and what removes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsPlan {
    /// kube-proxy's virtual servers, with why each is its.
    pub delete: Vec<(VirtualServer, &'static str)>,
    /// Virtual servers that are not kube-proxy's.
    pub kept: Vec<VirtualServer>,
    /// `kube-ipvs0` exists as a dummy link: delete it.
    pub delete_link: bool,
    /// `kube-ipvs0` exists but is not a dummy link: left alone.
    pub foreign_link: bool,
}

/// Decides which virtual servers and links are kube-proxy's (see the module
/// documentation).
pub fn plan_ipvs(
    servers: &[VirtualServer],
    addrs: &[IfAddr],
    links: &[Link],
    own: &IpvsOwnership,
) -> IpvsPlan {
    let link = links.iter().find(|l| l.name == DUMMY_DEVICE);
    let dummy = link.is_some_and(|l| l.dummy);
    let on_dummy: BTreeSet<IpAddr> = addrs
        .iter()
        .filter(|a| dummy && a.dev == DUMMY_DEVICE)
        .map(|a| a.ip)
        .collect();
    let node: BTreeSet<IpAddr> = addrs
        .iter()
        .filter(|a| a.dev != DUMMY_DEVICE)
        .map(|a| a.ip)
        .collect();
    let mut plan = IpvsPlan {
        delete_link: dummy,
        foreign_link: link.is_some() && !dummy,
        ..Default::default()
    };
    for vs in servers {
        let why = match vs {
            VirtualServer::Fwmark(_) => None,
            VirtualServer::Addr { addr, .. } => {
                if own.service_ips.contains(&addr.ip()) {
                    Some("Service address")
                } else if on_dummy.contains(&addr.ip()) {
                    Some("address on kube-ipvs0")
                } else if node.contains(&addr.ip()) && own.node_ports.contains(&addr.port()) {
                    Some("node address, a Service's nodePort")
                } else if node.contains(&addr.ip()) && own.node_port_range.contains(&addr.port()) {
                    Some("node address, NodePort range")
                } else {
                    None
                }
            }
        };
        match why {
            Some(w) => plan.delete.push((*vs, w)),
            None => plan.kept.push(*vs),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ipvsadm -S -n` of a kind node with kube-proxy v1.36 in IPVS mode
    /// plus a load balancer of another component: see
    /// tests/fixtures/README.md.
    const IPVSADM: &str = include_str!("../../tests/fixtures/node-ipvs.ipvsadm");
    const IP_ADDR: &str = include_str!("../../tests/fixtures/node-ipvs.ip-addr");
    const IP_LINK: &str = include_str!("../../tests/fixtures/node-ipvs.ip-link");

    fn vs(proto: Protocol, a: &str) -> VirtualServer {
        VirtualServer::Addr {
            proto,
            addr: a.parse().expect("addr"),
        }
    }

    #[test]
    fn ipvsadm_save_is_read() {
        let all = parse_ipvsadm_save(IPVSADM).expect("parse");
        assert!(all.contains(&vs(Protocol::Tcp, "10.96.0.1:443")));
        assert!(all.contains(&vs(Protocol::Udp, "10.96.0.10:53")));
        assert!(all.contains(&vs(Protocol::Tcp, "[fd00:10:96::1]:443")));
        assert!(all.contains(&vs(Protocol::Sctp, "10.96.200.7:9999")));
        assert!(all.contains(&VirtualServer::Fwmark(7)));
        assert_eq!(
            vs(Protocol::Tcp, "[fd00:10:96::1]:443").args(),
            ["-t", "[fd00:10:96::1]:443"]
        );
        assert_eq!(
            vs(Protocol::Sctp, "10.96.200.7:9999").to_string(),
            "SCTP 10.96.200.7:9999"
        );
        assert_eq!(parse_ipvsadm_save(""), Ok(vec![]));
        for bad in [
            "-A -t 10.96.0.1 -s rr",
            "-A -x 1.2.3.4:5",
            "what",
            "-A -f x",
        ] {
            assert!(parse_ipvsadm_save(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_output_is_read() {
        let addrs = parse_ip_addr(IP_ADDR).expect("addr");
        assert!(addrs.contains(&IfAddr {
            dev: "eth0".into(),
            ip: "172.18.0.3".parse().expect("ip"),
        }));
        assert!(addrs.contains(&IfAddr {
            dev: DUMMY_DEVICE.into(),
            ip: "10.96.0.10".parse().expect("ip"),
        }));
        let links = parse_ip_link(IP_LINK).expect("link");
        assert!(links.contains(&Link {
            name: DUMMY_DEVICE.into(),
            dummy: true
        }));
        assert!(links.contains(&Link {
            name: "eth0".into(),
            dummy: false
        }));
        assert!(parse_ip_addr("2: eth0 link/ether x").is_err());
        assert!(parse_ip_link("garbage here").is_err());
    }

    fn plan_fixture(own: &IpvsOwnership) -> IpvsPlan {
        plan_ipvs(
            &parse_ipvsadm_save(IPVSADM).expect("parse"),
            &parse_ip_addr(IP_ADDR).expect("addr"),
            &parse_ip_link(IP_LINK).expect("link"),
            own,
        )
    }

    #[test]
    fn ipvs_plan_for_a_node_snapshot() {
        let own = IpvsOwnership {
            service_ips: ["10.96.0.1", "10.96.0.10", "fd00:10:96::1", "192.0.2.50"]
                .iter()
                .map(|s| s.parse().expect("ip"))
                .collect(),
            ..Default::default()
        };
        let p = plan_fixture(&own);
        let mut text = String::from("# delete\n");
        for (v, why) in &p.delete {
            text.push_str(&format!("{v} ({why})\n"));
        }
        text.push_str("# kept\n");
        for v in &p.kept {
            text.push_str(&format!("{v}\n"));
        }
        text.push_str(&format!(
            "# delete_link={} foreign_link={}\n",
            p.delete_link, p.foreign_link
        ));
        insta::assert_snapshot!(text);
    }

    #[test]
    fn only_kube_proxys_virtual_servers_are_deleted() {
        // No Services known (the CLI): kube-ipvs0 and the NodePort range
        // still find every one of kube-proxy's.
        let p = plan_fixture(&IpvsOwnership::default());
        let deleted: Vec<VirtualServer> = p.delete.iter().map(|(v, _)| *v).collect();
        for v in [
            vs(Protocol::Tcp, "10.96.0.1:443"),
            vs(Protocol::Udp, "10.96.0.10:53"),
            vs(Protocol::Tcp, "172.18.0.3:31080"),
            vs(Protocol::Tcp, "[fd00:10:96::1]:443"),
        ] {
            assert!(deleted.contains(&v), "{v} not deleted: {p:#?}");
        }
        for v in [
            // Another component's load balancer on a node address, outside
            // the NodePort range; a firewall-mark service.
            vs(Protocol::Tcp, "172.18.0.3:8443"),
            VirtualServer::Fwmark(7),
            // Not on kube-ipvs0, not a node address: not known to be a
            // Service address without the watch.
            vs(Protocol::Tcp, "192.0.2.50:80"),
        ] {
            assert!(p.kept.contains(&v), "{v} not kept: {p:#?}");
        }
        assert!(p.delete_link && !p.foreign_link);
        // A Service address the watch knows is kube-proxy's.
        let own = IpvsOwnership {
            service_ips: BTreeSet::from(["192.0.2.50".parse().expect("ip")]),
            ..Default::default()
        };
        assert!(plan_fixture(&own)
            .delete
            .contains(&(vs(Protocol::Tcp, "192.0.2.50:80"), "Service address")));
        // The API server's NodePort range was changed: a Service's nodePort
        // outside the default range is still kube-proxy's on a node address.
        let own = IpvsOwnership {
            node_ports: BTreeSet::from([8443]),
            ..Default::default()
        };
        assert!(plan_fixture(&own).delete.contains(&(
            vs(Protocol::Tcp, "172.18.0.3:8443"),
            "node address, a Service's nodePort"
        )));
    }

    /// Regression guard: a `kube-ipvs0` that is not a dummy link is not
    /// kube-proxy's, and its addresses prove nothing.
    #[test]
    fn a_kube_ipvs0_that_is_not_dummy_is_left_alone() {
        let links = [Link {
            name: DUMMY_DEVICE.into(),
            dummy: false,
        }];
        let addrs = [IfAddr {
            dev: DUMMY_DEVICE.into(),
            ip: "10.96.0.1".parse().expect("ip"),
        }];
        let p = plan_ipvs(
            &[vs(Protocol::Tcp, "10.96.0.1:443")],
            &addrs,
            &links,
            &IpvsOwnership::default(),
        );
        assert!(!p.delete_link && p.foreign_link);
        assert_eq!(p.kept, [vs(Protocol::Tcp, "10.96.0.1:443")]);
        let none = plan_ipvs(&[], &[], &[], &IpvsOwnership::default());
        assert_eq!(none, IpvsPlan::default());
    }
}
