//! Agents on one host hold their user-namespace ids: an agent whose
//! `userns_base` range overlaps one a running agent holds does not start, and
//! names the other's range; one with a range of its own starts, and a range
//! is free again once its agent stops.

use serde_json::json;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_overlapping_ids_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let (op, base, admin) = common::operator(dir.path(), OperatorConfig::default(), project).await;
    let token = common::cluster_token(&admin, "node-agent").await;
    // Three agents of one host: one runtime directory.
    let run = dir.path().join("run");
    let config = |name: &str, range: &str, userns_base: u32| NodeAgentConfig {
        run_dir: run.clone(),
        userns_base,
        ..common::agent_config(&base, token.clone(), &dir.path().join(name), name, range)
    };

    let first = NodeAgent::start(config("userns-a", "10.190.0.0", 1_000_000_000)).await.unwrap();
    // 1,100,000,000 and the ids after it overlap the first agent's 1,000,000,000..2,048,576,000.
    let e = NodeAgent::start(config("userns-b", "10.191.0.0", 1_100_000_000)).await.unwrap_err().to_string();
    assert!(e.contains("1100000000..2148576000") && e.contains("1000000000..2048576000"), "{e}");
    assert!(e.contains(&dir.path().join("userns-a").join("agent").display().to_string()), "names the other agent: {e}");
    assert!(e.contains("userns_base"), "says what to change: {e}");

    // A range of its own starts.
    let third = NodeAgent::start(config("userns-c", "10.192.0.0", 2_200_000_000)).await.unwrap();
    // Once the first agent stops, its ids are free for another.
    first.shutdown().await;
    let second = NodeAgent::start(config("userns-b", "10.190.0.0", 1_100_000_000)).await.unwrap();
    second.shutdown().await;
    third.shutdown().await;
    op.shutdown().await;
}
