//! A minimal HTTP/1.1 GET over any byte stream (here: a port-forward through
//! the API server), for the agent's `/v1/flows`: write the request, read the
//! status line and headers, then the body line by line as it arrives. The
//! agent (hyper) sends the stream chunked; a `Content-Length` body (its
//! error answers) and a body that runs until close are read too.

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

/// Status line plus headers, in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// One body line (a flow is a few hundred bytes).
pub const MAX_LINE: usize = 1024 * 1024;
/// What is read of a non-200 answer's body, for the message.
const MAX_ERROR_BODY: usize = 4096;
/// A chunk-size or trailer line.
const MAX_CHUNK_LINE: usize = 1024;

/// Why a GET failed or its body stopped.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Reading or writing the stream.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The stream ended before a whole status line and headers.
    #[error("connection closed before the answer's headers")]
    ClosedBeforeHead,
    /// A status line or header that is not HTTP/1.x.
    #[error("bad HTTP answer: {0}")]
    Head(String),
    /// An answer other than 200, with the start of its body.
    #[error("HTTP {code} {reason}{}", if text.is_empty() { String::new() } else { format!(": {text}") })]
    Status {
        /// Status code.
        code: u16,
        /// Reason phrase.
        reason: String,
        /// The body's first line(s), trimmed.
        text: String,
    },
    /// The body's framing broke (a bad chunk size, the stream cut mid-chunk).
    #[error("bad body: {0}")]
    Body(String),
    /// A line longer than [`MAX_LINE`].
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
}

/// The request for `path`: one GET, no body, the connection closed after it.
pub fn request(path: &str, host: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: netboot/{}\r\nAccept: application/x-ndjson\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// How the body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: N`.
    Length(u64),
    /// Neither: until the connection closes.
    Close,
}

/// A status line and the headers that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: String,
    /// How the body is framed.
    pub framing: Framing,
}

/// Reads one line ending in `\n` (at most `max` bytes) without it and a `\r`
/// before it; None at the end of the stream before any byte.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    what: &str,
) -> Result<Option<Vec<u8>>, HttpError> {
    let mut v = Vec::new();
    (&mut *r)
        .take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_until(b'\n', &mut v)
        .await?;
    if v.is_empty() {
        return Ok(None);
    }
    if v.last() != Some(&b'\n') {
        return Err(if v.len() >= max {
            HttpError::Body(format!("{what} longer than {max} bytes"))
        } else {
            HttpError::Body(format!("connection closed in the middle of {what}"))
        });
    }
    v.pop();
    if v.last() == Some(&b'\r') {
        v.pop();
    }
    Ok(Some(v))
}

