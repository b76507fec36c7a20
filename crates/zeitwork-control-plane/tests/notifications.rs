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
    let (d, _) = common::deploy_ready(
        &admin,
        &node,
        &json!({"org": "acme", "project": "web", "image": "acme/web:1", "commit_sha": "0123456789abcdef0123456789abcdef01234567"}),
    )
    .await;

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
    let inst2 = common::placed(&admin, d2["id"].as_str().unwrap()).await;
    common::report(
        &node,
        &inst2,
        &json!({"status": "failed", "reason": "the app did not answer on port 8080 within 60 s"}),
    )
    .await;
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

/// What a stand-in SMTP relay received: (AUTH line, MAIL FROM, RCPT TOs, DATA, whether over TLS).
type Mail = Arc<Mutex<Vec<(String, String, Vec<String>, String, bool)>>>;

/// A stand-in SMTP relay on loopback (AUTH PLAIN) that records each message;
/// with `tls`, it offers STARTTLS and upgrades with that certificate.
async fn smtp_stand_in(tls: Option<Arc<rustls::ServerConfig>>) -> (std::net::SocketAddr, Mail) {
    let got: Mail = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let (sink, tls) = (sink.clone(), tls.clone());
            tokio::spawn(async move {
                let Some(plain) = smtp_session(sock, tls.is_some(), false, &sink).await else { return };
                // The client asked for STARTTLS: the same conversation again, encrypted.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.unwrap());
                let Ok(encrypted) = acceptor.accept(plain).await else { return };
                smtp_session(encrypted, false, true, &sink).await;
            });
        }
    });
    (addr, got)
}

/// One SMTP conversation on `sock`; gives the connection back when the client asks for STARTTLS.
async fn smtp_session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    sock: S,
    offer_starttls: bool,
    over_tls: bool,
    sink: &Mail,
) -> Option<S> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut conn = BufReader::new(sock);
    if !over_tls {
        conn.get_mut().write_all(b"220 stand-in ESMTP\r\n").await.ok()?;
    }
    let (mut auth, mut from, mut to) = (String::new(), String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_owned();
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            if offer_starttls {
                b"250-stand-in\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
            } else {
                b"250-stand-in\r\n250 AUTH PLAIN LOGIN\r\n"
            }
        } else if upper == "STARTTLS" && offer_starttls {
            conn.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await.ok()?;
            return Some(conn.into_inner());
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
            conn.get_mut().write_all(b"354 go on\r\n").await.ok()?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if conn.read_line(&mut l).await.ok()? == 0 {
                    return None;
                }
                if l.trim_end() == "." {
                    break;
                }
                data.push_str(l.trim_end_matches(['\r', '\n']));
                data.push('\n');
            }
            sink.lock().unwrap().push((auth.clone(), from.clone(), to.clone(), data, over_tls));
            b"250 queued\r\n"
        } else if upper == "QUIT" {
            conn.get_mut().write_all(b"221 bye\r\n").await.ok()?;
            return None;
        } else {
            b"250 ok\r\n"
        };
        conn.get_mut().write_all(reply).await.ok()?;
    }
}

/// A CA (its PEM written to `dir/smtp-ca.pem`) and a relay certificate for 127.0.0.1 signed by it.
fn relay_tls(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "Zeitwork test mail CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("smtp-ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    Arc::new(config)
}

/// Email channels send through an SMTP relay with its credentials; bad addresses are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_channels_send_through_an_smtp_relay() {
    let (relay, mail) = smtp_stand_in(None).await;
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
    let (auth, from, to, data, over_tls) = until("the email", async || mail.lock().unwrap().first().cloned()).await;
    assert!(!over_tls, "tls=none never upgrades");
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode("\0alerts@acme.test\0s3cr@t");
    assert!(auth.ends_with(&plain), "AUTH PLAIN with the URL's credentials: {auth}");
    assert!(from.contains("<zeitwork@acme.test>"), "{from}");
    assert_eq!(to.len(), 2, "{to:?}");
    assert!(data.contains("Subject: [zeitwork] acme/web test notification"), "{data}");
    assert!(data.contains("Message-ID: <zeitwork-"), "{data}");
    op.shutdown().await;
}

