//! Deployments and their instances: recording them, status changes, and
//! pointing environments at them.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use zeitwork_api_types::{Deployment, DeploymentStatus, Environment, Resources};

use crate::events::append_event;
use crate::projects::claim_host;
use crate::{
    in_list, is_unique_violation, limit_arg, nanoid, now_ms, paginate, ts, Arg, Audit, Listing, Page, Result, RowExt,
    Sql, Store, StoreError,
};

/// The key of a pull request's preview in a project's current deployments.
pub fn preview_slot(pull_request: u32) -> String {
    format!("preview-{pull_request}")
}

/// The address label of a pull request's preview: `<project>-pr-<n>-<org>`.
pub fn preview_label(project: &str, pull_request: u32, org: &str) -> String {
    format!("{project}-pr-{pull_request}-{org}")
}

/// Instance statuses that still hold resources on their node.
pub(crate) const LIVE_INSTANCE: &str = "status NOT IN ('stopped', 'failed', 'exited')";

/// Inserts a deployment row in `status` and reserves its host.
pub(crate) async fn insert_deployment(
    conn: &mut AnyConnection,
    d: &NewDeployment,
    status: DeploymentStatus,
) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO deployments (id, project_id, org, project, environment, image, commit_sha, commit_message, \
         instances_per_region, status, url, created_by, created_at, updated_at, pull_request, release_command, migration) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    )
    .bind(&d.id)
    .bind(&d.project_id)
    .bind(&d.org)
    .bind(&d.project)
    .bind(d.environment.as_str())
    .bind(&d.image)
    .bind(d.commit_sha.clone())
    .bind(d.commit_message.clone())
    .bind(i64::from(d.instances_per_region))
    .bind(status.as_str())
    .bind(&d.url)
    .bind(d.created_by.clone())
    .bind(now)
    .bind(now)
    .bind(d.pull_request.map(i64::from))
    .bind(d.release_command.clone().filter(|c| !c.trim().is_empty()))
    .bind(i64::from(d.migration))
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!("deployment id {:?} is taken; retry", d.id))
        } else {
            e.into()
        }
    })?;
    claim_host(conn, &d.id, &d.project_id, "deployment").await
}

/// A deployment to record, with its id and URL already chosen.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub id: String,
    pub project_id: String,
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub image: String,
    pub commit_sha: Option<String>,
    pub commit_message: Option<String>,
    pub instances_per_region: u32,
    pub url: String,
    pub created_by: Option<String>,
    /// The pull request of a preview.
    pub pull_request: Option<u32>,
    /// Run once before traffic moves to it (`None` or empty: nothing to run).
    pub release_command: Option<String>,
    /// It migrates data: rolling back past it needs `force`.
    pub migration: bool,
}

