//! The `container` driver: an OCI runtime (runc or crun from the host) runs
//! the image's entrypoint in its own PID, mount, IPC, UTS and network
//! namespaces, on a writable overlay over the shared read-only image, with
//! the project's CPU and memory limits as cgroup limits.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tokio::sync::{watch, Mutex};

use crate::logs::LogStore;
use crate::net::{self, Link};
use crate::{ExitInfo, InstanceSpec, InstanceState, InstanceStats, LogLine, Running, Runtime, RuntimeError};

#[derive(Debug)]
struct Instance {
    link: Link,
    slot: u32,
    dir: PathBuf,
    merged: PathBuf,
    exit: watch::Receiver<Option<ExitInfo>>,
}

/// What confines each container besides its namespaces, cgroup limits,
/// seccomp filter and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confinement {
    /// Size of each instance's writable layer, MiB: an ext4 image of its own,
    /// loop-mounted under its overlay, so an instance that fills it gets
    /// ENOSPC and the host's disk keeps its space. 0: no quota (the overlay
    /// writes to the host's file system).
    pub disk_mib: u32,
    /// First host uid/gid of the user namespaces root images run in: an
    /// image whose user is root runs as root inside a user namespace whose
    /// ids 0..65536 are host ids `userns_base + slot * 65536 ..` (each
    /// instance its own range, by its address slot), so its root is nobody on
    /// the host. None: root images run as host root (with the other limits).
    pub userns_base: Option<u32>,
}

impl Default for Confinement {
    fn default() -> Self {
        Self { disk_mib: DEFAULT_DISK_MIB, userns_base: None }
    }
}

/// Ids in each instance's user namespace.
pub const USERNS_SIZE: u32 = 65_536;

impl Confinement {
    /// The first host id of the user namespace of an instance on `slot`
    /// running as `uid`, when it gets one (root images only).
    pub fn userns_of(&self, slot: u32, uid: u32) -> Option<u32> {
        let base = self.userns_base?;
        (uid == 0).then(|| base.saturating_add(slot.saturating_mul(USERNS_SIZE)))
    }
}

/// The writable layer of an instance when nothing else is said, MiB.
pub const DEFAULT_DISK_MIB: u32 = 1024;

/// Runs instances with an OCI runtime binary.
#[derive(Debug)]
pub struct ContainerRuntime {
    dir: PathBuf,
    runc: PathBuf,
    base: Ipv4Addr,
    logs: Arc<LogStore>,
    confinement: Confinement,
    instances: Mutex<HashMap<String, Instance>>,
}

fn container_id(id: &str) -> String {
    format!("zw-{id}")
}

pub(crate) fn short_key(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..4])
}

/// The network namespace an instance runs in.
pub fn netns_name(id: &str) -> String {
    format!("zw-{}", short_key(id))
}

async fn cmd(program: &Path, args: &[&str]) -> Result<String, RuntimeError> {
    cmd_in(Path::new("/"), program, args).await
}

