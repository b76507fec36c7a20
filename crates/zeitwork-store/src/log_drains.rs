//! An organisation's log drains: where its app logs, build output and audit
//! events also go. The destination and its token stay encrypted (the control
//! plane encrypts and decrypts); the store keeps which sources each drain takes.

use sqlx::any::AnyRow;

use crate::{nanoid, now_ms, Audit, Result, RowExt, Store, StoreError};

/// What a drain may take: the org's app logs, build output and audit events.
pub const LOG_DRAIN_SOURCES: &[&str] = &["app", "build", "audit"];

/// Most drains one organisation may have.
pub const MAX_LOG_DRAINS: usize = 10;

/// A log drain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLogDrain {
    pub id: String,
    /// The organisation's slug.
    pub org: String,
    /// `syslog-udp`, `syslog-tcp`, `syslog-tls`, `http-json`, `loki` or `elasticsearch`.
    pub kind: String,
    pub target_enc: String,
    pub token_enc: Option<String>,
    /// PEM of the CA(s) the receiver's certificate is checked against, besides the public roots.
    pub ca: Option<String>,
    /// Of [`LOG_DRAIN_SOURCES`].
    pub sources: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl StoredLogDrain {
    pub fn takes(&self, source: &str) -> bool {
        self.sources.iter().any(|s| s == source)
    }
}

pub fn log_drain_id() -> String {
    format!("ldr_{}", nanoid(12))
}

fn drain_from(r: &AnyRow) -> Result<StoredLogDrain> {
    Ok(StoredLogDrain {
        id: r.text("id")?,
        org: r.text("org")?,
        kind: r.text("kind")?,
        target_enc: r.text("target_enc")?,
        token_enc: r.opt_text("token_enc")?,
        ca: r.opt_text("ca")?,
        sources: r.text("sources")?.split(' ').filter(|e| !e.is_empty()).map(str::to_owned).collect(),
        created_at: crate::ts(r.int("created_at")?),
    })
}

impl Store {
    /// Adds a drain with its audit event; refused beyond [`MAX_LOG_DRAINS`] per organisation.
    pub async fn create_log_drain(&self, d: &StoredLogDrain, audit: &Audit) -> Result<StoredLogDrain> {
        let mut tx = self.writer.begin().await?;
        let held: i64 = sqlx::query("SELECT COUNT(*) AS n FROM log_drains WHERE org = $1")
            .bind(&d.org)
            .fetch_one(&mut *tx)
            .await?
            .int("n")?;
        if held >= MAX_LOG_DRAINS as i64 {
            return Err(StoreError::Conflict(format!(
                "{} already has {MAX_LOG_DRAINS} log drains; delete one first",
                d.org
            )));
        }
        sqlx::query(
            "INSERT INTO log_drains (id, org, kind, target_enc, token_enc, ca, sources, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&d.id)
        .bind(&d.org)
        .bind(&d.kind)
        .bind(&d.target_enc)
        .bind(d.token_enc.clone())
        .bind(d.ca.clone())
        .bind(d.sources.join(" "))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        crate::events::append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Anything).await?;
        self.log_drain(&d.id).await
    }

    pub async fn log_drain(&self, id: &str) -> Result<StoredLogDrain> {
        let row = sqlx::query("SELECT * FROM log_drains WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("log drain {id:?} does not exist")))?;
        drain_from(&row)
    }

    /// The drains of `org`, or of every organisation (`None`), oldest first.
    pub async fn list_log_drains(&self, org: Option<&str>) -> Result<Vec<StoredLogDrain>> {
        let rows = match org {
            Some(org) => {
                sqlx::query("SELECT * FROM log_drains WHERE org = $1 ORDER BY created_at, id")
                    .bind(org)
                    .fetch_all(&self.reader)
                    .await?
            }
            None => sqlx::query("SELECT * FROM log_drains ORDER BY created_at, id").fetch_all(&self.reader).await?,
        };
        rows.iter().map(drain_from).collect()
    }

    /// Removes a drain of `org` with its audit event.
    pub async fn delete_log_drain(&self, org: &str, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM log_drains WHERE id = $1 AND org = $2")
            .bind(id)
            .bind(org)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("log drain {id:?} is not one of {org}'s")));
        }
        crate::events::append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Anything).await?;
        Ok(())
    }
}
