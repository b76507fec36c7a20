//! HTTP routes of the operator. Each handler checks who may call it, validates
//! its input, and calls the store; the OpenAPI document is generated from the
//! same annotations the router is built from, so the two cannot drift.

pub(crate) mod analytics;
mod assignments;
pub(crate) mod builds;
pub(crate) mod checks;
mod cluster;
mod github;
pub use github::token_context as github_token_context;
mod health;
pub(crate) mod images;
mod log_drains;
pub(crate) mod logs;
mod notifications;
pub use notifications::SLACK_BOT;
mod orgs;
mod projects;
mod releases;
mod routing;
pub(crate) mod stream;
mod tls;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use zeitwork_store::{Listing, Page};

use crate::error::ApiError;
use crate::AppState;

pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;

#[derive(OpenApi)]
#[openapi(
    info(title = "Zeitwork operator API", description = "Run container images as isolated microVMs and serve them on the web."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(zeitwork_api_types::ApiError))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(health::healthz))
        .routes(routes!(health::ready))
        .routes(routes!(health::startup))
        .routes(routes!(health::version))
        .routes(routes!(cluster::list_regions, cluster::create_region))
        .routes(routes!(cluster::get_region, cluster::delete_region))
        .routes(routes!(cluster::list_nodes, cluster::register_node))
        .routes(routes!(cluster::get_node, cluster::delete_node))
        .routes(routes!(cluster::node_heartbeat))
        .routes(routes!(cluster::drain_node))
        .routes(routes!(cluster::approve_node))
        .routes(routes!(cluster::reject_node))
        .routes(routes!(cluster::list_edges))
        .routes(routes!(cluster::edge_heartbeat))
        .routes(routes!(orgs::list_orgs, orgs::create_org))
        .routes(routes!(orgs::get_org))
        .routes(routes!(orgs::list_members, orgs::add_member, orgs::remove_member))
        .routes(routes!(orgs::list_tokens, orgs::create_token))
        .routes(routes!(orgs::delete_token))
        .routes(routes!(orgs::list_events))
        .routes(routes!(log_drains::create_log_drain, log_drains::list_log_drains))
        .routes(routes!(log_drains::delete_log_drain))
        .routes(routes!(github::create_hook))
        .routes(routes!(github::list_deliveries))
        .routes(routes!(github::receive))
        .routes(routes!(github::trigger))
        .routes(routes!(stream::event_stream))
        .routes(routes!(stream::sse_stats))
        .routes(routes!(projects::list_projects, projects::create_project))
        .routes(routes!(projects::get_project, projects::patch_project, projects::delete_project))
        .routes(routes!(projects::list_env, projects::replace_env))
        .routes(routes!(projects::put_env, projects::delete_env))
        .routes(routes!(projects::list_domains, projects::create_domain))
        .routes(routes!(projects::delete_domain))
        .routes(routes!(projects::list_deployments, projects::create_deployment))
        .routes(routes!(projects::get_deployment, projects::delete_deployment))
        .routes(routes!(projects::wake_deployment))
        .routes(routes!(projects::sleep_deployment))
        .routes(routes!(routing::report_activity))
        .routes(routes!(releases::report_traffic))
        .routes(routes!(releases::get_rollout))
        .routes(routes!(releases::promote_rollout))
        .routes(routes!(releases::abort_rollout))
        .routes(routes!(cluster::cluster_state))
        .routes(routes!(analytics::frequency))
        .routes(routes!(analytics::duration))
        .routes(routes!(analytics::success_rate))
        .routes(routes!(analytics::resources_by_org))
        .routes(routes!(notifications::create_channel, notifications::list_channels))
        .routes(routes!(notifications::delete_channel))
        .routes(routes!(notifications::create_org_channel, notifications::list_org_channels))
        .routes(routes!(notifications::delete_org_channel))
        .routes(routes!(notifications::create_platform_channel, notifications::list_platform_channels))
        .routes(routes!(notifications::delete_platform_channel))
        .routes(routes!(notifications::test_channels))
        .routes(routes!(notifications::outbox_stats))
        .routes(routes!(notifications::dlq_stats))
        .routes(routes!(notifications::dlq_list))
        .routes(routes!(notifications::dlq_retry_all))
        .routes(routes!(notifications::dlq_retry))
        .routes(routes!(notifications::dlq_drop))
        .routes(routes!(projects::list_project_deployments))
        .routes(routes!(projects::current_deployment))
        .routes(routes!(projects::rollback))
        .routes(routes!(projects::promote))
        .routes(routes!(projects::deployment_instances))
        .routes(routes!(logs::deployment_logs))
        .routes(routes!(logs::deployment_metrics))
        .routes(routes!(projects::stop_deployment))
        .routes(routes!(projects::project_routing))
        .routes(routes!(projects::project_health))
        .routes(routes!(images::upload_image))
        .routes(routes!(checks::list_checks, checks::create_check))
        .routes(routes!(checks::get_check, checks::patch_check, checks::delete_check))
        .routes(routes!(checks::samples))
        .routes(routes!(builds::upload_source))
        .routes(routes!(builds::get_build))
        .routes(routes!(builds::build_log))
        .routes(routes!(builds::claim_build))
        .routes(routes!(builds::build_source))
        .routes(routes!(builds::report_build_log))
        .routes(routes!(builds::build_image))
        .routes(routes!(builds::build_failed))
        .routes(routes!(routing::routing_table))
        .routes(routes!(routing::watch_routing))
        .routes(routes!(routing::routing_deltas))
        .routes(routes!(routing::report_instance))
        .routes(routes!(assignments::node_assignments))
        .routes(routes!(assignments::node_snapshots))
        .routes(routes!(routing::whoami))
        .routes(routes!(tls::verify_domain))
        .routes(routes!(tls::list_certificates))
        .routes(routes!(tls::lease_certificate))
        .routes(routes!(tls::put_certificate))
        .routes(routes!(tls::put_challenge, tls::delete_challenge))
        .routes(routes!(tls::find_challenge))
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The OpenAPI document as committed in the repository (pretty JSON).
pub fn openapi_json() -> String {
    let mut s = openapi().to_pretty_json().expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

/// The operator's HTTP surface: the API, and the web console at `/` that renders from it.
pub fn router(state: AppState) -> Router {
    let api = api_app(state.clone());
    crate::console::router(state, api.clone()).merge(api)
}

fn api_app(state: AppState) -> Router {
    let (routes, doc) = api_router().split_for_parts();
    let doc = std::sync::Arc::new(doc);
    let metrics = state.metrics.clone();
    let max_body = state.config.max_body_bytes;
    routes
        .route(
            "/api/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route("/metrics", get(scrape))
        .route("/v2/", get(images::registry_root))
        .route("/v2/{org}/{name}/manifests/{reference}", get(images::registry_manifest).head(images::registry_manifest))
        .route("/v2/{org}/{name}/blobs/{digest}", get(images::registry_blob))
        .fallback(|| async { ApiError::NotFound("no such route; the API is described at /api/v1/openapi.json".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(link_next_page))
        .layer(axum::middleware::from_fn_with_state(state.config.clone(), refuse_declared_oversize))
        .layer(axum::middleware::from_fn_with_state(metrics, zeitwork_telemetry::track))
        .with_state(state)
}

/// `GET /metrics`: for Prometheus with the configured `metrics_token`, or a platform admin.
async fn scrape(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Response {
    let allowed = match (&state.config.metrics_token, zeitwork_telemetry::presented_bearer(&headers)) {
        (_, None) => false,
        (Some(t), Some(_)) if zeitwork_telemetry::bearer_is(&headers, t) => true,
        (_, Some(bearer)) => state.authenticate(bearer).await.is_ok_and(|c| c.is_admin()),
    };
    if allowed {
        return zeitwork_telemetry::metrics_handler(axum::extract::State(state.metrics.clone())).await;
    }
    if zeitwork_telemetry::presented_bearer(&headers).is_some() {
        return ApiError::Forbidden("this token may not read metrics; use the metrics token or an admin token".into())
            .into_response();
    }
    let mut res =
        ApiError::Unauthorized("metrics need the metrics token or an admin token (Authorization: Bearer …)".into())
            .into_response();
    res.headers_mut()
        .insert(axum::http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"metrics\""));
    res
}

/// A list answer with more pages gets `Link: <…?cursor=…>; rel="next"` (RFC 8288)
/// next to `X-Next-Cursor`: the request's own path and query with the cursor replaced.
async fn link_next_page(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri().clone();
    let mut res = next.run(req).await;
    let Some(cursor) = res.headers().get("x-next-cursor").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return res;
    };
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .filter(|(k, _)| k != "cursor")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.push(("cursor".into(), cursor));
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    if let Ok(v) = HeaderValue::from_str(&format!("<{}?{query}>; rel=\"next\"", uri.path())) {
        res.headers_mut().insert(axum::http::header::LINK, v);
    }
    res
}

/// Answers 413 at once to a request whose declared `Content-Length` is over
/// the limit, before a byte of its body is read (uploads have their own, larger one).
async fn refuse_declared_oversize(
    axum::extract::State(config): axum::extract::State<std::sync::Arc<crate::OperatorConfig>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let path = req.uri().path();
    let limit = if path.ends_with("/images") || path.ends_with("/image") {
        config.max_archive_bytes
    } else if path.ends_with("/sources") {
        config.max_source_bytes
    } else {
        config.max_body_bytes as u64
    };
    match declared {
        Some(n) if n > limit => {
            let m = format!("the body declares {n} bytes, larger than the {limit} bytes this route takes");
            let mut res = ApiError::TooLarge(m).into_response();
            // The body is left unread, so the connection cannot carry another
            // request: saying so keeps the client from sending one on it.
            res.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            res
        }
        _ => next.run(req).await,
    }
}

/// Turns `?limit=&cursor=` into a store page.
pub fn page(limit: Option<u32>, cursor: Option<String>) -> Result<Page, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::InvalidQuery(format!("limit: {limit} is out of range; use 1 to {MAX_PAGE}")));
    }
    if cursor.as_ref().is_some_and(|c| c.is_empty() || c.len() > 512) {
        return Err(ApiError::InvalidQuery("cursor: not a cursor this list returned".into()));
    }
    Ok(Page { limit, cursor })
}

/// A list response: a JSON array, and `X-Next-Cursor` when more items follow.
pub fn listing<T: Serialize>(l: Listing<T>) -> Response {
    let mut res = Json(l.items).into_response();
    if let Some(c) = l.next_cursor {
        if let Ok(v) = HeaderValue::from_str(&c) {
            res.headers_mut().insert("x-next-cursor", v);
        }
    }
    res
}

pub fn created<T: Serialize>(body: T) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_openapi_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let generated = super::openapi_json();
        if std::env::var_os("ZEITWORK_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is out of date; run `ZEITWORK_UPDATE_OPENAPI=1 cargo test -p zeitwork-control-plane openapi` and commit it"
        );
    }
}
