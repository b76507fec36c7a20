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
    let timeout = q.timeout.unwrap_or(25);
    if !(1..=60).contains(&timeout) {
        return Err(crate::error::ApiError::InvalidQuery(format!("timeout: {timeout} is out of range; use 1 to 60")));
    }
    if q.version.as_ref().is_some_and(|v| v.len() > 64) {
        return Err(crate::error::ApiError::InvalidQuery(
            "version: give the X-Assignments-Version of the last answer".into(),
        ));
    }
    let started = tokio::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(timeout);
    let hub = &s.assignments;
    loop {
        // The node's version before the read: a change committed during it wakes this call.
        let mut watch = hub.watch(&id);
        let known = q.version.as_deref().is_some_and(|v| hub.unchanged(&id, v));
        if !known {
            let list = {
                // A few nodes read at once, the others queue (an operator
                // restart brings every agent at the same moment); a call
                // woken late in a long wait still gets a few seconds.
                let until = (started + crate::assignments::QUEUE)
                    .max(tokio::time::Instant::now() + std::time::Duration::from_secs(5));
                let queued = crate::assignments::Queued::new(&hub.queued);
                let turn = tokio::time::timeout_at(until, hub.reading.acquire()).await;
                drop(queued);
                let Ok(Ok(_turn)) = turn else {
                    hub.busy.inc();
                    return Ok(busy());
                };
                hub.reads.inc();
                assignments_of(&s, &id).await?
            };
            let version = hex::encode(&sha2::Sha256::digest(serde_json::to_vec(&list).unwrap_or_default())[..8]);
            hub.answered(&id, watch.version, version.clone(), list.iter().map(|a| a.deployment.clone()).collect());
            if q.version.as_deref() != Some(version.as_str()) {
                return Ok(with_version(Json(list).into_response(), &version));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            if known {
                hub.unchanged.inc();
            }
            let version = q.version.as_deref().unwrap_or_default();
            return Ok(with_version(StatusCode::NOT_MODIFIED.into_response(), version));
        }
        // Only a change that concerns this node wakes the call (through other
        // operators on PostgreSQL by LISTEN/NOTIFY).
        let _ = tokio::time::timeout_at(deadline, watch.rx.changed()).await;
    }
}

