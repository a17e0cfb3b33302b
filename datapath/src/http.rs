//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/metrics`,
//! `/v1/status`; and the small client `status --agent` uses.
//!
//! Two listeners share one server loop ([`serve`]): the health listener
//! (`--listen`, loopback by default: every route) and the optional metrics
//! listener (`--metrics-listen`: `/metrics` only). Each has its own
//! [`Limits`], so a flood of one cannot starve the other: a connection cap
//! (excess connections wait in the kernel's accept queue and cost the agent
//! no memory), a header read timeout (slow-loris), a whole-connection
//! timeout, a header size and count limit, one request per connection, and
//! request bodies are never read.
//!
//! `/v1/flows` (health listener only, when the agent has a flow hub) is the
//! one long-lived answer: newline-delimited JSON flows, chunked, until the
//! client goes away; it is exempt from the whole-connection timeout and
//! capped separately ([`crate::flows::FlowOptions::max_watchers`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::flows::{FlowFilter, FlowHub};
use crate::status::Status;

/// A response body: whole (every route) or streamed (`/v1/flows`).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Errors of serving or fetching.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Listening failed.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the agent failed.
    #[error("connect to agent {addr}: {source}")]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// HTTP protocol error.
    #[error("agent {addr}: {source}")]
    Protocol {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// Bad request construction.
    #[error("agent {addr}: {message}")]
    Request {
        /// Address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// Non-JSON answer.
    #[error("agent {addr}: bad /v1/status: {source}")]
    Decode {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Produces the current status (counters read at call time).
pub trait StatusSource: Send + Sync + 'static {
    /// A fresh snapshot.
    fn status(&self) -> Status;

    /// `/readyz`: only what readiness needs. Probes come often (the
    /// kubelet, a rollout's checks) and a full [`StatusSource::status`]
    /// reads every counter, per-Service counter and link from the kernel.
    fn readiness(&self) -> (StatusCode, String) {
        readyz(&self.status())
    }
}

/// A response with a body and its content type.
pub fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// `/healthz`, `/readyz`, `/metrics`, `/v1/status`, `/v1/flows` (the loopback listener).
    All,
    /// `/metrics` only (the listener Prometheus scrapes).
    MetricsOnly,
}

/// Limits of one listener. `Default` is what the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time allowed for the request line and headers (slow-loris).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole connection (one request and its response).
    pub request_timeout: Duration,
    /// Request line plus headers, in bytes (larger: 431 and close).
    pub max_header_bytes: usize,
    /// Number of request headers (more: 431 and close).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            max_headers: 32,
        }
    }
}

/// The answer to `/readyz` (see datapath/README.md, "Readiness").
pub fn readyz(st: &Status) -> (StatusCode, String) {
    if st.ready {
        (StatusCode::OK, "ready\n".into())
    } else if !st.synced {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "initial sync not complete\n".into(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "maps full: {} frontends and {} backends not programmed ({})\n",
                st.unprogrammed_frontends,
                st.unprogrammed_backends,
                st.map_pressure.join("; ")
            ),
        )
    }
}

fn route(
    method: &hyper::Method,
    path: &str,
    routes: Routes,
    src: &dyn StatusSource,
) -> Response<Full<Bytes>> {
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    if routes == Routes::MetricsOnly && path != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (code, body) = src.readiness();
            reply(code, "text/plain", body)
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            src.status().metrics(),
        ),
        "/v1/status" => match serde_json::to_string_pretty(&src.status()) {
            Ok(j) => reply(StatusCode::OK, "application/json", j),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds `addr`; returns the listener and its actual address (port 0 allowed).
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), HttpError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            addr: addr.into(),
            source,
        })?;
    let local = l.local_addr().map_err(|source| HttpError::Bind {
        addr: addr.into(),
        source,
    })?;
    Ok((l, local))
}

/// Serves `routes` on `listener` within `limits` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    src: Arc<dyn StatusSource>,
    routes: Routes,
    limits: Limits,
) {
    serve_with_flows(listener, src, routes, limits, None).await
}

