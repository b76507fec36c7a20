//! Samples of what instances use: every `usage_sample_secs` the operator that
//! runs the engine asks the node agents for the CPU time and memory of every
//! ready instance (the same measurements as a deployment's metrics, from the
//! instances' cgroups) and records them; `GET /api/v1/analytics/resources/by-org`
//! adds them up per org. An instance whose agent does not answer is skipped
//! until the next sample.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use zeitwork_store::UsageSample;

use crate::AppState;

/// Agents asked at once.
const AT_ONCE: usize = 16;

/// Samples until `stop`.
pub async fn run(s: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(s.config.usage_sample_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if s.leader.get() != 1 {
            continue;
        }
        match sample(&s).await {
            Ok(n) => tracing::debug!(instances = n, "usage sampled"),
            Err(e) => tracing::warn!(error = %e, "usage sample failed; trying again"),
        }
    }
}

/// Takes one sample of every ready instance; returns how many answered.
pub async fn sample(s: &AppState) -> Result<usize, zeitwork_store::StoreError> {
    let ready = s.store.ready_instances().await?;
    let samples: Vec<UsageSample> = futures::stream::iter(ready)
        .map(|i| async move {
            let m = crate::api::logs::instance_metrics(s, i).await;
            Some(UsageSample {
                instance: m.instance,
                cpu_ms: (m.cpu_seconds? * 1000.0).round() as i64,
                memory_bytes: i64::try_from(m.memory_bytes?).unwrap_or(i64::MAX),
                at: chrono::Utc::now().timestamp_millis(),
            })
        })
        .buffer_unordered(AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    s.store.record_usage(&samples).await?;
    Ok(samples.len())
}
