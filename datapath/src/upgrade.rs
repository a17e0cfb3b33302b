//! Live layout upgrades of the pinned maps.
//!
//! The maps outlive the agent, so an agent whose build has another map layout
//! (`layout::LAYOUT_VERSION`), or whose `mapSizes` differ from the pinned
//! maps' capacities, finds maps it cannot use as they are. It rebuilds them
//! beside the old ones while the old programs keep serving:
//!
//! 1. a crash in an earlier upgrade is finished or discarded
//!    ([`recover_interrupted`]);
//! 2. the new object is loaded with its maps pinned under `maps-next`
//!    (empty, at the configured sizes) and `nb_config` is written;
//! 3. every map holding state is copied from `maps` into `maps-next`
//!    ([`copy_maps`]): entries of a map whose layout is unchanged byte for
//!    byte, entries of a changed one through its converter ([`Conv`]);
//! 4. every pinned link (the cgroup hooks, the tc programs of external and
//!    pod interfaces) gets the new program with `BPF_LINK_UPDATE`, an atomic
//!    swap: a socket or packet sees the old program with the old maps or the
//!    new one with the new maps, never neither;
//! 5. entries the old programs created during 3–4 (new sockets' reverse
//!    entries, affinity, tracked flows) are copied again, without replacing;
//! 6. `maps` becomes `maps-old`, `maps-next` becomes `maps`, and `maps-old`
//!    is removed ([`swap`]); the kernel frees the old maps with the last
//!    program that used them.
//!
//! The same steps apply a `mapSizes` change. If the entries do not fit the
//! new sizes, nothing is switched: the staging maps are removed and the old
//! ones keep serving (a refused size change, as before).
//!
//! Counters (per-CPU) and the flow event maps are soft state and start
//! anew. Established TCP connections never depend on the maps (the socket LB
//! translated them at connect), so none is reset.
//!
//! Conversions are known from the previous layout (3) to this one; a pinned
//! layout this build does not know (a newer one, after a downgrade) is
//! copied only where a map's key and value sizes are unchanged, which the
//! layout rules keep meaning the same bytes (`lb.h`: a changed struct
//! changes its size or bumps the layout with a converter here).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::MapSizes;
use crate::layout::{names, LAYOUT_VERSION};
use crate::pins::{Pins, MAPS, RETIRED, STAGING};
use crate::status::MapSizeChange;
use crate::sys;

/// Errors of an upgrade. Before the links are switched every error leaves
/// the old maps and programs serving as they were.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A pin could not be opened or read.
    #[error("{path}: {op}: {source}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A map's pinned layout is neither this build's nor one it converts.
    #[error("pinned map {map} (layout {version}) has key/value size {found:?}, this build (layout {LAYOUT_VERSION}) expects {expected:?} and knows no conversion; remove the pins (netboot-datapath uninstall) to start empty")]
    NoConversion {
        /// Map name.
        map: String,
        /// The pinned layout version, or "unknown".
        version: String,
        /// (key, value) sizes found.
        found: (u32, u32),
        /// (key, value) sizes of this build.
        expected: (u32, u32),
    },
    /// The entries do not fit the configured size.
    #[error("{map}: its {entries}+ entries do not fit the configured {capacity} (mapSizes)")]
    DoesNotFit {
        /// Map name.
        map: String,
        /// Entries copied before the map was full.
        entries: u64,
        /// The new capacity.
        capacity: u32,
    },
}

/// Why the pinned maps are rebuilt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Why {
    /// The pinned layout version (None: unreadable, e.g. no `nb_config`).
    pub from_version: Option<u32>,
    /// `mapSizes` differing from the pinned capacities.
    pub resized: Vec<MapSizeChange>,
    /// Maps whose key or value size differs from this build's.
    pub changed_layout: Vec<String>,
}

/// What an upgrade did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    /// The pinned layout version before (None: unknown).
    pub from_version: Option<u32>,
    /// This build's layout version.
    pub to_version: u32,
    /// `mapSizes` changes applied.
    pub resized: Vec<MapSizeChange>,
    /// Maps the new programs share with the old ones (unchanged layout and
    /// size): nothing to copy.
    pub shared: Vec<String>,
    /// Entries copied per map (first copy).
    pub copied: Vec<(String, u64)>,
    /// Entries the old programs created while the new maps filled, copied
    /// after the switch.
    pub late: u64,
    /// Links switched to the new programs.
    pub links: Vec<String>,
    /// Milliseconds from loading the new object to removing the old pins.
    pub took_ms: u64,
}

