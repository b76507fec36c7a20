//! Log drains: lines that leave the platform for a log service, in the
//! background, never holding up whoever wrote them.
//!
//! - Syslog (rsyslog, syslog-ng, Papertrail, an ELK stack's syslog input) as
//!   RFC 5424 messages over UDP (one datagram a line), TCP (octet-counted,
//!   RFC 6587) or TLS (RFC 5425).
//! - HTTP batches of JSON: a plain JSON array (Better Stack, Vector, any
//!   webhook), Loki's push format, or an Elasticsearch / OpenSearch `_bulk`
//!   body.
//!
//! Each line carries its severity (from a level the line states, else `info`
//! for stdout and `err` for stderr), its app (`org/project`), the instance or
//! other source as PROCID, and the stream (`stdout`, `stderr`, `build`,
//! `audit`) as MSGID, with the deployment in structured data. Lines are queued;
//! what does not fit the queue, or what the receiver keeps refusing, is
//! dropped and counted.
//!
//! An organisation's drain is given [`Options::reach`]: it sends to public
//! addresses and the operator's allowed networks only, checked each time it
//! resolves its host (see [`reach`]).

pub mod reach;

pub use reach::Reach;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Lines waiting to be sent before new ones are dropped.
const QUEUE: usize = 10_000;
/// Most lines in one HTTP batch.
const BATCH_LINES: usize = 500;
/// Longest a line waits for its HTTP batch to fill.
const BATCH_WAIT: Duration = Duration::from_secs(1);
/// Attempts of one HTTP batch before its lines are dropped.
const BATCH_ATTEMPTS: u32 = 4;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// Who a line is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub org: String,
    pub project: String,
    pub deployment: String,
}

/// One line on its way out.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub at: chrono::DateTime<chrono::Utc>,
    pub severity: Severity,
    /// The instance, build or event target the line is about (syslog PROCID).
    pub origin: String,
    /// `stdout`, `stderr`, `build` or `audit` (syslog MSGID).
    pub stream: String,
    pub source: Option<Source>,
    pub message: String,
}

/// How an HTTP drain shapes its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFormat {
    /// A JSON array of objects, one a line.
    Json,
    /// Loki's `/loki/api/v1/push` body.
    Loki,
    /// An Elasticsearch / OpenSearch `_bulk` body (NDJSON).
    Elasticsearch,
}

/// Where a drain sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Udp(String),
    Tcp(String),
    /// Syslog over TLS; the host name is checked against the receiver's certificate.
    Tls {
        addr: String,
        host: String,
    },
    Http {
        url: String,
        format: HttpFormat,
    },
}

const TARGETS: &str = "udp://HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT, https://… (JSON array), \
                       loki+https://…/loki/api/v1/push or elasticsearch+https://…/_bulk";