/// `503` with `Retry-After`: too many nodes are being read at once.
fn busy() -> Response {
    let mut res = crate::error::ApiError::Unavailable(
        "the operator is reading many nodes' assignments at once; try again in a few seconds".into(),
    )
    .into_response();
    res.headers_mut().insert(axum::http::header::RETRY_AFTER, crate::assignments::RETRY_AFTER.into());
    res
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

/// Node `id`'s assignments, in a fixed number of reads whatever it holds:
/// its instances, their addresses, their networks and members, their
/// projects' env vars, the tunnel ends of the nodes the networks span, and
/// the organisations' log drains.
async fn assignments_of(s: &AppState, id: &str) -> ApiResult<Vec<zeitwork_api_types::Assignment>> {
    use std::collections::{BTreeMap, HashMap};
    // A node removed since its agent last asked is told so (404).
    s.store.get_node(id).await?;
    let assigned = s.store.node_assignments(id).await?;
    let key_of = |a: &zeitwork_store::NodeAssignment| (a.project_id.clone(), a.environment.clone());
    let mut keys: Vec<zeitwork_store::NetworkKey> = assigned.iter().map(key_of).collect();
    keys.sort();
    keys.dedup();
    // Addresses first, so each network's member list includes every instance handed out here.
    let mut networks = s.store.project_networks(&keys).await?;
    for k in &keys {
        if !networks.contains_key(k) {
            networks.insert(k.clone(), s.store.project_network(&k.0, &k.1, s.assignments.private.1).await?);
        }
    }
    let ids: Vec<String> = assigned.iter().map(|a| a.instance.clone()).collect();
    let mut hosts = s.store.private_hosts(&ids).await?;
    let mut missing: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for a in assigned.iter().filter(|a| !hosts.contains_key(&a.instance)) {
        missing.entry(networks[&key_of(a)]).or_default().push(a.instance.clone());
    }
    // The few without one get theirs in one transaction per network.
    for (idx, ids) in missing {
        hosts.extend(s.store.give_private_hosts(idx, &ids, zeitwork_store::MAX_PRIVATE_HOST).await?);
    }
    let members = s.store.networks_members(&keys).await?;
    let mut spanned: Vec<String> = members.values().flatten().filter_map(|m| m.node.clone()).collect();
    spanned.sort();
    spanned.dedup();
    spanned.retain(|n| n != id);
    let tunnels = s.store.node_tunnels(&spanned).await?;
    // Env vars read and decrypted once per project, not per instance.
    let mut projects: Vec<String> = keys.iter().map(|(p, _)| p.clone()).collect();
    projects.dedup();
    let mut envs: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for (project, vars) in s.store.list_envs(&projects).await? {
        let mut env = BTreeMap::new();
        for v in vars {
            let value = s.cipher.decrypt(&format!("env:{project}:{}", v.key), &v.value_enc).map_err(|e| {
                tracing::error!(key = %v.key, error = %e, "cannot decrypt an env var");
                crate::error::ApiError::Internal
            })?;
            env.insert(v.key, value);
        }
        envs.insert(project, env);
    }
    let mut drains: HashMap<String, Vec<zeitwork_api_types::AssignedLogDrain>> = HashMap::new();
    let mut out = Vec::with_capacity(assigned.len());
    for a in assigned {
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
        let env = envs.get(&a.project_id).cloned().unwrap_or_default();
        let pull_credential = super::images::archive_repository(&a.image)
            .filter(|(org, _)| *org == a.org)
            .map(|(org, name)| super::images::pull_credential(&s.cipher, org, name));
        let key = key_of(&a);
        let idx = networks[&key];
        let Some(&host) = hosts.get(&a.instance) else {
            tracing::error!(instance = %a.instance, "no private address was handed out");
            return Err(crate::error::ApiError::Internal);
        };
        let members = members.get(&key).map(Vec::as_slice).unwrap_or_default();
        let mut network = private_network(s, &a, idx, host, members);
        network.tunnel_peers = tunnel_peers(s, id, idx, members, &tunnels);
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
            network: Some(network),
            log_drains,
        });
    }
    Ok(out)
}

/// The other nodes holding members of network `idx`, each with the addresses of
/// the members it holds: the peers node `node` needs for that network. Nodes
/// that sent no tunnel end are left out (their members are reached from their
/// own node only), as are nodes deleted meanwhile (their members are on their way out).
fn tunnel_peers(
    s: &AppState,
    node: &str,
    idx: u32,
    members: &[zeitwork_store::PrivateMember],
    tunnels: &std::collections::HashMap<String, zeitwork_api_types::NodeTunnel>,
) -> Vec<zeitwork_api_types::TunnelPeer> {
    let prefix = u32::from(s.assignments.private.0) + (idx << 8);
    let mut by_node: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for m in members {
        match m.node.as_deref() {
            Some(other) if other != node => {
                by_node.entry(other).or_default().push(format!("{}/32", std::net::Ipv4Addr::from(prefix + m.host)))
            }
            _ => {}
        }
    }
    by_node
        .into_iter()
        .filter_map(|(other, allowed_ips)| {
            tunnels.get(other).map(|t| zeitwork_api_types::TunnelPeer {
                node: other.to_owned(),
                public_key: t.public_key.clone(),
                endpoint: t.endpoint.clone(),
                allowed_ips,
            })
        })
        .collect()
}

/// The private network of an assigned instance: the /24 `idx` of its project
/// and environment, its own address `host` there and every live member's.
fn private_network(
    s: &AppState,
    a: &zeitwork_store::NodeAssignment,
    idx: u32,
    host: u32,
    members: &[zeitwork_store::PrivateMember],
) -> zeitwork_api_types::PrivateNetwork {
    let prefix = u32::from(s.assignments.private.0) + (idx << 8);
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
    zeitwork_api_types::PrivateNetwork {
        prefix: format!("{}/24", std::net::Ipv4Addr::from(prefix)),
        address: address(host),
        members,
        egress,
        tunnel_peers: Vec::new(),
    }
}
