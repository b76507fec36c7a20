//! The plain port's HTTP/1.1 path for ordinary requests, without an HTTP
//! library in the middle: the request head is parsed once (httparse), the
//! head for the instance is written straight into a buffer, and the
//! response is relayed with its own framing (length, or chunks checked on
//! the way through). Upstream connections are kept per worker thread.
//!
//! Only unambiguous requests take it: HTTP/1.1, origin-form target, one
//! `Host`, at most one `Content-Length` (a body small enough to be retried),
//! no `Transfer-Encoding`, `Upgrade` or `Expect`. Anything else — every
//! malformed, smuggling-shaped or unusual request — is handed, with the bytes
//! already read, to the general path (hyper), which answers it exactly as it
//! answers on the TLS port. Nothing has been written to the client or the
//! instance when that happens.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::proxy::{self, Admission, Body, ConnInfo, Done};
use crate::EdgeState;

const MAX_HEADERS: usize = 128;
/// Largest response head accepted from an instance.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
const IDLE_PER_UPSTREAM: usize = 256;

/// Request headers the edge sets itself, besides the hop-by-hop ones.
const SET_BY_THE_EDGE: [&str; 6] =
    ["host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "content-length"];

/// Response headers the edge decides itself (framing, request id), besides the hop-by-hop ones.
const DECIDED_BY_THE_EDGE: [&str; 2] = ["x-request-id", "content-length"];

/// Hop-by-hop (the same list as the general path's), one of `extra`, or
/// listed in the message's `Connection` header.
fn dropped(name: &str, extra: &[&str], listed: &[&str]) -> bool {
    proxy::HOP_BY_HOP.iter().chain(extra).chain(listed).any(|d| lower_eq(name, d))
}

thread_local! {
    /// Idle upstream connections by `host:port`, newest last.
    static IDLE: RefCell<HashMap<String, VecDeque<(TcpStream, Instant)>>> = RefCell::new(HashMap::new());
}

fn checkout(addr: &str) -> Option<TcpStream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let q = idle.get_mut(addr)?;
        while let Some((s, at)) = q.pop_back() {
            if at.elapsed() < proxy::UPSTREAM_IDLE {
                return Some(s);
            }
        }
        None
    })
}

fn checkin(addr: &str, s: TcpStream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if !idle.contains_key(addr) {
            idle.insert(addr.to_owned(), VecDeque::new());
        }
        let Some(q) = idle.get_mut(addr) else { return };
        while q.front().is_some_and(|(_, at)| at.elapsed() >= proxy::UPSTREAM_IDLE) || q.len() >= IDLE_PER_UPSTREAM {
            q.pop_front();
        }
        q.push_back((s, Instant::now()));
    })
}

/// A connection's reusable buffers.
struct Buffers {
    /// The head (and body) for the instance.
    request: Vec<u8>,
    /// Bytes from the instance.
    upstream: Vec<u8>,
    /// The response head for the client.
    response_head: Vec<u8>,
}

/// A request this path serves, read from the head.
struct Plan {
    head_len: usize,
    body_len: usize,
    method: String,
    target: String,
    host: String,
    request_id: String,
    /// The client asked to close after this response.
    close: bool,
    /// The skew protection cookie the client sent.
    skew_cookie: Option<String>,
    /// Header lines the edge adds to the instance's response.
    stamp: Vec<u8>,
}

enum Parse {
    Partial,
    /// Not for this path; the general path answers it.
    General,
    Ready(Plan),
}

