//! netboot bootstraps a Kubernetes cluster's service network the GitOps way.
//!
//! The pipeline follows the data: [`spec`] (a checked `ClusterNetwork`) →
//! [`source`] (the spec and templates at a git commit) →
//! [`render`] (handlebars templates → [`manifest`]s) → apply → handover →
//! validate → status. The `netboot` binary is a thin CLI over this library.

pub mod apply;
pub mod cluster;
pub mod converge;
pub mod diff;
pub mod endpoint;
pub mod fault;
pub mod flows;
pub mod handover;
pub mod inventory;
pub mod journal;
pub mod kube_proxy_mode;
pub mod kubeadm;
pub mod lock;
pub mod manifest;
pub mod observability;
pub mod probe;
pub mod prune;
pub mod reconcile;
pub mod render;
pub mod resources;
pub mod source;
pub mod spec;
pub mod status;
pub mod unserved;
pub mod validate;
pub mod wait;
