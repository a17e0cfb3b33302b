//! A private Kubernetes control plane and the real kube-proxy, for tests and
//! the bench that compare netboot with kube-proxy itself.
//!
//! - [`ControlPlane`]: etcd + kube-apiserver (binaries from tests/cluster/
//!   build's cache, [`cached`]) on free 127.0.0.1 ports, with a throwaway
//!   PKI ([`pki`]) and an admin kubeconfig ([`kubeconfig`]). No controller
//!   manager, no scheduler: nothing but the test writes objects.
//! - [`Relay`]: a listener on 127.0.0.1 INSIDE a network namespace whose
//!   connections are forwarded to a 127.0.0.1 port of the root namespace by
//!   the calling process, so a process in a namespace without any route (no
//!   veth, no firewall change in the root namespace) reaches the API server.
//! - [`ProxyMode`], [`proxy_config`], [`kube_proxy_command`]: the real
//!   kube-proxy with kubeadm's configuration, run inside such a namespace;
//!   [`ProxyMode::dump`] prints its rules with the mode's own tool.
//! - [`ChildGuard`] / [`spawn_logged`]: children killed (by pid) and reaped
//!   on drop, and killed by the kernel if the caller dies
//!   (PR_SET_PDEATHSIG).
//! - [`sweep_leftovers`]: namespaces `<prefix><pid>-…` of a caller that was
//!   killed.
//!
//! Used by netboot-bench's generators test and its `programming` section.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeAddress, NodeStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};

use crate::netns::in_netns;

/// What failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, process or socket operation.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An API call.
    #[error("{what}: {source}")]
    Kube {
        /// What was asked.
        what: String,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// Anything else (the message says what and why).
    #[error("{0}")]
    Failed(String),
}

/// This module's result.
pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// `<cache>/<kind>/<newest version>/bin/<name>` from tests/cluster/build's
/// cache (`NETBOOT_CACHE`, default `~/.cache/netboot`).
pub fn cached(kind: &str, name: &str) -> Result<PathBuf> {
    let cache = std::env::var("NETBOOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/netboot")
        });
    let dir = cache.join(kind);
    let hint = "run tests/cluster/build first; NETBOOT_CACHE overrides ~/.cache/netboot";
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            Error::Failed(format!(
                "{name} from the tests/cluster/build cache: {}: {e} ({hint})",
                dir.display()
            ))
        })?
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        Error::Failed(format!(
            "{name} from the tests/cluster/build cache: not found under {}/*/bin ({hint})",
            dir.display()
        ))
    })
}

/// A child killed (by its pid) and reaped on drop, pass or fail.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stderr to `log` (stdin, stdout: null). The child gets
/// SIGKILL when the spawning thread's process dies (spawn from a thread that
/// lives as long as the child should).
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<ChildGuard> {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).map_err(io(format!("create {}", log.display())))?;
    // SAFETY: prctl is async-signal-safe. The child dies with the caller
    // even if that is killed and cannot run its guards.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    let what = format!("spawn {cmd:?}");
    Ok(ChildGuard(cmd.spawn().map_err(io(what))?))
}

/// `n` distinct free ports on 127.0.0.1, none of the well-known Kubernetes ones.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    while held.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
        let port = l.local_addr().map_err(io("local address"))?.port();
        if [6443, 2379, 2380].contains(&port) || (10248..=10260).contains(&port) {
            continue;
        }
        held.push((l, port));
    }
    Ok(held.iter().map(|(_, p)| *p).collect())
}

fn sh(script: &str, dir: &Path) -> Result<()> {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .map_err(io("bash"))?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// CA, API server serving cert (127.0.0.1), admin client cert
/// (system:masters), service-account keys, all in `dir`.
pub fn pki(dir: &Path) -> Result<()> {
    sh(
        r#"
k() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
k ca.key
openssl req -x509 -new -key ca.key -subj /CN=netboot-test-ca -days 2 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign -out ca.crt 2>/dev/null
sign() { k "$1.key"; openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 -out "$1.crt" -extfile <(printf '%s\n' "$3") 2>/dev/null; }
sign apiserver /CN=kube-apiserver "basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes"
sign admin "/O=system:masters/CN=netboot-test-admin" "basicConstraints=critical,CA:FALSE
extendedKeyUsage=clientAuth"
k sa.key; openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
"#,
        dir,
    )
}

/// A kubeconfig `dir/name` for the admin cert of [`pki`] against `server`.
pub fn kubeconfig(dir: &Path, name: &str, server: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server}', certificate-authority: {d}/ca.crt}}}}]\nusers: [{{name: u, user: {{client-certificate: {d}/admin.crt, client-key: {d}/admin.key}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            d = dir.display()
        ),
    )
    .map_err(io(format!("write {}", p.display())))?;
    Ok(p)
}

