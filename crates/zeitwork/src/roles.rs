//! Starting the roles: config from a TOML file, then `ZEITWORK_*` environment
//! variables, then flags (clap reads both; a flag beats its variable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use zeitwork_api_types::{ClusterRole, CreateRegion, CreateToken, CreatedToken, Region, TokenScope};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_edge::{EdgeConfig, EdgeProxy};
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};
use zeitwork_telemetry::LogFormat;

/// Bad flags or config: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Flags every role takes.
#[derive(Debug, Args)]
pub struct Common {
    /// TOML config file.
    #[arg(long, env = "ZEITWORK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (store, keys, tokens).
    #[arg(long, env = "ZEITWORK_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "ZEITWORK_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Log filter, e.g. `info` or `info,zeitwork_store=debug`.
    #[arg(long, env = "ZEITWORK_LOG", default_value = "info")]
    log: String,
    /// Log lines as JSON.
    #[arg(long, env = "ZEITWORK_LOG_JSON")]
    log_json: bool,
}

impl Common {
    fn init_logging(&self) {
        let format = if self.log_json { LogFormat::Json } else { LogFormat::Text };
        zeitwork_telemetry::init_logging(&self.log, format);
    }
}

fn load_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| UsageError(format!("config file {}: {}", path.display(), e.to_string().trim())).into())
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    common: Common,
    /// PostgreSQL URL shared by several operators (default: SQLite in the data dir).
    #[arg(long, env = "ZEITWORK_DATABASE_URL", value_name = "URL")]
    database_url: Option<String>,
    #[arg(long, env = "DATABASE_URL", hide = true)]
    database_url_fallback: Option<String>,
    /// Domain apps are served under: `<deployment>.<apps-domain>`.
    #[arg(long, env = "ZEITWORK_APPS_DOMAIN")]
    apps_domain: Option<String>,
    /// Base64 of 32 bytes encrypting secrets at rest (default: generated into the data dir).
    #[arg(long, env = "ZEITWORK_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
}

impl OperatorArgs {
    fn into_config(self) -> Result<OperatorConfig> {
        let mut c: OperatorConfig = load_toml(self.common.config.as_deref())?;
        set(&mut c.data_dir, self.common.data);
        set(&mut c.listen, self.common.listen);
        set_some(&mut c.database_url, self.database_url.or(self.database_url_fallback));
        set(&mut c.apps_domain, self.apps_domain);
        set_some(&mut c.encryption_key, self.encryption_key);
        c.validate()?;
        Ok(c)
    }
}

pub async fn operator(args: OperatorArgs) -> Result<()> {
    args.common.init_logging();
    let config = args.into_config()?;
    let op = Operator::start(config).await.context("the operator could not start")?;
    announce_admin_token(&op);
    shutdown_signal().await;
    tracing::info!("stopping the operator");
    op.shutdown().await;
    Ok(())
}

fn announce_admin_token(op: &Operator) {
    if let Some(token) = &op.admin_token {
        println!("First start: created the platform admin token. It is shown once:");
        println!();
        println!("    {token}");
        println!();
        println!("It is also in {} (mode 0600).", op.admin_token_path.display());
    }
}

