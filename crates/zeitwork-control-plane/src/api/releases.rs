//! Releases: the traffic figures edges report per deployment, and a
//! deployment's rollout (canary steps, the watch after the switch) with a
//! person's promote or abort.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use zeitwork_api_types::{ClusterRole, Role, RolloutStatus, TrafficReport, ValidationError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

/// Most deployments one traffic report may name.
const MAX_REPORTED: usize = 10_000;

/// Report request counts, 5xx counts and latency per deployment (edge
/// proxies, every second). A report for the same edge and period replaces
/// the earlier one; reports of different edges add up.
#[utoipa::path(post, path = "/api/v1/routing/traffic", tag = "routing", request_body = TrafficReport,
    responses((status = 204, description = "recorded"), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn report_traffic(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(r): JsonBody<TrafficReport>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, &[ClusterRole::EdgeProxy], "routing.traffic", "deployments").await?;
    zeitwork_api_types::validate::text("edge", &r.edge, 200)?;
    if r.period < 0 {
        return Err(ValidationError::new("period", "give the period's start in unix milliseconds").into());
    }
    if r.deployments.len() > MAX_REPORTED {
        return Err(
            ValidationError::new("deployments", format!("name at most {MAX_REPORTED} deployments per report")).into()
        );
    }
    for (id, t) in &r.deployments {
        if id.is_empty() || id.len() > 200 {
            return Err(ValidationError::new("deployments", format!("{id:?} is not a deployment id")).into());
        }
        if t.errors > t.requests || t.latency.len() > zeitwork_api_types::LATENCY_BUCKETS {
            return Err(ValidationError::new(
                format!("deployments.{id}"),
                format!(
                    "errors must not exceed requests, and latency has at most {} buckets",
                    zeitwork_api_types::LATENCY_BUCKETS
                ),
            )
            .into());
        }
    }
    s.store.record_traffic(&r.edge, r.period, &r.deployments).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A deployment's rollout: its canary steps, the watch after the switch, and the last analysis.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/rollout", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = RolloutStatus), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_rollout(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutStatus>> {
    let d = super::projects::readable_deployment(&s, &caller, &id).await?;
    s.require_role(&caller, &d.org, Role::Guest, "rollout.show", &id).await?;
    let mut r = s
        .store
        .get_rollout(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("deployment {id:?} has no rollout (it switched without one)")))?;
    let now = chrono::Utc::now().timestamp_millis();
    let t = s.store.traffic_between(&id, r.started_at.timestamp_millis(), now + 1).await?;
    r.served = Some(zeitwork_api_types::Served { requests: t.requests, errors: t.errors });
    Ok(Json(r))
}

async fn decide(s: &AppState, caller: &Caller, id: &str, promote: bool) -> ApiResult<Json<RolloutStatus>> {
    let action = if promote { "rollout.promote" } else { "rollout.abort" };
    let d = super::projects::readable_deployment(s, caller, id).await?;
    s.require_role(caller, &d.org, Role::Developer, action, id).await?;
    let audit = caller.audit(action, id).org(&d.org).project(&d.project);
    let grace = crate::engine::EngineConfig::default().drain_grace;
    match crate::rollout::decide(&s.store, grace, &d, promote, audit).await? {
        Ok(r) => {
            s.changed();
            Ok(Json(r))
        }
        Err(why) => Err(ApiError::Conflict(why)),
    }
}

/// Move a canary to 100 % now (the watch for regressions still follows).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/rollout/promote", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = RolloutStatus), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn promote_rollout(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutStatus>> {
    decide(&s, &caller, &id, true).await
}

/// Abort a rollout: a canary's traffic returns to the deployment serving the
/// environment; a watched deployment is rolled back to the one it replaced.
/// Either way the deployment is `rolled_back`.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/rollout/abort", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = RolloutStatus), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn abort_rollout(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutStatus>> {
    decide(&s, &caller, &id, false).await
}
