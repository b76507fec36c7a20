//! The operator's configuration, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Operator settings. Loaded from a TOML file, then `ZEITWORK_*` environment
/// variables, then flags (later wins); see the binary for the merge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Directory for the SQLite file, the encryption key and the admin token.
    pub data_dir: PathBuf,
    /// `postgres://…` to share one PostgreSQL between operators; SQLite in
    /// `data_dir` when absent.
    pub database_url: Option<String>,
    /// Apps are served at `<deployment-id>.<apps_domain>`.
    pub apps_domain: String,
    /// Scheme of app URLs shown to users.
    pub apps_scheme: String,
    /// Port of app URLs, when not the scheme's default.
    pub apps_port: Option<u16>,
    /// Base64 of 32 bytes; generated into `data_dir/secret.key` when absent.
    /// Every operator sharing a database needs the same key.
    pub encryption_key: Option<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted image archive upload, in bytes.
    pub max_archive_bytes: u64,
    /// `instances_per_region` of new projects.
    pub default_instances_per_region: u32,
    /// Addresses the platform is reached at (the load balancers); a custom
    /// domain is verified when it resolves to one of them.
    pub public_addresses: Vec<std::net::IpAddr>,
    /// Seconds without a heartbeat after which a node is down and its instances move.
    pub node_timeout_secs: u64,
    /// Seconds a deployment waits for room (a ready node, enough memory) before it fails.
    pub placement_timeout_secs: u64,
    /// Seconds a replaced deployment keeps its instances for an instant rollback before it sleeps.
    pub rollback_window_secs: u64,
    /// The IPv4 range private project networks come from: a /24 per project and
    /// environment (`100.96.0.0/11`: 8,192 networks of 254 instances).
    pub private_network: String,
    /// Attempts to deliver a notification before it goes to the dead-letter queue.
    pub notify_max_attempts: u32,
    /// First retry delay of a notification in ms; doubled per attempt (with jitter), at most 10 minutes.
    pub notify_backoff_ms: u64,
    /// Milliseconds a notification's receiver (webhook, Slack, GitHub) has to answer one attempt.
    pub notify_timeout_ms: u64,
    /// PEM file of a CA that email relays' certificates may be signed by (besides the public roots).
    pub smtp_ca: Option<PathBuf>,
    /// Let notification channels point at loopback or private addresses (tests, private receivers).
    pub notifications_allow_internal: bool,
    /// Seconds a client has to send a request's head before its connection is closed.
    pub header_read_timeout_secs: u64,
    /// Open connections one client address may hold.
    pub max_connections_per_client: usize,
    /// Longest pause, in seconds, between two pieces of a request body; a body that
    /// stalls longer is cut off with 408. Also the time before `min_body_bytes_per_sec` applies.
    pub body_idle_timeout_secs: u64,
    /// Bytes per second a request body must average after `body_idle_timeout_secs`
    /// (0: no minimum); a body trickled in more slowly is cut off with 408.
    pub min_body_bytes_per_sec: u64,
    /// DNS server asked about custom domains (ownership TXT record, where they
    /// point); the first nameserver of /etc/resolv.conf when absent.
    pub dns_resolver: Option<SocketAddr>,
    /// Hours an unverified custom domain stays claimed; then the claim is removed.
    pub domain_claim_ttl_hours: u32,
    /// New nodes wait in `pending_approval`, without placements, until an admin
    /// approves them (`zeitwork nodes approve ID`).
    pub require_node_approval: bool,
    /// Bearer token Prometheus presents to scrape `/metrics` (besides a platform admin token).
    pub metrics_token: Option<String>,
    /// Largest accepted source archive (a directory to build), in bytes.
    pub max_source_bytes: u64,
    /// Limits of one build: wall time, memory (MiB) and CPUs of its builder.
    pub build_timeout_secs: u64,
    pub build_memory_mib: u32,
    pub build_vcpu: u32,
    /// Disk a project's layer store (its build cache) and a build's work directory may hold, MiB.
    pub build_disk_mib: u64,
    /// Where commits are cloned from for builds: `<git_base_url>/<owner>/<repo>.git`.
    pub github_git_url: String,
    /// GitHub's REST API (GitHub Enterprise: `https://HOST/api/v3`), for commit statuses and preview comments.
    pub github_api_url: String,
    /// Slack's Web API, for channels that post as a bot (`chat.postMessage`).
    pub slack_api_url: String,
    /// The region this operator probes uptime checks from (a region code).
    pub region: String,
    /// Send uptime probes to this edge proxy address (with the app's Host header)
    /// instead of resolving the app's URL (single machines, split DNS).
    pub uptime_via: Option<SocketAddr>,
    /// Days uptime samples are kept.
    pub health_sample_retention_days: u32,
    /// Seconds between two samples of every ready instance's CPU time and memory
    /// (asked of the node agents), which resource analytics add up per org.
    pub usage_sample_secs: u64,
    /// Days audit events are kept.
    pub audit_retention_days: u32,
    /// Days delivered notifications are kept in the outbox (dead letters stay until retried or dropped).
    pub outbox_retention_days: u32,
    /// Days the traffic figures edges report (requests, errors, latency per
    /// deployment: what releases are judged on) are kept.
    pub traffic_retention_days: u32,
    /// Days the usage figures of an instance (CPU time, memory, hours: what
    /// resource analytics add up per org) are kept after its last sample.
    pub usage_retention_days: u32,
    /// Sign-in to the web console with GitHub (an OAuth app); off when absent.
    pub github_oauth: Option<GithubOAuth>,
    /// Send the audit log and build output to this log drain: syslog at `udp://HOST:PORT`,
    /// `tcp://HOST:PORT` or `tls://HOST:PORT`, or HTTP batches at `https://…` (JSON array),
    /// `loki+https://…` or `elasticsearch+https://…`.
    pub log_forward: Option<String>,
    /// PEM file of the CA that signed the drain's certificate (besides the public roots).
    pub log_forward_ca: Option<PathBuf>,
    /// Bearer token for an HTTP drain.
    pub log_forward_token: Option<String>,
    /// Internal networks organisations' log drains may point at (CIDR blocks such as
    /// `10.20.0.0/24`, or addresses). Without them a drain reaches public addresses only:
    /// never loopback, link-local (the cloud metadata address), private, shared
    /// (100.64.0.0/10), unspecified or multicast ones, checked when it is created and
    /// each time its host is resolved to send.
    pub drain_allowed_networks: Vec<String>,
}

