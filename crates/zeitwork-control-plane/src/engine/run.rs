//! The engine's loop: what wakes it (the store's announcements, its tick),
//! what each wake-up asks for ([`Work`]), and the lease that lets one
//! operator at a time act.

use super::*;

/// What a wake-up of the engine asks it to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A full pass over everything (the tick, or a change not described).
    Full,
    /// Only these deployments, or the settings of these projects, or nodes
    /// changed: each deployment named, and each running one of those
    /// projects, is moved one step on its own; a node's change runs the
    /// clock's steps (nodes down, drains, lost instances, pending placements).
    Changes { deployments: Vec<String>, projects: Vec<String>, nodes: bool },
    /// Nothing that the engine acts on.
    Nothing,
}

impl Work {
    /// What the announcements since the last look ask for: the deployments
    /// and projects they name, or a full pass for anything else (nodes, a
    /// change not described, or announcements lost from the store's log).
    pub fn of(changes: Option<Vec<zeitwork_store::Change>>) -> Work {
        let Some(changes) = changes else { return Work::Full };
        let (mut deployments, mut projects): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        let mut nodes = false;
        for c in changes {
            let (ids, into) = match c {
                zeitwork_store::Change::Deployments(d) => (d, &mut deployments),
                zeitwork_store::Change::Projects(p) => (p, &mut projects),
                zeitwork_store::Change::Nodes(_) => {
                    nodes = true;
                    continue;
                }
                zeitwork_store::Change::Anything => return Work::Full,
            };
            for id in ids {
                if !into.contains(&id) {
                    into.push(id);
                }
            }
        }
        if deployments.is_empty() && projects.is_empty() && !nodes {
            Work::Nothing
        } else {
            Work::Changes { deployments, projects, nodes }
        }
    }
}