impl NewDeployment {
    /// A production deployment `id` of `project` running `image`, with the
    /// project's count of instances per region, at `http://<id>.zeitwork.localhost`,
    /// with no commit, author, pull request or release command.
    pub fn of(project: &zeitwork_api_types::Project, id: &str, image: &str) -> NewDeployment {
        NewDeployment {
            id: id.into(),
            project_id: project.id.clone(),
            org: project.org.clone(),
            project: project.name.clone(),
            environment: Environment::Production,
            image: image.into(),
            commit_sha: None,
            commit_message: None,
            instances_per_region: project.instances_per_region,
            url: format!("http://{id}.zeitwork.localhost"),
            created_by: None,
            pull_request: None,
            release_command: None,
            migration: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DeploymentFilter {
    pub org: Option<String>,
    /// Only these orgs (for tokens scoped to one org).
    pub orgs_visible: Option<Vec<String>>,
    pub project: Option<String>,
    pub status: Option<DeploymentStatus>,
    pub environment: Option<Environment>,
}

pub(crate) fn deployment_from(row: &AnyRow) -> Result<Deployment> {
    Ok(Deployment {
        id: row.text("id")?,
        org: row.text("org")?,
        project: row.text("project")?,
        environment: row.parsed("environment", Environment::parse)?,
        image: row.text("image")?,
        image_digest: row.opt_text("image_digest")?,
        commit_sha: row.opt_text("commit_sha")?,
        commit_message: row.opt_text("commit_message")?,
        instances_per_region: row.int("instances_per_region")? as u32,
        status: row.parsed("status", DeploymentStatus::parse)?,
        reason: row.opt_text("reason")?,
        url: row.text("url")?,
        created_by: row.opt_text("created_by")?,
        created_at: ts(row.int("created_at")?),
        updated_at: ts(row.int("updated_at")?),
        last_request_at: row.opt_int("last_request_at")?.map(ts),
        pull_request: row.opt_int("pull_request")?.map(|n| n as u32),
        build_ms: row.opt_int("build_ms")?.map(|n| n as u64),
        release_command: row.opt_text("release_command")?,
        migration: row.int("migration")? != 0,
    })
}

impl Store {
    pub async fn create_deployment(&self, d: &NewDeployment, audit: &Audit) -> Result<Deployment> {
        let mut tx = self.writer.begin().await?;
        insert_deployment(&mut tx, d, DeploymentStatus::Pending).await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![d.id.clone()])).await?;
        self.get_deployment(&d.id).await
    }

    pub async fn get_deployment(&self, id: &str) -> Result<Deployment> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment {id:?} does not exist")))?;
        deployment_from(&row)
    }

    pub async fn list_deployments(&self, f: &DeploymentFilter, page: &Page) -> Result<Listing<Deployment>> {
        let mut q = Sql::new("SELECT * FROM deployments WHERE 1 = 1");
        if let Some(v) = &f.org {
            q.and("org = ?", Arg::Text(v.clone()));
        }
        if let Some(orgs) = &f.orgs_visible {
            in_list(&mut q, "org", orgs);
        }
        if let Some(v) = &f.project {
            q.and("project = ?", Arg::Text(v.clone()));
        }
        if let Some(v) = f.status {
            q.and("status = ?", Arg::Text(v.as_str().to_owned()));
        }
        if let Some(v) = f.environment {
            q.and("environment = ?", Arg::Text(v.as_str().to_owned()));
        }
        if let Some(c) = &page.cursor {
            let (at, id) =
                c.split_once('_').and_then(|(a, i)| Some((a.parse::<i64>().ok()?, i.to_owned()))).ok_or_else(|| {
                    StoreError::Invalid { field: "cursor".into(), message: "not a cursor this list returned".into() }
                })?;
            let a1 = q.arg(Arg::Int(at));
            let a2 = q.arg(Arg::Int(at));
            let i = q.arg(Arg::Text(id));
            q.push(&format!(" AND (created_at < {a1} OR (created_at = {a2} AND id < {i}))"));
        }
        let l = q.arg(limit_arg(page));
        q.push(&format!(" ORDER BY created_at DESC, id DESC LIMIT {l}"));
        let rows = q.query().fetch_all(&self.reader).await?;
        let items = rows.iter().map(deployment_from).collect::<Result<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |d| format!("{}_{}", d.created_at.timestamp_millis(), d.id)))
    }
}

// ------------------------------------------------------------------ instances

/// An instance to record, placed on a node.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub deployment: String,
    pub node: Option<String>,
    pub region: String,
    pub resources: Resources,
    pub runtime: Option<String>,
}

pub(crate) fn instance_from(row: &AnyRow) -> Result<zeitwork_api_types::Instance> {
    use zeitwork_api_types::InstanceStatus;
    Ok(zeitwork_api_types::Instance {
        id: row.text("id")?,
        deployment: row.text("deployment_id")?,
        node: row.opt_text("node_id")?,
        region: row.text("region")?,
        address: row.opt_text("address")?,
        status: row.parsed("status", InstanceStatus::parse)?,
        runtime: row.opt_text("runtime")?,
        started_at: row.opt_int("started_at")?.map(ts),
        ready_at: row.opt_int("ready_at")?.map(ts),
        exit_code: row.opt_int("exit_code")?,
        exit_reason: row.opt_text("exit_reason")?,
        created_at: ts(row.int("created_at")?),
    })
}

