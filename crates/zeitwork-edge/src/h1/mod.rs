//! The HTTP/1.1 path for ordinary requests on both ports (plain, and TLS
//! when ALPN chose `http/1.1` or nothing), without an HTTP library in the
//! middle: the request head is parsed once (httparse), the
//! head for the instance is written straight into a buffer, and the
//! response is relayed with its own framing (length, or chunks checked on
//! the way through). Upstream connections are kept per worker thread.
//!
//! Only unambiguous requests take it: HTTP/1.1, origin-form target, one
//! `Host`, at most one `Content-Length` (a body small enough to be retried),
//! no `Transfer-Encoding`, `Upgrade` or `Expect`. Anything else — every
//! malformed, smuggling-shaped or unusual request — is handed, with the bytes
//! already read, to the general path (hyper), which answers it as it answers
//! HTTP/2. Nothing has been written to the client or the instance when that
//! happens.
//!
//! Files by concern: `parse` reads request and response heads, `framing`
//! follows a response body to its end, `pool` keeps upstream connections,
//! `relay` carries one exchange with an instance; this file runs the
//! client's connection and hands it to the general path when needed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::proxy::{self, Admission, Body, ConnInfo, Done};
use crate::EdgeState;

mod framing;
mod parse;
mod pool;
mod relay;

#[cfg(test)]
use framing::{Chunks, Framing};
use parse::{header_line, parse_request, Parse, Plan};
#[cfg(test)]
use parse::{parse_response, SET_BY_THE_EDGE};
use relay::{forward, send, Forwarded};

const READ_CHUNK: usize = 16 * 1024;

/// A connection's reusable buffers.
pub(super) struct Buffers {
    /// The head (and body) for the instance.
    pub(super) request: Vec<u8>,
    /// Bytes from the instance.
    pub(super) upstream: Vec<u8>,
    /// The response head for the client.
    pub(super) response_head: Vec<u8>,
}

pub(super) async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    r.read_buf(buf).await
}

/// A client's connection: a plain socket, or a TLS stream over one.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo for T {}

/// Serves an HTTP/1.1 connection: ordinary requests here, the rest handed to
/// the general path.
pub(crate) async fn serve<S: ClientIo>(
    mut stream: S,
    conn: ConnInfo,
    state: Arc<EdgeState>,
    mut stop: watch::Receiver<bool>,
) {
    match lean(&mut stream, &conn, &state, &mut stop).await {
        End::General(read) => general(stream, read, conn, state, stop).await,
        // A TLS client learns that the end is the end (close_notify), which a
        // response framed by the connection's close needs.
        End::Close => {
            let _ = tokio::time::timeout(SHUTDOWN, stream.shutdown()).await;
        }
        // No close_notify after a response that broke off: the client must not
        // take what it got for the whole.
        End::Abort => {}
    }
}

/// How long a closing connection's goodbye may take.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// How the lean path left a connection.
enum End {
    /// Done with it: close it cleanly.
    Close,
    /// A response broke off: drop it.
    Abort,
    /// A request for the general path, with what was read of the connection.
    General(Vec<u8>),
}

