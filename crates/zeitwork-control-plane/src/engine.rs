//! The deployment engine: places a new deployment's instances on nodes,
//! waits for them to be ready, switches the environment's traffic to it, and
//! retires what it replaced after the rollback window. Every pass reads the
//! store and moves each deployment one step, so running it twice changes
//! nothing and a crash at any point is repaired by the next pass.

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use zeitwork_api_types::{Deployment, DeploymentStatus, Instance, InstanceStatus, Node, NodeStatus, Resources};
use zeitwork_store::{Audit, InstanceTally, NewInstance, RunningDeployment, RunningProject, Store, StoreError};

/// Engine timings, and the counter of what became of deployments.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often the engine looks without a change: the clock for timeouts,
    /// the rollback window, drain grace and rollout steps, the lease renewal,
    /// and with the sweep over every running deployment (the clock of
    /// time-driven counts and the safety net for a lost change notification).
    /// A sweep that takes long (large clusters) runs only every thirty times
    /// its length (four times while room is wanted or after a node's change),
    /// so it takes some 3% of the engine's time. Changes are acted on at once.
    pub tick: Duration,
    /// How long instances may take to become ready.
    pub start_timeout: Duration,
    /// How long a replaced deployment stays in standby (instant rollback).
    pub rollback_window: Duration,
    /// A node whose last heartbeat is older is down; its instances are placed elsewhere.
    pub node_timeout: Duration,
    /// How long an instance leaving a draining node stays out of traffic before
    /// it is stopped: time for every edge to apply the change and for requests in flight to end.
    pub drain_grace: Duration,
    /// The engine lease: only its holder runs passes; another operator takes over after it lapses.
    pub lease_ttl: Duration,
    /// Whether missed heartbeats mark nodes down. Off for the first `node_timeout`
    /// of leading: while no operator ran, no node could report.
    pub check_nodes: bool,
    /// How long a deployment may wait for room (a ready node, enough memory) before it fails.
    pub placement_timeout: Duration,
    /// Instances of one deployment that may fail within `crash_window` before
    /// the engine stops replacing them (a crash-looping build is not restarted forever).
    pub crash_budget: usize,
    pub crash_window: Duration,
    /// Counts each deployment the engine makes active, fails or rolls back.
    pub outcomes: DeploymentOutcomes,
    /// How many private project networks the operator's range holds.
    pub private_networks: u32,
    /// Set when a running (active or standby) deployment could not be given
    /// all its instances for want of capacity (not for want of a ready node:
    /// a node's change ends that); each sweep that completes sets it to what
    /// it found. While set, sweeps follow each other sooner (four times their
    /// length, not thirty): room freed by instances stopping elsewhere is
    /// announced only for their own deployment. Deployments waking or in a
    /// rollout stage are retried by the clock's steps every tick instead.
    pub waiting_for_room: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            start_timeout: Duration::from_secs(300),
            rollback_window: Duration::from_secs(600),
            node_timeout: Duration::from_secs(15),
            drain_grace: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            check_nodes: true,
            placement_timeout: Duration::from_secs(300),
            crash_budget: 5,
            crash_window: Duration::from_secs(600),
            outcomes: DeploymentOutcomes::default(),
            private_networks: 1 << 13,
            waiting_for_room: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// `deployments_total{outcome}`: deployments that went live (`active`), failed
/// (placement, start, build) or were rolled back (`rolled_back`), counted where
/// the move happens, by the operator that made it.
#[derive(Debug, Clone, Default)]
pub struct DeploymentOutcomes(Family<OutcomeLabels, Counter>);

impl DeploymentOutcomes {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("deployments", "Deployments that became active, failed or were rolled back", self.0.clone());
    }

    /// Counts one deployment moved to `to` (`active`, `failed` or `rolled_back`).
    pub fn count(&self, to: DeploymentStatus) {
        self.0.get_or_create(&OutcomeLabels { outcome: to.as_str() }).inc();
    }

    /// How many moved to `to` so far.
    pub fn get(&self, to: DeploymentStatus) -> u64 {
        self.0.get_or_create(&OutcomeLabels { outcome: to.as_str() }).get()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    query: &'static str,
}

/// `db_query_duration_seconds{query}`: how long the store takes to answer the
/// queries every operator runs all the time, a real write (`engine_lease`,
/// every tick) and a read (`outbox_counts`, every few seconds), so a slow or
/// overloaded database shows without timing every query.
#[derive(Debug, Clone)]
pub struct QueryTimes(Family<QueryLabels, Histogram>);

