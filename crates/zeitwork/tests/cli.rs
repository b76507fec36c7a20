//! The `zeitwork` binary as people and scripts use it: roles started from
//! flags, env and config files; CLI verbs with tables, `--json` and exit codes.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_zeitwork");

struct Running {
    child: Option<Child>,
    api: String,
    token: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_operator(data: &Path) -> Running {
    start_operator_with(data, None, None)
}

/// An operator with the settings of the TOML file `config`, when given, on
/// the PostgreSQL database at `database_url` (else SQLite in `data`).
fn start_operator_with(data: &Path, config: Option<&Path>, database_url: Option<&str>) -> Running {
    let port = zeitwork_testkit::free_port();
    let mut command = Command::new(BIN);
    command.args(["operator", "--listen", &format!("127.0.0.1:{port}")]).env("ZEITWORK_DATA", data);
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    match config {
        Some(file) => command.env("ZEITWORK_CONFIG", file),
        None => command.env_remove("ZEITWORK_CONFIG"),
    };
    let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut running = Running { child: Some(child), api: format!("http://127.0.0.1:{port}"), token: String::new() };
    let deadline = Instant::now() + Duration::from_secs(30);
    let token_file = data.join("admin.token");
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && token_file.exists() {
            running.token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the operator did not start");
}

fn cli(r: &Running, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("ZEITWORK_API", &r.api)
        .env("ZEITWORK_TOKEN", &r.token)
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn verbs_print_tables_json_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let r = start_operator(&dir.path().join("data"));

    ok(cli(&r, &["regions", "create", "us-east", "--name", "US East", "--country", "US"]));
    ok(cli(&r, &["orgs", "create", "acme", "--owner", "ceo@acme.test"]));
    let out = ok(cli(&r, &["projects", "create", "acme/web", "--repo", "acme/web", "--vcpu", "2", "--memory", "512"]));
    assert!(out.contains("Created project acme/web"), "{out}");
    let table = ok(cli(&r, &["projects", "list"]));
    assert!(table.lines().next().unwrap().starts_with("PROJECT"), "{table}");
    assert!(table.contains("2 vCPU, 512 MiB"), "{table}");

    let json: serde_json::Value =
        serde_json::from_str(&ok(cli(&r, &["projects", "update", "acme/web", "--memory", "1024", "--json"]))).unwrap();
    assert_eq!(json["resources"], serde_json::json!({"vcpu": 2, "memory": 1024}));
    // Autoscaling from flags: both bounds, targets optional; --no-scaling returns to the fixed count.
    let json: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &[
            "projects",
            "update",
            "acme/web",
            "--min-per-region",
            "0",
            "--max-per-region",
            "3",
            "--target-cpu-percent",
            "60",
            "--target-concurrency",
            "20",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(
        json["scaling"],
        serde_json::json!({
            "min_per_region": 0,
            "max_per_region": 3,
            "target_cpu_percent": 60,
            "target_memory_percent": null,
            "target_concurrency": 20
        })
    );
    assert_eq!(cli(&r, &["projects", "update", "acme/web", "--min-per-region", "1"]).status.code(), Some(2));
    assert_eq!(
        cli(&r, &["projects", "update", "acme/web", "--min-per-region", "4", "--max-per-region", "2"]).status.code(),
        Some(2)
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(cli(&r, &["projects", "update", "acme/web", "--no-scaling", "--json"]))).unwrap();
    assert!(json.get("scaling").is_none(), "{json}");
    // Shadow traffic from flags; --no-shadow turns it off.
    let json: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["projects", "update", "acme/web", "--shadow-share", "10", "--shadow-secs", "120", "--json"],
    )))
    .unwrap();
    assert_eq!(json["shadow"], serde_json::json!({"share": 10, "secs": 120, "all_methods": false}), "{json}");
    assert_eq!(cli(&r, &["projects", "update", "acme/web", "--shadow-secs", "120"]).status.code(), Some(2));
    let bad = cli(&r, &["projects", "update", "acme/web", "--shadow-share", "0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("shadow.share"), "{bad:?}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(cli(&r, &["projects", "update", "acme/web", "--no-shadow", "--json"]))).unwrap();
    assert!(json.get("shadow").is_none_or(|s| s.is_null()), "{json}");

    ok(cli(&r, &["env", "set", "acme/web", "SECRET=hunter2", "MODE=prod"]));
    let env: serde_json::Value = serde_json::from_str(&ok(cli(&r, &["env", "list", "acme/web", "--json"]))).unwrap();
    assert_eq!(env.as_array().unwrap().len(), 2);

    let dep: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["deployments", "create", "acme/web", "--image", "ghcr.io/acme/web:1", "--json"],
    )))
    .unwrap();
    assert_eq!(dep["status"], "pending");
    let shown = ok(cli(&r, &["deployments", "show", dep["id"].as_str().unwrap()]));
    assert!(shown.contains("ghcr.io/acme/web:1"), "{shown}");

    // `deploy` follows the deployment; with no node in the region it waits, showing
    // what it waits for, until the CLI's own timeout.
    let out = cli(&r, &["deploy", "acme/web", "--image", "ghcr.io/acme/web:2", "--timeout", "3"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Deploying ghcr.io/acme/web:2 as web-"), "{stdout}");
    assert!(stdout.contains("pending, waiting for room: region us-east has no ready node"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("it is pending"), "{}", String::from_utf8_lossy(&out.stderr));

    // Nothing to roll back to or promote yet: a conflict that says so.
    let out = cli(&r, &["rollback", "acme/web"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no earlier production deployment"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&r, &["promote", "acme/web", "--from", "staging", "--to", "production"]);
    assert_eq!(out.status.code(), Some(5));
    // --force goes back past migrations, but still needs something to go back to.
    assert_eq!(cli(&r, &["rollback", "acme/web", "--force"]).status.code(), Some(5));

    // Skew protection and release commands are project settings; bad ones name the field.
    let bad = cli(&r, &["projects", "update", "acme/web", "--skew-max-age-secs", "30"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("skew_protection.max_age_secs"), "{stderr}");
    let p: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["projects", "update", "acme/web", "--skew-protection", "on", "--release-command", "bin/migrate", "--json"],
    )))
    .unwrap();
    assert_eq!(p["skew_protection"], serde_json::json!({"enabled": true, "max_age_secs": 43200}), "{p}");
    assert_eq!(p["release_command"], "bin/migrate", "{p}");
    let p: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["projects", "update", "acme/web", "--skew-protection", "off", "--release-command", "", "--json"],
    )))
    .unwrap();
    assert!(p.get("skew_protection").is_none() && p.get("release_command").is_none(), "{p}");

    // Exit codes scripts can rely on.
    assert_eq!(cli(&r, &["projects", "show", "acme/nope"]).status.code(), Some(3));
    assert_eq!(cli(&r, &["projects", "create", "acme/web"]).status.code(), Some(5));
    let bad = cli(&r, &["projects", "create", "acme/Web_App"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("name"), "{}", String::from_utf8_lossy(&bad.stderr));
    let denied = Command::new(BIN)
        .args(["projects", "list"])
        .env("ZEITWORK_API", &r.api)
        .env("ZEITWORK_TOKEN", "zw_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(4));
    let unreachable = Command::new(BIN)
        .args(["projects", "list"])
        .env("ZEITWORK_API", format!("http://127.0.0.1:{}", zeitwork_testkit::free_port()))
        .env("ZEITWORK_TOKEN", &r.token)
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the operator"));

    // Tokens: created once with their secret, listed without it.
    let t: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["tokens", "create", "ci", "--org", "acme", "--role", "developer", "--json"],
    )))
    .unwrap();
    assert!(t["secret"].as_str().unwrap().starts_with("zw_"));
    let listed = ok(cli(&r, &["tokens", "list"]));
    assert!(listed.contains("acme:developer") && !listed.contains(t["secret"].as_str().unwrap()), "{listed}");
    let events = ok(cli(&r, &["events", "list", "--org", "acme"]));
    assert!(events.contains("project.create"), "{events}");

    // Status at a glance; a deployment that cannot be placed shows up until it fails.
    let status: serde_json::Value = serde_json::from_str(&ok(cli(&r, &["status", "--json"]))).unwrap();
    assert!(status["nodes"].is_array() && status["deployments"].is_array(), "{status}");
    let text = ok(cli(&r, &["status"]));
    assert!(text.contains("Nodes") && text.contains("Deployments"), "{text}");

    // The outbox and its dead-letter queue.
    let stats = ok(cli(&r, &["notifications", "stats"]));
    assert!(stats.contains("outbox") && stats.contains("EVENT STREAMS"), "{stats}");
    let dead: serde_json::Value =
        serde_json::from_str(&ok(cli(&r, &["notifications", "dlq", "list", "--json"]))).unwrap();
    assert_eq!(dead, serde_json::json!([]));
    assert_eq!(cli(&r, &["notifications", "dlq", "retry"]).status.code(), Some(2), "an id or --all");
    assert_eq!(cli(&r, &["notifications", "dlq", "drop", "999"]).status.code(), Some(3));
    assert!(ok(cli(&r, &["notifications", "dlq", "retry", "--all"])).contains("Queued 0"));

    // Shell completion scripts.
    let bash = ok(cli(&r, &["completions", "bash"]));
    assert!(bash.contains("_zeitwork") && bash.contains("deploy"), "{}", &bash[..200.min(bash.len())]);
    let bad = cli(&r, &["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Polls `f` every 100 ms until it gives a value; fails after 30 s naming `what`.
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a [`webhook_receiver`] got: each request's delivery id, body, and whether it was answered.
type Deliveries = std::sync::Arc<std::sync::Mutex<Vec<(String, String, bool)>>>;

/// A webhook receiver on `listener` (plain HTTP/1.1, one request a connection)
/// that records every request and answers 204, except the `hang_on`-th (from
/// 0), which it never answers.
fn webhook_receiver(listener: std::net::TcpListener, hang_on: Option<usize>) -> Deliveries {
    use std::io::{BufRead, Read, Write};
    let got: Deliveries = Default::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let (mut length, mut id) = (0, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    } else if name.eq_ignore_ascii_case("x-zeitwork-delivery") {
                        id = value.trim().to_owned();
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let n = {
                let mut got = sink.lock().unwrap();
                got.push((id, String::from_utf8_lossy(&body).into_owned(), false));
                got.len() - 1
            };
            if Some(n) == hang_on {
                held.push(conn); // Open and unanswered, until the sender goes away.
                continue;
            }
            if conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").is_ok() {
                sink.lock().unwrap()[n].2 = true;
            }
        }
    });
    got
}

