//! The operators' verbs: analytics of deployments and resources, and backup
//! and restore of a single-machine platform.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::cli::{query, Conn};
use crate::output::{json, table};

/// The window and scope of an analytics question.
#[derive(Debug, Args)]
pub struct Window {
    /// Start: RFC 3339 or a date (default: 30 days ago).
    #[arg(long)]
    from: Option<String>,
    /// End: RFC 3339 or a date (default: now).
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    org: Option<String>,
    #[arg(long)]
    project: Option<String>,
}

impl Window {
    fn query(&self, extra: &[(&str, Option<String>)]) -> String {
        let mut pairs = vec![
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("org", self.org.clone()),
            ("project", self.project.clone()),
        ];
        pairs.extend(extra.iter().cloned());
        query(&pairs)
    }
}

#[derive(Debug, Subcommand)]
pub enum AnalyticsCmd {
    /// Deployments per project per day (or `--week`).
    Frequency {
        #[command(flatten)]
        window: Window,
        #[arg(long)]
        week: bool,
    },
    /// Time from creation to live: p50, p95, mean.
    Duration {
        #[command(flatten)]
        window: Window,
    },
    /// Per project: succeeded, failed, in progress.
    SuccessRate {
        #[command(flatten)]
        window: Window,
    },
    /// What each org's live instances hold, and what its instances used.
    Resources {
        #[arg(long)]
        org: Option<String>,
    },
}

/// `org/project` of an analytics row.
fn project_of(r: &Value) -> String {
    format!("{}/{}", r["org"].as_str().unwrap_or(""), r["project"].as_str().unwrap_or(""))
}

/// Seconds with one decimal, or `-`.
fn secs(v: &Value) -> String {
    v.as_f64().map(|f| format!("{f:.1}")).unwrap_or_else(|| "-".into())
}

/// One table row per element of the array `v[key]`.
fn rows(v: &Value, key: &str, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v[key].as_array().into_iter().flatten().map(row).collect()
}

