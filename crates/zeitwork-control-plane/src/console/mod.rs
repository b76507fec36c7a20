//! The web console, served by every operator at `/`: server-rendered pages
//! (maud, escaped by construction) and one small script of our own for
//! actions and live updates. Nothing is loaded from elsewhere.
//!
//! Pages are rendered from the operator's own API, called in-process as the
//! signed-in caller, so what a page shows is exactly what that caller's token
//! may read; actions are `fetch` calls to the same API with the session cookie
//! and its CSRF token, so what may be done is decided where it always is. The
//! console must not read the store for things the API guards.

mod github;
mod pages;
pub mod session;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tower::ServiceExt;

use crate::auth::Caller;
use crate::AppState;
use session::{InternalCaller, Session};

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// What console handlers reach: the operator's state and its API to render from.
#[derive(Clone)]
pub struct Console {
    state: AppState,
    api: Router,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// A failed API read, as a page shows it.
#[derive(Debug, Clone)]
pub struct ReadError {
    pub status: StatusCode,
    pub message: String,
}

impl Console {
    /// `GET path` of the API as `caller`, decoded.
    async fn get<T: DeserializeOwned>(&self, caller: &Caller, path: &str) -> Result<T, ReadError> {
        let mut req = Request::get(path).body(Body::empty()).map_err(|e| ReadError {
            status: StatusCode::BAD_REQUEST,
            message: format!("not a path of the API: {e}"),
        })?;
        req.extensions_mut().insert(InternalCaller(caller.clone()));
        let res = self.api.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20).await.map_err(|e| ReadError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("cannot read the API's answer: {e}"),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<zeitwork_api_types::ApiError>(&bytes)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| format!("the API answered {status}"));
            return Err(ReadError { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| ReadError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("cannot decode the API's answer to {path}: {e}"),
        })
    }
}

/// The console's routes, to be merged with the API's.
pub fn router(state: AppState, api: Router) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/auth/github", get(github::start))
        .route("/auth/github/callback", get(github::callback))
        .route("/projects/{org}/{project}", get(project))
        .route("/projects/{org}/{project}/env", get(env_vars))
        .route("/projects/{org}/{project}/domains", get(domains))
        .route("/deployments/{id}", get(deployment))
        .route("/audit", get(audit))
        .route("/settings", get(settings))
        .route("/console/console.css", get(|| async { asset(CSS, "text/css; charset=utf-8") }))
        .route("/console/console.js", get(|| async { asset(JS, "text/javascript; charset=utf-8") }))
        .with_state(Console { state, api })
}

/// A short fingerprint of the assets, so pages can let browsers cache them for good.
pub fn asset_version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(CSS);
        h.update(JS);
        hex::encode(&h.finalize()[..6])
    })
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An HTML page with the console's security headers.
pub(crate) fn html(status: StatusCode, markup: maud::Markup) -> Response {
    let mut res = (status, markup.into_string()).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The signed-in session, or the way to the sign-in page.
async fn signed_in(c: &Console, headers: &HeaderMap) -> Result<Session, Response> {
    match session::find(&c.state, headers).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => {
            let to = if session::cookie(headers, session::COOKIE).is_some() { "/sign-in?ended=1" } else { "/sign-in" };
            Err(Redirect::to(to).into_response())
        }
        Err(e) => Err(e.into_response()),
    }
}

fn error_page(s: &Session, e: ReadError) -> Response {
    html(e.status, pages::error(s, &e))
}

async fn overview(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let caller = &s.caller;
    // Only platform admins may list nodes; asking for others would fill the audit log with denials.
    let nodes = async {
        if caller.is_admin() {
            c.get::<Vec<zeitwork_api_types::Node>>(caller, "/api/v1/nodes?limit=1000").await.ok()
        } else {
            None
        }
    };
    let (orgs, projects, deployments, nodes, regions) = tokio::join!(
        c.get::<Vec<zeitwork_api_types::Org>>(caller, "/api/v1/orgs"),
        c.get::<Vec<zeitwork_api_types::Project>>(caller, "/api/v1/projects?limit=200"),
        c.get::<Vec<zeitwork_api_types::Deployment>>(caller, "/api/v1/deployments?limit=20"),
        nodes,
        c.get::<Vec<zeitwork_api_types::Region>>(caller, "/api/v1/regions"),
    );
    let data = pages::Overview {
        orgs: orgs.unwrap_or_default(),
        projects: projects.unwrap_or_default(),
        deployments: deployments.unwrap_or_default(),
        nodes,
        regions: regions.unwrap_or_default(),
    };
    html(StatusCode::OK, pages::overview(&s, &data))
}

