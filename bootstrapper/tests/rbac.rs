//! Least privilege, proven on the local real cluster (issue 17): acting as
//! each ServiceAccount netboot renders (the reconciler's and the agent's),
//! with exactly the RBAC and admission policies netboot renders for it, the
//! API server refuses (403) what is outside its job and allows what apply,
//! handover, rollback and reconcile do. Writes are dry-run: authorization and
//! admission run, nothing is stored. The full handover and restore as the
//! reconciler is `gitops::the_reconciler_service_account_can_hand_over_and_restore_kube_proxy`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::{netboot_env, scenario};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use netboot_harness::cluster::{repo_root, SharedCluster};
use serde_json::{json, Value};

/// The local spec in coexist mode (no handover needed to install it), with
/// a reconciler, so its ServiceAccount, RBAC and policy are rendered.
fn spec_text() -> String {
    let local = std::fs::read_to_string(repo_root().join("clusters/local.yaml")).unwrap();
    format!(
        "{}  reconcile:\n    repo: file:///nonexistent/netboot-clusters.git\n",
        local.replace("kubeProxyReplacement: true", "kubeProxyReplacement: false")
    )
}

const GROUPS: [&str; 3] = [
    "system:serviceaccounts",
    "system:serviceaccounts:NS",
    "system:authenticated",
];

/// The admin kubeconfig acting as `user` with a ServiceAccount's groups (and
/// `extra`, e.g. the node name a bound token carries).
fn impersonating(
    c: &SharedCluster,
    ns: &str,
    user: &str,
    extra: Option<(&str, &str)>,
) -> Kubeconfig {
    let mut kc = Kubeconfig::read_from(&c.kubeconfig).unwrap();
    for named in &mut kc.auth_infos {
        let a = named.auth_info.as_mut().unwrap();
        a.impersonate = Some(user.into());
        a.impersonate_groups = Some(GROUPS.iter().map(|g| g.replace("NS", ns)).collect());
        a.impersonate_user_extra =
            extra.map(|(k, v)| HashMap::from([(k.to_string(), vec![v.to_string()])]));
    }
    kc
}

async fn client_as(kc: Kubeconfig) -> Client {
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

/// Checks collected so a failure lists every wrong answer at once.
#[derive(Default)]
struct Verdicts(Vec<String>);

impl Verdicts {
    /// `r` must be a 403.
    fn denied<T>(&mut self, what: &str, r: Result<T, kube::Error>) {
        match r {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            Err(e) => self.0.push(format!("{what}: want 403, got {e}")),
            Ok(_) => self.0.push(format!("{what}: want 403, was allowed")),
        }
    }

    /// `r` must not be a 403 (a 404 or 409 means it was authorized and
    /// admitted, and found the object absent or present).
    fn allowed<T>(&mut self, what: &str, r: Result<T, kube::Error>) {
        match r {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {}
            Err(e) => self.0.push(format!("{what}: want allowed, got {e}")),
        }
    }

    fn assert_all(self, who: &str) {
        assert!(self.0.is_empty(), "{who}:\n  {}", self.0.join("\n  "));
    }
}

fn post() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

fn delete() -> DeleteParams {
    DeleteParams {
        dry_run: true,
        ..Default::default()
    }
}

fn apply() -> PatchParams {
    PatchParams::apply("netboot").force().dry_run()
}

fn merge() -> PatchParams {
    PatchParams::default().dry_run()
}

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn probe_pod(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"netboot.io/probe": "true"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{"name": "client", "image": "netboot-probe", "command": ["netboot-probe"],
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"}}}],
        },
    })
}

fn lease(name: &str) -> Lease {
    obj(json!({"metadata": {"name": name, "namespace": "kube-system"}, "spec": {}}))
}

fn bind_cluster_admin(kind: &str, name: &str, ns: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    })
}