impl Default for QueryTimes {
    fn default() -> Self {
        Self(Family::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        }))
    }
}

impl QueryTimes {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("db_query_duration_seconds", "Latency of the store's queries, by query", self.0.clone());
    }

    /// Runs `query` and records how long it took under `name`, whatever it answered.
    pub async fn time<T>(&self, name: &'static str, query: impl std::future::Future<Output = T>) -> T {
        let start = std::time::Instant::now();
        let out = query.await;
        self.0.get_or_create(&QueryLabels { query: name }).observe(start.elapsed().as_secs_f64());
        out
    }
}

/// Picks `count` nodes of `region` for instances needing `need`: never on
/// draining or down nodes, spread (fewest instances of this deployment
/// first), then packed by free memory. `Err` says what is missing.
pub fn place(nodes: &[Node], region: &str, count: u32, need: Resources) -> Result<Vec<String>, String> {
    let mut free: Vec<(String, u32, u32, u32)> = nodes
        .iter()
        .filter(|n| n.region == region && n.status == NodeStatus::Ready)
        .map(|n| {
            (
                n.id.clone(),
                n.capacity.vcpu.saturating_sub(n.allocated.vcpu),
                n.capacity.memory.saturating_sub(n.allocated.memory),
                0,
            )
        })
        .collect();
    if free.is_empty() {
        return Err(format!("region {region} has no ready node"));
    }
    let mut picked = Vec::new();
    for _ in 0..count {
        free.sort_by(|a, b| a.3.cmp(&b.3).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        let Some(slot) = free.iter_mut().find(|f| f.1 >= need.vcpu && f.2 >= need.memory) else {
            return Err(format!(
                "region {region} lacks capacity: {count} instance(s) of {} vCPU / {} MiB needed, {} placed",
                need.vcpu,
                need.memory,
                picked.len()
            ));
        };
        slot.1 -= need.vcpu;
        slot.2 -= need.memory;
        slot.3 += 1;
        picked.push(slot.0.clone());
    }
    Ok(picked)
}

/// What the engine loop reports as metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineGauges {
    /// 1 while this operator runs the engine.
    pub leader: prometheus_client::metrics::gauge::Gauge,
    /// 1 while the store answers (the lease is renewed every tick).
    pub database_up: prometheus_client::metrics::gauge::Gauge,
    /// The lease renewal's latency goes here.
    pub queries: QueryTimes,
}

/// Deployments that keep a count of instances running.
const RUNNING: [DeploymentStatus; 2] = [DeploymentStatus::Active, DeploymentStatus::Standby];

/// Name of the lease the running engine holds.
pub const ENGINE_LEASE: &str = "engine";

/// Moves instances off draining nodes: a replacement starts on another node of
/// the region; once it is ready the old one leaves traffic, and after
/// `drain_grace` it stops. A drained node then has no instances.
async fn drain(store: &Store, config: &EngineConfig) -> Result<bool, zeitwork_store::StoreError> {
    let mut changed = false;
    let now = chrono::Utc::now().timestamp_millis();
    for d in store.instances_on_draining_nodes().await? {
        let i = &d.instance;
        if let Some(after) = d.stop_after {
            if now >= after {
                changed |= store.retire_instance(&i.id, "moved off a draining node").await?;
            }
            continue;
        }
        let dep = store.get_deployment(&i.deployment).await?;
        let routable = matches!(
            dep.status,
            DeploymentStatus::Preparing
                | DeploymentStatus::Starting
                | DeploymentStatus::Ready
                | DeploymentStatus::Active
                | DeploymentStatus::Standby
        );
        if !routable || i.status != InstanceStatus::Ready {
            // Nothing serves from it: stop it now (a starting one is replaced like a lost one).
            if store.begin_stopping(&i.id, now).await? {
                changed = true;
                if routable {
                    replace_instance(store, config, &dep, i).await?;
                }
            }
            continue;
        }
        match &d.replaced_by {
            None => {
                if let Some(r) = replace_instance(store, config, &dep, i).await? {
                    store.set_replacement(&i.id, Some(&r)).await?;
                    changed = true;
                }
            }
            Some(r) => {
                let rep = store.get_instance(r).await?;
                match rep.status {
                    InstanceStatus::Ready => {
                        let after = now + config.drain_grace.as_millis() as i64;
                        changed |= store.begin_stopping(&i.id, after).await?;
                        tracing::info!(instance = %i.id, replacement = %r, "replacement ready; draining the old instance");
                    }
                    InstanceStatus::Failed | InstanceStatus::Exited | InstanceStatus::Stopped => {
                        // Try again with a new replacement next pass.
                        store.set_replacement(&i.id, None).await?;
                        changed = true;
                    }
                    _ => {}
                }
            }
        }
    }
    if !store.finish_drained_nodes().await?.is_empty() {
        changed = true;
    }
    Ok(changed)
}

