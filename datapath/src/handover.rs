//! The node rules cleanup after kube-proxy: find and remove exactly
//! kube-proxy's leftovers in the rules network namespace, touching no other
//! component's rule, and close what kube-proxy opened (`route_localnet`).
//!
//! - What is kube-proxy's is decided from `iptables-save` text by a pure
//!   function ([`plan::plan_from_save`], ownership as kube-proxy v1.36 has it),
//!   in the nat/filter/mangle tables of both iptables backends (legacy and
//!   nft) for IPv4 and IPv6; each table is changed with one
//!   `iptables-restore -w --noflush` transaction. kube-proxy's nftables tables
//!   `ip kube-proxy` / `ip6 kube-proxy` are deleted whole.
//! - `net.ipv4.conf.all.route_localnet`: kube-proxy's iptables mode sets it to
//!   1 for NodePorts on 127.0.0.0/8; the datapath (socket LB at connect(), no
//!   NodePorts) never needs it. When kube-proxy's rules show it served
//!   localhost NodePorts, it is set back to 0 in the same pass, before the
//!   rules go (so a crash in between cannot lose the evidence). kubelet's
//!   KUBE-FIREWALL guard is never touched.
//! - Capabilities first ([`preflight`]): without CAP_NET_ADMIN, CAP_NET_RAW
//!   (and CAP_SYS_ADMIN to enter another namespace), without one of the
//!   programs, or with output iptables calls incompatible or that does not
//!   parse, every call fails with an error that [`HandoverError::is_capability`]
//!   recognises — never "absent".
//!
//! - IPVS mode ([`ipvs`], [`ipset`]): kube-proxy's IPVS virtual servers
//!   (`ipvsadm`), its dummy interface `kube-ipvs0` (`ip link`) and its ipsets
//!   (`ipset`), as `kube-proxy --cleanup` removes them but scoped to what is
//!   kube-proxy's. Order: virtual servers, `kube-ipvs0`, iptables rules, nft
//!   tables, then the ipsets (a set cannot go while a rule matches it).
//!   Without the `ip_vs` module in the kernel there are no virtual servers
//!   and `ipvsadm` is not needed; without `ip_set` loaded, no sets and no
//!   `ipset`.
//! - The mode ([`modes`]): which of kube-proxy's modes left state here.
//!
//! Commands run inside the namespace through `nsenter --net=PATH`.

pub mod ipset;
pub mod ipvs;
pub mod plan;

use std::collections::BTreeSet;

use netboot_contract::node::KubeProxyMode;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

pub use ipvs::IpvsOwnership;
pub use plan::{plan_from_save, SaveError, TablePlan, TABLES};

