//! GitHub intake. A repository's webhook is configured with its secret
//! (stored encrypted); GitHub posts events to `POST /api/v1/github/webhook`,
//! which verifies `X-Hub-Signature-256` (HMAC-SHA256 of the raw body,
//! compared in constant time) before reading anything from the payload it
//! acts on, records every delivery, answers `ping`, and turns a `push` to a
//! project's branch (production), staging branch or a matching tag, and a
//! pull request (a preview at `<project>-pr-<n>-<org>`), into a deployment:
//! of the project's image template, or built from the pushed commit.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use utoipa::IntoParams;
use zeitwork_api_types::{
    CreateGithubHook, Environment, GithubDelivery, GithubHook, GithubTrigger, Project, Role, TokenScope,
    ValidationError,
};

use zeitwork_store::StoredHook;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;

/// GitHub sends payloads of up to 25 MB.
pub const MAX_PAYLOAD: usize = 25 * 1024 * 1024;
pub const WEBHOOK_PATH: &str = "/api/v1/github/webhook";

fn owner_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 39 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn repo_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn full_name(org: &str, repo: &str) -> Result<String, ApiError> {
    if !owner_ok(org) {
        return Err(ValidationError::new("org", format!("{org:?} is not a GitHub owner name")).into());
    }
    if !repo_name_ok(repo) {
        return Err(ValidationError::new("repo", format!("{repo:?} is not a GitHub repository name")).into());
    }
    Ok(format!("{org}/{repo}"))
}

/// The organisation a webhook call acts for: the one named, else the org
/// token's own, else (platform admins) the only organisation with a project
/// deploying `repo`. The caller needs `min` in it.
async fn hook_org(
    s: &AppState,
    caller: &Caller,
    named: Option<&str>,
    repo: &str,
    min: Role,
    action: &str,
) -> ApiResult<String> {
    let org = match (named, &caller.scope) {
        (Some(o), _) => {
            zeitwork_api_types::validate::dns_label("project_org", o)?;
            o.to_owned()
        }
        (None, TokenScope::Org { org, .. }) => org.clone(),
        (None, _) => {
            let mut orgs: Vec<String> =
                s.store.projects_of_repo(repo, None).await?.into_iter().map(|p| p.org).collect();
            orgs.sort();
            orgs.dedup();
            match orgs.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(ValidationError::new(
                        "project_org",
                        format!("no project deploys {repo}; set github_repo on one, or name its organisation"),
                    )
                    .into())
                }
                _ => {
                    return Err(ValidationError::new(
                        "project_org",
                        format!("projects of {} deploy {repo}; name the organisation", orgs.join(", ")),
                    )
                    .into())
                }
            }
        }
    };
    s.require_role(caller, &org, min, action, repo).await?;
    Ok(org)
}

fn hook_view(h: &zeitwork_store::StoredHook) -> GithubHook {
    GithubHook {
        project_org: h.org.clone(),
        repo: h.repo.clone(),
        events: h.events.clone(),
        path: WEBHOOK_PATH.into(),
        token: h.token_enc.is_some(),
        created_at: h.created_at,
    }
}

/// The key a webhook secret is encrypted under: bound to its organisation and repository.
fn secret_context(org: &str, repo: &str) -> String {
    format!("github:{org}:{repo}")
}

/// The key a repository token is encrypted under.
pub fn token_context(org: &str, repo: &str) -> String {
    format!("github-token:{org}:{repo}")
}

