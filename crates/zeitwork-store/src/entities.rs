//! Queries per entity. Each public method is one transaction when it writes.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use zeitwork_api_types::{
    Capacity, ClusterRole, CreateRegion, Deployment, DeploymentStatus, Domain, Environment, Event, Member, Node,
    NodeStatus, Org, PatchProject, Project, RateLimit, Region, RegisterNode, Resources, Role, Token, TokenScope,
};

use crate::{
    is_fk_violation, is_unique_violation, nanoid, now_ms, paginate, ts, Arg, Audit, Listing, Page, Result, RowExt, Sql,
    Store, StoreError,
};

/// Reserves a host label under the apps domain (`<project>-<org>` or a
/// deployment id) so no two projects or deployments, of any organisations,
/// are ever served at one address.
pub(crate) async fn claim_host(conn: &mut AnyConnection, label: &str, project_id: &str, kind: &str) -> Result<()> {
    let res = sqlx::query("INSERT INTO hosts (label, project_id, kind) VALUES ($1, $2, $3)")
        .bind(label)
        .bind(project_id)
        .bind(kind)
        .execute(conn)
        .await;
    match res {
        Err(e) if is_unique_violation(&e) => {
            Err(StoreError::Conflict(format!("the address {label:?} is taken; retry")))
        }
        r => r.map(drop).map_err(Into::into),
    }
}

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
         instances_per_region, status, url, created_by, created_at, updated_at, pull_request) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
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

pub(crate) async fn append_event(conn: &mut AnyConnection, audit: &Audit, result: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (at, actor, action, target, org, project, result, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now_ms())
    .bind(&audit.actor)
    .bind(&audit.action)
    .bind(&audit.target)
    .bind(audit.org.clone())
    .bind(audit.project.clone())
    .bind(result)
    .bind(audit.detail.as_ref().map(|d| d.to_string()))
    .execute(&mut *conn)
    .await?;
    // What is worth telling goes to the outbox in the same transaction.
    crate::outbox::enqueue(conn, audit, result).await
}

// ------------------------------------------------------------------ regions

fn region_from(row: &AnyRow) -> Result<Region> {
    Ok(Region {
        id: row.text("id")?,
        code: row.text("code")?,
        name: row.text("name")?,
        country: row.text("country")?,
        created_at: ts(row.int("created_at")?),
    })
}

// ------------------------------------------------------------------ nodes

const NODE_SELECT: &str = "SELECT n.id, n.hostname, n.region, n.address, n.status, n.vcpu, n.memory, \
    n.physical_vcpu, n.physical_memory, n.runtime, n.runtime_detail, n.last_heartbeat, n.created_at, \
    (SELECT COUNT(*) FROM instances i WHERE i.node_id = n.id AND i.status NOT IN ('stopped', 'failed', 'exited')) AS inst_count, \
    (SELECT CAST(COALESCE(SUM(i.vcpu), 0) AS BIGINT) FROM instances i WHERE i.node_id = n.id AND i.status NOT IN ('stopped', 'failed', 'exited')) AS alloc_vcpu, \
    (SELECT CAST(COALESCE(SUM(i.memory), 0) AS BIGINT) FROM instances i WHERE i.node_id = n.id AND i.status NOT IN ('stopped', 'failed', 'exited')) AS alloc_memory \
    FROM nodes n WHERE 1 = 1";

fn node_from(row: &AnyRow) -> Result<Node> {
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

// ------------------------------------------------------------------ orgs

fn org_from(row: &AnyRow) -> Result<Org> {
    Ok(Org {
        id: row.text("id")?,
        slug: row.text("slug")?,
        name: row.text("name")?,
        created_at: ts(row.int("created_at")?),
    })
}

fn member_from(row: &AnyRow) -> Result<Member> {
    Ok(Member {
        org: row.text("slug")?,
        user: row.text("user_name")?,
        role: row.parsed("role", Role::parse)?,
        created_at: ts(row.int("created_at")?),
    })
}

// ------------------------------------------------------------------ projects

/// A project to create, with every default already resolved.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub org: String,
    pub name: String,
    pub github_repo: Option<String>,
    pub branch: String,
    pub auto_deploy: bool,
    pub port: u16,
    pub resources: Resources,
    pub instances_per_region: u32,
    /// `None`: every region known at creation time.
    pub regions: Option<Vec<String>>,
    pub image_template: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub sleep_after_secs: u32,
    pub retain_deployments: u32,
    pub scaling: Option<zeitwork_api_types::Scaling>,
    pub staging_branch: Option<String>,
    pub tag_pattern: Option<String>,
    pub build: zeitwork_api_types::BuildSettings,
}

const PROJECT_SELECT: &str = "SELECT p.id, o.slug AS org_slug, p.name, p.github_repo, p.branch, p.auto_deploy, \
    p.port, p.vcpu, p.memory, p.instances_per_region, p.regions, p.image_template, p.rate_limit, \
    p.sleep_after_secs, p.retain_deployments, p.scaling, p.staging_branch, p.tag_pattern, p.build, p.current_deployments, p.created_at, p.updated_at FROM projects p JOIN orgs o ON o.id = p.org_id WHERE 1 = 1";

fn project_from(row: &AnyRow) -> Result<Project> {
    let json = |col: &str| -> Result<Option<serde_json::Value>> {
        row.opt_text(col)?
            .map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}"))))
            .transpose()
    };
    let from_json = |col: &str| -> Result<Option<serde_json::Value>> { json(col) };
    let regions: Vec<String> = from_json("regions")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("column regions: {e}")))?
        .unwrap_or_default();
    let rate_limit: Option<RateLimit> = from_json("rate_limit")?
        .filter(|v| !v.is_null())
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("column rate_limit: {e}")))?;
    let current: BTreeMap<String, String> = from_json("current_deployments")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("column current_deployments: {e}")))?
        .unwrap_or_default();
    Ok(Project {
        id: row.text("id")?,
        org: row.text("org_slug")?,
        name: row.text("name")?,
        github_repo: row.opt_text("github_repo")?,
        branch: row.text("branch")?,
        auto_deploy: row.int("auto_deploy")? != 0,
        port: row.int("port")? as u16,
        resources: Resources { vcpu: row.int("vcpu")? as u32, memory: row.int("memory")? as u32 },
        instances_per_region: row.int("instances_per_region")? as u32,
        regions,
        image_template: row.opt_text("image_template")?,
        rate_limit,
        sleep_after_secs: row.int("sleep_after_secs")? as u32,
        scaling: from_json("scaling")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column scaling: {e}")))?,
        retain_deployments: row.int("retain_deployments")? as u32,
        staging_branch: row.opt_text("staging_branch")?,
        tag_pattern: row.opt_text("tag_pattern")?,
        build: from_json("build")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column build: {e}")))?
            .unwrap_or_default(),
        current_deployment: current,
        created_at: ts(row.int("created_at")?),
        updated_at: ts(row.int("updated_at")?),
    })
}

/// An environment variable as stored: the value is ciphertext.
#[derive(Debug, Clone)]
pub struct StoredEnvVar {
    pub key: String,
    pub value_enc: String,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

// ------------------------------------------------------------------ domains

fn domain_from(row: &AnyRow) -> Result<Domain> {
    Ok(Domain {
        name: row.text("name")?,
        org: row.text("org_slug")?,
        project: row.text("project_name")?,
        environment: row.parsed("environment", Environment::parse)?,
        verified: row.int("verified")? != 0,
        certificate: row.text("certificate")?,
        created_at: ts(row.int("created_at")?),
    })
}

// ------------------------------------------------------------------ deployments

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
    })
}

// ------------------------------------------------------------------ events

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub org: Option<String>,
    pub orgs_visible: Option<Vec<String>>,
    pub project: Option<String>,
    pub action: Option<String>,
    pub result: Option<String>,
}

fn event_from(row: &AnyRow) -> Result<Event> {
    Ok(Event {
        id: row.int("id")?,
        at: ts(row.int("at")?),
        actor: row.text("actor")?,
        action: row.text("action")?,
        target: row.text("target")?,
        org: row.opt_text("org")?,
        project: row.opt_text("project")?,
        result: row.text("result")?,
        detail: row.opt_text("detail")?.and_then(|d| serde_json::from_str(&d).ok()),
    })
}

// ------------------------------------------------------------------ tokens

/// A token as stored: its public part and the SHA-256 of its secret.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub token: Token,
    pub secret_hash: String,
}

