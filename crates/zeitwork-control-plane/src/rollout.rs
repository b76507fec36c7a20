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

use std::sync::atomic::{AtomicI64, Ordering};

use zeitwork_api_types::{
    Analysis, AutoRollback, Deployment, DeploymentStatus, DeploymentTraffic, Environment, RolloutState, RolloutStatus,
};
use zeitwork_store::{Audit, NewRollout, Store, StoreError};

use crate::engine::EngineConfig;

/// A p95 latency regression must also be at least this much slower, so
/// sub-millisecond noise (and the histogram's 19 % buckets) never decide.
pub const LATENCY_FLOOR_MS: f64 = 20.0;

/// Traffic figures are kept this long (the longest window is an hour).
const KEEP_TRAFFIC_MS: i64 = 2 * 3600 * 1000;

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
pub async fn on_ready(store: &Store, d: &Deployment) -> Result<bool, StoreError> {
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
    Ok(true)
}

/// Whether `id` is the rollback target of a rollout still moving (it stays
/// awake for it).
pub async fn is_baseline(store: &Store, id: &str) -> Result<bool, StoreError> {
    Ok(store.open_rollouts().await?.iter().any(|r| r.baseline.as_deref() == Some(id)))
}

static LAST_PRUNE: AtomicI64 = AtomicI64::new(0);

/// Moves every open rollout one step: analyses its figures, rolls back a
/// regression, advances canary steps whose time is up, ends watches.
pub async fn pass(store: &Store, config: &EngineConfig) -> Result<bool, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    if now - LAST_PRUNE.load(Ordering::Relaxed) > 60_000 {
        LAST_PRUNE.store(now, Ordering::Relaxed);
        store.prune_traffic(now - KEEP_TRAFFIC_MS).await?;
    }
    let mut changed = false;
    for r in store.open_rollouts().await? {
        changed |= step(store, config, &r, now).await?;
    }
    Ok(changed)
}

