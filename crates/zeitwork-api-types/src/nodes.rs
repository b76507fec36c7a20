//! Regions and the nodes in them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
    /// Where other nodes reach this node's end of the private networks' tunnel;
    /// without it the node's instances reach only the members on their own node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<NodeTunnel>,
}

/// A node's end of the tunnel that carries private project networks between
/// nodes (WireGuard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeTunnel {
    /// The node's WireGuard public key (base64 of 32 bytes, as `wg pubkey` prints it).
    pub public_key: String,
    /// `IPv4:port` other nodes send the tunnel's UDP to, e.g. `10.0.0.5:51820`.
    pub endpoint: String,
}
