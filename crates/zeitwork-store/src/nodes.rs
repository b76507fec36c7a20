//! Nodes: registration, heartbeats, the instances placed on each, nodes
//! marked down when they miss heartbeats, and draining.

use sqlx::any::AnyRow;
use zeitwork_api_types::{Capacity, Node, NodeStatus, NodeTunnel, RegisterNode, Resources};

use crate::deployments::{instance_from, LIVE_INSTANCE};
use crate::events::append_event;
use crate::{
    is_unique_violation, nanoid, now_ms, ts, Arg, Audit, Listing, Page, Result, RowExt, Sql, Store, StoreError,
};

/// A node with what its live instances hold: the totals kept on the node
/// plus its deltas not yet folded into them (see [`Store::fold_node_holds`]),
/// found through the deltas' index by node.
const NODE_SELECT: &str = "SELECT n.id, n.hostname, n.region, n.address, n.status, n.vcpu, n.memory, \
    n.physical_vcpu, n.physical_memory, n.runtime, n.runtime_detail, n.last_heartbeat, n.created_at, \
    n.held_instances + (SELECT CAST(COALESCE(SUM(p.instances), 0) AS BIGINT) FROM node_holds_pending p WHERE p.node_id = n.id) AS inst_count, \
    n.held_vcpu + (SELECT CAST(COALESCE(SUM(p.vcpu), 0) AS BIGINT) FROM node_holds_pending p WHERE p.node_id = n.id) AS alloc_vcpu, \
    n.held_memory + (SELECT CAST(COALESCE(SUM(p.memory), 0) AS BIGINT) FROM node_holds_pending p WHERE p.node_id = n.id) AS alloc_memory \
    FROM nodes n WHERE 1 = 1";

/// [`NODE_SELECT`] for every node at once: the deltas summed in one pass.
pub(crate) const NODES_SELECT: &str = "SELECT n.id, n.hostname, n.region, n.address, n.status, n.vcpu, n.memory, \
    n.physical_vcpu, n.physical_memory, n.runtime, n.runtime_detail, n.last_heartbeat, n.created_at, \
    CAST(n.held_instances + COALESCE(p.instances, 0) AS BIGINT) AS inst_count, \
    CAST(n.held_vcpu + COALESCE(p.vcpu, 0) AS BIGINT) AS alloc_vcpu, \
    CAST(n.held_memory + COALESCE(p.memory, 0) AS BIGINT) AS alloc_memory \
    FROM nodes n LEFT JOIN (SELECT node_id, SUM(instances) AS instances, SUM(vcpu) AS vcpu, SUM(memory) AS memory \
    FROM node_holds_pending GROUP BY node_id) p ON p.node_id = n.id";

pub(crate) fn node_from(row: &AnyRow) -> Result<Node> {
    Ok(Node {
        id: row.text("id")?,
        hostname: row.text("hostname")?,
        region: row.text("region")?,
        address: row.text("address")?,
        status: row.parsed("status", NodeStatus::parse)?,
        capacity: Capacity { vcpu: row.int("vcpu")? as u32, memory: row.int("memory")? as u32 },
        physical: match (row.opt_int("physical_vcpu")?, row.opt_int("physical_memory")?) {
            (Some(vcpu), Some(memory)) => Some(Capacity { vcpu: vcpu as u32, memory: memory as u32 }),
            _ => None,
        },
        allocated: Capacity { vcpu: row.int("alloc_vcpu")? as u32, memory: row.int("alloc_memory")? as u32 },
        instances: row.int("inst_count")? as u64,
        runtime: row.text("runtime")?,
        runtime_detail: row.opt_text("runtime_detail")?,
        last_heartbeat: row.opt_int("last_heartbeat")?.map(ts),
        created_at: ts(row.int("created_at")?),
        credential: None,
    })
}

impl Store {
    /// Registers a node, or updates the one with the same hostname.
    /// Returns the node and whether it was new.
    pub async fn register_node(&self, r: &RegisterNode, audit: &Audit) -> Result<(Node, bool)> {
        self.register_node_as(r, audit, NodeStatus::Ready).await
    }

