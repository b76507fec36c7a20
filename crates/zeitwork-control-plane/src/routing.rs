//! The routing table the edge proxies follow: kept by each operator in
//! memory and changed in place, each change one delta in a bounded log, so
//! every edge watching learns of a change in one round trip and receives only
//! what changed.
//!
//! The store wakes the hub after every change to routing state (through this
//! operator at once; through others on PostgreSQL by `LISTEN/NOTIFY`) and
//! says what the change touched: some deployments or some projects. The hub
//! reads the routes of those projects only (by indexes), puts them in place
//! of the ones the table held for those projects, and appends what differed
//! to the log. The cost of a change follows the change, not the size of the
//! table: nothing is copied, hashed or compared whole. The table's version is
//! the cursor of the change that made it (this operator's epoch and a
//! sequence number), so it changes whenever a route does.
//!
//! The whole table is read apart from that: at start, after a change the
//! store does not describe (a node, a certificate, announcements lost or too
//! far behind) or one that cannot be applied in place (two projects claiming
//! one host), and as a safety net should a notification be lost, at least
//! every [`REFRESH`] (or [`WHOLE_READ_SPACING`] times as long as a whole read
//! takes, when that is longer, so it keeps to a small share of a core). A
//! whole read never holds up a change: it runs in a task of its own, replaces
//! only the routes of projects not read again since it began, and publishes
//! only what differs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use zeitwork_api_types::{Environment, Route, RouteCanary, RouteInstance, RouteShadow, RoutingDeltas, RoutingTable};
use zeitwork_store::{Change, RoutingRows, Store, StoreError};

/// How soon after a whole read the next one runs without a reason: the
/// safety net for a lost notification. Changes are applied at once.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A whole read waits at least this many times as long as the last one took:
/// on a small cluster the safety net runs every [`REFRESH`], at 10,000 nodes
/// (a few hundred milliseconds of the database's time per read) every several
/// seconds, so it keeps to some 3% of the time. Notifications are sent in the
/// transaction of the change they announce, so the net is rarely needed.
pub const WHOLE_READ_SPACING: u32 = 30;

/// Deltas kept for edges that resume; one further behind gets a snapshot.
pub const LOG_LEN: usize = 1024;

/// How [`RoutingHub::refresh`] brought the table up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// Nothing it routes changed.
    Unchanged,
    /// The routes of the projects that changed were read and put in place.
    Applied,
    /// The whole table was read.
    Rebuilt,
}

/// A project as its routes name it: (org, name).
type ProjectKey = (String, String);

fn key_of(r: &Route) -> ProjectKey {
    (r.org.clone(), r.project.clone())
}

#[derive(Debug)]
struct Delta {
    seq: u64,
    /// Routes set (added or changed).
    upserts: Vec<Arc<Route>>,
    /// Hosts no longer routed.
    removed: Vec<String>,
}

/// What one change does to the table.
#[derive(Debug, Default)]
struct Edit {
    upserts: Vec<Arc<Route>>,
    removed: Vec<String>,
}

/// The routes one project has in the table.
#[derive(Debug, Default)]
struct Held {
    hosts: BTreeSet<String>,
    /// The store's change counter taken before the read they came from:
    /// every change up to it is in them.
    read_at: u64,
}

#[derive(Debug)]
struct Table {
    apps_domain: String,
    /// Every route, by host.
    hosts: BTreeMap<String, Arc<Route>>,
    /// Which hosts each project has (a project read without routes keeps an
    /// entry for its `read_at` until a later whole read).
    projects: HashMap<ProjectKey, Held>,
    /// The newest delta's sequence number.
    seq: u64,
    version: String,
    deltas: VecDeque<Delta>,
    /// The last whole read refused a host claimed by two projects: which
    /// claim wins depends on every project, so changes are read whole until
    /// no two projects claim one host.
    contested: bool,
}

impl Table {
    fn read_at(&self, key: &ProjectKey) -> u64 {
        self.projects.get(key).map_or(0, |h| h.read_at)
    }

    /// Whether `routes` are exactly the routes the table has for `key`.
    fn holds(&self, key: &ProjectKey, routes: &[Route]) -> bool {
        let held = self.projects.get(key).map_or(0, |h| h.hosts.len());
        held == routes.len() && routes.iter().all(|r| self.hosts.get(&r.host).is_some_and(|old| **old == *r))
    }

    /// The project that has `host`, unless it is `key`.
    fn other_owner(&self, host: &str, key: &ProjectKey) -> Option<ProjectKey> {
        self.hosts
            .get(host)
            .filter(|r| (r.org.as_str(), r.project.as_str()) != (key.0.as_str(), key.1.as_str()))
            .map(|r| key_of(r))
    }

