//! The routing table the edge proxies follow: built from the store when it
//! changes, versioned by content, and kept as one bounded log of deltas per
//! operator, so every edge watching learns of a change in one round trip and
//! receives only what changed.
//!
//! The store wakes the hub after every change to routing state (through this
//! operator at once; through others on PostgreSQL by `LISTEN/NOTIFY`); the
//! table is rebuilt then and compared with the last one by host. [`REFRESH`]
//! is only a safety net that bounds staleness should a notification be lost.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use zeitwork_api_types::{Environment, Route, RouteCanary, RouteInstance, RouteShadow, RoutingDeltas, RoutingTable};
use zeitwork_store::{RoutingRows, Store};

/// How often the table is rebuilt without a change notification: a safety
/// net for a lost notification. Changes are seen at once.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Deltas kept for edges that resume; one further behind gets a snapshot.
pub const LOG_LEN: usize = 1024;

#[derive(Debug)]
struct Delta {
    seq: u64,
    /// Routes set (added or changed), by host.
    upserts: Vec<Arc<Route>>,
    /// Hosts no longer routed.
    removed: Vec<String>,
}

#[derive(Debug)]
struct Log {
    /// The table after the newest delta, by host.
    hosts: BTreeMap<String, Arc<Route>>,
    table: Arc<RoutingTable>,
    seq: u64,
    deltas: VecDeque<Delta>,
}

#[derive(Debug)]
pub struct RoutingHub {
    table: watch::Sender<Arc<RoutingTable>>,
    log: RwLock<Log>,
    /// The newest sequence number, for waiting edges.
    seq: watch::Sender<u64>,
    /// Names this operator's log: a cursor from another operator, or from
    /// before a restart, is a gap (the edge gets a snapshot).
    epoch: String,
    nudge: Notify,
}

impl RoutingHub {
    pub fn new(apps_domain: &str) -> Arc<Self> {
        let empty = Arc::new(build(
            &RoutingRows { deployments: vec![], current: vec![], domains: vec![], canaries: vec![], shadows: vec![] },
            apps_domain,
        ));
        Arc::new(Self {
            table: watch::Sender::new(empty.clone()),
            log: RwLock::new(Log { hosts: BTreeMap::new(), table: empty, seq: 0, deltas: VecDeque::new() }),
            seq: watch::Sender::new(0),
            epoch: zeitwork_store::nanoid(8),
            nudge: Notify::new(),
        })
    }

