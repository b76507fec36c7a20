//! Shadow traffic: while a candidate deployment is in its shadow stage, a
//! copy of a share of its environment's requests goes to one of its
//! instances. The copy leaves in a task of its own after the client's
//! request has been prepared, is never awaited by it, and its answer is read
//! and thrown away; only its status and latency are kept, counted for the
//! candidate as any answer is, for the operator's release analysis.
//!
//! Copies are sent as the client's request would be: the same method, path,
//! headers (credentials included) and body. Only GET, HEAD and OPTIONS are
//! copied unless the project opted in for every method, and only requests
//! whose body is empty or already read whole. When too many copies are in
//! flight a copy is dropped, never queued. Copies still out when the edge
//! stops are abandoned: they are nobody's answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, Semaphore};
use zeitwork_api_types::Route;

use crate::EdgeState;

/// Copies in flight at most, per edge; one more is dropped.
pub const MAX_IN_FLIGHT: usize = 64;

/// A copy not answered (and read) within this counts as a 504 of the candidate.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The copies of one edge.
#[derive(Debug)]
pub struct Mirrors {
    slots: Arc<Semaphore>,
    /// Copies sent (`zeitwork_edge_shadow_copies_total`).
    pub sent: Counter,
    /// Copies dropped because too many were in flight (`zeitwork_edge_shadow_dropped_total`).
    pub dropped: Counter,
    /// Set when the edge stops: copies in flight give up.
    stopping: watch::Receiver<bool>,
}

impl Mirrors {
    /// Copies that give up once `stopping` turns true.
    pub fn new(stopping: watch::Receiver<bool>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            sent: Counter::default(),
            dropped: Counter::default(),
            stopping,
        }
    }
}

/// Whether the request with id `request_id` and `method` is copied to `route`'s shadow.
pub(crate) fn chosen(route: &Route, method: &str, request_id: &str) -> bool {
    route.shadow.as_ref().is_some_and(|s| {
        !s.instances.is_empty()
            && zeitwork_api_types::shadow_method(method, s.all_methods)
            && zeitwork_api_types::in_canary(request_id.as_bytes(), &s.deployment, s.share)
    })
}

/// Sends a copy of the prepared request (`parts`, whole `body`) to an
/// instance of `route`'s shadow, when this request is chosen and a slot is
/// free. Returns at once.
pub(crate) fn mirror(
    state: &Arc<EdgeState>,
    route: &Route,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    request_id: &str,
) {
    if !chosen(route, parts.method.as_str(), request_id) {
        return;
    }
    let Some(shadow) = route.shadow.as_ref() else { return };
    let Ok(slot) = state.mirrors.slots.clone().try_acquire_owned() else {
        state.mirrors.dropped.inc();
        return;
    };
    let pick = request_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
    let inst = &shadow.instances[pick % shadow.instances.len()];
    let token = state.config.token.as_deref();
    let Some(req) =
        crate::proxy::upstream_request(parts, &inst.upstream, &inst.id, crate::proxy::full(body.clone()), token)
    else {
        return;
    };
    state.mirrors.sent.inc();
    let (state, deployment) = (state.clone(), shadow.deployment.clone());
    let mut stopping = state.mirrors.stopping.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let start = Instant::now();
        let copy = tokio::time::timeout(TIMEOUT, async {
            match crate::proxy::upstream(req).await {
                // Read whole, so the latency is the candidate's full answer.
                Ok(res) => {
                    let status = res.status().as_u16();
                    match res.into_body().collect().await {
                        Ok(_) => status,
                        Err(_) => 502,
                    }
                }
                Err(_) => 502,
            }
        });
        let answer = tokio::select! {
            answer = copy => answer,
            // Not counted: an unanswered copy at shutdown says nothing of the candidate.
            _ = zeitwork_net::stopped(&mut stopping) => return,
        };
        let status = answer.unwrap_or(504);
        state.traffic.note(&deployment, status, start.elapsed());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeitwork_api_types::{RouteInstance, RouteShadow};

    fn route(share: u32, all_methods: bool) -> Route {
        Route {
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
            canary: None,
            shadow: Some(Box::new(RouteShadow {
                deployment: "new".into(),
                share,
                all_methods,
                instances: vec![RouteInstance { id: "i-new".into(), upstream: "http://n:1".into() }],
            })),
        }
    }

    #[test]
    fn only_idempotent_methods_and_a_share_of_requests_are_copied() {
        let ids: Vec<String> = (0..2000).map(|i| format!("req-{i}")).collect();
        let all = route(100, false);
        assert!(ids
            .iter()
            .all(|id| chosen(&all, "GET", id) && chosen(&all, "HEAD", id) && chosen(&all, "OPTIONS", id)));
        assert!(ids.iter().all(|id| !chosen(&all, "POST", id) && !chosen(&all, "DELETE", id)), "no side effects");
        assert!(ids.iter().all(|id| chosen(&route(100, true), "POST", id)), "unless the project opted in");
        let tenth = route(10, false);
        let copied = ids.iter().filter(|id| chosen(&tenth, "GET", id)).count();
        assert!((100..=300).contains(&copied), "about a tenth of 2000 requests, got {copied}");
        let mut none = route(100, false);
        none.shadow.as_mut().unwrap().instances.clear();
        assert!(!chosen(&none, "GET", "req-1"), "nothing to copy to yet");
        assert!(!chosen(&Route { shadow: None, ..all }, "GET", "req-1"));
    }
}