/// Configure an organisation's webhook of a GitHub repository (Admin; the secret is stored encrypted).
///
/// Each organisation keeps its own registration: registering a repository
/// never replaces another organisation's, and a delivery acts only for the
/// organisation whose secret signed it.
#[utoipa::path(post, path = "/api/v1/github/webhooks", tag = "github", request_body = CreateGithubHook,
    responses((status = 201, body = GithubHook), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn create_hook(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<CreateGithubHook>,
) -> ApiResult<Response> {
    let repo = full_name(&b.org, &b.repo)?;
    let org = hook_org(&s, &caller, b.project_org.as_deref(), &repo, Role::Admin, "github.hook.create").await?;
    s.store.get_org(&org).await?;
    let mut events = if b.events.is_empty() { vec!["push".to_owned()] } else { b.events.clone() };
    events.sort();
    events.dedup();
    if let Some(e) = events.iter().find(|e| !matches!(e.as_str(), "push" | "pull_request" | "ping")) {
        return Err(ValidationError::new(
            "events",
            format!("{e:?} is not handled; use push and pull_request (ping is always answered)"),
        )
        .into());
    }
    if let Some(t) = &b.token {
        if t.len() < 8 || t.len() > 1024 || t.bytes().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
            return Err(ValidationError::new(
                "token",
                "give the repository token as GitHub shows it (8 to 1024 characters, no spaces)",
            )
            .into());
        }
    }
    if b.secret.len() < 16 || b.secret.len() > 256 {
        return Err(ValidationError::new("secret", "use 16 to 256 characters (the secret set on GitHub)").into());
    }
    // Two registrations of one repository with one secret could not be told apart by signature.
    for other in s.store.github_hooks_of_repo(&repo).await?.iter().filter(|h| h.org != org) {
        let theirs = s
            .cipher
            .decrypt(&secret_context(&other.org, &other.repo), &other.secret_enc)
            .map_err(|e| ApiError::internal("decrypting a webhook secret", e))?;
        if subtle_eq(theirs.as_bytes(), b.secret.as_bytes()) {
            return Err(ValidationError::new("secret", "choose another secret for this webhook").into());
        }
    }
    let secret_enc = s.cipher.encrypt(&secret_context(&org, &repo), &b.secret);
    let token_enc = b.token.as_ref().map(|t| s.cipher.encrypt(&token_context(&org, &repo), t));
    let audit = caller.audit("github.hook.create", &repo).org(&org).detail(json!({"token": b.token.is_some()}));
    let hook = s.store.put_github_hook(&org, &repo, &events, &secret_enc, token_enc.as_deref(), &audit).await?;
    Ok((StatusCode::CREATED, Json(hook_view(&hook))).into_response())
}

fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[derive(Debug, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// At most this many, newest first (1–1000, default 100).
    pub limit: Option<u32>,
    /// The Zeitwork organisation whose deliveries to list (an org token's own by default).
    pub project_org: Option<String>,
}

/// Deliveries of an organisation's webhook of a repository, newest first, with their outcome.
#[utoipa::path(get, path = "/api/v1/github/webhooks/{org}/{repo}/deliveries", tag = "github",
    params(("org" = String, Path), ("repo" = String, Path), DeliveryQuery),
    responses((status = 200, body = Vec<GithubDelivery>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn list_deliveries(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, repo)): Path<(String, String)>,
    QueryParams(q): QueryParams<DeliveryQuery>,
) -> ApiResult<Json<Vec<GithubDelivery>>> {
    let repo = full_name(&org, &repo)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::InvalidQuery(format!("limit: {limit} is out of range; use 1 to 1000")));
    }
    let org = hook_org(&s, &caller, q.project_org.as_deref(), &repo, Role::Guest, "github.delivery.list").await?;
    if s.store.github_hook(&org, &repo).await?.is_none() {
        return Err(ApiError::NotFound(format!("{org} has no webhook for {repo}")));
    }
    Ok(Json(s.store.list_github_deliveries(&org, &repo, limit).await?))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `X-Hub-Signature-256` of `body` under `secret`, checked in constant time.
