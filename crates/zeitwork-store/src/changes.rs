//! Change notification: after every committed change to routing, node
//! assignments or deployment state, the store bumps a counter that readers
//! (the deployment engine, the routing table, assignment watches, the change
//! feed) wait on, so they act on the change instead of on a timer.
//!
//! In one process the counter is a `watch` channel shared by every clone of
//! the [`Store`]. Across operators on PostgreSQL, a change also sends
//! `NOTIFY zeitwork_changes`, and [`Store::follow_changes`] (run by every
//! operator) listens and bumps its own counter. A lost notification (a
//! dropped listener connection, a crash between commit and notify) is made
//! good by the readers' slow safety-net polls; a reconnected listener bumps
//! the counter once, since it may have missed something.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Dialect, Store};

/// The PostgreSQL channel changes are announced on.
pub const CHANGE_CHANNEL: &str = "zeitwork_changes";

#[derive(Clone)]
pub(crate) struct ChangeBus {
    tx: Arc<watch::Sender<u64>>,
    /// PostgreSQL URL to listen with (holds credentials: never shown).
    listen_url: Option<Arc<str>>,
}

impl std::fmt::Debug for ChangeBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeBus").field("version", &*self.tx.borrow()).finish_non_exhaustive()
    }
}

impl ChangeBus {
    pub(crate) fn new(listen_url: Option<&str>) -> Self {
        Self { tx: Arc::new(watch::Sender::new(0)), listen_url: listen_url.map(Arc::from) }
    }

    fn bump(&self) {
        self.tx.send_modify(|v| *v = v.wrapping_add(1));
    }
}

impl Store {
    /// A receiver that sees a new value after every change to routing,
    /// assignments or deployment state (made through this process, or, on
    /// PostgreSQL while [`Store::follow_changes`] runs, through any operator).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.tx.subscribe()
    }

    /// Wakes every reader of this process now (after a change the store did not make itself).
    pub fn wake_readers(&self) {
        self.changes.bump();
    }

    /// Called after a change is committed: wakes this process's readers and,
    /// on PostgreSQL, the other operators'. A failed NOTIFY is logged, not
    /// returned: the change is committed and the others' polls will see it.
    pub(crate) async fn changed(&self) {
        self.changes.bump();
        if self.dialect == Dialect::Postgres {
            if let Err(e) = sqlx::query("SELECT pg_notify($1, '')").bind(CHANGE_CHANNEL).execute(&self.writer).await {
                tracing::warn!(error = %e, "cannot notify other operators of a change; their polls will see it");
            }
        }
    }

    /// On PostgreSQL, listens for other operators' changes until `stop` and
    /// wakes this process's readers on each; reconnects after a lost
    /// connection (waking the readers, since a change may have been missed).
    /// Returns at once on SQLite, where one operator owns the store.
    pub async fn follow_changes(&self, mut stop: watch::Receiver<bool>) {
        let Some(url) = self.changes.listen_url.clone() else { return };
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect(&url).await?;
                l.listen(CHANGE_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                l = listener => l,
                _ = stop.wait_for(|s| *s) => return,
            };
            match &mut listener {
                Ok(l) => {
                    backoff = Duration::from_millis(100);
                    // Whatever happened while not listening is looked at now.
                    self.changes.bump();
                    loop {
                        let next = tokio::select! {
                            n = l.try_recv() => n,
                            _ = stop.wait_for(|s| *s) => return,
                        };
                        match next {
                            Ok(Some(_)) => self.changes.bump(),
                            Ok(None) => {
                                tracing::warn!("the change listener lost its connection; reconnecting");
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the change listener failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for other operators' changes"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
