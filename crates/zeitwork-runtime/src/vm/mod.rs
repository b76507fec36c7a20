//! The microVM drivers: every instance in its own VM, booted from the guest
//! kernel and Zeitwork's initramfs, with the image's ext4 as a read-only disk,
//! a small configuration disk (env vars never go on the kernel command line),
//! a tap device point-to-point to the host on a /30 of the node's range, and
//! the serial console as the channel for logs, the exit code and stop
//! requests. Two VMMs run them:
//!
//! * QEMU `-M microvm` (virtio-mmio, PVH direct kernel boot, QMP for control),
//!   with KVM when a probe shows it really runs a guest, TCG otherwise;
//! * Firecracker, configured through its API socket, optionally under its
//!   jailer.
//!
//! This file holds the driver and the types both VMMs share; each VMM's own
//! client is in `qemu.rs` (with [`crate::qmp`]) and `firecracker.rs` (with
//! [`crate::jail`]), the console reader in `console.rs`, and the boot probe
//! that [`crate::select`] relies on in `probe.rs`.

mod console;
mod firecracker;
mod probe;
mod qemu;
mod snapshot;

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{watch, Mutex};
use zeitwork_guest_init::{GuestConfig, PROBE_ARG};

use crate::guest::GuestAssets;
use crate::logs::LogStore;
use crate::net;
use crate::{
    exit_reason, ExitInfo, InstanceSpec, InstanceState, InstanceStats, LogLine, Running, Runtime, RuntimeError,
};

use self::console::{push_tail, read_console, tail_text};
pub use self::firecracker::{firecracker_put, firecracker_requests};
pub use self::probe::{kvm_crashed, probe};
pub use self::qemu::qemu_args;
pub use self::snapshot::{SnapshotInfo, SnapshotMeta};

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's software emulation: slow but runs anywhere.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

use crate::jail::remove_jail;
pub use crate::jail::{jail_dir, prepare_jail};
pub use crate::qmp::qmp;

/// Firecracker's jailer: chroot, uid/gid, cgroups and an optional netns per VM.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jailer {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Where the jailer builds each VM's chroot (`<base>/<firecracker binary's file name>/<id>/root`).
    #[serde(default = "default_chroot_base")]
    pub chroot_base: PathBuf,
}

fn default_chroot_base() -> PathBuf {
    PathBuf::from("/srv/jailer")
}

/// The VMM behind a [`VmRuntime`].
#[derive(Debug, Clone)]
pub enum Vmm {
    Qemu { binary: PathBuf, accel: Accel },
    Firecracker { binary: PathBuf, jailer: Option<Jailer> },
}

impl Vmm {
    pub fn name(&self) -> &'static str {
        match self {
            Vmm::Qemu { .. } => "qemu",
            Vmm::Firecracker { .. } => "firecracker",
        }
    }

    pub fn accel(&self) -> Accel {
        match self {
            Vmm::Qemu { accel, .. } => *accel,
            Vmm::Firecracker { .. } => Accel::Kvm,
        }
    }
}

/// Settings of a [`VmRuntime`].
#[derive(Debug, Clone)]
pub struct VmSettings {
    pub dir: PathBuf,
    pub vmm: Vmm,
    pub assets: GuestAssets,
    /// The node's instance range (a /16; a /30 per instance).
    pub base: Ipv4Addr,
    /// Largest root disk an instance may use, bytes.
    pub disk_budget: u64,
    /// The unprivileged users QEMU runs as; root when absent.
    pub vmm_user: Option<VmmUser>,
    /// Where VM snapshots are kept (one directory per key; QEMU only).
    pub snapshots: PathBuf,
}

/// The unprivileged users QEMU runs as: the VM on address slot `n` (at most
/// 16,000 of them per node) runs as uid `uid + n`, so no VMM can signal,
/// trace or open what belongs to another; all share group `gid` (the `kvm`
/// group, where there is one, so `/dev/kvm` opens). Neither may own
/// anything else on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
}

impl VmmUser {
    /// The uid and gid of the VM on `slot`.
    pub fn of_slot(&self, slot: u32) -> (u32, u32) {
        (self.uid.saturating_add(slot), self.gid)
    }
}

