//! Watchers on Services and EndpointSlices feeding the stores the desired
//! table is built from. A (re)list is buffered and swapped in only when
//! complete (`InitDone`); errors are retried with kube-runtime's default
//! backoff and counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::desired::{self, DesiredTable};

/// Errors of the static source.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The static file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A document is not a Service or EndpointSlice.
    #[error("{path}: document {index}: {message}")]
    Parse {
        /// File.
        path: String,
        /// 0-based document index.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

type Key = (String, String);

/// The objects the desired table is built from.
#[derive(Debug, Default)]
pub struct Stores {
    /// Services by (namespace, name).
    pub services: BTreeMap<Key, Service>,
    /// EndpointSlices by (namespace, name).
    pub slices: BTreeMap<Key, EndpointSlice>,
    /// The Services list completed at least once.
    pub services_synced: bool,
    /// The EndpointSlices list completed at least once.
    pub slices_synced: bool,
}

/// Stores shared between watchers and the reconciler loop.
#[derive(Debug, Default)]
pub struct Watched {
    stores: Mutex<Stores>,
    /// Woken on every change.
    pub changed: Notify,
    /// Watch errors seen.
    pub errors: AtomicU64,
    /// Last watch error text.
    pub last_error: Mutex<String>,
}

impl Watched {
    /// Both initial lists are complete.
    pub fn synced(&self) -> bool {
        self.stores
            .lock()
            .map(|s| s.services_synced && s.slices_synced)
            .unwrap_or(false)
    }

    /// Builds the desired table from the current stores.
    pub fn desired(&self, default_affinity_timeout: u32) -> DesiredTable {
        match self.stores.lock() {
            Ok(s) => desired::build(
                s.services.values(),
                s.slices.values(),
                default_affinity_timeout,
            ),
            Err(_) => DesiredTable::default(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Stores) -> R) -> Option<R> {
        let r = self.stores.lock().ok().map(|mut s| f(&mut s));
        self.changed.notify_one();
        r
    }

    /// Loads a fixed set of objects (multi-document YAML of Services and
    /// EndpointSlices) instead of watching: tests and API-less operation.
    pub fn load_static(&self, path: &Path) -> Result<(), WatchError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WatchError::Read {
            path: p.clone(),
            source,
        })?;
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let perr = |message: String| WatchError::Parse {
                path: p.clone(),
                index,
                message,
            };
            let v = serde_yaml::Value::deserialize(doc).map_err(|e| perr(e.to_string()))?;
            match v.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => {
                    let s: Service = serde_yaml::from_value(v).map_err(|e| perr(e.to_string()))?;
                    services.insert(key(&s), s);
                }
                Some("EndpointSlice") => {
                    let s: EndpointSlice =
                        serde_yaml::from_value(v).map_err(|e| perr(e.to_string()))?;
                    slices.insert(key(&s), s);
                }
                None if v.is_null() => {}
                other => return Err(perr(format!("unexpected kind {other:?}"))),
            }
        }
        self.with(|s| {
            s.services = services;
            s.slices = slices;
            s.services_synced = true;
            s.slices_synced = true;
        });
        Ok(())
    }
}

fn key<K: Resource>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// Which store a watcher feeds.
trait Stored: Resource + Clone + Sized {
    fn store(s: &mut Stores) -> &mut BTreeMap<Key, Self>;
    fn mark_synced(s: &mut Stores);
}

impl Stored for Service {
    fn store(s: &mut Stores) -> &mut BTreeMap<Key, Self> {
        &mut s.services
    }
    fn mark_synced(s: &mut Stores) {
        s.services_synced = true;
    }
}

impl Stored for EndpointSlice {
    fn store(s: &mut Stores) -> &mut BTreeMap<Key, Self> {
        &mut s.slices
    }
    fn mark_synced(s: &mut Stores) {
        s.slices_synced = true;
    }
}

async fn run_one<K>(api: Api<K>, shared: Arc<Watched>)
where
    K: Stored
        + Resource<DynamicType = ()>
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    consume(stream, &shared).await;
}

