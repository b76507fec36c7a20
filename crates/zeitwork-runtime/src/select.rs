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
    /// The unprivileged users QEMU runs as (root when absent).
    pub vmm_user: Option<vm::VmmUser>,
    /// What confines containers (their writable layer's size, …).
    pub confinement: crate::container::Confinement,
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

/// How often a KVM probe is tried before the node settles for less: a
/// guest that does not boot once (a busy host, a slow disk) must not keep a
/// node on software emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRetry {
    pub attempts: u32,
    /// The wait before the second attempt; it doubles for each further one.
    pub first_wait: Duration,
    pub max_wait: Duration,
}

pub const PROBE_RETRY: ProbeRetry =
    ProbeRetry { attempts: 3, first_wait: Duration::from_secs(1), max_wait: Duration::from_secs(8) };

impl ProbeRetry {
    /// The wait after failed attempt `n` (from 1), or `None` when it was the last.
    pub fn wait_after(&self, n: u32) -> Option<Duration> {
        if n >= self.attempts {
            return None;
        }
        let doubled = self.first_wait.saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX));
        Some(doubled.min(self.max_wait))
    }

    /// Runs `probe` until it succeeds or the attempts are used up, waiting
    /// with `sleep` in between; the last failure is the answer.
    pub async fn run<P, PF, S, SF, T>(&self, probe: P, sleep: S) -> Result<T, String>
    where
        P: FnMut() -> PF,
        PF: std::future::Future<Output = Result<T, String>>,
        S: FnMut(Duration) -> SF,
        SF: std::future::Future<Output = ()>,
    {
        self.run_if(probe, sleep, |_| true).await
    }

    /// As [`ProbeRetry::run`], trying again only after a failure `retryable` accepts.
    pub async fn run_if<P, PF, S, SF, T>(
        &self,
        mut probe: P,
        mut sleep: S,
        retryable: impl Fn(&str) -> bool,
    ) -> Result<T, String>
    where
        P: FnMut() -> PF,
        PF: std::future::Future<Output = Result<T, String>>,
        S: FnMut(Duration) -> SF,
        SF: std::future::Future<Output = ()>,
    {
        let mut n = 1;
        loop {
            match probe().await {
                Ok(v) => return Ok(v),
                Err(e) if !retryable(&e) => {
                    return Err(if n > 1 { format!("{e} (after {n} attempts)") } else { e });
                }
                Err(e) => match self.wait_after(n) {
                    Some(wait) => {
                        tracing::warn!(attempt = n, error = %e, retry_in_ms = wait.as_millis() as u64, "KVM probe failed");
                        sleep(wait).await;
                        n += 1;
                    }
                    None if n > 1 => return Err(format!("{e} (after {n} attempts)")),
                    None => return Err(e),
                },
            }
        }
    }
}

/// What a saved probe result says for `key`: only a success is kept for
/// the rest of the boot; a failure is probed again when the agent restarts.
fn saved_result(saved: &str, key: &str) -> Option<()> {
    let (k, result) = saved.split_once('\n')?;
    (k == key && result == "ok").then_some(())
}

/// The failure a saved probe result records for `key`, if it records one.
fn saved_failure(saved: &str, key: &str) -> Option<String> {
    let (k, result) = saved.split_once('\n')?;
    (k == key && result != "ok" && !result.is_empty()).then(|| result.to_owned())
}

/// A probe that waited out its whole timeout is not tried again at once:
/// another 20 s would only delay the start (it is probed again in the
/// background on the next start).
fn retryable(e: &str) -> bool {
    !e.contains("no answer within")
}

/// How long a failed KVM probe stands before a start probes again in the
/// background: a probe that hangs keeps a core busy for its whole timeout,
/// and agents restarted often (upgrades, tests) would pay it each time.
const PROBE_AGAIN_AFTER: Duration = Duration::from_secs(600);

/// Whether a start probes KVM again in the background after a failure saved
/// at `probed_at` (unknown: yes).
fn probe_again(probed_at: Option<std::time::SystemTime>, now: std::time::SystemTime) -> bool {
    probed_at.is_none_or(|at| now.duration_since(at).is_ok_and(|age| age >= PROBE_AGAIN_AFTER))
}

