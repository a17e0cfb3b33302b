//! `netboot apply` against the local real cluster (tests/cluster/): real
//! kube-apiserver, controllers, kwok nodes, and — through podnet — the real
//! datapath agents in the kernel and probe pods in network namespaces.
//!
//! These tests change cluster-wide state (kube-proxy, netboot-system, Node
//! annotations), so they run one at a time behind a lock, each from the same
//! baseline: a kubeadm-shaped cluster with kube-proxy and no netboot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    admin_writes_since, audit_len, cluster_env, indent, kube_proxy, scenario, wait_until,
    ApiServerProcess, Run,
};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use netboot_harness::cluster::{repo_root, SharedCluster};
use serde_json::Value;

fn netboot(c: &SharedCluster, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_netboot"))
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

/// A copy of clusters/local.yaml with `edit` applied, in a temp dir.
fn spec_file(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("clusters/local.yaml")).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, edit(text)).unwrap();
    path
}

fn check_results(outcome: &Value) -> Vec<(String, String)> {
    outcome["validation"]["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_string(),
                        c["result"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every check passed, but `ipv6`: the cargo tests' local cluster is IPv4-only
/// (no IPv6 service range), so that one says skipped, with why (the dual-stack
/// cluster, `NETBOOT_IP_FAMILY=dual`, is the e2e's: there it must pass).
fn validated(checks: &[(String, String)]) -> bool {
    checks
        .iter()
        .all(|(n, r)| r == "passed" || (n == "ipv6" && r == "skipped"))
}

/// The main job, then what operators do next: a no-op apply, a changed
/// value, a dropped template, and the way back to coexist.
#[test]
fn replace_then_noop_then_change_then_prune_then_coexist() {
    scenario(|c| async move {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "local.yaml", |s| s);
        let spec = spec.to_str().unwrap();

        // A fresh kubeadm-like cluster with kube-proxy → replaced and validated.
        let started = Instant::now();
        let run = netboot(&c, &["apply", "-o", "json", spec]);
        assert_eq!(run.code, 0, "apply failed");
        eprintln!("full apply took {:?}", started.elapsed());
        let out = run.json();
        let checks = check_results(&out);
        assert_eq!(checks.len(), 14, "{checks:?}");
        assert!(validated(&checks), "{checks:?}");
        let ipv6 = out["validation"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "ipv6")
            .unwrap();
        assert!(
            ipv6["detail"]
                .as_str()
                .unwrap()
                .contains("no IPv6 service range"),
            "{ipv6}"
        );
        let steps: Vec<&str> = out["handover"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            steps,
            [
                "agents-rolled-out",
                "nodes-report-replacement",
                "nothing-unserved",
                "backup-kube-proxy",
                "delete-kube-proxy",
                "kube-proxy-gone",
                "rules-cleared",
                "validation",
                "kubeadm-upgrade"
            ]
        );
        // The local cluster is kubeadm's, without `proxy: {disabled: true}`:
        // kubeadm's next upgrade would re-install kube-proxy, and netboot says so.
        let kubeadm = &out["handover"][8];
        assert_eq!(kubeadm["result"], "warning", "{kubeadm}");
        assert!(
            kubeadm["message"]
                .as_str()
                .unwrap()
                .contains("proxy: {disabled: true}"),
            "{kubeadm}"
        );
        let (ds, cm) = kube_proxy(&c.client).await;
        assert!(
            ds.is_none() && cm.is_none(),
            "kube-proxy DaemonSet and ConfigMap must be gone"
        );
        let status = netboot(&c, &["status", "-o", "json", spec]).json();
        assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
        assert!(
            status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["kubeProxyReplacement"] == "true" && n["kubeProxyRules"] == "absent"),
            "{status:#}"
        );

        // The same spec again: zero write requests.
        let mark = audit_len(&c);
        let run = netboot(&c, &["apply", "-o", "json", spec]);
        assert_eq!(run.code, 0);
        assert_eq!(run.json()["plan"]["noop"], true);
        tokio::time::sleep(Duration::from_secs(1)).await; // the audit log is written when responses complete
        let writes = admin_writes_since(&c, mark);
        assert!(writes.is_empty(), "a no-op apply wrote: {writes:#?}");

        // A changed value → only the objects it affects are configured.
        let changed = spec_file(dir.path(), "changed.yaml", |s| {
            s.replace(
                "sessionAffinityTimeoutSeconds: 10800",
                "sessionAffinityTimeoutSeconds: 3600",
            )
        });
        let out = netboot(
            &c,
            &[
                "apply",
                "-o",
                "json",
                "--skip-validation",
                changed.to_str().unwrap(),
            ],
        )
        .json();
        let configured: Vec<String> = out["applied"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "configured")
            .map(|e| {
                format!(
                    "{}/{}",
                    e["kind"].as_str().unwrap(),
                    e["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            configured,
            [
                "ConfigMap/netboot-datapath-config",
                "DaemonSet/netboot-datapath"
            ],
            "{out:#}"
        );

        // An object that leaves the templates is pruned; nothing else is touched.
        let extra = tempfile::tempdir().unwrap();
        std::fs::write(
            extra.path().join("extra.yaml.hbs"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: netboot-extra\n  namespace: {{q namespace}}\ndata:\n  a: \"1\"\n",
        )
        .unwrap();
        let run = netboot(
            &c,
            &[
                "apply",
                "-o",
                "json",
                "--skip-validation",
                "--templates",
                extra.path().to_str().unwrap(),
                changed.to_str().unwrap(),
            ],
        );
        assert_eq!(run.code, 0);
        let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "netboot-system");
        assert!(cms.get_opt("netboot-extra").await.unwrap().is_some());
        let out = netboot(
            &c,
            &[
                "apply",
                "-o",
                "json",
                "--skip-validation",
                changed.to_str().unwrap(),
            ],
        )
        .json();
        let pruned: Vec<&str> = out["applied"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "pruned")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(pruned, ["netboot-extra"]);
        wait_until(
            "netboot-extra to be deleted",
            Duration::from_secs(30),
            || async { cms.get_opt("netboot-extra").await.unwrap().is_none() },
        )
        .await;

        // Back to coexist: kube-proxy restored exactly as backed up, validated.
        let backup = cms.get("netboot-kube-proxy-backup").await.unwrap();
        let coexist = spec_file(dir.path(), "coexist.yaml", |s| {
            s.replace("kubeProxyReplacement: true", "kubeProxyReplacement: false")
        });
        let run = netboot(&c, &["apply", "-o", "json", coexist.to_str().unwrap()]);
        assert_eq!(run.code, 0);
        let checks = check_results(&run.json());
        assert!(validated(&checks), "{checks:?}");
        let (ds, cm) = kube_proxy(&c.client).await;
        let backup_ds: Value =
            serde_json::from_str(&backup.data.as_ref().unwrap()["daemonset.json"]).unwrap();
        let backup_cm: Value =
            serde_json::from_str(&backup.data.as_ref().unwrap()["configmap.json"]).unwrap();
        let live_ds =
            netboot::handover::strip_server_fields(serde_json::to_value(ds.unwrap()).unwrap());
        let live_cm =
            netboot::handover::strip_server_fields(serde_json::to_value(cm.unwrap()).unwrap());
        assert_eq!(
            live_cm, backup_cm,
            "restored ConfigMap differs from the backup"
        );
        assert_eq!(
            live_ds["spec"], backup_ds["spec"],
            "restored DaemonSet spec differs from the backup"
        );
        assert_eq!(
            live_ds["metadata"]["labels"],
            backup_ds["metadata"]["labels"]
        );
    });
}

/// An agent that never becomes ready (it cannot reach the API) must keep
/// kube-proxy in place, and the error must name the gate and the nodes.
#[test]
fn agent_never_ready_keeps_kube_proxy() {
    scenario(|c| async move {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "broken.yaml", |s| {
            s.replace("port: 6443", "port: 6553")
                .replace("rolloutTimeoutSeconds: 120", "rolloutTimeoutSeconds: 15")
        });
        let run = netboot(&c, &["apply", spec.to_str().unwrap()]);
        assert_eq!(run.code, 2, "a failed gate is an error");
        assert!(
            run.stderr
                .contains("DaemonSet/netboot-system/netboot-datapath rollout: not ready after 15s"),
            "{}",
            run.stderr
        );
        for n in ["node-0", "node-1", "node-2"] {
            assert!(
                run.stderr
                    .contains(&format!("  {n}: pod netboot-datapath-")),
                "node {n} not named: {}",
                run.stderr
            );
        }
        let (ds, cm) = kube_proxy(&c.client).await;
        assert!(
            ds.is_some() && cm.is_some(),
            "kube-proxy must stay when a gate fails"
        );
        let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "netboot-system");
        assert!(
            cms.get_opt("netboot-kube-proxy-backup")
                .await
                .unwrap()
                .is_none(),
            "no backup: the handover never started"
        );
    });
}

/// Services the agents cannot serve (SCTP: a ClusterIP and a NodePort
/// Service; the agents serve NodePorts, SCTP on no Service type) stop the
/// handover before kube-proxy is touched (exit 2, each named with what it needs);
/// `netboot plan` lists them too; `allowUnserved` accepts them by name, and
/// the inventory and `netboot status` record it.
#[test]
fn an_unserved_service_keeps_kube_proxy_until_allowed() {
    scenario(|c| async move {
        let svcs: Api<Service> = Api::namespaced(c.client.clone(), "default");
        let names = ["nb-unserved-sctp", "nb-unserved-np", "nb-unserved-sctp-np"];
        let remove = || async {
            for n in names {
                let _ = svcs.delete(n, &DeleteParams::default()).await;
            }
        };
        remove().await;
        for y in [
            "metadata: {name: nb-unserved-sctp}\nspec: {ports: [{name: http, port: 80}, {name: s, port: 9, protocol: SCTP}]}",
            "metadata: {name: nb-unserved-sctp-np}\nspec: {type: NodePort, ports: [{port: 9, protocol: SCTP}]}",
        ] {
            let svc: Service = serde_yaml::from_str(y).unwrap();
            svcs.create(&PostParams::default(), &svc).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "local.yaml", |s| s);
        let spec = spec.to_str().unwrap();

        // node-0 as its agent reports IPVS state left by an earlier mode
        // (no agent runs yet to write it; reset() removes it).
        let nodes: Api<Node> = Api::all(c.client.clone());
        let mode = |v: Value| serde_json::json!({"metadata": {"annotations": {"netboot.io/kube-proxy-mode": v}}});
        nodes
            .patch(
                "node-0",
                &PatchParams::default(),
                &Patch::Merge(&mode("iptables+ipvs".into())),
            )
            .await
            .unwrap();

        let plan = netboot(&c, &["plan", "-o", "json", spec]).json();
        let refused = plan["unserved"]["refused"].to_string();
        assert!(refused.contains("default/nb-unserved-sctp"), "{plan:#}");
        assert!(refused.contains("default/nb-unserved-sctp-np"), "{plan:#}");
        // kube-proxy's mode: its ConfigMap's (tests/cluster/up renders
        // `mode: $KUBE_PROXY_MODE`) and node-0's; IPVS there → the agents clear it.
        let configured = cluster_env(&c, "KUBE_PROXY_MODE").unwrap_or_else(|| "iptables".into());
        assert_eq!(
            plan["kubeProxy"]["configuredMode"],
            serde_json::json!({"mode": configured, "default": false}),
            "{plan:#}"
        );
        let node0 = plan["nodeModes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "node-0")
            .cloned();
        assert_eq!(
            node0,
            Some(serde_json::json!({"node": "node-0", "mode": "iptables+ipvs"})),
            "{plan:#}"
        );
        assert_eq!(plan["ipvsCleanup"], true, "{plan:#}");
        let text = netboot(&c, &["plan", spec]).stdout;
        assert!(text.contains("clears its IPVS virtual servers"), "{text}");
        let status = netboot(&c, &["status", "-o", "json", spec]).json();
        let modes: Vec<(&str, &Value)> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["node"].as_str().unwrap(), &n["kubeProxyMode"]))
            .collect();
        assert_eq!(
            modes,
            [
                ("node-0", &Value::from("iptables+ipvs")),
                ("node-1", &Value::Null),
                ("node-2", &Value::Null)
            ],
            "{status:#}"
        );
        assert_eq!(
            status["kubeProxy"]["configuredMode"]["mode"],
            configured.as_str()
        );
        nodes
            .patch(
                "node-0",
                &PatchParams::default(),
                &Patch::Merge(&mode(Value::Null)),
            )
            .await
            .unwrap();

        let run = netboot(&c, &["apply", spec]);
        assert_eq!(run.code, 2, "a shut gate is an error");
        for needle in [
            "gate `nothing-unserved` failed",
            "Service/default/nb-unserved-sctp: needs sctp",
            "Service/default/nb-unserved-sctp-np: needs sctp",
        ] {
            assert!(run.stderr.contains(needle), "{needle}: {}", run.stderr);
        }
        let (ds, cm) = kube_proxy(&c.client).await;
        assert!(ds.is_some() && cm.is_some(), "kube-proxy must stay");
        let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "netboot-system");
        assert!(
            cms.get_opt("netboot-kube-proxy-backup")
                .await
                .unwrap()
                .is_none(),
            "no backup: the gate comes first"
        );

        let allowed = spec_file(dir.path(), "allowed.yaml", |s| {
            s + "  kubeProxy:\n    allowUnserved: [sctp]\n"
        });
        let allowed = allowed.to_str().unwrap();
        let run = netboot(&c, &["apply", "-o", "json", allowed]);
        assert_eq!(run.code, 0, "allowed gaps let the handover through");
        let status = netboot(&c, &["status", "-o", "json", allowed]).json();
        assert_eq!(
            status["inventory"]["allowUnserved"],
            serde_json::json!(["sctp"])
        );
        let accepted = status["inventory"]["unservedAllowed"].to_string();
        assert!(
            accepted.contains("default/nb-unserved-sctp: needs sctp"),
            "{status:#}"
        );
        let text = netboot(&c, &["status", allowed]).stdout;
        assert!(text.contains("Allowed unserved:"), "{text}");
        remove().await;
    });
}

