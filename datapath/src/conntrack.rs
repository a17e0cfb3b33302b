//! The per-packet path's flow tables (`nb_ct4`, `nb_ct6`) from userspace: its lifetimes
//! (`nb_ct_timeout`, from config.yaml's `conntrack`), the agent's periodic
//! sweep that deletes lapsed entries and measures the table, and the
//! `bpf ct list` dump.
//!
//! The programs treat a lapsed entry as absent on their own; the sweep keeps
//! the LRU table from evicting live flows to make room while dead ones still
//! sit in it, and tells the operator how full it is.

use std::net::IpAddr;

use aya::maps::{Array, HashMap, Map, MapData};
use serde::{Deserialize, Serialize};

use crate::layout::{
    addr6_from_be, addr_from_be, names, Ct4Key, Ct4Val, Ct6Key, Ct6Val, CtTimeouts, CT_F_CLOSING,
    CT_F_POD, CT_F_REPLY, CT_F_SNAT,
};
use crate::maps::kernel::kerr;
use crate::maps::MapsError;
use crate::pins::Pins;
use netboot_contract::config::Conntrack;

/// Share of the table's capacity above which the agent warns: beyond it,
/// new flows start evicting the least recently used live ones.
pub const NEAR_FULL: f64 = 0.9;

/// The kernel's `CLOCK_MONOTONIC` in whole seconds: the clock of
/// `bpf_ktime_get_ns()`, which the entries' `expires` counts in.
pub fn monotonic_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pins: &Pins,
    name: &'static str,
) -> Result<T, MapsError> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| MapsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map = Map::from_map_data(data).map_err(|e| MapsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    T::try_from(map).map_err(|e| MapsError::Open {
        path,
        source: Box::new(e),
    })
}

/// Writes the lifetimes the programs use for new and refreshed entries.
pub fn set_timeouts(pins: &Pins, ct: &Conntrack) -> Result<(), MapsError> {
    let mut m: Array<MapData, CtTimeouts> = open(pins, names::CT_TIMEOUT)?;
    let v = CtTimeouts {
        tcp_syn: ct.tcp_syn_timeout_seconds,
        tcp_est: ct.tcp_established_timeout_seconds,
        tcp_close: ct.tcp_close_timeout_seconds,
        udp: ct.udp_timeout_seconds,
    };
    m.set(0, v, 0).map_err(kerr(names::CT_TIMEOUT, "set"))
}

/// Whether an entry's expiry has passed at `now` (wrap-safe, as in the program).
pub fn lapsed(v: &Ct4Val, now: u32) -> bool {
    lapsed_at(v.expires, now)
}

/// What one sweep found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sweep {
    /// Live entries left (two per flow).
    pub live: u64,
    /// Of those, entries of closing TCP flows.
    pub closing: u64,
    /// Of those, entries of source-NATed flows.
    pub snat: u64,
    /// Lapsed entries deleted by this sweep.
    pub deleted: u64,
    /// The table's capacity in entries.
    pub capacity: u32,
}

impl Sweep {
    /// Whether the table is fuller than [`NEAR_FULL`].
    pub fn near_full(&self) -> bool {
        self.capacity > 0 && self.live as f64 > NEAR_FULL * f64::from(self.capacity)
    }
}

/// The fields of an entry of either family the sweep and the list use.
trait CtEntry: aya::Pod {
    fn expires(&self) -> u32;
    fn flags(&self) -> u8;
}

impl CtEntry for Ct4Val {
    fn expires(&self) -> u32 {
        self.expires
    }
    fn flags(&self) -> u8 {
        self.flags
    }
}

impl CtEntry for Ct6Val {
    fn expires(&self) -> u32 {
        self.expires
    }
    fn flags(&self) -> u8 {
        self.flags
    }
}

/// Whether an expiry has passed at `now` (wrap-safe, as in the program).
fn lapsed_at(expires: u32, now: u32) -> bool {
    (now.wrapping_sub(expires) as i32) > 0
}

fn sweep_map<K: aya::Pod + Ord, V: CtEntry>(
    pins: &Pins,
    name: &'static str,
    now: u32,
    out: &mut Sweep,
) -> Result<(), MapsError> {
    let mut m: HashMap<MapData, K, V> = open(pins, name)?;
    out.capacity += aya::maps::MapInfo::from_pin(pins.map(name))
        .map(|i| i.max_entries())
        .unwrap_or(0);
    let mut dead = Vec::new();
    for item in m.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            // The entry went away between the key walk and the read.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(kerr(name, "iter")(e)),
        };
        if lapsed_at(v.expires(), now) {
            dead.push(k);
            continue;
        }
        out.live += 1;
        out.closing += u64::from(v.flags() & CT_F_CLOSING != 0);
        out.snat += u64::from(v.flags() & CT_F_SNAT != 0);
    }
    for k in dead {
        // Re-check: the program may have replaced it with a live flow since.
        match m.get(&k, 0) {
            Ok(v) if lapsed_at(v.expires(), now) => {}
            _ => continue,
        }
        if m.remove(&k).is_ok() {
            out.deleted += 1;
        }
    }
    Ok(())
}

