//! A client of the OCI distribution API: manifests (OCI and Docker schema 2,
//! indexes resolved to linux/amd64), blobs streamed to disk with their digest
//! verified, bearer-token and basic auth. Plain HTTP only for registries
//! configured as insecure and for loopback ones.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::reference::Reference;
use crate::ImageError;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Registry settings of a node.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `host[:port]` of registries spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Credentials by registry host: (user, password).
    pub credentials: HashMap<String, (String, String)>,
    /// Where a registry name is really served, by name: a base URL such as
    /// `http://10.0.0.2:5000` (mirrors, and the operator for uploaded archives).
    pub endpoints: HashMap<String, String>,
    /// Seconds a registry may stay silent before the pull fails (default 60).
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// Bearer tokens by (registry, repository).
    tokens: Mutex<HashMap<(String, String), String>>,
    /// Credentials granted for one repository (user, password), ahead of the registry's own.
    granted: Mutex<HashMap<(String, String), (String, String)>>,
    /// Blob downloads made (for tests and metrics).
    pub blob_fetches: AtomicUsize,
}

/// sha256 digest string of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Self {
        // Redirects (blob storage) are followed, but never to an internal address
        // from a registry that is not itself internal: a registry must not make
        // the node fetch from its own network.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let from = attempt.previous().first().and_then(|u| u.host_str()).map(str::to_owned);
            let to = attempt.url().host_str().map(str::to_owned);
            if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else if to.as_deref().is_some_and(internal_host) && !from.as_deref().is_some_and(internal_host) {
                let url = attempt.url().clone();
                attempt.error(format!("refused a redirect to an internal address ({url})"))
            } else {
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .redirect(redirects)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(config.timeout_secs.unwrap_or(60).max(1)))
            .user_agent(concat!("zeitwork/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            config,
            tokens: Mutex::new(HashMap::new()),
            granted: Mutex::new(HashMap::new()),
            blob_fetches: AtomicUsize::new(0),
        }
    }

    /// Uses `credentials` (user, password) for `repository` of `registry` from now on,
    /// in place of the registry-wide ones (a credential scoped to one repository).
    pub fn grant(&self, registry: &str, repository: &str, credentials: (String, String)) {
        let key = (registry.to_owned(), repository.to_owned());
        let mut granted = self.granted.lock().unwrap_or_else(|e| e.into_inner());
        if granted.get(&key) != Some(&credentials) {
            granted.insert(key.clone(), credentials);
            // A cached answer to the old credential may not hold for the new one.
            self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }
    }

    fn base(&self, r: &Reference) -> String {
        if let Some(url) = self.config.endpoints.get(&r.registry) {
            return url.trim_end_matches('/').to_owned();
        }
        let plain = r.is_loopback() || self.config.insecure.iter().any(|h| h == &r.registry);
        format!("{}://{}", if plain { "http" } else { "https" }, r.api_host())
    }

    /// GET with the registry's auth dance: on 401 fetch a bearer token (or use basic auth) and retry once.
    async fn get(&self, r: &Reference, path: &str, accept: &str) -> Result<reqwest::Response, ImageError> {
        let url = format!("{}/v2/{}/{path}", self.base(r), r.repository);
        let key = (r.registry.clone(), r.repository.clone());
        let cached = self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let send = |auth: Option<String>| {
            let mut req = self.http.get(&url).header(ACCEPT, accept);
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            req.send()
        };
        let unreachable = |e: reqwest::Error| ImageError::Registry(format!("{}: {e}", r.registry));
        let res = send(cached.clone()).await.map_err(unreachable)?;
        if res.status() != StatusCode::UNAUTHORIZED {
            return Ok(res);
        }
        let challenge = res.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let auth = self.authorize(r, &challenge).await?;
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(key, auth.clone());
        let res = send(Some(auth)).await.map_err(unreachable)?;
        if res.status() == StatusCode::UNAUTHORIZED {
            return Err(ImageError::Unauthorized(format!(
                "{} refused the credentials for {}; set them in the node's registry credentials",
                r.registry, r.repository
            )));
        }
        Ok(res)
    }

    async fn authorize(&self, r: &Reference, challenge: &str) -> Result<String, ImageError> {
        let granted = self
            .granted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(r.registry.clone(), r.repository.clone()))
            .cloned();
        let creds = granted.as_ref().or_else(|| self.config.credentials.get(&r.registry));
        let basic = creds
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return basic.ok_or_else(|| {
                ImageError::Unauthorized(format!("{} needs credentials for {}", r.registry, r.repository))
            });
        };
        let field = |name: &str| {
            params.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        let realm = field("realm")
            .ok_or_else(|| ImageError::Registry(format!("{}: bearer challenge without realm", r.registry)))?;
        self.check_realm(r, &realm).await?;
        let mut req = self
            .http
            .get(&realm)
            .query(&[("scope", field("scope").unwrap_or_else(|| format!("repository:{}:pull", r.repository)))]);
        if let Some(service) = field("service") {
            req = req.query(&[("service", service)]);
        }
        if let Some(b) = basic {
            req = req.header(AUTHORIZATION, b);
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let res = req.send().await.map_err(|e| ImageError::Registry(format!("token from {realm}: {e}")))?;
        if !res.status().is_success() {
            return Err(ImageError::Unauthorized(format!(
                "{realm} refused a pull token for {} ({})",
                r.repository,
                res.status()
            )));
        }
        let t: Token = res.json().await.map_err(|e| ImageError::Registry(format!("token from {realm}: {e}")))?;
        t.token
            .or(t.access_token)
            .map(|t| format!("Bearer {t}"))
            .ok_or_else(|| ImageError::Registry(format!("{realm} sent no token")))
    }

    /// A registry may send the node for its token anywhere public, or to its
    /// own host; never to a loopback, private or link-local address it does not
    /// live on itself (the token request would carry the node's credentials
    /// there and the answer would be sent on as a bearer token).
    async fn check_realm(&self, r: &Reference, realm: &str) -> Result<(), ImageError> {
        let refused =
            |why: &str| ImageError::Unauthorized(format!("{}: refused the token service it named ({why})", r.registry));
        let url = reqwest::Url::parse(realm).map_err(|_| refused("not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused("not http or https"));
        }
        let host = url.host_str().ok_or_else(|| refused("no host"))?.trim_start_matches('[').trim_end_matches(']');
        let base = self.base(r);
        let registry_host = reqwest::Url::parse(&base).ok().and_then(|u| u.host_str().map(str::to_owned));
        let registry_host = registry_host.as_deref().map(|h| h.trim_start_matches('[').trim_end_matches(']'));
        if registry_host == Some(host) || self.config.insecure.iter().any(|h| h.split(':').next() == Some(host)) {
            return Ok(());
        }
        if internal_host(host) {
            return Err(refused("an internal address"));
        }
        let port = url.port_or_known_default().unwrap_or(443);
        if let Ok(addrs) = tokio::net::lookup_host((host, port)).await {
            for a in addrs {
                if internal_ip(a.ip()) {
                    return Err(refused("it resolves to an internal address"));
                }
            }
        }
        Ok(())
    }

    /// The image manifest for linux/amd64 and its digest.
    pub async fn manifest(&self, r: &Reference) -> Result<(Manifest, String), ImageError> {
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let mut wanted = r.manifest_ref().to_owned();
        for _ in 0..2 {
            let res = self.get(r, &format!("manifests/{wanted}"), &accept).await?;
            match res.status() {
                s if s.is_success() => {}
                StatusCode::NOT_FOUND => {
                    return Err(ImageError::NotFound(format!("{r} does not exist in {}", r.registry)))
                }
                s => return Err(ImageError::Registry(format!("{} answered {s} for the manifest of {r}", r.registry))),
            }
            if res.content_length().is_some_and(|l| l as usize > MAX_MANIFEST_BYTES) {
                return Err(ImageError::TooLarge(format!(
                    "the manifest of {r} is larger than {MAX_MANIFEST_BYTES} bytes"
                )));
            }
            let media = res
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let body = read_limited(res, MAX_MANIFEST_BYTES).await?;
            let digest = digest_of(&body);
            if wanted.starts_with("sha256:") && digest != wanted {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest of {r}"),
                    expected: wanted,
                    got: digest,
                });
            }
            let value: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| ImageError::BadManifest(e.to_string()))?;
            let media = if media.is_empty() { value["mediaType"].as_str().unwrap_or("").to_owned() } else { media };
            match media.as_str() {
                OCI_INDEX | DOCKER_LIST => {
                    let index: Index =
                        serde_json::from_value(value).map_err(|e| ImageError::BadManifest(e.to_string()))?;
                    let m = index
                        .manifests
                        .iter()
                        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
                        .ok_or_else(|| ImageError::BadManifest(format!("{r} has no linux/amd64 image")))?;
                    wanted = m.digest.clone();
                }
                OCI_MANIFEST | DOCKER_MANIFEST => {
                    let m: Manifest =
                        serde_json::from_value(value).map_err(|e| ImageError::BadManifest(e.to_string()))?;
                    return Ok((m, digest));
                }
                other => return Err(ImageError::BadManifest(format!("unsupported manifest media type {other:?}"))),
            }
        }
        Err(ImageError::BadManifest(format!("{r}: an index points at another index")))
    }

    /// Streams a blob to `dest`, verifying its size and digest; nothing is left on failure.
    pub async fn blob(&self, r: &Reference, d: &Descriptor, dest: &Path, max: u64) -> Result<(), ImageError> {
        if d.size > max {
            return Err(ImageError::TooLarge(format!(
                "blob {} is {} bytes, more than the limit of {max}",
                d.digest, d.size
            )));
        }
        self.blob_fetches.fetch_add(1, Ordering::Relaxed);
        let res = self.get(r, &format!("blobs/{}", d.digest), "*/*").await?;
        if !res.status().is_success() {
            return Err(ImageError::Registry(format!(
                "{} answered {} for blob {}",
                r.registry,
                res.status(),
                d.digest
            )));
        }
        let tmp = dest.with_extension(format!("part-{}", rand::random::<u32>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(ImageError::io("writing a blob"))?;
            let mut hasher = Sha256::new();
            let mut n: u64 = 0;
            let mut res = res;
            while let Some(chunk) =
                res.chunk().await.map_err(|e| ImageError::Registry(format!("blob {}: {e}", d.digest)))?
            {
                n += chunk.len() as u64;
                if n > d.size {
                    return Err(ImageError::DigestMismatch {
                        what: format!("blob {}", d.digest),
                        expected: format!("{} bytes", d.size),
                        got: "more".into(),
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(ImageError::io("writing a blob"))?;
            }
            file.sync_all().await.map_err(ImageError::io("writing a blob"))?;
            let got = format!("sha256:{}", hex::encode(hasher.finalize()));
            if got != d.digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("blob of {r}"),
                    expected: d.digest.clone(),
                    got,
                });
            }
            tokio::fs::rename(&tmp, dest).await.map_err(ImageError::io("storing a blob"))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            match tokio::fs::remove_file(&tmp).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %tmp.display(), error = %e, "a partial blob stays on disk")
                }
                _ => {}
            }
        }
        result
    }
}

async fn read_limited(mut res: reqwest::Response, max: usize) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    while let Some(c) = res.chunk().await.map_err(|e| ImageError::Registry(e.to_string()))? {
        out.extend_from_slice(&c);
        if out.len() > max {
            return Err(ImageError::TooLarge(format!("a manifest is larger than {max} bytes")));
        }
    }
    Ok(out)
}

/// Loopback, private, shared, link-local, unspecified and multicast addresses.
pub fn internal_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        std::net::IpAddr::V6(v6) => {
            let seg = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg & 0xfe00) == 0xfc00
                || (seg & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| internal_ip(v4.into()))
        }
    }
}

/// Whether a host name is an internal address literal or a local name.
pub fn internal_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lower = host.to_ascii_lowercase();
    lower == "localhost" || lower.ends_with(".localhost") || host.parse().is_ok_and(internal_ip)
}

#[cfg(test)]
mod ssrf_tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for h in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "192.168.1.1",
            "100.64.0.1",
            "localhost",
            "a.localhost",
            "[::1]",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(internal_host(h), "{h}");
        }
        for h in ["registry-1.docker.io", "8.8.8.8", "2001:db8::1", "auth.docker.io"] {
            assert!(!internal_host(h), "{h}");
        }
    }
}
