//! The types of Zeitwork's HTTP API: request and response bodies shared by the
//! operator, its clients (CLI, node agents, edge proxies) and the tests.
//!
//! This crate owns the shape of the contract and the validation rules of every
//! field that comes from outside. It must not do I/O, talk to a store or know
//! about HTTP servers.

mod builds;
mod checks;
mod github;
mod notifications;
mod releases;
pub mod validate;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use builds::*;
pub use checks::*;
pub use github::*;
pub use notifications::*;
pub use releases::*;
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

// ---------------------------------------------------------------- regions

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Region {
    pub id: String,
    /// DNS label, e.g. `us-east`.
    pub code: String,
    pub name: String,
    /// ISO 3166-1 alpha-2 country code, e.g. `US`.
    pub country: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRegion {
    pub code: String,
    pub name: String,
    /// ISO 3166-1 code (`US`, `USA`) or a country's name (`United States`);
    /// stored as the alpha-2 code.
    pub country: String,
}

// ---------------------------------------------------------------- nodes

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub vcpu: u32,
    /// MiB.
    pub memory: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    Draining,
    Drained,
    Down,
    /// Registered while the operator requires approval: gets no placements until
    /// an admin approves it (`POST /api/admin/nodes/{id}/approve`).
    PendingApproval,
    /// Refused by an admin: its credential is revoked and it may not register again
    /// until the node is deleted.
    Rejected,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Drained => "drained",
            NodeStatus::Down => "down",
            NodeStatus::PendingApproval => "pending_approval",
            NodeStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ready" => NodeStatus::Ready,
            "draining" => NodeStatus::Draining,
            "drained" => NodeStatus::Drained,
            "down" => NodeStatus::Down,
            "pending_approval" => NodeStatus::PendingApproval,
            "rejected" => NodeStatus::Rejected,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// Region code.
    pub region: String,
    /// URL of the node agent, e.g. `http://10.0.0.5:8081`.
    pub address: String,
    pub status: NodeStatus,
    /// What the scheduler may place: memory as is, vCPU shared (cores x the node's `cpu_overcommit`).
    pub capacity: Capacity,
    /// The machine itself (cores, MiB), when the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<Capacity>,
    /// Resources held by the instances placed on this node.
    pub allocated: Capacity,
    /// Number of instances placed on this node.
    pub instances: u64,
    pub runtime: String,
    /// How the runtime was chosen (accelerator, probe results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_detail: Option<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Only in the answer to a registration with the shared node-agent token:
    /// this node's own credential, shown once. It acts for this node only
    /// (heartbeats, assignments, instance reports); the agent uses it from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    pub hostname: String,
    pub region: String,
    pub address: String,
    /// What the scheduler may place on the node (vCPU may exceed cores: CPU is shared).
    pub capacity: Capacity,
    /// The machine's own cores and memory.
    #[serde(default)]
    pub physical: Option<Capacity>,
    #[serde(default)]
    pub runtime: Option<String>,
    /// How the runtime was chosen, shown on the node (at most 2000 characters).
    #[serde(default)]
    pub runtime_detail: Option<String>,
}

// ---------------------------------------------------------------- orgs

/// Organisation roles, weakest first: Guest < Developer < Admin < Owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Guest,
    Developer,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "guest" => Role::Guest,
            "developer" => Role::Developer,
            "admin" => Role::Admin,
            "owner" => Role::Owner,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    pub slug: String,
    /// Display name; defaults to the slug.
    #[serde(default)]
    pub name: Option<String>,
    /// A user (e-mail or name) who becomes the organisation's first Owner.
    #[serde(default)]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub org: String,
    /// The member's identity (an e-mail address or a user name).
    pub user: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveMember {
    pub user: String,
}

