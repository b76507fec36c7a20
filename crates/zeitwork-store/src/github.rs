//! GitHub intake: per-organisation webhooks, the deliveries they received,
//! and the projects a repository deploys.

use sqlx::any::AnyRow;
use zeitwork_api_types::Project;

use crate::events::append_event;
use crate::projects::{project_from, PROJECT_SELECT};
use crate::{now_ms, ts, Arg, Audit, Result, RowExt, Sql, Store, StoreError};

/// A webhook as stored: the secret stays encrypted. A webhook belongs to
/// one organisation and deploys only that organisation's projects; two
/// organisations may each register the same repository, and a delivery's
/// signature decides whose registration it is.
#[derive(Debug, Clone)]
pub struct StoredHook {
    pub org: String,
    pub repo: String,
    pub events: Vec<String>,
    pub secret_enc: String,
    /// A repository token (clones, commit statuses), encrypted.
    pub token_enc: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

fn hook_from(r: &AnyRow) -> Result<StoredHook> {
    Ok(StoredHook {
        org: r.text("org")?,
        repo: r.text("repo")?,
        events: r.text("events")?.split(' ').filter(|e| !e.is_empty()).map(str::to_owned).collect(),
        secret_enc: r.text("secret_enc")?,
        token_enc: r.opt_text("token_enc")?,
        created_at: ts(r.int("created_at")?),
    })
}

impl Store {
    /// Creates or replaces `org`'s webhook of `repo` (`owner/name`); other organisations' are untouched.
    pub async fn put_github_hook(
        &self,
        org: &str,
        repo: &str,
        events: &[String],
        secret_enc: &str,
        token_enc: Option<&str>,
        audit: &Audit,
    ) -> Result<StoredHook> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM github_hooks WHERE org = $1 AND repo = $2")
            .bind(org)
            .bind(repo)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO github_hooks (org, repo, events, secret_enc, created_by, created_at, token_enc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(org)
        .bind(repo)
        .bind(events.join(" "))
        .bind(secret_enc)
        .bind(audit.actor.clone())
        .bind(now_ms())
        .bind(token_enc.map(str::to_owned))
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.github_hook(org, repo).await?.ok_or_else(|| StoreError::NotFound(format!("webhook of {repo}")))
    }

    /// `org`'s webhook of `repo`.
    pub async fn github_hook(&self, org: &str, repo: &str) -> Result<Option<StoredHook>> {
        let row = sqlx::query("SELECT * FROM github_hooks WHERE org = $1 AND repo = $2")
            .bind(org)
            .bind(repo)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(hook_from).transpose()
    }

    /// Every organisation's webhook of `repo`, oldest first.
    pub async fn github_hooks_of_repo(&self, repo: &str) -> Result<Vec<StoredHook>> {
        let rows = sqlx::query("SELECT * FROM github_hooks WHERE repo = $1 ORDER BY created_at, org")
            .bind(repo)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(hook_from).collect()
    }

    /// Projects that deploy from GitHub repository `repo` (`owner/name`), of `org` only when given.
    pub async fn projects_of_repo(&self, repo: &str, org: Option<&str>) -> Result<Vec<Project>> {
        let mut q = Sql::new(PROJECT_SELECT);
        q.and("p.github_repo = ?", Arg::Text(repo.to_owned()));
        if let Some(org) = org {
            q.and("o.slug = ?", Arg::Text(org.to_owned()));
        }
        q.query().fetch_all(&self.reader).await?.iter().map(project_from).collect()
    }

    /// Whether `org` recorded a delivery id (GitHub redelivers with the same
    /// id). `org` is empty for deliveries no registration's secret signed.
    pub async fn github_delivery(&self, org: &str, id: &str) -> Result<Option<zeitwork_api_types::GithubDelivery>> {
        let row = sqlx::query("SELECT * FROM github_deliveries WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(delivery_from).transpose()
    }

    pub async fn record_github_delivery(&self, org: &str, d: &zeitwork_api_types::GithubDelivery) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM github_deliveries WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO github_deliveries (org, id, repo, event, status, outcome, git_ref, sha, deployments, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(org)
        .bind(&d.id)
        .bind(&d.repo)
        .bind(&d.event)
        .bind(&d.status)
        .bind(&d.outcome)
        .bind(d.git_ref.clone())
        .bind(d.sha.clone())
        .bind(d.deployments.join(" "))
        .bind(d.received_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deliveries of `repo` recorded for `org`, and those no registration's
    /// secret signed (forgeries, or a secret set wrong on GitHub), newest first.
    pub async fn list_github_deliveries(
        &self,
        org: &str,
        repo: &str,
        limit: u32,
    ) -> Result<Vec<zeitwork_api_types::GithubDelivery>> {
        let rows = sqlx::query(
            "SELECT * FROM github_deliveries WHERE (org = $1 OR org = '') AND repo = $2 \
             ORDER BY received_at DESC, id DESC LIMIT $3",
        )
        .bind(org)
        .bind(repo)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_from).collect()
    }

    /// The commit last pushed to `branch` of `repo`, from `org`'s verified deliveries.
    pub async fn last_pushed_sha(&self, org: &str, repo: &str, branch: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT sha FROM github_deliveries WHERE org = $1 AND repo = $2 AND event = 'push' AND git_ref = $3 \
             AND sha IS NOT NULL AND status <> 'rejected' ORDER BY received_at DESC LIMIT 1",
        )
        .bind(org)
        .bind(repo)
        .bind(format!("refs/heads/{branch}"))
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| r.text("sha")).transpose()
    }
}

fn delivery_from(r: &AnyRow) -> Result<zeitwork_api_types::GithubDelivery> {
    Ok(zeitwork_api_types::GithubDelivery {
        id: r.text("id")?,
        repo: r.text("repo")?,
        event: r.text("event")?,
        status: r.text("status")?,
        outcome: r.text("outcome")?,
        git_ref: r.opt_text("git_ref")?,
        sha: r.opt_text("sha")?,
        deployments: r.text("deployments")?.split(' ').filter(|d| !d.is_empty()).map(str::to_owned).collect(),
        received_at: ts(r.int("received_at")?),
    })
}
