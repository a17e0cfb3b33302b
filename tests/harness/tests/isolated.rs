//! Tests with a second podnet of their own (own netns prefix, cgroup root and
//! bpffs root, limited to the test's namespace and to pods handed to it with
//! the netboot.io/podnet-owner annotation), so they can change what a podnet
//! sees (kube-proxy pods, agents, crashes, shutdown) without touching the
//! cluster's own podnet or what other tests on the shared cluster rely on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use netboot_harness::cluster::{
    client_pod, owned_deployment, owned_pod, probe_deployment, probe_service, realized_in,
    wait_for, wait_terminated, workspace_bin, IsolatedPodnet, SharedCluster, TestNamespace,
};
use netboot_harness::names::{self, Layout};
use netboot_harness::podnet::{self, Options};
use netboot_harness::{cgroup, netns};

fn root_veths() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "type", "veth"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn podnet_shutdown_removes_every_netns_veth_and_cgroup() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "shutdown").await;
    let id = std::process::id() % 100_000;
    let layout = Layout {
        netns_prefix: format!("nbs{id}-"),
        cgroup_root: format!("/sys/fs/cgroup/unified/netboot-test-s{id}").into(),
        bpffs_root: format!("/sys/fs/bpf/netboot-test-s{id}").into(),
    };
    let state = tempfile::tempdir().unwrap();
    let probe = workspace_bin("netboot-probe");
    let mut opts = Options::new(
        cluster.kubeconfig.clone(),
        state.path().into(),
        probe.parent().unwrap().into(),
    );
    opts.layout = layout.clone();
    opts.namespace = Some(ns.name.clone());
    let veths_before = root_veths();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(podnet::run(opts, async move {
        let _ = stop_rx.await;
    }));

    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    let prefix = layout.netns_prefix.clone();
    deploys
        .create(
            &PostParams::default(),
            &owned_deployment(probe_deployment("srv", 2), &prefix),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    pods.create(
        &PostParams::default(),
        &owned_pod(client_pod("sleeper", None, "sleep 600"), &prefix),
    )
    .await
    .unwrap();
    let realized = wait_for(
        "3 pods realized by the test's podnet",
        Duration::from_secs(120),
        || async {
            let list = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let n = list
                .items
                .iter()
                .filter(|p| realized_in(&layout, p))
                .count();
            if n == 3 {
                Ok(list.items)
            } else {
                Err(format!("{n} of {} realized", list.items.len()))
            }
        },
    )
    .await;
    let made = netns::list(&layout.netns_prefix);
    assert!(
        made.contains(&layout.fabric_netns()) && made.contains(&layout.cp_netns()),
        "{made:?}"
    );
    assert!(
        made.len() >= 6,
        "pods, cp, fabric and at least one node: {made:?}"
    );
    let procs = cgroup::procs_recursive(&layout.cgroup_root);
    assert!(
        procs.len() >= 3,
        "processes in {}: {procs:?}",
        layout.cgroup_root.display()
    );
    assert_eq!(
        root_veths(),
        veths_before,
        "podnet put a veth into the root netns"
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("podnet stops within 60s")
        .unwrap()
        .unwrap();

    assert_eq!(
        netns::list(&layout.netns_prefix),
        Vec::<String>::new(),
        "netns left behind"
    );
    assert!(
        !layout.cgroup_root.exists(),
        "cgroup tree {} left behind",
        layout.cgroup_root.display()
    );
    for p in &realized {
        let uid = p.metadata.uid.as_deref().unwrap();
        assert!(
            !names::netns_etc(&layout.pod_netns(uid)).exists(),
            "/etc/netns dir left for {uid}"
        );
    }
    for pid in procs {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        assert!(
            status.is_empty() || zombie,
            "process {pid} still runs: {status}"
        );
    }
    assert_eq!(root_veths(), veths_before);
    let pid_files = std::fs::read_dir(state.path().join("podnet/pids"))
        .unwrap()
        .count();
    assert_eq!(pid_files, 0, "pid records left");
}

const WAIT: Duration = Duration::from_secs(120);

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap()
}