/// An `smtp://` relay that offers STARTTLS: the message goes over TLS, the
/// relay's certificate checked against the operator's `smtp_ca`; a relay that
/// does not offer it is refused (and never sees the password) unless
/// `tls=opportunistic`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_over_starttls_to_a_relay_that_offers_it() {
    let dir = tempfile::tempdir().unwrap();
    let tls = relay_tls(dir.path());
    let (relay, mail) = smtp_stand_in(Some(tls)).await;
    let (plain_relay, plain_mail) = smtp_stand_in(None).await;
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        notify_max_attempts: 1,
        smtp_ca: Some(dir.path().join("smtp-ca.pem")),
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    for url in [
        format!("smtp://alerts%40acme.test:s3cr%40t@{relay}"),
        format!("smtp://alerts%40acme.test:s3cr%40t@{plain_relay}"),
    ] {
        admin
            .post::<_, Value>(
                "/api/v1/projects/acme/web/notifications",
                &json!({"kind": "email", "url": url, "to": ["ops@acme.test"], "from": "zeitwork@acme.test"}),
            )
            .await
            .unwrap();
    }
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();
    let (auth, _from, to, data, over_tls) = until("the email", async || mail.lock().unwrap().first().cloned()).await;
    assert!(over_tls, "the message and the credentials went after STARTTLS");
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode("\0alerts@acme.test\0s3cr@t");
    assert!(auth.ends_with(&plain), "{auth}");
    assert_eq!(to.len(), 1, "{to:?}");
    assert!(data.contains("Subject: [zeitwork] acme/web test notification"), "{data}");
    // The relay without STARTTLS: refused (the default is tls=required), nothing sent in the clear.
    let dead = until("the refused email dead-lettered", async || {
        let dead: Vec<Value> = admin.get("/api/admin/dlq").await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(plain_mail.lock().unwrap().is_empty(), "no message in the clear");
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
    // Drained by an admin: it runs nothing, so it is drained at once; both steps are told.
    admin.post_empty::<Value>(&format!("/api/v1/nodes/{id}/drain")).await.unwrap();
    let drain = told("node.drain").await;
    assert_eq!(drain["target"], id.as_str());
    let drained = told("node.drained").await;
    assert_eq!(drained["detail"]["hostname"], "worker-7");
    // An organisation's channel never hears of nodes.
    let events: Vec<Value> = admin.get("/api/v1/events?action=node.down").await.unwrap();
    assert!(events.iter().all(|e| e["org"].is_null()), "{events:?}");
    admin.delete(&format!("/api/admin/notifications/{}", channel["id"].as_str().unwrap())).await.unwrap();
    assert!(admin.get::<Vec<Value>>("/api/admin/notifications").await.unwrap().is_empty());
    op.shutdown().await;
}

/// How a [`flaky_receiver`] answers: a status, or [`HANG`] (it never answers).
type Answer = Arc<std::sync::atomic::AtomicU16>;
const HANG: u16 = 0;

/// What a [`flaky_receiver`] got: when, the headers and the body of each attempt.
type Attempts = Arc<Mutex<Vec<(std::time::Instant, HeaderMap, String)>>>;

/// A receiver that records every attempt and answers as `answer` says at the time.
async fn flaky_receiver(answer: u16) -> (std::net::SocketAddr, Answer, Attempts) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let (answer, got): (Answer, Attempts) = (Arc::new(answer.into()), Arc::default());
    let (how, sink) = (answer.clone(), got.clone());
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
        let (how, sink) = (how.clone(), sink.clone());
        async move {
            sink.lock().unwrap().push((std::time::Instant::now(), headers, body));
            match how.load(std::sync::atomic::Ordering::SeqCst) {
                HANG => std::future::pending().await,
                status => axum::http::StatusCode::from_u16(status).unwrap(),
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (at, answer, got)
}

/// Region `eu`, org `acme`, project `web` and a simulated ready node; the node's client.
async fn project_on_a_node(base: &str, admin: &Client) -> Client {
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin
        .post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme", "instances_per_region": 1}))
        .await
        .unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(base, Some(t["secret"].as_str().unwrap().to_owned()));
    let n: Value = agent
        .post("/api/v1/nodes", &json!({"hostname": "n1", "region": "eu", "address": "http://n1:8081", "capacity": {"vcpu": 8, "memory": 8192}}))
        .await
        .unwrap();
    Client::new(base, n["credential"].as_str().map(str::to_owned))
}

/// Deploys `image` to acme/web and reports its instance ready; the deployment.
async fn deploy_ready(admin: &Client, node: &Client, image: &str) -> Value {
    common::deploy_ready(admin, node, &json!({"org": "acme", "project": "web", "image": image})).await.0
}

/// A receiver that hangs: each attempt is cut at the delivery timeout while it
/// counts as in flight, retried with backoff, then dead-lettered; the
/// deployment it is told about goes live meanwhile, waiting for no receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_times_out_and_is_dead_lettered_while_deploys_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        notify_max_attempts: 2,
        notify_backoff_ms: 300,
        notify_timeout_ms: 1500,
        ..Default::default()
    })
    .await;
    let node = project_on_a_node(&base, &admin).await;
    let (at, _answer, got) = flaky_receiver(HANG).await;
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{at}/"), "secret": "a webhook secret of ours"}),
        )
        .await
        .unwrap();
    let d = deploy_ready(&admin, &node, "acme/web:1").await;
    let dep = d["id"].as_str().unwrap();

    // The first attempt hangs: it is in flight, in the stats and on /metrics.
    until("the first attempt", async || (!got.lock().unwrap().is_empty()).then_some(())).await;
    let stats: Value = admin.get("/api/admin/outbox/stats").await.unwrap();
    assert_eq!(stats["in_flight"], 1, "{stats}");
    assert!(stats["pending"].as_u64().unwrap() >= 1, "{stats}");
    let metrics =
        String::from_utf8(admin.send_raw(reqwest::Method::GET, "/metrics", None).await.unwrap().2.to_vec()).unwrap();
    assert!(metrics.lines().any(|l| l == "zeitwork_operator_outbox_in_flight 1"), "{metrics}");
    // The deployment went live without waiting for the receiver: nothing is dead-lettered yet.
    until("the deployment live", async || {
        let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
        (d["status"] == "active").then_some(())
    })
    .await;
    let dlq: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
    assert_eq!(dlq["count"], 0, "the receiver has not given up yet: {dlq}");

    // Both rows (created, active) are tried twice, then dead-lettered with why.
    let dlq = until("two dead letters", async || {
        let st: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
        (st["count"] == 2).then_some(st)
    })
    .await;
    assert_eq!(dlq["by_reason"]["the receiver did not answer within 1500 ms"], 2, "{dlq}");
    let attempts = got.lock().unwrap().clone();
    let ids: Vec<&str> = attempts.iter().map(|(_, h, _)| h["x-zeitwork-delivery"].to_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "two attempts per row: {ids:?}");
    assert_eq!(ids[0], ids[1], "the retry carries the same idempotency key");
    assert_eq!(ids[2], ids[3]);
    let events: Vec<&str> = attempts.iter().map(|(_, h, _)| h["x-zeitwork-event"].to_str().unwrap()).collect();
    assert_eq!(events, ["deployment.create", "deployment.create", "deployment.activate", "deployment.activate"]);
    // Each retry waited out the timeout and then the backoff (300 ms, -20 % jitter at most).
    let waited = attempts[1].0 - attempts[0].0;
    assert!(waited >= std::time::Duration::from_millis(1500 + 240), "{waited:?}");
    until("nothing in flight", async || {
        let st: Value = admin.get("/api/admin/outbox/stats").await.unwrap();
        (st["in_flight"] == 0 && st["pending"] == 0).then_some(())
    })
    .await;
    op.shutdown().await;
}

