//! What node agents send and receive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

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
    /// The drains of the instance's organisation that take its app logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_drains: Vec<crate::AssignedLogDrain>,
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
    /// The other nodes that hold members of this network, each with the
    /// members' addresses it holds (its `AllowedIPs`): the node sends them
    /// through the tunnel and accepts from that node only those addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnel_peers: Vec<TunnelPeer>,
}

/// Another node's end of the tunnel, as one private network needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TunnelPeer {
    pub node: String,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Its UDP endpoint, `IPv4:port`.
    pub endpoint: String,
    /// Private addresses of this network's members on that node (`a.b.c.d/32`).
    pub allowed_ips: Vec<String>,
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
    /// IPv4 addresses, CIDR blocks or host names, each optionally with a port:
    /// `203.0.113.0/24`, `198.51.100.7:443`, `192.0.2.0/28:5432`, `api.example.com:443`.
    /// A host name's addresses are resolved by the node and followed as they change.
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