/// [`cmd`] run from the directory `dir`.
async fn cmd_in(dir: &Path, program: &Path, args: &[&str]) -> Result<String, RuntimeError> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .map_err(|e| RuntimeError::Unavailable("the OCI runtime", e.to_string()))?;
    if !out.status.success() {
        return Err(RuntimeError::failed(
            format!("{} {}", program.display(), args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl ContainerRuntime {
    /// `runtime`: a runc or crun binary (found on PATH when relative);
    /// `base`: the node's instance range (a /16, e.g. 10.88.0.0); instance
    /// output goes to `logs`.
    pub async fn new(dir: &Path, runtime: &Path, base: Ipv4Addr, logs: Arc<LogStore>) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::failed("creating the runtime directory", e))?;
        let version = Command::new(runtime).arg("--version").output().await;
        match version {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(RuntimeError::Unavailable("runc/crun", String::from_utf8_lossy(&o.stderr).into_owned()))
            }
            Err(e) => return Err(RuntimeError::Unavailable("runc/crun", format!("{}: {e}", runtime.display()))),
        }
        crate::net::apply_policy(base, None).await?;
        let rt = Self {
            dir: dir.to_owned(),
            runc: runtime.to_owned(),
            base,
            logs,
            confinement: Confinement::default(),
            instances: Mutex::new(HashMap::new()),
        };
        rt.clean_leftovers().await;
        Ok(rt)
    }

    /// The same runtime with `c` for the instances it starts from now on.
    /// Root images run as host root when their remapped root could not reach
    /// its bundle (a closed directory above the runtime's; logged).
    pub fn confined(mut self, mut c: Confinement) -> Self {
        if c.userns_base.is_some() {
            if let Err(why) = crate::reachable_by_others(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), %why, "root images run as host root: a remapped root cannot reach its bundle");
                c.userns_base = None;
            }
        }
        self.confinement = c;
        self
    }

    /// Instances found on disk from an earlier run that did not stop them
    /// (a crash): their processes, mounts and network are removed, so the
    /// agent starts from a clean slate and re-creates what is assigned.
    async fn clean_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("config.json").exists() {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            tracing::warn!(instance = %id, "cleaning up an instance left by an earlier run");
            let cid = container_id(&id);
            // Each step may find nothing (the container ended, the host rebooted).
            if let Err(e) = cmd(&self.runc, &["kill", "--all", &cid, "KILL"]).await {
                tracing::debug!(instance = %id, error = %e, "no leftover container process to kill");
            }
            if let Err(e) = cmd(&self.runc, &["delete", "--force", &cid]).await {
                tracing::debug!(instance = %id, error = %e, "no leftover container to delete");
            }
            if let Err(e) = cmd(Path::new("umount"), &["-l", &path.join("rootfs").display().to_string()]).await {
                tracing::debug!(instance = %id, error = %e, "no leftover root overlay to unmount");
            }
            // Its loop device goes with the last user of the file system.
            if let Err(e) = cmd(Path::new("umount"), &["-l", &path.join(LAYER).display().to_string()]).await {
                tracing::debug!(instance = %id, error = %e, "no leftover writable layer to unmount");
            }
            let link = Link {
                netns: netns_name(&id),
                host_if: format!("zwh{}", short_key(&id)),
                host_ip: Ipv4Addr::UNSPECIFIED,
                instance_ip: Ipv4Addr::UNSPECIFIED,
            };
            if let Err(e) = net::destroy(&link).await {
                tracing::debug!(instance = %id, netns = %link.netns, error = %e, "no leftover network to remove");
            }
            // The killed processes may still hold the overlay for a moment.
            for _ in 0..50 {
                if tokio::fs::remove_dir_all(&path).await.is_ok() || !path.exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            if path.exists() {
                tracing::warn!(dir = %path.display(), "could not remove a leftover instance directory");
            }
        }
    }

    /// The uid and gid an image's `user` (name, uid, `user:group`) stands for in its root.
    pub(crate) fn user_of(rootfs: &Path, user: Option<&str>) -> (u32, u32) {
        let Some(user) = user else { return (0, 0) };
        let (u, g) = user.split_once(':').map_or((user, None), |(u, g)| (u, Some(g)));
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
        let lookup = |name: &str| {
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
            })
        };
        let (uid, default_gid) = match u.parse::<u32>() {
            Ok(uid) => (uid, uid),
            Err(_) => lookup(u).unwrap_or((65534, 65534)),
        };
        let gid = g.and_then(|g| g.parse().ok()).unwrap_or(default_gid);
        (uid, gid)
    }

    fn oci_config(
        spec: &InstanceSpec,
        merged: &Path,
        dir: &Path,
        netns: &str,
        userns: Option<u32>,
    ) -> serde_json::Value {
        let args = command_of(spec);
        let env = env_of(spec);
        let (uid, gid) = Self::user_of(&spec.rootfs, spec.image.user.as_deref());
        let caps = [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FSETID",
            "CAP_FOWNER",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETFCAP",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_KILL",
            "CAP_AUDIT_WRITE",
        ];
        let mut config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": uid, "gid": gid},
                "args": args,
                "env": env,
                "cwd": spec.image.working_dir.clone().unwrap_or_else(|| "/".into()),
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": true
            },
            "root": {"path": merged, "readonly": false},
            "hostname": spec.id.chars().take(63).collect::<String>(),
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": dir.join("resolv.conf"), "options": ["rbind", "ro"]}
            ],
            "linux": {
                "cgroupsPath": format!("/zeitwork/{}", container_id(&spec.id)),
                "resources": {
                    "memory": {"limit": u64::from(spec.memory_mib) * 1024 * 1024},
                    "cpu": {"quota": i64::from(spec.vcpu) * 100_000, "period": 100_000},
                    "pids": {"limit": PIDS_LIMIT}
                },
                "seccomp": seccomp_profile(),
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                    {"type": "network", "path": format!("/var/run/netns/{netns}")}
                ],
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
                "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
            }
        });
        if let Some(host) = userns {
            let map = json!([{"containerID": 0, "hostID": host, "size": USERNS_SIZE}]);
            let linux = &mut config["linux"];
            linux["uidMappings"] = map.clone();
            linux["gidMappings"] = map;
            if let Some(ns) = linux["namespaces"].as_array_mut() {
                ns.push(json!({"type": "user"}));
            }
            // sysfs cannot be mounted from a user namespace into a network
            // namespace it does not own: the container gets the host's,
            // read-only, without its firmware (masked).
            if let Some(mounts) = config["mounts"].as_array_mut() {
                for m in mounts.iter_mut().filter(|m| m["destination"] == "/sys") {
                    *m = json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]});
                }
            }
        }
        config
    }
}

