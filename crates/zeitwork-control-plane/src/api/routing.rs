//! The routing table for edge proxies, and instance status from node agents.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use zeitwork_api_types::{ClusterRole, InstanceStatus, RoutingDeltas, RoutingTable};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;

const READERS: &[ClusterRole] = &[ClusterRole::EdgeProxy, ClusterRole::LoadBalancer];

/// How long a call waits for the operator's first whole read of the table
/// when it has no timeout of its own.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Waits up to `timeout` for the operator to know its table (until its first
/// whole read it does not, and an empty table would empty the edges).
async fn ready(s: &AppState, timeout: Duration) -> ApiResult<()> {
    if s.routing.ready(timeout).await {
        return Ok(());
    }
    Err(crate::error::ApiError::Unavailable("the routing table is still being read; try again shortly".into()))
}

/// The current routing table.
#[utoipa::path(get, path = "/api/v1/routing", tag = "routing",
    responses((status = 200, body = RoutingTable), (status = 503, body = zeitwork_api_types::ApiError)))]
pub async fn routing_table(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<RoutingTable>> {
    s.require_cluster(&caller, READERS, "routing.read", "routing").await?;
    ready(&s, READY_WAIT).await?;
    Ok(Json((*s.routing.current()).clone()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// The version the caller has; the call returns when the table differs.
    version: Option<String>,
    /// Longest wait in seconds (1–60, default 25); then the unchanged table is returned.
    timeout: Option<u64>,
}

/// Long poll: returns the routing table as soon as its version differs from `version`.
#[utoipa::path(get, path = "/api/v1/routing/watch", tag = "routing", params(WatchQuery),
    responses((status = 200, body = RoutingTable), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 503, body = zeitwork_api_types::ApiError)))]
pub async fn watch_routing(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<WatchQuery>,
) -> ApiResult<Json<RoutingTable>> {
    s.require_cluster(&caller, READERS, "routing.read", "routing").await?;
    let timeout = q.timeout.unwrap_or(25);
    if !(1..=60).contains(&timeout) {
        return Err(crate::error::ApiError::InvalidQuery(format!("timeout: {timeout} is out of range; use 1 to 60")));
    }
    ready(&s, Duration::from_secs(timeout)).await?;
    let table = s.routing.watch(&q.version.unwrap_or_default(), Duration::from_secs(timeout)).await;
    Ok(Json((*table).clone()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeltasQuery {
    /// The `cursor` of the caller's last answer; without it (or with one this
    /// operator cannot resume from) the answer is the whole table.
    since: Option<String>,
    /// Longest wait in seconds (1–60, default 25) while nothing changes; then
    /// an answer with no changes and the same cursor is returned.
    timeout: Option<u64>,
}

/// Watch the routing table by deltas: returns as soon as something changed
/// after `since`, with only what changed (the whole table on a gap).
#[utoipa::path(get, path = "/api/v1/routing/deltas", tag = "routing", params(DeltasQuery),
    responses((status = 200, body = RoutingDeltas), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 503, body = zeitwork_api_types::ApiError)))]
pub async fn routing_deltas(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<DeltasQuery>,
) -> ApiResult<Json<RoutingDeltas>> {
    s.require_cluster(&caller, READERS, "routing.read", "routing").await?;
    let timeout = q.timeout.unwrap_or(25);
    if !(1..=60).contains(&timeout) {
        return Err(crate::error::ApiError::InvalidQuery(format!("timeout: {timeout} is out of range; use 1 to 60")));
    }
    if let Some(c) = &q.since {
        if c.len() > 100 {
            return Err(crate::error::ApiError::InvalidQuery("since: give the cursor of the last answer".into()));
        }
    }
    ready(&s, Duration::from_secs(timeout)).await?;
    Ok(Json(s.routing.deltas(q.since.as_deref(), Duration::from_secs(timeout)).await))
}

/// What a node agent reports about an instance.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceReport {
    pub status: InstanceStatus,
    /// Where the app listens inside the node, e.g. `10.88.0.5:8080`.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Why it stopped or failed, for people.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Report an instance's status (node agents).
#[utoipa::path(put, path = "/api/v1/instances/{id}/status", tag = "instances", params(("id" = String, Path)),
    request_body = InstanceReport, responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn report_instance(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<InstanceReport>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, &[ClusterRole::NodeAgent], "instance.report", &id).await?;
    // A node reports on its own instances only.
    let placed_on = s.store.get_instance(&id).await?.node.unwrap_or_default();
    s.require_node(&caller, &placed_on, "instance.report").await?;
    if let Some(reason) = &r.reason {
        zeitwork_api_types::validate::text("reason", reason, 1000)?;
    }
    if let Some(a) = &r.address {
        if a.parse::<std::net::SocketAddr>().is_err() {
            return Err(zeitwork_api_types::ValidationError::new("address", format!("{a:?} is not IP:PORT")).into());
        }
    }
    let exit = r.reason.clone().map(|reason| (r.exit_code, reason)).or(r.exit_code.map(|c| (Some(c), String::new())));
    s.store.set_instance_status(&id, r.status, r.address.as_deref(), exit).await?;
    s.changed();
    Ok(StatusCode::NO_CONTENT)
}

/// Who the calling token is (lets node agents check an edge's token).
#[utoipa::path(get, path = "/api/v1/auth/whoami", tag = "tokens", responses((status = 200, body = zeitwork_api_types::WhoAmI)))]
pub async fn whoami(caller: Caller) -> Json<zeitwork_api_types::WhoAmI> {
    Json(zeitwork_api_types::WhoAmI {
        token_id: caller.token_id,
        name: caller.name,
        scope: caller.scope,
        read_only: caller.read_only,
    })
}

/// Requests edges served, per deployment: `{"deployments": {"<id>": <unix ms of the last request>}}`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activity {
    pub deployments: std::collections::BTreeMap<String, i64>,
}

/// Most deployments one activity report may name.
const MAX_ACTIVITY: usize = 10_000;

/// Report when deployments last served requests (edge proxies, every few
/// seconds): idle deployments that no environment points at go to sleep.
#[utoipa::path(post, path = "/api/v1/routing/activity", tag = "routing", request_body = Activity,
    responses((status = 204, description = "recorded"), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn report_activity(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(a): JsonBody<Activity>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, &[ClusterRole::EdgeProxy], "routing.activity", "deployments").await?;
    if a.deployments.len() > MAX_ACTIVITY {
        return Err(zeitwork_api_types::ValidationError::new(
            "deployments",
            format!("name at most {MAX_ACTIVITY} deployments per report"),
        )
        .into());
    }
    if let Some((id, _)) = a.deployments.iter().find(|(id, at)| id.is_empty() || id.len() > 200 || **at < 0) {
        return Err(zeitwork_api_types::ValidationError::new(
            "deployments",
            format!("{id:?}: give deployment ids with a time in unix milliseconds"),
        )
        .into());
    }
    let seen: Vec<(String, i64)> = a.deployments.into_iter().collect();
    s.store.record_requests(&seen).await?;
    Ok(StatusCode::NO_CONTENT)
}
