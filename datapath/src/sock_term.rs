//! Connected UDP sockets whose backend disappeared are destroyed, so the
//! application gets ECONNABORTED and reconnects (through the socket LB) to a
//! live backend. Unconnected sockets have no peer and are left alone; TCP
//! needs no help (the backend's RST or timeouts end it).
//!
//! How: `bpf/sock_term.bpf.c` is an `iter/udp` program calling the
//! `bpf_sock_destroy()` kfunc (kernel ≥ 6.5) on each connected UDP socket
//! whose peer is in `nb_sock_term` and that the socket LB sent there (its
//! entry in the agent's pinned `nb_lb4_rev_sk` / `nb_lb6_rev_sk`, which the
//! iterator shares): a socket connected to the pod's address itself, or one
//! another node's socket LB translated, is left alone, as kube-proxy clears
//! only the conntrack entries DNATed from the Service. The agent writes the
//! backends the reconciler just removed into that map and reads the
//! iterator once per network namespace (the udp iterator walks the sockets
//! of the netns it is created in; each run enters the namespace on a thread
//! of its own).
//!
//! aya 0.14 cannot relocate kfunc calls: the program calls a placeholder
//! helper id ([`KFUNC_SOCK_DESTROY_MARKER`]) that [`SockTerm::load`] rewrites
//! into a kfunc call (`BPF_PSEUDO_KFUNC_CALL`, the kfunc's vmlinux BTF id)
//! before the object is loaded. A kernel without the kfunc or the iterator
//! makes [`SockTerm::load`] fail with the reason; the agent reports it in
//! status (`socketTermination`) and goes on without termination.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader};
use aya_obj::btf::BtfKind;
use serde::Serialize;

use crate::layout::{
    names, L4Addr, SockTermKey, SockTermRec, KFUNC_SOCK_DESTROY_MARKER, PROTO_UDP,
};

/// The compiled `bpf/sock_term.bpf.c`.
pub static TERM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_term.bpf.o"));

/// The iterator program's name in the object.
const PROGRAM: &str = "nb_sock_term_udp";
/// `max_entries` of `nb_sock_term`: backends per iterator run.
const BATCH: usize = 4096;

/// Errors of socket termination.
#[derive(Debug, thiserror::Error)]
pub enum SockTermError {
    /// The kernel cannot run the iterator (the reason is the status line).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A map or iterator operation failed while running.
    #[error("{op}: {reason}")]
    Run {
        /// Operation.
        op: &'static str,
        /// Cause.
        reason: String,
    },
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SockTermError {
    SockTermError::Unavailable(format!("{what}: {e}"))
}

fn run_err(op: &'static str, e: impl std::fmt::Display) -> SockTermError {
    SockTermError::Run {
        op,
        reason: e.to_string(),
    }
}

/// One destroyed socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destroyed {
    /// The socket's peer (a removed backend).
    pub peer: std::net::SocketAddr,
    /// The frontend the socket asked for (its reverse entry).
    pub frontend: std::net::SocketAddr,
    /// `AF_INET` (2) or `AF_INET6` (10): the socket's family.
    pub family: u16,
    /// `bpf_sock_destroy()` result: 0 or -errno.
    pub result: i32,
    /// The socket's cookie.
    pub cookie: u64,
    /// The socket's cgroup v2 id (its owner, the client pod).
    pub cgroup_id: u64,
    /// Cookie of the network namespace it lived in (0: unknown).
    pub netns_cookie: u64,
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TermReport {
    /// Removed UDP backends looked for.
    pub backends: usize,
    /// Network namespaces walked.
    pub netns: usize,
    /// Namespaces that could not be entered or iterated (path: reason).
    pub failed_netns: Vec<String>,
    /// Sockets destroyed.
    pub destroyed: Vec<Destroyed>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// The loaded iterator program and its map.
pub struct SockTerm {
    ebpf: Ebpf,
}

impl std::fmt::Debug for SockTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockTerm").finish_non_exhaustive()
    }
}