/// Places one instance of `dep` in the region of `lost` on another node; the new instance's id.
async fn replace_instance(
    store: &Store,
    config: &EngineConfig,
    dep: &zeitwork_api_types::Deployment,
    lost: &zeitwork_api_types::Instance,
) -> Result<Option<String>, zeitwork_store::StoreError> {
    let project = store.get_project(&dep.org, &dep.project).await?;
    let nodes = store.nodes_for_placement().await?;
    match place(&nodes, &lost.region, 1, project.resources) {
        Ok(picked) => {
            let Some(node) = picked.into_iter().next() else { return Ok(None) };
            let new = NewInstance {
                deployment: dep.id.clone(),
                runtime: runtime_of(&nodes, &node),
                node: Some(node),
                region: lost.region.clone(),
                resources: project.resources,
            };
            let network = network_of(store, config, &project.id, dep).await;
            let Some(i) = store.place_instances(&[new], network).await?.pop() else { return Ok(None) };
            tracing::info!(deployment = %dep.id, old = %lost.id, replacement = %i.id, "placed a replacement instance");
            Ok(Some(i.id))
        }
        Err(why) => {
            tracing::warn!(deployment = %dep.id, instance = %lost.id, %why, "cannot place a replacement instance");
            store
                .record_event(
                    &system("instance.replace", &lost.id, &dep.org, &dep.project)
                        .detail(serde_json::json!({"error": why})),
                    "failed",
                )
                .await?;
            Ok(None)
        }
    }
}

fn system(action: &str, target: &str, org: &str, project: &str) -> Audit {
    Audit::new("system", action, target).org(org).project(project)
}

/// The runtime of the node an instance is placed on (recorded with the instance).
fn runtime_of(nodes: &[Node], id: &str) -> Option<String> {
    nodes.iter().find(|n| n.id == id).map(|n| n.runtime.clone())
}

/// One full pass: every step that waits on the clock ([`steps`]) and the
/// desired-count sweep over every running deployment ([`sweep`]); returns
/// whether anything changed.
pub async fn pass(store: &Store, config: &EngineConfig) -> Result<bool, zeitwork_store::StoreError> {
    let mut phases = Phases::start();
    let mut changed = steps(store, config, &mut phases).await?;
    changed |= sweep(store, config, &mut phases, None).await?;
    phases.log("full engine pass");
    Ok(changed)
}

/// What waits on the clock or on a node, read through the indexes of the few
/// rows concerned (never every running deployment): nodes that stopped
/// heartbeating and their instances, draining nodes, idle deployments going
/// to sleep, retention, pending placements, starts and their timeouts, wakes,
/// rollout stages, and instances whose drain grace ended.
async fn steps(store: &Store, config: &EngineConfig, phases: &mut Phases) -> Result<bool, StoreError> {
    let mut changed = false;
    let now = chrono::Utc::now();

    // Nodes that stopped heartbeating: their instances are re-placed in the same region.
    let cutoff = now.timestamp_millis() - config.node_timeout.as_millis() as i64;
    if config.check_nodes && !store.mark_down_nodes(cutoff).await?.is_empty() {
        changed = true;
    }
    phases.mark("down nodes");
    if drain(store, config).await? {
        changed = true;
    }
    phases.mark("drain");
    for lost in store.instances_on_down_nodes().await? {
        // The desired-count reconciler below places a replacement when there is room.
        if store.retire_instance(&lost.id, "its node is down; replaced on another node").await? {
            changed = true;
        }
    }
    // Deployments nobody points at go to sleep and free their capacity first,
    // so what waits for room below can use it in this same pass.
    phases.mark("lost instances");
    changed |= sleep_idle(store, config, now).await?;
    phases.mark("sleep");
    for d in store.sleeping_beyond_retention().await? {
        let audit = system("deployment.retire", &d.id, &d.org, &d.project);
        let reason = "retired: the project keeps retain_deployments newer deployments";
        store.retire_deployment(&d.id, reason, &audit).await?;
        changed = true;
    }
    phases.mark("retention");
    changed |= place_pending(store, config, now).await?;
    phases.mark("place");

    // `preparing` is a deployment whose placement was claimed; a crash before it
    // reached `starting` is repaired here like any other step.
    let mut starting = all_with(store, DeploymentStatus::Preparing).await?;
    starting.extend(all_with(store, DeploymentStatus::Starting).await?);
    for d in starting {
        changed |= check_start(store, config, &d, now).await?;
    }
    phases.mark("start");
    changed |= wake(store, config, now).await?;
    phases.mark("wake");
    changed |= crate::rollout::pass(store, config).await?;
    phases.mark("rollouts");
    if store.finish_stopping(now.timestamp_millis()).await? > 0 {
        changed = true;
    }
    phases.mark("stopping");
    Ok(changed)
}

