//! The namespaces of one benchmark size.
//!
//! ```text
//!  nbb-<pid>-<N>-floor    10.244.0.10/16 veth0 ──┐
//!        fd00:10:244::10/64                      │
//!  nbb-<pid>-<N>-netboot  10.244.0.11/16 veth0 ──┤   nbb-<pid>-<N>-be
//!        fd00:10:244::11/64                      │   vb0..vb3, listeners on lo:
//!  nbb-<pid>-<N>-ipt      10.244.0.12/16 veth0 ──┼── 10.244.1.1..=B:8080 and
//!  nbb-<pid>-<N>-nft      10.244.0.13/16 veth0 ──┘   [fd00:10:244:1::1..=B]:8080
//! ```
//!
//! IPv6 (issue 13) in the floor and netboot namespaces only: the client's
//! address on veth0 (`nodad`, usable at once), a route for the backends'
//! fd00:10:244:1::/64 via the backend side's fd00:10:244::f0+k on vbk (IPv6
//! neighbour discovery answers only for addresses of the receiving device,
//! unlike ARP, which answers for the backends on `lo`), and a /128 route
//! back to the client on vbk. The IPv6 ClusterIPs get no route: connect6
//! rewrites the destination before the route lookup, as connect4 does.
//!
//! Network safety: each veth pair is created inside a client namespace with
//! its peer moved straight into the backend namespace, so no device, address
//! or route ever appears in the root namespace; no namespace has a default
//! route. The ClusterIP range gets an on-link route only in the iptables and
//! nftables client namespaces (their DNAT happens after the route lookup).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cleanup::Netns;
use crate::variant::Variant;
use crate::workload::{real_backend, real_backend6, BACKEND_PORT, SERVICE_CIDR};

/// Backend namespace + one client namespace per variant.
pub struct Topology {
    // Drop order: servers (threads hold the backend netns), clients, backend.
    servers: Servers,
    /// Client namespaces, in [`Variant::ALL`] order.
    pub clients: Vec<(Variant, Netns)>,
    /// Where the listeners are.
    pub backend: Netns,
}

/// Client address of the variant's namespace.
pub fn client_ip(v: Variant) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + v.index() as u8)
}

/// IPv6 client address of the variant's namespace (fd00:10:244::1k).
pub fn client_ip6(v: Variant) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x10 + v.index() as u16)
}

/// The backend side's address on the variant's veth peer (the next hop of
/// the client's route to the IPv6 backends).
pub fn gateway6(v: Variant) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xf0 + v.index() as u16)
}

/// The IPv6 listeners' prefix (all of [`real_backend6`]).
pub const BACKENDS6: &str = "fd00:10:244:1::/64";

