//! Uptime checks with real parts: an app in a runc container behind the edge,
//! probed through the edge by the operator; when the app starts answering 500
//! its check goes `down`, a notification says so, and the samples show it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::NodeAgent;

mod common;

/// A layer of (path, mode, contents); a path ending in `/` is a directory, contents `->x` a link.
fn layer(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, path, &b""[..]).unwrap();
        } else if let Some(target) = body.strip_prefix(b"->") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(target).unwrap()).unwrap();
        } else {
            h.set_size(body.len() as u64);
            b.append_data(&mut h, path, *body).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// busybox httpd with two CGI scripts: `/cgi-bin/health` answers 200 until `/cgi-bin/break` is called, then 500.
const HEALTH: &[u8] = b"#!/bin/sh\nif [ -e /tmp/broken ]; then printf 'Status: 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nbroken\\n'; else printf 'Content-Type: text/plain\\r\\n\\r\\nall good\\n'; fi\n";
const BREAK: &[u8] = b"#!/bin/sh\n: > /tmp/broken\nprintf 'Content-Type: text/plain\\r\\n\\r\\nbroken now\\n'\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_answering_500_turns_its_check_down_and_notifies() {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static");
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let layers = vec![
        layer(&[("bin/", 0o755, b""), ("bin/busybox", 0o755, &busybox), ("bin/sh", 0o777, b"->busybox")]),
        layer(&[
            ("www/", 0o755, b""),
            ("www/index.html", 0o644, b"hello\n"),
            ("www/cgi-bin/", 0o755, b""),
            ("www/cgi-bin/health", 0o755, HEALTH),
            ("www/cgi-bin/break", 0o755, BREAK),
            ("tmp/", 0o1777, b""),
        ]),
    ];
    let config =
        json!({"Entrypoint": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"], "Env": ["PATH=/bin"]});
    reg.push_image("acme/checked", "1", &layers, config).await.unwrap();
    let image = format!("{}/acme/checked:1", reg.addr);

    // A receiver for the notifications.
    let got: Arc<Mutex<Vec<Value>>> = Default::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let sink = sink.clone();
        async move {
            sink.lock().unwrap().push(serde_json::from_str(&body).unwrap_or(Value::Null));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let edge_port = zeitwork_testkit::free_port();
    let config = OperatorConfig {
        apps_scheme: "http".into(),
        uptime_via: Some(([127, 0, 0, 1], edge_port).into()),
        notifications_allow_internal: true,
        ..Default::default()
    };
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}, "instances_per_region": 1});
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{receiver}/"), "secret": "a signing secret of 32 chars.", "events": ["health_check.state"]}),
        )
        .await
        .unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent =
        NodeAgent::start(common::agent_config(&base, token, dir.path(), "uptime-node", "10.242.0.0")).await.unwrap();
    let edge = common::edge(&base, common::cluster_token(&admin, "edge-proxy").await, edge_port).await;
    let d: Value =
        admin.post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": image})).await.unwrap();
    let id = d["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin.get::<Value>(&format!("/api/v1/deployments/{id}")).await.unwrap()["status"] != "active" {
        if Instant::now() > deadline {
            let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
            let i: Value = admin.get(&format!("/api/v1/deployments/{id}/instances")).await.unwrap();
            panic!("the app never went live: {d}\n{i}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bad settings are refused, naming the field.
    for (body, field) in [
        (json!({"interval_secs": 5}), "interval_secs"),
        (json!({"regions": ["mars"]}), "regions[0]"),
        (json!({"path": "healthz"}), "path"),
        (json!({"timeout_secs": 30, "interval_secs": 10}), "timeout_secs"),
    ] {
        let e = admin.post::<_, Value>("/api/v1/projects/acme/web/health-checks", &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    // A second region with a node of its own: the check probes from both, the
    // operator's region by itself and `eu` through that node.
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "Germany"}))
        .await
        .unwrap();
    let eu_agent = NodeAgent::start(zeitwork_node_agent::NodeAgentConfig {
        region: "eu".into(),
        ..common::agent_config(
            &base,
            common::cluster_token(&admin, "node-agent").await,
            &dir.path().join("eu"),
            "uptime-node-eu",
            // A /16 of its own: a starting agent sweeps its range of what it does not know.
            "10.252.0.0",
        )
    })
    .await
    .unwrap();
    let check: Value = admin
        .post(
            "/api/v1/projects/acme/web/health-checks",
            &json!({"path": "/cgi-bin/health", "interval_secs": 10, "timeout_secs": 5, "body_contains": "good",
                    "regions": ["local", "eu"]}),
        )
        .await
        .unwrap();
    let check_id = check["id"].as_str().unwrap().to_owned();
    assert_eq!(check["url"], "http://web-acme.zeitwork.localhost/cgi-bin/health");
    let state = |want: &'static str| {
        let admin = admin.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let checks: Vec<Value> = admin.get("/api/v1/projects/acme/web/health-checks").await.unwrap();
                if checks[0]["state"] == want {
                    return checks[0].clone();
                }
                assert!(Instant::now() < deadline, "the check never became {want}: {}", checks[0]);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let up = state("up").await;
    assert_eq!(up["uptime_percent"], 100.0, "{up}");
    let first: Vec<Value> = admin.get(&format!("/api/v1/health-checks/{check_id}/samples")).await.unwrap();
    for region in ["local", "eu"] {
        assert!(first.iter().any(|s| s["region"] == region && s["ok"] == true), "no sample from {region}: {first:?}");
    }
    let started = chrono::Utc::now();

    // The app starts answering 500.
    let res = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{edge_port}/cgi-bin/break"))
        .header("host", "web-acme.zeitwork.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let down = state("down").await;
    assert!(down["uptime_percent"].as_f64().unwrap() < 100.0, "{down}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = got.lock().unwrap().clone();
        if seen.iter().any(|n| n["event"] == "health_check.state" && n["detail"]["to"] == "down") {
            break;
        }
        assert!(Instant::now() < deadline, "no notification of the check going down: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let from = started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let samples: Vec<Value> = admin
        .get(&format!("/api/v1/health-checks/{check_id}/samples?from={}", from.replace('+', "%2B")))
        .await
        .unwrap();
    let failing: Vec<&Value> = samples.iter().filter(|s| s["ok"] == false).collect();
    assert!(failing.len() >= 2, "{samples:?}");
    assert!(failing.iter().all(|s| s["status"] == 500 && s["error"].as_str().unwrap().contains("500")), "{samples:?}");
    assert!(failing.iter().any(|s| s["region"] == "eu"), "the eu node saw the failure too: {samples:?}");
    let paged = admin
        .get_with_headers::<Vec<Value>>(&format!("/api/v1/health-checks/{check_id}/samples?limit=1"))
        .await
        .unwrap();
    assert_eq!(paged.0.len(), 1);
    let bad =
        admin.get::<Value>(&format!("/api/v1/health-checks/{check_id}/samples?from=yesterday")).await.unwrap_err();
    assert_eq!(bad.status(), Some(400));

    edge.shutdown().await;
    eu_agent.shutdown().await;
    agent.shutdown().await;
    op.shutdown().await;
}