/// A GitHub OAuth app for console sign-in, and how GitHub organisations map to Zeitwork roles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubOAuth {
    pub client_id: String,
    pub client_secret: String,
    /// Where browsers are sent to authorise (GitHub's unless set, e.g. a stand-in for tests).
    #[serde(default = "GithubOAuth::default_authorize_url")]
    pub authorize_url: String,
    /// Where the operator exchanges the code for an access token.
    #[serde(default = "GithubOAuth::default_token_url")]
    pub token_url: String,
    /// GitHub's REST API (`/user`, `/user/orgs`).
    #[serde(default = "GithubOAuth::default_api_url")]
    pub api_url: String,
    /// Members of `github_org` get `role` in the Zeitwork organisation `org`; the highest match wins.
    pub orgs: Vec<GithubOrgRole>,
}

/// One mapping of GitHub organisation membership to a Zeitwork role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubOrgRole {
    pub github_org: String,
    pub org: String,
    pub role: zeitwork_api_types::Role,
}

impl GithubOAuth {
    fn default_authorize_url() -> String {
        "https://github.com/login/oauth/authorize".into()
    }
    fn default_token_url() -> String {
        "https://github.com/login/oauth/access_token".into()
    }
    fn default_api_url() -> String {
        "https://api.github.com".into()
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            data_dir: PathBuf::from("/var/lib/zeitwork"),
            database_url: None,
            apps_domain: "zeitwork.localhost".into(),
            apps_scheme: "https".into(),
            apps_port: None,
            encryption_key: None,
            max_body_bytes: 1024 * 1024,
            max_archive_bytes: 4 << 30,
            default_instances_per_region: 3,
            public_addresses: Vec::new(),
            node_timeout_secs: 15,
            placement_timeout_secs: 300,
            rollback_window_secs: 600,
            private_network: "100.96.0.0/11".into(),
            notify_max_attempts: 8,
            notify_backoff_ms: 1000,
            notify_timeout_ms: 10_000,
            smtp_ca: None,
            notifications_allow_internal: false,
            header_read_timeout_secs: 10,
            max_connections_per_client: 256,
            body_idle_timeout_secs: 30,
            min_body_bytes_per_sec: 1024,
            metrics_token: None,
            require_node_approval: false,
            dns_resolver: None,
            domain_claim_ttl_hours: 72,
            max_source_bytes: 512 << 20,
            build_timeout_secs: 1800,
            build_memory_mib: 4096,
            build_vcpu: 2,
            build_disk_mib: 20 << 10,
            github_git_url: "https://github.com".into(),
            github_api_url: "https://api.github.com".into(),
            slack_api_url: "https://slack.com/api".into(),
            region: "local".into(),
            uptime_via: None,
            health_sample_retention_days: 30,
            usage_sample_secs: 60,
            audit_retention_days: 365,
            outbox_retention_days: 7,
            traffic_retention_days: 7,
            usage_retention_days: 400,
            github_oauth: None,
            log_forward: None,
            log_forward_ca: None,
            log_forward_token: None,
            drain_allowed_networks: Vec::new(),
        }
    }
}

