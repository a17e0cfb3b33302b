//! One benchmark size: generate, set up the four variants, measure full
//! syncs, latency (interleaved), endpoint changes and the agent, tear down.
//! A phase that fails is recorded in the report and the run goes on (an
//! interrupt stops it).

use std::cell::RefCell;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netboot_datapath::desired::{self, DesiredTable};

use crate::agent_run;
use crate::cleanup::{self, Cgroup, Netns};
use crate::client::Client;
use crate::iptables_rules;
use crate::kube_proxy::{
    iptables_restore, iptables_restore_limit, nft_apply, nft_apply_limit, nft_list_chains,
    RuleFiles,
};
use crate::latency::{self, Lane, Plan};
use crate::netboot_lb::{map_sizes, NetbootLb};
use crate::nft_rules;
use crate::report::{m, Report, AGENT};
use crate::settings::{Repeat, Settings};
use crate::stats::summarize;
use crate::sys::Timed;
use crate::topology::Topology;
use crate::variant::{Family, Row, Variant};
use crate::workload::{mapped, real_backend, real_backend6, Workload, BACKEND_PORT};

/// Shared across sizes.
pub struct Ctx<'a> {
    /// Settings.
    pub s: &'a Settings,
    /// `nbb-<pid>`.
    pub run_tag: &'a str,
    /// cgroup of the floor / iptables / nftables clients (no programs).
    pub plain: &'a Cgroup,
    /// The agent binary, if found and wanted.
    pub agent_bin: Option<&'a Path>,
    /// Rule loads that hit the time limit at an earlier size.
    pub timed_out: &'a TimedOut,
}

/// What a size measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Full,
    /// Programming and the agent only (the goals' 100k-endpoint scenario).
    ProgrammingOnly,
}

/// Repeats `f` (which returns the timed part) per `r`; samples in ms.
pub fn repeat(r: Repeat, mut f: impl FnMut(usize) -> Result<Duration>) -> Result<Vec<f64>> {
    repeat_until(r, |i| f(i).map(Some))
}

/// Whether another sample starts: below `max`, and below `min` or within the
/// budget; a measurement so slow that twice the budget is gone stops at
/// whatever it has (at least one sample).
fn another(r: Repeat, taken: usize, elapsed: Duration) -> bool {
    taken < r.max && (taken == 0 || (taken < r.min && elapsed < r.budget * 2) || elapsed < r.budget)
}

/// [`repeat`] where `f` may answer None (the sample hit the time limit):
/// that ends the repetition.
pub fn repeat_until(
    r: Repeat,
    mut f: impl FnMut(usize) -> Result<Option<Duration>>,
) -> Result<Vec<f64>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while another(r, out.len(), start.elapsed()) {
        cleanup::check_stop()?;
        match f(out.len())? {
            Some(d) => out.push(d.as_secs_f64() * 1000.0),
            None => break,
        }
    }
    Ok(out)
}

fn log(w: &Workload, msg: &str) {
    eprintln!("[{}x{}] {msg}", w.n, w.b);
}

/// Runs `f`; an error (other than an interrupt) is noted and swallowed.
fn phase<T>(
    rep: &mut Report,
    w: &Workload,
    what: &str,
    f: impl FnOnce(&mut Report) -> Result<T>,
) -> Result<Option<T>> {
    log(w, what);
    let t = Instant::now();
    match f(rep) {
        Ok(v) => {
            log(w, &format!("  done in {:.1} s", t.elapsed().as_secs_f64()));
            Ok(Some(v))
        }
        Err(e) if cleanup::stopping() => Err(e),
        Err(e) => {
            let msg = format!("{} services x {}: {what} failed: {e:#}", w.n, w.b);
            eprintln!("  {msg}");
            rep.notes.push(msg);
            Ok(None)
        }
    }
}

/// iptables files of one size.
struct IptFiles {
    empty: PathBuf,
    a: PathBuf,
    b: PathBuf,
    partial_a: PathBuf,
    partial_b: PathBuf,
}

/// nftables files of one size.
struct NftFiles {
    delete: PathBuf,
    full: PathBuf,
    to_a: PathBuf,
    to_b: PathBuf,
    /// The same table in transactions of [`NFT_CHUNK`] Services (fallback load).
    chunks: Vec<PathBuf>,
}

/// Files of one size (None: that variant is not attempted at this size, see
/// [`TimedOut`]).
struct Files {
    ipt: Option<IptFiles>,
    nft: Option<NftFiles>,
    _dir: RuleFiles,
}

/// Services per transaction when the nft table is loaded in pieces.
pub const NFT_CHUNK: u32 = 5000;

