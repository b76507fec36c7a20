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
use sha2::Digest;

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

/// The instances a node must run. With `version` (from the `X-Assignments-Version` header of
/// the last answer) the call waits up to `timeout` seconds for the set to change (long poll).
#[utoipa::path(get, path = "/api/v1/nodes/{id}/assignments", tag = "nodes", params(("id" = String, Path), WatchQuery),
    responses((status = 200, body = Vec<zeitwork_api_types::Assignment>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn node_assignments(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<WatchQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    s.require_node(&caller, &id, "node.assignments").await?;
    s.store.get_node(&id).await?;
    let timeout = q.timeout.unwrap_or(25);
    if !(1..=60).contains(&timeout) {
        return Err(crate::error::ApiError::InvalidQuery(format!("timeout: {timeout} is out of range; use 1 to 60")));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let mut changes = s.store.changes();
    loop {
        changes.mark_unchanged();
        let list = assignments_of(&s, &id).await?;
        let digest = sha2::Sha256::digest(serde_json::to_vec(&list).unwrap_or_default());
        let version = hex::encode(&digest[..8]);
        if q.version.as_deref() != Some(version.as_str()) || tokio::time::Instant::now() >= deadline {
            let mut res = Json(list).into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&version) {
                res.headers_mut().insert("x-assignments-version", v);
            }
            return Ok(res);
        }
        // Changes wake the call at once (through other operators on PostgreSQL by
        // LISTEN/NOTIFY); the 2 s recheck only bounds a lost notification.
        let wake = deadline.min(tokio::time::Instant::now() + std::time::Duration::from_secs(2));
        let _ = tokio::time::timeout_at(wake, changes.changed()).await;
    }
}

/// The sleeping (or waking) deployments that had an instance on this node: the
/// node keeps its microVM snapshots of these to wake them without a boot, and
/// removes the others.
#[utoipa::path(get, path = "/api/v1/nodes/{id}/snapshots", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Vec<String>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn node_snapshots(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    s.require_node(&caller, &id, "node.snapshots").await?;
    s.store.get_node(&id).await?;
    Ok(Json(s.store.sleeping_on_node(&id).await?))
}

async fn assignments_of(s: &AppState, id: &str) -> ApiResult<Vec<zeitwork_api_types::Assignment>> {
    let assigned = s.store.node_assignments(id).await?;
    // Addresses first, so each network's member list includes every instance handed out here.
    // One read for every address already handed out (almost all of them).
    let ids: Vec<String> = assigned.iter().map(|a| a.instance.clone()).collect();
    let known = s.store.private_hosts(&ids).await?;
    let mut networks = std::collections::HashMap::new();
    let mut hosts = Vec::with_capacity(assigned.len());
    for a in &assigned {
        let key = (a.project_id.clone(), a.environment.clone());
        let idx = match networks.get(&key) {
            Some(&(idx, _)) => idx,
            None => {
                let idx = s.store.project_network(&a.project_id, &a.environment, private_range(s)?.1).await?;
                networks.insert(key, (idx, None));
                idx
            }
        };
        let host = match known.get(&a.instance) {
            Some(&host) => host,
            None => s.store.private_host(idx, &a.instance, 254).await?,
        };
        hosts.push(host);
    }
    let mut drains: std::collections::HashMap<String, Vec<zeitwork_api_types::AssignedLogDrain>> =
        std::collections::HashMap::new();
    let mut out = Vec::new();
    // Env vars read and decrypted once per project, not per instance.
    let mut envs: std::collections::HashMap<String, std::collections::BTreeMap<String, String>> =
        std::collections::HashMap::new();
    // Tunnel ends of the nodes the networks span, looked up once per answer.
    let mut tunnels = std::collections::HashMap::new();
    for (a, host) in assigned.into_iter().zip(hosts) {
        if !drains.contains_key(&a.org) {
            let mut of_org = Vec::new();
            for d in s.store.list_log_drains(Some(&a.org)).await?.iter().filter(|d| d.takes("app")) {
                match crate::drain::open(s, d) {
                    Ok(d) => of_org.push(d),
                    Err(e) => tracing::error!(drain = %d.id, error = %e, "cannot decrypt a log drain; left out"),
                }
            }
            drains.insert(a.org.clone(), of_org);
        }
        let log_drains = drains.get(&a.org).cloned().unwrap_or_default();
        if !envs.contains_key(&a.project_id) {
            let mut env = std::collections::BTreeMap::new();
            for v in s.store.list_env(&a.project_id).await? {
                let value =
                    s.cipher.decrypt(&format!("env:{}:{}", a.project_id, v.key), &v.value_enc).map_err(|e| {
                        tracing::error!(key = %v.key, error = %e, "cannot decrypt an env var");
                        crate::error::ApiError::Internal
                    })?;
                env.insert(v.key, value);
            }
            envs.insert(a.project_id.clone(), env);
        }
        let env = envs.get(&a.project_id).cloned().unwrap_or_default();
        let pull_credential = super::images::archive_repository(&a.image)
            .filter(|(org, _)| *org == a.org)
            .map(|(org, name)| super::images::pull_credential(&s.cipher, org, name));
        let entry = networks.get_mut(&(a.project_id.clone(), a.environment.clone())).expect("allocated above");
        let idx = entry.0;
        if entry.1.is_none() {
            entry.1 = Some(s.store.network_members(&a.project_id, &a.environment).await?);
        }
        let members = entry.1.as_deref().unwrap_or_default();
        let mut network = private_network(s, &a, idx, host, members)?;
        network.tunnel_peers = tunnel_peers(s, id, idx, members, &mut tunnels).await?;
        let network = Some(network);
        out.push(zeitwork_api_types::Assignment {
            instance: a.instance,
            deployment: a.deployment,
            org: a.org,
            project: a.project,
            image: a.image,
            port: a.port,
            resources: a.resources,
            env,
            status: a.status,
            pull_credential,
            release_command: a.release_command,
            network,
            log_drains,
        });
    }
    Ok(out)
}

/// The other nodes holding members of network `idx`, each with the addresses of
/// the members it holds: the peers node `node` needs for that network. Nodes
/// that sent no tunnel end are left out (their members are reached from their
/// own node only).
async fn tunnel_peers(
    s: &AppState,
    node: &str,
    idx: u32,
    members: &[zeitwork_store::PrivateMember],
    tunnels: &mut std::collections::HashMap<String, Option<zeitwork_api_types::NodeTunnel>>,
) -> ApiResult<Vec<zeitwork_api_types::TunnelPeer>> {
    let prefix = u32::from(private_range(s)?.0) + (idx << 8);
    let mut by_node: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for m in members {
        match m.node.as_deref() {
            Some(other) if other != node => {
                by_node.entry(other).or_default().push(format!("{}/32", std::net::Ipv4Addr::from(prefix + m.host)))
            }
            _ => {}
        }
    }
    let mut peers = Vec::new();
    for (other, allowed_ips) in by_node {
        if !tunnels.contains_key(other) {
            let tunnel = match s.store.node_tunnel(other).await {
                Ok(t) => t,
                // Deleted meanwhile: its members are on their way out.
                Err(zeitwork_store::StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            tunnels.insert(other.to_owned(), tunnel);
        }
        if let Some(Some(t)) = tunnels.get(other) {
            peers.push(zeitwork_api_types::TunnelPeer {
                node: other.to_owned(),
                public_key: t.public_key.clone(),
                endpoint: t.endpoint.clone(),
                allowed_ips,
            });
        }
    }
    Ok(peers)
}

/// The operator's private range: its first address and how many /24s it holds.
fn private_range(s: &AppState) -> ApiResult<(std::net::Ipv4Addr, u32)> {
    // Checked when the operator starts.
    crate::config::private_range(&s.config.private_network).map_err(|e| {
        tracing::error!(error = %e, "private_network");
        crate::error::ApiError::Internal
    })
}

/// The private network of an assigned instance: the /24 `idx` of its project
/// and environment, its own address `host` there and every live member's.
fn private_network(
    s: &AppState,
    a: &zeitwork_store::NodeAssignment,
    idx: u32,
    host: u32,
    members: &[zeitwork_store::PrivateMember],
) -> ApiResult<zeitwork_api_types::PrivateNetwork> {
    let prefix = u32::from(private_range(s)?.0) + (idx << 8);
    let address = |host: u32| std::net::Ipv4Addr::from(prefix + host).to_string();
    let members = members
        .iter()
        .map(|m| zeitwork_api_types::NetworkMember {
            address: address(m.host),
            instance: m.instance.clone(),
            ready: m.ready,
        })
        .collect();
    let egress = a.egress.as_deref().and_then(|e| serde_json::from_str(e).ok());
    Ok(zeitwork_api_types::PrivateNetwork {
        prefix: format!("{}/24", std::net::Ipv4Addr::from(prefix)),
        address: address(host),
        members,
        egress,
        tunnel_peers: Vec::new(),
    })
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