/// Errors of the node rules cleanup.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The agent lacks capabilities the cleanup needs.
    #[error("missing capabilities {}: needed to {}", .missing.join(", "), .why)]
    Capabilities {
        /// e.g. `CAP_NET_ADMIN`.
        missing: Vec<&'static str>,
        /// What they are needed for.
        why: &'static str,
    },
    /// A program the cleanup runs is not installed.
    #[error("{prog}: not installed (the cleanup needs iptables legacy and nft, ip6tables, nft, nsenter, ip, and ipvsadm / ipset where the kernel has IPVS / ipsets)")]
    Missing {
        /// The program.
        prog: String,
    },
    /// A command could not run.
    #[error("{cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{cmd}: exit {code}: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit code.
        code: i32,
        /// Its stderr.
        stderr: String,
    },
    /// `iptables-save` printed something that cannot be trusted.
    #[error("{cmd}: {source}")]
    Save {
        /// The command line.
        cmd: String,
        /// What was wrong.
        #[source]
        source: SaveError,
    },
    /// `ipvsadm`, `ipset` or `ip` printed something that cannot be trusted.
    #[error("{cmd}: {source}")]
    Parse {
        /// The command line.
        cmd: String,
        /// What was wrong.
        #[source]
        source: ipvs::ParseError,
    },
    /// Reading or writing a sysctl in the rules netns failed.
    #[error("sysctl {name}: {source}")]
    Sysctl {
        /// e.g. `net.ipv4.conf.all.route_localnet`.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl HandoverError {
    /// Whether the error means the agent cannot do the cleanup at all on this
    /// node (missing capability or program, output it cannot trust), as
    /// opposed to a command that may succeed when tried again.
    pub fn is_capability(&self) -> bool {
        match self {
            Self::Capabilities { .. }
            | Self::Missing { .. }
            | Self::Save { .. }
            | Self::Parse { .. } => true,
            Self::Failed { stderr, .. } => {
                stderr.contains("Permission denied") || stderr.contains("Operation not permitted")
            }
            Self::Sysctl { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            Self::Spawn { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
        }
    }
}

/// The iptables front ends to inspect: (save, restore) per backend and family.
pub const BACKENDS: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// kube-proxy's nftables tables.
pub const NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// The sysctl kube-proxy's iptables mode sets for localhost NodePorts.
pub const ROUTE_LOCALNET: &str = "net.ipv4.conf.all.route_localnet";
const ROUTE_LOCALNET_PATH: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;

/// Capabilities the cleanup needs that `cap_eff` (the `CapEff:` mask of
/// /proc/self/status) lacks: NET_ADMIN (iptables, nft, sysctl), NET_RAW
/// (iptables-legacy's socket), SYS_ADMIN when it enters another netns.
pub fn missing_capabilities(cap_eff: u64, enters_netns: bool) -> Vec<&'static str> {
    let mut need = vec![
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ];
    if enters_netns {
        need.push((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"));
    }
    need.into_iter()
        .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
        .map(|(_, name)| name)
        .collect()
}

/// The `CapEff:` mask in /proc/PID/status text.
pub fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Where the rules live.
#[derive(Clone, Debug, Default)]
pub struct RulesNetns {
    /// Namespace file (`/run/netns/X`, `/proc/PID/ns/net`); None = own netns.
    pub path: Option<PathBuf>,
}

impl RulesNetns {
    /// In `path`, or the agent's own namespace.
    pub fn new(path: Option<&Path>) -> Self {
        Self {
            path: path.map(Path::to_path_buf),
        }
    }

    fn command(&self, prog: &str) -> Command {
        match &self.path {
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display())).arg("--").arg(prog);
                c
            }
            None => Command::new(prog),
        }
    }

    /// Runs `prog args` (with `stdin`), returning stdout. A program that is
    /// not installed is an error ([`HandoverError::Missing`]).
    fn run(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, HandoverError> {
        let cmd_line = format!("{prog} {}", args.join(" ")).trim_end().to_string();
        let mut c = self.command(prog);
        c.args(args).stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HandoverError::Missing {
                    prog: if self.path.is_some() { "nsenter" } else { prog }.to_string(),
                })
            }
            Err(source) => {
                return Err(HandoverError::Spawn {
                    cmd: cmd_line,
                    source,
                })
            }
        };
        if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(input.as_bytes())
                .map_err(|source| HandoverError::Spawn {
                    cmd: cmd_line.clone(),
                    source,
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| HandoverError::Spawn {
                cmd: cmd_line.clone(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // nsenter reports a missing program as exit 127 (or 126).
        if self.path.is_some()
            && matches!(out.status.code(), Some(126 | 127))
            && stderr.contains(prog)
        {
            return Err(HandoverError::Missing {
                prog: prog.to_string(),
            });
        }
        if !out.status.success() {
            return Err(HandoverError::Failed {
                cmd: cmd_line,
                code: out.status.code().unwrap_or(-1),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` with the calling thread in this namespace: on a thread of its
    /// own, so no other work ever runs in the wrong namespace.
    fn in_netns<T: Send>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> std::io::Result<T> {
        let Some(path) = &self.path else {
            return f();
        };
        let file = std::fs::File::open(path)?;
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .spawn_scoped(s, move || {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on a valid namespace fd affects only this
                    // thread, which ends when `f` returns.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    f()
                })?
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
        })
    }

    /// `net.ipv4.conf.all.route_localnet` in this namespace.
    pub fn route_localnet(&self) -> Result<u8, HandoverError> {
        self.in_netns(|| std::fs::read_to_string(ROUTE_LOCALNET_PATH))
            .and_then(|s| {
                s.trim()
                    .parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| HandoverError::Sysctl {
                name: ROUTE_LOCALNET,
                source,
            })
    }

    /// Whether `/proc/net/<name>` exists in this namespace (`ip_vs`: the
    /// IPVS module is loaded).
    pub fn proc_net_exists(&self, name: &str) -> Result<bool, HandoverError> {
        let path = format!("/proc/thread-self/net/{name}");
        self.in_netns(|| Ok(Path::new(&path).exists()))
            .map_err(|source| HandoverError::Sysctl {
                name: "/proc/thread-self/net",
                source,
            })
    }

    /// Sets `net.ipv4.conf.all.route_localnet` in this namespace.
    pub fn set_route_localnet(&self, value: u8) -> Result<(), HandoverError> {
        self.in_netns(|| std::fs::write(ROUTE_LOCALNET_PATH, format!("{value}\n")))
            .map_err(|source| HandoverError::Sysctl {
                name: ROUTE_LOCALNET,
                source,
            })
    }
}

/// Checks, before anything is read or changed, that this process has the
/// capabilities the cleanup needs.
pub fn preflight(ns: &RulesNetns) -> Result<(), HandoverError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| HandoverError::Sysctl {
            name: "/proc/self/status",
            source,
        })?;
    // Unreadable mask: assume nothing, so the problem is reported.
    let eff = cap_eff(&status).unwrap_or(0);
    let missing = missing_capabilities(eff, ns.path.is_some());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(HandoverError::Capabilities {
            missing,
            why: "read and remove kube-proxy's iptables rules in the rules netns",
        })
    }
}

/// What exists, or what was removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// iptables tables holding kube-proxy state.
    pub tables: Vec<TablePlan>,
    /// kube-proxy nft tables (`ip kube-proxy`, …).
    pub nft_tables: Vec<String>,
    /// `route_localnet` was set back to 0 (cleanup only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub route_localnet_reset: bool,
    /// kube-proxy's IPVS virtual servers (`TCP 10.96.0.1:443 (why)`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipvs: Vec<String>,
    /// IPVS virtual servers that are not kube-proxy's: left alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipvs_others: Vec<String>,
    /// `kube-ipvs0` (a dummy link).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
    /// A `kube-ipvs0` that is not a dummy link: left alone, reported.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links_others: Vec<String>,
    /// kube-proxy's ipsets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipsets: Vec<String>,
    /// kube-proxy's ipsets kept because a staying rule matches them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipsets_retained: Vec<String>,
    /// The modes whose state this is ([`modes`]).
    #[serde(serialize_with = "ser_modes")]
    pub modes: BTreeSet<KubeProxyMode>,
}

fn ser_modes<S: serde::Serializer>(m: &BTreeSet<KubeProxyMode>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&netboot_contract::node::format_modes(m))
}

/// Chains only kube-proxy's IPVS mode writes, and only its iptables mode.
fn chain_mode(table: &str, chain: &str) -> Option<KubeProxyMode> {
    if plan::IPVS_CHAINS
        .iter()
        .any(|(t, cs)| *t == table && cs.contains(&chain))
    {
        return Some(KubeProxyMode::Ipvs);
    }
    let iptables_only = [
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-CANARY",
    ];
    if iptables_only.contains(&chain)
        || (table == "nat"
            && plan::SERVICE_CHAIN_PREFIXES
                .iter()
                .any(|p| chain.starts_with(p)))
    {
        return Some(KubeProxyMode::Iptables);
    }
    None
}

/// Which of kube-proxy's modes left the state in `rep`: IPVS for virtual
/// servers, `kube-ipvs0`, ipsets or IPVS-only chains; nftables for its nft
/// tables; iptables for iptables-only chains, or for chains both iptables
/// modes share when nothing says IPVS. Empty: nothing of kube-proxy's.
pub fn modes(rep: &Report) -> BTreeSet<KubeProxyMode> {
    let mut out = BTreeSet::new();
    let mut shared = false;
    for t in &rep.tables {
        let retained = t
            .retained
            .iter()
            .filter_map(|r| r.split_whitespace().next());
        for c in t.chains.iter().map(String::as_str).chain(retained) {
            match chain_mode(&t.table, c) {
                Some(m) => {
                    out.insert(m);
                }
                None => shared = true,
            }
        }
        shared |= !t.jumps.is_empty();
    }
    if !rep.ipvs.is_empty()
        || !rep.links.is_empty()
        || !rep.ipsets.is_empty()
        || !rep.ipsets_retained.is_empty()
    {
        out.insert(KubeProxyMode::Ipvs);
    }
    if shared && !out.contains(&KubeProxyMode::Ipvs) {
        out.insert(KubeProxyMode::Iptables);
    }
    if !rep.nft_tables.is_empty() {
        out.insert(KubeProxyMode::Nftables);
    }
    out
}

impl Report {
    /// Anything of kube-proxy's present (retained chains included).
    pub fn present(&self) -> bool {
        self.tables.iter().any(TablePlan::present)
            || !self.nft_tables.is_empty()
            || !self.ipvs.is_empty()
            || !self.links.is_empty()
            || !self.ipsets.is_empty()
            || !self.ipsets_retained.is_empty()
    }

    /// Chains + jumps + nft tables + virtual servers + links + ipsets counted.
    pub fn items(&self) -> usize {
        self.tables
            .iter()
            .map(|t| t.chains.len() + t.jumps.len())
            .sum::<usize>()
            + self.nft_tables.len()
            + self.ipvs.len()
            + self.links.len()
            + self.ipsets.len()
    }

    /// kube-proxy chains and ipsets kept because other rules use them, with who.
    pub fn retained(&self) -> Vec<String> {
        self.tables
            .iter()
            .flat_map(|t| {
                t.retained
                    .iter()
                    .map(move |r| format!("{} {}: {r}", t.backend, t.table))
            })
            .chain(self.ipsets_retained.iter().map(|r| format!("ipset {r}")))
            .collect()
    }

    /// kube-proxy (IPv4 iptables mode) served NodePorts on 127.0.0.0/8, so it
    /// set `route_localnet=1`.
    pub fn localhost_node_ports(&self) -> bool {
        self.tables
            .iter()
            .any(|t| t.localhost_node_ports && !t.backend.starts_with("ip6"))
    }
}

/// What [`detect`] found, with what [`cleanup`] needs to remove it.
#[derive(Debug, Default)]
struct Found {
    report: Report,
    servers: Vec<ipvs::VirtualServer>,
    destroy_sets: Vec<String>,
}

/// Finds kube-proxy's state in `ns` without changing anything; `own` says
/// which IPVS virtual servers are kube-proxy's.
pub fn detect(ns: &RulesNetns, own: &IpvsOwnership) -> Result<Report, HandoverError> {
    find(ns, own).map(|f| f.report)
}

fn parse_err(cmd: &str) -> impl FnOnce(ipvs::ParseError) -> HandoverError + '_ {
    move |source| HandoverError::Parse {
        cmd: cmd.to_string(),
        source,
    }
}

fn find(ns: &RulesNetns, own: &IpvsOwnership) -> Result<Found, HandoverError> {
    preflight(ns)?;
    let mut rep = Report::default();
    let mut staying = Vec::new();
    for (save, _) in BACKENDS {
        let text = ns.run(save, &[], None)?;
        let save_err = |source| HandoverError::Save {
            cmd: save.to_string(),
            source,
        };
        let tables = plan::parse_save(&text).map_err(save_err)?;
        let plans: Vec<TablePlan> = tables
            .iter()
            .filter_map(|t| plan::plan_table(save, t))
            .filter(TablePlan::present)
            .collect();
        staying.extend(plan::staying_set_rules(save, &tables, &plans));
        rep.tables.extend(plans);
    }
    let list = ns.run("nft", &["list", "tables"], None)?;
    let have: BTreeSet<String> = list.lines().map(|l| l.trim().to_string()).collect();
    for (fam, name) in NFT_TABLES {
        if have.contains(&format!("table {fam} {name}")) {
            rep.nft_tables.push(format!("{fam} {name}"));
        }
    }
    // IPVS: virtual servers only when the kernel has IPVS here.
    let servers = if ns.proc_net_exists("ip_vs")? {
        let cmd = "ipvsadm -S -n";
        ipvs::parse_ipvsadm_save(&ns.run("ipvsadm", &["-S", "-n"], None)?)
            .map_err(parse_err(cmd))?
    } else {
        Vec::new()
    };
    let links = ipvs::parse_ip_link(&ns.run("ip", &["-o", "-d", "link", "show"], None)?)
        .map_err(parse_err("ip -o -d link show"))?;
    let addrs = ipvs::parse_ip_addr(&ns.run("ip", &["-o", "addr", "show"], None)?)
        .map_err(parse_err("ip -o addr show"))?;
    let iplan = ipvs::plan_ipvs(&servers, &addrs, &links, own);
    rep.ipvs = iplan
        .delete
        .iter()
        .map(|(v, why)| format!("{v} ({why})"))
        .collect();
    rep.ipvs_others = iplan.kept.iter().map(ToString::to_string).collect();
    if iplan.delete_link {
        rep.links.push(ipvs::DUMMY_DEVICE.to_string());
    }
    if iplan.foreign_link {
        rep.links_others.push(format!(
            "{} (not a dummy link: not kube-proxy's)",
            ipvs::DUMMY_DEVICE
        ));
    }
    // ipsets: only when the kernel has them (the module is global).
    let set_names = if Path::new("/sys/module/ip_set").exists() {
        ipset::parse_list_names(&ns.run("ipset", &["list", "-n"], None)?)
            .map_err(parse_err("ipset list -n"))?
    } else {
        Vec::new()
    };
    let splan = ipset::plan_ipsets(&set_names, &staying);
    rep.ipsets = splan.destroy.clone();
    rep.ipsets_retained = splan.retained;
    rep.modes = modes(&rep);
    Ok(Found {
        report: rep,
        servers: iplan.delete.into_iter().map(|(v, _)| v).collect(),
        destroy_sets: splan.destroy,
    })
}

/// Removes kube-proxy's state from `ns` (and resets `route_localnet` when
/// kube-proxy had set it); returns what was removed. Kept chains and sets
/// ([`TablePlan::retained`], [`Report::ipsets_retained`]) and other
/// components' virtual servers stay and are reported.
pub fn cleanup(ns: &RulesNetns, own: &IpvsOwnership) -> Result<Report, HandoverError> {
    let found = find(ns, own)?;
    let mut rep = found.report;
    if rep.localhost_node_ports() && ns.route_localnet()? != 0 {
        ns.set_route_localnet(0)?;
        rep.route_localnet_reset = true;
    }
    for vs in &found.servers {
        let mut args = vec!["-D".to_string()];
        args.extend(vs.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ns.run("ipvsadm", &args, None)?;
    }
    for l in &rep.links {
        ns.run("ip", &["link", "delete", l.as_str()], None)?;
    }
    for t in &rep.tables {
        if t.chains.is_empty() && t.jumps.is_empty() {
            continue; // only retained chains: nothing to do
        }
        let restore = BACKENDS
            .iter()
            .find(|(s, _)| *s == t.backend)
            .map(|(_, r)| *r)
            .unwrap_or("iptables-restore");
        ns.run(restore, &["-w", "--noflush"], Some(&t.restore_input()))?;
    }
    for spec in &rep.nft_tables {
        let mut args = vec!["delete", "table"];
        args.extend(spec.split_whitespace());
        ns.run("nft", &args, None)?;
    }
    // Last: a set cannot be destroyed while a rule matches it.
    for set in &found.destroy_sets {
        ns.run("ipset", &["destroy", set.as_str()], None)?;
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(
            missing_capabilities(0x1ff_ffff_ffff, true),
            Vec::<&str>::new()
        );
        let no_net_admin = 0x1ff_ffff_ffff & !(1 << CAP_NET_ADMIN);
        assert_eq!(missing_capabilities(no_net_admin, false), ["CAP_NET_ADMIN"]);
        let only_net = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW);
        assert_eq!(missing_capabilities(only_net, false), Vec::<&str>::new());
        assert_eq!(missing_capabilities(only_net, true), ["CAP_SYS_ADMIN"]);
        assert_eq!(
            missing_capabilities(0, false),
            ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
        assert_eq!(cap_eff("Name:\tx\n"), None);
    }

    fn table(table: &str, chains: &[&str], jumps: usize) -> TablePlan {
        TablePlan {
            backend: "iptables-nft-save".into(),
            table: table.into(),
            chains: chains.iter().map(|c| c.to_string()).collect(),
            jumps: vec!["-A X".into(); jumps],
            ..Default::default()
        }
    }

    #[test]
    fn the_mode_follows_what_is_present() {
        use KubeProxyMode::{Iptables, Ipvs, Nftables};
        let m = |rep: &Report| modes(rep).into_iter().collect::<Vec<_>>();
        assert_eq!(m(&Report::default()), []);
        let iptables = Report {
            tables: vec![table("nat", &["KUBE-SERVICES", "KUBE-SVC-X"], 2)],
            ..Default::default()
        };
        assert_eq!(m(&iptables), [Iptables]);
        // Chains both modes share, and IPVS evidence: IPVS only.
        let ipvs = Report {
            tables: vec![table("nat", &["KUBE-SERVICES", "KUBE-MARK-MASQ"], 3)],
            ipsets: vec!["KUBE-CLUSTER-IP".into()],
            ..Default::default()
        };
        assert_eq!(m(&ipvs), [Ipvs]);
        for r in [
            Report {
                ipvs: vec!["TCP 10.96.0.1:443 (Service address)".into()],
                ..Default::default()
            },
            Report {
                links: vec!["kube-ipvs0".into()],
                ..Default::default()
            },
            Report {
                tables: vec![table("filter", &["KUBE-IPVS-FILTER"], 0)],
                ..Default::default()
            },
        ] {
            assert_eq!(m(&r), [Ipvs], "{r:?}");
            assert!(r.present());
        }
        // Shared chains alone: iptables mode (kube-proxy's default).
        let shared = Report {
            tables: vec![table("filter", &["KUBE-FORWARD"], 1)],
            ..Default::default()
        };
        assert_eq!(m(&shared), [Iptables]);
        // A mode switch that left both behind, plus the nft tables.
        let both = Report {
            tables: vec![table("nat", &["KUBE-SVC-X", "KUBE-LOAD-BALANCER"], 0)],
            nft_tables: vec!["ip kube-proxy".into()],
            ..Default::default()
        };
        assert_eq!(m(&both), [Iptables, Nftables, Ipvs]);
        // Other components' IPVS state alone is no mode and nothing present.
        let others = Report {
            ipvs_others: vec!["TCP 172.18.0.3:8443".into()],
            links_others: vec!["kube-ipvs0 (not a dummy link)".into()],
            ..Default::default()
        };
        assert_eq!(m(&others), []);
        assert!(!others.present());
    }

    #[test]
    fn capability_errors_are_told_apart_from_passing_failures() {
        let failed = |stderr: &str| HandoverError::Failed {
            cmd: "iptables-legacy-save".into(),
            code: 1,
            stderr: stderr.into(),
        };
        assert!(failed("iptables-legacy-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)").is_capability());
        assert!(
            failed("Could not fetch rule set generation id: Operation not permitted")
                .is_capability()
        );
        assert!(!failed("Another app is currently holding the xtables lock").is_capability());
        assert!(HandoverError::Missing { prog: "nft".into() }.is_capability());
        assert!(HandoverError::Save {
            cmd: "iptables-nft-save".into(),
            source: SaveError::Truncated {
                table: "nat".into()
            }
        }
        .is_capability());
    }
}