/// Whether `target` (HOST:PORT) answers one TCP connection (500 ms timeout)
/// from inside `pod`.
fn answers(pod: &k8s_openapi::api::core::v1::Pod, target: &str) -> bool {
    netboot_harness::cluster::exec_in_pod(
        pod,
        &[
            "netboot-probe",
            "connect",
            "tcp",
            target,
            "--timeout-ms",
            "500",
        ],
    )
    .output()
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// A client pod connecting to a Service over and over (a fresh TCP
/// connection every ~100 ms, 500 ms timeout), recording when each attempt
/// started and whether the Service answered.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, bool)>>,
}

impl Prober {
    fn start(client: &k8s_openapi::api::core::v1::Pod, target: String) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, pod) = (stop.clone(), client.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut seen = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let at = t0.elapsed();
                seen.push((at, answers(&pod, &target)));
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        });
        Prober { stop, thread }
    }

    /// (attempts, failures, the longest time the Service did not answer:
    /// from the first failed attempt of a run to the next answered one).
    fn finish(self) -> (usize, usize, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = self.thread.join().unwrap();
        let failures = seen.iter().filter(|(_, ok)| !ok).count();
        let (mut longest, mut since) = (Duration::ZERO, None);
        for (at, ok) in &seen {
            match (ok, since) {
                (false, None) => since = Some(*at),
                (true, Some(from)) => {
                    longest = longest.max(*at - from);
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(from), Some((last, _))) = (since, seen.last()) {
            longest = longest.max(*last - from + Duration::from_millis(500));
        }
        (seen.len(), failures, longest)
    }
}

/// How long the restored kube-proxy took to start: the longest time from a
/// kube-proxy pod's creation to its Ready condition, over its pods (1 s
/// resolution, the API's).
async fn kube_proxy_start(c: &SharedCluster) -> Duration {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(c.client.clone(), "kube-system");
    let list = pods
        .list(&kube::api::ListParams::default().labels("k8s-app=kube-proxy"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter_map(|p| {
            let created = p.metadata.creation_timestamp.as_ref()?.0;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "True")?
                .last_transition_time
                .as_ref()?
                .0;
            let secs = ready.duration_since(created).as_secs_f64().max(0.0);
            Some(Duration::from_secs_f64(secs))
        })
        .max()
        .unwrap_or_default()
}

/// Validation failing after kube-proxy was removed → kube-proxy restored
/// identical to its backup, agents in coexist, exit 1; the next apply of the
/// same revision does not loop into another handover. A client pod keeps
/// connecting to a Service through the handover and the rollback: the
/// Service never stops answering for longer than kube-proxy's own start
/// (issue 16; the agents leave replace mode only once the restored
/// kube-proxy serves on every node).
#[test]
fn failed_validation_rolls_back() {
    scenario(|c| async move {
        let (ds0, cm0) = kube_proxy(&c.client).await;
        let ns = netboot_harness::cluster::TestNamespace::new(&c, "rollback-gap").await;
        let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(c.client.clone(), &ns.name);
        for (name, replicas) in [("gap-server", 2), ("gap-client", 1)] {
            deploys
                .create(
                    &PostParams::default(),
                    &netboot_harness::cluster::probe_deployment(name, replicas),
                )
                .await
                .unwrap();
        }
        let svcs: Api<Service> = Api::namespaced(c.client.clone(), &ns.name);
        let svc = svcs
            .create(
                &PostParams::default(),
                &netboot_harness::cluster::probe_service("gap", "gap-server"),
            )
            .await
            .unwrap();
        let vip = svc.spec.unwrap().cluster_ip.unwrap();
        let wait = Duration::from_secs(120);
        netboot_harness::cluster::wait_deployment_realized(&c.client, &ns.name, "gap-server", wait)
            .await;
        let client_pod = netboot_harness::cluster::wait_deployment_realized(
            &c.client,
            &ns.name,
            "gap-client",
            wait,
        )
        .await
        .remove(0);
        let target = format!("{vip}:80");
        wait_until("the Service to answer before the handover", wait, || {
            let ok = answers(&client_pod, &target);
            async move { ok }
        })
        .await;
        let prober = Prober::start(&client_pod, target);
        let dir = tempfile::tempdir().unwrap();
        // A DNS domain nobody serves: the dns check fails after the handover.
        let spec = spec_file(dir.path(), "baddns.yaml", |s| {
            s.replace(
                "podCIDR: 10.244.0.0/16",
                "podCIDR: 10.244.0.0/16\n    dnsDomain: cluster.invalid",
            )
            .replace("timeoutSeconds: 120\n", "timeoutSeconds: 20\n")
            // 20 s leave no room to replace a pod; only dns is to fail here.
            .replace(
                "  validation:\n",
                "  validation:\n    skip: [udp-backend-replaced, internal-traffic-local]\n",
            )
        });
        let run = netboot(&c, &["apply", "-o", "json", spec.to_str().unwrap()]);
        let (attempts, failures, gap) = prober.finish();
        let kp_start = kube_proxy_start(&c).await;
        eprintln!(
            "NUMBERS rollback: {attempts} connections to Service {}/gap through the handover and the rollback, \
             {failures} failed, longest time unanswered {gap:?}; the restored kube-proxy's own start {kp_start:?}",
            ns.name
        );
        assert_eq!(run.code, 1, "validation failure exits 1");
        let out = run.json();
        assert_eq!(out["rolledBack"], true);
        assert!(attempts > 20, "the prober ran {attempts} times only");
        assert!(
            gap <= kp_start,
            "the Service went unanswered for {gap:?} ({failures} of {attempts} connections failed), \
             longer than kube-proxy's own start ({kp_start:?})"
        );
        let failed: Vec<String> = check_results(&out)
            .into_iter()
            .filter(|(_, r)| r == "failed")
            .map(|(n, _)| n)
            .collect();
        assert_eq!(failed, ["dns"]);
        let (ds, cm) = kube_proxy(&c.client).await;
        let strip = |v: Value| netboot::handover::strip_server_fields(v);
        assert_eq!(
            strip(serde_json::to_value(cm.unwrap()).unwrap()),
            strip(serde_json::to_value(cm0.unwrap()).unwrap())
        );
        let (ds, ds0) = (
            strip(serde_json::to_value(ds.unwrap()).unwrap()),
            strip(serde_json::to_value(ds0.unwrap()).unwrap()),
        );
        assert_eq!(ds["spec"], ds0["spec"]);
        let status = netboot(&c, &["status", "-o", "json", spec.to_str().unwrap()]).json();
        assert_eq!(status["inventory"]["mode"], "rolled-back");
        // Same revision again: held in coexist, no second handover.
        let run = netboot(&c, &["plan", "-o", "json", spec.to_str().unwrap()]);
        assert_eq!(run.json()["handover"], "held-after-rollback");
    });
}

/// Coexist mode leaves kube-proxy exactly as it was.
#[test]
fn coexist_leaves_kube_proxy_alone() {
    scenario(|c| async move {
        let (ds0, cm0) = kube_proxy(&c.client).await;
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "coexist.yaml", |s| {
            s.replace("kubeProxyReplacement: true", "kubeProxyReplacement: false")
        });
        let run = netboot(&c, &["apply", "-o", "json", spec.to_str().unwrap()]);
        assert_eq!(run.code, 0);
        assert!(validated(&check_results(&run.json())));
        let (ds, cm) = kube_proxy(&c.client).await;
        assert_eq!(
            ds.unwrap().metadata.resource_version,
            ds0.unwrap().metadata.resource_version,
            "kube-proxy DaemonSet was written"
        );
        assert_eq!(
            cm.unwrap().metadata.resource_version,
            cm0.unwrap().metadata.resource_version,
            "kube-proxy ConfigMap was written"
        );
        let status = netboot(&c, &["status", "-o", "json", spec.to_str().unwrap()]).json();
        assert!(
            status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["kubeProxyReplacement"] == "false"),
            "{status:#}"
        );
    });
}