/// A receiver answering 500 and one that is down: their rows wait in the
/// outbox (pending rises first), are retried with growing waits, then go to
/// the dead-letter queue; one dead letter is retried by id once its receiver
/// is healthy, the other dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receivers_fill_the_outbox_then_the_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        notify_max_attempts: 3,
        notify_backoff_ms: 700,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let (failing, answer, got) = flaky_receiver(500).await;
    // A port below the ephemeral range: no test's server is ever handed it, so it stays refused.
    let down_at: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    for at in [failing, down_at] {
        admin
            .post::<_, Value>(
                "/api/v1/projects/acme/web/notifications",
                &json!({"kind": "webhook", "url": format!("http://{at}/"), "secret": "a webhook secret of ours"}),
            )
            .await
            .unwrap();
    }
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();

    // Pending and failed attempts rise while the dead-letter queue is still empty…
    let mut seen_pending_before_dead = false;
    let dlq = until("both dead-lettered", async || {
        let outbox: Value = admin.get("/api/admin/outbox/stats").await.unwrap();
        let dlq: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
        if outbox["pending"] == 2 && outbox["failed_attempts"].as_u64().unwrap() >= 2 && dlq["count"] == 0 {
            assert!(outbox["oldest_pending_secs"].is_i64(), "{outbox}");
            seen_pending_before_dead = true;
        }
        (dlq["count"] == 2).then_some(dlq)
    })
    .await;
    // …and only then the dead-letter queue, once each had its 3 attempts.
    assert!(seen_pending_before_dead, "the outbox held both rows, failing, before the DLQ did");
    assert_eq!(dlq["by_reason"]["the receiver answered 500 Internal Server Error"], 1, "{dlq}");
    assert!(dlq["by_reason"].to_string().contains("the receiver is unreachable"), "{dlq}");
    let outbox: Value = admin.get("/api/admin/outbox/stats").await.unwrap();
    assert_eq!((outbox["pending"].as_u64(), outbox["dead"].as_u64()), (Some(0), Some(2)), "{outbox}");
    let attempts = got.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3, "tried 3 times");
    // Exponential backoff: about 0.7 s, then about 1.4 s (±20 %).
    let (first, second) = (attempts[1].0 - attempts[0].0, attempts[2].0 - attempts[1].0);
    assert!(first >= std::time::Duration::from_millis(560), "{first:?}");
    assert!(second >= std::time::Duration::from_millis(1120), "{second:?}");

    // The failing receiver is healthy again: its dead letter is retried by id and arrives.
    answer.store(204, std::sync::atomic::Ordering::SeqCst);
    let dead: Vec<Value> = admin.get("/api/admin/dlq").await.unwrap();
    let by = |needle: &str| dead.iter().find(|d| d["error"].as_str().unwrap().contains(needle)).unwrap()["id"].clone();
    let (failed_id, down_id) = (by("answered 500"), by("unreachable"));
    let retried: Value = admin.post_empty(&format!("/api/admin/dlq/{failed_id}/retry")).await.unwrap();
    assert_eq!(retried["retried"], 1);
    until("the retried delivery", async || (got.lock().unwrap().len() == 4).then_some(())).await;
    let key = got.lock().unwrap()[3].1["x-zeitwork-delivery"].to_str().unwrap().to_owned();
    assert_eq!(key, failed_id.to_string(), "the same idempotency key as the dead letter's id");
    until("the retried row delivered", async || {
        let st: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
        (st["count"] == 1).then_some(())
    })
    .await;
    // The other is dropped for good; neither id is a dead letter any more.
    admin.delete(&format!("/api/admin/dlq/{down_id}")).await.unwrap();
    let st: Value = admin.get("/api/admin/dlq/stats").await.unwrap();
    assert_eq!(st["count"], 0, "{st}");
    for id in [&failed_id, &down_id] {
        let e = admin.post_empty::<Value>(&format!("/api/admin/dlq/{id}/retry")).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert_eq!(admin.delete(&format!("/api/admin/dlq/{id}")).await.unwrap_err().status(), Some(404));
    }
    op.shutdown().await;
}