async fn realized_pods(
    client: &kube::Client,
    ns: &str,
    layout: &Layout,
    want: usize,
) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let ok: Vec<Pod> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && realized_in(layout, p))
        .collect();
    if ok.len() == want {
        Ok(ok)
    } else {
        Err(format!("{} of {want} realized", ok.len()))
    }
}

/// After a crash (SIGKILL) podnet's children die with it (parent-death
/// signal) while its netns and cgroups stay; the next podnet removes them at
/// start, realizes the pods afresh, and its SIGTERM shutdown leaves nothing.
#[tokio::test]
async fn podnet_restart_after_a_crash_cleans_up_and_rebuilds() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "crash").await;
    let mut podnet = IsolatedPodnet::start(&cluster, &ns.name, "r");
    let layout = podnet.layout.clone();
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    let d = owned_deployment(probe_deployment("srv", 2), &layout.netns_prefix);
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let procs = |want: usize| {
        let (client, ns, layout) = (cluster.client.clone(), ns.name.clone(), layout.clone());
        async move {
            realized_pods(&client, &ns, &layout, want).await?;
            let procs = cgroup::procs_recursive(&layout.cgroup_root);
            if procs.len() == want {
                Ok(procs)
            } else {
                Err(format!("processes {procs:?}"))
            }
        }
    };
    let old = wait_for("2 pods realized by the first podnet", WAIT, || procs(2)).await;
    let stale = netns::list(&layout.netns_prefix);

    podnet.crash();
    wait_for(
        "the children to die with podnet",
        Duration::from_secs(10),
        || async {
            let alive: Vec<&i32> = old
                .iter()
                .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
                .collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("{alive:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        netns::list(&layout.netns_prefix),
        stale,
        "netns stay after a crash"
    );

    podnet.spawn(&cluster, &ns.name);
    let new = wait_for("2 pods realized again by the second podnet", WAIT, || {
        procs(2)
    })
    .await;
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "fresh processes: {old:?} vs {new:?}"
    );

    let status = podnet.stop().unwrap();
    assert!(
        status.success(),
        "podnet exited with {status}:\n{}",
        podnet.log()
    );
    assert_eq!(
        netns::list(&layout.netns_prefix),
        Vec::<String>::new(),
        "netns left behind:\n{}",
        podnet.log()
    );
    assert!(
        !layout.cgroup_root.exists(),
        "cgroups left behind:\n{}",
        podnet.log()
    );
}