/// A KVM probe's result, saved for the host's current boot (in /run, which a
/// reboot empties, else in the data directory). A success is trusted for the
/// boot. A failure answers at once on the next start, so the node starts
/// without waiting on a probe that already failed, and that start probes again
/// in the background once the failure is [`PROBE_AGAIN_AFTER`] old: if KVM
/// works by then, the start after uses it. Probes
/// are retried with [`PROBE_RETRY`] (but not after a timeout) and run one at a time.
async fn kvm_works(vmm: &Vmm, assets: &GuestAssets, dir: &Path) -> Result<(), String> {
    static PROBING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    static FAILED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let _one = PROBING.lock().await;
    let boot = tokio::fs::read_to_string("/proc/sys/kernel/random/boot_id").await.unwrap_or_default();
    let binary = match vmm {
        Vmm::Qemu { binary, .. } | Vmm::Firecracker { binary, .. } => binary.display().to_string(),
    };
    let key = format!("{}|{}|{}", boot.trim(), binary, assets.source.display());
    let failed = |key: &str| FAILED.lock().ok()?.iter().find(|(k, _)| k == key).map(|(_, e)| e.clone());
    if let Some(e) = failed(&key) {
        return Err(e);
    }
    let run = Path::new("/run/zeitwork");
    let cache_dir = if tokio::fs::create_dir_all(run).await.is_ok() { run.to_path_buf() } else { dir.to_path_buf() };
    let cache = cache_dir.join(format!("kvm-probe-{}", vmm.name()));
    if let Ok(saved) = tokio::fs::read_to_string(&cache).await {
        if saved_result(&saved, &key).is_some() {
            return Ok(());
        }
        if let Some(why) = saved_failure(&saved, &key) {
            if let Ok(mut f) = FAILED.lock() {
                f.push((key.clone(), why.clone()));
            }
            let probed_at = tokio::fs::metadata(&cache).await.and_then(|m| m.modified()).ok();
            if !probe_again(probed_at, std::time::SystemTime::now()) {
                tracing::warn!(vmm = vmm.name(), reason = %why, "KVM failed its probe minutes ago; starting without it");
                return Err(why);
            }
            tracing::warn!(vmm = vmm.name(), reason = %why, "KVM failed its probe earlier this boot; starting without it and probing again in the background");
            let (vmm, assets, work, cache, key) =
                (vmm.clone(), assets.clone(), dir.join("probe"), cache.clone(), key.clone());
            tokio::spawn(async move {
                let _one = PROBING.lock().await;
                let result = PROBE_RETRY
                    .run_if(|| vm::probe(&vmm, &assets, &work, PROBE_TIMEOUT), tokio::time::sleep, retryable)
                    .await;
                let text = match &result {
                    Ok(_) => {
                        tracing::warn!(vmm = vmm.name(), "KVM runs a guest now; restart the node agent to use it");
                        "ok".to_owned()
                    }
                    Err(e) => e.replace('\n', " "),
                };
                if let Err(e) = tokio::fs::write(&cache, format!("{key}\n{text}")).await {
                    tracing::warn!(path = %cache.display(), error = %e, "could not save the KVM probe's result");
                }
            });
            return Err(why);
        }
    }
    let work = dir.join("probe");
    let work = work.as_path();
    let result =
        PROBE_RETRY.run_if(|| vm::probe(vmm, assets, work, PROBE_TIMEOUT), tokio::time::sleep, retryable).await;
    let text = match &result {
        Ok(took) => {
            tracing::info!(vmm = vmm.name(), took_ms = took.as_millis() as u64, "KVM runs a guest here");
            "ok".to_owned()
        }
        Err(e) => {
            if let Ok(mut f) = FAILED.lock() {
                f.push((key.clone(), e.clone()));
            }
            e.replace('\n', " ")
        }
    };
    // The failure's text stays for people to read; it is not trusted on the next start.
    if let Err(e) = tokio::fs::write(&cache, format!("{key}\n{text}")).await {
        tracing::warn!(path = %cache.display(), error = %e, "could not save the KVM probe's result");
    }
    result.map(|_| ())
}

async fn vm_runtime(
    o: &SelectOptions,
    vmm: Vmm,
    assets: GuestAssets,
    logs: Arc<LogStore>,
) -> Result<AnyRuntime, RuntimeError> {
    let settings = VmSettings {
        dir: o.dir.join("vms"),
        vmm,
        assets,
        base: o.base,
        disk_budget: o.disk_budget,
        vmm_user: o.vmm_user,
        snapshots: o.dir.join("snapshots"),
    };
    Ok(AnyRuntime::Vm(VmRuntime::new(settings, logs).await?))
}

