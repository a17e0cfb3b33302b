//! Everything the bench creates is registered here and removed on exit: by
//! the Drop guards on a normal return or an error, by the signal thread on
//! SIGINT/SIGTERM/SIGHUP, and by [`sweep_stale`] for what an earlier run that
//! was SIGKILLed left behind.
//!
//! The bench owns exactly these names and nothing else: network namespaces
//! `nbb-<pid>-…`, cgroups `/sys/fs/cgroup/unified/nbb-<pid>/…`, pins
//! `/sys/fs/bpf/nbb-<pid>/…`, and the child processes it spawned (by pid,
//! or, for a child started as the leader of a process group of its own, by
//! that group: whatever the child started in turn, such as the agent behind
//! a profiler's wrapper script, goes with it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netboot_harness::netns::Scoped;

/// Prefix of every namespace, cgroup and pin directory the bench creates.
pub const PREFIX: &str = "nbb-";
/// cgroup2 mount.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
/// bpffs mount.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct Registry {
    netns: BTreeSet<String>,
    /// Deepest first when removed (sorted by reverse path length).
    cgroups: BTreeSet<PathBuf>,
    pins: BTreeSet<PathBuf>,
    /// Pid → whether it leads a process group of its own.
    pids: BTreeMap<u32, bool>,
    tmpdirs: BTreeSet<PathBuf>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with_registry(f: impl FnOnce(&mut Registry)) {
    if let Ok(mut g) = REGISTRY.lock() {
        f(g.get_or_insert_with(Registry::default));
    }
}

/// True once a signal asked the bench to stop.
pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Fails when a signal asked the bench to stop (checked before creating things).
pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// `nbb-<pid>`: the tag of this run.
pub fn run_tag() -> String {
    format!("{PREFIX}{}", std::process::id())
}

/// Handles SIGINT, SIGTERM and SIGHUP on a dedicated thread: kills the
/// children this run spawned, removes every registered pin, cgroup and
/// namespace, and exits (128 + signal).
pub fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("nbb-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOP.store(true, Ordering::Relaxed);
                eprintln!("\nnetboot-bench: signal {sig}: removing everything this run created");
                cleanup_all();
                std::process::exit(128 + sig);
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// Removes everything still registered (signal path; Drop guards do the same
/// piece by piece on the normal path).
pub fn cleanup_all() {
    let reg = REGISTRY
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .unwrap_or_default();
    for (pid, group) in &reg.pids {
        kill_child(*pid, *group, libc::SIGKILL);
    }
    for root in &reg.pins {
        remove_pins(root);
    }
    let mut cgs: Vec<&PathBuf> = reg.cgroups.iter().collect();
    cgs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for cg in cgs {
        remove_cgroup(cg);
    }
    for d in &reg.tmpdirs {
        let _ = std::fs::remove_dir_all(d);
    }
    for ns in &reg.netns {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// kill(2) on a child this run spawned, by its pid, or when `group`, on the
/// process group it leads (created for it: [`ChildGuard::new`]). Never a
/// pattern, never a group this run did not create.
fn kill_child(pid: u32, group: bool, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            let target = if group { -p } else { p };
            // SAFETY: kill(2) on a child we spawned or the group it leads; no memory is touched.
            unsafe {
                libc::kill(target, sig);
            }
        }
    }
}

/// Whether `pid` leads its own process group (`Command::process_group(0)`).
fn leads_group(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: getpgid(2) reads no memory of ours.
    p > 0 && unsafe { libc::getpgid(p) } == p
}

fn remove_pins(root: &Path) {
    let pins = netboot_datapath::pins::Pins::new(root);
    let _ = pins.remove_all();
    let _ = std::fs::remove_dir(root);
    if let Some(parent) = root.parent() {
        if parent
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(PREFIX))
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn remove_cgroup(path: &Path) {
    if !netboot_harness::cgroup::remove_retrying(path, 100, Duration::from_millis(20)) {
        eprintln!("netboot-bench: could not remove cgroup {}", path.display());
    }
}

fn assert_ours(name: &str) -> Result<()> {
    if !name.starts_with(PREFIX) {
        bail!("refusing to touch {name}: not created by the bench (prefix {PREFIX})");
    }
    Ok(())
}

/// A network namespace `nbb-…` (harness's [`Scoped`], registered for the
/// signal-time cleanup), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Name under /run/netns.
    pub name: String,
    /// Taken on drop, before the registry forgets the name.
    inner: Option<Scoped>,
}

impl Netns {
    /// Creates the namespace (deleting a leftover of the same name first) with `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        check_stop()?;
        assert_ours(name)?;
        with_registry(|r| {
            r.netns.insert(name.to_string());
        });
        Ok(Self {
            name: name.to_string(),
            inner: Some(Scoped::create(name)?),
        })
    }

    /// `ip -n NAME ARGS…`: every `ip` change the bench makes goes through here.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        Ok(self.scoped()?.ip(args)?)
    }

    /// A veth pair, `local` here and `peer` moved straight into `other`.
    pub fn veth_to(&self, local: &str, other: &Netns, peer: &str) -> Result<()> {
        Ok(self.scoped()?.veth_to(local, other.scoped()?, peer)?)
    }

    /// /run/netns/NAME.
    pub fn path(&self) -> PathBuf {
        netboot_harness::names::netns_path(&self.name)
    }

    fn scoped(&self) -> Result<&Scoped> {
        self.inner.as_ref().context("namespace already removed")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.inner.take());
        with_registry(|r| {
            r.netns.remove(&self.name);
        });
    }
}

