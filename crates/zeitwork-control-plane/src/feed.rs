//! The change feed behind `GET /api/v1/events/stream`: while anyone listens,
//! the store is compared with its last snapshot after every change the store
//! announces (through any operator: on PostgreSQL by `LISTEN/NOTIFY`), and at
//! least every [`EVERY`] as a safety net; every status change of a
//! deployment, instance or node is broadcast. One query per change serves
//! every listener of this operator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use zeitwork_api_types::Change;
use zeitwork_store::Store;

/// The safety-net period: changes are seen at once.
pub const EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Feed {
    tx: broadcast::Sender<Arc<Change>>,
}

impl Feed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { tx: broadcast::channel(1024).0 })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Compares snapshots until `stop`; idle (no queries) while no one listens.
    pub async fn run(self: Arc<Self>, store: Store, mut stop: watch::Receiver<bool>) {
        let mut last: Option<HashMap<(&'static str, String), String>> = None;
        let mut changes = store.changes();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = changes.changed() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.tx.receiver_count() == 0 {
                last = None;
                continue;
            }
            changes.mark_unchanged();
            let since = chrono::Utc::now().timestamp_millis() - 60_000;
            let rows = match store.feed_snapshot(since).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: cannot read the store");
                    continue;
                }
            };
            let now: HashMap<(&'static str, String), String> =
                rows.iter().map(|r| ((r.kind, r.id.clone()), r.status.clone())).collect();
            if let Some(before) = &last {
                for r in &rows {
                    let previous = before.get(&(r.kind, r.id.clone()));
                    if previous == Some(&r.status) {
                        continue;
                    }
                    let _ = self.tx.send(Arc::new(Change {
                        kind: r.kind.to_owned(),
                        id: r.id.clone(),
                        org: r.org.clone(),
                        project: r.project.clone(),
                        deployment: r.deployment.clone(),
                        status: r.status.clone(),
                        previous: previous.cloned(),
                        reason: r.reason.clone(),
                        at: chrono::Utc::now(),
                    }));
                }
            }
            last = Some(now);
        }
    }
}
