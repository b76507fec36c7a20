//! The edge proxy: terminates TLS, routes by host to node agents that hold
//! ready instances, limits per-IP request rates, and follows the operator's
//! routing table.
//!
//! It never reads the store and never serves a host it has no route for: an
//! unknown host gets Zeitwork's own 404 page and no other tenant's certificate.

pub mod acme;
pub mod balance;
mod h1;
pub mod proxy;
pub mod ratelimit;
pub mod shadow;
pub mod skew;
pub mod table;
pub mod tls;
pub mod traffic;
pub mod wake;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zeitwork_api_types::{RateLimit, RoutingTable};
use zeitwork_client::Client;
use zeitwork_net::Cidr;

use crate::proxy::ConnInfo;

/// Edge proxy settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Plain HTTP/1.1 listener.
    pub http_listen: SocketAddr,
    /// TLS listener (HTTP/2 and HTTP/1.1 by ALPN); off when no certificate is configured.
    pub https_listen: SocketAddr,
    /// Metrics and health listener.
    pub admin_listen: SocketAddr,
    /// Bearer token a scrape of `/metrics` must present (Prometheus `authorization`);
    /// open without one, which suits only a loopback `admin_listen`.
    pub metrics_token: Option<String>,
    pub operator_url: String,
    /// An `edge-proxy` cluster token.
    pub token: Option<String>,
    /// PEM certificate and key for `*.<apps domain>`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Peers whose PROXY protocol v2 header is trusted (the load balancers),
    /// as addresses or CIDR blocks. Nobody else's is.
    pub trusted_proxies: Vec<String>,
    /// Per-client limit for projects without their own.
    pub rate_limit: RateLimit,
    /// Most clients tracked by the rate limiter (memory bound).
    pub rate_limit_clients: usize,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    /// This edge's name in issuance leases (default: host name and process id).
    pub name: String,
    /// ACME directory URL (e.g. Let's Encrypt's); custom domains get no certificates without it.
    pub acme_directory: Option<String>,
    /// Contact e-mail for the ACME account.
    pub acme_contact: Option<String>,
    /// Extra root certificate (PEM) trusted for the ACME server's own HTTPS (test CAs).
    pub acme_ca_root: Option<PathBuf>,
    pub acme_challenge: acme::Challenge,
    /// Renew certificates this many days before they expire.
    pub renew_before_days: u32,
    /// The address load balancers reach this edge at; announced to the
    /// operator with the listeners' ports. Default: the listen address, when
    /// it is a specific one.
    pub advertise_address: Option<std::net::IpAddr>,
    /// Threads serving client connections, each with its own event loop,
    /// listening socket and upstream connections (0 = one per CPU core).
    pub workers: usize,
    /// Seconds a request for a sleeping deployment is held while it wakes,
    /// before it is answered 503 with `Retry-After`.
    pub wake_hold_secs: u64,
}

