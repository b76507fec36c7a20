//! The control plane: the operator's REST API, authentication and
//! authorisation, encryption of secrets, scheduling and reconciliation, and
//! the web console served at `/`.
//!
//! It owns what the API means; it must not hold SQL (that is the store) or
//! talk to instances directly (that is the node agent).

pub mod api;
pub mod assignments;
pub mod auth;
pub mod autoscale;
pub mod background;
pub mod backup;
pub mod config;
pub mod console;
pub mod dns;
pub mod drain;
pub mod email;
pub mod engine;
pub mod error;
pub mod extract;
pub mod feed;
pub mod notify;
pub mod retention;
pub mod rollout;
pub mod routing;
pub mod secrets;
pub mod serve;
pub mod uptime;
pub mod usage;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use zeitwork_api_types::TokenScope;
use zeitwork_store::{Store, StoreError};
use zeitwork_telemetry::HttpMetrics;

pub use config::{ConfigError, OperatorConfig};

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<OperatorConfig>,
    pub cipher: secrets::Cipher,
    pub metrics: HttpMetrics,
    pub routing: Arc<routing::RoutingHub>,
    /// Wakes nodes' assignment watches for the changes that concern them.
    pub assignments: Arc<assignments::AssignmentHub>,
    /// This operator's token towards node agents.
    pub internal_token: Arc<auth::InternalToken>,
    /// Calls to node agents.
    pub http: reqwest::Client,
    /// Changes of deployments, instances and nodes, for event streams.
    pub feed: Arc<feed::Feed>,
    /// Wakes this operator's deployment engine for a pass now (a new deployment, a wake).
    pub engine: Arc<tokio::sync::Notify>,
    /// This operator's name as a holder of the engine lease.
    pub engine_id: String,
    /// 1 while this operator runs the engine.
    pub leader: prometheus_client::metrics::gauge::Gauge,
    /// Wakes the outbox worker (a new notification may be queued).
    pub outbox: Arc<tokio::sync::Notify>,
    /// Build counters and durations.
    pub builds: api::builds::SharedBuildMetrics,
    /// Deployments that became active, failed or were rolled back.
    pub outcomes: engine::DeploymentOutcomes,
    /// Event stream figures.
    pub sse: Arc<api::stream::SseStats>,
    /// Outbox and database pool gauges.
    pub gauges: Arc<notify::QueueGauges>,
    /// Wakes the uptime prober (a check was added or changed).
    pub uptime: Arc<tokio::sync::Notify>,
    /// The log drain for the audit log and build output (`log_forward`).
    pub drain: Option<Arc<zeitwork_telemetry::drain::Forwarder>>,
    /// The organisations' own drains (their build output and audit events).
    pub org_drains: Arc<drain::OrgDrains>,
}

impl AppState {
    /// Something the engine or the outbox may act on changed through this
    /// operator. Routing tables, assignment watches and build claims follow
    /// the store's own announcements of what changed (a change the store does
    /// not announce, such as a certificate, calls [`routing::RoutingHub::changed`]).
    pub fn changed(&self) {
        self.engine.notify_one();
        self.outbox.notify_one();
    }
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {path}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error(
        "the encryption key differs from the one this store was created with; set encryption_key to the original key"
    )]
    KeyMismatch,
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the admin token to {path}")]
    AdminToken { path: String, source: std::io::Error },
}

