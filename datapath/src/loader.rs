//! Loads the embedded BPF object, pins its maps, and attaches the socket LB
//! programs to a cgroup through pinned links.
//!
//! Restart: maps are reopened from their pins (aya reuses a pinned map instead
//! of creating one), so the datapath state survives; nothing is flushed.
//!
//! Upgrade / restart of the programs: the new programs are loaded first, then
//! each existing pinned link gets the new program with `BPF_LINK_UPDATE`, an
//! atomic swap inside the kernel: at no instant is the cgroup without a
//! connect4 program. Only when no link is pinned yet is a new link created
//! (and pinned). A link found attached to another cgroup than requested is
//! replaced (new link first, then the old pin removed).
//!
//! Pinned maps of another layout or size are rebuilt beside the old ones
//! and the links switched to them (`upgrade.rs`, from [`install_with`]).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;

use crate::config::MapSizes;
use crate::layout::{
    names, NbConfig, NpDev, NpDev6, CFG_F_HOST_NS_ONLY, LAYOUT_VERSION, MODE_OBSERVE, MODE_REPLACE,
};
use crate::maps::kernel::KernelMaps;
use crate::maps::MapsError;
use crate::pins::{PinError, Pins};
use crate::status::MapSizeChange;
use crate::sys;
use crate::upgrade;

/// The compiled `bpf/sock_lb.bpf.c`.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));

/// The attach points: (link pin name, program name in the object). The *6
/// ones serve AF_INET6 sockets: IPv4-mapped and IPv6 destinations.
pub const ATTACH_POINTS: [(&str, &str); 8] = [
    ("connect4", "nb_sock4_connect"),
    ("sendmsg4", "nb_sock4_sendmsg"),
    ("recvmsg4", "nb_sock4_recvmsg"),
    ("getpeername4", "nb_sock4_getpeername"),
    ("connect6", "nb_sock6_connect"),
    ("sendmsg6", "nb_sock6_sendmsg"),
    ("recvmsg6", "nb_sock6_recvmsg"),
    ("getpeername6", "nb_sock6_getpeername"),
];

/// Errors of loading and attaching.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Pin directories.
    #[error(transparent)]
    Pins(#[from] PinError),
    /// The object could not be loaded.
    #[error("load BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program is missing from the object.
    #[error("program {0} missing from the BPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded or attached.
    #[error("program {name}: {op}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A link could not be converted, pinned or updated.
    #[error("link {path}: {op}: {reason}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// Operation.
        op: &'static str,
        /// Cause (text, the aya and io errors differ in type).
        reason: String,
    },
    /// The cgroup directory could not be opened.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A pinned map has a layout this binary does not understand.
    #[error("pinned map {path} has key/value size {found:?}, this build expects {expected:?}; remove the pins to migrate")]
    Incompatible {
        /// Pin path.
        path: PathBuf,
        /// (key, value) sizes found.
        found: (u32, u32),
        /// (key, value) sizes expected.
        expected: (u32, u32),
    },
    /// Map access after loading.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Rebuilding the pinned maps for a new layout or sizes failed.
    #[error("layout upgrade: {0}")]
    Upgrade(#[from] upgrade::UpgradeError),
    /// The agent's network namespace cookie could not be read.
    #[error("read the host netns cookie (getsockopt SO_NETNS_COOKIE, kernel >= 5.14): {0}")]
    NetnsCookie(#[source] std::io::Error),
}

/// What happened to one attach point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LinkAction {
    /// A new link was created and pinned.
    Attached,
    /// The existing pinned link now runs the newly loaded program.
    Updated,
    /// The pinned link pointed at another cgroup and was replaced.
    Reattached,
    /// The pinned link is alive and runs this agent's program already.
    Kept,
}

/// Result of [`install`].
#[derive(Clone, Debug, Serialize)]
pub struct InstallReport {
    /// Maps already existed (restart): their contents were kept.
    pub maps_reused: bool,
    /// Per attach point.
    pub links: Vec<(String, LinkAction)>,
    /// `mapSizes` changes refused: the pinned maps keep their size (resizing
    /// means building new maps beside the old ones, not done yet).
    pub size_changes: Vec<MapSizeChange>,
    /// Soft-state maps (flow table, counters) rebuilt empty because this
    /// build's layout differs from the pinned one.
    pub maps_reset: Vec<String>,
    /// The pinned maps were rebuilt for this layout or `mapSizes`
    /// (`upgrade.rs`).
    pub upgrade: Option<upgrade::UpgradeReport>,
    /// What was done about an upgrade a crash interrupted.
    pub recovered: Option<String>,
}

