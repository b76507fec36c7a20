//! The operator's log drain (`log_forward`): the audit log and the output of
//! builds leave the platform for a log service, like instance logs do from
//! the node agents.
//!
//! Build output is sent by whichever operator receives it from the builder.
//! Audit events are tailed from the store by the operator holding the engine
//! lease, from the newest event when it takes the lease: each event is sent
//! once by one operator (events written while no operator leads are not sent).
//!
//! Organisations' own drains (`/api/v1/orgs/{org}/log-drains`) get their
//! org's build output and audit events here, from every operator's
//! [`OrgDrains`] (followed from the store every second); their app logs are
//! sent by the node agents, which get the drains with their assignments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zeitwork_api_types::Event;
use zeitwork_telemetry::drain::{Forwarder, Record, Severity, Source};

use crate::AppState;

/// Events read per pass.
const BATCH: u32 = 1000;

/// The encryption context of a drain's destination.
pub fn target_context(id: &str) -> String {
    format!("log_drain:{id}:url")
}

/// The encryption context of a drain's token.
pub fn token_context(id: &str) -> String {
    format!("log_drain:{id}:token")
}

/// A stored drain's destination and options, decrypted.
pub fn open(
    s: &AppState,
    d: &zeitwork_store::StoredLogDrain,
) -> Result<zeitwork_api_types::AssignedLogDrain, crate::secrets::SecretsError> {
    Ok(zeitwork_api_types::AssignedLogDrain {
        id: d.id.clone(),
        url: s.cipher.decrypt(&target_context(&d.id), &d.target_enc)?,
        token: d.token_enc.as_ref().map(|t| s.cipher.decrypt(&token_context(&d.id), t)).transpose()?,
        ca: d.ca.clone(),
        allowed_networks: s.config.drain_allowed_networks.clone(),
    })
}

/// Starts sending to an organisation's drain: to public addresses and the
/// allowed networks only, checked each time it resolves its host.
pub fn start_assigned(d: &zeitwork_api_types::AssignedLogDrain, hostname: &str) -> Result<Arc<Forwarder>, String> {
    let target = zeitwork_telemetry::drain::Target::parse(&d.url)?;
    let options = zeitwork_telemetry::drain::Options {
        ca_file: None,
        ca_pem: d.ca.clone(),
        token: d.token.clone(),
        reach: Some(zeitwork_telemetry::drain::Reach::new(&d.allowed_networks)?),
    };
    Forwarder::start(target, hostname, &options)
}

struct OrgDrain {
    org: String,
    sources: Vec<String>,
    forwarder: Arc<Forwarder>,
}

/// The organisations' drains this operator sends build output and audit
/// events to, by drain id (a drain is never changed, only added or deleted).
#[derive(Default)]
pub struct OrgDrains {
    live: Mutex<HashMap<String, OrgDrain>>,
}

impl std::fmt::Debug for OrgDrains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgDrains").field("drains", &self.live.lock().map(|m| m.len()).unwrap_or(0)).finish()
    }
}

impl OrgDrains {
    /// Follows the store: starts the drains that are new, stops the deleted ones
    /// (their forwarders end when the last line queued is sent).
    pub async fn refresh(&self, s: &AppState, hostname: &str) {
        let stored = match s.store.list_log_drains(None).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the organisations' log drains");
                return;
            }
        };
        let known: Vec<String> = self.live.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let mut started = Vec::new();
        for d in stored.iter().filter(|d| !known.contains(&d.id)) {
            let forwarder = match open(s, d).map_err(|e| e.to_string()).and_then(|a| start_assigned(&a, hostname)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(drain = %d.id, org = %d.org, error = %e, "cannot start an organisation's log drain");
                    continue;
                }
            };
            started.push((d.id.clone(), OrgDrain { org: d.org.clone(), sources: d.sources.clone(), forwarder }));
        }
        if let Ok(mut m) = self.live.lock() {
            m.retain(|id, _| stored.iter().any(|d| &d.id == id));
            m.extend(started);
        }
    }

    /// The drains of `org` that take `source` (`build` or `audit`).
    pub fn of(&self, org: &str, source: &str) -> Vec<Arc<Forwarder>> {
        let Ok(m) = self.live.lock() else { return Vec::new() };
        m.values()
            .filter(|d| d.org == org && d.sources.iter().any(|s| s == source))
            .map(|d| d.forwarder.clone())
            .collect()
    }
}

