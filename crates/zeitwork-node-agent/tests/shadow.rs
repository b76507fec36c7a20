//! Shadow traffic with real parts: an operator on SQLite, a real registry,
//! runc instances, and an edge proxy carrying continuous load. A candidate
//! that answers 500 gets copies of live GETs, is judged on them and is never
//! switched to, while every client keeps getting the active version's
//! answers; a healthy candidate takes its environment once the shadow
//! period is over.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

mod common;

use common::releases::{cgi, clients, platform};

/// Instance addresses of this file's agent.
const RANGE: &str = "10.246.0.0";

/// One answer the load saw.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
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
        .map(|ip| {
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
                    hits.push(Hit { at: Instant::now(), status, body });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_shadow_is_never_switched_to_and_a_healthy_one_is() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    // All answer readiness on `/` (the static index); the bad one fails its main path.
    let v1_image = reg.push_busybox("acme/web", "v1", &cgi("200 OK", "v1")).await.unwrap();
    let bad_image = reg.push_busybox("acme/web", "bad", &cgi("500 Internal Server Error", "broken")).await.unwrap();
    let v2_image = reg.push_busybox("acme/web", "v2", &cgi("200 OK", "v2")).await.unwrap();
    let p = platform("shadow-node", RANGE).await;
    // Only errors decide here: latency on a shared test machine is noise.
    p.admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128},
                    "auto_rollback": {"window_secs": 5, "min_requests": 10, "latency_factor": 100},
                    "shadow": {"share": 100, "secs": 6}}),
        )
        .await
        .unwrap();
    let v1 = p.deploy("web", &v1_image).await;
    // Nothing serves the environment yet: the first deployment switches at once.
    p.wait_for(&v1, &["active"], Duration::from_secs(90)).await;
    let host = "web-acme.zeitwork.localhost";
    p.wait_served(host, "/cgi-bin/app", "v1").await;

    // ---- a candidate that answers 500
    let (stop, stop_rx) = watch::channel(false);
    let tasks = load(p.edge.http_addr(), host, "/cgi-bin/app", &clients(3, 6), Duration::from_millis(100), stop_rx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad = p.deploy("web", &bad_image).await;
    let mut saw_shadow = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    let blocked = loop {
        let d = p.deployment(&bad).await;
        assert_ne!(d["status"], "active", "a candidate whose copies fail was switched to: {d}");
        if let Ok(r) = p.admin.get::<Value>(&format!("/api/v1/deployments/{bad}/rollout")).await {
            saw_shadow |= r["state"] == "shadow";
        }
        if d["status"] == "rolled_back" || d["status"] == "failed" {
            break d;
        }
        assert!(Instant::now() < deadline, "the failing shadow was never decided on: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Load goes on for a while after the decision: still v1 only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let hits = gather(tasks).await;
    assert!(saw_shadow, "the candidate went through a shadow stage");
    let reason = blocked["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("shadow traffic") && reason.contains("5xx rate"), "{reason}");
    let project: Value = p.admin.get("/api/v1/projects/acme/web").await.unwrap();
    assert_eq!(project["current_deployment"]["production"], v1.as_str(), "{project}");
    assert_eq!(p.deployment(&v1).await["status"], "active");
    let rollout: Value = p.admin.get(&format!("/api/v1/deployments/{bad}/rollout")).await.unwrap();
    assert_eq!(rollout["state"], "rolled_back", "{rollout}");
    let mirrored = rollout["served"]["requests"].as_u64().unwrap_or(0);
    let mirrored_failed = rollout["served"]["errors"].as_u64().unwrap_or(0);
    assert!(mirrored > 0 && mirrored_failed > 0, "the candidate received copies: {rollout}");
    // The edge exports how many copies it sent.
    let metrics = reqwest::get(format!("http://{}/metrics", p.edge.admin_addr())).await.unwrap().text().await.unwrap();
    let copies = metrics
        .lines()
        .find_map(|l| l.strip_prefix("zeitwork_edge_shadow_copies_total ")?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no shadow copy counter in the edge's metrics:\n{metrics}"));
    assert!(copies >= mirrored as f64, "the edge counted {copies} copies; the operator saw {mirrored}");
    let client_errors = hits.iter().filter(|h| h.status >= 500 || h.status == 0).count();
    assert!(!hits.is_empty());
    assert_eq!(client_errors, 0, "no client saw the candidate's failures");
    assert!(hits.iter().all(|h| h.status == 200 && h.body == "v1"), "every client answer came from the active version");
    let events: Vec<Value> = p.admin.get("/api/v1/events?org=acme&action=deployment.auto_rollback").await.unwrap();
    assert!(events.iter().any(|e| e["target"] == bad.as_str()), "{events:?}");
    println!(
        "failing shadow: {mirrored} requests mirrored to the candidate ({mirrored_failed} answered 5xx), \
         {} client requests, {client_errors} client errors",
        hits.len()
    );
    println!("  reason: {reason}");

    // ---- a healthy candidate
    let (stop, stop_rx) = watch::channel(false);
    let tasks = load(p.edge.http_addr(), host, "/cgi-bin/app", &clients(4, 6), Duration::from_millis(100), stop_rx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v2 = p.deploy("web", &v2_image).await;
    let mut shadow_figures: Option<Value> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = p.deployment(&v2).await;
        assert!(d["status"] != "rolled_back" && d["status"] != "failed", "the healthy shadow was sent back: {d}");
        if d["status"] == "active" {
            break;
        }
        if let Ok(r) = p.admin.get::<Value>(&format!("/api/v1/deployments/{v2}/rollout")).await {
            if r["state"] == "shadow" {
                shadow_figures = Some(r);
            }
        }
        assert!(Instant::now() < deadline, "the healthy shadow was never switched to: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let switched = Instant::now();
    p.wait_served(host, "/cgi-bin/app", "v2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true).unwrap();
    let hits = gather(tasks).await;
    let shadow_figures = shadow_figures.expect("the healthy candidate went through a shadow stage");
    let rollout: Value = p.admin.get(&format!("/api/v1/deployments/{v2}/rollout")).await.unwrap();
    assert_eq!(rollout["state"], "watching", "{rollout}");
    assert_eq!(p.deployment(&v1).await["status"], "standby");
    assert!(hits.iter().all(|h| h.status == 200), "no failures around a healthy shadow");
    assert!(hits.iter().any(|h| h.body == "v2"), "the switch happened under load");
    let before: Vec<&Hit> = hits.iter().filter(|h| h.at < switched && h.body == "v2").collect();
    let v1_answers = hits.iter().filter(|h| h.body == "v1").count();
    println!(
        "healthy shadow: switched after the shadow period; analysis while copying {}; {} client answers from v1, {} from v2 \
         ({} of them before the operator reported the switch)",
        shadow_figures["analysis"],
        v1_answers,
        hits.len() - v1_answers,
        before.len()
    );
    p.edge.shutdown().await;
    p.agent.shutdown().await;
    drop(p.op);
}
