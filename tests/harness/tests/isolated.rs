//! podnet's shutdown removes every netns, veth and cgroup it made: a second
//! podnet with its own layout (netns prefix, cgroup root) and limited to the
//! test's namespace realizes pods, is stopped, and must leave nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use netboot_harness::cluster::{
    client_pod, probe_deployment, realized_in, wait_for, workspace_bin, SharedCluster, TestNamespace,
};
use netboot_harness::names::{self, Layout};
use netboot_harness::podnet::{self, Options};
use netboot_harness::{cgroup, netns};

fn root_veths() -> String {
    let out = std::process::Command::new("ip").args(["-o", "link", "show", "type", "veth"]).output().unwrap();
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
    let mut opts = Options::new(cluster.kubeconfig.clone(), state.path().into(), probe.parent().unwrap().into());
    opts.layout = layout.clone();
    opts.namespace = Some(ns.name.clone());
    let veths_before = root_veths();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(podnet::run(opts, async move {
        let _ = stop_rx.await;
    }));

    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    deploys.create(&PostParams::default(), &probe_deployment("srv", 2)).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    pods.create(&PostParams::default(), &client_pod("sleeper", None, "sleep 600")).await.unwrap();
    let realized = wait_for("3 pods realized by the test's podnet", Duration::from_secs(120), || async {
        let list = pods.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let n = list.items.iter().filter(|p| realized_in(&layout, p)).count();
        if n == 3 {
            Ok(list.items)
        } else {
            Err(format!("{n} of {} realized", list.items.len()))
        }
    })
    .await;
    let made = netns::list(&layout.netns_prefix);
    assert!(made.contains(&layout.fabric_netns()) && made.contains(&layout.cp_netns()), "{made:?}");
    assert!(made.len() >= 6, "pods, cp, fabric and at least one node: {made:?}");
    let procs = cgroup::procs_recursive(&layout.cgroup_root);
    assert!(procs.len() >= 3, "processes in {}: {procs:?}", layout.cgroup_root.display());
    assert_eq!(root_veths(), veths_before, "podnet put a veth into the root netns");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), task).await.expect("podnet stops within 60s").unwrap().unwrap();

    assert_eq!(netns::list(&layout.netns_prefix), Vec::<String>::new(), "netns left behind");
    assert!(!layout.cgroup_root.exists(), "cgroup tree {} left behind", layout.cgroup_root.display());
    for p in &realized {
        let uid = p.metadata.uid.as_deref().unwrap();
        assert!(!names::netns_etc(&layout.pod_netns(uid)).exists(), "/etc/netns dir left for {uid}");
    }
    for pid in procs {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        assert!(status.is_empty() || zombie, "process {pid} still runs: {status}");
    }
    assert_eq!(root_veths(), veths_before);
    let pid_files = std::fs::read_dir(state.path().join("podnet/pids")).unwrap().count();
    assert_eq!(pid_files, 0, "pid records left");
}

/// After a crash (SIGKILL) podnet's children die with it (parent-death
/// signal), its netns and cgroups stay; the next podnet removes them at start,
/// realizes the pods afresh, and its SIGTERM shutdown leaves nothing.
#[tokio::test]
async fn podnet_restart_after_a_crash_cleans_up_and_rebuilds() {
    let cluster = SharedCluster::get().await;
    let ns = TestNamespace::new(&cluster, "crash").await;
    let id = std::process::id() % 100_000;
    let layout = Layout {
        netns_prefix: format!("nbr{id}-"),
        cgroup_root: format!("/sys/fs/cgroup/unified/netboot-test-r{id}").into(),
        bpffs_root: format!("/sys/fs/bpf/netboot-test-r{id}").into(),
    };
    let state = tempfile::tempdir().unwrap();
    let podnet_bin = workspace_bin("podnet");
    let bin_dir = workspace_bin("netboot-probe").parent().unwrap().to_path_buf();
    let start = || {
        std::process::Command::new(&podnet_bin)
            .args(["--kubeconfig", &cluster.kubeconfig.display().to_string()])
            .args(["--state", &state.path().display().to_string()])
            .args(["--bin-dir", &bin_dir.display().to_string()])
            .args(["--netns-prefix", &layout.netns_prefix])
            .args(["--cgroup-root", &layout.cgroup_root.display().to_string()])
            .args(["--bpffs-root", &layout.bpffs_root.display().to_string()])
            .args(["--namespace", &ns.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(state.path().join("podnet.log")).unwrap())
            .spawn()
            .unwrap()
    };
    let realized_pids = |want: usize| {
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
        let layout = layout.clone();
        async move {
            let list = pods.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let n = list.items.iter().filter(|p| realized_in(&layout, p)).count();
            let procs = cgroup::procs_recursive(&layout.cgroup_root);
            if n == want && procs.len() == want {
                Ok(procs)
            } else {
                Err(format!("{n} realized, procs {procs:?}"))
            }
        }
    };

    let mut first = start();
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    deploys.create(&PostParams::default(), &probe_deployment("srv", 2)).await.unwrap();
    let old = wait_for("2 pods realized by the first podnet", Duration::from_secs(120), || realized_pids(2)).await;
    let stale = netns::list(&layout.netns_prefix);

    // SIGKILL: the crash.
    first.kill().unwrap();
    first.wait().unwrap();
    wait_for("the children to die with podnet", Duration::from_secs(10), || async {
        let alive: Vec<&i32> = old.iter().filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists()).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("{alive:?}"))
        }
    })
    .await;
    assert_eq!(netns::list(&layout.netns_prefix), stale, "netns stay after a crash");

    let mut second = start();
    let new =
        wait_for("2 pods realized again by the second podnet", Duration::from_secs(120), || realized_pids(2)).await;
    assert!(new.iter().all(|p| !old.contains(p)), "fresh processes: {old:?} vs {new:?}");

    // SIGTERM: the orderly shutdown `tests/cluster/down` does.
    // SAFETY: kill(2) on the podnet this test started.
    unsafe { libc::kill(i32::try_from(second.id()).unwrap(), libc::SIGTERM) };
    let status = second.wait().unwrap();
    let log = std::fs::read_to_string(state.path().join("podnet.log")).unwrap_or_default();
    assert!(status.success(), "podnet exited with {status}:\n{log}");
    assert_eq!(netns::list(&layout.netns_prefix), Vec::<String>::new(), "netns left behind:\n{log}");
    assert!(!layout.cgroup_root.exists(), "cgroups left behind:\n{log}");
}
