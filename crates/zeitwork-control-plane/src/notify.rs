//! The outbox worker: delivers notifications to their channels, in order
//! per channel, at least once (each carries its outbox id as an idempotency
//! key), retrying with exponential backoff and jitter, and parks what keeps
//! failing in the dead-letter queue. Only the operator running the engine
//! delivers, so two operators never send one row twice; a crash between
//! sending and recording sends that row again (receivers drop repeats by id).
//!
//! Webhooks are signed: `X-Zeitwork-Signature: sha256=<hex HMAC-SHA256 of
//! "<X-Zeitwork-Timestamp>.<body>" under the channel's secret>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::{watch, Notify};
use zeitwork_store::{OutboxRow, StoredChannel};

use crate::AppState;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The context a channel's URL is encrypted under.
pub fn target_context(id: &str) -> String {
    format!("notify:{id}:url")
}

/// The context a channel's signing secret is encrypted under.
pub fn secret_context(id: &str) -> String {
    format!("notify:{id}:secret")
}

/// `sha256=<hex>` over `"{timestamp}.{body}"`.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `attempts + 1`: doubling from `base`, ±20 % jitter, capped.
pub fn backoff(base: Duration, attempts: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempts.min(16)).min(MAX_BACKOFF);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    exp.mul_f64(jitter).min(MAX_BACKOFF)
}

/// One line a person reads in Slack.
fn summary(p: &serde_json::Value) -> String {
    let event = p["event"].as_str().unwrap_or("event");
    let what = match event {
        "deployment.create" => "deployment created",
        "deployment.activate" => "is live",
        "deployment.fail" => "deployment failed",
        "deployment.rollback" => "rolled back",
        "deployment.auto_rollback" => "regressed and was rolled back automatically",
        "rollout.abort" => "rollout aborted",
        "deployment.promote" => "promoted",
        "deployment.sleep" => "went to sleep",
        "deployment.wake" => "woke up",
        "deployment.retire" | "deployment.delete" => "retired",
        "deployment.scale" => "scaled",
        "build.succeed" => "built",
        "instance.crash_loop" => "keeps crashing; its instances are no longer replaced",
        "instance.replace" => "lost an instance that could not be placed again",
        "certificate.issue" => "has a new certificate",
        "certificate.fail" => "could not get a certificate",
        "health_check.state" => match p["detail"]["to"].as_str() {
            Some("down") => "is DOWN",
            Some("degraded") => "is degraded",
            Some("up") => "is up again",
            _ => "uptime check changed",
        },
        "notification.test" => "test notification",
        "node.down" => "is DOWN: it missed its heartbeats; its instances are placed elsewhere",
        "node.up" => "is back",
        "node.drain" => "is draining",
        "node.drained" => "is drained: no instance runs on it",
        other => other,
    };
    if event.starts_with("node.") {
        let name = p["detail"]["hostname"].as_str().or(p["target"].as_str()).unwrap_or("");
        let region = p["detail"]["region"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
        return format!("*node {name}*{region} {what} — {}", p["actor"].as_str().unwrap_or("system"));
    }
    let project = format!("{}/{}", p["org"].as_str().unwrap_or(""), p["project"].as_str().unwrap_or(""));
    let mut line = format!("*{project}* {what}: `{}`", p["target"].as_str().unwrap_or(""));
    if let Some(url) = p["deployment"]["url"].as_str() {
        line.push_str(&format!(" <{url}>"));
    }
    if let Some(c) = p["deployment"]["commit"].as_str() {
        line.push_str(&format!(" (commit {})", &c[..c.len().min(7)]));
    }
    if let Some(r) = p["deployment"]["reason"].as_str().filter(|_| event == "deployment.fail") {
        line.push_str(&format!("\n> {r}"));
    }
    line.push_str(&format!(" — {}", p["actor"].as_str().unwrap_or("system")));
    line
}

/// Queue depths and the database pool, as gauges (refreshed every few seconds by the worker).
#[derive(Debug, Default)]
pub struct QueueGauges {
    pub outbox_pending: prometheus_client::metrics::gauge::Gauge,
    pub outbox_dead: prometheus_client::metrics::gauge::Gauge,
    pub outbox_oldest_pending_seconds: prometheus_client::metrics::gauge::Gauge,
    /// Deliveries being attempted right now (kept by the worker as it sends, not refreshed).
    pub outbox_in_flight: prometheus_client::metrics::gauge::Gauge,
    pub db_connections_in_use: prometheus_client::metrics::gauge::Gauge,
    pub db_connections_idle: prometheus_client::metrics::gauge::Gauge,
    /// The outbox figures' read is timed here (registered with the engine's).
    pub queries: crate::engine::QueryTimes,
}

impl QueueGauges {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("outbox_pending", "Notifications waiting to be delivered", self.outbox_pending.clone());
        r.register("outbox_dead", "Notifications in the dead-letter queue", self.outbox_dead.clone());
        r.register(
            "outbox_oldest_pending_seconds",
            "Age of the oldest notification waiting",
            self.outbox_oldest_pending_seconds.clone(),
        );
        r.register("outbox_in_flight", "Notifications being delivered right now", self.outbox_in_flight.clone());
        r.register("db_connections_in_use", "Store connections in use", self.db_connections_in_use.clone());
        r.register("db_connections_idle", "Store connections idle in the pool", self.db_connections_idle.clone());
    }

    async fn refresh(&self, s: &AppState) {
        let (size, idle) = s.store.pool_stats();
        self.db_connections_in_use.set(i64::from(size.saturating_sub(idle)));
        self.db_connections_idle.set(i64::from(idle));
        match self.queries.time("outbox_counts", s.store.outbox_counts()).await {
            Ok(c) => {
                self.outbox_pending.set(c.pending);
                self.outbox_dead.set(c.dead);
                self.outbox_oldest_pending_seconds.set(c.oldest_pending_secs.unwrap_or(0));
            }
            Err(e) => tracing::warn!(error = %e, "reading the outbox's figures failed"),
        }
    }
}

