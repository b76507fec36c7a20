//! An organisation's log drains: where its app logs, build output and audit
//! events also go (the same kinds as the platform-wide `log_forward`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Adds a log drain to an organisation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLogDrain {
    /// Where to send (stored encrypted): `udp://HOST:PORT`, `tcp://HOST:PORT`, `tls://HOST:PORT`
    /// (syslog, RFC 5424), `https://…` (JSON arrays), `loki+https://…/loki/api/v1/push` or
    /// `elasticsearch+https://…/INDEX/_bulk`.
    pub url: String,
    /// HTTP drains: sent as `Authorization: Bearer …` (stored encrypted).
    #[serde(default)]
    pub token: Option<String>,
    /// PEM of the CA that signed the receiver's certificate (TLS and HTTPS), besides the public roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// What to send: `app` (instance output), `build` (build output), `audit` (the org's audit
    /// events). Empty: all three.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// A log drain as the API shows it: the destination without port, path or
/// credentials, and whether it has a token (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogDrain {
    pub id: String,
    pub org: String,
    /// `syslog-udp`, `syslog-tcp`, `syslog-tls`, `http-json`, `loki` or `elasticsearch`.
    pub kind: String,
    /// `scheme://host/…`.
    pub url: String,
    pub has_token: bool,
    pub has_ca: bool,
    pub sources: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A drain an instance's output goes to, as its node agent gets it with the
/// assignment (decrypted: the agent sends to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AssignedLogDrain {
    pub id: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Internal networks the drain may reach besides public addresses (the operator's
    /// `drain_allowed_networks`): the agent checks every address it sends to against them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<String>,
}
