//! Running the real kube-proxy (built from k8s.io/kubernetes at the cluster's
//! version) for kubeadm's kube-proxy DaemonSet pods, as a kubelet would: inside
//! the node's network namespace (the pod is hostNetwork), with the pod's
//! ConfigMap volume materialized at a per-node directory, a service-account
//! token from the TokenRequest API and the cluster CA in place of the projected
//! `/var/run/secrets/kubernetes.io/serviceaccount`, and the container's command
//! with `$(NODE_NAME)` expanded. It reaches the API through the `nb-cp` proxy
//! (172.18.0.2:6443, kubeadm's controlPlaneEndpoint) like on a real node.
//!
//! One deviation, because every node shares this machine's kernel: the config's
//! `conntrack.maxPerCore` is set to 0 (kube-proxy would otherwise set the global
//! `nf_conntrack_max`, which only the initial namespace may). Everything else
//! — mode (iptables or nftables), sync periods, rules — is kube-proxy's own.
//! Pod readiness stays kwok's; when the pod goes, kube-proxy gets SIGTERM and,
//! like the real one, leaves its rules behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use super::kubelet::{run_once, until_stopped, PidBook, PodRef, RunEnd, Runner};
use crate::names::Layout;
use crate::process::Launch;

/// Where a pod's projected service-account volume is mounted.
const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why a kube-proxy pod could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The pod is not shaped like kubeadm's kube-proxy.
    #[error("Pod/{pod}: {reason}")]
    Spec {
        /// `namespace/name`.
        pod: String,
        /// What is wrong.
        reason: String,
    },
    /// An API request failed.
    #[error("Pod/{pod}: {what}")]
    Api {
        /// `namespace/name`.
        pod: String,
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A local file operation failed.
    #[error("Pod/{pod}: {what}")]
    Io {
        /// `namespace/name`.
        pod: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Settings shared by every kube-proxy podnet runs.
#[derive(Debug, Clone)]
pub struct ProxyEnv {
    /// The kube-proxy binary.
    pub binary: PathBuf,
    /// The cluster CA (`<state>/pki/ca.crt`), for the service-account volume.
    pub ca: PathBuf,
    /// Where volumes and logs go (`<state>/podnet/kube-proxy`).
    pub dir: PathBuf,
    /// Names and roots.
    pub layout: Layout,
}

/// One kube-proxy pod to run.
#[derive(Debug, Clone)]
pub struct ProxyPod {
    /// The pod.
    pub pod: PodRef,
    /// Its node.
    pub node: String,
    /// Its service account.
    pub service_account: String,
    /// command + args of the first container.
    pub argv: Vec<String>,
    /// Literal env of the container.
    pub env: Vec<(String, String)>,
    /// ConfigMap volumes: (mountPath, ConfigMap name).
    pub config_maps: Vec<(String, String)>,
    /// SIGTERM → SIGKILL grace.
    pub grace: Duration,
}

impl ProxyPod {
    /// Reads what podnet needs from a kube-proxy pod bound to `node`.
    pub fn from_pod(pod: &Pod, node: &str) -> Result<Self, ProxyError> {
        let pref = PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        };
        let spec_err = |reason: &str| ProxyError::Spec {
            pod: pref.to_string(),
            reason: reason.to_string(),
        };
        let spec = pod.spec.as_ref().ok_or_else(|| spec_err("no spec"))?;
        let c = spec
            .containers
            .first()
            .ok_or_else(|| spec_err("no containers"))?;
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        if argv.is_empty() {
            return Err(spec_err("the container has no command"));
        }
        let volumes: BTreeMap<String, String> = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.clone(), v.config_map.as_ref()?.name.clone())))
            .collect();
        let config_maps = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| Some((m.mount_path.clone(), volumes.get(&m.name)?.clone())))
            .collect();
        let env = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .chain([("NODE_NAME".to_string(), node.to_string())])
            .collect();
        Ok(Self {
            pod: pref,
            node: node.to_string(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
            argv,
            env,
            config_maps,
            grace: Duration::from_secs(
                u64::try_from(
                    spec.termination_grace_period_seconds
                        .unwrap_or(30)
                        .clamp(1, 30),
                )
                .unwrap_or(30),
            ),
        })
    }
}

/// `$(VAR)` references expanded from the container's env, as the kubelet does.
fn expand(s: &str, env: &[(String, String)]) -> String {
    env.iter().fold(s.to_string(), |acc, (k, v)| {
        acc.replace(&format!("$({k})"), v)
    })
}

/// The projected service-account volume a kubelet mounts at
/// `/var/run/secrets/kubernetes.io/serviceaccount`: a token from the
/// TokenRequest API, the cluster CA and the namespace, in `<root>/serviceaccount`.
pub(super) async fn service_account_volume(
    client: &Client,
    ca: &Path,
    pod: &PodRef,
    service_account: &str,
    root: &Path,
) -> Result<PathBuf, ProxyError> {
    let io = |what: String| {
        let pod = pod.to_string();
        move |source| ProxyError::Io { pod, what, source }
    };
    let sa_dir = root.join("serviceaccount");
    std::fs::create_dir_all(&sa_dir).map_err(io(format!("create {}", sa_dir.display())))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace);
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(24 * 3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request(service_account, &PostParams::default(), &tr)
        .await
        .map_err(|source| ProxyError::Api {
            pod: pod.to_string(),
            what: format!(
                "TokenRequest for ServiceAccount/{}/{service_account}",
                pod.namespace
            ),
            source,
        })?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    std::fs::write(sa_dir.join("token"), token).map_err(io("write the token".into()))?;
    std::fs::copy(ca, sa_dir.join("ca.crt")).map_err(io(format!("copy {}", ca.display())))?;
    std::fs::write(sa_dir.join("namespace"), &pod.namespace)
        .map_err(io("write the namespace file".into()))?;
    Ok(sa_dir)
}

