use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zeitwork_api_types::{CheckResult, Health, Readiness, Version};

use crate::AppState;

/// Liveness: the process serves HTTP (`{"status":"healthy"}`, as the runbooks expect).
#[utoipa::path(get, path = "/health", tag = "health", security(), responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "healthy".into() })
}

/// Liveness under the name Kubernetes-style checks use; the same as `/health`.
#[utoipa::path(get, path = "/healthz", tag = "health", security(), responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    health().await
}

/// Readiness: every dependency answers (the store).
#[utoipa::path(get, path = "/api/health/ready", tag = "health", security(),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let start = Instant::now();
    let store = match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => CheckResult { ok: true, message: None, duration_ms: start.elapsed().as_millis() as u64 },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store check failed");
            CheckResult {
                ok: false,
                message: Some("the store does not answer".into()),
                duration_ms: start.elapsed().as_millis() as u64,
            }
        }
        Err(_) => {
            CheckResult { ok: false, message: Some("the store did not answer within 2s".into()), duration_ms: 2000 }
        }
    };
    let ok = store.ok;
    let body = Readiness {
        status: if ok { "ready" } else { "not_ready" }.into(),
        checks: BTreeMap::from([("store".to_owned(), store)]),
    };
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Startup: migrations ran and the first admin token exists (both happen
/// before the server listens, so answering means started).
#[utoipa::path(get, path = "/api/health/startup", tag = "health", security(), responses((status = 200, body = Readiness)))]
pub async fn startup() -> Json<Readiness> {
    let done = CheckResult { ok: true, message: None, duration_ms: 0 };
    Json(Readiness {
        status: "started".into(),
        checks: BTreeMap::from([("migrations".to_owned(), done.clone()), ("bootstrap".to_owned(), done)]),
    })
}

/// Version of this build.
#[utoipa::path(get, path = "/api/version", tag = "health", security(), responses((status = 200, body = Version)))]
pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").into(),
        commit: env!("ZEITWORK_COMMIT").into(),
        build_time: env!("ZEITWORK_BUILD_TIME").into(),
    })
}
