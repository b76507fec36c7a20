//! Serving connections on one thread per core, each with its own
//! single-threaded Tokio runtime. A connection, and every upstream
//! connection it opens, then lives on one thread: no task crosses threads
//! per request, no work stealing, no cross-core wake-ups — the
//! event-loop-per-core shape of nginx and HAProxy.
//!
//! All workers accept from one socket per port ([`bind_one`]); a worker
//! ahead of the others in open connections leaves new ones to them
//! ([`Spread`]) — even load when connections are few and long-lived, where
//! `SO_REUSEPORT`'s hashing leaves one worker with more than its share.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections each socket holds before the kernel refuses more.
const BACKLOG: i32 = 4096;

/// Worker threads for `requested` (0 = one per available core).
pub fn count(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// One listening socket, `n` handles on it (one per worker). A port held by
/// anyone else is refused ("address in use").
pub fn bind_one(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    let first: std::net::TcpListener = s.into();
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 1..n.max(1) {
        out.push(first.try_clone()?);
    }
    out.insert(0, first);
    Ok(out)
}

/// Open connections per worker; a worker more than [`Spread::SLACK`] ahead
/// of the least loaded one does not accept from a shared socket.
#[derive(Debug)]
pub struct Spread {
    open: Box<[Slot]>,
}

/// One counter per cache line: workers do not contend on each other's.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(std::sync::atomic::AtomicUsize);

/// Counts a worker's open connection until dropped.
#[derive(Debug)]
pub struct Open(Arc<Spread>, usize);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open[self.1].0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Spread {
    pub const SLACK: usize = 1;

    pub fn new(workers: usize) -> Arc<Spread> {
        Arc::new(Spread { open: (0..workers.max(1)).map(|_| Slot::default()).collect() })
    }

    pub fn may_accept(&self, worker: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let mine = self.open[worker].0.load(Relaxed);
        let least = self.open.iter().map(|s| s.0.load(Relaxed)).min().unwrap_or(0);
        mine <= least + Self::SLACK
    }

    pub fn open(self: &Arc<Self>, worker: usize) -> Open {
        self.open[worker].0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Open(self.clone(), worker)
    }
}

/// Running worker threads; [`Workers::join`] waits for all of them.
#[derive(Debug)]
pub struct Workers {
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// Starts `n` threads named `name-i`, each running `serve(i)` to completion
/// on its own current-thread runtime. `serve` returns when its listeners
/// stopped and its connections drained; tasks it left behind are dropped
/// with the runtime.
pub fn spawn<F, Fut>(name: &str, n: usize, serve: F) -> io::Result<Workers>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let serve = Arc::new(serve);
    let mut done = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let serve = serve.clone();
        std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
            rt.block_on(serve(i));
            drop(rt);
            let _ = tx.send(());
        })?;
        done.push(rx);
    }
    Ok(Workers { done })
}

impl Workers {
    /// Resolves when every worker has returned (or panicked).
    pub async fn join(self) {
        for rx in self.done {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    #[test]
    fn a_worker_ahead_leaves_connections_to_the_others() {
        let spread = super::Spread::new(2);
        let a: Vec<_> = (0..2).map(|_| spread.open(0)).collect();
        assert!(!spread.may_accept(0), "two ahead");
        assert!(spread.may_accept(1));
        let _b = spread.open(1);
        assert!(spread.may_accept(0), "one ahead is within the slack");
        drop(a);
        assert!(spread.may_accept(0) && spread.may_accept(1));
    }

    /// All workers take connections from the one port, evenly while they stay open.
    #[tokio::test]
    async fn workers_share_one_port_evenly() {
        let listeners = super::bind_one("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let taken = super::bind_one(addr, 1).expect_err("a port in use is refused");
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
        let listeners = std::sync::Mutex::new(listeners.into_iter().map(Some).collect::<Vec<_>>());
        let spread = super::Spread::new(2);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let workers = super::spawn("test-worker", 2, move |i| {
            let l = listeners.lock().unwrap()[i].take().unwrap();
            let (stop, spread) = (stop_rx.clone(), spread.clone());
            async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let drain = std::time::Duration::from_secs(1);
                crate::accept_until_stopped(l, stop.clone(), drain, Some((spread, i)), move |mut s, _| {
                    let mut stop = stop.clone();
                    async move {
                        let name = std::thread::current().name().unwrap_or("").to_owned();
                        let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                        // Held open until the end, so the counts stay.
                        crate::stopped(&mut stop).await;
                    }
                })
                .await
            }
        })
        .unwrap();
        let mut held = Vec::new();
        let mut per_worker = std::collections::HashMap::new();
        for _ in 0..40 {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut name = String::new();
            r.read_line(&mut name).await.unwrap();
            assert!(name.starts_with("test-worker-"), "served by {name:?}");
            *per_worker.entry(name).or_insert(0) += 1;
            held.push(r);
        }
        let counts: Vec<i32> = per_worker.values().copied().collect();
        assert_eq!(counts.len(), 2, "both workers accept: {per_worker:?}");
        assert!(counts.iter().all(|&c| c >= 18), "open connections stay balanced: {per_worker:?}");
        stop.send(true).unwrap();
        workers.join().await;
    }
}
