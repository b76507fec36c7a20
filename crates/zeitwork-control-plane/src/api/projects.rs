//! Projects and what hangs off them: env vars, domains, deployments.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use zeitwork_api_types::validate::{self, ValidationError, ENV_VARS_MAX};
use zeitwork_api_types::{
    CreateDeployment, CreateDomain, CreateProject, Deployment, DeploymentStatus, Domain, EnvVar, Environment,
    PatchProject, Project, PutEnvVar, Resources, Role,
};
use zeitwork_store::{nanoid, DeploymentFilter, NewDeployment, NewProject};

use super::{created, listing, page};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;

const DEFAULT_RESOURCES: Resources = Resources { vcpu: 1, memory: 256 };

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ProjectQuery {
    /// Only projects of this organisation.
    org: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// List the projects the token can see.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects", params(ProjectQuery), responses((status = 200, body = Vec<Project>)))]
pub async fn list_projects(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ProjectQuery>,
) -> ApiResult<Response> {
    let visible = caller.visible_orgs();
    Ok(listing(s.store.list_projects(q.org.as_deref(), visible.as_deref(), &page(q.limit, q.cursor)?).await?))
}

/// Create a project (Developer).
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn create_project(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<CreateProject>,
) -> ApiResult<Response> {
    validate::dns_label("org", &b.org)?;
    let target = format!("{}/{}", b.org, b.name);
    s.require_role(&caller, &b.org, Role::Developer, "project.create", &target).await?;
    b.validate()?;
    if let Some(t) = &b.tag_pattern {
        super::builds::tag_regex(t)?;
    }
    let new = NewProject {
        org: b.org.clone(),
        name: b.name.clone(),
        github_repo: b.github_repo,
        branch: b.branch.unwrap_or_else(|| "main".into()),
        auto_deploy: b.auto_deploy.unwrap_or(false),
        port: b.port.unwrap_or(8080),
        resources: b.resources.unwrap_or(DEFAULT_RESOURCES),
        instances_per_region: b.instances_per_region.unwrap_or(s.config.default_instances_per_region),
        regions: b.regions,
        image_template: b.image_template,
        rate_limit: b.rate_limit,
        sleep_after_secs: b.sleep_after_secs.unwrap_or(zeitwork_api_types::DEFAULT_SLEEP_AFTER_SECS),
        retain_deployments: b.retain_deployments.unwrap_or(zeitwork_api_types::DEFAULT_RETAIN_DEPLOYMENTS),
        scaling: b.scaling,
        staging_branch: b.staging_branch,
        tag_pattern: b.tag_pattern,
        build: b.build.unwrap_or_default(),
        auto_rollback: b.auto_rollback.unwrap_or_default(),
        rollout: b.rollout,
        shadow: b.shadow,
    };
    let audit = caller.audit("project.create", &target).org(&b.org).project(&b.name);
    Ok(created(s.store.create_project(&new, &audit).await?))
}

/// Show a project.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}", tag = "projects",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_project(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Project>> {
    s.require_role(&caller, &org, Role::Guest, "project.show", &format!("{org}/{name}")).await?;
    Ok(Json(s.store.get_project(&org, &name).await?))
}

/// Change any subset of a project's settings (Developer).
#[utoipa::path(patch, path = "/api/v1/projects/{org}/{project}", tag = "projects",
    params(("org" = String, Path), ("project" = String, Path)), request_body = PatchProject,
    responses((status = 200, body = Project), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn patch_project(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    JsonBody(patch): JsonBody<PatchProject>,
) -> ApiResult<Json<Project>> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Developer, "project.update", &target).await?;
    patch.validate()?;
    if let Some(Some(t)) = &patch.tag_pattern {
        super::builds::tag_regex(t)?;
    }
    let detail = serde_json::to_value(&patch).unwrap_or_default();
    let audit = caller.audit("project.update", &target).org(&org).project(&name).detail(detail);
    let before = s.store.get_project(&org, &name).await?;
    let after = s.store.update_project(&org, &name, &patch, &audit).await?;
    if after.resources != before.resources {
        roll_over(&s, &caller, &after).await?;
    }
    Ok(Json(after))
}