/// Expected (key, value) sizes per map.
pub(crate) fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use crate::layout::*;
    use std::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        names::SERVICES => s(size_of::<Lb4Key>(), size_of::<Lb4Service>()),
        names::BACKENDS => s(4, size_of::<Lb4Backend>()),
        names::REVNAT => s(4, size_of::<Lb4ReverseNat>()),
        names::REV_SK => s(size_of::<Lb4RevSkKey>(), size_of::<Lb4RevSkVal>()),
        names::AFFINITY => s(size_of::<Lb4AffinityKey>(), size_of::<Lb4AffinityVal>()),
        names::AFF_MATCH => s(size_of::<Lb4AffinityMatch>(), 4),
        names::COUNTERS => s(4, 8),
        names::CONFIG => s(4, size_of::<NbConfig>()),
        names::SERVICES6 => s(size_of::<Lb6Key>(), size_of::<Lb4Service>()),
        names::BACKENDS6 => s(4, size_of::<Lb6Backend>()),
        names::REVNAT6 => s(4, size_of::<Lb6ReverseNat>()),
        names::REV_SK6 => s(size_of::<Lb6RevSkKey>(), size_of::<Lb6RevSkVal>()),
        names::CT4 => s(size_of::<Ct4Key>(), size_of::<Ct4Val>()),
        names::NP_DEV => s(4, size_of::<NpDev>()),
        names::MAGLEV => s(4, size_of::<Maglev>()),
        names::SRC_RANGE => s(4 + size_of::<SrcRangeKey>(), 4),
        names::CT_TIMEOUT => s(4, size_of::<CtTimeouts>()),
        names::CT6 => s(size_of::<Ct6Key>(), size_of::<Ct6Val>()),
        names::NP_DEV6 => s(4, size_of::<NpDev6>()),
        names::SRC_RANGE6 => s(4 + size_of::<SrcRange6Key>(), 4),
        names::FLOW_CFG => s(4, size_of::<FlowCfg>()),
        names::FLOW_RL => s(4, size_of::<FlowBucket>()),
        names::FLOW_STATS => s(4, 8),
        names::SVC_STATS => s(4, size_of::<SvcStats>()),
        names::REV_TCP => s(4, size_of::<RevTcp>()),
        // nb_flow_ring: a ring buffer has no key or value size.
        _ => None,
    }
}

pub(crate) fn wanted_entries(name: &str, sizes: &MapSizes) -> Option<u32> {
    match name {
        names::SERVICES | names::SERVICES6 => Some(sizes.services),
        names::BACKENDS | names::AFF_MATCH | names::BACKENDS6 => Some(sizes.backends),
        names::REVNAT | names::REVNAT6 | names::SVC_STATS => Some(sizes.reverse_nat),
        names::AFFINITY => Some(sizes.affinity),
        names::REV_SK | names::REV_SK6 => Some(sizes.backends),
        _ => None,
    }
}

/// Pinned maps holding only soft state, rebuilt empty when their layout
/// changed instead of refusing to start: the per-packet path's flow table
/// (tracked north–south flows start over) and the outcome counters (a counter
/// reset, which Prometheus handles). The programs still attached keep the old
/// map until the new ones replace them.
///
/// `nb_config` too (decision: it grew the host netns cookie and flags in
/// place rather than a second single-entry map): it holds nothing but what
/// [`install`] writes at every start, before any link gets the new programs.
/// The flow event maps are soft state too: the switch is set again by the
/// next watcher, the bucket refills, the counters restart. So are the
/// per-Service counters (`nb_svc_stats`).
pub(crate) const RESETTABLE: [&str; 8] = [
    names::CT4,
    names::CT6,
    names::COUNTERS,
    names::CONFIG,
    names::FLOW_CFG,
    names::FLOW_RL,
    names::FLOW_STATS,
    names::SVC_STATS,
];

/// What [`check_pinned`] found.
#[derive(Default)]
struct PinCheck {
    size_changes: Vec<MapSizeChange>,
    reset: Vec<String>,
}

/// The `max_entries` a map has in use: the pinned size when a `mapSizes`
/// change was refused for it (`changes`), else what `sizes` asks for; None
/// for maps `mapSizes` does not size.
pub fn capacity(name: &str, sizes: &MapSizes, changes: &[MapSizeChange]) -> Option<u32> {
    let wanted = wanted_entries(name, sizes)?;
    Some(
        changes
            .iter()
            .find(|c| c.map == name)
            .map_or(wanted, |c| c.pinned),
    )
}

/// Checks pinned maps against this build's layouts before reusing them.
fn check_pinned(pins: &Pins, sizes: &MapSizes) -> Result<PinCheck, LoaderError> {
    let mut out = PinCheck::default();
    for name in names::ALL {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let found = (info.key_size(), info.value_size());
        let layout_changed = expected_sizes(name).is_some_and(|e| e != found)
            || (name == names::COUNTERS && info.max_entries() != crate::layout::COUNTER_MAX)
            || (name == names::FLOW_STATS
                && info.max_entries() != crate::layout::FLOW_STAT_NAMES.len() as u32);
        if layout_changed && RESETTABLE.contains(&name) {
            std::fs::remove_file(&path)
                .map_err(|e| link_err(&path, "remove (layout changed)", e))?;
            out.reset.push(name.to_string());
            continue;
        }
        if let Some(expected) = expected_sizes(name) {
            if found != expected {
                return Err(LoaderError::Incompatible {
                    path,
                    found,
                    expected,
                });
            }
        }
        if let Some(want) = wanted_entries(name, sizes) {
            if info.max_entries() != want {
                out.size_changes.push(MapSizeChange {
                    map: name.to_string(),
                    pinned: info.max_entries(),
                    configured: want,
                });
            }
        }
    }
    Ok(out)
}