impl Topology {
    /// Creates the namespaces and starts `backends` listeners.
    pub fn new(tag: &str, backends: u32) -> Result<Self> {
        let backend = Netns::new(&format!("{tag}-be"))?;
        for j in 1..=backends {
            backend.ip(&[
                "addr",
                "add",
                &format!("{}/32", real_backend(j)),
                "dev",
                "lo",
            ])?;
            backend.ip(&[
                "addr",
                "add",
                &format!("{}/128", real_backend6(j)),
                "dev",
                "lo",
            ])?;
        }
        let mut clients = Vec::new();
        for v in Variant::ALL {
            let ns = Netns::new(&format!("{tag}-{}", v.short()))?;
            let peer = format!("vb{}", v.index());
            ns.veth_to("veth0", &backend, &peer)?;
            let ip = client_ip(v);
            ns.ip(&["addr", "add", &format!("{ip}/16"), "dev", "veth0"])?;
            ns.ip(&["link", "set", "veth0", "up"])?;
            backend.ip(&["link", "set", &peer, "up"])?;
            backend.ip(&["route", "add", &format!("{ip}/32"), "dev", &peer])?;
            if v.needs_vip_route() {
                ns.ip(&["route", "add", SERVICE_CIDR, "dev", "veth0"])?;
            }
            if v.has_ipv6() {
                let (ip6, gw) = (client_ip6(v), gateway6(v));
                ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "veth0", "nodad"])?;
                backend.ip(&["addr", "add", &format!("{gw}/128"), "dev", &peer, "nodad"])?;
                backend.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &peer])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    BACKENDS6,
                    "via",
                    &gw.to_string(),
                    "dev",
                    "veth0",
                ])?;
            }
            clients.push((v, ns));
        }
        let mut addrs: Vec<SocketAddr> = (1..=backends)
            .map(|j| SocketAddr::new(real_backend(j).into(), BACKEND_PORT))
            .collect();
        addrs
            .extend((1..=backends).map(|j| SocketAddr::new(real_backend6(j).into(), BACKEND_PORT)));
        let servers = Servers::start(&backend, &addrs)?;
        Ok(Self {
            servers,
            clients,
            backend,
        })
    }

    /// The client namespace of `v`.
    pub fn client(&self, v: Variant) -> Result<&Netns> {
        self.clients
            .iter()
            .find(|(x, _)| *x == v)
            .map(|(_, ns)| ns)
            .with_context(|| format!("no client namespace for {}", v.name()))
    }

    /// Connections the listeners accepted so far.
    pub fn accepted(&self) -> u64 {
        self.servers.accepted.load(Ordering::Relaxed)
    }

    /// Quiet listeners (`--drain-listeners`): the listener threads stop
    /// accepting and polling, so no connection wakes a thread while a client
    /// is inside connect(); the handshakes complete in the kernel (accept
    /// queue of 4096) and [`Topology::drain`] accepts them between batches.
    pub fn quiet(&self, on: bool) {
        self.servers.quiet.store(on, Ordering::Relaxed);
    }

    /// Accepts (and closes) every connection waiting on the listeners.
    pub fn drain(&self) {
        for l in &self.servers.listeners {
            while let Ok((s, _)) = l.accept() {
                self.servers.accepted.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
        }
    }
}

/// TCP listeners (threads inside the backend namespace) that accept and
/// close at once.
struct Servers {
    stop: Arc<AtomicBool>,
    /// While set, the threads neither accept nor poll (see [`Topology::quiet`]).
    quiet: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    listeners: Vec<Arc<Socket>>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns, addrs: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let quiet = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for addr in addrs {
            let fd = crate::sys::open_netns(ns)?;
            let (stop, quiet, accepted, addr) =
                (stop.clone(), quiet.clone(), accepted.clone(), *addr);
            let (tx, rx) = std::sync::mpsc::channel::<Result<Arc<Socket>, String>>();
            ready.push(rx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("nbb-listen-{addr}"))
                    .spawn(move || {
                        let listener = netboot_harness::netns::enter_thread(&fd)
                            .map_err(|e| format!("setns: {e}"))
                            .and_then(|()| listen(addr).map_err(|e| format!("listen {addr}: {e}")));
                        match listener {
                            Ok(l) => {
                                let l = Arc::new(l);
                                let _ = tx.send(Ok(l.clone()));
                                serve(&l, &stop, &quiet, &accepted);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    })
                    .context("spawning a listener thread")?,
            );
        }
        let mut servers = Self {
            stop,
            quiet,
            accepted,
            listeners: Vec::new(),
            threads,
        };
        for rx in ready {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(l)) => servers.listeners.push(l),
                Ok(Err(e)) => bail!("backend listener: {e}"),
                Err(_) => bail!("backend listener did not start"),
            }
        }
        Ok(servers)
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn serve(
    l: &Socket,
    stop: &AtomicBool,
    quiet: &AtomicBool,
    accepted: &std::sync::atomic::AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        if quiet.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match l.accept() {
            Ok((s, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                crate::topology::wait_readable(l, 50)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
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

/// Waits up to `ms` for `fd` to be readable (a listener with a connection
/// to accept), so a non-blocking accept loop neither spins nor sleeps long.
pub fn wait_readable(fd: &impl AsRawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}
