//! kube-proxy's ipsets (IPVS mode), decided from `ipset list -n` and the
//! iptables rules that stay after the rules cleanup, by pure functions
//! ([`parse_list_names`], [`is_kube_proxy_set`], [`plan_ipsets`]).
//!
//! Names as kube-proxy v1.36 gives them (pkg/proxy/ipvs/ipset.go,
//! `ipsetInfo`): [`IPV4_SETS`]; the IPv6 proxier's take the prefix `KUBE-6-`
//! instead of `KUBE-`, cut at ipset's 31 characters ([`ipv6_name`]). Other
//! `KUBE-*` sets (kube-router's `KUBE-SRC-*`/`KUBE-DST-*`, …) are not
//! kube-proxy's and stay.
//!
//! A set cannot be destroyed while a rule matches it: sets are destroyed
//! after the iptables rules, and a kube-proxy set that a rule staying after
//! the cleanup still matches (a retained chain's, another component's) is
//! kept and reported as retained.

use serde::Serialize;

use super::ipvs::ParseError;

/// kube-proxy's IPv4 (and single-stack) ipset names.
pub const IPV4_SETS: [&str; 17] = [
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
];

/// ipset's longest name.
const MAX_NAME: usize = 31;

/// The IPv6 proxier's name for an IPv4 set name: `KUBE-` → `KUBE-6-`, cut
/// at 31 characters.
pub fn ipv6_name(v4: &str) -> String {
    let mut n = match v4.strip_prefix("KUBE-") {
        Some(rest) => format!("KUBE-6-{rest}"),
        None => v4.to_string(),
    };
    n.truncate(MAX_NAME);
    n
}

/// Whether `name` is one of kube-proxy's sets.
pub fn is_kube_proxy_set(name: &str) -> bool {
    IPV4_SETS.iter().any(|s| *s == name || ipv6_name(s) == name)
}

/// The set names in `ipset list -n` output (one a line).
pub fn parse_list_names(text: &str) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let name = raw.trim();
        if name.is_empty() {
            continue;
        }
        if name.contains(char::is_whitespace) || name.len() > MAX_NAME {
            return Err(ParseError {
                line: i + 1,
                text: name.to_string(),
            });
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// The sets an iptables rule (`-A …` line) matches with `--match-set`.
pub fn match_sets(rule: &str) -> Vec<String> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--match-set" || w[0] == "--set")
        .map(|w| w[1].trim_matches('"').to_string())
        .collect()
}

/// kube-proxy's ipsets, and which must stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IpsetPlan {
    /// kube-proxy's sets to destroy (after the rules).
    pub destroy: Vec<String>,
    /// kube-proxy's sets kept because a staying rule matches them:
    /// `SET (matched by: WHERE -A …)`.
    pub retained: Vec<String>,
}

/// Plans the sets: `names` from `ipset list -n`, `staying` the rules that
/// remain after the rules cleanup as (where, `-A …` line).
pub fn plan_ipsets(names: &[String], staying: &[(String, String)]) -> IpsetPlan {
    let mut plan = IpsetPlan::default();
    for n in names.iter().filter(|n| is_kube_proxy_set(n)) {
        let by: Vec<String> = staying
            .iter()
            .filter(|(_, rule)| match_sets(rule).iter().any(|s| s == n))
            .map(|(at, rule)| format!("{at} {rule}"))
            .collect();
        if by.is_empty() {
            plan.destroy.push(n.clone());
        } else {
            plan.retained
                .push(format!("{n} (matched by: {})", by.join("; ")));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_PROXY_SETS: &str = include_str!("../../tests/fixtures/kube-proxy-ipvs.ipset");
    const OTHER_SETS: &str = include_str!("../../tests/fixtures/others-ipvs.ipset");

    fn created(restore: &str) -> Vec<String> {
        restore
            .lines()
            .filter_map(|l| l.strip_prefix("create "))
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }

    #[test]
    fn kube_proxys_names_and_no_others() {
        assert_eq!(ipv6_name("KUBE-CLUSTER-IP"), "KUBE-6-CLUSTER-IP");
        assert_eq!(
            ipv6_name("KUBE-LOAD-BALANCER-SOURCE-CIDR"),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        for n in created(KUBE_PROXY_SETS) {
            assert!(is_kube_proxy_set(&n), "{n}");
        }
        for n in created(OTHER_SETS) {
            assert!(!is_kube_proxy_set(&n), "{n}");
        }
        for n in [
            "KUBE-6-LOAD-BALANCER-SOURCE-CIDR",
            "kube-cluster-ip",
            "KUBE-",
            "",
        ] {
            assert!(!is_kube_proxy_set(n), "{n}");
        }
    }

    #[test]
    fn list_names_are_read_strictly() {
        assert_eq!(
            parse_list_names("KUBE-CLUSTER-IP\nother\n\n").expect("names"),
            ["KUBE-CLUSTER-IP", "other"]
        );
        assert!(parse_list_names("Name: KUBE-CLUSTER-IP\n").is_err());
        assert_eq!(parse_list_names(""), Ok(vec![]));
    }

    #[test]
    fn a_set_a_staying_rule_matches_is_kept() {
        let mut names = created(KUBE_PROXY_SETS);
        names.extend(created(OTHER_SETS));
        let staying = vec![
            (
                "iptables-nft-save filter:".to_string(),
                "-A KUBE-NWPLCY-IPVSNODE -m set --match-set KUBE-DST-VBH27M7NWLDOZIE4 dst -j ACCEPT"
                    .to_string(),
            ),
            (
                "iptables-legacy-save nat:".to_string(),
                "-A CNI-HOSTPORT-DNAT -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN"
                    .to_string(),
            ),
        ];
        let p = plan_ipsets(&names, &staying);
        assert_eq!(
            p.retained,
            ["KUBE-CLUSTER-IP (matched by: iptables-legacy-save nat: -A CNI-HOSTPORT-DNAT -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN)"]
        );
        assert_eq!(p.destroy.len(), created(KUBE_PROXY_SETS).len() - 1);
        assert!(p.destroy.iter().all(|n| is_kube_proxy_set(n)));
        assert!(!p.destroy.contains(&"KUBE-CLUSTER-IP".to_string()));
    }
}
