//! Which interfaces the per-packet path (`nb_np_ingress`/`nb_np_egress`)
//! attaches to: the ones carrying the Node's addresses, or the configured
//! ones. [`choose`] is a pure function of the interfaces' addresses and the
//! Node's, so every case is unit-tested; [`interfaces`] reads the addresses
//! of the calling thread's network namespace.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::loader::NodePortDevice;

/// The result of [`choose`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Choice {
    /// Devices to attach to, by interface name.
    pub devices: Vec<NodePortDevice>,
    /// Why a configured interface is left out, or why none was found.
    pub problems: Vec<String>,
}

impl Choice {
    /// One status line: `eth0 (SNAT 192.168.50.1, fd00::1), eth1 (…)`, or `none: …`.
    pub fn summary(&self) -> String {
        if self.devices.is_empty() {
            return format!("none: {}", self.problems.join("; "));
        }
        let mut s = self
            .devices
            .iter()
            .map(NodePortDevice::describe)
            .collect::<Vec<_>>()
            .join(", ");
        if !self.problems.is_empty() {
            s.push_str(&format!("; skipped: {}", self.problems.join("; ")));
        }
        s
    }
}

/// An address SNAT may use: not link-local (a reply to it would not route
/// off the link), not loopback.
fn usable6(a: &Ipv6Addr) -> bool {
    !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80
}