    /// Gives each project of `set` exactly the routes listed with it, from a
    /// read after change counter `read_at`; returns what differed.
    fn replace(&mut self, set: Vec<(ProjectKey, Vec<Route>)>, read_at: u64) -> Edit {
        let mut edit = Edit::default();
        // Their hosts are freed first, so a host moving between two of them is set, not removed.
        let mut freed = BTreeSet::new();
        for (key, _) in &set {
            if let Some(held) = self.projects.get_mut(key) {
                freed.append(&mut held.hosts);
            }
        }
        for (key, routes) in set {
            let mut hosts = BTreeSet::new();
            for r in routes {
                freed.remove(&r.host);
                hosts.insert(r.host.clone());
                if self.hosts.get(&r.host).is_some_and(|old| **old == r) {
                    continue;
                }
                if let Some(from) = self.other_owner(&r.host, &key) {
                    if let Some(held) = self.projects.get_mut(&from) {
                        held.hosts.remove(&r.host);
                    }
                }
                let r = Arc::new(r);
                self.hosts.insert(r.host.clone(), r.clone());
                edit.upserts.push(r);
            }
            let held = self.projects.entry(key).or_default();
            held.hosts = hosts;
            held.read_at = held.read_at.max(read_at);
        }
        for host in freed {
            self.hosts.remove(&host);
            edit.removed.push(host);
        }
        edit
    }

    /// Makes `edit` the next delta (a new apps domain: a new table that edges
    /// behind take as a snapshot); returns its sequence number, or `None`
    /// when nothing changed.
    fn commit(&mut self, edit: Edit, apps_changed: bool, epoch: &str) -> Option<u64> {
        if edit.upserts.is_empty() && edit.removed.is_empty() && !apps_changed {
            return None;
        }
        self.seq += 1;
        self.version = format!("{epoch}.{}", self.seq);
        tracing::debug!(
            seq = self.seq,
            routes = self.hosts.len(),
            set = edit.upserts.len(),
            removed = edit.removed.len(),
            "routing table changed"
        );
        if apps_changed {
            // Deltas cannot carry a new apps domain.
            self.deltas.clear();
        } else {
            self.deltas.push_back(Delta { seq: self.seq, upserts: edit.upserts, removed: edit.removed });
            while self.deltas.len() > LOG_LEN {
                self.deltas.pop_front();
            }
        }
        Some(self.seq)
    }
}

/// What a whole read found: each project whose routes differ from the
/// table's, with all its routes (none: it has none now).
#[derive(Debug)]
struct WholeRead {
    /// The store's change counter taken before reading.
    mark: u64,
    apps_domain: String,
    contested: bool,
    differ: Vec<(ProjectKey, Vec<Route>)>,
}

#[derive(Debug)]
pub struct RoutingHub {
    table: RwLock<Table>,
    /// The whole table at one sequence number, made when first asked for.
    whole: Mutex<Option<(u64, Arc<RoutingTable>)>>,
    /// The newest sequence number, for waiting edges.
    seq: watch::Sender<u64>,
    /// Whether the table was read whole once: before, it is not known.
    built: watch::Sender<bool>,
    /// Names this operator's log: a cursor from another operator, or from
    /// before a restart, is a gap (the edge gets a snapshot).
    epoch: String,
    nudge: Notify,
}

/// What the running hub does next after applying changes.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Unchanged,
    Applied,
    /// What changed is not known, or cannot be applied in place: read the whole table.
    Whole,
}

