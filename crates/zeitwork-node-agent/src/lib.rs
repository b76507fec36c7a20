//! The node agent: registers its machine with the operator, keeps a heartbeat,
//! and (in later parts) runs instances through a runtime driver.
//!
//! It talks to the operator only through the typed client with a node-agent
//! cluster token, and never touches the store.

pub mod build;
pub mod build_vm;
pub mod dns;
pub mod drains;
pub mod egress;
pub mod forward;
pub mod host;
pub mod instances;
pub mod logs;
pub mod probe;
pub mod sweep;
pub mod tunnel;
pub mod userns;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;
use zeitwork_api_types::{Health, Node, RegisterNode};
use zeitwork_client::Client;
use zeitwork_telemetry::HttpMetrics;

mod config;
use config::close_data_dir;
pub use config::{AgentError, NodeAgentConfig, BUILD_ISOLATIONS, VMM_UIDS};

/// A running node agent.
#[derive(Debug)]
pub struct NodeAgent {
    addr: SocketAddr,
    node: Node,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The instance range whose firewall table goes once the instances have stopped.
    range: Ipv4Addr,
    /// The tunnel to other nodes, closed at shutdown.
    tunnel: Option<Arc<tunnel::Tunnel>>,
    /// The host ids this agent's containers run as, held on the host until it stops.
    userns: Option<userns::UsernsClaim>,
}