/// The interfaces to attach to, for both families.
///
/// - `configured` None: every interface (not `lo`) carrying one of the
///   Node's addresses (`node_ips`: InternalIP/ExternalIP, IPv4 or IPv6); its
///   SNAT address per family is the first Node address of that family on it,
///   in the Node's order (none: that family's flows to remote backends are
///   dropped and counted).
/// - `configured` Some: exactly those interfaces; per family, the first Node
///   address on it, else its first address of that family (IPv6: not
///   link-local). An interface that does not exist or has neither is left
///   out and reported.
pub fn choose(
    ifaddrs: &[(String, IpAddr)],
    node_ips: &[IpAddr],
    configured: Option<&[String]>,
) -> Choice {
    let mut by_if: BTreeMap<&str, (Vec<Ipv4Addr>, Vec<Ipv6Addr>)> = BTreeMap::new();
    for (name, ip) in ifaddrs {
        let e = by_if.entry(name.as_str()).or_default();
        match ip {
            IpAddr::V4(v4) => e.0.push(*v4),
            IpAddr::V6(v6) => e.1.push(*v6),
        }
    }
    let node4: Vec<Ipv4Addr> = node_ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect();
    let node6: Vec<Ipv6Addr> = node_ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        })
        .collect();
    let node4_on = |addrs: &[Ipv4Addr]| node4.iter().find(|n| addrs.contains(n)).copied();
    let node6_on = |addrs: &[Ipv6Addr]| node6.iter().find(|n| addrs.contains(n)).copied();
    let mut out = Choice::default();
    match configured {
        Some(names) => {
            for name in names {
                let Some((a4, a6)) = by_if.get(name.as_str()) else {
                    out.problems.push(format!("{name}: no such interface"));
                    continue;
                };
                let snat = node4_on(a4).or_else(|| a4.first().copied());
                let snat6 = node6_on(a6).or_else(|| a6.iter().find(|a| usable6(a)).copied());
                if snat.is_none() && snat6.is_none() {
                    out.problems
                        .push(format!("{name}: no IPv4 or global IPv6 address"));
                    continue;
                }
                out.devices.push(NodePortDevice {
                    ifname: name.clone(),
                    snat,
                    snat6,
                });
            }
        }
        None => {
            for (name, (a4, a6)) in &by_if {
                if *name == "lo" {
                    continue;
                }
                let (snat, snat6) = (node4_on(a4), node6_on(a6));
                if snat.is_some() || snat6.is_some() {
                    out.devices.push(NodePortDevice {
                        ifname: (*name).to_string(),
                        snat,
                        snat6,
                    });
                }
            }
            if out.devices.is_empty() {
                out.problems.push(if node_ips.is_empty() {
                    "the Node has no InternalIP/ExternalIP address".to_string()
                } else {
                    format!(
                        "no interface carries the Node's address{} {}",
                        if node_ips.len() > 1 { "es" } else { "" },
                        node_ips
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
            }
        }
    }
    out.devices.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    out.devices.dedup_by(|a, b| a.ifname == b.ifname);
    out
}

/// Every (interface name, address) of the calling thread's network
/// namespace (`getifaddrs`); interfaces without an address are left out.
pub fn interfaces() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own and free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it names.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: the family says this is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(v: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
        v.iter()
            .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
            .collect()
    }
    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }
    fn dev(n: &str, a: &str) -> NodePortDevice {
        NodePortDevice {
            ifname: n.into(),
            snat: Some(a.parse().unwrap()),
            snat6: None,
        }
    }
    fn dev6(n: &str, a: Option<&str>, a6: &str) -> NodePortDevice {
        NodePortDevice {
            ifname: n.into(),
            snat: a.map(|a| a.parse().unwrap()),
            snat6: Some(a6.parse().unwrap()),
        }
    }

    const HOST: &[(&str, &str)] = &[
        ("lo", "127.0.0.1"),
        ("eth0", "192.168.50.1"),
        ("eth0", "fd00::1"),
        ("eth1", "192.0.2.10"),
        ("eth1", "192.0.2.11"),
        ("cni0", "10.244.0.1"),
        ("wg0", "fd00::9"),
    ];

    #[test]
    fn interfaces_carrying_node_addresses_are_chosen_with_that_address() {
        // InternalIP on eth0, ExternalIP on eth1 (its second address): both,
        // each SNATing to the Node's address on it; cni0 and lo are not Node addresses.
        let c = choose(
            &ifs(HOST),
            &ips(&["192.168.50.1", "192.0.2.11", "fd00::1"]),
            None,
        );
        assert_eq!(
            c.devices,
            [
                dev6("eth0", Some("192.168.50.1"), "fd00::1"),
                dev("eth1", "192.0.2.11")
            ]
        );
        assert!(c.problems.is_empty());
        assert_eq!(
            c.summary(),
            "eth0 (SNAT 192.168.50.1, fd00::1), eth1 (SNAT 192.0.2.11)"
        );
    }

    #[test]
    fn no_interface_with_a_node_address_is_reported() {
        let c = choose(&ifs(HOST), &ips(&["10.9.9.9"]), None);
        assert!(c.devices.is_empty());
        assert_eq!(
            c.summary(),
            "none: no interface carries the Node's address 10.9.9.9"
        );
        // An IPv6-only Node: the interface carrying its address, IPv6 SNAT only.
        let c = choose(&ifs(HOST), &ips(&["fd00::1"]), None);
        assert_eq!(c.devices, [dev6("eth0", None, "fd00::1")]);
        assert_eq!(c.summary(), "eth0 (SNAT fd00::1)");
        let c = choose(&ifs(HOST), &[], None);
        assert_eq!(
            c.summary(),
            "none: the Node has no InternalIP/ExternalIP address"
        );
        // 127.0.0.1 is never a device, even as a Node address.
        assert!(choose(&ifs(HOST), &ips(&["127.0.0.1"]), None)
            .devices
            .is_empty());
    }

    #[test]
    fn configured_devices_override_and_missing_ones_are_reported() {
        let names = [
            "cni0".to_string(),
            "eth9".into(),
            "wg0".into(),
            "eth1".into(),
        ];
        let c = choose(&ifs(HOST), &ips(&["192.0.2.11"]), Some(&names));
        // cni0: not a Node address, its own; eth1: the Node's address on it;
        // wg0: IPv6 only.
        assert_eq!(
            c.devices,
            [
                dev("cni0", "10.244.0.1"),
                dev("eth1", "192.0.2.11"),
                dev6("wg0", None, "fd00::9")
            ]
        );
        assert_eq!(c.problems, ["eth9: no such interface"]);
        assert!(c.summary().ends_with("skipped: eth9: no such interface"));
        // Link-local only: no usable IPv6 SNAT address.
        let ll = ifs(&[("eth5", "fe80::1")]);
        let c = choose(&ll, &[], Some(&["eth5".to_string()]));
        assert_eq!(c.problems, ["eth5: no IPv4 or global IPv6 address"]);
    }

    #[test]
    fn this_namespace_has_a_loopback() {
        let all = interfaces().unwrap();
        assert!(
            all.iter().any(|(n, ip)| n == "lo" && ip.is_loopback()),
            "{all:?}"
        );
    }
}