impl RoutingHub {
    pub fn new(apps_domain: &str) -> Arc<Self> {
        let epoch = zeitwork_store::nanoid(8);
        Arc::new(Self {
            table: RwLock::new(Table {
                apps_domain: apps_domain.to_owned(),
                hosts: BTreeMap::new(),
                projects: HashMap::new(),
                seq: 0,
                version: format!("{epoch}.0"),
                deltas: VecDeque::new(),
                contested: false,
            }),
            whole: Mutex::new(None),
            seq: watch::Sender::new(0),
            built: watch::Sender::new(false),
            epoch,
            nudge: Notify::new(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole table (made once per change, when first asked for).
    pub fn current(&self) -> Arc<RoutingTable> {
        let (seq, version, apps_domain, routes) = {
            let t = self.read();
            let mut whole = self.whole.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, table)) = &*whole {
                if *at == t.seq {
                    return table.clone();
                }
            }
            *whole = None;
            // Only the routes' handles are taken while the table is held.
            (t.seq, t.version.clone(), t.apps_domain.clone(), t.hosts.values().cloned().collect::<Vec<_>>())
        };
        let table =
            Arc::new(RoutingTable { version, apps_domain, routes: routes.iter().map(|r| (**r).clone()).collect() });
        let mut whole = self.whole.lock().unwrap_or_else(|e| e.into_inner());
        if whole.as_ref().is_none_or(|(at, _)| *at < seq) {
            *whole = Some((seq, table.clone()));
        }
        table
    }

    /// The routes of one project, by host.
    pub fn routes_of(&self, org: &str, project: &str) -> Vec<Route> {
        let t = self.read();
        let Some(held) = t.projects.get(&(org.to_owned(), project.to_owned())) else { return Vec::new() };
        held.hosts.iter().filter_map(|h| t.hosts.get(h)).map(|r| (**r).clone()).collect()
    }

    /// Waits up to `timeout` for the table to be read whole once; whether it was.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut built = self.built.subscribe();
        let ready = matches!(tokio::time::timeout(timeout, built.wait_for(|b| *b)).await, Ok(Ok(_)));
        ready
    }

    /// The whole table once its version is not `known`, or after `timeout`.
    pub async fn watch(&self, known: &str, timeout: Duration) -> Arc<RoutingTable> {
        let mut seq = self.seq.subscribe();
        let _ = tokio::time::timeout(timeout, seq.wait_for(|_| self.read().version != known)).await;
        self.current()
    }

    /// Reads the whole table now (after a change the store does not announce, such as a certificate).
    pub fn changed(&self) {
        self.nudge.notify_one();
    }

    fn published(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.seq.send_replace(seq);
        }
    }