    /// [`Store::register_node`] with the status a new node starts in: `ready`, or
    /// `pending_approval` when an admin must approve nodes first. A known node keeps its status.
    pub async fn register_node_as(&self, r: &RegisterNode, audit: &Audit, initial: NodeStatus) -> Result<(Node, bool)> {
        let runtime = r.runtime.clone().unwrap_or_else(|| "container".to_owned());
        let mut tx = self.writer.begin().await?;
        let region =
            sqlx::query("SELECT code FROM regions WHERE code = $1").bind(&r.region).fetch_optional(&mut *tx).await?;
        if region.is_none() {
            return Err(StoreError::Invalid {
                field: "region".into(),
                message: format!("region {:?} does not exist; create it first (POST /api/v1/regions)", r.region),
            });
        }
        let existing = sqlx::query(&format!("SELECT id FROM nodes WHERE hostname = $1{}", self.for_update()))
            .bind(&r.hostname)
            .fetch_optional(&mut *tx)
            .await?;
        let now = now_ms();
        let (id, created) = match existing {
            Some(row) => {
                let id = row.text("id")?;
                sqlx::query(
                    "UPDATE nodes SET region = $1, address = $2, vcpu = $3, memory = $4, runtime = $5, \
                     last_heartbeat = $6, status = CASE WHEN status = 'down' THEN 'ready' ELSE status END, \
                     runtime_detail = $8, physical_vcpu = $9, physical_memory = $10 WHERE id = $7",
                )
                .bind(&r.region)
                .bind(&r.address)
                .bind(i64::from(r.capacity.vcpu))
                .bind(i64::from(r.capacity.memory))
                .bind(&runtime)
                .bind(now)
                .bind(&id)
                .bind(&r.runtime_detail)
                .bind(r.physical.map(|p| i64::from(p.vcpu)))
                .bind(r.physical.map(|p| i64::from(p.memory)))
                .execute(&mut *tx)
                .await?;
                (id, false)
            }
            None => {
                let id = format!("node_{}", nanoid(12));
                let res = sqlx::query(
                    "INSERT INTO nodes (id, hostname, region, address, status, vcpu, memory, runtime, last_heartbeat, created_at, \
                     runtime_detail, physical_vcpu, physical_memory) \
                     VALUES ($1, $2, $3, $4, $13, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&id)
                .bind(&r.hostname)
                .bind(&r.region)
                .bind(&r.address)
                .bind(i64::from(r.capacity.vcpu))
                .bind(i64::from(r.capacity.memory))
                .bind(&runtime)
                .bind(now)
                .bind(now)
                .bind(&r.runtime_detail)
                .bind(r.physical.map(|p| i64::from(p.vcpu)))
                .bind(r.physical.map(|p| i64::from(p.memory)))
                .bind(initial.as_str())
                .execute(&mut *tx)
                .await;
                match res {
                    Err(e) if is_unique_violation(&e) => {
                        // Another registration of this hostname won the race; it is the same node.
                        drop(tx);
                        let node = self.get_node_by_hostname(&r.hostname).await?;
                        return Ok((node, false));
                    }
                    r => r?,
                };
                (id, true)
            }
        };
        // Every registration says where its tunnel is now (a node without one clears it).
        sqlx::query("UPDATE nodes SET tunnel_public_key = $1, tunnel_endpoint = $2 WHERE id = $3")
            .bind(r.tunnel.as_ref().map(|t| t.public_key.clone()))
            .bind(r.tunnel.as_ref().map(|t| t.endpoint.clone()))
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let mut audit = audit.clone();
        audit.target = r.hostname.clone();
        audit.action = if created { "node.register" } else { "node.update" }.into();
        append_event(&mut tx, &audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Nodes(vec![id.clone()])).await?;
        Ok((self.get_node(&id).await?, created))
    }

    pub async fn list_nodes(&self, page: &Page) -> Result<Listing<Node>> {
        self.keyset_page(Sql::new(NODE_SELECT), "n.hostname", page, node_from, |n| n.hostname.clone()).await
    }

    /// The ready nodes of a region, by hostname.
    pub async fn ready_nodes_in(&self, region: &str) -> Result<Vec<Node>> {
        let mut q = Sql::new(NODE_SELECT);
        q.and("n.region = ?", Arg::Text(region.to_owned()));
        q.and("n.status = ?", Arg::Text("ready".into()));
        q.push(" ORDER BY n.hostname");
        q.query().fetch_all(&self.reader).await?.iter().map(node_from).collect()
    }

    pub async fn get_node(&self, id: &str) -> Result<Node> {
        let mut q = Sql::new(NODE_SELECT);
        q.and("n.id = ?", Arg::Text(id.to_owned()));
        let row = q
            .query()
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist")))?;
        node_from(&row)
    }

    /// The tunnel ends of `nodes`, by id (a node without one, or gone, is absent).
    pub async fn node_tunnels(&self, nodes: &[String]) -> Result<std::collections::HashMap<String, NodeTunnel>> {
        let mut out = std::collections::HashMap::new();
        let sql = |p: &str| format!("SELECT id, tunnel_public_key, tunnel_endpoint FROM nodes WHERE id IN ({p})");
        crate::for_each_chunk(&self.reader, nodes, sql, |r| {
            if let (Some(public_key), Some(endpoint)) =
                (r.opt_text("tunnel_public_key")?, r.opt_text("tunnel_endpoint")?)
            {
                out.insert(r.text("id")?, NodeTunnel { public_key, endpoint });
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    async fn get_node_by_hostname(&self, hostname: &str) -> Result<Node> {
        let mut q = Sql::new(NODE_SELECT);
        q.and("n.hostname = ?", Arg::Text(hostname.to_owned()));
        let row = q
            .query()
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {hostname:?} does not exist")))?;
        node_from(&row)
    }

    /// Records a heartbeat; a node marked down comes back as ready.
    pub async fn node_heartbeat(&self, id: &str) -> Result<Node> {
        let now = now_ms();
        let done = sqlx::query("UPDATE nodes SET last_heartbeat = $1 WHERE id = $2 AND status <> 'down'")
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            // Back from down: ready again, and told like its going down was.
            let mut tx = self.writer.begin().await?;
            let row = sqlx::query(
                "UPDATE nodes SET last_heartbeat = $1, status = 'ready' WHERE id = $2 AND status = 'down' \
                 RETURNING hostname, region",
            )
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist; register it again")))?;
            let hostname = row.text("hostname")?;
            tracing::info!(node = %hostname, "node heartbeats again; ready");
            let audit = Audit::new("system", "node.up", id)
                .detail(serde_json::json!({"hostname": hostname, "region": row.text("region")?}));
            append_event(&mut tx, &audit, "ok").await?;
            self.commit_announcing(tx, crate::Change::Nodes(vec![id.to_owned()])).await?;
        }
        self.get_node(id).await
    }

    /// Marks a node draining (or drained at once when it holds no instances).
    pub async fn drain_node(&self, id: &str, audit: &Audit) -> Result<Node> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT hostname, region FROM nodes WHERE id = $1{}", self.for_update()))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist")))?;
        let named = serde_json::json!({"hostname": row.text("hostname")?, "region": row.text("region")?});
        let live: i64 =
            sqlx::query(&format!("SELECT COUNT(*) AS c FROM instances WHERE node_id = $1 AND {LIVE_INSTANCE}"))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .int("c")?;
        let status = if live == 0 { NodeStatus::Drained } else { NodeStatus::Draining };
        sqlx::query("UPDATE nodes SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // Told like node.down: the node's id as the target, its name and region in the detail.
        append_event(&mut tx, &audit.clone().detail(named.clone()), "ok").await?;
        if status == NodeStatus::Drained {
            // Nothing to wait for: drained at once, and told so, as when the last instance leaves.
            append_event(&mut tx, &Audit::new("system", "node.drained", id).detail(named), "ok").await?;
        }
        self.commit_announcing(tx, crate::Change::Nodes(vec![id.to_owned()])).await?;
        self.get_node(id).await
    }

    /// An admin's verdict on a node waiting for approval: `ready` (it gets placements
    /// from now on) or `rejected` (its credentials are revoked at once). Approving a
    /// rejected node lets it in after all; anything else is a conflict.
    pub async fn decide_node(&self, id: &str, approve: bool, audit: &Audit) -> Result<Node> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT hostname, status FROM nodes WHERE id = $1{}", self.for_update()))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist")))?;
        let status = row.parsed("status", NodeStatus::parse)?;
        let allowed = match approve {
            true => matches!(status, NodeStatus::PendingApproval | NodeStatus::Rejected),
            false => status == NodeStatus::PendingApproval,
        };
        if !allowed {
            return Err(StoreError::Conflict(format!(
                "node {id:?} is {}; only a node waiting for approval can be {}",
                status.as_str(),
                if approve { "approved" } else { "rejected (drain and delete a running one)" }
            )));
        }
        let to = if approve { NodeStatus::Ready } else { NodeStatus::Rejected };
        sqlx::query("UPDATE nodes SET status = $1 WHERE id = $2").bind(to.as_str()).bind(id).execute(&mut *tx).await?;
        if !approve {
            sqlx::query("DELETE FROM tokens WHERE node_id = $1").bind(id).execute(&mut *tx).await?;
        }
        let mut audit = audit.clone();
        audit.target = row.text("hostname")?;
        append_event(&mut tx, &audit, "ok").await?;
        let change = crate::Change::Nodes(vec![id.to_owned()]);
        if approve {
            self.commit_announcing(tx, change).await?;
        } else {
            self.commit_forgetting_tokens(tx, change).await?;
        }
        self.get_node(id).await
    }

    pub async fn delete_node(&self, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT hostname FROM nodes WHERE id = $1{}", self.for_update()))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist")))?;
        let live: i64 =
            sqlx::query(&format!("SELECT COUNT(*) AS c FROM instances WHERE node_id = $1 AND {LIVE_INSTANCE}"))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .int("c")?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "node {id:?} still runs {live} instance(s); drain it first (POST /api/v1/nodes/{id}/drain) and wait until it has none"
            )));
        }
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(id).execute(&mut *tx).await?;
        // Its credential goes with it.
        sqlx::query("DELETE FROM tokens WHERE node_id = $1").bind(id).execute(&mut *tx).await?;
        let mut audit = audit.clone();
        audit.target = row.text("hostname")?;
        append_event(&mut tx, &audit, "ok").await?;
        self.commit_forgetting_tokens(tx, crate::Change::Nodes(vec![id.to_owned()])).await
    }

    /// [`Store::commit_announcing`] for a transaction that deleted tokens:
    /// committed through the token cache, which forgets what it held.
    async fn commit_forgetting_tokens(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        change: crate::Change,
    ) -> Result<()> {
        self.notify_in(&mut tx, &change).await?;
        self.tokens.commit(tx).await?;
        self.announce_here(change);
        Ok(())
    }
}

