//! Which driver runs instances on this host. `auto` takes the best one that
//! works, by probe: Firecracker with working KVM, then QEMU with working KVM,
//! then containers, then QEMU with software emulation (TCG). "Working KVM"
//! means a real guest booted under it: a /dev/kvm that opens is not enough
//! (nested hypervisors exist whose KVM crashes stock kernels).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::container::ContainerRuntime;
use crate::guest::{self, GuestAssets};
use crate::logs::LogStore;
use crate::vm::{self, Accel, Jailer, VmRuntime, VmSettings, Vmm};
use crate::{AnyRuntime, RuntimeError};

/// The runtime names a node accepts.
pub const RUNTIMES: &[&str] = &["auto", "firecracker", "qemu", "container"];

/// What the node may use.
#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// `auto`, `firecracker`, `qemu` or `container`.
    pub requested: String,
    /// The node's data directory (instances, guest files, probe results).
    pub dir: PathBuf,
    pub oci_runtime: PathBuf,
    pub qemu: PathBuf,
    /// Firecracker is used only when configured.
    pub firecracker: Option<PathBuf>,
    pub jailer: Option<Jailer>,
    /// The guest kernel; the host's newest cloud kernel when absent.
    pub kernel: Option<PathBuf>,
    pub base: Ipv4Addr,
    pub disk_budget: u64,
}