/// Forwards connections to 127.0.0.1:PORT inside a namespace to `upstream`
/// (127.0.0.1 in the root namespace): the listener was bound by a thread
/// that entered the namespace; the upstream connections are made by threads
/// that never left the root namespace. Stopped (and every relayed
/// connection shut down) on drop.
pub struct Relay {
    /// The port inside the namespace.
    pub port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds 127.0.0.1:0 inside `netns` and starts forwarding to `upstream`.
    pub fn start(netns: &str, upstream: SocketAddr) -> Result<Self> {
        let listener = in_netns(netns, || {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(|e| Error::Failed(format!("relay listener inside {netns}: {e}")))?;
        let port = listener.local_addr().map_err(io("relay address"))?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let _ = relay_one(down, upstream, &c);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            port,
            stop,
            conns,
            thread: Some(thread),
        })
    }
}

fn relay_one(
    down: TcpStream,
    upstream: SocketAddr,
    conns: &Mutex<Vec<TcpStream>>,
) -> std::io::Result<()> {
    let up = TcpStream::connect(upstream)?;
    let pair = [down.try_clone()?, up.try_clone()?];
    if let Ok(mut c) = conns.lock() {
        c.extend(pair);
    }
    pipe(down.try_clone()?, up.try_clone()?);
    pipe(up, down);
    Ok(())
}

/// One direction of a relayed connection, on a thread of its own: through
/// a pipe with splice(2), so the bytes never pass through this process (a
/// cold-start benchmark relays ~12 MiB of lists per start on the cores the
/// agent is measured on); by read and write where splice is refused.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        if let Err(Spliced::Nothing) = splice_all(&from, &to) {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// How a splice relay ended short of the end of the stream.
enum Spliced {
    /// Before any byte moved (no pipe, or splice refused): copy instead.
    Nothing,
    /// Part way: the connection is broken.
    Broken,
}

/// Moves everything `from` sends to `to` through a pipe (splice(2)).
fn splice_all(from: &TcpStream, to: &TcpStream) -> std::result::Result<(), Spliced> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Spliced::Nothing);
    }
    // SAFETY: both descriptors are new and ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe: fewer calls per list (the default is 64 KiB; failing
    // is fine).
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let splice = |fd_in: i32, fd_out: i32, len: usize| loop {
        // SAFETY: splice between descriptors this function holds, no
        // offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                fd_in,
                std::ptr::null_mut(),
                fd_out,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
            continue;
        }
        return n;
    };
    let mut moved = false;
    loop {
        let n = splice(from.as_raw_fd(), w.as_raw_fd(), 1 << 20);
        if n == 0 {
            return Ok(());
        }
        let Ok(mut left) = usize::try_from(n) else {
            return Err(if moved {
                Spliced::Broken
            } else {
                Spliced::Nothing
            });
        };
        moved = true;
        while left > 0 {
            match usize::try_from(splice(r.as_raw_fd(), to.as_raw_fd(), left)) {
                Ok(m) if m > 0 => left -= m.min(left),
                _ => return Err(Spliced::Broken),
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(c) = self.conns.lock() {
            for s in c.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Deletes the namespaces `<prefix><pid>-…` of a run that was killed (its
/// pid no longer runs): processes die with it (PR_SET_PDEATHSIG), the
/// namespaces do not. Returns the names removed.
pub fn sweep_leftovers(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for name in crate::netns::list(prefix) {
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            removed.push(name);
        }
    }
    removed
}

/// `ip netns exec NS PROGRAM ARGS…` (stdin from `stdin`), stdout as text.
pub fn in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<&Path>) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    if let Some(p) = stdin {
        c.stdin(std::fs::File::open(p).map_err(io(format!("open {}", p.display())))?);
    }
    let out = c.output().map_err(io(format!("netns {ns}: {program}")))?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "netns {ns}: {program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    String::from_utf8(out.stdout)
        .map_err(|e| Error::Failed(format!("netns {ns}: {program}: output not UTF-8: {e}")))
}

/// kube-proxy's two rule modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// `mode: iptables`.
    Iptables,
    /// `mode: nftables`.
    Nftables,
}

impl ProxyMode {
    /// The config's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// The rules as the namespace holds them, printed by the mode's tool
    /// (iptables: without the `#` lines; nftables: empty before kube-proxy
    /// made its table).
    pub fn dump(self, ns: &str) -> Result<String> {
        match self {
            Self::Iptables => Ok(in_ns(ns, "iptables-nft-save", &[], None)?
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect()),
            Self::Nftables => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        ns,
                        "nft",
                        "list",
                        "table",
                        "ip",
                        "kube-proxy",
                    ])
                    .output()
                    .map_err(io(format!("netns {ns}: nft list table")))?;
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        }
    }

    /// How many Services a [`ProxyMode::dump`] sends somewhere.
    pub fn services_in(self, dump: &str) -> usize {
        match self {
            Self::Iptables => dump
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains("-j KUBE-SVC-"))
                .count(),
            Self::Nftables => dump.matches(": goto service-").count(),
        }
    }
}

