//! Resource analytics from what node agents measure: the operator samples the
//! CPU time and memory of every ready instance through its node's agent
//! (`/v1/instances/{id}/metrics`, answered here by a stand-in with figures the
//! test sets, so the expected sums are exact) and
//! `GET /api/v1/analytics/resources/by-org` adds them up per org, next to
//! what the live instances are allocated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;

mod common;
use common::until;

/// Figures a node agent reports per instance: (CPU seconds since it started, memory bytes).
type Figures = Arc<Mutex<HashMap<String, (f64, u64)>>>;

/// The metrics endpoint of a node agent on `listener`, answering `figures`
/// (404 for an instance it has none for).
fn agent_metrics(listener: tokio::net::TcpListener) -> Figures {
    let figures: Figures = Arc::default();
    let shared = figures.clone();
    let app = axum::Router::new().route(
        "/v1/instances/{id}/metrics",
        axum::routing::get(move |axum::extract::Path(id): axum::extract::Path<String>| {
            let shared = shared.clone();
            async move {
                let Some((cpu, memory)) = shared.lock().unwrap().get(&id).copied() else {
                    return Err(axum::http::StatusCode::NOT_FOUND);
                };
                Ok(axum::Json(json!({
                    "memory_bytes": memory, "memory_limit_bytes": 512u64 << 20, "cpu_seconds": cpu, "processes": 3
                })))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    figures
}

/// Deploys `org/project` and reports its one instance ready from `node`; the
/// ids of the instance and its deployment.
async fn live_instance(admin: &Client, node: &Client, org: &str, project: &str) -> (String, String) {
    let body = json!({"org": org, "project": project, "image": format!("{org}/{project}:1")});
    let (d, inst) = common::deploy_ready(admin, node, &body).await;
    let dep = d["id"].as_str().unwrap().to_owned();
    until("the deployment active", async || {
        let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
        (d["status"] == "active").then_some(())
    })
    .await;
    (inst, dep)
}

fn ms(t: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap()).unwrap().timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_by_org_add_up_what_agents_report() {
    let dir = tempfile::tempdir().unwrap();
    let (_op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        usage_sample_secs: 1,
        // The node sends no heartbeats; it must not be taken for down meanwhile.
        node_timeout_secs: 600,
        ..Default::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_at = listener.local_addr().unwrap();
    let figures = agent_metrics(listener);
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    for org in ["acme", "beta"] {
        admin.post::<_, Value>("/api/v1/orgs", &json!({ "slug": org })).await.unwrap();
    }
    for (org, name, vcpu, memory) in [("acme", "web", 2, 512), ("beta", "api", 1, 256)] {
        admin
            .post::<_, Value>(
                "/api/v1/projects",
                &json!({"org": org, "name": name, "instances_per_region": 1, "resources": {"vcpu": vcpu, "memory": memory}}),
            )
            .await
            .unwrap();
    }
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let n: Value = agent
        .post(
            "/api/v1/nodes",
            &json!({"hostname": "n1", "region": "eu", "address": format!("http://{agent_at}"), "capacity": {"vcpu": 8, "memory": 8192}}),
        )
        .await
        .unwrap();
    let node = Client::new(&base, n["credential"].as_str().map(str::to_owned));

    // Before any sample: the allocation, and zeros for the use.
    let (web, web_deployment) = live_instance(&admin, &node, "acme", "web").await;
    let (api, _) = live_instance(&admin, &node, "beta", "api").await;
    let by_org = async |org: &str| -> Value {
        let v: Value = admin.get(&format!("/api/v1/analytics/resources/by-org?org={org}")).await.unwrap();
        assert_eq!(v["orgs"].as_array().unwrap().len(), 1, "{v}");
        v["orgs"][0].clone()
    };
    let acme = by_org("acme").await;
    assert_eq!((&acme["instances"], &acme["vcpu"], &acme["memory_mib"]), (&json!(1), &json!(2), &json!(512)), "{acme}");
    assert_eq!((&acme["cpu_seconds"], &acme["sampled_at"]), (&json!(0.0), &Value::Null), "{acme}");

    // The agent reports; the figures reach the org they belong to.
    figures.lock().unwrap().insert(web.clone(), (12.5, 100 << 20));
    figures.lock().unwrap().insert(api.clone(), (3.0, 20 << 20));
    let acme = until("acme's first sample", async || {
        let o = by_org("acme").await;
        (o["cpu_seconds"] == 12.5).then_some(o)
    })
    .await;
    assert_eq!(acme["memory_bytes"], 100 << 20, "{acme}");
    let beta = until("beta's first sample", async || {
        let o = by_org("beta").await;
        (o["cpu_seconds"] == 3.0).then_some(o)
    })
    .await;
    assert_eq!((&beta["memory_bytes"], &beta["vcpu"], &beta["memory_mib"]), (&json!(20 << 20), &json!(1), &json!(256)));

    // The counter goes on, then the instance restarts and its counter begins
    // again: what it counts after the restart is added to what it had used.
    figures.lock().unwrap().insert(web.clone(), (20.0, 150 << 20));
    until("the counter going on", async || (by_org("acme").await["cpu_seconds"] == 20.0).then_some(())).await;
    figures.lock().unwrap().insert(web.clone(), (1.5, 60 << 20));
    let acme = until("the restarted counter added", async || {
        let o = by_org("acme").await;
        (o["cpu_seconds"] == 21.5).then_some(o)
    })
    .await;
    assert_eq!(acme["memory_bytes"], 60 << 20, "the latest sample's memory: {acme}");

    // The agent stops answering: the figures stay as last sampled. Instance
    // time runs from the instance's start to its latest sample.
    figures.lock().unwrap().clear();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let acme = by_org("acme").await;
    assert_eq!(acme["cpu_seconds"], 21.5, "{acme}");
    let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{web_deployment}/instances")).await.unwrap();
    let ready_at = ms(&is[0]["ready_at"]);
    let ran_ms = ms(&acme["sampled_at"]) - ready_at;
    assert!(ran_ms > 0, "{acme}");
    let hours = acme["instance_hours"].as_f64().unwrap();
    assert!((hours - ran_ms as f64 / 3_600_000.0).abs() < 1e-9, "{hours} h for {ran_ms} ms: {acme}");

    // Every org at once, for a platform admin.
    let all: Value = admin.get("/api/v1/analytics/resources/by-org").await.unwrap();
    let orgs: Vec<&str> = all["orgs"].as_array().unwrap().iter().map(|o| o["org"].as_str().unwrap()).collect();
    assert_eq!(orgs, ["acme", "beta"], "{all}");
}