/// A second netboot waits for the lock, and gives up naming the holder.
#[test]
fn a_held_lock_makes_the_second_apply_wait_then_fail() {
    scenario(|c| async move {
        // One fixed lock per cluster, whatever spec.namespace says (issue 16).
        let leases: Api<Lease> = Api::namespaced(c.client.clone(), "kube-system");
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("netboot-lock".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("other-host/pid-1/test".into()),
                lease_duration_seconds: Some(60),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                acquire_time: Some(MicroTime(jiff::Timestamp::now())),
                ..Default::default()
            }),
        };
        leases.create(&PostParams::default(), &lease).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "local.yaml", |s| s);
        let other_ns = spec_file(dir.path(), "other-ns.yaml", |s| {
            s.replace("spec:\n", "spec:\n  namespace: netboot-other\n")
        });
        let started = Instant::now();
        let run = netboot(
            &c,
            &["apply", "--lock-timeout", "3", other_ns.to_str().unwrap()],
        );
        assert_eq!(run.code, 2);
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "it must wait before giving up"
        );
        assert!(
            run.stderr.contains(
                "waiting for Lease/kube-system/netboot-lock, held by other-host/pid-1/test"
            ),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("held by other-host/pid-1/test"),
            "{}",
            run.stderr
        );
        // Released: two applies at once — both succeed, one after the other.
        leases
            .delete("netboot-lock", &DeleteParams::default())
            .await
            .unwrap();
        let spec2 = spec.clone();
        let kc = c.kubeconfig.clone();
        let spawn = |spec: PathBuf, kc: PathBuf| {
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_netboot"))
                    .args(["apply", "--skip-validation", "--lock-timeout", "300"])
                    .arg(&spec)
                    .arg("--kubeconfig")
                    .arg(&kc)
                    .current_dir(repo_root())
                    .output()
                    .unwrap()
            })
        };
        let a = spawn(spec.clone(), kc.clone());
        let b = spawn(spec2, kc);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let both = format!(
            "{}\n{}",
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&b.stderr)
        );
        assert!(a.status.success() && b.status.success(), "{both}");
    });
}

