//! Safer releases with real parts: an operator on SQLite, a real registry,
//! runc instances, and an edge proxy carrying continuous load from many
//! client addresses. A version that answers 500 on its main path after
//! passing readiness is rolled back on its own, with the reason recorded,
//! audited and notified; a healthy version passes a 1/10/50/100 canary with
//! every client kept on its side; bad release settings are refused naming
//! the field.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use zeitwork_control_plane::OperatorConfig;

mod common;

use common::releases::{cgi, clients, platform};

/// Instance addresses of this file's agent.
const RANGE: &str = "10.244.0.0";

/// One answer the load saw.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    client: usize,
    /// 0 when no answer came (connection refused, timeout).
    status: u16,
    body: String,
}

/// Clients, each with its own loopback address, each asking `path` of
/// `host` through the edge every `every` until `stop`.
fn load(
    edge: SocketAddr,
    host: &str,
    path: &str,
    clients: &[IpAddr],
    every: Duration,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Vec<Hit>>> {
    clients
        .iter()
        .enumerate()
        .map(|(n, ip)| {
            let (host, url, mut stop, ip) = (host.to_owned(), format!("http://{edge}{path}"), stop.clone(), *ip);
            tokio::spawn(async move {
                let http =
                    reqwest::Client::builder().local_address(ip).timeout(Duration::from_secs(5)).build().unwrap();
                let mut hits = Vec::new();
                while !*stop.borrow() {
                    let (status, body) = match http.get(&url).header("host", &host).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            (status, r.text().await.unwrap_or_default().trim().to_owned())
                        }
                        Err(_) => (0, String::new()),
                    };
                    hits.push(Hit { at: Instant::now(), client: n, status, body });
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.changed() => {}
                    }
                }
                hits
            })
        })
        .collect()
}

async fn gather(tasks: Vec<tokio::task::JoinHandle<Vec<Hit>>>) -> Vec<Hit> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|h| h.at);
    all
}