async fn project(State(c): State<Console>, headers: HeaderMap, Path((org, name)): Path<(String, String)>) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let base = format!("/api/v1/projects/{}/{}", enc(&org), enc(&name));
    let p = match c.get::<zeitwork_api_types::Project>(&s.caller, &base).await {
        Ok(p) => p,
        Err(e) => return error_page(&s, e),
    };
    let (health_path, routes_path, history_path) =
        (format!("{base}/health"), format!("{base}/routing"), format!("{base}/deployments?limit=50"));
    let channels_path = format!("{base}/notifications");
    let checks_path = format!("{base}/health-checks");
    let (health, routes, history, channels, checks) = tokio::join!(
        c.get::<Vec<zeitwork_api_types::EnvironmentHealth>>(&s.caller, &health_path),
        c.get::<Vec<zeitwork_api_types::ProjectRoute>>(&s.caller, &routes_path),
        c.get::<Vec<zeitwork_api_types::Deployment>>(&s.caller, &history_path),
        c.get::<Vec<zeitwork_api_types::Channel>>(&s.caller, &channels_path),
        c.get::<Vec<zeitwork_api_types::HealthCheck>>(&s.caller, &checks_path),
    );
    let config = &c.state.config;
    let url_port = match (config.apps_scheme.as_str(), config.apps_port) {
        (_, None) | ("http", Some(80)) | ("https", Some(443)) => String::new(),
        (_, Some(port)) => format!(":{port}"),
    };
    let data = pages::ProjectPage {
        cname: format!("{}-{}.{}", p.name, p.org, config.apps_domain),
        url_scheme: format!("{}://", config.apps_scheme),
        url_port,
        project: p,
        health: health.unwrap_or_default(),
        routes: routes.unwrap_or_default(),
        history: history.unwrap_or_default(),
        channels: channels.ok(),
        checks: checks.ok(),
    };
    html(StatusCode::OK, pages::project(&s, &data))
}

async fn env_vars(State(c): State<Console>, headers: HeaderMap, Path((org, name)): Path<(String, String)>) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let path = format!("/api/v1/projects/{}/{}/env", enc(&org), enc(&name));
    match c.get::<Vec<zeitwork_api_types::EnvVar>>(&s.caller, &path).await {
        Ok(vars) => html(StatusCode::OK, pages::env_vars(&s, &org, &name, &vars)),
        Err(e) => error_page(&s, e),
    }
}

async fn domains(State(c): State<Console>, headers: HeaderMap, Path((org, name)): Path<(String, String)>) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let path = format!("/api/v1/projects/{}/{}/domains", enc(&org), enc(&name));
    match c.get::<Vec<zeitwork_api_types::Domain>>(&s.caller, &path).await {
        Ok(list) => {
            let cname = format!("{name}-{org}.{}", c.state.config.apps_domain);
            html(StatusCode::OK, pages::domains(&s, &org, &name, &cname, &list))
        }
        Err(e) => error_page(&s, e),
    }
}