#[derive(Debug, Args)]
pub struct NodeAgentArgs {
    #[command(flatten)]
    common: Common,
    /// Operator API URL.
    #[arg(long, env = "ZEITWORK_OPERATOR_URL")]
    operator: Option<String>,
    /// A node-agent cluster token.
    #[arg(long, env = "ZEITWORK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Region code this node is in.
    #[arg(long, env = "ZEITWORK_REGION")]
    region: Option<String>,
    /// Name of this node (default: the host name).
    #[arg(long, env = "ZEITWORK_HOSTNAME")]
    hostname: Option<String>,
    /// URL others reach this agent at.
    #[arg(long, env = "ZEITWORK_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// auto (the best that works here, by probe), firecracker, qemu or container.
    #[arg(long, env = "ZEITWORK_RUNTIME", value_parser = zeitwork_runtime::select::RUNTIMES.to_vec())]
    runtime: Option<String>,
    /// The QEMU binary of the qemu runtime.
    #[arg(long, env = "ZEITWORK_QEMU")]
    qemu: Option<PathBuf>,
    /// A firecracker binary (the firecracker runtime is used only with one).
    #[arg(long, env = "ZEITWORK_FIRECRACKER")]
    firecracker: Option<PathBuf>,
    /// The guest kernel of the microVM runtimes (default: the newest in /boot).
    #[arg(long, env = "ZEITWORK_KERNEL")]
    kernel: Option<PathBuf>,
}

pub async fn node_agent(args: NodeAgentArgs) -> Result<()> {
    args.common.init_logging();
    let mut c: NodeAgentConfig = load_toml(args.common.config.as_deref())?;
    set(&mut c.listen, args.common.listen);
    set(&mut c.data_dir, args.common.data);
    set(&mut c.operator_url, args.operator);
    set_some(&mut c.token, args.token);
    set(&mut c.region, args.region);
    set(&mut c.hostname, args.hostname);
    set_some(&mut c.advertise_url, args.advertise_url);
    set(&mut c.runtime, args.runtime);
    set(&mut c.qemu, args.qemu);
    set_some(&mut c.firecracker, args.firecracker);
    set_some(&mut c.kernel, args.kernel);
    c.validate().map_err(|e| UsageError(e.to_string()))?;
    let agent = NodeAgent::start(c).await.context("the node agent could not start")?;
    shutdown_signal().await;
    agent.shutdown().await;
    Ok(())
}

#[derive(Debug, Args)]
pub struct LoadBalancerArgs {
    /// `--listen` is a TCP listener forwarded to `--backend`s (more in the config file).
    #[command(flatten)]
    common: Common,
    /// An edge proxy ADDR:PORT (repeatable).
    #[arg(long = "backend", env = "ZEITWORK_BACKENDS", value_delimiter = ',')]
    backends: Vec<SocketAddr>,
    /// round-robin, least-connections or ip-hash.
    #[arg(long, env = "ZEITWORK_ALGORITHM", default_value = "least-connections")]
    algorithm: zeitwork_lb::Algorithm,
    /// Do not send a PROXY protocol v2 header to the backends.
    #[arg(long)]
    no_proxy_protocol: bool,
    /// Forward to the edge proxies the operator lists, at their `http` or `https` address.
    #[arg(long, value_parser = ["http", "https"])]
    backends_from: Option<String>,
    /// Operator API URL (with --backends-from).
    #[arg(long, env = "ZEITWORK_OPERATOR_URL")]
    operator: Option<String>,
    /// A load-balancer cluster token (with --backends-from).
    #[arg(long, env = "ZEITWORK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Metrics and health listener.
    #[arg(long, env = "ZEITWORK_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    admin_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct EdgeProxyArgs {
    /// `--listen` is the plain HTTP listener.
    #[command(flatten)]
    common: Common,
    /// Operator API URL.
    #[arg(long, env = "ZEITWORK_OPERATOR_URL")]
    operator: Option<String>,
    /// An edge-proxy cluster token.
    #[arg(long, env = "ZEITWORK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// TLS listener (needs --tls-cert and --tls-key).
    #[arg(long, env = "ZEITWORK_HTTPS_LISTEN", value_name = "ADDR:PORT")]
    https_listen: Option<SocketAddr>,
    /// Metrics and health listener.
    #[arg(long, env = "ZEITWORK_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    admin_listen: Option<SocketAddr>,
    /// PEM certificate for *.<apps domain>.
    #[arg(long, env = "ZEITWORK_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ZEITWORK_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// A load balancer whose PROXY protocol header is trusted (address or CIDR; repeatable).
    #[arg(long = "trusted-proxy", env = "ZEITWORK_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<String>,
    /// ACME directory URL for custom domain certificates (e.g. https://acme-v02.api.letsencrypt.org/directory).
    #[arg(long, env = "ZEITWORK_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// Contact e-mail of the ACME account.
    #[arg(long, env = "ZEITWORK_ACME_CONTACT")]
    acme_contact: Option<String>,
}

