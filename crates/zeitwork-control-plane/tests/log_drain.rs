//! The operator's log drain: the audit log reaches an HTTP log receiver on
//! loopback as JSON batches, and a drain that cannot work stops the start.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use zeitwork_control_plane::OperatorConfig;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_reaches_an_http_drain() {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let sink = sink.clone();
        async move {
            if let Ok(Value::Array(lines)) = serde_json::from_slice::<Value>(&body) {
                sink.lock().unwrap().extend(lines);
            }
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        log_forward: Some(format!("http://{addr}/logs")),
        ..Default::default()
    })
    .await;
    // The drain starts at the newest event once this operator leads; wait for the lease.
    common::until("the engine lease", async || {
        let c: Value = admin.get("/api/v1/cluster").await.ok()?;
        c["engine_leader"].as_str().filter(|l| !l.is_empty()).map(|_| ())
    })
    .await;
    // Keep making changes until one is drained: the drain begins at the newest event it sees.
    let mut n = 0;
    let line = common::until("an audit line at the drain", async || {
        n += 1;
        admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": format!("drained-{n}")})).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        got.lock().unwrap().iter().find(|l| l["stream"] == "audit").cloned()
    })
    .await;
    assert!(line["message"].as_str().unwrap().starts_with("org.create drained-"), "{line}");
    assert_eq!(line["severity"], "notice", "{line}");
    assert!(line["@timestamp"].as_str().is_some(), "{line}");
    op.shutdown().await;

    // A drain that names no usable target is refused before the operator starts.
    let bad = OperatorConfig { log_forward: Some("ftp://logs:21".into()), ..Default::default() };
    let e = bad.validate().unwrap_err();
    assert_eq!(e.field, "log_forward");
}
