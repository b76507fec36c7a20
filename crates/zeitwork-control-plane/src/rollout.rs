//! Releases after a deployment is ready: canary steps and the watch for
//! regressions after the switch, both judged by the traffic figures edges
//! report per deployment (`analyse`, pure), and the automatic rollback when
//! a new deployment does worse than the one it replaced.
//!
//! Before any of that, a deployment may run a shadow stage: copies of a
//! share of live requests reach it, their answers are thrown away, and the
//! same analysis decides whether it may take its environment at all.
//!
//! The engine calls [`on_ready`] instead of switching at once, and [`pass`]
//! once per tick. Loops are impossible by construction: only activations of
//! new deployments are watched (a rollback is not), and a deployment sent
//! back is `rolled_back`, which nothing switches to on its own.

use zeitwork_api_types::{
    Analysis, AutoRollback, Deployment, DeploymentStatus, DeploymentTraffic, Environment, RolloutState, RolloutStatus,
};
use zeitwork_store::{Audit, NewRollout, Store, StoreError};

use crate::engine::EngineConfig;

/// A p95 latency regression must also be at least this much slower, so
/// sub-millisecond noise (and the histogram's 19 % buckets) never decide.
pub const LATENCY_FLOOR_MS: f64 = 20.0;

/// What the figures of one window say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Fewer than `min_requests` requests: nothing is decided (an edge that
    /// stops reporting never causes a rollback).
    Insufficient,
    Healthy,
    /// Why, for people.
    Regressed(String),
    /// The p95 latency regressed in this window; it counts once it has held
    /// for a whole window (see [`settle`]).
    Slower(String),
}

/// Judges a candidate's figures against its baseline's, by the rules of
/// `docs/releases.md`: a 5xx share above `error_rate` and above twice the
/// baseline's, or a p95 latency above `latency_factor` times the
/// baseline's (and at least [`LATENCY_FLOOR_MS`] slower), over at least
/// `min_requests` requests. A baseline with too few requests counts as
/// error-free and has no latency to compare with.
pub fn analyse(candidate: &DeploymentTraffic, baseline: &DeploymentTraffic, s: &AutoRollback) -> (Verdict, Analysis) {
    let min = u64::from(s.min_requests);
    let base_known = baseline.requests >= min;
    let mut analysis = Analysis {
        requests: candidate.requests,
        errors: candidate.errors,
        p95_ms: candidate.p95_ms(),
        baseline_requests: baseline.requests,
        baseline_errors: baseline.errors,
        baseline_p95_ms: baseline.p95_ms(),
        verdict: "insufficient".into(),
        slower_since: None,
    };
    if candidate.requests < min {
        return (Verdict::Insufficient, analysis);
    }
    let rate = candidate.error_rate();
    let base_rate = if base_known { baseline.error_rate() } else { 0.0 };
    let verdict = if rate > s.error_rate && rate > 2.0 * base_rate {
        Verdict::Regressed(format!(
            "5xx rate {:.1} % over {} requests in the last {} s (previous deployment {:.1} %, threshold {:.1} %)",
            rate * 100.0,
            candidate.requests,
            s.window_secs,
            base_rate * 100.0,
            s.error_rate * 100.0
        ))
    } else {
        match (analysis.p95_ms, analysis.baseline_p95_ms.filter(|_| base_known)) {
            (Some(p), Some(b)) if p > s.latency_factor * b && p - b >= LATENCY_FLOOR_MS => Verdict::Slower(format!(
                "p95 latency {p:.0} ms over {} requests in the last {} s, {:.1}x the previous deployment's {b:.0} ms (threshold {}x)",
                candidate.requests,
                s.window_secs,
                p / b,
                s.latency_factor
            )),
            _ => Verdict::Healthy,
        }
    };
    analysis.verdict = match verdict {
        Verdict::Regressed(_) => "regressed",
        Verdict::Slower(_) => "slower",
        _ => "healthy",
    }
    .into();
    (verdict, analysis)
}

