//! Applying image layers to a root filesystem directory: whiteouts, opaque
//! directories, hardlinks, symlinks, modes, owners, xattrs. Every path is
//! resolved inside the root the way a chroot would, and anything that tries
//! to leave it (`..`, absolute names, links out, device nodes) fails the layer.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::ImageError;

/// Limits on what one image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub used_bytes: u64,
    pub used_entries: u64,
}

impl Budget {
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        Self { max_bytes, max_entries, used_bytes: 0, used_entries: 0 }
    }
}

fn bad(layer: &str, why: String) -> ImageError {
    ImageError::BadLayer { layer: layer.to_owned(), reason: why }
}

/// A tar entry's name as a relative path, or why it is refused.
fn entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(format!("{} is an absolute path", raw.display())),
            Component::ParentDir => return Err(format!("{} climbs out with '..'", raw.display())),
        }
    }
    Ok(out)
}

/// Resolves `rel` under `root`, following symlinks as if `root` were `/`.
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut cur = PathBuf::new();
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    let push_all = |pending: &mut Vec<std::ffi::OsString>, p: &Path| {
        let mut parts: Vec<std::ffi::OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        parts.reverse();
        pending.extend(parts);
    };
    push_all(&mut pending, rel);
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let candidate = root.join(&cur).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("too many symlinks resolving {}", rel.display()));
                }
                let target = std::fs::read_link(&candidate).map_err(|e| e.to_string())?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                push_all(&mut pending, &target);
            }
            _ => cur.push(&part),
        }
    }
    Ok(root.join(cur))
}

