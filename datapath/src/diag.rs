//! Diagnostics read straight from the pinned maps: `service list`,
//! `bpf lb list` (cilium-dbg's column style) and status without an agent.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use std::net::IpAddr;

use crate::layout::{L4Addr, SvcStats, BE_TERMINATING, MODE_REPLACE, SVC_F_AFFINITY};
use crate::loader;
use crate::maps::kernel::KernelMaps;
use crate::maps::{LbMaps, MapsDump, MapsError};
use crate::pins::Pins;
use crate::status::{Counter, LinkStatus, Status, DATAPATH_VERSION};

/// One backend of a service row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    /// Backend id.
    pub id: u32,
    /// Address.
    pub address: String,
    /// "active" or "terminating".
    pub state: String,
    /// Slot (0 = not in a slot: terminating, affinity only).
    pub slot: u16,
}

/// One frontend of `service list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// Service (rev-nat) id.
    pub id: u32,
    /// Frontend `VIP:port/PROTO`.
    pub frontend: String,
    /// Always ClusterIP here.
    #[serde(rename = "type")]
    pub type_: String,
    /// ClientIP affinity timeout in seconds, if any.
    pub affinity_timeout: Option<u32>,
    /// Backends.
    pub backends: Vec<BackendRow>,
    /// Per-Service counters (`service list --stats`; zero when the frontend
    /// has seen no traffic since it got its id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<SvcStats>,
}

/// Fills every row's `stats` from `nb_svc_stats` (by service id).
pub fn add_stats(rows: &mut [ServiceRow], stats: &BTreeMap<u32, SvcStats>) {
    for r in rows {
        r.stats = Some(stats.get(&r.id).copied().unwrap_or_default());
    }
}

/// `service list --stats` text.
pub fn render_service_stats(rows: &[ServiceRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<24} {:>12} {:>10} {:>13} {:>10} {:>10}",
        "ID", "Frontend", "Translated", "Refused", "AffinityHits", "TcFlows", "TcDropped"
    );
    for r in rows {
        let st = r.stats.unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<6} {:<24} {:>12} {:>10} {:>13} {:>10} {:>10}",
            r.id,
            r.frontend,
            st.translated,
            st.refused,
            st.affinity_hits,
            st.tc_new_flows,
            st.tc_dropped
        );
    }
    s
}

/// Builds `service list` rows from a dump.
pub fn service_rows(d: &MapsDump) -> Vec<ServiceRow> {
    let mut fronts: BTreeMap<L4Addr, ServiceRow> = BTreeMap::new();
    for (fe, slot, v) in d.service_entries() {
        if slot != 0 {
            continue;
        }
        let mut backends = Vec::new();
        for slot in 1..=v.count {
            if let Some(s) = d.service(fe, slot) {
                let addr = d
                    .backend_addr(s.backend_id)
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "?".into());
                backends.push(BackendRow {
                    id: s.backend_id,
                    address: addr,
                    state: "active".into(),
                    slot,
                });
            }
        }
        for (m, state) in &d.aff_match {
            if m.rev_nat_id == v.rev_nat_index && u8::try_from(*state).ok() == Some(BE_TERMINATING)
            {
                let addr = d
                    .backend_addr(m.backend_id)
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "?".into());
                backends.push(BackendRow {
                    id: m.backend_id,
                    address: addr,
                    state: "terminating".into(),
                    slot: 0,
                });
            }
        }
        fronts.insert(
            fe,
            ServiceRow {
                id: v.rev_nat_index,
                frontend: fe.to_string(),
                type_: "ClusterIP".into(),
                affinity_timeout: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout),
                backends,
                stats: None,
            },
        );
    }
    let mut rows: Vec<ServiceRow> = fronts.into_values().collect();
    rows.sort_by_key(|r| r.id);
    rows
}

/// `service list` text.
pub fn render_service_list(rows: &[ServiceRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<24} {:<28} Backend",
        "ID", "Frontend", "Service Type"
    );
    for r in rows {
        let ty = match r.affinity_timeout {
            Some(t) => format!("{} (ClientIP {t}s)", r.type_),
            None => r.type_.clone(),
        };
        if r.backends.is_empty() {
            let _ = writeln!(
                s,
                "{:<6} {:<24} {:<28} (none: connect is refused)",
                r.id, r.frontend, ty
            );
            continue;
        }
        for (i, b) in r.backends.iter().enumerate() {
            let line = format!("{} => {} ({})", i + 1, b.address, b.state);
            if i == 0 {
                let _ = writeln!(s, "{:<6} {:<24} {:<28} {line}", r.id, r.frontend, ty);
            } else {
                let _ = writeln!(s, "{:<6} {:<24} {:<28} {line}", "", "", "");
            }
        }
    }
    s
}

/// One line of `bpf lb list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LbRow {
    /// `VIP:port/PROTO`.
    pub service: String,
    /// Backend `ip:port/PROTO`, or `0.0.0.0:0` for the frontend slot.
    pub backend: String,
    /// Rev-nat id.
    pub revnat_id: u32,
    /// Slot.
    pub slot: u16,
    /// Frontend flags, slot 0 only.
    pub flags: String,
}

