//! Image archives: `POST /api/v1/orgs/{org}/images` takes an `oci-archive` or
//! `docker save` tar, verifies it and stores its blobs in the store (chunked,
//! so every operator serves them); `/v2/…` serves them read-only over the OCI
//! distribution API, so node agents pull uploads like any registry image.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::IntoParams;
use zeitwork_api_types::{validate, Role, TokenScope, UploadedImage, ARCHIVE_REGISTRY};
use zeitwork_store::{nanoid, Audit, StoredArchive, BLOB_CHUNK};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::AppState;

#[derive(Debug, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Repository name of the image under the org (usually the project's name).
    pub name: String,
}

fn digest_ok(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Upload an image archive (`oci-archive` or `docker save` tar) to deploy without a registry.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/images", tag = "images",
    params(("org" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "an oci-archive or docker save tar"),
    responses((status = 201, body = UploadedImage), (status = 400, body = zeitwork_api_types::ApiError),
        (status = 403, body = zeitwork_api_types::ApiError), (status = 413, body = zeitwork_api_types::ApiError)))]
pub async fn upload_image(
    State(s): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    QueryParams(q): QueryParams<UploadQuery>,
    body: Body,
) -> ApiResult<Response> {
    validate::dns_label("org", &org)?;
    validate::dns_label("name", &q.name)?;
    s.require_role(&caller, &org, Role::Developer, "image.upload", &format!("{org}/{}", q.name)).await?;
    s.store.get_org(&org).await?;
    let max = s.config.max_archive_bytes;
    let up = receive(&s, body, "upload.tar", max, || {
        format!("the archive is larger than {max} bytes (the operator's max_archive_bytes)")
    })
    .await?;
    let (work, tar, received) = (up.dir, up.path, up.size);
    if received == 0 {
        return Err(ApiError::InvalidBody(
            "the body is empty; send the archive (oci-archive or docker save tar)".into(),
        ));
    }
    let audit = caller.audit("image.upload", format!("{org}/{}", q.name)).org(&org);
    let body = store_archive(&s, &org, &q.name, &tar, work.path(), Some(caller.token_id.clone()), audit).await?;
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// A request body written to a file of its own scratch directory.
pub(crate) struct Received {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub size: u64,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
}

/// Writes `body` to `name` in a new scratch directory under the data dir, refusing
/// (413, with `too_large`'s message) once it passes `max` bytes.
pub(crate) async fn receive(
    s: &AppState,
    body: Body,
    name: &str,
    max: u64,
    too_large: impl FnOnce() -> String,
) -> ApiResult<Received> {
    use sha2::Digest;
    let tmp = s.config.data_dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| ApiError::internal("creating the upload directory", e))?;
    let dir = tempfile::tempdir_in(&tmp).map_err(|e| ApiError::internal("creating an upload directory", e))?;
    let path = dir.path().join(name);
    let mut file = tokio::fs::File::create(&path).await.map_err(|e| ApiError::internal("storing an upload", e))?;
    let mut hash = sha2::Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidBody(format!("the upload broke off: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(ApiError::TooLarge(too_large()));
        }
        hash.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| ApiError::internal("storing an upload", e))?;
    }
    file.flush().await.map_err(|e| ApiError::internal("storing an upload", e))?;
    Ok(Received { dir, path, size, digest: format!("sha256:{}", hex::encode(hash.finalize())) })
}

/// Verifies the image archive at `tar` and stores its blobs and record for
/// `org/name` (`work`: a scratch directory next to it).
pub(crate) async fn store_archive(
    s: &AppState,
    org: &str,
    name: &str,
    tar: &std::path::Path,
    work: &std::path::Path,
    created_by: Option<String>,
    audit: Audit,
) -> ApiResult<UploadedImage> {
    let max = s.config.max_archive_bytes;
    let org = org.to_owned();
    let unpack = work.join("files");
    std::fs::create_dir(&unpack).map_err(|e| ApiError::internal("storing an upload", e))?;
    let read = {
        let (tar, unpack) = (tar.to_path_buf(), unpack.clone());
        tokio::task::spawn_blocking(move || zeitwork_image::archive::read_archive(&tar, &unpack, max.saturating_mul(4)))
            .await
            .map_err(|e| ApiError::internal("storing an upload", e))?
    };
    let archive = read.map_err(|e| match e {
        zeitwork_image::ImageError::TooLarge(m) => ApiError::TooLarge(m),
        other => ApiError::InvalidBody(format!("the archive is not a usable image: {other}")),
    })?;
    if let Err(e) = std::fs::remove_file(tar) {
        tracing::warn!(path = %tar.display(), error = %e, "an uploaded archive stays on disk");
    }
    // Whether *this organisation* already had the image; identical bytes
    // held by another organisation are shared silently, never revealed.
    let existing = s.store.find_archive(&org, name, &archive.manifest_digest).await?.is_some();
    for blob in &archive.blobs {
        store_blob_file(s, &blob.digest, blob.size, &blob.path).await?;
    }
    let manifest_len = archive.manifest.len() as i64;
    if s.store.blob_size(&archive.manifest_digest).await? != Some(manifest_len) {
        s.store.put_blob_chunk(&archive.manifest_digest, 0, archive.manifest.clone()).await?;
        s.store.finish_blob(&archive.manifest_digest, manifest_len).await?;
    }
    let size: u64 = archive.blobs.iter().map(|b| b.size).sum();
    let stored = StoredArchive {
        id: format!("img_{}", nanoid(12)),
        org: org.clone(),
        name: name.to_owned(),
        manifest_digest: archive.manifest_digest.clone(),
        media_type: archive.manifest_media_type.clone(),
        blobs: archive.blobs.iter().map(|b| b.digest.clone()).collect(),
        size: size as i64,
        created_by,
    };
    let image = format!("{ARCHIVE_REGISTRY}/{org}/{}@{}", name, archive.manifest_digest);
    let audit = Audit { target: image.clone(), ..audit }.detail(serde_json::json!({"size": size}));
    s.store.create_archive(&stored, &audit).await?;
    tracing::info!(%image, size, "image archive stored");
    let body = UploadedImage {
        image,
        digest: archive.manifest_digest,
        size,
        layers: archive.blobs.len().saturating_sub(1) as u32,
        existing,
    };
    Ok(body)
}