/// What neither account may do: other workloads, Secrets, other Leases,
/// cluster-admin, Namespaces.
async fn outside_every_job(v: &mut Verdicts, client: &Client, ns: &str, sa: &str) {
    let ds_sys: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let ds_own: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    v.denied(
        "delete DaemonSet kube-system/unrelated",
        ds_sys.delete("unrelated", &delete()).await,
    );
    v.denied(
        "delete DaemonSet <ns>/unrelated",
        ds_own.delete("unrelated", &delete()).await,
    );
    let pods_sys: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    v.denied(
        "create a Pod in kube-system",
        pods_sys
            .create(&post(), &obj(probe_pod("kube-system", "rbac-test")))
            .await,
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    v.denied(
        "update Lease kube-system/kube-scheduler",
        leases
            .replace("kube-scheduler", &post(), &lease("kube-scheduler"))
            .await,
    );
    v.denied(
        "create Lease kube-system/not-netboots",
        leases.create(&post(), &lease("not-netboots")).await,
    );
    let secrets_sys: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let secrets_own: Api<Secret> = Api::namespaced(client.clone(), ns);
    v.denied("get Secret kube-system/any", secrets_sys.get("any").await);
    v.denied(
        "list Secrets in <ns>",
        secrets_own.list(&ListParams::default()).await,
    );
    let crb: Api<ClusterRoleBinding> = Api::all(client.clone());
    v.denied(
        "bind cluster-admin (ClusterRoleBinding)",
        crb.create(
            &post(),
            &obj(bind_cluster_admin(
                "ClusterRoleBinding",
                "rbac-test",
                ns,
                sa,
            )),
        )
        .await,
    );
    let rb: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    v.denied(
        "bind cluster-admin (RoleBinding in <ns>)",
        rb.create(
            &post(),
            &obj(bind_cluster_admin("RoleBinding", "rbac-test", ns, sa)),
        )
        .await,
    );
    let cr: Api<ClusterRole> = Api::all(client.clone());
    v.denied(
        "create ClusterRole rbac-test",
        cr.create(
            &post(),
            &obj(json!({"metadata": {"name": "rbac-test"}, "rules": []})),
        )
        .await,
    );
    let nss: Api<Namespace> = Api::all(client.clone());
    v.denied(
        "delete Namespace kube-system",
        nss.delete("kube-system", &delete()).await,
    );
    v.denied("delete Namespace <ns>", nss.delete(ns, &delete()).await);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    v.denied(
        "delete ConfigMap kube-system/coredns",
        cms.delete("coredns", &delete()).await,
    );
}

#[test]
fn the_reconciler_is_refused_everything_outside_its_job() {
    scenario(|c| async move {
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("local.yaml");
        std::fs::write(&spec_path, spec_text()).unwrap();
        let spec = netboot::spec::load(&spec_path).unwrap();
        let (ns, cluster) = (spec.namespace.clone(), spec.name.clone());
        let kp = spec.kube_proxy.clone();
        let sp = spec_path.to_str().unwrap();
        let cache = dir.path().join("cache");
        let run = netboot_env(
            &["apply", sp, "--kubeconfig", c.kubeconfig.to_str().unwrap()],
            &cache,
            &[],
        );
        assert_eq!(run.code, 0, "the admin's install: {}", run.stderr);

        let user = format!("system:serviceaccount:{ns}:netboot-reconciler");
        let kc = impersonating(&c, &ns, &user, None);
        let kc_path = dir.path().join("reconciler.kubeconfig");
        std::fs::write(&kc_path, serde_yaml::to_string(&kc).unwrap()).unwrap();
        let client = client_as(kc).await;
        let mut v = Verdicts::default();
        outside_every_job(&mut v, &client, &ns, "netboot-reconciler").await;

        // Its own policy: what RBAC cannot name.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut privileged = probe_pod(&ns, "rbac-test-privileged");
        privileged["spec"]["containers"][0]["securityContext"]["privileged"] = json!(true);
        // A valid pod (privileged with escalation allowed), so only the policy can refuse it.
        privileged["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
            json!(true);
        v.denied(
            "create a privileged pod in <ns>",
            pods.create(&post(), &obj(privileged)).await,
        );
        let mut host = probe_pod(&ns, "rbac-test-host");
        host["spec"]["hostNetwork"] = json!(true);
        v.denied(
            "create a hostNetwork pod in <ns>",
            pods.create(&post(), &obj(host)).await,
        );
        let mut with_sa = probe_pod(&ns, "rbac-test-sa");
        with_sa["spec"]["serviceAccountName"] = json!("netboot-datapath");
        with_sa["spec"]["automountServiceAccountToken"] = json!(true);
        v.denied(
            "create a pod with the agent's token in <ns>",
            pods.create(&post(), &obj(with_sa)).await,
        );
        let nodes: Api<Node> = Api::all(client.clone());
        v.denied(
            "patch Node node-0",
            nodes
                .patch(
                    "node-0",
                    &merge(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
                )
                .await,
        );
        let kp_ds: Api<DaemonSet> = Api::namespaced(client.clone(), &kp.namespace);
        let mut other_ds: DaemonSet = kp_ds.get(&kp.daemon_set).await.unwrap();
        other_ds.metadata = obj(json!({"name": "rbac-test", "namespace": kp.namespace}));
        other_ds.status = None;
        v.denied(
            "create DaemonSet <kube-proxy ns>/rbac-test",
            kp_ds.create(&post(), &other_ds).await,
        );
        let own_cr: Api<ClusterRole> = Api::all(client.clone());
        v.denied(
            "escalate: add Secrets to its own ClusterRole",
            own_cr
                .patch(
                    &format!("netboot-reconciler-{cluster}"),
                    &apply(),
                    &Patch::Apply(json!({
                        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                        "metadata": {"name": format!("netboot-reconciler-{cluster}")},
                        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
                    })),
                )
                .await,
        );

        // What apply, handover, rollback and reconcile do.
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
        v.allowed(
            "create Lease kube-system/netboot-lock",
            leases.create(&post(), &lease("netboot-lock")).await,
        );
        // An update is a compare-and-swap on the live object (as lock.rs does).
        let mut live = lease("netboot-lock");
        if let Ok(Some(l)) = leases.get_opt("netboot-lock").await {
            live.metadata.resource_version = l.metadata.resource_version;
        }
        v.allowed(
            "update Lease kube-system/netboot-lock",
            leases.replace("netboot-lock", &post(), &live).await,
        );
        let kp_cm: Api<ConfigMap> = Api::namespaced(client.clone(), &kp.namespace);
        v.allowed(
            "get kube-proxy's DaemonSet",
            kp_ds.get(&kp.daemon_set).await,
        );
        v.allowed(
            "get kube-proxy's ConfigMap",
            kp_cm.get(&kp.config_map).await,
        );
        v.allowed(
            "list kube-proxy's pods",
            Api::<Pod>::namespaced(client.clone(), &kp.namespace)
                .list(&ListParams::default().labels("k8s-app=kube-proxy"))
                .await,
        );
        v.allowed(
            "delete kube-proxy's DaemonSet (handover)",
            kp_ds.delete(&kp.daemon_set, &delete()).await,
        );
        v.allowed(
            "delete kube-proxy's ConfigMap (handover)",
            kp_cm.delete(&kp.config_map, &delete()).await,
        );
        let mut restore: DaemonSet = kp_ds.get(&kp.daemon_set).await.unwrap();
        restore.metadata.resource_version = None;
        restore.metadata.uid = None;
        restore.metadata.managed_fields = None;
        restore.status = None;
        v.allowed(
            "create kube-proxy's DaemonSet (rollback; 409: it exists)",
            kp_ds.create(&post(), &restore).await,
        );
        let own_cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        for name in ["netboot-inventory", "netboot-kube-proxy-backup"] {
            v.allowed(
                &format!("apply ConfigMap <ns>/{name}"),
                own_cms
                    .patch(
                        name,
                        &apply(),
                        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": name, "namespace": ns}, "data": {"x": "y"}})),
                    )
                    .await,
            );
        }
        v.allowed(
            "create a probe pod in <ns>",
            pods.create(&post(), &obj(probe_pod(&ns, "rbac-test-probe")))
                .await,
        );
        v.allowed(
            "delete probe pods in <ns>",
            pods.delete_collection(
                &delete(),
                &ListParams::default().labels("netboot.io/probe=true"),
            )
            .await,
        );
        v.allowed(
            "apply the probe Service",
            Api::<Service>::namespaced(client.clone(), &ns)
                .patch(
                    "netboot-probe",
                    &apply(),
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "netboot-probe", "namespace": ns},
                        "spec": {"ports": [{"port": 80}]}})),
                )
                .await,
        );
        v.allowed("list Nodes", nodes.list(&ListParams::default()).await);
        v.assert_all("the reconciler");

        // `plan` dry-runs every object apply writes (SSA creates included)
        // and reads every gate's inputs: all of it as the reconciler.
        let run = netboot_env(
            &["plan", sp, "--kubeconfig", kc_path.to_str().unwrap()],
            &cache,
            &[],
        );
        assert_eq!(run.code, 0, "plan as the reconciler: {}", run.stderr);
        assert!(!run.stderr.contains("forbidden"), "{}", run.stderr);
    });
}

