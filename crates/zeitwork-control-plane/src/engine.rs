//! The deployment engine: places a new deployment's instances on nodes,
//! waits for them to be ready, switches the environment's traffic to it, and
//! retires what it replaced after the rollback window. Every pass reads the
//! store and moves each deployment one step, so running it twice changes
//! nothing and a crash at any point is repaired by the next pass.

use std::time::Duration;

use tokio::sync::watch;
use zeitwork_api_types::{DeploymentStatus, InstanceStatus, Node, NodeStatus, Resources};
use zeitwork_store::{Audit, DeploymentFilter, NewInstance, Page, Store};

/// Engine timings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(500),
            start_timeout: Duration::from_secs(300),
            rollback_window: Duration::from_secs(600),
            node_timeout: Duration::from_secs(15),
            drain_grace: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            check_nodes: true,
        }
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

/// Runs passes until `stop`.
pub async fn run(
    store: Store,
    config: EngineConfig,
    holder: String,
    changed: impl Fn() + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    // One engine at a time across operators sharing a store.
    let mut leading = false;
    let mut leading_since = tokio::time::Instant::now();
    loop {
        let ttl = config.lease_ttl.as_millis() as i64;
        match store.acquire_lease(ENGINE_LEASE, &holder, ttl).await {
            Ok(held) => {
                if held != leading {
                    tracing::info!(%holder, leading = held, "deployment engine lease {}", if held { "taken" } else { "lost" });
                    leading_since = tokio::time::Instant::now();
                }
                leading = held;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the engine lease; pausing the engine");
                leading = false;
            }
        }
        if leading {
            let config = EngineConfig { check_nodes: leading_since.elapsed() >= config.node_timeout, ..config };
            match pass(&store, &config).await {
                Ok(true) => changed(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "deployment engine pass failed; retrying"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.tick) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if leading {
        let _ = store.release_lease(ENGINE_LEASE, &holder).await;
    }
}

/// Every node, page by page.
async fn all_nodes(store: &Store) -> Result<Vec<Node>, zeitwork_store::StoreError> {
    let mut out = Vec::new();
    let mut page = Page::first(1000);
    loop {
        let l = store.list_nodes(&page).await?;
        out.extend(l.items);
        match l.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

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
                    replace_instance(store, &dep, i).await?;
                }
            }
            continue;
        }
        match &d.replaced_by {
            None => {
                if let Some(r) = replace_instance(store, &dep, i).await? {
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
    dep: &zeitwork_api_types::Deployment,
    lost: &zeitwork_api_types::Instance,
) -> Result<Option<String>, zeitwork_store::StoreError> {
    let project = store.get_project(&dep.org, &dep.project).await?;
    let nodes = all_nodes(store).await?;
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
            let i = store.create_instance(&new).await?;
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

/// One pass over every deployment that is not settled; returns whether anything changed.
pub async fn pass(store: &Store, config: &EngineConfig) -> Result<bool, zeitwork_store::StoreError> {
    let mut changed = false;
    let by = |status| DeploymentFilter { status: Some(status), ..Default::default() };
    let now = chrono::Utc::now();

    // Nodes that stopped heartbeating: their instances are re-placed in the same region.
    let cutoff = now.timestamp_millis() - config.node_timeout.as_millis() as i64;
    if config.check_nodes && !store.mark_down_nodes(cutoff).await?.is_empty() {
        changed = true;
    }
    if drain(store, config).await? {
        changed = true;
    }
    for lost in store.instances_on_down_nodes().await? {
        let d = store.get_deployment(&lost.deployment).await?;
        // Only the engine that retires the instance replaces it.
        if !store.retire_instance(&lost.id, "its node is down; replaced on another node").await? {
            continue;
        }
        changed = true;
        if !matches!(
            d.status,
            DeploymentStatus::Starting | DeploymentStatus::Ready | DeploymentStatus::Active | DeploymentStatus::Standby
        ) {
            continue;
        }
        replace_instance(store, &d, &lost).await?;
    }

    for d in store.list_deployments(&by(DeploymentStatus::Pending), &Page::first(100)).await?.items {
        let project = store.get_project(&d.org, &d.project).await?;
        let nodes = all_nodes(store).await?;
        let mut plan = Vec::new();
        let mut failure = None;
        if project.regions.is_empty() {
            failure = Some("the project runs in no region; set its regions".to_owned());
        }
        for region in &project.regions {
            match place(&nodes, region, d.instances_per_region, project.resources) {
                Ok(picked) => plan.extend(picked.into_iter().map(|n| (n, region.clone()))),
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = failure {
            store.set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&format!("placement: {why}"))).await?;
            store.record_event(&system("deployment.fail", &d.id, &d.org, &d.project), "failed").await?;
        } else if store.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Preparing).await? {
            // Claimed: no other engine places this deployment.
            for (node, region) in plan {
                store
                    .create_instance(&NewInstance {
                        deployment: d.id.clone(),
                        runtime: runtime_of(&nodes, &node),
                        node: Some(node),
                        region,
                        resources: project.resources,
                    })
                    .await?;
            }
            store.set_deployment_status(&d.id, DeploymentStatus::Starting, None).await?;
        }
        changed = true;
    }

    // `preparing` is a deployment whose placement was claimed; a crash before it
    // reached `starting` is repaired here like any other step.
    let mut starting = store.list_deployments(&by(DeploymentStatus::Preparing), &Page::first(100)).await?.items;
    starting.extend(store.list_deployments(&by(DeploymentStatus::Starting), &Page::first(100)).await?.items);
    for d in starting {
        // Instances replaced after their node went down no longer count.
        let instances: Vec<_> =
            store.list_instances(&d.id).await?.into_iter().filter(|i| i.status != InstanceStatus::Stopped).collect();
        let broken = instances.iter().find(|i| matches!(i.status, InstanceStatus::Failed | InstanceStatus::Exited));
        if let Some(i) = broken {
            let why = i.exit_reason.clone().unwrap_or_else(|| format!("instance {} {}", i.id, i.status.as_str()));
            store
                .set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&format!("instance {}: {why}", i.id)))
                .await?;
            store.record_event(&system("deployment.fail", &d.id, &d.org, &d.project), "failed").await?;
            changed = true;
        } else if !instances.is_empty() && instances.iter().all(|i| i.status == InstanceStatus::Ready) {
            // Traffic moves only now that every instance is ready; the one it
            // replaces becomes standby and keeps its instances for rollback.
            store.activate_deployment(&d.id, &system("deployment.activate", &d.id, &d.org, &d.project)).await?;
            changed = true;
        } else if now - d.updated_at > chrono::Duration::from_std(config.start_timeout).unwrap_or_default() {
            let reason = format!("instances did not become ready within {} s", config.start_timeout.as_secs());
            store.set_deployment_status(&d.id, DeploymentStatus::Failed, Some(&reason)).await?;
            changed = true;
        }
    }

    let window = chrono::Duration::from_std(config.rollback_window).unwrap_or_default();
    for d in store.list_deployments(&by(DeploymentStatus::Standby), &Page::first(100)).await?.items {
        if now - d.updated_at > window {
            store.set_deployment_status(&d.id, DeploymentStatus::Retired, None).await?;
            store.record_event(&system("deployment.retire", &d.id, &d.org, &d.project), "ok").await?;
            changed = true;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeitwork_api_types::Capacity;

    fn node(id: &str, region: &str, status: NodeStatus, mem: u32, used: u32) -> Node {
        Node {
            id: id.into(),
            hostname: id.into(),
            region: region.into(),
            address: "http://x:1".into(),
            status,
            capacity: Capacity { vcpu: 8, memory: mem },
            allocated: Capacity { vcpu: 0, memory: used },
            instances: 0,
            runtime: "container".into(),
            runtime_detail: None,
            last_heartbeat: None,
            created_at: chrono::Utc::now(),
        }
    }

    const SMALL: Resources = Resources { vcpu: 1, memory: 512 };

    #[test]
    fn spreads_then_packs_and_skips_unusable_nodes() {
        let nodes = vec![
            node("a", "eu", NodeStatus::Ready, 4096, 0),
            node("b", "eu", NodeStatus::Ready, 4096, 2048),
            node("c", "eu", NodeStatus::Draining, 65536, 0),
            node("d", "us", NodeStatus::Ready, 65536, 0),
            node("e", "eu", NodeStatus::Down, 65536, 0),
        ];
        let picked = place(&nodes, "eu", 2, SMALL).unwrap();
        assert_eq!(picked.len(), 2);
        assert_ne!(picked[0], picked[1], "no two on one node while another has room");
        assert!(picked.iter().all(|n| n == "a" || n == "b"));
        // Three on two nodes: one node gets two.
        let picked = place(&nodes, "eu", 3, SMALL).unwrap();
        assert_eq!(picked.iter().filter(|n| *n == "a").count() + picked.iter().filter(|n| *n == "b").count(), 3);
        let err = place(&nodes, "eu", 20, SMALL).unwrap_err();
        assert!(err.contains("lacks capacity"), "{err}");
        assert!(place(&nodes, "ap", 1, SMALL).unwrap_err().contains("no ready node"));
    }
}
