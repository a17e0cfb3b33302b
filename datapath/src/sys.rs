//! The few bpf(2) commands aya 0.14 does not expose for cgroup links:
//! opening a pinned link as a plain fd, reading its info, and
//! `BPF_LINK_UPDATE` (atomic program replacement inside an existing link);
//! and untyped map access by fd, for copying maps of any layout
//! (`upgrade.rs`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// bpf_attr is a union of up to 144 bytes in current kernels; we zero a larger
/// buffer and fill only the fields a command reads.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Self([0; 160])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a zero-initialised buffer larger than the union
    // the kernel reads for these commands; the size passed matches it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = Attr::new();
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the object's info struct into `info`.
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(())
}

/// What a cgroup link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    /// Link id.
    pub id: u32,
    /// Id of the program currently in the link.
    pub prog_id: u32,
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// Cgroup id (the cgroup directory's inode number on cgroup2).
    pub cgroup_id: u64,
    /// `BPF_CGROUP_*` attach type.
    pub attach_type: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned
    // union; for cgroup links { __u64 cgroup_id; __u32 attach_type; }.
    let mut info = [0u8; 64];
    obj_info(fd, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&info[16..24]);
    Ok(CgroupLinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(c),
        attach_type: u32_at(24),
    })
}

/// The interface a TCX link is attached to: `bpf_link_info.tcx.ifindex`
/// (the union's first word); 0 once the interface is gone (a defunct link).
pub fn tcx_link_ifindex(info: &CgroupLinkInfo) -> u32 {
    (info.cgroup_id & 0xffff_ffff) as u32
}

/// `BPF_LINK_UPDATE`: atomically replaces the program in `link` with `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// `BPF_PROG_GET_FD_BY_ID`: an fd of the loaded program `id` (e.g. a
/// link's [`CgroupLinkInfo::prog_id`]; the first three fields of
/// `bpf_link_info` are the same for every link type).
pub fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    // struct { __u32 start_id / prog_id; __u32 next_id; __u32 open_flags; }
    attr.put_u32(0, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (of the last run).
    pub retval: u32,
    /// Mean time of one run, ns (the kernel's own clock around the runs).
    pub duration_ns: u32,
}

