//! Deployments through the engine with simulated node agents (API calls as
//! an agent would make them): placement, activation, and re-placement when a
//! node stops heartbeating.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};

async fn until<F, Fut>(what: &str, f: F) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_down_node_move_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        node_timeout_secs: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let register = |host: &str, memory: u32| {
        let agent = agent.clone();
        let body = json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"), "capacity": {"vcpu": 4, "memory": memory}});
        async move { agent.post::<_, Value>("/api/v1/nodes", &body).await.unwrap()["id"].as_str().unwrap().to_owned() }
    };
    // The bigger node gets the first instance.
    let a = register("node-a", 8192).await;
    let b = register("node-b", 4096).await;
    let beating = {
        let agent = agent.clone();
        let b = b.clone();
        tokio::spawn(async move {
            loop {
                let _ = agent.post_empty::<Value>(&format!("/api/v1/nodes/{b}/heartbeat")).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "acme/web:1", "instances_per_region": 1}),
        )
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let instances = |dep: String| {
        let admin = admin.clone();
        async move { admin.get::<Vec<Value>>(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap() }
    };
    let first = until("placement", || {
        let f = instances(dep.clone());
        async move { f.await.into_iter().next() }
    })
    .await;
    assert_eq!(first["node"], a.as_str(), "spread, then the node with the most free memory");
    let id = first["id"].as_str().unwrap().to_owned();
    // The agent of node A reports the instance ready: the deployment goes live.
    agent
        .put::<_, Value>(
            &format!("/api/v1/instances/{id}/status"),
            &json!({"status": "ready", "address": "10.88.0.2:8080"}),
        )
        .await
        .unwrap_or(Value::Null);
    until("activation", || {
        let admin = admin.clone();
        let dep = dep.clone();
        async move {
            Some(admin.get::<Value>(&format!("/api/v1/deployments/{dep}")).await.unwrap())
                .filter(|d| d["status"] == "active")
        }
    })
    .await;

    // Node A stops heartbeating: it goes down and its instance moves to B.
    let replacement = until("re-placement", || {
        let f = instances(dep.clone());
        let b = b.clone();
        async move { f.await.into_iter().find(|i| i["node"] == b.as_str()) }
    })
    .await;
    let node_a: Value = admin.get(&format!("/api/v1/nodes/{a}")).await.unwrap();
    assert_eq!(node_a["status"], "down");
    assert_eq!(node_a["instances"], 0);
    let old: Value = instances(dep.clone()).await.into_iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(old["status"], "stopped");
    assert!(old["exit_reason"].as_str().unwrap().contains("node is down"));
    let rid = replacement["id"].as_str().unwrap();
    agent
        .put::<_, Value>(
            &format!("/api/v1/instances/{rid}/status"),
            &json!({"status": "ready", "address": "10.88.0.6:8080"}),
        )
        .await
        .unwrap_or(Value::Null);
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "edge", "scope": {"kind": "cluster", "role": "edge-proxy"}}))
        .await
        .unwrap();
    let edge = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let table: Value = until("the routing table to point at node B", || {
        let edge = edge.clone();
        let host = format!("{dep}.zeitwork.localhost");
        async move {
            let t: Value = edge.get("/api/v1/routing").await.unwrap();
            t["routes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["host"] == host.as_str())
                .filter(|r| r["instances"][0]["upstream"] == "http://node-b:8081")
                .cloned()
        }
    })
    .await;
    assert_eq!(table["instances"].as_array().unwrap().len(), 1);
    let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
    assert_eq!(d["status"], "active", "the deployment stayed live");
    beating.abort();
    op.shutdown().await;
}
