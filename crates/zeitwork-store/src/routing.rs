//! The rows the routing table is built from: of everything (a whole rebuild),
//! or of some projects only (the operator applying a change in place).
//!
//! Reads of some projects go by indexes only (`deployments (project_id)`,
//! `instances (deployment_id)`, `domains (project_id)`, `hosts (project_id)`,
//! primary keys), so their cost follows the projects read, not the size of
//! the platform; a test checks SQLite's plans.

use std::collections::{BTreeMap, HashMap, HashSet};

use zeitwork_api_types::{Environment, RateLimit};

use crate::deployments::{parse_served, preview_label};
use crate::{now_ms, Result, RowExt, Store};

/// What the routing table is built from.
#[derive(Debug, Clone)]
pub struct RoutingRows {
    /// Deployments routed: those with ready instances on live nodes (with
    /// them), sleeping or waking ones, and ones retired in the last 30 days.
    pub deployments: Vec<RoutedDeployment>,
    /// Every active environment.
    pub current: Vec<CurrentDeployment>,
    /// (domain, org, project, environment, verified).
    pub domains: Vec<(String, String, String, Environment, bool)>,
    /// Environments that send a share of their clients to a canary.
    pub canaries: Vec<crate::CanaryRow>,
    /// Environments that copy a share of their requests to a candidate.
    pub shadows: Vec<crate::ShadowRow>,
}

impl RoutingRows {
    pub fn empty() -> Self {
        RoutingRows { deployments: vec![], current: vec![], domains: vec![], canaries: vec![], shadows: vec![] }
    }
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
    /// (instance id, node agent URL), by instance id.
    pub instances: Vec<(String, String)>,
    /// Asleep: a request wakes it.
    pub wake: bool,
    /// Retired: requests answer 410.
    pub gone: bool,
    /// Environments it has served.
    pub served: Vec<Environment>,
    /// The project's skew protection pin lifetime, when it is on.
    pub skew_max_age_secs: Option<u32>,
}

/// More projects than this in one read are read whole instead (one query
/// parameter per project).
pub const ROUTING_READ_MAX_PROJECTS: usize = 500;

/// `$from, $from+1, …`: `n` positional parameters.
fn params(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Binds `ids` in order.
/// All rows of `q` read from `pool`.
async fn fetch<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    pool: &sqlx::AnyPool,
) -> Result<Vec<sqlx::any::AnyRow>> {
    Ok(q.fetch_all(pool).await?)
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ids: &'q [String],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for id in ids {
        q = q.bind(id.as_str());
    }
    q
}

/// The pin lifetime of a project's `skew_protection` column, when it is on.
fn skew_of(column: Option<String>) -> Option<u32> {
    let sp: zeitwork_api_types::SkewProtection = serde_json::from_str(&column?).ok()?;
    sp.enabled.then_some(sp.max_age_secs)
}

/// The statements one read of routing rows makes, of the projects given
/// (`$2…` for deployments, `$1…` for the others) or of all.
struct RoutingSql {
    /// Deployments that may be routed (`$1`: retired after this is still routed, as gone).
    deployments: String,
    /// Ready instances on live nodes.
    instances: String,
    /// Preview addresses held.
    preview_hosts: String,
    /// Projects with their current deployments.
    projects: String,
    domains: String,
}

