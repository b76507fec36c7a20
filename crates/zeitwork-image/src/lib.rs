//! The image pipeline: turns an image reference into a read-only root
//! filesystem (for containers) and an ext4 image (for microVMs), cached by
//! manifest digest. Blobs are verified against their digests and stored
//! content-addressed; concurrent requests for one image share one pull.
//!
//! It writes only under its own directory and never runs what it unpacks.

pub mod archive;
pub mod reference;
pub mod registry;
pub mod unpack;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell};

pub use reference::Reference;
pub use registry::{RegistryClient, RegistryConfig};

/// Why an image could not be prepared; each says what was wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference: {0}")]
    BadReference(String),
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("registry refused access: {0}")]
    Unauthorized(String),
    #[error("registry error: {0}")]
    Registry(String),
    #[error("invalid manifest: {0}")]
    BadManifest(String),
    #[error("{what} does not match its digest: expected {expected}, got {got}")]
    DigestMismatch { what: String, expected: String, got: String },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("layer {layer} is refused: {reason}")]
    BadLayer { layer: String, reason: String },
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("{context}: {message}")]
    Io { context: &'static str, message: String },
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

impl ImageError {
    pub(crate) fn io(context: &'static str) -> impl Fn(std::io::Error) -> ImageError {
        move |e| ImageError::Io { context, message: e.to_string() }
    }
}

/// How to run the image, from its config blob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<HashMap<String, serde_json::Value>>,
}

/// A pulled and unpacked image.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub reference: String,
    pub manifest_digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// Limits on what an image may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_layer_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_layer_bytes: 4 << 30, max_unpacked_bytes: 16 << 30, max_entries: 1_000_000 }
    }
}

type Shared = Arc<OnceCell<Result<Arc<PreparedImage>, ImageError>>>;