/// An instance placed on a node, with what is needed to run it (env still encrypted).
#[derive(Debug, Clone)]
pub struct NodeAssignment {
    pub instance: String,
    pub deployment: String,
    pub project_id: String,
    pub org: String,
    pub project: String,
    pub environment: String,
    /// The project's egress allow-list as stored (JSON), when it has one.
    pub egress: Option<String>,
    pub image: String,
    pub port: u16,
    pub resources: Resources,
    pub status: zeitwork_api_types::InstanceStatus,
    /// The deployment's release command, on the one instance that runs it.
    pub release_command: Option<String>,
}

impl Store {
    /// Live instances placed on `node` whose deployment still runs.
    ///
    /// A starting deployment with a release command runs it on its first
    /// instance only, before that instance's app starts; its other instances
    /// are handed out once the first is ready, so no new version runs against
    /// data the release has not migrated yet.
    pub async fn node_assignments(&self, node: &str) -> Result<Vec<NodeAssignment>> {
        use zeitwork_api_types::InstanceStatus;
        let rows = sqlx::query(
            "SELECT i.id, i.deployment_id, i.vcpu, i.memory, i.status, d.project_id, d.org, d.project, d.environment, p.egress, d.image, p.port, \
             d.status AS deployment_status, d.release_command \
             FROM instances i JOIN deployments d ON d.id = i.deployment_id JOIN projects p ON p.id = d.project_id \
             WHERE i.node_id = $1 AND i.status NOT IN ('stopped', 'failed', 'exited') AND d.status NOT IN ('retired', 'failed') \
             ORDER BY i.id",
        )
        .bind(node)
        .fetch_all(&self.reader)
        .await?;
        // The first instance (and its status) of each starting deployment with a
        // release command: the one that runs it. Rare, so read apart.
        let mut gated = Vec::new();
        for r in &rows {
            let command = r.opt_text("release_command")?.filter(|c| !c.trim().is_empty());
            if command.is_some() && matches!(r.text("deployment_status")?.as_str(), "preparing" | "starting") {
                gated.push(r.text("deployment_id")?);
            }
        }
        gated.sort();
        gated.dedup();
        let mut first: std::collections::HashMap<String, (String, String)> = std::collections::HashMap::new();
        let sql = |p: &str| {
            format!("SELECT deployment_id, id, status FROM instances WHERE deployment_id IN ({p}) ORDER BY created_at DESC, id DESC")
        };
        // Newest first: the last one written for a deployment is its first instance.
        crate::for_each_chunk(&self.reader, &gated, sql, |r| {
            first.insert(r.text("deployment_id")?, (r.text("id")?, r.text("status")?));
            Ok(())
        })
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let id = r.text("id")?;
            let deployment = r.text("deployment_id")?;
            let mut release_command = None;
            if let Some((first_id, first_status)) = first.get(&deployment) {
                if *first_id == id {
                    release_command = r.opt_text("release_command")?;
                } else if first_status != "ready" {
                    continue;
                }
            }
            out.push(NodeAssignment {
                instance: id,
                deployment,
                project_id: r.text("project_id")?,
                org: r.text("org")?,
                project: r.text("project")?,
                environment: r.text("environment")?,
                egress: r.opt_text("egress")?,
                image: r.text("image")?,
                port: r.int("port")? as u16,
                resources: Resources { vcpu: r.int("vcpu")? as u32, memory: r.int("memory")? as u32 },
                status: r.parsed("status", InstanceStatus::parse)?,
                release_command,
            });
        }
        Ok(out)
    }
}