/// A configuration value that cannot work; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

impl OperatorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, message: String| Err(ConfigError { field, message });
        if let Err(e) = zeitwork_api_types::validate::domain_name("apps_domain", &self.apps_domain) {
            return err("apps_domain", e.message);
        }
        if !matches!(self.apps_scheme.as_str(), "http" | "https") {
            return err("apps_scheme", format!("{:?} is not http or https", self.apps_scheme));
        }
        if self.apps_port == Some(0) {
            return err("apps_port", "use 1 to 65535".into());
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:")) {
                return err(
                    "database_url",
                    format!("{} is not a postgres:// or sqlite: URL", zeitwork_store::redact_url(url)),
                );
            }
        }
        if let Some(key) = &self.encryption_key {
            if let Err(e) = crate::secrets::Cipher::from_base64(key) {
                return err("encryption_key", e.to_string());
            }
        }
        if !(1..=3600).contains(&self.usage_sample_secs) {
            return err("usage_sample_secs", "use 1 to 3600".into());
        }
        if !(1..=3 * 3600 * 24).contains(&self.build_timeout_secs) {
            return err("build_timeout_secs", "use 1 to 259200".into());
        }
        if !(64..=1 << 20).contains(&self.build_memory_mib) {
            return err("build_memory_mib", "use 64 to 1048576".into());
        }
        if self.build_disk_mib < 64 {
            return err("build_disk_mib", "use at least 64".into());
        }
        if !(1..=256).contains(&self.build_vcpu) {
            return err("build_vcpu", "use 1 to 256".into());
        }
        if let Err(e) = zeitwork_api_types::validate::dns_label("region", &self.region) {
            return err("region", e.message);
        }
        if !(1..=8760).contains(&self.domain_claim_ttl_hours) {
            return err(
                "domain_claim_ttl_hours",
                format!("{} is out of range; use 1 to 8760 hours", self.domain_claim_ttl_hours),
            );
        }
        for (field, days) in [
            ("health_sample_retention_days", self.health_sample_retention_days),
            ("audit_retention_days", self.audit_retention_days),
            ("outbox_retention_days", self.outbox_retention_days),
            ("traffic_retention_days", self.traffic_retention_days),
            ("usage_retention_days", self.usage_retention_days),
        ] {
            if !(1..=3650).contains(&days) {
                return err(field, format!("{days} is out of range; use 1 to 3650 days"));
            }
        }
        if let Some(t) = &self.log_forward {
            if let Err(e) = zeitwork_telemetry::drain::Target::parse(t) {
                return err("log_forward", e);
            }
        }
        if let Err(e) = zeitwork_telemetry::drain::Reach::new(&self.drain_allowed_networks) {
            return err("drain_allowed_networks", e);
        }
        if !(100..=120_000).contains(&self.notify_timeout_ms) {
            return err("notify_timeout_ms", "use 100 to 120000".into());
        }
        if let Some(ca) = self.smtp_ca.as_ref().filter(|ca| !ca.is_file()) {
            return err("smtp_ca", format!("{} does not exist", ca.display()));
        }
        if let Some(ca) = &self.log_forward_ca {
            if !ca.is_file() {
                return err("log_forward_ca", format!("{} does not exist", ca.display()));
            }
        }
        if self.max_source_bytes == 0 {
            return err("max_source_bytes", "use a positive number of bytes".into());
        }
        for (field, url) in [
            ("github_git_url", &self.github_git_url),
            ("github_api_url", &self.github_api_url),
            ("slack_api_url", &self.slack_api_url),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.ends_with('/') {
                return err(field, format!("{url:?} is not an http(s) base URL without a trailing slash"));
            }
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_body_bytes) {
            return err("max_body_bytes", "use 1024 to 1073741824".into());
        }
        if let Err(e) = zeitwork_api_types::validate::instances_per_region("", self.default_instances_per_region) {
            return err("default_instances_per_region", e.message);
        }
        if !(1..=3600).contains(&self.node_timeout_secs) {
            return err("node_timeout_secs", "use 1 to 3600".into());
        }
        if !(1..=86400).contains(&self.placement_timeout_secs) {
            return err("placement_timeout_secs", "use 1 to 86400".into());
        }
        if !(1..=86400).contains(&self.rollback_window_secs) {
            return err("rollback_window_secs", "use 1 to 86400".into());
        }
        if let Err(m) = private_range(&self.private_network) {
            return err("private_network", m);
        }
        if !(1..=100).contains(&self.notify_max_attempts) {
            return err("notify_max_attempts", "use 1 to 100".into());
        }
        if !(1..=300).contains(&self.header_read_timeout_secs) {
            return err("header_read_timeout_secs", "use 1 to 300".into());
        }
        if !(1..=3600).contains(&self.body_idle_timeout_secs) {
            return err("body_idle_timeout_secs", "use 1 to 3600".into());
        }
        if self.metrics_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return err("metrics_token", "leave it out, or set a non-empty token".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections_per_client) {
            return err("max_connections_per_client", "use 1 to 1000000".into());
        }
        if !(10..=600_000).contains(&self.notify_backoff_ms) {
            return err("notify_backoff_ms", "use 10 to 600000".into());
        }
        if let Some(g) = &self.github_oauth {
            if g.client_id.is_empty() || g.client_secret.is_empty() {
                return err("github_oauth", "client_id and client_secret must not be empty".into());
            }
            for url in [&g.authorize_url, &g.token_url, &g.api_url] {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return err("github_oauth", format!("{url:?} is not an http(s) URL"));
                }
            }
            if g.orgs.is_empty() {
                return err("github_oauth", "map at least one GitHub organisation in `orgs`".into());
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return err("data_dir", "must not be empty".into());
        }
        Ok(())
    }

    /// The public URL of a deployment or project host.
    pub fn app_url(&self, host_label: &str) -> String {
        let port = match (self.apps_scheme.as_str(), self.apps_port) {
            (_, None) | ("http", Some(80)) | ("https", Some(443)) => String::new(),
            (_, Some(p)) => format!(":{p}"),
        };
        format!("{}://{host_label}.{}{port}", self.apps_scheme, self.apps_domain)
    }
}

