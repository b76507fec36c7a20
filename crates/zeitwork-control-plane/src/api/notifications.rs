//! Notification channels of a project, and the outbox and dead-letter queue
//! that deliver to them (platform admins).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zeitwork_api_types::{Channel, CreateChannel, Role, ValidationError};
use zeitwork_store::{StoredChannel, NODE_EVENTS, NOTIFIED, PLATFORM};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::notify::{secret_context, target_context};
use crate::AppState;

fn view(c: &StoredChannel, url: &str) -> Channel {
    let shown = match url.strip_prefix(SLACK_BOT) {
        Some(channel) => format!("slack bot → {channel}"),
        None if url.starts_with(crate::email::EMAIL) => crate::email::shown(url).unwrap_or_else(|| "…".into()),
        None => reqwest::Url::parse(url)
            .map(|u| format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or("")))
            .unwrap_or_else(|_| "…".into()),
    };
    Channel {
        id: c.id.clone(),
        org: c.org.clone(),
        project: c.project.clone(),
        kind: c.kind.clone(),
        url: shown,
        events: c.events.clone(),
        created_at: c.created_at,
    }
}

/// The stored target of a Slack bot channel: this prefix and the channel.
pub const SLACK_BOT: &str = "slack-bot:";

/// What a channel delivers to (stored encrypted): its URL, or `slack-bot:<channel>`.
/// The platform's channels take node events only; organisations' channels all others.
fn check(s: &AppState, org: &str, b: &CreateChannel) -> Result<String, ValidationError> {
    let platform = org == PLATFORM;
    if let Some(e) = b.events.iter().find(|e| NODE_EVENTS.contains(&e.as_str()) != platform) {
        return Err(ValidationError::new(
            "events",
            if platform {
                format!("{e:?} is an organisation's event; the platform's channels take {}", NODE_EVENTS.join(", "))
            } else {
                format!("{e:?} is a node event; nodes are told to the platform's channels (/api/admin/notifications)")
            },
        ));
    }
    if !matches!(b.kind.as_str(), "webhook" | "slack" | "email") {
        return Err(ValidationError::new(
            "kind",
            format!("{:?} is not a channel kind; use webhook, slack or email", b.kind),
        ));
    }
    if let Some(e) = b.events.iter().find(|e| !NOTIFIED.contains(&e.as_str())) {
        return Err(ValidationError::new(
            "events",
            format!("{e:?} is not an event; use any of {}", NOTIFIED.join(", ")),
        ));
    }
    if b.kind == "email" {
        return crate::email::check(b, s.config.notifications_allow_internal);
    }
    if !b.to.is_empty() || b.from.is_some() {
        return Err(ValidationError::new("to", "to and from are for email channels"));
    }
    if b.kind == "slack" && (b.token.is_some() || b.channel.is_some()) {
        let token = b.token.as_deref().unwrap_or_default();
        let channel = b.channel.as_deref().unwrap_or_default();
        if !b.url.is_empty() {
            return Err(ValidationError::new("url", "give either an incoming-webhook url, or a bot token and channel"));
        }
        if token.len() < 8
            || token.len() > 512
            || token.bytes().any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(ValidationError::new("token", "give the bot's token as Slack shows it (xoxb-…)"));
        }
        let name = channel.strip_prefix('#').unwrap_or(channel);
        if name.is_empty() || name.len() > 80 || !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        {
            return Err(ValidationError::new(
                "channel",
                format!("{channel:?} is not a Slack channel (#name or an id)"),
            ));
        }
        return Ok(format!("{SLACK_BOT}{channel}"));
    }
    if b.token.is_some() || b.channel.is_some() {
        return Err(ValidationError::new("token", "token and channel are for Slack bots (kind slack)"));
    }
    let url = reqwest::Url::parse(&b.url)
        .map_err(|_| ValidationError::new("url", "give an absolute http:// or https:// URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || b.url.len() > 2000 {
        return Err(ValidationError::new("url", "give an absolute http:// or https:// URL"));
    }
    let host = url.host_str().unwrap_or_default();
    if !s.config.notifications_allow_internal && zeitwork_image::registry::internal_host(host) {
        return Err(ValidationError::new(
            "url",
            "points at a loopback, private or link-local address; notifications go to public receivers \
             (an operator may allow internal ones with notifications_allow_internal)",
        ));
    }
    match (&b.kind[..], &b.secret) {
        ("webhook", None) => {
            return Err(ValidationError::new(
                "secret",
                "a webhook needs a secret to sign its deliveries (16-256 characters)",
            ))
        }
        (_, Some(sec)) if sec.len() < 16 || sec.len() > 256 => {
            return Err(ValidationError::new("secret", "use 16 to 256 characters"))
        }
        _ => {}
    }
    Ok(b.url.clone())
}

