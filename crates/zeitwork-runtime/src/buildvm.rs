//! A build's microVM: the runtime's guest kernel and init booting a
//! read-only root disk of host tools (a program such as buildah with the
//! shared libraries it loads, a static busybox, a few configuration files),
//! running one command as the "app" and passing its output lines back from
//! the serial console, as an instance's logs come. It has no network device
//! at all: whatever it needs comes on its disks, and what it makes goes back
//! on a raw disk the host reads as bytes.
//!
//! The root disk is an ext4 written once per set of tools (keyed by the
//! digest of every file and where it goes) with `mkfs.ext4 -d`, and shared
//! by every build VM of the node. The guest init mounts it read-only under a
//! tmpfs overlay, so the command may write anywhere (in memory).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use zeitwork_guest_init::{parse_console_line, ConsoleLine, GuestConfig};

use crate::guest::GuestAssets;
use crate::vm::{qemu_args, Vmm};

/// Label of the root disk (never one of the guest's data disks).
pub const ROOT_LABEL: &str = "zwbuild-root";
/// What the guest's memory holds besides the command: its kernel, the
/// tmpfs over the root disk, page cache.
pub const GUEST_OVERHEAD_MIB: u32 = 256;
/// Console lines (kernel messages) kept to explain a VM that ended early.
const TAIL: usize = 20;

/// The files of a root disk: destination path in the guest → host file.
/// Programs come with their `ldd` closure (the dynamic loader included).
#[derive(Debug, Default, Clone)]
pub struct RootFiles {
    files: BTreeMap<String, PathBuf>,
    /// Files written with fixed contents: destination → bytes.
    written: BTreeMap<String, Vec<u8>>,
}

impl RootFiles {
    /// A host file at `dest` in the guest.
    pub fn file(&mut self, dest: &str, src: &Path) -> &mut Self {
        self.files.insert(dest.to_owned(), src.to_owned());
        self
    }

    /// A file with fixed contents at `dest`.
    pub fn write(&mut self, dest: &str, bytes: &[u8]) -> &mut Self {
        self.written.insert(dest.to_owned(), bytes.to_vec());
        self
    }

    /// A dynamically linked program at its host path, with every shared
    /// library `ldd` names (at the paths it names them by).
    pub fn program(&mut self, path: &Path) -> Result<&mut Self, String> {
        let dest = path.to_str().ok_or_else(|| format!("{} is not a UTF-8 path", path.display()))?.to_owned();
        self.files.insert(dest, path.to_owned());
        for lib in ldd_closure(path)? {
            let dest = lib.to_str().ok_or_else(|| format!("{} is not a UTF-8 path", lib.display()))?.to_owned();
            self.files.insert(dest, lib);
        }
        Ok(self)
    }

    /// A statically linked program at `dest` (refused when it loads libraries).
    pub fn static_program(&mut self, dest: &str, path: &Path) -> Result<&mut Self, String> {
        if !ldd_closure(path)?.is_empty() {
            return Err(format!("{} is not statically linked (Debian: install busybox-static)", path.display()));
        }
        Ok(self.file(dest, path))
    }

    /// The digest of every destination and its contents: the disk's key.
    fn key(&self) -> Result<String, String> {
        let mut h = Sha256::new();
        h.update(b"zeitwork build root 1\n");
        for (dest, src) in &self.files {
            let bytes = std::fs::read(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
            h.update(dest.as_bytes());
            h.update([0]);
            h.update(Sha256::digest(&bytes));
        }
        for (dest, bytes) in &self.written {
            h.update(dest.as_bytes());
            h.update([1]);
            h.update(Sha256::digest(bytes));
        }
        Ok(hex::encode(&h.finalize()[..12]))
    }
}

/// The shared libraries `ldd` says `program` loads (none for a static one).
pub fn ldd_closure(program: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ldd (libc-bin): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(format!("ldd {}: {}", program.display(), text.trim()));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            return Err(format!("{} needs a library that is not installed: {}", program.display(), line.trim()));
        }
    }
    Ok(libs)
}

