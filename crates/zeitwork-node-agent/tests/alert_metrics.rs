//! Every metric the shipped alert rules (`deploy/prometheus/alerts.yml`) name
//! for a node agent, an edge proxy or a load balancer is in that role's
//! exposition: an operator, an agent that ran an instance (with a platform
//! log drain), an edge and a load balancer in front of it are started and
//! scraped. The operator's names are checked by its `prometheus` test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

mod common;

async fn scrape(url: String, token: Option<&str>) -> String {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// The value of the sample `line_prefix` (a name with its labels), if exported.
fn sample(metrics: &str, line_prefix: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_the_alerts_use_exist_in_every_role() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator(
        dir.path(),
        Default::default(),
        json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
    )
    .await;
    let token = common::cluster_token(&admin, "node-agent").await;
    // A platform drain nobody listens on: its counters exist all the same.
    let agent = NodeAgent::start(NodeAgentConfig {
        metrics_token: Some("scrape".into()),
        log_forward: Some("udp://127.0.0.1:9".into()),
        ..common::agent_config(&base, token, dir.path(), "metrics-node", "10.206.0.0")
    })
    .await
    .unwrap();
    let edge = common::edge(&base, common::cluster_token(&admin, "edge-proxy").await, 0).await;
    let lb = zeitwork_lb::LoadBalancer::start(zeitwork_lb::LbConfig {
        listeners: vec![zeitwork_lb::ListenerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            backends: vec![edge.http_addr()],
            backends_from: None,
            algorithm: zeitwork_lb::Algorithm::LeastConnections,
            proxy_protocol: false,
        }],
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();

    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": image, "instances_per_region": 1}),
        )
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    common::until("the deployment to go live", async || {
        (op.store.get_deployment(&dep).await.ok()?.status.as_str() == "active").then_some(())
    })
    .await;

    let admin_token = op.admin_token.clone().unwrap();
    let operator = scrape(format!("{base}/metrics"), Some(&admin_token)).await;
    let by_role: BTreeMap<&str, String> = BTreeMap::from([
        ("zeitwork_node_agent_", scrape(format!("http://{}/metrics", agent.addr()), Some("scrape")).await),
        ("zeitwork_edge_", scrape(format!("http://{}/metrics", edge.admin_addr()), None).await),
        ("zeitwork_lb_", scrape(format!("http://{}/metrics", lb.admin_addr()), None).await),
    ]);

    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/prometheus/alerts.yml")).unwrap();
    let every = zeitwork_testkit::metric_families_used(&rules, "zeitwork_");
    let known: BTreeSet<String> = ["zeitwork_operator_"]
        .into_iter()
        .chain(by_role.keys().copied())
        .flat_map(|prefix| zeitwork_testkit::metric_families_used(&rules, prefix))
        .collect();
    assert_eq!(every, known, "a rule names a metric of no role");
    for name in [
        "zeitwork_node_agent_instance_boot_seconds",
        "zeitwork_node_agent_log_lines_dropped",
        "zeitwork_node_agent_disk_bytes",
        "zeitwork_edge_certificate_expiry_timestamp_seconds",
        "zeitwork_lb_backend_healthy",
    ] {
        assert!(every.contains(name), "the rules use {name}: {every:?}");
    }
    for (prefix, metrics) in &by_role {
        for name in zeitwork_testkit::metric_families_used(&rules, prefix) {
            let declared = metrics.lines().any(|l| l.starts_with(&format!("# TYPE {name} ")));
            assert!(declared, "{name} is not exported:\n{metrics}");
        }
    }

    // The instance's start was timed, and its deployment counted as live.
    let agent_metrics = &by_role["zeitwork_node_agent_"];
    let boots =
        sample(agent_metrics, r#"zeitwork_node_agent_instance_boot_seconds_count{runtime="container",from="boot"}"#);
    assert_eq!(boots, Some(1.0), "{agent_metrics}");
    let took =
        sample(agent_metrics, r#"zeitwork_node_agent_instance_boot_seconds_sum{runtime="container",from="boot"}"#);
    assert!(took.is_some_and(|s| s > 0.0 && s < 60.0), "{agent_metrics}");
    assert_eq!(sample(&operator, r#"zeitwork_operator_deployments_total{outcome="active"}"#), Some(1.0), "{operator}");

    lb.shutdown().await;
    edge.shutdown().await;
    agent.shutdown().await;
    tokio::time::timeout(Duration::from_secs(30), op.shutdown()).await.unwrap();
}
