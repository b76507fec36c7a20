//! What several test binaries of the node agent share: an operator on SQLite
//! with region `local`, org `acme` and a project, cluster tokens, and an
//! agent's settings on loopback.
#![allow(dead_code)]

pub mod releases;

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_node_agent::NodeAgentConfig;

/// An operator on a free loopback port with `config` (its data in `dir/op`),
/// region `local`, org `acme` and project `project` (a CreateProject body); its URL and an admin client.
pub async fn operator(dir: &std::path::Path, config: OperatorConfig, project: Value) -> (Operator, String, Client) {
    let op =
        Operator::start(OperatorConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.join("op"), ..config })
            .await
            .unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"}))
        .await
        .unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &project).await.unwrap();
    (op, base, admin)
}

/// A new cluster token of `role` (`node-agent`, `edge-proxy`).
pub async fn cluster_token(admin: &Client, role: &str) -> String {
    let t: Value =
        admin.post("/api/v1/tokens", &json!({"name": role, "scope": {"kind": "cluster", "role": role}})).await.unwrap();
    t["secret"].as_str().unwrap().to_owned()
}

/// Settings of an agent on loopback, in region `local`, running containers from `range`.
pub fn agent_config(base: &str, token: String, dir: &std::path::Path, hostname: &str, range: &str) -> NodeAgentConfig {
    NodeAgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: base.to_owned(),
        token: Some(token),
        hostname: hostname.into(),
        region: "local".into(),
        data_dir: dir.join("agent"),
        // Tests' agents share the host's ids (one userns_base), each holding them in a directory of its own.
        run_dir: dir.join("run"),
        instance_range: range.parse().unwrap(),
        runtime: "container".into(),
        vcpu: Some(16),
        // Tests that want the instances' resolver pick a free port of their own.
        dns_port: 0,
        ..Default::default()
    }
}

/// An edge proxy following `base` on `http` (a free port when 0).
pub async fn edge(base: &str, token: String, http: u16) -> zeitwork_edge::EdgeProxy {
    zeitwork_edge::EdgeProxy::start(zeitwork_edge::EdgeConfig {
        http_listen: ([127, 0, 0, 1], http).into(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: base.to_owned(),
        token: Some(token),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Polls `f` until it gives a value; fails naming `what` after 60 s.
pub async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
