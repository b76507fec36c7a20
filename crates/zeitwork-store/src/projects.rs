//! Projects, their environment variables and custom domains, and the host
//! labels reserved under the apps domain.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use zeitwork_api_types::{Domain, Environment, PatchProject, Project, RateLimit, Resources};

use crate::events::append_event;
use crate::{
    in_list, is_fk_violation, is_unique_violation, nanoid, now_ms, ts, Arg, Audit, Listing, Page, Result, RowExt, Sql,
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
    pub auto_rollback: zeitwork_api_types::AutoRollback,
    pub rollout: Option<zeitwork_api_types::Rollout>,
    pub shadow: Option<zeitwork_api_types::Shadow>,
}

impl NewProject {
    /// A project `name` of `org` with the settings a create request that
    /// names none gets: branch `main`, port 8080, 1 vCPU and 256 MiB, one
    /// instance per region in every region, no repository, sleep after 15
    /// minutes idle, 20 deployments kept.
    pub fn named(org: &str, name: &str) -> NewProject {
        NewProject {
            org: org.into(),
            name: name.into(),
            github_repo: None,
            branch: "main".into(),
            auto_deploy: false,
            port: 8080,
            resources: Resources { vcpu: 1, memory: 256 },
            instances_per_region: 1,
            regions: None,
            image_template: None,
            rate_limit: None,
            sleep_after_secs: zeitwork_api_types::DEFAULT_SLEEP_AFTER_SECS,
            retain_deployments: zeitwork_api_types::DEFAULT_RETAIN_DEPLOYMENTS,
            scaling: None,
            staging_branch: None,
            tag_pattern: None,
            build: Default::default(),
            auto_rollback: Default::default(),
            rollout: None,
            shadow: None,
        }
    }
}

pub(crate) const PROJECT_SELECT: &str = "SELECT p.id, o.slug AS org_slug, p.name, p.github_repo, p.branch, p.auto_deploy, \
    p.port, p.vcpu, p.memory, p.instances_per_region, p.regions, p.image_template, p.rate_limit, \
    p.sleep_after_secs, p.retain_deployments, p.scaling, p.staging_branch, p.tag_pattern, p.build, p.current_deployments, p.created_at, p.updated_at, p.skew_protection, p.release_command, p.auto_rollback, p.rollout, p.shadow, p.egress FROM projects p JOIN orgs o ON o.id = p.org_id WHERE 1 = 1";

pub(crate) fn project_from(row: &AnyRow) -> Result<Project> {
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
        skew_protection: from_json("skew_protection")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column skew_protection: {e}")))?,
        release_command: row.opt_text("release_command")?.filter(|c| !c.is_empty()),
        auto_rollback: from_json("auto_rollback")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column auto_rollback: {e}")))?
            .unwrap_or_default(),
        rollout: from_json("rollout")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column rollout: {e}")))?,
        shadow: from_json("shadow")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column shadow: {e}")))?,
        egress: from_json("egress")?
            .filter(|v| !v.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column egress: {e}")))?,
    })
}

