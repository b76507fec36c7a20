//! VM snapshots (QEMU): a sleeping VM's RAM and device state saved to the
//! node's disk, and a VM started from it instead of a boot.
//!
//! QEMU 7.2 (Debian's) has no `file:` migration target, and the VMs' seccomp
//! sandbox (`spawn=deny`) forbids `exec:`; so the VM migrates to a Unix socket
//! the runtime listens on and writes to a file (`stop`, `migrate`, poll
//! `query-migrate`, `quit`). A restore starts QEMU with the same devices and
//! `-incoming defer`, asks for `migrate-incoming` on a socket of the instance's
//! directory, streams the file into it and sends `cont`.
//!
//! A restored guest keeps what it had: its address, its MAC, its hostname and
//! its configuration disk. So the snapshot keeps its /30 (the slot) reserved
//! while it exists and the restore uses that slot again (the tap's MAC is fixed
//! by its address, so the guest's ARP cache stays right); re-addressing a guest
//! after a restore would need the app's open sockets to survive an address
//! change, which they do not. Its clock jumps by the time it slept.
//!
//! Layout: `<snapshots>/<key>/` with `state` (the migration stream),
//! `config.img` (the VM's configuration disk) and `meta.json`, written last:
//! a directory without it is an unfinished snapshot and is removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{qmp, VmRuntime, Vmm};
use crate::qmp::qmp_with;
use crate::{InstanceSpec, Running, RuntimeError};

/// What a snapshot was taken of; a restore checks it against the new instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMeta {
    /// The instance it was taken of.
    pub instance: String,
    pub slot: u32,
    pub vcpu: u32,
    pub memory_mib: u32,
    /// The image's ext4 disk, which the guest has cached parts of: the same file.
    pub disk: PathBuf,
    pub disk_bytes: u64,
    pub disk_modified_ns: i128,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// The state file's size and SHA-256, checked while it streams back in.
    pub bytes: u64,
    pub sha256: String,
    pub taken_at: chrono::DateTime<chrono::Utc>,
}

/// A snapshot just taken.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub key: String,
    pub bytes: u64,
    pub took: Duration,
}

/// How long saving or loading a VM's state may take (TCG, a busy disk).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

fn disk_stamp(disk: &Path) -> std::io::Result<(u64, i128)> {
    let m = std::fs::metadata(disk)?;
    let modified = m.modified()?.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    Ok((m.len(), modified))
}

/// Keys name directories: deployment ids and the like, nothing else.
fn valid_key(key: &str) -> Result<(), RuntimeError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('.')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::failed("snapshot", format!("{key:?} is not a valid snapshot key")))
    }
}

fn failed(context: &str, e: impl ToString) -> RuntimeError {
    RuntimeError::failed(context.to_owned(), e)
}

impl SnapshotMeta {
    fn read(dir: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read(dir.join("meta.json")).map_err(|e| failed("reading the snapshot", e))?;
        serde_json::from_slice(&text).map_err(|e| failed("reading the snapshot", e))
    }

    /// Why this snapshot cannot become `spec` on a runtime with `vmm` and these guest files.
    fn mismatch(&self, spec: &InstanceSpec, assets: &crate::guest::GuestAssets) -> Option<String> {
        if (self.vcpu, self.memory_mib) != (spec.vcpu, spec.memory_mib) {
            return Some(format!(
                "it has {} vCPU / {} MiB, the instance {} vCPU / {} MiB",
                self.vcpu, self.memory_mib, spec.vcpu, spec.memory_mib
            ));
        }
        if spec.disk.as_deref() != Some(self.disk.as_path()) {
            return Some("the image's disk is another file".into());
        }
        match disk_stamp(&self.disk) {
            Ok(stamp) if stamp == (self.disk_bytes, self.disk_modified_ns) => {}
            _ => return Some("the image's disk changed since".into()),
        }
        if (&self.vmlinux, &self.initramfs) != (&assets.vmlinux, &assets.initramfs) {
            return Some("the guest kernel or initramfs changed since".into());
        }
        None
    }
}

impl VmRuntime {
    /// Whether this driver can [snapshot](Self::snapshot) its VMs (QEMU can).
    pub fn snapshots(&self) -> bool {
        matches!(self.s.vmm, Vmm::Qemu { .. })
    }

    fn snapshot_dir(&self, key: &str) -> PathBuf {
        self.s.snapshots.join(key)
    }

