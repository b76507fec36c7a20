//! What the deployment engine's pass reads, for every deployment at once:
//! a few set-based queries (rows grouped in SQL) instead of several queries
//! per deployment, so a pass over tens of thousands of deployments costs a
//! handful of round trips. The engine decides in memory and goes back to the
//! per-deployment reads only for the deployments that need an action.

use std::collections::HashMap;

use zeitwork_api_types::{Deployment, DeploymentStatus, InstanceStatus, Node, Project};

use crate::deployments::{deployment_from, LIVE_INSTANCE};
use crate::lifecycle::{wakefulness_from, Wakefulness};
use crate::nodes::node_from;
use crate::projects::{project_from, PROJECT_SELECT};
use crate::{Result, RowExt, Store};

/// Instances of one deployment in one region with one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTally {
    pub deployment: String,
    pub region: String,
    pub status: InstanceStatus,
    pub count: u32,
}

/// `IN (...)` of deployment statuses: literals of the closed set of names, never input.
fn status_list(statuses: &[DeploymentStatus]) -> String {
    let names: Vec<String> = statuses.iter().map(|s| format!("'{}'", s.as_str())).collect();
    if names.is_empty() {
        "(NULL)".to_owned()
    } else {
        format!("({})", names.join(", "))
    }
}

impl Store {
    /// Every deployment in one of `statuses` with what the engine knows of its
    /// wakefulness, in the order of `statuses`, newest first within each (as
    /// [`Store::list_deployments`] lists them).
    pub async fn deployments_in(&self, statuses: &[DeploymentStatus]) -> Result<Vec<(Deployment, Wakefulness)>> {
        let rows = sqlx::query(&format!(
            "SELECT * FROM deployments WHERE status IN {} ORDER BY created_at DESC, id DESC",
            status_list(statuses)
        ))
        .fetch_all(&self.reader)
        .await?;
        let mut out = rows
            .iter()
            .map(|r| Ok((deployment_from(r)?, wakefulness_from(r)?)))
            .collect::<Result<Vec<(Deployment, Wakefulness)>>>()?;
        // Stable: keeps newest first within a status.
        out.sort_by_key(|(d, _)| statuses.iter().position(|s| *s == d.status));
        Ok(out)
    }

    /// The projects of every deployment in one of `statuses`, by (org, name).
    pub async fn projects_of_deployments_in(
        &self,
        statuses: &[DeploymentStatus],
    ) -> Result<HashMap<(String, String), Project>> {
        let rows = sqlx::query(&format!(
            "{PROJECT_SELECT} AND p.id IN (SELECT project_id FROM deployments WHERE status IN {})",
            status_list(statuses)
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let p = project_from(r)?;
                Ok(((p.org.clone(), p.name.clone()), p))
            })
            .collect()
    }

    /// Instances of every deployment in one of `statuses`, counted per
    /// deployment, region and instance status (one grouped query).
    pub async fn instance_tallies(&self, statuses: &[DeploymentStatus]) -> Result<Vec<InstanceTally>> {
        let rows = sqlx::query(&format!(
            "SELECT i.deployment_id, i.region, i.status, COUNT(*) AS n FROM instances i \
             JOIN deployments d ON d.id = i.deployment_id WHERE d.status IN {} \
             GROUP BY i.deployment_id, i.region, i.status ORDER BY i.deployment_id, i.region, i.status",
            status_list(statuses)
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceTally {
                    deployment: r.text("deployment_id")?,
                    region: r.text("region")?,
                    status: r.parsed("status", InstanceStatus::parse)?,
                    count: r.int("n")? as u32,
                })
            })
            .collect()
    }

    /// Every node with what its live instances hold, by hostname, in one
    /// query (the allocations grouped once, not counted node by node).
    pub async fn nodes_for_placement(&self) -> Result<Vec<Node>> {
        let rows = sqlx::query(&format!(
            "SELECT n.id, n.hostname, n.region, n.address, n.status, n.vcpu, n.memory, \
             n.physical_vcpu, n.physical_memory, n.runtime, n.runtime_detail, n.last_heartbeat, n.created_at, \
             CAST(COALESCE(a.inst_count, 0) AS BIGINT) AS inst_count, \
             CAST(COALESCE(a.alloc_vcpu, 0) AS BIGINT) AS alloc_vcpu, \
             CAST(COALESCE(a.alloc_memory, 0) AS BIGINT) AS alloc_memory \
             FROM nodes n LEFT JOIN (SELECT node_id, COUNT(*) AS inst_count, SUM(vcpu) AS alloc_vcpu, \
             SUM(memory) AS alloc_memory FROM instances WHERE node_id IS NOT NULL AND {LIVE_INSTANCE} GROUP BY node_id) a \
             ON a.node_id = n.id ORDER BY n.hostname"
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(node_from).collect()
    }
}
