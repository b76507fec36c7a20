//! Builds from source. People upload a source archive (a gzip-compressed
//! tar of a directory holding a Dockerfile) and deploy it with `build`; a
//! GitHub push builds the pushed commit. Each build waits in a queue until a
//! node's builder claims it; the builder streams its output here, uploads
//! the image it built (stored like any uploaded archive) or reports why it
//! failed, and the deployment then proceeds (or fails) like any other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;
use zeitwork_api_types::{
    validate, Build, BuildFailure, BuildJob, BuildRequest, BuildSource, Deployment, Project, Role, UploadedImage,
    UploadedSource, ValidationError,
};
use zeitwork_store::{Audit, BuildSpec, NewDeployment, StoredBuild};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::AppState;

/// Seconds a builder may stay silent (no output, no heartbeat) before its build is given up.
pub const BUILD_SILENCE_SECS: i64 = 120;
/// Largest piece of build output accepted in one report.
const MAX_LOG_REPORT: usize = 256 * 1024;

/// Build counters and durations on the operator's `/metrics`.
#[derive(Debug, Clone)]
pub struct BuildMetrics {
    pub finished: Family<OutcomeLabels, Counter>,
    pub duration: Family<OutcomeLabels, Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

impl Default for BuildMetrics {
    fn default() -> Self {
        Self {
            finished: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
            }),
        }
    }
}

impl BuildMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("builds", "Builds finished, by outcome (succeeded, failed)", self.finished.clone());
        r.register("build_duration_seconds", "Wall time of builds, by outcome", self.duration.clone());
    }

    fn observe(&self, outcome: &str, started: Option<chrono::DateTime<chrono::Utc>>) {
        let labels = OutcomeLabels { outcome: outcome.to_owned() };
        self.finished.get_or_create(&labels).inc();
        if let Some(started) = started {
            let secs = (chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
            self.duration.get_or_create(&labels).observe(secs);
        }
    }
}

/// A project's `tag_pattern`, compiled (bounded in size, so a pattern cannot eat the operator's memory).
pub fn tag_regex(pattern: &str) -> ApiResult<regex::Regex> {
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).build().map_err(|e| {
        ApiError::InvalidField(ValidationError::new(
            "tag_pattern",
            format!("not a regular expression: {}", e.to_string().lines().last().unwrap_or("invalid")),
        ))
    })
}

/// What a build keeps secret: build secrets and the clone credential.
#[derive(Debug, Default, Serialize, Deserialize)]
struct BuildSecrets {
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    #[serde(default)]
    authorization: Option<String>,
}

fn secrets_context(id: &str) -> String {
    format!("build:{id}")
}

/// Queues the build of `new` (a deployment in `building`) from `source`.
pub(crate) async fn queue_build(
    s: &AppState,
    p: &Project,
    new: NewDeployment,
    source: BuildSource,
    overrides: Option<&BuildRequest>,
    authorization: Option<String>,
    audit: Audit,
) -> ApiResult<Deployment> {
    let mut args = p.build.args.clone();
    let mut secrets = BTreeMap::new();
    if let Some(o) = overrides {
        args.extend(o.args.iter().map(|(k, v)| (k.clone(), v.clone())));
        secrets = o.secrets.clone();
    }
    let spec = BuildSpec {
        source,
        dockerfile: overrides
            .and_then(|o| o.dockerfile.clone())
            .or_else(|| p.build.dockerfile.clone())
            .unwrap_or_else(|| "Dockerfile".into()),
        target: overrides.and_then(|o| o.target.clone()).or_else(|| p.build.target.clone()),
        args,
        secret_names: secrets.keys().cloned().collect(),
    };
    let secrets_enc = (!secrets.is_empty() || authorization.is_some()).then(|| {
        let plain = serde_json::to_string(&BuildSecrets { secrets, authorization }).unwrap_or_default();
        s.cipher.encrypt(&secrets_context(&new.id), &plain)
    });
    let d = s.store.create_build(&new, &spec, secrets_enc, &audit).await?;
    tracing::info!(deployment = %d.id, "build queued");
    s.changed();
    Ok(d)
}

