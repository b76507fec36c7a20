//! Events that leave the platform: notification channels, and the outbox
//! of deliveries to them. An outbox row is written in the same transaction
//! as the audit event of the change it tells about (see `append_event`), one
//! per channel that wants it; a worker delivers them in order per channel,
//! retries with backoff, and parks what keeps failing in the dead-letter
//! queue (`status = 'dead'`).

use sqlx::any::AnyRow;
use sqlx::AnyConnection;

use crate::{nanoid, now_ms, Audit, Result, RowExt, Store, StoreError};

/// Audit actions that are worth telling people about, and so may be notified.
pub const NOTIFIED: &[&str] = &[
    "deployment.create",
    "deployment.activate",
    "deployment.fail",
    "deployment.rollback",
    "deployment.auto_rollback",
    "rollout.abort",
    "deployment.promote",
    "deployment.sleep",
    "deployment.wake",
    "deployment.retire",
    "deployment.delete",
    "deployment.scale",
    "build.succeed",
    "instance.crash_loop",
    "instance.replace",
    "certificate.issue",
    "certificate.fail",
    "health_check.state",
    "notification.test",
    "node.down",
    "node.up",
    "node.drain",
    "node.drained",
];

/// Events of the machines themselves: they belong to no organisation and go to
/// the platform's channels (`org` = [`PLATFORM`]).
pub const NODE_EVENTS: &[&str] = &["node.down", "node.up", "node.drain", "node.drained"];

/// The `org` of the platform's own notification channels (no organisation's slug is empty).
pub const PLATFORM: &str = "";

/// Deployment changes told to GitHub as commit statuses.
pub const GITHUB_STATUS_EVENTS: &[&str] = &["deployment.create", "deployment.activate", "deployment.fail"];

/// The outbox destination of commit statuses for `org`'s webhook of `repo`: `github:<org>:<owner/name>`.
pub fn github_destination(org: &str, repo: &str) -> String {
    format!("github:{org}:{repo}")
}

/// A notification channel as stored: its target (URL) and secret stay encrypted.
#[derive(Debug, Clone)]
pub struct StoredChannel {
    pub id: String,
    pub org: String,
    pub project: Option<String>,
    /// `webhook` or `slack`.
    pub kind: String,
    pub target_enc: String,
    pub secret_enc: Option<String>,
    /// Actions this channel gets (empty: every notified one).
    pub events: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

fn channel_from(r: &AnyRow) -> Result<StoredChannel> {
    Ok(StoredChannel {
        id: r.text("id")?,
        org: r.text("org")?,
        project: r.opt_text("project")?,
        kind: r.text("kind")?,
        target_enc: r.text("target_enc")?,
        secret_enc: r.opt_text("secret_enc")?,
        events: r.text("events")?.split(' ').filter(|e| !e.is_empty()).map(str::to_owned).collect(),
        created_at: crate::ts(r.int("created_at")?),
    })
}

/// One delivery of one event to one channel.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub channel_id: String,
    pub event: String,
    pub payload: serde_json::Value,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

fn outbox_from(r: &AnyRow) -> Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.int("id")?,
        channel_id: r.text("channel_id")?,
        event: r.text("event")?,
        payload: serde_json::from_str(&r.text("payload")?)
            .map_err(|e| StoreError::Corrupt(format!("outbox payload: {e}")))?,
        status: r.text("status")?,
        attempts: r.int("attempts")? as u32,
        last_error: r.opt_text("last_error")?,
        created_at: crate::ts(r.int("created_at")?),
    })
}

