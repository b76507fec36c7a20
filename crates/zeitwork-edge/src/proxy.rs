//! One proxied request: host → route → rate limit → instance → upstream, with
//! a retry on another instance when a connection could not be made.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::EdgeState;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Bodies up to this size are buffered so the request can be retried.
pub(crate) const RETRY_BUFFER: u64 = 64 * 1024;
pub(crate) const MAX_ATTEMPTS: usize = 3;
/// Connecting to an instance's node agent.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Idle upstream connections are closed after this long.
pub(crate) const UPSTREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the connection knows about the request.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client: the TCP peer, or the source in a trusted PROXY header.
    pub client: SocketAddr,
    pub tls: bool,
    pub sni: Option<String>,
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A plain page from Zeitwork itself; never an app's content.
pub fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\
         <body style=\"font-family:system-ui,sans-serif;margin:4rem auto;max-width:36rem;color:#222\">\
         <h1>{title}</h1><p>{detail}</p><hr><p style=\"color:#888\">Zeitwork</p></body></html>\n",
        code = status.as_u16()
    );
    let mut r = Response::new(full(html));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Lowercase host without port or trailing dot.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal; never routed, but well-formed.
        &raw[..rest.find(']')? + 2]
    } else {
        raw.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    ok.then_some(host)
}

/// The request's host from `:authority`/absolute URI and `Host`, which must agree.
fn request_host(req: &Request<Incoming>) -> Result<String, &'static str> {
    let from_uri = req.uri().authority().map(|a| a.as_str().to_owned());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let from_header = hosts.next().map(|v| v.to_str().map(str::to_owned).map_err(|_| "the Host header is not text"));
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let from_header = from_header.transpose()?;
    let uri_host = from_uri.as_deref().map(normalize_host);
    let header_host = from_header.as_deref().map(normalize_host);
    match (uri_host, header_host) {
        (Some(Some(a)), Some(Some(h))) if a != h => Err("the request target's authority and the Host header disagree"),
        (Some(Some(a)), _) => Ok(a),
        (None, Some(Some(h))) => Ok(h),
        (Some(None), _) | (_, Some(None)) => Err("the host is not a valid host name"),
        (None, None) => Err("the request has no Host header"),
    }
}

pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= hyper::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// The client's `X-Request-Id` when it is a sane one, else a fresh one.
pub(crate) fn request_id(given: Option<&[u8]>) -> String {
    given
        .filter(|v| {
            !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        })
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}

type UpstreamClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

thread_local! {
    /// Upstream connections are pooled per thread: a request and the pooled
    /// connection it goes out on are driven by the same event loop.
    static UPSTREAM: UpstreamClient = {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector)
    };
}

pub(crate) fn upstream(req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
    UPSTREAM.with(|c| c.request(req))
}

/// Serves one request; every failure becomes a response, never a dropped stream.
pub async fn handle(
    state: Arc<EdgeState>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let rid = request_id(req.headers().get("x-request-id").map(HeaderValue::as_bytes));
    let mut deployment = None;
    let (res, host, outcome) = route_request(&state, req, &conn, &rid, &mut deployment).await;
    let mut res = res;
    if let Ok(v) = HeaderValue::from_str(&rid) {
        res.headers_mut().insert("x-request-id", v);
    }
    let done = Done {
        method: method.as_str(),
        host: host.as_deref(),
        path: uri.path(),
        status: res.status().as_u16(),
        request_id: &rid,
        upstream: outcome.as_deref(),
        deployment: deployment.as_deref(),
    };
    record(&state, &conn, start, &done);
    Ok(res)
}

/// What the access log and the metrics keep of a finished request.
pub(crate) struct Done<'a> {
    pub method: &'a str,
    /// The routed host (only routed hosts become metric labels).
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub status: u16,
    pub request_id: &'a str,
    /// The instance that answered.
    pub upstream: Option<&'a str>,
    /// The deployment the request went to (none when Zeitwork answered it).
    pub deployment: Option<&'a str>,
}

