//! Sleeping deployments wake on request: a request for a deployment with no
//! instance is held while the operator is asked to wake it, and answered as
//! soon as the routing table brings a ready instance, or with 503 and
//! `Retry-After` when none comes within `wake_hold_secs`. The edge also
//! tells the operator, every few seconds, which deployments served requests,
//! so idle ones can sleep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::StatusCode;
use tokio::sync::watch;
use zeitwork_api_types::Route;

use crate::proxy::{page, Admission};
use crate::EdgeState;

/// Asking the operator again for a deployment within this time is pointless.
const ASK_AGAIN: Duration = Duration::from_secs(2);
/// How often request activity goes to the operator.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

type Seen = Arc<Mutex<HashMap<String, i64>>>;

/// Wake requests and request activity of one edge.
#[derive(Debug)]
pub struct Wakes {
    /// Bumped whenever the routing table changes: held requests look again.
    table_changed: watch::Sender<u64>,
    /// When each deployment was last asked to wake.
    asked: Mutex<HashMap<String, Instant>>,
    /// Per worker thread: deployment → unix ms of its last request. Each
    /// thread writes its own map; the reporter reads them every few seconds.
    seen: Mutex<Vec<Seen>>,
}

impl Default for Wakes {
    fn default() -> Self {
        Self { table_changed: watch::Sender::new(0), asked: Mutex::default(), seen: Mutex::default() }
    }
}

thread_local! {
    /// This thread's activity map, per edge.
    static SEEN: std::cell::RefCell<Vec<(usize, Seen)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Wakes {
    pub(crate) fn table_changed(&self) {
        self.table_changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Forgets the asks of deployments that have instances again: their wake
    /// is done, and should one sleep again at once, its next request must ask anew.
    pub(crate) fn woken(&self, serving: &std::collections::HashSet<&str>) {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        if !asked.is_empty() {
            asked.retain(|d, _| !serving.contains(d.as_str()));
        }
    }

    /// Notes a request for `deployment` (cheap: a lock no other thread takes but the reporter's).
    pub(crate) fn note_request(&self, deployment: &str) {
        let me = self as *const Wakes as usize;
        let now = chrono::Utc::now().timestamp_millis();
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            let map = match seen.iter().find(|(owner, _)| *owner == me) {
                Some((_, m)) => m.clone(),
                None => {
                    let m: Seen = Arc::default();
                    self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(m.clone());
                    seen.push((me, m.clone()));
                    m
                }
            };
            let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
            match m.get_mut(deployment) {
                Some(at) => *at = now,
                None => {
                    m.insert(deployment.to_owned(), now);
                }
            }
        });
    }

    /// Everything noted since the last call, newest time per deployment.
    fn take_seen(&self) -> HashMap<String, i64> {
        let maps = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: HashMap<String, i64> = HashMap::new();
        for m in maps {
            for (d, at) in std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner())) {
                let e = out.entry(d).or_insert(at);
                *e = (*e).max(at);
            }
        }
        out
    }

    /// Whether this edge should ask the operator to wake `deployment` now.
    fn should_ask(&self, deployment: &str) -> bool {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        asked.retain(|_, at| now.duration_since(*at) < ASK_AGAIN);
        if asked.contains_key(deployment) {
            return false;
        }
        asked.insert(deployment.to_owned(), now);
        true
    }
}

/// The route to proxy to, after waking its deployment when it sleeps; or the page that answers instead.
pub(crate) async fn hold(state: &EdgeState, host: &str, route: Arc<Route>) -> Admission {
    if !route.instances.is_empty() || !route.wake {
        return Admission::Proxy(route);
    }
    let mut changes = state.wakes.table_changed.subscribe();
    if state.wakes.should_ask(&route.deployment) {
        // Asked on the control runtime's terms: a client that goes away does not cancel the wake.
        let (operator, id) = (state.operator.clone(), route.deployment.clone());
        tokio::spawn(async move {
            let path = format!("/api/v1/deployments/{}/wake", zeitwork_client::encode(&id));
            if let Err(e) = operator.post::<_, serde_json::Value>(&path, &serde_json::json!({})).await {
                tracing::warn!(deployment = %id, error = %e, "cannot ask the operator to wake a deployment");
            }
        });
        tracing::info!(deployment = %route.deployment, %host, "holding a request while the deployment wakes");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(state.config.wake_hold_secs);
    loop {
        if let Some(r) = state.route(host) {
            if r.gone {
                return gone();
            }
            if !r.instances.is_empty() {
                return Admission::Proxy(r);
            }
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting up",
        "This application is waking up and is not ready yet. Try again in a few seconds.",
    );
    response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    Admission::Answer { response, routed: true }
}

/// The answer for a retired deployment's address.
pub(crate) fn gone() -> Admission {
    let response =
        page(StatusCode::GONE, "Gone", "This deployment was retired. Its project's current address still works.");
    Admission::Answer { response, routed: true }
}

/// Sends request activity to the operator every few seconds until `stop`.
pub(crate) async fn report_loop(
    state: Arc<EdgeState>,
    client: zeitwork_client::Client,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
        let seen = state.wakes.take_seen();
        if seen.is_empty() {
            continue;
        }
        let body = serde_json::json!({ "deployments": seen });
        match client.post_no_content("/api/v1/routing/activity", &body).await {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot report request activity to the operator");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_is_asked_once_until_it_has_woken() {
        let w = Wakes::default();
        assert!(w.should_ask("web-1"));
        assert!(!w.should_ask("web-1"), "asked again within {ASK_AGAIN:?}");
        assert!(w.should_ask("web-2"), "another deployment is asked on its own");
        // web-1 serves again; should it sleep at once, its next request asks anew.
        w.woken(&["web-1"].into_iter().collect());
        assert!(w.should_ask("web-1"));
        assert!(!w.should_ask("web-2"), "a deployment still waking is not asked again");
    }
}