/// The desired-count reconciler over every running deployment: what should
/// run, runs (lost instances are placed again when room appears), and a
/// scaled deployment keeps its autoscaler's count. A change to a deployment
/// is acted on at once by [`act_on`]; this sweep is the safety net and the
/// clock of time-driven counts (an idle deployment scaling to zero).
async fn sweep(
    store: &Store,
    config: &EngineConfig,
    phases: &mut Phases,
    mut between: Option<&mut Between<'_>>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    let now = chrono::Utc::now();
    // Whether a running deployment is still short of room, as this sweep finds.
    let mut waiting_for_room = false;
    // What nodes hold is kept as deltas by the store; folding them keeps each
    // placement's read of the nodes short.
    store.fold_node_holds().await?;
    phases.mark("node holds folded");
    // The desired-count reconciler: what should run, runs (lost instances are placed again when room appears).
    // Read for every running deployment at once (grouped in SQL), decided in
    // memory; only a deployment short of or beyond its count is read again
    // and acted on, one at a time.
    let mut running = store.running_deployments(&RUNNING).await?;
    // Active ones first, each status newest first (stable: the store lists newest first).
    running.sort_by_key(|d| RUNNING.iter().position(|s| *s == d.status));
    phases.mark("running deployments");
    if let Some(b) = between.as_deref_mut() {
        changed |= b.act().await?;
    }
    let mut tallies: HashMap<String, Vec<InstanceTally>> = HashMap::new();
    for t in store.instance_tallies(&RUNNING).await? {
        tallies.entry(t.deployment.clone()).or_default().push(t);
    }
    phases.mark("instance counts");
    if let Some(b) = between {
        changed |= b.act().await?;
        phases.mark("changes acted on");
    }
    for r in running {
        let (desired, scaled) = desired_count(&r, now);
        let regions = r.project.as_ref().map(|p| p.regions.as_slice()).unwrap_or_default();
        let tally = tallies.get(&r.id).map(Vec::as_slice).unwrap_or_default();
        // A project gone since the read: the per-deployment path reports it as before.
        if r.project.is_some() && !needs_attention(tally, regions, desired, scaled) {
            continue;
        }
        // Read whole only now that it needs an action; one that moved on since is left alone.
        let d = match store.get_deployment(&r.id).await {
            Ok(d) if d.status == r.status => d,
            Ok(_) | Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let rec = reconcile(store, config, &d, desired, now).await?;
        changed |= rec.placed;
        waiting_for_room |= rec.room_needed_in.is_some();
        if scaled {
            changed |= scale_down(store, config, &d, desired, now).await?;
        }
    }
    // Only a sweep that read everything says whether anything still waits.
    config.waiting_for_room.store(waiting_for_room, std::sync::atomic::Ordering::Relaxed);
    phases.mark("desired counts");
    Ok(changed)
}

/// How long each phase of a full pass took, logged at debug level.
struct Phases {
    start: std::time::Instant,
    last: std::time::Instant,
    took: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Phases {
        let now = std::time::Instant::now();
        Phases { start: now, last: now, took: Vec::new() }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.took.push((phase, now - self.last));
        self.last = now;
    }

    fn log(&self, what: &str) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let phases: Vec<String> =
                self.took.iter().map(|(p, d)| format!("{p} {:.1} ms", d.as_secs_f64() * 1000.0)).collect();
            let took_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            tracing::debug!(took_ms, phases = %phases.join(", "), "{what}");
        }
    }
}

/// Standby deployments one placement may put to sleep early, one at a time,
/// before it waits for room until the next pass.
const MAX_ROOMS_PER_PLACEMENT: u32 = 8;

