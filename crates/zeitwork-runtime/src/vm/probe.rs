//! The probe: boots a guest that only reports it came up, to learn whether a
//! VMM and its accelerator really run guests on this host.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::firecracker::wait_for_socket;
use super::{firecracker_put, firecracker_requests, kernel_args, qemu_args, Accel, Vmm};
use crate::guest::GuestAssets;

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
            super::firecracker::remove_stale(&socket);
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
            super::firecracker::remove_stale(&socket);
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
    // The probe VM has done its part; it may have ended by itself already.
    if child.start_kill().is_ok() {
        if let Err(e) = child.wait().await {
            tracing::warn!(error = %e, "could not reap the probe VM");
        }
    }
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