fn token_from(row: &AnyRow) -> Result<StoredToken> {
    let kind = row.text("scope_kind")?;
    let scope = match kind.as_str() {
        "admin" => TokenScope::Admin,
        "org" => TokenScope::Org {
            org: row.opt_text("scope_org")?.ok_or_else(|| StoreError::Corrupt("token without org".into()))?,
            role: row.parsed("scope_role", Role::parse)?,
        },
        "cluster" => TokenScope::Cluster { role: row.parsed("scope_role", ClusterRole::parse)? },
        other => return Err(StoreError::Corrupt(format!("token scope {other:?}"))),
    };
    Ok(StoredToken {
        token: Token {
            id: row.text("id")?,
            name: row.text("name")?,
            scope,
            read_only: row.int("read_only")? != 0,
            created_by: row.opt_text("created_by")?,
            created_at: ts(row.int("created_at")?),
            expires_at: row.opt_int("expires_at")?.map(ts),
            node: row.opt_text("node_id")?,
        },
        secret_hash: row.text("secret_hash")?,
    })
}

fn scope_columns(scope: &TokenScope) -> (&'static str, Option<String>, Option<String>) {
    match scope {
        TokenScope::Admin => ("admin", None, None),
        TokenScope::Org { org, role } => ("org", Some(org.clone()), Some(role.as_str().to_owned())),
        TokenScope::Cluster { role } => ("cluster", None, Some(role.as_str().to_owned())),
    }
}

fn limit_arg(page: &Page) -> Arg {
    Arg::Int(i64::from(page.limit) + 1)
}

impl Store {
    /// Runs `q` as one keyset page ordered by `key` (ascending), after the
    /// page's cursor.
    async fn keyset_page<T>(
        &self,
        mut q: Sql,
        key: &str,
        page: &Page,
        from: fn(&AnyRow) -> Result<T>,
        cursor_of: impl Fn(&T) -> String,
    ) -> Result<Listing<T>> {
        if let Some(c) = &page.cursor {
            q.and(&format!("{key} > ?"), Arg::Text(c.clone()));
        }
        let l = q.arg(limit_arg(page));
        q.push(&format!(" ORDER BY {key} LIMIT {l}"));
        let rows = q.query().fetch_all(&self.reader).await?;
        let items = rows.iter().map(from).collect::<Result<Vec<_>>>()?;
        Ok(paginate(items, page.limit, cursor_of))
    }
}

impl Store {
    // ============================================================== events

