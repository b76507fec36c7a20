//! The L4 load balancer: TCP listeners forwarded to edge proxies with
//! round-robin, least-connections or consistent IP-hash, active health
//! checks, and a PROXY protocol v2 header so the edge knows the client.
//!
//! It never looks inside the stream beyond writing that header.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    RoundRobin,
    LeastConnections,
    /// Rendezvous hashing of the client address: a backend leaving moves only its own clients.
    IpHash,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Algorithm::RoundRobin),
            "least-connections" => Ok(Algorithm::LeastConnections),
            "ip-hash" => Ok(Algorithm::IpHash),
            other => Err(format!("{other:?} is not round-robin, least-connections or ip-hash")),
        }
    }
}

/// One listener and where it forwards.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub backends: Vec<SocketAddr>,
    /// Take the backends from the operator's list of edge proxies instead:
    /// their `http` or `https` address (needs `operator_url` and `token`).
    #[serde(default)]
    pub backends_from: Option<EdgePort>,
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    /// Send a PROXY protocol v2 header to the backend (the edge proxy expects one).
    #[serde(default = "yes")]
    pub proxy_protocol: bool,
}

/// Which address of the edge proxies a listener forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgePort {
    Http,
    Https,
}

fn default_algorithm() -> Algorithm {
    Algorithm::LeastConnections
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LbConfig {
    pub listeners: Vec<ListenerConfig>,
    /// Metrics and health listener.
    pub admin_listen: SocketAddr,
    /// Bearer token a scrape of `/metrics` must present (Prometheus `authorization`);
    /// open without one, which suits only a loopback `admin_listen`.
    pub metrics_token: Option<String>,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Failed checks in a row before a backend is taken out.
    pub fall: u32,
    /// Passed checks in a row before it is put back.
    pub rise: u32,
    /// How long open connections may finish after a stop.
    pub drain_timeout_secs: u64,
    pub connect_timeout_ms: u64,
    /// Operator API URL, for listeners with `backends_from`.
    pub operator_url: Option<String>,
    /// A `load-balancer` cluster token.
    pub token: Option<String>,
    /// Threads forwarding connections, each with its own event loop and
    /// listening sockets (0 = one per CPU core).
    pub workers: usize,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
            metrics_token: None,
            health_interval_ms: 1000,
            health_timeout_ms: 500,
            fall: 2,
            rise: 1,
            drain_timeout_secs: 30,
            connect_timeout_ms: 2000,
            operator_url: None,
            token: None,
            workers: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// Where a load balancer without listeners serves the public, as the operations guide has it.
pub const DEFAULT_PUBLIC_PORT: u16 = 8082;
/// Where its metrics and health answer by default.
pub const DEFAULT_ADMIN_PORT: u16 = 8084;

impl LbConfig {
    /// A load balancer given no listener but an operator serves `0.0.0.0:8082`,
    /// forwarding to the edge proxies' HTTP addresses the operator lists.
    pub fn with_default_listener(mut self) -> Self {
        if self.listeners.is_empty() && self.operator_url.is_some() && self.token.is_some() {
            self.listeners.push(ListenerConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PUBLIC_PORT)),
                backends: Vec::new(),
                backends_from: Some(EdgePort::Http),
                algorithm: default_algorithm(),
                proxy_protocol: true,
            });
        }
        self
    }

    pub fn validate(&self) -> Result<(), LbError> {
        let err = |field: String, message: &str| Err(LbError::Config { field, message: message.into() });
        if self.listeners.is_empty() {
            return err(
                "listeners".into(),
                "configure at least one listener with its backends (the edge proxies), or set operator_url and \
                 token to serve 0.0.0.0:8082 from the edges the operator lists",
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.backends.is_empty() && l.backends_from.is_none() {
                return err(
                    format!("listeners[{i}].backends"),
                    "list at least one backend ADDR:PORT, or set backends_from = \"http\" or \"https\"",
                );
            }
            if l.backends_from.is_some() && (self.operator_url.is_none() || self.token.is_none()) {
                return err(
                    format!("listeners[{i}].backends_from"),
                    "backends from the operator need operator_url and a load-balancer token",
                );
            }
        }
        if self.health_interval_ms < 50
            || self.health_timeout_ms == 0
            || self.health_timeout_ms > self.health_interval_ms * 10
        {
            return err(
                "health_interval_ms".into(),
                "use an interval of at least 50 ms and a timeout between 1 ms and 10 intervals",
            );
        }
        if self.fall == 0 || self.rise == 0 {
            return err("fall".into(), "fall and rise must be at least 1");
        }
        if self.metrics_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return err("metrics_token".into(), "leave it out, or set a non-empty token");
        }
        Ok(())
    }
}

