//! Change notification: after every committed change to routing, node
//! assignments or deployment state, the store bumps a counter that readers
//! (the deployment engine, the routing table, assignment watches, the change
//! feed) wait on, so they act on the change instead of on a timer.
//!
//! In one process the counter is a `watch` channel shared by every clone of
//! the [`Store`]. Across operators on PostgreSQL, a change also sends
//! `NOTIFY zeitwork_changes`, and [`Store::follow_changes`] (run by every
//! operator) listens and bumps its own counter. Every change sends its
//! NOTIFY inside its own transaction ([`Store::commit_announcing`],
//! [`Store::update_announcing`]), so the others hear of it when, and only
//! when, it commits: a crash after the commit cannot lose it, and a NOTIFY
//! that fails fails the change. A reconnected listener bumps the counter
//! once, since it may have missed something while not listening. The
//! readers' slow safety-net polls remain for what no announcement describes.
//!
//! Each announcement says what it touched where the store knows cheaply
//! ([`Change`]: some deployments, some projects, or anything), kept in a
//! bounded log by counter value, so a reader such as the routing table can
//! update only what changed. A reader whose last value is older than the
//! log, or that meets [`Change::Anything`], looks at everything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Dialect, Result, Store};

/// The PostgreSQL channel changes are announced on.
pub const CHANGE_CHANNEL: &str = "zeitwork_changes";

/// Announcements kept for readers that ask what changed; one further behind looks at everything.
pub const CHANGE_LOG_LEN: usize = 4096;

/// What one committed change touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These deployments (their status, instances, rollout), by id.
    Deployments(Vec<String>),
    /// These projects (their settings, domains, current deployments), by id.
    Projects(Vec<String>),
    /// These nodes: registered, back, down, draining, drained or deleted
    /// (none named: some nodes, which ones not said).
    Nodes(Vec<String>),
    /// Anything: several projects at once, or a change not described.
    Anything,
}

impl Change {
    /// The NOTIFY payload: `d:<id>,<id>`, `p:<id>,…`, `n:<id>,…` for nodes
    /// (`n:` for some nodes), or empty for anything.
    fn encode(&self) -> String {
        let (kind, ids) = match self {
            Change::Deployments(ids) => ("d", ids),
            Change::Projects(ids) => ("p", ids),
            Change::Nodes(ids) => ("n", ids),
            Change::Anything => return String::new(),
        };
        let payload = format!("{kind}:{}", ids.join(","));
        // PostgreSQL takes payloads under 8,000 bytes: a longer one says less.
        match (kind, ids.is_empty() || payload.len() >= 7900) {
            ("n", true) => "n:".into(),
            (_, true) => String::new(),
            _ => payload,
        }
    }

    fn decode(payload: &str) -> Self {
        let ids = |s: &str| s.split(',').filter(|i| !i.is_empty()).map(str::to_owned).collect::<Vec<_>>();
        match payload.split_once(':') {
            Some(("d", rest)) if !ids(rest).is_empty() => Change::Deployments(ids(rest)),
            Some(("p", rest)) if !ids(rest).is_empty() => Change::Projects(ids(rest)),
            Some(("n", rest)) => Change::Nodes(ids(rest)),
            _ => Change::Anything,
        }
    }
}