/// A webhook receiver that keeps every body it is sent (answers 204).
fn webhook_receiver() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = got.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= head_end + 4 + len {
                        keep.lock().unwrap().push(String::from_utf8_lossy(&buf[head_end + 4..]).into_owned());
                        break;
                    }
                }
            }
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_regression_is_rolled_back_on_its_own_and_a_healthy_canary_passes() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    // Both answer readiness on `/` (the static index); the bad one fails its main path.
    let good = reg.push_busybox("acme/web", "good", &cgi("200 OK", "v1")).await.unwrap();
    let bad = reg.push_busybox("acme/web", "bad", &cgi("500 Internal Server Error", "broken")).await.unwrap();
    let p = platform("releases-node", RANGE).await;
    let (hook_at, hooks) = webhook_receiver();

    // ---- automatic rollback
    p.admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128},
                    "auto_rollback": {"window_secs": 10, "min_requests": 20, "watch_secs": 300}}),
        )
        .await
        .unwrap();
    p.admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{hook_at}/hook"), "secret": "a webhook secret of ours",
                    "events": ["deployment.auto_rollback"]}),
        )
        .await
        .unwrap();
    let v1 = p.deploy("web", &good).await;
    p.wait_for(&v1, &["active"], Duration::from_secs(90)).await;
    let host = "web-acme.zeitwork.localhost";
    p.wait_served(host, "/cgi-bin/app", "v1").await;

    let (stop, stop_rx) = watch::channel(false);
    let tasks = load(p.edge.http_addr(), host, "/cgi-bin/app", &clients(1, 6), Duration::from_millis(100), stop_rx);
    // The previous deployment's figures make the baseline.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v2 = p.deploy("web", &bad).await;
    p.wait_for(&v2, &["active", "rolled_back", "failed"], Duration::from_secs(90)).await;
    let rolled = p.wait_for(&v2, &["rolled_back"], Duration::from_secs(60)).await;
    let rolled_seen = Instant::now();
    // Load goes on for a while after the rollback: it must all be v1 again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    let hits = gather(tasks).await;

    let reason = rolled["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("rolled back automatically to") && reason.contains(&v1), "{reason}");
    assert!(reason.contains("5xx rate"), "{reason}");
    let project: Value = p.admin.get("/api/v1/projects/acme/web").await.unwrap();
    assert_eq!(project["current_deployment"]["production"], v1.as_str(), "{project}");
    assert_eq!(p.deployment(&v1).await["status"], "active");
    let rollout: Value = p.admin.get(&format!("/api/v1/deployments/{v2}/rollout")).await.unwrap();
    assert_eq!(rollout["state"], "rolled_back", "{rollout}");
    assert_eq!(rollout["analysis"]["verdict"], "regressed", "{rollout}");
    // Every failed answer a client saw was counted by the edge and reported, once.
    let failed_seen = hits.iter().filter(|h| h.status >= 500).count() as u64;
    assert_eq!(rollout["served"]["errors"].as_u64(), Some(failed_seen), "{rollout}");

    let failed: Vec<&Hit> = hits.iter().filter(|h| h.status >= 500 || h.status == 0).collect();
    let first_bad = failed.first().expect("the bad version answered some requests").at;
    let last_bad = failed.last().unwrap().at;
    let tail: Vec<&Hit> = hits.iter().filter(|h| h.at > rolled_seen + Duration::from_secs(1)).collect();
    assert!(
        !tail.is_empty() && tail.iter().all(|h| h.status == 200 && h.body == "v1"),
        "after the rollback every answer is v1"
    );
    assert!(
        hits.iter().all(|h| h.status == 200 || h.status >= 500),
        "no request was lost to anything but the bad version"
    );
    // The operator's own count, from the edge's figures, is in the reason.
    let counted = reason.split("; ").last().unwrap_or_default().to_owned();
    println!(
        "automatic rollback: {} of {} requests failed on the client side ({counted}); regression to rollback {:.2} s \
         (first failure to rolled_back), first to last failure {:.2} s",
        failed.len(),
        hits.len(),
        (rolled_seen - first_bad).as_secs_f64(),
        (last_bad - first_bad).as_secs_f64(),
    );
    println!("  reason: {reason}");
    println!(
        "  the operator's count once every report was in: {} of {} requests to the bad version failed",
        rollout["served"]["errors"], rollout["served"]["requests"]
    );

    // Audited, and told through the outbox.
    let events: Vec<Value> = p.admin.get("/api/v1/events?org=acme&action=deployment.auto_rollback").await.unwrap();
    assert!(events.iter().any(|e| e["target"] == v2.as_str()), "{events:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hooks.lock().unwrap().iter().any(|b| b.contains("deployment.auto_rollback") && b.contains(&v2)) {
        assert!(Instant::now() < deadline, "the webhook never got the rollback: {:?}", hooks.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing switches to a rolled-back deployment again.
    let again = p.admin.post::<_, Value>("/api/v1/projects/acme/web/rollback", &json!({"to": v2})).await.unwrap_err();
    assert_eq!(again.status(), Some(409), "{again}");

    // ---- a healthy canary, 1/10/50/100
    let shop1 = reg
        .push_busybox("acme/shop", "v1", "echo v1 > /www/version && exec /bin/busybox httpd -f -p $PORT -h /www")
        .await
        .unwrap();
    let shop2 = reg
        .push_busybox("acme/shop", "v2", "echo v2 > /www/version && exec /bin/busybox httpd -f -p $PORT -h /www")
        .await
        .unwrap();
    // Latency on a shared test machine is noise (a few hundred requests, other
    // builds on the same cores), not what this canary is about: only errors decide.
    p.admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "shop", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128},
                    "auto_rollback": {"window_secs": 5, "min_requests": 10, "latency_factor": 100},
                    "rollout": {"steps": [1, 10, 50, 100], "step_secs": 4}}),
        )
        .await
        .unwrap();
    let c1 = p.deploy("shop", &shop1).await;
    p.wait_for(&c1, &["active"], Duration::from_secs(90)).await;
    let host = "shop-acme.zeitwork.localhost";
    p.wait_served(host, "/version", "v1").await;
    let shoppers = clients(2, 40);
    let (stop, stop_rx) = watch::channel(false);
    let tasks = load(p.edge.http_addr(), host, "/version", &shoppers, Duration::from_millis(250), stop_rx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c2 = p.deploy("shop", &shop2).await;
    // The steps as the operator reports them, with when each began.
    let mut steps: Vec<(Instant, u32)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = p.deployment(&c2).await;
        if let Ok(r) = p.admin.get::<Value>(&format!("/api/v1/deployments/{c2}/rollout")).await {
            let w = r["weight"].as_u64().unwrap_or(0) as u32;
            if steps.last().map(|s| s.1) != Some(w) {
                steps.push((Instant::now(), w));
            }
        }
        assert!(d["status"] != "rolled_back" && d["status"] != "failed", "the healthy canary was sent back: {d}");
        if d["status"] == "active" {
            break;
        }
        assert!(Instant::now() < deadline, "the canary never finished: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let hits = gather(tasks).await;

    let weights: Vec<u32> = steps.iter().map(|s| s.1).collect();
    assert_eq!(weights, vec![1, 10, 50, 100], "the canary went through every step");
    let rollout: Value = p.admin.get(&format!("/api/v1/deployments/{c2}/rollout")).await.unwrap();
    assert_eq!(rollout["state"], "watching", "{rollout}");
    assert_eq!(p.deployment(&c1).await["status"], "standby");
    assert!(hits.iter().all(|h| h.status == 200), "no failures during a healthy canary");
    // Sticky: a client that reached the new version never went back to the old one.
    let mut on_new: BTreeMap<usize, Instant> = BTreeMap::new();
    for h in &hits {
        match h.body.as_str() {
            "v2" => {
                on_new.entry(h.client).or_insert(h.at);
            }
            "v1" => assert!(!on_new.contains_key(&h.client), "client {} went back to v1 after v2", h.client),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(hits.iter().filter(|h| h.at > promoted + Duration::from_secs(1)).all(|h| h.body == "v2"));
    // Figures per step, from its middle (a routing update takes a moment to reach the edge).
    let last_hit = hits.last().map_or(promoted, |h| h.at);
    for (i, (at, w)) in steps.iter().enumerate() {
        let end = steps.get(i + 1).map_or(last_hit, |s| s.0);
        let margin = Duration::from_millis(500);
        let in_step: Vec<&Hit> = hits.iter().filter(|h| h.at >= *at + margin && h.at + margin < end).collect();
        let new = in_step.iter().filter(|h| h.body == "v2").count();
        let mut clients_new: Vec<usize> = in_step.iter().filter(|h| h.body == "v2").map(|h| h.client).collect();
        clients_new.dedup();
        clients_new.sort_unstable();
        clients_new.dedup();
        println!(
            "canary step {w:>3} %: {:>4} requests, {:>5.1} % answered by the new version, {} of {} clients on it",
            in_step.len(),
            100.0 * new as f64 / in_step.len().max(1) as f64,
            clients_new.len(),
            shoppers.len()
        );
    }
    p.edge.shutdown().await;
    p.agent.shutdown().await;
    drop(p.op);
}

/// Settings out of range, canary steps not increasing or not ending at
/// 100: refused with 400, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_release_settings_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator(
        dir.path(),
        OperatorConfig::default(),
        json!({"name": "web", "org": "acme", "resources": {"vcpu": 1, "memory": 128}}),
    )
    .await;
    let cases = [
        (json!({"auto_rollback": {"error_rate": 5}}), "auto_rollback.error_rate"),
        (json!({"auto_rollback": {"latency_factor": 1.0}}), "auto_rollback.latency_factor"),
        (json!({"auto_rollback": {"window_secs": 0}}), "auto_rollback.window_secs"),
        (json!({"auto_rollback": {"min_requests": 0}}), "auto_rollback.min_requests"),
        (json!({"auto_rollback": {"watch_secs": 100000}}), "auto_rollback.watch_secs"),
        (json!({"auto_rollback": {"enabled": true, "bogus": 1}}), "bogus"),
        (json!({"rollout": {"steps": [1, 10, 10, 100], "step_secs": 60}}), "rollout.steps[2]"),
        (json!({"rollout": {"steps": [50, 10, 100], "step_secs": 60}}), "rollout.steps[1]"),
        (json!({"rollout": {"steps": [1, 10, 50], "step_secs": 60}}), "rollout.steps"),
        (json!({"rollout": {"steps": [0, 100], "step_secs": 60}}), "rollout.steps[0]"),
        (json!({"rollout": {"steps": [], "step_secs": 60}}), "rollout.steps"),
        (json!({"rollout": {"steps": [10, 100], "step_secs": 0}}), "rollout.step_secs"),
    ];
    for (patch, field) in &cases {
        let e = admin.patch::<_, Value>("/api/v1/projects/acme/web", patch).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{patch}: {e}");
        assert!(e.to_string().contains(field), "{patch}: {e} should name {field}");
        let mut create = json!({"name": "other", "org": "acme"});
        for (k, v) in patch.as_object().unwrap() {
            create[k] = v.clone();
        }
        let e = admin.post::<_, Value>("/api/v1/projects", &create).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{create}: {e}");
    }
    // Good settings are kept, and `null` switches canaries off again.
    let p: Value = admin
        .patch(
            "/api/v1/projects/acme/web",
            &json!({"auto_rollback": {"enabled": false}, "rollout": {"steps": [5, 100], "step_secs": 30}}),
        )
        .await
        .unwrap();
    assert_eq!(p["auto_rollback"]["enabled"], false);
    assert_eq!(p["auto_rollback"]["error_rate"], 0.05, "fields left out keep their defaults");
    assert_eq!(p["rollout"]["steps"], json!([5, 100]));
    let p: Value = admin.patch("/api/v1/projects/acme/web", &json!({"rollout": null})).await.unwrap();
    assert!(p["rollout"].is_null(), "{p}");

    // Per deploy: checked the same way, and kept with the deployment.
    let deploy = |rollout: Value| json!({"org": "acme", "project": "web", "image": "registry.example.com/acme/web:1", "rollout": rollout});
    let e = admin
        .post::<_, Value>("/api/v1/deployments", &deploy(json!({"steps": [10, 5, 100], "step_secs": 60})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("rollout.steps[1]"), "{e}");
    let d: Value =
        admin.post("/api/v1/deployments", &deploy(json!({"steps": [20, 100], "step_secs": 5}))).await.unwrap();
    let kept = op.store.deployment_rollout(d["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(kept, Some(zeitwork_api_types::Rollout { steps: vec![20, 100], step_secs: 5 }));
}
