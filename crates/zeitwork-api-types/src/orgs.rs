//! Organisations, their members and API tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
