//! netboot bootstraps a Kubernetes cluster's service network the GitOps way.
//!
//! The pipeline follows the data: [`spec`] (a checked `ClusterNetwork`) →
//! [`render`] (handlebars templates → [`manifest`]s) → apply → handover →
//! validate → status. The `netboot` binary is a thin CLI over this library.

pub mod manifest;
pub mod render;
pub mod spec;
