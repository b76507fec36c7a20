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
    let mut rx = s.feed.subscribe();
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Event>| async move {
        loop {
            let change = match rx.recv().await {
                Ok(c) => c,
                Err(RecvError::Lagged(n)) => {
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
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
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
