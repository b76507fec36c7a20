//! A deployment's logs: the operator asks the node agent of every instance
//! (with its own `operator` token) and merges the answers by time. With
//! `follow=true` the response stays open, new lines arrive as instances write
//! them, and instances that start later (restarts, re-placements) join in.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Keep the response open and send new lines as they are written.
    #[serde(default)]
    pub follow: bool,
    /// Only lines at or after this time: RFC 3339 (`2026-01-02T15:04:05Z`) or an age (`30s`, `10m`, `2h`, `1d`).
    pub since: Option<String>,
    /// `text` (default; one readable line each) or `json` (JSON lines).
    pub format: Option<String>,
}

/// One line of a deployment's logs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeploymentLogLine {
    pub at: DateTime<Utc>,
    pub instance: String,
    /// `stdout`, `stderr`, or `zeitwork` for notes from the platform.
    pub stream: String,
    pub line: String,
    /// Syslog severity name (`err`, `warning`, `info`, …), from a level the line states, else by stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AgentLine {
    at: DateTime<Utc>,
    stream: String,
    line: String,
    #[serde(default)]
    severity: Option<String>,
}

/// `since` as a time: RFC 3339, or an age before now.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    now.checked_sub_signed(chrono::Duration::try_seconds(secs)?)
}

fn render(l: &DeploymentLogLine, json: bool) -> Bytes {
    let mut text = if json {
        serde_json::to_string(l).unwrap_or_default()
    } else {
        let mark = match l.stream.as_str() {
            "stderr" => " [stderr]",
            "zeitwork" => " [zeitwork]",
            _ => "",
        };
        format!("{} {}{mark} {}", l.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), l.instance, l.line)
    };
    text.push('\n');
    Bytes::from(text)
}