impl NodeAgent {
    /// Listens, registers (retrying while the operator is unreachable) and starts heartbeats.
    pub async fn start(config: NodeAgentConfig) -> Result<NodeAgent, AgentError> {
        config.validate()?;
        // Before anything runs: no container may start in ids another agent's tenants have.
        let userns = match config.userns_base {
            0 => None,
            base => {
                let (run_dir, data_dir) = (config.run_dir.clone(), config.data_dir.clone());
                let (start, end) = (u64::from(base), u64::from(base) + u64::from(VMM_UIDS) * 65_536);
                let claimed = tokio::task::spawn_blocking(move || userns::claim(&run_dir, start, end, &data_dir))
                    .await
                    .map_err(|e| {
                        AgentError::Userns(userns::ClaimError::Io {
                            path: config.run_dir.display().to_string(),
                            source: std::io::Error::other(e.to_string()),
                        })
                    })??;
                Some(claimed)
            }
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let advertise = config.advertise_url.clone().unwrap_or_else(|| {
            let ip = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
            format!("http://{ip}:{}", addr.port())
        });
        let client = Client::new(&config.operator_url, config.token.clone());
        close_data_dir(&config.data_dir)?;
        let log_dir = config.data_dir.join("logs");
        let forward = match config.log_forward.as_deref().map(zeitwork_telemetry::drain::Target::parse) {
            Some(Ok(target)) => {
                let options = zeitwork_telemetry::drain::Options {
                    ca_pem: None,
                    ca_file: config.log_forward_ca.clone(),
                    token: config.log_forward_token.clone(),
                    // The node's own drain is the operator's choice, internal or not.
                    reach: None,
                };
                Some(
                    zeitwork_telemetry::drain::Forwarder::start(target, &config.hostname, &options)
                        .map_err(|message| AgentError::Config { field: "log_forward", message })?,
                )
            }
            _ => None,
        };
        let mut store = zeitwork_runtime::logs::LogStore::new(&log_dir)
            .map_err(|source| AgentError::DataDir { path: log_dir.display().to_string(), source })?;
        if let Some(f) = &forward {
            store = store.forwarding(f.clone());
        }
        let org_drains = Arc::new(drains::OrgDrains::new(&config.hostname));
        let store = store.routing(org_drains.routes.clone());
        let logs = Arc::new(store);
        logs.prune(Duration::from_secs(u64::from(config.log_retention_days) * 86_400));
        // What instances of an earlier run left behind (the agent was killed
        // before it could stop them) goes before any runtime starts.
        let sweep_scope = zeitwork_runtime::sweep::Scope {
            dirs: vec![config.data_dir.join("instances"), config.data_dir.join("vms")],
            base: config.instance_range,
            oci_runtimes: vec![config.oci_runtime.clone()],
            known: Default::default(),
            grace: Duration::ZERO,
        };
        let leftovers = zeitwork_runtime::sweep::sweep(&sweep_scope).await;
        if !leftovers.is_empty() {
            tracing::warn!(count = leftovers.len(), "removed what an earlier run left behind");
        }
        let options = zeitwork_runtime::select::SelectOptions {
            requested: config.runtime.clone(),
            dir: config.data_dir.clone(),
            oci_runtime: config.oci_runtime.clone(),
            qemu: config.qemu.clone(),
            firecracker: config.firecracker.clone(),
            jailer: config.jailer.clone(),
            kernel: config.kernel.clone(),
            base: config.instance_range,
            disk_budget: config.image_cache_bytes,
            vmm_user: config.vmm_user(),
            confinement: zeitwork_runtime::container::Confinement {
                disk_mib: config.instance_disk_mib,
                userns_base: (config.userns_base != 0).then_some(config.userns_base),
            },
        };
        let selected = match zeitwork_runtime::select::select(&options, logs.clone()).await {
            Ok(s) => {
                tracing::info!(runtime = s.name, why = %s.detail, "runtime chosen");
                Some(s)
            }
            Err(e) => {
                tracing::error!(error = %e, requested = %config.runtime, "no runtime; this node cannot run instances");
                None
            }
        };
        // What build VMs boot: the runtime's VMM and guest files.
        let build_vm_boot = selected.as_ref().and_then(|s| match &s.runtime {
            zeitwork_runtime::AnyRuntime::Vm(v) => Some((v.vmm().clone(), v.assets().clone())),
            zeitwork_runtime::AnyRuntime::Container(_) => None,
        });
        let tunnel = start_tunnel(&config, &advertise).await;
        let registration = RegisterNode {
            hostname: config.hostname.clone(),
            region: config.region.clone(),
            address: advertise,
            capacity: config.capacity(),
            physical: Some(config.physical()),
            runtime: Some(selected.as_ref().map_or("container", |s| s.name).into()),
            runtime_detail: Some(match &selected {
                Some(s) if config.vm_snapshots && zeitwork_runtime::Runtime::snapshots(&s.runtime) => {
                    format!("{}; wakes from VM snapshots", s.detail).chars().take(2000).collect()
                }
                Some(s) => s.detail.chars().take(2000).collect(),
                None => "no runtime works on this node (see the agent's log)".into(),
            }),
            tunnel: tunnel.as_ref().map(|(t, _)| t.clone()),
        };
        let tunnel = tunnel.map(|(_, device)| device);
        let mut node = register(&client, &registration).await?;
        tracing::info!(node = %node.id, hostname = %node.hostname, region = %node.region, "registered with the operator");
        // From here on the node acts with its own credential (for itself only);
        // the configured token only registers.
        let registrar = client.clone();
        let client = match node.credential.take() {
            Some(own) => Client::new(&config.operator_url, Some(own)),
            None => client,
        };

        let metrics = HttpMetrics::new("zeitwork_node_agent");
        let swept = sweep::Swept::register(&metrics);
        org_drains.register(&metrics);
        swept.count(&leftovers);
        let table: instances::Table = Arc::default();
        let forwarder = Arc::new(forward::Forwarder::new(table.clone(), &config.operator_url));
        // Requests naming an instance are always forwarded, whatever their path.
        let runtime_cell = Arc::new(std::sync::OnceLock::new());
        let own = logs::LogsState { forwarder: forwarder.clone(), logs: logs.clone(), runtime: runtime_cell.clone() };
        let app = Router::new()
            .route("/health", get(|| async { Json(Health { status: "ok".into() }) }))
            .route(
                "/metrics",
                get(logs::scrape).with_state(logs::ScrapeState {
                    metrics: metrics.clone(),
                    token: config.metrics_token.clone().map(Into::into),
                    forwarder: forwarder.clone(),
                    org_drains: org_drains.clone(),
                }),
            )
            .route("/v1/instances/{id}/logs", get(logs::instance_logs).with_state(own.clone()))
            .route("/v1/instances/{id}/metrics", get(logs::instance_metrics).with_state(own))
            .route(
                "/v1/probe",
                axum::routing::post(probe::probe).with_state(probe::ProbeState {
                    forwarder: forwarder.clone(),
                    http: zeitwork_client::probe::client(),
                }),
            )
            .fallback(|| async { forward::refuse(axum::http::StatusCode::NOT_FOUND, "not found") })
            .layer(axum::middleware::from_fn_with_state(forwarder, forward::route))
            .layer(axum::middleware::from_fn_with_state(metrics.clone(), zeitwork_telemetry::track));
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(host::export(&metrics, config.data_dir.clone(), rx.clone()));
        if let Some(f) = forward.clone() {
            // The forwarder's running totals, as counters.
            let sent = prometheus_client::metrics::counter::Counter::<u64>::default();
            let dropped = prometheus_client::metrics::counter::Counter::<u64>::default();
            metrics.with_registry(|r| {
                r.register("log_lines_forwarded", "Instance log lines sent to the syslog receiver", sent.clone());
                r.register(
                    "log_lines_dropped",
                    "Instance log lines dropped: the forwarding queue was full",
                    dropped.clone(),
                );
            });
            let mut stop = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let s = f.sent.load(std::sync::atomic::Ordering::Relaxed);
                    let d = f.dropped.load(std::sync::atomic::Ordering::Relaxed);
                    sent.inc_by(s.saturating_sub(sent.get()));
                    dropped.inc_by(d.saturating_sub(dropped.get()));
                }
            }));
        }
        // Uploaded archives are pulled from the operator, with the pull
        // credential that comes with each assignment (never this agent's token).
        let mut registries = config.registries.clone();
        let archives = zeitwork_api_types::ARCHIVE_REGISTRY.to_owned();
        registries.endpoints.entry(archives).or_insert_with(|| config.operator_url.clone());
        let images = zeitwork_image::ImageStore::new(&config.data_dir.join("images"), registries, Default::default());
        match (images, selected) {
            (Ok(images), Some(selected)) => {
                let settings = instances::Settings {
                    node: node.id.clone(),
                    health_path: config.health_path.clone(),
                    start_timeout: Duration::from_secs(config.start_timeout_secs),
                    stop_grace: Duration::from_secs(config.stop_grace_secs),
                    every: Duration::from_secs(1),
                    liveness_every: Duration::from_secs(config.liveness_interval_secs),
                    liveness_failures: config.liveness_failures,
                    image_cache_bytes: config.image_cache_bytes,
                    forward: forward.clone(),
                    org_drains: org_drains.clone(),
                    private_networks: None,
                    egress_names: Default::default(),
                    snapshots: (config.vm_snapshots && zeitwork_runtime::Runtime::snapshots(&selected.runtime))
                        .then(|| instances::Snapshots::new(&metrics)),
                    boot: instances::BootTimes::new(&metrics),
                    tunnel: None,
                };
                let mut settings = settings;
                if config.dns_port != 0 {
                    match start_resolver(&config, table.clone(), rx.clone()).await {
                        Ok(task) => {
                            tasks.push(task);
                            settings.private_networks = Some(config.instance_range);
                            match egress::resolver(config.dns_resolver) {
                                Some(server) => tasks.push(tokio::spawn(egress::run(
                                    table.clone(),
                                    settings.egress_names.clone(),
                                    server,
                                    rx.clone(),
                                ))),
                                None => tracing::warn!(
                                    "no resolver for host names in egress allow-lists (set dns_resolver); they allow nothing"
                                ),
                            }
                            settings.tunnel = tunnel.clone();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "no resolver; instances use the host's and have no private network")
                        }
                    }
                }
                let runtime = Arc::new(selected.runtime);
                let _ = runtime_cell.set(runtime.clone());
                let in_use = Arc::new(sweep::InUse::default());
                if config.sweep_interval_secs > 0 {
                    tasks.push(tokio::spawn(sweep::run(
                        sweep_scope,
                        table.clone(),
                        in_use.clone(),
                        Duration::from_secs(config.sweep_interval_secs),
                        swept,
                        rx.clone(),
                    )));
                }
                tasks.push(tokio::spawn(instances::run(
                    client.clone(),
                    Arc::new(images),
                    runtime,
                    table,
                    settings,
                    in_use,
                    rx.clone(),
                )));
            }
            (Err(e), _) => tracing::error!(error = %e, "no image cache; this node cannot run instances"),
            (_, None) => {}
        }
        match (config.builds, build::find_buildah(config.buildah.as_deref())) {
            (true, Some(buildah)) => match build_vm_of(&config, build_vm_boot.as_ref(), &buildah).await {
                Ok(vm) => {
                    let settings = build::BuilderSettings {
                        node: node.id.clone(),
                        buildah,
                        dir: config.data_dir.join("builds"),
                        registries: config.registries.clone(),
                        storage_driver: config.build_storage_driver.clone(),
                        cache_bytes: config.build_cache_bytes,
                        vm,
                    };
                    tasks.push(tokio::spawn(build::run(client.clone(), settings, rx.clone())));
                }
                Err(e) => {
                    tracing::error!(error = %e, "build_isolation = \"vm\" cannot work here: this node builds nothing")
                }
            },
            (true, None) => tracing::info!("no buildah on this node; builds from source run on other nodes"),
            (false, _) => {}
        }
        // Logs of instances gone for longer than the retention are removed, hourly.
        let (prune_logs, mut prune_stop, keep) =
            (logs.clone(), rx.clone(), Duration::from_secs(u64::from(config.log_retention_days) * 86_400));
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => prune_logs.prune(keep),
                    _ = prune_stop.wait_for(|s| *s) => return,
                }
            }
        }));
        let mut server_rx = rx.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender also means stop.
                    let _ = server_rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the agent's HTTP server failed");
            }
        });
        tasks.push(server);
        let heartbeats = tokio::spawn(heartbeat_loop(
            client,
            registrar,
            registration,
            node.id.clone(),
            Duration::from_secs(config.heartbeat_interval_secs),
            rx,
        ));
        tasks.push(heartbeats);
        Ok(NodeAgent { addr, node, shutdown: tx, tasks, range: config.instance_range, tunnel, userns })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops every task (the instances with them), closes the tunnel to other
    /// nodes, then removes the range's firewall table, which fences nothing
    /// any more. When a task failed, instances may still run: the table
    /// stays, and the next start sweeps it.
    pub async fn shutdown(self) {
        // The tasks may have ended already; then no one listens.
        let _ = self.shutdown.send(true);
        let mut clean = true;
        for t in self.tasks {
            if let Err(e) = t.await {
                clean = false;
                tracing::error!(error = %e, "a node agent task failed while stopping");
            }
        }
        // Closed, not left to the last handle: tasks of stopped instances may still hold one.
        if let Some(tunnel) = self.tunnel {
            if let Err(e) = tokio::task::spawn_blocking(move || tunnel.close()).await {
                tracing::error!(error = %e, "closing the tunnel to other nodes panicked");
            }
        }
        if !clean {
            tracing::warn!(range = %self.range, "the instance firewall stays: instances may still run");
            // So do this agent's user-namespace ids, held until the process ends.
            std::mem::forget(self.userns);
            return;
        }
        match zeitwork_runtime::net::remove_policy(self.range).await {
            // No nftables here: there was no firewall either (and no instances).
            Ok(_) | Err(zeitwork_runtime::RuntimeError::Unavailable(..)) => {}
            Err(e) => tracing::warn!(range = %self.range, error = %e, "the instance firewall was left on the host"),
        }
    }
}

