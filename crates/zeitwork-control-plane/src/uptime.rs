//! The uptime prober: runs due checks (only on the operator holding the
//! engine lease, so a check is probed once per interval) and records each
//! sample and state change. Old samples go in [`crate::retention`].
//! Probes go to the project's address like any visitor's request, or to
//! `uptime_via` (an edge proxy) with the address as its Host. A check probes
//! from each of its regions (by default the project's): this operator's own
//! region itself, every other region through one of its ready node agents;
//! a round failing in some regions only is `degraded`, in all of them a failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use zeitwork_api_types::{HealthCheckSpec, ProbeRequest, ProbeResult};
use zeitwork_store::{Sample, StoredCheck};

use crate::AppState;

/// Probes until `stop`; `nudge` runs due checks at once (a new or changed check).
pub async fn run(s: AppState, nudge: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let http = zeitwork_client::probe::client();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = nudge.notified() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if s.leader.get() != 1 {
            continue;
        }
        let now = chrono::Utc::now().timestamp_millis();
        match s.store.due_checks(now).await {
            Ok(due) => {
                for c in due {
                    let (s, http) = (s.clone(), http.clone());
                    tokio::spawn(async move { probe(&s, &http, c).await });
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading due uptime checks failed"),
        }
    }
}

/// How one round of a check went over its regions: whether it counts as a
/// pass, and whether that pass is `degraded` (slow, or failing in some regions).
pub fn judge(samples: &[Sample], degraded_ms: u32) -> (bool, bool) {
    let passed = samples.iter().filter(|s| s.ok).count();
    let slow = samples.iter().any(|s| s.ok && s.latency_ms > u64::from(degraded_ms));
    match passed {
        0 => (false, false),
        n if n < samples.len() => (true, true),
        _ => (true, slow),
    }
}

/// The regions a check probes from: its own list, else the project's regions, else this operator's.
async fn regions_of(s: &AppState, c: &StoredCheck, spec: &HealthCheckSpec) -> Vec<String> {
    if !spec.regions.is_empty() {
        return spec.regions.clone();
    }
    match s.store.get_project(&c.org, &c.project).await {
        Ok(p) if !p.regions.is_empty() => p.regions,
        _ => vec![s.config.region.clone()],
    }
}

/// Asks a ready node of `region` to run the probe; `None` when no node there can.
async fn probe_from(s: &AppState, region: &str, req: &ProbeRequest) -> Option<ProbeResult> {
    let nodes = s.store.ready_nodes_in(region).await.ok()?;
    let token = s.internal_token.get(&s.store).await.ok()?;
    // Any ready node of the region will do; start at a different one each time.
    let start = rand::random::<u32>() as usize;
    for i in 0..nodes.len().min(3) {
        let node = &nodes[(start + i) % nodes.len()];
        let url = format!("{}/v1/probe", node.address.trim_end_matches('/'));
        let sent = s
            .http
            .post(url)
            .bearer_auth(&token)
            .json(req)
            .timeout(Duration::from_secs(u64::from(req.timeout_secs) + 5))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => match r.json::<ProbeResult>().await {
                Ok(res) => return Some(res),
                Err(e) => tracing::warn!(node = %node.hostname, error = %e, "a node's probe answer is unreadable"),
            },
            Ok(r) => tracing::warn!(node = %node.hostname, status = %r.status(), "a node refused to probe"),
            Err(e) => tracing::warn!(node = %node.hostname, error = %e, "a node could not be asked to probe"),
        }
    }
    None
}

async fn probe(s: &AppState, http: &reqwest::Client, c: StoredCheck) {
    let spec: HealthCheckSpec = match serde_json::from_value(c.spec.clone()) {
        Ok(spec) => spec,
        Err(e) => {
            tracing::warn!(check = %c.id, error = %e, "an uptime check's settings are unreadable");
            return;
        }
    };
    let req = ProbeRequest {
        url: crate::api::checks::check_url(s, &c.org, &c.project, &spec),
        method: spec.method.clone(),
        expected_status: spec.expected_status,
        body_contains: spec.body_contains.clone(),
        timeout_secs: spec.timeout_secs,
        via: s.config.uptime_via.map(|v| v.to_string()),
    };
    // Every region at once: this operator's own, the others through one of their nodes.
    let regions = regions_of(s, &c, &spec).await;
    let check = c.id.as_str();
    let rounds = regions.iter().map(|region| {
        let req = &req;
        async move {
            let res = if *region == s.config.region {
                Some(zeitwork_client::probe::run(http, req).await)
            } else {
                probe_from(s, region, req).await
            };
            if res.is_none() {
                tracing::warn!(check = %check, %region, "no ready node in the region could probe; no sample from it");
            }
            res.map(|r| Sample {
                id: 0,
                at: chrono::Utc::now(),
                region: region.clone(),
                ok: r.error.is_none(),
                status: r.status,
                latency_ms: r.latency_ms,
                error: r.error,
            })
        }
    });
    let samples: Vec<Sample> = futures::future::join_all(rounds).await.into_iter().flatten().collect();
    if samples.is_empty() {
        return;
    }
    let (ok, degraded) = judge(&samples, spec.degraded_ms);
    match s.store.record_samples(&c.id, &samples, ok, degraded).await {
        Ok((before, after)) if before != after => {
            tracing::info!(check = %c.id, project = %format!("{}/{}", c.org, c.project), %before, %after, "uptime check changed state");
            s.outbox.notify_one();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(check = %c.id, error = %e, "recording uptime samples failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(region: &str, ok: bool, latency_ms: u64) -> Sample {
        Sample {
            id: 0,
            at: chrono::Utc::now(),
            region: region.into(),
            ok,
            status: Some(if ok { 200 } else { 500 }),
            latency_ms,
            error: (!ok).then(|| "answered 500".into()),
        }
    }

    #[test]
    fn a_round_over_regions_is_judged_as_a_whole() {
        let fast = |r| sample(r, true, 50);
        assert_eq!(judge(&[fast("eu"), fast("us")], 2000), (true, false), "all pass: up");
        assert_eq!(judge(&[fast("eu"), sample("us", true, 2500)], 2000), (true, true), "slow somewhere: degraded");
        assert_eq!(judge(&[fast("eu"), sample("us", false, 10)], 2000), (true, true), "failing somewhere: degraded");
        assert_eq!(
            judge(&[sample("eu", false, 10), sample("us", false, 10)], 2000),
            (false, false),
            "nowhere: a failure"
        );
        assert_eq!(judge(&[sample("eu", false, 10)], 2000), (false, false));
    }
}
