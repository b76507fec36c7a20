//! `zeitwork deploy --source DIR`: packs a directory (leaving out what
//! `.dockerignore` and `.gitignore` exclude, and `.git`), uploads it, and
//! follows the build's output; `zeitwork logs DEPLOYMENT --build` shows it
//! again afterwards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use futures::StreamExt;
use zeitwork_api_types::{BuildRequest, UploadedSource};
use zeitwork_client::{encode, Client};

use crate::roles::UsageError;

/// A packed build context: a gzip-compressed tar, and how many files it holds.
pub struct Packed {
    pub bytes: Vec<u8>,
    pub files: usize,
}

/// Packs `dir` for a build with `dockerfile` (relative to `dir`).
pub fn pack(dir: &Path, dockerfile: &str) -> Result<Packed> {
    if !dir.is_dir() {
        return Err(UsageError(format!("{} is not a directory", dir.display())).into());
    }
    if !dir.join(dockerfile).is_file() {
        return Err(UsageError(format!(
            "{} has no {dockerfile}; write one, or name it with --dockerfile PATH",
            dir.display()
        ))
        .into());
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut files = 0usize;
    let mut added_dockerfile = false;
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .parents(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .add_custom_ignore_filename(".dockerignore")
        .filter_entry(|e| e.file_name() != ".git")
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walk {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        let rel = path.strip_prefix(dir).unwrap_or(path);
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.file_type();
        if kind.is_some_and(|k| k.is_dir()) {
            tar.append_dir(rel, path).with_context(|| format!("packing {}", path.display()))?;
            continue;
        }
        tar.append_path_with_name(path, rel).with_context(|| format!("packing {}", path.display()))?;
        added_dockerfile |= rel == Path::new(dockerfile);
        files += 1;
    }
    // The Dockerfile goes with the context even when an ignore file names it, as with docker.
    if !added_dockerfile {
        tar.append_path_with_name(dir.join(dockerfile), dockerfile).with_context(|| format!("packing {dockerfile}"))?;
        files += 1;
    }
    let bytes = tar.into_inner().context("packing the source")?.finish().context("packing the source")?;
    Ok(Packed { bytes, files })
}

/// `NAME=VALUE` pairs of `--build-arg`.
pub fn build_args(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| UsageError(format!("--build-arg {kv:?}: use NAME=VALUE")).into())
        })
        .collect()
}

/// `--build-secret NAME[=ENV]`: the value comes from the environment variable ENV (NAME by
/// default), never from the command line where shells and process lists would keep it.
pub fn build_secrets(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|spec| {
            let (name, var) = spec.split_once('=').unwrap_or((spec, spec));
            let value = std::env::var(var).map_err(|_| {
                UsageError(format!("--build-secret {spec}: set the environment variable {var} to the secret's value"))
            })?;
            Ok((name.to_owned(), value))
        })
        .collect()
}

/// Packs and uploads `dir`; returns the build request naming the uploaded source.
pub async fn upload(c: &Client, org: &str, dir: &Path, dockerfile: Option<&str>, quiet: bool) -> Result<BuildRequest> {
    let file = dockerfile.unwrap_or("Dockerfile");
    let dir: PathBuf = dir.to_path_buf();
    let packed = {
        let (dir, file) = (dir.clone(), file.to_owned());
        tokio::task::spawn_blocking(move || pack(&dir, &file)).await.context("packing the source")??
    };
    if !quiet {
        println!(
            "Uploading {} ({} files, {:.1} MB packed)…",
            dir.display(),
            packed.files,
            packed.bytes.len() as f64 / 1e6
        );
    }
    let up: UploadedSource =
        c.upload(&format!("/api/v1/orgs/{}/sources", encode(org)), "application/gzip", packed.bytes.into()).await?;
    if !quiet && up.existing {
        println!("  the same source was uploaded before");
    }
    Ok(BuildRequest { source: up.source, dockerfile: dockerfile.map(str::to_owned), ..Default::default() })
}

/// Prints a deployment's build output (following it while it runs) with a gutter.
pub async fn print_log(c: &Client, id: &str, follow: bool, gutter: &str) -> Result<()> {
    let path = format!("/api/v1/deployments/{}/build/log?follow={follow}", encode(id));
    let res = c.stream(&path).await?;
    let mut body = res.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the build output broke off")?;
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            out.write_all(gutter.as_bytes())?;
            out.write_all(&line)?;
        }
        out.flush()?;
    }
    if !pending.is_empty() {
        out.write_all(gutter.as_bytes())?;
        out.write_all(&pending)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(packed: &Packed) -> Vec<String> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&packed.bytes[..]));
        let mut out: Vec<String> =
            a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn packing_leaves_out_ignored_files_and_git() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(d.join(".dockerignore"), "secret.txt\nDockerfile\n").unwrap();
        std::fs::write(d.join(".gitignore"), "target/\n").unwrap();
        std::fs::write(d.join("secret.txt"), "no").unwrap();
        std::fs::write(d.join("app.txt"), "yes").unwrap();
        std::fs::create_dir_all(d.join("target")).unwrap();
        std::fs::write(d.join("target/big"), "no").unwrap();
        std::fs::create_dir_all(d.join(".git")).unwrap();
        std::fs::write(d.join(".git/HEAD"), "no").unwrap();
        std::fs::create_dir_all(d.join("src")).unwrap();
        std::fs::write(d.join("src/main.txt"), "yes").unwrap();
        let packed = pack(d, "Dockerfile").unwrap();
        let n = names(&packed);
        assert!(n.contains(&"app.txt".to_owned()), "{n:?}");
        assert!(n.contains(&"src/main.txt".to_owned()), "{n:?}");
        assert!(n.contains(&"Dockerfile".to_owned()), "the Dockerfile always goes: {n:?}");
        assert!(!n.iter().any(|p| p.contains("secret") || p.starts_with("target") || p.starts_with(".git/")), "{n:?}");
    }

    #[test]
    fn a_missing_dockerfile_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = pack(dir.path(), "Dockerfile").err().unwrap();
        assert!(err.to_string().contains("no Dockerfile"), "{err}");
    }

    #[test]
    fn build_args_need_a_value() {
        assert_eq!(build_args(&["A=1".into(), "B=".into()]).unwrap().len(), 2);
        assert!(build_args(&["A".into()]).is_err());
    }
}
