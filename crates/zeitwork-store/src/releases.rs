//! Releases after a deployment is ready: the traffic figures edges report
//! per deployment (one row per deployment, edge and period, so a report
//! sent twice replaces itself and two edges add up), and the rollout of each
//! deployment (canary steps, the watch after the switch, the rollback).

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use zeitwork_api_types::{
    Analysis, Deployment, DeploymentStatus, DeploymentTraffic, Environment, RolloutState, RolloutStatus,
};

use crate::events::append_event;
use crate::{now_ms, ts, Audit, Result, RowExt, Store, StoreError};

/// A rollout to record when a deployment is ready.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub deployment: String,
    pub environment: Environment,
    pub baseline: Option<String>,
    pub state: RolloutState,
    pub steps: Vec<u32>,
    pub step_secs: u32,
    /// For `watching`: the end of the watch (unix ms).
    pub watch_until: Option<i64>,
}

fn rollout_from(r: &AnyRow) -> Result<RolloutStatus> {
    let steps: Vec<u32> = serde_json::from_str(&r.text("steps")?)
        .map_err(|e| StoreError::Corrupt(format!("column rollouts.steps: {e}")))?;
    let state = r.parsed("state", RolloutState::parse)?;
    let step = r.int("step")? as u32;
    let weight = match state {
        RolloutState::Canary => steps.get(step as usize).copied().unwrap_or(0),
        RolloutState::Watching | RolloutState::Done => 100,
        RolloutState::RolledBack | RolloutState::Shadow => 0,
    };
    let analysis: Option<Analysis> = r.opt_text("analysis")?.and_then(|a| serde_json::from_str(&a).ok());
    Ok(RolloutStatus {
        deployment: r.text("deployment_id")?,
        environment: r.parsed("environment", Environment::parse)?,
        baseline: r.opt_text("baseline")?,
        state,
        steps,
        step_secs: r.int("step_secs")? as u32,
        step,
        weight,
        started_at: ts(r.int("started_at")?),
        step_started_at: ts(r.int("step_started_at")?),
        activated_at: r.opt_int("activated_at")?.map(ts),
        watch_until: r.opt_int("watch_until")?.map(ts),
        reason: r.opt_text("reason")?,
        analysis,
        served: None,
    })
}

/// A canary as the routing table needs it: the environment of a project whose
/// clients go, `weight` percent of them, to `deployment`.
#[derive(Debug, Clone)]
pub struct CanaryRow {
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub deployment: String,
    pub weight: u32,
}

/// Shadow traffic as the routing table needs it: the environment of a
/// project that copies a share of its requests to `deployment`.
#[derive(Debug, Clone)]
pub struct ShadowRow {
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub deployment: String,
    pub shadow: zeitwork_api_types::Shadow,
}

impl Store {
    // ============================================================== traffic