/// New resources take effect by a new deployment of each environment's
/// active image: it starts with them, and traffic moves only once it is ready
/// (no failed requests); the old one goes to standby as after any deploy.
async fn roll_over(s: &AppState, caller: &Caller, p: &Project) -> ApiResult<()> {
    for (env, id) in &p.current_deployment {
        let Some(env) = Environment::parse(env) else { continue };
        let current = s.store.get_deployment(id).await?;
        let image = match &current.image_digest {
            Some(d) => format!("{}@{d}", current.image.split('@').next().unwrap_or(&current.image)),
            None => current.image.clone(),
        };
        let mut new = new_deployment(s, p, env, image, caller.actor());
        new.commit_sha = current.commit_sha.clone();
        new.commit_message = current.commit_message.clone();
        new.instances_per_region = current.instances_per_region;
        let audit = caller
            .audit("deployment.create", &new.id)
            .org(&p.org)
            .project(&p.name)
            .detail(serde_json::json!({"reason": "resources changed", "replaces": id, "resources": p.resources}));
        let d = s.store.create_deployment(&new, &audit).await?;
        tracing::info!(deployment = %d.id, replaces = %id, "resources changed: rolling over to a new deployment");
    }
    s.changed();
    Ok(())
}

/// Delete a project, its env vars and domains (Admin); 409 while instances run.
#[utoipa::path(delete, path = "/api/v1/projects/{org}/{project}", tag = "projects",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn delete_project(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Admin, "project.delete", &target).await?;
    s.store.delete_project(&org, &name, &caller.audit("project.delete", &target).org(&org).project(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ env vars

fn env_context(project_id: &str, key: &str) -> String {
    format!("env:{project_id}:{key}")
}

async fn env_response(s: &AppState, caller: &Caller, org: &str, project_id: &str) -> ApiResult<Vec<EnvVar>> {
    let show = caller.sees_secrets_of(org);
    let stored = s.store.list_env(project_id).await?;
    stored
        .into_iter()
        .map(|v| {
            let value = if show {
                Some(s.cipher.decrypt(&env_context(project_id, &v.key), &v.value_enc).map_err(|e| {
                    tracing::error!(key = %v.key, error = %e, "cannot decrypt an env var");
                    ApiError::Internal
                })?)
            } else {
                None
            };
            Ok(EnvVar { key: v.key, redacted: value.is_none(), value, updated_at: v.updated_at })
        })
        .collect()
}

/// List env vars; Guests and read-only tokens see names only.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/env", tag = "env",
    params(("org" = String, Path), ("project" = String, Path)), responses((status = 200, body = Vec<EnvVar>)))]
pub async fn list_env(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<EnvVar>>> {
    s.require_role(&caller, &org, Role::Guest, "env.list", &format!("{org}/{name}")).await?;
    let p = s.store.get_project(&org, &name).await?;
    Ok(Json(env_response(&s, &caller, &org, &p.id).await?))
}

/// Replace every env var of a project with the given `{"KEY": "value"}` map (Developer).
#[utoipa::path(put, path = "/api/v1/projects/{org}/{project}/env", tag = "env",
    params(("org" = String, Path), ("project" = String, Path)), request_body = BTreeMap<String, String>,
    responses((status = 200, body = Vec<EnvVar>), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn replace_env(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    JsonBody(vars): JsonBody<BTreeMap<String, String>>,
) -> ApiResult<Json<Vec<EnvVar>>> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Developer, "env.replace", &target).await?;
    if vars.len() > ENV_VARS_MAX {
        return Err(ValidationError::new("env", format!("at most {ENV_VARS_MAX} variables per project")).into());
    }
    for (k, v) in &vars {
        validate::env_key(k, k)?;
        validate::env_value(k, v)?;
    }
    let p = s.store.get_project(&org, &name).await?;
    let enc: Vec<(String, String)> =
        vars.iter().map(|(k, v)| (k.clone(), s.cipher.encrypt(&env_context(&p.id, k), v))).collect();
    let keys: Vec<&String> = vars.keys().collect();
    let audit =
        caller.audit("env.replace", &target).org(&org).project(&name).detail(serde_json::json!({ "keys": keys }));
    s.store.replace_env(&p.id, &enc, &audit).await?;
    Ok(Json(env_response(&s, &caller, &org, &p.id).await?))
}