pub fn signature_ok(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(expected) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// Receive a GitHub webhook delivery (GitHub calls this; it authenticates by signature).
#[utoipa::path(post, path = "/api/v1/github/webhook", tag = "github", security(()),
    request_body(content = Value, description = "a GitHub webhook payload (JSON, or form-encoded `payload`)"),
    responses((status = 200, description = "handled"), (status = 202, description = "not acted on"),
        (status = 400, body = zeitwork_api_types::ApiError), (status = 401, body = zeitwork_api_types::ApiError),
        (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn receive(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let event = header(&headers, "x-github-event")
        .filter(|e| !e.is_empty() && e.len() <= 64)
        .ok_or_else(|| ApiError::InvalidBody("missing X-GitHub-Event header; is this a GitHub webhook?".into()))?
        .to_owned();
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 100 && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .ok_or_else(|| ApiError::InvalidBody("missing or malformed X-GitHub-Delivery header".into()))?
        .to_owned();
    let Some(signature) = header(&headers, "x-hub-signature-256").map(str::to_owned) else {
        return Err(ApiError::Unauthorized("missing X-Hub-Signature-256; set a secret on the GitHub webhook".into()));
    };
    let mut raw = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidBody(format!("the body broke off: {e}")))?;
        if raw.len() + chunk.len() > MAX_PAYLOAD {
            return Err(ApiError::TooLarge(format!("payloads are limited to {MAX_PAYLOAD} bytes")));
        }
        raw.extend_from_slice(&chunk);
    }
    // The payload is read to find its repository, and trusted only after the signature matches that repository's secret.
    let form = header(&headers, "content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let json_bytes = if form {
        form_urlencoded::parse(&raw)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned().into_bytes())
            .ok_or_else(|| ApiError::InvalidBody("a form-encoded delivery needs a payload field".into()))?
    } else {
        raw.clone()
    };
    let payload: Value = serde_json::from_slice(&json_bytes)
        .map_err(|e| ApiError::InvalidBody(format!("the payload is not JSON: {e}")))?;
    let repo = payload["repository"]["full_name"]
        .as_str()
        .filter(|r| r.split_once('/').is_some_and(|(o, n)| owner_ok(o) && repo_name_ok(n)))
        .ok_or_else(|| ApiError::InvalidBody("the payload names no repository (repository.full_name)".into()))?
        .to_owned();
    let hooks = s.store.github_hooks_of_repo(&repo).await?;
    if hooks.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no webhook is configured for {repo}; add it with POST /api/v1/github/webhooks"
        )));
    }
    let mut record = GithubDelivery {
        id: delivery.clone(),
        repo: repo.clone(),
        event: event.clone(),
        status: String::new(),
        outcome: String::new(),
        git_ref: None,
        sha: None,
        deployments: Vec::new(),
        received_at: chrono::Utc::now(),
    };
    // The signature, not the repository name, decides whose registration this is.
    let mut signed_by = None;
    for h in hooks {
        let secret = s
            .cipher
            .decrypt(&secret_context(&h.org, &h.repo), &h.secret_enc)
            .map_err(|e| ApiError::internal("decrypting a webhook secret", e))?;
        if signature_ok(secret.as_bytes(), &raw, &signature) {
            signed_by = Some(h);
            break;
        }
    }
    let Some(hook) = signed_by else {
        tracing::warn!(%repo, %delivery, "webhook signature matches no registration; delivery rejected");
        // Kept apart from every organisation's record: a forgery must not overwrite or reveal a genuine delivery.
        if s.store.github_delivery("", &delivery).await?.is_none() {
            record.status = "rejected".into();
            record.outcome = "X-Hub-Signature-256 does not match the configured secret".into();
            s.store.record_github_delivery("", &record).await?;
        }
        return Err(ApiError::Unauthorized(
            "X-Hub-Signature-256 does not match this repository's webhook secret".into(),
        ));
    };
    if let Some(earlier) = s.store.github_delivery(&hook.org, &delivery).await? {
        return Ok(answer(
            StatusCode::OK,
            json!({"status": "duplicate", "outcome": earlier.outcome, "deployments": earlier.deployments}),
        ));
    }
    let (status, code) = match event.as_str() {
        "ping" => {
            record.status = "answered".into();
            record.outcome = "pong".into();
            (json!({"status": "answered", "zen": payload["zen"]}), StatusCode::OK)
        }
        e if !hook.events.iter().any(|h| h == e) => {
            record.status = "ignored".into();
            record.outcome = format!("the webhook does not act on {e} events");
            (json!({"status": "ignored", "outcome": record.outcome}), StatusCode::ACCEPTED)
        }
        _ => {
            if event == "pull_request" {
                pull_request(&s, &hook, &payload, &mut record).await?;
            } else {
                push(&s, &hook, &payload, &mut record).await?;
            }
            let code = if record.status == "deployed" { StatusCode::OK } else { StatusCode::ACCEPTED };
            (json!({"status": record.status, "outcome": record.outcome, "deployments": record.deployments}), code)
        }
    };
    s.store.record_github_delivery(&hook.org, &record).await?;
    Ok(answer(code, status))
}