#[derive(Debug)]
struct VmInstance {
    slot: u32,
    tap: String,
    dir: PathBuf,
    pid: Option<u32>,
    console: Arc<Mutex<Option<ChildStdin>>>,
    tail: Arc<std::sync::Mutex<VecDeque<String>>>,
    exit: watch::Receiver<Option<ExitInfo>>,
    memory_bytes: u64,
    /// What a snapshot must match to be restored: the VM's shape and disk.
    vcpu: u32,
    memory_mib: u32,
    disk: PathBuf,
}

/// Runs instances as microVMs.
#[derive(Debug)]
pub struct VmRuntime {
    s: VmSettings,
    logs: Arc<LogStore>,
    instances: Mutex<HashMap<String, VmInstance>>,
    /// Slots held by snapshots on disk, by snapshot key: a restored guest keeps
    /// its address, so its /30 stays its own while the snapshot exists.
    reserved: std::sync::Mutex<HashMap<String, u32>>,
}

/// The kernel command line: nothing secret, ever (see [`GuestConfig`]).
pub fn kernel_args(vmm: &Vmm, probe: bool) -> String {
    let mut args = match vmm {
        // reboot=t: a triple fault resets the VM, and -no-reboot turns that into QEMU's exit.
        Vmm::Qemu { .. } => "console=ttyS0 reboot=t panic=-1 quiet i8042.noaux i8042.nomux".to_owned(),
        // Firecracker ends on the guest's reboot (the i8042 reset).
        // (Firecracker adds `pci=off` itself.)
        Vmm::Firecracker { .. } => "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux".to_owned(),
    };
    args.push_str(" tsc=reliable no_timer_check");
    // Under TCG the guest reads the host's TSC, but calibrating it against the
    // emulated PIT fails often enough to leave the kernel without a clock:
    // tell it the frequency instead.
    if let (Vmm::Qemu { accel: Accel::Tcg, .. }, Some(khz)) = (vmm, host_tsc_khz()) {
        args.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if probe {
        args.push(' ');
        args.push_str(PROBE_ARG);
    }
    args
}

/// The host CPU's clock in kHz, as the kernel reports it.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64).filter(|k| *k > 0)
}

fn mac_of(slot: u32) -> String {
    format!("02:5a:57:{:02x}:{:02x}:{:02x}", (slot >> 16) & 0xff, (slot >> 8) & 0xff, slot & 0xff)
}

