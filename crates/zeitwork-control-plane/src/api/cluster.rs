//! Regions and nodes: the shape of the platform itself.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zeitwork_api_types::{ClusterRole, CreateRegion, Node, Region, RegisterNode};

use super::{created, listing, page};
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::{JsonBody, PageQuery, QueryParams};
use crate::AppState;

/// List regions.
#[utoipa::path(get, path = "/api/v1/regions", tag = "regions", params(PageQuery),
    responses((status = 200, body = Vec<Region>), (status = 401, body = zeitwork_api_types::ApiError)))]
pub async fn list_regions(
    State(s): State<AppState>,
    _caller: Caller,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Response> {
    Ok(listing(s.store.list_regions(&page(q.limit, q.cursor)?).await?))
}

/// Create a region (platform admin).
#[utoipa::path(post, path = "/api/v1/regions", tag = "regions", request_body = CreateRegion,
    responses((status = 201, body = Region), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn create_region(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(mut body): JsonBody<CreateRegion>,
) -> ApiResult<Response> {
    s.require_admin(&caller, "region.create", &body.code).await?;
    body.validate()?;
    // Stored as the ISO code, whether given as a code or as a name.
    body.country = zeitwork_api_types::validate::country_code(&body.country).unwrap_or(body.country);
    let r = s.store.create_region(&body, &caller.audit("region.create", &body.code)).await?;
    Ok(created(r))
}

/// Show a region.
#[utoipa::path(get, path = "/api/v1/regions/{code}", tag = "regions", params(("code" = String, Path)),
    responses((status = 200, body = Region), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_region(
    State(s): State<AppState>,
    _caller: Caller,
    Path(code): Path<String>,
) -> ApiResult<Json<Region>> {
    Ok(Json(s.store.get_region(&code).await?))
}

/// Delete a region with no nodes and no projects (platform admin).
#[utoipa::path(delete, path = "/api/v1/regions/{code}", tag = "regions", params(("code" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn delete_region(
    State(s): State<AppState>,
    caller: Caller,
    Path(code): Path<String>,
) -> ApiResult<StatusCode> {
    s.require_admin(&caller, "region.delete", &code).await?;
    s.store.delete_region(&code, &caller.audit("region.delete", &code)).await?;
    Ok(StatusCode::NO_CONTENT)
}

const NODE_READERS: &[ClusterRole] = &[ClusterRole::NodeAgent, ClusterRole::EdgeProxy, ClusterRole::LoadBalancer];

/// List nodes (platform admin or cluster tokens).
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes", params(PageQuery),
    responses((status = 200, body = Vec<Node>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_nodes(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Response> {
    s.require_cluster(&caller, NODE_READERS, "node.list", "nodes").await?;
    Ok(listing(s.store.list_nodes(&page(q.limit, q.cursor)?).await?))
}

/// Register a node (node agents); idempotent by hostname: 201 when new, 200 when known.
#[utoipa::path(post, path = "/api/v1/nodes", tag = "nodes", request_body = RegisterNode,
    responses((status = 201, body = Node), (status = 200, body = Node), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn register_node(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<RegisterNode>,
) -> ApiResult<Response> {
    s.require_cluster(&caller, &[ClusterRole::NodeAgent], "node.register", &body.hostname).await?;
    body.validate()?;
    // A node's own credential re-registers only its own node.
    if let Some(own) = &caller.node {
        let mine = s.store.get_node(own).await.ok();
        if mine.as_ref().map(|n| n.hostname.as_str()) != Some(body.hostname.as_str()) {
            let why = format!(
                "this credential acts for node {own} only; register {} with the node-agent token",
                body.hostname
            );
            return s.deny(&caller, "node.register", &body.hostname, None, &why).await;
        }
    }
    // With approval required, a node that the shared token brings in waits for an
    // admin; one an admin registers is approved by that.
    let initial = if s.config.require_node_approval && !caller.is_admin() {
        zeitwork_api_types::NodeStatus::PendingApproval
    } else {
        zeitwork_api_types::NodeStatus::Ready
    };
    let (mut node, new) =
        s.store.register_node_as(&body, &caller.audit("node.register", &body.hostname), initial).await?;
    if node.status == zeitwork_api_types::NodeStatus::Rejected {
        let why = format!(
            "node {} was rejected by an admin; it may register again once it is deleted (DELETE /api/v1/nodes/{})",
            node.hostname, node.id
        );
        return s.deny(&caller, "node.register", &body.hostname, None, &why).await;
    }
    if caller.node.is_none() && matches!(caller.scope, zeitwork_api_types::TokenScope::Cluster { .. }) {
        // The shared token registered it: the node gets a credential of its own, for itself only.
        let mut minted = crate::auth::mint(
            &format!("node {}", node.hostname),
            zeitwork_api_types::TokenScope::Cluster { role: ClusterRole::NodeAgent },
            false,
            Some(caller.actor()),
            None,
        );
        minted.stored.token.node = Some(node.id.clone());
        let audit = caller.audit("node.credential", &node.id);
        s.store.issue_node_credential(&minted.stored, &audit).await?;
        node.credential = Some(minted.bearer);
    }
    Ok(if new { created(node) } else { Json(node).into_response() })
}

/// Show a node.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_node(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    s.require_cluster(&caller, NODE_READERS, "node.show", &id).await?;
    Ok(Json(s.store.get_node(&id).await?))
}

/// Record a node agent's heartbeat.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/heartbeat", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn node_heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    s.require_node(&caller, &id, "node.heartbeat").await?;
    Ok(Json(s.store.node_heartbeat(&id).await?))
}

/// Drain a node: no new instances; existing ones move away (platform admin).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn drain_node(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    s.require_admin(&caller, "node.drain", &id).await?;
    Ok(Json(s.store.drain_node(&id, &caller.audit("node.drain", &id)).await?))
}

/// Approve a node waiting for approval (or one rejected before): it is `ready`
/// and gets placements from now on (platform admin).
#[utoipa::path(post, path = "/api/admin/nodes/{id}/approve", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn approve_node(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    s.require_admin(&caller, "node.approve", &id).await?;
    let node = s.store.decide_node(&id, true, &caller.audit("node.approve", &id)).await?;
    s.changed();
    Ok(Json(node))
}

/// Reject a node waiting for approval: its credential is revoked and it cannot
/// register again until it is deleted (platform admin).
#[utoipa::path(post, path = "/api/admin/nodes/{id}/reject", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn reject_node(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    s.require_admin(&caller, "node.reject", &id).await?;
    Ok(Json(s.store.decide_node(&id, false, &caller.audit("node.reject", &id)).await?))
}

/// Remove a node that runs no instances (platform admin), and revoke its own
/// credential; 409 while it runs instances.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn delete_node(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    s.require_admin(&caller, "node.delete", &id).await?;
    s.store.delete_node(&id, &caller.audit("node.delete", &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Seconds after its last report that an edge proxy is no longer listed.
pub const EDGE_TTL_SECS: i64 = 20;

/// An edge proxy reports its addresses (edge proxies, every few seconds).
#[utoipa::path(put, path = "/api/v1/edges/{name}", tag = "edges", params(("name" = String, Path)),
    request_body = zeitwork_api_types::EdgeRegistration,
    responses((status = 204), (status = 400, body = zeitwork_api_types::ApiError), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn edge_heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<zeitwork_api_types::EdgeRegistration>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, &[ClusterRole::EdgeProxy], "edge.heartbeat", &name).await?;
    zeitwork_api_types::validate::hostname("name", &name)?;
    for (field, value) in [("http_address", &body.http_address), ("https_address", &body.https_address)] {
        if let Some(v) = value {
            match v.parse::<std::net::SocketAddr>() {
                Ok(a) if !a.ip().is_unspecified() && a.port() != 0 => {}
                _ => {
                    return Err(zeitwork_api_types::ValidationError::new(
                        field,
                        format!("{v:?} is not an IP:PORT load balancers can reach"),
                    )
                    .into())
                }
            }
        }
    }
    s.store.edge_heartbeat(&name, body.http_address.as_deref(), body.https_address.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Edge proxies that reported in the last 20 s (load balancers follow this list).
#[utoipa::path(get, path = "/api/v1/edges", tag = "edges",
    responses((status = 200, body = Vec<zeitwork_api_types::EdgeInfo>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_edges(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<zeitwork_api_types::EdgeInfo>>> {
    s.require_cluster(&caller, &[ClusterRole::LoadBalancer], "edge.list", "edges").await?;
    let since = chrono::Utc::now().timestamp_millis() - EDGE_TTL_SECS * 1000;
    Ok(Json(s.store.live_edges(since).await?))
}

/// Which operator runs the deployment engine, as this operator sees it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ClusterState {
    /// This operator's name as a holder of the engine lease.
    pub operator: String,
    /// Whether this operator runs the engine now.
    pub leading: bool,
    /// The operator holding the engine lease, if any holds it.
    pub engine_leader: Option<String>,
    /// When that lease lapses unless renewed.
    pub lease_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The control plane's own state: which operator leads the engine (platform admin).
#[utoipa::path(get, path = "/api/v1/cluster", tag = "nodes",
    responses((status = 200, body = ClusterState), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn cluster_state(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<ClusterState>> {
    s.require_admin(&caller, "cluster.read", "engine").await?;
    let lease = s.store.lease(crate::engine::ENGINE_LEASE).await?;
    let live = lease.filter(|(_, until)| *until > chrono::Utc::now().timestamp_millis());
    Ok(Json(ClusterState {
        operator: s.engine_id.clone(),
        leading: s.leader.get() == 1,
        lease_until: live.as_ref().and_then(|(_, until)| chrono::DateTime::from_timestamp_millis(*until)),
        engine_leader: live.map(|(holder, _)| holder),
    }))
}