/// A backend and what the balancer knows of it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    healthy: AtomicBool,
    active: AtomicUsize,
    streak: AtomicU32,
    /// Left the pool; its health checks end.
    retired: AtomicBool,
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            healthy: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            streak: AtomicU32::new(0),
            retired: AtomicBool::new(false),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Chooses backends for one listener.
#[derive(Debug)]
pub struct Pool {
    backends: std::sync::RwLock<Vec<Arc<Backend>>>,
    algorithm: Algorithm,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(addrs: &[SocketAddr], algorithm: Algorithm) -> Self {
        Self {
            backends: std::sync::RwLock::new(addrs.iter().map(|a| Arc::new(Backend::new(*a))).collect()),
            algorithm,
            next: AtomicUsize::new(0),
        }
    }

    /// The backends now.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `addrs` the backends: new ones are added (returned, for their
    /// health checks), missing ones retire; kept ones keep their state.
    pub fn set(&self, addrs: &[SocketAddr]) -> Vec<Arc<Backend>> {
        let mut backends = self.backends.write().unwrap_or_else(|e| e.into_inner());
        for b in backends.iter().filter(|b| !addrs.contains(&b.addr)) {
            b.retired.store(true, Ordering::Relaxed);
            tracing::info!(backend = %b.addr, "backend left the pool");
        }
        backends.retain(|b| addrs.contains(&b.addr));
        let mut added = Vec::new();
        for a in addrs {
            if !backends.iter().any(|b| b.addr == *a) {
                let b = Arc::new(Backend::new(*a));
                tracing::info!(backend = %a, "backend joined the pool");
                backends.push(b.clone());
                added.push(b);
            }
        }
        added
    }

    /// Backends in the order to try for `client`: the chosen one first, then
    /// the others as fallbacks. Unhealthy backends come last.
    pub fn order(&self, client: IpAddr) -> Vec<Arc<Backend>> {
        let all = self.backends();
        let mut healthy: Vec<Arc<Backend>> = all.iter().filter(|b| b.is_healthy()).cloned().collect();
        let mut sick: Vec<Arc<Backend>> = all.iter().filter(|b| !b.is_healthy()).cloned().collect();
        match self.algorithm {
            Algorithm::RoundRobin => {
                if !healthy.is_empty() {
                    let n = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
                    healthy.rotate_left(n);
                }
            }
            Algorithm::LeastConnections => {
                if !healthy.is_empty() {
                    // Ties rotate so equal backends share the load.
                    let n = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
                    healthy.rotate_left(n);
                    healthy.sort_by_key(|b| b.active());
                }
            }
            Algorithm::IpHash => {
                let score = |b: &Arc<Backend>| rendezvous(client, b.addr);
                healthy.sort_by_key(|b| std::cmp::Reverse(score(b)));
                sick.sort_by_key(|b| std::cmp::Reverse(score(b)));
            }
        }
        healthy.append(&mut sick);
        healthy
    }
}

/// Highest-random-weight score of a (client, backend) pair.
fn rendezvous(client: IpAddr, backend: SocketAddr) -> u64 {
    let mut h = DefaultHasher::new();
    // IPv6 clients hash by their /64, like the rate limiter counts them.
    zeitwork_net::client_key(client).hash(&mut h);
    backend.hash(&mut h);
    h.finish()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug)]
struct Metrics {
    http: zeitwork_telemetry::HttpMetrics,
    connections: Family<BackendLabel, Counter>,
    active: Family<BackendLabel, Gauge>,
    healthy: Family<BackendLabel, Gauge>,
    failed: Counter,
}