    /// Records one edge's figures for one period; the same (edge, period)
    /// reported again replaces the first report instead of adding to it.
    pub async fn record_traffic(
        &self,
        edge: &str,
        period: i64,
        deployments: &BTreeMap<String, DeploymentTraffic>,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        for (id, t) in deployments {
            sqlx::query(
                "INSERT INTO traffic_samples (deployment_id, edge, period, at, requests, errors, latency) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (deployment_id, edge, period) DO UPDATE SET \
                 requests = excluded.requests, errors = excluded.errors, latency = excluded.latency",
            )
            .bind(id)
            .bind(edge)
            .bind(period)
            .bind(now)
            .bind(t.requests as i64)
            .bind(t.errors as i64)
            .bind(serde_json::to_string(&t.latency).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every edge's figures for `deployment` received in `[from, to)` (unix ms), added up.
    pub async fn traffic_between(&self, deployment: &str, from: i64, to: i64) -> Result<DeploymentTraffic> {
        let rows = sqlx::query(
            "SELECT requests, errors, latency FROM traffic_samples WHERE deployment_id = $1 AND at >= $2 AND at < $3",
        )
        .bind(deployment)
        .bind(from)
        .bind(to)
        .fetch_all(&self.reader)
        .await?;
        let mut out = DeploymentTraffic::default();
        for r in rows {
            let latency: Vec<u64> = serde_json::from_str(&r.text("latency")?).unwrap_or_default();
            out.merge(&DeploymentTraffic {
                requests: r.int("requests")?.max(0) as u64,
                errors: r.int("errors")?.max(0) as u64,
                latency,
            });
        }
        Ok(out)
    }

    /// Forgets figures received before `before` (unix ms), at most `batch` at
    /// a time, oldest first; returns how many rows went.
    pub async fn prune_traffic(&self, before: i64, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM traffic_samples WHERE (deployment_id, edge, period) IN \
             (SELECT deployment_id, edge, period FROM traffic_samples WHERE at < $1 ORDER BY at LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    // ============================================================== rollouts

    /// Canary steps asked for one deployment, instead of its project's.
    pub async fn set_deployment_rollout(&self, deployment: &str, r: &zeitwork_api_types::Rollout) -> Result<()> {
        self.set_deployment_json(deployment, "rollout", r).await
    }

    pub async fn deployment_rollout(&self, deployment: &str) -> Result<Option<zeitwork_api_types::Rollout>> {
        self.deployment_json(deployment, "rollout").await
    }

    /// Writes one of a deployment's JSON release settings (`column` is one of this file's names, never input).
    async fn set_deployment_json(
        &self,
        deployment: &str,
        column: &'static str,
        v: &impl serde::Serialize,
    ) -> Result<()> {
        sqlx::query(&format!("UPDATE deployments SET {column} = $1 WHERE id = $2"))
            .bind(serde_json::to_string(v).unwrap_or_default())
            .bind(deployment)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Reads one of a deployment's JSON release settings; `None` when unset.
    async fn deployment_json<T: serde::de::DeserializeOwned>(
        &self,
        deployment: &str,
        column: &'static str,
    ) -> Result<Option<T>> {
        let row = sqlx::query(&format!("SELECT {column} FROM deployments WHERE id = $1"))
            .bind(deployment)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {deployment:?} does not exist")))?;
        Ok(row.opt_text(column)?.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Records a rollout for a deployment that just became ready; a second
    /// call for the same deployment changes nothing.
    pub async fn start_rollout(&self, r: &NewRollout) -> Result<()> {
        let d = self.get_deployment(&r.deployment).await?;
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO rollouts (deployment_id, project_id, org, project, environment, baseline, state, steps, \
             step_secs, step, started_at, step_started_at, activated_at, watch_until, updated_at) \
             SELECT $1, project_id, org, project, $2, $3, $4, $5, $6, 0, $7, $7, $8, $9, $7 FROM deployments WHERE id = $1 \
             ON CONFLICT (deployment_id) DO NOTHING",
        )
        .bind(&d.id)
        .bind(r.environment.as_str())
        .bind(r.baseline.clone())
        .bind(r.state.as_str())
        .bind(serde_json::to_string(&r.steps).unwrap_or_default())
        .bind(i64::from(r.step_secs))
        .bind(now)
        .bind((r.state == RolloutState::Watching).then_some(now))
        .bind(r.watch_until)
        .execute(&mut *tx)
        .await?;
        self.commit_announcing(
            tx,
            crate::Change::Deployments(std::iter::once(d.id).chain(r.baseline.clone()).collect()),
        )
        .await
    }

    pub async fn get_rollout(&self, deployment: &str) -> Result<Option<RolloutStatus>> {
        sqlx::query("SELECT * FROM rollouts WHERE deployment_id = $1")
            .bind(deployment)
            .fetch_optional(&self.reader)
            .await?
            .map(|r| rollout_from(&r))
            .transpose()
    }

    /// Rollouts still moving: canaries and watches.
    pub async fn open_rollouts(&self) -> Result<Vec<RolloutStatus>> {
        let rows = sqlx::query(
            "SELECT * FROM rollouts WHERE state IN ('shadow', 'canary', 'watching') ORDER BY started_at LIMIT 1000",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rollout_from).collect()
    }

    /// The shadow setting a deployment's release uses (its own, or its
    /// project's when it became ready).
    pub async fn set_deployment_shadow(&self, deployment: &str, s: &zeitwork_api_types::Shadow) -> Result<()> {
        self.set_deployment_json(deployment, "shadow", s).await
    }

    pub async fn deployment_shadow(&self, deployment: &str) -> Result<Option<zeitwork_api_types::Shadow>> {
        self.deployment_json(deployment, "shadow").await
    }

    /// Deployments in their shadow stage, for the routing table.
    pub async fn shadows(&self) -> Result<Vec<ShadowRow>> {
        let rows = sqlx::query(
            "SELECT r.deployment_id, r.org, r.project, r.environment, d.shadow FROM rollouts r \
             JOIN deployments d ON d.id = r.deployment_id WHERE r.state = 'shadow'",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let Some(shadow) = r.opt_text("shadow")?.and_then(|s| serde_json::from_str(&s).ok()) else { continue };
            out.push(ShadowRow {
                org: r.text("org")?,
                project: r.text("project")?,
                environment: r.parsed("environment", Environment::parse)?,
                deployment: r.text("deployment_id")?,
                shadow,
            });
        }
        Ok(out)
    }

    /// Canaries with their current weight, for the routing table.
    pub async fn canaries(&self) -> Result<Vec<CanaryRow>> {
        let rows = sqlx::query(
            "SELECT deployment_id, org, project, environment, steps, step FROM rollouts WHERE state = 'canary'",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let steps: Vec<u32> = serde_json::from_str(&r.text("steps")?).unwrap_or_default();
            out.push(CanaryRow {
                org: r.text("org")?,
                project: r.text("project")?,
                environment: r.parsed("environment", Environment::parse)?,
                deployment: r.text("deployment_id")?,
                weight: steps.get(r.int("step")? as usize).copied().unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Moves a canary to step `step`, with the reason the deployment shows.
    pub async fn set_rollout_step(&self, deployment: &str, step: u32, reason: &str, audit: &Audit) -> Result<()> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE rollouts SET step = $1, step_started_at = $2, updated_at = $2 WHERE deployment_id = $3 AND state = 'canary'",
        )
        .bind(i64::from(step))
        .bind(now)
        .bind(deployment)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE deployments SET reason = $1 WHERE id = $2")
            .bind(reason)
            .bind(deployment)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![deployment.to_owned()])).await?;
        Ok(())
    }

    /// Keeps the figures of the last analysis, for people to see.
    pub async fn set_rollout_analysis(&self, deployment: &str, analysis: &Analysis) -> Result<()> {
        sqlx::query("UPDATE rollouts SET analysis = $1 WHERE deployment_id = $2")
            .bind(serde_json::to_string(analysis).unwrap_or_default())
            .bind(deployment)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// A canary reached 100: the environment points at the deployment (as
    /// every activation does) and the watch begins, in one transaction.
    pub async fn promote_rollout(&self, deployment: &str, watch_until: Option<i64>, audit: &Audit) -> Result<()> {
        let d = self.get_deployment(deployment).await?;
        let r = self
            .get_rollout(deployment)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {deployment:?} has no rollout")))?;
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        self.point_environment_in(&mut tx, &d, r.environment).await?;
        let state = if watch_until.is_some() { RolloutState::Watching } else { RolloutState::Done };
        sqlx::query(
            "UPDATE rollouts SET state = $1, step = $2, activated_at = $3, watch_until = $4, updated_at = $3 \
             WHERE deployment_id = $5",
        )
        .bind(state.as_str())
        .bind(r.steps.len().saturating_sub(1) as i64)
        .bind(now)
        .bind(watch_until)
        .bind(deployment)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![deployment.to_owned()])).await?;
        Ok(())
    }

    /// The watch ended (or no longer applies: `reason` says why).
    pub async fn finish_rollout(&self, deployment: &str, reason: Option<&str>) -> Result<()> {
        let done = sqlx::query(
            "UPDATE rollouts SET state = 'done', reason = COALESCE($1, reason), updated_at = $2 \
             WHERE deployment_id = $3 AND state IN ('shadow', 'canary', 'watching') RETURNING deployment_id",
        )
        .bind(reason.map(str::to_owned))
        .bind(now_ms())
        .bind(deployment);
        self.update_announcing(done, "deployment_id").await?;
        Ok(())
    }

    /// Sends a release back, in one transaction: the environment points at
    /// `to` again when the bad deployment serves it (`to` must be running),
    /// the bad deployment is `rolled_back` with `reason` and its instances
    /// leave traffic (they stop after `stop_after`), the rollout records why,
    /// and `audit` is written (with its outbox rows). Returns false when the
    /// rollout had already ended.
    pub async fn roll_back_release(
        &self,
        bad: &str,
        to: Option<&Deployment>,
        reason: &str,
        stop_after: i64,
        audit: &Audit,
    ) -> Result<bool> {
        let d = self.get_deployment(bad).await?;
        let r = self
            .get_rollout(bad)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {bad:?} has no rollout")))?;
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let open = sqlx::query(
            "UPDATE rollouts SET state = 'rolled_back', reason = $1, updated_at = $2 \
             WHERE deployment_id = $3 AND state IN ('shadow', 'canary', 'watching')",
        )
        .bind(reason)
        .bind(now)
        .bind(bad)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !open {
            return Ok(false);
        }
        if d.status == DeploymentStatus::Active {
            if let Some(to) = to {
                self.point_environment_in(&mut tx, to, r.environment).await?;
            }
        }
        sqlx::query("UPDATE deployments SET status = 'rolled_back', reason = $1, updated_at = $2 WHERE id = $3")
            .bind(reason)
            .bind(now)
            .bind(bad)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "UPDATE instances SET status = 'stopping', stop_after = $1 WHERE deployment_id = $2 AND {}",
            crate::deployments::LIVE_INSTANCE
        ))
        .bind(stop_after)
        .bind(bad)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "failed").await?;
        let change =
            crate::Change::Deployments(std::iter::once(bad.to_owned()).chain(to.map(|t| t.id.clone())).collect());
        self.commit_announcing(tx, change).await?;
        Ok(true)
    }
}