/// A rule load that can hit the time limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// `iptables-restore` of the whole ruleset (nothing loaded in time).
    IptablesFull,
    /// kube-proxy ≥ 1.28's partial restore.
    IptablesPartial,
    /// kube-proxy's nftables table (whole, then in transactions).
    Nftables,
}

impl Load {
    fn what(self) -> &'static str {
        match self {
            Load::IptablesFull => "iptables-restore of the whole ruleset",
            Load::IptablesPartial => "the partial iptables-restore",
            Load::Nftables => "loading kube-proxy's nftables table (whole, then in transactions)",
        }
    }
}

/// Loads that hit the time limit in this run and the size they hit it at.
/// A size at least as large (as many Services and endpoints per Service or
/// more) does not try them again: they only get slower with N, and each try
/// costs the whole limit (the 1M run would spend ~10 min failing).
#[derive(Debug, Default)]
pub struct TimedOut(RefCell<Vec<(Load, u32, u32)>>);

impl TimedOut {
    /// `load` hit the limit at `w`'s size.
    pub fn record(&self, load: Load, w: &Workload) {
        self.0.borrow_mut().push((load, w.n, w.b));
    }

    /// Why `load` is not attempted at `w`'s size (it hit the limit at a
    /// size no larger), if so.
    pub fn skip(&self, load: Load, w: &Workload, limit: Duration) -> Option<String> {
        self.0
            .borrow()
            .iter()
            .find(|(l, n, b)| *l == load && *n <= w.n && *b <= w.b)
            .map(|(_, n, b)| {
                format!(
                    "not attempted: {} did not finish within {} s at {n} services x {b} earlier in this run",
                    load.what(),
                    limit.as_secs()
                )
            })
    }
}

/// netboot's table (before the change).
struct Tables {
    a: DesiredTable,
    build_ms: f64,
}

fn generate(w: &Workload, tag: &str, ipt: bool, nft: bool) -> Result<(Files, Tables)> {
    let dir = RuleFiles::new(tag)?;
    let services = w.services();
    let slices_a = w.slices(false);
    let t = Instant::now();
    let a = desired::build(&services, &slices_a, 10800);
    let build_ms = t.elapsed().as_secs_f64() * 1000.0;
    let ipt = if ipt {
        let opts = iptables_rules::options();
        let a_text = netboot_harness::kubeproxy_rules::render(&services, &slices_a, &opts);
        let a = dir.write("ipt-a.rules", &a_text)?;
        let partial_a = dir.write(
            "ipt-partial-a.rules",
            &iptables_rules::partial(w, &a_text, false),
        )?;
        drop(a_text);
        let slices_b = w.slices(true);
        let b_text = netboot_harness::kubeproxy_rules::render(&services, &slices_b, &opts);
        drop(slices_b);
        Some(IptFiles {
            empty: dir.write("ipt-empty.rules", &iptables_rules::empty())?,
            a,
            partial_a,
            partial_b: dir.write(
                "ipt-partial-b.rules",
                &iptables_rules::partial(w, &b_text, true),
            )?,
            b: dir.write("ipt-b.rules", &b_text)?,
        })
    } else {
        None
    };
    drop(slices_a);
    drop(services);
    let nft = if nft {
        Some(NftFiles {
            delete: dir.write("nft-delete.nft", &nft_rules::delete_table())?,
            full: dir.write("nft-full.nft", &nft_rules::full_sync(w, false))?,
            to_a: dir.write("nft-to-a.nft", &nft_rules::endpoint_change(w, false))?,
            to_b: dir.write("nft-to-b.nft", &nft_rules::endpoint_change(w, true))?,
            chunks: nft_rules::full_sync_chunks(w, NFT_CHUNK)
                .iter()
                .enumerate()
                .map(|(i, text)| dir.write(&format!("nft-chunk-{i:03}.nft"), text))
                .collect::<Result<_>>()?,
        })
    } else {
        None
    };
    let files = Files {
        ipt,
        nft,
        _dir: dir,
    };
    Ok((files, Tables { a, build_ms }))
}