impl Store {
    /// Marks nodes whose last heartbeat is older than `cutoff_ms` as down;
    /// returns their ids.
    pub async fn mark_down_nodes(&self, cutoff_ms: i64) -> Result<Vec<String>> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(
            "UPDATE nodes SET status = 'down' WHERE status IN ('ready', 'draining', 'drained') \
             AND (last_heartbeat IS NULL OR last_heartbeat < $1) RETURNING id, hostname, region, last_heartbeat",
        )
        .bind(cutoff_ms)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let hostname = r.text("hostname")?;
            tracing::warn!(node = %hostname, "node missed its heartbeats; marked down");
            let last = r.opt_int("last_heartbeat")?.map(|ms| ts(ms).to_rfc3339());
            let audit = Audit::new("system", "node.down", &r.text("id")?).detail(serde_json::json!({
                "hostname": hostname, "region": r.text("region")?, "last_heartbeat": last,
            }));
            append_event(&mut tx, &audit, "ok").await?;
        }
        let ids = rows.iter().map(|r| r.text("id")).collect::<Result<Vec<_>>>()?;
        // An empty list of nodes would say "some nodes": none is announced instead.
        let changed = if ids.is_empty() { vec![] } else { vec![crate::Change::Nodes(ids.clone())] };
        self.commit_announcing_all(tx, changed).await?;
        Ok(ids)
    }

    /// Live instances on nodes that are down (to be replaced).
    pub async fn instances_on_down_nodes(&self) -> Result<Vec<zeitwork_api_types::Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT i.* FROM instances i JOIN nodes n ON n.id = i.node_id WHERE n.status = 'down' AND i.{LIVE_INSTANCE}"
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(instance_from).collect()
    }
}

