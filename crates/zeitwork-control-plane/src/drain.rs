//! The operator's log drain (`log_forward`): the audit log and the output of
//! builds leave the platform for a log service, like instance logs do from
//! the node agents.
//!
//! Build output is sent by whichever operator receives it from the builder.
//! Audit events are tailed from the store by the operator holding the engine
//! lease, from the newest event when it takes the lease: each event is sent
//! once by one operator (events written while no operator leads are not sent).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zeitwork_api_types::Event;
use zeitwork_telemetry::drain::{Forwarder, Record, Severity, Source};

use crate::AppState;

/// Events read per pass.
const BATCH: u32 = 1000;

/// Where this operator's drain sends, if one is configured.
pub fn start(config: &crate::OperatorConfig, hostname: &str) -> Result<Option<Arc<Forwarder>>, String> {
    let Some(t) = &config.log_forward else { return Ok(None) };
    let target = zeitwork_telemetry::drain::Target::parse(t)?;
    let options = zeitwork_telemetry::drain::Options {
        ca_file: config.log_forward_ca.clone(),
        token: config.log_forward_token.clone(),
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

/// Tails the audit log into the drain while this operator leads.
pub async fn run_audit(s: AppState, f: Arc<Forwarder>, mut stop: watch::Receiver<bool>) {
    let mut cursor: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
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
                    f.push(event_record(e));
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
