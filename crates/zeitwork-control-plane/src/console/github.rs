//! Console sign-in with GitHub (OAuth web flow). The operator exchanges the
//! code for an access token, reads the user's login and organisations, maps
//! the best matching organisation to a Zeitwork role (config `github_oauth.orgs`),
//! and mints an org token for the session that is deleted when it ends.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use zeitwork_api_types::TokenScope;

use super::{session, Console};

const STATE_COOKIE: &str = "zw_oauth";

pub async fn start(State(c): State<Console>, headers: HeaderMap) -> Response {
    let Some(g) = &c.state.config.github_oauth else {
        return Redirect::to("/sign-in").into_response();
    };
    let state = session::random_secret();
    let url = format!(
        "{}?client_id={}&scope=read:org&state={}",
        g.authorize_url,
        super::enc(&g.client_id),
        super::enc(&state)
    );
    let mut res = Redirect::to(&url).into_response();
    // Lax, not Strict: the way back is a navigation from GitHub's site.
    let secure = if session::over_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!("{STATE_COOKIE}={state}; Path=/auth/github; HttpOnly; SameSite=Lax; Max-Age=600{secure}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[derive(Debug, serde::Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct AccessToken {
    access_token: String,
}

#[derive(Debug, serde::Deserialize)]
struct User {
    login: String,
}

#[derive(Debug, serde::Deserialize)]
struct UserOrg {
    login: String,
}

fn failed(why: &str) -> Response {
    tracing::warn!(why, "GitHub sign-in failed");
    Redirect::to("/sign-in?error=github").into_response()
}

pub async fn callback(State(c): State<Console>, headers: HeaderMap, Query(q): Query<Callback>) -> Response {
    let Some(g) = c.state.config.github_oauth.clone() else {
        return Redirect::to("/sign-in").into_response();
    };
    let expected = session::cookie(&headers, STATE_COOKIE).unwrap_or("");
    let (Some(code), Some(state)) = (q.code, q.state) else { return failed("no code or state in the callback") };
    if expected.is_empty() || !session::equal(expected, &state) {
        return failed("the state does not match the one this browser was given");
    }
    let http = &c.state.http;
    let token: AccessToken = match http
        .post(&g.token_url)
        .header("accept", "application/json")
        .form(&[("client_id", g.client_id.as_str()), ("client_secret", g.client_secret.as_str()), ("code", &code)])
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .and_then(|r| r.error_for_status())
    {
        Ok(r) => match r.json().await {
            Ok(t) => t,
            Err(_) => return failed("the token endpoint's answer has no access_token"),
        },
        Err(_) => return failed("the token endpoint refused the code"),
    };
    let api = g.api_url.trim_end_matches('/');
    let get = |path: &str| {
        http.get(format!("{api}{path}"))
            .bearer_auth(&token.access_token)
            .header("accept", "application/vnd.github+json")
            .header("user-agent", "zeitwork-console")
            .timeout(std::time::Duration::from_secs(10))
            .send()
    };
    let user: User = match get("/user").await.and_then(|r| r.error_for_status()) {
        Ok(r) => match r.json().await {
            Ok(u) => u,
            Err(_) => return failed("cannot read the user"),
        },
        Err(_) => return failed("cannot read the user"),
    };
    let orgs: Vec<UserOrg> = match get("/user/orgs?per_page=100").await.and_then(|r| r.error_for_status()) {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => return failed("cannot read the user's organisations"),
    };
    let best = g
        .orgs
        .iter()
        .filter(|m| orgs.iter().any(|o| o.login.eq_ignore_ascii_case(&m.github_org)))
        .max_by_key(|m| m.role);
    let Some(best) = best else {
        tracing::info!(login = %user.login, "GitHub user is in no mapped organisation");
        return Redirect::to("/sign-in?error=github-role").into_response();
    };
    let scope = TokenScope::Org { org: best.org.clone(), role: best.role };
    let minted =
        crate::auth::mint(&format!("github:{}", user.login), scope, false, Some("console (GitHub)".into()), Some(1));
    let audit =
        zeitwork_store::Audit::new(&format!("github:{}", user.login), "console.sign_in", &minted.stored.token.id)
            .org(&best.org);
    if let Err(e) = c.state.store.create_token(&minted.stored, &audit).await {
        return crate::error::ApiError::from(e).into_response();
    }
    session::sweep(&c.state).await;
    let opened = match session::open(&c.state, &minted.stored.token.id, true).await {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    // A page of our own, not a redirect: the Strict session cookie is sent
    // only on navigations that start on this site, and this one started on GitHub's.
    let mut page = super::html(StatusCode::OK, super::pages::continue_to("/"));
    if let Ok(v) =
        HeaderValue::from_str(&format!("{STATE_COOKIE}=; Path=/auth/github; HttpOnly; SameSite=Lax; Max-Age=0"))
    {
        page.headers_mut().append(header::SET_COOKIE, v);
    }
    super::signed_in_response(&headers, &opened.secret, page)
}
