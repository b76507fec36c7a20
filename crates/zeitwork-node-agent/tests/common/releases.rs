//! The platform the release tests share (automatic rollback, canaries, shadow
//! traffic): an operator on SQLite with region `local` and org `acme`, one
//! container agent, and an edge proxy without a practical rate limit.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_node_agent::NodeAgent;

pub struct Platform {
    pub op: Operator,
    pub admin: Client,
    pub agent: NodeAgent,
    pub edge: zeitwork_edge::EdgeProxy,
    _dir: tempfile::TempDir,
}

pub async fn platform(hostname: &str, range: &str) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("op"),
        apps_scheme: "http".into(),
        notifications_allow_internal: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"}))
        .await
        .unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let agent_token = super::cluster_token(&admin, "node-agent").await;
    let edge_token = super::cluster_token(&admin, "edge-proxy").await;
    let mut config = super::agent_config(&base, agent_token, dir.path(), hostname, range);
    config.stop_grace_secs = 2;
    let agent = NodeAgent::start(config).await.unwrap();
    let edge = zeitwork_edge::EdgeProxy::start(zeitwork_edge::EdgeConfig {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: base.clone(),
        token: Some(edge_token),
        rate_limit: zeitwork_api_types::RateLimit { requests_per_second: 100_000, burst: 100_000 },
        ..Default::default()
    })
    .await
    .unwrap();
    Platform { op, admin, agent, edge, _dir: dir }
}

impl Platform {
    pub async fn deploy(&self, project: &str, image: &str) -> String {
        let d: Value = self
            .admin
            .post(
                "/api/v1/deployments",
                &json!({"org": "acme", "project": project, "image": image, "instances_per_region": 1}),
            )
            .await
            .unwrap();
        d["id"].as_str().unwrap().to_owned()
    }

    pub async fn deployment(&self, id: &str) -> Value {
        self.admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap()
    }

    /// Waits until `id` is in one of `want`; its body then.
    pub async fn wait_for(&self, id: &str, want: &[&str], within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let d = self.deployment(id).await;
            if want.iter().any(|w| d["status"] == *w) {
                return d;
            }
            assert!(Instant::now() < deadline, "{id} never became {want:?}: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `host` answers `want` through the edge.
    pub async fn wait_served(&self, host: &str, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let res = reqwest::Client::new()
                .get(format!("http://{}{path}", self.edge.http_addr()))
                .header("host", host)
                .send()
                .await;
            if let Ok(r) = res {
                if r.status() == 200 && r.text().await.unwrap_or_default().trim() == want {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{host}{path} never answered {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A CGI script for busybox httpd that answers `status` with `body`.
pub fn cgi(status: &str, body: &str) -> String {
    format!(
        "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho \"Status: {status}\"\\necho \"Content-Type: text/plain\"\\necho\\necho {body}\\n' > /www/cgi-bin/app && chmod +x /www/cgi-bin/app && exec /bin/busybox httpd -f -p $PORT -h /www"
    )
}

pub fn clients(third: u8, n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::from([127, 0, third, i])).collect()
}
