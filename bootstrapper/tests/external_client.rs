//! Traffic from outside the cluster, on the local real cluster: the
//! external client (podnet's `nb-ext`, 172.18.0.3 on the node fabric, in no
//! Node object; routes only to the node network and, via node-0, to the
//! external/LoadBalancer test ranges) connects to node ports, an external IP
//! and a LoadBalancer IP, and a probe backend says which source address it
//! sees. The same cases run twice: while the real kube-proxy serves (the
//! baseline), then after `netboot apply clusters/local.yaml` took over
//! (replace mode). The first run must show kube-proxy's documented
//! behaviour; the second must equal the first (parity), every difference
//! listed — except the one netboot makes on purpose ([`netboot_differs`]:
//! an externalTrafficPolicy Cluster flow to a backend on the node asked keeps
//! the client's address).
//!
//! A cluster-wide change (the handover), so it runs as a `scenario` (one at a
//! time across test binaries, from and back to the baseline).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{indent, scenario, Run};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use netboot_harness::cluster::{
    probe_pod, realized, repo_root, wait_for, SharedCluster, TestNamespace,
};
use netboot_harness::external::{self, NoAnswer};
use netboot_harness::names::{self, Layout};
use serde_json::json;

/// The backend every Service selects, on [`BACKEND_NODE`].
const BACKEND: &str = "ext-be";
const BACKEND_NODE: &str = "node-0";
/// A probe pod on node-1 that no Service selects: it makes podnet realize
/// node-1 (its netns, kube-proxy, later its agent) without giving it a
/// local endpoint.
const IDLE: &str = "ext-idle";
/// The eTP=Cluster Service's external IP (routed by the client via node-0).
const EXTERNAL_IP: &str = "203.0.113.10";
/// The eTP=Local LoadBalancer Service's ingress IP (routed via node-0).
const LB_IP: &str = "198.51.100.10";
/// How long one connection attempt may take; a dropped SYN is this long.
const CONNECT: Duration = Duration::from_secs(2);

/// What the external client got for one case.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A backend answered and saw this source address.
    Answered {
        backend: String,
        source: IpAddr,
    },
    /// The SYN went unanswered (dropped).
    TimedOut,
    Refused,
    /// A healthCheckNodePort's answer: status and `localEndpoints`.
    Health {
        status: u16,
        local_endpoints: i64,
    },
    Failed(String),
}

/// The addresses a source can be, to say whose it is.
#[derive(Clone)]
struct Addresses {
    nodes: BTreeMap<IpAddr, String>,
}

impl Addresses {
    /// Who a source address stands for, for the parity comparison: the
    /// client, or a node (its InternalIP; 169.254.1.1, the node side of
    /// every pod's veth, is the backend's own node, [`BACKEND_NODE`]). So a
    /// masquerade to the node counts the same whichever of the node's
    /// addresses it picked; the table shows the exact address.
    fn owner(&self, ip: IpAddr) -> String {
        if ip.to_string() == names::EXT_IP {
            return "the external client".into();
        }
        if ip.to_string() == names::POD_GATEWAY {
            return BACKEND_NODE.into();
        }
        self.nodes
            .get(&ip)
            .cloned()
            .unwrap_or_else(|| format!("unknown {ip}"))
    }

    /// An outcome as the parity comparison sees it.
    fn parity(&self, o: &Outcome) -> String {
        match o {
            Outcome::Answered { backend, source } => {
                format!("{backend} saw {}", self.owner(*source))
            }
            other => format!("{other:?}"),
        }
    }

    fn whose(&self, ip: IpAddr) -> String {
        if ip.to_string() == names::EXT_IP {
            return "the external client".into();
        }
        if ip.to_string() == names::POD_GATEWAY {
            return "the node side of the backend's veth".into();
        }
        match self.nodes.get(&ip) {
            Some(n) => format!("{n}'s InternalIP"),
            None => "unknown".into(),
        }
    }
}