fn kill(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::KILL) {
            tracing::debug!(pid, error = %e, "SIGKILL not delivered (the VMM may have just ended)");
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl VmRuntime {
    pub async fn new(mut s: VmSettings, logs: Arc<LogStore>) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&s.dir).map_err(|e| RuntimeError::failed("creating the runtime directory", e))?;
        if s.vmm_user.is_some() {
            // The VMMs' users reach their own directories below, and cannot list them.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| RuntimeError::failed("closing the runtime directory", e))?;
            if let Err(why) = crate::reachable_by_others(&s.dir) {
                tracing::warn!(dir = %s.dir.display(), %why, "QEMU runs as root: its unprivileged users cannot reach their directories");
                s.vmm_user = None;
            }
        }
        crate::net::apply_policy(s.base, None).await?;
        let rt = Self { s, logs, instances: Mutex::new(HashMap::new()), reserved: Default::default() };
        rt.clean_leftovers().await;
        rt.load_snapshots();
        Ok(rt)
    }

    pub fn vmm(&self) -> &Vmm {
        &self.s.vmm
    }

    /// The guest kernel and initramfs this runtime boots (build VMs boot them too).
    pub fn assets(&self) -> &GuestAssets {
        &self.s.assets
    }

    /// VMs left running by an agent that crashed: killed, their taps and files removed.
    async fn clean_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.s.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("config.img").exists() {
                continue;
            }
            tracing::warn!(dir = %path.display(), "cleaning up a microVM left by an earlier run");
            if let Some(pid) = std::fs::read_to_string(path.join("vmm.pid")).ok().and_then(|p| p.trim().parse().ok()) {
                // Only if that pid still is our VMM (pids are reused).
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*path.to_string_lossy()) {
                    kill(pid);
                }
            }
            if let Ok(tap) = tokio::fs::read_to_string(path.join("tap")).await {
                if let Err(e) = net::destroy_tap(tap.trim()).await {
                    tracing::warn!(tap = tap.trim(), error = %e, "the tap device of a leftover microVM may be left behind");
                }
            }
            if let Err(e) = tokio::fs::remove_dir_all(&path).await {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove a leftover microVM's directory");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_vmm(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        disk: &Path,
        tap: &str,
        mac: &str,
        owner: Option<(u32, u32)>,
        incoming: bool,
    ) -> Result<Child, RuntimeError> {
        let config = dir.join("config.img");
        match &self.s.vmm {
            Vmm::Qemu { binary, accel } => {
                let (assets, disk) = match owner {
                    Some((uid, gid)) => {
                        let (assets, disk) = qemu_files(dir, &self.s.assets, disk, uid, gid).await?;
                        (std::borrow::Cow::Owned(assets), std::borrow::Cow::Owned(disk))
                    }
                    None => (std::borrow::Cow::Borrowed(&self.s.assets), std::borrow::Cow::Borrowed(disk)),
                };
                let mut args = qemu_args(
                    *accel,
                    &assets,
                    spec.vcpu,
                    spec.memory_mib,
                    &[&disk, &config],
                    Some((tap, mac)),
                    Some(&dir.join("qmp.sock")),
                    false,
                );
                args.extend(["-name".into(), format!("zeitwork-{}", spec.id)]);
                args.extend(["-pidfile".into(), dir.join("vmm.pid").display().to_string()]);
                if incoming {
                    // The state arrives over a socket the agent feeds (see `snapshot.rs`).
                    args.extend(["-incoming".into(), "defer".into()]);
                }
                let mut cmd = Command::new(binary);
                if let Some((uid, gid)) = owner {
                    // Set before exec: QEMU never runs as root, and its sandbox
                    // (elevateprivileges=deny) keeps it from changing that.
                    cmd.uid(uid).gid(gid);
                }
                cmd.args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| RuntimeError::Unavailable("qemu", format!("{}: {e}", binary.display())))
            }
            Vmm::Firecracker { .. } if incoming => {
                Err(RuntimeError::Unavailable("firecracker snapshots", "not supported by this driver".into()))
            }
            Vmm::Firecracker { binary, jailer } => {
                self.spawn_firecracker(spec, dir, disk, tap, mac, binary, jailer).await
            }
        }
    }

    /// Starts a VM: booted, or (`from`: a snapshot's directory and slot)
    /// waiting for the snapshot's state on an incoming migration socket.
    async fn launch(&self, spec: &InstanceSpec, from: Option<(&Path, u32)>) -> Result<Running, RuntimeError> {
        let disk = spec.disk.clone().ok_or_else(|| {
            RuntimeError::failed(format!("starting {}", spec.id), "a microVM needs the image as an ext4 disk")
        })?;
        let disk_size = std::fs::metadata(&disk).map(|m| m.len()).map_err(|e| {
            RuntimeError::failed(format!("starting {}", spec.id), format!("the image disk {}: {e}", disk.display()))
        })?;
        if disk_size > self.s.disk_budget {
            return Err(RuntimeError::failed(
                format!("starting {}", spec.id),
                format!(
                    "the image's disk is {} MiB, more than this node's disk budget of {} MiB",
                    disk_size >> 20,
                    self.s.disk_budget >> 20
                ),
            ));
        }
        let mut instances = self.instances.lock().await;
        if instances.contains_key(&spec.id) {
            return Err(RuntimeError::failed(format!("starting {}", spec.id), "already exists"));
        }
        let slot = match from {
            Some((_, slot)) if instances.values().any(|i| i.slot == slot) => {
                return Err(RuntimeError::failed(format!("restoring {}", spec.id), "the snapshot's slot is in use"))
            }
            Some((_, slot)) => slot,
            None => {
                let reserved: Vec<u32> = self.reserved_slots();
                net::free_slot(self.s.base, |s| instances.values().any(|i| i.slot == s) || reserved.contains(&s))
                    .await?
            }
        };
        let (host_ip, guest_ip) = net::slot_addresses(self.s.base, slot);
        let dir = self.s.dir.join(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::failed("creating the instance directory", e))?;
        let (uid, gid) = crate::container::ContainerRuntime::user_of(&spec.rootfs, spec.image.user.as_deref());
        let config = GuestConfig {
            args: crate::container::command_of(spec),
            env: crate::container::env_of(spec),
            cwd: spec.image.working_dir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into()),
            uid,
            gid,
            hostname: spec.id.chars().take(63).collect(),
            address: guest_ip,
            prefix: 30,
            gateway: host_ip,
            dns: if spec.dns_search.is_some() { vec![host_ip] } else { resolvers() },
            // On a project network short names resolve as containers' do.
            search: spec.dns_search.iter().flat_map(|s| s.split_whitespace()).map(str::to_owned).collect(),
            overlay_mib: (spec.memory_mib / 2).max(16),
        };
        match from {
            // The guest read its configuration at boot: the restored one keeps the disk it had.
            Some((snapshot, _)) => {
                std::fs::copy(snapshot.join("config.img"), dir.join("config.img"))
                    .map_err(|e| RuntimeError::failed("copying the snapshot's configuration disk", e))?;
            }
            None => {
                let mut bytes = config.encode();
                bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
                write_private(&dir.join("config.img"), &bytes)?;
            }
        }
        let tap = format!("zwt{}", crate::container::short_key(&spec.id));
        let owner = match (&self.s.vmm, self.s.vmm_user) {
            (Vmm::Qemu { .. }, Some(user)) => Some(user.of_slot(slot)),
            _ => None,
        };
        net::create_tap(&tap, host_ip, owner).await?;
        if let Err(e) = std::fs::write(dir.join("tap"), &tap) {
            tracing::warn!(instance = %spec.id, tap, error = %e, "the tap is not recorded; after a crash only the sweeper finds it");
        }
        let mut child = match self.spawn_vmm(spec, &dir, &disk, &tap, &mac_of(slot), owner, from.is_some()).await {
            Ok(c) => c,
            Err(e) => {
                if let Err(why) = net::destroy_tap(&tap).await {
                    tracing::warn!(instance = %spec.id, tap, error = %why, "the tap device may be left behind");
                }
                if let Err(why) = tokio::fs::remove_dir_all(&dir).await {
                    tracing::warn!(dir = %dir.display(), error = %why, "the instance directory is left behind");
                }
                return Err(e);
            }
        };
        let pid = child.id();
        let console = Arc::new(Mutex::new(child.stdin.take()));
        let tail = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let (code_tx, code_rx) = watch::channel::<Option<Result<i32, String>>>(None);
        let reader = child
            .stdout
            .take()
            .map(|out| tokio::spawn(read_console(spec.id.clone(), out, self.logs.clone(), tail.clone(), code_tx)));
        let stderr_tail = tail.clone();
        let errors = child.stderr.take().map(|err| {
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    push_tail(&stderr_tail, l);
                }
            })
        });
        let (tx, rx) = watch::channel(None);
        let vmm = self.s.vmm.name();
        let wait_tail = tail.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            for t in [reader, errors].into_iter().flatten() {
                // A reader that failed or lingers has nothing more to give.
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
            let reported = code_rx.borrow().clone();
            let info = match reported {
                Some(Ok(code)) => ExitInfo { code: Some(code), reason: exit_reason(code) },
                Some(Err(reason)) => {
                    ExitInfo { code: None, reason: format!("the guest could not start the app: {reason}") }
                }
                None => {
                    let how = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => e.to_string(),
                    };
                    let tail = tail_text(&wait_tail, 12);
                    ExitInfo {
                        code: None,
                        reason: format!(
                            "the VM ended before the app reported an exit ({vmm}: {how}); console:\n{tail}"
                        ),
                    }
                }
            };
            // Nobody watching any more (the instance was destroyed) is fine.
            let _ = tx.send(Some(info));
        });
        let address = SocketAddr::from((guest_ip, spec.port));
        instances.insert(
            spec.id.clone(),
            VmInstance {
                slot,
                tap,
                dir,
                pid,
                console,
                tail,
                exit: rx,
                memory_bytes: u64::from(spec.memory_mib) << 20,
                vcpu: spec.vcpu,
                memory_mib: spec.memory_mib,
                disk,
            },
        );
        tracing::info!(instance = %spec.id, %address, vmm, accel = %self.s.vmm.accel(), "microVM started");
        Ok(Running { id: spec.id.clone(), address })
    }

    /// Asks the VMM to end the VM now: QMP `quit`, or Firecracker's ctrl-alt-del.
    async fn hard_stop(dir: &Path, vmm: &Vmm) {
        match vmm {
            Vmm::Qemu { .. } => {
                match tokio::time::timeout(Duration::from_secs(2), qmp(&dir.join("qmp.sock"), "quit")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "QMP quit failed; the VMM is killed next")
                    }
                    Err(_) => tracing::warn!(dir = %dir.display(), "QMP quit timed out; the VMM is killed next"),
                }
            }
            Vmm::Firecracker { .. } => {
                if let Ok(socket) = std::fs::read_to_string(dir.join("api")) {
                    let body = json!({"action_type": "SendCtrlAltDel"});
                    let sent = tokio::time::timeout(
                        Duration::from_secs(2),
                        firecracker_put(Path::new(socket.trim()), "/actions", &body),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(_))) {
                        tracing::warn!(dir = %dir.display(), "Firecracker's ctrl-alt-del failed; the VMM is killed next");
                    }
                }
            }
        }
    }
}