/// A running operator. Dropping it aborts its background work (the engine,
/// the routing table's upkeep, the watches) but not its API: call
/// [`Operator::shutdown`] to stop it.
#[derive(Debug)]
pub struct Operator {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The background work, by name: the routing table's upkeep, the
    /// assignment watch, the change listener (PostgreSQL), the engine, the
    /// event feed, the autoscaler, the usage sampler, the notifier, the build
    /// watch, the prober, the pruner and the log drain. Each is aborted when
    /// dropped.
    workers: Vec<(&'static str, background::Task<()>)>,
    /// The first admin token, when this start created it.
    pub admin_token: Option<String>,
    pub admin_token_path: PathBuf,
    pub store: Store,
    /// This operator's name as a holder of the engine lease.
    pub engine_id: String,
    /// Its assignment watches (their figures).
    pub assignments: Arc<assignments::AssignmentHub>,
}

impl Operator {
    /// Validates the config, opens and migrates the store, makes sure the
    /// first admin token exists, and starts serving.
    pub async fn start(config: OperatorConfig) -> Result<Operator, StartError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StartError::DataDir { path: config.data_dir.display().to_string(), source })?;
        restrict_dir(&config.data_dir);
        let store = match &config.database_url {
            Some(url) => Store::connect(url).await?,
            None => Store::open_sqlite(&config.data_dir.join("zeitwork.db")).await?,
        };
        let cipher = match &config.encryption_key {
            Some(k) => secrets::Cipher::from_base64(k)?,
            None => secrets::Cipher::load_or_create(&config.data_dir.join("secret.key"))?,
        };
        check_key(&store, &cipher).await?;
        let admin_token_path = config.data_dir.join("admin.token");
        let admin_token = bootstrap_admin(&store, &admin_token_path).await?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let routing = routing::RoutingHub::new(&config.apps_domain);
        let (tx, rx) = watch::channel(false);
        let refresher = background::spawn(routing.clone().run(store.clone(), config.apps_domain.clone(), rx.clone()));
        // Checked with the rest of the configuration.
        let private = config::private_range(&config.private_network)
            .map_err(|message| ConfigError { field: "private_network", message })?;
        let assignments =
            Arc::new(assignments::AssignmentHub::new(private, assignments::reading_turns(store.read_connections())));
        let assignment_watch = background::spawn(assignments.clone().run(store.clone(), rx.clone()));
        let change_listener = {
            let (store, rx) = (store.clone(), rx.clone());
            background::spawn(async move { store.follow_changes(rx).await })
        };
        let engine_id = format!("operator-{}", zeitwork_store::nanoid(10));
        let engine_nudge = Arc::new(tokio::sync::Notify::new());
        let metrics = HttpMetrics::new("zeitwork_operator");
        let gauges = engine::EngineGauges::default();
        let leader = gauges.leader.clone();
        let outcomes = engine::DeploymentOutcomes::default();
        metrics.with_registry(|r| {
            r.register("engine_leader", "1 while this operator runs the deployment engine", leader.clone());
            r.register("database_up", "1 while the store answers", gauges.database_up.clone());
            gauges.queries.register(r);
            outcomes.register(r);
        });
        let build_metrics = Arc::new(api::builds::BuildMetrics::default());
        metrics.with_registry(|r| build_metrics.register(r));
        let sse = Arc::new(api::stream::SseStats::default());
        metrics.with_registry(|r| sse.register(r));
        metrics.with_registry(|r| assignments.register(r));
        let queue_gauges = Arc::new(notify::QueueGauges { queries: gauges.queries.clone(), ..Default::default() });
        metrics.with_registry(|r| queue_gauges.register(r));
        let engine = background::spawn(engine::run(
            store.clone(),
            engine::EngineConfig {
                node_timeout: std::time::Duration::from_secs(config.node_timeout_secs),
                placement_timeout: std::time::Duration::from_secs(config.placement_timeout_secs),
                rollback_window: std::time::Duration::from_secs(config.rollback_window_secs),
                outcomes: outcomes.clone(),
                private_networks: private.1,
                ..Default::default()
            },
            engine_id.clone(),
            // What a pass changes, the store announces to the routing table and the watches.
            || {},
            engine_nudge.clone(),
            gauges,
            rx.clone(),
        ));
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| engine_id.clone());
        let drain =
            drain::start(&config, &hostname).map_err(|message| ConfigError { field: "log_forward", message })?;
        let state = AppState {
            store: store.clone(),
            config: Arc::new(config),
            cipher,
            metrics,
            routing,
            assignments: assignments.clone(),
            internal_token: Arc::default(),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
            feed: feed::Feed::new(),
            engine: engine_nudge,
            engine_id: engine_id.clone(),
            leader,
            outbox: Arc::new(tokio::sync::Notify::new()),
            builds: build_metrics,
            outcomes,
            sse,
            gauges: queue_gauges,
            uptime: Arc::new(tokio::sync::Notify::new()),
            drain: drain.clone(),
            org_drains: Arc::default(),
        };
        let feeder = background::spawn(state.feed.clone().run(store.clone(), rx.clone()));
        let autoscaler = background::spawn(autoscale::run(state.clone(), rx.clone()));
        let usage_sampler = background::spawn(usage::run(state.clone(), rx.clone()));
        let notifier = background::spawn(notify::run(state.clone(), state.outbox.clone(), rx.clone()));
        let build_watch = background::spawn(api::builds::watch_builds(state.clone(), rx.clone()));
        let prober = background::spawn(uptime::run(state.clone(), state.uptime.clone(), rx.clone()));
        let pruner = background::spawn(retention::run(state.clone(), rx.clone()));
        let drainer = background::spawn(drain::run(state.clone(), drain, hostname.clone(), rx.clone()));
        let limits = serve::Limits {
            header_read_timeout: std::time::Duration::from_secs(state.config.header_read_timeout_secs),
            connections_per_client: state.config.max_connections_per_client,
            body_idle_timeout: std::time::Duration::from_secs(state.config.body_idle_timeout_secs),
            min_body_rate: state.config.min_body_bytes_per_sec,
            ..Default::default()
        };
        let app = api::router(state);
        let task = tokio::spawn(async move {
            serve::serve(listener, app, rx, limits).await;
            Ok::<(), std::io::Error>(())
        });
        tracing::info!(%addr, "operator API listening");
        let workers = vec![
            ("refresher", refresher),
            ("assignment watch", assignment_watch),
            ("change listener", change_listener),
            ("engine", engine),
            ("feeder", feeder),
            ("autoscaler", autoscaler),
            ("usage sampler", usage_sampler),
            ("notifier", notifier),
            ("build watch", build_watch),
            ("prober", prober),
            ("pruner", pruner),
            ("drainer", drainer),
        ];
        Ok(Operator { addr, shutdown: tx, task, workers, admin_token, admin_token_path, store, engine_id, assignments })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes in-flight requests, closes the store.
    /// Stops at once without handing anything over, as a crash would (for failover tests).
    pub fn abort(self) {
        self.task.abort();
        // Dropping the background work aborts it.
        drop(self.workers);
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "operator server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "operator server task failed"),
            Ok(Ok(())) => {}
        }
        for (name, task) in self.workers {
            if let Err(e) = task.await {
                tracing::warn!(task = name, error = %e, "operator task failed while stopping");
            }
        }
        self.store.close().await;
    }
}

