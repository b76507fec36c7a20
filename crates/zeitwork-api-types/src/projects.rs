//! Projects, their settings, environment variables and views.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
