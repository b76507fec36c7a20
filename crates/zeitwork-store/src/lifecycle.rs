//! Deployments after they served: sleeping (no instances, no capacity held,
//! URL kept), waking on request or for a rollback, retiring for good, and
//! the request activity edges report that decides when to sleep.

use zeitwork_api_types::{Deployment, Environment};

use crate::deployments::LIVE_INSTANCE;
use crate::events::append_event;
use crate::{now_ms, Audit, Result, RowExt, Store, StoreError};

/// What the engine needs to know of a deployment beyond its public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Wakefulness {
    /// When it was last woken from sleep (ms), while it has not slept since.
    pub woken_at: Option<i64>,
    /// The environment to point at it once awake (a rollback to a sleeping deployment).
    pub wake_for: Option<Environment>,
    /// When an edge last served a request for it (ms).
    pub last_request_at: Option<i64>,
    /// The autoscaler's instance count per region, when it set one.
    pub scale_target: Option<u32>,
}

/// The wakefulness columns of a `deployments` row.
pub(crate) fn wakefulness_from(row: &sqlx::any::AnyRow) -> Result<Wakefulness> {
    Ok(Wakefulness {
        woken_at: row.opt_int("woken_at")?,
        wake_for: row.opt_text("wake_for")?.and_then(|e| Environment::parse(&e)),
        last_request_at: row.opt_int("last_request_at")?,
        scale_target: row.opt_int("scale_target")?.map(|n| n as u32),
    })
}

/// Marks a deployment's live instances stopped (their agents stop them), saying why.
async fn stop_live_instances(conn: &mut sqlx::AnyConnection, deployment: &str, reason: &str) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE instances SET status = 'stopped', exit_reason = $1 WHERE deployment_id = $2 AND {LIVE_INSTANCE}"
    ))
    .bind(reason)
    .bind(deployment)
    .execute(conn)
    .await?;
    Ok(())
}

