//! Uptime checks through the API: a check probes a stand-in app through
//! `uptime_via`, its figures cover the window the caller asks for, and its
//! settings change (PATCH) and go (DELETE) with bad values refused by name.

use serde_json::{json, Value};
use zeitwork_control_plane::OperatorConfig;

mod common;
use common::until;

/// A stand-in for the edge in front of the app: answers every probe 200 "ok".
async fn app_stand_in() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    at
}

fn span(c: &Value) -> chrono::Duration {
    let at = |f: &str| chrono::DateTime::parse_from_rfc3339(c[f].as_str().unwrap()).unwrap();
    at("window_to") - at("window_from")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_report_over_a_chosen_window_and_can_be_changed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        apps_scheme: "http".into(),
        uptime_via: Some(app_stand_in().await),
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    for name in ["web", "api"] {
        admin.post::<_, Value>("/api/v1/projects", &json!({"name": name, "org": "acme"})).await.unwrap();
    }
    let c: Value = admin
        .post(
            "/api/v1/projects/acme/web/health-checks",
            &json!({"path": "/healthz", "interval_secs": 10, "timeout_secs": 2}),
        )
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap().to_owned();
    let one = format!("/api/v1/projects/acme/web/health-checks/{id}");

    // The first probe passes; by default the figures cover the last 24 hours.
    let listed = until("a passing sample", async || {
        let all: Vec<Value> = admin.get("/api/v1/projects/acme/web/health-checks").await.unwrap();
        (all[0]["uptime_percent"] == 100.0).then_some(all)
    })
    .await;
    assert_eq!(span(&listed[0]), chrono::Duration::hours(24), "{listed:?}");
    assert!(listed[0]["p50_ms"].is_u64() && listed[0]["p95_ms"].is_u64(), "{listed:?}");
    // A window the caller chooses, on one check and on the list.
    let hour: Value = admin.get(&format!("{one}?window=1h")).await.unwrap();
    assert_eq!(span(&hour), chrono::Duration::hours(1), "{hour}");
    assert_eq!(hour["uptime_percent"], 100.0, "{hour}");
    assert_eq!(hour["last_sample"]["ok"], true, "{hour}");
    let week: Vec<Value> = admin.get("/api/v1/projects/acme/web/health-checks?window=7d").await.unwrap();
    assert_eq!(span(&week[0]), chrono::Duration::days(7));
    // A range before the check existed has no samples, so no figures.
    let before: Value = admin.get(&format!("{one}?from=2020-01-01&to=2020-01-02T00:00:00Z")).await.unwrap();
    assert_eq!(span(&before), chrono::Duration::days(1), "{before}");
    assert!(before["uptime_percent"].is_null() && before["p50_ms"].is_null(), "{before}");
    assert!(before["last_sample"].is_null(), "{before}");
    // Bad windows are refused naming the parameter.
    for (query, field) in [
        ("window=2d", "window"),
        ("window=1h&from=2020-01-01", "window"),
        ("from=2026-12-02&to=2026-12-01", "from"),
        ("from=2020-01-01&to=2020-12-31", "from"),
        ("from=yesterday", "from"),
    ] {
        let e = admin.get::<Value>(&format!("{one}?{query}")).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{query}: {e}");
        assert!(e.to_string().contains(field), "{query}: {e}");
    }
    assert_eq!(admin.get::<Value>(&format!("{one}?windw=1h")).await.unwrap_err().status(), Some(400));

    // PATCH replaces the fields given and keeps the others.
    let patched: Value = admin.patch(&one, &json!({"interval_secs": 60, "body_contains": "ok"})).await.unwrap();
    assert_eq!(patched["interval_secs"], 60, "{patched}");
    assert_eq!(patched["body_contains"], "ok", "{patched}");
    assert_eq!(patched["path"], "/healthz", "kept: {patched}");
    assert_eq!(patched["timeout_secs"], 2, "kept: {patched}");
    for (body, field) in [
        (json!({"interval_secs": 5}), "interval_secs"),
        (json!({"timeout_secs": 120}), "timeout_secs"),
        (json!({"regions": ["mars"]}), "regions[0]"),
    ] {
        let e = admin.patch::<_, Value>(&one, &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    let kept: Value = admin.get(&one).await.unwrap();
    assert_eq!(kept["interval_secs"], 60, "a refused change changes nothing: {kept}");
    // A check is only reachable through its own project.
    let elsewhere = format!("/api/v1/projects/acme/api/health-checks/{id}");
    assert_eq!(
        admin.patch::<_, Value>(&elsewhere, &json!({"interval_secs": 30})).await.unwrap_err().status(),
        Some(404)
    );
    assert_eq!(admin.delete(&elsewhere).await.unwrap_err().status(), Some(404));
    assert_eq!(admin.get::<Value>(&elsewhere).await.unwrap_err().status(), Some(404));

    // DELETE removes the check and its samples.
    admin.delete(&one).await.unwrap();
    assert_eq!(admin.get::<Value>(&one).await.unwrap_err().status(), Some(404));
    assert_eq!(admin.delete(&one).await.unwrap_err().status(), Some(404));
    let all: Vec<Value> = admin.get("/api/v1/projects/acme/web/health-checks").await.unwrap();
    assert!(all.is_empty(), "{all:?}");
    let samples = admin.get::<Value>(&format!("/api/v1/health-checks/{id}/samples")).await.unwrap_err();
    assert_eq!(samples.status(), Some(404));
    let audit: Vec<Value> = admin.get("/api/v1/events?action=health_check.delete").await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    op.shutdown().await;
}