/// Serves requests on the lean path until the connection ends, or a request
/// needs the general path.
async fn lean<S: ClientIo>(
    stream: &mut S,
    conn: &ConnInfo,
    state: &Arc<EdgeState>,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let header_timeout = Duration::from_secs(state.config.header_read_timeout_secs);
    let idle = Duration::from_secs(state.config.idle_timeout_secs);
    let max_head = state.config.max_header_bytes;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut bufs = Buffers {
        request: Vec::with_capacity(1024),
        upstream: Vec::with_capacity(READ_CHUNK),
        response_head: Vec::with_capacity(1024),
    };
    let mut first = true;
    loop {
        if buf.is_empty() {
            let wait = if first { header_timeout } else { idle };
            tokio::select! {
                r = tokio::time::timeout(wait, read_more(stream, &mut buf)) => match r {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return End::Close,
                },
                _ = zeitwork_net::stopped(stop) => return End::Close,
            }
        }
        first = false;
        let deadline = tokio::time::Instant::now() + header_timeout;
        let mut plan = loop {
            match parse_request(&buf, conn, &mut bufs.request) {
                Parse::Ready(plan) if plan.head_len <= max_head => break plan,
                Parse::Ready(_) | Parse::General => return End::General(buf),
                Parse::Partial if buf.len() > max_head => return End::General(buf),
                Parse::Partial => match tokio::time::timeout_at(deadline, read_more(stream, &mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return End::Close,
                },
            }
        };
        // Copies for a candidate's shadow stage are made on the general path.
        if state.route(&plan.host).is_some_and(|r| r.shadow.is_some()) {
            return End::General(buf);
        }
        let start = Instant::now();
        let admission = match admit(state, &plan, conn) {
            // A pinned deployment's route is looked up again by its own host while it wakes.
            Admission::Proxy(route) => {
                let lookup = route.host.clone();
                crate::wake::hold(state, &lookup, route).await
            }
            answer => answer,
        };
        let route = match admission {
            Admission::Proxy(route) => route,
            Admission::Answer { response, routed } => {
                let status = response.status().as_u16();
                // The body (if any) is not read: the connection cannot go on after it.
                let close = plan.close || plan.body_len > 0 || *stop.borrow();
                let written = write_page(stream, response, &plan, close, &mut bufs.upstream).await;
                let host = routed.then_some(plan.host.as_str());
                finish(state, conn, start, &plan, host, status, None, None);
                if written.is_err() || close {
                    return End::Close;
                }
                buf.drain(..plan.head_len);
                continue;
            }
        };
        plan.stamp.clear();
        for (name, value) in crate::skew::stamp(&plan.host, plan.skew_cookie.as_deref(), &route, conn.tls) {
            header_line(&mut plan.stamp, name.as_bytes(), value.as_bytes());
        }
        // The body is small: read it whole, so a refused connection can be retried.
        let end = plan.head_len + plan.body_len;
        while buf.len() < end {
            match tokio::time::timeout(idle, read_more(stream, &mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return End::Close,
            }
        }
        let body = &buf[plan.head_len..end];
        let result = forward(state, &route, &plan, body, &mut bufs, stream).await;
        buf.drain(..end);
        let stopping = *stop.borrow();
        match result {
            Forwarded::Done { status, instance, keep_alive } => {
                finish(state, conn, start, &plan, Some(&plan.host), status, Some(&instance), Some(&route.deployment));
                if !keep_alive || plan.close || stopping {
                    return End::Close;
                }
            }
            Forwarded::Answer(response) => {
                let status = response.status().as_u16();
                let close = plan.close || stopping;
                let written = write_page(stream, response, &plan, close, &mut bufs.upstream).await;
                finish(state, conn, start, &plan, Some(&plan.host), status, None, Some(&route.deployment));
                if written.is_err() || close {
                    return End::Close;
                }
            }
            Forwarded::Aborted { status, instance } => {
                let dep = Some(route.deployment.as_str());
                finish(state, conn, start, &plan, Some(&plan.host), status, instance.as_deref(), dep);
                return End::Abort;
            }
        }
    }
}

fn admit(state: &EdgeState, plan: &Plan, conn: &ConnInfo) -> Admission {
    let len = (plan.body_len > 0).then_some(plan.body_len as u64);
    proxy::admit(state, &plan.host, conn, &plan.target, len, plan.skew_cookie.as_deref())
}

#[allow(clippy::too_many_arguments)]
fn finish(
    state: &EdgeState,
    conn: &ConnInfo,
    start: Instant,
    plan: &Plan,
    host: Option<&str>,
    status: u16,
    upstream: Option<&str>,
    deployment: Option<&str>,
) {
    let path = plan.target.split('?').next().unwrap_or("/");
    let done = Done { method: &plan.method, host, path, status, request_id: &plan.request_id, upstream, deployment };
    proxy::record(state, conn, start, &done);
}

/// Hands the connection, with what was read of it, to the general path.
async fn general<S: ClientIo>(
    stream: S,
    read: Vec<u8>,
    conn: ConnInfo,
    state: Arc<EdgeState>,
    stop: watch::Receiver<bool>,
) {
    let io = Rewind { read, pos: 0, inner: stream };
    crate::serve(TokioIo::new(io), conn, state, stop).await
}

async fn write_page<S: ClientIo>(
    stream: &mut S,
    response: Response<Body>,
    plan: &Plan,
    close: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let request_id = &plan.request_id;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    header_line(out, b"content-length", body.len().to_string().as_bytes());
    header_line(out, b"x-request-id", request_id.as_bytes());
    if close {
        header_line(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    // A HEAD answer announces the page's length but carries no body.
    if plan.method != "HEAD" {
        out.extend_from_slice(&body);
    }
    send(stream, out).await
}

/// A stream that first replays bytes already read from it.
struct Rewind<S> {
    read: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: ClientIo> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.read.len() {
            let n = (self.read.len() - self.pos).min(buf.remaining());
            let from = self.pos;
            buf.put_slice(&self.read[from..from + n]);
            self.pos += n;
            if self.pos == self.read.len() {
                self.read = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: ClientIo> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod props;