pub async fn load_balancer(args: LoadBalancerArgs) -> Result<()> {
    args.common.init_logging();
    let mut c: zeitwork_lb::LbConfig = load_toml(args.common.config.as_deref())?;
    let from = match args.backends_from.as_deref() {
        Some("http") => Some(zeitwork_lb::EdgePort::Http),
        Some("https") => Some(zeitwork_lb::EdgePort::Https),
        _ => None,
    };
    set_some(&mut c.operator_url, args.operator);
    set_some(&mut c.token, args.token);
    if let Some(listen) = args.common.listen {
        if args.backends.is_empty() && from.is_none() {
            return Err(UsageError(
                "--listen needs at least one --backend EDGE:PORT (or --backends-from http|https with --operator)"
                    .into(),
            )
            .into());
        }
        c.listeners.push(zeitwork_lb::ListenerConfig {
            listen,
            backends: args.backends.clone(),
            backends_from: from,
            algorithm: args.algorithm,
            proxy_protocol: !args.no_proxy_protocol,
        });
    } else if !args.backends.is_empty() {
        return Err(UsageError("--backend needs --listen ADDR:PORT".into()).into());
    }
    set(&mut c.admin_listen, args.admin_listen);
    let c = c.with_default_listener();
    if c.listeners.is_empty() {
        return Err(UsageError(
            "no listener: give --listen ADDR:PORT --backend EDGE:PORT, [[listeners]] in the config file, or \
             --operator URL --token … to serve 0.0.0.0:8082 from the operator's edge proxies"
                .into(),
        )
        .into());
    }
    c.validate().map_err(|e| UsageError(e.to_string()))?;
    let lb = zeitwork_lb::LoadBalancer::start(c).await.context("the load balancer could not start")?;
    shutdown_signal().await;
    lb.shutdown().await;
    Ok(())
}

pub async fn edge_proxy(args: EdgeProxyArgs) -> Result<()> {
    args.common.init_logging();
    let mut c: EdgeConfig = load_toml(args.common.config.as_deref())?;
    set(&mut c.http_listen, args.common.listen);
    set(&mut c.operator_url, args.operator);
    set_some(&mut c.token, args.token);
    set(&mut c.https_listen, args.https_listen);
    set(&mut c.admin_listen, args.admin_listen);
    set_some(&mut c.tls_cert, args.tls_cert);
    set_some(&mut c.tls_key, args.tls_key);
    if !args.trusted_proxies.is_empty() {
        c.trusted_proxies = args.trusted_proxies;
    }
    set_some(&mut c.acme_directory, args.acme_directory);
    set_some(&mut c.acme_contact, args.acme_contact);
    c.validate().map_err(|e| UsageError(e.to_string()))?;
    let edge = EdgeProxy::start(c).await.context("the edge proxy could not start")?;
    shutdown_signal().await;
    edge.shutdown().await;
    Ok(())
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (default: $XDG_DATA_HOME/zeitwork or ~/.local/share/zeitwork).
    #[arg(long, env = "ZEITWORK_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Port of the operator API on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    /// Port of the node agent on 127.0.0.1.
    #[arg(long, default_value_t = 8081)]
    agent_port: u16,
    /// Port apps are served on over HTTP.
    #[arg(long, default_value_t = 8083)]
    http_port: u16,
    /// Port apps are served on over HTTPS.
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
    #[arg(long, env = "ZEITWORK_LOG", default_value = "info")]
    log: String,
    /// Build the demo app (examples/hello) without Docker, deploy it and print its URL.
    #[arg(long)]
    demo: bool,
    /// Never install missing host packages; say what to install instead.
    #[arg(long)]
    no_install: bool,
    /// auto (the best that works here, by probe), firecracker, qemu or container.
    #[arg(long, default_value = "auto", value_parser = zeitwork_runtime::select::RUNTIMES.to_vec())]
    runtime: String,
    /// A firecracker binary (for --runtime firecracker or auto).
    #[arg(long, env = "ZEITWORK_FIRECRACKER")]
    firecracker: Option<PathBuf>,
    /// The /16 instances get their addresses from (change it when 10.88.0.0/16 is in use here).
    #[arg(long, env = "ZEITWORK_INSTANCE_RANGE", default_value = "10.88.0.0")]
    instance_range: std::net::Ipv4Addr,
    /// First host uid of the containers' user namespaces (1,048,576,000 ids from
    /// here); a second `zeitwork up` on this host needs a range of its own.
    #[arg(long, env = "ZEITWORK_USERNS_BASE", default_value_t = 1_000_000_000)]
    userns_base: u32,
}