/// Runs one size.
pub fn run(ctx: &Ctx, w: &Workload, scope: Scope, rep: &mut Report) -> Result<()> {
    let (n, b) = (w.n, w.b);
    let tag = format!("{}-{n}x{b}", ctx.run_tag);
    let limit = ctx.s.sync_limit;
    const OFF: &str = "not measured: --no-kube-proxy";
    let (skip_ipt, skip_nft) = if ctx.s.kube_proxy {
        (
            ctx.timed_out.skip(Load::IptablesFull, w, limit),
            ctx.timed_out.skip(Load::Nftables, w, limit),
        )
    } else {
        (Some(OFF.to_string()), Some(OFF.to_string()))
    };
    let Some((files, tables)) = phase(
        rep,
        w,
        "generating Services, EndpointSlices, desired tables and rules",
        |_| generate(w, &tag, skip_ipt.is_none(), skip_nft.is_none()),
    )?
    else {
        return Ok(());
    };
    let r = ctx.s.repeats;
    let nb_name = Variant::Netboot.name();
    let ipt_name = Variant::Iptables.name();
    let nft_name = Variant::Nftables.name();
    rep.add(
        n,
        b,
        nb_name,
        m::DESIRED_BUILD,
        "ms",
        Some(summarize(&[tables.build_ms])),
        "",
    );
    {
        let Some(topo) = phase(rep, w, "creating namespaces and listeners", |_| {
            Topology::new(&tag, b)
        })?
        else {
            return Ok(());
        };
        let sizes = map_sizes(tables.a.frontends.len(), b, w.endpoints());
        let mut nb = phase(rep, w, "loading netboot's socket LB", |_| {
            NetbootLb::install(ctx.run_tag, &format!("lb-{n}x{b}"), &sizes)
        })?;
        let ipt_ns = topo.client(Variant::Iptables)?;
        let nft_ns = topo.client(Variant::Nftables)?;
        let backend = ctx.s.iptables;
        // kube-proxy creates the nfacct counters its rules count in.
        netboot_harness::netns::in_netns(&ipt_ns.name, || {
            netboot_harness::kubeproxy_rules::ensure_nfacct_counters()
        })
        .context("kube-proxy's nfacct counters")?;

        // Full syncs (cold: from empty every time; they end programmed).
        if let Some(nb) = nb.as_mut() {
            phase(rep, w, "netboot full sync", |rep| {
                let mut writes = 0;
                let mut in_maps: Vec<f64> = Vec::new();
                let samples = repeat(r.full_sync, |_| {
                    if nb.programmed() > 0 {
                        nb.clear()?;
                    }
                    let p = nb.reconcile(&tables.a);
                    writes = p.result?.writes();
                    in_maps.push(p.in_maps.as_secs_f64() * 1000.0);
                    Ok(p.took)
                })?;
                let note = format!(
                    "{} frontends; {writes} map writes taking {} ms of it",
                    nb.programmed(),
                    crate::report::num(summarize(&in_maps).p50)
                );
                rep.add(
                    n,
                    b,
                    nb_name,
                    m::FULL_SYNC,
                    "ms",
                    Some(summarize(&samples)),
                    note,
                );
                Ok(())
            })?;
        }
        let over = |what: &str| {
            format!(
                "one {what} did not finish within {} s: killed (nothing committed)",
                limit.as_secs()
            )
        };
        let ipt_loaded = match (&files.ipt, &skip_ipt) {
            (Some(ipt), _) => phase(rep, w, "iptables full sync (iptables-restore)", |rep| {
                let mut killed = false;
                let samples = repeat_until(r.full_sync, |_| {
                    iptables_restore(ipt_ns, backend, &ipt.empty, false)?;
                    match iptables_restore_limit(ipt_ns, backend, &ipt.a, false, limit)? {
                        Timed::Done(d) => Ok(Some(d)),
                        Timed::Killed(_) => {
                            killed = true;
                            Ok(None)
                        }
                    }
                })?;
                let loaded = !samples.is_empty();
                let note = match (killed, loaded) {
                    (false, _) => String::new(),
                    (true, true) => over("iptables-restore"),
                    (true, false) => format!(
                        "{}: iptables not measured at this size",
                        over("iptables-restore of the whole ruleset")
                    ),
                };
                let stats = loaded.then(|| summarize(&samples));
                rep.add(n, b, ipt_name, m::FULL_SYNC, "ms", stats, note);
                if !loaded {
                    ctx.timed_out.record(Load::IptablesFull, w);
                } else if killed {
                    iptables_restore(ipt_ns, backend, &ipt.a, false)?;
                }
                Ok(loaded)
            })?
            .unwrap_or(false),
            (None, why) => {
                let why = why.clone().unwrap_or_default();
                rep.add(n, b, ipt_name, m::FULL_SYNC, "ms", None, why);
                false
            }
        };
        let nft_loaded = match (&files.nft, &skip_nft) {
            (Some(nft), _) => phase(rep, w, "nftables full sync (nft -f)", |rep| {
                let mut killed = false;
                let samples = repeat_until(r.full_sync, |_| {
                    nft_apply(nft_ns, &nft.delete)?;
                    match nft_apply_limit(nft_ns, &nft.full, limit)? {
                        Timed::Done(d) => Ok(Some(d)),
                        Timed::Killed(_) => {
                            killed = true;
                            Ok(None)
                        }
                    }
                })?;
                let mut note = String::new();
                let mut loaded = true;
                if killed {
                    note = over("nft -f of the whole table");
                    // The latency measurement still needs the table: load the same
                    // commands in smaller transactions (untimed), within a budget.
                    let budget = ctx.s.nft_load_budget;
                    let t = Instant::now();
                    nft_apply(nft_ns, &nft.delete)?;
                    for (i, f) in nft.chunks.iter().enumerate() {
                        let left = budget.saturating_sub(t.elapsed());
                        let ok = !left.is_zero()
                            && matches!(nft_apply_limit(nft_ns, f, left)?, Timed::Done(_));
                        if !ok {
                            loaded = false;
                            nft_apply(nft_ns, &nft.delete)?;
                            note.push_str(&format!(
                                "; loading it as transactions of {NFT_CHUNK} Services did not finish within {} s either ({i} of {} loaded; the kernel time of each transaction grows with the sets already in the table): nftables not measured at this size",
                                budget.as_secs(),
                                nft.chunks.len()
                            ));
                            break;
                        }
                    }
                    if loaded {
                        note.push_str(&format!(
                            "; loaded instead as {} transactions of {NFT_CHUNK} Services in {:.1} s",
                            nft.chunks.len(),
                            t.elapsed().as_secs_f64()
                        ));
                    }
                }
                if !loaded {
                    ctx.timed_out.record(Load::Nftables, w);
                }
                let stats = (!samples.is_empty()).then(|| summarize(&samples));
                rep.add(n, b, nft_name, m::FULL_SYNC, "ms", stats, note);
                Ok(loaded)
            })?
            .unwrap_or(false),
            (None, why) => {
                let why = why.clone().unwrap_or_default();
                rep.add(n, b, nft_name, m::FULL_SYNC, "ms", None, why);
                false
            }
        };
        let mut skip: Vec<(Variant, String)> = Vec::new();
        if !ctx.s.kube_proxy {
            skip.push((Variant::Iptables, OFF.into()));
            skip.push((Variant::Nftables, OFF.into()));
        } else {
            if !ipt_loaded {
                skip.push((
                    Variant::Iptables,
                    "not measured: kube-proxy's iptables ruleset could not be loaded in time (see programming cost)".into(),
                ));
            }
            if !nft_loaded {
                skip.push((
                    Variant::Nftables,
                    "not measured: kube-proxy's nftables table could not be loaded in time (see programming cost)".into(),
                ));
            }
        }

        // Latency, every row interleaved.
        if scope == Scope::Full {
            phase(rep, w, "new-connection latency (interleaved)", |rep| {
                latency_phase(ctx, w, &topo, nb.as_mut(), &tables, &skip, rep)
            })?;
        }

        // Endpoint changes (toggling between the two states), through the
        // agent's watch path: slice event → Service dirty → its frontends
        // rebuilt → partial reconcile.
        if let Some(nb) = nb.as_mut() {
            phase(rep, w, "netboot endpoint change", |rep| {
                let (mut path, initial) = nb.agent_path(w.services(), w.slices(false))?;
                let mut writes: Vec<u64> = Vec::new();
                let mut in_maps: Vec<f64> = Vec::new();
                let samples = repeat(r.netboot_change, |i| {
                    let slice = w.changed_slice(i % 2 == 0);
                    let p = nb.slice_event(&mut path, slice)?;
                    writes.push(p.result?.writes());
                    in_maps.push(p.in_maps.as_secs_f64() * 1000.0);
                    Ok(p.took)
                })?;
                rep.add(
                    n,
                    b,
                    nb_name,
                    m::CHANGE_MAP_WRITES,
                    "ms",
                    Some(summarize(&in_maps)),
                    "",
                );
                if samples.len() % 2 == 1 {
                    nb.slice_event(&mut path, w.changed_slice(false))?.result?;
                }
                let (lo, hi) = (
                    writes.iter().min().copied().unwrap_or(0),
                    writes.iter().max().copied().unwrap_or(0),
                );
                let mut note = format!(
                    "timed: one EndpointSlice event through the agent's path (Service marked dirty, its frontends rebuilt, partial reconcile of that Service only; {} frontends programmed); {lo}-{hi} map writes per change",
                    nb.programmed()
                );
                if initial.writes() > 0 {
                    note.push_str(&format!(
                        "; the agent's first full pass wrote {} (expected 0)",
                        initial.writes()
                    ));
                }
                rep.add(
                    n,
                    b,
                    nb_name,
                    m::CHANGE,
                    "ms",
                    Some(summarize(&samples)),
                    note,
                );
                Ok(())
            })?;
        }
        match &files.ipt {
            Some(ipt) if ipt_loaded => {
                ipt_changes(ctx, w, ipt, ipt_ns, rep)?;
            }
            _ => {
                for metric in [m::CHANGE, m::CHANGE_PARTIAL] {
                    rep.add(
                        n,
                        b,
                        ipt_name,
                        metric,
                        "ms",
                        None,
                        "not measured: no ruleset",
                    );
                }
            }
        }
        match &files.nft {
            Some(nft) if nft_loaded => {
                phase(
                    rep,
                    w,
                    "nftables endpoint change (incremental transaction)",
                    |rep| {
                        let samples = repeat(r.nft_change, |i| {
                            let f = if i % 2 == 0 { &nft.to_b } else { &nft.to_a };
                            nft_apply(nft_ns, f)
                        })?;
                        rep.add(
                            n,
                            b,
                            nft_name,
                            m::CHANGE,
                            "ms",
                            Some(summarize(&samples)),
                            "",
                        );
                        let list = repeat(r.nft_list, |_| nft_list_chains(nft_ns))?;
                        rep.add(
                            n,
                            b,
                            nft_name,
                            m::LIST_CHAINS,
                            "ms",
                            Some(summarize(&list)),
                            "",
                        );
                        Ok(())
                    },
                )?;
            }
            _ => rep.add(
                n,
                b,
                nft_name,
                m::CHANGE,
                "ms",
                None,
                "not measured: no table",
            ),
        }
        log(w, "tearing down");
        drop(nb);
        drop(topo);
    }
    drop(files);
    drop(tables);

    // The real agent binary, alone on the machine's BPF.
    if let Some(bin) = ctx.agent_bin {
        phase(rep, w, "agent cold start and RSS (real binary)", |rep| {
            let rules_ns = Netns::new(&format!("{tag}-agent"))?;
            let res = agent_run::run(bin, w, ctx.run_tag, &rules_ns, ctx.s.agent_timeout)?;
            let one = |x: f64| Some(summarize(&[x]));
            let note = match &res.error {
                Some(e) => format!("not ready: {e}"),
                None => format!(
                    "{} frontends, {} backends programmed",
                    res.services, res.backends
                ),
            };
            rep.add(
                n,
                b,
                AGENT,
                m::AGENT_READY,
                "ms",
                res.ready_ms.and_then(one),
                "",
            );
            rep.add(
                n,
                b,
                AGENT,
                m::AGENT_RECONCILE,
                "ms",
                res.reconcile_ms.and_then(one),
                "",
            );
            rep.add(n, b, AGENT, m::AGENT_PARSE, "ms", one(res.parse_ms), "");
            rep.add(n, b, AGENT, m::AGENT_RSS, "MiB", one(res.rss_mib), note);
            rep.add(n, b, AGENT, m::AGENT_HWM, "MiB", one(res.hwm_mib), "");
            Ok(())
        })?;
    }
    Ok(())
}