/// What loading found in the pinned maps.
#[derive(Clone, Debug, Default)]
pub struct PinCheckReport {
    /// `mapSizes` changes refused (the pinned maps keep their size).
    pub size_changes: Vec<MapSizeChange>,
    /// Soft-state maps rebuilt empty because their layout changed.
    pub reset: Vec<String>,
}

/// Loads the object with its maps pinned under `pins` (reusing existing pins).
pub fn load(pins: &Pins, sizes: &MapSizes) -> Result<(Ebpf, PinCheckReport, bool), LoaderError> {
    load_object(pins, sizes, BPF_OBJECT)
}

/// [`load`] of `object`, another build of `sock_lb.bpf.c` with the same
/// maps ([`install_object`]).
fn load_object(
    pins: &Pins,
    sizes: &MapSizes,
    object: &[u8],
) -> Result<(Ebpf, PinCheckReport, bool), LoaderError> {
    pins.prepare()?;
    let reused = pins.maps_exist();
    let check = check_pinned(pins, sizes)?;
    let mut loader = EbpfLoader::new();
    for name in names::ALL {
        loader.map_pin_path(name, pins.map(name));
        if let Some(n) = wanted_entries(name, sizes) {
            loader.map_max_entries(name, n);
        }
    }
    let ebpf = loader
        .load(object)
        .map_err(|e| LoaderError::Load(Box::new(e)))?;
    Ok((
        ebpf,
        PinCheckReport {
            size_changes: check.size_changes,
            reset: check.reset,
        },
        reused,
    ))
}

fn link_err(path: &Path, op: &'static str, reason: impl ToString) -> LoaderError {
    LoaderError::Link {
        path: path.to_path_buf(),
        op,
        reason: reason.to_string(),
    }
}

/// What `nb_config` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathMode {
    /// Translate (replace kube-proxy) rather than only observe.
    pub replace: bool,
    /// `socketLB.hostNamespaceOnly`: the socket LB serves only sockets of
    /// the calling thread's network namespace (the host's); pods are served
    /// by their interfaces' tc programs ([`install_pod_interfaces`]).
    pub host_namespace_only: bool,
}

/// Writes `nb_config`: the mode, the layout version, the calling thread's
/// netns cookie (the host's) and the flags. One array write: sockets see
/// the old or the new entry whole.
pub fn write_config(pins: &Pins, mode: DatapathMode) -> Result<(), LoaderError> {
    let host_netns = sys::netns_cookie().map_err(LoaderError::NetnsCookie)?;
    let mut maps = KernelMaps::open(pins)?;
    maps.set_config(NbConfig {
        mode: if mode.replace {
            MODE_REPLACE
        } else {
            MODE_OBSERVE
        },
        version: LAYOUT_VERSION,
        host_netns,
        flags: if mode.host_namespace_only {
            CFG_F_HOST_NS_ONLY
        } else {
            0
        },
        pad: 0,
    })?;
    Ok(())
}

/// Loads, pins and attaches everything; sets the datapath mode (socket LB
/// in every network namespace).
pub fn install(
    pins: &Pins,
    cgroup: &Path,
    sizes: &MapSizes,
    replace: bool,
) -> Result<InstallReport, LoaderError> {
    install_with(
        pins,
        cgroup,
        sizes,
        DatapathMode {
            replace,
            host_namespace_only: false,
        },
    )
}

/// [`install`] with the whole `nb_config`. The configuration is written
/// before any link gets the newly loaded programs, so a rebuilt `nb_config`
/// (layout change) is never seen empty.
pub fn install_with(
    pins: &Pins,
    cgroup: &Path,
    sizes: &MapSizes,
    mode: DatapathMode,
) -> Result<InstallReport, LoaderError> {
    install_keeping(pins, cgroup, sizes, mode).map(|(r, _)| r)
}

/// The object an install loaded (its maps are the pinned ones), kept for
/// the first [`install_nodeport_with`]: loading the object again parses
/// the kernel's BTF again (aya's loader does on creation), ~32 ms of CPU
/// on 6.18, on a cold start's path.
pub struct Loaded(Ebpf);

/// [`install_with`], also giving back the object it loaded (None after a
/// layout upgrade, whose object's maps were staged under other pins).
pub fn install_keeping(
    pins: &Pins,
    cgroup: &Path,
    sizes: &MapSizes,
    mode: DatapathMode,
) -> Result<(InstallReport, Option<Loaded>), LoaderError> {
    pins.prepare()?;
    let recovered = upgrade::recover_interrupted(pins)?;
    if let Some(why) = upgrade::needed(pins, sizes) {
        match upgrade_install(pins, cgroup, sizes, mode, &why) {
            Ok(mut report) => {
                report.recovered = recovered;
                return Ok((report, None));
            }
            // Same layout, entries that do not fit the new sizes: the old
            // maps keep serving at their size (a refused change, below).
            Err(LoaderError::Upgrade(upgrade::UpgradeError::DoesNotFit { .. }))
                if why.changed_layout.is_empty()
                    && why.from_version.is_none_or(|v| v == LAYOUT_VERSION) => {}
            Err(e) => return Err(e),
        }
    }
    let (mut ebpf, check, maps_reused) = load(pins, sizes)?;
    write_config(pins, mode)?;
    let links = attach_cgroup(&mut ebpf, pins, cgroup)?;
    Ok((
        InstallReport {
            maps_reused,
            links,
            size_changes: check.size_changes,
            maps_reset: check.reset,
            upgrade: None,
            recovered,
        },
        Some(Loaded(ebpf)),
    ))
}