/// What a verdict means now, given the analysis before it: errors act at
/// once; a slower p95 only once it has held for `window_secs` (a handful of
/// slow answers — a new instance's first requests, a busy machine — passes).
/// Returns why to roll back, if it is time, and the analysis to keep.
pub fn settle(
    verdict: Verdict,
    mut analysis: Analysis,
    before: Option<&Analysis>,
    now: chrono::DateTime<chrono::Utc>,
    window_secs: u32,
) -> (Option<String>, Analysis) {
    match verdict {
        Verdict::Regressed(why) => (Some(why), analysis),
        Verdict::Slower(why) => {
            let since = before.filter(|b| b.verdict == "slower").and_then(|b| b.slower_since).unwrap_or(now);
            analysis.slower_since = Some(since);
            let held = (now - since).num_seconds();
            if held >= i64::from(window_secs) {
                analysis.verdict = "regressed".into();
                (Some(format!("{why}, for {held} s")), analysis)
            } else {
                (None, analysis)
            }
        }
        Verdict::Insufficient | Verdict::Healthy => (None, analysis),
    }
}

/// The target of an automatic rollback: the baseline, only while it runs
/// (standby or still active) and never one that was itself rolled back.
pub fn rollback_target(baseline: Option<&Deployment>) -> Result<&Deployment, String> {
    match baseline {
        None => Err("no earlier deployment served the environment".into()),
        Some(b) if matches!(b.status, DeploymentStatus::Standby | DeploymentStatus::Active) => Ok(b),
        Some(b) => {
            Err(format!("the previous deployment {} is {} and cannot take the traffic back", b.id, b.status.as_str()))
        }
    }
}

fn system(action: &str, d: &Deployment) -> Audit {
    Audit::new("system", action, &d.id).org(&d.org).project(&d.project)
}

/// The slot of `d`'s environment in its project's current deployments.
fn slot(d: &Deployment) -> String {
    match (d.environment, d.pull_request) {
        (Environment::Preview, Some(n)) => zeitwork_store::preview_slot(n),
        (env, _) => env.as_str().to_owned(),
    }
}

fn canary_reason(r: &[u32], step: usize, env: Environment) -> String {
    format!("canary: {} % of {} (step {} of {})", r[step], env.as_str(), step + 1, r.len())
}