/// iptables' endpoint changes on the loaded ruleset: a full restore
/// (kube-proxy's full sync) and kube-proxy ≥ 1.28's partial restore.
fn ipt_changes(
    ctx: &Ctx,
    w: &Workload,
    ipt: &IptFiles,
    ns: &Netns,
    rep: &mut Report,
) -> Result<()> {
    let (n, b) = (w.n, w.b);
    let (r, limit, backend) = (ctx.s.repeats, ctx.s.sync_limit, ctx.s.iptables);
    let name = Variant::Iptables.name();
    let over = |what: &str| {
        format!(
            "one {what} did not finish within {} s: killed (nothing committed)",
            limit.as_secs()
        )
    };
    phase(
        rep,
        w,
        "iptables endpoint change (full iptables-restore)",
        |rep| {
            let samples = repeat_until(r.iptables_change, |i| {
                let f = if i % 2 == 0 { &ipt.b } else { &ipt.a };
                match iptables_restore_limit(ns, backend, f, false, limit)? {
                    Timed::Done(d) => Ok(Some(d)),
                    Timed::Killed(_) => bail!("{}", over("iptables-restore")),
                }
            })?;
            if samples.len() % 2 == 1 {
                iptables_restore(ns, backend, &ipt.a, false)?;
            }
            rep.add(n, b, name, m::CHANGE, "ms", Some(summarize(&samples)), "");
            Ok(())
        },
    )?;
    if let Some(why) = ctx.timed_out.skip(Load::IptablesPartial, w, limit) {
        rep.add(n, b, name, m::CHANGE_PARTIAL, "ms", None, why);
        return Ok(());
    }
    phase(
        rep,
        w,
        "iptables endpoint change (partial restore, kube-proxy >= 1.28)",
        |rep| {
            let mut killed = false;
            let samples = repeat_until(r.iptables_partial, |i| {
                let f = if i % 2 == 0 {
                    &ipt.partial_b
                } else {
                    &ipt.partial_a
                };
                match iptables_restore_limit(ns, backend, f, true, limit)? {
                    Timed::Done(d) => Ok(Some(d)),
                    Timed::Killed(_) => {
                        killed = true;
                        Ok(None)
                    }
                }
            })?;
            if samples.len() % 2 == 1 {
                iptables_restore(ns, backend, &ipt.partial_a, true)?;
            }
            let note = if killed {
                ctx.timed_out.record(Load::IptablesPartial, w);
                over("partial iptables-restore")
            } else {
                String::new()
            };
            let stats = (!samples.is_empty()).then(|| summarize(&samples));
            rep.add(n, b, name, m::CHANGE_PARTIAL, "ms", stats, note);
            Ok(())
        },
    )?;
    Ok(())
}