/// Whether a commit message asks to skip deployment: `[skip ci]`, `[ci skip]`,
/// `skip ci` or `ci skip` anywhere in it, in any case.
pub fn skips(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("skip ci") || m.contains("ci skip")
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) && !s.bytes().all(|b| b == b'0')
}

/// Where a push deploys for one project: the environment, or why not.
fn push_target(p: &Project, git_ref: &str) -> Result<Environment, String> {
    if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        if p.branch == branch {
            return Ok(Environment::Production);
        }
        if p.staging_branch.as_deref() == Some(branch) {
            return Ok(Environment::Staging);
        }
        return Err(format!("{}/{} follows {} (not {branch})", p.org, p.name, p.branch));
    }
    if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        return match p.tag_pattern.as_deref().map(super::builds::tag_regex) {
            Some(Ok(re)) if re.is_match(tag) => Ok(Environment::Production),
            Some(Ok(_)) => Err(format!("{}/{}: tag {tag} does not match tag_pattern", p.org, p.name)),
            Some(Err(_)) => Err(format!("{}/{}: tag_pattern is not a valid expression", p.org, p.name)),
            None => Err(format!("{}/{} deploys no tags (set tag_pattern)", p.org, p.name)),
        };
    }
    Err(format!("{git_ref} is neither a branch nor a tag"))
}

/// Acts on a verified `push`: a deployment per project of the hook's org that
/// follows the branch (production), the staging branch, or matching tags.
async fn push(s: &AppState, hook: &StoredHook, payload: &Value, record: &mut GithubDelivery) -> ApiResult<()> {
    let git_ref = payload["ref"].as_str().unwrap_or_default().chars().take(300).collect::<String>();
    let sha = payload["after"].as_str().unwrap_or_default().to_ascii_lowercase();
    record.git_ref = Some(git_ref.clone()).filter(|r| !r.is_empty());
    record.sha = Some(sha.clone()).filter(|s| is_sha(s));
    if !(git_ref.starts_with("refs/heads/") || git_ref.starts_with("refs/tags/")) {
        record.status = "ignored".into();
        record.outcome = format!("{git_ref} is neither a branch nor a tag");
        return Ok(());
    }
    if payload["deleted"].as_bool() == Some(true) || record.sha.is_none() {
        record.status = "ignored".into();
        record.outcome = format!("{git_ref} was deleted");
        return Ok(());
    }
    let message = payload["head_commit"]["message"].as_str().unwrap_or_default().to_owned();
    if skips(&message) {
        record.status = "skipped".into();
        record.outcome = "the commit message asks to skip ([skip ci], [ci skip], skip ci, ci skip)".into();
        return Ok(());
    }
    let projects = s.store.projects_of_repo(&record.repo, Some(&hook.org)).await?;
    let mut notes = Vec::new();
    let mut following = Vec::new();
    for p in &projects {
        match push_target(p, &git_ref) {
            Ok(env) => following.push((p, env)),
            Err(why) => notes.push(why),
        }
    }
    if following.is_empty() {
        record.status = "ignored".into();
        record.outcome = if notes.is_empty() {
            format!("no project of {} deploys {}", hook.org, record.repo)
        } else {
            notes.join("; ")
        };
        return Ok(());
    }
    notes.clear();
    for (p, env) in following {
        if !p.auto_deploy {
            notes.push(format!("{}/{}: auto_deploy is off", p.org, p.name));
            continue;
        }
        let commit = Commit { sha: &sha, message: Some(&message), environment: env, pull_request: None };
        match deploy_commit(s, hook, p, &commit, "github").await {
            Ok(id) => {
                notes.push(format!("{}/{}: {} deployment {id}", p.org, p.name, env.as_str()));
                record.deployments.push(id);
            }
            Err(e) => notes.push(format!("{}/{}: {e}", p.org, p.name)),
        }
    }
    record.status = if record.deployments.is_empty() { "failed" } else { "deployed" }.into();
    record.outcome = notes.join("; ");
    Ok(())
}

