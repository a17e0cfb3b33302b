//! Which Linux capabilities a container gets from its `securityContext`, the
//! way a container runtime computes them, and what of that this machine can
//! grant (podnet's processes run as root, but only with the capabilities
//! their container declares: [`crate::process::Confine`] drops the rest).

use k8s_openapi::api::core::v1::SecurityContext;

/// Capability names by number (linux/capability.h), without `CAP_`.
pub const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What containerd (and Docker) give a non-privileged container by default.
pub const RUNTIME_DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A set of capabilities, bit n = capability n.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// Every capability this crate knows.
    pub const ALL: CapSet = CapSet((1 << NAMES.len()) - 1);

    /// The set of these names (`NET_ADMIN` or `CAP_NET_ADMIN`, any case);
    /// `Err` lists the unknown ones.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<CapSet, Vec<String>> {
        let mut set = 0u64;
        let mut unknown = Vec::new();
        for n in names {
            let up = n.as_ref().to_ascii_uppercase();
            let bare = up.strip_prefix("CAP_").unwrap_or(&up);
            match NAMES.iter().position(|k| *k == bare) {
                Some(i) => set |= 1 << i,
                None => unknown.push(n.as_ref().to_string()),
            }
        }
        if unknown.is_empty() {
            Ok(CapSet(set))
        } else {
            Err(unknown)
        }
    }

    /// The names in the set, by number.
    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    }

    /// Both.
    pub fn and(self, o: CapSet) -> CapSet {
        CapSet(self.0 & o.0)
    }

    /// In `self`, not in `o`.
    pub fn minus(self, o: CapSet) -> CapSet {
        CapSet(self.0 & !o.0)
    }

    /// Nothing.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The capabilities a container's `securityContext` grants, as a runtime
/// computes them: `privileged: true` is every one; else the runtime's
/// default set, minus `capabilities.drop` (`ALL`: all of them), plus
/// `capabilities.add` (`ALL`: every one). Unknown names are an error.
pub fn granted(sc: Option<&SecurityContext>) -> Result<CapSet, Vec<String>> {
    let Some(sc) = sc else {
        return CapSet::from_names(&RUNTIME_DEFAULT);
    };
    if sc.privileged == Some(true) {
        return Ok(CapSet::ALL);
    }
    let (add, drop) = sc
        .capabilities
        .as_ref()
        .map(|c| {
            (
                c.add.clone().unwrap_or_default(),
                c.drop.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    let is_all = |v: &[String]| v.iter().any(|n| n.eq_ignore_ascii_case("ALL"));
    let mut set = CapSet::from_names(&RUNTIME_DEFAULT)?;
    if is_all(&drop) {
        set = CapSet::default();
    } else {
        set = set.minus(CapSet::from_names(&drop)?);
    }
    if is_all(&add) {
        return Ok(CapSet::ALL);
    }
    Ok(CapSet(set.0 | CapSet::from_names(&add)?.0))
}

/// What a process started from here gets: the granted set as far as the
/// bounding set allows, and what the container asked for but cannot have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Capabilities the process keeps.
    pub keep: CapSet,
    /// Granted by the securityContext, missing from `bounding`.
    pub missing: CapSet,
}

/// `granted` limited by `bounding` (this process's bounding set).
pub fn grant(granted: CapSet, bounding: CapSet) -> Grant {
    Grant {
        keep: granted.and(bounding),
        missing: granted.minus(bounding),
    }
}

/// This process's bounding set (`CapBnd` of /proc/self/status).
pub fn bounding_set() -> std::io::Result<CapSet> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map(CapSet)
        .ok_or_else(|| std::io::Error::other("no CapBnd in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(yaml: &str) -> SecurityContext {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_agents_security_context_grants_what_it_adds_and_nothing_else() {
        // templates/agent-daemonset.yaml.hbs, container `agent`.
        let agent = sc("privileged: false\nreadOnlyRootFilesystem: true\nrunAsUser: 0\ncapabilities:\n  drop: [ALL]\n  add: [BPF, PERFMON, NET_ADMIN, NET_RAW, SYS_ADMIN, SYS_RESOURCE]\n");
        let g = granted(Some(&agent)).unwrap();
        assert_eq!(
            g.names(),
            vec![
                "NET_ADMIN",
                "NET_RAW",
                "SYS_ADMIN",
                "SYS_RESOURCE",
                "PERFMON",
                "BPF"
            ]
        );
        // These machines' root bounding set lacks CAP_SYS_RESOURCE (24).
        let bounding = CapSet(0x1ff_feff_ffff);
        assert_eq!(
            grant(g, bounding),
            Grant {
                keep: CapSet::from_names(&["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"])
                    .unwrap(),
                missing: CapSet::from_names(&["SYS_RESOURCE"]).unwrap(),
            }
        );
        assert_eq!(grant(g, CapSet::ALL).missing, CapSet::default());
    }

    #[test]
    fn runtime_defaults_drops_privileged_and_unknown_names() {
        let default = CapSet::from_names(&RUNTIME_DEFAULT).unwrap();
        assert_eq!(granted(None).unwrap(), default);
        assert_eq!(granted(Some(&sc("{}"))).unwrap(), default);
        // Drop one, add one; CAP_ prefix and case do not matter.
        let g = granted(Some(&sc(
            "capabilities: {drop: [cap_net_raw, KILL], add: [CAP_NET_ADMIN]}",
        )))
        .unwrap();
        assert_eq!(
            g,
            CapSet(
                default
                    .minus(CapSet::from_names(&["NET_RAW", "KILL"]).unwrap())
                    .0
                    | CapSet::from_names(&["NET_ADMIN"]).unwrap().0
            )
        );
        assert_eq!(
            granted(Some(&sc("capabilities: {drop: [ALL]}"))).unwrap(),
            CapSet::default()
        );
        assert_eq!(
            granted(Some(&sc("privileged: true\ncapabilities: {drop: [ALL]}"))).unwrap(),
            CapSet::ALL
        );
        assert_eq!(
            granted(Some(&sc("capabilities: {add: [ALL]}"))).unwrap(),
            CapSet::ALL
        );
        assert_eq!(
            granted(Some(&sc("capabilities: {add: [NET_ADMIN, FLY]}"))),
            Err(vec!["FLY".to_string()])
        );
        assert_eq!(NAMES[24], "SYS_RESOURCE");
        assert_eq!(NAMES[39], "BPF");
    }
}
