//! Telemetry shared by every role: logging setup, Prometheus metrics for
//! HTTP servers (requests by route and status, latency histograms), and log
//! drains that send lines to log services ([`drain`]).
//!
//! It owns no business logic and never logs request bodies or headers, so no
//! secret can reach the logs through it.

pub mod drain;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` style filters come from
/// `filter` (e.g. `info,zeitwork=debug`). Safe to call twice (the second is ignored).
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    method: String,
    route: String,
}

/// Metrics of one role's HTTP server, plus a registry others can add to.
#[derive(Clone)]
pub struct HttpMetrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    in_flight: Gauge,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpMetrics")
    }
}

impl HttpMetrics {
    /// `prefix` names the role, e.g. `zeitwork_operator`.
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let in_flight = Gauge::default();
        registry.register("http_requests", "HTTP requests by route and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", latency.clone());
        registry.register("http_requests_in_flight", "HTTP requests being served", in_flight.clone());
        Self { registry: Arc::new(Mutex::new(registry)), requests, latency, in_flight }
    }

    /// Lets a role register metrics of its own in the same exposition.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut reg)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }

    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { method: method.to_owned(), route: route.to_owned(), status })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels { method: method.to_owned(), route: route.to_owned() })
            .observe(seconds);
    }
}

/// Axum middleware recording every request under its route template
/// (`/api/v1/projects/{org}/{project}`), never the raw path, so label
/// cardinality stays bounded.
pub async fn track(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    metrics.in_flight.inc();
    let res = next.run(req).await;
    metrics.in_flight.dec();
    metrics.observe(&method, &route, res.status().as_u16(), start.elapsed().as_secs_f64());
    res
}

/// Handler for `GET /metrics`.
pub async fn metrics_handler(State(metrics): State<HttpMetrics>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
        .into_response()
}

/// The bearer token a request presents (`Authorization: Bearer …`), if any.
pub fn presented_bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

/// Whether a request presents `expected` as its bearer token, compared in
/// constant time (the length of the token is not a secret).
pub fn bearer_is(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented_bearer(headers)
        .is_some_and(|t| t.len() == expected.len() && bool::from(t.as_bytes().ct_eq(expected.as_bytes())))
}

/// The answer to a scrape without an acceptable token: 401 with a
/// `WWW-Authenticate: Bearer` challenge, or 403 when a token was presented.
pub fn refuse_scrape(headers: &axum::http::HeaderMap) -> Response {
    if presented_bearer(headers).is_some() {
        return (StatusCode::FORBIDDEN, "this token may not read metrics\n").into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"metrics\"")],
        "metrics need the metrics token (Authorization: Bearer …)\n",
    )
        .into_response()
}

/// Handler for `GET /metrics` behind a metrics token: without one configured
/// the metrics are open (admin ports bound to loopback).
async fn guarded_metrics(
    State((metrics, token)): State<(HttpMetrics, Option<Arc<str>>)>,
    headers: axum::http::HeaderMap,
) -> Response {
    match token {
        Some(t) if !bearer_is(&headers, &t) => refuse_scrape(&headers),
        _ => metrics_handler(State(metrics)).await,
    }
}

/// Serves `GET /health` and `GET /metrics` on `listener` until `stop` turns
/// true: the admin port of the edge proxy, the load balancer and similar roles.
/// With `token`, `/metrics` answers only a scrape that presents it as a bearer token.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: HttpMetrics,
    token: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let token: Option<Arc<str>> = token.map(Into::into);
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", axum::routing::get(guarded_metrics).with_state((metrics, token)));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = HttpMetrics::new("zeitwork_test");
        m.observe("GET", "/health", 200, 0.002);
        m.observe("GET", "/health", 200, 0.004);
        let text = m.render();
        assert!(
            text.contains(r#"zeitwork_test_http_requests_total{method="GET",route="/health",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains("zeitwork_test_http_request_duration_seconds_bucket"), "{text}");
    }

    #[test]
    fn the_metrics_token_is_matched_exactly() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!bearer_is(&h, "s3cret"));
        assert_eq!(refuse_scrape(&h).status(), StatusCode::UNAUTHORIZED);
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!bearer_is(&h, "s3cret"));
        assert_eq!(refuse_scrape(&h).status(), StatusCode::FORBIDDEN);
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(!bearer_is(&h, "s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(bearer_is(&h, "s3cret"));
    }
}