/// [`install_with`] of `object`, another build of `sock_lb.bpf.c` with the
/// same maps and programs, into a pin root and cgroup of its own: how a
/// benchmark measures a change to the programs side by side with this
/// build's, in one run. No layout upgrade, nothing carried over.
pub fn install_object(
    pins: &Pins,
    cgroup: &Path,
    sizes: &MapSizes,
    mode: DatapathMode,
    object: &[u8],
) -> Result<InstallReport, LoaderError> {
    let (mut ebpf, check, maps_reused) = load_object(pins, sizes, object)?;
    write_config(pins, mode)?;
    let links = attach_cgroup(&mut ebpf, pins, cgroup)?;
    Ok(InstallReport {
        maps_reused,
        links,
        size_changes: check.size_changes,
        maps_reset: check.reset,
        upgrade: None,
        recovered: None,
    })
}

/// [`install_with`] when the pinned maps must be rebuilt (`upgrade.rs`):
/// new maps beside the old, filled, every link switched, old pins removed.
fn upgrade_install(
    pins: &Pins,
    cgroup: &Path,
    sizes: &MapSizes,
    mode: DatapathMode,
    why: &upgrade::Why,
) -> Result<InstallReport, LoaderError> {
    let t = std::time::Instant::now();
    let from = why.from_version;
    upgrade::check_conversions(pins, from)?;
    let staging = pins.staging();
    upgrade::remove_dir(&staging.maps_dir())?;
    // Until the links are switched, any failure leaves the old maps serving.
    let filled = (|| {
        prepare_staging(&staging)?;
        let shared = upgrade::share_unchanged(pins, &staging, from, sizes)?;
        let (ebpf, _, _) = load(&staging, sizes)?;
        write_config(&staging, mode)?;
        let todo: Vec<&str> = upgrade::CARRIED
            .into_iter()
            .filter(|n| !shared.iter().any(|s| s == n))
            .collect();
        let copied = upgrade::copy_maps(pins, &staging, from, &todo, sys::BPF_ANY)?;
        Ok::<_, LoaderError>((ebpf, shared, copied))
    })();
    let (mut ebpf, shared, copied) = match filled {
        Ok(f) => f,
        Err(e) => {
            let _ = upgrade::remove_dir(&staging.maps_dir());
            return Err(e);
        }
    };
    let mut links = attach_cgroup(&mut ebpf, pins, cgroup)?;
    links.extend(switch_tc_links(&mut ebpf, pins));
    // What the old programs wrote meanwhile; a failure here loses only
    // those entries (reverse translation, affinity, tracked flows).
    let late_maps: Vec<&str> = upgrade::WRITTEN_BY_PROGRAMS
        .into_iter()
        .filter(|n| !shared.iter().any(|s| s == n))
        .collect();
    let late = match upgrade::copy_maps(pins, &staging, from, &late_maps, sys::BPF_NOEXIST) {
        Ok(c) => c.iter().map(|(_, n)| n).sum(),
        Err(e) => {
            tracing::warn!(error = %e, "layout upgrade: entries created during the switch not carried over");
            0
        }
    };
    drop(ebpf);
    upgrade::swap(pins)?;
    let report = upgrade::UpgradeReport {
        from_version: from,
        to_version: LAYOUT_VERSION,
        resized: why.resized.clone(),
        shared,
        copied,
        late,
        links: links.iter().map(|(p, _)| p.clone()).collect(),
        took_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    Ok(InstallReport {
        maps_reused: true,
        links,
        size_changes: Vec::new(),
        maps_reset: Vec::new(),
        upgrade: Some(report),
        recovered: None,
    })
}

/// Creates the (empty) staging map directory.
fn prepare_staging(staging: &Pins) -> Result<(), LoaderError> {
    std::fs::create_dir_all(staging.maps_dir()).map_err(|source| {
        LoaderError::Upgrade(upgrade::UpgradeError::Pin {
            path: staging.maps_dir(),
            op: "create",
            source,
        })
    })
}

/// Gives every pinned tc link (external and pod interfaces) its program
/// from `ebpf`. An interface that fails is skipped with a warning: the agent
/// attaches its interfaces again once running.
fn switch_tc_links(ebpf: &mut Ebpf, pins: &Pins) -> Vec<(String, LinkAction)> {
    let mut out = Vec::new();
    for (prefix, prog_name, dir) in NODEPORT_POINTS.into_iter().chain(POD_POINTS) {
        for ifname in attached_with(pins, prefix) {
            let point = format!("{prefix}{ifname}");
            match attach_tc_link(ebpf, pins, &point, prog_name, &ifname, dir) {
                Ok(action) => out.push((point, action)),
                Err(e) => {
                    tracing::warn!(link = %point, error = %e, "layout upgrade: tc link not switched");
                }
            }
        }
    }
    out
}

/// Attaches the socket LB programs of `ebpf` to `cgroup` through the pinned
/// links: an existing link on that cgroup gets the new program with
/// `BPF_LINK_UPDATE`; otherwise a new link is created and pinned.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    pins: &Pins,
    cgroup: &Path,
) -> Result<Vec<(String, LinkAction)>, LoaderError> {
    let cg_id = sys::cgroup_id(cgroup).map_err(|source| LoaderError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut links = Vec::new();
    for (point, prog_name) in ATTACH_POINTS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(prog_name)
            .ok_or(LoaderError::MissingProgram(prog_name))?
            .try_into()
            .map_err(|e| LoaderError::Program {
                name: prog_name,
                op: "type",
                source: Box::new(e),
            })?;
        prog.load().map_err(|e| LoaderError::Program {
            name: prog_name,
            op: "load",
            source: Box::new(e),
        })?;
        let pin = pins.link(point);

        let mut action = LinkAction::Attached;
        if pin.exists() {
            let link_fd = sys::obj_get(&pin).map_err(|e| link_err(&pin, "open", e))?;
            let info = sys::link_info(link_fd.as_fd()).map_err(|e| link_err(&pin, "info", e))?;
            if info.link_type == sys::LINK_TYPE_CGROUP && info.cgroup_id == cg_id {
                let prog_fd = prog.fd().map_err(|e| LoaderError::Program {
                    name: prog_name,
                    op: "fd",
                    source: Box::new(e),
                })?;
                sys::link_update(link_fd.as_fd(), prog_fd.as_fd())
                    .map_err(|e| link_err(&pin, "update", e))?;
                links.push((point.to_string(), LinkAction::Updated));
                continue;
            }
            action = LinkAction::Reattached;
        }

        let cg = File::open(cgroup).map_err(|source| LoaderError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| LoaderError::Program {
                name: prog_name,
                op: "attach",
                source: Box::new(e),
            })?;
        let link = prog.take_link(id).map_err(|e| LoaderError::Program {
            name: prog_name,
            op: "take link",
            source: Box::new(e),
        })?;
        let fd_link = FdLink::try_from(link).map_err(|e| link_err(&pin, "convert", e))?;
        if action == LinkAction::Reattached {
            // The new link is attached; dropping the old pin detaches the old one.
            std::fs::remove_file(&pin).map_err(|e| link_err(&pin, "remove stale", e))?;
        }
        fd_link.pin(&pin).map_err(|e| link_err(&pin, "pin", e))?;
        links.push((point.to_string(), action));
    }

    Ok(links)
}

