//! The periodic sweep: while the agent runs, what instances it does not run
//! left on the host (a teardown that failed, an earlier run's remains the
//! first sweep could not remove) is removed every `sweep_interval_secs`, and
//! counted in `/metrics` as `zeitwork_node_agent_swept_total{kind}`.
//!
//! An instance mid-creation is never swept: the instance manager adds
//! instances to its table only through [`InUse::adding`], and a sweep holds
//! [`InUse::alone`] from the moment it reads which instances are known until
//! it is done, so an instance added meanwhile waits; instance directories
//! changed within [`GRACE`] are left alone as well.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{watch, RwLock, RwLockReadGuard, RwLockWriteGuard};
use zeitwork_runtime::sweep::{Removed, Scope};
use zeitwork_telemetry::HttpMetrics;

use crate::instances::Table;

/// Instance directories changed within this long are not swept.
pub const GRACE: Duration = Duration::from_secs(120);

/// What a sweep must leave alone beyond the instance table.
#[derive(Debug, Default)]
pub struct InUse {
    /// Shared while instances are added to the table, exclusive during a sweep.
    gate: RwLock<()>,
    /// Instances out of the table whose teardown still runs.
    stopping: std::sync::Mutex<HashSet<String>>,
}

impl InUse {
    /// Held while an instance is added to the table (a sweep in progress finishes first).
    pub async fn adding(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Held by a sweep, with every instance the node runs, starts or stops:
    /// none is added until the guard goes.
    pub async fn alone(&self, table: &Table) -> (RwLockWriteGuard<'_, ()>, HashSet<String>) {
        let guard = self.gate.write().await;
        let mut known: HashSet<String> = table.read().await.keys().cloned().collect();
        known.extend(self.stopping().iter().cloned());
        (guard, known)
    }

    /// Marks `id` as stopping; call before it leaves the table.
    pub fn stop_begins(&self, id: &str) {
        self.stopping().insert(id.to_owned());
    }

    /// Its teardown is over (done, or failed and logged).
    pub fn stop_ends(&self, id: &str) {
        self.stopping().remove(id);
    }

    fn stopping(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.stopping.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// `swept_total{kind}`: leftovers removed, by kind (container, process, mount, netns, link, cgroup, directory).
#[derive(Debug, Clone, Default)]
pub struct Swept(Family<Kind, Counter>);

impl Swept {
    pub fn register(metrics: &HttpMetrics) -> Self {
        let s = Self::default();
        metrics.with_registry(|r| {
            r.register("swept", "Leftovers of instances this node does not run, removed by the sweeper", s.0.clone())
        });
        s
    }

    pub fn count(&self, removed: &[Removed]) {
        for r in removed {
            self.0.get_or_create(&Kind { kind: r.kind }).inc();
        }
    }
}

/// Sweeps every `every` until `stop`.
pub async fn run(
    scope: Scope,
    table: Table,
    in_use: Arc<InUse>,
    every: Duration,
    swept: Swept,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let removed = {
            let (_alone, known) = in_use.alone(&table).await;
            zeitwork_runtime::sweep::sweep(&Scope { known, grace: GRACE, ..scope.clone() }).await
        };
        swept.count(&removed);
        if !removed.is_empty() {
            tracing::warn!(
                count = removed.len(),
                "the periodic sweep removed leftovers of instances this node does not run"
            );
        }
    }
}
