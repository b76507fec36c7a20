//! What each deployment's answers looked like, for the operator's release
//! analysis: per deployment, requests, 5xx answers and a latency histogram
//! (fixed log-scale buckets, so edges' figures add up), sent every second.
//! Each worker thread counts into its own map; the reporter takes them all.
//!
//! Also the canary split: which clients an environment sends to a candidate
//! deployment.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zeitwork_api_types::{DeploymentTraffic, Route, TrafficReport};

use crate::EdgeState;

/// How often the figures go to the operator.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

type Counts = Arc<Mutex<HashMap<String, DeploymentTraffic>>>;

/// Per-deployment figures of one edge since the last report.
#[derive(Debug, Default)]
pub struct Traffic {
    threads: Mutex<Vec<Counts>>,
}

thread_local! {
    /// This thread's counts, per edge.
    static COUNTS: std::cell::RefCell<Vec<(usize, Counts)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Traffic {
    /// Counts one answer of `deployment` (cheap: a lock only the reporter also takes).
    pub(crate) fn note(&self, deployment: &str, status: u16, took: Duration) {
        let me = self as *const Traffic as usize;
        COUNTS.with(|counts| {
            let mut counts = counts.borrow_mut();
            let map = match counts.iter().find(|(owner, _)| *owner == me) {
                Some((_, m)) => m.clone(),
                None => {
                    let m: Counts = Arc::default();
                    self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(m.clone());
                    counts.push((me, m.clone()));
                    m
                }
            };
            let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
            match m.get_mut(deployment) {
                Some(t) => t.observe(status, took),
                None => {
                    let mut t = DeploymentTraffic::default();
                    t.observe(status, took);
                    m.insert(deployment.to_owned(), t);
                }
            }
        });
    }

    /// Everything counted since the last call, every thread's added up.
    pub fn take(&self) -> BTreeMap<String, DeploymentTraffic> {
        let maps = self.threads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: BTreeMap<String, DeploymentTraffic> = BTreeMap::new();
        for m in maps {
            for (d, t) in std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner())) {
                out.entry(d).or_default().merge(&t);
            }
        }
        out
    }
}

/// Sends the figures to the operator every second until `stop`. A period
/// that cannot be sent is dropped: missing figures never make a deployment
/// look bad, they only leave fewer requests to judge by.
pub(crate) async fn report_loop(
    state: Arc<EdgeState>,
    client: zeitwork_client::Client,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    // Reports are keyed by reporter and period: a name of this run, so two
    // edges with one name (or an edge and its restart) never replace each other's.
    let reporter = format!("{}-{:08x}", state.config.name, rand::random::<u32>());
    let mut period = chrono::Utc::now().timestamp_millis();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
        let deployments = state.traffic.take();
        let started = period;
        period = chrono::Utc::now().timestamp_millis().max(started + 1);
        if deployments.is_empty() {
            continue;
        }
        let body = TrafficReport { edge: reporter.clone(), period: started, deployments };
        match client.post_no_content("/api/v1/routing/traffic", &body).await {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot report traffic figures to the operator");
            }
            Err(_) => {}
        }
    }
}

/// The bytes a client is known by for the canary split: its IPv4 address,
/// or the /64 of its IPv6 address (one household or host).
fn client_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets()[..8].to_vec(),
        },
    }
}

/// The route this client takes: the canary's, when the environment runs a
/// canary and the client falls in its share (the same client always does,
/// on every edge, for as long as the weight does not shrink).
pub(crate) fn split(route: Arc<Route>, client: IpAddr) -> Arc<Route> {
    let Some(c) = route.canary.as_ref() else { return route };
    if c.instances.is_empty() || !zeitwork_api_types::in_canary(&client_key(client), &c.deployment, c.weight) {
        return route;
    }
    Arc::new(Route {
        deployment: c.deployment.clone(),
        instances: c.instances.clone(),
        wake: false,
        gone: false,
        canary: None,
        shadow: None,
        ..(*route).clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeitwork_api_types::{RouteCanary, RouteInstance};

    #[test]
    fn threads_add_up_and_a_report_empties_the_counts() {
        let t = Arc::new(Traffic::default());
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        t.note("d1", if i == 0 { 502 } else { 200 }, Duration::from_millis(2));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let got = t.take();
        assert_eq!(got["d1"].requests, 30);
        assert_eq!(got["d1"].errors, 3);
        assert!(t.take().is_empty(), "nothing is reported twice");
    }

    #[test]
    fn a_share_of_clients_takes_the_canary_and_keeps_it() {
        let route = Arc::new(Route {
            host: "web-acme.apps.test".into(),
            deployment: "old".into(),
            org: "acme".into(),
            project: "web".into(),
            environment: Some(zeitwork_api_types::Environment::Production),
            rate_limit: None,
            acme: false,
            instances: vec![RouteInstance { id: "i-old".into(), upstream: "http://n:1".into() }],
            wake: false,
            gone: false,
            served: vec![],
            skew_max_age_secs: None,
            canary: Some(RouteCanary {
                deployment: "new".into(),
                weight: 10,
                instances: vec![RouteInstance { id: "i-new".into(), upstream: "http://n:1".into() }],
            }),
            shadow: None,
        });
        let clients: Vec<IpAddr> =
            (0..1000u32).map(|i| IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8])).collect();
        let on_canary: Vec<&IpAddr> =
            clients.iter().filter(|c| split(route.clone(), **c).deployment == "new").collect();
        assert!((50..=150).contains(&on_canary.len()), "about 10 %: {}", on_canary.len());
        for c in &on_canary {
            let r = split(route.clone(), **c);
            assert_eq!(r.instances[0].id, "i-new");
            assert!(r.canary.is_none());
        }
        // One IPv6 /64 is one client.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
    }
}
