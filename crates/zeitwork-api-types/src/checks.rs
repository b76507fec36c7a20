//! Uptime checks of projects and their samples.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

/// Settings of an uptime check: an HTTP request to the project's address through the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// Path (and query) requested, e.g. `/healthz` (default `/`).
    #[serde(default = "default_check_path")]
    pub path: String,
    /// `GET` or `HEAD` (default `GET`).
    #[serde(default = "default_check_method")]
    pub method: String,
    /// The status a healthy app answers (default 200).
    #[serde(default = "default_check_status")]
    pub expected_status: u16,
    /// Text the body must contain, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// Seconds between probes (10 to 3600, default 60).
    #[serde(default = "default_check_interval")]
    pub interval_secs: u32,
    /// Seconds a probe may take (1 to 60, at most the interval; default 10).
    #[serde(default = "default_check_timeout")]
    pub timeout_secs: u32,
    /// An answer slower than this (ms) makes the check `degraded` (default 2000).
    #[serde(default = "default_check_slow")]
    pub degraded_ms: u32,
    /// The environment whose address is probed (default production).
    #[serde(default = "default_check_env")]
    pub environment: Environment,
    /// Regions probing (default: every region the project runs in; any region may probe):
    /// the operator's own region probes itself, every other through one of its ready nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

fn default_check_path() -> String {
    "/".into()
}
fn default_check_method() -> String {
    "GET".into()
}
fn default_check_status() -> u16 {
    200
}
fn default_check_interval() -> u32 {
    60
}
fn default_check_timeout() -> u32 {
    10
}
fn default_check_slow() -> u32 {
    2000
}
fn default_check_env() -> Environment {
    Environment::Production
}

/// An uptime check, its state and figures over a window (by default the last 24 hours).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthCheck {
    pub id: String,
    pub org: String,
    pub project: String,
    /// The URL probed.
    pub url: String,
    #[serde(flatten)]
    pub spec: HealthCheckSpec,
    /// `unknown` (no sample yet), `up`, `degraded` (a failure, or slow) or `down` (failures in a row).
    pub state: String,
    /// Share of passing samples over the window, percent.
    pub uptime_percent: Option<f64>,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub last_sample: Option<HealthSample>,
    /// Start of the window the figures cover (`?window=1h|24h|7d` or `?from=&to=`).
    pub window_from: DateTime<Utc>,
    /// End of the window the figures cover.
    pub window_to: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// One probe of an uptime check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthSample {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub region: String,
    pub ok: bool,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

/// One uptime probe an operator asks a node agent to run from its region
/// (`POST /v1/probe` on the agent; operators only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// The address probed, e.g. `https://web-acme.apps.example.com/healthz`.
    pub url: String,
    /// `GET` or `HEAD`.
    pub method: String,
    pub expected_status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    pub timeout_secs: u32,
    /// Send the request to this `HOST:PORT` (an edge proxy) with the URL's host as
    /// `Host`, instead of resolving the URL (single machines, split DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The answer's status, when there was an answer.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// Why the probe failed (wrong status, body without the text, no answer); none when it passed.
    pub error: Option<String>,
}