    pub fn current(&self) -> Arc<RoutingTable> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.table.subscribe()
    }

    /// Rebuild now (after a change the store does not announce, such as a certificate).
    pub fn changed(&self) {
        self.nudge.notify_one();
    }

    /// Publishes `table` if it differs from the last one: appends a delta to the log.
    pub fn publish(&self, table: RoutingTable) {
        let mut log = self.log.write().unwrap_or_else(|e| e.into_inner());
        if log.table.version == table.version {
            return;
        }
        let mut next: BTreeMap<String, Arc<Route>> = BTreeMap::new();
        let mut upserts = Vec::new();
        for r in table.routes.iter() {
            let route = match log.hosts.get(&r.host) {
                Some(old) if **old == *r => old.clone(),
                _ => {
                    let new = Arc::new(r.clone());
                    upserts.push(new.clone());
                    new
                }
            };
            next.insert(r.host.clone(), route);
        }
        let removed: Vec<String> = log.hosts.keys().filter(|h| !next.contains_key(*h)).cloned().collect();
        let apps_changed = log.table.apps_domain != table.apps_domain;
        tracing::debug!(version = %table.version, routes = table.routes.len(), set = upserts.len(), removed = removed.len(),
            "routing table changed");
        let seq = log.seq + 1;
        log.seq = seq;
        log.hosts = next;
        if apps_changed {
            // Deltas cannot carry a new apps domain: edges behind take a snapshot.
            log.deltas.clear();
        } else {
            log.deltas.push_back(Delta { seq, upserts, removed });
            while log.deltas.len() > LOG_LEN {
                log.deltas.pop_front();
            }
        }
        let table = Arc::new(table);
        log.table = table.clone();
        drop(log);
        self.table.send_replace(table);
        self.seq.send_replace(seq);
    }

    /// What an edge at `cursor` needs: the deltas after it merged into one,
    /// or the whole table when the cursor is absent, from another operator or
    /// older than the log. Waits up to `timeout` while there is nothing new.
    pub async fn deltas(&self, cursor: Option<&str>, timeout: Duration) -> RoutingDeltas {
        let since = cursor
            .and_then(|c| c.split_once('.'))
            .filter(|(e, _)| *e == self.epoch)
            .and_then(|(_, s)| s.parse::<u64>().ok());
        if let Some(since) = since {
            let mut rx = self.seq.subscribe();
            let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s != since)).await;
        }
        let log = self.log.read().unwrap_or_else(|e| e.into_inner());
        let cursor = format!("{}.{}", self.epoch, log.seq);
        let base = RoutingDeltas {
            cursor,
            version: log.table.version.clone(),
            apps_domain: log.table.apps_domain.clone(),
            snapshot: false,
            routes: Vec::new(),
            removed: Vec::new(),
        };
        let oldest = log.deltas.front().map_or(log.seq + 1, |d| d.seq);
        match since {
            Some(since) if since == log.seq => base,
            // Every delta after `since` is still kept.
            Some(since) if since < log.seq && since + 1 >= oldest => {
                let mut merged: BTreeMap<&str, Option<&Arc<Route>>> = BTreeMap::new();
                for d in log.deltas.iter().filter(|d| d.seq > since) {
                    for r in &d.upserts {
                        merged.insert(&r.host, Some(r));
                    }
                    for h in &d.removed {
                        merged.insert(h, None);
                    }
                }
                let mut out = base;
                for (host, r) in merged {
                    match r {
                        Some(r) => out.routes.push((**r).clone()),
                        None => out.removed.push(host.to_owned()),
                    }
                }
                out
            }
            _ => RoutingDeltas { snapshot: true, routes: log.table.routes.clone(), ..base },
        }
    }

    /// Rebuilds the table whenever the store changes (and every [`REFRESH`]) until `stop` turns true.
    pub async fn run(self: Arc<Self>, store: Store, apps_domain: String, mut stop: watch::Receiver<bool>) {
        let mut changes = store.changes();
        loop {
            changes.mark_unchanged();
            match store.routing_rows().await {
                Ok(rows) => self.publish(build(&rows, &apps_domain)),
                Err(e) => tracing::warn!(error = %e, "cannot rebuild the routing table; keeping the last one"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = changes.changed() => {}
                _ = self.nudge.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Builds the table: `<deployment>.<apps>` for every deployment with ready
/// instances, `<project>-<org>.<apps>` for production's active deployment,
/// `<project>-pr-<n>-<org>.<apps>` for pull request `n`'s preview,
/// and custom domains for their environment's active deployment.
///
/// Addresses are reserved in the store so two routes never claim one host;
/// should one still appear twice (a custom domain equal to another project's
/// address), the first claim in that order keeps it and the other is refused
/// with a warning naming both, never silently replaced.
pub fn build(rows: &RoutingRows, apps_domain: &str) -> RoutingTable {
    let by_id: HashMap<&str, &zeitwork_store::RoutedDeployment> =
        rows.deployments.iter().map(|d| (d.id.as_str(), d)).collect();
    let route = |host: String, d: &zeitwork_store::RoutedDeployment, env: Option<Environment>| Route {
        acme: false,
        host,
        deployment: d.id.clone(),
        org: d.org.clone(),
        project: d.project.clone(),
        environment: env,
        rate_limit: d.rate_limit,
        instances: d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect(),
        wake: d.wake,
        gone: d.gone,
        // A deployment's own host says where it may stand in (skew protection);
        // its environment's stable hosts say for how long a client stays pinned.
        served: if env.is_none() { d.served.clone() } else { Vec::new() },
        skew_max_age_secs: env.filter(|e| *e != Environment::Preview).and(d.skew_max_age_secs),
        canary: None,
        shadow: None,
    };
    // An environment in a canary rollout sends a share of its clients to the candidate,
    // once the candidate has ready instances.
    let canaries: HashMap<(&str, &str, Environment), RouteCanary> = rows
        .canaries
        .iter()
        .filter_map(|c| {
            let d = by_id.get(c.deployment.as_str()).filter(|d| !d.instances.is_empty() && c.weight > 0)?;
            let instances =
                d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect();
            Some((
                (c.org.as_str(), c.project.as_str(), c.environment),
                RouteCanary { deployment: c.deployment.clone(), weight: c.weight, instances },
            ))
        })
        .collect();
    let canary_of = |org: &str, project: &str, env: Environment| canaries.get(&(org, project, env)).cloned();
    // An environment in its shadow stage copies a share of its requests to the
    // candidate, once the candidate has ready instances.
    let shadows: HashMap<(&str, &str, Environment), RouteShadow> = rows
        .shadows
        .iter()
        .filter_map(|s| {
            let d = by_id.get(s.deployment.as_str()).filter(|d| !d.instances.is_empty())?;
            let instances =
                d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect();
            Some((
                (s.org.as_str(), s.project.as_str(), s.environment),
                RouteShadow {
                    deployment: s.deployment.clone(),
                    share: s.shadow.share,
                    all_methods: s.shadow.all_methods,
                    instances,
                },
            ))
        })
        .collect();
    let shadow_of =
        |org: &str, project: &str, env: Environment| shadows.get(&(org, project, env)).cloned().map(Box::new);
    let mut routes: Vec<Route> =
        rows.deployments.iter().map(|d| route(format!("{}.{apps_domain}", d.id), d, None)).collect();
    let mut active: HashMap<(&str, &str, Environment), &str> = HashMap::new();
    for c in &rows.current {
        if c.pull_request.is_none() {
            active.insert((&c.org, &c.project, c.environment), &c.deployment);
        }
        let stable = match (c.environment, c.pull_request) {
            (Environment::Production, _) => Some(format!("{}-{}", c.project, c.org)),
            (Environment::Preview, Some(n)) => Some(zeitwork_store::preview_label(&c.project, n, &c.org)),
            _ => None,
        };
        if let (Some(label), true) = (stable, c.owns_stable_host) {
            if let Some(d) = by_id.get(c.deployment.as_str()) {
                let (canary, shadow) = if c.pull_request.is_none() {
                    (canary_of(&c.org, &c.project, c.environment), shadow_of(&c.org, &c.project, c.environment))
                } else {
                    (None, None)
                };
                routes.push(Route {
                    canary,
                    shadow,
                    ..route(format!("{label}.{apps_domain}"), d, Some(c.environment))
                });
            }
        }
    }
    // A custom domain is routed only once its ownership is verified.
    for (domain, org, project, env, verified) in rows.domains.iter().filter(|d| d.4) {
        if let Some(d) = active.get(&(org.as_str(), project.as_str(), *env)).and_then(|id| by_id.get(id)) {
            let (canary, shadow) = (canary_of(org, project, *env), shadow_of(org, project, *env));
            routes.push(Route { acme: *verified, canary, shadow, ..route(domain.clone(), d, Some(*env)) });
        }
    }
    let mut seen: HashMap<String, (String, String)> = HashMap::new();
    routes.retain(|r| match seen.get(&r.host) {
        None => {
            seen.insert(r.host.clone(), (r.org.clone(), r.project.clone()));
            true
        }
        Some((org, project)) => {
            if (org, project) != (&r.org, &r.project) {
                tracing::warn!(host = %r.host, kept = %format!("{org}/{project}"), refused = %format!("{}/{}", r.org, r.project),
                    "two projects claim one host; the first claim keeps it");
            }
            false
        }
    });
    routes.sort_by(|a, b| a.host.cmp(&b.host));
    let digest = Sha256::digest(serde_json::to_vec(&(&routes, apps_domain)).unwrap_or_default());
    RoutingTable { version: hex::encode(&digest[..8]), apps_domain: apps_domain.to_owned(), routes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, deployment: &str) -> Route {
        Route {
            acme: false,
            host: host.into(),
            deployment: deployment.into(),
            org: "acme".into(),
            project: "web".into(),
            environment: None,
            rate_limit: None,
            instances: vec![RouteInstance { id: format!("ins-{deployment}"), upstream: "http://n:1".into() }],
            wake: false,
            gone: false,
            served: vec![],
            skew_max_age_secs: None,
            canary: None,
            shadow: None,
        }
    }

    fn table(version: &str, routes: &[(&str, &str)]) -> RoutingTable {
        RoutingTable {
            version: version.into(),
            apps_domain: "apps.test".into(),
            routes: routes.iter().map(|(h, d)| route(h, d)).collect(),
        }
    }

    #[tokio::test]
    async fn edges_get_a_snapshot_then_only_what_changed() {
        let hub = RoutingHub::new("apps.test");
        hub.publish(table("v1", &[("a.apps.test", "d1"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
        let first = hub.deltas(None, Duration::from_secs(1)).await;
        assert!(first.snapshot);
        assert_eq!(first.routes.len(), 3);
        assert_eq!(first.version, "v1");

        // A switch of `a`, `c` gone, `d` new; `b` unchanged is not sent again.
        hub.publish(table("v2", &[("a.apps.test", "d3"), ("b.apps.test", "d1"), ("d.apps.test", "d3")]));
        let next = hub.deltas(Some(&first.cursor), Duration::from_secs(1)).await;
        assert!(!next.snapshot);
        assert_eq!(next.version, "v2");
        let set: Vec<(&str, &str)> = next.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
        assert_eq!(set, [("a.apps.test", "d3"), ("d.apps.test", "d3")]);
        assert_eq!(next.removed, ["c.apps.test"]);

        // Two changes behind: merged into one answer, the later change winning.
        hub.publish(table("v3", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("d.apps.test", "d3")]));
        hub.publish(table("v4", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
        let merged = hub.deltas(Some(&next.cursor), Duration::from_secs(1)).await;
        assert!(!merged.snapshot);
        let set: Vec<(&str, &str)> = merged.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
        assert_eq!(set, [("a.apps.test", "d4"), ("c.apps.test", "d2")]);
        assert_eq!(merged.removed, ["d.apps.test"]);
        assert_eq!(merged.version, "v4");

        // The same table again is no change.
        hub.publish(table("v4", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
        assert_eq!(hub.deltas(None, Duration::from_secs(1)).await.cursor, merged.cursor);
    }

    #[tokio::test]
    async fn a_cursor_it_cannot_resume_from_gets_the_whole_table() {
        let hub = RoutingHub::new("apps.test");
        hub.publish(table("v0", &[("a.apps.test", "d0")]));
        let old = hub.deltas(None, Duration::from_secs(1)).await;
        // Further behind than the log reaches.
        for i in 1..=LOG_LEN + 1 {
            hub.publish(table(&format!("v{i}"), &[("a.apps.test", &format!("d{i}"))]));
        }
        let behind = hub.deltas(Some(&old.cursor), Duration::from_secs(1)).await;
        assert!(behind.snapshot, "a gap is answered with the whole table");
        assert_eq!(behind.routes[0].deployment, format!("d{}", LOG_LEN + 1));
        // Another operator's (or a restarted one's) cursor, or nonsense.
        let seq = behind.cursor.split_once('.').unwrap().1;
        for cursor in [format!("other.{seq}"), "garbage".to_owned(), format!("{}.999999", hub.epoch)] {
            let d = hub.deltas(Some(&cursor), Duration::from_secs(1)).await;
            assert!(d.snapshot, "{cursor} is not resumable");
            assert_eq!(d.routes.len(), 1);
        }
        // The newest cursor is resumable.
        hub.publish(table("vx", &[("b.apps.test", "dx")]));
        let d = hub.deltas(Some(&behind.cursor), Duration::from_secs(1)).await;
        assert!(!d.snapshot);
        assert_eq!(d.removed, ["a.apps.test"]);
    }

    #[tokio::test]
    async fn a_waiting_edge_is_answered_by_the_change() {
        let hub = RoutingHub::new("apps.test");
        hub.publish(table("v1", &[("a.apps.test", "d1")]));
        let at = hub.deltas(None, Duration::from_secs(1)).await.cursor;
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { hub.deltas(Some(&at), Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        hub.publish(table("v2", &[("a.apps.test", "d2")]));
        let d = waiting.await.unwrap();
        assert!(!d.snapshot);
        assert_eq!(d.routes[0].deployment, "d2");
    }
}