/// Acts on a verified `pull_request`: opened, reopened and new commits
/// (synchronize) build and deploy a preview of the head commit; closing
/// (or merging) retires the pull request's previews.
async fn pull_request(s: &AppState, hook: &StoredHook, payload: &Value, record: &mut GithubDelivery) -> ApiResult<()> {
    let action = payload["action"].as_str().unwrap_or_default();
    let number = payload["number"].as_u64().or_else(|| payload["pull_request"]["number"].as_u64());
    let Some(number) = number.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0 && *n < 10_000_000) else {
        return Err(ApiError::InvalidBody("the pull_request payload has no number".into()));
    };
    let pr = &payload["pull_request"];
    let sha = pr["head"]["sha"].as_str().unwrap_or_default().to_ascii_lowercase();
    record.git_ref = Some(format!("refs/pull/{number}/head"));
    record.sha = Some(sha.clone()).filter(|s| is_sha(s));
    let projects: Vec<Project> =
        s.store.projects_of_repo(&record.repo, Some(&hook.org)).await?.into_iter().filter(|p| p.auto_deploy).collect();
    if projects.is_empty() {
        record.status = "ignored".into();
        record.outcome = format!("no project of {} deploys {} automatically", hook.org, record.repo);
        return Ok(());
    }
    match action {
        "opened" | "reopened" | "synchronize" => {}
        "closed" => {
            let mut notes = Vec::new();
            for p in &projects {
                let audit = zeitwork_store::Audit::new("github", "deployment.retire", "")
                    .org(&p.org)
                    .project(&p.name)
                    .detail(json!({"pull_request": number}));
                let reason = format!("pull request #{number} was closed");
                let retired = s.store.close_preview(&p.id, number, &reason, &audit).await?;
                notes.push(format!("{}/{}: {} preview deployment(s) retired", p.org, p.name, retired.len()));
                record.deployments.extend(retired);
            }
            s.changed();
            record.status = "closed".into();
            record.outcome = notes.join("; ");
            return Ok(());
        }
        other => {
            record.status = "ignored".into();
            record.outcome = format!("pull request action {other:?} changes no preview");
            return Ok(());
        }
    }
    if record.sha.is_none() {
        return Err(ApiError::InvalidBody(
            "the pull_request payload has no head commit (pull_request.head.sha)".into(),
        ));
    }
    // Code from forks is not built with this repository's settings and secrets.
    let head_repo = pr["head"]["repo"]["full_name"].as_str().unwrap_or_default();
    if !head_repo.eq_ignore_ascii_case(&record.repo) {
        record.status = "ignored".into();
        record.outcome = format!(
            "pull request #{number} comes from {head_repo:?}; previews are built for branches of {} only",
            record.repo
        );
        return Ok(());
    }
    let title = pr["title"].as_str().unwrap_or_default().to_owned();
    if skips(&title) {
        record.status = "skipped".into();
        record.outcome = "the pull request's title asks to skip ([skip ci], [ci skip], skip ci, ci skip)".into();
        return Ok(());
    }
    let mut notes = Vec::new();
    for p in &projects {
        let label = zeitwork_store::preview_label(&p.name, number, &p.org);
        if zeitwork_api_types::validate::dns_label("preview", &label).is_err() {
            notes.push(format!(
                "{}/{}: {label} is too long for an address; the preview has its deployment URL only",
                p.org, p.name
            ));
        } else if !s.store.claim_preview_host(&label, &p.id).await? {
            notes.push(format!(
                "{}/{}: {label} belongs to another project; the preview has its deployment URL only",
                p.org, p.name
            ));
        }
        let commit =
            Commit { sha: &sha, message: Some(&title), environment: Environment::Preview, pull_request: Some(number) };
        match deploy_commit(s, hook, p, &commit, "github").await {
            Ok(id) => {
                notes.push(format!("{}/{}: preview {id} at {}", p.org, p.name, s.config.app_url(&label)));
                record.deployments.push(id);
            }
            Err(e) => notes.push(format!("{}/{}: {e}", p.org, p.name)),
        }
    }
    record.status = if record.deployments.is_empty() { "failed" } else { "deployed" }.into();
    record.outcome = notes.join("; ");
    Ok(())
}