/// Reads the status line and headers.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Head, HttpError> {
    let mut raw = Vec::new();
    loop {
        let left = MAX_HEAD.saturating_sub(raw.len());
        if left == 0 {
            return Err(HttpError::Head(format!(
                "headers longer than {MAX_HEAD} bytes"
            )));
        }
        let n = (&mut *r)
            .take(u64::try_from(left).unwrap_or(u64::MAX))
            .read_until(b'\n', &mut raw)
            .await?;
        if n == 0 {
            return Err(HttpError::ClosedBeforeHead);
        }
        if raw.ends_with(b"\r\n\r\n") || raw.ends_with(b"\n\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Head("incomplete headers".into())),
        Err(e) => return Err(HttpError::Head(e.to_string())),
    }
    let code = res.code.unwrap_or(0);
    let reason = res.reason.unwrap_or("").to_string();
    let header = |name: &str| {
        res.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let chunked = header("transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .next_back()
        == Some("chunked");
    let framing = if chunked {
        Framing::Chunked
    } else {
        match header("content-length").first() {
            Some(v) => Framing::Length(
                v.parse()
                    .map_err(|_| HttpError::Head(format!("Content-Length {v:?}")))?,
            ),
            None => Framing::Close,
        }
    };
    Ok(Head {
        code,
        reason,
        framing,
    })
}

/// A response body, read line by line.
pub struct Body<R> {
    r: R,
    framing: Framing,
    /// Bytes left in the current chunk (chunked) or the body (length).
    left: u64,
    /// A chunk was read, so its CRLF comes before the next size line.
    in_chunks: bool,
    done: bool,
    buf: Vec<u8>,
    /// `buf[..scanned]` has no newline.
    scanned: usize,
}

impl<R: AsyncBufRead + Unpin> Body<R> {
    /// The body after `head`, read from `r`.
    pub fn new(r: R, head: &Head) -> Self {
        Self {
            r,
            framing: head.framing,
            left: match head.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            in_chunks: false,
            done: false,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// Reads the next size line when the current chunk is used up; false at
    /// the last (zero-size) chunk.
    async fn next_chunk(&mut self) -> Result<bool, HttpError> {
        if self.in_chunks {
            match read_line(&mut self.r, MAX_CHUNK_LINE, "a chunk's end").await? {
                Some(l) if l.is_empty() => {}
                Some(_) => return Err(HttpError::Body("a chunk longer than its size".into())),
                None => return Err(HttpError::Body("connection closed after a chunk".into())),
            }
        }
        let line = read_line(&mut self.r, MAX_CHUNK_LINE, "a chunk size")
            .await?
            .ok_or_else(|| HttpError::Body("connection closed before a chunk size".into()))?;
        let text = String::from_utf8_lossy(&line);
        let hex = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(hex, 16)
            .map_err(|_| HttpError::Body(format!("chunk size {text:?}")))?;
        self.in_chunks = true;
        if size == 0 {
            // Trailers, up to the empty line (or the close).
            while let Some(l) = read_line(&mut self.r, MAX_CHUNK_LINE, "a trailer").await? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(false);
        }
        self.left = size;
        Ok(true)
    }

    /// Appends the next piece of body data to `buf`; false at the body's end.
    async fn fill(&mut self) -> Result<bool, HttpError> {
        if self.done {
            return Ok(false);
        }
        let want = match self.framing {
            Framing::Close => usize::MAX,
            Framing::Length(_) if self.left == 0 => {
                self.done = true;
                return Ok(false);
            }
            Framing::Chunked if self.left == 0 => {
                if !self.next_chunk().await? {
                    self.done = true;
                    return Ok(false);
                }
                usize::try_from(self.left).unwrap_or(usize::MAX)
            }
            _ => usize::try_from(self.left).unwrap_or(usize::MAX),
        };
        let avail = self.r.fill_buf().await?;
        if avail.is_empty() {
            self.done = true;
            return match self.framing {
                Framing::Close => Ok(false),
                _ => Err(HttpError::Body(format!(
                    "connection closed with {} bytes of the body unread",
                    self.left
                ))),
            };
        }
        let n = avail.len().min(want);
        self.buf.extend_from_slice(&avail[..n]);
        self.r.consume(n);
        self.left = self.left.saturating_sub(n as u64);
        Ok(true)
    }

    /// The next line without its `\n` (and a `\r` before it); None at the
    /// body's end (a last line without a newline is dropped: the stream
    /// was cut in the middle of it).
    pub async fn next_line(&mut self) -> Result<Option<String>, HttpError> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(HttpError::LineTooLong);
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The first `max` bytes of the body, as text (for an error answer).
    pub async fn text(mut self, max: usize) -> Result<String, HttpError> {
        while self.buf.len() < max && self.fill().await? {}
        self.buf.truncate(max);
        Ok(String::from_utf8_lossy(&self.buf).trim().to_string())
    }
}

/// GETs `path` on `stream`: the body when the answer is 200, else
/// [`HttpError::Status`] with the start of the agent's explanation (a 429
/// says how many watchers it already serves).
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
    host: &str,
) -> Result<Body<tokio::io::BufReader<S>>, HttpError> {
    stream.write_all(request(path, host).as_bytes()).await?;
    stream.flush().await?;
    let mut r = tokio::io::BufReader::new(stream);
    let head = read_head(&mut r).await?;
    let body = Body::new(r, &head);
    if head.code != 200 {
        let text = body.text(MAX_ERROR_BODY).await.unwrap_or_default();
        return Err(HttpError::Status {
            code: head.code,
            reason: head.reason,
            text: text.lines().collect::<Vec<_>>().join("; "),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every line of `raw` (head and body), read through a reader that hands
    /// out at most `step` bytes at a time, so lines and chunks split anywhere.
    async fn lines(raw: &[u8], step: usize) -> Result<(Head, Vec<String>), HttpError> {
        let r = tokio::io::BufReader::with_capacity(step, raw);
        let mut r = r;
        let head = read_head(&mut r).await?;
        let mut body = Body::new(r, &head);
        let mut out = Vec::new();
        while let Some(l) = body.next_line().await? {
            out.push(l);
        }
        Ok((head, out))
    }

    const FLOW: &str = r#"{"verdict":"refused","service_id":3}"#;

    fn chunked() -> Vec<u8> {
        // As hyper frames the agent's stream: one chunk per line, heartbeats
        // as a chunk of "\n", a chunk extension for good measure.
        let mut b = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\n".to_vec();
        for piece in [
            format!("{FLOW}\n"),
            "\n".into(),
            "{\"lost\":3}\n{\"a\"".into(),
            ":1}\r\n".into(),
        ] {
            b.extend(format!("{:x};ext=1\r\n{piece}\r\n", piece.len()).as_bytes());
        }
        b.extend(b"0\r\n\r\n");
        b
    }

    #[tokio::test]
    async fn a_chunked_stream_gives_its_lines_however_it_is_split() {
        for step in [1, 2, 7, 64, 8192] {
            let (head, got) = lines(&chunked(), step).await.unwrap();
            assert_eq!(head.code, 200);
            assert_eq!(head.framing, Framing::Chunked);
            assert_eq!(got, [FLOW, "", "{\"lost\":3}", "{\"a\":1}"], "step {step}");
        }
    }

    #[tokio::test]
    async fn a_stream_cut_mid_chunk_is_an_error_not_an_end() {
        let mut raw = chunked();
        raw.truncate(raw.len() - 12);
        let err = lines(&raw, 8192).await.unwrap_err();
        assert!(matches!(err, HttpError::Body(_)), "{err}");
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let err = lines(bad, 8192).await.unwrap_err();
        assert_eq!(err.to_string(), "bad body: chunk size \"zz\"");
    }

    #[tokio::test]
    async fn content_length_and_close_delimited_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\na\nb\nc\nignored";
        let (head, got) = lines(raw, 3).await.unwrap();
        assert_eq!(head.framing, Framing::Length(6));
        assert_eq!(got, ["a", "b", "c"]);
        // HTTP/1.0-style: until close; a cut last line is dropped.
        let raw = b"HTTP/1.0 200 OK\n\nx\r\ny\npartial";
        let (head, got) = lines(raw, 4).await.unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert_eq!(got, ["x", "y"]);
    }

    #[tokio::test]
    async fn heads_that_are_not_http_are_named() {
        assert!(matches!(
            lines(b"", 8).await.unwrap_err(),
            HttpError::ClosedBeforeHead
        ));
        assert!(matches!(
            lines(b"HTTP/1.1 200 OK\r\nX: y\r\n", 8).await.unwrap_err(),
            HttpError::ClosedBeforeHead
        ));
        assert!(matches!(
            lines(b"SSH-2.0-OpenSSH\r\n\r\n", 8).await.unwrap_err(),
            HttpError::Head(_)
        ));
    }

    #[tokio::test]
    async fn a_refusal_is_reported_with_the_agents_text() {
        let (client, mut server) = tokio::io::duplex(4096);
        let agent = tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let n = server.read(&mut req).await.unwrap();
            server
                .write_all(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 50\r\n\r\n4 flow watchers already (the most served at once)\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let err = get(client, "/v1/flows?verdict=refused", "127.0.0.1:9890")
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "HTTP 429 Too Many Requests: 4 flow watchers already (the most served at once)"
        );
        insta::assert_snapshot!(agent
            .await
            .unwrap()
            .replace(env!("CARGO_PKG_VERSION"), "VERSION"));
    }

    #[tokio::test]
    async fn a_200_answer_streams_its_lines() {
        let (client, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let _ = server.read(&mut req).await.unwrap();
            server.write_all(&chunked()).await.unwrap();
        });
        let mut body = get(client, "/v1/flows", "h").await.unwrap();
        assert_eq!(body.next_line().await.unwrap().as_deref(), Some(FLOW));
    }
}
