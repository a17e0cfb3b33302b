//! The client pod of a flow, from the cgroup its socket belongs to. The
//! socket hooks record `bpf_get_current_cgroup_id()`, which is the inode of
//! the cgroup v2 directory; kubelet names every pod's cgroup after the pod's
//! UID (cgroupfs driver `…/pod<uid>/…`, systemd driver
//! `…/kubepods-<qos>-pod<uid with _>.slice/…`), so walking the hierarchy
//! under the agent's cgroup root maps an id to a pod UID. `netboot flows`
//! turns the UID into namespace/name (the agent does not watch pods).
//!
//! The map is rebuilt by a walk when an id is not in it. cgroup ids grow
//! (kernfs allocates inode numbers cyclically), so an id above every id the
//! last walk saw is a cgroup made since: walked for at once, so a pod's first
//! connect is named. Any other unknown id (a cgroup outside the root) walks
//! at most every [`RESCAN`], and is remembered as no pod until the next walk:
//! a connection storm from unknown cgroups costs one walk per [`RESCAN`].

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Least time between two walks.
pub const RESCAN: Duration = Duration::from_millis(250);
/// Deepest directory walked below the root (kubelet's pod cgroups are at
/// depth 3–4; containers one below).
const MAX_DEPTH: usize = 8;
/// Most directories one walk visits.
const MAX_DIRS: usize = 200_000;

/// cgroup id → the pod UID in its path (None: a cgroup of no pod).
#[derive(Debug)]
pub struct ClientPods {
    root: PathBuf,
    ids: HashMap<u64, Option<String>>,
    walked: Option<Instant>,
    /// The highest id seen (by a walk, or asked for).
    newest: u64,
}

impl ClientPods {
    /// A resolver over the cgroup v2 hierarchy at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ids: HashMap::new(),
            walked: None,
            newest: 0,
        }
    }

    /// The UID of the pod whose cgroup (or a cgroup below it) has `id`.
    pub fn pod_uid(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(uid) = self.ids.get(&id) {
            return uid.clone();
        }
        let made_since = id > self.newest;
        if !made_since && self.walked.is_some_and(|t| t.elapsed() < RESCAN) {
            return None;
        }
        self.walk();
        self.newest = self.newest.max(id);
        self.ids.entry(id).or_insert(None).clone()
    }

    fn walk(&mut self) {
        self.walked = Some(Instant::now());
        let mut ids = HashMap::with_capacity(self.ids.len().max(64));
        let mut stack: Vec<(PathBuf, usize, Option<String>)> = vec![(self.root.clone(), 0, None)];
        let mut seen = 0usize;
        while let Some((dir, depth, inherited)) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                tracing::warn!(root = %self.root.display(), "cgroup walk stopped at {MAX_DIRS} directories");
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let uid = inherited.or_else(|| {
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(pod_uid_in_name)
            });
            ids.insert(meta.ino(), uid.clone());
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1, uid.clone()));
                }
            }
        }
        self.newest = ids.keys().copied().max().unwrap_or(0).max(self.newest);
        self.ids = ids;
    }

    /// The root walked.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The pod UID a kubelet (or the local cluster's podnet) put in one cgroup
/// directory name: `pod<uid>` (cgroupfs), `kubepods[-<qos>]-pod<uid with
/// _>.slice` (systemd), or the bare UID (podnet).
pub fn pod_uid_in_name(name: &str) -> Option<String> {
    let candidate = if let Some(rest) = name.strip_suffix(".slice") {
        rest.rsplit_once("-pod")?.1.replace('_', "-")
    } else if let Some(rest) = name.strip_prefix("pod") {
        rest.to_string()
    } else {
        name.to_string()
    };
    is_uid(&candidate).then_some(candidate)
}

/// 8-4-4-4-12 hex digits, as Kubernetes UIDs are.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6f";

    #[test]
    fn finds_the_uid_in_every_drivers_names() {
        assert_eq!(pod_uid_in_name(&format!("pod{UID}")).as_deref(), Some(UID));
        assert_eq!(
            pod_uid_in_name(&format!(
                "kubepods-besteffort-pod{}.slice",
                UID.replace('-', "_")
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_in_name(&format!("kubepods-pod{}.slice", UID.replace('-', "_"))).as_deref(),
            Some(UID)
        );
        assert_eq!(pod_uid_in_name(UID).as_deref(), Some(UID));
        for other in [
            "kubepods",
            "kubepods-besteffort.slice",
            "system.slice",
            "cri-containerd-0123456789abcdef.scope",
            "pod",
            "podnotauid",
            "3f2b8c1e-5d4a-4b7e-9c0f-1a2b3c4d5e6",
        ] {
            assert_eq!(pod_uid_in_name(other), None, "{other}");
        }
    }

    #[test]
    fn maps_a_cgroup_below_a_pod_to_the_pod_and_others_to_none() {
        // A plain directory tree stands in for cgroupfs: ids are inodes.
        let root = tempfile::tempdir().unwrap();
        let pod = root
            .path()
            .join("kubepods/besteffort")
            .join(format!("pod{UID}"));
        let container = pod.join("cri-containerd-abc.scope");
        std::fs::create_dir_all(&container).unwrap();
        let other = root.path().join("system.slice");
        std::fs::create_dir_all(&other).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let mut r = ClientPods::new(root.path());
        assert_eq!(r.pod_uid(ino(&container)).as_deref(), Some(UID));
        assert_eq!(r.pod_uid(ino(&pod)).as_deref(), Some(UID));
        assert_eq!(r.pod_uid(ino(&other)), None);
        // A pod started right after the walk (a higher id) is found at once.
        let later = root.path().join("pod11111111-2222-3333-4444-555555555555");
        std::fs::create_dir_all(&later).unwrap();
        // (cgroupfs ids grow; a test directory's inodes need not: then the
        // next walk after RESCAN finds it.)
        if ino(&later) < r.newest {
            std::thread::sleep(RESCAN);
        }
        assert_eq!(
            r.pod_uid(ino(&later)).as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
    }
}
