//! Privileged, needs a Kubernetes control plane binary build: runs a private
//! etcd + kube-apiserver on 127.0.0.1 (binaries from tests/cluster/build's
//! cache), then the real agent against it with a kubeconfig whose server is a
//! ClusterIP (10.96.0.1) — the agent must dial `apiServer` from config.yaml
//! instead. Checks watchers → maps → traffic, updates (endpoints removed →
//! ECONNREFUSED, Service deleted → untranslated), the Node annotations, and
//! the kube-proxy hand-off: while kube-proxy's DaemonSet exists the agent
//! leaves KUBE-* rules in its rules netns; once it is deleted they are gone
//! within seconds (at once, not at the next periodic check); re-created, the
//! agent stops cleaning again.
//!
//! Run: `sudo cargo test -p netboot-datapath --test api_agent` after
//! `tests/cluster/build` (tests/run does it; NETBOOT_CACHE overrides
//! ~/.cache/netboot). Without the binaries the test panics saying so.
//! Everything is private: etcd and the API server listen on free loopback
//! ports (never the shared local cluster's 6443/2379), so it runs alongside
//! the other tests.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netboot_datapath::handover::{self, IpvsOwnership, RulesNetns};
use netboot_harness::controlplane;
use support::*;

#[test]
fn helper() {
    support::helper_main();
}

const BIN: &str = env!("CARGO_BIN_EXE_netboot-datapath");

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut ch = c.spawn().expect("kubectl");
        if let Some(s) = stdin {
            ch.stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("write");
        }
        drop(ch.stdin.take());
        let out = ch.wait_with_output().expect("kubectl wait");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, text) = self.run(args, stdin);
        assert!(ok, "kubectl {args:?}: {text}");
        text
    }
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while t.elapsed() < within {
        if f() {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

const OBJECTS: &str = "
apiVersion: v1
kind: Node
metadata: {name: nbt-dp-node}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.80
  ports: [{name: http, port: 80, targetPort: 8080}]
  selector: {app: none}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-manual, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1], conditions: {ready: true}}
- {addresses: [10.244.1.2], conditions: {ready: true}}
";

