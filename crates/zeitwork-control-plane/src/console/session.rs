//! Console sessions: a token pasted once (or a GitHub sign-in) becomes a
//! random session cookie (HttpOnly, SameSite=Strict, Secure over TLS) whose
//! SHA-256 finds a row in the store. The row names the token the session acts
//! with, so the API's role checks apply unchanged; it also holds the CSRF
//! token that every state-changing call must echo in `X-CSRF-Token`.

use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeitwork_api_types::TokenScope;
use zeitwork_store::{ConsoleSession, StoreError};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// The session cookie.
pub const COOKIE: &str = "zw_session";
/// The cookie that pairs with the sign-in form's hidden field (login CSRF).
pub const LOGIN_COOKIE: &str = "zw_signin";
/// The header that carries the session's CSRF token on changes.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
pub const LIFETIME: chrono::Duration = chrono::Duration::hours(12);

/// A random URL-safe secret of 32 bytes.
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the browser reached us over TLS (directly or through the edge).
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value; `max_age` 0 removes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age_secs: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

/// A session that was just opened: the cookie's secret and the stored row.
#[derive(Debug)]
pub struct Opened {
    pub secret: String,
    pub row: ConsoleSession,
}

/// Opens a session acting with `token_id`.
pub async fn open(state: &AppState, token_id: &str, owns_token: bool) -> Result<Opened, ApiError> {
    let secret = random_secret();
    let now = chrono::Utc::now();
    let row = ConsoleSession {
        id_hash: hash(&secret),
        token_id: token_id.to_owned(),
        csrf: random_secret(),
        owns_token,
        created_at_ms: now.timestamp_millis(),
        expires_at_ms: (now + LIFETIME).timestamp_millis(),
    };
    state.store.create_console_session(&row).await?;
    Ok(Opened { secret, row })
}

/// Ends the session of this cookie secret, and the token it owns.
pub async fn close(state: &AppState, secret: &str) -> Result<(), ApiError> {
    if let Some(s) = state.store.delete_console_session(&hash(secret)).await? {
        if s.owns_token {
            delete_owned_token(state, &s.token_id).await;
        }
    }
    Ok(())
}

async fn delete_owned_token(state: &AppState, token_id: &str) {
    let audit = zeitwork_store::Audit::new("console", "token.delete", token_id);
    match state.store.delete_token(token_id, &audit).await {
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => tracing::warn!(error = %e, token = token_id, "cannot delete the token of an ended session"),
    }
}

/// Forgets expired sessions and the tokens they minted (called now and then).
pub async fn sweep(state: &AppState) {
    match state.store.expire_console_sessions().await {
        Ok(tokens) => {
            for t in tokens {
                delete_owned_token(state, &t).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot forget expired console sessions"),
    }
}

/// A signed-in browser: who it acts as and its CSRF token.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
}

/// The session of the request's cookie, if it is valid.
pub async fn find(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(secret) = cookie(headers, COOKIE) else { return Ok(None) };
    let id_hash = hash(secret);
    let row = match state.store.get_console_session(&id_hash).await {
        Ok(r) => r,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !equal(&row.id_hash, &id_hash) {
        return Ok(None);
    }
    let token = match state.store.get_token(&row.token_id).await {
        Ok(t) => t.token,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if token.expires_at.is_some_and(|e| e < chrono::Utc::now()) || matches!(token.scope, TokenScope::Cluster { .. }) {
        return Ok(None);
    }
    let caller =
        Caller { token_id: token.id, name: token.name, scope: token.scope, read_only: token.read_only, node: None };
    Ok(Some(Session { caller, csrf: row.csrf }))
}

/// A caller that the console itself passes to the API routes it renders pages from.
#[derive(Debug, Clone)]
pub(crate) struct InternalCaller(pub Caller);

/// The API's view of a request without a bearer token: the console's own
/// calls, or a browser's session cookie (changes only with its CSRF token).
pub(crate) async fn caller_without_bearer(parts: &Parts, state: &AppState) -> Result<Option<Caller>, ApiError> {
    if let Some(InternalCaller(c)) = parts.extensions.get::<InternalCaller>() {
        return Ok(Some(c.clone()));
    }
    let Some(session) = find(state, &parts.headers).await? else {
        if cookie(&parts.headers, COOKIE).is_some() {
            return Err(ApiError::Unauthorized("the console session has ended; sign in again".into()));
        }
        return Ok(None);
    };
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !equal(sent, &session.csrf) {
            let target = parts.uri.path().to_owned();
            let why = "a change from the console needs the session's X-CSRF-Token header";
            return state.deny(&session.caller, "write", &target, None, why).await;
        }
    }
    Ok(Some(session.caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_and_written_strictly() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; zw_session=abc".parse().unwrap());
        h.append(header::COOKIE, "zw_signin=n".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), Some("n"));
        assert_eq!(cookie(&h, "zw"), None);
        let plain = set_cookie(COOKIE, "v", 60, false);
        assert_eq!(plain, "zw_session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=60");
        assert!(set_cookie(COOKIE, "v", 60, true).ends_with("; Secure"));
        h.insert("x-forwarded-proto", "HTTPS".parse().unwrap());
        assert!(over_tls(&h));
    }

    #[test]
    fn secrets_are_random_and_compared_whole() {
        let (a, b) = (random_secret(), random_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(equal(&a, &a.clone()));
        assert!(!equal(&a, &b) && !equal(&a, &a[..42]) && !equal("", &a));
        assert_eq!(hash(&a).len(), 64);
    }
}
