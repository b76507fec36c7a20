//! Organisations' own log drains on this node: each instance's lines also go
//! to the drains of its organisation that the operator hands out with the
//! instance's assignment, and to no other organisation's. A drain serves
//! every instance of its organisation here through one forwarder, which ends
//! once no instance is routed to it any more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use zeitwork_api_types::Assignment;
use zeitwork_telemetry::drain::{Forwarder, Options, Routes, Source, Target};

#[derive(Debug)]
pub struct OrgDrains {
    hostname: String,
    /// Shared with the log store, which sends each line by it.
    pub routes: Arc<Routes>,
    running: Mutex<HashMap<String, Weak<Forwarder>>>,
}

impl OrgDrains {
    pub fn new(hostname: &str) -> Self {
        Self { hostname: hostname.to_owned(), routes: Arc::default(), running: Mutex::default() }
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
            Forwarder::start(
                t,
                &self.hostname,
                &Options { ca_file: None, ca_pem: d.ca.clone(), token: d.token.clone() },
            )
        });
        match started {
            Ok(f) => {
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