async fn deployment(State(c): State<Console>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let base = format!("/api/v1/deployments/{}", enc(&id));
    let d = match c.get::<zeitwork_api_types::Deployment>(&s.caller, &base).await {
        Ok(d) => d,
        Err(e) => return error_page(&s, e),
    };
    let events_path = format!("/api/v1/events?org={}&project={}&limit=200", enc(&d.org), enc(&d.project));
    let project_path = format!("/api/v1/projects/{}/{}", enc(&d.org), enc(&d.project));
    let (instances_path, build_path) = (format!("{base}/instances"), format!("{base}/build"));
    let (instances, events, project, build) = tokio::join!(
        c.get::<Vec<zeitwork_api_types::Instance>>(&s.caller, &instances_path),
        c.get::<Vec<zeitwork_api_types::Event>>(&s.caller, &events_path),
        c.get::<zeitwork_api_types::Project>(&s.caller, &project_path),
        // 404 for a deployment of a ready-made image: it had no build.
        c.get::<zeitwork_api_types::Build>(&s.caller, &build_path),
    );
    let events = events.unwrap_or_default().into_iter().filter(|e| e.target == d.id).collect();
    let data = pages::DeploymentPage {
        instances: instances.unwrap_or_default(),
        events,
        serving: project.map(|p| p.current_deployment).unwrap_or_default(),
        build: build.ok(),
        deployment: d,
    };
    html(StatusCode::OK, pages::deployment(&s, &data))
}

/// Filters of the audit log page (the API's own query parameters).
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct AuditFilter {
    #[serde(default, skip_serializing_if = "blank")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub result: Option<String>,
}

fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(str::is_empty)
}

async fn audit(State(c): State<Console>, headers: HeaderMap, Query(f): Query<AuditFilter>) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let q = serde_urlencoded::to_string(&f).unwrap_or_default();
    let path =
        if q.is_empty() { "/api/v1/events?limit=200".to_owned() } else { format!("/api/v1/events?{q}&limit=200") };
    let events = c.get::<Vec<zeitwork_api_types::Event>>(&s.caller, &path).await;
    html(if events.is_ok() { StatusCode::OK } else { StatusCode::BAD_REQUEST }, pages::audit(&s, &f, events))
}