/// A commit to deploy, and where.
struct Commit<'a> {
    sha: &'a str,
    message: Option<&'a str>,
    environment: Environment,
    pull_request: Option<u32>,
}

/// Creates a deployment of `p` at a commit: of its image template when it has one,
/// else built from the commit (cloned with the hook's token).
async fn deploy_commit(s: &AppState, hook: &StoredHook, p: &Project, c: &Commit<'_>, by: &str) -> ApiResult<String> {
    let audit_for = |id: &str, detail: Value| {
        zeitwork_store::Audit::new(by, "deployment.create", id).org(&p.org).project(&p.name).detail(detail)
    };
    // A commit sent back by a rollback is not put live again by a push of
    // the same commit; a person may deploy it by hand (`by` is then their token).
    if by == "github" {
        if let Some(bad) = rolled_back_commit(s, p, c).await? {
            return Err(ApiError::Conflict(format!(
                "commit {} was rolled back in {} ({bad}); deploy it by hand to try it again",
                &c.sha[..c.sha.len().min(7)],
                c.environment.as_str()
            )));
        }
    }
    let Some(template) = p.image_template.as_deref() else {
        if !is_sha(c.sha) {
            return Err(ApiError::InvalidField(ValidationError::new(
                "ref",
                "building from source needs the full 40-character commit SHA (or a branch that was pushed)",
            )));
        }
        let repo = hook.repo.clone();
        let mut new = super::projects::new_deployment(s, p, c.environment, String::new(), by.to_owned());
        new.image = format!("{}/{}/{}", zeitwork_api_types::ARCHIVE_REGISTRY, p.org, p.name);
        new.commit_sha = Some(c.sha.to_owned());
        new.commit_message = c.message.map(|m| m.chars().take(1000).collect());
        new.pull_request = c.pull_request;
        let authorization = match &hook.token_enc {
            Some(enc) => {
                use base64::Engine;
                let token = s
                    .cipher
                    .decrypt(&token_context(&hook.org, &hook.repo), enc)
                    .map_err(|e| ApiError::internal("decrypting a repository token", e))?;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
                ))
            }
            None => None,
        };
        let source = zeitwork_api_types::BuildSource::Git {
            url: format!("{}/{repo}.git", s.config.github_git_url),
            sha: c.sha.to_owned(),
            authorization: None,
        };
        let audit = audit_for(&new.id, json!({"commit": c.sha, "environment": c.environment, "build": "git"}));
        let d = super::builds::queue_build(s, p, new, source, None, authorization, audit).await?;
        return Ok(d.id);
    };
    let sha = c.sha;
    let image = template.replace("{sha}", sha).replace("{short_sha}", &sha[..sha.len().min(7)]);
    zeitwork_api_types::validate::image_reference("image_template", &image)?;
    super::images::check_archive_reference(s, &p.org, &image).await?;
    let mut new = super::projects::new_deployment(s, p, c.environment, image.clone(), by.to_owned());
    new.commit_sha = Some(sha.to_owned());
    new.commit_message = c.message.map(|m| m.chars().take(1000).collect());
    new.pull_request = c.pull_request;
    let audit = audit_for(&new.id, json!({"image": image, "commit": sha, "environment": c.environment}));
    let d = s.store.create_deployment(&new, &audit).await?;
    s.changed();
    Ok(d.id)
}