/// The nat table of a netns; with `counters`, rules start with `[packets:bytes] `.
fn iptables_nat_with(netns: &str, counters: bool) -> String {
    let mut args = vec!["netns", "exec", netns, "iptables-nft-save", "-t", "nat"];
    if counters {
        args.push("-c");
    }
    let out = std::process::Command::new("ip")
        .args(&args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn iptables_nat(netns: &str) -> String {
    iptables_nat_with(netns, false)
}

/// kube-proxy emulation: with a kube-proxy pod on its node, a client reaches a
/// ClusterIP over TCP and UDP through the KUBE-* rules podnet wrote into the
/// node netns (their packet counters move: nothing else translates in this
/// podnet's world). When the kube-proxy pod goes, the rules stay and stop
/// following the Service, as a real kube-proxy's do.
#[tokio::test]
async fn kube_proxy_rules_carry_cluster_ip_traffic_and_stay_when_kube_proxy_goes() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "kube-proxy").await;
    let podnet = IsolatedPodnet::start(&cluster, &ns.name, "k");
    let prefix = podnet.layout.netns_prefix.clone();
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    deploys
        .create(
            &PostParams::default(),
            &owned_deployment(probe_deployment("web", 3), &prefix),
        )
        .await
        .unwrap();
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(cluster.client.clone(), &ns.name)
        .create(&PostParams::default(), &probe_service("web", "web"))
        .await
        .unwrap();
    let probes = wait_for("3 probes realized", WAIT, || {
        realized_pods(&cluster.client, &ns.name, &podnet.layout, 3)
    })
    .await;
    let node = probes[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    let node_ns = podnet.layout.node_netns(&node);

    // This podnet's "kube-proxy" on the node (kwok runs it on paper).
    let kube_proxy: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-proxy-test", "labels": {"k8s-app": "kube-proxy"}},
        "spec": {"nodeName": node, "hostNetwork": true, "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.36.3",
                                 "command": ["/usr/local/bin/kube-proxy"]}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    pods.create(&PostParams::default(), &owned_pod(kube_proxy, &prefix))
        .await
        .unwrap();
    let svc =
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(cluster.client.clone(), &ns.name)
            .get("web")
            .await
            .unwrap();
    let cip = svc.spec.unwrap().cluster_ip.unwrap();
    let tcp_chain =
        netboot_harness::kubeproxy_rules::service_chain(&format!("{}/web:tcp", ns.name), "tcp");
    let rules = wait_for(
        "KUBE-SVC chain with 3 endpoints in the node netns",
        WAIT,
        || async {
            let save = iptables_nat(&node_ns);
            let n = save
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("-A {tcp_chain} ")) && l.contains("-j KUBE-SEP-")
                })
                .count();
            if n == 3 {
                Ok(save)
            } else {
                Err(format!("{n} endpoints"))
            }
        },
    )
    .await;
    assert!(rules.contains(&format!("-d {cip}/32 -p tcp")), "{rules}");

    let script = format!(
        "for i in $(seq 1 20); do \
           if netboot-probe connect tcp {cip}:80 --count 3 > $TERMINATION_LOG \
              && netboot-probe connect udp {cip}:81 >> $TERMINATION_LOG; then exit 0; fi; sleep 0.5; done; exit 1"
    );
    pods.create(
        &PostParams::default(),
        &owned_pod(client_pod("vip-client", Some(&node), &script), &prefix),
    )
    .await
    .unwrap();
    let (code, message) = wait_terminated(&cluster.client, &ns.name, "vip-client", WAIT).await;
    assert_eq!(
        code,
        0,
        "client could not reach {cip}: {message}\n{}",
        podnet.log()
    );
    let names: Vec<String> = probes.iter().map(pod_name).collect();
    assert_eq!(message.lines().count(), 4, "{message}");
    assert!(
        message.lines().all(|l| names.iter().any(|n| n == l)),
        "{message} vs {names:?}"
    );
    // The translation was iptables': the jump to the service chain counted packets.
    let counted = iptables_nat_with(&node_ns, true)
        .lines()
        .filter(|l| l.contains(&format!("-j {tcp_chain}")))
        .any(|l| !l.starts_with("[0:0]"));
    assert!(counted, "no packets through {tcp_chain}");

    // kube-proxy goes: its rules stay and no longer follow the Service.
    pods.delete("kube-proxy-test", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the kube-proxy pod gone", WAIT, || async {
        match pods.get_opt("kube-proxy-test").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.is_some()))),
        }
    })
    .await;
    let mut d = deploys.get("web").await.unwrap();
    d.spec.as_mut().unwrap().replicas = Some(1);
    d.metadata.managed_fields = None;
    deploys
        .replace("web", &PostParams::default(), &d)
        .await
        .unwrap();
    wait_for("the Deployment down to 1 pod", WAIT, || {
        realized_pods(&cluster.client, &ns.name, &podnet.layout, 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = iptables_nat(&node_ns);
    let n = after
        .lines()
        .filter(|l| l.starts_with(&format!("-A {tcp_chain} ")) && l.contains("-j KUBE-SEP-"))
        .count();
    assert_eq!(n, 3, "rules changed after kube-proxy left:\n{after}");
}

const STAND_IN: &str = r#"#!/usr/bin/python3
# Stand-in for `netboot-datapath agent`: records its arguments and cgroup,
# serves /readyz (503 while the file `unready` exists) and notes SIGTERM.
import http.server, os, signal, sys
d = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
open(os.path.join(d, "args"), "w").write("\n".join(args))
open(os.path.join(d, "cgroup"), "w").write(open("/proc/self/cgroup").read())
open(os.path.join(d, "netns"), "w").write(str(os.stat("/proc/self/ns/net").st_ino))
def term(*_):
    open(os.path.join(d, "terminated"), "w").write("SIGTERM")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
host, port = args[args.index("--listen") + 1].rsplit(":", 1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = not os.path.exists(os.path.join(d, "unready"))
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"ok" if ok else b"not ready")
    def log_message(self, *a):
        pass
http.server.HTTPServer((host, int(port)), H).serve_forever()
"#;

fn pod_ready(p: &Pod) -> Option<bool> {
    let conds = p.status.as_ref()?.conditions.as_ref()?;
    conds
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

/// Agent pods: podnet runs the agent (here a stand-in, via the
/// netboot.io/podnet-binary annotation) in the node's netns and cgroup with
/// the node's pins dir, mirrors /readyz into the pod's Ready condition, and
/// SIGTERMs the agent when the pod is deleted.
#[tokio::test]
async fn agent_pod_runs_in_node_cgroup_and_readiness_follows_readyz() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "agent").await;
    let podnet = IsolatedPodnet::start(&cluster, &ns.name, "a");
    let layout = podnet.layout.clone();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent-stand-in");
    std::fs::write(&script, STAND_IN).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent-config"},
        "data": {"config.yaml": "apiServer: {host: \"127.0.0.1\", port: 6443}\nkubeProxyReplacement: true\n"}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(cluster.client.clone(), &ns.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let node = "node-0";
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "agent",
            "labels": {"app.kubernetes.io/name": "netboot-datapath"},
            "annotations": {"netboot.io/podnet-binary": script.display().to_string()}
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "agent", "image": "netboot-datapath:test",
                            "command": ["netboot-datapath", "agent"],
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/netboot"}]}],
            "volumes": [{"name": "config", "configMap": {"name": "agent-config"}}]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    pods.create(
        &PostParams::default(),
        &owned_pod(pod, &layout.netns_prefix),
    )
    .await
    .unwrap();

    let ready = |want: bool| {
        let pods = pods.clone();
        async move {
            let p = pods.get("agent").await.map_err(|e| e.to_string())?;
            match pod_ready(&p) {
                Some(r) if r == want => Ok(p),
                r => Err(format!("Ready={r:?}")),
            }
        }
    };
    let p = wait_for("the agent pod Ready", WAIT, || ready(true)).await;
    let status = p.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert!(
        status
            .pod_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("172.18.")),
        "{:?}",
        status.pod_ip
    );
    assert_eq!(status.pod_ip, status.host_ip);

    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    let flag = |f: &str| args[args.iter().position(|a| *a == f).unwrap() + 1].to_string();
    assert_eq!(args[0], "agent");
    assert_eq!(flag("--node-name"), node);
    assert_eq!(
        flag("--cgroup"),
        layout.node_cgroup(node).display().to_string()
    );
    assert_eq!(
        flag("--bpffs"),
        layout.node_bpffs(node).display().to_string()
    );
    // A hostNetwork pod: the node's netns (so no --rules-netns).
    assert!(!args.contains(&"--rules-netns"), "{args:?}");
    use std::os::unix::fs::MetadataExt;
    let node_netns = std::fs::metadata(names::netns_path(&layout.node_netns(node)))
        .unwrap()
        .ino();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("netns")).unwrap(),
        node_netns.to_string(),
        "the agent runs in the node's netns"
    );
    assert_eq!(
        flag("--kubeconfig"),
        cluster.kubeconfig.display().to_string()
    );
    assert!(std::fs::read_to_string(flag("--config"))
        .unwrap()
        .contains("kubeProxyReplacement: true"));
    let cgroup_line = format!(
        "0::/{}\n",
        layout
            .node_cgroup(node)
            .strip_prefix("/sys/fs/cgroup/unified/")
            .unwrap()
            .display()
    );
    let cgroup = std::fs::read_to_string(dir.path().join("cgroup")).unwrap();
    assert!(
        cgroup.contains(&cgroup_line),
        "{cgroup} (want {cgroup_line})"
    );

    std::fs::write(dir.path().join("unready"), "").unwrap();
    wait_for("the agent pod not Ready", Duration::from_secs(30), || {
        ready(false)
    })
    .await;
    std::fs::remove_file(dir.path().join("unready")).unwrap();
    wait_for("the agent pod Ready again", Duration::from_secs(30), || {
        ready(true)
    })
    .await;

    pods.delete("agent", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("SIGTERM to the agent and the pod gone", WAIT, || async {
        let gone = matches!(pods.get_opt("agent").await, Ok(None));
        let term = dir.path().join("terminated").exists();
        if gone && term {
            Ok(())
        } else {
            Err(format!("gone={gone} terminated={term}"))
        }
    })
    .await;
}