/// Where an instance's writable layer is mounted in its directory (its image
/// is `disk.img` next to it).
pub const LAYER: &str = "layer";

/// Makes the writable layer of the instance in `dir`: a sparse ext4 image of
/// `mib` MiB (no journal: it never outlives the instance), loop-mounted at
/// [`LAYER`]. The loop device goes away when it is unmounted.
async fn writable_layer(dir: &Path, mib: u32) -> Result<PathBuf, RuntimeError> {
    let image = dir.join("disk.img");
    let mount = dir.join(LAYER);
    let file = std::fs::File::create(&image).map_err(|e| RuntimeError::failed("creating the writable layer", e))?;
    file.set_len(u64::from(mib) << 20).map_err(|e| RuntimeError::failed("sizing the writable layer", e))?;
    drop(file);
    std::fs::create_dir_all(&mount).map_err(|e| RuntimeError::failed("creating the writable layer", e))?;
    let image_arg = image.display().to_string();
    cmd(Path::new("mkfs.ext4"), &["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard", &image_arg]).await?;
    let mount_arg = mount.display().to_string();
    cmd(Path::new("mount"), &["-o", "loop,nosuid,nodev", &image_arg, &mount_arg]).await?;
    Ok(mount)
}

/// Moves every file of the root at `root` (an overlay with metacopy, so
/// only metadata is copied up) from host ids `n` to `host + n`, so that root
/// in a user namespace starting at `host` owns what the image's root owns.
/// Set-id bits, which a chown clears, are put back.
fn shift_ownership(root: &Path, host: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |p: &Path, e: std::io::Error| RuntimeError::failed(format!("remapping the owner of {}", p.display()), e);
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(&path, e))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| fail(&path, e))? {
                stack.push(entry.map_err(|e| fail(&path, e))?.path());
            }
        }
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid >= USERNS_SIZE || gid >= USERNS_SIZE {
            continue; // No id in the namespace stands for it: it stays unmapped (nobody).
        }
        std::os::unix::fs::lchown(&path, Some(host + uid), Some(host + gid)).map_err(|e| fail(&path, e))?;
        if meta.mode() & 0o6000 != 0 && !meta.file_type().is_symlink() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| fail(&path, e))?;
        }
    }
    Ok(())
}

