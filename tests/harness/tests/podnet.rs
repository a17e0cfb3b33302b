//! podnet on the shared local cluster (root; starts it with tests/cluster/up
//! when it is not running). Each test works in its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use netboot_harness::cluster::{
    client_pod, exec_in_pod, probe_deployment, probe_service, realized, wait_deployment_realized, wait_for,
    wait_terminated, SharedCluster, TestNamespace,
};
use netboot_harness::names;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap()
}

fn ip(p: &Pod) -> String {
    p.status.as_ref().unwrap().pod_ip.clone().unwrap()
}

fn node(p: &Pod) -> String {
    p.spec.as_ref().unwrap().node_name.clone().unwrap()
}

/// A probe Deployment spread over nodes (one pod per node when it can).
fn spread_probe(app: &str, replicas: i32) -> Deployment {
    let mut d = serde_json::to_value(probe_deployment(app, replicas)).unwrap();
    d["spec"]["template"]["spec"]["topologySpreadConstraints"] = json!([{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": app}}
    }]);
    serde_json::from_value(d).unwrap()
}

async fn create_probe(cluster: &SharedCluster, ns: &str, app: &str, replicas: i32) -> Vec<Pod> {
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    deploys.create(&PostParams::default(), &spread_probe(app, replicas)).await.unwrap();
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), ns);
    services.create(&PostParams::default(), &probe_service(app, app)).await.unwrap();
    wait_deployment_realized(&cluster.client, ns, app, WAIT).await
}

async fn run_client(cluster: &SharedCluster, ns: &str, pod: Pod) -> (i32, String) {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let n = name(&pod);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_terminated(&cluster.client, ns, &n, WAIT).await
}

/// The issue's "done when": a podnet client reaches each of 3 probe pods by
/// pod IP (across nodes) over TCP and UDP and gets each pod's name back; the
/// client's exit and output come back through the pod status.
#[tokio::test]
async fn client_pod_reaches_every_probe_pod_by_ip_over_tcp_and_udp() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "probe-by-ip").await;
    let probes = create_probe(&cluster, &ns.name, "probe", 3).await;
    let nodes: BTreeSet<String> = probes.iter().map(node).collect();

    let mut script = String::from("set -e\n");
    for p in &probes {
        script += &format!(
            "netboot-probe connect tcp {ip}:8080 >> $TERMINATION_LOG\nnetboot-probe connect udp {ip}:8081 >> $TERMINATION_LOG\n",
            ip = ip(p)
        );
    }
    // Retried as a whole: kwok reports the pods Running before their servers listen.
    let script = format!(
        "for i in $(seq 1 20); do : > $TERMINATION_LOG; if ( {script} ); then exit 0; fi; sleep 0.5; done; exit 1"
    );
    let client_node = node(&probes[0]);
    let (code, message) = run_client(&cluster, &ns.name, client_pod("client", Some(&client_node), &script)).await;
    let want: Vec<String> = probes.iter().flat_map(|p| [name(p), name(p)]).collect();
    assert_eq!(code, 0, "client failed; message: {message}");
    assert_eq!(message.lines().collect::<Vec<_>>(), want, "names from {nodes:?} (client on {client_node})");

    // exec_in_pod: the same from inside a probe pod, pod -> pod.
    let out = exec_in_pod(
        &probes[0],
        &["netboot-probe", "connect", "tcp", &format!("{}:8080", ip(&probes[2])), "--count", "2"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{0}\n{0}\n", name(&probes[2])));
}

/// A failing client reports phase Failed, its exit code and its termination log.
#[tokio::test]
async fn failing_client_reports_exit_code_and_message() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "client-fails").await;
    let (code, message) = run_client(
        &cluster,
        &ns.name,
        client_pod("fails", None, "echo \"bad news from $POD_NAME on $NODE_NAME\" > $TERMINATION_LOG; exit 3"),
    )
    .await;
    assert_eq!(code, 3);
    assert!(message.starts_with("bad news from fails on node-"), "{message}");
    let pod = Api::<Pod>::namespaced(cluster.client.clone(), &ns.name).get("fails").await.unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Failed"));
}

