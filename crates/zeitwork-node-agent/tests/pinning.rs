//! Safer releases with real parts: an operator on SQLite, a real registry,
//! runc instances and an edge proxy in front.
//!
//! - Skew protection: a browser pinned by its cookie keeps getting the version
//!   that served its page after a deploy, new browsers get the new one, and a
//!   cookie naming another project's deployment is ignored; on both of the
//!   edge's HTTP/1.1 paths.
//! - Release commands run once before traffic moves, their output in the
//!   deployment's logs; a failing one fails the deployment with its output.
//! - A rollback across a deployment that migrated data is refused without
//!   `force` and goes through with it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::NodeAgent;

mod common;

/// An image answering `version` on every path.
async fn versioned(reg: &zeitwork_testkit::Registry, version: &str) -> String {
    let script = format!("echo {version} > /tmp/index.html; exec /bin/busybox httpd -f -p $PORT -h /tmp");
    reg.push_busybox("acme/web", version, &script).await.unwrap()
}

/// Records a deployment (`extra` merged into the request); its id.
async fn deploy(admin: &Client, project: &str, image: &str, extra: Value) -> String {
    let mut body = json!({"org": "acme", "project": project, "image": image, "instances_per_region": 1});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
    d["id"].as_str().unwrap().to_owned()
}

