//! Verbs that ship and watch code: `deploy`, `deployments`, `logs` and `status`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use zeitwork_api_types::*;
use zeitwork_client::{encode, Client};

use super::admin::node_rows;
use super::{project_path, query, read_sse, split_project, Conn, EnvArg};
use crate::output::{ago, fields, json, opt, table};
use crate::roles::UsageError;

/// Seconds of shadow traffic when a flag asks for it without saying how long.
pub(crate) const DEFAULT_SHADOW_SECS: u32 = 300;
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
    /// Run this (`/bin/sh -c`) once in the new image before traffic moves to it
    /// (overrides the project's release_command; `""`: none).
    #[arg(long, value_name = "COMMAND")]
    release_command: Option<String>,
    /// This deployment migrates data: rolling back past it will need --force.
    #[arg(long)]
    migration: bool,
    /// Give up following after this many seconds (the deployment goes on).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Canary steps for this deployment in percent, e.g. 1,10,50,100 (default: the project's `rollout`).
    #[arg(long, value_delimiter = ',')]
    rollout_steps: Option<Vec<u32>>,
    /// Seconds per canary step (with --rollout-steps; default 60).
    #[arg(long, requires = "rollout_steps")]
    rollout_step_secs: Option<u32>,
    /// Shadow traffic for this deployment: copy this percent of its environment's
    /// requests to it before the switch (1-100; default: the project's `shadow`).
    #[arg(long)]
    shadow_share: Option<u32>,
    /// Seconds of shadow traffic before the switch (with --shadow-share; default 300).
    #[arg(long, requires = "shadow_share")]
    shadow_secs: Option<u32>,
    /// Copy every method, not only GET, HEAD and OPTIONS (writes then happen twice).
    #[arg(long, requires = "shadow_share")]
    shadow_all_methods: bool,
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
pub(super) async fn status(conn: Conn) -> Result<()> {
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
        for n in nodes.iter().filter(|n| n.status == zeitwork_api_types::NodeStatus::PendingApproval) {
            println!("  {} waits for approval: zeitwork nodes approve {} (or reject)", n.hostname, n.id);
        }
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

pub(super) fn instance_rows(is: &[Instance]) {
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

pub(super) async fn deployments(conn: Conn, cmd: DeploymentCmd) -> Result<()> {
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
                release_command: None,
                migration: false,
                rollout: None,
                shadow: None,
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

/// Prints a deployment's logs as they come (text, or JSON lines with `--json`).
pub(super) async fn logs(a: LogsArgs) -> Result<()> {
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
pub(super) async fn deploy(a: DeployArgs) -> Result<()> {
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
        release_command: a.release_command.clone(),
        migration: a.migration,
        rollout: a.rollout_steps.map(|steps| Rollout { steps, step_secs: a.rollout_step_secs.unwrap_or(60) }),
        shadow: a.shadow_share.map(|share| zeitwork_api_types::Shadow {
            share,
            secs: a.shadow_secs.unwrap_or(DEFAULT_SHADOW_SECS),
            all_methods: a.shadow_all_methods,
        }),
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
            DeploymentStatus::Ready => {
                let r: Option<RolloutStatus> =
                    c.get(&format!("/api/v1/deployments/{}/rollout", encode(&d.id))).await.ok();
                match r.filter(|r| r.state == RolloutState::Canary) {
                    Some(r) => canary_line(&r),
                    None => "  ready, switching…".to_owned(),
                }
            }
            _ => String::new(),
        };
        if !a.conn.json && !line.is_empty() && line != last {
            println!("{line}");
            last = line;
        }
        match d.status {
            DeploymentStatus::Active => {
                if a.conn.json {
                    json(&d);
                } else {
                    println!("Live: {} is active. {}", d.id, d.url);
                    let r: Option<RolloutStatus> =
                        c.get(&format!("/api/v1/deployments/{}/rollout", encode(&d.id))).await.ok();
                    if let Some(until) = r.and_then(|r| r.watch_until.filter(|_| r.state == RolloutState::Watching)) {
                        println!(
                            "  watched for regressions until {} (rolled back automatically if it does worse than before)",
                            until.format("%H:%M:%S UTC")
                        );
                    }
                }
                return Ok(());
            }
            DeploymentStatus::RolledBack => {
                if a.conn.json {
                    json(&d);
                }
                anyhow::bail!(
                    "deployment {} was rolled back: {}",
                    d.id,
                    d.reason.unwrap_or_else(|| "no reason recorded".into())
                );
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

/// One line on a canary step and what its analysis saw.
fn canary_line(r: &RolloutStatus) -> String {
    let mut line = format!(
        "  canary: {} % of {} (step {} of {}, {} s each)",
        r.weight,
        r.environment.as_str(),
        r.step + 1,
        r.steps.len(),
        r.step_secs
    );
    if let Some(a) = &r.analysis {
        line.push_str(&format!(", {} requests, {} failed", a.requests, a.errors));
        if let Some(p) = a.p95_ms {
            line.push_str(&format!(", p95 {p:.0} ms"));
        }
    }
    line
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(analysis: serde_json::Value) -> RolloutStatus {
        serde_json::from_value(serde_json::json!({
            "deployment": "web-abc1234-acme", "environment": "production", "baseline": "web-old5678-acme",
            "state": "canary", "steps": [1, 10, 50, 100], "step_secs": 60, "step": 1, "weight": 10,
            "started_at": "2026-12-02T00:00:00Z", "step_started_at": "2026-12-02T00:01:00Z",
            "activated_at": null, "watch_until": null, "reason": null, "analysis": analysis,
        }))
        .unwrap()
    }

    /// What `deploy` prints while a canary runs: the step, its share and what the analysis saw.
    #[test]
    fn a_canary_step_reads_as_one_line() {
        assert_eq!(
            canary_line(&rollout(serde_json::Value::Null)),
            "  canary: 10 % of production (step 2 of 4, 60 s each)"
        );
        let seen = rollout(serde_json::json!({
            "requests": 240, "errors": 3, "p95_ms": 41.7, "baseline_requests": 2000, "baseline_errors": 10,
            "baseline_p95_ms": 39.0, "verdict": "healthy",
        }));
        assert_eq!(
            canary_line(&seen),
            "  canary: 10 % of production (step 2 of 4, 60 s each), 240 requests, 3 failed, p95 42 ms"
        );
    }
}