fn lower_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parses the head in `buf` and, when this path takes it, writes the head
/// for the instance (without the per-instance lines and the final CRLF)
/// into `out`.
fn parse_request(buf: &[u8], conn: &ConnInfo, out: &mut Vec<u8>) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::General,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else { return Parse::General };
    if method == "CONNECT" || !target.starts_with('/') || target.starts_with("/.well-known/acme-challenge/") {
        return Parse::General;
    }
    // A target hyper would refuse (characters httparse lets through) or
    // shorten (a fragment) is answered by the general path, as on TLS.
    let same_for_hyper =
        hyper::Uri::try_from(target).is_ok_and(|u| u.path_and_query().map(|p| p.as_str()) == Some(target));
    if !same_for_hyper {
        return Parse::General;
    }
    let mut host = None;
    let mut content_length = None;
    let mut close = false;
    let mut request_id = None;
    let mut skew_cookie = None;
    let mut listed: Vec<&str> = Vec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if lower_eq(name, "host") {
            if host.is_some() {
                return Parse::General;
            }
            host = Some(h.value);
        } else if lower_eq(name, "content-length") {
            let digits = std::str::from_utf8(h.value).ok().filter(|v| !v.is_empty() && v.len() <= 19);
            let Some(n) = digits.filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse::<u64>().ok())
            else {
                return Parse::General;
            };
            if content_length.is_some() || n > proxy::RETRY_BUFFER {
                return Parse::General;
            }
            content_length = Some(n);
        } else if lower_eq(name, "transfer-encoding") || lower_eq(name, "upgrade") || lower_eq(name, "expect") {
            return Parse::General;
        } else if lower_eq(name, "connection") {
            let Ok(v) = std::str::from_utf8(h.value) else { return Parse::General };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                close |= lower_eq(token, "close");
                listed.push(token);
            }
        } else if lower_eq(name, "x-request-id") {
            request_id = Some(h.value);
        } else if lower_eq(name, "cookie") && skew_cookie.is_none() {
            skew_cookie = crate::skew::cookie_value(h.value).map(str::to_owned);
        }
    }
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()).and_then(proxy::normalize_host) else {
        return Parse::General;
    };
    let request_id = proxy::request_id(request_id);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        let internal = name.as_bytes().get(..11).is_some_and(|p| p.eq_ignore_ascii_case(b"x-zeitwork-"));
        if !internal && !dropped(name, &SET_BY_THE_EDGE, &listed) {
            header_line(out, name.as_bytes(), h.value);
        }
    }
    if let Some(n) = content_length {
        header_line(out, b"content-length", n.to_string().as_bytes());
    }
    header_line(out, b"host", host.as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    let _ = write!(out, "{}", conn.client.ip());
    out.extend_from_slice(b"\r\n");
    header_line(out, b"x-forwarded-proto", if conn.tls { b"https" } else { b"http" });
    header_line(out, b"x-forwarded-host", host.as_bytes());
    header_line(out, b"x-request-id", request_id.as_bytes());
    Parse::Ready(Plan {
        head_len,
        body_len: content_length.unwrap_or(0) as usize,
        method: method.to_owned(),
        target: target.to_owned(),
        host,
        request_id,
        close,
        skew_cookie,
        stamp: Vec::new(),
    })
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes; the client's connection closes after it.
    Close,
}

/// The instance's response head, rewritten for the client.
#[derive(Debug)]
struct ResponseHead {
    status: u16,
    head_len: usize,
    framing: Framing,
    /// The instance's connection may serve another request afterwards.
    reusable: bool,
}