/// Dead letters from the CLI: with the receiver down both test notifications
/// are dead-lettered; once it is back, one is retried by id and arrives, the
/// other is dropped by id and never does.
#[test]
fn notifications_dlq_retry_and_drop_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, "notifications_allow_internal = true\nnotify_max_attempts = 1\n").unwrap();
    let r = start_operator_with(&dir.path().join("data"), Some(&config), None);
    let api = |method: &str, path: &str, body: &str| curl(&r, method, path, body);
    api("POST", "/api/v1/orgs", r#"{"slug":"acme"}"#);
    api("POST", "/api/v1/projects", r#"{"org":"acme","name":"web"}"#);
    // A webhook whose receiver is down: each test notification is dead-lettered at its first failure.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_at = down.local_addr().unwrap();
    drop(down);
    api(
        "POST",
        "/api/v1/projects/acme/web/notifications",
        &format!(r#"{{"kind":"webhook","url":"http://{down_at}/","secret":"a webhook secret of ours"}}"#),
    );
    let dead_letters = || -> Vec<serde_json::Value> {
        serde_json::from_str(&ok(cli(&r, &["notifications", "dlq", "list", "--json"]))).unwrap()
    };
    api("POST", "/api/v1/projects/acme/web/notifications/test", "");
    until("the first dead letter", || Some(dead_letters()).filter(|d| d.len() == 1));
    api("POST", "/api/v1/projects/acme/web/notifications/test", "");
    let dead = until("two dead letters", || Some(dead_letters()).filter(|d| d.len() == 2));
    let (first, second) = (dead[0]["id"].to_string(), dead[1]["id"].to_string());
    let table = ok(cli(&r, &["notifications", "dlq", "list"]));
    assert!(table.contains(&first) && table.contains("notification.test"), "{table}");

    // The receiver is back. Drop by id: that one is gone for good.
    let received = webhook_receiver(std::net::TcpListener::bind(down_at).unwrap(), None);
    let dropped = ok(cli(&r, &["notifications", "dlq", "drop", &second]));
    assert!(dropped.contains(&format!("Dropped dead letter {second}")), "{dropped}");
    assert_eq!(cli(&r, &["notifications", "dlq", "drop", &second]).status.code(), Some(3), "not there any more");
    assert_eq!(cli(&r, &["notifications", "dlq", "retry", &second]).status.code(), Some(3));
    // Retry by id: delivered now, and the dead-letter queue is empty.
    assert!(ok(cli(&r, &["notifications", "dlq", "retry", &first])).contains("Queued 1"));
    let (id, body, _) = until("the retried notification", || received.lock().unwrap().first().cloned());
    assert_eq!(id, first, "delivered under its own id");
    assert!(body.contains("notification.test"), "{body}");
    until("an empty dead-letter queue", || dead_letters().is_empty().then_some(()));
    let stats: serde_json::Value = serde_json::from_str(&ok(cli(&r, &["notifications", "stats", "--json"]))).unwrap();
    assert_eq!(stats["dlq"]["count"], 0, "{stats}");
    assert_eq!(stats["outbox"]["in_flight"], 0, "{stats}");
    // Nothing is left to send: the dropped one will never be delivered.
    assert_eq!(stats["outbox"]["pending"], 0, "{stats}");
    assert_eq!(stats["outbox"]["delivered"], 1, "{stats}");
}

/// `curl` as an API client of `r`: `method path body`; fails the test unless it succeeds.
fn curl(r: &Running, method: &str, path: &str, body: &str) {
    let out = Command::new("curl")
        .args(["-sf", "-X", method, "-H", &format!("Authorization: Bearer {}", r.token)])
        .args(["-H", "Content-Type: application/json", "-d", body, &format!("{}{path}", r.api)])
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "{method} {path}: {}", String::from_utf8_lossy(&out.stderr));
}

/// kill -9 of the operator process in the middle of a delivery (the receiver
/// has the request and has not answered): another operator process on the
/// same PostgreSQL takes over and every notification arrives; the one cut
/// short comes again under the same `X-Zeitwork-Delivery`, and only an
/// unanswered delivery is ever repeated.
#[test]
fn a_killed_operator_process_loses_no_notification() {
    const SENT: usize = 6;
    let pg = zeitwork_testkit::Postgres::start().expect("a throwaway PostgreSQL (install the postgresql package)");
    let url = pg.create_database("killed").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, "notifications_allow_internal = true\nnotify_backoff_ms = 100\n").unwrap();
    let data = dir.path().join("data");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    // The third delivery is never answered: the operator dies while it waits.
    let got = webhook_receiver(listener, Some(2));

    let mut first = start_operator_with(&data, Some(&config), Some(&url));
    curl(&first, "POST", "/api/v1/orgs", r#"{"slug":"acme"}"#);
    curl(&first, "POST", "/api/v1/projects", r#"{"org":"acme","name":"web"}"#);
    curl(
        &first,
        "POST",
        "/api/v1/projects/acme/web/notifications",
        &format!(
            r#"{{"kind":"webhook","url":"http://{hook}/","secret":"a webhook secret of ours","events":["notification.test"]}}"#
        ),
    );
    for _ in 0..SENT {
        curl(&first, "POST", "/api/v1/projects/acme/web/notifications/test", "");
    }
    until("the third delivery, in flight", || (got.lock().unwrap().len() == 3).then_some(()));
    let mut child = first.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL: no shutdown, no release of the lease.
    child.wait().unwrap();
    let cut = got.lock().unwrap()[2].clone();
    assert!(!cut.2, "the delivery cut short was never answered");

    // Another operator process, same database, same data directory (key and token).
    let second = start_operator_with(&data, Some(&config), Some(&url));
    let seen = until("every notification", || {
        let seen = got.lock().unwrap().clone();
        let distinct: std::collections::BTreeSet<&str> = seen.iter().map(|(id, _, _)| id.as_str()).collect();
        (distinct.len() == SENT).then_some(seen.clone())
    });
    let repeats: Vec<&(String, String, bool)> = seen.iter().filter(|(id, _, _)| *id == cut.0).collect();
    assert!(repeats.len() >= 2 && repeats.last().unwrap().2, "the cut delivery came again and was answered: {seen:?}");
    assert_eq!(repeats[0].1, repeats[1].1, "the same notification, byte for byte");
    for (i, (id, _, answered)) in seen.iter().enumerate() {
        let again = seen[i + 1..].iter().any(|(later, _, _)| later == id);
        assert!(!(again && *answered), "delivery {id} was answered and still sent again: {seen:?}");
    }
    let stats: serde_json::Value = serde_json::from_str(&ok(Command::new(BIN)
        .args(["notifications", "stats", "--json"])
        .env("ZEITWORK_API", &second.api)
        .env("ZEITWORK_TOKEN", &second.token)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()))
    .unwrap();
    assert_eq!(stats["dlq"]["count"], 0, "{stats}");
    drop(second);
    drop(pg);
}

/// Release settings and rollouts from the CLI: bad steps are refused naming
/// the field, good ones are kept; a deployment without a rollout says so.
#[test]
fn release_settings_and_rollouts() {
    let dir = tempfile::tempdir().unwrap();
    let r = start_operator(&dir.path().join("data"));
    ok(cli(&r, &["regions", "create", "eu", "--name", "EU", "--country", "DE"]));
    ok(cli(&r, &["orgs", "create", "acme"]));
    ok(cli(&r, &["projects", "create", "acme/web", "--rollout-steps", "1,10,50,100"]));

    let bad = cli(&r, &["projects", "update", "acme/web", "--rollout-steps", "10,5,100"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("rollout.steps[1]"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = cli(&r, &["projects", "update", "acme/web", "--auto-rollback", r#"{"error_rate": 7}"#]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("auto_rollback.error_rate"));
    let p: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &[
            "projects",
            "update",
            "acme/web",
            "--rollout-steps",
            "5,100",
            "--rollout-step-secs",
            "30",
            "--auto-rollback",
            r#"{"watch_secs": 120}"#,
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(p["rollout"], serde_json::json!({"steps": [5, 100], "step_secs": 30}), "{p}");
    assert_eq!(
        (p["auto_rollback"]["watch_secs"].as_u64(), p["auto_rollback"]["enabled"].as_bool()),
        (Some(120), Some(true))
    );
    let p: serde_json::Value =
        serde_json::from_str(&ok(cli(&r, &["projects", "update", "acme/web", "--no-rollout", "--json"]))).unwrap();
    assert!(p["rollout"].is_null(), "{p}");

    let d: serde_json::Value = serde_json::from_str(&ok(cli(
        &r,
        &["deployments", "create", "acme/web", "--image", "registry.example.com/acme/web:1", "--json"],
    )))
    .unwrap();
    let id = d["id"].as_str().unwrap();
    assert_eq!(cli(&r, &["rollout", "show", id]).status.code(), Some(3), "no rollout yet");
    assert_eq!(cli(&r, &["rollout", "promote", id]).status.code(), Some(5), "nothing to promote");
    assert_eq!(cli(&r, &["rollout", "abort", "web-nope123-acme"]).status.code(), Some(3));
}

#[test]
fn bad_config_stops_the_role_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("operator.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let out =
        Command::new(BIN).args(["operator", "--config"]).arg(&cfg).arg("--data").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(&cfg, "apps_domain = \"not a domain\"\n").unwrap();
    let out =
        Command::new(BIN).args(["operator", "--config"]).arg(&cfg).arg("--data").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("apps_domain"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(BIN).args(["operator", "--listen", "nonsense"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    let out = Command::new(BIN)
        .args(["operator"])
        .env("ZEITWORK_DATA", dir.path())
        .env("ZEITWORK_DATABASE_URL", "mysql://root:pw@db/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database_url") && !err.contains("pw@"), "{err}");
}

#[test]
fn up_runs_operator_and_node_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (api, agent, http) =
        (zeitwork_testkit::free_port(), zeitwork_testkit::free_port(), zeitwork_testkit::free_port());
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--api-port",
            &api.to_string(),
            "--agent-port",
            &agent.to_string(),
            "--http-port",
            &http.to_string(),
        ])
        .arg("--data")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token_file = dir.path().join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        assert!(Instant::now() < deadline, "zeitwork up did not start");
        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() && token_file.exists() {
            break Running {
                child: None,
                api: format!("http://127.0.0.1:{api}"),
                token: std::fs::read_to_string(&token_file).unwrap().trim().to_owned(),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let nodes: serde_json::Value = serde_json::from_str(&ok(cli(&r, &["nodes", "list", "--json"]))).unwrap();
    assert_eq!(nodes[0]["region"], "local");
    assert_eq!(nodes[0]["status"], "ready");
    // The edge answers on the apps port; an unknown app gets Zeitwork's 404 page.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET / HTTP/1.1\r\nHost: nothing.zeitwork.localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut page = String::new();
    std::io::Read::read_to_string(&mut s, &mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 404") && page.contains("Zeitwork"), "{page}");
    // Ctrl-C stops everything gracefully.
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("Zeitwork is running.") && out.contains("Stopped."), "{out}");
}

#[test]
fn the_edge_and_load_balancer_roles_check_their_flags() {
    let run = |args: &[&str]| {
        Command::new(BIN).args(args).env_remove("ZEITWORK_CONFIG").env_remove("ZEITWORK_TOKEN").output().unwrap()
    };
    let lb = run(&["load-balancer"]);
    assert_eq!(lb.status.code(), Some(2), "{}", String::from_utf8_lossy(&lb.stderr));
    assert!(String::from_utf8_lossy(&lb.stderr).contains("--backend"));
    let lb = run(&["load-balancer", "--listen", "127.0.0.1:0"]);
    assert_eq!(lb.status.code(), Some(2));
    let up = run(&["up", "--runtime", "firecracker", "--no-install"]);
    assert_eq!(up.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("--firecracker PATH"),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let up = run(&["up", "--runtime", "lxc", "--no-install"]);
    assert_eq!(up.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&up.stderr).contains("possible values"), "{}", String::from_utf8_lossy(&up.stderr));
    let agent = run(&["node-agent", "--token", "zw_x_y", "--runtime", "lxc"]);
    assert_eq!(agent.status.code(), Some(2), "{}", String::from_utf8_lossy(&agent.stderr));
    assert!(String::from_utf8_lossy(&agent.stderr).contains("runtime"));
    let edge = run(&["edge-proxy", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    assert_eq!(edge.status.code(), Some(2), "{}", String::from_utf8_lossy(&edge.stderr));
    assert!(String::from_utf8_lossy(&edge.stderr).contains("token"), "{}", String::from_utf8_lossy(&edge.stderr));
}

#[test]
fn the_load_balancer_role_forwards() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in upstream.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(&buf[..n]);
                }
            });
        }
    });
    let port = zeitwork_testkit::free_port();
    let mut child = Command::new(BIN)
        .args(["load-balancer", "--listen", &format!("127.0.0.1:{port}"), "--backend", &up_addr.to_string()])
        .args(["--no-proxy-protocol", "--admin-listen", "127.0.0.1:0"])
        .env_remove("ZEITWORK_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let echoed = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() {
                break buf;
            }
        }
        assert!(Instant::now() < deadline, "the load balancer never forwarded");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(&echoed, b"ping");
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `zeitwork up --demo` and returns it with the demo URL it printed.
fn up_demo(data: &Path, ports: &[u16]) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(["up", "--demo", "--no-install", "--log", "warn"])
        // Its own instance addresses and user-namespace ids: other tests run `up` beside it.
        .args(["--instance-range", "10.189.0.0", "--userns-base", "2100000000"])
        .arg("--data")
        .arg(data)
        .args(["--api-port", &ports[0].to_string(), "--agent-port", &ports[1].to_string()])
        .args(["--http-port", &ports[2].to_string(), "--https-port", &ports[3].to_string()])
        .env_remove("ZEITWORK_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut printed = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("up --demo printed no URL:\n{}", printed.join("\n"))
        };
        printed.push(line.clone());
        if let Some(u) = line.trim().strip_prefix("http://").filter(|u| u.contains(".zeitwork.localhost")) {
            return (child, format!("http://{u}"));
        }
    }
}

/// GETs the demo over HTTP and over HTTPS (trusting the local CA); (status, body) of each.
fn fetch_demo(url: &str, data: &Path, ports: &[u16]) -> ((u16, String), (u16, String)) {
    let host = url.trim_start_matches("http://").split(':').next().unwrap().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let edge: std::net::SocketAddr = format!("127.0.0.1:{}", ports[2]).parse().unwrap();
        let plain = reqwest::Client::builder().resolve(&host, edge).build().unwrap().get(url).send().await.unwrap();
        let ca = reqwest::Certificate::from_pem(&std::fs::read(data.join("ca.pem")).unwrap()).unwrap();
        let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{}", ports[3]).parse().unwrap();
        let tls = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(&host, tls_addr)
            .build()
            .unwrap()
            .get(format!("https://{host}:{}/", ports[3]))
            .send()
            .await
            .unwrap();
        ((plain.status().as_u16(), plain.text().await.unwrap()), (tls.status().as_u16(), tls.text().await.unwrap()))
    })
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "up stops cleanly on SIGTERM: {status:?}");
}