/// Gives the unprivileged user of a VM what its QEMU opens, in the VM's own
/// directory (0700, owned by that user): the kernel, the initramfs and the
/// image as hard links (`f0`..`f2`) when they are world-readable, else copies
/// of its own (a shared file is never chowned), and its configuration disk.
/// Nothing else of the node's data directory is reachable for it (the
/// directories above are traverse-only or closed).
async fn qemu_files(
    dir: &Path,
    assets: &GuestAssets,
    disk: &Path,
    uid: u32,
    gid: u32,
) -> Result<(GuestAssets, PathBuf), RuntimeError> {
    let (dir, assets, disk) = (dir.to_owned(), assets.clone(), disk.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let hand_over = |p: &Path| {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| RuntimeError::failed(format!("handing {} to the VMM's user", p.display()), e))
        };
        hand_over(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::failed("closing the VM's directory", e))?;
        hand_over(&dir.join("config.img"))?;
        let files = [(&assets.vmlinux, true), (&assets.initramfs, true), (&disk, true)];
        crate::jail::prepare_jail(&dir, &files, uid, gid)?;
        let linked = GuestAssets { vmlinux: dir.join("f0"), initramfs: dir.join("f1"), ..assets };
        Ok((linked, dir.join("f2")))
    })
    .await
    .map_err(|e| RuntimeError::failed("preparing the VM's files", e))?
}

