//! Node handover from kube-proxy: find and remove kube-proxy's leftovers in
//! the rules network namespace, touching no other rule.
//!
//! Removed: every `KUBE-*` chain (flushed, then deleted) and every rule in
//! another chain that jumps or goes to a `KUBE-*` chain, in the nat, filter
//! and mangle tables of both iptables backends (legacy and nft) for IPv4 and
//! IPv6; and kube-proxy's nftables tables `ip kube-proxy` / `ip6 kube-proxy`.
//! Each table is changed with one `iptables-restore --noflush` transaction.
//! Commands run inside the namespace through `nsenter --net=PATH`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

/// Errors of the handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
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
}

/// The iptables front ends to inspect: (save, restore) per backend and family.
pub const BACKENDS: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// Tables kube-proxy writes to.
pub const TABLES: [&str; 3] = ["nat", "filter", "mangle"];

/// kube-proxy's nftables tables.
pub const NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

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

    /// Runs `prog args` (with `stdin`), returning stdout; None if `prog` is not installed.
    fn run(
        &self,
        prog: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Option<String>, HandoverError> {
        let cmd_line = format!("{prog} {}", args.join(" "));
        let mut c = self.command(prog);
        c.args(args).stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
            return Ok(None);
        }
        if !out.status.success() {
            return Err(HandoverError::Failed {
                cmd: cmd_line,
                code: out.status.code().unwrap_or(-1),
                stderr,
            });
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// kube-proxy state of one iptables table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TablePlan {
    /// `iptables-legacy-save` etc.
    pub backend: String,
    /// Table name.
    pub table: String,
    /// KUBE-* chains found.
    pub chains: Vec<String>,
    /// Rules (in other chains) that jump to KUBE-* chains, as `-A …` lines.
    pub jumps: Vec<String>,
}

impl TablePlan {
    /// The `iptables-restore --noflush` input that removes exactly this.
    pub fn restore_input(&self) -> String {
        let mut s = format!("*{}\n", self.table);
        for j in &self.jumps {
            if let Some(rest) = j.strip_prefix("-A ") {
                s.push_str("-D ");
                s.push_str(rest);
                s.push('\n');
            }
        }
        for c in &self.chains {
            s.push_str(&format!("-F {c}\n"));
        }
        for c in &self.chains {
            s.push_str(&format!("-X {c}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }
}

fn is_kube(chain: &str) -> bool {
    chain.starts_with("KUBE-")
}

/// Parses `iptables-save` output into per-table plans (only tables with something to remove).
pub fn plan_from_save(backend: &str, save: &str) -> Vec<TablePlan> {
    let mut out = Vec::new();
    let mut cur: Option<TablePlan> = None;
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            cur = Some(TablePlan {
                backend: backend.into(),
                table: t.trim().into(),
                ..Default::default()
            });
            continue;
        }
        let Some(p) = cur.as_mut() else { continue };
        if line == "COMMIT" {
            if let Some(p) = cur.take() {
                if TABLES.contains(&p.table.as_str())
                    && (!p.chains.is_empty() || !p.jumps.is_empty())
                {
                    out.push(p);
                }
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if is_kube(name) {
                p.chains.push(name.to_string());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if is_kube(chain) {
                continue; // goes with the chain
            }
            let toks: Vec<&str> = rest.split_whitespace().collect();
            let targets_kube = toks.windows(2).any(|w| {
                (w[0] == "-j" || w[0] == "-g" || w[0] == "--jump" || w[0] == "--goto")
                    && is_kube(w[1])
            });
            if targets_kube {
                p.jumps.push(line.to_string());
            }
        }
    }
    out
}

/// What exists, or what was removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// iptables tables with KUBE-* state.
    pub tables: Vec<TablePlan>,
    /// kube-proxy nft tables (`ip kube-proxy`, …).
    pub nft_tables: Vec<String>,
}

impl Report {
    /// Anything of kube-proxy's present.
    pub fn present(&self) -> bool {
        !self.tables.is_empty() || !self.nft_tables.is_empty()
    }

    /// Chains + jumps + nft tables counted.
    pub fn items(&self) -> usize {
        self.tables
            .iter()
            .map(|t| t.chains.len() + t.jumps.len())
            .sum::<usize>()
            + self.nft_tables.len()
    }
}

/// Finds kube-proxy's rules in `ns` without changing anything.
pub fn detect(ns: &RulesNetns) -> Result<Report, HandoverError> {
    let mut rep = Report::default();
    for (save, _) in BACKENDS {
        if let Some(text) = ns.run(save, &[], None)? {
            rep.tables.extend(plan_from_save(save, &text));
        }
    }
    if let Some(list) = ns.run("nft", &["list", "tables"], None)? {
        let have: BTreeSet<String> = list.lines().map(|l| l.trim().to_string()).collect();
        for (fam, name) in NFT_TABLES {
            if have.contains(&format!("table {fam} {name}")) {
                rep.nft_tables.push(format!("{fam} {name}"));
            }
        }
    }
    Ok(rep)
}

/// Removes kube-proxy's rules from `ns`; returns what was removed.
pub fn cleanup(ns: &RulesNetns) -> Result<Report, HandoverError> {
    let rep = detect(ns)?;
    for t in &rep.tables {
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

    const SAVE: &str = "# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:MY-CHAIN - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE
-A MY-CHAIN -j RETURN
-A KUBE-POSTROUTING -j RETURN
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn plan_removes_only_kube_chains_and_jumps() {
        let p = plan_from_save("iptables-nft-save", SAVE);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].chains, vec!["KUBE-SERVICES", "KUBE-POSTROUTING"]);
        assert_eq!(p[0].jumps.len(), 3);
        insta::assert_snapshot!(p[0].restore_input());
    }
}
