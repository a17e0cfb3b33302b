//! List then watch, as kube-runtime's watcher does, with the list asked
//! for in protobuf ([`crate::pb`]).
//!
//! The stream is the watcher's ([`Event`]): `Init`, an `InitApply` per
//! listed object, `InitDone`, then `Apply`/`Delete` from a watch that
//! starts at the list's resourceVersion, and errors as [`watcher::Error`]
//! so that kube-runtime's backoff applies unchanged. Like the watcher: the list is
//! paged, a watch that ends is resumed from the last version seen
//! (bookmarks included), and a `410 Gone` starts over with a new list.
//!
//! Only the list differs. Its pages ask for
//! `application/vnd.kubernetes.protobuf, application/json` and are decoded
//! by the answer's `Content-Type`, so an API server (or a proxy) that
//! answers JSON still works, and a listed object comes already in the form
//! the stores keep ([`Listable::Listed`]): a protobuf page may be decoded
//! straight into it. The watch stays JSON: its events are single objects,
//! and kube's watch decoding is kept.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::core::ObjectList;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::pb::{self, ListMeta};

/// An object listed in protobuf or JSON and watched in JSON.
pub trait Listable:
    Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug + Send + 'static
{
    /// What a list keeps of each object.
    type Listed: Send + 'static;
    /// An object of a JSON page, as a list keeps it.
    fn listed(o: Self) -> Self::Listed;
    /// Decodes a protobuf page into what a list keeps.
    fn protobuf_page(body: Bytes) -> Result<(Vec<Self::Listed>, ListMeta), pb::DecodeError>;
}

/// kube-runtime's `watcher::Event`, with a list's objects in the form a
/// list keeps ([`Listable::Listed`]).
#[derive(Debug)]
pub enum Event<K: Listable> {
    /// A (re)list begins.
    Init,
    /// An object of it.
    InitApply(K::Listed),
    /// The list is complete.
    InitDone,
    /// Added or changed (the watch).
    Apply(K),
    /// Deleted (the watch).
    Delete(K),
}

/// How a list is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Protobuf, JSON accepted too.
    Protobuf,
    /// JSON only.
    Json,
}

/// One page: its objects, the list's resourceVersion, the next page's token.
pub struct Page<K: Listable> {
    /// The objects.
    pub items: Vec<K::Listed>,
    /// `metadata.resourceVersion` (None: empty).
    pub resource_version: Option<String>,
    /// `metadata.continue` (None: the last page).
    pub continue_token: Option<String>,
    /// Whether it came in protobuf.
    pub protobuf: bool,
}

/// The parameters of every page: the watch cache's state, not older than
/// the last one seen (kube-runtime's default, `resourceVersion=0`).
fn list_params(limit: u32, continue_token: Option<String>) -> ListParams {
    ListParams {
        resource_version: Some("0".into()),
        version_match: Some(VersionMatch::NotOlderThan),
        limit: Some(limit),
        continue_token,
        ..Default::default()
    }
}

/// Fetches and decodes one page.
pub async fn page<K: Listable>(
    client: &Client,
    encoding: Encoding,
    limit: u32,
    continue_token: Option<String>,
) -> kube::Result<Page<K>> {
    let url = K::url_path(&(), None);
    let mut req = kube::core::Request::new(url)
        .list(&list_params(limit, continue_token))
        .map_err(kube::Error::BuildRequest)?;
    let accept = match encoding {
        Encoding::Protobuf => "application/vnd.kubernetes.protobuf, application/json",
        Encoding::Json => "application/json",
    };
    req.headers_mut()
        .insert(http::header::ACCEPT, http::HeaderValue::from_static(accept));
    req.extensions_mut().insert("list");
    let res = client.send(req.map(kube::client::Body::from)).await?;
    let status = res.status();
    let protobuf = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(pb::MEDIA_TYPE));
    let body = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(kube::Error::Api(Box::new(pb::error_status(
            status.as_u16(),
            body,
        ))));
    }
    let (items, resource_version, continue_token) = if protobuf {
        let (items, meta) =
            K::protobuf_page(body).map_err(|e| kube::Error::Service(Box::new(e)))?;
        (items, meta.resource_version, meta.continue_)
    } else {
        let list: ObjectList<K> = serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?;
        (
            list.items.into_iter().map(K::listed).collect(),
            list.metadata.resource_version,
            list.metadata.continue_,
        )
    };
    Ok(Page {
        items,
        resource_version: resource_version.filter(|s| !s.is_empty()),
        continue_token: continue_token.filter(|s| !s.is_empty()),
        protobuf,
    })
}