pub(crate) fn jail_id(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(60).collect()
}

impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        self.s.vmm.name()
    }

    fn wants_disk(&self) -> bool {
        true
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Running, RuntimeError> {
        self.launch(spec, None).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        let (mut exit, console, dir, pid) = {
            let instances = self.instances.lock().await;
            let i = instances.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
            (i.exit.clone(), i.console.clone(), i.dir.clone(), i.pid)
        };
        if let Some(done) = exit.borrow().clone() {
            return Ok(done);
        }
        // The guest init turns this into SIGTERM, and SIGKILL after the grace period.
        if let Some(stdin) = console.lock().await.as_mut() {
            let sent = stdin.write_all(format!("\nstop {}\n", grace.as_secs()).as_bytes()).await;
            if let Err(e) = sent.and(stdin.flush().await) {
                tracing::warn!(instance = %id, error = %e, "the stop request did not reach the guest; it is stopped hard");
            }
        }
        let margin = if self.s.vmm.accel() == Accel::Tcg { Duration::from_secs(10) } else { Duration::from_secs(3) };
        if tokio::time::timeout(grace + margin, exit.wait_for(|e| e.is_some())).await.is_err() {
            Self::hard_stop(&dir, &self.s.vmm).await;
            if tokio::time::timeout(Duration::from_secs(3), exit.wait_for(|e| e.is_some())).await.is_err() {
                if let Some(pid) = pid {
                    kill(pid);
                }
                // Whether it ended is read from `exit` below.
                let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await;
            }
        }
        let info = exit.borrow().clone();
        info.ok_or_else(|| RuntimeError::failed(format!("stopping {id}"), "the VM did not end"))
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        if let Err(e) = self.stop(id, Duration::from_secs(0)).await {
            tracing::warn!(instance = %id, error = %e, "destroying a microVM that did not stop");
        }
        let inst = self.instances.lock().await.remove(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        if let Some(pid) = inst.pid.filter(|p| alive(*p)) {
            kill(pid);
        }
        if let Err(e) = net::destroy_tap(&inst.tap).await {
            tracing::warn!(instance = %id, tap = %inst.tap, error = %e, "the tap device may be left behind");
        }
        if let Vmm::Firecracker { binary, jailer: Some(j) } = &self.s.vmm {
            let jail = jail_dir(j, binary, id);
            if let Err(e) = tokio::task::spawn_blocking(move || remove_jail(&jail)).await {
                tracing::warn!(instance = %id, error = %e, "removing the jail did not finish");
            }
        }
        tokio::fs::remove_dir_all(&inst.dir)
            .await
            .map_err(|e| RuntimeError::failed(format!("removing {}", inst.dir.display()), e))?;
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<InstanceState, RuntimeError> {
        let instances = self.instances.lock().await;
        let inst = instances.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        Ok(InstanceState::of(&inst.exit))
    }

    async fn stats(&self, id: &str) -> Result<InstanceStats, RuntimeError> {
        let instances = self.instances.lock().await;
        let inst = instances.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        // The VMM process as the host sees it: its resident memory and CPU time.
        let Some(pid) = inst.pid else { return Ok(InstanceStats::default()) };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
        Ok(InstanceStats {
            memory_bytes: rss_kb * 1024,
            memory_limit_bytes: inst.memory_bytes,
            cpu_seconds: ticks as f64 / 100.0,
            processes: u64::from(alive(pid)),
        })
    }

    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, RuntimeError> {
        if !self.logs.exists(id) && !self.instances.lock().await.contains_key(id) {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        Ok(self.logs.read(id, None))
    }

    fn snapshots(&self) -> bool {
        VmRuntime::snapshots(self)
    }

    async fn snapshot(&self, id: &str, key: &str) -> Result<SnapshotInfo, RuntimeError> {
        VmRuntime::snapshot(self, id, key).await
    }

    async fn restore(&self, spec: &InstanceSpec, key: &str) -> Result<Running, RuntimeError> {
        VmRuntime::restore(self, spec, key).await
    }

    fn snapshot_keys(&self) -> Vec<String> {
        VmRuntime::snapshot_keys(self)
    }

    async fn discard_snapshot(&self, key: &str) {
        VmRuntime::discard_snapshot(self, key).await
    }

    async fn diagnose(&self, id: &str) -> Option<String> {
        let instances = self.instances.lock().await;
        let inst = instances.get(id)?;
        let mut tail = tail_text(&inst.tail, 12);
        // Firecracker's own log is kept apart from the console: its last lines say why the VMM stopped.
        let log = std::fs::read_to_string(inst.dir.join("vmm.log.path"))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|_| inst.dir.join("vmm.log"));
        if let Ok(text) = std::fs::read_to_string(log) {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if !lines.is_empty() {
                tail.push_str(&format!("\nthe VMM's log:\n{}", lines[lines.len().saturating_sub(6)..].join("\n")));
            }
        }
        let tail = tail.trim().to_owned();
        (!tail.is_empty()).then_some(tail)
    }
}

/// Name servers for guests: the host's, unless they are loopback addresses
/// (unreachable from a VM).
fn resolvers() -> Vec<Ipv4Addr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| RuntimeError::failed("writing the configuration disk", e))?;
    f.write_all(bytes).map_err(|e| RuntimeError::failed("writing the configuration disk", e))
}

