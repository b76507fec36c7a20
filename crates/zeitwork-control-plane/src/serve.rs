//! The operator's HTTP server: hyper with a header read timeout (a client
//! that sends its request head slowly, or never, is cut off) and a bound on
//! open connections per client address, so one client cannot hold every file
//! descriptor. Shutdown stops accepting, asks open connections to close after
//! their current request, and waits for them a bounded time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// How long shutdown waits for open connections.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            connections_per_client: 256,
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

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, app: axum::Router, mut stop: watch::Receiver<bool>, limits: Limits) {
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
