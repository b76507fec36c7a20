//! Uptime checks of projects and their samples. A check's state moves with
//! hysteresis: `down` after `FAILS_TO_DOWN` failed samples in a row, back up
//! only after `PASSES_TO_UP` passing ones; a single failure or a slow answer
//! in between is `degraded`. State changes are audit events (and so
//! notifications), written with the sample that caused them.

use sqlx::any::AnyRow;

use crate::events::append_event;
use crate::{now_ms, ts, Audit, Result, RowExt, Store, StoreError};

/// Failed samples in a row that make a check `down`.
pub const FAILS_TO_DOWN: i64 = 2;
/// Passing samples in a row that make a `down` check `up` again.
pub const PASSES_TO_UP: i64 = 2;

/// A check as stored; `spec` is the API's settings as JSON.
#[derive(Debug, Clone)]
pub struct StoredCheck {
    pub id: String,
    pub project_id: String,
    pub org: String,
    pub project: String,
    pub spec: serde_json::Value,
    /// `unknown` (no sample yet), `up`, `degraded`, `down`.
    pub state: String,
    pub fails: i64,
    pub passes: i64,
    pub next_at: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

fn check_from(r: &AnyRow) -> Result<StoredCheck> {
    Ok(StoredCheck {
        id: r.text("id")?,
        project_id: r.text("project_id")?,
        org: r.text("org")?,
        project: r.text("project")?,
        spec: serde_json::from_str(&r.text("spec")?).map_err(|e| StoreError::Corrupt(format!("check spec: {e}")))?,
        state: r.text("state")?,
        fails: r.int("fails")?,
        passes: r.int("passes")?,
        next_at: r.int("next_at")?,
        created_at: ts(r.int("created_at")?),
        updated_at: ts(r.int("updated_at")?),
    })
}

/// One probe of a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub region: String,
    pub ok: bool,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

/// A check's samples over a period, summed up.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSummary {
    pub total: u64,
    pub passed: u64,
    /// Median latency, ms (the sample at rank round((n - 1) / 2)).
    pub p50_ms: Option<u64>,
    /// 95th percentile latency, ms.
    pub p95_ms: Option<u64>,
    /// The latest sample.
    pub last: Option<Sample>,
}

fn sample_from(r: &AnyRow) -> Result<Sample> {
    Ok(Sample {
        id: r.int("id")?,
        at: ts(r.int("at")?),
        region: r.text("region")?,
        ok: r.int("ok")? != 0,
        status: r.opt_int("status")?.map(|s| s as u16),
        latency_ms: r.int("latency_ms")?.max(0) as u64,
        error: r.opt_text("error")?,
    })
}

/// The state after a sample: (state, fails in a row, passes in a row).
pub fn next_state(state: &str, fails: i64, passes: i64, ok: bool, slow: bool) -> (&'static str, i64, i64) {
    let (fails, passes) = if ok { (0, passes + 1) } else { (fails + 1, 0) };
    let s = if fails >= FAILS_TO_DOWN || (state == "down" && passes < PASSES_TO_UP) {
        "down"
    } else if !ok || slow {
        "degraded"
    } else {
        "up"
    };
    (s, fails, passes)
}