/// What differs between the kube-proxies a caller runs.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// iptables or nftables.
    pub mode: ProxyMode,
    /// Its kubeconfig (the server is usually a [`Relay`]).
    pub kubeconfig: PathBuf,
    /// `clusterCIDR`.
    pub cluster_cidr: String,
    /// `hostnameOverride`: the Node it serves.
    pub node: String,
    /// `metricsBindAddress` (inside its namespace); None: no metrics.
    pub metrics: Option<SocketAddr>,
}

/// kubeadm's kube-proxy config.conf (tests/cluster/manifests/kubeadm/
/// 20-kube-proxy.yaml) with podnet's one change (`conntrack.maxPerCore: 0`:
/// the global conntrack table size is the initial namespace's) and `s`.
pub fn proxy_config(s: &ProxySettings) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  kubeconfig: {kc}
clusterCIDR: {cidr}
conntrack:
  maxPerCore: 0
  min: null
  tcpBeLiberal: false
  udpStreamTimeout: 0s
  udpTimeout: 0s
healthzBindAddress: \"\"
metricsBindAddress: \"{metrics}\"
mode: {mode}
nodePortAddresses: null
hostnameOverride: {node}
",
        kc = s.kubeconfig.display(),
        cidr = s.cluster_cidr,
        metrics = s.metrics.map(|m| m.to_string()).unwrap_or_default(),
        mode = s.mode.name(),
        node = s.node,
    )
}

/// `ip netns exec NS KUBE-PROXY --config=CONFIG --v=2` (spawn it with
/// [`spawn_logged`]; `ip netns exec` execs, so the pid is kube-proxy's).
pub fn kube_proxy_command(bin: &Path, ns: &str, config: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(bin)
        .arg(format!("--config={}", config.display()))
        .arg("--v=2");
    c
}

/// The `elapsed` of kube-proxy's first IPv4 "SyncProxyRules complete" line.
pub fn first_sync_elapsed(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("\"SyncProxyRules complete\"") && l.contains("ipFamily=\"IPv4\""))?;
    let v = line.split_once("elapsed=\"")?.1;
    Some(v.split('"').next()?.to_string())
}

/// The API server's `--service-node-port-range`: wider than the default
/// 30000-32767 so that netboot-bench northsouth's nodePorts (20000 + i, up
/// to 10k Services) are admitted.
pub const NODE_PORT_RANGE: &str = "20000-32767";

/// How [`ControlPlane`] runs kube-apiserver, kept to start it again.
struct ApiServerCmd {
    bin: PathBuf,
    dir: PathBuf,
    etcd_port: u16,
    api_port: u16,
    service_cidr: String,
}