/// As [`serve`], plus `/v1/flows` from `flows` when given and `routes` is
/// [`Routes::All`].
pub async fn serve_with_flows(
    listener: TcpListener,
    src: Arc<dyn StatusSource>,
    routes: Routes,
    limits: Limits,
    flows: Option<Arc<FlowHub>>,
) {
    let handler: Arc<Handler> =
        Arc::new(move |m: &hyper::Method, path: &str| route(m, path, routes, src.as_ref()));
    let flows = flows.filter(|_| routes == Routes::All);
    serve_inner(listener, handler, flows, limits).await
}

/// Answers one request from its method and path (bodies are never read).
pub type Handler = dyn Fn(&hyper::Method, &str) -> Response<Full<Bytes>> + Send + Sync;

/// Serves `handler` on `listener` within `limits` until the task is dropped
/// (the loop of every agent listener: connection cap, timeouts, header limits).
pub async fn serve_fn(listener: TcpListener, handler: Arc<Handler>, limits: Limits) {
    serve_inner(listener, handler, None, limits).await
}

/// `/v1/flows?service=ns/name&pod=ns/name&verdict=V&proto=P`: a stream of
/// flows, one JSON object per line; `streaming` is set once it starts.
fn flows_response(hub: &Arc<FlowHub>, query: &str, streaming: &AtomicBool) -> Response<Body> {
    let whole = |code, body: String| reply(code, "text/plain", body).map(|b| b.boxed_unsync());
    let filter = match FlowFilter::parse(query) {
        Ok(f) => f,
        Err(e) => return whole(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let sub = match hub.subscribe_for(&filter) {
        Ok(s) => s,
        Err(e) => return whole(StatusCode::TOO_MANY_REQUESTS, format!("{e}\n")),
    };
    streaming.store(true, Ordering::Relaxed);
    let heartbeat = hub.options().heartbeat;
    let start = tokio::time::Instant::now();
    let stream = futures::stream::unfold(
        (sub, filter, start),
        move |(mut sub, filter, mut last)| async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match tokio::time::timeout_at(last + heartbeat, sub.rx.recv()).await {
                    // Nothing written for a while: an empty line finds out
                    // whether the watcher is still there.
                    Err(_) => Bytes::from_static(b"\n"),
                    Ok(Ok(flow)) if filter.matches(&flow) => match serde_json::to_vec(&*flow) {
                        Ok(mut l) => {
                            l.push(b'\n');
                            Bytes::from(l)
                        }
                        Err(_) => continue,
                    },
                    Ok(Ok(_)) => continue,
                    Ok(Err(RecvError::Lagged(n))) => Bytes::from(format!("{{\"lost\":{n}}}\n")),
                    Ok(Err(RecvError::Closed)) => return None,
                };
                last = tokio::time::Instant::now();
                return Some((Ok::<_, Infallible>(Frame::data(line)), (sub, filter, last)));
            }
        },
    );
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn serve_inner(
    listener: TcpListener,
    handler: Arc<Handler>,
    flows: Option<Arc<FlowHub>>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    let builder = Arc::new(builder);
    loop {
        // A slot first: while all are taken, connections wait in the
        // kernel's accept queue instead of in the agent's memory.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let builder = builder.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let streaming = Arc::new(AtomicBool::new(false));
            let st = streaming.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let flows = flows.clone();
                let st = st.clone();
                async move {
                    let r = match flows.filter(|_| req.uri().path() == "/v1/flows") {
                        Some(hub) if req.method() == hyper::Method::GET => {
                            flows_response(&hub, req.uri().query().unwrap_or(""), &st)
                        }
                        _ => handler(req.method(), req.uri().path()).map(|b| b.boxed_unsync()),
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                _ = tokio::time::sleep(limits.request_timeout) => {
                    // A flow stream lives until its watcher goes away.
                    if streaming.load(Ordering::Relaxed) {
                        let _ = conn.await;
                    }
                }
            }
        });
    }
}

