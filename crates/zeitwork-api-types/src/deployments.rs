//! Deployments, their instances and the images they run.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