// ---------------------------------------------------------------- projects

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs, 1–32.
    pub vcpu: u32,
    /// Memory in MiB, 128–65536.
    pub memory: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: String,
    pub org: String,
    pub name: String,
    /// `owner/repo` on GitHub, if the project deploys from a repository.
    pub github_repo: Option<String>,
    pub branch: String,
    pub auto_deploy: bool,
    pub port: u16,
    pub resources: Resources,
    pub instances_per_region: u32,
    /// Region codes the project runs in.
    pub regions: Vec<String>,
    /// Image to deploy for a commit, `{sha}` is replaced, e.g. `ghcr.io/acme/web:sha-{sha}`.
    pub image_template: Option<String>,
    pub rate_limit: Option<RateLimit>,
    /// A deployment no environment points at sleeps after this many seconds without requests (default 900).
    pub sleep_after_secs: u32,
    /// Instance count of the active deployment between bounds, by load; none: `instances_per_region` fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// Sleeping deployments are retired for good only once this many newer ones exist (default 20).
    pub retain_deployments: u32,
    /// Pushes to this branch deploy to staging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_branch: Option<String>,
    /// Tag pushes whose tag matches this regular expression deploy to production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_pattern: Option<String>,
    /// How images are built from source (projects without an `image_template` build every commit).
    #[serde(default)]
    pub build: BuildSettings,
    /// Active deployment id per environment (`preview-<n>` for pull request previews).
    pub current_deployment: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Rolling back on its own when a new deployment regresses.
    #[serde(default)]
    pub auto_rollback: AutoRollback,
    /// Canary steps of new deployments; none: the switch moves all traffic at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Shadow traffic before the switch; none: no copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Egress allow-list of its instances; none: they reach the internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// Pins a browser to the deployment that served it (off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skew_protection: Option<SkewProtection>,
    /// Run once (`/bin/sh -c`) in each new deployment's image before traffic moves to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command: Option<String>,
}

/// Skew protection: a response from an environment's stable address names the
/// deployment that served it in a cookie; later requests carrying it are served
/// by that deployment while it still runs (or sleeps), never by another project's
/// or environment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkewProtection {
    pub enabled: bool,
    /// How long a browser stays pinned (the cookie's `Max-Age`), 60 to 2592000 seconds; default 43200.
    #[serde(default = "default_skew_max_age")]
    pub max_age_secs: u32,
}

/// A browser stays pinned to one deployment for 12 hours unless the project says otherwise.
pub const DEFAULT_SKEW_MAX_AGE_SECS: u32 = 12 * 3600;

fn default_skew_max_age() -> u32 {
    DEFAULT_SKEW_MAX_AGE_SECS
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub org: String,
    #[serde(default)]
    pub github_repo: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub auto_deploy: Option<bool>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub instances_per_region: Option<u32>,
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    #[serde(default)]
    pub image_template: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub sleep_after_secs: Option<u32>,
    #[serde(default)]
    pub retain_deployments: Option<u32>,
    #[serde(default)]
    pub scaling: Option<Scaling>,
    #[serde(default)]
    pub staging_branch: Option<String>,
    #[serde(default)]
    pub tag_pattern: Option<String>,
    #[serde(default)]
    pub build: Option<BuildSettings>,
    #[serde(default)]
    pub auto_rollback: Option<AutoRollback>,
    #[serde(default)]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub shadow: Option<Shadow>,
}

/// Autoscaling of a project's active deployments, per region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// Fewest instances per region (0: scale to zero: the deployment sleeps when
    /// idle for `sleep_after_secs` and wakes on its next request).
    pub min_per_region: u32,
    /// Most instances per region.
    pub max_per_region: u32,
    /// Add instances while their average CPU use is above this share of their vCPU (1-100).
    #[serde(default)]
    pub target_cpu_percent: Option<u32>,
    /// Add instances while their average memory use is above this share of their limit (1-100).
    #[serde(default)]
    pub target_memory_percent: Option<u32>,
    /// Add instances while each serves more than this many requests at once, on
    /// average over the last 30 s (1-1000; what the edges measured).
    #[serde(default)]
    pub target_concurrency: Option<u32>,
}

/// Seconds without requests after which a deployment no environment points at sleeps.
pub const DEFAULT_SLEEP_AFTER_SECS: u32 = 900;
/// Newer deployments a sleeping one waits for before it is retired for good.
pub const DEFAULT_RETAIN_DEPLOYMENTS: u32 = 20;

/// Any subset of a project's settable fields. `null` clears an optional field.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchProject {
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub github_repo: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_deploy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances_per_region: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub image_template: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Option<RateLimit>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_after_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_deployments: Option<u32>,
    /// `null` returns to the fixed `instances_per_region`.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Scaling>)]
    pub scaling: Option<Option<Scaling>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub staging_branch: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub tag_pattern: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<AutoRollback>,
    /// `null` returns to switching at once.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Rollout>)]
    pub rollout: Option<Option<Rollout>>,
    /// `null` turns shadow traffic off.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Shadow>)]
    pub shadow: Option<Option<Shadow>>,
    /// `null` lifts the egress allow-list (instances reach the internet again).
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Egress>)]
    pub egress: Option<Option<Egress>>,
    /// `null` turns skew protection off.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<SkewProtection>)]
    pub skew_protection: Option<Option<SkewProtection>>,
    /// `null` or `""` removes the release command.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub release_command: Option<Option<String>>,
}

fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

// ---------------------------------------------------------------- env vars

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnvVar {
    pub key: String,
    /// The value, or `null` when the caller may only see that it exists.
    pub value: Option<String>,
    pub redacted: bool,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutEnvVar {
    pub value: String,
}

// ---------------------------------------------------------------- domains

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Domain {
    pub name: String,
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub verified: bool,
    /// `none`, `pending`, `issued`, `failed`.
    pub certificate: String,
    pub created_at: DateTime<Utc>,
    /// `verified` (routed, certificates issued) or `unverified` (not routed yet).
    #[serde(default)]
    pub status: String,
    /// The TXT record that proves ownership: `_zeitwork-challenge.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt_record: Option<String>,
    /// The value that TXT record must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt_value: Option<String>,
    /// What to do next while the domain is unverified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The DNS name whose TXT record proves that whoever added `domain` controls it.
pub fn domain_challenge_record(domain: &str) -> String {
    format!("_zeitwork-challenge.{domain}")
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDomain {
    pub name: String,
    #[serde(default)]
    pub environment: Option<Environment>,
}

// ---------------------------------------------------------------- deployments

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    Production,
    Staging,
    Preview,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Staging => "staging",
            Environment::Preview => "preview",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "production" => Environment::Production,
            "staging" => Environment::Staging,
            "preview" => Environment::Preview,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    /// Its image is being built from source; placed once the build succeeds.
    Building,
    Pending,
    Preparing,
    Starting,
    Ready,
    Active,
    Standby,
    /// No instances and no capacity held; its URL still works: a request wakes it.
    Sleeping,
    /// Woken from sleep (by a request or a rollback); an instance is being placed and started.
    Waking,
    Retired,
    Failed,
    /// Sent back by a regression (or a person) during its rollout or watch;
    /// nothing switches traffic to it again on its own.
    RolledBack,
}

impl DeploymentStatus {
    pub const ALL: [DeploymentStatus; 12] = [
        DeploymentStatus::Building,
        DeploymentStatus::Pending,
        DeploymentStatus::Preparing,
        DeploymentStatus::Starting,
        DeploymentStatus::Ready,
        DeploymentStatus::Active,
        DeploymentStatus::Standby,
        DeploymentStatus::Sleeping,
        DeploymentStatus::Waking,
        DeploymentStatus::Retired,
        DeploymentStatus::Failed,
        DeploymentStatus::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Building => "building",
            DeploymentStatus::Pending => "pending",
            DeploymentStatus::Preparing => "preparing",
            DeploymentStatus::Starting => "starting",
            DeploymentStatus::Ready => "ready",
            DeploymentStatus::Active => "active",
            DeploymentStatus::Standby => "standby",
            DeploymentStatus::Sleeping => "sleeping",
            DeploymentStatus::Waking => "waking",
            DeploymentStatus::Retired => "retired",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// `<project>-<nanoid7>-<org>`.
    pub id: String,
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub image: String,
    pub image_digest: Option<String>,
    pub commit_sha: Option<String>,
    pub commit_message: Option<String>,
    pub instances_per_region: u32,
    pub status: DeploymentStatus,
    /// Why the deployment failed, or what a `pending` one waits for.
    pub reason: Option<String>,
    pub url: String,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When an edge last served a request for it (reported every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request_at: Option<DateTime<Utc>>,
    /// The pull request a preview deployment shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u32>,
    /// Milliseconds its image took to build, for deployments built from source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Run once in its image before traffic moves to it; its output is in the deployment's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command: Option<String>,
    /// It changes data irreversibly (a schema migration): rolling back past it needs `force`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migration: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub org: String,
    pub project: String,
    /// The image to run; leave empty and give `build` to build one from source.
    #[serde(default)]
    pub image: String,
    /// Build the image from an uploaded source archive instead of naming one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRequest>,
    #[serde(default)]
    pub commit_sha: Option<String>,
    #[serde(default)]
    pub commit_message: Option<String>,
    #[serde(default)]
    pub instances_per_region: Option<u32>,
    #[serde(default)]
    pub environment: Option<Environment>,
    /// Canary steps for this deployment, instead of its project's `rollout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Shadow traffic for this deployment, instead of its project's `shadow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Overrides the project's `release_command` for this deployment (`""`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command: Option<String>,
    /// The deployment migrates data: rollbacks and promotions that go back past it need `force`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migration: bool,
}

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

// ---------------------------------------------------------------- tokens

/// Cluster roles: the machines of the platform, each allowed only what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterRole {
    NodeAgent,
    EdgeProxy,
    LoadBalancer,
    /// Operators calling node agents (logs); operators mint their own.
    Operator,
}

impl ClusterRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterRole::NodeAgent => "node-agent",
            ClusterRole::EdgeProxy => "edge-proxy",
            ClusterRole::LoadBalancer => "load-balancer",
            ClusterRole::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "node-agent" => ClusterRole::NodeAgent,
            "edge-proxy" => ClusterRole::EdgeProxy,
            "load-balancer" => ClusterRole::LoadBalancer,
            "operator" => ClusterRole::Operator,
            _ => return None,
        })
    }
}

