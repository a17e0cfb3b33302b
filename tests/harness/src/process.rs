//! Starting processes inside a pod's (or node's) netns and cgroup.
//!
//! The child first joins the cgroup (writes `0` to `cgroup.procs`), then runs
//! `ip netns exec NETNS PROGRAM ARGS…`, which enters the netns, remounts /sys
//! and bind-mounts `/etc/netns/NETNS/*` (the pod's resolv.conf) before exec.
//! Joining the cgroup first matters: cgroup BPF programs (the datapath's socket
//! LB) apply to the cgroup, whatever the netns.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

/// PATH given to every process podnet starts (plus the bin dir in front).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start and where.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Program path (or a name found on PATH).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment (the child starts from an empty environment plus PATH).
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (`None` = podnet's own, the root netns).
    pub netns: Option<String>,
    /// cgroup v2 directory to run in (`None` = podnet's own).
    pub cgroup: Option<PathBuf>,
    /// File that gets stdout and stderr (appended); `None` = inherit.
    pub log: Option<PathBuf>,
    /// Send the child SIGTERM when podnet dies, and put it in its own process group.
    pub supervised: bool,
}

impl Launch {
    /// A std Command that starts this launch when spawned.
    pub fn command(&self) -> std::io::Result<std::process::Command> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => std::process::Command::new(&self.program),
        };
        cmd.args(&self.args).env_clear().env("PATH", DEFAULT_PATH);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        if let Some(log) = &self.log {
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new().create(true).append(true).open(log)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        let procs = match &self.cgroup {
            Some(cg) => Some(
                CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let supervised = self.supervised;
        if supervised {
            cmd.process_group(0);
        }
        // SAFETY: only async-signal-safe calls (prctl, open, write, close) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if supervised && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(path) = &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if rc != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Spawns the launch as a tokio child.
    pub fn spawn(&self) -> std::io::Result<tokio::process::Child> {
        let cmd = self.command()?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        cmd.spawn()
    }

    /// The command line, for logs.
    pub fn display(&self) -> String {
        let mut parts = vec![self.program.display().to_string()];
        parts.extend(self.args.iter().cloned());
        let line = parts.join(" ").replace('\n', " ");
        match line.char_indices().nth(160) {
            Some((i, _)) => format!("{}…", &line[..i]),
            None => line,
        }
    }
}

/// Sends `signal` to a process group (as set up by `supervised`), or to the
/// process if the group is gone.
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: plain kill(2) on a pid this process started.
    unsafe {
        if libc::kill(-pid, signal) != 0 {
            libc::kill(pid, signal);
        }
    }
}