/// The logs of one instance from its node agent, line by line into `tx`.
async fn pump(
    s: AppState,
    instance: zeitwork_api_types::Instance,
    since: Option<DateTime<Utc>>,
    follow: bool,
    tx: mpsc::Sender<DeploymentLogLine>,
) {
    let note = |line: String| DeploymentLogLine {
        at: Utc::now(),
        instance: instance.id.clone(),
        stream: "zeitwork".into(),
        line,
        severity: None,
    };
    let Some(node) = instance.node.clone() else { return };
    let node = match s.store.get_node(&node).await {
        Ok(n) => n,
        Err(_) => {
            let _ = tx.send(note(format!("node {node} is gone; its logs cannot be read"))).await;
            return;
        }
    };
    let token = match s.internal_token.get(&s.store).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot mint the operator's token");
            let _ = tx.send(note("the operator cannot authenticate to nodes right now; try again".into())).await;
            return;
        }
    };
    let mut url = format!("{}/v1/instances/{}/logs?follow={follow}", node.address.trim_end_matches('/'), instance.id);
    if let Some(t) = since {
        url.push_str("&since=");
        url.push_str(&form_urlencoded::byte_serialize(t.to_rfc3339().as_bytes()).collect::<String>());
    }
    let mut req = s.http.get(url).bearer_auth(token);
    if !follow {
        req = req.timeout(Duration::from_secs(30));
    }
    let res = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return,
        Ok(r) => {
            let _ = tx.send(note(format!("node {} answered {} for these logs", node.hostname, r.status()))).await;
            return;
        }
        Err(e) => {
            let _ = tx.send(note(format!("node {} is unreachable: {e}", node.hostname))).await;
            return;
        }
    };
    let mut body = res.bytes_stream();
    let mut pending = Vec::new();
    loop {
        // Stop reading (and so close the agent's tail) as soon as nobody listens.
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = tx.closed() => return,
        };
        let Some(Ok(chunk)) = chunk else { break };
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=i).collect();
            if let Ok(l) = serde_json::from_slice::<AgentLine>(&raw) {
                let line = DeploymentLogLine {
                    at: l.at,
                    instance: instance.id.clone(),
                    stream: l.stream,
                    line: l.line,
                    severity: l.severity,
                };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The logs of a deployment's instances, oldest first; `follow=true` keeps the response open.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/logs", tag = "deployments",
    params(("id" = String, Path), LogsQuery),
    responses((status = 200, description = "text lines, or JSON lines of DeploymentLogLine with format=json", content_type = "text/plain"),
        (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn deployment_logs(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> ApiResult<Response> {
    super::projects::readable_deployment(&s, &caller, &id).await?;
    let json = match q.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => return Err(ApiError::InvalidQuery(format!("format: {other:?} is not text or json"))),
    };
    let since = match q.since.as_deref() {
        None => None,
        Some(v) => Some(parse_since(v, Utc::now()).ok_or_else(|| {
            ApiError::InvalidQuery(format!("since: {v:?} is neither an RFC 3339 time nor an age like 10m"))
        })?),
    };
    let content_type = if json { "application/x-ndjson" } else { "text/plain; charset=utf-8" };
    let (tx, mut rx) = mpsc::channel::<DeploymentLogLine>(512);
    if !q.follow {
        for i in s.store.list_instances(&id).await? {
            tokio::spawn(pump(s.clone(), i, since, false, tx.clone()));
        }
        drop(tx);
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        lines.sort_by_key(|l| l.at);
        let body: Vec<u8> = lines.iter().flat_map(|l| render(l, json)).collect();
        return Ok(([(header::CONTENT_TYPE, content_type)], body).into_response());
    }
    // Follow: one pump per instance, new instances picked up every 2 s, until the client leaves.
    let watcher = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            while !tx.is_closed() {
                if let Ok(list) = s.store.list_instances(&id).await {
                    for i in list {
                        if i.node.is_some() && seen.insert(i.id.clone()) {
                            tokio::spawn(pump(s.clone(), i, since, true, tx.clone()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let stream = futures::stream::unfold((rx, watcher), move |(mut rx, watcher)| async move {
        let l = rx.recv().await?;
        Some((Ok::<_, Infallible>(render(&l, json)), (rx, watcher)))
    });
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T15:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_since("10m", now).unwrap().to_rfc3339(), "2026-01-02T14:50:00+00:00");
        assert_eq!(parse_since("1d", now).unwrap().to_rfc3339(), "2026-01-01T15:00:00+00:00");
        assert_eq!(parse_since("2026-01-02T14:00:00+01:00", now).unwrap().to_rfc3339(), "2026-01-02T13:00:00+00:00");
        for bad in ["", "m", "10", "10w", "-5m", "99999999999999999999d", "yesterday"] {
            assert!(parse_since(bad, now).is_none(), "{bad}");
        }
    }
}

#[derive(Debug, Deserialize)]
struct AgentStats {
    memory_bytes: u64,
    memory_limit_bytes: u64,
    cpu_seconds: f64,
    processes: u64,
}

/// One instance's numbers from its node agent.
pub(crate) async fn instance_metrics(
    s: &AppState,
    i: zeitwork_api_types::Instance,
) -> zeitwork_api_types::InstanceMetrics {
    let mut m = zeitwork_api_types::InstanceMetrics {
        instance: i.id.clone(),
        node: i.node.clone(),
        region: i.region.clone(),
        status: i.status,
        uptime_secs: i.ready_at.map(|t| (Utc::now() - t).num_seconds().max(0) as u64),
        memory_bytes: None,
        memory_limit_bytes: None,
        cpu_seconds: None,
        processes: None,
        error: None,
    };
    let fetched: Result<AgentStats, String> = async {
        let node_id = i.node.clone().ok_or("not placed on a node")?;
        let node = s.store.get_node(&node_id).await.map_err(|e| e.to_string())?;
        let token = s.internal_token.get(&s.store).await.map_err(|e| e.to_string())?;
        let url = format!("{}/v1/instances/{}/metrics", node.address.trim_end_matches('/'), i.id);
        let res = s
            .http
            .get(url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("node {} is unreachable: {e}", node.hostname))?;
        if !res.status().is_success() {
            return Err(format!("node {} answered {}", node.hostname, res.status()));
        }
        res.json::<AgentStats>().await.map_err(|e| e.to_string())
    }
    .await;
    match fetched {
        Ok(st) => {
            m.memory_bytes = Some(st.memory_bytes);
            m.memory_limit_bytes = Some(st.memory_limit_bytes);
            m.cpu_seconds = Some(st.cpu_seconds);
            m.processes = Some(st.processes);
        }
        Err(e) => m.error = Some(e),
    }
    m
}

/// Resource use of a deployment's live instances, measured by their node agents now.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/metrics", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = zeitwork_api_types::DeploymentMetrics), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn deployment_metrics(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<zeitwork_api_types::DeploymentMetrics>> {
    use zeitwork_api_types::InstanceStatus as S;
    super::projects::readable_deployment(&s, &caller, &id).await?;
    let live: Vec<_> = s
        .store
        .list_instances(&id)
        .await?
        .into_iter()
        .filter(|i| !matches!(i.status, S::Stopped | S::Failed | S::Exited))
        .collect();
    let instances = futures::future::join_all(live.into_iter().map(|i| instance_metrics(&s, i))).await;
    Ok(axum::Json(zeitwork_api_types::DeploymentMetrics {
        deployment: id,
        ready: instances.iter().filter(|i| i.status == S::Ready).count() as u32,
        memory_bytes: instances.iter().filter_map(|i| i.memory_bytes).sum(),
        cpu_seconds: instances.iter().filter_map(|i| i.cpu_seconds).sum(),
        instances,
    }))
}
