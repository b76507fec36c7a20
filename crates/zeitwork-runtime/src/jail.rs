//! The Firecracker jailer's directory of a VM: where it is, what goes into
//! it (without ever taking over files other VMs share), and its removal.

use std::path::{Path, PathBuf};

use crate::vm::{jail_id, Jailer};
use crate::RuntimeError;

/// Where the jailer puts a VM: `<chroot base>/<exec file's name>/<id>` (the jailer
/// names the directory after the binary, e.g. `firecracker-v1.16.1-x86_64`).
pub fn jail_dir(j: &Jailer, binary: &Path, id: &str) -> PathBuf {
    let exec = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "firecracker".into());
    j.chroot_base.join(exec).join(jail_id(id))
}

/// Puts a VM's files into its jail as `/f0`, `/f1`, …. Shared files (kernel,
/// initramfs, the image) are hard-linked when the jail's user may read them as
/// they are, and never handed to that user: a chown of a hard link would change
/// the owner of the shared file itself. Otherwise, and for the VM's own files,
/// the jail gets a copy of its own, owned by its user.
pub fn prepare_jail(root: &Path, files: &[(&PathBuf, bool)], uid: u32, gid: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(root).map_err(|e| RuntimeError::failed("creating the jail", e))?;
    for (i, (f, shared)) in files.iter().enumerate() {
        let target = root.join(format!("f{i}"));
        match std::fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::failed(format!("replacing {} in the jail", target.display()), e))
            }
            _ => {}
        }
        let meta = std::fs::metadata(f).map_err(|e| RuntimeError::failed(format!("reading {}", f.display()), e))?;
        let world_readable = meta.mode() & 0o004 != 0;
        if *shared && world_readable && std::fs::hard_link(f, &target).is_ok() {
            continue;
        }
        std::fs::copy(f, &target).map_err(|e| RuntimeError::failed("copying into the jail", e))?;
        std::os::unix::fs::chown(&target, Some(uid), Some(gid))
            .map_err(|e| RuntimeError::failed("handing the jail's own copy to its user", e))?;
    }
    // The VMM's own log, written by the jail's user.
    let log = root.join("vmm.log");
    std::fs::write(&log, b"").map_err(|e| RuntimeError::failed("creating the VMM's log", e))?;
    std::os::unix::fs::chown(&log, Some(uid), Some(gid))
        .map_err(|e| RuntimeError::failed("handing the VMM's log to its user", e))?;
    Ok(())
}

/// Removes a jail and everything in it (hard links only drop a name of the shared file).
pub(crate) fn remove_jail(jail: &Path) {
    if let Err(e) = std::fs::remove_dir_all(jail) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(jail = %jail.display(), error = %e, "cannot remove a jail; it is left behind");
        }
    }
}