/// A deployment's instances are all ready: with a `rollout` setting and a
/// deployment serving its environment, a canary begins; otherwise it takes
/// the environment at once (watched for regressions when automatic rollback
/// is on and there is something to roll back to). Running it twice changes
/// nothing the second time.
pub async fn on_ready(store: &Store, config: &EngineConfig, d: &Deployment) -> Result<bool, StoreError> {
    let project = store.get_project(&d.org, &d.project).await?;
    let s = project.auto_rollback;
    let baseline = project.current_deployment.get(&slot(d)).filter(|c| **c != d.id).cloned();
    let baseline_active = match &baseline {
        Some(b) => store.get_deployment(b).await?.status == DeploymentStatus::Active,
        None => false,
    };
    let now = chrono::Utc::now().timestamp_millis();
    // A newer deployment supersedes a canary still running in its environment:
    // that one leaves the split and stays in standby (it sleeps when idle).
    for r in store.open_rollouts().await? {
        if r.state != RolloutState::Canary || r.deployment == d.id || r.environment != d.environment {
            continue;
        }
        let other = store.get_deployment(&r.deployment).await?;
        if other.org == d.org && other.project == d.project && other.pull_request == d.pull_request {
            store.finish_rollout(&other.id, Some(&format!("superseded by {}", d.id))).await?;
            store.claim_deployment(&other.id, DeploymentStatus::Ready, DeploymentStatus::Standby).await?;
            tracing::info!(deployment = %other.id, by = %d.id, "a newer deployment superseded a canary");
        }
    }
    // Shadow traffic comes first: the candidate is judged on copies of live
    // requests before any client's request reaches it.
    let shadow = store.deployment_shadow(&d.id).await?.or(project.shadow);
    if let Some(sh) = shadow.filter(|_| baseline_active && d.pull_request.is_none()) {
        store.set_deployment_shadow(&d.id, &sh).await?;
        store
            .start_rollout(&NewRollout {
                deployment: d.id.clone(),
                environment: d.environment,
                baseline: baseline.clone(),
                state: RolloutState::Shadow,
                steps: Vec::new(),
                step_secs: sh.secs,
                watch_until: None,
            })
            .await?;
        if store.claim_deployment(&d.id, d.status, DeploymentStatus::Ready).await? {
            tracing::info!(deployment = %d.id, share = sh.share, secs = sh.secs, "shadow traffic began");
        }
        return Ok(true);
    }
    let spec = store.deployment_rollout(&d.id).await?.or(project.rollout);
    let canary = spec.filter(|r| baseline_active && d.pull_request.is_none() && r.steps.len() > 1);
    if let Some(r) = canary {
        store
            .start_rollout(&NewRollout {
                deployment: d.id.clone(),
                environment: d.environment,
                baseline: baseline.clone(),
                state: RolloutState::Canary,
                steps: r.steps.clone(),
                step_secs: r.step_secs,
                watch_until: None,
            })
            .await?;
        if store.claim_deployment(&d.id, d.status, DeploymentStatus::Ready).await? {
            let reason = canary_reason(&r.steps, 0, d.environment);
            let audit = system("rollout.step", d).detail(serde_json::json!({"step": 0, "weight": r.steps[0]}));
            store.set_rollout_step(&d.id, 0, &reason, &audit).await?;
            tracing::info!(deployment = %d.id, weight = r.steps[0], "canary rollout began");
        }
        return Ok(true);
    }
    if s.enabled && baseline.is_some() {
        store
            .start_rollout(&NewRollout {
                deployment: d.id.clone(),
                environment: d.environment,
                baseline,
                state: RolloutState::Watching,
                steps: Vec::new(),
                step_secs: 0,
                watch_until: Some(now + i64::from(s.watch_secs) * 1000),
            })
            .await?;
    }
    // Traffic moves only now that every instance is ready; the one it
    // replaces becomes standby and keeps its instances for rollback.
    store.activate_deployment(&d.id, &system("deployment.activate", d)).await?;
    config.outcomes.count(DeploymentStatus::Active);
    Ok(true)
}

/// Whether `id` is the rollback target of a rollout still moving (it stays
/// awake for it).
pub async fn is_baseline(store: &Store, id: &str) -> Result<bool, StoreError> {
    Ok(store.open_rollouts().await?.iter().any(|r| r.baseline.as_deref() == Some(id)))
}

/// Moves every open rollout one step: analyses its figures, rolls back a
/// regression, advances canary steps whose time is up, ends watches.
pub async fn pass(store: &Store, config: &EngineConfig) -> Result<bool, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut changed = false;
    for r in store.open_rollouts().await? {
        changed |= step(store, config, &r, now).await?;
    }
    Ok(changed)
}