/// The root disk of `files` under `cache` (`root-<key>.ext4`), written now
/// unless it exists. Blocking: run it off the async threads.
pub fn root_disk(cache: &Path, files: &RootFiles) -> Result<PathBuf, String> {
    let key = files.key()?;
    let disk = cache.join(format!("root-{key}.ext4"));
    if disk.is_file() {
        return Ok(disk);
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let staging = cache.join(format!("root-{key}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    let made = (|| {
        let mut bytes: u64 = 0;
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var/tmp", "mnt"] {
            std::fs::create_dir_all(staging.join(d)).map_err(|e| format!("staging the root disk: {e}"))?;
        }
        for (dest, src) in &files.files {
            let to = staging.join(dest.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("staging the root disk: {e}"))?;
            }
            // Links are followed: the guest gets the file itself.
            bytes += std::fs::copy(src, &to).map_err(|e| format!("copying {} to the root disk: {e}", src.display()))?;
        }
        for (dest, data) in &files.written {
            let to = staging.join(dest.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("staging the root disk: {e}"))?;
            }
            std::fs::write(&to, data).map_err(|e| format!("staging the root disk: {e}"))?;
            bytes += data.len() as u64;
        }
        use std::os::unix::fs::PermissionsExt;
        for d in ["tmp", "var/tmp"] {
            std::fs::set_permissions(staging.join(d), std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| format!("staging the root disk: {e}"))?;
        }
        let size = (bytes + bytes / 4 + (16 << 20)).div_ceil(1 << 20) << 20;
        let tmp = cache.join(format!("root-{key}.ext4.tmp"));
        mkfs_ext4(&tmp, size, ROOT_LABEL, Some(&staging), &["-O", "^has_journal"])?;
        std::fs::rename(&tmp, &disk).map_err(|e| format!("storing the root disk: {e}"))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    made?;
    tracing::info!(disk = %disk.display(), "build VM root disk written");
    Ok(disk)
}

/// Writes an ext4 file system of `size` bytes to the file `image` (made
/// sparse), labelled `label`, holding the tree `from` (owners and modes
/// kept). Blocking.
pub fn mkfs_ext4(image: &Path, size: u64, label: &str, from: Option<&Path>, extra: &[&str]) -> Result<(), String> {
    let _ = std::fs::remove_file(image);
    let f = std::fs::File::create(image).map_err(|e| format!("cannot create {}: {e}", image.display()))?;
    f.set_len(size).map_err(|e| format!("cannot size {}: {e}", image.display()))?;
    drop(f);
    let mut cmd = std::process::Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-m", "0", "-L", label, "-E", "root_owner=0:0"]).args(extra);
    if let Some(d) = from {
        cmd.arg("-d").arg(d);
    }
    let out =
        cmd.arg(image).stdin(Stdio::null()).output().map_err(|e| format!("cannot run mkfs.ext4 (e2fsprogs): {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(format!("mkfs.ext4 {}: {}", image.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// One build VM.
#[derive(Debug)]
pub struct BuildVm<'a> {
    pub vmm: &'a Vmm,
    pub assets: &'a GuestAssets,
    /// The VM's own directory: made now, removed when it ends.
    pub dir: PathBuf,
    pub name: String,
    pub vcpu: u32,
    /// For the command; the guest's own overhead is added.
    pub memory_mib: u32,
    /// The command and its environment (written to the configuration disk, 0600).
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Disks the guest only reads; the root disk first.
    pub read_only: Vec<PathBuf>,
    /// Disks the guest writes.
    pub writable: Vec<PathBuf>,
    /// The VMM is killed after it.
    pub limit: Duration,
}

/// How a build VM ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildVmError {
    /// The command exited with this code.
    Exit(i32),
    TimedOut(Duration),
    Cancelled,
    /// The VM could not start or ended without the command's exit code.
    Failed(String),
}

impl std::fmt::Display for BuildVmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildVmError::Exit(c) => write!(f, "the build {}", crate::exit_reason(*c)),
            BuildVmError::TimedOut(d) => write!(f, "the build took longer than its limit of {} s", d.as_secs()),
            BuildVmError::Cancelled => f.write_str("the build was cancelled"),
            BuildVmError::Failed(why) => f.write_str(why),
        }
    }
}