/// netboot's maps during the latency phase: the IPv4 table plus the IPv6
/// frontends of the dual-stack Services (issue 13; the lb6 maps have the
/// lb4 maps' sizes); put back to the IPv4 table afterwards.
fn program_dual_stack(w: &Workload, nb: &mut NetbootLb, tables: &Tables) -> Result<(), String> {
    let needed = tables.a.frontends.len() + w.n as usize;
    let (services, slices) = w.dual_stack();
    let dual = desired::build(&services, &slices, 10800);
    if dual.frontends.len() != needed {
        return Err(format!(
            "not measured: the dual-stack table has {} frontends, expected {needed}",
            dual.frontends.len()
        ));
    }
    let pass = nb.reconcile(&dual);
    if let Err(e) = pass.result {
        return Err(format!(
            "not measured: programming the IPv6 frontends failed: {e}"
        ));
    }
    if nb.programmed() != needed {
        return Err(format!(
            "not measured: {} frontends programmed, expected {needed}",
            nb.programmed()
        ));
    }
    Ok(())
}

/// The target of a row: the floor connects straight to the first listener,
/// the others to the last-declared Service; over IPv6 or IPv4-mapped.
fn target(w: &Workload, row: Row) -> SocketAddr {
    let v4 = match row.variant {
        Variant::Floor => SocketAddrV4::new(real_backend(1), BACKEND_PORT),
        _ => w.target(),
    };
    match row.family {
        Family::Ipv4 => SocketAddr::V4(v4),
        Family::Ipv4Mapped => mapped(v4),
        Family::Ipv6 => match row.variant {
            Variant::Floor => SocketAddr::new(real_backend6(1).into(), BACKEND_PORT),
            _ => w.target6(),
        },
    }
}

