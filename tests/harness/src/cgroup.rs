//! cgroup v2 directories for nodes and pods under the layout's cgroup root.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failed cgroup operation; the message names the cgroup.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {what}: {source}")]
pub struct CgroupError {
    /// The cgroup directory.
    pub path: PathBuf,
    /// What was being done.
    pub what: &'static str,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Creates the cgroup directory and its parents (idempotent).
pub fn ensure(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(err(path, "create"))
}

/// PIDs in the cgroup itself (not its children).
pub fn procs(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Every PID in the cgroup and its descendants.
pub fn procs_recursive(path: &Path) -> Vec<i32> {
    let mut out = procs(path);
    for child in children(path) {
        out.extend(procs_recursive(&child));
    }
    out
}

fn children(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in the cgroup and its descendants (`cgroup.kill`).
/// Only for cgroups whose processes podnet started. Missing is fine.
pub fn kill(path: &Path) {
    if path.join("cgroup.kill").exists() {
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
    }
}

/// Removes an empty cgroup, retrying `tries` times `pause` apart while its
/// last processes are reaped (blocking). True once it is gone.
pub fn remove_retrying(path: &Path, tries: u32, pause: Duration) -> bool {
    for _ in 0..tries {
        if !path.exists() || std::fs::remove_dir(path).is_ok() {
            return true;
        }
        std::thread::sleep(pause);
    }
    !path.exists()
}

/// Removes the cgroup and its descendants, leaves first. A cgroup that still
/// has processes cannot be removed: the caller stops its own processes first.
/// Missing is fine.
pub async fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    for child in children(path) {
        Box::pin(remove_tree(&child)).await?;
    }
    // A process that just exited may take a moment to leave the cgroup.
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CgroupError {
        path: path.to_path_buf(),
        what: "remove (still has processes?)",
        source: last.unwrap_or_else(|| std::io::Error::other("busy")),
    })
}
