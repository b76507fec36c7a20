//! Assignment watches at scale: one task per operator follows what the store
//! announces, finds the nodes a change concerns in one indexed read, and wakes
//! only their long polls (`GET /api/v1/nodes/{id}/assignments?version=…`).
//!
//! Each node has a version here, bumped when a change may alter its
//! assignments. A long poll remembers the digest of its last answer with the
//! version it was read at; a poll that comes back with that digest while the
//! version is unchanged waits without reading anything, and at its timeout
//! answers `304 Not Modified`. So a waiting node costs no query until a change
//! concerns it: an announced deployment or project wakes the nodes holding its
//! instances (and those holding live instances of its projects, whose network
//! member lists change); a node's change wakes it and the nodes sharing a
//! project with it (their tunnel peers); an undescribed change or a gap in the
//! store's log wakes every node.
//!
//! Every change sends its `NOTIFY` inside its own transaction and a listener
//! that reconnects wakes every node, so no committed change goes unannounced;
//! as a safety net all the same, a remembered answer older than [`TRUST`] is
//! read again on the next poll, so no agent keeps a stale set for longer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::Instant;
use zeitwork_store::{Change, Store};

/// How long an answer's digest is trusted without a change that concerns
/// its node: the bound on staleness after a lost notification (plus one poll).
/// Each waiting node costs one read per this period: 10,000 nodes, 83 reads a second.
pub const TRUST: Duration = Duration::from_secs(120);

/// What a batch of announced changes concerns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Concern {
    pub deployments: BTreeSet<String>,
    pub projects: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
    /// Every node (an undescribed change, nodes not named, or a gap).
    pub all: bool,
}

impl Concern {
    /// What `changes` concern; `None` (the log no longer reaches back) is everything.
    pub fn of(changes: Option<Vec<Change>>) -> Self {
        let mut c = Concern::default();
        let Some(changes) = changes else {
            c.all = true;
            return c;
        };
        for change in changes {
            match change {
                Change::Deployments(ids) => c.deployments.extend(ids),
                Change::Projects(ids) => c.projects.extend(ids),
                Change::Nodes(ids) if !ids.is_empty() => c.nodes.extend(ids),
                Change::Nodes(_) | Change::Anything => c.all = true,
            }
        }
        c
    }

    fn is_empty(&self) -> bool {
        !self.all && self.deployments.is_empty() && self.projects.is_empty() && self.nodes.is_empty()
    }
}

