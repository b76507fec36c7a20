//! Uptime checks: per project, HTTP probes of its address through the edge,
//! their samples, and their state (`up`, `degraded`, `down`) with hysteresis.
//! The probing itself is in [`crate::uptime`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use utoipa::IntoParams;
use zeitwork_api_types::{HealthCheck, HealthCheckSpec, HealthSample, Role, ValidationError};
use zeitwork_store::{nanoid, Sample, StoredCheck};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;

pub(crate) fn sample_view(s: &Sample) -> HealthSample {
    HealthSample {
        id: s.id,
        at: s.at,
        region: s.region.clone(),
        ok: s.ok,
        status: s.status,
        latency_ms: s.latency_ms,
        error: s.error.clone(),
    }
}

/// The URL a check of `org/project` probes.
pub(crate) fn check_url(s: &AppState, org: &str, project: &str, spec: &HealthCheckSpec) -> String {
    format!("{}{}", s.config.app_url(&format!("{project}-{org}")), spec.path)
}

/// The longest window a check's figures may cover (samples are kept 30 days by default).
const MAX_WINDOW_DAYS: i64 = 90;

/// The window a check's uptime and latency figures cover.
#[derive(Debug, Default, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WindowQuery {
    /// `1h`, `24h` (the default) or `7d`, ending now; or give `from` and `to` instead.
    pub window: Option<String>,
    /// Start: RFC 3339 or a date; with `to` (default now) instead of `window`.
    pub from: Option<String>,
    /// End: RFC 3339 or a date; default now.
    pub to: Option<String>,
}

impl WindowQuery {
    /// The window asked for: `(from, to)`.
    fn range(&self) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
        let now = Utc::now();
        if self.window.is_some() && (self.from.is_some() || self.to.is_some()) {
            return Err(ValidationError::new("window", "give either window or from/to, not both").into());
        }
        let to = match &self.to {
            Some(t) => super::analytics::time("to", t)?,
            None => now,
        };
        let from = match (&self.window, &self.from) {
            (Some(w), _) => {
                let span = match w.as_str() {
                    "1h" => Duration::hours(1),
                    "24h" => Duration::hours(24),
                    "7d" => Duration::days(7),
                    other => return Err(ValidationError::new("window", format!("{other:?}: use 1h, 24h or 7d")).into()),
                };
                to - span
            }
            (None, Some(f)) => super::analytics::time("from", f)?,
            (None, None) => to - Duration::hours(24),
        };
        if from >= to {
            return Err(ValidationError::new("from", "from must be before to").into());
        }
        if to - from > Duration::days(MAX_WINDOW_DAYS) {
            return Err(
                ValidationError::new("from", format!("the window may span at most {MAX_WINDOW_DAYS} days")).into()
            );
        }
        Ok((from, to))
    }
}

async fn view(s: &AppState, c: &StoredCheck, (from, to): (DateTime<Utc>, DateTime<Utc>)) -> ApiResult<HealthCheck> {
    let spec: HealthCheckSpec =
        serde_json::from_value(c.spec.clone()).map_err(|e| ApiError::internal("reading a health check", e))?;
    let day = s.store.sample_summary(&c.id, from.timestamp_millis(), to.timestamp_millis()).await?;
    Ok(HealthCheck {
        id: c.id.clone(),
        org: c.org.clone(),
        project: c.project.clone(),
        url: check_url(s, &c.org, &c.project, &spec),
        spec,
        state: c.state.clone(),
        uptime_percent: (day.total > 0).then(|| (day.passed as f64 * 10_000.0 / day.total as f64).round() / 100.0),
        p50_ms: day.p50_ms,
        p95_ms: day.p95_ms,
        last_sample: day.last.as_ref().map(sample_view),
        window_from: from,
        window_to: to,
        created_at: c.created_at,
    })
}

