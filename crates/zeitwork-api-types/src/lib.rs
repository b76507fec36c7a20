//! The types of Zeitwork's HTTP API: request and response bodies shared by the
//! operator, its clients (CLI, node agents, edge proxies) and the tests.
//!
//! This crate owns the shape of the contract and the validation rules of every
//! field that comes from outside. It must not do I/O, talk to a store or know
//! about HTTP servers.

mod agents;
mod analytics;
mod builds;
mod checks;
mod deployments;
mod domains;
mod drains;
mod events;
mod github;
mod nodes;
mod notifications;
mod orgs;
mod projects;
mod releases;
mod routing;
pub mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use agents::*;
pub use analytics::*;
pub use builds::*;
pub use checks::*;
pub use deployments::*;
pub use domains::*;
pub use drains::*;
pub use events::*;
pub use github::*;
pub use nodes::*;
pub use notifications::*;
pub use orgs::*;
pub use projects::*;
pub use releases::*;
pub use routing::*;
pub use validate::ValidationError;

/// The body of every error response: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// Stable machine-readable code, e.g. `invalid_field`, `not_found`, `conflict`.
    pub code: String,
    /// What went wrong and what to change.
    pub message: String,
}

// ---------------------------------------------------------------- health

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ok` when every check passed, `unavailable` otherwise.
    pub status: String,
    pub checks: BTreeMap<String, CheckResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub version: String,
    pub commit: String,
    pub build_time: String,
}