/// Chooses and starts the driver `o.requested` stands for.
pub async fn select(o: &SelectOptions, logs: Arc<LogStore>) -> Result<Selected, RuntimeError> {
    let instances = o.dir.join("instances");
    let containers = || async {
        let rt = ContainerRuntime::new(&instances, &o.oci_runtime, o.base, logs.clone()).await?;
        Ok::<_, RuntimeError>(rt.confined(o.confinement))
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn waits_double_up_to_the_cap_and_stop_after_the_last_attempt() {
        let p = ProbeRetry { attempts: 6, first_wait: Duration::from_secs(1), max_wait: Duration::from_secs(5) };
        let waits: Vec<_> = (1..=7).map(|n| p.wait_after(n).map(|d| d.as_secs())).collect();
        assert_eq!(waits, [Some(1), Some(2), Some(4), Some(5), Some(5), None, None]);
        let once = ProbeRetry { attempts: 1, ..p };
        assert_eq!(once.wait_after(1), None);
        let many = ProbeRetry { attempts: u32::MAX, ..p };
        assert_eq!(many.wait_after(80), Some(Duration::from_secs(5)), "no overflow far along");
    }

    fn run(policy: ProbeRetry, outcomes: &[Result<u32, &str>]) -> (Result<u32, String>, usize, Vec<Duration>) {
        let calls = RefCell::new(0usize);
        let slept = RefCell::new(Vec::new());
        let result = block_on(policy.run(
            || {
                let i = *calls.borrow();
                *calls.borrow_mut() += 1;
                let r = outcomes[i.min(outcomes.len() - 1)].map_err(str::to_owned);
                async move { r }
            },
            |d| {
                slept.borrow_mut().push(d);
                async {}
            },
        ));
        (result, calls.into_inner(), slept.into_inner())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn a_transient_failure_is_retried() {
        let (r, calls, slept) = run(PROBE_RETRY, &[Err("no console"), Ok(7)]);
        assert_eq!((r, calls), (Ok(7), 2));
        assert_eq!(slept, [Duration::from_secs(1)]);
    }

    #[test]
    fn a_lasting_failure_ends_after_the_attempts_with_the_last_reason() {
        let (r, calls, slept) = run(PROBE_RETRY, &[Err("first"), Err("second"), Err("third"), Ok(1)]);
        assert_eq!(r, Err("third (after 3 attempts)".to_owned()));
        assert_eq!(calls, 3);
        assert_eq!(slept, [Duration::from_secs(1), Duration::from_secs(2)]);
        let (r, calls, slept) = run(ProbeRetry { attempts: 1, ..PROBE_RETRY }, &[Err("only")]);
        assert_eq!((r, calls, slept.len()), (Err("only".to_owned()), 1, 0));
    }

    #[test]
    fn a_success_needs_no_retry() {
        let (r, calls, slept) = run(PROBE_RETRY, &[Ok(3)]);
        assert_eq!((r, calls, slept.len()), (Ok(3), 1, 0));
    }

    #[test]
    fn only_a_saved_success_for_this_boot_is_trusted() {
        assert_eq!(saved_result("boot|qemu|k\nok", "boot|qemu|k"), Some(()));
        assert_eq!(saved_result("boot|qemu|k\nthe probe guest did not boot", "boot|qemu|k"), None);
        assert_eq!(saved_result("old-boot|qemu|k\nok", "boot|qemu|k"), None);
        assert_eq!(saved_result("garbage", "boot|qemu|k"), None);
    }

    #[test]
    fn a_saved_failure_of_this_boot_answers_the_next_start() {
        let failed = "boot|qemu|k\nthe probe guest did not boot (no answer within 20 s)";
        assert_eq!(
            saved_failure(failed, "boot|qemu|k").as_deref(),
            Some("the probe guest did not boot (no answer within 20 s)")
        );
        assert_eq!(saved_failure(failed, "other-boot|qemu|k"), None, "a reboot probes afresh");
        assert_eq!(saved_failure("boot|qemu|k\nok", "boot|qemu|k"), None);
        assert_eq!(saved_failure("garbage", "boot|qemu|k"), None);
        // A failure saved minutes ago is not probed again at each start; an older one, or one of unknown age, is.
        let now = std::time::SystemTime::now();
        assert!(!probe_again(Some(now - Duration::from_secs(30)), now));
        assert!(probe_again(Some(now - PROBE_AGAIN_AFTER), now));
        assert!(probe_again(None, now));
        assert!(!probe_again(Some(now + Duration::from_secs(30)), now), "a clock that went back waits");
    }

    #[test]
    fn a_probe_that_timed_out_is_not_retried_at_once() {
        let calls = RefCell::new(0usize);
        let r = block_on(PROBE_RETRY.run_if(
            || {
                *calls.borrow_mut() += 1;
                async { Err::<u32, _>("the probe guest did not boot (no answer within 20 s)".to_owned()) }
            },
            |_| async {},
            retryable,
        ));
        assert_eq!(*calls.borrow(), 1);
        assert!(r.unwrap_err().contains("no answer within"));
        assert!(retryable("/dev/kvm cannot be opened: Device or resource busy"));
    }
}