async fn step(store: &Store, config: &EngineConfig, r: &RolloutStatus, now: i64) -> Result<bool, StoreError> {
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
mod tests {
    use super::*;
    use std::time::Duration;

    fn traffic(ok: u64, failed: u64, ms: u64) -> DeploymentTraffic {
        let mut t = DeploymentTraffic::default();
        for _ in 0..ok {
            t.observe(200, Duration::from_millis(ms));
        }
        for _ in 0..failed {
            t.observe(500, Duration::from_millis(ms));
        }
        t
    }

    fn regressed(v: &Verdict) -> bool {
        matches!(v, Verdict::Regressed(_))
    }

    fn slower(v: &Verdict) -> bool {
        matches!(v, Verdict::Slower(_))
    }

    #[test]
    fn too_few_requests_decide_nothing() {
        let s = AutoRollback::default();
        let (v, a) = analyse(&traffic(0, 49, 5), &traffic(1000, 0, 5), &s);
        assert_eq!(v, Verdict::Insufficient);
        assert_eq!(a.verdict, "insufficient");
        // Silence (an edge that stopped reporting) is not a regression either.
        assert_eq!(analyse(&DeploymentTraffic::default(), &traffic(1000, 0, 5), &s).0, Verdict::Insufficient);
    }

    #[test]
    fn errors_must_pass_the_threshold_and_double_the_baseline() {
        let s = AutoRollback::default();
        // 10 % against 0 %: regressed.
        let (v, _) = analyse(&traffic(90, 10, 5), &traffic(1000, 0, 5), &s);
        assert!(regressed(&v), "{v:?}");
        // 4 % is below the 5 % threshold.
        assert_eq!(analyse(&traffic(96, 4, 5), &traffic(1000, 0, 5), &s).0, Verdict::Healthy);
        // 10 % against a baseline of 6 %: not twice as bad.
        assert_eq!(analyse(&traffic(90, 10, 5), &traffic(940, 60, 5), &s).0, Verdict::Healthy);
        // 30 % against 6 %: regressed.
        assert!(regressed(&analyse(&traffic(70, 30, 5), &traffic(940, 60, 5), &s).0));
        // A baseline with too few requests counts as error-free.
        assert!(regressed(&analyse(&traffic(90, 10, 5), &traffic(3, 3, 5), &s).0));
        // The message says what was seen.
        let Verdict::Regressed(why) = analyse(&traffic(0, 100, 5), &traffic(100, 0, 5), &s).0 else { panic!() };
        assert!(why.contains("5xx rate 100.0 %") && why.contains("100 requests"), "{why}");
    }

    #[test]
    fn latency_must_pass_the_factor_and_the_floor() {
        let s = AutoRollback::default();
        assert!(slower(&analyse(&traffic(100, 0, 300), &traffic(100, 0, 50), &s).0));
        assert_eq!(analyse(&traffic(100, 0, 80), &traffic(100, 0, 50), &s).0, Verdict::Healthy);
        // 3 ms against 1 ms is three times, but below the floor: noise.
        assert_eq!(analyse(&traffic(100, 0, 3), &traffic(100, 0, 1), &s).0, Verdict::Healthy);
        // Without a baseline's latency there is nothing to compare with.
        assert_eq!(analyse(&traffic(100, 0, 3000), &traffic(10, 0, 5), &s).0, Verdict::Healthy);
        let strict = AutoRollback { latency_factor: 1.2, ..Default::default() };
        assert!(slower(&analyse(&traffic(100, 0, 80), &traffic(100, 0, 50), &strict).0));
    }

    #[test]
    fn errors_act_at_once_and_a_slower_p95_once_it_held_a_window() {
        let s = AutoRollback::default();
        let t0 = chrono::Utc::now();
        let (v, a) = analyse(&traffic(0, 100, 5), &traffic(100, 0, 5), &s);
        assert!(settle(v, a, None, t0, s.window_secs).0.is_some(), "errors: at once");
        let slow = || analyse(&traffic(100, 0, 300), &traffic(100, 0, 50), &s);
        let (v, a) = slow();
        let (go, first) = settle(v, a, None, t0, s.window_secs);
        assert!(go.is_none());
        assert_eq!((first.verdict.as_str(), first.slower_since), ("slower", Some(t0)));
        let (v, a) = slow();
        let (go, second) = settle(v, a, Some(&first), t0 + chrono::Duration::seconds(10), s.window_secs);
        assert!(go.is_none(), "10 s of 30");
        assert_eq!(second.slower_since, Some(t0), "held since the first");
        let (v, a) = slow();
        let (go, third) = settle(v, a, Some(&second), t0 + chrono::Duration::seconds(31), s.window_secs);
        assert!(go.as_deref().unwrap_or("").contains("for 31 s"), "{go:?}");
        assert_eq!(third.verdict, "regressed");
        // A healthy window in between starts the count again.
        let (v, a) = analyse(&traffic(100, 0, 50), &traffic(100, 0, 50), &s);
        let (_, healthy) = settle(v, a, Some(&second), t0 + chrono::Duration::seconds(20), s.window_secs);
        let (v, a) = slow();
        let (go, again) = settle(v, a, Some(&healthy), t0 + chrono::Duration::seconds(40), s.window_secs);
        assert!(go.is_none());
        assert_eq!(again.slower_since, Some(t0 + chrono::Duration::seconds(40)));
    }

    #[test]
    fn two_edges_add_up() {
        let s = AutoRollback::default();
        // Each edge alone saw too few requests; together they decide.
        let (a, b) = (traffic(0, 30, 5), traffic(0, 30, 5));
        assert_eq!(analyse(&a, &traffic(100, 0, 5), &s).0, Verdict::Insufficient);
        let mut both = a.clone();
        both.merge(&b);
        assert!(regressed(&analyse(&both, &traffic(100, 0, 5), &s).0));
    }

    fn dep(id: &str, status: DeploymentStatus) -> Deployment {
        Deployment {
            id: id.into(),
            org: "acme".into(),
            project: "web".into(),
            environment: Environment::Production,
            image: "x".into(),
            image_digest: None,
            commit_sha: None,
            commit_message: None,
            instances_per_region: 1,
            status,
            reason: None,
            url: "http://x".into(),
            created_by: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            last_request_at: None,
            pull_request: None,
            build_ms: None,
            release_command: None,
            migration: false,
        }
    }

    /// A store with org `acme`, project `web` (region `eu`, one node) and `n` deployments of it.
    async fn store_with(
        n: usize,
        rollout: Option<zeitwork_api_types::Rollout>,
    ) -> (tempfile::TempDir, Store, Vec<String>) {
        store_migrating(n, rollout, None).await
    }

    /// As [`store_with`], deployment `migrating` (an index) marked as migrating data.
    async fn store_migrating(
        n: usize,
        rollout: Option<zeitwork_api_types::Rollout>,
        migrating: Option<usize>,
    ) -> (tempfile::TempDir, Store, Vec<String>) {
        use zeitwork_api_types::{Capacity, CreateRegion, RegisterNode, Resources};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
        let a = || Audit::new("test", "test", "x");
        store
            .create_region(&CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() }, &a())
            .await
            .unwrap();
        let reg = RegisterNode {
            hostname: "n1".into(),
            region: "eu".into(),
            address: "http://127.0.0.1:1".into(),
            capacity: Capacity { vcpu: 8, memory: 8192 },
            physical: None,
            runtime: Some("container".into()),
            runtime_detail: None,
            tunnel: None,
        };
        store.register_node(&reg, &a()).await.unwrap();
        store.create_org("acme", "acme", None, &a()).await.unwrap();
        let project = zeitwork_store::NewProject {
            org: "acme".into(),
            name: "web".into(),
            github_repo: None,
            branch: "main".into(),
            auto_deploy: false,
            port: 8080,
            resources: Resources { vcpu: 1, memory: 256 },
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
            auto_rollback: AutoRollback { min_requests: 10, ..Default::default() },
            rollout,
            shadow: None,
        };
        let p = store.create_project(&project, &a()).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = format!("web-{i:07}-acme");
            let new = zeitwork_store::NewDeployment {
                id: id.clone(),
                project_id: p.id.clone(),
                org: "acme".into(),
                project: "web".into(),
                environment: Environment::Production,
                image: format!("registry.example.com/web:{i}"),
                commit_sha: None,
                commit_message: None,
                instances_per_region: 1,
                url: format!("http://{id}.x"),
                created_by: None,
                pull_request: None,
                release_command: None,
                migration: migrating == Some(i),
            };
            store.create_deployment(&new, &a()).await.unwrap();
            ids.push(id);
        }
        (dir, store, ids)
    }

    /// What one edge reports for `id`: `ok` answers and `failed` 5xx ones.
    async fn serve(store: &Store, id: &str, ok: u64, failed: u64) {
        let period = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        store
            .record_traffic(
                "edge-1",
                period,
                &std::collections::BTreeMap::from([(id.to_owned(), traffic(ok, failed, 4))]),
            )
            .await
            .unwrap();
    }

    async fn status(store: &Store, id: &str) -> DeploymentStatus {
        store.get_deployment(id).await.unwrap().status
    }

    /// A regression of a deployment that migrated data is not rolled back past
    /// that migration: it is told, and left to a person.
    #[tokio::test]
    async fn a_regression_never_rolls_back_across_a_migration() {
        let (_dir, store, ids) = store_migrating(2, None, Some(1)).await;
        let (one, two) = (&ids[0], &ids[1]);
        let config = EngineConfig::default();
        on_ready(&store, &store.get_deployment(one).await.unwrap()).await.unwrap();
        serve(&store, one, 100, 0).await;
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        serve(&store, two, 0, 20).await;
        pass(&store, &config).await.unwrap();
        assert_eq!(
            (status(&store, one).await, status(&store, two).await),
            (DeploymentStatus::Standby, DeploymentStatus::Active),
            "nothing moved back across the migration"
        );
        let filter = zeitwork_store::EventFilter {
            action: Some("deployment.auto_rollback".into()),
            result: Some("failed".into()),
            ..Default::default()
        };
        let told = store.list_events(&filter, &zeitwork_store::Page::first(5)).await.unwrap().items;
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].detail.as_ref().unwrap()["reason"].as_str().unwrap().contains("migrated data"), "{told:?}");
        assert!(store.open_rollouts().await.unwrap().is_empty(), "the watch ends");
    }

    /// A regression rolls back once; the deployment rolled back to is not
    /// watched, so when it does badly too nothing bounces back and forth.
    #[tokio::test]
    async fn a_regression_rolls_back_once_and_never_loops() {
        let (_dir, store, ids) = store_with(2, None).await;
        let (one, two) = (&ids[0], &ids[1]);
        let config = EngineConfig::default();
        on_ready(&store, &store.get_deployment(one).await.unwrap()).await.unwrap();
        assert!(store.get_rollout(one).await.unwrap().is_none(), "nothing to roll back to: not watched");
        serve(&store, one, 100, 0).await;
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        assert_eq!(status(&store, two).await, DeploymentStatus::Active);
        // Healthy at first; silence and a trickle decide nothing.
        serve(&store, two, 5, 0).await;
        pass(&store, &config).await.unwrap();
        assert_eq!(status(&store, two).await, DeploymentStatus::Active);
        serve(&store, two, 0, 20).await;
        pass(&store, &config).await.unwrap();
        let bad = store.get_deployment(two).await.unwrap();
        assert_eq!(bad.status, DeploymentStatus::RolledBack);
        assert!(bad.reason.as_deref().unwrap_or("").contains("20 of 25 requests failed since the switch"), "{bad:?}");
        assert_eq!(status(&store, one).await, DeploymentStatus::Active);
        // The old one does badly too: it is not watched, nothing moves.
        serve(&store, one, 0, 100).await;
        for _ in 0..3 {
            pass(&store, &config).await.unwrap();
        }
        assert_eq!(
            (status(&store, one).await, status(&store, two).await),
            (DeploymentStatus::Active, DeploymentStatus::RolledBack)
        );
        assert!(store.open_rollouts().await.unwrap().is_empty());
        // And a person cannot abort it twice.
        let again =
            decide(&store, config.drain_grace, &bad, false, Audit::new("test", "rollout.abort", two)).await.unwrap();
        assert!(again.is_err(), "{again:?}");
    }

    /// A canary of a deployment that regresses goes back to 0 %: the
    /// environment never left the deployment serving it, which keeps serving.
    #[tokio::test]
    async fn a_failing_canary_is_aborted_without_touching_the_environment() {
        let rollout = zeitwork_api_types::Rollout { steps: vec![10, 50, 100], step_secs: 60 };
        let (_dir, store, ids) = store_with(3, Some(rollout)).await;
        let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
        let config = EngineConfig::default();
        on_ready(&store, &store.get_deployment(one).await.unwrap()).await.unwrap();
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        let r = store.get_rollout(two).await.unwrap().unwrap();
        assert_eq!((r.state, r.weight, r.baseline.as_deref()), (RolloutState::Canary, 10, Some(one.as_str())));
        assert_eq!(status(&store, two).await, DeploymentStatus::Ready);
        let canaries = store.canaries().await.unwrap();
        assert_eq!((canaries.len(), canaries[0].weight), (1, 10));
        serve(&store, one, 90, 0).await;
        serve(&store, two, 2, 10).await;
        pass(&store, &config).await.unwrap();
        let bad = store.get_deployment(two).await.unwrap();
        assert_eq!(bad.status, DeploymentStatus::RolledBack, "{bad:?}");
        assert!(
            bad.reason.as_deref().unwrap_or("").starts_with("canary aborted automatically: canary at 10 %"),
            "{bad:?}"
        );
        assert!(store.canaries().await.unwrap().is_empty(), "the split is gone");
        assert_eq!(status(&store, one).await, DeploymentStatus::Active);
        // The next deployment rolls out against the one still serving.
        on_ready(&store, &store.get_deployment(three).await.unwrap()).await.unwrap();
        let r = store.get_rollout(three).await.unwrap().unwrap();
        assert_eq!(r.baseline.as_deref(), Some(one.as_str()));
        // Promoted by hand: it takes the environment and is watched.
        let d = store.get_deployment(three).await.unwrap();
        let r = decide(&store, config.drain_grace, &d, true, Audit::new("test", "rollout.promote", three))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.state, r.weight), (RolloutState::Watching, 100));
        assert_eq!(
            (status(&store, three).await, status(&store, one).await),
            (DeploymentStatus::Active, DeploymentStatus::Standby)
        );
    }

    /// A person's abort: a canary goes back to 0 % and the environment stays
    /// where it was; a watched deployment is rolled back to the one it
    /// replaced. Each is recorded with who did it, and nothing is left open.
    #[tokio::test]
    async fn a_person_aborts_a_canary_and_a_watch() {
        let rollout = zeitwork_api_types::Rollout { steps: vec![10, 100], step_secs: 600 };
        let (_dir, store, ids) = store_with(3, Some(rollout)).await;
        let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
        let config = EngineConfig::default();
        on_ready(&store, &store.get_deployment(one).await.unwrap()).await.unwrap();
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        assert_eq!(store.get_rollout(two).await.unwrap().unwrap().state, RolloutState::Canary);

        let d = store.get_deployment(two).await.unwrap();
        let r = decide(&store, config.drain_grace, &d, false, Audit::new("alice", "rollout.abort", two))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.state, RolloutState::RolledBack, "{r:?}");
        let aborted = store.get_deployment(two).await.unwrap();
        assert_eq!(aborted.status, DeploymentStatus::RolledBack);
        assert_eq!(aborted.reason.as_deref(), Some("canary aborted by alice"));
        assert!(store.canaries().await.unwrap().is_empty(), "the split is gone");
        assert_eq!(status(&store, one).await, DeploymentStatus::Active, "the environment never moved");

        // The next one is promoted, then aborted while it is watched: the
        // environment goes back to the deployment it replaced.
        on_ready(&store, &store.get_deployment(three).await.unwrap()).await.unwrap();
        let d = store.get_deployment(three).await.unwrap();
        decide(&store, config.drain_grace, &d, true, Audit::new("alice", "rollout.promote", three))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status(&store, three).await, DeploymentStatus::Active);
        let d = store.get_deployment(three).await.unwrap();
        let r = decide(&store, config.drain_grace, &d, false, Audit::new("bob", "rollout.abort", three))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.state, RolloutState::RolledBack, "{r:?}");
        let back = store.get_deployment(three).await.unwrap();
        assert_eq!(back.status, DeploymentStatus::RolledBack);
        assert_eq!(back.reason.as_deref(), Some(format!("rolled back to {one} by bob").as_str()));
        assert_eq!(status(&store, one).await, DeploymentStatus::Active);
        assert!(store.open_rollouts().await.unwrap().is_empty());
        // An aborted rollout cannot be aborted or promoted again.
        for promote in [false, true] {
            let again = decide(&store, config.drain_grace, &back, promote, Audit::new("bob", "rollout.abort", three))
                .await
                .unwrap();
            assert!(again.unwrap_err().contains("only a canary can be promoted"));
        }
    }

    /// A newer deployment supersedes a canary still running: one split per environment.
    #[tokio::test]
    async fn a_newer_deployment_supersedes_a_running_canary() {
        let rollout = zeitwork_api_types::Rollout { steps: vec![10, 100], step_secs: 600 };
        let (_dir, store, ids) = store_with(3, Some(rollout)).await;
        for id in &ids {
            on_ready(&store, &store.get_deployment(id).await.unwrap()).await.unwrap();
        }
        let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
        let r = store.get_rollout(two).await.unwrap().unwrap();
        assert_eq!(
            (r.state, r.reason.as_deref()),
            (RolloutState::Done, Some(format!("superseded by {three}").as_str()))
        );
        assert_eq!(status(&store, two).await, DeploymentStatus::Standby);
        let canaries = store.canaries().await.unwrap();
        assert_eq!(canaries.iter().map(|c| c.deployment.as_str()).collect::<Vec<_>>(), vec![three.as_str()]);
        assert_eq!(status(&store, one).await, DeploymentStatus::Active);
    }

    #[test]
    fn only_a_running_deployment_that_was_not_rolled_back_takes_traffic_back() {
        assert!(rollback_target(Some(&dep("a", DeploymentStatus::Standby))).is_ok());
        // A rolled-back deployment is never a target: no loop between two bad ones.
        let e = rollback_target(Some(&dep("a", DeploymentStatus::RolledBack))).unwrap_err();
        assert!(e.contains("rolled_back"), "{e}");
        assert!(rollback_target(Some(&dep("a", DeploymentStatus::Sleeping))).is_err());
        assert!(rollback_target(None).is_err());
    }

    #[test]
    fn a_shadow_stage_switches_only_when_over_ready_and_not_regressed() {
        assert_eq!(shadow_decision(None, false, true), ShadowDecision::Wait);
        assert_eq!(shadow_decision(None, true, false), ShadowDecision::Wait, "every instance must be ready");
        assert_eq!(shadow_decision(None, true, true), ShadowDecision::Switch);
        for over in [false, true] {
            match shadow_decision(Some("5xx rate 100 %".into()), over, true) {
                ShadowDecision::Block(why) => assert!(why.contains("shadow traffic: 5xx rate"), "{why}"),
                other => panic!("a regression must block the switch, got {other:?}"),
            }
        }
    }

    /// Copies that fail block the switch: the candidate is sent back without
    /// ever serving a client, and the environment stays where it was.
    #[tokio::test]
    async fn a_shadow_that_regresses_is_never_switched_to() {
        let (_dir, store, ids) = store_with(2, None).await;
        let (one, two) = (&ids[0], &ids[1]);
        let config = EngineConfig::default();
        on_ready(&store, &store.get_deployment(one).await.unwrap()).await.unwrap();
        serve(&store, one, 100, 0).await;
        let sh = zeitwork_api_types::Shadow { share: 50, secs: 600, all_methods: false };
        store.set_deployment_shadow(two, &sh).await.unwrap();
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        on_ready(&store, &store.get_deployment(two).await.unwrap()).await.unwrap();
        assert_eq!(
            (status(&store, one).await, status(&store, two).await),
            (DeploymentStatus::Active, DeploymentStatus::Ready)
        );
        let r = store.get_rollout(two).await.unwrap().unwrap();
        assert_eq!((r.state, r.weight), (RolloutState::Shadow, 0), "no client goes to a shadow");
        let shadows = store.shadows().await.unwrap();
        assert_eq!(
            shadows.iter().map(|s| (s.deployment.as_str(), s.shadow.share)).collect::<Vec<_>>(),
            vec![(two.as_str(), 50)]
        );
        serve(&store, two, 0, 20).await;
        pass(&store, &config).await.unwrap();
        assert_eq!(
            (status(&store, one).await, status(&store, two).await),
            (DeploymentStatus::Active, DeploymentStatus::RolledBack),
            "the candidate was never switched to"
        );
        let project = store.get_project("acme", "web").await.unwrap();
        assert_eq!(project.current_deployment.get("production"), Some(one));
        let r = store.get_rollout(two).await.unwrap().unwrap();
        assert_eq!(r.state, RolloutState::RolledBack);
        let reason = r.reason.unwrap_or_default();
        assert!(reason.contains("never switched to: shadow traffic: 5xx rate"), "{reason}");
        assert!(store.shadows().await.unwrap().is_empty(), "the copies stop");
        let filter =
            zeitwork_store::EventFilter { action: Some("deployment.auto_rollback".into()), ..Default::default() };
        let told = store.list_events(&filter, &zeitwork_store::Page::first(5)).await.unwrap().items;
        assert!(told.iter().any(|e| e.target == *two), "audited and told through the outbox: {told:?}");
    }
}