/// A deployment of an uploaded source archive (`POST /api/v1/deployments` with `build`).
pub(crate) async fn queue_upload_build(
    s: &AppState,
    caller: &Caller,
    p: &Project,
    mut new: NewDeployment,
    build: &BuildRequest,
) -> ApiResult<Deployment> {
    if s.store.source_size(&p.org, &build.source).await?.is_none() {
        return Err(ApiError::InvalidField(ValidationError::new(
            "build.source",
            format!(
                "{} has no source archive {}; upload it with POST /api/v1/orgs/{}/sources",
                p.org, build.source, p.org
            ),
        )));
    }
    new.image = format!("{}/{}/{}", zeitwork_api_types::ARCHIVE_REGISTRY, p.org, p.name);
    let audit = caller.audit("deployment.create", &new.id).org(&p.org).project(&p.name).detail(serde_json::json!({
        "source": build.source, "environment": new.environment,
    }));
    let source = BuildSource::Upload { digest: build.source.clone() };
    queue_build(s, p, new, source, Some(build), None, audit).await
}

/// Upload a source archive to build (a gzip-compressed tar of a directory with a Dockerfile).
///
/// Content-addressed: uploading the same bytes again answers `existing: true`.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/sources", tag = "builds", params(("org" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/gzip", description = "a .tar.gz of the build context"),
    responses((status = 201, body = UploadedSource), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError), (status = 413, body = zeitwork_api_types::ApiError)))]
pub async fn upload_source(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    validate::dns_label("org", &org)?;
    s.require_role(&caller, &org, Role::Developer, "source.upload", &org).await?;
    s.store.get_org(&org).await?;
    let max = s.config.max_source_bytes;
    let up = super::images::receive(&s, body, "source.tar.gz", max, || {
        format!(
            "the source archive is larger than {max} bytes (the operator's max_source_bytes); \
             leave build outputs and dependencies out with .dockerignore"
        )
    })
    .await?;
    let (path, received) = (up.path.clone(), up.size);
    let checked = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || check_source(&path, max.saturating_mul(8)))
            .await
            .map_err(|e| ApiError::internal("reading a source archive", e))?
    };
    checked.map_err(ApiError::InvalidBody)?;
    let digest = up.digest.clone();
    super::images::store_blob_file(&s, &digest, received, &path).await?;
    let existing = s.store.put_source(&org, &digest, received as i64).await?;
    Ok((StatusCode::CREATED, Json(UploadedSource { source: digest, size: received, existing })).into_response())
}

/// Reads a source archive through: a gzip-compressed tar whose entries stay
/// inside the directory (no absolute paths, no `..`, no links out of it),
/// unpacking to at most `max_unpacked` bytes.
pub fn check_source(path: &std::path::Path, max_unpacked: u64) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the upload: {e}"))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut total = 0u64;
    let mut dockerfile = false;
    let entries = archive.entries().map_err(|e| format!("not a gzip-compressed tar: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a gzip-compressed tar: {e}"))?;
        let name = entry.path().map_err(|e| format!("an entry has an unreadable path: {e}"))?.into_owned();
        if !stays_inside(&name) {
            return Err(format!("{} escapes the build context; paths must be relative, without '..'", name.display()));
        }
        if let Ok(Some(target)) = entry.link_name() {
            let parent = name.parent().map(|p| p.join(&target)).unwrap_or_else(|| target.to_path_buf());
            if target.is_absolute() || !stays_inside(&parent) {
                return Err(format!("{} links to {}, outside the build context", name.display(), target.display()));
            }
        }
        dockerfile |= name.file_name().is_some_and(|n| n.to_string_lossy().contains("ockerfile"));
        total = total.saturating_add(entry.header().size().unwrap_or(0));
        if total > max_unpacked {
            return Err(format!("the source unpacks to more than {max_unpacked} bytes"));
        }
    }
    if !dockerfile {
        return Err("the source has no Dockerfile".into());
    }
    Ok(())
}