/// A live instance on a draining node, with how far its move has come.
#[derive(Debug, Clone)]
pub struct DrainingInstance {
    pub instance: zeitwork_api_types::Instance,
    /// The instance started to take its place.
    pub replaced_by: Option<String>,
    /// When it may be stopped (set once its replacement is ready), ms since the epoch.
    pub stop_after: Option<i64>,
}

impl Store {
    /// Live instances on draining nodes.
    pub async fn instances_on_draining_nodes(&self) -> Result<Vec<DrainingInstance>> {
        let rows = sqlx::query(&format!(
            "SELECT i.* FROM instances i JOIN nodes n ON n.id = i.node_id \
             WHERE n.status = 'draining' AND i.{LIVE_INSTANCE} ORDER BY i.id"
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DrainingInstance {
                    instance: instance_from(r)?,
                    replaced_by: r.opt_text("replaced_by")?,
                    stop_after: r.opt_int("stop_after")?,
                })
            })
            .collect()
    }

    /// Links an instance to its replacement (or clears the link when `None`).
    pub async fn set_replacement(&self, id: &str, replacement: Option<&str>) -> Result<()> {
        let link = sqlx::query("UPDATE instances SET replaced_by = $1 WHERE id = $2 RETURNING deployment_id")
            .bind(replacement.map(str::to_owned))
            .bind(id);
        self.update_announcing(link, "deployment_id").await?;
        Ok(())
    }

    /// Takes a live instance out of traffic (`stopping`); it is stopped after `stop_after`.
    pub async fn begin_stopping(&self, id: &str, stop_after: i64) -> Result<bool> {
        let sql = format!(
            "UPDATE instances SET status = 'stopping', stop_after = $1 WHERE id = $2 AND {LIVE_INSTANCE} \
             RETURNING deployment_id"
        );
        Ok(self.update_announcing(sqlx::query(&sql).bind(stop_after).bind(id), "deployment_id").await? == 1)
    }

    /// Draining nodes with no live instance left become `drained`; returns their ids.
    pub async fn finish_drained_nodes(&self) -> Result<Vec<String>> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, hostname, region FROM nodes n WHERE status = 'draining' AND NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.node_id = n.id AND i.{LIVE_INSTANCE})"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = r.text("id")?;
            sqlx::query("UPDATE nodes SET status = 'drained' WHERE id = $1 AND status = 'draining'")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            let audit = Audit::new("system", "node.drained", &id)
                .detail(serde_json::json!({"hostname": r.text("hostname")?, "region": r.text("region")?}));
            append_event(&mut tx, &audit, "ok").await?;
            ids.push(id);
        }
        // An empty list of nodes would say "some nodes": none is announced instead.
        let changed = if ids.is_empty() { vec![] } else { vec![crate::Change::Nodes(ids.clone())] };
        self.commit_announcing_all(tx, changed).await?;
        Ok(ids)
    }
}