/// Places pending deployments, oldest first, each all at once or not at
/// all; one that cannot be placed waits for room with the reason (making
/// room by sleeping a standby deployment early) or fails after
/// `placement_timeout`.
async fn place_pending(
    store: &Store,
    config: &EngineConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    let mut pending = all_with(store, DeploymentStatus::Pending).await?;
    pending.reverse(); // oldest first
    for d in pending {
        let project = store.get_project(&d.org, &d.project).await?;
        // Each standby deployment put to sleep early frees its room at once: try again.
        let mut rooms_made = 0;
        loop {
            let nodes = store.nodes_for_placement().await?;
            let mut plan = Vec::new();
            let mut failure = None;
            if project.regions.is_empty() {
                failure = Some(Shortfall::Unplaceable("the project runs in no region; set its regions".to_owned()));
            }
            for region in &project.regions {
                match place(&nodes, region, d.instances_per_region, project.resources) {
                    Ok(picked) => plan.extend(picked.into_iter().map(|n| (n, region.clone()))),
                    Err(why) => {
                        failure = Some(Shortfall::classify(why, region));
                        break;
                    }
                }
            }
            match failure {
                Some(short) => {
                    let waited = now - d.created_at;
                    if matches!(short, Shortfall::Unplaceable(_))
                        || waited > chrono::Duration::from_std(config.placement_timeout).unwrap_or_default()
                    {
                        let why = format!(
                            "placement: {}; waited {} s (placement_timeout_secs)",
                            short.message(),
                            waited.num_seconds().max(0)
                        );
                        // Only if it is still pending: a deployment pointed at meanwhile
                        // (a rollback, a promotion) is not failed by what this pass read before.
                        if store.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Failed).await? {
                            store.set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&why)).await?;
                            config.outcomes.count(DeploymentStatus::Failed);
                            let audit = system("deployment.fail", &d.id, &d.org, &d.project)
                                .detail(serde_json::json!({"reason": why}));
                            store.record_event(&audit, "failed").await?;
                            changed = true;
                        }
                    } else {
                        if let Shortfall::Capacity(region, _) = &short {
                            if rooms_made < MAX_ROOMS_PER_PLACEMENT && make_room(store, region, &d.id).await? {
                                changed = true;
                                rooms_made += 1;
                                continue;
                            }
                        }
                        let reason = format!("waiting for room: {}", short.message());
                        if d.reason.as_deref() != Some(reason.as_str()) {
                            store.set_pending_reason(&d.id, &reason).await?;
                            changed = true;
                        }
                    }
                }
                None => {
                    if store.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Preparing).await? {
                        // Claimed: no other engine places this deployment.
                        let new: Vec<NewInstance> = plan
                            .into_iter()
                            .map(|(node, region)| NewInstance {
                                deployment: d.id.clone(),
                                runtime: runtime_of(&nodes, &node),
                                node: Some(node),
                                region,
                                resources: project.resources,
                            })
                            .collect();
                        let network = network_of(store, config, &project.id, &d).await;
                        store.place_instances(&new, network).await?;
                        store.set_deployment_status(&d.id, DeploymentStatus::Starting, None).await?;
                    }
                    changed = true;
                }
            }
            break;
        }
    }
    Ok(changed)
}

/// The private network new instances of `d` get their addresses in (they
/// get them when placed, so their nodes' reads write nothing); `None` if it
/// cannot be had now (the nodes' reads then hand the addresses out).
async fn network_of(store: &Store, config: &EngineConfig, project_id: &str, d: &Deployment) -> Option<u32> {
    match store.project_network(project_id, d.environment.as_str(), config.private_networks).await {
        Ok(idx) => Some(idx),
        Err(e) => {
            tracing::warn!(deployment = %d.id, error = %e, "no private network for new instances yet");
            None
        }
    }
}

