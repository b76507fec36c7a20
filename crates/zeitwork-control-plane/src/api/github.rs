//! GitHub intake. A repository's webhook is configured with its secret
//! (stored encrypted); GitHub posts events to `POST /api/v1/github/webhook`,
//! which verifies `X-Hub-Signature-256` (HMAC-SHA256 of the raw body,
//! compared in constant time) before reading anything from the payload it
//! acts on, records every delivery, answers `ping`, and turns a `push` to a
//! project's branch into a deployment of the project's image template.

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
        created_at: h.created_at,
    }
}

/// The key a webhook secret is encrypted under: bound to its organisation and repository.
fn secret_context(org: &str, repo: &str) -> String {
    format!("github:{org}:{repo}")
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
    if let Some(e) = events.iter().find(|e| !matches!(e.as_str(), "push" | "ping")) {
        return Err(ValidationError::new(
            "events",
            format!("{e:?} is not handled; use push (ping is always answered)"),
        )
        .into());
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
    let audit = caller.audit("github.hook.create", &repo).org(&org);
    let hook = s.store.put_github_hook(&org, &repo, &events, &secret_enc, &audit).await?;
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
            push(&s, &hook.org, &payload, &mut record).await?;
            let code = if record.status == "deployed" { StatusCode::OK } else { StatusCode::ACCEPTED };
            (json!({"status": record.status, "outcome": record.outcome, "deployments": record.deployments}), code)
        }
    };
    s.store.record_github_delivery(&hook.org, &record).await?;
    Ok(answer(code, status))
}

/// Whether a commit message asks to skip deployment.
pub fn skips(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("[skip ci]") || m.contains("[ci skip]")
}

/// Acts on a verified `push`: a deployment per project of `org` that follows the branch.
async fn push(s: &AppState, org: &str, payload: &Value, record: &mut GithubDelivery) -> ApiResult<()> {
    let git_ref = payload["ref"].as_str().unwrap_or_default().to_owned();
    let sha = payload["after"].as_str().unwrap_or_default().to_owned();
    record.git_ref = Some(git_ref.clone()).filter(|r| !r.is_empty());
    record.sha = Some(sha.clone()).filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()));
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        record.status = "ignored".into();
        record.outcome = format!("{git_ref} is not a branch");
        return Ok(());
    };
    if payload["deleted"].as_bool() == Some(true) || record.sha.is_none() || sha.bytes().all(|b| b == b'0') {
        record.status = "ignored".into();
        record.outcome = format!("branch {branch} was deleted");
        return Ok(());
    }
    let message = payload["head_commit"]["message"].as_str().unwrap_or_default().to_owned();
    if skips(&message) {
        record.status = "skipped".into();
        record.outcome = "the commit message asks to skip ([skip ci] / [ci skip])".into();
        return Ok(());
    }
    let projects = s.store.projects_of_repo(&record.repo, Some(org)).await?;
    let following: Vec<&Project> = projects.iter().filter(|p| p.branch == branch).collect();
    if following.is_empty() {
        record.status = "ignored".into();
        record.outcome = format!("no project deploys branch {branch} of {}", record.repo);
        return Ok(());
    }
    let mut notes = Vec::new();
    for p in following {
        if !p.auto_deploy {
            notes.push(format!("{}/{}: auto_deploy is off", p.org, p.name));
            continue;
        }
        match deploy_commit(s, p, &sha, Some(&message), "github").await {
            Ok(id) => {
                notes.push(format!("{}/{}: deployment {id}", p.org, p.name));
                record.deployments.push(id);
            }
            Err(e) => notes.push(format!("{}/{}: {e}", p.org, p.name)),
        }
    }
    record.status = if record.deployments.is_empty() { "failed" } else { "deployed" }.into();
    record.outcome = notes.join("; ");
    Ok(())
}

/// Creates a production deployment of `p` at commit `sha` from its image template.
async fn deploy_commit(s: &AppState, p: &Project, sha: &str, message: Option<&str>, by: &str) -> ApiResult<String> {
    let template = p.image_template.as_deref().ok_or_else(|| {
        ApiError::Conflict(format!("{}/{} has no image_template to build the commit's image name from", p.org, p.name))
    })?;
    let image = template.replace("{sha}", sha).replace("{short_sha}", &sha[..sha.len().min(7)]);
    zeitwork_api_types::validate::image_reference("image_template", &image)?;
    super::images::check_archive_reference(s, &p.org, &image).await?;
    let mut new = super::projects::new_deployment(s, p, Environment::Production, image.clone(), by.to_owned());
    new.commit_sha = Some(sha.to_owned());
    new.commit_message = message.map(|m| m.chars().take(1000).collect());
    let audit = zeitwork_store::Audit::new(by, "deployment.create", &new.id)
        .org(&p.org)
        .project(&p.name)
        .detail(json!({"image": image, "commit": sha}));
    let d = s.store.create_deployment(&new, &audit).await?;
    s.changed();
    Ok(d.id)
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
        let id = deploy_commit(&s, p, &sha, None, &caller.actor()).await?;
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