/// The chosen driver and why it was chosen.
#[derive(Debug)]
pub struct Selected {
    pub runtime: AnyRuntime,
    /// `container`, `qemu` or `firecracker`.
    pub name: &'static str,
    /// Accelerator and the reasons, for logs and the node's record.
    pub detail: String,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

async fn guest_assets(o: &SelectOptions) -> Result<GuestAssets, String> {
    let kernel = guest::find_kernel(o.kernel.as_deref()).map_err(|e| e.to_string())?;
    let dir = o.dir.join("guest");
    tokio::task::spawn_blocking(move || guest::prepare(&dir, &kernel, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn runs(binary: &Path, arg: &str) -> Result<(), String> {
    match tokio::process::Command::new(binary).arg(arg).output().await {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{} {arg}: {}", binary.display(), String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("{}: {e}", binary.display())),
    }
}

/// A KVM probe's result, remembered for the host's current boot (in /run,
/// which a reboot empties, else in the data directory) and probed by one
/// caller at a time.
async fn kvm_works(vmm: &Vmm, assets: &GuestAssets, dir: &Path) -> Result<(), String> {
    static PROBING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = PROBING.lock().await;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let binary = match vmm {
        Vmm::Qemu { binary, .. } | Vmm::Firecracker { binary, .. } => binary.display().to_string(),
    };
    let key = format!("{}|{}|{}", boot.trim(), binary, assets.source.display());
    let run = Path::new("/run/zeitwork");
    let cache_dir = if std::fs::create_dir_all(run).is_ok() { run.to_path_buf() } else { dir.to_path_buf() };
    let cache = cache_dir.join(format!("kvm-probe-{}", vmm.name()));
    if let Ok(saved) = std::fs::read_to_string(&cache) {
        if let Some((k, result)) = saved.split_once('\n') {
            if k == key {
                return if result == "ok" { Ok(()) } else { Err(result.to_owned()) };
            }
        }
    }
    let result = vm::probe(vmm, assets, &dir.join("probe"), PROBE_TIMEOUT).await;
    let text = match &result {
        Ok(took) => {
            tracing::info!(vmm = vmm.name(), took_ms = took.as_millis() as u64, "KVM runs a guest here");
            "ok".to_owned()
        }
        Err(e) => e.replace('\n', " "),
    };
    let _ = std::fs::write(&cache, format!("{key}\n{text}"));
    result.map(|_| ())
}

async fn vm_runtime(
    o: &SelectOptions,
    vmm: Vmm,
    assets: GuestAssets,
    logs: Arc<LogStore>,
) -> Result<AnyRuntime, RuntimeError> {
    let settings = VmSettings { dir: o.dir.join("vms"), vmm, assets, base: o.base, disk_budget: o.disk_budget };
    Ok(AnyRuntime::Vm(VmRuntime::new(settings, logs).await?))
}

/// Chooses and starts the driver `o.requested` stands for.
pub async fn select(o: &SelectOptions, logs: Arc<LogStore>) -> Result<Selected, RuntimeError> {
    let instances = o.dir.join("instances");
    let containers = || ContainerRuntime::new(&instances, &o.oci_runtime, o.base, logs.clone());
    match o.requested.as_str() {
        "container" => {
            let rt = containers().await?;
            Ok(Selected { runtime: AnyRuntime::Container(rt), name: "container", detail: "requested".into() })
        }
        "qemu" => {
            runs(&o.qemu, "--version").await.map_err(|e| RuntimeError::Unavailable("qemu", e))?;
            let assets = guest_assets(o).await.map_err(|e| RuntimeError::Unavailable("the guest kernel", e))?;
            let kvm = Vmm::Qemu { binary: o.qemu.clone(), accel: Accel::Kvm };
            let (accel, detail) = match kvm_works(&kvm, &assets, &o.dir).await {
                Ok(()) => (Accel::Kvm, "requested; kvm".to_owned()),
                Err(why) => (Accel::Tcg, format!("requested; tcg, because KVM does not run a guest here: {why}")),
            };
            let vmm = Vmm::Qemu { binary: o.qemu.clone(), accel };
            Ok(Selected { runtime: vm_runtime(o, vmm, assets, logs).await?, name: "qemu", detail })
        }
        "firecracker" => {
            let binary = o.firecracker.clone().ok_or_else(|| {
                RuntimeError::Unavailable(
                    "firecracker",
                    "no firecracker binary is configured (firecracker = \"/path\")".into(),
                )
            })?;
            let assets = guest_assets(o).await.map_err(|e| RuntimeError::Unavailable("the guest kernel", e))?;
            let vmm = Vmm::Firecracker { binary, jailer: o.jailer.clone() };
            kvm_works(&vmm, &assets, &o.dir)
                .await
                .map_err(|e| RuntimeError::Unavailable("firecracker (it needs working KVM)", e))?;
            Ok(Selected {
                runtime: vm_runtime(o, vmm, assets, logs).await?,
                name: "firecracker",
                detail: "requested; kvm".into(),
            })
        }
        "auto" => {
            let mut why = Vec::new();
            let assets = match guest_assets(o).await {
                Ok(a) => Some(a),
                Err(e) => {
                    why.push(format!("no microVMs: {e}"));
                    None
                }
            };
            // Whether QEMU runs at all, asked once for both of its places in the order.
            let qemu = if assets.is_some() { Some(runs(&o.qemu, "--version").await) } else { None };
            if let Some(assets) = &assets {
                match &o.firecracker {
                    None => why.push("firecracker: not configured".into()),
                    Some(binary) => {
                        let vmm = Vmm::Firecracker { binary: binary.clone(), jailer: o.jailer.clone() };
                        match kvm_works(&vmm, assets, &o.dir).await {
                            Ok(()) => {
                                let detail = format!("auto: firecracker with kvm ({})", why.join("; "));
                                let runtime = vm_runtime(o, vmm, assets.clone(), logs).await?;
                                return Ok(Selected { runtime, name: "firecracker", detail });
                            }
                            Err(e) => why.push(format!("firecracker: {e}")),
                        }
                    }
                }
                match &qemu {
                    Some(Err(e)) => why.push(format!("qemu: {e}")),
                    None => {}
                    Some(Ok(())) => {
                        let vmm = Vmm::Qemu { binary: o.qemu.clone(), accel: Accel::Kvm };
                        match kvm_works(&vmm, assets, &o.dir).await {
                            Ok(()) => {
                                let detail = format!("auto: qemu with kvm ({})", why.join("; "));
                                let runtime = vm_runtime(o, vmm, assets.clone(), logs).await?;
                                return Ok(Selected { runtime, name: "qemu", detail });
                            }
                            Err(e) => why.push(format!("qemu with kvm: {e}")),
                        }
                    }
                }
            }
            match containers().await {
                Ok(rt) => {
                    let detail = format!("auto: container ({})", why.join("; "));
                    return Ok(Selected { runtime: AnyRuntime::Container(rt), name: "container", detail });
                }
                Err(e) => why.push(format!("container: {e}")),
            }
            if let Some(assets) = assets {
                if matches!(qemu, Some(Ok(()))) {
                    let detail = format!("auto: qemu with tcg, slow software emulation ({})", why.join("; "));
                    let vmm = Vmm::Qemu { binary: o.qemu.clone(), accel: Accel::Tcg };
                    return Ok(Selected { runtime: vm_runtime(o, vmm, assets, logs).await?, name: "qemu", detail });
                }
            }
            Err(RuntimeError::Unavailable("any runtime", why.join("; ")))
        }
        other => Err(RuntimeError::Unavailable(
            "that runtime",
            format!("{other:?} is not a runtime; use {}", RUNTIMES.join(", ")),
        )),
    }
}
