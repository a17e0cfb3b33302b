//! podnet on the shared local cluster (root; starts it with tests/cluster/up
//! when it is not running). Each test works in its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use netboot_harness::cluster::{
    client_pod, exec_in_pod, probe_deployment, probe_service, realized, wait_deployment_realized,
    wait_for, wait_terminated, SharedCluster, TestNamespace,
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
    deploys
        .create(&PostParams::default(), &spread_probe(app, replicas))
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), ns);
    services
        .create(&PostParams::default(), &probe_service(app, app))
        .await
        .unwrap();
    wait_deployment_realized(&cluster.client, ns, app, WAIT).await
}

async fn run_client(cluster: &SharedCluster, ns: &str, pod: Pod) -> (i32, String) {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let n = name(&pod);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_terminated(&cluster.client, ns, &n, WAIT).await
}

/// The "done when": a podnet client reaches each of 3 probe pods by
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
    let (code, message) = run_client(
        &cluster,
        &ns.name,
        client_pod("client", Some(&client_node), &script),
    )
    .await;
    let want: Vec<String> = probes.iter().flat_map(|p| [name(p), name(p)]).collect();
    assert_eq!(code, 0, "client failed; message: {message}");
    assert_eq!(
        message.lines().collect::<Vec<_>>(),
        want,
        "names from {nodes:?} (client on {client_node})"
    );

    // exec_in_pod: the same from inside a probe pod, pod -> pod.
    let out = exec_in_pod(
        &probes[0],
        &[
            "netboot-probe",
            "connect",
            "tcp",
            &format!("{}:8080", ip(&probes[2])),
            "--count",
            "2",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{0}\n{0}\n", name(&probes[2]))
    );
}

/// A failing client reports phase Failed, its exit code and its termination log.
#[tokio::test]
async fn failing_client_reports_exit_code_and_message() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "client-fails").await;
    let (code, message) = run_client(
        &cluster,
        &ns.name,
        client_pod(
            "fails",
            None,
            "echo \"bad news from $POD_NAME on $NODE_NAME\" > $TERMINATION_LOG; exit 3",
        ),
    )
    .await;
    assert_eq!(code, 3);
    assert!(
        message.starts_with("bad news from fails on node-"),
        "{message}"
    );
    let pod = Api::<Pod>::namespaced(cluster.client.clone(), &ns.name)
        .get("fails")
        .await
        .unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Failed"));
}

/// Cluster DNS from the podnet coredns pods: a client reaches a Service by
/// its short name (resolv.conf search path → kube-dns ClusterIP → coredns pod
/// netns → ClusterIP), through whatever implements Services on the cluster
/// right now (kube-proxy's rules, or netboot's datapath after a handover).
#[tokio::test]
async fn client_reaches_a_service_by_its_dns_name() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "dns").await;
    let probes = create_probe(&cluster, &ns.name, "web", 2).await;
    let script = "for i in $(seq 1 40); do \
           if netboot-probe connect tcp web:80 --timeout-ms 1000 > $TERMINATION_LOG \
              && netboot-probe connect tcp web.$POD_NAMESPACE.svc.cluster.local:80 >> $TERMINATION_LOG; then exit 0; fi; \
           sleep 0.5; done; exit 1";
    let mut pod = serde_json::to_value(client_pod("dns-client", None, script)).unwrap();
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}));
    let (code, message) =
        run_client(&cluster, &ns.name, serde_json::from_value(pod).unwrap()).await;
    assert_eq!(code, 0, "client could not reach web:80 by name: {message}");
    let names: BTreeSet<String> = probes.iter().map(name).collect();
    let got: Vec<&str> = message.lines().collect();
    assert_eq!(got.len(), 2, "{message}");
    assert!(
        got.iter().all(|g| names.contains(*g)),
        "{got:?} not in {names:?}"
    );
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
    deploys
        .delete("gone", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("the pods' netns and cgroups to go", WAIT, || async {
        let left: Vec<&String> = made
            .iter()
            .filter(|(n, c)| names::netns_path(n).exists() || c.exists())
            .map(|(n, _)| n)
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    assert!(probes.iter().all(|p| !realized(p)));
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
    Api::<Pod>::namespaced(cluster.client.clone(), &ns.name)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let runs: Vec<f64> = wait_for("three runs", Duration::from_secs(60), || async {
        let runs: Vec<f64> = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        if runs.len() >= 3 {
            Ok(runs)
        } else {
            Err(format!("{} runs", runs.len()))
        }
    })
    .await;
    let (gap1, gap2) = (runs[1] - runs[0], runs[2] - runs[1]);
    assert!(
        gap1 >= 0.9 && gap2 >= 1.8 && gap2 > gap1,
        "back-off gaps {gap1:.2}s, {gap2:.2}s"
    );
}

/// As a kubelet's status manager: a running pod that the node lifecycle
/// controller marked not ready (its node missed heartbeats, e.g. while a test
/// had the API server down) is ready again within a status sync (kwok's
/// pod-ready-again stage, tests/cluster/manifests/kwok). Without it CoreDNS
/// stayed not ready for good after such a moment and kube-dns lost every
/// endpoint (a handover_interrupted failure on 2026-12-02).
#[tokio::test]
async fn a_pod_marked_not_ready_by_the_node_controller_is_ready_again() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "reready").await;
    let probes = create_probe(&cluster, &ns.name, "again", 1).await;
    let pod = name(&probes[0]);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    // What nodeutil.MarkPodsNotReady writes: the Ready condition only.
    pods.patch_status(
        &pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(json!({"status": {"conditions": [
            {"type": "Ready", "status": "False", "reason": "NodeNotReady"}
        ]}})),
    )
    .await
    .unwrap();
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone())
    };
    assert_eq!(
        ready(&pods.get(&pod).await.unwrap()).as_deref(),
        Some("False"),
        "the patch took"
    );
    let t0 = std::time::Instant::now();
    wait_for(
        "the pod to be Ready again",
        Duration::from_secs(30),
        || async {
            let p = pods.get(&pod).await.map_err(|e| e.to_string())?;
            match ready(&p).as_deref() {
                Some("True") => Ok(()),
                other => Err(format!("Ready={other:?}")),
            }
        },
    )
    .await;
    eprintln!("ready again after {:?}", t0.elapsed());
    let p = pods.get(&pod).await.unwrap();
    assert!(realized(&p), "still realized, podIP kept: {:?}", p.status);
}
