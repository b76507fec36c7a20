//! What instances used, from the samples the operator takes of node agents'
//! measurements (CPU time and memory from each instance's cgroup): one row per
//! instance, kept after it is gone, so an org's CPU seconds and instance-hours
//! add up over every instance it ran, and its memory over the ones still live.

use sqlx::Row;

use crate::deployments::LIVE_INSTANCE;
use crate::{Result, RowExt, Store};

/// One measurement of a running instance, as its node agent reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSample {
    pub instance: String,
    /// CPU time the instance used since it started (its cgroup's counter), in ms.
    pub cpu_ms: i64,
    pub memory_bytes: i64,
    /// When the sample was taken, ms since the epoch.
    pub at: i64,
}

/// What one org's instances used, summed from their samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrgUsage {
    pub org: String,
    /// CPU time of every instance the org ran (counted from each instance's start), in ms.
    pub cpu_ms: i64,
    /// Memory the org's live instances used at their latest samples.
    pub memory_bytes: i64,
    /// Time instances ran, from each instance's start (ready, else first sample) to its latest sample, in ms.
    pub instance_ms: i64,
    /// Samples taken of the org's instances.
    pub samples: i64,
    /// The latest sample, ms since the epoch.
    pub last_sample_at: Option<i64>,
}

impl Store {
    /// Records samples of instances. The CPU counter of an instance that
    /// restarted starts again from zero: what it counts then is added, not lost.
    /// Samples of instances the store does not know are skipped.
    pub async fn record_usage(&self, samples: &[UsageSample]) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for s in samples {
            sqlx::query(
                "INSERT INTO instance_usage (instance_id, org, project, deployment_id, cpu_ms, cpu_counter_ms, \
                 memory_bytes, since_at, last_at, samples) \
                 SELECT i.id, d.org, d.project, d.id, $2, $2, $3, COALESCE(i.ready_at, $4), $4, 1 \
                 FROM instances i JOIN deployments d ON d.id = i.deployment_id WHERE i.id = $1 \
                 ON CONFLICT (instance_id) DO UPDATE SET \
                 cpu_ms = instance_usage.cpu_ms + CASE WHEN excluded.cpu_counter_ms >= instance_usage.cpu_counter_ms \
                   THEN excluded.cpu_counter_ms - instance_usage.cpu_counter_ms ELSE excluded.cpu_counter_ms END, \
                 cpu_counter_ms = excluded.cpu_counter_ms, memory_bytes = excluded.memory_bytes, \
                 last_at = excluded.last_at, samples = instance_usage.samples + 1",
            )
            .bind(&s.instance)
            .bind(s.cpu_ms.max(0))
            .bind(s.memory_bytes.max(0))
            .bind(s.at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes up to `batch` rows of instances last sampled before `before`
    /// (ms since the epoch): instances gone that long. How many went.
    pub async fn prune_usage(&self, before: i64, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM instance_usage WHERE instance_id IN \
             (SELECT instance_id FROM instance_usage WHERE last_at < $1 ORDER BY last_at LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    /// What each org's instances used (of `org` when given), by org.
    pub async fn usage_by_org(&self, org: Option<&str>) -> Result<Vec<OrgUsage>> {
        let rows = sqlx::query(&format!(
            "SELECT u.org, CAST(SUM(u.cpu_ms) AS BIGINT) AS cpu_ms, \
             CAST(COALESCE(SUM(CASE WHEN i.id IS NOT NULL THEN u.memory_bytes ELSE 0 END), 0) AS BIGINT) AS memory, \
             CAST(SUM(CASE WHEN u.last_at > u.since_at THEN u.last_at - u.since_at ELSE 0 END) AS BIGINT) AS ran_ms, \
             CAST(SUM(u.samples) AS BIGINT) AS samples, CAST(MAX(u.last_at) AS BIGINT) AS last_at \
             FROM instance_usage u LEFT JOIN instances i ON i.id = u.instance_id AND i.{LIVE_INSTANCE} \
             WHERE ($1 = '' OR u.org = $1) GROUP BY u.org ORDER BY u.org"
        ))
        .bind(org.unwrap_or_default())
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OrgUsage {
                    org: r.text("org")?,
                    cpu_ms: r.int("cpu_ms")?,
                    memory_bytes: r.int("memory")?,
                    instance_ms: r.int("ran_ms")?,
                    samples: r.int("samples")?,
                    last_sample_at: r.try_get::<Option<i64>, _>("last_at")?,
                })
            })
            .collect()
    }

    /// Ready instances to sample, with where they run: every one of them, oldest first.
    pub async fn ready_instances(&self) -> Result<Vec<zeitwork_api_types::Instance>> {
        let rows = sqlx::query("SELECT * FROM instances WHERE status = 'ready' ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(crate::deployments::instance_from).collect()
    }
}