/// What a token may act as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenScope {
    /// Everything, on every organisation.
    Admin,
    /// A role inside one organisation.
    Org { org: String, role: Role },
    /// A machine of the platform.
    Cluster { role: ClusterRole },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub scope: TokenScope,
    /// A read-only token may only call `GET` routes and sees secrets redacted.
    pub read_only: bool,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// A node's own credential acts for that node only (issued when the node registers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub scope: TokenScope,
    #[serde(default)]
    pub read_only: bool,
    /// Days until the token expires; never when absent.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// Returned once, on creation: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub token: Token,
    pub secret: String,
}

// ---------------------------------------------------------------- instances

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    Pending,
    Starting,
    Ready,
    Unhealthy,
    Stopping,
    Stopped,
    Exited,
    Failed,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 8] = [
        InstanceStatus::Pending,
        InstanceStatus::Starting,
        InstanceStatus::Ready,
        InstanceStatus::Unhealthy,
        InstanceStatus::Stopping,
        InstanceStatus::Stopped,
        InstanceStatus::Exited,
        InstanceStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Pending => "pending",
            InstanceStatus::Starting => "starting",
            InstanceStatus::Ready => "ready",
            InstanceStatus::Unhealthy => "unhealthy",
            InstanceStatus::Stopping => "stopping",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Exited => "exited",
            InstanceStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub id: String,
    pub deployment: String,
    pub node: Option<String>,
    pub region: String,
    /// Address of the app inside its node, e.g. `10.88.0.5:8080`.
    pub address: Option<String>,
    pub status: InstanceStatus,
    pub runtime: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ready_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i64>,
    pub exit_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

// ---------------------------------------------------------------- routing

/// What the edge proxies serve: host → deployment → ready instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutingTable {
    /// Changes whenever any route changes; equal versions mean equal tables.
    pub version: String,
    pub apps_domain: String,
    pub routes: Vec<Route>,
}

/// What changed in the routing table since an edge's cursor
/// (`GET /api/v1/routing/deltas`): the routes set and the hosts removed, or
/// the whole table (`snapshot`) when the edge has none, comes from another
/// operator, or is further behind than the operator's log reaches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutingDeltas {
    /// Pass it as `since` on the next call.
    pub cursor: String,
    /// The version of the whole table once this answer is applied.
    pub version: String,
    pub apps_domain: String,
    /// `routes` is the whole table: drop every route not in it.
    pub snapshot: bool,
    /// Routes added or changed (every route when `snapshot`).
    pub routes: Vec<Route>,
    /// Hosts no longer routed.
    #[serde(default)]
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Route {
    /// Lowercase host name without port.
    pub host: String,
    pub deployment: String,
    pub org: String,
    pub project: String,
    /// Set for hosts that follow an environment's active deployment.
    pub environment: Option<Environment>,
    /// Per-IP limit of the project, overriding the edge's default.
    pub rate_limit: Option<RateLimit>,
    /// A verified custom domain: edges obtain its certificate by ACME.
    #[serde(default)]
    pub acme: bool,
    pub instances: Vec<RouteInstance>,
    /// The deployment sleeps (or is waking): a request asks the operator to
    /// wake it and is held until an instance is ready.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wake: bool,
    /// The deployment was retired: requests answer 410 Gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
    /// A canary rollout: a share of clients goes to another deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<RouteCanary>,
    /// On a deployment's own host: the environments it has served (skew
    /// protection pins a client only to a deployment of the same environment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served: Vec<Environment>,
    /// On a stable host whose project turned skew protection on: the pin's lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skew_max_age_secs: Option<u32>,
    /// Shadow traffic: copies of a share of requests go to a candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Box<RouteShadow>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct RouteInstance {
    pub id: String,
    /// URL of the node agent that forwards to this instance.
    pub upstream: String,
}