/// kube-proxy emulation: with the kube-proxy DaemonSet present, a client pod
/// reaches the Service's ClusterIP (TCP and UDP) and its DNS name through the
/// KUBE-* rules podnet wrote into its node's netns.
#[tokio::test]
async fn client_reaches_cluster_ip_and_dns_name_through_kube_proxy_rules() {
    let cluster = SharedCluster::get().await;
    let ds: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(cluster.client.clone(), "kube-system");
    ds.get("kube-proxy").await.expect("the local cluster runs kubeadm's kube-proxy DaemonSet");
    let ns = TestNamespace::new(&cluster, "clusterip").await;
    let probes = create_probe(&cluster, &ns.name, "web", 3).await;
    let svc = Api::<Service>::namespaced(cluster.client.clone(), &ns.name).get("web").await.unwrap();
    let cip = svc.spec.unwrap().cluster_ip.unwrap();

    let script = format!(
        "for i in $(seq 1 40); do \
           if netboot-probe connect tcp {cip}:80 --timeout-ms 1000 > $TERMINATION_LOG.tcp \
              && netboot-probe connect udp {cip}:81 --timeout-ms 1000 > $TERMINATION_LOG.udp \
              && netboot-probe connect tcp web:80 --timeout-ms 1000 > $TERMINATION_LOG.dns; then \
             cat $TERMINATION_LOG.tcp $TERMINATION_LOG.udp $TERMINATION_LOG.dns > $TERMINATION_LOG; \
             rm -f $TERMINATION_LOG.*; exit 0; fi; sleep 0.5; done; \
         rm -f $TERMINATION_LOG.*; exit 1"
    );
    let client_node = node(&probes[1]);
    let (code, message) = run_client(&cluster, &ns.name, client_pod("vip-client", Some(&client_node), &script)).await;
    assert_eq!(code, 0, "client could not reach {cip} (tcp 80, udp 81, web:80): {message}");
    let names: BTreeSet<String> = probes.iter().map(name).collect();
    let got: Vec<&str> = message.lines().collect();
    assert_eq!(got.len(), 3, "{message}");
    for g in got {
        assert!(names.contains(g), "{g} is not one of {names:?}");
    }

    // The rules are kube-proxy's, in the node's netns.
    let save = std::process::Command::new("ip")
        .args(["netns", "exec", &names::node_netns(&client_node), "iptables-nft-save", "-t", "nat"])
        .output()
        .unwrap();
    let save = String::from_utf8_lossy(&save.stdout);
    let chain = netboot_harness::kubeproxy_rules::service_chain(&format!("{}/web:tcp", ns.name), "tcp");
    assert!(save.contains(&format!("-j {chain}")), "no {chain} in:\n{save}");
}

/// Deleting the pods (scaling the Deployment to zero) removes their netns and cgroups.
#[tokio::test]
async fn deleting_pods_removes_their_netns_and_cgroups() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "delete").await;
    let probes = create_probe(&cluster, &ns.name, "gone", 2).await;
    let made: Vec<(String, std::path::PathBuf)> = probes
        .iter()
        .map(|p| {
            let uid = p.metadata.uid.clone().unwrap();
            (names::pod_netns(&uid), names::pod_cgroup(&node(p), &uid))
        })
        .collect();
    for (netns, cg) in &made {
        assert!(names::netns_path(netns).exists() && cg.exists());
    }
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    deploys.delete("gone", &DeleteParams::foreground()).await.unwrap();
    wait_for("the pods' netns and cgroups to go", WAIT, || async {
        let left: Vec<&String> =
            made.iter().filter(|(n, c)| names::netns_path(n).exists() || c.exists()).map(|(n, _)| n).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    assert!(probes.iter().all(|p| !realized(p)));
}

const STAND_IN: &str = r#"#!/usr/bin/python3
# Stand-in for `netboot-datapath agent`: records its arguments and cgroup,
# serves /readyz (503 while the file `unready` exists) and notes SIGTERM.
import http.server, os, signal, sys
d = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
open(os.path.join(d, "args"), "w").write("\n".join(args))
open(os.path.join(d, "cgroup"), "w").write(open("/proc/self/cgroup").read())
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
    conds.iter().find(|c| c.type_ == "Ready").map(|c| c.status == "True")
}