async fn settings(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match signed_in(&c, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let orgs = c.get::<Vec<zeitwork_api_types::Org>>(&s.caller, "/api/v1/orgs").await.unwrap_or_default();
    let mut members = Vec::new();
    for o in &orgs {
        let path = format!("/api/v1/orgs/{}/members", enc(&o.slug));
        members.push((o.slug.clone(), c.get::<Vec<zeitwork_api_types::Member>>(&s.caller, &path).await));
    }
    // Tokens are listed for platform admins and org Admins only; others are not asked (no denial to record).
    let lists_tokens = match &s.caller.scope {
        zeitwork_api_types::TokenScope::Admin => true,
        zeitwork_api_types::TokenScope::Org { role, .. } => *role >= zeitwork_api_types::Role::Admin,
        zeitwork_api_types::TokenScope::Cluster { .. } => false,
    };
    let tokens = if lists_tokens {
        c.get::<Vec<zeitwork_api_types::Token>>(&s.caller, "/api/v1/tokens?limit=1000").await
    } else {
        Err(ReadError { status: StatusCode::FORBIDDEN, message: "Tokens are shown to Admins.".into() })
    };
    html(StatusCode::OK, pages::settings(&s, &members, tokens))
}

/// Percent-encodes one path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

// ------------------------------------------------------------------ sign-in

#[derive(Debug, serde::Deserialize)]
struct SignInQuery {
    ended: Option<String>,
    error: Option<String>,
}

async fn sign_in_page(State(c): State<Console>, headers: HeaderMap, Query(q): Query<SignInQuery>) -> Response {
    if let Ok(Some(_)) = session::find(&c.state, &headers).await {
        return Redirect::to("/").into_response();
    }
    let message = if q.ended.is_some() {
        Some("Your session has ended. Sign in again.".to_owned())
    } else {
        q.error.map(|e| match e.as_str() {
            "github" => "GitHub sign-in failed; try again or use a token.".to_owned(),
            "github-role" => "Your GitHub account is in no organisation that has access here.".to_owned(),
            _ => "Sign-in failed.".to_owned(),
        })
    };
    sign_in_form(&c, &headers, StatusCode::OK, message.as_deref())
}

fn sign_in_form(c: &Console, headers: &HeaderMap, status: StatusCode, message: Option<&str>) -> Response {
    let nonce = session::random_secret();
    let mut res = html(status, pages::sign_in(&nonce, message, c.state.config.github_oauth.is_some()));
    let cookie = session::set_cookie(session::LOGIN_COOKIE, &nonce, 3600, session::over_tls(headers));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[derive(Debug, serde::Deserialize)]
struct SignInForm {
    token: String,
    csrf: String,
}

/// A form body (`application/x-www-form-urlencoded`).
fn form<T: DeserializeOwned>(body: &Bytes) -> Result<T, crate::error::ApiError> {
    serde_urlencoded::from_bytes(body)
        .map_err(|e| crate::error::ApiError::InvalidBody(format!("the form is incomplete: {e}")))
}

async fn sign_in(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let f: SignInForm = match form(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let paired = session::cookie(&headers, session::LOGIN_COOKIE).is_some_and(|v| session::equal(v, &f.csrf));
    if !paired {
        let msg = "The sign-in form expired or was sent from elsewhere. Try again.";
        return sign_in_form(&c, &headers, StatusCode::FORBIDDEN, Some(msg));
    }
    let caller = match c.state.authenticate(f.token.trim()).await {
        Ok(c) => c,
        Err(crate::error::ApiError::Unauthorized(m)) => {
            let msg = if m.contains("expired") {
                "That token has expired. Create a new one with `zeitwork tokens create`."
            } else {
                "That token is not valid. Check it and paste it again."
            };
            return sign_in_form(&c, &headers, StatusCode::UNAUTHORIZED, Some(msg));
        }
        Err(e) => return e.into_response(),
    };
    if matches!(caller.scope, zeitwork_api_types::TokenScope::Cluster { .. }) {
        let msg = "Machine tokens (node agents, edges, load balancers) cannot sign in to the console.";
        return sign_in_form(&c, &headers, StatusCode::FORBIDDEN, Some(msg));
    }
    session::sweep(&c.state).await;
    let opened = match session::open(&c.state, &caller.token_id, false).await {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let mut audit = caller.audit("console.sign_in", &caller.token_id);
    if let zeitwork_api_types::TokenScope::Org { org, .. } = &caller.scope {
        audit = audit.org(org);
    }
    if let Err(e) = c.state.store.record_event(&audit, "ok").await {
        tracing::warn!(error = %e, "could not record a console sign-in");
    }
    signed_in_response(&headers, &opened.secret, Redirect::to("/").into_response())
}

/// `res` with the session cookie set and the sign-in pairing cookie removed.
fn signed_in_response(headers: &HeaderMap, secret: &str, mut res: Response) -> Response {
    let tls = session::over_tls(headers);
    let max_age = session::LIFETIME.num_seconds();
    for cookie in [
        session::set_cookie(session::COOKIE, secret, max_age, tls),
        session::set_cookie(session::LOGIN_COOKIE, "", 0, tls),
    ] {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

#[derive(Debug, serde::Deserialize)]
struct SignOutForm {
    csrf: String,
}

async fn sign_out(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let f: SignOutForm = match form(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let Ok(Some(s)) = session::find(&c.state, &headers).await else {
        return Redirect::to("/sign-in").into_response();
    };
    if !session::equal(&f.csrf, &s.csrf) {
        return html(
            StatusCode::FORBIDDEN,
            pages::error(
                &s,
                &ReadError { status: StatusCode::FORBIDDEN, message: "the form's CSRF token is wrong".into() },
            ),
        );
    }
    if let Some(secret) = session::cookie(&headers, session::COOKIE) {
        if let Err(e) = session::close(&c.state, secret).await {
            return e.into_response();
        }
    }
    let mut audit = s.caller.audit("console.sign_out", &s.caller.token_id);
    if let zeitwork_api_types::TokenScope::Org { org, .. } = &s.caller.scope {
        audit = audit.org(org);
    }
    if let Err(e) = c.state.store.record_event(&audit, "ok").await {
        tracing::warn!(error = %e, "could not record a console sign-out");
    }
    let mut res = Redirect::to("/sign-in").into_response();
    let cookie = session::set_cookie(session::COOKIE, "", 0, session::over_tls(&headers));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}
