//! Forwarding of instance logs to a syslog receiver (rsyslog, syslog-ng,
//! Papertrail, Better Stack, an ELK stack's syslog input), as RFC 5424
//! messages over UDP (one datagram a line) or TCP (octet-counted, RFC 6587).
//! Each line carries its severity (from a level the line states, else
//! `info` for stdout and `err` for stderr), the app as APP-NAME
//! (`org/project`), the instance as PROCID and the stream as MSGID, with
//! the deployment in structured data. Lines are queued and sent in the
//! background: a slow or absent receiver never holds an app up; what does
//! not fit the queue is dropped and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Lines waiting to be sent before new ones are dropped.
const QUEUE: usize = 10_000;
/// Private enterprise number used for Zeitwork's structured data (a placeholder number, as RFC 5424 examples use).
const SD_ID: &str = "zeitwork@32473";

const SEVERITIES: [Severity; 8] = [
    Severity::Emergency,
    Severity::Alert,
    Severity::Critical,
    Severity::Error,
    Severity::Warning,
    Severity::Notice,
    Severity::Info,
    Severity::Debug,
];

/// Syslog severities (RFC 5424).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Emergency => "emerg",
            Severity::Alert => "alert",
            Severity::Critical => "crit",
            Severity::Error => "err",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
            Severity::Info => "info",
            Severity::Debug => "debug",
        }
    }

    fn parse(level: &str) -> Option<Severity> {
        Some(match level.to_ascii_lowercase().as_str() {
            "emerg" | "emergency" | "panic" => Severity::Emergency,
            "alert" => Severity::Alert,
            "crit" | "critical" | "fatal" => Severity::Critical,
            "err" | "error" => Severity::Error,
            "warn" | "warning" => Severity::Warning,
            "notice" => Severity::Notice,
            "info" | "information" => Severity::Info,
            "debug" | "trace" => Severity::Debug,
            _ => return None,
        })
    }
}

/// The severity of a log line: a JSON line's `level`/`severity`/`lvl`, a
/// leading level word (`ERROR …`, `[warn] …`, `level=debug …`), else by stream.
pub fn severity(stream: &str, line: &str) -> Severity {
    let t = line.trim_start();
    // A syslog-formatted line: `<PRI>…`, the severity being PRI's low three bits.
    if let Some(pri) = t.strip_prefix('<').and_then(|r| r.split_once('>')).and_then(|(n, _)| n.parse::<u8>().ok()) {
        if pri <= 191 {
            return SEVERITIES[usize::from(pri % 8)];
        }
    }
    if t.starts_with('{') {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(t) {
            for key in ["level", "severity", "lvl", "log.level"] {
                if let Some(s) = m.get(key).and_then(|v| v.as_str()).and_then(Severity::parse) {
                    return s;
                }
            }
        }
    }
    let head: String = t.chars().take(24).collect();
    let head = head.trim_start_matches('[');
    let word: String =
        head.strip_prefix("level=").unwrap_or(head).chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    if let Some(s) = Severity::parse(&word) {
        return s;
    }
    if stream == "stderr" {
        Severity::Error
    } else {
        Severity::Info
    }
}

/// Who an instance's lines are from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub org: String,
    pub project: String,
    pub deployment: String,
}

/// Where to send: `udp://HOST:PORT` or `tcp://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Udp(String),
    Tcp(String),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let (scheme, rest) =
            s.split_once("://").ok_or_else(|| format!("{s:?}: use udp://HOST:PORT or tcp://HOST:PORT"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || rest.contains('/') {
            return Err(format!("{s:?}: use udp://HOST:PORT or tcp://HOST:PORT"));
        }
        match scheme {
            "udp" => Ok(Target::Udp(rest.to_owned())),
            "tcp" => Ok(Target::Tcp(rest.to_owned())),
            other => Err(format!("{other:?} is not udp or tcp")),
        }
    }
}

/// Sends log lines to a syslog receiver in the background.
#[derive(Debug)]
pub struct Forwarder {
    tx: mpsc::Sender<String>,
    hostname: String,
    sources: Mutex<HashMap<String, Source>>,
    pub dropped: AtomicU64,
    pub sent: Arc<AtomicU64>,
}

/// One RFC 5424 message.
pub fn format(
    hostname: &str,
    instance: &str,
    stream: &str,
    source: Option<&Source>,
    sev: Severity,
    at: chrono::DateTime<chrono::Utc>,
    line: &str,
) -> String {
    const USER: u8 = 1;
    let pri = USER * 8 + sev as u8;
    let printable = |s: &str, max: usize| -> String {
        let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
        if v.is_empty() {
            "-".into()
        } else {
            v
        }
    };
    let app = source.map(|s| format!("{}/{}", s.org, s.project)).unwrap_or_default();
    let sd = match source {
        Some(s) => {
            let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace(']', "\\]");
            format!(
                "[{SD_ID} org=\"{}\" project=\"{}\" deployment=\"{}\"]",
                esc(&s.org),
                esc(&s.project),
                esc(&s.deployment)
            )
        }
        None => "-".into(),
    };
    format!(
        "<{pri}>1 {} {} {} {} {} {sd} {}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        printable(hostname, 255),
        printable(&app, 48),
        printable(instance, 128),
        printable(stream, 32),
        line.replace('\n', " ")
    )
}