/// The per-packet path's programs: (link pin prefix, program, direction).
pub const NODEPORT_POINTS: [(&str, &str, TcAttachType); 2] = [
    ("np-in-", "nb_np_ingress", TcAttachType::Ingress),
    ("np-out-", "nb_np_egress", TcAttachType::Egress),
];

/// One external interface of the per-packet path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePortDevice {
    /// Interface name (in the caller's network namespace).
    pub ifname: String,
    /// The node's IPv4 address remote backends see for SNATed flows (None:
    /// IPv4 flows to remote backends are dropped, counted `nodeport_no_snat_addr`).
    pub snat: Option<std::net::Ipv4Addr>,
    /// The node's IPv6 address for SNATed IPv6 flows (None: as above).
    pub snat6: Option<std::net::Ipv6Addr>,
}

impl NodePortDevice {
    /// `eth0 (SNAT 192.168.50.1, fd00::1)`.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .snat
            .map(|a| a.to_string())
            .into_iter()
            .chain(self.snat6.map(|a| a.to_string()))
            .collect();
        format!("{} (SNAT {})", self.ifname, addrs.join(", "))
    }
}

/// Attaches the per-packet path (`nb_np_ingress`/`nb_np_egress`, tc via
/// TCX) to each device and records its SNAT address in `nb_np_dev`. Call
/// after [`install`] (the maps are the pinned ones). Links are pinned as
/// `np-in-<ifname>` / `np-out-<ifname>`; an existing pinned link gets the new
/// program with `BPF_LINK_UPDATE`, like the cgroup links. Interfaces are
/// resolved in the calling thread's network namespace. Devices attached
/// before and not listed now are detached (their link pins removed, their
/// `nb_np_dev` entries deleted): the list is the whole set.
pub fn install_nodeport(
    pins: &Pins,
    sizes: &MapSizes,
    devices: &[NodePortDevice],
) -> Result<Vec<(String, LinkAction)>, LoaderError> {
    install_nodeport_with(None, pins, sizes, devices)
}

