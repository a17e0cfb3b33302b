//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/metrics`,
//! `/v1/status`; and the small client `status --agent` uses.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::status::Status;

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
}

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(path: &str, src: &dyn StatusSource) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let st = src.status();
            if st.ready {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "initial sync not complete\n".into(),
                )
            }
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

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, src: Arc<dyn StatusSource>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let src = src.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let src = src.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), src.as_ref())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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

/// Fetches and decodes `/v1/status`.
pub async fn fetch_status(addr: &str) -> Result<Status, HttpError> {
    let (_, body) = get(addr, "/v1/status").await?;
    serde_json::from_str(&body).map_err(|source| HttpError::Decode {
        addr: addr.into(),
        source,
    })
}