/// Moves one open rollout one step (see [`pass`]).
pub(crate) async fn step(
    store: &Store,
    config: &EngineConfig,
    r: &RolloutStatus,
    now: i64,
) -> Result<bool, StoreError> {
    let d = match store.get_deployment(&r.deployment).await {
        Ok(d) => d,
        Err(StoreError::NotFound(_)) => {
            store.finish_rollout(&r.deployment, Some("the deployment is gone")).await?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let project = store.get_project(&d.org, &d.project).await?;
    let s = project.auto_rollback;
    let window = i64::from(s.window_secs) * 1000;
    let started = r.started_at.timestamp_millis();
    match r.state {
        RolloutState::Shadow => {
            if d.status != DeploymentStatus::Ready {
                let why = format!("the shadow stage ended: the deployment is {}", d.status.as_str());
                store.finish_rollout(&d.id, Some(&why)).await?;
                return Ok(true);
            }
            // Copies are judged against what answers the clients now, over the
            // last window of the stage.
            let current = project.current_deployment.get(&slot(&d)).cloned();
            let from = started.max(now - window);
            let cand = store.traffic_between(&d.id, from, now + 1).await?;
            let base = match &current {
                Some(c) => store.traffic_between(c, from, now + 1).await?,
                None => DeploymentTraffic::default(),
            };
            let (verdict, analysis) = analyse(&cand, &base, &s);
            let at = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(chrono::Utc::now);
            let (regressed, analysis) = settle(verdict, analysis, r.analysis.as_ref(), at, s.window_secs);
            if r.analysis.as_ref() != Some(&analysis) {
                store.set_rollout_analysis(&d.id, &analysis).await?;
            }
            let rec = crate::engine::reconcile(store, config, &d, d.instances_per_region, at).await?;
            let over = now >= started + i64::from(r.step_secs) * 1000;
            match shadow_decision(regressed, over, rec.ready) {
                ShadowDecision::Wait => Ok(rec.placed),
                ShadowDecision::Block(why) => roll_back(store, config, &d, None, r, &why, now).await,
                ShadowDecision::Switch => {
                    let watch_until = s.enabled.then_some(now + i64::from(s.watch_secs) * 1000);
                    let audit =
                        system("deployment.activate", &d).detail(serde_json::json!({"shadow_secs": r.step_secs}));
                    store.promote_rollout(&d.id, watch_until, &audit).await?;
                    config.outcomes.count(DeploymentStatus::Active);
                    tracing::info!(deployment = %d.id, "shadow traffic passed; the deployment took its environment");
                    Ok(true)
                }
            }
        }
        RolloutState::Canary => {
            if d.status != DeploymentStatus::Ready {
                let why = format!("the canary ended: the deployment is {}", d.status.as_str());
                store.finish_rollout(&d.id, Some(&why)).await?;
                return Ok(true);
            }
            // The canary is judged against what serves the rest of the environment now.
            let current = project.current_deployment.get(&slot(&d)).cloned();
            if s.enabled {
                let from = started.max(now - window);
                let cand = store.traffic_between(&d.id, from, now + 1).await?;
                let base = match &current {
                    Some(c) => store.traffic_between(c, from, now + 1).await?,
                    None => DeploymentTraffic::default(),
                };
                let (verdict, analysis) = analyse(&cand, &base, &s);
                let at = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(chrono::Utc::now);
                let (regressed, analysis) = settle(verdict, analysis, r.analysis.as_ref(), at, s.window_secs);
                if r.analysis.as_ref() != Some(&analysis) {
                    store.set_rollout_analysis(&d.id, &analysis).await?;
                }
                if let Some(why) = regressed {
                    let weight = r.weight;
                    return roll_back(store, config, &d, None, r, &format!("canary at {weight} %: {why}"), now).await;
                }
            }
            // The candidate keeps its instances like an active deployment; a step
            // passes only while all of them are ready.
            let utc = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(chrono::Utc::now);
            let rec = crate::engine::reconcile(store, config, &d, d.instances_per_region, utc).await?;
            let step_ends = r.step_started_at.timestamp_millis() + i64::from(r.step_secs) * 1000;
            if now < step_ends || !rec.ready {
                return Ok(rec.placed);
            }
            let next = r.step as usize + 1;
            if next + 1 >= r.steps.len() {
                let watch_until = s.enabled.then_some(now + i64::from(s.watch_secs) * 1000);
                let audit = system("deployment.activate", &d).detail(serde_json::json!({"rollout": r.steps}));
                store.promote_rollout(&d.id, watch_until, &audit).await?;
                config.outcomes.count(DeploymentStatus::Active);
                tracing::info!(deployment = %d.id, "canary passed every step; the deployment took its environment");
            } else {
                let reason = canary_reason(&r.steps, next, d.environment);
                let audit =
                    system("rollout.step", &d).detail(serde_json::json!({"step": next, "weight": r.steps[next]}));
                store.set_rollout_step(&d.id, next as u32, &reason, &audit).await?;
                tracing::info!(deployment = %d.id, weight = r.steps[next], "canary moved to its next step");
            }
            Ok(true)
        }
        RolloutState::Watching => {
            let until = r.watch_until.map_or(now, |t| t.timestamp_millis());
            if d.status != DeploymentStatus::Active {
                let why = format!("the watch ended: the deployment is {}", d.status.as_str());
                store.finish_rollout(&d.id, Some(&why)).await?;
                return Ok(false);
            }
            if now >= until || !s.enabled {
                store.finish_rollout(&d.id, None).await?;
                return Ok(false);
            }
            let activated = r.activated_at.map_or(started, |t| t.timestamp_millis());
            let cand = store.traffic_between(&d.id, activated.max(now - window), now + 1).await?;
            let baseline = match &r.baseline {
                Some(b) => match store.get_deployment(b).await {
                    Ok(b) => Some(b),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let base = match &baseline {
                Some(b) => store.traffic_between(&b.id, started.min(activated) - window, activated).await?,
                None => DeploymentTraffic::default(),
            };
            let (verdict, analysis) = analyse(&cand, &base, &s);
            let at = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(chrono::Utc::now);
            let (regressed, analysis) = settle(verdict, analysis, r.analysis.as_ref(), at, s.window_secs);
            if r.analysis.as_ref() != Some(&analysis) {
                store.set_rollout_analysis(&d.id, &analysis).await?;
            }
            let Some(why) = regressed else { return Ok(false) };
            let target = match rollback_target(baseline.as_ref()) {
                Ok(t) => across_migration(store, &d, t, r.environment).await?,
                Err(e) => Err(e),
            };
            match target {
                Ok(target) => roll_back(store, config, &d, Some(target), r, &why, now).await,
                Err(cannot) => {
                    // Told once: the watch ends here.
                    let reason = format!("regressed, not rolled back: {why}; {cannot}");
                    let audit = system("deployment.auto_rollback", &d)
                        .detail(serde_json::json!({"reason": reason, "rolled_back": false}));
                    store.record_event(&audit, "failed").await?;
                    store.finish_rollout(&d.id, Some(&reason)).await?;
                    tracing::warn!(deployment = %d.id, %reason, "a regression could not be rolled back");
                    Ok(true)
                }
            }
        }
        RolloutState::Done | RolloutState::RolledBack => Ok(false),
    }
}

/// `to`, unless going back to it from `d` passes a deployment that migrated
/// data: that is left to a person (`zeitwork rollback --force`).
async fn across_migration<'a>(
    store: &Store,
    d: &Deployment,
    to: &'a Deployment,
    env: Environment,
) -> Result<Result<&'a Deployment, String>, StoreError> {
    Ok(match store.rollback_crosses_migration(&d.id, &to.id, env).await? {
        Some(m) => Err(format!(
            "going back to {} would pass {}, which migrated data; roll back by hand with --force if the data allows",
            to.id, m.id
        )),
        None => Ok(to),
    })
}

/// Sends `d` back: to `to` when it serves its environment, out of the
/// canary otherwise; records why with the count of failed requests.
/// What a shadow stage does next.
#[derive(Debug, PartialEq)]
pub enum ShadowDecision {
    /// Copies go on.
    Wait,
    /// The copies regressed: the candidate never takes traffic.
    Block(String),
    /// The stage passed: the candidate takes its environment.
    Switch,
}

/// A regression blocks the switch at once (errors at once, a slower p95
/// once it has held for a window, as [`settle`] says); otherwise the switch
/// waits for the end of the stage and for every instance to be ready.
pub fn shadow_decision(regressed: Option<String>, over: bool, ready: bool) -> ShadowDecision {
    match regressed {
        Some(why) => ShadowDecision::Block(format!("shadow traffic: {why}")),
        None if over && ready => ShadowDecision::Switch,
        None => ShadowDecision::Wait,
    }
}

async fn roll_back(
    store: &Store,
    config: &EngineConfig,
    d: &Deployment,
    to: Option<&Deployment>,
    r: &RolloutStatus,
    why: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let served = store.traffic_between(&d.id, r.started_at.timestamp_millis(), now + 1).await?;
    let reason = match to {
        Some(to) => format!(
            "rolled back automatically to {}: {why}; {} of {} requests failed since the switch",
            to.id, served.errors, served.requests
        ),
        None if r.state == RolloutState::Shadow => format!(
            "never switched to: {why}; {} of {} copied requests failed, no client saw them",
            served.errors, served.requests
        ),
        None => format!(
            "canary aborted automatically: {why}; {} of {} requests failed during the rollout",
            served.errors, served.requests
        ),
    };
    let audit = system("deployment.auto_rollback", d).detail(serde_json::json!({
        "reason": reason,
        "to": to.map(|t| t.id.clone()),
        "environment": r.environment,
        "stage": r.state,
        "weight": r.weight,
        "requests": served.requests,
        "failed_requests": served.errors,
    }));
    let stop_after = now + config.drain_grace.as_millis() as i64;
    let done = store.roll_back_release(&d.id, to, &reason, stop_after, &audit).await?;
    if done {
        config.outcomes.count(DeploymentStatus::RolledBack);
        tracing::warn!(deployment = %d.id, to = ?to.map(|t| &t.id), failed = served.errors, %reason, "automatic rollback");
    }
    Ok(done)
}

/// A person's word on a rollout: `promote` moves a canary to 100 now (the
/// watch still follows), `abort` sends it back (from a canary or a watch).
/// The inner `Err` says why the rollout cannot be decided on (a conflict).
pub async fn decide(
    store: &Store,
    drain_grace: std::time::Duration,
    d: &Deployment,
    promote: bool,
    actor: Audit,
) -> Result<Result<RolloutStatus, String>, StoreError> {
    let Some(r) = store.get_rollout(&d.id).await? else {
        return Ok(Err(format!("{} has no rollout", d.id)));
    };
    let project = store.get_project(&d.org, &d.project).await?;
    let now = chrono::Utc::now().timestamp_millis();
    match (promote, r.state) {
        (true, RolloutState::Canary) => {
            let s = project.auto_rollback;
            let watch_until = s.enabled.then_some(now + i64::from(s.watch_secs) * 1000);
            store.promote_rollout(&d.id, watch_until, &actor).await?;
        }
        (false, RolloutState::Canary | RolloutState::Watching) => {
            let baseline = match &r.baseline {
                Some(b) => store.get_deployment(b).await.ok(),
                None => None,
            };
            let to = if r.state == RolloutState::Watching {
                let target = match rollback_target(baseline.as_ref()) {
                    Ok(t) => across_migration(store, d, t, r.environment).await?,
                    Err(e) => Err(e),
                };
                match target {
                    Ok(t) => Some(t),
                    Err(e) => return Ok(Err(format!("cannot abort: {e}"))),
                }
            } else {
                None
            };
            let reason = match to {
                Some(to) => format!("rolled back to {} by {}", to.id, actor.actor),
                None => format!("canary aborted by {}", actor.actor),
            };
            let stop_after = now + drain_grace.as_millis() as i64;
            let audit = actor.detail(serde_json::json!({"reason": reason, "to": to.map(|t| t.id.clone())}));
            store.roll_back_release(&d.id, to, &reason, stop_after, &audit).await?;
        }
        (_, state) => {
            return Ok(Err(format!(
                "the rollout of {} is {}; only a canary can be promoted, and a canary or a watch aborted",
                d.id,
                state.as_str()
            )))
        }
    }
    match store.get_rollout(&d.id).await? {
        Some(r) => Ok(Ok(r)),
        None => Ok(Err(format!("{} has no rollout", d.id))),
    }
}

#[cfg(test)]
mod tests;