/// [`install_nodeport`] with the programs of an object already loaded on
/// these pins ([`install_keeping`]) instead of loading it again.
pub fn install_nodeport_with(
    loaded: Option<Loaded>,
    pins: &Pins,
    sizes: &MapSizes,
    devices: &[NodePortDevice],
) -> Result<Vec<(String, LinkAction)>, LoaderError> {
    let keep: Vec<&str> = devices.iter().map(|d| d.ifname.as_str()).collect();
    detach_nodeport_except(pins, &keep)?;
    if devices.is_empty() {
        clear_np_dev_except(pins, &[])?;
        return Ok(Vec::new());
    }
    let mut ebpf = match loaded {
        Some(Loaded(ebpf)) => ebpf,
        None => load(pins, sizes)?.0,
    };
    let mut out = Vec::new();
    let mut ifindexes = Vec::new();
    for dev in devices {
        let ifindex = sys::ifindex(&dev.ifname)
            .map_err(|e| link_err(Path::new(&dev.ifname), "ifindex", e))?;
        ifindexes.push(ifindex);
        set_np_dev(&mut ebpf, ifindex, dev)?;
        for (prefix, prog_name, dir) in NODEPORT_POINTS {
            let point = format!("{prefix}{}", dev.ifname);
            let action = attach_tc_link(&mut ebpf, pins, &point, prog_name, &dev.ifname, dir)?;
            out.push((point, action));
        }
    }
    clear_np_dev_except(pins, &ifindexes)?;
    Ok(out)
}

/// Records (or clears) a device's SNAT addresses in `nb_np_dev` / `nb_np_dev6`.
fn set_np_dev(ebpf: &mut Ebpf, ifindex: u32, dev: &NodePortDevice) -> Result<(), LoaderError> {
    let kerr = |map: &'static str, op: &'static str| {
        move |e: aya::maps::MapError| {
            LoaderError::Maps(MapsError::Kernel {
                map,
                op,
                source: Box::new(e),
            })
        }
    };
    {
        let map = ebpf
            .map_mut(names::NP_DEV)
            .ok_or(LoaderError::MissingProgram("nb_np_dev"))?;
        let mut m: aya::maps::HashMap<_, u32, NpDev> =
            aya::maps::HashMap::try_from(map).map_err(kerr(names::NP_DEV, "open"))?;
        match dev.snat {
            Some(a) => {
                let v = NpDev {
                    snat_addr: crate::layout::addr_be(a),
                    pad: 0,
                };
                m.insert(ifindex, v, 0)
                    .map_err(kerr(names::NP_DEV, "update"))?;
            }
            None => {
                let _ = m.remove(&ifindex);
            }
        }
    }
    let map = ebpf
        .map_mut(names::NP_DEV6)
        .ok_or(LoaderError::MissingProgram("nb_np_dev6"))?;
    let mut m: aya::maps::HashMap<_, u32, NpDev6> =
        aya::maps::HashMap::try_from(map).map_err(kerr(names::NP_DEV6, "open"))?;
    match dev.snat6 {
        Some(a) => {
            let v = NpDev6 {
                snat_addr: crate::layout::addr6_be(a),
            };
            m.insert(ifindex, v, 0)
                .map_err(kerr(names::NP_DEV6, "update"))?;
        }
        None => {
            let _ = m.remove(&ifindex);
        }
    }
    Ok(())
}

/// The interfaces with a pinned per-packet link (`np-in-<ifname>`).
pub fn nodeport_attached(pins: &Pins) -> Vec<String> {
    attached_with(pins, NODEPORT_POINTS[0].0)
}

/// Removes the per-packet link pins of every interface not in `keep` (that
/// detaches the programs from it).
fn detach_nodeport_except(pins: &Pins, keep: &[&str]) -> Result<(), LoaderError> {
    detach_links_except(pins, &NODEPORT_POINTS, keep)
}

/// Deletes the `nb_np_dev` / `nb_np_dev6` entries of interfaces not in
/// `keep` (ifindexes).
fn clear_np_dev_except(pins: &Pins, keep: &[u32]) -> Result<(), LoaderError> {
    fn clear<V: aya::Pod>(
        pins: &Pins,
        name: &'static str,
        keep: &[u32],
    ) -> Result<(), LoaderError> {
        let path = pins.map(name);
        if !path.exists() {
            return Ok(());
        }
        let kerr = |op: &'static str, e: aya::maps::MapError| {
            LoaderError::Maps(MapsError::Kernel {
                map: name,
                op,
                source: Box::new(e),
            })
        };
        let data = aya::maps::MapData::from_pin(&path).map_err(|e| kerr("open", e))?;
        let mut m: aya::maps::HashMap<_, u32, V> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|e| kerr("open", e))?;
        let stale: Vec<u32> = m.keys().flatten().filter(|k| !keep.contains(k)).collect();
        for k in stale {
            m.remove(&k).map_err(|e| kerr("delete", e))?;
        }
        Ok(())
    }
    clear::<NpDev>(pins, names::NP_DEV, keep)?;
    clear::<NpDev6>(pins, names::NP_DEV6, keep)
}

/// The pod interfaces' programs (`socketLB.hostNamespaceOnly`): (link pin
/// prefix, program, direction).
pub const POD_POINTS: [(&str, &str, TcAttachType); 2] = [
    ("pod-in-", "nb_pod_ingress", TcAttachType::Ingress),
    ("pod-out-", "nb_pod_egress", TcAttachType::Egress),
];

/// Result of [`install_pod_interfaces`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodAttach {
    /// Per link (`pod-in-<if>`, `pod-out-<if>`).
    pub links: Vec<(String, LinkAction)>,
    /// Interfaces that could not get the programs (gone meanwhile, …), why.
    pub failed: Vec<(String, String)>,
}

