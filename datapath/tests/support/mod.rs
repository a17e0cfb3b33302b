//! Privileged test support: network namespaces, a cgroup and a pin root that
//! the test creates and removes (Drop guards, pass or fail), backend servers
//! running as threads inside a namespace, and clients running as child
//! processes (this test binary re-executed) inside the cgroup and namespace.
//!
//! Network safety: every address lives inside namespaces created here, joined
//! by a veth pair whose both ends are in test namespaces; no namespace has a
//! default route; nothing is added to the root namespace.
//!
//! The plumbing itself (netns, cgroup, joining them from a child, HTTP
//! polling) is netboot-harness's; this file keeps what is the datapath's.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netboot_harness::{cgroup, netns, process::Confine};
use serde::{Deserialize, Serialize};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
pub const HELPER_ENV: &str = "NBT_DP_HELPER";

/// Panics (never skips) when the test cannot run for real.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged datapath test: must run as root (euid is {euid})"
    );
    assert!(
        Path::new(CGROUP_ROOT).join("cgroup.procs").exists(),
        "privileged datapath test: cgroup2 not mounted at {CGROUP_ROOT}"
    );
    assert!(
        netboot_datapath::pins::is_bpffs(Path::new("/sys/fs/bpf")),
        "privileged datapath test: bpffs not mounted at /sys/fs/bpf"
    );
    let ok = Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "privileged datapath test: `ip` (iproute2) is required");
}

/// A network namespace `nbt-dp-…` (`nbcl-…` for the node rules cleanup
/// tests), deleted on drop (harness's [`netns::Scoped`], panicking).
pub struct Netns {
    pub name: String,
    inner: netns::Scoped,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        assert!(
            name.starts_with("nbt-dp-")
                || name.starts_with("nbcl-")
                || name.starts_with("nbag-")
                || name.starts_with("nbv6-")
                || name.starts_with("nbns-")
                || name.starts_with("nbt-ipvs-"),
            "test netns must be prefixed nbt-dp-, nbcl-, nbag-, nbv6-, nbns- or nbt-ipvs-: {name}"
        );
        let inner = netns::Scoped::create(name).unwrap_or_else(|e| panic!("{e}"));
        Self {
            name: name.to_string(),
            inner,
        }
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) {
        self.inner.ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A veth pair, `local` here and `peer` in `other`.
    pub fn veth_to(&self, local: &str, other: &Netns, peer: &str) {
        self.inner
            .veth_to(local, &other.inner, peer)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs a command inside the namespace (`ip netns exec`), returning output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {cmd}: {e}"))
    }

    pub fn path(&self) -> PathBuf {
        self.inner.path()
    }
}

/// A cgroup under `/sys/fs/cgroup/unified/netboot-test/`, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let parent = Path::new(CGROUP_ROOT).join("netboot-test");
        let _ = std::fs::create_dir(&parent);
        let path = parent.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children have exited (ChildGuard); retry briefly while the kernel reaps them.
        cgroup::remove_retrying(&self.path, 50, Duration::from_millis(20));
        let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join("netboot-test"));
    }
}

/// A pin root under `/sys/fs/bpf/netboot-test/`, removed on drop (which
/// detaches the programs: links are unpinned first).
pub struct TestPins {
    pub pins: netboot_datapath::pins::Pins,
}

impl TestPins {
    pub fn new(tag: &str) -> Self {
        let root =
            PathBuf::from("/sys/fs/bpf/netboot-test").join(format!("{tag}-{}", std::process::id()));
        let pins = netboot_datapath::pins::Pins::new(root);
        let _ = pins.remove_all();
        Self { pins }
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = self.pins.remove_all();
        let _ = std::fs::remove_dir("/sys/fs/bpf/netboot-test");
    }
}

/// Client netns + server netns joined by a veth pair.
/// Client: 10.244.0.100/16 and fd00:244::100/64. Server: 10.244.1.1..=N/16
/// and fd00:244::1:1..=N/64 (the backends). No default route either side.
pub struct Topology {
    pub client: Netns,
    pub server: Netns,
}

