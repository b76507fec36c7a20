//! Verbs that shape a project: `projects`, `env` and `domains`.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::{Args, Subcommand};
use zeitwork_api_types::*;
use zeitwork_client::encode;

use super::deploy::instance_rows;
use super::{project_path, query, split_project, Conn, EnvArg};
use crate::output::{ago, json, opt, table};
use crate::roles::UsageError;

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
    /// Autoscaling: add instances above this many requests in flight per instance (1-1000).
    #[arg(long)]
    target_concurrency: Option<u32>,
    /// Back to the fixed instances_per_region (update only).
    #[arg(long, conflicts_with_all = ["min_per_region", "max_per_region", "target_cpu_percent", "target_memory_percent", "target_concurrency"])]
    no_scaling: bool,
    /// Run this (`/bin/sh -c`) once in each new deployment's image before traffic moves to it;
    /// `""` removes it (update only).
    #[arg(long, value_name = "COMMAND")]
    release_command: Option<String>,
    /// Skew protection: pin browsers to the deployment that served them (update only).
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    skew_protection: Option<bool>,
    /// How long a browser stays pinned, 60-2592000 s (turns skew protection on; update only).
    #[arg(long)]
    skew_max_age_secs: Option<u32>,
    /// Automatic rollback on regression, as JSON; fields left out keep their defaults, e.g.
    /// '{"enabled": true, "error_rate": 0.05, "latency_factor": 2, "window_secs": 30, "min_requests": 50, "watch_secs": 600}'.
    #[arg(long, value_name = "JSON")]
    auto_rollback: Option<String>,
    /// Canary rollouts: percentages of the environment's traffic per step, ending at 100 (e.g. 1,10,50,100).
    #[arg(long, value_delimiter = ',')]
    rollout_steps: Option<Vec<u32>>,
    /// Canary rollouts: seconds per step (default 60).
    #[arg(long)]
    rollout_step_secs: Option<u32>,
    /// Switch all traffic at once again, without canary steps (update only).
    #[arg(long, conflicts_with_all = ["rollout_steps", "rollout_step_secs"])]
    no_rollout: bool,
    /// Shadow traffic: before the switch, copy this percent of the environment's
    /// requests to each new deployment and block it if it regresses (1-100).
    #[arg(long)]
    shadow_share: Option<u32>,
    /// Seconds of shadow traffic before the switch (with --shadow-share; default 300).
    #[arg(long, requires = "shadow_share")]
    shadow_secs: Option<u32>,
    /// Copy every method, not only GET, HEAD and OPTIONS (writes then happen twice).
    #[arg(long, requires = "shadow_share")]
    shadow_all_methods: bool,
    /// No shadow stage any more (update only).
    #[arg(long, conflicts_with_all = ["shadow_share", "shadow_secs", "shadow_all_methods"])]
    no_shadow: bool,
    /// Egress allow-list (update only): the only destinations outside the project's private
    /// network its instances reach, IPv4 addresses, CIDR blocks or host names with an
    /// optional port (e.g. 203.0.113.0/24,198.51.100.7:443,api.example.com:443).
    #[arg(long, value_delimiter = ',', value_name = "CIDR|HOST[:PORT]")]
    egress_allow: Option<Vec<String>>,
    /// Lift the egress allow-list: instances reach the internet again (update only).
    #[arg(long, conflicts_with = "egress_allow")]
    no_egress_allow: bool,
}

/// The `shadow` the flags ask for: `None` when they say nothing.
fn shadow_from(s: &ProjectSettings) -> Option<zeitwork_api_types::Shadow> {
    s.shadow_share.map(|share| zeitwork_api_types::Shadow {
        share,
        secs: s.shadow_secs.unwrap_or(super::deploy::DEFAULT_SHADOW_SECS),
        all_methods: s.shadow_all_methods,
    })
}

/// The `auto_rollback` the flags ask for.
fn auto_rollback_from(s: &ProjectSettings) -> Result<Option<zeitwork_api_types::AutoRollback>> {
    match &s.auto_rollback {
        None => Ok(None),
        Some(j) => serde_json::from_str(j).map(Some).map_err(|e| {
            UsageError(format!("--auto-rollback: {e}; give a JSON object such as '{{\"enabled\": false}}'")).into()
        }),
    }
}