/// A cgroup under `/sys/fs/cgroup/unified/nbb-<pid>/`, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Directory.
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `CGROUP_ROOT/<rel>`; every component must carry the prefix
    /// at the top (`nbb-<pid>/x`).
    pub fn new(rel: &str) -> Result<Self> {
        check_stop()?;
        assert_ours(rel)?;
        let path = Path::new(CGROUP_ROOT).join(rel);
        if let Some(parent) = path.parent() {
            if parent != Path::new(CGROUP_ROOT) && !parent.exists() {
                with_registry(|r| {
                    r.cgroups.insert(parent.to_path_buf());
                });
                std::fs::create_dir(parent)
                    .with_context(|| format!("creating cgroup {}", parent.display()))?;
            }
        }
        with_registry(|r| {
            r.cgroups.insert(path.clone());
        });
        if !path.exists() {
            std::fs::create_dir(&path)
                .with_context(|| format!("creating cgroup {}", path.display()))?;
        }
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
        with_registry(|r| {
            r.cgroups.remove(&self.path);
        });
        // The run's parent cgroup goes with its last child.
        if let Some(parent) = self.path.parent() {
            if parent != Path::new(CGROUP_ROOT) && std::fs::remove_dir(parent).is_ok() {
                with_registry(|r| {
                    r.cgroups.remove(parent);
                });
            }
        }
    }
}

/// A pin root `/sys/fs/bpf/nbb-<pid>/<tag>`, removed on drop (removing the
/// link pins detaches the programs).
pub struct PinRoot {
    /// The datapath's pin layout under this root.
    pub pins: netboot_datapath::pins::Pins,
}

impl PinRoot {
    /// `BPFFS_ROOT/<rel>` (emptied first if a leftover exists).
    pub fn new(rel: &str) -> Result<Self> {
        check_stop()?;
        assert_ours(rel)?;
        let root = Path::new(BPFFS_ROOT).join(rel);
        with_registry(|r| {
            r.pins.insert(root.clone());
        });
        let pins = netboot_datapath::pins::Pins::new(root);
        let _ = pins.remove_all();
        Ok(Self { pins })
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let root = self.pins.root().to_path_buf();
        remove_pins(&root);
        with_registry(|r| {
            r.pins.remove(&root);
        });
    }
}

/// A child process of the bench: registered by pid, killed and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
    pid: u32,
    /// It leads a process group of its own: stopped as that group.
    group: bool,
}