/// Writes the outbox rows an audit event calls for, on the caller's transaction.
pub(crate) async fn enqueue(conn: &mut AnyConnection, audit: &Audit, result: &str) -> Result<()> {
    if result == "denied" || !NOTIFIED.contains(&audit.action.as_str()) {
        return Ok(());
    }
    let org = match &audit.org {
        Some(org) => org.as_str(),
        None if NODE_EVENTS.contains(&audit.action.as_str()) => PLATFORM,
        None => return Ok(()),
    };
    let channels: Vec<StoredChannel> =
        sqlx::query("SELECT * FROM notification_channels WHERE org = $1 AND (project IS NULL OR project = $2)")
            .bind(org)
            .bind(audit.project.clone().unwrap_or_default())
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(channel_from)
            .collect::<Result<_>>()?;
    let mut wanted: Vec<String> = channels
        .iter()
        .filter(|c| c.events.is_empty() || c.events.contains(&audit.action))
        .map(|c| c.id.clone())
        .collect();
    // What people want to see: the deployment's address, image and commit when the target is one.
    let deployment = sqlx::query(
        "SELECT d.url, d.image, d.commit_sha, d.commit_message, d.environment, d.reason, d.pull_request, \
         p.github_repo FROM deployments d LEFT JOIN projects p ON p.id = d.project_id WHERE d.id = $1",
    )
    .bind(&audit.target)
    .fetch_optional(&mut *conn)
    .await?;
    // Commit statuses (and preview comments) go to GitHub for commits of a repository whose
    // webhook of this organisation has a token.
    if let Some(d) = &deployment {
        if let (Some(_), Some(repo), true) = (
            d.opt_text("commit_sha")?,
            d.opt_text("github_repo")?,
            GITHUB_STATUS_EVENTS.contains(&audit.action.as_str()),
        ) {
            let hooked = sqlx::query(
                "SELECT repo FROM github_hooks WHERE org = $1 AND lower(repo) = lower($2) AND token_enc IS NOT NULL",
            )
            .bind(org)
            .bind(&repo)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(h) = hooked {
                wanted.push(github_destination(org, &h.text("repo")?));
            }
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut payload = serde_json::json!({
        "event": audit.action,
        "result": result,
        "org": org,
        "project": audit.project,
        "target": audit.target,
        "actor": audit.actor,
        "detail": audit.detail,
        "at": chrono::DateTime::from_timestamp_millis(now).map(|t| t.to_rfc3339()),
    });
    if let Some(d) = deployment {
        payload["deployment"] = serde_json::json!({
            "id": audit.target,
            "url": d.text("url")?,
            "image": d.text("image")?,
            "commit": d.opt_text("commit_sha")?,
            "message": d.opt_text("commit_message")?,
            "environment": d.text("environment")?,
            "reason": d.opt_text("reason")?,
            "pull_request": d.opt_int("pull_request")?,
        });
    }
    let body = payload.to_string();
    for c in &wanted {
        sqlx::query(
            "INSERT INTO outbox (channel_id, event, payload, status, attempts, next_at, created_at) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $4)",
        )
        .bind(c)
        .bind(&audit.action)
        .bind(&body)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Counts of the outbox, for the stats endpoints and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    /// Failed attempts of rows still pending.
    pub failed_attempts: i64,
    /// Age of the oldest pending row, seconds.
    pub oldest_pending_secs: Option<i64>,
    /// Per channel: (channel id, pending, dead).
    pub by_channel: Vec<(String, i64, i64)>,
}

impl Store {
    pub async fn create_channel(&self, c: &StoredChannel, audit: &Audit) -> Result<StoredChannel> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO notification_channels (id, org, project, kind, target_enc, secret_enc, events, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.id)
        .bind(&c.org)
        .bind(c.project.clone())
        .bind(&c.kind)
        .bind(&c.target_enc)
        .bind(c.secret_enc.clone())
        .bind(c.events.join(" "))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        crate::events::append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.channel(&c.id).await
    }

    pub async fn channel(&self, id: &str) -> Result<StoredChannel> {
        let row = sqlx::query("SELECT * FROM notification_channels WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("notification channel {id:?} does not exist")))?;
        channel_from(&row)
    }

    /// A project's channels.
    /// A project's channels; `None`: the org's default channels (they get every project's events).
    pub async fn list_channels(&self, org: &str, project: Option<&str>) -> Result<Vec<StoredChannel>> {
        let rows =
            match project {
                Some(p) => {
                    sqlx::query(
                        "SELECT * FROM notification_channels WHERE org = $1 AND project = $2 ORDER BY created_at, id",
                    )
                    .bind(org)
                    .bind(p)
                    .fetch_all(&self.reader)
                    .await?
                }
                None => sqlx::query(
                    "SELECT * FROM notification_channels WHERE org = $1 AND project IS NULL ORDER BY created_at, id",
                )
                .bind(org)
                .fetch_all(&self.reader)
                .await?,
            };
        rows.iter().map(channel_from).collect()
    }

    /// Removes a channel and what is still queued for it.
    pub async fn delete_channel(&self, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM outbox WHERE channel_id = $1 AND status <> 'delivered'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM notification_channels WHERE id = $1").bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("notification channel {id:?} does not exist")));
        }
        crate::events::append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Rows due now, the oldest pending one of each channel only (per-channel order).
    pub async fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT o.* FROM outbox o WHERE o.status = 'pending' AND o.next_at <= $1 \
             AND o.id = (SELECT MIN(h.id) FROM outbox h WHERE h.channel_id = o.channel_id AND h.status = 'pending') \
             ORDER BY o.id LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(outbox_from).collect()
    }

    pub async fn mark_delivered(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = $1, attempts = attempts + 1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// A failed attempt: tried again at `next_at`, or dead-lettered when `dead`.
    pub async fn mark_attempt_failed(&self, id: i64, error: &str, next_at: i64, dead: bool) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_at = $2, status = $3 WHERE id = $4",
        )
        .bind(error.chars().take(500).collect::<String>())
        .bind(next_at)
        .bind(if dead { "dead" } else { "pending" })
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deletes delivered rows created before `before_ms`, at most `batch`; how many went.
    pub async fn prune_delivered(&self, before_ms: i64, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM outbox WHERE id IN \
             (SELECT id FROM outbox WHERE status = 'delivered' AND created_at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(before_ms)
        .bind(i64::from(batch))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn outbox_counts(&self) -> Result<OutboxCounts> {
        let mut c = OutboxCounts::default();
        for r in sqlx::query(
            "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(attempts), 0) AS BIGINT) AS tries, MIN(created_at) AS oldest \
             FROM outbox GROUP BY status",
        )
        .fetch_all(&self.reader)
        .await?
        {
            let n = r.int("n")?;
            match r.text("status")?.as_str() {
                "pending" => {
                    c.pending = n;
                    c.failed_attempts = r.int("tries")?;
                    c.oldest_pending_secs = r.opt_int("oldest")?.map(|t| (now_ms() - t).max(0) / 1000);
                }
                "delivered" => c.delivered = n,
                "dead" => c.dead = n,
                _ => {}
            }
        }
        for r in sqlx::query(
            "SELECT channel_id, SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) AS p, \
             SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END) AS d FROM outbox GROUP BY channel_id ORDER BY channel_id",
        )
        .fetch_all(&self.reader)
        .await?
        {
            c.by_channel.push((r.text("channel_id")?, r.int("p")?, r.int("d")?));
        }
        Ok(c)
    }

    /// The dead-letter queue, oldest first.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT * FROM outbox WHERE status = 'dead' ORDER BY id LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(outbox_from).collect()
    }

    /// Puts dead letters (one, or all with `None`) back in the queue; returns how many.
    pub async fn retry_dead(&self, id: Option<i64>) -> Result<u64> {
        let now = now_ms();
        let done = match id {
            Some(id) => sqlx::query(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_at = $1 WHERE id = $2 AND status = 'dead'",
            )
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?,
            None => {
                sqlx::query("UPDATE outbox SET status = 'pending', attempts = 0, next_at = $1 WHERE status = 'dead'")
                    .bind(now)
                    .execute(&self.writer)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// Drops a dead letter for good.
    pub async fn drop_dead(&self, id: i64) -> Result<bool> {
        let done =
            sqlx::query("DELETE FROM outbox WHERE id = $1 AND status = 'dead'").bind(id).execute(&self.writer).await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A fresh channel id.
pub fn channel_id() -> String {
    format!("nch_{}", nanoid(12))
}
