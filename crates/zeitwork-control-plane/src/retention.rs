//! Retention: what grows without end is pruned in batches, every few minutes,
//! by the operator holding the engine lease: uptime samples after
//! `health_sample_retention_days`, audit events after `audit_retention_days`,
//! delivered notifications after `outbox_retention_days` (dead letters stay
//! until someone retries or drops them), the edges' traffic figures after
//! `traffic_retention_days`, the usage figures of instances last sampled
//! before `usage_retention_days`; unverified custom domain claims after
//! `domain_claim_ttl_hours`.

use std::time::Duration;

use tokio::sync::watch;

use zeitwork_store::Store;

use crate::{AppState, OperatorConfig};

/// Rows deleted per statement, so no prune holds the store for long.
const BATCH: u32 = 1000;

pub async fn run(s: AppState, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if s.leader.get() == 1 {
            prune(&s).await;
        }
    }
}

/// One pass over everything with a retention; how many rows went.
pub async fn prune(s: &AppState) -> u64 {
    prune_at(&s.store, &s.config, chrono::Utc::now().timestamp_millis()).await
}

/// [`prune`] as of `now` (unix ms).
async fn prune_at(store: &Store, config: &OperatorConfig, now: i64) -> u64 {
    let days = |d: u32| now - i64::from(d) * 86_400_000;
    let mut total = 0;
    for (what, before) in [
        ("uptime samples", days(config.health_sample_retention_days)),
        ("audit events", days(config.audit_retention_days)),
        ("delivered notifications", days(config.outbox_retention_days)),
        ("traffic figures", days(config.traffic_retention_days)),
        ("usage figures", days(config.usage_retention_days)),
    ] {
        loop {
            let done = match what {
                "uptime samples" => store.prune_samples(before, BATCH).await,
                "audit events" => store.prune_events(before, BATCH).await,
                "traffic figures" => store.prune_traffic(before, BATCH).await,
                "usage figures" => store.prune_usage(before, BATCH).await,
                _ => store.prune_delivered(before, BATCH).await,
            };
            match done {
                Ok(n) => {
                    total += n;
                    if n < u64::from(BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning {what} failed");
                    break;
                }
            }
        }
    }
    let claims = now - i64::from(config.domain_claim_ttl_hours) * 3_600_000;
    match store.expire_domain_claims(claims).await {
        Ok(gone) => total += gone.len() as u64,
        Err(e) => tracing::warn!(error = %e, "expiring unverified domain claims failed"),
    }
    if total > 0 {
        tracing::info!(rows = total, "pruned rows past their retention");
    }
    total
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use zeitwork_api_types::DeploymentTraffic;

    use super::*;

    /// Traffic figures older than `traffic_retention_days` go, in as many
    /// batches as it takes; younger ones stay.
    #[tokio::test]
    async fn traffic_figures_past_their_retention_are_pruned_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
        let mut t = DeploymentTraffic::default();
        t.observe(200, Duration::from_millis(3));
        let many: BTreeMap<String, DeploymentTraffic> =
            (0..BATCH + 5).map(|i| (format!("dep_{i:05}"), t.clone())).collect();
        store.record_traffic("edge-a", 1, &many).await.unwrap();
        let config = OperatorConfig { traffic_retention_days: 2, ..Default::default() };
        let day = 86_400_000;
        let now = chrono::Utc::now().timestamp_millis();
        let figures = |id: &'static str| {
            let store = store.clone();
            async move { store.traffic_between(id, 0, now + 10 * day).await.unwrap().requests }
        };
        assert_eq!(prune_at(&store, &config, now + day).await, 0, "a day old: kept");
        assert_eq!(figures("dep_00000").await, 1);
        assert_eq!(prune_at(&store, &config, now + 3 * day).await, u64::from(BATCH) + 5, "three days old: gone");
        assert_eq!((figures("dep_00000").await, figures("dep_01004").await), (0, 0));
    }
}
