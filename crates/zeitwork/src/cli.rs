//! The CLI for people: one verb per resource, human tables by default and
//! `--json` for scripts.

mod admin;
mod deploy;
mod projects;
mod sse;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use zeitwork_api_types::*;
use zeitwork_client::{encode, Client};

use crate::output::json;
use crate::roles::{default_data_dir, UsageError};

use admin::{events, nodes, orgs, regions, tokens, EventCmd, NodeCmd, OrgCmd, RegionCmd, TokenCmd};
use deploy::{deploy, deployments, logs, status, DeployArgs, DeploymentCmd, LogsArgs};
use projects::{domains, env, projects, DomainCmd, EnvCmd, ProjectCmd};

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
    /// A deployment's canary rollout: show it, promote it to 100 % now, or abort it.
    Rollout(With<RolloutCmd>),
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
    /// Roll back even past a deployment that migrated data.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
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
    /// Promote even when that goes back past a deployment that migrated data.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// The steps, the current share and the last analysis.
    Show { deployment: String },
    /// Move the canary to 100 % now (the watch for regressions still follows).
    Promote { deployment: String },
    /// Send the traffic back to the deployment serving before; the deployment is marked rolled_back.
    Abort { deployment: String },
}

async fn rollout(conn: Conn, cmd: RolloutCmd) -> Result<()> {
    let c = conn.client()?;
    let (id, action) = match &cmd {
        RolloutCmd::Show { deployment } => (deployment, None),
        RolloutCmd::Promote { deployment } => (deployment, Some("promote")),
        RolloutCmd::Abort { deployment } => (deployment, Some("abort")),
    };
    let path = format!("/api/v1/deployments/{}/rollout", encode(id));
    let r: RolloutStatus = match action {
        None => c.get(&path).await?,
        Some(a) => c.post(&format!("{path}/{a}"), &serde_json::json!({})).await?,
    };
    if conn.json {
        json(&r);
        return Ok(());
    }
    let steps: Vec<String> = r.steps.iter().map(|s| format!("{s} %")).collect();
    println!("{} in {}: {} at {} %", r.deployment, r.environment.as_str(), r.state.as_str(), r.weight);
    if !steps.is_empty() {
        println!("  steps: {} ({} s each), now step {}", steps.join(" → "), r.step_secs, r.step + 1);
    }
    if let Some(b) = &r.baseline {
        println!("  previous deployment: {b}");
    }
    if let Some(a) = &r.analysis {
        let p95 = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.0} ms"));
        println!(
            "  last analysis: {} — {} requests, {} 5xx, p95 {} (previous: {} requests, {} 5xx, p95 {})",
            a.verdict,
            a.requests,
            a.errors,
            p95(a.p95_ms),
            a.baseline_requests,
            a.baseline_errors,
            p95(a.baseline_p95_ms)
        );
    }
    if let Some(s) = &r.served {
        println!("  served since the rollout began: {} requests, {} with a 5xx status", s.requests, s.errors);
    }
    if let Some(why) = &r.reason {
        println!("  {why}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct With<C: Subcommand> {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: C,
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

/// Reads Server-Sent Events from a response and hands each change (an
/// event's data as JSON) to `each`, with the event's name; returns when the
/// stream ends or `each` says stop. Other events (such as `lagged`) are
/// shown on stderr.
async fn read_sse(res: reqwest::Response, mut each: impl FnMut(&str, Change) -> bool) -> Result<()> {
    use futures::StreamExt;
    let mut body = res.bytes_stream();
    let mut parser = sse::SseParser::default();
    let mut events = Vec::new();
    while let Some(chunk) = body.next().await {
        parser.feed(&chunk.context("the event stream broke off")?, &mut events);
        for e in events.drain(..) {
            match serde_json::from_str::<Change>(&e.data) {
                Ok(change) => {
                    if !each(&e.name, change) {
                        return Ok(());
                    }
                }
                Err(_) => eprintln!("event stream: {}: {}", e.name, e.data),
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
            let body =
                serde_json::json!({"to": a.to, "environment": a.environment.map(Environment::from), "force": a.force});
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
            let body =
                serde_json::json!({"from": Environment::from(a.from), "to": Environment::from(a.to), "force": a.force});
            let d: Deployment = c.post(&format!("{}/promote", project_path(&a.project)?), &body).await?;
            if a.conn.json {
                json(&d)
            } else {
                println!("{} {} now serves {}.", a.project, Environment::from(a.to).as_str(), d.id);
            }
            Ok(())
        }
        Verb::Rollout(w) => rollout(w.conn, w.cmd).await,
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