/// The README's first command: `zeitwork up --demo` ends with a page that answers over HTTP
/// and over HTTPS with the local CA; Ctrl-C (SIGTERM) stops everything cleanly, and
/// starting again brings the same deployment back.
#[test]
fn up_with_the_demo_serves_a_page() {
    let data = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..4).map(|_| zeitwork_testkit::free_port()).collect();
    let (child, url) = up_demo(data.path(), &ports);
    let (plain, tls) = fetch_demo(&url, data.path(), &ports);
    assert_eq!(plain.0, 200);
    assert!(plain.1.contains("It works."), "{}", plain.1);
    assert_eq!(tls.0, 200, "HTTPS with the local CA");
    assert!(tls.1.contains("It works."));
    stop(child);

    let (child, again) = up_demo(data.path(), &ports);
    assert_eq!(again, url, "the same deployment comes back, not a new one");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (plain, _) = fetch_demo(&url, data.path(), &ports);
        if plain.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the demo did not come back after a restart: {}", plain.0);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(child);
}

/// An operator on a PostgreSQL that takes only TLS (its CA made here with
/// openssl): with TLS turned off it stops at start, naming sslmode and what to
/// set, with the configuration exit code; with `verify-ca` and the CA it serves.
#[test]
fn an_operator_on_a_postgres_that_takes_only_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = zeitwork_testkit::OpensslCa::new(dir.path(), "db-ca").expect("a CA made with openssl");
    let (cert, key) = ca.issue("server", &["db.zeitwork.test"], &["127.0.0.1"]).unwrap();
    let pg = zeitwork_testkit::Postgres::start_tls_only(&cert, &key).expect("a PostgreSQL server taking only TLS");
    let url = pg.create_database("operator").unwrap();

    let out = Command::new(BIN)
        .args(["operator", "--listen", &format!("127.0.0.1:{}", zeitwork_testkit::free_port())])
        .arg("--database-url")
        .arg(format!("{url}?sslmode=disable"))
        .env("ZEITWORK_DATA", dir.path().join("refused"))
        .env_remove("ZEITWORK_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("accepts only TLS connections") && err.contains("sslmode=disable"), "{err}");
    assert!(err.contains("set sslmode=verify-full&sslrootcert="), "the error says what to set: {err}");

    let verified = format!("{url}?sslmode=verify-ca&sslrootcert={}", ca.root().display());
    let r = start_operator_with(&dir.path().join("served"), None, Some(&verified));
    ok(cli(&r, &["orgs", "create", "acme", "--owner", "ceo@acme.test"]));
    assert!(ok(cli(&r, &["orgs", "list"])).contains("acme"));
}

