//! The agent's objects as the bootstrapper renders them
//! (templates/agent-*.yaml.hbs) and finds them (rollout, status), and as the
//! agent reads them. The bootstrapper's render tests check the rendered
//! objects against these names.

/// The DaemonSet in `spec.namespace`.
pub const DAEMONSET: &str = "netboot-datapath";
/// The ServiceAccount in `spec.namespace` (also the name the agent's
/// admission policy matches).
pub const SERVICE_ACCOUNT: &str = "netboot-datapath";
/// The ConfigMap in `spec.namespace` that holds [`CONFIG_KEY`].
pub const CONFIG_MAP: &str = "netboot-datapath-config";
/// The ConfigMap key the agent reads ([`crate::config::Config`]).
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the DaemonSet mounts [`CONFIG_KEY`]: the agent's `--config` default.
pub const CONFIG_PATH: &str = "/etc/netboot/config.yaml";
/// The label key that selects the agent's pods.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Its value.
pub const NAME: &str = "netboot-datapath";
/// `NAME_LABEL=NAME`, as a label selector.
pub const SELECTOR: &str = "app.kubernetes.io/name=netboot-datapath";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_is_the_label() {
        assert_eq!(SELECTOR, format!("{NAME_LABEL}={NAME}"));
        assert!(CONFIG_PATH.ends_with(&format!("/{CONFIG_KEY}")));
    }
}
