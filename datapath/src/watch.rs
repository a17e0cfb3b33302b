//! Watchers on Services and EndpointSlices feeding the stores the desired
//! table is built from. Lists are asked for in protobuf, watches in JSON
//! ([`crate::listwatch`]). A (re)list is buffered and swapped in only when
//! complete (`InitDone`); errors are retried with kube-runtime's default
//! backoff and counted.
//!
//! Every change also records what it affects in [`Dirty`]: the Service's
//! key for a Service event; for an EndpointSlice event the Service its
//! `kubernetes.io/service-name` label names, and the Service the stored
//! slice named before (label changed, or slice deleted). A (re)list or a
//! static load marks everything dirty (a full pass).
//!
//! With a change goes its trigger time ([`crate::latency`]) when it has one:
//! an EndpointSlice's `last-change-trigger-time`, a Service's last write.
//! Deletions carry none and drop the Service's pending ones (as kube-proxy
//! does); a relist carries those of the objects it changed or added.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::desired::{self, DesiredTable, Frontend, Name, Rules, ServiceKey, ServiceTable};
use crate::latency::{self, Triggered};
use crate::lean::{LeanService, LeanSlice};
use crate::listwatch::{self, Listable};
use crate::pb::{self, ListMeta};
use crate::service::Svc;
use crate::slice::Slice;
use crate::version::Version;
use netboot_contract::features::Feature;

/// The Node label the zone comes from (zone hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

type Key = (Name, Name);

/// What changed since the last [`Watched::take_dirty`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything (a relist or a static load): a full pass.
    pub full: bool,
    /// These Services (namespace, name) and their frontends.
    pub services: BTreeSet<ServiceKey>,
    /// The trigger times of the changes, per Service they affect.
    pub triggers: BTreeMap<ServiceKey, Vec<Triggered>>,
}

impl Dirty {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.full && self.services.is_empty()
    }
}

/// The objects the desired table is built from.
#[derive(Debug, Default)]
pub struct Stores {
    /// Services by (namespace, name), compact.
    pub services: BTreeMap<Key, Svc>,
    /// EndpointSlices by (namespace, name), compact.
    pub slices: BTreeMap<Key, Slice>,
    /// Slice keys by the Service their label names.
    /// (A sorted `Vec`: almost always one slice, and a `BTreeSet` of one
    /// takes a whole B-tree node.)
    slices_by_service: BTreeMap<ServiceKey, Vec<Key>>,
    /// What changed since the last pass took it.
    dirty: Dirty,
    /// The Services list completed at least once.
    pub services_synced: bool,
    /// The EndpointSlices list completed at least once.
    pub slices_synced: bool,
    /// This agent's Node name (`internalTrafficPolicy: Local`, node hints).
    node: String,
    /// Its zone label (zone hints).
    zone: Option<String>,
    /// Its addresses NodePorts are served on ([`desired::node_addresses`]).
    node_ips: Vec<IpAddr>,
    /// Waiting for the first read of the Node (its zone) before the first pass.
    node_pending: bool,
    /// What this agent serves now (None: [`desired::served`]); the
    /// north–south features depend on the per-packet path being attached.
    served: Option<BTreeSet<Feature>>,
    /// Every namespace an object in the stores is in, held once
    /// ([`Stores::interned`]).
    namespaces: Namespaces,
}

/// The namespaces of the stored objects: one copy each, which every key and
/// object in it shares, where each would otherwise hold its own (most
/// objects are in a few namespaces). Pruned of the ones nothing else holds
/// any more whenever it has doubled, so namespace churn does not grow it.
#[derive(Debug, Default)]
struct Namespaces {
    set: BTreeSet<Name>,
    /// Its size after the last prune.
    kept: usize,
}

impl Namespaces {
    /// The shared copy of `ns`.
    fn intern(&mut self, ns: &Name) -> Name {
        if let Some(n) = self.set.get(ns) {
            return n.clone();
        }
        if self.set.len() >= 2 * self.kept + 64 {
            self.set.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.set.len();
        }
        self.set.insert(ns.clone());
        ns.clone()
    }
}

impl Stores {
    /// `k` and the object's namespace `ns` sharing the interned namespace.
    fn interned(&mut self, k: Key, ns: &mut Name) -> Key {
        let shared = self.namespaces.intern(&k.0);
        *ns = shared.clone();
        (shared, k.1)
    }

    fn triggered(&mut self, svc: &ServiceKey, t: Option<Triggered>) {
        if let Some(t) = t {
            self.dirty.triggers.entry(svc.clone()).or_default().push(t);
        }
    }

    fn apply_service(&mut self, o: Service) {
        let trigger = latency::service_trigger(&o);
        let mut svc = Svc::from(o);
        let k = self.interned(svc_key(&svc), &mut svc.namespace);
        self.triggered(&k, trigger);
        self.services.insert(k.clone(), svc);
        self.dirty.services.insert(k);
    }

    fn delete_service(&mut self, o: &Service) {
        let k = key(o);
        self.services.remove(&k);
        self.dirty.triggers.remove(&k);
        self.dirty.services.insert(k);
    }

