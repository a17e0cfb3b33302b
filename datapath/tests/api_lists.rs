//! The protobuf lists against a real API server: a varied set of Services
//! and EndpointSlices listed in protobuf and in JSON, in pages of two,
//! must leave the agent's stores the same (what it keeps of each object,
//! its resourceVersion and its trigger time). And the list-watch's
//! `410 Gone` path against the real thing: a watch resuming after an API
//! server restart, past an etcd compaction, lists again.
//!
//! Needs the cached kube-apiserver and etcd (tests/cluster/build), not
//! root.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::BTreeMap;
use std::process::Command;

use netboot_datapath::lean::{LeanService, LeanSlice};
use netboot_datapath::listwatch::{self, Encoding, Listable};
use netboot_datapath::service::Svc;
use netboot_datapath::slice::Slice;
use netboot_datapath::watch;

/// An object of a list, as the stores keep it.
type Listed<T> = (netboot_datapath::desired::ServiceKey, watch::Listed<T>);
use netboot_harness::controlplane;

const OBJECTS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: lists}
---
apiVersion: v1
kind: Service
metadata:
  name: affinity
  namespace: lists
  labels: {service.kubernetes.io/service-proxy-name: other, app: x}
  annotations: {service.kubernetes.io/topology-mode: Auto, unrelated: '{\"big\": true}'}
spec:
  selector: {app: x}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  internalTrafficPolicy: Local
  trafficDistribution: PreferClose
---
apiVersion: v1
kind: Service
metadata: {name: nodeport, namespace: lists}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  externalIPs: [192.0.2.50]
  ports: [{name: web, port: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: lists}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  loadBalancerSourceRanges: [198.51.100.0/24]
  ports: [{port: 443, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: lists, labels: {service.kubernetes.io/headless: ''}}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: lists}
spec: {type: ExternalName, externalName: example.invalid}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: affinity-1
  namespace: lists
  labels: {kubernetes.io/service-name: affinity}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-12-04T10:11:12Z', other: x}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {port: 53, protocol: UDP}, {name: no-port}]
endpoints:
- addresses: [10.244.1.1]
  conditions: {ready: true}
  nodeName: node-1
  zone: z1
  targetRef: {kind: Pod, name: p1}
  hints: {forZones: [{name: z1}]}
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: true, terminating: true}
  targetRef: {kind: Pod, namespace: elsewhere, name: p2}
- addresses: [10.244.1.3]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: affinity-v6, namespace: lists, labels: {kubernetes.io/service-name: affinity}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ['fd00::1'], conditions: {ready: true, serving: true, terminating: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: empty, namespace: lists, labels: {kubernetes.io/service-name: nodeport}}
addressType: FQDN
endpoints: []
";

const LB_STATUS: &str = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.80","ipMode":"Proxy"},{"hostname":"lb.example.invalid"}]}}}"#;

async fn all<K: Listable>(c: &kube::Client, enc: Encoding) -> (Vec<K::Listed>, Option<String>) {
    let (mut items, mut token, mut rv) = (Vec::new(), None, None);
    loop {
        let p = listwatch::page::<K>(c, enc, 2, token)
            .await
            .unwrap_or_else(|e| panic!("api_lists: list {enc:?}: {e}"));
        assert_eq!(
            p.protobuf,
            enc == Encoding::Protobuf,
            "answered in the encoding asked for"
        );
        items.extend(p.items);
        rv = p.resource_version.or(rv);
        token = p.continue_token;
        if token.is_none() {
            return (items, rv);
        }
    }
}