pub(crate) fn record(state: &EdgeState, conn: &ConnInfo, start: Instant, d: &Done<'_>) {
    let took = start.elapsed();
    state.metrics.observe(d.host, d.status, took);
    if let Some(deployment) = d.deployment {
        state.traffic.note(deployment, d.status, took);
    }
    tracing::info!(
        target: "zeitwork_edge::access",
        client = %conn.client.ip(),
        method = d.method,
        host = d.host.unwrap_or("-"),
        path = d.path,
        status = d.status,
        duration_ms = took.as_secs_f64() * 1000.0,
        request_id = d.request_id,
        upstream = d.upstream.unwrap_or("-"),
        tls = conn.tls,
    );
}

/// Where a request for a known host goes, or the page that answers it instead.
pub(crate) enum Admission {
    Proxy(Arc<zeitwork_api_types::Route>),
    /// Answered by Zeitwork; `routed` when the host has a route (metrics label).
    Answer {
        response: Response<Body>,
        routed: bool,
    },
}

/// Route lookup, HTTPS redirect of custom domains, rate limit and body size:
/// the checks every request passes whichever way it came in.
pub(crate) fn admit(
    state: &EdgeState,
    host: &str,
    conn: &ConnInfo,
    path_and_query: &str,
    content_length: Option<u64>,
    skew_cookie: Option<&str>,
) -> Admission {
    let Some(route) = state.route(host) else {
        let response = page(StatusCode::NOT_FOUND, "Not found", "No application is deployed at this address.");
        return Admission::Answer { response, routed: false };
    };
    if route.gone {
        return crate::wake::gone();
    }
    // Custom domains with a certificate are served over HTTPS only.
    if !conn.tls && route.environment.is_some() && !is_apps_host(host, &state.apps_domain()) && state.certs.has(host) {
        let location = format!("https://{host}{path_and_query}");
        let mut response = page(StatusCode::PERMANENT_REDIRECT, "Moved", "This site is served over HTTPS.");
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        return Admission::Answer { response, routed: true };
    }
    let limit = route.rate_limit.unwrap_or(state.config.rate_limit);
    let scope = if route.rate_limit.is_some() { scope_of(&route.org, &route.project) } else { 0 };
    if let Err(wait) = state.limiter.check(conn.client.ip(), scope, limit, Instant::now()) {
        state.metrics.rate_limited.inc();
        let mut response = page(StatusCode::TOO_MANY_REQUESTS, "Too many requests", "Slow down and try again shortly.");
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return Admission::Answer { response, routed: true };
    }
    if content_length.is_some_and(|len| len > state.config.max_body_bytes) {
        let response = page(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request too large",
            "The request body is larger than this site accepts.",
        );
        return Admission::Answer { response, routed: true };
    }
    let route = crate::skew::pin(state, route, skew_cookie);
    // A client not pinned to a deployment may be sent to a canary.
    let route = crate::traffic::split(route, conn.client.ip());
    state.wakes.note_request(&route.deployment);
    Admission::Proxy(route)
}

fn is_apps_host(host: &str, apps_domain: &str) -> bool {
    host.len() > apps_domain.len() + 1
        && host.ends_with(apps_domain)
        && host.as_bytes()[host.len() - apps_domain.len() - 1] == b'.'
}

/// Returns the response, the routed host (for metrics) and the instance that answered.
async fn route_request(
    state: &Arc<EdgeState>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    rid: &str,
    deployment: &mut Option<String>,
) -> (Response<Body>, Option<String>, Option<String>) {
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => return (page(StatusCode::BAD_REQUEST, "Bad request", why), None, None),
    };
    if let (true, Some(sni)) = (conn.tls, &conn.sni) {
        if !sni.eq_ignore_ascii_case(&host) {
            let r = page(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request",
                "This connection was made for another host.",
            );
            return (r, None, None);
        }
    }
    if let Some(token) = req.uri().path().strip_prefix("/.well-known/acme-challenge/") {
        if let Some(answer) = state.acme_answer(&host, token).or(lookup_challenge(state, &host, token).await) {
            let mut r = Response::new(full(answer));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return (r, None, None);
        }
    }
    let content_length =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    // HTTP/2 may split cookies over several fields.
    let skew_cookie: Option<String> = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| crate::skew::cookie_value(v.as_bytes()).map(str::to_owned));
    let admission = match admit(state, &host, conn, pq, content_length, skew_cookie.as_deref()) {
        // A pinned deployment's route is looked up again by its own host while it wakes.
        Admission::Proxy(route) => {
            let lookup = route.host.clone();
            crate::wake::hold(state, &lookup, route).await
        }
        answer => answer,
    };
    let route = match admission {
        Admission::Proxy(route) => route,
        Admission::Answer { response, routed } => return (response, routed.then_some(host), None),
    };
    *deployment = Some(route.deployment.clone());
    let stamp = crate::skew::stamp(&host, skew_cookie.as_deref(), &route, conn.tls);
    let (mut res, host, outcome) = forward(state, req, conn, rid, host, route).await;
    if outcome.is_some() {
        for (name, value) in stamp {
            res.headers_mut().append(name, value);
        }
    }
    (res, host, outcome)
}

