//! The CLI for people: one verb per resource, human tables by default and
//! `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use zeitwork_api_types::*;
use zeitwork_client::{encode, Client};

use crate::output::{ago, fields, json, opt, table};
use crate::roles::{default_data_dir, UsageError};

/// Where to reach the operator and how to prove who you are.
#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Operator API URL (default: from ~/.config/zeitwork/cli.toml, else http://127.0.0.1:8080).
    #[arg(long, env = "ZEITWORK_API", global = true)]
    api: Option<String>,
    /// API token (default: from the CLI config, else the token of a local `zeitwork up`).
    #[arg(long, env = "ZEITWORK_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CliFile {
    api: Option<String>,
    token: Option<String>,
}

impl Conn {
    pub(crate) fn client(&self) -> Result<Client> {
        let file = cli_config_path()
            .and_then(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
            .map(|(p, t)| toml::from_str::<CliFile>(&t).map_err(|e| UsageError(format!("{}: {e}", p.display()))))
            .transpose()?
            .unwrap_or_default();
        let api = self.api.clone().or(file.api).unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let token = self.token.clone().or(file.token).or_else(|| {
            std::fs::read_to_string(default_data_dir().join("admin.token")).ok().map(|t| t.trim().to_owned())
        });
        if token.is_none() {
            return Err(UsageError(
                "no API token: set ZEITWORK_TOKEN (the operator wrote the first one to <data dir>/admin.token)".into(),
            )
            .into());
        }
        Ok(Client::new(&api, token))
    }
}

fn cli_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("zeitwork/cli.toml"))
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Deploy an image to ORG/PROJECT and follow it until it serves traffic or fails.
    Deploy(DeployArgs),
    /// Route an environment back to the previous deployment (or `--to ID`).
    Rollback(RollbackArgs),
    /// Point one environment at the deployment active in another.
    Promote(PromoteArgs),
    /// Print a deployment's logs (all its instances, merged by time); `-f` follows them live.
    Logs(LogsArgs),
    /// Nodes, running deployments and their instances at a glance.
    Status(StatusArgs),
    /// Print a shell completion script: `zeitwork completions bash > /etc/bash_completion.d/zeitwork`.
    Completions { shell: clap_complete::Shell },
    /// Regions: list, create, show, delete.
    Regions(With<RegionCmd>),
    /// Worker nodes: list, show, drain, delete.
    Nodes(With<NodeCmd>),
    /// Organisations and their members.
    Orgs(With<OrgCmd>),
    /// Projects: list, create, show, update, delete.
    Projects(With<ProjectCmd>),
    /// Environment variables of a project (values encrypted at rest).
    Env(With<EnvCmd>),
    /// Custom domains of a project.
    Domains(With<DomainCmd>),
    /// Deployments: list, create, show.
    Deployments(With<DeploymentCmd>),
    /// API tokens: list, create, delete.
    Tokens(With<TokenCmd>),
    /// The audit log.
    Events(With<EventCmd>),
    /// Deployment frequency, duration, success rate, and what each org holds.
    Analytics(With<crate::ops::AnalyticsCmd>),
    /// The outbox and its dead-letter queue: figures, list, retry, drop (platform admins).
    Notifications(With<crate::ops::NotificationsCmd>),
    /// Write a consistent snapshot of a single-machine operator's whole state (online).
    Backup(crate::ops::BackupArgs),
    /// Put a backup in place as an operator's state (the operator stopped; the same encryption key).
    Restore(crate::ops::RestoreArgs),
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    conn: Conn,
    /// ORG/PROJECT
    project: String,
    /// A deployment id (default: the one served before the current one).
    #[arg(long)]
    to: Option<String>,
    #[arg(long, value_enum)]
    environment: Option<EnvArg>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    conn: Conn,
    /// A deployment id, or ORG/PROJECT for the deployment its environment serves.
    target: String,
    /// Keep printing new lines as they are written.
    #[arg(short, long)]
    follow: bool,
    /// Only lines since an age (`10m`, `2h`, `1d`) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// With ORG/PROJECT: which environment's deployment.
    #[arg(long, value_enum)]
    environment: Option<EnvArg>,
    /// The output of the deployment's build from source instead of its instances' logs.
    #[arg(long)]
    build: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    conn: Conn,
    /// ORG/PROJECT
    project: String,
    #[arg(long, value_enum)]
    from: EnvArg,
    #[arg(long, value_enum)]
    to: EnvArg,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    conn: Conn,
    /// ORG/PROJECT
    project: String,
    /// Image reference, e.g. registry.example.com/acme/web:1.2
    #[arg(long, required_unless_present_any = ["archive", "source"], conflicts_with_all = ["archive", "source"])]
    image: Option<String>,
    /// An image archive to upload and deploy (`docker save` or oci-archive tar), no registry needed.
    #[arg(long, value_name = "FILE", conflicts_with = "source")]
    archive: Option<PathBuf>,
    /// Build the image on the platform from a directory with a Dockerfile (`.` when no DIR is given);
    /// `.dockerignore` and `.gitignore` leave files out.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = ".")]
    source: Option<PathBuf>,
    /// With --source: the Dockerfile's path inside DIR (the project's setting, else `Dockerfile`).
    #[arg(long, requires = "source")]
    dockerfile: Option<String>,
    /// With --source: the stage of a multi-stage Dockerfile to build.
    #[arg(long, requires = "source")]
    target: Option<String>,
    /// With --source: NAME=VALUE passed as a build argument (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE", requires = "source")]
    build_args: Vec<String>,
    /// With --source: NAME[=ENV] passed as a build secret (`RUN --mount=type=secret,id=NAME`),
    /// its value read from the environment variable ENV (NAME by default) (repeatable).
    #[arg(long = "build-secret", value_name = "NAME[=ENV]", requires = "source")]
    build_secrets: Vec<String>,
    #[arg(long, value_enum)]
    environment: Option<EnvArg>,
    #[arg(long)]
    commit_sha: Option<String>,
    #[arg(long)]
    commit_message: Option<String>,
    #[arg(long)]
    instances_per_region: Option<u32>,
    /// Give up following after this many seconds (the deployment goes on).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Debug, Args)]
