//! The routing table and the edge proxies that follow it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
