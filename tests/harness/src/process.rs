//! Starting processes inside a pod's (or node's) netns and cgroup.
//!
//! The child first joins the cgroup (writes `0` to `cgroup.procs`), then runs
//! `ip netns exec NETNS PROGRAM ARGS…`, which enters the netns, remounts /sys
//! and bind-mounts `/etc/netns/NETNS/*` (the pod's resolv.conf) before exec.
//! Joining the cgroup first matters: cgroup BPF programs (the datapath's socket
//! LB) apply to the cgroup, whatever the netns.
//!
//! [`Confine`] is the one place (for podnet, the datapath's kernel tests and
//! the bench) where a child joins a cgroup and a netns and gives up
//! capabilities between fork and exec.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
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
    /// Capabilities the program keeps (a [`crate::caps::CapSet`]); `None` =
    /// podnet's own. With `netns`, the netns is then entered by setns(2)
    /// before the capabilities go (no `ip netns exec`: it needs
    /// CAP_SYS_ADMIN, remounts /sys and bind-mounts /etc/netns files).
    pub caps: Option<crate::caps::CapSet>,
}

/// What a child does between fork and exec, in this order: asks for SIGTERM
/// when its parent dies, joins a cgroup v2 directory, enters a network
/// namespace (setns(2), without `ip netns exec`'s /sys remount and
/// /etc/netns bind mounts), and keeps only the given capabilities (the
/// others leave the bounding set, ambient and inheritable are cleared, so
/// a root program execs with exactly these in its permitted and effective
/// sets).
#[derive(Debug, Clone, Default)]
pub struct Confine {
    /// SIGTERM when the parent dies (PR_SET_PDEATHSIG).
    pub parent_death: bool,
    /// cgroup v2 directory to join.
    pub cgroup: Option<PathBuf>,
    /// Network namespace file to enter (e.g. /run/netns/NAME).
    pub netns: Option<PathBuf>,
    /// Capabilities to keep.
    pub caps: Option<crate::caps::CapSet>,
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`, two of them for version 3.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

impl Confine {
    /// Installs the child's steps on `cmd`. Files are opened here, before the
    /// fork; the child only makes syscalls.
    pub fn apply(&self, cmd: &mut std::process::Command) -> std::io::Result<()> {
        let procs = match &self.cgroup {
            Some(cg) => Some(
                CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let netns = match &self.netns {
            Some(p) => Some(File::open(p).map_err(|e| {
                std::io::Error::new(e.kind(), format!("open {}: {e}", p.display()))
            })?),
            None => None,
        };
        let parent_death = self.parent_death;
        let keep = self.caps.map(|c| c.0);
        // SAFETY: only async-signal-safe syscalls (prctl, open, write, close,
        // setns, capget, capset) on memory prepared before the fork; the
        // netns file is owned by the closure, so its fd is open in the child.
        unsafe {
            cmd.pre_exec(move || {
                let last_err = || Err(std::io::Error::last_os_error());
                if parent_death && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return last_err();
                }
                if let Some(path) = &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return last_err();
                    }
                    let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if rc != 1 {
                        return Err(err);
                    }
                }
                if let Some(f) = &netns {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return last_err();
                    }
                }
                if let Some(keep) = keep {
                    for cap in 0..64u64 {
                        // Past the kernel's last capability PR_CAPBSET_READ fails.
                        if keep & (1 << cap) == 0
                            && libc::prctl(libc::PR_CAPBSET_READ, cap) == 1
                            && libc::prctl(libc::PR_CAPBSET_DROP, cap) != 0
                        {
                            return last_err();
                        }
                    }
                    if libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL,
                        0,
                        0,
                        0,
                    ) != 0
                    {
                        return last_err();
                    }
                    let mut hdr = CapHeader {
                        version: CAP_VERSION_3,
                        pid: 0,
                    };
                    let mut data = [CapData::default(); 2];
                    if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) != 0 {
                        return last_err();
                    }
                    data[0].inheritable = 0;
                    data[1].inheritable = 0;
                    if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                        return last_err();
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Launch {
    /// A std Command that starts this launch when spawned.
    pub fn command(&self) -> std::io::Result<std::process::Command> {
        let setns = self.caps.is_some();
        let mut cmd = match &self.netns {
            Some(ns) if !setns => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            _ => std::process::Command::new(&self.program),
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
        if self.supervised {
            cmd.process_group(0);
        }
        Confine {
            parent_death: self.supervised,
            cgroup: self.cgroup.clone(),
            netns: self
                .netns
                .as_deref()
                .filter(|_| setns)
                .map(crate::names::netns_path),
            caps: self.caps,
        }
        .apply(&mut cmd)?;
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