    /// Records a call that changed nothing (e.g. a denied one).
    pub async fn record_event(&self, audit: &Audit, result: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        append_event(&mut tx, audit, result).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_events(&self, filter: &EventFilter, page: &Page) -> Result<Listing<Event>> {
        let mut q = Sql::new("SELECT * FROM events WHERE 1 = 1");
        if let Some(org) = &filter.org {
            q.and("org = ?", Arg::Text(org.clone()));
        }
        if let Some(orgs) = &filter.orgs_visible {
            in_list(&mut q, "org", orgs);
        }
        if let Some(p) = &filter.project {
            q.and("project = ?", Arg::Text(p.clone()));
        }
        if let Some(a) = &filter.action {
            q.and("action = ?", Arg::Text(a.clone()));
        }
        if let Some(r) = &filter.result {
            q.and("result = ?", Arg::Text(r.clone()));
        }
        if let Some(c) = &page.cursor {
            let id: i64 = c.parse().map_err(|_| StoreError::Invalid {
                field: "cursor".into(),
                message: "not a cursor this list returned".into(),
            })?;
            q.and("id < ?", Arg::Int(id));
        }
        let l = q.arg(limit_arg(page));
        q.push(&format!(" ORDER BY id DESC LIMIT {l}"));
        let rows = q.query().fetch_all(&self.reader).await?;
        let items = rows.iter().map(event_from).collect::<Result<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |e| e.id.to_string()))
    }

    // ============================================================== regions

    pub async fn create_region(&self, r: &CreateRegion, audit: &Audit) -> Result<Region> {
        let region = Region {
            id: format!("reg_{}", nanoid(12)),
            code: r.code.clone(),
            name: r.name.clone(),
            country: r.country.clone(),
            created_at: ts(now_ms()),
        };
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO regions (id, code, name, country, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&region.id)
            .bind(&region.code)
            .bind(&region.name)
            .bind(&region.country)
            .bind(region.created_at.timestamp_millis())
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("region {:?} already exists", r.code)))
            }
            r => r?,
        };
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(region)
    }

    pub async fn list_regions(&self, page: &Page) -> Result<Listing<Region>> {
        self.keyset_page(Sql::new("SELECT * FROM regions WHERE 1 = 1"), "code", page, region_from, |r| r.code.clone())
            .await
    }

    pub async fn get_region(&self, code: &str) -> Result<Region> {
        let row = sqlx::query("SELECT * FROM regions WHERE code = $1")
            .bind(code)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("region {code:?} does not exist")))?;
        region_from(&row)
    }

    pub async fn delete_region(&self, code: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let nodes: i64 = sqlx::query("SELECT COUNT(*) AS c FROM nodes WHERE region = $1")
            .bind(code)
            .fetch_one(&mut *tx)
            .await?
            .int("c")?;
        if nodes > 0 {
            return Err(StoreError::Conflict(format!("region {code:?} still has {nodes} node(s); delete them first")));
        }
        let pattern = format!("%\"{code}\"%");
        let projects: i64 = sqlx::query("SELECT COUNT(*) AS c FROM projects WHERE regions LIKE $1")
            .bind(pattern)
            .fetch_one(&mut *tx)
            .await?
            .int("c")?;
        if projects > 0 {
            return Err(StoreError::Conflict(format!(
                "region {code:?} is used by {projects} project(s); remove it from their regions first"
            )));
        }
        let done = sqlx::query("DELETE FROM regions WHERE code = $1").bind(code).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("region {code:?} does not exist")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== nodes

    /// Registers a node, or updates the one with the same hostname.
    /// Returns the node and whether it was new.
    pub async fn register_node(&self, r: &RegisterNode, audit: &Audit) -> Result<(Node, bool)> {
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
                     VALUES ($1, $2, $3, $4, 'ready', $5, $6, $7, $8, $9, $10, $11, $12)",
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
        let mut audit = audit.clone();
        audit.target = r.hostname.clone();
        audit.action = if created { "node.register" } else { "node.update" }.into();
        append_event(&mut tx, &audit, "ok").await?;
        tx.commit().await?;
        Ok((self.get_node(&id).await?, created))
    }

    pub async fn list_nodes(&self, page: &Page) -> Result<Listing<Node>> {
        self.keyset_page(Sql::new(NODE_SELECT), "n.hostname", page, node_from, |n| n.hostname.clone()).await
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
        let done = sqlx::query(
            "UPDATE nodes SET last_heartbeat = $1, status = CASE WHEN status = 'down' THEN 'ready' ELSE status END WHERE id = $2",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("node {id:?} does not exist; register it again")));
        }
        self.get_node(id).await
    }

    /// Marks a node draining (or drained at once when it holds no instances).
    pub async fn drain_node(&self, id: &str, audit: &Audit) -> Result<Node> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("SELECT hostname FROM nodes WHERE id = $1{}", self.for_update()))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id:?} does not exist")))?;
        let hostname = row.text("hostname")?;
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
        let mut audit = audit.clone();
        audit.target = hostname;
        append_event(&mut tx, &audit, "ok").await?;
        tx.commit().await?;
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
        let mut audit = audit.clone();
        audit.target = row.text("hostname")?;
        append_event(&mut tx, &audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== orgs

    /// Creates an organisation; `owner`, when given, becomes its first Owner.
    pub async fn create_org(&self, slug: &str, name: &str, owner: Option<&str>, audit: &Audit) -> Result<Org> {
        let org = Org {
            id: format!("org_{}", nanoid(12)),
            slug: slug.to_owned(),
            name: name.to_owned(),
            created_at: ts(now_ms()),
        };
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO orgs (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&org.id)
            .bind(&org.slug)
            .bind(&org.name)
            .bind(org.created_at.timestamp_millis())
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("organisation {slug:?} already exists")))
            }
            r => r?,
        };
        if let Some(owner) = owner {
            sqlx::query("INSERT INTO members (org_id, user_name, role, created_at) VALUES ($1, $2, 'owner', $3)")
                .bind(&org.id)
                .bind(owner)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(org)
    }

    pub async fn list_orgs(&self, only: Option<&[String]>, page: &Page) -> Result<Listing<Org>> {
        let mut q = Sql::new("SELECT * FROM orgs WHERE 1 = 1");
        if let Some(only) = only {
            in_list(&mut q, "slug", only);
        }
        self.keyset_page(q, "slug", page, org_from, |o| o.slug.clone()).await
    }

    pub async fn get_org(&self, slug: &str) -> Result<Org> {
        let row = sqlx::query("SELECT * FROM orgs WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("organisation {slug:?} does not exist")))?;
        org_from(&row)
    }

    pub async fn list_members(&self, org: &str) -> Result<Vec<Member>> {
        let org = self.get_org(org).await?;
        let rows = sqlx::query(
            "SELECT o.slug, m.user_name, m.role, m.created_at FROM members m JOIN orgs o ON o.id = m.org_id \
             WHERE m.org_id = $1 ORDER BY m.user_name",
        )
        .bind(&org.id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(member_from).collect()
    }

    /// Adds a member or changes their role; returns the member and whether it is new.
    pub async fn put_member(&self, org: &str, user: &str, role: Role, audit: &Audit) -> Result<(Member, bool)> {
        let org = self.get_org(org).await?;
        let mut tx = self.writer.begin().await?;
        let existing =
            sqlx::query(&format!("SELECT role FROM members WHERE org_id = $1 AND user_name = $2{}", self.for_update()))
                .bind(&org.id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?;
        let now = now_ms();
        let created = match existing {
            Some(row) => {
                let old = row.parsed("role", Role::parse)?;
                if old == Role::Owner && role != Role::Owner {
                    ensure_other_owner(&mut tx, &org.id, user).await?;
                }
                sqlx::query("UPDATE members SET role = $1 WHERE org_id = $2 AND user_name = $3")
                    .bind(role.as_str())
                    .bind(&org.id)
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
                false
            }
            None => {
                sqlx::query("INSERT INTO members (org_id, user_name, role, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&org.id)
                    .bind(user)
                    .bind(role.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| {
                        if is_unique_violation(&e) {
                            StoreError::Conflict(format!("{user:?} was added concurrently; retry"))
                        } else {
                            e.into()
                        }
                    })?;
                true
            }
        };
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        let member = self
            .list_members(&org.slug)
            .await?
            .into_iter()
            .find(|m| m.user == user)
            .ok_or_else(|| StoreError::NotFound(format!("member {user:?} vanished")))?;
        Ok((member, created))
    }

    pub async fn get_member_role(&self, org: &str, user: &str) -> Result<Option<Role>> {
        let row = sqlx::query(
            "SELECT m.role FROM members m JOIN orgs o ON o.id = m.org_id WHERE o.slug = $1 AND m.user_name = $2",
        )
        .bind(org)
        .bind(user)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| r.parsed("role", Role::parse)).transpose()
    }

    pub async fn remove_member(&self, org: &str, user: &str, audit: &Audit) -> Result<()> {
        let org = self.get_org(org).await?;
        let mut tx = self.writer.begin().await?;
        let row =
            sqlx::query(&format!("SELECT role FROM members WHERE org_id = $1 AND user_name = $2{}", self.for_update()))
                .bind(&org.id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("{user:?} is not a member of {:?}", org.slug)))?;
        if row.parsed("role", Role::parse)? == Role::Owner {
            ensure_other_owner(&mut tx, &org.id, user).await?;
        }
        sqlx::query("DELETE FROM members WHERE org_id = $1 AND user_name = $2")
            .bind(&org.id)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== projects

    pub async fn create_project(&self, p: &NewProject, audit: &Audit) -> Result<Project> {
        let org = self.get_org(&p.org).await?;
        let mut tx = self.writer.begin().await?;
        let known: Vec<String> = sqlx::query("SELECT code FROM regions ORDER BY code")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.text("code"))
            .collect::<Result<_>>()?;
        let regions = match &p.regions {
            Some(list) => {
                check_regions("regions", list, &known)?;
                list.clone()
            }
            None => known,
        };
        let id = format!("prj_{}", nanoid(12));
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO projects (id, org_id, name, github_repo, branch, auto_deploy, port, vcpu, memory, \
             instances_per_region, regions, image_template, rate_limit, current_deployments, created_at, updated_at, \
             sleep_after_secs, retain_deployments, scaling, staging_branch, tag_pattern, build) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, '{}', $14, $15, $16, $17, $18, $19, $20, $21)",
        )
        .bind(&id)
        .bind(&org.id)
        .bind(&p.name)
        .bind(p.github_repo.clone())
        .bind(&p.branch)
        .bind(i64::from(p.auto_deploy))
        .bind(i64::from(p.port))
        .bind(i64::from(p.resources.vcpu))
        .bind(i64::from(p.resources.memory))
        .bind(i64::from(p.instances_per_region))
        .bind(serde_json::to_string(&regions).unwrap_or_default())
        .bind(p.image_template.clone())
        .bind(p.rate_limit.map(|r| serde_json::to_string(&r).unwrap_or_default()))
        .bind(now)
        .bind(now)
        .bind(i64::from(p.sleep_after_secs))
        .bind(i64::from(p.retain_deployments))
        .bind(p.scaling.map(|sc| serde_json::to_string(&sc).unwrap_or_default()))
        .bind(p.staging_branch.clone())
        .bind(p.tag_pattern.clone())
        .bind(serde_json::to_string(&p.build).unwrap_or_default())
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "project {:?} already exists in organisation {:?}",
                    p.name, p.org
                )))
            }
            r => r?,
        };
        claim_host(&mut tx, &format!("{}-{}", p.name, p.org), &id, "project").await.map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!(
                "project {:?} of {:?} would be served at {}-{}, which another organisation's project or \
                 deployment already uses; choose another project name",
                p.name, p.org, p.name, p.org
            )),
            e => e,
        })?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.get_project(&p.org, &p.name).await
    }

    pub async fn list_projects(
        &self,
        org: Option<&str>,
        orgs_visible: Option<&[String]>,
        page: &Page,
    ) -> Result<Listing<Project>> {
        let mut q = Sql::new(PROJECT_SELECT);
        if let Some(org) = org {
            q.and("o.slug = ?", Arg::Text(org.to_owned()));
        }
        if let Some(orgs) = orgs_visible {
            in_list(&mut q, "o.slug", orgs);
        }
        self.keyset_page(q, "(o.slug || '/' || p.name)", page, project_from, |p| format!("{}/{}", p.org, p.name)).await
    }

    pub async fn get_project(&self, org: &str, name: &str) -> Result<Project> {
        let mut q = Sql::new(PROJECT_SELECT);
        q.and("o.slug = ?", Arg::Text(org.to_owned()));
        q.and("p.name = ?", Arg::Text(name.to_owned()));
        match q.query().fetch_optional(&self.reader).await? {
            Some(row) => project_from(&row),
            None => {
                self.get_org(org).await?;
                Err(StoreError::NotFound(format!("project {name:?} does not exist in organisation {org:?}")))
            }
        }
    }

    pub async fn update_project(&self, org: &str, name: &str, patch: &PatchProject, audit: &Audit) -> Result<Project> {
        let current = self.get_project(org, name).await?;
        let mut tx = self.writer.begin().await?;
        // Lock the row, then re-read inside the transaction.
        sqlx::query(&format!("SELECT id FROM projects WHERE id = $1{}", self.for_update()))
            .bind(&current.id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("project {name:?} does not exist in organisation {org:?}")))?;
        let mut q = Sql::new("UPDATE projects SET updated_at = ");
        let now = q.arg(Arg::Int(now_ms()));
        q.push(&now);
        let set = |q: &mut Sql, col: &str, a: Arg| {
            let p = q.arg(a);
            q.push(&format!(", {col} = {p}"));
        };
        let set_opt = |q: &mut Sql, col: &str, v: &Option<String>| match v {
            Some(s) => {
                let p = q.arg(Arg::Text(s.clone()));
                q.push(&format!(", {col} = {p}"));
            }
            None => {
                q.push(&format!(", {col} = NULL"));
            }
        };
        if let Some(v) = &patch.github_repo {
            set_opt(&mut q, "github_repo", v);
        }
        if let Some(v) = &patch.image_template {
            set_opt(&mut q, "image_template", v);
        }
        if let Some(v) = &patch.rate_limit {
            set_opt(&mut q, "rate_limit", &v.map(|r| serde_json::to_string(&r).unwrap_or_default()));
        }
        if let Some(v) = &patch.branch {
            set(&mut q, "branch", Arg::Text(v.clone()));
        }
        if let Some(v) = patch.auto_deploy {
            set(&mut q, "auto_deploy", Arg::Int(i64::from(v)));
        }
        if let Some(v) = patch.port {
            set(&mut q, "port", Arg::Int(i64::from(v)));
        }
        if let Some(v) = patch.resources {
            set(&mut q, "vcpu", Arg::Int(i64::from(v.vcpu)));
            set(&mut q, "memory", Arg::Int(i64::from(v.memory)));
        }
        if let Some(v) = patch.instances_per_region {
            set(&mut q, "instances_per_region", Arg::Int(i64::from(v)));
        }
        if let Some(v) = patch.sleep_after_secs {
            set(&mut q, "sleep_after_secs", Arg::Int(i64::from(v)));
        }
        if let Some(v) = patch.retain_deployments {
            set(&mut q, "retain_deployments", Arg::Int(i64::from(v)));
        }
        if let Some(v) = &patch.scaling {
            set_opt(&mut q, "scaling", &v.map(|sc| serde_json::to_string(&sc).unwrap_or_default()));
        }
        if let Some(v) = &patch.staging_branch {
            set_opt(&mut q, "staging_branch", v);
        }
        if let Some(v) = &patch.tag_pattern {
            set_opt(&mut q, "tag_pattern", v);
        }
        if let Some(v) = &patch.build {
            set(&mut q, "build", Arg::Text(serde_json::to_string(v).unwrap_or_default()));
        }
        if let Some(regions) = &patch.regions {
            let known: Vec<String> = sqlx::query("SELECT code FROM regions")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.text("code"))
                .collect::<Result<_>>()?;
            check_regions("regions", regions, &known)?;
            set(&mut q, "regions", Arg::Text(serde_json::to_string(regions).unwrap_or_default()));
        }
        let id_p = q.arg(Arg::Text(current.id.clone()));
        q.push(&format!(" WHERE id = {id_p}"));
        q.query().execute(&mut *tx).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.get_project(org, name).await
    }

    pub async fn delete_project(&self, org: &str, name: &str, audit: &Audit) -> Result<()> {
        let project = self.get_project(org, name).await?;
        let mut tx = self.writer.begin().await?;
        let live: i64 = sqlx::query(
            "SELECT COUNT(*) AS c FROM instances i JOIN deployments d ON d.id = i.deployment_id \
             WHERE d.project_id = $1 AND i.status NOT IN ('stopped', 'failed', 'exited')",
        )
        .bind(&project.id)
        .fetch_one(&mut *tx)
        .await?
        .int("c")?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "project {name:?} still runs {live} instance(s); stop its deployments first"
            )));
        }
        sqlx::query("DELETE FROM env_vars WHERE project_id = $1").bind(&project.id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM domains WHERE project_id = $1").bind(&project.id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM projects WHERE id = $1").bind(&project.id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM hosts WHERE project_id = $1 AND kind = 'project'")
            .bind(&project.id)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== env vars

    pub async fn list_env(&self, project_id: &str) -> Result<Vec<StoredEnvVar>> {
        let rows = sqlx::query("SELECT key, value_enc, updated_at FROM env_vars WHERE project_id = $1 ORDER BY key")
            .bind(project_id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredEnvVar {
                    key: r.text("key")?,
                    value_enc: r.text("value_enc")?,
                    updated_at: ts(r.int("updated_at")?),
                })
            })
            .collect()
    }

    /// Replaces every variable of a project with `vars` (already encrypted), atomically.
    pub async fn replace_env(&self, project_id: &str, vars: &[(String, String)], audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM env_vars WHERE project_id = $1").bind(project_id).execute(&mut *tx).await?;
        let now = now_ms();
        for (k, v) in vars {
            sqlx::query("INSERT INTO env_vars (project_id, key, value_enc, updated_at) VALUES ($1, $2, $3, $4)")
                .bind(project_id)
                .bind(k)
                .bind(v)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| fk_to_not_found(e, "project was deleted"))?;
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets one variable (already encrypted); returns whether it is new.
    pub async fn put_env(
        &self,
        project_id: &str,
        key: &str,
        value_enc: &str,
        max_vars: usize,
        audit: &Audit,
    ) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let updated =
            sqlx::query("UPDATE env_vars SET value_enc = $1, updated_at = $2 WHERE project_id = $3 AND key = $4")
                .bind(value_enc)
                .bind(now)
                .bind(project_id)
                .bind(key)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if updated == 0 {
            let count: i64 = sqlx::query("SELECT COUNT(*) AS c FROM env_vars WHERE project_id = $1")
                .bind(project_id)
                .fetch_one(&mut *tx)
                .await?
                .int("c")?;
            if count as usize >= max_vars {
                return Err(StoreError::Conflict(format!(
                    "a project holds at most {max_vars} variables; delete some first"
                )));
            }
            sqlx::query("INSERT INTO env_vars (project_id, key, value_enc, updated_at) VALUES ($1, $2, $3, $4)")
                .bind(project_id)
                .bind(key)
                .bind(value_enc)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(format!("{key} was set concurrently; retry"))
                    } else {
                        fk_to_not_found(e, "project was deleted")
                    }
                })?;
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(updated == 0)
    }

    pub async fn delete_env(&self, project_id: &str, key: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM env_vars WHERE project_id = $1 AND key = $2")
            .bind(project_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("variable {key:?} is not set")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== domains

    pub async fn list_domains(&self, project_id: &str) -> Result<Vec<Domain>> {
        let rows = sqlx::query(
            "SELECT d.name, d.environment, d.verified, d.created_at, COALESCE(c.state, d.certificate) AS certificate, \
             o.slug AS org_slug, p.name AS project_name FROM domains d JOIN projects p ON p.id = d.project_id \
             JOIN orgs o ON o.id = p.org_id LEFT JOIN certificates c ON c.domain = d.name WHERE d.project_id = $1 ORDER BY d.name",
        )
        .bind(project_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(domain_from).collect()
    }

    pub async fn create_domain(&self, project_id: &str, name: &str, env: Environment, audit: &Audit) -> Result<Domain> {
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query(
            "INSERT INTO domains (name, project_id, environment, verified, certificate, created_at) VALUES ($1, $2, $3, 0, 'none', $4)",
        )
        .bind(name)
        .bind(project_id)
        .bind(env.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("domain {name:?} is already registered to a project")))
            }
            r => r.map_err(|e| fk_to_not_found(e, "project was deleted"))?,
        };
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.list_domains(project_id)
            .await?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("domain {name:?} vanished")))
    }

    pub async fn delete_domain(&self, project_id: &str, name: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM domains WHERE project_id = $1 AND name = $2")
            .bind(project_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("domain {name:?} is not registered to this project")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    // ============================================================== deployments

    pub async fn create_deployment(&self, d: &NewDeployment, audit: &Audit) -> Result<Deployment> {
        let mut tx = self.writer.begin().await?;
        insert_deployment(&mut tx, d, DeploymentStatus::Pending).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
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

    // ============================================================== tokens

    pub async fn create_token(&self, t: &StoredToken, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a node's own credential (bound to `t.token.node`), replacing the
    /// ones issued to that node before: a re-registered node holds one credential.
    pub async fn issue_node_credential(&self, t: &StoredToken, audit: &Audit) -> Result<()> {
        let node = t.token.node.clone().ok_or_else(|| StoreError::Invalid {
            field: "node".into(),
            message: "a node credential names its node".into(),
        })?;
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM tokens WHERE node_id = $1").bind(&node).execute(&mut *tx).await?;
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores the first admin token unless one was bootstrapped before.
    /// Returns false when the platform already has its first admin token.
    pub async fn bootstrap_admin_token(&self, t: &StoredToken) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO bootstrap (key, value) VALUES ('admin_token', $1)")
            .bind(&t.token.id)
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => return Ok(false),
            r => r?,
        };
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, &Audit::new("system", "token.bootstrap", &t.token.id), "ok").await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn get_token(&self, id: &str) -> Result<StoredToken> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("token {id:?} does not exist")))?;
        token_from(&row)
    }

    pub async fn list_tokens(&self, org: Option<&str>, page: &Page) -> Result<Listing<Token>> {
        let mut q = Sql::new("SELECT * FROM tokens WHERE 1 = 1");
        if let Some(org) = org {
            q.and("scope_org = ?", Arg::Text(org.to_owned()));
        }
        self.keyset_page(q, "id", page, |r| token_from(r).map(|t| t.token), |t| t.id.clone()).await
    }

    pub async fn delete_token(&self, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM tokens WHERE id = $1").bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("token {id:?} does not exist")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_token(conn: &mut AnyConnection, t: &StoredToken) -> Result<()> {
    let (kind, org, role) = scope_columns(&t.token.scope);
    sqlx::query(
        "INSERT INTO tokens (id, name, secret_hash, scope_kind, scope_org, scope_role, read_only, created_by, created_at, \
         expires_at, node_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&t.token.id)
    .bind(&t.token.name)
    .bind(&t.secret_hash)
    .bind(kind)
    .bind(org)
    .bind(role)
    .bind(i64::from(t.token.read_only))
    .bind(t.token.created_by.clone())
    .bind(t.token.created_at.timestamp_millis())
    .bind(t.token.expires_at.map(|e| e.timestamp_millis()))
    .bind(t.token.node.clone())
    .execute(conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict("token id collision; retry".into())
        } else {
            e.into()
        }
    })?;
    Ok(())
}