impl Topology {
    pub fn new(tag: &str, backends: u8) -> Self {
        let base =
            if tag.starts_with("nbag-") || tag.starts_with("nbv6-") || tag.starts_with("nbns-") {
                tag.to_string()
            } else {
                format!("nbt-dp-{tag}")
            };
        let client = Netns::new(&format!("{base}-c"));
        let server = Netns::new(&format!("{base}-s"));
        client.veth_to("veth0", &server, "veth1");
        client.ip(&["addr", "add", "10.244.0.100/16", "dev", "veth0"]);
        client.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:244::100/64",
            "dev",
            "veth0",
            "nodad",
        ]);
        client.ip(&["link", "set", "veth0", "up"]);
        for i in 1..=backends {
            server.ip(&["addr", "add", &format!("10.244.1.{i}/16"), "dev", "veth1"]);
            server.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", backend_ip6(i)),
                "dev",
                "veth1",
                "nodad",
            ]);
        }
        server.ip(&["link", "set", "veth1", "up"]);
        Self { client, server }
    }
}

pub fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, i)
}

/// The IPv6 address of backend `i` (ULA, inside the test namespaces only).
pub fn backend_ip6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 1, u16::from(i))
}

/// CLOCK_MONOTONIC in ns: comparable across processes of this machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Enters the network namespace at `path` on the calling thread.
fn setns_thread(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    netns::enter_thread(&f).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

/// TCP and UDP servers answering with their name, as threads in a namespace.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// One TCP and one UDP server per `(name, ip, port)`.
    pub fn start(ns: &Netns, backends: &[(&str, Ipv4Addr, u16)]) -> Self {
        let any: Vec<(&str, IpAddr, u16)> = backends
            .iter()
            .map(|(n, ip, p)| (*n, IpAddr::V4(*ip), *p))
            .collect();
        Self::start_any(ns, &any)
    }

    /// As [`Servers::start`], IPv4 or IPv6.
    pub fn start_any(ns: &Netns, backends: &[(&str, IpAddr, u16)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (name, ip, port) in backends {
            let (name, ip, port) = (name.to_string(), *ip, *port);
            let path = ns.path();
            let stop2 = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let (path2, stop3, name2, tx2) = (path.clone(), stop.clone(), name.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                setns_thread(&path);
                let tcp = TcpListener::bind(SocketAddr::new(ip, port)).expect("bind tcp");
                tcp.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("ready");
                while !stop2.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(format!("{name}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }));
            threads.push(std::thread::spawn(move || {
                setns_thread(&path2);
                let udp = UdpSocket::bind(SocketAddr::new(ip, port)).expect("bind udp");
                udp.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                tx2.send(()).expect("ready");
                let mut buf = [0u8; 1500];
                while !stop3.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(name2.as_bytes(), from);
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server did not start");
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server did not start");
        }
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a client child should do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientOp {
    /// `count` TCP connects; read the server's name; record getpeername.
    Tcp { addr: SocketAddrV4, count: u32 },
    /// `count` datagrams from ONE unconnected socket; record reply name + source.
    Udp { addr: SocketAddrV4, count: u32 },
    /// One TCP connect per source port (SO_REUSEADDR, bound to
    /// `0.0.0.0:port`), reading the server's line: fixed flow tuples.
    TcpFromPorts { addr: SocketAddrV4, ports: Vec<u16> },
    /// `count` datagrams, each from a new unconnected socket.
    UdpNewSocket { addr: SocketAddrV4, count: u32 },
    /// connect() of an ICMP echo ("ping") socket: a protocol the socket LB
    /// does not balance (the netns's `ping_group_range` is opened to gid 0
    /// first). `ok`: the connect succeeded.
    PingConnect { addr: SocketAddrV4 },
    /// TCP connects every `interval_ms` for `duration_ms`.
    TcpLoop {
        addr: SocketAddrV4,
        duration_ms: u64,
        interval_ms: u64,
    },
    /// As `Tcp`, any family: a `::ffff:a.b.c.d` address uses an AF_INET6 socket.
    TcpAny { addr: SocketAddr, count: u32 },
    /// As `Udp` (one unconnected socket), any family; an IPv6 or v4-mapped
    /// destination uses an AF_INET6 socket bound to `[::]:0`.
    UdpAny { addr: SocketAddr, count: u32 },
    /// Socket termination: a connected UDP socket and an unconnected one
    /// each get a reply; prints `NBT-READY <backend>` and waits for the
    /// connected one to fail. Results: [connected first reply, connected
    /// failure (errno, `mono_ns` when seen), unconnected after the failure,
    /// reconnect, unconnected before], then one reply on each socket
    /// connected to a `direct` address (a backend's own, not through the
    /// Service) after the failure.
    UdpTerm {
        addr: SocketAddr,
        #[serde(default)]
        direct: Vec<SocketAddr>,
    },
    /// A request/reply every `interval_ms` for `duration_ms`, each from a new
    /// unconnected UDP socket (`peer`: the reply's source).
    UdpLoop {
        addr: SocketAddrV4,
        duration_ms: u64,
        interval_ms: u64,
    },
    /// Long-lived flows: `conns` TCP connections to an echo service and one
    /// connected UDP socket, opened at once; prints `NBT-READY`, then every
    /// 50 ms for `duration_ms` one echo on each TCP connection (an attempt
    /// per connection and round, name = "echo") and one request on the UDP
    /// socket (name = the backend's, peer = getpeername).
    Hold {
        echo: SocketAddrV4,
        conns: u32,
        udp: SocketAddrV4,
        duration_ms: u64,
    },
    /// `count` TCP connections held open; prints `NBT-READY <cookie>,...`
    /// (SO_COOKIE), waits until the file `go` exists, then records each
    /// one's getpeername (name = its cookie).
    TcpPeerAfter {
        addr: SocketAddr,
        count: u32,
        go: PathBuf,
    },
}

/// One attempt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub ok: bool,
    pub name: String,
    pub peer: String,
    pub errno: i32,
    pub micros: u64,
    /// CLOCK_MONOTONIC ns at the end of the attempt (UdpTerm only).
    #[serde(default)]
    pub mono_ns: u64,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// A socket's cookie (SO_COOKIE).
pub fn socket_cookie(fd: &impl std::os::fd::AsRawFd) -> u64 {
    let mut v = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len outlive the call; the length is v's size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    v
}

fn tcp_peer_after(addr: SocketAddr, count: u32, go: &Path) -> Vec<Attempt> {
    let socks: Vec<std::net::TcpStream> = (0..count)
        .map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect")
        })
        .collect();
    let cookies: Vec<String> = socks.iter().map(|s| socket_cookie(s).to_string()).collect();
    println!("NBT-READY {}", cookies.join(","));
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(30);
    while !go.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    socks
        .iter()
        .zip(cookies)
        .map(|(s, cookie)| Attempt {
            ok: true,
            name: cookie,
            peer: s.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            errno: 0,
            micros: 0,
            mono_ns: 0,
        })
        .collect()
}

fn tcp_once(addr: impl Into<SocketAddr>) -> Attempt {
    let t = Instant::now();
    match std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut buf = Vec::new();
            let mut b = [0u8; 64];
            loop {
                match s.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.extend_from_slice(&b[..n]);
                        if buf.contains(&b'\n') {
                            break;
                        }
                    }
                    Err(e) => {
                        return Attempt {
                            ok: false,
                            name: String::new(),
                            peer,
                            errno: errno_of(&e),
                            micros: t.elapsed().as_micros() as u64,
                            mono_ns: 0,
                        };
                    }
                }
            }
            let name = String::from_utf8_lossy(&buf).trim().to_string();
            Attempt {
                ok: !name.is_empty(),
                name,
                peer,
                errno: 0,
                micros: t.elapsed().as_micros() as u64,
                mono_ns: 0,
            }
        }
        Err(e) => Attempt {
            ok: false,
            name: String::new(),
            peer: String::new(),
            errno: errno_of(&e),
            micros: t.elapsed().as_micros() as u64,
            mono_ns: 0,
        },
    }
}

fn udp_once(sock: &UdpSocket, addr: impl Into<SocketAddr>) -> Attempt {
    let addr: SocketAddr = addr.into();
    let t = Instant::now();
    let mut b = [0u8; 256];
    if let Err(e) = sock.send_to(b"hi", addr) {
        return Attempt {
            ok: false,
            name: String::new(),
            peer: String::new(),
            errno: errno_of(&e),
            micros: t.elapsed().as_micros() as u64,
            mono_ns: 0,
        };
    }
    match sock.recv_from(&mut b) {
        Ok((n, from)) => Attempt {
            ok: true,
            name: String::from_utf8_lossy(&b[..n]).to_string(),
            peer: from.to_string(),
            errno: 0,
            micros: t.elapsed().as_micros() as u64,
            mono_ns: 0,
        },
        Err(e) => Attempt {
            ok: false,
            name: String::new(),
            peer: String::new(),
            errno: errno_of(&e),
            micros: t.elapsed().as_micros() as u64,
            mono_ns: 0,
        },
    }
}

fn udp_sock() -> UdpSocket {
    let s = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s
}

/// An unconnected UDP socket of the family `addr` needs.
fn udp_sock_for(addr: SocketAddr) -> UdpSocket {
    let s = match addr {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0"),
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0"),
    }
    .expect("udp bind");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s
}

fn failed(errno: i32) -> Attempt {
    Attempt {
        ok: false,
        name: String::new(),
        peer: String::new(),
        errno,
        micros: 0,
        mono_ns: monotonic_ns(),
    }
}

/// One request/reply on a connected UDP socket.
fn udp_connected_once(s: &UdpSocket) -> Attempt {
    let mut b = [0u8; 256];
    if let Err(e) = s.send(b"hi") {
        return failed(errno_of(&e));
    }
    match s.recv(&mut b) {
        Ok(n) => Attempt {
            ok: true,
            name: String::from_utf8_lossy(&b[..n]).to_string(),
            peer: s.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            errno: 0,
            micros: 0,
            mono_ns: monotonic_ns(),
        },
        Err(e) => failed(errno_of(&e)),
    }
}

fn udp_term(addr: SocketAddr, direct: &[SocketAddr]) -> Vec<Attempt> {
    let conn = udp_sock_for(addr);
    conn.connect(addr).expect("udp connect");
    let first = udp_connected_once(&conn);
    let direct: Vec<UdpSocket> = direct
        .iter()
        .map(|d| {
            let s = udp_sock_for(*d);
            s.connect(d).expect("udp connect (direct)");
            s
        })
        .collect();
    let unconn = udp_sock_for(addr);
    let before = udp_once(&unconn, addr);
    println!("NBT-READY {}", first.name);
    let _ = std::io::stdout().flush();
    // Blocks until the socket is destroyed (sk_err wakes the reader) or 5 s.
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 64];
    let err = match conn.recv(&mut b) {
        Ok(_) => failed(0),
        Err(e) => failed(errno_of(&e)),
    };
    let again = udp_once(&unconn, addr);
    let conn2 = udp_sock_for(addr);
    let re = match conn2.connect(addr) {
        Ok(()) => udp_connected_once(&conn2),
        Err(e) => failed(errno_of(&e)),
    };
    let mut out = vec![first, err, again, re, before];
    out.extend(direct.iter().map(udp_connected_once));
    out
}

/// See [`ClientOp::PingConnect`].
fn ping_connect(addr: SocketAddrV4) -> Attempt {
    // This netns only (the helper runs inside the test's client netns).
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 0").expect("ping_group_range");
    let t = Instant::now();
    // SAFETY: plain socket calls on an fd we own and close; `sa` outlives connect.
    let errno = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        assert!(fd >= 0, "ping socket: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            std::ptr::from_ref(&sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let e = if rc == 0 {
            0
        } else {
            errno_of(&std::io::Error::last_os_error())
        };
        libc::close(fd);
        e
    };
    Attempt {
        ok: errno == 0,
        name: String::new(),
        peer: addr.to_string(),
        errno,
        micros: t.elapsed().as_micros() as u64,
        mono_ns: 0,
    }
}

/// See [`ClientOp::Hold`].
fn hold(echo: SocketAddrV4, conns: u32, udp: SocketAddrV4, duration_ms: u64) -> Vec<Attempt> {
    let mut streams: Vec<std::net::TcpStream> = (0..conns)
        .map(|_| {
            let s = std::net::TcpStream::connect_timeout(&echo.into(), Duration::from_secs(3))
                .expect("long-lived connect");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s
        })
        .collect();
    let u = udp_sock();
    u.connect(udp).expect("udp connect");
    println!("NBT-READY");
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_millis(duration_ms);
    let mut out = Vec::new();
    let mut round = 0u32;
    while Instant::now() < end {
        for s in &mut streams {
            let msg = format!("ping {round}\n");
            let mut b = vec![0u8; msg.len()];
            let r = s
                .write_all(msg.as_bytes())
                .and_then(|()| s.read_exact(&mut b));
            out.push(match r {
                Ok(()) if b == msg.as_bytes() => Attempt {
                    ok: true,
                    name: "echo".into(),
                    peer: s.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                    errno: 0,
                    micros: 0,
                    mono_ns: monotonic_ns(),
                },
                Ok(()) => failed(-2),
                Err(e) => failed(errno_of(&e)),
            });
        }
        out.push(udp_connected_once(&u));
        round += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// A TCP connection from source port `sport` (SO_REUSEADDR), reading one line.
fn tcp_from_port(addr: SocketAddrV4, sport: u16) -> Attempt {
    use std::os::fd::FromRawFd;
    let t = Instant::now();
    let fail = |errno: i32| Attempt {
        ok: false,
        name: String::new(),
        peer: String::new(),
        errno,
        micros: t.elapsed().as_micros() as u64,
        mono_ns: 0,
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on an fd we own; the sockaddr structs live
    // across each call; the fd is handed to TcpStream (which closes it).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return fail(errno_of(&std::io::Error::last_os_error()));
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let local = sin(Ipv4Addr::UNSPECIFIED, sport);
        if libc::bind(
            fd,
            &local as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        ) != 0
        {
            return fail(errno_of(&std::io::Error::last_os_error()));
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let remote = sin(*addr.ip(), addr.port());
        if libc::connect(
            fd,
            &remote as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        ) != 0
        {
            return fail(errno_of(&std::io::Error::last_os_error()));
        }
        let mut s = stream;
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        let name = buf.trim().to_string();
        Attempt {
            ok: !name.is_empty(),
            name,
            peer: String::new(),
            errno: 0,
            micros: t.elapsed().as_micros() as u64,
            mono_ns: 0,
        }
    }
}

/// Runs in the child (see [`helper_main`]).
fn client_main(op: ClientOp) -> Vec<Attempt> {
    match op {
        ClientOp::Tcp { addr, count } => (0..count).map(|_| tcp_once(addr)).collect(),
        ClientOp::Udp { addr, count } => {
            let s = udp_sock();
            (0..count).map(|_| udp_once(&s, addr)).collect()
        }
        ClientOp::TcpAny { addr, count } => (0..count).map(|_| tcp_once(addr)).collect(),
        ClientOp::UdpAny { addr, count } => {
            let s = udp_sock_for(addr);
            (0..count).map(|_| udp_once(&s, addr)).collect()
        }
        ClientOp::UdpTerm { addr, direct } => udp_term(addr, &direct),
        ClientOp::UdpLoop {
            addr,
            duration_ms,
            interval_ms,
        } => {
            let end = Instant::now() + Duration::from_millis(duration_ms);
            let mut out = Vec::new();
            while Instant::now() < end {
                out.push(udp_once(&udp_sock(), addr));
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
            out
        }
        ClientOp::Hold {
            echo,
            conns,
            udp,
            duration_ms,
        } => hold(echo, conns, udp, duration_ms),
        ClientOp::TcpFromPorts { addr, ports } => {
            ports.iter().map(|p| tcp_from_port(addr, *p)).collect()
        }
        ClientOp::PingConnect { addr } => vec![ping_connect(addr)],
        ClientOp::TcpPeerAfter { addr, count, go } => tcp_peer_after(addr, count, &go),
        ClientOp::UdpNewSocket { addr, count } => {
            (0..count).map(|_| udp_once(&udp_sock(), addr)).collect()
        }
        ClientOp::TcpLoop {
            addr,
            duration_ms,
            interval_ms,
        } => {
            let end = Instant::now() + Duration::from_millis(duration_ms);
            let mut out = Vec::new();
            while Instant::now() < end {
                out.push(tcp_once(addr));
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
            out
        }
    }
}

/// Call first thing in the `helper` test: in a child, runs the client and exits.
pub fn helper_main() {
    let Ok(op) = std::env::var(HELPER_ENV) else {
        return;
    };
    let op: ClientOp = serde_json::from_str(&op).expect("helper op");
    let res = client_main(op);
    println!("NBT-RESULT {}", serde_json::to_string(&res).expect("json"));
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// Kills (by pid) and reaps a child we started, on drop.
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns this test binary as a client inside `cgroup` and `ns`.
pub fn spawn_client(cgroup: &Path, ns: &Netns, op: &ClientOp) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, serde_json::to_string(op).expect("json"))
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("NBT_CLIENT_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    Confine {
        cgroup: Some(cgroup.to_path_buf()),
        netns: Some(ns.path()),
        ..Confine::default()
    }
    .apply(&mut cmd)
    .expect("confine client");
    let child = cmd.spawn().expect("spawn client");
    ChildGuard(Some(child))
}

/// Waits for a client and parses its attempts.
pub fn client_results(mut g: ChildGuard) -> Vec<Attempt> {
    let child = g.0.take().expect("child");
    let out = child.wait_with_output().expect("wait client");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("NBT-RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("client printed no result: {text}"));
    serde_json::from_str(line).expect("result json")
}

/// Runs one client op to completion.
pub fn client(cgroup: &Path, ns: &Netns, op: ClientOp) -> Vec<Attempt> {
    client_results(spawn_client(cgroup, ns, &op))
}

/// A free TCP port on 127.0.0.1 (racy but fine for tests).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Plain HTTP/1.0 GET against 127.0.0.1; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    netboot_harness::http::get(
        addr.parse().ok()?,
        path,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
}

/// Polls `/readyz` until 200 or the deadline.
pub fn wait_ready(addr: &str, within: Duration) -> Duration {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some((200, _)) = http_get(addr, "/readyz") {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("agent at {addr} not ready within {within:?}");
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What kube-proxy (iptables mode) leaves, plus foreign rules that must survive.
pub const RULES: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:FOREIGN-NAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE
-A FOREIGN-NAT -p tcp --dport 2222 -j RETURN
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SVC-TCOU7JCQXEZGVUNU -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p udp -m udp -j DNAT --to-destination 10.244.1.2:53
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 2222 -j ACCEPT
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -p tcp --dport 2223 -j ACCEPT
COMMIT
";

pub fn in_ns(ns: &Netns, prog: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, prog]).args(args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut ch = c.spawn().unwrap_or_else(|e| panic!("{prog}: {e}"));
    if let (Some(s), Some(mut w)) = (stdin, ch.stdin.take()) {
        w.write_all(s.as_bytes()).expect("stdin");
    }
    let out = ch.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn rules_only(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with(':') || l.starts_with('*'))
        .map(|l| {
            // Drop counters "[0:0]" from chain declarations.
            l.split(" [").next().unwrap_or(l).to_string()
        })
        .collect()
}

/// `n` distinct free ports on 127.0.0.1, none of the shared local cluster's
/// (6443 API server, 2379/2380 etcd, 10250-10260 components): all are held
/// until every one is chosen, so they differ from each other.
pub fn free_ports(n: usize) -> Vec<u16> {
    const SHARED: std::ops::RangeInclusive<u16> = 10250..=10260;
    let mut held = Vec::new();
    while held.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if [6443, 2379, 2380].contains(&port) || SHARED.contains(&port) {
            continue;
        }
        held.push(l);
    }
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// Runs `f` on a thread inside `ns`.
pub fn on_thread_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = File::open(&path).expect("netns");
        netns::enter_thread(&file).expect("setns");
        f()
    })
    .join()
    .expect("thread")
}

/// `bin agent` with static Services: node `node`, `dir` holding
/// `config.yaml` and `static.yaml` and receiving `agent.log` (appended),
/// the socket LB on `cg`, pins under `pins`, `--listen` on `listen`; no API
/// server, no NodePort devices from the environment. Callers add flags.
pub fn agent_command(
    bin: &Path,
    node: &str,
    dir: &Path,
    cg: &Path,
    pins: &Path,
    listen: &str,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--node-name", node])
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--cgroup")
        .arg(cg)
        .arg("--bpffs")
        .arg(pins)
        .args(["--listen", listen])
        .arg("--static-services")
        .arg(dir.join("static.yaml"))
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .env_remove("NETBOOT_NODEPORT_DEVICES")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("agent.log"))
                .expect("log"),
        ));
    cmd
}