/// `curl` as an API client with `token`: `method path body`; the answer as JSON
/// (null when empty). Fails the test unless the call succeeds.
fn curl_json(r: &Running, token: &str, method: &str, path: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sf", "-X", method, "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/json", "-d", body, &format!("{}{path}", r.api)])
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "{method} {path}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// A node registered through the API whose instances' statuses the test
/// reports, as a node agent would: (the node's credential).
fn register_node(r: &Running, hostname: &str, region: &str) -> String {
    let t = curl_json(
        r,
        &r.token,
        "POST",
        "/api/v1/tokens",
        &format!(r#"{{"name":"agents-{hostname}","scope":{{"kind":"cluster","role":"node-agent"}}}}"#),
    );
    let n = curl_json(
        r,
        t["secret"].as_str().unwrap(),
        "POST",
        "/api/v1/nodes",
        &format!(
            r#"{{"hostname":"{hostname}","region":"{region}","address":"http://{hostname}:8081","capacity":{{"vcpu":16,"memory":16384}}}}"#
        ),
    );
    n["credential"].as_str().unwrap().to_owned()
}

/// Deploys `image` to `org/project` and reports its one instance `status`
/// from `node`; waits until the deployment is `active` or `failed`.
fn deploy_and_report(r: &Running, node: &str, org: &str, project: &str, image: &str, status: &str) -> String {
    let d = curl_json(
        r,
        &r.token,
        "POST",
        "/api/v1/deployments",
        &format!(r#"{{"org":"{org}","project":"{project}","image":"{image}"}}"#),
    );
    let id = d["id"].as_str().unwrap().to_owned();
    let instance = until("placement", || {
        let is = curl_json(r, &r.token, "GET", &format!("/api/v1/deployments/{id}/instances"), "");
        is[0]["id"].as_str().map(str::to_owned)
    });
    let report = match status {
        "ready" => r#"{"status":"ready","address":"10.0.0.2:8080"}"#.to_owned(),
        other => format!(r#"{{"status":"{other}","reason":"the app did not answer on port 8080 within 60 s"}}"#),
    };
    curl_json(r, node, "PUT", &format!("/api/v1/instances/{instance}/status"), &report);
    let want = if status == "ready" { "active" } else { "failed" };
    until(&format!("{id} {want}"), || {
        let d = curl_json(r, &r.token, "GET", &format!("/api/v1/deployments/{id}"), "");
        (d["status"] == want).then_some(())
    });
    id
}

/// `zeitwork analytics …` against a running operator: the tables and `--json`
/// carry the numbers of the deployments this test made (two live, one failed,
/// in two orgs), and a bad window is a usage error.
#[test]
fn analytics_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    // The node sends no heartbeats; it must not be taken for down meanwhile.
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, "node_timeout_secs = 600\n").unwrap();
    let r = start_operator_with(&dir.path().join("data"), Some(&config), None);
    ok(cli(&r, &["regions", "create", "eu", "--name", "EU", "--country", "DE"]));
    ok(cli(&r, &["orgs", "create", "acme"]));
    ok(cli(&r, &["orgs", "create", "beta"]));
    let one = ["--instances-per-region", "1"];
    ok(cli(&r, &[&["projects", "create", "acme/web", "--vcpu", "2", "--memory", "512"][..], &one[..]].concat()));
    ok(cli(&r, &[&["projects", "create", "beta/api", "--vcpu", "1", "--memory", "256"][..], &one[..]].concat()));
    let node = register_node(&r, "n1", "eu");
    deploy_and_report(&r, &node, "acme", "web", "acme/web:1", "ready");
    deploy_and_report(&r, &node, "acme", "web", "acme/web:2", "failed");
    deploy_and_report(&r, &node, "beta", "api", "beta/api:1", "ready");
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["analytics"];
        all.extend_from_slice(args);
        all.push("--json");
        serde_json::from_str(&ok(cli(&r, &all))).unwrap()
    };
    let row = |table: &str, first: &str| -> Vec<String> {
        let line = table.lines().find(|l| l.starts_with(first)).unwrap_or_else(|| panic!("no {first} row: {table}"));
        line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
    };

    // Frequency: three deployments today, two of acme/web, one of beta/api.
    let freq = json(&["frequency"]);
    assert_eq!(freq["total"], 3, "{freq}");
    let today = chrono_today();
    let series = freq["series"].as_array().unwrap();
    let count = |org: &str, project: &str| {
        series.iter().find(|s| s["org"] == org && s["project"] == project).map(|s| s["deployments"].clone())
    };
    assert_eq!(count("acme", "web"), Some(serde_json::json!(2)), "{freq}");
    assert_eq!(count("beta", "api"), Some(serde_json::json!(1)), "{freq}");
    assert!(series.iter().all(|s| s["period"] == today.as_str()), "{freq}");
    let table = ok(cli(&r, &["analytics", "frequency"]));
    assert!(table.starts_with("PROJECT"), "{table}");
    assert_eq!(row(&table, "acme/web"), ["acme/web", today.as_str(), "2"], "{table}");
    assert_eq!(row(&table, "beta/api"), ["beta/api", today.as_str(), "1"], "{table}");
    // Scoped to one org, the other's deployments are left out.
    let only = json(&["frequency", "--org", "beta"]);
    assert_eq!(only["total"], 1, "{only}");

    // Success rate: acme/web one live and one failed, beta/api one live.
    let rate = json(&["success-rate"]);
    let projects = rate["projects"].as_array().unwrap();
    let web = projects.iter().find(|p| p["project"] == "web").unwrap();
    assert_eq!((&web["succeeded"], &web["failed"], &web["in_progress"]), (&1.into(), &1.into(), &0.into()), "{rate}");
    assert_eq!(web["success_rate"], 0.5, "{rate}");
    let table = ok(cli(&r, &["analytics", "success-rate"]));
    assert_eq!(row(&table, "acme/web"), ["acme/web", "1", "1", "0", "50 %"], "{table}");
    assert_eq!(row(&table, "beta/api"), ["beta/api", "1", "0", "0", "100 %"], "{table}");

    // Duration: the two live deployments, the failed one did not go live.
    let took = json(&["duration"]);
    assert_eq!(took["create_to_active"]["count"], 2, "{took}");
    assert_eq!(took["phases"]["ready_to_active"]["count"], 2, "{took}");
    assert_eq!(took["phases"]["placement"]["count"], 3, "{took}");
    let table = ok(cli(&r, &["analytics", "duration"]));
    assert!(table.starts_with("create to active: 2 live"), "{table}");
    assert_eq!(row(&table, "acme/web")[..2], ["acme/web", "1"], "{table}");

    // Resources: what each org's live instances hold.
    let held = json(&["resources"]);
    let orgs = held["orgs"].as_array().unwrap();
    let acme = orgs.iter().find(|o| o["org"] == "acme").unwrap();
    let beta = orgs.iter().find(|o| o["org"] == "beta").unwrap();
    assert_eq!((&acme["instances"], &acme["vcpu"], &acme["memory_mib"]), (&1.into(), &2.into(), &512.into()), "{held}");
    assert_eq!((&beta["instances"], &beta["vcpu"], &beta["memory_mib"]), (&1.into(), &1.into(), &256.into()), "{held}");
    let table = ok(cli(&r, &["analytics", "resources"]));
    assert_eq!(row(&table, "acme")[..4], ["acme", "1", "2", "512 MiB"], "{table}");
    assert_eq!(row(&table, "beta")[..4], ["beta", "1", "1", "256 MiB"], "{table}");
    // Nothing measured yet (the node's agent is not there to ask): the use is zero.
    assert_eq!(
        (&acme["cpu_seconds"], &acme["sampled_at"]),
        (&serde_json::json!(0.0), &serde_json::Value::Null),
        "{held}"
    );
    assert_eq!(row(&table, "acme")[4..], ["0.0 s", "0.0 MiB", "0.00"], "{table}");

    // A window that ends before it starts is the caller's mistake: exit code 2, naming the field.
    let bad = cli(&r, &["analytics", "frequency", "--from", "2026-12-01", "--to", "2026-11-01"]);
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("from"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// Today's date (UTC) as the analytics periods write it.
fn chrono_today() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `zeitwork backup --out FILE` of a running platform and `zeitwork restore
/// FILE` into a fresh data directory, which then serves the same state; a
/// restore over existing state without `--force`, a truncated file, a data
/// directory without the key and an existing output file are refused with a
/// message that says what to do, and their own exit codes.
#[test]
fn backup_and_restore_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let r = start_operator(&data);
    ok(cli(&r, &["orgs", "create", "acme"]));
    ok(cli(&r, &["projects", "create", "acme/web", "--memory", "512"]));
    ok(cli(&r, &["env", "set", "acme/web", "DATABASE_URL=postgres://s3cret"]));
    let file = dir.path().join("platform.backup");
    let run = |args: &[&str], data: &Path| {
        Command::new(BIN).args(args).env("ZEITWORK_DATA", data).env("HOME", "/nonexistent").output().unwrap()
    };
    let said =
        |out: &Output| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Online: the operator keeps serving while the backup is taken.
    let out = run(&["backup", "--out", file.to_str().unwrap()], &data);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("1 projects") && said(&out).contains("secret.key"), "{}", said(&out));
    assert!(ok(cli(&r, &["projects", "list"])).contains("acme/web"), "still serving");
    assert!(!String::from_utf8_lossy(&std::fs::read(&file).unwrap()).contains("s3cret"), "env values stay encrypted");
    // An existing file is not overwritten.
    let out = run(&["backup", "--out", file.to_str().unwrap()], &data);
    assert_eq!(out.status.code(), Some(5), "{}", said(&out));
    assert!(said(&out).contains("choose a new file"), "{}", said(&out));
    // No store to back up.
    let out = run(&["backup", "--out", dir.path().join("none.backup").to_str().unwrap()], &dir.path().join("empty"));
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(said(&out).contains("no store at"), "{}", said(&out));

    // A fresh data directory without the key: refused, naming where the key goes.
    let fresh = dir.path().join("fresh");
    let out = run(&["restore", file.to_str().unwrap()], &fresh);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("another encryption key") && said(&out).contains("secret.key"), "{}", said(&out));
    assert!(!fresh.join("zeitwork.db").exists());
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::copy(data.join("secret.key"), fresh.join("secret.key")).unwrap();

    // A truncated file: refused, nothing put in place.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&["restore", cut.to_str().unwrap()], &fresh);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("damaged or truncated"), "{}", said(&out));
    assert!(!fresh.join("zeitwork.db").exists(), "nothing restored from a truncated file");
    // A file that is not there.
    let out = run(&["restore", dir.path().join("missing.backup").to_str().unwrap()], &fresh);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));

    // The good file: restored, and an operator on it serves the same state.
    let out = run(&["restore", file.to_str().unwrap()], &fresh);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("Restored") && said(&out).contains("1 projects"), "{}", said(&out));
    // Over existing state without --force: refused, the state kept.
    let before = std::fs::read(fresh.join("zeitwork.db")).unwrap();
    let out = run(&["restore", file.to_str().unwrap()], &fresh);
    assert_eq!(out.status.code(), Some(5), "{}", said(&out));
    assert!(said(&out).contains("holds a platform already") && said(&out).contains("--force"), "{}", said(&out));
    assert_eq!(std::fs::read(fresh.join("zeitwork.db")).unwrap(), before, "existing state is kept");
    // With --force the existing state is set aside, not deleted.
    let out = run(&["restore", file.to_str().unwrap(), "--force"], &fresh);
    assert!(out.status.success(), "{}", said(&out));
    let aside = std::fs::read_dir(&fresh)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("zeitwork.db.before-restore-"));
    assert!(aside, "the earlier state was moved aside");

    drop(r);
    // The admin token is in the restored store; its file comes along like the key.
    std::fs::copy(data.join("admin.token"), fresh.join("admin.token")).unwrap();
    let restored = start_operator(&fresh);
    assert!(ok(cli(&restored, &["projects", "list"])).contains("acme/web"));
    let env: serde_json::Value =
        serde_json::from_str(&ok(cli(&restored, &["env", "list", "acme/web", "--json"]))).unwrap();
    assert!(env.to_string().contains("postgres://s3cret"), "decrypted with the same key: {env}");
}