/// Delivers until `stop`; `nudge` starts a pass at once (a new row).
pub async fn run(s: AppState, nudge: std::sync::Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(s.config.notify_timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("zeitwork/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default();
    let mut last_refresh = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = nudge.notified() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if last_refresh.elapsed() >= Duration::from_secs(5) {
            s.gauges.refresh(&s).await;
            last_refresh = std::time::Instant::now();
        }
        if s.leader.get() != 1 {
            continue;
        }
        if let Err(e) = pass(&s, &http).await {
            tracing::warn!(error = %e, "outbox pass failed; trying again");
        }
    }
}

async fn pass(s: &AppState, http: &reqwest::Client) -> Result<(), zeitwork_store::StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let due = s.store.due_deliveries(now, 50).await?;
    // Channels are independent: one slow receiver does not hold the others up.
    let sends = due.into_iter().map(|row| async move {
        let _sending = InFlight::start(&s.gauges.outbox_in_flight);
        if let Some(dest) = row.channel_id.strip_prefix("github:") {
            let result = deliver_github(s, http, dest, &row).await;
            return (row, result);
        }
        let channel = match s.store.channel(&row.channel_id).await {
            Ok(c) => c,
            Err(e) => return (row, Err(format!("channel: {e}"))),
        };
        let result = deliver(s, http, &channel, &row).await;
        (row, result)
    });
    for (row, result) in futures::future::join_all(sends).await {
        match result {
            Ok(()) => s.store.mark_delivered(row.id).await?,
            Err(why) => {
                let dead = row.attempts + 1 >= s.config.notify_max_attempts;
                let wait = backoff(Duration::from_millis(s.config.notify_backoff_ms), row.attempts);
                let next = chrono::Utc::now().timestamp_millis() + wait.as_millis() as i64;
                if dead {
                    tracing::warn!(row = row.id, channel = %row.channel_id, %why, "notification dead-lettered");
                } else {
                    tracing::info!(row = row.id, channel = %row.channel_id, %why, retry_in = ?wait, "notification failed; retrying");
                }
                s.store.mark_attempt_failed(row.id, &why, next, dead).await?;
            }
        }
    }
    Ok(())
}

/// Why an attempt got no answer; a receiver that hangs is told apart from one that is down.
fn no_answer(s: &AppState, who: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("{who} did not answer within {} ms", s.config.notify_timeout_ms)
    } else {
        format!("{who} is unreachable: {e}")
    }
}

/// Counts one delivery in flight for as long as it lives (a cancelled pass uncounts it too).
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn start(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn deliver(s: &AppState, http: &reqwest::Client, c: &StoredChannel, row: &OutboxRow) -> Result<(), String> {
    let url = s.cipher.decrypt(&target_context(&c.id), &c.target_enc).map_err(|e| e.to_string())?;
    let req = match c.kind.as_str() {
        "email" => {
            let p = &row.payload;
            let subject =
                format!("[zeitwork] {}", summary(p).lines().next().unwrap_or_default().replace(['*', '`'], ""));
            let text = format!(
                "{}\n\nThe event as JSON:\n{}\n",
                summary(p).replace(['*', '`'], ""),
                serde_json::to_string_pretty(p).unwrap_or_default()
            );
            return crate::email::send(&url, row.id, &subject, &text, s.config.smtp_ca.as_deref()).await;
        }
        "slack" => {
            let text = summary(&row.payload);
            let mut body = serde_json::json!({
                "text": text,
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
            });
            if let Some(channel) = url.strip_prefix(crate::api::SLACK_BOT) {
                // A bot: chat.postMessage with its token; Slack answers 200 with "ok": false on errors.
                let enc = c.secret_enc.as_ref().ok_or("the Slack bot's token is missing")?;
                let token = s.cipher.decrypt(&secret_context(&c.id), enc).map_err(|e| e.to_string())?;
                body["channel"] = channel.into();
                let res = http
                    .post(format!("{}/chat.postMessage", s.config.slack_api_url))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| no_answer(s, "Slack", &e))?;
                let status = res.status();
                let answer: serde_json::Value = res.json().await.unwrap_or_default();
                return match (status.is_success(), answer["ok"].as_bool()) {
                    (true, Some(true)) => Ok(()),
                    _ => Err(format!("Slack answered {status}: {}", answer["error"].as_str().unwrap_or("no reason"))),
                };
            }
            http.post(&url).json(&body)
        }
        _ => {
            let body = row.payload.to_string();
            let ts = chrono::Utc::now().timestamp();
            let mut req = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-zeitwork-event", &row.event)
                .header("x-zeitwork-delivery", row.id.to_string())
                .header("x-zeitwork-timestamp", ts.to_string());
            if let Some(enc) = &c.secret_enc {
                let secret = s.cipher.decrypt(&secret_context(&c.id), enc).map_err(|e| e.to_string())?;
                req = req.header("x-zeitwork-signature", signature(&secret, ts, &body));
            }
            req.body(body)
        }
    };
    let res = req.send().await.map_err(|e| no_answer(s, "the receiver", &e))?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", res.status()))
    }
}

