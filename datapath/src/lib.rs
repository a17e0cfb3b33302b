//! netboot-datapath: an eBPF kube-proxy replacement (socket-level load
//! balancing for ClusterIP Services).
//!
//! The data flows: [`watch`] (Services, EndpointSlices) → [`desired`] tables →
//! one [`reconcile::Reconciler`] → [`maps`] (pinned BPF maps, see [`pins`]) →
//! the programs in `bpf/sock_lb.bpf.c`, attached by [`loader`].

pub mod config;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod sys;
pub mod desired;
pub mod reconcile;
pub mod agent;
pub mod client;
pub mod handover;
pub mod http;
pub mod status;
pub mod watch;
pub mod diag;