/// GETs `path` from the agent at `addr`; returns (status code, body).
pub async fn get(addr: &str, path: &str) -> Result<(u16, String), HttpError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.into(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HttpError::Protocol {
            addr: addr.into(),
            source,
        })?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header(hyper::header::HOST, addr)
        .body(Full::new(Bytes::new()))
        .map_err(|e| HttpError::Request {
            addr: addr.into(),
            message: e.to_string(),
        })?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|source| HttpError::Protocol {
            addr: addr.into(),
            source,
        })?;
    let code = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|source| HttpError::Protocol {
            addr: addr.into(),
            source,
        })?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// GETs `path` and hands each line of the answer to `line` as it arrives
/// (a streamed answer such as `/v1/flows`) until the agent ends it or `line`
/// returns false. A status other than 200: its text as a request error.
pub async fn get_lines(
    addr: &str,
    path: &str,
    mut line: impl FnMut(&str) -> bool,
) -> Result<(), HttpError> {
    let perr = |source| HttpError::Protocol {
        addr: addr.into(),
        source,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.into(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(perr)?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header(hyper::header::HOST, addr)
        .body(Full::new(Bytes::new()))
        .map_err(|e| HttpError::Request {
            addr: addr.into(),
            message: e.to_string(),
        })?;
    let res = sender.send_request(req).await.map_err(perr)?;
    let code = res.status();
    let mut body = res.into_body();
    if code != StatusCode::OK {
        let text = body.collect().await.map_err(perr)?.to_bytes();
        return Err(HttpError::Request {
            addr: addr.into(),
            message: format!("{path}: {code}: {}", String::from_utf8_lossy(&text).trim()),
        });
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(perr)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = buf.drain(..=nl).collect();
            if !line(String::from_utf8_lossy(&l[..l.len() - 1]).as_ref()) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Fetches and decodes `/v1/status`.
pub async fn fetch_status(addr: &str) -> Result<Status, HttpError> {
    let (_, body) = get(addr, "/v1/status").await?;
    serde_json::from_str(&body).map_err(|source| HttpError::Decode {
        addr: addr.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts full snapshots; ready as told.
    struct Source {
        snapshots: AtomicUsize,
        ready: bool,
    }

    impl StatusSource for Source {
        fn status(&self) -> Status {
            self.snapshots.fetch_add(1, Ordering::Relaxed);
            Status {
                synced: true,
                ready: self.ready,
                ..Default::default()
            }
        }
    }

    /// Answers readiness from a stored flag, as the agent does.
    struct Cheap(Source);

    impl StatusSource for Cheap {
        fn status(&self) -> Status {
            self.0.status()
        }
        fn readiness(&self) -> (StatusCode, String) {
            let st = Status {
                synced: true,
                ready: self.0.ready,
                ..Default::default()
            };
            readyz(&st)
        }
    }

    fn source(ready: bool) -> Source {
        Source {
            snapshots: AtomicUsize::new(0),
            ready,
        }
    }

    #[test]
    fn readyz_answers_from_readiness_without_a_full_snapshot() {
        let get = hyper::Method::GET;
        for ready in [true, false] {
            let src = Cheap(source(ready));
            let r = route(&get, "/readyz", Routes::All, &src);
            let want = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            assert_eq!(r.status(), want);
            assert_eq!(src.0.snapshots.load(Ordering::Relaxed), 0);
            // The status page still takes one.
            let r = route(&get, "/v1/status", Routes::All, &src);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(src.0.snapshots.load(Ordering::Relaxed), 1);
        }
        // A source without its own readiness: from the snapshot.
        let src = source(true);
        assert_eq!(
            route(&get, "/readyz", Routes::All, &src).status(),
            StatusCode::OK
        );
        assert_eq!(src.snapshots.load(Ordering::Relaxed), 1);
        assert_eq!(
            route(&get, "/readyz", Routes::MetricsOnly, &src).status(),
            StatusCode::NOT_FOUND
        );
    }
}