/// Stores a channel of `org` (of `project`, or the org's default when none).
async fn add_channel(
    s: &AppState,
    caller: &Caller,
    org: &str,
    project: Option<&str>,
    b: &CreateChannel,
) -> ApiResult<Response> {
    let target = check(s, org, b)?;
    let id = zeitwork_store::channel_id();
    let secret = if target.starts_with(SLACK_BOT) { b.token.as_ref() } else { b.secret.as_ref() };
    let stored = StoredChannel {
        id: id.clone(),
        org: org.to_owned(),
        project: project.map(str::to_owned),
        kind: b.kind.clone(),
        target_enc: s.cipher.encrypt(&target_context(&id), &target),
        secret_enc: secret.map(|sec| s.cipher.encrypt(&secret_context(&id), sec)),
        events: b.events.clone(),
        created_at: chrono::Utc::now(),
    };
    let mut audit = caller.audit("notification.create", &id);
    if org != PLATFORM {
        audit = audit.org(org);
    }
    if let Some(p) = project {
        audit = audit.project(p);
    }
    let c = s.store.create_channel(&stored, &audit).await?;
    Ok((StatusCode::CREATED, Json(view(&c, &target))).into_response())
}

fn views(s: &AppState, channels: Vec<StoredChannel>) -> Vec<Channel> {
    channels
        .iter()
        .map(|c| view(c, &s.cipher.decrypt(&target_context(&c.id), &c.target_enc).unwrap_or_default()))
        .collect()
}