impl ChildGuard {
    /// Takes ownership of a spawned child. One spawned with
    /// `Command::process_group(0)` (the agents: [`crate::agent_run::agent_command`])
    /// is stopped with its group, so what it started stops too; it set its
    /// group before exec, so before `spawn` returned.
    pub fn new(child: Child) -> Self {
        let pid = child.id();
        let group = leads_group(pid);
        with_registry(|r| {
            r.pids.insert(pid, group);
        });
        Self {
            child: Some(child),
            pid,
            group,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child, for its pipes.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits for a normal exit (the child is deregistered).
    pub fn wait(mut self) -> Result<std::process::Output> {
        let child = self.child.take().context("child already reaped")?;
        let out = child.wait_with_output().context("waiting for a child")?;
        with_registry(|r| {
            r.pids.remove(&self.pid);
        });
        Ok(out)
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the child.
    pub fn stop(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            kill_child(self.pid, self.group, libc::SIGTERM);
            let until = std::time::Instant::now() + grace;
            while std::time::Instant::now() < until {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_and_reap();
    }

    /// SIGKILL to the child (and its group), reaped and deregistered.
    fn kill_and_reap(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if self.group {
                // The group outlives its leader: what the child started (its
                // leader reaped or not, the group id stays ours until the
                // last member has gone).
                kill_child(self.pid, true, libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
        with_registry(|r| {
            r.pids.remove(&self.pid);
        });
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A temporary directory `nbb-<pid>-…` (rule files, agent files), removed
/// on drop and by the signal path.
pub struct TmpDir {
    dir: tempfile::TempDir,
}

impl TmpDir {
    /// Creates `$TMPDIR/<tag>-XXXXXX`.
    pub fn new(tag: &str) -> Result<Self> {
        check_stop()?;
        assert_ours(tag)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir()
            .context("creating a temp dir")?;
        with_registry(|r| {
            r.tmpdirs.insert(dir.path().to_path_buf());
        });
        Ok(Self { dir })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let p = self.dir.path().to_path_buf();
        with_registry(|r| {
            r.tmpdirs.remove(&p);
        });
    }
}

/// The pid in `nbb-<pid>…`, if the name has one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// True when `pid` is a live netboot-bench process.
fn bench_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "netboot-bench")
        .unwrap_or(false)
}

/// Removes what an earlier run left when it was SIGKILLed (its namespaces,
/// pins and empty cgroups, recognised by the `nbb-<pid>` prefix of a pid
/// that no longer runs the bench). Processes are never touched.
pub fn sweep_stale() {
    let stale = |name: &str| owner_pid(name).is_some_and(|p| !bench_alive(p));
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if stale(name) {
                eprintln!("netboot-bench: removing leftover netns {name}");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(BPFFS_ROOT) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if stale(&name) {
                eprintln!(
                    "netboot-bench: removing leftover pins {}",
                    e.path().display()
                );
                if let Ok(inner) = std::fs::read_dir(e.path()) {
                    for i in inner.flatten() {
                        remove_pins(&i.path());
                    }
                }
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if stale(&name) && e.path().is_dir() {
                eprintln!("netboot-bench: removing leftover {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(CGROUP_ROOT) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if stale(&name) && e.path().is_dir() {
                if let Ok(inner) = std::fs::read_dir(e.path()) {
                    for i in inner.flatten() {
                        if i.path().is_dir() {
                            let _ = std::fs::remove_dir(i.path());
                        }
                    }
                }
                if std::fs::remove_dir(e.path()).is_ok() {
                    eprintln!(
                        "netboot-bench: removed leftover cgroup {}",
                        e.path().display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    /// A shell that starts `sleep` in the background and prints its pid:
    /// (the shell's guard, the sleep's pid).
    fn shell_with_a_child(group: bool) -> (ChildGuard, u32) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped());
        if group {
            cmd.process_group(0);
        }
        let mut guard = ChildGuard::new(cmd.spawn().unwrap());
        let out = guard.child_mut().unwrap().stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        (guard, line.trim().parse().unwrap())
    }

    /// Whether `pid` still runs (a zombie does not).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    fn gone_within(pid: u32, d: Duration) -> bool {
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            if !running(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        !running(pid)
    }

    #[test]
    fn a_child_leading_its_own_group_is_stopped_with_what_it_started() {
        // Why: an agent profiled behind a wrapper script kept running after
        // the bench had stopped the wrapper (by its pid) and removed its pins.
        let (mut guard, sleep) = shell_with_a_child(true);
        assert!(guard.group);
        assert!(running(sleep));
        guard.stop(Duration::from_millis(200));
        assert!(
            gone_within(sleep, Duration::from_secs(5)),
            "sleep {sleep} outlived its group"
        );

        // Dropped without a stop: the same.
        let (guard, sleep) = shell_with_a_child(true);
        drop(guard);
        assert!(
            gone_within(sleep, Duration::from_secs(5)),
            "sleep {sleep} outlived its group"
        );
    }

    #[test]
    fn a_child_in_the_benchs_group_is_stopped_by_its_pid_alone() {
        // The control: only the leader of its own group is stopped as one
        // (never the bench's own group).
        let (mut guard, sleep) = shell_with_a_child(false);
        assert!(!guard.group);
        guard.stop(Duration::from_millis(200));
        assert!(
            !gone_within(sleep, Duration::from_millis(300)),
            "a pid kill reached the grandchild"
        );
        // Ours (started by our child): stopped by its pid.
        kill_child(sleep, false, libc::SIGKILL);
        assert!(gone_within(sleep, Duration::from_secs(5)));
    }

    #[test]
    fn owner_pid_parses_only_bench_names() {
        assert_eq!(owner_pid("nbb-1234-1000-be"), Some(1234));
        assert_eq!(owner_pid("nbb-77"), Some(77));
        assert_eq!(owner_pid("nbt-dp-1-c"), None);
        assert_eq!(owner_pid("nbb-x"), None);
    }

    #[test]
    fn foreign_names_are_refused() {
        assert!(assert_ours("nbb-1-x").is_ok());
        assert!(assert_ours("kube-proxy").is_err());
    }
}