    fn unindex_slice(&mut self, k: &Key) {
        let Some(old) = self.slices.remove(k) else {
            return;
        };
        if let Some(svc) = old.service_key() {
            if let Some(set) = self.slices_by_service.get_mut(&svc) {
                if let Ok(i) = set.binary_search(k) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            self.dirty.services.insert(svc);
        }
    }

    fn apply_slice(&mut self, o: EndpointSlice) {
        let trigger = latency::slice_trigger(&o);
        let mut slice = Slice::from(o);
        let k = slice_key(&slice);
        self.unindex_slice(&k);
        let k = self.interned(k, &mut slice.namespace);
        if let Some(svc) = slice.service_key() {
            self.triggered(&svc, trigger);
            let set = self
                .slices_by_service
                .entry(svc.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            if let Err(i) = set.binary_search(&k) {
                set.insert(i, k.clone());
            }
            self.dirty.services.insert(svc);
        }
        self.slices.insert(k, slice);
    }

    fn delete_slice(&mut self, o: &EndpointSlice) {
        self.unindex_slice(&key(o));
        if let Some(svc) = desired::slice_service(o) {
            // The annotation of a deleted slice is its last update's time,
            // not this change's (kube-proxy drops the Service's too).
            self.dirty.triggers.remove(&svc);
            self.dirty.services.insert(svc);
        }
    }

    fn replace_services(&mut self, all: BTreeMap<Key, Listed<Svc>>) {
        let mut kept = Vec::with_capacity(all.len());
        for (k, mut o) in all {
            let k = self.interned(k, &mut o.object.namespace);
            if changed(
                self.services
                    .get(&k)
                    .and_then(|s| s.resource_version.as_ref()),
                o.version.as_ref(),
            ) {
                self.triggered(&k, o.trigger);
            }
            kept.push((k, o.object));
        }
        // Collected, not inserted one by one: a bulk-built map has full nodes.
        self.services = kept.into_iter().collect();
        self.dirty.full = true;
    }

    fn replace_slices(&mut self, all: BTreeMap<Key, Listed<Slice>>) {
        let mut index: Vec<(ServiceKey, Key)> = Vec::with_capacity(all.len());
        let mut kept = Vec::with_capacity(all.len());
        for (k, mut o) in all {
            let k = self.interned(k, &mut o.object.namespace);
            if let Some(svc) = o.object.service_key() {
                if changed(
                    self.slices
                        .get(&k)
                        .and_then(|s| s.resource_version.as_ref()),
                    o.version.as_ref(),
                ) {
                    self.triggered(&svc, o.trigger);
                }
                index.push((svc, k.clone()));
            }
            kept.push((k, o.object));
        }
        self.slices = kept.into_iter().collect();
        // Slices are named after their Service, so this is nearly sorted
        // already (a stable sort takes it in one pass), then grouped and
        // built in one go rather than searched per slice. Slice keys came
        // in order: each group stays sorted. Most Services have one slice
        // per family: `vec!` of one has room for exactly one.
        index.sort_by(|a, b| a.0.cmp(&b.0));
        self.slices_by_service = crate::desired::group_runs(index).into_iter().collect();
        self.dirty.full = true;
    }

    /// Every Service and EndpointSlice at once (a complete list or a static
    /// load): both stores replaced and synced.
    fn replace_all(
        &mut self,
        services: BTreeMap<Key, Listed<Svc>>,
        slices: BTreeMap<Key, Listed<Slice>>,
    ) {
        self.replace_services(services);
        self.replace_slices(slices);
        self.services_synced = true;
        self.slices_synced = true;
    }

    fn rules(&self, default_affinity_timeout: u32) -> Rules<'_> {
        Rules {
            default_affinity_timeout,
            node: &self.node,
            zone: self.zone.as_deref(),
            node_ips: &self.node_ips,
        }
    }

    /// The frontends of Service `k` from the stores (none if it is gone).
    fn frontends_of(&self, k: &ServiceKey, default_affinity_timeout: u32) -> Vec<Frontend> {
        let Some(svc) = self.services.get(k) else {
            return Vec::new();
        };
        let keys = self.slices_by_service.get(k).map_or(&[][..], Vec::as_slice);
        self.frontends_with(svc, keys, default_affinity_timeout)
    }

    /// The frontends of `svc`, whose slices are `slice_keys`.
    fn frontends_with(
        &self,
        svc: &Svc,
        slice_keys: &[Key],
        default_affinity_timeout: u32,
    ) -> Vec<Frontend> {
        let slices: Vec<&Slice> = slice_keys
            .iter()
            .filter_map(|sk| self.slices.get(sk))
            .collect();
        desired::frontends(svc, &slices, self.rules(default_affinity_timeout))
    }

    /// The frontends of each of `services` (ascending keys, as the store
    /// iterates), their slices found by walking the slice index alongside
    /// instead of searching it per Service (two string-keyed B-tree
    /// searches per Service were a tenth of a 10,000-Service table).
    fn frontends_in_order(
        &self,
        services: &[(&ServiceKey, &Svc)],
        default_affinity_timeout: u32,
    ) -> Vec<Vec<Frontend>> {
        let Some((first, _)) = services.first() else {
            return Vec::new();
        };
        let mut index = self
            .slices_by_service
            .range::<ServiceKey, _>((*first).clone()..)
            .peekable();
        services
            .iter()
            .map(|(k, svc)| {
                while index.next_if(|(ik, _)| ik < k).is_some() {}
                let keys = match index.peek() {
                    Some((ik, v)) if ik == k => v.as_slice(),
                    _ => &[],
                };
                self.frontends_with(svc, keys, default_affinity_timeout)
            })
            .collect()
    }
}

/// A full pass builds its table on two threads from this many Services.
const PARALLEL_TABLE_FROM: usize = 2048;

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
    /// Bumped by every change of the stores.
    generation: AtomicU64,
    /// The flow names of a generation ([`Watched::flow_names`]).
    names: Mutex<Option<(u64, Arc<crate::flows::FlowNames>)>>,
    /// The steps of the agent's start the watchers finish.
    pub startup: Arc<crate::startup::Timeline>,
}

impl Watched {
    /// Both initial lists are complete.
    pub fn synced(&self) -> bool {
        self.stores
            .lock()
            .map(|s| s.services_synced && s.slices_synced && !s.node_pending)
            .unwrap_or(false)
    }

    /// The Node was read, failed to be read, or is not waited for: what
    /// depends on its addresses alone can be done before the lists are in.
    pub fn node_settled(&self) -> bool {
        self.stores.lock().map(|s| !s.node_pending).unwrap_or(false)
    }

    /// The Node this agent serves; with `wait_for_zone`, the first pass waits
    /// until [`Watched::set_zone`] is called once (the Node was read).
    pub fn set_node(&self, node: &str, wait_for_zone: bool) {
        self.with(|s| {
            if s.node != node {
                s.node = node.to_string();
                s.dirty.full = true;
            }
            s.node_pending = wait_for_zone;
        });
    }

    /// The Node's zone label, as read (None: no label). A change rebuilds
    /// everything (zone hints).
    pub fn set_zone(&self, zone: Option<String>) {
        self.with(|s| {
            if s.zone != zone {
                s.zone = zone;
                s.dirty.full = true;
            }
            s.node_pending = false;
        });
    }

    /// The Node's addresses NodePorts are served on, as read. A change
    /// rebuilds everything.
    pub fn set_node_addresses(&self, ips: Vec<IpAddr>) {
        self.with(|s| {
            if s.node_ips != ips {
                s.node_ips = ips;
                s.dirty.full = true;
            }
        });
    }

