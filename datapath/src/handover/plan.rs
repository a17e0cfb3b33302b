//! Which iptables chains and rules are kube-proxy's, decided from
//! `iptables-save` text alone (a pure function, [`plan_from_save`]).
//!
//! Ownership follows kube-proxy v1.36's iptables proxier
//! (pkg/proxy/iptables/proxier.go and cleanup.go):
//!
//! - chains: filter `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`,
//!   `KUBE-FORWARD`, `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL`,
//!   `KUBE-PROXY-CANARY`; nat `KUBE-SERVICES`, `KUBE-NODEPORTS`,
//!   `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, `KUBE-PROXY-CANARY` and the
//!   per-Service chains `KUBE-SVC-*`, `KUBE-SVL-*`, `KUBE-EXT-*`,
//!   `KUBE-FW-*`, `KUBE-SEP-*`; mangle `KUBE-PROXY-CANARY`.
//! - IPVS mode's (pkg/proxy/ipvs/proxier.go, `iptablesChains`), besides the
//!   shared ones above: filter `KUBE-NODE-PORT`, `KUBE-SOURCE-RANGES-FIREWALL`,
//!   `KUBE-IPVS-FILTER`, `KUBE-IPVS-OUT-FILTER`; nat `KUBE-NODE-PORT`,
//!   `KUBE-LOAD-BALANCER` ([`IPVS_CHAINS`]). Their rules match kube-proxy's
//!   ipsets (`-m set --match-set KUBE-…`), which go after the rules
//!   ([`super::ipset`]).
//! - rules outside those chains: only kube-proxy's jump rules from the
//!   built-in chains ([`KUBE_PROXY_JUMPS`], [`IPVS_JUMPS`]), recognised by
//!   table, source chain, target and their comment.
//!
//! Not kube-proxy's, never touched: kubelet's `KUBE-FIREWALL` (kube-proxy
//! writes an identical copy of its localnet drop rule but never deletes it:
//! it guards `route_localnet`), `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`,
//! `KUBE-MARK-DROP` (kubelet before 1.28), kube-router's and k3s's
//! `KUBE-ROUTER-*`, `KUBE-NWPLCY-*`, `KUBE-POD-FW-*`, … and every rule that
//! jumps to them.
//!
//! A kube-proxy chain that some other rule still jumps to (not one of
//! kube-proxy's own jumps) cannot be deleted without breaking that rule: it is
//! kept, with every kube-proxy chain it leads to, and reported as `retained`
//! (the rules count as present, so the handover gate stays shut until a
//! person looks).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// Tables kube-proxy writes to.
pub const TABLES: [&str; 3] = ["nat", "filter", "mangle"];