impl UpgradeReport {
    /// One line for logs and `status`.
    pub fn describe(&self) -> String {
        let from = self.from_version.map_or_else(
            || "an unknown layout".to_string(),
            |v| format!("layout {v}"),
        );
        let entries: u64 = self.copied.iter().map(|(_, n)| n).sum();
        let resized = if self.resized.is_empty() {
            String::new()
        } else {
            let r: Vec<String> = self.resized.iter().map(|c| c.to_string()).collect();
            format!(", resized {}", r.join(", "))
        };
        format!(
            "maps rebuilt from {from} to layout {}{resized}: {} maps copied ({entries} entries, +{} late), {} shared, {} links switched, {} ms",
            self.to_version,
            self.copied.len(),
            self.late,
            self.shared.len(),
            self.links.len(),
            self.took_ms
        )
    }
}

/// Maps whose entries an upgrade carries over. Not: `nb_config` (written
/// anew), the per-CPU counters and flow event maps (soft state, start anew).
/// `nb_svc_stats` is listed so that an upgrade that keeps its layout and
/// size shares it ([`share_unchanged`]: the per-Service counters survive);
/// per-CPU maps are never copied, so a resized one starts anew.
pub const CARRIED: [&str; 19] = [
    names::BACKENDS,
    names::BACKENDS6,
    names::SERVICES,
    names::SERVICES6,
    names::REVNAT,
    names::REVNAT6,
    names::AFF_MATCH,
    names::AFFINITY,
    names::REV_SK,
    names::REV_SK6,
    names::CT4,
    names::CT6,
    names::NP_DEV,
    names::NP_DEV6,
    names::MAGLEV,
    names::SRC_RANGE,
    names::SRC_RANGE6,
    names::SVC_STATS,
    // Fixed size: shared whenever its layout is unchanged, so an upgrade
    // keeps every TCP socket's reverse entry.
    names::REV_TCP,
];

/// Maps the old programs write while the new maps fill: copied once more
/// after the switch, without replacing what the new programs wrote.
pub const WRITTEN_BY_PROGRAMS: [&str; 5] = [
    names::REV_SK,
    names::REV_SK6,
    names::AFFINITY,
    names::CT4,
    names::CT6,
];

/// The layout version the pinned maps were written with: `nb_config`'s
/// `version` (bytes 4..8 in every layout). None when unreadable.
pub fn pinned_version(pins: &Pins) -> Option<u32> {
    let fd = sys::obj_get(&pins.map(names::CONFIG)).ok()?;
    let info = sys::map_info(fd.as_fd()).ok()?;
    if info.value_size < 8 {
        return None;
    }
    let mut val = vec![0u8; info.value_size as usize];
    if !sys::map_lookup(fd.as_fd(), &0u32.to_ne_bytes(), &mut val).ok()? {
        return None;
    }
    let v = u32::from_ne_bytes([val[4], val[5], val[6], val[7]]);
    (v != 0).then_some(v)
}

/// Whether the pinned maps must be rebuilt for this build and `sizes`, and
/// why (None: reuse them). Nothing pinned: None (a first start).
pub fn needed(pins: &Pins, sizes: &MapSizes) -> Option<Why> {
    if !pins.maps_exist() {
        return None;
    }
    let mut why = Why {
        from_version: pinned_version(pins),
        resized: Vec::new(),
        changed_layout: Vec::new(),
    };
    for name in CARRIED {
        let Ok(fd) = sys::obj_get(&pins.map(name)) else {
            continue;
        };
        let Ok(info) = sys::map_info(fd.as_fd()) else {
            continue;
        };
        if crate::loader::expected_sizes(name)
            .is_some_and(|e| e != (info.key_size, info.value_size))
        {
            why.changed_layout.push(name.to_string());
        }
        if let Some(want) = crate::loader::wanted_entries(name, sizes) {
            if info.max_entries != want {
                why.resized.push(MapSizeChange {
                    map: name.to_string(),
                    pinned: info.max_entries,
                    configured: want,
                });
            }
        }
    }
    let other_layout = why.from_version.is_some_and(|v| v != LAYOUT_VERSION);
    (other_layout || !why.changed_layout.is_empty() || !why.resized.is_empty()).then_some(why)
}