// ------------------------------------------------------------ registry API

fn registry_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut res = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"zeitwork\""));
    }
    res
}

/// Seconds in a validity window of pull credentials: a credential is the
/// same for a whole window (so assignment lists stay stable for long polls)
/// and valid until the end of the next one.
const PULL_WINDOW_SECS: i64 = 24 * 3600;
const PULL_PREFIX: &str = "zwpull";

/// `(org, name)` of an uploaded image's reference (`archive.zeitwork/ORG/NAME@…`).
pub fn archive_repository(image: &str) -> Option<(&str, &str)> {
    let host = image.get(..ARCHIVE_REGISTRY.len())?;
    if !host.eq_ignore_ascii_case(ARCHIVE_REGISTRY) {
        return None;
    }
    let rest = image[ARCHIVE_REGISTRY.len()..].strip_prefix('/')?;
    let path = rest.split(['@', ':']).next()?;
    path.split_once('/')
}

fn pull_message(org: &str, name: &str, expires: i64) -> String {
    format!("pull\n{org}/{name}\n{expires}")
}

/// The password a node agent presents to pull `org/name` for a deployment placed on it.
pub fn pull_credential(cipher: &crate::secrets::Cipher, org: &str, name: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let expires = (now / PULL_WINDOW_SECS + 2) * PULL_WINDOW_SECS;
    format!("{PULL_PREFIX}.{expires}.{}", cipher.sign(&pull_message(org, name, expires)))
}

/// Whether `password` is a live pull credential for `org/name`.
fn pull_credential_ok(cipher: &crate::secrets::Cipher, password: &str, org: &str, name: &str) -> bool {
    let mut parts = password.split('.');
    let (Some(PULL_PREFIX), Some(expires), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(expires) = expires.parse::<i64>() else { return false };
    expires > chrono::Utc::now().timestamp() && cipher.verify(&pull_message(org, name, expires), sig)
}

/// Who may pull `org`'s archives: platform admins, the org's members, and a
/// node agent with the pull credential of that repository (issued with an
/// assignment of it); a node agent's own token pulls nothing.
async fn may_pull(s: &AppState, headers: &HeaderMap, repository: Option<(&str, &str)>) -> Result<(), Response> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let token = if let Some(b) = value.strip_prefix("Bearer ") {
        Some(b.trim().to_owned())
    } else if let Some(basic) = value.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|up| up.split_once(':').map(|(_, p)| p.to_owned()))
    } else {
        None
    };
    let unauthorized =
        || registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "send a Zeitwork token as the password");
    let Some(token) = token else { return Err(unauthorized()) };
    if token.starts_with(PULL_PREFIX) {
        return match repository {
            Some((org, name)) if pull_credential_ok(&s.cipher, &token, org, name) => Ok(()),
            Some(_) => Err(unauthorized()),
            None => Ok(()),
        };
    }
    let caller: Caller = s.authenticate(&token).await.map_err(|_| unauthorized())?;
    let ok = match (&caller.scope, repository) {
        (TokenScope::Admin, _) => true,
        (_, None) => matches!(caller.scope, TokenScope::Org { .. }),
        (_, Some((o, _))) => caller.role_in(o).is_some(),
    };
    if ok {
        Ok(())
    } else {
        Err(registry_error(StatusCode::FORBIDDEN, "DENIED", "this token may not pull these images"))
    }
}

pub async fn registry_root(State(s): State<AppState>, headers: HeaderMap) -> Response {
    match may_pull(&s, &headers, None).await {
        Ok(()) => axum::Json(serde_json::json!({})).into_response(),
        Err(r) => r,
    }
}

