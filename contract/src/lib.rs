//! What `netboot` and `netboot-datapath` agree on. Both binaries depend on
//! this crate and on nothing else of each other (docs/contracts.md).
//!
//! - [`config`]: the agent's `config.yaml` — the schema, its parser and the
//!   defaults (map sizes, affinity timeout) the bootstrapper renders and
//!   `datapath/bpf/lb.h` compiles in.
//! - [`node`]: the Node annotations an agent reports and the gates read.
//! - [`agent`]: the agent's DaemonSet, ServiceAccount, ConfigMap and labels.
//! - [`memory`]: the agent's memory request and limit, from `mapSizes`.
//! - [`errors`]: how an error and its causes are printed — each cause once,
//!   outermost first (`a: b: c`), with control and bidi characters escaped.
//! - [`features`]: what an agent serves (its Node annotation) and what a
//!   Service needs, for the handover's "nothing unserved" gate.
//! - [`flows`]: the flow record the agent serves on `GET /v1/flows`, its
//!   verdicts and hooks, the filter query string, and the one-line text
//!   rendering both `netboot-datapath monitor` and `netboot flows` print.
//! - [`metrics`]: the Prometheus metric families each binary exports, which
//!   the shipped dashboard and alert rules may query.

pub mod agent;
pub mod config;
pub mod errors;
pub mod features;
pub mod flows;
pub mod memory;
pub mod metrics;
pub mod node;
