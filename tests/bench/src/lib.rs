//! netboot-bench: netboot's socket LB against kube-proxy's iptables and
//! nftables modes, side by side in one run, inside network namespaces the
//! bench creates.
//!
//! The data flows: [`workload`] (Services, EndpointSlices) → per variant
//! [`netboot_lb`] (the real reconciler into the real maps), [`iptables_rules`]
//! and [`nft_rules`] (kube-proxy's rules, loaded by [`kube_proxy`]) →
//! [`topology`] (namespaces, listeners) → [`latency`] (interleaved [`client`]
//! batches; [`compare`]'s intervals), programming costs ([`size`]), the real agent ([`agent_run`]) →
//! [`report`] (JSON, markdown), [`goals`], [`plot`].
//! `netboot-bench programming` ([`programming`]): the real kube-proxy and
//! the real agent on a private API server under EndpointSlice churn, each
//! proxy's own latency [`histogram`], an outside [`probe`], and
//! [`programming_report`].
//! `netboot-bench northsouth` ([`northsouth`]): an external client to
//! NodePorts through netboot's tc path, kube-proxy's rules and the floor,
//! the tc program's ns/packet ([`tc_cost`]), [`northsouth_report`].
//! `netboot-bench coldstart` ([`coldstart`]): only the agent's cold start
//! and RSS, optionally against a base build.
//! [`cleanup`] owns every namespace, cgroup, pin and child the bench creates.

pub mod agent_run;
pub mod args;
pub mod cleanup;
pub mod client;
pub mod coldstart;
pub mod coldstart_api;
pub mod compare;
pub mod flows_cost;
pub mod goals;
pub mod histogram;
pub mod iptables_rules;
pub mod kube_proxy;
pub mod latency;
pub mod machine;
pub mod netboot_lb;
pub mod nft_rules;
pub mod northsouth;
pub mod northsouth_report;
pub mod plot;
pub mod probe;
pub mod programming;
pub mod programming_report;
pub mod report;
pub mod run;
pub mod settings;
pub mod size;
pub mod stats;
pub mod sys;
pub mod tc_cost;
pub mod topology;
pub mod variant;
pub mod workload;
