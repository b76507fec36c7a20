//! Events that leave the platform, and the analytics read from them: a project's webhook and Slack channels
//! receive a deployment going live (signed, with its URL) and failing (with
//! the reason), against local receivers standing in for the real ones; a
//! receiver that is down fills the outbox, then the dead-letter queue, and a
//! retry once it is back delivers everything.

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;

mod common;
use common::until;

type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A receiver on `listener` that records every POST and answers 204.
fn receiver(listener: tokio::net::TcpListener) -> Received {
    let got: Received = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
        let store = store.clone();
        async move {
            store.lock().unwrap().push((headers, body));
            axum::http::StatusCode::NO_CONTENT
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_notify_channels_with_retries_and_a_dead_letter_queue() {
    const SECRET: &str = "a webhook secret of ours";
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        notify_max_attempts: 2,
        notify_backoff_ms: 100,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin
        .post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme", "instances_per_region": 1}))
        .await
        .unwrap();

    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_at = hook_listener.local_addr().unwrap();
    let hooks = receiver(hook_listener);
    let slack_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slack_addr = slack_listener.local_addr().unwrap();
    let slack = receiver(slack_listener);

    // Bad channels are refused, naming the field.
    let bad = admin
        .post::<_, Value>("/api/v1/projects/acme/web/notifications", &json!({"kind": "webhook", "url": "ftp://x/"}))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("url"), "{bad}");
    let bad = admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{hook_at}/hook")}),
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("secret"), "{bad}");
    let webhook: Value = admin
        .post(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{hook_at}/hook/s3cr3t-path"), "secret": SECRET}),
        )
        .await
        .unwrap();
    assert!(!webhook.to_string().contains("s3cr3t-path"), "the URL is redacted: {webhook}");
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "slack", "url": format!("http://{slack_addr}/services/T0/B0/xyz"),
                    "events": ["deployment.activate", "deployment.fail"]}),
        )
        .await
        .unwrap();

    // A deployment goes live on a simulated node.
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let n: Value = agent
        .post("/api/v1/nodes", &json!({"hostname": "n1", "region": "eu", "address": "http://n1:8081", "capacity": {"vcpu": 8, "memory": 8192}}))
        .await
        .unwrap();
    let node = Client::new(&base, n["credential"].as_str().map(str::to_owned));
    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "acme/web:1", "commit_sha": "0123456789abcdef0123456789abcdef01234567"}))
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let inst = until("placement", async || {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        is.first().map(|i| i["id"].as_str().unwrap().to_owned())
    })
    .await;
    node.put::<_, Value>(
        &format!("/api/v1/instances/{inst}/status"),
        &json!({"status": "ready", "address": "10.0.0.2:8080"}),
    )
    .await
    .ok();

    // The webhook gets "created" then "active", signed over timestamp and body.
    let got = until("the webhook deliveries", async || {
        let got = hooks.lock().unwrap().clone();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let events: Vec<String> = got.iter().map(|(h, _)| h["x-zeitwork-event"].to_str().unwrap().to_owned()).collect();
    assert_eq!(events, ["deployment.create", "deployment.activate"], "in order");
    for (h, body) in &got {
        let ts: i64 = h["x-zeitwork-timestamp"].to_str().unwrap().parse().unwrap();
        let sig = h["x-zeitwork-signature"].to_str().unwrap();
        assert_eq!(sig, zeitwork_control_plane::notify::signature(SECRET, ts, body), "the documented signature");
        assert!(h["x-zeitwork-delivery"].to_str().unwrap().parse::<i64>().is_ok(), "an idempotency key");
    }
    let active: Value = serde_json::from_str(&got[1].1).unwrap();
    assert_eq!(active["deployment"]["url"], d["url"]);
    assert_eq!(active["deployment"]["commit"], "0123456789abcdef0123456789abcdef01234567");
    // Slack only gets what it asked for, as a message a person reads.
    let s = until("the slack message", async || slack.lock().unwrap().first().cloned()).await;
    let msg: Value = serde_json::from_str(&s.1).unwrap();
    let text = msg["text"].as_str().unwrap();
    assert!(
        text.contains("acme/web") && text.contains("is live") && text.contains(d["url"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(slack.lock().unwrap().len(), 1, "no deployment.create for slack");

    // A failed deployment says why.
    let d2: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "acme/web:2"}))
        .await
        .unwrap();
    let dep2 = d2["id"].as_str().unwrap().to_owned();
    let inst2 = until("placement", async || {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep2}/instances")).await.unwrap();
        is.first().map(|i| i["id"].as_str().unwrap().to_owned())
    })
    .await;
    node.put::<_, Value>(
        &format!("/api/v1/instances/{inst2}/status"),
        &json!({"status": "failed", "reason": "the app did not answer on port 8080 within 60 s"}),
    )
    .await
    .ok();
    let failed = until("the failure message", async || {
        let got = slack.lock().unwrap().clone();
        got.into_iter().map(|(_, b)| b).find(|b| b.contains("deployment failed"))
    })
    .await;
    assert!(failed.contains("did not answer on port 8080"), "{failed}");

    // A receiver that is down: retried, then dead-lettered; a retry after it is back delivers.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = down.local_addr().unwrap();
    drop(down);
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{down_addr}/"), "secret": SECRET}),
        )
        .await
        .unwrap();
    // A sample goes to every channel that takes it.
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();
    let dlq = until("a dead letter", async || {
        let st: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
        (st["count"].as_u64().unwrap_or(0) >= 1).then_some(st)
    })
    .await;
    assert!(dlq["by_reason"].to_string().contains("unreachable"), "{dlq}");
    // The queue's depths are gauges on /metrics too, for alerting.
    let metrics = until("the dead-letter gauge", async || {
        let m = String::from_utf8(admin.send_raw(reqwest::Method::GET, "/metrics", None).await.unwrap().2.to_vec())
            .unwrap();
        m.lines().any(|l| l.starts_with("zeitwork_operator_outbox_dead ") && !l.ends_with(" 0")).then_some(m)
    })
    .await;
    assert!(metrics.contains("zeitwork_operator_db_connections_idle"), "{metrics}");
    let stats: Value = admin.get("/api/admin/outbox/stats").await.unwrap();
    assert!(stats["dead"].as_u64().unwrap() >= 1 && stats["delivered"].as_u64().unwrap() >= 4, "{stats}");
    // The receiver comes back; everything is retried and delivered.
    let back = receiver(tokio::net::TcpListener::bind(down_addr).await.unwrap());
    let retried: Value = admin.post("/api/admin/dlq/retry", &json!({})).await.unwrap();
    assert!(retried["retried"].as_u64().unwrap() >= 1);
    until("the retried delivery", async || (!back.lock().unwrap().is_empty()).then_some(())).await;
    let st: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
    assert_eq!(st["count"], 0, "{st}");
    // The same deployments, as the analytics endpoints count them: one live, one failed.
    let freq: Value = admin.get("/api/v1/analytics/deployments/frequency?org=acme").await.unwrap();
    assert_eq!(freq["total"], 2, "{freq}");
    assert_eq!(freq["series"][0]["deployments"], 2, "{freq}");
    let rate: Value = admin.get("/api/v1/analytics/deployments/success-rate?org=acme&project=web").await.unwrap();
    assert_eq!(rate["projects"][0]["succeeded"], 1, "{rate}");
    assert_eq!(rate["projects"][0]["failed"], 1, "{rate}");
    assert_eq!(rate["projects"][0]["success_rate"], 0.5, "{rate}");
    let took: Value = admin.get("/api/v1/analytics/deployments/duration").await.unwrap();
    assert_eq!(took["create_to_active"]["count"], 1, "{took}");
    assert!(took["create_to_active"]["p50_secs"].as_f64().unwrap() >= 0.0, "{took}");
    // Phase by phase: both deployments were placed; the live one became ready and took traffic.
    assert_eq!(took["phases"]["placement"]["count"], 2, "{took}");
    assert_eq!(took["phases"]["ready_to_active"]["count"], 1, "{took}");
    assert_eq!(took["phases"]["build"]["count"], 0, "nothing was built from source: {took}");
    let held: Value = admin.get("/api/v1/analytics/resources/by-org?org=acme").await.unwrap();
    assert_eq!(held["orgs"][0]["instances"], 1, "{held}");
    let reversed =
        admin.get::<Value>("/api/v1/analytics/deployments/frequency?from=2026-12-01&to=2026-11-01").await.unwrap_err();
    assert_eq!(reversed.status(), Some(400));
    assert!(reversed.to_string().contains("from"), "{reversed}");
    let too_long = admin.get::<Value>("/api/v1/analytics/deployments/frequency?from=2020-01-01").await.unwrap_err();
    assert_eq!(too_long.status(), Some(400));

    // Only platform admins read the queues.
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "dev", "scope": {"kind": "org", "org": "acme", "role": "admin"}}))
        .await
        .unwrap();
    let org_admin = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    assert_eq!(org_admin.get::<Value>("/api/admin/outbox/stats").await.unwrap_err().status(), Some(403));
    assert_eq!(org_admin.get::<Value>("/api/admin/sse/stats").await.unwrap_err().status(), Some(403));
    // Open event streams are counted by organisation, and the changes they were sent.
    let listening = org_admin.stream("/api/v1/events/stream").await.unwrap();
    let sse = until("the open stream counted", async || {
        let st: Value = admin.get("/api/admin/sse/stats").await.unwrap();
        (st["by_org"]["acme"] == 1).then_some(st)
    })
    .await;
    assert!(sse["connections"].as_i64().unwrap() >= 1, "{sse}");
    drop(listening);
    until("the closed stream uncounted", async || {
        let st: Value = admin.get("/api/admin/sse/stats").await.unwrap();
        st["by_org"].get("acme").is_none().then_some(())
    })
    .await;
    // An org's token reads its own org's analytics, and no other's.
    let own: Value = org_admin.get("/api/v1/analytics/deployments/frequency").await.unwrap();
    assert_eq!(own["total"], 2);
    let other = org_admin.get::<Value>("/api/v1/analytics/deployments/frequency?org=other").await.unwrap_err();
    assert_eq!(other.status(), Some(403));
    op.shutdown().await;
}