/// Leftovers of build VMs under `dir` (an agent that was killed): their
/// VMMs killed, their directories removed.
pub fn clean_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if let Some(pid) = std::fs::read_to_string(path.join("vmm.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
        {
            // Only if that pid still is this VM's VMM (pids are reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*path.to_string_lossy()) {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
        tracing::warn!(dir = %path.display(), "removing a build VM left by an earlier run");
        if let Err(err) = std::fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), error = %err, "a build VM's directory is left behind");
        }
    }
}

/// The QEMU command line of a build VM (no network device; the writable
/// disks after the read-only ones and the configuration disk).
pub fn build_vm_args(vm: &BuildVm<'_>, accel: crate::vm::Accel, config: &Path) -> Vec<String> {
    let mut ro: Vec<&Path> = vm.read_only.iter().map(PathBuf::as_path).collect();
    ro.insert(1.min(ro.len()), config);
    let mut args =
        qemu_args(accel, vm.assets, vm.vcpu, vm.memory_mib.saturating_add(GUEST_OVERHEAD_MIB), &ro, None, None, false);
    for (i, disk) in vm.writable.iter().enumerate() {
        let id = ro.len() + i;
        args.push("-drive".into());
        args.push(format!("id=disk{id},file={},format=raw,if=none", disk.display()));
        args.push("-device".into());
        args.push(format!("virtio-blk-device,drive=disk{id}"));
    }
    args.extend(["-name".into(), format!("zeitwork-{}", vm.name)]);
    args.extend(["-pidfile".into(), vm.dir.join("vmm.pid").display().to_string()]);
    args
}

/// Boots the VM, sends the command's output lines to `lines` as they come,
/// and waits for its exit; the VMM is killed on the time limit or when
/// `cancel` turns true. The VM's directory is removed in every case.
pub async fn run_build_vm(
    vm: BuildVm<'_>,
    lines: mpsc::UnboundedSender<String>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), BuildVmError> {
    let result = run_in(&vm, lines, cancel).await;
    if let Err(e) = tokio::fs::remove_dir_all(&vm.dir).await {
        tracing::warn!(dir = %vm.dir.display(), error = %e, "a build VM's directory is left behind");
    }
    result
}