async fn ensure_other_owner(conn: &mut AnyConnection, org_id: &str, user: &str) -> Result<()> {
    let owners: i64 =
        sqlx::query("SELECT COUNT(*) AS c FROM members WHERE org_id = $1 AND role = 'owner' AND user_name <> $2")
            .bind(org_id)
            .bind(user)
            .fetch_one(conn)
            .await?
            .int("c")?;
    if owners == 0 {
        return Err(StoreError::Conflict(format!("{user:?} is the last owner; make someone else owner first")));
    }
    Ok(())
}

fn check_regions(field: &str, list: &[String], known: &[String]) -> Result<()> {
    for (i, r) in list.iter().enumerate() {
        if !known.contains(r) {
            return Err(StoreError::Invalid {
                field: format!("{field}[{i}]"),
                message: format!("region {r:?} does not exist; known regions: {}", known.join(", ")),
            });
        }
    }
    Ok(())
}

fn in_list(q: &mut Sql, col: &str, values: &[String]) {
    if values.is_empty() {
        q.push(" AND 1 = 0");
        return;
    }
    let params: Vec<String> = values.iter().map(|v| q.arg(Arg::Text(v.clone()))).collect();
    q.push(&format!(" AND {col} IN ({})", params.join(", ")));
}

fn fk_to_not_found(e: sqlx::Error, what: &str) -> StoreError {
    if is_fk_violation(&e) {
        StoreError::NotFound(what.to_owned())
    } else {
        e.into()
    }
}