enum State<K: Listable> {
    /// A list is to begin.
    Empty,
    /// A list is under way.
    Paging { continue_token: Option<String> },
    /// Listed (or the watch ended): a watch is to start at this version.
    Listed { version: String },
    /// Watching.
    Watching {
        version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<K>>>,
    },
}

type Step<K> = (Vec<Result<Event<K>, watcher::Error>>, State<K>);

async fn step<K: Listable>(api: &Api<K>, client: &Client, limit: u32, state: State<K>) -> Step<K> {
    match state {
        State::Empty => (
            vec![Ok(Event::Init)],
            State::Paging {
                continue_token: None,
            },
        ),
        State::Paging { continue_token } => {
            match page::<K>(client, Encoding::Protobuf, limit, continue_token).await {
                Ok(p) => {
                    let mut out: Vec<_> = p
                        .items
                        .into_iter()
                        .map(|o| Ok(Event::InitApply(o)))
                        .collect();
                    match (p.continue_token, p.resource_version) {
                        (Some(t), _) => (
                            out,
                            State::Paging {
                                continue_token: Some(t),
                            },
                        ),
                        (None, Some(version)) => {
                            out.push(Ok(Event::InitDone));
                            (out, State::Listed { version })
                        }
                        (None, None) => {
                            (vec![Err(watcher::Error::NoResourceVersion)], State::Empty)
                        }
                    }
                }
                // Starts over, with a new Init (an expired continue token
                // included: the buffer of the partial list is dropped).
                Err(e) => (
                    vec![Err(watcher::Error::InitialListFailed(e))],
                    State::Empty,
                ),
            }
        }
        State::Listed { version } => {
            let wp = WatchParams::default();
            match api.watch(&wp, &version).await {
                Ok(s) => (
                    Vec::new(),
                    State::Watching {
                        version,
                        stream: s.boxed(),
                    },
                ),
                Err(e) => {
                    // A watch refused with 410 before it began (the API
                    // server usually sends it as the stream's first event)
                    // is as stale: list again rather than retry the
                    // version for ever.
                    let next = if matches!(&e, kube::Error::Api(r) if r.code == 410) {
                        State::Empty
                    } else {
                        State::Listed { version }
                    };
                    (vec![Err(watcher::Error::WatchStartFailed(e))], next)
                }
            }
        }
        State::Watching {
            version,
            mut stream,
        } => match stream.next().await {
            Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                match o.resource_version() {
                    Some(v) if !v.is_empty() => (
                        vec![Ok(Event::Apply(o))],
                        State::Watching { version: v, stream },
                    ),
                    _ => (vec![Err(watcher::Error::NoResourceVersion)], State::Empty),
                }
            }
            Some(Ok(WatchEvent::Deleted(o))) => match o.resource_version() {
                Some(v) if !v.is_empty() => (
                    vec![Ok(Event::Delete(o))],
                    State::Watching { version: v, stream },
                ),
                _ => (vec![Err(watcher::Error::NoResourceVersion)], State::Empty),
            },
            Some(Ok(WatchEvent::Bookmark(b))) => (
                Vec::new(),
                State::Watching {
                    version: b.metadata.resource_version,
                    stream,
                },
            ),
            Some(Ok(WatchEvent::Error(e))) => {
                // 410 Gone: the version is too old to watch from; list again.
                let next = if e.code == 410 {
                    State::Empty
                } else {
                    State::Watching { version, stream }
                };
                (vec![Err(watcher::Error::WatchError(e))], next)
            }
            Some(Err(e)) => (
                vec![Err(watcher::Error::WatchFailed(e))],
                State::Watching { version, stream },
            ),
            None => (Vec::new(), State::Listed { version }),
        },
    }
}

/// The watcher's event stream for all `K` of the cluster, listed in pages
/// of `limit` in protobuf.
pub fn list_watch<K: Listable>(
    client: Client,
    limit: u32,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send {
    let api: Api<K> = Api::all(client.clone());
    futures::stream::unfold(
        (State::Empty, api, client),
        move |(state, api, client)| async move {
            let (events, next) = step(&api, &client, limit, state).await;
            Some((futures::stream::iter(events), (next, api, client)))
        },
    )
    .flatten()
}