/// Sends an admitted request to an instance of `route`.
async fn forward(
    state: &Arc<EdgeState>,
    mut req: Request<Incoming>,
    conn: &ConnInfo,
    rid: &str,
    host: String,
    route: Arc<zeitwork_api_types::Route>,
) -> (Response<Body>, Option<String>, Option<String>) {
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_header.filter(|_| upgrade) {
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let names: Vec<HeaderName> =
        parts.headers.keys().filter(|k| k.as_str().starts_with("x-zeitwork-")).cloned().collect();
    for n in names {
        parts.headers.remove(n);
    }
    let h = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&conn.client.ip().to_string()) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
    if let Ok(v) = HeaderValue::from_str(&host) {
        h.insert("x-forwarded-host", v.clone());
        h.insert(header::HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert("x-request-id", v);
    }

    // Small or empty bodies are kept so a refused connection can be retried elsewhere.
    let size = body.size_hint();
    let replayable = if body.is_end_stream() {
        Some(Bytes::new())
    } else if size.exact().is_some_and(|n| n <= RETRY_BUFFER) {
        match Limited::new(body, RETRY_BUFFER as usize).collect().await {
            Ok(c) => Some(c.to_bytes()),
            Err(_) => {
                return (
                    page(StatusCode::BAD_REQUEST, "Bad request", "The request body could not be read."),
                    Some(host),
                    None,
                )
            }
        }
    } else {
        let failure = Arc::new(std::sync::Mutex::new(None));
        let watched = ClientBody {
            inner: Limited::new(body, state.config.max_body_bytes as usize).map_err(|e| e as BoxError).boxed(),
            failure: failure.clone(),
        };
        return send_once(state, &route, parts, watched.boxed(), host, client_upgrade, failure).await;
    };
    let body = replayable.unwrap_or_default();
    // A copy for a candidate in its shadow stage leaves first and is never waited for.
    if !upgrade {
        crate::shadow::mirror(state, &route, &parts, &body, rid);
    }
    let mut tried: Vec<String> = Vec::new();
    loop {
        let Some((inst, inflight)) = state.balancer.pick(&route.instances, &tried) else {
            state.metrics.upstream_errors.inc();
            let r = page(
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "The application could not be reached. Try again shortly.",
            );
            return (r, Some(host), None);
        };
        let req =
            match upstream_request(&parts, &inst.upstream, &inst.id, full(body.clone()), state.config.token.as_deref())
            {
                Some(r) => r,
                None => return (bad_address(), Some(host), None),
            };
        match upstream(req).await {
            Ok(res) => {
                state.balancer.restore(&inst.id);
                let id = inst.id.clone();
                return (respond(res, inflight, client_upgrade), Some(host), Some(id));
            }
            Err(e) if e.is_connect() && tried.len() + 1 < MAX_ATTEMPTS.min(route.instances.len()) => {
                tracing::warn!(instance = %inst.id, error = %e, "connect failed; retrying on another instance");
                state.balancer.eject(&inst.id);
                state.metrics.retries.inc();
                tried.push(inst.id.clone());
            }
            Err(e) => {
                if e.is_connect() {
                    state.balancer.eject(&inst.id);
                }
                tracing::warn!(instance = %inst.id, error = %e, "upstream request failed");
                state.metrics.upstream_errors.inc();
                let r = page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "The application could not be reached. Try again shortly.",
                );
                return (r, Some(host), Some(inst.id.clone()));
            }
        }
    }
}

