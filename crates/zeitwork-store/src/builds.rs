//! Builds from source: uploaded source archives (content-addressed, owned
//! per organisation), and the queue of builds that node builders claim,
//! report output to, and finish. A deployment built from source waits in
//! `building` until its build succeeds (it becomes `pending` with the image
//! the build produced) or fails (the deployment fails with the reason).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use zeitwork_api_types::{BuildSource, Deployment, DeploymentStatus};

use crate::deployments::{insert_deployment, NewDeployment};
use crate::events::append_event;
use crate::{now_ms, ts, Audit, Result, RowExt, Store, StoreError};

/// Build output kept per build; what comes beyond is dropped with a note.
pub const MAX_BUILD_LOG: i64 = 1 << 20;

/// What to build: everything but the secrets, which are stored encrypted apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub source: BuildSource,
    pub dockerfile: String,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
    /// Names of the secrets (their values are in `secrets_enc`).
    pub secret_names: Vec<String>,
}

/// A build as stored.
#[derive(Debug, Clone)]
pub struct StoredBuild {
    pub id: String,
    pub org: String,
    pub project: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    pub node_id: Option<String>,
    pub spec: BuildSpec,
    pub secrets_enc: Option<String>,
    /// Characters of output kept.
    pub log_len: i64,
    pub image: Option<String>,
    pub error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

const BUILD_SELECT: &str = "SELECT id, org, project, status, node_id, spec, secrets_enc, length(log) AS log_len, \
    image, error, created_at, started_at, finished_at FROM builds";

fn build_from(r: &AnyRow) -> Result<StoredBuild> {
    Ok(StoredBuild {
        id: r.text("id")?,
        org: r.text("org")?,
        project: r.text("project")?,
        status: r.text("status")?,
        node_id: r.opt_text("node_id")?,
        spec: serde_json::from_str(&r.text("spec")?).map_err(|e| StoreError::Corrupt(format!("build spec: {e}")))?,
        secrets_enc: r.opt_text("secrets_enc")?,
        log_len: r.opt_int("log_len")?.unwrap_or(0),
        image: r.opt_text("image")?,
        error: r.opt_text("error")?,
        created_at: ts(r.int("created_at")?),
        started_at: r.opt_int("started_at")?.map(ts),
        finished_at: r.opt_int("finished_at")?.map(ts),
    })
}

impl Store {
    /// Records that `org` uploaded the source archive `digest` (its bytes are a blob);
    /// returns whether it already had.
    pub async fn put_source(&self, org: &str, digest: &str, size: i64) -> Result<bool> {
        if self.source_size(org, digest).await?.is_some() {
            return Ok(true);
        }
        let res = sqlx::query("INSERT INTO sources (org, digest, size, created_at) VALUES ($1, $2, $3, $4)")
            .bind(org)
            .bind(digest)
            .bind(size)
            .bind(now_ms())
            .execute(&self.writer)
            .await;
        match res {
            Err(e) if crate::is_unique_violation(&e) => Ok(true),
            r => r.map(|_| false).map_err(Into::into),
        }
    }

    /// The size of `org`'s source archive `digest`, if `org` uploaded it.
    pub async fn source_size(&self, org: &str, digest: &str) -> Result<Option<i64>> {
        sqlx::query("SELECT size FROM sources WHERE org = $1 AND digest = $2")
            .bind(org)
            .bind(digest)
            .fetch_optional(&self.reader)
            .await?
            .map(|r| r.int("size"))
            .transpose()
    }

    /// Creates a deployment in `building` and queues its build, in one transaction.
    pub async fn create_build(
        &self,
        d: &NewDeployment,
        spec: &BuildSpec,
        secrets_enc: Option<String>,
        audit: &Audit,
    ) -> Result<Deployment> {
        let mut tx = self.writer.begin().await?;
        insert_deployment(&mut tx, d, DeploymentStatus::Building).await?;
        sqlx::query(
            "INSERT INTO builds (id, org, project, status, spec, secrets_enc, log, created_at) \
             VALUES ($1, $2, $3, 'queued', $4, $5, '', $6)",
        )
        .bind(&d.id)
        .bind(&d.org)
        .bind(&d.project)
        .bind(serde_json::to_string(spec).unwrap_or_default())
        .bind(secrets_enc)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Anything).await?;
        self.get_deployment(&d.id).await
    }

