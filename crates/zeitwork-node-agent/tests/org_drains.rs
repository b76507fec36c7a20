//! An organisation's own log drain, end to end: a local HTTP log receiver
//! gets the app log lines and audit events of its organisation, through the
//! node agent and the operator, and never another organisation's lines,
//! which reach that organisation's own drain instead.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

mod common;

/// Lines received per path (`/acme`, `/other`).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn receiver() -> (std::net::SocketAddr, Received) {
    let got: Received = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                if let Ok(Value::Array(lines)) = serde_json::from_slice::<Value>(&body) {
                    let mut sink = sink.lock().unwrap();
                    for mut l in lines {
                        l["_auth"] = auth.clone().into();
                        sink.push((uri.path().to_owned(), l));
                    }
                }
                axum::http::StatusCode::NO_CONTENT
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

fn lines_at(got: &Received, path: &str) -> Vec<Value> {
    got.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, l)| l.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orgs_app_logs_and_audit_events_reach_its_own_drain_only() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, got) = receiver().await;
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let acme_image = reg
        .push_busybox("acme/web", "1", "echo 'hello from acme'; exec /bin/busybox httpd -f -p 8080 -h /www")
        .await
        .unwrap();
    let other_image = reg
        .push_busybox("other/web", "1", "echo 'hello from other'; exec /bin/busybox httpd -f -p 8080 -h /www")
        .await
        .unwrap();
    let project = |org: &str| json!({"name": "web", "org": org, "port": 8080, "resources": {"vcpu": 1, "memory": 128}, "instances_per_region": 1});
    // The receiver is on loopback, which organisations' drains may reach only when allowed.
    let config = OperatorConfig { drain_allowed_networks: vec!["127.0.0.0/8".into()], ..Default::default() };
    let (op, base, admin) = common::operator(dir.path(), config, project("acme")).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &project("other")).await.unwrap();

    // Bad input is refused with the field named.
    for (body, field) in [
        (json!({"url": "ftp://logs:21"}), "url"),
        (json!({"url": format!("http://{addr}/acme"), "sources": ["metrics"]}), "sources"),
        (json!({"url": "udp://127.0.0.1:514", "token": "t"}), "token"),
        (json!({"url": format!("https://{addr}/acme"), "ca": "not a certificate"}), "ca"),
        // Loopback is allowed here, the platform's other networks are not.
        (json!({"url": "udp://10.1.2.3:514"}), "drain_allowed_networks"),
        (json!({"url": "http://169.254.169.254/latest"}), "drain_allowed_networks"),
    ] {
        let e = admin.post::<_, Value>("/api/v1/orgs/acme/log-drains", &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    // The destination and token are never shown again.
    let d: Value = admin
        .post(
            "/api/v1/orgs/acme/log-drains",
            &json!({"url": format!("http://{addr}/acme?key=url-secret"), "token": "acme-token", "sources": ["app", "audit"]}),
        )
        .await
        .unwrap();
    assert_eq!(d["kind"], "http-json");
    assert_eq!(d["url"], "http://127.0.0.1/…");
    assert_eq!(d["has_token"], true);
    admin
        .post::<_, Value>("/api/v1/orgs/other/log-drains", &json!({"url": format!("http://{addr}/other")}))
        .await
        .unwrap();
    let listed = admin.stream("/api/v1/orgs/acme/log-drains").await.unwrap().text().await.unwrap();
    assert!(!listed.contains("url-secret") && !listed.contains("acme-token") && !listed.contains("/other"), "{listed}");
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");

    let token = common::cluster_token(&admin, "node-agent").await;
    let agent = NodeAgent::start(NodeAgentConfig {
        ..common::agent_config(&base, token, dir.path(), "drains-node", "10.205.0.0")
    })
    .await
    .unwrap();
    for (org, image) in [("acme", &acme_image), ("other", &other_image)] {
        admin
            .post::<_, Value>("/api/v1/deployments", &json!({"org": org, "project": "web", "image": image}))
            .await
            .unwrap();
    }
    // Each organisation's app lines reach its own drain, with their app and the token.
    let has = |path: &str, text: &str| lines_at(&got, path).into_iter().find(|l| l["message"] == text);
    let acme_line = common::until("acme's app line at its drain", async || has("/acme", "hello from acme")).await;
    assert_eq!(acme_line["org"], "acme", "{acme_line}");
    assert_eq!(acme_line["stream"], "stdout", "{acme_line}");
    assert_eq!(acme_line["_auth"], "Bearer acme-token", "{acme_line}");
    common::until("other's app line at its drain", async || has("/other", "hello from other")).await;
    // What the drains sent is counted by kind of drain (both are HTTP drains here).
    let scrape = format!("http://{}/metrics", agent.addr());
    let admin_token = op.admin_token.clone().unwrap();
    common::until("the organisations' drains' lines counted on /metrics", async || {
        let m = reqwest::Client::new().get(&scrape).bearer_auth(&admin_token).send().await.ok()?.text().await.ok()?;
        let sent = m
            .lines()
            .find_map(|l| l.strip_prefix("zeitwork_node_agent_org_log_lines_forwarded_total{kind=\"http-json\"} "))?
            .parse::<u64>()
            .ok()?;
        let dropped =
            m.lines().any(|l| l.starts_with("zeitwork_node_agent_org_log_lines_dropped_total{kind=\"http-json\"} 0"));
        (sent >= 2 && dropped).then_some(())
    })
    .await;

    // Audit events: the operator tails them from the newest once it leads, so keep
    // making changes in both organisations until acme's reaches its drain.
    let mut n = 0;
    let audit = common::until("an audit line of acme at its drain", async || {
        n += 1;
        for org in ["acme", "other"] {
            admin
                .post::<_, Value>("/api/v1/projects", &json!({"name": format!("p{n}"), "org": org, "port": 8080}))
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        lines_at(&got, "/acme")
            .into_iter()
            .find(|l| l["stream"] == "audit" && l["message"].as_str().unwrap_or("").starts_with("project.create"))
    })
    .await;
    assert_eq!(audit["org"], "acme", "{audit}");
    // The other organisation's events went to its drain (it takes every source)...
    common::until("an audit line of other at its drain", async || {
        lines_at(&got, "/other").into_iter().find(|l| l["stream"] == "audit")
    })
    .await;
    // ...and nothing of it reached acme's.
    let acme = lines_at(&got, "/acme");
    assert!(acme.iter().all(|l| l["org"] == "acme"), "another org's line at acme's drain: {acme:?}");
    assert!(!acme.iter().any(|l| l["message"] == "hello from other"), "{acme:?}");

    // A deleted drain is told to the agent with the next assignments.
    let id = d["id"].as_str().unwrap();
    admin.delete(&format!("/api/v1/orgs/acme/log-drains/{id}")).await.unwrap();
    let e = admin.delete(&format!("/api/v1/orgs/other/log-drains/{id}")).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let left: Vec<Value> = admin.get("/api/v1/orgs/acme/log-drains").await.unwrap();
    assert!(left.is_empty(), "{left:?}");

    agent.shutdown().await;
    op.shutdown().await;
}
