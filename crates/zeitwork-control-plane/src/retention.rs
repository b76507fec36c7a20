//! Retention: what grows without end is pruned in batches, every few minutes,
//! by the operator holding the engine lease: uptime samples after
//! `health_sample_retention_days`, audit events after `audit_retention_days`,
//! and delivered notifications after `outbox_retention_days` (dead letters
//! stay until someone retries or drops them); unverified custom domain
//! claims after `domain_claim_ttl_hours`.

use std::time::Duration;

use tokio::sync::watch;

use crate::AppState;

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
    let now = chrono::Utc::now().timestamp_millis();
    let days = |d: u32| now - i64::from(d) * 86_400_000;
    let mut total = 0;
    for (what, before) in [
        ("uptime samples", days(s.config.health_sample_retention_days)),
        ("audit events", days(s.config.audit_retention_days)),
        ("delivered notifications", days(s.config.outbox_retention_days)),
    ] {
        loop {
            let done = match what {
                "uptime samples" => s.store.prune_samples(before, BATCH).await,
                "audit events" => s.store.prune_events(before, BATCH).await,
                _ => s.store.prune_delivered(before, BATCH).await,
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
    let claims = now - i64::from(s.config.domain_claim_ttl_hours) * 3_600_000;
    match s.store.expire_domain_claims(claims).await {
        Ok(gone) => total += gone.len() as u64,
        Err(e) => tracing::warn!(error = %e, "expiring unverified domain claims failed"),
    }
    if total > 0 {
        tracing::info!(rows = total, "pruned rows past their retention");
    }
    total
}
