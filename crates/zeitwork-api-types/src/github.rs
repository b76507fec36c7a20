//! GitHub intake: webhooks, deliveries, triggers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

/// Configures the webhook of a GitHub repository.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGithubHook {
    /// The repository's owner on GitHub.
    pub org: String,
    /// The repository's name.
    pub repo: String,
    /// Events acted on: `push` (and `ping`, always answered). Default `["push"]`.
    #[serde(default)]
    pub events: Vec<String>,
    /// The webhook secret set on GitHub (stored encrypted).
    pub secret: String,
    /// The Zeitwork organisation whose projects the webhook deploys. An org
    /// token's own organisation by default; a platform admin names it when
    /// projects of several organisations deploy the repository. Only that
    /// organisation's projects ever deploy from deliveries signed with this secret.
    #[serde(default)]
    pub project_org: Option<String>,
    /// A token for the repository (a fine-grained personal access token or an
    /// installation token with contents:read and statuses:write): used to clone
    /// private repositories for builds and to post commit statuses and preview
    /// comments. Stored encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A configured webhook (the secret is never shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GithubHook {
    /// The Zeitwork organisation the webhook belongs to.
    pub project_org: String,
    /// `owner/name`.
    pub repo: String,
    pub events: Vec<String>,
    /// Path of the payload URL to set on GitHub, on this operator's address.
    pub path: String,
    /// Whether a repository token is stored (clones of private repositories, commit statuses).
    #[serde(default)]
    pub token: bool,
    pub created_at: DateTime<Utc>,
}

/// One webhook delivery and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GithubDelivery {
    /// GitHub's `X-GitHub-Delivery`.
    pub id: String,
    pub repo: String,
    pub event: String,
    /// `deployed`, `skipped`, `ignored`, `answered`, `rejected` or `failed`.
    pub status: String,
    /// What happened, for people.
    pub outcome: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    pub deployments: Vec<String>,
    pub received_at: DateTime<Utc>,
}

/// Deploys a repository's commit by hand.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GithubTrigger {
    pub org: String,
    pub repo: String,
    /// A commit SHA, or a branch whose last pushed commit is known from a delivery.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The Zeitwork organisation whose projects to deploy (an org token's own by default).
    #[serde(default)]
    pub project_org: Option<String>,
}

/// What one instance uses, as its node agent measured it just now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceMetrics {
    pub instance: String,
    pub node: Option<String>,
    pub region: String,
    pub status: InstanceStatus,
    /// Seconds since it became ready.
    pub uptime_secs: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used since it started.
    pub cpu_seconds: Option<f64>,
    pub processes: Option<u64>,
    /// Why the numbers are missing (node unreachable, not running).
    pub error: Option<String>,
}

/// Resource use of a deployment's live instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentMetrics {
    pub deployment: String,
    pub ready: u32,
    pub instances: Vec<InstanceMetrics>,
    /// Sums over the instances that answered.
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
}