impl Target {
    /// The kind of drain: `syslog-udp`, `syslog-tcp`, `syslog-tls`, `http-json`, `loki` or `elasticsearch`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Udp(_) => "syslog-udp",
            Target::Tcp(_) => "syslog-tcp",
            Target::Tls { .. } => "syslog-tls",
            Target::Http { format: HttpFormat::Json, .. } => "http-json",
            Target::Http { format: HttpFormat::Loki, .. } => "loki",
            Target::Http { format: HttpFormat::Elasticsearch, .. } => "elasticsearch",
        }
    }

    /// Where it sends with what could be secret left out (port, path, query,
    /// credentials in the URL): `scheme://host/…`.
    pub fn shown(&self) -> String {
        let host = |addr: &str| addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
        match self {
            Target::Udp(a) => format!("udp://{}/…", host(a)),
            Target::Tcp(a) => format!("tcp://{}/…", host(a)),
            Target::Tls { host, .. } => format!("tls://{host}/…"),
            Target::Http { url, format } => {
                let u = reqwest::Url::parse(url).ok();
                let scheme = u.as_ref().map_or("https", |u| u.scheme()).to_owned();
                let prefix = match format {
                    HttpFormat::Json => "",
                    HttpFormat::Loki => "loki+",
                    HttpFormat::Elasticsearch => "elasticsearch+",
                };
                format!("{prefix}{scheme}://{}/…", u.as_ref().and_then(|u| u.host_str()).unwrap_or(""))
            }
        }
    }

    /// The host (a name or an address, IPv6 in brackets) and port it sends to.
    pub fn host_port(&self) -> Option<(String, u16)> {
        match self {
            Target::Udp(a) | Target::Tcp(a) | Target::Tls { addr: a, .. } => {
                let (h, p) = a.rsplit_once(':')?;
                Some((h.to_owned(), p.parse().ok()?))
            }
            Target::Http { url, .. } => {
                let u = reqwest::Url::parse(url).ok()?;
                Some((u.host_str()?.to_owned(), u.port_or_known_default()?))
            }
        }
    }

    pub fn parse(s: &str) -> Result<Target, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| format!("{s:?}: use {TARGETS}"))?;
        let (format, http_scheme) = match scheme {
            "http" | "https" => (Some(HttpFormat::Json), scheme),
            "loki+http" | "loki+https" => (Some(HttpFormat::Loki), &scheme[5..]),
            "elasticsearch+http" | "elasticsearch+https" => (Some(HttpFormat::Elasticsearch), &scheme[14..]),
            _ => (None, ""),
        };
        if let Some(format) = format {
            let url = format!("{http_scheme}://{rest}");
            let parsed = reqwest::Url::parse(&url).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(format!("{s:?} has no host"));
            }
            return Ok(Target::Http { url, format });
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || rest.contains('/') {
            return Err(format!("{s:?}: use {TARGETS}"));
        }
        match scheme {
            "udp" => Ok(Target::Udp(rest.to_owned())),
            "tcp" => Ok(Target::Tcp(rest.to_owned())),
            "tls" => Ok(Target::Tls {
                addr: rest.to_owned(),
                host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            }),
            other => Err(format!("{other:?} is not a drain scheme; use {TARGETS}")),
        }
    }
}

/// What a drain needs besides its target.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// PEM file of the CA(s) that signed the receiver's certificate (TLS and
    /// HTTPS), in addition to the public roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM text of such CA(s), for drains whose settings are data rather
    /// than files (an organisation's drains).
    pub ca_pem: Option<String>,
    /// Sent as `Authorization: Bearer …` to HTTP drains.
    pub token: Option<String>,
    /// The addresses the drain may send to, for a destination a tenant gave
    /// (an organisation's drain); `None` for the operator's own, which may
    /// point anywhere.
    pub reach: Option<Reach>,
}

/// One RFC 5424 message.
pub fn format(hostname: &str, r: &Record) -> String {
    const USER: u8 = 1;
    let pri = USER * 8 + r.severity as u8;
    let printable = |s: &str, max: usize| -> String {
        let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
        if v.is_empty() {
            "-".into()
        } else {
            v
        }
    };
    let app = r.source.as_ref().map(|s| format!("{}/{}", s.org, s.project)).unwrap_or_default();
    let sd = match &r.source {
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
        r.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        printable(hostname, 255),
        printable(&app, 48),
        printable(&r.origin, 128),
        printable(&r.stream, 32),
        r.message.replace('\n', " ")
    )
}

/// One line as a JSON object (the JSON and Elasticsearch formats).
fn document(hostname: &str, r: &Record) -> serde_json::Value {
    let mut doc = serde_json::json!({
        "@timestamp": r.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "severity": r.severity.name(),
        "hostname": hostname,
        "origin": r.origin,
        "stream": r.stream,
        "message": r.message,
    });
    if let Some(s) = &r.source {
        doc["org"] = s.org.clone().into();
        doc["project"] = s.project.clone().into();
        doc["deployment"] = s.deployment.clone().into();
    }
    doc
}