#[derive(Clone)]
pub(crate) struct ChangeBus {
    tx: Arc<watch::Sender<u64>>,
    /// What each of the newest counter values announced.
    log: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, Change)>>>,
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
        Self { tx: Arc::new(watch::Sender::new(0)), log: Arc::default(), listen_url: listen_url.map(Arc::from) }
    }

    fn bump(&self) {
        self.announce(Change::Anything);
    }

    fn since(&self, seen: u64) -> (u64, Option<Vec<Change>>) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let latest = *self.tx.borrow();
        if seen == latest {
            return (latest, Some(Vec::new()));
        }
        let oldest = log.front().map_or(latest + 1, |(v, _)| *v);
        if seen > latest || seen + 1 < oldest {
            return (latest, None);
        }
        (latest, Some(log.iter().filter(|(v, _)| *v > seen).map(|(_, c)| c.clone()).collect()))
    }

    fn announce(&self, change: Change) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        self.tx.send_modify(|v| {
            *v += 1;
            log.push_back((*v, change));
        });
        while log.len() > CHANGE_LOG_LEN {
            log.pop_front();
        }
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

    /// The newest counter value, and what was announced after `seen`: `None`
    /// when that is no longer known (older than the log, or from another
    /// counter), and the reader should look at everything.
    pub fn changes_since(&self, seen: u64) -> (u64, Option<Vec<Change>>) {
        self.changes.since(seen)
    }

    /// Commits `tx` and announces `change`: on PostgreSQL the NOTIFY is sent
    /// inside the transaction, so other operators hear of the change when,
    /// and only when, it commits (a crash between the commit and the NOTIFY
    /// cannot lose it); then this process's readers are woken.
    pub(crate) async fn commit_announcing(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Any>,
        change: Change,
    ) -> Result<()> {
        self.commit_announcing_all(tx, vec![change]).await
    }

    /// [`Store::commit_announcing`] for several changes, in order; with none,
    /// a plain commit.
    pub(crate) async fn commit_announcing_all(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        changes: Vec<Change>,
    ) -> Result<()> {
        for change in &changes {
            self.notify_in(&mut tx, change).await?;
        }
        tx.commit().await?;
        for change in changes {
            self.announce_here(change);
        }
        Ok(())
    }

    /// Runs `q`, one statement that changes deployments (or what belongs to
    /// them) and returns their ids in the column `deployment`, announcing
    /// them as [`Store::commit_announcing`] does (nothing when it changed no
    /// row; on PostgreSQL in a transaction of its own, for its NOTIFY);
    /// returns how many rows it changed.
    pub(crate) async fn update_announcing<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        deployment: &str,
    ) -> Result<usize> {
        let changed = |rows: &[sqlx::any::AnyRow]| -> Result<Vec<Change>> {
            let mut ids = rows.iter().map(|r| crate::RowExt::text(r, deployment)).collect::<Result<Vec<_>>>()?;
            ids.sort();
            ids.dedup();
            Ok(if ids.is_empty() { Vec::new() } else { vec![Change::Deployments(ids)] })
        };
        if self.dialect != Dialect::Postgres {
            let rows = q.fetch_all(&self.writer).await?;
            changed(&rows)?.into_iter().for_each(|c| self.announce_here(c));
            return Ok(rows.len());
        }
        let mut tx = self.writer.begin().await?;
        let rows = q.fetch_all(&mut *tx).await?;
        self.commit_announcing_all(tx, changed(&rows)?).await?;
        Ok(rows.len())
    }

    /// The NOTIFY of [`Store::commit_announcing`] for a caller that commits
    /// itself (and then calls [`Store::announce_here`]).
    pub(crate) async fn notify_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        change: &Change,
    ) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGE_CHANNEL)
                .bind(change.encode())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Wakes this process's readers for a change committed with [`Store::notify_in`].
    pub(crate) fn announce_here(&self, change: Change) {
        self.changes.announce(change);
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
                            Ok(Some(n)) => self.changes.announce(Change::decode(n.payload())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_long_ones_say_anything() {
        for c in [
            Change::Deployments(vec!["web-abc-acme".into(), "api-def-acme".into()]),
            Change::Projects(vec!["prj_1".into()]),
            Change::Nodes(vec!["node_1".into(), "node_2".into()]),
            Change::Nodes(vec![]),
            Change::Anything,
        ] {
            assert_eq!(Change::decode(&c.encode()), c);
        }
        assert_eq!(Change::decode("d:"), Change::Anything);
        assert_eq!(Change::decode("x:1"), Change::Anything);
        let many = Change::Deployments((0..2000).map(|i| format!("dep-{i}")).collect());
        assert_eq!(Change::decode(&many.encode()), Change::Anything);
        let many = Change::Nodes((0..2000).map(|i| format!("node-{i}")).collect());
        assert_eq!(Change::decode(&many.encode()), Change::Nodes(vec![]), "some nodes, which ones not said");
    }

    #[test]
    fn readers_get_what_changed_or_none_after_a_gap() {
        let bus = ChangeBus::new(None);
        let (at, none) = bus.since(0);
        assert_eq!((at, none), (0, Some(vec![])));
        bus.announce(Change::Projects(vec!["p1".into()]));
        bus.announce(Change::Deployments(vec!["d1".into()]));
        let (latest, got) = bus.since(at);
        assert_eq!(latest, at + 2);
        assert_eq!(got, Some(vec![Change::Projects(vec!["p1".into()]), Change::Deployments(vec!["d1".into()])]));
        assert_eq!(bus.since(at + 1).1, Some(vec![Change::Deployments(vec!["d1".into()])]));
        assert_eq!(bus.since(latest).1, Some(vec![]));
        assert_eq!(bus.since(latest + 5).1, None, "a value this counter never had");
        for _ in 0..CHANGE_LOG_LEN {
            bus.bump();
        }
        assert_eq!(bus.since(at).1, None, "further behind than the log");
        let (now, last) = bus.since(latest + CHANGE_LOG_LEN as u64 - 1);
        assert_eq!((now, last), (latest + CHANGE_LOG_LEN as u64, Some(vec![Change::Anything])));
    }
}
