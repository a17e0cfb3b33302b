//! The per-packet cost of netboot's tc ingress program (`nb_np_ingress`),
//! from `BPF_PROG_TEST_RUN`: the very program the agent attached to the
//! node's eth0 (found through its pinned link), its maps as the agent filled
//! them for N Services, on crafted frames from the external client.
//!
//! Cases: a SYN to a NodePort opening a new flow (local backend; remote
//! backend, SNAT) — one run per flow, each from another source port, the
//! median of the kernel's times; a packet of a flow already tracked and a
//! packet to a port that is no Service (the miss), `repeat` runs each,
//! the kernel's mean.

use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;

use anyhow::{bail, Context, Result};
use netboot_datapath::pins::Pins;
use netboot_datapath::sys;
use serde::Serialize;

use crate::cleanup::Netns;
use crate::northsouth::{self, Backend, CLIENT_IP, NODE_IP, NODE_MAC};
use crate::workload::Workload;

/// One case's cost.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    /// Services in the maps.
    pub services: u32,
    /// What the frame was.
    pub case: String,
    /// ns per packet.
    pub ns_per_packet: f64,
    /// The program's verdict (TC_ACT_OK 0, TC_ACT_SHOT 2, TC_ACT_REDIRECT 7).
    pub retval: u32,
    /// Runs measured.
    pub runs: u64,
}

/// RFC 1071 checksum over `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP SYN frame from `src` to `dst` (checksums right).
pub fn syn_frame(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    dst_mac: [u8; 6],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x64]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// A `struct __sk_buff` with `ingress_ifindex` and `ifindex` set (the rest
/// zero, as the kernel requires of the fields it does not take).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut c = vec![0u8; 192];
    c[36..40].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    c
}

/// Measures the cases against the agent's program in `node` (the test runs
/// happen on a thread inside it: `ifindex` is eth0 there).
pub fn measure(
    node: &Netns,
    pins: &Pins,
    w: &Workload,
    repeat: u32,
    flows: u16,
) -> Result<Vec<Cost>> {
    let link = sys::obj_get(&pins.link("np-in-eth0"))
        .context("opening the agent's pinned tc link np-in-eth0")?;
    let info = sys::link_info(link.as_fd()).context("tc link info")?;
    let prog = sys::prog_get_fd_by_id(info.prog_id).context("the tc program's fd")?;
    let n = w.n;
    let local = northsouth::node_port(northsouth::measured(w, Backend::Local));
    let remote = northsouth::node_port(northsouth::measured(w, Backend::Remote));
    northsouth::in_ns(node, move || {
        let ifindex = sys::ifindex("eth0").context("eth0's index")?;
        let ctx = skb_ctx(ifindex);
        let run = |frame: &[u8], repeat: u32| {
            sys::prog_test_run(prog.as_fd(), frame, &ctx, repeat).context("BPF_PROG_TEST_RUN")
        };
        let mut out = Vec::new();
        for (case, port, base) in [
            ("NodePort SYN, new flow, local backend", local, 10_000u16),
            (
                "NodePort SYN, new flow, remote backend (SNAT)",
                remote,
                30_000u16,
            ),
        ] {
            let mut times = Vec::with_capacity(usize::from(flows));
            let mut retval = 0;
            for k in 0..flows {
                let f = syn_frame(CLIENT_IP, base + k, NODE_IP, port, NODE_MAC);
                let r = run(&f, 1)?;
                times.push(f64::from(r.duration_ns));
                retval = r.retval;
            }
            out.push(Cost {
                services: n,
                case: case.into(),
                ns_per_packet: crate::stats::summarize(&times).p50,
                retval,
                runs: u64::from(flows),
            });
        }
        for (case, frame) in [
            (
                "NodePort packet of a tracked flow",
                syn_frame(CLIENT_IP, 10_000, NODE_IP, local, NODE_MAC),
            ),
            (
                "not a Service (miss)",
                syn_frame(CLIENT_IP, 10_000, NODE_IP, 22, NODE_MAC),
            ),
        ] {
            let r = run(&frame, repeat)?;
            out.push(Cost {
                services: n,
                case: case.into(),
                ns_per_packet: f64::from(r.duration_ns),
                retval: r.retval,
                runs: u64::from(repeat),
            });
        }
        if out.iter().take(2).any(|c| c.retval == 2) {
            bail!("the program dropped the NodePort SYN (TC_ACT_SHOT): {out:?}");
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syn_frame_has_valid_checksums() {
        let f = syn_frame(CLIENT_IP, 1234, NODE_IP, 20000, NODE_MAC);
        assert_eq!(f.len(), 54);
        assert_eq!(&f[..6], &NODE_MAC);
        // A header with its checksum in sums to zero (complemented).
        assert_eq!(checksum(&[&f[14..34]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&CLIENT_IP.octets());
        pseudo[4..8].copy_from_slice(&NODE_IP.octets());
        pseudo[9] = 6;
        pseudo[11] = 20;
        assert_eq!(checksum(&[&pseudo, &f[34..54]]), 0);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 20000);
        assert_eq!(f[47], 0x02);
    }
}
