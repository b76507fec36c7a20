//! Image archives: reading an `oci-archive` (an OCI image layout in a tar) or
//! a `docker save` tar into verified blobs and one OCI manifest, and writing
//! an OCI archive from layers (how Zeitwork builds images without Docker).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::registry::{Descriptor, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::ImageError;

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A blob of an unpacked archive, on disk and verified.
#[derive(Debug, Clone)]
pub struct ArchiveBlob {
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

/// An archive read into a directory: its manifest and every blob it names.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    pub manifest: Vec<u8>,
    pub manifest_media_type: String,
    pub manifest_digest: String,
    /// Config first, then the layers in order.
    pub blobs: Vec<ArchiveBlob>,
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadManifest(msg.into())
}

fn sha256_file(path: &Path) -> Result<(String, u64), ImageError> {
    let mut f = std::fs::File::open(path).map_err(ImageError::io("reading an archive file"))?;
    let (mut h, mut buf, mut n) = (Sha256::new(), vec![0u8; 1 << 16], 0u64);
    loop {
        let r = f.read(&mut buf).map_err(ImageError::io("reading an archive file"))?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// A path inside the archive, normalised (`./a/b` is `a/b`); `None` when it
/// leaves the archive.
fn clean(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Reads the archive at `tar` into `work` (which it fills with its regular
/// files) and returns the image, every blob checked against its digest.
/// `max_bytes` caps what the archive may unpack to.
pub fn read_archive(tar: &Path, work: &Path, max_bytes: u64) -> Result<ImageArchive, ImageError> {
    let file = std::fs::File::open(tar).map_err(ImageError::io("opening the archive"))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let mut total = 0u64;
    let entries = archive.entries().map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| bad(format!("not a readable tar archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| bad(format!("a file name in the archive: {e}")))?.into_owned();
        let name = clean(&path).ok_or_else(|| bad(format!("the archive names a path outside itself: {path:?}")))?;
        total += entry.size();
        if total > max_bytes {
            return Err(ImageError::TooLarge(format!("the archive unpacks to more than {max_bytes} bytes")));
        }
        let dest = work.join(format!("f{n}"));
        let mut out = std::fs::File::create(&dest).map_err(ImageError::io("unpacking the archive"))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| bad(format!("{name}: {e}")))?;
        files.insert(name, dest);
    }
    if files.contains_key("index.json") {
        read_oci_layout(&files)
    } else if files.contains_key("manifest.json") {
        read_docker_save(&files)
    } else {
        Err(bad("not an image archive: it has neither index.json (oci-archive) nor manifest.json (docker save)"))
    }
}

fn read_json<T: for<'a> Deserialize<'a>>(files: &HashMap<String, PathBuf>, name: &str) -> Result<T, ImageError> {
    let path = files.get(name).ok_or_else(|| bad(format!("{name} is missing from the archive")))?;
    let bytes = std::fs::read(path).map_err(ImageError::io("reading the archive"))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("{name}: {e}")))
}

/// The file of a blob in an OCI layout, verified against its descriptor.
fn layout_blob(files: &HashMap<String, PathBuf>, d: &Descriptor) -> Result<ArchiveBlob, ImageError> {
    let (alg, hex) = d.digest.split_once(':').ok_or_else(|| bad(format!("bad digest {:?}", d.digest)))?;
    if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("unsupported digest {:?}", d.digest)));
    }
    let name = format!("blobs/sha256/{hex}");
    let path = files.get(&name).ok_or_else(|| bad(format!("{name} is missing from the archive")))?;
    let (got, size) = sha256_file(path)?;
    if got != d.digest {
        return Err(ImageError::DigestMismatch { what: name, expected: d.digest.clone(), got });
    }
    if size != d.size {
        return Err(bad(format!("{name} is {size} bytes, its descriptor says {}", d.size)));
    }
    Ok(ArchiveBlob { digest: got, size, path: path.clone() })
}