/// The shell recipe of docs/notifications.md ("Verifying a webhook"), as written there.
fn documented_recipe() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/notifications.md")).unwrap();
    let section = doc.split("## Verifying a webhook").nth(1).expect("the doc has a section on verifying webhooks");
    let block = section.split("```sh\n").nth(1).expect("the section has a shell recipe");
    block.split("```").next().unwrap().to_owned()
}

/// Runs the documented recipe with `openssl` in `dir` (holding body.json) and its inputs in the environment.
fn run_recipe(dir: &std::path::Path, secret: &str, timestamp: &str, signature: &str) -> String {
    let out = std::process::Command::new("bash")
        .args(["-c", &documented_recipe()])
        .current_dir(dir)
        .env("SECRET", secret)
        .env("X_ZEITWORK_TIMESTAMP", timestamp)
        .env("X_ZEITWORK_SIGNATURE", signature)
        .output()
        .expect("bash runs (with openssl on the PATH)");
    assert!(out.stderr.is_empty(), "the recipe ran cleanly: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A real delivery's signature checks out with the documented `openssl` recipe,
/// and a body changed in transit does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_openssl_recipe_verifies_a_real_delivery() {
    const SECRET: &str = "the receiver's shared secret";
    assert!(
        std::process::Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success()),
        "this test runs the documented recipe: install the openssl package"
    );
    let dir = tempfile::tempdir().unwrap();
    let (op, _base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let got = receiver(listener);
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{at}/"), "secret": SECRET}),
        )
        .await
        .unwrap();
    admin.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();
    let (headers, body) = until("the delivery", async || got.lock().unwrap().first().cloned()).await;
    let ts = headers["x-zeitwork-timestamp"].to_str().unwrap();
    let sig = headers["x-zeitwork-signature"].to_str().unwrap();

    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("body.json"), &body).unwrap();
    assert_eq!(run_recipe(work.path(), SECRET, ts, sig), "valid\n", "the documented recipe accepts it");
    assert_eq!(run_recipe(work.path(), "another secret entirely", ts, sig), "", "another secret does not");
    let older = (ts.parse::<i64>().unwrap() - 1).to_string();
    assert_eq!(run_recipe(work.path(), SECRET, &older, sig), "", "the timestamp is signed too");
    std::fs::write(work.path().join("body.json"), body.replacen("acme", "evil", 1)).unwrap();
    assert_eq!(run_recipe(work.path(), SECRET, ts, sig), "", "a changed body does not");
    op.shutdown().await;
}