/// Where `zeitwork up` keeps its data unless told otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("zeitwork");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/zeitwork"),
        None => PathBuf::from(".zeitwork"),
    }
}

pub async fn up(args: UpArgs) -> Result<()> {
    zeitwork_telemetry::init_logging(&args.log, LogFormat::Text);
    let data = args.data.clone().unwrap_or_else(default_data_dir);
    if args.runtime == "firecracker" && args.firecracker.is_none() {
        return Err(UsageError("--runtime firecracker needs --firecracker PATH (a firecracker binary)".into()).into());
    }
    crate::local::ensure_host_programs(args.demo, &args.runtime, !args.no_install)?;
    let config = OperatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], args.api_port)),
        data_dir: data.clone(),
        apps_scheme: "http".into(),
        apps_port: Some(args.http_port),
        default_instances_per_region: 1,
        // Uptime checks reach apps through this machine's edge (`*.localhost` is not in DNS).
        uptime_via: Some(SocketAddr::from(([127, 0, 0, 1], args.http_port))),
        ..Default::default()
    };
    config.validate()?;
    let op = Operator::start(config).await.context("the operator could not start")?;
    announce_admin_token(&op);
    let api = format!("http://{}", op.addr());
    let admin = std::fs::read_to_string(&op.admin_token_path)
        .map(|t| t.trim().to_owned())
        .with_context(|| format!("cannot read the admin token at {}", op.admin_token_path.display()))?;
    let client = Client::new(&api, Some(admin));
    ensure_local_region(&client).await?;
    let agent_token = ensure_cluster_token(&client, &data.join("node-agent.token"), ClusterRole::NodeAgent).await?;
    if args.runtime != "container" {
        println!("Choosing the runtime ({}; a KVM probe boots a small VM once per host boot)…", args.runtime);
    }
    let agent = NodeAgent::start(NodeAgentConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], args.agent_port)),
        operator_url: api.clone(),
        token: Some(agent_token),
        region: "local".into(),
        data_dir: data.join("agent"),
        runtime: args.runtime.clone(),
        firecracker: args.firecracker.clone(),
        instance_range: args.instance_range,
        userns_base: args.userns_base,
        // One machine: no other node to carry private networks to.
        tunnel_port: 0,
        ..Default::default()
    })
    .await
    .context("the node agent could not start")?;
    if zeitwork_node_agent::build::find_buildah(None).is_none() {
        println!("Builds from source (`zeitwork deploy --source`) need buildah: sudo apt-get install -y buildah");
    }
    let edge_token = ensure_cluster_token(&client, &data.join("edge-proxy.token"), ClusterRole::EdgeProxy).await?;
    let (cert, key) = crate::local::local_tls(&data, "zeitwork.localhost").context("cannot set up the local CA")?;
    let edge = EdgeProxy::start(EdgeConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], args.http_port)),
        https_listen: SocketAddr::from(([127, 0, 0, 1], args.https_port)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        operator_url: api.clone(),
        token: Some(edge_token),
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..Default::default()
    })
    .await
    .context("the edge proxy could not start")?;
    let demo = if args.demo { Some(crate::local::deploy_demo(&client).await?) } else { None };

    println!();
    println!("Zeitwork is running.");
    println!("  API      {api}");
    println!("  Console  {api}/ (sign in with the token below)");
    println!("  Token    {}", op.admin_token_path.display());
    println!(
        "  Node     {} in region local ({}), runtime {}",
        agent.node().hostname,
        agent.node().address,
        agent.node().runtime,
    );
    if let Some(why) = &agent.node().runtime_detail {
        println!("           {why}");
    }
    println!("  Apps     http://<deployment-id>.zeitwork.localhost:{}", args.http_port);
    println!("           https://<deployment-id>.zeitwork.localhost:{}", args.https_port);
    println!("  Data     {}", data.display());
    println!("  CA       {} (local CA for HTTPS; trust it with:", data.join("ca.pem").display());
    println!(
        "           sudo cp {} /usr/local/share/ca-certificates/zeitwork.crt && sudo update-ca-certificates)",
        data.join("ca.pem").display()
    );
    if let Some(d) = &demo {
        println!();
        println!("The demo app is live:");
        println!("  {}", d.url);
        println!("  https://{}.zeitwork.localhost:{}/", d.id, args.https_port);
        println!("  curl {}", d.url);
    }
    println!();
    println!("Next:");
    println!("  export ZEITWORK_API={api} ZEITWORK_TOKEN=$(cat {})", op.admin_token_path.display());
    println!("  zeitwork orgs create acme");
    println!("  zeitwork projects create acme/web");
    println!("  zeitwork deploy acme/web --image registry.example.com/web:1   (or --archive app.tar)");
    println!("  zeitwork logs <deployment-id> -f");
    println!();
    println!("Press Ctrl-C to stop.");
    shutdown_signal().await;
    println!("Stopping…");
    edge.shutdown().await;
    agent.shutdown().await;
    op.shutdown().await;
    println!("Stopped.");
    Ok(())
}