fn latency_phase(
    ctx: &Ctx,
    w: &Workload,
    topo: &Topology,
    mut nb: Option<&mut NetbootLb>,
    tables: &Tables,
    skip: &[(Variant, String)],
    rep: &mut Report,
) -> Result<()> {
    // IPv6 rows: the floor's need nothing; netboot's need its IPv6 frontends.
    let mut skip_rows: Vec<(Row, String)> = skip
        .iter()
        .map(|(v, why)| (Row::v4(*v), why.clone()))
        .collect();
    let mut dual = false;
    if ctx.s.ipv6 {
        if let Some(nb) = nb.as_deref_mut() {
            match program_dual_stack(w, nb, tables) {
                Ok(()) => dual = true,
                Err(why) => skip_rows.push((
                    Row {
                        variant: Variant::Netboot,
                        family: Family::Ipv6,
                    },
                    why,
                )),
            }
        }
    }
    // --variant-object: the other build, holding the same Services.
    let alt = match (&ctx.s.variant_object, nb.as_deref()) {
        (Some((path, object)), Some(base)) => {
            let sizes = map_sizes(tables.a.frontends.len(), w.b, w.endpoints());
            let mut alt = NetbootLb::install_object(
                ctx.run_tag,
                &format!("lbv-{}x{}", w.n, w.b),
                &sizes,
                Some(object),
            )
            .with_context(|| format!("--variant-object {}", path.display()))?;
            // The same history as netboot's maps (emptied and filled again
            // by the full-sync phase): an A/A run of this build against
            // itself without it showed a 3 µs p99 "difference" at 1M.
            for _ in 0..=base.clears {
                if alt.programmed() > 0 {
                    alt.clear()?;
                }
                alt.reconcile(&tables.a)
                    .result
                    .context("programming the variant build's maps")?;
            }
            Some(alt)
        }
        _ => None,
    };
    let res = measure_rows(ctx, w, topo, nb.as_deref(), alt.as_ref(), &skip_rows, rep);
    drop(alt);
    if dual {
        if let Some(nb) = nb {
            // Back to the IPv4 table the programming measurements use.
            nb.reconcile(&tables.a)
                .result
                .context("removing the IPv6 frontends again")?;
        }
    }
    res
}

