//! Running the real CoreDNS (built from github.com/coredns/coredns at the
//! version kubeadm deploys) for kubeadm's coredns pods, inside the pod's
//! network namespace and cgroup, with kubeadm's Corefile from the pod's
//! ConfigMap. CoreDNS reaches the API as in a kubeadm cluster: through the
//! `kubernetes` Service's ClusterIP (10.96.0.1:443), with a TokenRequest token
//! of its ServiceAccount — so cluster DNS depends on the service datapath (the
//! agent's socket LB, or kube-proxy's rules), as it does on real clusters, and
//! a handover has to keep it working.
//!
//! Two changes to the Corefile, because this machine has no network and the
//! binary cannot read a projected volume at its fixed path: the `kubernetes`
//! block gets `kubeconfig <file> default` (the in-cluster address and token,
//! written as a kubeconfig), and the `forward` block (upstream resolvers) and
//! the `loop` check (which queries those upstreams) are removed, so no query
//! is ever sent off the machine. Everything under `cluster.local` is CoreDNS's
//! own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::Api;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use super::kube_proxy::{service_account_volume, ProxyError};
use super::kubelet::{run_once, until_stopped, PidBook, PodRef, RunEnd, Runner};
use crate::process::Launch;

/// The `kubernetes` Service's ClusterIP and port: client-go's in-cluster address.
pub const KUBERNETES_SERVICE: &str = "https://10.96.0.1:443";

/// Settings shared by every CoreDNS podnet runs.
#[derive(Debug, Clone)]
pub struct CorednsEnv {
    /// The coredns binary.
    pub binary: PathBuf,
    /// The cluster CA (`<state>/pki/ca.crt`).
    pub ca: PathBuf,
}

/// One CoreDNS to run.
#[derive(Debug, Clone)]
pub struct CorednsPod {
    pub pod: PodRef,
    pub service_account: String,
    /// The ConfigMap mounted at /etc/coredns.
    pub config_map: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The pod's directory (`<state>/podnet/pods/<uid>`): files and log.
    pub dir: PathBuf,
}

impl CorednsPod {
    pub fn from_pod(pod: &Pod, netns: &str, cgroup: &Path, dir: &Path) -> Result<Self, ProxyError> {
        let pref = PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        };
        let spec = pod.spec.as_ref();
        let config_map = spec
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
            .ok_or_else(|| ProxyError::Spec {
                pod: pref.to_string(),
                reason: "mounts no ConfigMap (the Corefile)".into(),
            })?;
        Ok(Self {
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            pod: pref,
            config_map,
            netns: netns.to_string(),
            cgroup: cgroup.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }
}

/// kubeadm's Corefile made to run here (see the module doc).
pub fn corefile_for_here(corefile: &str, kubeconfig: &Path) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    for line in corefile.lines() {
        let t = line.trim();
        let opens = t.ends_with('{');
        let closes = t == "}";
        if let Some(d) = skip_depth {
            if opens {
                depth += 1;
            }
            if closes {
                depth = depth.saturating_sub(1);
                if depth == d {
                    skip_depth = None;
                }
            }
            continue;
        }
        if t == "loop" {
            continue;
        }
        if t.starts_with("forward ") || t == "forward" {
            if opens {
                skip_depth = Some(depth);
                depth += 1;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if opens {
            depth += 1;
            if t.starts_with("kubernetes ") {
                let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
                out.push_str(&format!(
                    "{indent}   kubeconfig {} default\n",
                    kubeconfig.display()
                ));
            }
        } else if closes {
            depth = depth.saturating_sub(1);
        }
    }
    out
}

async fn materialize(
    client: &Client,
    env: &CorednsEnv,
    c: &CorednsPod,
) -> Result<PathBuf, ProxyError> {
    let io = |what: String| {
        let pod = c.pod.to_string();
        move |source| ProxyError::Io { pod, what, source }
    };
    let root = c.dir.join("coredns");
    let sa = service_account_volume(client, &env.ca, &c.pod, &c.service_account, &root).await?;
    let kubeconfig = root.join("kubeconfig");
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default\n  cluster:\n    server: {KUBERNETES_SERVICE}\n    certificate-authority: {ca}\nusers:\n- name: default\n  user:\n    tokenFile: {token}\ncontexts:\n- name: default\n  context: {{cluster: default, user: default}}\ncurrent-context: default\n",
        ca = sa.join("ca.crt").display(),
        token = sa.join("token").display(),
    );
    std::fs::write(&kubeconfig, kc).map_err(io(format!("write {}", kubeconfig.display())))?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &c.pod.namespace);
    let cm = cms
        .get(&c.config_map)
        .await
        .map_err(|source| ProxyError::Api {
            pod: c.pod.to_string(),
            what: format!("ConfigMap/{}/{}", c.pod.namespace, c.config_map),
            source,
        })?;
    let corefile = cm
        .data
        .and_then(|d| d.get("Corefile").cloned())
        .ok_or_else(|| ProxyError::Spec {
            pod: c.pod.to_string(),
            reason: format!(
                "ConfigMap/{}/{} has no Corefile",
                c.pod.namespace, c.config_map
            ),
        })?;
    let path = root.join("Corefile");
    std::fs::write(&path, corefile_for_here(&corefile, &kubeconfig))
        .map_err(io(format!("write {}", path.display())))?;
    Ok(path)
}