fn read_oci_layout(files: &HashMap<String, PathBuf>) -> Result<ImageArchive, ImageError> {
    #[derive(Deserialize)]
    struct Index {
        manifests: Vec<Descriptor>,
    }
    let mut index: Index = read_json(files, "index.json")?;
    // Nested indexes (multi-platform images) resolve to linux/amd64.
    for _ in 0..4 {
        let pick = index
            .manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .or_else(|| index.manifests.iter().find(|d| d.platform.is_none()))
            .or(index.manifests.first())
            .cloned()
            .ok_or_else(|| bad("index.json lists no image"))?;
        let blob = layout_blob(files, &pick)?;
        let bytes = std::fs::read(&blob.path).map_err(ImageError::io("reading the archive"))?;
        if pick.media_type == OCI_INDEX || pick.media_type == DOCKER_LIST {
            index = serde_json::from_slice(&bytes).map_err(|e| bad(format!("nested index: {e}")))?;
            continue;
        }
        let manifest: crate::registry::Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest {}: {e}", pick.digest)))?;
        let mut blobs = vec![layout_blob(files, &manifest.config)?];
        for l in &manifest.layers {
            blobs.push(layout_blob(files, l)?);
        }
        let media_type = manifest.media_type.clone().unwrap_or_else(|| {
            if pick.media_type.is_empty() {
                OCI_MANIFEST.to_owned()
            } else {
                pick.media_type.clone()
            }
        });
        if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
            return Err(ImageError::UnsupportedMediaType(media_type));
        }
        return Ok(ImageArchive {
            manifest_digest: blob.digest,
            manifest: bytes,
            manifest_media_type: media_type,
            blobs,
        });
    }
    Err(bad("index.json nests indexes too deeply"))
}

fn read_docker_save(files: &HashMap<String, PathBuf>) -> Result<ImageArchive, ImageError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        layers: Vec<String>,
    }
    let entries: Vec<Entry> = read_json(files, "manifest.json")?;
    let entry = entries.into_iter().next().ok_or_else(|| bad("manifest.json lists no image"))?;
    let find = |name: &str| -> Result<ArchiveBlob, ImageError> {
        let key = clean(Path::new(name)).ok_or_else(|| bad(format!("manifest.json names {name:?}")))?;
        let path = files.get(&key).ok_or_else(|| bad(format!("{name} is missing from the archive")))?;
        let (digest, size) = sha256_file(path)?;
        Ok(ArchiveBlob { digest, size, path: path.clone() })
    };
    let config = find(&entry.config)?;
    let config_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config.path).map_err(ImageError::io("reading the archive"))?)
            .map_err(|e| bad(format!("image config {}: {e}", entry.config)))?;
    if !config_json.is_object() {
        return Err(bad("the image config is not a JSON object"));
    }
    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    for name in &entry.layers {
        let blob = find(name)?;
        let mut magic = [0u8; 2];
        let gz =
            std::fs::File::open(&blob.path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b];
        descriptors.push(
            json!({"mediaType": if gz { OCI_LAYER_GZIP } else { OCI_LAYER }, "digest": blob.digest, "size": blob.size}),
        );
        layers.push(blob);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": descriptors,
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?;
    let mut blobs = vec![config];
    blobs.extend(layers);
    Ok(ImageArchive {
        manifest_digest: crate::registry::digest_of(&bytes),
        manifest: bytes,
        manifest_media_type: OCI_MANIFEST.to_owned(),
        blobs,
    })
}

/// Builds an uncompressed layer tar from (path, contents) entries (owned by root); a path ending in
/// `/` is a directory, contents starting with `->` make a symlink.
pub fn layer_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, path, &b""[..]).expect("tar in memory");
        } else if let Some(target) = body.strip_prefix(b"->") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(target).expect("utf-8 link")).expect("tar in memory");
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if path.starts_with("bin/") { 0o755 } else { 0o644 });
            h.set_size(body.len() as u64);
            b.append_data(&mut h, path, *body).expect("tar in memory");
        }
    }
    b.into_inner().expect("tar in memory")
}

/// How to run an image built by [`write_oci_archive`].
#[derive(Debug, Clone, Default)]
pub struct BuildConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub exposed_ports: Vec<u16>,
}