/// An organisation's default channels get every project's events; a Slack
/// channel may post as a bot (token and channel, through Slack's Web API at a
/// configurable address), and Slack's `"ok": false` counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_default_channels_and_slack_bots() {
    // A stand-in for Slack's chat.postMessage: "#nowhere" does not exist.
    let got: Received = Arc::default();
    let sink = got.clone();
    let slack = axum::Router::new().route(
        "/api/chat.postMessage",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                sink.lock().unwrap().push((headers, body));
                if v["channel"] == "#nowhere" {
                    axum::Json(json!({"ok": false, "error": "channel_not_found"}))
                } else {
                    axum::Json(json!({"ok": true, "ts": "1.2"}))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, slack).await.ok() });
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        slack_api_url: format!("http://{at}/api"),
        notify_max_attempts: 1,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "api", "org": "acme"})).await.unwrap();
    for (body, field) in [
        (
            json!({"kind": "slack", "url": "https://hooks.slack.com/x", "token": "xoxb-12345678", "channel": "#a"}),
            "url",
        ),
        (json!({"kind": "slack", "token": "xoxb-12345678"}), "channel"),
        (
            json!({"kind": "webhook", "url": "https://example.com/", "secret": "a secret of sixteen", "token": "xoxb-12345678"}),
            "token",
        ),
    ] {
        let e = admin.post::<_, Value>("/api/v1/orgs/acme/notifications", &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    let bot: Value = admin
        .post(
            "/api/v1/orgs/acme/notifications",
            &json!({"kind": "slack", "token": "xoxb-bot-token-1", "channel": "#deploys", "events": ["notification.test"]}),
        )
        .await
        .unwrap();
    assert_eq!(bot["project"], Value::Null);
    assert_eq!(bot["url"], "slack bot → #deploys");
    admin
        .post::<_, Value>(
            "/api/v1/orgs/acme/notifications",
            &json!({"kind": "slack", "token": "xoxb-bot-token-1", "channel": "#nowhere", "events": ["notification.test"]}),
        )
        .await
        .unwrap();
    let listed: Vec<Value> = admin.get("/api/v1/orgs/acme/notifications").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(!serde_json::to_string(&listed).unwrap().contains("xoxb"), "tokens are never shown");

    // A project's event reaches the org's default channel, posted as the bot.
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/api/notifications/test", None).await.unwrap();
    let posted = until("the bot's message", async || {
        let seen = got.lock().unwrap().clone();
        seen.into_iter().find(|(_, b)| b.contains("#deploys"))
    })
    .await;
    assert_eq!(posted.0["authorization"], "Bearer xoxb-bot-token-1");
    let body: Value = serde_json::from_str(&posted.1).unwrap();
    assert!(body["text"].as_str().unwrap().contains("acme/api"), "{body}");
    assert!(body["blocks"].is_array());
    // Slack's refusal is a failure, with Slack's reason, in the dead-letter queue.
    let dead = until("the refused message dead-lettered", async || {
        let dead: Vec<Value> = admin.get("/api/admin/dlq").await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert!(dead[0]["error"].as_str().unwrap().contains("channel_not_found"), "{dead:?}");
    admin.delete(&format!("/api/v1/orgs/acme/notifications/{}", bot["id"].as_str().unwrap())).await.unwrap();
    assert_eq!(admin.get::<Vec<Value>>("/api/v1/orgs/acme/notifications").await.unwrap().len(), 1);
    op.shutdown().await;
}

/// What a stand-in SMTP relay received: (AUTH line, MAIL FROM, RCPT TOs, DATA).
type Mail = Arc<Mutex<Vec<(String, String, Vec<String>, String)>>>;

/// A stand-in SMTP relay on loopback (plain SMTP with AUTH PLAIN) that records each message.
async fn smtp_stand_in() -> (std::net::SocketAddr, Mail) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let got: Mail = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let sink = sink.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 stand-in ESMTP\r\n").await;
                let (mut auth, mut from, mut to, mut data) = (String::new(), String::new(), Vec::new(), String::new());
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250-stand-in\r\n250 AUTH PLAIN LOGIN\r\n"
                    } else if upper.starts_with("AUTH") {
                        auth = line.clone();
                        b"235 2.7.0 accepted\r\n"
                    } else if upper.starts_with("MAIL FROM") {
                        from = line.clone();
                        b"250 ok\r\n"
                    } else if upper.starts_with("RCPT TO") {
                        to.push(line.clone());
                        b"250 ok\r\n"
                    } else if upper == "DATA" {
                        let _ = w.write_all(b"354 go on\r\n").await;
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            data.push_str(&l);
                            data.push('\n');
                        }
                        sink.lock().unwrap().push((auth.clone(), from.clone(), to.clone(), data.clone()));
                        b"250 queued\r\n"
                    } else if upper == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

/// Email channels send through an SMTP relay with its credentials; bad addresses are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_channels_send_through_an_smtp_relay() {
    let (relay, mail) = smtp_stand_in().await;
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let url = format!("smtp://alerts%40acme.test:s3cr%40t@{relay}?tls=none");
    for (body, field) in [
        (json!({"kind": "email", "url": url, "to": [], "from": "zeitwork@acme.test"}), "to"),
        (json!({"kind": "email", "url": url, "to": ["not an address"], "from": "zeitwork@acme.test"}), "to[0]"),
        (json!({"kind": "email", "url": url, "to": ["ops@acme.test"]}), "from"),
        (
            json!({"kind": "email", "url": "https://example.com/", "to": ["ops@acme.test"], "from": "z@acme.test"}),
            "url",
        ),
        (
            json!({"kind": "email", "url": format!("{url}&tls=maybe"), "to": ["ops@acme.test"], "from": "z@acme.test"}),
            "url",
        ),
    ] {
        let e = admin.post::<_, Value>("/api/v1/projects/acme/web/notifications", &body).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    let ch: Value = admin
        .post(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "email", "url": url, "to": ["ops@acme.test", "oncall@acme.test"], "from": "Zeitwork <zeitwork@acme.test>"}),
        )
        .await
        .unwrap();
    assert_eq!(ch["url"], "smtp://127.0.0.1/… → ops@acme.test, oncall@acme.test");
    assert!(!ch.to_string().contains("s3cr"), "the relay's password is never shown");
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();
    let (auth, from, to, data) = until("the email", async || mail.lock().unwrap().first().cloned()).await;
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode("\0alerts@acme.test\0s3cr@t");
    assert!(auth.ends_with(&plain), "AUTH PLAIN with the URL's credentials: {auth}");
    assert!(from.contains("<zeitwork@acme.test>"), "{from}");
    assert_eq!(to.len(), 2, "{to:?}");
    assert!(data.contains("Subject: [zeitwork] acme/web test notification"), "{data}");
    assert!(data.contains("Message-ID: <zeitwork-"), "{data}");
    op.shutdown().await;
}