pub struct With<C: Subcommand> {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: C,
}

#[derive(Debug, Subcommand)]
pub enum RegionCmd {
    List,
    Create {
        code: String,
        #[arg(long)]
        name: Option<String>,
        /// ISO 3166-1 alpha-2 code, e.g. US.
        #[arg(long)]
        country: String,
    },
    Show {
        code: String,
    },
    Delete {
        code: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    List,
    Show { id: String },
    Drain { id: String },
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    List,
    Create {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        /// First Owner (e-mail or user name).
        #[arg(long)]
        owner: Option<String>,
    },
    Show {
        slug: String,
    },
    /// List members.
    Members {
        org: String,
    },
    /// Add a member or change their role.
    AddMember {
        org: String,
        user: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    RemoveMember {
        org: String,
        user: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Guest,
    Developer,
    Admin,
    Owner,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Guest => Role::Guest,
            RoleArg::Developer => Role::Developer,
            RoleArg::Admin => Role::Admin,
            RoleArg::Owner => Role::Owner,
        }
    }
}

/// Project settings shared by create and update.
#[derive(Debug, Args)]
pub struct ProjectSettings {
    /// GitHub repository, owner/repo.
    #[arg(long)]
    repo: Option<String>,
    #[arg(long)]
    branch: Option<String>,
    /// Pushes to this branch deploy to staging.
    #[arg(long)]
    staging_branch: Option<String>,
    /// Tag pushes matching this regular expression deploy to production (e.g. `^v[0-9]+`).
    #[arg(long)]
    tag_pattern: Option<String>,
    /// Builds from source: the Dockerfile's path in the repository.
    #[arg(long = "build-dockerfile", value_name = "PATH")]
    build_dockerfile: Option<String>,
    /// Builds from source: the stage to build.
    #[arg(long = "build-target", value_name = "STAGE")]
    build_target: Option<String>,
    /// Deploy pushes to the branch automatically.
    #[arg(long)]
    auto_deploy: Option<bool>,
    /// Port the app listens on.
    #[arg(long)]
    port: Option<u16>,
    /// Virtual CPUs per instance (1-32).
    #[arg(long)]
    vcpu: Option<u32>,
    /// Memory per instance in MiB (128-65536).
    #[arg(long)]
    memory: Option<u32>,
    #[arg(long)]
    instances_per_region: Option<u32>,
    /// Region codes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    regions: Option<Vec<String>>,
    /// Image to deploy per commit, `{sha}` replaced.
    #[arg(long)]
    image_template: Option<String>,
    /// Seconds without requests after which a deployment no environment points at sleeps (10-2592000).
    #[arg(long)]
    sleep_after_secs: Option<u32>,
    /// Sleeping deployments are retired once this many newer ones exist (1-1000).
    #[arg(long)]
    retain_deployments: Option<u32>,
    /// Autoscaling: fewest instances per region (0: scale to zero when idle); with --max-per-region.
    #[arg(long)]
    min_per_region: Option<u32>,
    /// Autoscaling: most instances per region; with --min-per-region.
    #[arg(long)]
    max_per_region: Option<u32>,
    /// Autoscaling: add instances above this average CPU use (1-100 %).
    #[arg(long)]
    target_cpu_percent: Option<u32>,
    /// Autoscaling: add instances above this average memory use (1-100 %).
    #[arg(long)]
    target_memory_percent: Option<u32>,
    /// Back to the fixed instances_per_region (update only).
    #[arg(long, conflicts_with_all = ["min_per_region", "max_per_region", "target_cpu_percent", "target_memory_percent"])]
    no_scaling: bool,
}

/// The `scaling` the flags ask for: `None` when they say nothing.
fn scaling_from(s: &ProjectSettings) -> Result<Option<zeitwork_api_types::Scaling>> {
    let any = s.min_per_region.is_some()
        || s.max_per_region.is_some()
        || s.target_cpu_percent.is_some()
        || s.target_memory_percent.is_some();
    if !any {
        return Ok(None);
    }
    let (Some(min), Some(max)) = (s.min_per_region, s.max_per_region) else {
        return Err(UsageError("autoscaling needs both --min-per-region and --max-per-region".into()).into());
    };
    Ok(Some(zeitwork_api_types::Scaling {
        min_per_region: min,
        max_per_region: max,
        target_cpu_percent: s.target_cpu_percent,
        target_memory_percent: s.target_memory_percent,
    }))
}

#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Create ORG/NAME.
    Create {
        project: String,
        #[command(flatten)]
        settings: ProjectSettings,
    },
    Show {
        project: String,
    },
    Update {
        project: String,
        #[command(flatten)]
        settings: ProjectSettings,
    },
    Delete {
        project: String,
    },
    /// Which deployment serves which host of ORG/PROJECT.
    Routing {
        project: String,
    },
    /// Health of the instances serving each environment of ORG/PROJECT.
    Health {
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// List variables of ORG/PROJECT.
    List { project: String },
    /// Set KEY=VALUE pairs.
    Set {
        project: String,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Remove a variable.
    Unset { project: String, key: String },
}

#[derive(Debug, Subcommand)]
pub enum DomainCmd {
    List {
        project: String,
    },
    Add {
        project: String,
        name: String,
        #[arg(long, value_enum)]
        environment: Option<EnvArg>,
    },
    Remove {
        project: String,
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EnvArg {
    Production,
    Staging,
    Preview,
}

impl From<EnvArg> for Environment {
    fn from(e: EnvArg) -> Environment {
        match e {
            EnvArg::Production => Environment::Production,
            EnvArg::Staging => Environment::Staging,
            EnvArg::Preview => Environment::Preview,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeploymentCmd {
    /// List deployments (of ORG/PROJECT when given).
    List {
        project: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, value_enum)]
        environment: Option<EnvArg>,
    },
    /// Record a deployment of an image for ORG/PROJECT.
    Create {
        project: String,
        #[arg(long)]
        image: String,
        #[arg(long, value_enum)]
        environment: Option<EnvArg>,
        #[arg(long)]
        commit_sha: Option<String>,
        #[arg(long)]
        commit_message: Option<String>,
        #[arg(long)]
        instances_per_region: Option<u32>,
    },
    Show {
        id: String,
    },
    /// Stop a deployment that serves no environment (its instances stop).
    Stop {
        id: String,
    },
    /// Put a deployment no environment points at to sleep (its URL keeps working and wakes it).
    Sleep {
        id: String,
    },
    /// Wake a sleeping deployment now, instead of on its first request.
    Wake {
        id: String,
    },
    /// The instances of a deployment.
    Instances {
        id: String,
    },
    /// Memory and CPU of a deployment's instances, measured now.
    Metrics {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Create a token: --admin, --cluster ROLE, or --org ORG --role ROLE.
    Create {
        name: String,
        #[arg(long, conflicts_with_all = ["cluster", "org"])]
        admin: bool,
        #[arg(long, value_parser = ["node-agent", "edge-proxy", "load-balancer"])]
        cluster: Option<String>,
        #[arg(long, requires = "role")]
        org: Option<String>,
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventCmd {
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Follow live changes of deployments, instances and nodes.
    Watch {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
    },
}

/// Reads Server-Sent Events from a response and hands each `data:` (as JSON) to `each`;
/// returns when the stream ends or `each` says stop.
async fn read_sse(res: reqwest::Response, mut each: impl FnMut(&str, Change) -> bool) -> Result<()> {
    use futures::StreamExt;
    let mut body = res.bytes_stream();
    let (mut buf, mut event) = (String::new(), String::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.context("the event stream broke off")?));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            let line = line.trim_end();
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                if let Ok(change) = serde_json::from_str::<Change>(d.trim()) {
                    if !each(&event, change) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// `org/project` → (org, project).
fn split_project(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((o, p)) if !o.is_empty() && !p.is_empty() && !p.contains('/') => Ok((o.to_owned(), p.to_owned())),
        _ => Err(UsageError(format!("{s:?} is not ORG/PROJECT (e.g. acme/web)")).into()),
    }
}

fn project_path(s: &str) -> Result<String> {
    let (o, p) = split_project(s)?;
    Ok(format!("/api/v1/projects/{}/{}", encode(&o), encode(&p)))
}

pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> =
        pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

pub async fn run(verb: Verb) -> Result<()> {
    match verb {
        Verb::Deploy(a) => deploy(a).await,
        Verb::Rollback(a) => {
            let c = a.conn.client()?;
            let body = serde_json::json!({"to": a.to, "environment": a.environment.map(Environment::from)});
            let d: Deployment = c.post(&format!("{}/rollback", project_path(&a.project)?), &body).await?;
            if a.conn.json {
                json(&d)
            } else if d.status == DeploymentStatus::Pending {
                println!(
                    "{} is retired; redeploying its image as {} (follow with `zeitwork deployments show {}`).",
                    a.project, d.id, d.id
                );
            } else if d.status == DeploymentStatus::Waking {
                println!("{} was asleep; waking it. Traffic moves to it once it is ready…", d.id);
                let started = std::time::Instant::now();
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    let now: Deployment = c.get(&format!("/api/v1/deployments/{}", encode(&d.id))).await?;
                    match now.status {
                        DeploymentStatus::Active => {
                            println!("{} now serves {} ({}).", a.project, now.id, now.url);
                            break;
                        }
                        DeploymentStatus::Sleeping | DeploymentStatus::Failed => anyhow::bail!(
                            "{} could not wake: {}; {} keeps serving",
                            now.id,
                            now.reason.unwrap_or_else(|| "no reason recorded".into()),
                            a.project
                        ),
                        _ if started.elapsed().as_secs() > 600 => {
                            anyhow::bail!("stopped waiting for {} after 600 s; it is {}", now.id, now.status.as_str())
                        }
                        _ => {}
                    }
                }
            } else {
                println!("{} now serves {} ({}).", a.project, d.id, d.url);
            }
            Ok(())
        }
        Verb::Promote(a) => {
            let c = a.conn.client()?;
            let body = serde_json::json!({"from": Environment::from(a.from), "to": Environment::from(a.to)});
            let d: Deployment = c.post(&format!("{}/promote", project_path(&a.project)?), &body).await?;
            if a.conn.json {
                json(&d)
            } else {
                println!("{} {} now serves {}.", a.project, Environment::from(a.to).as_str(), d.id);
            }
            Ok(())
        }
        Verb::Logs(a) => logs(a).await,
        Verb::Status(a) => status(a.conn).await,
        Verb::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = crate::Args::command();
            clap_complete::generate(shell, &mut cmd, "zeitwork", &mut std::io::stdout());
            Ok(())
        }
        Verb::Regions(w) => regions(w.conn, w.cmd).await,
        Verb::Nodes(w) => nodes(w.conn, w.cmd).await,
        Verb::Orgs(w) => orgs(w.conn, w.cmd).await,
        Verb::Projects(w) => projects(w.conn, w.cmd).await,
        Verb::Env(w) => env(w.conn, w.cmd).await,
        Verb::Domains(w) => domains(w.conn, w.cmd).await,
        Verb::Deployments(w) => deployments(w.conn, w.cmd).await,
        Verb::Tokens(w) => tokens(w.conn, w.cmd).await,
        Verb::Events(w) => events(w.conn, w.cmd).await,
        Verb::Analytics(w) => crate::ops::analytics(w.conn, w.cmd).await,
        Verb::Notifications(w) => crate::ops::notifications(w.conn, w.cmd).await,
        Verb::Backup(a) => crate::ops::backup(a).await,
        Verb::Restore(a) => crate::ops::restore(a).await,
    }
}

/// `POST /api/v1/deployments/{id}/{action}`, then the deployment's new status.
async fn deployment_action(c: &Client, as_json: bool, id: &str, action: &str, note: &str) -> Result<()> {
    let d: Deployment = c.post_empty(&format!("/api/v1/deployments/{}/{action}", encode(id))).await?;
    if as_json {
        json(&d)
    } else {
        println!("Deployment {} is {}{note}.", d.id, d.status.as_str())
    }
    Ok(())
}

fn region_rows(rs: &[Region]) {
    table(
        &["code", "name", "country", "created"],
        rs.iter().map(|r| vec![r.code.clone(), r.name.clone(), r.country.clone(), ago(&r.created_at)]).collect(),
    );
}

async fn regions(conn: Conn, cmd: RegionCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        RegionCmd::List => {
            let rs: Vec<Region> = c.list_all("/api/v1/regions").await?;
            if conn.json {
                json(&rs)
            } else {
                region_rows(&rs)
            }
        }
        RegionCmd::Create { code, name, country } => {
            let body = CreateRegion { name: name.unwrap_or_else(|| code.clone()), code, country };
            let r: Region = c.post("/api/v1/regions", &body).await?;
            if conn.json {
                json(&r)
            } else {
                println!("Created region {}.", r.code)
            }
        }
        RegionCmd::Show { code } => {
            let r: Region = c.get(&format!("/api/v1/regions/{}", encode(&code))).await?;
            if conn.json {
                json(&r)
            } else {
                region_rows(&[r])
            }
        }
        RegionCmd::Delete { code } => {
            c.delete(&format!("/api/v1/regions/{}", encode(&code))).await?;
            if !conn.json {
                println!("Deleted region {code}.")
            }
        }
    }
    Ok(())
}

fn node_rows(ns: &[Node]) {
    table(
        &["id", "hostname", "region", "status", "instances", "vcpu used/schedulable", "cores", "memory", "heartbeat"],
        ns.iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.hostname.clone(),
                    n.region.clone(),
                    n.status.as_str().into(),
                    n.instances.to_string(),
                    format!("{}/{}", n.allocated.vcpu, n.capacity.vcpu),
                    n.physical.map(|p| p.vcpu.to_string()).unwrap_or_else(|| "-".into()),
                    format!("{}/{} MiB", n.allocated.memory, n.capacity.memory),
                    n.last_heartbeat.as_ref().map(ago).unwrap_or_else(|| "never".into()),
                ]
            })
            .collect(),
    );
}

async fn nodes(conn: Conn, cmd: NodeCmd) -> Result<()> {
    let c = conn.client()?;
    let one = |id: &str| format!("/api/v1/nodes/{}", encode(id));
    match cmd {
        NodeCmd::List => {
            let ns: Vec<Node> = c.list_all("/api/v1/nodes").await?;
            if conn.json {
                json(&ns)
            } else {
                node_rows(&ns)
            }
        }
        NodeCmd::Show { id } => {
            let n: Node = c.get(&one(&id)).await?;
            if conn.json {
                json(&n)
            } else {
                let why = n.runtime_detail.clone();
                node_rows(&[n]);
                if let Some(why) = why {
                    println!("Runtime: {why}");
                }
            }
        }
        NodeCmd::Drain { id } => {
            let n: Node = c.post_empty(&format!("{}/drain", one(&id))).await?;
            if conn.json {
                json(&n)
            } else {
                println!("Node {} is {}.", n.hostname, n.status.as_str())
            }
        }
        NodeCmd::Delete { id } => {
            c.delete(&one(&id)).await?;
            if !conn.json {
                println!("Deleted node {id}.")
            }
        }
    }
    Ok(())
}

async fn orgs(conn: Conn, cmd: OrgCmd) -> Result<()> {
    let c = conn.client()?;
    let org_rows = |os: &[Org]| {
        table(
            &["slug", "name", "created"],
            os.iter().map(|o| vec![o.slug.clone(), o.name.clone(), ago(&o.created_at)]).collect(),
        )
    };
    let members_path = |org: &str| format!("/api/v1/orgs/{}/members", encode(org));
    match cmd {
        OrgCmd::List => {
            let os: Vec<Org> = c.list_all("/api/v1/orgs").await?;
            if conn.json {
                json(&os)
            } else {
                org_rows(&os)
            }
        }
        OrgCmd::Create { slug, name, owner } => {
            let o: Org = c.post("/api/v1/orgs", &CreateOrg { slug, name, owner }).await?;
            if conn.json {
                json(&o)
            } else {
                println!("Created organisation {}.", o.slug)
            }
        }
        OrgCmd::Show { slug } => {
            let o: Org = c.get(&format!("/api/v1/orgs/{}", encode(&slug))).await?;
            if conn.json {
                json(&o)
            } else {
                org_rows(&[o])
            }
        }
        OrgCmd::Members { org } => {
            let ms: Vec<Member> = c.get(&members_path(&org)).await?;
            if conn.json {
                json(&ms)
            } else {
                table(
                    &["user", "role", "since"],
                    ms.iter().map(|m| vec![m.user.clone(), m.role.as_str().into(), ago(&m.created_at)]).collect(),
                )
            }
        }
        OrgCmd::AddMember { org, user, role } => {
            let m: Member = c.post(&members_path(&org), &AddMember { user, role: role.into() }).await?;
            if conn.json {
                json(&m)
            } else {
                println!("{} is {} of {}.", m.user, m.role.as_str(), m.org)
            }
        }
        OrgCmd::RemoveMember { org, user } => {
            c.delete(&format!("{}?user={}", members_path(&org), encode(&user))).await?;
            if !conn.json {
                println!("Removed {user} from {org}.")
            }
        }
    }
    Ok(())
}

fn project_rows(ps: &[Project]) {
    table(
        &["project", "repo", "branch", "auto", "port", "resources", "per region", "regions"],
        ps.iter()
            .map(|p| {
                vec![
                    format!("{}/{}", p.org, p.name),
                    opt(&p.github_repo),
                    p.branch.clone(),
                    if p.auto_deploy { "yes" } else { "no" }.into(),
                    p.port.to_string(),
                    format!("{} vCPU, {} MiB", p.resources.vcpu, p.resources.memory),
                    p.instances_per_region.to_string(),
                    p.regions.join(","),
                ]
            })
            .collect(),
    );
}

fn resources_from(s: &ProjectSettings, current: Option<Resources>) -> Result<Option<Resources>> {
    match (s.vcpu, s.memory, current) {
        (None, None, _) => Ok(None),
        (Some(v), Some(m), _) => Ok(Some(Resources { vcpu: v, memory: m })),
        (v, m, Some(cur)) => Ok(Some(Resources { vcpu: v.unwrap_or(cur.vcpu), memory: m.unwrap_or(cur.memory) })),
        (v, m, None) => Ok(Some(Resources { vcpu: v.unwrap_or(1), memory: m.unwrap_or(256) })),
    }
}

fn build_settings_from(
    dockerfile: &Option<String>,
    target: &Option<String>,
) -> Option<zeitwork_api_types::BuildSettings> {
    (dockerfile.is_some() || target.is_some()).then(|| zeitwork_api_types::BuildSettings {
        dockerfile: dockerfile.clone(),
        target: target.clone(),
        args: Default::default(),
    })
}

async fn projects(conn: Conn, cmd: ProjectCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        ProjectCmd::List { org } => {
            let ps: Vec<Project> = c.list_all(&format!("/api/v1/projects{}", query(&[("org", org)]))).await?;
            if conn.json {
                json(&ps)
            } else {
                project_rows(&ps)
            }
        }
        ProjectCmd::Create { project, settings } => {
            let (org, name) = split_project(&project)?;
            let scaling = scaling_from(&settings)?;
            let body = CreateProject {
                name,
                org,
                resources: resources_from(&settings, None)?,
                github_repo: settings.repo,
                branch: settings.branch,
                auto_deploy: settings.auto_deploy,
                port: settings.port,
                instances_per_region: settings.instances_per_region,
                regions: settings.regions,
                image_template: settings.image_template,
                rate_limit: None,
                sleep_after_secs: settings.sleep_after_secs,
                retain_deployments: settings.retain_deployments,
                scaling,
                staging_branch: settings.staging_branch,
                tag_pattern: settings.tag_pattern,
                build: build_settings_from(&settings.build_dockerfile, &settings.build_target),
            };
            let p: Project = c.post("/api/v1/projects", &body).await?;
            if conn.json {
                json(&p)
            } else {
                println!("Created project {}/{}.", p.org, p.name)
            }
        }
        ProjectCmd::Show { project } => {
            let p: Project = c.get(&project_path(&project)?).await?;
            if conn.json {
                json(&p)
            } else {
                project_rows(&[p])
            }
        }
        ProjectCmd::Update { project, settings } => {
            let path = project_path(&project)?;
            let current = if settings.vcpu.is_some() != settings.memory.is_some() {
                Some(c.get::<Project>(&path).await?.resources)
            } else {
                None
            };
            let scaling = if settings.no_scaling { Some(None) } else { scaling_from(&settings)?.map(Some) };
            let patch = PatchProject {
                resources: resources_from(&settings, current)?,
                github_repo: settings.repo.map(Some),
                branch: settings.branch,
                auto_deploy: settings.auto_deploy,
                port: settings.port,
                instances_per_region: settings.instances_per_region,
                regions: settings.regions,
                image_template: settings.image_template.map(Some),
                rate_limit: None,
                sleep_after_secs: settings.sleep_after_secs,
                retain_deployments: settings.retain_deployments,
                scaling,
                staging_branch: settings.staging_branch.map(Some),
                tag_pattern: settings.tag_pattern.map(Some),
                build: build_settings_from(&settings.build_dockerfile, &settings.build_target),
            };
            let p: Project = c.patch(&path, &patch).await?;
            if conn.json {
                json(&p)
            } else {
                project_rows(&[p])
            }
        }
        ProjectCmd::Delete { project } => {
            c.delete(&project_path(&project)?).await?;
            if !conn.json {
                println!("Deleted project {project}.")
            }
        }
        ProjectCmd::Routing { project } => {
            let routes: Vec<ProjectRoute> = c.get(&format!("{}/routing", project_path(&project)?)).await?;
            if conn.json {
                json(&routes)
            } else {
                table(
                    &["host", "deployment", "environment", "instances"],
                    routes
                        .iter()
                        .map(|r| {
                            vec![
                                r.host.clone(),
                                r.deployment.clone(),
                                r.environment.map_or("-".into(), |e| e.as_str().to_owned()),
                                r.instances.to_string(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        ProjectCmd::Health { project } => {
            let envs: Vec<EnvironmentHealth> = c.get(&format!("{}/health", project_path(&project)?)).await?;
            if conn.json {
                json(&envs)
            } else if envs.is_empty() {
                println!("{project} serves nothing yet; deploy it with `zeitwork deploy {project} --image REF`.");
            } else {
                for e in &envs {
                    println!(
                        "{}: {} {} ({}/{} instances ready, deployment {})",
                        e.environment.as_str(),
                        e.health,
                        e.deployment,
                        e.ready,
                        e.total,
                        e.status.as_str()
                    );
                    instance_rows(&e.instances);
                }
            }
        }
    }
    Ok(())
}

async fn env(conn: Conn, cmd: EnvCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        EnvCmd::List { project } => {
            let vs: Vec<EnvVar> = c.get(&format!("{}/env", project_path(&project)?)).await?;
            if conn.json {
                json(&vs)
            } else {
                table(
                    &["key", "value", "updated"],
                    vs.iter()
                        .map(|v| {
                            vec![
                                v.key.clone(),
                                v.value.clone().unwrap_or_else(|| "(redacted)".into()),
                                ago(&v.updated_at),
                            ]
                        })
                        .collect(),
                )
            }
        }
        EnvCmd::Set { project, pairs } => {
            let base = project_path(&project)?;
            let mut parsed = BTreeMap::new();
            for p in &pairs {
                let (k, v) = p.split_once('=').ok_or_else(|| UsageError(format!("{p:?} is not KEY=VALUE")))?;
                parsed.insert(k.to_owned(), v.to_owned());
            }
            for (k, v) in parsed {
                let var: EnvVar = c.put(&format!("{base}/env/{}", encode(&k)), &PutEnvVar { value: v }).await?;
                if conn.json {
                    json(&var)
                } else {
                    println!("Set {}.", var.key)
                }
            }
        }
        EnvCmd::Unset { project, key } => {
            c.delete(&format!("{}/env/{}", project_path(&project)?, encode(&key))).await?;
            if !conn.json {
                println!("Removed {key}.")
            }
        }
    }
    Ok(())
}

async fn domains(conn: Conn, cmd: DomainCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        DomainCmd::List { project } => {
            let ds: Vec<Domain> = c.get(&format!("{}/domains", project_path(&project)?)).await?;
            if conn.json {
                json(&ds)
            } else {
                table(
                    &["domain", "environment", "verified", "certificate"],
                    ds.iter()
                        .map(|d| {
                            vec![
                                d.name.clone(),
                                d.environment.as_str().into(),
                                d.verified.to_string(),
                                d.certificate.clone(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        DomainCmd::Add { project, name, environment } => {
            let d: Domain = c
                .post(
                    &format!("{}/domains", project_path(&project)?),
                    &CreateDomain { name, environment: environment.map(Into::into) },
                )
                .await?;
            if conn.json {
                json(&d)
            } else {
                println!("Added {} to {}/{} ({}).", d.name, d.org, d.project, d.environment.as_str())
            }
        }
        DomainCmd::Remove { project, name } => {
            c.delete(&format!("{}/domains/{}", project_path(&project)?, encode(&name))).await?;
            if !conn.json {
                println!("Removed {name}.")
            }
        }
    }
    Ok(())
}

fn deployment_rows(ds: &[Deployment]) {
    table(
        &["id", "environment", "status", "image", "commit", "created"],
        ds.iter()
            .map(|d| {
                vec![
                    d.id.clone(),
                    d.environment.as_str().into(),
                    d.status.as_str().into(),
                    d.image.clone(),
                    d.commit_sha.as_deref().map(|s| s.chars().take(7).collect()).unwrap_or_else(|| "-".into()),
                    ago(&d.created_at),
                ]
            })
            .collect(),
    );
}

/// Nodes (for tokens that may list them) and every deployment that is not retired, with instance counts.
async fn status(conn: Conn) -> Result<()> {
    let c = conn.client()?;
    let nodes: Option<Vec<Node>> = match c.list_all::<Node>("/api/v1/nodes").await {
        Ok(n) => Some(n),
        Err(e) if e.status() == Some(403) => None,
        Err(e) => return Err(e.into()),
    };
    let live: Vec<Deployment> = c
        .list_all::<Deployment>("/api/v1/deployments")
        .await?
        .into_iter()
        .filter(|d| !matches!(d.status, DeploymentStatus::Retired | DeploymentStatus::Failed))
        .collect();
    let mut rows = Vec::new();
    for d in &live {
        let is: Vec<Instance> = c.get(&format!("/api/v1/deployments/{}/instances", encode(&d.id))).await?;
        let current: Vec<&Instance> = is.iter().filter(|i| i.status != InstanceStatus::Stopped).collect();
        let ready = current.iter().filter(|i| i.status == InstanceStatus::Ready).count();
        rows.push((d, ready, current.len()));
    }
    if conn.json {
        let deployments: Vec<serde_json::Value> = rows
            .iter()
            .map(|(d, ready, total)| serde_json::json!({"deployment": d, "ready": ready, "instances": total}))
            .collect();
        json(&serde_json::json!({"nodes": nodes, "deployments": deployments}));
        return Ok(());
    }
    if let Some(nodes) = &nodes {
        println!("Nodes");
        node_rows(nodes);
        println!();
    }
    println!("Deployments");
    if rows.is_empty() {
        println!("  none running; deploy with `zeitwork deploy ORG/PROJECT --image REF`");
    } else {
        table(
            &["id", "project", "environment", "status", "ready", "url"],
            rows.iter()
                .map(|(d, ready, total)| {
                    vec![
                        d.id.clone(),
                        format!("{}/{}", d.org, d.project),
                        d.environment.as_str().into(),
                        d.status.as_str().into(),
                        format!("{ready}/{total}"),
                        d.url.clone(),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

fn instance_rows(is: &[Instance]) {
    table(
        &["id", "region", "node", "status", "address", "reason", "created"],
        is.iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.region.clone(),
                    opt(&i.node),
                    i.status.as_str().into(),
                    opt(&i.address),
                    opt(&i.exit_reason),
                    ago(&i.created_at),
                ]
            })
            .collect(),
    );
}

async fn deployments(conn: Conn, cmd: DeploymentCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        DeploymentCmd::List { project, status, environment } => {
            let env = environment.map(|e| Environment::from(e).as_str().to_owned());
            let path = match project {
                Some(p) => {
                    format!("{}/deployments{}", project_path(&p)?, query(&[("status", status), ("environment", env)]))
                }
                None => format!("/api/v1/deployments{}", query(&[("status", status), ("environment", env)])),
            };
            let ds: Vec<Deployment> = c.list_all(&path).await?;
            if conn.json {
                json(&ds)
            } else {
                deployment_rows(&ds)
            }
        }
        DeploymentCmd::Create { project, image, environment, commit_sha, commit_message, instances_per_region } => {
            let (org, project) = split_project(&project)?;
            let body = CreateDeployment {
                org,
                project,
                image,
                build: None,
                commit_sha,
                commit_message,
                instances_per_region,
                environment: environment.map(Into::into),
            };
            let d: Deployment = c.post("/api/v1/deployments", &body).await?;
            if conn.json {
                json(&d)
            } else {
                println!("Deployment {} is {}.\nURL: {}", d.id, d.status.as_str(), d.url)
            }
        }
        DeploymentCmd::Stop { id } => deployment_action(&c, conn.json, &id, "stop", "").await?,
        DeploymentCmd::Sleep { id } => deployment_action(&c, conn.json, &id, "sleep", "; its URL wakes it").await?,
        DeploymentCmd::Wake { id } => deployment_action(&c, conn.json, &id, "wake", "").await?,
        DeploymentCmd::Metrics { id } => {
            let m: DeploymentMetrics = c.get(&format!("/api/v1/deployments/{}/metrics", encode(&id))).await?;
            if conn.json {
                json(&m)
            } else {
                let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
                table(
                    &["instance", "region", "status", "memory", "limit", "cpu", "uptime", "note"],
                    m.instances
                        .iter()
                        .map(|i| {
                            vec![
                                i.instance.clone(),
                                i.region.clone(),
                                i.status.as_str().into(),
                                mib(i.memory_bytes),
                                mib(i.memory_limit_bytes),
                                i.cpu_seconds.map_or("-".into(), |c| format!("{c:.2} s")),
                                i.uptime_secs.map_or("-".into(), |u| format!("{u} s")),
                                opt(&i.error),
                            ]
                        })
                        .collect(),
                );
                println!(
                    "{} ready; {:.1} MiB, {:.2} CPU-seconds in all",
                    m.ready,
                    m.memory_bytes as f64 / 1048576.0,
                    m.cpu_seconds
                );
            }
        }
        DeploymentCmd::Instances { id } => {
            let is: Vec<Instance> = c.get(&format!("/api/v1/deployments/{}/instances", encode(&id))).await?;
            if conn.json {
                json(&is)
            } else {
                instance_rows(&is)
            }
        }
        DeploymentCmd::Show { id } => {
            let d: Deployment = c.get(&format!("/api/v1/deployments/{}", encode(&id))).await?;
            if conn.json {
                json(&d)
            } else {
                fields(vec![
                    ("id", d.id.clone()),
                    ("project", format!("{}/{}", d.org, d.project)),
                    ("environment", d.environment.as_str().into()),
                    ("status", d.status.as_str().into()),
                    ("reason", opt(&d.reason)),
                    ("image", d.image.clone()),
                    ("digest", opt(&d.image_digest)),
                    ("commit", opt(&d.commit_sha)),
                    ("message", opt(&d.commit_message)),
                    ("url", d.url.clone()),
                    ("created", d.created_at.to_rfc3339()),
                ])
            }
        }
    }
    Ok(())
}

fn scope_text(s: &TokenScope) -> String {
    match s {
        TokenScope::Admin => "admin".into(),
        TokenScope::Org { org, role } => format!("{org}:{}", role.as_str()),
        TokenScope::Cluster { role } => format!("cluster:{}", role.as_str()),
    }
}

async fn tokens(conn: Conn, cmd: TokenCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        TokenCmd::List { org } => {
            let ts: Vec<Token> = c.list_all(&format!("/api/v1/tokens{}", query(&[("org", org)]))).await?;
            if conn.json {
                json(&ts)
            } else {
                table(
                    &["id", "name", "scope", "read-only", "created", "expires"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.name.clone(),
                                scope_text(&t.scope),
                                t.read_only.to_string(),
                                ago(&t.created_at),
                                t.expires_at.map(|e| e.to_rfc3339()).unwrap_or_else(|| "never".into()),
                            ]
                        })
                        .collect(),
                )
            }
        }
        TokenCmd::Create { name, admin, cluster, org, role, read_only, expires_in_days } => {
            let scope = match (admin, cluster, org, role) {
                (true, None, None, _) => TokenScope::Admin,
                (false, Some(c), None, _) => {
                    TokenScope::Cluster { role: ClusterRole::parse(&c).context("unknown cluster role")? }
                }
                (false, None, Some(org), Some(role)) => TokenScope::Org { org, role: role.into() },
                _ => {
                    return Err(UsageError(
                        "choose one scope: --admin, --cluster ROLE, or --org ORG --role ROLE".into(),
                    )
                    .into())
                }
            };
            let t: CreatedToken =
                c.post("/api/v1/tokens", &CreateToken { name, scope, read_only, expires_in_days }).await?;
            if conn.json {
                json(&t)
            } else {
                println!(
                    "Created token {} ({}). Its secret is shown once:\n\n    {}\n",
                    t.token.id,
                    scope_text(&t.token.scope),
                    t.secret
                );
            }
        }
        TokenCmd::Delete { id } => {
            c.delete(&format!("/api/v1/tokens/{}", encode(&id))).await?;
            if !conn.json {
                println!("Revoked {id}.")
            }
        }
    }
    Ok(())
}

async fn events(conn: Conn, cmd: EventCmd) -> Result<()> {
    let c = conn.client()?;
    let (org, project, action, limit) = match cmd {
        EventCmd::List { org, project, action, limit } => (org, project, action, limit),
        EventCmd::Watch { org, project, deployment } => {
            let path = format!(
                "/api/v1/events/stream{}",
                query(&[("org", org), ("project", project), ("deployment", deployment)])
            );
            let res = c.stream(&path).await?;
            if !conn.json {
                eprintln!("following changes; Ctrl-C to stop");
            }
            return read_sse(res, |_, ch| {
                if conn.json {
                    println!("{}", serde_json::to_string(&ch).unwrap_or_default());
                } else {
                    let from = ch.previous.as_deref().map(|p| format!("{p} → ")).unwrap_or_default();
                    let reason = ch.reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default();
                    println!("{} {:<10} {:<28} {from}{}{reason}", ch.at.format("%H:%M:%S"), ch.kind, ch.id, ch.status);
                }
                true
            })
            .await;
        }
    };
    let path = format!(
        "/api/v1/events{}",
        query(&[("org", org), ("project", project), ("action", action), ("limit", Some(limit.to_string()))])
    );
    let es: Vec<Event> = c.list(&path).await?.items;
    if conn.json {
        json(&es)
    } else {
        table(
            &["when", "actor", "action", "target", "result"],
            es.iter()
                .map(|e| vec![ago(&e.at), e.actor.clone(), e.action.clone(), e.target.clone(), e.result.clone()])
                .collect(),
        )
    }
    Ok(())
}

/// Prints a deployment's logs as they come (text, or JSON lines with `--json`).
async fn logs(a: LogsArgs) -> Result<()> {
    use futures::StreamExt;
    use std::io::Write;
    let c = a.conn.client()?;
    let id = if a.target.contains('/') {
        let env = a.environment.map(Environment::from).unwrap_or(Environment::Production);
        let d: Deployment = c
            .get(&format!(
                "{}/deployments/current{}",
                project_path(&a.target)?,
                query(&[("environment", Some(env.as_str().to_owned()))])
            ))
            .await?;
        d.id
    } else {
        a.target.clone()
    };
    if a.build {
        return crate::build::print_log(&c, &id, a.follow, "").await;
    }
    let path = format!(
        "/api/v1/deployments/{}/logs{}",
        encode(&id),
        query(&[
            ("follow", Some(a.follow.to_string())),
            ("since", a.since.clone()),
            ("format", Some(if a.conn.json { "json" } else { "text" }.to_owned())),
        ])
    );
    let res = c.stream(&path).await?;
    let mut body = res.bytes_stream();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the log stream broke off")?;
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// Uploads an image archive to the operator; returns the reference to deploy.
async fn upload_archive(c: &Client, org: &str, name: &str, file: &std::path::Path, quiet: bool) -> Result<String> {
    let bytes = tokio::fs::read(file)
        .await
        .map_err(|e| UsageError(format!("cannot read the archive {}: {e}", file.display())))?;
    if !quiet {
        println!("Uploading {} ({:.1} MB)…", file.display(), bytes.len() as f64 / 1e6);
    }
    let path = format!("/api/v1/orgs/{}/images?name={}", encode(org), encode(name));
    let up: UploadedImage = c.upload(&path, "application/x-tar", bytes.into()).await?;
    if !quiet {
        let note = if up.existing { ", already stored" } else { "" };
        println!("  stored {} ({} layers, {:.1} MB{note})", up.image, up.layers, up.size as f64 / 1e6);
    }
    Ok(up.image)
}

/// Creates a deployment and prints each step until it is active or failed.
async fn deploy(a: DeployArgs) -> Result<()> {
    let c = a.conn.client()?;
    let (org, project) = split_project(&a.project)?;
    let mut build = None;
    let image = match (&a.image, &a.archive, &a.source) {
        (Some(i), _, _) => i.clone(),
        (None, Some(file), _) => upload_archive(&c, &org, &project, file, a.conn.json).await?,
        (None, None, Some(dir)) => {
            let mut b = crate::build::upload(&c, &org, dir, a.dockerfile.as_deref(), a.conn.json).await?;
            b.target = a.target.clone();
            b.args = crate::build::build_args(&a.build_args)?;
            b.secrets = crate::build::build_secrets(&a.build_secrets)?;
            build = Some(b);
            String::new()
        }
        (None, None, None) => return Err(UsageError("give --image REF, --archive FILE or --source DIR".into()).into()),
    };
    let body = CreateDeployment {
        org,
        project,
        build,
        image: image.clone(),
        commit_sha: a.commit_sha,
        commit_message: a.commit_message,
        instances_per_region: a.instances_per_region,
        environment: a.environment.map(Into::into),
    };
    let d: Deployment = c.post("/api/v1/deployments", &body).await?;
    if !a.conn.json && d.status == DeploymentStatus::Building {
        println!("Building {} from source", d.id);
        crate::build::print_log(&c, &d.id, true, "  │ ").await?;
    } else if !a.conn.json {
        println!("Deploying {image} as {}", d.id);
    }
    let started = std::time::Instant::now();
    let mut last = String::new();
    // Wake on every change of this deployment (event stream); poll as a fallback.
    let (wake_tx, mut wake) = tokio::sync::mpsc::channel::<()>(16);
    let follower = {
        let (c, org, id) = (c.clone(), d.org.clone(), d.id.clone());
        tokio::spawn(async move {
            let path = format!("/api/v1/events/stream?org={}&deployment={}", encode(&org), encode(&id));
            if let Ok(res) = c.stream(&path).await {
                let _ = read_sse(res, |_, _| wake_tx.try_send(()).is_ok() || !wake_tx.is_closed()).await;
            }
        })
    };
    let _stop_following = AbortOnDrop(follower);
    loop {
        let d: Deployment = c.get(&format!("/api/v1/deployments/{}", encode(&d.id))).await?;
        let instances: Vec<Instance> =
            c.get(&format!("/api/v1/deployments/{}/instances", encode(&d.id))).await.unwrap_or_default();
        let ready = instances.iter().filter(|i| i.status == InstanceStatus::Ready).count();
        let line = match d.status {
            DeploymentStatus::Pending => match &d.reason {
                Some(why) => format!("  pending, {why}"),
                None => "  placing instances…".to_owned(),
            },
            DeploymentStatus::Starting | DeploymentStatus::Preparing => {
                let mut by_region: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
                for i in &instances {
                    let e = by_region.entry(i.region.as_str()).or_default();
                    e.1 += 1;
                    if i.status == InstanceStatus::Ready {
                        e.0 += 1;
                    }
                }
                let regions: Vec<String> = by_region.iter().map(|(r, (ok, all))| format!("{r} {ok}/{all}")).collect();
                format!("  starting: {ready}/{} instances ready ({})", instances.len(), regions.join(", "))
            }
            _ => String::new(),
        };
        if !a.conn.json && !line.is_empty() && line != last {
            println!("{line}");
            last = line;
        }
        match d.status {
            DeploymentStatus::Active | DeploymentStatus::Ready => {
                if a.conn.json {
                    json(&d);
                } else {
                    println!("Live: {} is active. {}", d.id, d.url);
                }
                return Ok(());
            }
            DeploymentStatus::Failed => {
                if a.conn.json {
                    json(&d);
                }
                anyhow::bail!(
                    "deployment {} failed: {}",
                    d.id,
                    d.reason.unwrap_or_else(|| "no reason recorded".into())
                );
            }
            _ => {}
        }
        if started.elapsed().as_secs() > a.timeout {
            anyhow::bail!(
                "stopped following {} after {} s; it is {} (see `zeitwork deployments show {}`)",
                d.id,
                a.timeout,
                d.status.as_str(),
                d.id
            );
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wake.recv()).await;
        while wake.try_recv().is_ok() {}
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