impl Store {
    /// A platform-wide setting written once (first admin token, key check).
    pub async fn get_bootstrap(&self, key: &str) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT value FROM bootstrap WHERE key = $1").bind(key).fetch_optional(&self.reader).await?;
        row.map(|r| r.text("value")).transpose()
    }

    /// Writes `key` unless present; returns whether this call wrote it.
    pub async fn put_bootstrap_if_absent(&self, key: &str, value: &str) -> Result<bool> {
        let res = sqlx::query("INSERT INTO bootstrap (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&self.writer)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => Ok(false),
            r => r.map(|_| true).map_err(Into::into),
        }
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

fn instance_from(row: &AnyRow) -> Result<zeitwork_api_types::Instance> {
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

/// What the routing table is built from: one row per (host kind, deployment, ready instance).
#[derive(Debug, Clone)]
pub struct RoutingRows {
    /// Deployments with at least one ready instance on a live node, with their instances.
    pub deployments: Vec<RoutedDeployment>,
    /// Every active environment.
    pub current: Vec<CurrentDeployment>,
    /// (domain, org, project, environment, verified).
    pub domains: Vec<(String, String, String, Environment, bool)>,
}

/// The deployment an environment of a project points at.
#[derive(Debug, Clone)]
pub struct CurrentDeployment {
    pub org: String,
    pub project: String,
    pub environment: Environment,
    /// For a pull request's preview: its number.
    pub pull_request: Option<u32>,
    pub deployment: String,
    /// Whether the project holds its `<project>-<org>` address (projects
    /// older than the reservation of addresses may have lost it to another).
    pub owns_stable_host: bool,
}

#[derive(Debug, Clone)]
pub struct RoutedDeployment {
    pub id: String,
    pub org: String,
    pub project: String,
    pub rate_limit: Option<RateLimit>,
    /// (instance id, node agent URL)
    pub instances: Vec<(String, String)>,
    /// Asleep: a request wakes it.
    pub wake: bool,
    /// Retired: requests answer 410.
    pub gone: bool,
}

impl Store {
    pub async fn create_instance(&self, i: &NewInstance) -> Result<zeitwork_api_types::Instance> {
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
        .execute(&self.writer)
        .await?;
        self.get_instance(&id).await
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
             exit_code = COALESCE($6, exit_code), exit_reason = COALESCE($7, exit_reason) WHERE id = $8",
        )
        .bind(status.as_str())
        .bind(address.map(str::to_owned))
        .bind(i64::from(matches!(status, S::Starting | S::Ready)))
        .bind(now)
        .bind(i64::from(status == S::Ready))
        .bind(code)
        .bind(reason)
        .bind(id)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("instance {id:?} does not exist")));
        }
        Ok(())
    }

    pub async fn set_deployment_status(&self, id: &str, status: DeploymentStatus, reason: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE deployments SET status = $1, reason = $2, updated_at = $3 WHERE id = $4")
            .bind(status.as_str())
            .bind(reason.map(str::to_owned))
            .bind(now_ms())
            .bind(id)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
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
        let project_id = sqlx::query("SELECT project_id FROM deployments WHERE id = $1")
            .bind(deployment)
            .fetch_one(&self.reader)
            .await?
            .text("project_id")?;
        let mut tx = self.writer.begin().await?;
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
        }
        sqlx::query("UPDATE projects SET current_deployments = $1, updated_at = $2 WHERE id = $3")
            .bind(serde_json::to_string(&current).unwrap_or_default())
            .bind(now)
            .bind(&project_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE deployments SET status = 'active', updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Everything the routing table is made of, read in one go.
    pub async fn routing_rows(&self) -> Result<RoutingRows> {
        let rows = sqlx::query(
            "SELECT d.id, d.org, d.project, p.rate_limit, i.id AS instance_id, n.address AS upstream \
             FROM deployments d JOIN projects p ON p.id = d.project_id \
             JOIN instances i ON i.deployment_id = d.id JOIN nodes n ON n.id = i.node_id \
             WHERE i.status = 'ready' AND n.status <> 'down' AND d.status NOT IN ('retired', 'failed') \
             ORDER BY d.id, i.id",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut deployments: Vec<RoutedDeployment> = Vec::new();
        for r in &rows {
            let id = r.text("id")?;
            if deployments.last().map(|d| d.id != id).unwrap_or(true) {
                let rate_limit = r
                    .opt_text("rate_limit")?
                    .and_then(|s| serde_json::from_str::<Option<RateLimit>>(&s).ok())
                    .flatten();
                deployments.push(RoutedDeployment {
                    id: id.clone(),
                    org: r.text("org")?,
                    project: r.text("project")?,
                    rate_limit,
                    instances: Vec::new(),
                    wake: false,
                    gone: false,
                });
            }
            if let Some(d) = deployments.last_mut() {
                d.instances.push((r.text("instance_id")?, r.text("upstream")?));
            }
        }
        // Sleeping (or waking, not yet ready) deployments route to a wake, as do active ones with no
        // ready instance (scaled to zero, or every instance lost); retired ones to 410 Gone.
        let routed: std::collections::HashSet<String> = deployments.iter().map(|d| d.id.clone()).collect();
        let month_ago = now_ms() - 30 * 24 * 3600 * 1000;
        for r in sqlx::query(
            "SELECT d.id, d.org, d.project, d.status, p.rate_limit FROM deployments d JOIN projects p ON p.id = d.project_id \
             WHERE d.status IN ('sleeping', 'waking', 'active') OR (d.status = 'retired' AND d.updated_at > $1) ORDER BY d.id",
        )
        .bind(month_ago)
        .fetch_all(&self.reader)
        .await?
        {
            let id = r.text("id")?;
            if routed.contains(&id) {
                continue;
            }
            let retired = r.text("status")? == "retired";
            deployments.push(RoutedDeployment {
                id,
                org: r.text("org")?,
                project: r.text("project")?,
                rate_limit: r
                    .opt_text("rate_limit")?
                    .and_then(|s| serde_json::from_str::<Option<RateLimit>>(&s).ok())
                    .flatten(),
                instances: Vec::new(),
                wake: !retired,
                gone: retired,
            });
        }
        let preview_hosts: std::collections::HashSet<(String, String)> =
            sqlx::query("SELECT label, project_id FROM hosts WHERE kind = 'preview'")
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|r| Ok((r.text("label")?, r.text("project_id")?)))
                .collect::<Result<_>>()?;
        let mut current = Vec::new();
        for r in
            sqlx::query(
                "SELECT o.slug, p.id, p.name, p.current_deployments, \
                 (SELECT COUNT(*) FROM hosts h WHERE h.label = p.name || '-' || o.slug AND h.project_id = p.id) AS owns \
                 FROM projects p JOIN orgs o ON o.id = p.org_id",
            )
                .fetch_all(&self.reader)
                .await?
        {
            let map: BTreeMap<String, String> =
                serde_json::from_str(&r.text("current_deployments")?).unwrap_or_default();
            for (env, dep) in map {
                let (org, project) = (r.text("slug")?, r.text("name")?);
                if let Some(n) = env.strip_prefix("preview-").and_then(|n| n.parse::<u32>().ok()) {
                    let owns = preview_hosts.contains(&(preview_label(&project, n, &org), r.text("id")?));
                    current.push(CurrentDeployment {
                        org,
                        project,
                        environment: Environment::Preview,
                        pull_request: Some(n),
                        deployment: dep,
                        owns_stable_host: owns,
                    });
                } else if let Some(env) = Environment::parse(&env) {
                    current.push(CurrentDeployment {
                        org,
                        project,
                        environment: env,
                        pull_request: None,
                        deployment: dep,
                        owns_stable_host: r.int("owns")? > 0,
                    });
                }
            }
        }
        let mut domains = Vec::new();
        for r in sqlx::query(
            "SELECT d.name, d.environment, d.verified, o.slug, p.name AS project FROM domains d JOIN projects p ON p.id = d.project_id \
             JOIN orgs o ON o.id = p.org_id",
        )
        .fetch_all(&self.reader)
        .await?
        {
            domains.push((
                r.text("name")?,
                r.text("slug")?,
                r.text("project")?,
                r.parsed("environment", Environment::parse)?,
                r.int("verified")? != 0,
            ));
        }
        Ok(RoutingRows { deployments, current, domains })
    }
}