impl ApiServerCmd {
    fn command(&self) -> Command {
        let (dir, ec, ap) = (self.dir.display(), self.etcd_port, self.api_port);
        let mut c = Command::new(&self.bin);
        c.arg(format!("--etcd-servers=http://127.0.0.1:{ec}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=192.0.2.10"])
            .arg(format!("--secure-port={ap}"))
            .arg(format!("--service-cluster-ip-range={}", self.service_cidr))
            .arg(format!("--service-node-port-range={NODE_PORT_RANGE}"))
            .args([
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--max-requests-inflight=800",
                "--max-mutating-requests-inflight=400",
            ])
            .arg(format!("--client-ca-file={dir}/ca.crt"))
            .arg(format!("--tls-cert-file={dir}/apiserver.crt"))
            .arg(format!("--tls-private-key-file={dir}/apiserver.key"))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={dir}/sa.pub"))
            .arg(format!("--service-account-signing-key-file={dir}/sa.key"));
        c
    }
}

/// Waits for the API server's /readyz (120 s); `log` is named in the error.
async fn wait_ready(client: &kube::Client, log: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Failed(format!("GET /readyz: {e}")))?;
        if client.request_text(req).await.is_ok() {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(Error::Failed(format!(
                "kube-apiserver not ready after 120 s: see {}",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// POSTs JSON `body` to `path` of etcd's gateway (`etcd`); its JSON answer.
async fn etcd_post(etcd: &kube::Client, path: &str, body: Vec<u8>) -> Result<serde_json::Value> {
    let req = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| Error::Failed(format!("POST {path}: {e}")))?;
    let text = etcd
        .request_text(req)
        .await
        .map_err(kube_err(format!("etcd: POST {path}")))?;
    serde_json::from_str(&text).map_err(|e| Error::Failed(format!("etcd {path}: {e}: {text}")))
}

/// etcd + kube-apiserver on free 127.0.0.1 ports, stopped on drop.
pub struct ControlPlane {
    _etcd: ChildGuard,
    /// None while stopped ([`ControlPlane::stop_apiserver`]).
    api: Option<ChildGuard>,
    /// How the API server was started, for [`ControlPlane::start_apiserver`].
    api_cmd: ApiServerCmd,
    /// API server starts so far (each logs to its own file).
    api_starts: u32,
    /// The API server's port on 127.0.0.1.
    pub api_port: u16,
    /// etcd's client port on 127.0.0.1 (plain HTTP), for
    /// [`ControlPlane::etcd_put_all`].
    pub etcd_port: u16,
    /// An admin client.
    pub client: kube::Client,
    /// The admin kubeconfig (server 127.0.0.1:api_port).
    pub admin: PathBuf,
    /// The cached kube-proxy binary.
    pub bin_proxy: PathBuf,
    /// Where the PKI, data and logs are.
    pub dir: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver (`--service-cluster-ip-range`
    /// = `service_cidr`, `--service-node-port-range` = [`NODE_PORT_RANGE`],
    /// RBAC, no endpoint reconciler) with their data,
    /// certificates and logs in `dir`, and waits for /readyz (120 s).
    pub async fn start(dir: &Path, service_cidr: &str) -> Result<Self> {
        let etcd = cached("etcd", "etcd")?;
        let apiserver = cached("k8s", "kube-apiserver")?;
        let bin_proxy = cached("k8s", "kube-proxy")?;
        pki(dir)?;
        let ports = free_ports(3)?;
        let (ec, ep, ap) = (ports[0], ports[1], ports[2]);
        let mut c = Command::new(&etcd);
        c.args(["--name", "netboot-test", "--data-dir"])
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{ec}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{ec}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{ep}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{ep}"
            ))
            .arg(format!(
                "--initial-cluster=netboot-test=http://127.0.0.1:{ep}"
            ))
            .arg("--unsafe-no-fsync")
            .arg("--quota-backend-bytes=8589934592");
        let etcd = spawn_logged(c, &dir.join("etcd.log"))?;
        let api_cmd = ApiServerCmd {
            bin: apiserver,
            dir: dir.to_path_buf(),
            etcd_port: ec,
            api_port: ap,
            service_cidr: service_cidr.to_string(),
        };
        let api = spawn_logged(api_cmd.command(), &dir.join("apiserver.log"))?;
        let admin = kubeconfig(dir, "admin.conf", &format!("https://127.0.0.1:{ap}"))?;
        let kc = kube::config::Kubeconfig::read_from(&admin)
            .map_err(|e| Error::Failed(format!("{}: {e}", admin.display())))?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Failed(format!("{}: {e}", admin.display())))?;
        let client = kube::Client::try_from(cfg).map_err(kube_err("API client"))?;
        wait_ready(&client, &dir.join("apiserver.log")).await?;
        Ok(Self {
            _etcd: etcd,
            api: Some(api),
            api_cmd,
            api_starts: 1,
            api_port: ap,
            etcd_port: ec,
            client,
            admin,
            bin_proxy,
            dir: dir.to_path_buf(),
        })
    }

    /// Writes `objects` (etcd key under the API server's `/registry`
    /// prefix, object JSON with apiVersion and kind) straight into etcd,
    /// [`ETCD_TXN_OPS`] per transaction through etcd's JSON gateway,
    /// bypassing the API server: for benchmarks that need more objects than
    /// the API server admits in their time (its ClusterIP allocator counts
    /// every IPAddress on each create, so filling it is quadratic). The API
    /// server reads JSON from etcd as it reads its own protobuf, and its
    /// watch cache takes the writes up like any other; nothing validates or
    /// defaults them on the way in, so `objects` must be complete.
    pub async fn etcd_put_all(&self, objects: Vec<(String, Vec<u8>)>) -> Result<()> {
        use base64::Engine as _;
        let etcd = self.etcd()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let txns: Vec<Vec<u8>> = objects
            .chunks(ETCD_TXN_OPS)
            .map(|chunk| {
                let puts: Vec<serde_json::Value> = chunk
                    .iter()
                    .map(|(key, value)| {
                        serde_json::json!({"requestPut": {
                            "key": b64.encode(format!("/registry/{key}")),
                            "value": b64.encode(value),
                        }})
                    })
                    .collect();
                serde_json::to_vec(&serde_json::json!({ "success": puts }))
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Failed(format!("etcd transaction: {e}")))?;
        futures::stream::iter(txns)
            .map(|body| {
                let etcd = etcd.clone();
                async move {
                    let v = etcd_post(&etcd, "/v3/kv/txn", body).await?;
                    if v["succeeded"] != serde_json::Value::Bool(true) {
                        return Err(Error::Failed(format!("etcd: transaction failed: {v}")));
                    }
                    Ok(())
                }
            })
            .buffer_unordered(4)
            .try_for_each(|()| async { Ok(()) })
            .await
    }

    /// Stops the API server (SIGKILL, as a crashed one goes); etcd keeps
    /// running. Clients' requests fail until
    /// [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&mut self) {
        self.api = None;
    }

    /// Starts the API server again on the same port, PKI and etcd, and waits
    /// for /readyz. Its watch cache starts at etcd's current revision: a
    /// watch resuming from an older version gets `410 Gone` once etcd has
    /// compacted past it ([`ControlPlane::etcd_compact`]).
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.api.is_some() {
            return Ok(());
        }
        self.api_starts += 1;
        let log = self.dir.join(format!("apiserver.{}.log", self.api_starts));
        self.api = Some(spawn_logged(self.api_cmd.command(), &log)?);
        wait_ready(&self.client, &log).await
    }

    /// A client of etcd's JSON gateway.
    fn etcd(&self) -> Result<kube::Client> {
        let url = format!("http://127.0.0.1:{}", self.etcd_port);
        let cfg = kube::Config::new(
            url.parse()
                .map_err(|e| Error::Failed(format!("{url}: {e}")))?,
        );
        kube::Client::try_from(cfg).map_err(kube_err("etcd client"))
    }

    /// POSTs `body` to etcd's gateway at `path`; its JSON answer.
    async fn etcd_call(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let body =
            serde_json::to_vec(&body).map_err(|e| Error::Failed(format!("etcd {path}: {e}")))?;
        etcd_post(&self.etcd()?, path, body).await
    }

    /// Deletes etcd key `/registry/{key}` behind the API server's back;
    /// how many keys went (0 or 1).
    pub async fn etcd_delete(&self, key: &str) -> Result<u64> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = self
            .etcd_call(
                "/v3/kv/deleterange",
                serde_json::json!({"key": b64.encode(format!("/registry/{key}"))}),
            )
            .await?;
        // proto3 JSON leaves zero values out: no "deleted" is 0.
        Ok(v["deleted"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0))
    }

    /// Compacts etcd's history up to its current revision (the API server
    /// compacts every five minutes); returns that revision. A watch from an
    /// older resourceVersion is then answered `410 Gone`.
    pub async fn etcd_compact(&self) -> Result<i64> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = self
            .etcd_call(
                "/v3/kv/range",
                serde_json::json!({"key": b64.encode("/registry/"), "limit": 1}),
            )
            .await?;
        let rev: i64 = v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| Error::Failed(format!("etcd: no revision in {v}")))?;
        self.etcd_call(
            "/v3/kv/compaction",
            serde_json::json!({"revision": rev.to_string(), "physical": true}),
        )
        .await?;
        Ok(rev)
    }

    /// Creates Namespace `name`.
    pub async fn create_namespace(&self, name: &str) -> Result<()> {
        let ns: Api<Namespace> = Api::all(self.client.clone());
        ns.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .map_err(kube_err(format!("Namespace/{name}: create")))?;
        Ok(())
    }

    /// Creates `first` after deleting `default/kubernetes` (the API server
    /// re-creates it every few seconds; once `first` holds its ClusterIP,
    /// the first of the range, it cannot), retrying for 60 s.
    pub async fn displace_default_kubernetes(&self, first: &Service) -> Result<()> {
        let ns = first.metadata.namespace.clone().unwrap_or_default();
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), &ns);
        let default: Api<Service> = Api::namespaced(self.client.clone(), "default");
        let t = Instant::now();
        loop {
            let _ = default.delete("kubernetes", &DeleteParams::default()).await;
            match svcs.create(&PostParams::default(), first).await {
                Ok(_) => return Ok(()),
                Err(e) if t.elapsed() > Duration::from_secs(60) => {
                    return Err(Error::Failed(format!(
                        "{ns}/{}: could not take default/kubernetes' ClusterIP in 60 s: {e}",
                        first.metadata.name.as_deref().unwrap_or("?")
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// A Node object with only an InternalIP (kube-proxy waits 30 s for its
/// Node's IPs otherwise).
pub fn node(name: &str, internal_ip: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: internal_ip.into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes per etcd transaction of [`ControlPlane::etcd_put_all`]
/// (etcd's default `--max-txn-ops`).
pub const ETCD_TXN_OPS: usize = 128;

/// Tries per object [`create_all`] makes before it gives up.
const CREATE_TRIES: u32 = 8;
/// Objects between two progress lines of [`create_all`].
const CREATE_PROGRESS: usize = 10_000;

/// Whether a failed create may succeed if sent again: the API server shed
/// load (429), timed out or failed inside (5xx), or the connection broke.
fn retriable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(r) => r.code == 429 || r.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Creates `objects` through `api`, `in_flight` at a time. A create the API
/// server sheds or times out under load is sent again (up to
/// [`CREATE_TRIES`] times, backing off); "already exists" after such a retry
/// means the first attempt landed. Prints progress every
/// [`CREATE_PROGRESS`] objects when there are more than that.
pub async fn create_all<K>(api: &Api<K>, objects: Vec<K>, in_flight: usize) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let total = objects.len();
    let started = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let retried = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(objects)
        .map(|o| {
            let (api, done, retried, kind) = (api.clone(), &done, &retried, &kind);
            async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match api.create(&PostParams::default(), &o).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(r)) if r.is_already_exists() && tries > 1 => break,
                        Err(e) if retriable(&e) && tries < CREATE_TRIES => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(250 << tries.min(5))).await;
                        }
                        Err(e) => {
                            let name = o.meta().name.clone().unwrap_or_default();
                            return Err(Error::Kube {
                                what: format!("creating {kind} {name} (try {tries})"),
                                source: e,
                            });
                        }
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if total > CREATE_PROGRESS && n % CREATE_PROGRESS == 0 {
                    eprintln!(
                        "  {n}/{total} {kind}s created ({:.0}/s, {} retried)",
                        n as f64 / started.elapsed().as_secs_f64(),
                        retried.load(Ordering::Relaxed)
                    );
                }
                Ok(())
            }
        })
        .buffer_unordered(in_flight.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await
}