/// Unmounts an instance's writable layer, if it has one (which frees its loop device).
async fn unmount_layer(id: &str, dir: &Path) {
    let mount = dir.join(LAYER);
    if !dir.join("disk.img").exists() {
        return;
    }
    if let Err(e) = cmd(Path::new("umount"), &[&mount.display().to_string()]).await {
        if mounted(&mount) {
            tracing::warn!(instance = %id, mount = %mount.display(), error = %e, "the writable layer may stay mounted (with its loop device)");
        }
    }
}

/// Whether `path` is a mount point now.
fn mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.display().to_string();
    table.lines().any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

async fn remove_instance_dir(id: &str, dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await {
        tracing::warn!(instance = %id, dir = %dir.display(), error = %e, "the instance directory is left behind");
    }
}

/// Processes and threads one instance may have at once (a fork bomb stops here).
pub const PIDS_LIMIT: i64 = 1024;

/// System calls an instance may not make, as in the container runtimes'
/// default profile: kernel modules and keyrings, mounts and namespaces (no
/// nested user namespaces: `unshare -U` would hand out mount and network
/// admin inside), tracing other processes, clocks, swap, reboot, BPF and
/// performance counters. They fail with EPERM; everything else is allowed.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The seccomp filter of every container instance (OCI runtime spec form).
pub fn seccomp_profile() -> serde_json::Value {
    // CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
    const CLONE_NAMESPACES: [u64; 7] =
        [0x0002_0000, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000];
    let mut rules = vec![json!({"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1})];
    // clone with a namespace flag is refused (one rule per flag: rules are alternatives);
    // plain clone (threads, fork) is not.
    for flag in CLONE_NAMESPACES {
        rules.push(json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}));
    }
    // clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    rules.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules
    })
}

/// The image's entrypoint and command, joined (a shell when both are empty).
pub(crate) fn command_of(spec: &InstanceSpec) -> Vec<String> {
    let mut args: Vec<String> = spec.image.entrypoint.clone();
    args.extend(spec.image.cmd.iter().cloned());
    if args.is_empty() {
        args.push("/bin/sh".into());
    }
    args
}