/// `BPF_PROG_TEST_RUN`: runs `prog` `repeat` times on a copy of `data` (a
/// frame from its Ethernet header) with context `ctx` (for tc programs a
/// `struct __sk_buff`, of which the kernel reads the fields it allows, e.g.
/// `ifindex` and `ingress_ifindex`; empty: none). Runs in the calling
/// thread's network namespace (interfaces named by `ifindex` are its own).
pub fn prog_test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> io::Result<TestRun> {
    let mut out = vec![0u8; data.len() + 256];
    let mut ctx_out = vec![0u8; ctx.len()];
    let mut attr = Attr::new();
    // struct { __u32 prog_fd, retval, data_size_in, data_size_out;
    //          __aligned_u64 data_in, data_out; __u32 repeat, duration,
    //          ctx_size_in, ctx_size_out; __aligned_u64 ctx_in, ctx_out; … }
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(
        8,
        u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
    );
    attr.put_u32(
        12,
        u32::try_from(out.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
    );
    attr.put_u64(16, data.as_ptr() as u64);
    attr.put_u64(24, out.as_mut_ptr() as u64);
    attr.put_u32(32, repeat);
    if !ctx.is_empty() {
        attr.put_u32(
            40,
            u32::try_from(ctx.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        );
        attr.put_u32(
            44,
            u32::try_from(ctx_out.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        );
        attr.put_u64(48, ctx.as_ptr() as u64);
        attr.put_u64(56, ctx_out.as_mut_ptr() as u64);
    }
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    let u32_at =
        |o: usize| u32::from_ne_bytes([attr.0[o], attr.0[o + 1], attr.0[o + 2], attr.0[o + 3]]);
    Ok(TestRun {
        retval: u32_at(4),
        duration_ns: u32_at(36),
    })
}

/// The cgroup id of a cgroup2 directory (its inode number).
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// The index of network interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with NUL"))?;
    // SAFETY: c is a valid NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

/// `SO_NETNS_COOKIE` (linux/socket.h; not in the libc crate yet).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace (what
/// `bpf_get_netns_cookie` returns for its sockets), read with
/// `getsockopt(SO_NETNS_COOKIE)` on a throwaway socket (kernel ≥ 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket calls on an fd we own and close; `cookie` and
    // `len` outlive the getsockopt call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// The names of the network interfaces of the calling thread's namespace
/// (`if_nameindex`, which asks the kernel over netlink: never /sys, which
/// may show another namespace).
pub fn interface_names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry,
    // freed with if_freenameindex after we copied the names out.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// A netlink socket subscribed to link changes (`RTMGRP_LINK`) of the
/// calling thread's network namespace: wakes the pod interface scan when a
/// pod's interface appears or goes.
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    /// Opens and subscribes.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket calls on an fd we own; `addr` outlives bind.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = libc::RTMGRP_LINK as u32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { fd })
        }
    }

    /// Waits up to `timeout` for link changes; true if there were any (all
    /// pending messages are read and dropped: the caller rescans).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfd is valid for the call; buf outlives each recv.
        unsafe {
            if libc::poll(&mut pfd, 1, ms) <= 0 {
                return false;
            }
            let mut buf = [0u8; 8192];
            let mut any = false;
            loop {
                let n = libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                );
                if n > 0 {
                    any = true;
                    continue;
                }
                // EAGAIN (drained), or ENOBUFS (overrun): either way rescan.
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                    any = true;
                    continue;
                }
                break;
            }
            any
        }
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `BPF_ANY`: create or replace.
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only.
pub const BPF_NOEXIST: u64 = 1;

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a map (the fields the layout
/// upgrade needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawMapInfo {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

/// `BPF_MAP_TYPE_PERCPU_HASH`, `_PERCPU_ARRAY`, `_LRU_PERCPU_HASH`: values
/// read back once per CPU.
pub fn is_per_cpu(map_type: u32) -> bool {
    matches!(map_type, 5 | 6 | 10)
}

/// `BPF_MAP_TYPE_RINGBUF`: no keys, no values.
pub const MAP_TYPE_RINGBUF: u32 = 27;

/// `BPF_OBJ_GET_INFO_BY_FD` on a map.
pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<RawMapInfo> {
    // struct bpf_map_info { __u32 type, id, key_size, value_size, max_entries, ... }
    let mut info = [0u8; 96];
    obj_info(fd, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    Ok(RawMapInfo {
        map_type: u32_at(0),
        key_size: u32_at(8),
        value_size: u32_at(12),
        max_entries: u32_at(16),
    })
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first with None) into
/// `next`; false at the end.
pub fn map_next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut attr = Attr::new();
    // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 next_key; }
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u64(8, key.map_or(0, |k| k.as_ptr() as u64));
    attr.put_u64(16, next.as_mut_ptr() as u64);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_LOOKUP_ELEM` of `key` into `value` (per-CPU maps: one
/// 8-byte-rounded value per possible CPU); false when absent.
pub fn map_lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = Attr::new();
    // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 value; __u64 flags; }
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u64(8, key.as_ptr() as u64);
    attr.put_u64(16, value.as_mut_ptr() as u64);
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `flags` ([`BPF_ANY`], [`BPF_NOEXIST`]).
pub fn map_update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u64(8, key.as_ptr() as u64);
    attr.put_u64(16, value.as_ptr() as u64);
    attr.put_u64(24, flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(())
}

const BPF_OBJ_PIN: libc::c_long = 6;

/// `BPF_OBJ_PIN`: pins the object `fd` (one more pin; the object lives while
/// any pin or fd holds it).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = Attr::new();
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr.put_u64(0, c.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// Gives the allocator's free pages back to the kernel. glibc keeps what a
/// big pass freed (the first pass's plans, a relist's buffers) in its
/// arenas, counted in the agent's RSS until reused; after a full pass that
/// is most of the difference between the RSS and the live heap.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Large blocks from `mmap` at any size from this on (glibc's default
/// starts at 128 KiB but raises itself to the largest block freed, up to
/// 32 MiB): the lists' page buffers and the first pass's plans then go back
/// to the kernel when freed instead of leaving holes in the heap that the
/// stores kept from the same lists pin. At 10,000 Services × 10 endpoints
/// from a real API server: VmRSS 63.8 MiB instead of 65.1 (anonymous 50.7
/// against 52.1), ready ~90 ms later (909 against 817 ms; `netboot-bench
/// coldstart-api`, 5 starts each, this build against one without the
/// call).
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// The agent's malloc: one glibc arena and a fixed mmap threshold
/// ([`MMAP_THRESHOLD`]). Called first thing in
/// `main`, before any thread exists (arenas are taken per thread on its
/// first allocation). glibc gives each thread that contends its own arena,
/// up to 8 per core; the agent decodes its lists on the runtime's worker
/// threads and keeps the result, so their arenas stay fragmented. At
/// 10,000 Services × 10 endpoints from a real API server the agent was
/// ready at the same time with one arena and its RSS was 72 MiB instead of
/// 94–104 (peak 94 instead of 126–134; `netboot-bench coldstart-api`, run
/// with `MALLOC_ARENA_MAX=1` against without). Nothing the agent allocates
/// on is a hot path: per-thread caches (tcache) remain.
///
/// `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` in the environment
/// (glibc's own variables) win over these: an operator can trade memory
/// for time without a rebuild. Measured 2026-12-06 (2-core AMD EPYC VM,
/// 10,000 Services × 10 endpoints from the API, 6 starts each): two arenas
/// took the same CPU time to ready (1,320 against 1,360 ms) for 72 MiB of
/// RSS against 64.
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before
    // other threads exist.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}