/// The API server killed in the middle of an apply and started again: the
/// rerun converges and nothing is lost (the inventory lists every object, the
/// kube-proxy backup matches what was installed).
#[test]
fn api_server_killed_mid_apply_then_rerun_converges() {
    scenario(|c| async move {
        let (ds0, _) = kube_proxy(&c.client).await;
        let ds0 =
            netboot::handover::strip_server_fields(serde_json::to_value(ds0.unwrap()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_file(dir.path(), "local.yaml", |s| s);
        let child = Command::new(env!("CARGO_BIN_EXE_netboot"))
            .args(["apply", "--lock-timeout", "5"])
            .arg(&spec)
            .arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .current_dir(repo_root())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let dss: Api<DaemonSet> = Api::namespaced(c.client.clone(), "netboot-system");
        wait_until(
            "the apply to create the agent DaemonSet",
            Duration::from_secs(60),
            || async {
                dss.get_opt("netboot-datapath")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            },
        )
        .await;
        let apiserver = ApiServerProcess::read(&c.state);
        apiserver.kill();
        let out = child.wait_with_output().unwrap();
        eprintln!(
            "interrupted apply: exit {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        apiserver.start_again(&c.state);
        let client = c.client.clone();
        wait_until(
            "the API server to answer again",
            Duration::from_secs(60),
            || async { client.apiserver_version().await.is_ok() },
        )
        .await;
        // Controllers, kwok and podnet reconnect on their own; give the agents' watches a moment.
        let run = netboot(
            &c,
            &[
                "apply",
                "-o",
                "json",
                "--lock-timeout",
                "90",
                spec.to_str().unwrap(),
            ],
        );
        assert_eq!(run.code, 0, "the rerun must converge");
        let out = run.json();
        assert!(validated(&check_results(&out)), "{:?}", check_results(&out));
        let status = netboot(&c, &["status", "-o", "json", spec.to_str().unwrap()]).json();
        assert_eq!(
            status["inventory"]["objects"].as_array().unwrap().len(),
            14,
            "{status:#}"
        );
        assert_eq!(status["kubeProxy"]["daemonSet"], false);
        let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "netboot-system");
        let backup = cms.get("netboot-kube-proxy-backup").await.unwrap();
        let backup_ds: Value =
            serde_json::from_str(&backup.data.unwrap()["daemonset.json"]).unwrap();
        assert_eq!(
            backup_ds["spec"], ds0["spec"],
            "the backup must be kube-proxy as it was installed"
        );
    });
}