impl RoutingSql {
    fn new(projects: Option<usize>) -> Self {
        // `AND <column> IN ($from, …)` for the projects asked.
        let scope = |column: &str, from: usize| match projects {
            Some(n) => format!(" AND {column} IN ({})", params(from, n)),
            None => String::new(),
        };
        RoutingSql {
            deployments: format!(
                "SELECT d.id, d.org, d.project, d.status, d.served, p.rate_limit, p.skew_protection \
                 FROM deployments d JOIN projects p ON p.id = d.project_id \
                 WHERE (d.status NOT IN ('retired', 'failed') OR (d.status = 'retired' AND d.updated_at > $1)){} \
                 ORDER BY d.id",
                scope("d.project_id", 2)
            ),
            // The deployments of the projects asked, by the index on their project.
            instances: format!(
                "SELECT i.deployment_id, i.id, n.address FROM instances i JOIN nodes n ON n.id = i.node_id \
                 WHERE i.status = 'ready' AND n.status <> 'down'{}",
                match projects {
                    Some(n) => format!(
                        " AND i.deployment_id IN (SELECT id FROM deployments WHERE project_id IN ({}))",
                        params(1, n)
                    ),
                    None => String::new(),
                }
            ),
            preview_hosts: format!(
                "SELECT label, project_id FROM hosts WHERE kind = 'preview'{}",
                scope("project_id", 1)
            ),
            projects: format!(
                "SELECT o.slug, p.id, p.name, p.current_deployments, \
                 (SELECT COUNT(*) FROM hosts h WHERE h.label = p.name || '-' || o.slug AND h.project_id = p.id) AS owns \
                 FROM projects p JOIN orgs o ON o.id = p.org_id WHERE 1 = 1{}",
                scope("p.id", 1)
            ),
            domains: format!(
                "SELECT d.name, d.environment, d.verified, o.slug, p.name AS project FROM domains d \
                 JOIN projects p ON p.id = d.project_id JOIN orgs o ON o.id = p.org_id WHERE 1 = 1{}",
                scope("d.project_id", 1)
            ),
        }
    }
}

impl Store {
    /// Everything the routing table is made of, read in one go.
    pub async fn routing_rows(&self) -> Result<RoutingRows> {
        self.routing_rows_in(None).await
    }

