//! The machine a run measured: CPU, cores, memory, kernel, tool versions, load.

use std::process::Command;

use serde::Serialize;

use crate::kube_proxy::IptablesBackend;

/// Facts about the machine.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cores: usize,
    /// MemTotal, GiB.
    pub memory_gib: f64,
    /// `uname -r`.
    pub kernel: String,
    /// iptables version line (the backend used).
    pub iptables: String,
    /// nft version line.
    pub nft: String,
    /// IPVS availability (it is not in this kernel).
    pub ipvs: String,
    /// /proc/loadavg when the run started.
    pub loadavg_start: String,
    /// /proc/loadavg when it ended.
    pub loadavg_end: String,
    /// Start (RFC 3339, UTC).
    pub date: String,
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "not found".into())
}

/// /proc/loadavg (first three fields).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Whether the kernel has IPVS (kube-proxy's ipvs mode needs it).
pub fn ipvs() -> String {
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        "available".into()
    } else {
        "not in this kernel (no /proc/net/ip_vs; ipvsadm fails with \"Protocol not available\"): kube-proxy ipvs mode cannot be measured here".into()
    }
}

/// Reads everything.
pub fn probe(backend: IptablesBackend) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0);
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        iptables: first_line(Command::new(backend.binary()).arg("--version")),
        nft: first_line(Command::new("nft").arg("--version")),
        ipvs: ipvs(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        date: jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
    }
}
