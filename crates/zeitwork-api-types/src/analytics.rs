//! Answers of the analytics endpoints.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What one org's instances are allocated now, and what they used, from the
/// samples the operator takes of the node agents' measurements (every
/// `usage_sample_secs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrgResources {
    pub org: String,
    /// Live instances now.
    pub instances: u64,
    /// vCPU the live instances are allocated.
    pub vcpu: u64,
    /// Memory the live instances are allocated, MiB.
    pub memory_mib: u64,
    /// CPU time used by every instance the org ran, each counted from its start.
    pub cpu_seconds: f64,
    /// Memory the live instances used at their latest samples.
    pub memory_bytes: u64,
    /// Time instances ran, each from its start to its latest sample, in hours.
    pub instance_hours: f64,
    /// When the latest of these samples was taken; none before the first.
    pub sampled_at: Option<DateTime<Utc>>,
}

/// Allocation and use per org.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResourcesByOrg {
    pub orgs: Vec<OrgResources>,
}