impl Metrics {
    fn new() -> Self {
        let m = Self {
            http: zeitwork_telemetry::HttpMetrics::new("zeitwork_lb"),
            connections: Family::default(),
            active: Family::default(),
            healthy: Family::default(),
            failed: Counter::default(),
        };
        m.http.with_registry(|r| {
            r.register("connections", "Connections forwarded, by backend", m.connections.clone());
            r.register("active_connections", "Connections open, by backend", m.active.clone());
            r.register("backend_healthy", "1 when the backend passes its health checks", m.healthy.clone());
            r.register("failed_connections", "Connections no backend would take", m.failed.clone());
        });
        m
    }

    fn label(b: &Backend) -> BackendLabel {
        BackendLabel { backend: b.addr.to_string() }
    }
}

/// A running load balancer.
#[derive(Debug)]
pub struct LoadBalancer {
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    pub pools: Vec<Arc<Pool>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    forwarding: zeitwork_net::workers::Workers,
}

impl LoadBalancer {
    pub async fn start(config: LbConfig) -> Result<LoadBalancer, LbError> {
        config.validate()?;
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut addrs = Vec::new();
        let mut pools = Vec::new();
        let workers = zeitwork_net::workers::count(config.workers);
        // Per worker: its socket of every listener, with what it forwards to.
        type Share = (std::net::TcpListener, Arc<Pool>, bool, Arc<zeitwork_net::workers::Spread>);
        let mut shares: Vec<Vec<Share>> = (0..workers).map(|_| Vec::new()).collect();
        for l in &config.listeners {
            let sockets = zeitwork_net::workers::bind_one(l.listen, workers)
                .map_err(|source| LbError::Listen { addr: l.listen, source })?;
            addrs.push(sockets[0].local_addr().map_err(|source| LbError::Listen { addr: l.listen, source })?);
            let pool = Arc::new(Pool::new(&l.backends, l.algorithm));
            for b in pool.backends() {
                metrics.healthy.get_or_create(&Metrics::label(&b)).set(1);
                tasks.push(tokio::spawn(health_check(b, config.clone(), metrics.clone(), stop_rx.clone())));
            }
            if let Some(port) = l.backends_from {
                tasks.push(tokio::spawn(follow_edges(
                    pool.clone(),
                    port,
                    config.clone(),
                    metrics.clone(),
                    stop_rx.clone(),
                )));
            }
            let spread = zeitwork_net::workers::Spread::new(workers);
            for (share, socket) in shares.iter_mut().zip(sockets) {
                share.push((socket, pool.clone(), l.proxy_protocol, spread.clone()));
            }
            pools.push(pool);
        }
        let shares = std::sync::Mutex::new(shares);
        let (cfg, m, stop_w) = (config.clone(), metrics.clone(), stop_rx.clone());
        let forwarding = zeitwork_net::workers::spawn("zeitwork-lb", workers, move |i| {
            let mine = std::mem::take(&mut shares.lock().unwrap_or_else(|e| e.into_inner())[i]);
            let (config, metrics, stop) = (cfg.clone(), m.clone(), stop_w.clone());
            async move {
                let mut loops = tokio::task::JoinSet::new();
                for (socket, pool, proxy_protocol, spread) in mine {
                    match TcpListener::from_std(socket) {
                        Ok(l) => {
                            let (config, metrics, stop) = (config.clone(), metrics.clone(), stop.clone());
                            let spread = (spread, i);
                            loops.spawn(accept_loop(l, pool, proxy_protocol, config, metrics, stop, spread));
                        }
                        Err(e) => tracing::error!(error = %e, "cannot serve a listener"),
                    }
                }
                while loops.join_next().await.is_some() {}
            }
        })
        .map_err(|source| LbError::Listen { addr: config.admin_listen, source })?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| LbError::Listen { addr: config.admin_listen, source })?;
        let admin_addr = admin.local_addr().map_err(|source| LbError::Listen { addr: config.admin_listen, source })?;
        if config.metrics_token.is_none() && !config.admin_listen.ip().is_loopback() {
            tracing::warn!(
                admin_listen = %config.admin_listen,
                "metrics are served without a token beyond loopback; set metrics_token"
            );
        }
        tasks.push(tokio::spawn(zeitwork_telemetry::serve_admin(
            admin,
            metrics.http.clone(),
            config.metrics_token.clone(),
            stop_rx.clone(),
        )));
        tracing::info!(listeners = ?addrs, "load balancer listening");
        Ok(LoadBalancer { addrs, admin_addr, pools, stop, tasks, forwarding })
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting; open connections get `drain_timeout_secs` to finish.
    pub async fn shutdown(self) {
        // The tasks may have ended already; then no one listens.
        let _ = self.stop.send(true);
        for t in self.tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a load balancer task failed while stopping");
            }
        }
        self.forwarding.join().await;
    }
}