/// Set one env var (Developer); 201 when new.
#[utoipa::path(put, path = "/api/v1/projects/{org}/{project}/env/{key}", tag = "env",
    params(("org" = String, Path), ("project" = String, Path), ("key" = String, Path)), request_body = PutEnvVar,
    responses((status = 201, body = EnvVar), (status = 200, body = EnvVar), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn put_env(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name, key)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<PutEnvVar>,
) -> ApiResult<Response> {
    let target = format!("{org}/{name}/{key}");
    s.require_role(&caller, &org, Role::Developer, "env.set", &target).await?;
    validate::env_key("key", &key)?;
    validate::env_value("value", &body.value)?;
    let p = s.store.get_project(&org, &name).await?;
    let enc = s.cipher.encrypt(&env_context(&p.id, &key), &body.value);
    let audit = caller.audit("env.set", &target).org(&org).project(&name);
    let new = s.store.put_env(&p.id, &key, &enc, ENV_VARS_MAX, &audit).await?;
    let var = env_response(&s, &caller, &org, &p.id)
        .await?
        .into_iter()
        .find(|v| v.key == key)
        .ok_or_else(|| ApiError::NotFound(format!("variable {key:?} vanished")))?;
    Ok(if new { created(var) } else { Json(var).into_response() })
}