// ------------------------------------------------------------------ certificates

/// A certificate as stored: the key is ciphertext.
#[derive(Debug, Clone)]
pub struct StoredCertificate {
    pub domain: String,
    /// `pending`, `issued`, `failed`.
    pub state: String,
    pub cert_pem: Option<String>,
    pub key_enc: Option<String>,
    pub not_after: Option<chrono::DateTime<chrono::Utc>>,
    pub error: Option<String>,
}

fn cert_from(row: &AnyRow) -> Result<StoredCertificate> {
    Ok(StoredCertificate {
        domain: row.text("domain")?,
        state: row.text("state")?,
        cert_pem: row.opt_text("cert_pem")?,
        key_enc: row.opt_text("key_enc")?,
        not_after: row.opt_int("not_after")?.map(ts),
        error: row.opt_text("error")?,
    })
}

impl Store {
    /// Marks a domain verified (it points at the platform, or an admin said so).
    pub async fn verify_domain(&self, project_id: &str, name: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("UPDATE domains SET verified = 1 WHERE project_id = $1 AND name = $2")
            .bind(project_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("domain {name:?} is not registered to this project")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `name` is a custom domain registered to a project and verified.
    pub async fn domain_is_verified(&self, name: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT verified FROM domains WHERE name = $1").bind(name).fetch_optional(&self.reader).await?;
        Ok(row.map(|r| r.int("verified")).transpose()?.unwrap_or(0) != 0)
    }

    pub async fn list_certificates(&self) -> Result<Vec<StoredCertificate>> {
        let rows = sqlx::query("SELECT * FROM certificates ORDER BY domain").fetch_all(&self.reader).await?;
        rows.iter().map(cert_from).collect()
    }

    pub async fn get_certificate(&self, domain: &str) -> Result<Option<StoredCertificate>> {
        let row = sqlx::query("SELECT * FROM certificates WHERE domain = $1")
            .bind(domain)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| cert_from(&r)).transpose()
    }

    /// Takes the issuance lease of `domain` for `holder` until `until_ms`, if
    /// nobody else holds it. Returns whether `holder` has it now.
    pub async fn lease_certificate(&self, domain: &str, holder: &str, until_ms: i64) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT lease_holder, lease_until FROM certificates WHERE domain = $1{}",
            self.for_update()
        ))
        .bind(domain)
        .fetch_optional(&mut *tx)
        .await?;
        let granted = match row {
            None => {
                let res = sqlx::query(
                    "INSERT INTO certificates (domain, state, lease_holder, lease_until, updated_at) VALUES ($1, 'pending', $2, $3, $4)",
                )
                .bind(domain)
                .bind(holder)
                .bind(until_ms)
                .bind(now)
                .execute(&mut *tx)
                .await;
                match res {
                    Err(e) if is_unique_violation(&e) => false,
                    r => r.map(|_| true)?,
                }
            }
            Some(r) => {
                let free = r.opt_int("lease_until")?.is_none_or(|u| u < now)
                    || r.opt_text("lease_holder")?.as_deref() == Some(holder);
                if free {
                    sqlx::query("UPDATE certificates SET lease_holder = $1, lease_until = $2, updated_at = $3 WHERE domain = $4")
                        .bind(holder)
                        .bind(until_ms)
                        .bind(now)
                        .bind(domain)
                        .execute(&mut *tx)
                        .await?;
                }
                free
            }
        };
        tx.commit().await?;
        Ok(granted)
    }

    /// Stores an issued certificate (key already encrypted) and releases the lease.
    pub async fn store_certificate(
        &self,
        domain: &str,
        cert_pem: &str,
        key_enc: &str,
        not_after_ms: i64,
        audit: &Audit,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE certificates SET state = 'issued', cert_pem = $1, key_enc = $2, not_after = $3, error = NULL, \
             lease_holder = NULL, lease_until = NULL, updated_at = $4 WHERE domain = $5",
        )
        .bind(cert_pem)
        .bind(key_enc)
        .bind(not_after_ms)
        .bind(now_ms())
        .bind(domain)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed issuance (a previous certificate, if any, stays served).
    pub async fn certificate_failed(&self, domain: &str, error: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE certificates SET state = CASE WHEN cert_pem IS NULL THEN 'failed' ELSE state END, error = $1, \
             lease_holder = NULL, lease_until = NULL, updated_at = $2 WHERE domain = $3",
        )
        .bind(error)
        .bind(now_ms())
        .bind(domain)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "failed").await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn put_challenge(&self, token: &str, domain: &str, key_authorization: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM acme_challenges WHERE token = $1").bind(token).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO acme_challenges (token, domain, key_authorization, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(token)
        .bind(domain)
        .bind(key_authorization)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_challenge(&self, token: &str) -> Result<()> {
        sqlx::query("DELETE FROM acme_challenges WHERE token = $1").bind(token).execute(&self.writer).await?;
        Ok(())
    }

    /// (domain, key authorization) of a token, or of the newest challenge of a domain.
    pub async fn find_challenge(
        &self,
        token: Option<&str>,
        domain: Option<&str>,
    ) -> Result<Option<(String, String, String)>> {
        let mut q = Sql::new("SELECT token, domain, key_authorization FROM acme_challenges WHERE 1 = 1");
        if let Some(t) = token {
            q.and("token = ?", Arg::Text(t.to_owned()));
        }
        if let Some(d) = domain {
            q.and("domain = ?", Arg::Text(d.to_owned()));
        }
        q.push(" ORDER BY created_at DESC LIMIT 1");
        let row = q.query().fetch_optional(&self.reader).await?;
        row.map(|r| Ok((r.text("token")?, r.text("domain")?, r.text("key_authorization")?))).transpose()
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
    pub image: String,
    pub port: u16,
    pub resources: Resources,
    pub status: zeitwork_api_types::InstanceStatus,
}

impl Store {
    /// Live instances placed on `node` whose deployment still runs.
    pub async fn node_assignments(&self, node: &str) -> Result<Vec<NodeAssignment>> {
        use zeitwork_api_types::InstanceStatus;
        let rows = sqlx::query(
            "SELECT i.id, i.deployment_id, i.vcpu, i.memory, i.status, d.project_id, d.org, d.project, d.image, p.port \
             FROM instances i JOIN deployments d ON d.id = i.deployment_id JOIN projects p ON p.id = d.project_id \
             WHERE i.node_id = $1 AND i.status NOT IN ('stopped', 'failed', 'exited') AND d.status NOT IN ('retired', 'failed') \
             ORDER BY i.id",
        )
        .bind(node)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeAssignment {
                    instance: r.text("id")?,
                    deployment: r.text("deployment_id")?,
                    project_id: r.text("project_id")?,
                    org: r.text("org")?,
                    project: r.text("project")?,
                    image: r.text("image")?,
                    port: r.int("port")? as u16,
                    resources: Resources { vcpu: r.int("vcpu")? as u32, memory: r.int("memory")? as u32 },
                    status: r.parsed("status", InstanceStatus::parse)?,
                })
            })
            .collect()
    }
}