    /// What this agent serves now ([`desired::served_with`]). A change
    /// recomputes the unserved Services (a full pass).
    pub fn set_served(&self, served: BTreeSet<Feature>) {
        self.with(|s| {
            if s.served.as_ref() != Some(&served) {
                s.served = Some(served);
                s.dirty.full = true;
            }
        });
    }

    /// (`spec.healthCheckNodePort`, Service) of every Service a proxy serves
    /// with `externalTrafficPolicy: Local` and a health check port.
    pub fn health_check_services(&self) -> Vec<(u16, ServiceKey)> {
        let Ok(s) = self.stores.lock() else {
            return Vec::new();
        };
        // Called after every pass: the cheap field tests first.
        s.services
            .iter()
            .filter_map(|(k, svc)| {
                if svc.external_traffic_policy.as_deref() != Some("Local") {
                    return None;
                }
                let port = u16::try_from(svc.health_check_node_port?).ok()?;
                (port > 0 && svc.shape().skipped().is_none()).then(|| (port, k.clone()))
            })
            .collect()
    }

    /// What this agent serves now.
    pub fn served(&self) -> BTreeSet<Feature> {
        self.stores
            .lock()
            .ok()
            .and_then(|s| s.served.clone())
            .unwrap_or_else(desired::served)
    }

    /// Every address of every Service (ClusterIPs, externalIPs,
    /// LoadBalancer ingress IPs), served or not: what kube-proxy's IPVS mode
    /// made virtual servers of ([`service_addresses`]).
    pub fn service_addresses(&self) -> BTreeSet<IpAddr> {
        self.stores
            .lock()
            .map(|s| s.services.values().flat_map(service_addresses).collect())
            .unwrap_or_default()
    }

    /// Every `nodePort` and `healthCheckNodePort` of the Services as last
    /// listed (kube-proxy's IPVS virtual servers on node addresses use them).
    pub fn node_ports(&self) -> BTreeSet<u16> {
        self.stores
            .lock()
            .map(|s| s.services.values().flat_map(node_ports).collect())
            .unwrap_or_default()
    }

