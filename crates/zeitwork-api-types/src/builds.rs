//! Builds from source: build settings, requests, jobs for builders and their status.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

/// How a project's images are built from source (a `Dockerfile` in the repository or the uploaded directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSettings {
    /// Path of the Dockerfile inside the source (default `Dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The stage of a multi-stage Dockerfile to build (default: the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `--build-arg` values (not secret: they may end up in the image's history).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
}

/// A build from source, as asked for with a deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The digest of a source archive uploaded with `POST /api/v1/orgs/{org}/sources`.
    pub source: String,
    /// Overrides the project's Dockerfile path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Overrides the project's target stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Added to (and overriding) the project's build args.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// Secret values, given to the build as build secrets (`RUN --mount=type=secret,id=NAME`):
    /// stored encrypted, never written into the image or the build log.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

/// A stored source archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadedSource {
    /// `sha256:…` of the archive, to name in a deployment's `build.source`.
    pub source: String,
    pub size: u64,
    pub existing: bool,
}

/// Status of a build: `queued` (waiting for a builder), `running`, `succeeded`, `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Build {
    /// The deployment it builds the image of.
    pub deployment: String,
    pub org: String,
    pub project: String,
    pub status: String,
    /// The node building it.
    pub node: Option<String>,
    pub dockerfile: String,
    pub target: Option<String>,
    /// Names of the build args and secrets (values are not shown).
    pub args: Vec<String>,
    pub secrets: Vec<String>,
    /// Where the source came from: `upload sha256:…` or `git <url> <sha>`.
    pub source: String,
    /// The image it produced.
    pub image: Option<String>,
    pub error: Option<String>,
    /// Bytes of build output kept.
    pub log_bytes: u64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
}

/// Where a builder gets the source of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildSource {
    /// A gzip-compressed tar, fetched from `GET /api/v1/builds/{id}/source`.
    Upload { digest: String },
    /// A commit of a git repository, cloned over HTTP(S).
    Git {
        url: String,
        sha: String,
        /// `Authorization` header value for the clone, when the repository is private.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authorization: Option<String>,
    },
}

/// A build handed to a node's builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildJob {
    pub id: String,
    pub org: String,
    pub project: String,
    pub source: BuildSource,
    pub dockerfile: String,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
    /// Secret build values (plaintext, only to the builder that claimed the build).
    pub secrets: BTreeMap<String, String>,
    /// Build limits.
    pub timeout_secs: u64,
    pub memory_mib: u32,
    pub vcpu: u32,
    /// Disk the project's layer store and the build's work directory may hold.
    pub disk_mib: u64,
}

/// A builder's report that a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildFailure {
    pub error: String,
}
