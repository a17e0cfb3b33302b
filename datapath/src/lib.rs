//! netboot-datapath: an eBPF kube-proxy replacement (socket-level load
//! balancing for ClusterIP Services).
//!
//! The data flows: [`watch`] (Services, EndpointSlices) → [`desired`] tables →
//! one [`reconcile::Reconciler`] → [`maps`] (pinned BPF maps, see [`pins`]) →
//! the programs in `bpf/sock_lb.bpf.c`, attached by [`loader`]. A [`pass`]
//! rebuilds and writes only the Services a watch event marked dirty.

pub mod agent;
pub mod client;
pub mod config;
pub mod conntrack;
pub mod desired;
pub mod devices;
pub mod diag;
pub mod events;
pub mod flows;
pub mod handover;
pub mod healthcheck;
pub mod http;
pub mod kube_proxy;
pub mod latency;
pub mod layout;
pub mod lean;
pub mod listwatch;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod pass;
pub mod pb;
pub mod pins;
pub mod pod_ifaces;
pub mod podcgroup;
pub mod reconcile;
pub mod service;
pub mod slice;
pub mod sock_term;
pub mod srcrange;
pub mod startup;
pub mod status;
pub mod sys;
pub mod upgrade;
pub mod version;
pub mod watch;