    /// The node addresses as last read.
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        self.stores
            .lock()
            .map(|s| s.node_ips.clone())
            .unwrap_or_default()
    }

    /// The Node could not be read: the first pass goes ahead without a zone
    /// (hints then fall back to all endpoints, as kube-proxy does for a Node
    /// without the label); a zone read later triggers a full pass.
    pub fn node_read_failed(&self) {
        self.with(|s| s.node_pending = false);
    }

    /// The zone as last read.
    pub fn zone(&self) -> Option<String> {
        self.stores.lock().ok().and_then(|s| s.zone.clone())
    }

    /// What each of `keys` needs that this agent does not serve (None: served,
    /// not for a proxy, or gone).
    pub fn unserved_of<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k ServiceKey>,
    ) -> Vec<(ServiceKey, Option<Vec<Feature>>)> {
        match self.stores.lock() {
            Ok(s) => keys
                .into_iter()
                .map(|k| {
                    let served = s.served.clone().unwrap_or_else(desired::served);
                    (
                        k.clone(),
                        s.services
                            .get(k)
                            .and_then(|svc| desired::unserved_of(svc, &served)),
                    )
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The LB ingress entries no proxy captures, as `ns/name: entry (why)`.
    pub fn lb_ingress_left(&self) -> Vec<String> {
        match self.stores.lock() {
            Ok(s) => s
                .services
                .iter()
                .flat_map(|((ns, n), svc)| {
                    desired::lb_ingress_left_of(svc)
                        .into_iter()
                        .map(move |e| format!("{ns}/{n}: {e}"))
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Every Service this agent cannot fully serve, with what it lacks.
    pub fn unserved(&self) -> BTreeMap<ServiceKey, Vec<Feature>> {
        match self.stores.lock() {
            Ok(s) => {
                let served = s.served.clone().unwrap_or_else(desired::served);
                s.services
                    .iter()
                    .filter_map(|(k, svc)| {
                        desired::unserved_of(svc, &served).map(|m| (k.clone(), m))
                    })
                    .collect()
            }
            Err(_) => BTreeMap::new(),
        }
    }

    /// Builds the desired table from the current stores (the whole table at
    /// once: [`desired::build`]'s result).
    pub fn desired(&self, default_affinity_timeout: u32) -> DesiredTable {
        self.service_table(default_affinity_timeout).table()
    }

    /// What changed since the last call (and resets it).
    pub fn take_dirty(&self) -> Dirty {
        self.stores
            .lock()
            .map(|mut s| std::mem::take(&mut s.dirty))
            .unwrap_or(Dirty {
                full: true,
                ..Dirty::default()
            })
    }

    /// The desired frontends of every Service, per Service (a full pass).
    pub fn service_table(&self, default_affinity_timeout: u32) -> ServiceTable {
        if let Ok(s) = self.stores.lock() {
            let keys: Vec<(&ServiceKey, &Svc)> = s.services.iter().collect();
            let of = |ks: &[(&ServiceKey, &Svc)]| -> Vec<Vec<Frontend>> {
                s.frontends_in_order(ks, default_affinity_timeout)
            };
            // Each Service's frontends are its own (its object and its
            // slices): the larger half of a full pass's table is built on a
            // second thread (0.5 of the first pass's 4 s at 100k Services,
            // one core, before), then entered in key order.
            // Without a second thread (a pids limit), all on this one.
            let built: Vec<Vec<Frontend>> = if keys.len() >= PARALLEL_TABLE_FROM {
                let (a, b) = keys.split_at(keys.len() / 2);
                std::thread::scope(|sc| {
                    let second = std::thread::Builder::new().spawn_scoped(sc, || of(b));
                    let mut v = of(a);
                    match second.map(|h| h.join()) {
                        Ok(Ok(w)) => v.extend(w),
                        _ => v.extend(of(b)),
                    }
                    v
                })
            } else {
                of(&keys)
            };
            return ServiceTable::from_sorted(
                keys.into_iter()
                    .zip(built)
                    .map(|((k, _), fes)| (k.clone(), fes))
                    .collect(),
            );
        }
        ServiceTable::default()
    }

    /// The desired frontends of each of `keys` (empty for a Service that is
    /// gone).
    pub fn frontends_of(
        &self,
        keys: &BTreeSet<ServiceKey>,
        default_affinity_timeout: u32,
    ) -> Vec<(ServiceKey, Vec<Frontend>)> {
        match self.stores.lock() {
            Ok(s) => keys
                .iter()
                .map(|k| (k.clone(), s.frontends_of(k, default_affinity_timeout)))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A Service was added or changed (as a watch event does).
    pub fn apply_service(&self, o: Service) {
        self.with(|s| s.apply_service(o));
    }

    /// A Service was deleted.
    pub fn delete_service(&self, o: &Service) {
        self.with(|s| s.delete_service(o));
    }

    /// An EndpointSlice was added or changed.
    pub fn apply_slice(&self, o: EndpointSlice) {
        self.with(|s| s.apply_slice(o));
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&self, o: &EndpointSlice) {
        self.with(|s| s.delete_slice(o));
    }

    /// Replaces every Service and EndpointSlice (a complete list) and marks
    /// both synced.
    pub fn replace_all(&self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let services = services
            .into_iter()
            .map(|o| {
                let l = Service::listed(o);
                (svc_key(&l.object), l)
            })
            .collect();
        let slices = slices
            .into_iter()
            .map(|o| {
                let l = EndpointSlice::listed(o);
                (slice_key(&l.object), l)
            })
            .collect();
        self.with(|s| s.replace_all(services, slices));
    }

    fn with<R>(&self, f: impl FnOnce(&mut Stores) -> R) -> Option<R> {
        let r = self.stores.lock().ok().map(|mut s| {
            let r = f(&mut s);
            self.generation.fetch_add(1, Ordering::Relaxed);
            r
        });
        self.changed.notify_one();
        r
    }

    /// Names for flow events (Services by frontend, pods by backend
    /// address): built again only after the stores changed, so a watcher on
    /// a quiet large cluster costs no rebuild per second.
    pub fn flow_names(&self) -> Arc<crate::flows::FlowNames> {
        let Ok(stores) = self.stores.lock() else {
            return Arc::default();
        };
        let generation = self.generation.load(Ordering::Relaxed);
        let Ok(mut cached) = self.names.lock() else {
            return Arc::default();
        };
        match &*cached {
            Some((g, names)) if *g == generation => names.clone(),
            _ => {
                let names = Arc::new(crate::flows::FlowNames::build(
                    stores.services.values(),
                    stores.slices.values(),
                ));
                *cached = Some((generation, names.clone()));
                names
            }
        }
    }

    /// Loads a fixed set of objects (multi-document YAML of Services and
    /// EndpointSlices) instead of watching: tests and API-less operation.
    /// A `Node` document named like this agent's Node gives its zone and
    /// addresses (NodePorts); other Nodes are ignored.
    pub fn load_static(&self, path: &Path) -> Result<(), WatchError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WatchError::Read {
            path: p.clone(),
            source,
        })?;
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        let mut nodes: Vec<Node> = Vec::new();
        for (index, doc) in documents(&text).enumerate() {
            let perr = |message: String| WatchError::Parse {
                path: p.clone(),
                index,
                message,
            };
            match parse_document(doc).map_err(perr)? {
                Some(StaticObject::Service(s)) => {
                    services.insert(key(&*s), Service::listed(*s));
                }
                Some(StaticObject::Slice(s)) => {
                    slices.insert(key(&*s), EndpointSlice::listed(*s));
                }
                Some(StaticObject::Node(n)) => nodes.push(*n),
                None => {}
            }
        }
        self.with(|s| {
            if let Some(n) = nodes.iter().find(|n| n.name_any() == s.node) {
                s.zone = n.labels().get(ZONE_LABEL).cloned();
                s.node_ips = desired::node_addresses(n);
            }
            s.replace_all(services, slices);
        });
        Ok(())
    }
}

/// One object of a static file.
enum StaticObject {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// The documents of a multi-document YAML text: split at the `---` marker
/// lines (a line starting with `---` followed by a blank or its end is
/// always a document start in YAML, never content); what follows the
/// marker on its line belongs to the document.
fn documents(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let t = rest?;
        let mut at = 0;
        loop {
            let line_end = t[at..].find('\n').map(|i| at + i + 1);
            let line = &t[at..line_end.unwrap_or(t.len())];
            let marker =
                line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
            if marker && at > 0 {
                rest = Some(&t[at..]);
                return Some(&t[..at]);
            }
            match line_end {
                Some(e) => at = e,
                None => {
                    rest = None;
                    return Some(t);
                }
            }
        }
    })
    .map(|d| match d.strip_prefix("---") {
        Some(body) if body.chars().next().is_none_or(char::is_whitespace) => body,
        _ => d,
    })
}

/// The `kind` of a JSON document (everything else skipped unparsed).
#[derive(Deserialize)]
struct KindOnly<'a> {
    #[serde(borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// Parses one document of a static file: JSON straight into the object
/// (what `netboot-bench` and `kubectl get -o json` write; an order of
/// magnitude faster than YAML), anything else as YAML. None: an empty
/// document.
fn parse_document(doc: &str) -> Result<Option<StaticObject>, String> {
    if doc.trim_start().starts_with('{') {
        if let Ok(k) = serde_json::from_str::<KindOnly>(doc) {
            let e = |e: serde_json::Error| e.to_string();
            return match k.kind.as_deref() {
                Some("Service") => Ok(Some(StaticObject::Service(
                    serde_json::from_str(doc).map_err(e)?,
                ))),
                Some("EndpointSlice") => Ok(Some(StaticObject::Slice(
                    serde_json::from_str(doc).map_err(e)?,
                ))),
                Some("Node") => Ok(Some(StaticObject::Node(
                    serde_json::from_str(doc).map_err(e)?,
                ))),
                other => Err(format!("unexpected kind {other:?}")),
            };
        }
    }
    let e = |e: serde_yaml::Error| e.to_string();
    let v = serde_yaml::from_str::<serde_yaml::Value>(doc).map_err(e)?;
    match v.get("kind").and_then(|k| k.as_str()) {
        Some("Service") => Ok(Some(StaticObject::Service(
            serde_yaml::from_value(v).map_err(e)?,
        ))),
        Some("EndpointSlice") => Ok(Some(StaticObject::Slice(
            serde_yaml::from_value(v).map_err(e)?,
        ))),
        Some("Node") => Ok(Some(StaticObject::Node(
            serde_yaml::from_value(v).map_err(e)?,
        ))),
        None if v.is_null() => Ok(None),
        other => Err(format!("unexpected kind {other:?}")),
    }
}

/// A Service's `nodePort`s and its `healthCheckNodePort`.
pub fn node_ports(svc: &Svc) -> Vec<u16> {
    svc.ports
        .iter()
        .filter_map(|p| p.node_port)
        .chain(svc.health_check_node_port)
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

/// A Service's ClusterIPs, externalIPs and LoadBalancer ingress IPs (those
/// that parse).
pub fn service_addresses(svc: &Svc) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = svc
        .cluster_ips
        .iter()
        .chain(svc.external_ips())
        .chain(svc.ingress().iter().filter_map(|i| i.ip.as_ref()))
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn key<K: Resource>(o: &K) -> Key {
    (
        o.namespace().unwrap_or_default().into(),
        o.name_any().into(),
    )
}

/// A stored Service's key, sharing its namespace and name.
fn svc_key(svc: &Svc) -> Key {
    (svc.namespace.clone(), svc.name.clone().unwrap_or_default())
}

/// A stored slice's key, sharing its namespace and name.
fn slice_key(s: &Slice) -> Key {
    (s.namespace.clone(), s.name.clone())
}

/// A relisted object is new, or not the version stored (`old`: the stored
/// one's resourceVersion; no resourceVersion: a static load, always new).
fn changed(old: Option<&Version>, new: Option<&Version>) -> bool {
    match (old, new) {
        (Some(old), Some(new)) => old != new,
        _ => true,
    }
}

/// An object of a (re)list as the stores keep it, with what the list needs
/// of the API object it came from (the stores keep less).
#[derive(Debug)]
pub struct Listed<T> {
    object: T,
    /// Its resourceVersion.
    version: Option<Version>,
    /// Its trigger time ([`crate::latency`]).
    trigger: Option<Triggered>,
}

impl<T> Listed<T> {
    /// A listed object under its key, with its resourceVersion and
    /// trigger time (a protobuf page decoded straight into `object`).
    fn keyed(
        key: Key,
        object: T,
        version: Option<Version>,
        trigger: Option<Triggered>,
    ) -> (Key, Self) {
        (
            key,
            Listed {
                object,
                version,
                trigger,
            },
        )
    }

    /// What the store keeps.
    pub fn object(&self) -> &T {
        &self.object
    }

    /// Its resourceVersion.
    pub fn version(&self) -> Option<&Version> {
        self.version.as_ref()
    }

    /// Its trigger time.
    pub fn trigger(&self) -> Option<&Triggered> {
        self.trigger.as_ref()
    }
}

/// Objects per page of a (re)list of Services or EndpointSlices, asked
/// for in protobuf ([`crate::listwatch`]). Each page is a request the API
/// server answers in turn, so fewer pages finish the lists sooner, and each
/// page's body and objects are held while it is decoded, so larger pages
/// raise the peak. At 10,000 Services × 10 endpoints (`netboot-bench
/// coldstart-api`, side by side, one malloc arena): pages of 5,000 were
/// ready in 1,117 ms with 74 MiB resident (peak 109) against 1,246 ms /
/// 72 MiB (peak 94) for pages of 2,000, and unpaged lists 1,088 ms / 88 MiB
/// (peak 136). kube-runtime's default is 500.
const LIST_PAGE_SIZE: u32 = 5000;

/// Which store a watcher feeds.
trait Stored: Resource + Clone + Sized {
    /// What the store keeps of it.
    type Kept: std::fmt::Debug;
    /// The object as a (re)list buffers it.
    fn listed(o: Self) -> Listed<Self::Kept>;
    fn apply(s: &mut Stores, o: Self);
    fn delete(s: &mut Stores, o: &Self);
    /// A complete list: replaces the store and marks it synced.
    fn replace(s: &mut Stores, all: BTreeMap<Key, Listed<Self::Kept>>);
}

impl Stored for Service {
    type Kept = Svc;
    fn listed(o: Self) -> Listed<Svc> {
        Listed {
            version: o.metadata.resource_version.as_deref().map(Version::new),
            trigger: latency::service_trigger(&o),
            object: Svc::from(o),
        }
    }
    fn apply(s: &mut Stores, o: Self) {
        s.apply_service(o);
    }
    fn delete(s: &mut Stores, o: &Self) {
        s.delete_service(o);
    }
    fn replace(s: &mut Stores, all: BTreeMap<Key, Listed<Svc>>) {
        s.replace_services(all);
        s.services_synced = true;
    }
}

/// The lean wrappers are stored as what they wrap.
macro_rules! stored_as {
    ($lean:ty, $inner:ty) => {
        impl Stored for $lean {
            type Kept = <$inner as Stored>::Kept;
            fn listed(o: Self) -> Listed<Self::Kept> {
                <$inner>::listed(o.0)
            }
            fn apply(s: &mut Stores, o: Self) {
                <$inner>::apply(s, o.0)
            }
            fn delete(s: &mut Stores, o: &Self) {
                <$inner>::delete(s, &o.0)
            }
            fn replace(s: &mut Stores, all: BTreeMap<Key, Listed<Self::Kept>>) {
                <$inner>::replace(s, all)
            }
        }
    };
}
stored_as!(LeanService, Service);
stored_as!(LeanSlice, EndpointSlice);

impl Listable for LeanService {
    type Listed = (Key, Listed<Svc>);
    fn listed(o: Self) -> Self::Listed {
        let l = <Self as Stored>::listed(o);
        (svc_key(&l.object), l)
    }
    fn protobuf_page(body: Bytes) -> Result<(Vec<Self::Listed>, ListMeta), pb::DecodeError> {
        let (items, meta) = pb::decode_services(body)?;
        let items = items
            .into_iter()
            .map(|l| {
                let key = svc_key(&l.svc);
                let version = l.svc.resource_version.clone();
                Listed::keyed(key, l.svc, version, l.trigger)
            })
            .collect();
        Ok((items, meta))
    }
}

impl Listable for LeanSlice {
    type Listed = (Key, Listed<Slice>);
    fn listed(o: Self) -> Self::Listed {
        let l = <Self as Stored>::listed(o);
        (slice_key(&l.object), l)
    }
    /// Straight into the compact slice ([`pb::slice`]).
    fn protobuf_page(body: Bytes) -> Result<(Vec<Self::Listed>, ListMeta), pb::DecodeError> {
        let (items, meta) = pb::slice::decode_list(body)?;
        let items = items
            .into_iter()
            .map(|l| {
                let key = slice_key(&l.slice);
                let version = l.slice.resource_version.clone();
                let trigger = l.trigger.as_deref().and_then(latency::slice_trigger_at);
                Listed::keyed(key, l.slice, version, trigger)
            })
            .collect();
        Ok((items, meta))
    }
}

impl Stored for EndpointSlice {
    type Kept = Slice;
    fn listed(o: Self) -> Listed<Slice> {
        Listed {
            version: o.metadata.resource_version.as_deref().map(Version::new),
            trigger: latency::slice_trigger(&o),
            object: Slice::from(o),
        }
    }
    fn apply(s: &mut Stores, o: Self) {
        s.apply_slice(o);
    }
    fn delete(s: &mut Stores, o: &Self) {
        s.delete_slice(o);
    }
    fn replace(s: &mut Stores, all: BTreeMap<Key, Listed<Slice>>) {
        s.replace_slices(all);
        s.slices_synced = true;
    }
}

async fn run_one<K>(client: Client, shared: Arc<Watched>)
where
    K: Stored + Listable<Listed = (Key, Listed<<K as Stored>::Kept>)> + Sync,
{
    let stream = listwatch::list_watch::<K>(client, LIST_PAGE_SIZE).default_backoff();
    consume(stream, &shared).await;
}

/// Applies watch events to the stores: a (re)list is buffered and swapped in
/// whole at `InitDone`; errors are counted (the stream itself backs off).
async fn consume<K, E, S>(stream: S, shared: &Watched)
where
    K: Stored + Listable<Listed = (Key, Listed<<K as Stored>::Kept>)>,
    E: std::fmt::Display,
    S: futures::Stream<Item = Result<listwatch::Event<K>, E>>,
{
    use listwatch::Event;
    futures::pin_mut!(stream);
    // A (re)list is kept compact as it arrives, not as API objects; in
    // arrival order (the API server lists by key), the map built once at
    // the end from the sorted run instead of a string-keyed search per
    // object (a tenth of the list's CPU at 10,000 slices).
    let mut buffer: Option<Vec<(Key, Listed<K::Kept>)>> = None;
    let mut list_began = std::time::Instant::now();
    let mut lists = 0u64;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => {
                buffer = Some(Vec::new());
                list_began = std::time::Instant::now();
            }
            Ok(Event::InitApply((k, o))) => {
                buffer.get_or_insert_with(Vec::new).push((k, o));
            }
            Ok(Event::InitDone) => {
                // Sorted stably, equal keys deduplicated keeping the last:
                // what inserting them one by one gives.
                let full: BTreeMap<Key, Listed<K::Kept>> =
                    buffer.take().unwrap_or_default().into_iter().collect();
                let (kind, objects) = (K::kind(&()), full.len());
                // Recorded first: the swap may start the first pass at once.
                shared.startup.listed(&kind, objects);
                shared.with(|s| K::replace(s, full));
                let took_ms = list_began.elapsed().as_millis() as u64;
                if lists == 0 {
                    tracing::info!(%kind, objects, took_ms, "listed");
                } else {
                    tracing::info!(%kind, objects, took_ms, "relisted (the watch had to start over)");
                }
                lists += 1;
            }
            Ok(Event::Apply(o)) => {
                shared.with(|s| K::apply(s, o));
            }
            Ok(Event::Delete(o)) => {
                shared.with(|s| K::delete(s, &o));
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

/// Spawns the Service and EndpointSlice watchers (all namespaces), which
/// decode only what the datapath reads ([`crate::lean`]).
pub fn spawn(client: Client, shared: Arc<Watched>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(run_one::<LeanService>(client.clone(), shared.clone())),
        tokio::spawn(run_one::<LeanSlice>(client, shared)),
    ]
}

/// Watches this agent's own Node (field selector on its name) for its zone
/// label; a change triggers a full pass. Errors are counted and retried
/// with backoff like the other watchers.
pub fn spawn_node(
    client: Client,
    shared: Arc<Watched>,
    node: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Apply(n) | Event::InitApply(n)) => {
                    listed = true;
                    shared.startup.mark(|s| &mut s.node_read_ms);
                    shared.set_node_addresses(desired::node_addresses(&n));
                    shared.set_zone(n.labels().get(ZONE_LABEL).cloned());
                }
                Ok(Event::Init) => listed = false,
                // No such Node: no zone, and the first pass need not wait.
                Ok(Event::InitDone) if !listed => {
                    shared.startup.mark(|s| &mut s.node_read_ms);
                    shared.set_zone(None);
                }
                Ok(Event::Delete(_) | Event::InitDone) => {}
                Err(e) => {
                    shared.node_read_failed();
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, %node, "watch Node error, retrying with backoff");
                    if let Ok(mut l) = shared.last_error.lock() {
                        *l = format!("watch Node/{node}: {e}");
                    }
                }
            }
        }
    })
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

    #[test]
    fn service_addresses_are_every_ip_kube_proxy_made_a_virtual_server_of() {
        let s: Service = serde_yaml::from_str(
            "metadata: {name: lb, namespace: d}
spec:
  clusterIP: 10.96.5.8
  clusterIPs: [10.96.5.8, fd00:10:96::8]
  externalIPs: [198.51.100.4, not-an-ip]
  ports: [{port: 80}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {hostname: lb.example}]}}",
        )
        .unwrap();
        let got: Vec<String> = service_addresses(&Svc::from(&s))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            ["10.96.5.8", "192.0.2.10", "198.51.100.4", "fd00:10:96::8"]
        );
        let headless = svc("h", "None");
        assert_eq!(
            service_addresses(&Svc::from(&headless)),
            Vec::<IpAddr>::new()
        );
    }

    type Ev = listwatch::Event<LeanService>;

    fn ev(e: Ev) -> Result<Ev, String> {
        Ok(e)
    }

    /// A listed Service, as a list page gives it.
    fn init_apply(s: Service) -> Ev {
        Ev::InitApply(<LeanService as Listable>::listed(LeanService(s)))
    }

    fn apply(s: Service) -> Ev {
        Ev::Apply(LeanService(s))
    }

    #[tokio::test]
    async fn relist_is_swapped_in_only_when_complete() {
        let w = Arc::new(Watched::default());
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Ev, String>>();
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
                .map(|k| k.1.to_string())
                .collect()
        };

        // Initial list in progress: nothing visible, not synced.
        tx.unbounded_send(ev(Ev::Init)).unwrap();
        tx.unbounded_send(ev(init_apply(svc("a", "10.96.0.1"))))
            .unwrap();
        tx.unbounded_send(ev(init_apply(svc("b", "10.96.0.2"))))
            .unwrap();
        settle().await;
        assert!(!w.stores.lock().unwrap().services_synced);
        assert!(names(&w).is_empty());
        tx.unbounded_send(ev(Ev::InitDone)).unwrap();
        settle().await;
        assert_eq!(names(&w), vec!["a", "b"]);

        // An error, then a re-list in which "a" is gone: the last complete list stays until InitDone.
        tx.unbounded_send(Err("connection reset".to_string()))
            .unwrap();
        tx.unbounded_send(ev(Ev::Init)).unwrap();
        tx.unbounded_send(ev(init_apply(svc("b", "10.96.0.2"))))
            .unwrap();
        settle().await;
        assert_eq!(names(&w), vec!["a", "b"]);
        assert_eq!(w.errors.load(Ordering::Relaxed), 1);
        tx.unbounded_send(ev(Ev::InitDone)).unwrap();
        tx.unbounded_send(ev(apply(svc("c", "10.96.0.3")))).unwrap();
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

    fn slice(name: &str, svc: Option<&str>, ip: &str) -> EndpointSlice {
        let labels = svc
            .map(|s| format!(", labels: {{kubernetes.io/service-name: {s}}}"))
            .unwrap_or_default();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: d{labels}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]"
        ))
        .unwrap()
    }

    #[test]
    fn a_namespace_and_a_name_are_held_once_by_keys_objects_and_the_index() {
        // Why: at 1M Services the agent held each namespace and name up to
        // a dozen times (keys, objects, the slice index): a tenth of it.
        let w = Watched::default();
        w.replace_all(
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![slice("a-1", Some("a"), "10.0.0.1")],
        );
        // One by one too: a watch event takes the same path as a list.
        w.apply_service(svc("c", "10.96.0.3"));
        w.apply_slice(slice("c-1", Some("c"), "10.0.0.3"));
        let s = w.stores.lock().unwrap();
        let first = s.services.keys().next().unwrap().0.clone();
        for (k, o) in &s.services {
            assert!(Arc::ptr_eq(&k.0, &first), "{k:?}: its own namespace");
            assert!(Arc::ptr_eq(&k.0, &o.namespace), "{k:?}");
            assert!(Arc::ptr_eq(&k.1, o.name.as_ref().unwrap()), "{k:?}");
        }
        assert_eq!(s.slices.len(), 2);
        for (k, o) in &s.slices {
            assert!(Arc::ptr_eq(&k.0, &first), "{k:?}: its own namespace");
            assert!(Arc::ptr_eq(&k.0, &o.namespace), "{k:?}");
            assert!(Arc::ptr_eq(&k.1, &o.name), "{k:?}");
        }
        assert_eq!(s.slices_by_service.len(), 2);
        for (svc, slices) in &s.slices_by_service {
            assert!(Arc::ptr_eq(&svc.0, &first), "{svc:?}");
            let stored = s.slices.get_key_value(&slices[0]).unwrap().0;
            assert!(Arc::ptr_eq(&slices[0].1, &stored.1), "{svc:?}");
            let label = s.slices[&slices[0]].service.as_ref().unwrap();
            assert!(Arc::ptr_eq(&svc.1, label), "{svc:?}");
        }
    }

    #[test]
    fn namespaces_nothing_holds_any_more_are_let_go() {
        let mut n = Namespaces::default();
        let kept: Name = "kept".into();
        let shared = n.intern(&kept);
        assert!(Arc::ptr_eq(&shared, &n.intern(&"kept".into())));
        // Namespaces that came and went (their objects deleted).
        for i in 0..10_000 {
            n.intern(&format!("gone-{i}").into());
        }
        assert!(n.set.len() <= 2 * 64 + 2, "{} namespaces kept", n.set.len());
        assert!(
            Arc::ptr_eq(&shared, &n.intern(&"kept".into())),
            "one still held was let go"
        );
    }

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names.iter().map(|n| ("d".into(), (*n).into())).collect()
    }

    #[test]
    fn flow_names_are_rebuilt_only_after_a_change() {
        // Why: a flow watcher asks every second; rebuilding 10k Services'
        // names each time cost a quiet large cluster CPU and the stores lock.
        let w = Watched::default();
        w.replace_all(vec![svc("a", "10.96.0.1")], vec![]);
        let first = w.flow_names();
        assert!(
            Arc::ptr_eq(&first, &w.flow_names()),
            "unchanged: the same names"
        );
        w.apply_service(svc("b", "10.96.0.2"));
        let second = w.flow_names();
        assert!(!Arc::ptr_eq(&first, &second), "a change: built again");
        let mut f = crate::flows::terminated_flow(
            &crate::sock_term::Destroyed {
                peer: "10.0.0.9:53".parse().unwrap(),
                frontend: "10.96.0.2:80".parse().unwrap(),
                family: 2,
                result: 0,
                cookie: 1,
                cgroup_id: 2,
                netns_cookie: 3,
            },
            Some(5),
            0,
        );
        f.proto = "tcp".into(); // svc()'s port is TCP
        second.resolve(&mut f);
        assert_eq!(f.service.as_deref(), Some("d/b"), "{f:?}");
    }

    #[test]
    fn the_first_pass_waits_for_the_nodes_zone_and_a_zone_change_is_a_full_pass() {
        let w = Watched::default();
        w.replace_all(vec![svc("a", "10.96.0.1")], vec![]);
        w.set_node("node-a", true);
        assert!(!w.synced(), "waits for the Node's zone");
        w.set_zone(Some("zone-a".into()));
        assert!(w.synced());
        w.take_dirty();
        w.set_zone(Some("zone-a".into()));
        assert!(w.take_dirty().is_empty(), "same zone: nothing to do");
        w.set_zone(Some("zone-b".into()));
        assert!(w.take_dirty().full);
        assert_eq!(w.zone().as_deref(), Some("zone-b"));
        // A Node that cannot be read does not hold the agent back.
        let w = Watched::default();
        w.replace_all(vec![], vec![]);
        w.set_node("node-a", true);
        w.node_read_failed();
        assert!(w.synced());
    }

    #[test]
    fn node_addresses_come_from_the_node_and_a_change_is_a_full_pass() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.yaml");
        std::fs::write(
            &p,
            "kind: Node
metadata: {name: other, labels: {topology.kubernetes.io/zone: z-other}}
status: {addresses: [{type: InternalIP, address: 192.168.1.99}]}
---
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z-a}}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
---
kind: Service
metadata: {name: np, namespace: d}
spec: {type: NodePort, clusterIP: 10.96.0.9, ports: [{port: 80, nodePort: 30080}]}
",
        )
        .unwrap();
        let w = Watched::default();
        w.set_node("node-a", false);
        w.load_static(&p).unwrap();
        let ip: IpAddr = "192.168.1.10".parse().unwrap();
        assert_eq!(w.node_addresses(), vec![ip]);
        assert_eq!(w.zone().as_deref(), Some("z-a"));
        // ClusterIP, the node address and 127.0.0.1.
        assert_eq!(w.desired(10800).frontends.len(), 3);
        w.take_dirty();
        w.set_node_addresses(vec![ip]);
        assert!(w.take_dirty().is_empty(), "same addresses: nothing to do");
        w.set_node_addresses(vec![]);
        assert!(w.take_dirty().full);
        assert_eq!(w.desired(10800).frontends.len(), 1);
    }

    #[test]
    fn events_mark_the_services_they_affect_dirty() {
        let w = Watched::default();
        w.replace_all(
            vec![svc("a", "10.96.0.1")],
            vec![slice("a-1", Some("a"), "10.244.0.1")],
        );
        assert!(w.take_dirty().full, "a complete list is a full pass");
        assert!(w.take_dirty().is_empty(), "taking resets");

        w.apply_service(svc("b", "10.96.0.2"));
        w.delete_service(&svc("c", "10.96.0.3"));
        assert_eq!(w.take_dirty().services, keys(&["b", "c"]));

        // A slice: the Service its label names.
        w.apply_slice(slice("b-1", Some("b"), "10.244.0.2"));
        assert_eq!(w.take_dirty().services, keys(&["b"]));
        // Its label moves to another Service: both.
        w.apply_slice(slice("b-1", Some("c"), "10.244.0.2"));
        assert_eq!(w.take_dirty().services, keys(&["b", "c"]));
        // Deleted (the event may carry a stale label): the stored one's Service too.
        w.delete_slice(&slice("b-1", Some("x"), "10.244.0.2"));
        assert_eq!(w.take_dirty().services, keys(&["c", "x"]));
        // Without a label: nothing to rebuild.
        w.apply_slice(slice("lone", None, "10.244.0.9"));
        assert!(w.take_dirty().is_empty());
        // The label removed: the Service it named.
        w.apply_slice(slice("a-1", None, "10.244.0.1"));
        assert_eq!(w.take_dirty().services, keys(&["a"]));
    }

    #[test]
    fn per_service_frontends_follow_the_slice_index() {
        let w = Watched::default();
        w.replace_all(
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![slice("a-1", Some("a"), "10.244.0.1")],
        );
        let backends = |w: &Watched, n: &str| -> usize {
            w.frontends_of(&keys(&[n]), 10800)
                .iter()
                .flat_map(|(_, f)| f.iter().map(|f| f.backends.len()))
                .sum()
        };
        assert_eq!(backends(&w, "a"), 1);
        w.apply_slice(slice("a-2", Some("a"), "10.244.0.2"));
        assert_eq!(backends(&w, "a"), 2);
        w.apply_slice(slice("a-2", Some("b"), "10.244.0.2"));
        assert_eq!((backends(&w, "a"), backends(&w, "b")), (1, 1));
        w.delete_slice(&slice("a-1", Some("a"), "10.244.0.1"));
        assert_eq!(backends(&w, "a"), 0);
        assert_eq!(w.service_table(10800).table(), w.desired(10800));
        // A Service that is gone has no frontends.
        w.delete_service(&svc("b", "10.96.0.2"));
        assert!(w.frontends_of(&keys(&["b"]), 10800)[0].1.is_empty());
    }

    #[test]
    fn a_table_built_on_two_threads_is_the_one_built_service_by_service() {
        let n = PARALLEL_TABLE_FROM + 101;
        let names: Vec<String> = (0..n).map(|i| format!("s{i:05}")).collect();
        let ip = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let mut svcs: Vec<Service> = names
            .iter()
            .enumerate()
            .map(|(i, s)| svc(s, &ip(i)))
            .collect();
        // Two Services claiming one address, one in each half: the older
        // claim decides in both builds.
        svcs.push(svc("zz-dup", &ip(3)));
        let slices: Vec<EndpointSlice> = names
            .iter()
            .enumerate()
            .map(|(i, s)| {
                slice(
                    &format!("{s}-1"),
                    Some(s),
                    &format!("10.244.{}.{}", i / 250, i % 250 + 1),
                )
            })
            .collect();
        let w = Watched::default();
        w.replace_all(svcs, slices);
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("zz-dup");
        let mut serial = ServiceTable::default();
        for (k, fes) in w.frontends_of(&keys(&all), 10800) {
            serial.set(k, fes);
        }
        let built = w.service_table(10800);
        assert_eq!(built.len(), serial.len());
        assert_eq!(built.table(), serial.table());
        assert_eq!(built.table().frontends.len(), n);
    }

    #[tokio::test]
    async fn relist_marks_a_full_pass() {
        let w = Arc::new(Watched::default());
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Ev, String>>();
        tx.unbounded_send(ev(apply(svc("a", "10.96.0.1")))).unwrap();
        drop(tx);
        consume(rx, &w).await;
        assert_eq!(w.take_dirty().services, keys(&["a"]));
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Ev, String>>();
        for e in [Ev::Init, init_apply(svc("b", "10.96.0.2")), Ev::InitDone] {
            tx.unbounded_send(ev(e)).unwrap();
        }
        drop(tx);
        consume(rx, &w).await;
        assert!(w.take_dirty().full);
    }
}