#[derive(Debug)]
struct Slot {
    version: watch::Sender<u64>,
    /// The digest of the last answer, the version it was read at and when.
    answered: Option<(u64, String, Instant)>,
    /// The deployments of the last answer.
    deployments: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Slots {
    nodes: HashMap<String, Slot>,
    /// The nodes whose last answer held each deployment: woken when it
    /// changes even once their instance of it has stopped.
    holders: HashMap<String, BTreeSet<String>>,
}

/// How long a call waits for its turn to read before answering `503` with
/// `Retry-After` (below the agents' 60 s request timeout).
pub const QUEUE: Duration = Duration::from_secs(45);

/// How soon a call answered `503` should come back, in seconds.
pub const RETRY_AFTER: u64 = 3;

/// How many nodes' assignments an operator reads at once with `connections`
/// read connections: a quarter of them, at least four, at most half (four
/// on PostgreSQL's sixteen and on SQLite's eight). A node's read is a burst
/// of eight queries; with half of PostgreSQL's connections taken by such
/// bursts when a rollout woke its nodes, the API's calls queued for the
/// rest (see bench/control/README.md).
pub fn reading_turns(connections: usize) -> usize {
    (connections / 4).max(4).min(connections / 2).max(1)
}

/// The operator's assignment watches.
#[derive(Debug)]
pub struct AssignmentHub {
    slots: Mutex<Slots>,
    /// Turns to read a node's assignments ([`reading_turns`]), so that when
    /// thousands of agents ask together (an operator restart) or a rollout
    /// wakes many nodes, most connections stay free for the API and the
    /// engine, and the calls past it wait their turn instead of failing.
    pub reading: tokio::sync::Semaphore,
    /// How many turns there are.
    pub readers: usize,
    /// The private range: its first address and how many /24 networks it holds
    /// (parsed once; checked with the configuration).
    pub private: (std::net::Ipv4Addr, u32),
    /// Reads of a node's assignments for a watch or a plain call.
    pub reads: Counter,
    /// Long polls answered without a read (nothing concerned their node).
    pub unchanged: Counter,
    /// Node wake-ups sent by changes.
    pub wakes: Counter,
    /// Calls waiting for their turn to read.
    pub queued: prometheus_client::metrics::gauge::Gauge,
    /// Calls answered `503` after waiting [`QUEUE`] for a turn.
    pub busy: Counter,
}

/// Counts a call among the queued while it lives (also when its client leaves).
pub struct Queued<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Queued<'a> {
    pub fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Queued(gauge)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A long poll's view of its node: its version now, and a receiver that sees the next.
pub struct Watch {
    pub version: u64,
    pub rx: watch::Receiver<u64>,
}

impl AssignmentHub {
    /// Watches handing out addresses of the private range `private`, reading
    /// at most `readers` nodes at once.
    pub fn new(private: (std::net::Ipv4Addr, u32), readers: usize) -> Self {
        let readers = readers.max(1);
        AssignmentHub {
            slots: Mutex::default(),
            reading: tokio::sync::Semaphore::new(readers),
            readers,
            private,
            reads: Counter::default(),
            unchanged: Counter::default(),
            wakes: Counter::default(),
            queued: prometheus_client::metrics::gauge::Gauge::default(),
            busy: Counter::default(),
        }
    }

    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("assignment_reads", "Reads of a node's assignments (calls and woken watches)", self.reads.clone());
        r.register(
            "assignment_watches_unchanged",
            "Assignment long polls answered without a read: no change concerned their node",
            self.unchanged.clone(),
        );
        r.register(
            "assignment_wakes",
            "Assignment watches woken by a change that concerned their node",
            self.wakes.clone(),
        );
        r.register(
            "assignment_reads_queued",
            format!("Assignment calls waiting for their turn to read (at most {} read at once)", self.readers),
            self.queued.clone(),
        );
        r.register(
            "assignment_busy",
            "Assignment calls answered 503 after waiting their turn too long",
            self.busy.clone(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's version now (taken before reading its assignments, so a
    /// change committed meanwhile wakes the poll).
    pub fn watch(&self, node: &str) -> Watch {
        let mut slots = self.lock();
        let slot = slots.nodes.entry(node.to_owned()).or_insert_with(|| Slot {
            version: watch::Sender::new(0),
            answered: None,
            deployments: BTreeSet::new(),
        });
        let rx = slot.version.subscribe();
        let version = *rx.borrow();
        Watch { version, rx }
    }

    /// Whether `digest` is still the node's answer: nothing concerning the
    /// node was announced since it was read, and not longer ago than [`TRUST`].
    pub fn unchanged(&self, node: &str, digest: &str) -> bool {
        self.lock().nodes.get(node).is_some_and(|s| {
            s.answered
                .as_ref()
                .is_some_and(|(v, d, at)| *v == *s.version.borrow() && d == digest && at.elapsed() < TRUST)
        })
    }

    /// Remembers the answer read at `version`, holding `deployments` (unless
    /// a newer one is remembered).
    pub fn answered(&self, node: &str, version: u64, digest: String, deployments: BTreeSet<String>) {
        let mut slots = self.lock();
        let Slots { nodes, holders } = &mut *slots;
        let Some(slot) = nodes.get_mut(node) else { return };
        if slot.answered.as_ref().is_some_and(|(v, _, _)| *v > version) {
            return;
        }
        slot.answered = Some((version, digest, Instant::now()));
        for gone in slot.deployments.difference(&deployments) {
            if let Some(h) = holders.get_mut(gone) {
                h.remove(node);
                if h.is_empty() {
                    holders.remove(gone);
                }
            }
        }
        for new in deployments.difference(&slot.deployments) {
            holders.entry(new.clone()).or_default().insert(node.to_owned());
        }
        slot.deployments = deployments;
    }

    /// The nodes whose last answer held one of `deployments`.
    pub fn holders(&self, deployments: &BTreeSet<String>) -> BTreeSet<String> {
        let slots = self.lock();
        deployments.iter().filter_map(|d| slots.holders.get(d)).flatten().cloned().collect()
    }

    /// Wakes the watches of `nodes` (every node with `None`).
    pub fn wake(&self, nodes: Option<&BTreeSet<String>>) {
        let slots = self.lock();
        let mut woken = 0;
        let mut bump = |slot: &Slot| {
            slot.version.send_modify(|v| *v += 1);
            woken += slot.version.receiver_count() as u64;
        };
        match nodes {
            None => slots.nodes.values().for_each(&mut bump),
            Some(nodes) => nodes.iter().filter_map(|n| slots.nodes.get(n)).for_each(&mut bump),
        }
        self.wakes.inc_by(woken);
    }

    /// Forgets the nodes that no call waits for and that were last answered
    /// `age` ago or more (deleted nodes, agents gone): their next poll, if
    /// any, is read again. Returns how many were forgotten.
    pub fn prune(&self, age: Duration) -> usize {
        let mut slots = self.lock();
        let Slots { nodes, holders } = &mut *slots;
        let idle = |s: &Slot| {
            s.version.receiver_count() == 0 && s.answered.as_ref().is_none_or(|(_, _, at)| at.elapsed() >= age)
        };
        let gone: Vec<String> = nodes.iter().filter(|(_, s)| idle(s)).map(|(n, _)| n.clone()).collect();
        for node in &gone {
            let Some(slot) = nodes.remove(node) else { continue };
            for d in &slot.deployments {
                if let Some(h) = holders.get_mut(d) {
                    h.remove(node);
                    if h.is_empty() {
                        holders.remove(d);
                    }
                }
            }
        }
        gone.len()
    }

    /// Follows the store's announcements until `stop`, waking the nodes each
    /// concerns (and forgetting idle nodes every [`TRUST`]).
    pub async fn run(self: std::sync::Arc<Self>, store: Store, mut stop: watch::Receiver<bool>) {
        let mut changes = store.changes();
        let mut seen = *changes.borrow_and_update();
        let mut sweep = tokio::time::interval(TRUST);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
                _ = sweep.tick() => {
                    self.prune(TRUST);
                    continue;
                }
            }
            let (latest, what) = store.changes_since(seen);
            seen = latest;
            let concern = Concern::of(what);
            if concern.is_empty() {
                continue;
            }
            if concern.all {
                self.wake(None);
                continue;
            }
            let held = self.holders(&concern.deployments);
            let deployments: Vec<String> = concern.deployments.into_iter().collect();
            let projects: Vec<String> = concern.projects.into_iter().collect();
            let nodes: Vec<String> = concern.nodes.into_iter().collect();
            match store.nodes_concerned(&deployments, &projects, &nodes).await {
                Ok(mut nodes) => {
                    nodes.extend(held);
                    self.wake(Some(&nodes))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot find the nodes a change concerns; waking every assignment watch");
                    self.wake(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> AssignmentHub {
        let private = crate::config::private_range(&crate::OperatorConfig::default().private_network).unwrap();
        AssignmentHub::new(private, 8)
    }

    #[test]
    fn reading_turns_leave_most_connections_to_the_api() {
        assert_eq!(reading_turns(16), 4, "a quarter");
        assert_eq!(reading_turns(64), 16, "a quarter");
        assert_eq!(reading_turns(8), 4, "at least four");
        assert_eq!(reading_turns(4), 2, "at most half");
        assert_eq!(reading_turns(1), 1, "always one turn");
    }

    #[test]
    fn changes_fold_into_what_they_concern() {
        let c = Concern::of(Some(vec![
            Change::Deployments(vec!["d1".into()]),
            Change::Projects(vec!["p1".into()]),
            Change::Deployments(vec!["d2".into(), "d1".into()]),
        ]));
        assert_eq!(c.deployments.into_iter().collect::<Vec<_>>(), ["d1", "d2"]);
        assert_eq!(c.projects.into_iter().collect::<Vec<_>>(), ["p1"]);
        assert!(!c.all);
        let c = Concern::of(Some(vec![Change::Nodes(vec!["n1".into()]), Change::Nodes(vec!["n2".into()])]));
        assert_eq!((c.nodes.into_iter().collect::<Vec<_>>(), c.all), (vec!["n1".to_owned(), "n2".to_owned()], false));
        assert!(Concern::of(Some(vec![Change::Deployments(vec!["d".into()]), Change::Nodes(vec![])])).all);
        assert!(Concern::of(Some(vec![Change::Anything])).all);
        assert!(Concern::of(None).all, "a gap in the log concerns every node");
        assert!(Concern::of(Some(vec![])).is_empty());
    }

    #[test]
    fn a_remembered_answer_holds_until_its_node_is_woken() {
        let hub = hub();
        let a = hub.watch("a");
        let b = hub.watch("b");
        hub.answered("a", a.version, "x".into(), ["d1".to_owned()].into());
        hub.answered("b", b.version, "y".into(), ["d2".to_owned()].into());
        assert!(hub.unchanged("a", "x"));
        assert!(!hub.unchanged("a", "other"), "another digest is read again");
        assert!(!hub.unchanged("c", "x"), "a node never answered is read");

        hub.wake(Some(&["a".to_owned()].into()));
        let a2 = hub.watch("a");
        assert_eq!(a2.version, a.version + 1);
        assert!(a.rx.has_changed().unwrap(), "a's poll is woken");
        assert!(!hub.unchanged("a", "x"), "a is read again after its wake-up");
        assert!(!b.rx.has_changed().unwrap(), "b's poll sleeps on");
        assert!(hub.unchanged("b", "y"));
        assert_eq!(hub.wakes.get(), 1, "the one poll of a");

        // An answer read before the wake-up does not replace a newer one.
        hub.answered("a", a2.version, "z".into(), ["d3".to_owned()].into());
        hub.answered("a", a.version, "x".into(), ["d1".to_owned()].into());
        assert!(hub.unchanged("a", "z"));

        hub.wake(None);
        assert!(b.rx.has_changed().unwrap(), "every node is woken by a node change");
        assert!(!hub.unchanged("b", "y"));
    }

    #[test]
    fn idle_nodes_are_forgotten_with_what_they_held() {
        let hub = hub();
        let a = hub.watch("a");
        hub.answered("a", a.version, "x".into(), ["d1".to_owned()].into());
        let b = hub.watch("b");
        hub.answered("b", b.version, "y".into(), ["d1".to_owned(), "d2".to_owned()].into());
        drop(b);
        assert_eq!(hub.prune(Duration::from_secs(60)), 0, "answered just now");
        assert_eq!(hub.prune(Duration::ZERO), 1, "a's call still waits; b is gone");
        assert_eq!(hub.holders(&["d1".to_owned(), "d2".to_owned()].into()), ["a".to_owned()].into());
        assert!(!hub.unchanged("b", "y"), "a forgotten node is read again");
        assert!(hub.unchanged("a", "x"));
        drop(a);
        assert_eq!(hub.prune(Duration::ZERO), 1);
        assert!(hub.holders(&["d1".to_owned()].into()).is_empty());
    }
}