pub async fn analytics(conn: Conn, cmd: AnalyticsCmd) -> Result<()> {
    let c = conn.client()?;
    let path = match &cmd {
        AnalyticsCmd::Frequency { window, week } => {
            let interval = if *week { "week" } else { "day" };
            format!("/api/v1/analytics/deployments/frequency{}", window.query(&[("interval", Some(interval.into()))]))
        }
        AnalyticsCmd::Duration { window } => format!("/api/v1/analytics/deployments/duration{}", window.query(&[])),
        AnalyticsCmd::SuccessRate { window } => {
            format!("/api/v1/analytics/deployments/success-rate{}", window.query(&[]))
        }
        AnalyticsCmd::Resources { org } => {
            format!("/api/v1/analytics/resources/by-org{}", query(&[("org", org.clone())]))
        }
    };
    let v: Value = c.get(&path).await?;
    if conn.json {
        json(&v);
        return Ok(());
    }
    match cmd {
        AnalyticsCmd::Frequency { .. } => table(
            &["project", "period", "deployments"],
            rows(&v, "series", |r| {
                vec![project_of(r), r["period"].as_str().unwrap_or("").to_owned(), r["deployments"].to_string()]
            }),
        ),
        AnalyticsCmd::Duration { .. } => {
            let all = &v["create_to_active"];
            println!(
                "create to active: {} live, p50 {} s, p95 {} s, mean {} s",
                all["count"],
                secs(&all["p50_secs"]),
                secs(&all["p95_secs"]),
                secs(&all["mean_secs"])
            );
            table(
                &["phase", "count", "p50 s", "p95 s", "mean s"],
                ["build", "placement", "pull_and_start", "boot_to_ready", "ready_to_active"]
                    .iter()
                    .map(|name| {
                        let p = &v["phases"][*name];
                        vec![
                            name.replace('_', " "),
                            p["count"].to_string(),
                            secs(&p["p50_secs"]),
                            secs(&p["p95_secs"]),
                            secs(&p["mean_secs"]),
                        ]
                    })
                    .collect(),
            );
            println!();
            table(
                &["project", "live", "p50 s", "p95 s"],
                rows(&v, "by_project", |r| {
                    vec![project_of(r), r["count"].to_string(), secs(&r["p50_secs"]), secs(&r["p95_secs"])]
                }),
            )
        }
        AnalyticsCmd::SuccessRate { .. } => table(
            &["project", "succeeded", "failed", "in progress", "rate"],
            rows(&v, "projects", |r| {
                let rate = r["success_rate"].as_f64().map(|f| format!("{:.0} %", f * 100.0));
                vec![
                    project_of(r),
                    r["succeeded"].to_string(),
                    r["failed"].to_string(),
                    r["in_progress"].to_string(),
                    rate.unwrap_or_else(|| "-".into()),
                ]
            }),
        ),
        AnalyticsCmd::Resources { .. } => table(
            &["org", "instances", "vcpu", "memory", "cpu used", "memory used", "instance hours"],
            rows(&v, "orgs", |r| {
                let used_mib = r["memory_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
                vec![
                    r["org"].as_str().unwrap_or("").to_owned(),
                    r["instances"].to_string(),
                    r["vcpu"].to_string(),
                    format!("{} MiB", r["memory_mib"]),
                    format!("{} s", secs(&r["cpu_seconds"])),
                    format!("{used_mib:.1} MiB"),
                    r["instance_hours"].as_f64().map_or_else(|| "-".into(), |h| format!("{h:.2}")),
                ]
            }),
        ),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The operator's data directory (default: the one `zeitwork up` uses).
    #[arg(long, env = "ZEITWORK_DATA")]
    data: Option<PathBuf>,
    /// The file to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file.
    file: PathBuf,
    /// The operator's data directory (default: the one `zeitwork up` uses); its secret.key decrypts the backup.
    #[arg(long, env = "ZEITWORK_DATA")]
    data: Option<PathBuf>,
    /// Set an existing state aside (renamed, not deleted) instead of refusing.
    #[arg(long)]
    force: bool,
}

pub async fn backup(a: BackupArgs) -> Result<()> {
    let data = a.data.unwrap_or_else(crate::roles::default_data_dir);
    let info = zeitwork_control_plane::backup::backup(&data, &a.out).await?;
    println!(
        "Wrote {} (schema {}, {} projects, {} deployments). It holds env values encrypted: keep {} safe, apart from it.",
        a.out.display(),
        info.schema_version,
        info.projects,
        info.deployments,
        data.join("secret.key").display()
    );
    Ok(())
}

pub async fn restore(a: RestoreArgs) -> Result<()> {
    let data = a.data.unwrap_or_else(crate::roles::default_data_dir);
    let info = zeitwork_control_plane::backup::restore(&a.file, &data, None, a.force).await?;
    println!(
        "Restored {} into {} (schema {}, {} projects, {} deployments). Start the operator to serve it.",
        a.file.display(),
        data.display(),
        info.schema_version,
        info.projects,
        info.deployments
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum NotificationsCmd {
    /// The outbox, the dead-letter queue and the event streams in figures (platform admins).
    Stats,
    /// The dead-letter queue: notifications that kept failing (platform admins).
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead letters, oldest first.
    List,
    /// Queue one dead letter again, or all with --all.
    Retry {
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Drop a dead letter for good.
    Drop { id: i64 },
}

pub async fn notifications(conn: Conn, cmd: NotificationsCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        NotificationsCmd::Stats => {
            let outbox: Value = c.get("/api/admin/outbox/stats").await?;
            let dlq: Value = c.get("/api/admin/dlq/stats").await?;
            let sse: Value = c.get("/api/admin/sse/stats").await?;
            if conn.json {
                json(&serde_json::json!({"outbox": outbox, "dlq": dlq, "sse": sse}));
                return Ok(());
            }
            let n = n_or;
            table(
                &["queue", "pending", "in flight", "delivered", "dead", "failed attempts", "oldest pending"],
                vec![vec![
                    "outbox".into(),
                    n(&outbox["pending"]),
                    n(&outbox["in_flight"]),
                    n(&outbox["delivered"]),
                    n(&outbox["dead"]),
                    n(&outbox["failed_attempts"]),
                    outbox["oldest_pending_secs"].as_i64().map_or("-".into(), |s| format!("{s} s")),
                ]],
            );
            println!();
            table(
                &["event streams", "open", "events sent", "dropped"],
                vec![vec!["all".into(), n(&sse["connections"]), n(&sse["events_sent"]), n(&sse["events_dropped"])]],
            );
        }
        NotificationsCmd::Dlq { cmd: DlqCmd::List } => {
            let dead: Value = c.get("/api/admin/dlq").await?;
            if conn.json {
                json(&dead);
                return Ok(());
            }
            let rows = dead
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    vec![
                        n_or(&d["id"]),
                        d["channel"].as_str().unwrap_or("").to_owned(),
                        d["event"].as_str().unwrap_or("").to_owned(),
                        n_or(&d["attempts"]),
                        d["error"].as_str().unwrap_or("").chars().take(60).collect(),
                    ]
                })
                .collect();
            table(&["id", "destination", "event", "attempts", "last error"], rows);
        }
        NotificationsCmd::Dlq { cmd: DlqCmd::Retry { id, all } } => {
            let done: Value = match (id, all) {
                (Some(id), _) => c.post_empty(&format!("/api/admin/dlq/{id}/retry")).await?,
                (None, true) => c.post_empty("/api/admin/dlq/retry").await?,
                (None, false) => {
                    return Err(crate::roles::UsageError("give a dead letter's id, or --all".into()).into())
                }
            };
            if conn.json {
                json(&done)
            } else {
                println!("Queued {} notification(s) again.", n_or(&done["retried"]));
            }
        }
        NotificationsCmd::Dlq { cmd: DlqCmd::Drop { id } } => {
            c.delete(&format!("/api/admin/dlq/{id}")).await?;
            if !conn.json {
                println!("Dropped dead letter {id}.");
            }
        }
    }
    Ok(())
}

fn n_or(v: &Value) -> String {
    v.as_i64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}
