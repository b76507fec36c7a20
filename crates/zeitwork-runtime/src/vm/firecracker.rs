//! Firecracker: the API calls that configure and start one VM, the client
//! that sends them over its Unix socket, and how the driver spawns it (alone
//! or under its jailer, whose directory is [`crate::jail`]'s).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::{jail_dir, jail_id, kernel_args, kill, prepare_jail, Jailer, VmRuntime};
use crate::jail::remove_jail;
use crate::{InstanceSpec, RuntimeError};

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

pub(super) async fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

impl VmRuntime {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn spawn_firecracker(
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
                if let Err(e) = std::fs::write(dir.join("vmm.log.path"), root.join("vmm.log").display().to_string()) {
                    tracing::warn!(dir = %dir.display(), error = %e, "the VMM log's place is not recorded");
                }
                let inside = (0..files.len()).map(|i| format!("/f{i}")).collect();
                (c, root.join("run/firecracker.socket"), inside, Some(jail))
            }
        };
        remove_stale(&socket);
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
            if let Err(e) = std::fs::write(dir.join("vmm.pid"), pid.to_string()) {
                tracing::warn!(dir = %dir.display(), error = %e, "the VMM's pid is not recorded; after a crash only the sweeper finds it");
            }
        }
        if !wait_for_socket(&socket, Duration::from_secs(10)).await {
            if let Some(pid) = child.id() {
                kill(pid);
            }
            // What the jailer or the VMM said is the reason (a missing library, a bad path, …).
            let mut said = String::new();
            if let Some(mut err) = child.stderr.take() {
                let mut buf = Vec::new();
                // What arrived within the time is all the reason there is.
                let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut buf)).await;
                said = String::from_utf8_lossy(&buf).trim().chars().take(1000).collect();
            }
            if let Err(e) = child.wait().await {
                tracing::warn!(error = %e, "could not reap the VMM");
            }
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
                if let Err(e) = child.wait().await {
                    tracing::warn!(error = %e, "could not reap the VMM");
                }
                fail(&jail);
                return Err(RuntimeError::failed("configuring the VM through Firecracker's API", e));
            }
        }
        if let Err(e) = std::fs::write(dir.join("api"), socket.display().to_string()) {
            tracing::warn!(dir = %dir.display(), error = %e, "the API socket is not recorded; a hard stop falls back to SIGKILL");
        }
        Ok(child)
    }
}

/// Removes a socket a VMM left earlier (none is the usual case).
pub(crate) fn remove_stale(socket: &Path) {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(socket = %socket.display(), error = %e, "a stale API socket could not be removed")
        }
        _ => {}
    }
}