/// The `served` column: environment names, comma-separated.
pub(crate) fn parse_served(s: Option<&str>) -> Vec<Environment> {
    s.unwrap_or_default().split(',').filter_map(Environment::parse).collect()
}

impl Store {
    pub async fn create_instance(&self, i: &NewInstance) -> Result<zeitwork_api_types::Instance> {
        let mut placed = self.place_instances(std::slice::from_ref(i), None).await?;
        placed.pop().ok_or_else(|| StoreError::NotFound("the instance just created".into()))
    }

    /// Creates `instances` in one transaction, with their private addresses
    /// in network `network` when given (so their nodes' first reads of their
    /// assignments write nothing), and announces their deployments once. A
    /// network with no free address is left to those reads (which then say why).
    pub async fn place_instances(
        &self,
        instances: &[NewInstance],
        mut network: Option<u32>,
    ) -> Result<Vec<zeitwork_api_types::Instance>> {
        for _ in 0..8 {
            let mut tx = self.writer.begin().await?;
            let mut ids = Vec::with_capacity(instances.len());
            for i in instances {
                let id = format!("ins_{}", nanoid(12));
                sqlx::query(
                    "INSERT INTO instances (id, deployment_id, node_id, region, status, runtime, vcpu, memory, created_at) \
                     VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8)",
                )
                .bind(&id)
                .bind(&i.deployment)
                .bind(i.node.clone())
                .bind(&i.region)
                .bind(i.runtime.clone())
                .bind(i64::from(i.resources.vcpu))
                .bind(i64::from(i.resources.memory))
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                ids.push(id);
            }
            if let Some(net) = network {
                let refs: Vec<&String> = ids.iter().collect();
                match crate::networks::allocate_hosts(&mut tx, net, &refs, crate::MAX_PRIVATE_HOST).await {
                    Ok(Some(_)) => {}
                    // Another operator took a number first: again.
                    Ok(None) => continue,
                    Err(StoreError::Conflict(why)) => {
                        tracing::warn!(%why, "placing instances without private addresses");
                        network = None;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut deployments: Vec<String> = instances.iter().map(|i| i.deployment.clone()).collect();
            deployments.sort();
            deployments.dedup();
            self.commit_announcing(tx, crate::Change::Deployments(deployments)).await?;
            let mut found = std::collections::HashMap::with_capacity(ids.len());
            crate::for_each_chunk(
                &self.reader,
                &ids,
                |p| format!("SELECT * FROM instances WHERE id IN ({p})"),
                |r| {
                    let i = instance_from(r)?;
                    found.insert(i.id.clone(), i);
                    Ok(())
                },
            )
            .await?;
            return ids
                .iter()
                .map(|id| {
                    found.remove(id).ok_or_else(|| StoreError::NotFound(format!("instance {id:?} does not exist")))
                })
                .collect();
        }
        Err(StoreError::Conflict("placing instances kept clashing over private addresses; try again".into()))
    }

    pub async fn get_instance(&self, id: &str) -> Result<zeitwork_api_types::Instance> {
        let row = sqlx::query("SELECT * FROM instances WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("instance {id:?} does not exist")))?;
        instance_from(&row)
    }

    pub async fn list_instances(&self, deployment: &str) -> Result<Vec<zeitwork_api_types::Instance>> {
        let rows = sqlx::query("SELECT * FROM instances WHERE deployment_id = $1 ORDER BY created_at, id")
            .bind(deployment)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(instance_from).collect()
    }

    /// Records what a node agent reports about an instance.
    pub async fn set_instance_status(
        &self,
        id: &str,
        status: zeitwork_api_types::InstanceStatus,
        address: Option<&str>,
        exit: Option<(Option<i64>, String)>,
    ) -> Result<()> {
        use zeitwork_api_types::InstanceStatus as S;
        let now = now_ms();
        let (code, reason) = match exit {
            Some((c, r)) => (c, Some(r)),
            None => (None, None),
        };
        let done = sqlx::query(
            "UPDATE instances SET status = $1, address = COALESCE($2, address), \
             started_at = CASE WHEN $3 = 1 AND started_at IS NULL THEN $4 ELSE started_at END, \
             ready_at = CASE WHEN $5 = 1 THEN $4 ELSE ready_at END, \
             exit_code = COALESCE($6, exit_code), exit_reason = COALESCE($7, exit_reason) WHERE id = $8 \
             RETURNING deployment_id",
        )
        .bind(status.as_str())
        .bind(address.map(str::to_owned))
        .bind(i64::from(matches!(status, S::Starting | S::Ready)))
        .bind(now)
        .bind(i64::from(status == S::Ready))
        .bind(code)
        .bind(reason)
        .bind(id);
        if self.update_announcing(done, "deployment_id").await? == 0 {
            return Err(StoreError::NotFound(format!("instance {id:?} does not exist")));
        }
        Ok(())
    }

    pub async fn set_deployment_status(&self, id: &str, status: DeploymentStatus, reason: Option<&str>) -> Result<()> {
        let done =
            sqlx::query("UPDATE deployments SET status = $1, reason = $2, updated_at = $3 WHERE id = $4 RETURNING id")
                .bind(status.as_str())
                .bind(reason.map(str::to_owned))
                .bind(now_ms())
                .bind(id);
        if self.update_announcing(done, "id").await? == 0 {
            return Err(StoreError::NotFound(format!("deployment {id:?} does not exist")));
        }
        Ok(())
    }

    /// Points an environment of a project at a deployment (it becomes `active`;
    /// the one it replaces becomes `standby`), in one transaction.
    pub async fn activate_deployment(&self, deployment: &str, audit: &Audit) -> Result<()> {
        let env = self.get_deployment(deployment).await?.environment;
        self.point_environment(deployment, env, audit).await
    }

    /// Points environment `env` of the deployment's project at it (active),
    /// and puts the deployment `env` served before into standby, in one
    /// transaction. Used for activation, rollback and promotion.
    pub async fn point_environment(&self, deployment: &str, env: Environment, audit: &Audit) -> Result<()> {
        let d = self.get_deployment(deployment).await?;
        let mut tx = self.writer.begin().await?;
        self.point_environment_in(&mut tx, &d, env).await?;
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Deployments(vec![deployment.to_owned()])).await?;
        Ok(())
    }

    /// `point_environment` inside a transaction the caller commits; returns
    /// the deployment that served `env` before, if another one did.
    pub(crate) async fn point_environment_in(
        &self,
        tx: &mut AnyConnection,
        d: &Deployment,
        env: Environment,
    ) -> Result<Option<String>> {
        let project_id = sqlx::query("SELECT project_id FROM deployments WHERE id = $1")
            .bind(&d.id)
            .fetch_one(&mut *tx)
            .await?
            .text("project_id")?;
        let row = sqlx::query(&format!("SELECT current_deployments FROM projects WHERE id = $1{}", self.for_update()))
            .bind(&project_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("project {}/{} does not exist", d.org, d.project)))?;
        let mut current: BTreeMap<String, String> = serde_json::from_str(&row.text("current_deployments")?)
            .map_err(|e| StoreError::Corrupt(format!("current_deployments: {e}")))?;
        let now = now_ms();
        // Each pull request's preview is a slot of its own.
        let slot = match (env, d.pull_request) {
            (Environment::Preview, Some(n)) => preview_slot(n),
            _ => env.as_str().to_owned(),
        };
        let mut replaced = None;
        if let Some(previous) = current.insert(slot, d.id.clone()) {
            // The one replaced goes to standby unless it still serves another environment.
            if previous != d.id && !current.values().any(|v| *v == previous) {
                sqlx::query(
                    "UPDATE deployments SET status = 'standby', updated_at = $1 WHERE id = $2 AND status = 'active'",
                )
                .bind(now)
                .bind(&previous)
                .execute(&mut *tx)
                .await?;
            }
            if previous != d.id {
                replaced = Some(previous);
            }
        }
        sqlx::query("UPDATE projects SET current_deployments = $1, updated_at = $2 WHERE id = $3")
            .bind(serde_json::to_string(&current).unwrap_or_default())
            .bind(now)
            .bind(&project_id)
            .execute(&mut *tx)
            .await?;
        // The environments a deployment served are kept: skew protection pins
        // clients of an environment only to deployments that served it.
        let served = sqlx::query("SELECT served FROM deployments WHERE id = $1")
            .bind(&d.id)
            .fetch_one(&mut *tx)
            .await?
            .opt_text("served")?;
        let mut served = parse_served(served.as_deref());
        if !served.contains(&env) {
            served.push(env);
        }
        sqlx::query(
            "UPDATE deployments SET status = 'active', reason = NULL, updated_at = $1, served = $3 WHERE id = $2",
        )
        .bind(now)
        .bind(&d.id)
        .bind(served.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(","))
        .execute(&mut *tx)
        .await?;
        Ok(replaced)
    }
}

impl Store {
    /// Moves a deployment from `from` to `to` only if it is still in `from`;
    /// returns whether this call did it (so two engines never both act).
    pub async fn claim_deployment(&self, id: &str, from: DeploymentStatus, to: DeploymentStatus) -> Result<bool> {
        let claim = sqlx::query(
            "UPDATE deployments SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4 RETURNING id",
        )
        .bind(to.as_str())
        .bind(now_ms())
        .bind(id)
        .bind(from.as_str());
        Ok(self.update_announcing(claim, "id").await? == 1)
    }

    /// Marks a live instance stopped with `reason`; returns whether this call did it.
    pub async fn retire_instance(&self, id: &str, reason: &str) -> Result<bool> {
        let sql = format!(
            "UPDATE instances SET status = 'stopped', exit_reason = $1 WHERE id = $2 AND {LIVE_INSTANCE} \
             RETURNING deployment_id"
        );
        Ok(self.update_announcing(sqlx::query(&sql).bind(reason).bind(id), "deployment_id").await? == 1)
    }
}

impl Store {
    /// Stops a deployment that serves no environment: it is retired and its
    /// instances stop. Stopping one already retired or failed changes nothing.
    pub async fn stop_deployment(&self, id: &str, audit: &Audit) -> Result<Deployment> {
        self.retire_deployment(id, &format!("stopped by {}", audit.actor), audit).await
    }
}

impl Store {
    /// The newest deployment that migrated data for `env` of `to`'s project
    /// and that pointing `env` from `from` back to `to` would go back past:
    /// one marked `migration` that has served `env` (or is `from` itself),
    /// created after `to` and no later than `from`. `None` when the move goes
    /// forward or crosses no migration. Manual rollbacks and promotions ask it
    /// before they switch; an automatic rollback must ask it too and, when it
    /// answers `Some`, not roll back.
    pub async fn rollback_crosses_migration(
        &self,
        from: &str,
        to: &str,
        env: Environment,
    ) -> Result<Option<Deployment>> {
        let (from, to) = (self.get_deployment(from).await?, self.get_deployment(to).await?);
        if (from.org.as_str(), from.project.as_str()) != (to.org.as_str(), to.project.as_str())
            || (to.created_at, to.id.as_str()) >= (from.created_at, from.id.as_str())
        {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT * FROM deployments WHERE org = $1 AND project = $2 AND migration <> 0 \
             AND created_at >= $3 AND created_at <= $4 ORDER BY created_at DESC, id DESC",
        )
        .bind(&to.org)
        .bind(&to.project)
        .bind(to.created_at.timestamp_millis())
        .bind(from.created_at.timestamp_millis())
        .fetch_all(&self.reader)
        .await?;
        for r in &rows {
            let m = deployment_from(r)?;
            let after_to = (m.created_at, m.id.as_str()) > (to.created_at, to.id.as_str());
            let up_to_from = (m.created_at, m.id.as_str()) <= (from.created_at, from.id.as_str());
            let served = parse_served(r.opt_text("served")?.as_deref()).contains(&env);
            if after_to && up_to_from && (served || m.id == from.id) {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }
}