/// Where this operator's drain sends, if one is configured.
pub fn start(config: &crate::OperatorConfig, hostname: &str) -> Result<Option<Arc<Forwarder>>, String> {
    let Some(t) = &config.log_forward else { return Ok(None) };
    let target = zeitwork_telemetry::drain::Target::parse(t)?;
    let options = zeitwork_telemetry::drain::Options {
        ca_pem: None,
        ca_file: config.log_forward_ca.clone(),
        token: config.log_forward_token.clone(),
        // The operator's own drain may be anywhere it chooses, internal or not.
        reach: None,
    };
    Forwarder::start(target, hostname, &options).map(Some)
}

/// One audit event as a drained line: `action target result by actor`, its detail as JSON.
pub fn event_record(e: &Event) -> Record {
    let severity = match e.result.as_str() {
        "ok" => Severity::Notice,
        "denied" => Severity::Warning,
        _ => Severity::Error,
    };
    let mut message = format!("{} {} {} by {}", e.action, e.target, e.result, e.actor);
    if let Some(d) = &e.detail {
        message.push(' ');
        message.push_str(&d.to_string());
    }
    Record {
        at: e.at,
        severity,
        origin: e.target.clone(),
        stream: "audit".into(),
        source: e.org.as_ref().map(|org| Source {
            org: org.clone(),
            project: e.project.clone().unwrap_or_default(),
            deployment: String::new(),
        }),
        message,
    }
}

/// Build output as drained lines, one a line of text.
pub fn send_build_output(f: &Forwarder, org: &str, project: &str, deployment: &str, text: &str) {
    let at = chrono::Utc::now();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        f.push(Record {
            at,
            severity: zeitwork_telemetry::drain::severity("stdout", line),
            origin: deployment.to_owned(),
            stream: "build".into(),
            source: Some(Source { org: org.into(), project: project.into(), deployment: deployment.into() }),
            message: line.to_owned(),
        });
    }
}

/// Follows the organisations' drains, and tails the audit log into the
/// platform's drain (`platform`) and each event's organisation's drains while
/// this operator leads.
pub async fn run(s: AppState, platform: Option<Arc<Forwarder>>, hostname: String, mut stop: watch::Receiver<bool>) {
    let mut cursor: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        s.org_drains.refresh(&s, &hostname).await;
        if s.leader.get() != 1 {
            cursor = None;
            continue;
        }
        let from = match cursor {
            Some(c) => c,
            None => match s.store.newest_event_id().await {
                Ok(id) => {
                    cursor = Some(id);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the audit log for the log drain");
                    continue;
                }
            },
        };
        match s.store.events_after(from, BATCH).await {
            Ok(events) => {
                for e in &events {
                    let record = event_record(e);
                    // An organisation's drains get its own events only.
                    if let Some(org) = &e.org {
                        for f in s.org_drains.of(org, "audit") {
                            f.push(record.clone());
                        }
                    }
                    if let Some(f) = &platform {
                        f.push(record);
                    }
                    cursor = Some(e.id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the audit log for the log drain"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_lines() {
        let e = Event {
            id: 7,
            at: chrono::Utc::now(),
            actor: "tok_abc".into(),
            action: "deployment.create".into(),
            target: "web-abc1234-acme".into(),
            org: Some("acme".into()),
            project: Some("web".into()),
            result: "ok".into(),
            detail: Some(serde_json::json!({"image": "x"})),
        };
        let r = event_record(&e);
        assert_eq!(r.stream, "audit");
        assert_eq!(r.severity, Severity::Notice);
        assert_eq!(r.message, r#"deployment.create web-abc1234-acme ok by tok_abc {"image":"x"}"#);
        assert_eq!(r.source.unwrap().project, "web");
        let denied = event_record(&Event { result: "denied".into(), org: None, detail: None, ..e });
        assert_eq!(denied.severity, Severity::Warning);
        assert!(denied.source.is_none());
    }
}