impl Drop for VmRuntime {
    /// Last resort when the runtime goes away without destroying its VMs.
    fn drop(&mut self) {
        for (_, inst) in std::mem::take(self.instances.get_mut()) {
            if let Some(pid) = inst.pid {
                kill(pid);
            }
            crate::container::last_resort(&inst.tap, "ip".as_ref(), &["link", "del", &inst.tap]);
            if let Err(e) = std::fs::remove_dir_all(&inst.dir) {
                tracing::warn!(dir = %inst.dir.display(), error = %e, "a microVM's directory is left behind");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_args_never_carry_the_config() {
        let q = Vmm::Qemu { binary: "qemu".into(), accel: Accel::Tcg };
        let args = kernel_args(&q, false);
        assert!(args.contains("console=ttyS0") && args.contains("panic=-1"));
        assert!(!args.contains(PROBE_ARG));
        assert!(kernel_args(&q, true).ends_with(PROBE_ARG));
        assert!(args.contains("tsc_early_khz="), "TCG gets the clock frequency: {args}");
        let k = Vmm::Qemu { binary: "qemu".into(), accel: Accel::Kvm };
        assert!(!kernel_args(&k, false).contains("tsc_early_khz"));
    }

    #[test]
    fn exit_codes_read_as_reasons() {
        assert_eq!(exit_reason(0), "exited");
        assert_eq!(exit_reason(3), "exited with code 3");
        assert_eq!(exit_reason(143), "terminated by signal 15");
        assert!(exit_reason(137).contains("SIGKILL"));
    }
}
