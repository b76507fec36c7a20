//! One exchange with an instance: picking it, sending the request head and
//! body, reading the response head (retrying where that is safe) and
//! relaying the body to the client with its framing checked.

use std::io;

use hyper::{Response, StatusCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::framing::{Chunks, Framing};
use super::parse::{header_line, parse_response, Plan, ResponseHead};
use super::pool::{authority, checkin, checkout, connect};
use super::{read_more, Buffers};
use crate::proxy::{self, Body};
use crate::EdgeState;

/// Why an exchange with an instance failed.
pub(super) enum UpstreamError {
    /// Nothing came back on a connection taken from the idle pool: it was
    /// closed meanwhile; a fresh connection may be tried.
    Stale,
    Failed(&'static str),
}

pub(super) enum Forwarded {
    /// The response went to the client whole.
    Done { status: u16, instance: String, keep_alive: bool },
    /// Nothing was sent yet; Zeitwork answers instead.
    Answer(Response<Body>),
    /// The response broke off after its head went out: the client's
    /// connection is closed, as the only honest signal left.
    Aborted { status: u16, instance: Option<String> },
}

pub(super) fn bad_gateway(detail: &str) -> Response<Body> {
    proxy::page(StatusCode::BAD_GATEWAY, "Bad gateway", detail)
}

/// Picks an instance, sends the request (retrying refused connections on
/// other instances and stale pooled connections on fresh ones) and relays
/// the response.
pub(super) async fn forward<C: AsyncWrite + Unpin>(
    state: &EdgeState,
    route: &zeitwork_api_types::Route,
    plan: &Plan,
    body: &[u8],
    bufs: &mut Buffers,
    client: &mut C,
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
pub(super) async fn exchange<C: AsyncWrite + Unpin>(
    up: &mut TcpStream,
    request: &[u8],
    upbuf: &mut Vec<u8>,
    plan: &Plan,
    client: &mut C,
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
                    let _ = send(client, client_head).await;
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
pub(super) async fn relay<C: AsyncWrite + Unpin>(
    up: &mut TcpStream,
    client: &mut C,
    client_head: &[u8],
    upbuf: &mut Vec<u8>,
    head: &ResponseHead,
) -> Result<bool, RelayError> {
    const GONE: &str = "client went away";
    let start = head.head_len;
    let body = upbuf.len() - start;
    match head.framing {
        Framing::Empty => {
            send(client, client_head).await.map_err(|_| GONE)?;
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
                        send(client, &upbuf[..take]).await.map_err(|_| GONE)?;
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
                        send(client, &upbuf[..used]).await.map_err(|_| GONE)?;
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
                    Ok(_) => send(client, upbuf).await.map_err(|_| GONE)?,
                }
            }
        }
    }
}

/// Why a response could not be relayed to its end.
#[derive(Debug)]
pub(super) enum RelayError {
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

/// Writes `bytes` to the client and flushes: a TLS stream may hold back what
/// the socket did not take at once, and the next bytes may be long in coming
/// (a plain socket's flush does nothing).
pub(super) async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Writes `a` then `b` and flushes, in one system call when the socket takes both.
pub(super) async fn write_both<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    if b.is_empty() {
        return send(w, a).await;
    }
    let n = w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    if n < a.len() {
        w.write_all(&a[n..]).await?;
        send(w, b).await
    } else {
        send(w, &b[n - a.len()..]).await
    }
}