/// Runs and supervises one CoreDNS until stopped (restartPolicy Always).
pub fn spawn(c: CorednsPod, env: CorednsEnv, client: Client, pids: PidBook) -> Runner {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let what = format!("{} (coredns)", c.pod);
        let mut backoff = Duration::from_secs(1);
        loop {
            let corefile = match materialize(&client, &env, &c).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "coredns not started");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = until_stopped(&mut rx) => return,
                    }
                }
            };
            let l = Launch {
                program: env.binary.clone(),
                args: vec!["-conf".into(), corefile.display().to_string()],
                env: vec![],
                netns: Some(c.netns.clone()),
                cgroup: Some(c.cgroup.clone()),
                log: Some(c.dir.join("coredns.log")),
                supervised: true,
                caps: None,
            };
            let t0 = Instant::now();
            match run_once(&l, &what, &pids, &mut rx, Duration::from_secs(5)).await {
                RunEnd::Stopped => {
                    info!(pod = %c.pod, "coredns stopped");
                    return;
                }
                RunEnd::Exited(t) => {
                    warn!(pod = %c.pod, exit_code = t.exit_code, "coredns exited; restarting in {backoff:?} (log {})", c.dir.join("coredns.log").display());
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

    const KUBEADM: &str = ".:53 {\n    errors\n    health {\n       lameduck 5s\n    }\n    ready\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n       fallthrough in-addr.arpa ip6.arpa\n       ttl 30\n    }\n    prometheus :9153\n    forward . /etc/resolv.conf {\n       max_concurrent 1000\n    }\n    cache 30 {\n       disable success cluster.local\n       disable denial cluster.local\n    }\n    loop\n    reload\n    loadbalance\n}\n";

    /// No upstream is ever asked (no route out; never send a query off the machine).
    #[test]
    fn kubeadm_corefile_loses_forward_and_loop_and_gains_the_kubeconfig() {
        let out = corefile_for_here(KUBEADM, Path::new("/s/kubeconfig"));
        assert!(!out.contains("forward"), "{out}");
        assert!(!out.contains("max_concurrent"), "{out}");
        assert!(!out.lines().any(|l| l.trim() == "loop"), "{out}");
        assert!(out.contains("kubernetes cluster.local in-addr.arpa ip6.arpa {\n       kubeconfig /s/kubeconfig default\n"), "{out}");
        for keep in [
            "errors",
            "lameduck 5s",
            "ready",
            "pods insecure",
            "prometheus :9153",
            "cache 30",
            "disable denial cluster.local",
            "reload",
            "loadbalance",
        ] {
            assert!(out.contains(keep), "lost `{keep}`:\n{out}");
        }
        assert_eq!(out.matches('{').count(), out.matches('}').count(), "{out}");
    }
}