impl Store {
    /// Marks nodes whose last heartbeat is older than `cutoff_ms` as down;
    /// returns their ids.
    pub async fn mark_down_nodes(&self, cutoff_ms: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "UPDATE nodes SET status = 'down' WHERE status IN ('ready', 'draining', 'drained') \
             AND (last_heartbeat IS NULL OR last_heartbeat < $1) RETURNING id, hostname",
        )
        .bind(cutoff_ms)
        .fetch_all(&self.writer)
        .await?;
        for r in &rows {
            tracing::warn!(node = %r.text("hostname")?, "node missed its heartbeats; marked down");
        }
        rows.iter().map(|r| r.text("id")).collect()
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

impl Store {
    /// Moves a deployment from `from` to `to` only if it is still in `from`;
    /// returns whether this call did it (so two engines never both act).
    pub async fn claim_deployment(&self, id: &str, from: DeploymentStatus, to: DeploymentStatus) -> Result<bool> {
        let done = sqlx::query("UPDATE deployments SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4")
            .bind(to.as_str())
            .bind(now_ms())
            .bind(id)
            .bind(from.as_str())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a live instance stopped with `reason`; returns whether this call did it.
    pub async fn retire_instance(&self, id: &str, reason: &str) -> Result<bool> {
        let done = sqlx::query(&format!(
            "UPDATE instances SET status = 'stopped', exit_reason = $1 WHERE id = $2 AND {LIVE_INSTANCE}"
        ))
        .bind(reason)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

// ---------------------------------------------------------------- image archives

/// Blobs are stored in chunks of this many bytes, so no request holds a whole layer in memory.
pub const BLOB_CHUNK: usize = 4 * 1024 * 1024;

/// An uploaded image archive: a manifest and the blobs it names, served to node agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArchive {
    pub id: String,
    pub org: String,
    pub name: String,
    pub manifest_digest: String,
    pub media_type: String,
    /// Digests of the config and layers.
    pub blobs: Vec<String>,
    pub size: i64,
    pub created_by: Option<String>,
}

impl Store {
    /// The size of a stored blob, when it is stored whole.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<i64>> {
        let row =
            sqlx::query("SELECT size FROM blobs WHERE digest = $1").bind(digest).fetch_optional(&self.reader).await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<i64, _>(0)?),
            None => None,
        })
    }

    /// Stores one chunk of a blob being written; [`Store::finish_blob`] makes it visible.
    pub async fn put_blob_chunk(&self, digest: &str, seq: i64, data: Vec<u8>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM blob_chunks WHERE digest = $1 AND seq = $2")
            .bind(digest)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO blob_chunks (digest, seq, data) VALUES ($1, $2, $3)")
            .bind(digest)
            .bind(seq)
            .bind(data)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a blob whose chunks are all written as complete.
    pub async fn finish_blob(&self, digest: &str, size: i64) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM blob_chunks WHERE digest = $1 AND seq >= $2")
            .bind(digest)
            .bind(((size + BLOB_CHUNK as i64 - 1) / BLOB_CHUNK as i64).max(1))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM blobs WHERE digest = $1").bind(digest).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3)")
            .bind(digest)
            .bind(size)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Chunk `seq` of a complete blob.
    pub async fn blob_chunk(&self, digest: &str, seq: i64) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM blob_chunks WHERE digest = $1 AND seq = $2")
            .bind(digest)
            .bind(seq)
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<Vec<u8>, _>(0)?),
            None => None,
        })
    }

    /// Records an archive whose blobs are stored; the same image uploaded again is the same record.
    pub async fn create_archive(&self, a: &StoredArchive, audit: &Audit) -> Result<StoredArchive> {
        let mut tx = self.writer.begin().await?;
        let existing = sqlx::query("SELECT * FROM archives WHERE org = $1 AND name = $2 AND manifest_digest = $3")
            .bind(&a.org)
            .bind(&a.name)
            .bind(&a.manifest_digest)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            return archive_from(&row);
        }
        sqlx::query(
            "INSERT INTO archives (id, org, name, manifest_digest, media_type, blobs, size, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&a.id)
        .bind(&a.org)
        .bind(&a.name)
        .bind(&a.manifest_digest)
        .bind(&a.media_type)
        .bind(a.blobs.join(" "))
        .bind(a.size)
        .bind(a.created_by.clone())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(a.clone())
    }

    /// The archive of `org/name` with this manifest digest.
    pub async fn find_archive(&self, org: &str, name: &str, manifest_digest: &str) -> Result<Option<StoredArchive>> {
        let row = sqlx::query("SELECT * FROM archives WHERE org = $1 AND name = $2 AND manifest_digest = $3")
            .bind(org)
            .bind(name)
            .bind(manifest_digest)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(archive_from).transpose()
    }

    /// Whether an archive of `org/name` names this blob (a repository serves only its own blobs).
    pub async fn archive_names_blob(&self, org: &str, name: &str, digest: &str) -> Result<bool> {
        let rows = sqlx::query("SELECT blobs, manifest_digest FROM archives WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_all(&self.reader)
            .await?;
        for r in rows {
            let blobs: String = r.try_get(0)?;
            let manifest: String = r.try_get(1)?;
            if manifest == digest || blobs.split(' ').any(|b| b == digest) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn archive_from(r: &AnyRow) -> Result<StoredArchive> {
    let blobs: String = r.try_get("blobs")?;
    Ok(StoredArchive {
        id: r.try_get("id")?,
        org: r.try_get("org")?,
        name: r.try_get("name")?,
        manifest_digest: r.try_get("manifest_digest")?,
        media_type: r.try_get("media_type")?,
        blobs: blobs.split(' ').filter(|b| !b.is_empty()).map(str::to_owned).collect(),
        size: r.try_get("size")?,
        created_by: r.try_get("created_by")?,
    })
}

// ---------------------------------------------------------------- drain and leases

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
        sqlx::query("UPDATE instances SET replaced_by = $1 WHERE id = $2")
            .bind(replacement.map(str::to_owned))
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Takes a live instance out of traffic (`stopping`); it is stopped after `stop_after`.
    pub async fn begin_stopping(&self, id: &str, stop_after: i64) -> Result<bool> {
        let done = sqlx::query(&format!(
            "UPDATE instances SET status = 'stopping', stop_after = $1 WHERE id = $2 AND {LIVE_INSTANCE}"
        ))
        .bind(stop_after)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Draining nodes with no live instance left become `drained`; returns their ids.
    pub async fn finish_drained_nodes(&self) -> Result<Vec<String>> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id FROM nodes n WHERE status = 'draining' AND NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.node_id = n.id AND i.{LIVE_INSTANCE})"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.text("id")).collect::<Result<_>>()?;
        for id in &ids {
            sqlx::query("UPDATE nodes SET status = 'drained' WHERE id = $1 AND status = 'draining'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            append_event(&mut tx, &Audit::new("system", "node.drained", id), "ok").await?;
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Takes or renews the lease `name` for `holder` for `ttl_ms`; returns whether `holder` holds it.
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let taken =
            sqlx::query("UPDATE leases SET holder = $1, until = $2 WHERE name = $3 AND (holder = $1 OR until < $4)")
                .bind(holder)
                .bind(now + ttl_ms)
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        let held = if taken {
            true
        } else {
            sqlx::query("INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(holder)
                .bind(now + ttl_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1
        };
        tx.commit().await?;
        Ok(held)
    }

    /// Gives a lease up (a clean stop), so another holder takes over at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.writer)
            .await?;
        Ok(())
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
    /// Who holds lease `name`, and until when (ms since the epoch).
    pub async fn lease(&self, name: &str) -> Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT holder, until FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| Ok((r.text("holder")?, r.int("until")?))).transpose()
    }
}

/// One row of the change feed's snapshot: something with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRow {
    /// `deployment`, `instance` or `node`.
    pub kind: &'static str,
    pub id: String,
    pub org: Option<String>,
    pub project: Option<String>,
    pub deployment: Option<String>,
    pub status: String,
    pub reason: Option<String>,
}

impl Store {
    /// What the change feed compares: deployments still moving or changed since
    /// `since_ms`, their instances, and every node.
    pub async fn feed_snapshot(&self, since_ms: i64) -> Result<Vec<FeedRow>> {
        let mut out = Vec::new();
        let recent = "(d.status NOT IN ('retired', 'failed') OR d.updated_at >= $1)";
        // Instances first: an instance getting ready comes before the activation it causes.
        for r in sqlx::query(&format!(
            "SELECT i.id, i.deployment_id, i.status, i.exit_reason, d.org, d.project FROM instances i \
             JOIN deployments d ON d.id = i.deployment_id WHERE {recent}"
        ))
        .bind(since_ms)
        .fetch_all(&self.reader)
        .await?
        {
            out.push(FeedRow {
                kind: "instance",
                id: r.text("id")?,
                org: Some(r.text("org")?),
                project: Some(r.text("project")?),
                deployment: Some(r.text("deployment_id")?),
                status: r.text("status")?,
                reason: r.opt_text("exit_reason")?,
            });
        }
        for r in
            sqlx::query(&format!("SELECT d.id, d.org, d.project, d.status, d.reason FROM deployments d WHERE {recent}"))
                .bind(since_ms)
                .fetch_all(&self.reader)
                .await?
        {
            out.push(FeedRow {
                kind: "deployment",
                id: r.text("id")?,
                org: Some(r.text("org")?),
                project: Some(r.text("project")?),
                deployment: None,
                status: r.text("status")?,
                reason: r.opt_text("reason")?,
            });
        }
        for r in sqlx::query("SELECT id, status FROM nodes").fetch_all(&self.reader).await? {
            out.push(FeedRow {
                kind: "node",
                id: r.text("id")?,
                org: None,
                project: None,
                deployment: None,
                status: r.text("status")?,
                reason: None,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- GitHub intake

/// A webhook as stored: the secret stays encrypted. A webhook belongs to
/// one organisation and deploys only that organisation's projects; two
/// organisations may each register the same repository, and a delivery's
/// signature decides whose registration it is.
#[derive(Debug, Clone)]
pub struct StoredHook {
    pub org: String,
    pub repo: String,
    pub events: Vec<String>,
    pub secret_enc: String,
    /// A repository token (clones, commit statuses), encrypted.
    pub token_enc: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

fn hook_from(r: &AnyRow) -> Result<StoredHook> {
    Ok(StoredHook {
        org: r.text("org")?,
        repo: r.text("repo")?,
        events: r.text("events")?.split(' ').filter(|e| !e.is_empty()).map(str::to_owned).collect(),
        secret_enc: r.text("secret_enc")?,
        token_enc: r.opt_text("token_enc")?,
        created_at: ts(r.int("created_at")?),
    })
}

impl Store {
    /// Creates or replaces `org`'s webhook of `repo` (`owner/name`); other organisations' are untouched.
    pub async fn put_github_hook(
        &self,
        org: &str,
        repo: &str,
        events: &[String],
        secret_enc: &str,
        token_enc: Option<&str>,
        audit: &Audit,
    ) -> Result<StoredHook> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM github_hooks WHERE org = $1 AND repo = $2")
            .bind(org)
            .bind(repo)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO github_hooks (org, repo, events, secret_enc, created_by, created_at, token_enc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(org)
        .bind(repo)
        .bind(events.join(" "))
        .bind(secret_enc)
        .bind(audit.actor.clone())
        .bind(now_ms())
        .bind(token_enc.map(str::to_owned))
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        self.github_hook(org, repo).await?.ok_or_else(|| StoreError::NotFound(format!("webhook of {repo}")))
    }

    /// `org`'s webhook of `repo`.
    pub async fn github_hook(&self, org: &str, repo: &str) -> Result<Option<StoredHook>> {
        let row = sqlx::query("SELECT * FROM github_hooks WHERE org = $1 AND repo = $2")
            .bind(org)
            .bind(repo)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(hook_from).transpose()
    }

    /// Every organisation's webhook of `repo`, oldest first.
    pub async fn github_hooks_of_repo(&self, repo: &str) -> Result<Vec<StoredHook>> {
        let rows = sqlx::query("SELECT * FROM github_hooks WHERE repo = $1 ORDER BY created_at, org")
            .bind(repo)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(hook_from).collect()
    }

    /// Projects that deploy from GitHub repository `repo` (`owner/name`), of `org` only when given.
    pub async fn projects_of_repo(&self, repo: &str, org: Option<&str>) -> Result<Vec<Project>> {
        let mut q = Sql::new(PROJECT_SELECT);
        q.and("p.github_repo = ?", Arg::Text(repo.to_owned()));
        if let Some(org) = org {
            q.and("o.slug = ?", Arg::Text(org.to_owned()));
        }
        q.query().fetch_all(&self.reader).await?.iter().map(project_from).collect()
    }

    /// Whether `org` recorded a delivery id (GitHub redelivers with the same
    /// id). `org` is empty for deliveries no registration's secret signed.
    pub async fn github_delivery(&self, org: &str, id: &str) -> Result<Option<zeitwork_api_types::GithubDelivery>> {
        let row = sqlx::query("SELECT * FROM github_deliveries WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(delivery_from).transpose()
    }

    pub async fn record_github_delivery(&self, org: &str, d: &zeitwork_api_types::GithubDelivery) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM github_deliveries WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO github_deliveries (org, id, repo, event, status, outcome, git_ref, sha, deployments, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(org)
        .bind(&d.id)
        .bind(&d.repo)
        .bind(&d.event)
        .bind(&d.status)
        .bind(&d.outcome)
        .bind(d.git_ref.clone())
        .bind(d.sha.clone())
        .bind(d.deployments.join(" "))
        .bind(d.received_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deliveries of `repo` recorded for `org`, and those no registration's
    /// secret signed (forgeries, or a secret set wrong on GitHub), newest first.
    pub async fn list_github_deliveries(
        &self,
        org: &str,
        repo: &str,
        limit: u32,
    ) -> Result<Vec<zeitwork_api_types::GithubDelivery>> {
        let rows = sqlx::query(
            "SELECT * FROM github_deliveries WHERE (org = $1 OR org = '') AND repo = $2 \
             ORDER BY received_at DESC, id DESC LIMIT $3",
        )
        .bind(org)
        .bind(repo)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_from).collect()
    }

    /// The commit last pushed to `branch` of `repo`, from `org`'s verified deliveries.
    pub async fn last_pushed_sha(&self, org: &str, repo: &str, branch: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT sha FROM github_deliveries WHERE org = $1 AND repo = $2 AND event = 'push' AND git_ref = $3 \
             AND sha IS NOT NULL AND status <> 'rejected' ORDER BY received_at DESC LIMIT 1",
        )
        .bind(org)
        .bind(repo)
        .bind(format!("refs/heads/{branch}"))
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| r.text("sha")).transpose()
    }
}

fn delivery_from(r: &AnyRow) -> Result<zeitwork_api_types::GithubDelivery> {
    Ok(zeitwork_api_types::GithubDelivery {
        id: r.text("id")?,
        repo: r.text("repo")?,
        event: r.text("event")?,
        status: r.text("status")?,
        outcome: r.text("outcome")?,
        git_ref: r.opt_text("git_ref")?,
        sha: r.opt_text("sha")?,
        deployments: r.text("deployments")?.split(' ').filter(|d| !d.is_empty()).map(str::to_owned).collect(),
        received_at: ts(r.int("received_at")?),
    })
}

impl Store {
    /// Records an edge proxy's addresses and that it is alive.
    pub async fn edge_heartbeat(&self, name: &str, http: Option<&str>, https: Option<&str>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM edges WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO edges (name, http_address, https_address, last_seen) VALUES ($1, $2, $3, $4)")
            .bind(name)
            .bind(http.map(str::to_owned))
            .bind(https.map(str::to_owned))
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Edge proxies seen since `since_ms`, by name.
    pub async fn live_edges(&self, since_ms: i64) -> Result<Vec<zeitwork_api_types::EdgeInfo>> {
        let rows = sqlx::query("SELECT * FROM edges WHERE last_seen >= $1 ORDER BY name")
            .bind(since_ms)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(zeitwork_api_types::EdgeInfo {
                    name: r.text("name")?,
                    http_address: r.opt_text("http_address")?,
                    https_address: r.opt_text("https_address")?,
                    last_seen: ts(r.int("last_seen")?),
                })
            })
            .collect()
    }
}