async fn send_once(
    state: &EdgeState,
    route: &zeitwork_api_types::Route,
    parts: hyper::http::request::Parts,
    body: Body,
    host: String,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    client_failure: Arc<std::sync::Mutex<Option<String>>>,
) -> (Response<Body>, Option<String>, Option<String>) {
    let Some((inst, inflight)) = state.balancer.pick(&route.instances, &[]) else {
        return (
            page(StatusCode::BAD_GATEWAY, "Bad gateway", "The application could not be reached."),
            Some(host),
            None,
        );
    };
    let req = match upstream_request(&parts, &inst.upstream, &inst.id, body, state.config.token.as_deref()) {
        Some(r) => r,
        None => return (bad_address(), Some(host), None),
    };
    match upstream(req).await {
        Ok(res) => (respond(res, inflight, client_upgrade), Some(host), Some(inst.id.clone())),
        Err(e) => {
            // The client's body failed (bad framing, too large): the client's fault, not the app's.
            let client_side = client_failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let r = match client_side {
                Some(why) if why.contains("length limit exceeded") => page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request too large",
                    "The request body is larger than this site accepts.",
                ),
                Some(_) => page(StatusCode::BAD_REQUEST, "Bad request", "The request body could not be read."),
                None => {
                    if e.is_connect() {
                        state.balancer.eject(&inst.id);
                    }
                    state.metrics.upstream_errors.inc();
                    page(StatusCode::BAD_GATEWAY, "Bad gateway", "The application could not be reached.")
                }
            };
            (r, Some(host), Some(inst.id.clone()))
        }
    }
}

pub(crate) fn upstream_request(
    parts: &hyper::http::request::Parts,
    upstream: &str,
    instance: &str,
    body: Body,
    edge_token: Option<&str>,
) -> Option<Request<Body>> {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri: Uri = format!("{}{pq}", upstream.trim_end_matches('/')).parse().ok()?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    if let Ok(v) = HeaderValue::from_str(instance) {
        req.headers_mut().insert("x-zeitwork-instance", v);
    }
    // Node agents forward only for edge proxies.
    if let Some(v) = edge_token.and_then(|t| HeaderValue::from_str(t).ok()) {
        req.headers_mut().insert("x-zeitwork-edge-token", v);
    }
    Some(req)
}

/// Turns the upstream response into the client's, splicing upgraded connections.
fn respond(
    mut res: Response<Incoming>,
    inflight: crate::balance::InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                let _inflight = inflight;
                match tokio::try_join!(client, upstream) {
                    Ok((c, u)) => {
                        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            let (parts, _) = res.into_parts();
            return Response::from_parts(parts, full(Bytes::new()));
        }
    }
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = body.map_err(|e| Box::new(e) as BoxError);
    let body = InFlightBody { inner: body.boxed(), _inflight: inflight };
    Response::from_parts(parts, body.boxed())
}

/// The client's streamed body; remembers why it failed, so the failure is
/// blamed on the client and not on the app.
struct ClientBody {
    inner: Body,
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Keeps the instance's outstanding count until the response body is done.
struct InFlightBody {
    inner: Body,
    _inflight: crate::balance::InFlight,
}

impl hyper::body::Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Asks the operator for a challenge answer another edge published.
async fn lookup_challenge(state: &EdgeState, host: &str, token: &str) -> Option<String> {
    let path = format!("/api/v1/acme/challenges?token={}", zeitwork_client::encode(token));
    let c: zeitwork_api_types::AcmeChallenge = state.operator.get(&path).await.ok()?;
    (c.domain == host).then_some(c.key_authorization)
}

fn bad_address() -> Response<Body> {
    page(StatusCode::BAD_GATEWAY, "Bad gateway", "The application's address is not valid.")
}

fn scope_of(org: &str, project: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (org, project).hash(&mut h);
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("Web.Apps.Test:8083").as_deref(), Some("web.apps.test"));
        assert_eq!(normalize_host("web.apps.test.").as_deref(), Some("web.apps.test"));
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