fn restrict_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the data directory private");
    }
}

/// Refuses to start with a key other than the one the store's secrets were
/// encrypted with, instead of failing later on every read.
async fn check_key(store: &Store, cipher: &secrets::Cipher) -> Result<(), StartError> {
    const CONTEXT: &str = "zeitwork:key-check";
    match store.get_bootstrap("key_check").await? {
        Some(stored) => cipher.decrypt(CONTEXT, &stored).map(|_| ()).map_err(|_| StartError::KeyMismatch),
        None => {
            let value = cipher.encrypt(CONTEXT, "ok");
            if !store.put_bootstrap_if_absent("key_check", &value).await? {
                // Another operator wrote it first; check against theirs.
                return Box::pin(check_key(store, cipher)).await;
            }
            Ok(())
        }
    }
}

async fn bootstrap_admin(store: &Store, path: &Path) -> Result<Option<String>, StartError> {
    let minted = auth::mint("admin", TokenScope::Admin, false, Some("bootstrap".into()), None);
    if !store.bootstrap_admin_token(&minted.stored).await? {
        if !path.exists() {
            tracing::info!(
                "the first admin token was created earlier (by another operator or a deleted data dir); \
                 create more with `zeitwork tokens create`"
            );
        }
        return Ok(None);
    }
    let err = |source| StartError::AdminToken { path: path.display().to_string(), source };
    // An old file goes first; none is the usual case, and any other
    // failure shows in `create_new` below.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(format!("{}\n", minted.bearer).as_bytes()).and_then(|_| f.sync_all()).map_err(err)?;
    Ok(Some(minted.bearer))
}