/// An agent this test started (killed on drop) and its pid.
pub struct Agent {
    pub guard: ChildGuard,
    pub pid: u32,
}

/// `bin agent` ([`agent_command`], node `test-node`) in the test's own
/// network namespace, its kube-proxy rule cleanup confined to `rules_ns`.
pub fn start_agent_confined(
    bin: &Path,
    dir: &Path,
    cg: &Path,
    pins: &Path,
    listen: &str,
    rules_ns: &Netns,
) -> Agent {
    let child = agent_command(bin, "test-node", dir, cg, pins, listen)
        .arg("--rules-netns")
        .arg(rules_ns.path())
        .spawn()
        .expect("spawn agent");
    let pid = child.id();
    Agent {
        guard: ChildGuard(Some(child)),
        pid,
    }
}

/// The real agent `bin` as node `node` inside `ns` (a hostNetwork pod's
/// view): `dir` holds `config.yaml` and `static.yaml` and receives
/// `agent.log`; it listens on 127.0.0.1:9890 there.
pub fn start_agent_in(
    bin: &str,
    ns: &Netns,
    node: &str,
    dir: &Path,
    cg: &Path,
    pins: &Path,
) -> ChildGuard {
    let mut cmd = agent_command(Path::new(bin), node, dir, cg, pins, "127.0.0.1:9890");
    cmd.arg("--kube-proxy-present");
    Confine {
        parent_death: true,
        netns: Some(ns.path()),
        ..Default::default()
    }
    .apply(&mut cmd)
    .expect("confine agent");
    ChildGuard(Some(cmd.spawn().expect("spawn agent")))
}

/// `static.yaml` text of Service `web` (10.96.0.80:80/TCP → 10.244.1.1 and
/// .2 :8080); a macro so [`WEB_AND_DNS`] can be one literal.
macro_rules! web_yaml {
    () => {
        "
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.80
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1], conditions: {ready: true}}
- {addresses: [10.244.1.2], conditions: {ready: true}}
"
    };
}

/// The web Service of [`WEB_AND_DNS`] alone.
pub const WEB: &str = web_yaml!();

/// A Service `web` (10.96.0.80:80/TCP → 10.244.1.1 and .2 :8080) and a
/// Service `dns` (10.96.0.10:53/UDP → 10.244.1.2:8080), as `static.yaml`.
pub const WEB_AND_DNS: &str = concat!(
    web_yaml!(),
    "---
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2]}
"
);