/// Delete one env var (Developer).
#[utoipa::path(delete, path = "/api/v1/projects/{org}/{project}/env/{key}", tag = "env",
    params(("org" = String, Path), ("project" = String, Path), ("key" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_env(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let target = format!("{org}/{name}/{key}");
    s.require_role(&caller, &org, Role::Developer, "env.delete", &target).await?;
    let p = s.store.get_project(&org, &name).await?;
    s.store.delete_env(&p.id, &key, &caller.audit("env.delete", &target).org(&org).project(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ domains

/// List a project's custom domains.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/domains", tag = "domains",
    params(("org" = String, Path), ("project" = String, Path)), responses((status = 200, body = Vec<Domain>)))]
pub async fn list_domains(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Domain>>> {
    s.require_role(&caller, &org, Role::Guest, "domain.list", &format!("{org}/{name}")).await?;
    let p = s.store.get_project(&org, &name).await?;
    expire_domain_claims(&s).await?;
    Ok(Json(s.store.list_domains(&p.id).await?))
}

/// Removes the unverified domain claims older than `domain_claim_ttl_hours`
/// (the retention pass does too; here, so no request sees an expired one).
pub(crate) async fn expire_domain_claims(s: &AppState) -> ApiResult<()> {
    let ttl = i64::from(s.config.domain_claim_ttl_hours) * 3_600_000;
    let gone = s.store.expire_domain_claims(chrono::Utc::now().timestamp_millis() - ttl).await?;
    for (org, project, domain) in gone {
        tracing::info!(%org, %project, %domain, "an unverified domain claim expired");
    }
    Ok(())
}

/// Add a custom domain (Developer). A domain belongs to one project once
/// verified; until then another organisation may claim it too, and the first
/// to prove ownership (`verify`) takes it. 409 when it is verified elsewhere or
/// already claimed in this organisation.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/domains", tag = "domains",
    params(("org" = String, Path), ("project" = String, Path)), request_body = CreateDomain,
    responses((status = 201, body = Domain), (status = 400, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn create_domain(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<CreateDomain>,
) -> ApiResult<Response> {
    let target = body.name.clone();
    s.require_role(&caller, &org, Role::Developer, "domain.add", &target).await?;
    body.validate()?;
    let apps = &s.config.apps_domain;
    if body.name == *apps || body.name.ends_with(&format!(".{apps}")) {
        return Err(ValidationError::new(
            "name",
            format!("names under {apps} are the platform's own; use a domain you control"),
        )
        .into());
    }
    let p = s.store.get_project(&org, &name).await?;
    expire_domain_claims(&s).await?;
    let env = body.environment.unwrap_or(Environment::Production);
    let audit = caller.audit("domain.add", &target).org(&org).project(&name);
    Ok(created(s.store.create_domain(&p.id, &body.name, env, &audit).await?))
}

/// Remove a custom domain (Developer).
#[utoipa::path(delete, path = "/api/v1/projects/{org}/{project}/domains/{name}", tag = "domains",
    params(("org" = String, Path), ("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn delete_domain(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name, domain)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    s.require_role(&caller, &org, Role::Developer, "domain.delete", &domain).await?;
    let p = s.store.get_project(&org, &name).await?;
    s.store.delete_domain(&p.id, &domain, &caller.audit("domain.delete", &domain).org(&org).project(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ deployments

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeploymentQuery {
    org: Option<String>,
    project: Option<String>,
    status: Option<DeploymentStatus>,
    environment: Option<Environment>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// List deployments, newest first, filtered by org, project, status, environment.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", params(DeploymentQuery),
    responses((status = 200, body = Vec<Deployment>)))]
pub async fn list_deployments(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<DeploymentQuery>,
) -> ApiResult<Response> {
    let filter = DeploymentFilter {
        org: q.org,
        orgs_visible: caller.visible_orgs(),
        project: q.project,
        status: q.status,
        environment: q.environment,
    };
    Ok(listing(s.store.list_deployments(&filter, &page(q.limit, q.cursor)?).await?))
}

/// A new deployment record of `image` for `p`: id `<project>-<nanoid7>-<org>` and its URL.
pub(crate) fn new_deployment(
    s: &AppState,
    p: &Project,
    environment: Environment,
    image: String,
    created_by: String,
) -> NewDeployment {
    let id = format!("{}-{}-{}", p.name, nanoid(7), p.org);
    NewDeployment {
        url: s.config.app_url(&id),
        id,
        project_id: p.id.clone(),
        org: p.org.clone(),
        project: p.name.clone(),
        environment,
        image,
        commit_sha: None,
        commit_message: None,
        instances_per_region: p.instances_per_region,
        created_by: Some(created_by),
        pull_request: None,
        release_command: p.release_command.clone(),
        migration: false,
    }
}

/// Record a deployment of an image (Developer): 202, status `pending`.
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = CreateDeployment,
    responses((status = 202, body = Deployment), (status = 400, body = zeitwork_api_types::ApiError), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn create_deployment(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<CreateDeployment>,
) -> ApiResult<Response> {
    validate::dns_label("org", &b.org)?;
    let target = format!("{}/{}", b.org, b.project);
    s.require_role(&caller, &b.org, Role::Developer, "deployment.create", &target).await?;
    b.validate()?;
    let p = s.store.get_project(&b.org, &b.project).await?;
    if let Some(build) = &b.build {
        let mut new =
            new_deployment(&s, &p, b.environment.unwrap_or(Environment::Production), String::new(), caller.actor());
        release_settings(&mut new, &b);
        new.commit_sha = b.commit_sha.clone();
        new.commit_message = b.commit_message.clone();
        new.instances_per_region = b.instances_per_region.unwrap_or(p.instances_per_region);
        let d = super::builds::queue_upload_build(&s, &caller, &p, new, build).await?;
        if let Some(r) = &b.rollout {
            s.store.set_deployment_rollout(&d.id, r).await?;
        }
        if let Some(sh) = &b.shadow {
            s.store.set_deployment_shadow(&d.id, sh).await?;
        }
        return Ok((StatusCode::ACCEPTED, Json(d)).into_response());
    }
    super::images::check_archive_reference(&s, &b.org, &b.image).await?;
    let mut new =
        new_deployment(&s, &p, b.environment.unwrap_or(Environment::Production), b.image.clone(), caller.actor());
    release_settings(&mut new, &b);
    new.commit_sha = b.commit_sha.clone();
    new.commit_message = b.commit_message.clone();
    new.instances_per_region = b.instances_per_region.unwrap_or(p.instances_per_region);
    let audit = caller
        .audit("deployment.create", &new.id)
        .org(&p.org)
        .project(&p.name)
        .detail(serde_json::json!({"image": b.image, "environment": new.environment, "migration": new.migration}));
    let d = s.store.create_deployment(&new, &audit).await?;
    if let Some(r) = &b.rollout {
        s.store.set_deployment_rollout(&d.id, r).await?;
    }
    if let Some(sh) = &b.shadow {
        s.store.set_deployment_shadow(&d.id, sh).await?;
    }
    s.engine.notify_one();
    Ok((StatusCode::ACCEPTED, Json(d)).into_response())
}

/// A deploy request's own release command (`""`: none) overrides the project's.
fn release_settings(new: &mut NewDeployment, b: &CreateDeployment) {
    if let Some(c) = &b.release_command {
        new.release_command = Some(c.clone()).filter(|c| !c.trim().is_empty());
    }
    new.migration = b.migration;
}

/// Show a deployment.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_deployment(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Deployment>> {
    Ok(Json(readable_deployment(&s, &caller, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ProjectDeploymentQuery {
    status: Option<DeploymentStatus>,
    environment: Option<Environment>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// List a project's deployments, newest first.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/deployments", tag = "deployments",
    params(("org" = String, Path), ("project" = String, Path), ProjectDeploymentQuery),
    responses((status = 200, body = Vec<Deployment>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn list_project_deployments(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    QueryParams(q): QueryParams<ProjectDeploymentQuery>,
) -> ApiResult<Response> {
    s.require_role(&caller, &org, Role::Guest, "deployment.list", &format!("{org}/{name}")).await?;
    s.store.get_project(&org, &name).await?;
    let filter = DeploymentFilter {
        org: Some(org),
        orgs_visible: None,
        project: Some(name),
        status: q.status,
        environment: q.environment,
    };
    Ok(listing(s.store.list_deployments(&filter, &page(q.limit, q.cursor)?).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentQuery {
    /// Default `production`.
    environment: Option<Environment>,
}

/// The deployment serving an environment of a project.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/deployments/current", tag = "deployments",
    params(("org" = String, Path), ("project" = String, Path), EnvironmentQuery),
    responses((status = 200, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn current_deployment(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    QueryParams(q): QueryParams<EnvironmentQuery>,
) -> ApiResult<Json<Deployment>> {
    s.require_role(&caller, &org, Role::Guest, "deployment.show", &format!("{org}/{name}")).await?;
    let env = q.environment.unwrap_or(Environment::Production);
    let p = s.store.get_project(&org, &name).await?;
    let id = p
        .current_deployment
        .get(env.as_str())
        .ok_or_else(|| ApiError::NotFound(format!("{org}/{name} has no active {} deployment yet", env.as_str())))?;
    Ok(Json(s.store.get_deployment(id).await?))
}

/// Rollback target: a deployment id, or the previous one of the environment.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub to: Option<String>,
    pub environment: Option<Environment>,
    /// Roll back even past a deployment that migrated data.
    #[serde(default)]
    pub force: bool,
}

/// Route an environment back to an earlier deployment: at once while it is in
/// standby; a retired one is deployed again from its recorded image.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/rollback", tag = "deployments",
    params(("org" = String, Path), ("project" = String, Path)), request_body = RollbackRequest,
    responses((status = 200, body = Deployment), (status = 202, body = Deployment), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn rollback(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Developer, "deployment.rollback", &target).await?;
    let req: RollbackRequest =
        if body.is_empty() { RollbackRequest::default() } else { crate::extract::parse_json(&body)? };
    let env = req.environment.unwrap_or(Environment::Production);
    let p = s.store.get_project(&org, &name).await?;
    let current = p.current_deployment.get(env.as_str()).cloned();
    let to = match req.to {
        Some(id) => {
            let d = s.store.get_deployment(&id).await?;
            if d.org != org || d.project != name {
                return Err(ApiError::NotFound(format!("deployment {id:?} is not one of {org}/{name}")));
            }
            d
        }
        None => {
            let filter = DeploymentFilter {
                org: Some(org.clone()),
                project: Some(name.clone()),
                environment: Some(env),
                ..Default::default()
            };
            let list = s.store.list_deployments(&filter, &zeitwork_store::Page::first(100)).await?.items;
            list.into_iter()
                .find(|d| {
                    Some(&d.id) != current.as_ref()
                        && matches!(
                            d.status,
                            DeploymentStatus::Standby
                                | DeploymentStatus::Sleeping
                                | DeploymentStatus::Waking
                                | DeploymentStatus::Retired
                        )
                })
                .ok_or_else(|| {
                    ApiError::Conflict(format!("{target} has no earlier {} deployment to roll back to", env.as_str()))
                })?
        }
    };
    if Some(&to.id) == current.as_ref() {
        return Err(ApiError::Conflict(format!("{} already serves {}", to.id, env.as_str())));
    }
    let crossed = match &current {
        Some(from) => refuse_crossing_migration(&s, from, &to.id, env, req.force, "roll back").await?,
        None => None,
    };
    let audit = caller.audit("deployment.rollback", &to.id).org(&org).project(&name);
    let audit = match &crossed {
        Some(m) => audit.detail(serde_json::json!({"forced_past_migration": m})),
        None => audit,
    };
    match to.status {
        DeploymentStatus::Standby | DeploymentStatus::Active => {
            s.store.point_environment(&to.id, env, &audit).await?;
            s.changed();
            Ok(Json(s.store.get_deployment(&to.id).await?).into_response())
        }
        DeploymentStatus::Sleeping | DeploymentStatus::Waking => {
            // Woken first; the environment switches only once it is ready, so nothing is lost meanwhile.
            let audit =
                audit.detail(serde_json::json!({"environment": env, "wakes": true, "forced_past_migration": crossed}));
            s.store.wake_deployment(&to.id, Some(env), &audit).await?;
            s.changed();
            Ok((StatusCode::ACCEPTED, Json(s.store.get_deployment(&to.id).await?)).into_response())
        }
        DeploymentStatus::Retired => {
            // Its instances are gone: deploy the recorded image (by digest when known) again.
            let image = match &to.image_digest {
                Some(d) => format!("{}@{d}", to.image.split('@').next().unwrap_or(&to.image)),
                None => to.image.clone(),
            };
            let mut new = new_deployment(&s, &p, env, image, caller.actor());
            new.commit_sha = to.commit_sha.clone();
            new.commit_message = to.commit_message.clone();
            new.instances_per_region = to.instances_per_region;
            // Its release ran when it was first deployed; going back runs nothing.
            new.release_command = None;
            let detail = serde_json::json!({"rollback_of": to.id, "forced_past_migration": crossed});
            let d = s.store.create_deployment(&new, &audit.detail(detail)).await?;
            Ok((StatusCode::ACCEPTED, Json(d)).into_response())
        }
        other => Err(ApiError::Conflict(format!("{} is {} and cannot serve traffic", to.id, other.as_str()))),
    }
}

/// From which environment to which.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub from: Environment,
    pub to: Environment,
    /// Promote even when that goes back past a deployment of `to` that migrated data.
    #[serde(default)]
    pub force: bool,
}

/// Refuses (409) to point `env` from `from` back to `to` past a deployment
/// that migrated data, unless `force`; returns the deployment crossed.
async fn refuse_crossing_migration(
    s: &AppState,
    from: &str,
    to: &str,
    env: Environment,
    force: bool,
    verb: &str,
) -> ApiResult<Option<String>> {
    let Some(m) = s.store.rollback_crosses_migration(from, to, env).await? else { return Ok(None) };
    if force {
        return Ok(Some(m.id));
    }
    Err(ApiError::Conflict(format!(
        "{} migrated data and {to} is older: it may not understand the migrated data. \
         Check that it does, then pass --force (API: \"force\": true) to {verb} anyway",
        m.id
    )))
}

/// Point one environment at the deployment active in another, with no rebuild.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/promote", tag = "deployments",
    params(("org" = String, Path), ("project" = String, Path)), request_body = PromoteRequest,
    responses((status = 200, body = Deployment), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn promote(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
    JsonBody(req): JsonBody<PromoteRequest>,
) -> ApiResult<Json<Deployment>> {
    let target = format!("{org}/{name}");
    s.require_role(&caller, &org, Role::Developer, "deployment.promote", &target).await?;
    if req.from == req.to {
        return Err(ValidationError::new("to", "promote to another environment than `from`").into());
    }
    let p = s.store.get_project(&org, &name).await?;
    let id = p.current_deployment.get(req.from.as_str()).ok_or_else(|| {
        ApiError::Conflict(format!("{target} has no active {} deployment to promote", req.from.as_str()))
    })?;
    let crossed = match p.current_deployment.get(req.to.as_str()) {
        Some(from) => refuse_crossing_migration(&s, from, id, req.to, req.force, "promote").await?,
        None => None,
    };
    let audit = caller
        .audit("deployment.promote", id)
        .org(&org)
        .project(&name)
        .detail(serde_json::json!({"from": req.from, "to": req.to, "forced_past_migration": crossed}));
    s.store.point_environment(id, req.to, &audit).await?;
    s.changed();
    Ok(Json(s.store.get_deployment(id).await?))
}

/// The instances of a deployment.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/instances", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = Vec<zeitwork_api_types::Instance>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn deployment_instances(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<zeitwork_api_types::Instance>>> {
    if !matches!(caller.scope, zeitwork_api_types::TokenScope::Cluster { .. }) {
        readable_deployment(&s, &caller, &id).await?;
    }
    Ok(Json(s.store.list_instances(&id).await?))
}

/// Retire a deployment that serves no environment, for good: its instances stop, its URL answers 410.
#[utoipa::path(delete, path = "/api/v1/deployments/{id}", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 409, body = zeitwork_api_types::ApiError, description = "it serves an environment")))]
pub async fn delete_deployment(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Deployment>> {
    let d = readable_deployment(&s, &caller, &id).await?;
    s.require_role(&caller, &d.org, Role::Developer, "deployment.delete", &id).await?;
    let audit = caller.audit("deployment.delete", &id).org(&d.org).project(&d.project);
    let d = s.store.retire_deployment(&id, &format!("deleted by {}", caller.actor()), &audit).await?;
    s.changed();
    Ok(Json(d))
}

/// Wake a sleeping deployment (edges call this on a request for it): it
/// goes `waking`, one instance per region starts, and it serves until idle again.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/wake", tag = "deployments", params(("id" = String, Path)),
    responses((status = 202, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 410, body = zeitwork_api_types::ApiError, description = "it was retired")))]
pub async fn wake_deployment(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let by_edge = matches!(
        caller.scope,
        zeitwork_api_types::TokenScope::Cluster { role: zeitwork_api_types::ClusterRole::EdgeProxy }
    );
    let d = if by_edge { s.store.get_deployment(&id).await? } else { readable_deployment(&s, &caller, &id).await? };
    if !by_edge {
        s.require_role(&caller, &d.org, Role::Developer, "deployment.wake", &id).await?;
    }
    match d.status {
        DeploymentStatus::Retired => {
            return Err(ApiError::Gone(format!("{id} was retired; deploy again or roll back to it")))
        }
        DeploymentStatus::Failed => return Err(ApiError::Conflict(format!("{id} failed and cannot serve"))),
        _ => {}
    }
    let audit = caller.audit("deployment.wake", &id).org(&d.org).project(&d.project);
    if d.status == DeploymentStatus::Active {
        // Scaled to zero (or every instance lost): wanted again.
        if s.store.note_demand(&id).await? {
            s.changed();
        }
    } else if s.store.wake_deployment(&id, None, &audit).await? {
        tracing::info!(deployment = %id, by = %caller.name, "waking a sleeping deployment");
        s.changed();
    }
    Ok((StatusCode::ACCEPTED, Json(s.store.get_deployment(&id).await?)).into_response())
}

/// Put a deployment that serves no environment to sleep now: its instances
/// stop and free their capacity; its URL keeps working and wakes it.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/sleep", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 409, body = zeitwork_api_types::ApiError, description = "it serves an environment, or is not running")))]
pub async fn sleep_deployment(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Deployment>> {
    let d = readable_deployment(&s, &caller, &id).await?;
    s.require_role(&caller, &d.org, Role::Developer, "deployment.sleep", &id).await?;
    if d.status == DeploymentStatus::Sleeping {
        return Ok(Json(d));
    }
    let audit = caller.audit("deployment.sleep", &id).org(&d.org).project(&d.project);
    if !s.store.sleep_deployment(&id, &format!("put to sleep by {}", caller.actor()), &audit).await? {
        return Err(ApiError::Conflict(format!(
            "{id} is {}; only a deployment no environment points at (standby) can sleep",
            d.status.as_str()
        )));
    }
    s.changed();
    Ok(Json(s.store.get_deployment(&id).await?))
}

/// Stop a deployment that serves no environment: its instances stop and it is retired.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/stop", tag = "deployments", params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = zeitwork_api_types::ApiError),
        (status = 409, body = zeitwork_api_types::ApiError, description = "it serves an environment")))]
pub async fn stop_deployment(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Deployment>> {
    let d = readable_deployment(&s, &caller, &id).await?;
    s.require_role(&caller, &d.org, Role::Developer, "deployment.stop", &id).await?;
    let audit = caller.audit("deployment.stop", &id).org(&d.org).project(&d.project);
    let d = s.store.stop_deployment(&id, &audit).await?;
    s.changed();
    Ok(Json(d))
}

/// Which deployment serves which host of a project, as the edges see it now.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/routing", tag = "projects",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 200, body = Vec<zeitwork_api_types::ProjectRoute>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn project_routing(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<zeitwork_api_types::ProjectRoute>>> {
    readable_project(&s, &caller, &org, &name).await?;
    let routes = s
        .routing
        .routes_of(&org, &name)
        .iter()
        .map(|r| zeitwork_api_types::ProjectRoute {
            host: r.host.clone(),
            deployment: r.deployment.clone(),
            environment: r.environment,
            instances: r.instances.len() as u32,
        })
        .collect();
    Ok(Json(routes))
}

/// Per-instance health of the deployments serving a project's environments.
#[utoipa::path(get, path = "/api/v1/projects/{org}/{project}/health", tag = "projects",
    params(("org" = String, Path), ("project" = String, Path)),
    responses((status = 200, body = Vec<zeitwork_api_types::EnvironmentHealth>), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn project_health(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<zeitwork_api_types::EnvironmentHealth>>> {
    let p = readable_project(&s, &caller, &org, &name).await?;
    let mut out = Vec::new();
    for (env, id) in &p.current_deployment {
        let d = s.store.get_deployment(id).await?;
        let instances: Vec<_> = s
            .store
            .list_instances(id)
            .await?
            .into_iter()
            .filter(|i| !matches!(i.status, zeitwork_api_types::InstanceStatus::Stopped))
            .collect();
        let ready = instances.iter().filter(|i| i.status == zeitwork_api_types::InstanceStatus::Ready).count() as u32;
        let total = instances.len() as u32;
        let health = match (ready, total) {
            (r, t) if r == t && t > 0 => "healthy",
            (0, _) => "down",
            _ => "degraded",
        };
        out.push(zeitwork_api_types::EnvironmentHealth {
            environment: Environment::parse(env).unwrap_or(Environment::Production),
            deployment: id.clone(),
            status: d.status,
            health: health.into(),
            ready,
            total,
            instances,
        });
    }
    Ok(Json(out))
}

/// A project the caller's org role lets it see; others' are "not found", as if absent.
pub(crate) async fn readable_project(s: &AppState, caller: &Caller, org: &str, name: &str) -> ApiResult<Project> {
    if caller.role_in(org).is_none() {
        return Err(ApiError::NotFound(format!("project {org}/{name} does not exist")));
    }
    Ok(s.store.get_project(org, name).await?)
}

/// A deployment of an org the caller belongs to; others' are "not found", as if absent.
pub(crate) async fn readable_deployment(s: &AppState, caller: &Caller, id: &str) -> ApiResult<Deployment> {
    let d = s.store.get_deployment(id).await?;
    if caller.role_in(&d.org).is_none() {
        return Err(ApiError::NotFound(format!("deployment {id:?} does not exist")));
    }
    Ok(d)
}
