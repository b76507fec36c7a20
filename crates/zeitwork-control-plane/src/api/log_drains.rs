//! An organisation's log drains (Admin): its app logs, build output and audit
//! events also go to a log service of its own. The destination and token are
//! stored encrypted and never shown again.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zeitwork_api_types::{CreateLogDrain, LogDrain, Role, ValidationError};
use zeitwork_store::{StoredLogDrain, LOG_DRAIN_SOURCES};
use zeitwork_telemetry::drain::{Reach, Target};

use crate::auth::Caller;
use crate::drain::{target_context, token_context};
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::AppState;

/// Longest CA PEM accepted.
const MAX_CA: usize = 64 * 1024;

fn view(d: &StoredLogDrain, shown: String) -> LogDrain {
    LogDrain {
        id: d.id.clone(),
        org: d.org.clone(),
        kind: d.kind.clone(),
        url: shown,
        has_token: d.token_enc.is_some(),
        has_ca: d.ca.is_some(),
        sources: d.sources.clone(),
        created_at: d.created_at,
    }
}

fn shown(s: &AppState, d: &StoredLogDrain) -> String {
    s.cipher
        .decrypt(&target_context(&d.id), &d.target_enc)
        .ok()
        .and_then(|u| Target::parse(&u).ok())
        .map_or_else(|| "…".into(), |t| t.shown())
}

/// The target, sources and CA of a new drain, checked.
fn check(b: &CreateLogDrain) -> Result<(Target, Vec<String>), ValidationError> {
    let target = Target::parse(b.url.trim()).map_err(|e| ValidationError::new("url", e))?;
    if let Some(t) = &b.token {
        if t.is_empty() || t.len() > 4096 || t.chars().any(char::is_control) {
            return Err(ValidationError::new("token", "give 1 to 4096 characters without control characters"));
        }
        if !matches!(target, Target::Http { .. }) {
            return Err(ValidationError::new("token", "only HTTP drains send a token; syslog drains take none"));
        }
    }
    if let Some(ca) = &b.ca {
        if ca.len() > MAX_CA {
            return Err(ValidationError::new("ca", format!("at most {MAX_CA} bytes of PEM")));
        }
        zeitwork_telemetry::drain::pem_roots(ca).map_err(|e| ValidationError::new("ca", e))?;
    }
    let mut sources = Vec::new();
    for src in &b.sources {
        if !LOG_DRAIN_SOURCES.contains(&src.as_str()) {
            return Err(ValidationError::new(
                "sources",
                format!("{src:?} is not a source; use {}", LOG_DRAIN_SOURCES.join(", ")),
            ));
        }
        if !sources.contains(src) {
            sources.push(src.clone());
        }
    }
    if sources.is_empty() {
        sources = LOG_DRAIN_SOURCES.iter().map(|s| s.to_string()).collect();
    }
    Ok((target, sources))
}

/// Refuses a destination that is, or resolves to, an address inside the
/// platform's networks (loopback, link-local, private, …) unless the operator
/// allows its network. A name that does not resolve now is accepted: the
/// senders check what it resolves to each time they send.
async fn reachable(s: &AppState, target: &Target) -> Result<(), ValidationError> {
    use zeitwork_telemetry::drain::reach::ResolveError;
    let Some((host, port)) = target.host_port() else { return Ok(()) };
    let reach = Reach::new(&s.config.drain_allowed_networks).map_err(|e| ValidationError::new("url", e))?;
    match reach.resolve(&host, port).await {
        Ok(_) | Err(ResolveError::Unresolved(_)) => Ok(()),
        Err(ResolveError::Refused(why)) => Err(ValidationError::new(
            "url",
            format!(
                "{why}; log drains go to receivers with public addresses \
                 (an operator may allow an internal network with drain_allowed_networks)"
            ),
        )),
    }
}

/// Add a log drain to an organisation (Admin): its app logs, build output and/or audit
/// events also go there. The URL and token are stored encrypted and shown redacted.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/log-drains", tag = "orgs",
    params(("org" = String, Path)), request_body = CreateLogDrain,
    responses((status = 201, body = LogDrain), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn create_log_drain(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(b): JsonBody<CreateLogDrain>,
) -> ApiResult<Response> {
    s.require_role(&caller, &org, Role::Admin, "log_drain.create", &org).await?;
    s.store.get_org(&org).await?;
    let (target, sources) = check(&b)?;
    reachable(&s, &target).await?;
    let id = zeitwork_store::log_drain_id();
    let stored = StoredLogDrain {
        id: id.clone(),
        org: org.clone(),
        kind: target.kind().into(),
        target_enc: s.cipher.encrypt(&target_context(&id), b.url.trim()),
        token_enc: b.token.as_ref().map(|t| s.cipher.encrypt(&token_context(&id), t)),
        ca: b.ca.clone(),
        sources,
        created_at: chrono::Utc::now(),
    };
    let audit = caller
        .audit("log_drain.create", &id)
        .org(&org)
        .detail(serde_json::json!({"kind": stored.kind, "sources": stored.sources}));
    let d = s.store.create_log_drain(&stored, &audit).await?;
    s.changed();
    Ok((StatusCode::CREATED, Json(view(&d, target.shown()))).into_response())
}

/// An organisation's log drains, their destinations redacted (Admin).
#[utoipa::path(get, path = "/api/v1/orgs/{org}/log-drains", tag = "orgs",
    params(("org" = String, Path)),
    responses((status = 200, body = Vec<LogDrain>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_log_drains(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<Vec<LogDrain>>> {
    s.require_role(&caller, &org, Role::Admin, "log_drain.list", &org).await?;
    s.store.get_org(&org).await?;
    let drains = s.store.list_log_drains(Some(&org)).await?;
    Ok(Json(drains.iter().map(|d| view(d, shown(&s, d))).collect()))
}

/// Remove one of an organisation's log drains (Admin).
#[utoipa::path(delete, path = "/api/v1/orgs/{org}/log-drains/{id}", tag = "orgs",
    params(("org" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_log_drain(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Admin, "log_drain.delete", &id).await?;
    s.store.delete_log_drain(&org, &id, &caller.audit("log_drain.delete", &id).org(&org)).await?;
    s.changed();
    Ok(StatusCode::NO_CONTENT)
}
