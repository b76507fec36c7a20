//! The routing table the edge proxies follow: built from the store when it
//! changes, versioned by content, and kept as one bounded log of deltas per
//! operator, so every edge watching learns of a change in one round trip and
//! receives only what changed.
//!
//! The store wakes the hub after every change to routing state (through this
//! operator at once; through others on PostgreSQL by `LISTEN/NOTIFY`), and
//! says what the change touched. A change to some deployments or projects is
//! applied to the table by reading and rebuilding the routes of those
//! projects only; anything else (a node, a certificate, a change the store
//! does not describe, announcements lost or too far behind) rebuilds the
//! whole table. Either way the table is compared with the last one by host,
//! so edges receive what changed. [`REFRESH`] is a safety net: a whole
//! rebuild at least that often bounds staleness should a notification be lost.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use zeitwork_api_types::{Environment, Route, RouteCanary, RouteInstance, RouteShadow, RoutingDeltas, RoutingTable};
use zeitwork_store::{Change, RoutingRows, Store};

/// How often the table is rebuilt without a change notification: a safety
/// net for a lost notification. Changes are seen at once.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Deltas kept for edges that resume; one further behind gets a snapshot.
pub const LOG_LEN: usize = 1024;

/// How [`RoutingHub::refresh`] brought the table up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// Nothing it routes changed.
    Unchanged,
    /// The routes of the projects that changed were read and replaced.
    Applied,
    /// The whole table was read and rebuilt.
    Rebuilt,
}

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
    /// The last whole rebuild refused a host claimed by two projects: which
    /// claim wins depends on every project, so changes rebuild the whole table
    /// until no two projects claim one host.
    contested: bool,
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
            log: RwLock::new(Log {
                hosts: BTreeMap::new(),
                table: empty,
                seq: 0,
                deltas: VecDeque::new(),
                contested: false,
            }),
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

    /// Rebuilds the whole table from `rows` and publishes it.
    pub fn rebuild(&self, rows: &RoutingRows, apps_domain: &str) {
        let (table, contested) = build_checked(rows, apps_domain);
        self.log.write().unwrap_or_else(|e| e.into_inner()).contested = contested;
        self.publish(table);
    }

    /// Replaces the routes of `projects` (org, name) by those built from
    /// `rows` (read for those projects only) and publishes the result.
    /// Returns `false`, changing nothing, when that cannot give what a whole
    /// rebuild would: a host is claimed by two projects (now, or at the last
    /// whole rebuild), or the apps domain changed.
    pub fn apply(&self, projects: &[(String, String)], rows: &RoutingRows, apps_domain: &str) -> bool {
        let (part, contested) = build_checked(rows, apps_domain);
        let log = self.log.read().unwrap_or_else(|e| e.into_inner());
        if contested || log.contested || log.table.apps_domain != apps_domain {
            return false;
        }
        let touched: std::collections::HashSet<(&str, &str)> =
            projects.iter().map(|(o, p)| (o.as_str(), p.as_str())).collect();
        let ours = |r: &Route| touched.contains(&(r.org.as_str(), r.project.as_str()));
        // Every new route must belong to a project named, and its host must not be another project's.
        if part.routes.iter().any(|r| !ours(r) || log.hosts.get(&r.host).is_some_and(|old| !ours(old))) {
            return false;
        }
        let mut routes: Vec<Route> = log.hosts.values().filter(|r| !ours(r)).map(|r| (**r).clone()).collect();
        drop(log);
        routes.extend(part.routes);
        routes.sort_by(|a, b| a.host.cmp(&b.host));
        self.publish(table_of(routes, apps_domain));
        true
    }

    /// Brings the table up to date with the store: applies what changed since
    /// `seen` (the store's change counter, advanced here), or rebuilds the
    /// whole table when `whole` or when what changed is not known.
    pub async fn refresh(
        &self,
        store: &Store,
        apps_domain: &str,
        seen: &mut u64,
        whole: bool,
    ) -> Result<Refreshed, zeitwork_store::StoreError> {
        // Taken before reading: a change made meanwhile is seen again next time.
        let (latest, changes) = store.changes_since(*seen);
        let mut deployments = Vec::new();
        let mut projects = Vec::new();
        let mut known = !whole;
        for c in changes.iter().flatten() {
            match c {
                Change::Deployments(ids) => deployments.extend(ids.iter().cloned()),
                Change::Projects(ids) => projects.extend(ids.iter().cloned()),
                Change::Anything => known = false,
            }
        }
        if known && changes.is_some() {
            if deployments.is_empty() && projects.is_empty() {
                *seen = latest;
                return Ok(Refreshed::Unchanged);
            }
            deployments.sort();
            deployments.dedup();
            projects.sort();
            projects.dedup();
            let (names, rows) = store.routing_rows_of(&deployments, &projects).await?;
            if self.apply(&names, &rows, apps_domain) {
                *seen = latest;
                return Ok(Refreshed::Applied);
            }
        }
        let rows = store.routing_rows().await?;
        self.rebuild(&rows, apps_domain);
        *seen = latest;
        Ok(Refreshed::Rebuilt)
    }

    /// Keeps the table up to date with the store until `stop` turns true: on
    /// every change it announces (and on [`RoutingHub::changed`]), and
    /// rebuilt whole at least every [`REFRESH`].
    pub async fn run(self: Arc<Self>, store: Store, apps_domain: String, mut stop: watch::Receiver<bool>) {
        let mut changes = store.changes();
        let mut seen = 0;
        let mut whole = true;
        let mut last_whole = tokio::time::Instant::now();
        loop {
            changes.mark_unchanged();
            let started = tokio::time::Instant::now();
            let due = whole || started.duration_since(last_whole) >= REFRESH;
            whole = false;
            match self.refresh(&store, &apps_domain, &mut seen, due).await {
                Ok(_) if due => last_whole = started,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot update the routing table; keeping the last one");
                    // Tried again whole on the next change, or after REFRESH (not at once).
                    whole = true;
                    last_whole = started;
                }
            }
            let next_whole = last_whole + REFRESH;
            tokio::select! {
                _ = tokio::time::sleep_until(next_whole) => {}
                _ = changes.changed() => {}
                // A change the store does not announce (a certificate): everything is read again.
                _ = self.nudge.notified() => whole = true,
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
    build_checked(rows, apps_domain).0
}

/// [`build`], and whether two projects claimed one host.
fn build_checked(rows: &RoutingRows, apps_domain: &str) -> (RoutingTable, bool) {
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
    let mut contested = false;
    routes.retain(|r| match seen.get(&r.host) {
        None => {
            seen.insert(r.host.clone(), (r.org.clone(), r.project.clone()));
            true
        }
        Some((org, project)) => {
            if (org, project) != (&r.org, &r.project) {
                tracing::warn!(host = %r.host, kept = %format!("{org}/{project}"), refused = %format!("{}/{}", r.org, r.project),
                    "two projects claim one host; the first claim keeps it");
                contested = true;
            }
            false
        }
    });
    routes.sort_by(|a, b| a.host.cmp(&b.host));
    (table_of(routes, apps_domain), contested)
}

/// The table of `routes` (sorted by host), versioned by its content.
fn table_of(routes: Vec<Route>, apps_domain: &str) -> RoutingTable {
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

    /// A store with region `eu`, one node, org `acme` and the projects named.
    async fn store_with(projects: &[&str]) -> (tempfile::TempDir, Store, String, Vec<zeitwork_api_types::Project>) {
        use zeitwork_api_types::{Capacity, CreateRegion, RegisterNode, Resources};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
        let a = || zeitwork_store::Audit::new("test", "test", "x");
        let region = CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() };
        store.create_region(&region, &a()).await.unwrap();
        let reg = RegisterNode {
            hostname: "n1".into(),
            region: "eu".into(),
            address: "http://127.0.0.1:1".into(),
            capacity: Capacity { vcpu: 64, memory: 65536 },
            physical: None,
            runtime: Some("container".into()),
            runtime_detail: None,
            tunnel: None,
        };
        let (node, _) = store.register_node(&reg, &a()).await.unwrap();
        store.create_org("acme", "acme", None, &a()).await.unwrap();
        let mut made = Vec::new();
        for name in projects {
            let p = zeitwork_store::NewProject {
                org: "acme".into(),
                name: (*name).into(),
                github_repo: None,
                branch: "main".into(),
                auto_deploy: false,
                port: 8080,
                resources: Resources { vcpu: 1, memory: 128 },
                instances_per_region: 1,
                regions: None,
                image_template: None,
                rate_limit: None,
                sleep_after_secs: 900,
                retain_deployments: 20,
                scaling: None,
                staging_branch: None,
                tag_pattern: None,
                build: Default::default(),
                auto_rollback: Default::default(),
                rollout: None,
                shadow: None,
            };
            made.push(store.create_project(&p, &a()).await.unwrap());
        }
        (dir, store, node.id, made)
    }

    /// A new deployment of `p` in `env`, with one instance on `node`.
    async fn deploy(store: &Store, p: &zeitwork_api_types::Project, env: Environment, node: &str) -> (String, String) {
        let id = format!("{}-{}-acme", p.name, zeitwork_store::nanoid(7));
        let new = zeitwork_store::NewDeployment {
            id: id.clone(),
            project_id: p.id.clone(),
            org: "acme".into(),
            project: p.name.clone(),
            environment: env,
            image: "registry.example.com/web:1".into(),
            commit_sha: None,
            commit_message: None,
            instances_per_region: 1,
            url: format!("http://{id}.apps.test"),
            created_by: None,
            pull_request: None,
            release_command: None,
            migration: false,
        };
        store.create_deployment(&new, &zeitwork_store::Audit::new("test", "test", "x")).await.unwrap();
        let i = store
            .create_instance(&zeitwork_store::NewInstance {
                deployment: id.clone(),
                node: Some(node.to_owned()),
                region: "eu".into(),
                resources: p.resources,
                runtime: None,
            })
            .await
            .unwrap();
        (id, i.id)
    }

    fn audit() -> zeitwork_store::Audit {
        zeitwork_store::Audit::new("test", "test", "x")
    }

    /// A switch of one project is read for that project only and reaches
    /// edges as exactly its routes; the table is the one a whole rebuild gives.
    #[tokio::test]
    async fn a_change_to_one_project_is_applied_as_exactly_its_delta() {
        use zeitwork_api_types::InstanceStatus;
        let (_dir, store, node, projects) = store_with(&["web", "api"]).await;
        for p in &projects {
            let (d, i) = deploy(&store, p, Environment::Production, &node).await;
            store.set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
            store.activate_deployment(&d, &audit()).await.unwrap();
        }
        let hub = RoutingHub::new("apps.test");
        let mut seen = 0;
        assert_eq!(hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap(), Refreshed::Rebuilt);
        let at = hub.deltas(None, Duration::from_secs(1)).await;
        assert_eq!(at.routes.len(), 4, "{:?}", at.routes);
        assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Unchanged);

        let (d, i) = deploy(&store, &projects[0], Environment::Production, &node).await;
        store.set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.3:8080"), None).await.unwrap();
        store.activate_deployment(&d, &audit()).await.unwrap();
        assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
        let delta = hub.deltas(Some(&at.cursor), Duration::from_secs(1)).await;
        assert!(!delta.snapshot);
        let set: Vec<(&str, &str)> = delta.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
        let own = format!("{d}.apps.test");
        let mut want = vec![(own.as_str(), d.as_str()), ("web-acme.apps.test", d.as_str())];
        want.sort();
        assert_eq!(set, want);
        assert!(delta.removed.is_empty(), "{:?}", delta.removed);
        assert_eq!(*hub.current(), build(&store.routing_rows().await.unwrap(), "apps.test"));

        // A verified custom domain of the other project: that one route.
        let at = delta.cursor;
        store.create_domain(&projects[1].id, "api.example.com", Environment::Production, &audit()).await.unwrap();
        store.verify_domain(&projects[1].id, "api.example.com", &audit()).await.unwrap();
        assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
        let delta = hub.deltas(Some(&at), Duration::from_secs(1)).await;
        let hosts: Vec<&str> = delta.routes.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["api.example.com"]);
        assert_eq!(*hub.current(), build(&store.routing_rows().await.unwrap(), "apps.test"));
    }

    /// After any sequence of changes, the table kept by applying changes is
    /// the table a whole rebuild gives (pseudo-random sequences, fixed seeds).
    #[tokio::test]
    async fn applying_changes_gives_what_a_whole_rebuild_gives() {
        use zeitwork_api_types::InstanceStatus;
        for seed in [1u64, 7, 42, 2026] {
            let (_dir, store, node, projects) = store_with(&["web", "api", "docs"]).await;
            let hub = RoutingHub::new("apps.test");
            let mut seen = 0;
            hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap();
            let mut rng = seed;
            let mut next = |n: usize| {
                // xorshift64
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % n as u64) as usize
            };
            let mut deployments: Vec<(String, String)> = Vec::new();
            let mut applied = 0;
            for step in 0..60 {
                let p = &projects[next(projects.len())];
                let pick =
                    |deployments: &[(String, String)], k: usize| deployments.get(k % deployments.len().max(1)).cloned();
                let op = next(7);
                let k = next(1000);
                let what = match op {
                    0 => {
                        let env = [Environment::Production, Environment::Staging][next(2)];
                        deployments.push(deploy(&store, p, env, &node).await);
                        "deploy"
                    }
                    1 => {
                        if let Some((_, i)) = pick(&deployments, k) {
                            store
                                .set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.9:8080"), None)
                                .await
                                .unwrap();
                        }
                        "ready"
                    }
                    2 => {
                        if let Some((d, _)) = pick(&deployments, k) {
                            // Refused for a deployment retired meanwhile: that changes nothing.
                            store.activate_deployment(&d, &audit()).await.ok();
                        }
                        "activate"
                    }
                    3 => {
                        if let Some((d, _)) = pick(&deployments, k) {
                            store.sleep_deployment(&d, "test", &audit()).await.unwrap();
                        }
                        "sleep"
                    }
                    4 => {
                        if let Some((_, i)) = pick(&deployments, k) {
                            store.retire_instance(&i, "test").await.unwrap();
                        }
                        "retire instance"
                    }
                    5 => {
                        let name = format!("{}-{}.example.com", p.name, k % 3);
                        if store.create_domain(&p.id, &name, Environment::Production, &audit()).await.is_ok() {
                            store.verify_domain(&p.id, &name, &audit()).await.unwrap();
                        }
                        "domain"
                    }
                    _ => {
                        if let Some((d, _)) = pick(&deployments, k) {
                            store.retire_deployment(&d, "test", &audit()).await.ok();
                        }
                        "retire"
                    }
                };
                if hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap() == Refreshed::Applied {
                    applied += 1;
                }
                let whole = build(&store.routing_rows().await.unwrap(), "apps.test");
                assert_eq!(*hub.current(), whole, "seed {seed}, step {step} ({what})");
            }
            assert!(applied > 20, "seed {seed}: only {applied} changes were applied without a whole rebuild");
        }
    }
}