async fn run_in(
    vm: &BuildVm<'_>,
    lines: mpsc::UnboundedSender<String>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), BuildVmError> {
    let Vmm::Qemu { binary, accel } = vm.vmm else {
        return Err(BuildVmError::Failed("build VMs run on the qemu runtime only".into()));
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| BuildVmError::Failed(format!("{what}: {e}"));
    let _ = tokio::fs::remove_dir_all(&vm.dir).await;
    tokio::fs::create_dir_all(&vm.dir).await.map_err(|e| failed("creating the build VM's directory", &e))?;
    let config = GuestConfig {
        args: vm.args.clone(),
        env: vm.env.clone(),
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "zeitwork-build".into(),
        // No address: the guest has no network device.
        address: std::net::Ipv4Addr::UNSPECIFIED,
        prefix: 30,
        gateway: std::net::Ipv4Addr::UNSPECIFIED,
        dns: Vec::new(),
        search: Vec::new(),
        overlay_mib: 512,
    };
    let mut bytes = config.encode();
    if bytes.len() > 60 * 1024 {
        return Err(BuildVmError::Failed(format!(
            "the build's settings (arguments and secrets) take {} KiB, more than the 60 KiB a build VM is handed",
            bytes.len() >> 10
        )));
    }
    bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
    let config_disk = vm.dir.join("config.img");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&config_disk)
            .map_err(|e| failed("writing the configuration disk", &e))?;
        f.write_all(&bytes).map_err(|e| failed("writing the configuration disk", &e))?;
    }
    let args = build_vm_args(vm, *accel, &config_disk);
    let mut child = tokio::process::Command::new(binary)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(&format!("cannot run {}", binary.display()), &e))?;
    // Held open: the guest init reads commands from the console.
    let _console = child.stdin.take();
    let tail = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::<String>::new()));
    let (code_tx, code_rx) = watch::channel::<Option<Result<i32, String>>>(None);
    let push = |tail: &std::sync::Mutex<VecDeque<String>>, l: String| {
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL {
                t.pop_front();
            }
            t.push_back(l);
        }
    };
    let reader = child.stdout.take().map(|out| {
        let tail = tail.clone();
        tokio::spawn(async move {
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
                    ConsoleLine::Stdout(l) | ConsoleLine::Stderr(l) => {
                        let _ = lines.send(l.to_owned());
                    }
                    ConsoleLine::Exit(c) => {
                        let _ = code_tx.send(Some(Ok(c)));
                    }
                    ConsoleLine::Failed(why) => {
                        let _ = code_tx.send(Some(Err(why.to_owned())));
                    }
                    ConsoleLine::Started | ConsoleLine::ProbeOk => {}
                    ConsoleLine::Console(l) => {
                        if !l.trim().is_empty() {
                            push(&tail, l.to_owned());
                        }
                    }
                }
            }
        })
    });
    let errors = child.stderr.take().map(|err| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                push(&tail, l);
            }
        })
    });
    let ended = tokio::select! {
        status = child.wait() => Ok(status),
        _ = tokio::time::sleep(vm.limit) => Err(BuildVmError::TimedOut(vm.limit)),
        _ = async { if cancel.wait_for(|c| *c).await.is_err() { std::future::pending::<()>().await } } => {
            Err(BuildVmError::Cancelled)
        }
    };
    if ended.is_err() {
        // The time limit or a cancel: the VMM goes, and the guest with it.
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    for t in [reader, errors].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let status = ended?;
    let reported = code_rx.borrow().clone();
    match reported {
        Some(Ok(0)) => Ok(()),
        Some(Ok(code)) => Err(BuildVmError::Exit(code)),
        Some(Err(why)) => Err(BuildVmError::Failed(format!("the build VM could not start the build: {why}"))),
        None => {
            let how = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let t = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default();
            Err(BuildVmError::Failed(format!("the build VM ended without a result (qemu: {how}); console:\n{t}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_vms_have_no_network_and_only_their_own_disks_are_writable() {
        let assets =
            GuestAssets { vmlinux: "/k".into(), initramfs: "/i".into(), release: "r".into(), source: "/s".into() };
        let vmm = Vmm::Qemu { binary: "qemu".into(), accel: crate::vm::Accel::Tcg };
        let vm = BuildVm {
            vmm: &vmm,
            assets: &assets,
            dir: "/vms/b1".into(),
            name: "build-b1".into(),
            vcpu: 2,
            memory_mib: 1024,
            args: vec!["/bin/busybox".into()],
            env: Vec::new(),
            read_only: vec!["/root.ext4".into(), "/ctx.ext4".into()],
            writable: vec!["/store.ext4".into(), "/out.img".into()],
            limit: Duration::from_secs(60),
        };
        let a = build_vm_args(&vm, crate::vm::Accel::Tcg, Path::new("/vms/b1/config.img")).join(" ");
        assert!(!a.contains("-netdev") && !a.contains("virtio-net"), "{a}");
        assert!(a.contains("-m 1280M -smp 2"), "the guest's overhead is added: {a}");
        for ro in ["/root.ext4", "/vms/b1/config.img", "/ctx.ext4"] {
            assert!(a.contains(&format!("file={ro},format=raw,if=none,readonly=on")), "{ro}: {a}");
        }
        for rw in ["/store.ext4", "/out.img"] {
            let drive = a.split(' ').find(|w| w.contains(&format!("file={rw},"))).unwrap();
            assert!(!drive.contains("readonly"), "{drive}");
        }
        assert!(a.contains("-pidfile /vms/b1/vmm.pid"));
    }

    #[test]
    fn ldd_names_the_libraries_of_a_dynamic_program() {
        let libs = ldd_closure(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
        assert!(libs.iter().all(|l| l.is_absolute()));
    }
}
