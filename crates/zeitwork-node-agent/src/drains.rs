//! Organisations' own log drains on this node: each instance's lines also go
//! to the drains of its organisation that the operator hands out with the
//! instance's assignment, and to no other organisation's. A drain serves
//! every instance of its organisation here through one forwarder, which ends
//! once no instance is routed to it any more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use zeitwork_api_types::Assignment;
use zeitwork_telemetry::drain::{Forwarder, Options, Reach, Routes, Source, Target};

#[derive(Debug)]
pub struct OrgDrains {
    hostname: String,
    /// Shared with the log store, which sends each line by it.
    pub routes: Arc<Routes>,
    running: Mutex<HashMap<String, Weak<Forwarder>>>,
    tally: Mutex<Tally>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// `syslog-udp`, `syslog-tcp`, `syslog-tls`, `http-json`, `loki` or `elasticsearch`.
    kind: &'static str,
}

/// The lines the drains sent and dropped, as counters by kind of drain. A
/// drain's own figures are read until its sender is gone, so what it sent
/// last is counted too.
#[derive(Debug, Default)]
struct Tally {
    sent: Family<KindLabels, Counter>,
    dropped: Family<KindLabels, Counter>,
    drains: Vec<Counted>,
}

#[derive(Debug)]
struct Counted {
    kind: &'static str,
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    /// What is already in the counters.
    seen: (u64, u64),
}

impl Tally {
    fn update(&mut self) {
        for d in &mut self.drains {
            let now = (d.sent.load(Ordering::Relaxed), d.dropped.load(Ordering::Relaxed));
            self.sent.get_or_create(&KindLabels { kind: d.kind }).inc_by(now.0.saturating_sub(d.seen.0));
            self.dropped.get_or_create(&KindLabels { kind: d.kind }).inc_by(now.1.saturating_sub(d.seen.1));
            d.seen = now;
        }
        // Only the tally holds the figures of a drain that has stopped sending.
        self.drains.retain(|d| Arc::strong_count(&d.sent) > 1);
    }
}

impl OrgDrains {
    pub fn new(hostname: &str) -> Self {
        Self {
            hostname: hostname.to_owned(),
            routes: Arc::default(),
            running: Mutex::default(),
            tally: Mutex::default(),
        }
    }

    /// Adds `org_log_lines_forwarded_total` and `org_log_lines_dropped_total`
    /// (by `kind` of drain) to the agent's metrics.
    pub fn register(&self, metrics: &zeitwork_telemetry::HttpMetrics) {
        let tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        metrics.with_registry(|r| {
            r.register(
                "org_log_lines_forwarded",
                "Instance log lines sent to organisations' own log drains, by kind of drain",
                tally.sent.clone(),
            );
            r.register(
                "org_log_lines_dropped",
                "Instance log lines organisations' own log drains dropped (queue full, receiver failing), by kind of drain",
                tally.dropped.clone(),
            );
        });
    }

    /// Brings the counters up to date with what the drains sent and dropped (before a scrape).
    pub fn count(&self) {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).update();
    }

    /// Routes the lines of `a`'s instance to its assignment's drains (a no-op
    /// when they are the ones it already goes to).
    pub fn route(&self, a: &Assignment) {
        let ids: Vec<String> = a.log_drains.iter().map(|d| d.id.clone()).collect();
        if self.routes.ids(&a.instance).as_ref() == Some(&ids) {
            return;
        }
        let source = Source { org: a.org.clone(), project: a.project.clone(), deployment: a.deployment.clone() };
        let mut drains = Vec::new();
        for d in &a.log_drains {
            let Some(f) = self.forwarder(d) else { continue };
            f.register(&a.instance, source.clone());
            drains.push(f);
        }
        self.routes.remove(&a.instance);
        self.routes.set(&a.instance, ids, drains);
    }

    /// Stops sending the lines of `instance` to drains of its organisation.
    pub fn forget(&self, instance: &str) {
        self.routes.remove(instance);
    }

    fn forwarder(&self, d: &zeitwork_api_types::AssignedLogDrain) -> Option<Arc<Forwarder>> {
        let mut running = self.running.lock().ok()?;
        running.retain(|_, w| w.strong_count() > 0);
        if let Some(f) = running.get(&d.id).and_then(Weak::upgrade) {
            return Some(f);
        }
        let started = Target::parse(&d.url).and_then(|t| {
            let kind = t.kind();
            // A tenant gave the destination: it reaches public addresses and the
            // operator's allowed networks only, checked each time it resolves.
            let reach = Reach::new(&d.allowed_networks)?;
            let options = Options { ca_file: None, ca_pem: d.ca.clone(), token: d.token.clone(), reach: Some(reach) };
            Forwarder::start(t, &self.hostname, &options).map(|f| (kind, f))
        });
        match started {
            Ok((kind, f)) => {
                let counted = Counted { kind, sent: f.sent.clone(), dropped: f.dropped.clone(), seen: (0, 0) };
                self.tally.lock().unwrap_or_else(|e| e.into_inner()).drains.push(counted);
                running.insert(d.id.clone(), Arc::downgrade(&f));
                Some(f)
            }
            Err(e) => {
                tracing::warn!(drain = %d.id, error = %e, "cannot start an organisation's log drain");
                None
            }
        }
    }
}
