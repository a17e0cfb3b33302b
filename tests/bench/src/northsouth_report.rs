//! The north–south section's report: northsouth.json and a markdown table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::northsouth::{Backend, Proxy, Report};

/// Files written.
pub struct Written {
    /// northsouth.md.
    pub markdown: PathBuf,
    /// northsouth.json.
    pub json: PathBuf,
}

/// Writes `out/northsouth.{json,md}`.
pub fn write(rep: &Report, out: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("northsouth.json");
    std::fs::write(&json, serde_json::to_string_pretty(rep)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let markdown = out.join("northsouth.md");
    std::fs::write(&markdown, self::markdown(rep))
        .with_context(|| format!("writing {}", markdown.display()))?;
    Ok(Written { markdown, json })
}

fn backend(b: Backend) -> &'static str {
    match b {
        Backend::Local => "local",
        Backend::Remote => "remote (SNAT)",
    }
}

/// The report as markdown.
pub fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    let m = &rep.machine;
    let _ = writeln!(
        s,
        "# North–south: external client → NodePort (issue 14){}\n",
        if rep.quick { " — quick mode" } else { "" }
    );
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {} GiB), kernel {}, {}, {}; {}. Load average {} at the start, {} at the end; took {:.0} s.\n",
        m.cpu_model, m.cores, m.memory_gib, m.kernel, m.iptables, m.nft, m.date,
        m.loadavg_start, m.loadavg_end, rep.duration_s
    );
    let _ = writeln!(
        s,
        "One connection per request (connect, send `GET\\n`, read the reply to the server's close, close), {} measured per row, rows interleaved in rounds. Every Service is a NodePort (policy Cluster); the measured ones are the last two declared. connect() = the client's blocking connect (handshake done). req/s = one client, one request at a time. Added = the row's value minus the floor's (same backend).\n",
        rep.connections
    );
    let _ = writeln!(
        s,
        "| Services | datapath | backend | connect p50 µs | p99 µs | p99.9 µs | added p50 | added p99 | req/s | failed |"
    );
    let _ = writeln!(s, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rep.rows {
        let floor = rep.rows.iter().find(|f| {
            f.services == r.services && f.proxy == Proxy::Floor && f.backend == r.backend
        });
        if let Some(e) = &r.error {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {e} | | | | | | |",
                r.services,
                r.proxy.name(),
                backend(r.backend)
            );
            continue;
        }
        let (a50, a99) = match floor {
            Some(f) if r.proxy != Proxy::Floor => (
                format!("{:+.1}", r.connect_us.p50 - f.connect_us.p50),
                format!("{:+.1}", r.connect_us.p99 - f.connect_us.p99),
            ),
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {a50} | {a99} | {:.0} | {} |",
            r.services,
            r.proxy.name(),
            backend(r.backend),
            r.connect_us.p50,
            r.connect_us.p99,
            r.connect_us.p999,
            r.requests_per_s,
            r.failed
        );
    }
    if !rep.tc_cost.is_empty() {
        let _ = writeln!(
            s,
            "\n## netboot's tc ingress program per packet (BPF_PROG_TEST_RUN)\n\nThe program the agent attached (through its pinned link), its maps as the agent filled them, frames from the client to the node. New flows: one run per flow (another source port each), median; the others: the kernel's mean over the runs.\n\n| Services | frame | ns/packet | verdict | runs |\n|---:|---|---:|---:|---:|"
        );
        for c in &rep.tc_cost {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {} |",
                c.services, c.case, c.ns_per_packet, c.retval, c.runs
            );
        }
    }
    if !rep.load_s.is_empty() {
        let _ = writeln!(s, "\nSetup (untimed for the rows): ");
        for (k, v) in &rep.load_s {
            let _ = writeln!(s, "- {k}: {v:.1} s");
        }
    }
    if let Some(g) = &rep.goal {
        let parts: Vec<String> = g
            .added_p99_us
            .iter()
            .map(|(b, nb, nft, ipt)| {
                format!(
                    "{}: netboot {nb:+.1} µs, nftables {nft:+.1} µs, iptables {ipt:+.1} µs",
                    backend(*b)
                )
            })
            .collect();
        // The goal is set at 10k Services; a quick run (1k, a few hundred
        // requests) reports the same comparison without a verdict.
        let verdict = match (rep.quick, g.met) {
            (true, _) => "not judged (quick mode; the goal is judged in full mode at 10k Services)",
            (false, true) => "MET",
            (false, false) => "NOT MET",
        };
        let _ = writeln!(
            s,
            "\nGoal (added p99 at {} Services ≤ nftables' and ≥ 10× below iptables'): **{verdict}** — {}.",
            g.services,
            parts.join("; ")
        );
    }
    if let Some(e) = &rep.error {
        let _ = writeln!(s, "\nStopped early: {e}");
    }
    s
}