/// The image cache of a node.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    pub client: RegistryClient,
    limits: Limits,
    inflight: Mutex<HashMap<String, Shared>>,
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    pub fn new(dir: &Path, registries: RegistryConfig, limits: Limits) -> Result<Self, ImageError> {
        for sub in ["blobs/sha256", "rootfs", "ext4", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(ImageError::io("creating the image cache"))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            client: RegistryClient::new(registries),
            limits,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Pulls (or finds in the cache) and unpacks `reference`.
    pub async fn prepare(&self, reference: &str) -> Result<Arc<PreparedImage>, ImageError> {
        let r = Reference::parse(reference)?;
        let (manifest, digest) = self.client.manifest(&r).await?;
        let cell = {
            let mut inflight = self.inflight.lock().await;
            inflight.entry(digest.clone()).or_default().clone()
        };
        let result = cell.get_or_init(|| self.build(&r, manifest, digest.clone())).await.clone();
        match &result {
            // A failure is not cached: the next request tries again.
            Err(_) => drop(self.inflight.lock().await.remove(&digest)),
            // Last use, for garbage collection.
            Ok(_) => {
                let path = self.dir.join("rootfs").join(format!("{}.json", hex_of(&digest)));
                if let Ok(f) = std::fs::File::options().append(true).open(path) {
                    if let Err(e) = f.set_modified(std::time::SystemTime::now()) {
                        tracing::debug!(digest = %digest, error = %e, "last use not recorded; GC may see the image as older");
                    }
                }
            }
        }
        result
    }

    /// Bytes the cache holds (blobs, root filesystems, ext4 images).
    pub fn usage(&self) -> u64 {
        ["blobs", "rootfs", "ext4"].iter().map(|d| dir_size(&self.dir.join(d))).sum()
    }

    /// Removes least recently used images until the cache fits in `budget`
    /// bytes. Never removes an image whose digest is in `keep` (instances
    /// run on it) or that was used within `min_age`. Blobs shared with a
    /// kept image stay. Returns the digests removed.
    pub async fn gc(&self, budget: u64, keep: &HashSet<String>, min_age: std::time::Duration) -> Vec<String> {
        let mut inflight = self.inflight.lock().await;
        let dir = self.dir.clone();
        let keep = keep.clone();
        let removed =
            tokio::task::spawn_blocking(move || gc_blocking(&dir, budget, &keep, min_age)).await.unwrap_or_default();
        for d in &removed {
            inflight.remove(d);
        }
        removed
    }

    async fn build(
        &self,
        r: &Reference,
        manifest: registry::Manifest,
        digest: String,
    ) -> Result<Arc<PreparedImage>, ImageError> {
        let rootfs = self.dir.join("rootfs").join(hex_of(&digest));
        let config_path = self.dir.join("rootfs").join(format!("{}.json", hex_of(&digest)));
        if let (true, Ok(text)) = (rootfs.is_dir(), std::fs::read_to_string(&config_path)) {
            if let Ok(config) = serde_json::from_str(&text) {
                return Ok(Arc::new(PreparedImage {
                    reference: r.to_string(),
                    manifest_digest: digest,
                    rootfs,
                    config,
                }));
            }
        }
        let blob_path = |d: &str| self.dir.join("blobs/sha256").join(hex_of(d));
        let mut wanted = vec![manifest.config.clone()];
        wanted.extend(manifest.layers.iter().cloned());
        for d in &wanted {
            if !d.digest.starts_with("sha256:")
                || hex_of(&d.digest).len() != 64
                || !hex_of(&d.digest).bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(ImageError::BadManifest(format!("unsupported digest {:?}", d.digest)));
            }
            let path = blob_path(&d.digest);
            if !path.exists() {
                self.client.blob(r, d, &path, self.limits.max_layer_bytes).await?;
            }
        }
        let config_bytes =
            std::fs::read(blob_path(&manifest.config.digest)).map_err(ImageError::io("reading the image config"))?;
        let blob: ConfigBlob =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::BadManifest(format!("image config: {e}")))?;
        let run = blob.config.unwrap_or_default();
        let mut ports: Vec<String> = run.exposed_ports.map(|p| p.into_keys().collect()).unwrap_or_default();
        ports.sort();
        let config = ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            exposed_ports: ports,
        };

        // Unpack into a staging directory, then move it into place in one rename.
        let staging = self.dir.join("tmp").join(format!("{}-{}", hex_of(&digest), rand::random::<u32>()));
        let layers: Vec<(String, String, PathBuf)> =
            manifest.layers.iter().map(|l| (l.digest.clone(), l.media_type.clone(), blob_path(&l.digest))).collect();
        let limits = self.limits;
        let stage = staging.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            std::fs::create_dir_all(&stage).map_err(ImageError::io("creating the staging directory"))?;
            let mut budget = unpack::Budget::new(limits.max_unpacked_bytes, limits.max_entries);
            for (digest, media, path) in layers {
                let file = std::fs::File::open(&path).map_err(ImageError::io("opening a layer"))?;
                let reader = std::io::BufReader::new(file);
                match media.as_str() {
                    m if m.ends_with("tar+gzip")
                        || m.ends_with(".tar.gzip")
                        || m == "application/vnd.docker.image.rootfs.diff.tar.gzip" =>
                    {
                        unpack::apply_layer(&stage, &digest, flate2::bufread::GzDecoder::new(reader), &mut budget)?
                    }
                    m if m.ends_with("tar+zstd") => {
                        let dec = ruzstd::decoding::StreamingDecoder::new(reader)
                            .map_err(|e| ImageError::BadLayer { layer: digest.clone(), reason: e.to_string() })?;
                        unpack::apply_layer(&stage, &digest, dec, &mut budget)?
                    }
                    m if m.ends_with(".tar") || m.ends_with("layer.v1.tar") => {
                        unpack::apply_layer(&stage, &digest, reader, &mut budget)?
                    }
                    other => return Err(ImageError::UnsupportedMediaType(other.to_owned())),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| ImageError::Io { context: "unpacking", message: e.to_string() })?;
        if let Err(e) = unpacked {
            remove_logged(&staging);
            return Err(e);
        }
        let blob_list: Vec<&str> = wanted.iter().map(|d| d.digest.as_str()).collect();
        std::fs::write(config_path.with_extension("blobs"), blob_list.join("\n"))
            .map_err(ImageError::io("writing the image's blob list"))?;
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap_or_default())
            .map_err(ImageError::io("writing the image config"))?;
        if let Err(e) = std::fs::rename(&staging, &rootfs) {
            remove_logged(&staging);
            if !rootfs.is_dir() {
                return Err(ImageError::Io { context: "storing the root filesystem", message: e.to_string() });
            }
        }
        tracing::info!(image = %r, digest = %digest, "image unpacked");
        Ok(Arc::new(PreparedImage { reference: r.to_string(), manifest_digest: digest, rootfs, config }))
    }

    /// An ext4 image of the root filesystem (for VM runtimes), built once per digest.
    pub async fn ext4(&self, image: &PreparedImage) -> Result<PathBuf, ImageError> {
        let out = self.dir.join("ext4").join(format!("{}.img", hex_of(&image.manifest_digest)));
        if out.exists() {
            return Ok(out);
        }
        let rootfs = image.rootfs.clone();
        let tmp = out.with_extension(format!("tmp-{}", rand::random::<u32>()));
        let dest = out.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            let used = dir_size(&rootfs);
            // Room for metadata and a little slack; the instance writes to an overlay.
            let size_mb = (used / (1024 * 1024)) * 5 / 4 + 64;
            let res = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "zeitwork", "-E", "root_owner=0:0", "-d"])
                .arg(&rootfs)
                .arg(&tmp)
                .arg(format!("{size_mb}M"))
                .output()
                .map_err(|e| ImageError::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
            if !res.status.success() {
                remove_logged(&tmp);
                return Err(ImageError::Mkfs(String::from_utf8_lossy(&res.stderr).trim().to_owned()));
            }
            std::fs::rename(&tmp, &dest).map_err(ImageError::io("storing the ext4 image"))
        })
        .await
        .map_err(|e| ImageError::Mkfs(e.to_string()))??;
        Ok(out)
    }
}