/// kube-proxy's fixed chains, per table.
pub const KUBE_PROXY_CHAINS: [(&str, &[&str]); 3] = [
    (
        "filter",
        &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "nat",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

/// IPVS mode's own chains, per table (the others it shares with the
/// iptables mode: nat `KUBE-SERVICES`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`,
/// filter `KUBE-FORWARD`, `KUBE-PROXY-FIREWALL`).
pub const IPVS_CHAINS: [(&str, &[&str]); 2] = [
    (
        "filter",
        &[
            "KUBE-NODE-PORT",
            "KUBE-SOURCE-RANGES-FIREWALL",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
        ],
    ),
    ("nat", &["KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"]),
];

/// Prefixes of kube-proxy's per-Service chains (nat table only).
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// One of kube-proxy's jump rules from a built-in chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jump {
    /// Table.
    pub table: &'static str,
    /// Built-in chain the rule is in.
    pub from: &'static str,
    /// kube-proxy chain it jumps to.
    pub to: &'static str,
    /// Its `-m comment --comment` text.
    pub comment: &'static str,
}

const fn jump(
    table: &'static str,
    from: &'static str,
    to: &'static str,
    comment: &'static str,
) -> Jump {
    Jump {
        table,
        from,
        to,
        comment,
    }
}

/// kube-proxy v1.36's `iptablesJumpChains`, plus the one jump older
/// kube-proxies (1.13–1.19) wrote and later ones clean up
/// (`iptablesCleanupOnlyChains`). Its `iptablesKubeletJumpChains`
/// (INPUT/OUTPUT → KUBE-FIREWALL, no comment) are kubelet's and stay.
pub const KUBE_PROXY_JUMPS: [Jump; 13] = [
    jump(
        "filter",
        "INPUT",
        "KUBE-EXTERNAL-SERVICES",
        "kubernetes externally-visible service portals",
    ),
    jump(
        "filter",
        "FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        "kubernetes externally-visible service portals",
    ),
    jump(
        "filter",
        "INPUT",
        "KUBE-NODEPORTS",
        "kubernetes health check service ports",
    ),
    jump(
        "filter",
        "FORWARD",
        "KUBE-SERVICES",
        "kubernetes service portals",
    ),
    jump(
        "filter",
        "OUTPUT",
        "KUBE-SERVICES",
        "kubernetes service portals",
    ),
    jump(
        "filter",
        "FORWARD",
        "KUBE-FORWARD",
        "kubernetes forwarding rules",
    ),
    jump(
        "filter",
        "INPUT",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
    ),
    jump(
        "filter",
        "OUTPUT",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
    ),
    jump(
        "filter",
        "FORWARD",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
    ),
    jump(
        "nat",
        "OUTPUT",
        "KUBE-SERVICES",
        "kubernetes service portals",
    ),
    jump(
        "nat",
        "PREROUTING",
        "KUBE-SERVICES",
        "kubernetes service portals",
    ),
    jump(
        "nat",
        "POSTROUTING",
        "KUBE-POSTROUTING",
        "kubernetes postrouting rules",
    ),
    // kube-proxy 1.13-1.19 (removed by kubernetes#95252).
    jump(
        "filter",
        "INPUT",
        "KUBE-SERVICES",
        "kubernetes service portals",
    ),
];

/// IPVS mode's `iptablesJumpChain` entries that the iptables mode does not
/// write (the nat ones and filter FORWARD → KUBE-FORWARD are the same).
pub const IPVS_JUMPS: [Jump; 5] = [
    jump(
        "filter",
        "INPUT",
        "KUBE-NODE-PORT",
        "kubernetes health check rules",
    ),
    jump(
        "filter",
        "INPUT",
        "KUBE-PROXY-FIREWALL",
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "FORWARD",
        "KUBE-PROXY-FIREWALL",
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "INPUT",
        "KUBE-IPVS-FILTER",
        "kubernetes ipvs access filter",
    ),
    jump(
        "filter",
        "OUTPUT",
        "KUBE-IPVS-OUT-FILTER",
        "kubernetes ipvs access filter",
    ),
];

/// The comment on kube-proxy's last KUBE-SERVICES rule (→ KUBE-NODEPORTS).
const NODEPORTS_COMMENT: &str =
    "kubernetes service nodeports; NOTE: this must be the last rule in this chain";

/// Whether `chain` in `table` is one kube-proxy creates.
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    let fixed = KUBE_PROXY_CHAINS
        .iter()
        .chain(IPVS_CHAINS.iter())
        .any(|(t, chains)| *t == table && chains.contains(&chain));
    fixed || (table == "nat" && SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)))
}

/// Why `iptables-save` output could not be used. Never read as "absent".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaveError {
    /// iptables-nft found nft objects it cannot show as iptables rules.
    #[error("line {line}: table is incompatible with this iptables ({text})")]
    Incompatible {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A line that is not iptables-save syntax.
    #[error("line {line}: unparseable: {text}")]
    Unparseable {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A table without its COMMIT line (truncated output).
    #[error("table {table}: no COMMIT (truncated output)")]
    Truncated {
        /// The table.
        table: String,
    },
}

/// A rule as `iptables-save` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Chain the rule is in.
    pub chain: String,
    /// The whole `-A …` line.
    pub line: String,
    /// `-j`/`-g` target.
    pub target: Option<String>,
    /// `--comment` text, unquoted.
    pub comment: Option<String>,
}