/// Runs the engine until `stop`: a change the store announces is acted on at
/// once ([`act_on`] for the deployments it names, a full [`pass`] for
/// anything else), and a full pass runs every `tick` as the clock for
/// timeouts and steps and as the safety net for a lost announcement.
pub async fn run(
    store: Store,
    config: EngineConfig,
    holder: String,
    changed: impl Fn() + Send + 'static,
    nudge: std::sync::Arc<tokio::sync::Notify>,
    gauges: EngineGauges,
    mut stop: watch::Receiver<bool>,
) {
    let EngineGauges { leader, database_up, queries } = gauges;
    // One engine at a time across operators sharing a store.
    let mut leading = false;
    let mut leading_since = tokio::time::Instant::now();
    // Every committed change to deployments, instances, nodes or routes wakes
    // the engine (a new deployment is placed, a completing ready report activates).
    let mut changes = store.changes();
    let mut seen = *changes.borrow_and_update();
    let mut next_tick = tokio::time::Instant::now();
    let mut renewed: Option<tokio::time::Instant> = None;
    // Whether a full pass ran since the lease was taken.
    let mut looked = false;
    // When the sweep over every running deployment is due (see [`SweepClock`]).
    let mut sweeps = SweepClock::default();
    loop {
        let now = tokio::time::Instant::now();
        let tick = now >= next_tick;
        if tick {
            next_tick = now + config.tick;
        }
        // The lease is renewed every tick, and before acting on a change when
        // the last renewal is half its time-to-live old.
        let renew = tick || renewed.is_none_or(|at| at.elapsed() >= config.lease_ttl / 2);
        if renew {
            let ttl = config.lease_ttl.as_millis() as i64;
            let lease = queries.time("engine_lease", store.acquire_lease(ENGINE_LEASE, &holder, ttl)).await;
            database_up.set(i64::from(lease.is_ok()));
            match lease {
                Ok(held) => {
                    if held != leading {
                        tracing::info!(%holder, leading = held, "deployment engine lease {}", if held { "taken" } else { "lost" });
                        leading_since = tokio::time::Instant::now();
                        looked = false;
                    }
                    renewed = Some(now);
                    leading = held;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the engine lease; pausing the engine");
                    renewed = None;
                    leading = false;
                }
            }
            leader.set(i64::from(leading));
        }
        // What was announced up to now is looked at below; what comes later wakes the engine again.
        changes.borrow_and_update();
        let (latest, announced) = store.changes_since(seen);
        seen = latest;
        if leading {
            let config = EngineConfig { check_nodes: leading_since.elapsed() >= config.node_timeout, ..config.clone() };
            // A full pass as soon as the lease is taken too: nothing was looked at before.
            let why = match &announced {
                _ if !looked => "the lease was just taken",
                None => "announcements were lost",
                Some(c) if c.contains(&zeitwork_store::Change::Anything) => "a change not described",
                Some(_) => "",
            };
            let work = if looked { Work::of(announced) } else { Work::Full };
            if work == Work::Full {
                tracing::debug!(why, "full engine pass asked for");
            }
            if matches!(work, Work::Changes { nodes: true, .. }) {
                sweeps.room_may_have_appeared = true;
            }
            let sweep_due = tick && sweeps.due(config.waiting_for_room.load(std::sync::atomic::Ordering::Relaxed));
            let done = match work {
                Work::Full => {
                    looked = true;
                    let started = tokio::time::Instant::now();
                    let done = pass(&store, &config).await;
                    sweeps.swept(started);
                    done
                }
                Work::Changes { deployments, projects, nodes } => {
                    match act_on_changes(&store, &config, deployments, &projects).await {
                        // The clock's steps on a tick and after a node's change; the sweep only when due on a tick.
                        Ok(acted) if tick || nodes => {
                            let mut between = Between { store: &store, config: &config, seen: &mut seen };
                            ticked(&config, sweep_due, &mut sweeps, &mut between).await.map(|t| t || acted)
                        }
                        other => other,
                    }
                }
                Work::Nothing if tick => {
                    let mut between = Between { store: &store, config: &config, seen: &mut seen };
                    ticked(&config, sweep_due, &mut sweeps, &mut between).await
                }
                Work::Nothing => Ok(false),
            };
            match done {
                Ok(true) => changed(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "deployment engine pass failed; retrying"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_tick) => {}
            // A wake or a new deployment through this operator (also announced by the store).
            _ = nudge.notified() => {}
            _ = changes.changed() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    leader.set(0);
    if leading {
        if let Err(e) = store.release_lease(ENGINE_LEASE, &holder).await {
            tracing::warn!(error = %e, "cannot release the engine lease; another operator takes over when it lapses");
        }
    }
}

/// Acts on the deployments named and on the running deployments of the
/// projects named (their settings changed: regions, counts, scaling).
async fn act_on_changes(
    store: &Store,
    config: &EngineConfig,
    mut deployments: Vec<String>,
    projects: &[String],
) -> Result<bool, StoreError> {
    if !projects.is_empty() {
        for id in store.deployments_of_projects(projects, &RUNNING).await? {
            if !deployments.contains(&id) {
                deployments.push(id);
            }
        }
    }
    act_on(store, config, &deployments).await
}

/// A tick without a change that asks for a full pass: the clock's [`steps`],
/// and the [`sweep`] when it is due (changes announced meanwhile are acted
/// on between its reads).
async fn ticked(
    config: &EngineConfig,
    sweep_due: bool,
    sweeps: &mut SweepClock,
    between: &mut Between<'_>,
) -> Result<bool, StoreError> {
    let store = between.store;
    let mut phases = Phases::start();
    let mut changed = steps(store, config, &mut phases).await?;
    if sweep_due {
        let swept = tokio::time::Instant::now();
        changed |= sweep(store, config, &mut phases, Some(between)).await?;
        sweeps.swept(swept);
    }
    phases.log(if sweep_due { "engine tick with sweep" } else { "engine tick" });
    Ok(changed)
}

/// What a sweep does between its reads: acts on the deployments and projects
/// announced since the engine last looked, so that a deploy or a ready report
/// waits for one read of the sweep, not for all of it. Anything that asks for
/// more (nodes, a change not described, lost announcements) is left for the
/// engine's loop after the sweep.
pub(super) struct Between<'a> {
    pub(super) store: &'a Store,
    pub(super) config: &'a EngineConfig,
    pub(super) seen: &'a mut u64,
}

impl Between<'_> {
    pub(super) async fn act(&mut self) -> Result<bool, StoreError> {
        let (latest, announced) = self.store.changes_since(*self.seen);
        if latest == *self.seen {
            return Ok(false);
        }
        match Work::of(announced) {
            Work::Changes { deployments, projects, nodes: false } => {
                *self.seen = latest;
                act_on_changes(self.store, self.config, deployments, &projects).await
            }
            Work::Nothing => {
                *self.seen = latest;
                Ok(false)
            }
            Work::Changes { nodes: true, .. } | Work::Full => Ok(false),
        }
    }
}

/// How many times its own length the engine waits after a sweep before the
/// next one on the clock: the sweep is the safety net for a lost
/// announcement and the clock of time-driven counts (going to sleep when
/// idle), so on a small cluster (a sweep of a few milliseconds) it runs
/// every tick, and at 10,000 nodes (a few hundred milliseconds of the
/// database's time) every several seconds, some 3% of the time.
pub const SWEEP_SPACING: u32 = 30;

/// While a deployment waits for room (it may appear as other instances stop,
/// which is announced for their deployment only), or after a node's change,
/// the next sweep waits only this many times its length.
pub const SWEEP_SPACING_WHILE_WAITING: u32 = 4;

/// When the next sweep is due on a tick.
#[derive(Debug, Default)]
struct SweepClock {
    /// When the last sweep ended and how long it took.
    last: Option<(tokio::time::Instant, Duration)>,
    /// A node changed since the last sweep.
    room_may_have_appeared: bool,
}

impl SweepClock {
    /// Whether a sweep is due, `waiting` whether a deployment waits for room.
    fn due(&self, waiting: bool) -> bool {
        let spacing = if waiting || self.room_may_have_appeared { SWEEP_SPACING_WHILE_WAITING } else { SWEEP_SPACING };
        self.last.is_none_or(|(ended, took)| ended.elapsed() >= took * spacing)
    }

    /// A sweep that started at `started` has just ended.
    fn swept(&mut self, started: tokio::time::Instant) {
        self.last = Some((tokio::time::Instant::now(), started.elapsed()));
        self.room_may_have_appeared = false;
    }
}

#[cfg(test)]
mod sweep_clock_tests {
    use super::*;

    fn ended_ago(ago: Duration, took: Duration) -> SweepClock {
        let ended = tokio::time::Instant::now().checked_sub(ago).expect("the clock runs long enough");
        SweepClock { last: Some((ended, took)), room_may_have_appeared: false }
    }

    #[test]
    fn sweeps_keep_to_a_share_of_the_time_unless_room_is_wanted() {
        assert!(SweepClock::default().due(false), "the first sweep runs at once");
        // A 5 ms sweep (a small cluster): due again on the next tick.
        assert!(ended_ago(Duration::from_secs(1), Duration::from_millis(5)).due(false));
        // A 400 ms sweep (10,000 nodes): not for 12 s.
        let mut big = ended_ago(Duration::from_secs(2), Duration::from_millis(400));
        assert!(!big.due(false));
        assert!(ended_ago(Duration::from_secs(13), Duration::from_millis(400)).due(false));
        // A deployment waits for room: four times its length is enough.
        assert!(big.due(true));
        // A node changed: likewise.
        big.room_may_have_appeared = true;
        assert!(big.due(false));
        big.swept(tokio::time::Instant::now());
        assert!(!big.room_may_have_appeared, "a sweep looks at the room there is");
    }
}