/// Nodes belong to no organisation: their going down, coming back and draining
/// go to the platform's own channels, and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_going_down_and_coming_back_reach_the_platforms_channels() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        node_timeout_secs: 1,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let got = receiver(listener);
    let hook = json!({"kind": "webhook", "url": format!("http://{at}/ops"), "secret": "platform hook secret 1"});

    // Node events are the platform's; an organisation's channel cannot ask for them, nor the platform's for others.
    let mut wrong = hook.clone();
    wrong["events"] = json!(["node.down"]);
    let e = admin.post::<_, Value>("/api/v1/orgs/acme/notifications", &wrong).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("/api/admin/notifications"), "{e}");
    wrong["events"] = json!(["deployment.activate"]);
    let e = admin.post::<_, Value>("/api/admin/notifications", &wrong).await.unwrap_err();
    assert!(e.to_string().contains("events"), "{e}");
    let org_admin: Value = admin
        .post("/api/v1/tokens", &json!({"name": "o", "scope": {"kind": "org", "org": "acme", "role": "admin"}}))
        .await
        .unwrap();
    let org_admin = Client::new(&base, Some(org_admin["secret"].as_str().unwrap().to_owned()));
    assert_eq!(org_admin.post::<_, Value>("/api/admin/notifications", &hook).await.unwrap_err().status(), Some(403));

    let channel: Value = admin.post("/api/admin/notifications", &hook).await.unwrap();
    assert_eq!(channel["org"], "");
    let listed: Vec<Value> = admin.get("/api/admin/notifications").await.unwrap();
    assert_eq!(listed.len(), 1);

    // A node registers, then misses its heartbeats.
    let agent: Value = admin
        .post("/api/v1/tokens", &json!({"name": "a", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(agent["secret"].as_str().unwrap().to_owned()));
    let node: Value = agent
        .post(
            "/api/v1/nodes",
            &json!({"hostname": "worker-7", "region": "eu", "address": "http://10.0.0.7:8081",
                    "capacity": {"vcpu": 2, "memory": 2048}}),
        )
        .await
        .unwrap();
    let id = node["id"].as_str().unwrap().to_owned();
    let own = Client::new(&base, Some(node["credential"].as_str().unwrap().to_owned()));
    let told = |event: &'static str| {
        let got = got.clone();
        async move {
            until(event, async || {
                got.lock()
                    .unwrap()
                    .iter()
                    .filter_map(|(_, b)| serde_json::from_str::<Value>(b).ok())
                    .find(|p| p["event"] == event)
            })
            .await
        }
    };
    let down = told("node.down").await;
    assert_eq!(down["target"], id.as_str());
    assert_eq!(down["detail"]["hostname"], "worker-7");
    assert_eq!(down["detail"]["region"], "eu");
    // It comes back.
    own.post_empty::<Value>(&format!("/api/v1/nodes/{id}/heartbeat")).await.unwrap();
    let up = told("node.up").await;
    assert_eq!(up["detail"]["hostname"], "worker-7");
    let n: Value = admin.get(&format!("/api/v1/nodes/{id}")).await.unwrap();
    assert_eq!(n["status"], "ready");
    // An organisation's channel never hears of nodes.
    let events: Vec<Value> = admin.get("/api/v1/events?action=node.down").await.unwrap();
    assert!(events.iter().all(|e| e["org"].is_null()), "{events:?}");
    admin.delete(&format!("/api/admin/notifications/{}", channel["id"].as_str().unwrap())).await.unwrap();
    assert!(admin.get::<Vec<Value>>("/api/admin/notifications").await.unwrap().is_empty());
    op.shutdown().await;
}