/// A placed deployment: fails when one of its instances failed or they
/// were not all ready within `start_timeout`; once all are ready, a canary
/// begins or it takes its environment (see `rollout`).
async fn check_start(
    store: &Store,
    config: &EngineConfig,
    d: &Deployment,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    // Instances replaced after their node went down no longer count.
    let instances: Vec<_> =
        store.list_instances(&d.id).await?.into_iter().filter(|i| i.status != InstanceStatus::Stopped).collect();
    let broken = instances.iter().find(|i| matches!(i.status, InstanceStatus::Failed | InstanceStatus::Exited));
    if let Some(i) = broken {
        let why = i.exit_reason.clone().unwrap_or_else(|| format!("instance {} {}", i.id, i.status.as_str()));
        let reason = format!("instance {}: {why}", i.id);
        store.set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&reason)).await?;
        config.outcomes.count(DeploymentStatus::Failed);
        let audit = system("deployment.fail", &d.id, &d.org, &d.project).detail(serde_json::json!({"reason": reason}));
        store.record_event(&audit, "failed").await?;
        changed = true;
    } else if !instances.is_empty() && instances.iter().all(|i| i.status == InstanceStatus::Ready) {
        // Every instance is ready: a canary begins, or the switch (see `rollout`).
        changed |= crate::rollout::on_ready(store, config, d).await?;
    } else if now - d.updated_at > chrono::Duration::from_std(config.start_timeout).unwrap_or_default() {
        let reason = format!("instances did not become ready within {} s", config.start_timeout.as_secs());
        store.set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&reason)).await?;
        config.outcomes.count(DeploymentStatus::Failed);
        let audit = system("deployment.fail", &d.id, &d.org, &d.project).detail(serde_json::json!({"reason": reason}));
        store.record_event(&audit, "failed").await?;
        changed = true;
    }
    Ok(changed)
}

/// Instances per region a running (`active` or `standby`) deployment should
/// keep, and whether the autoscaler sets that count (then extra ones are
/// scaled down): one for a woken standby deployment, `instances_per_region`
/// for another standby one, and for an active one the autoscaler's count
/// when its project scales.
fn desired_count(d: &RunningDeployment, now: chrono::DateTime<chrono::Utc>) -> (u32, bool) {
    match d.status {
        DeploymentStatus::Standby if d.wakefulness.woken_at.is_some() => (1, false),
        DeploymentStatus::Standby => (d.instances_per_region, false),
        _ => match d.project.as_ref().and_then(|p| p.scaling.map(|s| (s, p.sleep_after_secs))) {
            Some((s, sleep_after)) => (active_desired(d, s, sleep_after, now), true),
            None => (d.instances_per_region, false),
        },
    }
}