/// The private network range as (first address, number of /24 networks in it).
pub fn private_range(s: &str) -> Result<(std::net::Ipv4Addr, u32), String> {
    let r = zeitwork_api_types::validate::EgressRule::parse(s)?;
    if r.port.is_some() || !(8..=24).contains(&r.prefix_len) {
        return Err(format!("{s:?}: use an IPv4 CIDR block from /8 to /24, e.g. 100.96.0.0/11"));
    }
    Ok((r.addr, 1 << (24 - r.prefix_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_fields() {
        OperatorConfig::default().validate().unwrap();
        let c = OperatorConfig { apps_domain: "bad domain".into(), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "apps_domain");
        let c = OperatorConfig { database_url: Some("mysql://x".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "database_url");
        let c = OperatorConfig { encryption_key: Some("nope".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "encryption_key");
        let c = OperatorConfig { drain_allowed_networks: vec!["10.0.0.0/40".into()], ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "drain_allowed_networks");
        let parsed: Result<OperatorConfig, _> = toml::from_str("lisen = \"1.2.3.4:1\"");
        assert!(parsed.unwrap_err().to_string().contains("lisen"));
    }

    #[test]
    fn app_urls() {
        let c = OperatorConfig { apps_scheme: "http".into(), apps_port: Some(8083), ..Default::default() };
        assert_eq!(c.app_url("web-abc1234-acme"), "http://web-abc1234-acme.zeitwork.localhost:8083");
        let c = OperatorConfig::default();
        assert_eq!(c.app_url("x"), "https://x.zeitwork.localhost");
    }
}