/// Attaches `nb_pod_ingress`/`nb_pod_egress` (tc via TCX) to the host side
/// of each pod interface in `ifnames`, links pinned as `pod-in-<if>` /
/// `pod-out-<if>`, and detaches them from every interface not listed (the
/// list is the whole set; empty detaches all). A pinned link still attached
/// to the interface of that name is kept as is, or given the newly loaded
/// program with `update` (`BPF_LINK_UPDATE`, at agent start); one whose
/// interface is gone (the pod was deleted, maybe re-created under the same
/// name) is replaced. An interface failing does not stop the others.
/// Interfaces are resolved in the calling thread's network namespace.
pub fn install_pod_interfaces(
    pins: &Pins,
    sizes: &MapSizes,
    ifnames: &[String],
    update: bool,
) -> Result<PodAttach, LoaderError> {
    let keep: Vec<&str> = ifnames.iter().map(String::as_str).collect();
    detach_links_except(pins, &POD_POINTS, &keep)?;
    let mut out = PodAttach::default();
    let mut todo = Vec::new();
    for ifname in ifnames {
        let Ok(ifindex) = sys::ifindex(ifname) else {
            out.failed
                .push((ifname.clone(), "no such interface".to_string()));
            continue;
        };
        let alive = POD_POINTS.iter().all(|(prefix, _, _)| {
            sys::obj_get(&pins.link(&format!("{prefix}{ifname}")))
                .and_then(|fd| sys::link_info(fd.as_fd()))
                .is_ok_and(|i| sys::tcx_link_ifindex(&i) == ifindex)
        });
        if alive && !update {
            for (prefix, _, _) in POD_POINTS {
                out.links
                    .push((format!("{prefix}{ifname}"), LinkAction::Kept));
            }
        } else {
            todo.push(ifname);
        }
    }
    if todo.is_empty() {
        return Ok(out);
    }
    let (mut ebpf, _, _) = load(pins, sizes)?;
    for ifname in todo {
        for (prefix, prog_name, dir) in POD_POINTS {
            let point = format!("{prefix}{ifname}");
            match attach_tc_link(&mut ebpf, pins, &point, prog_name, ifname, dir) {
                Ok(action) => out.links.push((point, action)),
                Err(e) => {
                    out.failed.push((ifname.clone(), e.to_string()));
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Attaches program `prog_name` of `ebpf` to `ifname` (tc via TCX) as the
/// link pinned at `point`: an existing pinned link gets the program with
/// `BPF_LINK_UPDATE`; a pinned link whose interface is gone is replaced.
fn attach_tc_link(
    ebpf: &mut Ebpf,
    pins: &Pins,
    point: &str,
    prog_name: &'static str,
    ifname: &str,
    dir: TcAttachType,
) -> Result<LinkAction, LoaderError> {
    let pin = pins.link(point);
    let prog: &mut SchedClassifier = ebpf
        .program_mut(prog_name)
        .ok_or(LoaderError::MissingProgram(prog_name))?
        .try_into()
        .map_err(|e| LoaderError::Program {
            name: prog_name,
            op: "type",
            source: Box::new(e),
        })?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| LoaderError::Program {
            name: prog_name,
            op: "load",
            source: Box::new(e),
        })?;
    }
    if pin.exists() {
        let link_fd = sys::obj_get(&pin).map_err(|e| link_err(&pin, "open", e))?;
        let live = sys::link_info(link_fd.as_fd()).is_ok_and(|i| sys::tcx_link_ifindex(&i) != 0)
            && sys::ifindex(ifname).is_ok();
        let prog_fd = prog.fd().map_err(|e| LoaderError::Program {
            name: prog_name,
            op: "fd",
            source: Box::new(e),
        })?;
        if live && sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).is_ok() {
            return Ok(LinkAction::Updated);
        }
        // The interface went away (and its link with it): attach anew.
        std::fs::remove_file(&pin).map_err(|e| link_err(&pin, "remove stale", e))?;
    }
    let id = prog.attach(ifname, dir).map_err(|e| LoaderError::Program {
        name: prog_name,
        op: "attach",
        source: Box::new(e),
    })?;
    let link = prog.take_link(id).map_err(|e| LoaderError::Program {
        name: prog_name,
        op: "take link",
        source: Box::new(e),
    })?;
    let fd_link = FdLink::try_from(link).map_err(|e| link_err(&pin, "convert", e))?;
    fd_link.pin(&pin).map_err(|e| link_err(&pin, "pin", e))?;
    Ok(LinkAction::Attached)
}

/// The interfaces with a pinned pod-interface link (`pod-in-<ifname>`).
pub fn pod_interfaces_attached(pins: &Pins) -> Vec<String> {
    attached_with(pins, POD_POINTS[0].0)
}

/// The interface names of the link pins starting with `prefix`, sorted.
fn attached_with(pins: &Pins, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(pins.links_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(prefix).map(str::to_string)
        })
        .collect();
    out.sort();
    out
}

/// Removes the link pins of `points` for every interface not in `keep`
/// (that detaches the programs from it).
fn detach_links_except(
    pins: &Pins,
    points: &[(&str, &str, TcAttachType)],
    keep: &[&str],
) -> Result<(), LoaderError> {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ifname = points
            .iter()
            .find_map(|(prefix, _, _)| name.strip_prefix(prefix));
        if let Some(ifname) = ifname {
            if !keep.contains(&ifname) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(|e| link_err(&p, "detach", e))?;
            }
        }
    }
    Ok(())
}

