//! `netboot flows`: every agent's `/v1/flows` through the API server, merged
//! line by line, like `hubble observe --follow`.
//!
//! The agents serve flows on their loopback health listener only (the pod is
//! hostNetwork), so each is reached by a port-forward to its pod
//! (`pods/portforward`), with a plain HTTP/1.1 GET on it ([`http`]). One task
//! per agent; a stream that fails or ends is retried with backoff, the agent's
//! pod looked up again (a rollout replaces it). Once every agent was tried,
//! the agents' pods are listed again every few seconds and a node that has a
//! usable agent and no task yet (it joined, or its agent became ready) gets
//! one ([`joined`]). The library never prints: it hands every line and every
//! change to the caller as an [`Event`].

pub mod clients;
pub mod http;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::apply::describe;
use crate::wait::{pod_not_ready, AGENT_SELECTOR};
pub use wire::FlowFilter;

/// What to follow and how. `Default` is what `netboot flows` uses, but for
/// the namespace, port and filters, which come from the spec and the flags.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// The agents' namespace (`spec.namespace`).
    pub namespace: String,
    /// The agents' loopback health port (`spec.datapath.healthPort`).
    pub port: u16,
    /// Only the agents on these nodes (empty: every agent).
    pub nodes: Vec<String>,
    /// The filters every agent applies.
    pub query: FlowFilter,
    /// The first wait before a retry; doubled up to `backoff_max`.
    pub backoff_min: Duration,
    /// The longest wait between retries.
    pub backoff_max: Duration,
    /// Time allowed to reach an agent (port-forward, request, answer's head).
    pub connect_timeout: Duration,
    /// A stream silent this long is taken as dead (the agent sends an empty
    /// line every 2 s when it has no flow).
    pub idle_timeout: Duration,
    /// How often the agents' pods are listed again, for nodes that joined.
    pub relist: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            port: 0,
            nodes: Vec::new(),
            query: FlowFilter::default(),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            relist: Duration::from_secs(5),
        }
    }
}

