//! `GET /api/v1/events/stream`: Server-Sent Events of deployment, instance and
//! node changes (one `event:` per kind, JSON `data:`), filtered by org and
//! project and by what the token may see. `curl -N` shows them as they happen.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use utoipa::IntoParams;
use zeitwork_api_types::{Role, TokenScope};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryParams;
use crate::AppState;

#[derive(Debug, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only changes of this organisation.
    pub org: Option<String>,
    /// Only changes of this project (needs `org`).
    pub project: Option<String>,
    /// Only changes of this deployment and its instances.
    pub deployment: Option<String>,
}

/// Live changes of deployments, instances and nodes as Server-Sent Events.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events", params(StreamQuery),
    responses((status = 200, description = "text/event-stream of Change objects", body = zeitwork_api_types::Change, content_type = "text/event-stream"),
        (status = 400, body = zeitwork_api_types::ApiError), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn event_stream(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<StreamQuery>,
) -> ApiResult<Response> {
    if q.project.is_some() && q.org.is_none() {
        return Err(crate::error::ApiError::InvalidQuery("project: give org as well".into()));
    }
    if let Some(org) = &q.org {
        zeitwork_api_types::validate::dns_label("org", org)?;
        s.require_role(&caller, org, Role::Guest, "event.stream", org).await?;
    } else if matches!(caller.scope, TokenScope::Cluster { .. }) {
        return s.deny(&caller, "event.stream", "events", None, "cluster tokens cannot read the event stream").await;
    }
    let visible = caller.visible_orgs();
    let admin = caller.is_admin();
    let mut rx = s.feed.subscribe().await;
    let stats = s.sse.clone();
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Event>| async move {
        // Counted as open until the client goes away.
        let _open = stats.open(q.org.as_deref().or(match &caller.scope {
            TokenScope::Org { org, .. } => Some(org.as_str()),
            _ => None,
        }));
        loop {
            // A client that went away ends the task (and its count) without waiting for a change.
            let next = tokio::select! {
                c = rx.recv() => c,
                _ = tx.closed() => return,
            };
            let change = match next {
                Ok(c) => c,
                Err(RecvError::Lagged(n)) => {
                    stats.dropped.inc_by(n);
                    let note =
                        Event::default().event("lagged").data(format!("{n} changes were dropped; re-read state"));
                    if tx.send(note).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let seen = match &change.org {
                Some(o) => visible.as_ref().is_none_or(|v| v.contains(o)),
                None => admin,
            };
            let wanted = q.org.as_ref().is_none_or(|o| change.org.as_ref() == Some(o))
                && q.project.as_ref().is_none_or(|p| change.project.as_ref() == Some(p))
                && q.deployment.as_ref().is_none_or(|d| change.id == *d || change.deployment.as_ref() == Some(d));
            if !(seen && wanted) {
                continue;
            }
            let Ok(event) = Event::default().event(change.kind.clone()).json_data(&*change) else { continue };
            if tx.send(event).await.is_err() {
                return;
            }
            stats.sent.inc();
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// Figures of the event streams, for `GET /api/admin/sse/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct SseStats {
    /// Open streams by organisation (`""`: platform-wide streams).
    open: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
    pub connections: prometheus_client::metrics::gauge::Gauge,
    pub sent: prometheus_client::metrics::counter::Counter,
    pub dropped: prometheus_client::metrics::counter::Counter,
}

/// One open stream; closes its count when dropped.
pub struct OpenStream {
    stats: std::sync::Arc<SseStats>,
    org: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.stats.connections.dec();
        if let Ok(mut open) = self.stats.open.lock() {
            if let Some(n) = open.get_mut(&self.org) {
                *n -= 1;
                if *n <= 0 {
                    open.remove(&self.org);
                }
            }
        }
    }
}

impl SseStats {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("sse_connections", "Open event streams", self.connections.clone());
        r.register("sse_events_sent", "Changes sent on event streams", self.sent.clone());
        r.register("sse_events_dropped", "Changes dropped for event streams that fell behind", self.dropped.clone());
    }

    fn open(self: &std::sync::Arc<Self>, org: Option<&str>) -> OpenStream {
        let org = org.unwrap_or_default().to_owned();
        self.connections.inc();
        if let Ok(mut open) = self.open.lock() {
            *open.entry(org.clone()).or_default() += 1;
        }
        OpenStream { stats: self.clone(), org }
    }

    /// Open streams by organisation.
    pub fn by_org(&self) -> std::collections::BTreeMap<String, i64> {
        self.open.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

/// The event streams in figures: open connections (by organisation), changes sent and dropped.
#[utoipa::path(get, path = "/api/admin/sse/stats", tag = "events",
    responses((status = 200, description = "event stream figures"), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn sse_stats(State(s): State<AppState>, caller: Caller) -> ApiResult<axum::Json<serde_json::Value>> {
    s.require_admin(&caller, "sse.stats", "sse").await?;
    let by_org: serde_json::Map<String, serde_json::Value> = s
        .sse
        .by_org()
        .into_iter()
        .map(|(org, n)| (if org.is_empty() { "(all organisations)".into() } else { org }, n.into()))
        .collect();
    Ok(axum::Json(serde_json::json!({
        "connections": s.sse.connections.get(),
        "by_org": by_org,
        "events_sent": s.sse.sent.get(),
        "events_dropped": s.sse.dropped.get(),
    })))
}

/// A stream fed by a task; the task ends when the response is dropped.
fn async_stream<F, Fut>(task: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(task(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) })
}