async fn ensure_local_region(client: &Client) -> Result<()> {
    let body = CreateRegion { code: "local".into(), name: "This machine".into(), country: "ZZ".into() };
    match client.post::<_, Region>("/api/v1/regions", &body).await {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(409) => Ok(()),
        Err(e) => Err(e).context("cannot create the local region"),
    }
}

/// Reuses a local role's token from a previous start, or creates one.
async fn ensure_cluster_token(client: &Client, path: &Path, role: ClusterRole) -> Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_owned();
        let probe = Client::new(client.base(), Some(t.clone()));
        if probe.get::<serde_json::Value>("/api/v1/nodes?limit=1").await.is_ok() {
            return Ok(t);
        }
    }
    let created: CreatedToken = client
        .post(
            "/api/v1/tokens",
            &CreateToken {
                name: format!("local {}", role.as_str()),
                scope: TokenScope::Cluster { role },
                read_only: false,
                expires_in_days: None,
            },
        )
        .await
        .with_context(|| format!("cannot create the {} token", role.as_str()))?;
    write_private(path, &created.secret)?;
    Ok(created.secret)
}

pub fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(format!("{content}\n").as_bytes())?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = ctrl_c => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

/// `slot` takes the value given on the command line, if any.
fn set<T>(slot: &mut T, given: Option<T>) {
    if let Some(v) = given {
        *slot = v;
    }
}

/// An optional setting takes the value given on the command line, if any.
fn set_some<T>(slot: &mut Option<T>, given: Option<T>) {
    if given.is_some() {
        *slot = given;
    }
}
