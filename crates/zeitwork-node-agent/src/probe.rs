//! `POST /v1/probe`: an uptime probe run from this node's region, for the
//! operator (which asks one node per region a check probes from).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use zeitwork_api_types::{ClusterRole, ProbeRequest};

use crate::forward::{refuse, Forwarder};

#[derive(Debug, Clone)]
pub struct ProbeState {
    pub forwarder: Arc<Forwarder>,
    pub http: reqwest::Client,
}

pub async fn probe(
    State(s): State<ProbeState>,
    headers: HeaderMap,
    body: Result<axum::Json<ProbeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let token =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return refuse(StatusCode::UNAUTHORIZED, "probes need an operator's token (Authorization: Bearer …)");
    };
    if !s.forwarder.allowed(token, &[ClusterRole::Operator]).await {
        return refuse(StatusCode::FORBIDDEN, "this token may not ask for probes");
    }
    let Ok(axum::Json(p)) = body else {
        return refuse(StatusCode::BAD_REQUEST, "send a probe as JSON: url, method, expected_status, timeout_secs");
    };
    let url_ok = reqwest::Url::parse(&p.url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
    if !url_ok || !matches!(p.method.as_str(), "GET" | "HEAD") || !(1..=60).contains(&p.timeout_secs) {
        return refuse(StatusCode::BAD_REQUEST, "url must be http(s), method GET or HEAD, timeout_secs 1 to 60");
    }
    axum::Json(zeitwork_client::probe::run(&s.http, &p).await).into_response()
}
