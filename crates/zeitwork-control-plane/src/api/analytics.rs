//! Analytics at the operations guide's paths: how often projects deploy, how
//! long a deployment takes to go live, how often it succeeds, and what each
//! org holds. Platform admins see every org; an org's token its own.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use zeitwork_api_types::{OrgResources, ResourcesByOrg, Role, TokenScope, ValidationError};
use zeitwork_store::DeploymentFacts;

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryParams;
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start: RFC 3339 or a date (`2026-11-01`); default 30 days before `to`.
    from: Option<String>,
    /// End (exclusive): RFC 3339 or a date; default now.
    to: Option<String>,
    /// Only this org (an org token's own org by default).
    org: Option<String>,
    /// Only this project (with `org`).
    project: Option<String>,
    /// `day` (default) or `week` buckets (frequency).
    interval: Option<String>,
}

pub(crate) fn time(field: &str, s: &str) -> Result<DateTime<Utc>, ValidationError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc()).ok_or_else(
        || ValidationError::new(field, format!("{s:?} is not RFC 3339 (2026-11-01T00:00:00Z) or a date (2026-11-01)")),
    )
}

/// The window and the org scope the caller may read.
struct Scope {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    org: Option<String>,
    project: Option<String>,
}

async fn scope(s: &AppState, caller: &Caller, w: &Window) -> ApiResult<Scope> {
    let to = match &w.to {
        Some(t) => time("to", t)?,
        None => Utc::now(),
    };
    let from = match &w.from {
        Some(f) => time("from", f)?,
        None => to - Duration::days(30),
    };
    if from >= to {
        return Err(ValidationError::new("from", "must be before `to`").into());
    }
    if to - from > Duration::days(366) {
        return Err(ValidationError::new("from", "the window is longer than a year; narrow it").into());
    }
    if w.project.is_some() && w.org.is_none() && caller.is_admin() {
        return Err(ValidationError::new("org", "name the org of `project`").into());
    }
    let org = match (&caller.scope, &w.org) {
        (TokenScope::Admin, o) => o.clone(),
        (TokenScope::Org { org, .. }, None) => Some(org.clone()),
        (_, Some(o)) => Some(o.clone()),
        (TokenScope::Cluster { .. }, None) => None,
    };
    match &org {
        Some(o) => {
            s.require_role(caller, o, Role::Guest, "analytics.read", o).await?;
        }
        None => s.require_admin(caller, "analytics.read", "all orgs").await?,
    }
    Ok(Scope { from, to, org, project: w.project.clone() })
}

async fn facts(s: &AppState, sc: &Scope) -> ApiResult<Vec<DeploymentFacts>> {
    Ok(s.store
        .deployment_facts(
            sc.from.timestamp_millis(),
            sc.to.timestamp_millis(),
            sc.org.as_deref(),
            sc.project.as_deref(),
        )
        .await?)
}