    /// What the routes of some projects are made of: those of `projects`
    /// and of the projects of `deployments` (ids), with the (org, name) of
    /// each (a project without routes is named too, so its old routes can go).
    /// `None` when that is more than [`ROUTING_READ_MAX_PROJECTS`] projects:
    /// read everything instead.
    pub async fn routing_rows_of(
        &self,
        deployments: &[String],
        projects: &[String],
    ) -> Result<Option<(Vec<(String, String)>, RoutingRows)>> {
        let mut ids: Vec<String> = projects.to_vec();
        for chunk in deployments.chunks(ROUTING_READ_MAX_PROJECTS) {
            let q = format!("SELECT DISTINCT project_id FROM deployments WHERE id IN ({})", params(1, chunk.len()));
            for r in bind_all(sqlx::query(&q), chunk).fetch_all(&self.reader).await? {
                ids.push(r.text("project_id")?);
            }
        }
        ids.sort();
        ids.dedup();
        if ids.len() > ROUTING_READ_MAX_PROJECTS {
            return Ok(None);
        }
        if ids.is_empty() {
            return Ok(Some((Vec::new(), RoutingRows::empty())));
        }
        let rows = self.routing_rows_in(Some(&ids)).await?;
        let q = format!(
            "SELECT o.slug, p.name FROM projects p JOIN orgs o ON o.id = p.org_id WHERE p.id IN ({}) \
             ORDER BY o.slug, p.name",
            params(1, ids.len())
        );
        let names = bind_all(sqlx::query(&q), &ids)
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| Ok((r.text("slug")?, r.text("name")?)))
            .collect::<Result<_>>()?;
        Ok(Some((names, rows)))
    }

    /// [`Store::routing_rows`] of the projects `only` (ids) when given.
    async fn routing_rows_in(&self, only: Option<&[String]>) -> Result<RoutingRows> {
        let sql = RoutingSql::new(only.map(<[String]>::len));
        let ids: &[String] = only.unwrap_or_default();
        let month_ago = now_ms() - 30 * 24 * 3600 * 1000;
        let pool = &self.reader;
        let reads = (
            fetch(bind_all(sqlx::query(&sql.instances), ids), pool),
            fetch(bind_all(sqlx::query(&sql.deployments).bind(month_ago), ids), pool),
            fetch(bind_all(sqlx::query(&sql.preview_hosts), ids), pool),
            fetch(bind_all(sqlx::query(&sql.projects), ids), pool),
            fetch(bind_all(sqlx::query(&sql.domains), ids), pool),
            self.canaries(),
            self.shadows(),
        );
        // A change's read of a few projects waits on the slowest of its
        // queries, not on their sum (on PostgreSQL each is a round trip); a
        // whole read goes one query at a time and leaves the other
        // connections to the API.
        let (instance_rows, rows, preview_rows, project_rows, domain_rows, mut canaries, mut shadows) =
            if only.is_some() {
                tokio::try_join!(reads.0, reads.1, reads.2, reads.3, reads.4, reads.5, reads.6)?
            } else {
                (
                    reads.0.await?,
                    reads.1.await?,
                    reads.2.await?,
                    reads.3.await?,
                    reads.4.await?,
                    reads.5.await?,
                    reads.6.await?,
                )
            };
        // Ready instances by deployment; one row each, few columns (a whole read has one per instance).
        let mut instances: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for r in instance_rows {
            instances.entry(r.text("deployment_id")?).or_default().push((r.text("id")?, r.text("address")?));
        }
        // Deployments with ready instances first, then the sleeping, waking or
        // active ones without (routed to a wake: scaled to zero, or every
        // instance lost) and those retired this month (410 Gone).
        let mut deployments: Vec<RoutedDeployment> = Vec::new();
        let mut unserved: Vec<RoutedDeployment> = Vec::new();
        for r in &rows {
            let id = r.text("id")?;
            let status = r.text("status")?;
            let retired = status == "retired";
            let ready = if retired { None } else { instances.remove(&id) };
            if ready.is_none() && !matches!(status.as_str(), "sleeping" | "waking" | "active" | "retired") {
                continue;
            }
            let d = RoutedDeployment {
                id,
                org: r.text("org")?,
                project: r.text("project")?,
                rate_limit: r
                    .opt_text("rate_limit")?
                    .and_then(|s| serde_json::from_str::<Option<RateLimit>>(&s).ok())
                    .flatten(),
                instances: Vec::new(),
                wake: ready.is_none() && !retired,
                gone: retired,
                served: parse_served(r.opt_text("served")?.as_deref()),
                skew_max_age_secs: skew_of(r.opt_text("skew_protection")?),
            };
            match ready {
                Some(mut ready) => {
                    ready.sort();
                    deployments.push(RoutedDeployment { instances: ready, ..d });
                }
                None => unserved.push(d),
            }
        }
        deployments.append(&mut unserved);
        let preview_hosts: HashSet<(String, String)> =
            preview_rows.iter().map(|r| Ok((r.text("label")?, r.text("project_id")?))).collect::<Result<_>>()?;
        let mut current = Vec::new();
        for r in project_rows {
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
        for r in domain_rows {
            domains.push((
                r.text("name")?,
                r.text("slug")?,
                r.text("project")?,
                r.parsed("environment", Environment::parse)?,
                r.int("verified")? != 0,
            ));
        }
        if only.is_some() {
            // Rollouts are few: kept to the projects asked here rather than in SQL.
            let names: HashSet<(&str, &str)> = current.iter().map(|c| (c.org.as_str(), c.project.as_str())).collect();
            canaries.retain(|c| names.contains(&(c.org.as_str(), c.project.as_str())));
            shadows.retain(|c| names.contains(&(c.org.as_str(), c.project.as_str())));
        }
        Ok(RoutingRows { deployments, current, domains, canaries, shadows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    /// A read of some projects searches by index only: its cost follows
    /// those projects, not how many instances the platform runs.
    #[tokio::test]
    async fn a_read_of_some_projects_goes_by_indexes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
        let sql = RoutingSql::new(Some(2));
        for (name, statement) in [
            ("deployments", &sql.deployments),
            ("instances", &sql.instances),
            ("preview hosts", &sql.preview_hosts),
            ("projects", &sql.projects),
            ("domains", &sql.domains),
        ] {
            let q = format!("EXPLAIN QUERY PLAN {statement}");
            let mut q = sqlx::query(&q);
            // Enough arguments for any of them; unused ones are ignored by the plan.
            let arity = statement.matches('$').count();
            for i in 0..arity {
                q = if i == 0 && name == "deployments" { q.bind(0i64) } else { q.bind(format!("p{i}")) };
            }
            let plan: Vec<String> = q
                .fetch_all(&store.reader)
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get::<String, _>("detail").unwrap())
                .collect();
            assert!(!plan.iter().any(|step| step.starts_with("SCAN")), "{name} scans a table: {plan:#?}");
        }
    }
}
