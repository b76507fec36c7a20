//! Upstream connections: connecting to an instance, and the idle
//! connections kept per worker thread for reuse.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::proxy;

pub(super) const IDLE_PER_UPSTREAM: usize = 256;

thread_local! {
    /// Idle upstream connections by `host:port`, newest last.
    static IDLE: RefCell<HashMap<String, VecDeque<(TcpStream, Instant)>>> = RefCell::new(HashMap::new());
}

pub(super) fn checkout(addr: &str) -> Option<TcpStream> {
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

pub(super) fn checkin(addr: &str, s: TcpStream) {
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

/// `http://host:port` → `host:port`.
pub(super) fn authority(upstream: &str) -> Option<&str> {
    let rest = upstream.strip_prefix("http://")?.trim_end_matches('/');
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

pub(super) async fn connect(addr: &str) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(proxy::CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}