/// How one map's entries are carried from the pinned layout to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv {
    /// Byte for byte.
    Raw,
    /// Layout 3 → 4: `struct nb_lb4_service` 16 → 20 bytes (u32 service id).
    Service3,
    /// Layout 3 → 4: the rev-nat key u16 → u32.
    RevNatKey3,
}

/// The conversion of map `name` from the pinned `version` with
/// (key, value) sizes `found` to this build's `expected` (None: unknown).
pub fn conversion(
    name: &str,
    version: Option<u32>,
    found: (u32, u32),
    expected: (u32, u32),
) -> Option<Conv> {
    if found == expected {
        return Some(Conv::Raw);
    }
    if version != Some(3) {
        return None;
    }
    // Each converter takes exactly layout 3's sizes to this build's.
    let (k, v) = expected;
    match name {
        names::SERVICES | names::SERVICES6 if found == (k, 16) && v == 20 => Some(Conv::Service3),
        names::REVNAT | names::REVNAT6 if found == (2, v) && k == 4 => Some(Conv::RevNatKey3),
        _ => None,
    }
}

impl Conv {
    /// Converts one entry.
    pub fn apply(self, key: &[u8], val: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match self {
            Conv::Raw => (key.to_vec(), val.to_vec()),
            Conv::Service3 => {
                // 3: backend_id u32 @0, affinity_timeout u32 @4, count u16 @8,
                //    rev_nat u16 @10, flags u8 @12, pad u8, local_count u16 @14.
                // 4: backend_id @0, affinity_timeout @4, rev_nat u32 @8,
                //    count u16 @12, local_count u16 @14, flags u8 @16, pad[3].
                let mut v = vec![0u8; 20];
                v[0..8].copy_from_slice(&val[0..8]);
                let rev = u16::from_ne_bytes([val[10], val[11]]);
                v[8..12].copy_from_slice(&u32::from(rev).to_ne_bytes());
                v[12..14].copy_from_slice(&val[8..10]);
                v[14..16].copy_from_slice(&val[14..16]);
                v[16] = val[12];
                (key.to_vec(), v)
            }
            Conv::RevNatKey3 => {
                let id = u16::from_ne_bytes([key[0], key[1]]);
                (u32::from(id).to_ne_bytes().to_vec(), val.to_vec())
            }
        }
    }
}

fn open(path: &Path) -> Result<(OwnedFd, sys::RawMapInfo), UpgradeError> {
    let fd = sys::obj_get(path).map_err(|source| UpgradeError::Pin {
        path: path.to_path_buf(),
        op: "open",
        source,
    })?;
    let info = sys::map_info(fd.as_fd()).map_err(|source| UpgradeError::Pin {
        path: path.to_path_buf(),
        op: "info",
        source,
    })?;
    Ok((fd, info))
}