/// Applies watch events to the stores: a (re)list is buffered and swapped in
/// whole at `InitDone`; errors are counted (the stream itself backs off).
async fn consume<K, E, S>(stream: S, shared: &Watched)
where
    K: Stored + Resource<DynamicType = ()>,
    E: std::fmt::Display,
    S: futures::Stream<Item = Result<Event<K>, E>>,
{
    futures::pin_mut!(stream);
    let mut buffer: Option<BTreeMap<Key, K>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => buffer = Some(BTreeMap::new()),
            Ok(Event::InitApply(o)) => {
                buffer.get_or_insert_with(BTreeMap::new).insert(key(&o), o);
            }
            Ok(Event::InitDone) => {
                let full = buffer.take().unwrap_or_default();
                shared.with(|s| {
                    *K::store(s) = full;
                    K::mark_synced(s);
                });
            }
            Ok(Event::Apply(o)) => {
                shared.with(|s| K::store(s).insert(key(&o), o));
            }
            Ok(Event::Delete(o)) => {
                shared.with(|s| K::store(s).remove(&key(&o)));
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, kind = %K::kind(&()), "watch error, retrying with backoff");
                if let Ok(mut l) = shared.last_error.lock() {
                    *l = format!("watch {}: {e}", K::kind(&()));
                }
            }
        }
    }
}

/// Spawns the Service and EndpointSlice watchers (all namespaces).
pub fn spawn(client: Client, shared: Arc<Watched>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(run_one::<Service>(Api::all(client.clone()), shared.clone())),
        tokio::spawn(run_one::<EndpointSlice>(Api::all(client), shared)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: d}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn ev(e: Event<Service>) -> Result<Event<Service>, String> {
        Ok(e)
    }

    #[tokio::test]
    async fn relist_is_swapped_in_only_when_complete() {
        let w = Arc::new(Watched::default());
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Event<Service>, String>>();
        let task = {
            let w = w.clone();
            tokio::spawn(async move { consume(rx, &w).await })
        };
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(20));
        let names = |w: &Watched| -> Vec<String> {
            w.stores
                .lock()
                .unwrap()
                .services
                .keys()
                .map(|k| k.1.clone())
                .collect()
        };

        // Initial list in progress: nothing visible, not synced.
        tx.unbounded_send(ev(Event::Init)).unwrap();
        tx.unbounded_send(ev(Event::InitApply(svc("a", "10.96.0.1"))))
            .unwrap();
        tx.unbounded_send(ev(Event::InitApply(svc("b", "10.96.0.2"))))
            .unwrap();
        settle().await;
        assert!(!w.stores.lock().unwrap().services_synced);
        assert!(names(&w).is_empty());
        tx.unbounded_send(ev(Event::InitDone)).unwrap();
        settle().await;
        assert_eq!(names(&w), vec!["a", "b"]);

        // An error, then a re-list in which "a" is gone: the last complete list stays until InitDone.
        tx.unbounded_send(Err("connection reset".to_string()))
            .unwrap();
        tx.unbounded_send(ev(Event::Init)).unwrap();
        tx.unbounded_send(ev(Event::InitApply(svc("b", "10.96.0.2"))))
            .unwrap();
        settle().await;
        assert_eq!(names(&w), vec!["a", "b"]);
        assert_eq!(w.errors.load(Ordering::Relaxed), 1);
        tx.unbounded_send(ev(Event::InitDone)).unwrap();
        tx.unbounded_send(ev(Event::Apply(svc("c", "10.96.0.3"))))
            .unwrap();
        settle().await;
        assert_eq!(names(&w), vec!["b", "c"]);
        drop(tx);
        task.await.unwrap();
    }

    #[test]
    fn static_file_marks_both_synced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, include_str!("../testdata/cluster.yaml")).unwrap();
        let w = Watched::default();
        w.load_static(&p).unwrap();
        assert!(w.synced());
        assert_eq!(w.desired(10800).frontends.len(), 6);
    }
}