/// Add a channel of the platform's own (platform admin): it is told of nodes going down,
/// coming back, draining and drained.
#[utoipa::path(post, path = "/api/admin/notifications", tag = "notifications", request_body = CreateChannel,
    responses((status = 201, body = Channel), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn create_platform_channel(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<CreateChannel>,
) -> ApiResult<Response> {
    s.require_admin(&caller, "notification.create", "platform").await?;
    add_channel(&s, &caller, PLATFORM, None, &b).await
}

/// The platform's own notification channels (platform admin).
#[utoipa::path(get, path = "/api/admin/notifications", tag = "notifications",
    responses((status = 200, body = Vec<Channel>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_platform_channels(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Channel>>> {
    s.require_admin(&caller, "notification.list", "platform").await?;
    Ok(Json(views(&s, s.store.list_channels(PLATFORM, None).await?)))
}

/// Remove one of the platform's channels (platform admin).
#[utoipa::path(delete, path = "/api/admin/notifications/{id}", tag = "notifications", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_platform_channel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.require_admin(&caller, "notification.delete", &id).await?;
    let c = s.store.channel(&id).await?;
    if c.org != PLATFORM {
        return Err(ApiError::NotFound(format!("notification channel {id:?} is not one of the platform's")));
    }
    s.store.delete_channel(&id, &caller.audit("notification.delete", &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a default notification channel to an organisation (Admin): it gets the events of every project.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/notifications", tag = "notifications",
    params(("org" = String, Path)), request_body = CreateChannel,
    responses((status = 201, body = Channel), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn create_org_channel(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(b): JsonBody<CreateChannel>,
) -> ApiResult<Response> {
    s.require_role(&caller, &org, Role::Admin, "notification.create", &org).await?;
    s.store.get_org(&org).await?;
    add_channel(&s, &caller, &org, None, &b).await
}

/// An organisation's default notification channels.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/notifications", tag = "notifications",
    params(("org" = String, Path)),
    responses((status = 200, body = Vec<Channel>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_org_channels(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<Vec<Channel>>> {
    s.require_role(&caller, &org, Role::Guest, "notification.list", &org).await?;
    s.store.get_org(&org).await?;
    Ok(Json(views(&s, s.store.list_channels(&org, None).await?)))
}

/// Remove one of an organisation's default channels (Admin).
#[utoipa::path(delete, path = "/api/v1/orgs/{org}/notifications/{id}", tag = "notifications",
    params(("org" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_org_channel(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Admin, "notification.delete", &id).await?;
    let c = s.store.channel(&id).await?;
    if c.org != org || c.project.is_some() {
        return Err(ApiError::NotFound(format!("notification channel {id:?} is not a default channel of {org}")));
    }
    s.store.delete_channel(&id, &caller.audit("notification.delete", &id).org(&org)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a notification channel to a project (Admin). The URL and secret are stored encrypted.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/notifications", tag = "notifications",
    params(("org" = String, Path), ("project" = String, Path)), request_body = CreateChannel,
    responses((status = 201, body = Channel), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn create_channel(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    JsonBody(b): JsonBody<CreateChannel>,
) -> ApiResult<Response> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Admin, "notification.create", &target).await?;
    s.store.get_project(&org, &name).await?;
    add_channel(&s, &caller, &org, Some(&name), &b).await
}

/// A project's notification channels (URLs show scheme and host only).
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/notifications", tag = "notifications",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 200, body = Vec<Channel>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_channels(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Channel>>> {
    s.require_role(&caller, &org, Role::Guest, "notification.list", &format!("{org}/{name}")).await?;
    s.store.get_project(&org, &name).await?;
    Ok(Json(views(&s, s.store.list_channels(&org, Some(&name)).await?)))
}

async fn own_channel(s: &AppState, org: &str, name: &str, id: &str) -> ApiResult<StoredChannel> {
    let c = s.store.channel(id).await?;
    if c.org != org || c.project.as_deref() != Some(name) {
        return Err(ApiError::NotFound(format!("notification channel {id:?} is not one of {org}/{name}")));
    }
    Ok(c)
}

/// Remove a notification channel (Admin); what is still queued for it goes too.
#[utoipa::path(delete, path = "/api/v1/projects/{org}/{project}/notifications/{id}", tag = "notifications",
    params(("org" = String, Path), ("project" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_channel(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name, id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Admin, "notification.delete", &id).await?;
    own_channel(&s, &org, &name, &id).await?;
    s.store.delete_channel(&id, &caller.audit("notification.delete", &id).org(&org).project(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Send a sample notification through the project's channels that want it (Developer).
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/notifications/test", tag = "notifications",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 202), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn test_channels(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Developer, "notification.test", &format!("{org}/{name}")).await?;
    s.store.get_project(&org, &name).await?;
    let audit = caller.audit("notification.test", format!("{org}/{name}")).org(&org).project(&name);
    s.store.record_event(&audit, "ok").await?;
    s.changed();
    Ok(StatusCode::ACCEPTED)
}

/// The outbox: pending, in-flight, delivered and dead rows, failed attempts, the oldest pending age, per channel.
#[utoipa::path(get, path = "/api/admin/outbox/stats", tag = "notifications",
    responses((status = 200, description = "outbox figures"), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn outbox_stats(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    s.require_admin(&caller, "outbox.stats", "outbox").await?;
    let c = s.store.outbox_counts().await?;
    let by: Vec<serde_json::Value> =
        c.by_channel.iter().map(|(id, p, d)| serde_json::json!({"channel": id, "pending": p, "dead": d})).collect();
    Ok(Json(serde_json::json!({
        "pending": c.pending, "in_flight": s.gauges.outbox_in_flight.get(), "delivered": c.delivered, "failed_attempts": c.failed_attempts,
        "dead": c.dead, "oldest_pending_secs": c.oldest_pending_secs, "by_destination": by,
    })))
}

/// The dead-letter queue in figures: how many, the oldest, by destination and reason.
#[utoipa::path(get, path = "/api/admin/dlq/stats", tag = "notifications",
    responses((status = 200, description = "dead-letter figures"), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn dlq_stats(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    s.require_admin(&caller, "dlq.stats", "dlq").await?;
    let dead = s.store.dead_letters(10_000).await?;
    let mut by_dest: std::collections::BTreeMap<String, u64> = Default::default();
    let mut by_reason: std::collections::BTreeMap<String, u64> = Default::default();
    for d in &dead {
        *by_dest.entry(d.channel_id.clone()).or_default() += 1;
        *by_reason.entry(d.last_error.clone().unwrap_or_default()).or_default() += 1;
    }
    Ok(Json(serde_json::json!({
        "count": dead.len(),
        "oldest": dead.first().map(|d| d.created_at),
        "by_destination": by_dest,
        "by_reason": by_reason,
    })))
}

/// The dead letters, oldest first.
#[utoipa::path(get, path = "/api/admin/dlq", tag = "notifications",
    responses((status = 200, description = "dead letters"), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn dlq_list(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<serde_json::Value>>> {
    s.require_admin(&caller, "dlq.list", "dlq").await?;
    let rows = s.store.dead_letters(1000).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| {
                serde_json::json!({"id": r.id, "channel": r.channel_id, "event": r.event, "attempts": r.attempts,
                    "error": r.last_error, "created_at": r.created_at, "payload": r.payload})
            })
            .collect(),
    ))
}

/// Put every dead letter back in the queue.
#[utoipa::path(post, path = "/api/admin/dlq/retry", tag = "notifications",
    responses((status = 200, description = "how many were queued again"), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn dlq_retry_all(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    s.require_admin(&caller, "dlq.retry", "dlq").await?;
    let n = s.store.retry_dead(None).await?;
    s.changed();
    Ok(Json(serde_json::json!({"retried": n})))
}

/// Put one dead letter back in the queue.
#[utoipa::path(post, path = "/api/admin/dlq/{id}/retry", tag = "notifications", params(("id" = i64, Path)),
    responses((status = 200, description = "queued again"), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn dlq_retry(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> ApiResult<Json<serde_json::Value>> {
    s.require_admin(&caller, "dlq.retry", &id.to_string()).await?;
    if s.store.retry_dead(Some(id)).await? == 0 {
        return Err(ApiError::NotFound(format!("no dead letter {id}")));
    }
    s.changed();
    Ok(Json(serde_json::json!({"retried": 1})))
}

/// Drop a dead letter for good.
#[utoipa::path(delete, path = "/api/admin/dlq/{id}", tag = "notifications", params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn dlq_drop(State(s): State<AppState>, caller: Caller, Path(id): Path<i64>) -> ApiResult<StatusCode> {
    s.require_admin(&caller, "dlq.drop", &id.to_string()).await?;
    if !s.store.drop_dead(id).await? {
        return Err(ApiError::NotFound(format!("no dead letter {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