async fn register(client: &Client, r: &RegisterNode) -> Result<Node, AgentError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.post::<_, Node>("/api/v1/nodes", r).await {
            Ok(n) => return Ok(n),
            Err(e @ zeitwork_client::ClientError::Unreachable { .. }) if delay < Duration::from_secs(10) => {
                tracing::warn!(error = %e, "operator unreachable; retrying registration");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn heartbeat_loop(
    client: Client,
    registrar: Client,
    registration: RegisterNode,
    mut id: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match client.post_empty::<Node>(&format!("/api/v1/nodes/{id}/heartbeat")).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {
                // The operator forgot this node (deleted); register again.
                match registrar.post::<_, Node>("/api/v1/nodes", &registration).await {
                    Ok(n) => id = n.id,
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// This node's end of the tunnel to other nodes, and what registration says
/// of it; none when private networks or the tunnel are off, or the device
/// cannot be made (then the instances reach the members on this node only).
async fn start_tunnel(
    config: &NodeAgentConfig,
    advertise: &str,
) -> Option<(zeitwork_api_types::NodeTunnel, Arc<tunnel::Tunnel>)> {
    if config.dns_port == 0 || config.tunnel_port == 0 {
        return None;
    }
    let endpoint = match &config.tunnel_endpoint {
        Some(e) => e.clone(),
        None => {
            match tunnel_endpoint_of(advertise, config.tunnel_port) {
                Some(e) => e,
                None => {
                    tracing::warn!(advertise, "no tunnel to other nodes: set tunnel_endpoint (IPv4:port), the agent's address is no IPv4 address");
                    return None;
                }
            }
        }
    };
    let dir = config.data_dir.clone();
    let (name, port) = (zeitwork_runtime::net::tunnel_interface(config.instance_range), config.tunnel_port);
    let started = tokio::task::spawn_blocking(move || {
        let key = tunnel::KeyPair::load_or_create(&dir)?;
        let device = tunnel::Tunnel::start(&name, port, &key)?;
        Ok::<_, tunnel::TunnelError>((key.public_key(), device))
    })
    .await;
    match started {
        Ok(Ok((public_key, device))) => {
            tracing::info!(%endpoint, %public_key, "private networks reach other nodes through the tunnel");
            Some((zeitwork_api_types::NodeTunnel { public_key, endpoint }, Arc::new(device)))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "no tunnel to other nodes; instances reach only the members on this node");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "starting the tunnel panicked");
            None
        }
    }
}

/// The tunnel endpoint by default: the IPv4 address of the agent's URL with `port`.
fn tunnel_endpoint_of(advertise: &str, port: u16) -> Option<String> {
    let rest = advertise.strip_prefix("http://").or_else(|| advertise.strip_prefix("https://"))?;
    let host_port = rest.split('/').next()?;
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let ip: Ipv4Addr = host.parse().ok()?;
    (!ip.is_unspecified()).then(|| format!("{ip}:{port}"))
}

/// Binds the instances' resolver (UDP and TCP, one port) and points their DNS
/// at it (the firewall sends their queries to the host on to its port).
async fn start_resolver(
    config: &NodeAgentConfig,
    table: instances::Table,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let addr = SocketAddr::from(([0, 0, 0, 0], config.dns_port));
    let socket = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|e| format!("cannot bind the resolver to UDP port {}: {e}", config.dns_port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot bind the resolver to TCP port {}: {e}", config.dns_port))?;
    zeitwork_runtime::net::apply_policy(config.instance_range, Some(config.dns_port))
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = config.dns_upstreams.clone().unwrap_or_else(dns::host_upstreams);
    tracing::info!(port = config.dns_port, upstreams = ?upstreams, "resolver for the instances' private networks (UDP and TCP)");
    let tcp = dns::serve_tcp(listener, table.clone(), upstreams.clone(), stop.clone());
    Ok(tokio::spawn(async move {
        tokio::join!(dns::serve(socket, table, upstreams, stop), tcp);
    }))
}

/// Whether this node builds in microVMs (`build_isolation`), and what they
/// boot: the runtime's VMM and guest files and a root disk of this host's
/// buildah (written now, once per version of its files). An error when `vm`
/// is asked for and cannot work; `auto` then builds on the host.
async fn build_vm_of(
    config: &NodeAgentConfig,
    boot: Option<&(zeitwork_runtime::vm::Vmm, zeitwork_runtime::guest::GuestAssets)>,
    buildah: &std::path::Path,
) -> Result<Option<build_vm::VmBuilder>, String> {
    if !build_vm::vm_wanted(&config.build_isolation, boot.map(|b| &b.0))? {
        tracing::info!(requested = %config.build_isolation, "builds run on this host (buildah in user namespaces)");
        return Ok(None);
    }
    let Some((vmm, assets)) = boot.cloned() else { return Ok(None) };
    let (dir, tool) = (config.data_dir.join("builds"), buildah.to_owned());
    let root = tokio::task::spawn_blocking(move || {
        zeitwork_runtime::buildvm::clean_leftovers(&dir.join("vms"));
        build_vm::prepare_root(&dir, &tool)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match root {
        Ok(root) => {
            tracing::info!(vmm = vmm.name(), accel = %vmm.accel(), root = %root.display(), "builds run in microVMs");
            Ok(Some(build_vm::VmBuilder { vmm, assets, root }))
        }
        Err(e) if config.build_isolation == "auto" => {
            tracing::warn!(error = %e, "build VMs cannot work here; builds run on this host");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_endpoint_defaults_to_the_agents_address() {
        assert_eq!(tunnel_endpoint_of("http://10.0.0.5:8081", 51820).as_deref(), Some("10.0.0.5:51820"));
        assert_eq!(tunnel_endpoint_of("https://10.0.0.5/", 4000).as_deref(), Some("10.0.0.5:4000"));
        assert_eq!(tunnel_endpoint_of("http://node-1.example:8081", 51820), None);
        assert_eq!(tunnel_endpoint_of("http://[fd00::1]:8081", 51820), None);
        let config = NodeAgentConfig {
            token: Some("a token".into()),
            tunnel_endpoint: Some("node-1:51820".into()),
            ..Default::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("tunnel_endpoint"));
    }

    #[test]
    fn the_instance_range_is_a_whole_slash_16() {
        let config = |range: [u8; 4]| NodeAgentConfig {
            token: Some("a token".into()),
            instance_range: range.into(),
            ..Default::default()
        };
        let e = config([10, 242, 128, 0]).validate().unwrap_err().to_string();
        assert!(e.contains("instance_range") && e.contains("10.242.128.0"), "{e}");
        let other = config([10, 242, 0, 0]).validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!other.contains("instance_range"), "{other}");
    }

    #[test]
    fn vmm_users_and_user_namespaces_are_checked() {
        let base = NodeAgentConfig { token: Some("a token".into()), ..Default::default() };
        let fails = |c: NodeAgentConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(fails(base.clone()), "", "the defaults are valid");
        let user = base.vmm_user().expect("QEMU is unprivileged by default");
        assert_eq!(user.uid, 900_000);
        assert!(fails(NodeAgentConfig { vmm_uid: 0, ..base.clone() }).is_empty(), "0 runs QEMU as root");
        assert_eq!(NodeAgentConfig { vmm_uid: 0, ..base.clone() }.vmm_user(), None);
        assert!(fails(NodeAgentConfig { vmm_uid: 10, ..base.clone() }).contains("vmm_uid"));
        assert!(fails(NodeAgentConfig { vmm_gid: Some(0), ..base.clone() }).contains("vmm_gid"));
        let overlap = NodeAgentConfig { vmm_uid: 1_000_000_500, ..base.clone() };
        assert!(fails(overlap).contains("overlap"));
        assert!(fails(NodeAgentConfig { userns_base: 4_000_000_000, ..base.clone() }).contains("userns_base"));
        assert!(fails(NodeAgentConfig { userns_base: 0, ..base.clone() }).is_empty(), "0 turns the remap off");
        assert!(fails(NodeAgentConfig { instance_disk_mib: 4, ..base.clone() }).contains("instance_disk_mib"));
        assert!(fails(NodeAgentConfig { instance_disk_mib: 0, ..base }).is_empty(), "0 turns the quota off");
    }

    #[test]
    fn build_isolation_is_checked() {
        let base = NodeAgentConfig { token: Some("a token".into()), ..Default::default() };
        let fails = |c: NodeAgentConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        for ok in ["auto", "vm", "host"] {
            assert_eq!(fails(NodeAgentConfig { build_isolation: ok.into(), ..base.clone() }), "", "{ok}");
        }
        let e = fails(NodeAgentConfig { build_isolation: "chroot".into(), ..base.clone() });
        assert!(e.contains("build_isolation") && e.contains("\"chroot\""), "{e}");
        let containers = NodeAgentConfig { build_isolation: "vm".into(), runtime: "container".into(), ..base.clone() };
        assert!(fails(containers).contains("build_isolation"));
        let host = NodeAgentConfig { build_isolation: "host".into(), runtime: "container".into(), ..base };
        assert_eq!(fails(host), "");
    }
}
