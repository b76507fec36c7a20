//! Organisations, their members, API tokens and the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use zeitwork_api_types::validate::{self, ValidationError};
use zeitwork_api_types::{
    AddMember, CreateOrg, CreateToken, CreatedToken, Event, Member, Org, RemoveMember, Role, Token, TokenScope,
};
use zeitwork_store::EventFilter;

use super::{created, listing, page};
use crate::auth::{mint, Caller};
use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, JsonBody, PageQuery, QueryParams};
use crate::AppState;

/// List the organisations the token can see.
#[utoipa::path(get, path = "/api/v1/orgs", tag = "orgs", params(PageQuery), responses((status = 200, body = Vec<Org>)))]
pub async fn list_orgs(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Response> {
    let visible = caller.visible_orgs();
    Ok(listing(s.store.list_orgs(visible.as_deref(), &page(q.limit, q.cursor)?).await?))
}

/// Create an organisation (platform admin).
#[utoipa::path(post, path = "/api/v1/orgs", tag = "orgs", request_body = CreateOrg,
    responses((status = 201, body = Org), (status = 400, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn create_org(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateOrg>,
) -> ApiResult<Response> {
    s.require_admin(&caller, "org.create", &body.slug).await?;
    body.validate()?;
    let name = body.name.clone().unwrap_or_else(|| body.slug.clone());
    let audit = caller.audit("org.create", &body.slug).org(&body.slug);
    Ok(created(s.store.create_org(&body.slug, &name, body.owner.as_deref(), &audit).await?))
}

/// Show an organisation.
#[utoipa::path(get, path = "/api/v1/orgs/{org}", tag = "orgs", params(("org" = String, Path)),
    responses((status = 200, body = Org), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_org(State(s): State<AppState>, caller: Caller, Path(org): Path<String>) -> ApiResult<Json<Org>> {
    s.require_role(&caller, &org, Role::Guest, "org.show", &org).await?;
    Ok(Json(s.store.get_org(&org).await?))
}

/// List members of an organisation.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/members", tag = "orgs", params(("org" = String, Path)),
    responses((status = 200, body = Vec<Member>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn list_members(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<Vec<Member>>> {
    s.require_role(&caller, &org, Role::Guest, "member.list", &org).await?;
    Ok(Json(s.store.list_members(&org).await?))
}

/// Add a member or change their role (Admin; only an Owner grants or revokes Owner).
#[utoipa::path(post, path = "/api/v1/orgs/{org}/members", tag = "orgs", params(("org" = String, Path)), request_body = AddMember,
    responses((status = 201, body = Member), (status = 200, body = Member), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn add_member(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(body): JsonBody<AddMember>,
) -> ApiResult<Response> {
    let target = format!("{org}/{}", body.user);
    let mine = s.require_role(&caller, &org, Role::Admin, "member.add", &target).await?;
    validate::member_user("user", &body.user)?;
    let current = s.store.get_member_role(&org, &body.user).await?;
    if (body.role == Role::Owner || current == Some(Role::Owner)) && mine < Role::Owner {
        return s
            .deny(&caller, "member.add", &target, Some(&org), "only an Owner can grant or change the Owner role")
            .await;
    }
    let audit = caller.audit("member.add", &target).org(&org).detail(serde_json::json!({"role": body.role}));
    let (member, new) = s.store.put_member(&org, &body.user, body.role, &audit).await?;
    Ok(if new { created(member) } else { Json(member).into_response() })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MemberQuery {
    /// The member to remove (or send `{"user": …}` as the body).
    user: Option<String>,
}

/// Remove a member (Admin; only an Owner removes an Owner). The user comes
/// from `?user=` or a `{"user": …}` body.
#[utoipa::path(delete, path = "/api/v1/orgs/{org}/members", tag = "orgs", params(("org" = String, Path), MemberQuery),
    request_body(content = RemoveMember, description = "alternative to ?user="),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn remove_member(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    QueryParams(q): QueryParams<MemberQuery>,
    body: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    let user = match q.user {
        Some(u) => u,
        None if !body.is_empty() => parse_json::<RemoveMember>(&body)?.user,
        None => {
            return Err(ValidationError::new("user", "name the member to remove with ?user= or {\"user\": …}").into())
        }
    };
    let target = format!("{org}/{user}");
    let mine = s.require_role(&caller, &org, Role::Admin, "member.remove", &target).await?;
    if s.store.get_member_role(&org, &user).await? == Some(Role::Owner) && mine < Role::Owner {
        return s.deny(&caller, "member.remove", &target, Some(&org), "only an Owner can remove an Owner").await;
    }
    s.store.remove_member(&org, &user, &caller.audit("member.remove", &target).org(&org)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    /// Only tokens of this organisation.
    org: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// List tokens: all for platform admins, an org's for its Admins. Secrets are never listed.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", params(TokenQuery), responses((status = 200, body = Vec<Token>)))]
pub async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<TokenQuery>,
) -> ApiResult<Response> {
    let org = match (&caller.scope, q.org) {
        (TokenScope::Admin, org) => org,
        (TokenScope::Org { org, .. }, _) => {
            s.require_role(&caller, &org.clone(), Role::Admin, "token.list", org).await?;
            Some(org.clone())
        }
        _ => return s.deny(&caller, "token.list", "tokens", None, "cluster tokens cannot list tokens").await,
    };
    Ok(listing(s.store.list_tokens(org.as_deref(), &page(q.limit, q.cursor)?).await?))
}

/// Create a token. Platform admins create any; an org Admin creates tokens
/// for their org with at most their own role. The secret is shown only here.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateToken>,
) -> ApiResult<Response> {
    body.validate()?;
    let target = body.name.clone();
    match &body.scope {
        TokenScope::Org { org, role } => {
            let mine = s.require_role(&caller, org, Role::Admin, "token.create", &target).await?;
            if *role > mine {
                return s
                    .deny(
                        &caller,
                        "token.create",
                        &target,
                        Some(org),
                        "a token cannot have a higher role than its creator",
                    )
                    .await;
            }
            s.store.get_org(org).await?;
        }
        TokenScope::Admin | TokenScope::Cluster { .. } => s.require_admin(&caller, "token.create", &target).await?,
    }
    let minted = mint(&body.name, body.scope.clone(), body.read_only, Some(caller.actor()), body.expires_in_days);
    let mut audit = caller.audit("token.create", &minted.stored.token.id);
    if let TokenScope::Org { org, .. } = &body.scope {
        audit = audit.org(org);
    }
    s.store.create_token(&minted.stored, &audit).await?;
    Ok(created(CreatedToken { token: minted.stored.token, secret: minted.bearer }))
}

/// Revoke a token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_token(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let stored = s.store.get_token(&id).await.map_err(ApiError::from)?;
    let mut audit = caller.audit("token.delete", &id);
    match &stored.token.scope {
        TokenScope::Org { org, .. } if !caller.is_admin() => {
            s.require_role(&caller, org, Role::Admin, "token.delete", &id).await?;
            audit = audit.org(org);
        }
        _ => s.require_admin(&caller, "token.delete", &id).await?,
    }
    s.store.delete_token(&id, &audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    org: Option<String>,
    project: Option<String>,
    /// e.g. `project.create`.
    action: Option<String>,
    /// `ok` or `denied`.
    result: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The audit log, newest first: all of it for platform admins, an org's for its members.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventQuery), responses((status = 200, body = Vec<Event>)))]
pub async fn list_events(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<EventQuery>,
) -> ApiResult<Response> {
    if let Some(org) = &q.org {
        s.require_role(&caller, org, Role::Guest, "event.list", org).await?;
    } else if !caller.is_admin() && caller.visible_orgs().is_some_and(|v| v.is_empty()) {
        return s.deny(&caller, "event.list", "events", None, "cluster tokens cannot read the audit log").await;
    }
    let filter = EventFilter {
        org: q.org,
        orgs_visible: caller.visible_orgs(),
        project: q.project,
        action: q.action,
        result: q.result,
    };
    Ok(listing(s.store.list_events(&filter, &page(q.limit, q.cursor)?).await?))
}