/// Deletes every lapsed entry of both families and counts the rest. An
/// entry that lapses or is replaced while the sweep runs is at worst
/// counted or deleted one sweep late.
pub fn sweep(pins: &Pins, now: u32) -> Result<Sweep, MapsError> {
    let mut out = Sweep::default();
    sweep_map::<Ct4Key, Ct4Val>(pins, names::CT4, now, &mut out)?;
    sweep_map::<Ct6Key, Ct6Val>(pins, names::CT6, now, &mut out)?;
    Ok(out)
}

/// One tracked flow direction, for `bpf ct list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// `TCP` or `UDP`.
    pub proto: &'static str,
    /// The packet as it arrives: `src -> dst`.
    pub from: String,
    /// What it is rewritten to: `src -> dst`.
    pub to: String,
    /// `forward` (client to frontend) or `reply`.
    pub direction: &'static str,
    /// Service id of the flow.
    pub service_id: u32,
    /// Flags: `snat`, `closing`.
    pub flags: Vec<&'static str>,
    /// Seconds left (negative: lapsed, not yet swept).
    pub expires_in: i64,
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, u16::from_be(port)).to_string()
}

#[allow(clippy::too_many_arguments)]
fn entry(
    proto: u8,
    (ks, kd, ksp, kdp): (IpAddr, IpAddr, u16, u16),
    (vs, vd, vsp, vdp): (IpAddr, IpAddr, u16, u16),
    rev_nat_index: u32,
    flags: u8,
    expires: u32,
    now: u32,
) -> Entry {
    let mut fl = Vec::new();
    if flags & CT_F_SNAT != 0 {
        fl.push("snat");
    }
    if flags & CT_F_CLOSING != 0 {
        fl.push("closing");
    }
    if flags & CT_F_POD != 0 {
        fl.push("pod");
    }
    Entry {
        proto: if proto == libc::IPPROTO_TCP as u8 {
            "TCP"
        } else {
            "UDP"
        },
        from: format!("{} -> {}", endpoint(ks, ksp), endpoint(kd, kdp)),
        to: format!("{} -> {}", endpoint(vs, vsp), endpoint(vd, vdp)),
        direction: if flags & CT_F_REPLY != 0 {
            "reply"
        } else {
            "forward"
        },
        service_id: rev_nat_index,
        flags: fl,
        expires_in: i64::from(expires.wrapping_sub(now) as i32),
    }
}

fn rows<K: aya::Pod, V: aya::Pod>(
    pins: &Pins,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    let m: HashMap<MapData, K, V> = open(pins, name)?;
    m.iter()
        .filter_map(|r| match r {
            Err(aya::maps::MapError::KeyNotFound) => None,
            other => Some(other),
        })
        .collect::<Result<_, _>>()
        .map_err(kerr(name, "iter"))
}

/// Every entry of both families, IPv4 first, each sorted by the packet tuple.
pub fn list(pins: &Pins, now: u32) -> Result<Vec<Entry>, MapsError> {
    let mut v4: Vec<(Ct4Key, Ct4Val)> = rows(pins, names::CT4)?;
    v4.sort_by_key(|(k, _)| *k);
    let mut v6: Vec<(Ct6Key, Ct6Val)> = rows(pins, names::CT6)?;
    v6.sort_by_key(|(k, _)| *k);
    let a4 = |a: u32| IpAddr::V4(addr_from_be(a));
    let a6 = |a: [u32; 4]| IpAddr::V6(addr6_from_be(a));
    Ok(v4
        .into_iter()
        .map(|(k, v)| {
            entry(
                k.proto,
                (a4(k.saddr), a4(k.daddr), k.sport, k.dport),
                (a4(v.saddr), a4(v.daddr), v.sport, v.dport),
                v.rev_nat_index,
                v.flags,
                v.expires,
                now,
            )
        })
        .chain(v6.into_iter().map(|(k, v)| {
            entry(
                k.proto,
                (a6(k.saddr), a6(k.daddr), k.sport, k.dport),
                (a6(v.saddr), a6(v.daddr), v.sport, v.dport),
                v.rev_nat_index,
                v.flags,
                v.expires,
                now,
            )
        }))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapsed_is_wrap_safe_and_exclusive_of_the_expiry_second() {
        let v = |expires| Ct4Val {
            expires,
            ..Ct4Val::default()
        };
        assert!(!lapsed(&v(100), 99));
        assert!(!lapsed(&v(100), 100));
        assert!(lapsed(&v(100), 101));
        // Expiry just past the u32 wrap, clock just before it: live.
        assert!(!lapsed(&v(5), u32::MAX - 5));
        assert!(lapsed(&v(u32::MAX - 5), 5));
    }

    #[test]
    fn near_full_is_above_nine_tenths_of_capacity() {
        let s = |live, capacity| Sweep {
            live,
            capacity,
            ..Sweep::default()
        };
        assert!(!s(90, 100).near_full());
        assert!(s(91, 100).near_full());
        assert!(!s(0, 0).near_full());
    }
}
