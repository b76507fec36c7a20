//! The shipped Prometheus configuration and alert rules: `promtool` accepts
//! them, every alert has a unit test that makes it fire and the tests pass,
//! and the operator's metrics they name exist in a running operator's
//! exposition (the node agent's, the edge's and the load balancer's are
//! checked by the node agent's `alert_metrics` test).

use std::path::PathBuf;
use std::process::Command;

fn deploy_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/prometheus"))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy_dir())
        .output()
        .expect("promtool is needed (apt-get install prometheus; scripts/test-deps installs it)");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_shipped_files_and_every_alert_fires_on_its_series() {
    // The config reads the metrics token from a file beside it, as it is installed.
    let installed = tempfile::tempdir().unwrap();
    for f in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(deploy_dir().join(f), installed.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(deploy_dir().join("prometheus.yml")).unwrap();
    for job in ["zeitwork-operator", "zeitwork-node-agent"] {
        let section = config.split("- job_name: ").find(|s| s.starts_with(job)).unwrap();
        assert!(section.contains("credentials_file: metrics-token"), "{job} scrapes with the metrics token");
    }
    std::fs::write(installed.path().join("metrics-token"), "a-token\n").unwrap();
    let config = installed.path().join("prometheus.yml");
    promtool(&["check", "config", config.to_str().unwrap()]);
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// The alerts of `alerts.yml`, by name.
fn alert_names(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|n| n.trim().to_owned()).collect()
}

/// The alerts a unit test of `alerts_test.yml` expects to fire (an
/// `alert_rule_test` entry with at least one expected alert).
fn alerts_tested_firing(tests: &str) -> std::collections::BTreeSet<String> {
    tests
        .split("- eval_time:")
        .filter_map(|entry| {
            let name = entry.lines().find_map(|l| l.trim().strip_prefix("alertname: "))?;
            entry.contains("exp_labels:").then(|| name.trim().to_owned())
        })
        .collect()
}

#[test]
fn every_alert_has_a_unit_test_that_makes_it_fire() {
    let rules = std::fs::read_to_string(deploy_dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy_dir().join("alerts_test.yml")).unwrap();
    let alerts = alert_names(&rules);
    assert!(alerts.len() >= 17, "the rules were read: {alerts:?}");
    let tested = alerts_tested_firing(&tests);
    let untested: Vec<&String> = alerts.iter().filter(|a| !tested.contains(*a)).collect();
    assert!(untested.is_empty(), "alerts no unit test in alerts_test.yml makes fire: {untested:?}");
    // The check itself tells a test that expects silence from one that expects an alert.
    let silent = "  - eval_time: 5m\n    alertname: ServiceDown\n    exp_alerts: []\n";
    assert!(alerts_tested_firing(silent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_metrics_the_alerts_use_exist() {
    let dir = tempfile::tempdir().unwrap();
    let op = zeitwork_control_plane::Operator::start(zeitwork_control_plane::OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", op.addr());
    let token = op.admin_token.clone().unwrap();
    let http = reqwest::Client::new();
    reqwest::get(format!("{base}/health")).await.unwrap();
    // The engine takes its lease within a tick or two.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let m = http.get(format!("{base}/metrics")).bearer_auth(&token).send().await.unwrap().text().await.unwrap();
        // Whole lines: the metric's HELP text reads "… engine_leader 1 while …" too.
        if m.lines().any(|l| l == "zeitwork_operator_engine_leader 1") || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let rules = std::fs::read_to_string(deploy_dir().join("alerts.yml")).unwrap();
    let used = zeitwork_testkit::metric_families_used(&rules, "zeitwork_operator_");
    for name in [
        "zeitwork_operator_database_up",
        "zeitwork_operator_engine_leader",
        "zeitwork_operator_http_request_duration_seconds",
        "zeitwork_operator_builds",
        "zeitwork_operator_deployments",
        "zeitwork_operator_db_query_duration_seconds",
    ] {
        assert!(used.contains(name), "the rules use {name}: {used:?}");
    }
    for name in &used {
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} is not exported: {metrics}"
        );
    }
    assert!(metrics.lines().any(|l| l == "zeitwork_operator_database_up 1"), "{metrics}");
    // The engine's lease renewals are timed: the database latency has samples.
    let leases = metrics
        .lines()
        .find_map(|l| l.strip_prefix("zeitwork_operator_db_query_duration_seconds_count{query=\"engine_lease\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(leases.is_some_and(|n| n >= 1), "no timed lease renewal: {metrics}");
    op.shutdown().await;
}