/// One table of `iptables-save` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Table name.
    pub name: String,
    /// Declared chains, in order.
    pub chains: Vec<String>,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// Splits an iptables-save rule line into words; `"…"` is one word (with
/// `\"` and `\\` unescaped). None if a quote is not closed.
pub fn split_words(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        o => cur.push(o),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Some(out)
}

fn parse_rule(line: &str) -> Option<Rule> {
    let words = split_words(line)?;
    let mut it = words.iter();
    if it.next().map(String::as_str) != Some("-A") {
        return None;
    }
    let chain = it.next()?.clone();
    let mut target = None;
    let mut comment = None;
    for w in words.windows(2) {
        match w[0].as_str() {
            "-j" | "--jump" | "-g" | "--goto" => target = Some(w[1].clone()),
            "--comment" => comment = Some(w[1].clone()),
            _ => {}
        }
    }
    Some(Rule {
        chain,
        line: line.to_string(),
        target,
        comment,
    })
}

/// Parses `iptables-save` output. Strict: a table iptables-nft calls
/// incompatible, a line of unknown syntax or a table cut short is an error.
pub fn parse_save(save: &str) -> Result<Vec<SavedTable>, SaveError> {
    let mut out = Vec::new();
    let mut cur: Option<SavedTable> = None;
    for (i, raw) in save.lines().enumerate() {
        let line = raw.trim_end();
        let n = i + 1;
        let unparseable = || SaveError::Unparseable {
            line: n,
            text: line.to_string(),
        };
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if line.contains("incompatible") {
                return Err(SaveError::Incompatible {
                    line: n,
                    text: line.to_string(),
                });
            }
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            if let Some(open) = cur.take() {
                return Err(SaveError::Truncated { table: open.name });
            }
            cur = Some(SavedTable {
                name: t.trim().to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(table) = cur.as_mut() else {
            return Err(unparseable());
        };
        if line == "COMMIT" {
            if let Some(done) = cur.take() {
                out.push(done);
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().ok_or_else(unparseable)?;
            table.chains.push(name.to_string());
            continue;
        }
        if line.starts_with("-A ") {
            let rule = parse_rule(line).ok_or_else(unparseable)?;
            table.rules.push(rule);
            continue;
        }
        return Err(unparseable());
    }
    match cur {
        Some(open) => Err(SaveError::Truncated { table: open.name }),
        None => Ok(out),
    }
}

/// kube-proxy's state in one iptables table, and what removes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TablePlan {
    /// `iptables-legacy-save` etc.
    pub backend: String,
    /// Table name.
    pub table: String,
    /// kube-proxy chains to flush and delete.
    pub chains: Vec<String>,
    /// kube-proxy's jump rules in built-in chains, as `-A …` lines.
    pub jumps: Vec<String>,
    /// kube-proxy chains kept because another component's rule jumps to
    /// them: `CHAIN (referenced by: -A …)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<String>,
    /// nat only: kube-proxy serves NodePorts on 127.0.0.0/8 (its
    /// `localhostNodePorts`), which is when it sets `route_localnet=1`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub localhost_node_ports: bool,
}

impl TablePlan {
    /// Anything of kube-proxy's here.
    pub fn present(&self) -> bool {
        !self.chains.is_empty() || !self.jumps.is_empty() || !self.retained.is_empty()
    }

    /// The `iptables-restore --noflush` input that removes exactly this:
    /// the jumps, then every chain flushed, then deleted.
    pub fn restore_input(&self) -> String {
        let mut s = format!("*{}\n", self.table);
        for j in &self.jumps {
            if let Some(rest) = j.strip_prefix("-A ") {
                s.push_str("-D ");
                s.push_str(rest);
                s.push('\n');
            }
        }
        for c in &self.chains {
            s.push_str(&format!("-F {c}\n"));
        }
        for c in &self.chains {
            s.push_str(&format!("-X {c}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }
}

fn is_kube_proxy_jump(table: &str, rule: &Rule) -> bool {
    KUBE_PROXY_JUMPS.iter().chain(IPVS_JUMPS.iter()).any(|j| {
        j.table == table
            && j.from == rule.chain
            && rule.target.as_deref() == Some(j.to)
            && rule.comment.as_deref() == Some(j.comment)
    })
}

/// Whether kube-proxy's nodeports rule admits 127.0.0.0/8 destinations.
fn admits_localhost(rule: &Rule) -> bool {
    if rule.chain != "KUBE-SERVICES"
        || rule.target.as_deref() != Some("KUBE-NODEPORTS")
        || rule.comment.as_deref() != Some(NODEPORTS_COMMENT)
    {
        return false;
    }
    let words = split_words(&rule.line).unwrap_or_default();
    let mut negated = false;
    let mut dst = None;
    for (i, w) in words.iter().enumerate() {
        if w == "-d" || w == "--destination" {
            negated = i > 0 && words[i - 1] == "!";
            dst = words.get(i + 1).cloned();
        }
    }
    match dst {
        // `-m addrtype --dst-type LOCAL` alone: every local address, 127/8 included.
        None => true,
        Some(d) => !negated && d.starts_with("127."),
    }
}

/// Plans one parsed table (None when it is not one kube-proxy writes to).
pub fn plan_table(backend: &str, t: &SavedTable) -> Option<TablePlan> {
    if !TABLES.contains(&t.name.as_str()) {
        return None;
    }
    let owned: BTreeSet<&str> = t
        .chains
        .iter()
        .map(String::as_str)
        .filter(|c| is_kube_proxy_chain(&t.name, c))
        .collect();
    // Edges between kube-proxy chains, and references from elsewhere.
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut jumps = Vec::new();
    let mut foreign_refs: Vec<(&str, &str)> = Vec::new();
    for r in &t.rules {
        let Some(target) = r.target.as_deref() else {
            continue;
        };
        if !owned.contains(target) {
            continue;
        }
        if owned.contains(r.chain.as_str()) {
            edges.entry(r.chain.as_str()).or_default().insert(target);
        } else if is_kube_proxy_jump(&t.name, r) {
            jumps.push(r.line.clone());
        } else {
            foreign_refs.push((target, r.line.as_str()));
        }
    }
    // Kept: every kube-proxy chain reachable from a foreign reference.
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = foreign_refs.iter().map(|(c, _)| *c).collect();
    while let Some(c) = stack.pop() {
        if kept.insert(c) {
            stack.extend(edges.get(c).into_iter().flatten().copied());
        }
    }
    let retained = kept
        .iter()
        .map(|c| {
            let by: Vec<&str> = foreign_refs
                .iter()
                .filter(|(t, _)| t == c)
                .map(|(_, l)| *l)
                .collect();
            if by.is_empty() {
                format!("{c} (reached from a retained chain)")
            } else {
                format!("{c} (referenced by: {})", by.join("; "))
            }
        })
        .collect();
    let chains = t
        .chains
        .iter()
        .filter(|c| owned.contains(c.as_str()) && !kept.contains(c.as_str()))
        .cloned()
        .collect();
    let localhost_node_ports = t.name == "nat" && t.rules.iter().any(admits_localhost);
    Some(TablePlan {
        backend: backend.to_string(),
        table: t.name.clone(),
        chains,
        jumps,
        retained,
        localhost_node_ports,
    })
}

/// The rules of `tables` that stay after `plans` (one backend's) and match
/// an ipset, as (`BACKEND TABLE:`, `-A …` line): what keeps a set alive.
pub fn staying_set_rules(
    backend: &str,
    tables: &[SavedTable],
    plans: &[TablePlan],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in tables {
        let plan = plans.iter().find(|p| p.table == t.name);
        for r in &t.rules {
            let removed =
                plan.is_some_and(|p| p.chains.contains(&r.chain) || p.jumps.contains(&r.line));
            if !removed && r.line.contains("--match-set") {
                out.push((format!("{backend} {}:", t.name), r.line.clone()));
            }
        }
    }
    out
}

/// What removes kube-proxy's rules from one backend's `iptables-save`
/// output: a plan per table that holds any (tables without are left out).
pub fn plan_from_save(backend: &str, save: &str) -> Result<Vec<TablePlan>, SaveError> {
    Ok(parse_save(save)?
        .iter()
        .filter_map(|t| plan_table(backend, t))
        .filter(TablePlan::present)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-nft-save` of a node with kube-proxy v1.36 (iptables mode,
    /// localhost NodePorts), kubelet and kube-router's network policy
    /// (k3s embeds the same), written by the real tools: see
    /// tests/fixtures/README.md.
    const NODE_V4: &str = include_str!("../../tests/fixtures/node-v4.save");
    /// The same node without kube-proxy.
    const NODE_V4_WITHOUT: &str =
        include_str!("../../tests/fixtures/node-v4-without-kube-proxy.save");
    const NODE_V6: &str = include_str!("../../tests/fixtures/node-v6.save");
    const NODE_V6_WITHOUT: &str =
        include_str!("../../tests/fixtures/node-v6-without-kube-proxy.save");

    fn rule_lines(save: &str) -> Vec<String> {
        save.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.strip_prefix(':') {
                // Counters differ from dump to dump.
                Some(_) => l.split(" [").next().unwrap_or(l).to_string(),
                None => l.to_string(),
            })
            .collect()
    }

    /// Applies plans to the text the way iptables-restore would.
    fn apply(save: &str, plans: &[TablePlan]) -> Vec<String> {
        let mut table = String::new();
        rule_lines(save)
            .into_iter()
            .filter(|l| {
                if let Some(t) = l.strip_prefix('*') {
                    table = t.to_string();
                    return true;
                }
                let Some(p) = plans.iter().find(|p| p.table == table) else {
                    return true;
                };
                if let Some(decl) = l.strip_prefix(':') {
                    let name = decl.split_whitespace().next().unwrap_or("");
                    return !p.chains.iter().any(|c| c == name);
                }
                if let Some(rule) = parse_rule(l) {
                    return !p.chains.contains(&rule.chain) && !p.jumps.contains(l);
                }
                true
            })
            .collect()
    }

    #[test]
    fn plan_leaves_exactly_the_node_without_kube_proxy() {
        for (with, without) in [(NODE_V4, NODE_V4_WITHOUT), (NODE_V6, NODE_V6_WITHOUT)] {
            let plans = plan_from_save("iptables-nft-save", with).expect("plan");
            assert!(plans.iter().all(|p| p.retained.is_empty()), "{plans:#?}");
            assert_eq!(apply(with, &plans), rule_lines(without));
            // Nothing of kube-proxy's is left for a second pass.
            let again = plan_from_save("iptables-nft-save", without).expect("plan");
            assert_eq!(again, vec![], "{again:#?}");
        }
    }

    /// An IPVS-mode node (kube-proxy v1.36 `mode: ipvs`, kubelet,
    /// kube-router with a rule matching its own ipset), generated like the
    /// others: see tests/fixtures/README.md.
    const NODE_IPVS_V4: &str = include_str!("../../tests/fixtures/node-ipvs-v4.save");
    const NODE_IPVS_V4_WITHOUT: &str =
        include_str!("../../tests/fixtures/node-ipvs-v4-without-kube-proxy.save");

    #[test]
    fn ipvs_mode_plan_leaves_exactly_the_node_without_kube_proxy() {
        let plans = plan_from_save("iptables-nft-save", NODE_IPVS_V4).expect("plan");
        assert!(plans.iter().all(|p| p.retained.is_empty()), "{plans:#?}");
        assert_eq!(
            apply(NODE_IPVS_V4, &plans),
            rule_lines(NODE_IPVS_V4_WITHOUT)
        );
        let again = plan_from_save("iptables-nft-save", NODE_IPVS_V4_WITHOUT).expect("plan");
        assert_eq!(again, vec![], "{again:#?}");
        // Every IPVS chain and jump is in the fixture and found.
        for (table, chains) in IPVS_CHAINS {
            for c in chains {
                assert!(
                    plans
                        .iter()
                        .any(|p| p.table == table && p.chains.iter().any(|x| x == c)),
                    "{table} {c}"
                );
            }
        }
        let jumps: Vec<&String> = plans.iter().flat_map(|p| &p.jumps).collect();
        assert_eq!(jumps.len(), IPVS_JUMPS.len() + 4, "{jumps:#?}");
    }

    #[test]
    fn only_rules_staying_after_the_plan_keep_a_set() {
        let tables = parse_save(NODE_IPVS_V4).expect("parse");
        let plans = plan_from_save("iptables-nft-save", NODE_IPVS_V4).expect("plan");
        let staying = staying_set_rules("iptables-nft-save", &tables, &plans);
        assert_eq!(
            staying,
            [(
                "iptables-nft-save filter:".to_string(),
                "-A KUBE-NWPLCY-IPVSNODE -m set --match-set KUBE-DST-VBH27M7NWLDOZIE4 dst -j ACCEPT"
                    .to_string()
            )]
        );
        // Without a plan every matching rule stays.
        assert!(staying_set_rules("iptables-nft-save", &tables, &[]).len() > 10);
    }

    #[test]
    fn ipvs_mode_plan_snapshot() {
        let plans = plan_from_save("iptables-nft-save", NODE_IPVS_V4).expect("plan");
        let text: String = plans
            .iter()
            .map(|p| format!("# {} {}\n{}", p.backend, p.table, p.restore_input()))
            .collect();
        insta::assert_snapshot!(text);
    }

    #[test]
    fn plan_for_a_full_node_snapshot() {
        let plans = plan_from_save("iptables-nft-save", NODE_V4).expect("plan");
        let text: String = plans
            .iter()
            .map(|p| {
                format!(
                    "# {} {} localhost_node_ports={}\n{}",
                    p.backend,
                    p.table,
                    p.localhost_node_ports,
                    p.restore_input()
                )
            })
            .collect();
        insta::assert_snapshot!(text);
    }

    /// Regression: every `KUBE-*` chain was deleted, kubelet's KUBE-FIREWALL
    /// (the route_localnet guard) and kube-router's policy chains with them.
    #[test]
    fn foreign_kube_named_chains_are_not_kube_proxys() {
        for (table, chain) in [
            ("filter", "KUBE-FIREWALL"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
            ("nat", "KUBE-MARK-DROP"),
            ("filter", "KUBE-ROUTER-INPUT"),
            ("filter", "KUBE-ROUTER-FORWARD"),
            ("filter", "KUBE-ROUTER-OUTPUT"),
            ("filter", "KUBE-NWPLCY-DEFAULT"),
            ("filter", "KUBE-NWPLCY-C5AZDUAD3FIJEMXT"),
            ("filter", "KUBE-POD-FW-ZQHKHXKIVR3YQS5E"),
            // (nat KUBE-NODE-PORT, once listed here, is IPVS mode's.)
            ("filter", "KUBE-SVC-ABC"), // per-Service chains live in nat only
            ("mangle", "KUBE-SERVICES"),
        ] {
            assert!(!is_kube_proxy_chain(table, chain), "{table} {chain}");
        }
        let plans = plan_from_save("iptables-legacy-save", NODE_V4).expect("plan");
        for p in &plans {
            for c in &p.chains {
                assert!(
                    !["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"]
                        .contains(&c.as_str())
                        && !c.starts_with("KUBE-ROUTER-")
                        && !c.starts_with("KUBE-NWPLCY-")
                        && !c.starts_with("KUBE-POD-FW-"),
                    "{c}"
                );
            }
            for j in &p.jumps {
                assert!(
                    !j.contains("KUBE-FIREWALL") && !j.contains("KUBE-ROUTER"),
                    "{j}"
                );
            }
        }
    }

    #[test]
    fn every_kube_proxy_chain_kind_is_found() {
        let plans = plan_from_save("iptables-nft-save", NODE_V4).expect("plan");
        let all: BTreeSet<(String, String)> = plans
            .iter()
            .flat_map(|p| p.chains.iter().map(|c| (p.table.clone(), c.clone())))
            .collect();
        for (table, chains) in KUBE_PROXY_CHAINS {
            for c in chains {
                assert!(
                    all.contains(&(table.to_string(), c.to_string())),
                    "{table} {c}"
                );
            }
        }
        for prefix in SERVICE_CHAIN_PREFIXES {
            assert!(
                all.iter().any(|(t, c)| t == "nat" && c.starts_with(prefix)),
                "no {prefix} chain in the fixture"
            );
        }
        // Every jump of v1.36 except the pre-1.20 one is in the fixture.
        let jumps: Vec<&String> = plans.iter().flat_map(|p| &p.jumps).collect();
        assert_eq!(jumps.len(), KUBE_PROXY_JUMPS.len() - 1, "{jumps:#?}");
    }

    #[test]
    fn a_foreign_jump_to_a_kube_proxy_chain_keeps_it() {
        let save = "*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
:KUBE-MARK-MASQ - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8080 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"default/kubernetes:https cluster IP\" -m tcp --dport 443 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SEP-BBBBBBBBBBBBBBBB -s 172.18.0.2/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination 172.18.0.2:6443
COMMIT
";
        let p = plan_from_save("iptables-legacy-save", save).expect("plan");
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].chains,
            [
                "KUBE-SERVICES",
                "KUBE-SVC-AAAAAAAAAAAAAAAA",
                "KUBE-SEP-BBBBBBBBBBBBBBBB"
            ]
        );
        assert_eq!(p[0].jumps.len(), 1);
        assert_eq!(
            p[0].retained,
            ["KUBE-MARK-MASQ (referenced by: -A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8080 -j KUBE-MARK-MASQ)"]
        );
        assert!(p[0].present());
    }

    #[test]
    fn a_rule_to_a_kube_proxy_chain_without_its_comment_is_not_its_jump() {
        let save = "*nat
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A OUTPUT -j KUBE-SERVICES
COMMIT
";
        let p = plan_from_save("iptables-legacy-save", save).expect("plan");
        assert_eq!(p[0].jumps, Vec::<String>::new());
        assert_eq!(p[0].chains, Vec::<String>::new());
        assert_eq!(p[0].retained.len(), 1);
    }

    #[test]
    fn localhost_node_ports_follow_the_nodeports_rule() {
        let rule = |extra: &str| {
            format!(
                "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n-A KUBE-SERVICES {extra}-m comment --comment \"{NODEPORTS_COMMENT}\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"
            )
        };
        let lnp = |s: &str| {
            plan_from_save("iptables-legacy-save", s).expect("plan")[0].localhost_node_ports
        };
        assert!(lnp(&rule("")));
        assert!(!lnp(&rule("! -d 127.0.0.0/8 ")));
        assert!(!lnp(&rule("! -d ::1/128 ")));
        assert!(lnp(&rule("-d 127.0.0.1/32 ")));
        assert!(!lnp(&rule("-d 172.18.1.1/32 ")));
    }

    #[test]
    fn incompatible_or_unparseable_output_is_an_error_never_absent() {
        let incompatible = "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert!(matches!(
            plan_from_save("iptables-nft-save", incompatible),
            Err(SaveError::Incompatible { line: 1, .. })
        ));
        let old_style = "# Table `nat' is incompatible, use 'nft' tool.\n";
        assert!(matches!(
            plan_from_save("iptables-nft-save", old_style),
            Err(SaveError::Incompatible { .. })
        ));
        let truncated = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-SERVICES\n";
        assert_eq!(
            plan_from_save("iptables-nft-save", truncated),
            Err(SaveError::Truncated {
                table: "filter".into()
            })
        );
        for bad in [
            "*filter\nwhat is this\nCOMMIT\n",
            "-A INPUT -j ACCEPT\n",
            "*filter\n-A INPUT -m comment --comment \"open -j KUBE-SERVICES\nCOMMIT\n",
        ] {
            assert!(
                matches!(
                    plan_from_save("iptables-nft-save", bad),
                    Err(SaveError::Unparseable { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(plan_from_save("iptables-nft-save", ""), Ok(vec![]));
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            split_words(r#"-A X -m comment --comment "a \"b\" c" -j Y"#).expect("words"),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "Y"
            ]
        );
        assert_eq!(split_words(r#"-A X --comment "open"#), None);
    }
}
