//! Deployment events and the live event stream.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

// ---------------------------------------------------------------- events

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Token name and id that made the change, or `system`.
    pub actor: String,
    /// e.g. `project.create`.
    pub action: String,
    /// e.g. `acme/webapp`.
    pub target: String,
    pub org: Option<String>,
    pub project: Option<String>,
    /// `ok` or `denied`.
    pub result: String,
    pub detail: Option<serde_json::Value>,
}

// ---------------------------------------------------------------- event stream

/// A change of a deployment, instance or node, as sent on `GET /api/v1/events/stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// `deployment`, `instance` or `node` (also the SSE event name).
    pub kind: String,
    pub id: String,
    pub org: Option<String>,
    pub project: Option<String>,
    /// For instances: their deployment.
    pub deployment: Option<String>,
    pub status: String,
    /// The status before; none when the thing is new.
    pub previous: Option<String>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}