/// A `rolled_back` deployment of `c`'s commit in its environment, among the project's recent ones.
async fn rolled_back_commit(s: &AppState, p: &Project, c: &Commit<'_>) -> ApiResult<Option<String>> {
    let filter = zeitwork_store::DeploymentFilter {
        org: Some(p.org.clone()),
        project: Some(p.name.clone()),
        environment: Some(c.environment),
        status: Some(zeitwork_api_types::DeploymentStatus::RolledBack),
        ..Default::default()
    };
    let recent = s.store.list_deployments(&filter, &zeitwork_store::Page::first(100)).await?.items;
    Ok(recent.into_iter().find(|d| d.commit_sha.as_deref() == Some(c.sha)).map(|d| d.id))
}

/// Deploy a repository's commit (or a branch's last pushed commit) by hand.
#[utoipa::path(post, path = "/api/v1/github/trigger", tag = "github", request_body = GithubTrigger,
    responses((status = 202, body = Vec<zeitwork_api_types::Deployment>), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn trigger(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<GithubTrigger>,
) -> ApiResult<Response> {
    let repo = full_name(&b.org, &b.repo)?;
    let org = hook_org(&s, &caller, b.project_org.as_deref(), &repo, Role::Developer, "github.trigger").await?;
    let ours = s.store.projects_of_repo(&repo, Some(&org)).await?;
    if ours.is_empty() {
        return Err(ApiError::NotFound(format!("no project of {org} deploys {repo}; set github_repo on one")));
    }
    let hook = s.store.github_hook(&org, &repo).await?.ok_or_else(|| {
        ApiError::NotFound(format!("{org} has no webhook for {repo}; add it with POST /api/v1/github/webhooks"))
    })?;
    let r = b.git_ref.trim();
    let is_sha = (7..=40).contains(&r.len()) && r.bytes().all(|c| c.is_ascii_hexdigit());
    let mut out = Vec::new();
    for p in &ours {
        let sha = if is_sha {
            r.to_ascii_lowercase()
        } else {
            let branch = r.strip_prefix("refs/heads/").unwrap_or(r);
            s.store.last_pushed_sha(&org, &repo, branch).await?.ok_or_else(|| {
                ApiError::Conflict(format!("no push to {branch} of {repo} was received yet; give a commit SHA as ref"))
            })?
        };
        let commit = Commit { sha: &sha, message: None, environment: Environment::Production, pull_request: None };
        let id = deploy_commit(&s, &hook, p, &commit, &caller.actor()).await?;
        out.push(s.store.get_deployment(&id).await?);
    }
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_raw_body() {
        // The example from GitHub's documentation on validating deliveries.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_ok(b"It's a Secret to Everybody", b"Hello, World!", sig));
        assert!(!signature_ok(b"another secret", b"Hello, World!", sig));
        assert!(!signature_ok(b"It's a Secret to Everybody", b"Hello, World?", sig));
        assert!(!signature_ok(b"It's a Secret to Everybody", b"Hello, World!", "sha1=abc"));
        assert!(!signature_ok(b"It's a Secret to Everybody", b"Hello, World!", "sha256=zz"));
    }

    #[test]
    fn skip_markers() {
        assert!(skips("fix typo [skip ci]"));
        assert!(skips("[CI SKIP] docs"));
        assert!(skips("docs only, skip ci please"));
        assert!(skips("ci skip"));
        assert!(!skips("skip the ci step"));
    }

    #[test]
    fn names() {
        assert!(full_name("Codertocat", "Hello-World").is_ok());
        assert!(full_name("a/b", "c").is_err());
        assert!(full_name("a", "..").is_err());
        assert!(full_name("a", "x y").is_err());
    }
}
