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

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{watch, Mutex};
use zeitwork_guest_init::{parse_console_line, ConsoleLine, GuestConfig, PROBE_ARG};

use crate::guest::GuestAssets;
use crate::logs::LogStore;
use crate::net;
use crate::{
    exit_reason, ExitInfo, InstanceSpec, InstanceState, InstanceStats, LogLine, Running, Runtime, RuntimeError,
};

/// Console lines kept per instance for failure reasons.
const CONSOLE_TAIL: usize = 40;

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
}

/// Runs instances as microVMs.
#[derive(Debug)]
pub struct VmRuntime {
    s: VmSettings,
    logs: Arc<LogStore>,
    instances: Mutex<HashMap<String, VmInstance>>,
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

/// QEMU's arguments for one VM.
#[allow(clippy::too_many_arguments)]
pub fn qemu_args(
    accel: Accel,
    assets: &GuestAssets,
    vcpu: u32,
    memory_mib: u32,
    disks: &[&Path],
    tap: Option<(&str, &str)>,
    qmp: Option<&Path>,
    probe: bool,
) -> Vec<String> {
    let vmm = Vmm::Qemu { binary: PathBuf::new(), accel };
    let mut a: Vec<String> = vec![
        "-M".into(),
        // The PIT and PIC let the kernel calibrate its clock under TCG too.
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on".into(),
        "-accel".into(),
        accel.to_string(),
        "-cpu".into(),
        match accel {
            // This host CPU model without arch-capabilities, which nested KVM often lacks.
            Accel::Kvm => "host,-arch-capabilities".into(),
            Accel::Tcg => "max".into(),
        },
        "-m".into(),
        format!("{memory_mib}M"),
        "-smp".into(),
        vcpu.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        // QEMU's own seccomp filter: no obsolete system calls, no setuid, no
        // spawning processes, no changing its scheduling or resource limits.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-kernel".into(),
        assets.vmlinux.display().to_string(),
        "-initrd".into(),
        assets.initramfs.display().to_string(),
        "-append".into(),
        kernel_args(&vmm, probe),
    ];
    for (i, disk) in disks.iter().enumerate() {
        a.push("-drive".into());
        a.push(format!("id=disk{i},file={},format=raw,if=none,readonly=on", disk.display()));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i}"));
    }
    if let Some((tap, mac)) = tap {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,ifname={tap},script=no,downscript=no"));
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={mac}"));
    }
    if let Some(q) = qmp {
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", q.display()));
    }
    a
}

/// The Firecracker API calls that configure and start one VM, in order.
pub fn firecracker_requests(
    assets: (&str, &str),
    boot_args: &str,
    vcpu: u32,
    memory_mib: u32,
    disks: &[(&str, &str)],
    tap: Option<(&str, &str)>,
) -> Vec<(String, serde_json::Value)> {
    let mut r = vec![
        ("/machine-config".to_owned(), json!({"vcpu_count": vcpu.clamp(1, 32), "mem_size_mib": memory_mib})),
        (
            "/boot-source".to_owned(),
            json!({"kernel_image_path": assets.0, "initrd_path": assets.1, "boot_args": boot_args}),
        ),
    ];
    for (id, path) in disks {
        r.push((
            format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": true}),
        ));
    }
    if let Some((tap, mac)) = tap {
        r.push((
            "/network-interfaces/eth0".to_owned(),
            json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}),
        ));
    }
    r.push(("/actions".to_owned(), json!({"action_type": "InstanceStart"})));
    r
}

/// One PUT to Firecracker's API on its Unix socket; 204 or the fault message.
pub async fn firecracker_put(socket: &Path, path: &str, body: &serde_json::Value) -> Result<(), String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| format!("{}: {e}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::put(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let fault = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(format!("PUT {path}: {status}: {fault}"))
}

async fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn kill(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether VMM output says the hypervisor stopped the guest: QEMU's
/// "emulation failure" / "KVM internal error", Firecracker's
/// "Received KVM_EXIT_INTERNAL_ERROR signal".
pub fn kvm_crashed(out: &str) -> bool {
    out.contains("emulation failure") || out.contains("KVM internal error") || out.contains("KVM_EXIT_INTERNAL_ERROR")
}

/// Boots a guest in probe mode and reports whether it came up (and how long it took).
pub async fn probe(vmm: &Vmm, assets: &GuestAssets, work: &Path, timeout: Duration) -> Result<Duration, String> {
    if vmm.accel() == Accel::Kvm {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    }
    let started = Instant::now();
    let mut child = match vmm {
        Vmm::Qemu { binary, accel } => Command::new(binary)
            .args(qemu_args(*accel, assets, 1, 128, &[], None, None, true))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?,
        Vmm::Firecracker { binary, .. } => {
            std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
            let socket = work.join(format!("probe-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&socket);
            let child = Command::new(binary)
                .arg("--api-sock")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
            if !wait_for_socket(&socket, Duration::from_secs(5)).await {
                return Err("firecracker did not open its API socket".into());
            }
            let (k, i) = (assets.vmlinux.display().to_string(), assets.initramfs.display().to_string());
            for (path, body) in firecracker_requests((&k, &i), &kernel_args(vmm, true), 1, 128, &[], None) {
                firecracker_put(&socket, &path, &body).await?;
            }
            let _ = std::fs::remove_file(&socket);
            child
        }
    };
    let mut out = String::new();
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let result = tokio::time::timeout(timeout, async {
        let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                n = stdout.read(&mut a), if out_open => match n {
                    Ok(n) if n > 0 => out.push_str(&String::from_utf8_lossy(&a[..n])),
                    _ => out_open = false,
                },
                n = stderr.read(&mut b), if err_open => match n {
                    Ok(n) if n > 0 => out.push_str(&String::from_utf8_lossy(&b[..n])),
                    _ => err_open = false,
                },
            }
            if out.contains(zeitwork_guest_init::PROBE_OK) {
                return true;
            }
            // A broken KVM stops the vCPU and leaves the VMM waiting: no need to wait for the timeout.
            if kvm_crashed(&out) {
                return false;
            }
        }
        false
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    match result {
        Ok(true) => Ok(started.elapsed()),
        Ok(false) | Err(_) => {
            let lines: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let kvm: Vec<&str> = lines.iter().copied().filter(|l| l.contains("KVM") || kvm_crashed(l)).collect();
            let tail =
                if kvm.is_empty() { lines[lines.len().saturating_sub(6)..].join(" | ") } else { kvm.join(" | ") };
            let what = if result.is_err() {
                format!("no answer within {} s", timeout.as_secs())
            } else {
                "the VM ended".into()
            };
            if tail.is_empty() {
                Err(format!("the probe guest did not boot ({what}, nothing on its console)"))
            } else {
                Err(format!("the probe guest did not boot ({what}): {tail}"))
            }
        }
    }
}

impl VmRuntime {
    pub async fn new(s: VmSettings, logs: Arc<LogStore>) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&s.dir).map_err(|e| RuntimeError::failed("creating the runtime directory", e))?;
        crate::net::apply_policy(s.base).await?;
        let rt = Self { s, logs, instances: Mutex::new(HashMap::new()) };
        rt.clean_leftovers().await;
        Ok(rt)
    }

    pub fn vmm(&self) -> &Vmm {
        &self.s.vmm
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

    async fn spawn_vmm(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        disk: &Path,
        tap: &str,
        mac: &str,
    ) -> Result<Child, RuntimeError> {
        let config = dir.join("config.img");
        match &self.s.vmm {
            Vmm::Qemu { binary, accel } => {
                let mut args = qemu_args(
                    *accel,
                    &self.s.assets,
                    spec.vcpu,
                    spec.memory_mib,
                    &[disk, &config],
                    Some((tap, mac)),
                    Some(&dir.join("qmp.sock")),
                    false,
                );
                args.extend(["-name".into(), format!("zeitwork-{}", spec.id)]);
                args.extend(["-pidfile".into(), dir.join("vmm.pid").display().to_string()]);
                Command::new(binary)
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| RuntimeError::Unavailable("qemu", format!("{}: {e}", binary.display())))
            }
            Vmm::Firecracker { binary, jailer } => {
                self.spawn_firecracker(spec, dir, disk, tap, mac, binary, jailer).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_firecracker(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        disk: &Path,
        tap: &str,
        mac: &str,
        binary: &Path,
        jailer: &Option<Jailer>,
    ) -> Result<Child, RuntimeError> {
        let config = dir.join("config.img");
        // Shared (kernel, initramfs, the image's ext4) and this VM's own (its configuration).
        let files = [
            (&self.s.assets.vmlinux, true),
            (&self.s.assets.initramfs, true),
            (&disk.to_path_buf(), true),
            (&config, false),
        ];
        // Paths as Firecracker sees them, where its API socket is, and its own log
        // (kept apart from the serial console, which is its stdout).
        let (mut cmd, socket, paths, jail): (Command, PathBuf, Vec<String>, Option<PathBuf>) = match jailer {
            None => {
                let socket = dir.join("api.sock");
                let log = dir.join("vmm.log");
                std::fs::write(&log, b"").map_err(|e| RuntimeError::failed("creating the VMM's log", e))?;
                let mut c = Command::new(binary);
                c.arg("--api-sock").arg(&socket).arg("--id").arg(jail_id(&spec.id));
                c.arg("--log-path").arg(&log).arg("--level").arg("Warning");
                (c, socket, files.iter().map(|(f, _)| f.display().to_string()).collect(), None)
            }
            Some(j) => {
                let jail = jail_dir(j, binary, &spec.id);
                let root = jail.join("root");
                // Copies of whole images may be made: off the executor.
                let owned: Vec<(PathBuf, bool)> = files.iter().map(|(f, shared)| ((*f).clone(), *shared)).collect();
                let (at, jail_for_cleanup, uid, gid) = (root.clone(), jail.clone(), j.uid, j.gid);
                let prepared = tokio::task::spawn_blocking(move || {
                    let files: Vec<(&PathBuf, bool)> = owned.iter().map(|(f, shared)| (f, *shared)).collect();
                    let prepared = prepare_jail(&at, &files, uid, gid);
                    if prepared.is_err() {
                        remove_jail(&jail_for_cleanup);
                    }
                    prepared
                })
                .await
                .map_err(|e| RuntimeError::failed("preparing the jail", e))?;
                prepared?;
                let mut c = Command::new(&j.binary);
                c.arg("--id")
                    .arg(jail_id(&spec.id))
                    .arg("--exec-file")
                    .arg(binary)
                    .arg("--uid")
                    .arg(j.uid.to_string())
                    .arg("--gid")
                    .arg(j.gid.to_string())
                    .arg("--chroot-base-dir")
                    .arg(&j.chroot_base)
                    .arg("--cgroup-version")
                    .arg(if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() { "2" } else { "1" })
                    .arg("--")
                    .arg("--api-sock")
                    .arg("/run/firecracker.socket")
                    .arg("--log-path")
                    .arg("/vmm.log")
                    .arg("--level")
                    .arg("Warning");
                let _ = std::fs::write(dir.join("vmm.log.path"), root.join("vmm.log").display().to_string());
                let inside = (0..files.len()).map(|i| format!("/f{i}")).collect();
                (c, root.join("run/firecracker.socket"), inside, Some(jail))
            }
        };
        let _ = std::fs::remove_file(&socket);
        let fail = |jail: &Option<PathBuf>| {
            if let Some(j) = jail {
                remove_jail(j);
            }
        };
        let mut child = match cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
            Ok(c) => c,
            Err(e) => {
                fail(&jail);
                return Err(RuntimeError::Unavailable("firecracker", format!("{}: {e}", binary.display())));
            }
        };
        if let Some(pid) = child.id() {
            let _ = std::fs::write(dir.join("vmm.pid"), pid.to_string());
        }
        if !wait_for_socket(&socket, Duration::from_secs(10)).await {
            if let Some(pid) = child.id() {
                kill(pid);
            }
            // What the jailer or the VMM said is the reason (a missing library, a bad path, …).
            let mut said = String::new();
            if let Some(mut err) = child.stderr.take() {
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut buf)).await;
                said = String::from_utf8_lossy(&buf).trim().chars().take(1000).collect();
            }
            let _ = child.wait().await;
            fail(&jail);
            let why = if said.is_empty() {
                "its API socket did not appear within 10 s".to_owned()
            } else {
                format!("its API socket did not appear within 10 s: {said}")
            };
            return Err(RuntimeError::failed("starting firecracker", why));
        }
        let requests = firecracker_requests(
            (&paths[0], &paths[1]),
            &kernel_args(&self.s.vmm, false),
            spec.vcpu,
            spec.memory_mib,
            &[("rootfs", &paths[2]), ("config", &paths[3])],
            Some((tap, mac)),
        );
        for (path, body) in requests {
            if let Err(e) = firecracker_put(&socket, &path, &body).await {
                if let Some(pid) = child.id() {
                    kill(pid);
                }
                let _ = child.wait().await;
                fail(&jail);
                return Err(RuntimeError::failed("configuring the VM through Firecracker's API", e));
            }
        }
        let _ = std::fs::write(dir.join("api"), socket.display().to_string());
        Ok(child)
    }

    /// Asks the VMM to end the VM now: QMP `quit`, or Firecracker's ctrl-alt-del.
    async fn hard_stop(dir: &Path, vmm: &Vmm) {
        match vmm {
            Vmm::Qemu { .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(2), qmp(&dir.join("qmp.sock"), "quit")).await;
            }
            Vmm::Firecracker { .. } => {
                if let Ok(socket) = std::fs::read_to_string(dir.join("api")) {
                    let body = json!({"action_type": "SendCtrlAltDel"});
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        firecracker_put(Path::new(socket.trim()), "/actions", &body),
                    )
                    .await;
                }
            }
        }
    }
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
        let slot = net::free_slot(self.s.base, |s| instances.values().any(|i| i.slot == s)).await?;
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
            dns: resolvers(),
            overlay_mib: (spec.memory_mib / 2).max(16),
        };
        let mut bytes = config.encode();
        bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
        write_private(&dir.join("config.img"), &bytes)?;
        let tap = format!("zwt{}", crate::container::short_key(&spec.id));
        net::create_tap(&tap, host_ip).await?;
        let _ = std::fs::write(dir.join("tap"), &tap);
        let mut child = match self.spawn_vmm(spec, &dir, &disk, &tap, &mac_of(slot)).await {
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
            let _ = tx.send(Some(info));
        });
        let address = SocketAddr::from((guest_ip, spec.port));
        instances.insert(
            spec.id.clone(),
            VmInstance { slot, tap, dir, pid, console, tail, exit: rx, memory_bytes: u64::from(spec.memory_mib) << 20 },
        );
        tracing::info!(instance = %spec.id, %address, vmm, accel = %self.s.vmm.accel(), "microVM started");
        Ok(Running { id: spec.id.clone(), address })
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
            let _ = stdin.write_all(format!("\nstop {}\n", grace.as_secs()).as_bytes()).await;
            let _ = stdin.flush().await;
        }
        let margin = if self.s.vmm.accel() == Accel::Tcg { Duration::from_secs(10) } else { Duration::from_secs(3) };
        if tokio::time::timeout(grace + margin, exit.wait_for(|e| e.is_some())).await.is_err() {
            Self::hard_stop(&dir, &self.s.vmm).await;
            if tokio::time::timeout(Duration::from_secs(3), exit.wait_for(|e| e.is_some())).await.is_err() {
                if let Some(pid) = pid {
                    kill(pid);
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await;
            }
        }
        let info = exit.borrow().clone();
        info.ok_or_else(|| RuntimeError::failed(format!("stopping {id}"), "the VM did not end"))
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let _ = self.stop(id, Duration::from_secs(0)).await;
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

fn push_tail(tail: &std::sync::Mutex<VecDeque<String>>, line: String) {
    if let Ok(mut t) = tail.lock() {
        if t.len() == CONSOLE_TAIL {
            t.pop_front();
        }
        t.push_back(line);
    }
}

fn tail_text(tail: &std::sync::Mutex<VecDeque<String>>, n: usize) -> String {
    let t = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
    t[t.len().saturating_sub(n)..].join("\n")
}

/// Splits the console into the app's logs, the exit report and the rest.
async fn read_console(
    id: String,
    out: tokio::process::ChildStdout,
    logs: Arc<LogStore>,
    tail: Arc<std::sync::Mutex<VecDeque<String>>>,
    code: watch::Sender<Option<Result<i32, String>>>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        match parse_console_line(&line) {
            ConsoleLine::Stdout(l) => logs.append(&id, "stdout", l.to_owned()).await,
            ConsoleLine::Stderr(l) => logs.append(&id, "stderr", l.to_owned()).await,
            ConsoleLine::Exit(c) => {
                let _ = code.send(Some(Ok(c)));
            }
            ConsoleLine::Failed(reason) => {
                push_tail(&tail, line.trim_end().to_owned());
                let _ = code.send(Some(Err(reason.to_owned())));
            }
            ConsoleLine::Started | ConsoleLine::ProbeOk => {}
            ConsoleLine::Console(l) => {
                if !l.trim().is_empty() {
                    push_tail(&tail, l.to_owned());
                }
            }
        }
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
            let _ = std::process::Command::new("ip").args(["link", "del", &inst.tap]).output();
            let _ = std::fs::remove_dir_all(&inst.dir);
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
    fn qemu_uses_microvm_with_the_accelerator_and_read_only_disks() {
        let assets =
            GuestAssets { vmlinux: "/k".into(), initramfs: "/i".into(), release: "r".into(), source: "/s".into() };
        let a = qemu_args(
            Accel::Kvm,
            &assets,
            2,
            256,
            &[Path::new("/d")],
            Some(("zwt1", "02:00:00:00:00:01")),
            None,
            false,
        );
        let joined = a.join(" ");
        assert!(joined.contains("-M microvm,x-option-roms=off"));
        assert!(joined.contains("-accel kvm -cpu host,-arch-capabilities"));
        assert!(joined.contains("-m 256M -smp 2"));
        assert!(joined.contains("file=/d,format=raw,if=none,readonly=on"));
        assert!(joined.contains("tap,id=net0,ifname=zwt1,script=no"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        let t = qemu_args(Accel::Tcg, &assets, 1, 128, &[], None, None, true).join(" ");
        assert!(t.contains("-accel tcg -cpu max"));
    }

    #[test]
    fn exit_codes_read_as_reasons() {
        assert_eq!(exit_reason(0), "exited");
        assert_eq!(exit_reason(3), "exited with code 3");
        assert_eq!(exit_reason(143), "terminated by signal 15");
        assert!(exit_reason(137).contains("SIGKILL"));
    }
}
