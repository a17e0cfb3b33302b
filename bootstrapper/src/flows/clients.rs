//! Client pods by UID. The agents name a flow's client by the UID in its
//! cgroup's path (`client_pod_uid`; they do not watch pods); `netboot flows`
//! turns it into `namespace/name` from a metadata-only watch of every pod.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

/// Least time between two rebuilds of the UID index on a miss.
const REINDEX: Duration = Duration::from_millis(200);

/// UID → `namespace/name`, from a pod metadata watch.
pub struct ClientPods {
    store: Store<PartialObjectMeta<Pod>>,
    index: HashMap<String, String>,
    indexed: Option<Instant>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ClientPods {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClientPods {
    /// Starts the watch (errors, e.g. no RBAC to list pods, leave names
    /// unresolved; the UIDs are still printed).
    pub fn start(client: &Client) -> Self {
        let (store, writer) = reflector::store();
        let api: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while stream.next().await.is_some() {}
        });
        Self {
            store,
            index: HashMap::new(),
            indexed: None,
            task,
        }
    }

    /// `namespace/name` of the pod with `uid`, when known.
    pub fn name(&mut self, uid: &str) -> Option<String> {
        if let Some(n) = self.index.get(uid) {
            return Some(n.clone());
        }
        if self.indexed.is_some_and(|t| t.elapsed() < REINDEX) {
            return None;
        }
        self.indexed = Some(Instant::now());
        self.index = self
            .store
            .state()
            .iter()
            .filter_map(|p| {
                let m = &p.metadata;
                Some((
                    m.uid.clone()?,
                    format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?),
                ))
            })
            .collect();
        self.index.get(uid).cloned()
    }
}
