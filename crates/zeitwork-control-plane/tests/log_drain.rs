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

/// An organisation's drain is sent from inside the platform's network, so it may
/// not point there: a host that is, or resolves to, a loopback, link-local,
/// private, shared, unspecified or multicast address is refused with 400,
/// unless the operator allows its network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orgs_drain_may_not_point_inside_the_platform() {
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) =
        common::operator_with(OperatorConfig { data_dir: dir.path().to_owned(), ..Default::default() }).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    // Build output only: nothing is sent to the accepted drains while the test runs.
    let drain = |url: &str| json!({"url": url, "sources": ["build"]});
    for (url, kind) in [
        ("udp://127.0.0.1:514", "127.0.0.1 is a loopback address"),
        ("tcp://localhost:514", "localhost resolves to "),
        ("tls://[::1]:6514", "::1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("udp://169.254.10.1:514", "link-local"),
        ("udp://[fe80::1]:514", "link-local"),
        ("https://10.0.0.5/logs", "10.0.0.5 is a private address"),
        ("loki+http://192.168.1.10:3100/loki/api/v1/push", "private"),
        ("elasticsearch+http://172.20.0.2:9200/logs/_bulk", "private"),
        ("udp://[fd00::5]:514", "private (unique local)"),
        ("udp://100.96.0.7:514", "shared"),
        ("udp://0.0.0.0:514", "unspecified"),
        ("udp://224.0.0.251:5353", "multicast"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://2130706433/", "loopback"),
    ] {
        let e = admin.post::<_, Value>("/api/v1/orgs/acme/log-drains", &drain(url)).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{url}: {e}");
        let text = e.to_string();
        assert!(text.contains("url") && text.contains(kind) && text.contains("drain_allowed_networks"), "{url}: {e}");
    }
    // A public receiver is taken.
    let d: Value = admin.post("/api/v1/orgs/acme/log-drains", &drain("udp://203.0.113.7:514")).await.unwrap();
    assert_eq!(d["url"], "udp://203.0.113.7/…");
    let listed: Vec<Value> = admin.get("/api/v1/orgs/acme/log-drains").await.unwrap();
    assert_eq!(listed.len(), 1, "only the public drain is stored: {listed:?}");
    op.shutdown().await;

    // An operator may allow internal networks, and only those.
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        drain_allowed_networks: vec!["127.0.0.0/8".into(), "::1".into(), "10.20.0.0/16".into()],
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    for url in ["udp://127.0.0.1:514", "tcp://localhost:514", "tls://[::1]:6514", "https://10.20.3.4/logs"] {
        admin.post::<_, Value>("/api/v1/orgs/acme/log-drains", &drain(url)).await.unwrap();
    }
    for url in ["https://10.21.0.1/logs", "http://169.254.169.254/"] {
        let e = admin.post::<_, Value>("/api/v1/orgs/acme/log-drains", &drain(url)).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{url}: {e}");
    }
    op.shutdown().await;

    let bad = OperatorConfig { drain_allowed_networks: vec!["10.0.0.0/8x".into()], ..Default::default() };
    assert_eq!(bad.validate().unwrap_err().field, "drain_allowed_networks");
}
