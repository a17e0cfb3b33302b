//! The namespaces of one benchmark size.
//!
//! ```text
//!  nbb-<pid>-<N>-floor    10.244.0.10/16 veth0 ──┐
//!  nbb-<pid>-<N>-netboot  10.244.0.11/16 veth0 ──┤   nbb-<pid>-<N>-be
//!  nbb-<pid>-<N>-ipt      10.244.0.12/16 veth0 ──┼── vb0..vb3, listeners on lo:
//!  nbb-<pid>-<N>-nft      10.244.0.13/16 veth0 ──┘   10.244.1.1..=B:8080
//! ```
//!
//! Network safety: each veth pair is created inside a client namespace with
//! its peer moved straight into the backend namespace, so no device, address
//! or route ever appears in the root namespace; no namespace has a default
//! route. The ClusterIP range gets an on-link route only in the iptables and
//! nftables client namespaces (their DNAT happens after the route lookup).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cleanup::Netns;
use crate::variant::Variant;
use crate::workload::{real_backend, BACKEND_PORT, SERVICE_CIDR};

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
            clients.push((v, ns));
        }
        let addrs: Vec<SocketAddrV4> = (1..=backends)
            .map(|j| SocketAddrV4::new(real_backend(j), BACKEND_PORT))
            .collect();
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
}

/// TCP listeners (threads inside the backend namespace) that accept and
/// close at once.
struct Servers {
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns, addrs: &[SocketAddrV4]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for addr in addrs {
            let fd = crate::sys::open_netns(ns)?;
            let (stop, accepted, addr) = (stop.clone(), accepted.clone(), *addr);
            let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
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
                                let _ = tx.send(Ok(()));
                                serve(&l, &stop, &accepted);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    })
                    .context("spawning a listener thread")?,
            );
        }
        let servers = Self {
            stop,
            accepted,
            threads,
        };
        for rx in ready {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("backend listener: {e}"),
                Err(_) => bail!("backend listener did not start"),
            }
        }
        Ok(servers)
    }
}

fn listen(addr: SocketAddrV4) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn serve(l: &Socket, stop: &AtomicBool, accepted: &std::sync::atomic::AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe {
                    libc::poll(&mut pfd, 1, 50);
                }
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