/// Tells the operator every 5 s where this edge listens (load balancers follow the list).
async fn announce_loop(
    client: Client,
    name: String,
    me: zeitwork_api_types::EdgeRegistration,
    mut stop: watch::Receiver<bool>,
) {
    let path = format!("/api/v1/edges/{}", zeitwork_client::encode(&name));
    let mut warned = false;
    loop {
        match client.put::<_, serde_json::Value>(&path, &me).await {
            Ok(_) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot announce this edge to the operator");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            https_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8084)),
            metrics_token: None,
            operator_url: "http://127.0.0.1:8080".into(),
            token: None,
            tls_cert: None,
            tls_key: None,
            trusted_proxies: Vec::new(),
            rate_limit: RateLimit { requests_per_second: 100, burst: 200 },
            rate_limit_clients: 100_000,
            max_body_bytes: 512 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 30,
            name: format!(
                "{}-{}",
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "edge".into()),
                std::process::id()
            ),
            acme_directory: None,
            advertise_address: None,
            workers: 0,
            wake_hold_secs: 30,
            acme_contact: None,
            acme_ca_root: None,
            acme_challenge: acme::Challenge::Http01,
            renew_before_days: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("config field `{field}`: {message}")]
    Config { field: &'static str, message: String },
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl EdgeConfig {
    pub fn validate(&self) -> Result<Vec<Cidr>, EdgeError> {
        let err = |field, message: String| Err(EdgeError::Config { field, message });
        if self.token.as_deref().unwrap_or("").is_empty() {
            return err(
                "token",
                "an edge-proxy token is required; create one with `zeitwork tokens create edge --cluster edge-proxy`"
                    .into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return err("tls_cert", "set both tls_cert and tls_key, or neither".into());
        }
        if self.rate_limit.requests_per_second == 0 || self.rate_limit.burst == 0 {
            return err("rate_limit", "requests_per_second and burst must be at least 1".into());
        }
        if self.max_header_bytes < 8192 {
            return err("max_header_bytes", "use at least 8192".into());
        }
        if !(1..=300).contains(&self.wake_hold_secs) {
            return err("wake_hold_secs", format!("{} is out of range; use 1 to 300", self.wake_hold_secs));
        }
        if self.idle_timeout_secs == 0 || self.header_read_timeout_secs == 0 {
            return err("idle_timeout_secs", "timeouts must be at least 1 second".into());
        }
        if self.metrics_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return err("metrics_token", "leave it out, or set a non-empty token".into());
        }
        self.trusted_proxies
            .iter()
            .map(|s| s.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .or_else(|m| err("trusted_proxies", m))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStatus {
    host: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HostLabel {
    host: String,
}

/// Edge metrics, registered next to the HTTP server metrics.
#[derive(Clone, Debug)]
pub struct EdgeMetrics {
    pub http: zeitwork_telemetry::HttpMetrics,
    requests: Family<HostStatus, Counter>,
    latency: Family<HostLabel, Histogram>,
    pub upstream_errors: Counter,
    pub retries: Counter,
    pub rate_limited: Counter,
    pub open_connections: Gauge,
    pub routing_version_age: Gauge,
    cert_expiry: Family<HostLabel, Gauge>,
}

impl EdgeMetrics {
    fn new() -> Self {
        let http = zeitwork_telemetry::HttpMetrics::new("zeitwork_edge");
        let m = Self {
            http,
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            upstream_errors: Counter::default(),
            retries: Counter::default(),
            rate_limited: Counter::default(),
            open_connections: Gauge::default(),
            routing_version_age: Gauge::default(),
            cert_expiry: Family::default(),
        };
        m.http.with_registry(|r| {
            r.register("requests", "Proxied requests by host and status", m.requests.clone());
            r.register("request_duration_seconds", "Proxied request latency by host", m.latency.clone());
            r.register("upstream_errors", "Requests that could not reach an instance", m.upstream_errors.clone());
            r.register("retries", "Requests retried on another instance", m.retries.clone());
            r.register("rate_limited", "Requests refused by a rate limit", m.rate_limited.clone());
            r.register("open_connections", "Client connections open", m.open_connections.clone());
            r.register(
                "certificate_expiry_timestamp_seconds",
                "When each served certificate expires",
                m.cert_expiry.clone(),
            );
        });
        m
    }

    fn observe(&self, host: Option<&str>, status: u16, took: Duration) {
        // Only routed hosts become labels, so clients cannot grow the series.
        let host = host.unwrap_or("unrouted");
        // The series a thread used last are kept at hand: no lock shared
        // with the other workers and no label built per request.
        let me = self as *const EdgeMetrics as usize;
        RECENT_SERIES.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some((.., c, h)) = recent.iter().find(|(m, s, h, ..)| *m == me && *s == status && h == host) {
                c.inc();
                h.observe(took.as_secs_f64());
                return;
            }
            let owned = host.to_owned();
            let c = self.requests.get_or_create(&HostStatus { host: owned.clone(), status }).clone();
            let h = self.latency.get_or_create(&HostLabel { host: owned.clone() }).clone();
            c.inc();
            h.observe(took.as_secs_f64());
            if recent.len() >= 16 {
                recent.remove(0);
            }
            recent.push((me, status, owned, c, h));
        });
    }
}

type Series = (usize, u16, String, Counter, Histogram);

thread_local! {
    /// Per thread: (metrics, status, host) → the request counter and latency histogram.
    static RECENT_SERIES: std::cell::RefCell<Vec<Series>> = const { std::cell::RefCell::new(Vec::new()) };
}

type RoutesCopy = (usize, u64, HashMap<String, Arc<zeitwork_api_types::Route>>);

thread_local! {
    /// Per thread: (edge, generation) → its copy of the routes.
    static ROUTES_COPY: std::cell::RefCell<Option<RoutesCopy>> = const { std::cell::RefCell::new(None) };
}

/// What every request can reach.
#[derive(Debug)]
pub struct EdgeState {
    pub config: EdgeConfig,
    pub routes: RwLock<Arc<table::Routes>>,
    /// Bumped after every change of `routes`; threads keep their own copy until then.
    routes_generation: AtomicU64,
    pub balancer: balance::Balancer,
    pub limiter: ratelimit::RateLimiter,
    pub certs: Arc<tls::CertStore>,
    pub metrics: EdgeMetrics,
    /// The operator, as this edge (routing, certificates, challenges).
    pub operator: Client,
    trusted: Vec<Cidr>,
    /// ACME HTTP-01 answers by (host, token).
    acme: RwLock<HashMap<(String, String), String>>,
    /// Requests held for waking deployments, and request activity for the operator.
    pub wakes: wake::Wakes,
    /// Per-deployment requests, 5xx answers and latency for the operator's release analysis.
    pub traffic: traffic::Traffic,
    /// Copies of requests to candidates in their shadow stage.
    pub mirrors: shadow::Mirrors,
}

impl EdgeState {
    pub(crate) fn apps_domain(&self) -> String {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).apps_domain.clone()
    }

    pub fn acme_answer(&self, host: &str, token: &str) -> Option<String> {
        self.acme.read().unwrap_or_else(|e| e.into_inner()).get(&(host.to_owned(), token.to_owned())).cloned()
    }

    /// Publishes an HTTP-01 challenge answer (any edge may be asked for it).
    pub fn set_acme_answer(&self, host: &str, token: &str, key_authorization: Option<String>) {
        let mut m = self.acme.write().unwrap_or_else(|e| e.into_inner());
        match key_authorization {
            Some(k) => m.insert((host.to_owned(), token.to_owned()), k),
            None => m.remove(&(host.to_owned(), token.to_owned())),
        };
    }

    fn apply(&self, t: &RoutingTable) {
        let old = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let changes = table::diff(&old, t);
        self.apply_changes(&old, &t.version, &t.apps_domain, changes);
    }

    /// Applies an answer of the operator's delta watch: a snapshot as a
    /// whole table, otherwise only the routes it names.
    fn apply_deltas(&self, d: zeitwork_api_types::RoutingDeltas) {
        if d.snapshot {
            let t = RoutingTable { version: d.version, apps_domain: d.apps_domain, routes: d.routes };
            return self.apply(&t);
        }
        let old = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut changes: Vec<table::Change> =
            d.routes.into_iter().map(|r| table::Change::Upsert(Box::new(r))).collect();
        changes.extend(d.removed.into_iter().map(table::Change::Remove));
        self.apply_changes(&old, &d.version, &d.apps_domain, changes);
    }

    fn apply_changes(&self, old: &table::Routes, version: &str, apps_domain: &str, changes: Vec<table::Change>) {
        if changes.is_empty() && old.version == version {
            return;
        }
        for c in &changes {
            match c {
                table::Change::Upsert(r) => {
                    tracing::info!(host = %r.host, deployment = %r.deployment, instances = r.instances.len(), "route set")
                }
                table::Change::Remove(h) => tracing::info!(host = %h, "route removed"),
            }
        }
        let next = table::apply(old, version, apps_domain, changes);
        let live: HashSet<String> =
            next.hosts.values().flat_map(|r| r.instances.iter().map(|i| i.id.clone())).collect();
        let serving: HashSet<&str> =
            next.hosts.values().filter(|r| !r.instances.is_empty()).map(|r| r.deployment.as_str()).collect();
        self.wakes.woken(&serving);
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        self.routes_generation.fetch_add(1, Ordering::Release);
        self.balancer.retain(&live);
        self.wakes.table_changed();
    }

    /// The route of `host`, from this thread's own copy of the table: the
    /// lookup on every request touches no lock or counter shared with other
    /// cores. The copy is renewed when the table changes.
    pub(crate) fn route(&self, host: &str) -> Option<Arc<zeitwork_api_types::Route>> {
        let me = self as *const EdgeState as usize;
        let generation = self.routes_generation.load(Ordering::Acquire);
        ROUTES_COPY.with(|copy| {
            let mut copy = copy.borrow_mut();
            if !matches!(&*copy, Some((owner, g, _)) if *owner == me && *g == generation) {
                let table = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
                let hosts = table.hosts.iter().map(|(h, r)| (h.clone(), Arc::new((**r).clone()))).collect();
                *copy = Some((me, generation, hosts));
            }
            copy.as_ref().and_then(|(.., hosts)| hosts.get(host).cloned())
        })
    }
}

/// A running edge proxy.
#[derive(Debug)]
pub struct EdgeProxy {
    pub state: Arc<EdgeState>,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// Sent once open connections are done.
    drained: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: zeitwork_net::workers::Workers,
}

impl EdgeProxy {
    pub async fn start(config: EdgeConfig) -> Result<EdgeProxy, EdgeError> {
        let trusted = config.validate()?;
        let certs = Arc::new(tls::CertStore::default());
        // What open requests still need while they drain (the routing table a
        // held request waits on, the figures of their answers) stops after them.
        let (drained, drained_rx) = watch::channel(false);
        let metrics = EdgeMetrics::new();
        let mirrors = shadow::Mirrors::new(drained_rx.clone());
        metrics.http.with_registry(|r| {
            r.register(
                "shadow_copies",
                "Shadow copies of requests sent to a candidate deployment",
                mirrors.sent.clone(),
            );
            r.register(
                "shadow_dropped",
                "Shadow copies dropped because too many were in flight",
                mirrors.dropped.clone(),
            );
        });
        let state = Arc::new(EdgeState {
            routes: RwLock::new(Arc::new(table::Routes::default())),
            routes_generation: AtomicU64::new(0),
            balancer: balance::Balancer::default(),
            limiter: ratelimit::RateLimiter::new(config.rate_limit_clients),
            certs: certs.clone(),
            metrics,
            trusted,
            acme: RwLock::new(HashMap::new()),
            operator: Client::new(&config.operator_url, config.token.clone()),
            wakes: wake::Wakes::default(),
            traffic: traffic::Traffic::default(),
            mirrors,
            config,
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| EdgeError::Listen { addr, source })
        };
        let workers = zeitwork_net::workers::count(state.config.workers);
        let bind_shared = |addr: SocketAddr| {
            let ls =
                zeitwork_net::workers::bind_one(addr, workers).map_err(|source| EdgeError::Listen { addr, source })?;
            let at = ls[0].local_addr().map_err(|source| EdgeError::Listen { addr, source })?;
            Ok::<_, EdgeError>((ls, at))
        };

        let (http, http_addr) = bind_shared(state.config.http_listen)?;
        let https = match (&state.config.tls_cert, &state.config.tls_key) {
            (None, None) if state.config.acme_directory.is_some() => Some(bind_shared(state.config.https_listen)?),
            (Some(cert), Some(key)) => {
                // The apps domain is learnt from the operator; until then the wildcard is keyed by the cert's own use.
                let client = Client::new(&state.config.operator_url, state.config.token.clone());
                let apps =
                    client.get::<RoutingTable>("/api/v1/routing").await.map(|t| t.apps_domain).unwrap_or_default();
                certs.set_wildcard(&apps, tls::load_pem(cert, key)?);
                tasks.push(tokio::spawn(tls::watch_files(
                    certs.clone(),
                    apps,
                    cert.clone(),
                    key.clone(),
                    stop_rx.clone(),
                )));
                Some(bind_shared(state.config.https_listen)?)
            }
            _ => None,
        };
        let https_addr = https.as_ref().map(|(_, at)| *at);
        let acceptor = https.is_some().then(|| tls::server_config(certs.clone()));

        // Client connections are served on one event loop per core; the
        // control work below stays on the caller's runtime.
        // Worker i takes handle i of each port.
        let listeners: Vec<_> = match https {
            Some((tls, _)) => http.into_iter().zip(tls.into_iter().map(Some)).map(Some).collect(),
            None => http.into_iter().map(|l| Some((l, None))).collect(),
        };
        let listeners = std::sync::Mutex::new(listeners);
        let (st, stop_w) = (state.clone(), stop_rx.clone());
        let spreads = (zeitwork_net::workers::Spread::new(workers), zeitwork_net::workers::Spread::new(workers));
        let pool = zeitwork_net::workers::spawn("zeitwork-edge", workers, move |i| {
            let mine = listeners.lock().unwrap_or_else(|e| e.into_inner())[i].take();
            let (state, stop, acceptor) = (st.clone(), stop_w.clone(), acceptor.clone());
            let (plain, secure) = (spreads.0.clone(), spreads.1.clone());
            async move {
                let Some((http, https)) = mine else { return };
                let serve = |l: std::net::TcpListener,
                             tls: Option<Arc<rustls::ServerConfig>>,
                             spread: Arc<zeitwork_net::workers::Spread>| {
                    let (state, stop) = (state.clone(), stop.clone());
                    async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => accept_loop(l, tls, state, stop, (spread, i)).await,
                            Err(e) => tracing::error!(error = %e, "cannot serve a listener"),
                        }
                    }
                };
                match https {
                    Some(l) => tokio::join!(serve(http, None, plain), serve(l, acceptor, secure)).0,
                    None => serve(http, None, plain).await,
                }
            }
        })
        .map_err(|source| EdgeError::Listen { addr: state.config.http_listen, source })?;

        let admin = bind(state.config.admin_listen).await?;
        let admin_addr =
            admin.local_addr().map_err(|source| EdgeError::Listen { addr: state.config.admin_listen, source })?;
        if state.config.metrics_token.is_none() && !state.config.admin_listen.ip().is_loopback() {
            tracing::warn!(
                admin_listen = %state.config.admin_listen,
                "metrics are served without a token beyond loopback; set metrics_token"
            );
        }
        tasks.push(tokio::spawn(zeitwork_telemetry::serve_admin(
            admin,
            state.metrics.http.clone(),
            state.config.metrics_token.clone(),
            stop_rx.clone(),
        )));

        let client = Client::new(&state.config.operator_url, state.config.token.clone());
        tasks.push(tokio::spawn(acme::run(state.clone(), stop_rx.clone())));
        let announce = |addr: SocketAddr| {
            let ip = state.config.advertise_address.or(Some(addr.ip()).filter(|ip| !ip.is_unspecified()))?;
            Some(SocketAddr::new(ip, addr.port()).to_string())
        };
        let me = zeitwork_api_types::EdgeRegistration {
            http_address: announce(http_addr),
            https_address: https_addr.and_then(announce),
        };
        if me.http_address.is_some() || me.https_address.is_some() {
            tasks.push(tokio::spawn(announce_loop(client.clone(), state.config.name.clone(), me, stop_rx.clone())));
        } else {
            tracing::info!("not announced to load balancers: listening on all addresses; set advertise_address");
        }
        tasks.push(tokio::spawn(wake::report_loop(state.clone(), client.clone(), drained_rx.clone())));
        tasks.push(tokio::spawn(traffic::report_loop(state.clone(), client.clone(), drained_rx.clone())));
        tasks.push(tokio::spawn(follow(client, state.clone(), drained_rx)));
        tracing::info!(%http_addr, https = ?https_addr, "edge proxy listening");
        Ok(EdgeProxy { state, http_addr, https_addr, admin_addr, stop, drained, tasks, workers: pool })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn routing_version(&self) -> String {
        self.state.routes.read().unwrap_or_else(|e| e.into_inner()).version.clone()
    }

    /// Waits until the edge serves a table whose version is not `old` (tests, startup).
    pub async fn wait_for_change(&self, old: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.routing_version() != old {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Stops accepting, lets open requests finish (connections are asked to
    /// close; a request held for a waking deployment is still answered once it
    /// wakes, within `wake_hold_secs`), then returns.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        self.workers.join().await;
        self.drained.send_replace(true);
        for t in self.tasks {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "an edge task ended abnormally");
            }
        }
    }
}

/// Follows the operator's routing table by deltas (the whole table on
/// connect and after a gap); on failure keeps serving the last one. An
/// operator without the delta watch is followed by whole tables.
async fn follow(client: Client, state: Arc<EdgeState>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    // Where this edge stands in the operator's log; none until the first answer.
    let mut cursor: Option<String> = None;
    let mut whole_tables = false;
    loop {
        let res = if whole_tables {
            let version = state.routes.read().unwrap_or_else(|e| e.into_inner()).version.clone();
            let path = format!("/api/v1/routing/watch?version={}&timeout=25", zeitwork_client::encode(&version));
            tokio::select! {
                r = client.get::<RoutingTable>(&path) => r.map(|t| state.apply(&t)),
                _ = zeitwork_net::stopped(&mut stop) => return,
            }
        } else {
            let path = match &cursor {
                Some(c) => format!("/api/v1/routing/deltas?since={}&timeout=25", zeitwork_client::encode(c)),
                None => "/api/v1/routing/deltas?timeout=25".to_owned(),
            };
            tokio::select! {
                r = client.get::<zeitwork_api_types::RoutingDeltas>(&path) => r.map(|d| {
                    cursor = Some(d.cursor.clone());
                    state.apply_deltas(d);
                }),
                _ = zeitwork_net::stopped(&mut stop) => return,
            }
        };
        match res {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) if !whole_tables && e.status() == Some(404) => {
                tracing::info!("the operator has no delta watch; following whole tables");
                whole_tables = true;
            }
            Err(e) => {
                // Resume from the same cursor: the operator answers with a
                // snapshot if it cannot (restarted, another operator, too far behind).
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot follow the routing table; serving the last one");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = zeitwork_net::stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<EdgeState>,
    stop: watch::Receiver<bool>,
    spread: (Arc<zeitwork_net::workers::Spread>, usize),
) {
    let conn_stop = stop.clone();
    // Open connections finish their requests; they get a bounded time, enough
    // for a request held while its deployment wakes.
    let drain = Duration::from_secs(30.max(state.config.wake_hold_secs + 5));
    zeitwork_net::accept_until_stopped(listener, stop, drain, Some(spread), move |stream, peer| {
        connection(stream, peer, tls.clone(), state.clone(), conn_stop.clone())
    })
    .await;
}

struct OpenConn<'a>(&'a Gauge);

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<EdgeState>,
    stop: watch::Receiver<bool>,
) {
    state.metrics.open_connections.inc();
    let _open = OpenConn(&state.metrics.open_connections);
    let header_timeout = Duration::from_secs(state.config.header_read_timeout_secs);
    let mut client = peer;
    if state.trusted.iter().any(|c| c.contains(peer.ip())) {
        match tokio::time::timeout(header_timeout, zeitwork_net::read_v2(&mut stream)).await {
            Ok(Ok(Some(src))) => client = src,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "dropping a connection from a load balancer");
                return;
            }
            Err(_) => return,
        }
    }
    match tls {
        None => h1::serve(stream, ConnInfo { client, tls: false, sni: None }, state.clone(), stop).await,
        Some(config) => {
            let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
            let Ok(Ok(start)) = tokio::time::timeout(header_timeout, lazy).await else { return };
            let hello = start.client_hello();
            let sni = hello.server_name().map(str::to_owned);
            let acme_alpn = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == acme::ACME_TLS_ALPN));
            if acme_alpn {
                // TLS-ALPN-01: answer with the challenge certificate, then close.
                let Some(domain) = sni else { return };
                let path = format!("/api/v1/acme/challenges?domain={}", zeitwork_client::encode(&domain));
                let Ok(ch) = state.operator.get::<zeitwork_api_types::AcmeChallenge>(&path).await else { return };
                let Ok(cfg) = acme::alpn_challenge_config(&domain, &ch.key_authorization) else { return };
                let _ = tokio::time::timeout(header_timeout, start.into_stream(cfg)).await;
                return;
            }
            let Ok(Ok(tls)) = tokio::time::timeout(header_timeout, start.into_stream(config)).await else { return };
            let info = ConnInfo { client, tls: true, sni };
            // HTTP/2 goes to hyper; HTTP/1.1 (chosen, or no ALPN) takes the lean path like the plain port.
            if tls.get_ref().1.alpn_protocol() == Some(&b"h2"[..]) {
                serve(TokioIo::new(tls), info, state.clone(), stop).await
            } else {
                h1::serve(tls, info, state.clone(), stop).await
            }
        }
    }
}

pub(crate) async fn serve<IO>(io: TokioIo<IO>, info: ConnInfo, state: Arc<EdgeState>, mut stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = Duration::from_secs(state.config.idle_timeout_secs);
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let st = state.clone();
    let tls = info.tls;
    let service = service_fn(move |req| {
        let st = st.clone();
        let info = info.clone();
        let act = act.clone();
        async move {
            act.begin();
            let res = proxy::handle(st, req, info).await;
            act.end();
            res
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(state.config.header_read_timeout_secs))
        .max_buf_size(state.config.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .max_header_list_size(state.config.max_header_bytes as u32);
    if !tls {
        // The plain port speaks HTTP/1.1 only; no need to sniff for an HTTP/2 preface.
        builder = builder.http1_only();
    }
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = zeitwork_net::stopped(&mut stop), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick(), if !closing => {
                if activity.idle_for() > idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// In-flight requests and the time of the last one, per connection.
#[derive(Default)]
struct Activity {
    in_flight: AtomicU64,
    last_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Activity {
    fn now(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(self.now(), Ordering::Relaxed);
    }
    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.last_ms.store(self.now(), Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.now().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}