/// Moves the deployments `ids` one step each, as a full [`pass`] would, and
/// nothing else: the engine's answer to a change the store announced for
/// them. A pending one places the pending deployments (oldest first, as the
/// pass does), a starting one is activated once all its instances are ready
/// (or fails), a waking one wakes, one in a canary or shadow stage follows
/// its rollout, a running one keeps its count of instances. Reads only those
/// deployments and their instances, never all of them.
pub async fn act_on(store: &Store, config: &EngineConfig, ids: &[String]) -> Result<bool, StoreError> {
    let now = chrono::Utc::now();
    let mut changed = false;
    let mut pending = false;
    for id in ids {
        let d = match store.get_deployment(id).await {
            Ok(d) => d,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match d.status {
            DeploymentStatus::Pending => pending = true,
            DeploymentStatus::Preparing | DeploymentStatus::Starting => {
                changed |= check_start(store, config, &d, now).await?;
            }
            DeploymentStatus::Waking => changed |= wake_one(store, config, &d, now).await?,
            DeploymentStatus::Ready => {
                if let Some(r) = store.get_rollout(&d.id).await? {
                    changed |= crate::rollout::step(store, config, &r, now.timestamp_millis()).await?;
                }
            }
            DeploymentStatus::Active | DeploymentStatus::Standby => {
                let project = match store.get_project(&d.org, &d.project).await {
                    Ok(p) => Some(RunningProject {
                        regions: p.regions,
                        scaling: p.scaling,
                        sleep_after_secs: p.sleep_after_secs,
                    }),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                };
                let running = RunningDeployment {
                    id: d.id.clone(),
                    status: d.status,
                    instances_per_region: d.instances_per_region,
                    updated_at: d.updated_at,
                    wakefulness: store.wakefulness(&d.id).await?,
                    project,
                };
                let (desired, scaled) = desired_count(&running, now);
                let rec = reconcile(store, config, &d, desired, now).await?;
                changed |= rec.placed;
                if rec.room_needed_in.is_some() {
                    config.waiting_for_room.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if scaled {
                    changed |= scale_down(store, config, &d, desired, now).await?;
                }
            }
            _ => {}
        }
    }
    if pending {
        changed |= place_pending(store, config, now).await?;
    }
    Ok(changed)
}

/// Whether [`reconcile`] (and, for a `scaled` deployment, [`scale_down`])
/// could change anything, judged from its instances counted per region and
/// status: some region of `regions` has fewer than `desired` live instances,
/// or a scaled one serves more than `desired` in some region. When not, the
/// pass leaves the deployment alone without reading it again.
pub(crate) fn needs_attention(tally: &[InstanceTally], regions: &[String], desired: u32, scaled: bool) -> bool {
    let count = |region: &str, keep: fn(InstanceStatus) -> bool| -> u32 {
        tally.iter().filter(|t| t.region == region && keep(t.status)).map(|t| t.count).sum()
    };
    fn live(s: InstanceStatus) -> bool {
        !matches!(s, InstanceStatus::Stopped | InstanceStatus::Failed | InstanceStatus::Exited)
    }
    fn serving(s: InstanceStatus) -> bool {
        live(s) && s != InstanceStatus::Stopping
    }
    if regions.iter().any(|r| count(r, live) < desired) {
        return true;
    }
    scaled && tally.iter().any(|t| count(&t.region, serving) > desired)
}

/// Instances per region an autoscaled active deployment should run: the
/// autoscaler's count within the bounds; none with `min_per_region: 0` once
/// no request came for `sleep_after_secs` (since it went live or last woke).
pub fn active_desired(
    d: &RunningDeployment,
    s: zeitwork_api_types::Scaling,
    sleep_after_secs: u32,
    now: chrono::DateTime<chrono::Utc>,
) -> u32 {
    let w = &d.wakefulness;
    let base = w.scale_target.unwrap_or(d.instances_per_region).clamp(s.min_per_region.max(1), s.max_per_region);
    if s.min_per_region > 0 {
        return base;
    }
    let last = [w.last_request_at, w.woken_at, Some(d.updated_at.timestamp_millis())].into_iter().flatten().max();
    let idle = last.is_some_and(|at| now.timestamp_millis() - at > i64::from(sleep_after_secs) * 1000);
    if idle {
        0
    } else {
        base
    }
}

/// Takes the newest instances beyond `desired` per region out of traffic;
/// they stop after the drain grace, so requests in flight finish.
async fn scale_down(
    store: &Store,
    config: &EngineConfig,
    d: &Deployment,
    desired: u32,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    let instances = store.list_instances(&d.id).await?;
    let mut regions: Vec<&str> = instances.iter().map(|i| i.region.as_str()).collect();
    regions.sort();
    regions.dedup();
    for region in regions {
        let mut serving: Vec<&Instance> = instances
            .iter()
            .filter(|i| {
                i.region == region
                    && !matches!(
                        i.status,
                        InstanceStatus::Stopping
                            | InstanceStatus::Stopped
                            | InstanceStatus::Failed
                            | InstanceStatus::Exited
                    )
            })
            .collect();
        if serving.len() as u32 <= desired {
            continue;
        }
        // Not-yet-ready ones go first, then the newest.
        serving.sort_by_key(|i| (i.status == InstanceStatus::Ready, std::cmp::Reverse(i.created_at)));
        let extra = serving.len() - desired as usize;
        for i in serving.into_iter().take(extra) {
            let after = now.timestamp_millis() + config.drain_grace.as_millis() as i64;
            if store.begin_stopping(&i.id, after).await? {
                tracing::info!(deployment = %d.id, instance = %i.id, desired, "scaling down: instance out of traffic");
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// Why a deployment could not be placed.
enum Shortfall {
    /// No ready node in the region yet (one may register, or come back).
    NoNode(String),
    /// Not enough free memory or vCPU in the region (something may sleep, retire or leave).
    Capacity(String, String),
    /// Nothing that happens later helps.
    Unplaceable(String),
}

impl Shortfall {
    fn classify(why: String, region: &str) -> Self {
        if why.contains("no ready node") {
            Shortfall::NoNode(why)
        } else {
            Shortfall::Capacity(region.to_owned(), why)
        }
    }

    fn message(&self) -> &str {
        match self {
            Shortfall::NoNode(m) | Shortfall::Capacity(_, m) | Shortfall::Unplaceable(m) => m,
        }
    }
}

/// Deployments with `status`, newest first (one query).
async fn all_with(store: &Store, status: DeploymentStatus) -> Result<Vec<Deployment>, StoreError> {
    Ok(store.deployments_in(&[status]).await?.into_iter().map(|(d, _)| d).collect())
}

mod sleep;
use sleep::{make_room, sleep_idle, wake, wake_one};
mod run;
use run::Between;
pub use run::{run, Work};

/// What one reconcile of a deployment did and found.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    pub(crate) placed: bool,
    /// Every region has its desired count of live instances, all ready.
    pub(crate) ready: bool,
    /// The last placement failure, when some instance could not be placed.
    short_of_room: Option<String>,
    /// A region where capacity (not a missing node) stopped placement.
    room_needed_in: Option<String>,
    /// Instances keep failing: the engine stopped replacing them.
    stuck: Option<String>,
}

/// Keeps `desired` live instances of `d` in each of its project's regions:
/// places what is missing where there is room (lost instances, a node that
/// went down, a crash loop that ended), unless too many failed lately.
pub(crate) async fn reconcile(
    store: &Store,
    config: &EngineConfig,
    d: &Deployment,
    desired: u32,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Reconciled, StoreError> {
    let mut out = Reconciled { ready: true, ..Default::default() };
    let project = store.get_project(&d.org, &d.project).await?;
    let instances = store.list_instances(&d.id).await?;
    // Read after its instances: a deployment retired or slept since this pass
    // listed it (its instances stopped with it) gets none placed again.
    if store.get_deployment(&d.id).await?.status != d.status {
        out.ready = false;
        return Ok(out);
    }
    let dead =
        |i: &Instance| matches!(i.status, InstanceStatus::Stopped | InstanceStatus::Failed | InstanceStatus::Exited);
    let window = chrono::Duration::from_std(config.crash_window).unwrap_or_default();
    let crashed: Vec<&Instance> = instances
        .iter()
        .filter(|i| matches!(i.status, InstanceStatus::Failed | InstanceStatus::Exited) && now - i.created_at < window)
        .collect();
    let mut nodes: Option<Vec<Node>> = None;
    for region in &project.regions {
        let live: Vec<&Instance> = instances.iter().filter(|i| &i.region == region && !dead(i)).collect();
        let ready = live.iter().filter(|i| i.status == InstanceStatus::Ready).count() as u32;
        if ready < desired {
            out.ready = false;
        }
        let missing = desired.saturating_sub(live.len() as u32);
        if missing == 0 {
            continue;
        }
        if crashed.len() >= config.crash_budget {
            let last = crashed.iter().max_by_key(|i| i.created_at).and_then(|i| i.exit_reason.clone());
            let why = format!(
                "{} instances failed within {} s (last: {}); not replaced",
                crashed.len(),
                config.crash_window.as_secs(),
                last.unwrap_or_else(|| "no reason recorded".into())
            );
            // Told once per deployment (and so notified once), not on every pass.
            let filter = zeitwork_store::EventFilter {
                org: Some(d.org.clone()),
                project: Some(d.project.clone()),
                action: Some("instance.crash_loop".into()),
                ..Default::default()
            };
            let told = store.list_events(&filter, &zeitwork_store::Page::first(100)).await?;
            if !told.items.iter().any(|e| e.target == d.id) {
                let audit =
                    system("instance.crash_loop", &d.id, &d.org, &d.project).detail(serde_json::json!({"reason": why}));
                store.record_event(&audit, "failed").await?;
            }
            out.stuck = Some(why);
            continue;
        }
        if nodes.is_none() {
            nodes = Some(store.nodes_for_placement().await?);
        }
        let Some(nodes) = nodes.as_mut() else { continue };
        match place(nodes, region, missing, project.resources) {
            Ok(picked) => {
                let mut new = Vec::with_capacity(picked.len());
                for node in picked {
                    new.push(NewInstance {
                        deployment: d.id.clone(),
                        runtime: runtime_of(nodes, &node),
                        node: Some(node.clone()),
                        region: region.clone(),
                        resources: project.resources,
                    });
                    // Later placements of this pass see what this one took.
                    if let Some(n) = nodes.iter_mut().find(|n| n.id == node) {
                        n.allocated.vcpu += project.resources.vcpu;
                        n.allocated.memory += project.resources.memory;
                    }
                }
                let network = network_of(store, config, &project.id, d).await;
                for i in store.place_instances(&new, network).await? {
                    tracing::info!(deployment = %d.id, instance = %i.id, %region, status = d.status.as_str(), desired, live = live.len(), "placed an instance to reach the desired count");
                    out.placed = true;
                }
            }
            Err(why) => {
                tracing::debug!(deployment = %d.id, %region, %why, "cannot place an instance yet");
                if !why.contains("no ready node") {
                    out.room_needed_in = Some(region.clone());
                }
                out.short_of_room = Some(why);
            }
        }
    }
    if project.regions.is_empty() {
        out.ready = false;
    }
    Ok(out)
}
#[cfg(test)]
mod tests;