/// Writes the pod's volumes under `root`; returns the path rewrites
/// (container path → host path) to apply to the command and the files.
async fn materialize(
    client: &Client,
    env: &ProxyEnv,
    p: &ProxyPod,
    root: &Path,
) -> Result<Vec<(String, String)>, ProxyError> {
    let io = |what: String| {
        let pod = p.pod.to_string();
        move |source| ProxyError::Io { pod, what, source }
    };
    let mut rewrites: Vec<(String, String)> = Vec::new();
    let sa_dir = service_account_volume(client, &env.ca, &p.pod, &p.service_account, root).await?;
    rewrites.push((SA_MOUNT.into(), sa_dir.display().to_string()));
    // ConfigMap volumes, key by key.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &p.pod.namespace);
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (i, (mount, name)) in p.config_maps.iter().enumerate() {
        let cm = cms.get(name).await.map_err(|source| ProxyError::Api {
            pod: p.pod.to_string(),
            what: format!("ConfigMap/{}/{name}", p.pod.namespace),
            source,
        })?;
        let dir = root.join(format!("volume-{i}"));
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        for (k, v) in cm.data.unwrap_or_default() {
            files.push((dir.join(&k), v));
        }
        rewrites.push((
            mount.trim_end_matches('/').to_string(),
            dir.display().to_string(),
        ));
    }
    // Longest container path first, so nested mounts win.
    rewrites.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    for (path, text) in files {
        let mut text = rewrite(&text, &rewrites);
        if path.file_name().and_then(|n| n.to_str()) == Some("config.conf") {
            text = single_kernel(&text);
        }
        std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))?;
    }
    Ok(rewrites)
}

fn rewrite(s: &str, rewrites: &[(String, String)]) -> String {
    rewrites.iter().fold(s.to_string(), |acc, (from, to)| {
        acc.replace(from.as_str(), to)
    })
}

/// The one change to kube-proxy's configuration: no global conntrack sizing
/// (see the module doc). Text in, text out; an unparsable config is left as it
/// is and kube-proxy reports it.
fn single_kernel(config: &str) -> String {
    let Ok(mut v) = serde_yaml::from_str::<serde_yaml::Value>(config) else {
        return config.to_string();
    };
    let Some(map) = v.as_mapping_mut() else {
        return config.to_string();
    };
    let conntrack = map
        .entry("conntrack".into())
        .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    if let Some(c) = conntrack.as_mapping_mut() {
        c.insert("maxPerCore".into(), 0.into());
    }
    serde_yaml::to_string(&v).unwrap_or_else(|_| config.to_string())
}

/// Runs and supervises one kube-proxy until stopped (restartPolicy Always).
pub fn spawn(p: ProxyPod, env: ProxyEnv, client: Client, pids: PidBook) -> Runner {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let what = format!("{} (kube-proxy for {})", p.pod, p.node);
        let root = env.dir.join(&p.node);
        let mut backoff = Duration::from_secs(1);
        loop {
            let rewrites = match materialize(&client, &env, &p, &root).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "kube-proxy not started");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = until_stopped(&mut rx) => return,
                    }
                }
            };
            let args: Vec<String> = p.argv[1..]
                .iter()
                .map(|a| rewrite(&expand(a, &p.env), &rewrites))
                .collect();
            let l = Launch {
                program: env.binary.clone(),
                args,
                env: p.env.clone(),
                netns: Some(env.layout.node_netns(&p.node)),
                cgroup: None,
                log: Some(root.join(format!("{}.log", p.pod.name))),
                supervised: true,
                caps: None,
            };
            let t0 = Instant::now();
            match run_once(&l, &what, &pids, &mut rx, p.grace).await {
                RunEnd::Stopped => {
                    info!(pod = %p.pod, node = %p.node, "kube-proxy stopped (SIGTERM); its rules stay, as a real one's do");
                    return;
                }
                RunEnd::Exited(t) => {
                    warn!(pod = %p.pod, node = %p.node, exit_code = t.exit_code, "kube-proxy exited; restarting in {backoff:?} (log {})", root.display());
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = until_stopped(&mut rx) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
    Runner::new(tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_is_expanded_and_paths_rewritten() {
        let env = vec![("NODE_NAME".to_string(), "node-1".to_string())];
        assert_eq!(
            expand("--hostname-override=$(NODE_NAME)", &env),
            "--hostname-override=node-1"
        );
        let rw = vec![(
            "/var/lib/kube-proxy".to_string(),
            "/tmp/x/volume-0".to_string(),
        )];
        assert_eq!(
            rewrite("--config=/var/lib/kube-proxy/config.conf", &rw),
            "--config=/tmp/x/volume-0/config.conf"
        );
    }

    #[test]
    fn conntrack_sizing_is_turned_off_and_nothing_else_changes() {
        let c = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  maxPerCore: null\n  min: null\nmode: iptables\n";
        let out: serde_yaml::Value = serde_yaml::from_str(&single_kernel(c)).unwrap();
        assert_eq!(out["conntrack"]["maxPerCore"], serde_yaml::Value::from(0));
        assert_eq!(out["mode"], serde_yaml::Value::from("iptables"));
        assert_eq!(
            out["kind"],
            serde_yaml::Value::from("KubeProxyConfiguration")
        );
    }
}