/// Deployments per org and project per day or week.
#[utoipa::path(get, path = "/api/v1/analytics/deployments/frequency", tag = "analytics", params(Window),
    responses((status = 200, description = "counts per period"), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn frequency(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(w): QueryParams<Window>,
) -> ApiResult<Json<serde_json::Value>> {
    let week = match w.interval.as_deref() {
        None | Some("day") => false,
        Some("week") => true,
        Some(other) => {
            return Err(ValidationError::new("interval", format!("{other:?} is not day or week")).into());
        }
    };
    let sc = scope(&s, &caller, &w).await?;
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let all = facts(&s, &sc).await?;
    for d in &all {
        let at = DateTime::from_timestamp_millis(d.created_at).unwrap_or_default().date_naive();
        let period = if week {
            use chrono::Datelike;
            let monday = at - Duration::days(i64::from(at.weekday().num_days_from_monday()));
            monday.to_string()
        } else {
            at.to_string()
        };
        *counts.entry((d.org.clone(), d.project.clone(), period)).or_default() += 1;
    }
    let rows: Vec<serde_json::Value> = counts
        .into_iter()
        .map(|((org, project, period), n)| serde_json::json!({"org": org, "project": project, "period": period, "deployments": n}))
        .collect();
    Ok(Json(serde_json::json!({
        "from": sc.from, "to": sc.to, "interval": if week { "week" } else { "day" },
        "total": all.len(), "series": rows,
    })))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    serde_json::json!({"count": v.len(), "p50_secs": percentile(&v, 50.0), "p95_secs": percentile(&v, 95.0), "mean_secs": mean})
}

/// How long deployments took from creation to live: p50, p95, mean, and per phase
/// (build, placement, pull and start, boot to ready, ready to active).
#[utoipa::path(get, path = "/api/v1/analytics/deployments/duration", tag = "analytics", params(Window),
    responses((status = 200, description = "durations"), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn duration(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(w): QueryParams<Window>,
) -> ApiResult<Json<serde_json::Value>> {
    let sc = scope(&s, &caller, &w).await?;
    let all = facts(&s, &sc).await?;
    let secs = |a: i64, b: i64| (b - a).max(0) as f64 / 1000.0;
    let total: Vec<f64> = all.iter().filter_map(|d| d.activated_at.map(|a| secs(d.created_at, a))).collect();
    let to_ready: Vec<f64> = all.iter().filter_map(|d| d.first_ready_at.map(|r| secs(d.created_at, r))).collect();
    let switch: Vec<f64> = all.iter().filter_map(|d| Some(secs(d.first_ready_at?, d.activated_at?))).collect();
    // The way to live, phase by phase: build from source, wait for room and be
    // placed, pull the image and start, boot until ready, switch traffic.
    let build: Vec<f64> = all.iter().filter_map(|d| d.build_ms.map(|ms| ms.max(0) as f64 / 1000.0)).collect();
    let placement: Vec<f64> =
        all.iter().filter_map(|d| Some(secs(d.created_at + d.build_ms.unwrap_or(0).max(0), d.placed_at?))).collect();
    let pull: Vec<f64> = all.iter().filter_map(|d| Some(secs(d.placed_at?, d.first_started_at?))).collect();
    let boot: Vec<f64> = all.iter().filter_map(|d| Some(secs(d.first_started_at?, d.first_ready_at?))).collect();
    let mut by_project: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for d in &all {
        if let Some(a) = d.activated_at {
            by_project.entry((d.org.clone(), d.project.clone())).or_default().push(secs(d.created_at, a));
        }
    }
    let per: Vec<serde_json::Value> = by_project
        .into_iter()
        .map(|((org, project), v)| {
            let mut row = summary(v);
            row["org"] = org.into();
            row["project"] = project.into();
            row
        })
        .collect();
    Ok(Json(serde_json::json!({
        "from": sc.from, "to": sc.to,
        "create_to_active": summary(total),
        "phases": {
            "create_to_first_ready": summary(to_ready),
            "build": summary(build),
            "placement": summary(placement),
            "pull_and_start": summary(pull),
            "boot_to_ready": summary(boot),
            "ready_to_active": summary(switch),
        },
        "by_project": per,
    })))
}

/// Per project: deployments that went live, failed, or are still on their way.
#[utoipa::path(get, path = "/api/v1/analytics/deployments/success-rate", tag = "analytics", params(Window),
    responses((status = 200, description = "success rates"), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn success_rate(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(w): QueryParams<Window>,
) -> ApiResult<Json<serde_json::Value>> {
    let sc = scope(&s, &caller, &w).await?;
    let mut per: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
    for d in facts(&s, &sc).await? {
        let e = per.entry((d.org.clone(), d.project.clone())).or_default();
        if d.activated_at.is_some() {
            e.0 += 1;
        } else if d.status == "failed" {
            e.1 += 1;
        } else {
            e.2 += 1;
        }
    }
    let rows: Vec<serde_json::Value> = per
        .into_iter()
        .map(|((org, project), (ok, failed, open))| {
            let done = ok + failed;
            let rate = (done > 0).then(|| ok as f64 / done as f64);
            serde_json::json!({"org": org, "project": project, "succeeded": ok, "failed": failed,
                "in_progress": open, "success_rate": rate})
        })
        .collect();
    Ok(Json(serde_json::json!({"from": sc.from, "to": sc.to, "projects": rows})))
}

/// What each org's live instances are allocated now (instances, vCPU, memory),
/// and what its instances used: CPU seconds, memory of the live ones, and
/// instance-hours, from the samples of the node agents' measurements.
#[utoipa::path(get, path = "/api/v1/analytics/resources/by-org", tag = "analytics", params(Window),
    responses((status = 200, body = zeitwork_api_types::ResourcesByOrg), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn resources_by_org(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(w): QueryParams<Window>,
) -> ApiResult<Json<ResourcesByOrg>> {
    let sc = scope(&s, &caller, &w).await?;
    let mut orgs: BTreeMap<String, OrgResources> = BTreeMap::new();
    let empty = |org: &str| OrgResources {
        org: org.to_owned(),
        instances: 0,
        vcpu: 0,
        memory_mib: 0,
        cpu_seconds: 0.0,
        memory_bytes: 0,
        instance_hours: 0.0,
        sampled_at: None,
    };
    for (org, n, vcpu, mem) in s.store.allocation_by_org(sc.org.as_deref()).await? {
        let row = orgs.entry(org.clone()).or_insert_with(|| empty(&org));
        (row.instances, row.vcpu, row.memory_mib) = (n.max(0) as u64, vcpu.max(0) as u64, mem.max(0) as u64);
    }
    for u in s.store.usage_by_org(sc.org.as_deref()).await? {
        let row = orgs.entry(u.org.clone()).or_insert_with(|| empty(&u.org));
        row.cpu_seconds = u.cpu_ms as f64 / 1000.0;
        row.memory_bytes = u.memory_bytes.max(0) as u64;
        row.instance_hours = u.instance_ms as f64 / 3_600_000.0;
        row.sampled_at = u.last_sample_at.and_then(DateTime::from_timestamp_millis);
    }
    if let Some(org) = &sc.org {
        // An org with nothing running answers zeros, not an empty list.
        orgs.entry(org.clone()).or_insert_with(|| empty(org));
    }
    Ok(Json(ResourcesByOrg { orgs: orgs.into_values().collect() }))
}
