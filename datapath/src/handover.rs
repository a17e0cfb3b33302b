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
//! Commands run inside the namespace through `nsenter --net=PATH`.

pub mod plan;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

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
    #[error("{prog}: not installed (the cleanup needs iptables legacy and nft, ip6tables, nft and nsenter)")]
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
            Self::Capabilities { .. } | Self::Missing { .. } | Self::Save { .. } => true,
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
            s.spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd affects only this
                // thread, which ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                f()
            })
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
}

impl Report {
    /// Anything of kube-proxy's present (retained chains included).
    pub fn present(&self) -> bool {
        self.tables.iter().any(TablePlan::present) || !self.nft_tables.is_empty()
    }

    /// Chains + jumps + nft tables counted.
    pub fn items(&self) -> usize {
        self.tables
            .iter()
            .map(|t| t.chains.len() + t.jumps.len())
            .sum::<usize>()
            + self.nft_tables.len()
    }

    /// kube-proxy chains kept because other rules use them, with who.
    pub fn retained(&self) -> Vec<String> {
        self.tables
            .iter()
            .flat_map(|t| {
                t.retained
                    .iter()
                    .map(move |r| format!("{} {}: {r}", t.backend, t.table))
            })
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

/// Finds kube-proxy's rules in `ns` without changing anything.
pub fn detect(ns: &RulesNetns) -> Result<Report, HandoverError> {
    preflight(ns)?;
    let mut rep = Report::default();
    for (save, _) in BACKENDS {
        let text = ns.run(save, &[], None)?;
        rep.tables.extend(
            plan_from_save(save, &text).map_err(|source| HandoverError::Save {
                cmd: save.to_string(),
                source,
            })?,
        );
    }
    let list = ns.run("nft", &["list", "tables"], None)?;
    let have: BTreeSet<String> = list.lines().map(|l| l.trim().to_string()).collect();
    for (fam, name) in NFT_TABLES {
        if have.contains(&format!("table {fam} {name}")) {
            rep.nft_tables.push(format!("{fam} {name}"));
        }
    }
    Ok(rep)
}

/// Removes kube-proxy's rules from `ns` (and resets `route_localnet` when
/// kube-proxy had set it); returns what was removed. Kept chains
/// ([`TablePlan::retained`]) stay and are reported.
pub fn cleanup(ns: &RulesNetns) -> Result<Report, HandoverError> {
    let mut rep = detect(ns)?;
    if rep.localhost_node_ports() && ns.route_localnet()? != 0 {
        ns.set_route_localnet(0)?;
        rep.route_localnet_reset = true;
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