impl Store {
    /// The sleeping (or waking) deployments that had an instance on `node`:
    /// the ones whose saved microVM state that node keeps to wake them.
    pub async fn sleeping_on_node(&self, node: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT d.id FROM deployments d JOIN instances i ON i.deployment_id = d.id \
             WHERE i.node_id = $1 AND d.status IN ('sleeping', 'waking') ORDER BY d.id",
        )
        .bind(node)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| r.text("id")).collect()
    }

    pub async fn wakefulness(&self, id: &str) -> Result<Wakefulness> {
        let row =
            sqlx::query("SELECT woken_at, wake_for, last_request_at, scale_target FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("deployment {id:?} does not exist")))?;
        wakefulness_from(&row)
    }

    /// Records the autoscaler's instance count per region for a deployment.
    pub async fn set_scale_target(&self, id: &str, per_region: u32, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE deployments SET scale_target = $1 WHERE id = $2")
            .bind(i64::from(per_region))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![id.to_owned()])).await?;
        Ok(())
    }

    /// A request arrived for an active deployment scaled to zero: it is wanted again.
    pub async fn note_demand(&self, id: &str) -> Result<bool> {
        let demand =
            sqlx::query("UPDATE deployments SET woken_at = $1 WHERE id = $2 AND status = 'active' RETURNING id")
                .bind(now_ms())
                .bind(id);
        Ok(self.update_announcing(demand, "id").await? > 0)
    }

    /// Instances taken out of traffic (`stopping`) whose grace has passed stop; returns how many.
    pub async fn finish_stopping(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE instances SET status = 'stopped', exit_reason = COALESCE(exit_reason, 'scaled down') \
             WHERE status = 'stopping' AND stop_after IS NOT NULL AND stop_after <= $1 \
             AND node_id NOT IN (SELECT id FROM nodes WHERE status IN ('draining', 'drained')) \
             RETURNING deployment_id",
        )
        .bind(now_ms);
        // Their deployments changed, nothing else: no full pass for it.
        Ok(self.update_announcing(done, "deployment_id").await? as u64)
    }

    /// Puts a deployment that no environment points at to sleep: its
    /// instances stop and release their capacity; its URL keeps working.
    /// Returns whether it went to sleep now (false: it is serving, or not awake).
    pub async fn sleep_deployment(&self, id: &str, reason: &str, audit: &Audit) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "UPDATE deployments SET status = 'sleeping', reason = $1, woken_at = NULL, wake_for = NULL, updated_at = $2 \
             WHERE id = $3 AND status IN ('standby', 'waking')",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        stop_live_instances(&mut tx, id, "the deployment went to sleep").await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![id.to_owned()])).await?;
        Ok(true)
    }

    /// Wakes a sleeping deployment (it goes `waking`; the engine places an
    /// instance). With `for_env`, the environment is pointed at it once it is
    /// ready (a rollback). Returns whether this call woke it: of two requests
    /// racing, exactly one does.
    pub async fn wake_deployment(&self, id: &str, for_env: Option<Environment>, audit: &Audit) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let woke = sqlx::query(
            "UPDATE deployments SET status = 'waking', reason = NULL, woken_at = $1, wake_for = $2, updated_at = $1 \
             WHERE id = $3 AND status = 'sleeping'",
        )
        .bind(now)
        .bind(for_env.map(|e| e.as_str().to_owned()))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !woke {
            if let Some(env) = for_env {
                // Already waking: a rollback still switches once it is awake.
                sqlx::query("UPDATE deployments SET wake_for = $1 WHERE id = $2 AND status = 'waking'")
                    .bind(env.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if woke {
            append_event(&mut tx, audit, "ok").await?;
        }
        self.commit_announcing(tx, crate::Change::Deployments(vec![id.to_owned()])).await?;
        Ok(woke)
    }

    /// A waking deployment that cannot come up goes back to sleep with `reason` (its URL keeps working).
    pub async fn back_to_sleep(&self, id: &str, reason: &str) -> Result<bool> {
        self.sleep_deployment(id, reason, &Audit::new("system", "deployment.sleep", id)).await
    }

    /// A woken deployment is up: it stays running (standby) until idle for its project's `sleep_after_secs`.
    pub async fn finish_waking(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE deployments SET status = 'standby', wake_for = NULL, updated_at = $1 WHERE id = $2 AND status = 'waking' \
             RETURNING id",
        )
        .bind(now_ms())
        .bind(id);
        Ok(self.update_announcing(done, "id").await? > 0)
    }

    /// Retires a deployment for good (its URL then answers 410): refused
    /// while it serves an environment. Its live instances stop.
    pub async fn retire_deployment(&self, id: &str, reason: &str, audit: &Audit) -> Result<Deployment> {
        let mut tx = self.writer.begin().await?;
        let row =
            sqlx::query(&format!("SELECT status, project_id FROM deployments WHERE id = $1{}", self.for_update()))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("deployment {id:?} does not exist")))?;
        let status = row.text("status")?;
        if status != "retired" {
            let current: String = sqlx::query("SELECT current_deployments FROM projects WHERE id = $1")
                .bind(row.text("project_id")?)
                .fetch_one(&mut *tx)
                .await?
                .text("current_deployments")?;
            let serving: std::collections::BTreeMap<String, String> =
                serde_json::from_str(&current).unwrap_or_default();
            if let Some((env, _)) = serving.iter().find(|(_, d)| *d == id) {
                return Err(StoreError::Conflict(format!(
                    "deployment {id:?} serves {env}; deploy or roll back to another deployment first"
                )));
            }
            sqlx::query("UPDATE deployments SET status = 'retired', reason = $1, updated_at = $2 WHERE id = $3")
                .bind(reason)
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            stop_live_instances(&mut tx, id, "the deployment was retired").await?;
            append_event(&mut tx, audit, "ok").await?;
        }
        self.commit_announcing(tx, crate::Change::Deployments(vec![id.to_owned()])).await?;
        self.get_deployment(id).await
    }

    /// Reserves a pull request preview's address for a project; true when it
    /// holds it (now or before), false when another project has it.
    pub async fn claim_preview_host(&self, label: &str, project_id: &str) -> Result<bool> {
        let held = sqlx::query("SELECT project_id FROM hosts WHERE label = $1")
            .bind(label)
            .fetch_optional(&self.reader)
            .await?;
        if let Some(h) = held {
            return Ok(h.text("project_id")? == project_id);
        }
        let mut conn = self.writer.acquire().await?;
        match crate::projects::claim_host(&mut conn, label, project_id, "preview").await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A pull request was closed: its preview address stops routing and its
    /// deployments retire (their URLs answer 410). Returns their ids.
    pub async fn close_preview(
        &self,
        project_id: &str,
        pull_request: u32,
        reason: &str,
        audit: &Audit,
    ) -> Result<Vec<String>> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT current_deployments FROM projects WHERE id = $1{}", self.for_update()))
            .bind(project_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("project {project_id:?} does not exist")))?;
        let mut current: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&row.text("current_deployments")?).unwrap_or_default();
        current.remove(&crate::deployments::preview_slot(pull_request));
        let now = now_ms();
        sqlx::query("UPDATE projects SET current_deployments = $1, updated_at = $2 WHERE id = $3")
            .bind(serde_json::to_string(&current).unwrap_or_default())
            .bind(now)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM deployments WHERE project_id = $1 AND environment = 'preview' AND pull_request = $2 \
             AND status NOT IN ('retired', 'failed')",
        )
        .bind(project_id)
        .bind(i64::from(pull_request))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.text("id"))
        .collect::<Result<_>>()?;
        for id in &ids {
            sqlx::query("UPDATE deployments SET status = 'retired', reason = $1, updated_at = $2 WHERE id = $3")
                .bind(reason)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            stop_live_instances(&mut tx, id, reason).await?;
            let a = Audit { target: id.clone(), ..audit.clone() };
            append_event(&mut tx, &a, "ok").await?;
        }
        let mut changed = vec![crate::Change::Projects(vec![project_id.to_owned()])];
        if !ids.is_empty() {
            // Their nodes drop the stopped instances.
            changed.push(crate::Change::Deployments(ids.clone()));
        }
        self.commit_announcing_all(tx, changed).await?;
        Ok(ids)
    }

    /// Sleeping deployments with at least their project's `retain_deployments` newer deployments.
    pub async fn sleeping_beyond_retention(&self) -> Result<Vec<Deployment>> {
        let rows = sqlx::query(
            "SELECT d.* FROM deployments d JOIN projects p ON p.id = d.project_id WHERE d.status = 'sleeping' \
             AND (SELECT COUNT(*) FROM deployments n WHERE n.project_id = d.project_id AND n.created_at > d.created_at) \
             >= p.retain_deployments ORDER BY d.created_at LIMIT 100",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(crate::deployments::deployment_from).collect()
    }

    /// Records requests edges served: the newest time per deployment wins; times in the future count as now.
    pub async fn record_requests(&self, seen: &[(String, i64)]) -> Result<()> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        for (id, at) in seen {
            sqlx::query(
                "UPDATE deployments SET last_request_at = $1 WHERE id = $2 \
                 AND (last_request_at IS NULL OR last_request_at < $1)",
            )
            .bind((*at).min(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Says what a `pending` deployment waits for, without touching its timestamps.
    pub async fn set_pending_reason(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE deployments SET reason = $1 WHERE id = $2 AND status = 'pending'")
            .bind(reason)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// One deployment as analytics read it.
#[derive(Debug, Clone)]
pub struct DeploymentFacts {
    pub id: String,
    pub org: String,
    pub project: String,
    pub status: String,
    pub created_at: i64,
    /// When it first went live (its first activation event).
    pub activated_at: Option<i64>,
    /// When its first instance became ready.
    pub first_ready_at: Option<i64>,
    /// How long its image took to build from source, when it was.
    pub build_ms: Option<i64>,
    /// When its first instance was placed on a node.
    pub placed_at: Option<i64>,
    /// When its first instance's process started (its image pulled and unpacked).
    pub first_started_at: Option<i64>,
}

/// Live instances' reservations per org: (org, instances, vCPU, MiB).
pub type OrgAllocation = (String, i64, i64, i64);

impl Store {
    /// Deployments created in `[from, to)` (ms), of `org` and `project` when given.
    pub async fn deployment_facts(
        &self,
        from: i64,
        to: i64,
        org: Option<&str>,
        project: Option<&str>,
    ) -> Result<Vec<DeploymentFacts>> {
        let rows = sqlx::query(
            "SELECT d.id, d.org, d.project, d.status, d.created_at, \
             (SELECT MIN(e.at) FROM events e WHERE e.target = d.id AND e.action = 'deployment.activate') AS activated_at, \
             (SELECT MIN(i.ready_at) FROM instances i WHERE i.deployment_id = d.id) AS first_ready_at, \
             (SELECT MIN(i.created_at) FROM instances i WHERE i.deployment_id = d.id) AS placed_at, \
             (SELECT MIN(i.started_at) FROM instances i WHERE i.deployment_id = d.id) AS first_started_at, \
             d.build_ms \
             FROM deployments d WHERE d.created_at >= $1 AND d.created_at < $2 \
             AND ($3 = '' OR d.org = $3) AND ($4 = '' OR d.project = $4) ORDER BY d.created_at",
        )
        .bind(from)
        .bind(to)
        .bind(org.unwrap_or_default())
        .bind(project.unwrap_or_default())
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeploymentFacts {
                    id: r.text("id")?,
                    org: r.text("org")?,
                    project: r.text("project")?,
                    status: r.text("status")?,
                    created_at: r.int("created_at")?,
                    activated_at: r.opt_int("activated_at")?,
                    first_ready_at: r.opt_int("first_ready_at")?,
                    build_ms: r.opt_int("build_ms")?,
                    placed_at: r.opt_int("placed_at")?,
                    first_started_at: r.opt_int("first_started_at")?,
                })
            })
            .collect()
    }

    /// What live instances hold now, per org (of `org` when given).
    pub async fn allocation_by_org(&self, org: Option<&str>) -> Result<Vec<OrgAllocation>> {
        let rows = sqlx::query(&format!(
            "SELECT d.org, COUNT(*) AS n, CAST(COALESCE(SUM(i.vcpu), 0) AS BIGINT) AS vcpu, \
             CAST(COALESCE(SUM(i.memory), 0) AS BIGINT) AS memory FROM instances i \
             JOIN deployments d ON d.id = i.deployment_id WHERE i.{LIVE_INSTANCE} AND ($1 = '' OR d.org = $1) \
             GROUP BY d.org ORDER BY d.org"
        ))
        .bind(org.unwrap_or_default())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| Ok((r.text("org")?, r.int("n")?, r.int("vcpu")?, r.int("memory")?))).collect()
    }
}