/// The first connections of a batch, the head, whose share of the slow
/// ones the report gives (latency::positions).
const HEAD: usize = 3;

fn measure_rows(
    ctx: &Ctx,
    w: &Workload,
    topo: &Topology,
    nb: Option<&NetbootLb>,
    alt: Option<&NetbootLb>,
    skip: &[(Row, String)],
    rep: &mut Report,
) -> Result<()> {
    let (n, b) = (w.n, w.b);
    let mut lanes = Vec::new();
    for (row, why) in skip {
        rep.add(n, b, row.name(), m::CONNECT, "µs", None, why.clone());
    }
    let mut rows = Row::ALL.to_vec();
    if alt.is_some() {
        rows.insert(2, Row::v4(Variant::NetbootVariant));
    }
    for row in rows {
        if skip.iter().any(|(s, _)| *s == row) {
            continue;
        }
        if row.family != Family::Ipv4 && !ctx.s.ipv6 {
            continue;
        }
        let cgroup = match row.variant {
            Variant::NetbootVariant => match alt {
                Some(alt) => &alt.cgroup.path,
                None => continue,
            },
            Variant::Netboot => match nb {
                Some(nb) => &nb.cgroup.path,
                None => continue,
            },
            _ => &ctx.plain.path,
        };
        let mut client = Client::spawn(cgroup, topo.client(row.variant.base())?)?;
        if ctx.s.realtime_clients {
            client
                .realtime()
                .with_context(|| format!("--realtime-clients for {}", row.label()))?;
        }
        if let Some(cpu) = ctx.s.client_cpu {
            client
                .pin(cpu)
                .with_context(|| format!("--client-cpu for {}", row.label()))?;
        }
        lanes.push(Lane {
            row,
            client,
            target: target(w, row),
        });
    }
    let counter = || {
        [nb, alt]
            .into_iter()
            .flatten()
            .map(|x| x.counter("connect_translated"))
            .sum()
    };
    let accepted_before = topo.accepted();
    let plan = Plan {
        connections: ctx.s.connections,
        batch: ctx.s.batch,
        warmup: ctx.s.warmup,
        order: ctx.s.order,
    };
    let drain = ctx.s.drain_listeners;
    if drain {
        topo.quiet(true);
    }
    let between = || {
        if drain {
            topo.drain();
        }
    };
    let res = latency::measure(&mut lanes, plan, &counter, &between);
    topo.quiet(false);
    let res = res?;
    drop(lanes);
    let ok_total: u64 = res.values().map(|r| r.ok).sum();
    let accepted = topo.accepted() - accepted_before;
    log(
        w,
        &format!(
            "{ok_total} measured connections; listeners accepted {accepted} (warm-up included)"
        ),
    );
    for (row, r) in &res {
        let mut notes: Vec<String> = Vec::new();
        if let Some(e) = &r.error {
            notes.push(e.clone());
        }
        if r.failed > 0 {
            notes.push(format!(
                "{} failed ({})",
                r.failed,
                std::io::Error::from_raw_os_error(r.errno)
            ));
        }
        if row.variant.base() == Variant::Netboot {
            let hook = match row.family {
                Family::Ipv4 => "connect4",
                Family::Ipv6 => "connect6",
                Family::Ipv4Mapped => "connect6 (v4-mapped, lb4 maps)",
            };
            notes.push(format!("{hook} translated {}", r.translated));
            if r.translated < r.ok {
                notes.push("fewer translations than connections".into());
            }
        } else if r.translated > 0 {
            notes.push(format!(
                "netboot's counter moved by {} during these batches",
                r.translated
            ));
        }
        rep.add(
            n,
            b,
            row.name(),
            m::CONNECT,
            "µs",
            Some(r.micros),
            notes.join("; "),
        );
    }
    if res.values().all(|r| r.error.is_some()) {
        bail!("no variant could connect");
    }
    let resamples = if ctx.s.quick { 200 } else { 1000 };
    rep.comparisons
        .extend(family_comparisons(n, &res, resamples));
    rep.floor_comparisons
        .extend(floor_comparisons(n, &res, resamples));
    rep.positions
        .extend(
            res.iter()
                .filter(|(_, r)| r.ok > 0)
                .map(|(row, r)| crate::report::PositionRow {
                    services: n,
                    row: row.label(),
                    at: latency::positions(&r.rounds, HEAD),
                }),
        );
    Ok(())
}

