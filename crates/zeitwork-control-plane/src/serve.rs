//! The operator's HTTP server: hyper with a header read timeout (a client
//! that sends its request head slowly, or never, is cut off), a body timeout
//! (a body that stalls, or trickles in below a minimum rate, is cut off with
//! 408) and a bound on open connections per client address, so one client
//! cannot hold every file descriptor. Shutdown stops accepting, asks open
//! connections to close after their current request, and waits for them a
//! bounded time.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Limits of the operator's server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to send a request head.
    pub header_read_timeout: Duration,
    /// Open connections one client address may hold.
    pub connections_per_client: usize,
    /// Longest pause between two pieces of a request body; also the time a body
    /// has before [`Limits::min_body_rate`] applies.
    pub body_idle_timeout: Duration,
    /// Bytes per second a body must average once `body_idle_timeout` has passed
    /// since its request began (0: no minimum).
    pub min_body_rate: u64,
    /// How long shutdown waits for open connections.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            connections_per_client: 256,
            body_idle_timeout: Duration::from_secs(30),
            min_body_rate: 1024,
            drain: Duration::from_secs(30),
        }
    }
}

/// One client's open connections; the count drops with the guard.
struct Held {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A request body that fails once it stalls longer than `idle`, or falls below
/// `rate` bytes per second on average after `idle` from its start. It raises
/// `tripped` so that [`cut_slow_bodies`] answers 408 whatever the handler made of
/// the failed read.
struct TimedBody {
    inner: axum::body::Body,
    idle: Duration,
    rate: u64,
    started: Instant,
    received: u64,
    timer: Pin<Box<Sleep>>,
    tripped: Arc<AtomicBool>,
}

/// A body read cut off by [`TimedBody`].
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly")]
struct BodyTooSlow;

impl TimedBody {
    /// When the body fails unless more of it arrives first.
    fn deadline(&self, now: Instant) -> Instant {
        let idle = now + self.idle;
        if self.rate == 0 {
            return idle;
        }
        // By then `received` bytes are all the minimum rate allows for.
        let earned = Duration::from_secs_f64(self.received as f64 / self.rate as f64);
        idle.min(self.started + self.idle + earned)
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let now = Instant::now();
                if now >= this.timer.deadline() {
                    this.tripped.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow))));
                }
                this.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                let next = this.deadline(now);
                this.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.tripped.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow))))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: every request body is read under [`TimedBody`]'s limits; a
/// request whose body was cut off is answered 408 and its connection closed.
async fn cut_slow_bodies(
    axum::extract::State(limits): axum::extract::State<Limits>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let tripped = Arc::new(AtomicBool::new(false));
    let (parts, inner) = req.into_parts();
    let now = Instant::now();
    let mut body = TimedBody {
        inner,
        idle: limits.body_idle_timeout,
        rate: limits.min_body_rate,
        started: now,
        received: 0,
        timer: Box::pin(tokio::time::sleep_until(now + limits.body_idle_timeout)),
        tripped: tripped.clone(),
    };
    let first = body.deadline(now);
    body.timer.as_mut().reset(first);
    let res = next.run(axum::extract::Request::from_parts(parts, axum::body::Body::new(body))).await;
    if !tripped.load(Ordering::Relaxed) {
        return res;
    }
    tracing::info!("a request body stalled or trickled in too slowly; answered 408");
    let mut res = crate::error::ApiError::RequestTimeout(format!(
        "the request body arrived too slowly: send it without pauses over {} s and at {} bytes/s or more",
        limits.body_idle_timeout.as_secs(),
        limits.min_body_rate
    ))
    .into_response();
    res.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    res
}

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, app: axum::Router, mut stop: watch::Receiver<bool>, limits: Limits) {
    let app = app.layer(axum::middleware::from_fn_with_state(limits, cut_slow_bodies));
    let counts: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(250);
    let builder = Arc::new(builder);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        while conns.try_join_next().is_some() {}
        let ip = peer.ip();
        {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = c.entry(ip).or_default();
            if *n >= limits.connections_per_client {
                tracing::warn!(client = %ip, open = *n, "too many open connections from one client; refused");
                continue;
            }
            *n += 1;
        }
        let held = Held { counts: counts.clone(), ip };
        let (builder, app, mut stop) = (builder.clone(), app.clone(), stop.clone());
        conns.spawn(async move {
            let _held = held;
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped(&mut stop) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    let drained = tokio::time::timeout(limits.drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = conns.len(), "connections still open after the drain time; closing them");
        conns.abort_all();
    }
}