/// `KEY=VALUE`: the image's env, the project's on top, PATH and PORT defaulted.
pub(crate) fn env_of(spec: &InstanceSpec) -> Vec<String> {
    let mut env: Vec<(String, String)> =
        spec.image.env.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    for (k, v) in &spec.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    if !env.iter().any(|(k, _)| k == "PORT") {
        env.push(("PORT".into(), spec.port.to_string()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        "container"
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Running, RuntimeError> {
        let mut instances = self.instances.lock().await;
        if instances.contains_key(&spec.id) {
            return Err(RuntimeError::failed(format!("starting {}", spec.id), "already exists"));
        }
        // Slots in use: ours, and any address of the range already on a host interface.
        let slot = net::free_slot(self.base, |s| instances.values().any(|i| i.slot == s)).await?;
        let dir = self.dir.join(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::failed("creating the instance directory", e))?;
        let layer = match self.confinement.disk_mib {
            0 => dir.clone(),
            mib => match writable_layer(&dir, mib).await {
                Ok(l) => l,
                Err(e) => {
                    remove_instance_dir(&spec.id, &dir).await;
                    return Err(e);
                }
            },
        };
        let (upper, work, merged) = (layer.join("upper"), layer.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::failed("creating the instance directory", e))?;
        }
        let (uid, _) = Self::user_of(&spec.rootfs, spec.image.user.as_deref());
        let userns = self.confinement.userns_of(slot, uid);
        // A remapped root gets the image's files as its own by metadata-only
        // copies in the writable layer (metacopy): the shared image is never changed.
        let metacopy = if userns.is_some() { ",metacopy=on,redirect_dir=on" } else { "" };
        // Mounted from the instance's directory with paths relative to it (the
        // image through a link there): the overlay's options, which the
        // instance reads in /proc/mounts, name no path of the host.
        let relative = |p: &Path| p.strip_prefix(&dir).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf());
        let lower = dir.join("lower");
        let _ = std::fs::remove_file(&lower);
        let opts = format!(
            "lowerdir=lower,upperdir={},workdir={}{metacopy}",
            relative(&upper).display(),
            relative(&work).display()
        );
        let mounted =
            match std::path::absolute(&spec.rootfs).and_then(|image| std::os::unix::fs::symlink(image, &lower)) {
                Ok(()) => cmd_in(&dir, Path::new("mount"), &["-t", "overlay", "overlay", "-o", &opts, "rootfs"]).await,
                Err(e) => Err(RuntimeError::failed("linking the image into the instance directory", e)),
            };
        let _ = std::fs::remove_file(&lower);
        if let Err(e) = mounted {
            unmount_layer(&spec.id, &dir).await;
            remove_instance_dir(&spec.id, &dir).await;
            return Err(e);
        }
        if let Some(host) = userns {
            let root = merged.clone();
            let shifted = tokio::task::spawn_blocking(move || shift_ownership(&root, host))
                .await
                .map_err(|e| RuntimeError::failed("remapping the root's owners", e))
                .and_then(|r| r);
            if let Err(e) = shifted {
                if let Err(why) = cmd(Path::new("umount"), &[&merged.display().to_string()]).await {
                    tracing::warn!(instance = %spec.id, mount = %merged.display(), error = %why, "the root overlay may stay mounted");
                }
                unmount_layer(&spec.id, &dir).await;
                remove_instance_dir(&spec.id, &dir).await;
                return Err(e);
            }
        }
        let link = match net::create(&short_key(&spec.id), self.base, slot).await {
            Ok(l) => l,
            Err(e) => {
                if let Err(why) = cmd(Path::new("umount"), &[&merged.display().to_string()]).await {
                    tracing::warn!(instance = %spec.id, mount = %merged.display(), error = %why, "the root overlay may stay mounted");
                }
                unmount_layer(&spec.id, &dir).await;
                remove_instance_dir(&spec.id, &dir).await;
                return Err(e);
            }
        };
        let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\t{}\n", link.instance_ip, spec.id);
        let write = |name: &str, body: &str| {
            std::fs::write(dir.join(name), body).map_err(|e| RuntimeError::failed("writing the bundle", e))
        };
        write("hosts", &hosts)?;
        let resolv = match &spec.dns_search {
            Some(search) => format!("nameserver {}\nsearch {search}\n", link.host_ip),
            None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        write("resolv.conf", &resolv)?;
        write("config.json", &Self::oci_config(spec, &merged, &dir, &link.netns, userns).to_string())?;

        let mut child = Command::new(&self.runc)
            .args(["run", "--bundle", &dir.display().to_string(), &container_id(&spec.id)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RuntimeError::Unavailable("runc/crun", e.to_string()))?;
        let order = Arc::new(Mutex::new(()));
        let logs = &self.logs;
        let out = child
            .stdout
            .take()
            .map(|s| tokio::spawn(logs.clone().capture(spec.id.clone(), s, "stdout", order.clone())));
        let err = child
            .stderr
            .take()
            .map(|s| tokio::spawn(logs.clone().capture(spec.id.clone(), s, "stderr", order.clone())));
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Let the log readers drain what the process wrote last.
            for t in [out, err].into_iter().flatten() {
                // A reader that failed has nothing left to drain.
                let _ = t.await;
            }
            let info = match status {
                Ok(s) => ExitInfo {
                    code: s.code(),
                    reason: s.code().map_or_else(|| "terminated by a signal".into(), crate::exit_reason),
                },
                Err(e) => ExitInfo { code: None, reason: format!("lost the process: {e}") },
            };
            // Nobody watching any more (the instance was destroyed) is fine.
            let _ = tx.send(Some(info));
        });
        let address = SocketAddr::from((link.instance_ip, spec.port));
        instances.insert(spec.id.clone(), Instance { link, slot, dir, merged, exit: rx });
        tracing::info!(instance = %spec.id, %address, "container started");
        Ok(Running { id: spec.id.clone(), address })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        let mut exit = {
            let instances = self.instances.lock().await;
            instances.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?.exit.clone()
        };
        if let Some(done) = exit.borrow().clone() {
            return Ok(done);
        }
        let cid = container_id(id);
        if let Err(e) = cmd(&self.runc, &["kill", &cid, "TERM"]).await {
            tracing::debug!(instance = %id, error = %e, "SIGTERM not delivered (the app may have just exited)");
        }
        let exited = tokio::time::timeout(grace, exit.wait_for(|e| e.is_some())).await.is_ok();
        if !exited {
            if let Err(e) = cmd(&self.runc, &["kill", "--all", &cid, "KILL"]).await {
                tracing::warn!(instance = %id, error = %e, "SIGKILL not delivered");
            }
            // Whether it ended is read from `exit` below.
            let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await;
        }
        let info = exit.borrow().clone();
        info.ok_or_else(|| RuntimeError::failed(format!("stopping {id}"), "the process did not exit"))
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        if let Err(e) = self.stop(id, Duration::from_secs(0)).await {
            tracing::warn!(instance = %id, error = %e, "destroying an instance that did not stop");
        }
        let inst = self.instances.lock().await.remove(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        if let Err(e) = cmd(&self.runc, &["delete", "--force", &container_id(id)]).await {
            tracing::warn!(instance = %id, error = %e, "the runc container may be left behind");
        }
        if let Err(e) = cmd(Path::new("umount"), &[&inst.merged.display().to_string()]).await {
            tracing::warn!(instance = %id, mount = %inst.merged.display(), error = %e, "the root overlay may stay mounted");
        }
        unmount_layer(id, &inst.dir).await;
        if let Err(e) = net::destroy(&inst.link).await {
            let (netns, veth) = (&inst.link.netns, &inst.link.host_if);
            tracing::warn!(instance = %id, netns, veth, error = %e, "the network namespace or veth may be left behind");
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
        if !self.instances.lock().await.contains_key(id) {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        Ok(cgroup_stats(&format!("zeitwork/{}", container_id(id))))
    }

    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, RuntimeError> {
        if !self.logs.exists(id) && !self.instances.lock().await.contains_key(id) {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        Ok(self.logs.read(id, None))
    }
}

/// Reads a cgroup's use from cgroup v2 (unified) or the v1 controllers.
fn cgroup_stats(path: &str) -> InstanceStats {
    let read = |f: String| std::fs::read_to_string(f).ok().map(|t| t.trim().to_owned());
    let num = |f: String| read(f).and_then(|t| t.parse::<u64>().ok());
    let v2 = format!("/sys/fs/cgroup/{path}");
    if Path::new(&v2).join("cgroup.controllers").exists() {
        let usage_usec = read(format!("{v2}/cpu.stat"))
            .and_then(|t| {
                t.lines().find_map(|l| l.strip_prefix("usage_usec ").and_then(|v| v.trim().parse::<u64>().ok()))
            })
            .unwrap_or(0);
        return InstanceStats {
            memory_bytes: num(format!("{v2}/memory.current")).unwrap_or(0),
            memory_limit_bytes: num(format!("{v2}/memory.max")).unwrap_or(0),
            cpu_seconds: usage_usec as f64 / 1e6,
            processes: num(format!("{v2}/pids.current")).unwrap_or(0),
        };
    }
    let cpu_ns = ["cpuacct", "cpu,cpuacct", "cpu"]
        .iter()
        .find_map(|c| num(format!("/sys/fs/cgroup/{c}/{path}/cpuacct.usage")))
        .unwrap_or(0);
    InstanceStats {
        memory_bytes: num(format!("/sys/fs/cgroup/memory/{path}/memory.usage_in_bytes")).unwrap_or(0),
        memory_limit_bytes: num(format!("/sys/fs/cgroup/memory/{path}/memory.limit_in_bytes")).unwrap_or(0),
        cpu_seconds: cpu_ns as f64 / 1e9,
        processes: num(format!("/sys/fs/cgroup/pids/{path}/pids.current")).unwrap_or(0),
    }
}

impl Drop for ContainerRuntime {
    /// Last resort when the runtime goes away without destroying its
    /// instances (a crash path or a failing test): kill, unmount, unplug.
    fn drop(&mut self) {
        let instances = std::mem::take(self.instances.get_mut());
        for (id, inst) in instances {
            let cid = container_id(&id);
            let merged = inst.merged.display().to_string();
            last_resort(&id, self.runc.as_os_str(), &["kill", "--all", &cid, "KILL"]);
            last_resort(&id, self.runc.as_os_str(), &["delete", "--force", &cid]);
            last_resort(&id, "umount".as_ref(), &["-l", &merged]);
            if inst.dir.join(LAYER).join("upper").exists() {
                last_resort(&id, "umount".as_ref(), &["-l", &inst.dir.join(LAYER).display().to_string()]);
            }
            last_resort(&id, "ip".as_ref(), &["netns", "del", &inst.link.netns]);
            last_resort(&id, "ip".as_ref(), &["link", "del", &inst.link.host_if]);
            if let Err(e) = std::fs::remove_dir_all(&inst.dir) {
                tracing::warn!(instance = %id, dir = %inst.dir.display(), error = %e, "the instance directory is left behind");
            }
        }
    }
}

/// Runs one teardown step from a `Drop` (no executor there); logs what it
/// may leave behind when it fails.
pub(crate) fn last_resort(instance: &str, program: &std::ffi::OsStr, args: &[&str]) {
    let step = || format!("{} {}", program.to_string_lossy(), args.join(" "));
    match std::process::Command::new(program).args(args).stdout(Stdio::null()).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let error = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            tracing::warn!(instance, step = %step(), %error, "teardown step failed; the sweeper removes what it left at the next start");
        }
        Err(e) => tracing::warn!(instance, step = %step(), error = %e, "teardown step could not run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: "ins_a".into(),
            rootfs: "/nonexistent".into(),
            image: Default::default(),
            env: vec![],
            port: 8080,
            vcpu: 1,
            memory_mib: 64,
            disk: None,
            dns_search: None,
        }
    }

    #[test]
    fn root_images_get_a_user_namespace_range_of_their_own() {
        let c = Confinement { disk_mib: 0, userns_base: Some(1_000_000_000) };
        assert_eq!(c.userns_of(0, 0), Some(1_000_000_000));
        assert_eq!(c.userns_of(3, 0), Some(1_000_000_000 + 3 * 65_536));
        assert_eq!(c.userns_of(3, 1000), None, "an image with a user of its own runs as that user");
        assert_eq!(Confinement::default().userns_of(0, 0), None);

        let p = Path::new("/x");
        let plain = ContainerRuntime::oci_config(&spec(), p, p, "zw-a", None);
        assert!(plain["linux"].get("uidMappings").is_none());
        assert_eq!(plain["mounts"][5]["type"], "sysfs");
        let mapped = ContainerRuntime::oci_config(&spec(), p, p, "zw-a", Some(1_000_196_608));
        let map = json!([{"containerID": 0, "hostID": 1_000_196_608u32, "size": 65_536}]);
        assert_eq!(mapped["linux"]["uidMappings"], map);
        assert_eq!(mapped["linux"]["gidMappings"], map);
        assert!(mapped["linux"]["namespaces"].as_array().unwrap().contains(&json!({"type": "user"})));
        assert_eq!(mapped["mounts"][5]["type"], "bind", "the host's /sys, read-only");
        assert!(mapped["mounts"][5]["options"].as_array().unwrap().contains(&json!("ro")));
        assert_eq!(mapped["process"]["user"], json!({"uid": 0, "gid": 0}), "root inside");
    }
}