impl Forwarder {
    /// Starts sending to `target` in the background (reconnecting TCP as needed).
    pub fn start(target: Target, hostname: &str) -> Arc<Forwarder> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        tokio::spawn(send_loop(target, rx, sent.clone()));
        Arc::new(Forwarder {
            tx,
            hostname: hostname.to_owned(),
            sources: Mutex::default(),
            dropped: AtomicU64::new(0),
            sent,
        })
    }

    /// Names the app an instance's lines are from.
    pub fn register(&self, instance: &str, source: Source) {
        if let Ok(mut m) = self.sources.lock() {
            m.insert(instance.to_owned(), source);
        }
    }

    pub fn forget(&self, instance: &str) {
        if let Ok(mut m) = self.sources.lock() {
            m.remove(instance);
        }
    }

    /// Queues one line; dropped (and counted) when the queue is full.
    pub fn send(&self, instance: &str, stream: &str, sev: Severity, at: chrono::DateTime<chrono::Utc>, line: &str) {
        let source = self.sources.lock().ok().and_then(|m| m.get(instance).cloned());
        let msg = format(&self.hostname, instance, stream, source.as_ref(), sev, at, line);
        if self.tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn send_loop(target: Target, mut rx: mpsc::Receiver<String>, sent: Arc<AtomicU64>) {
    match target {
        Target::Udp(addr) => {
            let Ok(sock) =
                tokio::net::UdpSocket::bind(if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" }).await
            else {
                tracing::warn!(%addr, "cannot open a UDP socket for log forwarding");
                return;
            };
            while let Some(msg) = rx.recv().await {
                // One datagram a line; at most what UDP carries.
                let bytes = &msg.as_bytes()[..msg.len().min(64 * 1024 - 64)];
                match sock.send_to(bytes, &addr).await {
                    Ok(_) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(%addr, error = %e, "a log line could not be sent"),
                }
            }
        }
        Target::Tcp(addr) => {
            let mut conn: Option<tokio::net::TcpStream> = None;
            while let Some(msg) = rx.recv().await {
                let framed = format!("{} {msg}", msg.len());
                for attempt in 0..2 {
                    if conn.is_none() {
                        match tokio::net::TcpStream::connect(&addr).await {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                tracing::debug!(%addr, error = %e, "the syslog receiver is unreachable");
                                tokio::time::sleep(std::time::Duration::from_millis(200 * (attempt + 1))).await;
                                continue;
                            }
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        if c.write_all(framed.as_bytes()).await.is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        conn = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_come_from_the_line_or_the_stream() {
        assert_eq!(severity("stdout", "ERROR: disk full"), Severity::Error);
        assert_eq!(severity("stdout", "[warn] slow query"), Severity::Warning);
        assert_eq!(severity("stdout", "level=debug msg=x"), Severity::Debug);
        assert_eq!(severity("stdout", r#"{"level":"fatal","msg":"bye"}"#), Severity::Critical);
        assert_eq!(severity("stdout", "GET / 200"), Severity::Info);
        assert_eq!(severity("stderr", "something odd"), Severity::Error);
        assert_eq!(severity("stderr", "INFO listening on 8080"), Severity::Info);
        assert_eq!(severity("stdout", "<11>payment failed"), Severity::Error);
        assert_eq!(severity("stderr", "<14>all fine"), Severity::Info);
        assert_eq!(severity("stdout", "<999>not a priority"), Severity::Info);
    }

    #[test]
    fn messages_are_rfc_5424() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().to_utc();
        let src = Source { org: "acme".into(), project: "web".into(), deployment: "web-abc1234-acme".into() };
        let m = format("node-1", "ins_1", "stdout", Some(&src), Severity::Warning, at, "slow \"query\"");
        assert_eq!(
            m,
            "<12>1 2026-12-01T10:00:00.000Z node-1 acme/web ins_1 stdout [zeitwork@32473 org=\"acme\" project=\"web\" deployment=\"web-abc1234-acme\"] slow \"query\""
        );
        assert!(format("n", "i", "stderr", None, Severity::Error, at, "x").starts_with("<11>1 "));
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse("udp://logs.example.com:514"), Ok(Target::Udp("logs.example.com:514".into())));
        assert_eq!(Target::parse("tcp://10.0.0.5:6514"), Ok(Target::Tcp("10.0.0.5:6514".into())));
        assert!(Target::parse("http://x:1").is_err());
        assert!(Target::parse("udp://x").is_err());
        assert!(Target::parse("udp://x:0").is_err());
    }
}