/// Agent pods: podnet runs the agent (here a stand-in, via the
/// netboot.io/podnet-binary annotation) with the node's cgroup, pins and rules
/// netns, mirrors /readyz into the pod's Ready condition, and SIGTERMs the
/// agent when the pod is deleted.
#[tokio::test]
async fn agent_pod_runs_in_node_cgroup_and_readiness_follows_readyz() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "agent").await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent-stand-in");
    std::fs::write(&script, STAND_IN).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &ns.name);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "agent-config"},
        "data": {"config.yaml": "apiServer: {host: \"127.0.0.1\", port: 6443}\nkubeProxyReplacement: true\n"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let node = "node-0";
    let pod: Pod = serde_json::from_value(json!({
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
    pods.create(&PostParams::default(), &pod).await.unwrap();

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
    assert!(status.pod_ip.as_deref().is_some_and(|ip| ip.starts_with("172.18.")), "{:?}", status.pod_ip);
    assert_eq!(status.pod_ip, status.host_ip);

    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    let flag = |f: &str| args[args.iter().position(|a| *a == f).unwrap() + 1].to_string();
    assert_eq!(args[0], "agent");
    assert_eq!(flag("--node-name"), node);
    assert_eq!(flag("--cgroup"), names::Layout::default().node_cgroup(node).display().to_string());
    assert_eq!(flag("--bpffs"), format!("/sys/fs/bpf/netboot-local/{node}"));
    assert_eq!(flag("--rules-netns"), format!("/run/netns/nb-node-{node}"));
    assert!(std::fs::read_to_string(flag("--config")).unwrap().contains("kubeProxyReplacement: true"));
    let cgroup = std::fs::read_to_string(dir.path().join("cgroup")).unwrap();
    assert!(cgroup.contains(&format!("0::/netboot-local/{node}\n")), "{cgroup}");

    std::fs::write(dir.path().join("unready"), "").unwrap();
    wait_for("the agent pod not Ready", Duration::from_secs(30), || ready(false)).await;
    std::fs::remove_file(dir.path().join("unready")).unwrap();
    wait_for("the agent pod Ready again", Duration::from_secs(30), || ready(true)).await;

    pods.delete("agent", &DeleteParams::default()).await.unwrap();
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

/// A podnet pod whose command keeps failing (restartPolicy Always) is
/// restarted, with a growing back-off between runs.
#[tokio::test]
async fn crashing_container_is_restarted_with_backoff() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "crashloop").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crasher", "labels": {"netboot.io/podnet": "true"}},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "crash", "image": "busybox",
                            "command": ["sh", "-c", "date +%s.%N >> $OUT; exit 1"],
                            "env": [{"name": "OUT", "value": out.display().to_string()}]}]
        }
    }))
    .unwrap();
    Api::<Pod>::namespaced(cluster.client.clone(), &ns.name).create(&PostParams::default(), &pod).await.unwrap();
    let runs: Vec<f64> = wait_for("three runs", Duration::from_secs(60), || async {
        let runs: Vec<f64> =
            std::fs::read_to_string(&out).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect();
        if runs.len() >= 3 {
            Ok(runs)
        } else {
            Err(format!("{} runs", runs.len()))
        }
    })
    .await;
    let (gap1, gap2) = (runs[1] - runs[0], runs[2] - runs[1]);
    assert!(gap1 >= 0.9 && gap2 >= 1.8 && gap2 > gap1, "back-off gaps {gap1:.2}s, {gap2:.2}s");
}