/// An environment variable as stored: the value is ciphertext.
#[derive(Debug, Clone)]
pub struct StoredEnvVar {
    pub key: String,
    pub value_enc: String,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

fn domain_from(row: &AnyRow) -> Result<Domain> {
    let name = row.text("name")?;
    let verified = row.int("verified")? != 0;
    let challenge = row.opt_text("challenge")?;
    let record = challenge.as_ref().map(|_| zeitwork_api_types::domain_challenge_record(&name));
    let message = (!verified).then(|| match (&record, &challenge) {
        (Some(record), Some(value)) => format!(
            "not routed yet: add a TXT record {record} with the value {value}, point {name} at the platform \
             (a CNAME to the project's address), then verify it (zeitwork domains verify)"
        ),
        _ => format!("not routed yet: point {name} at the platform, then verify it (zeitwork domains verify)"),
    });
    Ok(Domain {
        org: row.text("org_slug")?,
        project: row.text("project_name")?,
        environment: row.parsed("environment", Environment::parse)?,
        verified,
        certificate: row.text("certificate")?,
        created_at: ts(row.int("created_at")?),
        status: if verified { "verified" } else { "unverified" }.into(),
        txt_record: record,
        txt_value: challenge,
        message,
        name,
    })
}

impl Store {
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
             sleep_after_secs, retain_deployments, scaling, staging_branch, tag_pattern, build, auto_rollback, rollout, shadow) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, '{}', $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)",
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
        .bind(serde_json::to_string(&p.auto_rollback).unwrap_or_default())
        .bind(p.rollout.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()))
        .bind(p.shadow.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()))
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
        self.commit_announcing(tx, crate::Change::Projects(vec![id])).await?;
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
        if let Some(v) = &patch.skew_protection {
            set_opt(&mut q, "skew_protection", &v.map(|sp| serde_json::to_string(&sp).unwrap_or_default()));
        }
        if let Some(v) = &patch.release_command {
            set_opt(&mut q, "release_command", &v.clone().filter(|c| !c.trim().is_empty()));
        }
        if let Some(v) = &patch.auto_rollback {
            set(&mut q, "auto_rollback", Arg::Text(serde_json::to_string(v).unwrap_or_default()));
        }
        if let Some(v) = &patch.rollout {
            set_opt(&mut q, "rollout", &v.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()));
        }
        if let Some(v) = &patch.egress {
            set_opt(&mut q, "egress", &v.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()));
        }
        if let Some(v) = &patch.shadow {
            set_opt(&mut q, "shadow", &v.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()));
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
        self.commit_announcing(tx, crate::Change::Projects(vec![current.id.clone()])).await?;
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
        self.commit_announcing(tx, crate::Change::Anything).await?;
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

    /// [`Store::list_env`] of several projects at once, by project id (one without variables is absent).
    pub async fn list_envs(
        &self,
        project_ids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<StoredEnvVar>>> {
        let mut out: std::collections::HashMap<String, Vec<StoredEnvVar>> = std::collections::HashMap::new();
        let sql = |p: &str| {
            format!("SELECT project_id, key, value_enc, updated_at FROM env_vars WHERE project_id IN ({p}) ORDER BY project_id, key")
        };
        crate::for_each_chunk(&self.reader, project_ids, sql, |r| {
            out.entry(r.text("project_id")?).or_default().push(StoredEnvVar {
                key: r.text("key")?,
                value_enc: r.text("value_enc")?,
                updated_at: ts(r.int("updated_at")?),
            });
            Ok(())
        })
        .await?;
        Ok(out)
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
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
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
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
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
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
        Ok(())
    }

    // ============================================================== domains

    pub async fn list_domains(&self, project_id: &str) -> Result<Vec<Domain>> {
        let rows = sqlx::query(
            "SELECT d.name, d.environment, d.verified, d.created_at, d.challenge, COALESCE(c.state, d.certificate) AS certificate, \
             o.slug AS org_slug, p.name AS project_name FROM domains d JOIN projects p ON p.id = d.project_id \
             JOIN orgs o ON o.id = p.org_id LEFT JOIN certificates c ON c.domain = d.name WHERE d.project_id = $1 ORDER BY d.name",
        )
        .bind(project_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(domain_from).collect()
    }

    /// Claims `name` for the project, unverified. Refused (conflict) while the
    /// name is verified anywhere, or claimed by a project of the same
    /// organisation; another organisation's unverified claim does not block
    /// it: the first to prove ownership gets the name ([`Store::verify_domain`]).
    pub async fn create_domain(&self, project_id: &str, name: &str, env: Environment, audit: &Audit) -> Result<Domain> {
        let mut tx = self.writer.begin().await?;
        let holders = sqlx::query(
            "SELECT d.verified, d.project_id, \
             CAST(CASE WHEN p.org_id = (SELECT org_id FROM projects WHERE id = $2) THEN 1 ELSE 0 END AS BIGINT) AS same_org \
             FROM domains d JOIN projects p ON p.id = d.project_id WHERE d.name = $1",
        )
        .bind(name)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        for h in &holders {
            let same_org = h.int("same_org")? != 0;
            if h.int("verified")? != 0 {
                return Err(StoreError::Conflict(format!(
                    "domain {name:?} is verified by another project; its owner must remove it first"
                )));
            }
            if same_org || h.text("project_id")? == project_id {
                return Err(StoreError::Conflict(format!(
                    "domain {name:?} is already claimed by a project of this organisation"
                )));
            }
        }
        let res = sqlx::query(
            "INSERT INTO domains (name, project_id, environment, verified, certificate, created_at, challenge) \
             VALUES ($1, $2, $3, 0, 'none', $4, $5)",
        )
        .bind(name)
        .bind(project_id)
        .bind(env.as_str())
        .bind(now_ms())
        .bind(format!("zeitwork-verify-{}", crate::nanoid(32)))
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("domain {name:?} is already claimed by this project")))
            }
            r => r.map_err(|e| fk_to_not_found(e, "project was deleted"))?,
        };
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
        self.list_domains(project_id)
            .await?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("domain {name:?} vanished")))
    }

    /// Removes the unverified claims made before `before_ms` (they expired),
    /// each with an audit event for its project; answers what went as
    /// (org, project, domain).
    pub async fn expire_domain_claims(&self, before_ms: i64) -> Result<Vec<(String, String, String)>> {
        let select = "SELECT d.name, d.project_id, o.slug, p.name AS project_name FROM domains d \
             JOIN projects p ON p.id = d.project_id JOIN orgs o ON o.id = p.org_id \
             WHERE d.verified = 0 AND d.created_at < $1";
        // Most passes find nothing: only then is the writer taken.
        if sqlx::query(select).bind(before_ms).fetch_optional(&self.reader).await?.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(select).bind(before_ms).fetch_all(&mut *tx).await?;
        let mut gone = Vec::new();
        for r in &rows {
            let (name, project_id) = (r.text("name")?, r.text("project_id")?);
            let (org, project) = (r.text("slug")?, r.text("project_name")?);
            sqlx::query("DELETE FROM domains WHERE name = $1 AND project_id = $2 AND verified = 0")
                .bind(&name)
                .bind(&project_id)
                .execute(&mut *tx)
                .await?;
            let audit = Audit::new("system", "domain.expire", name.clone())
                .org(&org)
                .project(&project)
                .detail(serde_json::json!({"reason": "the claim was not verified in time"}));
            append_event(&mut tx, &audit, "ok").await?;
            gone.push((org, project, name));
        }
        let changed = if gone.is_empty() { vec![] } else { vec![crate::Change::Anything] };
        self.commit_announcing_all(tx, changed).await?;
        Ok(gone)
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
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
        Ok(())
    }
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

fn fk_to_not_found(e: sqlx::Error, what: &str) -> StoreError {
    if is_fk_violation(&e) {
        StoreError::NotFound(what.to_owned())
    } else {
        e.into()
    }
}