/// Tells GitHub about a deployment of a commit: a commit status (pending,
/// success with the URL, failure with the reason) and, when a pull request's
/// preview goes live, a comment with its address. `dest` is `<org>:<owner/name>`.
async fn deliver_github(s: &AppState, http: &reqwest::Client, dest: &str, row: &OutboxRow) -> Result<(), String> {
    let (org, repo) = dest.split_once(':').ok_or("malformed GitHub destination")?;
    let Some(hook) = s.store.github_hook(org, repo).await.map_err(|e| e.to_string())? else {
        return Ok(()); // The webhook was removed: nothing to tell any more.
    };
    let Some(enc) = &hook.token_enc else { return Ok(()) };
    let token = s.cipher.decrypt(&crate::api::github_token_context(org, repo), enc).map_err(|e| e.to_string())?;
    let p = &row.payload;
    let d = &p["deployment"];
    let Some(sha) = d["commit"].as_str().filter(|c| c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit())) else {
        return Ok(());
    };
    let project = p["project"].as_str().unwrap_or_default();
    let env = d["environment"].as_str().unwrap_or("production");
    let pr = d["pull_request"].as_u64();
    let url = match pr {
        Some(n) => s.config.app_url(&zeitwork_store::preview_label(project, n as u32, org)),
        None => d["url"].as_str().unwrap_or_default().to_owned(),
    };
    let (state, description) = match row.event.as_str() {
        "deployment.create" => ("pending", format!("Deploying to {env}")),
        "deployment.activate" => ("success", format!("Live at {url}")),
        _ => ("failure", d["reason"].as_str().unwrap_or("the deployment failed").to_owned()),
    };
    let api = &s.config.github_api_url;
    let send = |path: String, body: serde_json::Value| {
        http.post(format!("{api}{path}"))
            .bearer_auth(&token)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
            .json(&body)
    };
    let description: String = description.chars().take(140).collect();
    let context =
        if pr.is_some() { format!("zeitwork/{project}/preview") } else { format!("zeitwork/{project}/{env}") };
    let status = serde_json::json!({"state": state, "target_url": url, "description": description, "context": context});
    let res = send(format!("/repos/{repo}/statuses/{sha}"), status)
        .send()
        .await
        .map_err(|e| format!("GitHub is unreachable: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("GitHub answered {} to the commit status", res.status()));
    }
    if let (Some(n), "deployment.activate") = (pr, row.event.as_str()) {
        let body = format!(
            "**{project}** preview of {} is live: {url}\n\nDeployment `{}` · {}",
            &sha[..7],
            p["target"].as_str().unwrap_or_default(),
            d["url"].as_str().unwrap_or_default()
        );
        let res = send(format!("/repos/{repo}/issues/{n}/comments"), serde_json::json!({"body": body}))
            .send()
            .await
            .map_err(|e| format!("GitHub is unreachable: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("GitHub answered {} to the preview comment", res.status()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let a = signature("secret-of-sixteen", 1700000000, "{}");
        assert_eq!(a, signature("secret-of-sixteen", 1700000000, "{}"));
        assert_ne!(a, signature("secret-of-sixteen", 1700000001, "{}"));
        assert_ne!(a, signature("another-secret-16", 1700000000, "{}"));
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(1);
        let b0 = backoff(base, 0);
        assert!(b0 >= Duration::from_millis(800) && b0 <= Duration::from_millis(1200), "{b0:?}");
        let b3 = backoff(base, 3);
        assert!(b3 >= Duration::from_millis(6400) && b3 <= Duration::from_millis(9600), "{b3:?}");
        assert!(backoff(base, 40) <= MAX_BACKOFF);
    }
}