async fn checked_spec(s: &AppState, org: &str, project: &str, spec: &HealthCheckSpec) -> ApiResult<()> {
    spec.validate()?;
    if spec.environment != zeitwork_api_types::Environment::Production {
        return Err(ValidationError::new("environment", "checks probe the production address (<project>-<org>)").into());
    }
    s.store.get_project(org, project).await?;
    // Any region may probe, also one the project does not run in (a visitor's view from there).
    for (i, r) in spec.regions.iter().enumerate() {
        if let Err(zeitwork_store::StoreError::NotFound(_)) = s.store.get_region(r).await {
            return Err(ValidationError::new(
                format!("regions[{i}]"),
                format!("{r:?} is not a region; see GET /api/v1/regions"),
            )
            .into());
        }
    }
    Ok(())
}

/// Uptime checks of a project, with their state and figures over a window (default the last 24 hours).
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/health-checks", tag = "health checks",
    params(("org" = String, Path), ("project" = String, Path), WindowQuery),
    responses((status = 200, body = Vec<HealthCheck>), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn list_checks(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, project)): Path<(String, String)>,
    QueryParams(q): QueryParams<WindowQuery>,
) -> ApiResult<Json<Vec<HealthCheck>>> {
    s.require_role(&caller, &org, Role::Guest, "health_check.list", &format!("{org}/{project}")).await?;
    let range = q.range()?;
    s.store.get_project(&org, &project).await?;
    let mut out = Vec::new();
    for c in s.store.project_checks(&org, &project).await? {
        out.push(view(&s, &c, range).await?);
    }
    Ok(Json(out))
}

/// One uptime check, with its state and figures over a window (default the last 24 hours).
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/health-checks/{id}", tag = "health checks",
    params(("org" = String, Path), ("project" = String, Path), ("id" = String, Path), WindowQuery),
    responses((status = 200, body = HealthCheck), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_check(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, project, id)): Path<(String, String, String)>,
    QueryParams(q): QueryParams<WindowQuery>,
) -> ApiResult<Json<HealthCheck>> {
    s.require_role(&caller, &org, Role::Guest, "health_check.get", &id).await?;
    let range = q.range()?;
    let c = project_check(&s, &org, &project, &id).await?;
    Ok(Json(view(&s, &c, range).await?))
}

fn last_day() -> (DateTime<Utc>, DateTime<Utc>) {
    let now = Utc::now();
    (now - Duration::hours(24), now)
}

/// Add an uptime check to a project (Developer); it runs at once, then every `interval_secs`.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/health-checks", tag = "health checks",
    params(("org" = String, Path), ("project" = String, Path)), request_body = HealthCheckSpec,
    responses((status = 201, body = HealthCheck), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn create_check(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, project)): Path<(String, String)>,
    JsonBody(spec): JsonBody<HealthCheckSpec>,
) -> ApiResult<Response> {
    let target = format!("{org}/{project}");
    s.require_role(&caller, &org, Role::Developer, "health_check.create", &target).await?;
    checked_spec(&s, &org, &project, &spec).await?;
    let p = s.store.get_project(&org, &project).await?;
    if s.store.project_checks(&org, &project).await?.len() >= 20 {
        return Err(ApiError::Conflict(format!("{target} has 20 checks, the most a project may have")));
    }
    let now = Utc::now();
    let c = StoredCheck {
        id: format!("chk_{}", nanoid(12)),
        project_id: p.id,
        org: org.clone(),
        project: project.clone(),
        spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal("storing a health check", e))?,
        state: "unknown".into(),
        fails: 0,
        passes: 0,
        next_at: now.timestamp_millis(),
        created_at: now,
        updated_at: now,
    };
    let audit = caller.audit("health_check.create", &c.id).org(&org).project(&project);
    let c = s.store.create_check(&c, &audit).await?;
    s.uptime.notify_one();
    Ok((StatusCode::CREATED, Json(view(&s, &c, last_day()).await?)).into_response())
}