#[test]
fn protobuf_and_json_lists_fill_the_stores_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cp = rt
        .block_on(controlplane::ControlPlane::start(dir.path(), "10.96.0.0/16"))
        .unwrap_or_else(|e| {
            panic!("api_lists: {e} (tests/cluster/build fills the cache; NETBOOT_CACHE overrides ~/.cache/netboot)")
        });
    let kubectl = controlplane::cached("k8s", "kubectl").expect("kubectl");
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new(&kubectl);
        c.arg("--kubeconfig").arg(&cp.admin).args(args);
        let out = if let Some(s) = stdin {
            use std::io::Write;
            let mut ch = c
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl");
            ch.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
            ch.wait_with_output().unwrap()
        } else {
            c.output().expect("kubectl")
        };
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["apply", "-f", "-"], Some(OBJECTS));
    run(
        &[
            "-n",
            "lists",
            "patch",
            "service",
            "lb",
            "--subresource=status",
            "--type=merge",
            "-p",
            LB_STATUS,
        ],
        None,
    );

    let c = &cp.client;
    let (svc_pb, rv_pb) = rt.block_on(all::<LeanService>(c, Encoding::Protobuf));
    let (svc_js, rv_js) = rt.block_on(all::<LeanService>(c, Encoding::Json));
    assert!(
        rv_pb.is_some() && rv_js.is_some(),
        "lists carry a resourceVersion"
    );
    let kept = |v: &[Listed<Svc>]| -> BTreeMap<String, (Svc, Option<String>, String)> {
        v.iter()
            .map(|((ns, name), l)| {
                let trig = format!("{:?}", l.trigger());
                (
                    format!("{ns}/{name}"),
                    (
                        l.object().clone(),
                        l.version().map(ToString::to_string),
                        trig,
                    ),
                )
            })
            .collect()
    };
    let (a, b) = (kept(&svc_pb), kept(&svc_js));
    assert!(
        a.len() >= 6,
        "the Services of the test and kubernetes: {:?}",
        a.keys()
    );
    assert_eq!(a, b, "Services: protobuf against JSON");
    // Not vacuous: the fields that differ most between the encodings came through.
    let lb = &a["lists/lb"].0;
    let ext = lb
        .external
        .as_deref()
        .expect("lb has source ranges and ingress");
    assert_eq!(ext.ingress.len(), 2);
    assert_eq!(ext.ingress[0].ip_mode.as_deref(), Some("Proxy"));
    assert_eq!(lb.allocate_load_balancer_node_ports, Some(false));
    let aff = &a["lists/affinity"].0;
    assert_eq!(aff.affinity_timeout, Some(300));
    assert_eq!(aff.traffic_distribution.as_deref(), Some("PreferClose"));
    assert!(aff.labels.is_some() && aff.annotations.is_some());
    assert_eq!(a["lists/nodeport"].0.ports[0].node_port, Some(30080));
    assert_eq!(
        a["lists/nodeport"].0.external_traffic_policy.as_deref(),
        Some("Local")
    );
    assert_eq!(
        a["lists/affinity"].0.external_traffic_policy, None,
        "empty in protobuf is unset"
    );
    assert!(
        a["lists/affinity"].2.contains("Some"),
        "a Service's trigger time"
    );

    let (sl_pb, _) = rt.block_on(all::<LeanSlice>(c, Encoding::Protobuf));
    let (sl_js, _) = rt.block_on(all::<LeanSlice>(c, Encoding::Json));
    let kept = |v: &[Listed<Slice>]| -> BTreeMap<String, (Slice, Option<String>, String)> {
        v.iter()
            .map(|((ns, name), l)| {
                (
                    format!("{ns}/{name}"),
                    (
                        l.object().clone(),
                        l.version().map(ToString::to_string),
                        format!("{:?}", l.trigger()),
                    ),
                )
            })
            .collect()
    };
    let (a, b) = (kept(&sl_pb), kept(&sl_js));
    assert!(a.len() >= 3, "{:?}", a.keys());
    assert_eq!(a, b, "EndpointSlices: protobuf against JSON");
    let s = &a["lists/affinity-1"].0;
    assert_eq!(s.endpoints.len(), 3);
    assert_eq!(s.endpoints[0].node.as_deref(), Some("node-1"));
    assert_eq!(
        s.endpoints[0].hints.as_ref().map(|h| h.zones.clone()),
        Some(vec!["z1".to_string()])
    );
    assert_eq!(
        s.pod(&s.endpoints[0]).as_deref(),
        Some("lists/p1"),
        "a targetRef without a namespace is in the slice's"
    );
    assert_eq!(s.pod(&s.endpoints[1]).as_deref(), Some("elsewhere/p2"));
    assert_eq!(s.pod(&s.endpoints[2]), None);
    assert!(a["lists/affinity-1"].1.is_some(), "a resourceVersion");
    assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
    assert_eq!(s.ports.len(), 3);
    assert!(
        a["lists/affinity-1"].2.contains("Some"),
        "the slice's trigger time"
    );
    assert_eq!(
        a["lists/affinity-v6"].0.endpoints[0].ip,
        Some("fd00::1".parse().unwrap())
    );
}

/// What the test saw of a list-watch stream, in order.
#[derive(Debug)]
#[allow(dead_code)] // the names and messages are read in failure messages ({:?})
enum Seen {
    /// A complete (re)list: the `namespace/name`s in it.
    Listed(Vec<String>),
    Apply(String),
    Delete(String),
    /// An error, with the API status code when the server sent one.
    Error(Option<u16>, String),
}