#[test]
fn agent_against_a_real_api_server() {
    require_privileges();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The private etcd and kube-apiserver (tests/harness/src/controlplane.rs).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cp = rt
        .block_on(controlplane::ControlPlane::start(d, "10.96.0.0/16"))
        .unwrap_or_else(|e| {
            panic!("api_agent: {e} (tests/cluster/build fills the cache; NETBOOT_CACHE overrides ~/.cache/netboot)")
        });
    let ap = cp.api_port;
    let lp = free_ports(1)[0];
    let kubectl = Kubectl {
        bin: controlplane::cached("k8s", "kubectl").unwrap_or_else(|e| panic!("api_agent: {e}")),
        kubeconfig: cp.admin.clone(),
    };
    kubectl.ok(&["apply", "-f", "-"], Some(OBJECTS));

    let topo = Topology::new("apisrv", 2);
    let _servers = Servers::start(
        &topo.server,
        &[("be1", backend_ip(1), 8080), ("be2", backend_ip(2), 8080)],
    );
    let cg = TestCgroup::new("apisrv");
    let pins = TestPins::new("apisrv");
    std::fs::write(
        d.join("config.yaml"),
        format!("apiServer: {{host: 127.0.0.1, port: {ap}}}\nkubeProxyReplacement: true\ncleanupKubeProxyRules: true\n"),
    )
    .expect("config");
    // The credentials' server is the kubernetes ClusterIP: the agent must not use it.
    let agent_kc = controlplane::kubeconfig(d, "agent.conf", "https://10.96.0.1:443")
        .expect("agent kubeconfig");
    let listen = format!("127.0.0.1:{lp}");
    let start_agent = |node_interval: &str, log: &str| {
        Command::new(BIN)
            .args([
                "agent",
                "--node-name",
                "nbt-dp-node",
                "--listen",
                &listen,
                "--node-interval",
                node_interval,
            ])
            .arg("--config")
            .arg(d.join("config.yaml"))
            .arg("--kubeconfig")
            .arg(&agent_kc)
            .arg("--cgroup")
            .arg(&cg.path)
            .arg("--bpffs")
            .arg(pins.pins.root())
            .arg("--rules-netns")
            .arg(topo.client.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(d.join(log)).expect("log"),
            ))
            .spawn()
            .expect("agent")
    };
    let t_agent = Instant::now();
    let agent = start_agent("1", "agent.log");
    let agent_pid = agent.id();
    let mut agent = ChildGuard(Some(agent));
    let ready = wait_ready(&listen, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "NUMBERS api: agent ready {ready:?} after start ({:?} total); RSS {} KiB with watchers",
        t_agent.elapsed(),
        rss_kib(agent_pid)
    );

    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 80), 80);
    let res = client(
        &cg.path,
        &topo.client,
        ClientOp::Tcp {
            addr: vip,
            count: 40,
        },
    );
    assert!(
        res.iter().all(|a| a.ok && a.peer == "10.96.0.80:80"),
        "{res:?}"
    );
    assert!(res.iter().any(|a| a.name == "be1") && res.iter().any(|a| a.name == "be2"));

    // Node annotations per contracts.md.
    let ann = |k: &str| {
        kubectl.ok(
            &[
                "get",
                "node",
                "nbt-dp-node",
                "-o",
                &format!(
                    "jsonpath={{.metadata.annotations.{}}}",
                    k.replace('.', "\\.")
                ),
            ],
            None,
        )
    };
    wait_for("node annotations", Duration::from_secs(15), || {
        ann("netboot.io/kube-proxy-replacement") == "true"
    });
    assert_eq!(
        ann("netboot.io/datapath-version"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(ann("netboot.io/kube-proxy-rules"), "absent");
    // What it serves, in the contract's vocabulary (the handover's gate reads it).
    assert_eq!(
        netboot_contract::features::parse(&ann("netboot.io/datapath-features")),
        netboot_datapath::desired::served()
    );

    // Endpoints removed in the API → connect refused fast.
    let t = Instant::now();
    kubectl.ok(
        &["delete", "endpointslice", "-n", "default", "web-manual"],
        None,
    );
    wait_for(
        "ECONNREFUSED after endpoints removal",
        Duration::from_secs(15),
        || {
            client(
                &cg.path,
                &topo.client,
                ClientOp::Tcp {
                    addr: vip,
                    count: 1,
                },
            )[0]
            .errno
                == libc::ECONNREFUSED
        },
    );
    println!(
        "NUMBERS api: endpoint removal reached the datapath in {:?}",
        t.elapsed()
    );

    // Service deleted → VIP no longer translated.
    kubectl.ok(&["delete", "service", "-n", "default", "web"], None);
    wait_for(
        "VIP untranslated after Service deletion",
        Duration::from_secs(15),
        || {
            client(
                &cg.path,
                &topo.client,
                ClientOp::Tcp {
                    addr: vip,
                    count: 1,
                },
            )[0]
            .errno
                == libc::ENETUNREACH
        },
    );
    // Only the API server's own default/kubernetes Service (no endpoints here) is left.
    let out = Command::new(BIN)
        .args(["service", "list", "-o", "json", "--bpffs"])
        .arg(pins.pins.root())
        .output()
        .expect("cli");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let fronts: Vec<&str> = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["frontend"].as_str())
        .collect();
    assert_eq!(fronts, vec!["10.96.0.1:443/TCP"]);
    let (code, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("netboot_datapath_services 1"), "{metrics}");

    // kube-proxy hand-off.
    let rules = RulesNetns::new(Some(&topo.client.path()));
    let present = || {
        handover::detect(&rules, &IpvsOwnership::default())
            .expect("detect")
            .present()
    };
    let write_rules = || {
        in_ns(&topo.client, "iptables-nft-restore", &["-w"], Some(RULES));
        assert!(present());
    };
    let st = || -> serde_json::Value {
        let (_, body) = http_get(&listen, "/v1/status").expect("/v1/status");
        serde_json::from_str(&body).expect("status json")
    };
    let agent_log = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
    // The agent's account of its start: every step, in the order they depend on.
    let s = st();
    let step = |k: &str| {
        s["startup"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("startup.{k} missing: {s}"))
    };
    assert!(s["startup"]["servicesListed"].as_u64() >= Some(1), "{s}");
    assert!(step("datapathInstalledMs") <= step("firstPassMs"), "{s}");
    assert!(step("servicesListedMs") <= step("firstPassMs"), "{s}");
    assert!(step("endpointSlicesListedMs") <= step("firstPassMs"), "{s}");
    assert!(step("nodeReadMs") <= step("firstPassMs"), "{s}");
    assert!(step("firstPassMs") <= step("syncedMs"), "{s}");
    // Without the colours tracing may write.
    let log: String = {
        let raw = agent_log("agent.log");
        let mut out = String::with_capacity(raw.len());
        let mut esc = false;
        for c in raw.chars() {
            match (esc, c) {
                (false, '\x1b') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    assert!(
        log.contains("listed kind=Service ") && log.contains("listed kind=EndpointSlice "),
        "no list lines in the agent log:\n{log}"
    );
    assert!(
        log.contains("initial sync complete startup=synced at "),
        "{log}"
    );
    // The first kube-proxy rules check (iptables-save, nft: processes that
    // would take the CPU the lists and the first pass need) waits for it.
    let synced_at = log.find("initial sync complete").unwrap_or(usize::MAX);
    let first_check = log.find("kube-proxy rules cleanup").unwrap_or(usize::MAX);
    assert!(
        first_check != usize::MAX && synced_at < first_check,
        "the first rules check came before the initial sync:\n{log}"
    );
    wait_for("kube-proxy known absent", Duration::from_secs(15), || {
        st()["kubeProxy"] == "absent"
    });
    assert_eq!(st()["kubeProxyDaemonSet"], "kube-system/kube-proxy");
    assert_eq!(st()["kubeProxyCleanup"], "active");
    // Other DaemonSets (another name, or the name in another namespace) are not kube-proxy.
    wait_for("namespace kube-system", Duration::from_secs(30), || {
        kubectl.run(&["get", "namespace", "kube-system"], None).0
    });
    kubectl.ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "{}---\n{}",
            daemon_set("default", "kube-proxy"),
            daemon_set("kube-system", "kube-proxy-canary")
        )),
    );
    write_rules();
    wait_for(
        "rules removed while only other DaemonSets exist",
        Duration::from_secs(10),
        || !present(),
    );
    assert_eq!(st()["kubeProxy"], "absent");

    // kube-proxy installed: rules are left alone and reported present.
    kubectl.ok(
        &["apply", "-f", "-"],
        Some(&daemon_set("kube-system", "kube-proxy")),
    );
    wait_for("kube-proxy seen installed", Duration::from_secs(15), || {
        st()["kubeProxy"] == "installed"
    });
    write_rules();
    let before = rules_only(&in_ns(&topo.client, "iptables-nft-save", &[], None));
    wait_for("rules annotation present", Duration::from_secs(15), || {
        ann("netboot.io/kube-proxy-rules") == "present"
    });
    std::thread::sleep(Duration::from_secs(3)); // 3 node intervals
    assert_eq!(
        rules_only(&in_ns(&topo.client, "iptables-nft-save", &[], None)),
        before,
        "rules touched while kube-proxy is installed:\n{}",
        agent_log("agent.log")
    );
    let s = st();
    assert_eq!(s["kubeProxyCleanup"], "held-back", "{s}");
    assert_eq!(s["kubeProxyRules"], "present", "{s}");
    let (_, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert!(
        metrics.contains("\nnetboot_kube_proxy_installed 1\n"),
        "{metrics}"
    );

    // Deleted: gone within seconds.
    let t = Instant::now();
    kubectl.ok(
        &["delete", "daemonset", "-n", "kube-system", "kube-proxy"],
        None,
    );
    wait_for(
        "rules removed after kube-proxy's deletion",
        Duration::from_secs(5),
        || !present(),
    );
    let gone = t.elapsed();
    wait_for("rules annotation absent", Duration::from_secs(10), || {
        ann("netboot.io/kube-proxy-rules") == "absent"
    });
    let (_, metrics) = http_get(&listen, "/metrics").expect("metrics");
    assert!(
        metrics.contains("\nnetboot_kube_proxy_installed 0\n"),
        "{metrics}"
    );

    // Re-created (a human, or a rollback): cleaning stops again.
    kubectl.ok(
        &["apply", "-f", "-"],
        Some(&daemon_set("kube-system", "kube-proxy")),
    );
    wait_for(
        "kube-proxy seen re-installed",
        Duration::from_secs(15),
        || st()["kubeProxy"] == "installed",
    );
    write_rules();
    std::thread::sleep(Duration::from_secs(3));
    assert!(present(), "rules removed after kube-proxy came back");

    // The deletion wakes the agent: with a 30 s check interval, rules still
    // go within seconds of the DaemonSet's deletion.
    drop(agent.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    agent = ChildGuard(Some(start_agent("30", "agent-slow.log")));
    wait_ready(&listen, Duration::from_secs(30));
    wait_for(
        "restarted agent sees kube-proxy",
        Duration::from_secs(15),
        || st()["kubeProxy"] == "installed",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        present(),
        "restarted agent removed rules of an installed kube-proxy"
    );
    let t = Instant::now();
    kubectl.ok(
        &["delete", "daemonset", "-n", "kube-system", "kube-proxy"],
        None,
    );
    wait_for(
        "rules removed after deletion, without waiting for the 30 s interval",
        Duration::from_secs(5),
        || !present(),
    );
    let woken = t.elapsed();
    assert!(
        agent_log("agent-slow.log").contains("kube-proxy state changed"),
        "{}",
        agent_log("agent-slow.log")
    );
    println!(
        "NUMBERS api: kube-proxy DaemonSet deleted → rules removed in {gone:?} (1 s interval), {woken:?} (30 s interval)"
    );
    drop(agent);

    // Map pressure reaches the operator as Events on the Node (issue 17): a
    // `MapFull` Warning when Services do not fit, `MapPressureResolved` once
    // they do again. Tiny maps need fresh pins (a pinned map keeps its size).
    let pins_mf = TestPins::new("apisrv-mf");
    std::fs::write(
        d.join("config-mf.yaml"),
        format!("apiServer: {{host: 127.0.0.1, port: {ap}}}\nmapSizes: {{services: 16, backends: 16, affinity: 16, reverseNat: 16}}\n"),
    )
    .expect("config");
    let _agent = ChildGuard(Some(
        Command::new(BIN)
            .args(["agent", "--node-name", "nbt-dp-node", "--listen", &listen])
            .args(["--node-interval", "1", "--config"])
            .arg(d.join("config-mf.yaml"))
            .arg("--kubeconfig")
            .arg(&agent_kc)
            .arg("--cgroup")
            .arg(&cg.path)
            .arg("--bpffs")
            .arg(pins_mf.pins.root())
            .arg("--rules-netns")
            .arg(topo.client.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(d.join("agent-mapfull.log")).expect("log"),
            ))
            .spawn()
            .expect("agent"),
    ));
    // default/kubernetes takes 1 entry of 16; each of these 2 (slot 0 + its
    // endpoint): 7 fit, the 8th does not.
    let extra: Vec<String> = (1..=8)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: mf{i}, namespace: default}}\nspec:\n  clusterIP: 10.96.0.9{i}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: mf{i}-1, namespace: default, labels: {{kubernetes.io/service-name: mf{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [10.244.1.1], conditions: {{ready: true}}}}\n"
            )
        })
        .collect();
    kubectl.ok(&["apply", "-f", "-"], Some(&extra.join("---\n")));
    let events = |reason: &str| -> Vec<serde_json::Value> {
        let out = kubectl.ok(
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                "default",
                "--field-selector",
                &format!("reason={reason}"),
                "-o",
                "json",
            ],
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("events json");
        v["items"].as_array().cloned().unwrap_or_default()
    };
    let t = Instant::now();
    while events("MapFull").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no MapFull Event within 20 s; agent log:\n{}",
            agent_log("agent-mapfull.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let full = events("MapFull");
    let e = &full[0];
    assert_eq!(e["type"], "Warning", "{e}");
    assert_eq!(e["regarding"]["kind"], "Node", "{e}");
    assert_eq!(e["regarding"]["name"], "nbt-dp-node", "{e}");
    assert_eq!(e["reportingController"], "netboot-datapath", "{e}");
    let note = e["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("not programmed") && note.contains("nb_lb4_svc"),
        "{note}"
    );
    println!(
        "NUMBERS api: MapFull Event posted {:?} after the Services were created",
        t.elapsed()
    );
    assert!(events("MapPressureResolved").is_empty());
    kubectl.ok(&["delete", "service", "-n", "default", "mf8"], None);
    wait_for(
        "a MapPressureResolved Event once everything fits",
        Duration::from_secs(20),
        || !events("MapPressureResolved").is_empty(),
    );
    assert_eq!(events("MapPressureResolved")[0]["type"], "Normal");
}

fn daemon_set(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: {name}, namespace: {namespace}, labels: {{k8s-app: kube-proxy}}}}
spec:
  selector: {{matchLabels: {{k8s-app: kube-proxy}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-proxy}}}}
    spec: {{containers: [{{name: kube-proxy, image: registry.k8s.io/kube-proxy:v1.36.3}}]}}
"
    )
}