/// Every step of a deployment's life a person acts on, and what the platform
/// does by itself, reaches a webhook under its event name: rolled back,
/// promoted, put to sleep, woken, crash-looping, a custom domain's
/// certificate failing and then issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_a_webhook_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        notifications_allow_internal: true,
        ..Default::default()
    })
    .await;
    let node = project_on_a_node(&base, &admin).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let got = receiver(listener);
    admin
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{at}/"), "secret": "a webhook secret of ours"}),
        )
        .await
        .unwrap();
    // The delivery of `event` about `target`: its header and its body agree.
    let told = |event: &'static str, target: String| {
        let got = got.clone();
        async move {
            until(&format!("{event} of {target}"), async || {
                got.lock().unwrap().iter().find_map(|(h, b)| {
                    let p: Value = serde_json::from_str(b).ok()?;
                    (h["x-zeitwork-event"] == event && p["event"] == event && p["target"] == target.as_str())
                        .then_some(p)
                })
            })
            .await
        }
    };
    let live = |id: String| {
        let admin = admin.clone();
        async move {
            until(&format!("{id} live"), async || {
                let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
                (d["status"] == "active").then_some(())
            })
            .await
        }
    };
    let id = |d: &Value| d["id"].as_str().unwrap().to_owned();
    let v1 = id(&deploy_ready(&admin, &node, "acme/web:1").await);
    live(v1.clone()).await;
    let v2 = id(&deploy_ready(&admin, &node, "acme/web:2").await);
    live(v2.clone()).await;

    // Rolled back to v1 (in standby), by a person.
    admin.post::<_, Value>("/api/v1/projects/acme/web/rollback", &json!({})).await.unwrap();
    let rolled = told("deployment.rollback", v1.clone()).await;
    assert_eq!(rolled["org"], "acme");
    assert_eq!(rolled["project"], "web");
    // v2, replaced, is put to sleep, then woken.
    admin.post_empty::<Value>(&format!("/api/v1/deployments/{v2}/sleep")).await.unwrap();
    told("deployment.sleep", v2.clone()).await;
    admin.post_empty::<Value>(&format!("/api/v1/deployments/{v2}/wake")).await.unwrap();
    told("deployment.wake", v2.clone()).await;

    // Staging's deployment is promoted to production.
    let staged: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "acme/web:3", "environment": "staging"}),
        )
        .await
        .unwrap();
    let s1 = id(&staged);
    let inst = common::placed(&admin, &s1).await;
    common::report(&node, &inst, &json!({"status": "ready", "address": "10.0.0.3:8080"})).await;
    live(s1.clone()).await;
    admin
        .post::<_, Value>("/api/v1/projects/acme/web/promote", &json!({"from": "staging", "to": "production"}))
        .await
        .unwrap();
    let promoted = told("deployment.promote", s1.clone()).await;
    assert_eq!(promoted["detail"]["to"], "production", "{promoted}");

    // Its instances keep crashing: replaced until the budget is spent, then told once.
    let crash_loop = until("the crash loop told", async || {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{s1}/instances")).await.unwrap();
        for i in is.iter().filter(|i| !matches!(i["status"].as_str(), Some("failed" | "exited" | "stopped"))) {
            node.put::<_, Value>(
                &format!("/api/v1/instances/{}/status", i["id"].as_str().unwrap()),
                &json!({"status": "failed", "reason": "segfault at 0x0"}),
            )
            .await
            .ok();
        }
        got.lock().unwrap().iter().find_map(|(_, b)| {
            let p: Value = serde_json::from_str(b).ok()?;
            (p["event"] == "instance.crash_loop").then_some(p)
        })
    })
    .await;
    assert_eq!(crash_loop["target"], s1.as_str());
    assert!(crash_loop["detail"]["reason"].as_str().unwrap().contains("segfault"), "{crash_loop}");

    // A custom domain's certificate: the edge reports a failure, then an issued one.
    admin.post::<_, Value>("/api/v1/projects/acme/web/domains", &json!({"name": "www.acme.test"})).await.unwrap();
    let project = op.store.get_project("acme", "web").await.unwrap();
    let verified = zeitwork_store::Audit::new("test", "domain.verify", "www.acme.test");
    op.store.verify_domain(&project.id, "www.acme.test", &verified).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "edge", "scope": {"kind": "cluster", "role": "edge-proxy"}}))
        .await
        .unwrap();
    let edge = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    edge.put::<_, Value>("/api/v1/certificates/www.acme.test", &json!({"error": "the CA refused: rate limited"}))
        .await
        .ok();
    let failing = told("certificate.fail", "www.acme.test".into()).await;
    assert_eq!(failing["detail"]["error"], "the CA refused: rate limited");
    assert_eq!(failing["project"], "web");
    let cert = rcgen::generate_simple_self_signed(vec!["www.acme.test".to_owned()]).unwrap();
    edge.put::<_, Value>(
        "/api/v1/certificates/www.acme.test",
        &json!({"cert_pem": cert.cert.pem(), "key_pem": cert.signing_key.serialize_pem()}),
    )
    .await
    .ok();
    let issued = told("certificate.issue", "www.acme.test".into()).await;
    assert!(issued["detail"]["not_after"].is_i64(), "{issued}");
    op.shutdown().await;
}