impl Store {
    pub async fn create_check(&self, c: &StoredCheck, audit: &Audit) -> Result<StoredCheck> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO health_checks (id, project_id, org, project, spec, state, fails, passes, next_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'unknown', 0, 0, $6, $7, $7)",
        )
        .bind(&c.id)
        .bind(&c.project_id)
        .bind(&c.org)
        .bind(&c.project)
        .bind(c.spec.to_string())
        .bind(c.next_at)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.check(&c.id).await
    }

    pub async fn check(&self, id: &str) -> Result<StoredCheck> {
        let row = sqlx::query("SELECT * FROM health_checks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("health check {id:?} does not exist")))?;
        check_from(&row)
    }

    pub async fn project_checks(&self, org: &str, project: &str) -> Result<Vec<StoredCheck>> {
        sqlx::query("SELECT * FROM health_checks WHERE org = $1 AND project = $2 ORDER BY created_at, id")
            .bind(org)
            .bind(project)
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(check_from)
            .collect()
    }

    /// Replaces a check's settings; it runs again at once.
    pub async fn update_check(&self, id: &str, spec: &serde_json::Value, audit: &Audit) -> Result<StoredCheck> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let done = sqlx::query("UPDATE health_checks SET spec = $1, next_at = $2, updated_at = $2 WHERE id = $3")
            .bind(spec.to_string())
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("health check {id:?} does not exist")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.check(id).await
    }

    pub async fn delete_check(&self, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM health_checks WHERE id = $1").bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("health check {id:?} does not exist")));
        }
        sqlx::query("DELETE FROM health_samples WHERE check_id = $1").bind(id).execute(&mut *tx).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks due to run, and their next run moved on by `interval_ms` each (claimed).
    pub async fn due_checks(&self, now: i64) -> Result<Vec<StoredCheck>> {
        let due: Vec<StoredCheck> =
            sqlx::query("SELECT * FROM health_checks WHERE next_at <= $1 ORDER BY next_at LIMIT 100")
                .bind(now)
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(check_from)
                .collect::<Result<_>>()?;
        let mut claimed = Vec::new();
        for c in due {
            let every = c.spec["interval_secs"].as_i64().unwrap_or(60).max(10) * 1000;
            let done = sqlx::query("UPDATE health_checks SET next_at = $1 WHERE id = $2 AND next_at = $3")
                .bind(now + every)
                .bind(&c.id)
                .bind(c.next_at)
                .execute(&self.writer)
                .await?;
            if done.rows_affected() == 1 {
                claimed.push(c);
            }
        }
        Ok(claimed)
    }

    /// Records a sample and moves the check's state; returns the state before and after.
    pub async fn record_sample(&self, id: &str, s: &Sample, slow: bool) -> Result<(String, String)> {
        self.record_samples(id, std::slice::from_ref(s), s.ok, slow).await
    }

    /// Records one round's samples (one a region) and moves the check's state by the
    /// round's verdict: `ok`, and `slow` for degraded; returns the state before and after.
    pub async fn record_samples(&self, id: &str, samples: &[Sample], ok: bool, slow: bool) -> Result<(String, String)> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT * FROM health_checks WHERE id = $1{}", self.for_update()))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("health check {id:?} does not exist")))?;
        let c = check_from(&row)?;
        for s in samples {
            sqlx::query(
                "INSERT INTO health_samples (check_id, at, region, ok, status, latency_ms, error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(id)
            .bind(s.at.timestamp_millis())
            .bind(&s.region)
            .bind(i64::from(s.ok))
            .bind(s.status.map(i64::from))
            .bind(s.latency_ms as i64)
            .bind(s.error.clone())
            .execute(&mut *tx)
            .await?;
        }
        let (state, fails, passes) = next_state(&c.state, c.fails, c.passes, ok, slow);
        sqlx::query("UPDATE health_checks SET state = $1, fails = $2, passes = $3, updated_at = $4 WHERE id = $5")
            .bind(state)
            .bind(fails)
            .bind(passes)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if state != c.state {
            // The sample that tells most: a failing one when there is one.
            let Some(s) = samples.iter().find(|s| !s.ok).or(samples.first()) else {
                return Err(StoreError::Invalid { field: "samples".into(), message: "a round has samples".into() });
            };
            let audit = Audit::new("system", "health_check.state", id).org(&c.org).project(&c.project).detail(
                serde_json::json!({
                    "from": c.state, "to": state, "status": s.status, "error": s.error,
                    "latency_ms": s.latency_ms, "region": s.region,
                    "regions": samples.iter().map(|r| serde_json::json!({
                        "region": r.region, "ok": r.ok, "status": r.status, "error": r.error, "latency_ms": r.latency_ms,
                    })).collect::<Vec<_>>(),
                }),
            );
            append_event(&mut tx, &audit, "ok").await?;
        }
        tx.commit().await?;
        Ok((c.state, state.to_owned()))
    }

    /// Samples of a check between two times (ms), oldest first, after sample `after` (a cursor).
    pub async fn samples(&self, id: &str, from: i64, to: i64, after: i64, limit: u32) -> Result<Vec<Sample>> {
        sqlx::query(
            "SELECT * FROM health_samples WHERE check_id = $1 AND at >= $2 AND at <= $3 AND id > $4 \
             ORDER BY id LIMIT $5",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(sample_from)
        .collect()
    }

    /// A check's figures between `from` and `to` (unix ms), computed by the
    /// database: however many samples the period holds, none is sent here
    /// but the latest.
    pub async fn sample_summary(&self, id: &str, from: i64, to: i64) -> Result<SampleSummary> {
        const WHERE: &str = "FROM health_samples WHERE check_id = $1 AND at >= $2 AND at <= $3";
        let row = sqlx::query(&format!("SELECT COUNT(*) AS total, CAST(SUM(ok) AS BIGINT) AS passed {WHERE}"))
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_one(&self.reader)
            .await?;
        let total = row.int("total")?.max(0) as u64;
        let passed = row.opt_int("passed")?.unwrap_or(0).max(0) as u64;
        // The sample at rank round((n - 1) * p) of the latencies in order.
        let latency_at = |p: f64| {
            let rank = ((total.saturating_sub(1)) as f64 * p).round() as i64;
            async move {
                if total == 0 {
                    return Ok(None);
                }
                let row = sqlx::query(&format!("SELECT latency_ms {WHERE} ORDER BY latency_ms LIMIT 1 OFFSET $4"))
                    .bind(id)
                    .bind(from)
                    .bind(to)
                    .bind(rank)
                    .fetch_optional(&self.reader)
                    .await?;
                row.map(|r| r.int("latency_ms").map(|v| v.max(0) as u64)).transpose()
            }
        };
        let (p50_ms, p95_ms) = (latency_at(0.5).await?, latency_at(0.95).await?);
        let last = sqlx::query(&format!("SELECT * {WHERE} ORDER BY at DESC, id DESC LIMIT 1"))
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(sample_from)
            .transpose()?;
        Ok(SampleSummary { total, passed, p50_ms, p95_ms, last })
    }

    /// Deletes samples older than `before_ms`, at most `batch` at a time; how many went.
    pub async fn prune_samples(&self, before_ms: i64, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM health_samples WHERE id IN (SELECT id FROM health_samples WHERE at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(before_ms)
        .bind(i64::from(batch))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_move_with_hysteresis() {
        let (s, f, p) = next_state("unknown", 0, 0, true, false);
        assert_eq!((s, f, p), ("up", 0, 1));
        let (s, f, p) = next_state(s, f, p, false, false);
        assert_eq!(s, "degraded", "one failure is not down yet");
        let (s, f, p) = next_state(s, f, p, false, false);
        assert_eq!(s, "down");
        let (s, f, p) = next_state(s, f, p, true, false);
        assert_eq!(s, "down", "one pass does not end down");
        let (s, f, p) = next_state(s, f, p, true, false);
        assert_eq!((s, f, p), ("up", 0, 2));
        assert_eq!(next_state("up", 0, 5, true, true).0, "degraded", "slow is degraded");
    }
}
