//! netboot-harness: test support for netboot.
//!
//! - [`cluster`]: the shared local cluster (tests/cluster/up), unique test
//!   namespaces and helpers to wait for, and run commands in, podnet pods.
//! - [`podnet`]: the controller that makes selected pods real (netns, cgroup,
//!   processes), runs datapath agents, emulates kube-proxy and cluster DNS.
//! - [`controlplane`]: a private etcd + kube-apiserver and the real
//!   kube-proxy in a namespace (relay, config, rule dumps).
//! - [`kubeproxy_rules`]: kube-proxy's iptables ruleset as a pure function.
//! - [`names`], [`netns`], [`cgroup`], [`process`], [`dns`]: the plumbing.
//! - [`caps`]: the capabilities a container's securityContext grants.
//! - [`http`]: a blocking HTTP/1.0 GET for polling agents.
//! - [`external`]: connections from the external client's netns (not a node).
//!
//! The test toolkit (netns, cgroup, process, http) is also what the
//! datapath's kernel tests and the bench use: it lives here only.

pub mod caps;
pub mod cgroup;
pub mod cluster;
pub mod controlplane;
pub mod dns;
pub mod external;
pub mod http;
pub mod kubeproxy_rules;
pub mod names;
pub mod netns;
pub mod podnet;
pub mod process;