    /// Publishes `table` whole, with the version it carries, if that differs
    /// from the current one: appends a delta of what differs by host.
    pub fn publish(&self, table: RoutingTable) {
        let mut t = self.write();
        if t.version == table.version {
            return;
        }
        let mut set: HashMap<ProjectKey, Vec<Route>> = t.projects.keys().map(|k| (k.clone(), Vec::new())).collect();
        for r in table.routes {
            set.entry(key_of(&r)).or_default().push(r);
        }
        let read_at = t.projects.values().map(|h| h.read_at).max().unwrap_or(0);
        let edit = t.replace(set.into_iter().collect(), read_at);
        t.projects.retain(|_, h| !h.hosts.is_empty());
        let apps_changed = t.apps_domain != table.apps_domain;
        t.apps_domain = table.apps_domain;
        let seq = t.commit(edit, apps_changed, &self.epoch);
        if seq.is_some() {
            t.version = table.version;
        }
        drop(t);
        self.built.send_if_modified(|b| !std::mem::replace(b, true));
        self.published(seq);
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
        let (base, whole) = {
            let t = self.read();
            let base = RoutingDeltas {
                cursor: format!("{}.{}", self.epoch, t.seq),
                version: t.version.clone(),
                apps_domain: t.apps_domain.clone(),
                snapshot: false,
                routes: Vec::new(),
                removed: Vec::new(),
            };
            let oldest = t.deltas.front().map_or(t.seq + 1, |d| d.seq);
            match since {
                Some(since) if since == t.seq => return base,
                // Every delta after `since` is still kept.
                Some(since) if since < t.seq && since + 1 >= oldest => {
                    let mut merged: BTreeMap<&str, Option<&Arc<Route>>> = BTreeMap::new();
                    for d in t.deltas.iter().filter(|d| d.seq > since) {
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
                    return out;
                }
                // Only the routes' handles are taken while the table is held.
                _ => (base, t.hosts.values().cloned().collect::<Vec<_>>()),
            }
        };
        RoutingDeltas { snapshot: true, routes: whole.iter().map(|r| (**r).clone()).collect(), ..base }
    }

    /// Puts the routes built from `rows` (read for the projects `projects`
    /// only, after the store's change counter was `read_at`) in place of
    /// those projects' routes, and publishes what differs. Returns `false`,
    /// changing nothing, when that cannot give what a whole read would: a
    /// host is claimed by two projects (now, or at the last whole read) or by
    /// a project not read here, or the apps domain changed.
    pub fn apply(&self, projects: &[(String, String)], rows: &RoutingRows, apps_domain: &str, read_at: u64) -> bool {
        let (routes, contested) = build_checked(rows, apps_domain);
        let mut t = self.write();
        if contested || t.contested || t.apps_domain != apps_domain {
            return false;
        }
        let touched: HashSet<(&str, &str)> = projects.iter().map(|(o, p)| (o.as_str(), p.as_str())).collect();
        let ours = |r: &Route| touched.contains(&(r.org.as_str(), r.project.as_str()));
        if routes.iter().any(|r| !ours(r) || t.hosts.get(&r.host).is_some_and(|old| !ours(old))) {
            return false;
        }
        // A project read again since (by a whole read begun later) keeps that read.
        let mut set: HashMap<ProjectKey, Vec<Route>> =
            projects.iter().filter(|p| t.read_at(p) <= read_at).map(|p| (p.clone(), Vec::new())).collect();
        for r in routes {
            if let Some(list) = set.get_mut(&key_of(&r)) {
                list.push(r);
            }
        }
        let edit = t.replace(set.into_iter().collect(), read_at);
        let seq = t.commit(edit, false, &self.epoch);
        drop(t);
        self.published(seq);
        true
    }

    /// Compares a whole read with the table project by project, holding the
    /// table for one project at a time (changes go on meanwhile).
    fn compare_whole(&self, rows: &RoutingRows, apps_domain: &str, mark: u64) -> WholeRead {
        let (routes, contested) = build_checked(rows, apps_domain);
        let mut by_project: HashMap<ProjectKey, Vec<Route>> = HashMap::new();
        for r in routes {
            by_project.entry(key_of(&r)).or_default().push(r);
        }
        // Projects with routes in the table and none in the read.
        let mut differ: Vec<(ProjectKey, Vec<Route>)> = self
            .read()
            .projects
            .iter()
            .filter(|(k, h)| !h.hosts.is_empty() && h.read_at <= mark && !by_project.contains_key(*k))
            .map(|(k, _)| (k.clone(), Vec::new()))
            .collect();
        for (key, routes) in by_project {
            let same = {
                let t = self.read();
                t.read_at(&key) > mark || t.holds(&key, &routes)
            };
            if !same {
                differ.push((key, routes));
            }
        }
        WholeRead { mark, apps_domain: apps_domain.to_owned(), contested, differ }
    }

    /// Publishes what a whole read found, except for projects read again
    /// since it began. Returns whether another whole read is needed: a host
    /// it would give one project is held by a newer read of another, or two
    /// projects claimed one host while some were read again.
    fn apply_whole(&self, read: WholeRead) -> bool {
        let mut t = self.write();
        let taken: HashSet<ProjectKey> =
            read.differ.iter().filter(|(k, _)| t.read_at(k) <= read.mark).map(|(k, _)| k.clone()).collect();
        let mut again = false;
        let mut set = Vec::new();
        for (key, routes) in read.differ {
            if !taken.contains(&key) {
                again |= read.contested;
                continue;
            }
            if routes.iter().any(|r| t.other_owner(&r.host, &key).is_some_and(|o| !taken.contains(&o))) {
                again = true;
                continue;
            }
            set.push((key, routes));
        }
        let (changed, kept) = (set.len(), taken.len());
        let edit = t.replace(set, read.mark);
        // Projects without routes read before the whole read: nothing left to remember.
        t.projects.retain(|_, h| !h.hosts.is_empty() || h.read_at > read.mark);
        t.contested = read.contested;
        let apps_changed = t.apps_domain != read.apps_domain;
        t.apps_domain = read.apps_domain;
        let seq = t.commit(edit, apps_changed, &self.epoch);
        drop(t);
        tracing::debug!(projects_changed = changed, projects_differing = kept, again, "routing table read whole");
        self.built.send_if_modified(|b| !std::mem::replace(b, true));
        self.published(seq);
        again
    }

    /// Applies what the store announced after `seen` (advanced here) by
    /// reading the projects it touched; says when the whole table must be read.
    async fn apply_changes(&self, store: &Store, apps_domain: &str, seen: &mut u64) -> Result<Step, StoreError> {
        // Taken before reading: a change made meanwhile is seen again next time.
        let (latest, changes) = store.changes_since(*seen);
        let Some(changes) = changes else {
            *seen = latest;
            return Ok(Step::Whole);
        };
        let mut deployments = Vec::new();
        let mut projects = Vec::new();
        for c in &changes {
            match c {
                Change::Deployments(ids) => deployments.extend(ids.iter().cloned()),
                Change::Projects(ids) => projects.extend(ids.iter().cloned()),
                // A node's status decides which of its instances serve.
                Change::Nodes(_) | Change::Anything => {
                    *seen = latest;
                    return Ok(Step::Whole);
                }
            }
        }
        if deployments.is_empty() && projects.is_empty() {
            *seen = latest;
            return Ok(Step::Unchanged);
        }
        deployments.sort();
        deployments.dedup();
        projects.sort();
        projects.dedup();
        let read = store.routing_rows_of(&deployments, &projects).await?;
        *seen = latest;
        Ok(match read {
            Some((names, rows)) if self.apply(&names, &rows, apps_domain, latest) => Step::Applied,
            _ => Step::Whole,
        })
    }

    /// Brings the table up to date with the store: applies what changed since
    /// `seen` (the store's change counter, advanced here), or reads the whole
    /// table when `whole` or when what changed is not known.
    pub async fn refresh(
        &self,
        store: &Store,
        apps_domain: &str,
        seen: &mut u64,
        whole: bool,
    ) -> Result<Refreshed, StoreError> {
        if !whole {
            match self.apply_changes(store, apps_domain, seen).await? {
                Step::Unchanged => return Ok(Refreshed::Unchanged),
                Step::Applied => return Ok(Refreshed::Applied),
                Step::Whole => {}
            }
        }
        let mark = *store.changes().borrow();
        let rows = store.routing_rows().await?;
        self.apply_whole(self.compare_whole(&rows, apps_domain, mark));
        *seen = (*seen).max(mark);
        Ok(Refreshed::Rebuilt)
    }

    /// Reads the whole table and compares it with this one (in a task of its
    /// own: changes are applied meanwhile); also says how long that took.
    async fn read_whole(
        self: Arc<Self>,
        store: Store,
        apps_domain: String,
    ) -> Result<(WholeRead, Duration), StoreError> {
        let started = tokio::time::Instant::now();
        let mark = *store.changes().borrow();
        let rows = store.routing_rows().await?;
        let compared = tokio::task::spawn_blocking(move || self.compare_whole(&rows, &apps_domain, mark)).await;
        match compared {
            Ok(read) => Ok((read, started.elapsed())),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Keeps the table up to date with the store until `stop` turns true:
    /// applies every change it announces at once, and reads the whole table
    /// apart (see the module's documentation).
    pub async fn run(self: Arc<Self>, store: Store, apps_domain: String, mut stop: watch::Receiver<bool>) {
        let mut changes = store.changes();
        // What came before is in the first whole read.
        let mut seen = *changes.borrow_and_update();
        let mut whole: Option<tokio::task::JoinHandle<Result<(WholeRead, Duration), StoreError>>> = None;
        let mut whole_wanted = true;
        let mut next_whole = tokio::time::Instant::now();
        loop {
            changes.mark_unchanged();
            match self.apply_changes(&store, &apps_domain, &mut seen).await {
                Ok(Step::Whole) => whole_wanted = true,
                Ok(Step::Applied | Step::Unchanged) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot apply a change to the routing table; reading it whole");
                    whole_wanted = true;
                }
            }
            if whole.is_none() && (whole_wanted || tokio::time::Instant::now() >= next_whole) {
                whole_wanted = false;
                whole = Some(tokio::spawn(self.clone().read_whole(store.clone(), apps_domain.clone())));
            }
            tokio::select! {
                done = async { whole.as_mut().expect("a whole read is running").await }, if whole.is_some() => {
                    whole = None;
                    let wait = match done {
                        Ok(Ok((read, took))) => {
                            whole_wanted |= self.apply_whole(read);
                            REFRESH.max(took * WHOLE_READ_SPACING)
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot read the routing table; keeping the last one");
                            REFRESH
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading the routing table failed; keeping the last one");
                            REFRESH
                        }
                    };
                    next_whole = tokio::time::Instant::now() + wait;
                }
                _ = tokio::time::sleep_until(next_whole), if whole.is_none() => {}
                _ = changes.changed() => {}
                // A change the store does not announce (a certificate): everything is read again.
                _ = self.nudge.notified() => whole_wanted = true,
                _ = stop.wait_for(|s| *s) => {
                    if let Some(w) = whole {
                        w.abort();
                    }
                    return;
                }
            }
        }
    }
}

/// The routes `rows` make, by host: `<deployment>.<apps>` for every deployment with ready
/// instances, `<project>-<org>.<apps>` for production's active deployment,
/// `<project>-pr-<n>-<org>.<apps>` for pull request `n`'s preview,
/// and custom domains for their environment's active deployment.
///
/// Addresses are reserved in the store so two routes never claim one host;
/// should one still appear twice (a custom domain equal to another project's
/// address), the first claim in that order keeps it and the other is refused
/// with a warning naming both, never silently replaced.
pub fn build(rows: &RoutingRows, apps_domain: &str) -> Vec<Route> {
    build_checked(rows, apps_domain).0
}

/// [`build`], and whether two projects claimed one host.
fn build_checked(rows: &RoutingRows, apps_domain: &str) -> (Vec<Route>, bool) {
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
    (routes, contested)
}

#[cfg(test)]
mod tests;