/// Keeps a pool equal to the operator's live edge proxies (their `port`
/// address), checking every 2 s; keeps the last set while the operator is away.
async fn follow_edges(
    pool: Arc<Pool>,
    port: EdgePort,
    config: Arc<LbConfig>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let (Some(url), Some(token)) = (config.operator_url.clone(), config.token.clone()) else { return };
    let client = zeitwork_client::Client::new(&url, Some(token));
    let mut warned = false;
    loop {
        match client.get::<Vec<zeitwork_api_types::EdgeInfo>>("/api/v1/edges").await {
            Ok(edges) => {
                warned = false;
                let mut addrs: Vec<SocketAddr> = edges
                    .iter()
                    .filter_map(|e| match port {
                        EdgePort::Http => e.http_address.as_deref(),
                        EdgePort::Https => e.https_address.as_deref(),
                    })
                    .filter_map(|a| a.parse().ok())
                    .collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    tracing::warn!("the operator lists no edge proxy; keeping the current backends");
                } else {
                    for b in pool.set(&addrs) {
                        metrics.healthy.get_or_create(&Metrics::label(&b)).set(1);
                        tokio::spawn(health_check(b, config.clone(), metrics.clone(), stop.clone()));
                    }
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot read the edge proxies from the operator; keeping the current backends");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
    }
}

async fn health_check(b: Arc<Backend>, config: Arc<LbConfig>, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(config.health_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
        if b.retired.load(Ordering::Relaxed) {
            return;
        }
        let ok = matches!(
            tokio::time::timeout(Duration::from_millis(config.health_timeout_ms), TcpStream::connect(b.addr)).await,
            Ok(Ok(_))
        );
        let healthy = b.is_healthy();
        if ok == healthy {
            b.streak.store(0, Ordering::Relaxed);
            continue;
        }
        let streak = b.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if healthy { config.fall } else { config.rise };
        if streak >= needed {
            b.healthy.store(ok, Ordering::Relaxed);
            b.streak.store(0, Ordering::Relaxed);
            metrics.healthy.get_or_create(&Metrics::label(&b)).set(i64::from(ok));
            if ok {
                tracing::info!(backend = %b.addr, "backend is back");
            } else {
                tracing::warn!(backend = %b.addr, "backend failed its health checks; taken out");
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    pool: Arc<Pool>,
    proxy_protocol: bool,
    config: Arc<LbConfig>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
    spread: (Arc<zeitwork_net::workers::Spread>, usize),
) {
    let drain = Duration::from_secs(config.drain_timeout_secs);
    zeitwork_net::accept_until_stopped(listener, stop, drain, Some(spread), move |client, peer| {
        forward(client, peer, pool.clone(), proxy_protocol, config.clone(), metrics.clone())
    })
    .await;
}

struct Active<'a>(&'a Backend, Gauge);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    pool: Arc<Pool>,
    proxy_protocol: bool,
    config: Arc<LbConfig>,
    metrics: Metrics,
) {
    let local = client.local_addr().unwrap_or(peer);
    for backend in pool.order(peer.ip()) {
        let connect =
            tokio::time::timeout(Duration::from_millis(config.connect_timeout_ms), TcpStream::connect(backend.addr))
                .await;
        let mut upstream = match connect {
            Ok(Ok(s)) => s,
            _ => {
                tracing::debug!(backend = %backend.addr, "connect failed; trying the next backend");
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        backend.active.fetch_add(1, Ordering::Relaxed);
        let label = Metrics::label(&backend);
        let gauge = metrics.active.get_or_create(&label).clone();
        gauge.inc();
        let _active = Active(&backend, gauge);
        metrics.connections.get_or_create(&label).inc();
        if proxy_protocol && upstream.write_all(&zeitwork_net::encode_v2(peer, local)).await.is_err() {
            return;
        }
        // Bulk data moves between the sockets inside the kernel (splice).
        let _ = zeitwork_net::splice_bidirectional(&client, &upstream).await;
        return;
    }
    metrics.failed.inc();
    tracing::warn!(client = %peer, "no backend accepted the connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect()
    }

    #[test]
    fn without_listeners_it_serves_the_guides_ports_from_the_operators_edges() {
        let bare = LbConfig::default().with_default_listener();
        assert!(bare.listeners.is_empty(), "no operator, no default listener");
        assert!(bare.validate().unwrap_err().to_string().contains("operator_url"));
        let c =
            LbConfig { operator_url: Some("http://ops:8080".into()), token: Some("t".into()), ..Default::default() }
                .with_default_listener();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].listen, "0.0.0.0:8082".parse().unwrap());
        assert_eq!(c.listeners[0].backends_from, Some(EdgePort::Http));
        assert!(c.listeners[0].proxy_protocol);
        assert_eq!(c.admin_listen, "127.0.0.1:8084".parse().unwrap());
        c.validate().unwrap();
        // Configured listeners are kept as they are.
        let own = LbConfig {
            operator_url: Some("http://ops:8080".into()),
            token: Some("t".into()),
            listeners: vec![ListenerConfig {
                listen: "0.0.0.0:443".parse().unwrap(),
                backends: addrs(1),
                backends_from: None,
                algorithm: Algorithm::RoundRobin,
                proxy_protocol: true,
            }],
            ..Default::default()
        }
        .with_default_listener();
        assert_eq!(own.listeners.len(), 1);
        assert_eq!(own.listeners[0].listen.port(), 443);
    }

    #[test]
    fn ip_hash_moves_only_the_leaving_backends_clients() {
        let all = addrs(4);
        let before = Pool::new(&all, Algorithm::IpHash);
        let after = Pool::new(&all[..3], Algorithm::IpHash);
        let mut moved = 0;
        let mut on_removed = 0;
        for i in 0..2000u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let a = before.order(ip)[0].addr;
            let b = after.order(ip)[0].addr;
            if a == all[3] {
                on_removed += 1;
            } else if a != b {
                moved += 1;
            }
            // Stable for the same client.
            assert_eq!(before.order(ip)[0].addr, a);
        }
        assert_eq!(moved, 0, "clients of the remaining backends stay put");
        assert!((350..650).contains(&on_removed), "about a quarter lived on the removed backend: {on_removed}");
    }

    #[test]
    fn round_robin_and_least_connections() {
        let p = Pool::new(&addrs(3), Algorithm::RoundRobin);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let picks: Vec<SocketAddr> = (0..6).map(|_| p.order(ip)[0].addr).collect();
        assert_eq!(picks[..3].iter().collect::<std::collections::HashSet<_>>().len(), 3);
        assert_eq!(picks[..3], picks[3..]);
        let p = Pool::new(&addrs(3), Algorithm::LeastConnections);
        p.backends()[0].active.store(5, Ordering::Relaxed);
        p.backends()[2].active.store(5, Ordering::Relaxed);
        for _ in 0..5 {
            assert_eq!(p.order(ip)[0].addr, addrs(3)[1]);
        }
        p.backends()[1].healthy.store(false, Ordering::Relaxed);
        assert_ne!(p.order(ip)[0].addr, addrs(3)[1], "unhealthy backends come last");
        assert_eq!(p.order(ip).last().unwrap().addr, addrs(3)[1]);
    }

    #[test]
    fn a_pool_follows_a_new_backend_set_keeping_known_backends() {
        let p = Pool::new(&addrs(2), Algorithm::RoundRobin);
        let first = p.backends()[0].clone();
        first.active.store(3, Ordering::Relaxed);
        let mut next = addrs(3)[..1].to_vec();
        next.push(addrs(3)[2]);
        let added = p.set(&next);
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].addr, addrs(3)[2]);
        let now = p.backends();
        assert_eq!(now.len(), 2);
        assert!(Arc::ptr_eq(&now[0], &first), "a kept backend keeps its state");
        assert!(!now.iter().any(|b| b.addr == addrs(2)[1]), "the missing one left");
        assert!(p.set(&next).is_empty(), "the same set changes nothing");
    }
}