/// Waits until deployment `id` is `status` (or failed, or 90 s passed: then says what it is).
async fn wait_for(admin: &Client, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
        if d["status"] == status {
            return d;
        }
        if d["status"] == "failed" || Instant::now() > deadline {
            let i: Value = admin.get(&format!("/api/v1/deployments/{id}/instances")).await.unwrap();
            panic!("{id} never became {status}: {d}\ninstances: {i}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A response read off the wire: status, headers (lowercase names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request to the edge as raw bytes and reads the answer until the
/// connection closes. `HTTP/1.1` requests take the edge's lean path, `HTTP/1.0`
/// ones its general (hyper) path.
async fn get(edge: std::net::SocketAddr, version: &str, host: &str, cookie: Option<&str>) -> Answer {
    let mut s = tokio::net::TcpStream::connect(edge).await.unwrap();
    let cookie = cookie.map(|c| format!("Cookie: theme=dark; {c}\r\n")).unwrap_or_default();
    let req = format!("GET / HTTP/{version}\r\nHost: {host}\r\nConnection: close\r\n{cookie}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer { status, headers, body: body.to_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_pinned_by_its_cookie_keeps_its_version_after_a_deploy() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let (v1, v2) = (versioned(&reg, "v1").await, versioned(&reg, "v2").await);
    let shop_image = versioned(&reg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let config = OperatorConfig { apps_scheme: "http".into(), ..Default::default() };
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "shop", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
        )
        .await
        .unwrap();

    // Bad settings are refused, naming the field.
    for (body, field) in [
        (json!({"skew_protection": {"enabled": true, "max_age_secs": 5}}), "skew_protection.max_age_secs"),
        (json!({"skew_protection": {"enabled": true, "max_age": 600}}), "max_age"),
    ] {
        let e = admin.patch::<_, Value>("/api/v1/projects/acme/web", &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }

    let token = common::cluster_token(&admin, "node-agent").await;
    let agent =
        NodeAgent::start(common::agent_config(&base, token, dir.path(), "skew-node", "10.245.0.0")).await.unwrap();
    let edge = common::edge(&base, common::cluster_token(&admin, "edge-proxy").await, 0).await;
    let at = edge.http_addr();
    let stable = "web-acme.zeitwork.localhost";

    let shop = deploy(&admin, "shop", &shop_image, json!({})).await;
    let old = deploy(&admin, "web", &v1, json!({})).await;
    wait_for(&admin, &shop, "active").await;
    wait_for(&admin, &old, "active").await;

    // Off by default: no cookie (once the edge has the route: it learns of the
    // activation a moment after the API reports it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let a = loop {
        let a = get(at, "1.1", stable, None).await;
        if a.status != 404 || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((a.status, a.body.as_str()), (200, "v1\n"), "{a:?}");
    assert_eq!(a.header("set-cookie"), None, "{a:?}");

    let p: Value = admin
        .patch("/api/v1/projects/acme/web", &json!({"skew_protection": {"enabled": true, "max_age_secs": 600}}))
        .await
        .unwrap();
    assert_eq!(p["skew_protection"], json!({"enabled": true, "max_age_secs": 600}));
    // The edge learns of the setting with the next routing table.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let a = get(at, "1.1", stable, None).await;
        if a.header("set-cookie").is_some() {
            break a;
        }
        assert!(Instant::now() < deadline, "no cookie after turning skew protection on: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first.body, "v1\n");
    assert_eq!(
        first.header("set-cookie"),
        Some(format!("zeitwork_deployment={old}; Max-Age=600; Path=/; HttpOnly; SameSite=Lax").as_str()),
        "{first:?}"
    );
    assert_eq!(first.header("x-zeitwork-deployment"), Some(old.as_str()));
    let pinned_old = format!("zeitwork_deployment={old}");

    // A new version goes live; the old one stands by.
    let new = deploy(&admin, "web", &v2, json!({})).await;
    wait_for(&admin, &new, "active").await;
    wait_for(&admin, &old, "standby").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(at, "1.1", stable, None).await.body != "v2\n" {
        assert!(Instant::now() < deadline, "the stable address never moved to v2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for version in ["1.1", "1.0"] {
        // The pinned client keeps its version, and is not told to change its cookie.
        let a = get(at, version, stable, Some(&pinned_old)).await;
        assert_eq!((a.status, a.body.as_str()), (200, "v1\n"), "HTTP/{version}: {a:?}");
        assert_eq!(a.header("x-zeitwork-deployment"), Some(old.as_str()), "HTTP/{version}: {a:?}");
        assert_eq!(a.header("set-cookie"), None, "HTTP/{version}: {a:?}");

        // A new client gets the new version, and a cookie naming it.
        let a = get(at, version, stable, None).await;
        assert_eq!((a.status, a.body.as_str()), (200, "v2\n"), "HTTP/{version}: {a:?}");
        let cookie = a.header("set-cookie").unwrap_or_default();
        assert!(cookie.starts_with(&format!("zeitwork_deployment={new};")), "HTTP/{version}: {a:?}");

        // Forged or broken cookies are ignored: another project's deployment, garbage.
        for forged in [format!("zeitwork_deployment={shop}"), "zeitwork_deployment=../../x".to_owned()] {
            let a = get(at, version, stable, Some(&forged)).await;
            assert_eq!((a.status, a.body.as_str()), (200, "v2\n"), "HTTP/{version} {forged}: {a:?}");
            assert!(
                a.header("set-cookie").unwrap_or_default().starts_with(&format!("zeitwork_deployment={new};")),
                "HTTP/{version} {forged}: {a:?}"
            );
        }
        // The other project's own address is not touched by a cookie naming web's deployment.
        let a = get(at, version, "shop-acme.zeitwork.localhost", Some(&pinned_old)).await;
        assert_eq!((a.status, a.body.as_str()), (200, "shop\n"), "HTTP/{version}: {a:?}");
    }

    // A sleeping deployment still serves its pinned clients: the request is held while it wakes.
    admin.post_empty::<Value>(&format!("/api/v1/deployments/{old}/sleep")).await.unwrap();
    wait_for(&admin, &old, "sleeping").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin
        .get::<Value>(&format!("/api/v1/deployments/{old}/instances"))
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["status"] == "ready")
    {
        assert!(Instant::now() < deadline, "the sleeping deployment kept a ready instance");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The edge follows the table a moment later: until it knows that the
    // deployment has no instance left, it would still send there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while edge.state.routes.read().unwrap().hosts.values().any(|r| r.deployment == old && !r.instances.is_empty()) {
        assert!(Instant::now() < deadline, "the edge never learnt that the sleeping deployment has no instance");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = get(at, "1.1", stable, Some(&pinned_old)).await;
    assert_eq!((a.status, a.body.as_str()), (200, "v1\n"), "a pinned client of a sleeping deployment: {a:?}");
    let d: Value = admin.get(&format!("/api/v1/deployments/{old}")).await.unwrap();
    assert_ne!(d["status"], "sleeping", "answered without waking it: {d}");

    // A retired deployment pins nobody: the client gets the active version and a new cookie.
    admin.delete(&format!("/api/v1/deployments/{old}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = get(at, "1.1", stable, Some(&pinned_old)).await;
        if a.body == "v2\n" {
            assert!(a.header("set-cookie").unwrap_or_default().contains(&new), "{a:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a retired deployment still served a pinned client: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    edge.shutdown().await;
    agent.shutdown().await;
    op.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_commands_run_before_traffic_and_rollbacks_respect_migrations() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let (v1, v2, v3) = (versioned(&reg, "v1").await, versioned(&reg, "v2").await, versioned(&reg, "v3").await);
    let dir = tempfile::tempdir().unwrap();
    let config = OperatorConfig { apps_scheme: "http".into(), ..Default::default() };
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let (op, base, admin) = common::operator(dir.path(), config, project).await;

    // Bad input is refused, naming the field.
    let e = admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"release_command": "echo \u{7}"}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("release_command"), "{e}");
    let body = json!({"org": "acme", "project": "web", "image": v1, "release_command": "x".repeat(5000)});
    let e = admin.post::<_, Value>("/api/v1/deployments", &body).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("release_command"), "{e}");
    let body = json!({"org": "acme", "project": "web", "image": v1, "migration": "yes"});
    let e = admin.post::<_, Value>("/api/v1/deployments", &body).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("migration"), "{e}");

    let token = common::cluster_token(&admin, "node-agent").await;
    let agent =
        NodeAgent::start(common::agent_config(&base, token, dir.path(), "release-node", "10.254.0.0")).await.unwrap();

    // The project's release command runs before the first deployment goes live; its output is in the logs.
    admin
        .patch::<_, Value>(
            "/api/v1/projects/acme/web",
            &json!({"release_command": "echo running release for $GREETING; echo schema is at version 1"}),
        )
        .await
        .unwrap();
    admin.put::<_, Value>("/api/v1/projects/acme/web/env/GREETING", &json!({"value": "acme-web"})).await.unwrap();
    // Two instances: one runs the release, the other starts once it has.
    let first = deploy(&admin, "web", &v1, json!({"instances_per_region": 2})).await;
    let d = wait_for(&admin, &first, "active").await;
    assert_eq!(d["release_command"], "echo running release for $GREETING; echo schema is at version 1");
    let (_, _, logs) =
        admin.send_raw(reqwest::Method::GET, &format!("/api/v1/deployments/{first}/logs"), None).await.unwrap();
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.contains("running release for acme-web"), "the release's output is not in the logs:\n{logs}");
    assert_eq!(logs.matches("schema is at version 1").count(), 1, "the release ran more than once:\n{logs}");
    let instances: Vec<Value> = admin.get(&format!("/api/v1/deployments/{first}/instances")).await.unwrap();
    assert_eq!(instances.iter().filter(|i| i["status"] == "ready").count(), 2, "{instances:?}");

    // A deployment that migrates data, then one that does not.
    let migrating = deploy(
        &admin,
        "web",
        &v2,
        json!({"migration": true, "release_command": "echo migrating the schema to version 2"}),
    )
    .await;
    let d = wait_for(&admin, &migrating, "active").await;
    assert_eq!(d["migration"], true);
    let third = deploy(&admin, "web", &v3, json!({})).await;
    wait_for(&admin, &third, "active").await;

    // A failing release command fails its deployment with its output; traffic stays where it was.
    let broken = deploy(
        &admin,
        "web",
        &v1,
        json!({"release_command": "echo connecting to the database; echo 'migration 7 failed: column exists' >&2; exit 3"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let failed = loop {
        let d: Value = admin.get(&format!("/api/v1/deployments/{broken}")).await.unwrap();
        if d["status"] == "failed" {
            break d;
        }
        assert_ne!(d["status"], "active", "a deployment whose release failed went live: {d}");
        assert!(Instant::now() < deadline, "{broken} never failed: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("release command failed"), "{failed}");
    assert!(reason.contains("migration 7 failed: column exists"), "{failed}");
    assert!(reason.contains("connecting to the database"), "{failed}");
    let current: Value = admin.get("/api/v1/projects/acme/web/deployments/current").await.unwrap();
    assert_eq!(current["id"], third.as_str());

    // Going back to the migrating deployment crosses nothing.
    let to_migrating = json!({"to": migrating});
    let d: Value = admin.post("/api/v1/projects/acme/web/rollback", &to_migrating).await.unwrap();
    assert_eq!(d["id"], migrating.as_str());
    // Going back past it is refused, saying how to insist; the engine can ask the same question.
    let crossed = op.store.rollback_crosses_migration(&migrating, &first, zeitwork_api_types::Environment::Production);
    assert_eq!(crossed.await.unwrap().map(|d| d.id), Some(migrating.clone()));
    let back = json!({"to": first});
    let e = admin.post::<_, Value>("/api/v1/projects/acme/web/rollback", &back).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("--force") && e.to_string().contains(&migrating), "{e}");
    // From the newest deployment too: it still goes back past the migration.
    admin.post::<_, Value>("/api/v1/projects/acme/web/rollback", &json!({"to": third})).await.unwrap();
    let e = admin.post::<_, Value>("/api/v1/projects/acme/web/rollback", &back).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let current: Value = admin.get("/api/v1/projects/acme/web/deployments/current").await.unwrap();
    assert_eq!(current["id"], third.as_str(), "a refused rollback moved traffic");
    // With force it goes through.
    let forced: Value =
        admin.post("/api/v1/projects/acme/web/rollback", &json!({"to": first, "force": true})).await.unwrap();
    assert_eq!(forced["id"], first.as_str());
    let current: Value = admin.get("/api/v1/projects/acme/web/deployments/current").await.unwrap();
    assert_eq!(current["id"], first.as_str());

    agent.shutdown().await;
    op.shutdown().await;
}