/// Whether a relative path, read lexically, stays inside its directory.
fn stays_inside(p: &std::path::Path) -> bool {
    use std::path::Component;
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn build_view(b: &StoredBuild) -> Build {
    Build {
        deployment: b.id.clone(),
        org: b.org.clone(),
        project: b.project.clone(),
        status: b.status.clone(),
        node: b.node_id.clone(),
        dockerfile: b.spec.dockerfile.clone(),
        target: b.spec.target.clone(),
        args: b.spec.args.keys().cloned().collect(),
        secrets: b.spec.secret_names.clone(),
        source: match &b.spec.source {
            BuildSource::Upload { digest } => format!("upload {digest}"),
            BuildSource::Git { url, sha, .. } => format!("git {url} {sha}"),
        },
        image: b.image.clone(),
        error: b.error.clone(),
        log_bytes: b.log_len.max(0) as u64,
        created_at: b.created_at,
        started_at: b.started_at,
        finished_at: b.finished_at,
        duration_ms: b.started_at.zip(b.finished_at).map(|(s, f)| (f - s).num_milliseconds().max(0) as u64),
    }
}

/// The build of a deployment built from source.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/build", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = Build), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn get_build(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Build>> {
    super::projects::readable_deployment(&s, &caller, &id).await?;
    Ok(Json(build_view(&s.store.get_build(&id).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BuildLogQuery {
    /// Characters of output to skip (what a reader already has).
    pub offset: Option<u64>,
    /// Keep the response open and send output as it comes, until the build ends.
    pub follow: Option<bool>,
}

/// The output of a deployment's build, as plain text (following it while it runs).
#[utoipa::path(get, path = "/api/v1/deployments/{id}/build/log", tag = "builds",
    params(("id" = String, Path), BuildLogQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn build_log(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<BuildLogQuery>,
) -> ApiResult<Response> {
    super::projects::readable_deployment(&s, &caller, &id).await?;
    let offset = q.offset.unwrap_or(0).min(i64::MAX as u64) as i64;
    let (first, status) = s.store.build_log(&id, offset).await?;
    let done = |status: &str| matches!(status, "succeeded" | "failed");
    let text = |t: String| (HeaderValue::from_static("text/plain; charset=utf-8"), t);
    if !q.follow.unwrap_or(false) || done(&status) {
        let (ct, body) = text(first);
        return Ok(([(header::CONTENT_TYPE, ct)], body).into_response());
    }
    let store = s.store.clone();
    let start = offset + first.chars().count() as i64;
    let stream = futures::stream::unfold((Some(first), start, false), move |(pending, offset, finished)| {
        let store = store.clone();
        let id = id.clone();
        async move {
            if let Some(p) = pending {
                return Some((Ok::<_, std::io::Error>(bytes::Bytes::from(p)), (None, offset, false)));
            }
            if finished {
                return None;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (part, status) = match store.build_log(&id, offset).await {
                    Ok(x) => x,
                    Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (None, offset, true))),
                };
                let ended = matches!(status.as_str(), "succeeded" | "failed");
                if !part.is_empty() || ended {
                    let next = offset + part.chars().count() as i64;
                    return Some((Ok(bytes::Bytes::from(part)), (None, next, ended)));
                }
            }
        }
    });
    let mut res = Body::from_stream(stream).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

// ------------------------------------------------------------ builders

/// Wait for a build to run (the node's builder; long poll of up to 20 s, 204 when none came).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/builds/claim", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = BuildJob), (status = 204, description = "no build is waiting"),
        (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn claim_build(State(s): State<AppState>, caller: Caller, Path(node): Path<String>) -> ApiResult<Response> {
    s.require_node(&caller, &node, "build.claim").await?;
    // A queued build is a change the store announces (through other operators
    // on PostgreSQL by LISTEN/NOTIFY), like the assignments watch.
    let mut changes = s.store.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        changes.mark_unchanged();
        if let Some(b) = s.store.claim_build(&node).await? {
            tracing::info!(deployment = %b.id, %node, "build started");
            let secrets: BuildSecrets = match &b.secrets_enc {
                Some(enc) => {
                    let plain = s
                        .cipher
                        .decrypt(&secrets_context(&b.id), enc)
                        .map_err(|e| ApiError::internal("decrypting build secrets", e))?;
                    serde_json::from_str(&plain).map_err(|e| ApiError::internal("reading build secrets", e))?
                }
                None => BuildSecrets::default(),
            };
            let source = match b.spec.source.clone() {
                BuildSource::Git { url, sha, .. } => {
                    BuildSource::Git { url, sha, authorization: secrets.authorization.clone() }
                }
                other => other,
            };
            let job = BuildJob {
                id: b.id.clone(),
                org: b.org.clone(),
                project: b.project.clone(),
                source,
                dockerfile: b.spec.dockerfile.clone(),
                target: b.spec.target.clone(),
                args: b.spec.args.clone(),
                secrets: secrets.secrets,
                timeout_secs: s.config.build_timeout_secs,
                memory_mib: s.config.build_memory_mib,
                vcpu: s.config.build_vcpu,
                disk_mib: s.config.build_disk_mib,
            };
            return Ok(Json(job).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // The 2 s recheck only bounds a lost notification.
        let wake = deadline.min(now + Duration::from_secs(2));
        let _ = tokio::time::timeout_at(wake, changes.changed()).await;
    }
}

/// The build `id`, if it runs on the calling node.
async fn own_build(s: &AppState, caller: &Caller, id: &str, action: &str) -> ApiResult<StoredBuild> {
    let b = s.store.get_build(id).await?;
    match &b.node_id {
        Some(node) => s.require_node(caller, node, action).await?,
        None => return Err(ApiError::Conflict(format!("build {id} is not running"))),
    }
    Ok(b)
}

/// The source archive of a build (its builder).
#[utoipa::path(get, path = "/api/v1/builds/{id}/source", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/gzip", body = Vec<u8>), (status = 403, body = zeitwork_api_types::ApiError)))]
pub async fn build_source(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let b = own_build(&s, &caller, &id, "build.source").await?;
    let BuildSource::Upload { digest } = &b.spec.source else {
        return Err(ApiError::Conflict(format!("build {id} clones its source from git")));
    };
    let size = s
        .store
        .blob_size(digest)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("the source {digest} of build {id} is gone")))?;
    Ok(super::images::blob_response(&s.store, digest.clone(), size))
}

/// Output of a running build (its builder; plain text, appended). 409 once the build is no longer running.
#[utoipa::path(post, path = "/api/v1/builds/{id}/log", tag = "builds", params(("id" = String, Path)),
    request_body(content = String, content_type = "text/plain"),
    responses((status = 204, description = "appended"), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn report_build_log(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let b = own_build(&s, &caller, &id, "build.log").await?;
    if body.len() > MAX_LOG_REPORT {
        return Err(ApiError::TooLarge(format!("send build output in pieces of at most {MAX_LOG_REPORT} bytes")));
    }
    let text = String::from_utf8_lossy(&body);
    let node = b.node_id.as_deref().unwrap_or_default();
    if !s.store.append_build_log(&id, node, &text).await? {
        return Err(ApiError::Conflict(format!("build {id} is no longer running; stop it")));
    }
    if let Some(f) = &s.drain {
        crate::drain::send_build_output(f, &b.org, &b.project, &id, &text);
    }
    for f in s.org_drains.of(&b.org, "build") {
        crate::drain::send_build_output(&f, &b.org, &b.project, &id, &text);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The image a build produced (its builder; an oci-archive tar): stored like an uploaded image,
/// and the deployment goes on to be placed.
#[utoipa::path(post, path = "/api/v1/builds/{id}/image", tag = "builds", params(("id" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 201, body = UploadedImage), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn build_image(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let b = own_build(&s, &caller, &id, "build.image").await?;
    if b.status != "running" {
        return Err(ApiError::Conflict(format!("build {id} is {}", b.status)));
    }
    let node = b.node_id.clone().unwrap_or_default();
    let max = s.config.max_archive_bytes;
    let up = match super::images::receive(&s, body, "image.tar", max, || {
        format!("the built image is larger than {max} bytes")
    })
    .await
    {
        Ok(up) => up,
        Err(ApiError::TooLarge(error)) => {
            fail(&s, &b, Some(&node), &error).await?;
            return Err(ApiError::TooLarge(error));
        }
        Err(e) => return Err(e),
    };
    let (work, tar) = (&up.dir, &up.path);
    let audit = Audit::new(&format!("node {node}"), "image.build", &id).org(&b.org).project(&b.project);
    let image = match super::images::store_archive(&s, &b.org, &b.project, tar, work.path(), None, audit).await {
        Ok(i) => i,
        Err(e) => {
            fail(&s, &b, Some(&node), &format!("the built image could not be stored: {e}")).await?;
            return Err(e);
        }
    };
    let audit = Audit::new("system", "build.succeed", &id)
        .org(&b.org)
        .project(&b.project)
        .detail(serde_json::json!({"image": image.image}));
    s.store.finish_build(&id, &node, &image.image, &image.digest, &audit).await?;
    s.builds.observe("succeeded", b.started_at);
    tracing::info!(deployment = %id, image = %image.image, "build succeeded");
    s.changed();
    Ok((StatusCode::CREATED, Json(image)).into_response())
}

/// The build failed (its builder): the deployment fails with the error and the output's tail.
#[utoipa::path(post, path = "/api/v1/builds/{id}/fail", tag = "builds", params(("id" = String, Path)),
    request_body = BuildFailure,
    responses((status = 204, description = "recorded"), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn build_failed(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    crate::extract::JsonBody(f): crate::extract::JsonBody<BuildFailure>,
) -> ApiResult<Response> {
    let b = own_build(&s, &caller, &id, "build.fail").await?;
    let error: String = f.error.chars().take(8000).collect();
    fail(&s, &b, b.node_id.as_deref(), &error).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn fail(s: &AppState, b: &StoredBuild, node: Option<&str>, error: &str) -> ApiResult<()> {
    let reason = format!("build failed: {error}");
    let audit = Audit::new("system", "deployment.fail", &b.id)
        .org(&b.org)
        .project(&b.project)
        .detail(serde_json::json!({"reason": reason}));
    if s.store.fail_build(&b.id, node, &reason, &audit).await? {
        s.builds.observe("failed", b.started_at);
        s.outcomes.count(zeitwork_api_types::DeploymentStatus::Failed);
        tracing::warn!(deployment = %b.id, %error, "build failed");
        s.changed();
    }
    Ok(())
}

/// Gives up builds whose builder went silent (its node died): they fail, saying so.
pub async fn expire_silent_builds(s: &AppState) -> ApiResult<()> {
    let before = chrono::Utc::now().timestamp_millis() - BUILD_SILENCE_SECS * 1000;
    for b in s.store.stale_builds(before).await? {
        let node = b.node_id.clone().unwrap_or_default();
        let error = format!("node {node} stopped reporting on the build for {BUILD_SILENCE_SECS} s");
        fail(s, &b, None, &error).await?;
    }
    Ok(())
}

/// Expires silent builds every few seconds (any operator may; failing twice is a no-op).
pub async fn watch_builds(s: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        if let Err(e) = expire_silent_builds(&s).await {
            tracing::warn!(error = %e, "checking running builds failed");
        }
    }
}

/// Shared handle type for the metrics in [`AppState`].
pub type SharedBuildMetrics = Arc<BuildMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, tar::EntryType, &str)]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let gz = flate2::write::GzEncoder::new(file.reopen().unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            if *kind == tar::EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, name, body).unwrap();
            } else {
                h.set_size(body.len() as u64);
                // Written raw: tar's own path checks would refuse the hostile names built here.
                let bytes = name.as_bytes();
                h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                h.set_cksum();
                b.append(&h, body.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap().finish().unwrap();
        file
    }

    #[test]
    fn sources_stay_inside_their_directory() {
        let ok = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("a/b.txt", tar::EntryType::Regular, "x"),
        ]);
        assert_eq!(check_source(ok.path(), 1 << 20), Ok(()));
        let up = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("../evil", tar::EntryType::Regular, "x"),
        ]);
        assert!(check_source(up.path(), 1 << 20).unwrap_err().contains("escapes the build context"));
        let abs = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("/etc/passwd", tar::EntryType::Regular, "x"),
        ]);
        assert!(check_source(abs.path(), 1 << 20).is_err());
        let link = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("l", tar::EntryType::Symlink, "../../etc"),
        ]);
        assert!(check_source(link.path(), 1 << 20).unwrap_err().contains("outside the build context"));
        let inner_link = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("a/l", tar::EntryType::Symlink, "../Dockerfile"),
        ]);
        assert_eq!(check_source(inner_link.path(), 1 << 20), Ok(()));
        let none = archive(&[("app.js", tar::EntryType::Regular, "x")]);
        assert!(check_source(none.path(), 1 << 20).unwrap_err().contains("no Dockerfile"));
        let big = archive(&[
            ("Dockerfile", tar::EntryType::Regular, "FROM scratch"),
            ("big", tar::EntryType::Regular, &"x".repeat(4096)),
        ]);
        assert!(check_source(big.path(), 1024).unwrap_err().contains("unpacks to more than"));
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), b"not a tarball").unwrap();
        assert!(check_source(junk.path(), 1 << 20).unwrap_err().contains("gzip"));
    }

    #[test]
    fn tag_patterns_are_checked() {
        assert!(tag_regex("^v[0-9]+\\.").unwrap().is_match("v1.2"));
        assert!(tag_regex("v(1").is_err());
    }
}
