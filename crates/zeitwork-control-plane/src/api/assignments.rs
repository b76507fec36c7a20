//! What each node must run: its assignments, read by its agent through a
//! long poll that [`crate::assignments::AssignmentHub`] wakes only for the
//! changes that concern the node, and the snapshots it keeps.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sha2::Digest;

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryParams;
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AssignmentsQuery {
    /// The `X-Assignments-Version` of the caller's last answer; the call
    /// returns when the set differs, or with `304 Not Modified` at the timeout.
    version: Option<String>,
    /// Longest wait in seconds (1–60, default 25).
    timeout: Option<u64>,
}

/// The instances a node must run. With `version` (from the `X-Assignments-Version` header of
/// the last answer) the call waits up to `timeout` seconds for the set to change (long poll),
/// and answers `304 Not Modified` if it did not.
#[utoipa::path(get, path = "/api/v1/nodes/{id}/assignments", tag = "nodes", params(("id" = String, Path), AssignmentsQuery),
    responses((status = 200, body = Vec<zeitwork_api_types::Assignment>),
        (status = 304, description = "the set is still the one of `version`"),
        (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn node_assignments(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<AssignmentsQuery>,
) -> ApiResult<Response> {
    s.require_node(&caller, &id, "node.assignments").await?;
    s.store.get_node(&id).await?;
    let timeout = q.timeout.unwrap_or(25);
    if !(1..=60).contains(&timeout) {
        return Err(crate::error::ApiError::InvalidQuery(format!("timeout: {timeout} is out of range; use 1 to 60")));
    }
    if q.version.as_ref().is_some_and(|v| v.len() > 64) {
        return Err(crate::error::ApiError::InvalidQuery(
            "version: give the X-Assignments-Version of the last answer".into(),
        ));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let hub = &s.assignments;
    loop {
        // The node's version before the read: a change committed during it wakes this call.
        let mut watch = hub.watch(&id);
        let known = q.version.as_deref().is_some_and(|v| hub.unchanged(&id, v));
        if !known {
            hub.reads.inc();
            let list = assignments_of(&s, &id).await?;
            let version = hex::encode(&sha2::Sha256::digest(serde_json::to_vec(&list).unwrap_or_default())[..8]);
            hub.answered(&id, watch.version, version.clone());
            if q.version.as_deref() != Some(version.as_str()) {
                return Ok(with_version(Json(list).into_response(), &version));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            hub.unchanged.inc();
            let version = q.version.as_deref().unwrap_or_default();
            return Ok(with_version(StatusCode::NOT_MODIFIED.into_response(), version));
        }
        // Only a change that concerns this node wakes the call (through other
        // operators on PostgreSQL by LISTEN/NOTIFY).
        let _ = tokio::time::timeout_at(deadline, watch.rx.changed()).await;
    }
}

fn with_version(mut res: Response, version: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(version) {
        res.headers_mut().insert("x-assignments-version", v);
    }
    res
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
