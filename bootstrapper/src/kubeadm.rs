//! What kubeadm will do to kube-proxy after a handover.
//!
//! `kubeadm upgrade apply` (v1.36: cmd/kubeadm/app/cmd/phases/upgrade/addons.go,
//! `runKubeProxyAddon`) re-creates kube-proxy's ConfigMap and DaemonSet on every
//! upgrade unless the cluster's ClusterConfiguration says `proxy: {disabled:
//! true}`; deleting them, as the handover does, does not stop it. netboot does
//! not edit kubeadm's configuration: after a handover on a kubeadm cluster
//! without that setting, it says so (a handover step `kubeadm-upgrade` with
//! result `warning`, and a Warning Event) so the operator sets it before the
//! next upgrade.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

/// The warning when `cluster_configuration` (kubeadm-config's
/// `ClusterConfiguration`, YAML) leaves kube-proxy enabled; `None` when it
/// disables it.
pub fn reinstall_warning(cluster_configuration: &str) -> Option<String> {
    let v: serde_yaml::Value = serde_yaml::from_str(cluster_configuration).ok()?;
    let disabled = v
        .get("proxy")
        .and_then(|p| p.get("disabled"))
        .and_then(serde_yaml::Value::as_bool)
        .unwrap_or(false);
    (!disabled).then(|| {
        "kube-system/kubeadm-config: the ClusterConfiguration does not say `proxy: {disabled: true}`, so the next `kubeadm upgrade apply` re-installs kube-proxy; set it there before upgrading (netboot does not edit kubeadm's configuration)".to_string()
    })
}

/// [`reinstall_warning`] for the cluster: `None` without a readable
/// kubeadm-config (not a kubeadm cluster, or no access).
pub async fn check(client: &Client) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cm = api.get_opt("kubeadm-config").await.ok()??;
    reinstall_warning(cm.data?.get("ClusterConfiguration")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_unless_kubeadm_disables_kube_proxy() {
        let base = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nkubernetesVersion: v1.36.3\n";
        assert!(reinstall_warning(base).is_some());
        assert!(reinstall_warning(&format!("{base}proxy: {{}}\n")).is_some());
        assert!(reinstall_warning(&format!("{base}proxy: {{disabled: false}}\n")).is_some());
        assert!(reinstall_warning(&format!("{base}proxy:\n  disabled: true\n")).is_none());
        // Unreadable: no claim either way.
        assert!(reinstall_warning(": [").is_none());
    }
}
