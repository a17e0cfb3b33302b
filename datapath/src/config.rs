//! The agent's `config.yaml`: the schema and parser are the contract's
//! ([`netboot_contract::config`]), shared with the bootstrapper, which parses
//! what it renders with the same [`Config::parse`]. This module re-exports it
//! and ties `bpf/lb.h`'s compiled-in map sizes to the contract's defaults.

pub use netboot_contract::config::*;

/// The header the BPF object is built from (build.rs).
const LB_H: &str = include_str!("../bpf/lb.h");

/// The value of `#define NAME <decimal>` in `header`, or 0 when there is no
/// such line. A `const fn`, so the checks below fail the build, not a test.
const fn define(header: &str, name: &str) -> u64 {
    const PREFIX: &[u8] = b"#define ";
    let h = header.as_bytes();
    let n = name.as_bytes();
    let mut i = 0;
    while i + PREFIX.len() + n.len() < h.len() {
        let line_start = i == 0 || h[i - 1] == b'\n';
        let mut ok = line_start;
        let mut j = 0;
        while ok && j < PREFIX.len() {
            ok = h[i + j] == PREFIX[j];
            j += 1;
        }
        let mut k = 0;
        while ok && k < n.len() {
            ok = h[i + PREFIX.len() + k] == n[k];
            k += 1;
        }
        let mut p = i + PREFIX.len() + n.len();
        // The name must end here (NB_DEFAULT_X is not NB_DEFAULT_XY).
        if ok && (h[p] == b' ' || h[p] == b'\t') {
            while p < h.len() && (h[p] == b' ' || h[p] == b'\t') {
                p += 1;
            }
            let mut v: u64 = 0;
            while p < h.len() && h[p].is_ascii_digit() {
                v = v * 10 + (h[p] - b'0') as u64;
                p += 1;
            }
            return v;
        }
        i += 1;
    }
    0
}

// lb.h's NB_DEFAULT_* (the max_entries the BPF object is compiled with) are
// the contract's defaults (what the bootstrapper renders when mapSizes is
// left out, and what the agent assumes then).
const _: () = {
    let d = MapSizes::DEFAULT;
    assert!(define(LB_H, "NB_DEFAULT_SERVICES") == d.services as u64);
    assert!(define(LB_H, "NB_DEFAULT_BACKENDS") == d.backends as u64);
    assert!(define(LB_H, "NB_DEFAULT_REVNAT") == d.reverse_nat as u64);
    assert!(define(LB_H, "NB_DEFAULT_AFFINITY") == d.affinity as u64);
    // The largest Maglev table the layout holds is the contract's.
    assert!(define(LB_H, "NB_MAGLEV_MAX") == MAX_MAGLEV_TABLE_SIZE as u64);
    assert!(define(LB_H, "NB_MAGLEV_MAX") == crate::layout::MAGLEV_MAX as u64);
    assert!(define(LB_H, "NB_DEFAULT_SRC_RANGE") == crate::layout::SRC_RANGE_ENTRIES as u64);
    // nb_lb4_rev_sk is sized like the backends (loader.rs).
    assert!(define(LB_H, "NB_DEFAULT_REV_SK") == d.backends as u64);
    assert!(define(LB_H, "NB_REV_TCP_SLOTS") == crate::layout::REV_TCP_SLOTS as u64);
    assert!(crate::layout::REV_TCP_SLOTS.is_power_of_two());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_reads_whole_names_at_line_starts_only() {
        let h = "/* #define A 1 */\n#define AB 2\n#define A\t 3\n#define B x\n";
        assert_eq!(define(h, "A"), 3);
        assert_eq!(define(h, "AB"), 2);
        assert_eq!(define(h, "B"), 0);
        assert_eq!(define(h, "C"), 0);
        assert_eq!(define(LB_H, "NB_DEFAULT_SERVICES"), 65536);
    }
}