/// Parses a response head in `buf`; writes the client's head into `out`.
fn parse_response(
    buf: &[u8],
    head_request: bool,
    request_id: &str,
    close: bool,
    stamp: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err("response head too large"),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response head"),
    };
    let (Some(status), Some(version)) = (res.code, res.version) else { return Err("malformed response head") };
    if status == 101 {
        return Err("switching protocols without an upgrade request");
    }
    // Framing is read as the general path's hyper reads it, so the two
    // paths accept and refuse the same responses: a list of equal decimal
    // lengths, the last transfer-encoding line deciding chunked, header
    // values that are not visible ASCII ignored.
    let mut length: Option<u64> = None;
    let mut length_header = false;
    let mut length_ok = true;
    let mut last_coding: Option<&[u8]> = None;
    let mut upstream_close = version == 0;
    let mut listed: Vec<&str> = Vec::new();
    for h in res.headers.iter() {
        if lower_eq(h.name, "content-length") {
            length_header = true;
            let Some(v) = header_text(h.value) else {
                length_ok = false;
                continue;
            };
            for item in v.split(',') {
                match decimal(item.trim()) {
                    Some(n) if length.is_none_or(|m| m == n) => length = Some(n),
                    _ => length_ok = false,
                }
            }
        } else if lower_eq(h.name, "transfer-encoding") {
            last_coding = Some(h.value);
        } else if lower_eq(h.name, "connection") {
            let Some(v) = header_text(h.value) else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if version == 0 && lower_eq(token, "keep-alive") {
                    upstream_close = false;
                }
                upstream_close |= lower_eq(token, "close");
                listed.push(token);
            }
        }
    }
    let chunked = last_coding.map(|v| {
        header_text(v).and_then(|v| v.rsplit(',').next()).is_some_and(|last| lower_eq(last.trim(), "chunked"))
    });
    let informational = (100..200).contains(&status);
    let framing = if informational || head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(_), _) if version == 0 => return Err("transfer-encoding in an HTTP/1.0 response"),
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, _) if !length_ok => return Err("invalid or conflicting content-length"),
            (None, Some(n)) if n > u64::MAX - 2 => return Err("content-length too large"),
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    // Both framings at once, or a transfer coding we cannot follow: the
    // connection is not trusted for another request.
    let reusable = !upstream_close && framing != Framing::Close && !(chunked.is_some() && length_header);
    let close_client = close || framing == Framing::Close;

    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        if !dropped(h.name, &DECIDED_BY_THE_EDGE, &listed) {
            header_line(out, h.name.as_bytes(), h.value);
        }
    }
    if !informational {
        match framing {
            Framing::Chunked => header_line(out, b"transfer-encoding", b"chunked"),
            Framing::Length(n) => header_line(out, b"content-length", n.to_string().as_bytes()),
            // A HEAD or 304 answer keeps the length it announces.
            Framing::Empty => {
                if let Some(n) = length.filter(|_| chunked.is_none() && length_ok) {
                    header_line(out, b"content-length", n.to_string().as_bytes());
                }
            }
            Framing::Close => {}
        }
        header_line(out, b"x-request-id", request_id.as_bytes());
        out.extend_from_slice(stamp);
        if close_client {
            header_line(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead { status, head_len, framing, reusable }))
}

/// A header value as text, when it is visible ASCII (what hyper's
/// `HeaderValue::to_str` accepts).
fn header_text(v: &[u8]) -> Option<&str> {
    v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)).then(|| std::str::from_utf8(v).ok()).flatten()
}

