//! The pod interfaces' tc path (`socketLB.hostNamespaceOnly`): which
//! interfaces are pods' ([`choose`], a pure function), and [`PodIfaces`],
//! which keeps `nb_pod_ingress`/`nb_pod_egress` attached to exactly those
//! and switches the socket LB to the host netns only once they are.
//!
//! Order matters both ways: a pod socket the socket LB leaves alone must
//! find the tc program on its interface. So the agent installs with the
//! flag off (pods are socket-balanced, and a tc program that sees a backend
//! address passes it), attaches the programs, and only then sets the flag;
//! turning the option off clears the flag (at install) before detaching.
//! A pod created later is unserved between its interface appearing and the
//! next scan: the scan is woken by netlink link events (milliseconds), with
//! a scan every [`RESCAN`] as the fallback.

use std::time::Duration;

use netboot_contract::config::SocketLb;

use crate::config::MapSizes;
use crate::loader::{self, DatapathMode, LoaderError};
use crate::pins::Pins;
use crate::sys;

/// How often the interfaces are rescanned without a link event.
pub const RESCAN: Duration = Duration::from_secs(2);

/// The pod interfaces among `names` (the agent's netns): those matching a
/// `podInterfaces` glob, never `lo` nor an interface of the per-packet path
/// for traffic from outside (`nodeport`). Sorted.
pub fn choose(names: &[String], cfg: &SocketLb, nodeport: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| n.as_str() != "lo" && !nodeport.contains(n) && cfg.is_pod_interface(n))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What one [`PodIfaces::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Something changed (attached, detached, the flag written).
    pub changed: bool,
    /// Pod interfaces carrying the programs now.
    pub attached: usize,
    /// Whether the socket LB serves the host netns only now.
    pub host_namespace_only: bool,
    /// Interfaces that could not get the programs, and why.
    pub failed: Vec<(String, String)>,
}

/// Keeps the pod interfaces' programs in step with the interfaces.
pub struct PodIfaces {
    pins: Pins,
    sizes: MapSizes,
    cfg: SocketLb,
    replace: bool,
    /// The interfaces attached at the last successful round.
    applied: Option<Vec<String>>,
    /// The flag is set in `nb_config`.
    flag_on: bool,
    /// No round yet: existing links get this agent's programs.
    first: bool,
}

impl PodIfaces {
    /// A controller for `cfg`; `replace` is the datapath mode written along.
    pub fn new(pins: Pins, sizes: MapSizes, cfg: SocketLb, replace: bool) -> Self {
        Self {
            pins,
            sizes,
            cfg,
            replace,
            applied: None,
            flag_on: false,
            first: true,
        }
    }

    /// Whether the option is on (the scan loop runs only then).
    pub fn enabled(&self) -> bool {
        self.cfg.host_namespace_only
    }

    /// One round, in the calling thread's network namespace (the host's):
    /// option off → detach every pod interface's programs; on → attach to
    /// the pod interfaces found, detach from the ones gone, then (once) set
    /// the flag.
    pub fn sync(&mut self) -> Result<SyncReport, LoaderError> {
        let want = if self.cfg.host_namespace_only {
            let names = sys::interface_names().map_err(|e| LoaderError::Link {
                path: "if_nameindex".into(),
                op: "list interfaces",
                reason: e.to_string(),
            })?;
            choose(&names, &self.cfg, &loader::nodeport_attached(&self.pins))
        } else {
            Vec::new()
        };
        let mut report = SyncReport {
            attached: want.len(),
            host_namespace_only: self.flag_on,
            ..SyncReport::default()
        };
        if self.applied.as_ref() == Some(&want) && !self.first {
            return Ok(report);
        }
        let r = loader::install_pod_interfaces(&self.pins, &self.sizes, &want, self.first)?;
        self.first = false;
        report.changed = true;
        report.attached = want.len().saturating_sub(r.failed.len());
        self.applied = r.failed.is_empty().then(|| want.clone());
        report.failed = r.failed;
        if self.cfg.host_namespace_only && !self.flag_on {
            loader::write_config(
                &self.pins,
                DatapathMode {
                    replace: self.replace,
                    host_namespace_only: true,
                },
            )?;
            self.flag_on = true;
        }
        report.host_namespace_only = self.flag_on;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interfaces_are_the_matching_ones_except_lo_and_the_external_ones() {
        let names: Vec<String> = [
            "lo",
            "eth0",
            "lxc12ab",
            "cali0a1b2c3d4e5",
            "veth9f",
            "p3f2a9c1b-7d4",
            "cilium_host",
            "veth-ext",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = SocketLb {
            host_namespace_only: true,
            ..SocketLb::default()
        };
        assert_eq!(
            choose(&names, &cfg, &["veth-ext".to_string()]),
            ["cali0a1b2c3d4e5", "lxc12ab", "p3f2a9c1b-7d4", "veth9f"]
        );
        let all = SocketLb {
            host_namespace_only: true,
            pod_interfaces: vec!["*".into()],
        };
        assert_eq!(choose(&names, &all, &[]).len(), names.len() - 1, "never lo");
    }
}