/// Issue 18's P1 (compare.rs): netboot's IPv4 row over the floor's, p50 and
/// p99.
fn floor_comparisons(
    n: u32,
    res: &std::collections::BTreeMap<Row, latency::LaneResult>,
    resamples: u32,
) -> Vec<crate::compare::FloorComparison> {
    let rounds = |v: Variant| {
        res.get(&Row {
            variant: v,
            family: Family::Ipv4,
        })
        .filter(|r| r.error.is_none())
        .map(|r| r.rounds.as_slice())
    };
    let (Some(nb), Some(fl)) = (rounds(Variant::Netboot), rounds(Variant::Floor)) else {
        return Vec::new();
    };
    [50.0, 99.0]
        .into_iter()
        .filter_map(|q| crate::compare::over_floor(n, nb, fl, q, resamples))
        .collect()
}

/// The `family` of `--variant-object`'s comparison (report.rs prints it in
/// a table of its own).
pub const VARIANT_OBJECT: &str = "variant object";

/// Issue 13's comparisons (compare.rs) of the rows just measured: IPv6 and
/// IPv4-mapped against IPv4, p50 and p99; `--variant-object`'s.
fn family_comparisons(
    n: u32,
    res: &std::collections::BTreeMap<Row, latency::LaneResult>,
    resamples: u32,
) -> Vec<crate::compare::FamilyComparison> {
    let rounds = |v: Variant, f: Family| {
        res.get(&Row {
            variant: v,
            family: f,
        })
        .filter(|r| r.error.is_none())
        .map(|r| r.rounds.as_slice())
    };
    let mut out = Vec::new();
    let (Some(nb4), Some(fl4)) = (
        rounds(Variant::Netboot, Family::Ipv4),
        rounds(Variant::Floor, Family::Ipv4),
    ) else {
        return out;
    };
    // --variant-object: the same statistic with the variant build's row as
    // the "other" one and the floor for both: what the variant changes.
    for (v, name) in [(Variant::NetbootVariant, VARIANT_OBJECT)] {
        let Some(nbx) = rounds(v, Family::Ipv4) else {
            continue;
        };
        let quad = crate::compare::Quad {
            nb4,
            fl4,
            nbx,
            flx: fl4,
        };
        for q in [50.0, 99.0] {
            out.extend(crate::compare::compare(n, name, &quad, q, resamples));
        }
    }
    for (fam, name) in [(Family::Ipv6, "ipv6"), (Family::Ipv4Mapped, "ipv4-mapped")] {
        let (Some(nbx), Some(flx)) = (rounds(Variant::Netboot, fam), rounds(Variant::Floor, fam))
        else {
            continue;
        };
        let quad = crate::compare::Quad { nb4, fl4, nbx, flx };
        for q in [50.0, 99.0] {
            out.extend(crate::compare::compare(n, name, &quad, q, resamples));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_respects_min_max_and_budget() {
        let r = Repeat {
            min: 3,
            max: 10,
            budget: Duration::from_secs(10),
        };
        assert!(another(r, 0, Duration::from_secs(100)));
        assert!(another(r, 2, Duration::from_secs(15)));
        assert!(
            !another(r, 2, Duration::from_secs(25)),
            "slow: stop before min"
        );
        assert!(another(r, 5, Duration::from_secs(5)));
        assert!(!another(r, 5, Duration::from_secs(11)));
        assert!(!another(r, 10, Duration::ZERO));
        let mut calls = 0;
        let v = repeat_until(r, |_| {
            calls += 1;
            Ok((calls < 2).then_some(Duration::from_millis(1)))
        })
        .expect("repeat");
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn a_load_that_timed_out_is_not_tried_at_larger_sizes() {
        let t = TimedOut::default();
        let limit = Duration::from_secs(200);
        let at = |n, b| Workload::new(n, b).expect("size");
        assert!(t.skip(Load::Nftables, &at(100_000, 2), limit).is_none());
        t.record(Load::Nftables, &at(100_000, 2));
        let why = t
            .skip(Load::Nftables, &at(1_000_000, 2), limit)
            .expect("skipped at 1M");
        assert!(why.contains("within 200 s at 100000 services x 2"), "{why}");
        assert!(t.skip(Load::Nftables, &at(100_000, 2), limit).is_some());
        assert!(t.skip(Load::Nftables, &at(10_000, 10), limit).is_none());
        assert!(t.skip(Load::Nftables, &at(100_000, 1), limit).is_none());
        assert!(t
            .skip(Load::IptablesFull, &at(1_000_000, 2), limit)
            .is_none());
    }
}