/// Decimal digits only (no sign, no blanks), as a length.
fn decimal(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Follows a chunked body as it goes through unchanged, to know where it
/// ends; refuses anything that is not well-formed chunked coding.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

const MAX_CHUNK_LINE: usize = 4096;

impl Chunks {
    /// Consumes `data` up to the end of the body; returns how many bytes
    /// belong to it.
    fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() && self.state != Done {
            if self.state == Data {
                let take = (data.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err("chunk line too long");
            }
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err("chunk size too large");
                    }
                    self.size = self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk line"),
                (Extension, _) => Extension,
                (SizeLf, b'\n') => {
                    self.line = 0;
                    self.digits = 0;
                    if self.size == 0 {
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.line = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in a trailer"),
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => {
                    self.line = 0;
                    TrailerStart
                }
                (EndLf, b'\n') => Done,
                _ => return Err("malformed chunked body"),
            };
        }
        Ok(i)
    }

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    r.read_buf(buf).await
}

/// Why an exchange with an instance failed.
enum UpstreamError {
    /// Nothing came back on a connection taken from the idle pool: it was
    /// closed meanwhile; a fresh connection may be tried.
    Stale,
    Failed(&'static str),
}

/// Serves a plain connection: ordinary requests here, the rest handed to
/// the general path.
pub(crate) async fn serve(
    mut stream: TcpStream,
    conn: ConnInfo,
    state: Arc<EdgeState>,
    mut stop: watch::Receiver<bool>,
) {
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
                r = tokio::time::timeout(wait, read_more(&mut stream, &mut buf)) => match r {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                _ = zeitwork_net::stopped(&mut stop) => return,
            }
        }
        first = false;
        let deadline = tokio::time::Instant::now() + header_timeout;
        let mut plan = loop {
            match parse_request(&buf, &conn, &mut bufs.request) {
                Parse::Ready(plan) if plan.head_len <= max_head => break plan,
                Parse::Ready(_) | Parse::General => return general(stream, buf, conn, state, stop).await,
                Parse::Partial if buf.len() > max_head => return general(stream, buf, conn, state, stop).await,
                Parse::Partial => match tokio::time::timeout_at(deadline, read_more(&mut stream, &mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
            }
        };
        // Copies for a candidate's shadow stage are made on the general path.
        if state.route(&plan.host).is_some_and(|r| r.shadow.is_some()) {
            return general(stream, buf, conn, state, stop).await;
        }
        let start = Instant::now();
        let admission = match admit(&state, &plan, &conn) {
            // A pinned deployment's route is looked up again by its own host while it wakes.
            Admission::Proxy(route) => {
                let lookup = route.host.clone();
                crate::wake::hold(&state, &lookup, route).await
            }
            answer => answer,
        };
        let route = match admission {
            Admission::Proxy(route) => route,
            Admission::Answer { response, routed } => {
                let status = response.status().as_u16();
                // The body (if any) is not read: the connection cannot go on after it.
                let close = plan.close || plan.body_len > 0 || *stop.borrow();
                let written = write_page(&mut stream, response, &plan, close, &mut bufs.upstream).await;
                let host = routed.then_some(plan.host.as_str());
                finish(&state, &conn, start, &plan, host, status, None, None);
                if written.is_err() || close {
                    return;
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
            match tokio::time::timeout(idle, read_more(&mut stream, &mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        let body = &buf[plan.head_len..end];
        let result = forward(&state, &route, &plan, body, &mut bufs, &mut stream).await;
        buf.drain(..end);
        let stopping = *stop.borrow();
        match result {
            Forwarded::Done { status, instance, keep_alive } => {
                finish(&state, &conn, start, &plan, Some(&plan.host), status, Some(&instance), Some(&route.deployment));
                if !keep_alive || plan.close || stopping {
                    return;
                }
            }
            Forwarded::Answer(response) => {
                let status = response.status().as_u16();
                let close = plan.close || stopping;
                let written = write_page(&mut stream, response, &plan, close, &mut bufs.upstream).await;
                finish(&state, &conn, start, &plan, Some(&plan.host), status, None, Some(&route.deployment));
                if written.is_err() || close {
                    return;
                }
            }
            Forwarded::Aborted { status, instance } => {
                let dep = Some(route.deployment.as_str());
                finish(&state, &conn, start, &plan, Some(&plan.host), status, instance.as_deref(), dep);
                return;
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
async fn general(stream: TcpStream, read: Vec<u8>, conn: ConnInfo, state: Arc<EdgeState>, stop: watch::Receiver<bool>) {
    let io = Rewind { read, pos: 0, inner: stream };
    crate::serve(TokioIo::new(io), conn, state, stop).await
}

async fn write_page(
    stream: &mut TcpStream,
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
    stream.write_all(out).await
}

enum Forwarded {
    /// The response went to the client whole.
    Done { status: u16, instance: String, keep_alive: bool },
    /// Nothing was sent yet; Zeitwork answers instead.
    Answer(Response<Body>),
    /// The response broke off after its head went out: the client's
    /// connection is closed, as the only honest signal left.
    Aborted { status: u16, instance: Option<String> },
}

fn bad_gateway(detail: &str) -> Response<Body> {
    proxy::page(StatusCode::BAD_GATEWAY, "Bad gateway", detail)
}

/// `http://host:port` → `host:port`.
fn authority(upstream: &str) -> Option<&str> {
    let rest = upstream.strip_prefix("http://")?.trim_end_matches('/');
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

async fn connect(addr: &str) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(proxy::CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Picks an instance, sends the request (retrying refused connections on
/// other instances and stale pooled connections on fresh ones) and relays
/// the response.
async fn forward(
    state: &EdgeState,
    route: &zeitwork_api_types::Route,
    plan: &Plan,
    body: &[u8],
    bufs: &mut Buffers,
    client: &mut TcpStream,
) -> Forwarded {
    let Buffers { request: out, upstream: upbuf, response_head: client_head } = bufs;
    let head_len = out.len();
    let mut tried: Vec<String> = Vec::new();
    loop {
        let Some((inst, inflight)) = state.balancer.pick(&route.instances, &tried) else {
            state.metrics.upstream_errors.inc();
            return Forwarded::Answer(bad_gateway("The application could not be reached. Try again shortly."));
        };
        let Some(addr) = authority(&inst.upstream) else {
            return Forwarded::Answer(bad_gateway("The application's address is not valid."));
        };
        out.truncate(head_len);
        header_line(out, b"x-zeitwork-instance", inst.id.as_bytes());
        if let Some(t) = &state.config.token {
            header_line(out, b"x-zeitwork-edge-token", t.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);

        let mut pooled = checkout(addr);
        let response = loop {
            let reused = pooled.is_some();
            let mut up = match pooled.take() {
                Some(s) => s,
                None => match connect(addr).await {
                    Ok(s) => s,
                    Err(e) => break Err((e.to_string(), true)),
                },
            };
            upbuf.clear();
            client_head.clear();
            match exchange(&mut up, out, upbuf, plan, client, client_head).await {
                Ok(head) => break Ok((up, head)),
                Err(UpstreamError::Stale) if reused => continue,
                Err(UpstreamError::Stale) => break Err(("the application closed the connection".into(), false)),
                Err(UpstreamError::Failed(why)) => break Err((why.to_owned(), false)),
            }
        };
        let (mut up, head) = match response {
            Ok(r) => r,
            Err((why, refused)) => {
                if refused {
                    state.balancer.eject(&inst.id);
                    if tried.len() + 1 < proxy::MAX_ATTEMPTS.min(route.instances.len()) {
                        tracing::warn!(instance = %inst.id, error = %why, "connect failed; retrying on another instance");
                        state.metrics.retries.inc();
                        tried.push(inst.id.clone());
                        continue;
                    }
                }
                tracing::warn!(instance = %inst.id, error = %why, "upstream request failed");
                state.metrics.upstream_errors.inc();
                return Forwarded::Answer(bad_gateway("The application could not be reached. Try again shortly."));
            }
        };
        state.balancer.restore(&inst.id);
        let relayed = relay(&mut up, client, client_head, upbuf, &head).await;
        drop(inflight);
        let instance = inst.id.clone();
        return match relayed {
            Ok(clean) => {
                if clean && head.reusable {
                    checkin(addr, up);
                }
                let keep_alive = head.framing != Framing::Close;
                Forwarded::Done { status: head.status, instance, keep_alive }
            }
            Err(RelayError::Unsent(why)) => {
                tracing::warn!(instance = %instance, error = why, "malformed response from the application");
                state.metrics.upstream_errors.inc();
                Forwarded::Answer(bad_gateway("The application sent a malformed response."))
            }
            Err(RelayError::Broken(why)) => {
                tracing::warn!(instance = %instance, error = why, "response from the application broke off");
                state.metrics.upstream_errors.inc();
                Forwarded::Aborted { status: head.status, instance: Some(instance) }
            }
        };
    }
}

/// Writes the request and reads the final response head (1xx heads go
/// straight to the client). On success `client_head` holds the head
/// rewritten for the client and `upbuf` the instance's head followed by the
/// body bytes read so far.
async fn exchange(
    up: &mut TcpStream,
    request: &[u8],
    upbuf: &mut Vec<u8>,
    plan: &Plan,
    client: &mut TcpStream,
    client_head: &mut Vec<u8>,
) -> Result<ResponseHead, UpstreamError> {
    if up.write_all(request).await.is_err() {
        return Err(UpstreamError::Stale);
    }
    let head_request = plan.method == "HEAD";
    let mut received = false;
    loop {
        match read_more(up, upbuf).await {
            Ok(0) | Err(_) if !received => return Err(UpstreamError::Stale),
            Ok(0) | Err(_) => return Err(UpstreamError::Failed("the application closed the connection mid-response")),
            Ok(_) => received = true,
        }
        loop {
            client_head.clear();
            match parse_response(upbuf, head_request, &plan.request_id, plan.close, &plan.stamp, client_head) {
                Ok(None) => break,
                Err(why) => return Err(UpstreamError::Failed(why)),
                Ok(Some(head)) if (100..200).contains(&head.status) => {
                    let _ = client.write_all(client_head).await;
                    upbuf.drain(..head.head_len);
                    if upbuf.is_empty() {
                        break;
                    }
                }
                Ok(Some(head)) => return Ok(head),
            }
        }
    }
}

/// Sends the rewritten head and the body to the client. `Ok(true)` when the
/// body ended exactly where its framing said, so the instance's connection
/// can be reused.
async fn relay(
    up: &mut TcpStream,
    client: &mut TcpStream,
    client_head: &[u8],
    upbuf: &mut Vec<u8>,
    head: &ResponseHead,
) -> Result<bool, RelayError> {
    const GONE: &str = "client went away";
    let start = head.head_len;
    let body = upbuf.len() - start;
    match head.framing {
        Framing::Empty => {
            client.write_all(client_head).await.map_err(|_| GONE)?;
            Ok(body == 0)
        }
        Framing::Length(n) => {
            let now = (body as u64).min(n) as usize;
            write_both(client, client_head, &upbuf[start..start + now]).await.map_err(|_| GONE)?;
            let mut left = n - now as u64;
            let extra = body > now;
            while left > 0 {
                upbuf.clear();
                match read_more(up, upbuf).await {
                    Ok(0) | Err(_) => return Err("the application closed the connection mid-body".into()),
                    Ok(m) => {
                        let take = (m as u64).min(left) as usize;
                        client.write_all(&upbuf[..take]).await.map_err(|_| GONE)?;
                        left -= take as u64;
                        if take < m {
                            return Ok(false);
                        }
                    }
                }
            }
            Ok(!extra)
        }
        Framing::Chunked => {
            let mut chunks = Chunks::default();
            // Broken before anything was sent: the caller can still answer 502.
            let used = chunks.feed(&upbuf[start..]).map_err(RelayError::Unsent)?;
            write_both(client, client_head, &upbuf[start..start + used]).await.map_err(|_| GONE)?;
            let mut clean = used == body;
            while !chunks.done() {
                upbuf.clear();
                match read_more(up, upbuf).await {
                    Ok(0) | Err(_) => return Err("the application closed the connection mid-body".into()),
                    Ok(_) => {
                        let used = chunks.feed(upbuf)?;
                        clean = used == upbuf.len();
                        client.write_all(&upbuf[..used]).await.map_err(|_| GONE)?;
                    }
                }
            }
            Ok(clean)
        }
        Framing::Close => {
            write_both(client, client_head, &upbuf[start..]).await.map_err(|_| GONE)?;
            loop {
                upbuf.clear();
                match read_more(up, upbuf).await {
                    Ok(0) => return Ok(false),
                    Err(_) => return Err("the application reset the connection".into()),
                    Ok(_) => client.write_all(upbuf).await.map_err(|_| GONE)?,
                }
            }
        }
    }
}

/// Why a response could not be relayed to its end.
#[derive(Debug)]
enum RelayError {
    /// Unusable before any of it went to the client: a 502 can still answer.
    Unsent(&'static str),
    /// Broke off after its head went out.
    Broken(&'static str),
}

impl From<&'static str> for RelayError {
    fn from(why: &'static str) -> Self {
        RelayError::Broken(why)
    }
}

/// Writes `a` then `b`, in one system call when the socket takes both.
async fn write_both(w: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    if b.is_empty() {
        return w.write_all(a).await;
    }
    let n = w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    if n < a.len() {
        w.write_all(&a[n..]).await?;
        w.write_all(b).await
    } else {
        w.write_all(&b[n - a.len()..]).await
    }
}

/// A stream that first replays bytes already read from it.
struct Rewind {
    read: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
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

impl AsyncWrite for Rewind {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        ConnInfo { client: "127.0.0.9:5000".parse().unwrap(), tls: false, sni: None }
    }

    fn plan(req: &str) -> (Option<Plan>, String) {
        let mut out = Vec::new();
        match parse_request(req.as_bytes(), &conn(), &mut out) {
            Parse::Ready(p) => (Some(p), String::from_utf8(out).unwrap()),
            Parse::Partial => panic!("partial: {req:?}"),
            Parse::General => (None, String::new()),
        }
    }

    #[test]
    fn ordinary_requests_are_rewritten_for_the_instance() {
        let (p, head) = plan(
            "POST /a?b=1 HTTP/1.1\r\nHost: Web.Apps.Test:80\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\n\
             X-Forwarded-For: 6.6.6.6\r\nX-Zeitwork-Instance: forged\r\nContent-Length: 3\r\nAccept: */*\r\n\r\nabc",
        );
        let p = p.unwrap();
        assert_eq!((p.host.as_str(), p.body_len, p.target.as_str(), p.close), ("web.apps.test", 3, "/a?b=1", false));
        assert!(head.starts_with("POST /a?b=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Accept: */*\r\n") && head.contains("content-length: 3\r\n"), "{head}");
        assert!(head.contains("x-forwarded-for: 127.0.0.9\r\n") && head.contains("host: web.apps.test\r\n"), "{head}");
        for gone in ["6.6.6.6", "forged", "x-secret", "keep-alive", "Connection"] {
            assert!(!head.contains(gone), "{gone} must not reach the instance: {head}");
        }
    }

    #[test]
    fn anything_unusual_goes_the_general_way() {
        for req in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        ] {
            assert!(plan(req).0.is_none(), "{req:?} must take the general path");
        }
    }

    fn response(raw: &str, head_request: bool) -> Result<Option<(ResponseHead, String)>, &'static str> {
        let mut out = Vec::new();
        let r = parse_response(raw.as_bytes(), head_request, "rid", false, b"", &mut out)?;
        Ok(r.map(|h| (h, String::from_utf8(out).unwrap())))
    }

    #[test]
    fn response_framing() {
        let (h, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Length(5), true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-request-id: rid\r\n\r\n");
        let (h, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(out.contains("transfer-encoding: chunked"));
        let (h, out) = response("HTTP/1.0 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        assert!(out.contains("connection: close"), "{out}");
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false), "both framings: chunked wins, no reuse");
        assert!(response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 101 Switching\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 200 OK\r\nContent-Le", false).unwrap().is_none());
    }

    #[test]
    fn chunked_bodies_end_where_they_say() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let mut c = Chunks::default();
        assert_eq!(c.feed(body).unwrap(), body.len() - 4);
        assert!(c.done());
        // The same, a byte at a time.
        let mut c = Chunks::default();
        let mut used = 0;
        for b in body.iter() {
            used += c.feed(std::slice::from_ref(b)).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!(used, body.len() - 4);
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"5\nhello", b"ffffffffffffffff1\r\n", b"\r\n"] {
            assert!(Chunks::default().feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
