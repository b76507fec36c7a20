//! What several test binaries of the operator share (each uses a part of it).
#![allow(dead_code)]

use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};

/// An operator on SQLite in `dir` on a free loopback port, its base URL and an admin client.
pub async fn operator(dir: &std::path::Path, node_timeout_secs: u64) -> (Operator, String, Client) {
    operator_with(OperatorConfig { data_dir: dir.to_owned(), node_timeout_secs, ..Default::default() }).await
}

/// An operator with `config` (its listen address a free loopback port), its base URL and an admin client.
pub async fn operator_with(config: OperatorConfig) -> (Operator, String, Client) {
    let op = Operator::start(OperatorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config }).await.unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    (op, base, admin)
}

/// Creates the deployment `body` describes, waits for its first instance to
/// be placed and reports it ready from `node` (the node agent's client); the
/// deployment as created and the instance's id.
pub async fn deploy_ready(admin: &Client, node: &Client, body: &serde_json::Value) -> (serde_json::Value, String) {
    let d: serde_json::Value = admin.post("/api/v1/deployments", body).await.unwrap();
    let inst = placed(admin, d["id"].as_str().unwrap()).await;
    report(node, &inst, &serde_json::json!({"status": "ready", "address": "10.0.0.2:8080"})).await;
    (d, inst)
}

/// The id of the first instance placed for deployment `dep`, once there is one.
pub async fn placed(admin: &Client, dep: &str) -> String {
    until("placement", async || {
        let is: Vec<serde_json::Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        is.first().map(|i| i["id"].as_str().unwrap().to_owned())
    })
    .await
}

/// Reports `status` (a status report body) for instance `inst` from `node`.
pub async fn report(node: &Client, inst: &str, status: &serde_json::Value) {
    node.put::<_, serde_json::Value>(&format!("/api/v1/instances/{inst}/status"), status).await.ok();
}

/// Polls `f` until it gives a value; fails the test after 30 s naming `what`.
pub async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