/// Writes an oci-archive holding one linux/amd64 image made of `layers`
/// (uncompressed tars, bottom first). Returns the manifest digest.
pub fn write_oci_archive(out: impl Write, layers: &[Vec<u8>], config: &BuildConfig) -> std::io::Result<String> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let diff_ids: Vec<String> = layers.iter().map(|l| crate::registry::digest_of(l)).collect();
    let ports: serde_json::Map<String, serde_json::Value> =
        config.exposed_ports.iter().map(|p| (format!("{p}/tcp"), json!({}))).collect();
    let config_blob = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "WorkingDir": config.working_dir.clone().unwrap_or_default(),
            "ExposedPorts": ports,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = crate::registry::digest_of(&config_blob);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .zip(&diff_ids)
        .map(|(l, d)| json!({"mediaType": OCI_LAYER, "digest": d, "size": l.len()}))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_blob.len()},
        "layers": layer_descs,
    }))?;
    let manifest_digest = crate::registry::digest_of(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"}}],
    }))?;
    blobs.push((config_digest, config_blob));
    for (l, d) in layers.iter().zip(&diff_ids) {
        blobs.push((d.clone(), l.clone()));
    }
    blobs.push((manifest_digest.clone(), manifest));
    let mut tar = tar::Builder::new(out);
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (d, data) in &blobs {
        add(&format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), data)?;
    }
    tar.into_inner()?.flush()?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn an_archive_written_is_read_back_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let layers = vec![layer(&[("hello.txt", b"hi")]), layer(&[("two.txt", b"2")])];
        let config = BuildConfig { cmd: vec!["/hello".into()], exposed_ports: vec![8080], ..Default::default() };
        let digest = write_oci_archive(std::fs::File::create(&path).unwrap(), &layers, &config).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let a = read_archive(&path, &work, 1 << 30).unwrap();
        assert_eq!(a.manifest_digest, digest);
        assert_eq!(a.blobs.len(), 3);
        assert_eq!(a.blobs[1].digest, crate::registry::digest_of(&layers[0]));
        // Too large for the cap.
        assert!(matches!(read_archive(&path, &work, 100), Err(ImageError::TooLarge(_))));
    }

    #[test]
    fn docker_save_archives_become_oci_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(&[("a", b"a")]);
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/a"]}}"#.to_vec();
        let bytes = tar_of(&[
            ("manifest.json", br#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["abc/layer.tar"]}]"#.to_vec()),
            ("cfg.json", config.clone()),
            ("abc/layer.tar", l.clone()),
        ]);
        let path = dir.path().join("d.tar");
        std::fs::write(&path, bytes).unwrap();
        let a = read_archive(&path, dir.path(), 1 << 30).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(m["config"]["digest"], crate::registry::digest_of(&config));
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER);
        assert_eq!(a.manifest_digest, crate::registry::digest_of(&a.manifest));
    }

    #[test]
    fn broken_archives_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let check = |files: &[(&str, Vec<u8>)], want: &str| {
            let path = dir.path().join("x.tar");
            std::fs::write(&path, tar_of(files)).unwrap();
            let work = tempfile::tempdir().unwrap();
            let err = read_archive(&path, work.path(), 1 << 30).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want})");
        };
        check(&[("hello", b"x".to_vec())], "neither index.json");
        check(&[("index.json", b"{".to_vec())], "index.json");
        let fake = "sha256:".to_owned() + &"a".repeat(64);
        let idx = format!(r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{fake}","size":2}}]}}"#);
        check(&[("index.json", idx.clone().into_bytes())], "is missing");
        check(
            &[("index.json", idx.into_bytes()), (&format!("blobs/sha256/{}", "a".repeat(64)), b"{}".to_vec())],
            "does not match its digest",
        );
        check(&[("manifest.json", br#"[{"Config":"../etc/passwd","Layers":[]}]"#.to_vec())], "manifest.json names");
        let path = dir.path().join("junk.tar");
        std::fs::write(&path, b"definitely not a tar file, far too short").unwrap();
        assert!(read_archive(&path, dir.path(), 1 << 30).is_err());
    }
}