struct Shown<'a>(&'a Outcome, &'a Addresses);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Outcome::Answered { backend, source } => {
                write!(f, "{backend} saw {source} ({})", self.1.whose(*source))
            }
            Outcome::TimedOut => write!(f, "timed out (dropped)"),
            Outcome::Refused => write!(f, "refused"),
            Outcome::Health {
                status,
                local_endpoints,
            } => write!(f, "HTTP {status}, localEndpoints {local_endpoints}"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// What kube-proxy does with a case (its v1.36 iptables and nftables rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KubeProxy {
    /// externalTrafficPolicy Cluster: every external packet is marked for
    /// masquerade (`KUBE-EXT-…` → `KUBE-MARK-MASQ`), whichever node the
    /// backend is on, and MASQUERADE takes the address of the interface
    /// the packet leaves by. Backend on the node asked: its veth, whose node
    /// side podnet addresses 169.254.1.1 ([`names::POD_GATEWAY`]; on a real
    /// cluster the CNI decides, e.g. cni0's address).
    MasqueradedToVeth,
    /// externalTrafficPolicy Cluster, backend on another node: masqueraded to
    /// the node asked's InternalIP (eth0, towards the other node).
    MasqueradedTo(IpAddr),
    /// externalTrafficPolicy Local with an endpoint on the node asked: no
    /// masquerade, the backend sees the client's own address.
    ClientKept,
    /// externalTrafficPolicy Local, no endpoint on the node asked: "has no
    /// local endpoints" → DROP (not REJECT): the connection times out.
    Dropped,
    /// A healthCheckNodePort: status and `localEndpoints`.
    Health(u16, i64),
}

/// One thing the external client tries.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    target: SocketAddr,
    kube_proxy: KubeProxy,
}

fn observe(case: &Case) -> Outcome {
    let from = Layout::default().ext_netns();
    if let KubeProxy::Health(..) = case.kube_proxy {
        return match external::http_get(&from, case.target, CONNECT) {
            None => Outcome::Failed(format!("no HTTP answer from {}", case.target)),
            Some((status, body)) => {
                let n = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["localEndpoints"].as_i64())
                    .unwrap_or(-1);
                Outcome::Health {
                    status,
                    local_endpoints: n,
                }
            }
        };
    }
    match external::peer_seen(&from, case.target, CONNECT) {
        Ok(seen) => Outcome::Answered {
            backend: seen.name,
            source: seen.source,
        },
        Err(NoAnswer::TimedOut) => Outcome::TimedOut,
        Err(NoAnswer::Refused) => Outcome::Refused,
        Err(NoAnswer::Other(e)) => Outcome::Failed(e),
    }
}

