//! Sleep and wake: standby deployments nobody uses go to sleep, room is made
//! for a waiting deployment by putting idle ones to sleep, and a sleeping
//! deployment asked for is woken with its instances placed again.

use super::*;

/// Standby deployments (replaced, or woken from sleep) that nobody uses go to sleep:
/// a replaced one after the rollback window, a woken one after its project's
/// `sleep_after_secs`, and neither while requests keep arriving within that time.
pub(super) async fn sleep_idle(
    store: &Store,
    config: &EngineConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    let now_ms = now.timestamp_millis();
    const STANDBY: [DeploymentStatus; 1] = [DeploymentStatus::Standby];
    let projects = store.projects_of_deployments_in(&STANDBY).await?;
    for (d, w) in store.deployments_in(&STANDBY).await? {
        let sleep_after_secs = match projects.get(&(d.org.clone(), d.project.clone())) {
            Some(p) => p.sleep_after_secs,
            // Created or moved since the projects were read.
            None => store.get_project(&d.org, &d.project).await?.sleep_after_secs,
        };
        let idle_ms = i64::from(sleep_after_secs) * 1000;
        let since = match w.woken_at {
            Some(woken) => woken + idle_ms,
            None => d.updated_at.timestamp_millis() + config.rollback_window.as_millis() as i64,
        };
        let recent = w.last_request_at.is_some_and(|at| at + idle_ms > now_ms);
        // The rollback target of a rollout still moving stays awake for it.
        if now_ms >= since && !recent && !crate::rollout::is_baseline(store, &d.id).await? {
            let audit = system("deployment.sleep", &d.id, &d.org, &d.project);
            if store.sleep_deployment(&d.id, "idle: no environment points at it and no requests came", &audit).await? {
                tracing::info!(deployment = %d.id, "deployment went to sleep");
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// Frees room in `region` for `waiting`: the standby deployment holding
/// capacity there that was replaced longest ago goes to sleep early (it wakes
/// on its next request). One per pass, so nothing sleeps that need not.
pub(super) async fn make_room(store: &Store, region: &str, waiting: &str) -> Result<bool, StoreError> {
    const STANDBY: [DeploymentStatus; 1] = [DeploymentStatus::Standby];
    let mut standby = all_with(store, DeploymentStatus::Standby).await?;
    standby.sort_by_key(|d| d.updated_at);
    let holding: std::collections::HashSet<String> = store
        .instance_tallies(&STANDBY)
        .await?
        .into_iter()
        .filter(|t| {
            t.region == region
                && !matches!(t.status, InstanceStatus::Stopped | InstanceStatus::Failed | InstanceStatus::Exited)
        })
        .map(|t| t.deployment)
        .collect();
    for d in standby {
        if !holding.contains(&d.id) {
            continue;
        }
        let audit = system("deployment.sleep", &d.id, &d.org, &d.project)
            .detail(serde_json::json!({"reason": "room for another deployment", "for": waiting}));
        if store.sleep_deployment(&d.id, &format!("slept early to make room for {waiting}"), &audit).await? {
            tracing::info!(deployment = %d.id, %waiting, "a standby deployment went to sleep early to make room");
            return Ok(true);
        }
    }
    Ok(false)
}

/// Waking deployments: an instance per region (all of `instances_per_region`
/// for a rollback) is placed and started; once ready, a rollback switches
/// its environment over and a woken one serves as standby. One that cannot
/// come up goes back to sleep with the reason, its URL still working.
pub(super) async fn wake(
    store: &Store,
    config: &EngineConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    for d in all_with(store, DeploymentStatus::Waking).await? {
        changed |= wake_one(store, config, &d, now).await?;
    }
    Ok(changed)
}

/// One step of waking `d` (see [`wake`]).
pub(super) async fn wake_one(
    store: &Store,
    config: &EngineConfig,
    d: &Deployment,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    let w = store.wakefulness(&d.id).await?;
    let desired = if w.wake_for.is_some() { d.instances_per_region } else { 1 };
    let r = reconcile(store, config, d, desired, now).await?;
    changed |= r.placed;
    let woken_ms = w.woken_at.unwrap_or_else(|| d.updated_at.timestamp_millis());
    let waited = now.timestamp_millis() - woken_ms;
    if r.ready {
        match w.wake_for {
            Some(env) => {
                let audit = system("deployment.rollback", &d.id, &d.org, &d.project)
                    .detail(serde_json::json!({"environment": env, "woken": true}));
                store.point_environment(&d.id, env, &audit).await?;
                tracing::info!(deployment = %d.id, environment = env.as_str(), "woken deployment took over its environment");
            }
            None => {
                store.finish_waking(&d.id).await?;
                tracing::info!(deployment = %d.id, waited_ms = waited, "deployment woke");
            }
        }
        changed = true;
    } else if let Some(why) = r.stuck {
        changed |= store.back_to_sleep(&d.id, &format!("could not wake: {why}")).await?;
    } else if waited > config.start_timeout.as_millis() as i64 {
        let why = format!("could not wake: no instance was ready within {} s", config.start_timeout.as_secs());
        changed |= store.back_to_sleep(&d.id, &why).await?;
    } else if r.short_of_room.is_some() && waited > config.placement_timeout.as_millis() as i64 {
        let why = format!("could not wake: {}", r.short_of_room.unwrap_or_default());
        changed |= store.back_to_sleep(&d.id, &why).await?;
    } else if let Some(region) = r.room_needed_in {
        changed |= make_room(store, &region, &d.id).await?;
    }
    Ok(changed)
}