/// The `rollout` the flags ask for: `None` when they say nothing.
fn rollout_from(s: &ProjectSettings) -> Result<Option<zeitwork_api_types::Rollout>> {
    match (&s.rollout_steps, s.rollout_step_secs) {
        (None, None) => Ok(None),
        (Some(steps), secs) => {
            Ok(Some(zeitwork_api_types::Rollout { steps: steps.clone(), step_secs: secs.unwrap_or(60) }))
        }
        (None, Some(_)) => {
            Err(UsageError("--rollout-step-secs needs --rollout-steps (e.g. 1,10,50,100)".into()).into())
        }
    }
}

/// The `scaling` the flags ask for: `None` when they say nothing.
fn scaling_from(s: &ProjectSettings) -> Result<Option<zeitwork_api_types::Scaling>> {
    let any = s.min_per_region.is_some()
        || s.max_per_region.is_some()
        || s.target_cpu_percent.is_some()
        || s.target_memory_percent.is_some()
        || s.target_concurrency.is_some();
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
        target_concurrency: s.target_concurrency,
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
    /// Check the domain's TXT ownership record and where it points; once both
    /// are right it is routed and gets a certificate.
    Verify {
        project: String,
        name: String,
    },
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

pub(super) async fn projects(conn: Conn, cmd: ProjectCmd) -> Result<()> {
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
            let (auto_rollback, rollout) = (auto_rollback_from(&settings)?, rollout_from(&settings)?);
            let shadow = shadow_from(&settings);
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
                auto_rollback,
                rollout,
                shadow,
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
            let auto_rollback = auto_rollback_from(&settings)?;
            let rollout = if settings.no_rollout { Some(None) } else { rollout_from(&settings)?.map(Some) };
            let shadow = if settings.no_shadow { Some(None) } else { shadow_from(&settings).map(Some) };
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
                skew_protection: match (settings.skew_protection, settings.skew_max_age_secs) {
                    (Some(false), _) => Some(None),
                    (Some(true), max) | (None, max @ Some(_)) => Some(Some(zeitwork_api_types::SkewProtection {
                        enabled: true,
                        max_age_secs: max.unwrap_or(zeitwork_api_types::DEFAULT_SKEW_MAX_AGE_SECS),
                    })),
                    (None, None) => None,
                },
                release_command: settings.release_command.map(|c| Some(c).filter(|c| !c.is_empty())),
                auto_rollback,
                rollout,
                shadow,
                egress: if settings.no_egress_allow {
                    Some(None)
                } else {
                    settings.egress_allow.map(|allow| Some(zeitwork_api_types::Egress { allow }))
                },
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

pub(super) async fn env(conn: Conn, cmd: EnvCmd) -> Result<()> {
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

pub(super) async fn domains(conn: Conn, cmd: DomainCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        DomainCmd::List { project } => {
            let ds: Vec<Domain> = c.get(&format!("{}/domains", project_path(&project)?)).await?;
            if conn.json {
                json(&ds)
            } else {
                table(
                    &["domain", "environment", "status", "certificate"],
                    ds.iter()
                        .map(|d| {
                            vec![
                                d.name.clone(),
                                d.environment.as_str().into(),
                                if d.verified { "verified" } else { "unverified" }.into(),
                                d.certificate.clone(),
                            ]
                        })
                        .collect(),
                );
                for d in ds.iter().filter(|d| !d.verified) {
                    if let Some(m) = &d.message {
                        println!("{}: {m}", d.name);
                    }
                }
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
                println!("Added {} to {}/{} ({}).", d.name, d.org, d.project, d.environment.as_str());
                if let (Some(record), Some(value)) = (&d.txt_record, &d.txt_value) {
                    println!("Prove you own it with a TXT record:  {record}  TXT  \"{value}\"");
                }
                println!(
                    "Point it at the platform (CNAME {}-{}.<apps domain>), then: zeitwork domains verify {}/{} {}",
                    d.project, d.org, d.org, d.project, d.name
                );
            }
        }
        DomainCmd::Verify { project, name } => {
            let d: Domain = c
                .post(&format!("{}/domains/{}/verify", project_path(&project)?, encode(&name)), &serde_json::json!({}))
                .await?;
            if conn.json {
                json(&d)
            } else {
                println!("{} is verified: it is routed and gets a certificate.", d.name)
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
