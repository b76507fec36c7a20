//! The uptime prober: runs due checks (only on the operator holding the
//! engine lease, so a check is probed once per interval) and records each
//! sample and state change. Old samples go in [`crate::retention`].
//! Probes go to the project's address like any visitor's request, or to
//! `uptime_via` (an edge proxy) with the address as its Host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use zeitwork_api_types::HealthCheckSpec;
use zeitwork_store::{Sample, StoredCheck};

use crate::AppState;

/// Probes until `stop`; `nudge` runs due checks at once (a new or changed check).
pub async fn run(s: AppState, nudge: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("zeitwork-uptime/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default();
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

async fn probe(s: &AppState, http: &reqwest::Client, c: StoredCheck) {
    let spec: HealthCheckSpec = match serde_json::from_value(c.spec.clone()) {
        Ok(spec) => spec,
        Err(e) => {
            tracing::warn!(check = %c.id, error = %e, "an uptime check's settings are unreadable");
            return;
        }
    };
    if !spec.regions.is_empty() && !spec.regions.contains(&s.config.region) {
        return; // Probed from other regions.
    }
    let url = crate::api::checks::check_url(s, &c.org, &c.project, &spec);
    let method = if spec.method == "HEAD" { reqwest::Method::HEAD } else { reqwest::Method::GET };
    let req = match s.config.uptime_via {
        Some(via) => {
            let host = url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default().to_owned();
            http.request(method, format!("http://{via}{}", spec.path)).header(reqwest::header::HOST, host)
        }
        None => http.request(method, &url),
    };
    let started = Instant::now();
    let answer = req.timeout(Duration::from_secs(u64::from(spec.timeout_secs))).send().await;
    let (status, error) = match answer {
        Ok(res) => {
            let status = res.status().as_u16();
            let body = match &spec.body_contains {
                Some(_) => res.text().await.ok(),
                None => None,
            };
            let error = if status != spec.expected_status {
                Some(format!("answered {status}, expected {}", spec.expected_status))
            } else {
                match (&spec.body_contains, body) {
                    (Some(want), Some(b)) if !b.contains(want.as_str()) => {
                        Some(format!("the body does not contain {want:?}"))
                    }
                    (Some(_), None) => Some("the body could not be read".to_owned()),
                    _ => None,
                }
            };
            (Some(status), error)
        }
        Err(e) if e.is_timeout() => (None, Some(format!("no answer within {} s", spec.timeout_secs))),
        Err(e) => (None, Some(format!("unreachable: {e}"))),
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    let sample = Sample {
        id: 0,
        at: chrono::Utc::now(),
        region: s.config.region.clone(),
        ok: error.is_none(),
        status,
        latency_ms,
        error,
    };
    let slow = latency_ms > u64::from(spec.degraded_ms);
    match s.store.record_sample(&c.id, &sample, slow).await {
        Ok((before, after)) if before != after => {
            tracing::info!(check = %c.id, project = %format!("{}/{}", c.org, c.project), %before, %after, "uptime check changed state");
            s.outbox.notify_one();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(check = %c.id, error = %e, "recording an uptime sample failed"),
    }
}