#[test]
fn the_agent_is_refused_everything_outside_its_job() {
    scenario(|c| async move {
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("local.yaml");
        std::fs::write(&spec_path, spec_text()).unwrap();
        let spec = netboot::spec::load(&spec_path).unwrap();
        let ns = spec.namespace.clone();
        let kp = spec.kube_proxy.clone();
        let run = netboot_env(
            &[
                "apply",
                spec_path.to_str().unwrap(),
                "--kubeconfig",
                c.kubeconfig.to_str().unwrap(),
            ],
            &dir.path().join("cache"),
            &[],
        );
        assert_eq!(run.code, 0, "the admin's install: {}", run.stderr);

        let user = format!("system:serviceaccount:{ns}:netboot-datapath");
        // A bound ServiceAccount token of a pod on node-0 carries its node.
        let kc = impersonating(
            &c,
            &ns,
            &user,
            Some(("authentication.kubernetes.io/node-name", "node-0")),
        );
        let client = client_as(kc).await;
        let mut v = Verdicts::default();
        outside_every_job(&mut v, &client, &ns, "netboot-datapath").await;

        let nodes: Api<Node> = Api::all(client.clone());
        let annotate = |value: &str| {
            Patch::Merge(json!({"metadata": {"annotations": {
                netboot_contract::node::KUBE_PROXY_RULES: value,
            }}}))
        };
        v.denied(
            "patch another Node (node-1)",
            nodes.patch("node-1", &merge(), &annotate("absent")).await,
        );
        v.denied(
            "label its own Node",
            nodes
                .patch(
                    "node-0",
                    &merge(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await,
        );
        let kp_ds: Api<DaemonSet> = Api::namespaced(client.clone(), &kp.namespace);
        v.denied(
            "get another DaemonSet in kube-proxy's namespace",
            kp_ds.get("rbac-test-other").await,
        );
        v.denied(
            "delete kube-proxy's DaemonSet",
            kp_ds.delete(&kp.daemon_set, &delete()).await,
        );
        v.denied(
            "create a ConfigMap in <ns>",
            Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .create(
                    &post(),
                    &obj(json!({"metadata": {"name": "rbac-test", "namespace": ns}})),
                )
                .await,
        );

        let event = |ns: &str, node: &str| -> k8s_openapi::api::events::v1::Event {
            obj(json!({
                "metadata": {"name": "rbac-test", "namespace": ns},
                "eventTime": "2026-12-02T00:00:00.000000Z",
                "reportingController": "netboot-datapath",
                "reportingInstance": "netboot-datapath-node-0",
                "action": "Reconcile",
                "reason": "MapFull",
                "type": "Warning",
                "regarding": {"apiVersion": "v1", "kind": "Node", "name": node},
            }))
        };
        let events =
            |ns: &str| Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
        v.denied(
            "post an Event regarding another Node (node-1)",
            events("default")
                .create(&post(), &event("default", "node-1"))
                .await,
        );
        v.denied(
            "post an Event in kube-system",
            events("kube-system")
                .create(&post(), &event("kube-system", "node-0"))
                .await,
        );
        v.allowed(
            "post an Event regarding its own Node (MapFull)",
            events("default")
                .create(&post(), &event("default", "node-0"))
                .await,
        );
        v.allowed(
            "annotate its own Node",
            nodes.patch("node-0", &merge(), &annotate("absent")).await,
        );
        v.allowed(
            "list Services",
            Api::<Service>::all(client.clone())
                .list(&ListParams::default())
                .await,
        );
        v.allowed(
            "list EndpointSlices",
            Api::<EndpointSlice>::all(client.clone())
                .list(&ListParams::default())
                .await,
        );
        v.allowed(
            "watch-list kube-proxy's DaemonSet by name",
            kp_ds
                .list(&ListParams::default().fields(&format!("metadata.name={}", kp.daemon_set)))
                .await,
        );
        v.allowed(
            "get kube-proxy's DaemonSet",
            kp_ds.get(&kp.daemon_set).await,
        );
        v.assert_all("the agent");
    });
}