/// Checks that every carried map of `from` converts to this build's layout
/// (before anything is loaded).
pub fn check_conversions(from: &Pins, version: Option<u32>) -> Result<(), UpgradeError> {
    for name in CARRIED {
        let path = from.map(name);
        if !path.exists() {
            continue;
        }
        let (_, info) = open(&path)?;
        let found = (info.key_size, info.value_size);
        let Some(expected) = crate::loader::expected_sizes(name) else {
            continue;
        };
        if conversion(name, version, found, expected).is_none()
            && !crate::loader::RESETTABLE.contains(&name)
        {
            return Err(UpgradeError::NoConversion {
                map: name.to_string(),
                version: version.map_or_else(|| "unknown".to_string(), |v| v.to_string()),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// Copies the entries of maps `only` from `from` (pinned layout `version`)
/// into the same maps under `to`, converting each; `flags`: [`sys::BPF_ANY`]
/// or [`sys::BPF_NOEXIST`] (then entries already there are kept). Returns
/// the entries written per map.
pub fn copy_maps(
    from: &Pins,
    to: &Pins,
    version: Option<u32>,
    only: &[&str],
    flags: u64,
) -> Result<Vec<(String, u64)>, UpgradeError> {
    let mut out = Vec::new();
    for name in only {
        let src = from.map(name);
        if !src.exists() {
            continue;
        }
        let (sfd, sinfo) = open(&src)?;
        let (dfd, dinfo) = open(&to.map(name))?;
        if sys::is_per_cpu(sinfo.map_type) || sinfo.map_type == sys::MAP_TYPE_RINGBUF {
            continue;
        }
        let found = (sinfo.key_size, sinfo.value_size);
        let expected = (dinfo.key_size, dinfo.value_size);
        let conv = conversion(name, version, found, expected);
        if conv.is_none() && crate::loader::RESETTABLE.contains(name) {
            // Soft state (tracked north-south flows) of another layout:
            // the new map starts empty.
            continue;
        }
        let conv = conv.ok_or_else(|| UpgradeError::NoConversion {
            map: name.to_string(),
            version: version.map_or_else(|| "unknown".to_string(), |v| v.to_string()),
            found,
            expected,
        })?;
        let n = copy_one(name, &sfd, &dfd, found, conv, flags, dinfo.max_entries)?;
        out.push((name.to_string(), n));
    }
    Ok(out)
}

fn copy_one(
    name: &str,
    src: &OwnedFd,
    dst: &OwnedFd,
    (ks, vs): (u32, u32),
    conv: Conv,
    flags: u64,
    capacity: u32,
) -> Result<u64, UpgradeError> {
    let kerr = |op: &'static str| {
        let path = PathBuf::from(name);
        move |source| UpgradeError::Pin { path, op, source }
    };
    let mut key = vec![0u8; ks as usize];
    let mut next = vec![0u8; ks as usize];
    let mut val = vec![0u8; vs as usize];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let more = sys::map_next_key(src.as_fd(), (!first).then_some(&key[..]), &mut next)
            .map_err(kerr("next key"))?;
        if !more {
            break;
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        // Gone since (an LRU eviction, a flow lapsed): skip it.
        if !sys::map_lookup(src.as_fd(), &key, &mut val).map_err(kerr("lookup"))? {
            continue;
        }
        let (k, v) = conv.apply(&key, &val);
        match sys::map_update(dst.as_fd(), &k, &v, flags) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
                ) =>
            {
                return Err(UpgradeError::DoesNotFit {
                    map: name.to_string(),
                    entries: n,
                    capacity,
                })
            }
            Err(e) => return Err(kerr("update")(e)),
        }
    }
    Ok(n)
}

/// Pins under `to` every map of `from` that this build can use as it is
/// (same key and value size, same capacity): the new programs then share it
/// with the old ones, so nothing is copied and no entry written during the
/// switch is missed. Returns their names.
pub fn share_unchanged(
    from: &Pins,
    to: &Pins,
    version: Option<u32>,
    sizes: &MapSizes,
) -> Result<Vec<String>, UpgradeError> {
    let mut shared = Vec::new();
    for name in CARRIED {
        let src = from.map(name);
        if !src.exists() {
            continue;
        }
        let (fd, info) = open(&src)?;
        let Some(expected) = crate::loader::expected_sizes(name) else {
            continue;
        };
        let same_size =
            crate::loader::wanted_entries(name, sizes).is_none_or(|want| want == info.max_entries);
        let raw = conversion(name, version, (info.key_size, info.value_size), expected)
            == Some(Conv::Raw);
        if same_size && raw {
            let dst = to.map(name);
            sys::obj_pin(fd.as_fd(), &dst).map_err(|source| UpgradeError::Pin {
                path: dst,
                op: "pin (shared)",
                source,
            })?;
            shared.push(name.to_string());
        }
    }
    Ok(shared)
}

/// Removes every pin under `dir` and the directory.
pub fn remove_dir(dir: &Path) -> Result<(), UpgradeError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        std::fs::remove_file(&p).map_err(|source| UpgradeError::Pin {
            path: p.clone(),
            op: "remove",
            source,
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| UpgradeError::Pin {
        path: dir.to_path_buf(),
        op: "remove",
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), UpgradeError> {
    std::fs::rename(from, to).map_err(|source| UpgradeError::Pin {
        path: from.to_path_buf(),
        op: "rename",
        source,
    })
}

/// Makes the staging maps the ones in use: `maps` → `maps-old`,
/// `maps-next` → `maps`, then `maps-old` removed.
pub fn swap(pins: &Pins) -> Result<(), UpgradeError> {
    let root = pins.root();
    let retired = root.join(RETIRED);
    remove_dir(&retired)?;
    rename(&root.join(MAPS), &retired)?;
    rename(&root.join(STAGING), &root.join(MAPS))?;
    remove_dir(&retired)
}

/// Finishes or discards an upgrade a crash interrupted; says what it did.
/// - `maps` gone and `maps-next` complete (the crash fell between the two
///   renames of [`swap`]): `maps-next` becomes `maps`;
/// - `maps-next` beside `maps`: an unfinished fill, removed (the links
///   still run the programs of `maps`: they are switched only once the
///   copy is complete, and then [`swap`] follows at once);
/// - `maps-old`: removed.
pub fn recover_interrupted(pins: &Pins) -> Result<Option<String>, UpgradeError> {
    let root = pins.root();
    let staging = root.join(STAGING);
    let retired = root.join(RETIRED);
    let mut did = None;
    if staging.exists() {
        if pins.maps_exist() {
            remove_dir(&staging)?;
            did = Some("removed the maps of an unfinished upgrade (maps-next)".to_string());
        } else if staging.join(names::SERVICES).exists() {
            let _ = std::fs::remove_dir(root.join(MAPS));
            rename(&staging, &root.join(MAPS))?;
            did = Some("finished an interrupted upgrade (maps-next became maps)".to_string());
        } else {
            remove_dir(&staging)?;
        }
    }
    if retired.exists() {
        remove_dir(&retired)?;
    }
    Ok(did)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Lb4Service;

    fn bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a repr(C) plain-integer layout struct.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn a_layout_3_frontend_keeps_every_field() {
        // Layout 3's 16 bytes, written out field by field.
        let mut old = Vec::new();
        old.extend_from_slice(&7u32.to_ne_bytes()); // backend_id
        old.extend_from_slice(&10800u32.to_ne_bytes()); // affinity_timeout
        old.extend_from_slice(&3u16.to_ne_bytes()); // count
        old.extend_from_slice(&65535u16.to_ne_bytes()); // rev_nat_index
        old.push(0x03); // flags
        old.push(0); // pad
        old.extend_from_slice(&2u16.to_ne_bytes()); // local_count
        let conv = conversion(names::SERVICES, Some(3), (12, 16), (12, 20)).unwrap();
        let (_, v) = conv.apply(&[0; 12], &old);
        let want = Lb4Service {
            backend_id: 7,
            affinity_timeout: 10800,
            rev_nat_index: 65535,
            count: 3,
            local_count: 2,
            flags: 0x03,
            pad: [0; 3],
        };
        assert_eq!(v, bytes(&want));
    }

    #[test]
    fn layout_3_rev_nat_keys_widen() {
        let (k, v) = conversion(names::REVNAT, Some(3), (2, 8), (4, 8))
            .unwrap()
            .apply(&300u16.to_ne_bytes(), &[7; 8]);
        assert_eq!(k, 300u32.to_ne_bytes());
        assert_eq!(v, [7; 8]);
    }

    #[test]
    fn unknown_layouts_are_copied_only_where_sizes_match() {
        // Why: after a downgrade the newer layout is unknown; equal sizes mean
        // equal bytes (the layout rule), anything else must not be guessed.
        assert_eq!(
            conversion(names::BACKENDS, Some(9), (4, 8), (4, 8)),
            Some(Conv::Raw)
        );
        assert_eq!(
            conversion(names::SERVICES, Some(9), (12, 24), (12, 20)),
            None
        );
        assert_eq!(conversion(names::SERVICES, None, (12, 16), (12, 20)), None);
        // Layout 3 with sizes its converter does not take: refused too.
        assert_eq!(
            conversion(names::SERVICES, Some(3), (8, 16), (12, 20)),
            None
        );
    }

    #[test]
    fn every_map_this_layout_changed_since_3_has_a_conversion() {
        // Layout 3's sizes of the carried maps whose struct changed.
        let v3: [(&str, (u32, u32)); 4] = [
            (names::SERVICES, (12, 16)),
            (names::SERVICES6, (24, 16)),
            (names::REVNAT, (2, 8)),
            (names::REVNAT6, (2, 20)),
        ];
        for (name, found) in v3 {
            let expected = crate::loader::expected_sizes(name).unwrap();
            assert!(
                conversion(name, Some(3), found, expected).is_some(),
                "{name}: {found:?} -> {expected:?}"
            );
        }
    }
}
