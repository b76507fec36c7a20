//! The shipped Prometheus configuration and alert rules: `promtool` accepts
//! them, each alert's unit test passes, and the operator's metrics they name
//! exist in a running operator's exposition.

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
    for name in [
        "zeitwork_operator_database_up",
        "zeitwork_operator_engine_leader",
        "zeitwork_operator_http_request_duration_seconds_bucket",
        "zeitwork_operator_outbox_dead",
        "zeitwork_operator_outbox_oldest_pending_seconds",
    ] {
        assert!(rules.contains(name), "the rules use {name}");
        assert!(metrics.lines().any(|l| l.starts_with(name)), "{name} is exported: {metrics}");
    }
    assert!(metrics.lines().any(|l| l == "zeitwork_operator_database_up 1"), "{metrics}");
    op.shutdown().await;
}