/// Builds `bpf lb list` rows (raw map view).
pub fn lb_rows(d: &MapsDump) -> Vec<LbRow> {
    let mut entries = d.service_entries();
    entries.sort_by_key(|(fe, slot, _)| (*fe, if *slot == 0 { u16::MAX } else { *slot }));
    entries
        .into_iter()
        .map(|(fe, slot, v)| {
            let (backend, flags) = if slot == 0 {
                let mut f = vec!["ClusterIP".to_string()];
                if v.flags & SVC_F_AFFINITY != 0 {
                    f.push(format!("sessionAffinity {}s", v.affinity_timeout));
                }
                if v.count == 0 {
                    f.push("no backends: ECONNREFUSED".into());
                }
                let none = if fe.is_v6() { "[::]:0" } else { "0.0.0.0:0" };
                (none.to_string(), format!("[{}]", f.join(", ")))
            } else {
                let b = d
                    .backend_addr(v.backend_id)
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| format!("<missing backend {}>", v.backend_id));
                (b, String::new())
            };
            LbRow {
                service: fe.to_string(),
                backend,
                revnat_id: v.rev_nat_index,
                slot,
                flags,
            }
        })
        .collect()
}

/// `bpf lb list` text.
pub fn render_lb_list(rows: &[LbRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} BACKEND ADDRESS (REVNAT_ID) (SLOT)",
        "SERVICE ADDRESS"
    );
    let mut last = String::new();
    for r in rows {
        let svc = if r.service == last {
            ""
        } else {
            r.service.as_str()
        };
        let flags = if r.flags.is_empty() {
            String::new()
        } else {
            format!(" {}", r.flags)
        };
        let _ = writeln!(
            s,
            "{svc:<24} {} ({}) ({}){flags}",
            r.backend, r.revnat_id, r.slot
        );
        last = r.service.clone();
    }
    s
}

/// Reverse-NAT entries for display.
pub fn revnat_rows(d: &MapsDump) -> Vec<(u32, String)> {
    d.revnat_entries()
        .into_iter()
        .map(|(id, ip, port)| match ip {
            IpAddr::V4(ip) => (id, format!("{ip}:{port}")),
            IpAddr::V6(ip) => (id, format!("[{ip}]:{port}")),
        })
        .collect()
}

/// The cgroup directory the links are attached to, found by walking the
/// cgroup2 mount (bounded depth) for the directory whose inode is the id.
fn links_cgroup(links: &[LinkStatus]) -> Option<String> {
    let id = links.first()?.cgroup_id;
    let root = crate::agent::default_cgroup().ok()?;
    let mut stack = vec![(root, 0u8)];
    while let Some((dir, depth)) = stack.pop() {
        if crate::sys::cgroup_id(&dir).ok() == Some(id) {
            return Some(dir.display().to_string());
        }
        if depth >= 6 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    None
}

/// Status read from the pins alone (no agent): mode, links, sizes, counters.
pub fn status_from_pins(pins: &Pins) -> Result<Status, MapsError> {
    let maps = KernelMaps::open(pins)?;
    let dump = maps.dump()?;
    let cfg = maps.config()?;
    let counters = maps.counters()?;
    let links: Vec<LinkStatus> = loader::attach_state(pins)
        .links
        .into_iter()
        .map(|(point, link_id, prog_id, cgroup_id)| LinkStatus {
            point,
            link_id,
            prog_id,
            cgroup_id,
        })
        .collect();
    let cgroup = links_cgroup(&links).unwrap_or_else(|| "unknown".into());
    Ok(Status {
        kube_proxy_replacement: cfg.mode == MODE_REPLACE,
        datapath_version: DATAPATH_VERSION.into(),
        cgroup,
        bpffs: pins.root().display().to_string(),
        links,
        services: dump.frontend_count(),
        backends: dump.backend_count(),
        counters: counters
            .0
            .iter()
            .map(|(n, v)| Counter {
                name: (*n).to_string(),
                value: *v,
            })
            .collect(),
        kube_proxy_rules: "unknown".into(),
        socket_termination: match crate::sock_term::SockTerm::load(pins) {
            Ok(_) => "available".into(),
            Err(e) => e.to_string(),
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::build;
    use crate::maps::memory::MemoryMaps;
    use crate::reconcile::Reconciler;

    fn dump() -> MapsDump {
        let (s, e) = crate::reconcile::tests_fixture(include_str!("../testdata/cluster.yaml"));
        let mut r = Reconciler::recover(MemoryMaps::new()).unwrap();
        r.reconcile(&build(&s, &e, 10800)).unwrap();
        r.maps().state.clone()
    }

    #[test]
    fn service_list_text() {
        insta::assert_snapshot!(render_service_list(&service_rows(&dump())));
    }

    #[test]
    fn bpf_lb_list_text() {
        insta::assert_snapshot!(render_lb_list(&lb_rows(&dump())));
    }

    #[test]
    fn service_list_json() {
        insta::assert_json_snapshot!(service_rows(&dump())[..2]);
    }
}