/// The check `id` of `org/project`.
async fn project_check(s: &AppState, org: &str, project: &str, id: &str) -> ApiResult<StoredCheck> {
    let c = s.store.check(id).await?;
    if c.org != org || c.project != project {
        return Err(ApiError::NotFound(format!("{org}/{project} has no health check {id}")));
    }
    Ok(c)
}

/// Change an uptime check's settings (Developer): the fields given replace the current ones.
#[utoipa::path(patch, path = "/api/v1/projects/{org}/{project}/health-checks/{id}", tag = "health checks",
    params(("org" = String, Path), ("project" = String, Path), ("id" = String, Path)),
    request_body(content = serde_json::Value, description = "any fields of HealthCheckSpec"),
    responses((status = 200, body = HealthCheck), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn patch_check(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, project, id)): Path<(String, String, String)>,
    JsonBody(patch): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<Json<HealthCheck>> {
    s.require_role(&caller, &org, Role::Developer, "health_check.update", &id).await?;
    let c = project_check(&s, &org, &project, &id).await?;
    let mut merged = c.spec.as_object().cloned().unwrap_or_default();
    merged.extend(patch);
    let spec: HealthCheckSpec = serde_json::from_value(serde_json::Value::Object(merged))
        .map_err(|e| ApiError::InvalidBody(format!("the check's settings: {e}")))?;
    checked_spec(&s, &org, &project, &spec).await?;
    let audit = caller.audit("health_check.update", &id).org(&org).project(&project);
    let value = serde_json::to_value(&spec).map_err(|e| ApiError::internal("storing a health check", e))?;
    let c = s.store.update_check(&id, &value, &audit).await?;
    s.uptime.notify_one();
    Ok(Json(view(&s, &c, last_day()).await?))
}

/// Remove an uptime check and its samples (Developer).
#[utoipa::path(delete, path = "/api/v1/projects/{org}/{project}/health-checks/{id}", tag = "health checks",
    params(("org" = String, Path), ("project" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_check(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, project, id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Developer, "health_check.delete", &id).await?;
    project_check(&s, &org, &project, &id).await?;
    let audit = caller.audit("health_check.delete", &id).org(&org).project(&project);
    s.store.delete_check(&id, &audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SampleQuery {
    /// Start: RFC 3339 or a date; default 24 hours ago.
    pub from: Option<String>,
    /// End: RFC 3339 or a date; default now.
    pub to: Option<String>,
    /// At most this many, oldest first (1–1000, default 100).
    pub limit: Option<u32>,
    /// `X-Next-Cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Samples of an uptime check in a time range, oldest first (paged).
#[utoipa::path(get, path = "/api/v1/health-checks/{id}/samples", tag = "health checks",
    params(("id" = String, Path), SampleQuery),
    responses((status = 200, body = Vec<HealthSample>), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn samples(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<SampleQuery>,
) -> ApiResult<Response> {
    let c = s.store.check(&id).await?;
    s.require_role(&caller, &c.org, Role::Guest, "health_check.samples", &id).await?;
    let now = Utc::now();
    let from = match &q.from {
        Some(f) => super::analytics::time("from", f)?,
        None => now - Duration::hours(24),
    };
    let to = match &q.to {
        Some(t) => super::analytics::time("to", t)?,
        None => now,
    };
    if from > to {
        return Err(ValidationError::new("from", "from is after to").into());
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > super::MAX_PAGE {
        return Err(ApiError::InvalidQuery(format!("limit: {limit} is out of range; use 1 to {}", super::MAX_PAGE)));
    }
    let after = match &q.cursor {
        Some(c) => {
            c.parse::<i64>().map_err(|_| ApiError::InvalidQuery("cursor: not a cursor this list returned".into()))?
        }
        None => 0,
    };
    let rows = s.store.samples(&id, from.timestamp_millis(), to.timestamp_millis(), after, limit).await?;
    let next = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.id.to_string())).flatten();
    let items: Vec<HealthSample> = rows.iter().map(sample_view).collect();
    Ok(super::listing(zeitwork_store::Listing { items, next_cursor: next }))
}
