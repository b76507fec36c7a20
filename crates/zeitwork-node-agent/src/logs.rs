//! `GET /v1/instances/{id}/logs?since=&follow=`: an instance's output as
//! JSON lines, for operators (which merge the instances of a deployment) and
//! platform admins. With `follow=true` the response stays open and new lines
//! arrive as they are written.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use zeitwork_api_types::ClusterRole;
use zeitwork_runtime::logs::LogStore;

use crate::forward::{refuse, Forwarder};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    pub since: Option<String>,
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone)]
pub struct LogsState {
    pub forwarder: Arc<Forwarder>,
    pub logs: Arc<LogStore>,
    /// Set once the runtime is up.
    pub runtime: Arc<std::sync::OnceLock<Arc<zeitwork_runtime::AnyRuntime>>>,
}

/// What `GET /metrics` needs: the node's metrics and who may read them.
#[derive(Clone)]
pub struct ScrapeState {
    pub metrics: zeitwork_telemetry::HttpMetrics,
    /// The configured metrics token (Prometheus `authorization`).
    pub token: Option<Arc<str>>,
    pub forwarder: Arc<Forwarder>,
    /// Their counters are brought up to date before each scrape.
    pub org_drains: Arc<crate::drains::OrgDrains>,
}

/// `GET /metrics`: for Prometheus with the configured `metrics_token`, or a platform admin.
pub async fn scrape(State(s): State<ScrapeState>, headers: HeaderMap) -> Response {
    let allowed = match (&s.token, zeitwork_telemetry::presented_bearer(&headers)) {
        (_, None) => false,
        (Some(t), Some(_)) if zeitwork_telemetry::bearer_is(&headers, t) => true,
        (_, Some(bearer)) => s.forwarder.allowed(bearer, &[]).await,
    };
    if !allowed {
        return zeitwork_telemetry::refuse_scrape(&headers);
    }
    s.org_drains.count();
    zeitwork_telemetry::metrics_handler(State(s.metrics)).await
}

/// `GET /v1/instances/{id}/metrics`: what a running instance uses (operators only).
pub async fn instance_metrics(State(s): State<LogsState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    use zeitwork_runtime::Runtime;
    let Some(token) = bearer(&headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "metrics need an operator's token (Authorization: Bearer …)");
    };
    if !s.forwarder.allowed(token, &[ClusterRole::Operator]).await {
        return refuse(StatusCode::FORBIDDEN, "this token may not read instance metrics");
    }
    let Some(runtime) = s.runtime.get() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "this node has no runtime");
    };
    match runtime.stats(&id).await {
        Ok(stats) => axum::Json(stats).into_response(),
        Err(zeitwork_runtime::RuntimeError::NotFound(_)) => refuse(StatusCode::NOT_FOUND, "no such instance runs here"),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

pub async fn instance_logs(
    State(s): State<LogsState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "logs need an operator's token (Authorization: Bearer …)");
    };
    if !s.forwarder.allowed(token, &[ClusterRole::Operator]).await {
        return refuse(StatusCode::FORBIDDEN, "this token may not read instance logs");
    }
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "query: use since=<RFC 3339 time> and follow=true|false");
    };
    let since = match q.since.as_deref().map(DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.with_timezone(&Utc)),
        Some(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "since: not an RFC 3339 time"),
    };
    if s.logs.path(&id).is_none() {
        return refuse(StatusCode::BAD_REQUEST, "not an instance id");
    }
    let known = s.logs.exists(&id) || s.forwarder.table.read().await.contains_key(&id);
    if !known {
        return refuse(StatusCode::NOT_FOUND, "no such instance on this node");
    }
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        let mut body = String::new();
        for l in s.logs.read(&id, since) {
            body.push_str(&serde_json::to_string(&l).unwrap_or_default());
            body.push('\n');
        }
        return (ndjson, body).into_response();
    }
    let rx = s.logs.follow(&id, since);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        Some((Ok::<_, Infallible>(Bytes::from(text)), rx))
    });
    (ndjson, Body::from_stream(stream)).into_response()
}
