//! The pod world's network plumbing, done with `ip` (iproute2).
//!
//! Topology (docs/contracts.md): a fabric netns with a bridge; a netns per node
//! plugged into the bridge with its node IP; a netns per pod with a veth to its
//! node netns; the control-plane netns and an external client (not a node) on
//! the bridge too. Every veth is created INSIDE a namespace podnet made and its
//! peer moved straight into another one, so no device ever appears in the root
//! namespace, no address is added there and no route or firewall rule of the
//! root namespace is touched. No namespace gets a default route.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::debug;

use crate::names::{self, Layout};

/// A failed netns operation; the message names the namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `ip` (or another tool) exited non-zero.
    #[error("netns {netns}: `{command}` failed: {stderr}")]
    Command {
        /// The namespace the command ran against.
        netns: String,
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The command could not be started or the file could not be used.
    #[error("netns {netns}: {what}: {source}")]
    Io {
        /// The namespace the operation was for.
        netns: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NetError>;

async fn run(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let command = format!("{program} {}", args.join(" "));
    debug!(netns, %command, "run");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let io = |what: &str, source| NetError::Io {
        netns: netns.to_string(),
        what: format!("{what} `{command}`"),
        source,
    };
    let mut child = cmd.spawn().map_err(|e| io("start", e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| io("write stdin of", e))?;
        drop(pipe);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| io("wait for", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            netns: netns.to_string(),
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip -n NETNS -batch -` with one command per line (fails on the first error).
pub async fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let script = lines.join("\n") + "\n";
    run(netns, "ip", &["-n", netns, "-batch", "-"], Some(&script)).await
}

/// Runs `PROGRAM ARGS` inside the netns (`ip netns exec`), feeding `stdin`.
pub async fn run_in(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run(netns, "ip", &full, stdin).await
}

/// Whether `/run/netns/<name>` exists.
pub fn exists(name: &str) -> bool {
    names::netns_path(name).exists()
}

/// Every netns in /run/netns whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(names::NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

/// Creates a netns with loopback up (a no-op if it exists).
pub async fn add(name: &str) -> Result<()> {
    if !exists(name) {
        run(name, "ip", &["netns", "add", name], None).await?;
    }
    ip_batch(name, &["link set lo up".to_string()]).await
}

/// Deletes a netns (its veths go with it) and its /etc/netns files. Missing is fine.
pub async fn delete(name: &str) -> Result<()> {
    let etc = names::netns_etc(name);
    if etc.exists() {
        std::fs::remove_dir_all(&etc).map_err(|source| NetError::Io {
            netns: name.to_string(),
            what: format!("remove {}", etc.display()),
            source,
        })?;
    }
    if exists(name) {
        run(name, "ip", &["netns", "delete", name], None).await?;
    }
    Ok(())
}

/// Sets a sysctl under /proc/sys inside the netns (e.g. `net/ipv4/ip_forward`).
pub async fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    // /proc/sys/net follows the netns of the process that opens it; `ip netns
    // exec` only remounts /sys, so /proc/sys here is the namespace's own.
    let script = format!("echo {value} > /proc/sys/{key}");
    run(
        netns,
        "ip",
        &["netns", "exec", netns, "sh", "-c", &script],
        None,
    )
    .await
}

/// Turns IPv6 duplicate address detection off in a netns the test made, for
/// addresses added later: they are usable at once (each is unique by
/// construction).
async fn no_dad(netns: &str) -> Result<()> {
    sysctl(netns, "net/ipv6/conf/all/accept_dad", "0").await?;
    sysctl(netns, "net/ipv6/conf/default/accept_dad", "0").await
}

/// Writes `/etc/netns/<netns>/resolv.conf` so `ip netns exec` gives the pod cluster DNS.
pub fn write_resolv_conf(netns: &str, pod_namespace: &str) -> Result<()> {
    let dir = names::netns_etc(netns);
    let content = format!(
        "nameserver {}\nsearch {pod_namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        names::DNS_IP
    );
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("resolv.conf"), content))
        .map_err(|source| NetError::Io {
            netns: netns.to_string(),
            what: format!("write {}/resolv.conf", dir.display()),
            source,
        })
}

/// Runs `f` on a thread that has entered the netns, e.g. to bind a socket
/// there. The socket stays in that namespace whichever thread uses it later.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let path = names::netns_path(netns);
    let io = |what: String, source| NetError::Io {
        netns: netns.to_string(),
        what,
        source,
    };
    let file = std::fs::File::open(&path).map_err(|e| io(format!("open {}", path.display()), e))?;
    let handle = std::thread::spawn(move || -> std::io::Result<T> {
        enter_thread(&file)?;
        f()
    });
    match handle.join() {
        Ok(result) => result.map_err(|e| io("run in netns".to_string(), e)),
        Err(_) => Err(io(
            "run in netns".to_string(),
            std::io::Error::other("thread panicked"),
        )),
    }
}

/// Moves the calling thread into the network namespace open as `file`
/// (a thread's network namespace is its own: use a dedicated thread).
pub fn enter_thread(file: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: a valid open fd; CLONE_NEWNET changes only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run_sync(netns: &str, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Io {
            netns: netns.to_string(),
            what: format!("start `ip {}`", args.join(" ")),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            netns: netns.to_string(),
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A network namespace a test made (blocking calls), deleted on drop.
#[derive(Debug)]
pub struct Scoped {
    /// Name under /run/netns.
    pub name: String,
}

impl Scoped {
    /// Creates the namespace with `lo` up, deleting a leftover of the same
    /// name first.
    pub fn create(name: &str) -> Result<Self> {
        let _ = run_sync(name, &["netns", "del", name]);
        run_sync(name, &["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run_sync(&self.name, &a)
    }

    /// A veth pair made in here, `local` here and `peer` moved straight into
    /// `other` (no device ever appears in the root namespace); both down.
    pub fn veth_to(&self, local: &str, other: &Scoped, peer: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            local,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &other.name,
        ])
    }

    /// /run/netns/NAME.
    pub fn path(&self) -> std::path::PathBuf {
        names::netns_path(&self.name)
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        let _ = run_sync(&self.name, &["netns", "del", &self.name]);
    }
}

/// Builds and tears down the topology of one [`Layout`].
#[derive(Debug, Clone, Default)]
pub struct Plumber {
    /// Names and roots.
    pub layout: Layout,
}

impl Plumber {
    /// A plumber for the given layout.
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    /// Creates the fabric netns with its bridge (idempotent).
    pub async fn ensure_fabric(&self) -> Result<()> {
        let fabric = self.layout.fabric_netns();
        add(&fabric).await?;
        let has_bridge = run(
            &fabric,
            "ip",
            &["-n", &fabric, "link", "show", names::FABRIC_BRIDGE],
            None,
        )
        .await
        .is_ok();
        if !has_bridge {
            ip_batch(
                &fabric,
                &[
                    format!("link add {} type bridge", names::FABRIC_BRIDGE),
                    format!("link set {} up", names::FABRIC_BRIDGE),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Plugs netns `inner` into the fabric: veth `fabric_if` (fabric side, on
    /// the bridge) ↔ `eth0` (inside `inner`, with `ip`/16). No routes beyond
    /// the connected one.
    async fn plug(&self, inner: &str, fabric_if: &str, ip: Ipv4Addr) -> Result<()> {
        let fabric = self.layout.fabric_netns();
        ip_batch(
            &fabric,
            &[
                format!(
                    "link add {fabric_if} type veth peer name {} netns {inner}",
                    names::INNER_IF
                ),
                format!("link set {fabric_if} master {} up", names::FABRIC_BRIDGE),
            ],
        )
        .await?;
        ip_batch(
            inner,
            &[
                format!(
                    "addr add {ip}/{} dev {}",
                    names::NODE_PREFIX,
                    names::INNER_IF
                ),
                format!("link set {} up", names::INNER_IF),
            ],
        )
        .await
    }

    /// Creates the control-plane netns on the fabric at 172.18.0.2 (idempotent).
    pub async fn ensure_cp(&self) -> Result<()> {
        let cp = self.layout.cp_netns();
        if exists(&cp) {
            return Ok(());
        }
        self.ensure_fabric().await?;
        add(&cp).await?;
        let ip: Ipv4Addr = names::CP_IP.parse().unwrap_or(Ipv4Addr::new(172, 18, 0, 2));
        self.plug(&cp, names::CP_FABRIC_VETH, ip).await
    }

    /// Creates the external client's netns on the fabric at
    /// [`names::EXT_IP`] (idempotent): a machine on the node network that is
    /// not a node. Its routes: the connected node network, and
    /// [`names::EXT_ROUTES`] (external and LoadBalancer IPs) via
    /// [`names::EXT_GATEWAY`]; no default route.
    pub async fn ensure_ext_client(&self) -> Result<()> {
        let ext = self.layout.ext_netns();
        if !exists(&ext) {
            self.ensure_fabric().await?;
            add(&ext).await?;
            let ip: Ipv4Addr = names::EXT_IP
                .parse()
                .unwrap_or(Ipv4Addr::new(172, 18, 0, 3));
            self.plug(&ext, names::EXT_FABRIC_VETH, ip).await?;
        }
        let routes: Vec<String> = names::EXT_ROUTES
            .iter()
            .map(|cidr| {
                format!(
                    "route replace {cidr} via {} dev {}",
                    names::EXT_GATEWAY,
                    names::INNER_IF
                )
            })
            .collect();
        ip_batch(&ext, &routes).await
    }

    /// Creates a node's netns on the fabric with its node IP and forwarding on
    /// (idempotent: an existing netns is left as it is).
    pub async fn ensure_node(&self, node: &str, ip: Ipv4Addr) -> Result<()> {
        let ns = self.layout.node_netns(node);
        if exists(&ns) {
            return Ok(());
        }
        self.ensure_fabric().await?;
        add(&ns).await?;
        self.plug(&ns, &names::node_fabric_veth(node), ip).await?;
        sysctl(&ns, "net/ipv4/ip_forward", "1").await
    }

    /// Dual-stack: gives a node's netns its IPv6 address on the fabric
    /// (`ip6`/64, no duplicate address detection) and IPv6 forwarding.
    pub async fn add_node_ip6(&self, node: &str, ip6: Ipv6Addr) -> Result<()> {
        let ns = self.layout.node_netns(node);
        no_dad(&ns).await?;
        sysctl(&ns, "net/ipv6/conf/all/forwarding", "1").await?;
        ip_batch(
            &ns,
            &[format!(
                "addr replace {ip6}/64 dev {} nodad",
                names::INNER_IF
            )],
        )
        .await
    }

    /// Makes the routes of netns `netns` to other nodes' pod CIDRs equal
    /// `want` (cidr → via), given what was programmed before (`have`). One
    /// family per call (IPv4 or IPv6 addresses).
    pub async fn sync_routes<A: std::fmt::Display + PartialEq>(
        &self,
        netns: &str,
        have: &BTreeMap<String, A>,
        want: &BTreeMap<String, A>,
    ) -> Result<()> {
        let mut lines = Vec::new();
        for (cidr, via) in want {
            if have.get(cidr) != Some(via) {
                lines.push(format!(
                    "route replace {cidr} via {via} dev {}",
                    names::INNER_IF
                ));
            }
        }
        for cidr in have.keys() {
            if !want.contains_key(cidr) {
                lines.push(format!("route del {cidr}"));
            }
        }
        ip_batch(netns, &lines).await
    }

    /// Creates a pod's netns wired to its node netns: `eth0` with `pod_ip/32`,
    /// routes to the pod, service and node networks via the node side
    /// (169.254.1.1) and no default route; on the node side a /32 route to the pod.
    pub async fn add_pod(&self, node: &str, uid: &str, pod_ip: Ipv4Addr) -> Result<String> {
        let node_ns = self.layout.node_netns(node);
        let pod_ns = self.layout.pod_netns(uid);
        let veth = names::pod_node_veth(uid);
        add(&pod_ns).await?;
        ip_batch(
            &node_ns,
            &[
                format!(
                    "link add {veth} type veth peer name {} netns {pod_ns}",
                    names::INNER_IF
                ),
                format!("addr add {}/32 dev {veth}", names::POD_GATEWAY),
                format!("link set {veth} up"),
                format!("route replace {pod_ip}/32 dev {veth} scope link"),
            ],
        )
        .await?;
        let gw = names::POD_GATEWAY;
        let dev = names::INNER_IF;
        ip_batch(
            &pod_ns,
            &[
                format!("addr add {pod_ip}/32 dev {dev}"),
                format!("link set {dev} up"),
                format!("route add {gw} dev {dev} scope link"),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip}",
                    names::POD_CIDR
                ),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip}",
                    names::SERVICE_CIDR
                ),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip}",
                    names::NODE_CIDR
                ),
            ],
        )
        .await?;
        Ok(pod_ns)
    }

    /// Dual-stack: gives a pod wired by [`Plumber::add_pod`] its IPv6 address
    /// (`pod_ip6`/128) with routes to the IPv6 pod, Service and node networks
    /// via the node side ([`names::POD_GATEWAY6`], link-local), and on the
    /// node side a /128 route to the pod. No default route.
    pub async fn add_pod_ip6(&self, node: &str, uid: &str, pod_ip6: Ipv6Addr) -> Result<()> {
        let node_ns = self.layout.node_netns(node);
        let pod_ns = self.layout.pod_netns(uid);
        let veth = names::pod_node_veth(uid);
        let gw = names::POD_GATEWAY6;
        let dev = names::INNER_IF;
        no_dad(&pod_ns).await?;
        ip_batch(
            &node_ns,
            &[
                format!("addr replace {gw}/64 dev {veth} nodad"),
                format!("route replace {pod_ip6}/128 dev {veth}"),
            ],
        )
        .await?;
        ip_batch(
            &pod_ns,
            &[
                format!("addr add {pod_ip6}/128 dev {dev} nodad"),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip6}",
                    names::POD_CIDR6
                ),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip6}",
                    names::SERVICE_CIDR6
                ),
                format!(
                    "route add {} via {gw} dev {dev} src {pod_ip6}",
                    names::NODE_CIDR6
                ),
            ],
        )
        .await
    }

    /// Removes a pod's netns (its veth pair goes with it).
    pub async fn remove_pod(&self, uid: &str) -> Result<()> {
        delete(&self.layout.pod_netns(uid)).await
    }

    /// Deletes every netns of this layout: pods first, then nodes, cp, fabric.
    pub async fn remove_all(&self) -> Vec<NetError> {
        let mut errors = Vec::new();
        let mut all = list(&self.layout.netns_prefix);
        let fabric = self.layout.fabric_netns();
        let rank = |n: &String| {
            if *n == fabric {
                2
            } else if n.starts_with(&format!("{}pod-", self.layout.netns_prefix)) {
                0
            } else {
                1
            }
        };
        all.sort_by_key(|n| (rank(n), n.clone()));
        for ns in all {
            if let Err(e) = delete(&ns).await {
                errors.push(e);
            }
        }
        // /etc/netns leftovers of namespaces that are already gone.
        if let Ok(dir) = std::fs::read_dir("/etc/netns") {
            for entry in dir.filter_map(|e| e.ok()) {
                let name = entry.file_name().to_string_lossy().to_string();
                if self.layout.owns_netns(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        errors
    }
}
