//! Compiles the BPF programs in bpf/ with clang-19 into OUT_DIR.
//!
//! Needs Debian's `clang-19` (the compiler) and `libbpf-dev` (bpf_helpers.h),
//! plus `linux-libc-dev` for <asm/types.h> under /usr/include/x86_64-linux-gnu.

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

fn fail(msg: &str) -> ! {
    eprintln!("error: netboot-datapath build: {msg}");
    exit(1);
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR not set")));
    let bpf_dir = manifest.join("bpf");
    let clang = env::var("NETBOOT_CLANG").unwrap_or_else(|_| "clang-19".into());

    for f in ["lb.h", "rev_sk.h", "sock_lb.bpf.c", "sock_term.bpf.c"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=NETBOOT_CLANG");

    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let arch_inc = PathBuf::from("/usr/include").join(multiarch);
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("/usr/include/bpf/bpf_helpers.h is missing: apt-get install libbpf-dev");
    }
    if !arch_inc.join("asm/types.h").exists() {
        fail(&format!(
            "{}/asm/types.h is missing: apt-get install linux-libc-dev",
            arch_inc.display()
        ));
    }

    for prog in ["sock_lb", "sock_term"] {
        let src = bpf_dir.join(format!("{prog}.bpf.c"));
        let obj = out.join(format!("{prog}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{}", arch_inc.display()))
            .arg(format!("-I{}", bpf_dir.display()))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => fail(&format!("{clang} failed ({s}) compiling bpf/{prog}.bpf.c")),
            Err(e) => fail(&format!(
                "cannot run {clang} ({e}): apt-get install clang-19 libbpf-dev (or set NETBOOT_CLANG)"
            )),
        }
    }
}
