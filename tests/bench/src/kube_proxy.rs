//! Variants (c) and (d): kube-proxy's rules loaded the way kube-proxy loads
//! them, inside the variant's client namespace only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use crate::cleanup::Netns;
use crate::sys::{command_in, run_timed, run_timed_limit, Timed};

/// Which iptables kube-proxy would use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    /// iptables-nft (what `iptables` is on current distributions and here).
    #[default]
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
}

impl IptablesBackend {
    /// The restore program.
    pub fn restore(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-restore",
            Self::Legacy => "iptables-legacy-restore",
        }
    }

    /// The program printing the version.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft",
            Self::Legacy => "iptables-legacy",
        }
    }
}

/// `iptables-restore -w 5 [--noflush] < file` inside `ns`.
pub fn iptables_restore(
    ns: &Netns,
    backend: IptablesBackend,
    file: &Path,
    noflush: bool,
) -> Result<Duration> {
    let mut cmd = command_in(ns, backend.restore())?;
    cmd.args(["-w", "5"]);
    if noflush {
        cmd.arg("--noflush");
    }
    run_timed(cmd, Some(file)).with_context(|| format!("netns {}: {}", ns.name, file.display()))
}

/// [`iptables_restore`] killed at `limit` (a killed restore commits nothing).
pub fn iptables_restore_limit(
    ns: &Netns,
    backend: IptablesBackend,
    file: &Path,
    noflush: bool,
    limit: Duration,
) -> Result<Timed> {
    let mut cmd = command_in(ns, backend.restore())?;
    cmd.args(["-w", "5"]);
    if noflush {
        cmd.arg("--noflush");
    }
    run_timed_limit(cmd, Some(file), limit)
        .with_context(|| format!("netns {}: {}", ns.name, file.display()))
}

/// [`nft_apply`] killed at `limit` (a killed transaction commits nothing).
pub fn nft_apply_limit(ns: &Netns, file: &Path, limit: Duration) -> Result<Timed> {
    let mut cmd = command_in(ns, "nft")?;
    cmd.arg("-f").arg(file);
    run_timed_limit(cmd, None, limit)
        .with_context(|| format!("netns {}: {}", ns.name, file.display()))
}

/// `nft -f file` inside `ns`.
pub fn nft_apply(ns: &Netns, file: &Path) -> Result<Duration> {
    let mut cmd = command_in(ns, "nft")?;
    cmd.arg("-f").arg(file);
    run_timed(cmd, None).with_context(|| format!("netns {}: {}", ns.name, file.display()))
}

/// `nft --json list chains ip` inside `ns`: the listing kube-proxy
/// (knftables `List(ctx, "chains")`, filtered to its table afterwards) runs on
/// every sync to find stale chains.
pub fn nft_list_chains(ns: &Netns) -> Result<Duration> {
    let mut cmd = command_in(ns, "nft")?;
    cmd.args(["--json", "list", "chains", "ip"]);
    run_timed(cmd, None)
}

/// Rule files of one size, in a directory removed on drop.
pub struct RuleFiles {
    dir: crate::cleanup::TmpDir,
}

impl RuleFiles {
    /// A new directory under the system temp dir.
    pub fn new(tag: &str) -> Result<Self> {
        let dir = crate::cleanup::TmpDir::new(tag)?;
        Ok(Self { dir })
    }

    /// Writes `name` and returns its path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