pub async fn registry_manifest(
    State(s): State<AppState>,
    headers: HeaderMap,
    method: axum::http::Method,
    Path((org, name, reference)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = may_pull(&s, &headers, Some((&org, &name))).await {
        return r;
    }
    let unknown = || registry_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "no such uploaded image");
    if !digest_ok(&reference) {
        return registry_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "uploaded images are addressed by digest");
    }
    let archive = match s.store.find_archive(&org, &name, &reference).await {
        Ok(Some(a)) => a,
        Ok(None) => return unknown(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let bytes = match s.store.blob_chunk(&archive.manifest_digest, 0).await {
        Ok(Some(b)) => b,
        Ok(None) => return unknown(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut res = if method == axum::http::Method::HEAD {
        let mut r = StatusCode::OK.into_response();
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        r
    } else {
        bytes.into_response()
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&archive.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&archive.manifest_digest) {
        h.insert("docker-content-digest", v);
    }
    res
}

pub async fn registry_blob(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((org, name, digest)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = may_pull(&s, &headers, Some((&org, &name))).await {
        return r;
    }
    let unknown = || registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob in this repository");
    if !digest_ok(&digest) || !s.store.archive_names_blob(&org, &name, &digest).await.unwrap_or(false) {
        return unknown();
    }
    let size = match s.store.blob_size(&digest).await {
        Ok(Some(n)) => n,
        _ => return unknown(),
    };
    blob_response(&s.store, digest, size)
}

/// A stored blob of `size` bytes as a streamed response.
pub(crate) fn blob_response(store: &zeitwork_store::Store, digest: String, size: i64) -> Response {
    let chunks = (size + BLOB_CHUNK as i64 - 1) / BLOB_CHUNK as i64;
    let store = store.clone();
    let stream = futures::stream::iter(0..chunks.max(1)).then(move |seq| {
        let (store, digest) = (store.clone(), digest.clone());
        async move {
            match store.blob_chunk(&digest, seq).await {
                Ok(Some(b)) => Ok(bytes::Bytes::from(b)),
                Ok(None) => Err(std::io::Error::other(format!("chunk {seq} of {digest} is missing"))),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        }
    });
    let mut res = Body::from_stream(stream).into_response();
    res.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    res
}

/// Stores the file at `path` as the blob `digest` (in chunks), unless it is stored already.
pub(crate) async fn store_blob_file(s: &AppState, digest: &str, size: u64, path: &std::path::Path) -> ApiResult<()> {
    if s.store.blob_size(digest).await? == Some(size as i64) {
        return Ok(());
    }
    let mut f = tokio::fs::File::open(path).await.map_err(|e| ApiError::internal("storing an upload", e))?;
    let mut seq = 0i64;
    loop {
        let mut buf = Vec::with_capacity(BLOB_CHUNK);
        let n = (&mut f)
            .take(BLOB_CHUNK as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| ApiError::internal("storing an upload", e))?;
        if n == 0 && seq > 0 {
            break;
        }
        s.store.put_blob_chunk(digest, seq, buf).await?;
        seq += 1;
        if n < BLOB_CHUNK {
            break;
        }
    }
    s.store.finish_blob(digest, size as i64).await?;
    Ok(())
}

/// For deployments of uploaded images: the image must be an archive of the deploying org that exists.
pub async fn check_archive_reference(s: &AppState, org: &str, image: &str) -> ApiResult<()> {
    let Some(rest) = image
        .get(..ARCHIVE_REGISTRY.len())
        .filter(|h| h.eq_ignore_ascii_case(ARCHIVE_REGISTRY))
        .map(|_| &image[ARCHIVE_REGISTRY.len()..])
    else {
        return Ok(());
    };
    let invalid_host = || {
        ApiError::InvalidField(zeitwork_api_types::ValidationError::new(
            "image",
            format!("uploaded images are named {ARCHIVE_REGISTRY}/ORG/NAME@sha256:…"),
        ))
    };
    if !image.starts_with(ARCHIVE_REGISTRY) {
        return Err(invalid_host());
    }
    let Some(rest) = rest.strip_prefix('/') else { return Err(invalid_host()) };
    let invalid = |m: String| ApiError::InvalidField(zeitwork_api_types::ValidationError::new("image", m));
    let (path, digest) = rest.split_once('@').ok_or_else(|| {
        invalid(format!("uploaded images are deployed by digest: {ARCHIVE_REGISTRY}/ORG/NAME@sha256:…"))
    })?;
    let (image_org, name) = path.split_once('/').ok_or_else(|| invalid(format!("{image:?} names no repository")))?;
    if image_org != org {
        return Err(invalid(format!("{image:?} was uploaded to organisation {image_org:?}, not {org:?}")));
    }
    if s.store.find_archive(image_org, name, digest).await?.is_none() {
        return Err(invalid(format!(
            "no uploaded image {image:?}; upload the archive first (zeitwork deploy --archive FILE)"
        )));
    }
    Ok(())
}
