//! The autoscaler: for active deployments whose project sets `scaling` with a
//! CPU, memory or concurrency target, it measures their instances (CPU and
//! memory through the node agents, requests in flight from what the edges
//! report) every few seconds and sets how many instances per region they should
//! run (the engine then places or drains them). Scaling up acts at once; scaling
//! down waits for a cool-down, so a short lull does not drop capacity.
//! Only the operator that runs the engine scales. Every change is an audit
//! event (`deployment.scale`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use zeitwork_api_types::{DeploymentStatus, InstanceStatus, Scaling};
use zeitwork_store::{Audit, DeploymentFilter, Page};

use crate::AppState;

/// How often instances are measured.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long after a change a deployment may scale down.
pub const COOL_DOWN: Duration = Duration::from_secs(60);
/// The window requests in flight are averaged over.
pub const CONCURRENCY_WINDOW: Duration = Duration::from_secs(30);

/// What the autoscaler measured of a deployment's ready instances, averaged
/// per instance; `None` where it has no figure.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// CPU use, percent of the instance's vCPU.
    pub cpu: Option<f64>,
    /// Memory use, percent of the instance's limit.
    pub memory: Option<f64>,
    /// Requests in flight.
    pub concurrency: Option<f64>,
}

/// The per-region count `s` asks for, given `current` instances under `load`.
pub fn wanted(s: &Scaling, current: u32, load: Load) -> u32 {
    let current = current.max(1);
    let mut factor: f64 = 0.0;
    for (target, used) in [
        (s.target_cpu_percent, load.cpu),
        (s.target_memory_percent, load.memory),
        (s.target_concurrency, load.concurrency),
    ] {
        if let (Some(t), Some(u)) = (target, used) {
            factor = factor.max(u / f64::from(t));
        }
    }
    let n = (f64::from(current) * factor).ceil() as u32;
    n.clamp(s.min_per_region.max(1), s.max_per_region)
}

struct Sample {
    cpu_seconds: f64,
    at: Instant,
}

/// Measures and scales until `stop`.
pub async fn run(s: AppState, mut stop: watch::Receiver<bool>) {
    let mut samples: HashMap<String, Sample> = HashMap::new();
    let mut changed_at: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if s.leader.get() != 1 {
            continue;
        }
        if let Err(e) = pass(&s, &mut samples, &mut changed_at).await {
            tracing::warn!(error = %e, "autoscaler pass failed; trying again");
        }
    }
}

async fn pass(
    s: &AppState,
    samples: &mut HashMap<String, Sample>,
    changed_at: &mut HashMap<String, Instant>,
) -> Result<(), zeitwork_store::StoreError> {
    let filter = DeploymentFilter { status: Some(DeploymentStatus::Active), ..Default::default() };
    let active = s.store.list_deployments(&filter, &Page::first(500)).await?.items;
    let mut seen = std::collections::HashSet::new();
    for d in active {
        let project = s.store.get_project(&d.org, &d.project).await?;
        let Some(scaling) = project.scaling else { continue };
        if scaling.target_cpu_percent.is_none()
            && scaling.target_memory_percent.is_none()
            && scaling.target_concurrency.is_none()
        {
            continue;
        }
        let ready: Vec<_> =
            s.store.list_instances(&d.id).await?.into_iter().filter(|i| i.status == InstanceStatus::Ready).collect();
        if ready.is_empty() {
            continue;
        }
        let regions = project.regions.len().max(1) as u32;
        let current = (ready.len() as u32).div_ceil(regions);
        let concurrency = match scaling.target_concurrency {
            Some(_) => Some(concurrency(s, &d.id, ready.len()).await?),
            None => None,
        };
        let (mut cpu, mut mem) = (Vec::new(), Vec::new());
        for i in ready {
            let id = i.id.clone();
            seen.insert(id.clone());
            let m = crate::api::logs::instance_metrics(s, i).await;
            if let Some(c) = m.cpu_seconds {
                let now = Instant::now();
                if let Some(prev) = samples.get(&id) {
                    let secs = now.duration_since(prev.at).as_secs_f64();
                    if secs > 0.5 {
                        let share = (c - prev.cpu_seconds).max(0.0) / secs / f64::from(project.resources.vcpu.max(1));
                        cpu.push(share * 100.0);
                    }
                }
                samples.insert(id, Sample { cpu_seconds: c, at: now });
            }
            if let (Some(used), Some(limit)) = (m.memory_bytes, m.memory_limit_bytes.filter(|l| *l > 0)) {
                mem.push(used as f64 * 100.0 / limit as f64);
            }
        }
        let avg = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let load = Load { cpu: avg(&cpu), memory: avg(&mem), concurrency };
        if load == Load::default() {
            continue;
        }
        let target = wanted(&scaling, current, load);
        let before = s.store.wakefulness(&d.id).await?.scale_target.unwrap_or(d.instances_per_region);
        let cooled = changed_at.get(&d.id).is_none_or(|t| t.elapsed() >= COOL_DOWN);
        if target == before || (target < before && !cooled) {
            continue;
        }
        let audit =
            Audit::new("system", "deployment.scale", &d.id).org(&d.org).project(&d.project).detail(serde_json::json!({
                "from": before,
                "to": target,
                "cpu_percent": load.cpu,
                "memory_percent": load.memory,
                "concurrency": load.concurrency,
            }));
        s.store.set_scale_target(&d.id, target, &audit).await?;
        changed_at.insert(d.id.clone(), Instant::now());
        tracing::info!(deployment = %d.id, from = before, to = target, ?load, "autoscaling");
        s.changed();
    }
    samples.retain(|id, _| seen.contains(id));
    Ok(())
}

/// Requests in flight per ready instance of `deployment`, averaged over the
/// last [`CONCURRENCY_WINDOW`] of what the edges reported (Little's law: the
/// time the requests took together, over the window).
async fn concurrency(s: &AppState, deployment: &str, ready: usize) -> Result<f64, zeitwork_store::StoreError> {
    let to = chrono::Utc::now().timestamp_millis();
    let window = CONCURRENCY_WINDOW.as_millis() as i64;
    let traffic = s.store.traffic_between(deployment, to - window, to + 1).await?;
    Ok(traffic.busy_ms() / window as f64 / ready.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_towards_the_target_within_bounds() {
        let s = Scaling {
            min_per_region: 1,
            max_per_region: 5,
            target_cpu_percent: Some(50),
            target_memory_percent: None,
            target_concurrency: None,
        };
        let cpu = |c: f64| Load { cpu: Some(c), ..Load::default() };
        assert_eq!(wanted(&s, 2, cpu(100.0)), 4, "twice the target: twice the instances");
        assert_eq!(wanted(&s, 2, cpu(20.0)), 1, "well under: fewer");
        assert_eq!(wanted(&s, 4, cpu(300.0)), 5, "never above max");
        assert_eq!(wanted(&s, 1, cpu(0.0)), 1, "never below min (at least one)");
        let both = Scaling { target_memory_percent: Some(80), ..s };
        assert_eq!(wanted(&both, 2, Load { memory: Some(160.0), ..cpu(10.0) }), 4, "the tighter resource decides");
        let busy = Scaling { target_concurrency: Some(10), ..both };
        let load = Load { concurrency: Some(25.0), ..cpu(10.0) };
        assert_eq!(wanted(&busy, 2, load), 5, "25 in flight each at a target of 10: 2.5 times the instances");
        assert_eq!(wanted(&both, 2, load), 1, "a concurrency figure without its target counts for nothing");
    }
}