/// One cached image, for garbage collection.
struct Cached {
    digest: String,
    used: std::time::SystemTime,
    blobs: Vec<String>,
}

fn gc_blocking(dir: &Path, budget: u64, keep: &HashSet<String>, min_age: std::time::Duration) -> Vec<String> {
    let mut usage: u64 = ["blobs", "rootfs", "ext4"].iter().map(|d| dir_size(&dir.join(d))).sum();
    if usage <= budget {
        return Vec::new();
    }
    let mut images: Vec<Cached> = std::fs::read_dir(dir.join("rootfs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json")?.to_owned();
            let used = e.metadata().and_then(|m| m.modified()).ok()?;
            let blobs = std::fs::read_to_string(e.path().with_extension("blobs"))
                .map(|t| t.lines().map(str::to_owned).collect())
                .unwrap_or_default();
            Some(Cached { digest: format!("sha256:{hex}"), used, blobs })
        })
        .collect();
    images.sort_by_key(|c| c.used);
    let now = std::time::SystemTime::now();
    let mut removed = Vec::new();
    let mut gone = HashSet::new();
    for i in 0..images.len() {
        if usage <= budget {
            break;
        }
        let c = &images[i];
        let recent = now.duration_since(c.used).map_or(true, |age| age < min_age);
        if keep.contains(&c.digest) || recent {
            continue;
        }
        let hex = hex_of(&c.digest);
        let rootfs = dir.join("rootfs").join(hex);
        let ext4 = dir.join("ext4").join(format!("{hex}.img"));
        let mut freed = dir_size(&rootfs) + std::fs::metadata(&ext4).map(|m| m.len()).unwrap_or(0);
        // Metadata first: a half-removed image is then simply not cached.
        remove_logged(&dir.join("rootfs").join(format!("{hex}.json")));
        remove_logged(&dir.join("rootfs").join(format!("{hex}.blobs")));
        remove_logged(&rootfs);
        remove_logged(&ext4);
        gone.insert(i);
        let still_used = |b: &String| images.iter().enumerate().any(|(j, o)| !gone.contains(&j) && o.blobs.contains(b));
        for b in &c.blobs {
            if !still_used(b) {
                let path = dir.join("blobs/sha256").join(hex_of(b));
                freed += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                remove_logged(&path);
            }
        }
        tracing::info!(digest = %c.digest, freed, "image removed from the cache");
        usage = usage.saturating_sub(freed);
        removed.push(c.digest.clone());
    }
    removed
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_dir() && !m.file_type().is_symlink() {
                        stack.push(e.path());
                    } else {
                        total += m.len();
                    }
                }
            }
        }
    }
    total
}

/// Removes a file or a directory tree of the cache; one that is already
/// gone is fine, any other failure is logged with what stays on disk.
pub(crate) fn remove_logged(path: &Path) {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove; it stays on disk")
        }
        _ => {}
    }
}
