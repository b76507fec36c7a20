//! The change feed behind `GET /api/v1/events/stream`: while anyone listens,
//! the store is compared with its last snapshot after every change the store
//! announces (through any operator: on PostgreSQL by `LISTEN/NOTIFY`), and at
//! least every [`EVERY`] as a safety net; every status change of a
//! deployment, instance or node is broadcast. One query per change serves
//! every listener of this operator. A new listener's stream opens once the
//! feed has a snapshot to compare with, so every change committed after the
//! client has the response head reaches it.

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
    /// Snapshots taken while someone listened (each one is compared with by the next).
    looks: watch::Sender<u64>,
    /// Asks for a snapshot at once: a new listener waits for one.
    wake: tokio::sync::Notify,
}

impl Feed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { tx: broadcast::channel(1024).0, looks: watch::channel(0).0, wake: Default::default() })
    }

    /// Subscribes, and returns once the feed holds a snapshot taken after the
    /// subscription: every change committed from then on is received. A store
    /// that does not answer holds this up for at most two safety-net periods.
    pub async fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        let rx = self.tx.subscribe();
        let mut looks = self.looks.subscribe();
        looks.mark_unchanged();
        self.wake.notify_one();
        if tokio::time::timeout(EVERY * 2, looks.changed()).await.is_err() {
            tracing::warn!("change feed: no snapshot for a new listener in time; it may miss a first change");
        }
        rx
    }

    /// Compares snapshots until `stop`; idle (no queries) while no one listens.
    pub async fn run(self: Arc<Self>, store: Store, mut stop: watch::Receiver<bool>) {
        let mut last: Option<HashMap<(&'static str, String), String>> = None;
        let mut changes = store.changes();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = changes.changed() => {}
                _ = self.wake.notified() => {}
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
            self.looks.send_modify(|n| *n += 1);
        }
    }
}