/// The status code a watcher error carries, if the API server sent one.
fn status_code(e: &kube::runtime::watcher::Error) -> Option<u16> {
    use kube::runtime::watcher::Error as W;
    match e {
        W::WatchError(s) => Some(s.code),
        W::WatchStartFailed(kube::Error::Api(s))
        | W::WatchFailed(kube::Error::Api(s))
        | W::InitialListFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

/// Waits up to `within` for an event of `rx` matching `f`; the events seen
/// on the way (the matching one last).
fn until(
    rx: &std::sync::mpsc::Receiver<Seen>,
    within: std::time::Duration,
    what: &str,
    f: impl Fn(&Seen) -> bool,
) -> Vec<Seen> {
    let deadline = std::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => {
                let done = f(&s);
                seen.push(s);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("api_lists: no {what} within {within:?}; saw {seen:#?}"),
        }
    }
}

/// The agent's list-watch when the API server restarts after etcd compacted
/// past the watch's version, and a Service was deleted meanwhile (no watch
/// ever carries its Delete): the resumed watch must be answered 410 Gone
/// and the stream must list again, without the deleted Service. Without the
/// relist the agent would keep the Service's frontends for ever.
#[test]
fn a_watch_too_old_after_compaction_and_an_api_server_restart_lists_again() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, PostParams};
    use kube::runtime::WatchStreamExt;
    use kube::ResourceExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut cp = rt
        .block_on(controlplane::ControlPlane::start(dir.path(), "10.96.0.0/16"))
        .unwrap_or_else(|e| {
            panic!("api_lists: {e} (tests/cluster/build fills the cache; NETBOOT_CACHE overrides ~/.cache/netboot)")
        });
    rt.block_on(cp.create_namespace("gone")).expect("namespace");
    let svcs: Api<Service> = Api::namespaced(cp.client.clone(), "gone");
    for name in ["kept", "deleted"] {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}]},
        }))
        .expect("service");
        rt.block_on(svcs.create(&PostParams::default(), &s))
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    // The stream as the agent runs it (pages of 2, kube-runtime's backoff),
    // on the runtime's threads; what it yields goes to this thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let stream = listwatch::list_watch::<LeanService>(cp.client.clone(), 2).default_backoff();
    rt.spawn(async move {
        futures::pin_mut!(stream);
        let mut list: Option<Vec<String>> = None;
        while let Some(ev) = stream.next().await {
            let seen = match ev {
                Ok(listwatch::Event::Init) => {
                    list = Some(Vec::new());
                    continue;
                }
                Ok(listwatch::Event::InitApply(((ns, name), _))) => {
                    list.get_or_insert_with(Vec::new)
                        .push(format!("{ns}/{name}"));
                    continue;
                }
                Ok(listwatch::Event::InitDone) => Seen::Listed(list.take().unwrap_or_default()),
                Ok(listwatch::Event::Apply(o)) => Seen::Apply(format!(
                    "{}/{}",
                    o.namespace().unwrap_or_default(),
                    o.name_any()
                )),
                Ok(listwatch::Event::Delete(o)) => Seen::Delete(format!(
                    "{}/{}",
                    o.namespace().unwrap_or_default(),
                    o.name_any()
                )),
                Err(e) => Seen::Error(status_code(&e), e.to_string()),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    let has = |l: &[String], n: &str| l.iter().any(|x| x == n);
    let first = until(&rx, Duration::from_secs(60), "first list", |s| {
        matches!(s, Seen::Listed(_))
    });
    match first.last() {
        Some(Seen::Listed(l)) => assert!(
            has(l, "gone/kept") && has(l, "gone/deleted"),
            "the first list has both Services: {l:?}"
        ),
        other => panic!("not a list: {other:?}"),
    }

    // The API server goes away; meanwhile `deleted` goes from etcd and
    // etcd compacts its history, as a control-plane restart after a
    // compaction leaves a watcher that was away.
    cp.stop_apiserver();
    let deleted = rt
        .block_on(cp.etcd_delete("services/specs/gone/deleted"))
        .expect("etcd delete");
    assert_eq!(deleted, 1, "the Service's key was in etcd");
    let rev = rt.block_on(cp.etcd_compact()).expect("etcd compact");
    assert!(rev > 0);
    rt.block_on(cp.start_apiserver()).expect("API server again");

    let after = until(
        &rx,
        Duration::from_secs(120),
        "relist after the restart",
        |s| matches!(s, Seen::Listed(_)),
    );
    eprintln!("api_lists: after the restart: {after:?}");
    match after.last() {
        Some(Seen::Listed(l)) => {
            assert!(
                has(l, "gone/kept"),
                "the relist has the kept Service: {l:?}"
            );
            assert!(
                !has(l, "gone/deleted"),
                "the relist lacks the Service deleted while the watch was away: {l:?}"
            );
        }
        other => panic!("not a list: {other:?}"),
    }
    assert!(
        after.iter().any(|s| matches!(s, Seen::Error(Some(410), _))),
        "the resumed watch was answered 410 Gone before the relist: {after:#?}"
    );
    assert!(
        !after
            .iter()
            .any(|s| matches!(s, Seen::Delete(n) if n == "gone/deleted")),
        "no watch carried the deletion (it happened behind the API server): {after:#?}"
    );
    drop(rx);
}
