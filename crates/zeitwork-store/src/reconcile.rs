//! What the deployment engine's pass reads, for every deployment at once:
//! a few set-based queries (rows grouped in SQL) instead of several queries
//! per deployment, so a pass over tens of thousands of deployments costs a
//! handful of round trips. The engine decides in memory and goes back to the
//! per-deployment reads only for the deployments that need an action.

use std::collections::HashMap;

use zeitwork_api_types::{Deployment, DeploymentStatus, InstanceStatus, Node, Project, Scaling};

use crate::deployments::deployment_from;
use crate::lifecycle::{wakefulness_from, Wakefulness};
use crate::nodes::{node_from, NODES_SELECT};
use crate::projects::{project_from, PROJECT_SELECT};
use crate::{ts, Dialect, Result, RowExt, Store, StoreError};

/// Instances of one deployment in one region with one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTally {
    pub deployment: String,
    pub region: String,
    pub status: InstanceStatus,
    pub count: u32,
}

/// What the engine's desired-count check needs of a running deployment and
/// of its project, and nothing more: read for every running deployment at
/// once, it keeps a full pass from reading and decoding whole rows.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningDeployment {
    pub id: String,
    pub status: DeploymentStatus,
    pub instances_per_region: u32,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub wakefulness: Wakefulness,
    /// Its project's placement settings; `None` when the project is gone.
    pub project: Option<RunningProject>,
}

/// The settings of a project that say how many instances its running deployments keep, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningProject {
    pub regions: Vec<String>,
    pub scaling: Option<Scaling>,
    pub sleep_after_secs: u32,
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

    /// The ids of the deployments of these projects (by id) with one of
    /// `statuses`, read through the index on the project.
    pub async fn deployments_of_projects(
        &self,
        project_ids: &[String],
        statuses: &[DeploymentStatus],
    ) -> Result<Vec<String>> {
        if project_ids.is_empty() {
            return Ok(Vec::new());
        }
        let params: Vec<String> = (1..=project_ids.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT id FROM deployments WHERE project_id IN ({}) AND status IN {} ORDER BY created_at DESC, id DESC",
            params.join(", "),
            status_list(statuses)
        );
        let mut query = sqlx::query(&sql);
        for id in project_ids {
            query = query.bind(id);
        }
        query.fetch_all(&self.reader).await?.iter().map(|r| r.text("id")).collect()
    }

    /// Every deployment in one of `statuses` with the few columns of it and
    /// of its project that decide how many instances it keeps where
    /// ([`RunningDeployment`]), in one query, newest first (whatever the status).
    pub async fn running_deployments(&self, statuses: &[DeploymentStatus]) -> Result<Vec<RunningDeployment>> {
        let rows = sqlx::query(&format!(
            "SELECT d.id, d.status, d.instances_per_region, d.updated_at, d.woken_at, d.wake_for, \
             d.last_request_at, d.scale_target, p.id AS project_id, p.regions, p.scaling, p.sleep_after_secs \
             FROM deployments d LEFT JOIN projects p ON p.id = d.project_id WHERE d.status IN {} \
             ORDER BY d.created_at DESC, d.id DESC",
            status_list(statuses)
        ))
        .fetch_all(&self.reader)
        .await?;
        // Projects share a handful of region lists: each is parsed once.
        let mut lists: HashMap<String, Vec<String>> = HashMap::new();
        rows.iter()
            .map(|r| {
                let project = match r.opt_text("project_id")? {
                    None => None,
                    Some(_) => {
                        let text = r.text("regions")?;
                        let regions = match lists.get(&text) {
                            Some(l) => l.clone(),
                            None => {
                                let l: Vec<String> = serde_json::from_str(&text)
                                    .map_err(|e| StoreError::Corrupt(format!("column regions: {e}")))?;
                                lists.insert(text, l.clone());
                                l
                            }
                        };
                        let scaling = match r.opt_text("scaling")? {
                            Some(s) => serde_json::from_str::<Option<Scaling>>(&s)
                                .map_err(|e| StoreError::Corrupt(format!("column scaling: {e}")))?,
                            None => None,
                        };
                        Some(RunningProject { regions, scaling, sleep_after_secs: r.int("sleep_after_secs")? as u32 })
                    }
                };
                Ok(RunningDeployment {
                    id: r.text("id")?,
                    status: r.parsed("status", DeploymentStatus::parse)?,
                    instances_per_region: r.int("instances_per_region")? as u32,
                    updated_at: ts(r.int("updated_at")?),
                    wakefulness: wakefulness_from(r)?,
                    project,
                })
            })
            .collect()
    }

    /// Instances of every deployment in one of `statuses`, counted per
    /// deployment, region and instance status (one grouped query, answered
    /// from the `(deployment_id, region, status)` index without reading rows).
    pub async fn instance_tallies(&self, statuses: &[DeploymentStatus]) -> Result<Vec<InstanceTally>> {
        let rows = sqlx::query(&format!(
            "SELECT i.deployment_id, i.region, i.status, COUNT(*) AS n FROM instances i \
             WHERE i.deployment_id IN (SELECT id FROM deployments WHERE status IN {}) \
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
    /// query over the nodes (the holds are kept per node, not summed over
    /// every instance).
    pub async fn nodes_for_placement(&self) -> Result<Vec<Node>> {
        let rows = sqlx::query(&format!("{NODES_SELECT} ORDER BY n.hostname")).fetch_all(&self.reader).await?;
        rows.iter().map(node_from).collect()
    }

    /// Folds the pending deltas of what nodes hold into the nodes' own
    /// columns, so readers sum a short table. Returns how many nodes it
    /// updated. Deltas written meanwhile stay pending for the next fold.
    pub async fn fold_node_holds(&self) -> Result<u64> {
        let folded = match self.dialect() {
            // One statement: the rows it deletes are exactly the rows it adds.
            Dialect::Postgres => {
                sqlx::query(
                    "WITH moved AS (DELETE FROM node_holds_pending RETURNING node_id, instances, vcpu, memory), \
                     sums AS (SELECT node_id, SUM(instances) AS instances, SUM(vcpu) AS vcpu, SUM(memory) AS memory \
                     FROM moved GROUP BY node_id) \
                     UPDATE nodes SET held_instances = held_instances + sums.instances, held_vcpu = held_vcpu + sums.vcpu, \
                     held_memory = held_memory + sums.memory FROM sums WHERE nodes.id = sums.node_id",
                )
                .execute(&self.writer)
                .await?
                .rows_affected()
            }
            // One writer at a time: nothing is added between the two statements.
            Dialect::Sqlite => {
                let mut tx = self.writer.begin().await?;
                let n = sqlx::query(
                    "UPDATE nodes SET \
                     held_instances = held_instances + (SELECT COALESCE(SUM(p.instances), 0) FROM node_holds_pending p WHERE p.node_id = nodes.id), \
                     held_vcpu = held_vcpu + (SELECT COALESCE(SUM(p.vcpu), 0) FROM node_holds_pending p WHERE p.node_id = nodes.id), \
                     held_memory = held_memory + (SELECT COALESCE(SUM(p.memory), 0) FROM node_holds_pending p WHERE p.node_id = nodes.id) \
                     WHERE id IN (SELECT node_id FROM node_holds_pending)",
                )
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query("DELETE FROM node_holds_pending").execute(&mut *tx).await?;
                tx.commit().await?;
                n
            }
        };
        Ok(folded)
    }
}