/// Removes whatever is at `path` (file, link or tree), if anything.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one (already decompressed) layer tar to `root`.
pub fn apply_layer(root: &Path, layer: &str, reader: impl Read, budget: &mut Budget) -> Result<(), ImageError> {
    let io = |e: std::io::Error| bad(layer, e.to_string());
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    let as_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    archive.set_preserve_ownerships(as_root);
    // Paths this layer created: an opaque whiteout clears only what lower layers left.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        budget.used_entries += 1;
        if budget.used_entries > budget.max_entries {
            return Err(bad(layer, format!("more than {} files", budget.max_entries)));
        }
        budget.used_bytes += entry.size();
        if budget.used_bytes > budget.max_bytes {
            return Err(ImageError::TooLarge(format!("the image unpacks to more than {} bytes", budget.max_bytes)));
        }
        let raw = entry.path().map_err(io)?.into_owned();
        let rel = entry_path(&raw).map_err(|why| bad(layer, why))?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = resolve_in_root(root, parent_rel).map_err(|why| bad(layer, why))?;
        if name == ".wh..wh..opq" {
            if let Ok(children) = std::fs::read_dir(&parent) {
                for child in children.flatten() {
                    let rel_child = parent_rel.join(child.file_name());
                    if !created.contains(&rel_child) {
                        remove(&child.path()).map_err(io)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(bad(layer, format!("invalid whiteout {}", raw.display())));
            }
            remove(&parent.join(hidden)).map_err(io)?;
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            return Err(bad(layer, format!("{} is a device node or FIFO; images may not carry those", raw.display())));
        }
        std::fs::create_dir_all(&parent).map_err(io)?;
        let dest = parent.join(&name);
        if kind.is_dir() {
            if std::fs::symlink_metadata(&dest).is_ok_and(|m| !m.is_dir()) {
                remove(&dest).map_err(io)?;
            }
        } else {
            remove(&dest).map_err(io)?;
        }
        if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io)?
                .ok_or_else(|| bad(layer, format!("symlink {} has no target", raw.display())))?;
            // Relative targets may not climb above the root; absolute ones are
            // resolved inside the root when used.
            if !target.is_absolute() {
                let mut depth = parent_rel.components().count() as i64;
                for c in target.components() {
                    match c {
                        Component::ParentDir => depth -= 1,
                        Component::Normal(_) => depth += 1,
                        _ => {}
                    }
                    if depth < 0 {
                        return Err(bad(
                            layer,
                            format!("symlink {} -> {} points outside the image", raw.display(), target.display()),
                        ));
                    }
                }
            }
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(io)?
                .ok_or_else(|| bad(layer, format!("hardlink {} has no target", raw.display())))?;
            let target_rel =
                entry_path(&target).map_err(|why| bad(layer, format!("hardlink {}: {why}", raw.display())))?;
            let target_parent =
                resolve_in_root(root, target_rel.parent().unwrap_or(Path::new(""))).map_err(|why| bad(layer, why))?;
            let source = target_parent.join(target_rel.file_name().unwrap_or_default());
            if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                return Err(bad(
                    layer,
                    format!("hardlink {} -> {} has no file to link to", raw.display(), target.display()),
                ));
            }
            std::fs::hard_link(&source, &dest).map_err(io)?;
        } else {
            entry.unpack(&dest).map_err(|e| bad(layer, format!("{}: {e}", raw.display())))?;
        }
        created.insert(rel);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header() -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = header();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = header();
        h.set_size(0);
        h.set_entry_type(kind);
        h.set_mode(0o777);
        b.append_link(&mut h, path, target).unwrap();
    }

    fn apply(root: &Path, bytes: Vec<u8>) -> Result<(), ImageError> {
        apply_layer(root, "test", &bytes[..], &mut Budget::new(1 << 30, 100_000))
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            layer(|b| {
                file(b, "etc/keep", b"1");
                file(b, "etc/gone", b"2");
                file(b, "var/cache/a", b"3");
                file(b, "var/cache/b", b"4");
            }),
        )
        .unwrap();
        apply(
            root,
            layer(|b| {
                file(b, "etc/.wh.gone", b"");
                file(b, "var/cache/new", b"5");
                file(b, "var/cache/.wh..wh..opq", b"");
            }),
        )
        .unwrap();
        assert!(root.join("etc/keep").exists());
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("var/cache/a").exists() && !root.join("var/cache/b").exists());
        assert_eq!(
            std::fs::read(root.join("var/cache/new")).unwrap(),
            b"5",
            "an opaque dir keeps its own layer's files"
        );
    }

    #[test]
    fn links_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        apply(
            &root,
            layer(|b| {
                file(b, "usr/lib/libx.so", b"x");
                link(b, tar::EntryType::Symlink, "lib", "usr/lib");
                link(b, tar::EntryType::Symlink, "etc-abs", "/etc");
                link(b, tar::EntryType::Link, "usr/lib/libx.hard", "usr/lib/libx.so");
            }),
        )
        .unwrap();
        // Writing through an absolute symlink lands inside the root.
        apply(&root, layer(|b| file(b, "etc-abs/passwd", b"inside"))).unwrap();
        assert_eq!(std::fs::read(root.join("etc/passwd")).unwrap(), b"inside");
        apply(&root, layer(|b| file(b, "lib/libz.so", b"z"))).unwrap();
        assert_eq!(std::fs::read(root.join("usr/lib/libz.so")).unwrap(), b"z");
        assert_eq!(std::fs::read(root.join("usr/lib/libx.hard")).unwrap(), b"x");

        for (name, bytes) in [
            (
                "dotdot",
                layer(|b| {
                    let mut h = tar::Header::new_old();
                    h.set_uid(0);
                    h.set_gid(0);
                    h.set_mtime(0);
                    h.set_size(1);
                    h.set_entry_type(tar::EntryType::Regular);
                    let name = b"../escape";
                    h.as_old_mut().name[..name.len()].copy_from_slice(name);
                    h.set_cksum();
                    b.append(&h, &b"x"[..]).unwrap();
                }),
            ),
            ("symlink out", layer(|b| link(b, tar::EntryType::Symlink, "a/out", "../../../tmp"))),
            ("hardlink out", layer(|b| link(b, tar::EntryType::Link, "h", "../outside"))),
            (
                "device",
                layer(|b| {
                    let mut h = header();
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Char);
                    b.append_data(&mut h, "dev/null2", &b""[..]).unwrap();
                }),
            ),
        ] {
            let err = apply(&root, bytes).unwrap_err();
            assert!(matches!(err, ImageError::BadLayer { .. }), "{name}: {err}");
        }
        assert!(!dir.path().join("escape").exists());
        assert!(!dir.path().join("outside").exists());
    }

    #[test]
    fn budget_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer(|b| file(b, "big", &[0u8; 4096]));
        let err = apply_layer(dir.path(), "t", &bytes[..], &mut Budget::new(1000, 10)).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge(_)), "{err}");
    }
}
