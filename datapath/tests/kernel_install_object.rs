//! Privileged: `loader::install_object`, how a benchmark loads another
//! build of `sock_lb.bpf.c` beside this one (`netboot-bench
//! --variant-object`): every program attached from the object given, the
//! datapath mode written, and an object that is not BPF refused with the
//! loader's error, nothing attached.
//!
//! Run: `sudo cargo test -p netboot-datapath --test kernel_install_object`
//! Network: none (no packet is sent).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

mod support;

use netboot_datapath::config::MapSizes;
use netboot_datapath::layout::MODE_REPLACE;
use netboot_datapath::loader::{self, DatapathMode, ATTACH_POINTS};
use netboot_datapath::maps::kernel::KernelMaps;
use support::*;

const MODE: DatapathMode = DatapathMode {
    replace: true,
    host_namespace_only: false,
};

/// `object` installed into a fresh cgroup and pin root named `tag` (kept
/// alive with the result: dropping them detaches and unpins).
fn install(
    tag: &str,
    object: &[u8],
) -> (
    TestCgroup,
    TestPins,
    Result<loader::InstallReport, loader::LoaderError>,
) {
    require_privileges();
    let cg = TestCgroup::new(tag);
    let pins = TestPins::new(tag);
    let r = loader::install_object(&pins.pins, &cg.path, &MapSizes::default(), MODE, object);
    (cg, pins, r)
}

#[test]
fn an_object_given_is_attached_at_every_point_in_replace_mode() {
    // Why: a variant run compares two builds only if the variant's
    // programs really serve its cgroup; a load that attached nothing, or
    // left the mode at observe, would make the variant's row the floor's.
    let (_cg, pins, r) = install("instobj", loader::BPF_OBJECT);
    let report = r.expect("install_object");
    assert_eq!(report.links.len(), ATTACH_POINTS.len(), "{report:?}");
    let state = loader::attach_state(&pins.pins);
    let points: Vec<&str> = state.links.iter().map(|l| l.0.as_str()).collect();
    let want: Vec<&str> = ATTACH_POINTS.iter().map(|(p, _)| *p).collect();
    assert_eq!(points, want);
    let maps = KernelMaps::open(&pins.pins).expect("open maps");
    assert_eq!(maps.config().expect("config").mode, MODE_REPLACE);
}

#[test]
fn an_object_that_is_not_bpf_is_refused_and_nothing_is_attached() {
    let (_cg, pins, r) = install("instbad", b"not an ELF object");
    let err = r.expect_err("garbage must not load");
    assert!(
        matches!(err, loader::LoaderError::Load(_)),
        "the loader's error, not another: {err}"
    );
    assert!(loader::attach_state(&pins.pins).links.is_empty());
}