// ---------------------------------------------------------------- certificates

/// A certificate with its private key, for edge proxies only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EdgeCertificate {
    pub domain: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: DateTime<Utc>,
}

/// An issued certificate (or why issuance failed) reported by an edge.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateUpload {
    #[serde(default)]
    pub cert_pem: Option<String>,
    #[serde(default)]
    pub key_pem: Option<String>,
    /// Set instead of the certificate when issuance failed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateLease {
    /// Who asks (an edge's name); the same holder may renew its lease.
    pub holder: String,
    /// Lease length in seconds (10–600).
    pub seconds: u32,
}

/// An ACME challenge answer any edge can serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcmeChallenge {
    pub token: String,
    pub domain: String,
    pub key_authorization: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct VerifyDomain {
    /// Platform admins may mark a domain verified without a DNS check.
    #[serde(default)]
    pub force: bool,
}

// ---------------------------------------------------------------- node agents

/// An instance a node agent must run, with everything it needs to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    pub instance: String,
    pub deployment: String,
    pub org: String,
    pub project: String,
    pub image: String,
    pub port: u16,
    pub resources: Resources,
    /// The project's env vars, decrypted for the agent.
    pub env: BTreeMap<String, String>,
    /// What the operator last recorded.
    pub status: InstanceStatus,
    /// For uploaded images: the password that lets this node pull exactly this
    /// image's repository from the operator (signed, valid for a day or two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_credential: Option<String>,
    /// Run once (`/bin/sh -c`) in the image before the app starts; set on one
    /// instance of a deployment, while the deployment starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command: Option<String>,
    /// The instance's place in its project's private network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<PrivateNetwork>,
}

/// A project's private network (one per environment), as one instance sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrivateNetwork {
    /// The prefix of the network, e.g. `100.96.3.0/24`.
    pub prefix: String,
    /// This instance's address in it.
    pub address: String,
    /// Every live instance of the network (on any node), this one included.
    pub members: Vec<NetworkMember>,
    /// Destinations outside the network this instance may reach; none: the internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// One instance of a private network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkMember {
    pub instance: String,
    pub address: String,
    /// Ready instances are the ones `<project>.internal` answers with.
    pub ready: bool,
}

/// A project's egress allow-list: when set, its instances reach only these
/// destinations (besides their private network and the node's resolver).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// IPv4 addresses or CIDR blocks, each optionally with a port:
    /// `203.0.113.0/24`, `198.51.100.7:443`, `192.0.2.0/28:5432`.
    pub allow: Vec<String>,
}

/// Who a token is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub token_id: String,
    pub name: String,
    pub scope: TokenScope,
    pub read_only: bool,
}

// ---------------------------------------------------------------- images

/// The registry name under which uploaded image archives are deployed:
/// `archive.zeitwork/<org>/<name>@sha256:…`. Node agents fetch them from the operator.
pub const ARCHIVE_REGISTRY: &str = "archive.zeitwork";

/// An uploaded image archive, ready to deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadedImage {
    /// The image reference to deploy.
    pub image: String,
    pub digest: String,
    /// Bytes of the config and layers.
    pub size: u64,
    pub layers: u32,
    /// Whether these bytes were already stored (an identical upload).
    pub existing: bool,
}

// ---------------------------------------------------------------- project views

/// A host a project is served at, and what serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectRoute {
    pub host: String,
    pub deployment: String,
    /// The environment the host follows; none for a deployment's own host.
    pub environment: Option<Environment>,
    /// Ready instances behind the host.
    pub instances: u32,
}

/// The health of the deployment serving one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentHealth {
    pub environment: Environment,
    pub deployment: String,
    pub status: DeploymentStatus,
    /// `healthy` when every instance is ready, `degraded` when some are, `down` when none are.
    pub health: String,
    pub ready: u32,
    pub total: u32,
    pub instances: Vec<Instance>,
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

// ---------------------------------------------------------------- edge proxies

/// What an edge proxy reports of itself (every few seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeRegistration {
    /// `IP:PORT` of its plain HTTP listener, as load balancers reach it.
    #[serde(default)]
    pub http_address: Option<String>,
    /// `IP:PORT` of its TLS listener.
    #[serde(default)]
    pub https_address: Option<String>,
}

/// A live edge proxy, as load balancers read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EdgeInfo {
    pub name: String,
    pub http_address: Option<String>,
    pub https_address: Option<String>,
    pub last_seen: DateTime<Utc>,
}
