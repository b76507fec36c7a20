//! Log forwarding with a real receiver: rsyslog listening on UDP gets each
//! line of an app as an RFC 5424 message with its severity, app and instance.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

mod common;

/// rsyslogd with a config of its own: UDP on `port`, every message to `out` as `pri|app|procid|msgid|sd|msg`.
struct Rsyslog(std::process::Child);

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rsyslog(dir: &std::path::Path, port: u16, out: &std::path::Path) -> Rsyslog {
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{dir}\")\n\
             module(load=\"imudp\")\n\
             input(type=\"imudp\" address=\"127.0.0.1\" port=\"{port}\")\n\
             template(name=\"line\" type=\"string\" string=\"%pri%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\\n\")\n\
             action(type=\"omfile\" file=\"{out}\" template=\"line\")\n",
            dir = dir.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let child = Command::new("rsyslogd")
        .args(["-n", "-f"])
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsyslogd (apt-get install rsyslog; scripts/test-deps installs it)");
    Rsyslog(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_logs_reach_a_syslog_receiver_with_their_severity() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let out = dir.path().join("received.log");
    let _rsyslog = rsyslog(dir.path(), port, &out);
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg
        .push_busybox(
            "acme/web",
            "1",
            "echo 'ERROR: the disk is on fire'; echo 'hello from stdout'; echo 'oops' >&2; exec /bin/busybox httpd -f -p 8080 -h /www",
        )
        .await
        .unwrap();
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}, "instances_per_region": 1});
    let (op, base, admin) = common::operator(dir.path(), OperatorConfig::default(), project).await;
    let bad = NodeAgentConfig { log_forward: Some("ftp://x:1".into()), token: Some("t".into()), ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("log_forward"));
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent = NodeAgent::start(NodeAgentConfig {
        log_forward: Some(format!("udp://127.0.0.1:{port}")),
        metrics_token: Some("agent-scrape-token".into()),
        ..common::agent_config(&base, token.clone(), dir.path(), "syslog-node", "10.243.0.0")
    })
    .await
    .unwrap();
    let d: Value =
        admin.post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": image})).await.unwrap();
    let id = d["id"].as_str().unwrap().to_owned();

    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("oops") && text.contains("hello from stdout") && text.contains("disk is on fire") {
            break text;
        }
        assert!(Instant::now() < deadline, "rsyslog did not receive the app's lines: {text:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let line =
        |what: &str| text.lines().find(|l| l.ends_with(what)).unwrap_or_else(|| panic!("{what}: {text}")).to_owned();
    let fire = line("ERROR: the disk is on fire");
    let parts: Vec<&str> = fire.splitn(6, '|').collect();
    assert_eq!(parts[0], "11", "user.err: {fire}");
    assert_eq!(parts[1], "acme/web");
    assert!(parts[2].starts_with("ins_"), "the instance as PROCID: {fire}");
    assert_eq!(parts[3], "stdout");
    assert!(parts[4].contains(&format!("deployment=\"{id}\"")), "{fire}");
    assert!(line("hello from stdout").starts_with("14|"), "user.info: {text}");
    assert!(line("oops").starts_with("11|acme/web|"), "stderr is err: {text}");
    // The operator's log API shows the severity too.
    let logs = admin.stream(&format!("/api/v1/deployments/{id}/logs?format=json")).await.unwrap().text().await.unwrap();
    let fire: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["line"] == "ERROR: the disk is on fire")
        .unwrap();
    assert_eq!(fire["severity"], "err", "{logs}");
    // The agent's metrics take its metrics token or an admin's; not its own node token.
    let http = reqwest::Client::new();
    let scrape = format!("http://{}/metrics", agent.addr());
    assert_eq!(http.get(&scrape).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&scrape).bearer_auth(&token).send().await.unwrap().status(), 403);
    let admin_token = op.admin_token.clone().unwrap();
    assert_eq!(http.get(&scrape).bearer_auth(&admin_token).send().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http.get(&scrape).bearer_auth("agent-scrape-token").send().await.unwrap().text().await.unwrap();
        if m.lines().any(|l| l.starts_with("zeitwork_node_agent_log_lines_forwarded_total ") && !l.ends_with(" 0")) {
            assert!(m.contains("zeitwork_node_agent_log_lines_dropped_total 0"), "{m}");
            // The machine's own memory and disk, for the NodeMemoryLow and NodeDiskLow alerts.
            for series in [
                "zeitwork_node_agent_memory_bytes{kind=\"total\"}",
                "zeitwork_node_agent_memory_bytes{kind=\"available\"}",
                "zeitwork_node_agent_disk_bytes{kind=\"total\"}",
                "zeitwork_node_agent_disk_bytes{kind=\"available\"}",
            ] {
                let v: f64 = m
                    .lines()
                    .find_map(|l| l.strip_prefix(series))
                    .unwrap_or_else(|| panic!("{series} missing: {m}"))
                    .trim()
                    .parse()
                    .unwrap();
                assert!(v > 0.0, "{series} = {v}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no forwarded lines counted: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.shutdown().await;
    op.shutdown().await;
}