    pub async fn get_build(&self, id: &str) -> Result<StoredBuild> {
        let row = sqlx::query(&format!("{BUILD_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {id:?} has no build")))?;
        build_from(&row)
    }

    /// Hands the oldest queued build to `node` (compare-and-set, so two
    /// builders never take one build).
    pub async fn claim_build(&self, node: &str) -> Result<Option<StoredBuild>> {
        for _ in 0..5 {
            let Some(row) =
                sqlx::query("SELECT id FROM builds WHERE status = 'queued' ORDER BY created_at, id LIMIT 1")
                    .fetch_optional(&self.writer)
                    .await?
            else {
                return Ok(None);
            };
            let id = row.text("id")?;
            let now = now_ms();
            let done = sqlx::query(
                "UPDATE builds SET status = 'running', node_id = $1, started_at = $2, heartbeat_at = $2 \
                 WHERE id = $3 AND status = 'queued'",
            )
            .bind(node)
            .bind(now)
            .bind(&id)
            .execute(&self.writer)
            .await?;
            if done.rows_affected() == 1 {
                return self.get_build(&id).await.map(Some);
            }
        }
        Ok(None)
    }

    /// Appends output of a running build by `node` (and counts as its
    /// heartbeat). False when the build is no longer this node's to run, or
    /// its deployment no longer waits for it (deleted): the builder stops.
    pub async fn append_build_log(&self, id: &str, node: &str, text: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE builds SET log = CASE WHEN length(log) + length($1) <= $2 THEN log || $1 ELSE log END, \
             heartbeat_at = $3 WHERE id = $4 AND node_id = $5 AND status = 'running' \
             AND EXISTS (SELECT 1 FROM deployments d WHERE d.id = builds.id AND d.status = 'building')",
        )
        .bind(text)
        .bind(MAX_BUILD_LOG)
        .bind(now_ms())
        .bind(id)
        .bind(node)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Output of a build from character `offset` on, and the build's status.
    pub async fn build_log(&self, id: &str, offset: i64) -> Result<(String, String)> {
        let row = sqlx::query("SELECT substr(log, CAST($1 AS INTEGER)) AS part, status FROM builds WHERE id = $2")
            .bind(offset.max(0) + 1)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {id:?} has no build")))?;
        Ok((row.opt_text("part")?.unwrap_or_default(), row.text("status")?))
    }

    /// A build succeeded with `image`: its deployment becomes `pending` with
    /// that image and is placed like any other.
    pub async fn finish_build(&self, id: &str, node: &str, image: &str, digest: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let started = sqlx::query(&format!(
            "SELECT started_at FROM builds WHERE id = $1 AND node_id = $2 AND status = 'running'{}",
            self.for_update()
        ))
        .bind(id)
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("build {id} is not running on this node")))?
        .opt_int("started_at")?
        .unwrap_or(now);
        sqlx::query("UPDATE builds SET status = 'succeeded', image = $1, finished_at = $2 WHERE id = $3")
            .bind(image)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let moved = sqlx::query(
            "UPDATE deployments SET status = 'pending', image = $1, image_digest = $2, build_ms = $3, reason = NULL, \
             updated_at = $4 WHERE id = $5 AND status = 'building'",
        )
        .bind(image)
        .bind(digest)
        .bind(now - started)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("deployment {id} no longer waits for its build")));
        }
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Anything).await?;
        Ok(())
    }

    /// A build failed (or was abandoned): it and its deployment end `failed` with `error`.
    /// `node`: only when that node runs it. False when it had already finished.
    pub async fn fail_build(&self, id: &str, node: Option<&str>, error: &str, audit: &Audit) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE builds SET status = 'failed', error = $1, finished_at = $2 \
             WHERE id = $3 AND status IN ('queued', 'running') AND ($4 = '' OR node_id = $4)",
        )
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(node.unwrap_or(""))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let started: Option<i64> = sqlx::query("SELECT started_at FROM builds WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .opt_int("started_at")?;
        sqlx::query(
            "UPDATE deployments SET status = 'failed', reason = $1, build_ms = $2, updated_at = $3 \
             WHERE id = $4 AND status = 'building'",
        )
        .bind(error)
        .bind(started.map(|s| now - s))
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "failed").await?;
        self.commit_announcing(tx, crate::Change::Anything).await?;
        Ok(true)
    }

    /// Running builds whose builder has not reported since `before_ms`.
    pub async fn stale_builds(&self, before_ms: i64) -> Result<Vec<StoredBuild>> {
        sqlx::query(&format!("{BUILD_SELECT} WHERE status = 'running' AND heartbeat_at < $1"))
            .bind(before_ms)
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(build_from)
            .collect()
    }

    /// Builds waiting for a builder.
    pub async fn queued_builds(&self) -> Result<Vec<StoredBuild>> {
        sqlx::query(&format!("{BUILD_SELECT} WHERE status = 'queued' ORDER BY created_at"))
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(build_from)
            .collect()
    }
}
