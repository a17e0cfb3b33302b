//! Every bpffs path the datapath uses, built in one place.
//!
//! Layout under the pin root (`--bpffs`, default `/sys/fs/bpf/netboot`):
//!
//! ```text
//! <root>/maps/<map name>          nb_lb4_svc, nb_lb4_be, ... (see layout::names)
//! <root>/links/<attach point>     connect4, sendmsg4, recvmsg4, getpeername4,
//!                                 connect6, sendmsg6, recvmsg6, getpeername6,
//!                                 np-in-<ifname>, np-out-<ifname> (tc path)
//! <root>/maps-next/<map name>     a layout upgrade's new maps, while they fill
//! <root>/maps-old/<map name>      the maps it replaced, until they are removed
//! ```
//!
//! See `upgrade.rs` for how `maps-next` becomes `maps` (bpffs refuses a dot
//! in a name).
//!
//! Maps and links outlive the agent: a restarted agent opens them again, so the
//! datapath keeps translating while no agent runs.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// Default pin root (contracts.md: `--bpffs`).
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/netboot";

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// A directory could not be created.
    #[error("{path}: create pin directory: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// bpffs could not be mounted.
    #[error("{path}: mount bpffs: {source}")]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path cannot be passed to the kernel.
    #[error("{0}: path contains a NUL byte")]
    BadPath(PathBuf),
    /// Removing pins failed.
    #[error("{path}: remove pin: {source}")]
    Remove {
        /// The pin.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The pin layout under one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pins {
    root: PathBuf,
    /// Directory of the map pins under the root: [`MAPS`] or [`STAGING`].
    maps: &'static str,
}

/// The map pins in use.
pub const MAPS: &str = "maps";
/// A layout upgrade's new map pins while they are filled (`upgrade.rs`).
pub const STAGING: &str = "maps-next";
/// The map pins a layout upgrade replaced, until removed (`upgrade.rs`).
pub const RETIRED: &str = "maps-old";

impl Pins {
    /// Pins under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            maps: MAPS,
        }
    }

    /// The same root with the map pins in the staging directory of a layout
    /// upgrade (links stay where they are).
    pub fn staging(&self) -> Self {
        Self {
            root: self.root.clone(),
            maps: STAGING,
        }
    }

    /// The pin root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of map pins.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(self.maps)
    }

    /// Directory of link pins.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin of map `name` (one of `layout::names`).
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin of the cgroup link for attach point `point` (e.g. `connect4`).
    pub fn link(&self, point: &str) -> PathBuf {
        self.links_dir().join(point)
    }

    /// Whether maps were pinned here before (a restart rather than a first start).
    pub fn maps_exist(&self) -> bool {
        self.map(crate::layout::names::SERVICES).exists()
    }

    /// Creates the directories, mounting bpffs on the root's topmost missing
    /// bpffs ancestor if the root is not on a bpffs yet.
    pub fn prepare(&self) -> Result<(), PinError> {
        if !is_bpffs(&self.root) {
            let mount_point = bpffs_mount_point(&self.root);
            if !is_bpffs(&mount_point) {
                std::fs::create_dir_all(&mount_point).map_err(|source| PinError::CreateDir {
                    path: mount_point.clone(),
                    source,
                })?;
                mount_bpffs(&mount_point)?;
            }
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| PinError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Removes every pin and the directories (links first: that detaches the
    /// programs). Used by tests and `agent --uninstall`-style cleanup.
    pub fn remove_all(&self) -> Result<(), PinError> {
        let dirs = [
            self.links_dir(),
            self.maps_dir(),
            self.root.join(STAGING),
            self.root.join(RETIRED),
        ];
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                std::fs::remove_file(&p).map_err(|source| PinError::Remove {
                    path: p.clone(),
                    source,
                })?;
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

/// Whether `path` exists and lies on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; c is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return false;
        }
        #[allow(clippy::unnecessary_cast)]
        let magic = st.f_type as i64;
        magic == BPF_FS_MAGIC
    }
}

/// `/sys/fs/bpf` when the root is below it, else the root itself.
fn bpffs_mount_point(root: &Path) -> PathBuf {
    let sys = Path::new("/sys/fs/bpf");
    if root.starts_with(sys) {
        sys.to_path_buf()
    } else {
        root.to_path_buf()
    }
}

fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    let target = CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| PinError::BadPath(at.to_path_buf()))?;
    let src = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount {
            path: at.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_pins() {
        let p = Pins::new("/sys/fs/bpf/netboot-local/node-0");
        assert_eq!(
            p.map("nb_lb4_svc"),
            Path::new("/sys/fs/bpf/netboot-local/node-0/maps/nb_lb4_svc")
        );
        assert_eq!(
            p.link("connect4"),
            Path::new("/sys/fs/bpf/netboot-local/node-0/links/connect4")
        );
        assert_eq!(Pins::default().root(), Path::new(DEFAULT_ROOT));
    }
}