/// What [`follow`] reports, in order.
#[derive(Debug)]
pub enum Event<'a> {
    /// An agent left out, with why (its pod is not running and ready, or
    /// there is none on a node asked for).
    Skipped { node: &'a str, reason: &'a str },
    /// Connecting to these agents (the first attempt of each).
    Connecting { nodes: &'a [String] },
    /// Every agent was tried once: these streams are up (the others retry).
    Up { nodes: &'a [String] },
    /// A flow: the agent's line and its JSON object.
    Flow {
        node: &'a str,
        line: &'a str,
        flow: &'a serde_json::Map<String, serde_json::Value>,
    },
    /// The agent dropped this many flows for this watcher (it read too slowly).
    Lost { node: &'a str, count: u64 },
    /// A line that is not a flow.
    Unreadable {
        node: &'a str,
        line: &'a str,
        reason: &'a str,
    },
    /// An agent's stream failed or ended, or a retry failed for another
    /// reason than the last: it is retried with backoff.
    Retrying { node: &'a str, reason: &'a str },
    /// An agent's stream is back after a failure.
    Reconnected { node: &'a str },
    /// An agent found after the start (its node joined, or its pod became
    /// ready) is streaming, for the first time.
    Joined { node: &'a str },
}

/// Why following could not start.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// Listing the agents' pods failed.
    #[error("listing pods in namespace {namespace} ({selector}): {message}")]
    List {
        namespace: String,
        selector: String,
        message: String,
    },
    /// No agent pod at all.
    #[error("no agent pod in namespace {namespace} (selector {selector}): is netboot applied to this cluster, with this spec's namespace?")]
    NoAgents { namespace: String, selector: String },
    /// Agents, but none on the nodes asked for.
    #[error("no agent pod on node {wanted} in namespace {namespace} (selector {selector}); agents run on: {have}")]
    NoneOnNodes {
        wanted: String,
        namespace: String,
        selector: String,
        have: String,
    },
    /// Agent pods, but none running and ready.
    #[error("no agent pod in namespace {namespace} is running and ready: {reasons}")]
    NoneReady { namespace: String, reasons: String },
    /// The first connection to every agent failed.
    #[error("no agent could be reached:{}", .0.iter().map(|(n, r)| format!("\n  {n}: {r}")).collect::<String>())]
    Unreachable(Vec<(String, String)>),
}

/// An agent to follow: its node and pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub node: String,
    pub pod: String,
}

/// Nodes left out, each with why.
pub type Skipped = Vec<(String, String)>;

/// Which agents to follow, from the agents' pods: one per node (a ready pod
/// not being deleted), only on `nodes` when given. The rest are returned as
/// (node, why skipped).
pub fn select_agents(
    pods: &[Pod],
    nodes: &[String],
    namespace: &str,
) -> Result<(Vec<Agent>, Skipped), FlowsError> {
    let by_node = by_node(pods);
    if by_node.is_empty() && !pods.is_empty() {
        return Err(FlowsError::NoneReady {
            namespace: namespace.into(),
            reasons: pods
                .iter()
                .map(|p| {
                    let name = p.metadata.name.as_deref().unwrap_or_default();
                    format!("pod {name}: not scheduled to a node")
                })
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    if by_node.is_empty() {
        return Err(FlowsError::NoAgents {
            namespace: namespace.into(),
            selector: AGENT_SELECTOR.into(),
        });
    }
    let wanted: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    if !wanted.is_empty() && !wanted.iter().any(|n| by_node.contains_key(*n)) {
        return Err(FlowsError::NoneOnNodes {
            wanted: nodes.join(", "),
            namespace: namespace.into(),
            selector: AGENT_SELECTOR.into(),
            have: by_node.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let mut agents = Vec::new();
    let mut skipped = Vec::new();
    for n in wanted.iter().filter(|n| !by_node.contains_key(**n)) {
        skipped.push((n.to_string(), "no agent pod on this node".to_string()));
    }
    for (node, pods) in by_node {
        if !wanted.is_empty() && !wanted.contains(node.as_str()) {
            continue;
        }
        match usable(&pods) {
            Ok(pod) => agents.push(Agent { node, pod }),
            Err(reason) => skipped.push((node, reason)),
        }
    }
    if agents.is_empty() {
        return Err(FlowsError::NoneReady {
            namespace: namespace.into(),
            reasons: skipped
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok((agents, skipped))
}

/// The agents' pods by node (pods not scheduled yet left out).
fn by_node(pods: &[Pod]) -> BTreeMap<String, Vec<&Pod>> {
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in pods {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            by_node.entry(n).or_default().push(p);
        }
    }
    by_node
}

/// The agents to start following now, from the agents' pods listed again:
/// one per node that has a usable pod (as [`select_agents`]) and is not in
/// `followed` (an agent pod replaced on a followed node is its task's to
/// find), only on `nodes` when given. Nodes without a usable pod yet are
/// left for a later list.
pub fn joined(pods: &[Pod], followed: &BTreeSet<String>, nodes: &[String]) -> Vec<Agent> {
    by_node(pods)
        .into_iter()
        .filter(|(node, _)| !followed.contains(node))
        .filter(|(node, _)| nodes.is_empty() || nodes.contains(node))
        .filter_map(|(node, pods)| usable(&pods).ok().map(|pod| Agent { node, pod }))
        .collect()
}

/// The name of the first running, ready pod not being deleted, or why none is.
fn usable(pods: &[&Pod]) -> Result<String, String> {
    let mut why = Vec::new();
    for p in pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let phase = p.status.as_ref().and_then(|s| s.phase.clone());
        if p.metadata.deletion_timestamp.is_some() {
            why.push(format!("pod {name}: terminating"));
        } else if phase.as_deref() != Some("Running") {
            why.push(format!(
                "pod {name}: {}, not Running",
                phase.as_deref().unwrap_or("no phase")
            ));
        } else if let Some(r) = pod_not_ready(p) {
            why.push(r);
        } else {
            return Ok(name);
        }
    }
    Err(why.join("; "))
}

/// The agents' pods, as one list.
async fn list_pods(
    client: &Client,
    namespace: &str,
    node: Option<&str>,
) -> Result<Vec<Pod>, FlowsError> {
    let mut lp = ListParams::default().labels(AGENT_SELECTOR);
    if let Some(n) = node {
        lp = lp.fields(&format!("spec.nodeName={n}"));
    }
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await
        .map(|l| l.items)
        .map_err(|e| FlowsError::List {
            namespace: namespace.into(),
            selector: AGENT_SELECTOR.into(),
            message: describe(&e),
        })
}

/// What an agent's task tells the merger.
enum Msg {
    Up,
    Down(String),
    Line(String),
}

/// Follows the agents' flows until `on` breaks (the caller's count is
/// reached, stdout is gone), never otherwise; agents that appear later are
/// followed too ([`joined`], reported as [`Event::Joined`] once streaming).
/// `on` is called from one task, so lines are never interleaved.
pub async fn follow(
    client: &Client,
    opts: &FollowOptions,
    mut on: impl FnMut(Event<'_>) -> ControlFlow<()>,
) -> Result<(), FlowsError> {
    let pods = list_pods(client, &opts.namespace, None).await?;
    let (agents, skipped) = select_agents(&pods, &opts.nodes, &opts.namespace)?;
    for (node, reason) in &skipped {
        if on(Event::Skipped { node, reason }).is_break() {
            return Ok(());
        }
    }
    let names: Vec<String> = agents.iter().map(|a| a.node.clone()).collect();
    if on(Event::Connecting { nodes: &names }).is_break() {
        return Ok(());
    }
    // Bounded: a slow stdout slows the tasks, and the agents report what
    // they had to drop (`{"lost":N}`).
    let (tx, mut rx) = mpsc::channel::<(Arc<str>, Msg)>(1024);
    let opts = Arc::new(opts.clone());
    let mut tasks = JoinSet::new();
    for a in agents {
        tasks.spawn(agent_task(client.clone(), opts.clone(), a, tx.clone()));
    }
    let mut followed: BTreeSet<String> = names.iter().cloned().collect();
    let mut merge = Merge::new(names.len());
    let mut relist = tokio::time::interval(opts.relist.max(Duration::from_millis(100)));
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => {
                // Never None: `tx` is held here.
                let Some((node, msg)) = msg else {
                    return Ok(());
                };
                if merge.handle(node, msg, &mut on)?.is_break() {
                    return Ok(());
                }
            }
            // Only once every agent was tried: until then the header waits.
            _ = relist.tick(), if merge.announced => {
                let listed = tokio::time::timeout(
                    opts.connect_timeout,
                    list_pods(client, &opts.namespace, None),
                )
                .await;
                // A failed list is tried again at the next tick.
                let Ok(Ok(pods)) = listed else {
                    continue;
                };
                for a in joined(&pods, &followed, &opts.nodes) {
                    followed.insert(a.node.clone());
                    merge.join(Arc::from(a.node.as_str()));
                    tasks.spawn(agent_task(client.clone(), opts.clone(), a, tx.clone()));
                }
            }
        }
    }
}

/// The merger's state: what the agents' tasks said so far.
#[derive(Default)]
struct Merge {
    /// Agents followed.
    total: usize,
    /// Each agent's first result (None: up), until all are in.
    first: BTreeMap<Arc<str>, Option<String>>,
    /// [`Event::Up`] was sent.
    announced: bool,
    /// Lines that came before it.
    held: Vec<(Arc<str>, String)>,
    /// Agents up now.
    up: BTreeSet<Arc<str>>,
    /// The last failure reported per agent that is down.
    last: BTreeMap<Arc<str>, String>,
    /// Agents started after the header, not streaming yet.
    joining: BTreeSet<Arc<str>>,
}

impl Merge {
    fn new(total: usize) -> Self {
        Self {
            total,
            ..Self::default()
        }
    }

    /// An agent started after the header: its first stream is reported as
    /// [`Event::Joined`].
    fn join(&mut self, node: Arc<str>) {
        self.joining.insert(node);
    }

    /// Turns one message into events. Err: the first attempt of every
    /// agent failed.
    fn handle(
        &mut self,
        node: Arc<str>,
        msg: Msg,
        on: &mut impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, FlowsError> {
        let flow = match msg {
            Msg::Line(line) if self.announced => line_event(&node, &line, on),
            Msg::Line(line) => {
                self.held.push((node, line));
                ControlFlow::Continue(())
            }
            Msg::Up => {
                let flow = if !self.announced && !self.first.contains_key(&node) {
                    self.first.insert(node.clone(), None);
                    ControlFlow::Continue(())
                } else if self.joining.remove(&node) {
                    on(Event::Joined { node: &node })
                } else {
                    on(Event::Reconnected { node: &node })
                };
                self.last.remove(&node);
                self.up.insert(node);
                flow
            }
            Msg::Down(reason) => {
                let was_up = self.up.remove(&node);
                let flow = if !self.announced && !self.first.contains_key(&node) {
                    self.first.insert(node.clone(), Some(reason.clone()));
                    ControlFlow::Continue(())
                } else if was_up || self.last.get(&node) != Some(&reason) {
                    // Once per failure: not again for each retry that fails alike.
                    on(Event::Retrying {
                        node: &node,
                        reason: &reason,
                    })
                } else {
                    ControlFlow::Continue(())
                };
                self.last.insert(node, reason);
                flow
            }
        };
        if flow.is_break() || self.announced || self.first.len() < self.total {
            return Ok(flow);
        }
        self.announce(on)
    }

    /// Every agent was tried once: the header, the agents still down, the
    /// lines held back.
    fn announce(
        &mut self,
        on: &mut impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, FlowsError> {
        let ok: Vec<String> = self
            .first
            .iter()
            .filter(|(_, r)| r.is_none())
            .map(|(n, _)| n.to_string())
            .collect();
        if ok.is_empty() {
            return Err(FlowsError::Unreachable(
                std::mem::take(&mut self.first)
                    .into_iter()
                    .map(|(n, r)| (n.to_string(), r.unwrap_or_default()))
                    .collect(),
            ));
        }
        self.announced = true;
        if on(Event::Up { nodes: &ok }).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        let still_down = self
            .first
            .iter()
            .filter(|(n, _)| !self.up.contains(*n))
            .filter_map(|(n, r)| Some((n, r.as_ref()?)));
        for (node, reason) in still_down {
            if on(Event::Retrying { node, reason }).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        for (node, line) in std::mem::take(&mut self.held) {
            if line_event(&node, &line, on).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

fn line_event(
    node: &str,
    line: &str,
    on: &mut impl FnMut(Event<'_>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match wire::classify(line) {
        wire::Line::Heartbeat => ControlFlow::Continue(()),
        wire::Line::Lost(count) => on(Event::Lost { node, count }),
        wire::Line::Flow(flow) => on(Event::Flow {
            node,
            line,
            flow: &flow,
        }),
        wire::Line::Unreadable(reason) => on(Event::Unreadable {
            node,
            line,
            reason: &reason,
        }),
    }
}

/// Aborts the port-forward's background task when the stream is dropped
/// (kube's `Portforwarder` leaves it running).
struct Forward(kube::api::Portforwarder);

impl Drop for Forward {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves with the kubelet's error for the forwarded port (it could not
/// connect to the agent's port, or lost it); never resolves without one.
type PortError = Pin<Box<dyn Future<Output = String> + Send>>;

/// A stream that is up: the port-forward and the body.
struct Stream {
    _forward: Forward,
    error: PortError,
    body: http::Body<tokio::io::BufReader<tokio::io::DuplexStream>>,
}

/// Port-forwards to `pod`'s health port and GETs `path` on it.
async fn open(
    client: &Client,
    opts: &FollowOptions,
    pod: &str,
    path: &str,
) -> Result<Stream, String> {
    let api = Api::<Pod>::namespaced(client.clone(), &opts.namespace);
    let mut pf = api.portforward(pod, &[opts.port]).await.map_err(|e| {
        let msg = describe(&e);
        let rbac = if msg.contains("403") {
            format!(
                " (needs RBAC create and get on pods/portforward in namespace {})",
                opts.namespace
            )
        } else {
            String::new()
        };
        format!("port-forward to pod {pod}: {msg}{rbac}")
    })?;
    let stream = pf.take_stream(opts.port).ok_or_else(|| {
        format!(
            "port-forward to pod {pod}: no stream for port {}",
            opts.port
        )
    })?;
    let err = pf.take_error(opts.port);
    let forward = Forward(pf);
    let port = opts.port;
    let mut error: PortError = Box::pin(async move {
        match err {
            Some(f) => match f.await {
                Some(m) => format!("port {port}: {m}"),
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    });
    let host = format!("127.0.0.1:{}", opts.port);
    let body = tokio::select! {
        r = http::get(stream, path, &host) => match r {
            Ok(body) => body,
            Err(e) => return Err(format!("pod {pod}: {}", why(&mut error, e.to_string()).await)),
        },
        m = &mut error => return Err(format!("pod {pod}: {m}")),
    };
    Ok(Stream {
        _forward: forward,
        error,
        body,
    })
}

/// The kubelet's reason for a stream that broke (the agent's port refused
/// the connection, the pod went away), which often comes just after the
/// stream closes; else `fallback`.
async fn why(error: &mut PortError, fallback: String) -> String {
    tokio::time::timeout(Duration::from_secs(1), error)
        .await
        .unwrap_or(fallback)
}

/// Sends the stream's lines until it fails or ends; returns why. Err: the
/// merger is gone.
async fn pump(
    s: &mut Stream,
    pod: &str,
    idle: Duration,
    node: &Arc<str>,
    tx: &mpsc::Sender<(Arc<str>, Msg)>,
) -> Result<String, ()> {
    loop {
        let line = tokio::select! {
            r = tokio::time::timeout(idle, s.body.next_line()) => r,
            m = &mut s.error => return Ok(format!("pod {pod}: {m}")),
        };
        let fallback = match line {
            Err(_) => format!("nothing for {}s, not even a heartbeat", idle.as_secs()),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(None)) => "the agent ended the stream".into(),
            Ok(Ok(Some(l))) => {
                tx.send((node.clone(), Msg::Line(l)))
                    .await
                    .map_err(|_| ())?;
                continue;
            }
        };
        return Ok(format!("pod {pod}: {}", why(&mut s.error, fallback).await));
    }
}

/// One agent: connect, stream, and on failure look its pod up again and
/// retry with backoff, until the merger is gone.
async fn agent_task(
    client: Client,
    opts: Arc<FollowOptions>,
    agent: Agent,
    tx: mpsc::Sender<(Arc<str>, Msg)>,
) {
    let node: Arc<str> = Arc::from(agent.node.as_str());
    let path = opts.query.path();
    let mut pod = Some(agent.pod);
    let mut backoff = opts.backoff_min;
    loop {
        let name = match pod.take() {
            Some(p) => Ok(p),
            None => find_pod(&client, &opts.namespace, &node).await,
        };
        let opened = match name {
            Ok(name) => {
                match tokio::time::timeout(opts.connect_timeout, open(&client, &opts, &name, &path))
                    .await
                {
                    Ok(r) => r.map(|s| (name, s)),
                    Err(_) => Err(format!(
                        "pod {name}: no answer within {}s",
                        opts.connect_timeout.as_secs()
                    )),
                }
            }
            Err(e) => Err(e),
        };
        let reason = match opened {
            Ok((name, mut s)) => {
                if tx.send((node.clone(), Msg::Up)).await.is_err() {
                    return;
                }
                let started = tokio::time::Instant::now();
                let Ok(reason) = pump(&mut s, &name, opts.idle_timeout, &node, &tx).await else {
                    return;
                };
                // A stream that lasted starts the backoff over.
                if started.elapsed() > opts.backoff_max * 3 {
                    backoff = opts.backoff_min;
                }
                reason
            }
            Err(reason) => reason,
        };
        if tx.send((node.clone(), Msg::Down(reason))).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

/// The agent's pod on `node` now (a rollout replaces it), or why there is none.
async fn find_pod(client: &Client, namespace: &str, node: &str) -> Result<String, String> {
    let pods = list_pods(client, namespace, Some(node))
        .await
        .map_err(|e| e.to_string())?;
    if pods.is_empty() {
        return Err(format!("no agent pod on this node ({AGENT_SELECTOR})"));
    }
    usable(&pods.iter().collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(name: &str, node: &str, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "netboot-system"},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }, "message": "containers with unready status: [agent]"}
            ]}
        }))
        .unwrap()
    }

    fn nodes(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn agents_are_one_ready_pod_per_node_and_the_rest_is_skipped_with_why() {
        let mut terminating = pod("nd-old", "node-2", "Running", true);
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-03T12:00:00Z".parse().unwrap(),
            ));
        let pods = [
            pod("nd-a", "node-0", "Running", true),
            pod("nd-b", "node-1", "Pending", false),
            terminating,
            pod("nd-new", "node-2", "Running", true),
            pod("nd-c", "node-3", "Running", false),
        ];
        let (agents, skipped) = select_agents(&pods, &[], "netboot-system").unwrap();
        assert_eq!(
            agents,
            [
                Agent {
                    node: "node-0".into(),
                    pod: "nd-a".into()
                },
                Agent {
                    node: "node-2".into(),
                    pod: "nd-new".into()
                },
            ]
        );
        insta::assert_debug_snapshot!(skipped);
        // --node: only those; one without an agent is a note.
        let (agents, skipped) =
            select_agents(&pods, &nodes(&["node-2", "node-9"]), "netboot-system").unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(
            skipped,
            [(
                "node-9".to_string(),
                "no agent pod on this node".to_string()
            )]
        );
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nodes_that_join_are_started_once_and_only_when_ready() {
        let pods = [
            pod("nd-a", "node-0", "Running", true),
            pod("nd-b", "node-1", "Running", true),
            pod("nd-c", "node-2", "Pending", false),
            pod("nd-d", "node-3", "Running", true),
        ];
        let started = |followed: &[&str], wanted: &[&str]| {
            joined(&pods, &set(followed), &nodes(wanted))
                .into_iter()
                .map(|a| format!("{}={}", a.node, a.pod))
                .collect::<Vec<_>>()
        };
        // node-0 is followed; node-2's agent is not ready yet: left for later.
        assert_eq!(started(&["node-0"], &[]), ["node-1=nd-b", "node-3=nd-d"]);
        // Nothing new: nothing started (a replaced pod on a followed node is
        // its task's to find).
        assert!(started(&["node-0", "node-1", "node-3"], &[]).is_empty());
        // --node: only those, whether or not they had an agent at the start.
        assert_eq!(started(&["node-0"], &["node-0", "node-3"]), ["node-3=nd-d"]);
        assert!(started(&[], &["node-2", "node-9"]).is_empty());
        // node-2's agent becomes ready; a terminating pod next to it is passed over.
        let mut old = pod("nd-old", "node-2", "Running", true);
        old.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-03T12:00:00Z".parse().unwrap(),
            ));
        let later = [old, pod("nd-c", "node-2", "Running", true)];
        assert_eq!(
            joined(&later, &set(&["node-0"]), &[]),
            [Agent {
                node: "node-2".into(),
                pod: "nd-c".into()
            }]
        );
        // Pods not scheduled yet, or none at all: nothing.
        let mut unscheduled = pod("nd-u", "", "Pending", false);
        unscheduled.spec = None;
        assert!(joined(&[unscheduled], &set(&[]), &[]).is_empty());
        assert!(joined(&[], &set(&["node-0"]), &[]).is_empty());
    }

    #[test]
    fn a_joined_agent_is_announced_when_it_streams_then_handled_as_the_others() {
        let mut merge = Merge::new(1);
        let mut out = Vec::new();
        let mut on = |e: Event<'_>| {
            out.push(match e {
                Event::Flow { node, line, .. } => format!("flow {node}: {line}"),
                other => format!("{other:?}"),
            });
            ControlFlow::Continue(())
        };
        let msgs = [
            ("node-0", Msg::Up),
            (
                "node-3",
                Msg::Down("pod nd-d: port 9890: connection refused".into()),
            ),
            ("node-3", Msg::Up),
            ("node-3", line(r#"{"verdict":"translated"}"#)),
            (
                "node-3",
                Msg::Down("pod nd-d: the agent ended the stream".into()),
            ),
            ("node-3", Msg::Up),
        ];
        for (i, (node, msg)) in msgs.into_iter().enumerate() {
            if i == 1 {
                merge.join(Arc::from("node-3"));
            }
            assert!(merge
                .handle(Arc::from(node), msg, &mut on)
                .unwrap()
                .is_continue());
        }
        assert_eq!(
            out,
            [
                r#"Up { nodes: ["node-0"] }"#,
                r#"Retrying { node: "node-3", reason: "pod nd-d: port 9890: connection refused" }"#,
                r#"Joined { node: "node-3" }"#,
                r#"flow node-3: {"verdict":"translated"}"#,
                r#"Retrying { node: "node-3", reason: "pod nd-d: the agent ended the stream" }"#,
                r#"Reconnected { node: "node-3" }"#,
            ]
        );
    }

    #[test]
    fn no_agent_to_follow_is_an_error_naming_namespace_and_selector() {
        let err = |pods: &[Pod], n: &[&str]| {
            select_agents(pods, &nodes(n), "netboot-system")
                .unwrap_err()
                .to_string()
        };
        let pods = [
            pod("nd-a", "node-0", "Running", true),
            pod("nd-b", "node-1", "Pending", false),
        ];
        let mut unscheduled = pod("nd-u", "", "Pending", false);
        unscheduled.spec = None;
        insta::assert_snapshot!([
            err(&[], &[]),
            err(&pods, &["node-7"]),
            err(&pods[1..], &[]),
            err(&[unscheduled], &[]),
        ]
        .join("\n"));
    }

    /// Feeds `msgs` to a merger of `total` agents; every event as a line,
    /// and how it ended.
    fn merged(total: usize, msgs: Vec<(&str, Msg)>, stop_after_flows: usize) -> String {
        let mut merge = Merge::new(total);
        let mut out = Vec::new();
        let mut flows = 0;
        let mut on = |e: Event<'_>| {
            if matches!(e, Event::Flow { .. }) {
                flows += 1;
            }
            out.push(match e {
                Event::Flow { node, line, .. } => format!("flow {node}: {line}"),
                other => format!("{other:?}"),
            });
            if flows >= stop_after_flows {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let mut end = "(messages done)".to_string();
        for (node, msg) in msgs {
            match merge.handle(Arc::from(node), msg, &mut on) {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => {
                    end = "(stopped)".into();
                    break;
                }
                Err(e) => {
                    end = format!("error: {e}");
                    break;
                }
            }
        }
        out.push(end);
        out.join("\n")
    }

    fn line(l: &str) -> Msg {
        Msg::Line(l.into())
    }

    #[test]
    fn the_header_waits_for_every_agents_first_try_and_held_lines_follow_it() {
        insta::assert_snapshot!(merged(
            3,
            vec![
                ("node-0", Msg::Up),
                ("node-0", line(r#"{"verdict":"refused"}"#)),
                (
                    "node-2",
                    Msg::Down("pod nd-c: HTTP 429 Too Many Requests".into())
                ),
                ("node-0", line("")),
                ("node-1", Msg::Up),
                ("node-1", line(r#"{"lost":4}"#)),
                ("node-1", line("garbage")),
                (
                    "node-0",
                    Msg::Down("pod nd-a: the agent ended the stream".into())
                ),
                (
                    "node-0",
                    Msg::Down("pod nd-a: port 9890: connection refused".into())
                ),
                (
                    "node-0",
                    Msg::Down("pod nd-a: port 9890: connection refused".into())
                ),
                ("node-0", Msg::Up),
                (
                    "node-2",
                    Msg::Down("pod nd-c: HTTP 429 Too Many Requests".into())
                ),
                ("node-2", Msg::Up),
                ("node-2", line(r#"{"verdict":"translated"}"#)),
            ],
            usize::MAX,
        ));
    }

    #[test]
    fn every_first_try_failing_is_an_error_and_a_count_stops_the_merge() {
        let refused = |n: &str| {
            (
                n.to_string(),
                format!("pod nd-{n}: port 9890: connection refused"),
            )
        };
        let failed = merged(
            2,
            vec![
                ("node-0", Msg::Down(refused("0").1)),
                ("node-1", Msg::Down(refused("1").1)),
            ],
            usize::MAX,
        );
        assert!(
            failed.starts_with("error: no agent could be reached:\n  node-0: pod nd-0"),
            "{failed}"
        );
        let two = merged(
            2,
            vec![
                ("node-0", Msg::Up),
                ("node-0", line(r#"{"a":1}"#)),
                ("node-0", line(r#"{"a":2}"#)),
                ("node-1", Msg::Down(refused("1").1)),
                ("node-0", line(r#"{"a":3}"#)),
            ],
            2,
        );
        insta::assert_snapshot!(two);
    }

    #[test]
    fn unreachable_agents_are_listed_one_per_line() {
        let e = FlowsError::Unreachable(vec![
            ("node-0".into(), "pod nd-a: HTTP 429 Too Many Requests: 4 flow watchers already".into()),
            ("node-1".into(), "port-forward to pod nd-b: failed to switch protocol: 403 Forbidden (needs RBAC create and get on pods/portforward in namespace netboot-system)".into()),
        ]);
        insta::assert_snapshot!(e.to_string());
    }
}