/// A batch's body and content type in `format`.
pub fn batch_body(format: HttpFormat, hostname: &str, batch: &[Record]) -> (Vec<u8>, &'static str) {
    match format {
        HttpFormat::Json => {
            let docs: Vec<_> = batch.iter().map(|r| document(hostname, r)).collect();
            (serde_json::to_vec(&docs).unwrap_or_default(), "application/json")
        }
        HttpFormat::Elasticsearch => {
            let mut out = Vec::new();
            for r in batch {
                out.extend_from_slice(b"{\"create\":{}}\n");
                out.extend_from_slice(document(hostname, r).to_string().as_bytes());
                out.push(b'\n');
            }
            (out, "application/x-ndjson")
        }
        HttpFormat::Loki => {
            // One stream per label set; the instance stays in the line, not a label.
            let mut streams: BTreeMap<Vec<(&str, String)>, Vec<serde_json::Value>> = BTreeMap::new();
            for r in batch {
                let mut labels = vec![
                    ("source", "zeitwork".to_owned()),
                    ("host", hostname.to_owned()),
                    ("stream", r.stream.clone()),
                    ("level", r.severity.name().to_owned()),
                ];
                if let Some(s) = &r.source {
                    labels.push(("org", s.org.clone()));
                    labels.push(("project", s.project.clone()));
                    labels.push(("deployment", s.deployment.clone()));
                }
                let ns = r.at.timestamp_nanos_opt().unwrap_or_default().to_string();
                let line = format!("origin={} {}", r.origin, r.message);
                streams.entry(labels).or_default().push(serde_json::json!([ns, line]));
            }
            let streams: Vec<_> = streams
                .into_iter()
                .map(|(labels, values)| {
                    let labels: serde_json::Map<String, serde_json::Value> =
                        labels.into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
                    serde_json::json!({"stream": labels, "values": values})
                })
                .collect();
            (serde_json::to_vec(&serde_json::json!({"streams": streams})).unwrap_or_default(), "application/json")
        }
    }
}

/// Sends lines to one drain in the background.
#[derive(Debug)]
pub struct Forwarder {
    tx: mpsc::Sender<Record>,
    sources: Mutex<HashMap<String, Source>>,
    pub dropped: Arc<AtomicU64>,
    pub sent: Arc<AtomicU64>,
}