    pub(super) fn reserved_slots(&self) -> Vec<u32> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner()).values().copied().collect()
    }

    /// The keys of the snapshots on disk.
    pub fn snapshot_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.reserved.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Snapshots left by an earlier run hold their slots again; unfinished ones go.
    pub(super) fn load_snapshots(&self) {
        let Ok(entries) = std::fs::read_dir(&self.s.snapshots) else { return };
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        for entry in entries.flatten() {
            let path = entry.path();
            let key = entry.file_name().to_string_lossy().into_owned();
            match SnapshotMeta::read(&path) {
                Ok(meta) if valid_key(&key).is_ok() && !reserved.values().any(|s| *s == meta.slot) => {
                    reserved.insert(key, meta.slot);
                }
                _ => {
                    tracing::warn!(dir = %path.display(), "removing an unfinished or unreadable VM snapshot");
                    if let Err(e) = std::fs::remove_dir_all(&path) {
                        tracing::warn!(dir = %path.display(), error = %e, "could not remove it; it stays on disk");
                    }
                }
            }
        }
    }

    /// Removes snapshot `key` and frees its slot; nothing to do when there is none.
    pub async fn discard_snapshot(&self, key: &str) {
        if valid_key(key).is_err() {
            return;
        }
        let dir = self.snapshot_dir(key);
        if dir.exists() {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %e, "a VM snapshot could not be removed");
                return;
            }
        }
        self.reserved.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Saves running VM `id`'s state as snapshot `key` (replacing an older one)
    /// and ends the VM. On failure the VM runs on and no snapshot is left.
    pub async fn snapshot(&self, id: &str, key: &str) -> Result<SnapshotInfo, RuntimeError> {
        valid_key(key)?;
        if !self.snapshots() {
            return Err(RuntimeError::Unavailable("VM snapshots", format!("{} cannot take them", self.s.vmm.name())));
        }
        let started = Instant::now();
        let (dir, slot, exit, vcpu, memory_mib, disk) = {
            let instances = self.instances.lock().await;
            let i = instances.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
            (i.dir.clone(), i.slot, i.exit.clone(), i.vcpu, i.memory_mib, i.disk.clone())
        };
        if exit.borrow().is_some() {
            return Err(failed("snapshot", format!("{id} is not running")));
        }
        std::fs::create_dir_all(&self.s.snapshots).map_err(|e| failed("creating the snapshot directory", e))?;
        let partial = self.s.snapshots.join(format!(".{id}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| failed("creating the snapshot directory", e))?;
        let qmp_sock = dir.join("qmp.sock");
        let saved = self.save_state(&dir, &partial, exit.clone()).await;
        let (bytes, sha256) = match saved {
            Ok(s) => s,
            Err(e) => {
                // The guest goes on as before; the caller stops it the usual way.
                if let Err(why) = qmp(&qmp_sock, "cont").await {
                    tracing::warn!(instance = %id, error = %why, "the VM could not be resumed after a failed snapshot");
                }
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        let finish = || -> Result<(), RuntimeError> {
            std::fs::copy(dir.join("config.img"), partial.join("config.img"))
                .map_err(|e| failed("copying the configuration disk", e))?;
            let (disk_bytes, disk_modified_ns) = disk_stamp(&disk).map_err(|e| failed("reading the image disk", e))?;
            let meta = SnapshotMeta {
                instance: id.to_owned(),
                slot,
                vcpu,
                memory_mib,
                disk: disk.clone(),
                disk_bytes,
                disk_modified_ns,
                vmlinux: self.s.assets.vmlinux.clone(),
                initramfs: self.s.assets.initramfs.clone(),
                bytes,
                sha256: sha256.clone(),
                taken_at: chrono::Utc::now(),
            };
            let text = serde_json::to_vec_pretty(&meta).map_err(|e| failed("writing the snapshot", e))?;
            std::fs::write(partial.join("meta.json"), text).map_err(|e| failed("writing the snapshot", e))
        };
        if let Err(e) = finish() {
            let _ = qmp(&qmp_sock, "cont").await;
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        // The VM is paused with its state saved: it ends here (no stop request
        // reaches the app: its state lives on in the snapshot).
        super::VmRuntime::hard_stop(&dir, &self.s.vmm).await;
        let mut exit = exit;
        if tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await.is_err() {
            tracing::warn!(instance = %id, "the VM did not end after its snapshot; it is killed when destroyed");
        }
        let target = self.snapshot_dir(key);
        {
            let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            if target.exists() {
                std::fs::remove_dir_all(&target).map_err(|e| failed("replacing an older snapshot", e))?;
            }
            std::fs::rename(&partial, &target).map_err(|e| failed("storing the snapshot", e))?;
            reserved.insert(key.to_owned(), slot);
        }
        let info = SnapshotInfo { key: key.to_owned(), bytes, took: started.elapsed() };
        tracing::info!(instance = %id, key, bytes, took_ms = info.took.as_millis() as u64, "VM snapshot taken");
        Ok(info)
    }

    /// Pauses the VM and migrates its state into `partial/state`; returns its size and SHA-256.
    async fn save_state(
        &self,
        dir: &Path,
        partial: &Path,
        mut exit: tokio::sync::watch::Receiver<Option<crate::ExitInfo>>,
    ) -> Result<(u64, String), RuntimeError> {
        let qmp_sock = dir.join("qmp.sock");
        let sock = dir.join("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| failed("listening for the VM's state", e))?;
        // A VMM running as an unprivileged user owns the VM's directory; the
        // socket is handed to it so that its QEMU may connect.
        {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(dir).map_err(|e| failed("reading the VM's directory", e))?;
            if owner.uid() != 0 {
                std::os::unix::fs::chown(&sock, Some(owner.uid()), Some(owner.gid()))
                    .map_err(|e| failed("handing the state socket to the VMM's user", e))?;
            }
        }
        let file = partial.join("state");
        let receive = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await?;
            let mut out = tokio::fs::File::create(&file).await?;
            let (mut hash, mut bytes, mut buf) = (sha2::Sha256::new(), 0u64, vec![0u8; 1 << 20]);
            loop {
                let n = conn.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                out.write_all(&buf[..n]).await?;
                bytes += n as u64;
            }
            out.sync_all().await?;
            std::io::Result::Ok((bytes, hex::encode(hash.finalize())))
        });
        let result = async {
            qmp(&qmp_sock, "stop").await.map_err(|e| failed("pausing the VM", e))?;
            // QEMU's default bandwidth cap is for live migration over a network.
            qmp_with(&qmp_sock, "migrate-set-parameters", json!({"max-bandwidth": 64u64 << 30}))
                .await
                .map_err(|e| failed("setting the migration bandwidth", e))?;
            let uri = format!("unix:{}", sock.display());
            qmp_with(&qmp_sock, "migrate", json!({"uri": uri}))
                .await
                .map_err(|e| failed("saving the VM's state", e))?;
            let deadline = Instant::now() + MIGRATION_TIMEOUT;
            let mut pause = Duration::from_millis(5);
            loop {
                let m = qmp(&qmp_sock, "query-migrate").await.map_err(|e| failed("saving the VM's state", e))?;
                match m.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => break,
                    Some(s @ ("failed" | "cancelled")) => {
                        let why = m.get("error-desc").and_then(|d| d.as_str()).unwrap_or(s);
                        return Err(failed("saving the VM's state", why));
                    }
                    _ if exit.borrow().is_some() => return Err(failed("saving the VM's state", "the VM ended")),
                    _ if Instant::now() > deadline => {
                        return Err(failed("saving the VM's state", "the migration did not finish in time"))
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = exit.changed() => {}
                }
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Ok(())
        }
        .await;
        let received = match result {
            Ok(()) => tokio::time::timeout(Duration::from_secs(30), receive).await,
            Err(e) => {
                receive.abort();
                let _ = std::fs::remove_file(&sock);
                return Err(e);
            }
        };
        let _ = std::fs::remove_file(&sock);
        match received {
            Ok(Ok(Ok(done))) => Ok(done),
            Ok(Ok(Err(e))) => Err(failed("writing the VM's state", e)),
            Ok(Err(e)) => Err(failed("writing the VM's state", e)),
            Err(_) => Err(failed("writing the VM's state", "the stream did not end")),
        }
    }

    /// Starts instance `spec` from snapshot `key` instead of booting it. The
    /// snapshot is used up either way (a restored VM moves on from it); on
    /// failure nothing of the instance is left and the caller boots it.
    pub async fn restore(&self, spec: &InstanceSpec, key: &str) -> Result<Running, RuntimeError> {
        valid_key(key)?;
        let snapshot = self.snapshot_dir(key);
        let result = self.restore_from(spec, &snapshot).await;
        self.discard_snapshot(key).await;
        if result.is_err() && self.instances.lock().await.contains_key(&spec.id) {
            if let Err(e) = crate::Runtime::destroy(self, &spec.id).await {
                tracing::warn!(instance = %spec.id, error = %e, "teardown after a failed restore incomplete");
            }
        }
        result
    }

    async fn restore_from(&self, spec: &InstanceSpec, snapshot: &Path) -> Result<Running, RuntimeError> {
        if !self.snapshots() {
            return Err(RuntimeError::Unavailable(
                "VM snapshots",
                format!("{} cannot restore them", self.s.vmm.name()),
            ));
        }
        let meta = SnapshotMeta::read(snapshot)?;
        if let Some(why) = meta.mismatch(spec, &self.s.assets) {
            return Err(failed("the snapshot does not fit", why));
        }
        let running = self.launch(spec, Some((snapshot, meta.slot))).await?;
        let (dir, mut exit) = {
            let instances = self.instances.lock().await;
            let i = instances.get(&spec.id).ok_or_else(|| RuntimeError::NotFound(spec.id.clone()))?;
            (i.dir.clone(), i.exit.clone())
        };
        let qmp_sock = dir.join("qmp.sock");
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        // QEMU opens its QMP socket a moment after it starts.
        let mut pause = Duration::from_millis(2);
        while !qmp_sock.exists() {
            if exit.borrow().is_some() || Instant::now() > deadline {
                return Err(failed("restoring the VM", "QEMU did not start"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        let sock = dir.join("incoming.sock");
        let uri = format!("unix:{}", sock.display());
        qmp_with(&qmp_sock, "migrate-incoming", json!({"uri": uri}))
            .await
            .map_err(|e| failed("restoring the VM", e))?;
        let mut conn = tokio::net::UnixStream::connect(&sock).await.map_err(|e| failed("sending the VM's state", e))?;
        // The last chunk goes only once the whole file proved intact: a
        // corrupt snapshot ends as a short stream, which QEMU refuses.
        let mut file =
            tokio::fs::File::open(snapshot.join("state")).await.map_err(|e| failed("reading the snapshot", e))?;
        let (mut hash, mut bytes) = (sha2::Sha256::new(), 0u64);
        let (mut held, mut buf) = (Vec::new(), vec![0u8; 1 << 20]);
        loop {
            let n = file.read(&mut buf).await.map_err(|e| failed("reading the snapshot", e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            bytes += n as u64;
            if !held.is_empty() {
                conn.write_all(&held).await.map_err(|e| failed("sending the VM's state", e))?;
            }
            held.clear();
            held.extend_from_slice(&buf[..n]);
        }
        if bytes != meta.bytes || hex::encode(hash.finalize()) != meta.sha256 {
            drop(conn);
            return Err(failed("restoring the VM", "the snapshot is corrupt (its checksum does not match)"));
        }
        conn.write_all(&held).await.map_err(|e| failed("sending the VM's state", e))?;
        conn.shutdown().await.map_err(|e| failed("sending the VM's state", e))?;
        let mut pause = Duration::from_millis(2);
        loop {
            if exit.borrow().is_some() {
                let console = super::console::tail_text(
                    &self.instances.lock().await.get(&spec.id).map(|i| i.tail.clone()).unwrap_or_default(),
                    6,
                );
                return Err(failed("restoring the VM", format!("QEMU refused the state: {console}")));
            }
            match qmp(&qmp_sock, "query-status").await {
                Ok(s) if s.get("status").and_then(|v| v.as_str()) == Some("inmigrate") => {}
                Ok(_) => break,
                Err(e) if exit.borrow().is_some() => return Err(failed("restoring the VM", e)),
                Err(e) => tracing::debug!(instance = %spec.id, error = %e, "QMP while restoring"),
            }
            if Instant::now() > deadline {
                return Err(failed("restoring the VM", "loading the state did not finish in time"));
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = exit.changed() => {}
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        qmp(&qmp_sock, "cont").await.map_err(|e| failed("resuming the restored VM", e))?;
        tracing::info!(instance = %spec.id, from = %meta.instance, bytes, "microVM restored from a snapshot");
        Ok(running)
    }
}