/// Rewrites every `call MARKER` (helper call, imm = marker) in `obj` into a
/// kfunc call to BTF id `btf_id`; returns how many were rewritten.
fn patch_kfunc_calls(obj: &mut [u8], marker: i32, btf_id: u32) -> usize {
    // BPF_JMP | BPF_CALL, dst 0 src 0, off 0, imm = marker (little endian).
    let mut from = [0x85u8, 0, 0, 0, 0, 0, 0, 0];
    from[4..].copy_from_slice(&marker.to_le_bytes());
    // src_reg = BPF_PSEUDO_KFUNC_CALL (2), off 0 = vmlinux BTF.
    let mut to = [0x85u8, 0x20, 0, 0, 0, 0, 0, 0];
    to[4..].copy_from_slice(&btf_id.to_le_bytes());
    let mut n = 0;
    let mut i = 0;
    while i + 8 <= obj.len() {
        if obj[i..i + 8] == from {
            obj[i..i + 8].copy_from_slice(&to);
            n += 1;
            i += 8;
        } else {
            i += 1;
        }
    }
    n
}

impl SockTerm {
    /// Loads the iterator, sharing the socket LB's reverse entries pinned
    /// under `pins`: fails with [`SockTermError::Unavailable`] and the
    /// reason when they are not pinned, or the kernel lacks BTF, the
    /// `bpf_sock_destroy` kfunc or the udp iterator.
    pub fn load(pins: &crate::pins::Pins) -> Result<Self, SockTermError> {
        let mut loader = EbpfLoader::new();
        for name in [names::REV_SK, names::REV_SK6] {
            let pin = pins.map(name);
            // aya would create and pin a missing map: never here.
            if !pin.exists() {
                return Err(SockTermError::Unavailable(format!(
                    "{} is not pinned (the socket LB is not installed there)",
                    pin.display()
                )));
            }
            loader.map_pin_path(name, pin);
        }
        let btf = Btf::from_sys_fs().map_err(|e| unavailable("kernel BTF", e))?;
        let kfunc = btf
            .id_by_type_name_kind("bpf_sock_destroy", BtfKind::Func)
            .map_err(|_| {
                SockTermError::Unavailable(
                    "kernel has no bpf_sock_destroy kfunc (needs Linux >= 6.5)".into(),
                )
            })?;
        btf.id_by_type_name_kind("bpf_iter_udp", BtfKind::Func)
            .map_err(|_| SockTermError::Unavailable("kernel has no udp BPF iterator".into()))?;
        // An 8-byte aligned copy (the ELF parser wants aligned input).
        let mut words = vec![0u64; TERM_OBJECT.len().div_ceil(8)];
        // SAFETY: `words` owns len*8 initialised bytes; u8 has no alignment
        // or validity requirements; the slice does not outlive `words`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
        };
        bytes[..TERM_OBJECT.len()].copy_from_slice(TERM_OBJECT);
        let obj = &mut bytes[..TERM_OBJECT.len()];
        if patch_kfunc_calls(obj, KFUNC_SOCK_DESTROY_MARKER, kfunc) == 0 {
            return Err(SockTermError::Unavailable(
                "sock_term.bpf.o has no bpf_sock_destroy call to patch".into(),
            ));
        }
        let mut ebpf = loader
            .btf(Some(&btf))
            .load(obj)
            .map_err(|e| unavailable("load sock_term.bpf.o", e))?;
        let prog: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| SockTermError::Unavailable(format!("{PROGRAM} missing")))?
            .try_into()
            .map_err(|e| unavailable("iter/udp program", e))?;
        prog.load("udp", &btf)
            .map_err(|e| unavailable("load iter/udp with bpf_sock_destroy", e))?;
        Ok(Self { ebpf })
    }

    fn map(&mut self) -> Result<HashMap<&mut MapData, SockTermKey, u32>, SockTermError> {
        let map = self
            .ebpf
            .map_mut(names::SOCK_TERM)
            .ok_or_else(|| run_err("open nb_sock_term", "missing"))?;
        HashMap::try_from(map).map_err(|e| run_err("open nb_sock_term", e))
    }

    /// Destroys the connected UDP sockets, in each of `netns` (paths of
    /// network namespace files; empty: the caller's own), whose peer is one
    /// of `removed` (non-UDP backends are skipped).
    pub fn destroy(
        &mut self,
        removed: &[L4Addr],
        netns: &[PathBuf],
    ) -> Result<TermReport, SockTermError> {
        let start = Instant::now();
        let keys: BTreeSet<SockTermKey> = removed
            .iter()
            .filter(|b| b.proto == PROTO_UDP)
            .map(|b| SockTermKey::new(*b))
            .collect();
        let mut report = TermReport {
            backends: keys.len(),
            ..Default::default()
        };
        if keys.is_empty() {
            return Ok(report);
        }
        let keys: Vec<SockTermKey> = keys.into_iter().collect();
        for chunk in keys.chunks(BATCH) {
            {
                let mut map = self.map()?;
                for k in chunk {
                    map.insert(k, 0, 0)
                        .map_err(|e| run_err("update nb_sock_term", e))?;
                }
            }
            let r = self.run_all(netns, &mut report);
            let mut map = self.map()?;
            for k in chunk {
                let _ = map.remove(k);
            }
            r?;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    fn run_all(&mut self, netns: &[PathBuf], report: &mut TermReport) -> Result<(), SockTermError> {
        let own = [None];
        let targets: Vec<Option<&Path>> = if netns.is_empty() {
            own.to_vec()
        } else {
            netns.iter().map(|p| Some(p.as_path())).collect()
        };
        for ns in targets {
            let prog: &mut Iter = self
                .ebpf
                .program_mut(PROGRAM)
                .ok_or_else(|| run_err("iterator", "missing"))?
                .try_into()
                .map_err(|e| run_err("iterator", e))?;
            let id = prog.attach().map_err(|e| run_err("attach iterator", e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| run_err("attach iterator", e))?;
            report.netns += 1;
            // The iterator walks the netns of the thread that creates it.
            let out = std::thread::scope(|s| {
                let worker = std::thread::Builder::new().spawn_scoped(
                    s,
                    move || -> Result<(Vec<u8>, u64), String> {
                        if let Some(path) = ns {
                            enter_netns(path)?;
                        }
                        let mut f = link.into_file().map_err(|e| e.to_string())?;
                        let mut buf = Vec::new();
                        f.read_to_end(&mut buf).map_err(|e| e.to_string())?;
                        // Names the namespace in the flow events (0: unknown).
                        let cookie = if buf.is_empty() {
                            0
                        } else {
                            crate::sys::netns_cookie().unwrap_or(0)
                        };
                        Ok((buf, cookie))
                    },
                );
                match worker {
                    Ok(h) => h.join(),
                    Err(e) => Ok(Err(format!("starting its thread: {e}"))),
                }
            });
            let (out, netns_cookie) = match out {
                Ok(Ok(buf)) => buf,
                Ok(Err(e)) => {
                    let name = ns.map_or("own netns".into(), |p| p.display().to_string());
                    report.failed_netns.push(format!("{name}: {e}"));
                    continue;
                }
                Err(_) => return Err(run_err("iterator thread", "panicked")),
            };
            for rec in out.chunks_exact(std::mem::size_of::<SockTermRec>()) {
                let mut r = SockTermRec::default();
                // SAFETY: SockTermRec is repr(C) plain integers (aya::Pod);
                // `rec` has exactly size_of::<SockTermRec>() bytes and the
                // destination is a valid, exclusively borrowed value.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        rec.as_ptr(),
                        std::ptr::from_mut(&mut r).cast::<u8>(),
                        rec.len(),
                    );
                }
                let (ip, port) = r.peer();
                let (fip, fport) = r.frontend();
                report.destroyed.push(Destroyed {
                    peer: std::net::SocketAddr::new(ip, port),
                    frontend: std::net::SocketAddr::new(fip, fport),
                    family: r.family,
                    result: r.result,
                    cookie: r.cookie,
                    cgroup_id: r.cgroup_id,
                    netns_cookie,
                });
            }
        }
        Ok(())
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: setns on a valid open namespace fd; it affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "{}: setns: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Every network namespace on the node the agent can see: its own, those of
/// every process in /proc (pods) and the ones pinned under /run/netns (CNI),
/// one path per namespace.
pub fn all_netns() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p) {
            if seen.insert((m.dev(), m.ino())) {
                out.push(p);
            }
        }
    };
    add(PathBuf::from("/proc/self/ns/net"));
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            add(e.path());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_call_becomes_a_kfunc_call() {
        // Why: aya 0.14 cannot relocate kfunc calls; a wrong patch would load a helper call.
        let mut obj = vec![0xaa, 0x85, 0, 0, 0, 0xd0, 0x57, 0x7e, 0, 0xbb];
        assert_eq!(
            patch_kfunc_calls(&mut obj, KFUNC_SOCK_DESTROY_MARKER, 0x1234),
            1
        );
        assert_eq!(obj, vec![0xaa, 0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0, 0xbb]);
        assert_eq!(
            patch_kfunc_calls(&mut obj, KFUNC_SOCK_DESTROY_MARKER, 0x1234),
            0
        );
    }

    #[test]
    fn the_object_calls_the_marker() {
        let mut obj = TERM_OBJECT.to_vec();
        assert_eq!(patch_kfunc_calls(&mut obj, KFUNC_SOCK_DESTROY_MARKER, 7), 1);
    }
}