/// Where the socket LB is attached, read back from the link pins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AttachState {
    /// Attach point → (link id, program id, cgroup id).
    pub links: Vec<(String, u32, u32, u64)>,
}

/// Reads the pinned links (for status).
pub fn attach_state(pins: &Pins) -> AttachState {
    let mut links = Vec::new();
    for (point, _) in ATTACH_POINTS {
        let Ok(fd) = sys::obj_get(&pins.link(point)) else {
            continue;
        };
        if let Ok(i) = sys::link_info(fd.as_fd()) {
            links.push((point.to_string(), i.id, i.prog_id, i.cgroup_id));
        }
    }
    AttachState { links }
}

/// Detaches and forgets everything under `pins` (links first).
pub fn uninstall(pins: &Pins) -> Result<(), LoaderError> {
    pins.remove_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netboot_contract::memory as mem;

    /// A kernel `htab_elem`: 48 bytes, then key and value, each 8-byte rounded.
    fn elem(name: &str) -> u64 {
        let (k, v) = expected_sizes(name).unwrap();
        48 + u64::from(k.next_multiple_of(8)) + u64::from(v.next_multiple_of(8))
    }

    #[test]
    fn capacity_is_the_pinned_size_when_a_change_was_refused() {
        let sizes = MapSizes::default();
        assert_eq!(capacity(names::SERVICES, &sizes, &[]), Some(sizes.services));
        assert_eq!(
            capacity(names::AFF_MATCH, &sizes, &[]),
            Some(sizes.backends)
        );
        assert_eq!(
            capacity(names::REVNAT6, &sizes, &[]),
            Some(sizes.reverse_nat)
        );
        let refused = [MapSizeChange {
            map: names::BACKENDS.into(),
            pinned: 2048,
            configured: sizes.backends,
        }];
        assert_eq!(capacity(names::BACKENDS, &sizes, &refused), Some(2048));
        assert_eq!(
            capacity(names::BACKENDS6, &sizes, &refused),
            Some(sizes.backends)
        );
        assert_eq!(capacity(names::COUNTERS, &sizes, &refused), None);
    }

    #[test]
    fn memory_formula_fits_the_map_layouts() {
        // Why: the DaemonSet's memory limit is computed from these constants
        // (netboot_contract::memory); a layout change must update them.
        for name in [
            names::SERVICES,
            names::BACKENDS,
            names::AFF_MATCH,
            names::REVNAT,
            names::BACKENDS6,
            names::REVNAT6,
        ] {
            // + the 8-byte free-list node of BPF_F_NO_PREALLOC maps.
            assert!(elem(name) + 8 <= mem::HASH_ENTRY, "{name}: {}", elem(name));
        }
        // nb_lb6_svc (24-byte key and value since the u32 service ids) takes
        // an object of the 128-byte class.
        assert_eq!(elem(names::SERVICES6) + 8, 104);
        assert!(elem(names::SERVICES6) + 8 <= mem::SERVICE6_ENTRY);
        assert_eq!(elem(names::REV_SK), mem::REV_SK_ENTRY);
        assert_eq!(elem(names::AFFINITY), mem::AFFINITY_ENTRY);
        // nb_lb6_rev_sk: a preallocated LRU of this many bytes per entry.
        assert_eq!(elem(names::REV_SK6), mem::REV_SK6_ENTRY);
        // A Maglev table: its element is more than 32 KiB, an order-4 (64
        // KiB) page allocation.
        let table = elem(names::MAGLEV) + 8;
        assert!(table > 32 * 1024 && table <= mem::MAGLEV_TABLE, "{table}");
        // nb_rev_tcp: an array of fixed size, in the formula as a constant.
        let (_, v) = expected_sizes(names::REV_TCP).unwrap();
        assert_eq!(
            u64::from(crate::layout::REV_TCP_SLOTS) * u64::from(v),
            mem::REV_TCP
        );
        // Every map the formula sizes from mapSizes, and no other.
        let sized: Vec<&str> = names::ALL
            .into_iter()
            .filter(|n| wanted_entries(n, &MapSizes::default()).is_some())
            .collect();
        assert_eq!(
            sized,
            [
                names::SERVICES,
                names::BACKENDS,
                names::REVNAT,
                names::REV_SK,
                names::AFFINITY,
                names::AFF_MATCH,
                names::SERVICES6,
                names::BACKENDS6,
                names::REVNAT6,
                names::REV_SK6,
                names::SVC_STATS
            ]
        );
        // nb_svc_stats (per-CPU, BPF_F_NO_PREALLOC): the element holds the
        // key and a pointer to the per-CPU values (40 B on each CPU).
        let (k, v) = expected_sizes(names::SVC_STATS).unwrap();
        assert!(48 + u64::from(k.next_multiple_of(8)) + 8 + 8 <= mem::HASH_ENTRY);
        assert_eq!(u64::from(v), mem::SVC_STATS_VALUE);
    }
}