/// The TLS settings for a drain: the public roots plus `ca_file`'s.
fn tls_config(options: &Options) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in option_roots(options)? {
        roots.add(cert).map_err(|e| format!("the drain's CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The CA certificates of `ca_file` and `ca_pem`.
fn option_roots(options: &Options) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    if let Some(path) = &options.ca_file {
        out.extend(extra_roots(path)?);
    }
    if let Some(pem) = &options.ca_pem {
        out.extend(pem_roots(pem)?);
    }
    Ok(out)
}

/// The certificates of a PEM text; an error when it holds none or a damaged one.
pub fn pem_roots(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

fn extra_roots(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

impl Forwarder {
    /// Starts sending to `target` in the background (reconnecting as needed).
    /// Fails only on options that can never work (an unreadable CA file).
    pub fn start(target: Target, hostname: &str, options: &Options) -> Result<Arc<Forwarder>, String> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let counters = Counters { sent: sent.clone(), dropped: dropped.clone() };
        let hostname = hostname.to_owned();
        let reach = options.reach.clone();
        match target {
            Target::Udp(addr) => {
                tokio::spawn(udp_loop(Dest::new(addr, reach), hostname, rx, counters));
            }
            Target::Tcp(addr) => {
                tokio::spawn(stream_loop(Dest::new(addr, reach), None, hostname, rx, counters));
            }
            Target::Tls { addr, host } => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| format!("{host:?} is not a host name for TLS"))?;
                let tls = tokio_rustls::TlsConnector::from(tls_config(options)?);
                tokio::spawn(stream_loop(Dest::new(addr, reach), Some((tls, name)), hostname, rx, counters));
            }
            Target::Http { url, format } => {
                let mut client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .redirect(reqwest::redirect::Policy::none());
                for der in option_roots(options)? {
                    let cert = reqwest::Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
                    client = client.add_root_certificate(cert);
                }
                if let Some(reach) = &reach {
                    // Connections go to the addresses the resolver checked, never through a proxy.
                    client = client.no_proxy().dns_resolver(Arc::new(reach::CheckedResolver(reach.clone())));
                }
                let client = client.build().map_err(|e| e.to_string())?;
                let http = Http { client, url, format, token: options.token.clone(), reach };
                tokio::spawn(http_loop(http, hostname, rx, counters));
            }
        }
        Ok(Arc::new(Forwarder { tx, sources: Mutex::default(), dropped, sent }))
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

    /// Queues one line of a registered instance; dropped (and counted) when the queue is full.
    pub fn send(&self, instance: &str, stream: &str, sev: Severity, at: chrono::DateTime<chrono::Utc>, line: &str) {
        let source = self.sources.lock().ok().and_then(|m| m.get(instance).cloned());
        self.push(Record {
            at,
            severity: sev,
            origin: instance.to_owned(),
            stream: stream.to_owned(),
            source,
            message: line.to_owned(),
        });
    }

    /// Queues one record; dropped (and counted) when the queue is full.
    pub fn push(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The drains each instance's lines go to besides the node's own (its
/// organisation's), by instance; shared by whoever writes the lines and
/// whoever knows the instances.
#[derive(Debug, Default)]
pub struct Routes {
    by_instance: std::sync::RwLock<HashMap<String, Route>>,
}

/// The ids of an instance's drains and their forwarders.
type Route = (Vec<String>, Vec<Arc<Forwarder>>);

impl Routes {
    /// Sends the lines of `instance` to `drains` (named by `ids`) from now on.
    pub fn set(&self, instance: &str, ids: Vec<String>, drains: Vec<Arc<Forwarder>>) {
        if let Ok(mut m) = self.by_instance.write() {
            m.insert(instance.to_owned(), (ids, drains));
        }
    }

    /// The ids of the drains `instance` is routed to, if it is.
    pub fn ids(&self, instance: &str) -> Option<Vec<String>> {
        self.by_instance.read().ok().and_then(|m| m.get(instance).map(|(ids, _)| ids.clone()))
    }

    /// Stops sending `instance`'s lines anywhere but the node's own drain.
    pub fn remove(&self, instance: &str) {
        let gone = self.by_instance.write().ok().and_then(|mut m| m.remove(instance));
        for f in gone.map(|(_, d)| d).unwrap_or_default() {
            f.forget(instance);
        }
    }

    /// The drains of `instance`.
    pub fn of(&self, instance: &str) -> Vec<Arc<Forwarder>> {
        self.by_instance.read().ok().and_then(|m| m.get(instance).map(|(_, d)| d.clone())).unwrap_or_default()
    }
}

struct Counters {
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// Where a syslog drain sends: its `HOST:PORT`, resolved and checked
/// against its reach. Answers are kept for [`RESOLVED_FOR`], so a UDP drain
/// does not resolve its host for every line; only checked addresses are kept.
struct Dest {
    addr: String,
    reach: Option<Reach>,
    resolved: Option<(tokio::time::Instant, Vec<SocketAddr>)>,
    /// Whether the last refusal was logged (once until the destination is allowed again).
    warned: bool,
}

/// How long a syslog drain uses an address it resolved.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

impl Dest {
    fn new(addr: String, reach: Option<Reach>) -> Dest {
        Dest { addr, reach, resolved: None, warned: false }
    }

    /// The checked addresses to send to; `None` (logged) when there are none.
    async fn addrs(&mut self, fresh: bool) -> Option<Vec<SocketAddr>> {
        if let Some((at, addrs)) = &self.resolved {
            if !fresh && at.elapsed() < RESOLVED_FOR {
                return Some(addrs.clone());
            }
        }
        self.resolved = None;
        let (host, port) = self.addr.rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?;
        let answer = match &self.reach {
            Some(reach) => reach.resolve(host, port).await,
            None => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                match tokio::net::lookup_host((bare, port)).await {
                    Ok(a) => Ok(a.collect()),
                    Err(e) => Err(reach::ResolveError::Unresolved(format!("cannot resolve {bare}: {e}"))),
                }
            }
        };
        match answer {
            Ok(addrs) => {
                self.warned = false;
                self.resolved = Some((tokio::time::Instant::now(), addrs.clone()));
                Some(addrs)
            }
            Err(reach::ResolveError::Refused(why)) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(addr = %self.addr, reason = %why, "an organisation's log drain points at an address it may not reach; its lines are dropped");
                }
                None
            }
            Err(e) => {
                tracing::debug!(addr = %self.addr, error = %e, "the syslog receiver's address is unknown");
                None
            }
        }
    }
}

async fn udp_loop(mut dest: Dest, hostname: String, mut rx: mpsc::Receiver<Record>, c: Counters) {
    let mut socks: (Option<tokio::net::UdpSocket>, Option<tokio::net::UdpSocket>) = (None, None);
    while let Some(r) = rx.recv().await {
        let Some(to) = dest.addrs(false).await.and_then(|a| a.first().copied()) else {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let slot = if to.is_ipv6() { &mut socks.1 } else { &mut socks.0 };
        if slot.is_none() {
            let local = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            match tokio::net::UdpSocket::bind(local).await {
                Ok(s) => *slot = Some(s),
                Err(e) => tracing::warn!(addr = %dest.addr, error = %e, "cannot open a UDP socket for log forwarding"),
            }
        }
        let Some(sock) = slot.as_ref() else {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let msg = format(&hostname, &r);
        // One datagram a line; at most what UDP carries.
        let bytes = &msg.as_bytes()[..msg.len().min(64 * 1024 - 64)];
        match sock.send_to(bytes, to).await {
            Ok(_) => {
                c.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(addr = %dest.addr, error = %e, "a log line could not be sent");
            }
        }
    }
}

type Tls = (tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>);

/// A connection to one of the drain's checked addresses (resolved afresh for each connection).
async fn connect(dest: &mut Dest, tls: Option<&Tls>) -> std::io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    let addrs = dest
        .addrs(true)
        .await
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address to send to"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addrs[..]))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(match tls {
        None => Box::new(tcp),
        Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
    })
}

/// TCP and TLS: octet-counted frames on one kept connection.
async fn stream_loop(mut dest: Dest, tls: Option<Tls>, hostname: String, mut rx: mpsc::Receiver<Record>, c: Counters) {
    let mut conn: Option<Box<dyn AsyncWrite + Send + Unpin>> = None;
    while let Some(r) = rx.recv().await {
        let msg = format(&hostname, &r);
        let framed = format!("{} {msg}", msg.len());
        let mut done = false;
        for attempt in 0..2u64 {
            if conn.is_none() {
                match connect(&mut dest, tls.as_ref()).await {
                    Ok(s) => conn = Some(s),
                    Err(e) => {
                        tracing::debug!(addr = %dest.addr, error = %e, "the syslog receiver is unreachable");
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                        continue;
                    }
                }
            }
            if let Some(s) = conn.as_mut() {
                if s.write_all(framed.as_bytes()).await.is_ok() && s.flush().await.is_ok() {
                    done = true;
                    break;
                }
                conn = None;
            }
        }
        let counter = if done { &c.sent } else { &c.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Http {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
    token: Option<String>,
    reach: Option<Reach>,
}

/// Why a batch was not taken.
enum PostError {
    /// The receiver is at an address the drain may not reach: not retried.
    Refused(reach::Refused),
    Failed(String),
}

impl Http {
    async fn post(&self, body: Vec<u8>, content_type: &str) -> Result<(), PostError> {
        // A host given as an address is not resolved, so the resolver does not see it.
        if let Some(reach) = &self.reach {
            let ip = reqwest::Url::parse(&self.url).ok().and_then(|u| {
                u.host_str()?.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok()
            });
            if let Some(ip) = ip {
                reach.check(ip).map_err(PostError::Refused)?;
            }
        }
        let mut req = self.client.post(&self.url).header(reqwest::header::CONTENT_TYPE, content_type).body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.map_err(|e| match reach::refusal(&e) {
            Some(r) => PostError::Refused(r),
            None => PostError::Failed(e.to_string()),
        })?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(PostError::Failed(format!("answered {}", res.status())))
        }
    }
}

/// HTTP: batches of up to `BATCH_LINES` lines, sent at least every `BATCH_WAIT`,
/// retried with backoff, then dropped.
async fn http_loop(http: Http, hostname: String, mut rx: mpsc::Receiver<Record>, c: Counters) {
    let mut batch = Vec::with_capacity(BATCH_LINES);
    // Whether the last refusal was logged (once until a batch is sent again).
    let mut warned = false;
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH_LINES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        let (body, content_type) = batch_body(http.format, &hostname, &batch);
        let mut ok = false;
        for attempt in 0..BATCH_ATTEMPTS {
            match http.post(body.clone(), content_type).await {
                Ok(()) => {
                    ok = true;
                    warned = false;
                    break;
                }
                Err(PostError::Refused(why)) => {
                    if !std::mem::replace(&mut warned, true) {
                        let shown = Target::Http { url: http.url.clone(), format: http.format }.shown();
                        tracing::warn!(drain = %shown, reason = %why, "an organisation's log drain points at an address it may not reach; its lines are dropped");
                    }
                    break;
                }
                Err(PostError::Failed(e)) => {
                    let shown = Target::Http { url: http.url.clone(), format: http.format }.shown();
                    tracing::debug!(drain = %shown, error = %e, attempt, "a log batch could not be sent");
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
            }
        }
        let counter = if ok { &c.sent } else { &c.dropped };
        counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sev: Severity, msg: &str) -> Record {
        Record {
            at: chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().to_utc(),
            severity: sev,
            origin: "ins_1".into(),
            stream: "stdout".into(),
            source: Some(Source { org: "acme".into(), project: "web".into(), deployment: "web-abc1234-acme".into() }),
            message: msg.into(),
        }
    }

    #[test]
    fn targets_are_shown_without_what_may_be_secret() {
        let t = Target::parse("loki+https://u:pw@logs.example.com:3100/loki/api/v1/push?key=s3cret").unwrap();
        assert_eq!(t.kind(), "loki");
        assert_eq!(t.shown(), "loki+https://logs.example.com/…");
        let t = Target::parse("tls://logs.example.com:6514").unwrap();
        assert_eq!((t.kind(), t.shown().as_str()), ("syslog-tls", "tls://logs.example.com/…"));
        assert_eq!(Target::parse("udp://10.0.0.1:514").unwrap().shown(), "udp://10.0.0.1/…");
        assert!(pem_roots("not a certificate").is_err());
    }

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
        let m = format("node-1", &record(Severity::Warning, "slow \"query\""));
        assert_eq!(
            m,
            "<12>1 2026-12-01T10:00:00.000Z node-1 acme/web ins_1 stdout [zeitwork@32473 org=\"acme\" project=\"web\" deployment=\"web-abc1234-acme\"] slow \"query\""
        );
        let bare = Record { source: None, stream: "stderr".into(), ..record(Severity::Error, "x") };
        assert!(format("n", &bare).starts_with("<11>1 "));
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse("udp://logs.example.com:514"), Ok(Target::Udp("logs.example.com:514".into())));
        assert_eq!(Target::parse("tcp://10.0.0.5:6514"), Ok(Target::Tcp("10.0.0.5:6514".into())));
        assert_eq!(
            Target::parse("tls://logs.example.com:6514"),
            Ok(Target::Tls { addr: "logs.example.com:6514".into(), host: "logs.example.com".into() })
        );
        assert_eq!(
            Target::parse("https://in.logs.example.com/"),
            Ok(Target::Http { url: "https://in.logs.example.com/".into(), format: HttpFormat::Json })
        );
        assert_eq!(
            Target::parse("loki+http://loki:3100/loki/api/v1/push"),
            Ok(Target::Http { url: "http://loki:3100/loki/api/v1/push".into(), format: HttpFormat::Loki })
        );
        assert_eq!(
            Target::parse("elasticsearch+https://es:9200/logs/_bulk"),
            Ok(Target::Http { url: "https://es:9200/logs/_bulk".into(), format: HttpFormat::Elasticsearch })
        );
        for bad in ["udp://x", "udp://x:0", "ftp://x:21", "tls://x", "https://", "logs.example.com:514", "tcp://x:1/a"]
        {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batches_in_each_format() {
        let batch = [record(Severity::Info, "one"), record(Severity::Error, "two")];
        let (json, ct) = batch_body(HttpFormat::Json, "node-1", &batch);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v[1]["message"], "two");
        assert_eq!(v[1]["severity"], "err");
        assert_eq!(v[0]["deployment"], "web-abc1234-acme");
        assert_eq!(v[0]["@timestamp"], "2026-12-01T10:00:00.000Z");

        let (bulk, ct) = batch_body(HttpFormat::Elasticsearch, "node-1", &batch);
        assert_eq!(ct, "application/x-ndjson");
        let lines: Vec<&str> = std::str::from_utf8(&bulk).unwrap().lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], r#"{"create":{}}"#);
        assert_eq!(serde_json::from_str::<serde_json::Value>(lines[3]).unwrap()["message"], "two");
        assert!(bulk.ends_with(b"\n"), "a bulk body ends with a newline");

        let (loki, _) = batch_body(HttpFormat::Loki, "node-1", &batch);
        let v: serde_json::Value = serde_json::from_slice(&loki).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2, "one stream per level: {v}");
        let err = streams.iter().find(|s| s["stream"]["level"] == "err").unwrap();
        assert_eq!(err["stream"]["project"], "web");
        assert_eq!(err["values"][0][0], "1796119200000000000");
        assert_eq!(err["values"][0][1], "origin=ins_1 two");
    }
}
