//! The agent's forwarding: requests from edge proxies (proven by their token)
//! naming an instance in `X-Zeitwork-Instance` go to that instance; streaming
//! both ways, WebSocket upgrades spliced. Everyone else is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use zeitwork_api_types::{ClusterRole, TokenScope, WhoAmI};
use zeitwork_client::Client;

use crate::instances::Table;

pub const INSTANCE_HEADER: &str = "x-zeitwork-instance";
pub const EDGE_TOKEN_HEADER: &str = "x-zeitwork-edge-token";
const TOKEN_CACHE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Forwarder {
    pub table: Table,
    operator_url: String,
    /// sha256(token) → (its scope, checked at).
    verified: Mutex<HashMap<String, (Option<TokenScope>, Instant)>>,
    client: hyper_util::client::legacy::Client<HttpConnector, Body>,
}

impl Forwarder {
    pub fn new(table: Table, operator_url: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        Self {
            table,
            operator_url: operator_url.to_owned(),
            verified: Mutex::new(HashMap::new()),
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// The scope of `token` (None when the operator does not know it), asking the operator at most once a minute.
    async fn scope_of(&self, token: &str) -> Option<TokenScope> {
        let key = hex::encode(Sha256::digest(token.as_bytes()));
        if let Some((scope, at)) = self.verified.lock().await.get(&key) {
            if at.elapsed() < TOKEN_CACHE {
                return scope.clone();
            }
        }
        let who = Client::new(&self.operator_url, Some(token.to_owned())).get::<WhoAmI>("/api/v1/auth/whoami").await;
        let scope = match who {
            Ok(w) => Some(w.scope),
            Err(e) if e.status().is_some() => None,
            // The operator is unreachable: keep an earlier answer rather than drop traffic.
            Err(_) => return self.verified.lock().await.get(&key).and_then(|(s, _)| s.clone()),
        };
        self.verified.lock().await.insert(key, (scope.clone(), Instant::now()));
        scope
    }

    /// Whether `token` is a platform admin's or a cluster token of one of `roles`.
    pub async fn allowed(&self, token: &str, roles: &[ClusterRole]) -> bool {
        match self.scope_of(token).await {
            Some(TokenScope::Admin) => true,
            Some(TokenScope::Cluster { role }) => roles.contains(&role),
            _ => false,
        }
    }
}

pub(crate) fn refuse(status: StatusCode, msg: &str) -> Response {
    (status, format!("{msg}\n")).into_response()
}

/// Middleware: requests with [`INSTANCE_HEADER`] go to the instance, the rest to the agent's own routes.
pub async fn route(State(fw): State<Arc<Forwarder>>, req: Request, next: axum::middleware::Next) -> Response {
    if req.headers().contains_key(INSTANCE_HEADER) {
        forward(State(fw), req).await
    } else {
        next.run(req).await
    }
}

pub async fn forward(State(fw): State<Arc<Forwarder>>, mut req: Request) -> Response {
    let Some(instance) = req.headers().get(INSTANCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return refuse(StatusCode::NOT_FOUND, "not found");
    };
    let Some(token) = req.headers().get(EDGE_TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return refuse(StatusCode::UNAUTHORIZED, "forwarding needs an edge proxy's token");
    };
    if !fw.allowed(&token, &[ClusterRole::EdgeProxy]).await {
        return refuse(StatusCode::FORBIDDEN, "this token may not forward to instances");
    }
    let addr = fw.table.read().await.get(&instance).filter(|l| l.ready).and_then(|l| l.address);
    let Some(addr) = addr else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the instance is not ready on this node");
    };
    let pq = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    let Ok(uri) = format!("http://{addr}{pq}").parse::<Uri>() else {
        return refuse(StatusCode::BAD_REQUEST, "bad request target");
    };
    let client_upgrade = req.headers().contains_key(axum::http::header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.headers.remove(INSTANCE_HEADER);
    parts.headers.remove(EDGE_TOKEN_HEADER);
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        parts.headers.entry(axum::http::header::HOST).or_insert(host);
    }
    let upstream = Request::from_parts(parts, body);
    match fw.client.request(upstream).await {
        Ok(mut res) => {
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(client) = client_upgrade {
                    let server = hyper::upgrade::on(&mut res);
                    tokio::spawn(async move {
                        if let Ok((c, s)) = tokio::try_join!(client, server) {
                            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
                        }
                    });
                }
            }
            let (parts, body) = res.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(%instance, error = %e, "forwarding failed");
            refuse(StatusCode::BAD_GATEWAY, "the instance did not answer")
        }
    }
}