impl Store {
    /// The nodes whose assignments a change of `deployments`, `projects` or
    /// `nodes` may alter, as far as the store knows: those holding a live
    /// instance of the deployments, the nodes themselves, and those holding a
    /// live instance of a running deployment of the same projects or of a
    /// project live on the nodes (their private networks' member lists and
    /// tunnel peers change). A node whose instance just stopped is not among
    /// them: its watch knows it had the deployment.
    pub async fn nodes_concerned(
        &self,
        deployments: &[String],
        projects: &[String],
        nodes: &[String],
    ) -> Result<std::collections::BTreeSet<String>> {
        let mut projects: std::collections::BTreeSet<String> = projects.iter().cloned().collect();
        let on_nodes = |p: &str| {
            format!(
                "SELECT DISTINCT d.project_id FROM instances i JOIN deployments d ON d.id = i.deployment_id \
                 WHERE i.node_id IN ({p}) AND i.{LIVE_INSTANCE}"
            )
        };
        crate::for_each_chunk(&self.reader, nodes, on_nodes, |r| {
            projects.insert(r.text("project_id")?);
            Ok(())
        })
        .await?;
        let mut nodes: std::collections::BTreeSet<String> = nodes.iter().cloned().collect();
        let of_deployments = |p: &str| {
            format!(
                "SELECT DISTINCT node_id FROM instances WHERE deployment_id IN ({p}) AND node_id IS NOT NULL AND {LIVE_INSTANCE}"
            )
        };
        crate::for_each_chunk(&self.reader, deployments, of_deployments, |r| {
            nodes.insert(r.text("node_id")?);
            Ok(())
        })
        .await?;
        let their_projects = |p: &str| format!("SELECT DISTINCT project_id FROM deployments WHERE id IN ({p})");
        crate::for_each_chunk(&self.reader, deployments, their_projects, |r| {
            projects.insert(r.text("project_id")?);
            Ok(())
        })
        .await?;
        let projects: Vec<String> = projects.into_iter().collect();
        let live_of_projects = |p: &str| {
            format!(
                "SELECT DISTINCT i.node_id FROM instances i JOIN deployments d ON d.id = i.deployment_id \
                 WHERE d.project_id IN ({p}) AND d.status NOT IN ('retired', 'failed') AND i.node_id IS NOT NULL \
                 AND i.{LIVE_INSTANCE}"
            )
        };
        crate::for_each_chunk(&self.reader, &projects, live_of_projects, |r| {
            nodes.insert(r.text("node_id")?);
            Ok(())
        })
        .await?;
        Ok(nodes)
    }
}