/// Each case observed until `settled` accepts it (rules and listeners take
/// a moment after a change) or `timeout` passes: the last outcome.
fn observe_all(
    cases: &[Case],
    settled: impl Fn(&Case, &Outcome) -> bool,
    timeout: Duration,
) -> Vec<Outcome> {
    cases
        .iter()
        .map(|case| {
            let start = Instant::now();
            loop {
                let o = observe(case);
                if settled(case, &o) || start.elapsed() > timeout {
                    return o;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
        .collect()
}

fn table(cases: &[Case], outcomes: &[Outcome], a: &Addresses) -> String {
    cases
        .iter()
        .zip(outcomes)
        .map(|(c, o)| format!("  {:<44} {:<22} {}", c.name, c.target, Shown(o, a)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether an outcome is what kube-proxy does with the case; why not.
fn kube_proxy_says(case: &Case, o: &Outcome) -> Result<(), String> {
    let client: IpAddr = names::EXT_IP.parse().unwrap();
    let gw: IpAddr = names::POD_GATEWAY.parse().unwrap();
    let answered = || match o {
        Outcome::Answered { backend, source } if backend == BACKEND => Ok(*source),
        other => Err(format!("want an answer from {BACKEND}, got {other:?}")),
    };
    match case.kube_proxy {
        KubeProxy::MasqueradedToVeth => {
            let s = answered()?;
            (s == gw).then_some(()).ok_or(format!(
                "want masquerade to the backend's veth ({gw}), saw {s}"
            ))
        }
        KubeProxy::MasqueradedTo(node) => {
            let s = answered()?;
            (s == node).then_some(()).ok_or(format!(
                "want masquerade to the node asked ({node}), saw {s}"
            ))
        }
        KubeProxy::ClientKept => {
            let s = answered()?;
            (s == client)
                .then_some(())
                .ok_or(format!("want the client's own {client}, saw {s}"))
        }
        KubeProxy::Dropped => (*o == Outcome::TimedOut)
            .then_some(())
            .ok_or(format!("want a drop (timeout), got {o:?}")),
        KubeProxy::Health(status, n) => (*o
            == Outcome::Health {
                status,
                local_endpoints: n,
            })
        .then_some(())
        .ok_or(format!("want {status} with localEndpoints {n}, got {o:?}")),
    }
}

/// What netboot does with a case where it deliberately differs from
/// kube-proxy (None: exactly as kube-proxy), as the parity comparison
/// sees it. The one difference, specified by the north–south issue and
/// documented in datapath/README.md ("Per-packet path"): under
/// externalTrafficPolicy Cluster a backend on the node asked is DNATed only,
/// so it sees the client's own address where kube-proxy masquerades (as
/// Cilium does). No flow is refused or lost by it.
fn netboot_differs(case: &Case) -> Option<String> {
    (case.kube_proxy == KubeProxy::MasqueradedToVeth)
        .then(|| format!("{BACKEND} saw the external client"))
}

/// The parity string netboot's outcome must have for a case.
fn netboot_wants(case: &Case, kube_proxy: &Outcome, a: &Addresses) -> String {
    netboot_differs(case).unwrap_or_else(|| a.parity(kube_proxy))
}

fn netboot(c: &SharedCluster, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_netboot"))
        .args(args)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .current_dir(repo_root())
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    eprintln!(
        "$ netboot {}\n  exit {}\n{}\n{}",
        args.join(" "),
        run.code,
        indent(&run.stdout),
        indent(&run.stderr)
    );
    run
}

fn internal_ip(n: &Node) -> Option<IpAddr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4))
}

fn port_of(svc: &Service, field: &str) -> u16 {
    let spec = svc.spec.as_ref().unwrap();
    let p = match field {
        "health" => spec.health_check_node_port,
        _ => spec.ports.as_ref().unwrap()[0].node_port,
    };
    u16::try_from(
        p.unwrap_or_else(|| panic!("Service {:?} has no {field} port", svc.metadata.name)),
    )
    .unwrap()
}

/// From the external client to node InternalIP:nodePort (and an external
/// IP, a LoadBalancer IP, each node's healthCheckNodePort): what the backend
/// sees while kube-proxy serves, and the same after netboot took over.
#[test]
fn external_client_sees_the_same_before_and_after_the_handover() {
    assert_eq!(
        netboot::probe::PEER_QUERY,
        external::PEER_QUERY,
        "the harness asks the probe server's own peer query"
    );
    scenario(|c| async move {
        let ext = Layout::default().ext_netns();
        assert!(
            netboot_harness::netns::exists(&ext),
            "podnet made no external client netns {ext} (tests/cluster/up starts podnet; an older podnet?)"
        );
        let nodes: Api<Node> = Api::all(c.client.clone());
        let ips: BTreeMap<String, IpAddr> = nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, internal_ip(n)?)))
            .collect();
        let (Some(&node0), Some(&node1)) = (ips.get("node-0"), ips.get("node-1")) else {
            panic!("needs node-0 and node-1 with IPv4 InternalIPs, found {ips:?}");
        };
        assert_eq!(
            node0.to_string(),
            names::EXT_GATEWAY,
            "the client routes the test ranges via node-0"
        );
        let addresses = Addresses {
            nodes: ips.iter().map(|(n, ip)| (*ip, n.clone())).collect(),
        };

        let ns = TestNamespace::new(&c, "external-client").await;
        let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
        for (name, node) in [(BACKEND, BACKEND_NODE), (IDLE, "node-1")] {
            pods.create(&PostParams::default(), &probe_pod(name, name, node))
                .await
                .unwrap();
        }
        wait_for(
            "both probe pods realized",
            Duration::from_secs(90),
            || async {
                let list = pods
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let n = list.items.iter().filter(|p| realized(p)).count();
                (n == 2).then_some(()).ok_or(format!("{n} of 2 realized"))
            },
        )
        .await;

        let svcs: Api<Service> = Api::namespaced(c.client.clone(), &ns.name);
        let cluster: Service = serde_json::from_value(json!({
            "metadata": {"name": "ext-cluster"},
            "spec": {
                "type": "NodePort",
                "externalTrafficPolicy": "Cluster",
                "externalIPs": [EXTERNAL_IP],
                "selector": {"app": BACKEND},
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
            }
        }))
        .unwrap();
        let local: Service = serde_json::from_value(json!({
            "metadata": {"name": "ext-local"},
            "spec": {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "selector": {"app": BACKEND},
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
            }
        }))
        .unwrap();
        let cluster = svcs.create(&PostParams::default(), &cluster).await.unwrap();
        let local = svcs.create(&PostParams::default(), &local).await.unwrap();
        // No cloud controller here: the test is the load balancer's provider.
        svcs.patch_status(
            "ext-local",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}})),
        )
        .await
        .unwrap();
        let (np_cluster, np_local, health) = (
            port_of(&cluster, "node"),
            port_of(&local, "node"),
            port_of(&local, "health"),
        );
        let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
        let external_ip: IpAddr = EXTERNAL_IP.parse().unwrap();
        let lb_ip: IpAddr = LB_IP.parse().unwrap();
        use KubeProxy::*;
        let cases = vec![
            Case {
                name: "cluster/node-0 (local backend)",
                target: at(node0, np_cluster),
                kube_proxy: MasqueradedToVeth,
            },
            Case {
                name: "cluster/node-1 (remote backend)",
                target: at(node1, np_cluster),
                kube_proxy: MasqueradedTo(node1),
            },
            Case {
                name: "cluster/external IP via node-0 (local backend)",
                target: at(external_ip, 80),
                kube_proxy: MasqueradedToVeth,
            },
            Case {
                name: "local/node-0 (local endpoint)",
                target: at(node0, np_local),
                kube_proxy: ClientKept,
            },
            Case {
                name: "local/LoadBalancer IP via node-0 (local endpoint)",
                target: at(lb_ip, 80),
                kube_proxy: ClientKept,
            },
            Case {
                name: "local/node-1 (no local endpoint)",
                target: at(node1, np_local),
                kube_proxy: Dropped,
            },
            Case {
                name: "local/healthCheckNodePort node-0",
                target: at(node0, health),
                kube_proxy: Health(200, 1),
            },
            Case {
                name: "local/healthCheckNodePort node-1",
                target: at(node1, health),
                kube_proxy: Health(503, 0),
            },
        ];

        // 1. The real kube-proxy serves (the scenario's baseline).
        let settle = Duration::from_secs(60);
        let cases2 = cases.clone();
        let kp = tokio::task::spawn_blocking(move || {
            observe_all(&cases2, |case, o| kube_proxy_says(case, o).is_ok(), settle)
        })
        .await
        .unwrap();
        eprintln!(
            "external client {} → (kube-proxy serving):\n{}",
            names::EXT_IP,
            table(&cases, &kp, &addresses)
        );
        let wrong: Vec<String> = cases
            .iter()
            .zip(&kp)
            .filter_map(|(case, o)| {
                kube_proxy_says(case, o)
                    .err()
                    .map(|e| format!("{}: {e}", case.name))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "kube-proxy did not do what kube-proxy does:\n{}",
            wrong.join("\n")
        );

        // 2. netboot takes over.
        let run = netboot(&c, &["apply", "-o", "json", "clusters/local.yaml"]);
        assert_eq!(run.code, 0, "netboot apply (replace) failed");
        let (ds, _) = common::kube_proxy(&c.client).await;
        assert!(ds.is_none(), "kube-proxy must be gone after the handover");

        let (cases2, kp2, addr2) = (cases.clone(), kp.clone(), addresses.clone());
        let nb = tokio::task::spawn_blocking(move || {
            observe_all(
                &cases2,
                |case, o| {
                    let i = cases2.iter().position(|c| c.name == case.name).unwrap();
                    addr2.parity(o) == netboot_wants(case, &kp2[i], &addr2)
                },
                // apply returned after validation reached node ports from
                // a pod: the agents' programs are in place.
                Duration::from_secs(10),
            )
        })
        .await
        .unwrap();
        eprintln!(
            "external client {} → (netboot serving):\n{}",
            names::EXT_IP,
            table(&cases, &nb, &addresses)
        );
        let differ: Vec<String> = cases
            .iter()
            .zip(kp.iter().zip(&nb))
            .filter(|(case, (k, n))| addresses.parity(n) != netboot_wants(case, k, &addresses))
            .map(|(case, (k, n))| {
                format!(
                    "{} ({}): kube-proxy: {}; netboot: {} (want: {})",
                    case.name,
                    case.target,
                    Shown(k, &addresses),
                    Shown(n, &addresses),
                    netboot_wants(case, k, &addresses)
                )
            })
            .collect();
        for case in cases.iter().filter(|c| netboot_differs(c).is_some()) {
            eprintln!(
                "documented difference: {}: netboot keeps the client's address (local backend, DNAT only)",
                case.name
            );
        }
        assert!(
            differ.is_empty(),
            "netboot differs from kube-proxy for traffic from outside:\n{}",
            differ.join("\n")
        );
        drop(ns);
    });
}
